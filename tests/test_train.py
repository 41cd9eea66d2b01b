"""Training on the real conf/, tracked in a real MLflow store: what a run records, and how it ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import TINY, path_overrides, run_cli
from resnet_lab.errors import ConfigError
from resnet_lab.train import TrainingDiverged, resolve_precision, train


def _client(cfg) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.tracking.uri)


def _runs(cfg, filter_string: str = ""):
    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    return client.search_runs([experiment.experiment_id], filter_string) if experiment else []


def test_a_run_records_params_metrics_artifacts_and_a_loadable_model(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg(
        "trainer.epochs=2", "trainer.grad_norm_every=1", "tracking.log_model=true",
        "tracking.system_metrics_interval_s=1",
    )  # fmt: skip
    metrics = train(cfg)

    run = _client(cfg).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "resnet8" and params["optimizer.name"] == "sgd"
    assert params["trainer.batch_size"] == "16" and params["schedule.milestones"] == "[0.5, 0.75]"
    assert int(params["model.trainable_params"]) > 0 and int(params["model.macs_per_image"]) > 0
    # What the auto settings resolved to here; cpu_smoke turns XLA off.
    assert params["trainer.precision"] == "auto" and params["precision_policy"] == resolve_precision("auto")
    assert params["jit_compile"] == "False"
    tags = run.data.tags
    assert tags["resnet_lab.family"] == "residual" and tags["resnet_lab.depth"] == "8"
    assert "resnet_lab.tracking_outage" not in tags  # the server never went away
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["digits-train", "digits-validation"]
    assert [t.value for t in inputs["digits-train"].tags] == ["train"]
    assert json.loads(inputs["digits-train"].dataset.profile)["num_examples"] > 0
    assert inputs["digits-train"].dataset.digest != inputs["digits-validation"].dataset.digest
    assert tags["resnet_lab.dataset"] == "digits"

    client = _client(cfg)
    for key in (
        "loss",
        "accuracy",
        "error",
        "val_loss",
        "val_error",
        "learning_rate",
        "epoch_time",
        "images_per_sec",
    ):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    errors = client.get_metric_history(run.info.run_id, "error")
    accuracies = client.get_metric_history(run.info.run_id, "accuracy")
    assert errors[-1].value == pytest.approx(1 - accuracies[-1].value)
    system = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
    assert system <= set(run.data.metrics)
    stage_norms = {k for k in run.data.metrics if k.startswith("grad_norm/")}
    assert {"grad_norm/conv1", "grad_norm/conv2", "grad_norm/conv4", "grad_norm/predictions"} <= stage_norms

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "config.yaml",
        "history.csv",
        "learning_curve.png",
        "model_summary.txt",
        "summary.json",
    } <= artifacts

    run_dir = tmp_path / "models" / "resnet8-0"
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mlflow_run_id"] == run.info.run_id and summary["family"] == "residual"
    assert summary["final"]["val_error"] == pytest.approx(metrics["val_error"])
    # Everything `python -m resnet_lab.tracking sync` needs, should the MLflow run lack any of it.
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "config.yaml", "history.csv", "learning_curve.png", "mlflow_run.json", "model.keras",
        "model_summary.txt", "status.json", "summary.json",
    ]  # fmt: skip
    assert json.loads((run_dir / "status.json").read_text())["status"] == "FINISHED"
    assert history["grad_norm/conv1"].notna().all()
    # The stage worked and checkpointed outside its DVC output, and tidied up once it was published.
    assert not (tmp_path / "checkpoints" / "resnet8-0").exists()

    assert "MLFLOW_TRACKING_URI" not in os.environ  # logging the model leaves no global behind
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    predictions = model.predict(np.zeros((3, 8, 8, 1), dtype="float32"))
    assert np.asarray(predictions).shape == (3, 10)


def test_tags_land_on_the_run_and_tracking_off_records_nothing(tiny_cfg, tmp_path):
    cfg = tiny_cfg("tags=[baseline,'owner=alice']")
    run = _client(cfg).get_run(train(cfg)["mlflow_run_id"])
    assert run.data.tags["baseline"] == "true" and run.data.tags["owner"] == "alice"
    assert run.data.tags["resnet_lab.kind"] == "train"

    store = tmp_path / "off.db"
    off = tiny_cfg(
        f"tracking.uri=sqlite:///{store}", "tracking=off", "paths.models_dir=" + str(tmp_path / "off")
    )
    assert train(off)["mlflow_run_id"] is None
    assert not store.exists()
    assert (tmp_path / "off" / "resnet8-0" / "model.keras").is_file()
    assert not (tmp_path / "off" / "resnet8-0" / "mlflow_run.json").exists()


def test_validation_accuracy_in_inference_mode_is_well_above_chance(tiny_cfg):
    # Guards the BN momentum: with Keras's 0.99 the moving statistics lag on short runs and validation
    # sits at chance (10%) while training accuracy climbs.
    cfg = tiny_cfg(
        "trainer.steps_per_epoch=null", "trainer.validation_steps=null", "trainer.epochs=3",
        "trainer.batch_size=32", "trainer.grad_norm_every=0", "schedule=constant",
        "optimizer.learning_rate=0.1",
    )  # fmt: skip
    metrics = train(cfg)
    # Measured with this configuration: 0.78 at momentum 0.9, 0.41 at Keras's 0.99.
    assert metrics["val_accuracy"] > 0.5, metrics


def test_same_seed_gives_identical_metrics_when_deterministic(tiny_cfg, tmp_path):
    runs = [
        train(tiny_cfg("trainer.deterministic=true", "trainer.epochs=2"), output_dir=tmp_path / f"run{i}")
        for i in range(2)
    ]
    histories = [pd.read_csv(tmp_path / f"run{i}" / "history.csv") for i in range(2)]
    columns = ["loss", "accuracy", "val_loss", "val_accuracy"]
    pd.testing.assert_frame_equal(histories[0][columns], histories[1][columns])
    assert runs[0]["mlflow_run_id"] != runs[1]["mlflow_run_id"]


def test_a_nan_loss_stops_training_and_fails_the_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg("optimizer.learning_rate=1e30", "trainer.epochs=3", "schedule=constant")
    with pytest.raises(TrainingDiverged, match="NaN"):
        train(cfg)
    (run,) = _runs(cfg)
    assert run.info.status == "FAILED"
    assert "TrainingDiverged" in run.data.tags["resnet_lab.failure"]
    run_dir = tmp_path / "models" / "resnet8-0"
    assert not (run_dir / "model.keras").exists() and not (run_dir / "summary.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epochs=0", "trainer.epochs must be a positive integer, got 0"),
        ("trainer.batch_size=-4", "trainer.batch_size must be a positive integer, got -4"),
        ("model.name=resnet9", "unknown model 'resnet9'"),
        ("optimizer.name=rmsprop", "unknown optimizer.name 'rmsprop'"),
        ("trainer.precision=float8", "unknown trainer.precision 'float8'"),
        ("trainer.batch_size=5000", "larger than the"),
    ],
)
def test_bad_configuration_fails_before_any_run(tiny_cfg, override, message):
    cfg = tiny_cfg(override)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert [r.info.status for r in _runs(cfg)] == []


def test_an_unreachable_tracking_server_fails_at_once_naming_the_uri(tiny_cfg, tmp_path):
    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"cannot reach the MLflow tracking server at {uri}"):
        train(tiny_cfg(f"tracking.uri={uri}"))
    assert time.monotonic() - started < 15
    assert not (tmp_path / "models").exists()


def test_a_real_mlflow_server_receives_the_run(tiny_cfg, mlflow_server):
    cfg = tiny_cfg(f"tracking.uri={mlflow_server.uri}")
    metrics = train(cfg)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]
    assert "history.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_stage_resumes_only_a_checkpoint_of_its_own_configuration(tiny_cfg, tmp_path):
    from resnet_lab.tracking import masked_yaml

    cfg = tiny_cfg()
    first = train(cfg)["mlflow_run_id"]
    work = tmp_path / "checkpoints" / "resnet8-0"

    def killed_stage(config) -> None:
        """What a stage killed in its first epoch leaves in its work directory."""
        work.mkdir(parents=True)
        (work / "mlflow_run.json").write_text(json.dumps({"run_id": first}))
        (work / "config.yaml").write_text(masked_yaml(config))

    killed_stage(cfg)
    assert train(cfg)["mlflow_run_id"] == first
    killed_stage(cfg)
    other = train(tiny_cfg("optimizer.learning_rate=0.05"))["mlflow_run_id"]
    assert other != first
    runs = _client(cfg).search_runs([_client(cfg).get_experiment_by_name("resnet-lab").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([first, other])
    assert [m.step for m in _client(cfg).get_metric_history(first, "loss")] == [1]


def test_sigterm_ends_the_run_killed(digits_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *TINY, *path_overrides(digits_root, tmp_path), f"hydra.run.dir={run_dir}",
        "trainer.steps_per_epoch=null", "trainer.epochs=50", "trainer.checkpoint=false",
    ]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "resnet_lab.train", *args], cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not (run_dir / "history.csv").is_file():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) != 0
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert (
        MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "KILLED"
    )


def test_a_sigterm_during_a_tracking_call_is_delivered_when_the_call_ends():
    from resnet_lab.tracking import _signals_held
    from resnet_lab.train import sigterm_as_interrupt

    previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with _signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)
                done.append("the MLflow call")
        assert done == ["the MLflow call"]
        assert signal.getsignal(signal.SIGTERM) is sigterm_as_interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_two_job_multirun_shares_one_parent_run(digits_root, tmp_path):
    result = run_cli(
        ["resnet_lab.train", "--multirun", *TINY, *path_overrides(digits_root, tmp_path),
         f"hydra.sweep.dir={tmp_path}/sweep", "model=resnet8,plain8"],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("resnet-lab")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("resnet_lab.kind") == "sweep"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.params["model.name"] for r in children) == ["plain8", "resnet8"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.data.tags["hydra.job_num"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in children)
    # The parent row answers "which won": the best job's metrics, each job's, and a table.
    best = min(children, key=lambda r: r.data.metrics["val_error"])
    assert parent.data.tags["resnet_lab.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best/val_error"] == best.data.metrics["val_error"]
    jobs = {f"val_error/job{r.data.tags['hydra.job_num']}-{r.info.run_name}" for r in children}
    assert jobs <= set(parent.data.metrics)
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(tmp_path)))
    assert sorted(table["run_id"]) == sorted(r.info.run_id for r in children)


def test_a_sweep_summary_ranks_by_val_error_when_the_newest_job_has_none(tmp_path):
    from resnet_lab.tracking import Run, summarize_sweep

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("sweep")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    # search_runs lists the newest first: the failed job, which logged no val_error, heads the rows.
    for start, name, val_error in ((1, "alpha", 0.3), (2, "beta", 0.1), (3, "gamma", None)):
        child = client.create_run(
            experiment, start_time=start, run_name=name, tags={"mlflow.parentRunId": parent}
        ).info.run_id
        if val_error is not None:
            client.log_metric(child, "val_error", val_error)
    summarize_sweep(Run(client, parent))
    summary = client.get_run(parent).data
    assert summary.tags["resnet_lab.best_run_name"] == "beta"
    assert summary.metrics["best/val_error"] == 0.1


def test_an_optuna_learning_rate_search_reports_its_best_trial(digits_root, tmp_path):
    result = run_cli(
        ["resnet_lab.train", "--multirun", "hparams_search=learning_rate", "hydra.sweeper.n_trials=2",
         *TINY, *path_overrides(digits_root, tmp_path), f"hydra.sweep.dir={tmp_path}/sweep"],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Best parameters: {'optimizer.learning_rate':" in result.stdout + result.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("resnet-lab").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("resnet_lab.kind") == "sweep"]
    trials = [r for r in runs if r is not parent]
    assert len({r.data.params["optimizer.learning_rate"] for r in trials}) == 2
    best = min(trials, key=lambda r: r.data.metrics["val_error"])
    assert parent.data.tags["resnet_lab.best_run_id"] == best.info.run_id


def test_mirrored_strategy_over_two_logical_cpus(digits_root, tmp_path):
    base = [
        *TINY,
        *path_overrides(digits_root, tmp_path),
        "trainer.logical_cpus=2",
        "trainer.distribution=mirrored",
    ]
    result = run_cli(["resnet_lab.train", *base, f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("resnet-lab").experiment_id])
    assert run.data.params["replicas"] == "2" and run.info.status == "FINISHED"

    odd = run_cli(
        ["resnet_lab.train", *base, "trainer.batch_size=15", f"hydra.run.dir={tmp_path}/odd"], tmp_path
    )
    assert odd.returncode == 2
    assert odd.stderr.strip().splitlines()[-1] == (
        "error: trainer.batch_size 15 is not divisible by the 2 replicas"
    )


@pytest.mark.parametrize(
    ("setting", "capabilities", "policy"),
    [
        ("auto", [], "float32"),  # a CPU
        ("auto", [(8, 0)], "mixed_float16"),  # A100
        ("auto", [(9, 0), (9, 0)], "mixed_float16"),  # two H100s
        ("auto", [(7, 0)], "mixed_float16"),  # V100: the first with Tensor Cores
        ("auto", [(6, 1)], "float32"),  # P100-class: float16 without Tensor Cores
        ("auto", [(8, 6), (6, 1)], "float32"),  # a mix: the slowest decides
        ("auto", [None], "float32"),  # a GPU that does not report its capability
        ("mixed_bfloat16", [(8, 0)], "mixed_bfloat16"),  # an explicit policy is kept
        ("mixed_float16", [], "mixed_float16"),
    ],
)
def test_precision_auto_is_mixed_float16_on_tensor_core_gpus_only(setting, capabilities, policy):
    assert resolve_precision(setting, capabilities) == policy


def test_mixed_float16_trains_with_loss_scaling_and_a_float32_classifier(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.precision=mixed_float16")
    metrics = train(cfg)
    run = _client(cfg).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["precision_policy"] == "mixed_float16"
    assert np.isfinite(run.data.metrics["loss"])
    import keras

    model = keras.saving.load_model(tmp_path / "models" / "resnet8-0" / "model.keras", compile=False)
    assert model.get_layer("conv1_conv").compute_dtype == "float16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run


def test_constant_warmup_holds_a_tenth_of_the_rate_then_the_step_schedule():
    """The CIFAR-10 preset's warm-up (He et al. 2015, Sec. 4.2: 0.01 for ~400 iterations, then 0.1)."""
    import keras
    from omegaconf import OmegaConf

    from resnet_lab.schedules import ConstantWarmup, make_schedule

    step = {"name": "step", "milestones": [0.5, 0.75], "factor": 0.1}
    step |= {"warmup_epochs": 1.14, "warmup_factor": 0.1}
    schedule = make_schedule(OmegaConf.create(step), 0.1, 351, 182)
    assert isinstance(schedule, ConstantWarmup) and schedule.warmup_steps == 400
    rates = [float(schedule(s)) for s in (0, 399, 400, 31_941, 31_942, 47_912)]
    assert rates == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.01, 0.001])
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(again, ConstantWarmup) and float(again(0)) == pytest.approx(0.01)
