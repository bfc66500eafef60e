"""Weight conversion Hugging Face <-> MindSpore for DeepSeek-V2 (convert_weight.py, checkpoint_io.py and its ckpt_*).

Tiny HF models are built with transformers' own DeepseekV2ForCausalLM, saved in every layout the converter reads
(single safetensors, sharded safetensors, pytorch_model.bin, bf16), converted, and compared tensor by tensor.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("LOCAL_DEFAULT_PATH", tempfile.mkdtemp(prefix="mf_log_"))  # keep mindformers' logs out of cwd

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import nn, Parameter, ParameterTuple, Tensor  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import DeepseekV2Config as HFConfig, DeepseekV2ForCausalLM as HFModel  # noqa: E402

from research.deepseek2.checkpoints import ckpt_file, safetensors_file  # noqa: E402
from research.deepseek2.checkpoints.arrays import BF16  # noqa: E402
from research.deepseek2.checkpoints.checkpoint import MS_INDEX_NAME, MS_NAME_MAP, MindSporeCheckpoint  # noqa: E402
from research.deepseek2.checkpoints.load import load_checkpoint, read_checkpoint  # noqa: E402
from research.deepseek2.errors import CheckpointError  # noqa: E402
from research.deepseek2.convert_weight import (convert_hf_to_ms, convert_ms_to_hf, load_model_config,  # noqa: E402
                                               main, name_map_markdown, parse_size)
from research.deepseek2.deepseek2_config import DeepseekV2Config  # noqa: E402
from research.deepseek2.checkpoints.weight_map import expected_ms_shapes, hf_to_ms, is_stacked  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "research", "deepseek2", "convert_weight.py")
TINY = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
            first_k_dense_replace=1, moe_intermediate_size=16, intermediate_size=48, n_shared_experts=1)
VARIANTS = {
    "qlora_greedy": dict(TINY, num_hidden_layers=2, q_lora_rank=16, topk_method="greedy"),
    "lite_grouped": dict(TINY, num_hidden_layers=3, q_lora_rank=None, topk_method="group_limited_greedy",
                         n_group=2, topk_group=1),
}


def _build_hf(kind: str, seed: int = 0) -> HFModel:
    torch.manual_seed(seed)
    model = HFModel(HFConfig(**VARIANTS[kind])).eval()
    with torch.no_grad():
        for param in model.parameters():  # random norms too, so a swapped tensor cannot go unnoticed
            param.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{layout: (folder, state_dict)}: the layouts the converter must read."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in VARIANTS:
        model = _build_hf(kind)
        model.save_pretrained(root / kind)
        out[kind] = (str(root / kind), {k: v.clone() for k, v in model.state_dict().items()})
    model = _build_hf("qlora_greedy")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    out["sharded"] = (str(root / "sharded"), out["qlora_greedy"][1])
    model.save_pretrained(root / "bin", safe_serialization=False)
    out["bin"] = (str(root / "bin"), out["qlora_greedy"][1])
    model.save_pretrained(root / "bin_sharded", safe_serialization=False, max_shard_size="30KB")
    assert os.path.isfile(root / "bin_sharded" / "pytorch_model.bin.index.json")
    out["bin_sharded"] = (str(root / "bin_sharded"), out["qlora_greedy"][1])
    model = model.to(torch.bfloat16)
    model.save_pretrained(root / "bf16", max_shard_size="40KB")
    out["bf16"] = (str(root / "bf16"), {k: v.clone() for k, v in model.state_dict().items()})
    return out


def _config(folder) -> DeepseekV2Config:
    return load_model_config(os.path.join(folder, "config.json"))


# MindSpore names are spelled by weight_map only: derive them from the HF names the tests use
LM_HEAD = hf_to_ms("lm_head.weight")[0]
EXPERTS_W1 = hf_to_ms("model.layers.1.mlp.experts.0.gate_proj.weight")[0]  # layer 1's stacked routed experts


def _np(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(BF16)
    return tensor.contiguous().numpy()


def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint8) if array.dtype.itemsize == 1 else array.view(f"u{array.dtype.itemsize}")


def _check_against_hf(params: dict, state: dict, config):
    """Every MindSpore parameter equals its HF tensor(s) bit for bit; names and shapes are the expected ones."""
    expected = expected_ms_shapes(config)
    assert set(params) == set(expected)
    seen = set()
    for name, array in params.items():
        assert tuple(array.shape) == tuple(expected[name]), name
        if is_stacked(name):
            for e in range(config.n_routed_experts):
                hf_name = [k for k in state if hf_to_ms(k) == (name, e)][0]
                np.testing.assert_array_equal(_bits(array[e]), _bits(_np(state[hf_name])))
                seen.add(hf_name)
        else:
            hf_name = [k for k in state if hf_to_ms(k) == (name, None)][0]
            np.testing.assert_array_equal(_bits(array), _bits(_np(state[hf_name])))
            seen.add(hf_name)
    assert seen == set(state)


def _ms_load(path) -> dict:
    """mindspore.load_checkpoint (MindSpore's own reader, not ours; format by the suffix) -> {name: numpy}."""
    fmt = "safetensors" if str(path).endswith(".safetensors") else "ckpt"
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path), format=fmt).items()}


def _leftovers(folder) -> list:
    return [n for n in os.listdir(folder) if "partial" in n]


class DummyNet(nn.Cell):
    """A Cell holding exactly the given parameters (names kept, zeros)."""

    def __init__(self, shapes, dtype=np.float32):
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple([Parameter(Tensor(np.zeros(s, dtype)), name=n) for n, s in shapes.items()])


# ---------------------------------------------------------------------------------------------------- HF -> MS
@pytest.mark.parametrize("layout", ["qlora_greedy", "lite_grouped", "sharded", "bin", "bin_sharded", "bf16"])
def test_hf_to_ms_every_tensor(hf, tmp_path, layout):
    folder, state = hf[layout]
    out = tmp_path / "out.ckpt"
    summary = convert_hf_to_ms(folder, str(out), progress=False)
    params = _ms_load(str(out))
    _check_against_hf(params, state, _config(folder))
    assert summary["params"] == len(params)
    if layout == "bf16":  # the source dtype is kept by default
        assert {str(v.dtype) for v in ms.load_checkpoint(str(out)).values()} == {"BFloat16"}
    assert _leftovers(tmp_path) == []


def test_ckpt_writer_byte_identical_to_save_checkpoint(tmp_path, hf):
    rng = np.random.default_rng(0)
    tensors = {"b.weight": rng.standard_normal((3, 5)).astype(np.float32).astype(BF16),
               "a.weight": rng.standard_normal((4,)).astype(np.float16),
               "c.weight": rng.standard_normal((2, 3, 4)).astype(np.float32),
               "d.count": np.arange(6, dtype=np.int32).reshape(2, 3), "e.scalar": np.array(1.5, np.float32)}
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in tensors.items()], str(tmp_path / "ref.ckpt"))
    with ckpt_file.CkptWriter(str(tmp_path / "ours.ckpt")) as writer:
        for name, array in tensors.items():
            writer.write(name, array)
    assert (tmp_path / "ours.ckpt").read_bytes() == (tmp_path / "ref.ckpt").read_bytes()
    # and our reader gives the tensors back
    back = dict(ckpt_file.iter_ckpt(str(tmp_path / "ours.ckpt")))
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and np.array_equal(_bits(back[name]), _bits(array))
    # a converted model re-saved by MindSpore in the same order is the same file
    out = tmp_path / "model.ckpt"
    convert_hf_to_ms(hf["bf16"][0], str(out), progress=False)
    loaded = ms.load_checkpoint(str(out))
    ms.save_checkpoint([{"name": k, "data": v} for k, v in loaded.items()], str(tmp_path / "resaved.ckpt"))
    assert (tmp_path / "resaved.ckpt").read_bytes() == out.read_bytes()


def test_ckpt_large_tensor_is_split_like_save_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_file, "CKPT_CHUNK_BYTES", 24)  # split a 64-byte tensor into 24+24+16
    array = np.arange(16, dtype=np.float32).reshape(4, 4)
    with ckpt_file.CkptWriter(str(tmp_path / "x.ckpt")) as writer:
        writer.write("w", array)
        writer.write("v", np.ones(2, np.float16))
    params = _ms_load(str(tmp_path / "x.ckpt"))
    np.testing.assert_array_equal(params["w"], array)
    back = dict(ckpt_file.iter_ckpt(str(tmp_path / "x.ckpt")))
    np.testing.assert_array_equal(back["w"], array)
    assert ckpt_file.scan_ckpt(str(tmp_path / "x.ckpt")) == {"w": ((4, 4), np.float32), "v": ((2,), np.float16)}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_dtype_conversion(hf, tmp_path, dtype):
    folder, state = hf["qlora_greedy"]
    out = tmp_path / "out.ckpt"
    convert_hf_to_ms(folder, str(out), dtype=dtype, progress=False)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    cast_state = {k: v.to(torch_dtype) for k, v in state.items()}  # torch's rounding is the reference
    params = {k: v for k, v in ckpt_file.iter_ckpt(str(out))}
    _check_against_hf(params, cast_state, _config(folder))


def test_bf16_to_fp32_and_back_is_exact(hf, tmp_path):
    folder, state = hf["bf16"]
    convert_hf_to_ms(folder, str(tmp_path / "f32.ckpt"), dtype="fp32", progress=False)
    convert_ms_to_hf(str(tmp_path / "f32.ckpt"), str(tmp_path / "hf"), folder, dtype="bf16", progress=False)
    reread = _read_hf_dir(str(tmp_path / "hf"))
    assert set(reread) == set(state)
    for name, tensor in state.items():
        assert reread[name].dtype == torch.bfloat16 and torch.equal(reread[name], tensor), name


# ---------------------------------------------------------------------------------------------------- MS -> HF
def _read_hf_dir(folder) -> dict:
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(folder, file), framework="pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == file
                out[key] = f.get_tensor(key)
    assert set(out) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


@pytest.mark.parametrize("layout", ["qlora_greedy", "lite_grouped", "bf16"])
def test_round_trip_bit_exact_and_loadable_by_transformers(hf, tmp_path, layout):
    folder, state = hf[layout]
    convert_hf_to_ms(folder, str(tmp_path / "ms.ckpt"), progress=False)
    summary = convert_ms_to_hf(str(tmp_path / "ms.ckpt"), str(tmp_path / "back"), folder, max_shard_size="30KB",
                               progress=False)
    assert len(summary["files"]) > 1  # sharded by max_shard_size
    back = _read_hf_dir(str(tmp_path / "back"))
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    # transformers loads it and computes the same logits
    original = HFModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    reloaded = HFModel.from_pretrained(str(tmp_path / "back"), torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(original(ids).logits, reloaded(ids).logits)
    hf_config = json.loads((tmp_path / "back" / "config.json").read_text())
    for key, value in VARIANTS["lite_grouped" if layout == "lite_grouped" else "qlora_greedy"].items():
        assert hf_config[key] == value, key
    assert _leftovers(tmp_path) == []


def test_reverse_from_folder_with_yaml_config_and_cli(hf, tmp_path):
    folder, state = hf["sharded"]
    convert_hf_to_ms(folder, str(tmp_path / "msdir") + "/", progress=False)
    config_json = json.loads(open(os.path.join(folder, "config.json")).read())
    import yaml  # pylint: disable=import-outside-toplevel
    fields = {k: config_json[k] for k in VARIANTS["qlora_greedy"]}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": {"model_config": dict(fields,
                                                                                         type="DeepseekV2Config")}}))
    code = main(["--reverse", "--mindspore_ckpt_path", str(tmp_path / "msdir"), "--torch_ckpt_path",
                 str(tmp_path / "back"), "--config", str(tmp_path / "model.yaml"), "--max_shard_size", "1GB",
                 "--no_progress"])
    assert code == 0
    back = _read_hf_dir(str(tmp_path / "back"))
    assert len(set(json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
                   ["weight_map"].values())) == 1
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


# ---------------------------------------------------------------------------------------------------- folders
def _index_map(folder, fmt) -> dict:
    """{parameter: shard} of a converted folder: param_name_map.json (flat) or deepseek2.ckpt.index.json."""
    if fmt == "safetensors":
        return json.loads((folder / MS_NAME_MAP).read_text())
    return json.loads((folder / MS_INDEX_NAME).read_text())["weight_map"]


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_sharded_output_index_and_loader(hf, tmp_path, fmt):
    """A folder output: one shard per input shard (safetensors by default, .ckpt with fmt='ckpt') + its index;
    every shard read by MindSpore's own reader; the loaders read the folder."""
    folder, state = hf["sharded"]
    config = _config(folder)
    out = tmp_path / "msdir"
    summary = convert_hf_to_ms(folder, str(out) + "/", progress=False, **({} if fmt == "safetensors" else
                                                                          {"fmt": "ckpt"}))
    assert summary["format"] == fmt
    hf_index = json.loads(open(os.path.join(folder, "model.safetensors.index.json")).read())["weight_map"]
    n_in = len(set(hf_index.values()))
    weight_map = _index_map(out, fmt)
    files = sorted(set(weight_map.values()))
    assert 1 < len(files) <= n_in and files == sorted(os.path.basename(f) for f in summary["files"])
    assert sorted(os.listdir(out)) == sorted(files + [MS_NAME_MAP if fmt == "safetensors" else MS_INDEX_NAME])
    stem = "model" if fmt == "safetensors" else "deepseek2"
    assert files == [f"{stem}-{k + 1:05d}-of-{len(files):05d}.{fmt}" for k in range(len(files))]
    assert set(weight_map) == set(expected_ms_shapes(config))
    params = {}
    for file in files:
        shard = _ms_load(str(out / file))  # every shard is a plain .ckpt / .safetensors MindSpore reads
        assert shard and all(weight_map[k] == file for k in shard)
        params.update(shard)
    _check_against_hf(params, state, config)
    if fmt == "ckpt":
        index = json.loads((out / MS_INDEX_NAME).read_text())
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in params.values())
    assert summary["bytes"] == sum(v.nbytes for v in params.values())
    # a layer's stacked experts sit in the output shard of the input shard where its last expert was
    hf_shards = sorted(set(hf_index.values()))
    ms_of_input = {}
    for name, file in weight_map.items():
        if not is_stacked(name):
            rows = [k for k in hf_index if hf_to_ms(k) == (name, None)]
            ms_of_input.setdefault(hf_shards.index(hf_index[rows[0]]), set()).add(file)
    for name, file in weight_map.items():
        if is_stacked(name):
            last = max(hf_shards.index(hf_index[k]) for k in hf_index if hf_to_ms(k)[0] == name)
            assert ms_of_input.get(last, {file}) == {file}, name
    # the loader: folder == single file; into a net; errors list the names
    whole = read_checkpoint(str(out))
    assert set(whole) == set(params)
    for name, array in whole.items():
        np.testing.assert_array_equal(array, params[name])
    net = DummyNet(expected_ms_shapes(config))
    loaded = load_checkpoint(net, str(out))
    assert set(loaded) == set(params)
    for param in net.get_parameters():
        np.testing.assert_array_equal(param.asnumpy(), params[param.name])
    shapes = dict(expected_ms_shapes(config))
    shapes["model.extra.weight"] = (2,)
    del shapes[LM_HEAD]
    with pytest.raises(CheckpointError, match="does not match the net") as err:
        load_checkpoint(DummyNet(shapes), str(out))
    assert "model.extra.weight" in str(err.value) and LM_HEAD in str(err.value)


def _mindspore_reads(path) -> dict:
    """What MindSpore itself reads (not our readers), as MindFormers 1.9 does it: a folder -> every *.safetensors
    in it, each with mindspore.load_checkpoint(f, format="safetensors"), merged; a file -> load_checkpoint by its
    suffix. {name: Parameter}."""
    path = str(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    else:
        files = [path]
    merged = {}
    for file in files:
        params = ms.load_checkpoint(file, format="safetensors" if file.endswith(".safetensors") else "ckpt")
        assert not set(params) & set(merged), file
        merged.update(params)
    return merged


@pytest.mark.parametrize("layout", ["bf16", "sharded", "lite_grouped"])
def test_ms_safetensors_read_by_mindspore_equal_the_ckpt(hf, tmp_path, layout):
    """Folder and single-file safetensors outputs, read with mindspore.load_checkpoint(format="safetensors"), give
    exactly the names, shapes, dtypes and bits of the .ckpt output of the same input (bf16 kept bit for bit)."""
    folder, state = hf[layout]
    convert_hf_to_ms(folder, str(tmp_path / "m.ckpt"), progress=False)
    convert_hf_to_ms(folder, str(tmp_path / "msdir"), progress=False)  # no suffix, no '/': a folder
    convert_hf_to_ms(folder, str(tmp_path / "m.safetensors"), progress=False)
    reference = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(tmp_path / "m.ckpt")).items()}
    _check_against_hf(reference, state, _config(folder))
    for out in ("msdir", "m.safetensors"):
        got = {k: v.asnumpy() for k, v in _mindspore_reads(tmp_path / out).items()}
        assert set(got) == set(reference), out
        for name, array in reference.items():
            assert got[name].dtype == array.dtype and got[name].shape == array.shape, (out, name)
            np.testing.assert_array_equal(_bits(got[name]), _bits(array), err_msg=f"{out} {name}")
        # our reader agrees, and the files carry MindSpore's metadata
        info = MindSporeCheckpoint(str(tmp_path / out)).tensors
        assert {n: (tuple(v[0]), v[1]) for n, v in info.items()} == \
            {n: (a.shape, a.dtype) for n, a in reference.items()}
        for file in MindSporeCheckpoint(str(tmp_path / out)).files:
            with safe_open(file, framework="numpy") as f:
                assert f.metadata() == {"format": "ms", "remove_redundancy": "False"}
    if layout == "bf16":
        assert {str(v.dtype) for v in _mindspore_reads(tmp_path / "msdir").values()} == {"BFloat16"}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("layout", ["bf16", "sharded"])
def test_reverse_from_every_mindspore_form_is_bit_exact(hf, tmp_path, layout):
    """--reverse reads a .ckpt file, a .ckpt folder, a .safetensors file and a safetensors folder (and the
    folders' index files): each gives back the original HF tensors bit for bit."""
    folder, state = hf[layout]
    sources = {"ckpt file": "m.ckpt", "safetensors file": "m.safetensors", "safetensors folder": "st_dir/",
               "ckpt folder": "ckpt_dir/", "safetensors map": f"st_dir/{MS_NAME_MAP}",
               "ckpt index": f"ckpt_dir/{MS_INDEX_NAME}"}
    for kind in ("ckpt file", "safetensors file", "safetensors folder", "ckpt folder"):
        convert_hf_to_ms(folder, str(tmp_path / sources[kind]), progress=False,
                         **({"fmt": "ckpt"} if kind == "ckpt folder" else {}))
    assert any(n.endswith(".ckpt") for n in os.listdir(tmp_path / "ckpt_dir"))
    for k, (kind, source) in enumerate(sources.items()):
        back = tmp_path / f"back{k}"
        assert main(["--reverse", "--mindspore_ckpt_path", str(tmp_path / source), "--torch_ckpt_path", str(back),
                     "--config", folder, "--max_shard_size", "30KB", "--no_progress"]) == 0, kind
        tensors = _read_hf_dir(str(back))
        assert set(tensors) == set(state), kind
        for name, tensor in state.items():
            assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), (kind, name)


def test_mscheckpoint_folder_rules(hf, tmp_path):
    """Without an index every *.safetensors (else *.ckpt) of a folder is read; two kinds of shard or index in one
    folder, and a Hugging Face folder, are refused; a .safetensors file is not handed to the .ckpt reader."""
    folder, state = hf["sharded"]
    config = _config(folder)
    st = tmp_path / "st"
    convert_hf_to_ms(folder, str(st), progress=False)
    expected = {n: tuple(s) for n, s in expected_ms_shapes(config).items()}
    with_map = MindSporeCheckpoint(str(st)).tensors
    os.remove(st / MS_NAME_MAP)
    source = MindSporeCheckpoint(str(st))  # every *.safetensors
    assert source.index is None and len(source.files) > 1
    assert {n: tuple(v[0]) for n, v in source.tensors.items()} == expected
    assert {n: v[2] for n, v in source.tensors.items()} == {n: v[2] for n, v in with_map.items()}
    params = read_checkpoint(source)
    _check_against_hf(params, state, config)
    convert_hf_to_ms(folder, str(tmp_path / "m.ckpt"), progress=False)
    shutil.copy(tmp_path / "m.ckpt", st / "m.ckpt")
    with pytest.raises(CheckpointError, match=r"both \.safetensors and \.ckpt files and no index"):
        MindSporeCheckpoint(str(st))
    ck = tmp_path / "ck"
    convert_hf_to_ms(folder, str(ck), fmt="ckpt", progress=False)
    shutil.copy(ck / MS_INDEX_NAME, tmp_path / "index.json")
    (ck / MS_NAME_MAP).write_text("{}")
    with pytest.raises(CheckpointError, match=f"both {MS_NAME_MAP}.*and {re.escape(MS_INDEX_NAME)}"):
        MindSporeCheckpoint(str(ck))
    assert set(MindSporeCheckpoint(str(ck / MS_INDEX_NAME)).tensors) == set(expected)  # named: fine
    with pytest.raises(CheckpointError, match="a Hugging Face folder"):
        MindSporeCheckpoint(folder)
    with pytest.raises(CheckpointError, match=r"a safetensors file, not a \.ckpt"):
        list(ckpt_file.iter_ckpt(str(tmp_path / "m.safetensors.missing.safetensors")))
    # an entry of the map naming a shard the map does not put it in
    convert_hf_to_ms(folder, str(tmp_path / "st2"), progress=False)
    name_map = json.loads((tmp_path / "st2" / MS_NAME_MAP).read_text())
    files = sorted(set(name_map.values()))
    moved = next(n for n, f in name_map.items() if f == files[0])
    name_map[moved] = files[1]
    (tmp_path / "st2" / MS_NAME_MAP).write_text(json.dumps(name_map))
    with pytest.raises(CheckpointError, match=re.escape(moved) + ".*not listed for this file"):
        MindSporeCheckpoint(str(tmp_path / "st2")).tensors


def test_output_paths_and_format_flag(hf, tmp_path):
    """The suffix decides a file's format; --format only for folders; stale checkpoint files and Hugging Face folders
    are refused as output folders, before anything is written."""
    folder, _ = hf["qlora_greedy"]
    with pytest.raises(CheckpointError, match=r"is a \.safetensors file but --format is ckpt"):
        convert_hf_to_ms(folder, str(tmp_path / "x.safetensors"), fmt="ckpt", progress=False)
    with pytest.raises(CheckpointError, match=r"is a \.ckpt file but --format is safetensors"):
        convert_hf_to_ms(folder, str(tmp_path / "x.ckpt"), fmt="safetensors", progress=False)
    assert main(["--torch_ckpt_path", folder, "--mindspore_ckpt_path", str(tmp_path / "x.ckpt"), "--format",
                 "safetensors", "--no_progress"]) == 1
    assert main(["--reverse", "--torch_ckpt_path", str(tmp_path / "h"), "--mindspore_ckpt_path",
                 str(tmp_path / "x.ckpt"), "--config", folder, "--format", "ckpt", "--no_progress"]) == 1
    assert os.listdir(tmp_path) == []
    assert main(["--torch_ckpt_path", folder, "--mindspore_ckpt_path", str(tmp_path / "d"), "--format", "ckpt",
                 "--no_progress"]) == 0
    assert sorted(os.listdir(tmp_path / "d")) == sorted([MS_INDEX_NAME, "deepseek2-00001-of-00001.ckpt"])
    # the same conversion again replaces its own files; another format's files are in the way
    assert main(["--torch_ckpt_path", folder, "--mindspore_ckpt_path", str(tmp_path / "d"), "--format", "ckpt",
                 "--no_progress"]) == 0
    with pytest.raises(CheckpointError, match=r"holds checkpoint files this conversion would not replace "
                                                   r"\(deepseek2-00001-of-00001\.ckpt, deepseek2\.ckpt\.index\.json\)"):
        convert_hf_to_ms(folder, str(tmp_path / "d"), progress=False)
    hf_copy = _copy(folder, tmp_path / "hf_copy")
    before = sorted(os.listdir(hf_copy))
    with pytest.raises(CheckpointError, match="a Hugging Face folder"):
        convert_hf_to_ms(folder, hf_copy, progress=False)
    assert sorted(os.listdir(hf_copy)) == before and _leftovers(tmp_path) == []


def test_load_hf_checkpoint_into_net(hf, tmp_path):
    folder, state = hf["bf16"]  # bf16 shards into an fp32 net
    config = _config(folder)
    net = DummyNet(expected_ms_shapes(config))
    loaded = load_checkpoint(net, folder)
    assert set(loaded) == set(expected_ms_shapes(config))
    params = {p.name: p.asnumpy() for p in net.get_parameters()}
    assert all(v.dtype == np.float32 for v in params.values())
    _check_against_hf(params, {k: v.float() for k, v in state.items()}, config)
    with pytest.raises(CheckpointError, match=re.escape(LM_HEAD)):
        shapes = dict(expected_ms_shapes(config))
        shapes[LM_HEAD] = (7, 32)
        load_checkpoint(DummyNet(shapes), folder)


def test_safetensors_reader_slices_and_bf16(hf):
    folder, state = hf["bf16"]
    file = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0]
    reader = safetensors_file.SafetensorsReader(os.path.join(folder, file))
    name = [k for k in reader.keys() if len(reader.shape(k)) == 2][0]
    full = reader.get(name)
    assert full.dtype == BF16 and np.array_equal(_bits(full), _bits(_np(state[name])))
    for index in (np.s_[1:5], np.s_[3], np.s_[-1], np.s_[::3], np.s_[5:1:-2], np.s_[2:6, 1:4], (np.s_[:], 2),
                  np.s_[7:3], np.s_[100:200], (np.s_[::-1], np.s_[1::2]), (1, np.s_[-3:]), np.s_[..., 1]):
        part = reader.get(name, index)
        assert part.shape == full[index].shape, index
        np.testing.assert_array_equal(_bits(part), _bits(full[index]), err_msg=str(index))
    assert str(ms.Tensor(reader.get(name, np.s_[0:2])).dtype) == "BFloat16"
    with pytest.raises(IndexError):
        reader.get(name, 10**6)
    reader.close()


def test_safetensors_bf16_through_the_library_both_ways(tmp_path):
    """bf16 without torch: files written by safetensors.numpy are read by SafetensorsReader, files written by
    SafetensorsWriter are read by the library (numpy and torch), bit for bit."""
    from safetensors.numpy import save_file as save_numpy  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(3)
    tensors = {"w": rng.standard_normal((6, 5)).astype(np.float32).astype(BF16),
               "h": rng.standard_normal((4,)).astype(np.float16), "s": np.array(2.5, np.float32).astype(BF16),
               "n": np.arange(6, dtype=np.int32).reshape(3, 2), "e": np.zeros((0, 3), BF16)}
    theirs = str(tmp_path / "theirs.safetensors")
    save_numpy(tensors, theirs, metadata={"format": "pt"})
    with safetensors_file.SafetensorsReader(theirs) as reader:
        assert reader.metadata == {"format": "pt"} and set(reader.keys()) == set(tensors)
        for name, array in tensors.items():
            got = reader.get(name)
            assert reader.dtype(name) == got.dtype == array.dtype and reader.shape(name) == got.shape == array.shape
            np.testing.assert_array_equal(_bits(got), _bits(array), err_msg=name)
        np.testing.assert_array_equal(_bits(reader.get("w", np.s_[::-2, 1:4])), _bits(tensors["w"][::-2, 1:4]))
    ours = str(tmp_path / "ours.safetensors")
    writer = safetensors_file.SafetensorsWriter(ours, [(n, a.dtype, a.shape) for n, a in tensors.items()], {"format": "pt"})
    for name in reversed(list(tensors)):  # any order
        writer.write(name, tensors[name])
    writer.close()
    with safe_open(ours, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        for name, array in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == array.dtype and got.shape == array.shape, name
            np.testing.assert_array_equal(_bits(got), _bits(array), err_msg=name)
    with safe_open(ours, framework="pt") as f:
        assert f.get_tensor("w").dtype == torch.bfloat16
        for name, array in tensors.items():
            np.testing.assert_array_equal(_bits(_np(f.get_tensor(name))), _bits(array), err_msg=name)


def test_safetensors_writer_takes_a_tensor_in_rows(tmp_path):
    """write_rows puts row pieces at their place, in any order; a tensor missing rows fails close() naming it; a
    piece of another dtype, width or past the last row is refused naming the tensor."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((7, 3)).astype(np.float32).astype(BF16)
    path = str(tmp_path / "rows.safetensors")
    writer = safetensors_file.SafetensorsWriter(path, [("w", BF16, (7, 3)), ("b", np.float32, (4,))])
    for start, stop in ((4, 7), (0, 2), (2, 4)):
        writer.write_rows("w", start, w[start:stop])
    writer.write_rows("b", 0, np.arange(4, dtype=np.float32))
    for piece, start in ((w[:2].astype(np.float32), 0), (w[:2, :2], 0), (w[:2], 6)):
        with pytest.raises(CheckpointError, match="'w'"):
            writer.write_rows("w", start, piece)
    writer.close()
    with safe_open(path, framework="numpy") as f:
        np.testing.assert_array_equal(_bits(f.get_tensor("w")), _bits(w))
        np.testing.assert_array_equal(f.get_tensor("b"), np.arange(4, dtype=np.float32))
    partial = safetensors_file.SafetensorsWriter(str(tmp_path / "part.safetensors"), [("w", BF16, (7, 3))])
    partial.write_rows("w", 0, w[:5])
    with pytest.raises(CheckpointError, match="never written: \\['w'\\]"):
        partial.close()


def test_read_into_fills_a_row_of_a_stack_and_refuses_a_misfit(tmp_path):
    """SafetensorsReader.read_into writes a tensor's bytes into an existing array (an expert's row of a stack) bit
    for bit; a wrong dtype, shape or a strided target is refused naming the tensor."""
    rng = np.random.default_rng(6)
    rows = {f"e{k}": rng.standard_normal((3, 4)).astype(np.float32).astype(BF16) for k in range(3)}
    path = str(tmp_path / "rows.safetensors")
    save_file({k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16) for k, v in rows.items()}, path)
    stacked = np.zeros((3, 3, 4), BF16)
    with safetensors_file.SafetensorsReader(path) as reader:
        for k in (2, 0, 1):
            reader.read_into(f"e{k}", stacked[k])
        for target in (np.zeros((3, 4), np.float32), np.zeros((4, 3), BF16), np.zeros((3, 8), BF16)[:, ::2]):
            with pytest.raises(CheckpointError, match="'e0'"):
                reader.read_into("e0", target)
    np.testing.assert_array_equal(_bits(stacked), _bits(np.stack([rows[f"e{k}"] for k in range(3)])))


def test_bf16_to_float32_widens_exactly():
    """cast_array's bf16 -> float32 (integer widening) equals the extension type's cast bit for bit, specials and
    strided input included, into an array of its own (what Tensor.from_numpy can share)."""
    from research.deepseek2.checkpoints.arrays import cast_array
    x = np.random.default_rng(7).standard_normal((64, 48)).astype(np.float32).astype(BF16)
    x[0, :5] = [np.nan, np.inf, -np.inf, -0.0, 1e-40]
    for array in (x, x[::3, 1::2], x[5, 7]):
        got = cast_array(array, np.float32)
        assert got.dtype == np.float32 and got.flags.owndata and got.flags.c_contiguous
        np.testing.assert_array_equal(got.view(np.uint32), np.asarray(array).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("parser", ["mindspore", "streaming"])
def test_iter_ckpt_mindspore_parser_and_streaming_reader_agree(tmp_path, monkeypatch, parser):
    """iter_ckpt hands small files to mindspore.load_checkpoint and streams large ones: same names, dtypes, bits."""
    calls = []
    load = ms.load_checkpoint
    monkeypatch.setattr(ms, "load_checkpoint", lambda *a, **k: calls.append(a) or load(*a, **k))
    if parser == "streaming":
        monkeypatch.setattr(ckpt_file, "MS_PARSER_MAX_BYTES", 0)
    rng = np.random.default_rng(4)
    tensors = {"b.weight": rng.standard_normal((3, 5)).astype(np.float32).astype(BF16),
               "a.weight": rng.standard_normal((4,)).astype(np.float16),
               "c.weight": rng.standard_normal((2, 3, 4)).astype(np.float32),
               "d.count": np.arange(6, dtype=np.int32).reshape(2, 3), "e.scalar": np.array(1.5, np.float32),
               "f.mask": np.array([True, False])}
    ms.save_checkpoint([{"name": k, "data": Tensor(v)} for k, v in tensors.items()], str(tmp_path / "crc.ckpt"),
                       crc_check=True)
    monkeypatch.setattr(ckpt_file, "CKPT_CHUNK_BYTES", 8)  # every tensor above 8 bytes split into pieces
    with ckpt_file.CkptWriter(str(tmp_path / "split.ckpt")) as writer:
        for name, array in tensors.items():
            writer.write(name, array)
    for file in ("crc.ckpt", "split.ckpt"):
        back = list(ckpt_file.iter_ckpt(str(tmp_path / file)))
        assert [n for n, _ in back] == list(tensors), file
        for name, array in back:
            assert array.dtype == tensors[name].dtype and array.shape == tensors[name].shape, (file, name)
            np.testing.assert_array_equal(_bits(array), _bits(tensors[name]), err_msg=f"{file} {name}")
    assert len(calls) == (2 if parser == "mindspore" else 0)


# ---------------------------------------------------------------------------------------------------- errors
def _copy(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _resave(folder, mutate):
    """Rewrite folder/model.safetensors after mutate(state_dict)."""
    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    mutate(state)
    save_file(state, path, metadata={"format": "pt"})


def _assert_no_output(tmp_path, out):
    assert not os.path.exists(out)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case,pattern", [
    ("missing", r"missing: model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight"),
    ("wrong_shape", r"model\.layers\.0\.self_attn\.o_proj\.weight.*shape \(32, 31\), expected \(32, 32\)"),
    ("extra", r"unexpected.*model\.layers\.0\.self_attn\.rotary_emb\.inv_freq"),
    ("extra_expert", r"unexpected.*model\.layers\.1\.mlp\.experts\.4\.up_proj\.weight"),
    ("truncated", r"model\.safetensors.*truncated"),
    ("no_config", r"config\.json.*not found"),
])
@pytest.mark.parametrize("output", ["out.ckpt", "out.safetensors", "out/"])
def test_bad_hf_checkpoints_fail_cleanly(hf, tmp_path, case, pattern, output):
    folder = _copy(hf["qlora_greedy"][0], tmp_path / "src")
    if case == "missing":
        _resave(folder, lambda s: s.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    elif case == "wrong_shape":
        _resave(folder, lambda s: s.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(32, 31)}))
    elif case == "extra":
        _resave(folder, lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}))
    elif case == "extra_expert":
        _resave(folder, lambda s: s.update({"model.layers.1.mlp.experts.4.up_proj.weight": torch.zeros(16, 32)}))
    elif case == "truncated":
        path = os.path.join(folder, "model.safetensors")
        os.truncate(path, os.path.getsize(path) - 100)
    elif case == "no_config":
        os.remove(os.path.join(folder, "config.json"))
    out = str(tmp_path / output.rstrip("/")) + ("/" if output.endswith("/") else "")
    with pytest.raises(CheckpointError, match=pattern):
        convert_hf_to_ms(folder, out, progress=False)
    _assert_no_output(tmp_path, out)
    assert main(["--torch_ckpt_path", folder, "--mindspore_ckpt_path", out, "--no_progress"]) == 1
    _assert_no_output(tmp_path, out)


def test_truncated_shard_in_sharded_checkpoint(hf, tmp_path):
    folder = _copy(hf["sharded"][0], tmp_path / "src")
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[-1]
    os.truncate(os.path.join(folder, shard), 20)
    with pytest.raises(CheckpointError, match=shard):
        convert_hf_to_ms(folder, str(tmp_path / "o.ckpt"), progress=False)
    _assert_no_output(tmp_path, str(tmp_path / "o.ckpt"))


def test_existing_output_folder_keeps_other_files_and_replaces_nothing_on_error(hf, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "README").write_text("keep")
    bad = _copy(hf["qlora_greedy"][0], tmp_path / "bad")
    _resave(bad, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        convert_hf_to_ms(bad, str(out), progress=False)
    assert sorted(os.listdir(out)) == ["README"]
    convert_hf_to_ms(hf["qlora_greedy"][0], str(out), progress=False)
    assert sorted(os.listdir(out)) == sorted(["README", MS_NAME_MAP, "model-00001-of-00001.safetensors"])


@pytest.mark.parametrize("case,pattern", [
    ("missing", r"1 missing: " + re.escape(LM_HEAD)),
    ("extra", r"unexpected.*model\.bogus\.weight"),
    ("wrong_shape", r"1 mis-shaped: " + re.escape(EXPERTS_W1) + r" is \(3, 16, 32\), the model's is \(4, 16, 32\)"),
    ("truncated", r"truncated"),
])
def test_bad_ms_checkpoints_fail_cleanly(hf, tmp_path, case, pattern):
    folder = hf["qlora_greedy"][0]
    src = tmp_path / "ms.ckpt"
    convert_hf_to_ms(folder, str(src), progress=False)
    params = dict(ckpt_file.iter_ckpt(str(src)))
    if case == "missing":
        params.pop(LM_HEAD)
    elif case == "extra":
        params["model.bogus.weight"] = np.zeros(3, np.float32)
    elif case == "wrong_shape":
        assert is_stacked(EXPERTS_W1)
        params[EXPERTS_W1] = params[EXPERTS_W1][:3]
    if case != "truncated":
        with ckpt_file.CkptWriter(str(src)) as writer:
            for name, array in params.items():
                writer.write(name, array)
    else:
        os.truncate(src, os.path.getsize(src) - 10)
    out = tmp_path / "hf_out"
    with pytest.raises(CheckpointError, match=pattern):
        convert_ms_to_hf(str(src), str(out), folder, progress=False)
    _assert_no_output(tmp_path, str(out))


def _point_outside(index_file, tmp_path, escape: str):
    """Make the first weight_map entry of index_file name a real copy of its shard outside the folder.

    Returns the entry's tensor name."""
    index = json.loads(open(index_file).read())
    entries = index["weight_map"] if "weight_map" in index else index  # param_name_map.json is flat
    name, shard = sorted(entries.items())[0]
    outside = tmp_path / ("outside" + os.path.splitext(shard)[1])
    shutil.copy(os.path.join(os.path.dirname(index_file), shard), outside)  # it exists: refused for where it is
    entries[name] = f"../{outside.name}" if escape == "parent" else str(outside)
    with open(index_file, "w") as f:
        json.dump(index, f)
    return name


def _assert_refused(err, index_file, name):
    message = str(err.value)
    assert str(index_file) in message and repr(name) in message and "outside the checkpoint folder" in message


@pytest.mark.parametrize("escape", ["parent", "absolute"])
@pytest.mark.parametrize("layout,index_name", [("sharded", "model.safetensors.index.json"),
                                               ("bin_sharded", "pytorch_model.bin.index.json")])
def test_hf_index_naming_a_shard_outside_its_folder_is_refused(hf, tmp_path, layout, index_name, escape):
    folder = _copy(hf[layout][0], tmp_path / "src")
    index_file = os.path.join(folder, index_name)
    name = _point_outside(index_file, tmp_path, escape)
    out = str(tmp_path / "out.ckpt")
    with pytest.raises(CheckpointError) as err:
        convert_hf_to_ms(folder, out, progress=False)
    _assert_refused(err, index_file, name)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(DummyNet(expected_ms_shapes(_config(folder))), folder)
    _assert_refused(err, index_file, name)
    assert main(["--torch_ckpt_path", folder, "--mindspore_ckpt_path", out, "--no_progress"]) == 1
    _assert_no_output(tmp_path, out)


@pytest.mark.parametrize("escape", ["parent", "absolute"])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_ms_index_naming_a_shard_outside_its_folder_is_refused(hf, tmp_path, escape, fmt):
    folder = hf["sharded"][0]
    msdir = tmp_path / "msdir"
    convert_hf_to_ms(folder, str(msdir) + "/", progress=False, fmt=fmt)
    index_file = msdir / (MS_NAME_MAP if fmt == "safetensors" else MS_INDEX_NAME)
    name = _point_outside(str(index_file), tmp_path, escape)
    out = str(tmp_path / "hf_out")
    for call in (lambda: convert_ms_to_hf(str(msdir), out, folder, progress=False),
                 lambda: read_checkpoint(str(msdir)),
                 lambda: load_checkpoint(DummyNet(expected_ms_shapes(_config(folder))), str(index_file))):
        with pytest.raises(CheckpointError) as err:
            call()
        _assert_refused(err, index_file, name)
    assert main(["--reverse", "--mindspore_ckpt_path", str(msdir), "--torch_ckpt_path", out, "--config", folder,
                 "--no_progress"]) == 1
    _assert_no_output(tmp_path, out)


_WITHOUT_TORCH = """
import sys
from importlib.machinery import PathFinder

class _NoTorch(PathFinder):  # torch is not installed, as far as any import can tell
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == "torch" else PathFinder.find_spec(name, path, target)

sys.meta_path = [_NoTorch if f is PathFinder else f for f in sys.meta_path]
from research.deepseek2.errors import CheckpointError
from research.deepseek2.convert_weight import convert_hf_to_ms, convert_ms_to_hf
src, out, back, bin_dir = sys.argv[1:]
convert_hf_to_ms(src, out, progress=False)
convert_ms_to_hf(out, back, src, max_shard_size="30KB", progress=False)
convert_hf_to_ms(src, out + ".dir", progress=False)
convert_ms_to_hf(out + ".dir", back + "_st", src, max_shard_size="30KB", progress=False)
try:
    convert_hf_to_ms(bin_dir, out + ".bin.ckpt", progress=False)
except CheckpointError as err:
    print("BIN:", err)
assert "torch" not in sys.modules, "torch was imported"
print("NO TORCH OK")
"""


def test_safetensors_and_ckpt_need_no_torch(hf, tmp_path):
    """With torch absent: bf16 safetensors -> .ckpt / MindSpore safetensors folder -> safetensors works; .bin
    weights fail with a clear error."""
    folder, state = hf["bf16"]
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "logs"))
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, folder, str(tmp_path / "m.ckpt"),
                           str(tmp_path / "back"), hf["bin"][0]],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "NO TORCH OK" in proc.stdout, proc.stderr[-3000:]
    assert re.search(r"BIN: .*pytorch_model\.bin: reading pytorch_model\*\.bin weights needs torch", proc.stdout)
    assert not os.path.exists(str(tmp_path / "m.ckpt.bin.ckpt"))
    for out in ("back", "back_st"):
        back = _read_hf_dir(str(tmp_path / out))
        for name, tensor in state.items():
            assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], tensor), (out, name)


def test_cli_flags_and_helpers():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("five")
    table = name_map_markdown()
    assert "`model.layers.{L}.mlp.experts.{E}.gate_proj.weight`" in table
    experts_template = EXPERTS_W1.replace("layers.1.", "layers.{L}.")
    assert f"`{experts_template}`" in table and "(n_routed_experts, out, in)" in table
    assert main(["--reverse", "--mindspore_ckpt_path", "x.ckpt", "--torch_ckpt_path", "y"]) == 1  # needs --config


def test_docs_table_is_current():
    with open(os.path.join(REPO, "docs", "weights.md")) as f:
        assert name_map_markdown() in f.read()


def test_cli_both_invocations(hf, tmp_path):
    """`python research/deepseek2/convert_weight.py` from the repo root and `python convert_weight.py` from its
    folder (upstream habit) both work."""
    folder, state = hf["bin"]
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "logs"))
    env.pop("PYTHONPATH", None)
    runs = [([sys.executable, SCRIPT, "--torch_ckpt_path", folder, "--mindspore_ckpt_path", str(tmp_path / "a.ckpt"),
              "--dtype", "fp32"], REPO),
            ([sys.executable, "convert_weight.py", "--reverse", "--mindspore_ckpt_path", str(tmp_path / "a.ckpt"),
              "--torch_ckpt_path", str(tmp_path / "hf_back"), "--config", folder], os.path.dirname(SCRIPT))]
    for cmd, cwd in runs:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    back = _read_hf_dir(str(tmp_path / "hf_back"))
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


# ---------------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("layout", ["qlora_greedy", "lite_grouped"])
@pytest.mark.parametrize("output", ["m.ckpt", "m.safetensors", "msdir"])
def test_converted_checkpoint_fits_the_model(hf, tmp_path, layout, output):
    """Every output form, read by MindSpore itself (MindFormers' way for a safetensors folder), fills a tiny
    DeepseekV2ForCausalLM with strict_load: nothing left but the buffers, nothing unused; our loaders agree."""
    from research.deepseek2 import DeepseekV2Config as config_cls  # pylint: disable=import-outside-toplevel
    from research.deepseek2 import DeepseekV2ForCausalLM as model_cls  # pylint: disable=import-outside-toplevel
    folder, _ = hf[layout]
    out = tmp_path / output
    convert_hf_to_ms(folder, str(out), progress=False)
    config = config_cls(**json.loads(open(os.path.join(folder, "config.json")).read()), seq_length=16)
    net = model_cls(config)
    params = list(net.get_parameters())
    weights = {p.name: tuple(p.shape) for p in params if p.requires_grad}
    buffers = {p.name for p in params if not p.requires_grad}  # e.g. last_aux_loss: state, not a weight
    ckpt = MindSporeCheckpoint(str(out)).tensors
    assert weights == {n: tuple(v[0]) for n, v in ckpt.items()}
    assert not buffers & set(expected_ms_shapes(_config(folder)))
    not_loaded, unused = ms.load_param_into_net(net, _mindspore_reads(out), strict_load=True)
    assert set(not_loaded) == buffers and unused == []
    assert set(load_checkpoint(net, str(out))) == set(weights)
    net = model_cls(config)
    assert set(load_checkpoint(net, folder)) == set(weights)
    stored = read_checkpoint(str(out))
    for param in net.get_parameters():
        if param.requires_grad:
            np.testing.assert_array_equal(param.asnumpy(), stored[param.name], err_msg=param.name)
