"""LoRA adapters on a built DeepseekV2ForCausalLM (the settings, names and merge are ``config.py``'s).

``apply_lora`` turns every targeted Linear into a ``LoraLinear`` and, with ``target_routed_experts``, every
``RoutedExperts`` into a ``LoraRoutedExperts``, in place (the same objects holding the same base Parameters: nothing
full-size is allocated and every base name stays), then freezes everything but the adapters. ``merged_weights``
gives the plain model equal to a LoRA network (prediction runs merged weights).
"""
import fnmatch
import math
from typing import Dict, List

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Uniform, initializer

from research.deepseek2.dtypes import to_mindspore
from research.deepseek2.layers import Linear
from research.deepseek2.lora.config import (ADAPTER_MARK, LoraSettings, adapter_names_of, adapter_shapes, merge_state,
                                            parse_pet_config, targeted_projections)
from research.deepseek2.moe import RoutedExperts
from research.deepseek2.planning.inventory import buffers

__all__ = ["LoraLinear", "LoraRoutedExperts", "validate_pet_config", "apply_lora", "freeze_base", "adapter_names",
           "adapter_state", "merged_weights"]


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

    def expert_weights(self, name: str, index=None):
        """RoutedExperts.expert_weights of W + (alpha / r) B A. Named attribute by attribute: graph mode resolves
        ``getattr(self, name)`` to the registered base Parameter, not to the property above, and the adapters would
        get no gradient."""
        if name == "w1":
            weight = self.w1
        elif name == "w3":
            weight = self.w3
        else:
            weight = self.w2
        picked = weight if index is None else ops.gather(weight, index, 0)
        return ops.cast(picked, self.compute_dtype)


def _adapter_pair(projection: str, weight_shape, settings: LoraSettings):
    """Fresh A (random) and B (lora_b_init, zeros by default) Parameters for a weight of ``weight_shape``."""
    dtype = to_mindspore(settings.param_init_type)
    shape_a, shape_b = adapter_shapes(tuple(weight_shape), settings.lora_rank)
    init_a = settings.lora_a_init or Uniform(1.0 / math.sqrt(shape_a[-1]))
    name_a, name_b = adapter_names_of(projection)
    return (Parameter(initializer(init_a, shape_a, dtype), name=name_a),
            Parameter(initializer(settings.lora_b_init, shape_b, dtype), name=name_b))


def _to_lora_linear(cell, projection: str, settings: LoraSettings):
    cell.__class__ = LoraLinear
    a, b = _adapter_pair(projection, cell.weight.shape, settings)
    cell.mindpet_delta_lora_a, cell.mindpet_delta_lora_b = a, b
    a.name, b.name = adapter_names_of(projection)                  # a Parameter set on a built cell keeps no prefix
    cell.lora_dropout = nn.Dropout(p=settings.lora_dropout) if settings.lora_dropout > 0 else nn.Identity()
    cell.lora_a_matmul = ops.MatMul(transpose_b=True)
    cell.lora_b_matmul = ops.MatMul(transpose_b=True)
    cell.lora_scaling = settings.scaling
    cell.lora_compute_dtype = _compute_dtype(settings, cell.compute_dtype)


def _to_lora_routed(cell, path: str, settings: LoraSettings):
    bases = {key: getattr(cell, key) for key in ("w1", "w3", "w2")}
    cell.__class__ = LoraRoutedExperts          # its properties w1/w2/w3 now answer ``cell.w1``
    for key, base in bases.items():
        # the base stays registered as ``w1`` (a parameter's name follows the attribute it is registered under:
        # MindFormers' update_parameters_name re-derives it) and is read, as the same object, through ``w1_base``
        setattr(cell, f"{key}_base", base)
        a, b = _adapter_pair(f"{path}.{key}", base.shape, settings)
        for param in (a, b):
            setattr(cell, param.name.rsplit(".", 1)[1], param)
    cell.lora_bmm = ops.BatchMatMul()
    cell.lora_scaling = settings.scaling


def _compute_dtype(settings: LoraSettings, own):
    return own if settings.compute_dtype is None else to_mindspore(settings.compute_dtype)


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
    targets = targeted_projections([p.name for p in network.get_parameters()], settings)
    done = set()
    for weight, projection in targets.items():
        if projection == weight:                                    # stacked routed experts: once per cell
            path = projection.rsplit(".", 1)[0]
            if path not in done:
                if not isinstance(cells.get(path), RoutedExperts):
                    raise TypeError(f"apply_lora: {path} is not a RoutedExperts cell")
                _to_lora_routed(cells[path], path, settings)
                done.add(path)
            continue
        if not isinstance(cells.get(projection), Linear):
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
        param.requires_grad = ADAPTER_MARK in param.name
        inc = any(fnmatch.fnmatch(param.name, p) for p in include)
        exc = any(fnmatch.fnmatch(param.name, p) for p in exclude)
        if inc != exc:
            param.requires_grad = exc


def adapter_names(network) -> List[str]:
    """The adapter parameter names of a network, in network order."""
    return [p.name for p in network.get_parameters() if ADAPTER_MARK in p.name]


def adapter_state(network) -> Dict[str, np.ndarray]:
    """{adapter name: numpy array} of just the adapters (what a LoRA checkpoint needs beside the base); copies, so
    they do not follow later training steps (on CPU ``asnumpy`` can share the Parameter's memory)."""
    return {p.name: p.asnumpy().copy() for p in network.get_parameters() if ADAPTER_MARK in p.name}


def merged_weights(network) -> Dict[str, np.ndarray]:
    """{name: numpy array} of the plain DeepseekV2ForCausalLM equal to this LoRA network: every weight, targeted ones
    merged (W + (alpha / r) B @ A), no adapters and no inference buffers (the latent cache)."""
    settings = getattr(network, "lora_settings", None)
    skip = set(buffers(network.config)) if hasattr(network, "config") else set()
    weights = {p.name: p.asnumpy().copy() for p in network.get_parameters()
               if ADAPTER_MARK not in p.name and p.name not in skip}
    adapters = adapter_state(network)
    if adapters and settings is None:
        raise ValueError("merged_weights: the network has adapters but no lora_settings (use merge_state)")
    return merge_state(weights, adapters, settings) if adapters else weights
