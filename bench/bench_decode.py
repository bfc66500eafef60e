"""Decode benchmark: this DeepSeek-V2 with its MLA latent cache (MindSpore graph mode, ``use_past=True``) against
transformers' DeepseekV2ForCausalLM with its DynamicCache (PyTorch eager), same config, same weights, greedy.

For each context length (default 1024 and 4096 prompt tokens, batch 1) each framework, in its own process, runs a
warm-up ``generate`` of 2 new tokens (MindSpore compiles its prefill and decode graphs there; reported apart), then
one timed ``generate`` of ``--new-tokens`` tokens with a streamer that timestamps every token as generate hands it
out:
  prefill s     prompt pushed -> first new token,
  decode tok/s  1 / median interval between consecutive new tokens: what a caller of generate sees per token,
                the host-side work of each generate loop included (timing every step, rather than subtracting
                two generate calls, keeps the prefill's noise out of the decode figure).
Cache bytes:
  ours          the kv_cache Parameters (``net.kv_cache_parameters()``): layers x batch x seq_length x
                (kv_lora_rank + qk_rope_head_dim) values, allocated once for seq_length = context + new tokens;
  reference     the K and V tensors of its DynamicCache (per head: layers x heads x (nope + rope + v) values per
                token), measured at the end of generate and scaled to the prompt length (the cache grows linearly).

Presets (``--preset``; any model flag given explicitly overrides them):
  small  the default: 8 experts, top-2, 1 shared, q-LoRA 192, greedy routing;
  v2     DeepSeek-V2 proportions scaled down: 16 experts, top-4, 2 shared, q-LoRA 192, group-limited routing
         (8 groups, 3 kept);
  lite   DeepSeek-V2-Lite proportions: 64 experts, top-6, 2 shared, full-rank query, greedy routing.
``--experts 16,64,160`` runs one model per expert count (the MoE cost of a decode step should not follow E).

``--rounds R`` runs the pair of workers R times per context and expert count, the order alternating (reference
first, then ours first, ...); the table gives the median of the rounds and the decode ratio of every round. On a
shared machine the ratio of one round is only as good as the load stayed the same during its two workers.

``--breakdown``: one more worker per round holds both models (same weights, each after a generate of 2 tokens, so
the prompt is cached) and times one decode forward of each called directly (no generate loop), as built and with
parts switched off (their output replaced by zeros), all variants of both models interleaved call by call so that a
change of load hits them alike; "forward only, interleaved" is the median of reference / ours over those calls.
Components are differences of medians:
  routed experts   step - step without the routed experts,
  MoE              step - step without the MoE blocks (router, routed and shared experts),
  attention        step - step without the attention blocks,
  rest             step - MoE - attention (embedding, norms, the dense first layer, lm_head, the graph call),
  generate loop    in each generate worker: decode interval under generate - its own direct forward step (the host
                   work of the generate loop: inputs, sampling, the streamer).
Ours also runs with the block plan forced on its routed experts (``RoutedExperts.per_assignment = False``): the
dispatch every decode step used before the per-assignment dispatch, in the same process (its logits are compared).
Switching a part off changes the activations after it (and so the routing of later layers); the components are
what a part costs, not an exact partition.

``--block-plan``: one more generate worker per round runs our model with the block plan forced on its routed experts
(the dispatch of every decode step before the per-assignment one): the decode tokens/s before and after.

``--moe-table``: the MoE block alone at a decode step's size (one token), forward only, for every expert count:
ours in graph mode (per-assignment dispatch, and the block plan forced) and transformers' DeepseekV2MoE, each on the
same weights; a pool of different inputs is cycled so that the chosen experts change from call to call as they do
in decoding (with many experts their weights then come from memory, not from the CPU caches). Every timed call
applies the block to 8 inputs in a row (one graph for ours, a Python loop for the reference), so that the fixed cost
of calling a graph is shared as it is by the layers of a decode step. Two figures: the whole
block (router, routed and shared experts) and the routed experts alone (routing computed beforehand).

Run from the repo root:  python bench/bench_decode.py            (about 3-5 minutes on 2 cores)
                         python bench/bench_decode.py --preset v2 --experts 16,64,160 --contexts 4096 --breakdown
                         python bench/bench_decode.py --preset lite --experts 16,64,160 --moe-table --contexts ""
                         python bench/bench_decode.py --help
"""
import argparse
import json
import os
import time

import common as C  # bench/common.py, beside this script; sets the environment before any framework import

SCRIPT = os.path.abspath(__file__)


PRESETS = {
    "small": dict(experts="8", top_k=2, shared=1, q_lora=192, topk_method="greedy", n_group=1, topk_group=1),
    "v2": dict(experts="16", top_k=4, shared=2, q_lora=192, topk_method="group_limited_greedy", n_group=8,
               topk_group=3),
    "lite": dict(experts="64", top_k=6, shared=2, q_lora=0, topk_method="greedy", n_group=1, topk_group=1),
}
BREAKDOWN_OURS = ("step", "block plan", "no routed experts", "no MoE", "no attention", "no layers")
BREAKDOWN_REF = ("step", "no routed experts", "no MoE", "no attention", "no layers")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (released config.json names; proportions of the released DeepSeek-V2)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="small",
                   help="MoE and query shape (see above); explicit flags override it")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=512)
    g.add_argument("--intermediate", type=int, default=1024, help="dense FFN width (first layer)")
    g.add_argument("--moe-intermediate", type=int, default=256)
    g.add_argument("--experts", default=None, help="n_routed_experts; a comma list runs one model per count")
    g.add_argument("--top-k", type=int, default=None, help="num_experts_per_tok")
    g.add_argument("--shared", type=int, default=None, help="n_shared_experts")
    g.add_argument("--topk-method", choices=("greedy", "group_limited_greedy"), default=None)
    g.add_argument("--n-group", type=int, default=None, help="expert groups of group_limited_greedy")
    g.add_argument("--topk-group", type=int, default=None, help="groups kept per token by group_limited_greedy")
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--q-lora", type=int, default=None, help="q_lora_rank (0: full-rank query, like V2-Lite)")
    g.add_argument("--kv-lora", type=int, default=128)
    g.add_argument("--rope", type=int, default=32, help="qk_rope_head_dim")
    g.add_argument("--nope", type=int, default=64, help="qk_nope_head_dim")
    g.add_argument("--v", type=int, default=64, help="v_head_dim")
    g.add_argument("--vocab", type=int, default=4096)
    r = p.add_argument_group("run")
    r.add_argument("--contexts", default="1024,4096", help="prompt lengths")
    r.add_argument("--new-tokens", type=int, default=16, help="tokens generated after each prompt")
    r.add_argument("--rounds", type=int, default=1, help="worker pairs per context and expert count (order "
                   "alternating); medians reported")
    r.add_argument("--breakdown", action="store_true", help="time the parts of a decode step (see above)")
    r.add_argument("--breakdown-reps", type=int, default=30, help="timed calls per variant of --breakdown")
    r.add_argument("--block-plan", action="store_true", help="also time our generate with the block plan forced on "
                   "the routed experts (the decode dispatch before the per-assignment one), one more worker per round")
    r.add_argument("--moe-table", action="store_true", help="the MoE block alone at decode size (see above)")
    r.add_argument("--moe-reps", type=int, default=200, help="timed calls per variant of --moe-table")
    r.add_argument("--prefill-chunk", type=int, default=0, help="our prefill_chunk_size: prompt tokens per prefill "
                   "call against the latent cache (0: the whole prompt in one call)")
    r.add_argument("--ref-prefill-chunk", type=int, default=0, help="the reference's prompt prefilled by hand in "
                   "forward calls of this many tokens into its DynamicCache before generate (0: generate takes the "
                   "whole prompt, as a user calls it); lets it reach contexts whose one-call prefill does not fit")
    r.add_argument("--attention-chunk", type=int, default=None, help="our attention_chunk_size (query rows per "
                   "attention block of a whole-prompt prefill, (head, token) rows per head block of a prefill chunk "
                   "against the cache; default: the config's)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads of both frameworks (default: torch one "
                   "per core, MindSpore its own pool); 1 keeps a comparison fair on a machine shared with other jobs")
    r.add_argument("--no-warmup", action="store_true", help="skip the warm-up generate (then the prefill includes "
                   "MindSpore's compilation and the first decode interval is left out of the median)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--verbose", action="store_true", help="show the workers' own output")
    r.add_argument("--worker", choices=("ours", "ref", "pair", "moe-ours", "moe-ref", "ours-block-plan"),
                   help=argparse.SUPPRESS)
    r.add_argument("--context", type=int, help=argparse.SUPPRESS)
    r.add_argument("--weights", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for name, value in PRESETS[a.preset].items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    a.expert_counts = [int(e) for e in str(a.experts).split(",") if e]
    a.experts = a.expert_counts[0]
    return a


def model_fields(a, max_positions: int, experts: int = None) -> dict:
    # eos is set outside the vocabulary so that neither generate stops early on random weights
    return dict(C.COMMON_FIELDS, vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                moe_intermediate_size=a.moe_intermediate, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                n_shared_experts=a.shared or None, n_routed_experts=experts or a.experts, num_experts_per_tok=a.top_k,
                topk_method=a.topk_method, n_group=a.n_group, topk_group=a.topk_group,
                kv_lora_rank=a.kv_lora, q_lora_rank=a.q_lora or None, qk_rope_head_dim=a.rope,
                qk_nope_head_dim=a.nope, v_head_dim=a.v, max_position_embeddings=max_positions,
                eos_token_id=a.vocab)


def worker_argv(a, experts: int, context: int, weights: str, worker: str):
    """The worker's command line: every model flag explicit (the preset resolved), one expert count."""
    argv = ["--layers", a.layers, "--hidden", a.hidden, "--intermediate", a.intermediate,
            "--moe-intermediate", a.moe_intermediate, "--experts", experts, "--top-k", a.top_k,
            "--shared", a.shared, "--topk-method", a.topk_method, "--n-group", a.n_group,
            "--topk-group", a.topk_group, "--heads", a.heads, "--q-lora", a.q_lora, "--kv-lora", a.kv_lora,
            "--rope", a.rope, "--nope", a.nope, "--v", a.v, "--vocab", a.vocab, "--new-tokens", a.new_tokens,
            "--seed", a.seed, "--breakdown-reps", a.breakdown_reps, "--worker", worker, "--context", context,
            "--weights", weights, "--prefill-chunk", a.prefill_chunk, "--ref-prefill-chunk", a.ref_prefill_chunk] + \
        (["--threads", a.threads] if a.threads else [])
    argv += ["--attention-chunk", a.attention_chunk] if a.attention_chunk is not None else []
    argv += (["--no-warmup"] if a.no_warmup else []) + (["--breakdown"] if a.breakdown and worker != "ours-block-plan"
                                                          else [])
    return [str(x) for x in argv]


def prompt(a, context: int):
    import numpy as np
    return np.random.RandomState(a.seed + context).randint(2, a.vocab, (1, context)).astype(np.int64)


def decode_stats(stamps, warmed_up: bool):
    """stamps: perf_counter at the prompt push and at each new token -> prefill s, decode intervals."""
    prefill = stamps[1] - stamps[0]
    intervals = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    steady = intervals if warmed_up or len(intervals) < 2 else intervals[1:]   # cold: first decode step compiles
    return dict(prefill_s=prefill, intervals=intervals, step_s=C.median(steady) if steady else None,
                tokens=len(stamps) - 1)


class Stamps:
    """Streamer protocol of both generate implementations: put() for the prompt, then once per new token."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def interleaved(calls: dict, reps: int) -> dict:
    """calls {variant: (prepare, run)} -> {variant: [seconds of run()]}: every variant once more untimed, then reps
    rounds of prepare() + timed run() per variant in turn, so that a change of load hits every variant alike."""
    for prepare, run in calls.values():
        prepare()
        run()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, (prepare, run) in calls.items():
            prepare()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def breakdown_ref(a, model, cache, variants=BREAKDOWN_REF) -> dict:
    """{variant: (prepare, run)}: one decode forward of transformers' model called directly, as built or with parts
    switched off (BREAKDOWN_REF), on the DynamicCache of its generate cropped back to the prompt after every call."""
    import torch

    class ZeroAttention(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            return torch.zeros_like(hidden_states), None

    class Zero(torch.nn.Module):
        def forward(self, hidden_states):
            return torch.zeros_like(hidden_states)

    def zero_routed(hidden_states, topk_ids, topk_weight):
        return torch.zeros_like(hidden_states)

    layers = list(model.model.layers)
    attention = [layer.self_attn for layer in layers]
    mlp = [layer.mlp for layer in layers]
    is_moe = [hasattr(m, "gate") for m in mlp]                 # DeepseekV2MoE; the dense first layer is an MLP

    def configure(variant):
        for layer, att, m, moe in zip(layers, attention, mlp, is_moe):
            layer.self_attn, layer.mlp = att, m
            m.__dict__.pop("moe", None)                          # the routed path, DeepseekV2MoE.moe
            if variant == "no routed experts" and moe:
                m.moe = zero_routed
            if variant in ("no attention", "no layers"):
                layer.self_attn = ZeroAttention()
            if (variant == "no MoE" and moe) or variant == "no layers":
                layer.mlp = Zero()

    cache.crop(a.context)
    token = torch.tensor([[int(prompt(a, a.context)[0, -1])]])
    position = torch.tensor([a.context])

    def run():
        with torch.no_grad():
            model(input_ids=token, past_key_values=cache, use_cache=True, cache_position=position)
        cache.crop(a.context)

    return {variant: ((lambda v=variant: configure(v)), run) for variant in variants}


def breakdown_ours(a, net, variants=BREAKDOWN_OURS):
    """({variant: (prepare, run)}, max |logits as built - logits with the block plan| or None): one decode forward
    of our model called directly (after its generate: the latent cache holds the prompt), as built or with parts
    switched off (BREAKDOWN_OURS); every variant is compiled here, as a graph phase of its own."""
    import numpy as np
    from mindspore import nn, ops, Tensor
    from mindspore.common import dtype as mstype

    class Zero(nn.Cell):                     # an attention block, a dense FFN or the routed experts: adds nothing
        def construct(self, x, *args):
            return ops.zeros_like(x)

    class ZeroMoE(nn.Cell):                  # a DeepSeekMoE block: adds nothing, no balance loss
        def construct(self, x):
            return ops.zeros_like(x), ops.zeros((), mstype.float32)

    layers = list(net.model.layers)
    attention = [layer.attention for layer in layers]
    ffn = [layer.feed_forward for layer in layers]
    moe = [f for layer, f in zip(layers, ffn) if layer.is_moe]
    routed = [m.routed_experts for m in moe]

    def put(cell, name, value):
        cell._cells[name] = value            # not setattr: Cell.__setattr__ renames the parameters of a cell put back

    def configure(variant):
        for layer, att, f in zip(layers, attention, ffn):
            put(layer, "attention", att)
            put(layer, "feed_forward", f)
        for m, r in zip(moe, routed):
            put(m, "routed_experts", r)
            r.per_assignment = variant != "block plan"
        if variant == "no routed experts":
            for m in moe:
                put(m, "routed_experts", Zero())
        if variant in ("no attention", "no layers"):
            for layer in layers:
                put(layer, "attention", Zero())
        if variant in ("no MoE", "no layers"):
            for layer in layers:
                if layer.is_moe:
                    put(layer, "feed_forward", ZeroMoE())
                elif variant == "no layers":
                    put(layer, "feed_forward", Zero())

    token = Tensor(np.array([[int(prompt(a, a.context)[0, -1])]], np.int32))
    valid = Tensor(np.array([[a.context + 1]], np.int32))          # writes cache row `context`, attends to 0..context
    net.add_flags_custom(is_first_iteration=False)

    def run():
        return net(input_ids=token, batch_valid_length=valid).asnumpy()

    calls, logits = {}, {}
    for variant in variants:
        def prepare(phase=f"decode_breakdown_{BREAKDOWN_OURS.index(variant)}"):
            net.phase = phase                                      # the graph compiled for this variant

        configure(variant)
        prepare()
        logits[variant] = run()                                    # compiles this variant's graph
        calls[variant] = (prepare, run)
    configure("step")
    same = float(np.abs(logits["step"] - logits["block plan"]).max()) if "block plan" in logits else None
    return calls, same


def forward_ms(a, calls: dict) -> dict:
    """{variant: median ms} of the calls, interleaved."""
    return {name: C.median(times) * 1000 for name, times in interleaved(calls, a.breakdown_reps).items()}


def worker_ref(a) -> dict:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer
    torch.set_num_threads(a.threads or os.cpu_count())
    fields = model_fields(a, max(a.context + a.new_tokens, 2048))
    model = C.build_reference(fields, a.seed).eval()
    C.save_reference_weights(model, a.weights)
    rss_build = C.rss_bytes()
    C.reset_peak_rss()                                       # peak from here on: prefill + decode only

    class Streamer(Stamps, BaseStreamer):
        pass

    ids = torch.tensor(prompt(a, a.context))
    chunk = a.ref_prefill_chunk if 0 < a.ref_prefill_chunk < a.context else 0
    prefill_by_hand = []                                     # seconds of each generate's chunked prefill

    def prefilled_cache():
        """--ref-prefill-chunk: the prompt but its last token pushed through forward in chunks into a DynamicCache
        (generate then feeds the last token against it); None: generate prefills the whole prompt itself."""
        if not chunk:
            return None
        start_s = time.perf_counter()
        cache = transformers.DynamicCache()
        for start in range(0, a.context - 1, chunk):
            model(ids[:, start:min(start + chunk, a.context - 1)], past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
        prefill_by_hand.append(time.perf_counter() - start_s)
        return cache

    def generate(new_tokens, streamer=None):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  use_cache=True, eos_token_id=None, pad_token_id=fields["pad_token_id"],
                                  streamer=streamer, return_dict_in_generate=True, past_key_values=prefilled_cache())

    warmup_s = None if a.no_warmup else C.timed(generate, 2)
    streamer = Streamer()
    out = generate(a.new_tokens, streamer)
    peak = C.peak_rss_bytes()
    cache = out.past_key_values
    cached_tokens = cache.get_seq_length()
    nbytes = 0
    for layer in cache.layers:
        nbytes += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    per_token = nbytes / cached_tokens
    stats = decode_stats(streamer.stamps, not a.no_warmup)
    if chunk:                                                # the timed generate's prefill: by hand + its last token
        stats["prefill_s"] += prefill_by_hand[-1]
    result = dict(stats, warmup_s=warmup_s,
                  framework=f"transformers {transformers.__version__} / torch {torch.__version__} "
                            f"(eager, DynamicCache), {torch.get_num_threads()} threads"
                            + (f", prompt prefilled by hand in forward calls of {chunk} tokens" if chunk else ""),
                  cache_bytes_prefill=per_token * a.context, cache_bytes_per_token=per_token,
                  cache_kind="K (b, heads, t, nope+rope) and V (b, heads, t, v) per layer",
                  generated=int(out.sequences.shape[1] - a.context), sequence=out.sequences[0, a.context:].tolist(),
                  rss_build=rss_build, peak_rss=peak)
    if a.breakdown:                          # the direct forward of this process, for the generate loop's share
        result["forward_ms"] = forward_ms(a, breakdown_ref(a, model, cache, ("step",)))["step"]
    return result


def graph_mode_cpu(a):
    """MindSpore in graph mode on CPU with --threads kernel threads (default: its own choice); returns the module."""
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    if a.threads:
        ms.device_context.cpu.op_tuning.threads_num(a.threads)
    return ms


def worker_ours(a) -> dict:
    import numpy as np
    ms = graph_mode_cpu(a)
    from mindformers.generation.streamers import BaseStreamer
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    C.silence_mindformers()
    seq_length = a.context + a.new_tokens
    chunks = dict(prefill_chunk_size=a.prefill_chunk)
    if a.attention_chunk is not None:
        chunks["attention_chunk_size"] = a.attention_chunk
    cfg = DeepseekV2Config(**model_fields(a, max(seq_length, 2048)), seq_length=seq_length, batch_size=1,
                           use_past=True, **chunks)
    net = DeepseekV2ForCausalLM(cfg)
    C.load_weights_into_ms(net, a.weights, a.experts)
    net.set_train(False)
    experts = [layer.feed_forward.routed_experts for layer in net.model.layers if layer.is_moe]
    for routed in experts:
        routed.per_assignment = a.worker != "ours-block-plan"
    rss_build = C.rss_bytes()
    C.reset_peak_rss()                                       # peak from here on: prefill + decode only

    class Streamer(Stamps, BaseStreamer):
        pass

    ids = prompt(a, a.context)[0].tolist()
    warmup_s = None if a.no_warmup else \
        C.timed(lambda: net.generate([ids], max_new_tokens=2, do_sample=False))      # compiles prefill and decode
    streamer = Streamer()
    out = net.generate([ids], max_new_tokens=a.new_tokens, do_sample=False, streamer=streamer)
    peak = C.peak_rss_bytes()
    nbytes = sum(int(np.prod(p.shape)) * p.data.itemsize for p in net.kv_cache_parameters())
    stats = decode_stats(streamer.stamps, not a.no_warmup)
    generated = len(out[0]) - a.context
    dispatch = "per assignment" if experts and experts[0].gathers_per_assignment(a.top_k) else "block plan"
    result = dict(stats, warmup_s=warmup_s,
                  framework=f"MindSpore {ms.__version__} graph mode, use_past (MLA latent cache), "
                            f"{a.threads or 'default'} kernel threads, prefill_chunk_size {cfg.prefill_chunk_size}, "
                            f"attention_chunk_size {cfg.attention_chunk_size}",
                  cache_bytes_alloc=nbytes, cache_bytes_per_token=nbytes / seq_length,
                  cache_kind=f"[c_kv | k_rope] rows (batch 1 x seq_length {seq_length}, {cfg.cache_width}) per layer",
                  generated=generated, sequence=[int(t) for t in out[0][a.context:]], rss_build=rss_build,
                  peak_rss=peak, decode_dispatch=dispatch)
    if a.breakdown:                          # the direct forward of this process, for the generate loop's share
        result["forward_ms"] = forward_ms(a, breakdown_ours(a, net, ("step",))[0])["step"]
    return result


def worker_pair(a) -> dict:
    """Both models in one process, same weights, each after a generate of 2 tokens (the prompt cached): the decode
    forward variants of both (BREAKDOWN_OURS, BREAKDOWN_REF) timed interleaved, call by call, so that both see the
    same load; the ratio of their "step" medians is the forward-only decode ratio."""
    import torch
    graph_mode_cpu(a)
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    C.silence_mindformers()
    torch.set_num_threads(a.threads or os.cpu_count())
    seq_length = a.context + a.new_tokens
    fields = model_fields(a, max(seq_length, 2048))
    model = C.build_reference(fields, a.seed).eval()
    if not os.path.exists(a.weights):
        C.save_reference_weights(model, a.weights)
    ids = torch.tensor(prompt(a, a.context))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, use_cache=True,
                             eos_token_id=None, pad_token_id=fields["pad_token_id"], return_dict_in_generate=True)
    net = DeepseekV2ForCausalLM(DeepseekV2Config(**fields, seq_length=seq_length, batch_size=1, use_past=True))
    C.load_weights_into_ms(net, a.weights, a.experts)
    net.set_train(False)
    net.generate([prompt(a, a.context)[0].tolist()], max_new_tokens=2, do_sample=False)
    ours, same = breakdown_ours(a, net)
    ref = breakdown_ref(a, model, out.past_key_values)
    calls = dict([(f"ours: {k}", v) for k, v in ours.items()] + [(f"reference: {k}", v) for k, v in ref.items()])
    times = interleaved(calls, a.breakdown_reps)
    step_ratio = [r / o for o, r in zip(times["ours: step"], times["reference: step"])]      # call by call
    return dict(ms={k: C.median(v) * 1000 for k, v in times.items()}, dispatch_logits_diff=same,
                step_ratio_median=C.median(step_ratio))


# ---------------------------------------------------------------------------------------------- MoE alone
MOE_POOL = 32                                                  # different decode inputs cycled through
MOE_CHAIN = 8                                                  # MoE applications per timed call (ms are per one)


def moe_arrays(a, experts: int) -> dict:
    """Seeded float32 weights of one MoE block (HF scales: N(0, 1/fan_in)) and MOE_POOL inputs (1, 1, h)."""
    import numpy as np
    rng = np.random.RandomState(a.seed + experts)
    h, i, s = a.hidden, a.moe_intermediate, (a.shared or 0) * a.moe_intermediate

    def w(*shape):
        return (rng.randn(*shape) / np.sqrt(shape[-1])).astype(np.float32)

    out = dict(router=w(experts, h), w1=w(experts, i, h), w3=w(experts, i, h), w2=w(experts, h, i),
               x=rng.randn(MOE_POOL, 1, 1, h).astype(np.float32))
    if s:
        out.update(sw1=w(s, h), sw3=w(s, h), sw2=w(h, s))
    return out


def worker_moe_ours(a) -> dict:
    """DeepSeekMoE at decode size in GRAPH_MODE: each variant a graph phase of the same cells, timed interleaved."""
    ms = graph_mode_cpu(a)
    from mindspore import nn, Tensor
    from research.deepseek2 import DeepseekV2Config
    from research.deepseek2.moe import DeepSeekMoE
    C.silence_mindformers()

    class Block(nn.Cell):                    # MOE_CHAIN applications per graph call: the call's cost is shared
        def __init__(self, moe):
            super().__init__()
            self.moe = moe

        def construct(self, x):              # x (MOE_CHAIN, 1, 1, h)
            out = self.moe(x[0])[0]
            for r in range(1, MOE_CHAIN):
                out = out + self.moe(x[r])[0]
            return out

    class Routed(nn.Cell):
        def __init__(self, routed):
            super().__init__()
            self.routed = routed

        def construct(self, x, idx, weight):  # (MOE_CHAIN, 1, h), (MOE_CHAIN, 1, k) twice
            out = self.routed(x[0], idx[0], weight[0])
            for r in range(1, MOE_CHAIN):
                out = out + self.routed(x[r], idx[r], weight[r])
            return out

    results = []
    for experts in a.expert_counts:
        w = moe_arrays(a, experts)
        cfg = DeepseekV2Config(**dict(model_fields(a, 2048, experts), num_hidden_layers=1, first_k_dense_replace=0))
        moe = DeepSeekMoE(cfg)
        moe.set_train(False)
        moe.router.weight.set_data(Tensor(w["router"]))
        for name in ("w1", "w3", "w2"):
            getattr(moe.routed_experts, name).set_data(Tensor(w[name]))
        if moe.shared_experts is not None:
            for name in ("w1", "w3", "w2"):
                getattr(moe.shared_experts, name).weight.set_data(Tensor(w["s" + name]))
        routed = moe.routed_experts
        block, chain = Block(moe), Routed(routed)
        idx, weight = (x.asnumpy() for x in moe.router(Tensor(w["x"].reshape(MOE_POOL, -1)))[1:])
        groups = [list(range(j, j + MOE_CHAIN)) for j in range(0, MOE_POOL, MOE_CHAIN)]
        block_in = [Tensor(w["x"][g]) for g in groups]                               # (chain, 1, 1, h)
        routed_in = [(Tensor(w["x"][g].reshape(MOE_CHAIN, 1, -1)), Tensor(idx[g][:, None]),
                      Tensor(weight[g][:, None])) for g in groups]
        state = {"i": 0}

        def nxt():
            state["i"] = (state["i"] + 1) % len(groups)
            return state["i"]

        calls = {}
        for variant, per_assignment in (("per assignment", True), ("block plan", False)):
            def prepare(flag=per_assignment, phase=variant):
                routed.per_assignment = flag                  # read when the phase's graph is compiled
                block.phase = f"moe {phase}"
                chain.phase = f"routed {phase}"

            def run_block():
                block(block_in[nxt()]).asnumpy()

            def run_routed():
                chain(*routed_in[nxt()]).asnumpy()

            calls[f"block, {variant}"] = (prepare, run_block)
            calls[f"routed, {variant}"] = (prepare, run_routed)
        outputs = {}
        for name, (prepare, run) in calls.items():
            prepare()
            state["i"] = 0
            outputs[name] = (block(block_in[0]) if name.startswith("block") else chain(*routed_in[0])).asnumpy()
        diff = max(float(abs(outputs[f"{part}, per assignment"] - outputs[f"{part}, block plan"]).max())
                   for part in ("block", "routed"))
        times = interleaved(calls, a.moe_reps)
        results.append(dict(experts=experts, ms={k: C.median(v) * 1000 / MOE_CHAIN for k, v in times.items()},
                            per_assignment=routed.gathers_per_assignment(a.top_k), diff=diff))
        routed.per_assignment = True
    return dict(cases=results, framework=f"MindSpore {ms.__version__} graph mode")


def worker_moe_ref(a) -> dict:
    """transformers' DeepseekV2MoE (gate, routed experts in a Python loop, shared experts), same weights and inputs."""
    import torch
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MoE
    torch.set_num_threads(a.threads or os.cpu_count())
    results = []
    for experts in a.expert_counts:
        w = moe_arrays(a, experts)
        moe = DeepseekV2MoE(C.hf_config(dict(model_fields(a, 2048, experts), num_hidden_layers=1,
                                             first_k_dense_replace=0))).eval()
        t = torch.from_numpy
        with torch.no_grad():
            moe.gate.weight.copy_(t(w["router"]))
            for e, expert in enumerate(moe.experts):
                expert.gate_proj.weight.copy_(t(w["w1"][e]))
                expert.up_proj.weight.copy_(t(w["w3"][e]))
                expert.down_proj.weight.copy_(t(w["w2"][e]))
            if a.shared:
                moe.shared_experts.gate_proj.weight.copy_(t(w["sw1"]))
                moe.shared_experts.up_proj.weight.copy_(t(w["sw3"]))
                moe.shared_experts.down_proj.weight.copy_(t(w["sw2"]))
            xs = [t(x) for x in w["x"]]
            routes = [moe.gate(x) for x in xs]
        groups = [list(range(j, j + MOE_CHAIN)) for j in range(0, MOE_POOL, MOE_CHAIN)]
        state = {"i": 0}

        def nxt():
            state["i"] = (state["i"] + 1) % len(groups)
            return groups[state["i"]]

        def run_block():
            with torch.no_grad():
                for j in nxt():
                    moe(xs[j])

        def run_routed():
            with torch.no_grad():
                for j in nxt():
                    moe.moe(xs[j].view(1, -1), *routes[j])

        times = interleaved({"block": ((lambda: None), run_block), "routed": ((lambda: None), run_routed)},
                            a.moe_reps)
        results.append(dict(experts=experts, ms={k: C.median(v) * 1000 / MOE_CHAIN for k, v in times.items()}))
    return dict(cases=results, framework=f"transformers {transformers.__version__} / torch {torch.__version__}, "
                                         f"{torch.get_num_threads()} threads")


def moe_table(ours: dict, ref: dict) -> str:
    rows = []
    first = ours["cases"][0]["ms"]
    ref_cases = {c["experts"]: c["ms"] for c in ref["cases"]}
    for case in ours["cases"]:
        m, r = case["ms"], ref_cases[case["experts"]]
        for part, ref_key in (("block", "block"), ("routed", "routed")):
            pa, bp = m[f"{part}, per assignment"], m[f"{part}, block plan"]
            rows.append([case["experts"], {"block": "MoE block (router + routed + shared)",
                                           "routed": "routed experts"}[part],
                         f"{pa:.3f}", f"{pa / first[f'{part}, per assignment']:.2f}",
                         f"{bp:.3f}", f"{bp / first[f'{part}, block plan']:.2f}",
                         f"{r[ref_key]:.3f}", f"{r[ref_key] / ref['cases'][0]['ms'][ref_key]:.2f}",
                         C.ratio(pa, r[ref_key])])
    headers = ["experts E", "part", "ours per assignment ms", "vs first E", "ours block plan ms", "vs first E",
               "reference ms", "vs first E", "ours (per assignment) / reference, time"]
    return C.table(headers, rows)


# ---------------------------------------------------------------------------------------------- tables
def med(runs, key):
    """Median of one figure over the rounds."""
    return C.median([r[key] for r in runs])


def context_rows(context: int, ours_runs: list, ref_runs: list):
    """The decode table's rows for one context: medians over the rounds."""
    rows = []
    for name, runs in (("ours", ours_runs), ("reference", ref_runs)):
        r = runs[0]
        cache = r.get("cache_bytes_alloc", r.get("cache_bytes_prefill"))
        step = med(runs, "step_s")
        rows.append([context, name, f"{1.0 / step:.1f}", f"{step * 1000:.1f}", f"{med(runs, 'prefill_s'):.2f}",
                     f"{cache / 2 ** 20:.2f}", f"{r['cache_bytes_per_token']:.0f}", C.mib(med(runs, "peak_rss")),
                     C.mib(C.median([x["peak_rss"] - x["rss_build"] for x in runs]))])
    ours, ref = ours_runs[0], ref_runs[0]
    ours_cache_prefill = ours["cache_bytes_per_token"] * context
    per_round = [r["step_s"] / o["step_s"] for o, r in zip(ours_runs, ref_runs)]
    rows.append([context, "ours / reference", f"{C.median(per_round):.2f}x",
                 C.ratio(med(ours_runs, "step_s"), med(ref_runs, "step_s")),
                 C.ratio(med(ours_runs, "prefill_s"), med(ref_runs, "prefill_s")),
                 C.ratio(ours["cache_bytes_alloc"], ref["cache_bytes_prefill"]) + " (same tokens: "
                 + C.ratio(ours_cache_prefill, ref["cache_bytes_prefill"]) + ")",
                 C.ratio(ours["cache_bytes_per_token"], ref["cache_bytes_per_token"]),
                 C.ratio(med(ours_runs, "peak_rss"), med(ref_runs, "peak_rss")),
                 C.ratio(C.median([x["peak_rss"] - x["rss_build"] for x in ours_runs]),
                         C.median([x["peak_rss"] - x["rss_build"] for x in ref_runs]))])
    return rows, per_round


def components(pair: dict, side: str, generate_loop_ms: float, block_plan: bool = False) -> dict:
    """ms of the parts of a decode step (differences of medians, see the docstring) from one pair worker."""
    m = {name.split(": ", 1)[1]: value for name, value in pair["ms"].items() if name.startswith(side + ": ")}
    step = m["block plan"] if block_plan else m["step"]
    moe = step - m["no MoE"]
    attention = m["step"] - m["no attention"]
    return {"decode step (forward only)": step, "routed experts": step - m["no routed experts"],
            "MoE (router + routed + shared)": moe, "attention (MLA / per-head)": attention,
            "rest (embedding, norms, dense layer, lm_head, call)": step - moe - attention,
            "generate loop (host), from the generate workers": generate_loop_ms}


def breakdown_rows(pairs: list, ours_runs: list, ref_runs: list):
    """The breakdown table (medians over the rounds) and the per-round components (ours, ours block plan, ref)."""
    parts = []
    for pair, o, r in zip(pairs, ours_runs, ref_runs):
        ours_loop, ref_loop = o["step_s"] * 1000 - o["forward_ms"], r["step_s"] * 1000 - r["forward_ms"]
        parts.append((components(pair, "ours", ours_loop), components(pair, "ours", ours_loop, True),
                      components(pair, "reference", ref_loop)))
    rows = []
    for key in parts[0][0]:
        cells = [key]
        for column in range(3):
            ms_value = C.median([p[column][key] for p in parts])
            share = C.median([p[column][key] / p[column]["decode step (forward only)"] for p in parts])
            same = column == 1 and key.startswith(("attention", "rest", "generate"))
            cells += ["same" if same else f"{ms_value:.1f}", "" if same else f"{share:.0%}"]
        rows.append(cells)
    return rows, parts


def main(argv=None):
    a = parse_args(argv)
    load_start = C.load_average()
    if a.worker:
        C.write_result({"ours": worker_ours, "ref": worker_ref, "pair": worker_pair, "moe-ours": worker_moe_ours,
                        "moe-ref": worker_moe_ref, "ours-block-plan": worker_ours}[a.worker](a))
        return
    import tempfile
    contexts = [int(c) for c in a.contexts.split(",") if c]
    labels = {"ref": "reference generate", "ours": "our generate",
              "ours-block-plan": "our generate, block plan forced (before)",
              "pair": "both models in one process, decode forwards interleaved"}
    sections, summary = [], []
    for experts in (a.expert_counts if contexts else []):
        rows, notes, breakdowns = [], [], []
        for context in contexts:
            runs = {"ours": [], "ref": [], "pair": [], "ours-block-plan": []}
            with tempfile.TemporaryDirectory(prefix="ds2_bench_w_") as tmp:
                weights = os.path.join(tmp, "reference.npz")           # written by the first reference worker
                for rnd in range(a.rounds):
                    order = ("ref", "ours") if rnd % 2 == 0 else ("ours", "ref")
                    for worker in order + (("ours-block-plan",) if a.block_plan else ()) + \
                            (("pair",) if a.breakdown else ()):
                        label = f"{labels[worker]}, {experts} experts, context {context}, round {rnd + 1}"
                        runs[worker].append(C.run_worker(SCRIPT, worker_argv(a, experts, context, weights, worker),
                                                         label, a.verbose))
            for name in ("ours", "ref", "ours-block-plan"):
                for r in runs[name]:
                    if r["generated"] != a.new_tokens:
                        raise RuntimeError(f"{name} generated {r['generated']} tokens at context {context}, "
                                           f"expected --new-tokens={a.new_tokens}")
            ours, ref = runs["ours"][0], runs["ref"][0]
            same = sum(x == y for x, y in zip(ours["sequence"], ref["sequence"]))
            context_table, per_round = context_rows(context, runs["ours"], runs["ref"])
            rows += context_table
            notes.append(f"context {context}: decode tokens/s ours / reference per round "
                         f"{[round(x, 2) for x in per_round]}; our decode step's routed experts: "
                         f"{ours['decode_dispatch']} dispatch" + (
                             f" (decode logits max |per assignment - block plan| "
                             f"{max(r['dispatch_logits_diff'] for r in runs['pair']):.1e})" if a.breakdown else ""))
            if not a.no_warmup:
                notes.append(f"context {context}: warm-up generate of 2 tokens (prefill + 1 decode step; ours "
                             f"compiles both graphs here): ours {ours['warmup_s']:.1f} s, reference "
                             f"{ref['warmup_s']:.1f} s")
            notes.append(f"context {context}: greedy tokens equal in {same}/{a.new_tokens} positions; decode "
                         f"intervals ms ours {[round(t * 1000, 1) for t in ours['intervals']]}, "
                         f"reference {[round(t * 1000, 1) for t in ref['intervals']]}")
            notes.append(f"context {context}: ours {ours['framework']}: {ours['cache_kind']}; "
                         f"reference {ref['framework']}: {ref['cache_kind']}")
            row = [experts, context, f"{1 / med(runs['ours'], 'step_s'):.1f}", f"{1 / med(runs['ref'], 'step_s'):.1f}",
                   f"{C.median(per_round):.2f}x"]
            if a.block_plan:
                before = [r["step_s"] / b["step_s"] for b, r in zip(runs["ours-block-plan"], runs["ref"])]
                row += [f"{1 / med(runs['ours-block-plan'], 'step_s'):.1f}", f"{C.median(before):.2f}x"]
                notes.append(f"context {context}: our generate with the block plan forced (before): "
                             f"{1 / med(runs['ours-block-plan'], 'step_s'):.1f} tokens/s, "
                             f"{med(runs['ours-block-plan'], 'step_s') * 1000:.1f} ms per token; reference / it per "
                             f"round {[round(x, 2) for x in before]}; tokens equal to ours: "
                             f"{all(b['sequence'] == ours['sequence'] for b in runs['ours-block-plan'])}")
            if a.breakdown:
                table, parts = breakdown_rows(runs["pair"], runs["ours"], runs["ref"])
                headers = ["part of a decode step", "ours ms", "share", "ours, block plan ms", "share",
                           "reference ms", "share"]
                forward_ratio = [p["step_ratio_median"] for p in runs["pair"]]
                breakdowns += [f"### {experts} experts, context {context}: where a decode step goes "
                               f"(both models in one process, median of {a.breakdown_reps} interleaved calls per "
                               f"variant, {a.rounds} round(s))", "", C.table(headers, table), "",
                               f"decode forward only, reference / ours time, call by call (median per round): "
                               f"{[round(x, 2) for x in forward_ratio]}", ""]
                pick = {key: [C.median([p[col][key] for p in parts]) for col in range(3)]
                        for key in ("decode step (forward only)", "routed experts",
                                    "MoE (router + routed + shared)")}
                step, routed, moe = (pick[k] for k in ("decode step (forward only)", "routed experts",
                                                       "MoE (router + routed + shared)"))
                row += [f"{C.median(forward_ratio):.2f}x", f"{routed[0]:.1f} / {routed[1]:.1f}",
                        f"{moe[0] / step[0]:.0%} / {moe[1] / step[1]:.0%}", f"{routed[2]:.1f}",
                        f"{moe[2] / step[2]:.0%}"]
            summary.append(row)
        headers = ["context", "", "decode tokens/s", "ms per token (median)", "prefill s", "cache MiB",
                   "cache B/token", "peak RSS MiB", "peak - RSS after build MiB"]
        sections += [f"## Decode with a cache: {experts} routed experts", "",
                     f"config: {json.dumps(model_fields(a, max(contexts) + a.new_tokens, experts), sort_keys=True)}",
                     "", C.table(headers, rows), ""] + notes + [""] + breakdowns
    if a.moe_table:
        argv = worker_argv(a, a.experts, 0, "", "moe-ours")
        argv[argv.index("--experts") + 1] = ",".join(str(e) for e in a.expert_counts)
        argv += ["--moe-reps", str(a.moe_reps)]
        moe_ours = C.run_worker(SCRIPT, argv, "MoE block alone (MindSpore graph mode)", a.verbose)
        argv[argv.index("--worker") + 1] = "moe-ref"
        moe_ref = C.run_worker(SCRIPT, argv, "MoE block alone (PyTorch)", a.verbose)
        sections += [f"## The MoE block alone at decode size: 1 token, hidden {a.hidden}, moe_intermediate "
                     f"{a.moe_intermediate}, top-{a.top_k}, {a.shared or 0} shared, {a.topk_method} (ms per application: "
                     f"median of {a.moe_reps} interleaved calls of {MOE_CHAIN} applications each, {MOE_POOL} inputs "
                     f"cycled)", "", moe_table(moe_ours, moe_ref), "",
                     f"ours {moe_ours['framework']}; reference {moe_ref['framework']}; outputs max |per assignment - "
                     f"block plan| {max(c['diff'] for c in moe_ours['cases']):.1e}", ""]
    summary_headers = ["experts E", "context", "ours tokens/s", "reference tokens/s", "ours / reference"]
    if a.block_plan:
        summary_headers += ["ours, block plan (before) tokens/s", "before / reference"]
    if a.breakdown:
        summary_headers += ["forward only, interleaved", "ours routed experts ms (per assignment / block plan)",
                            "ours MoE share (per assignment / block plan)", "reference routed experts ms",
                            "reference MoE share"]
    out = [f"machine: {C.machine_line()}",
           f"preset {a.preset}; batch 1, fp32, greedy, {a.new_tokens} new tokens per context; ours seq_length = "
           f"context + new tokens; {'no warm-up (prefill includes compilation)' if a.no_warmup else 'after a warm-up generate'}; "
           f"{a.rounds} round(s) per context (medians); threads: {a.threads or 'framework defaults'}", "",
           ] + (["## Summary", "", C.table(summary_headers, summary), ""] if summary else []) + sections + \
        [C.load_line(load_start)]
    print("\n".join(out))


if __name__ == "__main__":
    main()
