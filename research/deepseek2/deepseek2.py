"""DeepSeek-V2 for causal language modelling, a MindFormers model (``generate`` comes from its GenerationMixin).

Inputs follow MindFormers: in training ``input_ids`` (and optional ``labels``) hold seq_length + 1 tokens per row and
the model shifts them itself; the result is the scalar loss (cross-entropy over labels != -100, plus the MoE balance
losses). In inference the result is the float32 logits (batch, seq, vocab) of every position.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common import dtype as mstype
from mindspore.common.initializer import initializer
from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

from .deepseek2_config import DeepseekV2Config
from .deepseek2_layer import RMSNorm, Linear, Embedding, RotaryEmbedding
from .deepseek2_transformer import DecoderLayer

__all__ = ["DeepseekV2Model", "DeepseekV2ForCausalLM"]


def _argmax(logits, axis=-1):
    """Greedy choice with an op that has a CPU kernel (MindFormers' default mint.argmax has none)."""
    return ops.Argmax(axis=axis, output_type=mstype.int32)(logits)


class DeepseekV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV2Config
    base_model_prefix = "deepseekv2"


class DeepseekV2Model(nn.Cell):
    """Embedding, the decoder stack and the final norm: tokens (b, s) -> hidden (b, s, h), balance loss."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.config = config
        self.use_past = config.use_past
        self.is_first_iteration = True
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size, config.param_init_type,
                                        config.init_std)
        self.layers = nn.CellList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm_out = RMSNorm(config.hidden_size, config.rms_norm_eps, config.param_init_type)
        self.rotary = RotaryEmbedding(config, max(config.seq_length, 1))
        self.pipeline_stages = self._place_layers(config)
        self.causal = Tensor(np.triu(np.ones((config.seq_length, config.seq_length), np.bool_), 1))

    def _place_layers(self, config):
        """Pipeline stage, recompute and gradient fusion of each layer from the YAML's parallel_config and
        recompute_config, through MindFormers' LayerSetting (the rule its own models use). Returns the stage of
        every layer. A plain config (no parallel_config object) leaves the layers as they are: stage 0."""
        pc = config.parallel_config
        if not (hasattr(pc, "pipeline_stage") and hasattr(pc, "recompute")):
            return [0] * len(self.layers)
        from mindformers.parallel_core.training_graph.transformer.utils import LayerSetting
        setting = LayerSetting(config.num_hidden_layers, getattr(config, "offset", 0) or 0, pc)
        for layer_id, layer in enumerate(self.layers):
            setting(layer, layer_id)
        stages = [int(getattr(layer, "pipeline_stage", 0)) for layer in self.layers]
        if pc.pipeline_stage > 1:
            self.tok_embeddings.pipeline_stage = 0
            self.norm_out.pipeline_stage = pc.pipeline_stage - 1
        return stages

    def construct(self, tokens, batch_valid_length=None):
        b, s = tokens.shape
        x = ops.cast(self.tok_embeddings(tokens), self.config.compute_dtype)               # (b, s, h)
        if self.use_past and not self.is_first_iteration:
            cos, sin = self.rotary(s, batch_valid_length - 1)                              # (b, 1, 1, rope)
            mask = None
        else:
            cos, sin = self.rotary(s)                                                      # (s, rope)
            mask = self.causal[:s, :s]                                                     # (s, s) True = hidden
        aux = ops.zeros((), mstype.float32)
        for layer in self.layers:
            x, layer_aux = layer(x, cos, sin, mask, batch_valid_length)
            aux = aux + layer_aux
        return self.norm_out(x), aux


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class DeepseekV2ForCausalLM(DeepseekV2PreTrainedModel):
    """DeepSeek-V2 / DeepSeek-V2-Lite with an untied (or tied) lm_head."""
    LAYOUT = {"lm_head.weight": ("vocab", None)}            # vocabulary rows split only with vocab_emb_dp: False

    def __init__(self, config: DeepseekV2Config = None):
        config = config if config is not None else DeepseekV2Config()
        super().__init__(config, auto_prefix=True)
        self.config = config
        self.use_past = config.use_past
        self.is_first_iteration = True
        self.ignore_token_id = config.ignore_token_id
        self.pad_token_id = config.pad_token_id
        self.model = DeepseekV2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, compute_dtype=config.compute_dtype,
                              param_init_type=config.param_init_type, init_std=config.init_std)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.tok_embeddings.embedding_weight
        stages = getattr(config.parallel_config, "pipeline_stage", 1)
        if stages > 1:
            self.lm_head.pipeline_stage = stages - 1
        # the balance loss of the last training step, readable by callbacks (graph mode cannot return side values)
        self.last_aux_loss = Parameter(initializer("zeros", (), mstype.float32), name="last_aux_loss",
                                       requires_grad=False)
        self.argmax = _argmax
        if config.tp_size == 1 and \
                ms.get_auto_parallel_context("parallel_mode") in ("semi_auto_parallel", "auto_parallel"):
            from .parallel import apply_semi_auto, parallel_sizes   # Ascend training: declared layouts
            apply_semi_auto(self, parallel_sizes(config.parallel_config))
        if config.checkpoint_name_or_path:
            from .checkpoint_io import load_ms_checkpoint
            load_ms_checkpoint(self, config.checkpoint_name_or_path)

    # MindFormers' GenerationMixin sets is_first_iteration on every cell through this hook
    def add_flags_custom(self, is_first_iteration):
        self.add_flags_recursive(is_first_iteration=is_first_iteration)

    def generate(self, input_ids, *args, **kwargs):
        """MindFormers' generate; each batch size gets graphs of its own (prefill_b{n}, increment_b{n}).

        MindSpore generalises a graph phase that sees a second input shape to dynamic shape, which the static cache
        slicing does not support; naming the phase by batch size keeps every compiled graph static.
        """
        try:
            rows = int(np.reshape(np.asarray(input_ids), (-1, np.shape(input_ids)[-1])).shape[0])
        except ValueError:
            rows = None                                                      # ragged: the base class explains
        if rows is not None:
            self._set_network_phase(f"b{rows}")
        if ms.get_context("device_target") == "CPU":
            # MindFormers' latency timer synchronises device streams, which CPU lacks (it logs an ERROR line)
            self.detailed_latency.predict_run_mode = False
        return super().generate(input_ids, *args, **kwargs)

    def set_train(self, mode=True):
        if mode and self.config.tp_size > 1:
            raise ValueError(f"DeepseekV2Config.tp_size = {self.config.tp_size}: the hand-written tensor parallel "
                             f"is for inference; train with data parallel (or semi-auto parallel on Ascend)")
        return super().set_train(mode)

    def kv_cache_parameters(self):
        """The per-layer latent caches (use_past only): (batch, seq_length, kv_lora_rank + qk_rope_head_dim)."""
        return [layer.attention.kv_cache for layer in self.model.layers] if self.use_past else []

    def construct(self, input_ids, labels=None, input_position=None, position_ids=None, attention_mask=None,
                  input_embeds=None, init_reset=None, batch_valid_length=None, batch_index=None,
                  zactivate_len=None, block_tables=None, slot_mapping=None):
        """Training: loss. Inference: logits (b, s, vocab) float32."""
        if self.training:
            tokens = input_ids[:, :-1]                                                     # (b, S)
            targets = input_ids[:, 1:] if labels is None else labels[:, 1:]
        else:
            tokens = input_ids
        if batch_valid_length is not None:
            batch_valid_length = ops.reshape(ops.cast(batch_valid_length, mstype.int32), (-1,))
        hidden, aux = self.model(tokens, batch_valid_length)
        logits = ops.cast(self.lm_head(hidden), mstype.float32)                            # (b, S, vocab)
        if not self.training:
            return logits
        return self.loss(logits, targets, labels is None, tokens) + ops.depend(aux, ops.assign(self.last_aux_loss,
                                                                                               aux))

    def loss(self, logits, targets, from_inputs, tokens):
        """Mean cross-entropy over kept positions: labels != ignore_token_id (and input != pad without labels)."""
        vocab = logits.shape[-1]
        logits = ops.reshape(logits, (-1, vocab))
        targets = ops.reshape(ops.cast(targets, mstype.int32), (-1,))
        keep = ops.not_equal(targets, self.ignore_token_id)
        if from_inputs:
            keep = ops.logical_and(keep, ops.not_equal(ops.reshape(tokens, (-1,)), self.pad_token_id))
        keep = ops.cast(keep, mstype.float32)
        safe = ops.cast(ops.select(keep > 0, targets, ops.zeros_like(targets)), mstype.int32)
        log_probs = ops.log_softmax(logits, -1)
        picked = ops.squeeze(ops.gather_elements(log_probs, 1, ops.expand_dims(safe, 1)), 1)
        return -ops.reduce_sum(picked * keep) / ops.maximum(ops.reduce_sum(keep), 1.0)
