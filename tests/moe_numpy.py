"""NumPy oracle for DeepSeekMoE (arXiv 2405.04434 section 2.2 and the released DeepSeek-V2 gate).

Written for clarity, not speed: plain loops where a loop says what the formula says. Everything is computed in
float64 so that the float32 model is compared against something more exact than itself.

Shapes: T tokens (= batch * seq, batch-major), E routed experts, k experts per token, D devices (expert groups),
h hidden size, i expert intermediate size. Expert weights are stacked like the model's: w1/w3 (E, i, h) and
w2 (E, h, i), each stored (out, in) like torch.nn.Linear.
"""
import math

import numpy as np

__all__ = ["softmax", "gate", "swiglu", "naive_routed_experts", "shared_ffn", "paper_balance_losses",
           "device_of", "drop_keep", "moe_layer"]


def softmax(logits):
    """Row softmax in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def gate(x, weight, top_k, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
         routed_scaling_factor=1.0):
    """The released DeepSeek-V2 MoEGate: x (T, h), weight (E, h) -> scores (T, E), idx (T, k), weights (T, k).

    scores = softmax(x W^T); greedy: top-k of all experts; group_limited_greedy: a group scores the max of its
    experts, the topk_group best groups are kept, top-k is taken among their experts. Weights are normalised
    (sum + 1e-20) when norm_topk_prob and top_k > 1, otherwise multiplied by routed_scaling_factor.
    idx rows are sorted by descending score (the model's order may differ; compare as sets).
    """
    scores = softmax(np.asarray(x, np.float64) @ np.asarray(weight, np.float64).T)        # (T, E)
    tokens, experts = scores.shape
    allowed = np.ones_like(scores, dtype=bool)
    if topk_method == "group_limited_greedy":
        per_group = experts // n_group
        group_scores = scores.reshape(tokens, n_group, per_group).max(-1)                   # (T, G)
        best_groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]     # (T, topk_group)
        allowed = np.zeros_like(scores, dtype=bool)
        for t in range(tokens):
            for g in best_groups[t]:
                allowed[t, g * per_group:(g + 1) * per_group] = True
    masked = np.where(allowed, scores, -np.inf)
    idx = np.argsort(-masked, axis=-1, kind="stable")[:, :top_k]                            # (T, k)
    weights = np.take_along_axis(scores, idx, -1)                                         # (T, k)
    if top_k > 1 and norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    else:
        weights = weights * routed_scaling_factor
    return scores, idx, weights


def _silu(v):
    return v / (1.0 + np.exp(-v))


def swiglu(x, w1, w3, w2):
    """One expert: w2 (silu(w1 x) * w3 x); x (..., h), w1/w3 (i, h), w2 (h, i)."""
    x = np.asarray(x, np.float64)
    return (_silu(x @ np.asarray(w1, np.float64).T) * (x @ np.asarray(w3, np.float64).T)) @ \
        np.asarray(w2, np.float64).T


def naive_routed_experts(x, idx, weights, w1, w3, w2, keep=None):
    """out_t = sum_j keep_tj * weights_tj * FFN_{idx_tj}(x_t), one token and one assignment at a time."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            if keep is not None and not keep[t, j]:
                continue
            e = int(idx[t, j])
            out[t] += float(weights[t, j]) * swiglu(x[t], w1[e], w3[e], w2[e])
    return out


def shared_ffn(x, w1, w3, w2):
    """The shared experts: one SwiGLU of width moe_intermediate_size * n_shared_experts."""
    return swiglu(x, w1, w3, w2)


def paper_balance_losses(scores, idx, batch, num_experts, top_k, num_devices, topk_devices):
    """Section 2.2.3, per sequence then averaged over the batch; returns (L_ExpBal, L_DevBal, L_CommBal)/alpha.

    Per sequence of T' tokens:
      f_i   = E/(K T') sum_t 1(token t selects expert i)        P_i   = (1/T') sum_t s_{i,t}
      L_Exp = sum_i f_i P_i
      f'_d  = (1/|E_d|) sum_{i in E_d} f_i                       P'_d  = sum_{i in E_d} P_i
      L_Dev = sum_d f'_d P'_d
      f''_d = D/(M T') sum_t 1(token t is sent to device d)      P''_d = sum_{i in E_d} P_i
      L_Comm = sum_d f''_d P''_d
    """
    scores = np.asarray(scores, np.float64)
    tokens = scores.shape[0]
    seq = tokens // batch
    per_dev = num_experts // num_devices
    exp_l, dev_l, comm_l = [], [], []
    for b in range(batch):
        rows = range(b * seq, (b + 1) * seq)
        f = np.zeros(num_experts)
        sent = np.zeros(num_devices)
        for t in rows:
            for e in idx[t]:
                f[int(e)] += 1.0
            for d in {int(e) // per_dev for e in idx[t]}:
                sent[d] += 1.0
        f *= num_experts / (top_k * seq)
        p = scores[b * seq:(b + 1) * seq].mean(0)
        exp_l.append(float((f * p).sum()))
        f_dev = np.array([f[d * per_dev:(d + 1) * per_dev].mean() for d in range(num_devices)])
        p_dev = np.array([p[d * per_dev:(d + 1) * per_dev].sum() for d in range(num_devices)])
        dev_l.append(float((f_dev * p_dev).sum()))
        f_comm = sent * num_devices / (topk_devices * seq)
        comm_l.append(float((f_comm * p_dev).sum()))
    return float(np.mean(exp_l)), float(np.mean(dev_l)), float(np.mean(comm_l))


def device_of(idx, num_experts, num_devices):
    """Device (expert group) of each routed expert: experts are laid out contiguously, E/D per device."""
    return np.asarray(idx) // (num_experts // num_devices)


def drop_keep(affinity, idx, num_experts, num_devices, capacity_factor, groups=1, exempt=None):
    """Device-level token dropping (section 2.2.4): keep (T, k) bool.

    Budget per device = ceil(capacity_factor * T*k / D) assignments; on each device the assignments with the
    lowest affinity are dropped until the budget is met (ties: the earlier assignment, in token-major order, wins).
    affinity (T, k): the affinity s_{i,t} of each chosen (token, expert). With groups > 1 (data parallel) the
    tokens are cut into that many equal consecutive groups and each group has its own budget. exempt (T, k) bool:
    assignments never dropped; they use up their device's budget first, the others fill what is left.
    """
    exempt = np.zeros(np.shape(idx), dtype=bool) if exempt is None else np.asarray(exempt, dtype=bool)
    if groups > 1:
        parts = [drop_keep(a, i, num_experts, num_devices, capacity_factor, exempt=x)
                 for a, i, x in zip(np.split(np.asarray(affinity), groups), np.split(np.asarray(idx), groups),
                                    np.split(exempt, groups))]
        return np.concatenate(parts)
    tokens, k = idx.shape
    n = tokens * k
    capacity = math.ceil(capacity_factor * n / num_devices)
    device = device_of(idx, num_experts, num_devices).reshape(n)
    aff = np.asarray(affinity, np.float64).reshape(n)
    keep = np.zeros(n, dtype=bool)
    free = exempt.reshape(n)
    for d in range(num_devices):
        keep[(device == d) & free] = True
        members = np.nonzero((device == d) & ~free)[0]                                   # token-major order
        order = members[np.argsort(-aff[members], kind="stable")]
        keep[order[:max(0, capacity - int(((device == d) & free).sum()))]] = True
    return keep.reshape(tokens, k)


def capacity_keep(priority, idx, num_experts, capacity, groups=1, keep=None):
    """The capacity dispatch's buffers: keep (T, k) bool.

    Tokens are cut into ``groups`` equal consecutive groups; in each group every expert takes at most ``capacity``
    of the (still kept) assignments sent to it, those with the highest priority (ties: the earlier assignment).
    """
    idx = np.asarray(idx)
    keep = np.ones(idx.shape, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    out = np.zeros(idx.shape, dtype=bool)
    prio = np.asarray(priority, np.float64)
    size = idx.shape[0] // groups
    for g in range(groups):
        rows = slice(g * size, (g + 1) * size)
        gi, gp, gk = idx[rows].reshape(-1), prio[rows].reshape(-1), keep[rows].reshape(-1)
        go = np.zeros(gi.shape, dtype=bool)
        for e in range(num_experts):
            members = np.nonzero((gi == e) & gk)[0]
            go[members[np.argsort(-gp[members], kind="stable")][:capacity]] = True
        out[rows] = go.reshape(size, -1)
    return out


def rank_within(bucket, priority):
    """Per row: each item's rank among the items of its bucket by descending priority (ties: earlier first)."""
    bucket, priority = np.asarray(bucket), np.asarray(priority, np.float64)
    rank = np.zeros(bucket.shape, np.int64)
    for g in range(bucket.shape[0]):
        for b in np.unique(bucket[g]):
            members = np.nonzero(bucket[g] == b)[0]
            rank[g, members[np.argsort(-priority[g, members], kind="stable")]] = np.arange(members.size)
    return rank


def moe_layer(x, params, cfg, keep=None):
    """DeepSeekMoE forward in float64: x (T, h) -> routed + shared output (T, h), gate outputs.

    params: dict of numpy arrays named like the model ("router", "w1", "w3", "w2", "sw1", "sw3", "sw2"; the shared
    ones optional). cfg: a DeepseekV2Config.
    """
    scores, idx, weights = gate(x, params["router"], cfg.num_experts_per_tok, cfg.topk_method, cfg.n_group or 1,
                                cfg.topk_group or 1, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    out = naive_routed_experts(x, idx, weights, params["w1"], params["w3"], params["w2"], keep)
    if "sw1" in params:
        out = out + shared_ffn(x, params["sw1"], params["sw3"], params["sw2"])
    return out, scores, idx, weights
