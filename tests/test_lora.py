"""LoRA through pet_config (research/deepseek2/lora.py) on tiny DeepSeek-V2 models, in GRAPH_MODE and PYNATIVE_MODE.

At init (B = 0) the logits are the base model's bit for bit; training moves the adapters only; the merged plain
model gives the LoRA model's logits; routed-expert adapters switch on and off; every bad pet_config field is named;
MindFormers' own PetModel over the LoRA model keeps exactly the adapters trainable (and, alone, finds nothing to swap
in our model: the reason lora.py puts the adapters on itself).
"""
import copy

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Tensor

import reference as R
from research.deepseek2.lora import cells, config as lora_config
from research.deepseek2.deepseek2 import DeepseekV2ForCausalLM
from research.deepseek2.deepseek2_config import DeepseekV2Config
from research.deepseek2.planning.counts import count_adapters, count_parameters

SEQ = 8
MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
V2 = R.V2_STYLE            # low-rank query (q2l_proj/l2q_proj), 8 routed experts, 2 shared, first layer dense
LITE = R.LITE_STYLE        # full-rank query (q_proj), as DeepSeek-V2-Lite
PET = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.fixture(params=[pytest.param("graph", marks=pytest.mark.slow), "pynative"])   # graph: compiles, slow
def mode(request):
    ms.set_context(mode=MODES[request.param])
    ms.set_seed(0)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(autouse=True)
def _seed():
    ms.set_seed(0)


def build(fields, **knobs):
    return DeepseekV2ForCausalLM(DeepseekV2Config(**copy.deepcopy(fields), seq_length=SEQ, init_std=0.1, **knobs))


def copy_weights(src, dst):
    params = {p.name: ms.Parameter(Tensor(p.asnumpy()), name=p.name) for p in src.get_parameters()
              if lora_config.ADAPTER_SUFFIXES[0] not in p.name and lora_config.ADAPTER_SUFFIXES[1] not in p.name}
    not_loaded, unused = ms.load_param_into_net(dst, params)
    assert not unused and all("mindpet_delta_lora" in n for n in not_loaded), (not_loaded, unused)


def lora_pair(fields, pet, base=None):
    """A base model (``base``: that one) and a LoRA model holding the same base weights."""
    base = build(fields) if base is None else base
    net = build(fields)
    copy_weights(base, net)
    names = cells.apply_lora(net, pet)
    return base, net, names


@pytest.fixture(scope="module")
def base_models():
    """The base model of test_init_logits_... and test_merged_plain_model_... by (layout, mode), and its logits on
    ids(fields). Both tests build it alike: build(fields) as the first model after ms.set_seed(0), so the same
    network with the same weights; built once, in graph mode its compiled graph serves both. A test that loads other
    weights into it puts its own back (base_model checks)."""
    return {}


def base_model(base_models, fields, mode):
    """(base model, its eval logits on ids(fields)) of base_models, built and run on first use."""
    key = ("v2" if fields is V2 else "lite", mode)
    if key not in base_models:
        base = build(fields)
        base.set_train(False)
        base_models[key] = (base, base_arrays(base), base(ids(fields)).asnumpy())
    base, weights, logits = base_models[key]
    assert not base.training and all(np.array_equal(v, weights[k]) for k, v in base_arrays(base).items())
    return base, logits


def ids(fields, rows=2, width=SEQ, seed=0):
    return Tensor(np.random.RandomState(seed).randint(2, fields["vocab_size"], (rows, width)), ms.int32)


def randomise_adapters(net, scale=0.05, seed=1):
    rng = np.random.RandomState(seed)
    for p in net.get_parameters():
        if "mindpet_delta_lora" in p.name:
            p.set_data(Tensor((rng.randn(*p.shape) * scale).astype(np.float32)))


def base_arrays(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters() if "mindpet_delta_lora" not in p.name}


# ---------------------------------------------------------------------------------------------- (1) init
@pytest.mark.parametrize("fields, routed", [(V2, True), (LITE, False)], ids=["v2_routed", "lite"])
def test_init_logits_equal_the_base_model_bit_for_bit(mode, fields, routed, base_models):
    base, base_logits = base_model(base_models, fields, mode)                  # base(ids(fields)), shared
    _, net, _ = lora_pair(fields, dict(PET, lora_dropout=0.1, target_routed_experts=routed), base)
    net.set_train(False)
    x = ids(fields)
    np.testing.assert_array_equal(net(x).asnumpy(), base_logits)


# ---------------------------------------------------------------------------------------------- (2) training
def test_training_moves_only_the_adapters(mode):
    _, net, names = lora_pair(V2, dict(PET, lora_dropout=0.05, target_routed_experts=True))
    net.set_train(True)
    x = ids(V2, rows=4, width=SEQ + 1, seed=3)
    trainable = net.trainable_params()
    assert sorted(p.name for p in trainable) == sorted(names)
    # at B = 0 the gradient reaches B only (dL/dA = s B^T dL/dy x = 0): LoRA's own fingerprint
    grad_fn = ms.value_and_grad(net, grad_position=None, weights=trainable)
    grads = grad_fn(x)[1]
    by_name = {p.name: np.abs(g.asnumpy()).max() for p, g in zip(trainable, grads)}
    assert all(by_name[n] > 0 for n in names if n.endswith("_b")), by_name
    assert all(by_name[n] == 0 for n in names if n.endswith("_a")), by_name

    before = base_arrays(net)
    adapters = cells.adapter_state(net)
    optimizer = nn.AdamWeightDecay(trainable, learning_rate=1e-2, weight_decay=0.0)
    assert len(optimizer.moments1) == len(names)                 # optimizer state for adapters alone
    step = nn.TrainOneStepCell(net, optimizer)
    losses = [float(step(x).asnumpy()) for _ in range(4)]
    assert losses[-1] < losses[0], losses
    after = base_arrays(net)
    assert before.keys() == after.keys()
    for name in before:                                          # every base weight bit-identical
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    moved = cells.adapter_state(net)
    assert all(not np.array_equal(moved[n], adapters[n]) for n in names), "every adapter moved"
    grads = grad_fn(x)[1]
    assert all(np.abs(g.asnumpy()).max() > 0 for g in grads)    # with B != 0, A gets gradients too


# ---------------------------------------------------------------------------------------------- (3) merge
@pytest.mark.parametrize("fields, routed", [(V2, True), (LITE, False)], ids=["v2_routed", "lite"])
def test_merged_plain_model_gives_the_lora_logits(mode, fields, routed, base_models):
    base, base_logits = base_model(base_models, fields, mode)                  # base(ids(fields)), shared
    _, net, _ = lora_pair(fields, dict(PET, target_routed_experts=routed), base)
    randomise_adapters(net)
    merged = cells.merged_weights(net)
    # the plain model: a build(fields) that takes every weight from `merged`; the base model's object is one (its
    # compiled graph reused in graph mode), its own weights put back afterwards
    plain = base
    assert sorted(merged) == sorted(p.name for p in plain.get_parameters())
    own = {p.name: ms.Parameter(Tensor(p.asnumpy().copy()), name=p.name) for p in plain.get_parameters()}
    try:
        not_loaded, unused = ms.load_param_into_net(plain, {k: ms.Parameter(Tensor(v), name=k)
                                                            for k, v in merged.items()})
        assert not not_loaded and not unused
        for cell in (net, plain):
            cell.set_train(False)
        x = ids(fields)
        lora_logits, plain_logits = net(x).asnumpy(), plain(x).asnumpy()
    finally:
        ms.load_param_into_net(plain, own)                      # every weight back (base_model checks it)
    assert np.abs(lora_logits - base_logits).max() > 1e-2                  # the adapters matter
    np.testing.assert_allclose(plain_logits, lora_logits, rtol=0, atol=1e-5)


def test_merge_state_is_the_formula():
    rng = np.random.RandomState(0)
    w = rng.randn(6, 5).astype(np.float32)
    stacked = rng.randn(3, 6, 5).astype(np.float32)
    a, b = rng.randn(2, 5).astype(np.float32), rng.randn(6, 2).astype(np.float32)
    sa, sb = rng.randn(3, 2, 5).astype(np.float32), rng.randn(3, 6, 2).astype(np.float32)
    p, q = "model.layers.0.attention.wo", "model.layers.1.feed_forward.routed_experts.w1"
    weights = {p + ".weight": w, q: stacked, "other": np.ones(3, np.float32)}
    (pa, pb), (qa, qb) = lora_config.adapter_names_of(p), lora_config.adapter_names_of(q)
    assert (pa, qa) == (p + ".mindpet_delta_lora_a", q + "_mindpet_delta_lora_a")
    adapters = {pa: a, pb: b, qa: sa, qb: sb}
    merged = lora_config.merge_state(weights, adapters, dict(PET, lora_rank=2, lora_alpha=3))
    np.testing.assert_allclose(merged[p + ".weight"], w + 1.5 * b @ a, rtol=1e-6)
    for e in range(3):
        np.testing.assert_allclose(merged[q][e], stacked[e] + 1.5 * sb[e] @ sa[e], rtol=1e-6)
    assert merged["other"] is weights["other"] and merged[p + ".weight"].dtype == np.float32
    with pytest.raises(lora_config.PetConfigError, match=f"{pb} is missing"):
        lora_config.merge_state(weights, {pa: a}, PET)
    with pytest.raises(lora_config.PetConfigError, match="do not fit"):
        lora_config.merge_state(weights, {pa: a.T, pb: b}, PET)
    with pytest.raises(lora_config.PetConfigError, match="expected a name ending in"):
        lora_config.merge_state(weights, {"p.lora_A.weight": a}, PET)


# ---------------------------------------------------------------------------------------------- (4) routed experts
def test_routed_expert_adapters_on_and_off():
    cfg = V2
    experts, inter, hidden, r = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"], 4
    _, off, names_off = lora_pair(cfg, PET)
    assert not [n for n in names_off if "routed_experts" in n]
    routed_cell = off.model.layers[1].feed_forward.routed_experts
    assert type(routed_cell).__name__ == "RoutedExperts" and routed_cell.w1.name.endswith("routed_experts.w1")

    _, on, names_on = lora_pair(cfg, dict(PET, target_routed_experts=True))
    params = {p.name: p for p in on.get_parameters()}
    p = "model.layers.1.feed_forward.routed_experts."
    assert params[p + "w1_mindpet_delta_lora_a"].shape == (experts, r, hidden)
    assert params[p + "w1_mindpet_delta_lora_b"].shape == (experts, inter, r)
    assert params[p + "w2_mindpet_delta_lora_a"].shape == (experts, r, inter)
    assert params[p + "w2_mindpet_delta_lora_b"].shape == (experts, hidden, r)
    assert params[p + "w1"].requires_grad is False and params[p + "w1"].shape == (experts, inter, hidden)
    assert set(names_on) - set(names_off) == {f"model.layers.{layer}.feed_forward.routed_experts.{w}_{s}"
                                              for layer in (1, 2) for w in ("w1", "w2", "w3")
                                              for s in lora_config.ADAPTER_SUFFIXES}
    # excluded by the routed_experts cell path: back to none
    _, some, names_some = lora_pair(cfg, dict(PET, target_routed_experts=True, exclude_layers=[r".*layers\.2\.feed"]))
    assert {n.split(".")[2] for n in names_some if "routed" in n} == {"1"}
    assert not [n for n in names_some if "layers.2.feed_forward" in n]


def test_target_modules_follow_mindformers_matching():
    """re.match on a projection's own name or its path, ours or Hugging Face's; exclude_layers the same way."""
    names = [p.name for p in build(V2).get_parameters()]
    hf = lora_config.targeted_projections(names, dict(PET, target_modules="kv_b_proj|o_proj"))
    ours = lora_config.targeted_projections(names, dict(PET, target_modules=".*lkv2kv|.*wo"))
    assert hf == ours and sorted({p.rsplit(".", 1)[1] for p in hf.values()}) == ["lkv2kv", "wo"]
    first = lora_config.targeted_projections(names, dict(PET, target_modules=r"model\.layers\.0\..*"))
    assert len(first) == 8 and all(".layers.0." in p for p in first.values())
    shared_out = lora_config.targeted_projections(names, dict(PET, exclude_layers=[".*shared_experts.*"]))
    assert not [p for p in shared_out.values() if "shared" in p] and len(shared_out) == 3 * 5 + 3
    everything = lora_config.targeted_projections(names, dict(PET, target_modules=".*"))
    assert len(everything) == 3 * 5 + 3 + 2 * 3 and not [p for p in everything.values() if "lm_head" in p]


# ---------------------------------------------------------------------------------------------- (5) bad input
@pytest.mark.parametrize("change, field", [
    ({"pet_type": "prefix_tuning"}, "pet_type"),
    ({"pet_type": None}, "pet_type"),
    ({"lora_rank": 0}, "lora_rank"),
    ({"lora_rank": -2}, "lora_rank"),
    ({"lora_rank": 2.5}, "lora_rank"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_alpha": -8}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"target_modules": "no_such_cell"}, "target_modules"),
    ({"target_modules": "(unclosed"}, "target_modules"),
    ({"target_modules": ".*wo", "exclude_layers": [".*"]}, "exclude_layers"),
    ({"lora_ranks": 8}, "lora_ranks"),
    ({"target_routed_experts": "yes"}, "target_routed_experts"),
    ({"param_init_type": "int8"}, "param_init_type"),
])
def test_bad_pet_config_names_the_field(change, field):
    net = build(LITE)
    pet = dict(PET, **change)
    with pytest.raises(lora_config.PetConfigError) as err:
        cells.apply_lora(net, pet)
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith(f"pet_config.{field} = "), str(err.value)
    assert not cells.adapter_names(net)                              # nothing half-applied
    assert len(net.trainable_params()) == len(list(net.get_parameters()))


def test_apply_lora_refuses_prediction_and_a_second_application():
    with pytest.raises(ValueError, match="use_past"):
        cells.apply_lora(build(LITE, use_past=True), PET)
    net = build(LITE)
    cells.apply_lora(net, PET)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        cells.apply_lora(net, PET)


# ---------------------------------------------------------------------------------------------- (6) trainable share
def test_trainable_share_by_hand():
    """V2-style tiny model (h 64, 3 layers, heads 4, q_lora 32, kv_lora 24, rope 8, nope 16, v 12, dense FFN 96,
    2 shared experts of 24, 8 routed experts of 24), rank 4. Adapter parameters r (in + out) per projection:
      q2l_proj (32, 64): 96r   l2q_proj (4*24, 32): 128r   kv2l (24+8, 64): 96r   lkv2kv (4*(16+12), 24): 136r
      wo (64, 4*12): 112r  -> MLA 568r per layer, 3 layers 1704r
      dense FFN (layer 0): w1, w3 (96, 64) 160r each, w2 (64, 96) 160r -> 480r
      shared experts (layers 1, 2): width 2*24 = 48: w1, w3 (48, 64) 112r, w2 (64, 48) 112r -> 336r x 2 = 672r
      default targets: 2856r = 11424;  routed experts: E r (in + out) = 8 * 4 * 88 = 2816 per projection,
      3 projections x 2 MoE layers = 16896 more -> 28320."""
    base_total = count_parameters(V2)["total"]
    for routed, expected in ((False, 11424), (True, 11424 + 16896)):
        net = build(V2)
        cells.apply_lora(net, dict(PET, target_routed_experts=routed))
        adapters = sum(int(np.prod(p.shape)) for p in net.trainable_params())
        total = sum(int(np.prod(p.shape)) for p in net.get_parameters())
        assert adapters == expected and total == base_total + expected
        assert count_adapters(V2, dict(PET, target_routed_experts=routed)) == expected     # the planner agrees
        line = f"routed experts {routed}: {adapters} adapter parameters of {total} = {100 * adapters / total:.2f}% " \
               f"trainable"
        print(line)                                                # shown with pytest -s (docs/finetune.md)
        assert line.endswith(("6.25% trainable", "14.17% trainable"))


# ---------------------------------------------------------------------------------------------- MindFormers' PET
def test_mindformers_swap_alone_finds_nothing_in_our_model():
    """Why lora.py applies its own adapters: MindFormers' LoraModel only swaps nn.Dense / its own Linear, so on this
    model it swaps nothing and PetModel's freeze leaves no trainable parameter."""
    from mindformers.pet import get_pet_model
    net = build(LITE)
    wrapped = get_pet_model(net, dict(PET, target_modules=".*wo|.*kv2l"))
    assert wrapped.trainable_params() == []


def test_mindformers_pet_model_over_our_lora_keeps_the_adapters():
    """The Trainer's path for a YAML pet_config (build_network -> get_pet_model): our adapters are already there,
    MindFormers' freeze (everything but *mindpet_delta_lora*) keeps exactly them trainable, names unchanged."""
    from mindformers.pet import get_pet_model
    from mindpet.graph.freeze_utils import freeze_delta
    net = build(V2)
    names = cells.apply_lora(net, dict(PET, target_routed_experts=True))
    all_names = [p.name for p in net.get_parameters()]
    wrapped = get_pet_model(net, dict(PET, target_modules=lora_config.DEFAULT_TARGET_MODULES))
    assert [p.name for p in wrapped.get_parameters()] == all_names
    assert sorted(p.name for p in wrapped.trainable_params()) == sorted(names)
    other = build(V2)
    cells.apply_lora(other, PET)
    mine = {p.name: p.requires_grad for p in other.get_parameters()}
    freeze_delta(other, "lora")
    assert mine == {p.name: p.requires_grad for p in other.get_parameters()}


def test_expected_adapter_shapes_are_the_built_ones():
    """The plain-Python list of adapters (for checkpoint checks) equals what apply_lora builds."""
    for pet in (PET, dict(PET, target_routed_experts=True), dict(PET, target_modules="kv_b_proj|wo")):
        net = build(V2)
        cells.apply_lora(net, pet)
        built = {p.name: tuple(p.shape) for p in net.get_parameters() if "mindpet_delta_lora" in p.name}
        assert lora_config.expected_adapter_shapes(DeepseekV2Config(**V2), pet) == built
        assert lora_config.expected_adapter_shapes(V2, pet) == built                  # a YAML's model_config mapping


def test_adapter_state_and_names():
    net = build(LITE)
    names = cells.apply_lora(net, dict(PET, target_modules=".*wo"))
    assert names == [f"model.layers.{i}.attention.wo.{s}" for i in range(3) for s in lora_config.ADAPTER_SUFFIXES]
    state = cells.adapter_state(net)
    assert list(state) == names and all(not state[n].any() for n in names if n.endswith("_b"))
    assert state[names[0]].shape == (4, LITE["num_attention_heads"] * LITE["v_head_dim"])


def test_freeze_include_and_exclude_follow_mindpet():
    """freeze_exclude unfreezes what it matches (here the RMSNorm weights), freeze_include freezes (an adapter)."""
    net = build(LITE)
    pet = dict(PET, target_modules=".*wo", freeze_exclude=["*norm*"], freeze_include=["*layers.0.*lora_a"])
    names = cells.apply_lora(net, pet)
    trainable = {p.name for p in net.trainable_params()}
    norms = {p.name for p in net.get_parameters() if "norm" in p.name}
    assert norms and norms <= trainable
    assert trainable == norms | set(names) - {"model.layers.0.attention.wo.mindpet_delta_lora_a"}
