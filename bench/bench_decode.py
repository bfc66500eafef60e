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

Run from the repo root:  python bench/bench_decode.py            (about 3-5 minutes on 2 cores)
                         python bench/bench_decode.py --help
"""
import argparse
import json
import os
import sys
import time

import common as C  # bench/common.py, beside this script; sets the environment before any framework import

SCRIPT = os.path.abspath(__file__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (released config.json names; proportions of the released DeepSeek-V2)")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=512)
    g.add_argument("--intermediate", type=int, default=1024, help="dense FFN width (first layer)")
    g.add_argument("--moe-intermediate", type=int, default=256)
    g.add_argument("--experts", type=int, default=8, help="n_routed_experts")
    g.add_argument("--top-k", type=int, default=2, help="num_experts_per_tok")
    g.add_argument("--shared", type=int, default=1, help="n_shared_experts")
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--q-lora", type=int, default=192)
    g.add_argument("--kv-lora", type=int, default=128)
    g.add_argument("--rope", type=int, default=32, help="qk_rope_head_dim")
    g.add_argument("--nope", type=int, default=64, help="qk_nope_head_dim")
    g.add_argument("--v", type=int, default=64, help="v_head_dim")
    g.add_argument("--vocab", type=int, default=4096)
    r = p.add_argument_group("run")
    r.add_argument("--contexts", default="1024,4096", help="prompt lengths")
    r.add_argument("--new-tokens", type=int, default=16, help="tokens generated after each prompt")
    r.add_argument("--no-warmup", action="store_true", help="skip the warm-up generate (then the prefill includes "
                   "MindSpore's compilation and the first decode interval is left out of the median)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--verbose", action="store_true", help="show the workers' own output")
    r.add_argument("--worker", choices=("ours", "ref"), help=argparse.SUPPRESS)
    r.add_argument("--context", type=int, help=argparse.SUPPRESS)
    r.add_argument("--weights", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_fields(a, max_positions: int) -> dict:
    # eos is set outside the vocabulary so that neither generate stops early on random weights
    return dict(C.COMMON_FIELDS, vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                moe_intermediate_size=a.moe_intermediate, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                n_shared_experts=a.shared or None, n_routed_experts=a.experts, num_experts_per_tok=a.top_k,
                kv_lora_rank=a.kv_lora, q_lora_rank=a.q_lora or None, qk_rope_head_dim=a.rope,
                qk_nope_head_dim=a.nope, v_head_dim=a.v, max_position_embeddings=max_positions,
                eos_token_id=a.vocab)


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


def worker_ref(a) -> dict:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer
    torch.set_num_threads(os.cpu_count())
    fields = model_fields(a, max(a.context + a.new_tokens, 2048))
    model = C.build_reference(fields, a.seed).eval()
    C.save_reference_weights(model, a.weights)
    rss_build = C.rss_bytes()
    C.reset_peak_rss()                                       # peak from here on: prefill + decode only

    class Streamer(Stamps, BaseStreamer):
        pass

    ids = torch.tensor(prompt(a, a.context))

    def generate(new_tokens, streamer=None):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  use_cache=True, eos_token_id=None, pad_token_id=fields["pad_token_id"],
                                  streamer=streamer, return_dict_in_generate=True)

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
    return dict(stats, warmup_s=warmup_s,
                framework=f"transformers {transformers.__version__} / torch {torch.__version__} (eager, DynamicCache)",
                cache_bytes_prefill=per_token * a.context, cache_bytes_per_token=per_token,
                cache_kind="K (b, heads, t, nope+rope) and V (b, heads, t, v) per layer",
                generated=int(out.sequences.shape[1] - a.context), sequence=out.sequences[0, a.context:].tolist(),
                rss_build=rss_build, peak_rss=peak)


def worker_ours(a) -> dict:
    import numpy as np
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from mindformers.generation.streamers import BaseStreamer
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    C.silence_mindformers()
    seq_length = a.context + a.new_tokens
    cfg = DeepseekV2Config(**model_fields(a, max(seq_length, 2048)), seq_length=seq_length, batch_size=1,
                           use_past=True)
    net = DeepseekV2ForCausalLM(cfg)
    C.load_weights_into_ms(net, a.weights, a.experts)
    net.set_train(False)
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
    return dict(stats, warmup_s=warmup_s,
                framework=f"MindSpore {ms.__version__} graph mode, use_past (MLA latent cache)",
                cache_bytes_alloc=nbytes, cache_bytes_per_token=nbytes / seq_length,
                cache_kind=f"[c_kv | k_rope] (b, seq_length={seq_length}, {cfg.cache_width}) per layer",
                generated=generated, sequence=[int(t) for t in out[0][a.context:]], rss_build=rss_build,
                peak_rss=peak)


def context_rows(context: int, ours: dict, ref: dict):
    rows = []
    for name, r in (("ours", ours), ("reference", ref)):
        cache = r.get("cache_bytes_alloc", r.get("cache_bytes_prefill"))
        rows.append([context, name, f"{1.0 / r['step_s']:.1f}", f"{r['step_s'] * 1000:.1f}", f"{r['prefill_s']:.2f}",
                     f"{cache / 2 ** 20:.2f}", f"{r['cache_bytes_per_token']:.0f}", C.mib(r["peak_rss"]),
                     C.mib(r["peak_rss"] - r["rss_build"])])
    ours_cache_prefill = ours["cache_bytes_per_token"] * context
    rows.append([context, "ours / reference", C.ratio(1.0 / ours["step_s"], 1.0 / ref["step_s"]),
                 C.ratio(ours["step_s"], ref["step_s"]), C.ratio(ours["prefill_s"], ref["prefill_s"]),
                 C.ratio(ours["cache_bytes_alloc"], ref["cache_bytes_prefill"]) + " (same tokens: "
                 + C.ratio(ours_cache_prefill, ref["cache_bytes_prefill"]) + ")",
                 C.ratio(ours["cache_bytes_per_token"], ref["cache_bytes_per_token"]),
                 C.ratio(ours["peak_rss"], ref["peak_rss"]),
                 C.ratio(ours["peak_rss"] - ours["rss_build"], ref["peak_rss"] - ref["rss_build"])])
    return rows


def main(argv=None):
    a = parse_args(argv)
    load_start = C.load_average()
    if a.worker:
        C.write_result({"ours": worker_ours, "ref": worker_ref}[a.worker](a))
        return
    import tempfile
    passthrough = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--verbose"]
    contexts = [int(c) for c in a.contexts.split(",") if c]
    rows, notes = [], []
    for context in contexts:
        with tempfile.TemporaryDirectory(prefix="ds2_bench_w_") as tmp:
            weights = os.path.join(tmp, "reference.npz")
            extra = ["--context", str(context), "--weights", weights]
            ref = C.run_worker(SCRIPT, passthrough + ["--worker", "ref"] + extra,
                               f"reference generate, context {context} (PyTorch)", a.verbose)
            ours = C.run_worker(SCRIPT, passthrough + ["--worker", "ours"] + extra,
                                f"our generate, context {context} (MindSpore graph mode)", a.verbose)
        for name, r in (("ours", ours), ("reference", ref)):
            if r["generated"] != a.new_tokens:
                raise RuntimeError(f"{name} generated {r['generated']} tokens at context {context}, "
                                   f"expected --new-tokens={a.new_tokens}")
        same = sum(x == y for x, y in zip(ours["sequence"], ref["sequence"]))
        rows += context_rows(context, ours, ref)
        if not a.no_warmup:
            notes.append(f"context {context}: warm-up generate of 2 tokens (prefill + 1 decode step; ours compiles "
                         f"both graphs here): ours {ours['warmup_s']:.1f} s, reference {ref['warmup_s']:.1f} s")
        notes.append(f"context {context}: greedy tokens equal in {same}/{a.new_tokens} positions; decode intervals "
                     f"ms ours {[round(t * 1000, 1) for t in ours['intervals']]}, "
                     f"reference {[round(t * 1000, 1) for t in ref['intervals']]}")
        notes.append(f"context {context}: ours {ours['framework']}: {ours['cache_kind']}; "
                     f"reference {ref['framework']}: {ref['cache_kind']}")
    headers = ["context", "", "decode tokens/s", "ms per token (median)", "prefill s", "cache MiB", "cache B/token",
               "peak RSS MiB", "peak - RSS after build MiB"]
    out = [f"machine: {C.machine_line()}",
           f"config: {json.dumps(model_fields(a, max(contexts) + a.new_tokens), sort_keys=True)}",
           f"batch 1, fp32, greedy, {a.new_tokens} new tokens per context; ours seq_length = context + new tokens; "
           f"{'no warm-up (prefill includes compilation)' if a.no_warmup else 'after a warm-up generate'}", "",
           "## Decode with a cache", "", C.table(headers, rows), ""] + notes + [C.load_line(load_start)]
    print("\n".join(out))


if __name__ == "__main__":
    main()
