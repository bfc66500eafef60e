"""Streaming checkpoint I/O for DeepSeek-V2: safetensors, torch ``.bin``, MindSpore ``.ckpt``, and loaders.

Memory is bounded by one tensor (readers and writers here) or one input shard (the loaders); no function here
materialises a whole model unless asked to return it (``load_ms_checkpoint(None, path)``).

bf16 in numpy: arrays use MindSpore's numpy ``bfloat16`` dtype (``BF16`` below, 2 bytes, ``.view(np.uint16)`` gives
the raw bits, ``mindspore.Tensor(array)`` gives a BFloat16 tensor). That is the "dtype tag" of a bf16 array.

Formats:
- safetensors: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, raw bytes.
  ``SafetensorsReader`` parses it directly (no torch needed, bf16 included) and reads a tensor or a slice by offset;
  ``SafetensorsWriter`` writes a planned file tensor by tensor at fixed offsets.
- MindSpore ``.ckpt``: serialized ``checkpoint_pb2.Checkpoint`` messages one after another, each holding one
  ``Value{tag, tensor{dims, tensor_type, tensor_content}}``; tensors above 512 MiB are split over several messages
  with the same tag. ``CkptWriter`` writes exactly what ``mindspore.save_checkpoint`` writes (same bytes) without
  holding more than the tensor being written; ``iter_ckpt`` / ``scan_ckpt`` read it back message by message.
- A MindSpore checkpoint *folder*: ``*.ckpt`` shards plus ``MS_INDEX_NAME`` (``{"metadata": {"total_size": bytes},
  "weight_map": {param name: shard file}}``), written by ``convert_weight.py`` for large models.
"""
import glob
import json
import math
import os
import shutil
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore.common.np_dtype import bfloat16 as _NP_BF16
from mindformers.tools.logger import logger
from tqdm import tqdm

from research.deepseek2.weight_map import expected_hf_shapes, expected_ms_shapes, hf_to_ms, is_stacked

__all__ = ["BF16", "CheckpointError", "SafetensorsReader", "SafetensorsWriter", "TorchBinReader", "HFCheckpoint",
           "CkptWriter", "scan_ckpt", "iter_ckpt", "MSCheckpoint", "MS_INDEX_NAME", "HF_INDEX_NAME",
           "np_dtype", "cast_array", "dtype_name", "check_hf_tensors", "iter_hf_as_ms",
           "load_ms_checkpoint", "load_hf_checkpoint", "StagedDir", "StagedFile"]

BF16 = np.dtype(_NP_BF16)
MS_INDEX_NAME = "deepseek2.ckpt.index.json"
HF_INDEX_NAME = "model.safetensors.index.json"
# mindspore.save_checkpoint splits tensor_content every 1024 * SLICE_SIZE bytes (SLICE_SIZE = 524288 KiB)
CKPT_CHUNK_BYTES = 1024 * 524288

_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": BF16,
              "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
              "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
              "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
_MS_TYPES = {"Float64": np.dtype(np.float64), "Float32": np.dtype(np.float32), "Float16": np.dtype(np.float16),
             "BFloat16": BF16, "Int64": np.dtype(np.int64), "Int32": np.dtype(np.int32),
             "Int16": np.dtype(np.int16), "Int8": np.dtype(np.int8), "UInt64": np.dtype(np.uint64),
             "UInt32": np.dtype(np.uint32), "UInt16": np.dtype(np.uint16), "UInt8": np.dtype(np.uint8),
             "Bool": np.dtype(np.bool_)}
_DTYPE_ALIASES = {"fp32": np.float32, "float32": np.float32, "fp16": np.float16, "float16": np.float16,
                  "bf16": BF16, "bfloat16": BF16}


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, mis-shaped, corrupt or does not fit the model; the message says which."""


# ---------------------------------------------------------------------------------------------------- dtypes
def np_dtype(dtype) -> np.dtype:
    """numpy dtype for 'bf16'/'fp16'/'fp32' (and long names), a numpy dtype, or a MindSpore dtype."""
    if isinstance(dtype, str):
        key = dtype.lower()
        if key in _DTYPE_ALIASES:
            return np.dtype(_DTYPE_ALIASES[key])
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(_DTYPE_ALIASES)}")
    if isinstance(dtype, ms.dtype.Type):
        name = str(dtype)
        if name not in _MS_TYPES:
            raise ValueError(f"MindSpore dtype {name} has no numpy counterpart here")
        return _MS_TYPES[name]
    return np.dtype(dtype)


def dtype_name(dtype) -> str:
    """'bfloat16', 'float16', 'float32', ... (torch_dtype spelling) for a numpy dtype."""
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype == BF16 else dtype.name


def _ms_type_name(dtype: np.dtype) -> str:
    for name, value in _MS_TYPES.items():
        if value == dtype:
            return name
    raise CheckpointError(f"numpy dtype {dtype} cannot be stored in a MindSpore checkpoint")


def _st_type_name(dtype: np.dtype) -> str:
    for name, value in _ST_DTYPES.items():
        if value == dtype:
            return name
    raise CheckpointError(f"numpy dtype {dtype} cannot be stored in safetensors")


def cast_array(array: np.ndarray, dtype) -> np.ndarray:
    """Cast to ``dtype`` (None keeps it). Rounds to nearest-even; bf16 <-> fp16 goes through fp32 (exact widening)."""
    if dtype is None:
        return array
    dtype = np.dtype(dtype)
    if array.dtype == dtype:
        return array
    if (array.dtype == BF16 or dtype == BF16) and array.dtype != np.float32 and dtype != np.float32:
        return array.astype(np.float32).astype(dtype)
    return array.astype(dtype)


def _nbytes(shape, dtype) -> int:
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def _contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous without np.ascontiguousarray's promotion of 0-d arrays to 1-d."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def _read_exact(f, offset: int, nbytes: int, what: str) -> np.ndarray:
    """Read nbytes at offset into a fresh uint8 array; CheckpointError if the file ends early."""
    buf = np.empty(nbytes, dtype=np.uint8)
    f.seek(offset)
    got = f.readinto(memoryview(buf)) if nbytes else 0
    if got != nbytes:
        raise CheckpointError(f"{what}: file truncated (wanted {nbytes} bytes at offset {offset}, got {got})")
    return buf


# ---------------------------------------------------------------------------------------------------- staging
class StagedFile:
    """Write to ``<path>.partial-<pid>``; ``commit()`` renames onto ``path``, ``abort()`` (or an exception) removes it."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.tmp = f"{self.path}.partial-{os.getpid()}"

    def commit(self):
        os.replace(self.tmp, self.path)

    def abort(self):
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class StagedDir:
    """Build a folder's files in a staging folder, then move them into place in one go.

    A new folder is staged as a sibling ``<dir>.partial-<pid>`` and renamed; files for an existing folder are staged
    in ``<dir>/.partial-<pid>`` and moved in with ``os.replace`` (other files in the folder are left alone).
    ``abort()`` removes the staging folder, so a failed conversion leaves nothing behind.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path.rstrip("/\\") or path)
        self.existed = os.path.isdir(self.path)
        if os.path.exists(self.path) and not self.existed:
            raise CheckpointError(f"{self.path} exists and is not a folder")
        if self.existed:
            self.tmp = os.path.join(self.path, f".partial-{os.getpid()}")
        else:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.tmp = f"{self.path}.partial-{os.getpid()}"
        if os.path.exists(self.tmp):
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp)

    def file(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def commit(self):
        if self.existed:
            for name in sorted(os.listdir(self.tmp)):
                os.replace(os.path.join(self.tmp, name), os.path.join(self.path, name))
            os.rmdir(self.tmp)
        else:
            os.rename(self.tmp, self.path)

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- safetensors
_SLICE = slice  # SafetensorsReader.get takes an argument named ``slice``


def _normalize_index(index, ndim: int) -> tuple:
    if index is None:
        return ()
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > ndim:
        raise IndexError(f"{len(index)} indices for a {ndim}-d tensor")
    return index


class SafetensorsReader:
    """Random access to one ``.safetensors`` file, tensor by tensor or slice by slice, without torch.

    ``get(name, slice=None)`` returns a fresh numpy array (bf16 as ``BF16``); ``slice`` is anything numpy accepts for
    indexing (an int, a ``slice``, or a tuple of them); only the rows the first index covers are read from disk.
    The header is checked at open: a tensor whose bytes lie past the end of the file raises ``CheckpointError``
    naming the file and the tensor (a truncated download).
    """

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            header_len = int.from_bytes(head, "little")
            if 8 + header_len > size:
                raise CheckpointError(f"{path}: truncated or not safetensors (header of {header_len} bytes, "
                                      f"file of {size} bytes)")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from err
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = {}
        for name, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except KeyError as err:
                raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or missing header field "
                                      f"({err}); entry {info}") from err
            if end - begin != _nbytes(shape, dtype):
                raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {begin}..{end} do not hold "
                                      f"shape {shape} of {info['dtype']}")
            if self._data_start + end > size:
                raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {self._data_start + end} "
                                      f"but the file has {size} bytes")
            self._entries[name] = (dtype, shape, begin)
        self._file = None

    def keys(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[0]

    def _entry(self, name):
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._entries[name]

    def get(self, name: str, slice=None) -> np.ndarray:  # pylint: disable=redefined-builtin
        """The tensor ``name`` (or ``tensor[slice]``) as a numpy array; bf16 arrays have dtype ``BF16``."""
        dtype, shape, begin = self._entry(name)
        if self._file is None:
            self._file = open(self.path, "rb")  # pylint: disable=consider-using-with
        index = _normalize_index(slice, len(shape))
        what = f"{self.path}: tensor {name!r}"
        if not index or not shape:
            raw = _read_exact(self._file, self._data_start + begin, _nbytes(shape, dtype), what)
            array = raw.view(dtype).reshape(shape)
            return array[index] if index else array
        # read only the rows covered by the first index, then index the rest in memory
        first = index[0]
        row_bytes = _nbytes(shape[1:], dtype)
        if isinstance(first, (int, np.integer)):
            row = int(first) + shape[0] if first < 0 else int(first)
            if not 0 <= row < shape[0]:
                raise IndexError(f"{what}: row {first} out of range for shape {shape}")
            lo, hi, rest = row, row + 1, (0,) + index[1:]
        elif isinstance(first, _SLICE):
            rows = range(*first.indices(shape[0]))
            if not rows:
                lo = hi = 0
            else:
                lo, hi = min(rows), max(rows) + 1
            rest = (np.s_[::first.step or 1],) + index[1:]
        else:  # Ellipsis, None, index arrays: read everything
            lo, hi, rest = 0, shape[0], index
        raw = _read_exact(self._file, self._data_start + begin + lo * row_bytes, (hi - lo) * row_bytes, what)
        block = raw.view(dtype).reshape((hi - lo,) + shape[1:])
        out = block[rest]
        # a view of a larger block would keep the whole block alive: copy it out
        return out.copy() if out.base is not None and out.nbytes < raw.nbytes else out

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsWriter:
    """Write one ``.safetensors`` file whose layout is planned up front, tensors arriving in any order.

    ``entries``: [(name, numpy dtype, shape)] in file order. The header is written at once and the file sized;
    ``write(name, array)`` puts the bytes at the tensor's offset. ``close()`` fails if a tensor was never written.
    """

    def __init__(self, path: str, entries, metadata: Optional[Dict[str, str]] = None):
        self.path = path
        header, offset, self._slots = {}, 0, {}
        for name, dtype, shape in entries:
            dtype = np.dtype(dtype)
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": _st_type_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._slots[name] = (dtype, tuple(shape), offset)
            offset += size
        if metadata is not None:
            header = {"__metadata__": metadata, **header}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        self.nbytes = offset
        self._pending = set(self._slots)
        self._file = open(path, "wb")  # pylint: disable=consider-using-with
        self._file.write(len(blob).to_bytes(8, "little") + blob)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, array: np.ndarray):
        dtype, shape, offset = self._slots[name]
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {name!r}: planned {dtype_name(dtype)} {shape}, "
                                  f"got {dtype_name(array.dtype)} {tuple(array.shape)}")
        self._file.seek(self._data_start + offset)
        self._file.write(memoryview(_contiguous(array).reshape(-1).view(np.uint8)))
        self._pending.discard(name)

    def close(self):
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._pending:
            raise CheckpointError(f"{self.path}: tensors never written: {sorted(self._pending)[:10]}")


# ---------------------------------------------------------------------------------------------------- torch .bin
class TorchBinReader:
    """A ``pytorch_model*.bin`` read with ``torch.load(weights_only=True, mmap=True)``: no code is unpickled and
    tensors stay on disk until ``get`` copies one out (mmap needs the zip format of torch >= 1.6; older files are
    loaded whole, still with ``weights_only=True``)."""

    def __init__(self, path: str):
        import torch  # pylint: disable=import-outside-toplevel
        self.path = path
        self._torch = torch
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                logger.warning(f"{path}: not in torch's zip format, loading it without mmap")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except Exception as err:  # pickle errors, zip errors, truncation: all mean an unusable file
            raise CheckpointError(f"{path}: cannot be read by torch.load(weights_only=True): {err}") from err
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
        self._state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> List[str]:
        return list(self._state)

    def __contains__(self, name):
        return name in self._state

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> np.dtype:
        tensor = self._state[name]
        if tensor.dtype == self._torch.bfloat16:
            return BF16
        return np.dtype(str(tensor.dtype).replace("torch.", ""))

    def get(self, name: str, slice=None) -> np.ndarray:  # pylint: disable=redefined-builtin
        tensor = self._state[name]
        if slice is not None:
            tensor = tensor[slice]
        if tensor.dtype == self._torch.bfloat16:
            return tensor.contiguous().view(self._torch.int16).numpy().view(BF16).copy()
        return tensor.contiguous().numpy().copy()

    def close(self):
        self._state = {}


# ---------------------------------------------------------------------------------------------------- HF folders
class HFCheckpoint:
    """The weight files of a Hugging Face model folder, shard by shard.

    Looks for, in order: ``model.safetensors.index.json``, ``model.safetensors``, ``pytorch_model.bin.index.json``,
    ``pytorch_model.bin``. ``shards`` lists the weight files; ``open(i)`` returns a reader for shard i;
    ``tensor_info()`` scans every shard's header once: {name: (shape, dtype, shard index)}.
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
                self.index = self._read_index(path)
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

    @staticmethod
    def _read_index(path: str) -> Dict[str, str]:
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: not a weight index (expected a JSON object with 'weight_map')") from err
        return dict(weight_map)

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


def _describe(names, limit=10) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_hf_tensors(hf: HFCheckpoint, config) -> Dict[str, Tuple[Tuple[int, ...], np.dtype, int]]:
    """Check an HF checkpoint against ``config`` before converting anything.

    Raises ``CheckpointError`` for unknown (extra) tensors, missing tensors, and shape mismatches, naming the tensor,
    the file and expected vs got. Returns ``hf.tensor_info()``.
    """
    info = hf.tensor_info()
    expected = expected_hf_shapes(config)
    extra = [n for n in info if n not in expected]
    if extra:
        where = {n: hf.shards[info[n][2]] for n in extra}
        detail = "; ".join(f"{n} (in {where[n]})" for n in sorted(extra)[:10])
        raise CheckpointError(f"{hf.hf_dir}: {len(extra)} unexpected tensor(s) not in the model of this config.json "
                              f"(weight_map.NAME_MAP / expected_hf_shapes): {detail}"
                              + (" ..." if len(extra) > 10 else ""))
    missing = [n for n in expected if n not in info]
    if missing:
        raise CheckpointError(f"{hf.hf_dir}: {len(missing)} tensor(s) missing: {_describe(missing)}")
    for name, shape in expected.items():
        got = info[name][0]
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"{hf.shard_path(info[name][2])}: tensor {name!r} has shape {tuple(got)}, "
                                  f"expected {tuple(shape)} from the config")
    return info


def iter_hf_as_ms(hf: HFCheckpoint, config, dtype=None, progress: bool = True
                  ) -> Iterator[Tuple[int, str, np.ndarray]]:
    """Yield (shard index, MindSpore name, array) for every parameter, in shard order, then model order.

    A plain tensor goes with the input shard holding it; a stacked routed-expert parameter (n_routed_experts,
    out, in) goes with the input shard holding its last expert row and is assembled right before it is yielded,
    reading rows from earlier shards by offset. Memory: one tensor, or one stack being assembled.
    ``dtype`` (numpy dtype, 'bf16'/'fp16'/'fp32', or None = keep the source dtype) is the output dtype.
    Runs ``check_hf_tensors`` first.
    """
    info = check_hf_tensors(hf, config)
    out_dtype = None if dtype is None else np_dtype(dtype)
    rows: Dict[str, List[str]] = {}  # MindSpore name -> HF names (expert order for stacks), in model order
    for hf_name in expected_hf_shapes(config):
        ms_name, expert = hf_to_ms(hf_name)
        rows.setdefault(ms_name, []).append((expert, hf_name))
    rows = {ms_name: [n for _, n in sorted(r, key=lambda x: x[0] or 0)] for ms_name, r in rows.items()}
    owner = {ms_name: max(info[n][2] for n in hf_names) for ms_name, hf_names in rows.items()}
    last_use = {}  # input shard -> last output shard that reads from it
    for ms_name, hf_names in rows.items():
        for n in hf_names:
            last_use[info[n][2]] = max(last_use.get(info[n][2], 0), owner[ms_name])
    readers = {}

    def read(hf_name):
        shard = info[hf_name][2]
        if shard not in readers:
            logger.info(f"reading {hf.shard_path(shard)}")
            readers[shard] = hf.open(shard)
        return readers[shard].get(hf_name)

    bar = tqdm(total=len(info), desc="tensors", unit="tensor", disable=not progress)
    try:
        for i in range(len(hf.shards)):
            for ms_name in (m for m in rows if owner[m] == i):
                hf_names = rows[ms_name]
                if not is_stacked(ms_name):
                    array = cast_array(read(hf_names[0]), out_dtype)
                    bar.update(1)
                    yield i, ms_name, array
                    del array
                    continue
                stacked = None
                for expert, hf_name in enumerate(hf_names):
                    row = read(hf_name)
                    if stacked is None:
                        target = out_dtype if out_dtype is not None else row.dtype
                        stacked = np.empty((len(hf_names),) + row.shape, dtype=target)
                    stacked[expert] = cast_array(row, stacked.dtype)
                    del row
                    bar.update(1)
                yield i, ms_name, stacked
                del stacked
            for shard in [s for s in readers if last_use[s] <= i]:
                readers.pop(shard).close()
    finally:
        bar.close()
        for reader in readers.values():
            reader.close()


# ---------------------------------------------------------------------------------------------------- .ckpt writing
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _ckpt_record_head(name: bytes, dims, type_name: bytes, content_len: int) -> bytes:
    """Protobuf bytes of Checkpoint{value: [Value{tag, tensor{dims, tensor_type, tensor_content}}]} up to the content.

    Field order and encoding (unpacked int64 dims) are what checkpoint_pb2.SerializeToString produces.
    """
    tensor = b"".join(b"\x08" + _varint(int(d)) for d in dims)
    tensor += b"\x12" + _varint(len(type_name)) + type_name + b"\x1a" + _varint(content_len)
    tensor_len = len(tensor) + content_len
    value = b"\x0a" + _varint(len(name)) + name + b"\x12" + _varint(tensor_len)
    value_len = len(value) + tensor_len
    return b"\x0a" + _varint(value_len) + value + tensor


class CkptWriter:
    """Stream tensors into a MindSpore ``.ckpt``, byte-identical to ``mindspore.save_checkpoint`` of the same
    (name -> tensor) list in the same order. Writes to a temporary name; ``close()`` renames it into place,
    an exception inside ``with`` (or ``abort()``) deletes it."""

    def __init__(self, path: str, atomic: bool = True):
        self.path = path
        self._staged = StagedFile(path) if atomic else None
        self._file = open(self._staged.tmp if atomic else path, "wb")  # pylint: disable=consider-using-with
        self.names: Dict[str, Tuple[Tuple[int, ...], str]] = {}
        self.nbytes = 0

    def write(self, name: str, array: np.ndarray):
        """Append one tensor (numpy; bf16 as ``BF16``) as one message, or several for contents above 512 MiB."""
        if name in self.names:
            raise CheckpointError(f"{self.path}: parameter {name!r} written twice")
        array = _contiguous(array)
        type_name = _ms_type_name(array.dtype)
        raw = memoryview(array.reshape(-1).view(np.uint8))
        tag = name.encode()
        for start in range(0, max(len(raw), 1), CKPT_CHUNK_BYTES):
            chunk = raw[start:start + CKPT_CHUNK_BYTES]
            self._file.write(_ckpt_record_head(tag, array.shape, type_name.encode(), len(chunk)))
            self._file.write(chunk)
        self.names[name] = (tuple(array.shape), type_name)
        self.nbytes += len(raw)

    def close(self):
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._staged is not None:
            self._staged.commit()

    def abort(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._staged is not None:
            self._staged.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------------- .ckpt reading
class _Reader:
    """Sequential protobuf field reader over a binary file."""

    def __init__(self, f, path):
        self.f, self.path = f, path

    def byte(self) -> Optional[int]:
        b = self.f.read(1)
        return b[0] if b else None

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            if b is None:
                raise CheckpointError(f"{self.path}: truncated (file ends inside a record at {self.f.tell()})")
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise CheckpointError(f"{self.path}: corrupt record (bad varint before {self.f.tell()})")

    def bytes(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.path}: truncated (wanted {n} bytes at {self.f.tell() - len(data)})")
        return data

    def skip(self, wire_type: int):
        if wire_type == 0:
            self.varint()
        elif wire_type == 1:
            self.bytes(8)
        elif wire_type == 2:
            self.bytes(self.varint())
        elif wire_type == 5:
            self.bytes(4)
        else:
            raise CheckpointError(f"{self.path}: corrupt record (wire type {wire_type} at {self.f.tell()})")


def _ckpt_records(f, path: str) -> Iterator[dict]:
    """Parse the messages of a ``.ckpt`` one by one; the content is left in place: record['content'] = (offset, len).

    The file position after each yielded record is the record's end (the consumer may seek anywhere in between).
    """
    size = os.fstat(f.fileno()).st_size
    r = _Reader(f, path)
    while True:
        start = f.tell()
        key = r.byte()
        if key is None:
            return
        if key != 0x0A:
            f.seek(start)
            tail = f.read()
            if len(tail) == 17 and tail.startswith(b"crc_num"):
                return  # save_checkpoint(..., crc_check=True) trailer
            raise CheckpointError(f"{path}: not a MindSpore checkpoint or corrupt (unexpected byte {key:#x} at "
                                  f"offset {start})")
        value_end = r.varint() + f.tell()
        if value_end > size:
            raise CheckpointError(f"{path}: truncated (record at offset {start} runs to {value_end}, file has "
                                  f"{size} bytes)")
        rec = {"tag": None, "dims": [], "type": None, "content": (f.tell(), 0), "start": start}
        while f.tell() < value_end:
            field_key = r.varint()
            field, wire = field_key >> 3, field_key & 7
            if field == 1 and wire == 2:
                rec["tag"] = r.bytes(r.varint()).decode()
            elif field == 2 and wire == 2:
                tensor_end = r.varint() + f.tell()
                while f.tell() < tensor_end:
                    tkey = r.varint()
                    tfield, twire = tkey >> 3, tkey & 7
                    if tfield == 1 and twire == 0:
                        rec["dims"].append(r.varint())
                    elif tfield == 1 and twire == 2:
                        packed_end = r.varint() + f.tell()
                        while f.tell() < packed_end:
                            rec["dims"].append(r.varint())
                    elif tfield == 2 and twire == 2:
                        rec["type"] = r.bytes(r.varint()).decode()
                    elif tfield == 3 and twire == 2:
                        n = r.varint()
                        rec["content"] = (f.tell(), n)
                        f.seek(n, os.SEEK_CUR)
                    else:
                        r.skip(twire)
            elif field == 3:
                raise CheckpointError(f"{path}: parameter {rec['tag']!r} is a MapParameter, not supported here")
            else:
                r.skip(wire)
        if f.tell() != value_end:
            raise CheckpointError(f"{path}: corrupt record at offset {start}")
        if rec["tag"] is None or rec["type"] is None:
            raise CheckpointError(f"{path}: corrupt record at offset {start} (no tag or tensor type)")
        yield rec


def _ckpt_tensors(path: str, read: bool) -> Iterator[Tuple[str, Tuple[int, ...], np.dtype, Optional[np.ndarray]]]:
    """(name, shape, dtype, array or None) per parameter, joining the 512 MiB pieces of large tensors."""
    with open(path, "rb") as f:
        current = None  # [name, shape, dtype, buffer, filled]
        for rec in _ckpt_records(f, path):
            name, offset, length = rec["tag"], rec["content"][0], rec["content"][1]
            if current is not None and current[0] != name:
                raise CheckpointError(f"{path}: parameter {current[0]!r} is incomplete ({current[4]} of "
                                      f"{_nbytes(current[1], current[2])} bytes) before {name!r}")
            if current is None:
                if rec["type"] not in _MS_TYPES:
                    raise CheckpointError(f"{path}: parameter {name!r} has unsupported tensor_type {rec['type']!r}")
                dtype, shape = _MS_TYPES[rec["type"]], tuple(rec["dims"])
                current = [name, shape, dtype, np.empty(_nbytes(shape, dtype), dtype=np.uint8) if read else None, 0]
            total = _nbytes(current[1], current[2])
            if current[4] + length > total:
                raise CheckpointError(f"{path}: parameter {name!r}: {current[4] + length} bytes of content for shape "
                                      f"{current[1]} {rec['type']} ({total} bytes)")
            if read and length:
                end = f.tell()
                f.seek(offset)
                got = f.readinto(memoryview(current[3])[current[4]:current[4] + length])
                if got != length:
                    raise CheckpointError(f"{path}: truncated inside parameter {name!r}")
                f.seek(end)
            current[4] += length
            if current[4] == total:
                name, shape, dtype = current[0], current[1], current[2]
                array = current[3].view(dtype).reshape(shape) if read else None
                current = None
                yield name, shape, dtype, array
                del array  # the consumer holds it now; do not keep it alive while reading the next one
        if current is not None:
            raise CheckpointError(f"{path}: truncated: parameter {current[0]!r} has {current[4]} of "
                                  f"{_nbytes(current[1], current[2])} bytes")


def scan_ckpt(path: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a ``.ckpt`` without reading tensor contents (seeks over them)."""
    out = {}
    for name, shape, dtype, _ in _ckpt_tensors(path, read=False):
        if name in out:
            raise CheckpointError(f"{path}: parameter {name!r} appears twice")
        out[name] = (shape, dtype)
    return out


def iter_ckpt(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, numpy array) for every parameter of a ``.ckpt``, in file order; memory: one tensor."""
    for name, _, _, array in _ckpt_tensors(path, read=True):
        yield name, array
        del array


class MSCheckpoint:
    """A MindSpore checkpoint: one ``.ckpt`` file, or a folder of ``.ckpt`` shards (with ``MS_INDEX_NAME``, or else
    every ``*.ckpt`` in it), or the index json itself."""

    def __init__(self, path: str):
        self.path = path
        self.index = None
        if os.path.isdir(path) or path.endswith(".json"):
            folder = path if os.path.isdir(path) else os.path.dirname(path)
            index_file = path if path.endswith(".json") else os.path.join(folder, MS_INDEX_NAME)
            if os.path.isfile(index_file):
                try:
                    with open(index_file) as f:
                        self.index = dict(json.load(f)["weight_map"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise CheckpointError(f"{index_file}: not a checkpoint index (no 'weight_map')") from err
                names = sorted(set(self.index.values()))
                self.files = [os.path.join(folder, n) for n in names]
            elif path.endswith(".json"):
                raise CheckpointError(f"{index_file}: checkpoint index not found")
            else:
                self.files = sorted(glob.glob(os.path.join(folder, "*.ckpt")))
            if not self.files:
                raise CheckpointError(f"{path}: no .ckpt files in this folder")
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
                    if self.index is not None and self.index.get(name) != os.path.basename(file):
                        raise CheckpointError(f"{file}: parameter {name!r} is not listed for this file in the index")
                    info[name] = (shape, dtype, file)
            if self.index is not None and set(self.index) - set(info):
                raise CheckpointError(f"{self.path}: index lists parameters absent from the shards: "
                                      f"{_describe(set(self.index) - set(info))}")
            self._info = info
        return self._info

    def iter_files(self) -> Iterator[Tuple[str, Iterator[Tuple[str, np.ndarray]]]]:
        for file in self.files:
            yield file, iter_ckpt(file)


# ---------------------------------------------------------------------------------------------------- loaders
def _net_params(net) -> Dict[str, "ms.Parameter"]:
    return {p.name: p for p in net.get_parameters()}


# training state a MindFormers checkpoint may carry beside the weights (optimizer moments, step counters ...)
_STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "moments.", "accu_grads.", "accum_grads.",
                   "global_step", "learning_rate", "current_iterator_step", "last_overflow_iterator_step",
                   "epoch_num", "step_num", "loss_scale", "scale_sense", "last_aux_loss", "global_batch_size")


def _check_names(net_params, ckpt_shapes, source: str, strict: bool):
    """Missing/unexpected/mis-shaped names between a net and a checkpoint; raise (strict) or warn.

    Tolerated (logged): net parameters with requires_grad=False absent from the checkpoint (state buffers such as
    ``last_aux_loss``), and checkpoint entries that are optimizer/training state (``_STATE_PREFIXES``).
    """
    absent = set(net_params) - set(ckpt_shapes)
    buffers = sorted(n for n in absent if not net_params[n].requires_grad)
    missing = sorted(absent - set(buffers))
    extra = set(ckpt_shapes) - set(net_params)
    state = sorted(n for n in extra if n.startswith(_STATE_PREFIXES))
    unexpected = sorted(extra - set(state))
    if buffers:
        logger.info(f"{source}: net buffers not in the checkpoint keep their values: {_describe(buffers)}")
    if state:
        logger.info(f"{source}: skipping {len(state)} training-state entries: {_describe(state, 5)}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameter(s) of the net missing from the checkpoint: {_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected checkpoint parameter(s) not in the net: "
                        f"{_describe(unexpected)}")
    for name in sorted(set(net_params) & set(ckpt_shapes)):
        want, got = tuple(net_params[name].shape), tuple(ckpt_shapes[name])
        if want != got:
            problems.append(f"parameter {name!r}: net has shape {want}, checkpoint has {got}")
    if problems:
        message = f"{source} does not match the net: " + "; ".join(problems)
        if strict:
            raise CheckpointError(message)
        logger.warning(message)


def _to_parameter(name: str, array: np.ndarray, dtype) -> "ms.Parameter":
    array = cast_array(array, dtype)
    return ms.Parameter(ms.Tensor(array), name=name, requires_grad=False)


def _load_batch(net, batch: dict):
    if not batch:
        return
    not_loaded, _ = ms.load_param_into_net(net, batch, strict_load=False)
    failed = sorted(set(batch) & set(not_loaded))
    if failed:
        raise CheckpointError(f"load_param_into_net did not load {_describe(failed)}")
    batch.clear()


def load_ms_checkpoint(net, path: str, strict: bool = True, batch_bytes: int = 1 << 30):
    """Load a ``.ckpt`` file or a converted checkpoint folder into ``net`` shard by shard.

    Args:
        net: a ``mindspore.nn.Cell`` or None.
        path: a ``.ckpt`` file, a folder of ``.ckpt`` shards (with ``MS_INDEX_NAME``) or that index json.
        strict: raise ``CheckpointError`` listing missing/unexpected/mis-shaped names (else log a warning and load
            what matches).
        batch_bytes: tensors are handed to ``mindspore.load_param_into_net`` in batches of about this size, so a
            single large ``.ckpt`` never sits whole in memory.
    Returns:
        net None: {name: Parameter} of the whole checkpoint (dtype as stored). Otherwise the list of loaded names.
        Every tensor is cast to the dtype of the net parameter it fills.
    """
    source = MSCheckpoint(path)
    if net is None:
        out = {}
        for _, tensors in source.iter_files():
            for name, array in tensors:
                out[name] = _to_parameter(name, array, None)
        return out
    info = source.tensor_info()
    params = _net_params(net)
    _check_names(params, {n: v[0] for n, v in info.items()}, path, strict)
    loaded, batch, size = [], {}, 0
    with tqdm(total=len(info), desc="loading", unit="tensor") as bar:
        for file, tensors in source.iter_files():
            logger.info(f"loading {file}")
            for name, array in tensors:
                bar.update(1)
                if name not in params or tuple(params[name].shape) != tuple(array.shape):
                    continue
                batch[name] = _to_parameter(name, array, np_dtype(params[name].dtype))
                loaded.append(name)
                size += array.nbytes
                del array
                if size >= batch_bytes:
                    _load_batch(net, batch)
                    size = 0
            _load_batch(net, batch)
            size = 0
    return loaded


def load_hf_checkpoint(net, hf_dir: str, dtype=None, config=None, strict: bool = True) -> List[str]:
    """Load Hugging Face DeepSeek-V2 weights (safetensors shards or .bin) straight into ``net``, one shard at a time.

    Names are mapped through ``weight_map`` and routed experts stacked on the fly. ``config`` defaults to
    ``DeepseekV2Config(**hf_dir/config.json)``; ``dtype`` None casts each tensor to its net parameter's dtype,
    otherwise to ``dtype`` (MindSpore then converts to the parameter's dtype if it differs).
    Raises ``CheckpointError`` listing missing/unexpected/mis-shaped names before loading anything (strict).
    Returns the loaded parameter names.
    """
    if config is None:
        from research.deepseek2.deepseek2_config import DeepseekV2Config  # pylint: disable=import-outside-toplevel
        config_file = os.path.join(hf_dir, "config.json")
        if not os.path.isfile(config_file):
            raise CheckpointError(f"{config_file} not found (pass config= to load_hf_checkpoint)")
        with open(config_file) as f:
            config = DeepseekV2Config(**json.load(f))
    hf = HFCheckpoint(hf_dir)
    check_hf_tensors(hf, config)
    params = _net_params(net)
    _check_names(params, expected_ms_shapes(config), hf_dir, strict)
    want = None if dtype is None else np_dtype(dtype)
    loaded, batch, shard = [], {}, 0
    for i, name, array in iter_hf_as_ms(hf, config, dtype=None):
        if i != shard:
            _load_batch(net, batch)
            shard = i
        if name not in params or tuple(params[name].shape) != tuple(array.shape):
            continue
        batch[name] = _to_parameter(name, array, want if want is not None else np_dtype(params[name].dtype))
        loaded.append(name)
        del array
    _load_batch(net, batch)
    return loaded

