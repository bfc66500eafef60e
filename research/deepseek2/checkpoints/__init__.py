"""Checkpoints: reading, checking, loading and writing DeepSeek-V2 weights in every form a user brings.

Open a checkpoint once (``open_checkpoint``: a Hugging Face folder or a MindSpore file, folder or index), then hand
that object to whatever needs it:

- ``open_checkpoint`` (here): decides what a path is; ``checkpoint.py``: the ``Checkpoint`` every kind is,
  ``MindSporeCheckpoint``, the index names; ``hf_folder.py``:
  ``HFCheckpoint`` (a Hugging Face folder checked against a config and streamed under this model's names).
- ``check.py``: ``check_checkpoint``, the one completeness rule (from headers, before a run starts).
- ``load.py``: ``load_checkpoint`` into a built net (one tensor at a time), ``build_empty``.
- ``rank_slices.py``: ``load_for_rank``, a tensor-parallel rank's slices.
- ``weight_map.py``: the one Hugging Face <-> MindSpore name table; ``mf_hooks.py``: MindFormers' four name hooks.
- The file formats: ``safetensors_file.py``, ``ckpt_file.py`` (MindSpore's ``.ckpt``), ``torch_bin.py``
  (``pytorch_model*.bin``); ``arrays.py``: the numpy side (bf16, casts).

Importing this package is light: ``open_checkpoint`` and the names below load their modules on first use
(``weight_map`` stays plain Python for the memory planner).
"""
import importlib
import os

__all__ = ["open_checkpoint", "is_hf_folder", "Checkpoint", "MindSporeCheckpoint", "HFCheckpoint", "check_checkpoint",
           "load_checkpoint", "read_checkpoint", "build_empty", "load_for_rank", "CheckpointError"]

_EXPORTS = {
    "is_hf_folder": "checkpoint", "Checkpoint": "checkpoint",
    "MindSporeCheckpoint": "checkpoint", "HFCheckpoint": "hf_folder", "check_checkpoint": "check",
    "load_checkpoint": "load", "read_checkpoint": "load", "build_empty": "load", "load_for_rank": "rank_slices",
}


def open_checkpoint(path):
    """The checkpoint at ``path`` (a Hugging Face folder: a directory with a config.json; else a MindSpore file,
    folder or index), opened; an already opened ``Checkpoint`` is returned as it is. ``CheckpointError`` for a path
    that is none of them."""
    from research.deepseek2.checkpoints.checkpoint import Checkpoint, MindSporeCheckpoint, is_hf_folder
    from research.deepseek2.errors import CheckpointError
    if isinstance(path, Checkpoint):
        return path
    path = os.fspath(path)
    if is_hf_folder(path):
        from research.deepseek2.checkpoints.hf_folder import HFCheckpoint
        return HFCheckpoint(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if os.path.isfile(path) and not path.endswith((".safetensors", ".ckpt", ".json")):
        raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors or .ckpt)")
    return MindSporeCheckpoint(path)


def __getattr__(name):
    if name == "CheckpointError":
        from research.deepseek2.errors import CheckpointError
        return CheckpointError
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
