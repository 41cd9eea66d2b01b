"""MLflow plumbing shared by training, evaluation and the report: where the store is, and what to tag."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from omegaconf import DictConfig

_DVC_TEMP_WORKSPACE = os.path.join(".dvc", "tmp", "exps")


def repo_root(start: Path | None = None) -> Path:
    """The repository root, seen through DVC's temporary experiment copies.

    `dvc exp run --temp` and queued experiments run in `<repo>/.dvc/tmp/exps/<...>`; their runs must land
    in the store of `<repo>`, not of the copy, which DVC deletes.
    """
    path = (start or Path.cwd()).resolve()
    text = str(path)
    marker = os.sep + _DVC_TEMP_WORKSPACE + os.sep
    if marker in text + os.sep:
        return Path((text + os.sep).split(marker, 1)[0])
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True, check=True
        ).stdout.strip()
        return Path(top)
    except (OSError, subprocess.CalledProcessError):
        return path


def tracking_uri(cfg: DictConfig) -> str:
    """`$MLFLOW_TRACKING_URI`, else `tracking.uri`, else SQLite at the repository root (absolute)."""
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    if cfg.tracking.get("uri"):
        return str(cfg.tracking.uri)
    return f"sqlite:///{repo_root() / 'mlflow.db'}"
