"""DeepSeekMoE (arXiv 2405.04434 section 2.2): the router, the routed experts and their dispatch, the shared
experts, the three balance losses and device-level token dropping.

    h'_t = sum_i g_{i,t} FFN_i(u_t) over the top-k routed experts + sum of the shared experts' FFN(u_t)

Read top to bottom: ``Router`` (affinities, greedy or device-limited top-k), ``balance_losses`` (L_ExpBal,
L_DevBal, L_CommBal), ``RankWithin`` (a sort-based rank used by dropping and the capacity dispatch),
``RoutedExperts`` (the stacked experts and their dispatches), ``DeepSeekMoE`` (all of it together).
Shapes: T tokens (b*s), E experts held, k top_k, h hidden, i moe_intermediate_size, G token groups.
"""
import math

from mindspore import nn, ops, Parameter, Tensor
from mindspore.common import dtype as mstype
from mindspore.common.initializer import initializer, Normal

from research.deepseek2.layers import FeedForward, TensorParallelAllReduce
from research.deepseek2.planning.capacity import expert_capacity
from research.deepseek2.planning.inventory import LocalShape
from research.deepseek2.quantization.cells import FLOAT, quantized_parameter
from research.deepseek2.quantization.kernels import GatheredWeightQuantMatmul, dequantize

__all__ = ["Router", "balance_losses", "RankWithin", "RoutedExperts", "DeepSeekMoE"]


class Router(nn.Cell):
    """Token-to-expert affinity s_{i,t} = softmax_i(u_t^T e_i) in float32 and the top-k choice.

    greedy: top-k over all experts (DeepSeek-V2-Lite).
    group_limited_greedy: device-limited routing; experts are split into n_group groups, a group scores the max of
    its experts, the topk_group best groups are kept and top-k is taken inside them (DeepSeek-V2).
    """
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
    """The paper's auxiliary losses (section 2.2.3), each per sequence and averaged over the batch (``batch`` 1:
    the whole batch as one sequence, the released code's ``seq_aux: False``).

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
    """The routed experts, stacked: w1/w3 (E, inter, hidden), w2 (E, hidden, inter). Three dispatches:

    dropless (default; inference and data-parallel training): the T*k (token, expert) assignments are laid out
    expert after expert, each expert's run padded to a multiple of a block of B rows; every block then belongs to one
    expert and one batched matmul computes all blocks. Work is at most T*k + min(E, T*k) * (B - 1) rows (rounded up
    to a block), growing with tokens x top_k, never tokens x experts. B shrinks with the number of assignments
    (B = 1 when decoding one token: exactly k rows).

    per assignment (few tokens: decoding, short prompts): when the block plan would copy at least one expert's
    weights per assignment anyway (T*k <= its number of blocks; with the automatic plan whenever T*k <= 4E, so every
    decode step of b rows with b*k <= 4E), the chosen experts' weights are gathered straight from the top-k indices,
    (T*k, i, h), and every assignment is one row of a batched matmul: the same products as the plan's blocks of one
    row, without its bookkeeping (one-hot over E, ranks, scatter, block owners), so the cost is flat in E: it reads
    the T*k selected experts' weights and nothing of the other experts. The choice is made from static shapes (the
    token count a graph is compiled for), so prefill and decode graphs each hold one dispatch.

    capacity (``moe_dispatch: capacity``; the expert-parallel layout of semi-auto/auto parallel training): tokens are
    split into G groups (G = data_parallel; one group otherwise) and every expert gets a static buffer of C rows per
    group, C = ceil(expert_capacity_factor * T_g*k / E) capped at T_g (factor 0: C = T_g, nothing is ever dropped).
    An expert holding more than C assignments of a group keeps the C with the highest affinity (the paper's rule for
    dropping, applied per expert); the rest contribute nothing. The buffers (E, G*C, h) are what expert parallel
    splits: experts over ep ranks, rows over the dp // ep ranks of each expert group, widths over mp. It is a
    training layout: outside training the dropless (or per-assignment) dispatch runs, so inference never drops.

    Quantized (a ``quant`` plan holding w1/w2/w3): each is held int8 (int4 packed) with ``<name>_scale``; the
    dispatches dequantize only the experts they gather, and with the CPU kernel every token count takes the
    per-assignment dispatch, whose kernel groups the assignments by expert itself (each picked expert's weights
    read once, none of the others').
    """

    def __init__(self, config, num_experts: int, first_expert: int = 0, token_groups: int = 1,
                 compute_dtype=mstype.float32, param_init_type=mstype.float32, quant=FLOAT):
        super().__init__()
        e, h, i = num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.hidden_size = e, h                # the experts held: [first_expert, first_expert + e)
        self.first_expert = first_expert
        self.holds_all = e == config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.block_size = config.moe_block_size
        self.dispatch = config.moe_dispatch
        self.capacity_factor = config.expert_capacity_factor
        self.groups = token_groups                               # capacity dispatch: token groups (data parallel)
        self.compute_dtype = compute_dtype
        self.per_assignment = True                               # False: always the block plan (benchmark A/B)
        def stacked(shape, name):
            return Parameter(initializer(Normal(config.init_std), shape, param_init_type), name=name)

        self.bits = quant.bits
        self.quantized = {}
        for name, shape in (("w1", (e, i, h)), ("w3", (e, i, h)), ("w2", (e, h, i))):  # gate, up, down of each
            self.quantized[name] = quant.holds(name)
            if self.quantized[name]:
                weight, scale = quantized_parameter(shape, quant.settings, name, quant.prefix + name)
                setattr(self, name, weight)
                setattr(self, name + "_scale", scale)
            else:
                setattr(self, name, stacked(shape, name))
        self.kernel_matmul = quant.kernel == "cpu" and any(self.quantized.values())
        self.gathered_matmul = GatheredWeightQuantMatmul(self.bits, quant.kernel)
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.bmm_combine = ops.BatchMatMul()                     # (T, 1, k) x (T, k, h): the weighted sum over k
        # capacity dispatch
        self.rank_in_expert = RankWithin(e)
        self.sort_slots = ops.Sort(axis=-1)
        self.index_gather = ops.Gather(batch_dims=1)             # (G, N) indices -> (G, M)
        self.row_gather = ops.Gather(batch_dims=1)               # rows of (G, R, h)
        self.bmm_up = ops.BatchMatMul(transpose_b=True)          # (E, G*C, h) x (E, i, h)^T
        self.bmm_down = ops.BatchMatMul(transpose_b=True)        # (E, G*C, i) x (E, h, i)^T

    def plan(self, num_assignments: int):
        """Static block plan for T*k assignments: (rows per block B, number of blocks)."""
        busy = min(self.num_experts, num_assignments)        # experts that can hold at least one assignment
        if self.block_size:
            block = self.block_size
        else:
            block = 1 << max(0, math.ceil(math.log2(max(1.0, num_assignments / (4.0 * busy)))))
        # every busy expert pads its run by at most block - 1 rows
        return block, -(-(num_assignments + busy * (block - 1)) // block)

    def gathers_per_assignment(self, num_assignments: int) -> bool:
        """Static choice of the per-assignment dispatch: it copies one expert's weights per assignment, which the
        block plan does too whenever it needs as many blocks as there are assignments (B = 1: decoding). The CPU
        kernel of quantized experts reads each picked expert once whatever the count: always."""
        if self.kernel_matmul:
            return True
        return self.per_assignment and num_assignments <= self.plan(num_assignments)[1]

    def expert_weights(self, name: str, index=None):
        """Experts ``index`` (all when None) of weight ``name`` in compute_dtype, dequantized when held quantized:
        (len(index), out, in)."""
        weight = getattr(self, name)
        picked = weight if index is None else ops.gather(weight, index, 0)
        if not self.quantized[name]:
            return ops.cast(picked, self.compute_dtype)
        scale = getattr(self, name + "_scale")
        return dequantize(picked, scale if index is None else ops.gather(scale, index, 0), self.bits,
                          self.compute_dtype)

    def assignment_product(self, name: str, x, index):
        """x (N, in) rows, each times its own expert index[a]'s ``name`` weight transposed -> (N, out)."""
        if self.quantized[name]:
            return self.gathered_matmul(x, getattr(self, name), getattr(self, name + "_scale"), index)
        w = self.expert_weights(name, index)                                               # (N, out, in)
        return ops.squeeze(self.bmm_t(ops.expand_dims(x, 1), w), 1)

    def capacity(self, group_tokens: int) -> int:
        """Rows per expert and group of the capacity dispatch (inventory.expert_capacity)."""
        return expert_capacity(group_tokens, self.top_k, self.num_experts, self.capacity_factor)

    def construct(self, x, topk_idx, topk_weight, keep=None, priority=None):
        """x (T, h), topk_idx (T, k) int32, topk_weight (T, k) fp32, keep (T, k) 0/1 or None, priority (T, k)
        affinities ranking assignments for the capacity buffers (default topk_weight) -> (T, h)."""
        if not self.holds_all:                                 # assignments to experts held elsewhere: not here
            local = ops.logical_and(topk_idx >= self.first_expert,
                                    topk_idx < self.first_expert + self.num_experts)
            topk_idx = ops.select(local, topk_idx - self.first_expert, ops.zeros_like(topk_idx))
            local = ops.cast(local, mstype.float32)
            keep = local if keep is None else keep * local
        if self.dispatch == "capacity" and self.training:      # a training layout: inference never drops
            return self.capacity_dispatch(x, topk_idx, topk_weight, keep, topk_weight if priority is None else priority)
        if self.gathers_per_assignment(topk_idx.shape[0] * topk_idx.shape[1]):
            return self.assignment_dispatch(x, topk_idx, topk_weight, keep)
        return self.dropless_dispatch(x, topk_idx, topk_weight, keep)

    def combine(self, per_assignment, weights, dtype):
        """out_t = sum_j weights[t, j] per_assignment[t, j, :] in float32, as one (T, 1, k) x (T, k, h) batched
        matmul: the same sum as a ReduceSum over the k axis, which is a slow CPU kernel (docs/profile.md)."""
        out = self.bmm_combine(ops.expand_dims(weights, 1), ops.cast(per_assignment, mstype.float32))  # (T, 1, h)
        return ops.cast(ops.squeeze(out, 1), dtype)

    def assignment_dispatch(self, x, topk_idx, topk_weight, keep):
        """One batched-matmul row per (token, expert) assignment, on the selected experts' gathered weights."""
        tokens, k = topk_idx.shape
        n, h = tokens * k, self.hidden_size
        expert = ops.reshape(topk_idx, (n,))                                               # (N,) a = t*k + j
        xs = ops.broadcast_to(ops.expand_dims(ops.cast(x, self.compute_dtype), 1), (tokens, k, h))
        xs = ops.reshape(xs, (n, h))                                                       # token t, k times
        hidden = ops.silu(self.assignment_product("w1", xs, expert)) * \
            self.assignment_product("w3", xs, expert)                                      # (N, i)
        per_assignment = ops.reshape(self.assignment_product("w2", hidden, expert), (tokens, k, h))  # (T, k, h)
        if keep is None:
            weights = topk_weight
        else:                                                      # dropped (or held elsewhere): exactly nothing
            kept = ops.cast(keep, mstype.float32) > 0
            weights = topk_weight * ops.cast(kept, mstype.float32)
            per_assignment = ops.select(ops.broadcast_to(ops.expand_dims(kept, -1), per_assignment.shape),
                                        per_assignment, ops.zeros_like(per_assignment))
        return self.combine(per_assignment, weights, x.dtype)                              # (T, h)

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
        w1 = self.expert_weights("w1", block_expert)                                       # (nb, i, h)
        w3 = self.expert_weights("w3", block_expert)
        w2 = self.expert_weights("w2", block_expert)                                       # (nb, h, i)
        hidden = ops.silu(self.bmm_t(xs, w1)) * self.bmm_t(xs, w3)                         # (nb, B, i)
        out = ops.reshape(self.bmm_t(hidden, w2), (slots, self.hidden_size))               # (P, h)
        out = ops.concat((out, ops.zeros((1, self.hidden_size), out.dtype)), 0)            # spare slot -> 0
        per_assignment = ops.reshape(ops.gather(out, dest, 0), (tokens, k, self.hidden_size))
        weights = topk_weight if keep is None else topk_weight * ops.cast(keep, mstype.float32)
        return self.combine(per_assignment, weights, x.dtype)                              # (T, h)

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
        w1 = self.expert_weights("w1")                                                     # (E, i, h)
        w3 = self.expert_weights("w3")
        w2 = self.expert_weights("w2")                                                     # (E, h, i)
        hidden = ops.silu(self.bmm_up(xs, w1)) * self.bmm_up(xs, w3)                       # (E, G*C, i)
        out = self.bmm_down(hidden, w2)                                                    # (E, G*C, h)
        out = ops.reshape(ops.transpose(ops.reshape(out, (e, g, c, h)), (1, 0, 2, 3)), (g, e * c, h))
        out = ops.concat((out, ops.zeros((g, 1, h), out.dtype)), 1)                        # (G, E*C + 1, h)
        per_assignment = ops.reshape(self.row_gather(out, slot, 1), (tokens, k, h))        # (T, k, h)
        weights = topk_weight * ops.reshape(fits, (tokens, k))
        return self.combine(per_assignment, weights, x.dtype)                              # (T, h)


class DeepSeekMoE(nn.Cell):
    """DeepSeekMoE: h = x + sum_i g_i FFN_i(x) over the top-k routed experts + the shared experts' FFN(x).

    Training adds the balance losses (alpha_1 expert-level, alpha_2 device-level, alpha_3 communication) and, when
    capacity_factor > 0, drops the lowest-affinity assignments on each over-budget device group; the tokens of about
    never_drop_seq_ratio of the sequences (drawn afresh every step) are never dropped (paper section 2.2.4).
    """

    def __init__(self, config, local: LocalShape = LocalShape(), quant=FLOAT):
        """quant: the QuantPlan scoped to this cell ("model.layers.{i}.feed_forward.")."""
        super().__init__()
        compute_dtype, param_init_type = config.compute_dtype, config.param_init_type
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.num_devices = config.moe_num_devices
        self.topk_devices = config.topk_group if config.topk_method == "group_limited_greedy" else \
            min(self.top_k, self.num_devices)
        self.alphas = (config.aux_loss_alpha, config.device_aux_loss_alpha, config.comm_aux_loss_alpha)
        self.seq_aux = config.seq_aux                         # balance per sequence (the paper), else over the batch
        self.capacity_factor = config.capacity_factor
        self.router = Router(config, param_init_type)
        self.routed_experts = RoutedExperts(config, self.num_experts // local.tp, local.first_expert,
                                            local.token_groups, compute_dtype, param_init_type,
                                            quant.scoped("routed_experts."))
        self.shared_experts = FeedForward(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                          compute_dtype, param_init_type, config.init_std, local.tp, reduce=False,
                                          quant=quant.scoped("shared_experts.")) \
            if config.n_shared_experts else None
        self.tp_all_reduce = TensorParallelAllReduce(local.tp)   # routed (experts held) + shared (columns held)
        self.groups = local.token_groups                      # token groups of the drop budget (data parallel)
        self.rank_in_device = RankWithin(self.num_devices)
        self.never_drop_ratio = config.never_drop_seq_ratio

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
        # ops.rand, not the UniformReal primitive (deprecated from MindSpore 2.10) nor mint.rand (no CPU kernel)
        chosen = ops.cast(ops.rand((batch, 1, 1)) < self.never_drop_ratio, mstype.float32)            # (b, 1, 1)
        return ops.reshape(ops.broadcast_to(chosen, (batch, tokens_per_sequence, self.top_k)),
                           (batch * tokens_per_sequence, self.top_k))

    def construct(self, x):
        """x (b, s, h) -> (b, s, h), aux loss scalar (0 outside training)."""
        b, s, h = x.shape
        flat = ops.reshape(x, (b * s, h))
        scores, topk_idx, topk_weight = self.router(flat)
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
                expert, device, comm = balance_losses(scores, topk_idx, b if self.seq_aux else 1, self.num_experts,
                                                      self.top_k, self.num_devices, self.topk_devices)
                aux = self.alphas[0] * expert + self.alphas[1] * device + self.alphas[2] * comm
        out = self.routed_experts(flat, topk_idx, topk_weight, keep, priority)
        out = ops.reshape(out, (b, s, h))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return self.tp_all_reduce(out), aux
