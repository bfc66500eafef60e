"""safetensors files: read through the ``safetensors`` library, written tensor by tensor at planned offsets.

Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}`` (plus an optional
``__metadata__`` of strings), then the raw bytes of every tensor.

Reading is the library's: ``safe_open(path, framework="numpy", backend="pread")`` checks the header (a truncated file
is refused at open) and ``get_slice`` reads only the bytes an index selects; ``pread`` keeps resident memory at the
tensor read (the default ``mmap`` backend leaves every page it touched resident). bf16 tensors come back as numpy
arrays of ``BF16`` because ``arrays`` registers MindSpore's numpy bfloat16 type: no torch involved.
``scan_safetensors`` reads a file's header, ``iter_safetensors`` walks it tensor by tensor (``checkpoint.py`` reads
MindSpore safetensors shards so).

Writing is ``SafetensorsWriter``: the layout (names, dtypes, shapes) is planned first, then each tensor is written at
its offset as it arrives; header order = offset order, which MindSpore's own reader (``load_checkpoint(...,
format="safetensors")``) requires as well as the library. ``ShardedSafetensorsWriter`` does so for a folder of
shards (``plan_shards``: save_pretrained's rule) and writes its ``<stem>.safetensors.index.json``.
"""
import json
import os
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from safetensors import SafetensorError, safe_open

from research.deepseek2.checkpoints.arrays import BF16, contiguous, dtype_name, nbytes
from research.deepseek2.errors import CheckpointError

__all__ = ["SafetensorsReader", "SafetensorsWriter", "ShardedSafetensorsWriter", "plan_shards", "iter_safetensors",
           "scan_safetensors"]

# the format's dtype tags
_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": BF16,
              "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
              "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
              "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
_ST_TAGS = {dtype: tag for tag, dtype in _ST_DTYPES.items()}


def data_spans(path: str) -> Dict[str, Tuple[int, int]]:
    """{tensor name: (first byte, end)} of its data in the file, from the header (after the 8-byte length):
    the library's handle does not tell where a tensor's bytes lie."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    return {name: (8 + length + entry["data_offsets"][0], 8 + length + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"}


def _open(path: str):
    """The library's handle on ``path``; CheckpointError naming the file for anything it refuses."""
    try:
        return safe_open(path, framework="numpy", backend="pread")
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: safetensors file not found") from err
    except SafetensorError as err:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({err})") from err


def _library_index(index: tuple, shape: tuple):
    """Split a numpy index that selects something into what ``get_slice`` reads and the axes to reverse afterwards.

    The library takes ints and slices with a positive step inside the tensor; numpy also counts from the end,
    clamps slices and steps backwards. Returns (index for the library, axes of its result to reverse), or None when
    the index holds something else (Ellipsis, None, arrays).
    """
    library, flips = [], []
    for item, size in zip(index, shape):
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            library.append(int(item) % size)
        elif isinstance(item, slice):
            rows = range(*item.indices(size))
            if rows.step < 0:
                flips.append(sum(isinstance(x, slice) for x in library))
                rows = rows[::-1]
            library.append(slice(rows.start, rows[-1] + 1, rows.step))
        else:
            return None
    return tuple(library), flips


class SafetensorsReader:
    """Random access to one ``.safetensors`` file, tensor by tensor or slice by slice, without torch.

    ``get(name, slice=None)`` returns a numpy array of its own (bf16 as ``BF16``); ``slice`` is anything numpy accepts
    for indexing (an int, a ``slice``, or a tuple of them); ints and slices are read from disk as selected, anything
    else (Ellipsis, index arrays) reads the tensor and indexes it in memory.
    Opening checks the header: a tensor whose bytes lie past the end of the file (a truncated download) raises
    ``CheckpointError`` naming the file.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = _open(path)
        self._fd, self._spans = None, None                  # read_into's descriptor and byte spans, when used
        self.metadata = self._file.metadata() or {}
        self._entries = {}
        for name in self._file.offset_keys():
            view = self._file.get_slice(name)
            tag = view.get_dtype()
            if tag not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {tag}, which is not supported here")
            self._entries[name] = (_ST_DTYPES[tag], tuple(view.get_shape()))

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
        dtype, shape = self._entry(name)
        if self._file is None:
            raise CheckpointError(f"{self.path}: reader is closed")
        index = () if slice is None else slice if isinstance(slice, tuple) else (slice,)
        # numpy checks the index and works out the result's shape on a zero-stride stand-in of the tensor
        wanted = np.broadcast_to(np.zeros((), dtype), shape)[index]
        if wanted.size == 0:
            return np.empty(wanted.shape, dtype)
        plan = _library_index(index, shape) if index else None
        try:
            if plan is None:
                array = self._file.get_tensor(name)
                if not index:
                    return array
                out = array[index]
                # a view of the whole tensor would keep all of it alive: copy the part out
                return out.copy() if out.nbytes < array.nbytes else out
            library, flips = plan
            array = self._file.get_slice(name)[library]
        except SafetensorError as err:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {err}") from err
        if flips:
            array = array[tuple(np.s_[::-1] if axis in flips else np.s_[:] for axis in range(array.ndim))].copy()
        return array

    def read_into(self, name: str, out: np.ndarray):
        """Tensor ``name`` read from the file straight into ``out`` (C-contiguous, the tensor's dtype and shape),
        e.g. one expert's row of a stacked parameter: no array of its own, no second copy."""
        dtype, shape = self._entry(name)
        if out.dtype != dtype or tuple(out.shape) != shape or not out.flags.c_contiguous:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {dtype_name(dtype)} {shape}; cannot read it "
                                  f"into a {'' if out.flags.c_contiguous else 'non-contiguous '}"
                                  f"{dtype_name(out.dtype)} {tuple(out.shape)} array")
        if self._file is None:
            raise CheckpointError(f"{self.path}: reader is closed")
        if self._spans is None:
            self._spans, self._fd = data_spans(self.path), os.open(self.path, os.O_RDONLY)
        begin, end = self._spans[name]
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < end - begin:                           # a single pread stops short of 2 GiB
            count = os.preadv(self._fd, [view[done:]], begin + done)
            if count == 0:
                raise CheckpointError(f"{self.path}: tensor {name!r}: the file ends inside its data")
            done += count

    def close(self):
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def scan_safetensors(path: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a ``.safetensors`` file, from its header."""
    with SafetensorsReader(path) as reader:
        return {name: (reader.shape(name), reader.dtype(name)) for name in reader.keys()}


def iter_safetensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, numpy array) for every tensor of a ``.safetensors`` file, in file order; memory: one tensor."""
    with SafetensorsReader(path) as reader:
        for name in reader.keys():
            array = reader.get(name)
            yield name, array
            del array  # the consumer holds it now


class SafetensorsWriter:
    """Write one ``.safetensors`` file whose layout is planned up front, tensors arriving in any order.

    ``entries``: [(name, numpy dtype, shape)] in file order. The header is written at once and the file sized;
    ``write(name, array)`` puts the bytes at the tensor's offset. ``close()`` fails if a tensor was never written,
    then has the library open the file to check it; ``abort()`` just closes the file (the caller removes it).
    """
    # Hand-written because the library's writers (save_file, serialize, serialize_file) take every tensor of a file
    # in one call: memory of a whole shard, and the tensors would have to arrive in file order. Here they come one
    # by one in the order of the MindSpore checkpoint (stacked experts split across HF names), so only one is held.

    def __init__(self, path: str, entries, metadata: Optional[Dict[str, str]] = None):
        self.path = path
        header, offset, self._slots = {}, 0, {}
        for name, dtype, shape in entries:
            dtype = np.dtype(dtype)
            if dtype not in _ST_TAGS:
                raise CheckpointError(f"numpy dtype {dtype} cannot be stored in safetensors")
            size = nbytes(shape, dtype)
            header[name] = {"dtype": _ST_TAGS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._slots[name] = (dtype, tuple(shape), offset)
            offset += size
        if metadata is not None:
            header = {"__metadata__": metadata, **header}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the library writes it
        self._data_start = 8 + len(blob)
        self.nbytes = offset
        self._pending = set(self._slots)
        self._rows_left = {}
        self._file = open(path, "wb")  # pylint: disable=consider-using-with
        self._file.write(len(blob).to_bytes(8, "little") + blob)
        self._file.truncate(self._data_start + offset)

    def planned_dtype(self, name: str) -> np.dtype:
        """The dtype ``name`` was planned with."""
        return self._slots[name][0]

    def write(self, name: str, array: np.ndarray):
        dtype, shape, offset = self._slots[name]
        if array.dtype != dtype or tuple(array.shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {name!r}: planned {dtype_name(dtype)} {shape}, "
                                  f"got {dtype_name(array.dtype)} {tuple(array.shape)}")
        self._file.seek(self._data_start + offset)
        self._file.write(memoryview(contiguous(array).reshape(-1).view(np.uint8)))
        self._pending.discard(name)

    def write_rows(self, name: str, first_row: int, rows: np.ndarray):
        """Rows [first_row, first_row + len(rows)) of tensor ``name`` (dimension 0): a tensor written in pieces, as
        they are made, is never whole in memory. It counts as written once as many rows as it has arrived."""
        dtype, shape, offset = self._slots[name]
        if rows.dtype != dtype or tuple(rows.shape[1:]) != shape[1:] or first_row + len(rows) > shape[0]:
            raise CheckpointError(f"{self.path}: tensor {name!r}: planned {dtype_name(dtype)} {shape}, got rows "
                                  f"{first_row}..{first_row + len(rows)} of {dtype_name(rows.dtype)} "
                                  f"{tuple(rows.shape[1:])}")
        self._file.seek(self._data_start + offset + nbytes((first_row,) + shape[1:], dtype))
        self._file.write(memoryview(contiguous(rows).reshape(-1).view(np.uint8)))
        self._rows_left[name] = self._rows_left.get(name, shape[0]) - len(rows)
        if self._rows_left[name] <= 0:
            self._pending.discard(name)

    def abort(self):
        """Close the file without checking it (after an error elsewhere; the caller deletes the file)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self):
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._pending:
            raise CheckpointError(f"{self.path}: tensors never written: {sorted(self._pending)[:10]}")
        _open(self.path).__exit__(None, None, None)


Entry = Tuple[str, np.dtype, Tuple[int, ...]]


def plan_shards(entries: Iterable[Entry], max_shard_size: int) -> List[List[Entry]]:
    """[(name, dtype, shape)] split into shards in order: a new shard when the next tensor would pass
    ``max_shard_size`` bytes (a larger tensor gets a shard of its own), as save_pretrained shards."""
    shards, current, size = [], [], 0
    for name, dtype, shape in entries:
        size_of = nbytes(shape, np.dtype(dtype))
        if current and size + size_of > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append((name, np.dtype(dtype), tuple(shape)))
        size += size_of
    return shards + [current] if current else shards


class ShardedSafetensorsWriter:
    """A folder of planned shards, ``<stem>-0000k-of-0000n.safetensors`` at the paths ``file_path(name)`` gives
    (``StagedDir.file``), each tensor written to whichever shard holds it as it arrives; ``close()`` closes them and
    writes ``<stem>.safetensors.index.json``; ``abort()`` closes without checking."""

    def __init__(self, file_path, stem: str, shards: List[List[Entry]], metadata: Optional[Dict[str, str]] = None):
        self.names = [f"{stem}-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        self.index_name = f"{stem}.safetensors.index.json"
        self._file_path = file_path
        self.writers, self._where = [], {}
        try:
            for file_name, entries in zip(self.names, shards):
                self.writers.append(SafetensorsWriter(file_path(file_name), entries, metadata))
                for name, _, _ in entries:
                    self._where[name] = self.writers[-1]
        except BaseException:
            self.abort()
            raise
        self.weight_map = {name: file_name for file_name, entries in zip(self.names, shards)
                           for name, _, _ in entries}
        self.nbytes = 0

    def planned_dtype(self, name: str) -> np.dtype:
        return self._where[name].planned_dtype(name)

    def write(self, name: str, array: np.ndarray):
        self._where[name].write(name, array)

    def write_rows(self, name: str, first_row: int, rows: np.ndarray):
        self._where[name].write_rows(name, first_row, rows)

    def close(self):
        """Close (check) every shard and write the index; ``nbytes`` is then the tensors' total."""
        for writer in self.writers:
            writer.close()
        self.nbytes = sum(writer.nbytes for writer in self.writers)
        with open(self._file_path(self.index_name), "w", encoding="utf-8") as handle:
            json.dump({"metadata": {"total_size": self.nbytes}, "weight_map": self.weight_map}, handle, indent=2)

    def abort(self):
        for writer in self.writers:
            writer.abort()
