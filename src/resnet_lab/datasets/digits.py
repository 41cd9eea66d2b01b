"""`digits`: scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset, so the study runs offline.

The examples come from `sklearn.datasets.load_digits` (1,797 images, a copy of the UCI "Optical
Recognition of Handwritten Digits" test set), which ships inside scikit-learn: no download. The builder
goes through the same `download_and_prepare` / `as_dataset` path as cifar10 and writes real TFDS files.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

# load_digits counts ink in each 4x4 block of a 32x32 bitmap: 0..16.
_MAX_INK = 16
_TEST_FRACTION = 0.2
# Part of the dataset's definition (the official split), not of a run: changing it needs a new VERSION.
_SPLIT_SEED = 0


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits, ten classes, pixel values scaled from 0..16 to 0..255."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 80/20 train/test split of sklearn.datasets.load_digits."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "8x8 grey-scale handwritten digits bundled with scikit-learn (sklearn.datasets.load_digits), "
                "1,797 images in 10 classes, with a stratified 80/20 train/test split."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=[str(digit) for digit in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
            citation=(
                "@misc{alpaydin1998optical, author={Alpaydin, E. and Kaynak, C.}, title={Optical Recognition "
                "of Handwritten Digits}, year={1998}, howpublished={UCI Machine Learning Repository}, "
                "doi={10.24432/C50P49}}"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.round(digits.images * (255 / _MAX_INK)).astype(np.uint8)[..., np.newaxis]
        # The official split, stratified 80/20: 1,437 train, 360 test.
        labels = digits.target
        train, test = train_test_split(
            np.arange(len(labels)), test_size=_TEST_FRACTION, stratify=labels, random_state=_SPLIT_SEED
        )
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        # The load_digits index is a stable key: TFDS orders examples on disk by its hash.
        for index in indices:
            yield int(index), {"image": images[index], "label": int(labels[index])}
