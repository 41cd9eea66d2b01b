"""The throughput benchmark on tiny cases: the report's fields and arithmetic, every code path, its MLflow
run, its errors.

No timing assertions: performance is shown by the benchmark's numbers, never by a timed test.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from mlflow import MlflowClient

import resnet_lab
from conftest import path_overrides
from resnet_lab import bench
from resnet_lab.bench import Settings, largest_fitting_batch, main

# 8 px digits through resnet8/plain8; 2 warm-up steps absorb tracing and compilation, 2 are timed.
TINY_BENCH = ("--image-size", "8", "--batch-size", "8", "--steps", "2", "--warmup-steps", "2")
PAPER_SCALE = ("model.stem=imagenet", "model.width=64", "model.shortcut=B")
TINY_SETTINGS = {"image_sizes": (8,), "batch_sizes": (8,), "steps": 2, "warmup_steps": 2}

REPORT_FIELDS = {
    "schema_version", "created", "machine", "dataset", "settings", "flop_convention", "matmul_ceiling",
    "cases", "comparisons",
}  # fmt: skip
MACHINE_FIELDS = {
    "device", "cpu", "cpu_cores", "gpus", "strategy", "replicas", "devices", "memory_bytes", "python",
    "tensorflow", "keras", "onednn", "hostname",
}  # fmt: skip
CASE_FIELDS = {
    "key", "model", "implementation", "reference", "architecture", "image_size", "input_shape", "classes",
    "batch_size", "precision", "compute_dtype", "jit_compile_setting", "jit_compile", "input", "replicas",
    "devices", "onednn", "warmup_steps", "steps", "repeats", "images_per_sec", "images_per_sec_mean",
    "step_time_s", "step_times_s", "params", "macs_per_image", "flops_per_image", "achieved_flops_per_sec",
    "matmul_fraction", "peak_rss_bytes", "process_max_rss_bytes", "peak_device_memory_bytes", "loss",
    "chunk_sizes",
}  # fmt: skip
POSITIVE_FIELDS = (
    "images_per_sec", "images_per_sec_mean", "step_time_s", "macs_per_image", "params",
    "achieved_flops_per_sec", "matmul_fraction", "peak_rss_bytes", "process_max_rss_bytes",
)  # fmt: skip
COMPARISON_FIELDS = {"key", "images_per_sec", "baseline_images_per_sec", "ratio"}


def _bench_cli(args, cwd, *, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "resnet_lab.bench", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _check_case(case: dict, ceilings: dict) -> None:
    """Every field present, every number positive, and the numbers agree with each other."""
    assert set(case) == CASE_FIELDS, set(case) ^ CASE_FIELDS
    for key in POSITIVE_FIELDS:
        assert case[key] > 0, key
    assert len(case["step_times_s"]) == case["steps"] * case["repeats"] == sum(case["chunk_sizes"])
    assert all(t > 0 for t in case["step_times_s"])
    assert case["step_time_s"] == pytest.approx(statistics.median(case["step_times_s"]))
    assert case["step_time_s"] * case["images_per_sec"] == pytest.approx(case["batch_size"])
    assert case["flops_per_image"] == 6 * case["macs_per_image"]
    assert case["achieved_flops_per_sec"] == pytest.approx(case["flops_per_image"] * case["images_per_sec"])
    ceiling = ceilings[case["compute_dtype"]]["flops_per_sec"]
    assert case["matmul_fraction"] == pytest.approx(case["achieved_flops_per_sec"] / ceiling)
    assert case["peak_device_memory_bytes"] is None  # no GPU here
    assert math.isfinite(case["loss"])
    assert case["key"].startswith(case["model"] + "_")


def test_cli_writes_the_table_and_a_report_with_every_field(digits_root, tmp_path):
    output = tmp_path / "out" / "bench.json"
    result = _bench_cli(
        ["--models", "resnet8", *TINY_BENCH, "--jit-compile", "on", "off", "--input", "pipeline", "memory",
         "--chunk-steps", "1", "--output", str(output), *path_overrides(digits_root, tmp_path)],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert set(report) == REPORT_FIELDS
    assert set(report["machine"]) == MACHINE_FIELDS
    assert report["machine"]["gpus"] == [] and report["machine"]["replicas"] == 1
    assert report["dataset"] == "digits"
    ceiling = report["matmul_ceiling"]["float32"]
    assert ceiling["flops_per_sec"] > 0 and ceiling["size"] >= 256
    assert "2 per MAC" in report["flop_convention"]

    cases = report["cases"]
    assert [(c["jit_compile_setting"], c["input"]) for c in cases] == [
        ("on", "pipeline"), ("off", "pipeline"), ("on", "memory"), ("off", "memory"),
    ]  # fmt: skip
    for case in cases:
        _check_case(case, report["matmul_ceiling"])
        assert case["model"] == "resnet8" and case["implementation"] == "resnet_lab"
        assert case["jit_compile"] == (case["jit_compile_setting"] == "on")
        # Digits: 1 channel, 10 classes, for the pipeline and, to compare like with like, the memory input.
        assert case["input_shape"] == [8, 8, 1] and case["classes"] == 10
    assert len({c["macs_per_image"] for c in cases}) == 1

    by_key = {c["key"]: c for c in cases}
    comparisons = report["comparisons"]
    assert comparisons["keras_reference"] == []
    assert len(comparisons["pipeline_vs_memory"]) == 2 and len(comparisons["xla"]) == 2
    for row in comparisons["pipeline_vs_memory"]:
        assert COMPARISON_FIELDS <= set(row) and row["goal"] == 0.97
        pipeline = by_key[f"resnet8_8px_b8_float32_jit-{row['jit_compile_setting']}_pipeline"]
        memory = by_key[f"resnet8_8px_b8_float32_jit-{row['jit_compile_setting']}_memory"]
        assert row["ratio"] == pytest.approx(pipeline["images_per_sec"] / memory["images_per_sec"])
        assert row["meets_goal"] == (row["ratio"] >= 0.97)
        # --chunk-steps 1: as many chunk pairs as timed steps, and an interval around the ratio.
        assert row["chunk_pairs"] == pipeline["steps"] == len(pipeline["chunk_sizes"])
        low, high = row["ratio_ci95"]
        assert low <= row["ratio"] <= high
    for row in comparisons["xla"]:
        on = by_key[f"resnet8_8px_b8_float32_jit-on_{row['input']}"]
        off = by_key[f"resnet8_8px_b8_float32_jit-off_{row['input']}"]
        assert row["ratio"] == pytest.approx(on["images_per_sec"] / off["images_per_sec"])

    lines = result.stdout.splitlines()
    assert lines[0].split()[:7] == ["model", "px", "batch", "precision", "xla", "input", "oneDNN"]
    assert sum(line.startswith("resnet8 ") for line in lines) == 4
    assert any(line.startswith("dense matmul ceiling: float32 ") for line in lines)
    assert sum(line.startswith("pipeline / memory, resnet8") for line in lines) == 2


def test_repeats_measure_every_case_in_rounds_of_rotating_order_and_pool_the_steps(tmp_path, monkeypatch):
    order, rounds = [], {}
    measure = bench._run_twins

    def spy(cases, *args, **kwargs):
        (case,) = cases  # one input: every model is a group of one
        order.append(case.model)
        records = measure(cases, *args, **kwargs)
        rounds.setdefault(case.model, []).extend(records)
        return records

    monkeypatch.setattr(bench, "_run_twins", spy)
    report = bench.bench(
        Settings(models=("resnet8", "plain8", "resnet20"), jit_compile=("off",), inputs=("memory",),
                 repeats=2, **TINY_SETTINGS),
        [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
    )  # fmt: skip
    # The second round starts one case later, so no case is always first (or always after another).
    assert order == ["resnet8", "plain8", "resnet20", "plain8", "resnet20", "resnet8"]
    for case in report["cases"]:
        _check_case(case, report["matmul_ceiling"])
        first, second = rounds[case["model"]]
        assert case["repeats"] == 2 and case["step_times_s"] == first["step_times_s"] + second["step_times_s"]
        assert case["chunk_sizes"] == first["chunk_sizes"] + second["chunk_sizes"]
        # The process grows round by round: the smaller peak is the closer bound on the case's own needs.
        assert case["peak_rss_bytes"] == min(first["peak_rss_bytes"], second["peak_rss_bytes"])
        assert case["loss"] == second["loss"]
    assert [c["model"] for c in report["cases"]] == ["resnet8", "plain8", "resnet20"]


@pytest.mark.parametrize(
    ("inputs", "steps", "chunk_steps", "expected"),
    [
        # One input: one chunk, as many steps as asked, after the warm-up.
        (1, 7, 3, [(0, 4, 7)]),
        # Two inputs take turns A B B A A B, the last chunk short; warm-up once per input, then one
        # untimed step per chunk for its new iterator.
        (2, 7, 2, [(0, 4, 2), (1, 4, 2), (1, 1, 2), (0, 1, 2), (0, 1, 2), (1, 1, 2), (1, 1, 1), (0, 1, 1)]),
        (2, 3, 5, [(0, 4, 3), (1, 4, 3)]),
        (3, 2, 1, [(0, 4, 1), (1, 4, 1), (2, 4, 1), (2, 1, 1), (1, 1, 1), (0, 1, 1)]),
    ],
)
def test_the_inputs_of_one_model_take_turns_in_chunks(inputs, steps, chunk_steps, expected):
    schedule = bench.chunk_schedule(inputs, steps, 4, chunk_steps)
    assert schedule == expected
    for index in range(inputs):
        assert sum(timed for i, _, timed in schedule if i == index) == steps


def test_pipeline_and_memory_train_one_model_in_alternation(digits_root, tmp_path, monkeypatch):
    import keras

    fits, models = [], set()
    real_dataset, real_fit = bench._dataset, keras.Model.fit

    def dataset(case, *args):
        data = real_dataset(case, *args)
        data.source = case.input  # which input a fit trains on
        return data

    def fit(model, data, **kwargs):
        fits.append((data.source, kwargs["steps_per_epoch"]))
        models.add(id(model))
        return real_fit(model, data, **kwargs)

    monkeypatch.setattr(bench, "_dataset", dataset)
    monkeypatch.setattr(keras.Model, "fit", fit)
    report = bench.bench(
        Settings(models=("resnet8",), jit_compile=("off",), inputs=("pipeline", "memory"), chunk_steps=1,
                 **TINY_SETTINGS),
        path_overrides(digits_root, tmp_path),
    )  # fmt: skip
    # 2 timed steps each, one at a time, A B B A: the warm-up before each input's first, one untimed step
    # before every later one.
    assert fits == [("pipeline", 3), ("memory", 3), ("memory", 2), ("pipeline", 2)]
    assert len(models) == 1
    pipeline, memory = report["cases"]
    for case in (pipeline, memory):
        _check_case(case, report["matmul_ceiling"])
        assert case["steps"] == 2 and case["repeats"] == 1
    assert (pipeline["input"], memory["input"]) == ("pipeline", "memory")
    assert pipeline["step_times_s"] != memory["step_times_s"]
    # One model in one process: one peak of memory.
    assert pipeline["peak_rss_bytes"] == memory["peak_rss_bytes"]
    (row,) = report["comparisons"]["pipeline_vs_memory"]
    assert row["ratio"] == pytest.approx(pipeline["images_per_sec"] / memory["images_per_sec"])


def _twin_records(pipeline_chunks, memory_chunks):
    records = []
    for chunks in (pipeline_chunks, memory_chunks):
        records.append(
            {"step_times_s": [t for chunk in chunks for t in chunk], "chunk_sizes": [len(c) for c in chunks]}
        )
    return records


def test_the_ratio_interval_resamples_pairs_of_chunks():
    # The machine's speed swings fourfold from chunk to chunk, the pipeline is 10% slower within every pair:
    # resampling whole pairs sees only the 10%. Resampling steps of each input apart would not.
    speeds = [1.0, 4.0, 2.0, 1.5, 3.0, 1.2]
    memory = [[speed, speed * 1.01] for speed in speeds]
    pipeline = [[1.1 * t for t in chunk] for chunk in memory]
    low, high = bench.ratio_interval(*_twin_records(pipeline, memory))
    assert low == pytest.approx(1 / 1.1) and high == pytest.approx(1 / 1.1)


def test_the_ratio_interval_narrows_with_more_pairs_and_needs_two():
    rng = np.random.default_rng(1)

    def interval(pairs):
        memory = [list(rng.lognormal(0, 0.1, 3)) for _ in range(pairs)]
        pipeline = [list(rng.lognormal(0, 0.1, 3)) for _ in range(pairs)]
        records = _twin_records(pipeline, memory)
        ratio = statistics.median(records[1]["step_times_s"]) / statistics.median(records[0]["step_times_s"])
        low, high = bench.ratio_interval(*records)
        assert low < ratio < high
        return high - low

    assert interval(100) < interval(5) / 2
    assert bench.ratio_interval(*_twin_records([[1.0, 1.0]], [[1.0, 1.0]])) is None


def test_mixed_precision_runs_on_the_cpu_and_restores_the_policy(tmp_path):
    import keras

    report = bench.bench(
        Settings(models=("plain8",), precisions=("mixed_bfloat16", "mixed_float16"), jit_compile=("on",),
                 inputs=("memory",), **TINY_SETTINGS),
        [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
    )  # fmt: skip
    assert set(report["matmul_ceiling"]) == {"float32", "bfloat16", "float16"}
    assert [c["compute_dtype"] for c in report["cases"]] == ["bfloat16", "float16"]
    for case in report["cases"]:
        _check_case(case, report["matmul_ceiling"])
        assert case["jit_compile"] is True
        # Without a pipeline input the memory input takes CIFAR-10's shape.
        assert case["input_shape"] == [8, 8, 3] and case["classes"] == 10
    assert keras.mixed_precision.global_policy().name == "float32"


def test_mirrored_strategy_over_two_logical_cpus(digits_root, tmp_path):
    base = ["--models", "resnet8", *TINY_BENCH, "--logical-cpus", "2", *path_overrides(digits_root, tmp_path)]
    output = tmp_path / "bench.json"
    result = _bench_cli([*base, "--jit-compile", "off", "--output", str(output)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["machine"]["strategy"] == "MirroredStrategy" and report["machine"]["replicas"] == 2
    for case in report["cases"]:
        _check_case(case, report["matmul_ceiling"])
        assert case["replicas"] == 2 and case["devices"] == ["CPU:0", "CPU:1"]
    assert {c["input"] for c in report["cases"]} == {"pipeline", "memory"}

    odd = _bench_cli([*base, "--jit-compile", "off", "--batch-size", "7", "--output", str(output)], tmp_path)
    assert odd.returncode == 2
    assert odd.stderr.strip().splitlines()[-1] == "error: --batch-size 7 is not divisible by the 2 replicas"
    xla = _bench_cli([*base, "--jit-compile", "on", "--output", str(output)], tmp_path)
    assert xla.returncode == 2
    message = xla.stderr.strip().splitlines()[-1]
    assert message.startswith("error: --jit-compile on fails under MirroredStrategy with 2 replicas")


def test_mlflow_run_holds_the_numbers(digits_root, tmp_path, capsys):
    output = tmp_path / "bench.json"
    main(["--models", "plain8", *TINY_BENCH, "--jit-compile", "off", "--input", "memory", "pipeline",
          "--chunk-steps", "1", "--mlflow", "--output", str(output),
          *path_overrides(digits_root, tmp_path)])  # fmt: skip
    report = json.loads(output.read_text())
    case, _ = report["cases"]
    (comparison,) = report["comparisons"]["pipeline_vs_memory"]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("resnet-lab").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["resnet_lab.kind"] == "bench"
    assert run.info.run_id in capsys.readouterr().out
    metrics = run.data.metrics
    assert metrics[f"{case['key']}/images_per_sec"] == pytest.approx(case["images_per_sec"])
    assert metrics[f"{case['key']}/matmul_fraction"] == pytest.approx(case["matmul_fraction"])
    ceiling = report["matmul_ceiling"]["float32"]["flops_per_sec"]
    assert metrics["matmul_ceiling/float32"] == pytest.approx(ceiling)
    assert metrics[comparison["key"]] == pytest.approx(comparison["ratio"])
    low, high = comparison["ratio_ci95"]
    assert metrics[f"{comparison['key']}/ci95_low"] == pytest.approx(low)
    assert metrics[f"{comparison['key']}/ci95_high"] == pytest.approx(high)
    assert run.data.params["settings.models"] == "plain8" and run.data.params["machine.replicas"] == "1"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"bench.json", "bench.txt"}


def test_a_batch_that_does_not_fit_names_the_largest_that_did(digits_root, tmp_path, monkeypatch, capsys):
    # Running this CPU out of memory would take the machine down with it: the allocation failure TensorFlow
    # raises is injected above 5 images; everything else is real.
    import tensorflow as tf

    real_measure = bench._measure
    tried = []

    def measure(cases, *args, **kwargs):
        batch = cases[0].batch_size
        tried.append(batch)
        if batch > 5:
            raise tf.errors.ResourceExhaustedError(None, None, f"OOM when allocating batch {batch}")
        return real_measure(cases, *args, **kwargs)

    monkeypatch.setattr(bench, "_measure", measure)
    output = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["--models", "plain8", "--image-size", "8", "--batch-size", "16", "--jit-compile", "off",
              "--input", "memory", "--mlflow", "--output", str(output),
              *path_overrides(digits_root, tmp_path)])  # fmt: skip
    assert exit_info.value.code == 2
    assert tried == [16, 8, 4, 6, 5]
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: plain8 at 8 px, batch 16, float32: out of memory on CPU")
    assert message.endswith("(ResourceExhaustedError); the largest batch that fit is 5")
    (case,) = json.loads(output.read_text())["cases"]
    assert case["largest_fitting_batch"] == 5 and case["error"] == message.removeprefix("error: ")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("resnet-lab").experiment_id])
    assert run.info.status == "FAILED"
    assert "largest batch that fit is 5" in run.data.tags["resnet_lab.failure"]
    assert run.data.metrics[f"{case['key']}/largest_fitting_batch"] == 5


@pytest.mark.parametrize(
    ("limit", "too_large", "multiple", "expected"),
    [(40, 64, 1, 40), (41, 64, 2, 40), (100, 128, 1, 96), (1, 64, 1, 1), (0, 64, 1, None), (3, 8, 4, None)],
)
def test_largest_fitting_batch_halves_then_bisects(limit, too_large, multiple, expected):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= limit

    assert largest_fitting_batch(fits, too_large, multiple=multiple) == expected
    assert all(0 < b < too_large and b % multiple == 0 for b in tried)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "resnet9"], "unknown model 'resnet9'; choose one of"),
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--batch-size", "eight"], "argument --batch-size: invalid int value: 'eight'"),
        (["--steps", "-1"], "--steps must be a positive integer, got -1"),
        (["--warmup-steps", "0"], "--warmup-steps must be a positive integer, got 0"),
        (["--repeats", "0"], "--repeats must be a positive integer, got 0"),
        (["--chunk-steps", "0"], "--chunk-steps must be a positive integer, got 0"),
        (
            ["--models", "resnet50", "--image-size", "16", "model.stem=imagenet"],
            "16 is smaller than resnet50's total stride 32",
        ),
        (["--precision", "float64"], "unknown --precision 'float64'; choose from"),
        (["--jit-compile", "maybe"], "unknown --jit-compile 'maybe'; choose from ['on', 'off']"),
        (["--input", "disk"], "unknown --input 'disk'; choose from ['pipeline', 'memory']"),
        (["--keras-reference", "--models", "resnet34"], "add resnet50 to --models"),
        (["--logical-cpus", "0"], "--logical-cpus must be a positive integer, got 0"),
        (["--channels", "3"], "--channels 3 differs from the 1 of digits"),
        (["nope.key=1"], "Could not override 'nope.key'."),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(args, message, digits_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--output", str(tmp_path / "bench.json"), *path_overrides(digits_root, tmp_path)])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "bench.json").exists()


def test_bad_input_through_the_real_command_line(tmp_path):
    missing = f"paths.prepared_dir={tmp_path}/none"
    result = _bench_cli(["--models", "resnet34", missing, "--input", "pipeline"], tmp_path)
    assert result.returncode == 2
    # TensorFlow's C++ logging may print first; the error is one line, and the last.
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.stderr.strip().endswith(line) and "prepare digits first" in line


@pytest.mark.slow
def test_ours_against_keras_resnet50_under_keras_defaults(tmp_path):
    report = bench.bench(
        Settings(models=("resnet50",), image_sizes=(32,), batch_sizes=(2,), jit_compile=("off",),
                 inputs=("memory",), steps=2, warmup_steps=1, keras_reference=True),
        # Ours at the paper's ImageNet scale, as Keras builds it (conf/ defaults to CIFAR scale).
        [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *PAPER_SCALE],
    )  # fmt: skip
    ours, shared, alone = report["cases"]
    for case in (ours, shared, alone):
        _check_case(case, report["matmul_ceiling"])
    assert [c["model"] for c in report["cases"]] == ["resnet50", "keras.ResNet50", "keras.ResNet50-alone"]
    assert [c["reference"] for c in report["cases"]] == [None, "shared", "alone"]
    assert ours["implementation"] == "resnet_lab"
    for reference in (shared, alone):
        assert reference["implementation"] == "keras.applications.ResNet50"
        # Keras's jit_compile="auto" is off on a CPU-only machine: the default the issue measured.
        assert reference["jit_compile_setting"] == "auto" and reference["jit_compile"] is False
        # The same network up to details: Keras's convs carry biases (BN makes them redundant), its strides
        # sit on the 1x1 convs (v1) where ours sit on the 3x3 (v1.5, a few more MACs).
        assert ours["params"] == pytest.approx(reference["params"], rel=0.01)
        assert ours["macs_per_image"] == pytest.approx(reference["macs_per_image"], rel=0.1)
    # In this process the reference shares the package's runtime; alone it gets TensorFlow's own choice.
    assert shared["onednn"] is ours["onednn"]
    if resnet_lab.ONEDNN_SET_BY_PACKAGE:
        assert ours["onednn"] is True and alone["onednn"] is _tensorflows_own_onednn_choice()
    else:  # the environment chose: both processes follow it
        assert alone["onednn"] is ours["onednn"]
    rows = {row["baseline"]: row for row in report["comparisons"]["keras_reference"]}
    assert set(rows) == {"keras.ResNet50", "keras.ResNet50-alone"}
    for reference in (shared, alone):
        row = rows[reference["model"]]
        assert row["ratio"] == pytest.approx(ours["images_per_sec"] / reference["images_per_sec"])
        assert row["goal"] == 2.0 and row["meets_goal"] == (row["ratio"] >= 2.0)
        assert row["baseline_jit_compile"] is False and row["baseline_onednn"] is reference["onednn"]
    assert rows["keras.ResNet50"]["key"].startswith("keras_reference/")
    assert rows["keras.ResNet50-alone"]["key"].startswith("keras_reference_alone/")


def _tensorflows_own_onednn_choice() -> bool:
    """oneDNN in a process that loads TensorFlow with no TF_ENABLE_ONEDNN_OPTS and nothing of resnet_lab."""
    return _onednn_in_a_new_process(setting=None, package=False)


def _onednn_in_a_new_process(*, setting: str | None, package: bool) -> bool:
    """Whether TensorFlow's oneDNN kernels are on in a new process, given TF_ENABLE_ONEDNN_OPTS (None: unset)
    and whether the process imports resnet_lab before TensorFlow."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    probe = (
        ("import resnet_lab; " if package else "")
        + "import tensorflow; from tensorflow.python.util import _pywrap_util_port as port; "
        + "print(port.IsMklEnabled())"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return {"True": True, "False": False}[result.stdout.strip()]


def test_a_reference_whose_own_process_fails_is_one_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_ALONE_ENTRY", "import sys; sys.exit('no TensorFlow here')")
    case = bench.Case("resnet50", 32, 2, "float32", "auto", "memory", reference="alone")
    plan = bench._Plan(None, {}, 3, 10, None, [case])
    with pytest.raises(RuntimeError, match=r"keras.ResNet50-alone failed in its own process \(exit 1\): no "):
        bench._measure_alone((case,), plan, Settings(steps=1, warmup_steps=1))


def test_pipeline_only_times_make_dataset_for_each_image_and_batch_size(digits_root, tmp_path, capsys):
    output = tmp_path / "pipeline.json"
    main(
        ["--pipeline-only", "--image-size", "8", "32", "--batch-size", "16", "--steps", "3",
         "--warmup-steps", "1", "--output", str(output), *path_overrides(digits_root, tmp_path)]
    )  # fmt: skip
    report = json.loads(output.read_text())
    assert report["kind"] == "pipeline" and report["dataset"] == "digits"
    assert [(c["image_size"], c["input_shape"]) for c in report["cases"]] == [
        (8, [8, 8, 1]),
        (32, [32, 32, 1]),
    ]
    for case in report["cases"]:
        assert case["batches"] == 3 and case["seconds"] > 0
        assert case["images_per_sec"] == pytest.approx(3 * 16 / case["seconds"])
    table = capsys.readouterr().out
    assert "input pipeline alone" in table and "| 32x32x1 | 16 |" in table


@pytest.mark.parametrize(("setting", "enabled"), [(None, "True"), ("0", "False")])
def test_the_package_turns_on_tensorflows_onednn_cpu_kernels_unless_told_not_to(setting, enabled):
    assert str(_onednn_in_a_new_process(setting=setting, package=True)) == enabled
