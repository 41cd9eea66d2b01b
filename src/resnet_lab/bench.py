"""Training throughput: our training path timed step by step, side by side with Keras's own ResNet-50.

    python -m resnet_lab.bench --models resnet34 plain34 resnet50 --image-size 32 --batch-size 64 \\
        --jit-compile on off --input pipeline memory --keras-reference --mlflow
    python -m resnet_lab.bench --pipeline-only --image-size 32 224 --batch-size 128   # no model

Each case trains with Keras `fit` and the compile settings of `train(cfg)`; a callback reads every step's
loss, which waits for the step to finish (on a GPU the call only queues the kernels), and stamps the
time. The warm-up steps absorb tracing and XLA compilation; the median of the timed steps gives the
throughput. With `--repeats N` every case is measured N times, in rounds whose order rotates, and the
median runs over the timed steps of all rounds: a slow spell of a shared machine, or the position of a
case in the process, then weighs on every case alike.

The inputs of one model (`--input pipeline memory`) are timed on one model, in alternating chunks of
`--chunk-steps` steps in the order A B B A A B ..., each chunk after an untimed step that starts its
iterator: the pipeline / memory ratio then sets like against like, and a drift of the machine's speed
weighs on both inputs alike. Its 95% interval comes from a bootstrap over the chunk pairs.

The reference is `keras.applications.ResNet50(weights=None)` compiled with Keras's defaults
(`jit_compile="auto"`, which Keras resolves to off on a CPU-only machine and under tf.distribute), on the
same input, batch, optimizer and loss, measured twice: in this process (`keras.ResNet50`), where it shares
the TensorFlow runtime the package set up, and alone (`keras.ResNet50-alone`), in a Python process of its
own that loads TensorFlow before anything of resnet_lab, so TensorFlow's own defaults apply as in a user's
script of its own (the package turns on TensorFlow's oneDNN CPU kernels, which TensorFlow leaves off on
CPUs without AVX-512 neural-network features).

FLOPs per image follow the usual convention: 2 per multiply-accumulate, times 3 for a training step
(forward, gradients of the activations, gradients of the weights). Achieved FLOP/s are set against a
dense matmul measured on the same machine in the case's compute dtype, before and after the cases.

A batch that does not fit (TensorFlow's ResourceExhaustedError, as on a GPU) is searched down to the largest
that does, and the run ends with an `error:` line naming it. On a CPU the operating system usually kills a
process that runs out of memory before TensorFlow can raise anything.

KEY=VALUE arguments are Hydra overrides of conf/ (paths, data, optimizer, tracking), e.g.
`paths.data_dir=/tmp/tfds`; the `pipeline` input needs the dataset prepared there.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from resnet_lab.errors import ConfigError, cli

SCHEMA_VERSION = 2
# 2 FLOPs per multiply-accumulate; a training step costs about three forward passes.
FLOPS_PER_MAC_TRAINING = 6
FLOP_CONVENTION = (
    "6 FLOPs per multiply-accumulate per image: 2 per MAC, times 3 for forward, activation gradients and "
    "weight gradients; MACs count conv and dense layers only"
)
INPUTS = ("pipeline", "memory")
JIT_SETTINGS = {"on": True, "off": False}
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
COMPUTE_DTYPES = {"float32": "float32", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
KERAS_REFERENCE = "keras.applications.ResNet50"
KERAS_REFERENCE_MODEL = "resnet50"  # the architecture of ours it is set against
# How the reference runs: in this process, or alone in a process with TensorFlow's defaults; its label.
REFERENCE_LABELS = {"shared": "keras.ResNet50", "alone": "keras.ResNet50-alone"}
KERAS_MIN_IMAGE_SIZE = 32  # keras.applications refuses smaller inputs
KERAS_SPEEDUP_GOAL = 2.0
PIPELINE_RATIO_GOAL = 0.97
# Shapes for the `memory` input when no `pipeline` case fixes them: CIFAR-10's.
MEMORY_CHANNELS = 3
MEMORY_CLASSES = 10
# The matmul ceiling grows the matrix until one product takes this long, then keeps the best of a few.
MATMUL_TARGET_S = 0.1
MATMUL_MAX_SIZE = 8192
MATMUL_REPEATS = 3
RSS_SAMPLE_S = 0.005
# Probes after halving finds a batch that fits: bisect towards the smallest one that did not.
BISECT_PROBES = 3


class BatchTooLarge(ConfigError):
    """A case's batch does not fit in memory; the message names the largest batch that did."""


@dataclass(frozen=True)
class Case:
    """One measurement.

    Attributes:
        model: a key of `ARCHS`; for the reference, the architecture it stands beside.
        jit_compile: "on", "off", or "auto" (the reference: Keras decides).
        input: "pipeline" (the real `make_dataset`) or "memory" (one batch of tensors, repeated).
        reference: None for ours; `keras.applications.ResNet50` under Keras's default compile settings in
            this process ("shared") or alone in a process with TensorFlow's defaults ("alone").
    """

    model: str
    image_size: int
    batch_size: int
    precision: str
    jit_compile: str
    input: str
    reference: str | None = None

    @property
    def label(self) -> str:
        return REFERENCE_LABELS[self.reference] if self.reference else self.model

    @property
    def key(self) -> str:
        """A name for MLflow metric keys: letters, digits, `_`, `-`, `.`."""
        return "_".join(
            (
                self.label,
                f"{self.image_size}px",
                f"b{self.batch_size}",
                self.precision,
                f"jit-{self.jit_compile}",
                self.input,
            )
        )


@dataclass(frozen=True)
class Settings:
    """What to measure: every combination of the tuples is a case.

    Attributes:
        jit_compile: "on" and/or "off" for our models.
        inputs: "pipeline" and/or "memory".
        warmup_steps: untimed steps first; the first step traces and compiles, so at least 1.
        repeats: rounds over all cases, each starting one model later; a case's steps are pooled.
        chunk_steps: the inputs of one model alternate every this many timed steps. Short chunks keep the
            two chunks of a pair close in time; each costs one untimed step for its new iterator.
        keras_reference: add `keras.applications.ResNet50` beside our resnet50 for every image size, batch,
            precision and input, in this process and alone.
        channels, classes: shape of the `memory` input when no `pipeline` case fixes it (None: CIFAR-10's).
    """

    models: tuple[str, ...] = ("resnet34", "plain34", "resnet50")
    image_sizes: tuple[int, ...] = (32,)
    batch_sizes: tuple[int, ...] = (64,)
    precisions: tuple[str, ...] = ("float32",)
    jit_compile: tuple[str, ...] = ("on", "off")
    inputs: tuple[str, ...] = INPUTS
    steps: int = 20
    warmup_steps: int = 5
    repeats: int = 1
    chunk_steps: int = 2
    keras_reference: bool = False
    channels: int | None = None
    classes: int | None = None

    def cases(self) -> list[Case]:
        cases = []
        for size, batch, precision, source in itertools.product(
            self.image_sizes, self.batch_sizes, self.precisions, self.inputs
        ):
            for model in self.models:
                cases.extend(Case(model, size, batch, precision, jit, source) for jit in self.jit_compile)
                if self.keras_reference and model == KERAS_REFERENCE_MODEL:
                    cases.extend(
                        Case(model, size, batch, precision, "auto", source, reference=how)
                        for how in REFERENCE_LABELS
                    )
        return cases


@dataclass
class _Plan:
    """What `check` resolved: the configuration for each model, and the input shape and classes."""

    base_cfg: DictConfig
    model_cfgs: dict[str, DictConfig]
    channels: int
    classes: int
    dataset: str | None
    cases: list[Case] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


def check(settings: Settings, overrides: Sequence[str] = ()) -> _Plan:
    """Reject settings that cannot run, before TensorFlow starts, with one line naming the bad value.

    Args:
        settings: what to measure.
        overrides: Hydra overrides of conf/.

    Returns:
        The composed configurations and the input shape.

    Raises:
        ConfigError: a bad setting or override.
        ValueError: an unknown model.
        DataError: the `pipeline` input's dataset is not prepared.
    """
    from resnet_lab.models import get_arch, total_stride

    for name in ("steps", "warmup_steps", "repeats", "chunk_steps"):
        _positive(name.replace("_", "-"), getattr(settings, name))
    for name, values in (("image-size", settings.image_sizes), ("batch-size", settings.batch_sizes)):
        if not values:
            raise ConfigError(f"--{name} needs at least one value")
        for value in values:
            _positive(name, value)
    if not settings.models:
        raise ConfigError("--models needs at least one value")
    for option, values, choices in (
        ("precision", settings.precisions, PRECISIONS),
        ("jit-compile", settings.jit_compile, tuple(JIT_SETTINGS)),
        ("input", settings.inputs, INPUTS),
    ):
        if not values:
            raise ConfigError(f"--{option} needs at least one value")
        for value in values:
            if value not in choices:
                raise ConfigError(f"unknown --{option} {value!r}; choose from {list(choices)}")
    for name in ("channels", "classes"):
        if getattr(settings, name) is not None:
            _positive(name, getattr(settings, name))
    for name in settings.models:
        get_arch(name)
    if settings.keras_reference:
        if KERAS_REFERENCE_MODEL not in settings.models:
            raise ConfigError(
                f"--keras-reference sets {KERAS_REFERENCE} beside our {KERAS_REFERENCE_MODEL}: "
                f"add {KERAS_REFERENCE_MODEL} to --models"
            )
        if min(settings.image_sizes) < KERAS_MIN_IMAGE_SIZE:
            raise ConfigError(
                f"--image-size {min(settings.image_sizes)} is too small for {KERAS_REFERENCE}: "
                f"it needs at least {KERAS_MIN_IMAGE_SIZE}"
            )

    base_cfg = _compose(overrides)
    model_cfgs = {name: _compose([*overrides, f"model={name}"]) for name in dict.fromkeys(settings.models)}
    for name, cfg in model_cfgs.items():
        arch = get_arch(name)
        stem = cfg.model.get("stem") or arch.layout
        stride = total_stride(arch, stem)
        if min(settings.image_sizes) < stride:
            raise ConfigError(
                f"--image-size {min(settings.image_sizes)} is smaller than {name}'s total stride {stride} "
                f"with the {stem} stem; use at least {stride}"
            )

    channels = settings.channels or MEMORY_CHANNELS
    classes = settings.classes or MEMORY_CLASSES
    dataset = None
    if "pipeline" in settings.inputs:
        from resnet_lab.data import data_spec

        spec = data_spec(base_cfg)
        dataset = spec.name
        for name, given, actual in (("channels", settings.channels, spec.input_shape[-1]),
                                    ("classes", settings.classes, spec.num_classes)):  # fmt: skip
            if given is not None and given != actual:
                raise ConfigError(
                    f"--{name} {given} differs from the {actual} of {spec.name}, which the pipeline input "
                    f"reads: the pipeline and memory inputs must have the same shape"
                )
        channels, classes = spec.input_shape[-1], spec.num_classes
    return _Plan(base_cfg, model_cfgs, channels, classes, dataset, settings.cases(), list(overrides))


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{name} must be a positive integer, got {value!r}")


def _compose(overrides: Sequence[str]) -> DictConfig:
    from hydra.errors import HydraException

    from resnet_lab.config import compose

    try:
        return compose(overrides)
    except HydraException as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from None


def bench(settings: Settings, overrides: Sequence[str] = ()) -> dict:
    """Measure every case of `settings`.

    Args:
        settings: what to measure.
        overrides: Hydra overrides of conf/ (paths, data, optimizer, `trainer.logical_cpus`,
            `trainer.distribution`).

    Returns:
        The report `--output` writes: `machine`, `matmul_ceiling` per compute dtype, one record per case in
        `cases` (one that ran out of memory holds `error` and `largest_fitting_batch` instead of numbers),
        and the ratios in `comparisons`.

    Raises:
        ConfigError: bad settings, or a batch not divisible by the replicas.
    """
    return _bench(settings, check(settings, overrides))


def _bench(settings: Settings, plan: _Plan) -> dict:
    from resnet_lab.train import make_strategy

    # First: logical CPU devices must be configured before TensorFlow initialises.
    strategy = make_strategy(plan.base_cfg)
    replicas = strategy.num_replicas_in_sync
    for batch in settings.batch_sizes:
        if batch % replicas:
            raise ConfigError(f"--batch-size {batch} is not divisible by the {replicas} replicas")
    if replicas > 1 and "on" in settings.jit_compile:
        # keras-team/keras#19005: the compiled step reads another replica's variables and fails; Keras's
        # own jit_compile="auto" turns XLA off under tf.distribute for this reason.
        raise ConfigError(
            f"--jit-compile on fails under {type(strategy).__name__} with {replicas} replicas (an XLA step "
            "cannot read another device's variables, keras-team/keras#19005); use --jit-compile off"
        )

    machine = describe_machine(strategy)
    dtypes = dict.fromkeys(["float32", *(COMPUTE_DTYPES[p] for p in settings.precisions)])
    ceilings = {dtype: matmul_ceiling(dtype) for dtype in dtypes}
    rounds: dict[Case, list[dict]] = {case: [] for case in plan.cases}
    groups = twins(plan.cases)
    for index in range(settings.repeats):
        shift = index % len(groups)
        for group in groups[shift:] + groups[:shift]:
            if any("error" in record for record in rounds[group[0]]):
                continue  # out of memory once: the search for the largest batch has been done
            measured = (
                _measure_alone(group, plan, settings)
                if group[0].reference == "alone"
                else _run_twins(group, plan, strategy, machine, settings)
            )
            for case, record in zip(group, measured, strict=True):
                rounds[case].append(record)
    records = [_pool(rounds[case]) for case in plan.cases]

    # Measured again after the cases, the best kept: on a shared machine one moment can be a busy one.
    for dtype in dtypes:
        ceilings[dtype] = max(ceilings[dtype], matmul_ceiling(dtype), key=lambda c: c["flops_per_sec"])
    # Replicas on logical CPUs share the cores; on GPUs each brings its own ceiling.
    ceiling_devices = replicas if machine["gpus"] else 1
    for record in records:
        if "achieved_flops_per_sec" in record:
            ceiling = ceilings[record["compute_dtype"]]["flops_per_sec"] * ceiling_devices
            record["matmul_fraction"] = record["achieved_flops_per_sec"] / ceiling
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "dataset": plan.dataset,
        "settings": {**asdict(settings), "channels": plan.channels, "classes": plan.classes},
        "flop_convention": FLOP_CONVENTION,
        "matmul_ceiling": ceilings,
        "cases": records,
        "comparisons": compare(records),
    }


def pipeline_throughput(
    cfg: DictConfig, *, image_sizes: Sequence[int], batch_sizes: Sequence[int], steps: int, warmup_steps: int
) -> dict:
    """Images per second of the input pipeline alone: `make_dataset("train", ...)` with no model behind it.

    The warm-up batches fill the pipeline's cache (the first epoch decodes and resizes); the timed batches
    are what every later epoch costs. A GPU waits for its input when this is below its training rate.

    Returns:
        The report `--pipeline-only` writes: `dataset`, `machine` and one record per image and batch size.
    """
    from resnet_lab.data import make_dataset

    records = []
    for size, batch in itertools.product(image_sizes, batch_sizes):
        case_cfg = OmegaConf.merge(cfg, {"data": {"image_size": size}, "trainer": {"batch_size": batch}})
        batches = iter(make_dataset("train", case_cfg, training=True).repeat())
        for _ in range(warmup_steps):
            next(batches)
        started = time.perf_counter()
        for _ in range(steps):
            images, _labels = next(batches)
        seconds = time.perf_counter() - started
        records.append(
            {
                "image_size": size,
                "batch_size": batch,
                "input_shape": list(images.shape[1:]),
                "batches": steps,
                "seconds": seconds,
                "images_per_sec": steps * batch / seconds,
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": "pipeline",
        "dataset": cfg.data.name,
        "machine": {"cpu": _cpu_name(), "cpus": os.cpu_count()},
        "settings": {"steps": steps, "warmup_steps": warmup_steps},
        "cases": records,
    }


def render_pipeline(report: dict) -> str:
    """`pipeline_throughput`'s report as a Markdown table."""
    rows = [["image", "batch", "images/s", "ms/batch"], ["---", "---:", "---:", "---:"]]
    for record in report["cases"]:
        rows.append(
            [
                "x".join(map(str, record["input_shape"])),
                str(record["batch_size"]),
                f"{record['images_per_sec']:,.0f}",
                f"{1000 * record['seconds'] / record['batches']:.2f}",
            ]
        )
    cpus = report["machine"]["cpus"]
    title = f"input pipeline alone: make_dataset('train') of {report['dataset']}, {cpus} CPUs"
    return "\n".join([title, *("| " + " | ".join(row) + " |" for row in rows)])


def twins(cases: Sequence[Case]) -> list[tuple[Case, ...]]:
    """The cases grouped by everything but their input, in the order they first appear."""
    groups: dict[Case, list[Case]] = {}
    for case in cases:
        groups.setdefault(replace(case, input=""), []).append(case)
    return [tuple(group) for group in groups.values()]


def _run_twins(cases: Sequence[Case], plan: _Plan, strategy, machine: dict, settings: Settings) -> list[dict]:
    """Measure cases that differ only in their input, on one model in this process; one record each.

    Cases that run out of memory: a record each that names the largest batch that fits.
    """
    import tensorflow as tf

    def measure(batch: int, steps: int, warmup_steps: int) -> list[dict]:
        sized = [replace(case, batch_size=batch) for case in cases]
        return _measure(
            sized, _case_config(plan.model_cfgs[cases[0].model], sized[0]), strategy,
            steps=steps, warmup_steps=warmup_steps, chunk_steps=settings.chunk_steps,
            channels=plan.channels, classes=plan.classes,
        )  # fmt: skip

    try:
        return measure(cases[0].batch_size, settings.steps, settings.warmup_steps)
    except (tf.errors.ResourceExhaustedError, MemoryError) as exc:
        return _out_of_memory(cases, exc, measure, strategy.num_replicas_in_sync, machine)


# TensorFlow first: it reads TF_ENABLE_ONEDNN_OPTS once, when it loads, so the setting resnet_lab's import
# makes afterwards changes nothing in this process.
_ALONE_ENTRY = "import sys, tensorflow; from resnet_lab.bench import _alone_main; _alone_main(sys.argv[1])"


def _measure_alone(cases: Sequence[Case], plan: _Plan, settings: Settings) -> list[dict]:
    """`_run_twins` in a Python process of its own, with TensorFlow's defaults rather than the package's.

    Raises:
        RuntimeError: the process failed; the message holds the last line it wrote to stderr.
    """
    import resnet_lab

    env = dict(os.environ)
    if resnet_lab.ONEDNN_SET_BY_PACKAGE:
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    with tempfile.TemporaryDirectory(prefix="resnet-lab-bench-") as tmp:
        output = Path(tmp) / "record.json"
        request = {
            "cases": [asdict(case) for case in cases],
            "overrides": plan.overrides,
            "settings": asdict(settings),
            "channels": plan.channels,
            "classes": plan.classes,
            "output": str(output),
        }
        result = subprocess.run(
            [sys.executable, "-c", _ALONE_ENTRY, json.dumps(request)],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0 or not output.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            label = cases[0].label
            raise RuntimeError(f"{label} failed in its own process (exit {result.returncode}): {last}")
        return json.loads(output.read_text())


def _alone_main(request_text: str) -> None:
    """The process `_measure_alone` starts: measure the cases it names, write their records."""
    from resnet_lab.train import make_strategy

    request = json.loads(request_text)
    cases = [Case(**case) for case in request["cases"]]
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in request["settings"].items()})
    model = cases[0].model
    cfg = _compose([*request["overrides"], f"model={model}"])
    strategy = make_strategy(cfg)
    plan = _Plan(cfg, {model: cfg}, request["channels"], request["classes"], None, cases)
    records = _run_twins(cases, plan, strategy, describe_machine(strategy), settings)
    write_json(request["output"], records)


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs its oneDNN CPU kernels in this process; None where the build cannot say."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def _case_config(cfg: DictConfig, case: Case) -> DictConfig:
    return OmegaConf.merge(
        cfg,
        {
            "data": {"image_size": case.image_size},
            "trainer": {
                "batch_size": case.batch_size,
                "precision": case.precision,
                "jit_compile": JIT_SETTINGS.get(case.jit_compile, "auto"),
            },
        },
    )


def _step_clock():
    """A Keras callback whose `ends` holds the time each training step finished."""
    import keras

    class StepClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            # Keras hands a callback that is not async-safe its logs as Python numbers, which waits for
            # the step to finish.
            float(logs["loss"])
            self.ends.append(time.perf_counter())

    return StepClock()


class _PeakMemory:
    """Peak resident memory of this process while the block runs, sampled; and the GPUs' own peak."""

    def __init__(self, gpus: Sequence[str]):
        self.gpus = list(gpus)
        self.peak_rss = 0
        self.peak_device: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> _PeakMemory:
        import psutil
        import tensorflow as tf

        for gpu in self.gpus:
            tf.config.experimental.reset_memory_stats(gpu)
        process = psutil.Process()
        self.peak_rss = process.memory_info().rss

        def sample():
            while not self._stop.wait(RSS_SAMPLE_S):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> bool:
        import tensorflow as tf

        self._stop.set()
        self._thread.join()
        if self.gpus and exc_info[0] is None:
            self.peak_device = sum(tf.config.experimental.get_memory_info(gpu)["peak"] for gpu in self.gpus)
        return False


def _measure(
    cases: Sequence[Case],
    cfg: DictConfig,
    strategy,
    *,
    steps: int,
    warmup_steps: int,
    chunk_steps: int,
    channels: int,
    classes: int,
) -> list[dict]:
    """Train one model on the input of each case in turn, as `chunk_schedule` says, and time the steps.

    The cases differ only in their input. They share the model and the process, so they share one peak of
    memory too.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from resnet_lab.models import build_from_config, count_macs, count_params

    case = cases[0]
    keras.backend.clear_session()
    keras.utils.set_random_seed(int(cfg.seed))
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(case.precision)
    try:
        shape = (case.image_size, case.image_size, channels)
        datasets = [_dataset(c, cfg, shape, classes) for c in cases]
        schedule = chunk_schedule(len(cases), steps, warmup_steps, chunk_steps)
        with strategy.scope():
            if case.reference:
                model = keras.applications.ResNet50(weights=None, input_shape=shape, classes=classes)
            else:
                model = build_from_config(cfg.model, classes, shape, cfg.optimizer.weight_decay)
            total_steps = sum(untimed + timed for _, untimed, timed in schedule)
            _compile(model, cfg, total_steps, reference=case.reference is not None)
        gpus = [d.name.rsplit("device:", 1)[-1] for d in tf.config.list_logical_devices("GPU")]
        step_times: list[list[float]] = [[] for _ in cases]
        losses = [math.nan for _ in cases]
        with _PeakMemory(gpus) as memory:
            for index, untimed, timed in schedule:
                clock = _step_clock()
                history = model.fit(
                    datasets[index], epochs=1, steps_per_epoch=untimed + timed, callbacks=[clock],
                    shuffle=False, verbose=0,
                )  # fmt: skip
                # Differences of the ends: the first step, which starts the iterator, is never timed.
                step_times[index] += [float(t) for t in np.diff(clock.ends)[untimed - 1 :]]
                losses[index] = float(history.history["loss"][-1])
        macs = count_macs(model)
        shared = {
            "implementation": KERAS_REFERENCE if case.reference else "resnet_lab",
            "reference": case.reference,
            "architecture": case.model,
            "image_size": case.image_size,
            "input_shape": list(shape),
            "classes": classes,
            "batch_size": case.batch_size,
            "precision": case.precision,
            "compute_dtype": COMPUTE_DTYPES[case.precision],
            "jit_compile_setting": case.jit_compile,
            "jit_compile": bool(model.jit_compile),
            "replicas": strategy.num_replicas_in_sync,
            "devices": _strategy_devices(strategy),
            "onednn": onednn_enabled(),
            "warmup_steps": warmup_steps,
            "steps": steps,
            "repeats": 1,
            "params": count_params(model),
            "macs_per_image": macs,
            "flops_per_image": FLOPS_PER_MAC_TRAINING * macs,
            "peak_rss_bytes": memory.peak_rss,
            "process_max_rss_bytes": _max_rss_bytes(),
            "peak_device_memory_bytes": memory.peak_device,
        }
        return [
            _with_throughput(
                {
                    "key": c.key, "model": c.label, **shared, "input": c.input, "loss": loss,
                    "chunk_sizes": [timed for i, _, timed in schedule if i == index],
                },
                times,
            )
            for index, (c, times, loss) in enumerate(zip(cases, step_times, losses, strict=True))
        ]  # fmt: skip
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def chunk_schedule(
    inputs: int, steps: int, warmup_steps: int, chunk_steps: int
) -> list[tuple[int, int, int]]:
    """The order in which one model trains on several inputs: `(input, untimed steps, timed steps)` chunks.

    Every input gets `steps` timed steps, in chunks of at most `chunk_steps`, the inputs taking turns in
    the order A B B A A B ... (each pair of turns reversed), so a steady drift of the machine's speed weighs
    on every input alike. An input's first chunk starts with `warmup_steps` untimed steps (tracing,
    compilation), every later one with one (a new iterator).
    """
    chunks = (
        [min(chunk_steps, steps - start) for start in range(0, steps, chunk_steps)] if inputs > 1 else [steps]
    )
    schedule = []
    for turn, timed in enumerate(chunks):
        order = range(inputs) if turn % 2 == 0 else reversed(range(inputs))
        schedule += [(index, warmup_steps if turn == 0 else 1, timed) for index in order]
    return schedule


def _with_throughput(record: dict, step_times: list[float]) -> dict:
    """The record with the numbers that follow from its step times."""
    median_step = statistics.median(step_times)
    images_per_sec = record["batch_size"] / median_step
    return {
        **record,
        "images_per_sec": images_per_sec,
        "images_per_sec_mean": record["batch_size"] * len(step_times) / sum(step_times),
        "step_time_s": median_step,
        "step_times_s": step_times,
        "achieved_flops_per_sec": record["flops_per_image"] * images_per_sec,
    }


def _pool(rounds: list[dict]) -> dict:
    """One record for a case measured in several rounds: all timed steps, the memory, the last loss.

    The process's resident set grows from case to case and round to round, so a case's peak includes what
    the cases before it left behind: the smallest peak of its rounds is the closest bound on its own needs.
    """
    if len(rounds) == 1 or "error" in rounds[-1]:
        return rounds[-1]
    pooled = {
        **rounds[-1],
        "repeats": len(rounds),
        "chunk_sizes": [size for r in rounds for size in r["chunk_sizes"]],
        "peak_rss_bytes": min(r["peak_rss_bytes"] for r in rounds),
        "process_max_rss_bytes": max(r["process_max_rss_bytes"] for r in rounds),
    }
    if rounds[-1]["peak_device_memory_bytes"] is not None:
        pooled["peak_device_memory_bytes"] = max(r["peak_device_memory_bytes"] for r in rounds)
    return _with_throughput(pooled, [t for r in rounds for t in r["step_times_s"]])


def _compile(model, cfg: DictConfig, steps_per_epoch: int, *, reference: bool) -> None:
    """`train(cfg)`'s compile settings; the reference: same optimizer and loss, otherwise Keras's defaults."""
    import keras

    from resnet_lab.train import compile_model, make_optimizer

    if not reference:
        compile_model(model, cfg, steps_per_epoch)
        return
    model.compile(
        optimizer=make_optimizer(cfg, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )


def _dataset(case: Case, cfg: DictConfig, shape: tuple[int, int, int], classes: int):
    import numpy as np
    import tensorflow as tf

    if case.input == "pipeline":
        from resnet_lab.data import make_dataset

        return make_dataset("train", cfg, training=True).repeat()
    rng = np.random.default_rng(int(cfg.seed))
    images = tf.constant(rng.standard_normal((case.batch_size, *shape), dtype=np.float32))
    labels = tf.constant(rng.integers(0, classes, case.batch_size))
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def _out_of_memory(
    cases: Sequence[Case],
    exc: BaseException,
    measure: Callable[..., list[dict]],
    replicas: int,
    machine: dict,
) -> list[dict]:
    import tensorflow as tf

    def fits(batch: int) -> bool:
        try:
            measure(batch, 1, 1)
            return True
        except (tf.errors.ResourceExhaustedError, MemoryError):
            return False

    case = cases[0]
    largest = largest_fitting_batch(fits, case.batch_size, multiple=replicas)
    where = machine["device"]
    message = (
        f"{case.label} at {case.image_size} px, batch {case.batch_size}, {case.precision}: out of memory on "
        f"{where} ({type(exc).__name__}); "
        + (f"the largest batch that fit is {largest}" if largest else f"not even a batch of {replicas} fits")
    )
    return [_error_record(c, message, largest) for c in cases]


def _error_record(case: Case, message: str, largest: int | None) -> dict:
    return {
        "key": case.key,
        "model": case.label,
        "reference": case.reference,
        "architecture": case.model,
        "image_size": case.image_size,
        "batch_size": case.batch_size,
        "precision": case.precision,
        "jit_compile_setting": case.jit_compile,
        "input": case.input,
        "error": message,
        "largest_fitting_batch": largest,
    }


def largest_fitting_batch(fits: Callable[[int], bool], too_large: int, *, multiple: int = 1) -> int | None:
    """The largest batch below `too_large` that `fits`: halve until one fits, then bisect a few times.

    Args:
        fits: runs a batch and says whether it fit in memory.
        too_large: a batch that did not fit.
        multiple: batches are multiples of this (the replicas).

    Returns:
        The largest batch found that fits, or None when not even `multiple` does.
    """
    fitting, failing = None, too_large
    batch = too_large // 2 // multiple * multiple
    while batch >= multiple:
        if fits(batch):
            fitting = batch
            break
        failing, batch = batch, batch // 2 // multiple * multiple
    if fitting is None:
        return None
    for _ in range(BISECT_PROBES):
        middle = (fitting + failing) // 2 // multiple * multiple
        if middle <= fitting:
            break
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return fitting


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
    """The hardware, the software versions and the strategy's devices."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    gpu_names = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus]
    cpu = _cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    replicas = strategy.num_replicas_in_sync
    if gpu_names:
        device = ", ".join(f"{count} x {name}" for name, count in _counts(gpu_names).items())
    else:
        device = f"CPU {cpu} ({cores} cores)"
    if replicas > 1:
        device += f", {replicas} replicas ({type(strategy).__name__})"
    return {
        "device": device,
        "cpu": cpu,
        "cpu_cores": cores,
        "gpus": gpu_names,
        "strategy": type(strategy).__name__,
        "replicas": replicas,
        "devices": _strategy_devices(strategy),
        "memory_bytes": _total_memory(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "onednn": onednn_enabled(),
        "hostname": platform.node(),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _total_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _counts(names: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def _strategy_devices(strategy) -> list[str]:
    """Where the strategy's replicas run, e.g. ["CPU:0", "CPU:1"]."""
    import tensorflow as tf

    try:
        names = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy: TensorFlow's placement, the first GPU if there is one
        names = [(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))[0].name]
    return [name.rsplit("device:", 1)[-1] for name in names]


def _max_rss_bytes() -> int:
    # ru_maxrss is in kibibytes on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def compare(records: Sequence[dict]) -> dict:
    """The side-by-side ratios, for every pair of measured cases that differ in one thing only.

    Returns:
        Lists of rows with `key`, `ratio`, both throughputs and the shared settings:
        `keras_reference` (our resnet50 / Keras's ResNet50, in this process and alone; goal
        `KERAS_SPEEDUP_GOAL`; keys `keras_reference/...` and `keras_reference_alone/...`),
        `pipeline_vs_memory` (the real pipeline / in-memory tensors; goal `PIPELINE_RATIO_GOAL`; with the
        number of `chunk_pairs` and their bootstrap `ratio_ci95`), `xla` (jit_compile on / off).
    """
    done = [r for r in records if "images_per_sec" in r]
    shared = ("image_size", "batch_size", "precision")

    def pairs(first, second, keys):
        return [
            (a, b) for a in done if first(a) for b in done if second(b) and all(a[k] == b[k] for k in keys)
        ]

    def row(kind, numerator, denominator, keys, goal=None):
        ratio = numerator["images_per_sec"] / denominator["images_per_sec"]
        setting = "_".join(_KEY_PARTS.get(k, "{}").format(numerator[k]) for k in keys)
        result = {
            "key": f"{kind}/{setting}",
            **{k: numerator[k] for k in keys},
            "images_per_sec": numerator["images_per_sec"],
            "baseline_images_per_sec": denominator["images_per_sec"],
            "ratio": ratio,
        }
        if goal is not None:
            result.update(goal=goal, meets_goal=ratio >= goal)
        return result

    ours_resnet50 = lambda r: r["architecture"] == KERAS_REFERENCE_MODEL and not _is_reference(r)  # noqa: E731
    keras_reference = [
        {
            **row(
                "keras_reference" + ("_alone" if ref["reference"] == "alone" else ""),
                ours,
                ref,
                (*shared, "input", "jit_compile_setting"),
                KERAS_SPEEDUP_GOAL,
            ),
            "baseline": ref["model"],
            "baseline_jit_compile": ref["jit_compile"],
            "baseline_onednn": ref["onednn"],
            "onednn": ours["onednn"],
        }
        for ours, ref in pairs(ours_resnet50, _is_reference, (*shared, "input"))
    ]
    twin_keys = ("model", *shared, "jit_compile_setting")
    pipeline_vs_memory = [
        {
            **row("pipeline_vs_memory", pipe, mem, twin_keys, PIPELINE_RATIO_GOAL),
            "chunk_pairs": len(pipe["chunk_sizes"]),
            "ratio_ci95": ratio_interval(pipe, mem),
        }
        for pipe, mem in pairs(
            lambda r: r["input"] == "pipeline", lambda r: r["input"] == "memory", twin_keys
        )
    ]
    xla = [
        row("xla", on, off, ("model", *shared, "input"))
        for on, off in pairs(
            lambda r: r["jit_compile_setting"] == "on",
            lambda r: r["jit_compile_setting"] == "off",
            ("model", *shared, "input"),
        )
    ]
    return {"keras_reference": keras_reference, "pipeline_vs_memory": pipeline_vs_memory, "xla": xla}


def ratio_interval(
    numerator: dict, denominator: dict, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> list[float] | None:
    """A bootstrap interval of `numerator` / `denominator` images per second, for two inputs of one model.

    The resampled unit is a pair of chunks, one of each input, timed back to back: the machine's slow and
    fast spells last longer than a step, so steps are not independent, but a pair sees the same spell. Each
    resample recomputes the ratio the table reports, of the median step times over the chosen chunks.

    Returns:
        `[low, high]`, or None with fewer than two chunk pairs.
    """
    import numpy as np

    def chunks(record: dict) -> list[np.ndarray]:
        bounds = np.cumsum(record["chunk_sizes"])[:-1]
        return np.split(np.asarray(record["step_times_s"]), bounds)

    if numerator["chunk_sizes"] != denominator["chunk_sizes"] or len(numerator["chunk_sizes"]) < 2:
        return None
    ours, base = chunks(numerator), chunks(denominator)
    rng = np.random.default_rng(seed)
    ratios = []
    for picks in rng.integers(0, len(ours), size=(resamples, len(ours))):
        ratios.append(
            np.median(np.concatenate([base[i] for i in picks]))
            / np.median(np.concatenate([ours[i] for i in picks]))
        )
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


_KEY_PARTS = {"image_size": "{}px", "batch_size": "b{}", "jit_compile_setting": "jit-{}"}


def _is_reference(record: dict) -> bool:
    return record["reference"] is not None


# header, width, cell; the first TEXT_COLUMNS are left-aligned
_COLUMNS = (
    ("model", 20, lambda r: r["model"]),
    ("px", 4, lambda r: str(r["image_size"])),
    ("batch", 5, lambda r: str(r["batch_size"])),
    ("precision", 14, lambda r: r["precision"]),
    ("xla", 8, lambda r: _jit_text(r)),
    ("input", 8, lambda r: r["input"]),
    ("oneDNN", 6, lambda r: _flag_text(r["onednn"])),
    ("img/s", 8, lambda r: f"{r['images_per_sec']:.1f}"),
    ("step ms", 8, lambda r: f"{1000 * r['step_time_s']:.1f}"),
    ("GMAC/img", 8, lambda r: f"{r['macs_per_image'] / 1e9:.3f}"),
    ("GFLOP/s", 8, lambda r: f"{r['achieved_flops_per_sec'] / 1e9:.1f}"),
    ("matmul%", 7, lambda r: f"{100 * r['matmul_fraction']:.1f}"),
    ("peak MiB", 8, lambda r: f"{(r['peak_device_memory_bytes'] or r['peak_rss_bytes']) / 2**20:.0f}"),
)
TEXT_COLUMNS = 7


def _jit_text(record: dict) -> str:
    if record["jit_compile_setting"] == "auto":
        return f"auto:{_on(record['jit_compile'])}"
    return record["jit_compile_setting"]


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _flag_text(flag: bool | None) -> str:
    return "?" if flag is None else _on(flag)


def _table_row(cells: Sequence[str]) -> str:
    return "  ".join(
        f"{cell:<{width}}" if index < TEXT_COLUMNS else f"{cell:>{width}}"
        for index, (cell, (_, width, _)) in enumerate(zip(cells, _COLUMNS, strict=True))
    )


def render(report: dict) -> str:
    """The report as the terminal table, the ceilings and the comparisons."""
    lines = [_table_row([header for header, _, _ in _COLUMNS])]
    for record in report["cases"]:
        if "error" in record:
            lines.append(f"{record['model']:<20}  error: {record['error']}")
        else:
            lines.append(_table_row([cell(record) for _, _, cell in _COLUMNS]))
    machine = report["machine"]
    ceilings = ", ".join(
        f"{c['dtype']} {c['flops_per_sec'] / 1e9:.1f} GFLOP/s ({c['size']}x{c['size']})"
        for c in report["matmul_ceiling"].values()
    )
    memory = "GPU memory" if machine["gpus"] else "resident memory of the process during the case"
    lines += [
        "",
        f"device: {machine['device']}; TensorFlow {machine['tensorflow']}, Keras {machine['keras']}, "
        f"oneDNN {_flag_text(machine['onednn'])}",
        f"dense matmul ceiling: {ceilings}",
        f"FLOPs: {report['flop_convention']}",
        f"img/s: batch / median step time over the timed steps; peak MiB: {memory}",
    ]
    comparisons = report["comparisons"]
    for row in comparisons["keras_reference"]:
        alone = row["baseline"] == REFERENCE_LABELS["alone"]
        process = "a process of its own, TensorFlow's defaults" if alone else "this process"
        lines.append(
            f"ours resnet50 (xla {row['jit_compile_setting']}, oneDNN {_flag_text(row['onednn'])}) / "
            f"{row['baseline']} (Keras's default compile in {process}: "
            f"xla {_on(row['baseline_jit_compile'])}, oneDNN {_flag_text(row['baseline_onednn'])}), "
            f"{_where(row)} {row['input']}: {_verdict(row, 'x')}"
        )
    for row in comparisons["pipeline_vs_memory"]:
        spread = ""
        if row["ratio_ci95"] is not None:
            low, high = row["ratio_ci95"]
            spread = f", 95% interval {low:.3f}-{high:.3f} over {row['chunk_pairs']} chunk pairs"
        lines.append(
            f"pipeline / memory, {row['model']} xla {row['jit_compile_setting']}, {_where(row)}: "
            f"{_verdict(row)}{spread}"
        )
    for row in comparisons["xla"]:
        lines.append(f"xla on / off, {row['model']}, {_where(row)} {row['input']}: {row['ratio']:.2f}x")
    return "\n".join(lines)


def _where(row: dict) -> str:
    return f"{row['image_size']} px batch {row['batch_size']} {row['precision']}"


def _verdict(row: dict, unit: str = "") -> str:
    met = "met" if row["meets_goal"] else "NOT met"
    return f"{row['ratio']:.3f}{unit} (goal >= {row['goal']:g}{unit}: {met})"


# The numbers of a case that go to MLflow, as `<case key>/<name>`.
_CASE_METRICS = (
    "images_per_sec",
    "step_time_s",
    "macs_per_image",
    "achieved_flops_per_sec",
    "matmul_fraction",
    "peak_rss_bytes",
    "peak_device_memory_bytes",
    "largest_fitting_batch",
)


class _BenchRun:
    """One MLflow run tagged `resnet_lab.kind=bench` around the measurement: FINISHED, FAILED or KILLED."""

    def __init__(self, cfg: DictConfig):
        from mlflow.tracking import MlflowClient

        from resnet_lab.tracking import check_reachable, tracking_uri

        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id: str | None = None

    def __enter__(self) -> _BenchRun:
        from resnet_lab.tracking import context_tags, experiment_id

        run = self.client.create_run(
            experiment_id(self.client, self.cfg.tracking.experiment_name, self.uri),
            run_name="bench",
            tags={**context_tags(), "resnet_lab.kind": "bench"},
        )
        self.run_id = run.info.run_id
        return self

    def log(self, report: dict, table: str) -> None:
        """Settings and machine as parameters, every number as a metric, the report and table as artifacts."""
        from mlflow.entities import Metric, Param

        params = {f"settings.{k}": _param_text(v) for k, v in report["settings"].items()}
        params.update({f"machine.{k}": _param_text(v) for k, v in report["machine"].items()})
        params.update(flop_convention=report["flop_convention"], dataset=str(report["dataset"]))
        metrics = {
            f"matmul_ceiling/{dtype}": c["flops_per_sec"] for dtype, c in report["matmul_ceiling"].items()
        }
        for record in report["cases"]:
            for name in _CASE_METRICS:
                if record.get(name) is not None:
                    metrics[f"{record['key']}/{name}"] = record[name]
        for rows in report["comparisons"].values():
            for row in rows:
                metrics[row["key"]] = row["ratio"]
                if row.get("ratio_ci95") is not None:
                    metrics[f"{row['key']}/ci95_low"], metrics[f"{row['key']}/ci95_high"] = row["ratio_ci95"]
        now = int(time.time() * 1000)
        params = [Param(k, v[:6000]) for k, v in params.items()]
        metrics = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for start in range(0, max(len(params), len(metrics)), 100):  # MLflow's batch limit
            self.client.log_batch(
                self.run_id, metrics=metrics[start : start + 100], params=params[start : start + 100]
            )
        self.client.log_text(self.run_id, json.dumps(report, indent=2) + "\n", "bench.json")
        self.client.log_text(self.run_id, table + "\n", "bench.txt")

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.run_id is None:
            return False
        if exc_type is None:
            self.client.set_terminated(self.run_id, "FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.client.set_terminated(self.run_id, "KILLED")
        else:
            reason = " ".join(f"{exc_type.__name__}: {exc}".split())[:4000]
            self.client.set_tag(self.run_id, "resnet_lab.failure", reason)
            self.client.set_terminated(self.run_id, "FAILED")
        return False


def _param_text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def write_json(path: str | os.PathLike, report: dict | list) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = _Parser(
        prog="python -m resnet_lab.bench",
        description="Training throughput of the model zoo, side by side with keras.applications.ResNet50.",
        epilog="KEY=VALUE arguments anywhere are Hydra overrides of conf/, e.g. paths.data_dir=/data/tfds",
    )
    add = parser.add_argument
    add("--models", nargs="+", default=list(defaults.models), metavar="MODEL")
    add("--image-size", nargs="+", type=int, default=list(defaults.image_sizes), metavar="PX")
    add("--batch-size", nargs="+", type=int, default=list(defaults.batch_sizes), metavar="N",
        help="the global batch, split across replicas")  # fmt: skip
    add("--precision", nargs="+", default=list(defaults.precisions), metavar="POLICY",
        help=f"Keras dtype policies: {', '.join(PRECISIONS)}")  # fmt: skip
    add("--jit-compile", nargs="+", default=list(defaults.jit_compile), metavar="on|off",
        help="XLA for our models (default: both, to compare)")  # fmt: skip
    add("--input", nargs="+", default=list(defaults.inputs), metavar="SOURCE",
        help="pipeline: the real make_dataset; memory: one batch of tensors, repeated")  # fmt: skip
    add("--steps", type=int, default=defaults.steps, help="timed steps per case")
    add("--warmup-steps", type=int, default=defaults.warmup_steps,
        help="untimed steps first: tracing and XLA compilation")  # fmt: skip
    add("--repeats", type=int, default=defaults.repeats,
        help="measure every case this many times, in rounds of rotating order; pool the steps")  # fmt: skip
    add("--chunk-steps", type=int, default=defaults.chunk_steps,
        help="several inputs: each model alternates between them every this many timed steps")  # fmt: skip
    add("--keras-reference", action="store_true",
        help=f"add {KERAS_REFERENCE} under Keras's default compile settings beside our resnet50, in this "
        "process and alone in one with TensorFlow's defaults")  # fmt: skip
    add("--channels", type=int, help=f"memory input only: image channels (default {MEMORY_CHANNELS})")
    add("--classes", type=int, help=f"memory input only: classes (default {MEMORY_CLASSES})")
    add("--logical-cpus", type=int, help="split the CPU into this many devices and mirror over them")
    add("--output", default="bench.json", help="the JSON report (default: %(default)s)")
    add("--mlflow", action="store_true", help="log the numbers to an MLflow run")
    add("--pipeline-only", action="store_true",
        help="time make_dataset alone (no model) for each image and batch size")  # fmt: skip
    return parser


@cli
def main(argv: Sequence[str] | None = None) -> None:
    """Measure, print the table, write the JSON report, and log to MLflow with `--mlflow`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # KEY=VALUE anywhere is a Hydra override, so one cannot end up in the list of an option before it.
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    args = _parser().parse_args([arg for arg in argv if arg not in overrides])
    settings = Settings(
        models=tuple(args.models),
        image_sizes=tuple(args.image_size),
        batch_sizes=tuple(args.batch_size),
        precisions=tuple(args.precision),
        jit_compile=tuple(args.jit_compile),
        inputs=tuple(args.input),
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        repeats=args.repeats,
        chunk_steps=args.chunk_steps,
        keras_reference=args.keras_reference,
        channels=args.channels,
        classes=args.classes,
    )
    if args.pipeline_only:
        for name in ("steps", "warmup_steps"):
            _positive(name.replace("_", "-"), getattr(args, name))
        for value in (*args.image_size, *args.batch_size):
            _positive("image-size/--batch-size", value)
        report = pipeline_throughput(
            _compose(overrides), image_sizes=args.image_size, batch_sizes=args.batch_size,
            steps=args.steps, warmup_steps=args.warmup_steps,
        )  # fmt: skip
        print(render_pipeline(report))
        write_json(args.output, report)
        print(f"report: {args.output}")
        return
    if args.logical_cpus is not None:
        _positive("logical-cpus", args.logical_cpus)
        overrides.append(f"trainer.logical_cpus={args.logical_cpus}")
    plan = check(settings, overrides)
    run = _BenchRun(plan.base_cfg) if args.mlflow else contextlib.nullcontext()
    with run:
        report = _bench(settings, plan)
        table = render(report)
        print(table)
        write_json(args.output, report)
        print(f"report: {args.output}")
        if args.mlflow:
            run.log(report, table)
            print(f"mlflow run: {run.run_id} ({run.uri})")
        failures = [record["error"] for record in report["cases"] if "error" in record]
        if failures:
            raise BatchTooLarge("; ".join(failures))


if __name__ == "__main__":
    main()
