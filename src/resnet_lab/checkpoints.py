"""Checkpoints that are whole or absent: Keras's `BackupAndRestore`, written by rename.

Keras's callback overwrites `latest.weights.h5` and `training_metadata.json` in place, so a kill during the
write leaves a file that cannot be read and metadata that still names it. Here each epoch's weights and
optimizer state go to a new `epoch-<N>.weights.h5` under a temporary name, renamed when complete, and then
the `training_metadata.json` naming it is renamed into place; the previous checkpoint stays until the next
one is whole. A checkpoint that cannot be read anyway (a damaged disk, a file system without atomic rename)
costs one warning: training resumes from the newest one that reads, or starts afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

import keras

from resnet_lab.files import write_text_atomically

log = logging.getLogger(__name__)

METADATA_FILE = "training_metadata.json"
_WEIGHTS = re.compile(r"^epoch-(\d+)\.weights\.h5$")
# Keras's save_weights wants the `.weights.h5` suffix, so the temporary name keeps it.
_PARTIAL_PREFIX = ".partial-"


def restorable(backup_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest checkpoint in `backup_dir` that reads whole, as (finished epochs, weights file).

    The one `training_metadata.json` names comes first; any other whole `epoch-<N>.weights.h5` is a
    fallback, newest first. A file that does not read is named in one warning line and removed.

    Returns:
        None when there is nothing to resume from: the run starts afresh.
    """
    import h5py

    backup_dir = Path(backup_dir)
    if not backup_dir.is_dir():
        return None
    candidates = sorted(
        (int(match.group(1)), backup_dir / name)
        for name in os.listdir(backup_dir)
        if (match := _WEIGHTS.match(name))
    )[::-1]
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # no metadata, or damaged
        named = json.loads((backup_dir / METADATA_FILE).read_text())["weights"]
        candidates.sort(key=lambda candidate: candidate[1].name != named)
    for epoch, path in candidates:
        try:  # every dataset: a damaged file may still open
            with h5py.File(path, "r") as handle:
                handle.visititems(lambda _, item: item[()] if isinstance(item, h5py.Dataset) else None)
            return epoch, path
        except Exception as exc:  # noqa: BLE001  h5py raises OSError, KeyError, RuntimeError... for damage
            older = [str(p) for e, p in candidates if e < epoch]
            log.warning(
                "checkpoint %s cannot be read (%s): removed it, %s",
                path,
                f"{type(exc).__name__}: {exc}",
                f"falling back to an older one ({older[0]})" if older else "starting afresh",
            )
        # It would never read; removed, it is not warned about again by the next look.
        path.unlink(missing_ok=True)
    return None


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras's `BackupAndRestore` (one backup per epoch, by default) with checkpoints whole or absent."""

    def on_train_begin(self, logs=None):
        found = restorable(self.backup_dir)
        if found is None:
            return
        epoch, path = found
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(str(path))
        self.model._initial_epoch = epoch

    def _save_model(self):
        backup_dir = Path(self.backup_dir)
        backup_dir.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{self._current_epoch:04d}.weights.h5"
        partial = backup_dir / f"{_PARTIAL_PREFIX}{name}"
        self.model.save_weights(str(partial), overwrite=True)
        os.replace(partial, backup_dir / name)
        write_text_atomically(
            backup_dir / METADATA_FILE, json.dumps({"epoch": self._current_epoch, "weights": name})
        )
        # Keep the previous checkpoint as the fallback; drop older ones and leftovers of killed writes.
        keep = {name, f"epoch-{self._current_epoch - 1:04d}.weights.h5", METADATA_FILE}
        for stale in os.listdir(backup_dir):
            if stale not in keep and (_WEIGHTS.match(stale) or stale.startswith(_PARTIAL_PREFIX)):
                (backup_dir / stale).unlink(missing_ok=True)
