"""Benchmark bnpass against plain inference and PyTorch's update_bn, in one interleaved run.

For each case (the generated networks, or a model and calibration folder you give) it measures,
on the same calibration samples, batch size, device (``--device cpu|cuda``), precision (TF32 off
in every CUDA session, ``--tf32`` turns it on in all of them, onnxruntime's and torch's alike)
and thread count:

  (a) plain    onnxruntime inference of the original model (ORT_ENABLE_ALL, which folds BN into
               the convolutions and runs them in its NCHWc layout on CPU), session built once,
               batches fed the way bnpass feeds them (``BatchRunner``: on CUDA two device buffers,
               the next batch copied while the current one runs)
  (r) resident CUDA only: plain inference of batches already in device memory (no copy at all)
  (b) stats    bnpass statistics collection only: the calibration session loop
               (``StatisticsSession.collect``), session built once, in the statistics form the
               provider gets (``FORM_FOR_PROVIDER``); ``--forms`` adds one (b) row per form
  (b+) pass    ReestimateBatchNormPass from the folder: calibration graph, session, prefetched
               data loading, statistics written into the model
  (g) reference  the same with ``--reference`` (MatchReferencePass): a compressed copy of the
               model (every weight rounded to 15 levels, :func:`compressed_copy`) against the model
               as the reference, both candidates made in one pass, then every candidate scored on
               every sample; g/(b+) is its cost against plain re-estimation, split into its two
               readings (the first, three calibration graphs per batch; the second, scoring the
               reference, the model as given and every candidate, timed inside the pass). Not the
               model against itself: scoring computes what the models have in common once, so
               identical weights would flatter it
  (h) fused    ``--reference`` on the same network with its BNs folded first (what most exports look
               like): every Conv and Gemm output corrected, a compressed copy against the folded
               model; h/(b+) is the cost against plain re-estimation of the network with BN
  (c) bnpass   end to end, as the CLI does it: load + check, calibrate, fold, check, save
  (d) torch    ``torch.optim.swa_utils.update_bn`` on the same network (generated cases only),
               reading the same .npy files through a DataLoader, on the same device,
               ``torch.set_num_threads`` equal to onnxruntime's intra-op threads
  (f) floor    diagnostic: the model with every BN fed its mean and variance at run time, no
               statistics at all. onnxruntime can then neither fold BN into the convolutions nor
               keep the NCHWc layout across it: the cost of train-mode BN semantics in any
               calibration graph on this provider, which (b) cannot go below
  (e) memory   peak RSS of each of the above in its own subprocess (VmHWM), and how far it rises
               above the process's RSS after imports

Timings are interleaved (a, b, b+, c, d, a, b, ...) and the median of ``--repeats`` is reported,
so load from other processes hits every method alike. ``--profile`` adds onnxruntime's per-operator
profile of the plain and calibration sessions.

    python tools/bench.py                                  # generated ResNet- and MobileNet-style
    python tools/bench.py --model m.onnx --data calib/     # your model and data: (a), (b), (c), (e)
    python tools/bench.py --model m.onnx --networks        # your model, random data of its input shape
    python tools/bench.py --device cuda --networks resnet50 mobilenet --size 224 --batch-size 64 \
        --forms reduce pooling layernorm --no-memory       # the issue-12 cases on a GPU

Needs PyTorch for the generated networks and (d).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import bnpass  # noqa: E402
from bnpass.calibration import FORMS, build_calibration_model  # noqa: E402
from bnpass.data import batched, model_input_specs, planned_sample_count  # noqa: E402
from bnpass.model_io import load_model, save_model  # noqa: E402
from bnpass.passes import FoldBatchNormPass, ReestimateBatchNormPass  # noqa: E402
from bnpass.passes.match_reference import MatchReferencePass  # noqa: E402
from bnpass.passes.statistics_session import StatisticsSession  # noqa: E402
from bnpass.runtime import BatchRunner, create_session, select_providers  # noqa: E402
from bnpass.statistics_forms import form_for_providers  # noqa: E402
from builders import export_with_batchnorm_kept  # noqa: E402

# tools/peak_memory.py, beside this script: the memory reader the memory tests use too.
from peak_memory import reset_peak as _reset_peak  # noqa: E402
from peak_memory import status_mb as _status_mb  # noqa: E402
from scoring_models import compressed_copy  # noqa: E402

METHODS = ("plain", "resident", "floor", "stats", "pass", "reference", "fused", "bnpass", "torch")
LABELS = {"plain": "(a) plain ORT inference", "stats": "(b) bnpass statistics loop",
          "resident": "(r) plain ORT inference, batches already on the device",
          "pass": "(b+) reestimate pass from folder", "bnpass": "(c) bnpass end to end",
          "reference": "(g) --reference pass from folder (a compressed copy against the model)",
          "fused": "(h) --reference on the network with its BNs folded: every layer corrected",
          "torch": "(d) torch update_bn", "floor": "(f) floor: BN fed mean/var, no statistics"}


# ------------------------------------------------------------------------------------------------
# Generated networks (PyTorch), exported with BN kept
# ------------------------------------------------------------------------------------------------

def _networks():
    import torch
    from torch import nn

    def conv_bn(cin, cout, kernel=3, stride=1, groups=1, relu=True):
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers)

    class Residual(nn.Module):
        """ReLU(body(x) + shortcut(x)); the shortcut projects (1x1 Conv + BN) where the shape changes."""

        def __init__(self, body, cin, cout, stride):
            super().__init__()
            self.body = body
            self.shortcut = (conv_bn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout
                             else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.shortcut(x))

    def basic_block(cin, cout, stride):
        return Residual(nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, relu=False)),
                        cin, cout, stride)

    def bottleneck(cin, width, stride):
        body = nn.Sequential(conv_bn(cin, width, 1), conv_bn(width, width, 3, stride),
                             conv_bn(width, width * 4, 1, relu=False))
        return Residual(body, cin, width * 4, stride)

    class ResNetStyle(nn.Module):
        """ResNet-18 layout (2-2-2-2 basic blocks, widths 32-256), stride-1 stem: 20 BNs."""

        def __init__(self, classes=10):
            super().__init__()
            layers, cin = [conv_bn(3, 32)], 32
            for stage, width in enumerate((32, 64, 128, 256)):
                for block in range(2):
                    layers.append(basic_block(cin, width, 2 if stage and not block else 1))
                    cin = width
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(cin, classes)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.body = nn.Sequential(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                      conv_bn(hidden, cout, 1, relu=False))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    class MobileNetStyle(nn.Module):
        """MobileNetV2 layout (depthwise separable inverted residuals, width 1.0): 52 BNs."""

        def __init__(self, classes=10):
            super().__init__()
            layers, cin = [conv_bn(3, 32, 3, 2)], 32
            for expand, cout, repeats, stride in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                                  (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
                for block in range(repeats):
                    layers.append(InvertedResidual(cin, cout, stride if block == 0 else 1, expand))
                    cin = cout
            layers.append(conv_bn(cin, 1280, 1))
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(1280, classes)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    class ResNet50Style(nn.Module):
        """ResNet-50 layout (3-4-6-3 bottleneck blocks, widths 64-512, 7x7 stride-2 stem, max pool): 53 BNs."""

        def __init__(self, classes=1000):
            super().__init__()
            layers, cin = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
            for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
                for block in range(blocks):
                    layers.append(bottleneck(cin, width, 2 if stage and not block else 1))
                    cin = width * 4
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(cin, classes)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    return {"resnet": (ResNetStyle, (3, 64, 64)), "mobilenet": (MobileNetStyle, (3, 96, 96)),
            "resnet50": (ResNet50Style, (3, 224, 224))}


NETWORKS = ("resnet", "mobilenet", "resnet50")



def build_network(name: str, size=None):
    """The torch network ``name`` with stale (random) BN statistics, and its input shape
    (``size`` x ``size`` pixels instead of the network's default when given)."""
    import torch
    from torch import nn

    factory, shape = _networks()[name]
    if size:
        shape = (shape[0], size, size)
    torch.manual_seed(0)
    net = factory()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.3, 0.3)
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval(), shape


def export_network(net, shape, path: Path) -> None:
    import torch

    onnx.save(export_with_batchnorm_kept(net, torch.zeros(2, *shape), output_name="output"), path)


def write_samples(folder: Path, count: int, shape, seed: int = 0) -> None:
    """``count`` float32 samples, one .npy file each, with per-channel offsets and scales."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = shape[0]
    offsets = rng.uniform(-1, 1, (channels,) + (1,) * (len(shape) - 1))
    scales = rng.uniform(0.5, 2.0, offsets.shape)
    for number in range(count):
        sample = (rng.standard_normal(shape) * scales + offsets).astype(np.float32)
        np.save(folder / f"sample_{number:05d}.npy", sample)


# ------------------------------------------------------------------------------------------------
# The measured methods
# ------------------------------------------------------------------------------------------------

class Case:
    """One model + calibration folder, and what every method needs, prepared once.

    ``spec`` (JSON, also handed to the memory workers) may set ``device`` ("cpu" or "cuda"),
    ``tf32`` and ``forms`` (statistics forms measured besides the provider's own).
    """

    def __init__(self, spec: dict):
        self.spec = spec
        self.name = spec["name"]
        self.model_path = spec["model"]
        self.data = spec["data"]
        self.batch_size = spec["batch_size"]
        self.samples = spec["samples"]
        self.threads = spec["threads"]
        self.out = spec["out"]
        self.device = spec.get("device", "cpu")
        self.tf32 = spec.get("tf32", False)
        self.providers = select_providers(self.device)
        self.form = form_for_providers(self.providers)
        self._model = None
        self._batches = None
        self._sessions = {}
        self._net = None
        self._fused = None
        self._compressed = self._fused_compressed = None
        self.built_forms = {}  # form asked for -> the form each BN got (fallbacks included)
        self.scoring = collections.defaultdict(list)  # reference / fused -> each run's seconds of scoring

    @property
    def model(self):
        if self._model is None:
            self._model = onnx.load(self.model_path)
        return self._model

    def batches(self) -> list:
        """The calibration batches, in memory (for the session loops (a) and (b))."""
        if self._batches is None:
            folder = bnpass.calibration_samples(self.model, self.data)
            limit = planned_sample_count(self.samples, self.batch_size)
            self._batches = list(batched(folder.samples(), self.batch_size, limit))
        return self._batches

    def streamed_batches(self):
        folder = bnpass.calibration_samples(self.model, self.data)
        return batched(folder.samples(), self.batch_size, planned_sample_count(self.samples, self.batch_size))

    def session(self, model, profile_prefix=None):
        return create_session(model, self.providers, threads=self.threads, profile_prefix=profile_prefix,
                              tf32=self.tf32)

    def plain_session(self, profile_prefix=None):
        return self.session(self.model, profile_prefix)

    def statistics_session(self, profile_prefix=None, form=None):
        form = form or self.form
        calibration = build_calibration_model(self.model, form)
        self.built_forms[form] = list(calibration.forms)
        return StatisticsSession(calibration, self.providers, threads=self.threads, profile_prefix=profile_prefix,
                                 tf32=self.tf32)

    def _runner(self, key, session):
        if key not in self._sessions:
            self._sessions[key] = BatchRunner(session, [output.name for output in session.get_outputs()])
        return self._sessions[key]

    # (a)
    def plain(self, batches=None):
        runner = self._runner("plain", self.plain_session())
        for _ in runner.run_all(batches if batches is not None else self.batches()):
            pass

    # (r)
    def resident(self):
        """Batches bound from device buffers filled once, before any timing: no copy per batch."""
        import onnxruntime

        if "resident" not in self._sessions:
            session = self.plain_session()
            values = [{name: onnxruntime.OrtValue.ortvalue_from_numpy(array, "cuda", 0) for name, array in feed.items()}
                      for feed in self.batches()]
            self._sessions["resident"] = (session, values)
        session, values = self._sessions["resident"]
        binding = session.io_binding()
        for output in session.get_outputs():
            binding.bind_output(output.name, "cpu")
        for feed in values:
            for name, value in feed.items():
                binding.bind_ortvalue_input(name, value)
            session.run_with_iobinding(binding)
            binding.copy_outputs_to_cpu()

    # (f)
    def floor(self, batches=None):
        if "floor" not in self._sessions:
            self._sessions["floor"] = self._floor_session()
        session, fed = self._sessions["floor"]
        names = [output.name for output in session.get_outputs()]
        for feed in batches if batches is not None else self.batches():
            session.run(names, {**feed, **fed})

    def _floor_session(self):
        """The model with each BN's mean and variance turned into graph inputs (fed their values)."""
        from bnpass.graph import GraphIndex

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        index = GraphIndex(model)
        fed = {}
        for number, node in enumerate(n for n in model.graph.node if n.op_type == "BatchNormalization"):
            for position in (3, 4):
                constant = index.constant(node.input[position])
                if constant is None:  # already fed at run time
                    continue
                value = constant.value
                name = f"bench_fed/{number}/{position}"
                node.input[position] = name
                model.graph.input.append(onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
                fed[name] = value
        used = {name for node in model.graph.node for name in node.input}
        kept = [tensor for tensor in model.graph.initializer if tensor.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        return self.session(model), fed

    # (b), in the provider's form or another one
    def stats(self, batches=None, form=None):
        form = form or self.form
        if ("stats", form) not in self._sessions:
            self._sessions[("stats", form)] = self.statistics_session(form=form)
        self._sessions[("stats", form)].collect(batches if batches is not None else self.batches())

    # (b+)
    def reestimate(self):
        samples = bnpass.calibration_samples(self.model, self.data)
        ReestimateBatchNormPass(samples, batch_size=self.batch_size, num_samples=self.samples,
                                device=self.device, threads=self.threads, tf32=self.tf32)(self.model)

    # (g)
    def match_reference(self):
        if self._compressed is None:
            self._compressed = compressed_copy(self.model)
        samples = bnpass.calibration_samples(self.model, self.data)
        result = MatchReferencePass(samples, self.model, batch_size=self.batch_size, num_samples=self.samples,
                                    device=self.device, threads=self.threads, tf32=self.tf32)(self._compressed)
        self.scoring["reference"].append(result.comparing_seconds)

    # (h)
    def correct_layers(self):
        if self._fused is None:
            self._fused = bnpass.fold_batchnorms(self.model).model
            self._fused_compressed = compressed_copy(self._fused)
        samples = bnpass.calibration_samples(self._fused, self.data)
        result = MatchReferencePass(samples, self._fused, batch_size=self.batch_size, num_samples=self.samples,
                                    device=self.device, threads=self.threads, tf32=self.tf32)(self._fused_compressed)
        self.scoring["fused"].append(result.comparing_seconds)

    # (c): what bnpass.cli.run does, with the thread count set
    def bnpass(self):
        model = load_model(self.model_path)
        samples = bnpass.calibration_samples(model, self.data)
        reestimated = ReestimateBatchNormPass(samples, batch_size=self.batch_size, num_samples=self.samples,
                                              device=self.device, threads=self.threads,
                                              tf32=self.tf32)(model)
        folded = FoldBatchNormPass()(reestimated.model)
        onnx.checker.check_model(folded.model, full_check=True)
        save_model(folded.model, self.out)

    # (d)
    def torch(self):
        import torch

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.tf32
        if self._net is None:
            self._net, _ = build_network(self.spec["network"], self.spec.get("size"))
            self._net.to(self.device)
        files = sorted(str(p) for p in Path(self.data).glob("*.npy"))
        limit = planned_sample_count(self.samples, self.batch_size)

        class Samples(torch.utils.data.Dataset):
            def __len__(self):
                return min(len(files), limit)

            def __getitem__(self, index):
                return torch.from_numpy(np.load(files[index]))

        loader = torch.utils.data.DataLoader(Samples(), batch_size=self.batch_size, shuffle=False, num_workers=0)
        torch.optim.swa_utils.update_bn(loader, self._net, device=torch.device(self.device))
        if self.device == "cuda":
            torch.cuda.synchronize()


def run_method(case: Case, method: str) -> None:
    if method.startswith("stats:"):
        case.stats(form=method.split(":", 1)[1])
        return
    {"plain": case.plain, "resident": case.resident, "floor": case.floor, "stats": case.stats,
     "pass": case.reestimate, "reference": case.match_reference, "fused": case.correct_layers, "bnpass": case.bnpass,
     "torch": case.torch}[method]()


def methods_for(spec: dict) -> list:
    """The methods measured for ``spec``: ``stats:FORM`` for each extra form (``--forms``)."""
    chosen = spec.get("methods") or METHODS
    methods = [m for m in METHODS if m in chosen and (m != "torch" or spec.get("network"))
               and (m != "resident" or spec.get("device") == "cuda")]
    own = form_for_providers(select_providers(spec.get("device", "cpu")))
    extra = [f"stats:{form}" for form in spec.get("forms", []) if form != own]
    position = methods.index("stats") + 1 if "stats" in methods else len(methods)
    return methods[:position] + extra + methods[position:]


def label(method: str, case: Case) -> str:
    if method == "stats" or method.startswith("stats:"):
        form = method.split(":", 1)[1] if ":" in method else case.form
        got = collections.Counter(case.built_forms.get(form, []))
        return f"(b) bnpass statistics loop, {form} form ({', '.join(f'{n} BN {f}' for f, n in got.items())})"
    return LABELS[method]


# ------------------------------------------------------------------------------------------------
# Memory: each method alone in a subprocess
# ------------------------------------------------------------------------------------------------

def worker(method: str, spec: dict) -> None:
    """Run one method once, streaming its data, and print its memory figures as JSON."""
    import onnxruntime  # noqa: F401  (imported libraries count in the baseline)

    if method == "torch":
        import torch  # noqa: F401
    case = Case(spec)
    _reset_peak()
    baseline = _status_mb("VmRSS")
    started = time.perf_counter()
    if method in ("plain", "stats"):
        # Stream from the folder so the peak is the method's, not a preloaded data set's.
        getattr(case, method)(case.streamed_batches())
    else:
        run_method(case, method)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec() from the forking parent, and
    # VmHWM can be reset after the imports.
    peak = _status_mb("VmHWM")
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak, "seconds": time.perf_counter() - started}))


def fold_worker(model_path: str, output: str) -> None:
    """Peak memory of ``bnpass.fold_batchnorms`` on a large model, over the RSS with it loaded.

    Loading peaks at about twice the model (the file's bytes and the parsed model), so the
    high-water mark is reset after the load (Linux: ``5`` into /proc/self/clear_refs) and the fold
    is measured alone. The CLI run below counts everything, load included.
    """
    import onnxruntime  # noqa: F401

    size = os.path.getsize(model_path) / 2**20  # not ByteSize(): protobuf's upb serializes to size
    model = onnx.load(model_path)
    _reset_peak()
    baseline = _status_mb("VmRSS")
    started = time.perf_counter()
    result = bnpass.fold_batchnorms(model)
    seconds = time.perf_counter() - started
    peak = _status_mb("VmHWM")
    print(json.dumps({"model_mb": size, "folded": len(result.folded), "pass_baseline_mb": baseline,
                      "pass_peak_mb": peak, "pass_seconds": seconds}))


def cli_fold_worker(model_path: str, output: str) -> None:
    import onnxruntime  # noqa: F401

    import bnpass.cli

    baseline = _status_mb("VmRSS")
    started = time.perf_counter()
    code = bnpass.cli.main([model_path, output, "--fold-only", "-q"])
    print(json.dumps({"code": code, "cli_baseline_mb": baseline, "cli_peak_mb": _status_mb("VmHWM"),
                      "cli_seconds": time.perf_counter() - started}))


def large_model(path: Path, layers: int = 10, channels: int = 512, features: int = 2560) -> None:
    """~25 M parameters: ``layers`` x (Conv 3x3 channels->channels + BN + Relu), then Gemm + BN."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, initializers = [], []

    def add(name, array):
        initializers.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def batchnorm(x, out, name, count):
        params = [add(f"{name}.{p}", v) for p, v in (("scale", rng.uniform(0.5, 1.5, count)),
                                                      ("bias", rng.standard_normal(count)),
                                                      ("mean", rng.standard_normal(count)),
                                                      ("var", rng.uniform(0.5, 2.0, count)))]
        nodes.append(helper.make_node("BatchNormalization", [x, *params], [out], name=name))

    current = "x"
    for layer in range(layers):
        weight = add(f"conv{layer}.weight", rng.standard_normal((channels, channels, 3, 3)) * 0.02)
        bias = add(f"conv{layer}.bias", rng.standard_normal(channels))
        nodes.append(helper.make_node("Conv", [current, weight, bias], [f"conv{layer}"], name=f"conv{layer}",
                                      pads=[1, 1, 1, 1]))
        batchnorm(f"conv{layer}", f"bn{layer}", f"bn{layer}", channels)
        nodes.append(helper.make_node("Relu", [f"bn{layer}"], [f"relu{layer}"], name=f"relu{layer}"))
        current = f"relu{layer}"
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["flat", add("fc.weight", rng.standard_normal((channels, features)) * 0.02)],
                                  ["fc"], name="fc"))
    batchnorm("fc", "y", "bn_fc", features)
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             ["N", channels, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", features])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    onnx.save(model, path)


def measure_fold_memory(workdir: Path) -> dict:
    path = workdir / "large.onnx"
    large_model(path)
    figures = {"params_m": sum(int(np.prod(t.dims)) for t in onnx.load(path).graph.initializer) / 1e6}
    for kind in ("fold", "cli_fold"):
        done = subprocess.run([sys.executable, __file__, "--worker", kind, "--spec",
                               json.dumps({"model": str(path), "out": str(workdir / "large_out.onnx")})],
                              capture_output=True, text=True, check=True)
        figures.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return figures


def measure_memory(method: str, spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", method, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Profile: where the time goes, per operator type
# ------------------------------------------------------------------------------------------------

def profile(case: Case, folder: Path, repeats: int = 5) -> dict:
    """Milliseconds per batch and node count per operator type, for the (a) and (b) sessions.

    The two sessions run alternately on the same batch, so load from other processes hits both.
    """
    feed = case.batches()[0]
    plain = case.plain_session(profile_prefix=str(folder / f"{case.name}_plain"))
    statistics_session = case.statistics_session(profile_prefix=str(folder / f"{case.name}_stats"))
    runs = {"plain": lambda: plain.run(None, feed), "stats": lambda: statistics_session.collect([feed])}
    for run in runs.values():  # warm-up, profiled too: averaged over repeats + 1 runs
        run()
    for _ in range(repeats):
        for run in runs.values():
            run()
    tables = {}
    for kind, session in (("plain", plain), ("stats", statistics_session.session)):
        events = json.loads(Path(session.end_profiling()).read_text())
        per_op = collections.defaultdict(float)
        nodes = collections.defaultdict(set)
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                op = event["args"]["op_name"]
                per_op[op] += event["dur"] / 1000 / (repeats + 1)
                nodes[op].add(event["name"])
        tables[kind] = {op: (ms, len(nodes[op])) for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])}
    return tables


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def machine() -> dict:
    import onnxruntime

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def prepare_cases(args, workdir: Path) -> list:
    specs = []
    common = {"batch_size": args.batch_size, "samples": args.samples, "threads": args.threads,
              "device": args.device, "tf32": args.tf32, "forms": args.forms, "methods": args.methods}
    count = planned_sample_count(args.samples, args.batch_size)
    if args.model:
        data = args.data
        if not data:  # random samples of the model's input shape
            specs_in = model_input_specs(onnx.load(args.model))
            if len(specs_in) != 1 or not all(isinstance(d, int) for d in specs_in[0].shape[1:]):
                raise SystemExit("--model without --data needs one input with fixed dims after the batch")
            data = workdir / "user_calib"
            write_samples(data, count, tuple(specs_in[0].shape[1:]))
        specs.append({"name": Path(args.model).stem, "model": str(args.model), "data": str(data),
                      "out": str(workdir / "user_out.onnx"), **common})
    for name in args.networks:
        net, shape = build_network(name, args.size)
        model_path = workdir / f"{name}.onnx"
        export_network(net, shape, model_path)
        data = workdir / f"{name}_calib"
        write_samples(data, count, shape)
        specs.append({"name": name, "network": name, "size": args.size, "model": str(model_path),
                      "data": str(data), "out": str(workdir / f"{name}_out.onnx"), **common})
    return specs


def describe(spec: dict) -> str:
    model = onnx.load(spec["model"])
    bns = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    specs = model_input_specs(model)
    shape = "x".join(str(d) for d in specs[0].shape[1:]) if specs else "?"
    return f"{bns} BN, {params / 1e6:.1f} M params, input {shape}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an ONNX model with BatchNormalization (optional)")
    parser.add_argument("--data", help="its calibration folder of .npy/.npz files (default: random samples)")
    parser.add_argument("--networks", nargs="*", default=["resnet", "mobilenet"], choices=NETWORKS,
                        help="generated networks to measure (default: resnet mobilenet; give none to skip)")
    parser.add_argument("--size", type=int, help="input height and width of the generated networks "
                                                 "(default: 64 resnet, 96 mobilenet, 224 resnet50)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where onnxruntime and torch run (default: cpu)")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 on in every CUDA session, onnxruntime's and torch's (default: off in all)")
    parser.add_argument("--forms", nargs="*", default=[], choices=FORMS,
                        help="statistics forms to measure besides the provider's own: one (b) row each")
    parser.add_argument("--methods", nargs="*", choices=METHODS,
                        help="measure only these methods (default: all that apply)")
    parser.add_argument("--samples", type=int, default=512, help="calibration samples (default 512)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions; medians reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op threads = torch threads (default: onnxruntime's and torch's own, "
                             "what bnpass runs with unless --threads is given; 1 for one thread)")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    parser.add_argument("--profile", action="store_true", help="add onnxruntime's per-operator profile")
    parser.add_argument("--fold-memory", action="store_true",
                        help="also measure the peak memory of folding a generated 25 M-parameter model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.spec)
        if args.worker == "fold":
            fold_worker(spec["model"], spec["out"])
        elif args.worker == "cli_fold":
            cli_fold_worker(spec["model"], spec["out"])
        else:
            worker(args.worker, spec)
        return 0

    with tempfile.TemporaryDirectory(prefix="bnpass_bench_") as tmp:
        workdir = Path(tmp)
        specs = prepare_cases(args, workdir)
        cases = [Case(spec) for spec in specs]
        for case in cases:  # warm up: sessions, data in memory, torch network
            for method in methods_for(case.spec):
                run_method(case, method)
            case.scoring.clear()  # only the timed runs' split is reported

        times = {case.name: collections.defaultdict(list) for case in cases}
        for repeat in range(args.repeats):
            for case in cases:
                for method in methods_for(case.spec):
                    started = time.perf_counter()
                    run_method(case, method)
                    times[case.name][method].append(time.perf_counter() - started)
            print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)

        memory = {}
        if not args.no_memory:
            for case in cases:
                for method in methods_for(case.spec):
                    if method not in ("floor", "resident") and not method.startswith("stats:"):
                        memory[(case.name, method)] = measure_memory(method, case.spec)

        profiles = {case.name: profile(case, workdir) for case in cases} if args.profile else {}
        fold_memory = measure_fold_memory(workdir) if args.fold_memory else None
        print(report(args, specs, cases, times, memory, profiles, fold_memory))
    return 0


def report(args, specs, cases, times, memory, profiles, fold_memory=None) -> str:
    info = machine()
    provider = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
    gpu = f"; GPU {info['gpu']}" if args.device == "cuda" and "gpu" in info else ""
    precision = (f" TF32 {'on' if args.tf32 else 'off'} in every CUDA session (onnxruntime's use_tf32, "
                 "torch's allow_tf32)." if args.device == "cuda" else "")
    lines = [f"Command: `python tools/bench.py {' '.join(sys.argv[1:])}`".replace("  ", " "), "",
             f"Machine: {info['nproc']} CPUs ({info['cpu']}){gpu}; Python {info['python']}, onnxruntime "
             f"{info['onnxruntime']} ({provider}), onnx {info['onnx']}, numpy {info['numpy']}"
             + (f", torch {info['torch']}" if "torch" in info else "") + ".",
             "Threads: onnxruntime intra-op = torch = " + (
                 str(args.threads) if args.threads is not None else "their defaults (bnpass's: onnxruntime's, one "
                 "per physical core; --threads not given)") + f". Batch {args.batch_size}, "
             f"{planned_sample_count(args.samples, args.batch_size)} samples, median of {args.repeats} "
             f"interleaved repetitions.{precision}", ""]
    for spec in specs:
        lines.append(f"- `{spec['name']}`: {describe(spec)}")
    lines += ["", "| case | method | median s | ms / batch | ms / sample | min s | max s | peak RSS MB | "
                  "over baseline MB |", "|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for case in cases:
        batches = case.batches()
        samples = sum(next(iter(feed.values())).shape[0] for feed in batches)  # what the folder held
        medians = {}
        for method in methods_for(case.spec):
            values = times[case.name][method]
            medians[method] = statistics.median(values)
            mem = memory.get((case.name, method))
            mem_cells = (f"{mem['peak_mb']:.0f} | {mem['peak_mb'] - mem['baseline_mb']:.0f}" if mem else "- | -")
            lines.append(f"| {case.name} | {label(method, case)} | {medians[method]:.2f} | "
                         f"{1000 * medians[method] / len(batches):.1f} | {1000 * medians[method] / samples:.2f} | "
                         f"{min(values):.2f} | {max(values):.2f} | {mem_cells} |")

        def ratio(top, bottom):
            """Ratio of medians; in brackets the median of the per-repetition ratios (each pair
            measured back to back) and the ratio of the fastest runs."""
            paired = statistics.median(t / b for t, b in zip(times[case.name][top], times[case.name][bottom]))
            best = min(times[case.name][top]) / min(times[case.name][bottom])
            return f"{medians[top] / medians[bottom]:.2f} ({paired:.2f} paired, {best:.2f} best)"

        def peak_beside(method):
            """`` (peak RSS 310 MB, plain re-estimation 250 MB)`` where the memory runs were made."""
            mine, plain = memory.get((case.name, method)), memory.get((case.name, "pass"))
            if not mine or not plain:
                return ""
            return f" (peak RSS {mine['peak_mb']:.0f} MB, plain re-estimation {plain['peak_mb']:.0f} MB)"

        parts = []
        stats_methods = [m for m in medians if m == "stats" or m.startswith("stats:")]
        forms = {m: (m.split(":", 1)[1] if ":" in m else case.form) for m in stats_methods}
        if "plain" in medians:
            parts += [f"**b/a {forms[m]} = {ratio(m, 'plain')}**" for m in stats_methods]
            parts += [f"{name} = {ratio(m, 'plain')}" for m, name in
                      (("resident", "r/a"), ("floor", "floor f/a"), ("pass", "(b+)/a"), ("bnpass", "c/a"))
                      if m in medians]
        reduce = next((m for m in stats_methods if forms[m] == "reduce"), None)
        if reduce is not None:
            parts += [f"{forms[m]}/reduce = {ratio(m, reduce)}" for m in stats_methods if m != reduce]
        def split(method):
            """``; first reading 2.91x, scoring 2.25x``: the medians of the run's two readings against (b+)
            (the second reading, which scores every model, timed inside the pass)."""
            scoring = case.scoring.get(method)
            if not scoring or len(scoring) != len(times[case.name][method]):
                return ""
            reading = statistics.median(t - s for t, s in zip(times[case.name][method], scoring))
            return (f": first reading {reading / medians['pass']:.2f}x, scoring "
                    f"{statistics.median(scoring) / medians['pass']:.2f}x")

        for method, name in (("reference", "g/(b+)"), ("fused", "h/(b+)")):
            if method in medians and "pass" in medians:
                parts.append(f"**{name} = {ratio(method, 'pass')}**" + split(method) + peak_beside(method))
        if "torch" in medians and "bnpass" in medians:
            parts.append(f"**c/d = {ratio('bnpass', 'torch')}**")
        if "torch" in medians and "plain" in medians:
            parts.append(f"d/a = {ratio('torch', 'plain')}")
        ratios.append(f"- `{case.name}`: " + "; ".join(parts))
    lines += ["", "Ratios of medians from the same run (in brackets: median of the ratios of runs made back to "
                  "back, and ratio of the fastest runs):", ""] + ratios
    for name, tables in profiles.items():
        lines += ["", f"Profile `{name}` (onnxruntime profiler, ms per batch of {args.batch_size}, kernel time):", "",
                  "| operator | plain ms | plain nodes | calibration ms | calibration nodes |", "|---|---|---|---|---|"]
        ops = list(dict.fromkeys(list(tables["stats"]) + list(tables["plain"])))
        total = {kind: sum(ms for ms, _ in tables[kind].values()) for kind in tables}
        for op in ops:
            plain = tables["plain"].get(op, (0.0, 0))
            stats = tables["stats"].get(op, (0.0, 0))
            if plain[0] + stats[0] < 0.05:
                continue
            lines.append(f"| {op} | {plain[0]:.1f} | {plain[1]} | {stats[0]:.1f} | {stats[1]} |")
        lines.append(f"| **total** | **{total['plain']:.1f}** | | **{total['stats']:.1f}** | |")
    if fold_memory:
        f = fold_memory
        size = f["model_mb"]
        lines += ["", f"Folding a generated {f['params_m']:.1f} M-parameter model ({size:.0f} MB of weights, "
                      f"{f['folded']} BNs folded):", "",
                  f"- `bnpass.fold_batchnorms` alone: peak RSS {f['pass_peak_mb']:.0f} MB, "
                  f"{f['pass_peak_mb'] - f['pass_baseline_mb']:.0f} MB over the RSS with the model loaded "
                  f"({(f['pass_peak_mb'] - f['pass_baseline_mb']) / size:.2f}x the model), {f['pass_seconds']:.2f} s",
                  f"- `bnpass IN OUT --fold-only` (load + check, fold, full check, save): peak RSS "
                  f"{f['cli_peak_mb']:.0f} MB, {f['cli_peak_mb'] - f['cli_baseline_mb']:.0f} MB over the RSS after "
                  f"imports ({(f['cli_peak_mb'] - f['cli_baseline_mb']) / size:.2f}x the model), "
                  f"{f['cli_seconds']:.2f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
