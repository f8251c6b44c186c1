"""Quantized tensors as the quantizers store them: the math, as pure numpy functions (no graph).

``DequantizeLinear(q, scale, zero_point)`` computes ``(q - zero_point) * scale``, with ``scale``
and ``zero_point`` laid out in one of three ways (:class:`Layout`): one number for the whole tensor
(shape ``[]`` or ``[1]``: onnxruntime's quantizer writes a bias scale ``[1]`` with a zero point
``[]``), one per index of ``axis`` (shape ``[C]``), or, from opset 21, one per block of
``block_size`` consecutive indices along ``axis`` (the tensor's rank, that axis reduced to
``ceil(n / block_size)``). What ``q`` may hold is one :class:`StorageType` per numpy dtype in
:data:`STORAGE_TYPES`: int8/uint8/int16/uint16/int32, int4/uint4 (``ml_dtypes`` arrays, as
``onnx.numpy_helper`` reads and writes them, two to a byte) and float8 E4M3FN/E5M2. One tensor so
stored, with its scale, zero point and layout, is a :class:`QuantizedTensor`, which gives its integers
and its dequantized values.

Folding a per-output-channel factor ``f[c]`` into such a tensor (a BN after the layer) is exact in
the scale alone::

    (q - zp) * scale * f[c] = (q' - zp) * scale'[c],  scale'[c] = scale[c] * |f[c]|,
    q' = q where f[c] > 0, q' = 2 zp - q (the mirror) where f[c] < 0

provided the mirrored values fit the storage type (int4: [-8, 7]; float8: negation is exact, its
zero point is 0). A per-tensor scale becomes per-axis along the output axis; a blocked scale is
multiplied along the output axis, exact when the blocks run along another axis. Where a target
needs one scale per tensor, :func:`requantize_per_tensor` re-rounds the folded values at the scale
onnxruntime's quantizer would choose (symmetric max-abs for signed types, min-max for unsigned).

A bias quantized to int32 is ``round(b / (input scale * weight scale[c]))`` with zero point 0, the
convention of onnxruntime's quantizer (:func:`quantize_bias`). A weight quantized at run time,
``QuantizeLinear(W) -> DequantizeLinear``, is emulated as onnxruntime computes it
(:func:`quantize_like_runtime`: ``saturate(rint(W / scale) + zp)`` in float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np

PER_TENSOR, PER_AXIS, BLOCKED = "per-tensor", "per-axis", "blocked"


@dataclass(frozen=True)
class StorageType:
    """What a quantized tensor's elements can hold: ``[low, high]``; ``integer`` False for float8,
    whose zero point is 0 and whose negation is exact; ``symmetric``: the range onnxruntime's
    quantizer uses for symmetric weights of that type."""

    name: str
    low: float
    high: float
    integer: bool = True
    symmetric: Optional[tuple] = None

    def fits(self, values: np.ndarray) -> np.ndarray:
        return (values >= self.low) & (values <= self.high)


def _integer(dtype, symmetric=None) -> StorageType:
    info = ml_dtypes.iinfo(dtype)
    return StorageType(np.dtype(dtype).name, int(info.min), int(info.max), symmetric=symmetric)


def _float8(dtype) -> StorageType:
    largest = float(ml_dtypes.finfo(dtype).max)
    return StorageType(np.dtype(dtype).name, -largest, largest, integer=False)


STORAGE_TYPES = {np.dtype(dtype): storage for dtype, storage in (
    (np.int8, _integer(np.int8, (-127, 127))),
    (np.uint8, _integer(np.uint8)),
    (np.int16, _integer(np.int16, (-32767, 32767))),
    (np.uint16, _integer(np.uint16)),
    (np.int32, _integer(np.int32)),
    (ml_dtypes.int4, _integer(ml_dtypes.int4, (-8, 7))),
    (ml_dtypes.uint4, _integer(ml_dtypes.uint4)),
    (ml_dtypes.float8_e4m3fn, _float8(ml_dtypes.float8_e4m3fn)),
    (ml_dtypes.float8_e5m2, _float8(ml_dtypes.float8_e5m2)),
)}


@dataclass(frozen=True)
class Layout:
    """How a scale (and zero point) spreads over the tensor: :data:`PER_TENSOR`, :data:`PER_AXIS`
    along ``axis``, or :data:`BLOCKED` along ``axis`` in blocks of ``block_size``."""

    kind: str
    axis: Optional[int] = None
    block_size: int = 0

    def expand(self, parameter: np.ndarray, shape: tuple) -> np.ndarray:
        """``parameter`` broadcast to the tensor's ``shape`` (float64 or int64)."""
        wide = np.asarray(parameter, dtype=np.float64 if _is_float(parameter) else np.int64)
        if self.kind == PER_TENSOR:
            return np.broadcast_to(wide.reshape(()), shape)
        if self.kind == PER_AXIS:
            along = [1] * len(shape)
            along[self.axis] = -1
            return np.broadcast_to(wide.reshape(along), shape)
        repeated = np.repeat(wide, self.block_size, axis=self.axis)
        return np.take(repeated, np.arange(shape[self.axis]), axis=self.axis)

    def describe(self) -> str:
        if self.kind == PER_TENSOR:
            return PER_TENSOR
        if self.kind == PER_AXIS:
            return f"per-axis along axis {self.axis}"
        return f"blocked along axis {self.axis} (blocks of {self.block_size})"


@dataclass
class QuantizedTensor:
    """A tensor as ``DequantizeLinear`` reads it: ``stored`` values (integers, or float8 values) with
    ``q_scale`` and ``zero_point`` (None: none) laid out by ``layout``, of ``storage`` type, dequantized to
    ``dtype``; or, quantized at run time (``quantize_scale`` set), the float W that ``QuantizeLinear``
    quantizes at that scale, with the same layout and zero point."""

    stored: np.ndarray
    q_scale: np.ndarray
    zero_point: Optional[np.ndarray]
    layout: Layout
    storage: StorageType
    dtype: np.dtype
    quantize_scale: Optional[np.ndarray]  # None: ``stored`` holds the integers

    @property
    def shape(self):
        return self.stored.shape

    def integers(self) -> np.ndarray:
        """The quantized values DequantizeLinear reads (computed as QuantizeLinear would, at run time)."""
        if self.quantize_scale is None:
            return self.stored
        return quantize_like_runtime(self.stored, self.layout.expand(self.quantize_scale, self.shape),
                                     self.zero_point_full(self.zero_point), self.storage)

    def dequantized(self) -> np.ndarray:
        """``(q - zero_point) * q_scale``, exact in float64, cast once to the output type."""
        return dequantize(self.integers(), self.q_scale, self.zero_point, self.layout).astype(self.dtype)

    def zero_point_full(self, zero_point, layout: Optional[Layout] = None) -> Optional[np.ndarray]:
        return None if zero_point is None else (layout or self.layout).expand(zero_point, self.shape)


@dataclass
class QuantizedUpdate:
    """What folding a per-channel factor changes in a :class:`QuantizedTensor`: the scale, the zero
    point, the stored values (None: unchanged; quantized at run time: the new float W, and
    ``quantize_scale`` QuantizeLinear's scale), and ``axis``, the axis a per-tensor scale now runs
    along (None: the layout stays). ``per_channel``: a per-tensor scale became per-axis."""

    q_scale: np.ndarray
    zero_point: Optional[np.ndarray]
    stored: Optional[np.ndarray]
    axis: Optional[int]
    per_channel: bool = False
    quantize_scale: Optional[np.ndarray] = None

    def channel_scale(self, channels: int) -> Optional[np.ndarray]:
        """The weight scale of each output channel, or None when a channel has several (blocked)."""
        if self.q_scale.size == 1:
            return np.broadcast_to(self.q_scale.reshape(-1), (channels,))
        if self.q_scale.ndim == 1 and self.q_scale.size == channels:
            return self.q_scale
        return None


def _is_float(value) -> bool:
    dtype = np.asarray(value).dtype
    return np.issubdtype(dtype, np.floating) or dtype in (np.dtype(ml_dtypes.float8_e4m3fn),
                                                          np.dtype(ml_dtypes.float8_e5m2))


def dequantize(stored: np.ndarray, scale: np.ndarray, zero_point: Optional[np.ndarray], layout: Layout) -> np.ndarray:
    """``(stored - zero_point) * scale`` in float64."""
    values = stored.astype(np.float64)
    if zero_point is not None:
        values = values - layout.expand(zero_point, stored.shape).astype(np.float64)
    return values * layout.expand(scale, stored.shape)


def scale_along(parameter: np.ndarray, layout: Layout, factor: np.ndarray, axis: int) -> np.ndarray:
    """``parameter`` (a scale, float64 result) multiplied by ``factor[c]`` along ``axis``: a per-tensor
    one becomes ``[C]``; a per-axis one must lie along ``axis``; a blocked one has ``axis`` whole."""
    wide = np.asarray(parameter, dtype=np.float64)
    if layout.kind == PER_TENSOR:
        return wide.reshape(-1)[0] * factor
    if layout.kind == PER_AXIS:
        return wide.reshape(-1) * factor
    along = [1] * wide.ndim
    along[axis] = -1
    return wide * factor.reshape(along)


def per_channel(parameter: np.ndarray, layout: Layout, channels: int) -> np.ndarray:
    """A per-tensor parameter (a zero point) repeated ``channels`` times; others unchanged."""
    if layout.kind != PER_TENSOR:
        return parameter
    return np.broadcast_to(np.asarray(parameter).reshape(-1)[:1], (channels,)).copy()


def mirror_channels(stored: np.ndarray, zero_point_full: Optional[np.ndarray], mirror: np.ndarray, *, axis: int,
                    storage: StorageType) -> tuple:
    """``stored' = 2 zero_point - stored`` on the channels along ``axis`` where ``mirror`` is True
    (float8: ``-stored``, exact). Returns ``(stored', overflowing channel indices)``; ``stored'`` is
    None when a mirrored value does not fit ``storage``."""
    channels = stored.shape[axis]
    along = [1] * stored.ndim
    along[axis] = -1
    where = np.broadcast_to(mirror.reshape(along), stored.shape)
    if not storage.integer:
        return np.where(where, -stored.astype(np.float32), stored.astype(np.float32)).astype(stored.dtype), []
    wide = stored.astype(np.int64)
    zero = np.zeros_like(wide) if zero_point_full is None else zero_point_full.astype(np.int64)
    mirrored = np.where(where, 2 * zero - wide, wide)
    outside = np.moveaxis(~storage.fits(mirrored), axis, 0).reshape(channels, -1).any(axis=1)
    overflowing = np.flatnonzero(outside)
    if overflowing.size:
        return None, overflowing
    return mirrored.astype(stored.dtype), overflowing


def requantize_per_tensor(values: np.ndarray, storage: StorageType, dtype, scale_dtype) -> tuple:
    """``(stored, scale, zero point)`` for float ``values`` on one scale, chosen as onnxruntime's
    quantizer chooses it: signed types symmetric (``max |v|`` on the type's symmetric range, zero
    point 0), unsigned types from min and max (0 included); float8: ``max |v|`` on the type's largest
    value. Scale and zero point are scalars (the caller gives them the stored shape)."""
    values = np.asarray(values, dtype=np.float64)
    if not storage.integer:
        scale = np.float64(np.max(np.abs(values)) / storage.high) or np.float64(1.0)
        scale = np.asarray(scale).astype(scale_dtype)
        stored = (values / np.float64(scale)).astype(dtype)
        return stored, scale, np.zeros((), dtype)
    if storage.low < 0:
        low, high = storage.symmetric or (storage.low, storage.high)
        largest = float(np.max(np.abs(values)))
        value_low, value_high = -largest, largest
    else:
        low, high = storage.low, storage.high
        value_low, value_high = min(0.0, float(values.min())), max(0.0, float(values.max()))
    scale = (value_high - value_low) / (high - low)
    if scale < np.finfo(np.dtype(scale_dtype)).tiny:
        scale, zero_point = 1.0, 0
    else:
        zero_point = round((high + low) / 2) if storage.low < 0 else int(round(low - value_low / scale))
    scale = np.asarray(scale).astype(scale_dtype)
    stored = np.clip(np.rint(values / np.float64(scale)) + zero_point, storage.low, storage.high)
    return stored.astype(dtype), scale, np.asarray(zero_point).astype(dtype)


def quantize_like_runtime(values: np.ndarray, scale_full: np.ndarray, zero_point_full: Optional[np.ndarray],
                          storage: StorageType) -> np.ndarray:
    """What ``QuantizeLinear`` computes (int64): ``saturate(rint(float32(values) / float32(scale)) + zp)``."""
    ratio = np.asarray(values, dtype=np.float32) / np.asarray(scale_full, dtype=np.float32)
    rounded = np.rint(ratio).astype(np.int64)
    if zero_point_full is not None:
        rounded = rounded + zero_point_full.astype(np.int64)
    return np.clip(rounded, int(storage.low), int(storage.high))


def on_runtime_grid(values: np.ndarray, expected: np.ndarray, scale_full: np.ndarray,
                    zero_point_full: Optional[np.ndarray], storage: StorageType) -> Optional[np.ndarray]:
    """``values`` from which ``QuantizeLinear`` computes ``expected`` (:func:`quantize_like_runtime`): a
    value it rounds one step off (a tie that scaling moved) is set to its exact grid point,
    ``(expected - zp) * scale``; None when a value is further off, or the grid point does not do."""
    computed = quantize_like_runtime(values, scale_full, zero_point_full, storage)
    if np.any(np.abs(computed - expected) > 1):
        return None
    differs = computed != expected
    if not differs.any():
        return values
    zero_wide = np.zeros(values.shape, np.int64) if zero_point_full is None else zero_point_full.astype(np.int64)
    grid = ((expected - zero_wide) * scale_full.astype(np.float32).astype(np.float64)).astype(values.dtype)
    values = np.where(differs, grid, values)
    if np.any(quantize_like_runtime(values, scale_full, zero_point_full, storage) != expected):
        return None
    return values


INT32 = STORAGE_TYPES[np.dtype(np.int32)]


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> tuple:
    """``(round(bias / scale) as int32, overflowing indices)``: the int32 bias at ``scale`` (zero
    point 0); the values are None when one does not fit int32."""
    quantized = np.rint(np.asarray(bias, dtype=np.float64) / np.asarray(scale, dtype=np.float64))
    overflowing = np.flatnonzero(~INT32.fits(quantized) | ~np.isfinite(quantized))
    if overflowing.size:
        return None, overflowing
    return quantized.astype(np.int32), overflowing


def blocks(size: int, block_size: int) -> int:
    return math.ceil(size / block_size)
