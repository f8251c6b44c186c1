"""The combined questions :class:`bnpass.graph.GraphIndex` answers in one call, and the whole operations
:class:`bnpass.rewrite.GraphEditor` makes in one call, on small hand-made graphs."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper


def _model(nodes: list, outputs: tuple = ("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    return model


def _index(model):
    from bnpass.graph import GraphIndex

    return GraphIndex(model)


def test_sole_reader_is_the_one_node_reading_a_name_once():
    model = _model([helper.make_node("Relu", ["x"], ["a"], name="first"),
                    helper.make_node("Neg", ["a"], ["y"], name="second")])
    index = _index(model)
    assert index.sole_reader("a") is model.graph.node[1]
    assert index.is_private_to("a", model.graph.node[1])


def test_sole_reader_is_none_when_anything_else_reads_the_name():
    then_branch = helper.make_graph([helper.make_node("Identity", ["a"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])])
    cases = {
        "two nodes": ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"]),
                       helper.make_node("Neg", ["a"], ["z"])], ("y", "z")),
        "one node twice": ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Add", ["a", "a"], ["y"])],
                           ("y",)),
        "a graph output": ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])],
                           ("y", "a")),
        "a subgraph": ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"]),
                        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL,
                                                                                         [], [True])),
                        helper.make_node("If", ["c"], ["z"], then_branch=then_branch, else_branch=then_branch)],
                       ("y", "z")),
        "nothing": ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["y"])], ("y",)),
    }
    for case, (nodes, outputs) in cases.items():
        model = _model(nodes, outputs)
        index = _index(model)
        assert index.sole_reader("a") is None, case
        assert not any(index.is_private_to("a", node) for node in model.graph.node), case


def test_insert_on_outputs_puts_each_node_between_a_tensor_and_its_readers():
    from bnpass.rewrite import GraphEditor

    model = _model([helper.make_node("Relu", ["x"], ["a"], name="relu"),
                    helper.make_node("Neg", ["a"], ["b"], name="neg"),
                    helper.make_node("Abs", ["b"], ["y"], name="abs")])
    editor = GraphEditor(model)
    editor.insert_on_outputs([("a", helper.make_node("Identity", ["a.inner"], ["a"], name="on_a")),
                              ("b", helper.make_node("Sigmoid", ["b.inner"], ["b"], name="on_b"))])
    assert [(node.name, list(node.input), list(node.output)) for node in model.graph.node] == [
        ("relu", ["x"], ["a.inner"]), ("on_a", ["a.inner"], ["a"]), ("neg", ["a"], ["b.inner"]),
        ("on_b", ["b.inner"], ["b"]), ("abs", ["b"], ["y"])]
    assert editor.index.producers["a"].name == "on_a" and editor.index.sole_reader("a.inner").name == "on_a"
    onnx.checker.check_model(model, full_check=True)


def test_first_shared_is_where_a_chain_stops_being_read_once():
    model = _model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
                    helper.make_node("Abs", ["b"], ["c"]), helper.make_node("Add", ["c", "b"], ["y"]),
                    helper.make_node("Sigmoid", ["x"], ["unread"])])
    index = _index(model)
    assert index.first_shared(["a", "c"]) is None
    assert index.first_shared(["a", "b", "c"]) == "b"  # Abs and Add read it
    assert index.first_shared(["c", "unread", "b"]) == "unread"  # read by nothing
    assert _index(_model(model.graph.node, ("y", "a"))).first_shared(["a", "c"]) == "a"  # also a graph output
