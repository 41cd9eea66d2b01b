"""The input pipeline: what the `prepare` stage recorded in `dataset.json`, and tf.data batches built from it.

The train and validation splits are subsets of TFDS's `train` split, stored as example indices. Index `i`
is the `i`-th example of the TFDS split in on-disk order (what `split=f"train[{i}:{i + 1}]"` reads), which
`read_split` reproduces by reading the shards one after another. One `make_dataset` serves training,
evaluation and the throughput benchmark.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from omegaconf import DictConfig

import resnet_lab.datasets  # noqa: F401  registers the package's TFDS builders (digits)
from resnet_lab.errors import ConfigError, DataError

DESCRIPTION_FILE = "dataset.json"
FORMAT_VERSION = 2
SPLITS = ("train", "validation", "test")
# Shuffle buffers hold a second copy of the examples, so they are bounded: all of CIFAR-10's 45k decoded
# 32x32 training images, a few thousand encoded 224 px ones. TFDS wrote the examples in shuffled order, so
# a partial buffer still mixes classes.
DECODED_SHUFFLE_BYTES = 512 * 2**20
ENCODED_SHUFFLE_BUFFER = 4096


@dataclass(frozen=True)
class DataSpec:
    """What a model and a training loop need to know about the prepared dataset.

    Attributes:
        class_names: one name per label value.
        input_shape: (height, width, channels) of the images `make_dataset` yields.
        num_examples: examples per split ("train", "validation", "test").
    """

    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    num_examples: dict[str, int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_batches(self, split: str, batch_size: int, *, training: bool) -> int:
        """Batches of the global `batch_size` per pass (steps per epoch); training drops a partial one."""
        count = self.num_examples[split]
        return count // batch_size if training else math.ceil(count / batch_size)


def read_split(builder: tfds.core.DatasetBuilder, split: str, *, decoders=None) -> tf.data.Dataset:
    """A TFDS split as example dicts, unbatched, in the on-disk order that split indices refer to.

    Args:
        decoders: TFDS `decoders`, e.g. to skip decoding images that a filter will drop.
    """
    # One shard at a time keeps the order fixed; no TFDS autocache, the pipeline caches after decoding.
    read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)
    return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders, read_config=read_config)


def check_dataset_name(name: str) -> None:
    """Fail on a dataset name TFDS does not know, suggesting close ones.

    Raises:
        ConfigError: `name` (TFDS's "name/config:version" form) is not in TFDS's catalogue.
    """
    known = tfds.list_builders(with_community_datasets=False)
    base = name.split(":")[0].split("/")[0]
    if base not in known:
        close = difflib.get_close_matches(base, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; tfds.list_builders() lists the choices"
        raise ConfigError(f"unknown dataset data.name={name!r}{hint}")


def prepared_dir(cfg: DictConfig) -> Path:
    """`<paths.prepared_dir>/<data.name>`: each dataset's split and statistics have their own directory."""
    return Path(cfg.paths.prepared_dir) / cfg.data.name


def dataset_info(cfg: DictConfig) -> dict:
    """Read `prepared_dir(cfg)/dataset.json` and verify the split index files and TFDS's files.

    Returns:
        The description the prepare stage wrote (its format: `resnet_lab.prepare`).

    Raises:
        DataError: the file is missing, unreadable, for another dataset, or an index file or a TFDS file
            is missing or does not match its checksum.
    """
    path = prepared_dir(cfg) / DESCRIPTION_FILE
    if not path.is_file():
        raise DataError(
            f"{path} not found: prepare {cfg.data.name} first (python -m resnet_lab.prepare "
            f"data.name={cfg.data.name}, or dvc repro prepare)"
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a valid dataset description ({type(exc).__name__}: {exc})") from exc
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a format_version {FORMAT_VERSION} dataset description: rerun prepare")
    fields = _FIELDS.split() + [f"splits.{split}.{key}" for split in SPLITS for key in _SPLIT_FIELDS.split()]
    if missing := [field for field in fields if not _has(info, field.split("."))]:
        raise DataError(f"{path} lacks {', '.join(missing)}: rerun the prepare stage")
    if info["name"] != cfg.data.name:
        raise DataError(
            f"{path} describes {info['name']!r}, but data.name is {cfg.data.name!r}: rerun the prepare stage"
        )
    for split in SPLITS:
        if info["splits"][split]["indices"]:
            _load_indices(path.parent, info["splits"][split])
    _check_tfds_files(Path(cfg.paths.data_dir), info["tfds_files"])
    return info


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (`hashlib.file_digest` needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# (path, size, mtime) of the TFDS files already verified by this process: a run reads the description
# once per split, and hashing gigabytes of shards each time would cost seconds.
_VERIFIED: set[tuple[str, int, int]] = set()


def _check_tfds_files(data_dir: Path, files: dict) -> None:
    """TFDS's records carry no checksum of their own: a truncated shard would fail in the middle of fit."""
    for name, expected in files.items():
        path = data_dir / name
        if not path.is_file():
            raise DataError(f"{path} is missing: rerun the prepare stage")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in _VERIFIED:
            continue
        if stat.st_size != expected["bytes"] or file_sha256(path) != expected["sha256"]:
            raise DataError(
                f"{path} does not match the checksum in dataset.json ({stat.st_size} bytes, prepared with "
                f"{expected['bytes']}): the TFDS data is corrupted; delete it and rerun the prepare stage"
            )
        _VERIFIED.add(key)


# What a reader uses: a damaged description fails in `dataset_info`, not in the middle of a pipeline.
_FIELDS = "name version class_names image_shape tfds_splits normalization.mean normalization.std tfds_files"
_SPLIT_FIELDS = "source indices indices_sha256 num_examples"


def _has(node, keys: list[str]) -> bool:
    return not keys or (isinstance(node, dict) and keys[0] in node and _has(node[keys[0]], keys[1:]))


def data_spec(cfg: DictConfig) -> DataSpec:
    """Classes, input shape and split sizes of the prepared dataset, for a model and a training loop."""
    info = dataset_info(cfg)
    size = cfg.data.image_size
    return DataSpec(
        class_names=tuple(info["class_names"]),
        input_shape=(size, size, info["image_shape"][-1]),
        num_examples={split: info["splits"][split]["num_examples"] for split in SPLITS},
    )


def make_dataset(split: str, cfg: DictConfig, training: bool) -> tf.data.Dataset:
    """Batches of (image, label) for one split: normalised float32 images of `data.image_size`.

    Decoding and resizing are cached when `data.cache`. The same seed gives the same batches.

    Args:
        split: one of `SPLITS`.
        cfg: the configuration, validated (`data`, `paths`, `seed`, `trainer.batch_size`, the global batch).
        training: shuffle with the run's `seed`, pad by `data.pad_crop` pixels (of the resized image) and
            crop back at random, flip at random when `data.horizontal_flip`, drop the last partial batch.

    Returns:
        A prefetching dataset of batches: images (batch, H, W, C) float32, labels (batch,) int64.

    Raises:
        ConfigError: an unknown split.
        DataError: the prepared description or the TFDS data it refers to cannot be trusted.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    size, pad, batch_size = cfg.data.image_size, cfg.data.pad_crop, cfg.trainer.batch_size

    info = dataset_info(cfg)
    entry = info["splits"][split]
    # The version the indices were drawn from, even if data.name leaves it to TFDS's default.
    name_without_version = info["name"].split(":")[0]
    builder = tfds.builder(f"{name_without_version}:{info['version']}", data_dir=cfg.paths.data_dir)
    image_feature = builder.info.features["image"]
    channels = info["image_shape"][-1]

    # Images stay encoded until the index filter has dropped the other split's examples.
    examples = read_split(builder, entry["source"], decoders={"image": tfds.decode.SkipDecoding()})
    if entry["indices"]:
        source, source_size = entry["source"], info["tfds_splits"][entry["source"]]
        # Indices only mean something against the TFDS split they were drawn from.
        if source in builder.info.splits and builder.info.splits[source].num_examples != source_size:
            raise DataError(
                f"TFDS split {builder.name}/{source} in {cfg.paths.data_dir} has "
                f"{builder.info.splits[source].num_examples} examples, but the prepared split indices were "
                f"drawn from {source_size}: rerun the prepare stage"
            )
        keep = np.zeros(source_size, dtype=bool)
        keep[_load_indices(prepared_dir(cfg), entry)] = True
        keep = tf.constant(keep)
        examples = examples.enumerate().filter(lambda index, example: keep[index])
        examples = examples.map(lambda index, example: example)
        # A filter hides the size; Keras needs it to end an epoch without running the iterator dry.
        examples = examples.apply(tf.data.experimental.assert_cardinality(entry["num_examples"]))

    def decode_and_resize(example):
        image = tf.image.convert_image_dtype(image_feature.decode_example(example["image"]), tf.float32)
        if tuple(image.shape[:2]) != (size, size):
            image = tf.image.resize(image, (size, size), antialias=True)
        return tf.ensure_shape(image, (size, size, channels)), example["label"]

    if training and not cfg.data.cache:
        # Decoded again every epoch anyway: shuffle the compact encoded records.
        examples = examples.shuffle(min(entry["num_examples"], ENCODED_SHUFFLE_BUFFER), seed=cfg.seed)
    dataset = examples.map(decode_and_resize, num_parallel_calls=tf.data.AUTOTUNE)
    if cfg.data.cache:
        dataset = dataset.cache()
        if training:
            image_bytes = size * size * channels * 4
            buffer = min(entry["num_examples"], max(1, DECODED_SHUFFLE_BYTES // image_bytes))
            dataset = dataset.shuffle(buffer, seed=cfg.seed)
    # Augmenting and normalising whole batches costs one op per batch, not per image: a per-image
    # augmentation map ran at 13k images/s on 2 CPU cores, this at 90k.
    dataset = dataset.batch(batch_size, drop_remainder=training)
    if training and (pad or cfg.data.horizontal_flip):
        dataset = _augment(dataset, size=size, pad=pad, flip=cfg.data.horizontal_flip, seed=cfg.seed)

    mean = tf.constant(info["normalization"]["mean"], tf.float32)
    std = tf.constant(info["normalization"]["std"], tf.float32)
    dataset = dataset.map(
        lambda images, labels: ((images - mean) / std, labels), num_parallel_calls=tf.data.AUTOTUNE
    )
    options = tf.data.Options()
    # Under MultiWorkerMirroredStrategy each worker keeps every n-th batch. Sharding by file (TF's
    # default where it can) would hand each worker whole TFDS shards, and the index filter above counts
    # examples across all of them.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _augment(dataset: tf.data.Dataset, *, size: int, pad: int, flip: bool, seed: int) -> tf.data.Dataset:
    """Per-image random pad-and-crop and flips of whole batches (He et al. 2015, Sec. 4.2).

    Stateless ops draw from one seed per batch, taken from a stream that `seed` fixes and that changes
    every epoch, so parallel map calls cannot reorder the randomness and a seed gives the same batches.
    """
    batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    padded_size = size + 2 * pad

    def augment(batch, batch_seed):
        images, labels = batch
        crop_seed, flip_seed = tf.unstack(tf.random.split(batch_seed, num=2))
        if pad:
            count = tf.shape(images)[0]
            images = tf.image.pad_to_bounding_box(images, pad, pad, padded_size, padded_size)
            corners = tf.random.stateless_uniform((count, 2), crop_seed, maxval=2 * pad + 1, dtype=tf.int32)
            # Boxes over exact pixel centres: "nearest" sampling copies the pixels, no interpolation.
            boxes = tf.cast(tf.concat([corners, corners + size - 1], axis=1), tf.float32) / (padded_size - 1)
            images = tf.image.crop_and_resize(images, boxes, tf.range(count), (size, size), method="nearest")
        if flip:
            images = tf.image.stateless_random_flip_left_right(images, seed=flip_seed)
        return images, labels

    return tf.data.Dataset.zip(dataset, batch_seeds).map(augment, num_parallel_calls=tf.data.AUTOTUNE)


def _load_indices(prepared_dir: Path, entry: dict) -> np.ndarray:
    """The example indices of one split, after checking the file against its recorded sha256."""
    path = prepared_dir / entry["indices"]
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise DataError(f"split index file {path} cannot be read ({exc}): rerun the prepare stage") from exc
    digest = hashlib.sha256(content).hexdigest()
    if digest != entry["indices_sha256"]:
        raise DataError(
            f"split index file {path} is corrupted: sha256 {digest} does not match "
            f"{entry['indices_sha256']} recorded in {DESCRIPTION_FILE}; rerun the prepare stage"
        )
    indices = np.load(io.BytesIO(content), allow_pickle=False)
    if indices.ndim != 1 or len(indices) != entry["num_examples"]:
        raise DataError(
            f"split index file {path} holds shape {indices.shape}, not ({entry['num_examples']},)"
        )
    return indices
