"""The degradation report's pure parts: the verdict, the per-model table, the figures, and atomic output.

The question is the one of He et al. 2015 (arXiv:1512.03385), Sec. 4.1 and Fig. 4: does a deeper plain
net end with higher *training* error than a shallower one (the degradation problem, which is not
overfitting), and does the residual net of the same depth avoid it? Every sentence the report states is
computed here from the numbers it is given; nothing is a conclusion written in advance.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

FAMILIES = {"plain": "plain", "resnet": "residual"}
_MODEL_NAME = re.compile(r"^(plain|resnet)(\d+)$")

# Welch's t-test needs a variance estimate from each side; below three seeds it is too unstable to report.
MIN_SEEDS_FOR_TEST = 3
# "No worse" fails only on a difference that Welch's test finds significant at this level.
ALPHA = 0.05

SHOWN = "shown"
NOT_SHOWN = "not shown"
MISSING = "missing"

# (key, claim) of the three comparisons `verdict` makes, in the order it makes them.
_CLAIMS = (
    ("degradation", "the deeper plain net ends with higher training error than the shallower plain net"),
    ("residual_beats_plain", "the residual net ends below the equally deep plain net in training error"),
    ("residual_no_degradation", "the deeper residual net ends no higher than the shallower residual net"),
)

CURVE_COLUMNS = ("model", "seed", "epoch", "train_error", "val_error")
HISTORY_COLUMNS = ("epoch", "error", "val_error")


def parse_model_name(name: str) -> tuple[str, int]:
    """Split a study model name into its family and depth.

    Args:
        name: e.g. "plain34" or "resnet56".

    Returns:
        ("plain" or "residual", depth in weighted layers).

    Raises:
        ValueError: the name is not `plain<depth>` or `resnet<depth>`.
    """
    match = _MODEL_NAME.match(name)
    if not match:
        raise ValueError(f"model name {name!r} is not plain<depth> or resnet<depth>, e.g. 'plain34'")
    return FAMILIES[match.group(1)], int(match.group(2))


def _model_name(family: str, depth: int) -> str:
    prefix = next(prefix for prefix, fam in FAMILIES.items() if fam == family)
    return f"{prefix}{depth}"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _compare(
    key: str,
    claim: str,
    subject: str,
    reference: str,
    errors: Mapping[str, Sequence[float]],
    *,
    expect: str,
    tolerance: float = 0.0,
) -> dict:
    """One comparison of mean final training errors: `subject` against `reference`.

    `expect` is "higher" (subject > reference), "lower" (subject < reference) or "no_higher"
    (subject <= reference + `tolerance`, or, with a p-value, not significantly higher at `ALPHA`); the
    outcome is "shown" when the means agree with it.
    """
    absent = [name for name in (subject, reference) if not errors.get(name)]
    if absent:
        reason = f"the study has no {' or '.join(absent)}: add it to study.models"
        return _missing(key, claim, reason, models=[subject, reference])

    subject_errors = np.asarray(errors[subject], dtype=float)
    reference_errors = np.asarray(errors[reference], dtype=float)
    subject_mean, reference_mean = float(subject_errors.mean()), float(reference_errors.mean())
    difference = subject_mean - reference_mean
    p_value = None
    enough_seeds = min(subject_errors.size, reference_errors.size) >= MIN_SEEDS_FOR_TEST
    varies = np.ptp(subject_errors) > 0 or np.ptp(reference_errors) > 0
    if enough_seeds and varies:
        from scipy import stats

        p_value = _finite_or_none(stats.ttest_ind(subject_errors, reference_errors, equal_var=False).pvalue)
    no_higher = difference <= tolerance or (p_value is not None and p_value >= ALPHA)
    holds = {"higher": difference > 0, "lower": difference < 0, "no_higher": no_higher}[expect]

    relation = "above" if difference > 0 else "below" if difference < 0 else "level with"
    if p_value is not None:
        evidence = f"Welch's t-test p = {p_value:.3g}"
    elif enough_seeds:
        evidence = "no p-value: the errors do not vary across seeds"
    else:
        evidence = f"no significance test below {MIN_SEEDS_FOR_TEST} seeds per model"
    return {
        "key": key,
        "claim": claim,
        "models": [subject, reference],
        "means": {subject: subject_mean, reference: reference_mean},
        "seeds": {subject: int(subject_errors.size), reference: int(reference_errors.size)},
        "difference": difference,
        "p_value": p_value,
        "outcome": SHOWN if holds else NOT_SHOWN,
        "reason": (
            f"{subject} ends at {_pct(subject_mean)} training error, {relation} {reference} at "
            f"{_pct(reference_mean)} ({100 * difference:+.2f} points, {evidence})"
        ),
    }


def _missing(key: str, claim: str, reason: str, *, models: list[str] | None) -> dict:
    """A comparison the study cannot make, with the same keys as one it can."""
    return {
        "key": key,
        "claim": claim,
        "models": models,
        "means": None,
        "seeds": None,
        "difference": None,
        "p_value": None,
        "outcome": MISSING,
        "reason": reason,
    }


def verdict(final_train_errors: Mapping[str, Sequence[float]], *, tolerance: float = 0.0) -> dict:
    """Does the study show the degradation problem, and that skip connections prevent it?

    The shallowest and deepest plain nets of the study set the two depths (e.g. plain18 and plain34, as in
    Fig. 4; plain20 and plain56, as in Fig. 6). Three comparisons of mean final training error follow:

    - degradation: the deeper plain net ends above the shallower one;
    - residual_beats_plain: the residual net of the deeper depth ends below that plain net;
    - residual_no_degradation: the deeper residual net ends no higher than the shallower one, allowing
      `tolerance` (a fraction) for run-to-run noise, and, with enough seeds for a test, unless Welch's
      test finds it significantly higher.

    The answer is "yes" when all three are shown, "no" when degradation is shown but a residual comparison
    contradicts the claim, and "inconclusive" when a model is missing or the plain nets did not degrade
    (there was nothing to prevent).

    Args:
        final_train_errors: model name -> final training error (a fraction) of each seed.
        tolerance: how far above the shallower residual net the deeper one may end and count as no worse.

    Returns:
        A JSON-able dict: flat top-level numbers and booleans for `dvc metrics`, `comparisons` with each
        comparison's models, means, difference (first model minus second), p-value or None, outcome and
        reason, `answer` ("yes", "no" or "inconclusive") and a one-sentence `text`.

    Raises:
        ValueError: a model name is not `plain<depth>` or `resnet<depth>`.
    """
    members = {name: parse_model_name(name) for name in final_train_errors}
    plain_depths = sorted({depth for family, depth in members.values() if family == "plain"})
    all_depths = sorted({depth for _, depth in members.values()})
    # The plain nets define the question; without two of them, any two depths still name what is missing.
    depths = plain_depths if len(plain_depths) >= 2 else all_depths

    if len(depths) < 2:
        shallow = deep = None
        reason = f"the study needs two depths of each family; it has {sorted(final_train_errors) or 'none'}"
        comparisons = [_missing(key, claim, reason, models=None) for key, claim in _CLAIMS]
    else:
        shallow, deep = depths[0], depths[-1]
        plain_shallow, plain_deep = _model_name("plain", shallow), _model_name("plain", deep)
        residual_shallow, residual_deep = _model_name("residual", shallow), _model_name("residual", deep)
        (degradation_key, degradation_claim), (beats_key, beats_claim), (no_deg_key, no_deg_claim) = _CLAIMS
        comparisons = [
            _compare(
                degradation_key,
                degradation_claim,
                plain_deep,
                plain_shallow,
                final_train_errors,
                expect="higher",
            ),
            _compare(beats_key, beats_claim, residual_deep, plain_deep, final_train_errors, expect="lower"),
            _compare(
                no_deg_key,
                no_deg_claim,
                residual_deep,
                residual_shallow,
                final_train_errors,
                tolerance=tolerance,
                expect="no_higher",
            ),
        ]

    degradation, beats_plain, no_degradation = comparisons
    missing = [c for c in comparisons if c["outcome"] == MISSING]
    if missing:
        answer = "inconclusive"
        text = f"Inconclusive: {missing[0]['reason']}."
    elif degradation["outcome"] != SHOWN:
        answer = "inconclusive"
        text = (
            f"Inconclusive: the plain nets did not degrade, so there was nothing for skip connections to "
            f"prevent: {degradation['reason']}."
        )
    elif beats_plain["outcome"] == SHOWN and no_degradation["outcome"] == SHOWN:
        answer = "yes"
        text = (
            f"Yes: the plain nets degrade, {degradation['reason']}; skip connections prevent it, "
            f"{beats_plain['reason']}, and {no_degradation['reason']}."
        )
    else:
        failed = beats_plain if beats_plain["outcome"] != SHOWN else no_degradation
        answer = "no"
        text = (
            f"No: the plain nets degrade, {degradation['reason']}; but skip connections do not prevent it, "
            f"{failed['reason']}."
        )

    result = {
        "answer": answer,
        "text": text,
        "tolerance": tolerance,
        "degradation_shown": degradation["outcome"] == SHOWN,
        "prevented": beats_plain["outcome"] == SHOWN and no_degradation["outcome"] == SHOWN,
        "shallow_depth": shallow,
        "deep_depth": deep,
    }
    for comparison in comparisons:
        result[f"{comparison['key']}_difference"] = comparison["difference"]
        result[f"{comparison['key']}_p_value"] = comparison["p_value"]
    compared = {name for c in comparisons for name in (c["models"] or [])}
    result["comparisons"] = comparisons
    result["models_not_compared"] = [name for name in final_train_errors if name not in compared]
    result["final_train_error_mean"] = {
        name: float(np.mean(values)) for name, values in final_train_errors.items() if len(values)
    }
    return result


def curves_frame(histories: Mapping[tuple[str, int], pd.DataFrame]) -> pd.DataFrame:
    """Stack the members' `history.csv` tables into one long table of learning curves.

    Args:
        histories: (model name, seed) -> that member's history, with at least the columns `epoch`,
            `error` and `val_error`.

    Returns:
        Columns `model`, `seed`, `epoch`, `train_error`, `val_error` (fractions), in the order given.

    Raises:
        ValueError: a history lacks a column, or is empty.
    """
    frames = []
    for (model, seed), history in histories.items():
        absent = [column for column in HISTORY_COLUMNS if column not in history.columns]
        if absent or history.empty:
            problem = f"lacks columns {absent}" if absent else "has no epochs"
            raise ValueError(f"history of {model} seed {seed} {problem}; it has {list(history.columns)}")
        frames.append(
            pd.DataFrame(
                {
                    "model": model,
                    "seed": int(seed),
                    "epoch": history["epoch"].astype(int).to_numpy(),
                    "train_error": history["error"].astype(float).to_numpy(),
                    "val_error": history["val_error"].astype(float).to_numpy(),
                }
            )
        )
    if not frames:
        return pd.DataFrame({column: [] for column in CURVE_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def curves_by_model(curves: pd.DataFrame) -> pd.DataFrame:
    """Learning curves averaged over seeds, one column per model and curve, for stock plot templates.

    Args:
        curves: the long table of `curves_frame`.

    Returns:
        Column `epoch`, then `<model>_train_error` and `<model>_val_error` for each model in order of
        appearance; an epoch a model did not reach is empty.
    """
    models = list(dict.fromkeys(curves["model"]))
    means = curves.groupby(["model", "epoch"], sort=False)[["train_error", "val_error"]].mean()
    wide = pd.DataFrame({"epoch": sorted(curves["epoch"].unique())})
    for model in models:
        per_epoch = means.loc[model]
        wide[f"{model}_train_error"] = wide["epoch"].map(per_epoch["train_error"])
        wide[f"{model}_val_error"] = wide["epoch"].map(per_epoch["val_error"])
    return wide


def model_colors(models: Sequence[str]) -> dict[str, tuple]:
    """One distinct colour per model, stable in the order given."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(models) <= 10 else "tab20"]
    return {model: palette(index % palette.N) for index, model in enumerate(models)}


def plot_learning_curves(curves: pd.DataFrame, path: str | os.PathLike, *, title: str = "") -> Path:
    """Training and validation error against epoch for every model, drawn like Fig. 4 of the paper.

    Plain nets on the left, residual nets on the right, on a shared error axis; thin lines are training
    error, bold lines validation error, one colour per model. Several seeds are drawn as their mean with
    a faint min-max band around the training error.

    Args:
        curves: the long table of `curves_frame`.
        path: the PNG to write.
        title: the figure's title.

    Returns:
        `path`.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    models = list(dict.fromkeys(curves["model"]))
    present = {parse_model_name(model)[0] for model in models}
    families = [family for family in ("plain", "residual") if family in present]
    colors = model_colors(models)
    # A Figure without pyplot renders on the Agg canvas and leaves the process's backend alone.
    figure = Figure(figsize=(6.5 * max(len(families), 1), 4.8), layout="constrained")
    axes = figure.subplots(1, max(len(families), 1), sharey=True, squeeze=False)[0]
    for ax, family in zip(axes, families or ["plain"], strict=True):
        for model in models:
            if parse_model_name(model)[0] != family:
                continue
            per_epoch = curves[curves["model"] == model].groupby("epoch")
            train = 100 * per_epoch["train_error"].agg(["mean", "min", "max"])
            val = 100 * per_epoch["val_error"].mean()
            seeds = curves.loc[curves["model"] == model, "seed"].nunique()
            color = colors[model]
            ax.plot(train.index, train["mean"], color=color, linewidth=1.0)
            label = f"{model} ({seeds} seed{'s' * (seeds > 1)})"
            ax.plot(val.index, val, color=color, linewidth=2.6, label=label)
            if seeds > 1:
                ax.fill_between(train.index, train["min"], train["max"], color=color, alpha=0.15, linewidth=0)
        ax.set_title(f"{family} nets")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        handles, labels = ax.get_legend_handles_labels()
        handles += [Line2D([], [], color="gray", linewidth=1.0), Line2D([], [], color="gray", linewidth=2.6)]
        labels += ["training error (thin)", "validation error (bold)"]
        ax.legend(handles, labels, fontsize="small")
    axes[0].set_ylabel("error (%)")
    if title:
        figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """A confusion-matrix heatmap: rows are the actual class, columns the predicted one.

    Colour is the fraction of the actual class (so rare classes stay visible); each cell is annotated with
    its count when there are few enough classes to read them.

    Args:
        matrix: counts, `matrix[actual][predicted]`.
        class_names: a name per row and column.
        path: the PNG to write.
        title: the figure's title.

    Returns:
        `path`.

    Raises:
        ValueError: the matrix is not square with one row per class name.
    """
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=np.int64)
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not fit {len(class_names)} classes")
    row_totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)

    size = min(max(4.0, 0.5 * len(class_names) + 2.0), 24.0)
    figure = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, label="fraction of the actual class")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=list(class_names), rotation=45 if len(class_names) > 10 else 0, ha="right")
    ax.set_yticks(ticks, labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if len(class_names) <= 20:
        for actual, predicted in np.ndindex(counts.shape):
            shade = "white" if fractions[actual, predicted] > 0.5 else "black"
            ax.text(
                predicted,
                actual,
                str(counts[actual, predicted]),
                ha="center",
                va="center",
                color=shade,
                fontsize="small",
            )
    if title:
        ax.set_title(title)
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def member_record(summary: Mapping, test_metrics: Mapping | None = None) -> dict:
    """Flatten one study member's `summary.json` (and `test.json`) into a row of the model table.

    Args:
        summary: what training wrote to `summary.json`.
        test_metrics: what evaluation wrote to `test.json`, if any.

    Returns:
        model, seed, family, depth, params, macs, epochs, train_time_s, images_per_sec, final_train_error,
        best_train_error, final_val_error, best_val_error, test_error (NaN without `test_metrics`).

    Raises:
        ValueError: a key of the training contract is missing.
    """
    try:
        return {
            "model": str(summary["model"]),
            "seed": int(summary["seed"]),
            "family": str(summary["family"]),
            "depth": int(summary["depth"]),
            "params": int(summary["params"]),
            "macs": int(summary["macs"]),
            "epochs": int(summary["epochs"]),
            "train_time_s": float(summary["train_time_s"]),
            "images_per_sec": float(summary["images_per_sec"]),
            "final_train_error": float(summary["final"]["error"]),
            "best_train_error": float(summary["best"]["error"]),
            "final_val_error": float(summary["final"]["val_error"]),
            "best_val_error": float(summary["best"]["val_error"]),
            "test_error": float(test_metrics["test_error"]) if test_metrics else math.nan,
        }
    except KeyError as exc:
        raise ValueError(f"summary of {summary.get('model', '?')} lacks key {exc.args[0]!r}") from None


# The member-record numbers that vary across seeds, so the table shows their mean and spread.
_TABLE_NUMBERS = (
    "final_train_error",
    "best_train_error",
    "final_val_error",
    "test_error",
    "epochs",
    "train_time_s",
    "images_per_sec",
)


def model_table(records: Sequence[Mapping]) -> pd.DataFrame:
    """Aggregate member records into one row per model: mean and standard deviation over seeds.

    Args:
        records: rows of `member_record`.

    Returns:
        Columns model, family, depth, seeds, params, macs, then `<number>_mean` and `<number>_std`
        (sample standard deviation, NaN for one seed) for the errors, epochs, training time and
        throughput; models in order of first appearance.
    """
    frame = pd.DataFrame(list(records))
    grouped = frame.groupby("model", sort=False)
    table = grouped.agg(
        family=("family", "first"),
        depth=("depth", "first"),
        seeds=("seed", "nunique"),
        params=("params", "first"),
        macs=("macs", "first"),
    )
    for number in _TABLE_NUMBERS:
        table[f"{number}_mean"] = grouped[number].mean()
        table[f"{number}_std"] = grouped[number].std(ddof=1)
    return table.reset_index()


def _count(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:.0f}"


def _mean_std(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:{fmt}} ± {std:{fmt}}" if not math.isnan(std) else f"{mean:{fmt}}"


def render_table(table: pd.DataFrame) -> str:
    """Render `model_table` as a Markdown table; errors in percent, mean ± std where there are seeds."""
    headings = [
        "Model",
        "Family",
        "Depth",
        "Seeds",
        "Params",
        "MACs/image",
        "Train err. final (%)",
        "Train err. best (%)",
        "Val. err. final (%)",
        "Test err. (%)",
        "Epochs",
        "Train time (s)",
        "Images/s",
    ]
    alignments = ["---"] * 4 + ["---:"] * (len(headings) - 4)
    lines = ["| " + " | ".join(headings) + " |", "|" + "|".join(alignments) + "|"]
    for row in table.itertuples(index=False):
        row = row._asdict()
        cells = [
            row["model"],
            row["family"],
            str(row["depth"]),
            str(row["seeds"]),
            _count(row["params"]),
            _count(row["macs"]),
        ]
        for number in ("final_train_error", "best_train_error", "final_val_error", "test_error"):
            cells.append(_mean_std(100 * row[f"{number}_mean"], 100 * row[f"{number}_std"], ".2f"))
        cells.append(_mean_std(row["epochs_mean"], row["epochs_std"], ".0f"))
        cells.append(_mean_std(row["train_time_s_mean"], row["train_time_s_std"], ".1f"))
        cells.append(_mean_std(row["images_per_sec_mean"], row["images_per_sec_std"], ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_comparisons(result: Mapping) -> str:
    """Render the verdict's comparisons as a Markdown table."""
    lines = [
        "| Claim | Models | Mean final training error | Difference | p-value | Outcome |",
        "|---|---|---:|---:|---:|---|",
    ]
    for comparison in result["comparisons"]:
        models = " vs ".join(comparison["models"]) if comparison["models"] else "—"
        if comparison["means"]:
            means = " vs ".join(_pct(mean) for mean in comparison["means"].values())
            difference = f"{100 * comparison['difference']:+.2f} pts"
        else:
            means = difference = "—"
        p_value = f"{comparison['p_value']:.3g}" if comparison["p_value"] is not None else "—"
        outcome = comparison["outcome"]
        if outcome == MISSING:
            outcome = f"missing: {comparison['reason']}"
        lines.append(f"| {comparison['claim']} | {models} | {means} | {difference} | {p_value} | {outcome} |")
    return "\n".join(lines)


def render_report(
    result: Mapping,
    table_markdown: str,
    figure_path: str,
    *,
    dataset: str,
    models: Sequence[str],
    seeds: Sequence[int],
) -> str:
    """The degradation report in Markdown: the verdict first, then the numbers behind it.

    Args:
        result: what `verdict` returned.
        table_markdown: what `render_table` returned.
        figure_path: the learning-curves figure, relative to the report.
        dataset: the dataset's name.
        models: the study's models.
        seeds: the study's seeds.

    Returns:
        The Markdown text.
    """
    answer = {"yes": "Yes", "no": "No", "inconclusive": "Inconclusive"}[result["answer"]]
    not_compared = result.get("models_not_compared") or []
    reference_only = (
        f"\n- In the table and figure for reference, not in the verdict: {', '.join(not_compared)}."
        if not_compared
        else ""
    )
    return f"""# Degradation study on {dataset}

Do skip connections prevent the degradation problem (He et al. 2015, arXiv:1512.03385, Sec. 4.1, Fig. 4)?

## Verdict: {answer}

{result["text"]}

{render_comparisons(result)}

## Models

{table_markdown}

## Learning curves

![Training (thin) and validation (bold) error per epoch]({figure_path})

Thin lines: training error; bold lines: validation error; the mean over seeds, with a min-max band on the
training error where there are several.

## How this was computed

- Study: models {", ".join(models)}; seeds {", ".join(str(seed) for seed in seeds)}; dataset {dataset}.
- The final training error of a run is its last epoch's training error (`final.error` in the run's
  `summary.json`), measured on the fly during the epoch, as the paper's Fig. 4 does. Degradation is about
  this number: a deeper plain net that fits its *training* set worse is not overfitting.
- The shallowest and deepest plain nets of the study set the two depths; the residual nets of the same
  depths are their twins. Each claim compares mean final training errors over seeds; the difference is the
  first model's mean minus the second's.{reference_only}
- With at least {MIN_SEEDS_FOR_TEST} seeds per model, each comparison also carries a two-sided Welch's
  t-test p-value (`scipy.stats.ttest_ind(equal_var=False)`); with fewer there is none. The outcome follows
  the means, with one allowance for noise: the deeper residual net counts as no higher than the shallower
  one when it ends at most {100 * result.get("tolerance", 0.0):.2f} points above it (`study.tolerance`), or
  when the test finds the difference not significant (p >= {ALPHA}).
- The answer is "Yes" when all three claims hold, "No" when the plain nets degrade but a residual claim
  fails, and "Inconclusive" when a model is missing or the plain nets did not degrade.
- Validation error is the last epoch's; test error comes from the evaluate stage's `test.json`.
"""


@contextmanager
def staged_files(target_dir: str | os.PathLike) -> Iterator[Path]:
    """Write files into a temporary directory; on success each one replaces its namesake in `target_dir`.

    A crash or an exception leaves `target_dir` as it was, and a reader never sees a half-written file:
    the staging directory sits beside `target_dir`, on the same file system, so each move is one rename.

    Args:
        target_dir: where the files belong; created if missing.

    Yields:
        The staging directory, to fill with plain files.
    """
    target_dir = Path(target_dir)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.", suffix=".tmp", dir=target_dir.parent))
    try:
        yield staging
        target_dir.mkdir(exist_ok=True)
        for item in sorted(staging.iterdir()):
            os.replace(item, target_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
