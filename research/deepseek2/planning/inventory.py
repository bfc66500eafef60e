"""The parameter inventory of DeepSeek-V2: every weight's name, shape and how each parallel axis cuts it.

Written once, here, in plain Python (no MindSpore import: the memory planner and the parallel checks run on a
login node). Everything that needs to know the model's weights reads it:
  * checkpoints/weight_map (expected shapes of a checkpoint, both naming schemes),
  * the loaders and the completeness check (what must arrive, with which shape; what is a declared non-weight),
  * planning/counts and planning/memory (parameter counts by how they are cut),
  * planning/parallel_check, planning/layout and checkpoints/rank_slices (divisibility, semi-auto strategies,
    per-rank slices),
  * tests hold the built model against it (same names, same shapes).

The parallel axes: "mp" (tensor / model parallel: attention heads, FFN widths), "ep" (expert parallel: routed
experts), "vocab" (embedding and lm_head rows, only with ``vocab_emb_dp: False``). A ``Cut`` says which dimension an
axis cuts and along which units: ``l2q_proj.weight`` (heads * q_head_dim, q_lora_rank) is cut by "mp" on dimension 0
in units of heads, so num_attention_heads must be divisible by model_parallel.

``model_shape`` reads the fields from a ``DeepseekV2Config`` or from a YAML's ``model_config`` mapping (released
config.json names); shape fields it needs and cannot find are an error naming them.

With a ``quantization_config`` (``quantization/settings.py``) the projections are held quantized: each quantizable
weight (``Param.quantizable``) not in modules_to_not_convert becomes its int8 tensor (int4: two output channels a
byte) plus ``<name>_scale`` (..., n, k / group_size) float32, cut as the weight is (a per-channel scale is whole on
every rank of a weight cut along its inputs: each rank's partial sum takes the same scale).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

__all__ = ["Cut", "Param", "ModelShape", "LocalShape", "model_shape", "is_moe_layer", "parameters", "layer_parameters",
           "quantization_settings", "quantized", "buffers", "expected_shapes", "held_dtypes", "parts", "local_shape",
           "local_param_shape", "inference_split_dim", "divisibility_problems"]


@dataclass(frozen=True)
class Cut:
    """Parallel axis ``axis`` cuts dimension ``dim`` into equal parts along ``units`` units (named by ``field``)."""
    axis: str
    dim: int
    units: int
    field: str


@dataclass(frozen=True)
class Param:
    """One weight of the model: MindSpore name, full shape, the cuts of the parallel axes; ``quantizable``: a
    projection a quantization_config may hold in int8/int4; ``dtype``: None for the model's float dtype (the
    param_init_type), or the dtype a quantized model holds it in ("int8", "float32" for its scales)."""
    name: str
    shape: Tuple[int, ...]
    cuts: Tuple[Cut, ...] = ()
    quantizable: bool = False
    dtype: Optional[str] = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def cut(self, axis: str) -> Optional[Cut]:
        return next((c for c in self.cuts if c.axis == axis), None)


@dataclass(frozen=True)
class ModelShape:
    """The config fields that decide the weights (released config.json names)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    n_routed_experts: Optional[int] = None
    n_shared_experts: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def shared_width(self) -> int:
        return (self.n_shared_experts or 0) * (self.moe_intermediate_size or 0)


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def model_shape(config) -> ModelShape:
    """ModelShape of a DeepseekV2Config (attributes) or a model_config mapping (keys)."""
    if isinstance(config, ModelShape):
        return config
    get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
    values = {}
    for name in ModelShape.__dataclass_fields__:
        value = get(name, None)
        if value is None:
            if name in _REQUIRED:
                raise ValueError(f"model_config.{name} is missing: expected an integer")
            continue
        values[name] = value
    for name in _REQUIRED:
        if not isinstance(values[name], int) or isinstance(values[name], bool):
            raise ValueError(f"model_config.{name} = {values[name]!r}: expected an integer")
    return ModelShape(**values)


def is_moe_layer(config, layer: int) -> bool:
    """Released rule: MoE from first_k_dense_replace on, every moe_layer_freq-th layer."""
    s = model_shape(config)
    return s.n_routed_experts is not None and layer >= s.first_k_dense_replace and layer % s.moe_layer_freq == 0


# ---------------------------------------------------------------------------------------------- the inventory
def layer_parameters(config, layer: int) -> List[Param]:
    """The weights of decoder layer ``layer``."""
    s = model_shape(config)
    h, n = s.hidden_size, s.num_attention_heads

    def heads(dim):                                                           # split on head boundaries
        return Cut("mp", dim, n, "num_attention_heads")

    p = f"model.layers.{layer}."
    out = [Param(p + "attention_norm.weight", (h,)), Param(p + "ffn_norm.weight", (h,))]
    a = p + "attention."
    if s.q_lora_rank is None:                                                 # W^Q (V2-Lite)
        out.append(Param(a + "q_proj.weight", (n * s.q_head_dim, h), (heads(0),), True))
    else:                                                                     # W^DQ, norm, W^UQ + W^QR
        out.append(Param(a + "q2l_proj.weight", (s.q_lora_rank, h), (), True))
        if s.attention_bias:
            out.append(Param(a + "q2l_proj.bias", (s.q_lora_rank,)))
        out.append(Param(a + "lq_norm.weight", (s.q_lora_rank,)))
        out.append(Param(a + "l2q_proj.weight", (n * s.q_head_dim, s.q_lora_rank), (heads(0),), True))
    out.append(Param(a + "kv2l.weight", (s.kv_lora_rank + s.qk_rope_head_dim, h), (), True))   # W^DKV + W^KR
    if s.attention_bias:
        out.append(Param(a + "kv2l.bias", (s.kv_lora_rank + s.qk_rope_head_dim,)))
    out.append(Param(a + "lkv_norm.weight", (s.kv_lora_rank,)))
    # W^UKV stays float under quantization (as msModelSlim's DeepSeek-V2 recipe keeps kv_b_proj): the latent-cache
    # decode absorbs it into the query and the output, two per-head products a quantized matmul does not cover
    out.append(Param(a + "lkv2kv.weight", (n * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank), (heads(0),)))
    out.append(Param(a + "wo.weight", (h, n * s.v_head_dim), (heads(1),), True))
    if s.attention_bias:
        out.append(Param(a + "wo.bias", (h,)))
    f = p + "feed_forward."
    if is_moe_layer(s, layer):
        e, fm = s.n_routed_experts, s.moe_intermediate_size
        experts = Cut("ep", 0, e, "n_routed_experts")
        out.append(Param(f + "router.weight", (e, h)))
        out.append(Param(f + "routed_experts.w1", (e, fm, h), (experts, Cut("mp", 1, fm, "moe_intermediate_size")),
                         True))
        out.append(Param(f + "routed_experts.w3", (e, fm, h), (experts, Cut("mp", 1, fm, "moe_intermediate_size")),
                         True))
        out.append(Param(f + "routed_experts.w2", (e, h, fm), (experts, Cut("mp", 2, fm, "moe_intermediate_size")),
                         True))
        if s.n_shared_experts:
            width, why = s.shared_width, "n_shared_experts x moe_intermediate_size"
            out.append(Param(f + "shared_experts.w1.weight", (width, h), (Cut("mp", 0, width, why),), True))
            out.append(Param(f + "shared_experts.w3.weight", (width, h), (Cut("mp", 0, width, why),), True))
            out.append(Param(f + "shared_experts.w2.weight", (h, width), (Cut("mp", 1, width, why),), True))
    else:
        i = s.intermediate_size
        out.append(Param(f + "w1.weight", (i, h), (Cut("mp", 0, i, "intermediate_size"),), True))
        out.append(Param(f + "w3.weight", (i, h), (Cut("mp", 0, i, "intermediate_size"),), True))
        out.append(Param(f + "w2.weight", (h, i), (Cut("mp", 1, i, "intermediate_size"),), True))
    return out


def quantization_settings(config):
    """The checked quantization_config of a config (attribute) or model_config mapping (key), or None."""
    from research.deepseek2.quantization.settings import parse_quantization_config
    get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
    return parse_quantization_config(get("quantization_config", None))


def quantized(param: Param, settings) -> List[Param]:
    """``param`` as a quantized model holds it (see the module docstring): [weight, scale], or [param] when it is
    not quantizable or modules_to_not_convert names it."""
    from research.deepseek2.checkpoints.names import ms_to_hf
    from research.deepseek2.quantization.settings import scale_shape, stored_shape
    stacked = len(param.shape) == 3
    if not settings or not param.quantizable or settings.skips(param.name, ms_to_hf(param.name, 0 if stacked else None)):
        return [param]
    last = len(param.shape) - 1
    grouped = bool(settings.group_size)
    scale_cuts = tuple(c for c in param.cuts if c.dim != last or grouped)
    return [Param(param.name, stored_shape(param.shape, settings, param.name), param.cuts, True, "int8"),
            Param(param.name + "_scale", scale_shape(param.shape, settings, param.name), scale_cuts, False,
                  "float32")]


def parameters(config) -> Iterator[Param]:
    """Every weight of DeepseekV2ForCausalLM for ``config``, in model order (quantized ones with their scales)."""
    s = model_shape(config)
    settings = quantization_settings(config)
    vocab = (Cut("vocab", 0, s.vocab_size, "vocab_size"),)
    yield Param("model.tok_embeddings.embedding_weight", (s.vocab_size, s.hidden_size), vocab)
    for layer in range(s.num_hidden_layers):
        for param in layer_parameters(s, layer):
            yield from quantized(param, settings)
    yield Param("model.norm_out.weight", (s.hidden_size,))
    if not s.tie_word_embeddings:
        yield Param("lm_head.weight", (s.vocab_size, s.hidden_size), vocab)


def buffers(config) -> Dict[str, str]:
    """Declared non-weights the model holds as Parameters: {name: why}. Never loaded from or saved to a checkpoint.
    The latent KV cache exists only with ``use_past``."""
    get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
    if not get("use_past", False):
        return {}
    return {f"model.layers.{i}.attention.kv_cache": "latent KV cache (inference state)"
            for i in range(model_shape(config).num_hidden_layers)}


def expected_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """{MindSpore name: full shape} of every weight."""
    return {p.name: p.shape for p in parameters(config)}


def held_dtypes(config) -> Dict[str, str]:
    """{MindSpore name: dtype} of the weights a quantized model holds in a dtype of their own (int8 weights,
    float32 scales); the others take the model's float param_init_type."""
    return {p.name: p.dtype for p in parameters(config) if p.dtype}


# ---------------------------------------------------------------------------------------------- parallel layout
def parts(param: Param, sizes: Mapping[str, int]) -> Tuple[int, ...]:
    """How many parts each dimension of ``param`` is cut into for ``sizes`` ({axis: degree}); missing axes = 1."""
    out = [1] * len(param.shape)
    for cut in param.cuts:
        out[cut.dim] *= int(sizes.get(cut.axis, 1))
    return tuple(out)


def divisibility_problems(config, sizes: Mapping[str, int]) -> List[str]:
    """One message per (field, axis) whose units do not divide into the axis' parts, naming the tensors."""
    found: Dict[Tuple[str, str], List[str]] = {}
    units: Dict[Tuple[str, str], int] = {}
    for param in parameters(config):
        for cut in param.cuts:
            degree = int(sizes.get(cut.axis, 1))
            if degree > 1 and cut.units % degree:
                key = (cut.field, cut.axis)
                units[key] = cut.units
                found.setdefault(key, []).append(param.name)
    messages = []
    for (why, axis), names in found.items():
        example = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
        messages.append(f"model_config.{why} = {units[(why, axis)]} is not divisible by the {axis} degree "
                        f"{sizes[axis]} (it cuts {example})")
    if not messages:                 # the units divide; a quantized tensor's rows (int4 pairs, scale groups) too?
        for param in parameters(config):
            for cut in param.cuts:
                degree = int(sizes.get(cut.axis, 1))
                if degree > 1 and param.shape[cut.dim] % degree:
                    messages.append(f"{param.name} (quantized, {param.shape}): its dimension {cut.dim} of "
                                    f"{param.shape[cut.dim]} does not split into the {axis_name(cut.axis)} degree "
                                    f"{degree} (int4 pairs of output channels or scale groups would be cut)")
    return messages


def axis_name(axis: str) -> str:
    return {"mp": "model parallel", "ep": "expert parallel", "vocab": "vocabulary"}.get(axis, axis)


@dataclass(frozen=True)
class LocalShape:
    """What one model instance holds and computes with; the plan's answer for one process.

    tp: ranks of the hand-written inference tensor/expert parallel: each holds num_attention_heads / tp heads,
        FFN widths / tp and n_routed_experts / tp routed experts, and sums partial results across the ranks.
    first_expert: global index of the first routed expert held (tp > 1 only).
    token_groups: token groups of the capacity dispatch and of device-level token dropping (data_parallel under
        semi-auto/auto parallel training; 1 otherwise).
    """
    tp: int = 1
    first_expert: int = 0
    token_groups: int = 1
    problems: Tuple[str, ...] = field(default=(), compare=False)


def inference_split_dim(param: Param) -> Optional[int]:
    """The dimension the hand-written inference split cuts: the first "ep" cut (routed experts by count, not also by
    width), else the first "mp" cut; the vocabulary stays whole. None = replicated."""
    cut = param.cut("ep") or param.cut("mp")
    return cut.dim if cut else None


def local_param_shape(param: Param, tp: int) -> Tuple[int, ...]:
    """Shape of ``param`` on one of ``tp`` inference ranks."""
    dim = inference_split_dim(param)
    if dim is None or tp == 1:
        return param.shape
    return param.shape[:dim] + (param.shape[dim] // tp,) + param.shape[dim + 1:]


def local_shape(config, tp: int = 1, rank: int = 0, token_groups: int = 1) -> LocalShape:
    """LocalShape of inference rank ``rank`` of ``tp``; ValueError naming the fields that do not split."""
    if tp < 1 or not 0 <= rank < tp:
        raise ValueError(f"tensor-parallel rank {rank} of {tp}: expected 0 <= rank < tp")
    s = model_shape(config)
    problems = divisibility_problems(s, {"mp": tp, "ep": tp})
    if problems:
        raise ValueError("; ".join(problems))
    experts = s.n_routed_experts or 0
    return LocalShape(tp=tp, first_expert=rank * (experts // tp), token_groups=token_groups)
