"""MindFormers' checkpoint-name hooks for DeepseekV2ForCausalLM, read from the one name table (``weight_map``).

MindFormers 1.9 looks for these four methods on a model to load a Hugging Face safetensors folder directly
(``mindformers/utils/load_checkpoint_utils.py``, ``mindformers/utils/safetensors/``):

- ``convert_name(name)``: an HF tensor name -> this model's parameter name; any other name (already MindSpore,
  optimizer state ``adam_m.*``) comes back unchanged, which is how MindFormers tells an HF folder from a MindSpore
  one (``is_hf_safetensors_dir``). A routed expert's name maps to its stacked parameter.
- ``convert_weight_dict(source_dict, model_config=...)``: {HF name: tensor} -> {parameter name: Parameter}, each
  layer's routed experts stacked to (E, out, in). Every expert of a layer must be in the dict (MindFormers hands it
  all the files of a folder at once in its single-process path).
- ``convert_map_dict(weight_map)``: an HF index's {tensor: file} -> {parameter: file} (a stacked parameter names
  the file of its expert 0).
- ``obtain_name_map(files)``: {parameter name: HF name} for ``ms.load_distributed_checkpoint(name_map=...)``.
  A name map renames one tensor to one parameter; a stacked expert parameter is made of E tensors, which it cannot
  express, so a folder holding routed experts is refused here naming the tensor (convert it first:
  ``convert_weight.py --torch_ckpt_path HF_DIR --mindspore_ckpt_path OUT_DIR/``).

This project's own runs load checkpoints with ``checkpoints.load`` (streaming, every weight checked); these hooks serve
MindFormers' loader where it is the one that runs (semi-auto parallel on Ascend, users calling MindFormers' API).
"""
from typing import Dict, Iterable

import numpy as np

from research.deepseek2.checkpoints.weight_map import hf_state_to_ms, hf_to_ms
from research.deepseek2.errors import CheckpointError

__all__ = ["HFCheckpointHooks"]


def _ms_name(name: str) -> str:
    try:
        return hf_to_ms(name)[0]
    except KeyError:
        return name


def _is_expert(name: str) -> bool:
    try:
        return hf_to_ms(name)[1] is not None
    except KeyError:
        return False


class HFCheckpointHooks:
    """Mixin giving a model MindFormers' four checkpoint-name hooks (see the module docstring)."""

    @classmethod
    def convert_name(cls, weight_name: str) -> str:
        return _ms_name(weight_name)

    @classmethod
    def convert_weight_dict(cls, source_dict: Dict[str, object], **kwargs) -> Dict[str, object]:
        import mindspore as ms  # pylint: disable=import-outside-toplevel
        model_config = kwargs.get("model_config")

        def stack(rows):                                   # Parameters/Tensors or arrays, the first row's dtype kept
            arrays = np.stack([row.asnumpy() if hasattr(row, "asnumpy") else np.asarray(row) for row in rows])
            return ms.Tensor(arrays, dtype=rows[0].dtype) if hasattr(rows[0], "asnumpy") else ms.Tensor(arrays)

        stacked = {name for name in source_dict if _is_expert(name)}
        target = hf_state_to_ms(source_dict, getattr(model_config, "n_routed_experts", None), keep_unknown=True,
                                stack=stack)
        for name in {_ms_name(n) for n in stacked}:
            target[name] = ms.Parameter(target[name], name=name)
        return target

    @classmethod
    def convert_map_dict(cls, source_dict: Dict[str, str], **kwargs) -> Dict[str, str]:
        target = {}
        for name, file in source_dict.items():
            try:
                ms_name, expert = hf_to_ms(name)
            except KeyError:
                ms_name, expert = name, None
            if expert in (None, 0) or ms_name not in target:
                target[ms_name] = file
        return target

    @classmethod
    def obtain_name_map(cls, load_checkpoint_files: Iterable[str]) -> Dict[str, str]:
        from safetensors import safe_open  # pylint: disable=import-outside-toplevel
        name_map = {}
        for file in load_checkpoint_files:
            with safe_open(file, framework="np") as handle:
                for name in handle.keys():
                    try:
                        ms_name, expert = hf_to_ms(name)
                    except KeyError:
                        ms_name, expert = name, None
                    if expert is not None:
                        raise CheckpointError(
                            f"{file}: tensor {name!r} is one routed expert of the stacked parameter {ms_name!r}, "
                            f"which a name map cannot build; convert the folder first (convert_weight.py "
                            f"--torch_ckpt_path HF_DIR --mindspore_ckpt_path OUT_DIR/) and load OUT_DIR")
                    name_map[ms_name] = name
        return name_map
