"""DeepSeekMoE against the paper (arXiv 2405.04434 section 2.2) and the released DeepSeek-V2 gate.

Oracles: ``moe_numpy`` (float64 NumPy, one formula at a time) and, for gradients, a small PyTorch implementation of
the same math written here. Covered: Router (greedy, group-limited greedy, weight normalisation/scaling),
RoutedExperts (the dropless block dispatch, its static plan, the per-assignment dispatch of decoding, gradients), balance_losses (expert, device,
communication; the released seq_aux formula), DeepSeekMoE (aux loss, train/eval, device-level token dropping).
Mostly PyNative; one RoutedExperts and one DeepSeekMoE case run in graph mode.
"""
import math

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor
from mindspore.common import dtype as mstype

import moe_numpy as ref
from research.deepseek2.deepseek2_config import DeepseekV2Config
from research.deepseek2.planning.inventory import LocalShape
from research.deepseek2.moe import DeepSeekMoE, RankWithin, RoutedExperts as _RoutedExperts, Router, balance_losses

RTOL = ATOL = 1e-5


@pytest.fixture(autouse=True)
def pynative():
    """PyNative by default, and seeded weight initialisation so every routing below is reproducible."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(1234)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def make_config(**fields):
    """A tiny MoE config; init_std 0.5 so routing is decisive (no near-ties between float32 and float64)."""
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, init_std=0.5,
                aux_loss_alpha=0.0, seq_length=16, max_position_embeddings=64)
    base.update(fields)
    return DeepseekV2Config(**base)


def random_routing(rng, tokens, experts, k):
    """k distinct experts per token and positive weights: idx (T, k) int32, weights (T, k) float32."""
    idx = np.argsort(rng.random((tokens, experts)), axis=1)[:, :k].astype(np.int32)
    return idx, rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)


def by_expert(idx, weights):
    """Per token: the chosen experts sorted, and their weights in that order (top-k order is not part of the API)."""
    order = np.argsort(idx, axis=1)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(weights, order, 1)


def moe_params(moe):
    """The DeepSeekMoE weights as NumPy arrays, named as ``moe_numpy.moe_layer`` expects."""
    ffn = moe.routed_experts
    params = {"router": moe.router.weight.asnumpy(), "w1": ffn.w1.asnumpy(),
              "w3": ffn.w3.asnumpy(), "w2": ffn.w2.asnumpy()}
    if moe.shared_experts is not None:
        shared = moe.shared_experts
        params.update(sw1=shared.w1.weight.asnumpy(), sw3=shared.w3.weight.asnumpy(),
                      sw2=shared.w2.weight.asnumpy())
    return params


def RoutedExperts(cfg, groups=1):  # noqa: N802  (all experts of cfg, in `groups` token groups)
    return _RoutedExperts(cfg, cfg.n_routed_experts, token_groups=groups)


def num_devices_limit(cfg):
    """M of the communication loss: the device limit of group-limited routing, else min(k, D)."""
    if cfg.topk_method == "group_limited_greedy":
        return cfg.topk_group
    return min(cfg.num_experts_per_tok, cfg.moe_num_devices)


# ============================================================================================== Router
ROUTER_CASES = {
    "greedy-k2": dict(n_routed_experts=8, num_experts_per_tok=2),
    "greedy-k3-norm": dict(n_routed_experts=8, num_experts_per_tok=3, norm_topk_prob=True),
    "greedy-k1-norm-scales": dict(n_routed_experts=4, num_experts_per_tok=1, norm_topk_prob=True,
                                  routed_scaling_factor=2.5),        # top_k == 1: scaled, never normalised
    "group-16e-4g-top2-k3": dict(n_routed_experts=16, num_experts_per_tok=3, topk_method="group_limited_greedy",
                                 n_group=4, topk_group=2, routed_scaling_factor=16.0),
    "group-16e-8g-top3-k4-norm": dict(n_routed_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                                      topk_method="group_limited_greedy", n_group=8, topk_group=3),
    "group-8e-4g-top1-k2": dict(n_routed_experts=8, num_experts_per_tok=2, topk_method="group_limited_greedy",
                                n_group=4, topk_group=1, routed_scaling_factor=3.0),
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_router_matches_released_gate(case):
    cfg = make_config(**ROUTER_CASES[case])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, cfg.hidden_size)).astype(np.float32)
    router = Router(cfg)
    scores, idx, weights = router(Tensor(x))
    assert idx.dtype == mstype.int32 and weights.dtype == mstype.float32 and scores.dtype == mstype.float32
    k = cfg.num_experts_per_tok
    assert idx.shape == (64, k) and weights.shape == (64, k) and scores.shape == (64, cfg.n_routed_experts)
    w_router = router.weight.asnumpy()
    r_scores, r_idx, r_weights = ref.gate(x, w_router, k, cfg.topk_method, cfg.n_group or 1, cfg.topk_group or 1,
                                          cfg.norm_topk_prob, cfg.routed_scaling_factor)
    np.testing.assert_allclose(scores.asnumpy(), r_scores, rtol=RTOL, atol=1e-6)
    m_idx, m_w = by_expert(idx.asnumpy(), weights.asnumpy())
    e_idx, e_w = by_expert(r_idx, r_weights)
    np.testing.assert_array_equal(m_idx, e_idx, err_msg=f"{case}: chosen expert sets differ from the released gate")
    np.testing.assert_allclose(m_w, e_w, rtol=RTOL, atol=1e-6, err_msg=f"{case}: top-k weights differ")
    if cfg.norm_topk_prob and k > 1:
        np.testing.assert_allclose(weights.asnumpy().sum(1), 1.0, rtol=1e-5)
    if cfg.topk_method == "group_limited_greedy":
        per_group = cfg.n_routed_experts // cfg.n_group
        groups = [len(set((m_idx[t] // per_group).tolist())) for t in range(64)]
        assert max(groups) <= cfg.topk_group
        # the case must exercise the group limit: plain top-k would pick differently for some token
        plain = np.sort(np.argsort(-r_scores, axis=1)[:, :k], axis=1)
        assert (plain != m_idx).any(), f"{case}: the group limit never mattered; the case tests nothing"


# ============================================================================================== RoutedExperts
# (tokens, experts, top_k, moe_block_size, routing); routing "random" or a fixed expert list every token picks
EXPERT_CASES = {
    "Tk<E-auto": (3, 16, 2, None, "random"),
    "Tk>>E-auto": (64, 4, 2, None, "random"),
    "block1": (20, 8, 3, 1, "random"),
    "block3": (20, 8, 3, 3, "random"),
    "block64": (20, 8, 3, 64, "random"),
    "skewed-auto": (40, 8, 2, None, [5, 2]),
    "skewed-block3": (13, 8, 3, 3, [7, 0, 3]),
    "each-expert-once-block64": (4, 8, 2, 64, "once"),
    "decode-one-token": (1, 16, 4, None, "random"),
    "k1-auto": (9, 4, 1, None, "random"),
}


def case_routing(rng, tokens, experts, k, routing):
    idx, weights = random_routing(rng, tokens, experts, k)
    if routing == "once":
        idx = rng.permutation(experts)[:tokens * k].reshape(tokens, k).astype(np.int32)
    elif routing != "random":
        idx = np.tile(np.asarray(routing, np.int32), (tokens, 1))
    return idx, weights


def run_experts(cell, x, idx, weights, keep=None):
    out = cell(Tensor(x), Tensor(idx), Tensor(weights),
               None if keep is None else Tensor(keep.astype(np.float32)))
    assert out.shape == x.shape and out.dtype == mstype.float32
    return out.asnumpy()


def expert_arrays(cell):
    return cell.w1.asnumpy(), cell.w3.asnumpy(), cell.w2.asnumpy()


@pytest.mark.parametrize("case", list(EXPERT_CASES))
def test_routed_experts_equal_naive_loop(case):
    tokens, experts, k, block, routing = EXPERT_CASES[case]
    cfg = make_config(n_routed_experts=experts, num_experts_per_tok=k, moe_block_size=block)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((tokens, cfg.hidden_size)).astype(np.float32)
    idx, weights = case_routing(rng, tokens, experts, k, routing)
    cell = RoutedExperts(cfg)
    out = run_experts(cell, x, idx, weights)
    expected = ref.naive_routed_experts(x, idx, weights, *expert_arrays(cell))
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL, err_msg=case)
    assert np.abs(expected).max() > 1.0, "reference output is tiny; the comparison would be vacuous"


@pytest.mark.parametrize("block", [None, 3])
def test_routed_experts_keep_mask_removes_assignments(block):
    cfg = make_config(n_routed_experts=8, num_experts_per_tok=3, moe_block_size=block)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((15, cfg.hidden_size)).astype(np.float32)
    idx, weights = random_routing(rng, 15, 8, 3)
    keep = rng.random((15, 3)) < 0.6
    keep[0] = False                                     # a token with every assignment dropped outputs zeros
    cell = RoutedExperts(cfg)
    out = run_experts(cell, x, idx, weights, keep)
    expected = ref.naive_routed_experts(x, idx, weights, *expert_arrays(cell), keep=keep)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(out[0], 0.0)
    full = ref.naive_routed_experts(x, idx, weights, *expert_arrays(cell))
    assert np.abs(full - expected).max() > 1e-2, "dropping changed nothing; the case tests nothing"


def test_routed_experts_graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = make_config(n_routed_experts=8, num_experts_per_tok=2, moe_block_size=3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((24, cfg.hidden_size)).astype(np.float32)
    idx, weights = random_routing(rng, 24, 8, 2)
    idx[:12] = [1, 6]                                                  # half the tokens crowd two experts
    cell = RoutedExperts(cfg)
    out = run_experts(cell, x, idx, weights)
    expected = ref.naive_routed_experts(x, idx, weights, *expert_arrays(cell))
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)



# ---------------------------------------------------------------------------------------------- per assignment
@pytest.mark.parametrize("tokens, experts, k, chosen", [(1, 16, 4, True), (2, 64, 6, True), (9, 4, 1, True),
                                                        (64, 8, 2, False)])
def test_per_assignment_dispatch_is_chosen_from_static_shapes(tokens, experts, k, chosen):
    cell = RoutedExperts(make_config(n_routed_experts=experts, num_experts_per_tok=k))
    assert cell.gathers_per_assignment(tokens * k) is chosen
    cell.per_assignment = False                                        # the benchmark's A/B switch
    assert cell.gathers_per_assignment(tokens * k) is False


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("held", ["all", "half"])
def test_per_assignment_dispatch_equals_block_plan_with_dropping(mode, held):
    """Decode-sized input: the per-assignment dispatch gives the block plan's output and the naive loop's, with a
    keep mask (dropped assignments give exactly nothing) and with only part of the experts held (expert parallel)."""
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    cfg = make_config(n_routed_experts=16, num_experts_per_tok=4)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, cfg.hidden_size)).astype(np.float32)
    idx, weights = random_routing(rng, 3, 16, 4)
    keep = np.ones((3, 4), bool)
    keep[0, 1] = keep[2, :] = False
    if held == "all":
        cell = RoutedExperts(cfg)
    else:
        cell = _RoutedExperts(cfg, 8, first_expert=8)                  # experts 8..15 held here
    assert cell.gathers_per_assignment(3 * 4)
    out = run_experts(cell, x, idx, weights, keep)
    w1, w3, w2 = expert_arrays(cell)
    if held == "half":                                                 # the naive loop over all 16, 0..7 zero
        pad = lambda w: np.concatenate((np.zeros_like(w), w), 0)        # noqa: E731
        w1, w3, w2 = pad(w1), pad(w3), pad(w2)
    expected = ref.naive_routed_experts(x, idx, weights, w1, w3, w2, keep=keep & ((idx >= 8) if held == "half"
                                                                                  else True))
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(out[2], 0.0)
    plan = RoutedExperts(cfg) if held == "all" else _RoutedExperts(cfg, 8, first_expert=8)
    plan.per_assignment = False                                        # a fresh cell: graph mode compiles anew
    for name in ("w1", "w3", "w2"):
        getattr(plan, name).set_data(getattr(cell, name).value())
    blocks = run_experts(plan, x, idx, weights, keep)
    np.testing.assert_allclose(out, blocks, rtol=1e-6, atol=1e-6)
    assert np.abs(expected).max() > 1.0

# ---------------------------------------------------------------------------------------------- the static plan
def plans(experts, block):
    cfg = make_config(n_routed_experts=experts, num_experts_per_tok=1, moe_block_size=block, moe_intermediate_size=1,
                      hidden_size=2)
    return RoutedExperts(cfg).plan


@pytest.mark.parametrize("block", [None, 1, 3, 64])
def test_plan_rows_bounded_by_assignments_not_experts(block):
    for experts in (4, 8, 64, 256):
        plan = plans(experts, block)
        for n in (1, 2, 6, 31, 32, 33, 100, 257, 1000, 4096):
            rows_per_block, num_blocks = plan(n)
            busy = min(experts, n)
            assert isinstance(rows_per_block, int) and isinstance(num_blocks, int) and rows_per_block >= 1
            if block:
                assert rows_per_block == block
            rows = rows_per_block * num_blocks
            # room for the worst case: every busy expert's run padded by B - 1 rows
            assert rows >= n + busy * (rows_per_block - 1), (experts, block, n)
            assert num_blocks <= -(-n // rows_per_block) + busy, (experts, block, n)
            # T*k + min(E, T*k) * B, plus at most B - 1 for rounding T*k up to whole blocks
            assert rows <= n + busy * rows_per_block + rows_per_block - 1, (experts, block, n)
            if block is None:
                assert rows <= 2 * n + rows_per_block, f"automatic plan wastes rows: E={experts} n={n} -> {rows}"


@pytest.mark.parametrize("block", [None, 1, 3])
def test_plan_does_not_grow_with_experts(block):
    n = 32                                                             # T*k assignments
    small, large, huge = plans(8, block)(n), plans(256, block)(n), plans(1024, block)(n)
    b_large, nb_large = large
    assert nb_large <= -(-n // b_large) + min(256, n)
    assert large == huge, "past E = T*k more experts must not add rows"
    assert large[0] * large[1] <= n + n * large[0] + large[0] - 1
    assert small[0] * small[1] <= large[0] * large[1]


@pytest.mark.parametrize("k", [1, 2, 6])
def test_plan_decode_computes_exactly_k_rows(k):
    rows_per_block, num_blocks = plans(64, None)(k)
    assert rows_per_block == 1
    assert rows_per_block * num_blocks == k, f"decoding 1 token with top_k={k} computes {num_blocks} rows"


# ---------------------------------------------------------------------------------------------- gradients
def torch_routed(x, idx, weights, w1, w3, w2):
    """The routed experts in torch: out_t = sum_j weights_tj * w2_e(silu(w1_e x_t) * w3_e x_t), e = idx_tj."""
    out = torch.zeros_like(x)
    for j in range(idx.shape[1]):
        e = idx[:, j]
        gate_up = torch.nn.functional.silu(torch.einsum("th,tih->ti", x, w1[e])) * torch.einsum("th,tih->ti", x, w3[e])
        out = out + weights[:, j:j + 1] * torch.einsum("ti,thi->th", gate_up, w2[e])
    return out


def t64(a, grad=True):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


@pytest.mark.parametrize("tokens, experts, k, block, routing", [(3, 16, 2, None, "random"),
                                                                 (20, 4, 3, 3, "random"),
                                                                 (12, 8, 2, None, [4, 1])])
def test_routed_experts_gradients_match_torch(tokens, experts, k, block, routing):
    cfg = make_config(n_routed_experts=experts, num_experts_per_tok=k, moe_block_size=block)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((tokens, cfg.hidden_size)).astype(np.float32)
    idx, weights = case_routing(rng, tokens, experts, k, routing)
    probe = rng.standard_normal((tokens, cfg.hidden_size)).astype(np.float32)
    cell = RoutedExperts(cfg)
    idx_t, probe_t = Tensor(idx), Tensor(probe)

    def loss(x_in, w_in):
        return (cell(x_in, idx_t, w_in) * probe_t).sum()

    params = cell.trainable_params()
    (gx, gw), gparams = ms.grad(loss, grad_position=(0, 1), weights=params)(Tensor(x), Tensor(weights))
    names = [p.name.split(".")[-1] for p in params]                     # w1 / w3 / w2
    tx, tw = t64(x), t64(weights)
    tparams = {name: t64(p.asnumpy()) for name, p in zip(names, params)}
    (torch_routed(tx, torch.tensor(idx, dtype=torch.long), tw, tparams["w1"], tparams["w3"], tparams["w2"])
     * t64(probe, False)).sum().backward()
    np.testing.assert_allclose(gx.asnumpy(), tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw.asnumpy(), tw.grad.numpy(), rtol=1e-4, atol=1e-5)
    for name, g in zip(names, gparams):
        expected = tparams[name].grad.numpy()
        np.testing.assert_allclose(g.asnumpy(), expected, rtol=1e-4, atol=1e-5, err_msg=f"d loss / d {name}")
        unused = np.setdiff1d(np.arange(experts), idx)
        np.testing.assert_array_equal(g.asnumpy()[unused], 0.0)      # unchosen experts get no gradient
        assert np.abs(expected).max() > 1e-3


def torch_balance(scores, idx, batch, experts, k, devices, limit):
    """balance_losses in torch, differentiable w.r.t. scores (idx is a constant)."""
    seq = scores.shape[0] // batch
    chosen = torch.zeros(scores.shape, dtype=scores.dtype).scatter_(1, idx, 1.0).view(batch, seq, experts)
    f = chosen.sum(1) * experts / (k * seq)
    p = scores.view(batch, seq, experts).mean(1)
    per = experts // devices
    p_dev = p.view(batch, devices, per).sum(-1)
    expert = (f * p).sum(-1).mean()
    device = (f.view(batch, devices, per).mean(-1) * p_dev).sum(-1).mean()
    sent = chosen.view(batch, seq, devices, per).amax(-1)
    comm = (sent.sum(1) * devices / (limit * seq) * p_dev).sum(-1).mean()
    return expert, device, comm


def torch_moe(x, params, cfg, batch=None):
    """DeepSeekMoE (no dropping) in torch: (out (T, h), aux, topk idx); aux only when batch is given (training)."""
    k, experts = cfg.num_experts_per_tok, cfg.n_routed_experts
    scores = torch.softmax(x @ params["router"].T, -1)
    masked = scores
    if cfg.topk_method == "group_limited_greedy":
        grouped = scores.view(x.shape[0], cfg.n_group, -1)
        group_idx = torch.topk(grouped.amax(-1), cfg.topk_group, -1).indices
        mask = torch.zeros(x.shape[0], cfg.n_group, dtype=x.dtype).scatter_(1, group_idx, 1.0)
        masked = scores * mask.repeat_interleave(experts // cfg.n_group, 1)
    weights, idx = torch.topk(masked, k, -1)
    if k > 1 and cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    else:
        weights = weights * cfg.routed_scaling_factor
    out = torch_routed(x, idx, weights, params["w1"], params["w3"], params["w2"])
    if "sw1" in params:
        out = out + torch.nn.functional.linear(torch.nn.functional.silu(x @ params["sw1"].T) * (x @ params["sw3"].T),
                                               params["sw2"])
    aux = torch.zeros((), dtype=x.dtype)
    if batch:
        losses = torch_balance(scores, idx, batch, experts, k, cfg.moe_num_devices,
                               num_devices_limit(cfg))
        alphas = (cfg.aux_loss_alpha, cfg.device_aux_loss_alpha, cfg.comm_aux_loss_alpha)
        aux = sum(a * l for a, l in zip(alphas, losses))
    return out, aux, idx


MOE_CASES = {
    "group-limited": dict(n_routed_experts=8, num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
                          topk_group=2, moe_num_devices=4, n_shared_experts=2, routed_scaling_factor=2.0,
                          aux_loss_alpha=0.003, device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02),
    "greedy-norm": dict(n_routed_experts=8, num_experts_per_tok=2, moe_num_devices=2, n_shared_experts=1,
                        norm_topk_prob=True, aux_loss_alpha=0.01, device_aux_loss_alpha=0.04,
                        comm_aux_loss_alpha=0.03),
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_gradients_reach_router_through_weights_and_losses(case):
    cfg = make_config(**MOE_CASES[case])
    batch, seq = 2, 5
    rng = np.random.default_rng(6)
    x = rng.standard_normal((batch, seq, cfg.hidden_size)).astype(np.float32)
    probe = rng.standard_normal(x.shape).astype(np.float32)
    moe = DeepSeekMoE(cfg)
    moe.set_train(True)
    params = moe.trainable_params()
    router_pos = [i for i, p in enumerate(params) if p.name.endswith("router.weight")]
    assert len(router_pos) == 1
    probe_t = Tensor(probe)

    def out_loss(x_in):
        return (moe(x_in)[0] * probe_t).sum()

    def aux_loss(x_in):
        return moe(x_in)[1]

    g_out = ms.grad(out_loss, grad_position=None, weights=params)(Tensor(x))
    g_aux = ms.grad(aux_loss, grad_position=None, weights=params)(Tensor(x))

    arrays = moe_params(moe)
    key = {"router.weight": "router", "routed_experts.w1": "w1",
           "routed_experts.w3": "w3", "routed_experts.w2": "w2",
           "shared_experts.w1.weight": "sw1", "shared_experts.w3.weight": "sw3", "shared_experts.w2.weight": "sw2"}
    for which, grads in (("output", g_out), ("aux", g_aux)):
        tparams = {name: t64(a) for name, a in arrays.items()}
        out, aux, _ = torch_moe(t64(x.reshape(-1, cfg.hidden_size), False), tparams, cfg, batch=batch)
        target = (out * t64(probe.reshape(out.shape), False)).sum() if which == "output" else aux
        target.backward()
        for p, g in zip(params, grads):
            name = key[p.name]
            expected = tparams[name].grad
            expected = np.zeros(p.shape) if expected is None else expected.numpy()
            np.testing.assert_allclose(g.asnumpy(), expected, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{case}: d {which} / d {p.name}")
        router_grad = grads[router_pos[0]].asnumpy()
        assert np.abs(router_grad).max() > 1e-4, f"{case}: no gradient reaches the router through the {which}"


# ============================================================================================== balance losses
def released_seq_aux(scores, idx, batch, experts, k):
    """The released DeepSeek-V2 MoEGate seq_aux loss (before alpha), written as the released code does."""
    scores = torch.tensor(scores, dtype=torch.float64)
    idx = torch.tensor(idx, dtype=torch.long)
    seq = scores.shape[0] // batch
    topk_idx_for_aux_loss = idx.view(batch, -1)
    ce = torch.zeros(batch, experts, dtype=torch.float64)
    ce.scatter_add_(1, topk_idx_for_aux_loss, torch.ones(batch, seq * k, dtype=torch.float64)).div_(
        seq * k / experts)
    return float((ce * scores.view(batch, seq, experts).mean(dim=1)).sum(dim=1).mean())


@pytest.mark.parametrize("devices, limit", [(1, 1), (2, 2), (4, 2), (4, 3), (8, 3)])
def test_balance_losses_match_paper(devices, limit):
    batch, seq, experts, k = 3, 7, 8, 3
    rng = np.random.default_rng(7)
    scores = ref.softmax(3.0 * rng.standard_normal((batch * seq, experts))).astype(np.float32)
    idx, _ = random_routing(rng, batch * seq, experts, k)
    idx[:seq, 0] = 5                                                   # an imbalanced first sequence
    idx[:seq, 1:] = np.where(idx[:seq, 1:] == 5, 6, idx[:seq, 1:])
    got = [float(v.asnumpy()) for v in balance_losses(Tensor(scores), Tensor(idx), batch, experts, k, devices,
                                                       limit)]
    expected = ref.paper_balance_losses(scores, idx, batch, experts, k, devices, limit)
    np.testing.assert_allclose(got, expected, rtol=RTOL, err_msg=f"(expert, device, comm) D={devices} M={limit}")
    np.testing.assert_allclose(got[0], released_seq_aux(scores, idx, batch, experts, k), rtol=RTOL)
    # batch averaging is per sequence: the single-sequence losses average to the batch loss
    singles = [ref.paper_balance_losses(scores[b * seq:(b + 1) * seq], idx[b * seq:(b + 1) * seq], 1, experts,
                                        k, devices, limit) for b in range(batch)]
    np.testing.assert_allclose(got, np.mean(singles, 0), rtol=RTOL)
    if devices == experts:                                   # one expert per device: device loss = expert loss
        np.testing.assert_allclose(got[1], got[0], rtol=RTOL)
    if devices == 1:                                         # f' = 1, P' = 1, f'' = 1 (every token to the one device)
        np.testing.assert_allclose(got[1:], [1.0, 1.0], rtol=RTOL)


def test_balance_losses_uniform_routing_is_one():
    """Perfectly uniform affinities and perfectly balanced choices: every f_i = 1, so L_ExpBal = sum P_i = 1."""
    experts, k, seq = 4, 2, 4
    scores = np.full((seq, experts), 1.0 / experts, np.float32)
    idx = np.array([[0, 1], [2, 3], [0, 2], [1, 3]], np.int32)
    expert, device, _ = balance_losses(Tensor(scores), Tensor(idx), 1, experts, k, 2, 2)
    np.testing.assert_allclose([float(expert.asnumpy()), float(device.asnumpy())], [1.0, 1.0], rtol=1e-6)


# ============================================================================================== DeepSeekMoE
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_aux_loss_and_modes(case):
    cfg = make_config(**MOE_CASES[case])
    batch, seq = 3, 6
    rng = np.random.default_rng(8)
    x = rng.standard_normal((batch, seq, cfg.hidden_size)).astype(np.float32)
    moe = DeepSeekMoE(cfg)
    flat = x.reshape(-1, cfg.hidden_size)
    expected_out, scores, idx, _ = ref.moe_layer(flat, moe_params(moe), cfg)
    losses = ref.paper_balance_losses(scores, idx, batch, cfg.n_routed_experts, cfg.num_experts_per_tok,
                                      cfg.moe_num_devices, num_devices_limit(cfg))
    alphas = (cfg.aux_loss_alpha, cfg.device_aux_loss_alpha, cfg.comm_aux_loss_alpha)
    expected_aux = sum(a * l for a, l in zip(alphas, losses))

    moe.set_train(True)
    out_train, aux_train = moe(Tensor(x))
    assert out_train.shape == x.shape and aux_train.shape == ()
    np.testing.assert_allclose(float(aux_train.asnumpy()), expected_aux, rtol=RTOL)
    np.testing.assert_allclose(out_train.asnumpy().reshape(flat.shape), expected_out, rtol=RTOL, atol=ATOL)

    moe.set_train(False)
    out_eval, aux_eval = moe(Tensor(x))
    assert float(aux_eval.asnumpy()) == 0.0
    np.testing.assert_array_equal(out_eval.asnumpy(), out_train.asnumpy())   # capacity_factor = 0: no dropping


def test_seq_aux_false_balances_over_the_whole_batch():
    """seq_aux False (the released code's batch-level loss): L_ExpBal = sum_i f_i P_i with f_i = E x the share of the
    batch's b*s*k assignments that chose expert i and P_i the mean affinity over its b*s tokens, written out here
    as the released code does; seq_aux True gives the per-sequence mean instead, a different number."""
    fields = dict(MOE_CASES["greedy-norm"], device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0)
    x = np.random.default_rng(11).standard_normal((3, 5, 16)).astype(np.float32)
    aux, weights = {}, None
    for seq_aux in (False, True):
        moe = DeepSeekMoE(make_config(**fields, seq_aux=seq_aux))
        if weights is None:
            weights = {p.name: p.asnumpy().copy() for p in moe.get_parameters()}
            scores, idx, _ = (t.asnumpy() for t in moe.router(Tensor(x.reshape(-1, 16))))
        else:                                                            # the same weights both ways
            ms.load_param_into_net(moe, {n: ms.Parameter(Tensor(v), name=n) for n, v in weights.items()})
        moe.set_train(True)
        aux[seq_aux] = float(moe(Tensor(x))[1].asnumpy())
    experts = fields["n_routed_experts"]
    share = np.eye(experts)[idx.reshape(-1)].mean(0)                     # (E,) over all b*s*k assignments
    expected = fields["aux_loss_alpha"] * float((scores.mean(0) * share * experts).sum())
    np.testing.assert_allclose(aux[False], expected, rtol=1e-5)
    per_sequence = ref.paper_balance_losses(scores, idx, 3, experts, fields["num_experts_per_tok"],
                                            fields["moe_num_devices"], 2)[0] * fields["aux_loss_alpha"]
    np.testing.assert_allclose(aux[True], per_sequence, rtol=1e-5)
    assert abs(aux[True] - aux[False]) > 1e-6


def test_moe_aux_zero_when_alphas_zero():
    cfg = make_config(**dict(MOE_CASES["greedy-norm"], aux_loss_alpha=0.0, device_aux_loss_alpha=0.0,
                             comm_aux_loss_alpha=0.0))
    moe = DeepSeekMoE(cfg)
    moe.set_train(True)
    _, aux = moe(Tensor(np.random.default_rng(9).standard_normal((2, 4, 16)).astype(np.float32)))
    assert float(aux.asnumpy()) == 0.0


# ---------------------------------------------------------------------------------------------- token dropping
DROP = dict(MOE_CASES["group-limited"], capacity_factor=1.0)


def drop_setup(seed=10, batch=2, seq=8, groups=1, **fields):
    cfg = make_config(**dict(DROP, **fields))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq, cfg.hidden_size)).astype(np.float32)
    moe = DeepSeekMoE(cfg, LocalShape(token_groups=groups))
    flat = x.reshape(-1, cfg.hidden_size)
    scores, idx, weights = moe.router(Tensor(flat))
    return cfg, moe, x, flat, scores.asnumpy(), idx.asnumpy(), weights.asnumpy()


def oracle_keep(cfg, scores, idx):
    affinity = np.take_along_axis(scores, idx.astype(np.int64), 1)            # s_{i,t} of each chosen pair
    return ref.drop_keep(affinity, idx, cfg.n_routed_experts, cfg.moe_num_devices, cfg.capacity_factor)


def test_drop_mask_keeps_highest_affinity_within_budget():
    cfg, moe, _, _, scores, idx, weights = drop_setup()
    n, devices = idx.size, cfg.moe_num_devices
    capacity = math.ceil(cfg.capacity_factor * n / devices)
    keep = moe.drop_mask(Tensor(idx), Tensor(weights)).asnumpy()
    assert keep.shape == idx.shape and set(np.unique(keep)) <= {0.0, 1.0}
    device = ref.device_of(idx, cfg.n_routed_experts, devices)
    loads = [int((device == d).sum()) for d in range(devices)]
    assert max(loads) > capacity, f"loads {loads} never exceed the budget {capacity}: the case tests nothing"
    for d in range(devices):
        kept = int(keep[device == d].sum())
        assert kept == min(capacity, loads[d]), f"device {d}: kept {kept} of {loads[d]}, budget {capacity}"
    np.testing.assert_array_equal(keep.astype(bool), oracle_keep(cfg, scores, idx))


def test_dropped_assignments_contribute_nothing():
    cfg, moe, x, flat, scores, idx, weights = drop_setup()
    keep = oracle_keep(cfg, scores, idx)
    assert not keep.all()
    params = moe_params(moe)
    moe.set_train(True)
    out, _ = moe(Tensor(x))
    expected = ref.naive_routed_experts(flat, idx, weights, params["w1"], params["w3"], params["w2"], keep=keep) + \
        ref.shared_ffn(flat, params["sw1"], params["sw3"], params["sw2"])
    np.testing.assert_allclose(out.asnumpy().reshape(flat.shape), expected, rtol=RTOL, atol=ATOL)
    undropped, _, _, _ = ref.moe_layer(flat, params, cfg)
    assert np.abs(undropped - expected).max() > 1e-2

    moe.set_train(False)                                                       # eval never drops
    out_eval, aux_eval = moe(Tensor(x))
    np.testing.assert_allclose(out_eval.asnumpy().reshape(flat.shape), undropped, rtol=RTOL, atol=ATOL)
    assert float(aux_eval.asnumpy()) == 0.0


def test_large_capacity_drops_nothing():
    cfg, moe, x, flat, _, idx, weights = drop_setup(capacity_factor=100.0)
    np.testing.assert_array_equal(moe.drop_mask(Tensor(idx), Tensor(weights)).asnumpy(), 1.0)
    moe.set_train(True)
    out_train, _ = moe(Tensor(x))
    moe.set_train(False)
    out_eval, _ = moe(Tensor(x))
    np.testing.assert_allclose(out_train.asnumpy(), out_eval.asnumpy(), rtol=1e-6, atol=1e-6)
    expected, _, _, _ = ref.moe_layer(flat, moe_params(moe), cfg)
    np.testing.assert_allclose(out_train.asnumpy().reshape(flat.shape), expected, rtol=RTOL, atol=ATOL)


def test_drop_mask_ranks_by_affinity_when_weights_are_normalised():
    cfg, moe, x, flat, scores, idx, weights = drop_setup(
        seed=12, norm_topk_prob=True, topk_method="greedy", n_group=None, topk_group=None, num_experts_per_tok=2)
    params = moe_params(moe)
    keep = oracle_keep(cfg, scores, idx)
    by_weight = ref.drop_keep(weights, idx, cfg.n_routed_experts, cfg.moe_num_devices, cfg.capacity_factor)
    assert (keep != by_weight).any(), "ranking by affinity and by normalised weight agree: the case tests nothing"
    moe.set_train(True)
    out, _ = moe(Tensor(x))
    expected = ref.naive_routed_experts(flat, idx, weights, params["w1"], params["w3"], params["w2"], keep=keep) + \
        ref.shared_ffn(flat, params["sw1"], params["sw3"], params["sw2"])
    np.testing.assert_allclose(out.asnumpy().reshape(flat.shape), expected, rtol=RTOL, atol=ATOL)


def test_moe_dropping_graph_mode():
    cfg, moe, x, flat, scores, idx, weights = drop_setup(seed=12)
    ms.set_context(mode=ms.GRAPH_MODE)
    keep = oracle_keep(cfg, scores, idx)
    assert not keep.all()
    params = moe_params(moe)
    losses = ref.paper_balance_losses(scores, idx, 2, cfg.n_routed_experts, cfg.num_experts_per_tok,
                                      cfg.moe_num_devices, num_devices_limit(cfg))
    moe.set_train(True)
    out, aux = moe(Tensor(x))
    expected = ref.naive_routed_experts(flat, idx, weights, params["w1"], params["w3"], params["w2"], keep=keep) + \
        ref.shared_ffn(flat, params["sw1"], params["sw3"], params["sw2"])
    np.testing.assert_allclose(out.asnumpy().reshape(flat.shape), expected, rtol=RTOL, atol=ATOL)
    alphas = (cfg.aux_loss_alpha, cfg.device_aux_loss_alpha, cfg.comm_aux_loss_alpha)
    np.testing.assert_allclose(float(aux.asnumpy()), sum(a * l for a, l in zip(alphas, losses)), rtol=RTOL)


# ============================================================================ capacity dispatch (expert-parallel layout)
def test_rank_within_matches_numpy():
    rng = np.random.default_rng(20)
    bucket = rng.integers(0, 5, (3, 17)).astype(np.int32)
    priority = rng.random((3, 17)).astype(np.float32)
    priority[1, :4] = -1.0                                               # "dropped" items rank after the real ones
    got = RankWithin(5)(Tensor(bucket), Tensor(priority)).asnumpy()
    np.testing.assert_array_equal(got, ref.rank_within(bucket, priority))


def test_capacity_rule():
    cell = RoutedExperts(make_config(moe_dispatch="capacity", expert_capacity_factor=1.5))   # E 8, k 2
    assert cell.capacity(20) == math.ceil(1.5 * 20 * 2 / 8) == 8
    assert cell.capacity(2) == 1                                        # ceil(0.75) = 1
    assert RoutedExperts(make_config(moe_dispatch="capacity", expert_capacity_factor=100.0)).capacity(20) == 20
    assert RoutedExperts(make_config(moe_dispatch="capacity")).capacity(20) == 20                  # 0: never drops


def capacity_cell(groups, **fields):
    cell = RoutedExperts(make_config(moe_dispatch="capacity", **fields), groups)
    cell.set_train(True)                                                 # the capacity dispatch is for training
    return cell


def test_capacity_dispatch_is_for_training_only():
    rng = np.random.default_rng(24)
    cell = capacity_cell(1, n_routed_experts=8, num_experts_per_tok=2, expert_capacity_factor=0.5)
    x = rng.standard_normal((24, cell.hidden_size)).astype(np.float32)
    idx, weights = random_routing(rng, 24, 8, 2)
    idx[:12] = [1, 6]
    full = ref.naive_routed_experts(x, idx, weights, *expert_arrays(cell))
    assert np.abs(run_experts(cell, x, idx, weights) - full).max() > 1e-2          # training: over capacity drops
    cell.set_train(False)
    np.testing.assert_allclose(run_experts(cell, x, idx, weights), full, rtol=RTOL, atol=ATOL)   # inference: never


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("case", ["Tk>>E-auto", "skewed-auto", "each-expert-once-block64", "k1-auto"])
def test_capacity_dispatch_without_overflow_equals_naive_loop(case, groups):
    tokens, experts, k, _, routing = EXPERT_CASES[case]
    tokens = tokens - tokens % groups or groups
    rng = np.random.default_rng(21)
    cell = capacity_cell(groups, n_routed_experts=experts, num_experts_per_tok=k)
    x = rng.standard_normal((tokens, cell.hidden_size)).astype(np.float32)
    idx, weights = case_routing(rng, tokens, experts, k, routing)
    keep = rng.random((tokens, k)) < 0.7
    for mask in (None, keep):
        out = run_experts(cell, x, idx, weights, mask)
        expected = ref.naive_routed_experts(x, idx, weights, *expert_arrays(cell), keep=mask)
        np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL, err_msg=case)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_capacity_dispatch_keeps_the_highest_affinity_per_expert_and_group(mode):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    rng = np.random.default_rng(22)
    tokens, experts, k, groups = 24, 8, 2, 2
    cell = capacity_cell(groups, n_routed_experts=experts, num_experts_per_tok=k, expert_capacity_factor=1.0)
    capacity = cell.capacity(tokens // groups)
    x = rng.standard_normal((tokens, cell.hidden_size)).astype(np.float32)
    idx, weights = random_routing(rng, tokens, experts, k)
    idx[:9] = [1, 6]                                                     # the first group crowds two experts
    affinity = rng.random((tokens, k)).astype(np.float32)                # priority differs from the weights
    keep = ref.capacity_keep(affinity, idx, experts, capacity, groups)
    assert not keep.all() and (keep != ref.capacity_keep(affinity, idx, experts, capacity * groups)).any(), \
        "per-group budgets behave like one budget here: the case tests nothing"
    out = cell(Tensor(x), Tensor(idx), Tensor(weights), None, Tensor(affinity)).asnumpy()
    expected = ref.naive_routed_experts(x, idx, weights, *expert_arrays(cell), keep=keep)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    by_weight = ref.capacity_keep(weights, idx, experts, capacity, groups)
    assert (by_weight != keep).any()                                     # so ranking by affinity was checked


def test_capacity_dispatch_gradients_equal_dropless():
    rng = np.random.default_rng(23)
    tokens, experts, k = 16, 4, 2
    x = rng.standard_normal((tokens, 16)).astype(np.float32)
    idx, weights = random_routing(rng, tokens, experts, k)
    probe = Tensor(rng.standard_normal((tokens, 16)).astype(np.float32))
    grads = []
    for dispatch in ("dropless", "capacity"):
        ms.set_seed(7)
        cell = RoutedExperts(make_config(n_routed_experts=experts, num_experts_per_tok=k, moe_dispatch=dispatch), 2)
        cell.set_train(True)

        def loss(x_in, w_in, cell=cell):
            return (cell(x_in, Tensor(idx), w_in) * probe).sum()

        (gx, gw), gparams = ms.grad(loss, grad_position=(0, 1), weights=cell.trainable_params())(
            Tensor(x), Tensor(weights))
        grads.append([gx.asnumpy(), gw.asnumpy()] + [g.asnumpy() for g in gparams])
    for dropless, capacity in zip(*grads):
        # the two dispatches sum the same float32 products in different orders (and thread counts change the
        # order again): each gradient entry sums up to 16 tokens x 2 experts x 16-wide products, so agreement is
        # to a few ulps of the largest entry, not of each entry
        scale = np.abs(dropless).max()
        np.testing.assert_allclose(capacity, dropless, rtol=1e-5, atol=1e-5 * max(scale, 1.0))
        assert scale > 1e-3


def test_moe_capacity_dispatch_after_device_dropping_per_group():
    """Training with both budgets, two data-parallel groups: device-level dropping (capacity_factor, per group) and
    then the experts' buffers (expert_capacity_factor) - each keeps the highest affinities."""
    cfg, moe, x, flat, scores, idx, weights = drop_setup(seed=13, batch=4, groups=2, moe_dispatch="capacity",
                                                         expert_capacity_factor=1.0, capacity_factor=1.2)
    affinity = np.take_along_axis(scores, idx.astype(np.int64), 1)
    device_keep = ref.drop_keep(affinity, idx, cfg.n_routed_experts, cfg.moe_num_devices, cfg.capacity_factor, 2)
    np.testing.assert_array_equal(moe.drop_mask(Tensor(idx), Tensor(affinity)).asnumpy().astype(bool), device_keep)
    capacity = moe.routed_experts.capacity(idx.shape[0] // 2)
    keep = ref.capacity_keep(affinity, idx, cfg.n_routed_experts, capacity, 2, keep=device_keep)
    assert not device_keep.all() and (keep != device_keep).any(), "one of the budgets never binds: tests nothing"
    params = moe_params(moe)
    moe.set_train(True)
    out, _ = moe(Tensor(x))
    expected = ref.naive_routed_experts(flat, idx, weights, params["w1"], params["w3"], params["w2"], keep=keep) + \
        ref.shared_ffn(flat, params["sw1"], params["sw3"], params["sw2"])
    np.testing.assert_allclose(out.asnumpy().reshape(flat.shape), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("field, value, text", [("moe_dispatch", "alltoall", "expected one of"),
                                                ("expert_capacity_factor", -1.0, "expected >= 0")])
def test_capacity_config_errors_name_the_field(field, value, text):
    with pytest.raises(ValueError, match=f"DeepseekV2Config.{field} = .*{text}"):
        make_config(**{field: value})


# ---------------------------------------------------------------------------------------------- never-dropped sequences
def test_exempt_assignments_are_kept_and_take_the_budget_first():
    cfg, moe, _, _, scores, idx, _ = drop_setup(seed=14, batch=4)
    affinity = np.take_along_axis(scores, idx.astype(np.int64), 1)
    seq = idx.shape[0] // 4
    exempt = np.zeros(idx.shape, dtype=bool)
    exempt[seq:2 * seq] = True                                           # sequence 1 is never dropped
    keep = moe.drop_mask(Tensor(idx), Tensor(affinity), Tensor(exempt.astype(np.float32))).asnumpy().astype(bool)
    expected = ref.drop_keep(affinity, idx, cfg.n_routed_experts, cfg.moe_num_devices, cfg.capacity_factor,
                             exempt=exempt)
    np.testing.assert_array_equal(keep, expected)
    assert keep[exempt].all()
    plain = ref.drop_keep(affinity, idx, cfg.n_routed_experts, cfg.moe_num_devices, cfg.capacity_factor)
    assert not plain[exempt].all(), "sequence 1 would keep everything anyway: the case tests nothing"
    assert (keep[~exempt] != plain[~exempt]).any()                       # the others lost budget to it


def test_never_drop_share_of_sequences():
    cfg = make_config(**dict(DROP, never_drop_seq_ratio=0.3))
    moe = DeepSeekMoE(cfg)
    chosen = moe.exempt_sequences(2000, 3).asnumpy().reshape(2000, 3 * cfg.num_experts_per_tok)
    assert (chosen == chosen[:, :1]).all()                               # whole sequences
    assert abs(chosen[:, 0].mean() - 0.3) < 0.05
    draws = [moe.exempt_sequences(64, 1).asnumpy()[:, 0] for _ in range(2)]
    assert (draws[0] != draws[1]).any()                                  # drawn afresh every step


def test_all_sequences_exempt_means_nothing_dropped():
    cfg, moe, x, flat, scores, idx, weights = drop_setup(seed=10, never_drop_seq_ratio=1.0)
    moe.set_train(True)
    out_train, _ = moe(Tensor(x))
    params = moe_params(moe)
    expected, _, _, _ = ref.moe_layer(flat, params, cfg)
    np.testing.assert_allclose(out_train.asnumpy().reshape(flat.shape), expected, rtol=RTOL, atol=ATOL)
    dropped = ref.naive_routed_experts(flat, idx, weights, params["w1"], params["w3"], params["w2"],
                                       keep=oracle_keep(cfg, scores, idx))
    assert np.abs(dropped + ref.shared_ffn(flat, params["sw1"], params["sw3"], params["sw2"]) - expected).max() > 1e-2, \
        "the budget never binds: the case tests nothing"


def test_never_drop_ratio_must_be_a_share():
    with pytest.raises(ValueError, match="DeepseekV2Config.never_drop_seq_ratio = 1.5"):
        make_config(never_drop_seq_ratio=1.5)


def test_never_drop_graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    cfg, moe, x, flat, _, _, _ = drop_setup(seed=12, never_drop_seq_ratio=1.0, moe_dispatch="capacity")
    moe.set_train(True)
    out, _ = moe(Tensor(x))
    expected, _, _, _ = ref.moe_layer(flat, moe_params(moe), cfg)
    np.testing.assert_allclose(out.asnumpy().reshape(flat.shape), expected, rtol=RTOL, atol=ATOL)
