"""LoRA (arXiv 2106.09685) for DeepSeek-V2, configured the MindFormers way: ``model.model_config.pet_config``.

    pet_config: {pet_type: lora, lora_rank: 8, lora_alpha: 16, lora_dropout: 0.05,
                 target_modules: "q_proj|q2l_proj|l2q_proj|kv2l|lkv2kv|wo|w1|w2|w3",
                 target_routed_experts: False}

A targeted projection W (out, in) computes y = x W^T + (alpha / r) * dropout(x) A^T B^T with A (r, in) random and
B (out, r) zero, so the network starts as the base model bit for bit. Only A and B train; every base weight is
frozen (requires_grad False), so an optimizer over ``trainable_params()`` holds state for the adapters alone.

Why our own adapters and not MindFormers' swap
    MindFormers' trainer wraps a network whose model_config has a pet_config with ``get_pet_model``:
    ``LoraModel`` walks ``network.model`` and replaces cells whose child name matches ``target_modules`` with
    mindpet's ``LoRADense``, but only cells that are ``nn.Dense``, MindFormers' ``Linear`` or its
    Column/RowParallelLinear (mindformers/pet/tuners/lora_adapter.py). Our ``layers.Linear`` is none of them, so the
    swap silently does nothing; ``PetModel`` then freezes every parameter whose name lacks ``mindpet_delta_lora``:
    a network with zero trainable parameters (tests/test_lora.py shows it). Making our Linear an ``nn.Dense`` would
    still leave out the routed experts (stacked (E, out, in) parameters, no Linear cells at all) and would allocate a
    second full weight per swapped layer (LoRADense builds its own before the old one is put in). So the adapters
    are ours, and they follow MindFormers' contract where it matters to a user:
      * the same pet_config keys (LoraConfig's: lora_rank, lora_alpha, lora_dropout, target_modules,
        exclude_layers, lora_a_init, lora_b_init, param_init_type, compute_dtype, freeze_include, freeze_exclude),
        target_modules matched with ``re.match`` against a projection's own name, as MindFormers does, or its full
        path, in this model's names or the Hugging Face ones (``kv_b_proj`` works as well as ``lkv2kv``);
      * adapter parameters named as mindpet names them, ``<projection>.mindpet_delta_lora_a`` / ``_b``, so
        MindFormers' own freezing (``freeze_delta``, run by ``PetModel``) keeps exactly our adapters trainable (a
        PetModel put over a LoRA network finds nothing to swap and changes no name), and checkpoints hold the names
        MindFormers' LoRA tools look for.
    A targeted cell becomes its LoRA subclass in place: the same object holding the same base Parameters, so nothing
    full-size is allocated and every base name stays.

Routed experts (optional, ``target_routed_experts: True``) get one low-rank pair per expert over the stacked
weights: A (E, r, in), B (E, out, r), named ``...routed_experts.w1_mindpet_delta_lora_a``. They act in weight space
(the dispatch multiplies by W + (alpha / r) B A, formed once per step in the compute dtype): no per-token dropout
there, and the layer's effective weights are held for the backward (the memory planner counts them).

Prediction runs merged weights (``merged_weights`` / ``merge_state``: W + (alpha / r) B @ A in float64, cast back):
a plain DeepseekV2ForCausalLM, whose latent-cache decode absorbs kv_b into the query. ``apply_lora`` refuses a
network built with use_past for that reason.

The first part of this module is plain Python (the memory planner reads pet_config through it on a login node; the
merge imports numpy); the cells import MindSpore when LoRA is first applied.
"""
from __future__ import annotations

import fnmatch
import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Tuple

from research.deepseek2.dtypes import canonical
from research.deepseek2.weight_map import ms_to_hf

if TYPE_CHECKING:                                       # annotations only: the merge imports numpy when it runs
    import numpy as np

__all__ = ["PetConfigError", "LoraSettings", "DEFAULT_TARGET_MODULES", "ADAPTER_SUFFIXES", "parse_pet_config",
           "projection_of", "targeted_projections", "adapter_shapes", "adapter_names_of", "expected_adapter_shapes",
           "merge_state", "validate_pet_config", "apply_lora", "freeze_base", "adapter_names", "adapter_state",
           "merged_weights"]

ADAPTER_SUFFIXES = ("mindpet_delta_lora_a", "mindpet_delta_lora_b")   # mindpet's names: MindFormers' freeze keeps them
_ADAPTER_MARK = "mindpet_delta_lora"
# the Linear cells of a decoder layer (MLA projections, dense FFN / shared experts); lm_head is not a target, as in
# MindFormers (its LoraModel only looks inside ``network.model``)
LINEAR_CELLS = ("q_proj", "q2l_proj", "l2q_proj", "kv2l", "lkv2kv", "wo", "w1", "w2", "w3")
DEFAULT_TARGET_MODULES = "|".join(LINEAR_CELLS)
_LINEAR_WEIGHT = re.compile(r"(model\.layers\.\d+\..*\.(?:%s))\.weight$" % "|".join(LINEAR_CELLS))
_ROUTED_WEIGHT = re.compile(r"(model\.layers\.\d+\.feed_forward\.routed_experts)\.(w1|w2|w3)$")
_DEFAULTS = dict(pet_type=None, lora_rank=8, lora_alpha=16, lora_dropout=0.01, target_modules=None,
                 exclude_layers=None, target_routed_experts=False, lora_a_init=None, lora_b_init="zeros",
                 param_init_type="float32", compute_dtype=None, freeze_include=None, freeze_exclude=None)


class PetConfigError(ValueError):
    """A pet_config field is wrong; the message names it and says what was expected."""


@dataclass(frozen=True)
class LoraSettings:
    """A checked LoRA pet_config. ``target_modules`` is a regex; ``exclude_layers`` a tuple of them."""
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.01
    target_modules: str = DEFAULT_TARGET_MODULES
    exclude_layers: Tuple[str, ...] = ()
    target_routed_experts: bool = False
    lora_a_init: Optional[str] = None          # None: U(-1/sqrt(in), 1/sqrt(in)), mindpet's / PEFT's default
    lora_b_init: str = "zeros"
    param_init_type: str = "float32"           # the adapters' dtype (tiny; float32 needs no master copy)
    compute_dtype: Optional[str] = None        # None: the projection's own
    freeze_include: Tuple[str, ...] = ()
    freeze_exclude: Tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_rank


def _fail(field: str, value, expected: str):
    raise PetConfigError(f"pet_config.{field} = {value!r}: {expected}")


def _patterns(field: str, value) -> Tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p for p in items):
        _fail(field, value, "expected a regex or a list of regexes")
    for pattern in items:
        try:
            re.compile(pattern)
        except re.error as err:
            _fail(field, value, f"not a valid regex ({err})")
    return tuple(items)


def parse_pet_config(pet_config) -> LoraSettings:
    """LoraSettings of a pet_config (dict, MindFormers DictConfig / LoraConfig, or LoraSettings).

    Raises PetConfigError naming the field for: a missing or unknown pet_type, an unknown key, lora_rank <= 0,
    lora_alpha <= 0, lora_dropout outside [0, 1), a target_modules that is no regex, a dtype that is not one."""
    if isinstance(pet_config, LoraSettings):
        return pet_config
    if not isinstance(pet_config, Mapping):
        raise PetConfigError(f"pet_config = {pet_config!r}: expected a mapping with pet_type: lora")
    given = dict(pet_config)
    unknown = sorted(set(given) - set(_DEFAULTS))
    if unknown:
        _fail(unknown[0], given[unknown[0]], f"unknown key; a LoRA pet_config takes {sorted(_DEFAULTS)}")
    cfg = {k: (_DEFAULTS[k] if given.get(k) is None else given[k]) for k in _DEFAULTS}
    if cfg["pet_type"] != "lora":
        _fail("pet_type", given.get("pet_type"), "expected 'lora' (the only parameter-efficient method here)")
    rank, alpha, dropout = cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        _fail("lora_rank", rank, "expected a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 or math.isinf(alpha):
        _fail("lora_alpha", alpha, "expected a positive number (the update is scaled by lora_alpha / lora_rank)")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        _fail("lora_dropout", dropout, "expected a probability in [0, 1)")
    if not isinstance(cfg["target_routed_experts"], bool):
        _fail("target_routed_experts", cfg["target_routed_experts"], "expected true or false")
    for field in ("lora_a_init", "lora_b_init"):
        if cfg[field] is not None and not isinstance(cfg[field], str):
            _fail(field, cfg[field], "expected the name of a MindSpore initializer ('normal', 'zeros', ...)")
    dtypes = {}
    for field in ("param_init_type", "compute_dtype"):
        try:
            dtypes[field] = None if cfg[field] is None else canonical(cfg[field], f"pet_config.{field}")
        except ValueError as err:
            raise PetConfigError(str(err)) from None
    targets = _patterns("target_modules", cfg["target_modules"] or DEFAULT_TARGET_MODULES)
    return LoraSettings(
        lora_rank=rank, lora_alpha=alpha, lora_dropout=float(dropout), target_modules="|".join(targets),
        exclude_layers=_patterns("exclude_layers", cfg["exclude_layers"]) if cfg["exclude_layers"] else (),
        target_routed_experts=cfg["target_routed_experts"], lora_a_init=cfg["lora_a_init"],
        lora_b_init=cfg["lora_b_init"], **dtypes,
        freeze_include=tuple(cfg["freeze_include"] or ()), freeze_exclude=tuple(cfg["freeze_exclude"] or ()))


# ---------------------------------------------------------------------------------------------- names (plain)
def projection_of(weight_name: str) -> Optional[str]:
    """The projection a weight belongs to: a decoder-layer Linear's cell path for ``<cell>.weight``, the stacked
    routed-expert parameter itself (``...routed_experts.w1``); None for any other weight."""
    match = _LINEAR_WEIGHT.match(weight_name)
    if match:
        return match.group(1)
    return weight_name if _ROUTED_WEIGHT.match(weight_name) else None


def _names_to_match(weight_name: str, path: str) -> List[str]:
    """A projection's own name and full path, in this model's names and the Hugging Face ones."""
    names = [path.rsplit(".", 1)[-1], path]
    try:
        hf = ms_to_hf(weight_name, 0)[:-len(".weight")]
        names += [hf.rsplit(".", 1)[-1], hf]
    except KeyError:
        pass
    return names


def _matches(patterns: Iterable[str], names: Iterable[str]) -> bool:
    return any(re.match(pattern, name) for pattern in patterns for name in names)


def targeted_projections(weight_names: Iterable[str], pet_config) -> Dict[str, str]:
    """{weight name: projection path} of the weights a pet_config puts adapters on, in the order given.

    Linear projections: target_modules matches the projection (its own name or full path, ours or Hugging Face's)
    and no exclude_layers pattern does. Routed experts (w1, w2, w3 of every MoE layer): target_routed_experts, unless
    exclude_layers matches the ``routed_experts`` cell. PetConfigError when target_modules matches no projection."""
    settings = parse_pet_config(pet_config)
    out, seen_linear, matched = {}, False, False
    for name in weight_names:
        path = projection_of(name)
        if path is None:
            continue
        routed = _ROUTED_WEIGHT.match(name)
        if routed:
            cell = routed.group(1)
            if settings.target_routed_experts and not _matches(settings.exclude_layers, [cell, "routed_experts"]):
                out[name] = path
            continue
        seen_linear = True
        names = _names_to_match(name, path)
        if _matches([settings.target_modules], names):
            matched = True
            if not _matches(settings.exclude_layers, names):
                out[name] = path
    if matched and not any(_LINEAR_WEIGHT.match(name) for name in out):
        _fail("exclude_layers", list(settings.exclude_layers), "excludes every projection target_modules matches")
    if seen_linear and not matched:
        _fail("target_modules", settings.target_modules,
              f"matches no projection of the network (re.match against a projection's name or path; the names are "
              f"{', '.join(LINEAR_CELLS)}, or the Hugging Face q_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, "
              f"kv_b_proj, o_proj, gate_proj, up_proj, down_proj)")
    return out


def adapter_shapes(weight_shape: Tuple[int, ...], rank: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Shapes of A and B for a weight (..., out, in): A (..., r, in), B (..., out, r)."""
    *lead, out_features, in_features = weight_shape
    return tuple(lead) + (rank, in_features), tuple(lead) + (out_features, rank)


def adapter_names_of(projection: str) -> Tuple[str, str]:
    """Parameter names of a projection's A and B: ``<Linear cell path>.mindpet_delta_lora_a`` (as mindpet's LoRADense
    names them), ``<stacked parameter>_mindpet_delta_lora_a`` for routed experts (a parameter is named by its cell
    path and attribute, and the stacked experts are parameters of the RoutedExperts cell, not cells)."""
    sep = "_" if _ROUTED_WEIGHT.match(projection) else "."
    return tuple(f"{projection}{sep}{suffix}" for suffix in ADAPTER_SUFFIXES)


def expected_adapter_shapes(model_config, pet_config) -> Dict[str, Tuple[int, ...]]:
    """{adapter name: shape} a pet_config adds to a model_config (a DeepseekV2Config or a YAML's model_config), from
    the inventory alone: what a LoRA checkpoint holds beside the weights (``inventory.expected_shapes``)."""
    from research.deepseek2.inventory import expected_shapes
    settings = parse_pet_config(pet_config)
    shapes = expected_shapes(model_config)
    out = {}
    for weight, projection in targeted_projections(shapes, settings).items():
        out.update(zip(adapter_names_of(projection), adapter_shapes(shapes[weight], settings.lora_rank)))
    return out


def _split_adapter(name: str) -> Tuple[str, int]:
    """(projection, 0 for A / 1 for B) of an adapter name; PetConfigError for any other name."""
    for index, suffix in enumerate(ADAPTER_SUFFIXES):
        for sep in (".", "_"):
            if name.endswith(sep + suffix):
                return name[:-len(suffix) - 1], index
    raise PetConfigError(f"adapter {name!r}: expected a name ending in .{ADAPTER_SUFFIXES[0]} or "
                         f".{ADAPTER_SUFFIXES[1]} (_{ADAPTER_SUFFIXES[0]} ... for stacked routed experts)")


def merge_state(weights: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray],
                pet_config) -> Dict[str, np.ndarray]:
    """Plain weights from base weights and adapters: W + (lora_alpha / lora_rank) B @ A for every adapter pair, in
    float64, cast back to W's dtype; the other weights as given. For a merged checkpoint or prediction.

    weights: {name: array} of the base model (stacked experts (E, out, in)); adapters: {adapter name (see
    ``adapter_names_of``): array}. PetConfigError for an adapter without its partner or its weight, or shapes that do
    not fit."""
    import numpy as np
    scaling = parse_pet_config(pet_config).scaling
    merged = dict(weights)
    pairs: Dict[str, list] = {}
    for name in adapters:
        projection, index = _split_adapter(name)
        pairs.setdefault(projection, [None, None])[index] = name
    for projection, (a_name, b_name) in pairs.items():
        if a_name is None or b_name is None:
            raise PetConfigError(f"adapter of {projection}: {adapter_names_of(projection)[a_name is not None]} is "
                                 f"missing")
        target = projection + ".weight" if projection + ".weight" in weights else projection
        if target not in weights:
            raise PetConfigError(f"adapter {a_name!r}: the weight {projection}(.weight) is missing")
        w, a, b = np.asarray(weights[target]), np.asarray(adapters[a_name]), np.asarray(adapters[b_name])
        if a.ndim < 2 or (a.shape, b.shape) != adapter_shapes(w.shape, a.shape[-2]):
            raise PetConfigError(f"adapter of {target}: A {a.shape} and B {b.shape} do not fit the weight {w.shape}")
        delta = np.matmul(b.astype(np.float64), a.astype(np.float64)) * scaling
        merged[target] = (w.astype(np.float64) + delta).astype(w.dtype)
    return merged


# ---------------------------------------------------------------------------------------------- cells (MindSpore)
@functools.lru_cache(maxsize=None)
def _cells():
    """The LoRA cell classes (MindSpore is imported here, on first use, so the part above stays plain)."""
    from mindspore import nn, ops
    from research.deepseek2.layers import Linear
    from research.deepseek2.moe import RoutedExperts

    class LoraLinear(Linear):
        """Linear + (alpha / r) B A: ``apply_lora`` turns a built Linear into one, in place."""

        def construct(self, x):
            y = super().construct(x)                                                        # base, unchanged
            shape = x.shape
            h = self.lora_dropout(ops.reshape(ops.cast(x, self.lora_compute_dtype), (-1, shape[-1])))
            h = self.lora_a_matmul(h, ops.cast(self.mindpet_delta_lora_a, self.lora_compute_dtype))     # (T, r)
            h = self.lora_b_matmul(h, ops.cast(self.mindpet_delta_lora_b, self.lora_compute_dtype))     # (T, out)
            delta = ops.reshape(h * self.lora_scaling, shape[:-1] + (self.out_features,))
            return y + ops.cast(delta, y.dtype)

    class LoraRoutedExperts(RoutedExperts):
        """Routed experts whose w1/w2/w3, as the dispatch reads them, are W + (alpha / r) B A per expert: the base
        Parameters stay registered (and named) w1/w2/w3 and are read through ``w1_base`` ...; the adapters are
        ``w1_mindpet_delta_lora_a`` ... ."""

        def _lora_weight(self, base, lora_a, lora_b):
            dtype = self.compute_dtype
            delta = self.lora_bmm(ops.cast(lora_b, dtype), ops.cast(lora_a, dtype))     # (E, out, r) x (E, r, in)
            return ops.cast(base, dtype) + delta * self.lora_scaling

        @property
        def w1(self):
            return self._lora_weight(self.w1_base, self.w1_mindpet_delta_lora_a, self.w1_mindpet_delta_lora_b)

        @property
        def w2(self):
            return self._lora_weight(self.w2_base, self.w2_mindpet_delta_lora_a, self.w2_mindpet_delta_lora_b)

        @property
        def w3(self):
            return self._lora_weight(self.w3_base, self.w3_mindpet_delta_lora_a, self.w3_mindpet_delta_lora_b)

    return dict(nn=nn, ops=ops, Linear=Linear, RoutedExperts=RoutedExperts, LoraLinear=LoraLinear,
                LoraRoutedExperts=LoraRoutedExperts)


def __getattr__(name):
    if name in ("LoraLinear", "LoraRoutedExperts"):
        return _cells()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _adapter_pair(projection: str, weight_shape, settings: LoraSettings):
    """Fresh A (random) and B (lora_b_init, zeros by default) Parameters for a weight of ``weight_shape``."""
    from mindspore import Parameter
    from mindspore.common.initializer import Uniform, initializer
    from research.deepseek2.dtypes import to_mindspore
    dtype = to_mindspore(settings.param_init_type)
    shape_a, shape_b = adapter_shapes(tuple(weight_shape), settings.lora_rank)
    init_a = settings.lora_a_init or Uniform(1.0 / math.sqrt(shape_a[-1]))
    name_a, name_b = adapter_names_of(projection)
    return (Parameter(initializer(init_a, shape_a, dtype), name=name_a),
            Parameter(initializer(settings.lora_b_init, shape_b, dtype), name=name_b))


def _to_lora_linear(cell, projection: str, settings: LoraSettings):
    c = _cells()
    cell.__class__ = c["LoraLinear"]
    a, b = _adapter_pair(projection, cell.weight.shape, settings)
    cell.mindpet_delta_lora_a, cell.mindpet_delta_lora_b = a, b
    a.name, b.name = adapter_names_of(projection)                  # a Parameter set on a built cell keeps no prefix
    cell.lora_dropout = c["nn"].Dropout(p=settings.lora_dropout) if settings.lora_dropout > 0 else c["nn"].Identity()
    cell.lora_a_matmul = c["ops"].MatMul(transpose_b=True)
    cell.lora_b_matmul = c["ops"].MatMul(transpose_b=True)
    cell.lora_scaling = settings.scaling
    cell.lora_compute_dtype = _compute_dtype(settings, cell.compute_dtype)


def _to_lora_routed(cell, path: str, settings: LoraSettings):
    c = _cells()
    bases = {key: getattr(cell, key) for key in ("w1", "w3", "w2")}
    cell.__class__ = c["LoraRoutedExperts"]          # its properties w1/w2/w3 now answer ``cell.w1``
    for key, base in bases.items():
        # the base stays registered as ``w1`` (a parameter's name follows the attribute it is registered under:
        # MindFormers' update_parameters_name re-derives it) and is read, as the same object, through ``w1_base``
        setattr(cell, f"{key}_base", base)
        a, b = _adapter_pair(f"{path}.{key}", base.shape, settings)
        for param in (a, b):
            setattr(cell, param.name.rsplit(".", 1)[1], param)
    cell.lora_bmm = c["ops"].BatchMatMul()
    cell.lora_scaling = settings.scaling


def _compute_dtype(settings: LoraSettings, own):
    from research.deepseek2.dtypes import to_mindspore
    return own if settings.compute_dtype is None else to_mindspore(settings.compute_dtype)


# ---------------------------------------------------------------------------------------------- public API
def validate_pet_config(pet_config, network=None) -> LoraSettings:
    """Check a pet_config (and, given a network, that target_modules matches one of its projections); returns the
    LoraSettings. PetConfigError (a ValueError) naming the field otherwise."""
    settings = parse_pet_config(pet_config)
    if network is not None:
        targeted_projections([p.name for p in network.get_parameters()], settings)
    return settings


def apply_lora(network, pet_config) -> List[str]:
    """Put LoRA adapters on a built DeepseekV2ForCausalLM and freeze everything else; returns the adapter names.

    Apply it before the network first runs in graph mode (MindSpore reuses a compiled graph), after or before loading
    the base weights (the base Parameters are the same objects; a base checkpoint simply has no adapters).
    """
    settings = validate_pet_config(pet_config, network)
    if adapter_names(network):
        raise ValueError("apply_lora: the network already has LoRA adapters")
    if getattr(getattr(network, "config", None), "use_past", False):
        raise ValueError("apply_lora: the network is built with use_past (prediction): merge the adapters into a plain "
                         "model instead (lora.merged_weights / lora.merge_state)")
    if network.compile_cache:
        raise ValueError("apply_lora: the network has already been compiled in graph mode, and MindSpore would keep "
                         "running the compiled graph without adapters; apply LoRA to a freshly built network")
    cells = dict(network.cells_and_names())
    c = _cells()
    targets = targeted_projections([p.name for p in network.get_parameters()], settings)
    done = set()
    for weight, projection in targets.items():
        if projection == weight:                                    # stacked routed experts: once per cell
            path = projection.rsplit(".", 1)[0]
            if path not in done:
                if not isinstance(cells.get(path), c["RoutedExperts"]):
                    raise TypeError(f"apply_lora: {path} is not a RoutedExperts cell")
                _to_lora_routed(cells[path], path, settings)
                done.add(path)
            continue
        if not isinstance(cells.get(projection), c["Linear"]):
            raise TypeError(f"apply_lora: {projection} is not a Linear cell")
        _to_lora_linear(cells[projection], projection, settings)
    network.lora_settings = settings
    freeze_base(network, settings)
    return adapter_names(network)


def freeze_base(network, pet_config=None):
    """requires_grad False for every parameter but the adapters (MindFormers' freeze_delta rule), then
    freeze_include / freeze_exclude of the pet_config (fnmatch patterns over parameter names, as mindpet's)."""
    settings = parse_pet_config(pet_config) if pet_config is not None else getattr(network, "lora_settings", None)
    include = settings.freeze_include if settings else ()
    exclude = settings.freeze_exclude if settings else ()
    for param in network.get_parameters():
        param.requires_grad = _ADAPTER_MARK in param.name
        inc = any(fnmatch.fnmatch(param.name, p) for p in include)
        exc = any(fnmatch.fnmatch(param.name, p) for p in exclude)
        if inc != exc:
            param.requires_grad = exc


def adapter_names(network) -> List[str]:
    """The adapter parameter names of a network, in network order."""
    return [p.name for p in network.get_parameters() if _ADAPTER_MARK in p.name]


def adapter_state(network) -> Dict[str, np.ndarray]:
    """{adapter name: numpy array} of just the adapters (what a LoRA checkpoint needs beside the base); copies, so
    they do not follow later training steps (on CPU ``asnumpy`` can share the Parameter's memory)."""
    return {p.name: p.asnumpy().copy() for p in network.get_parameters() if _ADAPTER_MARK in p.name}


def merged_weights(network) -> Dict[str, np.ndarray]:
    """{name: numpy array} of the plain DeepseekV2ForCausalLM equal to this LoRA network: every weight, targeted ones
    merged (W + (alpha / r) B @ A), no adapters and no inference buffers (the latent cache)."""
    from research.deepseek2.inventory import buffers
    settings = getattr(network, "lora_settings", None)
    skip = set(buffers(network.config)) if hasattr(network, "config") else set()
    weights = {p.name: p.asnumpy().copy() for p in network.get_parameters()
               if _ADAPTER_MARK not in p.name and p.name not in skip}
    adapters = adapter_state(network)
    if adapters and settings is None:
        raise ValueError("merged_weights: the network has adapters but no lora_settings (use merge_state)")
    return merge_state(weights, adapters, settings) if adapters else weights
