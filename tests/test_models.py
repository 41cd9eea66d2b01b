"""The zoo is exactly the paper's architectures: parameter counts, layer names, options, bad input."""

import keras
import numpy as np
import pytest

from resnet_lab.models import ARCHS, build_model, count_macs, count_params, main

# The reference PyTorch implementation's trainable counts, 1000 classes at 224x224.
IMAGENET_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "plain18": 11_515_688,
    "plain34": 21_623_848,
    "plain50": 22_780_456,
}
# Table 6 (0.27M ... 1.7M), 10 classes, option A shortcuts.
CIFAR_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


@pytest.mark.parametrize("name", sorted(IMAGENET_PARAMS))
def test_imagenet_parameter_counts(name):
    assert count_params(build_model(name, 1000, (224, 224, 3))) == IMAGENET_PARAMS[name]


@pytest.mark.parametrize("depth", sorted(CIFAR_PARAMS))
def test_cifar_parameter_counts_and_plain_twins(depth):
    residual = build_model(f"resnet{depth}", 10, (32, 32, 3))
    plain = build_model(f"plain{depth}", 10, (32, 32, 3))
    assert count_params(residual) == CIFAR_PARAMS[depth]
    assert count_params(plain) == CIFAR_PARAMS[depth]


def test_macs_match_table1():
    # Table 1: 1.8 and 3.6 GFLOPs (multiply-adds) for 18 and 34 layers at 224x224; resnet34 counts 3.66 G.
    assert round(count_macs(build_model("resnet18", 1000, (224, 224, 3))) / 1e9, 1) == 1.8
    assert round(count_macs(build_model("resnet34", 1000, (224, 224, 3))) / 1e9, 1) == 3.7


def test_layer_names_read_like_table1():
    model = build_model("resnet34", 10, (64, 64, 3))
    names = {layer.name for layer in model.layers}
    assert {
        "conv1_conv",
        "pool1_pool",
        "conv3_block2_1_conv",
        "conv3_block2_add",
        "conv5_block3_out",
    } <= names
    # Option B projection only where the shape changes: the first unit of stages 3-5.
    projections = sorted(n for n in names if n.endswith("_0_conv"))
    assert projections == ["conv3_block1_0_conv", "conv4_block1_0_conv", "conv5_block1_0_conv"]
    assert sum(n.endswith("_out") and n.startswith("conv4_") for n in names) == 6


def test_plain_net_has_no_shortcut():
    model = build_model("plain34", 10, (64, 64, 3))
    assert not any(isinstance(layer, keras.layers.Add) for layer in model.layers)
    assert not any(layer.name.endswith("_0_conv") for layer in model.layers)


def test_bottleneck_expands_by_four_and_strides_on_the_3x3():
    model = build_model("resnet50", 10, (64, 64, 3))
    assert model.get_layer("conv2_block1_3_conv").filters == 256
    assert model.get_layer("conv3_block1_2_conv").strides == (2, 2)
    assert model.get_layer("conv3_block1_1_conv").strides == (1, 1)


def test_option_a_is_parameter_free_and_pads_with_zeros():
    model = build_model("resnet8", 10, (16, 16, 3))
    pad = model.get_layer("conv3_block1_0_pad")
    assert pad.count_params() == 0
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 16)).astype("float32")
    y = keras.ops.convert_to_numpy(pad(x))
    assert y.shape == (1, 4, 4, 32)
    np.testing.assert_allclose(y[..., 8:24], x[:, ::2, ::2, :])
    assert not y[..., :8].any() and not y[..., 24:].any()


def test_option_b_on_cifar_layout_adds_projections():
    a = build_model("resnet20", 10, (32, 32, 3))
    b = build_model("resnet20", 10, (32, 32, 3), shortcut="B")
    # Two projections: 16->32 (1x1 conv 512 + BN 64) and 32->64 (2048 + 128).
    assert count_params(b) - count_params(a) == 512 + 64 + 2048 + 128


def test_cifar_stem_for_imagenet_family_on_small_images():
    model = build_model("resnet18", 10, (16, 16, 3), stem="cifar")
    assert "pool1_pool" not in {layer.name for layer in model.layers}
    assert model.get_layer("conv1_conv").kernel_size == (3, 3)
    assert model.get_layer("conv5_block2_out").output.shape[1:3] == (2, 2)


def test_zero_init_residual_sets_last_bn_gamma_to_zero():
    model = build_model("resnet8", 10, (16, 16, 3), zero_init_residual=True)
    assert not model.get_layer("conv2_block1_2_bn").gamma.numpy().any()
    assert model.get_layer("conv2_block1_1_bn").gamma.numpy().all()


def test_conventions_no_bias_he_normal_bn_momentum_weight_decay():
    model = build_model("resnet8", 10, (16, 16, 3), bn_momentum=0.9, weight_decay=1e-4)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(not c.use_bias for c in convs)
    assert all(isinstance(c.kernel_initializer, keras.initializers.HeNormal) for c in convs)
    assert all(c.kernel_regularizer.l2 == pytest.approx(5e-5) for c in convs)
    assert model.get_layer("conv1_bn").momentum == 0.9


def test_classifier_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("resnet8", 10, (16, 16, 3))
        assert model.get_layer("conv1_conv").compute_dtype == "float16"
        assert model.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_saved_model_round_trip(tmp_path):
    model = build_model("resnet8", 10, (16, 16, 3))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0), rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet35"}, "unknown model 'resnet35'; choose one of"),
        ({"num_classes": 0}, "num_classes must be a positive integer, got 0"),
        ({"input_shape": (16, 16, 3), "name": "resnet18"}, "smaller than resnet18's total stride 32"),
        ({"stem": "tiny"}, "unknown stem 'tiny'"),
        ({"shortcut": "C"}, "unknown shortcut 'C'"),
    ],
)
def test_bad_input_names_the_value(kwargs, message):
    args = {"name": "resnet8", "num_classes": 10, "input_shape": (16, 16, 3), **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_model(args.pop("name"), **args)


def test_table_covers_the_zoo():
    assert {
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "plain18",
        "plain34",
        "plain50",
    } <= set(ARCHS)
    assert {f"{f}{d}" for f in ("resnet", "plain") for d in (20, 32, 44, 56, 110)} <= set(ARCHS)
    assert ARCHS["plain34"].blocks_per_stage == ARCHS["resnet34"].blocks_per_stage
    assert ARCHS["resnet50"].depth == 50 and ARCHS["resnet110"].depth == 110


def test_cli_prints_counts(capsys):
    main(["resnet20", "--input-shape", "32", "32", "3", "--classes", "10"])
    out = capsys.readouterr().out
    assert "trainable parameters: 269,722" in out and "conv4_block3_out" in out


def test_cli_bad_name_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["resnet35"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'resnet35'") and "\n" not in err


def test_width_sets_the_first_stage_and_doubles_at_every_later_one():
    basic = build_model("resnet34", 10, (16, 16, 1), stem="cifar", shortcut="A", width=16)
    assert [basic.get_layer(f"conv{stage}_block1_2_conv").filters for stage in (2, 3, 4, 5)] == [
        16,
        32,
        64,
        128,
    ]
    assert basic.get_layer("conv1_conv").filters == 16
    bottleneck = build_model("resnet50", 10, (16, 16, 1), stem="cifar", shortcut="A", width=16)
    assert bottleneck.get_layer("conv5_block3_out").output.shape[-1] == 512  # 128 x 4
    assert count_params(build_model("resnet34", 1000, (224, 224, 3), width=64)) == IMAGENET_PARAMS["resnet34"]
    with pytest.raises(ValueError, match="width must be a positive integer, got 0"):
        build_model("resnet18", 10, (16, 16, 1), width=0)


def test_the_default_studys_twins_have_identical_parameters_and_start_identical():
    """Fair by construction: a plain net and its residual twin differ in the shortcuts alone."""
    from resnet_lab.config import compose
    from resnet_lab.models import build_from_config

    cfg = compose()
    twins = [(m, m.replace("plain", "resnet")) for m in cfg.study.models if m.startswith("plain")]
    assert twins == [("plain18", "resnet18"), ("plain34", "resnet34")]

    def initial(name):
        keras.utils.set_random_seed(0)
        model_cfg = cfg.model.copy()
        model_cfg.name = name
        return build_from_config(model_cfg, 10, (cfg.data.image_size,) * 2 + (1,), cfg.optimizer.weight_decay)

    for plain_name, residual_name in twins:
        plain, residual = initial(plain_name), initial(residual_name)
        assert count_params(plain) == count_params(residual)
        assert len(plain.weights) == len(residual.weights)
        for p, r in zip(plain.weights, residual.weights, strict=True):
            assert p.path == r.path
            np.testing.assert_array_equal(p.numpy(), r.numpy())
        assert any(isinstance(layer, keras.layers.Add) for layer in residual.layers)
        assert not any(isinstance(layer, keras.layers.Add) for layer in plain.layers)
