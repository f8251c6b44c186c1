"""Every test runs on the CPU, on any machine, unless it is marked ``cuda``.

Tests compare against CPU references at CPU tolerances (numpy on the concatenated data, PyTorch's
BatchNorm, onnxruntime's CPU kernels). Where onnxruntime's CUDA provider loads, ``device="auto"``
would pick it and those comparisons would measure the GPU's arithmetic instead. So, for each test
not marked ``cuda``, bnpass's CUDA probe answers "unavailable" in this process, and
``CUDA_VISIBLE_DEVICES`` is empty for the CLI subprocesses a test starts. tests/test_cuda.py holds
the CUDA checks, at CUDA tolerances.
"""

from __future__ import annotations

import pytest

from bnpass import runtime


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    if request.node.get_closest_marker("cuda"):
        return
    monkeypatch.setattr(runtime, "cuda_unavailable_reason", lambda: "the tests run on the CPU (tests/conftest.py)")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
