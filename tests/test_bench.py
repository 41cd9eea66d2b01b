"""The throughput benchmark, run for real on tiny cases: its report, table and MLflow run, and its errors.

No timing assertions: performance is shown by the benchmark's numbers, never by a timed test.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import path_overrides
from resnet_lab.bench import KERAS_REFERENCE, Case, Settings, main

# 8 px digits through resnet8; 1 warm-up step absorbs tracing, 2 are timed.
TINY = ("--image-size", "8", "--batch-size", "8", "--steps", "2", "--warmup-steps", "1")
REPORT_FIELDS = {
    "created", "machine", "settings", "overrides", "precision", "flops_per_mac", "matmul_ceiling", "cases",
}  # fmt: skip
CASE_FIELDS = {
    "key", "model", "image_size", "batch_size", "input", "jit_compile", "params", "step_time_s",
    "step_times_s", "images_per_sec", "macs_per_image", "flops_per_sec", "matmul_fraction",
    "pipeline_vs_memory",
}  # fmt: skip


def _run(args, digits_root, tmp_path, capsys) -> tuple[dict, list[str]]:
    """The real command, in this process: its JSON report and the lines it printed."""
    output = tmp_path / "out" / "bench.json"
    main([*args, "--output", str(output), *path_overrides(digits_root, tmp_path)])
    return json.loads(output.read_text()), capsys.readouterr().out.splitlines()


def _check_timing(case: dict, steps: int) -> None:
    assert set(case) == CASE_FIELDS, set(case) ^ CASE_FIELDS
    assert len(case["step_times_s"]) == steps and all(t > 0 for t in case["step_times_s"])
    assert case["step_time_s"] == statistics.median(case["step_times_s"])
    assert case["images_per_sec"] * case["step_time_s"] == pytest.approx(case["batch_size"])


def test_cases_are_the_product_of_the_settings():
    settings = Settings(
        models=("resnet8", KERAS_REFERENCE), image_sizes=(8, 32), batch_sizes=(4, 16), inputs=("pipeline",)
    )
    cases = settings.cases()
    assert [c for c in cases if c.model == "resnet8"] == [
        Case("resnet8", size, batch, "pipeline") for size in (8, 32) for batch in (4, 16)
    ]
    # Keras refuses images under 32 px: its reference runs at 32, once.
    assert [c for c in cases if c.model == KERAS_REFERENCE] == [
        Case(KERAS_REFERENCE, 32, batch, "pipeline") for batch in (4, 16)
    ]


def test_training_steps_of_both_inputs_go_to_the_report_the_table_and_an_mlflow_run(
    digits_root, tmp_path, capsys
):
    report, lines = _run(
        ["--models", "resnet8", *TINY, "--input", "pipeline", "memory", "--mlflow"],
        digits_root,
        tmp_path,
        capsys,
    )
    assert set(report) == REPORT_FIELDS
    assert report["machine"]["gpus"] == [] and report["machine"]["replicas"] == 1
    assert report["precision"] == "float32" and report["flops_per_mac"] == 6
    ceiling = report["matmul_ceiling"]
    assert ceiling["dtype"] == "float32" and ceiling["flops_per_sec"] > 0 and ceiling["size"] >= 256
    pipeline, memory = report["cases"]
    assert (pipeline["input"], memory["input"]) == ("pipeline", "memory")
    for case in (pipeline, memory):
        _check_timing(case, steps=2)
        assert (case["model"], case["image_size"], case["batch_size"]) == ("resnet8", 8, 8)
        # The training step: trainer.jit_compile=auto leaves XLA off on a CPU, as in training.
        assert case["jit_compile"] is False and case["params"] > 0 and case["macs_per_image"] > 0
        assert case["flops_per_sec"] == pytest.approx(6 * case["macs_per_image"] * case["images_per_sec"])
        assert case["matmul_fraction"] == pytest.approx(case["flops_per_sec"] / ceiling["flops_per_sec"])
        assert 0 < case["matmul_fraction"] <= 1
    assert pipeline["pipeline_vs_memory"] == pytest.approx(
        pipeline["images_per_sec"] / memory["images_per_sec"]
    )
    assert memory["pipeline_vs_memory"] is None

    header, rule, *rows = lines[: lines.index("")]
    assert header.split(" | ")[:5] == ["| model", "px", "batch", "input", "XLA"]
    assert rule.count("---:") == 6
    assert [row.split(" | ")[:5] for row in rows] == [
        ["| resnet8", "8", "8", "pipeline", "off"], ["| resnet8", "8", "8", "memory", "off"],
    ]  # fmt: skip
    assert rows[0].endswith(f" | {pipeline['pipeline_vs_memory']:.3f} |")
    assert "dense float32 matmul ceiling" in lines[lines.index("") + 1]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("resnet-lab").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["resnet_lab.kind"] == "bench"
    assert run.data.params["settings.models"] == "resnet8"
    key = pipeline["key"]
    assert key == "resnet8_8px_b8_pipeline"
    assert run.data.metrics[f"{key}/images_per_sec"] == pytest.approx(pipeline["images_per_sec"])
    assert run.data.metrics[f"{key}/pipeline_vs_memory"] == pytest.approx(pipeline["pipeline_vs_memory"])
    assert f"{memory['key']}/pipeline_vs_memory" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"bench.json", "bench.md"}
    table = client.download_artifacts(run.info.run_id, "bench.md", str(tmp_path))
    assert open(table).read().splitlines()[2] == rows[0]


def test_pipeline_only_times_make_dataset_without_a_model(digits_root, tmp_path, capsys):
    report, lines = _run(
        ["--pipeline-only", "--image-size", "8", "16", "--batch-size", "16", "--steps", "3"],
        digits_root, tmp_path, capsys,
    )  # fmt: skip
    assert [(c["model"], c["image_size"], c["input"]) for c in report["cases"]] == [
        (None, 8, "pipeline"), (None, 16, "pipeline"),
    ]  # fmt: skip
    for case in report["cases"]:
        _check_timing(case, steps=3)
        assert case["jit_compile"] is case["macs_per_image"] is case["matmul_fraction"] is None
    assert lines[2].startswith("| (pipeline alone) | 8 | 16 | pipeline |  | ")


@pytest.mark.slow
def test_keras_resnet50_reference_in_this_process(digits_root, tmp_path, capsys):
    report, lines = _run(
        ["--models", KERAS_REFERENCE, *TINY, "--input", "memory"], digits_root, tmp_path, capsys
    )
    (case,) = report["cases"]
    _check_timing(case, steps=2)
    # At Keras's smallest size; its jit_compile="auto" is off on a CPU; ResNet-50's 25.6 M parameters less
    # the 1000-class head (digits: 1 channel, 10 classes).
    assert (case["model"], case["image_size"], case["jit_compile"]) == (KERAS_REFERENCE, 32, False)
    assert case["params"] == pytest.approx(23.5e6, rel=0.01)
    assert 0 < case["matmul_fraction"] <= 1
    assert lines[2].startswith(f"| {KERAS_REFERENCE} | 32 | 8 | memory | off | ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "resnet9"], "unknown model 'resnet9'; choose one of"),
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--batch-size", "eight"], "argument --batch-size: invalid int value: 'eight'"),
        (["--steps", "-1"], "--steps must be a positive integer, got -1"),
        (["--warmup-steps", "0"], "--warmup-steps must be a positive integer, got 0"),
        (["--input", "disk"], "unknown --input 'disk'; choose from ['pipeline', 'memory']"),
        (["--models", "resnet50", "--image-size", "16", "model.stem=imagenet"],
         "--image-size 16 is smaller than resnet50's total stride 32 with the imagenet stem"),
        (["trainer.precision=float64"], "unknown trainer.precision 'float64'"),
        (["nope.key=1"], "Could not override 'nope.key'."),
        (["paths.prepared_dir=/nonexistent"], "prepare digits first"),
        (["--mlflow", "tracking.uri=sqlite:////nonexistent/mlflow.db"], "directory '/nonexistent' does not"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line_and_exit_2(args, message, digits_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path_overrides(digits_root, tmp_path), *args, "--output", str(tmp_path / "bench.json")])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "bench.json").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(("setting", "enabled"), [(None, "True"), ("0", "False")])
def test_the_package_turns_on_tensorflows_onednn_cpu_kernels_unless_told_not_to(setting, enabled):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    probe = "import resnet_lab, tensorflow.python.util._pywrap_util_port as p; print(p.IsMklEnabled())"
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == enabled
