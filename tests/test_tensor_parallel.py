"""Tensor + expert parallel predict on 2 CPU ranks (mccl AllReduce through msrun_launcher.sh, loopback only).

Each rank holds half the heads, half the FFN widths and half the routed experts, loads only its slices (straight from
the HF safetensors, or from a converted MindSpore checkpoint), keeps the whole latent cache, and the greedy tokens
equal transformers' (and so a single process's: tests/test_parity.py).
"""
import json
import os

import numpy as np
import pytest
import mindspore as ms

import reference as R
from _launch import ROOT, free_port, launch_env, run_launcher, worker_log_tails


def _launch_two_ranks(cmd, tmp_path, **env_extra):
    """Run ``cmd`` on 2 workers through msrun_launcher.sh (loopback); assert both exit 0, showing worker logs."""
    env = launch_env(tmp_path / "logs", 3, PYTHONPATH=ROOT, MS_NODE_TIMEOUT="20", **env_extra)
    logs = str(tmp_path / "msrun_log")
    proc = run_launcher([cmd, "2", str(free_port()), logs, "True", "120"], str(tmp_path), env, timeout=600)
    worker_logs = worker_log_tails(logs, 2000)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + worker_logs


def _prompts(fields):
    """The two prompts (6 and 9 tokens) and the batch that holds them, the first right-padded to 9."""
    a = list(np.random.RandomState(11).randint(2, fields["vocab_size"], 6))
    b = list(np.random.RandomState(12).randint(2, fields["vocab_size"], 9))
    return (a, b), [a + [fields["pad_token_id"]] * 3, b]


@pytest.mark.slow
@pytest.mark.msrun
@pytest.mark.parametrize("layout, source, mode", [("v2", "hf", 0), ("lite", "ms", 1)],
                         ids=["v2-from-hf-graph", "lite-from-ckpt-pynative"])
def test_two_rank_predict_equals_the_reference(layout, source, mode, tmp_path):
    """Both ranks' greedy tokens equal transformers' for each prompt (what a single process gives: test_parity);
    each rank holds half the heads and experts and the whole latent projection, as the inventory says."""
    from research.deepseek2.checkpoints.weight_map import expected_ms_shapes
    fields = R.V2_STYLE if layout == "v2" else R.LITE_STYLE
    ref = R.build_reference(fields)
    prompts, batch = _prompts(fields)
    expected = [list(map(int, R.reference_generate(ref, np.array([p]), 10)[0])) for p in prompts]
    if source == "hf":
        path = str(tmp_path / "hf")
        ref.save_pretrained(path, safe_serialization=True, max_shard_size="200KB")   # several shards
    else:
        path = str(tmp_path / "model.ckpt")
        ms.save_checkpoint(R.build_ms(fields, ref), path)              # PyNative: built and saved, never run
    out = str(tmp_path / "result.json")
    _launch_two_ranks(f"{os.path.join(ROOT, 'tests', '_tp_worker.py')} {layout} {source} {path} {out}", tmp_path,
                      TP_TEST_PROMPTS=json.dumps([list(map(int, p)) for p in batch]), TP_TEST_MODE=str(mode))
    full = expected_ms_shapes(R.DeepseekV2Config(**fields))
    for rank in (0, 1):
        with open(f"{out}.rank{rank}") as handle:
            result = json.load(handle)
        assert result["tokens"] == expected, (rank, result["tokens"], expected)
        shapes = {k: tuple(v) for k, v in result["shapes"].items()}
        assert set(shapes) == set(full)
        wo = next(k for k in full if k.endswith("attention.wo.weight"))
        assert shapes[wo] == (full[wo][0], full[wo][1] // 2)                       # half the heads
        experts = next(k for k in full if k.endswith("routed_experts.w1"))
        assert shapes[experts][0] == full[experts][0] // 2                          # half the experts
        latent = next(k for k in full if k.endswith("attention.kv2l.weight"))
        assert shapes[latent] == full[latent]                                       # latent projection whole


@pytest.mark.slow
@pytest.mark.msrun
def test_run_mindformer_predict_on_two_ranks(tmp_path, tok_file):
    """run_mindformer.py --use_parallel True under msrun_launcher.sh: 2 ranks, model_parallel 2, same text."""
    import shlex
    from conftest import PREDICT_FLAGS as FLAGS, PREDICT_YAML, run_cli_status as _subprocess, save_predict_model
    checkpoint = save_predict_model(str(tmp_path / "tiny.ckpt"))
    args = ["--config", PREDICT_YAML, "--load_checkpoint", checkpoint, "--tokenizer_file", tok_file,
            "--predict_data", "Write a function that adds two numbers.", "--predict_length", "8", "--mode", "1",
            *FLAGS]
    code, out, err = _subprocess(args + ["--output_dir", str(tmp_path / "single")], tmp_path)
    assert code == 0, out[-1500:] + err[-1500:]
    _launch_two_ranks(shlex.join([os.path.join(ROOT, "run_mindformer.py"), *args, "--use_parallel", "True",
                                  "--parallel_config.model_parallel", "2", "--output_dir", str(tmp_path / "tp")]),
                      tmp_path)
    single = (tmp_path / "single" / "text_generation_result.txt").read_text()
    parallel = (tmp_path / "tp" / "text_generation_result.txt").read_text()
    assert json.loads(single)["output"] and parallel == single
