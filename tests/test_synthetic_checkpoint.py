"""bench/make_synthetic_checkpoint.py: a synthetic Hugging Face DeepSeek-V2 folder that the project's checkpoint
reader and transformers both load as a released one, written tensor by tensor and reproducible from its seed.

Tiny configs (conftest's ``tiny_fields``: V2 layout with a low-rank query; and the Lite layout) with shards of 20 KB,
so every folder has several shards and layers straddle them. The real-size run is by hand (bench/README.md).
"""
import glob
import hashlib
import importlib.util
import json
import math
import os

import numpy as np
import pytest

from conftest import ROOT, TINY_YAML, tiny_fields

SCRIPT = os.path.join(ROOT, "bench", "make_synthetic_checkpoint.py")
LITE_YAML = os.path.join(ROOT, "research", "deepseek2", "deepseek2_lite", "predict_deepseek2_lite.yaml")
SHARD_GB = "0.00002"     # 20 KB: 4 shards for the tiny models
LAYOUTS = {"v2": {}, "lite": dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1)}


@pytest.fixture(scope="module")
def synth():
    """The script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_json(tmp_path, layout):
    """A tiny model's config.json, as the project's reverse conversion writes it."""
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    path = tmp_path / f"{layout}_config.json"
    path.write_text(json.dumps(DeepseekV2Config(**tiny_fields(**LAYOUTS[layout])).to_hf_dict()))
    return str(path)


def _write(synth, out, *args):
    code = synth.main([str(out), "--shard_gb", SHARD_GB, "--no_progress", *map(str, args)])
    assert code == 0
    return str(out)


def _shard_digests(folder):
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest()
            for f in sorted(glob.glob(os.path.join(folder, "*.safetensors")))}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def folder(request, synth, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    return _write(synth, tmp / "hf", "--config", _config_json(tmp, request.param))


def test_folder_is_the_released_layout(folder):
    from research.deepseek2.checkpoints import open_checkpoint
    from research.deepseek2.checkpoints.arrays import BF16
    from research.deepseek2.checkpoints.weight_map import expected_hf_shapes
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    fields = json.load(open(os.path.join(folder, "config.json")))
    config = DeepseekV2Config(**fields)
    checkpoint = open_checkpoint(folder)
    assert checkpoint.kind == "hf" and checkpoint.format == "safetensors"
    checkpoint.check(config)                                     # names and shapes, no extra, none missing
    expected = expected_hf_shapes(config)
    assert set(checkpoint.tensors) == set(expected)
    for name, shape in expected.items():
        assert checkpoint.tensors[name].shape == shape and checkpoint.tensors[name].dtype == BF16, name
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    assert index["metadata"]["total_size"] == sum(math.prod(s) * 2 for s in expected.values())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(os.path.basename(f) for f in glob.glob(os.path.join(folder, "*.safetensors"))) == files
    assert fields["torch_dtype"] == "bfloat16"
    generation = json.load(open(os.path.join(folder, "generation_config.json")))
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (config.bos_token_id, config.eos_token_id)
    assert not [n for n in os.listdir(os.path.dirname(folder)) if ".partial" in n]


def test_values_look_trained(folder):
    from research.deepseek2.checkpoints import open_checkpoint
    checkpoint = open_checkpoint(folder)
    for name, header in checkpoint.tensors.items():
        with checkpoint.open(header.file) as reader:
            values = reader.get(name).astype(np.float32)
        if name.endswith("norm.weight"):
            assert abs(values.mean() - 1) < 0.05 and 0.02 < values.std() < 0.1, name
        else:
            assert abs(values.mean()) < 0.01 and 0.01 < values.std() < 0.05, name


def test_transformers_loads_it_in_save_pretrained_order(folder):
    """transformers' DeepseekV2ForCausalLM takes every tensor (no missing, unexpected or mis-shaped key), and the
    files hold the tensors in the order of its state_dict, which save_pretrained writes."""
    import torch
    from transformers import DeepseekV2ForCausalLM
    from research.deepseek2.checkpoints import open_checkpoint
    from research.deepseek2.checkpoints.safetensors_file import scan_safetensors
    model, info = DeepseekV2ForCausalLM.from_pretrained(folder, dtype="auto", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.dtype == torch.bfloat16                                  # config.json's torch_dtype
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    written = [name for f in files for name in scan_safetensors(f)]
    state = model.state_dict()
    assert written == list(state)
    checkpoint = open_checkpoint(folder)
    for name, header in checkpoint.tensors.items():                      # the same bits
        with checkpoint.open(header.file) as reader:
            assert np.array_equal(reader.get(name).view(np.uint16), state[name].view(torch.int16).numpy().view(
                np.uint16)), name


def test_same_seed_same_bytes(synth, folder, tmp_path):
    config = os.path.join(folder, "config.json")
    again = _write(synth, tmp_path / "again", "--config", config, "--threads", 1)
    assert _shard_digests(again) == _shard_digests(folder)
    other = _write(synth, tmp_path / "other", "--config", config, "--seed", 1)
    assert set(_shard_digests(other)) == set(_shard_digests(folder))
    assert not set(_shard_digests(other).values()) & set(_shard_digests(folder).values())


def test_yaml_config_and_layer_count(synth, tmp_path):
    """A MindFormers YAML's model_config, with --num_layers and fp32."""
    from research.deepseek2.checkpoints import open_checkpoint
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    assert synth.main([str(tmp_path / "yaml"), "--config", TINY_YAML, "--num_layers", "3", "--dtype", "fp32",
                       "--shard_gb", "0.001", "--no_progress"]) == 0
    fields = json.load(open(tmp_path / "yaml" / "config.json"))
    assert fields["num_hidden_layers"] == 3 and fields["torch_dtype"] == "float32"
    checkpoint = open_checkpoint(str(tmp_path / "yaml"))
    checkpoint.check(DeepseekV2Config(**fields))
    assert {h.dtype for h in checkpoint.tensors.values()} == {np.dtype(np.float32)}


def test_default_is_the_released_lite(synth):
    """The default config.json: what the project's DeepseekV2Config and the V2-Lite YAML say (same inventory, the
    same model fields), 31.4 GB in 4 shards of at most 8 GB."""
    import yaml
    from research.deepseek2.checkpoints.weight_map import expected_hf_shapes
    fields = synth.load_fields(None)
    config = synth.build_config(fields)
    yaml_fields = yaml.safe_load(open(LITE_YAML))["model"]["model_config"]
    differ = {key for key in fields if key in yaml_fields and fields[key] != yaml_fields[key]}
    assert not differ, differ
    shapes = expected_hf_shapes(config)
    assert shapes == expected_hf_shapes(synth.build_config({k: v for k, v in yaml_fields.items() if k != "type"}))
    order = synth.released_order(shapes)
    assert order[0] == "model.embed_tokens.weight" and order[-2:] == ["model.norm.weight", "lm_head.weight"]
    total = sum(math.prod(s) * 2 for s in shapes.values())
    assert total == 31_412_968_448
    assert len(synth.plan(order, shapes, "bfloat16", 8 * 10 ** 9)) == 4


def test_row_spread(synth):
    """A V2-Lite expert matrix (1408, 2048): overall std near 0.02, rows' stds spread log-normally, 1 % of the rows
    with outliers of 5-10 times their std (what per-channel int8 quantization meets in trained weights)."""
    bits = synth.make_chunk("model.layers.1.mlp.experts.0.gate_proj.weight", (1408, 2048), "rows", 0, 0, "float32")
    assert bits.shape == (1408, 2048) and bits.dtype == np.float32
    assert 0.018 < bits.std() < 0.023
    row_std = bits.std(axis=1)
    assert row_std.max() / row_std.min() > 2
    peak = np.abs(bits).max(axis=1) / row_std
    assert 3 < int((peak > 5).sum()) < 40 and np.median(peak) < 5
    bf16 = synth.make_chunk("model.layers.1.mlp.experts.0.gate_proj.weight", (1408, 2048), "rows", 0, 0, "bfloat16")
    assert bf16.dtype == np.uint16
    rounded = (bf16.astype(np.uint32) << 16).view(np.float32)            # bf16 bits back to float32
    assert np.all(np.abs(rounded - bits) <= np.abs(bits) * 2 ** -8)      # within half a bf16 ulp


def test_refuses_a_non_empty_out_dir(synth, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert synth.main([str(out), "--config", "/nonexistent.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "not empty" in err
    assert os.listdir(out) == ["keep.txt"] and os.listdir(tmp_path) == ["taken"]


def test_interrupted_run_leaves_nothing(synth, tmp_path, monkeypatch):
    """A run that fails half-way (here: the generator, after some shards are written) removes its staging folder:
    no OUT_DIR, nothing beside it."""
    real, calls = synth.make_chunk, []

    def failing(*args):
        calls.append(args[0])
        if len(calls) == 30:
            raise OSError("disk gone")
        return real(*args)

    monkeypatch.setattr(synth, "make_chunk", failing)
    with pytest.raises(OSError, match="disk gone"):
        synth.main([str(tmp_path / "hf"), "--config", _config_json(tmp_path, "v2"), "--shard_gb", SHARD_GB,
                    "--no_progress", "--threads", "1"])
    assert sorted(os.listdir(tmp_path)) == ["v2_config.json"]
