"""``--plot FILE.png`` (``.svg``, ``.pdf``): how far each BN's statistics drifted, per BN in graph order.

For each BN, per channel, with (mu_r, v_r) its stored statistics, e its epsilon and (mu, v) the
statistics bnpass wrote (with ``--reference``, those of the kept candidate, named in the title):

- **mean shift** ``|mu - mu_r| / sqrt(v_r + e)``: how far the mean moved, in units of the stored
  standard deviation (the BN's own scale), so BNs of any magnitude share one axis;
- **variance ratio** ``(v + e) / (v_r + e)``: how much the BN's divisor changed, squared (log
  scale). e is added on both sides, as the BN adds it: the ratio is what changes the output, and
  stays finite for channels whose variance is 0 (:func:`bnpass.stats.drift`).

With a reference model, a second series compares activations rather than statistics: the mean and
variance (m, v) of the BN's input in the compressed model (upstream BNs as kept) against those of
the uncompressed model's (m_o, v_o), in the uncompressed model's own units: ``|m - m_o| / sqrt(v_o +
e)`` and ``(v + e) / (v_o + e)``. Stale stored statistics show in the first series; what
compression did to the activations, in the second.

Each panel draws, per BN, the median over channels (line) and the 10-90% range over channels
(band): readable with 50 BNs and with 150. The first series' band is filled, the second's hatched
(never two translucent fills, whose overlap would show a colour that is in no legend entry), its
median dashed. Where, in a panel, the two series are the same for every channel (to
:data:`SAME`, relative: invisible at this size), as the variance ratios are when the matched
statistics are kept (v' + e) / (v_r + e) = v_c / v_o, only one is drawn, and its legend entry says
that it stands for both.

Models without BN (``--reference`` corrects their layers instead): the same two panels, per corrected
layer in graph order, for its output against the uncompressed model's, in the uncompressed model's
units: before its correction (earlier layers corrected) and as kept (:func:`bnpass.report.layer_drifts`).

The figure is 1600 x 900 pixels (16 x 9 inches at 100
dpi), drawn with matplotlib (no display, no pyplot state) in the format the file name says: PNG,
SVG or PDF (:data:`FORMATS`; any other name is refused, never written in another format). It is
written atomically: a temporary file in the same folder, renamed into place, so no partial file is
ever left at the path. matplotlib is optional: ``pip install matplotlib`` (the ``[plot]`` extra).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .errors import BnpassError
from .model_io import write_bytes_atomically
from .stats import drift

WIDTH_PIXELS, HEIGHT_PIXELS, DPI = 1600, 900, 100
LABELED_TICKS = 40          # at most this many BN names on the x axis
HORIZONTAL_TICKS = 12       # up to this many, written level; more, at 45 degrees
SPREAD = (10, 90)           # percentiles of the band
FORMATS = ("png", "svg", "pdf")  # what the file name's suffix may say
SAME = 1e-3                 # two series within this relative difference on every channel are drawn once
BATCHNORM_SERIES = ("statistics written vs stored (units: stored std)",
                    "BN input, compressed vs uncompressed model (units: the uncompressed model's std)")
LAYER_SERIES = ("layer output as kept vs the uncompressed model's (units: its std)",
                "layer output before its correction, earlier layers corrected, vs the uncompressed model's")


@dataclass
class BatchNormDrift:
    """Per-channel drift of one BN (see the module docstring); reference_* None without a reference."""

    label: str
    mean_shift: np.ndarray
    variance_ratio: np.ndarray
    reference_mean_shift: Optional[np.ndarray] = None
    reference_variance_ratio: Optional[np.ndarray] = None


def measure_drift(label: str, epsilon: float, stored_mean, stored_var, mean, var, reference_mean=None,
                  reference_var=None, input_mean=None, input_var=None) -> BatchNormDrift:
    """The drift of the written ``(mean, var)`` from the stored statistics and, with a reference, of the
    compressed model's BN input moments (``input_*``; default: the written statistics, which they are
    for re-estimation) from the reference's (a zero scale plots as a gap)."""
    result = BatchNormDrift(label, *drift(mean, var, stored_mean, stored_var, epsilon))
    if reference_mean is not None:
        input_mean, input_var = (mean, var) if input_mean is None else (input_mean, input_var)
        result.reference_mean_shift, result.reference_variance_ratio = drift(
            input_mean, input_var, reference_mean, reference_var, epsilon)
    return result


def plot_format(path) -> str:
    """The picture format ``path``'s suffix names (one of :data:`FORMATS`), or a BnpassError."""
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if suffix not in FORMATS:
        raise BnpassError(f"--plot '{os.fspath(path)}': name the picture " + ", ".join(
            f".{name}" for name in FORMATS[:-1]) + f" or .{FORMATS[-1]} (the format it is written in)")
    return suffix


def plot_drift(drifts: Sequence[BatchNormDrift], path, *, title: Optional[str] = None) -> None:
    """Draw ``drifts`` (one per BN, in graph order) into ``path`` (PNG, SVG or PDF, by its suffix), atomically."""
    content = render_drift(drifts, plot_format(path), title=title)
    write_bytes_atomically(path, content, what="the plot")


def panel_series(drifts: Sequence[BatchNormDrift], field: str, legends: tuple = BATCHNORM_SERIES) -> list:
    """What one panel draws (``field``: "mean_shift" or "variance_ratio"): ``[(legend, field name)]``, the
    second series only where there is one and it differs from the first (module docstring)."""
    series = [(legends[0], field)]
    second = "reference_" + field
    if not any(getattr(drift, second) is not None for drift in drifts):
        return series
    if all(_same(getattr(drift, field), getattr(drift, second)) for drift in drifts):
        return [(f"{legends[0]}, the same as {legends[1]}", field)]
    return series + [(legends[1], second)]


def _same(first, second) -> bool:
    if first is None or second is None:
        return first is second
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    return first.shape == second.shape and bool(np.allclose(first, second, rtol=SAME, atol=0, equal_nan=True))


def render_drift(drifts: Sequence[BatchNormDrift], file_format: str = "png", *, title: Optional[str] = None,
                 legends: tuple = BATCHNORM_SERIES, subject: str = "BatchNormalization nodes") -> bytes:
    """The picture of ``drifts`` (see the module docstring) as the bytes of a ``file_format`` file;
    ``legends`` name the two series, ``subject`` what the x axis counts."""
    figure, canvas = draw_drift(drifts, title=title, legends=legends, subject=subject)
    buffer = io.BytesIO()
    if file_format == "png":
        canvas.print_png(buffer)
    else:  # the Agg canvas hands SVG and PDF to matplotlib's vector backends
        canvas.print_figure(buffer, format=file_format, dpi=DPI)
    return buffer.getvalue()


def draw_drift(drifts: Sequence[BatchNormDrift], *, title: Optional[str] = None, legends: tuple = BATCHNORM_SERIES,
               subject: str = "BatchNormalization nodes"):
    """``(figure, canvas)``: the matplotlib figure of ``drifts``, drawn, not yet written."""
    if not drifts:
        raise ValueError("nothing to plot: no BatchNormalization drift was given")
    figure_class, canvas_class = require_matplotlib()
    figure = figure_class(figsize=(WIDTH_PIXELS / DPI, HEIGHT_PIXELS / DPI), dpi=DPI, layout="constrained")
    canvas = canvas_class(figure)
    shift_axes, ratio_axes = figure.subplots(2, 1, sharex=True)
    positions = np.arange(len(drifts))
    colors = ("tab:blue", "tab:orange")
    for axes, field in ((shift_axes, "mean_shift"), (ratio_axes, "variance_ratio")):
        for number, (legend, name) in enumerate(panel_series(drifts, field, legends)):
            low, median, high = _spread([getattr(drift, name) for drift in drifts], positive=axes is ratio_axes)
            band = dict(color=colors[number], alpha=0.25, linewidth=0) if number == 0 else dict(
                facecolor="none", edgecolor=colors[number], hatch="///", linewidth=0)
            axes.fill_between(positions, low, high, label=f"{legend}: {SPREAD[0]}-{SPREAD[1]}% of channels", **band)
            axes.plot(positions, median, color=colors[number], linewidth=1.5, linestyle="-" if number == 0 else "--",
                      marker="." if len(drifts) <= 60 else None, label=f"{legend}: median")

    shift_axes.set_yscale("symlog", linthresh=0.1)
    shift_axes.set_ylim(bottom=0)
    shift_axes.axhline(0, color="gray", linewidth=0.8)
    shift_axes.set_ylabel("|mean shift| in standard deviations\n|m - m_base| / sqrt(v_base + e)")
    ratio_axes.set_yscale("log")
    ratio_axes.axhline(1, color="gray", linewidth=0.8)
    ratio_axes.set_ylabel("variance ratio\n(v + e) / (v_base + e)")
    for axes in (shift_axes, ratio_axes):
        axes.legend(loc="best", fontsize="small", ncols=1, framealpha=0.8)
    plain = _plain_number_formatter()
    for axes in (shift_axes, ratio_axes):
        axes.grid(True, which="major", alpha=0.3)
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(plain if axes is ratio_axes else _no_label_formatter())
        axes.tick_params(axis="y", labelsize="medium")
    step = max(1, math.ceil(len(drifts) / LABELED_TICKS))
    ticks = positions[::step]
    labels = _tick_labels([drift.label for drift in drifts])
    horizontal = len(ticks) <= HORIZONTAL_TICKS
    ratio_axes.set_xticks(ticks, [f"{index} {labels[index]}" for index in ticks], rotation=0 if horizontal else 45,
                          ha="center" if horizontal else "right", rotation_mode="anchor", fontsize="medium")
    ratio_axes.set_xlim(-0.5, len(drifts) - 0.5)
    ratio_axes.set_xlabel(f"{subject} in graph order ({len(drifts)}"
                          + (f"; names shown for 1 in {step})" if step > 1 else ")"))
    figure.suptitle(title or "drift of BatchNormalization statistics per node")
    return figure, canvas


def _plain_number_formatter():
    """Tick labels as plain numbers (0.3, 1, 20), not powers of ten."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


def _no_label_formatter():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def require_matplotlib():
    """matplotlib's Figure and Agg canvas classes, or a BnpassError saying how to install it (the CLI
    asks before any compute, so a run never ends without the picture it was asked for)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise BnpassError(f"plotting needs matplotlib, which cannot be imported ({error}): "
                          "pip install matplotlib (bnpass's [plot] extra)") from error
    return Figure, FigureCanvasAgg


def _spread(per_bn: list, *, positive: bool):
    """Per BN: the low percentile, median and high percentile over its finite channel values."""
    rows = []
    for values in per_bn:
        values = np.asarray(values, np.float64).reshape(-1) if values is not None else np.empty(0)
        values = values[np.isfinite(values) & ((values > 0) if positive else True)]
        rows.append(np.percentile(values, [SPREAD[0], 50, SPREAD[1]]) if values.size else [np.nan] * 3)
    return np.asarray(rows, np.float64).T


def _tick_labels(labels: list, width: int = 28) -> list:
    """Labels without the suffix they all share (exporters end every BN name with
    ``/BatchNormalization``), then their last ``width`` characters."""
    suffix = os.path.commonprefix([label[::-1] for label in labels])[::-1] if len(labels) > 1 else ""
    if suffix and all(len(label) > len(suffix) for label in labels):
        labels = [label[:-len(suffix)] for label in labels]
    return [label if len(label) <= width else "..." + label[-(width - 3):] for label in labels]
