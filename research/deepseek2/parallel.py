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

__all__ = ["split_dims", "local_slice", "load_for_rank"]

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
