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

This module is plain Python (the memory planner reads pet_config through it on a login node; the merge imports
numpy): the settings, the adapters' names and shapes, the merge. ``cells.py`` puts adapters on a built network;
``checkpoints.py`` reads and writes LoRA checkpoints.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Tuple

from research.deepseek2.checkpoints.weight_map import ms_to_hf
from research.deepseek2.dtypes import canonical
from research.deepseek2.errors import PetConfigError

if TYPE_CHECKING:                                       # annotations only: the merge imports numpy when it runs
    import numpy as np

__all__ = ["PetConfigError", "LoraSettings", "DEFAULT_TARGET_MODULES", "ADAPTER_SUFFIXES", "ADAPTER_MARK",
           "LINEAR_CELLS", "parse_pet_config", "projection_of", "targeted_projections", "adapter_shapes",
           "adapter_names_of", "expected_adapter_shapes", "merge_state"]

ADAPTER_SUFFIXES = ("mindpet_delta_lora_a", "mindpet_delta_lora_b")   # mindpet's names: MindFormers' freeze keeps them
ADAPTER_MARK = "mindpet_delta_lora"
# the Linear cells of a decoder layer (MLA projections, dense FFN / shared experts); lm_head is not a target, as in
# MindFormers (its LoraModel only looks inside ``network.model``)
LINEAR_CELLS = ("q_proj", "q2l_proj", "l2q_proj", "kv2l", "lkv2kv", "wo", "w1", "w2", "w3")
DEFAULT_TARGET_MODULES = "|".join(LINEAR_CELLS)
_LINEAR_WEIGHT = re.compile(r"(model\.layers\.\d+\..*\.(?:%s))\.weight$" % "|".join(LINEAR_CELLS))
_ROUTED_WEIGHT = re.compile(r"(model\.layers\.\d+\.feed_forward\.routed_experts)\.(w1|w2|w3)$")
_DEFAULTS = dict(pet_type=None, lora_rank=8, lora_alpha=16, lora_dropout=0.01, target_modules=None,
                 exclude_layers=None, target_routed_experts=False, lora_a_init=None, lora_b_init="zeros",
                 param_init_type="float32", compute_dtype=None, freeze_include=None, freeze_exclude=None)


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
    from research.deepseek2.planning.inventory import expected_shapes
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
