"""DeepSeek-V2 configuration.

Accepts the released ``config.json`` field names as they are (DeepSeek-V2, DeepSeek-V2-Lite, -Chat), plus the
MindFormers knobs (``seq_length``, ``batch_size``, ``use_past`` ...) and the training-only MoE knobs of the paper
(arXiv 2405.04434 section 2.2: the three balance losses and device-level token dropping).
Every field has a default so ``DeepseekV2Config(**json.load(open("config.json")))`` just works.
"""
import math
from typing import Optional

from mindformers.models.configuration_utils import PretrainedConfig
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

from research.deepseek2 import dtypes
from research.deepseek2.planning.inventory import is_moe_layer
from research.deepseek2.quantization.settings import parse_quantization_config
from research.deepseek2.rope import yarn_get_mscale

__all__ = ["DeepseekV2Config", "yarn_get_mscale"]

# keys of a released (or transformers-written) config.json that carry no fact this model reads: (key, why). They are
# dropped and named once in a warning, as MindFormers' own configs do (models/model_config_utils.py)
_IGNORED_KEYS = (
    ("architectures", "names the PyTorch class"), ("auto_map", "names the PyTorch code"),
    ("transformers_version", "bookkeeping"), ("_name_or_path", "bookkeeping"), ("model_type", "bookkeeping"),
    ("torch_dtype", "the weights take param_init_type; a checkpoint's dtype is cast on load"),
    ("dtype", "the weights take param_init_type; a checkpoint's dtype is cast on load"),
    ("use_cache", "the latent KV cache is use_past"), ("head_dim", "derived: qk_nope_head_dim + qk_rope_head_dim"),
    ("pretraining_tp", "a Llama tensor-parallel emulation the DeepSeek-V2 code does not use"),
    ("ep_size", "expert parallel is parallel_config.expert_parallel"),
    ("_attn_implementation", "the attention is this model's own"), ("attn_implementation", "the attention is this "
                                                                                           "model's own"),
    ("return_dict", "the model returns logits (or the loss) as a tensor"),
    ("quantize", "MindIE's name of the scheme; quantization_config holds it"))
# keys that would change the model if they had another value: accepted at the released one, refused otherwise
_FIXED_KEYS = {"mlp_bias": False, "num_nextn_predict_layers": 0, "output_attentions": False,
               "output_hidden_states": False}
_PRINTED_IGNORED = set()
_TOPK_METHODS = ("greedy", "group_limited_greedy")
_ROPE_TYPES = ("yarn", "linear", "default")
_MOE_DISPATCH = ("dropless", "capacity")


def _dtype(name, field):
    """A MindSpore dtype from any spelling of dtypes.py; ValueError naming the field otherwise."""
    return dtypes.to_mindspore(name, f"DeepseekV2Config.{field}")


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class DeepseekV2Config(PretrainedConfig):
    """DeepSeek-V2 model configuration (released field names, MindFormers knobs beside them)."""

    model_type = "deepseek_v2"

    def __init__(self,
                 # --- released config.json fields (DeepSeek-V2 236B values in comments) ---
                 vocab_size: int = 102400,
                 hidden_size: int = 4096,                 # 5120
                 intermediate_size: int = 11008,          # 12288 (dense layers)
                 moe_intermediate_size: int = 1407,       # 1536
                 num_hidden_layers: int = 30,             # 60
                 num_attention_heads: int = 32,           # 128
                 num_key_value_heads: Optional[int] = None,
                 n_shared_experts: Optional[int] = None,  # 2
                 n_routed_experts: Optional[int] = None,  # 160
                 routed_scaling_factor: float = 1.0,      # 16.0
                 kv_lora_rank: int = 512,
                 q_lora_rank: Optional[int] = 1536,       # null for V2-Lite
                 qk_rope_head_dim: int = 64,
                 v_head_dim: int = 128,
                 qk_nope_head_dim: int = 128,
                 topk_method: str = "greedy",             # group_limited_greedy
                 n_group: Optional[int] = None,           # 8
                 topk_group: Optional[int] = None,        # 3
                 num_experts_per_tok: Optional[int] = None,  # 6
                 moe_layer_freq: int = 1,
                 first_k_dense_replace: int = 0,          # 1
                 norm_topk_prob: bool = False,
                 scoring_func: str = "softmax",
                 aux_loss_alpha: float = 0.001,           # alpha_1, expert-level balance (0.003 in the paper)
                 seq_aux: bool = True,                    # balance losses per sequence (False: over the batch)
                 hidden_act: str = "silu",
                 max_position_embeddings: int = 2048,
                 rms_norm_eps: float = 1e-6,
                 tie_word_embeddings: bool = False,
                 rope_theta: float = 10000.0,
                 rope_scaling: Optional[dict] = None,
                 attention_bias: bool = False,
                 attention_dropout: float = 0.0,          # the released models' value; another one is refused
                 initializer_range: Optional[float] = None,   # the released name of init_std
                 bos_token_id: int = 100000,
                 eos_token_id: int = 100001,
                 pad_token_id: Optional[int] = None,
                 # --- MindFormers knobs ---
                 seq_length: int = 4096,
                 batch_size: int = 1,
                 use_past: bool = False,
                 is_dynamic: bool = False,
                 block_size: int = 16,
                 num_blocks: Optional[int] = None,
                 max_decode_length: Optional[int] = None,
                 compute_dtype: str = "float32",
                 param_init_type: str = "float32",
                 softmax_compute_type: str = "float32",
                 layernorm_compute_type: str = "float32",  # RMSNorm statistics: float32, as the released model
                 ignore_token_id: int = -100,
                 use_flash_attention: bool = False,       # training/prefill attention by the fused Ascend kernel
                 attention_chunk_size: int = 1024,        # query rows attended at once (basic-op path); 0 = all
                 prefill_chunk_size: int = 0,             # use_past generate: prompt tokens per prefill call; 0 = all
                 # --- DeepSeekMoE training knobs (paper section 2.2.2 - 2.2.4) ---
                 device_aux_loss_alpha: float = 0.0,      # alpha_2, device-level balance (0.05 in the paper)
                 comm_aux_loss_alpha: float = 0.0,        # alpha_3, communication balance (0.02 in the paper)
                 moe_num_devices: Optional[int] = None,   # D: expert groups/devices for alpha_2, alpha_3, dropping
                 capacity_factor: float = 0.0,            # device-level token dropping; 0 = dropless (default)
                 never_drop_seq_ratio: float = 0.0,       # share of training sequences exempt from dropping (0.1)
                 moe_block_size: Optional[int] = None,    # rows per expert block in the dropless dispatch
                 moe_dispatch: str = "dropless",          # "capacity": static per-expert buffers (expert parallel)
                 expert_capacity_factor: float = 0.0,     # capacity dispatch: rows per expert = f * tokens*k / E
                 init_std: Optional[float] = None,        # weights' N(0, init_std); default initializer_range or 0.02
                 # --- weight-only quantization (quantization/settings.py) ---
                 quantization_config: Optional[dict] = None,  # int8/int4 projections; null: float weights
                 use_weight_quant_kernel: bool = False,   # quantized matmuls by the device's fused kernel
                 **kwargs):
        ignored = [(key, why) for key, why in _IGNORED_KEYS if kwargs.pop(key, None) is not None]
        if ignored and tuple(ignored) not in _PRINTED_IGNORED:
            _PRINTED_IGNORED.add(tuple(ignored))
            logger.warning("DeepseekV2Config ignores " + "; ".join(f"{key} ({why})" for key, why in ignored))
        for key, released in _FIXED_KEYS.items():
            value = kwargs.pop(key, released)
            if value != released and not (released is False and value is None):
                raise ValueError(f"DeepseekV2Config.{key} = {value!r}: this model supports only {released!r} (the "
                                 f"released DeepSeek-V2 models' value)")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=eos_token_id if pad_token_id is None else pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = bool(norm_topk_prob)
        self.scoring_func = scoring_func
        self.aux_loss_alpha = float(aux_loss_alpha)
        self.seq_aux = bool(seq_aux)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = float(rms_norm_eps)
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.rope_theta = float(rope_theta)
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        self.attention_bias = bool(attention_bias)
        self.attention_dropout = float(attention_dropout)

        self.seq_length = seq_length
        self.batch_size = batch_size
        self.use_past = bool(use_past)
        self.is_dynamic = bool(is_dynamic)
        self.block_size = block_size
        # the block manager of MindFormers' generate needs room for every sequence of the batch
        self.num_blocks = num_blocks if num_blocks else max(1, batch_size * math.ceil(seq_length / block_size))
        self.max_decode_length = max_decode_length if max_decode_length else seq_length
        self.compute_dtype = _dtype(compute_dtype, "compute_dtype")
        self.param_init_type = _dtype(param_init_type, "param_init_type")
        self.softmax_compute_type = _dtype(softmax_compute_type, "softmax_compute_type")
        self.layernorm_compute_type = _dtype(layernorm_compute_type, "layernorm_compute_type")
        self.ignore_token_id = ignore_token_id
        self.use_flash_attention = use_flash_attention
        self.attention_chunk_size = attention_chunk_size
        self.prefill_chunk_size = prefill_chunk_size

        self.device_aux_loss_alpha = float(device_aux_loss_alpha)
        self.comm_aux_loss_alpha = float(comm_aux_loss_alpha)
        self.moe_num_devices = moe_num_devices if moe_num_devices else (n_group if n_group else 1)
        self.capacity_factor = float(capacity_factor)
        self.never_drop_seq_ratio = float(never_drop_seq_ratio)
        self.moe_block_size = moe_block_size
        self.moe_dispatch = moe_dispatch
        self.expert_capacity_factor = float(expert_capacity_factor)
        self.init_std = float(init_std if init_std is not None else
                              initializer_range if initializer_range is not None else 0.02)
        settings = parse_quantization_config(quantization_config, where="DeepseekV2Config.quantization_config")
        self.quantization_config = settings.to_dict() if settings else None   # after PretrainedConfig's own
        self.use_weight_quant_kernel = use_weight_quant_kernel
        self._validate()

    # ------------------------------------------------------------------ derived facts
    @property
    def q_head_dim(self) -> int:
        """Per-head query/key width: no-position part + decoupled RoPE part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(q_head_dim), times yarn_get_mscale(factor, mscale_all_dim)^2 under YaRN (released code)."""
        scale = self.q_head_dim ** -0.5
        if self.rope_scaling and self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                mscale = yarn_get_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale = scale * mscale * mscale
        return scale

    @property
    def cache_width(self) -> int:
        """Numbers cached per token and layer by MLA: latent c_kv plus the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def weight_quantization(self):
        """The checked quantization_config (``quantization.settings.QuantSettings``), or None: float weights."""
        return parse_quantization_config(self.quantization_config)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Released rule: MoE from first_k_dense_replace on, every moe_layer_freq-th layer."""
        return is_moe_layer(self, layer_idx)

    # ------------------------------------------------------------------ checks
    def _validate(self):
        def fail(field, expected):
            raise ValueError(f"DeepseekV2Config.{field} = {getattr(self, field)!r}: {expected}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                      "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "seq_length", "batch_size",
                      "block_size", "moe_layer_freq"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(field, "expected a positive integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail("q_lora_rank", "expected a positive integer or null (full-rank query, as DeepSeek-V2-Lite)")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "expected an even number (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"expected a divisor of num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.use_flash_attention, bool):
            fail("use_flash_attention", "expected True or False")
        if not isinstance(self.use_weight_quant_kernel, bool):
            fail("use_weight_quant_kernel", "expected True or False")
        if self.use_weight_quant_kernel and not self.quantization_config:
            fail("use_weight_quant_kernel", "the fused kernel multiplies quantized weights: set "
                                            "model.model_config.quantization_config too, or leave it False")
        if self.use_flash_attention and self.v_head_dim > self.q_head_dim:
            fail("use_flash_attention", f"the fused kernel pads v_head_dim={self.v_head_dim} up to the query/key "
                                        f"head dim {self.q_head_dim}, which must not be smaller")
        if self.hidden_act != "silu":
            fail("hidden_act", "expected 'silu' (SwiGLU)")
        if self.attention_dropout != 0.0:
            fail("attention_dropout", "expected 0.0: the attention has no dropout (the released models train "
                                      "without it, and the fused and basic-op paths must agree)")
        if dtypes.name_of(self.layernorm_compute_type) != "float32":
            fail("layernorm_compute_type", "expected float32: RMSNorm computes its statistics in float32, as the "
                                           "released model does")
        if self.scoring_func != "softmax":
            fail("scoring_func", "expected 'softmax' (DeepSeek-V2's gate)")
        if self.topk_method not in _TOPK_METHODS:
            fail("topk_method", f"expected one of {_TOPK_METHODS}")
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(f"DeepseekV2Config.rope_scaling.type = {self.rope_type!r}: expected one of {_ROPE_TYPES}")
        if self.rope_scaling and self.rope_type in ("yarn", "linear") and "factor" not in self.rope_scaling:
            raise ValueError("DeepseekV2Config.rope_scaling: 'factor' is required for yarn and linear scaling")
        if self.n_routed_experts is not None:
            if not isinstance(self.n_routed_experts, int) or self.n_routed_experts <= 0:
                fail("n_routed_experts", "expected a positive integer or null (dense model)")
            k = self.num_experts_per_tok
            if not isinstance(k, int) or not 0 < k <= self.n_routed_experts:
                fail("num_experts_per_tok", f"expected an integer in [1, n_routed_experts={self.n_routed_experts}]")
            if self.topk_method == "group_limited_greedy":
                if not isinstance(self.n_group, int) or self.n_group <= 0:
                    fail("n_group", "expected a positive integer with topk_method 'group_limited_greedy'")
                if self.n_routed_experts % self.n_group:
                    fail("n_group", f"n_routed_experts={self.n_routed_experts} is not divisible by it")
                if not isinstance(self.topk_group, int) or not 0 < self.topk_group <= self.n_group:
                    fail("topk_group", f"expected an integer in [1, n_group={self.n_group}]")
                if self.topk_group * (self.n_routed_experts // self.n_group) < k:
                    fail("topk_group", f"topk_group groups hold fewer experts than num_experts_per_tok={k}")
            if self.n_routed_experts % self.moe_num_devices:
                fail("moe_num_devices", f"n_routed_experts={self.n_routed_experts} is not divisible by it")
        if isinstance(self.attention_chunk_size, bool) or not isinstance(self.attention_chunk_size, int) \
                or self.attention_chunk_size < 0:
            fail("attention_chunk_size", "expected an integer >= 0: the query rows the training/prefill attention "
                                         "computes at once (0: the whole sequence)")
        if isinstance(self.prefill_chunk_size, bool) or not isinstance(self.prefill_chunk_size, int) \
                or not 0 <= self.prefill_chunk_size <= self.seq_length:
            fail("prefill_chunk_size", f"expected an integer in [0, seq_length={self.seq_length}]: the prompt tokens "
                                       f"each prefill call of a use_past generate takes (0: the whole prompt at once)")
        if self.capacity_factor < 0:
            fail("capacity_factor", "expected >= 0 (0 turns token dropping off)")
        if not 0.0 <= self.never_drop_seq_ratio <= 1.0:
            fail("never_drop_seq_ratio", "expected a share in [0, 1] (0.1 in the paper: about 10% of the training "
                                         "sequences are never dropped)")
        if self.moe_dispatch not in _MOE_DISPATCH:
            fail("moe_dispatch", f"expected one of {_MOE_DISPATCH} ('capacity' is the expert-parallel layout of "
                                 f"semi-auto/auto parallel training)")
        if self.expert_capacity_factor < 0:
            fail("expert_capacity_factor", "expected >= 0 (0 = every expert can take every token: nothing dropped)")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self):
        output = super().to_dict()
        for key in ("compute_dtype", "param_init_type", "softmax_compute_type", "layernorm_compute_type"):
            output[key] = dtypes.name_of(getattr(self, key))
        return output

    def to_hf_dict(self) -> dict:
        """The released config.json fields, for the reverse conversion (HF safetensors + config.json)."""
        keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts",
                "routed_scaling_factor", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim",
                "qk_nope_head_dim", "topk_method", "n_group", "topk_group", "num_experts_per_tok", "moe_layer_freq",
                "first_k_dense_replace", "norm_topk_prob", "scoring_func", "aux_loss_alpha", "seq_aux",
                "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_theta",
                "rope_scaling", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id",
                "pad_token_id")
        out = {key: getattr(self, key) for key in keys}
        out.update({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                    "torch_dtype": "bfloat16", "initializer_range": self.init_std})
        if self.quantization_config:
            out["quantization_config"] = dict(self.quantization_config)
        return out
