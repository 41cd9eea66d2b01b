"""The degradation report: the verdict on curves whose answer is known, the table, the figures, and the
compare stage end to end on fabricated run directories with a real SQLite MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from resnet_lab.compare import compare, main
from resnet_lab.config import compose
from resnet_lab.errors import ConfigError
from resnet_lab.report import (
    curves_by_model,
    curves_frame,
    member_record,
    model_table,
    parse_model_name,
    plot_confusion_matrix,
    plot_learning_curves,
    render_report,
    render_table,
    staged_files,
    verdict,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Final training errors in the shape of the paper's Fig. 4: plain34 above plain18, resnet34 below both.
FIG4_ERRORS = {"plain18": 0.10, "plain34": 0.15, "resnet18": 0.09, "resnet34": 0.07}


def _seeds(mean: float, count: int) -> list[float]:
    return [mean + offset for offset in np.linspace(-0.004, 0.004, count)] if count > 1 else [mean]


def _by_outcome(result: dict) -> dict[str, str]:
    return {comparison["key"]: comparison["outcome"] for comparison in result["comparisons"]}


def test_parse_model_name_reads_family_and_depth():
    assert parse_model_name("plain34") == ("plain", 34)
    assert parse_model_name("resnet110") == ("residual", 110)
    with pytest.raises(ValueError, match="'vgg16'"):
        parse_model_name("vgg16")


def test_verdict_yes_when_plain_degrades_and_residual_does_not():
    result = verdict({name: [error] for name, error in FIG4_ERRORS.items()})

    assert result["answer"] == "yes"
    assert result["degradation_shown"] is True and result["prevented"] is True
    assert (result["shallow_depth"], result["deep_depth"]) == (18, 34)
    assert _by_outcome(result) == {
        "degradation": "shown",
        "residual_beats_plain": "shown",
        "residual_no_degradation": "shown",
    }
    degradation = result["comparisons"][0]
    assert degradation["models"] == ["plain34", "plain18"]
    assert degradation["difference"] == pytest.approx(0.05)
    assert result["degradation_difference"] == pytest.approx(0.05)
    assert result["residual_beats_plain_difference"] == pytest.approx(-0.08)
    assert result["residual_no_degradation_difference"] == pytest.approx(-0.02)
    # One seed per model: no significance test.
    assert all(comparison["p_value"] is None for comparison in result["comparisons"])
    assert "15.00%" in result["text"] and "10.00%" in result["text"]
    json.dumps(result)


def test_verdict_carries_welch_p_values_with_three_seeds():
    result = verdict({name: _seeds(error, 3) for name, error in FIG4_ERRORS.items()})

    assert result["answer"] == "yes"
    for comparison in result["comparisons"]:
        assert 0.0 <= comparison["p_value"] < 0.01
        assert comparison["seeds"] == dict.fromkeys(comparison["models"], 3)
    assert result["degradation_p_value"] == result["comparisons"][0]["p_value"]
    assert "p = " in result["text"]


def test_verdict_no_p_value_when_one_side_has_fewer_than_three_seeds():
    errors = {name: _seeds(error, 3) for name, error in FIG4_ERRORS.items()} | {"plain18": [0.10]}
    result = verdict(errors)

    degradation, beats_plain, _ = result["comparisons"]
    assert degradation["p_value"] is None
    assert beats_plain["p_value"] is not None


def test_verdict_inconclusive_when_plain_nets_do_not_degrade():
    result = verdict({name: [error] for name, error in (FIG4_ERRORS | {"plain34": 0.08}).items()})

    assert result["answer"] == "inconclusive"
    assert result["degradation_shown"] is False
    assert _by_outcome(result)["degradation"] == "not shown"
    assert "did not degrade" in result["text"]


def test_verdict_no_when_residual_ends_above_the_equally_deep_plain_net():
    result = verdict({name: [error] for name, error in (FIG4_ERRORS | {"resnet34": 0.16}).items()})

    assert result["answer"] == "no"
    assert result["degradation_shown"] is True and result["prevented"] is False
    assert _by_outcome(result)["residual_beats_plain"] == "not shown"
    assert result["text"].startswith("No:")


def test_no_worse_allows_the_tolerance_and_an_insignificant_difference():
    slightly_worse = FIG4_ERRORS | {"resnet34": 0.095}  # 0.5 points above resnet18
    assert verdict({n: [e] for n, e in slightly_worse.items()})["answer"] == "no"
    assert verdict({n: [e] for n, e in slightly_worse.items()}, tolerance=0.01)["answer"] == "yes"
    assert verdict({n: [e] for n, e in slightly_worse.items()}, tolerance=0.004)["answer"] == "no"
    # With seeds that overlap, Welch's test finds no significant difference: no worse.
    noisy = {n: [e - 0.03, e, e + 0.03] for n, e in slightly_worse.items()}
    result = verdict(noisy)
    assert result["residual_no_degradation_p_value"] > 0.05 and result["answer"] == "yes"


def test_verdict_no_when_deeper_residual_ends_above_shallower_residual():
    result = verdict({name: [error] for name, error in (FIG4_ERRORS | {"resnet34": 0.12}).items()})

    assert result["answer"] == "no"
    assert _by_outcome(result) == {
        "degradation": "shown",
        "residual_beats_plain": "shown",
        "residual_no_degradation": "not shown",
    }


def test_verdict_counts_equal_residual_errors_as_no_worse():
    result = verdict({name: [error] for name, error in (FIG4_ERRORS | {"resnet34": 0.09}).items()})

    assert result["answer"] == "yes"


def test_verdict_inconclusive_and_names_the_missing_model():
    errors = {name: [error] for name, error in FIG4_ERRORS.items() if name != "resnet34"}
    result = verdict(errors | {"resnet50": [0.05]})

    assert result["answer"] == "inconclusive"
    assert all(comparison["outcome"] != "shown" for comparison in result["comparisons"][1:])
    assert "resnet34" in result["text"]
    assert result["models_not_compared"] == ["resnet50"]


def test_verdict_inconclusive_with_a_single_depth():
    result = verdict({"plain18": [0.1], "resnet18": [0.09]})

    assert result["answer"] == "inconclusive"
    assert result["deep_depth"] is None
    assert {comparison["outcome"] for comparison in result["comparisons"]} == {"missing"}


def test_verdict_p_value_none_when_errors_do_not_vary():
    result = verdict({name: [error] * 3 for name, error in FIG4_ERRORS.items()} | {"resnet18": [0.07] * 3})

    assert result["comparisons"][2]["p_value"] is None
    assert result["comparisons"][2]["outcome"] == "shown"


def _history(final_error: float, epochs: int = 4) -> pd.DataFrame:
    """A learning curve that falls to `final_error`, the validation error a little above it."""
    train_error = np.linspace(0.6, final_error, epochs)
    return pd.DataFrame(
        {
            "epoch": np.arange(1, epochs + 1),
            "loss": 2 * train_error,
            "accuracy": 1 - train_error,
            "error": train_error,
            "val_loss": 2 * train_error + 0.1,
            "val_accuracy": 1 - train_error - 0.02,
            "val_error": train_error + 0.02,
            "learning_rate": 0.1,
            "epoch_time": 1.5,
            "images_per_sec": 900.0,
        }
    )


def _summary(model: str, seed: int, history: pd.DataFrame, run_id: str = "") -> dict:
    family, depth = parse_model_name(model)
    last = history.iloc[-1]
    return {
        "model": model,
        "seed": seed,
        "family": family,
        "depth": depth,
        "params": 1000 * depth,
        "macs": 2_000_000 * depth,
        "epochs": len(history),
        "train_time_s": 6.0 + seed,
        "images_per_sec": 900.0,
        "final": {key: float(last[key]) for key in ("error", "val_error", "loss", "val_loss")},
        "best": {"error": float(history["error"].min()), "val_error": float(history["val_error"].min())},
        "mlflow_run_id": run_id,
        "dataset": "digits",
    }


def test_curves_frame_and_wide_table():
    curves = curves_frame(
        {("plain18", 0): _history(0.1), ("plain18", 1): _history(0.2), ("resnet18", 0): _history(0.05)}
    )

    assert list(curves.columns) == ["model", "seed", "epoch", "train_error", "val_error"]
    assert len(curves) == 12
    wide = curves_by_model(curves)
    assert list(wide.columns) == [
        "epoch",
        "plain18_train_error",
        "plain18_val_error",
        "resnet18_train_error",
        "resnet18_val_error",
    ]
    assert wide["plain18_train_error"].iloc[-1] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="plain18 seed 0 lacks columns \\['val_error'\\]"):
        curves_frame({("plain18", 0): _history(0.1).drop(columns="val_error")})


def test_learning_curves_figure_is_a_png(tmp_path):
    histories = {
        (model, seed): _history(error + 0.01 * seed)
        for model, error in FIG4_ERRORS.items()
        for seed in (0, 1)
    }
    path = plot_learning_curves(curves_frame(histories), tmp_path / "curves.png", title="digits")

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    from matplotlib.image import imread

    height, width, _ = imread(path).shape
    assert width > height > 200


def test_confusion_figure_is_a_png(tmp_path):
    path = plot_confusion_matrix([[3, 1], [0, 2]], ["cat", "dog"], tmp_path / "confusion.png", title="t")

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match=r"\(2, 2\) does not fit 3 classes"):
        plot_confusion_matrix([[3, 1], [0, 2]], ["a", "b", "c"], tmp_path / "bad.png")


def test_model_table_aggregates_seeds():
    records = [
        member_record(
            _summary("plain18", seed, _history(0.1 + 0.02 * seed)), {"test_error": 0.2 + 0.02 * seed}
        )
        for seed in (0, 1)
    ]
    records.append(member_record(_summary("resnet18", 0, _history(0.05))))
    table = model_table(records)

    plain = table.set_index("model").loc["plain18"]
    assert plain["seeds"] == 2
    assert plain["final_train_error_mean"] == pytest.approx(0.11)
    assert plain["test_error_mean"] == pytest.approx(0.21)
    assert plain["test_error_std"] == pytest.approx(np.std([0.2, 0.22], ddof=1))
    markdown = render_table(table)
    assert "| plain18 | plain | 18 | 2 | 18.00k | 36.00M | 11.00 ± 1.41 |" in markdown
    assert "| resnet18 | residual | 18 | 1 |" in markdown and "n/a" in markdown
    with pytest.raises(ValueError, match="lacks key 'macs'"):
        member_record({k: v for k, v in _summary("plain18", 0, _history(0.1)).items() if k != "macs"})


def test_report_markdown_puts_the_verdict_first_then_table_and_figure():
    result = verdict({name: [error] for name, error in FIG4_ERRORS.items()})
    records = [
        member_record(_summary(name, 0, _history(error)), {"test_error": error})
        for name, error in FIG4_ERRORS.items()
    ]
    markdown = render_report(
        result,
        render_table(model_table(records)),
        "learning_curves.png",
        dataset="digits",
        models=list(FIG4_ERRORS),
        seeds=[0],
    )

    assert markdown.startswith("# Degradation study on digits")
    assert (
        markdown.index("## Verdict: Yes") < markdown.index("## Models") < markdown.index("## Learning curves")
    )
    assert result["text"] in markdown
    assert "| Model | Family | Depth |" in markdown
    assert all(f"| {name} |" in markdown for name in FIG4_ERRORS)
    assert "![" in markdown and "](learning_curves.png)" in markdown
    assert "## How this was computed" in markdown


def test_staged_files_leave_the_target_alone_on_error(tmp_path):
    target = tmp_path / "reports"
    with staged_files(target) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), staged_files(target) as staging:
        (staging / "a.txt").write_text("second")
        raise RuntimeError("boom")

    assert (target / "a.txt").read_text() == "first"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["reports"]


STUDY_MODELS = ["plain18", "plain34", "resnet18", "resnet34"]
STUDY_SEEDS = [0, 1, 2]


@pytest.fixture
def study_cfg(tmp_path, monkeypatch):
    """Fabricated, trained and evaluated study members, in the layout training and evaluation write."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose(
        [
            f"paths.models_dir={tmp_path}/models",
            f"paths.metrics_dir={tmp_path}/metrics",
            f"paths.reports_dir={tmp_path}/reports",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "tracking.experiment_name=test-study",
            f"study.models=[{','.join(STUDY_MODELS)}]",
            f"study.seeds=[{','.join(map(str, STUDY_SEEDS))}]",
        ]
    )
    # MLflow puts a new experiment's artifacts under ./mlruns.
    monkeypatch.chdir(tmp_path)
    for model in STUDY_MODELS:
        for seed in STUDY_SEEDS:
            history = _history(FIG4_ERRORS[model] + 0.003 * seed)
            run_path = tmp_path / "models" / f"{model}-{seed}"
            run_path.mkdir(parents=True)
            history.to_csv(run_path / "history.csv", index=False)
            summary = _summary(model, seed, history, run_id=f"run-{model}-{seed}")
            (run_path / "summary.json").write_text(json.dumps(summary))
            metrics_path = tmp_path / "metrics" / f"{model}-{seed}"
            metrics_path.mkdir(parents=True)
            test_error = summary["final"]["val_error"] + 0.01
            (metrics_path / "test.json").write_text(
                json.dumps({"test_loss": 0.3, "test_accuracy": 1 - test_error, "test_error": test_error})
            )
    return cfg


def _study_runs(cfg):
    client = MlflowClient(tracking_uri=str(cfg.tracking.uri))
    experiment = client.get_experiment_by_name("test-study")
    return client, client.search_runs([experiment.experiment_id], "tags.`resnet_lab.kind` = 'study'")


def test_compare_end_to_end(study_cfg, tmp_path):
    result = compare(study_cfg)

    assert result["answer"] == "yes"
    reports = tmp_path / "reports"
    assert sorted(path.name for path in reports.iterdir()) == [
        "curves.csv",
        "curves_by_model.csv",
        "degradation.md",
        "learning_curves.png",
        "verdict.json",
    ]
    written = json.loads((reports / "verdict.json").read_text())
    assert written["answer"] == "yes" and written["degradation_shown"] is True
    assert written["degradation_p_value"] < 0.05
    assert written["study"] == {"dataset": "digits", "models": STUDY_MODELS, "seeds": STUDY_SEEDS}
    curves = pd.read_csv(reports / "curves.csv")
    assert list(curves.columns) == ["model", "seed", "epoch", "train_error", "val_error"]
    assert len(curves) == len(STUDY_MODELS) * len(STUDY_SEEDS) * 4
    markdown = (reports / "degradation.md").read_text()
    assert "## Verdict: Yes" in markdown and "](learning_curves.png)" in markdown
    assert (reports / "learning_curves.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]

    client, runs = _study_runs(study_cfg)
    assert [run.info.run_id for run in runs] == [result["mlflow_run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "study-digits"
    assert run.data.tags["resnet_lab.answer"] == "yes"
    assert run.data.tags["resnet_lab.member.plain34-2"] == "run-plain34-2"
    assert run.data.metrics["degradation_shown"] == 1.0
    assert run.data.metrics["degradation_difference"] == pytest.approx(result["degradation_difference"])
    assert run.data.metrics["final_train_error_plain34"] == pytest.approx(0.153)
    assert run.data.params["study.models"] == ",".join(STUDY_MODELS)
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/degradation.md", "report/verdict.json", "report/learning_curves.png"} <= artifacts


def test_compare_names_the_missing_member(study_cfg, tmp_path):
    (tmp_path / "models" / "plain34-1" / "history.csv").unlink()
    (tmp_path / "metrics" / "resnet18-2" / "test.json").unlink()

    with pytest.raises(
        ConfigError, match="plain34 seed 1 .*train@plain34-1.*resnet18 seed 2 .*evaluate@resnet18-2"
    ):
        compare(study_cfg)
    assert not (tmp_path / "reports").exists()


def test_compare_marks_the_study_run_failed_and_keeps_old_reports(study_cfg, tmp_path, monkeypatch):
    compare(study_cfg)
    before = (tmp_path / "reports" / "verdict.json").read_text()

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr("resnet_lab.compare.plot_learning_curves", broken_plot)
    with pytest.raises(RuntimeError, match="plotting failed"):
        compare(study_cfg)

    assert (tmp_path / "reports" / "verdict.json").read_text() == before
    _, runs = _study_runs(study_cfg)
    assert sorted(run.info.status for run in runs) == ["FAILED", "FINISHED"]


def test_compare_command_line(study_cfg, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    OmegaConf.save(study_cfg, params)
    main(["--params", str(params)])
    assert capsys.readouterr().out.startswith("Yes:")

    (tmp_path / "metrics" / "plain18-0" / "test.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(params)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: study members not ready: plain18 seed 0")
