"""Activation bytes of the memory plan (``memory.py``): what one decoder layer keeps for its backward per
micro-batch, or holds in a forward, from the shapes alone. Plain Python.

Training, per micro-batch (b = batch_size, s = seq_length, c = bytes(compute_dtype), t = mp, softmax in fp32):
  MLA layer:  s b c [2h + 2rq + a(dn+dr)/t + (r+dr) + r + a(dn+dv)/t + 2a(dn+dr)/t + a dv/t]
              (norm in/out, latents, q, kv, RoPE'd q/k, context: no (s, s) tensor, mla.SoftmaxAttention recomputes
              its probabilities in the backward); use_flash_attention (mla.fused_attention) keeps + 64 b (a/t) s +
              c b (a/t) s (2(dn+dr) - dv) (fp32 softmax max and sum, (b, a/t, s, 8) each; v zero-padded to dn+dr
              and the padded output, less the context)
  attention backward, once per stage, basic-op path: b (a/t) S (2 x 4 + c) (one query chunk's recomputed fp32
              probabilities, their gradient, the scores' gradient; S = s^2, or C_i stop_i of the last chunk)
  dense FFN:  s b c [2h + 3f/t]             (norm in/out, gate, up, gate*up)
  MoE FFN:    s b c [2h + 3 ns fm / t] + 8 s b E + R c [2h + 3fm/t]
              (norm in/out, shared experts, fp32 router logits + probs, R dispatched rows: input, gate, up,
               product, output); dropless dispatch R = k s b max(1, capacity_factor), capacity dispatch R = E C,
               C = min(s b, ceil(expert_capacity_factor k s b / E)), C = s b when the factor is 0
  (the 2h terms and the layer input shrink by t under use_seq_parallel)
  no recompute: in_flight x sum of the stage's layers;  recompute: in_flight x layers x s b h c (layer inputs)
  + the largest layer (one layer re-run at a time). in_flight = min(pp - stage, micro_batch_num) micro-batches
  (1F1B). The last stage: the logits s b V/t' (c + 4 + 4) (logits, fp32 copy, gradient; t' = mp or vocab_emb_dp 1).
  LoRA: each Linear adapter's s b r c (s b in (c + 1) with dropout) and routed-expert adapters' effective weights.
Prediction: one layer's prefill activations; with use_past and prefill_chunk_size p < s, a prefill call's: p tokens,
  attention (b/dp) A p s (4 + c), A = the heads of a block (``chunks.head_blocks``, by attention_chunk_size).
Symbols: h hidden, a heads, dn/dr/dv no-RoPE/RoPE/value head dims, r kv_lora_rank, rq q_lora_rank, f
intermediate_size, fm moe_intermediate_size, E n_routed_experts, ns n_shared_experts, k top-k, V vocab.

``st`` below is the plan's settings (``memory._Settings``: shape, parallel degrees, dtypes in bytes, batch, switches).
"""
from typing import Optional

from research.deepseek2.planning.capacity import expert_capacity
from research.deepseek2.planning.chunks import chunk_scores, head_blocks
from research.deepseek2.planning.counts import card_share, layer_adapters
from research.deepseek2.planning.inventory import is_moe_layer, parts

__all__ = ["layer_activation_bytes", "attention_core_bytes", "attention_backward_bytes", "training_activation_bytes"]


def layer_activation_bytes(st, layer: int, b: float, t: int, seq_parallel: bool,
                            keys: Optional[int] = None, training: bool = False) -> float:
    """Bytes one decoder layer keeps for its backward for one micro-batch (formula in the module docstring), or holds
    in a forward; keys: the cache length a prefill chunk of st.seq_length tokens attends to (None: causal)."""
    m, c, s = st.shape, st.compute_bytes, st.seq_length
    h, a = m.hidden_size, m.num_attention_heads
    dn, dr, dv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    r, rq = m.kv_lora_rank, m.q_lora_rank or 0
    hh = 2 * h / (t if seq_parallel else 1)          # norm input + output
    attn = s * b * c * (hh + 2 * rq + a * (dn + dr) / t + (r + dr) + r + a * (dn + dv) / t
                        + 2 * a * (dn + dr) / t + a * dv / t)
    fused = st.flash_attention and keys is None      # training keeps only the fused kernel's own buffers
    attn += attention_core_bytes(st, b, t, fused, keys) if fused or not training else 0.0
    lora = _lora_activation_bytes(st, layer, b) if st.lora else 0.0
    return attn + _ffn_activation_bytes(st, layer, b, t, hh) + lora


def attention_core_bytes(st, b: float, t: int, fused: bool, keys: Optional[int] = None) -> float:
    """The attention's own buffers in a forward (besides q, k, v and the context): the softmax output and its cast
    for the PV matmul; fused, the kernel's fp32 softmax max and sum, (b, a/t, s, 8) each, the value zero-padded to
    the q/k head dim and the padded output (its d_v slice is the context), which its backward keeps."""
    m, c, s, heads = st.shape, st.compute_bytes, st.seq_length, b * (st.shape.num_attention_heads / t)
    if fused:                                        # 2 x 8 fp32 statistics per row: 64 bytes
        return heads * s * (64 + c * (2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) - m.v_head_dim))
    if keys is not None:                             # a prefill chunk: s rows against the cache, a head block at once
        first, stop = head_blocks(m.num_attention_heads // t, s, st.attention_chunk)[0]            # the largest
        return b * (stop - first) * s * keys * (st.softmax_bytes + c)
    return heads * sum(chunk_scores(s, st.attention_chunk)) * (st.softmax_bytes + c)      # the causal chunks


def attention_backward_bytes(st, b: float, t: int) -> float:
    """Basic-op attention backward (mla.SoftmaxAttention.bprop), one query chunk: fp32 P and dP, dS; 0 when fused."""
    if st.flash_attention:
        return 0.0
    largest = max(chunk_scores(st.seq_length, st.attention_chunk))
    return b * (st.shape.num_attention_heads / t) * largest * (2 * st.softmax_bytes + st.compute_bytes)


def _lora_activation_bytes(st, layer: int, b: float) -> float:
    """LoRA's own activations in a layer: every Linear adapter keeps its rank-r product s b r c and, with dropout,
    the dropped input and mask s b in' (c + 1) (in': the input columns a card holds); routed-expert adapters keep the
    layer's effective expert weights W + s B A, per card, in the compute dtype."""
    c, s, lora = st.compute_bytes, st.seq_length, st.lora
    total = 0.0
    for weight, _, _ in layer_adapters(st.shape, lora, layer):
        if len(weight.shape) == 3:
            total += card_share(weight, st.parallel.axes()) * c
            continue
        total += s * b * lora.lora_rank * c
        if lora.lora_dropout > 0:
            total += s * b * weight.shape[-1] / parts(weight, st.parallel.axes())[-1] * (c + 1)
    return total


def _ffn_activation_bytes(st, layer: int, b: float, t: int, hh: float) -> float:
    """The FFN's part: norm in/out and the dense FFN, or shared experts, router and the dispatched rows."""
    m, c, s = st.shape, st.compute_bytes, st.seq_length
    if not is_moe_layer(m, layer):
        return s * b * c * (hh + 3 * m.intermediate_size / t)
    e, fm, k = m.n_routed_experts, m.moe_intermediate_size, m.num_experts_per_tok
    rows = (e * expert_capacity(s * b, k, e, st.expert_capacity_factor) if st.moe_dispatch == "capacity"
            else k * s * b * max(1.0, st.capacity_factor))           # capacity: E buffers of C rows
    ffn = s * b * c * (hh + 3 * (m.n_shared_experts or 0) * fm / t) + 8 * s * b * e
    return ffn + rows * c * (2 * m.hidden_size + 3 * fm / t)


def training_activation_bytes(st, stage: int, layers: range) -> float:
    """Activations of a training stage: its layers for the in-flight micro-batches (1F1B), or under recompute their
    inputs and one layer re-run at a time; plus one attention backward's buffers; the last stage adds the logits."""
    p, m, c, s, b = st.parallel, st.shape, st.compute_bytes, st.seq_length, st.batch_size
    in_flight = min(p.pp - stage, p.micro_batch_num) if p.pp > 1 else 1
    per_layer = [layer_activation_bytes(st, layer, b, p.mp, p.use_seq_parallel, training=True) for layer in layers]
    if st.recompute:
        layer_input = s * b * m.hidden_size * c / (p.mp if p.use_seq_parallel else 1)
        act = in_flight * len(layers) * layer_input + max(per_layer, default=0)
    else:
        act = in_flight * sum(per_layer)
    act += attention_backward_bytes(st, b, p.mp)
    if stage == p.pp - 1:
        act += s * b * m.vocab_size / st.vocab_parts * (c + 4 + 4)
    return act
