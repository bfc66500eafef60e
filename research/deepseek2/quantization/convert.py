"""Quantize while converting: any checkpoint the converter reads -> a quantized folder in msModelSlim's layout
(``folder.py``), one tensor at a time.

    python research/deepseek2/convert_weight.py --quantize int8 --torch_ckpt_path HF_DIR --mindspore_ckpt_path OUT
    python research/deepseek2/convert_weight.py --quantize int4 [--group_size 128] ...
    python research/deepseek2/convert_weight.py --quantize int8 --reverse --mindspore_ckpt_path MS_CKPT \\
        --torch_ckpt_path OUT --config model.yaml           (a MindSpore checkpoint: a finetune's output)

A Hugging Face input is read tensor by tensor in its own order (no expert stacking): memory is one tensor and its
quantized form. A MindSpore input yields each layer's routed experts stacked (E, n, k), as the float conversion does,
and they are quantized one expert at a time. The output is planned from the headers (names, dtypes, shapes, shards)
before a byte is written, written at planned offsets, staged and renamed at the end: an error leaves nothing.
"""
import copy
import json
import os
import shutil

import numpy as np
from mindformers.tools.logger import logger
from tqdm import tqdm

from research.deepseek2.checkpoints.arrays import cast_array, np_dtype
from research.deepseek2.checkpoints.names import FILE_ONLY_SUFFIX, SCALE_SUFFIX, hf_to_ms, is_stacked, ms_to_hf
from research.deepseek2.checkpoints.safetensors_file import ShardedSafetensorsWriter, plan_shards
from research.deepseek2.checkpoints.weight_map import expected_hf_shapes
from research.deepseek2.errors import CheckpointError, QuantizationError
from research.deepseek2.fileio import StagedDir
from research.deepseek2.planning.inventory import held_dtypes
from research.deepseek2.quantization.folder import (DESCRIPTION_NAME, DESCRIPTION_VERSION, folder_settings,
                                                    weight_file_stem)
from research.deepseek2.quantization.rtn import quantize
from research.deepseek2.quantization.settings import QuantSettings

__all__ = ["quantize_checkpoint", "COPIED_FILES"]

# files of a Hugging Face folder a run of the quantized folder still needs, copied as they are
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _plan(config, source_dtypes, max_shard_size: int):
    """[[(HF name, dtype, shape)] per shard] in model order, and {HF name: "W8A16" | "FLOAT"}."""
    held = held_dtypes(config)
    settings = config.weight_quantization
    entries, kinds = [], {}
    for hf_name, shape in expected_hf_shapes(config).items():
        ms_name, _ = hf_to_ms(hf_name)
        base = ms_name[:-len(FILE_ONLY_SUFFIX)] + SCALE_SUFFIX if ms_name.endswith(FILE_ONLY_SUFFIX) else ms_name
        entries.append((hf_name, np.dtype(held[base]) if base in held else source_dtypes(ms_name), shape))
        kinds[hf_name] = settings.model_quant_type if base in held else "FLOAT"
    return plan_shards(entries, max_shard_size), kinds


def _source_rows(source, config, progress):
    """(HF name of a float weight or tensor, its array) from any checkpoint, one tensor (one expert) at a time."""
    from research.deepseek2.checkpoints.hf_folder import HFCheckpoint
    if isinstance(source, HFCheckpoint):
        rows, _ = source.plan(config)                      # checks names and shapes against the float config
        order = {file: i for i, file in enumerate(source.files)}
        names = sorted((n for hf_names in rows.values() for n in hf_names),
                       key=lambda n: order[source.tensors[n].file])
        readers = {}
        try:
            for name in tqdm(names, desc="quantizing", unit="tensor", disable=not progress):
                file = source.tensors[name].file
                if file not in readers:
                    for done in list(readers):
                        readers.pop(done).close()          # files in order: the previous one is finished
                    logger.info(f"reading {file}")
                    readers[file] = source.open(file)
                yield name, readers[file].get(name)
        finally:
            for reader in readers.values():
                reader.close()
        return
    # the converter's completeness rule: a training output's optimizer / step state and a declared non-weight (the
    # latent cache) are skipped, logged; anything missing, unexpected or mis-shaped is refused naming it
    from research.deepseek2.checkpoints.check import compare, raise_problems
    from research.deepseek2.checkpoints.weight_map import expected_ms_shapes
    from research.deepseek2.planning.inventory import buffers
    expected = expected_ms_shapes(config)
    raise_problems(compare(expected, source.parameters(), source.path, buffers(config)), source.path)
    for _, ms_name, array in source.iter_parameters(config, progress=progress):
        if ms_name not in expected:
            continue
        if is_stacked(ms_name):
            for expert in range(array.shape[0]):
                yield ms_to_hf(ms_name, expert), array[expert]
        else:
            yield ms_to_hf(ms_name), array
        del array


def quantize_checkpoint(source, out_dir: str, settings: QuantSettings, config=None, dtype=None,
                        max_shard_size: int = 5 * 10 ** 9, progress: bool = True) -> dict:
    """Write the quantized folder of ``source`` (a path or an opened checkpoint) to ``out_dir``.

    Args:
        source: a Hugging Face folder or a MindSpore checkpoint (file, folder or index; then ``config`` is needed).
        settings: the quantization (``parse_quantization_config``).
        config: the float model's DeepseekV2Config (default: the Hugging Face folder's config.json).
        dtype: the dtype of the tensors kept in float (embedding, norms, router, kv_b_proj, lm_head, skipped
            modules); None keeps the source's.
    Returns: {"files": [...], "tensors": count, "bytes": total, "quantized": count of quantized weights}.
    """
    from research.deepseek2.checkpoints import open_checkpoint
    from research.deepseek2.checkpoints.hf_folder import HFCheckpoint
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    source = open_checkpoint(source)
    is_hf = isinstance(source, HFCheckpoint)
    if is_hf and folder_settings(source.path) is not None:
        raise QuantizationError(f"{source.path}: already quantized ({DESCRIPTION_NAME} or config.json's "
                                f"quantization_config); quantize the float checkpoint it came from")
    if config is None:
        if not is_hf:
            raise CheckpointError("--quantize from a MindSpore checkpoint needs --config (the model's config.json or "
                                  "YAML)")
        config = DeepseekV2Config(**source.config_fields())
    if config.quantization_config:
        raise QuantizationError("--config already has a quantization_config: give the float model's config")
    fields = config.to_hf_dict() if not is_hf else dict(source.config_fields())
    fields.pop("quantization_config", None)
    quantized_config = copy.deepcopy(config)
    quantized_config.quantization_config = settings.to_dict()
    held = held_dtypes(quantized_config)               # refuses a group size that does not divide a weight, naming it
    out_dtype = np_dtype(dtype) if dtype else None
    stored = source.tensors if is_hf else source.parameters(config)

    def source_dtype(ms_name):
        if out_dtype is not None:
            return out_dtype
        if is_hf:
            return np.dtype(stored[ms_to_hf(ms_name, 0 if is_stacked(ms_name) else None)].dtype)
        return np.dtype(stored[ms_name][1])

    shards, kinds = _plan(quantized_config, source_dtype, max_shard_size)
    logger.info(f"quantizing {source.description} -> {out_dir}: {settings.model_quant_type}, group_size "
                f"{settings.group_size or 'per channel'}, {sum(k != 'FLOAT' for k in kinds.values()) // 3} "
                f"weights quantized, {len(shards)} shard(s)")
    stage = StagedDir(out_dir)
    out, quantized_count = None, 0
    try:
        out = ShardedSafetensorsWriter(stage.file, weight_file_stem(settings), shards, {"format": "pt"})
        for hf_name, array in _source_rows(source, config, progress):
            ms_name, _ = hf_to_ms(hf_name)
            if held.get(ms_name) == "int8":
                q, scale = quantize(array, settings, hf_name)
                out.write(hf_name, q)
                out.write(hf_name + SCALE_SUFFIX, scale)
                out.write(hf_name + FILE_ONLY_SUFFIX, np.zeros_like(scale))
                quantized_count += 1
                del q, scale
            else:
                out.write(hf_name, cast_array(array, out.planned_dtype(hf_name)))
            del array
        out.close()
        description = {"version": DESCRIPTION_VERSION, "model_quant_type": settings.model_quant_type,
                       "group_size": settings.group_size, **kinds}
        with open(stage.file(DESCRIPTION_NAME), "w", encoding="utf-8") as handle:
            json.dump(description, handle, indent=2)
        fields.update(quantization_config=settings.to_dict(), quantize=settings.model_quant_type.lower())
        with open(stage.file("config.json"), "w", encoding="utf-8") as handle:
            json.dump(fields, handle, indent=2)
        if is_hf:
            for name in COPIED_FILES:
                if os.path.isfile(os.path.join(source.path, name)):
                    shutil.copyfile(os.path.join(source.path, name), stage.file(name))
        stage.commit()
    except BaseException:
        if out is not None:
            out.abort()
        stage.abort()
        raise
    logger.info(f"wrote {len(out.names)} shard(s), {DESCRIPTION_NAME} and config.json to {stage.path} "
                f"({out.nbytes / 2 ** 20:.1f} MiB; {quantized_count} tensors quantized)")
    return {"files": [os.path.join(stage.path, n) for n in out.names], "tensors": len(out.weight_map),
            "bytes": out.nbytes, "quantized": quantized_count}
