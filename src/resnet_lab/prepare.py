"""The DVC `prepare` stage: build a TFDS dataset, hold out a validation split, and describe both.

TFDS's own `download_and_prepare` builds `data.name` into `paths.data_dir`. `<paths.prepared_dir>/<data.name>`
then holds `<split>_indices.npy`, sorted int64 indices into TFDS's `train` split (see `resnet_lab.data`),
stratified by label and drawn with `data.split_seed`, and `dataset.json`: per split its TFDS `source`, its
index file (null for a whole TFDS split), that file's sha256 and its class counts; the per-channel
`normalization` of the train split's pixels in [0, 1] at the stored resolution; the size and sha256 of every
file TFDS wrote (`tfds_files`), to catch a truncated or altered shard before training reads it. The test split
is TFDS's `test`, else its `validation` (imagenette), else a stratified `data.validation_fraction` of `train`,
held out first (tf_flowers). A failure leaves the previous directory, or none, never a partial one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from omegaconf import DictConfig
from tensorflow_datasets.core.download import resource as tfds_resource
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

from resnet_lab.config import stage_config
from resnet_lab.data import (
    DESCRIPTION_FILE,
    FORMAT_VERSION,
    dataset_info,
    file_sha256,
    prepared_dir,
    read_split,
)
from resnet_lab.errors import ConfigError, DataError, cli
from resnet_lab.files import replace_directory
from resnet_lab.schema import validate

OFFLINE_DATASET = "digits"
# TFDS retries an unreachable host for minutes (10 retries with backoff); one probe per host answers in
# seconds whether the download can start at all.
PROBE_TIMEOUT_S = 5.0
SCAN_BATCH = 1024


def prepare(cfg: DictConfig) -> dict:
    """Build `cfg.data.name` with TFDS, split its train split, and write `prepared_dir(cfg)`.

    Returns:
        The description written to `dataset.json` (see the module docstring).

    Raises:
        ConfigError: a configuration `resnet_lab.schema.validate` refuses, or a dataset without image and
            label features; checked before any work.
        DataError: the download failed, or the data cannot be split or has a constant channel.
    """
    validate(cfg)
    name, fraction, seed = cfg.data.name, cfg.data.validation_fraction, cfg.data.split_seed
    data_dir = Path(cfg.paths.data_dir)
    # Under downloads/, which is not a DVC output: a rerun of the prepare stage leaves it alone.
    manual_dir = Path(cfg.data.manual_dir) if cfg.data.manual_dir else data_dir / "downloads" / "manual"
    builder = tfds.builder(name, data_dir=data_dir)
    _check_features(builder)

    _download_and_prepare(builder, data_dir=data_dir, manual_dir=manual_dir)

    labels, pixel_sums, pixel_square_sums, pixel_counts = _scan(builder, "train")
    test_source = next((split for split in ("test", "validation") if split in builder.info.splits), None)
    all_train = np.arange(len(labels))
    if test_source is None:
        all_train, test_indices = _stratified_split(all_train, labels, fraction, seed, what="test")
    train_indices, validation_indices = _stratified_split(
        all_train, labels[all_train], fraction, seed, what="validation"
    )

    mean = pixel_sums[train_indices].sum(axis=0) / pixel_counts[train_indices].sum()
    variance = pixel_square_sums[train_indices].sum(axis=0) / pixel_counts[train_indices].sum() - mean**2
    std = np.sqrt(np.maximum(variance, 0.0))
    if not np.all(std > 0):
        raise DataError(f"{name}: a channel of the train images is constant (std {std.tolist()})")

    class_names = list(builder.info.features["label"].names)
    index_files = {"train": train_indices, "validation": validation_indices}
    if test_source is None:
        index_files["test"] = test_indices
    files, splits = {}, {}
    for split, indices in index_files.items():
        file = f"{split}_indices.npy"
        buffer = io.BytesIO()
        np.save(buffer, indices, allow_pickle=False)
        files[file] = buffer.getvalue()
        splits[split] = {
            "source": "train",
            "indices": file,
            "indices_sha256": hashlib.sha256(files[file]).hexdigest(),
            **_counts(labels[indices], class_names),
        }
    tfds_splits = {"train": len(labels)}
    if test_source is not None:
        test_labels = _labels(builder, test_source)
        tfds_splits[test_source] = len(test_labels)
        splits["test"] = {"source": test_source, "indices": None, "indices_sha256": None}
        splits["test"].update(_counts(test_labels, class_names))

    description = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": str(builder.version),
        "class_names": class_names,
        "image_shape": list(builder.info.features["image"].shape),
        "seed": seed,
        "validation_fraction": fraction,
        "tfds_splits": tfds_splits,
        "splits": splits,
        "normalization": {"mean": mean.tolist(), "std": std.tolist()},
        "tfds_files": _tfds_files(builder, data_dir),
    }
    files[DESCRIPTION_FILE] = (json.dumps(description, indent=2) + "\n").encode()
    replace_directory(prepared_dir(cfg), files)
    return description


def ensure_prepared(cfg: DictConfig) -> dict:
    """The description of `data.name` as `cfg` would prepare it, preparing it first where it is not.

    What a Hydra run does before it trains (the DVC pipeline has its own `prepare` stage). A dataset split
    with another `data.split_seed` or `data.validation_fraction` is prepared again; a lock keeps the jobs of
    a parallel sweep from building one dataset twice at once.

    Returns:
        The description (see `prepare`).

    Raises:
        DataError: the prepared files fail their checksums (see `resnet_lab.data.dataset_info`).
    """
    from filelock import FileLock

    def current() -> dict | None:
        if not (prepared_dir(cfg) / DESCRIPTION_FILE).is_file():
            return None
        info = dataset_info(cfg)
        split = (info["seed"], info["validation_fraction"])
        return info if split == (cfg.data.split_seed, cfg.data.validation_fraction) else None

    if (info := current()) is not None:
        return info
    lock_dir = Path(cfg.paths.prepared_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_dir / ".prepare.lock"):
        return current() or prepare(cfg)


def _check_features(builder: tfds.core.DatasetBuilder) -> None:
    features = builder.info.features
    has_image = "image" in features and isinstance(features["image"], tfds.features.Image)
    has_label = "label" in features and isinstance(features["label"], tfds.features.ClassLabel)
    if not (has_image and has_label):
        raise ConfigError(
            f"dataset {builder.name!r} needs an 'image' (Image) and a 'label' (ClassLabel) feature, "
            f"it has {sorted(features.keys())}"
        )


def _download_and_prepare(builder: tfds.core.DatasetBuilder, *, data_dir: Path, manual_dir: Path) -> None:
    """TFDS's own download_and_prepare, failing in seconds, on one line, when the download cannot work."""
    download_dir = data_dir / "downloads"
    if not builder.is_prepared():
        pending = _pending_downloads(builder, download_dir=download_dir, manual_dir=manual_dir)
        web = {urlparse(url).hostname: url for url in pending if urlparse(url).scheme in ("http", "https")}
        failures = _probe(web)
        if failures:
            reasons = ", ".join(f"{host} unreachable ({why})" for host, why in failures.items())
            raise DataError(_download_failed(builder, pending, manual_dir, reasons))
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_dir=download_dir, download_config=config)
    # requests is what TFDS downloads with (and why HTTP(S)_PROXY applies to the probe and TFDS alike).
    except (tfds.download.DownloadError, NonMatchingChecksumError, requests.RequestException) as exc:
        pending = _pending_downloads(builder, download_dir=download_dir, manual_dir=manual_dir)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise DataError(_download_failed(builder, pending, manual_dir, reason)) from exc


def _pending_downloads(builder: tfds.core.DatasetBuilder, *, download_dir: Path, manual_dir: Path) -> dict:
    """url -> the file name TFDS expects in `manual_dir`, for each download in neither it nor TFDS's cache."""
    pending = {}
    for url, url_info in (builder.url_infos or {}).items():
        if url_info.filename and (manual_dir / url_info.filename).exists():
            continue
        if (download_dir / tfds_resource.get_dl_fname(url, url_info.checksum)).exists():
            continue
        pending[url] = url_info.filename or os.path.basename(urlparse(url).path)
    return pending


def _probe(url_per_host: dict[str, str]) -> dict[str, str]:
    """host -> why it is unreachable, for each host without an HTTP answer (any status) to one URL in time."""
    failures: dict[str, str] = {}

    def ask(host: str, url: str) -> None:
        try:
            requests.head(url, timeout=PROBE_TIMEOUT_S, allow_redirects=False)
        except requests.RequestException as exc:
            # requests wraps urllib3's error, whose class says more (NameResolutionError, ProxyError).
            cause = getattr(exc.args[0], "reason", None) if exc.args else None
            failures[host] = type(cause if isinstance(cause, Exception) else exc).__name__

    # Daemon threads: a DNS lookup ignores the timeout, and must not keep the process alive.
    threads = {
        host: threading.Thread(target=ask, args=(host, url), daemon=True)
        for host, url in url_per_host.items()
    }
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + PROBE_TIMEOUT_S + 1
    for host, thread in threads.items():
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            failures.setdefault(host, f"no answer within {PROBE_TIMEOUT_S:g} s")
    return failures


def _download_failed(builder: tfds.core.DatasetBuilder, pending: dict, manual_dir: Path, reason: str) -> str:
    wanted = f" ({', '.join(sorted(set(pending.values())))})" if pending else ""
    return (
        f"download of {builder.name} failed: {reason}; TFDS looks for pre-downloaded files{wanted} in "
        f"{manual_dir} (data.manual_dir sets another folder); data={OFFLINE_DATASET} runs offline"
    )


def _scan(builder: tfds.core.DatasetBuilder, split: str):
    """One pass over a TFDS split: labels and each example's per-channel pixel sums, in index order.

    Returns:
        labels (n,), pixel sums (n, C), sums of squared pixels (n, C), pixels per channel (n,); pixels are
        scaled to [0, 1].
    """

    def summarise(example):
        image = tf.image.convert_image_dtype(example["image"], tf.float64)
        return (
            example["label"],
            tf.reduce_sum(image, axis=(0, 1)),
            tf.reduce_sum(tf.square(image), axis=(0, 1)),
            tf.cast(tf.shape(image)[0] * tf.shape(image)[1], tf.float64),
        )

    summaries = read_split(builder, split).map(summarise, num_parallel_calls=tf.data.AUTOTUNE)
    batches = list(summaries.batch(SCAN_BATCH).prefetch(tf.data.AUTOTUNE).as_numpy_iterator())
    if not batches:
        raise DataError(f"TFDS split {builder.name}/{split} is empty")
    return tuple(np.concatenate(parts) for parts in zip(*batches, strict=True))


def _labels(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
    examples = read_split(builder, split, decoders=tfds.decode.PartialDecoding({"label": True}))
    batches = examples.map(lambda example: example["label"]).batch(SCAN_BATCH).as_numpy_iterator()
    return np.concatenate([np.zeros(0, dtype=np.int64), *batches])


def _counts(labels: np.ndarray, class_names: list[str]) -> dict:
    per_class = np.bincount(labels, minlength=len(class_names)).tolist()
    return {"num_examples": int(len(labels)), "class_counts": dict(zip(class_names, per_class, strict=True))}


def _stratified_split(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int, *, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out `fraction` of `indices`, stratified by `labels`; both parts sorted."""
    from sklearn.model_selection import train_test_split

    try:
        kept, held_out = train_test_split(indices, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise DataError(
            f"cannot hold out a stratified {what} split of {fraction:g} from {len(indices)} examples: {exc}"
        ) from exc
    return np.sort(kept).astype(np.int64), np.sort(held_out).astype(np.int64)


def _tfds_files(builder: tfds.core.DatasetBuilder, data_dir: Path) -> dict:
    source = Path(builder.data_dir)
    if not source.is_relative_to(data_dir):  # `tfds.testing.mock_data` generates examples, reads no files
        return {}
    files = sorted(path for path in source.iterdir() if path.is_file())
    return {
        path.relative_to(data_dir).as_posix(): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in files
    }


@cli
def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m resnet_lab.prepare [--params params.yaml] [KEY=VALUE ...]``."""
    cfg = stage_config(argv, description="Build the TFDS dataset and its train/validation split.")
    description = prepare(cfg)
    counts = ", ".join(f"{split} {entry['num_examples']}" for split, entry in description["splits"].items())
    print(f"prepared {description['name']} {description['version']} in {prepared_dir(cfg)}: {counts}")


if __name__ == "__main__":
    main()
