"""Long prompts: the longest context that prefills and decodes within a memory budget, ours against the reference.

For each context length (default 4096, 8192, 16384; batch 1) each implementation runs in a fresh process
``bench_decode.py``'s generate worker (prompt of that length, ``--new-tokens`` greedy tokens, no warm-up) with its
data segment limited to ``--limit-gib`` (RLIMIT_DATA: heap and private mappings; an allocation past it fails inside
the worker, so the machine's other processes are safe). A worker that fails is recorded with its exit code and
that implementation is not tried at longer contexts.

  ours       MindSpore graph mode, use_past (latent cache), ``prefill_chunk_size`` = ``--prefill-chunk``: the prompt
             is prefilled in calls of that many tokens against the latent cache, so the attention's largest buffer
             is (1, heads of a block, chunk, seq_length) whatever the prompt (mla.py: head blocks);
  reference  transformers' DeepseekV2ForCausalLM (eager attention, DynamicCache): one forward over the prompt,
             with (1, heads, s, s) fp32 attention weights per layer; or, with ``--ref-prefill-chunk``, the prompt
             pushed by hand through forward in calls of that many tokens into its DynamicCache before generate
             (not what its generate does by itself, but the same memory bound as ours).

Columns: peak RSS of the process (prefill + decode, from ``ru_maxrss``-like accounting of the worker), the prefill
seconds, decode tokens/s (median interval), and whether the greedy tokens agree where both ran.

Run from the repo root:  python bench/bench_long_context.py                 (about 10 minutes on 2 cores)
                         python bench/bench_long_context.py --contexts 32768 --ours-only   (about 12 minutes)
"""
import argparse
import re
import os
import tempfile

import common as C  # bench/common.py, beside this script; sets the environment before any framework import

DECODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_decode.py")
GIB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="4096,8192,16384", help="prompt lengths, tried in increasing order")
    p.add_argument("--limit-gib", type=float, default=24.0, help="memory each worker may allocate (GiB)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="our prefill_chunk_size")
    p.add_argument("--ref-prefill-chunk", type=int, default=0, help="bench_decode.py's --ref-prefill-chunk: the "
                   "reference's prompt prefilled by hand in forward calls of this many tokens (0: one generate call, "
                   "as a user runs it)")
    p.add_argument("--attention-chunk", type=int, default=None, help="our attention_chunk_size (bench_decode.py's "
                   "--attention-chunk; a prefill chunk's heads go in blocks of about that many (head, token) rows)")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--preset", default="small", help="bench_decode.py's model preset")
    p.add_argument("--ours-only", action="store_true", help="skip the reference (it failed at a shorter context)")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def run(a, worker: str, context: int, weights: str):
    argv = ["--preset", a.preset, "--worker", worker, "--context", context, "--weights", weights,
            "--new-tokens", a.new_tokens, "--no-warmup", "--prefill-chunk", a.prefill_chunk,
            "--ref-prefill-chunk", a.ref_prefill_chunk]
    argv += ["--attention-chunk", a.attention_chunk] if a.attention_chunk is not None else []
    label = f"{'our' if worker == 'ours' else 'reference'} generate, context {context}, limit {a.limit_gib:g} GiB"
    try:
        return C.run_worker(DECODE, [str(x) for x in argv], label, a.verbose,
                            memory_limit=int(a.limit_gib * GIB))
    except C.WorkerFailed as err:
        first = str(err).splitlines()[0]
        print(f"[bench] {label}: failed -- {first}", flush=True)
        return {"failed": first, "why": failure_kind(err.returncode, err.output)}


# how torch (DefaultCPUAllocator), numpy, Python and MindSpore say an allocation failed
OUT_OF_MEMORY = re.compile(r"MemoryError|bad_alloc|out of memory|can't allocate|cannot allocate|unable to allocate|"
                           r"DefaultCPUAllocator|malloc.*fail|memory not enough", re.IGNORECASE)


def failure_kind(returncode: int, output: str) -> str:
    """What a failed worker says: over the memory limit, stopped by a signal, or another error."""
    if returncode < 0:
        return f"stopped (signal {-returncode})"
    if not output:                                   # --verbose: the output went to the screen, unread here
        return f"failed (exit {returncode}; see its output above)"
    if OUT_OF_MEMORY.search(output):
        return "failed (over the limit)"
    return f"failed (exit {returncode}; not memory, see the worker log)"


def cell(result):
    if result is None:
        return ["not tried", "-", "-"]
    if "failed" in result:
        return [result.get("why", "failed"), "-", "-"]
    return [f"{result['peak_rss'] / GIB:.2f}", f"{result['prefill_s']:.1f}", f"{1 / result['step_s']:.1f}"]


def main(argv=None):
    a = parse_args(argv)
    load_start = C.load_average()
    contexts = sorted(int(c) for c in a.contexts.split(",") if c)
    results = {"ref": {}, "ours": {}}
    with tempfile.TemporaryDirectory(prefix="ds2_long_") as tmp:
        weights = os.path.join(tmp, "reference.npz")
        C.run_worker(DECODE, [str(x) for x in ("--preset", a.preset, "--worker", "ref", "--context", 16,
                                              "--weights", weights, "--new-tokens", 1, "--no-warmup")],
                     "reference weights (context 16)", a.verbose)
        for worker in ("ours",) if a.ours_only else ("ref", "ours"):
            for context in contexts:
                result = run(a, worker, context, weights)
                results[worker][context] = result
                if "failed" in result:
                    break
    rows = []
    for context in contexts:
        ours, ref = results["ours"].get(context), results["ref"].get(context)
        both = ours and ref and "failed" not in ours and "failed" not in ref
        same = f"{sum(x == y for x, y in zip(ours['sequence'], ref['sequence']))}/{a.new_tokens}" if both else "-"
        rows.append([context] + cell(ours) + cell(ref) + [same])
    fits = {w: max([c for c, r in results[w].items() if "failed" not in r], default=0) for w in results}
    print(C.machine_line())
    print(f"preset {a.preset}; batch 1, fp32, greedy, {a.new_tokens} new tokens, no warm-up; ours prefill_chunk_size "
          f"{a.prefill_chunk}; reference prompt " + (f"prefilled by hand in calls of {a.ref_prefill_chunk} tokens"
                                                       if a.ref_prefill_chunk else "in one generate call")
          + f"; each worker limited to {a.limit_gib:g} GiB of data (RLIMIT_DATA)")
    print()
    print(C.table(["context", "ours peak GiB", "ours prefill s", "ours decode tok/s", "reference peak GiB",
                   "reference prefill s", "reference decode tok/s", "greedy tokens equal"], rows))
    print()
    print(f"longest context tried that fits in {a.limit_gib:g} GiB: ours {fits['ours'] or 'none'}, reference "
          f"{fits['ref'] or 'none'}" + (f" ({fits['ours'] / fits['ref']:.1f}x)" if fits["ours"] and fits["ref"]
                                        else "") +
          ("" if fits["ours"] != contexts[-1] else " (ours fitted the longest context tried)"))
    for result in results["ours"].values():
        if "framework" in result:
            print(f"ours: {result['framework']}")
            break
    print(C.load_line(load_start))


if __name__ == "__main__":
    main()
