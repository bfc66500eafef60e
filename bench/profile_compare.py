"""One training step of both frameworks under their own profilers, side by side by kind of work.

Where bench_train.py says how fast a step is, and profile_steps.py where our step spends its time, this says how our
kernels compare with the reference's kernels doing the same kind of work: the same config, weights and batch as
bench_train.py (forward + backward + AdamW, fp32, CPU), one process per framework:

  ours       MindSpore's profiler (CPU activity) on bench_train's worker_ours, read as profile_steps.py reads it:
             every kernel launch and its duration.
  reference  torch.profiler (CPU activity) on bench_train's worker_ref: every aten operator's self time (its time
             minus that of the operators it called), so a composite op (aten::matmul -> aten::mm) counts once.

Both are grouped into the same classes by operator name (CLASSES below; the optimizer's own class is every op under
the optimizer's scope, or under torch's ``Optimizer.step``), and the table prints ms per step, calls per step and
the ratio. A class whose ratio is above 1 is one where MindSpore's CPU kernels (or the number of them we launch) cost
more than torch's for the same work; "between kernels" is the time inside a step in which no kernel runs (MindSpore:
its graph runtime; torch: Python, the autograd engine and the dispatcher).

Run from the repo root:  python bench/profile_compare.py                         (about 3 minutes on 2 cores)
                         python bench/profile_compare.py --experts 64 --top-k 6 --shared 2 --q-lora 0
"""
import argparse
import collections
import os
import re
import shutil
import sys
import tempfile
import time

import common as C  # bench/common.py, beside this script; sets the environment before any framework import
import bench_train as T
import profile_steps as P

SCRIPT = os.path.abspath(__file__)
# (class, operator names of MindSpore | of torch without "aten::"), first match wins; anything else: "other"
CLASSES = [
    ("matmul", r"MatMul|BatchMatMul|mm|bmm|addmm|baddbmm|matmul|linear"),
    ("softmax, log-softmax, loss (fwd + bwd)", r"Softmax|SoftmaxGrad|LogSoftmax|LogSoftmaxGrad|"
     r"_softmax|_log_softmax|_softmax_backward_data|_log_softmax_backward_data|nll_loss\w*|cross_entropy_loss"),
    ("reductions, top-k, sort", r"Reduce\w+|CumSum|TopK|ArgMax\w*|Sort|AddN|sum|mean|max|amax|topk|sort|cumsum|"
     r"argmax|norm|linalg_vector_norm|_foreach_norm"),
    ("element-wise", r"Mul|Muls|Add|Sub|Div|RealDiv|Sqrt|Rsqrt|RsqrtGrad|Square|Pow|Neg|Exp|Log|Sigmoid|SigmoidGrad|"
     r"SiLU|SiLUGrad|Addcmul|Addcdiv|MaskedFill|Select|Greater|Less|Equal|Maximum|Minimum|Cast|Reciprocal|"
     r"(_foreach_)?(mul|add|sub|div|sqrt|rsqrt|pow|neg|exp|log|sigmoid|silu|addcmul|addcdiv|lerp|maximum|"
     r"reciprocal|where|masked_fill|gt|lt|eq|ge|le|ne|clamp|rsub|square)_?|sigmoid_backward|silu_backward|"
     r"threshold_backward|_to_copy|to"),
    ("copies, layout, gather/scatter", r"Transpose|Concat|Split|Slice|StridedSlice|StridedSliceGrad|TensorMove|"
     r"Assign|Gather|GatherD\w*|UnsortedSegmentSum|Scatter\w*|Tile|BroadcastTo|Reshape|OneHot|ExpandDims|Zeros\w*|"
     r"copy_|cat|index_select|index_add_|index_put_|scatter\w*|gather|clone|contiguous|embedding\w*|fill_|zero_|"
     r"zeros_like|ones_like|empty\w*|new_\w+|transpose|permute|view|reshape|expand|slice\w*|select\w*|narrow|"
     r"split\w*|unsqueeze|squeeze|t|as_strided|_unsafe_view|stack|repeat|one_hot|index|nonzero|arange|"
     r"bincount|histc"),
]
PATTERNS = [(name, re.compile(rf"^(aten::)?({pattern})$")) for name, pattern in CLASSES]
OPTIMIZER = "optimizer (AdamW update)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="profiled steps per framework")
    p.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (ours: the first compiles)")
    p.add_argument("--experts", default=None, help="n_routed_experts (default: bench_train's)")
    p.add_argument("--top-k", default=None, help="num_experts_per_tok (default: bench_train's)")
    p.add_argument("--shared", default=None, help="n_shared_experts (default: bench_train's)")
    p.add_argument("--q-lora", default=None, help="q_lora_rank, 0 for a full-rank query (default: bench_train's)")
    p.add_argument("--optimizer", choices=("CpuAdamW", "AdamW"), default="CpuAdamW",
                   help="our optimizer, as bench_train.py's --optimizer")
    p.add_argument("--top", type=int, default=6, help="operators listed per class and framework")
    p.add_argument("--verbose", action="store_true", help="show the workers' own output")
    p.add_argument("--worker", choices=("ours", "ref"), help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def classify(op: str) -> str:
    for name, pattern in PATTERNS:
        if pattern.match(op):
            return name
    return "other"


def train_args(a):
    """bench_train's arguments for this run (its defaults, the MoE shape given here)."""
    argv = ["--warmup", str(a.warmup), "--steps", str(a.steps), "--optimizer", a.optimizer]
    for flag, value in (("--experts", a.experts), ("--top-k", a.top_k), ("--shared", a.shared),
                        ("--q-lora", a.q_lora)):
        argv += [flag, value] if value is not None else []
    return T.parse_args(argv)


def summarise(calls, wall_ms, warm_ms, steps) -> dict:
    """calls: [(class, op, ms)] of all profiled steps -> per-step figures."""
    by_class = collections.defaultdict(lambda: [0.0, 0])
    by_op = collections.defaultdict(lambda: [0.0, 0])
    for cls, op, ms in calls:
        by_class[cls][0] += ms / steps
        by_class[cls][1] += 1 / steps
        by_op[(cls, op)][0] += ms / steps
        by_op[(cls, op)][1] += 1 / steps
    return dict(classes={k: tuple(v) for k, v in by_class.items()},
                ops=[(k[0], k[1], v[0], v[1]) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1][0])],
                wall=wall_ms, plain=C.median(warm_ms))


# ---------------------------------------------------------------------------------------------- workers
def worker_ours(a) -> dict:
    """profile_steps' training worker (bench_train's worker_ours under MindSpore's profiler), every launch classed."""
    r = P.worker_train(a, a.out_dir, train_args(a))
    events = P.read_events(os.path.join(a.out_dir, "train"))
    calls = []
    for w0, w1 in r["windows"]:
        for name, kind, start, ms, _ in events:
            if w0 <= start < w1:
                calls.append((OPTIMIZER if "optimizer" in name else classify(kind), kind, ms))
    wall = sum(w1 - w0 for w0, w1 in r["windows"]) / 1e6 / len(r["windows"])
    return dict(summarise(calls, wall, r["warm_ms"], len(r["windows"])), framework=r["framework"],
                config=r["config"], loss=r["loss"])


def worker_ref(a) -> dict:
    """bench_train's worker_ref (transformers' model, loss.backward(), torch.optim.AdamW) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    t = train_args(a)
    t.weights = os.path.join(a.out_dir, "reference.npz")
    box = {}

    def loop(step, warmup, steps):                   # replaces common.run_train_steps inside worker_ref
        box["warm_ms"] = [C.timed(step) * 1000 for _ in range(warmup)]
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                box["loss"] = step()
        box["wall"] = (time.perf_counter() - start) * 1000 / steps
        box["events"] = prof.events()
        return dict(first_step_s=0.0, step_s=0.0, first_loss=0.0, last_loss=0.0, peak_run=0, rss_steady=0,
                    peak_step=0)

    saved, C.run_train_steps = C.run_train_steps, loop
    try:
        info = T.worker_ref(t)
    finally:
        C.run_train_steps = saved
    calls = []
    for event in box["events"]:
        if not event.name.startswith("aten::") or event.self_cpu_time_total <= 0:
            continue                                 # record_function ranges, autograd nodes: their ops count
        parent, in_optimizer = event.cpu_parent, False
        while parent is not None and not in_optimizer:
            in_optimizer = parent.name.startswith("Optimizer.step")
            parent = parent.cpu_parent
        name = event.name[len("aten::"):]
        calls.append((OPTIMIZER if in_optimizer else classify(name), name, event.self_cpu_time_total / 1000))
    return dict(summarise(calls, box["wall"], box["warm_ms"], t.steps), framework=info["framework"],
                config=T.model_fields(t), loss=box["loss"])


# ---------------------------------------------------------------------------------------------- report
def report(a, ours: dict, ref: dict) -> str:
    names = [n for n, _ in CLASSES] + ["other", OPTIMIZER]
    rows, total = [], [0.0, 0.0, 0.0, 0.0]
    for name in names:
        (om, oc), (rm, rc) = ours["classes"].get(name, (0.0, 0)), ref["classes"].get(name, (0.0, 0))
        if om or rm:
            rows.append([name, f"{om:.1f}", f"{oc:.0f}", f"{rm:.1f}", f"{rc:.0f}", C.ratio(om, rm),
                         f"{om - rm:+.1f}"])
        total = [total[0] + om, total[1] + oc, total[2] + rm, total[3] + rc]
    gaps = [ours["wall"] - total[0], ref["wall"] - total[2]]
    rows += [["**all kernels / operators**", f"{total[0]:.1f}", f"{total[1]:.0f}", f"{total[2]:.1f}",
              f"{total[3]:.0f}", C.ratio(total[0], total[2]), f"{total[0] - total[2]:+.1f}"],
             ["between kernels (runtime; Python, autograd, dispatch)", f"{gaps[0]:.1f}", "", f"{gaps[1]:.1f}", "",
              C.ratio(gaps[0], gaps[1]), f"{gaps[0] - gaps[1]:+.1f}"],
             ["**wall per step, profiled**", f"{ours['wall']:.1f}", "", f"{ref['wall']:.1f}", "",
              C.ratio(ours["wall"], ref["wall"]), f"{ours['wall'] - ref['wall']:+.1f}"],
             ["wall per step, not profiled (median of the warm-up)", f"{ours['plain']:.1f}", "",
              f"{ref['plain']:.1f}", "", C.ratio(ours["plain"], ref["plain"]), ""]]
    lines = [f"machine: {C.machine_line()}", "", f"config: {ours['config']}",
             f"ours: {ours['framework']}; reference: {ref['framework']}; {a.steps} profiled steps each, after "
             f"{a.warmup} unprofiled; loss at the last step: ours {ours['loss']:.5f}, reference {ref['loss']:.5f}", "",
             "## One training step by kind of work, ms per step", "",
             C.table(["class", "ours ms", "ours calls", "reference ms", "reference calls", "ours / reference",
                      "difference ms"], rows), "",
             "## The costliest operators of each class (ms per step, calls per step)", ""]
    for name in names:
        for label, r in (("ours", ours), ("reference", ref)):
            top = [f"{op} {ms:.1f} ({calls:.0f})" for cls, op, ms, calls in r["ops"] if cls == name][:a.top]
            if top:
                lines.append(f"- {name}, {label}: " + ", ".join(top))
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        C.write_result((worker_ours if a.worker == "ours" else worker_ref)(a))
        return
    load_start = C.load_average()
    out_dir = tempfile.mkdtemp(prefix="ds2_compare_")
    passthrough = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--verbose"]
    try:
        ref = C.run_worker(SCRIPT, passthrough + ["--worker", "ref", "--out-dir", out_dir],
                           "reference step under torch.profiler", a.verbose)
        ours = C.run_worker(SCRIPT, passthrough + ["--worker", "ours", "--out-dir", out_dir],
                            "our step under MindSpore's profiler", a.verbose)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    print(report(a, ours, ref) + "\n\n" + C.load_line(load_start))


if __name__ == "__main__":
    main()
