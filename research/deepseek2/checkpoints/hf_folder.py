"""A Hugging Face DeepSeek-V2 folder seen as this model's parameters: its weight files, checked against a config,
then streamed under MindSpore names with each layer's routed experts stacked.

``HFCheckpoint.parameters(config)`` compares the folder's tensors with what the config expects (names through
``weight_map``) before anything is read, and ``iter_parameters`` yields MindSpore names and arrays shard by shard,
stacking each layer's routed experts on the way. Memory: one tensor, or one stack being assembled.
"""
import json
import os
from typing import Dict, Iterator, List, Tuple

import numpy as np
from mindformers.tools.logger import logger
from tqdm import tqdm

from research.deepseek2.checkpoints.arrays import cast_array, describe, np_dtype
from research.deepseek2.checkpoints.checkpoint import HF_INDEX_NAME, Checkpoint, Header, read_weight_map
from research.deepseek2.checkpoints.weight_map import FILE_ONLY_SUFFIX, expected_hf_shapes, hf_to_ms, is_stacked
from research.deepseek2.errors import CheckpointError
from research.deepseek2.planning.inventory import held_dtypes, quantization_settings

__all__ = ["HFCheckpoint"]

# where a Hugging Face folder keeps its weights, looked for in this order: (file, is an index)
_WEIGHT_FILES = ((HF_INDEX_NAME, True), ("model.safetensors", False), ("pytorch_model.bin.index.json", True),
                 ("pytorch_model.bin", False))


def _quantized_weight_files(hf_dir: str):
    """msModelSlim's weight files of a quantized folder (quantization/folder.py): its index, else its one file."""
    try:
        names = sorted(os.listdir(hf_dir))
    except OSError:
        return ()
    found = [(n, True) for n in names if n.startswith("quant_model_weight") and n.endswith(".safetensors.index.json")]
    found += [(n, False) for n in names if n.startswith("quant_model_weight") and n.endswith(".safetensors")]
    return tuple(found[:1])


class HFCheckpoint(Checkpoint):
    """The weight files of a Hugging Face model folder (see ``checkpoint.py``); ``files`` are the shard paths in
    index order, ``open(file)`` gives a reader (``SafetensorsReader`` or ``TorchBinReader``)."""

    kind = "hf"

    def __init__(self, hf_dir: str):
        super().__init__()
        self.path = hf_dir
        if not os.path.isdir(hf_dir):
            raise CheckpointError(f"{hf_dir}: Hugging Face checkpoint folder not found")
        for name, is_index in _WEIGHT_FILES + _quantized_weight_files(hf_dir):
            if os.path.isfile(os.path.join(hf_dir, name)):
                break
        else:
            raise CheckpointError(f"{hf_dir}: no weights found (looked for {', '.join(n for n, _ in _WEIGHT_FILES)}, "
                                  f"and quant_model_weight*.safetensors)")
        self.format = "bin" if name.startswith("pytorch_model") else "safetensors"
        self.index_file = os.path.join(hf_dir, name) if is_index else None
        self.index = read_weight_map(self.index_file, flat=False) if is_index else None
        shards = sorted(set(self.index.values())) if is_index else [name]
        self.files = [os.path.join(hf_dir, shard) for shard in shards]
        for shard, file in zip(shards, self.files):
            if not os.path.isfile(file):
                raise CheckpointError(f"{hf_dir}: shard {shard} named in {name} is missing")

    @property
    def description(self) -> str:
        return f"Hugging Face folder {self.path}"

    def config_fields(self) -> dict:
        """The folder's config.json."""
        with open(os.path.join(self.path, "config.json"), encoding="utf-8") as handle:
            return json.load(handle)

    def open(self, file: str):
        """A reader of one weight file of the folder."""
        if self.format == "safetensors":
            from research.deepseek2.checkpoints.safetensors_file import SafetensorsReader
            return SafetensorsReader(file)
        from research.deepseek2.checkpoints.torch_bin import TorchBinReader
        return TorchBinReader(file)

    reader = open

    def _scan(self) -> Dict[str, Header]:
        found: Dict[str, Header] = {}
        for file in self.files:
            reader = self.open(file)
            try:
                for name in reader.keys():
                    if name in found:
                        raise CheckpointError(f"{self.path}: tensor {name!r} is in both "
                                              f"{os.path.basename(found[name].file)} and {os.path.basename(file)}")
                    found[name] = Header(tuple(reader.shape(name)), reader.dtype(name), file)
            finally:
                reader.close()
        self._check_index(found)
        return found

    # ------------------------------------------------------------------------------------ against a config
    def quantization(self):
        """The folder's quantization (``quantization.folder.folder_settings``), None for float weights."""
        from research.deepseek2.quantization.folder import folder_settings
        return folder_settings(self.path)

    def check(self, config) -> Dict[str, Header]:
        """The folder's tensors checked against ``config`` before anything is read: ``QuantizationError`` naming
        both when the folder's quantization is not the config's, ``CheckpointError`` for unknown (extra), missing,
        mis-shaped and mis-typed (a quantized weight not int8) tensors, naming the tensor, the file and expected vs
        got."""
        from research.deepseek2.quantization.folder import check_agrees
        check_agrees(quantization_settings(config), self.quantization(), self.path)
        info, expected = self.tensors, expected_hf_shapes(config)
        extra = sorted(n for n in info if n not in expected)
        if extra:
            detail = "; ".join(f"{n} (in {os.path.basename(info[n].file)})" for n in extra[:10])
            raise CheckpointError(f"{self.path}: {len(extra)} unexpected tensor(s) not in the model of this config "
                                  f"(weight_map.NAME_MAP / expected_hf_shapes): {detail}"
                                  + (" ..." if len(extra) > 10 else ""))
        missing = [n for n in expected if n not in info]
        if missing:
            raise CheckpointError(f"{self.path}: {len(missing)} tensor(s) missing: {describe(missing)}")
        for name, shape in expected.items():
            if tuple(info[name].shape) != tuple(shape):
                raise CheckpointError(f"{info[name].file}: tensor {name!r} has shape {tuple(info[name].shape)}, "
                                      f"expected {tuple(shape)} from the config")
        held = held_dtypes(config)
        for name in expected:
            if held.get(hf_to_ms(name)[0]) == "int8" and np.dtype(info[name].dtype) != np.int8:
                raise CheckpointError(f"{info[name].file}: tensor {name!r} is {np.dtype(info[name].dtype).name}, "
                                      f"expected the int8 of a quantized weight")
        return info

    def parameters(self, config=None):
        """{MindSpore name: (shape, dtype)}, experts stacked, after ``check(config)`` (default: config.json)."""
        out = {}
        for name, header in self.check(self._config(config)).items():
            ms_name, expert = hf_to_ms(name)
            if ms_name.endswith(FILE_ONLY_SUFFIX):       # msModelSlim's offsets: checked when read, not loaded
                continue
            if expert is None:
                out[ms_name] = (header.shape, header.dtype)
            else:
                count = out.get(ms_name, ((0,), header.dtype))[0][0] + 1
                out[ms_name] = ((count,) + header.shape, header.dtype)
        return out

    def _config(self, config):
        if config is not None:
            return config
        from research.deepseek2.deepseek2_config import DeepseekV2Config
        return DeepseekV2Config(**self.config_fields())

    def plan(self, config) -> Tuple[Dict[str, List[str]], Dict[str, int]]:
        """rows: {MindSpore name: its HF names, experts in order}, in model order; owner: {MindSpore name: index of
        the file it is yielded with (the one holding its last row)}."""
        info = self.check(config)
        order = {file: i for i, file in enumerate(self.files)}
        rows: Dict[str, list] = {}
        for hf_name in expected_hf_shapes(config):
            ms_name, expert = hf_to_ms(hf_name)
            rows.setdefault(ms_name, []).append((expert or 0, hf_name))
        rows = {ms_name: [n for _, n in sorted(r)] for ms_name, r in rows.items()}
        owner = {ms_name: max(order[info[n].file] for n in hf_names) for ms_name, hf_names in rows.items()}
        return rows, owner

    def iter_parameters(self, config=None, dtype=None, progress: bool = True
                        ) -> Iterator[Tuple[str, str, np.ndarray]]:
        """Yield (file, MindSpore name, array) for every parameter, in file order, then model order.

        A plain tensor goes with the file holding it; a stacked routed-expert parameter (n_routed_experts, out, in)
        goes with the file holding its last expert row and is assembled right before it is yielded, reading rows
        from earlier files by offset. ``dtype`` (numpy dtype, 'bf16'/'fp16'/'fp32', or None = the stored dtype) is
        the output dtype. Memory: one tensor, or one stack being assembled.
        """
        config = self._config(config)
        rows, owner = self.plan(config)
        info = self.tensors
        order = {file: i for i, file in enumerate(self.files)}
        last_use: Dict[int, int] = {}
        for ms_name, hf_names in rows.items():
            for n in hf_names:
                last_use[order[info[n].file]] = max(last_use.get(order[info[n].file], 0), owner[ms_name])
        out_dtype = None if dtype is None else np_dtype(dtype)
        readers = {}

        def reader_of(hf_name):
            file = info[hf_name].file
            if file not in readers:
                logger.info(f"reading {file}")
                readers[file] = self.open(file)
            return readers[file]

        def read(hf_name):
            """The whole tensor, read straight into a buffer of its own (which the model's parameter then keeps: no
            array of the reader's library and no second copy of it)."""
            reader = reader_of(hf_name)
            out = np.empty(reader.shape(hf_name), reader.dtype(hf_name))
            reader.read_into(hf_name, out)
            return out

        bar = tqdm(total=len(info), desc="tensors", unit="tensor", disable=not progress)
        try:
            for i, file in enumerate(self.files):
                for ms_name in (m for m in rows if owner[m] == i):
                    hf_names = rows[ms_name]
                    if ms_name.endswith(FILE_ONLY_SUFFIX):
                        for hf_name in hf_names:               # symmetric quantization only: every offset zero
                            if np.any(read(hf_name)):
                                raise CheckpointError(f"{info[hf_name].file}: {hf_name} is not zero: asymmetric "
                                                      f"quantization (an offset per group) is not supported; "
                                                      f"quantize with convert_weight.py --quantize (symmetric)")
                            bar.update(1)
                        continue
                    if not is_stacked(ms_name):
                        array = cast_array(read(hf_names[0]), out_dtype)
                        bar.update(1)
                        yield file, ms_name, array
                        del array
                        continue
                    stacked = None
                    for expert, hf_name in enumerate(hf_names):
                        reader = reader_of(hf_name)
                        if stacked is None:
                            target = out_dtype if out_dtype is not None else reader.dtype(hf_name)
                            stacked = np.empty((len(hf_names),) + reader.shape(hf_name), dtype=target)
                        if reader.dtype(hf_name) == stacked.dtype:    # the row's bytes go straight to their place
                            reader.read_into(hf_name, stacked[expert])
                        else:
                            stacked[expert] = cast_array(reader.get(hf_name), stacked.dtype)
                        bar.update(1)
                    yield file, ms_name, stacked
                    del stacked
                for done in [f for f in readers if last_use[order[f]] <= i]:
                    readers.pop(done).close()
        finally:
            bar.close()
            for reader in readers.values():
                reader.close()
