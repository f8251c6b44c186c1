"""Fingerprints of what bnpass writes, to show a refactor leaves every output as it was.

For each model the tests build (tests/builders.py, over the options that change what a fold or a
calibration does) and for the example models under examples/, this records sha256 hashes of:

- ``fold/<case>``: the folded model (``SerializeToString(deterministic=True)``) with what folded,
  what stayed and why (``FoldResult.folded / skipped / patterns``);
- ``reestimate/<case>``: the re-estimated model and its per-BN statistics (old and new mean and
  variance, count, written, reason), on seeded generated data, on the CPU;
- ``reference/<case>``: the same for ``reference=`` (the examples' reference model), with the
  matched statistics and rules of every candidate;
- ``calibration-graph/<case>``: the calibration copy ``bnpass.calibration.build_calibration_model``
  builds for each statistics form and mode (the one name used that is not the public API: the
  forms other than ``reduce`` run only on GPUs, so their graphs are compared instead).

Usage (from the repository root; PYTHONPATH chooses the code measured)::

    PYTHONPATH=/path/to/checkout python tools/output_fingerprints.py --out fingerprints.json
    PYTHONPATH=$PWD python tools/output_fingerprints.py --compare fingerprints.json

``--compare`` exits 1 and lists every case whose hash differs, or that is new or missing.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import bnpass  # noqa: E402
import builders as b  # noqa: E402
from bnpass.calibration import FORMS, MatchTarget, batchnorm_nodes, build_calibration_model  # noqa: E402


def _sha(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
    return digest.hexdigest()


def _model_bytes(model) -> bytes:
    return model.SerializeToString(deterministic=True)


def _array_bytes(value) -> bytes:
    if value is None:
        return b"None"
    value = np.asarray(value)
    return str(value.dtype).encode() + repr(value.shape).encode() + value.tobytes()


def _stats_bytes(stats: dict) -> bytes:
    parts = []
    for name in sorted(stats):
        s = stats[name]
        parts += [name.encode(), _array_bytes(s.old_mean), _array_bytes(s.old_var), _array_bytes(s.mean),
                  _array_bytes(s.var), repr((s.count, s.written, s.reason)).encode()]
    return b"|".join(parts)


# --- the models -----------------------------------------------------------------------------------


def _variants(builder, **grid):
    """``{case name: model}`` for every combination of ``grid`` the builder accepts."""
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        options = dict(zip(keys, values))
        try:
            model = builder(**options)
        except Exception:  # a combination the builder (or onnx's checker in it) refuses
            continue
        name = builder.__name__.removeprefix("build_") + "(" + ",".join(
            f"{k}={getattr(v, '__name__', v)}" for k, v in options.items()) + ")"
        yield name, model


def fold_models():
    f32, f16, f64 = np.float32, np.float16, np.float64
    yield from _variants(b.build_producer_bn_model, producer=("conv", "conv_transpose"), bias=(True, False),
                         group=(1, 2), dtype=(f32, f16), opset=(7, 13, 15))
    yield from _variants(b.build_producer_bn_model, producer=("conv",), spatial_dims=(1, 3))
    yield from _variants(b.build_producer_bn_model, producer=("gemm",), bias=(True, False), trans_b=(0, 1),
                         alpha=(None, 0.5), beta=(None, 2.0), dtype=(f32, f64), opset=(9, 13))
    yield from _variants(b.build_producer_bn_model, producer=("matmul",), bias=(False,), dtype=(f32, f16, f64),
                         input_shape=(None, (2, 3, 4)))
    yield from _variants(b.build_producer_bn_model, producer=("conv", "gemm"),
                         param_source=b.PARAM_SOURCES, weight_source=("initializer", "constant_node"))
    yield from _variants(b.build_producer_bn_model, producer=("conv",), opset=(7,), spatial=(0,))
    yield from _variants(b.build_producer_bn_model, producer=("conv",), opset=(14,), training_mode=(1,),
                         bn_extra_outputs=(2,))
    yield from _variants(b.build_producer_bn_model, producer=("conv",), opset=(9,), bn_extra_outputs=(4,))
    yield from _variants(b.build_producer_bn_model, producer=("conv", "gemm"),
                         runtime_bn_params=(("bn_mean",),), producer_output_also_graph_output=(False, True),
                         producer_output_also_consumed=(False, True))
    yield from _variants(b.build_producer_bn_model, producer=("conv",), epsilon=(0.0,), opset=(13,))
    yield from _variants(b.build_producer_bn_model, producer=("gemm",), gemm_bias_shape=((1,), (1, 6)))
    yield from _variants(b.build_producer_bn_model, producer=("conv",), bn_param_dtype=(f32,), dtype=(f16,),
                         opset=(15,))
    yield from _variants(b.build_producer_add_bn_model, producer=b.ADD_PRODUCERS, constant_first=(False, True),
                         bias=(False, True))
    yield from _variants(b.build_producer_add_bn_model, producer=("conv",), add_shape=((1, 6, 1, 1), (1,),
                                                                                         (6, 5, 5), (5,)))
    yield from _variants(b.build_producer_add_bn_model, producer=("matmul",), add_shape=((1, 6), (6,)),
                         add_output_also_consumed=(False, True))
    yield from _variants(b.build_quantized_weight_bn_model, producer=b.QUANTIZED_PRODUCERS,
                         per_axis=(False, True), gamma_sign=("random", "negative"), trans_b=(0, 1),
                         zero_point=(0, None))
    yield from _variants(b.build_quantized_weight_bn_model, producer=("conv",), quantized_dtype=(np.uint8,),
                         zero_point=(128, 255), gamma_sign=("random",), quantized_range=((0, 255), (250, 255)))
    yield from _variants(b.build_quantized_weight_bn_model, producer=("conv",), quantized_bias=(True,),
                         shared=(None, "dequantize_output", "quantized", "scale"))
    yield from _variants(b.build_quantized_weight_bn_model, producer=("conv", "conv_transpose"), group=(2,),
                         per_axis=(False, True), opset=(10, 13), scale_dtype=(np.float32, np.float16))
    yield from _variants(b.build_bn_then_layer_model, layer=("conv",), before=("input", "relu"),
                         pads=(None, (1, 1, 1, 1)), group=(1, 2), bias=(True, False))
    yield from _variants(b.build_bn_then_layer_model, layer=("conv",), auto_pad=("VALID", "SAME_UPPER"),
                         kernel=(1, 3))
    yield from _variants(b.build_bn_then_layer_model, layer=("gemm",), trans_a=(0, 1), trans_b=(0, 1),
                         alpha=(None, 0.5), beta=(None, 2.0), bias=(True, False))
    yield from _variants(b.build_bn_then_layer_model, layer=("matmul",), bn_output_also_consumed=(False, True),
                         dtype=(np.float32, np.float64))
    yield from _variants(b.build_bn_after_op_model, op=("Relu", "MaxPool", "graph_input"))
    yield from _variants(b.build_shared_weight_model, share_bias=(True, False), shared_through=b.SHARING_LAYOUTS)
    yield from _variants(b.build_conv_bn_relu_chain_model, without_batchnorm=((), (1,)), biases=("alternate", "all"))
    yield from _variants(b.build_constant_of_shape_params_model, producer=b.PRODUCERS,
                         weight_from_constant_of_shape=(False, True))
    yield from _variants(b.build_subgraph_reader_model, reads=(("conv_weight", "bn_mean"), ("x_unused", "bn_var")))
    yield from _variants(b.build_qdq_conv_bn_model)
    for name in ("digits/model.onnx", "digits/model_compressed.onnx", "reference/model.onnx",
                 "reference/model_compressed.onnx"):
        yield "examples/" + name, os.path.join(ROOT, "examples", name)


def reestimate_models():
    f32, f16, f64 = np.float32, np.float16, np.float64
    yield from _variants(b.build_conv_bn_relu_chain_model, batch=(2, "N"), without_batchnorm=((), (1,)))
    yield from _variants(b.build_producer_bn_model, producer=b.PRODUCERS, bias=(False,), dtype=(f32,))
    yield from _variants(b.build_producer_bn_model, producer=("gemm",), dtype=(f64, f16))
    yield from _variants(b.build_producer_bn_model, producer=("conv",), dtype=(f16,), bn_param_dtype=(f32,),
                         opset=(15,))
    yield from _variants(b.build_producer_bn_model, producer=("conv",), opset=(7,), spatial=(0, 1))
    yield from _variants(b.build_producer_bn_model, producer=("conv",), param_source=b.PARAM_SOURCES)
    yield from _variants(b.build_constant_of_shape_params_model, producer=("conv", "matmul"))
    yield from _variants(b.build_bn_then_layer_model, layer=("gemm",))
    yield from _variants(b.build_qdq_conv_bn_model)


def _random_batches(model, *, batches: int, seed: int):
    """``batches`` seeded batches for the model's data inputs (symbolic dims: 3, the batch 4)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    specs = []
    for value in b.graph_data_inputs(model):
        dims = value.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else 3 for d in dims]
        if dims and not dims[0].HasField("dim_value"):
            shape[0] = 4
        specs.append((value.name, shape, helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)))
    out = []
    for _ in range(batches):
        feeds = {}
        for name, shape, dtype in specs:
            feeds[name] = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
        out.append(feeds)
    return out


# --- the records ----------------------------------------------------------------------------------


def record_folds(records: dict) -> None:
    for name, model in fold_models():
        result = bnpass.fold_batchnorms(model)
        records[f"fold/{name}"] = _sha(_model_bytes(result.model), result.modified, sorted(result.folded),
                                       sorted(result.skipped.items()), sorted(result.patterns.items()))


def record_reestimates(records: dict) -> None:
    for name, model in reestimate_models():
        for stats in ("pooled", "batch-mean"):
            batches = _random_batches(model, batches=3, seed=7)
            try:
                result = bnpass.reestimate_batchnorms(model, batches, stats=stats, device="cpu", batch_size=4,
                                                      num_samples=12)
            except bnpass.BnpassError as error:  # the refusal is an output too
                records[f"reestimate/{name}/{stats}"] = _sha(type(error).__name__, str(error))
                continue
            records[f"reestimate/{name}/{stats}"] = _sha(_model_bytes(result.model), _stats_bytes(result.stats),
                                                         result.samples, result.batches, sorted(result.warnings))
    for example in ("digits", "reference"):
        model = os.path.join(ROOT, "examples", example, "model_compressed.onnx")
        data = os.path.join(ROOT, "examples", example, "calib" if example == "digits" else "in-domain/calib")
        result = bnpass.reestimate_batchnorms(model, data, device="cpu", num_samples=256, batch_size=64)
        folded = bnpass.fold_batchnorms(result.model)
        records[f"reestimate/examples/{example}"] = _sha(_model_bytes(result.model), _stats_bytes(result.stats),
                                                         result.samples, sorted(result.warnings))
        records[f"reestimate-fold/examples/{example}"] = _sha(_model_bytes(folded.model))


def record_references(records: dict) -> None:
    base = os.path.join(ROOT, "examples", "reference")
    for data, candidate in itertools.product(("in-domain", "shifted"), ("auto", "matched", "reestimated")):
        result = bnpass.reestimate_batchnorms(
            os.path.join(base, "model_compressed.onnx"), os.path.join(base, data, "calib"), device="cpu",
            reference=os.path.join(base, "model.onnx"), candidate=candidate, num_samples=256, batch_size=64)
        matched = b"|".join(name.encode() + _array_bytes(m.mean) + _array_bytes(m.var) + _array_bytes(m.rule)
                            for name, m in sorted(result.matched.items()))
        moments = repr(sorted((k, [np.asarray(v).tobytes() for v in vs])
                              for k, vs in result.reference_moments.items())).encode()
        records[f"reference/{data}/{candidate}"] = _sha(_model_bytes(result.model), _stats_bytes(result.stats),
                                                        result.chosen, matched, moments, sorted(result.warnings))
    # Layer correction (no BN, quantized weights, BNs behind activation pairs) on the shipped examples.
    calib = os.path.join(base, "in-domain", "calib")
    corrected = [(os.path.join("fused", "model_pruned.onnx"), "fused", ("auto", "matched-except-logits")),
                 (os.path.join("fused", "model_pruned_int4.onnx"), "fused", ("auto",)),
                 (os.path.join("quantized", "int4_per_tensor.onnx"), "fused", ("auto",)),
                 (os.path.join("quantized", "nncf_default.onnx"), "fused", ("auto",)),
                 (os.path.join("quantized", "with_batchnorm_int4_per_tensor.onnx"), "reference", ("auto",))]
    for path, reference, candidates in corrected:
        for candidate in candidates:
            result = bnpass.reestimate_batchnorms(
                os.path.join(ROOT, "examples", path), calib, device="cpu", candidate=candidate, num_samples=256,
                reference=os.path.join(ROOT, "examples", reference, "model.onnx"), batch_size=64)
            layers = b"|".join(label.encode() + _array_bytes(c.matched.mean) + _array_bytes(c.matched.var)
                               for label, c in sorted(result.layers.items()))
            records[f"reference/{path}/{candidate}"] = _sha(
                _model_bytes(result.model), _stats_bytes(result.stats), result.chosen, result.why, layers,
                sorted(result.warnings), sorted(result.refused_layers.items()))


def record_calibration_graphs(records: dict) -> None:
    models = dict(_variants(b.build_conv_bn_relu_chain_model, batch=(2, "N")))
    models.update(_variants(b.build_producer_bn_model, producer=("gemm",), dtype=(np.float32, np.float64)))
    models.update(_variants(b.build_producer_bn_model, producer=("conv",), opset=(7, 13, 15),
                            dtype=(np.float32, np.float16)))
    models.update(_variants(b.build_producer_bn_model, producer=("conv",), opset=(7,), spatial=(0,)))
    models.update(_variants(b.build_constant_of_shape_params_model, producer=("conv",)))
    for name, model in models.items():
        for form in FORMS:
            calibration = build_calibration_model(model, form)
            records[f"calibration-graph/{name}/{form}"] = _sha(
                _model_bytes(calibration.model), calibration.fixed_batch, calibration.forms,
                [vars(tap) if hasattr(tap, "__dict__") else tap for tap in calibration.taps])
        for mode in ("observe", "matched"):
            rng = np.random.default_rng(3)
            targets = None
            if mode == "matched":
                targets = []
                for bn in batchnorm_nodes(model):
                    shape = [d for d in b.constant_value(model, bn.input[1]).shape]
                    targets.append(MatchTarget(mean=rng.standard_normal(shape),
                                               var=np.abs(rng.standard_normal(shape)) + 0.5, epsilon=0.01))
            calibration = build_calibration_model(model, "reduce", mode=mode, targets=targets)
            records[f"calibration-graph/{name}/{mode}"] = _sha(
                _model_bytes(calibration.model), calibration.fixed_batch, calibration.forms, calibration.taps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="write the fingerprints to this JSON file")
    group.add_argument("--compare", help="compare with the fingerprints in this JSON file")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the fixed-batch and data warnings are part of the records
    start = time.perf_counter()
    records: dict = {}
    record_folds(records)
    record_reestimates(records)
    record_references(records)
    record_calibration_graphs(records)
    seconds = time.perf_counter() - start
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1, sort_keys=True)
        print(f"{len(records)} fingerprints written to {args.out} ({seconds:.1f} s, bnpass from "
              f"{os.path.dirname(bnpass.__file__)})")
        return 0
    with open(args.compare) as f:
        expected = json.load(f)
    differ = sorted(k for k in expected.keys() & records.keys() if expected[k] != records[k])
    missing, new = sorted(expected.keys() - records.keys()), sorted(records.keys() - expected.keys())
    for label, names in (("differs", differ), ("missing", missing), ("new", new)):
        for name in names:
            print(f"{label}: {name}")
    print(f"{len(records)} fingerprints, {len(differ)} differ, {len(missing)} missing, {len(new)} new "
          f"({seconds:.1f} s, bnpass from {os.path.dirname(bnpass.__file__)})")
    return 1 if differ or missing or new else 0


if __name__ == "__main__":
    sys.exit(main())
