"""TFDS builders that ship with the package; importing this package registers them with TFDS.

`digits` is the offline default: `tfds.builder("digits", data_dir=...)` then works like any catalog dataset.
"""

from resnet_lab.datasets.digits import Digits

__all__ = ["Digits"]
