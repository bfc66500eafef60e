"""Consistency checks of a MindFormers ``parallel_config`` against a DeepSeek-V2 ``model_config``.

Plain Python (PyYAML only, no MindSpore import) so it runs in a second on a login node before a 64-card job.

    python research/deepseek2/parallel_check.py --config research/deepseek2/run_train_deepseek2_236B.yaml \
        [--device_num 64]

Rules (each problem is reported as one message naming the YAML field):
  * cards: data_parallel x model_parallel x pipeline_stage == device_num.
  * tensor (model) parallel ``mp`` splits attention heads (q_b_proj / kv_b_proj / q_proj by heads, o_proj by rows),
    the dense FFN and every expert's FFN (column/row), and the vocabulary unless ``vocab_emb_dp``: so
    num_attention_heads, hidden_size, intermediate_size, moe_intermediate_size (and n_shared_experts x
    moe_intermediate_size) and vocab_size must be multiples of mp. The MLA latents (q_lora_rank, kv_lora_rank) and
    the shared RoPE key are NOT split: every rank needs the whole latent to expand its own heads, so these ranks
    need no divisibility, only to be positive (q_lora_rank may be null: full-rank query, as in DeepSeek-V2-Lite).
  * expert parallel ``ep``: n_routed_experts % ep == 0, and data_parallel % ep == 0. The second is MindFormers'
    rule for its MoE layers (mindformers/models/llama/llama_layer.py shards expert FFNs as
    ((dp // ep, ep, 1, 1), (ep, mp, 1)) and mindformers/modules/transformer/moe.py uses dp_moe = dp // ep): the
    expert-parallel group is carved out of the data-parallel ranks, experts additionally split by mp.
  * pipeline: pipeline_stage <= num_hidden_layers, micro_batch_num >= pipeline_stage, and num_hidden_layers %
    pipeline_stage == 0 unless ``model_config.offset`` (MindFormers' per-stage layer offsets, one int per stage,
    stage i gets num_hidden_layers // pipeline_stage + offset[i] layers) gives an uneven split that adds up.
  * sequence parallel (use_seq_parallel with mp > 1): seq_length % mp == 0.
  * training with mp, ep or pp > 1: parallel_mode 2 (auto) with search_mode sharding_propagation, and
    model_config.moe_dispatch: capacity (the expert-parallel layout of the routed experts).
"""
import argparse
import os
import sys
from typing import List, Optional

import yaml

__all__ = ["check_parallel_config", "load_yaml", "load_yaml_checks", "parallel_shape", "ParallelShape",
           "layers_per_stage"]

CARDS_PER_NODE = 8


class ParallelShape(dict):
    """The parallel_config numbers with MindFormers' defaults filled in (dict with attribute access)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err


def parallel_shape(parallel_config: dict) -> ParallelShape:
    """parallel_config with MindFormers' defaults (everything 1, vocab_emb_dp True, use_seq_parallel False)."""
    pc = parallel_config or {}
    return ParallelShape(
        dp=pc.get("data_parallel", 1), mp=pc.get("model_parallel", 1), pp=pc.get("pipeline_stage", 1),
        ep=pc.get("expert_parallel", 1), micro_batch_num=pc.get("micro_batch_num", 1),
        vocab_emb_dp=bool(pc.get("vocab_emb_dp", True)), use_seq_parallel=bool(pc.get("use_seq_parallel", False)),
        gradient_aggregation_group=pc.get("gradient_aggregation_group", 4))


def layers_per_stage(num_layers: int, pp: int, offset=None) -> List[int]:
    """Layers of each pipeline stage: num_layers // pp (+ offset[i] when MindFormers' offset list is given)."""
    base = num_layers // pp
    if offset is None or offset == 0:
        counts = [base] * pp
        for i in range(num_layers - base * pp):      # remainder to the last stages, if no offset given
            counts[pp - 1 - i] += 1
        return counts
    if isinstance(offset, int):
        offset = [offset] * pp
    return [base + int(o) for o in offset]


def _is_pos_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_parallel_config(model_config: dict, parallel_config: dict, device_num: int) -> List[str]:
    """Problems of running ``model_config`` with ``parallel_config`` on ``device_num`` cards ([] = consistent).

    model_config: released config.json names (num_attention_heads, n_routed_experts ...) plus MindFormers knobs
    (seq_length, offset); parallel_config: MindFormers' parallel_config section.
    """
    problems = []
    mc = model_config or {}
    pc = parallel_config or {}
    for key in ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel", "micro_batch_num"):
        if key in pc and not _is_pos_int(pc[key]):
            problems.append(f"parallel_config.{key} = {pc[key]!r}: expected a positive integer")
    if problems:
        return problems
    s = parallel_shape(pc)
    dp, mp, pp, ep = s.dp, s.mp, s.pp, s.ep

    if dp * mp * pp != device_num:
        problems.append(f"parallel_config.data_parallel x model_parallel x pipeline_stage = {dp} x {mp} x {pp} = "
                        f"{dp * mp * pp}, but the job has device_num = {device_num} cards")

    def divisible(field, value, by, why):
        if value is not None and value % by:
            problems.append(f"model_config.{field} = {value} is not divisible by {why}")

    mp_why = f"parallel_config.model_parallel = {mp}"
    divisible("num_attention_heads", mc.get("num_attention_heads"), mp,
              mp_why + " (heads are split across tensor-parallel ranks)")
    nkv = mc.get("num_key_value_heads")
    if nkv is not None:
        divisible("num_key_value_heads", nkv, mp, mp_why)
    divisible("hidden_size", mc.get("hidden_size"), mp, mp_why + " (o_proj rows / sequence split)")
    divisible("intermediate_size", mc.get("intermediate_size"), mp, mp_why + " (dense FFN columns)")
    moe_inter = mc.get("moe_intermediate_size")
    if mc.get("n_routed_experts"):
        divisible("moe_intermediate_size", moe_inter, mp, mp_why + " (expert FFN columns)")
        shared = mc.get("n_shared_experts") or 0
        if shared and moe_inter and (shared * moe_inter) % mp:
            problems.append(f"model_config.n_shared_experts x moe_intermediate_size = {shared * moe_inter} is not "
                            f"divisible by {mp_why} (shared-expert FFN columns)")
    if not s.vocab_emb_dp:
        divisible("vocab_size", mc.get("vocab_size"), mp,
                  mp_why + " with parallel_config.vocab_emb_dp = False (embedding/lm_head split by vocabulary)")

    # MLA latents stay whole on every rank: only their type matters
    if "kv_lora_rank" in mc and not _is_pos_int(mc["kv_lora_rank"]):
        problems.append(f"model_config.kv_lora_rank = {mc['kv_lora_rank']!r}: expected a positive integer "
                        "(the compressed KV latent, kept whole on every tensor-parallel rank)")
    q_lora = mc.get("q_lora_rank")
    if q_lora is not None and not _is_pos_int(q_lora):
        problems.append(f"model_config.q_lora_rank = {q_lora!r}: expected a positive integer or null "
                        "(null = full-rank query projection)")

    experts = mc.get("n_routed_experts")
    if experts:
        if experts % ep:
            problems.append(f"model_config.n_routed_experts = {experts} is not divisible by "
                            f"parallel_config.expert_parallel = {ep}")
        if dp % ep:
            problems.append(f"parallel_config.expert_parallel = {ep} does not divide parallel_config.data_parallel "
                            f"= {dp} (MindFormers forms expert-parallel groups inside the data-parallel ranks)")
    elif ep > 1:
        problems.append(f"parallel_config.expert_parallel = {ep} > 1 but model_config.n_routed_experts is not set")

    layers = mc.get("num_hidden_layers")
    if layers is not None:
        offset = mc.get("offset")
        if pp > layers:
            problems.append(f"parallel_config.pipeline_stage = {pp} exceeds model_config.num_hidden_layers = "
                            f"{layers}")
        elif offset not in (None, 0):
            counts = layers_per_stage(layers, pp, offset)
            if not isinstance(offset, int) and len(offset) != pp:
                problems.append(f"model_config.offset has {len(offset)} entries, expected parallel_config."
                                f"pipeline_stage = {pp}")
            elif sum(counts) != layers or min(counts) <= 0:
                problems.append(f"model_config.offset = {offset} gives stages {counts} layers, which do not add up "
                                f"to model_config.num_hidden_layers = {layers} with every stage > 0")
        elif layers % pp:
            problems.append(f"model_config.num_hidden_layers = {layers} is not divisible by parallel_config."
                            f"pipeline_stage = {pp}; set model_config.offset (one int per stage) for an uneven split")
    if pp > 1 and s.micro_batch_num < pp:
        problems.append(f"parallel_config.micro_batch_num = {s.micro_batch_num} is smaller than parallel_config."
                        f"pipeline_stage = {pp} (the pipeline would never fill)")
    if s.use_seq_parallel and mp > 1 and mc.get("seq_length") is not None and mc["seq_length"] % mp:
        problems.append(f"model_config.seq_length = {mc['seq_length']} is not divisible by {mp_why} with "
                        "parallel_config.use_seq_parallel = True")
    return problems


def load_yaml(path: str) -> dict:
    """A MindFormers YAML as a dict (KeyError-free access to the sections used here)."""
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return config


def _is_predict(config: dict) -> bool:
    model_config = (config.get("model") or {}).get("model_config") or {}
    return config.get("run_mode") == "predict" or bool(model_config.get("use_past"))


def load_yaml_checks(path: str, device_num: Optional[int] = None) -> List[str]:
    """check_parallel_config on a YAML file, plus checks of the file's own layout. [] = consistent.

    device_num defaults to the YAML's data_parallel x model_parallel x pipeline_stage; the job must then fill whole
    nodes (multiples of 8 cards beyond one node).
    """
    config = load_yaml(path)
    name = os.path.basename(path)
    model = config.get("model") or {}
    model_config = model.get("model_config")
    parallel_config = config.get("parallel_config")
    if not isinstance(model_config, dict):
        return [f"{name}: model.model_config is missing"]
    if not isinstance(parallel_config, dict):
        return [f"{name}: parallel_config is missing"]
    s = parallel_shape(parallel_config)
    problems = []
    if device_num is None:
        device_num = s.dp * s.mp * s.pp if all(_is_pos_int(v) for v in (s.dp, s.mp, s.pp)) else 0
        if device_num > CARDS_PER_NODE and device_num % CARDS_PER_NODE:
            problems.append(f"{name}: parallel_config.data_parallel x model_parallel x pipeline_stage = {device_num} "
                            f"cards does not fill whole {CARDS_PER_NODE}-card nodes")
    problems += [f"{name}: {p}" for p in check_parallel_config(model_config, parallel_config, device_num)]
    if _is_predict(config):
        if s.pp != 1:
            problems.append(f"{name}: parallel_config.pipeline_stage = {s.pp}: prediction runs without pipeline "
                            "stages (use model_parallel)")
        batch = model_config.get("batch_size", 1)
        if _is_pos_int(s.dp) and batch % s.dp:
            problems.append(f"{name}: model_config.batch_size = {batch} is not divisible by parallel_config."
                            f"data_parallel = {s.dp}")
    elif config.get("use_parallel") and (s.pp > 1 or s.mp > 1 or s.ep > 1):
        problems += _training_layout_problems(name, config, model_config)
    return problems


def _training_layout_problems(name: str, config: dict, model_config: dict) -> List[str]:
    """Training beyond data parallel: the model declares strategies for its key ops only (Linear MatMuls, embedding,
    the MoE dispatch), so MindSpore must propagate the rest (auto parallel + sharding propagation), and the routed
    experts must use the capacity dispatch, whose static buffers are what expert parallel splits."""
    problems = []
    parallel = config.get("parallel") or {}
    mode, search = parallel.get("parallel_mode"), parallel.get("search_mode")
    if mode != 2 or search != "sharding_propagation":
        problems.append(f"{name}: parallel.parallel_mode = {mode!r}, parallel.search_mode = {search!r}: model, "
                        "expert or pipeline parallel training needs parallel_mode 2 (auto) with search_mode "
                        "sharding_propagation (the model shards its key ops; semi-auto would leave the others "
                        "split by batch alone)")
    if model_config.get("n_routed_experts") and model_config.get("moe_dispatch", "dropless") != "capacity":
        problems.append(f"{name}: model_config.moe_dispatch = {model_config.get('moe_dispatch', 'dropless')!r}: "
                        "expected 'capacity' for parallel training (static per-expert buffers split over "
                        "expert_parallel)")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, nargs="+", help="MindFormers YAML file(s)")
    parser.add_argument("--device_num", type=int, default=None,
                        help="cards of the job (default: data_parallel x model_parallel x pipeline_stage)")
    args = parser.parse_args(argv)
    failed = False
    for path in args.config:
        problems = load_yaml_checks(path, args.device_num)
        if problems:
            failed = True
            print(f"{path}: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  - {problem}")
        else:
            print(f"{path}: OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
