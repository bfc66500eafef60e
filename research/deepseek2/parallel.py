"""Hand-written tensor and expert parallel inference: which slice of each weight a rank holds, and loading it.

The split of every weight is declared once, in the ``LAYOUT`` of the Cell that owns it (deepseek2_layer.py,
deepseek2_transformer.py): "mp" splits attention heads and FFN widths, "ep" splits the routed experts; both are cut
into ``tp_size`` equal parts. Everything not declared (embedding, norms, latent projections, router, lm_head,
the latent KV cache) is replicated.

Loading reads only this rank's slice: from Hugging Face safetensors shards (rows read by offset; only the rank's own
experts are read at all) or from a converted MindSpore checkpoint (file or shard folder, streamed tensor by tensor).
"""
import os
from typing import Dict, Optional, Tuple

import numpy as np

from .moe_shapes import expert_capacity
from .checkpoint_io import CheckpointError, HFCheckpoint, MSCheckpoint, iter_ckpt, cast_array, np_dtype
from .weight_map import ms_to_hf, is_stacked

__all__ = ["split_dims", "local_slice", "load_for_rank", "parallel_sizes", "weight_strategies",
           "check_weight_strategies", "expert_buffers", "matmul_strategy", "apply_semi_auto"]

PARALLEL_AXES = ("mp", "ep")


def split_dims(net) -> Dict[str, int]:
    """{parameter name: the dimension split across ranks} from the LAYOUT declarations of the net's cells.

    The hand-written inference split cuts a weight along its first "mp"/"ep" axis only (routed experts by count,
    not also by width); the vocabulary stays whole."""
    params = {p.name for p in net.get_parameters()}
    dims = {}
    for cell_name, cell in net.cells_and_names():
        for suffix, spec in getattr(type(cell), "LAYOUT", {}).items():
            name = f"{cell_name}.{suffix}" if cell_name else suffix
            axes = [i for i, axis in enumerate(spec) if axis in PARALLEL_AXES]
            if name in params and axes:
                dims[name] = axes[0]
    return dims


def local_slice(full_dim: int, tp_size: int, tp_rank: int) -> slice:
    """This rank's part of a dimension of size full_dim."""
    if full_dim % tp_size:
        raise CheckpointError(f"dimension {full_dim} does not split into {tp_size} equal parts")
    part = full_dim // tp_size
    return slice(tp_rank * part, (tp_rank + 1) * part)


def _index(dim: int, piece: slice) -> Tuple:
    return tuple([slice(None)] * dim + [piece])


def _from_hf(net_params, dims, hf_dir, tp_size, tp_rank, n_experts) -> Dict[str, np.ndarray]:
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
        for name, param in net_params.items():
            if not param.requires_grad:
                continue
            if is_stacked(name):                                   # only this rank's experts are read at all
                experts = range(n_experts)[local_slice(n_experts, tp_size, tp_rank)]
                out[name] = np.stack([read(ms_to_hf(name, e)) for e in experts])
            elif name in dims:
                hf_name = ms_to_hf(name)
                full = info[hf_name][0] if hf_name in info else None
                if full is None:
                    raise CheckpointError(f"{hf_dir}: tensor {hf_name} is missing")
                out[name] = read(hf_name, _index(dims[name], local_slice(full[dims[name]], tp_size, tp_rank)))
            else:
                out[name] = read(ms_to_hf(name))
    finally:
        for reader in readers.values():
            reader.close()
    return out


def _from_ms(net_params, dims, path, tp_size, tp_rank) -> Dict[str, np.ndarray]:
    out = {}
    for file in MSCheckpoint(path).files:
        for name, array in iter_ckpt(file):                       # one tensor in memory at a time
            if name not in net_params or not net_params[name].requires_grad:
                continue
            dim = dims.get(name)
            out[name] = np.ascontiguousarray(array[_index(dim, local_slice(array.shape[dim], tp_size, tp_rank))]) \
                if dim is not None else array
    return out


def load_for_rank(net, path: str, tp_size: int, tp_rank: int, n_experts: Optional[int] = None):
    """Load this rank's slices into ``net`` (built with the same tp_size / tp_rank) from an HF folder or a
    MindSpore checkpoint (file or shard folder). Every trainable parameter must be found with its local shape."""
    import mindspore as ms
    net_params = {p.name: p for p in net.get_parameters()}
    dims = split_dims(net)
    is_hf = os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
    arrays = _from_hf(net_params, dims, path, tp_size, tp_rank, n_experts) if is_hf else \
        _from_ms(net_params, dims, path, tp_size, tp_rank)
    missing = [n for n, p in net_params.items() if p.requires_grad and n not in arrays]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} parameter(s) missing, e.g. {missing[:5]}")
    for name, array in arrays.items():
        param = net_params[name]
        if tuple(array.shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: {name}: rank {tp_rank}/{tp_size} slice has shape {tuple(array.shape)}, "
                                  f"the net expects {tuple(param.shape)}")
        param.set_data(ms.Tensor(cast_array(array, np_dtype(param.dtype))))
    return sorted(arrays)


# ------------------------------------------------------------------------------ semi-auto parallel (Ascend training)
def parallel_sizes(parallel_config) -> Dict[str, int]:
    """{axis: parts} of a MindFormers parallel_config (object or dict; defaults as parallel_check.parallel_shape):
    dp, mp, ep, and vocab (= mp when ``vocab_emb_dp`` is False: embedding and lm_head split by vocabulary)."""
    from .parallel_check import parallel_shape
    keys = ("data_parallel", "model_parallel", "expert_parallel", "vocab_emb_dp")
    given = parallel_config if isinstance(parallel_config, dict) else \
        {key: getattr(parallel_config, key) for key in keys if hasattr(parallel_config, key)}
    shape = parallel_shape(given)
    return {"dp": shape.dp, "mp": shape.mp, "ep": shape.ep, "vocab": 1 if shape.vocab_emb_dp else shape.mp}


def _layouts():
    """(parameter-name suffix, LAYOUT entry) of every declaring cell, by where the cell sits in the model."""
    from .deepseek2 import DeepseekV2ForCausalLM
    from .deepseek2_layer import Embedding, FeedForward, RoutedExperts
    from .deepseek2_transformer import MLAttention
    owners = (("attention.", MLAttention), ("feed_forward.", FeedForward), ("shared_experts.", FeedForward),
              ("routed_experts.ffn.", RoutedExperts), ("tok_embeddings.", Embedding), ("", DeepseekV2ForCausalLM))
    return [(owner + suffix, spec) for owner, cls in owners for suffix, spec in cls.LAYOUT.items()]


def weight_strategies(config, dp: int, mp: int, ep: int, vocab_emb_dp: bool = True) -> Dict[str, Tuple[int, ...]]:
    """{parameter name: how many parts each dimension is cut into} for the full model of ``config``.

    Read from the LAYOUT declarations (by the parameter's suffix), without building the model, so it works for the
    236B shape on any machine. Undeclared weights are replicated (all ones).
    """
    from .weight_map import expected_ms_shapes
    from .deepseek2_layer import layout_parts
    sizes = parallel_sizes({"data_parallel": dp, "model_parallel": mp, "expert_parallel": ep,
                            "vocab_emb_dp": vocab_emb_dp})
    layouts = _layouts()
    plan = {}
    for name, shape in expected_ms_shapes(config).items():
        spec = next((spec for suffix, spec in layouts if name == suffix or name.endswith("." + suffix)), None)
        plan[name] = layout_parts(spec, sizes) if spec else (1,) * len(shape)
    return plan


def check_weight_strategies(config, dp: int, mp: int, ep: int, vocab_emb_dp: bool = True) -> list:
    """Problems (empty = fine): a weight dimension not divisible by the number of parts it is cut into."""
    from .weight_map import expected_ms_shapes
    shapes = expected_ms_shapes(config)
    problems = []
    if config.num_attention_heads % mp:          # head-major weights must split on head boundaries
        problems.append(f"num_attention_heads = {config.num_attention_heads}: q_proj/l2q_proj/lkv2kv/wo split "
                        f"by heads into {mp} parts")
    for name, parts in weight_strategies(config, dp, mp, ep, vocab_emb_dp).items():
        for dim, (size, part) in enumerate(zip(shapes[name], parts)):
            if size % part:
                problems.append(f"{name}: dimension {dim} ({size}) is not divisible into {part} parts")
    return problems


def expert_buffers(config, dp: int, ep: int, mp: int = 1) -> dict:
    """Shapes of the capacity dispatch for one micro-batch of ``batch_size`` sequences per data-parallel rank:
    groups G = dp, tokens per group T_g = batch_size * seq_length, rows per expert and group C, the buffer
    (E, G*C, hidden) and its per-rank part (E/ep, G*C/(dp/ep), hidden), plus the problems of that layout."""
    tokens = config.batch_size * config.seq_length
    experts, k = config.n_routed_experts, config.num_experts_per_tok
    rows = expert_capacity(tokens, k, experts, config.expert_capacity_factor)
    problems = []
    if config.moe_dispatch != "capacity":
        problems.append(f"moe_dispatch = {config.moe_dispatch!r}: semi-auto/auto parallel training needs "
                        f"'capacity' (static per-expert buffers that split over expert_parallel)")
    if experts % ep:
        problems.append(f"n_routed_experts = {experts} is not divisible by expert_parallel = {ep}")
    if dp % ep:
        problems.append(f"expert_parallel = {ep} does not divide data_parallel = {dp}")
    if config.moe_intermediate_size % mp:
        problems.append(f"moe_intermediate_size = {config.moe_intermediate_size} is not divisible by "
                        f"model_parallel = {mp}")
    inner = dp // ep if not dp % ep else 1
    return {"groups": dp, "group_tokens": tokens, "capacity": rows, "buffer": (experts, dp * rows, config.hidden_size),
            "per_rank": (experts // ep if not experts % ep else None, dp * rows // inner, config.hidden_size),
            "problems": problems}


def matmul_strategy(spec, sizes) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Strategy of a Linear's MatMul(x (tokens, in), W (out, in)^T) for its weight LAYOUT entry; sizes: {axis: parts}
    with "dp" for the tokens."""
    dp = sizes.get("dp", 1)
    if spec and spec[0]:                           # column parallel: W split by output rows
        return (dp, 1), (sizes.get(spec[0], 1), 1)
    if spec and len(spec) > 1 and spec[1]:         # row parallel: W split by input columns, partial sums
        part = sizes.get(spec[1], 1)
        return (dp, part), (1, part)
    return (dp, 1), (1, 1)


def apply_semi_auto(net, sizes) -> Dict[str, tuple]:
    """Lay the model out for semi-auto/auto parallel (Ascend training) from the declarations beside the math.

    sizes: {"dp", "mp", "ep", "vocab"} (see ``parallel_sizes``). Every Linear's MatMul gets its strategy from the
    LAYOUT of the cell owning it; cells with a ``parallelize`` method (embedding, MoE token dropping, the routed
    experts' capacity dispatch) lay out their own ops. The remaining ops follow by sharding propagation
    (``parallel_mode: 2``, ``search_mode: sharding_propagation``). Returns {op or cell path: strategy}.
    """
    from .deepseek2_layer import Linear, RoutedExperts
    cells = dict(net.cells_and_names())
    dispatch = {cell.dispatch for cell in cells.values() if isinstance(cell, RoutedExperts)}
    if dispatch - {"capacity"}:
        raise ValueError("DeepseekV2Config.moe_dispatch = 'dropless': semi-auto/auto parallel training needs "
                         "'capacity' (set model.model_config.moe_dispatch: capacity and expert_capacity_factor)")
    applied = {}
    for path, cell in cells.items():
        if isinstance(cell, Linear):
            parent_path, _, child = path.rpartition(".")
            parent = cells.get(parent_path)
            spec = getattr(type(parent), "LAYOUT", {}).get(f"{child}.weight") if parent is not None else None
            strategy = matmul_strategy(spec, sizes)
            cell.matmul.shard(strategy)
            applied[path + ".matmul"] = strategy
        elif hasattr(cell, "parallelize"):
            cell.parallelize(sizes)
            applied[path + ".parallelize"] = dict(sizes)
    return applied
