"""Weight-only quantization at real size: DeepSeek-V2-Lite (15.7B parameters) quantized and run on this CPU.

No real weights are downloaded: the input is the synthetic V2-Lite of ``bench/make_synthetic_checkpoint.py`` (the
released config.json, shapes, dtypes and shard layout, trained-looking values). Each step runs in a worker process
of its own, so its peak memory is its own:

  quantize  ``convert_weight.py --quantize`` in-process (``quantize_checkpoint``): time, peak RSS against the
            largest input shard (it streams tensor by tensor), bytes written.
  read      every byte of the quantized folder read once (64 MiB blocks): the floor under loading it. Both this
            step and predict first drop the folder's files from the page cache, so both read from the disk.
  predict   the V2-Lite W8A16 recipe's model (``predict_deepseek2_lite_w8a16.yaml``'s fields; on a CPU float32
            activations, the float parts in ``--param-dtype`` (the recipe's bfloat16 by default) and
            ``use_weight_quant_kernel`` as given: the project's CPU kernel or basic ops) built and loaded from the
            folder as ``run_mindformer.py --run_mode predict`` does (``run.predict.build_network``: parameters
            declared without values, then loaded; time against ``read``), then greedy ``generate`` of
            ``--new-tokens`` after a ``--context``-token prompt prefilled in ``--prefill-chunk`` calls (after a
            warm-up generate of one chunk that compiles both graphs): prefill tokens/s, decode tokens/s (1 / median
            interval), peak RSS.
  ceiling   the CPU kernel's int8 GEMV alone on one decode token's weight bytes (the quantized weights a V2-Lite
            token reads: attention, the dense FFN or the shared experts, 6 routed experts per layer; the float
            lm_head beside them): decode tokens/s no implementation on this kernel can pass.

    python bench/make_synthetic_checkpoint.py work_dirs/lite_synth/bf16          # once: 31.4 GB
    python bench/bench_quantized_lite.py --source work_dirs/lite_synth/bf16 --out work_dirs/lite_synth/w8a16
    python bench/bench_quantized_lite.py --out work_dirs/lite_synth/w8a16 --steps predict --no-kernel

Results: docs/benchmarks.md ("Weight-only quantization at real size").
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as run_mindformer.py: before MindSpore loads OpenMP
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402  pylint: disable=wrong-import-position

ROOT = C.ROOT
SCRIPT = os.path.abspath(__file__)
LITE_W8A16 = os.path.join(ROOT, "research", "deepseek2", "deepseek2_lite", "predict_deepseek2_lite_w8a16.yaml")
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=os.path.join(ROOT, "work_dirs", "lite_synth", "bf16"),
                   help="float Hugging Face folder (bench/make_synthetic_checkpoint.py)")
    p.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "lite_synth", "w8a16"),
                   help="the quantized folder (written by the quantize step, read by the others)")
    p.add_argument("--quantize", default="int8", choices=("int8", "int4"))
    p.add_argument("--group_size", type=int, default=None)
    p.add_argument("--max_shard_size", default="1GB", help="output shards (the loader holds about two at a time)")
    p.add_argument("--steps", default="quantize,read,predict,ceiling")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--no-kernel", action="store_true", help="use_weight_quant_kernel False: basic ops dequantize")
    p.add_argument("--param-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="param_init_type: the dtype of the float parts (embedding, lm_head, norms, router, kv_b_proj); "
                        "the recipe's bfloat16 by default, as the checkpoint holds them")
    p.add_argument("--layers", type=int, default=None,
                   help="num_hidden_layers of the model (the folder's, e.g. make_synthetic_checkpoint.py --num_layers); "
                        "default: the recipe's 27")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _folder_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


# ---------------------------------------------------------------------------------------------- workers
def worker_quantize(a) -> dict:
    from research.deepseek2.convert_weight import parse_size
    from research.deepseek2.quantization.convert import quantize_checkpoint
    from research.deepseek2.quantization.settings import parse_quantization_config
    C.silence_mindformers()
    fields = {"weight_dtype": a.quantize}
    if a.group_size is not None:
        fields["group_size"] = a.group_size
    settings = parse_quantization_config(fields)
    shards = [f for f in os.listdir(a.source) if f.endswith(".safetensors")]
    largest = max(os.path.getsize(os.path.join(a.source, f)) for f in shards)
    base = C.rss_bytes()
    C.reset_peak_rss()
    start = time.perf_counter()
    result = quantize_checkpoint(a.source, a.out, settings, max_shard_size=parse_size(a.max_shard_size))
    return dict(seconds=time.perf_counter() - start, peak_rss=C.peak_rss_bytes(), rss_imports=base,
                largest_input_shard=largest, input_bytes=_folder_bytes(a.source), output_bytes=result["bytes"],
                output_files=len(result["files"]), quantized=result["quantized"], settings=settings.to_dict())


def worker_read(a) -> dict:
    C.evict(a.out)                                    # from the disk, as the predict step reads it
    start, total = time.perf_counter(), 0
    for name in sorted(os.listdir(a.out)):
        if name.endswith(".safetensors"):
            with open(os.path.join(a.out, name), "rb", buffering=0) as handle:
                while True:
                    block = handle.read(64 * 2 ** 20)
                    if not block:
                        break
                    total += len(block)
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, bytes=total, gb_per_s=total / seconds / 1e9)


def _fields(a) -> dict:
    from research.deepseek2.evaluation.heldout import read_model_config
    fields = {k: v for k, v in read_model_config(LITE_W8A16).items() if k != "type"}
    with open(os.path.join(a.out, "config.json"), encoding="utf-8") as handle:
        fields["quantization_config"] = json.load(handle)["quantization_config"]     # int8 or int4, as written
    vocab = fields["vocab_size"]
    # on a CPU: float32 activations (the CPU kernel takes float32), the float parts in --param-dtype; eos outside
    # the vocabulary so that generate never stops early on synthetic weights
    fields.update(seq_length=a.context + a.new_tokens, batch_size=1, use_past=True, compute_dtype="float32",
                  param_init_type=a.param_dtype, prefill_chunk_size=a.prefill_chunk, eos_token_id=vocab,
                  use_weight_quant_kernel=not a.no_kernel)
    if a.layers:
        fields["num_hidden_layers"] = a.layers
    return fields


def worker_predict(a) -> dict:
    import numpy as np
    import mindspore as ms
    from mindformers.generation.streamers import BaseStreamer
    from research.deepseek2 import DeepseekV2Config
    from research.deepseek2.run.predict import build_network
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    C.silence_mindformers()
    config = DeepseekV2Config(**_fields(a))
    C.evict(a.out)                                    # from the disk, as the read step reads it
    start = time.perf_counter()
    net = build_network(config, a.out, 1, 0)      # run_mindformer's predict: declared without values, then loaded
    loaded = time.perf_counter()
    rss_loaded = C.rss_bytes()
    stamps = []

    class Streamer(BaseStreamer):
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    rng = np.random.RandomState(a.seed)
    ids = rng.randint(2, config.vocab_size, a.context).tolist()
    warm = time.perf_counter()
    net.generate([ids[:a.prefill_chunk or a.context]], max_new_tokens=2, do_sample=False)   # compiles both graphs
    warmup_s = time.perf_counter() - warm
    out = net.generate([ids], max_new_tokens=a.new_tokens, do_sample=False, streamer=Streamer())
    intervals = [y - x for x, y in zip(stamps[1:], stamps[2:])]
    prefill_s = stamps[1] - stamps[0]
    return dict(build_load_s=loaded - start, warmup_s=warmup_s, prefill_s=prefill_s,
                prefill_tok_s=a.context / prefill_s, decode_step_s=statistics.median(intervals),
                decode_tok_s=1.0 / statistics.median(intervals), generated=len(out[0]) - a.context,
                rss_loaded=rss_loaded, peak_rss=C.peak_rss_bytes(), kernel=not a.no_kernel, param_dtype=a.param_dtype,
                quantization_config=config.quantization_config, prefill_chunk=a.prefill_chunk, context=a.context)


def _decode_bytes(config) -> dict:
    """Bytes one decode token reads: the quantized weights it uses (int8 or packed int4, and scales) and the
    float ones (lm_head and the rest), from the inventory."""
    from research.deepseek2.planning.inventory import parameters
    from research.deepseek2.dtypes import bytes_of
    quant, floats = 0, 0
    float_size = bytes_of(config.param_init_type)                       # the float parts' dtype (param_init_type)
    chosen = config.num_experts_per_tok / config.n_routed_experts      # a token reads k of the E stacked experts
    for held in parameters(config):                                     # as the model holds them
        share = chosen if "routed_experts" in held.name else 1.0
        if held.name.startswith("model.tok_embeddings"):
            share = 1.0 / config.vocab_size                             # one row
        nbytes = held.size * {"int8": 1, "float32": 4, None: float_size}[held.dtype] * share
        if held.dtype:
            quant += nbytes
        else:
            floats += nbytes
    return {"quantized": quant, "float": floats}


def worker_ceiling(a) -> dict:
    """The CPU kernel's int8 GEMV rate on one token, and the decode rate it allows for V2-Lite's bytes per token."""
    import numpy as np
    import mindspore as ms
    from research.deepseek2 import DeepseekV2Config
    from research.deepseek2.quantization.kernels import WeightQuantMatmul
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    C.silence_mindformers()
    config = DeepseekV2Config(**_fields(a))
    n, k, count = 16384, 2048, 8                     # 8 weights of 32 MiB: 256 MiB, past any cache, read in turn
    rng = np.random.default_rng(0)
    weights = [ms.Tensor(rng.integers(-127, 128, (n, k), dtype=np.int8)) for _ in range(count)]
    scale = ms.Tensor(rng.random((n, 1), dtype=np.float32) / 127)                 # per channel, as held
    x = ms.Tensor(rng.standard_normal((1, k), dtype=np.float32))
    matmul = WeightQuantMatmul(8, 0, "cpu")
    for weight in weights:
        matmul(x, weight, scale).asnumpy()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for weight in weights:
            matmul(x, weight, scale).asnumpy()
        times.append((time.perf_counter() - start) / count)
    rate = n * k / statistics.median(times)                             # int8 weights (bytes) per second
    per_token = _decode_bytes(config)
    # the float32 bytes a token reads stream at about the same bytes per second at best
    return dict(int8_bytes_per_s=rate, decode_bytes=per_token,
                decode_tok_s_ceiling=rate / (per_token["quantized"] + per_token["float"]))


WORKERS = {"quantize": worker_quantize, "read": worker_read, "predict": worker_predict, "ceiling": worker_ceiling}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        C.write_result(WORKERS[a.worker](a))
        return 0
    steps = [s for s in a.steps.split(",") if s]
    unknown = set(steps) - set(WORKERS)
    if unknown:
        raise SystemExit(f"--steps: unknown {sorted(unknown)}; choose from {sorted(WORKERS)}")
    # the workers run in a scratch directory: they get the folders as absolute paths (a later flag wins)
    forward = [arg for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--verbose"] + \
        ["--source", os.path.abspath(a.source), "--out", os.path.abspath(a.out)]
    print(C.machine_line())
    results = {}
    for step in steps:
        results[step] = C.run_worker(SCRIPT, forward + ["--worker", step], step, verbose=a.verbose)
        print(f"{step}: {json.dumps(results[step])}", flush=True)
    lines = []
    if "quantize" in results:
        q = results["quantize"]
        lines.append(f"quantize: {q['input_bytes'] / 1e9:.1f} GB -> {q['output_bytes'] / 1e9:.1f} GB in "
                     f"{q['seconds']:.0f} s ({q['input_bytes'] / q['seconds'] / 1e6:.0f} MB/s read), peak RSS "
                     f"{q['peak_rss'] / GIB:.2f} GiB (imports {q['rss_imports'] / GIB:.2f}; largest input shard "
                     f"{q['largest_input_shard'] / GIB:.2f} GiB)")
    if "predict" in results:
        p = results["predict"]
        read = results.get("read")
        versus = f" ({p['build_load_s'] / read['seconds']:.2f}x reading the files, " \
                 f"{read['seconds']:.0f} s)" if read else ""
        lines.append(f"predict: build + load {p['build_load_s']:.0f} s{versus}; prefill "
                     f"{p['context']} tokens {p['prefill_s']:.1f} s ({p['prefill_tok_s']:.1f} tok/s, chunks of "
                     f"{p['prefill_chunk']}); decode {p['decode_tok_s']:.2f} tok/s; RSS loaded "
                     f"{p['rss_loaded'] / GIB:.2f} GiB, peak {p['peak_rss'] / GIB:.2f} GiB; kernel {p['kernel']}, float parts "
                     f"{p['param_dtype']}")
    if "ceiling" in results:
        c = results["ceiling"]
        lines.append(f"ceiling: the CPU kernel reads {c['int8_bytes_per_s'] / 1e9:.2f} GB/s of int8 weights; a "
                     f"decode token reads {c['decode_bytes']['quantized'] / 1e9:.2f} GB quantized + "
                     f"{c['decode_bytes']['float'] / 1e9:.2f} GB float -> at most {c['decode_tok_s_ceiling']:.2f} "
                     f"tok/s")
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
