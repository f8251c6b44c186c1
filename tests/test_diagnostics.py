"""The preprocessing warning: it fires on the mistakes a new user made, and stays quiet on correctly
preprocessed data for pruned and quantized models (bnpass/diagnostics.py).

The fixture is an ImageNet-style model: its first BN's stored statistics are those of its first
convolution's output on correctly preprocessed images ((x / 255 - mean) / std), computed here with
numpy and onnxruntime, independently of bnpass's image pipeline.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from PIL import Image

from bnpass.cli import main
from bnpass.diagnostics import first_batchnorms
from builders import GraphBuilder, add_batchnorm, random_bias, random_bn_params, random_weight, run_onnxruntime

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
IMAGENET = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]
SIZE = 32


def natural_images(folder, count=48, seed=0) -> np.ndarray:
    """Smooth random colour fields with ImageNet-like channel means and some texture, saved as PNG;
    returns the pixels (count, SIZE, SIZE, 3), uint8."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        coarse = rng.normal(MEAN * 255, STD * 255, size=(4, 4, 3)).clip(0, 255).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float64)
        pixels = (smooth + rng.normal(0, 12, smooth.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
        images.append(pixels)
    return np.stack(images)


def imagenet_model(pixels: np.ndarray, weight: np.ndarray, *, quantize: str = "") -> onnx.ModelProto:
    """x -> Conv(weight) -> BN -> Relu -> Conv -> BN -> y, the first BN's statistics those of the
    *uncompressed* convolution on correctly preprocessed ``pixels``. ``quantize="int8"`` feeds the
    first Conv a per-channel int8 DequantizeLinear of ``weight``."""
    rng = np.random.default_rng(1)
    inputs = ((pixels / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32)
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, ["N", 3, SIZE, SIZE])
    bias = random_bias(16, rng)
    builder.add_initializer("b1", bias)
    if quantize == "int8":
        scale = (np.abs(weight).reshape(16, -1).max(axis=1) / 127).astype(np.float32)
        builder.add_initializer("w1_quantized", np.round(weight / scale[:, None, None, None]).astype(np.int8))
        builder.add_initializer("w1_scale", scale)
        builder.add_node("DequantizeLinear", ["w1_quantized", "w1_scale"], ["w1"], name="dequantize_w1", axis=0)
    else:
        builder.add_initializer("w1", weight)
    builder.add_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])
    stored = first_conv_output(inputs, uncompressed_weight=WEIGHTS[SIZE], bias=bias)
    params = random_bn_params((16,), rng)
    params.mean = stored.mean(axis=(0, 2, 3)).astype(np.float32)
    params.var = stored.var(axis=(0, 2, 3)).astype(np.float32)
    add_batchnorm(builder, "c1", params, output="b1_out", name="bn1")
    builder.add_node("Relu", ["b1_out"], ["r1"], name="relu1")
    builder.add_initializer("w2", random_weight((16, 16, 3, 3), rng))
    builder.add_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1])
    add_batchnorm(builder, "c2", random_bn_params((16,), rng), output="y", name="bn2")
    builder.add_output("y")
    return builder.build()


def first_conv_output(inputs: np.ndarray, *, uncompressed_weight, bias) -> np.ndarray:
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, ["N", 3, SIZE, SIZE])
    builder.add_initializer("w", uncompressed_weight)
    builder.add_initializer("b", bias)
    builder.add_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    builder.add_output("y")
    return run_onnxruntime(builder.build(), {"x": inputs})[0].astype(np.float64)


WEIGHTS = {SIZE: random_weight((16, 3, 3, 3), np.random.default_rng(7))}


def compressed(kind: str) -> tuple:
    """The first layer's weight after compression, and how the model carries it."""
    weight = WEIGHTS[SIZE].copy()
    if kind.startswith("pruned"):
        fraction = int(kind[len("pruned"):]) / 100
        weight[np.abs(weight) < np.quantile(np.abs(weight), fraction)] = 0
        return weight, ""
    if kind == "int4":  # per-tensor 4-bit, dequantized into the float weight
        step = np.abs(weight).max() / 7
        return (np.round(weight / step).clip(-7, 7) * step).astype(np.float32), ""
    return weight, "int8"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "images"
    return folder, natural_images(folder)


def run(tmp_path, images, kind, options, capsys) -> str:
    folder, pixels = images
    weight, quantize = compressed(kind)
    onnx.save(imagenet_model(pixels, weight, quantize=quantize), tmp_path / "model.onnx")
    code = main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--data", str(folder),
                 "--resize", str(SIZE), "--batch-size", "16", "--no-fold", *options])
    assert code == 0
    return capsys.readouterr().err


@pytest.mark.parametrize("kind", ["pruned50", "pruned80", "int8", "int4"])
def test_quiet_on_correctly_preprocessed_images_of_compressed_models(tmp_path, images, kind, capsys):
    err = run(tmp_path, images, kind, IMAGENET, capsys)
    assert "preprocessing" not in err, err


MISTAKES = [
    # (what the user typed, words of the warning)
    ([], "with a spread"),                                      # forgot --mean/--std
    (["--mean", "123.7,116.3,103.5", "--std", "58.4,57.1,57.4"], "with its mean moved by"),
    (["--no-scale", *IMAGENET], "larger than the model was trained on"),
]


@pytest.mark.parametrize("kind", ["pruned50", "int8"])
@pytest.mark.parametrize("mistake", MISTAKES, ids=["no normalization", "mean/std in 0..255", "no scaling"])
def test_warns_when_the_first_bn_sees_badly_preprocessed_images(tmp_path, images, kind, mistake, capsys):
    options, words = mistake
    err = run(tmp_path, images, kind, options, capsys)
    lines = [line for line in err.splitlines() if "check the preprocessing" in line]
    assert len(lines) == 1 and words in lines[0] and "the first BatchNormalization ('bn1')" in lines[0], err
    if not options:
        assert "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225" in lines[0]
    if "--no-scale" in options:
        assert "pixel values left in 0..255 (--no-scale)" in lines[0]


def test_first_batchnorms_are_those_one_layer_from_the_input(images):
    _, pixels = images
    model = imagenet_model(pixels, WEIGHTS[SIZE])
    assert [node.name for node in first_batchnorms(model)] == ["bn1"]


def test_first_batchnorms_look_through_layout_and_constant_arithmetic():
    """x (NHWC) -> Transpose -> Sub(mean) -> Conv -> BN a -> Relu -> Conv -> BN b: only a is first."""
    rng = np.random.default_rng(3)
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, ["N", 8, 8, 3])
    builder.add_node("Transpose", ["x"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2])
    builder.add_initializer("mean", np.full((1, 3, 1, 1), 0.5, np.float32))
    builder.add_node("Sub", ["nchw", "mean"], ["centered"], name="center")
    builder.add_initializer("w1", random_weight((4, 3, 3, 3), rng))
    builder.add_node("Conv", ["centered", "w1"], ["c1"], name="conv1")
    add_batchnorm(builder, "c1", random_bn_params((4,), rng), output="a_out", name="a")
    builder.add_node("Relu", ["a_out"], ["r"], name="relu")
    builder.add_initializer("w2", random_weight((4, 4, 1, 1), rng))
    builder.add_node("Conv", ["r", "w2"], ["c2"], name="conv2")
    add_batchnorm(builder, "c2", random_bn_params((4,), rng), output="y", name="b")
    builder.add_output("y")
    assert [node.name for node in first_batchnorms(builder.build())] == ["a"]


def test_the_warning_does_not_suggest_the_normalization_already_given():
    """A model whose stored statistics are random warns on well-preprocessed images too: then the
    --mean/--std the user gave are not the advice; what else it may be is."""
    from bnpass.data import InputSpec
    from bnpass.diagnostics import InputShift, preprocessing_warning
    from bnpass.images import ImageOptions, resolve

    spec = InputSpec("x", np.dtype(np.float32), (None, 3, 8, 8))
    given = resolve(ImageOptions(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)), spec)
    for shift in (InputShift("bn1", 0.1, 0.0), InputShift("bn1", 1.0, 2.0), InputShift("bn1", 10.0, 0.0)):
        warning = preprocessing_warning([shift], images=given)
        assert "--mean 0.485" not in warning and "--std missing" not in warning, warning
        assert "the stored statistics may not come from data like these" in warning, warning
    default = resolve(ImageOptions(), spec)
    assert "--mean 0.485,0.456,0.406" in preprocessing_warning([InputShift("bn1", 0.1, 0.0)], images=default)
