"""``--plot``: the PNG is written whole or not at all, readable, of the stated size, and not blank;
without matplotlib, a one-line error naming the extra to install."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

from bnpass.errors import BnpassError
from bnpass.plot import HEIGHT_PIXELS, WIDTH_PIXELS, _spread, draw_drift, measure_drift, panel_series, plot_drift


@pytest.fixture
def matplotlib():
    """Drawing needs matplotlib (``bnpass[plot]``): without it these tests skip."""
    return pytest.importorskip("matplotlib")


def drifts(count, *, reference, seed=0):
    rng = np.random.default_rng(seed)
    result = []
    for index in range(count):
        channels = 8 + index % 24
        stored_mean, stored_var = rng.standard_normal(channels), np.abs(rng.standard_normal(channels)) + 0.5
        mean = stored_mean + rng.standard_normal(channels) * (0.1 + index / count)
        var = stored_var * np.exp(rng.standard_normal(channels))
        references = (mean + 0.05 * rng.standard_normal(channels), var * 1.1) if reference else (None, None)
        result.append(measure_drift(f"/block{index}/bn/BatchNormalization", 1e-5, stored_mean, stored_var,
                                    mean, var, *references))
    return result


def pixel_spread(path):
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        size = image.size
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    return size, pixels.std()


def band_fraction(path, color):
    """Fraction of pixels in a band's colour: ``color`` drawn at alpha 0.25 on white."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int64)
    band = 255 - 0.25 * (255 - np.array(color))
    return float(np.mean(np.abs(pixels - band).max(axis=-1) <= 3))


def colour_fraction(path, color, tolerance=40):
    """Fraction of pixels close to ``color`` itself (lines and hatching, drawn opaque)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int64)
    return float(np.mean(np.abs(pixels - np.array(color)).max(axis=-1) <= tolerance))


def blank_canvas_spread(tmp_path):
    """The pixel spread of the same-sized figure with nothing drawn on it (its white canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_PIXELS / 100, HEIGHT_PIXELS / 100), dpi=100)
    path = tmp_path / "blank.png"
    FigureCanvasAgg(figure).print_png(str(path))
    return pixel_spread(path)[1]


def test_measure_drift_in_stored_and_reference_units():
    # mean 3 from stored 1 with stored std sqrt(3 + 1) = 2: shift 1; (8 + 1) / (3 + 1) = 2.25.
    drift = measure_drift("bn", 1.0, [1.0], [3.0], [3.0], [8.0], reference_mean=[2.0], reference_var=[0.0])
    np.testing.assert_allclose(drift.mean_shift, [1.0])
    np.testing.assert_allclose(drift.variance_ratio, [2.25])
    np.testing.assert_allclose(drift.reference_mean_shift, [1.0])    # |3 - 2| / sqrt(0 + 1)
    np.testing.assert_allclose(drift.reference_variance_ratio, [9.0])
    assert measure_drift("bn", 1.0, [1.0], [3.0], [3.0], [8.0]).reference_mean_shift is None


@pytest.mark.parametrize("count, reference", [(50, True), (150, True), (3, False)])
def test_writes_a_readable_png_of_the_stated_size_that_is_not_blank(matplotlib, tmp_path, count, reference):
    path = tmp_path / "drift.png"
    plot_drift(drifts(count, reference=reference), path, title="test")
    size, spread = pixel_spread(path)
    assert size == (WIDTH_PIXELS, HEIGHT_PIXELS)
    assert spread > 5 * max(blank_canvas_spread(tmp_path), 1.0)
    # The data are drawn, not only axes and labels: the 10-90% bands cover much of each panel.
    assert band_fraction(path, (31, 119, 180)) > 0.05                              # tab:blue, stored
    assert (colour_fraction(path, (255, 127, 14)) > 0.005) == reference  # tab:orange hatching and dashes, reference
    assert sorted(os.listdir(tmp_path)) == ["blank.png", "drift.png"]   # no temporary file left


def test_zero_scales_and_non_finite_values_leave_gaps_not_errors(matplotlib, tmp_path):
    # epsilon 0 and a stored variance of 0: the shift divides by zero in one channel of one BN; the
    # BN is still drawn from its other channels, and one without any finite value is a gap.
    broken = measure_drift("bn0", 0.0, [0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 2.0, 3.0], [1.0, 0.0, 4.0])
    assert np.isinf(broken.mean_shift[0])
    low, median, high = _spread([broken.mean_shift, np.array([np.nan])], positive=False)
    np.testing.assert_allclose([low[0], median[0], high[0]], [1.1, 1.5, 1.9])
    assert np.isnan(median[1])
    path = tmp_path / "drift.png"
    plot_drift([broken] + drifts(4, reference=False), path)
    assert pixel_spread(path)[0] == (WIDTH_PIXELS, HEIGHT_PIXELS)


def test_a_failed_drawing_leaves_the_existing_file_and_no_partial_one(matplotlib, tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = tmp_path / "drift.png"
    path.write_bytes(b"previous")

    def fail(self, stream, **options):
        stream.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", fail)
    with pytest.raises(OSError, match="disk full"):
        plot_drift(drifts(3, reference=False), path)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["drift.png"]


def test_an_unwritable_folder_is_a_one_line_error(matplotlib, tmp_path):
    path = tmp_path / "missing" / "drift.png"
    with pytest.raises(BnpassError, match=r"cannot write the plot '.*drift.png': No such file or directory$"):
        plot_drift(drifts(2, reference=False), path)


def test_without_matplotlib_a_one_line_error_names_the_extra(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib... raises ImportError
    path = tmp_path / "drift.png"
    with pytest.raises(BnpassError) as raised:
        plot_drift(drifts(2, reference=False), path)
    message = str(raised.value)
    # bnpass is not on PyPI, so 'pip install bnpass[plot]' cannot work: the message names matplotlib
    assert "plotting needs matplotlib" in message and "pip install matplotlib" in message
    assert "\n" not in message and not path.exists()


def test_series_that_coincide_are_drawn_once_and_overlaps_blend_into_no_unlisted_colour(matplotlib, tmp_path):
    """Regression (issue 22, item 8): with the matched statistics kept, the variance ratio of the statistics
    written is the BN input's (v' + e) / (v_r + e) = v_c / v_o; both series were drawn, one hiding the other,
    their translucent bands blending into a colour no legend entry has. Now a panel whose series coincide
    draws one, its legend saying it stands for both; where both are drawn the second is hatched."""
    matched = drifts(6, reference=True)
    for drift in matched:
        drift.reference_variance_ratio = drift.variance_ratio * (1 + 1e-6)
    assert [legend for legend, _ in panel_series(matched, "variance_ratio")] == [
        "statistics written vs stored (units: stored std), the same as BN input, compressed vs uncompressed model "
        "(units: the uncompressed model's std)"]
    assert [name for _, name in panel_series(matched, "mean_shift")] == ["mean_shift", "reference_mean_shift"]
    figure, _ = draw_drift(matched)
    shift_axes, ratio_axes = figure.axes
    assert len(ratio_axes.get_legend().get_texts()) == 2 and len(shift_axes.get_legend().get_texts()) == 4
    assert all("the same as" in text.get_text() for text in ratio_axes.get_legend().get_texts())
    path = tmp_path / "drift.png"
    plot_drift(drifts(50, reference=True), path)
    blue, orange = np.array((31, 119, 180)), np.array((255, 127, 14))
    blended = (255 - 0.25 * (255 - blue)) * 0.75 + 0.25 * orange  # orange at alpha 0.25 over blue at 0.25
    assert band_fraction(path, 4 * blended - 3 * 255) < 1e-3  # band_fraction takes the colour before alpha
