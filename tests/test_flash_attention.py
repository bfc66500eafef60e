"""``use_flash_attention``: the MLA training/prefill attention through ``mla.fused_attention`` (MindSpore's fused Ascend
kernel ``ops.flash_attention_score``), checked on CPU with a stand-in of the kernel written from basic ops.

The stand-in keeps the kernel's contract as ``fused_attention`` uses it (layout BNSD, q/k/v of one head dim, uint8
attn_mask with 1 = masked out, sparse_mode 0, the softmax scale as scalar_value, keep_prob 1.0, output BNSD in the
query's head dim) and refuses anything else. With it, the model's logits and the gradients of its training loss
w.r.t. every weight equal those of the basic-op path (use_flash_attention False) in GRAPH_MODE and PYNATIVE_MODE, for
a V2-layout and a Lite-layout tiny model; the stand-in is seen to run once a layer with the declared shapes (value
padded to the query/key head dim). The real kernel is not run here (CPU): without the stand-in the switch refuses at
construction, naming the key and Ascend.
"""
import copy

import numpy as np
import pytest
import mindspore as ms
from mindspore import ops, Parameter, Tensor
from mindspore.common import dtype as mstype

from research.deepseek2 import mla
import reference as R
from research.deepseek2.deepseek2 import DeepseekV2ForCausalLM
from research.deepseek2.deepseek2_config import DeepseekV2Config

LAYOUTS = {"v2": R.V2_STYLE, "lite": R.LITE_STYLE}
MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
SEQ = 32
ROWS = 2
TOL = 1e-5

# What the stand-in saw, kept in Parameters so that a compiled graph records it too (a Python side effect would run
# only in PyNative mode): calls, then the shapes of query, key, value, attn_mask and head_num, and the scale.
CALLS = Parameter(Tensor(0, mstype.int32), name="stand_in_calls", requires_grad=False)
SEEN = Parameter(Tensor(np.zeros(15, np.int32)), name="stand_in_seen", requires_grad=False)
SEEN_SCALE = Parameter(Tensor(0.0, mstype.float32), name="stand_in_scale", requires_grad=False)


def basic_flash_attention_score(query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None,
                                attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                                keep_prob=1.0, scalar_value=1.0, pre_tokens=2147483647, next_tokens=2147483647,
                                inner_precise=0, input_layout="BSH", sparse_mode=0):
    """ops.flash_attention_score's signature and, for what fused_attention asks of it, its semantics, from basic ops:
    softmax(mask(scalar_value * query key^T)) value with attn_mask 1 = discard; returns attention_out (BNSD)."""
    if input_layout != "BNSD" or sparse_mode != 0 or keep_prob != 1.0:
        raise ValueError("stand-in: only input_layout 'BNSD', sparse_mode 0 and keep_prob 1.0")
    if real_shift is not None or drop_mask is not None or padding_mask is not None or prefix is not None:
        raise ValueError("stand-in: no real_shift, drop_mask, padding_mask or prefix")
    if actual_seq_qlen is not None or actual_seq_kvlen is not None or attn_mask is None:
        raise ValueError("stand-in: an attn_mask and no actual sequence lengths")
    if query.shape != key.shape or value.shape != key.shape:
        raise ValueError("stand-in: the kernel takes query, key and value of one (b, n, s, d)")
    if query.shape[1] != head_num:
        raise ValueError("stand-in: head_num is the query's N")
    if attn_mask.dtype != mstype.uint8 or attn_mask.shape != (query.shape[2], key.shape[2]):
        raise ValueError("stand-in: attn_mask is a uint8 (S1, S2) mask")
    ops.assign_add(CALLS, Tensor(1, mstype.int32))
    ops.assign(SEEN, Tensor(query.shape + key.shape + value.shape + attn_mask.shape + (head_num,), mstype.int32))
    ops.assign(SEEN_SCALE, Tensor(scalar_value, mstype.float32))
    scores = ops.matmul(query * scalar_value, ops.transpose(key, (0, 1, 3, 2)))            # (b, n, s1, s2)
    hidden = ops.broadcast_to(ops.cast(attn_mask, mstype.bool_), scores.shape)              # 1 = masked out
    scores = ops.masked_fill(scores, hidden, Tensor(-1e30, scores.dtype))
    probs = ops.cast(ops.softmax(ops.cast(scores, mstype.float32), -1), value.dtype)
    return ops.matmul(probs, value)                                                        # (b, n, s1, d)


def reset_seen():
    CALLS.set_data(Tensor(0, mstype.int32))
    SEEN.set_data(Tensor(np.zeros(15, np.int32)))
    SEEN_SCALE.set_data(Tensor(0.0, mstype.float32))


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(mla, "FLASH_ATTENTION_SCORE", basic_flash_attention_score)
    reset_seen()
    yield basic_flash_attention_score


@pytest.fixture(params=[pytest.param("graph", marks=pytest.mark.slow), "pynative"])   # graph: compiles, slow
def mode(request):
    ms.set_context(mode=MODES[request.param])
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request):
    fields = LAYOUTS[request.param]
    return request.param, fields, R.build_reference(fields)


def ids(fields, width, seed=7):
    return Tensor(np.random.RandomState(seed).randint(2, fields["vocab_size"], (ROWS, width)), ms.int32)


def expected_seen(fields, seq):
    """query, key, padded value: (b, n, s, dq) each; mask (s, s); head_num n."""
    dq = fields["qk_nope_head_dim"] + fields["qk_rope_head_dim"]
    heads = fields["num_attention_heads"]
    return [ROWS, heads, seq, dq] * 3 + [seq, seq, heads]


def loss_and_grads(net, x):
    net.set_train(True)
    weights = net.trainable_params()
    loss, grads = ms.value_and_grad(net, grad_position=None, weights=weights)(x)
    net.set_train(False)
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(weights, grads)}


# ---------------------------------------------------------------------------------------------- model parity
def test_logits_and_gradients_equal_the_basic_op_path(layout, mode, stand_in):
    name, fields, ref = layout
    layers = fields["num_hidden_layers"]
    plain = R.build_ms(fields, ref, seq_length=SEQ)
    fused = R.build_ms(fields, ref, seq_length=SEQ, use_flash_attention=True)
    assert not plain.config.use_flash_attention and fused.config.use_flash_attention

    x = ids(fields, SEQ)
    base = plain(x).asnumpy()
    assert int(CALLS.asnumpy()) == 0                                 # the default path never calls the kernel
    logits = fused(x).asnumpy()
    assert int(CALLS.asnumpy()) == layers                             # once a layer
    assert SEEN.asnumpy().tolist() == expected_seen(fields, SEQ)      # value padded to the q/k head dim
    scale = DeepseekV2Config(**copy.deepcopy(fields)).softmax_scale
    assert np.isclose(float(SEEN_SCALE.asnumpy()), scale, rtol=1e-6, atol=0)
    if name == "v2":                                                  # YaRN's mscale^2 is in the scale passed
        q_head_dim = fields["qk_nope_head_dim"] + fields["qk_rope_head_dim"]
        assert abs(scale - q_head_dim ** -0.5) > 1e-3
    assert np.abs(base).max() > 1.0
    np.testing.assert_allclose(logits, base, rtol=0, atol=TOL)
    np.testing.assert_allclose(logits, R.reference_logits(ref, x.asnumpy()), rtol=0, atol=1e-4)

    reset_seen()
    xt = ids(fields, SEQ + 1, seed=11)                                # training shifts: SEQ tokens in, SEQ targets
    loss_plain, grads_plain = loss_and_grads(plain, xt)
    assert int(CALLS.asnumpy()) == 0
    loss_fused, grads_fused = loss_and_grads(fused, xt)
    assert int(CALLS.asnumpy()) == layers                             # one forward; the backward is the kernel's
    assert SEEN.asnumpy().tolist() == expected_seen(fields, SEQ)
    assert abs(loss_fused - loss_plain) <= TOL
    assert sorted(grads_fused) == sorted(grads_plain) and len(grads_plain) == len(plain.trainable_params())
    attention = [n for n in grads_plain if ".attention." in n]
    assert attention and all(np.abs(grads_plain[n]).max() > 0 for n in attention)
    for weight, grad in grads_plain.items():
        np.testing.assert_allclose(grads_fused[weight], grad, rtol=0, atol=TOL, err_msg=weight)


def test_prefill_uses_the_kernel_and_decode_keeps_the_latent_cache(stand_in):
    """With use_past: the prefill goes through the kernel, the decode steps do not (the absorbed latent-cache
    attention stays); greedy tokens equal the reference's."""
    fields = LAYOUTS["lite"]
    ref = R.build_reference(fields)
    net = R.build_ms(fields, ref, seq_length=SEQ, use_past=True, batch_size=1, use_flash_attention=True)
    prompt = list(np.random.RandomState(2).randint(2, fields["vocab_size"], 9))
    out = net.generate([prompt], max_new_tokens=6, do_sample=False)
    assert list(out[0]) == list(R.reference_generate(ref, np.array([prompt]), 6)[0])
    assert int(CALLS.asnumpy()) == fields["num_hidden_layers"]        # the one prefill, once a layer


# ---------------------------------------------------------------------------------------------- fused_attention
@pytest.mark.parametrize("dv", [12, 24], ids=["v_padded", "v_equal"])
def test_fused_attention_contract(stand_in, dv):
    """fused_attention against numpy: the value is zero-padded to the q/k head dim for the call and the output
    sliced back; the mask's True positions are hidden; the scale multiplies the scores."""
    b, n, s, dq, scale = 2, 3, 5, 24, 0.37
    rng = np.random.RandomState(0)
    q, k = rng.randn(b, n, s, dq).astype(np.float32), rng.randn(b, n, s, dq).astype(np.float32)
    v = rng.randn(b, n, s, dv).astype(np.float32)
    mask = np.triu(np.ones((s, s), np.bool_), 1)
    received = []

    def recording(query, key, value, head_num, **kw):
        received.append((query.shape, key.shape, value.asnumpy(), head_num, kw))
        return stand_in(query, key, value, head_num, **kw)

    mla.FLASH_ATTENTION_SCORE = recording                             # monkeypatch restores the reference
    out = mla.fused_attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask), scale, n).asnumpy()
    (q_shape, k_shape, v_seen, heads, kw), = received
    assert q_shape == k_shape == v_seen.shape == (b, n, s, dq) and heads == n
    np.testing.assert_array_equal(v_seen[..., :dv], v)
    assert not v_seen[..., dv:].any()                                 # zeros
    assert kw["input_layout"] == "BNSD" and kw["sparse_mode"] == 0 and kw["keep_prob"] == 1.0
    assert kw["scalar_value"] == scale and kw["attn_mask"].dtype == mstype.uint8
    np.testing.assert_array_equal(kw["attn_mask"].asnumpy(), mask.astype(np.uint8))
    scores = np.where(mask, -np.inf, np.einsum("bnqd,bnkd->bnqk", q, k) * scale)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert out.shape == (b, n, s, dv)
    np.testing.assert_allclose(out, probs @ v, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- refusals
def test_cpu_without_the_kernel_refuses_at_construction():
    assert mla.FLASH_ATTENTION_SCORE is ops.flash_attention_score
    assert ms.get_context("device_target") != "Ascend"
    config = DeepseekV2Config(**copy.deepcopy(R.LITE_STYLE), seq_length=8, use_flash_attention=True)
    with pytest.raises(RuntimeError, match=r"use_flash_attention = True needs an Ascend device.*device_target is "
                                           r"'CPU'.*use_flash_attention: False"):
        DeepseekV2ForCausalLM(config)
    DeepseekV2ForCausalLM(DeepseekV2Config(**copy.deepcopy(R.LITE_STYLE), seq_length=8))   # the default builds


def test_kernel_dtypes_are_checked_on_ascend():
    with pytest.raises(ValueError, match="use_flash_attention = True needs compute_dtype bfloat16 or float16"):
        mla.check_fused_attention(mstype.float32, device_target="Ascend")
    mla.check_fused_attention(mstype.bfloat16, device_target="Ascend")
    mla.check_fused_attention(mstype.float16, device_target="Ascend")
    with pytest.raises(RuntimeError, match="needs an Ascend device"):
        mla.check_fused_attention(mstype.bfloat16, device_target="GPU")


def test_config_switch():
    fields = copy.deepcopy(R.V2_STYLE)
    assert DeepseekV2Config(**fields).use_flash_attention is False
    config = DeepseekV2Config(**fields, use_flash_attention=True)
    assert config.use_flash_attention is True and config.to_dict()["use_flash_attention"] is True
    for bad in ("True", 1, None):
        with pytest.raises(ValueError, match=r"DeepseekV2Config.use_flash_attention = .*expected True or False"):
            DeepseekV2Config(**fields, use_flash_attention=bad)
    with pytest.raises(ValueError, match="use_flash_attention.*must not be smaller"):
        DeepseekV2Config(**dict(fields, v_head_dim=32), use_flash_attention=True)
    DeepseekV2Config(**dict(fields, v_head_dim=32))                   # fine without the switch


@pytest.mark.parametrize("name", ["finetune_deepseek2_236B.yaml", "run_train_deepseek2_236B.yaml"])
def test_236b_training_yamls_switch_it_on(name):
    import os
    import yaml
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "research", "deepseek2", name)
    with open(path, encoding="utf-8") as handle:
        fields = {k: v for k, v in yaml.safe_load(handle)["model"]["model_config"].items() if k != "type"}
    config = DeepseekV2Config(**fields)
    assert config.use_flash_attention is True
    assert config.q_head_dim == 192 and config.v_head_dim == 128                     # v padded 128 -> 192
    assert config.compute_dtype == mstype.bfloat16
    mla.check_fused_attention(config.compute_dtype, device_target="Ascend")         # what Ascend would check
