"""Parameter counts of a DeepSeek-V2 model by part, in total and activated per token: sums over the weights of the
inventory (research/deepseek2/inventory.py). Plain Python; plan_memory reports them (its docstring gives the
formulas these sums come to, and the released sizes they reproduce).
"""
import functools
from typing import Tuple

from research.deepseek2.inventory import ModelShape, Param, is_moe_layer, layer_parameters, model_shape, parameters

__all__ = ["count_parameters"]

# count_parameters' parts by weight name, first match (the MLA's lq_norm / lkv_norm are attention, not norms)
_PART_OF_NAME = (("model.tok_embeddings.", "embedding"), ("lm_head.", "lm_head"), ("model.norm_out.", "final_norm"),
                 (".attention.", "attention"), ("_norm.", "norms"), (".router.", "gate"),
                 (".routed_experts.", "routed_experts"), (".shared_experts.", "shared_experts"),
                 (".feed_forward.", "dense_ffn"))
_PARTS = ("embedding", "lm_head", "final_norm", "attention", "norms", "dense_ffn", "routed_experts",
          "shared_experts", "gate")


def _part(param: Param) -> str:
    """count_parameters' part a weight belongs to, by its name."""
    part = next((part for key, part in _PART_OF_NAME if key in param.name), None)
    if part is None:
        raise ValueError(f"count_parameters does not know which part {param.name} belongs to")
    return part


def count_parameters(model_config) -> dict:
    """Parameter counts of a DeepSeek-V2 model_config (released config.json names, or a ModelShape): sums over the
    inventory's weights.

    Returns totals by part (embedding, lm_head, final_norm, attention, norms, dense_ffn, routed_experts,
    shared_experts, gate), layer counts, ``total`` and ``activated`` (formulas: the docstring of plan_memory).
    """
    return dict(_counts(model_shape(model_config)))


@functools.lru_cache(maxsize=64)
def _counts(shape: ModelShape) -> Tuple[Tuple[str, int], ...]:
    """count_parameters' items (cached: plan_memory.smallest_cluster plans the same model many times)."""
    out = dict.fromkeys(_PARTS, 0)
    for param in parameters(shape):
        out[_part(param)] += param.size
    moe_layers = sum(is_moe_layer(shape, layer) for layer in range(shape.num_hidden_layers))
    experts, chosen = shape.n_routed_experts or 0, shape.num_experts_per_tok or 0
    expert = out["routed_experts"] // (moe_layers * experts) if moe_layers and experts else 0
    out.update(attention_per_layer=sum(p.size for p in layer_parameters(shape, 0) if _part(p) == "attention"),
               expert_size=expert, num_moe_layers=moe_layers, num_dense_layers=shape.num_hidden_layers - moe_layers)
    out["total"] = sum(out[part] for part in _PARTS)
    out["activated"] = out["total"] - out["embedding"] - moe_layers * (experts - chosen) * expert
    return tuple(out.items())
