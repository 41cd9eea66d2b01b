"""The data layer for real: the `digits` TFDS build, the prepare stage, and the tf.data pipeline.

digits is built end to end into a temporary directory; cifar10 goes through the same code with
`tfds.testing.mock_data` standing in for its download; the offline failure runs against a proxy that
refuses connections, so it fails the same way on a machine with network.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow_datasets as tfds
from omegaconf import OmegaConf

from conftest import run_cli
from resnet_lab.config import compose
from resnet_lab.data import data_spec, dataset_info, make_dataset
from resnet_lab.errors import ConfigError, DataError
from resnet_lab.prepare import ensure_prepared, main, prepare

DIGITS_TRAIN, DIGITS_TEST = 1437, 360


def make_cfg(root, *overrides, data="digits"):
    """The real conf/ with data and outputs under `root` and the CPU-smoke trainer (batch 16)."""
    return compose(
        [
            f"data={data}",
            "trainer=cpu_smoke",
            f"paths.data_dir={root / 'tfds'}",
            f"paths.prepared_dir={root / 'prepared'}",
            *overrides,
        ]
    )


def batches(dataset):
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in dataset), strict=True)
    return np.concatenate(images), np.concatenate(labels)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """digits built and prepared once (seed 0); tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("digits")
    prepare(make_cfg(root))
    return root


@pytest.fixture
def digits_copy(digits_root, tmp_path):
    """A private prepared dir over the shared TFDS build."""
    shutil.copytree(digits_root / "prepared", tmp_path / "prepared")
    (tmp_path / "tfds").symlink_to(digits_root / "tfds")
    return tmp_path


@pytest.fixture
def refusing_proxy(monkeypatch):
    """Route HTTP(S) through a port on 127.0.0.1 that nothing listens on: every download fails at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)


def test_digits_builder_writes_official_stratified_tfds_splits(digits_root):
    from sklearn.datasets import load_digits

    builder = tfds.builder("digits", data_dir=digits_root / "tfds")

    assert builder.is_prepared()
    assert {name: split.num_examples for name, split in builder.info.splits.items()} == {
        "train": DIGITS_TRAIN,
        "test": DIGITS_TEST,
    }
    features = builder.info.features
    assert features["image"].shape == (8, 8, 1) and features["image"].np_dtype == np.uint8
    assert features["label"].names == [str(digit) for digit in range(10)]
    assert builder.info.supervised_keys == ("image", "label")
    images, labels = {}, {}
    for split in ("train", "test"):
        examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
        images[split] = np.stack([example["image"] for example in examples])
        labels[split] = np.array([example["label"] for example in examples])
    assert images["train"].max() == 255 and images["train"].min() == 0
    # Every load_digits image once, each class split 80/20.
    per_class = np.bincount(load_digits().target)
    assert np.array_equal(np.bincount(labels["train"]) + np.bincount(labels["test"]), per_class)
    assert np.all(np.abs(np.bincount(labels["test"]) - 0.2 * per_class) <= 1)


def test_prepare_records_a_stratified_index_split_and_train_statistics(digits_root):
    prepared = digits_root / "prepared" / "digits"
    info = json.loads((prepared / "dataset.json").read_text())

    assert sorted(path.name for path in prepared.iterdir()) == [
        "dataset.json",
        "train_indices.npy",
        "validation_indices.npy",
    ]
    assert [path.name for path in digits_root.iterdir() if path.name.startswith(".")] == []
    assert (info["name"], info["version"], info["image_shape"]) == ("digits", "1.0.0", [8, 8, 1])
    assert info["class_names"] == [str(digit) for digit in range(10)]
    assert info["tfds_splits"] == {"train": DIGITS_TRAIN, "test": DIGITS_TEST}
    counts = {split: entry["num_examples"] for split, entry in info["splits"].items()}
    assert counts == {"train": 1149, "validation": 288, "test": DIGITS_TEST}
    assert info["splits"]["test"]["source"] == "test" and info["splits"]["test"]["indices"] is None

    indices = {
        split: np.load(prepared / info["splits"][split]["indices"]) for split in ("train", "validation")
    }
    for split, split_indices in indices.items():
        assert (
            hashlib.sha256((prepared / f"{split}_indices.npy").read_bytes()).hexdigest()
            == (info["splits"][split]["indices_sha256"])
        )
        assert np.all(np.diff(split_indices) > 0)
    assert np.array_equal(np.union1d(indices["train"], indices["validation"]), np.arange(DIGITS_TRAIN))
    assert np.intersect1d(indices["train"], indices["validation"]).size == 0

    # Index i is the i-th example of TFDS's train split: labels and pixels read directly agree.
    builder = tfds.builder("digits", data_dir=digits_root / "tfds")
    examples = list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))
    labels = np.array([example["label"] for example in examples])
    for split in ("train", "validation"):
        assert (
            list(info["splits"][split]["class_counts"].values())
            == np.bincount(labels[indices[split]]).tolist()
        )
    total = np.bincount(labels)
    assert np.all(np.abs(np.bincount(labels[indices["validation"]]) - 0.2 * total) <= 1)
    train_pixels = np.stack([example["image"] for example in examples])[indices["train"]] / 255
    assert info["normalization"]["mean"] == pytest.approx([train_pixels.mean()], rel=1e-9)
    assert info["normalization"]["std"] == pytest.approx([train_pixels.std()], rel=1e-9)


def test_normalised_splits_hold_their_examples_with_zero_mean_and_unit_std(digits_root):
    # At the stored resolution, where the statistics were measured.
    cfg = make_cfg(digits_root, "data.image_size=8")
    info = dataset_info(cfg)

    for split in ("train", "validation", "test"):
        images, labels = batches(make_dataset(split, cfg, training=False))
        assert images.shape == (info["splits"][split]["num_examples"], 8, 8, 1)
        assert np.bincount(labels).tolist() == list(info["splits"][split]["class_counts"].values())
        if split == "train":
            assert images.mean() == pytest.approx(0, abs=1e-4)
            assert images.std() == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("cache", [True, False])
def test_training_batches_are_resized_augmented_and_full(digits_root, cache):
    cfg = make_cfg(digits_root, "data.image_size=32", "data.horizontal_flip=true", f"data.cache={cache}")
    spec = data_spec(cfg)
    assert (spec.num_classes, spec.input_shape) == (10, (32, 32, 1))
    assert spec.num_examples == {"train": 1149, "validation": 288, "test": DIGITS_TEST}

    dataset = make_dataset("train", cfg, training=True)
    epochs = [list(dataset), list(dataset)]
    assert len(epochs[0]) == spec.num_batches("train", 16, training=True) == 1149 // 16
    images, labels = epochs[0][0]
    assert images.shape == (16, 32, 32, 1) and images.dtype.name == "float32"
    assert labels.shape == (16,) and labels.dtype.is_integer
    assert not np.array_equal(epochs[0][0][0], epochs[1][0][0]), "every epoch should reshuffle and re-augment"

    test_images, _ = batches(make_dataset("test", cfg, training=False))
    assert test_images.shape == (DIGITS_TEST, 32, 32, 1)
    assert spec.num_batches("test", 16, training=False) == 23


def test_augmentation_crops_exact_shifted_windows_and_flips_about_half():
    import tensorflow as tf

    from resnet_lab.data import _augment

    images = tf.random.stateless_uniform((64, 8, 8, 3), seed=(1, 2))
    batch = tf.data.Dataset.from_tensors((images, tf.zeros(64, tf.int64)))
    ((cropped, _),) = list(_augment(batch, size=8, pad=2, flip=False, seed=0))
    ((flipped, _),) = list(_augment(batch, size=8, pad=0, flip=True, seed=0))

    padded = np.pad(images.numpy(), ((0, 0), (2, 2), (2, 2), (0, 0)))
    windows = [
        {
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(crop, padded[k, dy : dy + 8, dx : dx + 8])
        }
        for k, crop in enumerate(cropped.numpy())
    ]
    assert all(windows), "every crop is an 8x8 window of the zero-padded image, pixel for pixel"
    assert len(set().union(*windows)) > 10, "offsets differ between the images of a batch"
    pairs = list(zip(flipped.numpy(), images.numpy(), strict=True))
    mirrored = [np.array_equal(out, image[:, ::-1]) for out, image in pairs]
    assert all(mirrored[k] or np.array_equal(out, image) for k, (out, image) in enumerate(pairs))
    assert 16 < sum(mirrored) < 48


def test_same_seed_same_split_and_batches_other_seed_another_split(digits_root, tmp_path):
    again = make_cfg(tmp_path / "again")
    again.paths.data_dir = str(digits_root / "tfds")
    other = make_cfg(tmp_path / "other", "seed=1", "data.split_seed=1")
    other.paths.data_dir = str(digits_root / "tfds")
    prepare(again)
    prepare(other)

    first = digits_root / "prepared" / "digits"
    for name in ("train_indices.npy", "validation_indices.npy", "dataset.json"):
        assert (tmp_path / "again" / "prepared" / "digits" / name).read_bytes() == (first / name).read_bytes()
    assert not np.array_equal(
        np.load(first / "validation_indices.npy"),
        np.load(tmp_path / "other" / "prepared" / "digits" / "validation_indices.npy"),
    )
    first_batch = [next(iter(make_dataset("train", again, training=True)))[0].numpy() for _ in range(2)]
    assert np.array_equal(*first_batch)
    other_batch = next(iter(make_dataset("train", other, training=True)))[0].numpy()
    assert not np.array_equal(first_batch[0], other_batch)


def test_cifar10_through_the_real_code_with_a_mocked_download(tmp_path):
    examples = 200
    # TFDS's recorded split sizes, as `mock_data` wants them (MockPolicy.USE_FILES).
    metadata_dir = tmp_path / "metadata"
    builder = tfds.builder("cifar10", data_dir=metadata_dir)
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name="cifar10", filetype_suffix="tfrecord"
    )
    split_infos = [
        tfds.core.SplitInfo(name=split, shard_lengths=[examples], num_bytes=0, filename_template=template)
        for split in ("train", "test")
    ]
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    cfg = make_cfg(tmp_path, data="cifar10")

    with tfds.testing.mock_data(
        num_examples=examples, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(metadata_dir)
    ):
        info = prepare(cfg)
        images, labels = next(iter(make_dataset("train", cfg, training=True)))
        test_images, _ = batches(make_dataset("test", cfg, training=False))

    assert (info["name"], info["image_shape"]) == ("cifar10", [32, 32, 3])
    assert {split: entry["num_examples"] for split, entry in info["splits"].items()} == {
        "train": 180,
        "validation": 20,
        "test": examples,
    }
    # The mock draws uniform bytes: mean 0.5, std 0.29 in every channel.
    assert info["normalization"]["mean"] == pytest.approx([0.5] * 3, abs=0.02)
    assert info["normalization"]["std"] == pytest.approx([0.289] * 3, abs=0.02)
    assert images.shape == (16, 32, 32, 3) and labels.shape == (16,)
    assert test_images.shape == (examples, 32, 32, 3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.name=cifar1O", "unknown dataset data.name='cifar1O'; did you mean cifar10"),
        (
            "data.name=imdb_reviews",
            "needs an 'image' (Image) and a 'label' (ClassLabel) feature, it has ['label', 'text']",
        ),
        ("data.validation_fraction=0", "data.validation_fraction must be a number in (0, 1), got 0"),
        ("data.validation_fraction=1.0", "data.validation_fraction must be a number in (0, 1), got 1.0"),
        ("data.validation_fraction=-0.1", "got -0.1"),
        ("data.image_size=0", "data.image_size must be a positive integer, got 0"),
        ("data.image_size=-32", "got -32"),
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError) as raised:
        prepare(make_cfg(tmp_path, override))

    assert message in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_offline_download_fails_fast_on_one_line_leaving_no_prepared_dir(tmp_path, refusing_proxy):
    cfg = make_cfg(tmp_path, data="cifar10")

    started = time.monotonic()
    with pytest.raises(DataError) as raised:
        prepare(cfg)

    assert time.monotonic() - started < 30
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("download of cifar10 failed: www.cs.toronto.edu unreachable")
    assert f"in {tmp_path / 'tfds' / 'downloads' / 'manual'} (data.manual_dir sets another folder)" in message
    assert "cifar-10-binary.tar.gz" in message and "data=digits runs offline" in message
    assert not (tmp_path / "prepared").exists()


def test_prepare_stage_cli_reports_the_offline_failure_in_seconds(tmp_path, refusing_proxy):
    params = tmp_path / "params.yaml"
    manual_dir = tmp_path / "manual"
    OmegaConf.save(make_cfg(tmp_path, f"data.manual_dir={manual_dir}", data="cifar10"), params)

    started = time.monotonic()
    result = run_cli(["resnet_lab.prepare", "--params", params], tmp_path, timeout=240)

    # TFDS's own retries would take minutes; a shared 2-core machine takes up to half a minute to start.
    assert time.monotonic() - started < 90
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert error_lines[0].startswith("error: download of cifar10 failed")
    assert f"in {manual_dir} (data.manual_dir" in error_lines[0]
    assert not (tmp_path / "prepared").exists()


def test_prepare_cli_writes_the_prepared_dir(digits_root, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    cfg = make_cfg(tmp_path)
    cfg.paths.data_dir = str(digits_root / "tfds")
    OmegaConf.save(cfg, params)

    main(["--params", str(params), "data.split_seed=1"])

    assert "prepared digits 1.0.0" in capsys.readouterr().out
    assert json.loads((tmp_path / "prepared" / "digits" / "dataset.json").read_text())["seed"] == 1


def test_a_hydra_run_prepares_what_is_missing_or_split_otherwise_and_refuses_what_is_damaged(
    digits_root, tmp_path
):
    def cfg(*overrides):
        made = make_cfg(tmp_path, *overrides)
        made.paths.data_dir = str(digits_root / "tfds")
        return made

    description = tmp_path / "prepared" / "digits" / "dataset.json"
    info = ensure_prepared(cfg())
    assert json.loads(description.read_text()) == info
    written = description.stat().st_mtime_ns
    assert ensure_prepared(cfg()) == info and description.stat().st_mtime_ns == written
    assert ensure_prepared(cfg("data.split_seed=5"))["seed"] == 5
    assert json.loads(description.read_text())["seed"] == 5

    index = tmp_path / "prepared" / "digits" / "train_indices.npy"
    index.write_bytes(index.read_bytes()[:-8])
    with pytest.raises(DataError, match=re.escape(f"split index file {index} is corrupted")):
        ensure_prepared(cfg("data.split_seed=5"))


def test_a_new_prepared_dir_replaces_a_stale_one_whole(digits_copy):
    stale_file = digits_copy / "prepared" / "digits" / "stale.txt"
    stale_file.write_text("from an older run")

    prepare(make_cfg(digits_copy, "data.split_seed=3"))

    assert not stale_file.exists()
    assert json.loads((digits_copy / "prepared" / "digits" / "dataset.json").read_text())["seed"] == 3
    assert sorted(path.name for path in digits_copy.iterdir()) == ["prepared", "tfds"]


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        (lambda path: path.write_bytes(path.read_bytes()[:-8]), "train_indices.npy"),
        (lambda path: path.write_bytes(path.read_bytes()[:-1] + b"\x07"), "validation_indices.npy"),
        (lambda path: path.unlink(), "validation_indices.npy"),
        (lambda path: path.write_text("{not json"), "dataset.json"),
        (
            lambda path: path.write_text(path.read_text().replace('"normalization"', '"renamed"')),
            "dataset.json",
        ),
        (lambda path: path.unlink(), "dataset.json"),
    ],
    ids=["truncated", "edited", "missing", "garbage-description", "incomplete-description", "not-prepared"],
)
def test_damaged_prepared_files_raise_data_error_naming_the_file(digits_copy, damage, file):
    cfg = make_cfg(digits_copy)
    damage(digits_copy / "prepared" / "digits" / file)

    for read in (lambda: dataset_info(cfg), lambda: make_dataset("train", cfg, training=True)):
        with pytest.raises(DataError, match=re.escape(str(digits_copy / "prepared" / "digits" / file))):
            read()


def test_a_description_for_another_dataset_or_a_bad_split_is_refused(digits_copy):
    shutil.copytree(digits_copy / "prepared" / "digits", digits_copy / "prepared" / "cifar10")
    with pytest.raises(DataError, match="describes 'digits', but data.name is 'cifar10'"):
        dataset_info(make_cfg(digits_copy, "data.name=cifar10"))
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        make_dataset("valid", make_cfg(digits_copy), training=False)
