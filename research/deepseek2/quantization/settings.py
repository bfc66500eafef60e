"""``model.model_config.quantization_config``: weight-only round-to-nearest quantization, checked.

    quantization_config:
      quant_method: rtn            # round to nearest, symmetric: q = round(w / scale), scale = max|w| / qmax
      weight_dtype: int8           # int8 (W8A16) | int4 (W4A16, two values a byte)
      group_size: 0                # input columns sharing a scale; 0 = one scale per output channel (int8 only)
      activation_dtype: null       # weights only: activations stay in compute_dtype
      modules_to_not_convert: []   # weights whose name contains one of these stay in their float dtype

These are MindFormers' key names (``mindformers.utils.quantization_config.RtnConfig``); the same dict, in the same
form, is what a quantized Hugging Face folder's ``config.json`` carries, so a run compares the two directly.
``modules_to_not_convert`` matches as Hugging Face's does, by substring, against a weight's Hugging Face name and
this model's (``kv_b_proj``, ``shared_experts``, ``model.layers.0.mlp``, ``feed_forward.w2``).

Plain Python: the memory planner reads it on a login node.
"""
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

from research.deepseek2.errors import QuantizationError

__all__ = ["QuantSettings", "parse_quantization_config", "group_size_of", "stored_shape", "scale_shape",
           "QUANT_METHODS", "WEIGHT_DTYPES", "DEFAULT_GROUP_SIZE"]

QUANT_METHODS = ("rtn",)
WEIGHT_DTYPES = ("int8", "int4")
# int4 needs groups: one scale for a whole row of 16 levels loses too much (msModelSlim's W4A16 default is 128 too)
DEFAULT_GROUP_SIZE = {"int8": 0, "int4": 128}
_NONE = (None, "None", "none", "null", "")
_KEYS = ("quant_method", "weight_dtype", "group_size", "activation_dtype", "kvcache_dtype", "modules_to_not_convert",
         "algorithm_args")
WHERE = "model.model_config.quantization_config"


@dataclass(frozen=True)
class QuantSettings:
    """A checked quantization_config."""
    weight_dtype: str = "int8"
    group_size: int = 0
    modules_to_not_convert: Tuple[str, ...] = field(default=())
    quant_method: str = "rtn"

    @property
    def bits(self) -> int:
        return 8 if self.weight_dtype == "int8" else 4

    @property
    def qmax(self) -> int:
        """The largest level of the symmetric grid: 127 (int8) or 7 (int4); -qmax..qmax are used."""
        return (1 << (self.bits - 1)) - 1

    @property
    def model_quant_type(self) -> str:
        """msModelSlim's name of the scheme (quant_model_description.json): W8A16 or W4A16."""
        return f"W{self.bits}A16"

    def skips(self, *names: str) -> bool:
        """True when one of ``names`` (a weight's Hugging Face and MindSpore names) contains an entry of
        modules_to_not_convert."""
        return any(entry in name for entry in self.modules_to_not_convert for name in names)

    def to_dict(self) -> dict:
        """The YAML / config.json form."""
        return {"quant_method": self.quant_method, "weight_dtype": self.weight_dtype, "group_size": self.group_size,
                "activation_dtype": None, "modules_to_not_convert": list(self.modules_to_not_convert)}


def _fail(key: str, value, expected: str, where: str):
    raise QuantizationError(f"{where}.{key} = {value!r}: {expected}")


def parse_quantization_config(value, where: str = WHERE) -> Optional[QuantSettings]:
    """QuantSettings of a quantization_config (a mapping, MindFormers' config object or QuantSettings), None for
    none (None or an empty mapping). QuantizationError naming the key for: an unknown key, a method other than rtn,
    a weight_dtype other than int8/int4, a group size that is negative (int4: 0), an
    activation or KV-cache dtype (weight-only), algorithm arguments (RTN has none), a modules_to_not_convert that
    is not a list of names."""
    if value is None or isinstance(value, QuantSettings):
        return value
    if hasattr(value, "to_dict") and not isinstance(value, Mapping):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise QuantizationError(f"{where} = {value!r}: expected a mapping ({', '.join(_KEYS[:3])} ...) or null")
    if not value:
        return None
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        _fail(unknown[0], value[unknown[0]], f"not a key of quantization_config (expected {', '.join(_KEYS)})", where)
    method = value.get("quant_method", "rtn")
    if method not in QUANT_METHODS:
        _fail("quant_method", method, f"expected one of {QUANT_METHODS} (round to nearest, weight-only; ptq "
                                      f"calibration needs MindSpore Golden Stick on Ascend)", where)
    weight_dtype = value.get("weight_dtype", "int8")
    if weight_dtype not in WEIGHT_DTYPES:
        _fail("weight_dtype", weight_dtype, f"expected one of {WEIGHT_DTYPES}", where)
    for key in ("activation_dtype", "kvcache_dtype"):
        if value.get(key) not in _NONE:
            _fail(key, value.get(key), "expected null: the quantization is weight-only (activations and the latent "
                                       "cache stay in compute_dtype)", where)
    if value.get("algorithm_args") not in (None, {}) and value.get("algorithm_args"):
        _fail("algorithm_args", value.get("algorithm_args"), "expected none: round to nearest takes no arguments",
              where)
    group = value.get("group_size", DEFAULT_GROUP_SIZE[weight_dtype])
    group = DEFAULT_GROUP_SIZE[weight_dtype] if group is None else group
    if isinstance(group, bool) or not isinstance(group, int) or group < 0:
        _fail("group_size", group, "expected an integer >= 0 (0: one scale per output channel)", where)
    if weight_dtype == "int4" and group == 0:
        _fail("group_size", group, "int4 needs groups (e.g. 128): one scale for a whole row of 16 levels is too "
                                   "coarse", where)
    skip = value.get("modules_to_not_convert") or ()
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) and s for s in skip):
        _fail("modules_to_not_convert", skip, "expected a list of (parts of) weight names", where)
    return QuantSettings(weight_dtype=weight_dtype, group_size=group, modules_to_not_convert=tuple(skip),
                         quant_method=method)


# ---------------------------------------------------------------------------------------------- stored shapes
def group_size_of(settings: QuantSettings, k: int, name: str = "weight") -> int:
    """The inputs a scale covers for a weight of k inputs: settings.group_size, or k when it is 0.
    QuantizationError naming the weight when the group size does not divide k."""
    group = settings.group_size or k
    if k % group:
        raise QuantizationError(f"{WHERE}.group_size = {settings.group_size} does not divide the {k} inputs of "
                                f"{name} (use a group size dividing it, or add the weight to "
                                f"modules_to_not_convert)")
    return group


def stored_shape(shape: Tuple[int, ...], settings: QuantSettings, name: str = "weight") -> Tuple[int, ...]:
    """Shape of a (..., n, k) weight quantized as stored: (..., n, k) int8, or (..., n/2, k) for int4 (two output
    channels a byte). QuantizationError naming the weight for an odd n under int4."""
    if settings.bits == 8:
        return tuple(shape)
    if shape[-2] % 2:
        raise QuantizationError(f"{WHERE}.weight_dtype = 'int4' packs output channels in pairs: {name} has "
                                f"{shape[-2]} (odd; add it to modules_to_not_convert)")
    return tuple(shape[:-2]) + (shape[-2] // 2, shape[-1])


def scale_shape(shape: Tuple[int, ...], settings: QuantSettings, name: str = "weight") -> Tuple[int, ...]:
    """Shape of the scales of a (..., n, k) weight: (..., n, k / G); (..., n, 1) per channel."""
    return tuple(shape[:-1]) + (shape[-1] // group_size_of(settings, shape[-1], name),)
