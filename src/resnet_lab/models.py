"""The model zoo of He et al. 2015 (arXiv:1512.03385): residual nets and their plain counterparts.

One builder serves every depth and both layouts; `ARCHS` is the paper's tables as data. A plain net is
the row of its residual twin with the shortcut switched off. Layer names follow keras.applications
(`conv3_block2_1_conv`, `conv3_block1_0_conv` for a projection, `..._add`, `..._out`), so
`model.summary()` reads like Table 1 and tests can assert on names.

    python -m resnet_lab.models resnet34 --input-shape 224 224 3 --classes 1000
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Literal

import keras
from keras import layers
from omegaconf import OmegaConf

from resnet_lab.errors import cli
from resnet_lab.schema import SHORTCUTS, STEMS

Layout = Literal["imagenet", "cifar"]
Block = Literal["basic", "bottleneck"]


@dataclass(frozen=True)
class Arch:
    """One row of the architecture table.

    Attributes:
        layout: "imagenet" (Table 1: 7x7/2 stem, max-pool, four stages) or "cifar" (Sec. 4.2: 3x3 stem,
            three stages).
        block: "basic" (two 3x3) or "bottleneck" (1x1, 3x3, 1x1 with x4 expansion).
        blocks_per_stage: residual units in each stage.
        residual: False for the plain counterpart: every shortcut removed.
    """

    layout: Layout
    block: Block
    blocks_per_stage: tuple[int, ...]
    residual: bool

    @property
    def depth(self) -> int:
        """Weighted layers: the stem conv, the convs of every unit, the classifier."""
        return 2 + sum(self.blocks_per_stage) * EXPANSION_LAYERS[self.block]

    @property
    def family(self) -> str:
        return "residual" if self.residual else "plain"


# Layers per unit, which is also what the depth in a model's name counts.
EXPANSION_LAYERS = {"basic": 2, "bottleneck": 3}
# Output channels of a unit relative to its `filters` (Sec. 4.1, "Deeper Bottleneck Architectures").
EXPANSION = {"basic": 1, "bottleneck": 4}
# Filters of the first stage; each later stage doubles them (Table 1: 64 to 512; Sec. 4.2: 16 to 64).
BASE_WIDTH = {"imagenet": 64, "cifar": 16}
DEFAULT_SHORTCUT = {"imagenet": "B", "cifar": "A"}

_IMAGENET = {  # Table 1
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_PLAIN_IMAGENET_DEPTHS = (18, 34, 50)
_CIFAR_DEPTHS = (8, 20, 32, 44, 56, 110)  # 6n + 2 (Sec. 4.2); n = 1 gives a net small enough for tests

ARCHS: dict[str, Arch] = {}
for _depth, (_block, _blocks) in _IMAGENET.items():
    ARCHS[f"resnet{_depth}"] = Arch("imagenet", _block, _blocks, residual=True)
    if _depth in _PLAIN_IMAGENET_DEPTHS:
        ARCHS[f"plain{_depth}"] = Arch("imagenet", _block, _blocks, residual=False)
for _depth in _CIFAR_DEPTHS:
    _n = (_depth - 2) // 6
    ARCHS[f"resnet{_depth}"] = Arch("cifar", "basic", (_n, _n, _n), residual=True)
    ARCHS[f"plain{_depth}"] = Arch("cifar", "basic", (_n, _n, _n), residual=False)


def get_arch(name: str) -> Arch:
    """The table row for `name`, or a ValueError listing the valid names."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(ARCHS, key=_name_order)}") from None


def _name_order(name: str) -> tuple[str, int]:
    family = name.rstrip("0123456789")
    return family, int(name[len(family) :])


@keras.saving.register_keras_serializable(package="resnet_lab")
class ZeroPadShortcut(layers.Layer):
    """Option A shortcut: subsample by the stride and zero-pad the new channels; no parameters (Sec. 3.3)."""

    def __init__(self, stride: int, out_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.stride = stride
        self.out_channels = out_channels

    def call(self, inputs):
        x = inputs[:, :: self.stride, :: self.stride, :]
        extra = self.out_channels - x.shape[-1]
        return keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

    def get_config(self):
        return {**super().get_config(), "stride": self.stride, "out_channels": self.out_channels}


@dataclass(frozen=True)
class _Options:
    residual: bool
    shortcut: str
    zero_init_residual: bool
    bn_momentum: float
    regularizer: keras.regularizers.Regularizer | None


def _conv_bn(
    x, filters, kernel_size, stride, name, opts: _Options, *, relu=False, zero_gamma=False, padding="same"
):
    # No bias: the BatchNormalization after every conv has a beta that plays that part.
    x = layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding=padding,
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=opts.regularizer,
        name=f"{name}_conv",
    )(x)
    # epsilon 1e-5 as in the reference implementations; momentum is Keras's (1 - PyTorch's).
    x = layers.BatchNormalization(
        momentum=opts.bn_momentum,
        epsilon=1e-5,
        gamma_initializer="zeros" if zero_gamma else "ones",
        name=f"{name}_bn",
    )(x)
    return layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def _shortcut(x, out_channels, stride, name, opts: _Options):
    if stride == 1 and x.shape[-1] == out_channels:
        return x
    if opts.shortcut == "A":
        return ZeroPadShortcut(stride, out_channels, name=f"{name}_0_pad")(x)
    return _conv_bn(x, out_channels, 1, stride, f"{name}_0", opts)


def _merge(x, shortcut, name, opts: _Options):
    if opts.residual:
        x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def basic_block(x, filters, stride, name, opts: _Options):
    """Two 3x3 convs (Fig. 2); the stride sits on the first."""
    shortcut = _shortcut(x, filters, stride, name, opts) if opts.residual else None
    x = _conv_bn(x, filters, 3, stride, f"{name}_1", opts, relu=True)
    x = _conv_bn(x, filters, 3, 1, f"{name}_2", opts, zero_gamma=opts.zero_init_residual)
    return _merge(x, shortcut, name, opts)


def bottleneck_block(x, filters, stride, name, opts: _Options):
    """1x1 reduce, 3x3, 1x1 restore with x4 expansion (Fig. 5 right); the stride sits on the 3x3."""
    out_channels = filters * EXPANSION["bottleneck"]
    shortcut = _shortcut(x, out_channels, stride, name, opts) if opts.residual else None
    x = _conv_bn(x, filters, 1, 1, f"{name}_1", opts, relu=True)
    x = _conv_bn(x, filters, 3, stride, f"{name}_2", opts, relu=True)
    x = _conv_bn(x, out_channels, 1, 1, f"{name}_3", opts, zero_gamma=opts.zero_init_residual)
    return _merge(x, shortcut, name, opts)


BLOCKS = {"basic": basic_block, "bottleneck": bottleneck_block}


def total_stride(arch: Arch, stem: Layout) -> int:
    """How much the net shrinks its input before global pooling."""
    return (4 if stem == "imagenet" else 1) * 2 ** (len(arch.blocks_per_stage) - 1)


def build_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    stem: Layout | None = None,
    shortcut: Literal["A", "B"] | None = None,
    zero_init_residual: bool = False,
    bn_momentum: float = 0.9,
    weight_decay: float = 0.0,
    width: int | None = None,
) -> keras.Model:
    """Build a model of the zoo with the functional API.

    Args:
        name: a key of `ARCHS`, e.g. "resnet34", "plain34", "resnet56".
        num_classes: width of the softmax classifier.
        input_shape: (height, width, channels) of one image.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (one 3x3/1 conv, for small images);
            None takes the layout's own.
        shortcut: where the shape changes, "A" (subsample and zero-pad channels) or "B" (1x1 conv + BN
            projection); None takes `DEFAULT_SHORTCUT`. Plain nets have none.
        zero_init_residual: start the last BN of each residual unit at gamma 0, so it starts as the identity.
        bn_momentum: Keras's BatchNormalization momentum (0.9 is PyTorch's 0.1).
        weight_decay: on conv and dense kernels, as an L2 penalty of weight_decay / 2, whose gradient is the
            paper's weight_decay * w.
        width: filters of the stem and first stage, doubled at each later stage (None: `BASE_WIDTH`).

    Returns:
        An uncompiled `keras.Model` named `name`; its class probabilities are float32 even in mixed precision.
    """
    arch = get_arch(name)
    stem, shortcut = stem or arch.layout, shortcut or DEFAULT_SHORTCUT[arch.layout]
    width = BASE_WIDTH[arch.layout] if width is None else width
    for key, value in (("num_classes", num_classes), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    for key, value, choices in (("stem", stem, STEMS), ("shortcut", shortcut, SHORTCUTS)):
        if value not in choices:
            raise ValueError(f"unknown {key} {value!r}; choose one of {list(choices)}")
    if len(input_shape) != 3 or any(not isinstance(d, int) or d < 1 for d in input_shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive ints, got {input_shape!r}"
        )
    stride = total_stride(arch, stem)
    if min(input_shape[:2]) < stride:
        raise ValueError(
            f"input {input_shape[0]}x{input_shape[1]} is smaller than {name}'s total stride {stride} "
            f"with the {stem} stem; use images of at least {stride}x{stride}"
            + (" or stem='cifar'" if stem == "imagenet" else "")
        )

    opts = _Options(
        residual=arch.residual,
        shortcut=shortcut,
        zero_init_residual=zero_init_residual and arch.residual,  # a plain net has no residual unit
        bn_momentum=bn_momentum,
        regularizer=keras.regularizers.L2(weight_decay / 2) if weight_decay else None,
    )
    stage_filters = [width * 2**stage for stage in range(len(arch.blocks_per_stage))]
    inputs = keras.Input(shape=input_shape, name="image")
    if stem == "imagenet":
        x = layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
        x = _conv_bn(x, stage_filters[0], 7, 2, "conv1", opts, relu=True, padding="valid")
        x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
        x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    else:
        x = _conv_bn(inputs, stage_filters[0], 3, 1, "conv1", opts, relu=True)

    block = BLOCKS[arch.block]
    for stage_index, (filters, num_blocks) in enumerate(
        zip(stage_filters, arch.blocks_per_stage, strict=True)
    ):
        for block_index in range(num_blocks):
            stride = 2 if stage_index > 0 and block_index == 0 else 1
            x = block(x, filters, stride, f"conv{stage_index + 2}_block{block_index + 1}", opts)

    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    # float32 softmax: a float16 one under mixed precision loses small probabilities.
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_initializer="he_normal",
        kernel_regularizer=opts.regularizer, dtype="float32", name="predictions",
    )(x)  # fmt: skip
    return keras.Model(inputs, outputs, name=name)


def build_from_config(model_cfg, num_classes: int, input_shape, weight_decay: float = 0.0) -> keras.Model:
    """Build from the `model` node of the configuration, whose keys are `build_model`'s (schema.Model)."""
    options = OmegaConf.to_container(model_cfg)
    shape = tuple(int(d) for d in input_shape)
    return build_model(options.pop("name"), num_classes, shape, weight_decay=weight_decay, **options)


def count_params(model: keras.Model) -> int:
    """Trainable parameters (the count the paper and PyTorch report; BN moving statistics excluded)."""
    return int(sum(keras.ops.size(w) for w in model.trainable_weights))


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates for one image through the conv and dense layers (Table 1's FLOPs)."""
    # Each kernel weight multiplies once per output position: at every pixel of a conv's map, once in a dense.
    weighted = [layer for layer in model.layers if isinstance(layer, layers.Conv2D | layers.Dense)]
    return int(sum(math.prod(layer.output.shape[1:-1]) * math.prod(layer.kernel.shape) for layer in weighted))


@cli
def main(argv: list[str] | None = None) -> None:
    """Print a model's layer table, parameter counts and multiply-accumulates per image."""
    parser = argparse.ArgumentParser(prog="python -m resnet_lab.models", description=main.__doc__)
    parser.add_argument("name", help=f"one of {', '.join(sorted(ARCHS, key=_name_order))}")
    parser.add_argument("--input-shape", nargs=3, type=int, default=[224, 224, 3], metavar=("H", "W", "C"))
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--stem", choices=STEMS)
    parser.add_argument("--shortcut", choices=SHORTCUTS)
    parser.add_argument("--width", type=int, help="filters of the first stage (default: the layout's own)")
    args = parser.parse_args(argv)
    shape = tuple(args.input_shape)
    model = build_model(
        args.name, args.classes, shape, stem=args.stem, shortcut=args.shortcut, width=args.width
    )
    model.summary(line_length=110)
    arch = get_arch(args.name)
    units = f"{arch.block} units {arch.blocks_per_stage}"
    print(f"{args.name}: {arch.family}, {arch.depth} weighted layers, {units}")
    print(f"trainable parameters: {count_params(model):,}")
    print(f"multiply-accumulates per image: {count_macs(model) / 1e9:.3f} G")


if __name__ == "__main__":
    main()
