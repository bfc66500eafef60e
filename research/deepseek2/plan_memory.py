"""Per-card memory plan of a DeepSeek-V2 MindFormers YAML (training or prediction), from the shapes alone.

    python research/deepseek2/plan_memory.py --config research/deepseek2/finetune_deepseek2_236B.yaml \
        [--card_memory_gb 64] [--overhead_gb 2] [--json]

Plain Python + PyYAML: no MindSpore import. Sizes are in GB of 2^30 bytes (as MindSpore's max_device_memory);
parameter counts in units (B = 1e9).

Parameters (``count_parameters``), with h hidden_size, V vocab_size, a heads, dn/dr/dv the no-RoPE/RoPE/value head
dims, r kv_lora_rank, rq q_lora_rank, f intermediate_size, fm moe_intermediate_size, E n_routed_experts,
ns n_shared_experts:
  embedding V h, lm_head V h (0 if tied), final norm h;
  per layer: 2 RMSNorms 2h;
    MLA  q: h rq + rq + rq a (dn+dr)  (q_a_proj, q_a_layernorm, q_b_proj)  or  h a (dn+dr) when rq is null;
         kv: h (r+dr) + r + r a (dn+dv)  (kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj);  o_proj a dv h;
    dense FFN 3 h f;   MoE: routed E 3 h fm, shared 3 h ns fm, gate E h.
  "activated" (per token) = total - embedding table - routed experts not chosen (E - k of E per MoE layer). This is
  the convention of the released numbers: 236B -> 235.7B total / 20.9B activated ("236B / 21B"),
  V2-Lite -> 15.7B / 2.45B ("15.7B / 2.4B").

Sharding per card (MindFormers semantics of parallel_config; mp model_parallel, ep expert_parallel, dp, pp):
  whole on every card of a stage: RMSNorms, q_a_proj, kv_a_proj_with_mqa (the MLA latents are not split), gate;
  split by mp: q_b_proj/q_proj and kv_b_proj (by heads), o_proj (by rows), dense and shared-expert FFNs;
  split by ep x mp: routed experts;  embedding / lm_head: split by mp unless vocab_emb_dp;
  pipeline: stage i holds its layers (num_hidden_layers / pp, or MindFormers' offset), stage 0 the embedding,
  the last stage the final norm and lm_head. The busiest stage is reported.

Training bytes per card:
  weights P x bytes(param_init_type); gradients P x bytes(param_init_type);
  optimizer (AdamW): 2 fp32 moments + an fp32 master copy when the weights are not fp32 (8 or 12 bytes/param);
    with parallel.enable_parallel_optimizer they are divided by the copies of each weight (dp x mp for whole
    weights, dp for mp-split ones, dp / ep for experts); with optimizer.swap they live in host memory (reported
    separately, per node of 8 cards);
  activations per micro-batch (b = batch_size, s = seq_length, c = bytes(compute_dtype), t = mp, softmax in fp32):
    MLA layer:  s b c [2h + 2rq + a(dn+dr)/t + (r+dr) + r + a(dn+dv)/t + 2a(dn+dr)/t + a dv/t]
                + b (a/t) s^2 (4 + c)          (norm in/out, latents, q, kv, RoPE'd q/k, context; fp32 softmax
                                                 output + its cast for the PV matmul)
    dense FFN:  s b c [2h + 3f/t]             (norm in/out, gate, up, gate*up)
    MoE FFN:    s b c [2h + 3 ns fm / t] + 8 s b E + R c [2h + 3fm/t]
                (norm in/out, shared experts, fp32 router logits + probs, R dispatched rows: input, gate, up,
                 product, output); dropless dispatch R = k s b max(1, capacity_factor), capacity dispatch
                 (moe_dispatch: capacity) R = E C with C = min(s b, ceil(expert_capacity_factor k s b / E)),
                 C = s b when the factor is 0
    (the 2h terms and the layer input shrink by t under use_seq_parallel)
    no recompute: in_flight x sum of the stage's layers;  recompute: in_flight x layers x s b h c (layer inputs)
    + the largest layer (one layer re-run at a time). in_flight = min(pp - stage, micro_batch_num) micro-batches
    (1F1B). The last stage adds the logits s b V/t' (c + 4 + 4) (logits, fp32 copy, fp32 gradient; t' = mp
    unless vocab_emb_dp).
  overhead: --overhead_gb (workspace, communication buffers, fragmentation), 2 GB by default.
Prediction (run_mode predict or use_past): weights in bytes(param_init_type), no gradients/optimizer;
  latent KV cache (b/dp) x layers x seq_length x (r + dr) x c, whole on every card (MLA latents are not split);
  workspace = one layer's prefill activations + fp32 logits (b/dp) s V/t' x 4 + overhead.

The smallest cluster: multiples of 8 cards keeping the YAML's model_parallel and pipeline_stage, data_parallel
growing with the cards and expert_parallel the largest value <= the YAML's that divides data_parallel and
n_routed_experts (research/deepseek2/parallel_check.py rules).
"""
import argparse
import json
import math
import os
import sys
from typing import Dict, Optional

import yaml

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from parallel_check import check_parallel_config, layers_per_stage, parallel_shape  # noqa: E402
    from moe_shapes import expert_capacity  # noqa: E402
else:
    from .parallel_check import check_parallel_config, layers_per_stage, parallel_shape
    from .moe_shapes import expert_capacity

__all__ = ["count_parameters", "plan", "smallest_cluster", "format_plan", "GIB"]

GIB = float(2 ** 30)
CARDS_PER_NODE = 8
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}
ADAM_MOMENT_BYTES = 8          # exp_avg + exp_avg_sq in fp32
MASTER_COPY_BYTES = 4          # fp32 master weights when the weights themselves are fp16/bf16


def _dtype_bytes(name, field) -> int:
    key = str(name).lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"model_config.{field} = {name!r}: expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def _is_moe_layer(mc: dict, layer: int) -> bool:
    """Released rule: MoE from first_k_dense_replace on, every moe_layer_freq-th layer."""
    return (mc.get("n_routed_experts") is not None and layer >= mc.get("first_k_dense_replace", 0)
            and layer % mc.get("moe_layer_freq", 1) == 0)


def _layer_parts(mc: dict, layer: int) -> Dict[str, int]:
    """Parameters of one decoder layer by how they are sharded: whole / split by mp / routed experts."""
    h, a = mc["hidden_size"], mc["num_attention_heads"]
    dn, dr, dv = mc["qk_nope_head_dim"], mc["qk_rope_head_dim"], mc["v_head_dim"]
    r, rq = mc["kv_lora_rank"], mc.get("q_lora_rank")
    whole = 2 * h                                   # input_layernorm, post_attention_layernorm
    whole += h * (r + dr) + r                       # kv_a_proj_with_mqa, kv_a_layernorm
    split = r * a * (dn + dv) + a * dv * h          # kv_b_proj (by heads), o_proj (by rows)
    if rq:
        whole += h * rq + rq                        # q_a_proj, q_a_layernorm
        split += rq * a * (dn + dr)                 # q_b_proj
    else:
        split += h * a * (dn + dr)                  # q_proj
    experts = 0
    if _is_moe_layer(mc, layer):
        e, fm = mc["n_routed_experts"], mc["moe_intermediate_size"]
        whole += e * h                              # gate
        split += 3 * h * fm * (mc.get("n_shared_experts") or 0)
        experts = e * 3 * h * fm
    else:
        split += 3 * h * mc["intermediate_size"]
    return {"whole": whole, "split": split, "experts": experts}


def count_parameters(model_config: dict) -> dict:
    """Analytic parameter counts of a DeepSeek-V2 model_config (released config.json names).

    Returns totals by part (embedding, lm_head, final_norm, attention, norms, dense_ffn, routed_experts,
    shared_experts, gate), layer counts, ``total`` and ``activated`` (see the module docstring).
    """
    mc = model_config
    h, v, a = mc["hidden_size"], mc["vocab_size"], mc["num_attention_heads"]
    dn, dr, dv = mc["qk_nope_head_dim"], mc["qk_rope_head_dim"], mc["v_head_dim"]
    r, rq = mc["kv_lora_rank"], mc.get("q_lora_rank")
    layers = mc["num_hidden_layers"]
    attention = h * (r + dr) + r + r * a * (dn + dv) + a * dv * h
    attention += (h * rq + rq + rq * a * (dn + dr)) if rq else h * a * (dn + dr)
    moe_layers = sum(_is_moe_layer(mc, i) for i in range(layers))
    dense_layers = layers - moe_layers
    e = mc.get("n_routed_experts") or 0
    fm = mc.get("moe_intermediate_size") or 0
    k = mc.get("num_experts_per_tok") or 0
    expert = 3 * h * fm
    out = {
        "embedding": v * h,
        "lm_head": 0 if mc.get("tie_word_embeddings") else v * h,
        "final_norm": h,
        "attention": layers * attention,
        "norms": layers * 2 * h,
        "dense_ffn": dense_layers * 3 * h * mc["intermediate_size"],
        "routed_experts": moe_layers * e * expert,
        "shared_experts": moe_layers * (mc.get("n_shared_experts") or 0) * expert,
        "gate": moe_layers * e * h,
        "attention_per_layer": attention,
        "expert_size": expert,
        "num_moe_layers": moe_layers,
        "num_dense_layers": dense_layers,
    }
    parts = ("embedding", "lm_head", "final_norm", "attention", "norms", "dense_ffn", "routed_experts",
             "shared_experts", "gate")
    out["total"] = sum(out[p] for p in parts)
    out["activated"] = out["total"] - out["embedding"] - moe_layers * (e - k) * expert
    return out


# ---------------------------------------------------------------------------------------------- activations
def _layer_activation_bytes(mc: dict, layer: int, b: float, s: int, t: int, seq_parallel: bool) -> float:
    """Bytes one decoder layer keeps for its backward for one micro-batch (formula in the module docstring)."""
    c = _dtype_bytes(mc.get("compute_dtype", "float32"), "compute_dtype")
    sm = _dtype_bytes(mc.get("softmax_compute_type", "float32"), "softmax_compute_type")
    h, a = mc["hidden_size"], mc["num_attention_heads"]
    dn, dr, dv = mc["qk_nope_head_dim"], mc["qk_rope_head_dim"], mc["v_head_dim"]
    r, rq = mc["kv_lora_rank"], mc.get("q_lora_rank") or 0
    hh = 2 * h / (t if seq_parallel else 1)          # norm input + output
    attn = s * b * c * (hh + 2 * rq + a * (dn + dr) / t + (r + dr) + r + a * (dn + dv) / t
                        + 2 * a * (dn + dr) / t + a * dv / t)
    attn += b * (a / t) * s * s * (sm + c)
    if _is_moe_layer(mc, layer):
        e, fm, k = mc["n_routed_experts"], mc["moe_intermediate_size"], mc["num_experts_per_tok"]
        if mc.get("moe_dispatch") == "capacity":          # E buffers of C rows (RoutedExperts.capacity)
            rows = e * expert_capacity(s * b, k, e, float(mc.get("expert_capacity_factor") or 0.0))
        else:
            rows = k * s * b * max(1.0, float(mc.get("capacity_factor") or 0.0))
        ffn = s * b * c * (hh + 3 * (mc.get("n_shared_experts") or 0) * fm / t) + 8 * s * b * e
        ffn += rows * c * (2 * h + 3 * fm / t)
    else:
        ffn = s * b * c * (hh + 3 * mc["intermediate_size"] / t)
    return attn + ffn


# ---------------------------------------------------------------------------------------------- plan
def _model_and_parallel(config: dict):
    model = config.get("model") or {}
    mc = dict(model.get("model_config") or {})
    mc.pop("type", None)
    if not mc:
        raise ValueError("model.model_config is missing from the config")
    for field in ("hidden_size", "vocab_size", "num_attention_heads", "num_hidden_layers", "kv_lora_rank",
                  "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "intermediate_size"):
        if not isinstance(mc.get(field), int):
            raise ValueError(f"model.model_config.{field} = {mc.get(field)!r}: expected an integer")
    return mc, dict(config.get("parallel_config") or {})


def _is_predict(config: dict, mc: dict) -> bool:
    return config.get("run_mode") == "predict" or bool(mc.get("use_past"))


def plan(config: dict, card_memory_gb: float = 64.0, overhead_gb: float = 2.0) -> dict:
    """Memory plan of a MindFormers config dict (a loaded YAML). Bytes per card of the busiest pipeline stage.

    Returns mode, shape (dp/mp/pp/ep/...), params (count_parameters), per-card parameter counts, a ``bytes``
    breakdown (weights, gradients, optimizer, activations or kv_cache/workspace, overhead), ``total_bytes``,
    ``fits`` against card_memory_gb, host bytes of swapped optimizer states, and the parallel_check problems.
    """
    mc, pc = _model_and_parallel(config)
    shape = parallel_shape(pc)
    dp, mp, pp, ep = shape.dp, shape.mp, shape.pp, shape.ep
    predict = _is_predict(config, mc)
    params = count_parameters(mc)
    wbytes = _dtype_bytes(mc.get("param_init_type", "float32"), "param_init_type")
    s = mc.get("seq_length", 4096)
    b = (config.get("runner_config") or {}).get("batch_size", mc.get("batch_size", 1))
    t_vocab = 1 if shape.vocab_emb_dp else mp
    parallel = config.get("parallel") or {}
    optimizer = config.get("optimizer") or {}
    parallel_optimizer = bool(parallel.get("enable_parallel_optimizer")) and not predict
    swap = bool(optimizer.get("swap")) and not predict
    recompute_cfg = config.get("recompute_config") or {}
    recompute = bool(recompute_cfg.get("recompute")) if isinstance(recompute_cfg, dict) else bool(recompute_cfg)

    counts = layers_per_stage(mc["num_hidden_layers"], pp, mc.get("offset"))
    starts = [sum(counts[:i]) for i in range(pp)]
    optimizer_bytes_per_param = ADAM_MOMENT_BYTES + (MASTER_COPY_BYTES if wbytes != 4 else 0)
    c = _dtype_bytes(mc.get("compute_dtype", "float32"), "compute_dtype")

    stages = []
    for stage in range(pp):
        layer_ids = range(starts[stage], starts[stage] + counts[stage])
        whole = split = experts = 0
        for layer in layer_ids:
            part = _layer_parts(mc, layer)
            whole, split, experts = whole + part["whole"], split + part["split"], experts + part["experts"]
        vocab_whole = vocab_split = 0
        if stage == 0:
            vocab_whole, vocab_split = (params["embedding"], 0) if t_vocab == 1 else (0, params["embedding"])
        if stage == pp - 1:
            whole += params["final_norm"]
            if t_vocab == 1:
                vocab_whole += params["lm_head"]
            else:
                vocab_split += params["lm_head"]
        whole += vocab_whole
        split += vocab_split
        per_card = whole + split / mp + experts / (ep * mp)
        # copies of each weight across the cards of this stage, over which the parallel optimizer shards states
        sharded = whole / (dp * mp) + split / mp / dp + experts / (ep * mp) / max(1, dp // ep)
        entry = {"stage": stage, "layers": counts[stage], "params_per_card": per_card,
                 "weights": per_card * wbytes}
        if predict:
            b_card = b / dp
            entry["kv_cache"] = b_card * counts[stage] * s * (mc["kv_lora_rank"] + mc["qk_rope_head_dim"]) * c
            layer_max = max((_layer_activation_bytes(mc, i, b_card, s, mp, False) for i in layer_ids), default=0)
            logits = b_card * s * mc["vocab_size"] / t_vocab * 4 if stage == pp - 1 else 0
            entry["workspace"] = layer_max + logits
        else:
            entry["gradients"] = per_card * wbytes
            state = (sharded if parallel_optimizer else per_card) * optimizer_bytes_per_param
            entry["optimizer"] = 0.0 if swap else state
            entry["optimizer_host"] = state if swap else 0.0
            in_flight = min(pp - stage, shape.micro_batch_num) if pp > 1 else 1
            per_layer = [_layer_activation_bytes(mc, i, b, s, mp, shape.use_seq_parallel) for i in layer_ids]
            if recompute:
                layer_input = s * b * mc["hidden_size"] * c / (mp if shape.use_seq_parallel else 1)
                act = in_flight * counts[stage] * layer_input + max(per_layer, default=0)
            else:
                act = in_flight * sum(per_layer)
            if stage == pp - 1:
                act += s * b * mc["vocab_size"] / t_vocab * (c + 4 + 4)
            entry["activations"] = act
        entry["overhead"] = overhead_gb * GIB
        keys = ("weights", "gradients", "optimizer", "activations", "kv_cache", "workspace", "overhead")
        entry["total"] = sum(entry.get(key, 0.0) for key in keys)
        stages.append(entry)

    busiest = max(stages, key=lambda e: e["total"])
    device_num = dp * mp * pp
    return {
        "mode": "predict" if predict else "train",
        "shape": {"data_parallel": dp, "model_parallel": mp, "pipeline_stage": pp, "expert_parallel": ep,
                  "micro_batch_num": shape.micro_batch_num, "vocab_emb_dp": shape.vocab_emb_dp,
                  "use_seq_parallel": shape.use_seq_parallel, "device_num": device_num},
        "settings": {"param_bytes": wbytes, "compute_bytes": c, "seq_length": s, "batch_size": b,
                     "recompute": recompute, "parallel_optimizer": parallel_optimizer, "optimizer_swap": swap,
                     "card_memory_gb": card_memory_gb, "overhead_gb": overhead_gb},
        "params": params,
        "stages": stages,
        "busiest_stage": busiest["stage"],
        "bytes": {key: busiest.get(key, 0.0) for key in
                  ("weights", "gradients", "optimizer", "activations", "kv_cache", "workspace", "overhead")},
        "params_per_card": busiest["params_per_card"],
        "total_bytes": busiest["total"],
        "host_optimizer_bytes_per_node": busiest.get("optimizer_host", 0.0) * min(CARDS_PER_NODE, device_num),
        "fits": busiest["total"] <= card_memory_gb * GIB,
        "problems": check_parallel_config(mc, pc, device_num),
    }


def _largest_ep(limit: int, dp: int, experts: Optional[int]) -> int:
    for ep in range(min(limit, dp), 0, -1):
        if dp % ep == 0 and (not experts or experts % ep == 0):
            return ep
    return 1


def smallest_cluster(config: dict, card_memory_gb: float = 64.0, overhead_gb: float = 2.0,
                     max_cards: int = 4096) -> Optional[dict]:
    """Smallest multiple of 8 cards (keeping model_parallel / pipeline_stage, see the module docstring) that fits.

    Returns {"device_num", "data_parallel", "expert_parallel", "total_bytes"} or None if none up to max_cards.
    """
    mc, pc = _model_and_parallel(config)
    shape = parallel_shape(pc)
    group = shape.mp * shape.pp
    step = CARDS_PER_NODE * group // math.gcd(CARDS_PER_NODE, group)      # multiple of 8 and of mp x pp
    for cards in ([group] if group < CARDS_PER_NODE and CARDS_PER_NODE % group == 0 else []) + \
            list(range(step, max_cards + 1, step)):
        dp = cards // group
        ep = _largest_ep(shape.ep, dp, mc.get("n_routed_experts"))
        trial = dict(config)
        trial["parallel_config"] = dict(pc, data_parallel=dp, expert_parallel=ep)
        result = plan(trial, card_memory_gb, overhead_gb)
        if result["fits"] and not result["problems"]:
            return {"device_num": cards, "data_parallel": dp, "expert_parallel": ep,
                    "total_bytes": result["total_bytes"]}
    return None


# ---------------------------------------------------------------------------------------------- report
def _gb(value: float) -> str:
    return f"{value / GIB:8.2f} GB"


def format_plan(result: dict, smallest: Optional[dict], name: str = "") -> str:
    """Human-readable table of plan() (and smallest_cluster()) results."""
    p, sh, st = result["params"], result["shape"], result["settings"]
    lines = [f"{name} ({result['mode']})" if name else f"mode: {result['mode']}",
             f"  model: {p['total'] / 1e9:.2f}B parameters, {p['activated'] / 1e9:.2f}B activated per token "
             f"({p['num_dense_layers']} dense + {p['num_moe_layers']} MoE layers; routed experts "
             f"{p['routed_experts'] / 1e9:.2f}B, attention {p['attention'] / 1e9:.2f}B, "
             f"embedding + lm_head {(p['embedding'] + p['lm_head']) / 1e9:.2f}B)",
             f"  parallel: dp {sh['data_parallel']} x mp {sh['model_parallel']} x pp {sh['pipeline_stage']} = "
             f"{sh['device_num']} cards, ep {sh['expert_parallel']}, micro_batch_num {sh['micro_batch_num']}, "
             f"vocab_emb_dp {sh['vocab_emb_dp']}, seq parallel {sh['use_seq_parallel']}",
             f"  settings: seq_length {st['seq_length']}, batch_size {st['batch_size']}, weights "
             f"{st['param_bytes']} B/param, compute {st['compute_bytes']} B, recompute {st['recompute']}, "
             f"parallel optimizer {st['parallel_optimizer']}, optimizer swap {st['optimizer_swap']}",
             f"  per card (busiest pipeline stage {result['busiest_stage']}, "
             f"{result['params_per_card'] / 1e9:.3f}B parameters):"]
    labels = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer states",
              "activations": "activations", "kv_cache": "latent KV cache", "workspace": "workspace",
              "overhead": "overhead (reserve)"}
    for key, label in labels.items():
        if key in result["stages"][result["busiest_stage"]]:
            lines.append(f"    {label:<20}{_gb(result['bytes'][key])}")
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines.append(f"    {'total':<20}{_gb(result['total_bytes'])}  of {st['card_memory_gb']:g} GB per card: {verdict}")
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
    if args.json:
        print(json.dumps(dict(result, smallest_cluster=smallest), indent=1, default=float))
    else:
        print(format_plan(result, smallest, os.path.basename(args.config)))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
