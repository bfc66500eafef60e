"""Parity with transformers' DeepseekV2ForCausalLM (patched for the released mscale^2 factor), both layouts.

Logits at every position within 1e-4 (fp32) and greedy tokens equal, in GRAPH_MODE and PYNATIVE_MODE; the MLA latent
cache (use_past) gives the same tokens and logits as full recomputation.
"""
import inspect

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import reference as R
from research.deepseek2.planning.chunks import chunk_bounds

LAYOUTS = {"v2": R.V2_STYLE, "lite": R.LITE_STYLE}
MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
SEQ = 32


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request):
    fields = LAYOUTS[request.param]
    return request.param, fields, R.build_reference(fields)


@pytest.fixture(params=[pytest.param("graph", marks=pytest.mark.slow), "pynative"])   # graph: compiles, slow
def mode(request):
    ms.set_context(mode=MODES[request.param])
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


# ---------------------------------------------------------------------------------------------- shared work
# Graph mode compiles per network object and phase (10-40 s a network on CPU): a network that several tests build
# alike (layout, mode and every config knob) is built once and reused, and so is a computation that several tests
# assert on (pair_generation) and the reference's outputs. Module scope: each xdist group (one per layout,
# tests/conftest.py) pays it once.
GREEDY_NEW = 10          # new tokens of test_greedy_generate_matches_reference
PREFILL_NEW = 6          # new tokens of test_prefill_in_chunks_matches_reference
PAIR_KNOBS = dict(seq_length=SEQ, use_past=True, batch_size=2)      # the network of pair_generation
CONFIG_DEFAULTS = {name: p.default for name, p in inspect.signature(R.DeepseekV2Config.__init__).parameters.items()
                   if p.default is not inspect.Parameter.empty}


@pytest.fixture(scope="module")
def shared():
    """Networks, generations and reference outputs shared by the tests of the module (keys name the layout)."""
    return {}


def _knobs_key(knobs):
    """The knobs that make a network what it is: DeepseekV2Config's defaults dropped, so that a test passing a
    default explicitly (attention_chunk_size=1024, prefill_chunk_size=0) gets the network built without it."""
    return tuple(sorted((k, v) for k, v in knobs.items() if k not in CONFIG_DEFAULTS or CONFIG_DEFAULTS[k] != v))


def shared_net(shared, layout, mode, **knobs):
    """R.build_ms(fields, ref, **knobs), built once per (layout, mode, knobs). The caller must leave it as built:
    eval mode, no attribute patched (a use_past network's cache is rewritten by every generate)."""
    name, fields, ref = layout
    key = ("net", name, mode, _knobs_key(knobs))
    if key not in shared:
        shared[key] = R.build_ms(fields, ref, **knobs)
    net = shared[key]
    assert not net.training and "prefill_in_chunks" not in vars(net)
    return net


def ref_generate(shared, layout, prompt, max_new_tokens):
    """R.reference_generate of one prompt as a list of token ids, once per layout."""
    name, _, ref = layout
    key = ("ref_generate", name, tuple(int(t) for t in prompt), max_new_tokens)
    if key not in shared:
        shared[key] = list(R.reference_generate(ref, np.array([list(prompt)]), max_new_tokens)[0])
    return shared[key]


def ref_logits(shared, layout, ids):
    """R.reference_logits, once per layout and ids."""
    name, _, ref = layout
    key = ("ref_logits", name, ids.shape, ids.tobytes())
    if key not in shared:
        shared[key] = R.reference_logits(ref, ids)
    return shared[key]


def pair(fields):
    """The two prompts (7 and 11 tokens) of the batch-of-2 generates; the first right-padded to 11 in the batch."""
    a = list(np.random.RandomState(2).randint(2, fields["vocab_size"], 7))
    b = list(np.random.RandomState(3).randint(2, fields["vocab_size"], 11))
    return a, b, [a + [fields["pad_token_id"]] * 4, b]


def chunk_phases(net):
    return sorted(phase for phase in net.compile_cache if phase.startswith("chunk"))


def instrumented_generate(net, batch, max_new_tokens):
    """net.generate(batch) greedy with per-step logits, recording what test_prefill_in_chunks_matches_reference
    asserts: the chunk size of each prefill_in_chunks call, the (start, end) spans prefill_chunks gave, the chunk
    graphs compiled before and after the call, and net.get_inputs() after it. The patches are undone on return."""
    from research.deepseek2 import deepseek2 as model_module
    used, calls = [], []
    inner_chunks = model_module.prefill_chunks
    inner = net.prefill_in_chunks
    before = chunk_phases(net)
    net.prefill_in_chunks = lambda *args: calls.append(args[2]) or inner(*args)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(model_module, "prefill_chunks", lambda *args: used.extend(inner_chunks(*args)) or used)
            res = net.generate(batch, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)
    finally:
        del net.prefill_in_chunks
    after = chunk_phases(net)
    return dict(sequences=[list(row) for row in res.sequences], logits=[np.asarray(x) for x in res.logits],
                calls=calls, used=used, chunk_graphs=after, new_chunk_graphs=[p for p in after if p not in before],
                inputs=net.get_inputs())


def pair_generation(shared, layout, mode):
    """The latent-cache generate of the pair (use_past, batch_size 2, chunking at its defaults), GREEDY_NEW tokens
    with per-step logits, once per (layout, mode): test_greedy_generate_matches_reference[latent_cache] asserts on
    it, and so does test_prefill_in_chunks_matches_reference as its one-call prefill at attention_chunk_size 1024
    (the default: the very same network) on its first PREFILL_NEW tokens and steps (greedy decoding: a step does not
    depend on how many follow). The network is shared_net's, also test_one_model_serves_several_batch_sizes'."""
    name, fields, _ = layout
    key = ("pair_generation", name, mode)
    if key not in shared:
        net = shared_net(shared, layout, mode, **PAIR_KNOBS)
        shared[key] = instrumented_generate(net, pair(fields)[2], GREEDY_NEW)
    return shared[key]


def test_logits_match_reference(layout, mode, shared):
    _, fields, ref = layout
    net = R.build_ms(fields, ref, seq_length=SEQ)
    ids = np.random.RandomState(7).randint(2, fields["vocab_size"], (2, SEQ))
    ours = net(Tensor(ids, ms.int32)).asnumpy()
    theirs = ref_logits(shared, layout, ids)
    assert ours.shape == (2, SEQ, fields["vocab_size"])
    assert np.abs(theirs).max() > 1.0          # not a degenerate model
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_routing_and_rope_matter(layout):
    """Guard against a vacuous parity: perturbing the router or the rope base changes the reference logits."""
    name, fields, ref = layout
    ids = np.random.RandomState(3).randint(2, fields["vocab_size"], (1, SEQ))
    base = R.reference_logits(ref, ids)
    other = R.build_reference(dict(fields, rope_theta=50.0))
    assert np.abs(R.reference_logits(other, ids) - base).max() > 1e-2
    for layer in ref.model.layers[fields["first_k_dense_replace"]:]:
        idx = layer.mlp.gate.weight.data.clone()
        layer.mlp.gate.weight.data = idx.flip(0)
    try:
        assert np.abs(R.reference_logits(ref, ids) - base).max() > 1e-2
    finally:
        for layer in ref.model.layers[fields["first_k_dense_replace"]:]:
            layer.mlp.gate.weight.data = layer.mlp.gate.weight.data.flip(0)


@pytest.mark.parametrize("use_past", [False, True], ids=["recompute", "latent_cache"])
def test_greedy_generate_matches_reference(layout, mode, use_past, shared):
    _, fields, ref = layout
    a, b, batch = pair(fields)                                                     # mixed lengths, right-padded
    if use_past:            # the shared run (pair_generation): the same network and generate, its logits kept too
        out = pair_generation(shared, layout, mode)["sequences"]
    else:
        net = R.build_ms(fields, ref, seq_length=SEQ, use_past=use_past, batch_size=2)
        out = net.generate(batch, max_new_tokens=GREEDY_NEW, do_sample=False)
    for row, prompt in zip(out, (a, b)):
        assert list(row) == ref_generate(shared, layout, prompt, GREEDY_NEW)


def test_cached_logits_equal_recomputed(layout, mode):
    """Per-step logits of the absorbed latent-cache decode equal full recomputation within 1e-4."""
    _, fields, ref = layout
    prompt = [list(np.random.RandomState(5).randint(2, fields["vocab_size"], 9))]
    results = {}
    for use_past in (False, True):
        net = R.build_ms(fields, ref, seq_length=SEQ, use_past=use_past, batch_size=1)
        res = net.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                           output_logits=True)
        results[use_past] = (list(res.sequences[0]), np.concatenate([np.asarray(x) for x in res.logits]))
    assert results[True][0] == results[False][0]
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=0, atol=1e-4)


def test_cache_holds_only_latent(layout):
    """Allocated cache = batch x layers x seq_length x (kv_lora_rank + qk_rope_head_dim) elements, nothing per head."""
    _, fields, ref = layout
    batch = 3
    net = R.build_ms(fields, ref, seq_length=SEQ, use_past=True, batch_size=batch)
    caches = net.kv_cache_parameters()
    width = fields["kv_lora_rank"] + fields["qk_rope_head_dim"]
    assert len(caches) == fields["num_hidden_layers"]
    assert all(tuple(c.shape) == (batch * SEQ, width) for c in caches)      # row: sequence * SEQ + position
    state = [p for p in net.get_parameters() if not p.requires_grad and "kv_cache" in p.name]
    assert sum(int(np.prod(p.shape)) for p in state) == batch * fields["num_hidden_layers"] * SEQ * width


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["lite"], indirect=True)         # the lite layout's group: its shared network
def test_one_model_serves_several_batch_sizes_in_graph_mode(layout, shared):
    """A cached model compiled for one batch size answers a later call with another one correctly. The model is the
    lite layout's graph-mode use_past network of batch_size 2 (shared_net), the one test_greedy_generate and
    test_prefill_in_chunks use: when they ran first, it holds batch 2's graphs already and batch 1's come on top."""
    _, fields, _ = layout
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = shared_net(shared, layout, "graph", **PAIR_KNOBS)
        single = np.random.RandomState(1).randint(2, fields["vocab_size"], (1, 10))
        a, b, batch = pair(fields)
        first = net.generate(single.tolist(), max_new_tokens=6, do_sample=False)
        pair_out = net.generate(batch, max_new_tokens=6, do_sample=False)
        again = net.generate(single.tolist(), max_new_tokens=6, do_sample=False)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    expected = ref_generate(shared, layout, single[0], 6)
    assert list(first[0]) == expected and list(again[0]) == expected
    for row, prompt in zip(pair_out, (a, b)):
        assert list(row) == ref_generate(shared, layout, prompt, 6)


@pytest.mark.parametrize("chunk", [12, 16])
def test_chunked_attention_matches_reference(layout, mode, chunk, shared):
    """attention_chunk_size smaller than the sequence (three chunks, the last one shorter, at 12; two equal ones at
    16): logits within 1e-4 of the reference, and the chunked prefill of a latent-cache generate gives the
    reference's greedy tokens. (Graph mode unrolls one block per chunk and layer: a few chunks cover the cases.)"""
    _, fields, ref = layout
    net = R.build_ms(fields, ref, seq_length=SEQ, attention_chunk_size=chunk)
    assert len(chunk_bounds(SEQ, chunk)) == -(-SEQ // chunk) == (3 if chunk == 12 else 2)
    ids = np.random.RandomState(7).randint(2, fields["vocab_size"], (2, SEQ))
    np.testing.assert_allclose(net(Tensor(ids, ms.int32)).asnumpy(), ref_logits(shared, layout, ids), rtol=0,
                               atol=1e-4)
    net = R.build_ms(fields, ref, seq_length=SEQ, use_past=True, batch_size=1, attention_chunk_size=chunk)
    prompt = list(np.random.RandomState(2).randint(2, fields["vocab_size"], 13))
    out = net.generate([prompt], max_new_tokens=8, do_sample=False)
    assert list(out[0]) == ref_generate(shared, layout, prompt, 8)


def ref_loss_and_grads(shared, layout, ids):
    """The reference's next-token cross-entropy on ids and every weight's gradient under MindSpore names (zeros
    where the reference has none), once per layout and ids."""
    import torch
    from research.deepseek2.checkpoints.weight_map import hf_state_to_ms
    name, fields, ref = layout
    key = ("ref_loss_and_grads", name, ids.shape, ids.tobytes())
    if key not in shared:
        try:
            logits = ref(torch.tensor(ids[:, :-1], dtype=torch.long)).logits.float()
            ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         torch.tensor(ids[:, 1:], dtype=torch.long).reshape(-1))
            ref_loss.backward()
            ref_grads = hf_state_to_ms({n: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
                                        for n, p in ref.named_parameters()}, fields["n_routed_experts"])
        finally:
            ref.zero_grad(set_to_none=True)
        shared[key] = (float(ref_loss.detach()), ref_grads)
    return shared[key]


def test_loss_and_gradients_match_reference(layout, mode, shared):
    """Training: the loss and every weight's gradient equal the reference's loss.backward() (next-token
    cross-entropy; balance losses off, the reference has none), through the hand-written attention backward
    (mla.SoftmaxAttention.bprop): within 1e-4 of each gradient's largest element."""
    _, fields, ref = layout
    ids = np.random.RandomState(6).randint(2, fields["vocab_size"], (2, SEQ + 1))
    net = R.build_ms(fields, ref, seq_length=SEQ, aux_loss_alpha=0.0)
    net.set_train(True)
    params = net.trainable_params()
    loss, grads = ms.value_and_grad(net, grad_position=None, weights=params)(Tensor(ids, ms.int32))
    ref_loss, ref_grads = ref_loss_and_grads(shared, layout, ids)
    np.testing.assert_allclose(float(loss.asnumpy()), ref_loss, rtol=1e-5)
    assert sorted(ref_grads) == sorted(p.name for p in params)
    for p, grad in zip(params, grads):
        expected = ref_grads[p.name]
        scale = max(np.abs(expected).max(), 1e-6)
        np.testing.assert_allclose(grad.asnumpy(), expected, rtol=0, atol=1e-4 * scale, err_msg=p.name)
    assert all(np.abs(ref_grads[p.name]).max() > 0 for p in params if "lkv2kv" in p.name or "l2q" in p.name)


def test_chunked_attention_gradients_equal_unchunked(layout, mode):
    """Training through the chunks: every weight's gradient equals the unchunked attention's (5e-5 of its largest
    element: the matmuls over fewer keys sum in another float32 order)."""
    _, fields, ref = layout
    ids = Tensor(np.random.RandomState(4).randint(2, fields["vocab_size"], (2, SEQ + 1)), ms.int32)
    grads = []
    for chunk in (0, 7):
        net = R.build_ms(fields, ref, seq_length=SEQ, attention_chunk_size=chunk)
        net.set_train(True)
        params = net.trainable_params()
        grads.append(ms.grad(net, grad_position=None, weights=params)(ids))
    assert len(grads[0]) == len(params)
    for p, whole, chunked in zip(params, *grads):
        whole, chunked = whole.asnumpy(), chunked.asnumpy()
        scale = max(np.abs(whole).max(), 1e-6)
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=5e-5 * scale, err_msg=p.name)   # float32 order
    attention = [g.asnumpy() for p, g in zip(params, grads[0]) if "lkv2kv" in p.name]
    assert attention and all(np.abs(g).max() > 0 for g in attention)


def test_attention_chunk_size_is_checked():
    with pytest.raises(ValueError, match="attention_chunk_size"):
        R.DeepseekV2Config(**dict(LAYOUTS["v2"], attention_chunk_size=-1))
    with pytest.raises(ValueError, match="attention_chunk_size"):
        R.DeepseekV2Config(**dict(LAYOUTS["v2"], attention_chunk_size="512"))


@pytest.mark.parametrize("chunk, spans, attention_chunk",
                         [(4, [(0, 4), (4, 8), (8, 12)], 2), (6, [(0, 6), (6, 12)], 1024)])
def test_prefill_in_chunks_matches_reference(layout, mode, chunk, spans, attention_chunk, shared):
    """use_past generate with prefill_chunk_size: a batch of prompts of 7 and 11 tokens (right-padded) is prefilled
    in calls of `chunk` tokens against the latent cache, each over the cache's slots up to its end only (spans, of
    SEQ = 32), all through one compiled graph (graph mode: the key axis is dynamic); greedy tokens equal the
    reference's, and the per-step logits equal the one-call prefill's (1e-4). attention_chunk_size 2 splits the 4
    heads of the attention against the cache into blocks (head_blocks: one head a block in a prefill chunk, two in
    a decode step); 1024 keeps them whole. The one-call prefill at 1024 is test_greedy_generate's run (pair_generation:
    the same network, prompts and generate, GREEDY_NEW tokens of which the first PREFILL_NEW are compared here)."""
    _, fields, ref = layout
    a, b, batch = pair(fields)
    results = {}
    for size in (0, chunk):
        knobs = dict(PAIR_KNOBS, prefill_chunk_size=size, attention_chunk_size=attention_chunk)
        if _knobs_key(knobs) == _knobs_key(PAIR_KNOBS):          # size 0, attention_chunk 1024: both the defaults
            run = pair_generation(shared, layout, mode)          # the very same network and generate
        else:
            run = instrumented_generate(R.build_ms(fields, ref, **knobs), batch, PREFILL_NEW)
        assert run["calls"] == ([chunk] if size else [])
        assert run["used"] == (spans if size else [])
        expected_graphs = 1 if size and mode == "graph" else 0              # the chunk graph this generate compiled
        assert len(run["new_chunk_graphs"]) == expected_graphs, run["new_chunk_graphs"]
        assert len(run["chunk_graphs"]) == expected_graphs, run["chunk_graphs"]
        assert run["inputs"] is None                     # the dynamic key axis was declared for the prefill only
        results[size] = (run["sequences"], np.concatenate(run["logits"][:PREFILL_NEW]))
    for row, prompt in zip(results[chunk][0], (a, b)):
        assert list(row)[:len(prompt) + PREFILL_NEW] == ref_generate(shared, layout, prompt, PREFILL_NEW)
    np.testing.assert_allclose(results[chunk][1], results[0][1], rtol=0, atol=1e-4)


def test_prefill_chunks():
    from research.deepseek2.planning.chunks import prefill_chunks
    assert prefill_chunks(1300, 512, 4096) == [(0, 512), (512, 1024), (1024, 1536)]
    assert prefill_chunks(10, 4, 10) == [(0, 4), (4, 8), (6, 10)]       # the last call ends at seq_length
    assert prefill_chunks(4, 4, 4) == [(0, 4)]
    for prompt, chunk in ((0, 4), (33, 4), (8, 0), (8, 33)):
        with pytest.raises(ValueError, match="prefill_chunk_size"):
            prefill_chunks(prompt, chunk, 32)


def test_head_blocks():
    from research.deepseek2.planning.chunks import head_blocks
    assert head_blocks(16, 1, 1024) == [(0, 16)]                                  # a decode step: one block
    assert head_blocks(16, 512, 1024) == [(i, i + 2) for i in range(0, 16, 2)]   # 2 heads x 512 tokens a block
    assert head_blocks(16, 2048, 1024) == [(i, i + 1) for i in range(16)]        # at least one head
    assert head_blocks(16, 512, 0) == [(0, 16)]                                   # attention_chunk_size 0: off
    assert head_blocks(5, 4, 8) == [(0, 2), (2, 4), (4, 5)]


def test_prefill_chunk_size_is_checked():
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        R.DeepseekV2Config(**dict(LAYOUTS["v2"], seq_length=32, prefill_chunk_size=33))
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        R.DeepseekV2Config(**dict(LAYOUTS["v2"], prefill_chunk_size=-2))


def test_greedy_argmax_on_host_equals_the_op():
    """generate's greedy choice on host logits (numpy: decode steps on CPU) picks what MindSpore's Argmax picks on
    the same logits as a Tensor, ties included (the first index, as torch does); both return int32 Tensors."""
    from mindspore import ops
    from research.deepseek2.deepseek2 import _argmax
    logits = np.random.RandomState(0).randn(3, 257).astype(np.float32)
    logits[1, [5, 200]] = logits[1].max() + 1.0                    # a tie: the first index wins
    host = _argmax(logits, -1)
    assert isinstance(host, Tensor) and host.dtype == ms.int32
    device = ops.Argmax(axis=-1, output_type=ms.int32)(Tensor(logits)).asnumpy()
    np.testing.assert_array_equal(host.asnumpy(), device)
    assert host.asnumpy().tolist() == [int(np.argmax(logits[0])), 5, int(np.argmax(logits[2]))]
    on_device = _argmax(Tensor(logits), -1)                         # a Tensor (a prefill's logits): the op
    assert isinstance(on_device, Tensor) and on_device.dtype == ms.int32
    np.testing.assert_array_equal(on_device.asnumpy(), device)
