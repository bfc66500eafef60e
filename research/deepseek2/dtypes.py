"""The one table of floating-point dtype names: YAML/CLI spellings, bytes, numpy and MindSpore types.

``bytes_of`` and ``canonical`` are plain Python (the memory planner runs on a login node without MindSpore);
``to_numpy`` and ``to_mindspore`` import their library when called.
"""
__all__ = ["DTYPE_NAMES", "canonical", "bytes_of", "to_numpy", "to_mindspore", "name_of"]

# canonical name -> (aliases, bytes per element)
_TABLE = {
    "float32": (("float32", "fp32"), 4),
    "float16": (("float16", "fp16"), 2),
    "bfloat16": (("bfloat16", "bf16"), 2),
}
_ALIASES = {alias: name for name, (aliases, _) in _TABLE.items() for alias in aliases}
DTYPE_NAMES = tuple(sorted(_ALIASES))


def canonical(dtype, field: str = "dtype") -> str:
    """'float32' / 'float16' / 'bfloat16' for any spelling (str, numpy dtype, MindSpore type); ValueError naming
    ``field`` otherwise."""
    key = str(dtype).lower()
    if key.startswith("mindspore."):                       # str(mindspore.float32) may read "Float32"
        key = key.split(".", 1)[1]
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"{field} = {dtype!r}: expected one of {list(DTYPE_NAMES)}")


def bytes_of(dtype, field: str = "dtype") -> int:
    """Bytes per element."""
    return _TABLE[canonical(dtype, field)][1]


def to_numpy(dtype, field: str = "dtype"):
    """numpy dtype (bfloat16 through MindSpore's numpy extension type)."""
    import numpy as np
    name = canonical(dtype, field)
    if name == "bfloat16":
        from mindspore.common.np_dtype import bfloat16
        return np.dtype(bfloat16)
    return np.dtype(name)


def to_mindspore(dtype, field: str = "dtype"):
    """mindspore.float32 / float16 / bfloat16."""
    import mindspore as ms
    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[canonical(dtype, field)]


def name_of(dtype) -> str:
    """Canonical name of a numpy or MindSpore dtype (the torch_dtype spelling for config.json)."""
    return canonical(dtype)
