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
from resnet_lab.files import staged_files
from resnet_lab.report import (
    check_design,
    convergence,
    curves_by_model,
    curves_frame,
    member_record,
    model_table,
    parse_model_name,
    plot_confusion_matrix,
    plot_learning_curves,
    render_report,
    render_speed,
    render_table,
    verdict,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Mean final training errors in the shape of the paper's Fig. 4: plain34 above plain18, resnet34 at or below
# resnet18, resnet50 below resnet34.
FIG4_ERRORS = {"plain18": 0.10, "plain34": 0.15, "resnet18": 0.09, "resnet34": 0.07, "resnet50": 0.06}
CLAIMS = [
    {"key": "degradation", "subject": "plain34", "reference": "plain18", "hypothesis": "greater"},
    {"key": "residual_beats_plain", "subject": "resnet34", "reference": "plain34", "hypothesis": "less"},
    {"key": "residual_no_degradation", "subject": "resnet34", "reference": "resnet18",
     "hypothesis": "non_inferior"},
    {"key": "bottleneck_no_degradation", "subject": "resnet50", "reference": "resnet34",
     "hypothesis": "non_inferior"},
]  # fmt: skip


def _seeds(mean: float, count: int = 3, spread: float = 0.004) -> list[float]:
    return [mean + offset for offset in np.linspace(-spread, spread, count)] if count > 1 else [mean]


def _errors(count: int = 3, spread: float = 0.004, **means: float) -> dict[str, list[float]]:
    return {name: _seeds(mean, count, spread) for name, mean in (FIG4_ERRORS | means).items()}


def _by_outcome(result: dict) -> dict[str, str]:
    return {comparison["key"]: comparison["outcome"] for comparison in result["comparisons"]}


def test_parse_model_name_reads_family_and_depth():
    assert parse_model_name("plain34") == ("plain", 34)
    assert parse_model_name("resnet110") == ("residual", 110)
    with pytest.raises(ValueError, match="'vgg16'"):
        parse_model_name("vgg16")


def test_verdict_yes_when_every_claim_is_shown():
    result = verdict(_errors(), CLAIMS)

    assert result["answer"] == "yes"
    assert set(_by_outcome(result).values()) == {"shown"}
    degradation = result["comparisons"][0]
    assert degradation["models"] == ["plain34", "plain18"]
    assert degradation["difference"] == pytest.approx(0.05)
    assert result["degradation_difference"] == pytest.approx(0.05)
    assert result["residual_beats_plain_difference"] == pytest.approx(-0.08)
    assert degradation["ci95"][0] < 0.05 < degradation["ci95"][1]
    assert degradation["bound"] > 0 and result["degradation_shown"] is True
    assert result["text"].startswith("Yes:") and "one-sided Welch p" in result["text"]
    json.dumps(result)


def test_p_values_are_scipys_one_sided_welch_tests():
    from scipy import stats

    errors = {name: [e - 0.01, e + 0.002, e + 0.012] for name, e in FIG4_ERRORS.items()}
    result = verdict(errors, CLAIMS, alpha=0.05, margin=0.02)
    degradation, beats, no_degradation, _ = result["comparisons"]
    expected = stats.ttest_ind(errors["plain34"], errors["plain18"], equal_var=False, alternative="greater")
    assert degradation["p_value"] == pytest.approx(expected.pvalue)
    expected = stats.ttest_ind(errors["resnet34"], errors["plain34"], equal_var=False, alternative="less")
    assert beats["p_value"] == pytest.approx(expected.pvalue)
    # Non-inferiority: H0 d >= margin is the one-sided test of subject - margin against the reference.
    shifted = [e - 0.02 for e in errors["resnet34"]]
    expected = stats.ttest_ind(shifted, errors["resnet18"], equal_var=False, alternative="less")
    assert no_degradation["p_value"] == pytest.approx(expected.pvalue)
    # The decision follows the bound: shown exactly when the upper bound is below the margin.
    assert (no_degradation["bound"] < 0.02) == (no_degradation["p_value"] < 0.05)


def test_the_rank_test_is_scipys_mann_whitney_and_its_bound_agrees_with_it():
    from scipy import stats

    rng = np.random.default_rng(7)
    errors = {name: list(e + rng.exponential(0.01, 6)) for name, e in FIG4_ERRORS.items()}
    result = verdict(errors, CLAIMS, alpha=0.025, margin=0.02, test="rank")
    degradation, beats, no_degradation, _ = result["comparisons"]
    expected = stats.mannwhitneyu(errors["plain34"], errors["plain18"], alternative="greater", method="exact")
    assert degradation["p_value"] == pytest.approx(expected.pvalue)
    shifted = np.subtract(errors["resnet34"], 0.02)
    expected = stats.mannwhitneyu(shifted, errors["resnet18"], alternative="less", method="exact")
    assert no_degradation["p_value"] == pytest.approx(expected.pvalue)
    # The Hodges-Lehmann shift is the median of the 36 pairwise differences.
    pairwise = np.subtract.outer(errors["resnet34"], errors["plain34"])
    assert beats["difference"] == pytest.approx(np.median(pairwise))
    assert "one-sided Mann-Whitney p" in beats["reason"]
    # Moses's bound and the exact p decide alike, for samples that overlap by every amount.
    for shift in np.linspace(-0.02, 0.03, 11):
        subject = list(rng.normal(0.1 + shift, 0.01, 6))
        reference = list(rng.normal(0.1, 0.01, 6))
        claim = verdict({"a": subject, "b": reference}, [CLAIMS[0] | {"subject": "a", "reference": "b"}],
                        alpha=0.025, test="rank")["comparisons"][0]  # fmt: skip
        assert (claim["bound"] > 0) == (claim["p_value"] < 0.025)


def test_the_rank_test_shows_a_skewed_gap_welch_misses_and_still_says_no():
    # Every plain34 seed above every plain18 seed, one far above the rest: the shape of plain34's errors.
    errors = _errors(count=6, spread=0.001) | {"plain34": [0.102, 0.103, 0.104, 0.105, 0.106, 0.60]}
    welch_result = verdict(errors, CLAIMS, alpha=0.025)
    rank_result = verdict(errors, CLAIMS, alpha=0.025, test="rank")
    assert _by_outcome(welch_result)["degradation"] == "not shown"
    assert _by_outcome(rank_result)["degradation"] == "shown"
    assert rank_result["degradation_p_value"] == pytest.approx(1 / 924)  # 6 of 12: the one extreme split
    # The same test contradicts the claims when the data say the opposite, with significance.
    assert verdict(_errors(count=6, resnet34=0.20), CLAIMS, alpha=0.025, test="rank")["answer"] == "no"
    tight = verdict(_errors(count=6, plain34=0.1001), CLAIMS, alpha=0.025, test="rank")
    assert _by_outcome(tight)["degradation"] == "not shown" and tight["answer"] == "inconclusive"


def test_a_claim_whose_test_cannot_reach_alpha_is_untested():
    # Three seeds a model: 20 splits, so no rank test gets below p = 0.05, whatever the errors.
    result = verdict(_errors(count=3, spread=0.001), CLAIMS, alpha=0.025, test="rank")
    assert set(_by_outcome(result).values()) == {"untested"} and result["answer"] == "inconclusive"
    assert "Mann-Whitney test's p is at least 0.05, not below alpha 0.025" in result["text"]
    assert verdict(_errors(count=4, spread=0.001), CLAIMS, alpha=0.025, test="rank")["answer"] == "yes"


def test_verdict_no_when_a_claim_is_contradicted_with_significance():
    # resnet34 clearly above plain34: the claim that it ends lower is contradicted, not merely not shown.
    result = verdict(_errors(resnet34=0.20), CLAIMS)

    assert result["answer"] == "no"
    assert _by_outcome(result)["residual_beats_plain"] == "contradicted"
    assert result["text"].startswith("No: residual_beats_plain is contradicted")


def test_verdict_no_when_the_deeper_residual_net_is_worse_by_more_than_the_margin():
    result = verdict(_errors(resnet34=0.12), CLAIMS, margin=0.01)

    assert result["answer"] == "no"
    assert _by_outcome(result)["residual_no_degradation"] == "contradicted"


def test_verdict_inconclusive_when_the_plain_nets_do_not_clearly_degrade():
    result = verdict(_errors(plain34=0.101, spread=0.01), CLAIMS)

    assert result["answer"] == "inconclusive"
    assert _by_outcome(result)["degradation"] == "not shown"
    assert result["text"].startswith("Inconclusive: degradation is not shown")


def test_noise_and_fewer_seeds_never_make_yes_easier():
    """The old rule passed "no worse" on an insignificant difference; non-inferiority needs a tight bound."""
    # resnet34 0.5 points above resnet18: within the 1-point margin when the seeds agree...
    assert verdict(_errors(resnet34=0.095, resnet50=0.09, spread=0.002), CLAIMS)["answer"] == "yes"
    # ...not when they scatter: the bound then reaches past the margin, and nothing is shown.
    noisy = verdict(_errors(resnet34=0.095, resnet50=0.09, spread=0.03), CLAIMS)
    assert _by_outcome(noisy)["residual_no_degradation"] == "not shown"
    assert noisy["answer"] == "inconclusive"
    # Below three seeds no claim is tested, whatever the means say.
    few = verdict(_errors(count=2), CLAIMS)
    assert set(_by_outcome(few).values()) == {"untested"} and few["answer"] == "inconclusive"
    assert all(c["p_value"] is None for c in few["comparisons"])


def test_errors_without_spread_decide_by_the_difference_alone():
    errors = {name: [error] * 3 for name, error in FIG4_ERRORS.items()}
    result = verdict(errors, CLAIMS)
    assert result["answer"] == "yes"
    assert {c["p_value"] for c in result["comparisons"]} == {0.0}
    level = verdict(errors | {"plain34": [0.10] * 3}, CLAIMS)
    assert _by_outcome(level)["degradation"] == "not shown" and level["answer"] == "inconclusive"


def test_verdict_names_a_model_without_results():
    errors = {name: values for name, values in _errors().items() if name != "resnet50"}
    result = verdict(errors, CLAIMS)

    assert result["answer"] == "inconclusive"
    assert _by_outcome(result)["bottleneck_no_degradation"] == "missing"
    assert "no results for resnet50" in result["text"]


def test_check_design_rejects_an_untestable_study():
    models = list(FIG4_ERRORS)
    check_design(models, CLAIMS, alpha=0.05, margin=0.01)
    with pytest.raises(ValueError, match=r"\['resnet50'\] take part in no claim"):
        check_design(models, CLAIMS[:3], alpha=0.05, margin=0.01)
    with pytest.raises(ValueError, match="subject 'plain56' is not in study.models"):
        check_design(
            models, [*CLAIMS, CLAIMS[0] | {"key": "x", "subject": "plain56"}], alpha=0.05, margin=0.01
        )
    with pytest.raises(ValueError, match="study.claims.x: subject and reference are both 'plain34'"):
        check_design(
            models, [*CLAIMS, CLAIMS[0] | {"key": "x", "reference": "plain34"}], alpha=0.05, margin=0.01
        )
    with pytest.raises(ValueError, match="unknown hypothesis 'higher'"):
        check_design(models, [CLAIMS[0] | {"hypothesis": "higher"}, *CLAIMS[1:]], alpha=0.05, margin=0.01)
    with pytest.raises(ValueError, match="study.alpha must be in"):
        check_design(models, CLAIMS, alpha=0.5, margin=0.01)


def test_convergence_marks_a_net_still_falling():
    rows = []
    for seed in (0, 1):
        for epoch in range(1, 11):
            rows.append(
                {"model": "plain18", "seed": seed, "epoch": epoch, "train_error": 0.01, "val_error": 0.02}
            )
            still = 0.3 - 0.02 * epoch  # two points an epoch
            rows.append(
                {"model": "plain34", "seed": seed, "epoch": epoch, "train_error": still, "val_error": 0.3}
            )
    slopes = convergence(pd.DataFrame(rows), window=5, max_decrease=0.001, threshold=0.15)

    assert slopes["plain18"]["slope"] == pytest.approx(0.0)
    assert (slopes["plain18"]["epochs"], slopes["plain18"]["converged"]) == (5, True)
    assert slopes["plain34"]["slope"] == pytest.approx(-0.02)
    assert slopes["plain34"]["converged"] is False
    # 0.3 - 0.02 * epoch first falls below 0.15 at epoch 8; plain18 starts below it.
    assert slopes["plain18"]["epochs_to_threshold"] == {0: 1, 1: 1}
    assert slopes["plain34"]["epochs_to_threshold"] == {0: 8, 1: 8}
    assert (
        render_speed(slopes)
        == "Epochs until the running training error first fell below 15%: plain18 1; plain34 8."
    )


def test_the_speed_sentence_names_the_seeds_that_never_reached_the_threshold():
    slopes = {
        "plain20": {"threshold": 0.01, "epochs_to_threshold": {20: 26, 21: 22, 22: 28}},
        "plain56": {"threshold": 0.01, "epochs_to_threshold": {20: 134, 21: None, 22: None}},
        "plain110": {"threshold": 0.01, "epochs_to_threshold": {20: None}},
    }

    assert render_speed(slopes) == (
        "Epochs until the running training error first fell below 1%: "
        "plain20 22-28; plain56 134 (2 seeds never); plain110 never."
    )


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
            _summary("plain18", seed, _history(0.1 + 0.02 * seed)),
            {"train_error": 0.05 + 0.02 * seed, "test_error": 0.2 + 0.02 * seed},
        )
        for seed in (0, 1)
    ]
    records.append(member_record(_summary("resnet18", 0, _history(0.05))))
    table = model_table(records)

    plain = table.set_index("model").loc["plain18"]
    assert plain["seeds"] == 2
    assert plain["train_error_mean"] == pytest.approx(0.06)
    assert plain["running_train_error_mean"] == pytest.approx(0.11)
    assert plain["test_error_mean"] == pytest.approx(0.21)
    assert plain["test_error_std"] == pytest.approx(np.std([0.2, 0.22], ddof=1))
    slopes = {"plain18": {"slope": -0.002, "epochs": 5, "converged": False}}
    markdown = render_table(table, slopes)
    assert (
        "| plain18 | 2 | 18.00k | 36.00M | 6.00 ± 1.41 | 11.00 ± 1.41 | -0.200 (still falling) |" in markdown
    )
    assert "| resnet18 | 1 |" in markdown and "n/a" in markdown
    with pytest.raises(ValueError, match="lacks key 'macs'"):
        member_record({k: v for k, v in _summary("plain18", 0, _history(0.1)).items() if k != "macs"})


def test_report_markdown_puts_the_design_first_then_verdict_table_and_figure():
    result = verdict(_errors(), CLAIMS)
    records = [
        member_record(_summary(name, 0, _history(error)), {"train_error": error, "test_error": error})
        for name, error in FIG4_ERRORS.items()
    ]
    design = {
        "data": {"name": "digits", "image_size": 16, "pad_crop": 2, "horizontal_flip": False},
        "models": list(FIG4_ERRORS),
        "seeds": [0, 1, 2],
        "model": {
            "stem": "cifar", "width": 16, "shortcut": "A", "zero_init_residual": False, "bn_momentum": 0.9,
        },
        "optimizer": {
            "name": "sgd", "learning_rate": 0.1, "reference_batch_size": 128,
            "effective_learning_rate": 0.025,
            "momentum": 0.9, "weight_decay": 1e-4,
        },
        "schedule": {"name": "step", "warmup_epochs": 0},
        "trainer": {"epochs": 30, "batch_size": 32},
        "steps": "1,080",
        "alpha": 0.05,
        "margin": 0.01,
        "convergence": {"window": 5, "max_decrease": 0.001},
        "params": {"plain18": 100, "resnet18": 100, "plain34": 200, "resnet34": 201},
    }  # fmt: skip
    slopes = {
        name: {"slope": 0.0, "epochs": 4, "converged": True, "threshold": 0.01, "epochs_to_threshold": {0: 3}}
        for name in FIG4_ERRORS
    }
    markdown = render_report(
        result,
        render_table(model_table(records), slopes),
        "learning_curves.png",
        design=design,
        slopes=slopes,
    )

    assert markdown.startswith("# Degradation study on digits")
    assert (
        markdown.index("## Design")
        < markdown.index("## Verdict: Yes")
        < markdown.index("## Models")
        < markdown.index("## Learning curves")
    )
    assert "learning rate 0.025 (0.1 for a batch of 128, scaled linearly to the batch of 32)" in markdown
    assert "plain18 / resnet18: 100 / 100 parameters (equal)" in markdown
    assert "plain34 / resnet34: 200 / 201 parameters (UNEQUAL)" in markdown
    assert "1,080 SGD steps" in markdown
    assert result["text"] in markdown
    assert (
        "| degradation: plain34 ends with higher training error than plain18 | Welch, H1: d > 0 |" in markdown
    )
    assert all(f"| {name} |" in markdown for name in FIG4_ERRORS)
    assert "![" in markdown and "](learning_curves.png)" in markdown
    assert "Every net's training error had flattened" in markdown
    assert "Epochs until the running training error first fell below 1%: plain18 3; plain34 3;" in markdown


def test_staged_files_leave_the_target_alone_on_error(tmp_path):
    target = tmp_path / "reports"
    with staged_files(target) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), staged_files(target) as staging:
        (staging / "a.txt").write_text("second")
        raise RuntimeError("boom")

    assert (target / "a.txt").read_text() == "first"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["reports"]


STUDY_MODELS = list(FIG4_ERRORS)
STUDY_SEEDS = [0, 1, 2, 3]


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
    cfg.study.claims = CLAIMS
    # MLflow puts a new experiment's artifacts under ./mlruns.
    monkeypatch.chdir(tmp_path)
    for model in STUDY_MODELS:
        for seed in STUDY_SEEDS:
            history = _history(FIG4_ERRORS[model] + 0.003 * seed)
            run_path = tmp_path / "models" / f"{model}-{seed}"
            run_path.mkdir(parents=True)
            history.to_csv(run_path / "history.csv", index=False)
            summary = _summary(model, seed, history, run_id=f"run-{model}-{seed}") | {"steps": 120}
            (run_path / "summary.json").write_text(json.dumps(summary))
            (tmp_path / "metrics").mkdir(exist_ok=True)
            test_error = summary["final"]["val_error"] + 0.01
            evaluation = {"train_error": FIG4_ERRORS[model] - 0.01 + 0.002 * seed, "test_error": test_error}
            (tmp_path / "metrics" / f"{model}-{seed}.json").write_text(json.dumps(evaluation))
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
        "final_errors.png",
        "learning_curves.png",
        "verdict.json",
    ]
    written = json.loads((reports / "verdict.json").read_text())
    assert written["answer"] == "yes" and written["degradation_shown"] is True
    assert set(written["convergence"]) == set(STUDY_MODELS)
    assert written["degradation_p_value"] < 0.05
    assert written["study"] == {"dataset": "digits", "models": STUDY_MODELS, "seeds": STUDY_SEEDS}
    curves = pd.read_csv(reports / "curves.csv")
    assert list(curves.columns) == ["model", "seed", "epoch", "train_error", "val_error"]
    assert len(curves) == len(STUDY_MODELS) * len(STUDY_SEEDS) * 4
    markdown = (reports / "degradation.md").read_text()
    assert "## Verdict: Yes" in markdown and "](learning_curves.png)" in markdown
    assert "360 SGD steps" not in markdown and "120 SGD steps" in markdown
    assert (reports / "learning_curves.png").read_bytes()[:8] == PNG_SIGNATURE
    # The errors the tests compared, seed by seed: plain34 ends at 0.15 - 0.01 + 0.002 * seed.
    assert "| Model | seed 0 | seed 1 | seed 2 | seed 3 |" in markdown
    assert "| plain34 | 14.00% | 14.20% | 14.40% | 14.60% |" in markdown
    assert "](final_errors.png)" in markdown
    assert (reports / "final_errors.png").read_bytes()[:8] == PNG_SIGNATURE
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
    # The endpoint is the evaluation's clean training error (0.14 + 0.002 * seed), not the running one.
    assert run.data.metrics["train_error_plain34"] == pytest.approx(0.14 + 0.002 * np.mean(STUDY_SEEDS))
    assert run.data.params["study.models"] == ",".join(STUDY_MODELS)
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/degradation.md", "report/verdict.json", "report/learning_curves.png"} <= artifacts


def test_compare_names_the_missing_member(study_cfg, tmp_path):
    (tmp_path / "models" / "plain34-1" / "history.csv").unlink()
    (tmp_path / "metrics" / "resnet18-2.json").unlink()

    with pytest.raises(ConfigError, match="plain34 seed 1 .*train@plain34-1.*resnet18 seed 2 .*run evaluate"):
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

    (tmp_path / "metrics" / "plain18-0.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(params)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: study members not ready: plain18 seed 0")


def test_compare_refuses_a_model_in_no_claim(study_cfg, tmp_path):
    study_cfg.study.claims = CLAIMS[:3]
    with pytest.raises(ConfigError, match=r"\['resnet50'\] take part in no claim"):
        compare(study_cfg)
    assert not (tmp_path / "reports").exists()


def test_compare_ends_killed_a_study_run_whose_compare_was_killed(study_cfg):
    import os
    import socket
    import subprocess
    import sys

    client = MlflowClient(tracking_uri=str(study_cfg.tracking.uri))
    experiment = client.create_experiment("test-study")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    runs = {}
    for name, pid in (("orphan", gone.stdout.strip()), ("live", str(os.getpid()))):
        tags = {"resnet_lab.kind": "study", "resnet_lab.host": socket.gethostname(), "resnet_lab.pid": pid}
        runs[name] = client.create_run(experiment, run_name=name, tags=tags).info.run_id

    compare(study_cfg)

    assert client.get_run(runs["orphan"]).info.status == "KILLED"
    assert client.get_run(runs["live"]).info.status == "RUNNING"  # another compare, still at work


def test_the_best_residual_net_is_registered_as_champion_once(tiny_cfg, tmp_path, monkeypatch):
    import mlflow

    from resnet_lab.tracking import open_run, register_champion
    from resnet_lab.train import train

    cfg = tiny_cfg("tracking.log_model=true")
    trained = train(cfg)
    summary = json.loads((tmp_path / "models" / "resnet8-0" / "summary.json").read_text())
    members = [
        {"member": "resnet8-0", "summary": summary, "evaluation": {"test_error": 0.5}},
        {"member": "plain8-0", "summary": {"family": "plain"}, "evaluation": {"test_error": 0.1}},
    ]
    for answer in ("yes", "inconclusive"):  # a rerun of the study finds the same version
        with open_run(cfg, "study", "study-digits") as run:
            assert register_champion(run, cfg, members, answer) == "1"

    client = MlflowClient(tracking_uri=str(cfg.tracking.uri))
    version = client.get_model_version_by_alias("resnet-lab-digits", "champion")
    assert version.run_id == trained["mlflow_run_id"]
    assert version.tags["verdict"] == "inconclusive" and version.tags["member"] == "resnet8-0"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(cfg.tracking.uri))
    model = mlflow.pyfunc.load_model("models:/resnet-lab-digits@champion")
    assert np.asarray(model.predict(np.zeros((2, 8, 8, 1), dtype="float32"))).shape == (2, 10)
