"""Training benchmark: this DeepSeek-V2 (MindSpore graph mode) against transformers' DeepseekV2ForCausalLM (PyTorch).

Part 1, one train step of the whole model (forward, backward, AdamW update, fp32, CPU), same config, same weights
(the reference's, mapped through research/deepseek2/checkpoints/weight_map.py): tokens/second (median of --steps
timed steps after --warmup steps; the first step, which holds MindSpore's graph compilation, is reported on its own)
and peak resident memory. Each framework runs in its own process, one after the other:
  peak (abs)        VmHWM of the process after the model was built (imports included),
  delta (run)       that peak minus the RSS right after the build (optimizer state, compilation, activations,
                    gradients, allocator pools),
  delta (step)      the same for the timed steps only (VmHWM reset after warm-up). MindSpore keeps its memory
                    pool between steps, so for ours both deltas are the pool size.
Ours: nn.TrainOneStepCell (or --wrapper deepseek) with the package's CpuAdamW (--optimizer AdamW: MindFormers'
AdamW), both bias-corrected like torch.optim.AdamW: the loss of the first and of the last step must agree between
the two columns.
Part 2, the routed experts alone (router + experts, forward + backward, no shared expert) at several top_k and
expert counts. The dropless block dispatch computes about tokens x top_k rows (column "expert rows computed"),
whatever the number of experts; the time column shows what that costs on this CPU. With few tokens
(``--moe-tokens 1``: a decode step's worth) the per-assignment dispatch runs instead (column "per assignment"). The reference's MoE loops over
its experts in Python with data-dependent shapes (same table).

Run from the repo root:  python bench/bench_train.py            (about 1-2 minutes on 2 idle cores)
                         python bench/bench_train.py --help     (config and step flags)
"""
import argparse
import json
import os
import sys
import tempfile

import common as C  # bench/common.py, beside this script; sets the environment before any framework import

SCRIPT = os.path.abspath(__file__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (released config.json names)")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--intermediate", type=int, default=512, help="dense FFN width (first layer)")
    g.add_argument("--moe-intermediate", type=int, default=128)
    g.add_argument("--experts", type=int, default=16, help="n_routed_experts")
    g.add_argument("--top-k", type=int, default=4, help="num_experts_per_tok")
    g.add_argument("--shared", type=int, default=1, help="n_shared_experts")
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--q-lora", type=int, default=128)
    g.add_argument("--kv-lora", type=int, default=64)
    g.add_argument("--rope", type=int, default=16, help="qk_rope_head_dim")
    g.add_argument("--nope", type=int, default=32, help="qk_nope_head_dim")
    g.add_argument("--v", type=int, default=32, help="v_head_dim")
    g.add_argument("--vocab", type=int, default=4096)
    g.add_argument("--seq", type=int, default=512)
    g.add_argument("--batch", type=int, default=2)
    r = p.add_argument_group("run")
    r.add_argument("--warmup", type=int, default=3, help="untimed steps (the first one compiles)")
    r.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    r.add_argument("--wrapper", choices=("plain", "deepseek"), default="plain",
                   help="plain: nn.TrainOneStepCell vs loss.backward()+step; deepseek: DeepseekV2TrainOneStepCell "
                        "(global-norm clipping 1.0, finite check) vs the same plus clip_grad_norm_")
    r.add_argument("--moe-tokens", type=int, default=None, help="tokens in the MoE table (default batch*seq)")
    r.add_argument("--moe-topk", default="2,4,8", help="top_k values at --experts experts")
    r.add_argument("--moe-experts", default="16,32,64,128", help="expert counts at --top-k")
    r.add_argument("--moe-steps", type=int, default=10)
    r.add_argument("--moe-block-size", type=int, default=None,
                   help="force moe_block_size (rows per expert block) in the MoE table; default: the model's plan")
    r.add_argument("--moe-dispatch", choices=("dropless", "capacity"), default="dropless",
                   help="moe_dispatch of our model and MoE table (capacity: the expert-parallel layout)")
    r.add_argument("--expert-capacity-factor", type=float, default=0.0,
                   help="expert_capacity_factor with --moe-dispatch capacity (0: buffers of every token, no drops)")
    r.add_argument("--attention-chunk", type=int, default=None,
                   help="our attention_chunk_size (query rows per attention block; default: the config's)")
    r.add_argument("--optimizer", choices=("CpuAdamW", "AdamW"), default="CpuAdamW",
                   help="our optimizer: the package's CpuAdamW (the CPU YAMLs' type; one AdamWeightDecay kernel per "
                        "weight) or MindFormers' AdamW (the Ascend YAMLs'); both follow torch.optim.AdamW")
    r.add_argument("--recompute", action="store_true",
                   help="recompute every decoder layer in the backward (what recompute_config: {recompute: True} "
                        "does through MindFormers' LayerSetting): memory for time")
    r.add_argument("--memory-optimize", choices=("O0", "O1"), default=None,
                   help="MindSpore's memory_optimize_level for our graph (default: MindSpore's, O0)")
    r.add_argument("--skip-model", action="store_true", help="only the MoE table")
    r.add_argument("--skip-moe", action="store_true", help="only the whole-model table")
    r.add_argument("--skip-ref-moe", action="store_true", help="MoE table without the reference")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--verbose", action="store_true", help="show the workers' own output")
    r.add_argument("--worker", choices=("ours", "ref", "moe-ours", "moe-ref"), help=argparse.SUPPRESS)
    r.add_argument("--weights", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_fields(a) -> dict:
    return dict(C.COMMON_FIELDS, vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                moe_intermediate_size=a.moe_intermediate, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                n_shared_experts=a.shared or None, n_routed_experts=a.experts, num_experts_per_tok=a.top_k,
                kv_lora_rank=a.kv_lora, q_lora_rank=a.q_lora or None, qk_rope_head_dim=a.rope,
                qk_nope_head_dim=a.nope, v_head_dim=a.v, max_position_embeddings=max(a.seq, 2048))


def batch_ids(a):
    """(batch, seq + 1) token ids; never the pad id, so both losses keep every position."""
    import numpy as np
    return np.random.RandomState(a.seed + 1).randint(2, a.vocab, (a.batch, a.seq + 1)).astype(np.int64)


# ---------------------------------------------------------------------------------------------- whole model
def worker_ref(a) -> dict:
    """transformers' model: loss.backward() + AdamW.step() in eager PyTorch."""
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    rss_import = C.rss_bytes()
    model = C.build_reference(model_fields(a), a.seed)
    C.save_reference_weights(model, a.weights)
    model.train()
    rss_build = C.rss_bytes()
    C.reset_peak_rss()
    ids = torch.tensor(batch_ids(a))
    tokens, targets = ids[:, :-1], ids[:, 1:].reshape(-1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens, use_cache=False).logits                  # (b, s, vocab)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)
        loss.backward()
        if a.wrapper == "deepseek":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    return dict(C.run_train_steps(step, a.warmup, a.steps),
                framework=f"transformers {transformers.__version__} / torch {torch.__version__} (eager)",
                rss_import=rss_import, rss_build=rss_build,
                params=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads())


def worker_ours(a) -> dict:
    """This model in MindSpore GRAPH_MODE: nn.TrainOneStepCell (or the package's wrapper) with the package's CpuAdamW
    (``--optimizer AdamW``: MindFormers' AdamW)."""
    import numpy as np
    import mindspore as ms
    from mindspore import nn, Tensor
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    if a.memory_optimize:
        ms.set_context(memory_optimize_level=a.memory_optimize)
    from mindformers.core.optim import AdamW
    from research.deepseek2 import CpuAdamW, DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV2TrainOneStepCell
    C.silence_mindformers()
    rss_import = C.rss_bytes()
    chunk = {} if a.attention_chunk is None else {"attention_chunk_size": a.attention_chunk}
    cfg = DeepseekV2Config(**model_fields(a), seq_length=a.seq, batch_size=a.batch, moe_dispatch=a.moe_dispatch,
                           expert_capacity_factor=a.expert_capacity_factor, **chunk)
    net = DeepseekV2ForCausalLM(cfg)
    C.load_weights_into_ms(net, a.weights, a.experts)
    if a.recompute:
        for layer in net.model.layers:
            layer.recompute()
    net.set_train(True)
    rss_build = C.rss_bytes()
    C.reset_peak_rss()
    params = net.trainable_params()
    # bias-corrected like torch.optim.AdamW, so both runs follow the same trajectory (nn.AdamWeightDecay has no bias
    # correction and would not): the CPU YAMLs' CpuAdamW or MindFormers' AdamW
    opt = (CpuAdamW if a.optimizer == "CpuAdamW" else AdamW)(params, learning_rate=1e-3, betas=(0.9, 0.999),
                                                             eps=1e-8, weight_decay=0.01)
    if a.wrapper == "deepseek":
        cell = DeepseekV2TrainOneStepCell(net, opt, use_clip_grad=True, max_grad_norm=1.0)
    else:
        cell = nn.TrainOneStepCell(net, opt)
    cell.set_train(True)
    ids = Tensor(batch_ids(a).astype(np.int32))

    def step():
        out = cell(ids)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return float(loss.asnumpy())                                               # blocks until the step ends

    return dict(C.run_train_steps(step, a.warmup, a.steps),                        # the first step compiles
                framework=f"MindSpore {ms.__version__} graph mode, {a.optimizer}"
                          + (", every layer recomputed" if a.recompute else "")
                          + (f", memory_optimize_level {a.memory_optimize}" if a.memory_optimize else ""),
                rss_import=rss_import, rss_build=rss_build,
                params=int(sum(int(np.prod(p.shape)) for p in params)))


def model_table(a, ours: dict, ref: dict) -> str:
    tokens = a.batch * a.seq
    rows = []
    for name, r in (("ours", ours), ("reference", ref)):
        rows.append([name, f"{tokens / r['step_s']:.0f}", f"{r['step_s'] * 1000:.0f}", f"{r['first_step_s']:.1f}",
                     C.mib(r["rss_build"]), C.mib(r["peak_run"]), C.mib(r["peak_run"] - r["rss_build"]),
                     C.mib(r["peak_step"] - r["rss_build"]), f"{r['first_loss']:.5f}",
                     f"{r['last_loss']:.5f}"])
    rows.append(["ours / reference", C.ratio(tokens / ours["step_s"], tokens / ref["step_s"]),
                 C.ratio(ours["step_s"], ref["step_s"]), "-", C.ratio(ours["rss_build"], ref["rss_build"]),
                 C.ratio(ours["peak_run"], ref["peak_run"]),
                 C.ratio(ours["peak_run"] - ours["rss_build"], ref["peak_run"] - ref["rss_build"]),
                 C.ratio(ours["peak_step"] - ours["rss_build"], ref["peak_step"] - ref["rss_build"]), "-", "-"])
    headers = ["", "tokens/s", "step ms (median)", "first step s", "RSS after build MiB", "peak MiB (abs)",
               "delta run MiB", "delta step MiB", "loss step 1", f"loss step {a.warmup + a.steps}"]
    return C.table(headers, rows)


# ---------------------------------------------------------------------------------------------- MoE alone
def moe_cases(a):
    cases = [(a.experts, int(k)) for k in a.moe_topk.split(",") if k]
    cases += [(int(e), a.top_k) for e in a.moe_experts.split(",") if e]
    seen, out = set(), []
    for case in cases:
        if case not in seen:
            seen.add(case)
            out.append(case)
    return out


def moe_weights(a, experts: int):
    """Router (E, h), w1/w3 (E, i, h), w2 (E, h, i) and the input x (1, T, h), numpy float32, seeded."""
    import numpy as np
    rng = np.random.RandomState(a.seed + experts)
    h, i = a.hidden, a.moe_intermediate
    tokens = a.moe_tokens or a.batch * a.seq
    f32 = np.float32
    return dict(router=(rng.randn(experts, h) / np.sqrt(h)).astype(f32),
                w1=(rng.randn(experts, i, h) / np.sqrt(h)).astype(f32),
                w3=(rng.randn(experts, i, h) / np.sqrt(h)).astype(f32),
                w2=(rng.randn(experts, h, i) / np.sqrt(i)).astype(f32),
                x=rng.randn(1, tokens, h).astype(f32))


def worker_moe_ours(a) -> dict:
    """DeepSeekMoE (routed experts only) forward + backward (input and weight gradients) in GRAPH_MODE."""
    import time
    import mindspore as ms
    from mindspore import nn, ops, Tensor, ParameterTuple
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from research.deepseek2 import DeepseekV2Config
    from research.deepseek2.moe import DeepSeekMoE
    C.silence_mindformers()

    class Objective(nn.Cell):
        def __init__(self, moe):
            super().__init__()
            self.moe = moe

        def construct(self, x):
            out, _ = self.moe(x)
            return ops.reduce_mean(ops.square(out))

    class FwdBwd(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.weights = ParameterTuple(net.trainable_params())
            self.grad = ops.GradOperation(get_all=True, get_by_list=True)

        def construct(self, x):
            return self.grad(self.net, self.weights)(x)

    results = []
    for experts, k in moe_cases(a):
        w = moe_weights(a, experts)
        cfg = DeepseekV2Config(**dict(C.COMMON_FIELDS, hidden_size=a.hidden, moe_intermediate_size=a.moe_intermediate,
                                      n_routed_experts=experts, num_experts_per_tok=k, n_shared_experts=None,
                                      num_hidden_layers=1, first_k_dense_replace=0),
                               moe_block_size=a.moe_block_size, moe_dispatch=a.moe_dispatch,
                               expert_capacity_factor=a.expert_capacity_factor)
        moe = DeepSeekMoE(cfg)
        moe.router.weight.set_data(Tensor(w["router"]))
        for name in ("w1", "w3", "w2"):
            getattr(moe.routed_experts, name).set_data(Tensor(w[name]))
        cell = FwdBwd(Objective(moe))
        cell.set_train(True)
        x = Tensor(w["x"])
        start = time.perf_counter()
        cell(x)[0][0].asnumpy()
        first = time.perf_counter() - start
        times = []
        for _ in range(a.moe_steps + 1):
            start = time.perf_counter()
            cell(x)[0][0].asnumpy()
            times.append(time.perf_counter() - start)
        n = w["x"].shape[1] * k
        block, blocks = moe.routed_experts.plan(n)
        unit = "B"
        if a.moe_dispatch == "capacity":                  # E buffers of C rows; "block" = C
            block, blocks, unit = moe.routed_experts.capacity(w["x"].shape[1]), experts, "C"
        elif moe.routed_experts.gathers_per_assignment(n):  # few tokens: one row per assignment, weights gathered
            block, blocks, unit = 1, n, "per assignment, B"
        results.append(dict(experts=experts, top_k=k, tokens=w["x"].shape[1], first_s=first,
                            step_s=C.median(times[1:]), rows=block * blocks, block=block, unit=unit))
    return dict(cases=results)


def worker_moe_ref(a) -> dict:
    """transformers' DeepseekV2MoE gate + moe() (its routed path: a Python loop over experts) forward + backward."""
    import time
    import torch
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MoE
    torch.set_num_threads(os.cpu_count())
    results = []
    for experts, k in moe_cases(a):
        w = moe_weights(a, experts)
        cfg = C.hf_config(dict(C.COMMON_FIELDS, hidden_size=a.hidden, moe_intermediate_size=a.moe_intermediate,
                               n_routed_experts=experts, num_experts_per_tok=k, n_shared_experts=1,
                               num_hidden_layers=1, first_k_dense_replace=0, vocab_size=16))
        moe = DeepseekV2MoE(cfg)
        with torch.no_grad():
            moe.gate.weight.copy_(torch.from_numpy(w["router"]))
            for e, expert in enumerate(moe.experts):
                expert.gate_proj.weight.copy_(torch.from_numpy(w["w1"][e]))
                expert.up_proj.weight.copy_(torch.from_numpy(w["w3"][e]))
                expert.down_proj.weight.copy_(torch.from_numpy(w["w2"][e]))
        moe.train()
        x0 = torch.from_numpy(w["x"])

        def step():
            x = x0.clone().requires_grad_(True)
            moe.zero_grad(set_to_none=True)
            idx, weight = moe.gate(x)
            out = moe.moe(x.view(-1, x.shape[-1]), idx, weight)                       # routed experts only
            out.square().mean().backward()

        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        times = []
        for _ in range(a.moe_steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        results.append(dict(experts=experts, top_k=k, tokens=w["x"].shape[1], first_s=first,
                            step_s=C.median(times)))
    return dict(cases=results)


def moe_table(ours: dict, ref) -> str:
    ref_cases = {(c["experts"], c["top_k"]): c for c in ref["cases"]} if ref else {}
    base = ours["cases"][0]
    rows = []
    for c in ours["cases"]:
        r = ref_cases.get((c["experts"], c["top_k"]))
        rows.append([c["experts"], c["top_k"], c["tokens"] * c["top_k"], f"{c['rows']} ({c.get('unit', 'B')}={c['block']})",
                     f"{c['step_s'] * 1000:.1f}", f"{c['step_s'] / base['step_s']:.2f}",
                     f"{r['step_s'] * 1000:.1f}" if r else "-", C.ratio(c["step_s"], r["step_s"] if r else None)])
    headers = ["experts E", "top_k", "assignments T*k", "expert rows computed (ours)", "ours ms",
               "ours vs first row", "reference ms", "ours / reference (time)"]
    return C.table(headers, rows)


# ---------------------------------------------------------------------------------------------- driver
def main(argv=None):
    a = parse_args(argv)
    load_start = C.load_average()
    workers = {"ours": worker_ours, "ref": worker_ref, "moe-ours": worker_moe_ours, "moe-ref": worker_moe_ref}
    if a.worker:
        C.write_result(workers[a.worker](a))
        return
    passthrough = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--verbose"]
    out = [f"machine: {C.machine_line()}",
           f"config: {json.dumps(model_fields(a), sort_keys=True)}",
           f"batch {a.batch} x seq {a.seq} = {a.batch * a.seq} tokens per step; fp32; AdamW; "
           f"warm-up {a.warmup} (first step reported alone), median of {a.steps} steps; wrapper {a.wrapper}; "
           f"our attention_chunk_size {'config default' if a.attention_chunk is None else a.attention_chunk}", ""]
    if not a.skip_model:
        with tempfile.TemporaryDirectory(prefix="ds2_bench_w_") as tmp:
            weights = os.path.join(tmp, "reference.npz")
            ref = C.run_worker(SCRIPT, passthrough + ["--worker", "ref", "--weights", weights],
                               "reference train steps (PyTorch)", a.verbose)
            ours = C.run_worker(SCRIPT, passthrough + ["--worker", "ours", "--weights", weights],
                                "our train steps (MindSpore graph mode)", a.verbose)
        out += ["## One train step (forward + backward + AdamW)", "", model_table(a, ours, ref), "",
                f"ours: {ours['framework']}, {ours['params']} parameters; "
                f"reference: {ref['framework']}, {ref['params']} parameters, {ref['threads']} threads",
                f"step times ours {[round(t, 3) for t in ours['times']]}, "
                f"reference {[round(t, 3) for t in ref['times']]}", ""]
    if not a.skip_moe:
        moe_ours = C.run_worker(SCRIPT, passthrough + ["--worker", "moe-ours"], "MoE layer (MindSpore)", a.verbose)
        moe_ref = None if a.skip_ref_moe else C.run_worker(SCRIPT, passthrough + ["--worker", "moe-ref"],
                                                           "MoE layer (PyTorch)", a.verbose)
        tokens = a.moe_tokens or a.batch * a.seq
        out += [f"## Routed experts alone: router + experts, forward + backward, {tokens} tokens, hidden {a.hidden}, "
                f"moe_intermediate {a.moe_intermediate} (median of {a.moe_steps})", "", moe_table(moe_ours, moe_ref),
                ""]
    out.append(C.load_line(load_start))
    print("\n".join(out))


if __name__ == "__main__":
    main()
