"""Sanity checks on fresh statistics: signs that the calibration data was preprocessed wrongly.

The first BatchNormalization nodes of a network see the model input through one layer only (a
Conv, Gemm or MatMul, maybe with a bias Add, behind nothing but casts, transposes and constant
elementwise arithmetic). Compressing that one layer (pruning, quantizing its weights) moves the
statistics of its output only a little: magnitude pruning removes the small weights, which carry
little of the output's variance, and quantization adds noise far below the signal. Mistakes in
the preprocessing move them a lot: images left in 0..255 where the model expects 0..1 multiply the
variance by 65,025; ImageNet normalization forgotten, or given in 0..255 units while scaling to
0..1, divides it by ~20 to ~10^5.

So when, at a first BN, the median over channels of the ratio of the new standard deviation to the
stored one is outside [1/STD_RATIO_LIMIT, STD_RATIO_LIMIT], or the median shift of the mean exceeds
MEAN_SHIFT_LIMIT stored standard deviations, :func:`preprocessing_warning` returns one line naming
the BN, the figure and the likely cause. Measured on a model trained for ImageNet-normalized
input (tests/test_diagnostics.py, 32x32 images): correctly preprocessed, with the first layer pruned
by 50-90% or quantized to int8/int4, the ratio stayed within 0.78-1.03 and the shift below 0.04;
the mistakes gave ratios of 0.2-0.3 (no normalization) and 200-330 (no scaling), or a shift of 2
(mean/std in 0..255 units while scaling to [0, 1]: the input is almost constant, and zero padding
at the borders keeps the spread from collapsing on small images). Medians over channels keep a
few dead (pruned) channels from raising it. Stored statistics that are all 0 and 1 (a model never
trained) say nothing and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx

from .graph import DEFAULT_DOMAINS, GraphIndex, attribute, node_label
from .stats import drift

STD_RATIO_LIMIT = 3.0     # x3 in standard deviation is x9 in variance
MEAN_SHIFT_LIMIT = 1.5    # in stored standard deviations
LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PASS_THROUGH = ("Identity", "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
CONSTANT_ARITHMETIC = ("Add", "Sub", "Mul", "Div")


@dataclass(frozen=True)
class InputShift:
    """How far a first BN's new statistics are from its stored ones (medians over channels)."""

    bn: str
    std_ratio: float    # new std / stored std
    mean_shift: float   # |new mean - stored mean| / stored std


def first_batchnorms(model: onnx.ModelProto, index: Optional[GraphIndex] = None) -> list:
    """The BN nodes that see a graph input through exactly one layer (see the module docstring)."""
    index = index or GraphIndex(model)
    inputs = {value.name for value in index.real_inputs()}
    found = []
    for bn in (node for node in model.graph.node if node.op_type == "BatchNormalization"):
        layers, name = 0, bn.input[0]
        while name not in inputs and layers <= 1:
            node = index.producers.get(name)
            if node is None or node.domain not in DEFAULT_DOMAINS:
                break
            if node.op_type in LAYERS:
                layers += 1
                name = node.input[0]
            elif node.op_type in PASS_THROUGH:
                name = node.input[0]
            elif node.op_type in CONSTANT_ARITHMETIC and len(node.input) == 2:
                constants = [index.constant(operand) is not None for operand in node.input]
                if constants.count(True) != 1:
                    break
                name = node.input[constants.index(False)]
            else:
                break
        if name in inputs and layers == 1:
            found.append(bn)
    return found


def input_shift(bn: onnx.NodeProto, old_mean, old_var, new_mean, new_var) -> Optional[InputShift]:
    """The medians of :class:`InputShift` for one BN, or None when its stored statistics say nothing."""
    if np.all(np.asarray(old_mean) == 0) and np.all(np.asarray(old_var) == 1):
        return None
    shift, variance_ratio = drift(new_mean, new_var, old_mean, old_var, float(attribute(bn, "epsilon", 1e-5)))
    with np.errstate(all="ignore"):
        return InputShift(bn=node_label(bn), std_ratio=float(np.median(np.sqrt(variance_ratio))),
                          mean_shift=float(np.median(shift)))


IMAGENET_OPTIONS = "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
UNLIKE_DATA = ("the stored statistics may not come from data like these (a model never trained, or trained on "
               "other data)")


def preprocessing_warning(shifts: list, *, images) -> Optional[str]:
    """One line when a first BN's input moved further than compression explains, else None.

    ``images``: the data came from image files: their resolved preprocessing
    (:class:`bnpass.images.Preprocessing`), or True when it is not known; then the likely causes can
    name the image options, and leave out those the user already gave. Falsy for arrays.
    """
    for shift in shifts:
        if shift is None or not (np.isfinite(shift.std_ratio) and np.isfinite(shift.mean_shift)):
            continue
        where = f"the first BatchNormalization ('{shift.bn}') sees the input through one layer, "
        if shift.std_ratio < 1 / STD_RATIO_LIMIT:
            kind, figure = "smaller", f"with a spread {1 / shift.std_ratio:.3g}x smaller than the model was trained on"
        elif shift.std_ratio > STD_RATIO_LIMIT:
            kind, figure = "larger", f"with a spread {shift.std_ratio:.3g}x larger than the model was trained on"
        elif shift.mean_shift > MEAN_SHIFT_LIMIT:
            kind, figure = "moved", f"with its mean moved by {shift.mean_shift:.3g} standard deviations"
        else:
            continue
        cause = _image_cause(kind, images) if images else {
            "smaller": "data missing the model's normalization, or scaled down",
            "larger": "data left unscaled (e.g. 0..255 where the model expects 0..1)",
            "moved": "data missing the model's mean subtraction, or scaled differently"}[kind]
        return (where + figure + ": compressing one layer does not do that; check the preprocessing (likely "
                + cause + ")")
    return None


def _image_cause(kind: str, preprocessing) -> str:
    """The likely image-preprocessing mistakes behind ``kind`` of drift, leaving out the advice to do
    what ``preprocessing`` shows was done (then the stored statistics themselves are a suspect)."""
    mean, std = getattr(preprocessing, "mean", None), getattr(preprocessing, "std", None)
    scaled = getattr(preprocessing, "scale", True)
    std_given = std is not None and not np.all(np.asarray(std) == 1)
    normalized = std_given or (mean is not None and not np.all(np.asarray(mean) == 0))
    imagenet = normalized and len(mean) == 3 and np.allclose(mean, IMAGENET_MEAN) and np.allclose(std, IMAGENET_STD)
    if kind == "smaller":
        if not normalized:
            return (f"images scaled to [0, 1] without the model's normalization (ImageNet models take "
                    f"{IMAGENET_OPTIONS}), or --mean/--std in 0..255 units while scaling to [0, 1]")
        return ("--mean/--std that do not fit the model" + (" (in 0..255 units while scaling to [0, 1]?)" if scaled
                                                            else "") + ", or " + UNLIKE_DATA)
    if kind == "larger":
        if not scaled:
            return ("pixel values left in 0..255 (--no-scale) where the model expects [0, 1]"
                    + ("" if std_given else ", or --std missing") + (", or " + UNLIKE_DATA if normalized else ""))
        if std_given:
            return "a --std smaller than the model's, or " + UNLIKE_DATA
        return "pixel values left in 0..255 (--no-scale) where the model expects [0, 1], or --std missing"
    if imagenet:
        return "--mean/--std that do not fit the model, or " + UNLIKE_DATA
    return (f"a missing or wrong --mean/--std: ImageNet models take {IMAGENET_OPTIONS} with scaling to [0, 1], "
            "or values in 0..255 units with --no-scale" + (", or " + UNLIKE_DATA if normalized else ""))
