"""DeepSeek-V2 (MLA + DeepSeekMoE) for MindSpore, registered in MindFormers.

The model is at the top, as upstream packages keep it: ``deepseek2_config.py``, ``deepseek2.py`` (decoder layer,
stack, causal LM), ``mla.py``, ``moe.py``, ``layers.py``, ``rope.py``, the tokenizer, and the upstream tools
``convert_weight.py`` and ``code_alpaca_preprocess.py``. The rest lives in subpackages named for what they hold:
``checkpoints/`` (reading, checking, loading, writing weights), ``planning/`` (the parameter inventory, counts,
memory plan and parallel checks, in plain Python), ``run/`` (what ``run_mindformer.py`` runs: training, predict,
evaluation, the CPU optimizer and barrier, the launcher's helpers) and ``lora/``.

Importing the package is light (no MindSpore): the planning tools run on a login node. The public names below load
their modules on first use, and ``register()`` imports every module that registers itself with MindFormers'
registry (config, model, tokenizer, train-step wrapper, callback, CPU optimizer) so a YAML can name them
(``type: DeepseekV2ForCausalLM`` ...); ``run_mindformer.py`` calls it.
"""
import importlib

__all__ = ["DeepseekV2Config", "DeepseekV2ForCausalLM", "DeepseekV2Model", "DeepseekV2Tokenizer", "build_chat_prompt",
           "DeepseekV2TrainOneStepCell", "LossGuard", "CpuAdamW", "register"]

_EXPORTS = {
    "DeepseekV2Config": "deepseek2_config",
    "DeepseekV2ForCausalLM": "deepseek2",
    "DeepseekV2Model": "deepseek2",
    "DeepseekV2Tokenizer": "deepseek2_tokenizer",
    "build_chat_prompt": "deepseek2_tokenizer",
    "DeepseekV2TrainOneStepCell": "run.train_step",
    "LossGuard": "run.train_step",
    "CpuAdamW": "run.optim",
}


def register():
    """Import the modules that register the config, model, tokenizer, wrapper, callback and optimizer in MindFormers."""
    for module in sorted(set(_EXPORTS.values())):
        importlib.import_module(f"{__name__}.{module}")


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
