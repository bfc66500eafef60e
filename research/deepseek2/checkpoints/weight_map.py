"""The one table between Hugging Face DeepSeek-V2 tensor names and this model's parameter names.

Both directions of the conversion and the loaders read ``NAME_MAP``; nothing else spells a weight name. Which
tensors exist for a config, and their shapes, is the inventory's business (``inventory.py``); this module names them.
Routed experts are stacked on MindSpore's side: HF ``...mlp.experts.{e}.gate_proj.weight`` (inter, hidden) is row
``e`` of ``...feed_forward.routed_experts.w1`` (n_routed_experts, inter, hidden).
All other tensors keep their shape (MindSpore Dense and torch Linear both store (out, in)).
"""
import re
from typing import Dict, Optional, Tuple

from research.deepseek2.errors import CheckpointError
from research.deepseek2.planning.inventory import expected_shapes

__all__ = ["NAME_MAP", "hf_to_ms", "ms_to_hf", "is_stacked", "expected_ms_shapes", "expected_hf_shapes",
           "hf_state_to_ms"]

# (hf template, ms template): {L} a layer index, {E} an expert index (stacked on the MindSpore side)
NAME_MAP = (
    ("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
    ("model.norm.weight", "model.norm_out.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{L}.input_layernorm.weight", "model.layers.{L}.attention_norm.weight"),
    ("model.layers.{L}.post_attention_layernorm.weight", "model.layers.{L}.ffn_norm.weight"),
    # MLA: query (low-rank, or full-rank when q_lora_rank is null)
    ("model.layers.{L}.self_attn.q_proj.weight", "model.layers.{L}.attention.q_proj.weight"),
    ("model.layers.{L}.self_attn.q_a_proj.weight", "model.layers.{L}.attention.q2l_proj.weight"),
    ("model.layers.{L}.self_attn.q_a_proj.bias", "model.layers.{L}.attention.q2l_proj.bias"),
    ("model.layers.{L}.self_attn.q_a_layernorm.weight", "model.layers.{L}.attention.lq_norm.weight"),
    ("model.layers.{L}.self_attn.q_b_proj.weight", "model.layers.{L}.attention.l2q_proj.weight"),
    # MLA: compressed KV + decoupled RoPE key
    ("model.layers.{L}.self_attn.kv_a_proj_with_mqa.weight", "model.layers.{L}.attention.kv2l.weight"),
    ("model.layers.{L}.self_attn.kv_a_proj_with_mqa.bias", "model.layers.{L}.attention.kv2l.bias"),
    ("model.layers.{L}.self_attn.kv_a_layernorm.weight", "model.layers.{L}.attention.lkv_norm.weight"),
    ("model.layers.{L}.self_attn.kv_b_proj.weight", "model.layers.{L}.attention.lkv2kv.weight"),
    ("model.layers.{L}.self_attn.o_proj.weight", "model.layers.{L}.attention.wo.weight"),
    ("model.layers.{L}.self_attn.o_proj.bias", "model.layers.{L}.attention.wo.bias"),
    # dense FFN (SwiGLU)
    ("model.layers.{L}.mlp.gate_proj.weight", "model.layers.{L}.feed_forward.w1.weight"),
    ("model.layers.{L}.mlp.down_proj.weight", "model.layers.{L}.feed_forward.w2.weight"),
    ("model.layers.{L}.mlp.up_proj.weight", "model.layers.{L}.feed_forward.w3.weight"),
    # DeepSeekMoE
    ("model.layers.{L}.mlp.gate.weight", "model.layers.{L}.feed_forward.router.weight"),
    ("model.layers.{L}.mlp.experts.{E}.gate_proj.weight", "model.layers.{L}.feed_forward.routed_experts.w1"),
    ("model.layers.{L}.mlp.experts.{E}.down_proj.weight", "model.layers.{L}.feed_forward.routed_experts.w2"),
    ("model.layers.{L}.mlp.experts.{E}.up_proj.weight", "model.layers.{L}.feed_forward.routed_experts.w3"),
    ("model.layers.{L}.mlp.shared_experts.gate_proj.weight", "model.layers.{L}.feed_forward.shared_experts.w1.weight"),
    ("model.layers.{L}.mlp.shared_experts.down_proj.weight", "model.layers.{L}.feed_forward.shared_experts.w2.weight"),
    ("model.layers.{L}.mlp.shared_experts.up_proj.weight", "model.layers.{L}.feed_forward.shared_experts.w3.weight"),
)


def _regex(template: str) -> "re.Pattern":
    pattern = re.escape(template).replace(re.escape("{L}"), r"(?P<L>\d+)").replace(re.escape("{E}"), r"(?P<E>\d+)")
    return re.compile(pattern + "$")


_HF_RULES = tuple((_regex(hf), ms) for hf, ms in NAME_MAP)
_MS_RULES = tuple((_regex(ms), hf) for hf, ms in NAME_MAP)


def hf_to_ms(hf_name: str) -> Tuple[str, Optional[int]]:
    """HF tensor name -> (MindSpore parameter name, expert row or None). KeyError for an unknown name."""
    for regex, ms in _HF_RULES:
        match = regex.match(hf_name)
        if match:
            groups = match.groupdict()
            name = ms.replace("{L}", groups["L"]) if "L" in groups else ms
            return name, (int(groups["E"]) if "E" in groups else None)
    raise KeyError(f"no entry in weight_map.NAME_MAP for Hugging Face tensor {hf_name!r}")


def ms_to_hf(ms_name: str, expert: Optional[int] = None) -> str:
    """MindSpore parameter name (+ expert row for stacked experts) -> HF tensor name."""
    for regex, hf in _MS_RULES:
        match = regex.match(ms_name)
        if match:
            groups = match.groupdict()
            name = hf.replace("{L}", groups["L"]) if "L" in groups else hf
            if "{E}" in name:
                if expert is None:
                    raise KeyError(f"{ms_name!r} stacks routed experts: an expert index is needed")
                name = name.replace("{E}", str(expert))
            return name
    raise KeyError(f"no entry in weight_map.NAME_MAP for MindSpore parameter {ms_name!r}")


def is_stacked(ms_name: str) -> bool:
    """True for the routed-expert parameters that stack n_routed_experts HF tensors."""
    return ".routed_experts." in ms_name


def expected_ms_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Every weight the model holds for ``config``, MindSpore name -> shape (from the inventory)."""
    return expected_shapes(config)


def expected_hf_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the released HF checkpoint for ``config``, name -> shape: the inventory under HF names, each
    stacked expert weight (E, ...) as E tensors."""
    shapes = {}
    for name, shape in expected_shapes(config).items():
        if is_stacked(name):
            for expert in range(shape[0]):
                shapes[ms_to_hf(name, expert)] = shape[1:]
        else:
            shapes[ms_to_hf(name)] = shape
    return shapes


def hf_state_to_ms(tensors, n_routed_experts: Optional[int] = None, keep_unknown: bool = False, stack=None):
    """A whole Hugging Face state in memory ({HF name: tensor}) under MindSpore names, each layer's routed experts
    stacked (E, out, in) in expert order. The one place experts are stacked in memory; the streaming reader
    (``HFCheckpoint.iter_parameters``) assembles them shard by shard instead.

    n_routed_experts: experts a stack must hold (default: up to the highest index given); a missing one is a
    ``CheckpointError`` naming the parameter. keep_unknown: names not in ``NAME_MAP`` pass unchanged (MindFormers'
    hooks see optimizer state too) instead of raising KeyError. stack: how rows are stacked (default ``np.stack``).
    """
    import numpy as np
    out, rows = {}, {}
    for hf_name, value in tensors.items():
        try:
            ms_name, expert = hf_to_ms(hf_name)
        except KeyError:
            if not keep_unknown:
                raise
            ms_name, expert = hf_name, None
        if expert is None:
            out[ms_name] = value
        else:
            rows.setdefault(ms_name, {})[expert] = value
    for ms_name, by_expert in rows.items():
        count = int(n_routed_experts or max(by_expert) + 1)
        missing = [e for e in range(count) if e not in by_expert]
        if missing:
            raise CheckpointError(f"{ms_name}: experts {missing[:8]} of {count} are missing (every expert of a "
                                  f"layer must come together; n_routed_experts = {count})")
        out[ms_name] = (stack or np.stack)([by_expert[e] for e in range(count)])
    return out
