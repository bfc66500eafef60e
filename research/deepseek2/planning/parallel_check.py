"""Consistency checks of a MindFormers ``parallel_config`` against a DeepSeek-V2 ``model_config``.

Plain Python (PyYAML only, no MindSpore import) so it runs in a second on a login node before a 64-card job.

    python research/deepseek2/planning/parallel_check.py --config research/deepseek2/run_train_deepseek2_236B.yaml \
        [--device_num 64]                                      (or: deepseek2-parallel-check --config ...)

Rules (each problem is reported as one message naming the YAML field; ``check_parallel_config`` runs one small
function per rule):
  * cards: data_parallel x model_parallel x pipeline_stage == device_num.
  * divisibility, from the weights' cuts in ``inventory.py``: tensor (model) parallel ``mp`` splits attention heads
    (q_b_proj / kv_b_proj / q_proj by heads, o_proj by rows), the dense FFN and every expert's FFN (column/row), and
    the vocabulary unless ``vocab_emb_dp``; expert parallel ``ep`` splits the routed experts. So
    num_attention_heads, intermediate_size, moe_intermediate_size (and n_shared_experts x moe_intermediate_size)
    and vocab_size must be multiples of mp, n_routed_experts a multiple of ep (a width no weight has, e.g. the
    dense FFN of a model without dense layers, is not checked). hidden_size (and num_key_value_heads, when given)
    must be multiples of mp too: no weight here is cut along them, but MindFormers' own layers ask it
    (mindformers/models/llama/llama_layer.py FeedForward: ``dim % model_parallel``). The MLA latents (q_lora_rank,
    kv_lora_rank) and the shared RoPE key are NOT split: every rank needs the whole latent to expand its own
    heads, so these ranks need no divisibility, only to be positive (q_lora_rank may be null: full-rank query, as
    in DeepSeek-V2-Lite).
  * expert parallel ``ep``: besides n_routed_experts % ep == 0, data_parallel % ep == 0. The second is MindFormers'
    rule for its MoE layers (mindformers/models/llama/llama_layer.py shards expert FFNs as
    ((dp // ep, ep, 1, 1), (ep, mp, 1)) and mindformers/modules/transformer/moe.py uses dp_moe = dp // ep): the
    expert-parallel group is carved out of the data-parallel ranks, experts additionally split by mp.
  * pipeline: pipeline_stage <= num_hidden_layers, micro_batch_num >= pipeline_stage, and num_hidden_layers %
    pipeline_stage == 0 unless ``model_config.offset`` (MindFormers' per-stage layer offsets, one int per stage,
    stage i gets num_hidden_layers // pipeline_stage + offset[i] layers) gives an uneven split that adds up.
  * sequence parallel (use_seq_parallel with mp > 1): seq_length % mp == 0.
  * training with mp, ep or pp > 1: parallel_mode 2 (auto) with search_mode sharding_propagation, and
    model_config.moe_dispatch: capacity (the expert-parallel layout of the routed experts).
  * prediction: no pipeline stages, and batch_size % data_parallel == 0.
  * quantization (model_config.quantization_config; predict only, a training YAML with it is refused): a bad
    quantization_config, or a group size that does not divide a weight's inputs, is one message naming it; a
    quantized model predicts through the hand-written split over the model_parallel ranks
    (``inventory.inference_split_dim``), so every int8 / packed int4 weight and float32 scale must split there too
    (int4 holds pairs of output channels a byte; a group-wise scale holds k / group_size columns, e.g. the shared
    experts' w2 of the 236B model 3072 / 128 = 24): one message per tensor, naming it and counting its layers.
Fields a model_config leaves out are not checked (``check_parallel_config`` takes partial model configs).
"""
import argparse
import dataclasses
import functools
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import yaml

from research.deepseek2.errors import QuantizationError
from research.deepseek2.planning.inventory import (ModelShape, divisibility_problems, inference_split_dim, parameters,
                                                   quantization_settings)

__all__ = ["check_parallel_config", "load_yaml", "load_yaml_checks", "parallel_shape", "ParallelShape",
           "layers_per_stage", "is_predict"]

CARDS_PER_NODE = 8
_DEGREES = ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel", "micro_batch_num")
# the YAML field each parallel axis of the inventory takes its degree from
_AXIS_SOURCES = {"mp": "parallel_config.model_parallel = {}", "ep": "parallel_config.expert_parallel = {}",
                 "vocab": "parallel_config.model_parallel = {} with parallel_config.vocab_emb_dp = False"}


@dataclass(frozen=True)
class ParallelShape:
    """The parallel_config numbers with MindFormers' defaults filled in."""
    dp: int = 1
    mp: int = 1
    pp: int = 1
    ep: int = 1
    micro_batch_num: int = 1
    vocab_emb_dp: bool = True
    use_seq_parallel: bool = False
    gradient_aggregation_group: int = 4

    def axes(self) -> Dict[str, int]:
        """{axis: degree} of the inventory's parallel axes ("vocab" = mp unless vocab_emb_dp), for ``parts``."""
        return {"mp": self.mp, "ep": self.ep, "vocab": 1 if self.vocab_emb_dp else self.mp}


_FIELDS = ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel", "micro_batch_num", "vocab_emb_dp",
           "use_seq_parallel", "gradient_aggregation_group")


def parallel_shape(parallel_config) -> ParallelShape:
    """parallel_config (a YAML mapping or MindFormers' TransformerOpParallelConfig) with MindFormers' defaults
    (everything 1, vocab_emb_dp True, use_seq_parallel False)."""
    pc = parallel_config or {}
    if not isinstance(pc, dict):
        pc = {key: getattr(pc, key) for key in _FIELDS if hasattr(pc, key)}
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


def is_predict(config: dict) -> bool:
    """Whether a loaded YAML runs prediction (run_mode predict, or the model keeps a KV cache: use_past)."""
    model_config = (config.get("model") or {}).get("model_config") or {}
    return config.get("run_mode") == "predict" or bool(model_config.get("use_past"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pos_int(value) -> bool:
    return _is_int(value) and value > 0


# ---------------------------------------------------------------------------------------------- the rules
def check_parallel_config(model_config: dict, parallel_config: dict, device_num: int) -> List[str]:
    """Problems of running ``model_config`` with ``parallel_config`` on ``device_num`` cards ([] = consistent).

    model_config: released config.json names (num_attention_heads, n_routed_experts ...) plus MindFormers knobs
    (seq_length, offset); parallel_config: MindFormers' parallel_config section.
    """
    mc = model_config or {}
    problems = _degree_problems(parallel_config or {})
    if problems:
        return problems
    s = parallel_shape(parallel_config)
    return (_card_problems(s, device_num) + _divisibility_problems(mc, s) + _latent_problems(mc)
            + _expert_problems(mc, s) + _pipeline_problems(mc, s) + _sequence_parallel_problems(mc, s)
            + _quantization_problems(mc, s))


def _degree_problems(pc: dict) -> List[str]:
    """The parallel degrees that are given must be positive integers."""
    return [f"parallel_config.{key} = {pc[key]!r}: expected a positive integer"
            for key in _DEGREES if key in pc and not _is_pos_int(pc[key])]


def _card_problems(s: ParallelShape, device_num: int) -> List[str]:
    """data_parallel x model_parallel x pipeline_stage must be the job's cards."""
    if s.dp * s.mp * s.pp == device_num:
        return []
    return [f"parallel_config.data_parallel x model_parallel x pipeline_stage = {s.dp} x {s.mp} x {s.pp} = "
            f"{s.dp * s.mp * s.pp}, but the job has device_num = {device_num} cards"]


def _divisibility_problems(mc: dict, s: ParallelShape) -> List[str]:
    """Every width a parallel axis cuts (the inventory's cuts) must divide by its degree; hidden_size and
    num_key_value_heads by mp (MindFormers' layer rule, no weight here is cut along them)."""
    shape = _shape_for_checks(mc, neutral=math.lcm(s.mp, s.ep))
    problems = [f"{message}; the {axis} degree is {_AXIS_SOURCES[axis].format(degree)}"
                for axis, degree in s.axes().items() for message in _cut_problems(shape, axis, degree)]
    for field in ("hidden_size", "num_key_value_heads"):
        value = mc.get(field)
        if _is_int(value) and value % s.mp:
            problems.append(f"model_config.{field} = {value} is not divisible by parallel_config.model_parallel = "
                            f"{s.mp} (MindFormers' tensor-parallel layers split it)")
    return problems


@functools.lru_cache(maxsize=256)
def _cut_problems(shape: ModelShape, axis: str, degree: int) -> Tuple[str, ...]:
    """inventory.divisibility_problems for one axis (cached: smallest_cluster asks the same model many times)."""
    return tuple(divisibility_problems(shape, {axis: degree}))


def _shape_for_checks(mc: dict, neutral: int) -> ModelShape:
    """The inventory's ModelShape of a possibly partial model_config. A width it leaves out (or gives as a
    non-integer) is not checked here: it takes ``neutral``, a value every parallel degree divides; a missing
    num_hidden_layers takes enough layers to hold a dense and a MoE layer."""
    def integer(key, default):
        return mc[key] if _is_int(mc.get(key)) else default

    first_dense = integer("first_k_dense_replace", 0)
    frequency = mc["moe_layer_freq"] if _is_pos_int(mc.get("moe_layer_freq")) else 1
    widths = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "kv_lora_rank",
              "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "moe_intermediate_size")
    return ModelShape(**{key: integer(key, neutral) for key in widths},
                      num_hidden_layers=integer("num_hidden_layers", first_dense + frequency),
                      q_lora_rank=integer("q_lora_rank", None), n_routed_experts=integer("n_routed_experts", None),
                      n_shared_experts=integer("n_shared_experts", None), first_k_dense_replace=first_dense,
                      moe_layer_freq=frequency, tie_word_embeddings=bool(mc.get("tie_word_embeddings", False)))


def _quantization_problems(mc: dict, s: ParallelShape) -> List[str]:
    """A quantized model's own tensors along the hand-written inference split over model_parallel ranks (the
    module docstring); a bad quantization_config or a group size not dividing a weight's inputs: one message."""
    if not mc.get("quantization_config"):
        return []
    try:
        settings = quantization_settings(mc)
        if settings is None:
            return []
        neutral = math.lcm(s.mp, s.ep, 2) * (settings.group_size or 1)     # a missing width: one that splits
        return list(_quantized_split_problems(_shape_for_checks(mc, neutral), settings, s.mp))
    except QuantizationError as err:
        return [str(err)]


@functools.lru_cache(maxsize=256)
def _quantized_split_problems(shape: ModelShape, settings, tp: int) -> Tuple[str, ...]:
    """One message per quantized tensor (its layers counted) whose inference split dimension does not divide into
    ``tp`` ranks (cached: the memory plan asks the same model many times)."""
    if tp == 1:
        return ()
    found: Dict[str, list] = {}
    for param in parameters(dict(dataclasses.asdict(shape), quantization_config=settings)):
        dim = inference_split_dim(param)
        if param.dtype and dim is not None and param.shape[dim] % tp:
            found.setdefault(re.sub(r"^model\.layers\.\d+\.", "", param.name), []).append(param)
    messages = []
    for params in found.values():
        param, dim = params[0], inference_split_dim(params[0])
        held = ("columns of scale groups" if param.name.endswith("_scale") else
                "rows of int4 pairs of output channels" if settings.bits == 4 else "rows")
        layers = f" (and the same tensor of {len(params) - 1} more layers)" if len(params) > 1 else ""
        messages.append(f"{param.name}{layers}: the quantized ({settings.weight_dtype}, group_size "
                        f"{settings.group_size}) tensor {param.shape} has {param.shape[dim]} {held} on dimension "
                        f"{dim}, which do not split into parallel_config.model_parallel = {tp} ranks; use a "
                        f"model_parallel dividing {param.shape[dim]}, another group_size, or modules_to_not_convert")
    return tuple(messages)


def _latent_problems(mc: dict) -> List[str]:
    """The MLA latents stay whole on every rank: only their type matters."""
    problems = []
    if "kv_lora_rank" in mc and not _is_pos_int(mc["kv_lora_rank"]):
        problems.append(f"model_config.kv_lora_rank = {mc['kv_lora_rank']!r}: expected a positive integer "
                        "(the compressed KV latent, kept whole on every tensor-parallel rank)")
    q_lora = mc.get("q_lora_rank")
    if q_lora is not None and not _is_pos_int(q_lora):
        problems.append(f"model_config.q_lora_rank = {q_lora!r}: expected a positive integer or null "
                        "(null = full-rank query projection)")
    return problems


def _expert_problems(mc: dict, s: ParallelShape) -> List[str]:
    """Expert-parallel groups are carved out of the data-parallel ranks; ep > 1 needs routed experts.
    (n_routed_experts % expert_parallel is a cut of the routed experts: _divisibility_problems.)"""
    if not mc.get("n_routed_experts"):
        if s.ep > 1:
            return [f"parallel_config.expert_parallel = {s.ep} > 1 but model_config.n_routed_experts is not set"]
        return []
    if s.dp % s.ep:
        return [f"parallel_config.expert_parallel = {s.ep} does not divide parallel_config.data_parallel = {s.dp} "
                "(MindFormers forms expert-parallel groups inside the data-parallel ranks)"]
    return []


def _pipeline_problems(mc: dict, s: ParallelShape) -> List[str]:
    """Stages of whole layers (an even split, or model_config.offset adding up), and enough micro-batches."""
    problems = []
    layers = mc.get("num_hidden_layers")
    if layers is not None:
        problems += _stage_split_problems(layers, s.pp, mc.get("offset"))
    if s.pp > 1 and s.micro_batch_num < s.pp:
        problems.append(f"parallel_config.micro_batch_num = {s.micro_batch_num} is smaller than parallel_config."
                        f"pipeline_stage = {s.pp} (the pipeline would never fill)")
    return problems


def _stage_split_problems(layers: int, pp: int, offset) -> List[str]:
    """num_hidden_layers over pipeline_stage stages, evenly or as model_config.offset says."""
    if pp > layers:
        return [f"parallel_config.pipeline_stage = {pp} exceeds model_config.num_hidden_layers = {layers}"]
    if offset in (None, 0):
        if layers % pp:
            return [f"model_config.num_hidden_layers = {layers} is not divisible by parallel_config.pipeline_stage"
                    f" = {pp}; set model_config.offset (one int per stage) for an uneven split"]
        return []
    if not isinstance(offset, int) and len(offset) != pp:
        return [f"model_config.offset has {len(offset)} entries, expected parallel_config.pipeline_stage = {pp}"]
    counts = layers_per_stage(layers, pp, offset)
    if sum(counts) != layers or min(counts) <= 0:
        return [f"model_config.offset = {offset} gives stages {counts} layers, which do not add up to "
                f"model_config.num_hidden_layers = {layers} with every stage > 0"]
    return []


def _sequence_parallel_problems(mc: dict, s: ParallelShape) -> List[str]:
    """Sequence parallel splits the sequence over the tensor-parallel ranks."""
    seq_length = mc.get("seq_length")
    if s.use_seq_parallel and s.mp > 1 and seq_length is not None and seq_length % s.mp:
        return [f"model_config.seq_length = {seq_length} is not divisible by parallel_config.model_parallel = "
                f"{s.mp} with parallel_config.use_seq_parallel = True"]
    return []


# ---------------------------------------------------------------------------------------------- YAML files
def load_yaml(path: str) -> dict:
    """A MindFormers YAML as a dict (KeyError-free access to the sections used here)."""
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return config


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
    if model_config.get("quantization_config") and not is_predict(config):
        problems.append(f"{name}: model_config.quantization_config with run_mode {config.get('run_mode')!r}: "
                        "quantized weights are for predict only (training refuses them); set run_mode: predict")
    if is_predict(config):
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
