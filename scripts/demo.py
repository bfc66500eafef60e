"""The main job, end to end on CPU, every stage through the project's own commands:

1. hold out the last records of the bundled code_alpaca sample (never trained on) and train a small byte-level BPE
   tokenizer on the others;
2. make a tiny DeepSeek-V2 with the PyTorch reference (transformers), saved as a Hugging Face folder: that folder is
   the checkpoint of every later step, as MindFormers 1.9 loads one (no conversion step);
3. prepare both splits as MindRecord (code_alpaca_preprocess.py);
4. before finetuning: the held-out loss of the initial checkpoint (evaluation/heldout.py) and its answer to one instruction
   (run_mindformer.py --run_mode predict: latent KV cache, chat template, greedy with a repetition penalty);
5. finetune it through run_mindformer.py (MindFormers' Trainer, graph mode) and show the loss falling;
6. after finetuning: the held-out loss and the answer again;
7. a loss curve (output/loss_curve.png: training loss per step, its moving average, held-out loss before and after)
   and a summary of what changed.

    python scripts/demo.py [--work_dir work_dirs/demo] [--epochs 2] [--stop_step N] [--seq_length 256]
                           [--heldout 100]

--stop_step N ends the finetune after N steps (MindFormers' runner_config.stop_step; the checkpoint is saved there):
the whole job in a couple of minutes, with the files every later command needs.
"""
import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "deepseek2", "finetune_deepseek2_tiny.yaml")
PREDICT_YAML = os.path.join(ROOT, "configs", "deepseek2", "predict_deepseek2_tiny.yaml")
DATA = os.path.join(ROOT, "data", "code_alpaca", "code_alpaca_2k.json")
INSTRUCTION = "Write a Python function to calculate the factorial of a given number."
LOSS_LINE = re.compile(r"step:\[\s*(\d+)/\s*(\d+)\], loss:\[([0-9.eE+-]+)/")
EVAL_LINE = re.compile(r"^evaluate: loss ([0-9.eE+-]+) perplexity \S+ over (\d+) target tokens in (\d+) rows", re.M)
PROGRESS = re.compile(r"^\s*[^|]{0,40}:\s*\d+%\|")     # a tqdm refresh (each \r update arrives as a line)


def banner(text):
    print(f"\n=== {text} ===", flush=True)


def run(cmd, env, filter_loss=False):
    """Run a project command; with filter_loss only every 25th loss line is echoed, and of a progress bar only its
    finished state. Returns its output."""
    print("$ " + " ".join(cmd if len(" ".join(cmd)) < 400 else cmd[:6] + ["..."]), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, finished_bar = [], None
    for line in proc.stdout:
        lines.append(line)
        if filter_loss:
            match = LOSS_LINE.search(line)
            if match and (int(match.group(1)) % 25 == 0 or match.group(1) in ("1", match.group(2))):
                print(f"  step {match.group(1):>4}/{match.group(2)}  loss {float(match.group(3)):.4f}", flush=True)
            elif "Error" in line or "error:" in line:
                print("  " + line.rstrip(), flush=True)
        elif PROGRESS.match(line):
            bar = line.split(":")[0].strip()
            if "100%|" in line and bar != finished_bar:             # tqdm draws its last state twice
                print("  " + line.rstrip(), flush=True)
                finished_bar = bar
        elif line.strip() and "WARNING" not in line and "[WARNING]" not in line:
            print("  " + line.rstrip(), flush=True)
            finished_bar = None
    if proc.wait() != 0:
        tail = "".join(lines[-40:])
        raise SystemExit(f"demo: command failed (exit {proc.returncode}):\n{tail}")
    return "".join(lines)


def make_tiny_reference(hf_dir, vocab_size):
    """A tiny DeepSeek-V2 (V2 layout) made with transformers, saved as a Hugging Face checkpoint."""
    import yaml
    import torch
    from transformers import DeepseekV2Config as HFConfig, DeepseekV2ForCausalLM as HFModel
    with open(TINY_YAML, encoding="utf-8") as handle:
        fields = dict(yaml.safe_load(handle)["model"]["model_config"])
    knobs = ("type", "seq_length", "batch_size", "use_past", "compute_dtype", "param_init_type",
             "softmax_compute_type", "device_aux_loss_alpha", "comm_aux_loss_alpha", "moe_num_devices",
             "capacity_factor")
    hf_fields = {k: v for k, v in fields.items() if k not in knobs}
    hf_fields["vocab_size"] = vocab_size
    torch.manual_seed(0)
    model = HFModel(HFConfig(**hf_fields))
    model.save_pretrained(hf_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def split_records(path, heldout, work):
    """The last `heldout` records of `path` -> work/code_alpaca_heldout.json, the others -> .../code_alpaca_train.json;
    returns (train path, held-out path, number of training records)."""
    with open(path, encoding="utf-8") as handle:
        records = json.load(handle)
    if not 0 < heldout < len(records):
        raise SystemExit(f"demo: --heldout must be between 1 and {len(records) - 1}, got {heldout}")
    paths = {}
    for name, part in (("train", records[:-heldout]), ("heldout", records[-heldout:])):
        paths[name] = os.path.join(work, f"code_alpaca_{name}.json")
        with open(paths[name], "w", encoding="utf-8") as handle:
            json.dump(part, handle, ensure_ascii=False, indent=1)
    return paths["train"], paths["heldout"], len(records) - heldout


def evaluate(py, checkpoint, data, env):
    """evaluation/heldout.py on one checkpoint -> (mean held-out loss per target token, target tokens, rows)."""
    log = run([py, "research/deepseek2/evaluation/heldout.py", "--config", TINY_YAML, "--load_checkpoint", checkpoint,
               "--eval_data", data, "--batch_size", "8"], env)
    match = EVAL_LINE.search(log)
    if not match:
        raise SystemExit(f"demo: evaluation/heldout.py printed no result line:\n{log[-2000:]}")
    return float(match.group(1)), int(match.group(2)), int(match.group(3))


def predict(py, checkpoint, tokenizer, out, seq_length, env):
    """run_mindformer.py --run_mode predict on INSTRUCTION with `checkpoint`; returns the reply."""
    run([py, "run_mindformer.py", "--config", PREDICT_YAML, "--load_checkpoint", checkpoint,
         "--tokenizer_file", tokenizer, "--output_dir", out, "--predict_data", INSTRUCTION, "--predict_length", "64",
         "--repetition_penalty", "1.2", "--model.model_config.seq_length", str(seq_length)], env)
    with open(os.path.join(out, "text_generation_result.txt"), encoding="utf-8") as handle:
        return json.loads(handle.readline())["output"]


def perplexity(loss):
    return math.exp(min(loss, 700.0))


def plot_losses(path, losses, window, heldout_before, heldout_after):
    """Training loss per step, its moving average over `window` steps, and the held-out loss before/after."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = list(range(1, len(losses) + 1))
    running, smooth = 0.0, []
    for i, value in enumerate(losses):                      # trailing mean of the last `window` steps
        running += value - (losses[i - window] if i >= window else 0.0)
        smooth.append(running / min(i + 1, window))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="training loss (per step)")
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"training loss ({window}-step moving average)")
    ax.scatter([0, len(losses)], [heldout_before, heldout_after], color="tab:red", marker="D", s=50, zorder=3,
               label="held-out loss (before / after finetuning)")
    # labels clear of their markers (a marker of s=50 is about 4 points across each way): beside and below the
    # first, beside and above the last
    for x, y, where, offset, align in ((0, heldout_before, "before", (14, -12), "left"),
                                       (len(losses), heldout_after, "after", (-14, 12), "right")):
        ax.annotate(f"held-out {where}: {y:.2f}", (x, y), textcoords="offset points", xytext=offset,
                    color="tab:red", ha=align, va="top" if where == "before" else "bottom",
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.85))   # readable over a curve
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy per target token (nats)")
    ax.set_title("tiny DeepSeek-V2 finetuned on code_alpaca (CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "work_dirs", "demo"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--stop_step", type=int, default=0, help="stop the finetune after this many steps (0: off)")
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=100, help="last records of the sample held out (default 100)")
    args = parser.parse_args()
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LOCAL_DEFAULT_PATH=os.path.join(work, "logs"), GLOG_v="3")
    started = time.time()
    py = sys.executable
    out = os.path.join(work, "output")

    banner(f"1/7 hold out the last {args.heldout} code_alpaca records; byte-level BPE tokenizer on the others")
    train_json, heldout_json, n_train = split_records(DATA, args.heldout, work)
    print(f"  {n_train} training records -> {train_json}\n  {args.heldout} held-out records (never trained on) -> "
          f"{heldout_json}")
    tokenizer = os.path.join(work, "tokenizer.json")
    run([py, "research/deepseek2/train_tokenizer.py", "--data_path", train_json, "--output_path", tokenizer,
         "--vocab_size", "2048"], env)

    banner("2/7 a tiny DeepSeek-V2 from the PyTorch reference, saved as a Hugging Face folder (the checkpoint)")
    hf_dir = os.path.join(work, "hf_tiny")
    count = make_tiny_reference(hf_dir, 2048)
    print(f"  transformers DeepseekV2ForCausalLM: {count:,} parameters -> {hf_dir} (config.json + model.safetensors;"
          f" loaded as it is below, --load_ckpt_format safetensors)")
    ckpt = hf_dir

    banner("3/7 code_alpaca -> MindRecord, training and held-out splits (prompt masked with -100, reply learned)")
    data, heldout_data = os.path.join(work, "code_alpaca.mindrecord"), os.path.join(work, "heldout.mindrecord")
    for source, target in ((train_json, data), (heldout_json, heldout_data)):
        run([py, "research/deepseek2/code_alpaca_preprocess.py", "--data_path", source, "--tokenizer_file",
             tokenizer, "--output_path", target, "--seq_length", str(args.seq_length)], env)

    banner("4/7 before finetuning: held-out loss and one answer of the initial (random) checkpoint")
    loss_before, tokens, rows = evaluate(py, ckpt, heldout_data, env)
    print(f"  held-out loss {loss_before:.3f} (perplexity {perplexity(loss_before):.1f}) over {tokens} target "
          f"tokens of {rows} records")
    answer_before = predict(py, ckpt, tokenizer, os.path.join(out, "before_finetune"), args.seq_length, env)

    banner("5/7 finetune through run_mindformer.py (MindFormers Trainer, graph mode, CPU)")
    log = run([py, "run_mindformer.py", "--config", TINY_YAML, "--run_mode", "finetune", "--load_checkpoint", ckpt,
               "--load_ckpt_format", "safetensors", "--train_data", data, "--tokenizer_file", tokenizer, "--output_dir", out,
               "--runner_config.epochs", str(args.epochs), "--model.model_config.seq_length", str(args.seq_length)]
              + (["--runner_config.stop_step", str(args.stop_step)] if args.stop_step else []),
              env, filter_loss=True)
    losses = [float(m.group(3)) for m in LOSS_LINE.finditer(log)]
    if not losses:
        raise SystemExit("demo: no loss lines found in the training log")
    window = max(1, len(losses) // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"  {len(losses)} steps; mean loss of the first {window} steps {first:.3f} -> last {window} {last:.3f}")
    checkpoints = sorted(glob.glob(os.path.join(out, "checkpoint", "rank_0", "*.ckpt")), key=os.path.getmtime)
    if not checkpoints:
        raise SystemExit(f"demo: no checkpoint written under {out}/checkpoint/rank_0")

    banner("6/7 after finetuning: held-out loss and the same instruction (DeepSeek-V2-Chat template, latent KV cache)")
    loss_after, _, _ = evaluate(py, checkpoints[-1], heldout_data, env)
    print(f"  held-out loss {loss_after:.3f} (perplexity {perplexity(loss_after):.1f})")
    answer_after = predict(py, checkpoints[-1], tokenizer, out, args.seq_length, env)

    banner("7/7 loss curve")
    png = plot_losses(os.path.join(out, "loss_curve.png"), losses, max(1, len(losses) // 20), loss_before, loss_after)
    print(f"  {png}")

    banner("done")
    print(f"held-out loss ({rows} records never trained on, {tokens} target tokens): {loss_before:.3f} "
          f"(perplexity {perplexity(loss_before):.1f}) -> {loss_after:.3f} (perplexity {perplexity(loss_after):.1f})")
    print(f"training loss: first {window} steps {first:.3f} -> last {window} steps {last:.3f} ({len(losses)} steps)")
    print(f"instruction: {INSTRUCTION}")
    print(f"answer before finetuning (random weights):\n{answer_before}")
    print(f"answer after finetuning:\n{answer_after}")
    print(f"loss curve: {png}")
    print(f"total time: {time.time() - started:.0f} s")
    if not last < first:
        raise SystemExit("demo: the training loss did not fall")
    if not loss_after < loss_before:
        raise SystemExit("demo: the held-out loss did not fall")


if __name__ == "__main__":
    main()
