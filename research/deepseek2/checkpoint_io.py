"""Checkpoint I/O for DeepSeek-V2: the names other modules import, gathered from the modules that implement them.

- ``ckpt_common``: ``BF16`` (numpy bfloat16), ``np_dtype``, ``dtype_name``, ``cast_array``.
- ``ckpt_safetensors``: ``SafetensorsReader`` (the ``safetensors`` library), ``SafetensorsWriter``.
- ``ckpt_torch``: ``TorchBinReader`` for ``pytorch_model*.bin`` (needs torch, which only these files do).
- ``ckpt_mindspore``: the ``.ckpt`` format: ``CkptWriter``, ``scan_ckpt``, ``iter_ckpt``.
- ``ckpt_folders``: ``HFCheckpoint``, ``MSCheckpoint`` and their indexes (``HF_INDEX_NAME``, ``MS_NAME_MAP`` =
  param_name_map.json of a safetensors folder, ``MS_INDEX_NAME`` of the older .ckpt folder).
- ``ckpt_check``: ``check_checkpoint`` and ``compare``, the one completeness rule (from headers).
- ``ckpt_hf_as_ms``: ``check_hf_tensors``, ``iter_hf_as_ms`` (HF tensors as this model's parameters).
- ``ckpt_load``: ``load_ms_checkpoint``, ``load_hf_checkpoint`` into a net; ``load_checkpoint`` (below) picks one.
- ``errors``: ``CheckpointError``.
"""
from research.deepseek2.ckpt_common import BF16, cast_array, dtype_name, np_dtype
from research.deepseek2.ckpt_folders import (HF_INDEX_NAME, MS_INDEX_NAME, MS_NAME_MAP, HFCheckpoint, MSCheckpoint,
                                             is_hf_folder)
from research.deepseek2.ckpt_hf_as_ms import check_hf_tensors, iter_hf_as_ms
from research.deepseek2.ckpt_load import load_hf_checkpoint, load_ms_checkpoint
from research.deepseek2.ckpt_mindspore import CkptWriter, iter_ckpt, scan_ckpt
from research.deepseek2.ckpt_safetensors import SafetensorsReader, SafetensorsWriter
from research.deepseek2.ckpt_torch import TorchBinReader
from research.deepseek2.errors import CheckpointError

__all__ = ["BF16", "CheckpointError", "SafetensorsReader", "SafetensorsWriter", "TorchBinReader", "HFCheckpoint",
           "CkptWriter", "scan_ckpt", "iter_ckpt", "MSCheckpoint", "MS_INDEX_NAME", "MS_NAME_MAP", "HF_INDEX_NAME",
           "np_dtype", "cast_array", "dtype_name", "check_hf_tensors", "iter_hf_as_ms",
           "load_ms_checkpoint", "load_hf_checkpoint", "load_checkpoint", "is_hf_folder", "build_empty"]


def build_empty(build, *args, **kwargs):
    """``build(*args, **kwargs)`` under MindSpore's ``no_init_parameters``: parameters are declared, not filled with
    random numbers, because a checkpoint is about to give them their values. Call ``net.init_parameters_data()``
    after loading for what the checkpoint does not hold (declared non-weights such as the latent cache)."""
    from mindspore.nn.utils import no_init_parameters  # pylint: disable=import-outside-toplevel
    with no_init_parameters():
        return build(*args, **kwargs)


def load_checkpoint(net, path: str):
    """Load any checkpoint this project reads into ``net``: a Hugging Face folder (config.json + safetensors or .bin
    shards; its config must give the net's shapes) or a MindSpore ``.ckpt`` file / converted folder / its index.
    Every weight must arrive with its shape (CheckpointError naming the missing, unexpected or mis-shaped ones)."""
    if is_hf_folder(path):           # the net's own config gives the shapes (the folder's config.json may differ in
        return load_hf_checkpoint(net, path, config=getattr(net, "config", None))   # knobs such as seq_length)
    return load_ms_checkpoint(net, path)
