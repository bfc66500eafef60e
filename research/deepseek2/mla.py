"""Multi-head Latent Attention (MLA), arXiv 2405.04434 section 2.1. Per token t with hidden h_t:
    c_t^Q  = W^DQ h_t                      (q2l_proj, then lq_norm)      -- or q = W^Q h_t when q_lora_rank is null
    [q^C; q^R] = W^UQ c_t^Q                 (l2q_proj)                  per head: nope part + rope part
    [c_t^KV; k^R] = W^DKV h_t               (kv2l, c^KV through lkv_norm) one latent and one RoPE key for all heads
    [k^C; v^C] = W^UKV c_t^KV              (lkv2kv)                    per head
    o = softmax((q^C k^C + RoPE(q^R) RoPE(k^R)) * scale) v^C, then wo

Incremental decoding keeps only [c^KV | RoPE(k^R)] per token and layer (kv_lora_rank + qk_rope_head_dim numbers)
and absorbs the up-projections: q^C is projected into the latent space through the key half of W^UKV, attention
runs against the latent cache as a single shared head, and the value half of W^UKV is applied after attention.

Training/prefill attention from basic ops runs in chunks of ``attention_chunk_size`` query rows (default 1024): a
chunk of queries [start, stop) attends to the keys [0, stop) only, so no (b, n, s, s) buffer exists for the whole
prompt (the largest is (b, n, chunk, s)) and the causally hidden upper blocks are never computed. The values are the
unchunked ones: a hidden key adds an exact 0 to its row's softmax. Against the cache (a prefill chunk of p tokens),
the heads go in blocks of about ``attention_chunk_size`` (head, token) rows: the largest buffer is (b, heads of a
block, p, K) for K cache slots, not (b, n, p, K).

``use_flash_attention`` (default False) sends the training/prefill attention to MindSpore's fused Ascend kernel
(``fused_attention`` below): no (b, n, s, s) scores or probabilities are stored. The decode step is unchanged.
"""
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common import dtype as mstype
from mindspore.common.initializer import initializer

from research.deepseek2.layers import RMSNorm, Linear, TensorParallelAllReduce, linear
from research.deepseek2.planning.chunks import chunk_bounds, head_blocks
from research.deepseek2.quantization import cpu_kernel
from research.deepseek2.quantization.cells import FLOAT
from research.deepseek2.rope import apply_rotary

__all__ = ["MLAttention", "causal_mask", "fused_attention", "check_fused_attention", "FLASH_ATTENTION_SCORE"]

# The fused attention kernel (Ascend only), read by ``fused_attention`` when a graph is built or a PyNative call
# runs: the tests replace this reference with a stand-in written from basic ops that keeps the same contract.
FLASH_ATTENTION_SCORE = ops.flash_attention_score
_ASCEND_KERNEL = ops.flash_attention_score
_KERNEL_DTYPES = (mstype.float16, mstype.bfloat16)


def check_fused_attention(compute_dtype, device_target=None):
    """Refuse ``use_flash_attention: True`` where the Ascend kernel cannot run (no silent fallback): a device other
    than Ascend (RuntimeError), or a compute_dtype the kernel does not take (ValueError; it takes float16/bfloat16).
    A replaced ``FLASH_ATTENTION_SCORE`` (the tests' basic-op stand-in) is not checked. ``device_target``: the
    context's by default (the only context the model's constructor reads, and only with the switch on)."""
    if FLASH_ATTENTION_SCORE is not _ASCEND_KERNEL:
        return
    target = device_target if device_target is not None else ms.get_context("device_target")
    if target != "Ascend":
        raise RuntimeError(f"DeepseekV2Config.use_flash_attention = True needs an Ascend device: "
                           f"mindspore.ops.flash_attention_score (the fused attention kernel) runs only on Ascend, "
                           f"and device_target is {target!r}. Set model.model_config.use_flash_attention: False "
                           f"to run the attention from basic ops on this device.")
    if compute_dtype not in _KERNEL_DTYPES:
        raise ValueError(f"DeepseekV2Config.use_flash_attention = True needs compute_dtype bfloat16 or float16 "
                         f"(the inputs the fused attention kernel takes); compute_dtype is {compute_dtype}")


def causal_mask(q_start: int, q_stop: int, k_stop: int):
    """(q_stop - q_start, k_stop) bool, True = hidden: the keys after each query's position (static sizes)."""
    queries = ops.expand_dims(ops.arange(q_start, q_stop, dtype=mstype.int32), 1)
    keys = ops.expand_dims(ops.arange(0, k_stop, dtype=mstype.int32), 0)
    return keys > queries


def fused_attention(query, key, value, mask, scale, num_heads):
    """softmax(query key^T * scale, positions where mask is True hidden) value, by the fused kernel.

    Contract (the one call of ``FLASH_ATTENTION_SCORE``; a stand-in must keep it):
      query, key  (b, n, s, dq)  layout "BNSD", dq = qk_nope_head_dim + qk_rope_head_dim, one dtype
      value       (b, n, s, dv)  dv <= dq; zero-padded to (b, n, s, dq) before the call (the kernel takes one head
                                 dim for q, k and v); the zero columns give zero output columns, sliced off after
      mask        (s, s) bool, True = hidden (``causal_mask``); passed as the uint8 attn_mask, 1 = masked
                  out, with sparse_mode 0 (the whole (S1, S2) mask is applied as given)
      scale       python float, the softmax scale with YaRN's mscale^2 (config.softmax_scale): scalar_value
      num_heads   n, the heads this cell holds: head_num
      keep_prob   1.0: no attention dropout (the basic-op path has none either)
    Returns (b, n, s, dv), layout BNSD, the dtype of query: what the basic-op path returns.
    """
    dq, dv = query.shape[-1], value.shape[-1]
    if dv < dq:
        value = ops.pad(value, (0, dq - dv))                                            # (b, n, s, dq)
    out = FLASH_ATTENTION_SCORE(query, key, value, num_heads, attn_mask=ops.cast(mask, mstype.uint8),
                                keep_prob=1.0, scalar_value=scale, input_layout="BNSD", sparse_mode=0)
    return out[..., :dv] if dv < dq else out                                            # (b, n, s, dv)


class SoftmaxAttention(nn.Cell):
    """softmax(query key^T, mask True hidden) value, with its backward written out: query (..., q, d) already
    scaled, key (..., k, d), value (..., k, v), mask bool broadcastable to (..., q, k) -> (..., q, v). The expanded
    form calls it with (b, n, .) batches; the form against the latent cache with (b,) batches, q = (head, token)
    rows and key = value = the cache.

    The backward recomputes the probabilities P from query and key (no (..., q, k) tensor is kept from the forward)
    and takes the softmax's row term from the output, sum_j dP_ij P_ij = sum_j (dO_i . V_j) P_ij = dO_i . O_i
    (FlashAttention's D): dS = P * (dO V^T - D), the subtraction inside the BatchMatMul (dO and V widened by -D and
    a column of ones). MindSpore's own derivative of the masked softmax runs Mul, ReduceSum over k, Sub and Mul on
    (..., q, k) plus the masked fill's gradient; this one runs a Mul (docs/profile.md). Same values up to rounding;
    tests/test_parity.py holds the gradients to the reference's.
    """

    def __init__(self, softmax_dtype):
        super().__init__()
        self.softmax_dtype = softmax_dtype
        self.softmax = ops.Softmax(-1)           # primitives: a bprop cannot call their functional forms in graph mode
        self.row_sum = ops.ReduceSum(keep_dims=True)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.bmm_ta = ops.BatchMatMul(transpose_a=True)

    def probs(self, query, key, mask):
        """(..., q, k) in softmax_dtype."""
        scores = self.bmm_t(query, key)                                                    # (..., q, k)
        # an explicit broadcast: masked_fill's implicit one allocates a (b, n, q, k) temporary per layer on CPU
        scores = ops.masked_fill(scores, ops.broadcast_to(mask, scores.shape), Tensor(-1e30, scores.dtype))
        return self.softmax(ops.cast(scores, self.softmax_dtype))

    def construct(self, query, key, value, mask):
        return self.bmm(ops.cast(self.probs(query, key, mask), value.dtype), value)        # (..., q, v)

    def bprop(self, query, key, value, mask, out, dout):
        probs = self.probs(query, key, mask)                                               # (..., q, k) recomputed
        d_value = self.bmm_ta(ops.cast(probs, dout.dtype), dout)                           # (..., k, v)
        row = self.row_sum(ops.cast(dout, self.softmax_dtype) * ops.cast(out, self.softmax_dtype), -1)  # (..., q, 1)
        # dP - D in one BatchMatMul: [dO | -D] (..., q, v+1) x [V | 1]^T (..., v+1, k), not a broadcast Sub of the
        # (..., q, 1) row from (..., q, k), which on CPU costs more than the Mul of that size (docs/profile.md)
        d_out_row = ops.concat((dout, ops.cast(-row, dout.dtype)), -1)
        value_one = ops.concat((value, ops.ones(value.shape[:-1] + (1,), value.dtype)), -1)
        d_scores = ops.cast(probs * ops.cast(self.bmm_t(d_out_row, value_one), self.softmax_dtype),
                            query.dtype)                                                   # (..., q, k)
        return self.bmm(d_scores, key), self.bmm_ta(d_scores, query), d_value, ops.zeros_like(mask)


class MLAttention(nn.Cell):
    """Multi-head Latent Attention with the compressed (latent) KV cache."""

    def __init__(self, config, tp: int = 1, quant=FLOAT):
        """tp: hand-written inference tensor parallel; this instance holds num_attention_heads / tp heads and sums
        its partial output projection with the other ranks'. The latent projections and the cache stay whole.
        quant: the QuantPlan scoped to this cell (which projections are held quantized)."""
        super().__init__()
        self.n_heads = config.num_attention_heads // tp                  # the heads held
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.q_head_dim = config.q_head_dim
        self.scale = config.softmax_scale
        self.compute_dtype = config.compute_dtype
        self.softmax_dtype = config.softmax_compute_type
        self.use_past = config.use_past
        self.use_flash_attention = config.use_flash_attention
        self.chunk_size = config.attention_chunk_size
        if self.use_flash_attention:
            check_fused_attention(config.compute_dtype)
        self.is_first_iteration = True
        h, n = config.hidden_size, self.n_heads
        kw = dict(compute_dtype=config.compute_dtype, param_init_type=config.param_init_type,
                  init_std=config.init_std)
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = linear(h, n * self.q_head_dim, quant, "q_proj.weight", **kw)     # W^Q (V2-Lite)
        else:
            self.q2l_proj = linear(h, self.q_lora_rank, quant, "q2l_proj.weight", bias, **kw)   # W^DQ
            self.lq_norm = RMSNorm(self.q_lora_rank, config.rms_norm_eps, config.param_init_type)
            self.l2q_proj = linear(self.q_lora_rank, n * self.q_head_dim, quant, "l2q_proj.weight", **kw)  # W^UQ, QR
        self.kv2l = linear(h, self.kv_lora_rank + self.rope_dim, quant, "kv2l.weight", bias, **kw)  # W^DKV, W^KR
        self.lkv_norm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps, config.param_init_type)
        self.lkv2kv = Linear(self.kv_lora_rank, n * (self.nope_dim + self.v_dim), **kw)     # W^UK, W^UV (float)
        self.wo = linear(n * self.v_dim, h, quant, "wo.weight", bias, **kw)                # W^O
        self.tp_all_reduce = TensorParallelAllReduce(tp)        # heads of the other ranks
        if self.use_past:
            # the whole per-layer cache: [c^KV | RoPE(k^R)] per token, nothing per head; one row per (sequence,
            # position), row = sequence * seq_length + position: a decode step writes its rows in place
            # (ScatterUpdate on the first axis), where a scatter into (batch, seq_length, width) copies the whole
            # cache every step, a cost that grows with seq_length (docs/benchmarks.md)
            self.cache_shape = (config.batch_size, config.seq_length, config.cache_width)
            self.kv_cache = Parameter(initializer("zeros", (config.batch_size * config.seq_length,
                                                            config.cache_width), config.compute_dtype),
                                      name="kv_cache", requires_grad=False)
        self.attention = SoftmaxAttention(self.softmax_dtype)
        self.bmm = ops.BatchMatMul()
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        # a bfloat16 kv_b_proj on a CPU: the absorbed products read it in place (a cast would widen all of it, at
        # every decode step and layer: slower than the rest of the step's attention)
        self.latent_kernels = None
        if self.use_past and cpu_kernel.runs_bf16_weights(config.param_init_type):
            self.latent_kernels = (cpu_kernel.latent_query_op(), cpu_kernel.latent_value_op(self.v_dim))

    # ------------------------------------------------------------------ projections
    def _query(self, x):
        """x (b, s, h) -> q_nope (b, n, s, nope), q_pe (b, n, s, rope) (rope not yet applied)."""
        b, s, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.l2q_proj(self.lq_norm(self.q2l_proj(x)))
        q = ops.transpose(ops.reshape(q, (b, s, self.n_heads, self.q_head_dim)), (0, 2, 1, 3))
        q_nope, q_pe = ops.split(q, (self.nope_dim, self.rope_dim), -1)                    # one op, not two slices
        return q_nope, q_pe

    def _latent(self, x):
        """x (b, s, h) -> c_kv (b, s, kv_lora_rank) normalised, k_pe (b, s, rope) (rope not yet applied)."""
        ckv_kpe = self.kv2l(x)
        c_kv, k_pe = ops.split(ckv_kpe, (self.kv_lora_rank, self.rope_dim), -1)
        return self.lkv_norm(c_kv), k_pe

    # ------------------------------------------------------------------ attention forms
    def _expanded(self, q_nope, q_pe, c_kv, k_pe):
        """Training/prefill: expand the latent into per-head keys and values (compute-friendly).

        q_* (b, n, s, .), c_kv (b, s, r), k_pe (b, 1, s, rope) rotated. Causal: query i sees keys 0..i.
        Query rows go in chunks (``chunk_bounds``): rows [start, stop) against keys [0, stop).
        use_flash_attention: the same query, key and value go to the fused kernel (``fused_attention``).
        """
        b, _, s, _ = q_nope.shape
        n, dq = self.n_heads, self.q_head_dim
        kv = ops.transpose(ops.reshape(self.lkv2kv(c_kv), (b, s, n, self.nope_dim + self.v_dim)),
                           (0, 2, 1, 3))                                                   # (b, n, s, nope+v)
        k_nope, value = ops.split(kv, (self.nope_dim, self.v_dim), -1)
        query = ops.concat((q_nope, q_pe), -1)                                             # (b, n, s, dq)
        key = ops.concat((k_nope, ops.broadcast_to(k_pe, (b, n, s, self.rope_dim))), -1)
        if self.use_flash_attention:
            return fused_attention(query, key, value, causal_mask(0, s, s), self.scale, n)  # (b, n, s, v)
        query = query * self.scale                     # scaled once here, not every (q, k) score: same softmax input
        bounds = chunk_bounds(s, self.chunk_size)
        if len(bounds) == 1:
            return self.attention(query, key, value, causal_mask(0, s, s))
        outs = []
        for start, stop in bounds:                                 # static: unrolled in graph mode
            if outs:                                               # one chunk after the other: its buffers reused
                query = ops.depend(query, outs[-1])
            outs.append(self.attention(ops.slice(query, (0, 0, start, 0), (b, n, stop - start, dq)),
                                       ops.slice(key, (0, 0, 0, 0), (b, n, stop, dq)),
                                       ops.slice(value, (0, 0, 0, 0), (b, n, stop, self.v_dim)),
                                       causal_mask(start, stop, stop)))            # (b, n, stop - start, v)
        return ops.concat(outs, 2)                                                         # (b, n, s, v)

    def _absorbed(self, q_nope, q_pe, cache, hidden):
        """Attention against the latent cache as one shared KV head (decode steps and prefill chunks).

        q_nope (b, n, s, nope), q_pe (b, n, s, rope) rotated, cache (b, K, r + rope) its first K slots, hidden
        (b, s, K) bool: the slots after each token's position. The heads go in blocks of about
        ``attention_chunk_size`` (head, token) rows (``head_blocks``; a decode step is one block), so a prefill
        chunk's largest buffers are (b, heads of a block, s, K), not (b, n, s, K).
        """
        b, n, s, _ = q_nope.shape
        r = self.kv_lora_rank
        q_heads = ops.reshape(ops.transpose(q_nope, (1, 0, 2, 3)), (n, b * s, self.nope_dim))  # (n, b*s, nope)
        if self.latent_kernels is None:
            w = ops.reshape(ops.cast(self.lkv2kv.weight, self.compute_dtype),
                            (n, self.nope_dim + self.v_dim, r))                            # (n, nope+v, r)
            w_uk, w_uv = ops.split(w, (self.nope_dim, self.v_dim), 1)                      # (n, nope, r), (n, v, r)
            q_latent = self.bmm(q_heads, w_uk)                                             # (n, b*s, r)
        else:
            q_latent = ops.cast(self.latent_kernels[0](ops.cast(q_heads, mstype.float32), self.lkv2kv.weight),
                                q_heads.dtype)                                             # (n, b*s, r)
        q_latent = ops.transpose(ops.reshape(q_latent, (n, b, s, r)), (1, 0, 2, 3))        # (b, n, s, r)
        query = ops.concat((q_latent, q_pe), -1) * self.scale            # (b, n, s, r+rope), scaled once here
        width = r + self.rope_dim
        hidden = ops.expand_dims(hidden, 1)                                                # (b, 1, s, K)
        outs = []
        for first, stop in head_blocks(n, s, self.chunk_size):          # static: unrolled in graph mode
            heads = stop - first
            block = query if heads == n else ops.slice(query, (0, first, 0, 0), (b, heads, s, width))
            if outs:                                                    # one block after the other: buffers reused
                block = ops.depend(block, outs[-1])
            mask = ops.reshape(ops.broadcast_to(hidden, (b, heads, s, -1)), (b, heads * s, -1))   # (b, h*s, K)
            outs.append(self.attention(ops.reshape(block, (b, heads * s, width)), cache, cache, mask))  # (b, h*s, w)
        o_latent = (outs[0] if len(outs) == 1 else ops.concat(outs, 1))[..., :r]  # (b, n*s, r): the cache as it is
        o_latent = ops.reshape(ops.transpose(ops.reshape(o_latent, (b, n, s, r)), (1, 0, 2, 3)), (n, b * s, r))
        if self.latent_kernels is None:
            out = self.bmm_t(o_latent, w_uv)                                               # (n, b*s, v)
        else:
            out = ops.cast(self.latent_kernels[1](ops.cast(o_latent, mstype.float32), self.lkv2kv.weight),
                           o_latent.dtype)                                                 # (n, b*s, v)
        return ops.transpose(ops.reshape(out, (n, b, s, self.v_dim)), (1, 0, 2, 3))        # (b, n, s, v)

    def _write_cache(self, rows, entry, b: int, keys=None):
        """Write entry (b, s, r + rope) into the cache rows (b*s,) in place; returns the first b sequences' first
        ``keys`` slots (None: all S) as attention reads them, (b, keys, r + rope). keys may be a dynamic dimension
        (a prefill chunk's: one compiled graph for every chunk, see ``prefill_in_chunks``), so it is never compared
        here: None is the only static case."""
        entry = ops.cast(ops.reshape(entry, (-1, entry.shape[-1])), self.kv_cache.dtype)
        cache = ops.depend(self.kv_cache, ops.scatter_update(self.kv_cache, rows, entry))
        _, seq, width = self.cache_shape
        if keys is not None and b == 1:                        # one sequence: its leading rows, one slice
            return ops.reshape(ops.slice(cache, (0, 0), (keys, width)), (1, keys, width))
        if b < self.cache_shape[0]:                            # a batch smaller than the cache's: its first rows
            cache = ops.slice(cache, (0, 0), (b * seq, width))
        cache = ops.reshape(cache, (b, seq, width))                                        # (b, S, r + rope)
        return cache if keys is None else ops.slice(cache, (0, 0, 0), (b, keys, width))   # (b, keys, r + rope)

    def construct(self, x, cos, sin, slots=None, hidden=None, keys=None):
        """x (b, s, h) -> (b, s, h).

        Full sequence (training, no cache, prefill): cos/sin (s, rope), causal.
        Decode step or prefill chunk (use_past, not first iteration): cos/sin (b, 1, s, rope) at the tokens'
        positions, slots (b*s,) int32 each token's cache row (sequence * seq_length + position), hidden (b, s, K)
        bool which of the first K cache slots lie after each token's position (``DeepseekV2Model.cache_positions``;
        K = seq_length, or fewer for a prefill chunk: the attention reads those K slots only); s = 1 when decoding.
        keys: None when K = seq_length (a decode step), else K itself (a prefill chunk; a dynamic dimension of the
        chunk graph, which is why it comes as an argument instead of being compared with seq_length here).
        """
        b, s, _ = x.shape
        q_nope, q_pe = self._query(x)
        c_kv, k_pe = self._latent(x)
        q_pe = apply_rotary(q_pe, cos, sin)
        k_pe = apply_rotary(ops.expand_dims(k_pe, 1), cos, sin)                           # (b, 1, s, rope)
        if self.use_past and not self.is_first_iteration:
            entry = ops.concat((c_kv, ops.squeeze(k_pe, 1)), -1)                           # (b, s, r + rope)
            out = self._absorbed(q_nope, q_pe, self._write_cache(slots, entry, b, keys), hidden)
        else:
            if self.use_past:                                  # the prompt: rows 0 .. b*S-1 of the cache
                entry = ops.concat((c_kv, ops.squeeze(k_pe, 1)), -1)                       # (b, S, r + rope)
                c_kv = ops.depend(c_kv, self._write_cache(ops.arange(b * s, dtype=mstype.int32), entry, b))
            out = self._expanded(q_nope, q_pe, c_kv, k_pe)
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, s, self.n_heads * self.v_dim))
        return self.tp_all_reduce(self.wo(out))
