"""A quantized checkpoint folder on disk: msModelSlim's W8A16 / W4A16 layout, as Ascend's tools read it.

    OUT/
      config.json                                      the model's config.json + "quantization_config" (the YAML's
                                                       form, settings.py) + "quantize": "w8a16" (MindIE reads it)
      quant_model_description.json                     {"version": "1.0.0", "model_quant_type": "W8A16",
                                                        "group_size": G, <every tensor>: "W8A16" | "FLOAT"}
      quant_model_weight_w8a16-0000k-of-0000n.safetensors
      quant_model_weight_w8a16.safetensors.index.json  {"metadata": {"total_size"}, "weight_map": {tensor: file}}
      tokenizer files, generation_config.json          copied from a Hugging Face input

Tensors keep the Hugging Face names; a quantized projection ``<p>.weight`` is int8 (n, k) (int4: (n/2, k), two
output channels a byte, ``rtn.py``) with ``<p>.weight_scale`` and ``<p>.weight_offset`` float32 (n, k / G) (offsets
zero: symmetric). What was confirmed of this layout from msModelSlim's and MindIE's sources is in docs/weights.md.

``folder_settings`` reads a folder's quantization back: config.json's ``quantization_config`` when present, else the
description file (an msModelSlim output: model_quant_type, group_size, and its FLOAT projections as
modules_to_not_convert).
"""
import json
import os
from typing import Optional

from research.deepseek2.errors import QuantizationError
from research.deepseek2.quantization.settings import QuantSettings, parse_quantization_config

__all__ = ["DESCRIPTION_NAME", "weight_file_stem", "folder_settings", "describe_mismatch", "check_agrees"]

DESCRIPTION_NAME = "quant_model_description.json"
DESCRIPTION_VERSION = "1.0.0"


def weight_file_stem(settings: QuantSettings) -> str:
    """msModelSlim's weight file name for the scheme: quant_model_weight_w8a16 / _w4a16."""
    return f"quant_model_weight_{settings.model_quant_type.lower()}"


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise QuantizationError(f"{path}: cannot read it ({err})") from err


def _from_description(description: dict, path: str) -> QuantSettings:
    kind = str(description.get("model_quant_type", ""))
    dtypes = {"W8A16": "int8", "W4A16": "int4"}
    if kind not in dtypes:
        raise QuantizationError(f"{path}: model_quant_type {kind!r}: this model reads weight-only W8A16 or W4A16 "
                                f"folders")
    skipped = sorted({name.rsplit(".", 1)[0] for name, value in description.items()
                      if name.endswith(".weight") and value == "FLOAT" and "norm" not in name and "embed" not in name
                      and not name.startswith("lm_head") and not name.endswith(("mlp.gate.weight", "kv_b_proj.weight"))})
    return parse_quantization_config({"weight_dtype": dtypes[kind], "group_size": int(description.get("group_size", 0)),
                                      "modules_to_not_convert": skipped}, where=path)


def folder_settings(folder: str) -> Optional[QuantSettings]:
    """The quantization of a Hugging Face-layout folder, or None for float weights (neither config.json's
    quantization_config nor a description file). QuantizationError when the two disagree."""
    config_path = os.path.join(folder, "config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    from_config = parse_quantization_config(config.get("quantization_config"), where=f"{config_path}: "
                                                                                      f"quantization_config")
    description_path = os.path.join(folder, DESCRIPTION_NAME)
    from_description = _from_description(_read_json(description_path), description_path) \
        if os.path.isfile(description_path) else None
    if from_config and from_description and (from_config.weight_dtype, from_config.group_size) != \
            (from_description.weight_dtype, from_description.group_size):
        raise QuantizationError(f"{folder}: config.json's quantization_config ({from_config.model_quant_type}, "
                                f"group_size {from_config.group_size}) and {DESCRIPTION_NAME} "
                                f"({from_description.model_quant_type}, group_size {from_description.group_size}) "
                                f"disagree")
    return from_config or from_description


def describe_mismatch(settings: Optional[QuantSettings]) -> str:
    if settings is None:
        return "float weights (no quantization_config)"
    text = f"{settings.weight_dtype}, group_size {settings.group_size}"
    if settings.modules_to_not_convert:
        text += f", modules_to_not_convert {list(settings.modules_to_not_convert)}"
    return text


def check_agrees(run: Optional[QuantSettings], held: Optional[QuantSettings], checkpoint: str):
    """QuantizationError naming both when the run's model_config.quantization_config and the checkpoint's
    quantization differ (a quantized folder under a float YAML, the reverse, or other settings)."""
    def key(s):
        return None if s is None else (s.weight_dtype, s.group_size, frozenset(s.modules_to_not_convert))

    if key(run) != key(held):
        raise QuantizationError(f"{checkpoint} holds {describe_mismatch(held)}, but "
                                f"model.model_config.quantization_config says {describe_mismatch(run)}: make the "
                                f"YAML's quantization_config what the checkpoint's config.json says (or load the "
                                f"checkpoint that was quantized so)")
