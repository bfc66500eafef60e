"""CpuAdamW: torch.optim.AdamW's trajectory (bias correction folded into one AdamWeightDecay kernel per parameter),
MindFormers' AdamW's state names and parameter groups, in graph and PyNative mode; bad settings refused by name."""
import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from research.deepseek2.run.optim import CpuAdamW

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
SHAPES = {"w": (6, 5), "experts": (3, 4, 2), "norm": (5,)}
STEPS = 6


@pytest.fixture(params=sorted(MODES))
def mode(request):
    ms.set_context(mode=MODES[request.param])
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _start(seed=0):
    rng = np.random.RandomState(seed)
    weights = {k: rng.randn(*s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.randn(*s).astype(np.float32) * 10 ** rng.uniform(-4, 0) for k, s in SHAPES.items()}
             for _ in range(STEPS)]
    return weights, grads


class Step(nn.Cell):
    """The optimizer alone, fed given gradients (what TrainOneStepCell does after the backward)."""

    def __init__(self, opt):
        super().__init__()
        self.opt = opt

    def construct(self, *grads):
        return self.opt(grads)


def _run_ours(weights, grads, grouped, lr, **kw):
    params = [Parameter(Tensor(v), name=k) for k, v in weights.items()]
    if grouped:       # as MindFormers' Trainer groups them: decay on matrices, none on 1-D weights
        groups = [{"params": [p for p in params if len(p.shape) > 1], "weight_decay": 0.1},
                  {"params": [p for p in params if len(p.shape) == 1], "weight_decay": 0.0}]
        opt = CpuAdamW(groups, learning_rate=lr, **kw)
    else:
        opt = CpuAdamW(params, learning_rate=lr, weight_decay=0.1, **kw)
    step = Step(opt)
    for g in grads:
        step(*(Tensor(g[k]) for k in weights))                     # the Cell renames the parameters: by order
    return {k: p.asnumpy() for k, p in zip(weights, params)}, opt


def _run_torch(weights, grads, grouped, lr, betas=(0.9, 0.999), eps=1e-8):
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in weights.items()}
    if grouped:
        groups = [{"params": [p for p in params.values() if p.dim() > 1], "weight_decay": 0.1},
                  {"params": [p for p in params.values() if p.dim() == 1], "weight_decay": 0.0}]
    else:
        groups = [{"params": list(params.values()), "weight_decay": 0.1}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    for g in grads:
        for k, p in params.items():
            p.grad = torch.tensor(g[k])
        opt.step()
    return {k: p.detach().numpy() for k, p in params.items()}


@pytest.mark.parametrize("grouped", [False, True])
def test_follows_torch_adamw(mode, grouped):
    weights, grads = _start()
    ours, _ = _run_ours(weights, grads, grouped, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    theirs = _run_torch(weights, grads, grouped, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for name in SHAPES:
        moved = np.abs(theirs[name] - weights[name]).max()
        assert moved > 1e-2, name                                   # the steps did move every weight
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=2e-6 * max(1.0, moved), err_msg=name)


def test_a_learning_rate_per_group_follows_torch(mode):
    """Groups with their own "lr" (MindFormers' grouped_lr_schedule): each group steps with its own rate."""
    weights, grads = _start(2)
    params = [Parameter(Tensor(v), name=k) for k, v in weights.items()]
    opt = CpuAdamW([{"params": params[:1], "lr": 1e-1, "weight_decay": 0.1},
                    {"params": params[1:], "lr": 1e-3, "weight_decay": 0.0}], learning_rate=1e-2)
    step = Step(opt)
    for g in grads:
        step(*(Tensor(g[k]) for k in weights))
    torch_params = [torch.nn.Parameter(torch.tensor(v)) for v in weights.values()]
    torch_opt = torch.optim.AdamW([{"params": torch_params[:1], "lr": 1e-1, "weight_decay": 0.1},
                                   {"params": torch_params[1:], "lr": 1e-3, "weight_decay": 0.0}])
    for g in grads:
        for k, p in zip(weights, torch_params):
            p.grad = torch.tensor(g[k])
        torch_opt.step()
    for name, ours, theirs in zip(weights, params, torch_params):
        np.testing.assert_allclose(ours.asnumpy(), theirs.detach().numpy(), rtol=0, atol=2e-6, err_msg=name)
    moved = [np.abs(p.asnumpy() - w).max() for p, w in zip(params, weights.values())]
    assert moved[0] > 10 * moved[1]                                # lr 1e-1 against 1e-3


def test_a_decayed_weight_differs_from_an_undecayed_one():
    """The group's weight_decay reaches the kernel: decay 0.1 and 0 give different weights from the same start."""
    weights, grads = _start(1)
    flat, _ = _run_ours(weights, grads, grouped=False, lr=1e-1)
    grouped, _ = _run_ours(weights, grads, grouped=True, lr=1e-1)
    np.testing.assert_allclose(flat["w"], grouped["w"], rtol=1e-6)             # both decayed by 0.1
    assert np.abs(flat["norm"] - grouped["norm"]).max() > 1e-4                  # 0.1 against 0


def test_state_names_are_mindformers_adamw_s():
    from mindformers.core.optim import AdamW
    weights, _ = _start()
    names = {}
    for cls in (CpuAdamW, AdamW):
        params = [Parameter(Tensor(v), name=k) for k, v in weights.items()]
        names[cls.__name__] = sorted(p.name for _, p in cls(params, learning_rate=1e-3).parameters_and_names())
    ours, theirs = names["CpuAdamW"], names["AdamW"]
    assert [n for n in ours if n.startswith(("adam_m.", "adam_v."))] == \
        [n for n in theirs if n.startswith(("adam_m.", "adam_v."))] == \
        sorted([f"adam_m.{k}" for k in SHAPES] + [f"adam_v.{k}" for k in SHAPES])
    assert "global_step" in ours and "global_step" in theirs


def test_registered_for_yaml():
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    import research.deepseek2 as pkg
    pkg.register()
    assert MindFormerRegister.get_cls(MindFormerModuleType.OPTIMIZER, "CpuAdamW") is CpuAdamW


@pytest.mark.parametrize("kwargs, field", [({"swap": True}, "optimizer.swap"),
                                           ({"betas": (0.9,)}, "optimizer.betas"),
                                           ({"betas": (0.9, 1.0)}, "optimizer.betas[1]"),
                                           ({"eps": -1.0}, "optimizer.eps"),
                                           ({"weight_decay": -0.1}, "optimizer.weight_decay")])
def test_bad_settings_are_refused_by_name(kwargs, field):
    params = [Parameter(Tensor(np.zeros((2, 2), np.float32)), name="w")]
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        CpuAdamW(params, **kwargs)
