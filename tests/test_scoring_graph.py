"""bnpass.passes.scoring_graph: one merged model computes every scored model's outputs, bit for bit.

The reference is independent of the code under test: each model in its own onnxruntime session, with
the same options (all graph optimizations on, as candidates.score_models makes them). Outputs are
compared bit for bit (np.array_equal on the bytes), never at a tolerance: onnxruntime fuses a node
with its consumer only where that consumer is its only one, and a merge that gave a node a second
consumer would change the arithmetic (Conv + BatchNormalization unfused: up to 3e-5 on MobileNet's
logits; an int8 QuantizeLinear left unconverted to uint8: whole quantization steps).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnpass
from bnpass.passes.base import fingerprint
from bnpass.passes.scoring_graph import MergeRefused, merge_models, merge_models_with_statistics
from builders import (
    GraphBuilder,
    build_conv_bn_relu_chain_model,
    build_producer_bn_model,
    build_subgraph_reader_model,
    random_feeds,
    with_initializer_as_graph_input,
)
from scoring_models import (
    bench_network,
    compressed_copy,
    differing_outputs,
    merged_outputs,
    scored_models,
    separate_outputs,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FUSED_REFERENCE = "fused/model.onnx"
EXAMPLE_PAIRS = [  # (compressed model, its --reference), as the README pairs them
    ("reference/model_compressed.onnx", "reference/model.onnx"),
    ("digits/model_compressed.onnx", "digits/model.onnx"),
    ("fused/model_int4.onnx", FUSED_REFERENCE),
    ("fused/model_pruned.onnx", FUSED_REFERENCE),
    ("fused/model_pruned_int4.onnx", FUSED_REFERENCE),
    ("quantized/int4_per_channel.onnx", FUSED_REFERENCE),
    ("quantized/int4_per_tensor.onnx", FUSED_REFERENCE),
    ("quantized/int8_per_tensor.onnx", FUSED_REFERENCE),
    ("quantized/int8_symmetric_activations.onnx", FUSED_REFERENCE),
    ("quantized/nncf_default.onnx", FUSED_REFERENCE),
    ("quantized/nncf_bias_correction.onnx", FUSED_REFERENCE),
    ("quantized/with_batchnorm_int4_per_tensor.onnx", "reference/model.onnx"),
]


def assert_merged_exactly(models: dict, feeds: dict):
    """Merge ``models``, check the result, and compare every output bit for bit with separate sessions;
    returns the merge statistics."""
    before = {name: fingerprint(model) for name, model in models.items()}
    merged, outputs, statistics = merge_models_with_statistics(models)
    onnx.checker.check_model(merged, full_check=True)
    assert {name: fingerprint(model) for name, model in models.items()} == before, "a model was changed"
    assert list(outputs) == list(models)
    assert [len(names) for names in outputs.values()] == [len(model.graph.output) for model in models.values()]
    assert len({name for names in outputs.values() for name in names}) == sum(map(len, outputs.values()))
    expected = separate_outputs(models, feeds, threads=2)
    got = merged_outputs(merged, outputs, feeds, threads=2)
    assert differing_outputs(expected, got) == []
    return statistics


def batch_of(model: onnx.ModelProto, count: int = 16, seed: int = 0) -> np.ndarray:
    dims = [dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim][1:]
    return np.random.default_rng(seed).standard_normal((count, *dims)).astype(np.float32)


@pytest.mark.parametrize("folded", [False, True], ids=["with_batchnorm", "batchnorms_folded"])
@pytest.mark.parametrize("network", ["resnet", "mobilenet"])
def test_bench_networks_candidates_bit_identical(network, folded):
    """The bench's networks (32x32), compressed, with every candidate --reference makes for them:
    Conv + BN fusions and the Relu/ReduceMean before the logits layer, where the candidates branch."""
    pytest.importorskip("torch")
    reference = bench_network(network, 32)
    if folded:
        reference = bnpass.fold_batchnorms(reference).model
    model = compressed_copy(reference)
    data = batch_of(model, 32)
    models = scored_models(model, reference, data, batch_size=16)
    statistics = assert_merged_exactly(models, {model.graph.input[0].name: data[:16]})
    # "matched" and "matched-except-logits" differ only in the logits layer: all the rest is computed once
    assert statistics.merged_nodes < statistics.nodes - len(reference.graph.node) + 3
    assert statistics.branches == {"ReduceMean": 1}


@pytest.mark.parametrize("pair", EXAMPLE_PAIRS, ids=[model for model, _ in EXAMPLE_PAIRS])
def test_example_models_candidates_bit_identical(pair):
    """Every example with its reference, QDQ int8 and com.microsoft int4 included."""
    model, reference = (onnx.load(EXAMPLES / path) for path in pair)
    data = batch_of(model, 32)
    models = scored_models(model, reference, data, batch_size=16)
    assert_merged_exactly(models, {model.graph.input[0].name: data[:16]})


def test_models_sharing_only_the_input():
    """Two unrelated networks that use the same tensor and node names: every node copied, renamed."""
    first = build_conv_bn_relu_chain_model(blocks=3, seed=0)
    second = build_conv_bn_relu_chain_model(blocks=2, seed=1)
    statistics = assert_merged_exactly({"first": first, "second": second}, random_feeds(first))
    assert statistics.merged_nodes == statistics.nodes


def two_output_model() -> onnx.ModelProto:
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, (2, 3))
    builder.add_node("Relu", ["x"], ["r"], name="relu")
    builder.add_node("Neg", ["r"], ["y"], name="neg")
    builder.add_output("y")
    builder.add_output("r")
    return builder.build()


def test_identical_models_computed_once_with_outputs_in_order():
    """The same model twice: one copy of every node; each model's outputs, in its order, under its own names."""
    model = two_output_model()
    merged, outputs = merge_models({"a": model, "b": model})
    assert [node.op_type for node in merged.graph.node].count("Neg") == 1
    assert outputs["a"] != outputs["b"]
    statistics = assert_merged_exactly({"a": model, "b": model}, random_feeds(model))
    assert statistics.merged_nodes == len(model.graph.node)


def scaled_by_constant(name: str, value: float) -> onnx.ModelProto:
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, (2, 3))
    builder.add_node("Constant", [], [name], name=f"{name}_node",
                     value=numpy_helper.from_array(np.full((3,), value, np.float32), name))
    builder.add_node("Mul", ["x", name], ["y"], name="scale")
    builder.add_output("y")
    return builder.build()


def test_constant_nodes_shared_by_content_not_by_name():
    same = {"a": scaled_by_constant("scale_a", 1.5), "b": scaled_by_constant("scale_b", 1.5)}
    assert assert_merged_exactly(same, random_feeds(same["a"])).merged_nodes == 2
    other = {"a": scaled_by_constant("scale", 1.5), "b": scaled_by_constant("scale", 2.5)}
    assert assert_merged_exactly(other, random_feeds(other["a"])).merged_nodes == 4


def with_statistics_moved(model: onnx.ModelProto, shift: float) -> onnx.ModelProto:
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    for tensor in moved.graph.initializer:
        if tensor.name.endswith("_mean"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + shift, tensor.name))
    return moved


def test_conv_feeding_different_batchnorms_is_copied():
    """Regression (found while writing the module): a Conv shared by two models whose BNs differ had two
    consumers, so onnxruntime no longer folded either BN into it, and the outputs moved by 1e-6."""
    model = build_conv_bn_relu_chain_model(blocks=2, channels=8, spatial_size=12)
    models = {"given": model, "moved": with_statistics_moved(model, 0.25)}
    statistics = assert_merged_exactly(models, random_feeds(model))
    assert statistics.merged_nodes == statistics.nodes


def test_overridable_initializer_stays_a_graph_input():
    """An initializer also listed as a graph input may be fed at run time, so onnxruntime folds nothing
    into it; merged, it must stay an input (else the BN would be folded and the bits change)."""
    model = build_producer_bn_model("conv", in_channels=4, out_channels=8, spatial_size=12)
    for name in ("bn_mean", "bn_var"):
        model = with_initializer_as_graph_input(model, name, keep_initializer=True)
    models = {"given": model, "moved": with_statistics_moved(model, 0.5)}
    merged, _ = merge_models(models)
    listed = {value.name for value in merged.graph.input}
    # the variances are the same in both, the means are not: three, each still an input
    assert sum(1 for tensor in merged.graph.initializer if tensor.name in listed) == 3
    assert_merged_exactly(models, {"x": random_feeds(model)["x"]})


def random_model() -> onnx.ModelProto:
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, (2, 3))
    builder.add_node("RandomNormalLike", ["x"], ["noise"], name="noise")
    builder.add_node("Add", ["x", "noise"], ["y"], name="add")
    builder.add_output("y")
    return builder.build()


def test_random_nodes_never_shared():
    model = random_model()
    _, _, statistics = merge_models_with_statistics({"a": model, "b": model})
    assert statistics.merged_nodes == statistics.nodes


def with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.opset_import[0].version = version
    return changed


def with_external_tensor(model: onnx.ModelProto) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    tensor = changed.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")
    return changed


def with_other_input_size(model: onnx.ModelProto) -> onnx.ModelProto:
    return build_conv_bn_relu_chain_model(spatial_size=7)


def out_of_order(model: onnx.ModelProto) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    nodes = list(changed.graph.node)
    del changed.graph.node[:]
    changed.graph.node.extend(reversed(nodes))
    return changed


@pytest.mark.parametrize("change, words", [
    (lambda model: with_opset(model, 14), "imports the default domain version 14"),
    (with_external_tensor, "stored outside the model"),
    (with_other_input_size, "other inputs"),
    (out_of_order, "not in topological order"),
], ids=["opset", "external_data", "inputs", "order"])
def test_refused_with_reason(change, words):
    model = build_conv_bn_relu_chain_model()
    with pytest.raises(MergeRefused, match=words):
        merge_models({"given": model, "other": change(model)})


def test_subgraphs_refused():
    model = build_subgraph_reader_model()
    with pytest.raises(MergeRefused, match="holds a subgraph"):
        merge_models({"a": model, "b": model})


def test_functions_refused():
    model = build_conv_bn_relu_chain_model()
    with_function = onnx.ModelProto()
    with_function.CopyFrom(model)
    with_function.functions.add().CopyFrom(helper.make_function("local", "Twice", ["a"], ["b"], [
        helper.make_node("Add", ["a", "a"], ["b"])], [helper.make_opsetid("", 13)]))
    with pytest.raises(MergeRefused, match="local functions"):
        merge_models({"a": model, "b": with_function})


def relu_then(op_type: str) -> onnx.ModelProto:
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, (2, 3))
    builder.add_node("Relu", ["x"], ["r"], name="relu")
    builder.add_node(op_type, ["r"], ["y"], name="after")
    builder.add_output("y")
    return builder.build()


def test_copies_onnxruntime_would_merge_back_refused():
    """Relu(x) used differently by two models must be copied, but onnxruntime's own subexpression
    elimination would merge the two copies again (they read the same tensor): refused, with why."""
    with pytest.raises(MergeRefused, match="onnxruntime would compute it once"):
        merge_models({"a": relu_then("Neg"), "b": relu_then("Exp")})


def test_scoring_runs_one_merged_session_and_a_refused_merge_scores_the_same(monkeypatch):
    """score_models scores in one merged session on the CPU; where the merge is refused, or onnxruntime refuses to
    load the merged model, it runs one session per model, and every count and figure is the same (the merged
    outputs are bit for bit the separate ones)."""
    from bnpass.data import LABELS
    from bnpass.passes import candidates, scoring_graph

    model, reference = (onnx.load(EXAMPLES / "reference" / name) for name in ("model_compressed.onnx", "model.onnx"))
    test = np.load(EXAMPLES / "reference" / "in-domain" / "test.npz")
    data, labels = test["images"][:96].astype(np.float32), test["labels"][:96]
    models = scored_models(model, reference, data, batch_size=32)
    reference, given = models.pop("reference"), models.pop("compressed")
    feeds = [{model.graph.input[0].name: data[i:i + 32], LABELS: labels[i:i + 32]} for i in (0, 32, 64)]
    runners = []
    made = candidates.ScoringSessions.__init__

    def recorded(self, *args, **kwargs):
        made(self, *args, **kwargs)
        runners.append(type(self.runner).__name__)

    monkeypatch.setattr(candidates.ScoringSessions, "__init__", recorded)
    merged = candidates.score_models(reference, given, models, feeds, ["CPUExecutionProvider"])

    def refuse(models):
        raise scoring_graph.MergeRefused("refused for the test")

    monkeypatch.setattr(candidates, "merge_models", refuse)
    separate = candidates.score_models(reference, given, models, feeds, ["CPUExecutionProvider"])

    def unloadable(models):  # a merge onnxruntime refuses to load: also scored one session per model
        merged, names = scoring_graph.merge_models(models)
        merged.graph.node.append(helper.make_node("NoSuchOperator", [merged.graph.input[0].name], ["unused"]))
        return merged, names

    monkeypatch.setattr(candidates, "merge_models", unloadable)
    refused = candidates.score_models(reference, given, models, feeds, ["CPUExecutionProvider"])
    assert runners == ["BatchRunner", "_EachRunner", "_EachRunner"]
    for other in (separate, refused):
        assert merged.samples == other.samples == 96 and merged.labelled and merged.discordant == other.discordant
        for name in merged.agreement:
            assert vars(merged.agreement[name].outputs[next(iter(merged.agreement[name].outputs))]) == vars(
                other.agreement[name].outputs[next(iter(other.agreement[name].outputs))])
        assert {name: vars(meter) for name, meter in merged.accuracy.items()} == {
            name: vars(meter) for name, meter in other.accuracy.items()}
