"""The degradation report's pure parts: the verdict, the per-model table and the figures.

The question is the one of He et al. 2015 (arXiv:1512.03385), Sec. 4.1 and Fig. 4: does a deeper plain
net end with higher *training* error than a shallower one (the degradation problem, which is not
overfitting), and does the residual net of the same depth avoid it? Every sentence the report states is
computed here from the numbers it is given; nothing is a conclusion written in advance.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

FAMILIES = {"plain": "plain", "resnet": "residual"}
_MODEL_NAME = re.compile(r"^(plain|resnet)(\d+)$")

# Below three seeds a per-model variance is too unstable for Welch's test: such a claim stays untested.
MIN_SEEDS_FOR_TEST = 3
HYPOTHESES = ("greater", "less", "non_inferior")

SHOWN = "shown"
CONTRADICTED = "contradicted"
NOT_SHOWN = "not shown"
UNTESTED = "untested"
MISSING = "missing"

CURVE_COLUMNS = ("model", "seed", "epoch", "train_error", "val_error")
CURVE_SOURCE_TYPES = {"epoch": int, "error": float, "val_error": float}


def parse_model_name(name: str) -> tuple[str, int]:
    """Split a study model name, e.g. "plain34" or "resnet56", into its family and depth.

    Returns:
        ("plain" or "residual", depth in weighted layers).

    Raises:
        ValueError: the name is not `plain<depth>` or `resnet<depth>`.
    """
    match = _MODEL_NAME.match(name)
    if not match:
        raise ValueError(f"model name {name!r} is not plain<depth> or resnet<depth>, e.g. 'plain34'")
    return FAMILIES[match.group(1)], int(match.group(2))


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _points(fraction: float) -> str:
    return f"{100 * fraction:+.2f}"


def markdown_table(headings: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    """A Markdown table; `align` has an "l" (left) or "r" (right) per column."""
    separator = "|" + "".join("---:|" if side == "r" else "---|" for side in align)
    lines = ["| " + " | ".join(cells) + " |" for cells in (headings, *rows)]
    return "\n".join([lines[0], separator, *lines[1:]])


def claim_text(claim: Mapping, margin: float) -> str:
    """The sentence of a `study.claims` entry, e.g. "plain34 ends with higher training error than plain18"."""
    subject, reference = claim["subject"], claim["reference"]
    return {
        "greater": f"{subject} ends with higher training error than {reference}",
        "less": f"{subject} ends with lower training error than {reference}",
        "non_inferior": (
            f"{subject} ends no more than {100 * margin:.2f} points above {reference} in training error"
        ),
    }[claim["hypothesis"]]


def check_design(models: Sequence[str], claims: Sequence[Mapping], *, alpha: float, margin: float) -> None:
    """Reject a study design that cannot be tested as registered, naming the first fault.

    Every model is named `plain<depth>` or `resnet<depth>` and takes part in a claim, every claim names two
    models of the study and a known hypothesis, and alpha and margin are sensible.

    Raises:
        ValueError: the fault, in one line.
    """
    for model in models:
        try:
            parse_model_name(model)
        except ValueError as exc:
            raise ValueError(f"study.models: {exc}") from None
    if not 0 < alpha < 0.5:
        raise ValueError(f"study.alpha must be in (0, 0.5), got {alpha!r}")
    if not 0 <= margin < 1:
        raise ValueError(f"study.margin must be a fraction in [0, 1), got {margin!r}")
    keys = [claim.get("key") for claim in claims]
    if len(set(keys)) != len(keys):
        raise ValueError(f"study.claims: keys must be unique, got {keys}")
    for claim in claims:
        if claim.get("hypothesis") not in HYPOTHESES:
            raise ValueError(
                f"study.claims.{claim.get('key')}: unknown hypothesis {claim.get('hypothesis')!r}; "
                f"choose one of {list(HYPOTHESES)}"
            )
        for role in ("subject", "reference"):
            if claim.get(role) not in models:
                raise ValueError(
                    f"study.claims.{claim.get('key')}: {role} {claim.get(role)!r} is not in study.models "
                    f"{list(models)}"
                )
        if (subject := claim["subject"]) == claim["reference"]:
            raise ValueError(f"study.claims.{claim['key']}: subject and reference are both {subject!r}")
    claimed = {claim[role] for claim in claims for role in ("subject", "reference")}
    if unclaimed := [model for model in models if model not in claimed]:
        raise ValueError(
            f"study.models {unclaimed} take part in no claim of study.claims: add one or drop them"
        )


@functools.cache
def _u_counts(n_subject: int, n_reference: int) -> np.ndarray:
    """How many of the orderings of two tie-free samples give each Mann-Whitney U, 0 to n_s * n_r."""
    if not n_subject or not n_reference:
        return np.ones(1)
    largest_in_subject = _u_counts(n_subject - 1, n_reference)  # it is above all n_reference: U += n_r
    largest_in_reference = _u_counts(n_subject, n_reference - 1)
    counts = np.zeros(n_subject * n_reference + 1)
    counts[n_reference : n_reference + largest_in_subject.size] += largest_in_subject
    counts[: largest_in_reference.size] += largest_in_reference
    return counts


def _welch_test(subject: np.ndarray, reference: np.ndarray, *, alpha: float, threshold: float, side: str):
    """Welch's t-test on the difference of means, with Welch-Satterthwaite degrees of freedom."""
    from scipy import stats

    difference = float(subject.mean() - reference.mean())
    se = math.sqrt(subject.var(ddof=1) / subject.size + reference.var(ddof=1) / reference.size)
    if se < 1e-12:  # identical errors in every seed, up to float rounding: the difference decides
        holds = difference > threshold if side == "greater" else difference < threshold
        return difference, (difference, difference), (difference, difference), 0.0 if holds else 1.0
    welch = stats.ttest_ind(subject, reference, equal_var=False)
    # The two-sided interval at 1 - 2 alpha has the two one-sided bounds at 1 - alpha as its ends.
    bounds = welch.confidence_interval(1 - 2 * alpha)
    p_value = stats.ttest_ind(subject - threshold, reference, equal_var=False, alternative=side).pvalue
    return difference, tuple(welch.confidence_interval(0.95)), tuple(bounds), float(p_value)


def _rank_test(subject: np.ndarray, reference: np.ndarray, *, alpha: float, threshold: float, side: str):
    """Mann-Whitney U, with the Hodges-Lehmann shift and Moses's distribution-free bounds on it."""
    from scipy import stats

    # Exact over every split of the seeds up to 100,000 of them (ties included), a fixed sample beyond.
    exact = stats.PermutationMethod(n_resamples=100_000, rng=0)
    p_value = stats.mannwhitneyu(subject - threshold, reference, alternative=side, method=exact).pvalue
    differences = np.sort(np.subtract.outer(subject, reference).ravel())
    counts = _u_counts(subject.size, reference.size)
    cumulative = np.cumsum(counts) / counts.sum()

    def bounds(level: float) -> tuple[float, float]:
        k = int(np.sum(cumulative <= level))  # the sorted differences below Moses's one-sided bound
        return (differences[k - 1], differences[-k]) if k else (-math.inf, math.inf)

    return float(np.median(differences)), bounds(0.025), bounds(alpha), float(p_value)


class _Test(NamedTuple):
    name: str  # in a reason: "one-sided <name> p"
    estimate: str  # what d is, in a table heading
    run: Callable  # (subject, reference, *, alpha, threshold, side) -> d, ci95, one-sided bounds, p
    design: str  # the report's design section
    explained: str  # the sentence under the claims table


TESTS = {
    "welch": _Test(
        "Welch",
        "difference of means",
        _welch_test,
        "one-sided Welch t-tests over seeds on the difference of means",
        "the first model's mean minus the second's",
    ),
    "rank": _Test(
        "Mann-Whitney",
        "Hodges-Lehmann shift",
        _rank_test,
        "one-sided Mann-Whitney U tests over seeds, exact over the splits of the seeds, on the "
        "Hodges-Lehmann shift with Moses's distribution-free bounds",
        "the Hodges-Lehmann shift of the first model against the second (the median of the differences "
        "over all pairs of their seeds)",
    ),
}


def decide_claim(
    claim: Mapping, errors: Mapping[str, Sequence[float]], *, alpha: float, margin: float, test: str = "welch"
) -> dict:
    """One pre-registered claim, decided by a one-sided test over seeds.

    d is subject - reference (`welch`: of the means; `rank`: the Hodges-Lehmann shift, the median of the
    pairwise differences; that test needs no normal errors and no equal spreads). One-sided bounds are at
    level 1 - alpha; the reported interval is the two-sided 95% one.

    - greater, H1 d > 0: shown when p < alpha (lower bound above 0); contradicted when upper bound below 0.
    - less, H1 d < 0: shown when p < alpha (upper bound below 0); contradicted when lower bound above 0.
    - non_inferior, H1 d < margin: shown when p < alpha (upper bound below the margin); contradicted when
      lower bound above it (significantly worse by more than the margin).

    Args:
        claim: `key`, `subject`, `reference`, `hypothesis` (an entry of `study.claims`).
        errors: model name -> final training error (a fraction) of each seed.
        alpha, margin: the study's significance level and non-inferiority margin (a fraction).
        test: a key of TESTS (`study.test`).

    Returns:
        A JSON-able dict: key, claim (its sentence), hypothesis, test, models, means, sds, seeds,
        difference (d), ci95 (two-sided), bound (the one-sided bound the decision uses), p_value, outcome
        and reason.
    """
    subject, reference, hypothesis = claim["subject"], claim["reference"], claim["hypothesis"]
    test_name, estimate_name, run_test = TESTS[test][:3]
    result = {
        "key": claim["key"],
        "claim": claim_text(claim, margin),
        "hypothesis": hypothesis,
        "test": test,
        "models": [subject, reference],
    } | dict.fromkeys(("means", "sds", "seeds", "difference", "ci95", "bound", "p_value"))
    if absent := [name for name in (subject, reference) if not errors.get(name)]:
        return result | {"outcome": MISSING, "reason": f"no results for {' or '.join(absent)}"}
    samples = {name: np.asarray(errors[name], dtype=float) for name in (subject, reference)}
    result["means"] = {name: float(values.mean()) for name, values in samples.items()}
    result["sds"] = {
        name: float(values.std(ddof=1)) if values.size > 1 else None for name, values in samples.items()
    }
    result["seeds"] = {name: int(values.size) for name, values in samples.items()}
    summary = f"{subject} {_pct(result['means'][subject])} vs {reference} {_pct(result['means'][reference])}"
    # Exact over the splits of the seeds, the rank test's p cannot fall below one split in all of them.
    floor = 1 / math.comb(sum(result["seeds"].values()), result["seeds"][subject]) if test == "rank" else 0.0
    untested = ""
    if min(result["seeds"].values()) < MIN_SEEDS_FOR_TEST:
        untested = f"fewer than {MIN_SEEDS_FOR_TEST} seeds per model"
    elif floor >= alpha:
        untested = (
            f"with these seeds the {test_name} test's p is at least {floor:.3g}, not below alpha {alpha:g}"
        )
    if untested:
        return result | {"outcome": UNTESTED, "reason": f"{summary}; untested: {untested}"}
    threshold = margin if hypothesis == "non_inferior" else 0.0
    side = "greater" if hypothesis == "greater" else "less"
    difference, ci95, (lower_bound, upper_bound), p_value = run_test(
        samples[subject], samples[reference], alpha=alpha, threshold=threshold, side=side
    )
    result |= {"difference": difference, "ci95": list(ci95), "p_value": p_value}
    if side == "greater":
        end, result["bound"], contradicted = "lower", lower_bound, upper_bound < 0
    else:
        end, result["bound"], contradicted = "upper", upper_bound, lower_bound > threshold
    bound_text = f"{end} {100 * (1 - alpha):g}% bound {_points(result['bound'])}"
    if hypothesis == "non_inferior":
        bound_text += f" against the margin {_points(margin)}"
    outcome = SHOWN if p_value < alpha else CONTRADICTED if contradicted else NOT_SHOWN
    evidence = f"95% CI [{_points(ci95[0])}, {_points(ci95[1])}], {bound_text}, one-sided {test_name} p"
    evidence += f" = {p_value:.3g}"
    summary += f", {estimate_name} {_points(difference)} points"
    return result | {"outcome": outcome, "reason": f"{summary} ({evidence})"}


def verdict(
    final_train_errors: Mapping[str, Sequence[float]],
    claims: Sequence[Mapping],
    *,
    alpha: float = 0.05,
    margin: float = 0.01,
    test: str = "welch",
) -> dict:
    """Does the study show the degradation problem, and that skip connections prevent it?

    The answer is "yes" only when every claim is shown (an intersection-union test: the chance of a false
    Yes stays at most alpha without a correction for the number of claims), "no" when a claim is
    contradicted with significance, and "inconclusive" otherwise, naming the claims not shown.

    Args:
        final_train_errors: as `errors` of `decide_claim`.
        claims: `study.claims`.
        alpha, margin, test: as for `decide_claim`.

    Returns:
        A JSON-able dict: `answer`, a one-paragraph `text`, `alpha`, `margin`, `test`, `comparisons` (a
        `decide_claim` result per claim), flat `<key>_difference`, `<key>_p_value` and `<key>_shown` for
        `dvc metrics`, and `final_train_error_mean` per model.
    """
    comparisons = [
        decide_claim(claim, final_train_errors, alpha=alpha, margin=margin, test=test) for claim in claims
    ]
    contradicted = [c for c in comparisons if c["outcome"] == CONTRADICTED]
    not_shown = [c for c in comparisons if c["outcome"] != SHOWN]
    lead = ""
    if contradicted:
        answer, findings = "no", [f"{c['key']} is contradicted, {c['reason']}" for c in contradicted]
    elif not_shown or not comparisons:
        answer = "inconclusive"
        findings = [f"{c['key']} is {c['outcome']}, {c['reason']}" for c in not_shown]
        findings = findings or ["the study registers no claims"]
    else:
        answer, lead = "yes", f"every claim is shown at alpha {alpha:g}: "
        findings = [f"{c['claim']}, {c['reason']}" for c in comparisons]
    text = f"{answer.capitalize()}: {lead}{'; '.join(findings)}."
    result = {"answer": answer, "text": text, "alpha": alpha, "margin": margin, "test": test}
    for comparison in comparisons:
        result[f"{comparison['key']}_difference"] = comparison["difference"]
        result[f"{comparison['key']}_p_value"] = comparison["p_value"]
        result[f"{comparison['key']}_shown"] = comparison["outcome"] == SHOWN
    result["comparisons"] = comparisons
    result["final_train_error_mean"] = {
        name: float(np.mean(values)) for name, values in final_train_errors.items() if len(values)
    }
    return result


def convergence(
    curves: pd.DataFrame, *, window: int, max_decrease: float, threshold: float
) -> dict[str, dict]:
    """Whether each model's training error had flattened by the end, and how fast it fell.

    Under a step schedule the last epochs run at the smallest rate, so a flat end says little about a
    longer budget; the epochs a net took to reach `threshold` say how fast it trains (He et al. 2015,
    Sec. 4.1: deep plain nets "may have exponentially low convergence rates").

    Args:
        curves: the long table of `curves_frame`.
        window: the last epochs, whose mean training error over seeds the slope fits by least squares.
        max_decrease: a model whose error still falls faster than this per epoch had not converged.
        threshold: a training error.

    Returns:
        model -> {"slope": per epoch, "epochs": fitted, "converged": bool, "threshold", "epochs_to_threshold":
        seed -> the first epoch whose training error was below `threshold`, or None}; errors are fractions.
    """
    result = {}
    for model, rows in curves.groupby("model", sort=False):
        per_epoch = rows.groupby("epoch")["train_error"].mean().tail(window)  # groupby sorts the epochs
        slope = float(np.polyfit(per_epoch.index, per_epoch.to_numpy(), 1)[0]) if len(per_epoch) > 1 else 0.0
        below = rows[rows["train_error"] < threshold].groupby("seed")["epoch"].min()
        result[str(model)] = {
            "slope": slope,
            "epochs": int(len(per_epoch)),
            "converged": slope >= -max_decrease,
            "threshold": threshold,
            "epochs_to_threshold": {
                int(seed): (int(below[seed]) if seed in below.index else None)
                for seed in sorted(rows["seed"].unique())
            },
        }
    return result


def render_speed(slopes: Mapping[str, Mapping]) -> str:
    """One sentence: the epochs each model took to reach the threshold of `convergence`, seed by seed."""
    if not slopes:
        return ""
    threshold = next(iter(slopes.values()))["threshold"]
    parts = []
    for model, slope in slopes.items():
        epochs = [epoch for epoch in slope["epochs_to_threshold"].values() if epoch is not None]
        missing = len(slope["epochs_to_threshold"]) - len(epochs)
        if not epochs:
            parts.append(f"{model} never")
            continue
        span = f"{min(epochs)}" if min(epochs) == max(epochs) else f"{min(epochs)}-{max(epochs)}"
        parts.append(f"{model} {span}" + (f" ({missing} seed{'s' * (missing > 1)} never)" if missing else ""))
    lead = f"Epochs until the running training error first fell below {100 * threshold:g}%"
    return f"{lead}: {'; '.join(parts)}."


def curves_frame(histories: Mapping[tuple[str, int], pd.DataFrame]) -> pd.DataFrame:
    """Stack the members' `history.csv` tables into one long table of learning curves.

    Args:
        histories: (model name, seed) -> that member's history, with at least `epoch`, `error`, `val_error`.

    Returns:
        Columns `model`, `seed`, `epoch`, `train_error`, `val_error` (fractions), in the order given.

    Raises:
        ValueError: a history lacks a column, or is empty.
    """
    frames = []
    for (model, seed), history in histories.items():
        absent = [column for column in CURVE_SOURCE_TYPES if column not in history.columns]
        if absent or history.empty:
            problem = f"lacks columns {absent}" if absent else "has no epochs"
            raise ValueError(f"history of {model} seed {seed} {problem}; it has {list(history.columns)}")
        frames.append(
            history.astype(CURVE_SOURCE_TYPES)
            .rename(columns={"error": "train_error"})
            .assign(model=model, seed=int(seed))[list(CURVE_COLUMNS)]
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
    means = curves.groupby(["epoch", "model"])[["train_error", "val_error"]].mean().unstack("model")
    means.columns = [f"{model}_{curve}" for curve, model in means.columns]
    models = dict.fromkeys(curves["model"])  # in order of appearance
    columns = [f"{model}_{curve}" for model in models for curve in ("train_error", "val_error")]
    return means[columns].reset_index()


def model_colors(models: Sequence[str]) -> dict[str, tuple]:
    """One distinct colour per model, stable in the order given."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(models) <= 10 else "tab20"]
    return {model: palette(index % palette.N) for index, model in enumerate(models)}


def plot_learning_curves(curves: pd.DataFrame, path: str | os.PathLike, *, title: str = "") -> Path:
    """Training and validation error against epoch for every model, drawn like Fig. 4 of the paper.

    Plain nets left, residual nets right, on a shared error axis; thin lines training error, bold lines
    validation error, a colour per model; several seeds as their mean, a faint min-max band on training error.

    Args:
        curves: the long table of `curves_frame`.
        path, title: the PNG to write and the figure's title.

    Returns:
        `path`.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    models = list(dict.fromkeys(curves["model"]))
    present = {parse_model_name(model)[0] for model in models}
    families = [family for family in ("plain", "residual") if family in present] or ["plain"]
    colors = model_colors(models)
    # A Figure without pyplot renders on the Agg canvas and leaves the process's backend alone.
    figure = Figure(figsize=(6.5 * len(families), 4.8), layout="constrained")
    axes = figure.subplots(1, len(families), sharey=True, squeeze=False)[0]
    for ax, family in zip(axes, families, strict=True):
        for model, rows in curves.groupby("model", sort=False):
            if parse_model_name(model)[0] != family:
                continue
            per_epoch = rows.groupby("epoch")
            train = 100 * per_epoch["train_error"].agg(["mean", "min", "max"])
            val = 100 * per_epoch["val_error"].mean()
            seeds = rows["seed"].nunique()
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
    figure.savefig(path, dpi=120)
    return Path(path)


def plot_final_errors(
    errors: Mapping[str, Mapping[int, float]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Each seed's final clean training error as a dot, a column per model: what the claims' tests compare.

    Args:
        errors: model -> seed -> final clean training error (a fraction), models in the study's order.
        path, title: the PNG to write and the figure's title.

    Returns:
        `path`.
    """
    from matplotlib.figure import Figure

    models = list(errors)
    colors = model_colors(models)
    figure = Figure(figsize=(1.2 * len(models) + 2.5, 4.2), layout="constrained")
    ax = figure.subplots()
    for column, model in enumerate(models):
        values = 100 * np.asarray(list(errors[model].values()), dtype=float)
        # Spread the dots sideways so that seeds with equal errors stay countable.
        offsets = np.linspace(-0.18, 0.18, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(column + offsets, values, color=colors[model], s=28, zorder=3)
        if len(values):
            ax.hlines(np.median(values), column - 0.3, column + 0.3, color=colors[model], linewidth=1.5)
    ax.set_xticks(range(len(models)), labels=models)
    ax.set_ylabel("final training error, clean pass (%)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "one dot per seed, a line at the median", fontsize="medium")
    figure.savefig(path, dpi=120)
    return Path(path)


def render_seeds(errors: Mapping[str, Mapping[int, float]]) -> str:
    """Each member's final clean training error as a Markdown table: a row per model, a column per seed."""
    seeds = sorted({seed for per_seed in errors.values() for seed in per_seed})
    rows = [
        [model, *(_pct(per_seed[seed]) if seed in per_seed else "—" for seed in seeds)]
        for model, per_seed in errors.items()
    ]
    return markdown_table(["Model", *(f"seed {seed}" for seed in seeds)], rows, "l" + "r" * len(seeds))


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """A confusion-matrix heatmap, coloured by the fraction of the actual class, so rare classes stay visible.

    Each cell shows its count when there are few enough classes to read them.

    Args:
        matrix: counts, `matrix[actual][predicted]`: rows are the actual class, columns the predicted one.
        class_names: a name per row and column.
        path, title: the PNG to write and the figure's title.

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
        for (actual, predicted), count in np.ndenumerate(counts):
            shade = "white" if fractions[actual, predicted] > 0.5 else "black"
            ax.text(predicted, actual, str(count), ha="center", va="center", color=shade, fontsize="small")
    if title:
        ax.set_title(title)
    figure.savefig(path, dpi=120)
    return Path(path)


def member_record(summary: Mapping, evaluation: Mapping | None = None) -> dict:
    """Flatten one study member's `summary.json` and evaluation into a row of the model table.

    Args:
        summary: what training wrote to `summary.json`.
        evaluation: the evaluate stage's `test_error` and `train_error`, a clean pass over the training split.

    Returns:
        The row; `train_error` is NaN without `evaluation`, `running_train_error` the last epoch's running
        average under augmentation.

    Raises:
        ValueError: a key of the training contract is missing.
    """
    evaluation = evaluation or {}
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
            "train_error": float(evaluation.get("train_error", math.nan)),
            "running_train_error": float(summary["final"]["error"]),
            "final_val_error": float(summary["final"]["val_error"]),
            "test_error": float(evaluation.get("test_error", math.nan)),
        }
    except KeyError as exc:
        raise ValueError(f"summary of {summary.get('model', '?')} lacks key {exc.args[0]!r}") from None


# The member-record numbers that vary across seeds, so the table shows their mean and spread.
_TABLE_NUMBERS = (
    "train_error", "running_train_error", "final_val_error", "test_error", "epochs", "train_time_s",
    "images_per_sec",
)  # fmt: skip


def model_table(records: Sequence[Mapping]) -> pd.DataFrame:
    """Aggregate `member_record` rows into one row per model: mean and standard deviation over seeds.

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
        **{f"{number}_{stat}": (number, stat) for number in _TABLE_NUMBERS for stat in ("mean", "std")},
    )
    return table.reset_index()


def _count(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:.0f}"


def _mean_std(row: Mapping, number: str, fmt: str, scale: float = 1) -> str:
    mean, std = scale * row[f"{number}_mean"], scale * row[f"{number}_std"]
    if math.isnan(mean):
        return "n/a"
    return f"{mean:{fmt}} ± {std:{fmt}}" if not math.isnan(std) else f"{mean:{fmt}}"


def render_table(table: pd.DataFrame, slopes: Mapping[str, Mapping] | None = None) -> str:
    """Render `model_table` as a Markdown table; errors in percent, mean ± sd where there are seeds.

    Args:
        table: what `model_table` returned.
        slopes: what `convergence` returned; adds the slope column and marks nets still falling.
    """
    slopes = slopes or {}
    headings = [
        "Model", "Seeds", "Params", "MACs/image", "Train err., clean (%)", "Train err., running (%)",
        "Slope, last epochs (pts/epoch)", "Val. err. (%)", "Test err. (%)", "Epochs", "Train time (s)",
        "Images/s",
    ]  # fmt: skip
    rows = []
    for row in table.to_dict("records"):
        slope = slopes.get(row["model"])
        slope_cell = "n/a"
        if slope:
            slope_cell = f"{100 * slope['slope']:+.3f}" + ("" if slope["converged"] else " (still falling)")
        cells = [row["model"], str(row["seeds"]), _count(row["params"]), _count(row["macs"])]
        cells += [_mean_std(row, number, ".2f", 100) for number in ("train_error", "running_train_error")]
        cells.append(slope_cell)
        cells += [_mean_std(row, number, ".2f", 100) for number in ("final_val_error", "test_error")]
        cells += [_mean_std(row, "epochs", ".0f"), _mean_std(row, "train_time_s", ".1f")]
        cells.append(_mean_std(row, "images_per_sec", ".0f"))
        rows.append(cells)
    return markdown_table(headings, rows, "l" + "r" * (len(headings) - 1))


def render_comparisons(result: Mapping) -> str:
    """Render the verdict's claims as a Markdown table."""
    test = TESTS[result.get("test", "welch")]
    estimate = test.estimate[0].upper() + test.estimate[1:]
    headings = [
        "Claim", "Test", "Mean clean training error", f"{estimate} (pts)", "95% CI (pts)",
        "One-sided bound (pts)", "p", "Outcome",
    ]  # fmt: skip
    alternatives = {"greater": "d > 0", "less": "d < 0", "non_inferior": f"d < {_points(result['margin'])}"}
    rows = []
    for c in result["comparisons"]:
        means = " vs ".join(_pct(mean) for mean in c["means"].values()) if c["means"] else "—"
        tested = ["—"] * 4  # an untested or missing claim has no difference, interval, bound or p
        if c["p_value"] is not None:
            ci95 = f"[{_points(c['ci95'][0])}, {_points(c['ci95'][1])}]"
            tested = [_points(c["difference"]), ci95, _points(c["bound"]), f"{c['p_value']:.3g}"]
        h1 = f"{test.name}, H1: {alternatives[c['hypothesis']]}"
        rows.append([f"{c['key']}: {c['claim']}", h1, means, *tested, f"**{c['outcome']}**"])
    return markdown_table(headings, rows, "llrrrrrl")


def render_design(design: Mapping) -> str:
    """The study's design as registered in `conf/`, as a Markdown list (the report's first section).

    Args:
        design: `data`, `models`, `seeds`, `model`, `optimizer`, `schedule`, `trainer`, `steps`, `alpha`,
            `margin`, `test`, `convergence` and `params` (model -> trainable parameters), as
            `resnet_lab.compare` gathers them.
    """
    model, optimizer, trainer = design["model"], design["optimizer"], design["trainer"]
    params = design.get("params", {})
    twins = []
    for name in design["models"]:
        family, depth = parse_model_name(name)
        twin = f"resnet{depth}" if family == "plain" else None
        if twin in params and name in params:
            relation = "equal" if params[twin] == params[name] else "UNEQUAL"
            twins.append(f"{name} / {twin}: {params[name]:,} / {params[twin]:,} parameters ({relation})")
    rate = f"{optimizer['learning_rate']:g}"
    if optimizer.get("reference_batch_size"):
        rate = (
            f"{optimizer['effective_learning_rate']:g} ({optimizer['learning_rate']:g} for a batch of "
            f"{optimizer['reference_batch_size']}, scaled linearly to the batch of {trainer['batch_size']})"
        )
    convergence_rule = design["convergence"]
    return "\n".join(
        [
            f"- Data: {design['data']['name']} at {design['data']['image_size']} px, random crops after "
            f"{design['data']['pad_crop']} px of padding, horizontal flips "
            f"{design['data']['horizontal_flip']}.",
            f"- Models: {', '.join(design['models'])}; seeds {', '.join(map(str, design['seeds']))}; every "
            "model of every seed trained by the same code, once.",
            f"- Architecture options, the same for every model: stem {model['stem']}, first-stage width "
            f"{model['width']}, shortcut option {model['shortcut']}, zero-init of residual units "
            f"{model['zero_init_residual']}, BN momentum {model['bn_momentum']}, He-normal initialisation.",
            "- Twins: " + ("; ".join(twins) if twins else "none in this study") + ".",
            f"- Optimizer, the same for every model: {optimizer['name']}, learning rate {rate}, momentum "
            f"{optimizer.get('momentum')}, weight decay {optimizer['weight_decay']:g}; schedule "
            f"{design['schedule']['name']} with warm-up {design['schedule']['warmup_epochs']} epochs.",
            f"- Budget, the same for every model: {trainer['epochs']} epochs at batch "
            f"{trainer['batch_size']}, {design['steps']} SGD steps.",
            "- Endpoint: final training error from a clean pass over the training split in inference mode, "
            "without augmentation (the evaluate stage), per seed.",
            f"- Tests: {TESTS[design.get('test', 'welch')].design} at alpha {design['alpha']:g}; "
            f"non-inferiority margin {100 * design['margin']:.2f} points. Yes needs every claim shown; No "
            "needs one contradicted with significance; anything else is Inconclusive.",
            f"- Convergence check: a net whose mean running training error still falls faster than "
            f"{100 * convergence_rule['max_decrease']:.2f} points per epoch over the last "
            f"{convergence_rule['window']} epochs is marked as still falling.",
        ]
    )


def render_report(
    result: Mapping,
    table_markdown: str,
    figure_path: str,
    *,
    design: Mapping,
    slopes: Mapping[str, Mapping],
    seeds_markdown: str = "",
    seeds_figure: str = "",
) -> str:
    """The degradation report in Markdown: the design it ran, the verdict, then the numbers behind it.

    Args:
        result, slopes: what `verdict` and `convergence` returned.
        table_markdown, seeds_markdown: what `render_table` and `render_seeds` returned.
        figure_path, seeds_figure: the `plot_learning_curves` and `plot_final_errors` figures, relative to
            the report.
        design: see `render_design`.
    """
    falling = [model for model, slope in slopes.items() if not slope["converged"]]
    convergence_note = (
        f"Still falling at the end, so a longer budget may change their numbers: {', '.join(falling)}."
        if falling
        else "Every net's training error had flattened over the last epochs."
    )
    if speed_note := render_speed(slopes):
        convergence_note += " " + speed_note
    seeds_section = ""
    if seeds_markdown:
        seeds_section = f"\n### Seed by seed: the errors the tests compare\n\n{seeds_markdown}\n"
        if seeds_figure:
            seeds_section += f"\n![Final clean training error, one dot per seed]({seeds_figure})\n"
    return f"""# Degradation study on {design["data"]["name"]}

Do skip connections prevent the degradation problem (He et al. 2015, arXiv:1512.03385, Sec. 4.1, Fig. 4)?

## Design (registered in `conf/` before the run)

{render_design(design)}

## Verdict: {result["answer"].capitalize()}

{result["text"]}

{render_comparisons(result)}

d is {TESTS[result.get("test", "welch")].explained}, in points of training error. {convergence_note}
{seeds_section}
## Models

{table_markdown}

## Learning curves

![Training (thin) and validation (bold) error per epoch]({figure_path})

Thin lines: running training error (under augmentation); bold lines: validation error; the mean over
seeds, with a min-max band on the training error where there are several.
"""
