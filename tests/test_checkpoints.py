"""Checkpoints whole or absent: what a kill during a write leaves, and damage that costs one warning."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import TINY, path_overrides
from resnet_lab.checkpoints import METADATA_FILE, AtomicBackupAndRestore, restorable


def _fit(backup_dir, epochs: int, *, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy")
    images = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    labels = np.arange(32) % 3
    callback = AtomicBackupAndRestore(backup_dir)
    # Keep the backup after training, as a killed run would.
    callback.delete_checkpoint = False
    model.fit(images, labels, epochs=epochs, batch_size=8, verbose=0, callbacks=[callback])
    return model


def test_each_epoch_is_a_whole_file_named_by_the_metadata_written_after_it(tmp_path):
    backup = tmp_path / "backup"
    _fit(backup, epochs=3)

    assert sorted(os.listdir(backup)) == ["epoch-0002.weights.h5", "epoch-0003.weights.h5", METADATA_FILE]
    assert json.loads((backup / METADATA_FILE).read_text()) == {
        "epoch": 3,
        "weights": "epoch-0003.weights.h5",
    }
    assert restorable(backup) == (3, backup / "epoch-0003.weights.h5")
    # Resuming restores the epoch count and the weights, optimizer state included.
    resumed = _fit(backup, epochs=4)
    uninterrupted = _fit(tmp_path / "other", epochs=4)
    for a, b in zip(resumed.weights, uninterrupted.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_a_kill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    backup = tmp_path / "backup"
    _fit(backup, epochs=2)
    # What SIGKILL in the middle of epoch 3's save leaves: a partial file under its temporary name.
    partial = backup / ".partial-epoch-0003.weights.h5"
    partial.write_bytes((backup / "epoch-0002.weights.h5").read_bytes()[:100])

    assert restorable(backup) == (2, backup / "epoch-0002.weights.h5")
    _fit(backup, epochs=3)
    assert not partial.exists()
    assert restorable(backup)[0] == 3


def test_a_damaged_checkpoint_falls_back_with_one_warning_then_starts_afresh(tmp_path, caplog):
    backup = tmp_path / "backup"
    _fit(backup, epochs=3)
    newest = backup / "epoch-0003.weights.h5"
    newest.write_bytes(newest.read_bytes()[:200])  # a damaged disk, or no atomic rename

    with caplog.at_level(logging.WARNING, logger="resnet_lab.checkpoints"):
        assert restorable(backup) == (2, backup / "epoch-0002.weights.h5")
    [warning] = caplog.messages
    assert str(newest) in warning and "falling back to an older one" in warning
    assert not newest.exists()  # the next look does not warn again

    older = backup / "epoch-0002.weights.h5"
    older.write_bytes(b"not hdf5")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="resnet_lab.checkpoints"):
        assert restorable(backup) is None
    assert caplog.messages[-1].endswith("starting afresh")
    (backup / METADATA_FILE).write_text("{broken")
    assert restorable(backup) is None
    assert restorable(tmp_path / "absent") is None


@pytest.mark.slow
def test_a_run_killed_and_its_checkpoint_damaged_resumes_the_same_mlflow_run(digits_root, tmp_path):
    """A Hydra run killed with SIGKILL, its newest checkpoint damaged: one warning, same run, FINISHED."""
    run_dir = tmp_path / "run"
    args = [
        *TINY, *path_overrides(digits_root, tmp_path), f"hydra.run.dir={run_dir}",
        "trainer.steps_per_epoch=null", "trainer.validation_steps=null", "trainer.epochs=5",
        "trainer.grad_norm_every=0",
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "resnet_lab.train", *args]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    backup = run_dir / "backup"
    deadline = time.monotonic() + 180
    while restorable(backup) is None or restorable(backup)[0] < 2:
        assert process.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    epoch, newest = restorable(backup)
    newest.write_bytes(newest.read_bytes()[:300])
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Hydra's logging prints to stdout; a DVC stage's (no Hydra) to stderr.
    output = resumed.stdout + resumed.stderr
    warnings = [line for line in output.splitlines() if "cannot be read" in line]
    assert len(warnings) == 1 and str(newest) in warnings[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # The damaged epoch is trained again; every epoch is in MLflow and history.csv once.
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [1, 2, 3, 4, 5]
    assert len(client.search_runs([client.get_experiment_by_name("resnet-lab").experiment_id])) == 1
