"""LoRA checkpoints: what a LoRA run's checkpoint holds, and how predict and ``convert_weight.py`` read it.

A LoRA finetune (``model.model_config.pet_config``) saves, per rank and step, one checkpoint holding every base
weight (frozen, unchanged), the adapters (``<projection>.mindpet_delta_lora_a`` / ``_b``) and the AdamW moments of
the adapters only: resuming reads all of it; predicting needs the weights and the adapters.

- ``adapter_targets``: {weight name: (A name, B name)} for a config and pet_config (from the inventory).
- ``check_lora_checkpoint``: a checkpoint holds every base weight and every adapter of the pet_config, with its shape.
- ``read_adapters``: the adapter tensors of a checkpoint, checked first.
- ``load_merged``: predict: a plain (use_past) model loaded with W + lora_alpha / lora_rank * B A, in one pass
  over the checkpoint.
- ``merge_one``: one weight merged with its adapters (``convert_weight.py --reverse`` streams weight by weight).
- ``write_peft``: the adapters alone in the PEFT layout (``adapter_model.safetensors`` + ``adapter_config.json``,
  Hugging Face names, one pair per routed expert), for ``convert_weight.py --reverse --adapters_only``.
"""
import json
import os
from typing import Dict, Tuple

import numpy as np
from mindformers.tools.logger import logger

from research.deepseek2.checkpoints.check import check_checkpoint
from research.deepseek2.checkpoints import open_checkpoint
from research.deepseek2.checkpoints.load import load_checkpoint
from research.deepseek2.checkpoints.weight_map import is_stacked, ms_to_hf
from research.deepseek2.errors import CheckpointError
from research.deepseek2.lora.config import (adapter_names_of, expected_adapter_shapes, merge_state, parse_pet_config,
                                            projection_of)
from research.deepseek2.planning.inventory import expected_shapes

__all__ = ["adapter_targets", "check_lora_checkpoint", "read_adapters", "load_merged", "merge_one", "write_peft"]


def adapter_targets(config, pet_config) -> Dict[str, Tuple[str, str]]:
    """{weight name: (A name, B name)} of every weight the pet_config targets."""
    names = set(expected_adapter_shapes(config, pet_config))
    out = {}
    for weight in expected_shapes(config):
        projection = projection_of(weight)
        if projection is not None:
            pair = adapter_names_of(projection)
            if pair[0] in names:
                out[weight] = pair
    return out


def check_lora_checkpoint(checkpoint, config, pet_config):
    """Check from the headers that an opened checkpoint holds every base weight and every adapter of ``pet_config``
    with its shape (``CheckpointError`` naming the tensors otherwise, or when it holds no adapters at all); returns
    {adapter name: shape}."""
    expected = expected_adapter_shapes(config, pet_config)
    if not check_checkpoint(config, checkpoint, adapters=expected):
        raise CheckpointError(f"{checkpoint.path} holds no LoRA adapters (*.mindpet_delta_lora_a/b) but "
                              f"model_config.pet_config is set: give a LoRA training output, or remove pet_config "
                              f"to use the base model")
    return expected


def read_adapters(checkpoint, config, pet_config) -> Dict[str, np.ndarray]:
    """{adapter name: array} of a LoRA checkpoint (a path or an opened MindSpore checkpoint), checked first
    (``check_lora_checkpoint``)."""
    checkpoint = open_checkpoint(checkpoint)
    expected = check_lora_checkpoint(checkpoint, config, pet_config)
    return {name: np.array(array) for _, name, array in checkpoint.iter_parameters(progress=False)
            if name in expected}


def merge_one(name: str, weight: np.ndarray, adapters: Dict[str, np.ndarray], targets, pet_config) -> np.ndarray:
    """``weight`` merged with its adapters when the pet_config targets it, else as given."""
    if name not in targets:
        return weight
    a_name, b_name = targets[name]
    return merge_state({name: weight}, {a_name: adapters[a_name], b_name: adapters[b_name]}, pet_config)[name]


def load_merged(net, checkpoint, pet_config):
    """Load a LoRA checkpoint (a path or an opened checkpoint) into a plain ``net`` (any use_past): base weights and
    adapters in one pass, then W + alpha / r * B A for every targeted weight. Returns the names of the merged
    weights."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    checkpoint = open_checkpoint(checkpoint)
    expected = check_lora_checkpoint(checkpoint, net.config, pet_config)
    _, adapters = load_checkpoint(net, checkpoint, keep=expected)
    targets = adapter_targets(net.config, pet_config)
    params = {p.name: p for p in net.get_parameters()}
    for name in targets:
        param = params[name]
        merged = merge_one(name, param.asnumpy(), adapters, targets, pet_config)
        param.set_data(ms.Tensor(merged, dtype=param.dtype))
    logger.info(f"LoRA: {len(targets)} weights merged with their adapters (scaling "
                f"{parse_pet_config(pet_config).scaling:g}) from {checkpoint.path}")
    return sorted(targets)


def _peft_name(hf_weight: str, which: str) -> str:
    """PEFT's name of an adapter: base_model.model.<module>.lora_A.weight for the HF weight <module>.weight."""
    return f"base_model.model.{hf_weight[:-len('.weight')]}.lora_{which}.weight"


def write_peft(out_dir: str, adapters: Dict[str, np.ndarray], config, pet_config) -> Dict[str, Tuple[int, ...]]:
    """The adapters alone, as PEFT keeps them: ``adapter_model.safetensors`` (lora_A (r, in), lora_B (out, r) per
    Hugging Face module; a routed expert's stacked pair split per expert) and ``adapter_config.json``.
    Returns {PEFT name: shape}. Written to a staged folder, renamed at the end."""
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    from research.deepseek2.checkpoints.arrays import cast_array  # pylint: disable=import-outside-toplevel
    from research.deepseek2.fileio import StagedDir  # pylint: disable=import-outside-toplevel
    settings = parse_pet_config(pet_config)
    tensors, modules = {}, set()
    for weight, (a_name, b_name) in adapter_targets(config, pet_config).items():
        a, b = adapters[a_name], adapters[b_name]
        rows = range(a.shape[0]) if is_stacked(weight) else [None]
        for expert in rows:
            hf = ms_to_hf(weight, expert)
            modules.add(hf.rsplit(".", 2)[-2])
            pick = (lambda x, e=expert: x[e]) if expert is not None else (lambda x: x)
            tensors[_peft_name(hf, "A")] = np.ascontiguousarray(cast_array(pick(a), np.float32))
            tensors[_peft_name(hf, "B")] = np.ascontiguousarray(cast_array(pick(b), np.float32))
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.lora_rank,
                   "lora_alpha": settings.lora_alpha, "lora_dropout": settings.lora_dropout,
                   "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False,
                   "base_model_name_or_path": None, "inference_mode": True}
    stage = StagedDir(out_dir)
    try:
        save_file(tensors, stage.file("adapter_model.safetensors"), metadata={"format": "pt"})
        with open(stage.file("adapter_config.json"), "w", encoding="utf-8") as handle:
            json.dump(peft_config, handle, indent=2)
        stage.commit()
    except BaseException:
        stage.abort()
        raise
    logger.info(f"{len(tensors)} adapter tensors (PEFT layout) -> {os.path.join(out_dir, 'adapter_model.safetensors')}")
    return {name: tuple(array.shape) for name, array in tensors.items()}
