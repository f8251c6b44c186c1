"""Memory stays bounded: calibration streams, so 10,000 samples take the peak memory of 500.

Each run is a fresh subprocess (``python -m bnpass`` semantics through ``bnpass.cli.main``) that
reports its peak resident set (VmHWM). The bound is generous: far below what holding the
samples would take, far above allocator noise. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import build_conv_bn_relu_chain_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SHAPE = (3, 32, 32)
FILE_SAMPLES = 100  # samples per .npy file (a batch file), so the folder is quick to write

RUN = r"""
import json, sys
sys.path[:0] = sys.argv[1:3]  # the repository (bnpass) and its tools/ folder (peak_memory)
import numpy, onnx, onnxruntime, bnpass, bnpass.cli
from peak_memory import status_mb

baseline = status_mb("VmRSS")
code = bnpass.cli.main(sys.argv[3:])
print(json.dumps({"code": code, "baseline_mb": baseline, "peak_mb": status_mb("VmHWM")}))
"""


def conv_model(path: Path) -> None:
    """(Conv(3->16)-BN-Relu) x 2 on 3x32x32 inputs."""
    onnx.save(build_conv_bn_relu_chain_model(blocks=2, in_channels=SAMPLE_SHAPE[0], channels=16, batch="N",
                                             spatial_size=SAMPLE_SHAPE[1]), path)


def write_folder(folder: Path, count: int) -> int:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for start in range(0, count, FILE_SAMPLES):
        batch = rng.standard_normal((min(FILE_SAMPLES, count - start), *SAMPLE_SHAPE)).astype(np.float32)
        np.save(folder / f"batch_{start:06d}.npy", batch)
    return count * int(np.prod(SAMPLE_SHAPE)) * 4


def peak_memory(model: Path, folder: Path, count: int, tmp_path: Path) -> dict:
    argv = [str(model), str(tmp_path / f"out_{count}.onnx"), "--data", str(folder), "--num-samples", str(count),
            "--device", "cpu", "-q"]
    done = subprocess.run([sys.executable, "-c", RUN, str(REPO), str(REPO / "tools"), *argv], capture_output=True,
                          text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["code"] == 0, done.stderr
    return figures


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ten_thousand_samples_take_the_peak_memory_of_five_hundred(tmp_path):
    model = tmp_path / "model.onnx"
    conv_model(model)
    small, large = tmp_path / "calib_500", tmp_path / "calib_10000"
    write_folder(small, 500)
    data_mb = write_folder(large, 10_000) / 2**20  # 117 MB of samples
    peak_small = peak_memory(model, small, 500, tmp_path)
    peak_large = peak_memory(model, large, 10_000, tmp_path)
    growth = peak_large["peak_mb"] - peak_small["peak_mb"]
    # Holding the samples would add ~117 MB; streaming adds nothing but allocator noise.
    assert growth < 0.2 * data_mb, (peak_small, peak_large)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_one_large_batch_file_streams_too(tmp_path):
    """Regression: a single 10,000-sample .npy was read whole (and, memory-mapped, its pages
    counted as resident): peak RSS followed the file's size (215 MB against 100 MB)."""
    model = tmp_path / "model.onnx"
    conv_model(model)
    small, large = tmp_path / "calib_500", tmp_path / "calib_one_file"
    write_folder(small, 500)
    large.mkdir()
    data = np.random.default_rng(1).standard_normal((10_000, *SAMPLE_SHAPE)).astype(np.float32)
    np.save(large / "all.npy", data)
    data_mb = data.nbytes / 2**20
    del data
    growth = (peak_memory(model, large, 10_000, tmp_path)["peak_mb"]
              - peak_memory(model, small, 500, tmp_path)["peak_mb"])
    assert growth < 0.2 * data_mb, growth
