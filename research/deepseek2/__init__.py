"""DeepSeek-V2 (MLA + DeepSeekMoE) for MindSpore, registered in MindFormers.

Importing this package registers the config, model, tokenizer and CPU train-step wrapper with MindFormers'
registry, so YAML files can name them (``type: DeepseekV2ForCausalLM`` ...).
"""
from .deepseek2_config import DeepseekV2Config
from .deepseek2 import DeepseekV2ForCausalLM, DeepseekV2Model
from .train_wrapper import DeepseekV2TrainOneStepCell, LossGuard
from .deepseek2_tokenizer import DeepseekV2Tokenizer, build_chat_prompt

__all__ = ["DeepseekV2Config", "DeepseekV2ForCausalLM", "DeepseekV2Model", "DeepseekV2Tokenizer", "build_chat_prompt",
           "DeepseekV2TrainOneStepCell", "LossGuard"]
