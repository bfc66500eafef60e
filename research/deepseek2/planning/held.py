"""What a model holds of its weights, on one card, in the dtype it holds each tensor in.

A float model holds every weight in param_init_type. A quantized one (model_config.quantization_config,
``quantization/``) holds each projection as ``inventory.quantized`` does: int8 (1 byte an element; int4 is stored two
a byte in an int8 tensor whose shape is already halved) and its float32 scale (4 bytes), the rest (embedding,
lm_head, norms, router, kv_b_proj, modules_to_not_convert) in param_init_type. A card's share of a tensor is its
size divided by the degrees of the parallel axes cutting it (``inventory.Param.cuts``). ``memory.py`` adds these
bytes up per pipeline stage and reports them by dtype and by ``counts.count_parameters``' part.

Plain Python: no MindSpore import.
"""
import functools
import math
from typing import Dict, Iterable, Optional, Tuple

from research.deepseek2.planning.counts import part_of
from research.deepseek2.planning.inventory import ModelShape, Param, layer_parameters, parameters, quantized
from research.deepseek2.quantization.settings import QuantSettings

__all__ = ["HELD_BYTES", "outer_params", "held_bytes", "totals_by", "weights_summary"]

@functools.lru_cache(maxsize=64)
def outer_params(shape: ModelShape) -> Tuple[Tuple[Param, ...], Tuple[Param, ...]]:
    """The weights outside the decoder layers: before them (embedding: the first stage), after them (final norm,
    lm_head: the last stage)."""
    before, after, in_layers = [], [], False
    for param in parameters(shape):
        if param.name.startswith("model.layers."):
            in_layers = True
        else:
            (after if in_layers else before).append(param)
    return tuple(before), tuple(after)


# what a model holds, by dtype: (part, axes cutting it, dtype, elements); dtype None = param_init_type
_Held = Tuple[Tuple[str, Tuple[str, ...], Optional[str], int], ...]
HELD_BYTES = {"int8": 1, "float32": 4}     # the dtypes a quantized model holds tensors in (int8 weights, scales)


def _held(params: Iterable[Param], quant: Optional[QuantSettings]) -> _Held:
    """The tensors a model holds for ``params``, each as ``inventory.quantized`` holds it (an int8 / packed int4
    weight and its float32 scale, or the float weight), summed by count_parameters' part, the axes of its cuts and
    its dtype."""
    sums: Dict[tuple, int] = {}
    for param in params:
        for held in quantized(param, quant):
            key = (part_of(held), tuple(sorted({cut.axis for cut in held.cuts})), held.dtype)
            sums[key] = sums.get(key, 0) + held.size
    return tuple(key + (size,) for key, size in sums.items())


@functools.lru_cache(maxsize=4096)
def _layer_held(shape: ModelShape, quant: Optional[QuantSettings], layer: int) -> _Held:
    """_held of one decoder layer (cached by the model shape and the quantization: both frozen dataclasses)."""
    return _held(layer_parameters(shape, layer), quant)


@functools.lru_cache(maxsize=64)
def _outer_held(shape: ModelShape) -> Tuple[_Held, _Held]:
    """_held of the weights before and after the decoder layers (never quantized)."""
    return tuple(_held(params, None) for params in outer_params(shape))



def held_bytes(shape: ModelShape, quant: Optional[QuantSettings], layers: range, first: bool, last: bool,
               axes: Dict[str, int], param_dtype: str, param_bytes: int) -> Dict[Tuple[str, str], float]:
    """Bytes one card holds, by (part, dtype), of the decoder ``layers`` (and the embedding when ``first``, final
    norm and lm_head when ``last``): each tensor divided by the degrees (``axes``) of the axes that cut it; dtypes
    the quantization's weight_dtype, "float32 scales" and ``param_dtype`` (``param_bytes`` an element)."""
    held = [entry for layer in layers for entry in _layer_held(shape, quant, layer)]
    before, after = _outer_held(shape)
    held += (list(before) if first else []) + (list(after) if last else [])
    out: Dict[Tuple[str, str], float] = {}
    for part, cut_axes, dtype, size in held:
        # int4 is held packed two a byte in an int8 tensor (its shape already halved): named for what it holds
        names = {"int8": quant.weight_dtype if quant else "int8", "float32": "float32 scales"}
        key = (part, names.get(dtype, param_dtype))
        share = size / math.prod(axes[axis] for axis in cut_axes)
        out[key] = out.get(key, 0.0) + share * HELD_BYTES.get(dtype, param_bytes)
    return out


def totals_by(held: Dict[Tuple[str, str], float], index: int) -> Dict[str, float]:
    """held_bytes summed by part (index 0) or by dtype (index 1)."""
    out: Dict[str, float] = {}
    for key, value in held.items():
        out[key[index]] = out.get(key[index], 0.0) + value
    return out


def weights_summary(quant: Optional[QuantSettings], param_dtype: str) -> str:
    """What the weights are held in, in words."""
    if not quant:
        return f"{param_dtype} throughout"
    scales = f"one per {quant.group_size} inputs" if quant.group_size else "one per output channel"
    skipped = f", modules_to_not_convert {list(quant.modules_to_not_convert)}" if quant.modules_to_not_convert else ""
    return (f"{quant.weight_dtype} projections{', two a byte' if quant.bits == 4 else ''} + float32 scales "
            f"({scales}), {param_dtype} embedding/lm_head/norms/router/kv_b_proj{skipped}")
