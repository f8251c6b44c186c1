"""How batches travel from the data to onnxruntime: cut to a size a model fixes, read ahead in a
thread, and run through a session, the next batch copied to the device while one runs.

A batch (a *feed*) is a dict ``{input name: array}`` whose arrays share their first dimension.
Every session that calibrates takes its batches through :func:`feed_each`, the one feeding loop:
a first session's runner (:class:`bnpass.runtime.BatchRunner`) runs each feed, and a ``step``
does what the caller wants with the outputs (merge moments, run further sessions on the same
feed). For example, with a plain onnxruntime session on the CPU::

    import numpy as np, onnx, onnxruntime
    from onnx import helper
    from bnpass.feeding import batches_of, feed_each, prefetched
    from bnpass.runtime import BatchRunner

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 10
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    data = [{"x": np.ones((5, 2), np.float32)}, {"x": -np.ones((3, 2), np.float32)}]
    sums = []
    feed_each(prefetched(batches_of(data, 4)), BatchRunner(session, ["y"]),
              lambda feed, outputs: sums.append(float(outputs[0].sum())))
    assert sums == [8.0]  # one piece of exactly 4 samples; the other 4 are dropped, with a warning

Nothing here counts or decides a batch size: the calibration run does
(:class:`bnpass.passes.calibration_run.CalibrationRun`).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterable, Iterator, Optional

logger = logging.getLogger(__name__)


def batch_length(feed: dict) -> int:
    """How many samples ``feed`` holds."""
    return next(iter(feed.values())).shape[0]


def batches_of(feeds: Iterable, size: Optional[int]) -> Iterator[dict]:
    """``feeds`` as they are (``size`` None), else cut into pieces of exactly ``size`` samples; what is
    left over (the short last batch) is dropped, with one warning."""
    dropped = 0
    try:
        for feed in feeds:
            count = batch_length(feed)
            if size is None:
                yield feed
                continue
            for start in range(0, count - size + 1, size):
                yield feed if count == size else {name: array[start:start + size] for name, array in feed.items()}
            dropped += count % size
    finally:
        if dropped:
            logger.warning("dropped the last %d samples: the model's fixed batch size is %d", dropped, size)


def prefetched(items: Iterable, depth: int = 2):
    """Yield ``items``, produced in a background thread up to ``depth`` items ahead.

    An exception raised while producing an item is re-raised here, in the consumer's thread,
    when that item would have come. Closing the generator (or leaving a ``for`` loop over it)
    stops the thread and waits for it, so the source is never read after this returns.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((end, None))
        except BaseException as error:  # handed over to the consumer, raised there
            offer((None, error))

    thread = threading.Thread(target=produce, name="bnpass-calibration-data", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def feed_each(feeds: Iterable, runner, step: Callable[[dict, list], None]) -> None:
    """Run every feed through ``runner`` (a :class:`~bnpass.runtime.BatchRunner`; on a device the next
    feed is copied while one runs) and call ``step(feed, outputs)`` on each, in order.

    The feeds are taken as they come: cut and counted by whoever made them. However the loop ends
    (the last feed, or an error in ``step`` or in the data), the copy in flight is waited for and
    ``feeds`` is closed, so a prefetching generator has stopped its thread when this returns.
    """
    feeds = iter(feeds)
    results = runner.run_all(feeds)
    try:
        for feed, outputs in results:
            step(feed, outputs)
    finally:
        results.close()  # waits for a copy in flight, which reads ``feeds``
        close = getattr(feeds, "close", None)
        if close is not None:
            close()  # a prefetching generator stops its loading thread
