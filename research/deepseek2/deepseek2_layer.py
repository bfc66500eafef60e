"""DeepSeek-V2 building blocks written from basic MindSpore ops (they run on CPU, GPU and Ascend alike).

RMSNorm, Linear, Embedding, the interleaved-pair rotary embedding with YaRN, the SwiGLU feed-forward and
DeepSeekMoE (router, dropless routed experts, shared experts, the paper's three balance losses, device-level token
dropping). Names follow arXiv 2405.04434.

Parallel layout: each Cell that holds weights declares, in ``LAYOUT``, which weight dimension is split by which
parallel axis ("mp" model/tensor parallel, "ep" expert parallel, "vocab" the vocabulary split of
``vocab_emb_dp: False``); cells whose own ops need a layout under semi-auto/auto parallel also have a
``parallelize(sizes)`` method next to their ``construct``. ``research.deepseek2.parallel`` reads these
declarations; the math below never mentions devices.
"""
import math

import numpy as np
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common import dtype as mstype
from mindspore.common.initializer import initializer, Normal

from .moe_shapes import expert_capacity

__all__ = ["RMSNorm", "Linear", "Embedding", "RotaryEmbedding", "apply_rotary", "FeedForward", "Router",
           "RoutedExperts", "DeepSeekMoE", "balance_losses", "rope_tables", "PartialSum", "RankWithin",
           "layout_parts"]


def layout_parts(spec, sizes) -> tuple:
    """Parts each dimension is cut into for a LAYOUT entry, e.g. ("ep", "mp", None) with {"ep": 8, "mp": 4} ->
    (8, 4, 1). Axes missing from ``sizes`` are not split."""
    return tuple(int(sizes.get(axis, 1)) if axis else 1 for axis in spec)


class PartialSum(nn.Cell):
    """Sums the partial results of the tensor-parallel ranks (AllReduce); identity on one rank.

    Inference only: the backward of a plain AllReduce is another AllReduce, which would scale gradients by the
    number of ranks, so models with tp_size > 1 refuse to train (see DeepseekV2ForCausalLM.set_train).
    """

    def __init__(self, tp_size: int = 1):
        super().__init__()
        self.tp_size = tp_size
        self.all_reduce = ops.AllReduce() if tp_size > 1 else None

    def construct(self, x):
        if self.tp_size > 1:
            return self.all_reduce(x)
        return x


class RMSNorm(nn.Cell):
    """y = weight * x / sqrt(mean(x^2) + eps), statistics in float32."""
    LAYOUT = {}

    def __init__(self, dim: int, eps: float = 1e-6, param_init_type=mstype.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (dim,), param_init_type), name="weight")

    def construct(self, x):
        dtype = x.dtype
        x32 = ops.cast(x, mstype.float32)
        variance = ops.mean(ops.square(x32), -1, keep_dims=True)
        normed = ops.cast(x32 * ops.rsqrt(variance + self.eps), dtype)
        return ops.cast(self.weight, dtype) * normed


class Linear(nn.Cell):
    """y = x W^T (+ b); W stored (out, in) like torch.nn.Linear, so checkpoints convert without transposes."""
    LAYOUT = {}

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

    def construct(self, x):
        shape = x.shape
        x2 = ops.reshape(ops.cast(x, self.compute_dtype), (-1, shape[-1]))                # (tokens, in)
        y = self.matmul(x2, ops.cast(self.weight, self.compute_dtype))                      # (tokens, out)
        if self.bias is not None:
            y = y + ops.cast(self.bias, self.compute_dtype)
        return ops.reshape(y, shape[:-1] + (self.out_features,))


class Embedding(nn.Cell):
    """Token embedding table (vocab, hidden)."""
    LAYOUT = {"embedding_weight": ("vocab", None)}          # rows split only with vocab_emb_dp: False

    def __init__(self, vocab_size: int, hidden_size: int, param_init_type=mstype.float32, init_std: float = 0.02):
        super().__init__()
        self.embedding_weight = Parameter(initializer(Normal(init_std), (vocab_size, hidden_size), param_init_type),
                                          name="embedding_weight")
        self.gather = ops.Gather()

    def parallelize(self, sizes):
        """Table rows by the vocabulary split, token ids by data parallel."""
        self.gather.shard((layout_parts(self.LAYOUT["embedding_weight"], sizes), (sizes.get("dp", 1), 1)))

    def construct(self, tokens):
        return self.gather(self.embedding_weight, tokens, 0)                               # (b, s, hidden)


# ---------------------------------------------------------------------------------------------- rotary embedding
def _yarn_find_correction_dim(num_rotations, dim, base, max_position_embeddings):
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_find_correction_range(low_rot, high_rot, dim, base, max_position_embeddings):
    low = math.floor(_yarn_find_correction_dim(low_rot, dim, base, max_position_embeddings))
    high = math.ceil(_yarn_find_correction_dim(high_rot, dim, base, max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def _yarn_linear_ramp_mask(low, high, dim):
    if low == high:
        high += 0.001  # prevent a zero division
    linear = (np.arange(dim, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(linear, 0, 1).astype(np.float32)


def rope_tables(config, num_positions: int):
    """cos/sin tables (num_positions, qk_rope_head_dim), each frequency repeated for its interleaved pair.

    Frequencies and the YaRN cos/sin factor follow the released DeepSeek-V2 code, computed in float32 like it.
    """
    from .deepseek2_config import yarn_get_mscale
    dim, base = config.qk_rope_head_dim, np.float32(config.rope_theta)
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (base ** exponents)).astype(np.float32)                # (dim/2,)
    positions = np.arange(num_positions, dtype=np.float32)
    mscale = 1.0
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        positions = positions / np.float32(scaling["factor"])
    elif config.rope_type == "yarn":
        factor = float(scaling["factor"])
        original = scaling.get("original_max_position_embeddings", 4096)
        low, high = _yarn_find_correction_range(scaling.get("beta_fast", 32), scaling.get("beta_slow", 1),
                                                dim, float(base), original)
        extra = inv_freq
        inter = (np.float32(1.0) / (np.float32(factor) * base ** exponents)).astype(np.float32)
        keep = np.float32(1.0) - _yarn_linear_ramp_mask(low, high, dim // 2)              # 1 = extrapolate
        inv_freq = (inter * (np.float32(1.0) - keep) + extra * keep).astype(np.float32)
        mscale = yarn_get_mscale(factor, scaling.get("mscale", 1)) / \
            yarn_get_mscale(factor, scaling.get("mscale_all_dim", 0))
    freqs = np.outer(positions, inv_freq).astype(np.float32)                               # (pos, dim/2)
    cos = (np.cos(freqs) * np.float32(mscale)).astype(np.float32)
    sin = (np.sin(freqs) * np.float32(mscale)).astype(np.float32)
    return np.repeat(cos, 2, axis=-1), np.repeat(sin, 2, axis=-1)                          # (pos, dim)


class RotaryEmbedding(nn.Cell):
    """Holds the cos/sin tables; gives them for a prefix (training, prefill) or per-row positions (decode)."""

    def __init__(self, config, num_positions: int):
        super().__init__()
        cos, sin = rope_tables(config, num_positions)
        self.cos = Tensor(cos, mstype.float32)
        self.sin = Tensor(sin, mstype.float32)

    def construct(self, seq_len: int, positions=None):
        if positions is None:
            return self.cos[:seq_len], self.sin[:seq_len]                                  # (s, d)
        cos = ops.gather(self.cos, positions, 0)                                           # (b, d)
        sin = ops.gather(self.sin, positions, 0)
        return ops.expand_dims(ops.expand_dims(cos, 1), 1), ops.expand_dims(ops.expand_dims(sin, 1), 1)  # (b,1,1,d)


def apply_rotary(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the position angle: the released model's RoPE.

    x: (..., d); cos/sin broadcast to x, each angle repeated for both members of its pair.
    """
    dtype = x.dtype
    x32 = ops.cast(x, mstype.float32)
    pairs = ops.reshape(x32, x32.shape[:-1] + (x32.shape[-1] // 2, 2))                      # (..., d/2, 2)
    even, odd = pairs[..., 0:1], pairs[..., 1:2]
    rotated = ops.reshape(ops.concat((-odd, even), -1), x32.shape)                         # (-x1, x0, -x3, x2 ...)
    return ops.cast(x32 * cos + rotated * sin, dtype)


# ---------------------------------------------------------------------------------------------- feed-forward
class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x). Column-split w1/w3 and row-split w2 under model parallel."""
    LAYOUT = {"w1.weight": ("mp", None), "w3.weight": ("mp", None), "w2.weight": (None, "mp")}

    def __init__(self, hidden_size: int, intermediate_size: int, compute_dtype=mstype.float32,
                 param_init_type=mstype.float32, init_std: float = 0.02, tp_size: int = 1, reduce: bool = True):
        super().__init__()
        kwargs = dict(compute_dtype=compute_dtype, param_init_type=param_init_type, init_std=init_std)
        local = intermediate_size // tp_size                        # this rank's columns of w1/w3, rows of w2
        self.w1 = Linear(hidden_size, local, **kwargs)   # gate_proj
        self.w3 = Linear(hidden_size, local, **kwargs)   # up_proj
        self.w2 = Linear(local, hidden_size, **kwargs)   # down_proj
        self.partial_sum = PartialSum(tp_size if reduce else 1)

    def construct(self, x):
        return self.partial_sum(self.w2(ops.silu(self.w1(x)) * self.w3(x)))


class Router(nn.Cell):
    """Token-to-expert affinity s_{i,t} = softmax_i(u_t^T e_i) in float32 and the top-k choice.

    greedy: top-k over all experts (DeepSeek-V2-Lite).
    group_limited_greedy: device-limited routing; experts are split into n_group groups, a group scores the max of
    its experts, the topk_group best groups are kept and top-k is taken inside them (DeepSeek-V2).
    """
    LAYOUT = {}

    def __init__(self, config, param_init_type=mstype.float32):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.topk_method = config.topk_method
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = Parameter(initializer(Normal(config.init_std), (self.num_experts, config.hidden_size),
                                            param_init_type), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        """x: (tokens, hidden) -> scores (tokens, E), topk_idx (tokens, k) int32, topk_weight (tokens, k) fp32."""
        logits = self.matmul(ops.cast(x, mstype.float32), ops.cast(self.weight, mstype.float32))
        scores = ops.softmax(logits, -1)                                                   # (T, E)
        if self.topk_method == "group_limited_greedy":
            tokens = scores.shape[0]
            grouped = ops.reshape(scores, (tokens, self.n_group, self.num_experts // self.n_group))
            group_scores = ops.max(grouped, -1)[0]                                         # (T, G)
            _, group_idx = ops.topk(group_scores, self.topk_group)                         # (T, topk_group)
            group_mask = ops.reduce_sum(ops.one_hot(group_idx, self.n_group, Tensor(1.0, mstype.float32),
                                                    Tensor(0.0, mstype.float32)), 1)         # (T, G)
            expert_mask = ops.reshape(ops.broadcast_to(ops.expand_dims(group_mask, -1), grouped.shape),
                                      (tokens, self.num_experts))                          # (T, E)
            masked = scores * expert_mask
            topk_weight, topk_idx = ops.topk(masked, self.top_k)
        else:
            topk_weight, topk_idx = ops.topk(scores, self.top_k)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (ops.sum(topk_weight, -1, keepdim=True) + 1e-20)
        else:
            topk_weight = topk_weight * self.routed_scaling_factor
        return scores, ops.cast(topk_idx, mstype.int32), topk_weight


def balance_losses(scores, topk_idx, batch: int, num_experts: int, top_k: int, num_devices: int,
                   topk_devices: int):
    """The paper's auxiliary losses (section 2.2.3), each per sequence and averaged over the batch.

    scores (b*s, E) fp32 affinities, topk_idx (b*s, k). Returns (L_ExpBal, L_DevBal, L_CommBal) before their alphas:
      expert:  sum_i f_i P_i,    f_i = E/(k s) * #tokens choosing i,          P_i = mean_t s_{i,t}
      device:  sum_d f'_d P'_d,  f'_d = mean_{i in d} f_i,                     P'_d = sum_{i in d} P_i
      comm:    sum_d f''_d P''_d, f''_d = D/(M s) * #tokens sent to device d, P''_d = sum_{i in d} P_i
    """
    tokens = scores.shape[0]
    seq = tokens // batch
    one = Tensor(1.0, mstype.float32)
    zero = Tensor(0.0, mstype.float32)
    chosen = ops.reduce_sum(ops.one_hot(topk_idx, num_experts, one, zero), 1)              # (T, E) 0/1
    chosen = ops.reshape(chosen, (batch, seq, num_experts))
    prob = ops.reshape(scores, (batch, seq, num_experts))
    f = ops.reduce_sum(chosen, 1) * (num_experts / (top_k * seq))                          # (b, E)
    p = ops.mean(prob, 1)                                                                  # (b, E)
    expert = ops.mean(ops.reduce_sum(f * p, -1))
    per_dev = num_experts // num_devices
    f_dev = ops.mean(ops.reshape(f, (batch, num_devices, per_dev)), -1)                    # (b, D)
    p_dev = ops.reduce_sum(ops.reshape(p, (batch, num_devices, per_dev)), -1)              # (b, D)
    device = ops.mean(ops.reduce_sum(f_dev * p_dev, -1))
    sent = ops.reduce_max(ops.reshape(chosen, (batch, seq, num_devices, per_dev)), -1)     # (b, s, D) 0/1
    f_comm = ops.reduce_sum(sent, 1) * (num_devices / (topk_devices * seq))                # (b, D)
    comm = ops.mean(ops.reduce_sum(f_comm * p_dev, -1))
    return expert, device, comm


class StackedWeight(nn.Cell):
    """One weight per routed expert, stacked on the first axis: (E, out, in)."""

    def __init__(self, shape, param_init_type=mstype.float32, init_std: float = 0.02):
        super().__init__()
        self.weight = Parameter(initializer(Normal(init_std), shape, param_init_type), name="weight")


class RankWithin(nn.Cell):
    """Rank of every item among the items of its bucket by descending priority (0 = first), per group.

    bucket (G, N) int32 in [0, num_buckets), priority (G, N) float32 -> (G, N) float32. Items given a priority below
    every real one (-1 for affinities) rank after all of them. One sort orders the items, a running count per bucket
    ranks them, a second sort puts the ranks back in item order: O(N log N + N * buckets), never N x N.
    """

    def __init__(self, num_buckets: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.sort_desc = ops.Sort(axis=-1, descending=True)
        self.sort_asc = ops.Sort(axis=-1)
        self.gather = ops.Gather(batch_dims=1)

    def parallelize(self, sizes):
        """Every group on its own data-parallel rank; the sorted axis whole."""
        dp = sizes.get("dp", 1)
        self.sort_desc.shard(((dp, 1),))
        self.sort_asc.shard(((dp, 1),))
        self.gather.shard(((dp, 1), (dp, 1)))

    def construct(self, bucket, priority):
        if priority.shape[-1] >= 1 << 24:
            raise ValueError(f"RankWithin: {priority.shape[-1]} items per group; positions are exact in float32 "
                             f"only below 2^24")
        _, order = self.sort_desc(ops.stop_gradient(priority))                             # (G, N) best first
        onehot = ops.one_hot(self.gather(bucket, order, 1), self.num_buckets,
                             Tensor(1.0, mstype.float32), Tensor(0.0, mstype.float32))      # (G, N, buckets)
        sorted_rank = ops.reduce_sum((ops.cumsum(onehot, 1) - onehot) * onehot, -1)        # (G, N)
        _, position = self.sort_asc(ops.cast(order, mstype.float32))                       # where each item went
        return self.gather(sorted_rank, position, 1)                                       # (G, N) item order


class RoutedExperts(nn.Cell):
    """The routed experts, stacked: w1/w3 (E, inter, hidden), w2 (E, hidden, inter). Two dispatches:

    dropless (default; inference and data-parallel training): the T*k (token, expert) assignments are laid out
    expert after expert, each expert's run padded to a multiple of a block of B rows; every block then belongs to one
    expert and one batched matmul computes all blocks. Work is at most T*k + min(E, T*k) * (B - 1) rows (rounded up
    to a block), growing with tokens x top_k, never tokens x experts. B shrinks with the number of assignments
    (B = 1 when decoding one token: exactly k rows).

    capacity (``moe_dispatch: capacity``; the expert-parallel layout of semi-auto/auto parallel training): tokens are
    split into G groups (G = data_parallel; one group otherwise) and every expert gets a static buffer of C rows per
    group, C = ceil(expert_capacity_factor * T_g*k / E) capped at T_g (factor 0: C = T_g, nothing is ever dropped).
    An expert holding more than C assignments of a group keeps the C with the highest affinity (the paper's rule for
    dropping, applied per expert); the rest contribute nothing. The buffers (E, G*C, h) are what expert parallel
    splits: experts over ep ranks, rows over the dp // ep ranks of each expert group, widths over mp. It is a
    training layout: outside training the dropless dispatch runs, so inference never drops.
    """
    LAYOUT = {"w1.weight": ("ep", "mp", None), "w3.weight": ("ep", "mp", None), "w2.weight": ("ep", None, "mp")}

    def __init__(self, config, compute_dtype=mstype.float32, param_init_type=mstype.float32):
        super().__init__()
        e, h, i = config.n_routed_experts // config.tp_size, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.hidden_size = e, h                # this rank's experts: [offset, offset + e)
        self.expert_offset = config.tp_rank * e
        self.tp_size = config.tp_size
        self.top_k = config.num_experts_per_tok
        self.block_size = config.moe_block_size
        self.dispatch = config.moe_dispatch
        self.capacity_factor = config.expert_capacity_factor
        self.groups = 1                                          # capacity dispatch: token groups (data parallel)
        self.compute_dtype = compute_dtype
        self.w1 = StackedWeight((e, i, h), param_init_type, config.init_std)            # gate_proj of every expert
        self.w3 = StackedWeight((e, i, h), param_init_type, config.init_std)            # up_proj
        self.w2 = StackedWeight((e, h, i), param_init_type, config.init_std)            # down_proj
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        # capacity dispatch
        self.rank_in_expert = RankWithin(e)
        self.sort_slots = ops.Sort(axis=-1)
        self.index_gather = ops.Gather(batch_dims=1)             # (G, N) indices -> (G, M)
        self.row_gather = ops.Gather(batch_dims=1)               # rows of (G, R, h)
        self.bmm_up = ops.BatchMatMul(transpose_b=True)          # (E, G*C, h) x (E, i, h)^T
        self.bmm_down = ops.BatchMatMul(transpose_b=True)        # (E, G*C, i) x (E, h, i)^T

    def parallelize(self, sizes):
        """Semi-auto/auto parallel layout of the capacity dispatch (sizes: dp, mp, ep).

        Routing, ranking and the gathers stay inside each data-parallel group (dp, 1, ...); the expert matmuls take
        experts by ep, each expert's G*C rows by dp // ep and widths by mp, so MindSpore moves the dispatched rows
        from their group's rank to their expert's rank (AlltoAll with enable_alltoall) and back.
        """
        dp, mp, ep = sizes.get("dp", 1), sizes.get("mp", 1), sizes.get("ep", 1)
        if dp % ep:
            raise ValueError(f"parallel_config.expert_parallel = {ep} does not divide data_parallel = {dp}")
        self.groups = dp
        self.rank_in_expert.parallelize(sizes)
        self.sort_slots.shard(((dp, 1),))
        self.index_gather.shard(((dp, 1), (dp, 1)))
        self.row_gather.shard(((dp, 1, 1), (dp, 1)))
        self.bmm_up.shard(((ep, dp // ep, 1), layout_parts(self.LAYOUT["w1.weight"], sizes)))
        self.bmm_down.shard(((ep, dp // ep, mp), layout_parts(self.LAYOUT["w2.weight"], sizes)))

    def plan(self, num_assignments: int):
        """Static block plan for T*k assignments: (rows per block B, number of blocks)."""
        busy = min(self.num_experts, num_assignments)        # experts that can hold at least one assignment
        if self.block_size:
            block = self.block_size
        else:
            block = 1 << max(0, math.ceil(math.log2(max(1.0, num_assignments / (4.0 * busy)))))
        # every busy expert pads its run by at most block - 1 rows
        return block, -(-(num_assignments + busy * (block - 1)) // block)

    def capacity(self, group_tokens: int) -> int:
        """Rows per expert and group of the capacity dispatch (moe_shapes.expert_capacity)."""
        return expert_capacity(group_tokens, self.top_k, self.num_experts, self.capacity_factor)

    def construct(self, x, topk_idx, topk_weight, keep=None, priority=None):
        """x (T, h), topk_idx (T, k) int32, topk_weight (T, k) fp32, keep (T, k) 0/1 or None, priority (T, k)
        affinities ranking assignments for the capacity buffers (default topk_weight) -> (T, h)."""
        if self.tp_size > 1:                                   # assignments to other ranks' experts: not here
            local = ops.logical_and(topk_idx >= self.expert_offset,
                                    topk_idx < self.expert_offset + self.num_experts)
            topk_idx = ops.select(local, topk_idx - self.expert_offset, ops.zeros_like(topk_idx))
            local = ops.cast(local, mstype.float32)
            keep = local if keep is None else keep * local
        if self.dispatch == "capacity" and self.training:      # a training layout: inference never drops
            return self.capacity_dispatch(x, topk_idx, topk_weight, keep, topk_weight if priority is None else priority)
        return self.dropless_dispatch(x, topk_idx, topk_weight, keep)

    def dropless_dispatch(self, x, topk_idx, topk_weight, keep):
        tokens, k = topk_idx.shape
        n = tokens * k
        block, num_blocks = self.plan(n)
        slots = block * num_blocks
        one = Tensor(1.0, mstype.float32)
        zero = Tensor(0.0, mstype.float32)
        expert = ops.reshape(topk_idx, (n,))                                               # (N,)
        onehot = ops.one_hot(expert, self.num_experts, one, zero)                          # (N, E)
        if keep is not None:
            onehot = onehot * ops.reshape(ops.cast(keep, mstype.float32), (n, 1))          # dropped: no expert
        count = ops.reduce_sum(onehot, 0)                                                  # (E,)
        rank = ops.reduce_sum((ops.cumsum(onehot, 0) - onehot) * onehot, -1)               # (N,) rank in its expert
        padded = ops.ceil(count / block) * block                                           # (E,)
        end = ops.cumsum(padded, 0)                                                        # (E,)
        start = end - padded
        dest = ops.reduce_sum(onehot * ops.expand_dims(start, 0), -1) + rank               # (N,) slot of assignment
        if keep is not None:
            dest = dest * ops.reshape(ops.cast(keep, mstype.float32), (n,)) + \
                slots * (1 - ops.reshape(ops.cast(keep, mstype.float32), (n,)))            # dropped -> spare slot
        dest = ops.cast(dest, mstype.int32)
        token = ops.cast(ops.reshape(ops.tile(ops.expand_dims(ops.arange(tokens), 1), (1, k)), (n,)), mstype.int32)
        slot_token = ops.scatter_nd(ops.expand_dims(dest, 1), token + 1, (slots + 1,))[:slots]  # 0 = empty slot
        x_pad = ops.concat((ops.zeros((1, x.shape[-1]), x.dtype), x), 0)                   # (T+1, h), row 0 zeros
        xs = ops.reshape(ops.gather(ops.cast(x_pad, self.compute_dtype), slot_token, 0),
                         (num_blocks, block, self.hidden_size))                            # (nb, B, h)
        block_ids = ops.cast(ops.arange(num_blocks), mstype.float32) * block               # first slot of each block
        block_expert = ops.reduce_sum(ops.cast(ops.expand_dims(block_ids, 1) >= ops.expand_dims(end, 0),
                                               mstype.int32), -1)                          # (nb,)
        block_expert = ops.minimum(block_expert, self.num_experts - 1)                     # spare blocks: any expert
        w1 = ops.cast(ops.gather(self.w1.weight, block_expert, 0), self.compute_dtype)     # (nb, i, h)
        w3 = ops.cast(ops.gather(self.w3.weight, block_expert, 0), self.compute_dtype)
        w2 = ops.cast(ops.gather(self.w2.weight, block_expert, 0), self.compute_dtype)     # (nb, h, i)
        hidden = ops.silu(self.bmm_t(xs, w1)) * self.bmm_t(xs, w3)                         # (nb, B, i)
        out = ops.reshape(self.bmm_t(hidden, w2), (slots, self.hidden_size))               # (P, h)
        out = ops.concat((out, ops.zeros((1, self.hidden_size), out.dtype)), 0)            # spare slot -> 0
        per_assignment = ops.reshape(ops.gather(out, dest, 0), (tokens, k, self.hidden_size))
        weights = topk_weight if keep is None else topk_weight * ops.cast(keep, mstype.float32)
        combined = ops.reduce_sum(ops.cast(per_assignment, mstype.float32) * ops.expand_dims(weights, -1), 1)
        return ops.cast(combined, x.dtype)                                                 # (T, h)

    def capacity_dispatch(self, x, topk_idx, topk_weight, keep, priority):
        tokens, k = topk_idx.shape
        g, e, h = self.groups, self.num_experts, self.hidden_size
        if tokens % g:
            raise ValueError(f"RoutedExperts: {tokens} tokens do not split into {g} data-parallel groups")
        tg = tokens // g
        n, c = tg * k, self.capacity(tg)
        expert = ops.reshape(topk_idx, (g, n))                                             # (G, N) a = t*k + j
        prio = ops.reshape(ops.cast(priority, mstype.float32), (g, n))
        kept = ops.ones((g, n), mstype.float32) if keep is None else \
            ops.reshape(ops.cast(keep, mstype.float32), (g, n))
        prio = kept * (prio + 1.0) - 1.0                                                   # dropped: -1, last
        rank = self.rank_in_expert(expert, prio)                                           # (G, N) in its expert
        fits = kept * ops.cast(rank < c, mstype.float32)                                   # (G, N) 0/1
        # slot of each assignment in the (E*C + 1)-row buffer of its group; row E*C stays zero
        slot = ops.cast(fits * (ops.cast(expert, mstype.float32) * c + rank) + (1 - fits) * (e * c), mstype.int32)
        # which assignment fills slot (e, r): sorted by slot, expert e's r-th sits at start_e + r
        _, by_slot = self.sort_slots(ops.cast(slot, mstype.float32))                       # (G, N)
        filled = ops.reduce_sum(ops.one_hot(expert, e, Tensor(1.0, mstype.float32), Tensor(0.0, mstype.float32))
                                * ops.expand_dims(fits, -1), 1)                            # (G, E)
        start = ops.cumsum(filled, -1) - filled                                            # (G, E)
        r = ops.cast(ops.arange(c), mstype.float32)                                        # (C,)
        position = ops.expand_dims(start, -1) + r                                          # (G, E, C)
        valid = ops.cast(r < ops.expand_dims(filled, -1), mstype.int32)                    # (G, E, C)
        position = ops.cast(ops.minimum(position, n - 1), mstype.int32)
        assignment = self.index_gather(by_slot, ops.reshape(position, (g, e * c)), 1)      # (G, E*C)
        row = (ops.floor_divide(assignment, k) + 1) * ops.reshape(valid, (g, e * c))       # token + 1, 0 = empty
        x_pad = ops.concat((ops.zeros((g, 1, h), self.compute_dtype),
                            ops.reshape(ops.cast(x, self.compute_dtype), (g, tg, h))), 1)  # (G, T_g + 1, h)
        xs = self.row_gather(x_pad, row, 1)                                                # (G, E*C, h)
        xs = ops.reshape(ops.transpose(ops.reshape(xs, (g, e, c, h)), (1, 0, 2, 3)), (e, g * c, h))
        w1 = ops.cast(self.w1.weight, self.compute_dtype)                                  # (E, i, h)
        w3 = ops.cast(self.w3.weight, self.compute_dtype)
        w2 = ops.cast(self.w2.weight, self.compute_dtype)                                  # (E, h, i)
        hidden = ops.silu(self.bmm_up(xs, w1)) * self.bmm_up(xs, w3)                       # (E, G*C, i)
        out = self.bmm_down(hidden, w2)                                                    # (E, G*C, h)
        out = ops.reshape(ops.transpose(ops.reshape(out, (e, g, c, h)), (1, 0, 2, 3)), (g, e * c, h))
        out = ops.concat((out, ops.zeros((g, 1, h), out.dtype)), 1)                        # (G, E*C + 1, h)
        per_assignment = ops.reshape(self.row_gather(out, slot, 1), (tokens, k, h))        # (T, k, h)
        weights = topk_weight * ops.reshape(fits, (tokens, k))
        combined = ops.reduce_sum(ops.cast(per_assignment, mstype.float32) * ops.expand_dims(weights, -1), 1)
        return ops.cast(combined, x.dtype)                                                 # (T, h)


class DeepSeekMoE(nn.Cell):
    """DeepSeekMoE: h = x + sum_i g_i FFN_i(x) over the top-k routed experts + the shared experts' FFN(x).

    Training adds the balance losses (alpha_1 expert-level, alpha_2 device-level, alpha_3 communication) and, when
    capacity_factor > 0, drops the lowest-affinity assignments on each over-budget device group; the tokens of about
    never_drop_seq_ratio of the sequences (drawn afresh every step) are never dropped (paper section 2.2.4).
    """
    LAYOUT = {}

    def __init__(self, config, compute_dtype=mstype.float32, param_init_type=mstype.float32):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.num_devices = config.moe_num_devices
        self.topk_devices = config.topk_group if config.topk_method == "group_limited_greedy" else \
            min(self.top_k, self.num_devices)
        self.alphas = (config.aux_loss_alpha, config.device_aux_loss_alpha, config.comm_aux_loss_alpha)
        self.capacity_factor = config.capacity_factor
        self.routed_experts = RoutedExpertsBlock(config, compute_dtype, param_init_type)
        self.shared_experts = FeedForward(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                          compute_dtype, param_init_type, config.init_std, config.tp_size,
                                          reduce=False) if config.n_shared_experts else None
        self.partial_sum = PartialSum(config.tp_size)         # routed (local experts) + shared (local columns)
        self.groups = 1                                       # token groups of the drop budget (data parallel)
        self.rank_in_device = RankWithin(self.num_devices)
        self.never_drop_ratio = config.never_drop_seq_ratio
        self.uniform = ops.UniformReal()

    def parallelize(self, sizes):
        """Dropping and the capacity dispatch work per data-parallel group (one group per dp rank)."""
        self.groups = sizes.get("dp", 1)
        self.rank_in_device.parallelize(sizes)

    def drop_mask(self, topk_idx, affinity, exempt=None):
        """1 for kept assignments: per device group, keep the capacity_factor * T*k/D highest-affinity ones.

        topk_idx (T, k) chosen experts, affinity (T, k) their softmax scores s_{i,t} (not the scaled weights),
        exempt (T, k) 0/1 or None: assignments never dropped; they take their device's budget first.
        Under data parallel every rank applies the budget to its own tokens (T / dp of them).
        """
        tokens, k = topk_idx.shape
        g = self.groups
        n = tokens * k // g
        capacity = math.ceil(self.capacity_factor * n / self.num_devices)
        device = ops.reshape(ops.floor_divide(topk_idx, self.num_experts // self.num_devices), (g, n))  # (G, N)
        priority = affinity if exempt is None else affinity + 2.0 * exempt                # exempt rank first
        rank = self.rank_in_device(device, ops.reshape(priority, (g, n)))                            # (G, N)
        keep = ops.reshape(ops.cast(rank < capacity, mstype.float32), (tokens, k))
        return keep if exempt is None else ops.maximum(keep, exempt)

    def exempt_sequences(self, batch: int, tokens_per_sequence: int):
        """(batch * tokens_per_sequence, k) 0/1: the assignments of about never_drop_ratio of the sequences."""
        chosen = ops.cast(self.uniform((batch, 1, 1)) < self.never_drop_ratio, mstype.float32)        # (b, 1, 1)
        return ops.reshape(ops.broadcast_to(chosen, (batch, tokens_per_sequence, self.top_k)),
                           (batch * tokens_per_sequence, self.top_k))

    def construct(self, x):
        """x (b, s, h) -> (b, s, h), aux loss scalar (0 outside training)."""
        b, s, h = x.shape
        flat = ops.reshape(x, (b * s, h))
        scores, topk_idx, topk_weight = self.routed_experts.router(flat)
        priority = None                                       # ranks assignments; used by training only
        keep = None
        aux = ops.zeros((), mstype.float32)
        if self.training:
            affinity = ops.gather_elements(scores, 1, topk_idx)                            # (T, k) s_{i,t}
            priority = affinity
            if self.capacity_factor > 0:
                exempt = self.exempt_sequences(b, s) if self.never_drop_ratio > 0 else None
                keep = self.drop_mask(topk_idx, affinity, exempt)
                if exempt is not None:
                    priority = affinity + 2.0 * exempt                                     # first in expert buffers
            if self.alphas[0] > 0 or self.alphas[1] > 0 or self.alphas[2] > 0:
                expert, device, comm = balance_losses(scores, topk_idx, b, self.num_experts, self.top_k,
                                                      self.num_devices, self.topk_devices)
                aux = self.alphas[0] * expert + self.alphas[1] * device + self.alphas[2] * comm
        out = self.routed_experts.ffn(flat, topk_idx, topk_weight, keep, priority)
        out = ops.reshape(out, (b, s, h))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.partial_sum(out), aux


class RoutedExpertsBlock(nn.Cell):
    """Groups the router and the stacked experts under one name (``feed_forward.routed_experts``)."""

    def __init__(self, config, compute_dtype=mstype.float32, param_init_type=mstype.float32):
        super().__init__()
        self.router = Router(config, param_init_type)
        self.ffn = RoutedExperts(config, compute_dtype, param_init_type)
