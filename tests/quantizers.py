"""The models the real quantizers write, for every row of issue 21's table, built from the shipped digits CNN.

Users bring bnpass what ``onnxruntime.quantization.quantize_static`` and ``nncf.quantize`` write, not
models we round ourselves. This module runs those quantizers, as a user would, on the digits CNN of
``examples/reference`` (five Conv, two Gemm, a residual Add, a depthwise layer):

* ``examples/fused/model.onnx``, its BNs folded (what torch's exporter writes), for every row but one;
* ``examples/reference/model.onnx``, BNs kept, for the row that quantizes a model still holding BN.

Each :class:`QuantizerRow` names the float model it pairs with (the ``--reference`` a user gives) and
how it is quantized. :class:`QuantizedModels` builds a row once, on first use, and keeps the file for
the rest of the session (``quantized_models`` in tests/test_quantizers.py is a session fixture), so
the whole matrix costs one quantizer run per row (~0.3 s each for ``quantize_static``, a few seconds
for NNCF, which imports slowly).

Calibration data for the quantizers: the first ``CALIBRATION_SAMPLES`` images of
``examples/reference/in-domain/calib`` (digits, already normalized), in the files' order, so every
build is the same. bnpass's runs in the tests read the same images.

Every model written here has ``ir_version`` 10 (the quantizers keep the source's IR; NNCF may write
a newer one, which onnxruntime 1.31 refuses).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

REPO = Path(__file__).resolve().parents[1]
FLOAT_FOLDED = REPO / "examples" / "fused" / "model.onnx"
FLOAT_WITH_BN = REPO / "examples" / "reference" / "model.onnx"
CALIBRATION_FOLDER = REPO / "examples" / "reference" / "in-domain" / "calib"
TEST_SET = REPO / "examples" / "reference" / "in-domain" / "test.npz"
INPUT_NAME = "input"
CALIBRATION_SAMPLES = 128
CALIBRATION_BATCH = 32
IR_VERSION = 10


def calibration_images(count: int | None = CALIBRATION_SAMPLES) -> np.ndarray:
    """The first ``count`` calibration images (all 384 for None), (N, 1, 8, 8) float32, in file order."""
    files = sorted(CALIBRATION_FOLDER.glob("*.npy"))
    return np.concatenate([np.load(path) for path in files])[:count].astype(np.float32)


def labelled_test_images() -> tuple[np.ndarray, np.ndarray]:
    """The 500 labelled in-domain test images and their labels, kept apart from calibration."""
    with np.load(TEST_SET) as archive:
        return archive["images"].astype(np.float32), archive["labels"].astype(np.int64)


class ImageReader(CalibrationDataReader):
    """onnxruntime's calibration protocol over ``images``: ``get_next()`` a batch until None."""

    def __init__(self, images: np.ndarray, batch_size: int = CALIBRATION_BATCH):
        self._batches = iter([{INPUT_NAME: images[start:start + batch_size]}
                              for start in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self._batches, None)


def with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """A copy declaring default-domain opset ``version`` (the digits CNN's ops read the same at 13 and 21)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for opset in copy.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = version
    return copy


def with_weights_as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose every initializer is a ``Constant`` node instead, as the rapidocr wheel's models
    and many converters ship them."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    constants = [helper.make_node("Constant", [], [tensor.name], name=f"{tensor.name}_constant", value=tensor)
                 for tensor in graph.initializer]
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    return copy


def with_gemm_as_matmul_add(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose every ``Gemm(x, W, b, transB=1)`` is ``MatMul(x, W^T) -> Add(b)``, as TensorFlow's
    converters and many exporters write a fully connected layer (quantize_static then puts an
    activation Q/DQ pair between the MatMul and its bias Add)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes = []
    for node in graph.node:
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        plain = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}
        if node.op_type != "Gemm" or len(node.input) != 3 or {**plain, **attributes} != plain:
            nodes.append(node)
            continue
        x, weight, bias = node.input
        transposed_weight = numpy_helper.to_array(initializers[weight]).T.copy()
        transposed = numpy_helper.from_array(transposed_weight, f"{weight}_transposed")
        graph.initializer.remove(initializers[weight])
        graph.initializer.append(transposed)
        product = f"{node.output[0]}_matmul"
        nodes.append(helper.make_node("MatMul", [x, transposed.name], [product], name=f"{node.name}_matmul"))
        nodes.append(helper.make_node("Add", [product, bias], list(node.output), name=f"{node.name}_bias_add"))
    del graph.node[:]
    graph.node.extend(nodes)
    return copy


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = IR_VERSION
    onnx.save(model, path)


def quantize_with_onnxruntime(source: onnx.ModelProto, output: Path, images: np.ndarray | None = None,
                              **options) -> None:
    """``quantize_static`` in QDQ format, as onnxruntime's documentation shows it, on ``images``
    (default: :func:`calibration_images`)."""
    staged = output.with_name(output.stem + "_source.onnx")
    _save(source, staged)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "please consider pre-processing" and the int4 domain notice, every call
    try:
        images = calibration_images() if images is None else images
        quantize_static(str(staged), str(output), ImageReader(images),
                        quant_format=QuantFormat.QDQ, **options)
    finally:
        root.setLevel(level)
        staged.unlink()
    _save(onnx.load(output), output)


def quantize_with_nncf(source: onnx.ModelProto, output: Path, images: np.ndarray | None = None, **options) -> None:
    """``nncf.quantize`` on ``images`` (default: :func:`calibration_images`), one image per sample as
    NNCF's ONNX examples feed it; without ``options``, its defaults (8-bit, fast bias correction)."""
    import nncf  # optional: the row is skipped where NNCF is not installed

    images = calibration_images() if images is None else images
    dataset = nncf.Dataset([{INPUT_NAME: images[index:index + 1]} for index in range(len(images))])
    _save(nncf.quantize(source, dataset, subset_size=len(images), **options), output)


@dataclasses.dataclass(frozen=True)
class QuantizerRow:
    """One row of issue 21's table: a quantizer run on a float model.

    ``reference`` is the float model file; ``prepare`` turns it into what the quantizer is given (and
    what the user then passes as ``--reference``); ``quantize(source, output)`` writes the model."""

    name: str
    summary: str
    reference: Path
    quantize: Callable[[onnx.ModelProto, Path], None]
    prepare: Callable[[onnx.ModelProto], onnx.ModelProto] = lambda model: model
    needs: str = ""  # an optional module the row needs ("nncf")
    issue: str = ""  # what stood in the way when the row was written (issue 21's E1-E6)


def _onnxruntime(**options) -> Callable[[onnx.ModelProto, Path], None]:
    return lambda source, output: quantize_with_onnxruntime(source, output, **options)


QUANTIZER_ROWS = {row.name: row for row in [
    QuantizerRow("per_tensor", "quantize_static QDQ, per-tensor int8 weights, uint8 activations, int32 biases",
                 FLOAT_FOLDED, _onnxruntime(per_channel=False, weight_type=QuantType.QInt8,
                                            activation_type=QuantType.QUInt8),
                 issue='E1: the int32 bias DequantizeLinear (scale [1], scalar zero point) reads as "not a constant"'),
    QuantizerRow("per_channel", "quantize_static QDQ, per-channel int8 weights, int32 biases",
                 FLOAT_FOLDED, _onnxruntime(per_channel=True),
                 issue='the int32 bias DequantizeLinear nodes are replaced by float biases (49 -> 42 nodes)'),
    QuantizerRow("float_bias", "quantize_static QDQ, per-tensor int8 weights, QuantizeBias False (float biases)",
                 FLOAT_FOLDED, _onnxruntime(per_channel=False, extra_options={"QuantizeBias": False})),
    QuantizerRow("matmul_bias_add", "quantize_static QDQ, per-channel int8 weights, on the model whose fully "
                 "connected layers are MatMul -> Add: MatMul -> Q -> DQ -> Add", FLOAT_FOLDED,
                 _onnxruntime(per_channel=True), prepare=with_gemm_as_matmul_add,
                 issue='E2: MatMul -> Q -> DQ -> Add "has no bias Add"'),
    QuantizerRow("int4_microsoft", "quantize_static, int4 per-channel weights at opset 13 (com.microsoft Q/DQ)",
                 FLOAT_FOLDED, _onnxruntime(per_channel=True, weight_type=QuantType.QInt4),
                 issue='E3: com.microsoft int4 weight "not a constant", and the run stops'),
    QuantizerRow("int4_opset21", "quantize_static, int4 per-channel weights at opset 21 (native INT4)",
                 FLOAT_FOLDED, _onnxruntime(per_channel=True, weight_type=QuantType.QInt4),
                 prepare=lambda model: with_opset(model, 21),
                 issue='E4: every layer skipped ("dequantizes int4"), exit 0, file unchanged'),
    QuantizerRow("constant_weights", "quantize_static on weights held by Constant nodes: "
                 "QuantizeLinear(Constant) -> DequantizeLinear at run time, float biases",
                 FLOAT_FOLDED, _onnxruntime(per_channel=False), prepare=with_weights_as_constant_nodes,
                 issue='E5: QuantizeLinear(Constant) -> DequantizeLinear not read, and the run stops'),
    QuantizerRow("with_batchnorm", "quantize_static QDQ per-tensor on the model that still has BN (no pre-processing)",
                 FLOAT_WITH_BN, _onnxruntime(per_channel=False),
                 issue='E6: BN scale and bias behind DequantizeLinear; the run stops on the pairing'),
    QuantizerRow("nncf", "nncf.quantize, defaults (fast bias correction)",
                 FLOAT_FOLDED, quantize_with_nncf, needs="nncf"),
]}


@dataclasses.dataclass(frozen=True)
class QuantizedPair:
    """A row's float model as the quantizer was given it (what a user passes as ``--reference``) and
    the quantizer's output."""

    float_model: Path
    quantized: Path


class QuantizedModels:
    """Builds each row's pair once, into ``folder``, and hands out its paths."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._built: dict[str, QuantizedPair] = {}

    def pair(self, name: str) -> QuantizedPair:
        if name not in self._built:
            row = QUANTIZER_ROWS[name]
            source = row.prepare(onnx.load(row.reference))
            float_model, quantized = self.folder / f"{name}_float.onnx", self.folder / f"{name}.onnx"
            _save(source, float_model)
            row.quantize(source, quantized)
            self._built[name] = QuantizedPair(float_model, quantized)
        return self._built[name]
