"""Training throughput: the training step of `train`, timed on this machine, beside Keras's own ResNet-50.

    python -m resnet_lab.bench                         # the study's models, image size and batch
    python -m resnet_lab.bench --models resnet34 keras.ResNet50 --image-size 32 --batch-size 64 --mlflow
    python -m resnet_lab.bench --pipeline-only --image-size 16 224     # make_dataset alone, no model

A case builds, compiles and fits its model as `train` does (`build_from_config`, `compile_model`, the
strategy and precision of `trainer`); warm-up steps absorb tracing and XLA compilation, and the median of
the timed steps gives the throughput. FLOPs: 6 per multiply-accumulate of the conv and dense layers (2 per
MAC; a training step costs about three forward passes), set against a dense matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from resnet_lab.config import compose
from resnet_lab.errors import ConfigError, cli

INPUTS = ("pipeline", "memory")
KERAS_REFERENCE = "keras.ResNet50"
KERAS_MIN_IMAGE_SIZE = 32  # keras.applications refuses smaller inputs
FLOPS_PER_MAC_TRAINING = 6
# The matmul ceiling grows a square product until one takes this long, then keeps the best of a few.
MATMUL_TARGET_S = 0.1
MATMUL_MAX_SIZE = 8192
MATMUL_REPEATS = 3


@dataclass(frozen=True)
class Case:
    """One measurement: `model` is a key of `ARCHS`, `KERAS_REFERENCE`, or None for the pipeline alone."""

    model: str | None
    image_size: int
    batch_size: int
    input: str


@dataclass(frozen=True)
class Settings:
    """What to measure: every combination of models, image sizes, batch sizes and inputs is a case.

    Attributes:
        models: keys of `ARCHS`, `KERAS_REFERENCE`; `(None,)` with the `pipeline` input: no model.
        warmup_steps: untimed steps first; the first one traces and compiles, so at least 1.
    """

    models: tuple[str | None, ...]
    image_sizes: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    inputs: tuple[str, ...] = INPUTS
    steps: int = 20
    warmup_steps: int = 5

    def cases(self) -> list[Case]:
        product = itertools.product(self.models, self.image_sizes, self.batch_sizes, self.inputs)
        cases = (
            Case(model, max(size, KERAS_MIN_IMAGE_SIZE) if model == KERAS_REFERENCE else size, batch, source)
            for model, size, batch, source in product
        )
        return list(dict.fromkeys(cases))


def check(settings: Settings, base: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Reject settings that cannot run, before any measurement, with one line naming the bad value.

    Returns:
        Each model of `settings` -> its configuration, composed with `overrides` as `base` was (`base` itself
        for None and `KERAS_REFERENCE`).

    Raises:
        ConfigError: a bad setting, Hydra override or configuration value.
        ValueError: an unknown model.
        DataError: the dataset is not prepared.
    """
    from resnet_lab.data import dataset_info
    from resnet_lab.models import get_arch, total_stride
    from resnet_lab.schema import validate

    for name, values in (("image-size", settings.image_sizes), ("batch-size", settings.batch_sizes),
                         ("steps", [settings.steps]), ("warmup-steps", [settings.warmup_steps])):  # fmt: skip
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
    for source in settings.inputs:
        if source not in INPUTS:
            raise ConfigError(f"unknown --input {source!r}; choose from {list(INPUTS)}")
    validate(base)
    cfgs = {None: base, KERAS_REFERENCE: base}
    for name in [model for model in settings.models if model not in cfgs]:
        get_arch(name)  # its error lists the models; Hydra's would name a missing config file
        cfgs[name] = cfg = compose([*overrides, f"model={name}"])
        validate(cfg)
        stride = total_stride(get_arch(cfg.model.name), cfg.model.stem)
        if min(settings.image_sizes) < stride:
            raise ConfigError(
                f"--image-size {min(settings.image_sizes)} is smaller than {name}'s total stride {stride} "
                f"with the {cfg.model.stem} stem; use at least {stride}"
            )
    dataset_info(base)
    return cfgs


def bench(settings: Settings, cfgs: dict[str | None, DictConfig], overrides: Sequence[str] = ()) -> dict:
    """Measure every case of `settings`, each with its model's configuration from `check`.

    Returns:
        The report `--output` writes: `machine`, `settings`, `matmul_ceiling`, one record per case.
    """
    import keras

    from resnet_lab.runtime import make_strategy, resolve_precision

    base = cfgs[None]
    strategy = make_strategy(base)  # first: logical CPU devices are set before TensorFlow initialises
    replicas = strategy.num_replicas_in_sync
    for batch in settings.batch_sizes:
        if batch % replicas:
            raise ConfigError(f"--batch-size {batch} is not divisible by the {replicas} replicas")
    machine = describe_machine(strategy)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(resolve_precision(base.trainer.precision))
    try:
        policy = keras.mixed_precision.global_policy()
        ceiling = matmul_ceiling(policy.compute_dtype)
        records = [_measure_case(case, cfgs[case.model], strategy, settings) for case in settings.cases()]
        # Measured again after the cases, the best kept: on a shared machine one moment can be a busy one.
        ceiling = max(ceiling, matmul_ceiling(policy.compute_dtype), key=lambda c: c["flops_per_sec"])
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    # Replicas on GPUs bring a ceiling each; logical CPU devices share the cores.
    total_ceiling = ceiling["flops_per_sec"] * (replicas if machine["gpus"] else 1)
    memory = {(r["model"], r["image_size"], r["batch_size"]): r for r in records if r["input"] == "memory"}
    for record in records:
        if record["flops_per_sec"] is not None:
            record["matmul_fraction"] = record["flops_per_sec"] / total_ceiling
        twin = memory.get((record["model"], record["image_size"], record["batch_size"]))
        if record["input"] == "pipeline" and twin is not None:
            record["pipeline_vs_memory"] = record["images_per_sec"] / twin["images_per_sec"]
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": asdict(settings),
        "overrides": list(overrides),
        "precision": policy.name,
        "flops_per_mac": FLOPS_PER_MAC_TRAINING,
        "matmul_ceiling": ceiling,
        "cases": records,
    }


def _measure_case(case: Case, cfg: DictConfig, strategy, settings: Settings) -> dict:
    """Time one case's steps: training steps of its model, or batches of the pipeline alone."""
    import keras
    import numpy as np
    import tensorflow as tf

    from resnet_lab.data import data_spec, make_dataset
    from resnet_lab.models import build_from_config, count_macs, count_params
    from resnet_lab.train import compile_model, make_optimizer

    cfg = OmegaConf.merge(
        cfg,
        {"data": {"image_size": case.image_size}, "trainer": {"batch_size": case.batch_size}},
    )
    total_steps = settings.warmup_steps + settings.steps
    dataset = make_dataset("train", cfg, training=True).repeat()
    model = None
    if case.model is None:
        ends = [time.perf_counter() for _ in dataset.take(total_steps)]
    else:
        if case.input == "memory":
            dataset = tf.data.Dataset.from_tensors(next(iter(dataset))).repeat()
        keras.backend.clear_session()
        keras.utils.set_random_seed(int(cfg.seed))
        spec = data_spec(cfg)
        shape, classes = spec.input_shape, spec.num_classes
        with strategy.scope():
            if case.model == KERAS_REFERENCE:
                model = keras.applications.ResNet50(weights=None, input_shape=shape, classes=classes)
                loss = keras.losses.SparseCategoricalCrossentropy()
                model.compile(optimizer=make_optimizer(cfg, total_steps), loss=loss, metrics=["accuracy"])
            else:
                model = build_from_config(cfg.model, classes, shape, cfg.optimizer.weight_decay)
                compile_model(model, cfg, total_steps, replicas=strategy.num_replicas_in_sync)
        ends = []
        # Not async-safe, so Keras turns each step's logs into Python numbers first: that waits for the step.
        clock = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter())
        )
        model.fit(dataset, epochs=1, steps_per_epoch=total_steps, callbacks=[clock], shuffle=False, verbose=0)
    # Differences of the ends: the first step, which starts the iterator and traces, is never timed.
    step_times = [float(t) for t in np.diff(ends)[settings.warmup_steps - 1 :]]
    step_time = statistics.median(step_times)
    images_per_sec = case.batch_size / step_time
    macs = count_macs(model) if model is not None else None
    return {
        "key": f"{case.model or 'none'}_{case.image_size}px_b{case.batch_size}_{case.input}",  # for MLflow
        **asdict(case),
        "jit_compile": bool(model.jit_compile) if model is not None else None,
        "params": count_params(model) if model is not None else None,
        "step_time_s": step_time,
        "step_times_s": step_times,
        "images_per_sec": images_per_sec,
        "macs_per_image": macs,
        "flops_per_sec": FLOPS_PER_MAC_TRAINING * macs * images_per_sec if macs is not None else None,
        "matmul_fraction": None,
        "pipeline_vs_memory": None,
    }


def matmul_ceiling(dtype: str = "float32") -> dict:
    """The machine's dense matmul rate: square products grown until one takes `MATMUL_TARGET_S`; the best.

    Returns:
        `flops_per_sec` (2 n^3 per product), `size` (n), `dtype`.
    """
    import tensorflow as tf

    def product_seconds(a, b) -> float:
        started = time.perf_counter()
        float(tf.matmul(a, b)[0, 0])  # reading an element waits for the product
        return time.perf_counter() - started

    size = 256
    while True:
        a = tf.random.normal((size, size), dtype=tf.float32)
        a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
        product_seconds(a, b)  # warm-up: kernels chosen, memory allocated
        seconds = min(product_seconds(a, b) for _ in range(MATMUL_REPEATS))
        if seconds >= MATMUL_TARGET_S or size >= MATMUL_MAX_SIZE:
            return {"dtype": dtype, "size": size, "flops_per_sec": 2 * size**3 / seconds}
        size *= 2


def describe_machine(strategy) -> dict:
    """The processor, the GPUs, the software versions and the strategy's replicas."""
    import keras
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    details = tf.config.experimental.get_device_details
    return {
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpus": [details(gpu).get("device_name", gpu.name) for gpu in tf.config.list_physical_devices("GPU")],
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def _cell(value, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else spec.format(value * scale)


# header, cell; the first five are text, the rest numbers
_COLUMNS = (
    ("model", lambda r: r["model"] or "(pipeline alone)"),
    ("px", lambda r: str(r["image_size"])),
    ("batch", lambda r: str(r["batch_size"])),
    ("input", lambda r: r["input"]),
    ("XLA", lambda r: "" if r["jit_compile"] is None else ("on" if r["jit_compile"] else "off")),
    ("img/s", lambda r: _cell(r["images_per_sec"], "{:,.1f}")),
    ("step ms", lambda r: _cell(r["step_time_s"], "{:,.1f}", 1e3)),
    ("MMAC/img", lambda r: _cell(r["macs_per_image"], "{:,.1f}", 1e-6)),
    ("GFLOP/s", lambda r: _cell(r["flops_per_sec"], "{:,.1f}", 1e-9)),
    ("of matmul", lambda r: _cell(r["matmul_fraction"], "{:.1f}%", 100)),
    ("pipeline / memory", lambda r: _cell(r["pipeline_vs_memory"], "{:.3f}")),
)


def render(report: dict) -> str:
    """The report as a Markdown table, and a line on the machine and the matmul ceiling."""
    from resnet_lab.report import markdown_table

    rows = [[cell(record) for _, cell in _COLUMNS] for record in report["cases"]]
    table = markdown_table([header for header, _ in _COLUMNS], rows, "l" * 5 + "r" * (len(_COLUMNS) - 5))
    machine, ceiling, settings = report["machine"], report["matmul_ceiling"], report["settings"]
    device = ", ".join(machine["gpus"]) or f"{machine['cpu']} ({machine['cpu_cores']} cores)"
    if machine["replicas"] > 1:
        device += f", {machine['replicas']} replicas ({machine['strategy']})"
    return "\n".join(
        [
            table,
            "",
            f"{device}; TensorFlow {machine['tensorflow']}, Keras {machine['keras']}, {report['precision']}; "
            f"median of {settings['steps']} steps after {settings['warmup_steps']} warm-up; "
            f"{report['flops_per_mac']} FLOPs per MAC; dense {ceiling['dtype']} matmul ceiling "
            f"{ceiling['flops_per_sec'] / 1e9:,.1f} GFLOP/s ({ceiling['size']}x{ceiling['size']})",
        ]
    )


_CASE_METRICS = ("images_per_sec", "step_time_s", "flops_per_sec", "matmul_fraction", "pipeline_vs_memory")


def log_to_mlflow(run, report: dict, table: str, report_path: str | os.PathLike) -> None:
    """Settings and machine as parameters, every case's numbers as metrics, the table and report as files."""
    params = {f"{part}.{key}": v for part in ("settings", "machine") for key, v in report[part].items()}
    params.update(overrides=report["overrides"], precision=report["precision"])
    run.log_params(
        {key: " ".join(map(str, v)) if isinstance(v, list | tuple) else v for key, v in params.items()}
    )
    metrics = {"matmul_ceiling_flops_per_sec": report["matmul_ceiling"]["flops_per_sec"]}
    for record in report["cases"]:
        metrics.update({f"{record['key']}/{name}": record[name] for name in _CASE_METRICS if record[name]})
    run.log_metrics(metrics)
    run.log_text(table + "\n", "bench.md")
    run.log_artifact(report_path)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


@cli
def main(argv: Sequence[str] | None = None) -> None:
    """Measure, print the table, write the JSON report, and log to MLflow with `--mlflow`."""
    from resnet_lab.files import write_text_atomically
    from resnet_lab.tracking import open_run
    from resnet_lab.train import check_output_dir

    argv = list(sys.argv[1:] if argv is None else argv)
    # KEY=VALUE anywhere is a Hydra override, so one cannot end up in the list of an option before it.
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    parser = _Parser(
        prog="python -m resnet_lab.bench",
        description="Training throughput of the model zoo, beside keras.applications.ResNet50.",
        epilog="KEY=VALUE arguments anywhere are Hydra overrides of conf/, e.g. paths.data_dir=/data/tfds",
    )
    add = parser.add_argument
    add("--models", nargs="+", metavar="MODEL",
        help=f"models of the zoo and/or {KERAS_REFERENCE} (default: study.models)")  # fmt: skip
    add("--image-size", nargs="+", type=int, metavar="PX", help="default: data.image_size")
    add("--batch-size", nargs="+", type=int, metavar="N",
        help="the global batch, split across replicas (default: trainer.batch_size)")  # fmt: skip
    add("--input", nargs="+", default=list(INPUTS), metavar="SOURCE",
        help="pipeline: make_dataset; memory: one of its batches, repeated")  # fmt: skip
    add("--steps", type=int, default=Settings.steps, help="timed steps per case (default: %(default)s)")
    add("--warmup-steps", type=int, default=Settings.warmup_steps,
        help="untimed steps first: tracing and XLA compilation (default: %(default)s)")  # fmt: skip
    add("--pipeline-only", action="store_true", help="time make_dataset alone, without a model")
    add("--output", default="bench.json", help="the JSON report (default: %(default)s)")
    add("--mlflow", action="store_true", help="log to an MLflow run tagged resnet_lab.kind=bench")
    args = parser.parse_args([arg for arg in argv if arg not in overrides])
    base = compose(overrides)
    settings = Settings(
        models=(None,) if args.pipeline_only else tuple(args.models or base.study.models),
        image_sizes=tuple(args.image_size or [base.data.image_size]),
        batch_sizes=tuple(args.batch_size or [base.trainer.batch_size]),
        inputs=("pipeline",) if args.pipeline_only else tuple(args.input),
        steps=args.steps,
        warmup_steps=args.warmup_steps,
    )
    cfgs = check(settings, base, overrides)
    output = Path(args.output)
    check_output_dir(output.parent, "--output directory")
    opened = open_run(base, "bench", "bench") if args.mlflow else contextlib.nullcontext()
    with opened as run:
        report = bench(settings, cfgs, overrides)
        table = render(report)
        print(table)
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(output, json.dumps(report, indent=2) + "\n")
        print(f"report: {output}")
        if run is not None:
            log_to_mlflow(run, report, table, output)
            print(f"mlflow run: {run.run_id}")


if __name__ == "__main__":
    main()
