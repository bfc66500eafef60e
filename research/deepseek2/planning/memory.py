"""Per-card memory plan of a DeepSeek-V2 MindFormers YAML (training or prediction), from the shapes alone.

    python research/deepseek2/planning/memory.py --config research/deepseek2/finetune_deepseek2_236B.yaml \
        [--card_memory_gb 64] [--overhead_gb 2] [--json]          (or: deepseek2-plan-memory --config ...)

Plain Python + PyYAML: no MindSpore import. Sizes are in GB of 2^30 bytes (as MindSpore's max_device_memory);
parameter counts in units (B = 1e9).

Parameters: ``counts.count_parameters`` (sums over the inventory's weights; its docstring gives the formulas and
the released sizes they reproduce).

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
  activations: ``activations.py`` (its docstring gives the formulas per layer and stage);
  overhead: --overhead_gb (workspace, communication buffers, fragmentation), 2 GB by default.
Prediction (run_mode predict or use_past): weights in bytes(param_init_type), no gradients/optimizer;
  latent KV cache (b/dp) x layers x seq_length x (r + dr) x c, whole on every card (MLA latents are not split);
  workspace = one layer's prefill activations (``activations.py``) + fp32 logits (b/dp) s V/t' x 4 + overhead
  (logits of p tokens with a chunked prefill of p tokens a call).
Quantized prediction (model_config.quantization_config, ``held.py``; predict only: a training plan of a quantized
  YAML is refused, as the runner refuses the run): every weight as ``inventory.quantized`` holds it, with its own
  cuts: an int8 tensor 1 byte per stored element (int4 is stored two a byte, its shape already halved), its
  ``_scale`` 4 bytes (float32), the rest (embedding, lm_head, norms, router, kv_b_proj, modules_to_not_convert)
  bytes(param_init_type); the report gives the bytes per card by dtype and by part.
The fewest cards for prediction: one replica (data_parallel 1) over model_parallel = 1..8 cards or whole 8-card
nodes, the first layout passing parallel_check whose total fits the card and the YAML's context.max_device_memory.
A YAML with use_flash_attention on is also planned with it off: the report prints the attention's bytes per layer
and micro-batch and once per stage, the activations (workspace) and the total per card both ways.

LoRA (model_config.pet_config, lora/; training only): every targeted weight gets A (..., r, in) and B (..., out,
r), cut like the weight (an expert on both, its output rows on B, its input columns on A; ``counts.layer_adapters``).
The frozen base has no gradients or optimizer states; the adapters (pet_config.param_init_type, fp32 by default) have
both (8 bytes/param, + 4 for a master copy unless fp32; the parallel optimizer divides them by dp x mp).

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

from research.deepseek2.dtypes import bytes_of, canonical
from research.deepseek2.errors import QuantizationError
from research.deepseek2.lora.config import LoraSettings, parse_pet_config
from research.deepseek2.planning.activations import (attention_backward_bytes, attention_core_bytes,
                                                     layer_activation_bytes, training_activation_bytes)
from research.deepseek2.planning.counts import card_share, count_adapters, count_parameters, layer_adapters
from research.deepseek2.planning.held import held_bytes, outer_params, totals_by, weights_summary
from research.deepseek2.planning.inventory import (ModelShape, Param, layer_parameters, model_shape,
                                                   quantization_settings)
from research.deepseek2.planning.parallel_check import (ParallelShape, check_parallel_config, is_predict,
                                                        layers_per_stage, parallel_shape)
from research.deepseek2.quantization.settings import QuantSettings

__all__ = ["count_parameters", "count_adapters", "plan", "smallest_cluster", "fewest_predict_cards", "full_finetune",
           "format_plan", "GIB"]

GIB = float(2 ** 30)
CARDS_PER_NODE = 8
ADAM_MOMENT_BYTES = 8          # exp_avg + exp_avg_sq in fp32
MASTER_COPY_BYTES = 4          # fp32 master weights when the weights themselves are fp16/bf16
BYTE_KEYS = ("weights", "adapters", "gradients", "optimizer", "activations", "kv_cache", "workspace", "overhead")


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
    """_Weights of _outer_params."""
    return tuple(_Weights.of(params) for params in outer_params(shape))


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
    quant: Optional[QuantSettings] = None   # model_config.quantization_config (prediction only)
    param_dtype: str = "float32"        # canonical name of param_init_type
    weight_quant_kernel: bool = False   # model_config.use_weight_quant_kernel

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
    quant = quantization_settings(mc)
    if quant and not predict:
        raise QuantizationError(f"model.model_config.quantization_config ({quant.weight_dtype}) with run_mode "
                                f"{config.get('run_mode')!r}: quantized weights are for predict only (training is "
                                f"refused); plan the float YAML, or set run_mode: predict")
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
        attention_chunk=chunks["attention_chunk_size"], prefill_chunk=chunks["prefill_chunk_size"], quant=quant,
        param_dtype=canonical(mc.get("param_init_type", "float32"), "model_config.param_init_type"),
        weight_quant_kernel=bool(mc.get("use_weight_quant_kernel", False)))


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


def _held_bytes(st: _Settings, stage: int, layers: range) -> Dict[Tuple[str, str], float]:
    """held.held_bytes of one card of a stage: its layers, the embedding on the first stage, final norm and lm_head
    on the last."""
    return held_bytes(st.shape, st.quant, layers, stage == 0, stage == st.parallel.pp - 1, st.parallel.axes(),
                      st.param_dtype, st.param_bytes)


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


# ---------------------------------------------------------------------------------------------- bytes per stage
def _training_bytes(st: _Settings, stage: int, layers: range, weights: _Weights) -> Dict[str, float]:
    """Gradients, optimizer states (on the card or, swapped, in host memory) and activations of a training stage."""
    if st.lora:
        return _lora_training_bytes(st, stage, layers)
    per_card = _params_per_card(weights, st)
    state = (_optimizer_shard(weights, st) if st.parallel_optimizer else per_card) * st.optimizer_bytes_per_param
    return {"gradients": per_card * st.param_bytes, "optimizer": 0.0 if st.swap else state,
            "optimizer_host": state if st.swap else 0.0,
            "activations": training_activation_bytes(st, stage, layers)}


def _lora_training_bytes(st: _Settings, stage: int, layers: range) -> Dict[str, float]:
    """LoRA: the base is frozen (its weights only: no gradients, no optimizer states); the adapters of the stage's
    layers carry their gradients and AdamW states (2 fp32 moments, plus an fp32 master copy unless they are fp32).
    The parallel optimizer divides every adapter's states over its copies: size / (dp x mp) per card."""
    p = st.parallel
    adapters = [x for layer in layers for _, a, b in layer_adapters(st.shape, st.lora, layer) for x in (a, b)]
    per_card = sum(card_share(x, st.parallel.axes()) for x in adapters)
    adapter_bytes = bytes_of(st.lora.param_init_type)
    held = sum(x.size for x in adapters) / (p.dp * p.mp) if st.parallel_optimizer else per_card
    state = held * (ADAM_MOMENT_BYTES + (MASTER_COPY_BYTES if adapter_bytes != 4 else 0))
    return {"adapter_params_per_card": per_card, "adapters": per_card * adapter_bytes,
            "gradients": per_card * adapter_bytes, "optimizer": 0.0 if st.swap else state,
            "optimizer_host": state if st.swap else 0.0, "activations": training_activation_bytes(st, stage, layers)}


def _prediction_bytes(st: _Settings, stage: int, layers: range) -> Dict[str, float]:
    """Latent KV cache of a prediction stage (whole on every card) and its workspace: one layer's prefill
    activations, plus the fp32 logits on the last stage."""
    p, m, c, s = st.parallel, st.shape, st.compute_bytes, st.seq_length
    b_card = st.batch_size / p.dp
    kv_cache = b_card * len(layers) * s * (m.kv_lora_rank + m.qk_rope_head_dim) * c
    tokens, keys, run = s, None, st
    if 0 < st.prefill_chunk < s and st.model_config.get("use_past"):      # prefill_in_chunks: chunks vs the cache
        tokens, keys, run = st.prefill_chunk, s, replace(st, seq_length=st.prefill_chunk)
    layer_max = max((layer_activation_bytes(run, layer, b_card, p.mp, False, keys) for layer in layers), default=0)
    logits = b_card * tokens * m.vocab_size / st.vocab_parts * 4 if stage == p.pp - 1 else 0
    return {"kv_cache": kv_cache, "workspace": layer_max + logits}


def _stage_plan(st: _Settings, stage: int, layers: range, overhead_gb: float) -> dict:
    """Parameters and bytes per card of one pipeline stage."""
    weights = _stage_weights(st, stage, layers)
    per_card = _params_per_card(weights, st)
    held = _held_bytes(st, stage, layers)
    entry = {"stage": stage, "layers": len(layers), "params_per_card": per_card,
             "weights": sum(held.values()) if st.quant else per_card * st.param_bytes,
             "weights_by_dtype": totals_by(held, 1), "weights_by_part": totals_by(held, 0)}
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
        "weights_held": {"quantization": st.quant.to_dict() if st.quant else None,
                         "use_weight_quant_kernel": st.weight_quant_kernel,
                         "summary": weights_summary(st.quant, st.param_dtype),
                         "by_dtype": busiest["weights_by_dtype"], "by_part": busiest["weights_by_part"]},
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
    basic_layer, basic_once = ((attention_core_bytes(st, b, t, False), 0.0) if st.predict
                               else (0.0, attention_backward_bytes(basic, b, t)))
    return {side: {"attention_per_layer": layer, "attention_once": once, key: e[key], "total": e["total"]}
            for side, layer, once, e in (("fused", attention_core_bytes(st, b, t, True), 0.0, busiest),
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


def _device_memory_gb(config: dict) -> Optional[float]:
    """context.max_device_memory of a YAML ("59GB") in GB, or None when it is not set."""
    value = (config.get("context") or {}).get("max_device_memory")
    text = str(value).strip().upper() if value is not None else ""
    try:
        return float(text[:-2]) if text.endswith("GB") else None
    except ValueError:
        return None


def fewest_predict_cards(config: dict, card_memory_gb: float = 64.0, overhead_gb: float = 2.0,
                         max_cards: int = 1024) -> Optional[dict]:
    """Prediction: the fewest cards of one replica (data_parallel 1, model_parallel = the cards: 1..8 or whole
    8-card nodes) passing parallel_check whose total fits the card and the YAML's context.max_device_memory:
    {"device_num", "total_bytes", "limit_gb"}; None for training, or when no layout up to max_cards fits."""
    if not is_predict(config):
        return None
    limit = min(card_memory_gb, _device_memory_gb(config) or card_memory_gb)
    pc = config.get("parallel_config") or {}
    mc = {k: v for k, v in ((config.get("model") or {}).get("model_config") or {}).items() if k != "type"}
    for cards in list(range(1, CARDS_PER_NODE)) + list(range(CARDS_PER_NODE, max_cards + 1, CARDS_PER_NODE)):
        layout = dict(pc, data_parallel=1, model_parallel=cards, pipeline_stage=1, expert_parallel=1)
        if check_parallel_config(mc, layout, cards):
            continue
        result = plan(dict(config, parallel_config=layout), card_memory_gb, overhead_gb)
        if not result["problems"] and result["total_bytes"] <= limit * GIB:
            return {"device_num": cards, "total_bytes": result["total_bytes"], "limit_gb": limit}
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


def format_plan(result: dict, smallest: Optional[dict], name: str = "", full: Optional[dict] = None,
                fewest: Optional[dict] = None) -> str:
    """Human-readable table of plan() (and smallest_cluster(), full_finetune(), fewest_predict_cards()) results."""
    p, sh, st, lora = result["params"], result["shape"], result["settings"], result["lora"]
    held = result["weights_held"]
    quant = held["quantization"]
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
             + (f"{quant['weight_dtype']} + float32 scales, the rest {st['param_bytes']} B/param" if quant else
                f"{st['param_bytes']} B/param")
             + f", compute {st['compute_bytes']} B, recompute {st['recompute']}, "
             f"parallel optimizer {st['parallel_optimizer']}, optimizer swap {st['optimizer_swap']}",
             *([f"  weights: {held['summary']} (quant_method {quant['quant_method']}, group_size "
                f"{quant['group_size']}; use_weight_quant_kernel {held['use_weight_quant_kernel']}); per card "
                + ", ".join(f"{dtype} {value / GIB:.2f} GB" for dtype, value in held["by_dtype"].items())]
               if quant else []),
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
    if result["mode"] == "predict":
        lines.append("  fewest cards for prediction (data_parallel 1, model_parallel = cards, within "
                     + (f"{fewest['limit_gb']:g} GB): {fewest['device_num']} card(s), "
                        f"{fewest['total_bytes'] / GIB:.1f} GB per card" if fewest else "the card): none"))
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
    try:
        result = plan(config, args.card_memory_gb, args.overhead_gb)
    except ValueError as err:                  # a field the plan cannot take (named), or a quantized training plan
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    smallest = smallest_cluster(config, args.card_memory_gb, args.overhead_gb)
    full = full_finetune(config, args.card_memory_gb, args.overhead_gb)
    fewest = fewest_predict_cards(config, args.card_memory_gb, args.overhead_gb)
    if args.json:
        print(json.dumps(dict(result, smallest_cluster=smallest, full_finetune=full, fewest_predict_cards=fewest),
                         indent=1, default=float))
    else:
        print(format_plan(result, smallest, os.path.basename(args.config), full, fewest))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
