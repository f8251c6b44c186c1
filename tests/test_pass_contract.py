"""The pass contract, checked around every pass (bnpass/passes/base.py): the input is never changed,
``modified`` is exact, the output passes the ONNX checker and keeps the model's interface, and each
pass's own ``ensures`` holds. Broken passes here are small subclasses that break one rule each; the
real passes run on the test builders and must satisfy every rule."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnpass
from assertions import output_errors
from bnpass.passes import FoldBatchNormPass, Pass, PassContractError, PassResult, ReestimateBatchNormPass, Sequential
from bnpass.passes import base as contract
from bnpass.passes.base import copy_model, fingerprint
from builders import build_conv_bn_relu_chain_model, count_ops, random_feeds


def chain_model() -> onnx.ModelProto:
    """Conv -> BN -> Relu twice, non-trivial statistics, biases on every Conv."""
    model = build_conv_bn_relu_chain_model(blocks=2, channels=4, batch=8, spatial_size=4, biases="all")
    model.ir_version = 10
    return model


def calibration_data() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((16, 4, 4, 4)).astype(np.float32)


def scaled_weight(model: onnx.ModelProto) -> None:
    """Double the first Conv weight of ``model``, in place (what a broken pass does)."""
    tensor = model.graph.initializer[0]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 2, tensor.name))


class MutatesItsInput(Pass):
    def call(self, model):
        scaled_weight(model)
        return PassResult(copy_model(model), modified=True)


class HidesAChange(Pass):
    def call(self, model):
        output = copy_model(model)
        scaled_weight(output)
        return PassResult(output, modified=False)


class ClaimsAChange(Pass):
    def call(self, model):
        return PassResult(copy_model(model), modified=True)


class ReturnsItsInput(Pass):
    def call(self, model):
        return PassResult(model, modified=False)


class WritesAnInvalidModel(Pass):
    def call(self, model):
        output = copy_model(model)
        output.graph.node[0].input[1] = "nothing_makes_this"
        return PassResult(output, modified=True)


class RenamesTheOutput(Pass):
    def call(self, model):
        output = copy_model(model)
        output.graph.node[-1].output[0] = output.graph.output[0].name = "renamed"
        return PassResult(output, modified=True)


class FoldsButReportsNone(FoldBatchNormPass):
    def call(self, model):
        result = super().call(model)
        result.folded = []
        return result


@pytest.mark.parametrize("broken, words", [
    (MutatesItsInput, "MutatesItsInput changed the model it was given: graph.initializer 'conv0_weight' changed"),
    (HidesAChange, "HidesAChange reported modified=False, but its output differs from its input: "
                   "graph.initializer 'conv0_weight' changed"),
    (ClaimsAChange, "ClaimsAChange reported modified=True, but its output equals its input"),
    (ReturnsItsInput, "ReturnsItsInput returned the model it was given, but it is declared in_place=False"),
    (WritesAnInvalidModel, "WritesAnInvalidModel wrote a model that fails onnx.checker, though its input passes"),
    (RenamesTheOutput, "RenamesTheOutput changed the model's interface: graph.output 'y' removed"),
    (FoldsButReportsNone, "FoldsButReportsNone: its postcondition failed: the output's BatchNormalization nodes "
                          "are not the input's less the 0 reported folded"),
])
def test_a_pass_that_breaks_the_contract_is_named_with_the_rule(broken, words):
    with pytest.raises(PassContractError) as raised:
        broken()(chain_model())
    assert str(raised.value).startswith(words)
    assert not isinstance(raised.value, bnpass.BnpassError)  # a bug in bnpass, not the user's input


def test_a_model_that_fails_the_checker_as_given_is_not_blamed_on_the_pass():
    model = WritesAnInvalidModel().call(chain_model()).model
    assert contract.checker_failure(model)
    assert FoldBatchNormPass()(model).modified  # the fold's own output fails as its input did


def test_large_weights_are_checked_by_their_declarations(monkeypatch):
    """Past SKELETON_ELEMENTS a weight is declared as a graph input for the checker, so that checking
    copies no payload; the checker still sees every node."""
    monkeypatch.setattr(contract, "SKELETON_ELEMENTS", 0)
    skeleton = contract.checked_skeleton(chain_model())
    assert not skeleton.graph.initializer
    assert {value.name for value in skeleton.graph.input} >= {"x", "conv0_weight", "bn1_var"}
    assert contract.checker_failure(chain_model()) == ""
    with pytest.raises(PassContractError, match="fails onnx.checker"):
        WritesAnInvalidModel()(chain_model())


def test_the_fold_satisfies_the_contract_and_a_second_fold_reports_no_change():
    model = chain_model()
    given = model.SerializeToString()
    first = FoldBatchNormPass()(model)
    assert first.modified and len(first.folded) == 2 and count_ops(first.model, "BatchNormalization") == 0
    onnx.checker.check_model(first.model, full_check=True)
    output_errors(first.model, model, random_feeds(model))
    second = FoldBatchNormPass()(first.model)
    assert second.modified is False and second.folded == []
    assert second.model.SerializeToString() == first.model.SerializeToString()
    assert model.SerializeToString() == given


def test_reestimating_again_on_the_same_data_reports_no_change():
    """Regression (found by the contract): re-estimating a model on the data it was re-estimated on
    wrote the same statistics and reported modified=True."""
    first = bnpass.reestimate_batchnorms(chain_model(), [calibration_data()], batch_size=16, device="cpu")
    assert first.modified
    onnx.checker.check_model(first.model, full_check=True)
    second = ReestimateBatchNormPass(bnpass.calibration_samples(first.model, [calibration_data()]), batch_size=16,
                                     device="cpu")(first.model)
    assert second.modified is False
    assert second.model.SerializeToString() == first.model.SerializeToString()


@pytest.mark.parametrize("candidate", ["reestimated", "matched"])
def test_matching_a_reference_again_on_the_same_data_reports_no_change(candidate):
    """Regression (found by the contract): the same for either candidate of ``--reference``."""
    reference = build_conv_bn_relu_chain_model(blocks=2, channels=4, batch=8, spatial_size=4, biases="all", seed=1)
    reference.ir_version = 10
    options = dict(reference=reference, candidate=candidate, batch_size=16, device="cpu")
    first = bnpass.reestimate_batchnorms(chain_model(), [calibration_data()], **options)
    assert first.modified and first.chosen == candidate
    onnx.checker.check_model(first.model, full_check=True)
    second = bnpass.reestimate_batchnorms(first.model, [calibration_data()], **options)
    assert second.modified is False
    assert second.model.SerializeToString() == first.model.SerializeToString()


def test_sequential_runs_each_pass_on_the_last_ones_output_and_keeps_their_results():
    model = chain_model()
    reestimate = ReestimateBatchNormPass(bnpass.calibration_samples(model, [calibration_data()]), batch_size=16,
                                         device="cpu")
    fold = FoldBatchNormPass()
    done = Sequential(reestimate, fold)(model)
    assert done.modified and done.result_of(fold).model is done.model
    assert len(done.result_of(fold).folded) == 2 and done.result_of(reestimate).modified
    onnx.checker.check_model(done.model, full_check=True)
    output_errors(done.model, done.result_of(reestimate).model, random_feeds(model))
    with pytest.raises(PassContractError, match="^HidesAChange reported modified=False"):
        Sequential(fold, HidesAChange())(model)
    nothing = Sequential()(model)
    assert nothing.model is model and nothing.modified is False and nothing.result_of(fold) is None


def test_the_fingerprint_names_what_changed():
    model = chain_model()
    before = fingerprint(model)
    model.graph.node[1].attribute.append(onnx.helper.make_attribute("epsilon", 0.5))  # bn0
    assert contract.difference(before, fingerprint(model)) == "graph.node 'bn0' changed"
    before = fingerprint(model)
    del model.graph.initializer[-1]
    assert contract.difference(before, fingerprint(model)) == "graph.initializer 'bn1_var' removed"
    assert contract.difference(before, before) == ""
