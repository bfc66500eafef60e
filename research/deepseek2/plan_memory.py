"""Per-card memory plan of a DeepSeek-V2 MindFormers YAML (training or prediction), from the shapes alone.

    python research/deepseek2/plan_memory.py --config research/deepseek2/finetune_deepseek2_236B.yaml \
        [--card_memory_gb 64] [--overhead_gb 2] [--json]

Plain Python + PyYAML: no MindSpore import. Sizes are in GB of 2^30 bytes (as MindSpore's max_device_memory);
parameter counts in units (B = 1e9).

Parameters: ``count_parameters`` (research/deepseek2/param_counts.py: sums over the inventory's weights; its
docstring gives the formulas and the released sizes they reproduce).

Sharding per card (MindFormers semantics of parallel_config; mp model_parallel, ep expert_parallel, dp, pp), by
each weight's cuts in the inventory: an "ep" cut: routed experts, split ep x mp (the only ones); an "mp" cut: split
by mp (q_b_proj/q_proj and kv_b_proj by heads, o_proj by rows, dense and shared-expert FFNs); a "vocab" cut: the
embedding / lm_head, split by mp unless vocab_emb_dp; the rest whole on every card of a stage (RMSNorms, q_a_proj,
kv_a_proj_with_mqa: the MLA latents are not split, gate). Pipeline: stage i holds its layers (num_hidden_layers /
pp, or MindFormers' offset), stage 0 the embedding, the last one the final norm and lm_head; the busiest is reported.

Training bytes per card:
  weights P x bytes(param_init_type); gradients P x bytes(param_init_type);
  optimizer (AdamW): 2 fp32 moments + an fp32 master copy when the weights are not fp32 (8 or 12 bytes/param);
    with parallel.enable_parallel_optimizer they are divided by the copies of each weight (dp x mp for whole
    weights, dp for mp-split ones, dp / ep for experts); with optimizer.swap they live in host memory (reported
    separately, per node of 8 cards);
  activations per micro-batch (b = batch_size, s = seq_length, c = bytes(compute_dtype), t = mp, softmax in fp32):
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
  overhead: --overhead_gb (workspace, communication buffers, fragmentation), 2 GB by default.
Prediction (run_mode predict or use_past): weights in bytes(param_init_type), no gradients/optimizer;
  latent KV cache (b/dp) x layers x seq_length x (r + dr) x c, whole on every card (MLA latents are not split);
  workspace = one layer's prefill activations + fp32 logits (b/dp) s V/t' x 4 + overhead; with use_past and
  prefill_chunk_size p < s, a prefill call's: p tokens, attention (b/dp) A p s (4 + c), A = the heads of a block
  (inventory.head_blocks, by attention_chunk_size), logits of p tokens.
A YAML with use_flash_attention on is also planned with it off: the report prints the attention's bytes per layer
and micro-batch and once per stage, the activations (workspace) and the total per card both ways.

LoRA (model_config.pet_config, lora.py; training only): every targeted weight gets A (..., r, in) and B (..., out,
r), cut like the weight (an expert on both, its output rows on B, its input columns on A). The frozen base has no
gradients or optimizer states; the adapters (pet_config.param_init_type, fp32 by default) have both (8 bytes/param,
+ 4 for a master copy unless fp32; the parallel optimizer divides them by dp x mp). Activations: the full
finetune's, plus each Linear adapter's s b r c (s b in (c + 1) with dropout) and routed-expert adapters' weights.

The smallest cluster: multiples of 8 cards keeping model_parallel and pipeline_stage, data_parallel growing with the
cards, expert_parallel the largest value <= the YAML's dividing data_parallel and n_routed_experts (parallel_check).
"""
import argparse
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Dict, Iterable, List, Optional, Tuple

import yaml

from research.deepseek2.dtypes import bytes_of
from research.deepseek2.inventory import (ModelShape, Param, chunk_scores, expert_capacity, head_blocks,
                                          is_moe_layer, layer_parameters, model_shape, parameters, parts)
from research.deepseek2.lora import LoraSettings, adapter_shapes, parse_pet_config, targeted_projections
from research.deepseek2.param_counts import count_parameters
from research.deepseek2.parallel_check import (ParallelShape, check_parallel_config, is_predict, layers_per_stage,
                                               parallel_shape)

__all__ = ["count_parameters", "count_adapters", "plan", "smallest_cluster", "full_finetune", "format_plan", "GIB"]

GIB = float(2 ** 30)
CARDS_PER_NODE = 8
ADAM_MOMENT_BYTES = 8          # exp_avg + exp_avg_sq in fp32
MASTER_COPY_BYTES = 4          # fp32 master weights when the weights themselves are fp16/bf16
BYTE_KEYS = ("weights", "adapters", "gradients", "optimizer", "activations", "kv_cache", "workspace", "overhead")

# ---------------------------------------------------------------------------------------------- LoRA adapters
@functools.lru_cache(maxsize=64)
def _lora_targets(shape: ModelShape, lora: LoraSettings) -> frozenset:
    """The weights a pet_config puts adapters on: lora.targeted_projections over the inventory's names (the rule
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
def _layer_adapters(shape: ModelShape, lora: LoraSettings, layer: int) -> Tuple[Tuple[Param, Param, Param], ...]:
    """(weight, A, B) of every targeted weight of a decoder layer."""
    targets = _lora_targets(shape, lora)
    return tuple((p,) + _adapters_of(p, lora.lora_rank) for p in layer_parameters(shape, layer) if p.name in targets)


def count_adapters(model_config, pet_config) -> int:
    """LoRA parameters (A and B of every targeted weight) a pet_config adds to a model_config."""
    shape, lora = model_shape(model_config), parse_pet_config(pet_config)
    return sum(a.size + b.size for layer in range(shape.num_hidden_layers)
               for _, a, b in _layer_adapters(shape, lora, layer))


@dataclass(frozen=True)
class _Weights:
    """Parameter counts by how the cards of a pipeline stage split them (``_kind``)."""
    whole: int = 0
    split: int = 0
    experts: int = 0
    vocab: int = 0

    def __add__(self, other: "_Weights") -> "_Weights":
        return _Weights(self.whole + other.whole, self.split + other.split, self.experts + other.experts,
                        self.vocab + other.vocab)

    @classmethod
    def of(cls, params: Iterable[Param]) -> "_Weights":
        sums = dict.fromkeys(("whole", "split", "experts", "vocab"), 0)
        for param in params:
            sums[_kind(param)] += param.size
        return cls(**sums)


def _kind(param: Param) -> str:
    """Routed experts (an "ep" cut: split ep x mp), split by mp (an "mp" cut), the vocabulary (embedding / lm_head:
    a "vocab" cut), or whole."""
    return next((kind for axis, kind in (("ep", "experts"), ("mp", "split"), ("vocab", "vocab")) if param.cut(axis)),
                "whole")


@functools.lru_cache(maxsize=4096)
def _layer_weights(shape: ModelShape, layer: int) -> _Weights:
    """The weights of one decoder layer (cached: smallest_cluster plans the same model many times)."""
    return _Weights.of(layer_parameters(shape, layer))


@functools.lru_cache(maxsize=64)
def _outer_weights(shape: ModelShape) -> Tuple[_Weights, _Weights]:
    """The weights outside the decoder layers: before them (embedding: the first stage), after them (final norm,
    lm_head: the last stage)."""
    before, after, in_layers = [], [], False
    for param in parameters(shape):
        if param.name.startswith("model.layers."):
            in_layers = True
        else:
            (after if in_layers else before).append(param)
    return _Weights.of(before), _Weights.of(after)


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True, eq=False)
class _Settings:
    """What plan() reads from a loaded YAML."""
    model_config: dict                  # model.model_config without its ``type``
    parallel_config: dict
    shape: ModelShape
    parallel: ParallelShape
    predict: bool
    param_bytes: int                    # bytes of param_init_type
    compute_bytes: int
    softmax_bytes: int
    seq_length: int
    batch_size: int                     # per micro-batch and data-parallel rank
    recompute: bool
    parallel_optimizer: bool
    swap: bool                          # optimizer states in host memory
    moe_dispatch: Optional[str]
    expert_capacity_factor: float
    capacity_factor: float
    flash_attention: bool               # model_config.use_flash_attention: the fused attention kernel
    lora: Optional[LoraSettings] = None   # model_config.pet_config (training only; prediction runs merged weights)
    attention_chunk: int = 1024         # model_config.attention_chunk_size: query rows per attention block
    prefill_chunk: int = 0              # model_config.prefill_chunk_size: prompt tokens per prefill call (use_past)

    @property
    def vocab_parts(self) -> int:
        """Parts the embedding / lm_head are split into (mp unless vocab_emb_dp)."""
        return self.parallel.axes()["vocab"]

    @property
    def optimizer_bytes_per_param(self) -> int:
        return ADAM_MOMENT_BYTES + (MASTER_COPY_BYTES if self.param_bytes != 4 else 0)


def _settings(config: dict) -> _Settings:
    """The model shape, parallel degrees, dtypes, batch and memory switches of a loaded YAML."""
    mc = {k: v for k, v in ((config.get("model") or {}).get("model_config") or {}).items() if k != "type"}
    if not mc:
        raise ValueError("model.model_config is missing from the config")
    pc = dict(config.get("parallel_config") or {})
    predict = is_predict(config)
    recompute = config.get("recompute_config") or {}
    if not isinstance(mc.get("use_flash_attention", False), bool):
        raise ValueError(f"model_config.use_flash_attention = {mc['use_flash_attention']!r}: expected True or False")
    dtype = lambda field: bytes_of(mc.get(field, "float32"), "model_config." + field)   # noqa: E731
    chunks = {key: mc.get(key, default) for key, default in (("attention_chunk_size", 1024), ("prefill_chunk_size", 0))}
    for key in (k for k, v in chunks.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise ValueError(f"model_config.{key} = {chunks[key]!r}: expected an integer >= 0")
    return _Settings(
        model_config=mc, parallel_config=pc, shape=model_shape(mc), parallel=parallel_shape(pc), predict=predict,
        param_bytes=dtype("param_init_type"), compute_bytes=dtype("compute_dtype"),
        softmax_bytes=dtype("softmax_compute_type"), seq_length=mc.get("seq_length", 4096),
        batch_size=(config.get("runner_config") or {}).get("batch_size", mc.get("batch_size", 1)),
        recompute=bool(recompute.get("recompute")) if isinstance(recompute, dict) else bool(recompute),
        parallel_optimizer=bool((config.get("parallel") or {}).get("enable_parallel_optimizer")) and not predict,
        swap=bool((config.get("optimizer") or {}).get("swap")) and not predict,
        moe_dispatch=mc.get("moe_dispatch"), expert_capacity_factor=float(mc.get("expert_capacity_factor") or 0.0),
        capacity_factor=float(mc.get("capacity_factor") or 0.0), flash_attention=mc.get("use_flash_attention", False),
        lora=parse_pet_config(mc["pet_config"]) if mc.get("pet_config") and not predict else None,
        attention_chunk=chunks["attention_chunk_size"], prefill_chunk=chunks["prefill_chunk_size"])


# ---------------------------------------------------------------------------------------------- weights per stage
def _stage_layers(st: _Settings) -> List[range]:
    """The decoder layers of each pipeline stage (MindFormers' split, with model_config.offset)."""
    counts = layers_per_stage(st.shape.num_hidden_layers, st.parallel.pp, st.model_config.get("offset"))
    starts = list(accumulate([0] + counts))
    return [range(starts[stage], starts[stage] + counts[stage]) for stage in range(st.parallel.pp)]


def _stage_weights(st: _Settings, stage: int, layers: range) -> _Weights:
    """The weights a stage holds: its layers, the embedding on the first stage, final norm and lm_head on the last."""
    weights = sum((_layer_weights(st.shape, layer) for layer in layers), _Weights())
    first, last = _outer_weights(st.shape)
    if stage == 0:
        weights += first
    if stage == st.parallel.pp - 1:
        weights += last
    return weights


def _whole_and_split(weights: _Weights, st: _Settings) -> Tuple[int, int]:
    """Whole and mp-split parameters, the embedding / lm_head counted as split by mp unless vocab_emb_dp."""
    if st.vocab_parts == 1:
        return weights.whole + weights.vocab, weights.split
    return weights.whole, weights.split + weights.vocab


def _params_per_card(weights: _Weights, st: _Settings) -> float:
    """Parameters one card of the stage holds: whole + split / mp + experts / (ep x mp)."""
    whole, split = _whole_and_split(weights, st)
    p = st.parallel
    return whole + split / p.mp + weights.experts / (p.ep * p.mp)


def _optimizer_shard(weights: _Weights, st: _Settings) -> float:
    """Parameters whose optimizer states one card keeps under the parallel optimizer: each weight's states divided
    over its copies in the stage (dp x mp for whole weights, dp for mp-split ones, dp / ep for experts)."""
    whole, split = _whole_and_split(weights, st)
    p = st.parallel
    return whole / (p.dp * p.mp) + split / p.mp / p.dp + weights.experts / (p.ep * p.mp) / max(1, p.dp // p.ep)


# ---------------------------------------------------------------------------------------------- activations
def _layer_activation_bytes(st: _Settings, layer: int, b: float, t: int, seq_parallel: bool,
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
    attn += _attention_core_bytes(st, b, t, fused, keys) if fused or not training else 0.0
    lora = _lora_activation_bytes(st, layer, b) if st.lora else 0.0
    return attn + _ffn_activation_bytes(st, layer, b, t, hh) + lora


def _attention_core_bytes(st: _Settings, b: float, t: int, fused: bool, keys: Optional[int] = None) -> float:
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


def _attention_backward_bytes(st: _Settings, b: float, t: int) -> float:
    """Basic-op attention backward (mla.SoftmaxAttention.bprop), one query chunk: fp32 P and dP, dS; 0 when fused."""
    if st.flash_attention:
        return 0.0
    largest = max(chunk_scores(st.seq_length, st.attention_chunk))
    return b * (st.shape.num_attention_heads / t) * largest * (2 * st.softmax_bytes + st.compute_bytes)


def _card_share(param: Param, st: _Settings) -> float:
    """Elements of ``param`` one card holds (its cuts by the YAML's parallel degrees)."""
    return param.size / math.prod(parts(param, st.parallel.axes()))


def _lora_activation_bytes(st: _Settings, layer: int, b: float) -> float:
    """LoRA's own activations in a layer: every Linear adapter keeps its rank-r product s b r c and, with dropout,
    the dropped input and mask s b in' (c + 1) (in': the input columns a card holds); routed-expert adapters keep the
    layer's effective expert weights W + s B A, per card, in the compute dtype."""
    c, s, lora = st.compute_bytes, st.seq_length, st.lora
    total = 0.0
    for weight, _, _ in _layer_adapters(st.shape, lora, layer):
        if len(weight.shape) == 3:
            total += _card_share(weight, st) * c
            continue
        total += s * b * lora.lora_rank * c
        if lora.lora_dropout > 0:
            total += s * b * weight.shape[-1] / parts(weight, st.parallel.axes())[-1] * (c + 1)
    return total


def _ffn_activation_bytes(st: _Settings, layer: int, b: float, t: int, hh: float) -> float:
    """The FFN's part: norm in/out and the dense FFN, or shared experts, router and the dispatched rows."""
    m, c, s = st.shape, st.compute_bytes, st.seq_length
    if not is_moe_layer(m, layer):
        return s * b * c * (hh + 3 * m.intermediate_size / t)
    e, fm, k = m.n_routed_experts, m.moe_intermediate_size, m.num_experts_per_tok
    rows = (e * expert_capacity(s * b, k, e, st.expert_capacity_factor) if st.moe_dispatch == "capacity"
            else k * s * b * max(1.0, st.capacity_factor))           # capacity: E buffers of C rows
    ffn = s * b * c * (hh + 3 * (m.n_shared_experts or 0) * fm / t) + 8 * s * b * e
    return ffn + rows * c * (2 * m.hidden_size + 3 * fm / t)


def _training_activation_bytes(st: _Settings, stage: int, layers: range) -> float:
    """Activations of a training stage: its layers for the in-flight micro-batches (1F1B), or under recompute their
    inputs and one layer re-run at a time; plus one attention backward's buffers; the last stage adds the logits."""
    p, m, c, s, b = st.parallel, st.shape, st.compute_bytes, st.seq_length, st.batch_size
    in_flight = min(p.pp - stage, p.micro_batch_num) if p.pp > 1 else 1
    per_layer = [_layer_activation_bytes(st, layer, b, p.mp, p.use_seq_parallel, training=True) for layer in layers]
    if st.recompute:
        layer_input = s * b * m.hidden_size * c / (p.mp if p.use_seq_parallel else 1)
        act = in_flight * len(layers) * layer_input + max(per_layer, default=0)
    else:
        act = in_flight * sum(per_layer)
    act += _attention_backward_bytes(st, b, p.mp)
    if stage == p.pp - 1:
        act += s * b * m.vocab_size / st.vocab_parts * (c + 4 + 4)
    return act


# ---------------------------------------------------------------------------------------------- bytes per stage
def _training_bytes(st: _Settings, stage: int, layers: range, weights: _Weights) -> Dict[str, float]:
    """Gradients, optimizer states (on the card or, swapped, in host memory) and activations of a training stage."""
    if st.lora:
        return _lora_training_bytes(st, stage, layers)
    per_card = _params_per_card(weights, st)
    state = (_optimizer_shard(weights, st) if st.parallel_optimizer else per_card) * st.optimizer_bytes_per_param
    return {"gradients": per_card * st.param_bytes, "optimizer": 0.0 if st.swap else state,
            "optimizer_host": state if st.swap else 0.0,
            "activations": _training_activation_bytes(st, stage, layers)}


def _lora_training_bytes(st: _Settings, stage: int, layers: range) -> Dict[str, float]:
    """LoRA: the base is frozen (its weights only: no gradients, no optimizer states); the adapters of the stage's
    layers carry their gradients and AdamW states (2 fp32 moments, plus an fp32 master copy unless they are fp32).
    The parallel optimizer divides every adapter's states over its copies: size / (dp x mp) per card."""
    p = st.parallel
    adapters = [x for layer in layers for _, a, b in _layer_adapters(st.shape, st.lora, layer) for x in (a, b)]
    per_card = sum(_card_share(x, st) for x in adapters)
    adapter_bytes = bytes_of(st.lora.param_init_type)
    held = sum(x.size for x in adapters) / (p.dp * p.mp) if st.parallel_optimizer else per_card
    state = held * (ADAM_MOMENT_BYTES + (MASTER_COPY_BYTES if adapter_bytes != 4 else 0))
    return {"adapter_params_per_card": per_card, "adapters": per_card * adapter_bytes,
            "gradients": per_card * adapter_bytes, "optimizer": 0.0 if st.swap else state,
            "optimizer_host": state if st.swap else 0.0, "activations": _training_activation_bytes(st, stage, layers)}


def _prediction_bytes(st: _Settings, stage: int, layers: range) -> Dict[str, float]:
    """Latent KV cache of a prediction stage (whole on every card) and its workspace: one layer's prefill
    activations, plus the fp32 logits on the last stage."""
    p, m, c, s = st.parallel, st.shape, st.compute_bytes, st.seq_length
    b_card = st.batch_size / p.dp
    kv_cache = b_card * len(layers) * s * (m.kv_lora_rank + m.qk_rope_head_dim) * c
    tokens, keys, run = s, None, st
    if 0 < st.prefill_chunk < s and st.model_config.get("use_past"):      # prefill_in_chunks: chunks vs the cache
        tokens, keys, run = st.prefill_chunk, s, replace(st, seq_length=st.prefill_chunk)
    layer_max = max((_layer_activation_bytes(run, layer, b_card, p.mp, False, keys) for layer in layers), default=0)
    logits = b_card * tokens * m.vocab_size / st.vocab_parts * 4 if stage == p.pp - 1 else 0
    return {"kv_cache": kv_cache, "workspace": layer_max + logits}


def _stage_plan(st: _Settings, stage: int, layers: range, overhead_gb: float) -> dict:
    """Parameters and bytes per card of one pipeline stage."""
    weights = _stage_weights(st, stage, layers)
    per_card = _params_per_card(weights, st)
    entry = {"stage": stage, "layers": len(layers), "params_per_card": per_card, "weights": per_card * st.param_bytes}
    entry.update(_prediction_bytes(st, stage, layers) if st.predict else _training_bytes(st, stage, layers, weights))
    entry["overhead"] = overhead_gb * GIB
    entry["total"] = sum(entry.get(key, 0.0) for key in BYTE_KEYS)
    return entry


# ---------------------------------------------------------------------------------------------- plan
def plan(config: dict, card_memory_gb: float = 64.0, overhead_gb: float = 2.0) -> dict:
    """Memory plan of a MindFormers config dict (a loaded YAML), per card of the busiest pipeline stage: mode, shape
    (dp/mp/pp/ep/...), params (count_parameters), per-card parameter counts, a ``bytes`` breakdown (weights,
    gradients, optimizer, activations or kv_cache/workspace, overhead), ``total_bytes``, ``fits`` against
    card_memory_gb, host bytes of swapped optimizer states, and the parallel_check problems."""
    st = _settings(config)
    return _plan_result(st, _stage_plans(st, overhead_gb), card_memory_gb, overhead_gb)


def _stage_plans(st: _Settings, overhead_gb: float) -> List[dict]:
    """_stage_plan of every pipeline stage."""
    return [_stage_plan(st, stage, layers, overhead_gb) for stage, layers in enumerate(_stage_layers(st))]


def _plan_result(st: _Settings, stages: List[dict], card_memory_gb: float, overhead_gb: float) -> dict:
    """plan()'s answer from the stages: the busiest one's bytes, the settings, the parallel_check problems."""
    p = st.parallel
    busiest = max(stages, key=lambda e: e["total"])
    device_num = p.dp * p.mp * p.pp
    return {
        "mode": "predict" if st.predict else "train",
        "shape": {"data_parallel": p.dp, "model_parallel": p.mp, "pipeline_stage": p.pp, "expert_parallel": p.ep,
                  "micro_batch_num": p.micro_batch_num, "vocab_emb_dp": p.vocab_emb_dp,
                  "use_seq_parallel": p.use_seq_parallel, "device_num": device_num},
        "settings": {"param_bytes": st.param_bytes, "compute_bytes": st.compute_bytes, "seq_length": st.seq_length,
                     "batch_size": st.batch_size, "recompute": st.recompute,
                     "use_flash_attention": st.flash_attention,
                     "parallel_optimizer": st.parallel_optimizer, "optimizer_swap": st.swap,
                     "card_memory_gb": card_memory_gb, "overhead_gb": overhead_gb},
        "params": count_parameters(st.shape),
        "lora": _lora_summary(st),
        "flash_attention": _flash_summary(st, busiest, overhead_gb),
        "stages": stages,
        "busiest_stage": busiest["stage"],
        "bytes": {key: busiest.get(key, 0.0) for key in BYTE_KEYS},
        "params_per_card": busiest["params_per_card"],
        "total_bytes": busiest["total"],
        "host_optimizer_bytes_per_node": busiest.get("optimizer_host", 0.0) * min(CARDS_PER_NODE, device_num),
        "fits": busiest["total"] <= card_memory_gb * GIB,
        "problems": check_parallel_config(st.model_config, st.parallel_config, device_num),
    }


def _lora_summary(st: _Settings) -> Optional[dict]:
    """What a pet_config trains: rank, alpha, adapter parameters and their share of all parameters."""
    if not st.lora:
        return None
    adapters = count_adapters(st.shape, st.lora)
    return {"rank": st.lora.lora_rank, "alpha": st.lora.lora_alpha, "routed_experts": st.lora.target_routed_experts,
            "adapter_params": adapters, "share": adapters / (adapters + count_parameters(st.shape)["total"])}


def _flash_summary(st: _Settings, busiest: dict, overhead_gb: float) -> Optional[dict]:
    """use_flash_attention on: per card, the attention's bytes per layer and micro-batch (kept for the backward;
    predicting, the prefill's), its bytes once per stage (the basic-op backward's chunk), and the busiest stage's
    activations (workspace) and total, with the fused kernel ("fused") and without it ("unfused")."""
    if not st.flash_attention:
        return None
    b, key = (st.batch_size / st.parallel.dp, "workspace") if st.predict else (st.batch_size, "activations")
    basic, t = replace(st, flash_attention=False), st.parallel.mp
    unfused = max(_stage_plans(basic, overhead_gb), key=lambda e: e["total"])
    basic_layer, basic_once = ((_attention_core_bytes(st, b, t, False), 0.0) if st.predict
                               else (0.0, _attention_backward_bytes(basic, b, t)))
    return {side: {"attention_per_layer": layer, "attention_once": once, key: e[key], "total": e["total"]}
            for side, layer, once, e in (("fused", _attention_core_bytes(st, b, t, True), 0.0, busiest),
                                         ("unfused", basic_layer, basic_once, unfused))}


def _largest_ep(limit: int, dp: int, experts: Optional[int]) -> int:
    return next((ep for ep in range(min(limit, dp), 0, -1) if dp % ep == 0 and (not experts or experts % ep == 0)), 1)


def smallest_cluster(config: dict, card_memory_gb: float = 64.0, overhead_gb: float = 2.0,
                     max_cards: int = 4096) -> Optional[dict]:
    """Smallest multiple of 8 cards (keeping model_parallel / pipeline_stage, see the module docstring) that fits:
    {"device_num", "data_parallel", "expert_parallel", "total_bytes"}, or None if none up to max_cards."""
    st = _settings(config)
    shape, pc = st.parallel, st.parallel_config
    group = shape.mp * shape.pp
    step = CARDS_PER_NODE * group // math.gcd(CARDS_PER_NODE, group)      # multiple of 8 and of mp x pp
    for cards in ([group] if group < CARDS_PER_NODE and CARDS_PER_NODE % group == 0 else []) + \
            list(range(step, max_cards + 1, step)):
        dp = cards // group
        ep = _largest_ep(shape.ep, dp, st.shape.n_routed_experts)
        result = plan(dict(config, parallel_config=dict(pc, data_parallel=dp, expert_parallel=ep)), card_memory_gb,
                      overhead_gb)
        if result["fits"] and not result["problems"]:
            return {"device_num": cards, "data_parallel": dp, "expert_parallel": ep,
                    "total_bytes": result["total_bytes"]}
    return None


def full_finetune(config: dict, card_memory_gb: float = 64.0, overhead_gb: float = 2.0) -> Optional[dict]:
    """For a LoRA YAML: the same YAML without pet_config (every weight trained) on the same cards, and its smallest
    cluster (expert_parallel free to grow to n_routed_experts). None without pet_config or for prediction."""
    mc = (config.get("model") or {}).get("model_config") or {}
    if not mc.get("pet_config") or is_predict(config):
        return None
    full = dict(config, model=dict(config["model"], model_config={k: v for k, v in mc.items() if k != "pet_config"}))
    result = plan(full, card_memory_gb, overhead_gb)
    pc = full.get("parallel_config") or {}
    full["parallel_config"] = dict(pc, expert_parallel=max(pc.get("expert_parallel", 1),
                                                          mc.get("n_routed_experts") or 1))
    return {"total_bytes": result["total_bytes"], "fits": result["fits"], "device_num": result["shape"]["device_num"],
            "smallest_cluster": smallest_cluster(full, card_memory_gb, overhead_gb)}


# ---------------------------------------------------------------------------------------------- report
def _gb(value: float) -> str:
    return f"{value / GIB:8.2f} GB"


def format_plan(result: dict, smallest: Optional[dict], name: str = "", full: Optional[dict] = None) -> str:
    """Human-readable table of plan() (and smallest_cluster(), full_finetune()) results."""
    p, sh, st, lora = result["params"], result["shape"], result["settings"], result["lora"]
    lines = [f"{name} ({result['mode']})" if name else f"mode: {result['mode']}",
             f"  model: {p['total'] / 1e9:.2f}B parameters, {p['activated'] / 1e9:.2f}B activated per token "
             f"({p['num_dense_layers']} dense + {p['num_moe_layers']} MoE layers; routed experts "
             f"{p['routed_experts'] / 1e9:.2f}B, attention {p['attention'] / 1e9:.2f}B, "
             f"embedding + lm_head {(p['embedding'] + p['lm_head']) / 1e9:.2f}B)",
             *([f"  LoRA: rank {lora['rank']}, alpha {lora['alpha']:g}, routed experts {lora['routed_experts']}: "
                f"{lora['adapter_params'] / 1e6:.2f}M adapter parameters trained ({100 * lora['share']:.3f}% of all), "
                f"the base frozen (no gradients or optimizer states)"] if lora else []),
             f"  parallel: dp {sh['data_parallel']} x mp {sh['model_parallel']} x pp {sh['pipeline_stage']} = "
             f"{sh['device_num']} cards, ep {sh['expert_parallel']}, micro_batch_num {sh['micro_batch_num']}, "
             f"vocab_emb_dp {sh['vocab_emb_dp']}, seq parallel {sh['use_seq_parallel']}",
             f"  settings: seq_length {st['seq_length']}, batch_size {st['batch_size']}, weights "
             f"{st['param_bytes']} B/param, compute {st['compute_bytes']} B, recompute {st['recompute']}, "
             f"parallel optimizer {st['parallel_optimizer']}, optimizer swap {st['optimizer_swap']}",
             f"  per card (busiest pipeline stage {result['busiest_stage']}, "
             f"{result['params_per_card'] / 1e9:.3f}B parameters):"]
    labels = {"weights": "weights (frozen)" if lora else "weights", "adapters": "LoRA adapters",
              "gradients": "gradients", "optimizer": "optimizer states", "activations": "activations",
              "kv_cache": "latent KV cache", "workspace": "workspace", "overhead": "overhead (reserve)"}
    for key, label in labels.items():
        if key in result["stages"][result["busiest_stage"]]:
            lines.append(f"    {label:<20}{_gb(result['bytes'][key])}")
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines.append(f"    {'total':<20}{_gb(result['total_bytes'])}  of {st['card_memory_gb']:g} GB per card: {verdict}")
    for side, entry in (result["flash_attention"] or {}).items():
        key = "activations" if "activations" in entry else "workspace"
        lines.append(f"  use_flash_attention {'True: ' if side == 'fused' else 'False:'} attention "
                     f"{entry['attention_per_layer'] / GIB:.2f} GB per layer and micro-batch + "
                     f"{entry['attention_once'] / GIB:.2f} GB once, {key} "
                     f"{entry[key] / GIB:.2f} GB, total {entry['total'] / GIB:.2f} GB per card")
    if result["host_optimizer_bytes_per_node"]:
        lines.append(f"  host memory for swapped optimizer states: {_gb(result['host_optimizer_bytes_per_node'])}"
                     f" per node of {CARDS_PER_NODE} cards")
    if len(result["stages"]) > 1:
        lines.append("  stages: " + ", ".join(f"{e['stage']}: {e['layers']} layers {e['total'] / GIB:.1f} GB"
                                              for e in result["stages"]))
    if smallest:
        lines.append(f"  smallest cluster that fits: {smallest['device_num']} cards (dp {smallest['data_parallel']},"
                     f" ep {smallest['expert_parallel']}, {smallest['total_bytes'] / GIB:.1f} GB per card)")
    else:
        lines.append("  smallest cluster that fits: none with this model_parallel x pipeline_stage")
    if full:
        cluster = full["smallest_cluster"]
        lines.append(f"  full finetune of the same YAML (no pet_config): {full['total_bytes'] / GIB:.1f} GB per card "
                     f"on {full['device_num']} cards ({'fits' if full['fits'] else 'does NOT fit'}); smallest cluster: "
                     + (f"{cluster['device_num']} cards" if cluster else "none with this model_parallel x "
                        "pipeline_stage"))
    for problem in result["problems"]:
        lines.append(f"  parallel_check: {problem}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="MindFormers YAML of a DeepSeek-V2 model")
    parser.add_argument("--card_memory_gb", type=float, default=64.0, help="memory of one card, GB (2^30 bytes)")
    parser.add_argument("--overhead_gb", type=float, default=2.0, help="reserve for workspace/communication buffers")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    result = plan(config, args.card_memory_gb, args.overhead_gb)
    smallest = smallest_cluster(config, args.card_memory_gb, args.overhead_gb)
    full = full_finetune(config, args.card_memory_gb, args.overhead_gb)
    if args.json:
        print(json.dumps(dict(result, smallest_cluster=smallest, full_finetune=full), indent=1, default=float))
    else:
        print(format_plan(result, smallest, os.path.basename(args.config), full))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
