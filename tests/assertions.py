"""Checks the fold tests share: a fold that succeeded, a BN that stayed (and why), outputs that agree.

Written once here, imported by tests/test_fold_grid.py and tests/test_fold_patterns.py.

Outputs are compared through onnxruntime (CPU, graph optimizations disabled) on the same feeds:

* float32: elementwise rtol 1e-5, plus an absolute floor of 1e-6 x the output scale (max |output|)
  for elements near zero (folding reorders a dot product; measured worst case 3.6e-7 x scale);
* float64: the same argument at float64 precision (rtol 1e-12, floor 1e-13 x scale);
* float16: against a float32 run of the *unfolded* model (every fp16 tensor upcast exactly; its own
  error ~1e-7 is negligible), the folded fp16 output must be within ``float16_ulps`` fp16 ulps of
  the output scale. The unfolded fp16 model is within 0.5 ulp of that reference (onnxruntime
  computes in float32 and rounds the output); folding adds one rounding per folded weight, which a
  dot product accumulates, so no fold can promise 0.5 ulp. The default, one ulp, holds for the
  backward folds of tests/test_fold_patterns.py (measured worst case over 5 seeds 0.97 ulp); the
  callers that need more say why.
* any other type: equal.
"""

from __future__ import annotations

import numpy as np
import onnx

import bnpass
from builders import (
    BN_NODE_NAME,
    count_ops,
    dead_nodes,
    float16_ulp,
    graph_data_inputs,
    random_feeds,
    run_onnxruntime,
    unused_initializers,
    upcast_model_to_float32,
)

FLOAT32_RTOL = 1e-5
FLOAT32_ATOL_PER_SCALE = 1e-6
FLOAT64_RTOL = 1e-12
FLOAT64_ATOL_PER_SCALE = 1e-13
FLOAT16_ULPS = 1.0


def value_signature(value: onnx.ValueInfoProto) -> tuple:
    """``(name, element type, dims)`` of a declared tensor, symbolic dims by name."""
    tensor_type = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim)
    return value.name, tensor_type.elem_type, dims


def output_errors(folded: onnx.ModelProto, original: onnx.ModelProto, feeds: dict) -> dict:
    """Run both models on ``feeds``; assert float32/float64 (and non-float) outputs agree at the
    tolerances above and return, per output, ``("rel", max |folded - original| / scale)``, or for
    float16 outputs ``("ulp", folded error, unfolded error)`` in fp16 ulps of the output scale,
    both measured against a float32 run of the unfolded model (the caller bounds those)."""
    expected = run_onnxruntime(original, feeds)
    actual = run_onnxruntime(folded, feeds)
    names = [value.name for value in original.graph.output]
    errors, float32_reference = {}, None
    for index, (name, want, got) in enumerate(zip(names, expected, actual)):
        assert got.dtype == want.dtype, f"output {name!r}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"output {name!r}: shape {got.shape} != {want.shape}"
        if want.dtype == np.float16:
            if float32_reference is None:
                feeds32 = {key: value.astype(np.float32) if value.dtype == np.float16 else value
                           for key, value in feeds.items()}
                float32_reference = run_onnxruntime(upcast_model_to_float32(original), feeds32)
            reference = float32_reference[index].astype(np.float64)
            ulp = float(float16_ulp(np.max(np.abs(reference)) or 1.0))
            errors[name] = ("ulp", float(np.max(np.abs(got.astype(np.float64) - reference))) / ulp,
                            float(np.max(np.abs(want.astype(np.float64) - reference))) / ulp)
            continue
        if want.dtype not in (np.float32, np.float64):
            np.testing.assert_array_equal(got, want, err_msg=f"output {name!r}")
            continue
        scale = float(np.max(np.abs(want.astype(np.float64)))) or 1.0
        rtol, atol = ((FLOAT64_RTOL, FLOAT64_ATOL_PER_SCALE) if want.dtype == np.float64
                      else (FLOAT32_RTOL, FLOAT32_ATOL_PER_SCALE))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=f"output {name!r}")
        errors[name] = ("rel", float(np.max(np.abs(got.astype(np.float64) - want))) / scale)
    return errors


def fold_and_verify(model: onnx.ModelProto, *, folded: int = 1, remaining: int = 0,
                    float16_ulps: float = FLOAT16_ULPS, feeds=None):
    """Fold ``model`` and run every check a successful fold must pass; return ``(result, errors)``.

    ``folded`` BNs fold and ``remaining`` stay (each with a reason). The result passes the full
    checker; keeps IR version, opset, data inputs and outputs; has no dead node, unused initializer
    or repeated node name (IR 3: every initializer is a graph input); leaves the input untouched;
    matches the unfolded model (:func:`output_errors`, float16 within ``float16_ulps``); and a
    second fold changes nothing (``modified=False``, same bytes, its input untouched).
    """
    original_bytes = model.SerializeToString()
    result = bnpass.fold_batchnorms(model)
    assert model.SerializeToString() == original_bytes, "fold_batchnorms mutated its input model"
    assert result.modified is True
    assert len(result.folded) == folded, (result.folded, result.skipped)
    assert len(result.skipped) == remaining, result.skipped
    assert all(isinstance(reason, str) and reason.strip() for reason in result.skipped.values()), result.skipped
    assert count_ops(result.model, "BatchNormalization") == remaining

    onnx.checker.check_model(result.model, full_check=True)
    assert result.model.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in result.model.opset_import] == [
        (o.domain, o.version) for o in model.opset_import]
    assert [value_signature(v) for v in graph_data_inputs(result.model)] == [
        value_signature(v) for v in graph_data_inputs(model)]
    assert [value_signature(v) for v in result.model.graph.output] == [
        value_signature(v) for v in model.graph.output]
    assert dead_nodes(result.model) == []
    assert unused_initializers(result.model) == []
    node_names = [node.name for node in result.model.graph.node if node.name]
    assert len(node_names) == len(set(node_names)), "node names are not unique"
    if model.ir_version < 4:
        inputs = {value.name for value in result.model.graph.input}
        assert {t.name for t in result.model.graph.initializer} <= inputs, "IR-3 initializers must be graph inputs"

    errors = output_errors(result.model, model, feeds if feeds is not None else random_feeds(model))
    for name, error in errors.items():
        if error[0] == "ulp":
            assert error[1] <= float16_ulps, (
                f"output {name!r}: folded fp16 model is {error[1]:.2f} ulp from the float32 reference "
                f"(unfolded fp16 model: {error[2]:.2f} ulp; bound {float16_ulps})")

    folded_bytes = result.model.SerializeToString()
    again = bnpass.fold_batchnorms(result.model)
    assert again.modified is False and again.folded == [], again.folded
    assert again.model.SerializeToString() == folded_bytes, "second fold changed the model"
    assert result.model.SerializeToString() == folded_bytes, "second fold mutated its input model"
    return result, errors


def assert_stays(model: onnx.ModelProto, *words: str, bn_name: str = BN_NODE_NAME) -> str:
    """The BN stays, its reason mentions each of ``words``, and the model is unchanged byte for byte.

    At least one word is required: a fixture refused for another reason than the one its test
    names would otherwise keep the test green while the check it guards is gone.
    """
    assert words, "name the words the reason must contain"
    original_bytes = model.SerializeToString()
    result = bnpass.fold_batchnorms(model)
    assert model.SerializeToString() == original_bytes, "fold_batchnorms mutated its input model"
    assert result.modified is False and result.folded == [], result.folded
    assert bn_name in result.skipped, result.skipped
    reason = result.skipped[bn_name]
    for word in words:
        assert word in reason, f"reason {reason!r} does not mention {word!r}"
    assert result.model.SerializeToString() == original_bytes, "model changed although nothing was folded"
    return reason
