"""What the pass contract's checks (bnpass/passes/base.py) cost on the 108 MiB model of
tests/test_fold_memory.py: one fingerprint, one checker run, the fold with and without the checks
(best of 3, seconds), and the fold's peak memory over the loaded model in both cases (x the model's
file size, measured as tests/test_fold_memory.py does, in a fresh process each).

    python tools/measure_pass_contract.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tools")]

PEAK = r"""
import json, os, sys
sys.path[:0] = sys.argv[1:3]
import onnx, onnxruntime
from bnpass.passes import FoldBatchNormPass
from peak_memory import reset_peak, status_mb
model = onnx.load(sys.argv[3])
reset_peak()
baseline = status_mb("VmRSS")
fold = FoldBatchNormPass()
result = fold(model) if sys.argv[4] == "checked" else fold.call(model)
print(json.dumps((status_mb("VmHWM") - baseline) / (os.path.getsize(sys.argv[3]) / 2**20)))
"""


def best(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    import onnx

    from bnpass.passes import FoldBatchNormPass
    from bnpass.passes.base import checker_failure, fingerprint
    from test_fold_memory import conv_chain_model

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "large.onnx"
        conv_chain_model(path)
        model = onnx.load(path)
        print(f"model: {os.path.getsize(path) / 2**20:.1f} MiB")
        print(f"fingerprint: {best(lambda: fingerprint(model)):.3f} s")
        print(f"checker (full, large weights declared): {best(lambda: checker_failure(model)):.3f} s")
        print(f"fold, call (unchecked): {best(lambda: FoldBatchNormPass().call(model)):.3f} s")
        print(f"fold, __call__ (checked): {best(lambda: FoldBatchNormPass()(model)):.3f} s")
        for how in ("call", "checked"):
            done = subprocess.run([sys.executable, "-c", PEAK, str(REPO), str(REPO / "tools"), str(path), how],
                                  capture_output=True, text=True, check=True)
            print(f"fold peak over the loaded model, {how}: {json.loads(done.stdout):.2f}x the model")


if __name__ == "__main__":
    main()
