"""Write a synthetic Hugging Face DeepSeek-V2 checkpoint folder at real size, without downloading anything.

The folder has the released layout: config.json, generation_config.json, model-0000i-of-0000N.safetensors shards and
model.safetensors.index.json ({"metadata": {"total_size": ...}, "weight_map": {...}}). Tensor names and shapes are
the project's inventory under Hugging Face names (``checkpoints.weight_map.expected_hf_shapes``), nothing spelled
again here; they are written in the order transformers' ``save_pretrained`` writes the released model (embed_tokens,
then layer by layer: self_attn, mlp expert by expert, its gate and shared experts, the two layer norms; then
model.norm and lm_head), and a new shard starts when the next tensor would pass ``--shard_gb`` (10^9 bytes), so a
layer may straddle two shards as in the release. Default: DeepSeek-V2-Lite's released config.json, all 27 layers,
15.7B parameters, 31.4 GB of bf16 in 4 shards of at most 8 GB.

Values are random but shaped like trained weights where a benchmark can tell (deterministic from ``--seed``, each
tensor from its own stream keyed by its name):
  * norm weights 1 + 0.05 N(0, 1);
  * the embedding and lm_head N(0, 0.02);
  * every other matrix (out, in) row by row: row r is N(0, s_r) with s_r = 0.02 exp(0.3 z_r) (log-normal around
    0.02, so rows of one matrix span about 0.011 - 0.036), and 1 % of the rows hold 1 - 4 outliers of 5 - 10 s_r,
    so per-output-channel int8 quantization sees realistic row ranges;
  * biases (only with attention_bias) N(0, 0.02).
Normals come from torch.randn in float32 (one single-threaded torch generator per chunk of CHUNK_ELEMENTS values),
on ``--threads`` threads (torch releases the GIL), and are rounded to bf16 by integer arithmetic on the float32
bits: torch's generator is the fastest at hand, so that a run goes as fast as the disk lets it (figures in
docs/benchmarks.md).

Memory: never a whole tensor or shard. 2 * threads + 2 buffers of one chunk (8 MiB of bf16) and a float32 scratch
of one chunk per thread (16 MiB), allocated once and reused: 80 MB at the defaults; the chunks go to their place in
the shards through the project's ShardedSafetensorsWriter (``write_rows``), which plans every header up front and
writes the index on close. Every file is written in a staging folder (``fileio.StagedDir``) and the folder is
renamed to OUT_DIR only when complete; an interrupted run (an error, Ctrl-C or SIGTERM) removes the staging folder.
The shards are fsync'ed before the time is taken, so the figures printed at the end are the disk's, not the page
cache's.
Log lines go through MindFormers' logger (imported anyway: the project's DeepseekV2Config is built on MindFormers).

  python bench/make_synthetic_checkpoint.py work_dirs/lite_synth/bf16             # V2-Lite, 27 layers, 31.4 GB
  python bench/make_synthetic_checkpoint.py /tmp/lite6 --num_layers 6 --shard_gb 1.5   # 6.85 GB, quicker
  python bench/make_synthetic_checkpoint.py /tmp/tiny --config tiny/config.json    # any config.json
  python bench/make_synthetic_checkpoint.py /tmp/x \
      --config research/deepseek2/deepseek2_lite/predict_deepseek2_lite.yaml     # a YAML's model_config

At the end it prints the tensors, total bytes, shards, seconds, MB/s and the peak RSS of the process.
"""
import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# `import mindformers` writes output/log under the working directory unless pointed elsewhere
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(tempfile.gettempdir(), "ds2_bench_logs"))
os.environ.setdefault("GLOG_v", "3")                  # MindSpore's C++ log: errors only

import numpy as np  # noqa: E402

PROG = "make_synthetic_checkpoint.py"
GB = 10 ** 9
CHUNK_ELEMENTS = 1 << 22          # 4M values a chunk: 16 MiB of float32 while generated, 8 MiB of bf16 written

# The released DeepSeek-V2-Lite config.json (deepseek-ai/DeepSeek-V2-Lite), every value as released. The project's
# research/deepseek2/deepseek2_lite/predict_deepseek2_lite.yaml holds the same model fields (tests compare the two).
RELEASED_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 6,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "use_cache": True,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "pretraining_tp": 1,
}


class UsageError(Exception):
    """Something on the command line that cannot be done; printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------- the config
def load_fields(config_path, num_layers=None, dtype: str = "bfloat16") -> dict:
    """The config.json fields to write: the released V2-Lite config (no ``config_path``), a config.json as it is, or
    a MindFormers YAML's model.model_config through ``DeepseekV2Config.to_hf_dict`` (the fields the project's reverse
    conversion writes). ``num_layers`` overrides num_hidden_layers; torch_dtype names the dtype written."""
    if config_path is None:
        fields = json.loads(json.dumps(RELEASED_LITE_CONFIG))           # a deep copy
    elif not os.path.isfile(config_path):
        raise UsageError(f"--config {config_path}: no such file")
    elif config_path.endswith((".yaml", ".yml")):
        import yaml
        with open(config_path, encoding="utf-8") as handle:
            model_config = dict(((yaml.safe_load(handle) or {}).get("model") or {}).get("model_config") or {})
        if not model_config:
            raise UsageError(f"--config {config_path}: no model.model_config in this YAML")
        model_config.pop("type", None)
        fields = build_config(model_config).to_hf_dict()
    else:
        try:
            with open(config_path, encoding="utf-8") as handle:
                fields = json.load(handle)
        except ValueError as err:
            raise UsageError(f"--config {config_path}: not a JSON config ({err})") from err
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    fields["torch_dtype"] = dtype
    return fields


def build_config(fields: dict):
    """The project's DeepseekV2Config of the config.json fields (what every loader of the folder builds)."""
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    try:
        return DeepseekV2Config(**fields)
    except (TypeError, ValueError) as err:
        raise UsageError(f"the project's DeepseekV2Config refuses this config: {err}") from err


# ---------------------------------------------------------------------------------------------- the layout
# model.layers.{L}.{self_attn|mlp|input_layernorm|...}.[experts.{E}.]...
_LAYER = re.compile(r"model\.layers\.(\d+)\.([a-z_]+)\.(?:experts\.(\d+)\.)?")
_PART_RANK = {"self_attn": 0, "mlp": 1}   # then input_layernorm and post_attention_layernorm (rank 2)


def released_order(shapes: Dict[str, Tuple[int, ...]]) -> List[str]:
    """The inventory's names in the order of transformers' state_dict, which save_pretrained writes and shards:
    embed_tokens; per layer self_attn, mlp (the routed experts one after the other, each gate, up, down; then the
    router gate and the shared experts), input_layernorm, post_attention_layernorm; then model.norm and lm_head.
    (DeepseekV2DecoderLayer registers self_attn, mlp, then the norms; DeepseekV2MoE experts, gate, shared_experts.)
    Ties keep the inventory's order, which already lists each part's tensors as transformers does."""
    position = {name: i for i, name in enumerate(shapes)}

    def key(name):
        match = _LAYER.match(name)
        if match is None:                        # the inventory lists the embedding first, model.norm and lm_head last
            return (0 if position[name] == 0 else 2, 0, 0, 0, 0, position[name])
        layer, part, expert = int(match.group(1)), match.group(2), match.group(3)
        return (1, layer, _PART_RANK.get(part, 2), 0 if expert is not None else 1, int(expert or 0), position[name])

    return sorted(shapes, key=key)


def plan(order: Sequence[str], shapes: Dict[str, Tuple[int, ...]], dtype: str, shard_bytes: float) -> List[list]:
    """[(name, numpy dtype, shape)] per shard: the tensors in ``order``, split as save_pretrained splits
    (``safetensors_file.plan_shards``: a new shard when the next tensor would pass ``shard_bytes``)."""
    from research.deepseek2.checkpoints.safetensors_file import plan_shards
    from research.deepseek2.dtypes import to_numpy
    return plan_shards([(name, to_numpy(dtype), shapes[name]) for name in order], int(shard_bytes))


# ---------------------------------------------------------------------------------------------- the values
def value_kind(name: str, shape: Tuple[int, ...]) -> str:
    """'norm' (1 + 0.05 N), 'plain' (N(0, 0.02): the embedding, lm_head, biases) or 'rows' (per-row spread)."""
    if len(shape) == 1:
        return "norm" if name.endswith("norm.weight") else "plain"
    return "rows" if _LAYER.match(name) else "plain"


def chunk_rows(shape: Tuple[int, ...]) -> int:
    """Rows (of dimension 0) a chunk holds: about CHUNK_ELEMENTS values; a 1-D tensor is one chunk."""
    if len(shape) < 2:
        return max(1, shape[0] if shape else 1)
    return max(1, CHUNK_ELEMENTS // math.prod(shape[1:]))


def chunk_count(shape: Tuple[int, ...]) -> int:
    return math.ceil(shape[0] / chunk_rows(shape)) if shape else 1


def chunk_elements(shape: Tuple[int, ...]) -> int:
    """Values in the largest chunk of a tensor of ``shape``."""
    return chunk_rows(shape) * math.prod(shape[1:])


# the numpy type whose array holds a chunk's bytes as written (bf16: its bits)
_STORED = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
_SCRATCH = threading.local()


def _scratch(count: int):
    """This thread's float32 scratch tensor of ``count`` values, allocated once per thread (and grown if needed)."""
    import torch                                                         # imported by write_checkpoint
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < count:
        buffer = _SCRATCH.buffer = torch.empty(count, dtype=torch.float32)
    return buffer[:count]


def make_chunk(name: str, shape: Tuple[int, ...], kind: str, chunk: int, seed: int, dtype: str,
               out: np.ndarray = None) -> np.ndarray:
    """Rows [chunk * chunk_rows, ...) of tensor ``name`` in ``dtype`` (bf16 as its uint16 bits), shape
    (rows, *shape[1:]), written into the bytes of ``out`` (a uint8 buffer, reused by the caller; default: a new one).

    Its own random stream: (seed, crc32 of the name, chunk), so every chunk is the same whatever the thread, the
    other tensors, the layer count or the shard size. The normals are drawn into this thread's scratch (float32)
    and scaled in place; bf16 is rounded to nearest (ties away from zero) by adding half a bf16 ulp to the float32
    bits and keeping their high half (the values are finite). No allocation of a chunk's size: the buffers are reused.
    """
    import torch
    rows_per_chunk = chunk_rows(shape)
    rows = min(rows_per_chunk, shape[0] - chunk * rows_per_chunk) if shape else 1
    size = ((rows,) + tuple(shape[1:])) if shape else ()
    count = math.prod(size)
    stored = np.dtype(_STORED[dtype])
    if out is None:
        out = np.empty(count * stored.itemsize, np.uint8)
    target = out[:count * stored.itemsize].view(stored).reshape(size)
    stream = np.random.SeedSequence([seed, zlib.crc32(name.encode()), chunk])
    generator = torch.Generator().manual_seed(int(stream.generate_state(1, np.uint64)[0]))
    rng = np.random.Generator(np.random.SFC64(stream))                  # the few per-row draws
    normals = torch.from_numpy(target) if dtype == "float32" else _scratch(count).view(size)
    torch.randn(size, generator=generator, out=normals)
    values = normals.numpy()                                             # (rows, *shape[1:]), float32, shared
    if kind == "norm":
        values *= np.float32(0.05)
        values += np.float32(1.0)
    elif kind == "plain":
        values *= np.float32(0.02)
    else:
        flat = values.reshape(rows, -1)                                   # (rows, in), a view
        outliers = np.flatnonzero(rng.random(rows) < 0.01)               # 1 % of the rows
        if outliers.size:
            row = np.repeat(outliers, rng.integers(1, 5, outliers.size))  # 1 - 4 outliers each
            sign = np.where(rng.random(row.size) < 0.5, -1.0, 1.0)
            flat[row, rng.integers(0, flat.shape[1], row.size)] = sign * rng.uniform(5.0, 10.0, row.size)
        row_std = (0.02 * np.exp(0.3 * rng.standard_normal(rows))).astype(np.float32)   # (rows,)
        flat *= row_std[:, None]
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        bits += np.uint32(0x8000)
        high = 1 if sys.byteorder == "little" else 0                     # the high half of each float32
        np.copyto(target, bits.view(np.uint16)[..., high::2])
    elif dtype == "float16":
        np.copyto(target, values, casting="same_kind")
    return target


# ---------------------------------------------------------------------------------------------- writing
def write_checkpoint(out_dir: str, fields: dict, shard_gb: float, dtype: str, seed: int, threads: int = 2,
                     progress: bool = True) -> dict:
    """Write the folder (see the module docstring); returns what was written: tensors, total_size, shards
    [(file, bytes, first layer, last layer)], seconds, file_bytes."""
    from mindformers.tools.logger import logger
    from research.deepseek2.checkpoints.weight_map import expected_hf_shapes
    from research.deepseek2.dtypes import bytes_of
    from research.deepseek2.fileio import StagedDir

    config = build_config(fields)
    shapes = expected_hf_shapes(config)
    order = released_order(shapes)
    shards = plan(order, shapes, dtype, shard_gb * GB)
    total = sum(math.prod(shapes[name]) * bytes_of(dtype) for name in order)

    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if free < total + GB:
        raise UsageError(f"{out_dir}: needs {total / GB:.2f} GB (+1 GB to spare), {free / GB:.2f} GB free on "
                         f"{parent}")
    logger.info(f"{out_dir}: {len(order)} tensors, {total / GB:.2f} GB of {dtype} in {len(shards)} shard(s) of at "
                f"most {shard_gb:g} GB, {config.num_hidden_layers} layers, seed {seed}, {threads} thread(s)")

    import torch
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)                          # parallel over chunks instead: one core per worker thread
    start = time.perf_counter()
    try:
        with StagedDir(out_dir) as staged:
            files = _write_shards(staged, shards, dtype, seed, threads, progress, total)
            _write_json(staged.file("config.json"), fields)
            _write_json(staged.file("generation_config.json"),
                        {"_from_model_config": True, "bos_token_id": fields.get("bos_token_id"),
                         "eos_token_id": fields.get("eos_token_id")})
    finally:
        torch.set_num_threads(torch_threads)
    seconds = time.perf_counter() - start
    shard_info = []
    for file, entries in zip(files, shards):
        layers = [layer for layer in (_layer_of(name) for name, _, _ in entries) if layer is not None]
        shard_info.append((file, sum(math.prod(shape) * bytes_of(dtype) for _, _, shape in entries),
                           min(layers, default=None), max(layers, default=None)))
        _log_shard(logger, shard_info[-1])
    file_bytes = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
    return {"tensors": len(order), "total_size": total, "shards": shard_info, "seconds": seconds,
            "file_bytes": file_bytes}


def _write_shards(staged, shards, dtype, seed, threads, progress, total) -> List[str]:
    """Every shard into the staging folder through the project's ShardedSafetensorsWriter (header planned up front,
    index written on close), chunk by chunk: ``threads`` workers generate the chunks in file order, at most
    2 * threads + 2 of them ahead of the writer. The files are fsync'ed before returning, so the time taken is the
    disk's, not the page cache's. Returns the shard files' names."""
    from tqdm import tqdm
    from research.deepseek2.checkpoints.safetensors_file import ShardedSafetensorsWriter
    from research.deepseek2.dtypes import bytes_of
    tasks = iter([(name, shape, value_kind(name, shape), chunk)
                  for entries in shards for name, _, shape in entries for chunk in range(chunk_count(shape))])
    largest = max(chunk_elements(shape) for entries in shards for _, _, shape in entries) * bytes_of(dtype)
    # the chunks generated ahead of the writer, each in a buffer of its own, handed back once written: these buffers
    # and each worker's float32 scratch are all the memory a run takes (80 MB at the defaults, bf16)
    free = deque(np.empty(largest, np.uint8) for _ in range(2 * threads + 2))
    pending = deque()
    writer = ShardedSafetensorsWriter(staged.file, "model", shards, metadata={"format": "pt"})
    with ThreadPoolExecutor(max_workers=threads) as pool, \
            tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress, mininterval=1) as bar:

        def submit():
            task = next(tasks, None)
            if task is not None:
                buffer = free.popleft()
                pending.append((task, buffer, pool.submit(make_chunk, *task, seed, dtype, buffer)))

        try:
            for _ in range(len(free)):
                submit()
            while pending:
                (name, shape, _, chunk), buffer, future = pending.popleft()
                piece = future.result()                       # bf16 as its uint16 bits: the planned dtype's view
                writer.write_rows(name, chunk * chunk_rows(shape), piece.view(writer.planned_dtype(name)))
                bar.update(piece.nbytes)
                del piece
                free.append(buffer)
                submit()
            writer.close()
        except BaseException:
            for _, _, future in pending:
                future.cancel()
            writer.abort()
            raise
    for file in writer.names:
        with open(staged.file(file), "rb") as handle:
            os.fsync(handle.fileno())
            # on disk now: leave the page cache to others (a reader of the folder evicts it anyway)
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return writer.names


def _layer_of(name: str):
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def _log_shard(logger, info):
    file, nbytes, first, last = info
    logger.info(f"wrote {file}: {nbytes / GB:.3f} GB" + ("" if first is None else f", layers {first} to {last}"))


def _write_json(path: str, data, sort_keys: bool = False):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=sort_keys)
        handle.write("\n")


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--config", default=None, metavar="CONFIG_JSON_OR_YAML",
                   help="a config.json, or a MindFormers YAML (its model.model_config); default: the released "
                        "DeepSeek-V2-Lite config.json")
    p.add_argument("--num_layers", type=int, default=None, help="num_hidden_layers (default: the config's)")
    p.add_argument("--shard_gb", type=float, default=8.0, help="largest shard, GB (10^9 bytes; fractions allowed)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="dtype of the tensors")
    p.add_argument("--seed", type=int, default=0, help="the random values' seed")
    p.add_argument("--threads", type=int, default=2, help="threads generating the values")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _refusal(args):
    """The one-line reason not to start, or None."""
    out = args.out_dir
    if os.path.lexists(out) and not os.path.isdir(out):
        return f"OUT_DIR {out} exists and is not a folder"
    if os.path.isdir(out) and os.listdir(out):
        return f"OUT_DIR {out} exists and is not empty; name a new folder"
    if args.num_layers is not None and args.num_layers < 1:
        return f"--num_layers {args.num_layers}: expected at least 1"
    if not args.shard_gb > 0:
        return f"--shard_gb {args.shard_gb}: expected a positive size"
    if args.threads < 1:
        return f"--threads {args.threads}: expected at least 1"
    return None


def _terminate(signum, frame):  # pylint: disable=unused-argument
    raise SystemExit(128 + signum)   # unwinds like Ctrl-C: the staging folder is removed


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = _refusal(args)                      # before any heavy import: a refusal is immediate
    if reason:
        print(f"{PROG}: error: {reason}", file=sys.stderr)
        return 2
    from research.deepseek2.dtypes import canonical
    dtype = canonical(args.dtype)
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        fields = load_fields(args.config, args.num_layers, dtype)
        done = write_checkpoint(args.out_dir, fields, args.shard_gb, dtype, args.seed, args.threads,
                                progress=not args.no_progress)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024          # Linux: KiB
    sizes = ", ".join(f"{file} {nbytes / GB:.3f} GB" for file, nbytes, _, _ in done["shards"])
    print(f"wrote {os.path.abspath(args.out_dir)}: {done['tensors']} tensors, {done['total_size']} bytes of "
          f"tensors ({done['total_size'] / GB:.2f} GB; files {done['file_bytes']} bytes), {len(done['shards'])} "
          f"shard(s): {sizes}")
    print(f"{done['seconds']:.1f} s writing ({time.perf_counter() - started:.1f} s with the config and imports), "
          f"{done['file_bytes'] / done['seconds'] / 1e6:.0f} MB/s, peak RSS {peak / 2 ** 20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
