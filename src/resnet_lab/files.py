"""Writing results so that a kill at any instant leaves the old file or the new one, never a part."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextmanager
def staged_files(target_dir: str | os.PathLike) -> Iterator[Path]:
    """Write files into a temporary directory; on success each one replaces its namesake in `target_dir`.

    A crash or an exception leaves `target_dir` as it was; success creates it if missing. The staging
    directory sits beside it, on the same file system, so each move is one rename.

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


def replace_directory(prepared_dir: Path, files: dict[str, bytes]) -> None:
    """Write `files` (name -> content) into a new directory beside `prepared_dir`, then swap it in whole.

    The previous directory is moved aside before the rename and removed only after it, so a failure at
    any point leaves either the old directory or the new one, complete.
    """
    prepared_dir.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = prepared_dir.with_name(f".{prepared_dir.name}.new-{token}")
    stale = prepared_dir.with_name(f".{prepared_dir.name}.old-{token}")
    staging.mkdir()
    try:
        for name, content in files.items():
            (staging / name).write_bytes(content)
        if prepared_dir.exists():
            prepared_dir.rename(stale)
        try:
            staging.rename(prepared_dir)
        except OSError:
            if stale.exists():
                stale.rename(prepared_dir)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone once renamed into place
    shutil.rmtree(stale, ignore_errors=True)
