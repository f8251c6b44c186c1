"""The one door to onnxruntime: execution providers and sessions.

``--device auto`` uses CUDA only when the CUDA provider really loads: onnxruntime-gpu lists
CUDAExecutionProvider as available even where the CUDA libraries are missing, and then logs a
page of errors while falling back to CPU. bnpass probes the provider once with onnxruntime's
logging silenced and says what it found in one line.

Sessions run with all of onnxruntime's graph optimizations (``ORT_ENABLE_ALL``): on CPU its
NCHWc layout is what makes convolutions fast, and none of its fusions touches the statistics
nodes of a calibration graph (checked in tests/test_calibration_graph.py).

**TF32.** onnxruntime's CUDA provider runs float32 convolutions and matrix products in TF32
(10-bit mantissa) unless its provider option ``use_tf32`` is 0. bnpass's sessions turn it off
unless ``tf32=True`` is asked for (:func:`session_providers`): with it, statistics measured on an
H200 differed from the CPU's by up to 7.5e-3 (relative variance, ResNet-50; figure from issue 12).

:class:`BatchRunner` runs one session over many batches; on CUDA it feeds them through I/O
bindings, so each batch is copied once into a device buffer that is reused, and only the outputs
(per-channel vectors) are copied back to the host. Two buffer sets alternate: while the session
runs batch k from one, a worker thread copies batch k+1 into the other. What onnxruntime's Python
API does underneath (read in its pybind and CUDA provider sources): ``OrtValue.update_inplace``
is a plain synchronous ``cudaMemcpy`` from pageable host memory on the legacy default stream,
holding the GIL; ``run_with_iobinding`` releases the GIL and runs on the provider's own stream.
Recent sources create that stream non-blocking, so the copy can overlap the compute; where it is
a blocking stream, CUDA serializes the two instead (no overlap, still correct). Either way the
alternation keeps them apart (a buffer is refilled only after the run that read it returned) and
``IOBinding.synchronize_inputs`` (the provider's ``Sync``: ``cudaDeviceSynchronize``) completes
each copy on the device before the run that reads it (a pageable ``cudaMemcpy`` may return before
its DMA ends). Pinned staging buffers would make the copy itself faster, but the Python
``OrtValue`` API refuses the ``cuda_pinned`` device (1.31.1). None of this has been measured on a
GPU by bnpass's developers: on CPU the same code runs in the tests (``device="cpu"``).

**Errors.** Every session bnpass opens (calibration copies, ``--verify``, the ``--reference``
scoring) comes from :func:`create_session`, as a :class:`Session`: whatever onnxruntime raises while
loading it or running it (its ``[ONNXRuntimeError]`` exceptions: an unregistered custom op, an opset
it does not know, a shape a layer cannot take, a CUDA failure) becomes one
:class:`~bnpass.errors.SessionError` line naming the node, parsed out of onnxruntime's message where
it names one, and what onnxruntime said, without its source locations. onnxruntime's own error log
is silenced: the exception says it once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import onnx

from .data import plural
from .errors import BnpassError, RuntimeUnavailableError, SessionError
from .model_io import exceeds_protobuf_limit, write_with_external_data

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# onnxruntime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. A failure reaches bnpass
# as an exception (a SessionError line), so onnxruntime's own error log would only say it twice.
_QUIET = 4


# Distributions that install the module `onnxruntime`: with two of them installed, the module is
# whichever came last, and uninstalling either one leaves it broken.
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                         "onnxruntime-qnn")
NEEDED_ATTRIBUTES = ("InferenceSession", "SessionOptions", "GraphOptimizationLevel", "OrtValue",
                     "get_available_providers", "set_default_logger_severity")
INSTALL_HINT = "pip install onnxruntime-gpu (CUDA and CPU; bnpass's [gpu] extra) or onnxruntime (CPU only)"


def _onnxruntime():
    """The onnxruntime module, checked: a one-line BnpassError with the fix when it is missing or
    broken, a one-line warning (once) when two distributions share it."""
    try:
        import onnxruntime
    except ImportError as error:
        installed = installed_runtimes()
        if not installed:
            raise BnpassError(f"onnxruntime is not installed: {INSTALL_HINT}") from None
        raise BnpassError(f"onnxruntime ({_listed(installed)}) cannot be imported ({error}): reinstall it, e.g. pip "
                          f"install --force-reinstall {next(iter(installed))}") from None
    missing = [name for name in NEEDED_ATTRIBUTES if not hasattr(onnxruntime, name)]
    if missing:
        installed = installed_runtimes()
        raise BnpassError(
            f"the onnxruntime module is broken (it has no {missing[0]}; installed: {_listed(installed) or 'none'}), as "
            "when onnxruntime and onnxruntime-gpu were installed together and one was uninstalled: pip uninstall -y "
            f"{' '.join(installed) or 'onnxruntime onnxruntime-gpu'}, then {INSTALL_HINT}")
    _warn_of_a_clash()
    onnxruntime.set_default_logger_severity(_QUIET)
    return onnxruntime


def installed_runtimes() -> dict:
    """``{distribution: version}`` of the installed distributions that provide the module onnxruntime."""
    import importlib.metadata

    found = {}
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


@functools.lru_cache(maxsize=None)
def _warn_of_a_clash() -> None:
    installed = installed_runtimes()
    if len(installed) > 1:
        keep = "onnxruntime-gpu" if "onnxruntime-gpu" in installed else next(iter(installed))
        logger.warning("%s are installed together and share one module, which uninstalling either breaks: keep one "
                       "(pip uninstall -y %s && pip install %s)", _listed(installed), " ".join(installed), keep)


def _listed(installed: dict) -> str:
    return ", ".join(f"{name} {version}" for name, version in installed.items())


@functools.lru_cache(maxsize=None)
def cuda_unavailable_reason() -> Optional[str]:
    """None when the CUDA provider loads and runs a node, else why it does not."""
    ort = _onnxruntime()
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    if hasattr(ort, "preload_dlls"):
        # Finds the CUDA/cuDNN libraries a PyTorch or nvidia-* wheel install brings; it prints
        # each library it misses, which is noise here: the probe below decides.
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            try:
                ort.preload_dlls()
            except Exception:
                pass
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])], "cuda_probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", 13)])
    probe.ir_version = 7
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)  # the failed provider load is logged at error level
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=[CUDA, CPU])
    except Exception as error:  # onnxruntime raises its own exception types
        return f"the CUDA provider failed to start ({str(error).splitlines()[0]})"
    finally:
        ort.set_default_logger_severity(_QUIET)
    if CUDA not in session.get_providers():
        return "the CUDA provider could not be loaded (CUDA or cuDNN libraries not found)"
    return None


def select_providers(device: str) -> list:
    """The provider list for ``device`` (auto, cpu or cuda), after checking CUDA really works."""
    if device not in DEVICES:
        raise BnpassError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    _onnxruntime()  # a missing or broken onnxruntime is said before any work
    if device == "cpu":
        return [CPU]
    reason = cuda_unavailable_reason()
    if reason is None:
        return [CUDA, CPU]
    if device == "cuda":
        raise RuntimeUnavailableError(device, reason)
    # Where no GPU is visible the fallback is what anyone expects: said only with -v (debug).
    _say_once(f"using CPU: {reason}", logging.INFO if gpu_present() else logging.DEBUG)
    return [CPU]


def gpu_present() -> bool:
    """Whether this machine shows an NVIDIA GPU to this process: a device node or nvidia-smi, and
    ``CUDA_VISIBLE_DEVICES`` not set to hide every device (empty or -1). Cheap; no CUDA call."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


@functools.lru_cache(maxsize=None)
def _say_once(message: str, level: int = logging.INFO) -> None:
    logger.log(level, "%s", message)


def session_providers(providers: list, *, tf32: bool = False) -> list:
    """What ``onnxruntime.InferenceSession`` gets for ``providers`` (names from
    :func:`select_providers`): the CUDA provider with ``use_tf32`` set ("0" unless ``tf32``)."""
    return [(name, {"use_tf32": "1" if tf32 else "0"}) if name == CUDA else name for name in providers]


# onnxruntime's intra-op threads spin-wait for the next run after each one (its default
# ``session.intra_op.allow_spinning`` = 1), holding every core they have. Where several sessions take
# turns on every batch, each has its own pool, and the pools not running spin against the one that is;
# a session that runs alone spins against bnpass's data-loading thread. On 2 cores (issue 23),
# --reference on 12,800 samples took 51 s at default threads and 10 s with --threads 1; plain
# re-estimation 3.2-3.6 s spinning, 1.6-2.0 s not, 2.5-2.7 s with one thread. bnpass's sessions do not spin.
NO_SPINNING = ("session.intra_op.allow_spinning", "0")


def create_session(model: Union[onnx.ModelProto, bytes], providers: list, *, optimize: bool = True,
                   threads: Optional[int] = None, memory_pattern: bool = True,
                   profile_prefix: Optional[str] = None, tf32: bool = False, spinning: bool = False):
    """An InferenceSession for ``model`` (a ModelProto, or one already serialized).

    ``providers`` are provider names (:func:`select_providers`). ``optimize=False`` disables
    graph optimizations; ``threads`` sets onnxruntime's intra-op thread count (None: onnxruntime's
    default, one per physical core); ``memory_pattern=False`` turns off onnxruntime's pre-planned
    activation block (calibration graphs keep more tensors alive than the model, and the planned
    block then costs ~160 MB more peak memory on the MobileNet benchmark, for no speed);
    ``profile_prefix`` turns on onnxruntime's profiler (``session.end_profiling()`` returns the
    JSON file); ``tf32=True`` lets the CUDA provider compute float32 convolutions and matrix
    products in TF32 (off by default; no effect on CPU); ``spinning=True`` lets the intra-op threads
    spin-wait between runs, as onnxruntime does by default (off: :data:`NO_SPINNING` says why). Two
    sessions whose outputs are compared (``--verify``) should be made with the same ``providers``,
    ``optimize`` and ``tf32``.
    """
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = _QUIET
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be positive, not {threads}")
        options.intra_op_num_threads = threads
    if not memory_pattern:
        options.enable_mem_pattern = False
    if not spinning:
        options.add_session_config_entry(*NO_SPINNING)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = session_providers(providers, tf32=tf32)
    nodes = NodeIndex.of(model)
    with _onnxruntime_errors(nodes, "cannot load the model"):
        if isinstance(model, onnx.ModelProto) and exceeds_protobuf_limit(model):
            # Over 2 GiB a model cannot be passed as one protobuf: onnxruntime reads it from files.
            with tempfile.TemporaryDirectory(prefix="bnpass-session-") as folder:
                path = os.path.join(folder, "model.onnx")
                write_with_external_data(model, path, "model.onnx.data")
                return Session(ort.InferenceSession(path, options, providers=providers), nodes)
        serialized = model if isinstance(model, bytes) else model.SerializeToString()
        return Session(ort.InferenceSession(serialized, options, providers=providers), nodes)


class NodeIndex:
    """The nodes of a session's model that an onnxruntime message can point at: by name, by output
    and by operator. onnxruntime names the nodes its optimizers make after an original's name or
    output (``c_nchwc``: the Conv writing ``c`` in its NCHWc layout; a Conv fused with the BN after it
    is named after the BN's output). Top-level nodes only; empty for a serialized model."""

    def __init__(self, nodes: Iterable = ()):
        self.operator = {}   # node name -> "Conv" or "custom.ops:MyPlugin"
        self.inputs = {}     # node name -> the tensors it reads
        self.producer = {}   # tensor name -> node name
        self.by_operator = {}  # operator -> node names
        for node in nodes:
            operator = f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            self.operator.setdefault(node.name, operator)
            self.inputs.setdefault(node.name, list(node.input))
            for output in node.output:
                self.producer[output] = node.name
            self.by_operator.setdefault(operator, []).append(node.name)

    @classmethod
    def of(cls, model) -> NodeIndex:
        return cls(model.graph.node if isinstance(model, onnx.ModelProto) else ())

    def resolve(self, name: str, operator: Optional[str] = None) -> str:
        """The model's node that onnxruntime's ``name`` (running ``operator``) stands for: itself; else
        the node whose name or output it extends, or the nearest ``operator`` node feeding that one (a
        fusion); else the model's only ``operator`` node; else ``name`` as onnxruntime gave it."""
        if name in self.operator:
            return name
        stems = [(stem, stem) for stem in self.operator] + list(self.producer.items())
        extended = sorted(((len(stem), node) for stem, node in stems if stem and name.startswith(stem + "_")),
                          reverse=True)
        for _, node in extended:
            found = self._upstream(node, operator)
            if found is not None:
                return found
        only = self.by_operator.get(operator, [])
        return only[0] if len(only) == 1 else name

    def _upstream(self, node: str, operator: Optional[str], depth: int = 4) -> Optional[str]:
        """``node`` when it runs ``operator`` (or none is asked), else the nearest such node feeding it."""
        if operator is None or self.operator.get(node) == operator:
            return node
        if depth == 0:
            return None
        for tensor in self.inputs.get(node, ()):
            producer = self.producer.get(tensor)
            found = self._upstream(producer, operator, depth - 1) if producer is not None else None
            if found is not None:
                return found
        return None

    def describe(self, name: Optional[str], operator: Optional[str]) -> str:
        """``node 'conv1' (Conv)``, or ``node 'p' (custom.ops:MyPlugin) and 2 more such nodes``."""
        if name is None and operator is not None:
            names = self.by_operator.get(operator) or self.by_operator.get(operator.split(":")[-1]) or []
            if not names:
                return f"a {operator} node"
            name = names[0]
            more = f" and {plural(len(names) - 1, 'more such node')}" if len(names) > 1 else ""
            return f"node '{name}' ({self.operator.get(name, operator)}){more}"
        name = self.resolve(name, operator)
        operator = self.operator.get(name, operator)
        return f"node '{name}'" + (f" ({operator})" if operator else "")


# How onnxruntime names the node in its messages: (pattern, whether the first group is a node name or
# an operator, the group holding the operator or None). Tried in order; the first that matches wins.
_NODE_IN_MESSAGE = (
    (re.compile(r"running (?P<operator>[\w.:]+) node\. Name:'(?P<name>[^']*)'"), "name"),
    (re.compile(r"In Node, \(\"(?P<name>[^\"]*)\", (?P<operator>[\w.]+), \"(?P<domain>[^\"]*)\""), "name"),
    (re.compile(r"Node \((?P<name>[^)]*)\) Op \((?P<operator>[\w.]+)\)"), "name"),
    (re.compile(r"Node:(?P<name>\S+) "), "name"),
    (re.compile(r"(?P<operator>[\w.]+:\w+)\(-?\d+\) is not a registered function/op"), "operator"),
    (re.compile(r"No Op registered for (?P<operator>\w+)"), "operator"),
)
# What is not for users: the error code, C++ source locations with the function signature after them,
# the "Non-zero status" frame around a kernel's own message, and the node tuple of "invalid model".
_NOISE = (
    re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : "),
    re.compile(r"\S+\.(?:h|cc|cpp|cu|cuh|hpp|c):\d+ (?:[\w:<>,&*~ ]*?\((?:[^()]|\([^()]*\))*\)(?: const)? )?"),
    re.compile(r"Non-zero status code returned while running \S+ node\. Name:'[^']*' Status Message: "),
    re.compile(r"This is an invalid model\. In Node, .*? , Error "),
    re.compile(r"^Fatal error: "),
)


def _is_onnxruntime_error(error: BaseException) -> bool:
    """An exception onnxruntime raised: its ``[ONNXRuntimeError]`` types live in its own modules."""
    return type(error).__module__.startswith("onnxruntime")


def session_error(error: BaseException, nodes: NodeIndex, action: str, feed: Optional[dict] = None) -> SessionError:
    """The one line for what onnxruntime raised: ``onnxruntime <action>[ on a batch of ...]: <node>:
    <what it said>``."""
    said = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    name = operator = None
    for pattern, _ in _NODE_IN_MESSAGE:
        found = pattern.search(said)
        if found:
            groups = found.groupdict()
            name, operator = groups.get("name"), groups.get("operator")
            if groups.get("domain") not in (None, "", "ai.onnx"):
                operator = f"{groups['domain']}:{operator}"
            break
    detail = said
    for noise in _NOISE:
        detail = noise.sub("", detail)
    detail = detail.strip() or said
    where = f" on a batch of {_describe_feed(feed)}" if feed else ""
    node = nodes.describe(name, operator) if name is not None or operator is not None else None
    message = f"onnxruntime {action}{where}: " + (f"{node}: " if node else "") + detail
    return SessionError(message, node=nodes.resolve(name, operator) if name is not None else None, detail=detail)


def _describe_feed(feed: dict) -> str:
    return ", ".join(f"'{name}' {getattr(value, 'dtype', '?')}{list(getattr(value, 'shape', ()))}"
                     for name, value in feed.items())


@contextlib.contextmanager
def _onnxruntime_errors(nodes: NodeIndex, action: str, feed: Optional[dict] = None):
    """Turns what onnxruntime raises inside into a :class:`SessionError`; everything else passes."""
    try:
        yield
    except Exception as error:
        if not _is_onnxruntime_error(error):
            raise
        raise session_error(error, nodes, action, feed) from None


class Session:
    """An onnxruntime ``InferenceSession`` (:func:`create_session` makes them) whose failures speak to
    users: ``run`` and ``run_with_iobinding`` raise a :class:`SessionError` for anything onnxruntime
    raises. Everything else (``get_outputs``, ``io_binding``, ``get_providers``...) is the session's."""

    def __init__(self, session, nodes: NodeIndex):
        self.session = session
        self.nodes = nodes

    def run(self, output_names, feed: dict, *args, **kwargs):
        with _onnxruntime_errors(self.nodes, "failed", feed):
            return self.session.run(output_names, feed, *args, **kwargs)

    def run_with_iobinding(self, binding, *args, **kwargs):
        with _onnxruntime_errors(self.nodes, "failed"):
            return self.session.run_with_iobinding(binding, *args, **kwargs)

    def failures(self, feed: Optional[dict] = None):
        """A context in which onnxruntime's exceptions (device copies, bindings) become SessionErrors."""
        return _onnxruntime_errors(self.nodes, "failed", feed)

    def __getattr__(self, name: str):
        return getattr(self.session, name)


class BatchRunner:
    """Runs ``session`` on one feed after another and returns ``output_names`` as numpy arrays.

    On CPU this is ``session.run``. When the session runs on CUDA (or when ``device`` names a
    device explicitly: ``"cpu"`` exercises the same path in tests), inputs go through two I/O
    bindings, each with its own input buffers on the device, used in turn: while the session runs
    one batch, a worker thread copies the next into the other buffers (the module docstring says
    why this is safe). A buffer is refilled in place while the batch shape stays the same (no
    allocation); the outputs are bound to host memory, anew for every batch (their shape may follow
    the batch's), so what crosses back is only the tensors the caller asked for.
    """

    SLOTS = 2

    def __init__(self, session, output_names: list, *, device: Optional[str] = None):
        self.session = session
        self.output_names = list(output_names)
        if device is None:
            device = "cuda" if CUDA in session.get_providers() else None
        self.device = device
        failures = getattr(session, "failures", None)  # a Session; a bare InferenceSession in some tests
        self._failures = failures if failures is not None else (lambda feed=None: contextlib.nullcontext())
        self._bindings: list = []
        self._buffers: list = []   # per slot: input name -> (shape and dtype, OrtValue, host array it may share)
        if device is not None:
            for _ in range(self.SLOTS):
                self._bindings.append(session.io_binding())  # outputs bound per batch (``_fill``)
                self._buffers.append({})

    def run(self, feed: dict) -> list:
        """The outputs for one feed."""
        for _, values in self.run_all([feed]):
            return values
        raise AssertionError("unreachable: one feed gives one result")

    def run_all(self, feeds: Iterable) -> Iterator[tuple]:
        """``(feed, outputs)`` for each feed, in order; on a device, feed k+1 is copied while k runs.

        ``feeds`` is read from the worker thread (one item ahead); an exception raised while
        reading it reaches the caller here. Leaving the loop early waits for the copy in flight.
        """
        if self.device is None:
            for feed in feeds:
                yield feed, self.session.run(self.output_names, feed)
            return
        feeds = iter(feeds)

        def stage(slot: int):
            feed = next(feeds, None)
            if feed is not None:
                self._fill(slot, feed)
            return feed

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bnpass-device-copy") as copier:
            slot = 0
            pending = copier.submit(stage, slot)
            while True:
                with self._failures():  # the copy into the device buffer
                    feed = pending.result()
                if feed is None:
                    return
                binding = self._bindings[slot]
                with self._failures(feed):
                    binding.synchronize_inputs()  # this slot's copy has reached the device
                    pending = copier.submit(stage, 1 - slot)  # the next copy overlaps this run
                    self.session.run_with_iobinding(binding)
                    binding.synchronize_outputs()
                    outputs = binding.copy_outputs_to_cpu()
                yield feed, outputs
                slot = 1 - slot

    def _fill(self, slot: int, feed: dict) -> None:
        """Copy ``feed`` into the input buffers of ``slot`` (new buffers when a shape changes)."""
        ort = _onnxruntime()
        buffers, binding = self._buffers[slot], self._bindings[slot]
        for name, array in feed.items():
            array = np.ascontiguousarray(array)
            key = (array.shape, array.dtype)
            buffer = buffers.get(name)
            if buffer is not None and buffer[0] == key:
                buffer[1].update_inplace(array)
            else:  # first batch, or a new shape (the short last batch): a new device buffer
                # A CPU OrtValue would share the caller's array, which update_inplace would then
                # overwrite: own a copy. (Production CPU runs use session.run; this is for tests.)
                source = array.copy() if self.device == "cpu" else None
                value = ort.OrtValue.ortvalue_from_numpy(array if source is None else source, self.device, 0)
                buffers[name] = (key, value, source)
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:  # else the last run's outputs are reused, at their shape: a short last
            binding.bind_output(name, "cpu")  # batch, or a shape that follows the data, would be refused


def session_device(session) -> str:
    return "CUDA" if CUDA in session.get_providers() else "CPU"
