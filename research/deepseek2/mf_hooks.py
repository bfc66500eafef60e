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

This project's own runs load checkpoints with ``checkpoint_io`` (streaming, every weight checked); these hooks serve
MindFormers' loader where it is the one that runs (semi-auto parallel on Ascend, users calling MindFormers' API).
"""
from typing import Dict, Iterable

import numpy as np

from research.deepseek2.errors import CheckpointError
from research.deepseek2.weight_map import hf_to_ms

__all__ = ["HFCheckpointHooks"]


def _ms_name(name: str) -> str:
    try:
        return hf_to_ms(name)[0]
    except KeyError:
        return name


class HFCheckpointHooks:
    """Mixin giving a model MindFormers' four checkpoint-name hooks (see the module docstring)."""

    @classmethod
    def convert_name(cls, weight_name: str) -> str:
        return _ms_name(weight_name)

    @classmethod
    def convert_weight_dict(cls, source_dict: Dict[str, object], **kwargs) -> Dict[str, object]:
        import mindspore as ms  # pylint: disable=import-outside-toplevel
        model_config = kwargs.get("model_config")
        target, experts = {}, {}
        for name, value in source_dict.items():
            try:
                ms_name, expert = hf_to_ms(name)
            except KeyError:
                ms_name, expert = name, None
            if expert is None:
                target[ms_name] = value
            else:
                experts.setdefault(ms_name, {})[expert] = value
        for ms_name, rows in experts.items():
            count = int(getattr(model_config, "n_routed_experts", None) or (max(rows) + 1)) \
                if model_config is not None else max(rows) + 1
            missing = [e for e in range(count) if e not in rows]
            if missing:
                raise CheckpointError(f"{ms_name}: experts {missing[:8]} of {count} are not among the tensors "
                                      f"given to convert_weight_dict (every expert of a layer must come together)")
            arrays = [rows[e].asnumpy() if hasattr(rows[e], "asnumpy") else np.asarray(rows[e])
                      for e in range(count)]
            dtype = rows[0].dtype if hasattr(rows[0], "asnumpy") else None
            tensor = ms.Tensor(np.stack(arrays)) if dtype is None else ms.Tensor(np.stack(arrays), dtype=dtype)
            target[ms_name] = ms.Parameter(tensor, name=ms_name)
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
