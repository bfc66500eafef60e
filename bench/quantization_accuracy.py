"""What weight-only quantization costs in accuracy: held-out loss and teacher-forced agreement with the float model.

A float checkpoint (default: the main job's finetuned tiny model) is quantized by the project's converter
(``quantize_checkpoint``, the code behind ``convert_weight.py --quantize``) once per setting, loaded as
``run_mindformer.py`` loads it (a model built with the YAML's fields plus ``quantization_config``, the project's
loader), and run teacher-forced over the held-out MindRecord (rows as ``code_alpaca_preprocess.py`` writes them).
Per setting:

* held-out loss: mean cross-entropy over the target tokens (labels != -100), and its change against float;
* top-1 agreement: the share of positions whose most likely next token equals the float model's (over the target
  tokens, and over every position);
* max |logit - float logit| over every position.

Two rows quantize the router (``mlp.gate``) too, round to nearest in place on the float model, which the
converter never does: they measure what keeping it float buys. Settings are given as
``name=weight_dtype[:group_size][:modules,to,skip][:router]``, e.g.
``int4-experts=int4:16:self_attn,shared_experts,mlp.gate_proj,mlp.up_proj,mlp.down_proj``.

    python bench/quantization_accuracy.py                          # the main job's checkpoint, the default settings
    python bench/quantization_accuracy.py --json accuracy.json --load_checkpoint CKPT --config YAML --eval_data MR

Results: docs/benchmarks.md ("Weight-only quantization: accuracy").
"""
import argparse
import json
import os
import sys
import tempfile
import time
from typing import List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (bench/common.py: log and env defaults)  pylint: disable=wrong-import-position

ROOT = common.ROOT
DEMO_CKPT = os.path.join(ROOT, "work_dirs", "demo", "output", "checkpoint", "rank_0",
                         "deepseek2_tiny_rank_0-2_239.ckpt")
DEMO_YAML = os.path.join(ROOT, "configs", "deepseek2", "finetune_deepseek2_tiny.yaml")
DEMO_DATA = os.path.join(ROOT, "work_dirs", "demo", "heldout.mindrecord")
# the tiny model's widths are 48 (q_lora_rank), 64 and 128: int4 groups of 16 divide every projection's inputs
EXPERTS_ONLY = "self_attn,shared_experts,mlp.gate_proj,mlp.up_proj,mlp.down_proj"   # the dense FFN of layer 0 too
DEFAULT_SETTINGS = ["int8=int8", "int8-g16=int8:16", "int4-g16=int4:16", f"int4-g16-experts=int4:16:{EXPERTS_ONLY}",
                    "int8+router=int8:0::router", "int4-g16+router=int4:16::router"]


def parse_setting(text: str) -> dict:
    """``name=weight_dtype[:group_size][:modules][:router]`` -> {"name", "quantization_config", "router"}."""
    name, _, spec = text.partition("=")
    parts = spec.split(":") if spec else []
    if not name or not parts or parts[0] not in ("int8", "int4"):
        raise SystemExit(f"--settings {text!r}: expected name=int8|int4[:group_size][:modules,to,skip][:router]")
    config = {"weight_dtype": parts[0]}
    if len(parts) > 1 and parts[1]:
        config["group_size"] = int(parts[1])
    if len(parts) > 2 and parts[2]:
        config["modules_to_not_convert"] = parts[2].split(",")
    return {"name": name, "quantization_config": config, "router": len(parts) > 3 and parts[3] == "router"}


def _rows(mindrecord: str, batch_size: int, pad_id: int, ignore: int):
    """[(input_ids, labels)] batches of the held-out file (the last one filled with rows without targets)."""
    from research.deepseek2.evaluation.heldout import _batches, _open_data  # pylint: disable=protected-access
    data, _, row_len = _open_data(mindrecord)
    return [(ids, labels) for ids, labels, _ in _batches(data, batch_size, row_len, pad_id, ignore, mindrecord)], \
        row_len


def _logits(net, batches) -> np.ndarray:
    """Teacher-forced next-token logits (rows, seq, vocab) float32 of every batch."""
    import mindspore as ms
    net.set_train(False)
    return np.concatenate([net(ms.Tensor(ids[:, :-1])).asnumpy() for ids, _ in batches])


def _build(fields: dict, quantization_config: Optional[dict]):
    from research.deepseek2.deepseek2 import DeepseekV2ForCausalLM
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    return DeepseekV2ForCausalLM(DeepseekV2Config(**dict(fields, quantization_config=quantization_config)))


def _quantize_router(net, quantization_config: dict):
    """Round the router weights (mlp.gate) to nearest in place: what the converter leaves float."""
    import mindspore as ms
    from research.deepseek2.quantization.rtn import dequantize, quantize
    from research.deepseek2.quantization.settings import parse_quantization_config
    settings = parse_quantization_config(quantization_config)
    count = 0
    for param in net.get_parameters():
        if param.name.endswith("feed_forward.router.weight"):
            weight = param.asnumpy()
            q, scale = quantize(weight, settings, param.name)
            param.set_data(ms.Tensor(dequantize(q, scale, settings).astype(weight.dtype)))
            count += 1
    if not count:
        raise RuntimeError("no router weight (feed_forward.router.weight) in the model")


def _scores(logits: np.ndarray, batches, reference: Optional[np.ndarray], ignore: int) -> dict:
    """Held-out loss over the targets, top-1 agreement with ``reference`` and max |logit difference|."""
    labels = np.concatenate([labels[:, 1:] for _, labels in batches])            # (rows, seq)
    target = labels != ignore
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.where(target, labels, 0)[..., None], -1)[..., 0]
    out = {"loss": float(-(picked * target).sum() / target.sum()), "target_tokens": int(target.sum())}
    if reference is not None:
        same = logits.argmax(-1) == reference.argmax(-1)
        # every position of a row up to its last target: the prompt and the answer, not the padding after it
        last = np.where(target.any(1), target.shape[1] - 1 - np.argmax(target[:, ::-1], 1), -1)
        real = np.arange(target.shape[1])[None, :] <= last[:, None]
        out.update(top1_targets=float(same[target].mean()), top1_all=float(same[real].mean()),
                   max_abs_logit_diff=float(np.abs(logits - reference)[real].max()))
    return out


def run(args) -> List[dict]:
    import mindspore as ms
    from tqdm import tqdm
    from mindformers.tools.logger import logger
    from research.deepseek2.checkpoints.load import load_checkpoint
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    from research.deepseek2.evaluation.heldout import read_model_config
    from research.deepseek2.quantization.convert import quantize_checkpoint
    from research.deepseek2.quantization.settings import parse_quantization_config

    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE, device_target="CPU")
    fields = {k: v for k, v in read_model_config(args.config).items() if k not in ("type", "pet_config")}
    float_config = DeepseekV2Config(**dict(fields, quantization_config=None))
    pad_id = float_config.pad_token_id if float_config.pad_token_id is not None else 0
    batches, row_len = _rows(args.eval_data, args.batch_size, pad_id, float_config.ignore_token_id)
    fields.update(seq_length=row_len - 1, batch_size=args.batch_size, use_past=False)
    settings = [parse_setting(s) for s in args.settings]
    results = []
    with tempfile.TemporaryDirectory(prefix="quant_accuracy_") as scratch:
        start = time.perf_counter()
        net = _build(fields, None)
        load_checkpoint(net, args.load_checkpoint)
        reference = _logits(net, batches)
        results.append(dict(name="float", quantization_config=None, router=False,
                            seconds=time.perf_counter() - start,
                            **_scores(reference, batches, None, float_config.ignore_token_id)))
        logger.info(f"float: held-out loss {results[0]['loss']:.4f}")
        for setting in tqdm(settings, desc="settings", unit="setting"):
            start = time.perf_counter()
            quant = setting["quantization_config"]
            folder = os.path.join(scratch, setting["name"])
            quantize_checkpoint(args.load_checkpoint, folder, parse_quantization_config(quant), config=float_config,
                                progress=False)
            held = dict(json.load(open(os.path.join(folder, "config.json"), encoding="utf-8"))["quantization_config"])
            net = _build(fields, held)
            load_checkpoint(net, folder)
            if setting["router"]:
                _quantize_router(net, quant)
            logits = _logits(net, batches)
            result = dict(setting, seconds=time.perf_counter() - start,
                          bytes=sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                                    if f.endswith(".safetensors")),
                          **_scores(logits, batches, reference, float_config.ignore_token_id))
            result["loss_change"] = result["loss"] / results[0]["loss"] - 1.0
            logger.info(f"{setting['name']}: held-out loss {result['loss']:.4f} ({result['loss_change']:+.2%}), "
                        f"top-1 agreement {result['top1_targets']:.4f} (targets) {result['top1_all']:.4f} (all)")
            results.append(result)
            del net, logits
    return results


def table(results: List[dict]) -> str:
    lines = ["| setting | weights file MiB | held-out loss | change | top-1 = float (targets) | top-1 = float (all) "
             "| max abs logit diff |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["name"] == "float":
            lines.append(f"| float | - | {r['loss']:.4f} | - | - | - | - |")
            continue
        lines.append(f"| {r['name']} | {r['bytes'] / 2 ** 20:.2f} | {r['loss']:.4f} | {r['loss_change']:+.2%} | "
                     f"{r['top1_targets']:.4f} | {r['top1_all']:.4f} | {r['max_abs_logit_diff']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEMO_YAML, help="YAML whose model.model_config builds the float model")
    parser.add_argument("--load_checkpoint", default=DEMO_CKPT, help="the float checkpoint (MindSpore or HF)")
    parser.add_argument("--eval_data", default=DEMO_DATA, help="held-out MindRecord (code_alpaca_preprocess.py)")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                        help="name=int8|int4[:group_size][:modules,to,skip][:router]")
    parser.add_argument("--batch_size", type=int, default=10)
    parser.add_argument("--mode", choices=("graph", "pynative"), default="graph")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for path, flag in ((args.config, "--config"), (args.load_checkpoint, "--load_checkpoint"),
                       (args.eval_data, "--eval_data")):
        if not os.path.exists(path):
            parser.error(f"{flag}: no such file: {path} (the defaults are the main job's: bash scripts/demo.sh)")
    results = run(args)
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
