"""Checkpoint folders: a Hugging Face model folder and a MindSpore checkpoint folder, each with its weight index.

- Hugging Face: ``model.safetensors.index.json`` + shards, ``model.safetensors``, ``pytorch_model.bin.index.json`` +
  shards, or ``pytorch_model.bin`` (looked for in that order).
- MindSpore: ``*.ckpt`` shards plus ``MS_INDEX_NAME`` (``{"metadata": {"total_size": bytes}, "weight_map":
  {param name: shard file}}``), written by ``convert_weight.py`` for large models; or a single ``.ckpt`` file.

A checkpoint stays inside its folder: an index whose ``weight_map`` names a shard by an absolute path or through
``..`` is refused (``CheckpointError`` naming the index file and the entry). The check is on the names as written,
so a shard that is a symbolic link to elsewhere (the Hugging Face cache's ``snapshots/`` -> ``blobs/``) still works.
"""
import glob
import json
import os
from typing import Dict, Iterator, Tuple

import numpy as np

from research.deepseek2.ckpt_common import describe
from research.deepseek2.ckpt_mindspore import iter_ckpt, scan_ckpt
from research.deepseek2.ckpt_safetensors import SafetensorsReader
from research.deepseek2.ckpt_torch import TorchBinReader
from research.deepseek2.errors import CheckpointError

__all__ = ["is_hf_folder", "HF_INDEX_NAME", "MS_INDEX_NAME", "read_weight_map", "HFCheckpoint", "MSCheckpoint"]

HF_INDEX_NAME = "model.safetensors.index.json"
MS_INDEX_NAME = "deepseek2.ckpt.index.json"


def _inside(name: str) -> bool:
    """True for a relative path that stays in its folder ('a.ckpt', 'sub/a.ckpt'; not '/x', '../x', 'a/../../x')."""
    if os.path.isabs(name):
        return False
    parts = os.path.normpath(name).split(os.sep)
    return parts[0] not in (os.pardir, os.curdir, "")


def is_hf_folder(path: str) -> bool:
    """A Hugging Face model folder: a directory with a config.json (its weights beside it)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_weight_map(index_file: str) -> Dict[str, str]:
    """The ``weight_map`` of an index json: {tensor name: shard file relative to the index's folder, normalized}.

    ``CheckpointError`` if the file is not an index, or if an entry names a shard outside the folder.
    """
    try:
        with open(index_file) as f:
            weight_map = dict(json.load(f)["weight_map"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{index_file}: not a weight index (expected a JSON object with 'weight_map')") from err
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _inside(shard):
            raise CheckpointError(f"{index_file}: weight_map entry {name!r} -> {shard!r} names a file outside the "
                                  f"checkpoint folder; shards must be relative paths inside it")
    return {name: os.path.normpath(shard) for name, shard in weight_map.items()}


class HFCheckpoint:
    """The weight files of a Hugging Face model folder, shard by shard.

    ``shards`` lists the weight files (relative to ``hf_dir``); ``open(i)`` returns a reader for shard i
    (``SafetensorsReader`` or ``TorchBinReader``); ``tensor_info()`` scans every shard's header once:
    {name: (shape, dtype, shard index)}.
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        if not os.path.isdir(hf_dir):
            raise CheckpointError(f"{hf_dir}: Hugging Face checkpoint folder not found")
        candidates = [(HF_INDEX_NAME, True), ("model.safetensors", False),
                      ("pytorch_model.bin.index.json", True), ("pytorch_model.bin", False)]
        for name, is_index in candidates:
            path = os.path.join(hf_dir, name)
            if not os.path.isfile(path):
                continue
            self.kind = "bin" if "pytorch_model" in name else "safetensors"
            if is_index:
                self.index_file = path
                self.index = read_weight_map(path)
                self.shards = sorted(set(self.index.values()))
            else:
                self.index_file, self.index = None, None
                self.shards = [name]
            break
        else:
            raise CheckpointError(f"{hf_dir}: no weights found (looked for "
                                  f"{', '.join(n for n, _ in candidates)})")
        for shard in self.shards:
            if not os.path.isfile(os.path.join(hf_dir, shard)):
                raise CheckpointError(f"{hf_dir}: shard {shard} named in {os.path.basename(self.index_file)} "
                                      f"is missing")
        self._info = None

    def shard_path(self, i: int) -> str:
        return os.path.join(self.hf_dir, self.shards[i])

    def open(self, i: int):
        path = self.shard_path(i)
        return SafetensorsReader(path) if self.kind == "safetensors" else TorchBinReader(path)

    def tensor_info(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype, int]]:
        """{HF name: (shape, dtype, shard index)} from the headers; duplicates and index mismatches raise."""
        if self._info is not None:
            return self._info
        info = {}
        for i, shard in enumerate(self.shards):
            reader = self.open(i)
            try:
                for name in reader.keys():
                    if name in info:
                        raise CheckpointError(f"{self.hf_dir}: tensor {name!r} is in both "
                                              f"{self.shards[info[name][2]]} and {shard}")
                    if self.index is not None and self.index.get(name) != shard:
                        raise CheckpointError(f"{self.shard_path(i)}: tensor {name!r} is not listed for this file "
                                              f"in {os.path.basename(self.index_file)}")
                    info[name] = (reader.shape(name), reader.dtype(name), i)
            finally:
                reader.close()
        if self.index is not None:
            lost = sorted(set(self.index) - set(info))
            if lost:
                raise CheckpointError(f"{self.index_file}: {len(lost)} tensor(s) listed but absent from their "
                                      f"shard: {lost[:10]}")
        self._info = info
        return info


class MSCheckpoint:
    """A MindSpore checkpoint: one ``.ckpt`` file, or a folder of ``.ckpt`` shards (with ``MS_INDEX_NAME``, or else
    every ``*.ckpt`` in it), or the index json itself. ``files`` lists the shard paths."""

    def __init__(self, path: str):
        self.path = path
        self.index = None
        if os.path.isdir(path) or path.endswith(".json"):
            folder = path if os.path.isdir(path) else (os.path.dirname(path) or os.curdir)
            index_file = path if path.endswith(".json") else os.path.join(folder, MS_INDEX_NAME)
            if os.path.isfile(index_file):
                self.index = read_weight_map(index_file)
                self.files = [os.path.join(folder, n) for n in sorted(set(self.index.values()))]
            elif path.endswith(".json"):
                raise CheckpointError(f"{index_file}: checkpoint index not found")
            else:
                self.files = sorted(glob.glob(os.path.join(folder, "*.ckpt")))
            if not self.files:
                raise CheckpointError(f"{path}: no .ckpt files in this folder")
            self._shard_names = {file: os.path.relpath(file, folder) for file in self.files}
        elif os.path.isfile(path):
            self.files = [path]
        else:
            raise CheckpointError(f"{path}: MindSpore checkpoint not found")
        for file in self.files:
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: shard listed in {MS_INDEX_NAME} is missing")
        self._info = None

    def tensor_info(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype, str]]:
        """{name: (shape, dtype, file)} read from the record headers of every file (contents are skipped)."""
        if self._info is None:
            info = {}
            for file in self.files:
                for name, (shape, dtype) in scan_ckpt(file).items():
                    if name in info:
                        raise CheckpointError(f"parameter {name!r} is in both {info[name][2]} and {file}")
                    if self.index is not None and self.index.get(name) != self._shard_names[file]:
                        raise CheckpointError(f"{file}: parameter {name!r} is not listed for this file in the index")
                    info[name] = (shape, dtype, file)
            if self.index is not None and set(self.index) - set(info):
                raise CheckpointError(f"{self.path}: index lists parameters absent from the shards: "
                                      f"{describe(set(self.index) - set(info))}")
            self._info = info
        return self._info

    def iter_files(self) -> Iterator[Tuple[str, Iterator[Tuple[str, np.ndarray]]]]:
        """(file, iterator of (name, array)) per shard, in ``files`` order."""
        for file in self.files:
            yield file, iter_ckpt(file)
