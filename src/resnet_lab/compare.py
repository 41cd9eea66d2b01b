"""The compare stage: the degradation report over every study member (`study.models` x `study.seeds`).

    python -m resnet_lab.compare [--params params.yaml]

It reads each member's run directory (`summary.json`, `history.csv`) and its evaluation
(`<paths.metrics_dir>/<model>-<seed>.json`: the clean final training error, the study's endpoint), tests the
claims registered in `study.claims`, and writes to `<paths.reports_dir>/`: `degradation.md` (the design it
ran, the verdict, the claims with their tests, the table, the figures), `learning_curves.png`,
`final_errors.png`, `verdict.json` (flat numbers and booleans for `dvc metrics`), `curves.csv` (long
learning curves) and `curves_by_model.csv` (seed means, one column per model and curve, for stock `dvc plots`
templates), all also logged, with the verdict's numbers, to the MLflow study run `study-<data.name>`.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from resnet_lab.config import member_name, run_dir, stage_config
from resnet_lab.errors import ConfigError, cli
from resnet_lab.evaluate import metrics_path, study_members
from resnet_lab.files import staged_files
from resnet_lab.report import (
    check_design,
    convergence,
    curves_by_model,
    curves_frame,
    member_record,
    model_table,
    plot_final_errors,
    plot_learning_curves,
    render_report,
    render_seeds,
    render_table,
    verdict,
)
from resnet_lab.schema import validate
from resnet_lab.tracking import open_run, register_champion
from resnet_lab.train import sigterm_as_interrupt

REPORT_FILE = "degradation.md"
FIGURE_FILE = "learning_curves.png"
SEEDS_FIGURE_FILE = "final_errors.png"
ARTIFACT_DIR = "report"


def _claims(cfg: DictConfig) -> list[dict]:
    return [dict(claim) for claim in OmegaConf.to_container(cfg.study.claims, resolve=True)]


def load_members(cfg: DictConfig) -> list[dict]:
    """Read the training summary, learning curves and evaluation of every member of `cfg`'s study.

    Returns:
        One dict per member, models outer and seeds inner: `model`, `seed`, `member` (its name),
        `summary` (summary.json), `history` (history.csv as a DataFrame) and `evaluation`.

    Raises:
        ConfigError: the study is empty or not testable as registered, or members have not been trained
            or evaluated; the message names each such member and the stage to run.
    """
    members_cfg = study_members(cfg)
    validate(cfg)
    try:
        check_design(
            list(cfg.study.models), _claims(cfg), alpha=float(cfg.study.alpha), margin=float(cfg.study.margin)
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    members, incomplete = [], []
    for member_cfg in members_cfg:
        model, seed, member = str(member_cfg.model.name), int(member_cfg.seed), member_name(member_cfg)
        run_path, evaluation_path = run_dir(member_cfg), metrics_path(member_cfg)
        needed = {
            run_path / "summary.json": f"train@{member}",
            run_path / "history.csv": f"train@{member}",
            evaluation_path: "evaluate",
        }
        absent = [f"{path} not found: run {stage}" for path, stage in needed.items() if not path.is_file()]
        if absent:
            incomplete.append(f"{model} seed {seed} ({absent[0]})")
            continue
        members.append(
            {
                "model": model,
                "seed": seed,
                "member": member,
                "summary": json.loads((run_path / "summary.json").read_text()),
                "history": pd.read_csv(run_path / "history.csv"),
                "evaluation": json.loads(evaluation_path.read_text()),
            }
        )
    if incomplete:
        raise ConfigError(f"study members not ready: {'; '.join(incomplete)}")
    return members


def study_design(cfg: DictConfig, members: Sequence[dict]) -> dict:
    """The design the study ran, as `resnet_lab.report.render_design` shows it, from the configuration."""
    from resnet_lab.train import effective_learning_rate

    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    steps = {m["summary"].get("steps") for m in members}
    return {
        "data": plain(cfg.data),
        "models": list(cfg.study.models),
        "seeds": [int(seed) for seed in cfg.study.seeds],
        "model": plain(cfg.model),
        "optimizer": plain(cfg.optimizer) | {"effective_learning_rate": effective_learning_rate(cfg)},
        "schedule": plain(cfg.schedule),
        "trainer": plain(cfg.trainer),
        "steps": f"{steps.pop():,}" if len(steps) == 1 and None not in steps else "unequal or unrecorded",
        "alpha": float(cfg.study.alpha),
        "margin": float(cfg.study.margin),
        "test": str(cfg.study.test),
        "convergence": plain(cfg.study.convergence),
        "params": {m["model"]: int(m["summary"]["params"]) for m in members},
    }


def write_report(cfg: DictConfig, members: Sequence[dict]) -> tuple[dict, pd.DataFrame, list[Path]]:
    """Compute the verdict, table and curves of the study members and write the report files atomically.

    Args:
        cfg: the composed configuration (`study`, `paths.reports_dir`, `data.name`).
        members: what `load_members` returned.

    Returns:
        The verdict (also in `verdict.json`, with the study's dataset, models and seeds), the per-model
        table (`resnet_lab.report.model_table`) and the paths written.
    """
    design = study_design(cfg, members)
    by_seed = {model: {} for model in design["models"]}
    for member in members:
        by_seed[member["model"]][int(member["seed"])] = float(member["evaluation"]["train_error"])
    errors = {model: list(per_seed.values()) for model, per_seed in by_seed.items()}
    result = verdict(
        errors, _claims(cfg), alpha=design["alpha"], margin=design["margin"], test=design["test"]
    )
    result["study"] = {"dataset": str(cfg.data.name), "models": design["models"], "seeds": design["seeds"]}

    curves = curves_frame({(member["model"], member["seed"]): member["history"] for member in members})
    slopes = convergence(curves, **design["convergence"])
    result["convergence"] = slopes
    table = model_table([member_record(member["summary"], member["evaluation"]) for member in members])
    reports_dir = Path(cfg.paths.reports_dir)
    with staged_files(reports_dir) as staging:
        plot_learning_curves(curves, staging / FIGURE_FILE, title=f"{cfg.data.name}: error per epoch")
        curves.to_csv(staging / "curves.csv", index=False)
        curves_by_model(curves).to_csv(staging / "curves_by_model.csv", index=False)
        (staging / "verdict.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_final_errors(by_seed, staging / SEEDS_FIGURE_FILE)
        markdown = render_report(
            result,
            render_table(table, slopes),
            FIGURE_FILE,
            design=design,
            slopes=slopes,
            seeds_markdown=render_seeds(by_seed),
            seeds_figure=SEEDS_FIGURE_FILE,
        )
        (staging / REPORT_FILE).write_text(markdown)
        written = [reports_dir / path.name for path in sorted(staging.iterdir())]
    return result, table, written


def compare(cfg: DictConfig) -> dict:
    """Write the degradation report for `cfg`'s study and record it as an MLflow study run.

    Returns:
        The verdict (see `resnet_lab.report.verdict`) with the study run's id under `mlflow_run_id`.

    Raises:
        ConfigError: a study member is missing (see `load_members`).
    """
    members = load_members(cfg)
    tags = {"resnet_lab.dataset": str(cfg.data.name)}
    with open_run(cfg, "study", f"study-{cfg.data.name}", tags=tags) as run:
        result, table, paths = write_report(cfg, members)
        if run is None:  # tracking=off
            return result | {"mlflow_run_id": None}
        run.log_params(
            {
                "study.models": ",".join(result["study"]["models"]),
                "study.seeds": ",".join(str(seed) for seed in result["study"]["seeds"]),
                "data.name": cfg.data.name,
            }
        )
        flat = ("_difference", "_p_value", "_shown")  # the verdict's numbers for `dvc metrics`
        metrics = {key: value for key, value in result.items() if key.endswith(flat) and value is not None}
        for row in table.itertuples(index=False):
            metrics[f"train_error_{row.model}"] = row.train_error_mean
            metrics[f"test_error_{row.model}"] = row.test_error_mean
        run.log_metrics(metrics)
        run.set_tags(
            {"resnet_lab.answer": result["answer"]}
            | {
                f"resnet_lab.member.{m['member']}": str(m["summary"]["mlflow_run_id"])
                for m in members
                if m["summary"].get("mlflow_run_id")
            }
        )
        for path in paths:
            run.log_artifact(path, artifact_path=ARTIFACT_DIR)
        if cfg.tracking.get("register", True):
            register_champion(run, cfg, members, result["answer"])
    return result | {"mlflow_run_id": run.run_id}


@cli
def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m resnet_lab.compare [--params params.yaml]``."""
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    cfg = stage_config(argv, description="Write the degradation report over every study member.")
    result = compare(cfg)
    print(f"{result['text']}\nreport: {Path(cfg.paths.reports_dir) / REPORT_FILE}")


if __name__ == "__main__":
    main()
