"""A checkpoint on disk, opened once: what it is, its files and index, and every tensor's header.

``checkpoints.open_checkpoint(path)`` decides what ``path`` is, once, and returns an object the completeness check
(``check.py``), the loaders (``load.py``), the per-rank slices (``rank_slices.py``), the converter
(``convert_weight.py``) and LoRA's merge (``lora/checkpoints.py``) all read; none of them looks at the path again.

- A Hugging Face model folder (a directory with a ``config.json``): ``HFCheckpoint`` (``hf_folder.py``), its weights
  in ``model.safetensors.index.json`` + shards, ``model.safetensors``, ``pytorch_model.bin.index.json`` + shards or
  ``pytorch_model.bin`` (looked for in that order), under Hugging Face names, one tensor per routed expert.
- A MindSpore checkpoint (MindSpore parameter names, routed experts stacked): ``MindSporeCheckpoint``, one
  ``.safetensors`` or ``.ckpt`` file; a folder of safetensors shards with ``MS_NAME_MAP`` (``param_name_map.json``,
  MindFormers' flat ``{param name: shard file}``; without it, every ``*.safetensors`` of the folder): what
  ``convert_weight.py`` writes by default and MindFormers 1.9 loads with ``load_ckpt_format: safetensors``; a folder
  of ``.ckpt`` shards with ``MS_INDEX_NAME`` (``deepseek2.ckpt.index.json``: ``{"metadata": {...}, "weight_map":
  {param name: shard file}}``; without it, every ``*.ckpt``): ``convert_weight.py --format ckpt``; or one of those
  index files itself.

Every checkpoint answers: ``kind`` ("hf" | "mindspore"), ``format`` ("safetensors" | "ckpt" | "bin"), ``files``,
``index_file`` / ``index``, ``tensors`` ({stored name: ``Header(shape, dtype, file)``}, read from the headers on
first use and checked against the index), ``parameters(config)`` ({MindSpore parameter name: (shape, dtype)}: what a
model would receive) and ``iter_parameters(config, dtype)`` ((file, parameter name, array), one tensor in memory at a
time).

A checkpoint stays inside its folder: an index whose map names a shard by an absolute path or through ``..`` is
refused (``CheckpointError`` naming the index file and the entry). The check is on the names as written, so a shard
that is a symbolic link to elsewhere (the Hugging Face cache's ``snapshots/`` -> ``blobs/``) still works.
"""
import glob
import json
import os
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import numpy as np

from research.deepseek2.checkpoints.arrays import describe
from research.deepseek2.errors import CheckpointError

__all__ = ["Header", "Checkpoint", "MindSporeCheckpoint", "is_hf_folder", "read_weight_map", "HF_INDEX_NAME",
           "MS_INDEX_NAME", "MS_NAME_MAP"]

HF_INDEX_NAME = "model.safetensors.index.json"
MS_INDEX_NAME = "deepseek2.ckpt.index.json"   # a folder of .ckpt shards
MS_NAME_MAP = "param_name_map.json"           # a folder of MindSpore safetensors shards (MindFormers' name)


class Header(NamedTuple):
    """One stored tensor as its file's header describes it."""
    shape: Tuple[int, ...]
    dtype: np.dtype
    file: str


def is_hf_folder(path: str) -> bool:
    """A Hugging Face model folder: a directory with a config.json (its weights beside it)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _inside(name: str) -> bool:
    """True for a relative path that stays in its folder ('a.ckpt', 'sub/a.ckpt'; not '/x', '../x', 'a/../../x')."""
    if os.path.isabs(name):
        return False
    parts = os.path.normpath(name).split(os.sep)
    return parts[0] not in (os.pardir, os.curdir, "")


def _checked(index_file: str, mapping: dict, what: str) -> Dict[str, str]:
    for name, shard in mapping.items():
        if not isinstance(shard, str) or not _inside(shard):
            raise CheckpointError(f"{index_file}: {what} {name!r} -> {shard!r} names a file outside the "
                                  f"checkpoint folder; shards must be relative paths inside it")
    return {name: os.path.normpath(shard) for name, shard in mapping.items()}


def _read_json(index_file: str, what: str):
    try:
        with open(index_file, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{index_file}: not {what} ({err})") from err


def read_weight_map(index_file: str, flat: bool = True) -> Dict[str, str]:
    """An index json as {tensor name: shard file relative to its folder, normalized}: the ``weight_map`` of
    Hugging Face's and ``MS_INDEX_NAME``'s form or, with ``flat``, MindFormers' flat ``MS_NAME_MAP``.
    ``CheckpointError`` if the file is no index, or if an entry names a shard outside the folder."""
    data = _read_json(index_file, "a checkpoint index")
    if isinstance(data, dict) and isinstance(data.get("weight_map"), dict):
        return _checked(index_file, data["weight_map"], "weight_map entry")
    if not flat or not isinstance(data, dict) or "weight_map" in data:
        raise CheckpointError(f"{index_file}: not a weight index (expected a JSON object with 'weight_map'"
                              + (", or MindFormers' flat {param name: shard file})" if flat else ")"))
    return _checked(index_file, data, "entry")


class Checkpoint:
    """What every kind of checkpoint answers (see the module docstring). Subclasses set ``path``, ``kind``,
    ``format``, ``files``, ``index_file`` and ``index`` when opened and read the headers in ``_scan``."""

    kind = ""

    def __init__(self):
        self._tensors: Optional[Dict[str, Header]] = None

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r})"

    @property
    def description(self) -> str:
        """How messages name this checkpoint."""
        return f"checkpoint {self.path}"

    @property
    def tensors(self) -> Dict[str, Header]:
        """{stored name: Header} of every tensor, from the file headers (read once, contents skipped)."""
        if self._tensors is None:
            self._tensors = self._scan()
        return self._tensors

    def _scan(self) -> Dict[str, Header]:
        raise NotImplementedError

    def _check_index(self, found: Dict[str, Header]):
        """Every tensor listed for the file holding it, and every listed tensor present."""
        if self.index is None:
            return
        for name, header in found.items():
            if self.index.get(name) != self._shard_name(header.file):
                raise CheckpointError(f"{header.file}: tensor {name!r} is not listed for this file in "
                                      f"{self.index_file}")
        lost = set(self.index) - set(found)
        if lost:
            raise CheckpointError(f"{self.index_file}: lists {len(lost)} tensor(s) absent from the shards: "
                                  f"{describe(lost)}")

    def _shard_name(self, file: str) -> str:
        return os.path.relpath(file, os.path.dirname(self.index_file))

    def parameters(self, config=None) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        """{MindSpore parameter name: (shape, dtype)} of what a model built from ``config`` would receive."""
        raise NotImplementedError

    def iter_parameters(self, config=None, dtype=None, progress: bool = True
                        ) -> Iterator[Tuple[str, str, np.ndarray]]:
        """(file, MindSpore parameter name, numpy array) for every stored tensor, one in memory at a time."""
        raise NotImplementedError


class MindSporeCheckpoint(Checkpoint):
    """A MindSpore checkpoint, in either of MindSpore's formats (see the module docstring). A Hugging Face folder is
    refused; so is a folder holding both kinds of index, or, without an index, both ``.safetensors`` and ``.ckpt``
    files (name the index or the file to read)."""

    kind = "mindspore"

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.index, self.index_file = None, None
        if os.path.isdir(path) or path.endswith(".json"):
            self.files = self._folder_files(path)
        elif os.path.isfile(path):
            self.files = [path]
        else:
            raise CheckpointError(f"{path}: MindSpore checkpoint not found")
        for file in self.files:
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: shard listed in {os.path.basename(self.index_file)} is missing")
        kinds = {"safetensors" if f.endswith(".safetensors") else "ckpt" for f in self.files}
        if len(kinds) > 1:
            raise CheckpointError(f"{self.index_file}: lists both .safetensors and .ckpt shards; a checkpoint is "
                                  f"of one format")
        self.format = kinds.pop()

    def _folder_files(self, path: str):
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
            self.index = read_weight_map(self.index_file)
            files = [os.path.join(folder, n) for n in sorted(set(self.index.values()))]
        else:
            safetensors = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
            ckpts = sorted(glob.glob(os.path.join(folder, "*.ckpt")))
            if safetensors and ckpts:
                raise CheckpointError(f"{path}: holds both .safetensors and .ckpt files and no index "
                                      f"({MS_NAME_MAP} or {MS_INDEX_NAME}): pass the file to read")
            files = safetensors or ckpts
        if not files:
            raise CheckpointError(f"{path}: no .safetensors or .ckpt files in this folder")
        return files

    def _scan(self) -> Dict[str, Header]:
        from research.deepseek2.checkpoints.ckpt_file import scan_ckpt
        from research.deepseek2.checkpoints.safetensors_file import scan_safetensors
        found: Dict[str, Header] = {}
        for file in self.files:
            scan = scan_safetensors if self.format == "safetensors" else scan_ckpt
            for name, (shape, dtype) in scan(file).items():
                if name in found:
                    raise CheckpointError(f"parameter {name!r} is in both {found[name].file} and {file}")
                found[name] = Header(tuple(shape), dtype, file)
        self._check_index(found)
        return found

    def parameters(self, config=None):
        return {name: (header.shape, header.dtype) for name, header in self.tensors.items()}

    def iter_file(self, file: str) -> Iterator[Tuple[str, np.ndarray]]:
        """(name, numpy array) of one file of this checkpoint in file order, one tensor at a time (bf16 as BF16)."""
        from research.deepseek2.checkpoints.ckpt_file import iter_ckpt
        from research.deepseek2.checkpoints.safetensors_file import iter_safetensors
        return iter_safetensors(file) if self.format == "safetensors" else iter_ckpt(file)

    def reader(self, file: str):
        """Random access to one safetensors file of this checkpoint (a ``.ckpt`` is read whole: ``iter_file``)."""
        from research.deepseek2.checkpoints.safetensors_file import SafetensorsReader
        if self.format != "safetensors":
            raise CheckpointError(f"{file}: a .ckpt file is read tensor by tensor in file order, not by name")
        return SafetensorsReader(file)

    def iter_parameters(self, config=None, dtype=None, progress: bool = True):
        from tqdm import tqdm
        from research.deepseek2.checkpoints.arrays import cast_array, np_dtype
        out_dtype = None if dtype is None else np_dtype(dtype)
        with tqdm(total=len(self.tensors), desc="tensors", unit="tensor", disable=not progress) as bar:
            for file in self.files:
                for name, array in self.iter_file(file):
                    bar.update(1)
                    yield file, name, cast_array(array, out_dtype)
                    del array
