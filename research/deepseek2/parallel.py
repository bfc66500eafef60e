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

from .checkpoint_io import CheckpointError, HFCheckpoint, MSCheckpoint, iter_ckpt, cast_array, np_dtype
from .weight_map import hf_to_ms, ms_to_hf, is_stacked

__all__ = ["split_dims", "local_slice", "load_for_rank", "weight_strategies", "check_weight_strategies",
           "matmul_strategy", "apply_semi_auto"]

PARALLEL_AXES = ("mp", "ep")


def split_dims(net) -> Dict[str, int]:
    """{parameter name: the dimension split across ranks} from the LAYOUT declarations of the net's cells."""
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
def _axis_size(axis, sizes) -> int:
    return sizes.get(axis, 1) if axis else 1


def weight_strategies(config, dp: int, mp: int, ep: int) -> Dict[str, Tuple[int, ...]]:
    """{parameter name: how many parts each dimension is cut into} for the full model of ``config``.

    Read from the LAYOUT declarations (by the parameter's suffix), without building the model, so it works for the
    236B shape on any machine. Undeclared weights are replicated (all ones).
    """
    from .weight_map import expected_ms_shapes
    from .deepseek2_layer import FeedForward, RoutedExperts
    from .deepseek2_transformer import MLAttention
    layouts = []
    for owner, cls in (("attention.", MLAttention), ("feed_forward.", FeedForward),
                       ("shared_experts.", FeedForward), ("routed_experts.ffn.", RoutedExperts)):
        layouts += [(owner + suffix, spec) for suffix, spec in cls.LAYOUT.items()]
    sizes = {"mp": mp, "ep": ep, "dp": dp}
    plan = {}
    for name, shape in expected_ms_shapes(config).items():
        spec = next((spec for suffix, spec in layouts if name.endswith("." + suffix)), None)
        plan[name] = tuple(_axis_size(axis, sizes) for axis in spec) if spec else (1,) * len(shape)
    return plan


def check_weight_strategies(config, dp: int, mp: int, ep: int) -> list:
    """Problems (empty = fine): a weight dimension not divisible by the number of parts it is cut into."""
    from .weight_map import expected_ms_shapes
    shapes = expected_ms_shapes(config)
    problems = []
    if config.num_attention_heads % mp:          # head-major weights must split on head boundaries
        problems.append(f"num_attention_heads = {config.num_attention_heads}: q_proj/l2q_proj/lkv2kv/wo split "
                        f"by heads into {mp} parts")
    for name, parts in weight_strategies(config, dp, mp, ep).items():
        for dim, (size, part) in enumerate(zip(shapes[name], parts)):
            if size % part:
                problems.append(f"{name}: dimension {dim} ({size}) is not divisible into {part} parts")
    return problems


def matmul_strategy(spec, dp: int, mp: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Strategy of a Linear's MatMul(x (tokens, in), W (out, in)^T) for its weight LAYOUT entry."""
    if spec and spec[0] == "mp":                   # column parallel: W split by output rows
        return (dp, 1), (mp, 1)
    if spec and len(spec) > 1 and spec[1] == "mp":  # row parallel: W split by input columns, partial sums
        return (dp, mp), (1, mp)
    return (dp, 1), (1, 1)


def apply_semi_auto(net, dp: int, mp: int) -> Dict[str, tuple]:
    """Give every Linear's MatMul its strategy from the LAYOUT of the cell owning it (semi-auto parallel on Ascend;
    the other ops follow by sharding propagation). Returns {matmul path: strategy}. Routed experts keep MindSpore's
    default strategies here (their expert-parallel dispatch needs Ascend's AlltoAll and is not declared)."""
    from .deepseek2_layer import Linear
    applied = {}
    cells = dict(net.cells_and_names())
    for path, cell in cells.items():
        if not isinstance(cell, Linear):
            continue
        parent_path, _, child = path.rpartition(".")
        parent = cells.get(parent_path)
        spec = getattr(type(parent), "LAYOUT", {}).get(f"{child}.weight") if parent is not None else None
        strategy = matmul_strategy(spec, dp, mp)
        cell.matmul.shard(strategy)
        applied[path + ".matmul"] = strategy
    return applied
