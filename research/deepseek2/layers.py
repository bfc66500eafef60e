"""The small layers of DeepSeek-V2, from basic MindSpore ops (they run on CPU, GPU and Ascend alike):
RMSNorm, Linear, Embedding, the SwiGLU feed-forward, and the AllReduce of hand-written tensor parallel.

Shapes in comments: b batch, s sequence, h hidden, i FFN width.
"""
from mindspore import nn, ops, Parameter
from mindspore.common import dtype as mstype
from mindspore.common.initializer import initializer, Normal

from research.deepseek2.quantization import cpu_kernel
from research.deepseek2.quantization.cells import FLOAT, QuantLinear

__all__ = ["RMSNorm", "RMSNormFunction", "Linear", "linear", "Embedding", "FeedForward", "TensorParallelAllReduce"]


class TensorParallelAllReduce(nn.Cell):
    """Sums the partial results of ``tp`` tensor-parallel ranks (an AllReduce); identity when tp = 1.

    Inference only: the backward of a plain AllReduce is another AllReduce, which would scale gradients by the
    number of ranks, so a model built with tp > 1 refuses to train (DeepseekV2ForCausalLM.set_train).
    """

    def __init__(self, tp: int = 1):
        super().__init__()
        self.tp = tp
        self.all_reduce = ops.AllReduce() if tp > 1 else None

    def construct(self, x):
        if self.tp > 1:
            return self.all_reduce(x)
        return x


class RMSNorm(nn.Cell):
    """y = weight * x / sqrt(mean(x^2) + eps), statistics in float32 (``RMSNormFunction``)."""

    def __init__(self, dim: int, eps: float = 1e-6, param_init_type=mstype.float32):
        super().__init__()
        self.weight = Parameter(initializer("ones", (dim,), param_init_type), name="weight")
        self.norm = RMSNormFunction(dim, eps)

    def construct(self, x):
        return self.norm(x, self.weight)


class RMSNormFunction(nn.Cell):
    """RMSNorm of x (..., h) with weight (h,), its backward written out and its sums over h and over the tokens as
    matrix products: MindSpore's CPU MatMul against a column of 1/h (or a row of ones) is several times faster than
    its ReduceMean over h (or ReduceSum over the tokens), the two reductions MindSpore's own derivative runs for every
    norm (figures: docs/profile.md). Same values up to rounding (tests/test_parity.py).

    Backward, with r = 1 / sqrt(mean(x^2) + eps), n = x r and g = dy weight (float32):
    dx = r (g - n mean_h(g n)),  dweight = sum over tokens of dy n.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.mean_h = ops.MatMul()                  # (t, h) x (h, 1): a row's mean
        self.sum_t = ops.MatMul(transpose_a=True)   # (t, 1)^T x (t, h): a column's sum

    def _row_mean(self, t):
        """t (t, h) float32 -> its mean over h (t, 1), as a MatMul by a column of 1/h."""
        return self.mean_h(t, ops.fill(mstype.float32, (self.dim, 1), 1.0 / self.dim))

    def _normed(self, x32):
        """x32 (t, h) float32 -> n (t, h), r (t, 1)."""
        r = ops.rsqrt(self._row_mean(ops.square(x32)) + self.eps)
        return x32 * r, r

    def construct(self, x, weight):
        dtype = x.dtype
        normed, _ = self._normed(ops.reshape(ops.cast(x, mstype.float32), (-1, self.dim)))
        return ops.cast(weight, dtype) * ops.reshape(ops.cast(normed, dtype), x.shape)

    def bprop(self, x, weight, out, dout):
        x32 = ops.reshape(ops.cast(x, mstype.float32), (-1, self.dim))                    # (t, h)
        normed, r = self._normed(x32)
        dout32 = ops.reshape(ops.cast(dout, mstype.float32), (-1, self.dim))
        g = dout32 * ops.cast(weight, mstype.float32)
        dx = r * (g - normed * self._row_mean(g * normed))                                   # (t, h)
        ones = ops.fill(mstype.float32, (x32.shape[0], 1), 1.0)
        d_weight = ops.reshape(self.sum_t(ones, dout32 * normed), weight.shape)           # (h,)
        return ops.cast(ops.reshape(dx, x.shape), x.dtype), ops.cast(d_weight, weight.dtype)


class Linear(nn.Cell):
    """y = x W^T (+ b); W stored (out, in) like torch.nn.Linear, so checkpoints convert without transposes.

    A bfloat16 W on a CPU is multiplied as held by the project's CPU kernel (``cpu_kernel.runs_bf16_weights``; its
    result rounded to compute_dtype): casting it would put a float32 copy of W in memory at every call.
    """

    def __init__(self, in_features: int, out_features: int, has_bias: bool = False,
                 compute_dtype=mstype.float32, param_init_type=mstype.float32, init_std: float = 0.02):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = Parameter(initializer(Normal(init_std), (out_features, in_features), param_init_type),
                                name="weight")
        self.bias = Parameter(initializer("zeros", (out_features,), param_init_type), name="bias") \
            if has_bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.bf16_matmul = cpu_kernel.bf16_matmul_op() if cpu_kernel.runs_bf16_weights(param_init_type) else None

    def construct(self, x):
        shape = x.shape
        x2 = ops.reshape(ops.cast(x, self.compute_dtype), (-1, shape[-1]))                # (tokens, in)
        if self.bf16_matmul is not None:
            y = ops.cast(self.bf16_matmul(ops.cast(x2, mstype.float32), self.weight), self.compute_dtype)
        else:
            y = self.matmul(x2, ops.cast(self.weight, self.compute_dtype))                  # (tokens, out)
        if self.bias is not None:
            y = y + ops.cast(self.bias, self.compute_dtype)
        return ops.reshape(y, shape[:-1] + (self.out_features,))


def linear(in_features: int, out_features: int, quant=FLOAT, name: str = "weight", has_bias: bool = False,
           compute_dtype=mstype.float32, param_init_type=mstype.float32, init_std: float = 0.02):
    """The projection whose weight is ``name`` (relative to the ``quant`` plan's prefix, e.g. "wo.weight"): a
    ``QuantLinear`` when the plan (``quantization.cells.QuantPlan``) holds it quantized, else a float Linear."""
    if quant.holds(name):
        return QuantLinear(in_features, out_features, quant, has_bias, compute_dtype, param_init_type,
                           where=quant.prefix + name)
    return Linear(in_features, out_features, has_bias, compute_dtype, param_init_type, init_std)


class Embedding(nn.Cell):
    """Token embedding table (vocab, hidden). A bfloat16 table on a CPU is read by the project's CPU kernel, rows
    widened to float32 (MindSpore's CPU Gather has no bfloat16 kernel)."""

    def __init__(self, vocab_size: int, hidden_size: int, param_init_type=mstype.float32, init_std: float = 0.02):
        super().__init__()
        self.embedding_weight = Parameter(initializer(Normal(init_std), (vocab_size, hidden_size), param_init_type),
                                          name="embedding_weight")
        self.gather = ops.Gather()
        self.bf16_gather = cpu_kernel.bf16_gather_op() if cpu_kernel.runs_bf16_weights(param_init_type) else None

    def construct(self, tokens):
        if self.bf16_gather is not None:
            return self.bf16_gather(self.embedding_weight, ops.cast(tokens, mstype.int32))   # (b, s, h) float32
        return self.gather(self.embedding_weight, tokens, 0)                               # (b, s, h)


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x), holding ``intermediate_size / tp`` of the width.

    With tp > 1 the result is this rank's partial sum; ``reduce`` sums it over the ranks (DeepSeekMoE sums the
    shared and routed experts' partial results once instead).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, compute_dtype=mstype.float32,
                 param_init_type=mstype.float32, init_std: float = 0.02, tp: int = 1, reduce: bool = True,
                 quant=FLOAT):
        """quant: the QuantPlan scoped to this cell (its weights quantized where the plan says so)."""
        super().__init__()
        kwargs = dict(compute_dtype=compute_dtype, param_init_type=param_init_type, init_std=init_std)
        width = intermediate_size // tp
        self.w1 = linear(hidden_size, width, quant, "w1.weight", **kwargs)   # gate_proj
        self.w3 = linear(hidden_size, width, quant, "w3.weight", **kwargs)   # up_proj
        self.w2 = linear(width, hidden_size, quant, "w2.weight", **kwargs)   # down_proj
        self.tp_all_reduce = TensorParallelAllReduce(tp if reduce else 1)

    def construct(self, x):
        return self.tp_all_reduce(self.w2(ops.silu(self.w1(x)) * self.w3(x)))               # (..., h)
