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

import pandas as pd
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, *, check=True, timeout=600) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, check=check, timeout=timeout)


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
    # What an uninterrupted study ends with, for the chaos test to hold a killed one to.
    reference = repo.parent / "reference"
    shutil.copytree(repo / "metrics", reference / "metrics")
    for member in ("plain8-0", "resnet8-0"):
        shutil.copy(repo / "models" / member / "history.csv", reference / f"{member}.history.csv")
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


# The columns of history.csv that a deterministic run reproduces exactly (not its timings).
_LEARNED = ["epoch", "loss", "accuracy", "error", "val_loss", "val_accuracy", "val_error", "learning_rate"]

# Run by every Python process of the chaos study: the checkpoint's renames take half a second each, so that
# kills land inside checkpoint writes too. Only the chaos study's processes see this file.
_SLOW_CHECKPOINT_WRITES = """
import importlib.abc, importlib.util, sys, time, types

class _SlowRenames(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "resnet_lab.checkpoints":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def slowed(module):
            exec_module(module)
            slow_os = types.ModuleType("os")
            slow_os.__dict__.update(module.os.__dict__)
            def replace(src, dst, _replace=module.os.replace):
                time.sleep(0.5)
                _replace(src, dst)
            slow_os.replace = replace
            module.os = slow_os

        spec.loader.exec_module = slowed
        return spec

sys.meta_path.insert(0, _SlowRenames())
"""


# The stages of the smoke study, in the order `dvc repro` runs them.
_STAGES = ["prepare", "train@plain8-0", "train@resnet8-0", "evaluate", "compare"]


def _repro_killed(clone: Path, env: dict, stage: str, when) -> str | None:
    """Start `dvc repro`; once `stage` (or a later one) runs, wait for `when` and SIGKILL the whole group.

    `when` is seconds to wait, or a path whose appearance is the moment. Returns the stage that was running
    when the kill landed, or None when the study finished first.
    """
    import threading

    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=clone, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    running: list[str] = []
    reached = threading.Event()

    def read() -> None:
        for line in process.stdout:
            if line.startswith("Running stage"):
                running.append(line.split("'")[1])
                if _STAGES.index(running[-1]) >= _STAGES.index(stage):
                    reached.set()
        reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reached.wait(timeout=600)
    deadline = time.monotonic() + (when if isinstance(when, float) else 120)
    while process.poll() is None and time.monotonic() < deadline:
        if not isinstance(when, float) and list(when.parent.glob(when.name)):
            break
        time.sleep(0.01)
    if process.poll() is not None:
        reader.join()
        assert process.returncode == 0, f"dvc repro failed after {running}"
        return None
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    reader.join()
    return running[-1] if running else "dvc start-up"


@pytest.mark.slow
def test_a_study_killed_at_random_moments_ends_as_an_uninterrupted_one(repo, tmp_path):
    """SIGKILL to the whole `dvc repro` at seeded random moments in every stage, then repro until done."""
    import random

    clone = tmp_path / "chaos"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    _run(["git", "checkout", "-q", "HEAD~1"], clone)  # the pipeline before its first repro
    assert not (clone / "dvc.lock").exists()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_SLOW_CHECKPOINT_WRITES)
    env = {
        **os.environ, "PYTHONPATH": str(hooks), "TF_CPP_MIN_LOG_LEVEL": "3",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    moments = random.Random(1512_03385)
    # A seeded moment in each stage, and one inside a checkpoint write (its file under the temporary name).
    plan = [(stage, moments.uniform(0.5, 8.0)) for stage in _STAGES]
    plan.insert(2, ("train@plain8-0", clone / "checkpoints" / "plain8-0" / "backup" / ".partial-epoch-*"))
    kills = [(stage, _repro_killed(clone, env, stage, when)) for stage, when in plan]
    assert sum(landed is not None for _, landed in kills) >= 4, kills
    _dvc("repro", cwd=clone)

    assert json.loads(_dvc("status", "--json", cwd=clone).stdout) == {}
    assert "Data and pipelines are up to date." in _dvc("repro", cwd=clone).stdout
    reference = repo.parent / "reference"
    for member in ("plain8-0", "resnet8-0"):
        ended = json.loads((clone / "metrics" / f"{member}.json").read_text())
        assert ended == json.loads((reference / "metrics" / f"{member}.json").read_text()), (member, kills)
        history = pd.read_csv(clone / "models" / member / "history.csv")[_LEARNED]
        pd.testing.assert_frame_equal(history, pd.read_csv(reference / f"{member}.history.csv")[_LEARNED])
    runs = _client(clone).search_runs([_client(clone).get_experiment_by_name("resnet-lab").experiment_id])
    assert not [(r.info.run_name, r.info.status) for r in runs if r.info.status in ("RUNNING", "FAILED")], (
        kills
    )


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
    assert "reports/final_errors.png" in plots and "reports/learning_curves.png" in plots


@pytest.mark.slow
def test_exp_run_set_param_reruns_only_what_it_affects(repo):
    # study.alpha is read by compare alone (dvc.yaml's dotted params): no training or evaluation reruns.
    result = _dvc("exp", "run", "-S", "study.alpha=0.01", cwd=repo)
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"compare"}
    assert OmegaConf.load(repo / "params.yaml").study.alpha == 0.01  # DVC recomposed conf/ with the override
    assert json.loads((repo / "reports" / "verdict.json").read_text())["alpha"] == 0.01
    name = result.stdout.split("Ran experiment(s): ")[1].split()[0]
    client = _client(repo)
    runs = client.search_runs(
        [client.get_experiment_by_name("resnet-lab").experiment_id], f"tags.`dvc.exp_name` = '{name}'"
    )
    assert [r.data.tags["resnet_lab.kind"] for r in runs] == ["study"]


@pytest.mark.slow
def test_a_killed_repro_resumes_the_interrupted_stage_and_only_that(repo):
    # Longer epochs so that the kill lands inside train@resnet8-0, after train@plain8-0 has finished.
    params = OmegaConf.load(repo / "params.yaml")
    recorded_steps = params.trainer.steps_per_epoch
    assert recorded_steps is not None
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
    assert lock.stages["train@plain8-0"].params["params.yaml"].trainer.steps_per_epoch is None
    # The interrupted stage's output was not recorded, so it is not taken for a result.
    assert lock.stages["train@resnet8-0"].params["params.yaml"].trainer.steps_per_epoch == recorded_steps

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
