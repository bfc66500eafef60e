"""Parameter counts of a DeepSeek-V2 model by part, in total and activated per token, and of the LoRA adapters a
pet_config adds: sums over the weights of the inventory (``inventory.py``: every weight's name, shape and cuts,
written once). Plain Python; the memory plan (``memory.py``) reports them and counts bytes from them.

The formulas these sums come to, as documentation; with h hidden_size, V vocab_size, a heads, dn/dr/dv the
no-RoPE/RoPE/value head dims, r kv_lora_rank, rq q_lora_rank, f intermediate_size, fm moe_intermediate_size,
E n_routed_experts, ns n_shared_experts:
  embedding V h, lm_head V h (0 if tied), final norm h;  per layer: 2 RMSNorms 2h;
    MLA  q: h rq + rq + rq a (dn+dr)  (q_a_proj, q_a_layernorm, q_b_proj)  or  h a (dn+dr) when rq is null;
         kv: h (r+dr) + r + r a (dn+dv)  (kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj);  o_proj a dv h;
    dense FFN 3 h f;   MoE: routed E 3 h fm, shared 3 h ns fm, gate E h.
  "activated" (per token) = total - embedding table - routed experts not chosen (E - k of E per MoE layer). This is
  the convention of the released numbers: 236B -> 235.7B total / 20.9B activated ("236B / 21B"),
  V2-Lite -> 15.7B / 2.45B ("15.7B / 2.4B").
"""
import functools
import math
from typing import Tuple

from research.deepseek2.lora.config import LoraSettings, adapter_shapes, parse_pet_config, targeted_projections
from research.deepseek2.planning.inventory import (ModelShape, Param, is_moe_layer, layer_parameters, model_shape,
                                                   parameters, parts)

__all__ = ["count_parameters", "count_adapters", "layer_adapters", "card_share", "part_of"]

# count_parameters' parts by weight name, first match (the MLA's lq_norm / lkv_norm are attention, not norms)
_PART_OF_NAME = (("model.tok_embeddings.", "embedding"), ("lm_head.", "lm_head"), ("model.norm_out.", "final_norm"),
                 (".attention.", "attention"), ("_norm.", "norms"), (".router.", "gate"),
                 (".routed_experts.", "routed_experts"), (".shared_experts.", "shared_experts"),
                 (".feed_forward.", "dense_ffn"))
_PARTS = ("embedding", "lm_head", "final_norm", "attention", "norms", "dense_ffn", "routed_experts",
          "shared_experts", "gate")


def part_of(param: Param) -> str:
    """count_parameters' part a weight (or a quantized weight's scale) belongs to, by its name."""
    part = next((part for key, part in _PART_OF_NAME if key in param.name), None)
    if part is None:
        raise ValueError(f"count_parameters does not know which part {param.name} belongs to")
    return part


def count_parameters(model_config) -> dict:
    """Parameter counts of a DeepSeek-V2 model_config (released config.json names, or a ModelShape): sums over the
    inventory's weights.

    Returns totals by part (embedding, lm_head, final_norm, attention, norms, dense_ffn, routed_experts,
    shared_experts, gate), layer counts, ``total`` and ``activated`` (formulas: this module's docstring).
    """
    return dict(_counts(model_shape(model_config)))


@functools.lru_cache(maxsize=64)
def _counts(shape: ModelShape) -> Tuple[Tuple[str, int], ...]:
    """count_parameters' items (cached: memory.smallest_cluster plans the same model many times)."""
    out = dict.fromkeys(_PARTS, 0)
    for param in parameters(shape):
        out[part_of(param)] += param.size
    moe_layers = sum(is_moe_layer(shape, layer) for layer in range(shape.num_hidden_layers))
    experts, chosen = shape.n_routed_experts or 0, shape.num_experts_per_tok or 0
    expert = out["routed_experts"] // (moe_layers * experts) if moe_layers and experts else 0
    out.update(attention_per_layer=sum(p.size for p in layer_parameters(shape, 0) if part_of(p) == "attention"),
               expert_size=expert, num_moe_layers=moe_layers, num_dense_layers=shape.num_hidden_layers - moe_layers)
    out["total"] = sum(out[part] for part in _PARTS)
    out["activated"] = out["total"] - out["embedding"] - moe_layers * (experts - chosen) * expert
    return tuple(out.items())


def card_share(param: Param, axes) -> float:
    """Elements of ``param`` one card holds when the parallel axes have the degrees ``axes`` ({axis: degree})."""
    return param.size / math.prod(parts(param, axes))


# ---------------------------------------------------------------------------------------------- LoRA adapters
@functools.lru_cache(maxsize=64)
def _lora_targets(shape: ModelShape, lora: LoraSettings) -> frozenset:
    """The weights a pet_config puts adapters on: lora.config.targeted_projections over the inventory's names (the rule
    apply_lora uses on the built network)."""
    return frozenset(targeted_projections([p.name for p in parameters(shape)], lora))


def _adapters_of(param: Param, rank: int) -> Tuple[Param, Param]:
    """A (..., r, in) and B (..., out, r) of a targeted weight with its cuts: a leading (expert) cut on both, the cut
    of the output rows on B, the cut of the input columns on A."""
    shape_a, shape_b = adapter_shapes(param.shape, rank)
    out_dim, in_dim = len(param.shape) - 2, len(param.shape) - 1
    return (Param(param.name + ":A", shape_a, tuple(c for c in param.cuts if c.dim != out_dim)),
            Param(param.name + ":B", shape_b, tuple(c for c in param.cuts if c.dim != in_dim)))


@functools.lru_cache(maxsize=4096)
def layer_adapters(shape: ModelShape, lora: LoraSettings, layer: int) -> Tuple[Tuple[Param, Param, Param], ...]:
    """(weight, A, B) of every targeted weight of a decoder layer."""
    targets = _lora_targets(shape, lora)
    return tuple((p,) + _adapters_of(p, lora.lora_rank) for p in layer_parameters(shape, layer) if p.name in targets)


def count_adapters(model_config, pet_config) -> int:
    """LoRA parameters (A and B of every targeted weight) a pet_config adds to a model_config."""
    shape, lora = model_shape(model_config), parse_pet_config(pet_config)
    return sum(a.size + b.size for layer in range(shape.num_hidden_layers)
               for _, a, b in layer_adapters(shape, lora, layer))
