"""LoRA against full finetuning on CPU: one train step of the same small DeepSeek-V2, same weights, same batch.

Each variant runs in its own worker process (MindSpore GRAPH_MODE, nn.TrainOneStepCell, MindFormers' AdamW over
``trainable_params()``), so the peak memory of one belongs to it alone:
  full          every weight trained;
  lora          research/deepseek2/lora/ adapters (default targets: MLA projections, dense FFN, shared experts),
                base frozen;
  lora+routed   the same plus one low-rank pair per routed expert (target_routed_experts).
Reported: trainable parameters and their share, optimizer state tensors, the loss of the first and of the last step
(the same batch every step: how fast each variant fits it), the median step time, and memory: RSS after the build,
peak RSS of the run (VmHWM), and that peak minus the RSS after the build (optimizer states, gradients, activations,
MindSpore's memory pool).

Run from the repo root:  python bench/bench_lora.py            (about 3-5 minutes on 2 idle cores)
                         python bench/bench_lora.py --help
"""
import argparse
import os
import sys

import common as C  # bench/common.py, beside this script; sets the environment before any framework import

SCRIPT = os.path.abspath(__file__)
VARIANTS = ("full", "lora", "lora+routed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (released config.json names; bench_train.py's defaults)")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--intermediate", type=int, default=512)
    g.add_argument("--moe-intermediate", type=int, default=128)
    g.add_argument("--experts", type=int, default=16)
    g.add_argument("--top-k", type=int, default=4)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--q-lora", type=int, default=128)
    g.add_argument("--kv-lora", type=int, default=64)
    g.add_argument("--vocab", type=int, default=4096)
    g.add_argument("--seq", type=int, default=512)
    g.add_argument("--batch", type=int, default=2)
    r = p.add_argument_group("run")
    r.add_argument("--rank", type=int, default=8, help="lora_rank")
    r.add_argument("--alpha", type=float, default=16, help="lora_alpha")
    r.add_argument("--dropout", type=float, default=0.05, help="lora_dropout")
    r.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (every variant)")
    r.add_argument("--warmup", type=int, default=2, help="untimed steps (the first one compiles)")
    r.add_argument("--steps", type=int, default=6, help="timed steps")
    r.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--verbose", action="store_true", help="show the workers' own output")
    r.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_fields(a) -> dict:
    return dict(C.COMMON_FIELDS, vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                moe_intermediate_size=a.moe_intermediate, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                n_shared_experts=1, n_routed_experts=a.experts, num_experts_per_tok=a.top_k, kv_lora_rank=a.kv_lora,
                q_lora_rank=a.q_lora or None, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                max_position_embeddings=max(a.seq, 2048))


def pet_config(a, variant: str) -> dict:
    return {"pet_type": "lora", "lora_rank": a.rank, "lora_alpha": a.alpha, "lora_dropout": a.dropout,
            "target_routed_experts": variant == "lora+routed"}


def worker(a) -> dict:
    import numpy as np
    import mindspore as ms
    from mindspore import nn, Tensor
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(a.seed)
    from mindformers.core.optim import AdamW
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    from research.deepseek2.lora import cells as lora
    C.silence_mindformers()
    rss_import = C.rss_bytes()
    net = DeepseekV2ForCausalLM(DeepseekV2Config(**model_fields(a), seq_length=a.seq, batch_size=a.batch,
                                                 init_std=0.02))
    if a.worker != "full":
        lora.apply_lora(net, pet_config(a, a.worker))
    net.set_train(True)
    rss_build = C.rss_bytes()
    C.reset_peak_rss()
    params = net.trainable_params()
    opt = AdamW(params, learning_rate=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    cell = nn.TrainOneStepCell(net, opt)
    cell.set_train(True)
    ids = Tensor(np.random.RandomState(a.seed + 1).randint(2, a.vocab, (a.batch, a.seq + 1)).astype(np.int32))
    result = C.run_train_steps(lambda: float(cell(ids).asnumpy()), a.warmup, a.steps)
    size = lambda ps: int(sum(int(np.prod(p.shape)) for p in ps))     # noqa: E731
    return dict(result, rss_import=rss_import, rss_build=rss_build, trainable=size(params),
                total=size(net.get_parameters()), optimizer_state=size(list(opt.exp_avg) + list(opt.exp_avg_sq)))


def table(a, results: dict) -> str:
    rows = []
    for name, r in results.items():
        rows.append([name, f"{r['trainable']:,}", f"{100 * r['trainable'] / r['total']:.2f}%", f"{r['optimizer_state']:,}",
                     f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}", f"{r['step_s'] * 1000:.0f}",
                     f"{r['first_step_s']:.1f}", C.mib(r["rss_build"]), C.mib(r["peak_run"]),
                     C.mib(r["peak_run"] - r["rss_build"])])
    headers = ["variant", "trainable params", "share", "AdamW moments (elements)", "loss step 1",
               f"loss step {a.warmup + a.steps}", "step ms (median)", "first step s", "RSS after build MiB",
               "peak MiB (abs)", "peak - build MiB"]
    return C.table(headers, rows)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        C.write_result(worker(a))
        return 0
    start = C.load_average()
    forwarded = [arg for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--verbose"]
    results = {}
    for variant in [v for v in a.variants.split(",") if v]:
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown {variant!r}, expected some of {VARIANTS}")
        results[variant] = C.run_worker(SCRIPT, forwarded + ["--worker", variant], variant, a.verbose)
    print(C.machine_line())
    print(f"config: {model_fields(a)}")
    print(f"batch {a.batch} x seq {a.seq}; fp32; MindFormers AdamW lr {a.lr} over trainable_params(); the same batch "
          f"every step; LoRA rank {a.rank}, alpha {a.alpha:g}, dropout {a.dropout:g}\n")
    print(table(a, results))
    print()
    print(C.load_line(start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
