"""The parallel layout applied: per-rank slices for hand-written inference tensor parallel, and the semi-auto/auto
parallel strategies of Ascend training. What each weight splits on is the inventory's (``inventory.py``); what each
op splits on is ``op_strategies`` below. The model's math never asks which rank it is on.

Inference (``run_mindformer.py --run_mode predict --use_parallel True``, hand-written): rank r of N builds the model
with ``inventory.local_shape(config, N, r)`` (1/N of the heads, FFN widths and routed experts) and
``load_for_rank`` reads only its slices: from Hugging Face safetensors shards (rows read by offset; only the rank's
own experts are read at all) or from a MindSpore checkpoint (file or shard folder, streamed tensor by tensor).

Training under semi-auto/auto parallel (Ascend): ``apply_semi_auto(net, sizes)`` gives every Linear's MatMul the
strategy of its weight's cuts and the ops of ``op_strategies`` theirs; MindSpore propagates the rest
(``parallel_mode: 2``, ``search_mode: sharding_propagation``). The model is built with
``LocalShape(token_groups=data_parallel)`` so the capacity dispatch and token dropping group tokens by data-parallel
rank.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from .checkpoint_io import (HFCheckpoint, MSCheckpoint, SafetensorsReader, iter_ckpt, cast_array, is_hf_folder,
                            np_dtype)
from .ckpt_check import check_checkpoint
from .errors import CheckpointError
from .inventory import LocalShape, Param, expert_capacity, inference_split_dim, parameters, parts
from .parallel_check import parallel_shape
from .weight_map import ms_to_hf, is_stacked

__all__ = ["ParallelSizes", "parallel_sizes", "weight_strategies", "matmul_strategy", "op_strategies",
           "expert_buffers", "apply_semi_auto", "training_local_shape", "local_slice", "load_for_rank"]


# ------------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class ParallelSizes:
    """Degrees of the parallel axes: dp data, mp model (tensor), ep expert, vocab (= mp when ``vocab_emb_dp`` is
    False: embedding and lm_head split by vocabulary, else 1)."""
    dp: int = 1
    mp: int = 1
    ep: int = 1
    vocab: int = 1

    def axes(self) -> Dict[str, int]:
        """{axis: degree} for ``inventory.parts``."""
        return {"mp": self.mp, "ep": self.ep, "vocab": self.vocab}


def parallel_sizes(parallel_config) -> ParallelSizes:
    """ParallelSizes of a MindFormers parallel_config (object or mapping; defaults and the vocabulary rule of
    parallel_check.parallel_shape)."""
    keys = ("data_parallel", "model_parallel", "expert_parallel", "vocab_emb_dp")
    given = parallel_config if isinstance(parallel_config, dict) else \
        {key: getattr(parallel_config, key) for key in keys if hasattr(parallel_config, key)}
    shape = parallel_shape(given)
    return ParallelSizes(dp=shape.dp, **shape.axes())


def training_local_shape(sizes: ParallelSizes, semi_auto: bool) -> LocalShape:
    """What a training process holds: everything; under semi-auto/auto parallel the graph sees the global batch, so
    the capacity dispatch and token dropping work in data_parallel token groups (one per rank's batch)."""
    return LocalShape(token_groups=sizes.dp if semi_auto else 1)


# ------------------------------------------------------------------------------------------------ strategies
def weight_strategies(config, sizes: ParallelSizes) -> Dict[str, Tuple[int, ...]]:
    """{parameter name: parts of each dimension} for the full model of ``config`` (no model is built)."""
    return {param.name: parts(param, sizes.axes()) for param in parameters(config)}


def matmul_strategy(param: Param, sizes: ParallelSizes) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Strategy of a Linear's MatMul(x (tokens, in), W (out, in)^T) for its weight: column parallel when W is cut on
    its output rows, row parallel (partial sums) when cut on its input columns; tokens by data parallel."""
    out_parts, in_parts = parts(param, sizes.axes())
    if in_parts > 1:
        return (sizes.dp, in_parts), (1, in_parts)
    return (sizes.dp, 1), (out_parts, 1)


def op_strategies(cell_type: str, sizes: ParallelSizes, experts: Param = None) -> Dict[str, tuple]:
    """{op attribute of a cell of type ``cell_type``: strategy}: the ops that are not a Linear's MatMul.

    Routing, ranking and gathers stay inside each data-parallel group (dp, 1, ...); the expert matmuls take experts
    by ep, each expert's G*C rows by dp // ep and widths by mp, so MindSpore moves the dispatched rows from their
    group's rank to their expert's rank (AlltoAll) and back. ``experts``: the inventory entry of the stacked w1.
    """
    dp, mp, ep = sizes.dp, sizes.mp, sizes.ep
    if cell_type == "Embedding":
        return {"gather": ((sizes.vocab, 1), (dp, 1))}
    if cell_type == "RankWithin":
        return {"sort_desc": ((dp, 1),), "sort_asc": ((dp, 1),), "gather": ((dp, 1), (dp, 1))}
    if cell_type == "RoutedExperts":
        up = parts(experts, sizes.axes())                                         # (ep, mp, 1)
        return {"sort_slots": ((dp, 1),), "index_gather": ((dp, 1), (dp, 1)), "row_gather": ((dp, 1, 1), (dp, 1)),
                "bmm_up": ((ep, dp // ep, 1), up), "bmm_down": ((ep, dp // ep, mp), (up[0], up[2], up[1]))}
    return {}


def expert_buffers(config, sizes: ParallelSizes) -> dict:
    """Shapes of the capacity dispatch for one micro-batch of ``batch_size`` sequences per data-parallel rank:
    groups G = dp, tokens per group T_g = batch_size * seq_length, rows per expert and group C, the buffer
    (E, G*C, hidden) and its per-rank part (E/ep, G*C/(dp/ep), hidden)."""
    tokens = config.batch_size * config.seq_length
    experts, dp, ep = config.n_routed_experts, sizes.dp, sizes.ep
    rows = expert_capacity(tokens, config.num_experts_per_tok, experts, config.expert_capacity_factor)
    return {"groups": dp, "group_tokens": tokens, "capacity": rows, "buffer": (experts, dp * rows, config.hidden_size),
            "per_rank": (experts // ep, dp * rows // (dp // ep), config.hidden_size)}


def apply_semi_auto(net, sizes: ParallelSizes) -> Dict[str, tuple]:
    """Lay ``net`` out for semi-auto/auto parallel training (Ascend): returns {op path: strategy}.

    The net must be built with ``training_local_shape(sizes, True)`` (token groups = dp) and the capacity dispatch
    (``moe_dispatch: capacity``): a ValueError names what is wrong otherwise.
    """
    from .layers import Linear
    from .moe import RoutedExperts
    inventory = {p.name: p for p in parameters(net.config)}
    stacked_w1 = next((p for p in inventory.values() if p.name.endswith("routed_experts.w1")), None)
    applied = {}
    for path, cell in net.cells_and_names():
        kind = "RoutedExperts" if isinstance(cell, RoutedExperts) else type(cell).__name__   # LoRA subclasses too
        if isinstance(cell, RoutedExperts):
            if cell.dispatch != "capacity":
                raise ValueError("DeepseekV2Config.moe_dispatch = 'dropless': semi-auto/auto parallel training needs "
                                 "'capacity' (set model.model_config.moe_dispatch: capacity and expert_capacity_factor)")
            if cell.groups != sizes.dp:
                raise ValueError(f"{path}: built with {cell.groups} token group(s) but data_parallel = {sizes.dp}: "
                                 f"build the model with parallel.training_local_shape(sizes, semi_auto=True)")
        if isinstance(cell, Linear):
            weight = inventory.get(f"{path}.weight")
            if weight is None:
                raise ValueError(f"{path}.weight is not in the parameter inventory (inventory.py)")
            strategy = matmul_strategy(weight, sizes)
            cell.matmul.shard(strategy)
            applied[f"{path}.matmul"] = strategy
            continue
        for op_name, strategy in op_strategies(kind, sizes, stacked_w1).items():
            getattr(cell, op_name).shard(strategy)
            applied[f"{path}.{op_name}"] = strategy
    return applied


# ------------------------------------------------------------------------------------------------ per-rank slices
def local_slice(full_dim: int, tp: int, rank: int) -> slice:
    """Rank ``rank``'s part of a dimension of size ``full_dim`` cut into ``tp`` parts."""
    if full_dim % tp:
        raise CheckpointError(f"dimension {full_dim} does not split into {tp} equal parts")
    part = full_dim // tp
    return slice(rank * part, (rank + 1) * part)


def _index(dim: int, piece: slice) -> Tuple:
    return tuple([slice(None)] * dim + [piece])


def _from_hf(wanted: Dict[str, Param], hf_dir: str, tp: int, rank: int) -> Dict[str, np.ndarray]:
    hf = HFCheckpoint(hf_dir)
    info = hf.tensor_info()                                        # {hf name: (shape, dtype, shard)}
    readers = {}

    def read(hf_name, index=None):
        if hf_name not in info:
            raise CheckpointError(f"{hf_dir}: tensor {hf_name} is missing")
        shard = info[hf_name][2]
        if shard not in readers:
            readers[shard] = hf.open(shard)
        return readers[shard].get(hf_name, index)

    out = {}
    try:
        for name, param in wanted.items():
            dim = inference_split_dim(param)
            if is_stacked(name):                                   # only this rank's experts are read at all
                experts = range(param.shape[0])[local_slice(param.shape[0], tp, rank)]
                out[name] = np.stack([read(ms_to_hf(name, e)) for e in experts])
            elif dim is not None:
                out[name] = read(ms_to_hf(name), _index(dim, local_slice(param.shape[dim], tp, rank)))
            else:
                out[name] = read(ms_to_hf(name))
    finally:
        for reader in readers.values():
            reader.close()
    return out


def _from_ms(wanted: Dict[str, Param], path: str, tp: int, rank: int) -> Dict[str, np.ndarray]:
    """This rank's slices from a MindSpore checkpoint: a safetensors file reads only the slice (``get_slice``); a
    ``.ckpt`` is streamed one tensor at a time and sliced."""
    out = {}
    for file in MSCheckpoint(path).files:
        if file.endswith(".safetensors"):
            with SafetensorsReader(file) as reader:
                for name in reader.keys():
                    if name in wanted:
                        dim = inference_split_dim(wanted[name])
                        out[name] = reader.get(name, None if dim is None else
                                               _index(dim, local_slice(reader.shape(name)[dim], tp, rank)))
            continue
        for name, array in iter_ckpt(file):                       # one tensor in memory at a time
            if name not in wanted:
                continue
            dim = inference_split_dim(wanted[name])
            out[name] = array if dim is None else \
                np.ascontiguousarray(array[_index(dim, local_slice(array.shape[dim], tp, rank))])
    return out


def load_for_rank(net, path: str, rank: int):
    """Load rank ``rank``'s slices into ``net`` (built with ``inventory.local_shape(config, tp, rank)``) from an HF
    folder or a MindSpore checkpoint (file or shard folder). Every weight of the inventory must arrive with its
    local shape; returns the names loaded."""
    import mindspore as ms
    tp = net.local.tp
    check_checkpoint(net.config, path)            # the whole checkpoint fits the model (headers only)
    wanted = {p.name: p for p in parameters(net.config)}
    net_params = {p.name: p for p in net.get_parameters()}
    arrays = _from_hf(wanted, path, tp, rank) if is_hf_folder(path) else _from_ms(wanted, path, tp, rank)
    missing = [n for n in wanted if n not in arrays]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} weight(s) missing, e.g. {missing[:5]}")
    for name, array in arrays.items():
        param = net_params[name]
        if tuple(array.shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: {name}: rank {rank}/{tp} slice has shape {tuple(array.shape)}, "
                                  f"the net expects {tuple(param.shape)}")
        param.set_data(ms.Tensor(cast_array(array, np_dtype(param.dtype))))
    return sorted(arrays)
