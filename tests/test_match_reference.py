"""``--reference`` (bnpass/passes/match_reference.py) against an independent reference: the PyTorch
implementations of level-by-level and one-pass matching in tests/matching_reference.py, on a network
with BNs at four depths and a residual branch, pruned and quantized. Then correspondence, the choice
between the candidates, and the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import bnpass  # noqa: E402
from bnpass.cli import main  # noqa: E402
from bnpass.errors import ModelError  # noqa: E402
from bnpass.passes.match_reference import MatchReferencePass, pair_batchnorms  # noqa: E402
from bnpass.report import batchnorm_drifts, drift_title  # noqa: E402
from bnpass.stats import drift  # noqa: E402
from builders import (  # noqa: E402
    GraphBuilder,
    add_batchnorm,
    export_with_batchnorm_kept,
    random_bn_params,
    random_weight,
    upcast_model_to_float32,
)
from matching_reference import (  # noqa: E402
    ResidualNet,
    batchnorms,
    fake_quantize,
    magnitude_prune,
    make_network,
    match_level_by_level,
    match_one_pass,
)
from test_cli import run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "reference"


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(11)
    offsets = rng.uniform(-1, 1, size=(1, 3, 1, 1))
    return (rng.standard_normal((128, 3, 8, 8)) * 1.5 + offsets).astype(np.float32)


@pytest.fixture(scope="module")
def network():
    return make_network(seed=0)


def onnx_statistics(result, model: onnx.ModelProto) -> dict:
    """``{torch module name: (mean, var)}`` of ``result.matched``: the exported BN's running-mean input
    is named ``<module>.running_mean``."""
    module_of = {node.name: node.input[3].rsplit(".", 1)[0] for node in model.graph.node
                 if node.op_type == "BatchNormalization"}
    return {module_of[label]: (matched.mean, matched.var) for label, matched in result.matched.items()}


def torch_statistics(model) -> dict:
    return {name: (bn.running_mean.double().numpy(), bn.running_var.double().numpy())
            for name, bn in batchnorms(model).items()}


def assert_statistics_close(got: dict, expected: dict, *, rtol: float):
    assert sorted(got) == sorted(expected)
    for name, (mean, var) in expected.items():
        scale = np.sqrt(var).max()
        np.testing.assert_allclose(got[name][0], mean, rtol=0, atol=rtol * scale, err_msg=f"{name} mean")
        np.testing.assert_allclose(got[name][1], var, rtol=rtol, atol=rtol * var.max(), err_msg=f"{name} var")


@pytest.mark.parametrize("compression", ["prune70", "int4"])
def test_one_batch_equals_level_by_level_matching_in_pytorch(network, data, compression):
    """With one batch holding every sample, batch moments are pooled moments: the one-pass graph must
    give what matching depth by depth gives (float32 graph against float64 PyTorch)."""
    compressed = magnitude_prune(network, 0.7) if compression == "prune70" else fake_quantize(network, bits=4)
    expected, _ = match_level_by_level(network, compressed, torch.from_numpy(data), ResidualNet.batchnorm_levels())
    model = export_with_batchnorm_kept(compressed, torch.from_numpy(data[:2]))
    result = bnpass.reestimate_batchnorms(model, [data], batch_size=len(data), num_samples=len(data),
                                          reference=export_with_batchnorm_kept(network, torch.from_numpy(data[:2])),
                                          candidate="matched")
    assert result.batches == 1
    assert_statistics_close(onnx_statistics(result, model), torch_statistics(expected), rtol=2e-5)


def test_several_batches_equal_one_pass_matching_in_pytorch(network, data):
    """Each BN normalizes with statistics matched on its batch: the product against PyTorch's one-pass
    form over the same batches, every one of them."""
    compressed = magnitude_prune(network, 0.7)
    batches = [data[start:start + 16] for start in range(0, len(data), 16)]
    expected = match_one_pass(network, compressed, [torch.from_numpy(b) for b in batches])
    model = export_with_batchnorm_kept(compressed, torch.from_numpy(data[:2]))
    result = bnpass.reestimate_batchnorms(model, [data], batch_size=16, num_samples=len(data),
                                          reference=export_with_batchnorm_kept(network, torch.from_numpy(data[:2])),
                                          candidate="matched")
    assert (result.batches, result.samples, result.scores.samples) == (8, 128, 0)  # forced: not compared
    assert_statistics_close(onnx_statistics(result, model), torch_statistics(expected), rtol=2e-5)
    assert not np.allclose(onnx_statistics(result, model)["bn4"][1],
                           torch_statistics(match_level_by_level(network, compressed, torch.from_numpy(data[:96]),
                                                                 ResidualNet.batchnorm_levels())[0])["bn4"][1],
                           rtol=1e-3)  # below the first level, batches change the result


def float16_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every float32 initializer, input and output in float16 (the exports here have no
    Constant or Cast node)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor).astype(np.float16),
                                                         tensor.name))
    for value in [*copy.graph.input, *copy.graph.output]:
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    return copy


def test_a_float16_model_matches_as_its_float32_twin_does(network, data):
    """Regression (issue 22, item 3): in a float16 model's matched calibration copy, the Cast feeding each BN
    read the plain batch moments instead of the matched ones, so every BN below the first normalized with
    re-estimated statistics (up to 13x off in variance here). The same network in float32 (every fp16
    tensor upcast exactly) must give the same matched statistics, to float16 precision."""
    sample = torch.from_numpy(data[:2])
    reference = float16_copy(export_with_batchnorm_kept(network, sample))
    model = float16_copy(export_with_batchnorm_kept(magnitude_prune(network, 0.7), sample))
    options = dict(batch_size=32, num_samples=len(data), candidate="matched", device="cpu")
    half = bnpass.reestimate_batchnorms(model, [data], reference=reference, **options)
    single = bnpass.reestimate_batchnorms(upcast_model_to_float32(model), [data],
                                          reference=upcast_model_to_float32(reference), **options)
    assert half.batches == 4 and list(half.matched) == list(single.matched)
    for name, expected in single.matched.items():
        got = half.matched[name]
        np.testing.assert_allclose(got.mean, expected.mean, rtol=0, atol=1e-3 * np.sqrt(expected.var).max(),
                                   err_msg=name)
        np.testing.assert_allclose(got.var, expected.var, rtol=2e-3, atol=1e-3 * expected.var.max(), err_msg=name)
    onnx.checker.check_model(half.model, full_check=True)


def test_a_model_matched_against_itself_keeps_its_statistics(network, data):
    model = export_with_batchnorm_kept(network, torch.from_numpy(data[:2]))
    # The pass itself: the API refuses a reference with the model's own weights (a user's mistake).
    result = MatchReferencePass(bnpass.calibration_samples(model, [data]), model, batch_size=32,
                                choose="matched")(model)
    assert_statistics_close(onnx_statistics(result, model), torch_statistics(network), rtol=1e-5)
    assert all(set(matched.rule_counts()) == {"matched"} for matched in result.matched.values())


def test_the_choice_follows_agreement_on_every_sample_or_is_forced():
    """The shipped showcase: deployed on digits 0-4 only, the 70%-pruned model is best matched; both
    candidates come from every sample, the re-estimated one exactly as a plain run's."""
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    data = EXAMPLE / "classes-0-4" / "calib"
    auto = bnpass.reestimate_batchnorms(model, data, batch_size=64, reference=EXAMPLE / "model.onnx")
    assert auto.chosen == "matched" and auto.why.startswith("top-1 agreement")
    assert auto.agreement["matched"].top1 > auto.agreement["reestimated"].top1 > auto.agreement["compressed"].top1
    assert auto.batches == 6 and auto.samples == auto.scores.samples == 384
    # --plot draws what was kept: the matched statistics, and the BN inputs with upstream BNs matched.
    assert drift_title(auto).endswith("the matched candidate, kept (top-1 agreement)")
    drifts, name = batchnorm_drifts(model, auto), list(auto.stats)[-1]  # the last BN: every BN upstream
    epsilon = next(node for node in model.graph.node if node.name == name).attribute[0].f
    stored = auto.stats[name]
    for got, expected in zip((drifts[-1].mean_shift, drifts[-1].reference_mean_shift), (
            drift(auto.matched[name].mean, auto.matched[name].var, stored.old_mean, stored.old_var, epsilon)[0],
            drift(*auto.compressed_moments[name], *auto.reference_moments[name], epsilon)[0])):
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    forced = bnpass.reestimate_batchnorms(model, data, batch_size=64, reference=EXAMPLE / "model.onnx",
                                          candidate="reestimated")
    plain = bnpass.reestimate_batchnorms(model, data, batch_size=64)
    assert forced.chosen == "reestimated" and forced.why == "asked for"
    for name, stats in forced.stats.items():
        np.testing.assert_allclose(stats.var, plain.stats[name].var, rtol=1e-6)
        np.testing.assert_allclose(auto.stats[name].var, auto.matched[name].var, rtol=0)


def test_a_reference_seeing_another_domain_gets_a_warning():
    """Shifted images: the uncompressed model is poor on them itself, and says so at its first BN."""
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    shifted = bnpass.reestimate_batchnorms(model, EXAMPLE / "shifted" / "calib", batch_size=64,
                                           reference=EXAMPLE / "model.onnx")
    assert any("agreement with it may favour the wrong candidate" in w for w in shifted.warnings)
    same = bnpass.reestimate_batchnorms(model, EXAMPLE / "in-domain" / "calib", batch_size=64,
                                        reference=EXAMPLE / "model.onnx")
    assert not any("favour the wrong candidate" in w for w in same.warnings)


def conv_bn_model(*, channels=4, epsilon=1e-5, names=("bn_a", "bn_b"), inputs=(("x", 3),), quantized=False):
    """x -> Conv -> BN -> Relu -> Conv -> BN -> y, with seeded weights (the same for every variant)."""
    rng = np.random.default_rng(0)
    builder = GraphBuilder(opset=13)
    for name, width in inputs:
        builder.add_input(name, np.float32, ["N", width, 6, 6])
    weight = random_weight((channels, 3, 3, 3), rng)
    if quantized:  # per-channel int8 weights, as onnxruntime's quantizer writes them
        scale = (np.abs(weight).reshape(channels, -1).max(axis=1) / 127).astype(np.float32)
        builder.add_initializer("w1_quantized", np.round(weight / scale[:, None, None, None]).astype(np.int8))
        builder.add_initializer("w1_scale", scale)
        builder.add_node("DequantizeLinear", ["w1_quantized", "w1_scale"], ["w1"], name="dequantize", axis=0)
    else:
        builder.add_initializer("w1", weight)
    builder.add_node("Conv", [inputs[0][0], "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])
    params = random_bn_params((channels,), rng)
    add_batchnorm(builder, "c1", params, output="b1", name=names[0], epsilon=epsilon)
    builder.add_node("Relu", ["b1"], ["r1"], name="relu")
    builder.add_initializer("w2", random_weight((channels, channels, 1, 1), rng))
    builder.add_node("Conv", ["r1", "w2"], ["c2"], name="conv2")
    add_batchnorm(builder, "c2", random_bn_params((channels,), rng), output="y", name=names[1])
    builder.add_output("y")
    return builder.build()


@pytest.mark.parametrize("reference, words", [
    (lambda: conv_bn_model(channels=5), "BatchNormalization #1 ('bn_a' / 'bn_a') has 4 channels in the model, 5 "
                                        "in the reference"),
    (lambda: conv_bn_model(epsilon=1e-3), "has epsilon 1e-05 in the model, 0.001 in the reference"),
    (lambda: conv_bn_model(inputs=(("z", 3),)), "the model's input 'x' float32[?, 3, 6, 6] is 'z' float32"),
    (lambda: ResidualNet and export_with_batchnorm_kept(make_network(), torch.zeros(2, 3, 8, 8)),
     "it has 5 BatchNormalization nodes, the model 2"),
])
def test_a_reference_that_does_not_correspond_is_named(reference, words):
    with pytest.raises(ModelError, match="the reference does not correspond to the model: .*" + words.replace(
            "(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("?", r"\?")):
        pair_batchnorms(conv_bn_model(), reference())


def test_bns_pair_by_name_and_else_by_order():
    model = conv_bn_model()
    swapped = conv_bn_model(names=("bn_b", "bn_a"))  # same names, other order: paired by name
    assert pair_batchnorms(model, swapped) == [(0, 1), (1, 0)]
    renamed = conv_bn_model(names=("first", "second"))
    assert pair_batchnorms(model, renamed) == [(0, 0), (1, 1)]


def test_a_qdq_quantized_model_matches_its_float_original():
    data = np.random.default_rng(3).standard_normal((64, 3, 6, 6)).astype(np.float32)
    model = conv_bn_model(quantized=True)
    result = bnpass.reestimate_batchnorms(model, [data], batch_size=16, reference=conv_bn_model())
    assert set(result.matched) == {"bn_a", "bn_b"} and result.scores.samples == 64
    folded = bnpass.fold_batchnorms(result.model)
    assert folded.folded and not folded.skipped


def test_cli_reference_report_plot_and_provenance(tmp_path):
    pytest.importorskip("matplotlib")  # --plot needs bnpass[plot]
    done = run_cli(EXAMPLE / "model_compressed.onnx", "out.onnx", "--data", EXAMPLE / "classes-0-4" / "calib",
                   "--reference", EXAMPLE / "model.onnx", "--batch-size", "64", "--report", "report.json",
                   "--plot", "drift.png", "--verify", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # the Gemm logits layer has no BN: it is corrected too, and the candidate without that correction competes
    assert ("kept the matched statistics: top-1 agreement: matched agrees with the reference on 359 of 384 samples, "
            "matched except the logits layer on 354; they differ on 7, 6 to 1, within chance (McNemar p = 0.12)"
            ) in done.stdout
    assert "agreement with reference (384 samples): 33.6% -> 93.5% top-1" in done.stdout
    # what was written (matched statistics), and the time of each reading (issue 22, item 13)
    assert re.search(r"^matched 6 of 6 BatchNormalization nodes to the reference, from 384 samples \(6 batches of up "
                     r"to 64, pooled statistics, \w+, ([\d.]+) s: ([\d.]+) s calibrating, ([\d.]+) s comparing the "
                     r"models on a second reading\)$", done.stdout, re.MULTILINE), done.stdout
    assert "re-estimated 6 of 6" not in done.stdout
    assert ("top-1 agreement with the reference on all 384 samples: compressed (as given) 33.6%, re-estimated 81.5%, "
            "matched 93.5%, matched except the logits layer 92.2%") in done.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reference"]["chosen"] == "matched" and report["reference"]["samples"] == 384
    assert {key: report["reference"]["differ"][key] for key in ("matched not reestimated", "reestimated not matched")
            } == {"matched not reestimated": 49, "reestimated not matched": 3}
    assert set(report["reference"]["agreement"]) == {"compressed", "reestimated", "matched", "matched-except-logits"}
    assert all("matched_shift" in record and record["matched"]["rules"] for record in report["batchnorms"])
    assert report["verify"]["max_rel"] < 1e-5
    written = onnx.load(tmp_path / "out.onnx")
    props = {p.key: p.value for p in written.metadata_props}
    assert props["bnpass.reference"] == "model.onnx" and props["bnpass.candidate"] == "matched"
    from PIL import Image

    with Image.open(tmp_path / "drift.png") as image:
        assert image.size == (1600, 900) and np.asarray(image.convert("L")).std() > 10


@pytest.mark.parametrize("arguments, words", [
    (["--fold-only", "--reference", "ref.onnx"], "--reference needs re-estimated statistics"),
    (["--data", "calib", "--candidate", "matched"],
     "--candidate matched chooses between the candidates of --reference"),
    (["--data", "calib", "--reference", "ref.onnx", "--report", "ref.onnx"],
     "--report 'ref.onnx' is the --reference model"),
    (["--fold-only", "--plot", "p.png"], "--plot draws re-estimated statistics"),
])
def test_cli_reference_mistakes_are_one_line_errors(tmp_path, arguments, words):
    onnx.save(conv_bn_model(), tmp_path / "model.onnx")
    onnx.save(conv_bn_model(), tmp_path / "ref.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", np.zeros((8, 3, 6, 6), np.float32))
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    done = run_cli("model.onnx", "out.onnx", *arguments, cwd=tmp_path)
    usage = "--report" not in arguments  # options that do not go together: a bad command line
    assert done.returncode == (2 if usage else 1), done.stderr
    assert done.stderr.strip().splitlines()[-2 if usage else -1].startswith("error: ")
    assert words in done.stderr and "Traceback" not in done.stderr
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_reference_with_a_fixed_batch_model_and_the_cli_main(tmp_path, network, data):
    """A legacy export with its batch fixed at 1: calibration frees it (the short last batch is used,
    as for a free batch), the comparison runs the models as they are, one sample at a time."""
    compressed = magnitude_prune(network, 0.5)
    for name, source in (("model.onnx", compressed), ("ref.onnx", network)):
        exported = export_with_batchnorm_kept(source, torch.from_numpy(data[:1]))
        for value in list(exported.graph.input) + list(exported.graph.output):
            value.type.tensor_type.shape.dim[0].Clear()
            value.type.tensor_type.shape.dim[0].dim_value = 1
        onnx.save(exported, tmp_path / name)
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", data[:120])  # 7 batches of 16 and one of 8
    assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--data", str(tmp_path / "calib"),
                 "--reference", str(tmp_path / "ref.onnx"), "--batch-size", "16", "--report",
                 str(tmp_path / "r.json"), "-q"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["batch_size"] == 16 and report["samples"] == 120
    assert report["reference"]["samples"] == 120  # every sample compared, the short last batch's too


def test_reference_with_a_loader_batch_mean_statistics_and_external_data(tmp_path, network, data):
    """The options the rest of bnpass has work with --reference: a loader, --stats batch-mean, models
    (and a reference) stored with external data."""
    compressed = magnitude_prune(network, 0.5)
    for name, source in (("model.onnx", compressed), ("ref.onnx", network)):
        onnx.save(export_with_batchnorm_kept(source, torch.from_numpy(data[:2])), tmp_path / name,
                  save_as_external_data=True, location=f"{name}.weights", size_threshold=0)
    np.save(tmp_path / "data.npy", data)
    (tmp_path / "loader.py").write_text(
        "import numpy as np, os\n"
        "def batches():\n"
        "    data = np.load(os.path.join(os.path.dirname(__file__), 'data.npy'))\n"
        "    return [(data[i:i + 32], None) for i in range(0, len(data), 32)]\n")
    assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--loader",
                 f"{tmp_path / 'loader.py'}:batches", "--reference", str(tmp_path / "ref.onnx"), "--stats",
                 "batch-mean", "--candidate", "matched", "--report", str(tmp_path / "r.json"), "-q"]) == 0
    assert (tmp_path / "out.onnx.data").exists()  # written the way it was read
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["stats"] == "batch-mean" and report["batches"] == 4 and report["reference"]["chosen"] == "matched"


def test_a_multi_input_model_matches_its_reference():
    model = conv_bn_model(inputs=(("x", 3), ("z", 3)))
    rng = np.random.default_rng(5)
    batches = [{"x": rng.standard_normal((16, 3, 6, 6)).astype(np.float32),
                "z": rng.standard_normal((16, 3, 6, 6)).astype(np.float32)} for _ in range(4)]
    result = MatchReferencePass(bnpass.calibration_samples(model, batches), model, batch_size=16)(model)
    assert result.batches == 4 and result.scores.samples == 64
    assert all(matched.rule_counts() == {"matched": 4} for matched in result.matched.values())


def test_the_choice_rests_on_every_sample_whatever_the_batch_order():
    """In-domain the candidates are close, so a choice made on a few batches follows whichever batches
    come last; made on every sample, the order of the batches changes neither the counts nor the choice."""
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    folder = EXAMPLE / "in-domain" / "calib"
    batches = [np.load(path) for path in sorted(folder.iterdir())]
    runs = [bnpass.reestimate_batchnorms(model, order, batch_size=64, reference=EXAMPLE / "model.onnx")
            for order in (batches, batches[::-1])]
    for run in runs:
        assert run.scores.samples == run.samples == sum(len(batch) for batch in batches)
    assert runs[0].chosen == runs[1].chosen
    assert runs[0].scores.discordant == runs[1].scores.discordant
    assert [run.scores.hits(name) for run in runs for name in ("matched", "reestimated")] == [
        runs[0].scores.hits("matched"), runs[0].scores.hits("reestimated")] * 2


def shifted_labelled():
    """Shifted images with their labels: the first 256 of the example's labelled test split."""
    with np.load(EXAMPLE / "shifted" / "test.npz") as archive:
        images, labels = archive["images"][:256], archive["labels"][:256]
    return [(images[start:start + 64], labels[start:start + 64]) for start in range(0, 256, 64)]


def test_labels_decide_where_agreement_with_a_poor_reference_misleads():
    """On shifted images the uncompressed model is itself poor: agreement with it keeps the matched
    candidate, accuracy on the labels keeps the re-estimated one (as the held-out test split measures)."""
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    labelled = shifted_labelled()
    unlabelled = [images for images, _ in labelled]
    by_agreement = bnpass.reestimate_batchnorms(model, unlabelled, batch_size=64, reference=EXAMPLE / "model.onnx")
    by_labels = bnpass.reestimate_batchnorms(model, labelled, batch_size=64, reference=EXAMPLE / "model.onnx")
    assert by_agreement.chosen == "matched" and not by_agreement.scores.labelled
    assert by_labels.chosen == "reestimated" and by_labels.choice.criterion == "accuracy"
    accuracy = {name: meter.accuracy for name, meter in by_labels.scores.accuracy.items()}
    assert set(accuracy) == {"reference", "compressed", "reestimated", "matched", "matched-except-logits"}
    assert accuracy["reestimated"] > accuracy["matched"] + 0.2 and accuracy["compressed"] < 0.2
    assert by_labels.why.startswith("accuracy: re-estimated right on")
    assert not any("favour the wrong candidate" in warning for warning in by_labels.warnings)


def test_labels_are_checked_against_the_classes_of_the_output():
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    labelled = shifted_labelled()
    labelled[2] = (labelled[2][0], np.full(64, 10))  # ten classes: 0..9
    with pytest.raises(bnpass.DataError, match=r"batch 2: label 10 is outside the model's classes \(0\.\.9\)"):
        bnpass.reestimate_batchnorms(model, labelled, batch_size=64, reference=EXAMPLE / "model.onnx")


def test_a_one_shot_iterator_is_refused_before_anything_runs():
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    with pytest.raises(bnpass.DataError, match="--reference reads the calibration data twice"):
        bnpass.reestimate_batchnorms(model, iter(shifted_labelled()), batch_size=64,
                                     reference=EXAMPLE / "model.onnx")


def test_labels_for_a_model_without_class_scores_are_set_aside_with_a_warning(caplog):
    """(inputs, labels) from a DataLoader of a model whose output is a feature map: compared with the
    reference instead, said once."""
    rng = np.random.default_rng(4)
    batches = [(rng.standard_normal((16, 3, 6, 6)).astype(np.float32), np.arange(16) % 3) for _ in range(3)]
    model, reference = conv_bn_model(quantized=True), conv_bn_model()
    result = bnpass.reestimate_batchnorms(model, batches, batch_size=16, reference=reference)
    assert not result.scores.labelled and result.choice.criterion == "output error"
    assert sum("the data carry labels, but the model has no classifier-shaped output" in record.message
               for record in caplog.records) == 1


def test_a_reader_that_cannot_rewind_is_refused_before_anything_runs():
    class Reader:  # onnxruntime's CalibrationDataReader interface, duck-typed, without rewind()
        def __init__(self):
            self.batches = iter([np.zeros((16, 3, 6, 6), np.float32)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"x": batch}

    with pytest.raises(bnpass.DataError, match="--reference reads the calibration data twice"):
        bnpass.reestimate_batchnorms(conv_bn_model(quantized=True), Reader(), batch_size=16,
                                     reference=conv_bn_model())


def test_a_forced_candidate_the_model_does_not_have_is_named_up_front():
    """Every layer of conv_bn_model has its BN: no layer is corrected, so neither the model as given nor the
    logits variant competes."""
    data = np.random.default_rng(3).standard_normal((16, 3, 6, 6)).astype(np.float32)
    with pytest.raises(ModelError, match="--candidate compressed: not a candidate for this model "
                                         r"\(its candidates: reestimated, matched\)"):
        MatchReferencePass(bnpass.calibration_samples(conv_bn_model(quantized=True), [data]), conv_bn_model(),
                           choose="compressed")(conv_bn_model(quantized=True))


def test_the_batchnorm_inserted_after_a_layer_is_the_identity():
    """Regression (issue 22, planted): the BN inserted after each layer without BN stores var = 1 - e, so
    that sqrt(var + e) = 1 and it computes y = x; var = 1 scaled every layer by 1/sqrt(1 + e), and the
    correction then matched each layer to that scaled copy of the reference's."""
    from bnpass.passes.correct_layers import LayerSite, insert_identity_batchnorms, layers_without_batchnorm
    from test_correct_layers import build, network, run

    model = build(network())
    augmented = insert_identity_batchnorms(model, layers_without_batchnorm(model)).model
    assert all(isinstance(site, LayerSite) for site in insert_identity_batchnorms(
        model, layers_without_batchnorm(model)).sites)
    onnx.checker.check_model(augmented, full_check=True)
    x = np.random.default_rng(2).normal(size=(16, 3, 6, 6)).astype(np.float32)
    expected, got = run(model, x), run(augmented, x)
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()


class CountedReads:
    """A re-readable batch source that counts how often it is read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def test_a_forced_candidate_reads_the_data_once_and_warns_of_no_choice():
    """Regression (issue 22, items 10 and 14): a forced --candidate ran the whole scoring reading, and on
    shifted data still warned that agreement "may favour the wrong candidate", though nothing was chosen."""
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    batches = [images for images, _ in shifted_labelled()]
    auto, forced = CountedReads(batches), CountedReads(batches)
    chose = bnpass.reestimate_batchnorms(model, auto, batch_size=64, reference=EXAMPLE / "model.onnx")
    asked = bnpass.reestimate_batchnorms(model, forced, batch_size=64, reference=EXAMPLE / "model.onnx",
                                         candidate="reestimated")
    assert auto.reads == forced.reads + 1 and chose.scores.samples == 256 and asked.scores.samples == 0
    assert any("favour the wrong candidate" in warning for warning in chose.warnings)
    assert not any("favour the wrong candidate" in warning for warning in asked.warnings)
    assert asked.chosen == "reestimated" and asked.comparing_seconds == 0 < chose.comparing_seconds
    assert asked.agreement_line() == ""


def test_placeholder_labels_are_set_aside_and_the_choice_made_as_without_them(caplog):
    """Regression (issue 22, item 2): (images, zeros), as an unlabelled DataLoader yields, made --reference
    choose by accuracy on the zeros and silenced the domain warning; the uncompressed model is right on no
    more of them than the most common label's share (all of them), so they are no labels."""
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    zeros = [(images, np.zeros(len(images), np.int64)) for images, _ in shifted_labelled()]
    result = bnpass.reestimate_batchnorms(model, zeros, batch_size=64, reference=EXAMPLE / "model.onnx")
    assert not result.scores.labelled and result.choice.criterion == "top-1 agreement"
    assert result.scores.labels_set_aside.startswith("the labels are set aside: the uncompressed model is right on ")
    assert "no better than the share of the most common label (0: 100.0%)" in result.scores.labels_set_aside
    assert result.scores.labels_set_aside in result.warnings
    assert any("favour the wrong candidate" in warning for warning in result.warnings)  # the domain warning again
    assert sum("the labels are set aside" in record.message for record in caplog.records) == 1


def test_plain_reestimation_with_labels_keeps_the_better_model():
    """Issue 22, item 4: the uncompressed example model re-estimated on digits 0-4 only loses a sample on
    their labels, so the model as given is kept, with the choice line; without labels nothing changes."""
    loader = EXAMPLE / "labelled.py"
    namespace: dict = {"__file__": str(loader)}
    exec(compile(loader.read_text(), str(loader), "exec"), namespace)
    labelled = namespace["classes_0_4"]()
    model = onnx.load(EXAMPLE / "model.onnx")
    kept = bnpass.reestimate_batchnorms(model, labelled, batch_size=64, device="cpu")
    assert kept.chosen == "compressed" and not kept.modified
    assert kept.why == ("accuracy: compressed (as given) right on 125 of 126 samples, re-estimated on 124; they "
                        "differ on 1, 1 to 0, within chance (McNemar p = 1)")
    assert kept.model.SerializeToString() == model.SerializeToString()
    assert {name: meter.correct for name, meter in kept.scores.accuracy.items()} == {"compressed": 125,
                                                                                      "reestimated": 124}
    assert all(not stats.written for stats in kept.stats.values()) and kept.comparing_seconds > 0
    unlabelled = bnpass.reestimate_batchnorms(model, [images for images, _ in labelled], batch_size=64, device="cpu")
    assert unlabelled.choice is None and unlabelled.scores is None and unlabelled.modified
    assert unlabelled.comparing_seconds == 0


def with_outputs(model: onnx.ModelProto, names: list) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    return copy


def test_a_model_without_batchnorm_plots_its_layer_outputs_against_the_reference(tmp_path):
    """Issue 22, item 9: --plot with --reference on a model without BN ran the whole job, then said there
    was nothing to draw. It draws the corrected layers' output moments against the uncompressed model's,
    before and after the correction; "after" is measured here on the kept model itself, by onnxruntime."""
    pytest.importorskip("matplotlib")
    from bnpass.report import layer_drifts
    from test_correct_layers import SAMPLES, build, compressed, network, run

    x = np.random.default_rng(5).normal(size=(SAMPLES, 3, 6, 6)).astype(np.float32)
    model, reference = build(compressed(network())), build(network())
    result = MatchReferencePass(bnpass.calibration_samples(model, [x]), reference, batch_size=SAMPLES, device="cpu",
                                choose="matched")(model)
    drifts = layer_drifts(result)
    points = ["c1", "c2", "g", "y"]  # each layer's output (the MatMul's: its bias Add's)
    assert [drift.label for drift in drifts] == ["conv1", "conv2", "fc", "head"]
    kept = create_session_outputs(with_outputs(result.model, points), x)
    expected = create_session_outputs(with_outputs(reference, points), x)
    for drift_of_layer, got, want in zip(drifts, kept, expected):
        axes = (0,) + tuple(range(2, got.ndim))
        shift, ratio = drift(got.mean(axis=axes), got.var(axis=axes), want.mean(axis=axes), want.var(axis=axes), 1e-5)
        np.testing.assert_allclose(drift_of_layer.mean_shift, shift, atol=1e-3, err_msg=drift_of_layer.label)
        np.testing.assert_allclose(drift_of_layer.variance_ratio, ratio, rtol=1e-3, err_msg=drift_of_layer.label)
    assert drifts[1].variance_ratio.min() < 0.2  # the near-dead channel, its gain capped: not brought back
    given = create_session_outputs(with_outputs(model, points[:1]), x)[0]  # the first layer: nothing upstream
    np.testing.assert_allclose(drifts[0].reference_variance_ratio, given.var(axis=(0, 2, 3)) / expected[0].var(
        axis=(0, 2, 3)), rtol=1e-3)

    onnx.save(model, tmp_path / "model.onnx")
    onnx.save(reference, tmp_path / "ref.onnx")
    np.save(tmp_path / "data.npy", x)
    done = run_cli("model.onnx", "out.onnx", "--data", "data.npy", "--reference", "ref.onnx", "--plot", "p.png",
                   "--batch-size", "32", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no plot drawn" not in done.stderr and "the plot p.png" in done.stdout
    assert run(onnx.load(tmp_path / "out.onnx"), x).shape == (SAMPLES, 6)


def create_session_outputs(model: onnx.ModelProto, x: np.ndarray) -> list:
    from bnpass.runtime import create_session

    session = create_session(model, ["CPUExecutionProvider"], optimize=False)
    return session.run([output.name for output in model.graph.output[1:]], {"x": x})
