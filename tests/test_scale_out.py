"""Growing past one process, for real and small: parallel sweeps into one tracking store, sweeps through
submitit, one model trained by two TF_CONFIG workers; and what a tracking store may see of a password.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from conftest import TINY, MlflowServer, free_port, path_overrides, run_cli
from resnet_lab.config import conf_dir

SECRET = "s3cret"
MODELS = ("resnet8", "plain8")
SEEDS = (0, 1, 2, 3)
SWEEP_SEEDS = ",".join(map(str, SEEDS))


def _sweep_runs(client: MlflowClient):
    """The sweep's parent run and its children."""
    experiment = client.get_experiment_by_name("resnet-lab")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("resnet_lab.kind") == "sweep"]
    return parent, [r for r in runs if r is not parent]


def _assert_complete_sweep(client: MlflowClient, models, seeds, epochs: int) -> None:
    parent, children = _sweep_runs(client)
    assert parent.info.status == "FINISHED"
    assert sorted((r.data.params["model.name"], int(r.data.params["seed"])) for r in children) == sorted(
        (model, seed) for model in models for seed in seeds
    )
    assert sorted(int(r.data.tags["hydra.job_num"]) for r in children) == list(
        range(len(models) * len(seeds))
    )
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("resnet_lab.failure")
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for key in ("loss", "val_error", "learning_rate"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(
                range(1, epochs + 1)
            )


@pytest.fixture(scope="module")
def server_sweep(digits_root, tmp_path_factory):
    """Eight jobs through the joblib launcher, two at a time, into a real server behind a password URI."""
    work = tmp_path_factory.mktemp("server_sweep")
    server = MlflowServer(work / "server").start()
    uri = server.uri.replace("://", f"://alice:{SECRET}@")
    try:
        result = run_cli(
            [
                "resnet_lab.train", "--multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                *TINY, *path_overrides(digits_root, work), f"tracking.uri={uri}", "trainer.epochs=2",
                f"hydra.sweep.dir={work}/sweep", f"model={','.join(MODELS)}", f"seed={SWEEP_SEEDS}",
            ],
            work,
            timeout=420,
        )  # fmt: skip
        yield result, MlflowClient(tracking_uri=server.uri), server
    finally:
        server.stop()


@pytest.mark.slow
def test_eight_parallel_jobs_all_reach_the_tracking_server(server_sweep):
    result, client, server = server_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_complete_sweep(client, MODELS, SEEDS, epochs=2)
    assert _listening_addresses(server.port) == {"127.0.0.1"}


def test_a_tracking_uri_password_is_masked_in_parameters(server_sweep):
    result, client, server = server_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    masked = server.uri.replace("://", "://alice:***@")
    for run in _sweep_runs(client)[1]:
        assert run.data.params["tracking.uri"] == masked
        assert not [key for key, value in run.data.params.items() if SECRET in value]


def test_no_tag_or_artifact_holds_a_tracking_password(server_sweep, tmp_path):
    result, client, _ = server_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = _sweep_runs(client)
    for run in (parent, *children):
        assert not [key for key, value in run.data.tags.items() if SECRET in value], run.data.tags
    config = client.download_artifacts(children[0].info.run_id, "config.yaml", str(tmp_path))
    assert SECRET not in Path(config).read_text()


# What a training run does to a store, as fast as it can: a run, its parameters, a metric batch per
# "epoch", its end. Four of these at once on one SQLite file is harsher than a sweep of real jobs.
_HAMMER = """
import sys
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

client = MlflowClient(tracking_uri=sys.argv[1])
experiment = client.get_experiment_by_name("hammer").experiment_id
for _ in range(int(sys.argv[3])):
    run = client.create_run(experiment, tags={"worker": sys.argv[2]}).info.run_id
    client.log_batch(run, params=[Param(f"p{i}", str(i)) for i in range(60)])
    for step in range(1, 11):
        client.log_batch(run, metrics=[Metric(f"m{i}", float(step), 0, step) for i in range(8)])
    client.set_terminated(run, "FINISHED")
"""


def test_parallel_writers_on_one_sqlite_file_lose_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # The schema and the experiment first: processes racing to create either fail (see the report).
    MlflowClient(tracking_uri=uri).create_experiment("hammer")
    workers, runs_each = 4, 3
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, uri, str(worker), str(runs_each)], stderr=subprocess.PIPE
        )
        for worker in range(workers)
    ]
    failures = [p.stderr.read().decode()[-1500:] for p in processes if p.wait(timeout=300) != 0]
    assert not failures, failures
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("hammer").experiment_id], max_results=1000)
    assert len(runs) == workers * runs_each
    assert all(r.info.status == "FINISHED" and len(r.data.params) == 60 for r in runs)
    assert all(len(client.get_metric_history(r.info.run_id, "m7")) == 10 for r in runs[:4])


def test_two_runs_logging_one_new_dataset_at_once_both_record_it(tiny_cfg):
    """The race a parallel sweep's first epoch can lose: both runs look the dataset up before either
    inserts it. A transaction the test holds open on the SQLite file keeps both waiting at the insert.
    """
    from resnet_lab.tracking import Run, log_dataset_inputs

    cfg = tiny_cfg()
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.create_experiment("race")
    runs = [
        Run(MlflowClient(tracking_uri=cfg.tracking.uri), client.create_run(experiment).info.run_id)
        for _ in "ab"
    ]
    writer = sqlite3.connect(cfg.tracking.uri.removeprefix("sqlite:///"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    errors = []

    def log(run):
        try:
            log_dataset_inputs(run, cfg, ("train",))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=log, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    time.sleep(2)  # both past their look-up, waiting for the write lock
    writer.execute("COMMIT")
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    logged = [client.get_run(run.run_id).inputs.dataset_inputs for run in runs]
    assert [[i.dataset.name for i in inputs] for inputs in logged] == [["digits-train"]] * 2
    assert logged[0][0].dataset.digest == logged[1][0].dataset.digest


@pytest.mark.slow
def test_a_submitit_local_sweep_runs_two_jobs_into_one_sqlite_file(digits_root, tmp_path):
    """Two job processes at once (and the launcher's parent run) write straight to one SQLite file.

    SQLite serialises writers with a file lock, which MLflow's SQLAlchemy store waits for: one machine's
    parallel sweep works without a server; see the next test for a harsher load.
    """
    result = run_cli(
        [
            "resnet_lab.train", "--multirun", "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10", *TINY,
            *path_overrides(digits_root, tmp_path), f"hydra.sweep.dir={tmp_path}/sweep",
            f"model={','.join(MODELS)}",
        ],
        tmp_path,
        timeout=420,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_complete_sweep(
        MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"), MODELS, (0,), epochs=1
    )
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 2


def test_the_submitit_slurm_launcher_config_composes(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    documented = ["partition=gpu", "gpus_per_node=4"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=["hydra/launcher=slurm", *(f"hydra.launcher.{o}" for o in documented)],
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["partition"] == "gpu" and launcher.params["gpus_per_node"] == 4
    # The preset's own values: one process per node, and requeues that resume from the checkpoint.
    assert launcher.params["tasks_per_node"] == 1 and launcher.params["max_num_timeout"] == 3


@pytest.mark.slow
def test_two_tf_config_workers_train_one_model(digits_root, tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    args = [
        *TINY, *path_overrides(digits_root, tmp_path), "trainer.distribution=auto",
        "trainer.grad_norm_every=1",
        f"hydra.run.dir={tmp_path}/run",
    ]  # fmt: skip
    logs = [tmp_path / f"worker-{index}.log" for index in range(2)]
    workers = []
    for index, log in enumerate(logs):
        task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        with log.open("w") as stderr:
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "resnet_lab.train", *args],
                    cwd=tmp_path,
                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_CONFIG": json.dumps(task)},
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )  # fmt: skip
            )
    deadline = time.monotonic() + 300
    try:
        while any(w.poll() is None for w in workers):
            # A worker whose peer died waits in a collective op for ever, deaf to SIGTERM.
            if any(w.poll() for w in workers) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
                worker.wait()
    assert [w.returncode for w in workers] == [0, 0], [log.read_text()[-2000:] for log in logs]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("resnet-lab").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["replicas"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]
    chief = json.loads((tmp_path / "run" / "summary.json").read_text())
    (other,) = (tmp_path / "run").glob("worker-1/summary.json")
    assert chief["mlflow_run_id"] == run.info.run_id
    # One model trained together: both workers saw the same all-reduced loss.
    assert json.loads(other.read_text())["final"]["loss"] == chief["final"]["loss"]


def _listening_addresses(port: int) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="inet")
        if c.status == "LISTEN" and c.laddr.port == port
    }


def test_the_tests_mlflow_server_listens_on_loopback_only(mlflow_server):
    assert _listening_addresses(int(mlflow_server.uri.rsplit(":", 1)[1])) == {"127.0.0.1"}


def test_the_readme_starts_no_mlflow_server_on_every_interface():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for command in re.findall(r"^.*mlflow (?:server|ui)\b.*$", readme, flags=re.MULTILINE):
        # MLflow's own default is 127.0.0.1; a team server is put behind authentication explicitly.
        assert not re.search(r"(--host|-h)[ =](0\.0\.0\.0|::)", command) or "basic-auth" in command, command


def test_no_password_in_a_tracked_file():
    root = Path(__file__).parents[1]
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True)
    credentials = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:([^\s/@'\"]+)@")
    # Placeholders (<password>, ${PGPASSWORD}, ***) and the tests' own stand-in.
    stand_in = re.compile(rf"^(\*+|<[^>]*>|\$\{{?\w+\}}?|\{{\w+\}}|secret|password|{SECRET})$")
    found = []
    for name in tracked.stdout.split("\0"):
        path = root / name
        if name and path.is_file() and path.stat().st_size < 2_000_000:
            text = path.read_text(errors="ignore")
            found += [
                f"{name}: {m.group(0)}" for m in credentials.finditer(text) if not stand_in.match(m.group(1))
            ]
    assert not found, found
