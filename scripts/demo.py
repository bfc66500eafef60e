"""The main job, end to end on CPU, every stage through the project's own commands:

1. train a small byte-level BPE tokenizer on the bundled code_alpaca sample;
2. make a tiny DeepSeek-V2 with the PyTorch reference (transformers) and convert it (convert_weight.py);
3. prepare the code_alpaca sample as MindRecord (code_alpaca_preprocess.py);
4. finetune it through run_mindformer.py (MindFormers' Trainer, graph mode) and show the loss falling;
5. ask it to answer one instruction through run_mindformer.py --run_mode predict (latent KV cache, chat template,
   greedy with a repetition penalty).

    python scripts/demo.py [--work_dir work_dirs/demo] [--epochs 2] [--steps N]
"""
import argparse
import glob
import json
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


def banner(text):
    print(f"\n=== {text} ===", flush=True)


def run(cmd, env, filter_loss=False):
    """Run a project command; with filter_loss only every 25th loss line is echoed. Returns its output."""
    print("$ " + " ".join(cmd if len(" ".join(cmd)) < 400 else cmd[:6] + ["..."]), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if filter_loss:
            match = LOSS_LINE.search(line)
            if match and (int(match.group(1)) % 25 == 0 or match.group(1) in ("1", match.group(2))):
                print(f"  step {match.group(1):>4}/{match.group(2)}  loss {float(match.group(3)):.4f}", flush=True)
            elif "Error" in line or "error:" in line:
                print("  " + line.rstrip(), flush=True)
        elif "WARNING" not in line and "[WARNING]" not in line:
            print("  " + line.rstrip(), flush=True)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "work_dirs", "demo"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seq_length", type=int, default=256)
    args = parser.parse_args()
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LOCAL_DEFAULT_PATH=os.path.join(work, "logs"), GLOG_v="3")
    started = time.time()
    py = sys.executable

    banner("1/5 tokenizer: byte-level BPE trained on the bundled code_alpaca sample")
    tokenizer = os.path.join(work, "tokenizer.json")
    run([py, "research/deepseek2/train_tokenizer.py", "--data_path", DATA, "--output_path", tokenizer,
         "--vocab_size", "2048"], env)

    banner("2/5 a tiny DeepSeek-V2 from the PyTorch reference, converted to MindSpore")
    hf_dir, ckpt = os.path.join(work, "hf_tiny"), os.path.join(work, "tiny_init.ckpt")
    count = make_tiny_reference(hf_dir, 2048)
    print(f"  transformers DeepseekV2ForCausalLM: {count:,} parameters -> {hf_dir}")
    run([py, "research/deepseek2/convert_weight.py", "--torch_ckpt_path", hf_dir, "--mindspore_ckpt_path", ckpt,
         "--dtype", "fp32"], env)

    banner("3/5 code_alpaca -> MindRecord (prompt masked with -100, reply learned)")
    data = os.path.join(work, "code_alpaca.mindrecord")
    run([py, "research/deepseek2/code_alpaca_preprocess.py", "--data_path", DATA, "--tokenizer_file", tokenizer,
         "--output_path", data, "--seq_length", str(args.seq_length)], env)

    banner("4/5 finetune through run_mindformer.py (MindFormers Trainer, graph mode, CPU)")
    out = os.path.join(work, "output")
    log = run([py, "run_mindformer.py", "--config", TINY_YAML, "--run_mode", "finetune", "--load_checkpoint", ckpt,
               "--train_data", data, "--tokenizer_file", tokenizer, "--output_dir", out,
               "--runner_config.epochs", str(args.epochs), "--model.model_config.seq_length", str(args.seq_length)],
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

    banner("5/5 predict: one instruction, DeepSeek-V2-Chat template, latent KV cache")
    run([py, "run_mindformer.py", "--config", PREDICT_YAML, "--load_checkpoint", checkpoints[-1],
         "--tokenizer_file", tokenizer, "--output_dir", out, "--predict_data", INSTRUCTION, "--predict_length", "64",
         "--repetition_penalty", "1.2", "--model.model_config.seq_length", str(args.seq_length)], env)
    with open(os.path.join(out, "text_generation_result.txt"), encoding="utf-8") as handle:
        result = json.loads(handle.readline())
    banner("done")
    print(f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps; {time.time() - started:.0f} s in all")
    print(f"instruction: {result['prompt']}\nreply:\n{result['output']}")
    if not last < first:
        raise SystemExit("demo: the loss did not fall")


if __name__ == "__main__":
    main()
