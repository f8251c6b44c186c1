"""The Python API behind :mod:`bnpass` (``bnpass.reestimate_batchnorms`` and the rest): ``import
bnpass`` stays light, so that the ``bnpass`` command handles Ctrl-C from its first line
(:mod:`bnpass.entry`); these names load on first use."""

from __future__ import annotations

import os
from typing import Iterable, Optional, Union

import onnx

from .data import model_input_specs
from .images import ImageOptions
from .model_io import as_model
from .passes import (
    FoldBatchNormPass,
    FoldResult,
    ReestimateResult,
    calibrating_pass,
)
from .passes.calibration_settings import DEFAULT_BATCH_SIZE, DEFAULT_NUM_SAMPLES
from .passes.match_reference import check_reference_differs
from .sources import open_source

__all__ = ["reestimate_batchnorms", "fold_batchnorms", "calibration_samples"]


def calibration_samples(model: onnx.ModelProto, data: Union[str, os.PathLike, Iterable],
                        image_options: Optional[ImageOptions] = None, *, shuffle: bool = False, seed: int = 0):
    """Samples for ``model`` from a folder (arrays or images), an iterable of batches, or an onnxruntime
    ``CalibrationDataReader``.

    A batch is a dict ``{input name: array}`` or, for single-input models, an array, or an
    ``(inputs, labels...)`` tuple whose first element is one of those; samples (arrays without the
    batch axis) are accepted too; ``data`` may also be one ``.npy`` / ``.npz`` file. Folders are checked
    before anything runs; ``shuffle`` draws their samples in a random order fixed by ``seed``.
    ``image_options`` apply to image files only: given for arrays, they are a DataError.
    """
    return open_source(data, model_input_specs(model), image_options, shuffle=shuffle, seed=seed)


def reestimate_batchnorms(model: Union[onnx.ModelProto, str, os.PathLike], data, *, stats: str = "pooled",
                          batch_size: int = DEFAULT_BATCH_SIZE, num_samples: int = DEFAULT_NUM_SAMPLES,
                          device: str = "auto", progress: bool = False,
                          image_options: Optional[ImageOptions] = None, shuffle: bool = False, seed: int = 0,
                          threads: Optional[int] = None, tf32: bool = False,
                          reference: Union[None, onnx.ModelProto, str, os.PathLike] = None,
                          candidate: str = "auto", keep_per_tensor: bool = False) -> ReestimateResult:
    """Recompute every BN's mean and variance from ``data``; ``model`` is left unchanged.

    ``model``: an ``onnx.ModelProto`` or the path of an ``.onnx`` file. ``data``: a folder, an
    iterable of samples or batches, or a ``CalibrationDataReader`` (see :func:`calibration_samples`).
    ``stats``: ``"pooled"`` (mean and biased variance over all calibration values) or
    ``"batch-mean"`` (mean of batch means and of unbiased batch variances, as
    ``torch.optim.swa_utils.update_bn``). ``num_samples`` is rounded up to whole batches.
    ``tf32=True`` lets onnxruntime's CUDA provider run float32 convolutions in TF32: faster, but
    the statistics then differ from the CPU's by up to ~1e-2 (off by default; no effect on CPU).

    ``reference``: the uncompressed model (a ModelProto or a path). Then the statistics that make
    every BN reproduce the reference BN's output moments are computed too, and ``candidate``
    ("auto": by top-1 accuracy where ``data`` carry labels, else by agreement with the reference,
    on every sample; "reestimated"; "matched") says which are kept; the result is a
    :class:`~bnpass.passes.match_reference.ReferenceResult`. A reference with the model's own
    weights and statistics is a ModelError. ``keep_per_tensor``: the layer corrections fold into
    per-tensor quantized weights keeping one scale (:func:`fold_batchnorms`).
    """
    model = as_model(model)
    if reference is not None:
        reference = as_model(reference)
        check_reference_differs(model, reference)
    samples = calibration_samples(model, data, image_options, shuffle=shuffle, seed=seed)
    return calibrating_pass(samples, reference=reference, candidate=candidate, keep_per_tensor=keep_per_tensor,
                            stats=stats, batch_size=batch_size,
                            num_samples=num_samples, device=device, progress=progress, threads=threads,
                            tf32=tf32)(model)


def fold_batchnorms(model: Union[onnx.ModelProto, str, os.PathLike], *, keep_per_tensor: bool = False) -> FoldResult:
    """Fold every BN that folds exactly into a neighbouring layer; ``model`` (a ModelProto or the
    path of an ``.onnx`` file) is left unchanged.

    A quantized weight with one scale per tensor takes the fold exactly in one scale per output
    channel (:attr:`FoldResult.per_channel` lists those layers); ``keep_per_tensor=True`` keeps one
    scale instead, re-rounding the folded weight on it, for targets that need per-tensor weights.
    """
    return FoldBatchNormPass(keep_per_tensor=keep_per_tensor)(as_model(model))
