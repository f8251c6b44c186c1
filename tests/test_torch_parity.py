"""Parity with PyTorch: a torch model exported with BN kept, re-estimated by bnpass with
``--stats batch-mean``, matches ``torch.optim.swa_utils.update_bn`` on the same batches."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnpass
from builders import export_with_batchnorm_kept, make_batchnorm_statistics_stale, run_onnxruntime, update_bn_on

torch = pytest.importorskip("torch")  # the test extra; without it this module is skipped, not an error
nn = torch.nn


class SmallNet(nn.Module):
    """Conv2d + BN, depthwise Conv2d + BN, Linear + BatchNorm1d: the layer kinds of the issue."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.bn3 = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        x = torch.relu(self.bn2(self.depthwise(x)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.head(torch.relu(self.bn3(self.fc(x))))


def stale_model(seed=0) -> SmallNet:
    torch.manual_seed(seed)
    return make_batchnorm_statistics_stale(SmallNet())


@pytest.fixture(scope="module")
def calibration_data():
    rng = np.random.default_rng(7)
    offsets = rng.uniform(-1, 1, size=(1, 3, 1, 1))
    return (rng.standard_normal((100, 3, 8, 8)) * 1.5 + offsets).astype(np.float32)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_batch_mean_statistics_match_update_bn(calibration_data):
    model = stale_model()
    onnx_model = export_with_batchnorm_kept(model, torch.zeros(2, 3, 8, 8))
    assert sum(n.op_type == "BatchNormalization" for n in onnx_model.graph.node) == 3

    update_bn_on(model, calibration_data, 32)  # batches of 32, 32, 32, 4
    torch_bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    # CPU: the 1e-5 below is a CPU-to-CPU figure; on CUDA (TF32 off) the issue-12 filer measured
    # 9.6e-6, too close to it. CUDA's own agreement with the CPU is tests/test_cuda.py's.
    result = bnpass.reestimate_batchnorms(onnx_model, [calibration_data], stats="batch-mean", batch_size=32,
                                          device="cpu")
    assert result.batches == 4 and result.samples == 100
    for torch_bn, stats in zip(torch_bns, result.stats.values()):
        np.testing.assert_allclose(stats.mean, torch_bn.running_mean.double().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var, torch_bn.running_var.double().numpy(), rtol=1e-5)

    # End to end: the folded model computes what the re-estimated torch model computes.
    folded = bnpass.fold_batchnorms(result.model)
    assert not folded.skipped and len(folded.folded) == 3
    onnx.checker.check_model(folded.model, full_check=True)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(calibration_data)).numpy()
    got = run_onnxruntime(folded.model, {"input": calibration_data})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
