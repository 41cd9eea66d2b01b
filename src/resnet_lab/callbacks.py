"""Keras callbacks that turn each epoch into the numbers the degradation study needs, and log them."""

from __future__ import annotations

import math
import time
from pathlib import Path

import keras
import pandas as pd

from resnet_lab.files import write_text_atomically

HISTORY_COLUMNS = (
    "epoch", "loss", "accuracy", "error", "val_loss", "val_accuracy", "val_error",
    "learning_rate", "epoch_time", "images_per_sec",
)  # fmt: skip


class EpochMetrics(keras.callbacks.Callback):
    """Add error (1 - accuracy), the learning rate, epoch time and images/s (training only) to the logs."""

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


class HistoryLogger(keras.callbacks.Callback):
    """Write each epoch to `history.csv` (atomically, the run's durable record), then call `on_epoch`.

    `on_epoch` is the run's MLflow sync (`resnet_lab.tracking.live_sync`). A resumed run drops the rows of
    the epochs it repeats; the gradient norms' columns stay empty in epochs that do not measure them.
    """

    def __init__(self, history_csv: Path, on_epoch=None):
        super().__init__()
        self.history_csv = Path(history_csv)
        self.on_epoch = on_epoch
        self._rows: list[dict] | None = None

    def on_epoch_begin(self, epoch, logs=None):
        if self._rows is None:
            rows = pd.read_csv(self.history_csv).to_dict("records") if self.history_csv.is_file() else []
            self._rows = [row for row in rows if int(row["epoch"]) <= epoch]

    def on_epoch_end(self, epoch, logs=None):
        logged = (logs or {}).items()
        values = {k: float(v) for k, v in logged if k in HISTORY_COLUMNS[1:] or k.startswith("grad_norm/")}
        self._rows.append({"epoch": epoch + 1, **values})
        columns = [*HISTORY_COLUMNS, *sorted({k for row in self._rows for k in row} - set(HISTORY_COLUMNS))]
        write_text_atomically(self.history_csv, pd.DataFrame(self._rows, columns=columns).to_csv(index=False))
        if self.on_epoch is not None:
            self.on_epoch()


class GradientNorms(keras.callbacks.Callback):
    """Every `every` epochs, add to the logs the gradient norm of each stage on one fixed training batch.

    Vanishing gradients in the early stages of a deep plain net are what the degradation story is about
    (He et al. 2015, Sec. 4.1 argue they are not the cause with BN; this is where a reader checks).
    BatchNormalization statistics are restored afterwards, so the probe does not touch the model.
    """

    def __init__(self, probe_dataset, every: int):
        super().__init__()
        self.probe_dataset = probe_dataset
        self.every = every
        self._probe = None

    def on_epoch_end(self, epoch, logs=None):
        if self.every and (epoch + 1) % self.every == 0 and logs is not None:
            logs.update({f"grad_norm/{stage}": norm for stage, norm in self.stage_norms().items()})

    def stage_norms(self) -> dict[str, float]:
        """Stage name -> the L2 norm of the loss gradient over its variables (`conv1` ... `predictions`)."""
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
        return {stage: math.sqrt(total) for stage, total in sorted(squares.items()) if math.isfinite(total)}
