"""Checkpoint folders: a Hugging Face model folder and a MindSpore checkpoint folder, each with its weight index.

- Hugging Face: ``model.safetensors.index.json`` + shards, ``model.safetensors``, ``pytorch_model.bin.index.json`` +
  shards, or ``pytorch_model.bin`` (looked for in that order). A folder with a ``config.json`` is a Hugging Face
  folder (``is_hf_folder``), never a MindSpore one.
- MindSpore, read by ``MSCheckpoint`` (MindSpore parameter names, routed experts stacked):
  - one ``.safetensors`` file, or a folder of them with ``MS_NAME_MAP`` (``param_name_map.json``, MindFormers' flat
    ``{param name: shard file}``; without it, every ``*.safetensors`` in the folder): what ``convert_weight.py``
    writes by default, and what MindFormers 1.9 loads with ``load_ckpt_format: safetensors``;
  - one ``.ckpt`` file, or a folder of ``.ckpt`` shards with ``MS_INDEX_NAME`` (``deepseek2.ckpt.index.json``:
    ``{"metadata": {"total_size": bytes}, "weight_map": {param name: shard file}}``; without it, every ``*.ckpt``):
    ``convert_weight.py --format ckpt`` and the folders it wrote before safetensors became the default.

A checkpoint stays inside its folder: an index whose map names a shard by an absolute path or through ``..`` is
refused (``CheckpointError`` naming the index file and the entry). The check is on the names as written, so a shard
that is a symbolic link to elsewhere (the Hugging Face cache's ``snapshots/`` -> ``blobs/``) still works.
"""
import glob
import json
import os
from typing import Dict, Iterator, Tuple

import numpy as np

from research.deepseek2.ckpt_common import describe
from research.deepseek2.ckpt_mindspore import iter_ckpt, scan_ckpt
from research.deepseek2.ckpt_safetensors import SafetensorsReader, iter_safetensors
from research.deepseek2.ckpt_torch import TorchBinReader
from research.deepseek2.errors import CheckpointError

__all__ = ["is_hf_folder", "HF_INDEX_NAME", "MS_INDEX_NAME", "MS_NAME_MAP", "read_weight_map", "read_name_map",
           "HFCheckpoint", "MSCheckpoint", "iter_ms_file", "scan_ms_file"]

HF_INDEX_NAME = "model.safetensors.index.json"
MS_INDEX_NAME = "deepseek2.ckpt.index.json"   # a folder of .ckpt shards
MS_NAME_MAP = "param_name_map.json"           # a folder of MindSpore safetensors shards (MindFormers' name)


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
    return _checked(index_file, weight_map, "weight_map entry")


def read_name_map(map_file: str) -> Dict[str, str]:
    """A flat ``{param name: shard file}`` json (MindFormers' ``param_name_map.json``), checked like
    ``read_weight_map``: shard names relative to the file's folder, normalized, never outside it."""
    try:
        with open(map_file) as f:
            name_map = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{map_file}: not a parameter name map (expected a JSON object "
                              f"{{param name: shard file}})") from err
    if not isinstance(name_map, dict):
        raise CheckpointError(f"{map_file}: not a parameter name map (expected a JSON object "
                              f"{{param name: shard file}})")
    return _checked(map_file, name_map, "entry")


def _checked(index_file: str, mapping: dict, what: str) -> Dict[str, str]:
    for name, shard in mapping.items():
        if not isinstance(shard, str) or not _inside(shard):
            raise CheckpointError(f"{index_file}: {what} {name!r} -> {shard!r} names a file outside the "
                                  f"checkpoint folder; shards must be relative paths inside it")
    return {name: os.path.normpath(shard) for name, shard in mapping.items()}


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


def _is_safetensors(file: str) -> bool:
    return file.endswith(".safetensors")


def scan_ms_file(file: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of one MindSpore file (``.safetensors`` by its name, else ``.ckpt``), headers only."""
    if _is_safetensors(file):
        with SafetensorsReader(file) as reader:
            return {name: (reader.shape(name), reader.dtype(name)) for name in reader.keys()}
    return scan_ckpt(file)


def iter_ms_file(file: str) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, numpy array) of one MindSpore file in file order, one tensor at a time (bf16 as ``BF16``)."""
    return iter_safetensors(file) if _is_safetensors(file) else iter_ckpt(file)


def _read_any_index(index_file: str) -> Dict[str, str]:
    """An index json named directly: ``MS_INDEX_NAME``'s form (with ``weight_map``) or the flat ``MS_NAME_MAP``."""
    try:
        with open(index_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{index_file}: not a checkpoint index ({err})") from err
    if isinstance(data, dict) and "weight_map" in data:
        return read_weight_map(index_file)
    return read_name_map(index_file)


class MSCheckpoint:
    """A MindSpore checkpoint, in either of MindSpore's formats: one ``.safetensors`` or ``.ckpt`` file; a folder of
    safetensors shards (``MS_NAME_MAP``, or else every ``*.safetensors``); a folder of ``.ckpt`` shards
    (``MS_INDEX_NAME``, or else every ``*.ckpt``); or one of those index files itself.

    ``files`` lists the shard paths; ``tensor_info()`` gives {name: (shape, dtype, file)} from the headers;
    ``iter_files()`` gives (file, iterator of (name, array)) per shard, one tensor in memory at a time.
    A Hugging Face folder (``is_hf_folder``: it has a config.json) is refused; so is a folder holding both kinds of
    index, or, without an index, both ``.safetensors`` and ``.ckpt`` files (name the index or the file to read).
    """

    def __init__(self, path: str):
        self.path = path
        self.index, self.index_file = None, None
        if os.path.isdir(path) or path.endswith(".json"):
            folder = path if os.path.isdir(path) else (os.path.dirname(path) or os.curdir)
            if os.path.isdir(path):
                if is_hf_folder(path):
                    raise CheckpointError(f"{path}: a Hugging Face folder (it has config.json), not a MindSpore "
                                          f"checkpoint")
                present = [n for n in (MS_NAME_MAP, MS_INDEX_NAME) if os.path.isfile(os.path.join(folder, n))]
                if len(present) > 1:
                    raise CheckpointError(f"{path}: holds both {MS_NAME_MAP} (safetensors shards) and "
                                          f"{MS_INDEX_NAME} (.ckpt shards): pass the index file of the one to read")
                self.index_file = os.path.join(folder, present[0]) if present else None
            elif not os.path.isfile(path):
                raise CheckpointError(f"{path}: checkpoint index not found")
            else:
                self.index_file = path
            if self.index_file is not None:
                self.index = _read_any_index(self.index_file)
                self.files = [os.path.join(folder, n) for n in sorted(set(self.index.values()))]
            else:
                safetensors = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
                ckpts = sorted(glob.glob(os.path.join(folder, "*.ckpt")))
                if safetensors and ckpts:
                    raise CheckpointError(f"{path}: holds both .safetensors and .ckpt files and no index "
                                          f"({MS_NAME_MAP} or {MS_INDEX_NAME}): pass the file to read")
                self.files = safetensors or ckpts
            if not self.files:
                raise CheckpointError(f"{path}: no .safetensors or .ckpt files in this folder")
            self._shard_names = {file: os.path.relpath(file, folder) for file in self.files}
        elif os.path.isfile(path):
            self.files = [path]
        else:
            raise CheckpointError(f"{path}: MindSpore checkpoint not found")
        for file in self.files:
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: shard listed in {os.path.basename(self.index_file)} is missing")
        self._info = None

    def tensor_info(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype, str]]:
        """{name: (shape, dtype, file)} read from the headers of every file (contents are skipped)."""
        if self._info is None:
            info = {}
            for file in self.files:
                for name, (shape, dtype) in scan_ms_file(file).items():
                    if name in info:
                        raise CheckpointError(f"parameter {name!r} is in both {info[name][2]} and {file}")
                    if self.index is not None and self.index.get(name) != self._shard_names[file]:
                        raise CheckpointError(f"{file}: parameter {name!r} is not listed for this file in "
                                              f"{self.index_file}")
                    info[name] = (shape, dtype, file)
            if self.index is not None and set(self.index) - set(info):
                raise CheckpointError(f"{self.index_file}: lists parameters absent from the shards: "
                                      f"{describe(set(self.index) - set(info))}")
            self._info = info
        return self._info

    def iter_files(self) -> Iterator[Tuple[str, Iterator[Tuple[str, np.ndarray]]]]:
        """(file, iterator of (name, array)) per shard, in ``files`` order."""
        for file in self.files:
            yield file, iter_ms_file(file)
