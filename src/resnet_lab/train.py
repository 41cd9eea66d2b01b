"""Training: `train(cfg) -> metrics`, the Hydra app over `conf/`, and the DVC `train` stage over params.yaml.

    python -m resnet_lab.train model=plain34 data=cifar10 trainer.epochs=30
    python -m resnet_lab.train --multirun model=resnet34,plain34,resnet50 seed=0,1,2
    python -m resnet_lab.train --params params.yaml model.name=resnet34 seed=0   # DVC's train stage

Every run is an MLflow run: the resolved configuration as parameters, per-epoch metrics, artifacts and the
model. A killed run started again with the same output directory resumes after its last finished epoch
and continues the same MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from resnet_lab import tracking
from resnet_lab.config import checkpoint_dir, compose, conf_dir, member_name, run_dir, stage_config
from resnet_lab.errors import ConfigError, cli
from resnet_lab.files import staged_files, write_text_atomically
from resnet_lab.runtime import is_chief, make_strategy, resolve_jit_compile, resolve_precision, worker_task
from resnet_lab.schema import config_error, validate


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def check_output_dir(path: Path, what: str) -> None:
    """Fail with one line when `path` cannot become a directory: it or one of its parents is a file."""
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {str(blocking)!r} is a file")


def effective_learning_rate(cfg: DictConfig) -> float:
    """The peak learning rate for the global batch: `optimizer.learning_rate`, scaled linearly from
    `optimizer.reference_batch_size` to `trainer.batch_size` when that is set (Goyal et al. 2017)."""
    rate = float(cfg.optimizer.learning_rate)
    reference = cfg.optimizer.reference_batch_size
    return rate * int(cfg.trainer.batch_size) / int(reference) if reference else rate


def make_optimizer(cfg: DictConfig, steps_per_epoch: int):
    """The configured Keras optimizer over the configured Keras learning-rate schedule."""
    import keras

    from resnet_lab.schedules import make_schedule

    schedule = make_schedule(cfg.schedule, effective_learning_rate(cfg), steps_per_epoch, cfg.trainer.epochs)
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
        output_dir: where the model, history and checkpoints go (a Hydra job's directory). None (the DVC
            stage) works in `checkpoint_dir(cfg)`, which is no DVC output, so that a killed stage resumes from
            it (if its configuration is unchanged), and puts its results in `run_dir(cfg)` at the end.

    Returns:
        Final metrics: loss, accuracy, error and their `val_` twins, plus `mlflow_run_id`.

    Raises:
        ConfigError: bad configuration, found before training.
        TrainingDiverged: the loss became NaN; the MLflow run ends FAILED.
    """
    import keras

    from resnet_lab.models import build_from_config, get_arch

    validate(cfg)
    work_dir, results_dir = _run_dirs(cfg, output_dir)
    arch = get_arch(cfg.model.name)
    keras.utils.set_random_seed(int(cfg.seed))
    tags = {
        "resnet_lab.family": arch.family,
        "resnet_lab.depth": str(arch.depth),
        "resnet_lab.dataset": cfg.data.name,
        "resnet_lab.model": cfg.model.name,
    }
    opened = (
        tracking.open_run(
            cfg, "train", member_name(cfg), tags=tags, record_dir=work_dir, params=True, system_metrics=True
        )
        if is_chief()
        else contextlib.nullcontext()  # the chief records a multi-worker run
    )
    with _runtime(cfg) as (strategy, precision):
        # Data and model first: bad input fails on one line before a run is opened.
        data = _datasets(cfg, work_dir)
        spec, steps, replicas = data["spec"], data["train_steps"], strategy.num_replicas_in_sync
        with strategy.scope():
            model = build_from_config(
                cfg.model, spec.num_classes, spec.input_shape, cfg.optimizer.weight_decay
            )
            compile_model(model, cfg, steps, replicas=replicas)
        resolved = _resolved_params(cfg, model, precision, replicas)
        with opened as run:
            if run is not None:
                if not run.resumed:
                    run.log_params(resolved)
                    tracking.log_dataset_inputs(run, cfg, ("train", "validation"))
                write_text_atomically(work_dir / "config.yaml", tracking.masked_yaml(cfg))
                write_text_atomically(work_dir / "model_summary.txt", _summary_text(model))
            on_epoch = tracking.live_sync(work_dir, run.client) if run is not None else None
            started = time.perf_counter()
            history = model.fit(
                data["train"],
                validation_data=data["validation"],
                epochs=int(cfg.trainer.epochs),
                steps_per_epoch=steps,
                validation_steps=cfg.trainer.validation_steps,
                callbacks=_callbacks(cfg, data, work_dir, on_epoch),
                shuffle=False,  # make_dataset shuffles with the run's seed
                verbose=1 if sys.stdout.isatty() else 2,
            )
            train_time = time.perf_counter() - started
            _check_finite(cfg, history)
            summary = _save_results(cfg, arch, model, resolved, work_dir, train_time, run, steps)
    if results_dir is not None and is_chief():
        _publish_results(work_dir, results_dir)
    return {**summary["final"], "mlflow_run_id": summary["mlflow_run_id"]}


def _resolved_params(cfg: DictConfig, model, precision: str, replicas: int) -> dict:
    """What the model measures, and what the `auto` settings resolved to on this machine."""
    from resnet_lab.models import count_macs, count_params

    return {
        "model.trainable_params": count_params(model),
        "model.macs_per_image": count_macs(model),
        "replicas": replicas,
        "precision_policy": precision,
        "optimizer.effective_learning_rate": effective_learning_rate(cfg),
        "jit_compile": bool(model.jit_compile),
    }


def _summary_text(model) -> str:
    lines: list[str] = []
    model.summary(line_length=110, print_fn=lambda line, **_: lines.append(line))
    return "\n".join(lines)


def _check_finite(cfg: DictConfig, history) -> None:
    losses = history.history.get("loss")
    if not losses or not all(math.isfinite(v[-1]) for v in history.history.values() if v):
        raise TrainingDiverged(
            f"loss became NaN or infinite at epoch {len(losses or [])}; "
            f"lower optimizer.learning_rate (now {cfg.optimizer.learning_rate}, "
            f"{effective_learning_rate(cfg):g} for the batch)"
        )


def _publish_results(work_dir: Path, results_dir: Path) -> None:
    """Move a finished stage's results into its DVC output directory, each file whole, then tidy up.

    The directory keeps what `python -m resnet_lab.tracking sync` needs, should MLflow lack any of it.
    """
    with staged_files(results_dir) as staging:
        for item in work_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
    shutil.rmtree(work_dir, ignore_errors=True)


def _run_dirs(cfg: DictConfig, output_dir) -> tuple[Path, Path | None]:
    """The directory the run works in, and for a DVC stage the output directory it publishes to."""
    results_dir = None
    if output_dir is None:
        results_dir = run_dir(cfg)
        check_output_dir(results_dir, "output directory")
        output_dir = checkpoint_dir(cfg)
    work_dir = Path(output_dir)
    check_output_dir(work_dir, "output directory")
    if not is_chief():
        # The chief records the run; the other workers keep their checkpoints apart, to resume with it.
        task_type, index = worker_task()
        work_dir = work_dir / f"{task_type}-{index}"
    elif results_dir is not None:
        # DVC reruns a stage when a parameter changed: that run must start afresh, not resume another's
        # epochs. The configuration is recorded in the file that `train` writes as the run's own.
        config_yaml, recorded = tracking.masked_yaml(cfg), work_dir / "config.yaml"
        stale = work_dir.is_dir() and not (recorded.is_file() and recorded.read_text() == config_yaml)
        if stale and ((work_dir / "backup").exists() or (work_dir / tracking.RUN_ID_FILE).exists()):
            print(f"{work_dir} holds a checkpoint of another configuration: starting afresh", file=sys.stderr)
        if stale:
            shutil.rmtree(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(recorded, config_yaml)
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir, results_dir


@contextlib.contextmanager
def _runtime(cfg: DictConfig):
    """The strategy and the precision policy for the run; the previous global policy is put back after."""
    import keras
    import tensorflow as tf

    if cfg.trainer.deterministic:
        tf.config.experimental.enable_op_determinism()
    previous_policy = keras.mixed_precision.global_policy()
    try:
        strategy = make_strategy(cfg)
        precision = resolve_precision(cfg.trainer.precision)
        keras.mixed_precision.set_global_policy(precision)
        if cfg.trainer.batch_size % strategy.num_replicas_in_sync:
            raise ConfigError(
                f"trainer.batch_size {cfg.trainer.batch_size} is not divisible by the "
                f"{strategy.num_replicas_in_sync} replicas"
            )
        yield strategy, precision
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _datasets(cfg: DictConfig, work_dir: Path) -> dict:
    """The training stream (resumed where the checkpoint stops), validation, a probe for gradient norms."""
    import tensorflow as tf

    from resnet_lab import data as data_lib
    from resnet_lab.checkpoints import restorable

    spec, batch_size = data_lib.data_spec(cfg), cfg.trainer.batch_size
    for split in ("train", "validation"):
        if spec.num_batches(split, batch_size, training=split == "train") < 1:
            raise ConfigError(
                f"trainer.batch_size {batch_size} is larger than the {spec.num_examples[split]} "
                f"{split} examples of {cfg.data.name}"
            )
    train_steps = int(cfg.trainer.steps_per_epoch or spec.num_batches("train", batch_size, training=True))
    found = restorable(work_dir / "backup") if cfg.trainer.checkpoint else None
    # One stream over every epoch, so that a resumed run skips the batches the killed run consumed
    # and sees, with trainer.deterministic, those an uninterrupted run would have seen.
    consumed = found[0] * train_steps if found else 0
    train_ds = data_lib.make_dataset("train", cfg, training=True).repeat().skip(consumed)
    val_ds = data_lib.make_dataset("validation", cfg, training=False)
    if cfg.trainer.validation_steps:
        # Keras keeps one iterator across epochs when it is given a step count: it must not run dry.
        val_ds = val_ds.repeat()
    # Its own dataset: a second iterator over train_ds would shift the training iterator's shuffles.
    probe_ds = data_lib.make_dataset("train", cfg, training=False)
    if float(cfg.trainer.label_smoothing):
        train_ds, val_ds, probe_ds = (
            ds.map(lambda x, y: (x, tf.one_hot(y, spec.num_classes))) for ds in (train_ds, val_ds, probe_ds)
        )
    return {
        "spec": spec, "train": train_ds, "train_steps": train_steps, "validation": val_ds, "probe": probe_ds,
    }  # fmt: skip


def _callbacks(cfg: DictConfig, data: dict, work_dir: Path, on_epoch) -> list:
    import keras

    from resnet_lab.callbacks import EpochMetrics, GradientNorms, HistoryLogger
    from resnet_lab.checkpoints import AtomicBackupAndRestore

    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        EpochMetrics(data["train_steps"] * cfg.trainer.batch_size),
        GradientNorms(data["probe"], every=int(cfg.trainer.grad_norm_every)),
        HistoryLogger(work_dir / "history.csv", on_epoch=on_epoch),
    ]
    if cfg.trainer.checkpoint:
        # Last, so an epoch is recorded before it counts as done: a kill in between re-runs the epoch,
        # and the history drops the repeated row.
        callbacks.append(AtomicBackupAndRestore(work_dir / "backup"))
    return callbacks


def _save_results(
    cfg: DictConfig, arch, model, resolved: dict, work_dir: Path, train_time: float, run, steps: int
) -> dict:
    """The model, the learning curve and `summary.json` in the run directory (MLflow gets them by sync)."""
    import pandas as pd

    from resnet_lab.report import curves_frame, plot_learning_curves

    model.save(work_dir / "model.keras")
    history = pd.read_csv(work_dir / "history.csv")
    curves = curves_frame({(cfg.model.name, int(cfg.seed)): history})
    plot_learning_curves(curves, work_dir / "learning_curve.png", title=cfg.model.name)
    last = history.iloc[-1]
    summary = {
        "model": cfg.model.name,
        "seed": int(cfg.seed),
        "family": arch.family,
        "depth": arch.depth,
        "params": resolved["model.trainable_params"],
        "macs": resolved["model.macs_per_image"],
        "epochs": int(last["epoch"]),
        "train_time_s": round(train_time, 3),
        "images_per_sec": float(history["images_per_sec"].mean()),
        "final": {
            k: float(last[k]) for k in ("loss", "accuracy", "error", "val_loss", "val_accuracy", "val_error")
        },
        "best": {"error": float(history["error"].min()), "val_error": float(history["val_error"].min())},
        "mlflow_run_id": run.run_id if run is not None else None,
        "dataset": cfg.data.name,
        "steps": int(steps) * int(cfg.trainer.epochs),
    }
    write_text_atomically(work_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _hydra_main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from resnet_lab.prepare import ensure_prepared

    validate(cfg)  # before a dataset is built for a configuration that cannot train
    ensure_prepared(cfg)
    metrics = train(cfg, output_dir=HydraConfig.get().runtime.output_dir)
    # What a sweeper minimises.
    return metrics["val_error"]


@cli
def stage_main(argv: list[str]) -> None:
    """DVC's train stage: `train(cfg)` on params.yaml, writing to models/<model>-<seed>."""
    cfg = stage_config(argv, description=stage_main.__doc__)
    metrics = train(cfg)
    print(json.dumps(metrics, indent=2))


def sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def check_command_line(argv: list[str]) -> None:
    """Compose conf/ with a Hydra command line before Hydra runs, so that a typo costs one line.

    Hydra reports an unknown key or group option on several lines with exit status 1, and an unusable
    output directory with a traceback. A sweep over a config group (model=resnet34,plain34) has each
    option checked; other sweeps their first value, the others being checked in their jobs.

    Raises:
        ConfigError: an override Hydra cannot apply, or a run or sweep directory under a file.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args = get_args_parser().parse_args(argv)
    if args.config_path or args.config_name or args.config_dir:
        return  # another primary config: left to Hydra
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as exc:
        raise config_error(exc) from None
    first = [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        if o.is_sweep_override()
        else o.input_line
        for o in overrides
    ]
    cfg = compose(first, return_hydra_config=True)
    for index, override in enumerate(overrides):
        group = override.key_or_group
        if override.is_sweep_override() and ("/" in group or (conf_dir() / group).is_dir()):
            for value in override.sweep_string_iterator():
                compose([*first[:index], f"{override.get_key_element()}={value}", *first[index + 1 :]])
    key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    check_output_dir(Path(OmegaConf.select(cfg, key)), key)


def main() -> None:
    """`--params FILE ...` runs the DVC stage; anything else is Hydra's command line."""
    # A scheduler's or DVC's SIGTERM ends the MLflow run as KILLED, like Ctrl-C.
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    if len(sys.argv) > 1 and (sys.argv[1] == "--params" or sys.argv[1].startswith("--params=")):
        stage_main(sys.argv[1:])
        return
    import hydra

    cli(check_command_line)(sys.argv[1:])
    app = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(cli(_hydra_main))
    app()


if __name__ == "__main__":
    main()
