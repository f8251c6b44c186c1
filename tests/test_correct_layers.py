"""``--reference`` on layers without BN: the sequential per-layer correction, its pairing and its choice.

The independent reference is PyTorch in float64, written from the definition: layer by layer, the
compressed layer output x (every earlier layer already corrected) becomes
``(x - m_c) / sqrt(max(v_c / v_o, 1 / G^2)) + m_o`` per channel, (m_o, v_o) the uncompressed layer
output's pooled moments, G the gain bound. One batch holding every sample makes the one-pass
calibration's batch moments the pooled ones, so the two agree to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from bnpass import calibration_samples  # noqa: E402
from bnpass.cli import main  # noqa: E402
from bnpass.errors import ModelError  # noqa: E402
from bnpass.passes.correct_layers import MAX_GAIN  # noqa: E402
from bnpass.passes.match_reference import MatchReferencePass  # noqa: E402
from bnpass.runtime import create_session  # noqa: E402

SAMPLES = 64
DEAD = 2  # the output channel of the second Conv that compression all but kills


def network(seed: int = 0, *, names=("conv1", "conv2", "fc", "head")) -> dict:
    """Conv(bias) -> Relu -> Conv(no bias) -> Relu -> Flatten -> Gemm(transB) -> Relu -> MatMul -> Add: its weights."""
    rng = np.random.default_rng(seed)
    return {"names": names,
            "w1": rng.normal(0, 0.5, (4, 3, 3, 3)), "b1": rng.normal(0, 0.3, 4),
            "w2": rng.normal(0, 0.3, (5, 4, 3, 3)),
            "w3": rng.normal(0, 0.1, (8, 5 * 36)), "b3": rng.normal(0, 0.3, 8),
            "w4": rng.normal(0, 0.4, (8, 6)), "b4": rng.normal(0, 0.3, 6)}


def compressed(weights: dict, seed: int = 1) -> dict:
    """Pruned and perturbed weights, with channel DEAD of the second Conv nearly zero."""
    rng = np.random.default_rng(seed)
    result = dict(weights)
    for key in ("w1", "w2", "w3", "w4"):
        value = weights[key] * (rng.random(weights[key].shape) > 0.4)
        result[key] = value + rng.normal(0, 0.05 * np.abs(weights[key]).mean(), value.shape)
    result["w2"] = result["w2"].copy()
    result["w2"][DEAD] *= 1e-3
    return result


def build(weights: dict) -> onnx.ModelProto:
    conv1, conv2, fc, head = weights["names"]
    inits = [numpy_helper.from_array(np.asarray(weights[key], np.float32), key) for key in
             ("w1", "b1", "w2", "w3", "b3", "w4", "b4")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name=conv1, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name=conv2, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], name=fc, transB=1),
             helper.make_node("Relu", ["g"], ["r3"]),
             helper.make_node("MatMul", ["r3", "w4"], ["m"], name=head),
             helper.make_node("Add", ["m", "b4"], ["y"])]
    graph = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    return model


def layer_outputs(weights: dict, x: torch.Tensor, correct=None) -> list:
    """The four layer outputs in float64; ``correct(k, output)`` replaces layer k's output as it goes."""
    w = {key: torch.as_tensor(np.asarray(value, np.float32), dtype=torch.float64)
         for key, value in weights.items() if key != "names"}
    correct = correct or (lambda k, value: value)
    outputs = [correct(0, torch.nn.functional.conv2d(x, w["w1"], w["b1"], padding=1))]
    outputs.append(correct(1, torch.nn.functional.conv2d(outputs[0].relu(), w["w2"], padding=1)))
    outputs.append(correct(2, outputs[1].relu().flatten(1) @ w["w3"].T + w["b3"]))
    outputs.append(correct(3, outputs[2].relu() @ w["w4"] + w["b4"]))
    return outputs


def moments(value: torch.Tensor):
    axes = [0] + list(range(2, value.dim()))
    return value.mean(axes, keepdim=True), value.var(axes, unbiased=False, keepdim=True)


def corrected_reference(reference: dict, given: dict, x: np.ndarray, max_gain=MAX_GAIN) -> np.ndarray:
    """The sequential per-layer correction, layer by layer, in PyTorch float64 (module docstring)."""
    data = torch.as_tensor(x, dtype=torch.float64)
    targets = [moments(value) for value in layer_outputs(reference, data)]
    floor = 0.0 if max_gain is None else 1 / max_gain ** 2

    def correct(k, value):
        mean, var = moments(value)
        reference_mean, reference_var = targets[k]
        ratio = torch.clamp(var / reference_var, min=floor)
        return (value - mean) / ratio.sqrt() + reference_mean

    return layer_outputs(given, data, correct)[-1].numpy()


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return create_session(model, ["CPUExecutionProvider"], optimize=False).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def case():
    x = np.random.default_rng(5).normal(size=(SAMPLES, 3, 6, 6)).astype(np.float32)
    reference, given = network(), compressed(network())
    return x, reference, given, build(reference), build(given)


def correct(model, reference, x, **options):
    return MatchReferencePass(calibration_samples(model, [x]), reference, batch_size=SAMPLES, device="cpu",
                              **options)(model)


def test_corrects_every_layer_as_the_layer_by_layer_reference_does(case):
    x, reference, given, reference_model, model = case
    result = correct(model, reference_model, x, choose="matched")
    onnx.checker.check_model(result.model, full_check=True)
    expected = corrected_reference(reference, given, x)
    np.testing.assert_allclose(run(result.model, x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert set(result.layers) == {"conv1", "conv2", "fc", "head"} and result.logits == "head"
    # the output has exactly the input's nodes: only weights and biases changed (conv2 gained a bias)
    assert [(node.op_type, list(node.output)) for node in result.model.graph.node] == [
        (node.op_type, list(node.output)) for node in model.graph.node]
    assert [list(node.input) for node in result.model.graph.node][3:] == [
        list(node.input) for node in model.graph.node][3:]


def test_a_near_dead_channel_gets_at_most_the_bounded_gain(case):
    """Channel DEAD of conv2 spreads ~1e-3 of the reference's: the formula would amplify it ~1000x."""
    x, reference, given, reference_model, model = case
    result = correct(model, reference_model, x, choose="matched")
    rules = result.layers["conv2"].matched.rule
    assert rules[DEAD] == 6 and list(np.flatnonzero(rules == 6)) == [DEAD]  # MatchRule.BOUNDED
    unbounded = correct(model, reference_model, x, choose="matched", max_gain=None)
    expected = corrected_reference(reference, given, x, max_gain=1e-5 ** -0.5)  # then only BN's epsilon bounds it
    np.testing.assert_allclose(run(unbounded.model, x), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert not np.allclose(expected, corrected_reference(reference, given, x), rtol=1e-2)


def test_keeps_the_model_as_given_where_correction_hurts(case):
    """Labels that the compressed model gets all right (its own predictions): every correction moves it
    toward the reference and away from them, so the model as given is kept, unchanged. (Only the samples
    the reference gets right too: on the others it would be no better than the most common label, and
    such labels are set aside.)"""
    x, reference, given, reference_model, model = case
    labels = run(model, x).argmax(axis=1)
    judged = labels == run(reference_model, x).argmax(axis=1)
    result = MatchReferencePass(calibration_samples(model, [(x[judged], labels[judged])]), reference_model,
                                batch_size=SAMPLES, device="cpu")(model)
    assert result.chosen == "compressed" and not result.modified, result.why
    count = int(judged.sum())
    assert result.why.startswith(f"accuracy: compressed (as given) right on {count} of {count} samples")
    assert result.model.SerializeToString() == model.SerializeToString()


def test_pairs_layers_by_name_else_by_order_and_names_the_first_difference(case):
    x, reference, given, reference_model, model = case
    renamed = build({**reference, "names": ("a", "b", "c", "d")})  # other names: paired by order
    assert set(correct(model, renamed, x, choose="matched").layers) == {"conv1", "conv2", "fc", "head"}
    wrong = dict(reference)
    wrong["w3"] = np.zeros((8, 5 * 36 + 1))
    with pytest.raises(ModelError, match=r"layer #3 without BatchNormalization is Gemm 'fc' with weight \[8, 180\] in "
                                         r"the model, Gemm 'fc' with weight \[8, 181\] in the reference"):
        correct(model, build(wrong), x)
    shorter = build(reference)
    del shorter.graph.node[6:]
    shorter.graph.node[-1].output[0] = "y"
    with pytest.raises(ModelError, match=r"the model has 4 Conv/ConvTranspose/Gemm/MatMul layers without "
                                         r"BatchNormalization, the reference 3; the first without a partner is "
                                         r"MatMul 'head' in the model"):
        correct(model, shorter, x)


def test_the_fused_example_is_repaired_from_the_command_line(tmp_path, capsys):
    """README's example: a model without BN, 50% pruned; --reference corrects its 7 layers and keeps their
    nodes; without --reference the notice says it can."""
    fused = Path(__file__).resolve().parents[1] / "examples" / "fused"
    calib = fused.parent / "reference" / "in-domain" / "calib"
    assert main([str(fused / "model_pruned.onnx"), str(tmp_path / "plain.onnx"), "--data", str(calib)]) == 0
    assert "--reference ORIGINAL.onnx can repair it" in capsys.readouterr().err
    assert main([str(fused / "model_pruned.onnx"), str(tmp_path / "out.onnx"), "--data", str(calib), "--reference",
                 str(fused / "model.onnx"), "--device", "cpu", "--plot", str(tmp_path / "p.png"), "--report",
                 str(tmp_path / "r.json")]) == 0
    layers = json.loads((tmp_path / "r.json").read_text())["reference"]["layers"]
    assert len(layers) == 7 and all(sum(layer["rules"].values()) > 0 for layer in layers.values())
    captured = capsys.readouterr()
    assert "corrected 7 of 7 layers without BatchNormalization" in captured.out
    assert "kept the matched candidate" in captured.out
    assert "no plot drawn" not in captured.err and (tmp_path / "p.png").stat().st_size > 0  # the corrected layers
    given, repaired = onnx.load(fused / "model_pruned.onnx"), onnx.load(tmp_path / "out.onnx")
    assert [(n.op_type, list(n.output)) for n in repaired.graph.node] == [
        (n.op_type, list(n.output)) for n in given.graph.node]


def test_a_reference_with_bn_for_a_fused_model_says_to_fold_it_the_same_way():
    examples = Path(__file__).resolve().parents[1] / "examples"
    fused = onnx.load(examples / "fused" / "model_pruned.onnx")
    with pytest.raises(ModelError, match=r"it has 6 BatchNormalization nodes, the model 0; if the model's BNs were "
                                         r"folded .* --fold-only"):
        MatchReferencePass(calibration_samples(fused, [np.zeros((8, 1, 8, 8), np.float32)]),
                           examples / "reference" / "model.onnx")(fused)
