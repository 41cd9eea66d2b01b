"""Keras callbacks that turn each epoch into the numbers the degradation study needs, and log them."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

HISTORY_COLUMNS = (
    "epoch", "loss", "accuracy", "error", "val_loss", "val_accuracy", "val_error",
    "learning_rate", "epoch_time", "images_per_sec",
)  # fmt: skip


class EpochMetrics(keras.callbacks.Callback):
    """Add error (1 - accuracy), the learning rate, epoch time and training images per second to the logs.

    Images per second count the training part of the epoch only, not validation.
    """

    def __init__(self, train_images_per_epoch: int):
        super().__init__()
        self.train_images_per_epoch = train_images_per_epoch
        self._epoch_start = 0.0
        self._train_end: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._train_end = None

    def on_test_begin(self, logs=None):
        if self._train_end is None:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        logs = logs if logs is not None else {}
        for prefix in ("", "val_"):
            if f"{prefix}accuracy" in logs:
                logs[f"{prefix}error"] = 1.0 - float(logs[f"{prefix}accuracy"])
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["epoch_time"] = now - self._epoch_start
        logs["images_per_sec"] = self.train_images_per_epoch / max(
            (self._train_end or now) - self._epoch_start, 1e-9
        )


class MlflowLogger(keras.callbacks.Callback):
    """Append each epoch to `history.csv` and log it to MLflow at step = epoch (1-based).

    Resumable: rows of epochs that a resumed run repeats are dropped from the CSV, and steps MLflow already
    holds are not logged twice, so the metric history has each epoch once.
    """

    def __init__(self, tracker, history_csv: Path):
        super().__init__()
        self.tracker = tracker
        self.history_csv = Path(history_csv)
        self._rows: list[dict] | None = None
        self._logged_steps: set[int] = set()

    def on_epoch_begin(self, epoch, logs=None):
        if self._rows is not None:
            return
        rows = pd.read_csv(self.history_csv).to_dict("records") if self.history_csv.is_file() else []
        self._rows = [row for row in rows if int(row["epoch"]) <= epoch]
        self._logged_steps = self.tracker.logged_steps("loss")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch + 1, **{k: float(logs[k]) for k in HISTORY_COLUMNS[1:] if k in logs}}
        self._rows.append(row)
        tmp = self.history_csv.with_name(f".{self.history_csv.name}.tmp")
        pd.DataFrame(self._rows, columns=list(HISTORY_COLUMNS)).to_csv(tmp, index=False)
        os.replace(tmp, self.history_csv)
        if epoch + 1 not in self._logged_steps:
            self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)


class GradientNorms(keras.callbacks.Callback):
    """Every `every` epochs, log the gradient norm of each stage on one fixed training batch.

    Vanishing gradients in the early stages of a deep plain net are what the degradation story is about
    (He et al. 2015, Sec. 4.1 argue they are not the cause with BN; this is where a reader checks).
    BatchNormalization statistics are restored afterwards, so the probe does not touch the model.
    """

    def __init__(self, probe_dataset, tracker, every: int):
        super().__init__()
        self.probe_dataset = probe_dataset
        self.tracker = tracker
        self.every = every
        self._probe = None

    def on_epoch_end(self, epoch, logs=None):
        if not self.every or (epoch + 1) % self.every:
            return
        norms = self.stage_norms()
        self.tracker.log_metrics(
            {f"grad_norm/{stage}": norm for stage, norm in norms.items()}, step=epoch + 1
        )

    def stage_norms(self) -> dict[str, float]:
        """The L2 norm of the loss gradient over each stage's variables (`conv1` ... `conv5`, `predictions`).

        Returns:
            Stage name to norm.
        """
        import tensorflow as tf

        if self._probe is None:
            self._probe = next(iter(self.probe_dataset))
        images, labels = self._probe
        model = self.model
        saved = [v.numpy() for v in model.non_trainable_variables]
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            loss = tf.reduce_mean(model.loss(labels, predictions))
        grads = tape.gradient(loss, model.trainable_variables)
        for variable, value in zip(model.non_trainable_variables, saved, strict=True):
            variable.assign(value)
        squares: dict[str, float] = {}
        for variable, grad in zip(model.trainable_variables, grads, strict=True):
            if grad is None:
                continue
            stage = variable.path.split("/")[0].split("_")[0]
            squares[stage] = squares.get(stage, 0.0) + float(tf.reduce_sum(tf.cast(grad, "float32") ** 2))
        return {stage: math.sqrt(total) for stage, total in sorted(squares.items()) if np.isfinite(total)}
