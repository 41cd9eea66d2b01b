"""Training: `train(cfg) -> metrics`, the Hydra app over `conf/`, and the DVC `train` stage over params.yaml.

    python -m resnet_lab.train model=plain34 data=cifar10 trainer.epochs=30
    python -m resnet_lab.train --multirun model=resnet34,plain34,resnet50 seed=0,1,2
    python -m resnet_lab.train --params params.yaml model.name=resnet34 seed=0   # DVC's train stage

Every run is an MLflow run: the resolved configuration as parameters, per-epoch metrics, artifacts and the
model. A killed run started again with the same output directory resumes after its last finished epoch
and continues the same MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from resnet_lab.config import run_dir, stage_config
from resnet_lab.errors import ConfigError, cli

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
DISTRIBUTIONS = ("auto", "one_device", "mirrored", "multi_worker")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "cosine", "constant")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def validate(cfg: DictConfig) -> None:
    """Reject a configuration that cannot train, before any work, with one line naming the bad value."""
    from resnet_lab.models import get_arch

    get_arch(cfg.model.name)
    trainer = cfg.trainer
    for key in ("epochs", "batch_size"):
        value = trainer[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"trainer.{key} must be a positive integer, got {value!r}")
    for key in ("steps_per_epoch", "validation_steps"):
        value = trainer.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"trainer.{key} must be a positive integer or null, got {value!r}")
    _choice("trainer.precision", trainer.precision, PRECISIONS)
    _choice("trainer.jit_compile", trainer.jit_compile, (True, False, "auto"))
    _choice("trainer.distribution", trainer.distribution, DISTRIBUTIONS)
    _choice("optimizer.name", cfg.optimizer.name, OPTIMIZERS)
    _choice("schedule.name", cfg.schedule.name, SCHEDULES)
    if not cfg.optimizer.learning_rate > 0:
        raise ConfigError(f"optimizer.learning_rate must be positive, got {cfg.optimizer.learning_rate!r}")
    if cfg.optimizer.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay must be >= 0, got {cfg.optimizer.weight_decay!r}")
    if not 0 <= trainer.label_smoothing < 1:
        raise ConfigError(f"trainer.label_smoothing must be in [0, 1), got {trainer.label_smoothing!r}")
    if cfg.schedule.warmup_epochs < 0 or cfg.schedule.warmup_epochs >= trainer.epochs:
        raise ConfigError(
            f"schedule.warmup_epochs must be in [0, trainer.epochs={trainer.epochs}), "
            f"got {cfg.schedule.warmup_epochs!r}"
        )


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}; choose one of {list(choices)}")


def make_strategy(cfg: DictConfig):
    """The tf.distribute strategy for `trainer.distribution` and the hardware.

    auto: MultiWorkerMirroredStrategy when TF_CONFIG is set, MirroredStrategy over several GPUs (or
    several logical CPUs, `trainer.logical_cpus`), else the default one-device strategy.
    """
    import tensorflow as tf

    logical_cpus = cfg.trainer.get("logical_cpus")
    if logical_cpus and logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        if tf.config.get_logical_device_configuration(cpu) is None:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(logical_cpus)]
            )
    choice = cfg.trainer.distribution
    if choice == "auto":
        if os.environ.get("TF_CONFIG"):
            choice = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1 or (logical_cpus or 1) > 1:
            choice = "mirrored"
        else:
            choice = "one_device"
    if choice == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if choice == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.get_strategy()


def resolve_jit_compile(setting, replicas: int) -> bool:
    """`trainer.jit_compile`: true, false, or auto = XLA on a single GPU only.

    Measured with `python -m resnet_lab.bench` on a 2-core CPU, XLA trains 2.5-9x slower than TensorFlow's
    own (oneDNN) kernels, and under MirroredStrategy over CPU devices it fails to place resources
    (keras-team/keras#19005); on a GPU it is the fast path.
    """
    import tensorflow as tf

    if setting == "auto":
        return replicas == 1 and bool(tf.config.list_logical_devices("GPU"))
    return bool(setting)


def make_optimizer(cfg: DictConfig, steps_per_epoch: int):
    """The configured Keras optimizer over the configured Keras learning-rate schedule."""
    import keras

    from resnet_lab.schedules import make_schedule

    schedule = make_schedule(cfg.schedule, cfg.optimizer.learning_rate, steps_per_epoch, cfg.trainer.epochs)
    if cfg.optimizer.name == "sgd":
        return keras.optimizers.SGD(
            learning_rate=schedule, momentum=cfg.optimizer.momentum, nesterov=bool(cfg.optimizer.nesterov)
        )
    return keras.optimizers.Adam(
        learning_rate=schedule, beta_1=cfg.optimizer.beta_1, beta_2=cfg.optimizer.beta_2
    )


def compile_model(model, cfg: DictConfig, steps_per_epoch: int, *, replicas: int = 1) -> None:
    """Compile as training does: the configured optimizer and schedule, cross-entropy, accuracy, XLA setting.

    Label smoothing needs one-hot labels, so with `trainer.label_smoothing` > 0 the loss and the accuracy
    are the categorical ones; `train` maps the labels to match.
    """
    import keras

    smoothing = float(cfg.trainer.label_smoothing)
    model.compile(
        optimizer=make_optimizer(cfg, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
        if smoothing
        else keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.CategoricalAccuracy("accuracy") if smoothing else "accuracy"],
        jit_compile=resolve_jit_compile(cfg.trainer.jit_compile, replicas),
    )


def train(cfg: DictConfig, output_dir: str | os.PathLike | None = None) -> dict:
    """Train `cfg.model.name` on `cfg.data.name`, tracked in MLflow.

    Args:
        cfg: the composed configuration (conf/ or params.yaml).
        output_dir: where the model, history and checkpoints go; `run_dir(cfg)` when None. A directory
            that holds an unfinished run's checkpoint resumes it.

    Returns:
        Final metrics: loss, accuracy, error and their `val_` twins, plus `mlflow_run_id`.

    Raises:
        ConfigError: bad configuration, found before training.
        TrainingDiverged: the loss became NaN; the MLflow run ends FAILED.
    """
    validate(cfg)
    import keras
    import tensorflow as tf

    from resnet_lab import data as data_lib
    from resnet_lab import tracking
    from resnet_lab.callbacks import EpochMetrics, GradientNorms, MlflowLogger
    from resnet_lab.models import build_from_config, count_macs, count_params, get_arch

    output_dir = Path(output_dir) if output_dir is not None else run_dir(cfg)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output directory {str(output_dir)!r} is a file")
    spec = data_lib.data_spec(cfg)
    tracker = tracking.RunTracker.for_training(cfg, output_dir)

    keras.utils.set_random_seed(int(cfg.seed))
    if cfg.trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(cfg.trainer.precision)
    try:
        strategy = make_strategy(cfg)
        replicas = strategy.num_replicas_in_sync
        if cfg.trainer.batch_size % replicas:
            raise ConfigError(
                f"trainer.batch_size {cfg.trainer.batch_size} is not divisible by the {replicas} replicas"
            )
        train_ds, train_steps = _split(
            data_lib, spec, "train", cfg, cfg.trainer.steps_per_epoch, training=True
        )
        val_ds, val_steps = _split(
            data_lib, spec, "validation", cfg, cfg.trainer.validation_steps, training=False
        )
        arch = get_arch(cfg.model.name)
        with strategy.scope():
            model = build_from_config(
                cfg.model, spec.num_classes, spec.input_shape, cfg.optimizer.weight_decay
            )
            compile_model(
                model,
                cfg,
                train_steps or spec.num_batches("train", cfg.trainer.batch_size, training=True),
                replicas=replicas,
            )
        smoothing = float(cfg.trainer.label_smoothing)
        if smoothing:
            train_ds, val_ds = (
                ds.map(lambda x, y: (x, tf.one_hot(y, spec.num_classes))) for ds in (train_ds, val_ds)
            )
        params, macs = count_params(model), count_macs(model)

        with tracker:
            tracker.start(
                tags={
                    "resnet_lab.family": arch.family,
                    "resnet_lab.depth": str(arch.depth),
                    "resnet_lab.dataset": cfg.data.name,
                    "resnet_lab.model": cfg.model.name,
                },
                extra_params={
                    "model.trainable_params": params,
                    "model.macs_per_image": macs,
                    "replicas": replicas,
                },
            )
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            tracker.log_text(_summary_text(model), "model_summary.txt")
            output_dir.mkdir(parents=True, exist_ok=True)
            batches_per_epoch = train_steps or spec.num_batches(
                "train", cfg.trainer.batch_size, training=True
            )
            epoch_metrics = EpochMetrics(batches_per_epoch * cfg.trainer.batch_size)
            callbacks = [
                keras.callbacks.TerminateOnNaN(),
                epoch_metrics,
                GradientNorms(train_ds, tracker, every=int(cfg.trainer.grad_norm_every)),
                MlflowLogger(tracker, output_dir / "history.csv"),
            ]
            if cfg.trainer.checkpoint:
                # Last, so an epoch is logged before it counts as done: a kill in between re-runs the
                # epoch, and the logger skips the steps MLflow already has.
                callbacks.append(keras.callbacks.BackupAndRestore(str(output_dir / "backup")))
            started = time.perf_counter()
            history = model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=int(cfg.trainer.epochs),
                steps_per_epoch=train_steps,
                validation_steps=val_steps,
                callbacks=callbacks,
                shuffle=False,  # make_dataset shuffles with the run's seed
                verbose=1 if sys.stdout.isatty() else 2,
            )
            train_time = time.perf_counter() - started
            last = {k: float(v[-1]) for k, v in history.history.items() if v}
            if not history.history.get("loss") or not all(math.isfinite(v) for v in last.values()):
                raise TrainingDiverged(
                    f"loss became NaN or infinite at epoch {len(history.history.get('loss', []))}; "
                    f"lower optimizer.learning_rate (now {cfg.optimizer.learning_rate})"
                )
            model.save(output_dir / "model.keras")
            if cfg.tracking.log_model:
                tracker.log_model(model, next(iter(val_ds.take(1)))[0].numpy()[:1])
            tracker.log_artifact(output_dir / "history.csv")
            curve = _plot_learning_curve(
                output_dir / "history.csv", output_dir / "learning_curve.png", cfg.model.name
            )
            tracker.log_artifact(curve)
            summary = _summary(cfg, arch, params, macs, output_dir, train_time, tracker.run_id)
            tracker.log_metrics({"train_time_s": train_time})
            _write_json(output_dir / "summary.json", summary)
            tracker.log_artifact(output_dir / "summary.json")
        return {**summary["final"], "mlflow_run_id": tracker.run_id}
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _split(data_lib, spec, split, cfg, steps, *, training):
    batches = spec.num_batches(split, cfg.trainer.batch_size, training=training)
    if batches < 1:
        raise ConfigError(
            f"trainer.batch_size {cfg.trainer.batch_size} is larger than the {spec.num_examples[split]} "
            f"{split} examples of {cfg.data.name}"
        )
    dataset = data_lib.make_dataset(split, cfg, training=training)
    if steps:
        # Keras keeps one iterator across epochs when it is given a step count: it must not run dry.
        return dataset.repeat(), int(steps)
    return dataset, None


def _summary_text(model) -> str:
    lines: list[str] = []
    model.summary(line_length=110, print_fn=lambda line, **_: lines.append(line))
    return "\n".join(lines)


def _summary(cfg, arch, params, macs, output_dir: Path, train_time: float, run_id: str) -> dict:
    import pandas as pd

    history = pd.read_csv(output_dir / "history.csv")
    last = history.iloc[-1]
    return {
        "model": cfg.model.name,
        "seed": int(cfg.seed),
        "family": arch.family,
        "depth": arch.depth,
        "params": params,
        "macs": macs,
        "epochs": int(last["epoch"]),
        "train_time_s": round(train_time, 3),
        "images_per_sec": float(history["images_per_sec"].mean()),
        "final": {
            k: float(last[k]) for k in ("loss", "accuracy", "error", "val_loss", "val_accuracy", "val_error")
        },
        "best": {"error": float(history["error"].min()), "val_error": float(history["val_error"].min())},
        "mlflow_run_id": run_id,
        "dataset": cfg.data.name,
    }


def _plot_learning_curve(history_csv: Path, png: Path, title: str) -> Path:
    """Training error thin, validation error bold, as in Fig. 4 of the paper."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    history = pd.read_csv(history_csv)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(history["epoch"], 100 * history["error"], lw=1, color="C0", label="train error")
    ax.plot(history["epoch"], 100 * history["val_error"], lw=2.5, color="C0", label="validation error")
    ax.set(xlabel="epoch", ylabel="error (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _hydra_main(cfg: DictConfig) -> float:
    metrics = train(cfg, output_dir=_hydra_output_dir())
    # What a sweeper minimises.
    return metrics["val_error"]


@cli
def stage_main(argv: list[str]) -> None:
    """DVC's train stage: `train(cfg)` on params.yaml, writing to models/<model>-<seed>."""
    cfg = stage_config(argv, description=stage_main.__doc__)
    metrics = train(cfg)
    print(json.dumps({k: v for k, v in metrics.items()}, indent=2))


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    """`--params FILE ...` runs the DVC stage; anything else is Hydra's command line."""
    # A scheduler's or DVC's SIGTERM ends the MLflow run as KILLED, like Ctrl-C.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    if len(sys.argv) > 1 and (sys.argv[1] == "--params" or sys.argv[1].startswith("--params=")):
        stage_main(sys.argv[1:])
        return
    import hydra

    from resnet_lab.config import conf_dir

    app = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(cli(_hydra_main))
    app()


if __name__ == "__main__":
    main()
