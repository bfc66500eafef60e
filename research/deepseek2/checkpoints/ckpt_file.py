"""MindSpore ``.ckpt`` files: a streaming writer, a header scanner, and a tensor reader.

Format: serialized ``mindspore.train.checkpoint_pb2.Checkpoint`` messages one after another, each holding one
``Value{tag, tensor{dims, tensor_type, tensor_content}}``; tensors above 512 MiB are split over several messages with
the same tag; ``save_checkpoint(..., crc_check=True)`` appends a 17-byte ``crc_num...`` trailer.

What MindSpore's own functions cost (MindSpore 2.9; figures in docs/benchmarks.md): ``mindspore.save_checkpoint``
gathers its whole list of tensors in memory, and ``mindspore.load_checkpoint`` parses a whole file at once (about
2.4x its size resident). So:
- ``CkptWriter`` writes the messages itself, one tensor at a time, byte-identical to ``save_checkpoint``;
- ``scan_ckpt`` reads names, shapes and dtypes from the message headers and seeks over the contents (MindSpore has
  no reader that leaves the contents on disk);
- ``iter_ckpt`` hands files up to ``MS_PARSER_MAX_BYTES`` to ``mindspore.load_checkpoint`` and streams larger ones
  message by message (memory: one tensor).
MindSpore's other format, safetensors (``load_checkpoint(..., format="safetensors")``), is read and written by
``safetensors_file``; ``checkpoint.open_checkpoint`` opens either kind of file and folder.
"""
import os
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import mindspore as ms

from research.deepseek2.checkpoints.arrays import BF16, contiguous, nbytes
from research.deepseek2.errors import CheckpointError
from research.deepseek2.fileio import StagedFile

__all__ = ["CkptWriter", "scan_ckpt", "iter_ckpt", "CKPT_CHUNK_BYTES", "MS_PARSER_MAX_BYTES"]

# mindspore.save_checkpoint splits tensor_content every 1024 * SLICE_SIZE bytes (SLICE_SIZE = 524288 KiB)
CKPT_CHUNK_BYTES = 1024 * 524288
# files up to this size are read by mindspore.load_checkpoint (peak about 2.4x: ~2.4 GiB, the size of DeepSeek-V2's
# largest tensor, a layer's stacked experts); larger ones by the streaming reader below
MS_PARSER_MAX_BYTES = 1 << 30

# the format's tensor_type tags (str() of the MindSpore dtype)
_MS_TYPES = {"Float64": np.dtype(np.float64), "Float32": np.dtype(np.float32), "Float16": np.dtype(np.float16),
             "BFloat16": BF16, "Int64": np.dtype(np.int64), "Int32": np.dtype(np.int32),
             "Int16": np.dtype(np.int16), "Int8": np.dtype(np.int8), "UInt64": np.dtype(np.uint64),
             "UInt32": np.dtype(np.uint32), "UInt16": np.dtype(np.uint16), "UInt8": np.dtype(np.uint8),
             "Bool": np.dtype(np.bool_)}
_MS_TAGS = {dtype: tag for tag, dtype in _MS_TYPES.items()}


# ---------------------------------------------------------------------------------------------------- writing
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


def _record_head(name: bytes, dims, type_name: bytes, content_len: int) -> bytes:
    """Protobuf bytes of Checkpoint{value: [Value{tag, tensor{dims, tensor_type, tensor_content}}]} up to the content.

    Field order and encoding (unpacked int64 dims) are what checkpoint_pb2.SerializeToString produces. Written by hand
    so the content goes from the array to the file without a copy (a checkpoint_pb2 message would copy it into
    the message and again into the serialized string).
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
    # Not mindspore.save_checkpoint: it refuses a generator and gathers the whole list in memory.

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
        array = contiguous(array)
        if array.dtype not in _MS_TAGS:
            raise CheckpointError(f"numpy dtype {array.dtype} cannot be stored in a MindSpore checkpoint")
        type_name = _MS_TAGS[array.dtype]
        raw = memoryview(array.reshape(-1).view(np.uint8))
        tag = name.encode()
        for start in range(0, max(len(raw), 1), CKPT_CHUNK_BYTES):
            chunk = raw[start:start + CKPT_CHUNK_BYTES]
            self._file.write(_record_head(tag, array.shape, type_name.encode(), len(chunk)))
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


# ---------------------------------------------------------------------------------------------------- reading
# Hand-written: MindSpore's parsers (load_checkpoint, checkpoint_pb2) take whole messages, contents included; this
# reads the headers and seeks over the contents (scan_ckpt), or reads a file too large for load_checkpoint a tensor
# at a time (iter_ckpt).
class _Fields:
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


def _read_tensor_fields(r: _Fields, rec: dict, tensor_end: int):
    """dims, tensor_type and the (offset, length) of tensor_content of one TensorProto; the content is skipped."""
    f = r.f
    while f.tell() < tensor_end:
        key = r.varint()
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 0:
            rec["dims"].append(r.varint())
        elif field == 1 and wire == 2:  # packed dims
            packed_end = r.varint() + f.tell()
            while f.tell() < packed_end:
                rec["dims"].append(r.varint())
        elif field == 2 and wire == 2:
            rec["type"] = r.bytes(r.varint()).decode()
        elif field == 3 and wire == 2:
            n = r.varint()
            rec["content"] = (f.tell(), n)
            f.seek(n, os.SEEK_CUR)
        else:
            r.skip(wire)


def _records(f, path: str) -> Iterator[dict]:
    """Parse the messages of a ``.ckpt`` one by one; the content is left in place: record['content'] = (offset, len).

    The file position after each yielded record is the record's end (the consumer may seek anywhere in between).
    """
    size = os.fstat(f.fileno()).st_size
    r = _Fields(f, path)
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
        rec = {"tag": None, "dims": [], "type": None, "content": (f.tell(), 0)}
        while f.tell() < value_end:
            field_key = r.varint()
            field, wire = field_key >> 3, field_key & 7
            if field == 1 and wire == 2:
                rec["tag"] = r.bytes(r.varint()).decode()
            elif field == 2 and wire == 2:
                _read_tensor_fields(r, rec, r.varint() + f.tell())
            elif field == 3:
                raise CheckpointError(f"{path}: parameter {rec['tag']!r} is a MapParameter, not supported here")
            else:
                r.skip(wire)
        if f.tell() != value_end:
            raise CheckpointError(f"{path}: corrupt record at offset {start}")
        if rec["tag"] is None or rec["type"] is None:
            raise CheckpointError(f"{path}: corrupt record at offset {start} (no tag or tensor type)")
        yield rec


def _tensors(path: str, read: bool) -> Iterator[Tuple[str, Tuple[int, ...], np.dtype, Optional[np.ndarray]]]:
    """(name, shape, dtype, array or None) per parameter, joining the 512 MiB pieces of large tensors."""
    with open(path, "rb") as f:
        current = None  # [name, shape, dtype, buffer, filled]
        for rec in _records(f, path):
            name, (offset, length) = rec["tag"], rec["content"]
            if current is not None and current[0] != name:
                raise CheckpointError(f"{path}: parameter {current[0]!r} is incomplete ({current[4]} of "
                                      f"{nbytes(current[1], current[2])} bytes) before {name!r}")
            if current is None:
                if rec["type"] not in _MS_TYPES:
                    raise CheckpointError(f"{path}: parameter {name!r} has unsupported tensor_type {rec['type']!r}")
                dtype, shape = _MS_TYPES[rec["type"]], tuple(rec["dims"])
                current = [name, shape, dtype, np.empty(nbytes(shape, dtype), dtype=np.uint8) if read else None, 0]
            total = nbytes(current[1], current[2])
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
                                  f"{nbytes(current[1], current[2])} bytes")


def scan_ckpt(path: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a ``.ckpt`` without reading tensor contents (seeks over them)."""
    out = {}
    for name, shape, dtype, _ in _tensors(path, read=False):
        if name in out:
            raise CheckpointError(f"{path}: parameter {name!r} appears twice")
        out[name] = (shape, dtype)
    return out


def _load_with_mindspore(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    try:
        params = ms.load_checkpoint(path)
    except (ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path}: truncated or not a MindSpore checkpoint ({err})") from err
    for name in list(params):
        array = params.pop(name).asnumpy()  # dropping each Parameter as it goes frees the file progressively
        yield name, array
        del array


def iter_ckpt(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, numpy array) for every parameter of a ``.ckpt``, in file order (bf16 as ``BF16``).

    Memory: up to ``MS_PARSER_MAX_BYTES``, about 2.4x the file while MindSpore parses it; above, one tensor.
    A ``.safetensors`` file is refused (``CheckpointError``): ``open_checkpoint(path)`` reads both kinds.
    """
    if path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: a safetensors file, not a .ckpt: read it with "
                              f"checkpoints.open_checkpoint(path) (or safetensors_file.iter_safetensors)")
    if path.endswith(".ckpt") and os.path.getsize(path) <= MS_PARSER_MAX_BYTES:
        yield from _load_with_mindspore(path)
        return
    for name, _, _, array in _tensors(path, read=True):
        yield name, array
        del array
