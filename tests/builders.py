"""Builders for the tiny ONNX models the bnpass tests run on.

Every model built here sets ``ir_version`` explicitly (10 unless asked otherwise): onnx 1.23 writes
IR 14 by default, which onnxruntime 1.31 refuses.

Fixtures follow the project's test rules: BatchNormalization statistics are non-trivial (random
gamma, beta and mean; ``var = |randn| + 0.5``) and producers have random, non-zero biases, because
trivial fixtures hide bias bugs. All randomness comes from a seeded ``np.random.default_rng``.

Opset quirks the builders respect:

- opset 7 BatchNormalization has ``spatial`` (default 1; 0 means per-activation C x D1 x ... params);
- opsets 9-13 choose training mode by the number of outputs (1 = inference, 5 = training);
- opsets 14/15 have ``training_mode``; with ``training_mode=1`` onnxruntime wants 3 outputs;
- below opset 15 every BatchNormalization input has the dtype of X; opset 15 lets scale/B and
  mean/var be another float type (onnxruntime implements fp16 X with fp32 params, not fp64 X with
  fp32 params);
- Gemm below opset 11 requires C.

onnxruntime CPU kernel gaps (onnxruntime 1.31, checked when this file was written): Conv and
ConvTranspose have no float64 kernel, and MaxPool-1 (opset 7) has no float64 kernel. float16 Conv,
ConvTranspose, Gemm, MatMul and BatchNormalization all run on the CPU provider.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime
from onnx import helper, numpy_helper

DEFAULT_IR_VERSION = 10
INPUT_NAME = "x"
OUTPUT_NAME = "y"
BN_NODE_NAME = "bn"
BN_PARAM_NAMES = ("scale", "bias", "mean", "var")

PRODUCERS = ("conv", "conv_transpose", "gemm", "matmul")
PRODUCER_OP_TYPES = {
    "conv": "Conv",
    "conv_transpose": "ConvTranspose",
    "gemm": "Gemm",
    "matmul": "MatMul",
}
PARAM_SOURCES = ("initializer", "constant_node", "identity_chain", "constant_behind_identity")


def tensor_elem_type(dtype) -> int:
    """ONNX TensorProto element type of a numpy dtype."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# --------------------------------------------------------------------------------------------
# Random tensors
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BatchNormParams:
    """The four BatchNormalization parameter tensors, in ONNX input order after X."""

    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"scale": self.scale, "bias": self.bias, "mean": self.mean, "var": self.var}


def random_bn_params(shape, rng: np.random.Generator, dtype=np.float32) -> BatchNormParams:
    """Non-trivial BN statistics: random gamma, beta, mean; var = |randn| + 0.5.

    ``shape`` is ``(C,)`` normally, ``(C, D1, ...)`` for opset-7 ``spatial=0``.
    gamma keeps its sign random and stays away from 0 so every channel matters.
    """
    shape = tuple(np.atleast_1d(shape))
    gamma_magnitude = 0.5 + rng.random(shape)
    gamma = gamma_magnitude * rng.choice([-1.0, 1.0], size=shape)
    return BatchNormParams(
        scale=gamma.astype(dtype),
        bias=rng.standard_normal(shape).astype(dtype),
        mean=rng.standard_normal(shape).astype(dtype),
        var=(np.abs(rng.standard_normal(shape)) + 0.5).astype(dtype),
    )


def random_tensor(shape, rng: np.random.Generator, dtype=np.float32, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


def random_weight(shape, rng: np.random.Generator, dtype=np.float32, fan_in: int | None = None) -> np.ndarray:
    """Weights with variance 1/fan_in, so outputs stay O(1) (fp16 friendly)."""
    if fan_in is None:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return random_tensor(shape, rng, dtype, scale=1.0 / np.sqrt(max(fan_in, 1)))


def random_bias(num_channels: int, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """Non-zero biases: |b| >= 0.25, random sign."""
    magnitude = 0.25 + rng.random(num_channels)
    return (magnitude * rng.choice([-1.0, 1.0], size=num_channels)).astype(dtype)


# --------------------------------------------------------------------------------------------
# Graph assembly
# --------------------------------------------------------------------------------------------


class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs, then makes a checked ModelProto.

    Constant tensors can be placed as initializers, Constant nodes, or behind Identity chains
    (see :meth:`add_constant`), the way exporters write them.
    """

    def __init__(self, *, opset: int, ir_version: int = DEFAULT_IR_VERSION, graph_name: str = "tiny"):
        self.opset = opset
        self.ir_version = ir_version
        self.graph_name = graph_name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.declared_output_types: dict[str, onnx.ValueInfoProto] = {}

    def add_input(self, name: str, dtype, shape: Sequence[int | str | None]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, tensor_elem_type(dtype), list(shape)))
        return name

    def add_initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def add_node(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], *, name: str, **attributes):
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, **attributes))
        return list(outputs)

    def add_constant(self, name: str, array: np.ndarray, source: str = "initializer", *,
                     identity_depth: int = 2) -> str:
        """Place a constant tensor and return the name a consumer should read.

        source:
          - "initializer": an initializer called ``name``;
          - "constant_node": a Constant node (named ``name + "_constant"``) whose output is ``name``;
          - "identity_chain": initializer ``name + "_init"`` -> ``identity_depth`` Identity nodes;
          - "constant_behind_identity": Constant node -> ``identity_depth`` Identity nodes.
        """
        if source == "initializer":
            return self.add_initializer(name, array)
        if source == "constant_node":
            self.add_node(
                "Constant", [], [name], name=f"{name}_constant", value=numpy_helper.from_array(np.asarray(array), name)
            )
            return name
        if source in ("identity_chain", "constant_behind_identity"):
            if identity_depth < 1:
                raise ValueError("identity_depth must be >= 1")
            if source == "identity_chain":
                current = self.add_initializer(f"{name}_init", array)
            else:
                current = f"{name}_constant_out"
                self.add_node(
                    "Constant",
                    [],
                    [current],
                    name=f"{name}_constant",
                    value=numpy_helper.from_array(np.asarray(array), current),
                )
            for depth in range(identity_depth):
                out = name if depth == identity_depth - 1 else f"{name}_identity{depth}"
                self.add_node("Identity", [current], [out], name=f"{name}_identity{depth}_node")
                current = out
            return name
        raise ValueError(f"unknown constant source {source!r}; expected one of {PARAM_SOURCES}")

    def add_output(self, name: str, dtype=None, shape: Sequence[int] | None = None) -> str:
        """Mark ``name`` a graph output; its type comes from shape inference unless given here."""
        self.outputs.append(name)
        if dtype is not None:
            self.declared_output_types[name] = helper.make_tensor_value_info(
                name, tensor_elem_type(dtype), list(shape)
            )
        return name

    def build(self, *, initializers_as_inputs: bool | None = None) -> onnx.ModelProto:
        """Make the model; graph output shapes and types come from onnx shape inference.

        ``initializers_as_inputs`` (default: True when ir_version < 4, as IR 3 requires) also lists
        every initializer as a graph input, the way IR-3 models carry them.
        """
        if initializers_as_inputs is None:
            initializers_as_inputs = self.ir_version < 4
        inputs = list(self.inputs)
        if initializers_as_inputs:
            input_names = {value.name for value in inputs}
            for tensor in self.initializers:
                if tensor.name not in input_names:
                    inputs.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        outputs = [onnx.ValueInfoProto(name=name) for name in self.outputs]
        graph = helper.make_graph(self.nodes, self.graph_name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="bnpass-tests"
        )
        model.ir_version = self.ir_version
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        inferred_outputs = {value.name: value for value in inferred.graph.output}
        for output in model.graph.output:
            declared = self.declared_output_types.get(output.name)
            output.CopyFrom(declared if declared is not None else inferred_outputs[output.name])
            if not output.type.tensor_type.HasField("shape"):
                raise AssertionError(f"shape inference gave no shape for output {output.name!r}")
        onnx.checker.check_model(model, full_check=True)
        return model


def add_batchnorm(
    builder: GraphBuilder,
    x: str,
    params: BatchNormParams,
    *,
    output: str = OUTPUT_NAME,
    name: str = BN_NODE_NAME,
    epsilon: float | None = None,
    momentum: float | None = None,
    spatial: int | None = None,
    training_mode: int | None = None,
    extra_outputs: int = 0,
    extra_outputs_named: bool = True,
    param_source: str = "initializer",
    runtime_params: Iterable[str] = (),
) -> list[str]:
    """Append a BatchNormalization node reading ``x``; return its output names.

    ``runtime_params`` names BN params ("scale", "bias", "mean", "var") that become graph inputs
    without an initializer (so they are not constants). ``extra_outputs`` adds that many named
    extra outputs (2 for training_mode=1 at opset 14+, 4 for training at opsets 9-13); each
    becomes a graph output too. ``extra_outputs_named=False`` leaves them unnamed instead (optional
    outputs nobody asked for: a training_mode=1 BN whose only result is Y). Attributes left as None
    are omitted (ONNX defaults apply).
    """
    runtime_params = set(runtime_params)
    unknown = runtime_params - set(BN_PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown BN params {sorted(unknown)}")
    param_inputs = []
    for param_name, array in params.as_dict().items():
        tensor_name = f"{name}_{param_name}"
        if param_name in runtime_params:
            param_inputs.append(builder.add_input(tensor_name, array.dtype, array.shape))
        else:
            param_inputs.append(builder.add_constant(tensor_name, array, param_source))
    attributes = {}
    if epsilon is not None:
        attributes["epsilon"] = epsilon
    if momentum is not None:
        attributes["momentum"] = momentum
    if spatial is not None:
        if builder.opset >= 9:
            raise ValueError("'spatial' exists only up to opset 8")
        attributes["spatial"] = spatial
    if training_mode is not None:
        if builder.opset < 14:
            raise ValueError("'training_mode' exists from opset 14")
        attributes["training_mode"] = training_mode
    extra_names = [f"{name}_extra_output{k}" if extra_outputs_named else "" for k in range(extra_outputs)]
    outputs = [output] + extra_names
    builder.add_node("BatchNormalization", [x, *param_inputs], outputs, name=name, **attributes)
    for extra in filter(None, extra_names):
        # Older opsets' shape inference leaves BN's extra outputs untyped: declare them.
        builder.add_output(extra, params.mean.dtype, params.mean.shape)
    return outputs


# --------------------------------------------------------------------------------------------
# Producer -> BN models
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProducerSpec:
    """Shapes of one producer node; made by :func:`add_producer`."""

    producer: str
    node_name: str
    output: str
    out_channels: int
    output_shape: tuple[int, ...]


def add_producer(
    builder: GraphBuilder,
    producer: str,
    x: str,
    x_shape: Sequence[int],
    rng: np.random.Generator,
    *,
    out_channels: int,
    dtype=np.float32,
    bias: bool = True,
    group: int = 1,
    kernel: int = 3,
    trans_b: int = 0,
    alpha: float | None = None,
    beta: float | None = None,
    node_name: str | None = None,
    output: str | None = None,
    weight_name: str | None = None,
    bias_name: str | None = None,
    weight_source: str = "initializer",
    gemm_bias_shape: Sequence[int] | None = None,
) -> ProducerSpec:
    """Append one producer node ("conv", "conv_transpose", "gemm", "matmul") with random weights.

    Conv: weight (C_out, C_in/group, k...), pads 1, stride 1 (output spatial size = input's).
    ConvTranspose: weight (C_in, C_out/group, k...), stride 2, pads 1, output_padding 1
    (output spatial size = 2 x input's). Gemm: A (N, K), B (K, C_out) or (C_out, K) for
    ``trans_b=1``, C of shape ``gemm_bias_shape`` (default (C_out,)) when ``bias``.
    MatMul: (N, K) x constant (K, C_out), no bias; a rank-3 input (N, T, K) gives a rank-3 output.
    ``weight_source`` places the weight and bias (see :meth:`GraphBuilder.add_constant`).
    """
    if producer not in PRODUCERS:
        raise ValueError(f"unknown producer {producer!r}; expected one of {PRODUCERS}")
    node_name = node_name or producer
    output = output or f"{node_name}_out"
    weight_name = weight_name or f"{node_name}_weight"
    bias_name = bias_name or f"{node_name}_bias"
    x_shape = tuple(x_shape)
    in_channels = x_shape[1]
    spatial = x_shape[2:]
    inputs = [x, weight_name]

    if producer in ("conv", "conv_transpose"):
        if not spatial:
            raise ValueError("Conv/ConvTranspose input needs spatial dims")
        if in_channels % group or out_channels % group:
            raise ValueError(f"group {group} must divide C_in {in_channels} and C_out {out_channels}")
        kernel_shape = [kernel] * len(spatial)
        if producer == "conv":
            weight_shape = (out_channels, in_channels // group, *kernel_shape)
            fan_in = in_channels // group * kernel**len(spatial)
            attributes = dict(kernel_shape=kernel_shape, pads=[1] * (2 * len(spatial)), group=group)
            output_spatial = spatial
        else:
            weight_shape = (in_channels, out_channels // group, *kernel_shape)
            fan_in = in_channels // group * kernel**len(spatial)
            attributes = dict(
                kernel_shape=kernel_shape,
                strides=[2] * len(spatial),
                pads=[1] * (2 * len(spatial)),
                output_padding=[1] * len(spatial),
                group=group,
            )
            output_spatial = tuple(2 * size for size in spatial)
        inputs[1] = builder.add_constant(weight_name, random_weight(weight_shape, rng, dtype, fan_in=fan_in),
                                         weight_source)
        if bias:
            inputs.append(builder.add_constant(bias_name, random_bias(out_channels, rng, dtype), weight_source))
        output_shape = (x_shape[0], out_channels, *output_spatial)
        builder.add_node(PRODUCER_OP_TYPES[producer], inputs, [output], name=node_name, **attributes)
    elif producer == "gemm":
        if len(x_shape) != 2:
            raise ValueError("Gemm input must be rank 2")
        if group != 1:
            raise ValueError("Gemm has no groups")
        if not bias and builder.opset < 11:
            raise ValueError("Gemm below opset 11 requires C")
        weight_shape = (out_channels, in_channels) if trans_b else (in_channels, out_channels)
        inputs[1] = builder.add_constant(
            weight_name, random_weight(weight_shape, rng, dtype, fan_in=in_channels), weight_source
        )
        if bias:
            bias_shape = (out_channels,) if gemm_bias_shape is None else tuple(gemm_bias_shape)
            bias_values = random_bias(int(np.prod(bias_shape)), rng, dtype).reshape(bias_shape)
            inputs.append(builder.add_constant(bias_name, bias_values, weight_source))
        attributes = {}
        if trans_b:
            attributes["transB"] = trans_b
        if alpha is not None:
            attributes["alpha"] = alpha
        if beta is not None:
            attributes["beta"] = beta
        output_shape = (x_shape[0], out_channels)
        builder.add_node("Gemm", inputs, [output], name=node_name, **attributes)
    else:  # matmul
        if len(x_shape) not in (2, 3):
            raise ValueError("this builder's MatMul input is rank 2 or 3")
        if group != 1 or bias:
            raise ValueError("MatMul has no groups and no bias")
        in_features = x_shape[-1]
        inputs[1] = builder.add_constant(
            weight_name, random_weight((in_features, out_channels), rng, dtype, fan_in=in_features), weight_source
        )
        output_shape = (*x_shape[:-1], out_channels)
        builder.add_node("MatMul", inputs, [output], name=node_name)
    return ProducerSpec(producer, node_name, output, out_channels, output_shape)


def producer_input_shape(producer: str, *, batch: int = 2, in_channels: int = 4, spatial_dims: int = 2,
                         spatial_size: int = 5) -> tuple[int, ...]:
    if producer in ("conv", "conv_transpose"):
        return (batch, in_channels, *([spatial_size] * spatial_dims))
    return (batch, in_channels)


def build_producer_bn_model(
    producer: str = "conv",
    *,
    spatial_dims: int = 2,
    bias: bool = True,
    group: int = 1,
    dtype=np.float32,
    bn_param_dtype=None,
    opset: int = 13,
    ir_version: int = DEFAULT_IR_VERSION,
    batch: int = 2,
    in_channels: int = 4,
    out_channels: int = 6,
    spatial_size: int = 5,
    input_shape: Sequence[int] | None = None,
    kernel: int = 3,
    trans_b: int = 0,
    alpha: float | None = None,
    beta: float | None = None,
    epsilon: float | None = None,
    momentum: float | None = None,
    spatial: int | None = None,
    training_mode: int | None = None,
    bn_extra_outputs: int = 0,
    bn_extra_outputs_named: bool = True,
    param_source: str = "initializer",
    weight_source: str = "initializer",
    gemm_bias_shape: Sequence[int] | None = None,
    runtime_bn_params: Iterable[str] = (),
    producer_output_also_graph_output: bool = False,
    producer_output_also_consumed: bool = False,
    initializers_as_inputs: bool | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> producer -> BatchNormalization -> y, with random weights, biases and BN statistics.

    Node names: the producer node is called ``producer`` ("conv", "gemm", ...), the BN node
    :data:`BN_NODE_NAME`. Graph input :data:`INPUT_NAME`, graph output :data:`OUTPUT_NAME`.

    - ``input_shape``: overrides the input shape made from batch/in_channels/spatial_dims/spatial_size
      (e.g. a rank-3 MatMul input).
    - ``group``: Conv/ConvTranspose groups; pass ``group=in_channels`` (and out_channels a multiple)
      for depthwise.
    - ``bn_param_dtype``: dtype of the BN params (default: ``dtype``); only opset 15 allows another.
    - ``spatial``: opset-7 BN ``spatial`` attribute; ``spatial=0`` gives (C, D1, ...) params.
    - ``training_mode`` / ``bn_extra_outputs`` / ``bn_extra_outputs_named``: see :func:`add_batchnorm`.
    - ``param_source``: where BN params live, see :meth:`GraphBuilder.add_constant`;
      ``weight_source``: the same for the producer's weight and bias.
    - ``gemm_bias_shape``: shape of Gemm's C (default (out_channels,)); C broadcasts to (N, C_out).
    - ``runtime_bn_params``: BN params made graph inputs without initializer (not constant).
    - ``producer_output_also_graph_output``: the producer's output is a graph output too.
    - ``producer_output_also_consumed``: the producer's output also feeds a Relu whose output
      ``relu_out`` is a graph output.
    """
    rng = np.random.default_rng(seed)
    builder = GraphBuilder(opset=opset, ir_version=ir_version)
    x_shape = tuple(input_shape) if input_shape is not None else producer_input_shape(
        producer, batch=batch, in_channels=in_channels, spatial_dims=spatial_dims, spatial_size=spatial_size
    )
    builder.add_input(INPUT_NAME, dtype, x_shape)
    spec = add_producer(
        builder, producer, INPUT_NAME, x_shape, rng,
        out_channels=out_channels, dtype=dtype, bias=bias, group=group, kernel=kernel,
        trans_b=trans_b, alpha=alpha, beta=beta, weight_source=weight_source, gemm_bias_shape=gemm_bias_shape,
    )
    param_shape = (spec.out_channels,) if spatial != 0 else spec.output_shape[1:]
    params = random_bn_params(param_shape, rng, bn_param_dtype or dtype)
    builder.add_output(OUTPUT_NAME)
    add_batchnorm(
        builder, spec.output, params,
        epsilon=epsilon, momentum=momentum, spatial=spatial, training_mode=training_mode,
        extra_outputs=bn_extra_outputs, extra_outputs_named=bn_extra_outputs_named, param_source=param_source,
        runtime_params=runtime_bn_params,
    )
    if producer_output_also_graph_output:
        builder.add_output(spec.output)
    if producer_output_also_consumed:
        builder.add_node("Relu", [spec.output], ["relu_out"], name="relu")
        builder.add_output("relu_out")
    return builder.build(initializers_as_inputs=initializers_as_inputs)


def build_bn_after_op_model(
    op: str = "Relu", *, dtype=np.float32, opset: int = 13, channels: int = 4, seed: int = 0
) -> onnx.ModelProto:
    """A BN whose input comes from something BN cannot fold into.

    op: "Relu" (x -> Conv -> Relu -> BN), "MaxPool" (x -> Conv -> MaxPool -> BN) or
    "graph_input" (x -> BN). The Conv (where present) is named "conv"; the BN node ``bn``.
    """
    rng = np.random.default_rng(seed)
    builder = GraphBuilder(opset=opset)
    x_shape = (2, channels, 6, 6)
    builder.add_input(INPUT_NAME, dtype, x_shape)
    if op == "graph_input":
        bn_input = INPUT_NAME
    elif op in ("Relu", "MaxPool"):
        spec = add_producer(builder, "conv", INPUT_NAME, x_shape, rng, out_channels=channels, dtype=dtype)
        attributes = dict(kernel_shape=[2, 2], strides=[2, 2]) if op == "MaxPool" else {}
        bn_input = builder.add_node(op, [spec.output], [f"{op.lower()}_out"], name=op.lower(), **attributes)[0]
    else:
        raise ValueError(f"unknown op {op!r}")
    builder.add_output(OUTPUT_NAME)
    add_batchnorm(builder, bn_input, random_bn_params((channels,), rng, dtype))
    return builder.build()


SHARING_LAYOUTS = ("initializer", "identity_on_one_path", "common_identity", "constant_node")


def build_shared_weight_model(
    *, share_bias: bool = True, shared_through: str = "initializer", dtype=np.float32, opset: int = 13,
    seed: int = 0,
) -> onnx.ModelProto:
    """Two Convs reading the same weight (and bias) tensors; only the first, ``conv``, feeds a BN.

    x -> conv -> bn -> y;  x -> conv_other -> y_other. ``shared_through`` says how they share:

    - "initializer": both read the initializers "shared_weight" / "shared_bias";
    - "identity_on_one_path": conv reads Identity(shared initializer), conv_other the initializer;
    - "common_identity": both read the same Identity output of the shared initializer;
    - "constant_node": both read the output of the same Constant node.
    """
    if shared_through not in SHARING_LAYOUTS:
        raise ValueError(f"unknown sharing layout {shared_through!r}; expected one of {SHARING_LAYOUTS}")
    rng = np.random.default_rng(seed)
    builder = GraphBuilder(opset=opset)
    x_shape = (2, 4, 5, 5)
    builder.add_input(INPUT_NAME, dtype, x_shape)
    values = {
        "shared_weight": random_weight((6, 4, 3, 3), rng, dtype),
        "shared_bias": random_bias(6, rng, dtype),
        "conv_bias": random_bias(6, rng, dtype),
        "conv_other_bias": random_bias(6, rng, dtype),
    }
    shared = ["shared_weight", "shared_bias"] if share_bias else ["shared_weight"]
    conv_reads = {"weight": "shared_weight", "bias": "shared_bias" if share_bias else "conv_bias"}
    other_reads = {"weight": "shared_weight", "bias": "shared_bias" if share_bias else "conv_other_bias"}
    for name in shared:
        role = "weight" if name.endswith("weight") else "bias"
        if shared_through == "constant_node":
            builder.add_constant(name, values[name], "constant_node")
        else:
            builder.add_initializer(name, values[name])
        if shared_through in ("identity_on_one_path", "common_identity"):
            builder.add_node("Identity", [name], [f"{name}_identity"], name=f"{name}_identity_node")
            conv_reads[role] = f"{name}_identity"
            if shared_through == "common_identity":
                other_reads[role] = f"{name}_identity"
    if not share_bias:
        builder.add_initializer("conv_bias", values["conv_bias"])
        builder.add_initializer("conv_other_bias", values["conv_other_bias"])
    conv_attributes = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    builder.add_node("Conv", [INPUT_NAME, conv_reads["weight"], conv_reads["bias"]], ["conv_out"], name="conv",
                     **conv_attributes)
    builder.add_node("Conv", [INPUT_NAME, other_reads["weight"], other_reads["bias"]], ["y_other"],
                     name="conv_other", **conv_attributes)
    builder.add_output(OUTPUT_NAME)
    add_batchnorm(builder, "conv_out", random_bn_params((6,), rng, dtype))
    builder.add_output("y_other")
    return builder.build()


def build_conv_bn_relu_chain_model(
    *, blocks: int = 3, channels: int = 4, in_channels: int | None = None, dtype=np.float32, opset: int = 13,
    batch: int | str = 2, spatial_size: int = 6, biases: str = "alternate", without_batchnorm: Iterable[int] = (),
    seed: int = 0,
) -> onnx.ModelProto:
    """``blocks`` x (Conv 3x3, pads 1 -> BN -> Relu): nodes conv{i}, bn{i}, relu{i}; output ``y``.

    The input is (``batch``, ``in_channels`` (default ``channels``), ``spatial_size``,
    ``spatial_size``); ``batch`` may be a symbol such as "N". Every Conv makes ``channels``
    channels; ``biases``: "alternate" (even blocks have a bias) or "all". The blocks numbered in
    ``without_batchnorm`` have no BN (Conv -> Relu). Large ``channels`` make large models (512:
    9.4 MB per Conv weight) for the memory tests.
    """
    if biases not in ("alternate", "all"):
        raise ValueError(f"unknown biases {biases!r}")
    rng = np.random.default_rng(seed)
    builder = GraphBuilder(opset=opset)
    x_shape = (batch, in_channels or channels, spatial_size, spatial_size)
    builder.add_input(INPUT_NAME, dtype, x_shape)
    current = INPUT_NAME
    for block in range(blocks):
        spec = add_producer(
            builder, "conv", current, x_shape, rng, out_channels=channels, dtype=dtype,
            bias=biases == "all" or block % 2 == 0, node_name=f"conv{block}",
        )
        x_shape = spec.output_shape
        current = spec.output
        if block not in without_batchnorm:
            current = add_batchnorm(
                builder, spec.output, random_bn_params((channels,), rng, dtype),
                output=f"bn{block}_out", name=f"bn{block}",
            )[0]
        output = OUTPUT_NAME if block == blocks - 1 else f"relu{block}_out"
        builder.add_node("Relu", [current], [output], name=f"relu{block}")
        current = output
    builder.add_output(OUTPUT_NAME)
    return builder.build()


# --------------------------------------------------------------------------------------------
# Running and inspecting models
# --------------------------------------------------------------------------------------------


def _numpy_dtype(elem_type: int):
    return helper.tensor_dtype_to_np_dtype(elem_type)


def graph_data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (the ones a caller must feed)."""
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializer_names]


def random_feeds(model: onnx.ModelProto, seed: int = 1, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Standard-normal feeds for every non-initializer graph input (all dims must be fixed).

    A BN param fed at run time (a "var" input) gets |randn| + 0.5 so the model stays finite.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph_data_inputs(model):
        tensor_type = value.type.tensor_type
        shape = [dim.dim_value for dim in tensor_type.shape.dim]
        array = rng.standard_normal(shape) * scale
        if value.name.endswith("_var"):
            array = np.abs(array) + 0.5
        feeds[value.name] = array.astype(_numpy_dtype(tensor_type.elem_type))
    return feeds


def make_session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
    """A CPU session with graph optimizations disabled, so onnxruntime cannot fold BN itself."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All graph outputs, in graph order, from onnxruntime CPU with optimizations disabled."""
    return make_session(model).run(None, feeds)


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    """Number of nodes of ``op_type`` in the main graph."""
    return sum(1 for node in model.graph.node if node.op_type == op_type)


def upcast_model_to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every float16 tensor (initializers, Constant values, inputs, outputs) as float32.

    float16 -> float32 is exact, so this runs the same math at ~1e-7 relative error: a reference
    for float16 models that is ~10^4 x more accurate than float16 itself.
    """
    upcast = onnx.ModelProto()
    upcast.CopyFrom(model)
    float16, float32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def upcast_tensor(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == float16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))

    for tensor in upcast.graph.initializer:
        upcast_tensor(tensor)
    for node in upcast.graph.node:
        if node.op_type == "Cast":
            raise NotImplementedError("upcast_model_to_float32 does not rewrite Cast nodes")
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                upcast_tensor(attribute.t)
    for value in [*upcast.graph.input, *upcast.graph.output, *upcast.graph.value_info]:
        if value.type.tensor_type.elem_type == float16:
            value.type.tensor_type.elem_type = float32
    return upcast


def names_read(node: onnx.NodeProto) -> set[str]:
    """The inputs of ``node`` and every name read by the nodes of its subgraphs (If/Loop/Scan
    branches and bodies, nested ones too); names a subgraph defines itself are included, which
    costs nothing here: they never match an outer initializer or node output in these tests."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
            for inner in subgraph.node:
                names |= names_read(inner)
    return names


def unused_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers no node (or subgraph, or graph output) reads."""
    used = {name for node in model.graph.node for name in names_read(node)}
    used |= {value.name for value in model.graph.output}
    return [tensor.name for tensor in model.graph.initializer if tensor.name not in used]


def dead_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of nodes none of whose outputs reaches a graph output (transitively)."""
    needed = {value.name for value in model.graph.output}
    live = set()
    for index in reversed(range(len(model.graph.node))):  # nodes are topologically sorted
        node = model.graph.node[index]
        if any(output and output in needed for output in node.output):
            live.add(index)
            needed.update(names_read(node))
    return [node.name or f"#{index}" for index, node in enumerate(model.graph.node) if index not in live]


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)


def node_by_name(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for node in model.graph.node:
        if node.name == name:
            return node
    raise KeyError(name)


def float16_ulp(magnitude) -> np.ndarray:
    """Spacing of float16 numbers at ``magnitude`` (one unit in the last place)."""
    return np.spacing(np.abs(np.asarray(magnitude)).astype(np.float16)).astype(np.float64)


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    """Value of tensor ``name`` if it is an initializer, a Constant output or behind Identity nodes."""
    producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    while True:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Identity":
            name = node.input[0]
            continue
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
        raise KeyError(f"{name!r} is not a constant tensor")


def with_initializer_as_graph_input(model: onnx.ModelProto, name: str, *, keep_initializer: bool) -> onnx.ModelProto:
    """A copy where initializer ``name`` is also (``keep_initializer``) or only a graph input.

    From IR 4 on, an initializer listed as a graph input is a default the caller may override, so
    either way the tensor is no longer a constant.
    """
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    tensor = next(tensor for tensor in changed.graph.initializer if tensor.name == name)
    changed.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    if not keep_initializer:
        changed.graph.initializer.remove(tensor)
    onnx.checker.check_model(changed, full_check=True)
    return changed


def with_inferred_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy carrying shape-inferred ``value_info`` for every intermediate tensor, as exporters write."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert len(inferred.graph.value_info) > 0
    return inferred


# --------------------------------------------------------------------------------------------
# Patterns beyond producer -> BN (tests/test_fold_patterns.py)
# --------------------------------------------------------------------------------------------

ADD_PRODUCERS = ("conv", "conv_transpose", "gemm", "matmul")
QUANTIZED_PRODUCERS = ("conv", "conv_transpose", "gemm", "matmul")
FORWARD_LAYERS = ("conv", "gemm", "matmul")


def channel_bias_shape(producer: str, out_channels: int, spatial_dims: int = 2) -> tuple[int, ...]:
    """The usual shape of a per-channel constant added to the producer's output: (C, 1, 1) after a
    2-D Conv/ConvTranspose (what exporters write for a bias), (C,) after a rank-2 Gemm/MatMul."""
    if producer in ("conv", "conv_transpose"):
        return (out_channels,) + (1,) * spatial_dims
    return (out_channels,)


def build_producer_add_bn_model(
    producer: str = "conv",
    *,
    add_shape: Sequence[int] | None = None,
    constant_first: bool = False,
    bias: bool = False,
    group: int = 1,
    dtype=np.float32,
    bn_param_dtype=None,
    opset: int = 13,
    ir_version: int = DEFAULT_IR_VERSION,
    add_source: str = "initializer",
    producer_output_also_consumed: bool = False,
    add_output_also_consumed: bool = False,
    batch: int = 3,
    in_channels: int = 4,
    out_channels: int = 6,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> producer -> Add(constant) -> BatchNormalization -> y.

    The Add node is ``add``, its constant ``add_constant`` (shape ``add_shape``, default
    :func:`channel_bias_shape`; random, non-zero), read as the Add's first input when
    ``constant_first``. ``bias`` gives the producer its own bias too (MatMul has none).
    ``producer_output_also_consumed`` / ``add_output_also_consumed``: that tensor also feeds a Relu
    whose output ``relu_out`` is a graph output.
    """
    rng = np.random.default_rng(seed)
    builder = GraphBuilder(opset=opset, ir_version=ir_version)
    x_shape = producer_input_shape(producer, batch=batch, in_channels=in_channels)
    builder.add_input(INPUT_NAME, dtype, x_shape)
    spec = add_producer(builder, producer, INPUT_NAME, x_shape, rng, out_channels=out_channels, dtype=dtype,
                        bias=bias and producer != "matmul", group=group)
    shape = tuple(add_shape) if add_shape is not None else channel_bias_shape(producer, out_channels)
    values = random_bias(int(np.prod(shape)), rng, dtype).reshape(shape)
    constant = builder.add_constant("add_constant", values, add_source)
    inputs = [constant, spec.output] if constant_first else [spec.output, constant]
    builder.add_node("Add", inputs, ["add_out"], name="add")
    builder.add_output(OUTPUT_NAME)
    add_batchnorm(builder, "add_out", random_bn_params((out_channels,), rng, bn_param_dtype or dtype))
    for tensor, flag in ((spec.output, producer_output_also_consumed), ("add_out", add_output_also_consumed)):
        if flag:
            builder.add_node("Relu", [tensor], ["relu_out"], name="relu")
            builder.add_output("relu_out")
    return builder.build()


def random_quantized(shape, rng: np.random.Generator, dtype=np.int8, *, low: int | None = None,
                     high: int | None = None) -> np.ndarray:
    """Random integers in [low, high] (default: the dtype's range without its minimum, as
    narrow-range symmetric quantizers write)."""
    info = np.iinfo(dtype)
    low = info.min + 1 if low is None else low
    high = info.max if high is None else high
    return rng.integers(low, high, size=shape, endpoint=True).astype(dtype)


def build_quantized_weight_bn_model(
    producer: str = "conv",
    *,
    per_axis: bool = False,
    quantized_dtype=np.int8,
    zero_point: int | None = 0,
    quantized_range: tuple[int, int] | None = None,
    scale_dtype=np.float32,
    gamma_sign: str = "random",
    bias: bool = True,
    quantized_bias: bool = False,
    group: int = 1,
    trans_b: int = 0,
    opset: int = 13,
    ir_version: int = DEFAULT_IR_VERSION,
    shared: str | None = None,
    batch: int = 3,
    in_channels: int = 4,
    out_channels: int = 6,
    seed: int = 0,
) -> onnx.ModelProto:
    """x -> producer(x, DequantizeLinear(w_quantized, w_scale, w_zero_point), bias) -> BN -> y.

    The DequantizeLinear node is ``dequantize``; its integer weight ``w_quantized`` (``quantized_range``,
    default: the dtype's range without its minimum), scale ``w_scale`` (per tensor, or per output
    channel with ``per_axis``; dtype ``scale_dtype``), zero point ``w_zero_point`` (``None``: no zero
    point input). The activations, bias and BN params have the scale's dtype. ``gamma_sign``:
    "random", "positive" or "negative". ``quantized_bias``: the bias is
    DequantizeLinear(int32, scale) (node ``bias_dequantize``), as onnxruntime's quantizer writes it.
    ``shared``: "dequantize_output" (a second producer ``other`` reads the same DequantizeLinear output),
    "quantized" / "scale" (a second DequantizeLinear reads the same integer weight / scale, feeding
    ``other``); ``other``'s output ``y_other`` is a graph output.
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(scale_dtype)
    builder = GraphBuilder(opset=opset, ir_version=ir_version)
    x_shape = producer_input_shape(producer, batch=batch, in_channels=in_channels)
    builder.add_input(INPUT_NAME, dtype, x_shape)
    if producer == "conv":
        weight_shape, axis, attributes = (out_channels, in_channels // group, 3, 3), 0, dict(
            kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=group)
        op = "Conv"
    elif producer == "conv_transpose":
        weight_shape, axis, attributes = (in_channels, out_channels // group, 3, 3), 1, dict(
            kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1], group=group)
        op = "ConvTranspose"
    elif producer == "gemm":
        weight_shape = (out_channels, in_channels) if trans_b else (in_channels, out_channels)
        axis, attributes, op = (0 if trans_b else 1), (dict(transB=trans_b) if trans_b else {}), "Gemm"
    elif producer == "matmul":
        weight_shape, axis, attributes, op = (in_channels, out_channels), 1, {}, "MatMul"
    else:
        raise ValueError(f"unknown producer {producer!r}")
    low, high = quantized_range if quantized_range is not None else (None, None)
    quantized = random_quantized(weight_shape, rng, quantized_dtype, low=low, high=high)
    centered_magnitude = float(np.max(np.abs(quantized.astype(np.float64) - (zero_point or 0))))
    fan_in = int(np.prod(weight_shape)) // weight_shape[axis]
    # Scales that give the dequantized weight a variance of about 1/fan_in.
    base = 1.0 / (np.sqrt(fan_in) * centered_magnitude / np.sqrt(3))
    scale_shape = (weight_shape[axis],) if per_axis else ()
    w_scale = (base * (0.75 + 0.5 * rng.random(scale_shape))).astype(dtype)
    builder.add_initializer("w_quantized", quantized)
    builder.add_initializer("w_scale", w_scale)
    dq_inputs = ["w_quantized", "w_scale"]
    if zero_point is not None:
        builder.add_initializer("w_zero_point", np.full(scale_shape, zero_point, dtype=quantized_dtype))
        dq_inputs.append("w_zero_point")
    dq_attributes = dict(axis=axis) if per_axis else {}
    builder.add_node("DequantizeLinear", dq_inputs, ["w"], name="dequantize", **dq_attributes)
    inputs = [INPUT_NAME, "w"]
    if bias and producer != "matmul":
        bias_values = random_bias(out_channels, rng, dtype)
        if quantized_bias:
            bias_scale = np.asarray(np.float32(1e-4)).astype(dtype)
            builder.add_initializer("b_quantized", np.round(bias_values / bias_scale).astype(np.int32))
            builder.add_initializer("b_scale", bias_scale)
            builder.add_node("DequantizeLinear", ["b_quantized", "b_scale"], ["b"], name="bias_dequantize")
            inputs.append("b")
        else:
            inputs.append(builder.add_initializer("b", bias_values))
    builder.add_node(op, inputs, ["producer_out"], name=producer, **attributes)
    builder.add_output(OUTPUT_NAME)
    params = random_bn_params((out_channels,), rng, dtype)
    if gamma_sign != "random":
        sign = 1.0 if gamma_sign == "positive" else -1.0
        params.scale = (np.abs(params.scale.astype(np.float64)) * sign).astype(dtype)
    add_batchnorm(builder, "producer_out", params)
    if shared is not None:
        if shared == "dequantize_output":
            other_weight = "w"
        elif shared in ("quantized", "scale"):
            other_inputs = list(dq_inputs)
            if shared == "quantized":
                other_inputs[1] = builder.add_initializer("other_scale", (w_scale * 1.5).astype(dtype))
            else:
                other_inputs[0] = builder.add_initializer(
                    "other_quantized", random_quantized(weight_shape, rng, quantized_dtype, low=low, high=high))
            builder.add_node("DequantizeLinear", other_inputs, ["other_w"], name="other_dequantize", **dq_attributes)
            other_weight = "other_w"
        else:
            raise ValueError(f"unknown sharing {shared!r}")
        builder.add_node(op, [INPUT_NAME, other_weight], ["y_other"], name="other", **attributes)
        builder.add_output("y_other")
    return builder.build()


def build_bn_then_layer_model(
    layer: str = "conv",
    *,
    before: str = "input",
    pads: Sequence[int] | None = None,
    auto_pad: str | None = None,
    kernel: int = 3,
    strides: Sequence[int] | None = None,
    group: int = 1,
    bias: bool = True,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float | None = None,
    beta: float | None = None,
    gemm_bias_shape: Sequence[int] | None = None,
    dtype=np.float32,
    bn_param_dtype=None,
    opset: int = 13,
    ir_version: int = DEFAULT_IR_VERSION,
    param_source: str = "initializer",
    bn_output_also_consumed: bool = False,
    batch: int = 3,
    channels: int = 4,
    out_channels: int = 6,
    spatial_size: int = 6,
    seed: int = 0,
) -> onnx.ModelProto:
    """[x -> Relu ->] BatchNormalization -> layer -> y: a BN that can only fold forward.

    ``before``: "input" (the BN reads the graph input ``x``) or "relu" (``x -> relu -> bn``).
    ``layer``: "conv" (no padding unless ``pads`` / ``auto_pad`` say so; ``group`` groups),
    "gemm" (``trans_a``, ``trans_b``, ``alpha``, ``beta``, C of ``gemm_bias_shape``) or "matmul".
    The layer node is called ``layer``. ``bn_output_also_consumed``: the BN output also feeds a Relu
    whose output ``relu_out`` is a graph output.
    """
    rng = np.random.default_rng(seed)
    builder = GraphBuilder(opset=opset, ir_version=ir_version)
    if layer == "conv":
        x_shape = (batch, channels, spatial_size, spatial_size)
    elif trans_a:
        x_shape = (channels, batch)  # BN normalizes axis 1 of its input, which Gemm reads transposed
    else:
        x_shape = (batch, channels)
    builder.add_input(INPUT_NAME, dtype, x_shape)
    bn_input = INPUT_NAME
    if before == "relu":
        bn_input = builder.add_node("Relu", [INPUT_NAME], ["relu_before_out"], name="relu_before")[0]
    elif before != "input":
        raise ValueError(f"unknown 'before' {before!r}")
    bn_channels = x_shape[1]
    add_batchnorm(builder, bn_input, random_bn_params((bn_channels,), rng, bn_param_dtype or dtype),
                  output="bn_out", param_source=param_source)
    if layer == "conv":
        if channels % group or out_channels % group:
            raise ValueError("group must divide both channel counts")
        weight = random_weight((out_channels, channels // group, kernel, kernel), rng, dtype)
        inputs = ["bn_out", builder.add_initializer("layer_weight", weight)]
        if bias:
            inputs.append(builder.add_initializer("layer_bias", random_bias(out_channels, rng, dtype)))
        attributes = dict(kernel_shape=[kernel, kernel], group=group)
        if pads is not None:
            attributes["pads"] = list(pads)
        if auto_pad is not None:
            attributes["auto_pad"] = auto_pad
        if strides is not None:
            attributes["strides"] = list(strides)
        builder.add_node("Conv", inputs, [OUTPUT_NAME], name="layer", **attributes)
    elif layer == "gemm":
        in_features = x_shape[0] if trans_a else x_shape[1]
        weight_shape = (out_channels, in_features) if trans_b else (in_features, out_channels)
        inputs = ["bn_out", builder.add_initializer("layer_weight", random_weight(weight_shape, rng, dtype,
                                                                                 fan_in=in_features))]
        if bias:
            shape = tuple(gemm_bias_shape) if gemm_bias_shape is not None else (out_channels,)
            inputs.append(builder.add_initializer(
                "layer_bias", random_bias(int(np.prod(shape)), rng, dtype).reshape(shape)))
        attributes = {}
        for key, value in (("transA", trans_a), ("transB", trans_b), ("alpha", alpha), ("beta", beta)):
            if value:
                attributes[key] = value
        builder.add_node("Gemm", inputs, [OUTPUT_NAME], name="layer", **attributes)
    elif layer == "matmul":
        weight = random_weight((channels, out_channels), rng, dtype, fan_in=channels)
        builder.add_node("MatMul", ["bn_out", builder.add_initializer("layer_weight", weight)], [OUTPUT_NAME],
                         name="layer")
    else:
        raise ValueError(f"unknown layer {layer!r}")
    builder.add_output(OUTPUT_NAME)
    if bn_output_also_consumed:
        builder.add_node("Relu", ["bn_out"], ["relu_out"], name="relu")
        builder.add_output("relu_out")
    return builder.build()


def add_constant_of_shape(builder: GraphBuilder, name: str, shape: Sequence[int], fill: float, dtype=np.float32) -> str:
    """A ``ConstantOfShape`` node (``name + "_fill"``) filling ``shape`` with ``fill``; its shape is the
    int64 initializer ``name + "_shape"`` (the way onnx's light test models store weights)."""
    shape_name = builder.add_initializer(f"{name}_shape", np.asarray(shape, dtype=np.int64))
    builder.add_node("ConstantOfShape", [shape_name], [name], name=f"{name}_fill",
                     value=numpy_helper.from_array(np.asarray([fill], dtype=dtype), "value"))
    return name


def build_constant_of_shape_params_model(
    producer: str = "conv", *, dtype=np.float32, opset: int = 13, ir_version: int = DEFAULT_IR_VERSION,
    weight_from_constant_of_shape: bool = False, seed: int = 0,
) -> onnx.ModelProto:
    """x -> producer -> BN -> y where the BN's mean and var are ``ConstantOfShape`` outputs (fills 0.3
    and 1.7; gamma and beta random initializers), and with ``weight_from_constant_of_shape`` the
    producer's weight too (fill 0.02, like onnx's light models; its bias stays random)."""
    rng = np.random.default_rng(seed)
    builder = GraphBuilder(opset=opset, ir_version=ir_version)
    x_shape = producer_input_shape(producer, batch=3)
    builder.add_input(INPUT_NAME, dtype, x_shape)
    spec = add_producer(builder, producer, INPUT_NAME, x_shape, rng, out_channels=6, dtype=dtype,
                        bias=producer != "matmul")
    if weight_from_constant_of_shape:
        weight = builder.initializers.pop(next(i for i, t in enumerate(builder.initializers)
                                               if t.name == f"{spec.node_name}_weight"))
        add_constant_of_shape(builder, weight.name, list(weight.dims), 0.02, dtype)
        builder.nodes.insert(0, builder.nodes.pop())  # before the producer that reads it
    params = random_bn_params((6,), rng, dtype)
    # Shape inference cannot see through ConstantOfShape weights: declare the output.
    builder.add_output(OUTPUT_NAME, dtype, spec.output_shape)
    inputs = [spec.output,
              builder.add_initializer("bn_scale", params.scale),
              builder.add_initializer("bn_bias", params.bias),
              add_constant_of_shape(builder, "bn_mean", (6,), 0.3, dtype),
              add_constant_of_shape(builder, "bn_var", (6,), 1.7, dtype)]
    builder.add_node("BatchNormalization", inputs, [OUTPUT_NAME], name=BN_NODE_NAME)
    return builder.build()


# --------------------------------------------------------------------------------------------
# Computed constants, as torch's exporters write them (tests/test_computed_constants.py)
# --------------------------------------------------------------------------------------------


def add_computed_zero_bias(builder: GraphBuilder, x: str, weight: str, name: str) -> str:
    """The zero bias torch's dynamo exporter (``optimize=False``) gives a bias-free Conv reading
    ``x`` with ``weight``: ``Expand(CastLike(Constant 0, x), Expand(Shape(weight, end=1), [1]))``
    (opset >= 15). Returns the bias name ``name``."""
    builder.add_node("Shape", [weight], [f"{name}/channels"], name=f"{name}/shape", start=0, end=1)
    builder.add_constant(f"{name}/one", np.array([1], np.int64), "constant_node")
    builder.add_node("Expand", [f"{name}/channels", f"{name}/one"], [f"{name}/bias_shape"], name=f"{name}/expand_shape")
    builder.add_constant(f"{name}/zero", np.array(0, np.float32), "constant_node")
    builder.add_node("CastLike", [f"{name}/zero", x], [f"{name}/typed_zero"], name=f"{name}/cast_like")
    builder.add_node("Expand", [f"{name}/typed_zero", f"{name}/bias_shape"], [name], name=f"{name}/expand")
    return name


# --------------------------------------------------------------------------------------------
# PyTorch references (tests/test_torch_parity.py, tests/test_torch_exports.py); torch is
# imported only here, so the builders above work without it
# --------------------------------------------------------------------------------------------


def make_batchnorm_statistics_stale(model):
    """Give every BN of torch ``model`` random affine parameters and stale running statistics (as
    after compression), in place; return the model in eval mode."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def export_with_batchnorm_kept(model, sample, *, opset: int = 13, output_name: str = "logits") -> onnx.ModelProto:
    """torch ``model`` (put in eval mode) exported with every BatchNormalization kept: the legacy
    exporter, ``TrainingMode.PRESERVE``, no constant folding; input ``input``, output ``output_name``,
    batch dimension dynamic in both, IR version 10 (what onnxruntime 1.31 reads). ``sample`` is one
    example input batch."""
    import io
    import warnings

    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is the one that keeps BN
        torch.onnx.export(model.eval(), (sample,), buffer, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          opset_version=opset, input_names=["input"], output_names=[output_name],
                          dynamic_axes={"input": {0: "batch"}, output_name: {0: "batch"}})
    exported = onnx.load_from_string(buffer.getvalue())
    exported.ir_version = DEFAULT_IR_VERSION
    return exported


def update_bn_on(model, data: np.ndarray, batch_size: int):
    """``torch.optim.swa_utils.update_bn`` on ``data`` split into batches of ``batch_size`` (the
    last one shorter), as bnpass splits it; return the model in eval mode."""
    import torch

    batches = [torch.from_numpy(data[start:start + batch_size]) for start in range(0, len(data), batch_size)]
    torch.optim.swa_utils.update_bn(batches, model)
    return model.eval()
def build_subgraph_reader_model(reads: Sequence[str] = ("conv_weight", "bn_mean"), *, seed: int = 0) -> onnx.ModelProto:
    """x -> conv -> BN -> y, plus ``If(cond)`` whose branches read tensors of the outer graph.

    The If node is ``branch``, its output ``branch_out`` (shape (6,)) a graph output, its condition
    the bool graph input ``cond``. The then-branch returns the row sums of ``reads[0]`` reshaped to
    (6, -1) (one number per output channel of the conv weight), the else-branch ``Identity(reads[1])``;
    each must be a (6,)-element tensor.
    With the defaults, one branch reads the weight a fold would change, the other a parameter of the
    BN a fold would remove.
    """
    rng = np.random.default_rng(seed)
    builder = GraphBuilder(opset=13)
    x_shape = producer_input_shape("conv")
    builder.add_input(INPUT_NAME, np.float32, x_shape)
    builder.add_input("cond", np.bool_, [])
    spec = add_producer(builder, "conv", INPUT_NAME, x_shape, rng, out_channels=6)
    builder.add_output(OUTPUT_NAME)
    add_batchnorm(builder, spec.output, random_bn_params((6,), rng))
    then_shape = numpy_helper.from_array(np.array([6, -1], dtype=np.int64), "then_shape")
    then_axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "then_axes")
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["then_shape"], name="then_shape_constant", value=then_shape),
         helper.make_node("Constant", [], ["then_axes"], name="then_axes_constant", value=then_axes),
         helper.make_node("Reshape", [reads[0], "then_shape"], ["then_rows"], name="then_reshape"),
         helper.make_node("ReduceSum", ["then_rows", "then_axes"], ["then_out"], name="then_sum", keepdims=0)],
        "then_branch", [], [helper.make_tensor_value_info("then_out", onnx.TensorProto.FLOAT, [6])])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", [reads[1]], ["else_out"], name="else_identity")],
        "else_branch", [], [helper.make_tensor_value_info("else_out", onnx.TensorProto.FLOAT, [6])])
    builder.add_node("If", ["cond"], ["branch_out"], name="branch", then_branch=then_branch,
                     else_branch=else_branch)
    builder.add_output("branch_out", np.float32, (6,))
    return builder.build()


def build_qdq_conv_bn_model(*, seed: int = 0) -> onnx.ModelProto:
    """onnxruntime's QDQ layout around a Conv -> BN: x -> QuantizeLinear -> DequantizeLinear ->
    Conv(DequantizeLinear(int8 per-channel weight), bias) -> BN ``bn`` -> Relu -> QuantizeLinear ->
    DequantizeLinear -> y. With graph optimizations on, onnxruntime runs the Q/DQ pairs as integer
    kernels, so its output differs from the float graph's by a quantization step."""
    rng = np.random.default_rng(seed)
    builder = GraphBuilder(opset=13)
    builder.add_input(INPUT_NAME, np.float32, ["N", 3, 8, 8])
    builder.add_initializer("x_scale", np.float32(0.02))
    builder.add_initializer("x_zero_point", np.uint8(128))
    builder.add_node("QuantizeLinear", [INPUT_NAME, "x_scale", "x_zero_point"], ["x_quantized"], name="quantize_x")
    builder.add_node("DequantizeLinear", ["x_quantized", "x_scale", "x_zero_point"], ["x_dequantized"],
                     name="dequantize_x")
    weight = random_weight((8, 3, 3, 3), rng)
    weight_scale = (np.abs(weight).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
    builder.add_initializer("w_quantized", np.round(weight / weight_scale[:, None, None, None]).astype(np.int8))
    builder.add_initializer("w_scale", weight_scale)
    builder.add_initializer("w_zero_point", np.zeros(8, np.int8))
    builder.add_node("DequantizeLinear", ["w_quantized", "w_scale", "w_zero_point"], ["w"], name="dequantize_w",
                     axis=0)
    builder.add_initializer("b", random_bias(8, rng))
    builder.add_node("Conv", ["x_dequantized", "w", "b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1])
    add_batchnorm(builder, "conv_out", random_bn_params((8,), rng), output="bn_out", name=BN_NODE_NAME)
    builder.add_node("Relu", ["bn_out"], ["relu_out"], name="relu")
    builder.add_initializer("y_scale", np.float32(0.05))
    builder.add_initializer("y_zero_point", np.uint8(0))
    builder.add_node("QuantizeLinear", ["relu_out", "y_scale", "y_zero_point"], ["y_quantized"], name="quantize_y")
    builder.add_node("DequantizeLinear", ["y_quantized", "y_scale", "y_zero_point"], [OUTPUT_NAME],
                     name="dequantize_y")
    builder.add_output(OUTPUT_NAME)
    return builder.build()
