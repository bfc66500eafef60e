"""Round-to-nearest weight quantization in numpy: the converter writes with it, the loaders and tests read with it.

A weight W (..., n, k) (n output channels, k inputs; routed experts stacked in front) is cut into groups of G
consecutive inputs per output channel (G = k: one group a row, "per channel"). Each group gets
    scale = max|w| / qmax            (qmax = 127 for int8, 7 for int4; float32)
    q     = clip(round(w / scale), -qmax, qmax)
so W ~ q * scale, with |W - q * scale| <= scale / 2 elementwise. Symmetric: no offset (msModelSlim's files carry a
``weight_offset`` of zeros beside the scale, see ``layout.py``).

int4 values are packed two to a byte along the output channels, as msModelSlim packs a group-wise W4A16 weight:
byte [j, c] of the (n/2, k) tensor holds channel 2j in its low nibble and channel 2j + 1 in its high nibble (two's
complement, -8..7), so the bytes are the Ascend kernel's (k, n/2) int4x2 weight transposed.
"""
from typing import Tuple

import numpy as np

from research.deepseek2.errors import QuantizationError
from research.deepseek2.quantization.settings import QuantSettings, group_size_of

__all__ = ["quantize", "dequantize", "pack_int4", "unpack_int4"]


def pack_int4(q: np.ndarray) -> np.ndarray:
    """(..., n, k) int8 in [-8, 7] -> (..., n/2, k) int8: channel 2j low nibble, 2j + 1 high nibble."""
    if q.shape[-2] % 2:
        raise QuantizationError(f"int4 packs output channels in pairs: {q.shape[-2]} channels is odd")
    low = q[..., 0::2, :].astype(np.uint8) & 0x0F
    high = (q[..., 1::2, :].astype(np.uint8) & 0x0F) << 4
    return (low | high).view(np.int8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """(..., n/2, k) int8 -> (..., n, k) int8 in [-8, 7] (the inverse of ``pack_int4``)."""
    byte = packed.view(np.uint8)
    low = (byte & 0x0F).astype(np.int8)
    high = (byte >> 4).astype(np.int8)
    low = np.where(low > 7, low - 16, low).astype(np.int8)            # sign-extend the nibbles
    high = np.where(high > 7, high - 16, high).astype(np.int8)
    out = np.empty(packed.shape[:-2] + (2 * packed.shape[-2], packed.shape[-1]), np.int8)
    out[..., 0::2, :] = low
    out[..., 1::2, :] = high
    return out


def quantize(weight: np.ndarray, settings: QuantSettings, name: str = "weight") -> Tuple[np.ndarray, np.ndarray]:
    """(q, scale) of a float weight (..., n, k): q as stored (``stored_shape``; int8), scale (..., n, k / G)
    float32. A group of zeros gets scale 0 and q 0."""
    n, k = weight.shape[-2:]
    group = group_size_of(settings, k, name)
    grouped = np.asarray(weight, np.float32).reshape(weight.shape[:-1] + (k // group, group))  # (..., n, g, G)
    scale = np.abs(grouped).max(-1) / np.float32(settings.qmax)                                # (..., n, g)
    safe = np.where(scale > 0, scale, np.float32(1))[..., None]
    q = np.clip(np.rint(grouped / safe), -settings.qmax, settings.qmax).astype(np.int8).reshape(weight.shape)
    if settings.bits == 4:
        q = pack_int4(q)
    return q, scale.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray, settings: QuantSettings) -> np.ndarray:
    """The float32 weight (..., n, k) a stored (q, scale) pair stands for."""
    values = unpack_int4(q) if settings.bits == 4 else q
    k, groups = values.shape[-1], scale.shape[-1]
    grouped = values.astype(np.float32).reshape(values.shape[:-1] + (groups, k // groups))
    return (grouped * scale.astype(np.float32)[..., None]).reshape(values.shape)
