"""Hugging Face ``pytorch_model*.bin`` weight files, read with torch (an optional dependency: only these files need it).

``torch.load(weights_only=True)`` unpickles no code; ``mmap=True`` leaves the tensors on disk until one is copied out.
Without torch installed, opening a ``.bin`` raises ``CheckpointError`` saying so.
"""
from typing import List, Tuple

import numpy as np
from mindformers.tools.logger import logger

from research.deepseek2.checkpoints.arrays import BF16, dtype_name
from research.deepseek2.errors import CheckpointError

__all__ = ["TorchBinReader"]


def _import_torch(path: str):
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise CheckpointError(f"{path}: reading pytorch_model*.bin weights needs torch, which is not installed "
                              f"(pip install torch), or use the model's safetensors files") from err
    return torch


class TorchBinReader:
    """A ``pytorch_model*.bin`` read with ``torch.load(weights_only=True, mmap=True)``: no code is unpickled and
    tensors stay on disk until ``get`` copies one out (mmap needs the zip format of torch >= 1.6; older files are
    loaded whole, still with ``weights_only=True``)."""

    def __init__(self, path: str):
        torch = _import_torch(path)
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

    def read_into(self, name: str, out: np.ndarray):
        """Tensor ``name`` copied into ``out`` (its dtype and shape), as SafetensorsReader.read_into: one copy, from
        torch's storage."""
        array = self._view(name)
        if out.dtype != array.dtype or out.shape != array.shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {dtype_name(array.dtype)} {array.shape}; cannot "
                                  f"read it into a {dtype_name(out.dtype)} {out.shape} array")
        out[...] = array

    def get(self, name: str, slice=None) -> np.ndarray:  # pylint: disable=redefined-builtin
        return self._view(name, slice).copy()

    def _view(self, name: str, slice=None) -> np.ndarray:  # pylint: disable=redefined-builtin
        """numpy's view of the tensor (or tensor[slice]) in torch's storage (a contiguous copy where it is not)."""
        tensor = self._state[name]
        if slice is not None:
            tensor = tensor[slice]
        if tensor.dtype == self._torch.bfloat16:  # numpy has no bf16 of its own: move the bits through int16
            return tensor.contiguous().view(self._torch.int16).numpy().view(BF16)
        return tensor.contiguous().numpy()

    def close(self):
        self._state = {}
