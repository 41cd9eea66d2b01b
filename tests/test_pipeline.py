"""The DVC pipeline for real: `dvc repro`, `dvc exp run -S`, `dvc metrics show` in a temporary git repo.

The repo is a copy of this project's conf/, dvc.yaml, .dvc/ settings and source, with the `smoke`
experiment as the default so that DVC's Hydra composition keeps the study tiny.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, *, check=True, timeout=600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        # The stages' `python` is this interpreter, with the package installed.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@127.0.0.1",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@127.0.0.1",
    }  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise AssertionError(
            f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _dvc(*args, cwd, check=True):
    return _run([sys.executable, "-m", "dvc", *args], cwd, check=check)


def _compose_params(repo: Path) -> None:
    """What `dvc exp run` does before it runs: compose conf/ into params.yaml with DVC's own code."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(repo / "params.yaml", str(repo / "conf"), None, "config", str(repo), [])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repo holding the project's pipeline with the smoke study, after one `dvc repro`."""
    repo = tmp_path_factory.mktemp("pipeline")
    for name in ("conf", "src", "dvc.yaml", ".dvcignore"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, repo / name)
    config = repo / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("- experiment: null", "- experiment: smoke"))
    _run(["git", "init", "-q"], repo)
    _dvc("init", "-q", cwd=repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    _compose_params(repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "smoke pipeline"], repo)
    repro = _dvc("repro", cwd=repo)
    (repo / "repro.log").write_text(repro.stdout)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "repro"], repo)
    return repo


def _client(repo: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")


def test_the_committed_params_yaml_is_the_composition_of_conf(tmp_path):
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(tmp_path / "params.yaml", str(ROOT / "conf"), None, "config", str(ROOT), [])
    assert OmegaConf.load(tmp_path / "params.yaml") == OmegaConf.load(ROOT / "params.yaml")


@pytest.mark.slow
def test_repro_runs_every_stage_and_tracks_every_run(repo):
    log = (repo / "repro.log").read_text()
    for stage in (
        "prepare",
        "train@plain8-0",
        "train@resnet8-0",
        "evaluate",
        "compare",
    ):
        assert f"Running stage '{stage}'" in log
    lock = OmegaConf.load(repo / "dvc.lock")
    assert {"prepare", "train@plain8-0", "train@resnet8-0", "compare"} <= set(lock.stages)
    verdict = json.loads((repo / "reports" / "verdict.json").read_text())
    # One seed: the smoke study's claim is untested, and the report says so plainly.
    assert verdict["answer"] == "inconclusive"
    assert verdict["comparisons"][0]["outcome"] == "untested"
    assert "Inconclusive" in (repo / "reports" / "degradation.md").read_text()

    client = _client(repo)
    experiment = client.get_experiment_by_name("resnet-lab")
    runs = client.search_runs([experiment.experiment_id])
    training = {r.data.params["model.name"]: r for r in runs if "model.name" in r.data.params}
    assert set(training) == {"plain8", "resnet8"}
    for name, run in training.items():
        assert run.info.status == "FINISHED"
        summary = json.loads((repo / "models" / f"{name}-0" / "summary.json").read_text())
        test_metrics = json.loads((repo / "metrics" / f"{name}-0.json").read_text())
        assert summary["mlflow_run_id"] == run.info.run_id
        # evaluate logs into the training run, not a run of its own
        assert run.data.metrics["test_error"] == pytest.approx(test_metrics["test_error"])
        assert run.data.metrics["train_error"] == pytest.approx(test_metrics["train_error"])
    assert any(r.data.tags.get("resnet_lab.kind") == "study" and r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_a_second_repro_does_nothing(repo):
    result = _dvc("repro", cwd=repo)
    assert "Data and pipelines are up to date." in result.stdout
    assert "Running stage" not in result.stdout


@pytest.mark.slow
def test_metrics_and_plots_are_declared(repo):
    metrics = json.loads(_dvc("metrics", "show", "--json", cwd=repo).stdout)
    workspace = metrics[""]["data"]  # the workspace
    assert workspace["metrics/resnet8-0.json"]["data"]["train_error"] >= 0
    assert workspace["metrics/plain8-0.json"]["data"]["test_error"] >= 0
    assert workspace["reports/verdict.json"]["data"]["answer"] == "inconclusive"
    plots = json.loads(_dvc("plots", "show", "--json", cwd=repo).stdout)["data"]
    curves = plots["reports/curves.csv"][0]["content"]
    assert {row["model"] for row in curves["data"]["values"]} == {"plain8", "resnet8"}
    assert "plots/confusion/plain8-0.json" in plots and "plots/confusion/resnet8-0.png" in plots


@pytest.mark.slow
def test_exp_run_set_param_reruns_only_what_it_affects(repo):
    result = _dvc("exp", "run", "-S", "trainer.epochs=2", cwd=repo)
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@plain8-0", "train@resnet8-0", "evaluate", "compare"}
    assert OmegaConf.load(repo / "params.yaml").trainer.epochs == 2  # DVC recomposed conf/ with the override
    name = result.stdout.split("Ran experiment(s): ")[1].split()[0]
    client = _client(repo)
    runs = client.search_runs(
        [client.get_experiment_by_name("resnet-lab").experiment_id], f"tags.`dvc.exp_name` = '{name}'"
    )
    assert len([r for r in runs if "model.name" in r.data.params]) == 2


@pytest.mark.slow
def test_a_killed_repro_resumes_the_interrupted_stage_and_only_that(repo):
    # Longer epochs so that the kill lands inside train@resnet8-0, after train@plain8-0 has finished.
    params = OmegaConf.load(repo / "params.yaml")
    params.trainer.steps_per_epoch = None
    params.trainer.epochs = 3
    OmegaConf.save(params, repo / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    work = repo / "checkpoints" / "resnet8-0"
    backed_up = work / "backup" / "training_metadata.json"
    deadline = time.monotonic() + 300
    while not (backed_up.is_file() and backed_up.read_text()):
        assert process.poll() is None, "dvc repro ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run_id = json.loads((work / "mlflow_run.json").read_text())["run_id"]
    assert _client(repo).get_run(run_id).info.status == "RUNNING"

    status = json.loads(_dvc("status", "--json", cwd=repo).stdout)
    assert "train@resnet8-0" in status and "train@plain8-0" not in status
    lock = OmegaConf.load(repo / "dvc.lock")
    assert lock.stages["train@plain8-0"].params["params.yaml"].trainer.epochs == 3
    # The interrupted stage's output was not recorded, so it is not taken for a result.
    assert lock.stages["train@resnet8-0"].params["params.yaml"].trainer.epochs == 2

    result = _dvc("repro", cwd=repo)
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert {"train@resnet8-0", "evaluate", "compare"} <= ran
    assert not {"prepare", "train@plain8-0"} & ran
    assert json.loads(_dvc("status", "--json", cwd=repo).stdout) == {}
    # The stage resumed from its checkpoint: the same MLflow run, each epoch once.
    summary = json.loads((repo / "models" / "resnet8-0" / "summary.json").read_text())
    assert summary["mlflow_run_id"] == run_id
    run = _client(repo).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resnet_lab.resumed"] == "true"
    assert [m.step for m in _client(repo).get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert not work.exists()


@pytest.mark.slow
def test_a_fresh_clone_pulls_everything_from_a_dvc_remote_and_is_up_to_date(repo, tmp_path):
    """Data and models shared through a DVC remote (a local directory here; S3 with `dvc-s3` the same way)."""
    _dvc("remote", "add", "--default", "shared", str(tmp_path / "remote"), cwd=repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "shared remote", "--allow-empty"], repo)
    _dvc("push", cwd=repo)

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "models" / "resnet8-0").exists()
    _dvc("pull", cwd=clone)
    for model in ("plain8", "resnet8"):
        assert (clone / "models" / f"{model}-0" / "model.keras").is_file()
    assert json.loads(_dvc("status", "--json", cwd=clone).stdout) == {}
    result = _dvc("repro", cwd=clone)
    assert "Data and pipelines are up to date." in result.stdout
    assert "Running stage" not in result.stdout
