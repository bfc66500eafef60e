"""numpy arrays of checkpoint tensors: the bf16 dtype, dtype names, casts, byte counts, short name lists for messages.

bf16 in numpy is MindSpore's numpy ``bfloat16`` extension type (``BF16``: 2 bytes, ``.view(np.uint16)`` gives the
raw bits, ``mindspore.Tensor(array)`` gives a BFloat16 tensor). Importing this module registers that type with numpy,
which is also what lets the ``safetensors`` library hand out bf16 tensors with ``framework="numpy"``.
Dtype spellings ('bf16', 'float32', ...) come from ``dtypes``, the project's one table of them.
"""
import math

import numpy as np

from research.deepseek2.dtypes import canonical, name_of, to_numpy

__all__ = ["BF16", "np_dtype", "dtype_name", "cast_array", "nbytes", "contiguous", "describe"]

BF16 = to_numpy("bfloat16")


def np_dtype(dtype) -> np.dtype:
    """numpy dtype for 'bf16'/'fp16'/'fp32' (and the long names), a numpy dtype, or a MindSpore dtype.

    A MindSpore dtype goes through the project's dtype table (floats) or its own name ('Int32' -> int32):
    ``mindspore.dtype_to_nptype`` is deprecated and logs a warning on every call."""
    if isinstance(dtype, (str, np.dtype)) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        return to_numpy(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    try:
        return to_numpy(canonical(dtype))
    except ValueError:
        return np.dtype(str(dtype).split(".")[-1].lower())


def dtype_name(dtype) -> str:
    """'bfloat16', 'float16', 'float32' (the torch_dtype spelling) for a float dtype; numpy's name for the others."""
    dtype = np.dtype(dtype)
    try:
        return name_of(dtype)
    except ValueError:  # integer and bool tensors are not in the table of model dtypes
        return dtype.name


def cast_array(array: np.ndarray, dtype) -> np.ndarray:
    """Cast to ``dtype`` (None keeps it). Rounds to nearest-even; bf16 <-> fp16 goes through fp32 (exact widening)."""
    if dtype is None:
        return array
    dtype = np.dtype(dtype)
    if array.dtype == dtype:
        return array
    if array.dtype == BF16 and dtype == np.float32:
        # exact widening: a bf16 is the high half of its float32. Integer ops, several times faster than astype
        # through the extension type's cast
        out = np.empty(array.shape, np.float32)
        np.left_shift(array.view(np.uint16), np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
        return out
    if (array.dtype == BF16 or dtype == BF16) and array.dtype != np.float32 and dtype != np.float32:
        return cast_array(cast_array(array, np.float32), dtype)
    return array.astype(dtype)


def nbytes(shape, dtype) -> int:
    """Bytes of a tensor of this shape and dtype."""
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous without np.ascontiguousarray's promotion of 0-d arrays to 1-d."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def describe(names, limit: int = 10) -> str:
    """'a, b, c ... and 7 more': a sorted, shortened list of names for an error message."""
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
