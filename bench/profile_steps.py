"""Where the milliseconds of a training step and of a decode step go: MindSpore's profiler on our model (CPU, graph
mode), aggregated per step by op type and by model part.

training  bench_train.py's default config and its train step (nn.TrainOneStepCell + its optimizer, the package's
          CpuAdamW by default: its own ``worker_ours``, with the step loop replaced by ours): warm-up steps (the
          first compiles; the others are timed without the profiler), then --steps steps under the profiler.
decode    bench_decode.py's model at --context (its own ``worker_ours``: a warm-up generate of 2 tokens compiles the
          prefill and decode graphs), then one generate of 2*K+2 tokens: decode steps 2..K+1 are timed without the
          profiler, the profiler starts at token K+1 (its start lands in step K+2, left out) and steps K+3..2K+2
          (K = --steps, default 16) are profiled. A step is the interval between two tokens handed to the streamer.

The profiler (``mindspore.profiler.profile``, CPU activity) writes FRAMEWORK/cpu_op_execute_timestamp_0.txt (every
kernel launch: start in ns since the epoch, duration in ms, thread) and cpu_op_detail_info_0.csv (op type per op);
ops are assigned to a step by start time. Parts come from the op's scope name (the cell path, e.g.
.../attention-MLAttention/..., Gradients/... for backward, optimizer-.../...); ops without a cell path
(Expand/_SoftmaxBackward/... : the expanded backward of a softmax) take the scope of the op run just before them.
Per step: "ops" is the summed kernel time; "between ops" is the graph's span (first op start to last op end) minus
the time some kernel ran (runtime: actor scheduling, memory, launch); "outside the graph" is the wall time minus the
span (Python step or generate loop, inputs, launching the graph, copying the result back).

Run from the repo root:  python bench/profile_steps.py                 (both parts, about 3-4 minutes on 2 cores)
                         python bench/profile_steps.py --part decode --preset v2 --experts 64
                         python bench/profile_steps.py --keep --out-dir /tmp/prof   (keep the profiler's files)
"""
import argparse
import collections
import csv
import glob
import os
import re
import shutil
import sys
import tempfile
import time

import common as C  # bench/common.py, beside this script; sets the environment before any framework import
import bench_decode as D
import bench_train as T

SCRIPT = os.path.abspath(__file__)
# (substring of the scope name, part), first match wins: norms inside attention count as norms
PARTS = [("optimizer", "optimizer (AdamW)"), ("RMSNorm", "norms (RMSNorm)"),
         ("routed_experts-RoutedExperts", "MoE: routed experts"), ("router-Router", "MoE: router (gate, top-k)"),
         ("shared_experts-FeedForward", "MoE: shared experts"), ("-DeepSeekMoE", "MoE: combine (block glue)"),
         ("feed_forward-FeedForward", "dense FFN (layer 0)"), ("attention-MLAttention", "attention (MLA)"),
         ("tok_embeddings", "embedding"), ("rotary-RotaryEmbedding", "rotary tables"), ("lm_head", "lm_head + loss"),
         ("-DecoderLayer", "decoder layer: residual adds"), ("model-DeepseekV2Model", "model: cast, final glue")]
CELL = re.compile(r"^[\w.]+-[A-Z]\w*$")          # a cell segment of a scope name: attribute-ClassName


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("train", "decode", "both"), default="both")
    p.add_argument("--steps", type=int, default=None, help="profiled steps (default 5 training, 16 decode)")
    p.add_argument("--warmup", type=int, default=3, help="training warm-up steps (the first compiles)")
    p.add_argument("--context", type=int, default=4096, help="decode: prompt tokens")
    p.add_argument("--prefill-chunk", type=int, default=512, help="decode: prefill_chunk_size of the prompt's "
                   "prefill (0: one call; its graph's buffers grow with context^2)")
    p.add_argument("--experts", default=None, help="n_routed_experts (default: each benchmark's)")
    p.add_argument("--preset", choices=sorted(D.PRESETS), default="small", help="decode model, as bench_decode")
    p.add_argument("--out-dir", default=None, help="profiler output (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the profiler's files")
    p.add_argument("--top", type=int, default=12, help="rows of the single-op table")
    p.add_argument("--verbose", action="store_true", help="show the workers' own output")
    p.add_argument("--worker", choices=("train", "decode"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- profiler
def start_profiler(path: str):
    from mindspore.profiler import ProfilerActivity, profile, tensorboard_trace_handler
    prof = profile(activities=[ProfilerActivity.CPU], start_profile=False,
                   on_trace_ready=tensorboard_trace_handler(path))              # stop() writes and parses
    prof.start()
    return prof


def thread_settings() -> str:
    import mindspore as ms
    from mindspore._c_expression import RuntimeConf
    conf = RuntimeConf.get_instance()
    with open("/proc/self/status") as handle:
        threads = next(line.split()[1] for line in handle if line.startswith("Threads:"))
    return (f"runtime_num_threads={ms.get_context('runtime_num_threads')} (CPU kernel pool), "
            f"inter_op_parallel_num={ms.get_context('inter_op_parallel_num')} (0: runtime's choice), "
            f"op threads_num set: {conf.is_op_threads_num_configured()}, dispatch threads set: "
            f"{conf.is_dispatch_threads_num_configured()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
            f", {os.cpu_count()} cores, {threads} threads in the process")


def read_events(path: str):
    """[(scope, op type, start ns, ms, thread)] of every kernel launch the profiler recorded under ``path``."""
    frame = glob.glob(os.path.join(path, "*", "FRAMEWORK"))
    if len(frame) != 1:
        raise RuntimeError(f"expected one profiler FRAMEWORK directory under {path}, found {frame}")
    types = {}
    with open(os.path.join(frame[0], "cpu_op_detail_info_0.csv")) as handle:
        for row in csv.DictReader(handle):
            types[row["full_op_name"]] = row["op_type"]
    events = []
    with open(os.path.join(frame[0], "cpu_op_execute_timestamp_0.txt")) as handle:
        for line in handle:
            name, _, times = line.strip().split(";", 2)
            kind = types.get(name, re.sub(r"-op\d+$", "", name.rsplit("/", 1)[-1]))
            for item in times.split():
                start, ms, thread = item.split(",")
                events.append((name, kind, int(start), float(ms), thread))
    return sorted(events, key=lambda e: e[2])


def part_of(scope: str):
    for key, part in PARTS:
        if key in scope:
            return part
    return "lm_head + loss" if "DeepseekV2ForCausalLM" in scope else "other (no cell scope)"


def norm_backward(name: str, kind: str) -> bool:
    """The one kernel of each RMSNorm's backward: layers.RMSNormFunction.bprop's Sub (MindSpore's own derivative of
    an RMSNorm written from basic ops has RsqrtGrad instead)."""
    return kind == "RsqrtGrad" or (kind == "Sub" and "RMSNormFunction" in name)


def attribute(step, config):
    """[(part, backward?)] of one step's events. Forward: the op's own scope (ops without a cell path take the one of
    the op before them). Backward: MindSpore 2.9 names a backward op after the first cell that used its primitive
    (every Linear's weight gradient is called lm_head-Linear/Grad_MatMul, every BatchMatMul's is the first
    attention's), so backward ops are placed by position instead: between consecutive RMSNorm backward kernels
    (``norm_backward``), which run in reverse layer order: loss + lm_head, norm_out, then per layer FFN or MoE,
    ffn_norm, attention (with its lq_norm and lkv_norm inside), attention_norm; last the embedding."""
    layers, dense = config["num_hidden_layers"], config.get("first_k_dense_replace", 0)
    cycle = 3 if config.get("q_lora_rank") else 2              # RMSNorms per layer met inside and around attention
    cycle += 1                                                  # + ffn_norm
    # the backward pass proper starts after the forward lm_head (a few gradient ops that need no loss run before)
    last = max([i for i, e in enumerate(step) if e[0].startswith("Default/") and "lm_head-" in e[0]], default=-1)
    norms = sum(norm_backward(e[0], e[1]) for e in step[last + 1:])
    by_segment = norms == 1 + layers * cycle
    out, scope, seen = [], "", 0
    for i, (name, kind, *_) in enumerate(step):
        own = [s for s in name.split("/")[:-1] if CELL.match(s)]
        scope = name if own else scope
        backward = i > last and any(e[0].startswith("Gradients/") for e in step)
        if "optimizer" in name:
            out.append(("optimizer (AdamW)", False))
        elif not backward or not by_segment:
            out.append((part_of(name if own or not scope else scope),
                        name.startswith("Gradients/") or "Grad" in name or "Backward" in name))
        else:
            if norm_backward(name, kind) or "RMSNorm" in name:
                part = "norms (RMSNorm)"
            elif seen == 0:
                part = "lm_head + loss"
            else:
                layer, slot = layers - 1 - (seen - 1) // cycle, (seen - 1) % cycle
                part = ("embedding" if layer < 0 else "attention (MLA)" if slot else
                        "dense FFN (layer 0)" if layer < dense else "MoE block (backward, all of it)")
            seen += norm_backward(name, kind)
            out.append((part, True))
    return out, by_segment


def aggregate(events, windows, config, top: int) -> dict:
    """Per-step figures of the events whose start falls in one of ``windows`` [(start ns, end ns)]."""
    n = len(windows)
    by_type = collections.defaultdict(lambda: [0.0, 0])
    by_part = collections.defaultdict(lambda: [0.0, 0.0])
    by_op = collections.defaultdict(float)
    ops = busy = span = 0.0
    threads, segmented = set(), True
    for w0, w1 in windows:
        step = [e for e in events if w0 <= e[2] < w1]
        parts, ok = attribute(step, config)
        segmented = segmented and ok
        end = None
        for (name, kind, start, ms, thread), (part, backward) in zip(step, parts):
            by_type[kind][0] += ms
            by_type[kind][1] += 1
            by_part[part][backward] += ms
            by_op[(kind, re.sub(r"^.*?layers-CellList/", "", name))] += ms
            threads.add(thread)
            ops += ms
            stop = start + ms * 1e6                                # union of busy intervals (kernels may overlap)
            if end is None or start >= end:
                busy += ms
                end = stop
            elif stop > end:
                busy += (stop - end) / 1e6
                end = stop
        if step:
            span += (max(e[2] + e[3] * 1e6 for e in step) - step[0][2]) / 1e6
    wall = sum(w1 - w0 for w0, w1 in windows) / 1e6
    return dict(steps=n, wall=wall / n, ops=ops / n, busy=busy / n, span=span / n, segmented=segmented,
                threads=sorted(threads), types={k: (v[0] / n, v[1] / n) for k, v in by_type.items()},
                parts={k: (v[0] / n, v[1] / n) for k, v in by_part.items()},
                top=[(k[0], k[1], v / n) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]])


# ---------------------------------------------------------------------------------------------- workers
def worker_train(a, out: str, t=None) -> dict:
    """bench_train's worker_ours (its config, TrainOneStepCell, optimizer, step) with our loop in place of its timing.
    t: bench_train's parsed arguments (default: its defaults with this script's --warmup, --steps, --experts)."""
    if t is None:
        argv = ["--warmup", str(a.warmup), "--steps", str(a.steps)] + (["--experts", a.experts] if a.experts else [])
        t = T.parse_args(argv)
    t.weights = os.path.join(out, "reference.npz")
    C.save_reference_weights(C.build_reference(T.model_fields(t), t.seed), t.weights)
    box = {}

    def loop(step, warmup, steps):                   # replaces common.run_train_steps inside worker_ours
        start = time.perf_counter()
        loss = step()
        box["first_s"] = time.perf_counter() - start
        box["warm_ms"] = [C.timed(step) * 1000 for _ in range(warmup - 1)]
        print(f"[profile] training: compiled and warmed up; profiling {steps} steps", file=sys.stderr, flush=True)
        prof = start_profiler(os.path.join(out, "train"))
        box["threads"] = thread_settings()
        windows = []
        for _ in range(steps):
            w0 = time.time_ns()
            loss = step()
            windows.append((w0, time.time_ns()))
        prof.stop()
        box["windows"], box["loss"] = windows, loss
        return {}

    saved, C.run_train_steps = C.run_train_steps, loop
    try:
        info = T.worker_ours(t)
    finally:
        C.run_train_steps = saved
    fields = T.model_fields(t)
    return dict(box, framework=info["framework"], params=info["params"], config=fields, tokens=t.batch * t.seq,
                what=f"one train step: batch {t.batch} x seq {t.seq}, forward + backward + AdamW, fp32")


def worker_decode(a, out: str) -> dict:
    """bench_decode's worker_ours (its model and warm-up generate) with a streamer that starts the profiler."""
    k = a.steps
    argv = ["--preset", a.preset, "--new-tokens", str(2 * k + 2), "--prefill-chunk", str(a.prefill_chunk)] + \
        (["--experts", a.experts] if a.experts else [])
    d = D.parse_args(argv)
    d.context, d.worker, d.weights = a.context, "ours", os.path.join(out, "reference.npz")
    fields = D.model_fields(d, max(d.context + d.new_tokens, 2048))
    C.save_reference_weights(C.build_reference(fields, d.seed), d.weights)
    box = {"streamers": []}

    class Stamps(D.Stamps):                          # bench_decode's streamer, also stamping time_ns
        def __init__(self):
            super().__init__()
            self.ns = []
            box["streamers"].append(self)

        def put(self, value):
            super().put(value)
            self.ns.append(time.time_ns())
            if len(self.ns) == k + 2:                 # token K+1 arrived: profile from here on
                box["prof"] = start_profiler(os.path.join(out, "decode"))
                box["threads"] = thread_settings()

    saved, D.Stamps = D.Stamps, Stamps
    try:
        print(f"[profile] decode: warm-up generate, then {2 * k + 2} tokens", file=sys.stderr, flush=True)
        info = D.worker_ours(d)
    finally:
        D.Stamps = saved
    box["prof"].stop()
    ns = box["streamers"][-1].ns                     # prompt, token 1 (prefill), tokens 2 .. 2K+2
    plain = [(ns[j + 1] - ns[j]) / 1e6 for j in range(1, k + 1)]
    return dict(windows=[(ns[j], ns[j + 1]) for j in range(k + 2, 2 * k + 2)], warm_ms=plain,
                threads=box["threads"], framework=info["framework"], config=fields, prefill_s=info["prefill_s"],
                what=f"one decode step of generate: batch 1, context {d.context}, preset {d.preset}, "
                     f"{fields['n_routed_experts']} experts top-{fields['num_experts_per_tok']}, "
                     f"{info['decode_dispatch']} dispatch")


def run_worker(a) -> dict:
    a.steps = a.steps or (5 if a.worker == "train" else 16)
    out = os.path.join(a.out_dir, a.worker)
    os.makedirs(out, exist_ok=True)
    result = (worker_train if a.worker == "train" else worker_decode)(a, out)
    print("[profile] reading the profile", file=sys.stderr, flush=True)
    result["profile"] = aggregate(read_events(os.path.join(out, a.worker)), result.pop("windows"),
                                  result["config"], a.top)
    result["steps"] = a.steps
    return result


# ---------------------------------------------------------------------------------------------- tables
def report(part: str, r: dict) -> str:
    p, wall = r["profile"], r["profile"]["wall"]
    plain = C.median(r["warm_ms"]) if r["warm_ms"] else float("nan")

    def pct(ms):
        return f"{ms / wall:.1%}"

    types = sorted(p["types"].items(), key=lambda kv: -kv[1][0])
    rows_a = [[kind, f"{calls:.0f}", f"{ms:.2f}", f"{ms / p['ops']:.1%}", pct(ms)] for kind, (ms, calls) in types]
    rows_b = [[name, f"{fwd:.2f}", f"{bwd:.2f}", f"{fwd + bwd:.2f}", pct(fwd + bwd)]
              for name, (fwd, bwd) in sorted(p["parts"].items(), key=lambda kv: -sum(kv[1]))]
    between, outside = p["span"] - p["busy"], wall - p["span"]
    rows_b += [["**all ops (summed kernel time)**", "", "", f"{p['ops']:.2f}", pct(p["ops"])],
               ["between ops inside the graph (runtime)", "", "", f"{between:.2f}", pct(between)],
               ["outside the graph (host: Python loop, launch, copies)", "", "", f"{outside:.2f}", pct(outside)],
               ["**not in ops (wall - summed ops)**", "", "", f"{wall - p['ops']:.2f}", pct(wall - p["ops"])],
               ["**wall per step (profiled)**", "", "", f"{wall:.2f}", "100%"],
               ["wall per step without the profiler (median)", "", "", f"{plain:.2f}", ""]]
    rows_c = [[kind, name, f"{ms:.2f}", pct(ms)] for kind, name, ms in p["top"]]
    return "\n".join([
        f"## {part}: {r['what']}", "",
        f"{r['framework']}; {r['steps']} profiled steps; config {r['config']}", "",
        f"threads: {r['threads']}; kernel threads seen by the profiler: {len(p['threads'])}", "",
        "### (a) by op type, ms per step", "",
        C.table(["op type", "calls/step", "ms/step", "share of ops", "share of wall"], rows_a), "",
        "### (b) by model part, ms per step", "",
        C.table(["part", "forward ms", "backward ms", "total ms", "share of wall"], rows_b), "",
        ("" if not any(b for _, b in p["parts"].values()) else "backward ops placed between the RMSNorm backward "
         "kernels (their scope names are not theirs); " if p["segmented"] else "backward ops by scope name (RMSNorm "
         "backward count unexpected, and MindSpore's backward names are unreliable); ")
        + f"kernels overlapping in time: {p['ops'] - p['busy']:.2f} ms/step (summed ops - union of their intervals)",
        "", f"### (c) the {len(rows_c)} costliest single ops (scope after layers-CellList/), ms per step", "",
        C.table(["op type", "op", "ms/step", "share of wall"], rows_c), "",
        f"wall per step without the profiler, each step (ms): {[round(x, 1) for x in r['warm_ms']]}"
        + (f"; prefill {r['prefill_s']:.2f} s" if "prefill_s" in r else "")
        + (f"; first step (compiles) {r['first_s']:.1f} s" if "first_s" in r else ""), ""])


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        C.write_result(run_worker(a))
        return
    load_start = C.load_average()
    out_dir = a.out_dir or tempfile.mkdtemp(prefix="ds2_profile_")
    passthrough = [x for x in (argv if argv is not None else sys.argv[1:]) if x not in ("--verbose", "--keep")]
    sections = []
    try:
        for part in (("train", "decode") if a.part == "both" else (a.part,)):
            result = C.run_worker(SCRIPT, passthrough + ["--worker", part, "--out-dir", os.path.abspath(out_dir)],
                                  f"profile of {part} steps", a.verbose)
            sections.append(report({"train": "Training", "decode": "Decode"}[part], result))
    finally:
        if not a.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    print("\n".join([f"machine: {C.machine_line()}", ""] + sections +
                    ([f"profiler files kept in {os.path.abspath(out_dir)}"] if a.keep else []) +
                    [C.load_line(load_start)]))


if __name__ == "__main__":
    main()
