#!/usr/bin/env bash
# Issue 12's GPU checks in ONE device call: about 6 minutes on an H200 (estimated, never run yet),
# never over BUDGET=500 s (each step has its own time limit, so the results file is written even
# when a step hangs). Writes $OUT/gpu_check.md (everything, in order) and $OUT/pytest.log.
#
# Before, on the development machine, from the project's root:
#   ../shared/gpu/make-ort-chunks.sh          # .gpu/c0 .. .gpu/c3, onnxruntime-gpu 1.31.1 (ignored by git)
# Then four device calls, back to back (the machine stays warm ~30 s between calls; each carries
# one chunk, as the 64 MiB carry limit allows):
#   run(carry=[".gpu/c0"], command="mkdir -p /tmp/c && cp .gpu/c0 /tmp/c/")   ... and c1, c2, c3
# And this one:
#   run(command="bash tools/gpu_check.sh", timeout_s=540)
#
# What it runs, on the GPU machine's python3 (PyTorch brings the CUDA libraries) with
# onnxruntime-gpu unpacked in /tmp/site ahead of the CPU-only onnxruntime installed there:
#   1. the environment: onnxruntime's version and file, bnpass's CUDA probe, the GPU;
#   2. tests/test_cuda.py (CUDA statistics within 1e-4 of the CPU's per form, use_tf32, the
#      double-buffered runner), then the whole suite (as on CPU, now with CUDA behind device=auto);
#   3. the README's main command as a user runs it (device auto, TF32 off), then with --tf32,
#      each with --verify, and tools/evaluate.py on both outputs;
#   4. tools/measure_forms.py on CUDA: each form on one hard 32x96x48x48 tensor against numpy,
#      and on the ResNet-50 layout against the CPU (TF32 off and on);
#   5. tools/bench.py on CUDA, ResNet-50 and MobileNetV2 layouts at 224, batch 64: plain
#      inference, resident input, each form's statistics loop, the pass, end to end, torch
#      update_bn, TF32 off in every session; then plain and statistics again with TF32 on in all.
#   6. if time is left: the forms on the CPU provider with 16 threads (the CPU default's question).
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
results=$OUT/gpu_check.md
: > "$results"
started=$(date +%s)

note() { printf '%s\n' "$@" >> "$results"; }

# The whole script stays within BUDGET seconds (the device call's limit is 600): each step gets
# its own limit, cut to what is left.
BUDGET=${BUDGET:-500}
limit_for() {
  local left=$(( BUDGET - ($(date +%s) - started) - 15 ))
  echo $(( $1 < left ? $1 : left ))
}

# step TITLE SECONDS COMMAND...: runs COMMAND under a time limit, its output into the results file.
step() {
  local title=$1 limit
  limit=$(limit_for "$2")
  shift 2
  note "" "## $title" ""
  if [ "$limit" -lt 20 ]; then
    note "skipped: the time budget (${BUDGET}s) is spent"
    return 0
  fi
  note "\`$*\` (limit ${limit}s, started at +$(( $(date +%s) - started ))s)" "" '```'
  timeout --kill-after=5 "$limit" "$@" >> "$results" 2>&1
  local code=$?
  note '```' "exit code $code$([ $code -eq 124 ] && echo ' (time limit)')"
  return 0
}

note "# bnpass GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"

if [ ! -d /tmp/site/onnxruntime ]; then
  if ! ls /tmp/c/c0 /tmp/c/c1 /tmp/c/c2 /tmp/c/c3 > /dev/null 2>&1; then
    note "" "onnxruntime-gpu chunks missing in /tmp/c ($(ls /tmp/c 2>&1)); see this script's header."
    exit 1
  fi
  mkdir -p /tmp/site && cat /tmp/c/c0 /tmp/c/c1 /tmp/c/c2 /tmp/c/c3 | xz -d -T16 | tar x -C /tmp/site
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# tests/test_readme.py runs `pip install --dry-run --no-deps .`: no package index there, so no
# isolated build environment either (setuptools is installed).
export PIP_NO_INDEX=1 PIP_NO_BUILD_ISOLATION=0

step "Environment" 120 python3 -c "
import platform, onnxruntime, torch
from bnpass.runtime import cuda_unavailable_reason
print('python', platform.python_version(), '| onnxruntime', onnxruntime.__version__, onnxruntime.__file__)
print('torch', torch.__version__, '| GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print('bnpass CUDA probe:', cuda_unavailable_reason() or 'the CUDA provider loads')"

step "CUDA tests" 100 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
note "" "## Whole test suite (full log: pytest.log)" "" '```'
timeout --kill-after=5 "$(limit_for 200)" python3 -m pytest -q -rfEs -p no:cacheprovider > "$OUT/pytest.log" 2>&1
code=$?
tail -n 40 "$OUT/pytest.log" >> "$results"
note '```' "exit code $code$([ $code -eq 124 ] && echo ' (time limit)')"

fixed=$(mktemp -d)
step "README main command as a user runs it (device auto, TF32 off)" 120 \
  python3 -m bnpass examples/digits/model_compressed.onnx "$fixed/digits_fixed.onnx" --data examples/digits/calib --verify
step "README main command with --tf32" 120 \
  python3 -m bnpass examples/digits/model_compressed.onnx "$fixed/digits_tf32.onnx" --data examples/digits/calib --verify --tf32
step "Accuracy of both outputs" 120 python3 tools/evaluate.py examples/digits/model.onnx \
  examples/digits/model_compressed.onnx "$fixed/digits_fixed.onnx" "$fixed/digits_tf32.onnx"

step "Forms on one hard tensor, CUDA" 120 python3 tools/measure_forms.py --device cuda
step "Forms on the ResNet-50 layout against the CPU, TF32 off and on" 120 \
  python3 tools/measure_forms.py --device cuda --network resnet50 --batch-size 64 --batches 2 --threads 16

step "Bench on CUDA, TF32 off in every session" 200 python3 tools/bench.py --device cuda \
  --networks resnet50 mobilenet --size 224 --batch-size 64 --samples 512 --repeats 5 \
  --forms reduce pooling layernorm --no-memory
step "Bench on CUDA, TF32 on in every session" 100 python3 tools/bench.py --device cuda --tf32 \
  --networks resnet50 mobilenet --size 224 --batch-size 64 --samples 256 --repeats 3 \
  --forms reduce pooling layernorm --methods plain resident stats --no-memory

# The CPU default form, on many cores: BN's training_mode=1 kernel computes its statistics on one
# thread, the reduce form's operators on all of them (measured here only at 1 and 2 threads).
step "CPU forms at 16 threads, one hard tensor" 60 python3 tools/measure_forms.py --threads 16 --forms reduce pooling training
step "CPU forms at 16 threads, networks" 120 python3 tools/bench.py --device cpu --threads 16 \
  --networks resnet mobilenet --samples 256 --repeats 3 --forms pooling training --methods plain stats --no-memory

note "" "Total: $(( $(date +%s) - started )) s."
