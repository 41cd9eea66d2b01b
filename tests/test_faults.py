"""Faults done for real: a tracking server that goes away mid-run, a damaged prepared dataset, a kill -9."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import TINY, path_overrides, run_cli
from resnet_lab import tracking
from resnet_lab.callbacks import HistoryLogger
from resnet_lab.config import compose
from resnet_lab.train import train

HISTORY = ["loss", "accuracy", "val_loss", "val_accuracy"]


def test_a_tracking_server_outage_loses_no_metric(tiny_cfg, tmp_path, mlflow_server, monkeypatch, caplog):
    """Gone after epoch 1, back after epoch 2 (caught up by itself), gone after epoch 3 (synced by hand)."""
    server = mlflow_server
    cfg = tiny_cfg(
        f"tracking.uri={server.uri}",
        "trainer.epochs=4",
        "trainer.grad_norm_every=2",
        "tracking.log_model=true",
    )
    log_epoch = HistoryLogger.on_epoch_end
    outage_s = []
    last_epoch_logged = []

    def on_epoch_end(self, epoch, logs=None):
        started = time.monotonic()
        log_epoch(self, epoch, logs)
        last_epoch_logged[:] = [time.monotonic()]
        if epoch > 0:
            outage_s.append(time.monotonic() - started)
        if epoch in (0, 2):
            server.kill()
        elif epoch == 1:
            server.start()

    monkeypatch.setattr(HistoryLogger, "on_epoch_end", on_epoch_end)
    with caplog.at_level(logging.WARNING, logger="resnet_lab.tracking"):
        metrics = train(cfg)  # goes on, and ends normally
    ending_s = time.monotonic() - last_epoch_logged[0]

    run_dir = tmp_path / "models" / "resnet8-0"
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 4
    # MLflow's own retries would hold each epoch for minutes.
    assert max(outage_s) < 20, outage_s
    # Nor its end, the system-metrics thread included (it had waited out MLflow's retries, 4 minutes).
    assert ending_s < 60, ending_s
    warnings = [r.getMessage() for r in caplog.records]
    assert any("unreachable" in w and "tracking sync" in w for w in warnings), warnings
    assert any("stays RUNNING" in w for w in warnings), warnings

    client = MlflowClient(tracking_uri=server.uri)
    run_id = metrics["mlflow_run_id"]
    with pytest.raises(SystemExit) as exit_info:  # still away: one line, and nothing changes
        tracking.main(["sync", str(run_dir)])
    assert exit_info.value.code == 2

    server.start()
    # Epoch 2 came back with epoch 3's sync; epoch 4 and the end wait for the command.
    assert client.get_run(run_id).info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    tracking.main(["sync", str(run_dir)])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "grad_norm/conv1")] == [2, 4]
    assert "train_time_s" in run.data.metrics
    assert "logged late" in run.data.tags[tracking.OUTAGE_TAG]
    assert set(tracking.RUN_ARTIFACTS) <= {a.path for a in client.list_artifacts(run_id)}
    experiment = run.info.experiment_id
    assert [m.source_run_id for m in client.search_logged_models(experiment_ids=[experiment])] == [run_id]

    # Idempotent: a second sync sends nothing and logs no second model.
    assert tracking.sync(run_dir, client) == 0
    assert len(client.get_metric_history(run_id, "loss")) == 4
    assert len(client.search_logged_models(experiment_ids=[experiment])) == 1


def test_sync_refuses_a_uri_without_its_password(tmp_path, capsys):
    (tmp_path / tracking.RUN_ID_FILE).write_text(
        json.dumps({"run_id": "x", "tracking_uri": "https://u:***@h"})
    )
    with pytest.raises(SystemExit) as exit_info:
        tracking.main(["sync", str(tmp_path)])
    assert exit_info.value.code == 2
    id_file = tmp_path / tracking.RUN_ID_FILE
    assert (
        capsys.readouterr().err.strip()
        == f"error: {id_file} records https://u:***@h without its password: pass --uri"
    )


def _prepared_copy(digits_root: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(digits_root / "prepared", data / "prepared")
    (data / "tfds").symlink_to(digits_root / "tfds")
    return data


def test_a_truncated_split_index_fails_the_train_cli_on_one_line(digits_root, tmp_path):
    data = _prepared_copy(digits_root, tmp_path)
    index = data / "prepared" / "digits" / "train_indices.npy"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    result = run_cli(
        ["resnet_lab.train", *TINY, *path_overrides(data, tmp_path), f"hydra.run.dir={tmp_path}/run"],
        tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith(f"error: split index file {index} is corrupted: sha256 ")
    assert errors[0].endswith("rerun the prepare stage")
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "run" / "mlflow_run.json").exists()


def _train_stage_error(data: Path, tmp_path: Path, capsys) -> str:
    """Run the DVC train stage over the data under `data`; it must fail on one `error:` line, returned."""
    from omegaconf import OmegaConf

    from resnet_lab.train import stage_main

    params = tmp_path / "params.yaml"
    OmegaConf.save(compose([*TINY, *path_overrides(data, tmp_path)]), params)
    with pytest.raises(SystemExit) as exit_info:
        stage_main(["--params", str(params)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "models").exists()
    return err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "validation_indices.npy").unlink(), "validation_indices.npy cannot be read"),
        (
            lambda d: (d / "dataset.json").write_text('{"format_version": 2, "na'),
            "is not a valid dataset description",
        ),
        (lambda d: (d / "dataset.json").write_text('{"format_version": 2}'), "lacks name, version"),
    ],
    ids=["missing index file", "truncated description", "description without fields"],
)
def test_a_damaged_prepared_dataset_fails_the_stage_on_one_line(
    digits_root, tmp_path, capsys, damage, message
):
    data = _prepared_copy(digits_root, tmp_path)
    damage(data / "prepared" / "digits")
    assert message in _train_stage_error(data, tmp_path, capsys)


def test_a_truncated_tfds_shard_fails_on_one_line(digits_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(digits_root / "prepared", data / "prepared")
    shutil.copytree(digits_root / "tfds", data / "tfds")
    (shard,) = (data / "tfds").glob("digits/*/digits-train.tfrecord-*")
    os.truncate(shard, shard.stat().st_size // 2)
    assert shard.name in _train_stage_error(data, tmp_path, capsys)


# Kills its own process with SIGKILL in the middle of epoch 3 (after two epochs were backed up): a real
# kill -9 at a point that does not depend on timing.
_KILLED_MID_EPOCH = """
import os, signal, sys
import keras
from resnet_lab.config import compose
from resnet_lab.train import train

class KillInEpoch3(keras.callbacks.TerminateOnNaN):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.epoch == 2 and batch == 1:
            os.kill(os.getpid(), signal.SIGKILL)

keras.callbacks.TerminateOnNaN = KillInEpoch3
train(compose(sys.argv[2:]), output_dir=sys.argv[1])
"""


def test_a_deterministic_run_killed_and_resumed_ends_like_an_uninterrupted_one(digits_root, tmp_path):
    overrides = [
        *TINY, *path_overrides(digits_root, tmp_path), "trainer.deterministic=true", "trainer.epochs=3",
        "trainer.steps_per_epoch=4", "trainer.grad_norm_every=1",
    ]  # fmt: skip
    straight = train(compose(overrides), output_dir=tmp_path / "straight")

    resumed_dir = tmp_path / "resumed"
    killed = run_cli([sys.executable, "-c", _KILLED_MID_EPOCH, resumed_dir, *overrides], tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads((resumed_dir / "backup" / "training_metadata.json").read_text())["epoch"] == 2
    resumed = train(compose(overrides), output_dir=resumed_dir)

    assert resumed["mlflow_run_id"] != straight["mlflow_run_id"]
    histories = [pd.read_csv(tmp_path / name / "history.csv") for name in ("straight", "resumed")]
    assert list(histories[1]["epoch"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(histories[0][HISTORY], histories[1][HISTORY])
