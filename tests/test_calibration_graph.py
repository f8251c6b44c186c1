"""The calibration graph and the loop that runs it: shape of the graph, precision on large
tensors, onnxruntime's optimizations, the I/O-binding runner, and the prefetching thread.

Statistics are checked against numpy in float64 on the same data (an independent reference).
"""

from __future__ import annotations

import threading

import numpy as np
import onnx
import onnxruntime
import pytest

import bnpass
from bnpass.calibration import build_calibration_model
from bnpass.feeding import prefetched
from bnpass.passes import ReestimateBatchNormPass
from bnpass.passes.statistics_session import StatisticsSession
from bnpass.runtime import CPU, BatchRunner, create_session
from builders import GraphBuilder, add_batchnorm, export_with_batchnorm_kept, random_bn_params

STATISTICS_OPS = ("ReduceMean", "Sub", "Mul", "Size", "BatchNormalization")


def direct_bn_model(channels: int, spatial=(5, 4)) -> onnx.ModelProto:
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, ["N", channels, *spatial])
    add_batchnorm(builder, "x", random_bn_params((channels,), np.random.default_rng(0)))
    builder.add_output("y")
    return builder.build()


def torch_conv_net(channels: int = 32) -> onnx.ModelProto:
    """Conv-BN-ReLU, depthwise Conv-BN-ReLU, Conv-BN, exported by PyTorch with BN kept.

    32 channels: a multiple of onnxruntime's NCHWc block (8 or 16), so ORT_ENABLE_ALL rewrites
    the convolutions into its blocked layout, as it does in real networks.
    """
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            module.running_mean.uniform_(-1, 1)
    return export_with_batchnorm_kept(net, torch.zeros(2, 3, 16, 16), output_name="output")


def test_each_bn_gets_two_reductions_and_no_reduce_sum_square():
    calibration = build_calibration_model(direct_bn_model(3))
    ops = [node.op_type for node in calibration.model.graph.node]
    assert ops.count("ReduceMean") == 2 and ops.count("Sub") == 1 and ops.count("Mul") == 1
    assert "ReduceSumSquare" not in ops
    # Only per-channel vectors and one scalar per BN leave the session.
    session = create_session(calibration.model, [CPU])
    values = session.run(None, {"x": np.ones((4, 3, 5, 4), np.float32)})
    assert [v.shape for v in values] == [(3,), (3,), ()]


def test_variance_of_a_large_tensor_with_offset_channels_is_exact():
    """Regression: ReduceSumSquare accumulated float32 sequentially, 2e-5 relative error on a
    32x96x48x48 activation; the centered Mul + ReduceMean form stays within 1e-6."""
    channels = 8
    rng = np.random.default_rng(3)
    offsets = np.array([5.0, -4.0, 3.0, 0.0, 1.0, -2.0, 8.0, 0.5]).reshape(1, channels, 1, 1)
    scales = np.array([0.2, 0.5, 1.0, 2.0, 0.3, 1.5, 0.25, 1.0]).reshape(offsets.shape)
    data = (rng.standard_normal((32, channels, 64, 64)) * scales + offsets).astype(np.float32)
    result = bnpass.reestimate_batchnorms(direct_bn_model(channels, (64, 64)), [data], batch_size=32)
    expected = data.astype(np.float64)
    np.testing.assert_allclose(result.stats["bn"].mean, expected.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.stats["bn"].var, expected.var((0, 2, 3)), rtol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnxruntime_optimizations_leave_the_statistics_nodes_alone(tmp_path):
    """ORT_ENABLE_ALL (NCHWc layout, fusions) keeps every statistics node and gives the same
    statistics as a session with every optimization off."""
    model = torch_conv_net()
    calibration = build_calibration_model(model)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(calibration.model.SerializeToString(), options, providers=[CPU])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    for op in STATISTICS_OPS:
        before = sum(node.op_type == op for node in calibration.model.graph.node)
        after = sum(node.op_type == op and node.domain in ("", "ai.onnx") for node in optimized.graph.node)
        assert after == before, op

    data = np.random.default_rng(1).standard_normal((64, 3, 16, 16)).astype(np.float32) + 0.5
    results = {}
    for optimize in (True, False):
        session = StatisticsSession(calibration, [CPU], optimize=optimize)
        moments = session.collect([{"input": data[:32]}, {"input": data[32:]}])
        results[optimize] = [m.result("pooled") for m in moments]
    for (mean, var), (mean_ref, var_ref) in zip(results[True], results[False]):
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, var_ref, rtol=1e-5)


def test_io_binding_runner_matches_session_run_and_leaves_inputs_alone():
    """The CUDA path (device buffers refilled in place, outputs bound to the host), run on CPU."""
    calibration = build_calibration_model(direct_bn_model(3))
    session = create_session(calibration.model, [CPU])
    names = [name for tap in calibration.taps for name in (tap.mean, tap.var, tap.size)]
    bound = BatchRunner(session, names, device="cpu")
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((n, 3, 5, 4)).astype(np.float32) for n in (8, 8, 5, 8)]
    copies = [batch.copy() for batch in batches]
    for batch in batches:
        expected = session.run(names, {"x": batch})
        got = bound.run({"x": batch})
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
    for batch, copy in zip(batches, copies):
        np.testing.assert_array_equal(batch, copy)
    assert BatchRunner(session, names).device is None  # plain session.run on CPU


def test_prefetched_yields_everything_in_order():
    assert list(prefetched(iter(range(100)), depth=3)) == list(range(100))
    assert list(prefetched([])) == []


def test_prefetched_reraises_the_producers_error_in_the_consumer():
    def source():
        yield 1
        raise bnpass.DataError("broken file")

    items = prefetched(source())
    assert next(items) == 1
    with pytest.raises(bnpass.DataError, match="broken file"):
        next(items)


def test_prefetched_stops_reading_when_the_consumer_stops():
    produced = []

    def source():
        for number in range(10_000):
            produced.append(number)
            yield number

    threads_before = threading.active_count()
    items = prefetched(source(), depth=2)
    for number in items:
        if number == 3:
            break
    items.close()
    assert threading.active_count() == threads_before  # the loading thread is gone
    assert len(produced) <= 4 + 2 + 1  # consumed + queued + the one being offered


def test_data_errors_mid_stream_reach_the_caller_unchanged():
    def batches():
        yield np.zeros((4, 3, 5, 4), np.float32)
        yield np.zeros((4, 7), np.float32)  # wrong rank: a DataError raised by the data layer

    with pytest.raises(bnpass.DataError, match="does not fit"):
        bnpass.reestimate_batchnorms(direct_bn_model(3), batches(), batch_size=4)


def test_thread_count_is_passed_to_onnxruntime(monkeypatch):
    """The pass's ``threads`` reaches the SessionOptions of the session onnxruntime builds (read
    back from the session itself: 3 is neither onnxruntime's default, 0, nor this machine's cores)."""
    threads_seen = []

    class RecordingSession(onnxruntime.InferenceSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            threads_seen.append(self.get_session_options().intra_op_num_threads)

    monkeypatch.setattr(onnxruntime, "InferenceSession", RecordingSession)
    data = np.random.default_rng(4).standard_normal((16, 3, 5, 4)).astype(np.float32)
    samples = bnpass.calibration_samples(direct_bn_model(3), [data])
    result = ReestimateBatchNormPass(samples, batch_size=8, threads=3, device="cpu")(direct_bn_model(3))
    assert threads_seen == [3]
    np.testing.assert_allclose(result.stats["bn"].var, data.astype(np.float64).var((0, 2, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="threads"):
        create_session(direct_bn_model(3), [CPU], threads=0)
