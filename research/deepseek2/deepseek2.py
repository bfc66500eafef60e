"""DeepSeek-V2 for causal language modelling, a MindFormers model (``generate`` comes from its GenerationMixin):
the decoder layer (MLA + dense FFN or DeepSeekMoE), the stack, and the language-model head.

Inputs follow MindFormers: in training ``input_ids`` (and optional ``labels``) hold seq_length + 1 tokens per row and
the model shifts them itself; the result is the scalar loss (cross-entropy over labels != -100, plus the MoE balance
losses). In inference the result is the float32 logits (batch, seq, vocab) of every position.

The constructor builds the model and nothing else: no checkpoint is read and no parallel context is consulted.
Callers load weights (``checkpoints.load_checkpoint``) and lay the model out (``planning.layout``: pipeline stages
and recompute with ``place_layers``, semi-auto strategies with ``apply_semi_auto``); a process that holds part of the
model (hand-written inference tensor parallel, token groups of the capacity dispatch) says so with a ``LocalShape``
(``planning.inventory.local_shape``).
"""

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor
from mindspore.common import dtype as mstype
from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

from research.deepseek2.checkpoints.mf_hooks import HFCheckpointHooks
from research.deepseek2.deepseek2_config import DeepseekV2Config
from research.deepseek2.layers import RMSNorm, Linear, Embedding, FeedForward
from research.deepseek2.mla import MLAttention
from research.deepseek2.moe import DeepSeekMoE
from research.deepseek2.planning.chunks import prefill_chunks
from research.deepseek2.planning.inventory import LocalShape
from research.deepseek2.quantization.cells import FLOAT, QuantPlan
from research.deepseek2.rope import RotaryEmbedding

__all__ = ["DecoderLayer", "DeepseekV2Model", "DeepseekV2ForCausalLM"]


def _argmax(logits, axis=-1):
    """Greedy choice for MindFormers' generate (its default, mint.argmax, has no CPU kernel).

    Logits already on the host (numpy: a decode step's on CPU, see ``DeepseekV2ForCausalLM._incremental_infer``)
    take numpy's argmax; a Tensor takes MindSpore's Argmax, which has a CPU kernel. Ties go to the first index
    either way (as in torch). Returns int32 indices as a Tensor, which generate reads with ``asnumpy``.
    """
    if isinstance(logits, np.ndarray):
        return Tensor.from_numpy(np.argmax(logits, axis).astype(np.int32))
    return ops.Argmax(axis=axis, output_type=mstype.int32)(logits)


class DecoderLayer(nn.Cell):
    """Pre-norm block: h = x + MLA(norm(x)); y = h + FFN(norm(h)), FFN dense or DeepSeekMoE."""

    def __init__(self, config, layer_idx: int, local: LocalShape = LocalShape(), quant: QuantPlan = FLOAT):
        """quant: which weights are held quantized (the model's QuantPlan)."""
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        quant = quant.scoped(f"model.layers.{layer_idx}.")
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.param_init_type)
        self.attention = MLAttention(config, local.tp, quant.scoped("attention."))
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.param_init_type)
        ffn_quant = quant.scoped("feed_forward.")
        if self.is_moe:
            self.feed_forward = DeepSeekMoE(config, local, ffn_quant)
        else:
            self.feed_forward = FeedForward(config.hidden_size, config.intermediate_size, config.compute_dtype,
                                            config.param_init_type, config.init_std, local.tp, quant=ffn_quant)

    def construct(self, x, cos, sin, slots=None, hidden=None, keys=None):
        """x (b, s, h) -> (b, s, h), this layer's balance loss (0 for dense layers and in inference); cos, sin,
        slots, hidden, keys as ``MLAttention.construct`` takes them."""
        h = x + self.attention(self.attention_norm(x), cos, sin, slots, hidden, keys)
        if self.is_moe:
            ffn, aux = self.feed_forward(self.ffn_norm(h))
        else:
            ffn, aux = self.feed_forward(self.ffn_norm(h)), ops.zeros((), mstype.float32)
        return h + ffn, aux


class DeepseekV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV2Config
    base_model_prefix = "deepseekv2"


class DeepseekV2Model(nn.Cell):
    """Embedding, the decoder stack and the final norm: tokens (b, s) -> hidden (b, s, h), balance loss."""

    def __init__(self, config: DeepseekV2Config, local: LocalShape = LocalShape()):
        super().__init__()
        self.config = config
        quant = QuantPlan.for_config(config)
        self.use_past = config.use_past
        self.is_first_iteration = True
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size, config.param_init_type,
                                        config.init_std)
        self.layers = nn.CellList([DecoderLayer(config, i, local, quant) for i in range(config.num_hidden_layers)])
        self.norm_out = RMSNorm(config.hidden_size, config.rms_norm_eps, config.param_init_type)
        self.rotary = RotaryEmbedding(config, max(config.seq_length, 1))

    def cache_positions(self, b: int, s: int, batch_valid_length, keys: int):
        """A decode step (s = 1) or a prefill chunk: the s tokens of each row end at batch_valid_length (b,).
        Returns their positions (b, s) int32, their cache rows (b*s,) int32 (sequence * seq_length + position, the
        layout of ``MLAttention.kv_cache``) and which of the first ``keys`` cache slots each may not see,
        (b, s, keys) bool (those after its position); computed once for all layers. The attention reads those
        ``keys`` slots of the cache: all seq_length of them, or those up to a prefill chunk's end (``prefill_chunks``;
        then ``keys`` is the graph's dynamic dimension)."""
        positions = ops.expand_dims(batch_valid_length, 1) - s + ops.arange(s, dtype=mstype.int32)     # (b, s)
        first = ops.expand_dims(ops.arange(b, dtype=mstype.int32) * self.config.seq_length, 1)         # (b, 1)
        slots = ops.reshape(first + positions, (-1,))                                                  # (b*s,)
        steps = ops.arange(keys, dtype=mstype.int32)
        hidden = ops.expand_dims(ops.expand_dims(steps, 0), 0) > ops.expand_dims(positions, -1)       # (b, s, keys)
        return positions, slots, hidden

    def construct(self, tokens, batch_valid_length=None, key_slots=None):
        """tokens (b, s); with use_past after the first iteration, batch_valid_length (b,) where each row's s tokens
        end, and key_slots: None (attend over all seq_length cache slots) or a tensor whose length (a dynamic
        dimension in ``prefill_in_chunks``'s graph) is how many leading cache slots to attend over, all the tokens'
        positions among them."""
        b, s = tokens.shape
        x = ops.cast(self.tok_embeddings(tokens), self.config.compute_dtype)               # (b, s, h)
        slots, hidden, keys = None, None, None
        if self.use_past and not self.is_first_iteration:
            keys = None if key_slots is None else key_slots.shape[0]        # a dynamic dimension for prefill chunks
            positions, slots, hidden = self.cache_positions(b, s, batch_valid_length,
                                                            self.config.seq_length if keys is None else keys)
            cos, sin = self.rotary(s, positions)                                           # (b, 1, s, rope)
        else:
            cos, sin = self.rotary(s)                                                      # (s, rope)
        aux = ops.zeros((), mstype.float32)
        for layer in self.layers:
            x, layer_aux = layer(x, cos, sin, slots, hidden, keys)
            aux = aux + layer_aux
        return self.norm_out(x), aux


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class DeepseekV2ForCausalLM(HFCheckpointHooks, DeepseekV2PreTrainedModel):
    """DeepSeek-V2 / DeepSeek-V2-Lite with an untied (or tied) lm_head.

    MindFormers' checkpoint-name hooks (convert_name, convert_weight_dict, convert_map_dict, obtain_name_map) come
    from ``checkpoints.mf_hooks.HFCheckpointHooks``, read from ``checkpoints.weight_map.NAME_MAP``."""

    def __init__(self, config: DeepseekV2Config = None, local: LocalShape = None):
        """config: the model; local: what this process holds of it (default: all of it, see inventory.LocalShape)."""
        config = config if config is not None else DeepseekV2Config()
        super().__init__(config, auto_prefix=True)
        self.config = config
        self.local = local if local is not None else LocalShape()
        self.use_past = config.use_past
        self.is_first_iteration = True
        self.ignore_token_id = config.ignore_token_id
        self.pad_token_id = config.pad_token_id
        self.model = DeepseekV2Model(config, self.local)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, compute_dtype=config.compute_dtype,
                              param_init_type=config.param_init_type, init_std=config.init_std)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.tok_embeddings.embedding_weight
        # training returns (loss, balance loss) instead of the loss alone when a train-step wrapper that logs the
        # balance loss asks for it (``add_flags_recursive(return_moe_loss=True)``; see train_wrapper.py)
        self.return_moe_loss = False
        self.argmax = _argmax
        self._host_logits = False              # set by generate: decode logits handed to its loop as numpy (CPU)

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
        self._host_logits = ms.get_context("device_target") == "CPU"
        if self._host_logits:
            # MindFormers' latency timer synchronises device streams, which CPU lacks (it logs an ERROR line)
            self.detailed_latency.predict_run_mode = False
        return super().generate(input_ids, *args, **kwargs)

    def _incremental_infer(self, model_inputs: dict, prefill, current_index, key_cache=None, value_cache=None,
                           need_flatten=False):
        """MindFormers' model call inside generate. With use_past and prefill_chunk_size set, a prompt longer than
        the chunk is prefilled chunk after chunk (``prefill_in_chunks``); everything else is MindFormers' own."""
        chunk = self.config.prefill_chunk_size
        ids = model_inputs["input_ids"]
        if prefill and chunk and self.use_past and not need_flatten and key_cache is None \
                and len(ids.shape) == 2 and ids.shape[-1] > chunk:
            return self.prefill_in_chunks(ids, model_inputs["batch_valid_length"], chunk)
        logits = super()._incremental_infer(model_inputs, prefill, current_index, key_cache, value_cache,
                                            need_flatten)
        if not prefill and self._host_logits:
            # a decode step's (b, 1, vocab) logits go to generate's postprocess as numpy (its reshape and ``_argmax``
            # then run in numpy): a MindSpore op launched on the graph's output first waits for the graph executor,
            # which on CPU costs more a token than copying b * vocab floats out (docs/profile.md, decode step)
            return logits.asnumpy()
        return logits

    def prefill_in_chunks(self, input_ids, valid_length, chunk: int):
        """Prefill the latent caches chunk by chunk, each chunk attending to the cache written so far.

        input_ids (b, seq_length) right-padded, valid_length (b,) prompt lengths. Every call takes chunk tokens and
        attends over the cache's slots up to the chunk's end (``prefill_chunks``). All calls run one compiled graph
        (phase "chunk"), whose key axis is a dynamic dimension (the length of zactivate_len): on CPU each compiled
        graph keeps memory of its own, so one graph per key length would hold that memory once per length
        (docs/benchmarks.md, long context). The attention's largest
        buffer is (b, heads of a block, chunk, seq_length) at most, whatever the prompt length. Returns
        (b, seq_length, vocab) float32 logits in which only each row's last prompt position is filled: all generate
        reads of a prefill.
        """
        ids = input_ids.asnumpy() if isinstance(input_ids, Tensor) else np.asarray(input_ids)
        valid = np.asarray(valid_length, np.int64).reshape(-1)
        b, seq = ids.shape
        logits = None
        self.add_flags_custom(is_first_iteration=False)                   # the cached branch, chunk rows at once
        self.phase = f"chunk_{self._pre_set_phase}" if self._pre_set_phase else "chunk"
        declared = self.get_inputs()
        self.set_inputs(zactivate_len=Tensor(shape=[None], dtype=mstype.int32))     # one graph for every key length
        try:
            for start, end in prefill_chunks(int(valid.max()), chunk, seq):
                out = self(input_ids=Tensor(np.ascontiguousarray(ids[:, start:end]), mstype.int32),
                           batch_valid_length=Tensor(np.full((b,), end, np.int32)),
                           zactivate_len=Tensor(np.zeros((end,), np.int32))).asnumpy()    # (b, chunk, vocab)
                if logits is None:
                    logits = np.zeros((b, seq, out.shape[-1]), np.float32)     # untouched rows take no memory
                for row in range(b):
                    last = int(valid[row]) - 1
                    if start <= last < end:
                        logits[row, last] = out[row, last - start]
        finally:
            self._dynamic_shape_inputs = declared      # decode steps stay static (set_inputs cannot set None back)
        self.phase = "increment"
        return Tensor.from_numpy(logits)

    def set_train(self, mode=True):
        if mode and self.local.tp > 1:
            raise ValueError(f"this model holds 1/{self.local.tp} of the weights (hand-written tensor parallel), which "
                             f"is for inference; train with data parallel (or semi-auto parallel on Ascend)")
        return super().set_train(mode)

    def kv_cache_parameters(self):
        """The per-layer latent caches (use_past only): (batch * seq_length, kv_lora_rank + qk_rope_head_dim), row
        sequence * seq_length + position."""
        return [layer.attention.kv_cache for layer in self.model.layers] if self.use_past else []

    def construct(self, input_ids, labels=None, input_position=None, position_ids=None, attention_mask=None,
                  input_embeds=None, init_reset=None, batch_valid_length=None, batch_index=None,
                  zactivate_len=None, block_tables=None, slot_mapping=None):
        """Training: loss. Inference: logits (b, s, vocab) float32.

        zactivate_len (MindFormers' "active length" input, its shape read, not its values): a decode step or
        prefill chunk attends over the cache's first len(zactivate_len) slots instead of all seq_length; the
        tokens' positions must lie among them (``prefill_in_chunks`` passes it)."""
        if self.training:
            tokens = input_ids[:, :-1]                                                     # (b, S)
            targets = input_ids[:, 1:] if labels is None else labels[:, 1:]
        else:
            tokens = input_ids
        if batch_valid_length is not None:
            batch_valid_length = ops.reshape(ops.cast(batch_valid_length, mstype.int32), (-1,))
        hidden, aux = self.model(tokens, batch_valid_length, zactivate_len)
        logits = ops.cast(self.lm_head(hidden), mstype.float32)                            # (b, S, vocab)
        if not self.training:
            return logits
        loss = self.loss(logits, targets, labels is None, tokens) + aux
        if self.return_moe_loss:
            return loss, aux
        return loss

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
