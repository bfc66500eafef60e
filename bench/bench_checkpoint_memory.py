"""Peak memory and wall time of the weight converter (research/deepseek2/convert_weight.py) at real size.

Writes a synthetic bf16 Hugging Face checkpoint in the released DeepSeek-V2-Lite layout (hidden 2048, 16 heads,
kv_lora_rank 512, no q_lora, 64 routed experts of 1408, 2 shared, first layer dense of 10944, vocab 102400) with fewer
layers (default 6: 6.85 GB), in safetensors shards of about --shard-gb GB with model.safetensors.index.json and
config.json. Tensors are generated and written chunk by chunk (32 MiB), so the generator stays small. Then runs the
converter's command line, each step in a fresh process, and measures its wall time and peak RSS (``ru_maxrss`` of
the child from ``os.wait4``; /proc is polled as well for the progress bar):

  (a) Hugging Face -> MindSpore safetensors folder       (b) that folder -> Hugging Face (--reverse)
  (c) Hugging Face -> one MindSpore .ckpt file           (d) that .ckpt -> Hugging Face (--reverse)

plus a baseline: the converter's imports alone (``convert_weight.py --help``). The bound checked for every step is
the largest input file + 1 GiB (the converter holds one tensor, or one layer's stacked experts, at a time). Both
reverse outputs are compared with the generated tensors (a digest of every tensor's bytes): bit-exact or not.
Everything is written under one temporary folder in /tmp (--workdir), deleted at the end (--keep keeps it); the
largest disk use is about 3x the checkpoint (21 GB at the defaults).

Run from the repo root:  python bench/bench_checkpoint_memory.py        (about 7-15 minutes on 2 cores; disk-bound)
                         python bench/bench_checkpoint_memory.py --layers 3 --shard-gb 1   (3.3 GB, quicker)
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import common as C  # bench/common.py, beside this script; sets the environment before any framework import

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402
from mindformers.tools.logger import logger  # noqa: E402

CONVERTER = os.path.join(C.ROOT, "research", "deepseek2", "convert_weight.py")
GIB = 2 ** 30
CHUNK_ELEMENTS = 1 << 24  # 32 MiB of bf16 per generated chunk
# the released DeepSeek-V2-Lite config.json (num_hidden_layers is --layers)
LITE_FIELDS = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                   num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
                   routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                   v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
                   num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False,
                   scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu",
                   max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
                   rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                 "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
                   attention_bias=False, bos_token_id=100000, eos_token_id=100001)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6, help="num_hidden_layers (1 dense + MoE layers; 6 -> 6.85 GB)")
    p.add_argument("--shard-gb", type=float, default=1.5, help="Hugging Face shard size, GB (10^9 bytes)")
    p.add_argument("--workdir", default=None, help="where to write (default: a new folder under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--steps", default="a,b,c,d", help="which steps to run (b needs a, d needs c)")
    p.add_argument("--no-verify", action="store_true", help="skip the bit-exactness check of the reverse outputs")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- the checkpoint
def model_config(layers: int):
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    return DeepseekV2Config(**dict(LITE_FIELDS, num_hidden_layers=layers))


def plan_shards(shapes: dict, shard_bytes: float) -> list:
    """[[(name, shape), ...] per shard]: tensors in model order, a new shard when the next would pass shard_bytes."""
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tuple(shape)))
        size += nbytes
    return shards + [current] if current else shards


def tensor_chunks(shape, seed: int, index: int):
    """The bf16 bits of one tensor, CHUNK_ELEMENTS at a time: N(0, 0.02) for matrices, 1 + N(0, 0.02) for norms."""
    rng = np.random.default_rng([seed, index])
    total = math.prod(shape)
    for start in range(0, total, CHUNK_ELEMENTS):
        values = rng.standard_normal(min(CHUNK_ELEMENTS, total - start), dtype=np.float32)
        values *= 0.02
        if len(shape) == 1:
            values += 1.0
        yield (values.view(np.uint32) >> 16).astype(np.uint16)  # bf16: the high half of fp32 (truncated)


def write_hf_checkpoint(folder: str, config, shard_bytes: float, seed: int) -> dict:
    """Write the checkpoint; returns {"digests": {name: blake2b of its bytes}, "shards": [bytes per shard file]}."""
    from research.deepseek2.weight_map import expected_hf_shapes
    shapes = expected_hf_shapes(config)
    shards = plan_shards(shapes, shard_bytes)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    total = sum(math.prod(s) * 2 for s in shapes.values())
    position = {name: k for k, name in enumerate(shapes)}  # each tensor's random stream
    os.makedirs(folder)
    digests, weight_map, sizes = {}, {}, []
    with tqdm(total=total, desc="writing the HF checkpoint", unit="B", unit_scale=True, unit_divisor=1024) as bar:
        for file_name, entries in zip(names, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape in entries:
                size = math.prod(shape) * 2
                header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
                offset += size
                weight_map[name] = file_name
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            path = os.path.join(folder, file_name)
            with open(path, "wb") as f:
                f.write(len(blob).to_bytes(8, "little") + blob)
                for name, shape in entries:
                    digest = hashlib.blake2b(digest_size=16)
                    for chunk in tensor_chunks(shape, seed, position[name]):
                        f.write(chunk)
                        digest.update(chunk)
                        bar.update(chunk.nbytes)
                    digests[name] = digest.hexdigest()
            sizes.append(os.path.getsize(path))
            logger.info(f"wrote {path} ({sizes[-1] / GIB:.2f} GiB, {len(entries)} tensors)")
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_config = config.to_hf_dict()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return {"digests": digests, "shards": sizes, "total": total}


def hf_digests(folder: str) -> dict:
    """{name: blake2b of its bytes} of every tensor of a Hugging Face safetensors folder, read 32 MiB at a time."""
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for file_name in files:
        with open(os.path.join(folder, file_name), "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                start, end = entry["data_offsets"]
                f.seek(8 + length + start)
                digest = hashlib.blake2b(digest_size=16)
                left = end - start
                while left:
                    data = f.read(min(left, CHUNK_ELEMENTS * 2))
                    digest.update(data)
                    left -= len(data)
                out[name] = digest.hexdigest()
    return out


# ---------------------------------------------------------------------------------------------- measuring
def _proc_fields(pid: int) -> dict:
    """VmRSS (bytes) from /proc/pid/status and wchar (bytes written) from /proc/pid/io; {} once it has exited."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1]) * 1024
        with open(f"/proc/{pid}/io") as handle:
            for line in handle:
                if line.startswith("wchar:"):
                    out["wchar"] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def measure(label: str, cmd: list, log_path: str, expect_bytes: int) -> dict:
    """Run ``cmd`` in a fresh process; its wall time, peak RSS (ru_maxrss from wait4) and RSS samples over time.

    The progress bar follows the bytes the child has written (``wchar``) against ``expect_bytes``."""
    samples = []
    load_before = C.load_average()
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=C.ROOT)  # pylint: disable=consider-using-with
        done = threading.Event()
        bar = tqdm(total=expect_bytes or None, desc=label, unit="B", unit_scale=True, unit_divisor=1024, leave=True,
                   mininterval=1.0)

        def poll():
            while not done.is_set():
                fields = _proc_fields(proc.pid)
                if "rss" in fields:
                    samples.append((time.perf_counter() - start, fields["rss"]))
                    bar.set_postfix(rss=f"{fields['rss'] / GIB:.2f} GiB", refresh=False)
                if "wchar" in fields and expect_bytes:
                    bar.update(min(fields["wchar"], expect_bytes) - bar.n)
                done.wait(0.2)

        sampler = threading.Thread(target=poll, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        bar.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path) as handle:
            tail = "".join(handle.readlines()[-30:])
        raise RuntimeError(f"{label}: exit {proc.returncode}: {' '.join(cmd)}\n{tail}\n(whole log: {log_path})")
    C.WORKER_LOADS.append((label, load_before, C.load_average(), seconds))
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    logger.info(f"{label}: {seconds:.1f} s, peak RSS {peak / GIB:.2f} GiB")
    return {"seconds": seconds, "peak": peak, "samples": samples}


def files_of(path: str) -> list:
    if os.path.isdir(path):
        return [os.path.join(path, n) for n in os.listdir(path) if n.endswith((".safetensors", ".ckpt"))]
    return [path]


def rss_at_fraction(samples, fraction: float) -> float:
    """RSS sampled nearest to ``fraction`` of the run (for the timeline line)."""
    if not samples:
        return float("nan")
    end = samples[-1][0]
    return min(samples, key=lambda s: abs(s[0] - fraction * end))[1]


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    a = parse_args(argv)
    load_start = C.load_average()
    steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    if ("b" in steps and "a" not in steps) or ("d" in steps and "c" not in steps):
        raise SystemExit("--steps: b needs a, d needs c")
    work = a.workdir or tempfile.mkdtemp(prefix="ds2_ckpt_mem_", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    logger.info(f"work folder {work}")
    hf, ms_dir, ckpt = (os.path.join(work, n) for n in ("hf", "ms_safetensors", "ms.ckpt"))
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    rows, notes, timelines = [], [], []
    try:
        config = model_config(a.layers)
        made = write_hf_checkpoint(hf, config, a.shard_gb * 1e9, a.seed)
        largest_hf = max(made["shards"])
        notes.append(f"checkpoint: {a.layers} layers of DeepSeek-V2-Lite, {len(made['digests'])} bf16 tensors, "
                     f"{made['total'] / 1e9:.2f} GB ({made['total'] / GIB:.2f} GiB) in {len(made['shards'])} shards "
                     f"of {min(made['shards']) / GIB:.2f}-{largest_hf / GIB:.2f} GiB")
        base = [sys.executable, CONVERTER, "--no_progress"]
        plan = {
            "a": ("(a) HF -> MindSpore safetensors folder", base + ["--torch_ckpt_path", hf, "--mindspore_ckpt_path",
                                                                    ms_dir], lambda: [hf], None),
            "b": ("(b) MindSpore safetensors folder -> HF (--reverse)",
                  base + ["--reverse", "--mindspore_ckpt_path", ms_dir, "--torch_ckpt_path",
                          os.path.join(work, "hf_from_safetensors"), "--config", hf], lambda: [ms_dir],
                  os.path.join(work, "hf_from_safetensors")),
            "c": ("(c) HF -> one .ckpt", base + ["--torch_ckpt_path", hf, "--mindspore_ckpt_path", ckpt],
                  lambda: [hf], None),
            "d": ("(d) .ckpt -> HF (--reverse)", base + ["--reverse", "--mindspore_ckpt_path", ckpt,
                                                         "--torch_ckpt_path", os.path.join(work, "hf_from_ckpt"),
                                                         "--config", hf], lambda: [ckpt],
                  os.path.join(work, "hf_from_ckpt")),
        }
        baseline = measure("baseline: imports only (--help)", [sys.executable, CONVERTER, "--help"],
                           os.path.join(logs, "baseline.log"), 0)
        rows.append(["imports only (`--help`)", f"{baseline['seconds']:.1f}", f"{baseline['peak'] / GIB:.2f}", "-",
                     "-", "-", "-"])
        for key in steps:
            label, cmd, inputs, hf_out = plan[key]
            input_files = [f for path in inputs() for f in files_of(path)]
            largest = max(os.path.getsize(f) for f in input_files)
            result = measure(label, cmd, os.path.join(logs, f"step_{key}.log"), made["total"])
            limit = largest + GIB
            exact = "-"
            if hf_out is not None:
                if not a.no_verify:
                    logger.info(f"{label}: comparing every tensor with the generated ones")
                    exact = "yes" if hf_digests(hf_out) == made["digests"] else "NO"
                shutil.rmtree(hf_out)
            rows.append([label, f"{result['seconds']:.1f}", f"{result['peak'] / GIB:.2f}", f"{largest / GIB:.2f}",
                         f"{limit / GIB:.2f}", "yes" if result["peak"] <= limit else "NO", exact])
            timelines.append(f"{label}: RSS at 10/25/50/75/90% of the run "
                             + " / ".join(f"{rss_at_fraction(result['samples'], x) / GIB:.2f}"
                                          for x in (0.1, 0.25, 0.5, 0.75, 0.9)) + " GiB")
            if key == "b":
                shutil.rmtree(ms_dir)  # disk: the input of (c)/(d) is the HF folder again
            if key == "d":
                os.remove(ckpt)
    finally:
        if a.keep:
            logger.info(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    headers = ["step", "seconds", "peak RSS GiB", "largest input file GiB", "limit GiB (largest + 1)",
               "within limit", "bit-exact"]
    with open("/proc/meminfo") as handle:
        ram = int(handle.readline().split()[1]) * 1024
    out = [f"machine: {C.machine_line()}, {ram / GIB:.0f} GiB RAM", *notes,
           "each step: `python research/deepseek2/convert_weight.py ... --no_progress` in a fresh process; peak RSS = "
           "ru_maxrss of that process", "", C.table(headers, rows), "", *timelines, C.load_line(load_start)]
    print("\n".join(out))


if __name__ == "__main__":
    main()
