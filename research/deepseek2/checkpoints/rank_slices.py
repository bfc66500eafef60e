"""Per-rank slices of a checkpoint for hand-written inference tensor parallel.

Rank r of N builds the model with ``inventory.local_shape(config, N, r)`` (1/N of the heads, FFN widths and routed
experts) and ``load_for_rank`` reads only its slices, each weight cut on the dimension ``inventory.
inference_split_dim`` names: from Hugging Face safetensors shards (rows read by offset; only the rank's own experts are
read at all), from MindSpore safetensors (the slice read by offset) or from a ``.ckpt`` (streamed tensor by tensor,
each sliced). The model's math never asks which rank it is on; this module does, for the checkpoint only.
"""
from typing import Dict, Tuple

import numpy as np

from research.deepseek2.checkpoints.arrays import cast_array, np_dtype
from research.deepseek2.checkpoints.check import check_checkpoint
from research.deepseek2.checkpoints import open_checkpoint
from research.deepseek2.checkpoints.checkpoint import Checkpoint
from research.deepseek2.checkpoints.weight_map import is_stacked, ms_to_hf
from research.deepseek2.errors import CheckpointError
from research.deepseek2.planning.inventory import Param, inference_split_dim, parameters

__all__ = ["local_slice", "load_for_rank"]


def local_slice(full_dim: int, tp: int, rank: int) -> slice:
    """Rank ``rank``'s part of a dimension of size ``full_dim`` cut into ``tp`` parts."""
    if full_dim % tp:
        raise CheckpointError(f"dimension {full_dim} does not split into {tp} equal parts")
    part = full_dim // tp
    return slice(rank * part, (rank + 1) * part)


def _index(dim: int, piece: slice) -> Tuple:
    return tuple([slice(None)] * dim + [piece])


def _from_hf(wanted: Dict[str, Param], checkpoint: Checkpoint, tp: int, rank: int) -> Dict[str, np.ndarray]:
    info = checkpoint.tensors
    readers = {}

    def read(hf_name, index=None):
        file = info[hf_name].file
        if file not in readers:
            readers[file] = checkpoint.reader(file)
        return readers[file].get(hf_name, index)

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


def _from_ms(wanted: Dict[str, Param], checkpoint: Checkpoint, tp: int, rank: int) -> Dict[str, np.ndarray]:
    """This rank's slices from a MindSpore checkpoint: a safetensors file reads only the slice (``get_slice``); a
    ``.ckpt`` is streamed one tensor at a time and sliced."""
    out = {}
    for file in checkpoint.files:
        if checkpoint.format == "safetensors":
            with checkpoint.reader(file) as reader:
                for name in reader.keys():
                    if name in wanted:
                        dim = inference_split_dim(wanted[name])
                        out[name] = reader.get(name, None if dim is None else
                                               _index(dim, local_slice(reader.shape(name)[dim], tp, rank)))
            continue
        for name, array in checkpoint.iter_file(file):            # one tensor in memory at a time
            if name not in wanted:
                continue
            dim = inference_split_dim(wanted[name])
            out[name] = array if dim is None else \
                np.ascontiguousarray(array[_index(dim, local_slice(array.shape[dim], tp, rank))])
    return out


def load_for_rank(net, checkpoint, rank: int):
    """Load rank ``rank``'s slices into ``net`` (built with ``inventory.local_shape(config, tp, rank)``) from a
    checkpoint (a path or an opened ``Checkpoint``: a Hugging Face folder or a MindSpore file or shard folder). Every
    weight of the inventory must arrive with its local shape; returns the names loaded."""
    import mindspore as ms
    checkpoint = open_checkpoint(checkpoint)
    tp = net.local.tp
    check_checkpoint(net.config, checkpoint)      # the whole checkpoint fits the model (headers only)
    wanted = {p.name: p for p in parameters(net.config)}
    net_params = {p.name: p for p in net.get_parameters()}
    read = _from_hf if checkpoint.kind == "hf" else _from_ms
    arrays = read(wanted, checkpoint, tp, rank)
    missing = [n for n in wanted if n not in arrays]
    if missing:
        raise CheckpointError(f"{checkpoint.path}: {len(missing)} weight(s) missing, e.g. {missing[:5]}")
    for name, array in arrays.items():
        param = net_params[name]
        if tuple(array.shape) != tuple(param.shape):
            raise CheckpointError(f"{checkpoint.path}: {name}: rank {rank}/{tp} slice has shape "
                                  f"{tuple(array.shape)}, the net expects {tuple(param.shape)}")
        param.set_data(ms.Tensor(cast_array(array, np_dtype(param.dtype))))
    return sorted(arrays)
