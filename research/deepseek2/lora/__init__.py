"""LoRA for DeepSeek-V2 through MindFormers' ``model.model_config.pet_config``:

- ``config.py``: the pet_config checked (``parse_pet_config``), which weights it targets, the adapters' names and
  shapes, the merge W + (alpha / r) B A. Plain Python (the memory planner reads it).
- ``cells.py``: adapters on a built network (``apply_lora``), freezing, the merged plain model.
- ``checkpoints.py``: LoRA checkpoints: the adapters of a training output, merged into a plain model for predict
  and ``convert_weight.py --reverse``, or exported in the PEFT layout.
"""
