"""The one table between Hugging Face DeepSeek-V2 tensor names and this model's parameter names, and the two
functions that read it (``hf_to_ms``, ``ms_to_hf``).

Both directions of the conversion, the loaders and the inventory's quantization rule (modules_to_not_convert names
weights either way) read ``NAME_MAP``; nothing else spells a weight name. Which tensors exist for a config, and their
shapes, is the inventory's business (``planning/inventory.py``; ``weight_map.py`` puts the two together). Routed
experts are stacked on MindSpore's side: HF ``...mlp.experts.{e}.gate_proj.weight`` (inter, hidden) is row ``e`` of
``...feed_forward.routed_experts.w1`` (n_routed_experts, inter, hidden). All other tensors keep their shape
(MindSpore Dense and torch Linear both store (out, in)).

A quantized weight's scale is its name + ``_scale`` on both sides (HF ``...o_proj.weight_scale``, ours
``...wo.weight_scale``; an expert's ``...experts.{e}.gate_proj.weight_scale`` is row e of
``...routed_experts.w1_scale``); msModelSlim's files also hold a ``.weight_offset`` beside it (zeros for symmetric
quantization), ``<name>_offset`` here: a file-only tensor the loaders check and do not load (``FILE_ONLY_SUFFIX``).

Plain Python: imports nothing of the package.
"""
import re
from typing import Optional, Tuple

__all__ = ["NAME_MAP", "SCALE_SUFFIX", "FILE_ONLY_SUFFIX", "hf_to_ms", "ms_to_hf", "is_stacked"]

SCALE_SUFFIX = "_scale"
FILE_ONLY_SUFFIX = "_offset"

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


def _suffix(name: str) -> Tuple[str, str]:
    """(the weight's name, "_scale" / "_offset" / "")."""
    for suffix in (SCALE_SUFFIX, FILE_ONLY_SUFFIX):
        if name.endswith(suffix):
            return name[:-len(suffix)], suffix
    return name, ""


def hf_to_ms(hf_name: str) -> Tuple[str, Optional[int]]:
    """HF tensor name -> (MindSpore parameter name, expert row or None). KeyError for an unknown name."""
    base, suffix = _suffix(hf_name)
    if suffix:
        ms, expert = hf_to_ms(base)
        return ms + suffix, expert
    for regex, ms in _HF_RULES:
        match = regex.match(hf_name)
        if match:
            groups = match.groupdict()
            name = ms.replace("{L}", groups["L"]) if "L" in groups else ms
            return name, (int(groups["E"]) if "E" in groups else None)
    raise KeyError(f"no entry in weight_map.NAME_MAP for Hugging Face tensor {hf_name!r}")


def ms_to_hf(ms_name: str, expert: Optional[int] = None) -> str:
    """MindSpore parameter name (+ expert row for stacked experts) -> HF tensor name."""
    base, suffix = _suffix(ms_name)
    if suffix:
        return ms_to_hf(base, expert) + suffix
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
