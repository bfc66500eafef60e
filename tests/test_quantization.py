"""Weight-only quantization (research/deepseek2/quantization): the settings and their refusals, round to nearest and
int4 packing, the inventory's quantized tensors, convert_weight.py --quantize (msModelSlim's folder layout, tensor by
tensor, nothing left behind on errors), the loaders' refusals, and the quantized model against the reference:
transformers' model holding the dequantized weights gives the same logits (1e-4) and greedy tokens, in graph and
PyNative mode, with the basic-op matmuls and with the CPU kernel, through the latent cache, chunked prefill and a
batch of two."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import reference as R
from conftest import ROOT
from research.deepseek2.errors import CheckpointError, QuantizationError
from research.deepseek2.quantization.rtn import dequantize, pack_int4, quantize, unpack_int4
from research.deepseek2.quantization.settings import parse_quantization_config

CONVERT = os.path.join(ROOT, "research", "deepseek2", "convert_weight.py")
LAYOUTS = {"v2": R.V2_STYLE, "lite": R.LITE_STYLE}
GROUP = 8                                   # divides every input width of the tiny layouts (24, 32, 48, 64, 96)


def settings(dtype="int8", group=0, **more):
    return parse_quantization_config({"weight_dtype": dtype, "group_size": group, **more})


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("config, named", [
    ({"quant_method": "ptq"}, "quant_method = 'ptq'"),
    ({"weight_dtype": "int2"}, "weight_dtype = 'int2'"),
    ({"weight_dtype": "int8", "group_size": -1}, "group_size = -1"),
    ({"weight_dtype": "int4", "group_size": 0}, "group_size = 0"),
    ({"activation_dtype": "int8"}, "activation_dtype = 'int8'"),
    ({"kvcache_dtype": "int8"}, "kvcache_dtype = 'int8'"),
    ({"weight_dtype": "int8", "bits": 8}, "bits = 8"),
    ({"modules_to_not_convert": [3]}, "modules_to_not_convert = [3]"),
])
def test_bad_settings_are_refused_naming_the_key(config, named):
    with pytest.raises(QuantizationError, match="quantization_config." + named.split(" =")[0]) as err:
        parse_quantization_config(config)
    assert named in str(err.value)


def test_defaults_and_the_yaml_form():
    assert parse_quantization_config(None) is None and parse_quantization_config({}) is None
    int8, int4 = parse_quantization_config({"weight_dtype": "int8"}), parse_quantization_config({"weight_dtype": "int4"})
    assert (int8.group_size, int4.group_size) == (0, 128)
    assert (int8.model_quant_type, int4.model_quant_type) == ("W8A16", "W4A16")
    assert parse_quantization_config(int4.to_dict()) == int4
    assert parse_quantization_config({"quant_method": "rtn", "weight_dtype": "int8", "activation_dtype": "None",
                                      "modules_to_not_convert": "shared_experts"}).skips("a.shared_experts.w1")


# ---------------------------------------------------------------------------------------------- round to nearest
@pytest.mark.parametrize("dtype, group", [("int8", 0), ("int8", 16), ("int4", 16)])
def test_round_to_nearest_is_within_half_a_step(dtype, group):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (3, 32, 64)).astype(np.float32)
    w[0, 5] *= 20                                              # an outlier row: its own scale
    w[1, 7] = 0.0                                              # a zero row: scale 0, q 0, exact
    s = settings(dtype, group)
    q, scale = quantize(w, s)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    assert q.shape == ((3, 32, 64) if dtype == "int8" else (3, 16, 64))
    assert scale.shape == (3, 32, 64 // (group or 64))
    back = dequantize(q, scale, s)
    step = np.repeat(scale, (group or 64), axis=-1)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-7)
    assert np.array_equal(back[1, 7], np.zeros(64))
    values = unpack_int4(q) if dtype == "int4" else q
    assert values.min() >= -s.qmax and values.max() <= s.qmax and np.abs(values).max() == s.qmax


def test_int4_packs_two_channels_a_byte_low_nibble_first():
    values = np.array([[-8, 7, 0], [3, -1, -5]], np.int8)          # channels 0 and 1 of one packed row
    packed = pack_int4(values)
    assert packed.shape == (1, 3)
    assert list(packed.view(np.uint8)[0]) == [0x38, 0xF7, 0xB0]    # high nibble channel 1, low nibble channel 0
    assert np.array_equal(unpack_int4(packed), values)


# ---------------------------------------------------------------------------------------------- inventory
def test_the_inventory_holds_projections_quantized_and_the_rest_float():
    from research.deepseek2.planning.inventory import parameters
    fields = dict(R.V2_STYLE, quantization_config=settings("int4", GROUP, modules_to_not_convert=["shared_experts"])
                  .to_dict())
    held = {p.name: p for p in parameters(fields)}
    wo = held["model.layers.1.attention.wo.weight"]
    assert wo.dtype == "int8" and wo.shape == (64 // 2, 48)
    assert held["model.layers.1.attention.wo.weight_scale"].shape == (64, 48 // GROUP)
    assert held["model.layers.1.feed_forward.routed_experts.w2"].shape == (8, 64 // 2, 24)
    assert held["model.layers.1.feed_forward.routed_experts.w2_scale"].shape == (8, 64, 24 // GROUP)
    float_ones = ["model.layers.1.attention.lkv2kv.weight", "model.layers.1.feed_forward.router.weight",
                  "lm_head.weight", "model.tok_embeddings.embedding_weight",
                  "model.layers.1.feed_forward.shared_experts.w1.weight"]              # skipped by name
    assert all(held[name].dtype is None for name in float_ones)
    assert "model.layers.1.feed_forward.shared_experts.w1.weight_scale" not in held


def test_a_group_size_that_does_not_divide_names_the_weight():
    from research.deepseek2.planning.inventory import parameters
    fields = dict(R.V2_STYLE, quantization_config={"weight_dtype": "int8", "group_size": 16})
    with pytest.raises(QuantizationError, match="does not divide the 24 inputs of model.layers.1.feed_forward.routed_experts.w2"):
        list(parameters(fields))


# ---------------------------------------------------------------------------------------------- folders
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{layout: HF folder of a seeded reference model} and {(layout, dtype, group): quantized folder}, made once;
    source "bfloat16": the reference saved in bfloat16 (as released checkpoints are), and its quantized folder."""
    import torch
    from research.deepseek2.quantization.convert import quantize_checkpoint
    tmp = tmp_path_factory.mktemp("quant")
    cache = {}

    def folder(layout, dtype=None, group=0, source="float32"):
        key = (layout, dtype, group, source)
        if key not in cache:
            if dtype is None:
                path = tmp / f"{layout}-{source}"
                model = reference_model(layout, source)
                model = model.to(torch.bfloat16) if source == "bfloat16" else model
                model.save_pretrained(str(path), safe_serialization=True, max_shard_size="100KB")
                (path / "tokenizer.json").write_text("{}")
            else:
                path = tmp / f"{layout}-{dtype}-{group}-{source}"
                quantize_checkpoint(str(folder(layout, source=source)), str(path), settings(dtype, group),
                                    progress=False, max_shard_size=200_000)
            cache[key] = path
        return cache[key]

    return folder


def test_the_folder_is_msmodelslims_layout(made):
    folder = made("v2", "int8", 0)
    names = sorted(os.listdir(folder))
    shards = [n for n in names if n.startswith("quant_model_weight_w8a16-")]
    assert len(shards) > 1 and "quant_model_weight_w8a16.safetensors.index.json" in names
    assert "tokenizer.json" in names                                          # copied for the run
    description = json.loads((folder / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W8A16" and description["version"] == "1.0.0"
    assert description["model.layers.1.self_attn.o_proj.weight"] == "W8A16"
    assert description["model.layers.1.self_attn.o_proj.weight_scale"] == "W8A16"
    assert description["model.layers.1.self_attn.kv_b_proj.weight"] == "FLOAT"
    assert description["model.layers.1.mlp.gate.weight"] == "FLOAT"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == settings("int8").to_dict() and config["quantize"] == "w8a16"
    from safetensors.numpy import load_file
    index = json.loads((folder / "quant_model_weight_w8a16.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(folder / shard)))
    assert set(tensors) == set(description) - {"version", "model_quant_type", "group_size"}
    q, scale = tensors["model.layers.1.mlp.experts.3.up_proj.weight"], \
        tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale"]
    assert q.dtype == np.int8 and scale.shape == (24, 1) and scale.dtype == np.float32
    assert not np.any(tensors["model.layers.1.mlp.experts.3.up_proj.weight_offset"])
    original = R.build_reference(LAYOUTS["v2"], seed=3).state_dict()["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert np.abs(dequantize(q, scale, settings("int8")) - original.numpy()).max() <= scale.max() / 2 + 1e-7


def _cli(*args, tmp_path):
    return subprocess.run([sys.executable, CONVERT, *args, "--no_progress"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3",
                                                LOCAL_DEFAULT_PATH=str(tmp_path / "logs")), check=False)


@pytest.mark.parametrize("flags, named", [(["--quantize", "int3"], "weight_dtype = 'int3'"),
                                          (["--quantize", "int8", "--group_size", "16"],
                                           "does not divide the 24 inputs of model.layers.1.feed_forward.routed_experts.w2"),
                                          (["--quantize", "int4", "--group_size", "0"], "group_size = 0")])
def test_bad_quantize_flags_exit_2_naming_them_and_write_nothing(made, flags, named, tmp_path):
    out = tmp_path / "out"
    proc = _cli("--torch_ckpt_path", str(made("v2")), "--mindspore_ckpt_path", str(out), *flags, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr and not out.exists() and not list(tmp_path.glob("out*"))


def test_the_command_line_and_a_mindspore_input_write_the_same_tensors(made, tmp_path):
    """convert_weight.py --quantize from the HF folder, and --reverse from the MindSpore conversion of it: the
    same tensors, bit for bit (experts stacked and split again on the way)."""
    from safetensors.numpy import load_file
    hf = made("lite")
    assert _cli("--torch_ckpt_path", str(hf), "--mindspore_ckpt_path", str(tmp_path / "ms.ckpt"),
                tmp_path=tmp_path).returncode == 0
    runs = {"hf": ["--torch_ckpt_path", str(hf), "--mindspore_ckpt_path", str(tmp_path / "a")],
            "ms": ["--reverse", "--mindspore_ckpt_path", str(tmp_path / "ms.ckpt"), "--torch_ckpt_path",
                   str(tmp_path / "b"), "--config", str(hf / "config.json")]}
    got = {}
    for key, args in runs.items():
        proc = _cli(*args, "--quantize", "int4", "--group_size", str(GROUP), tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = tmp_path / ("a" if key == "hf" else "b")
        got[key] = {}
        for name in os.listdir(out):
            if name.endswith(".safetensors"):
                got[key].update(load_file(str(out / name)))
    assert set(got["hf"]) == set(got["ms"])
    assert all(np.array_equal(got["hf"][n], got["ms"][n]) for n in got["hf"])


def test_a_training_checkpoint_quantizes_its_weights_and_an_unknown_tensor_is_refused(made, tmp_path):
    """A finetune's .ckpt holds optimizer moments and the step beside the weights: they are skipped (the
    converter's rule); a tensor the model does not have is refused naming it, and nothing is written."""
    import mindspore as ms
    from research.deepseek2 import DeepseekV2Config
    from research.deepseek2.errors import CheckpointError
    from research.deepseek2.quantization.convert import quantize_checkpoint
    hf = made("lite")
    assert _cli("--torch_ckpt_path", str(hf), "--mindspore_ckpt_path", str(tmp_path / "ms.ckpt"),
                tmp_path=tmp_path).returncode == 0
    weights = ms.load_checkpoint(str(tmp_path / "ms.ckpt"))
    state = {"global_step": ms.Parameter(ms.Tensor(np.array([7], np.int32)), name="global_step"),
             "adam_m.lm_head.weight": ms.Parameter(ms.Tensor(weights["lm_head.weight"].asnumpy()),
                                                    name="adam_m.lm_head.weight")}
    ms.save_checkpoint([{"name": n, "data": p} for n, p in {**weights, **state}.items()], str(tmp_path / "train.ckpt"))
    config = DeepseekV2Config(**json.loads((hf / "config.json").read_text()))
    with_state = quantize_checkpoint(str(tmp_path / "train.ckpt"), str(tmp_path / "q"), settings("int8"),
                                     config=config, progress=False)
    plain = quantize_checkpoint(str(tmp_path / "ms.ckpt"), str(tmp_path / "q_plain"), settings("int8"),
                                config=config, progress=False)
    assert with_state["tensors"] == plain["tensors"] and with_state["bytes"] == plain["bytes"]
    bogus = {"model.layers.0.attention.extra.weight": ms.Parameter(ms.Tensor(np.ones((2, 2), np.float32)),
                                                                   name="model.layers.0.attention.extra.weight")}
    ms.save_checkpoint([{"name": n, "data": p} for n, p in {**weights, **bogus}.items()], str(tmp_path / "bad.ckpt"))
    with pytest.raises(CheckpointError, match="model.layers.0.attention.extra.weight"):
        quantize_checkpoint(str(tmp_path / "bad.ckpt"), str(tmp_path / "q_bad"), settings("int8"), config=config,
                            progress=False)
    assert not (tmp_path / "q_bad").exists()


def test_an_already_quantized_folder_is_refused(made, tmp_path):
    from research.deepseek2.quantization.convert import quantize_checkpoint
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_checkpoint(str(made("v2", "int8", 0)), str(tmp_path / "again"), settings("int8"), progress=False)
    assert not (tmp_path / "again").exists()


# ---------------------------------------------------------------------------------------------- loading
def _config(layout, dtype=None, group=0, **knobs):
    from research.deepseek2 import DeepseekV2Config
    quant = settings(dtype, group).to_dict() if dtype else None
    return DeepseekV2Config(**LAYOUTS[layout], quantization_config=quant, **knobs)


def test_a_folder_and_a_yaml_that_disagree_are_refused_naming_both(made):
    from research.deepseek2.checkpoints import check_checkpoint, open_checkpoint
    quantized, plain = open_checkpoint(str(made("v2", "int8", 0))), open_checkpoint(str(made("v2")))
    with pytest.raises(QuantizationError, match=r"holds int8, group_size 0.*says float weights"):
        check_checkpoint(_config("v2"), quantized)
    with pytest.raises(QuantizationError, match=r"holds float weights.*says int8, group_size 0"):
        check_checkpoint(_config("v2", "int8"), plain)
    with pytest.raises(QuantizationError, match=r"holds int8, group_size 0.*says int4, group_size 8"):
        check_checkpoint(_config("v2", "int4", GROUP), quantized)
    check_checkpoint(_config("v2", "int8"), quantized)                      # agreeing: passes


def test_a_missing_scale_and_a_nonzero_offset_are_named(made, tmp_path):
    import shutil
    from safetensors.numpy import load_file, save_file
    from research.deepseek2 import DeepseekV2ForCausalLM
    from research.deepseek2.checkpoints import check_checkpoint, load_checkpoint, open_checkpoint
    for case in ("scale", "offset"):
        folder = tmp_path / case
        shutil.copytree(made("v2", "int8", 0), folder)
        target = "model.layers.2.mlp.experts.5.down_proj.weight_" + case
        shard = next(f for f in folder.glob("*.safetensors") if target in load_file(str(f)))
        tensors = load_file(str(shard))
        if case == "scale":
            del tensors[target]
        else:
            tensors[target] = tensors[target] + 1.0
        save_file(tensors, str(shard))
        if case == "scale":
            index = folder / "quant_model_weight_w8a16.safetensors.index.json"
            data = json.loads(index.read_text())
            del data["weight_map"][target]
            index.write_text(json.dumps(data))
            with pytest.raises(CheckpointError, match="missing: " + target):
                check_checkpoint(_config("v2", "int8"), open_checkpoint(str(folder)))
        else:
            net = DeepseekV2ForCausalLM(_config("v2", "int8"))
            with pytest.raises(CheckpointError, match=target + " is not zero: asymmetric"):
                load_checkpoint(net, str(folder), progress=False)


@pytest.mark.parametrize("dtype, group", [("int8", 0), ("int4", 4)])
def test_tensor_parallel_ranks_load_their_slices_of_the_quantized_folder(made, dtype, group):
    """Two inference ranks (built with local_shape, loaded with load_for_rank from the folder, as a tensor-parallel
    predict loads): every int8 / packed int4 weight and float32 scale is the slice of the whole tensor along the
    inventory's split dimension (int4: pairs of output channels; group-wise scales: their output rows), and the two
    halves make the whole. (Groups of 4: a rank's half of a row-split weight, e.g. the shared experts' w2, must
    hold whole groups; with groups of 8 its 12 inputs of 24 do not, and the build says so naming the weight.)"""
    from research.deepseek2 import DeepseekV2ForCausalLM
    from research.deepseek2.checkpoints import load_checkpoint
    from research.deepseek2.checkpoints.rank_slices import load_for_rank, local_slice
    from research.deepseek2.planning.inventory import inference_split_dim, local_shape, parameters
    config = _config("lite", dtype, group)
    folder = str(made("lite", dtype, group))
    whole = DeepseekV2ForCausalLM(config)
    load_checkpoint(whole, folder, progress=False)
    full = {p.name: p.asnumpy() for p in whole.get_parameters()}
    inventory = {p.name: p for p in parameters(config)}
    checked = 0
    for rank in (0, 1):
        net = DeepseekV2ForCausalLM(config, local_shape(config, 2, rank))
        loaded = load_for_rank(net, folder, rank)
        assert sorted(loaded) == sorted(inventory)
        for param in net.get_parameters():
            if param.name not in inventory:
                continue
            dim = inference_split_dim(inventory[param.name])
            want = full[param.name]
            if dim is not None:
                want = want[(slice(None),) * dim + (local_slice(want.shape[dim], 2, rank),)]
                checked += inventory[param.name].dtype is not None                  # an int8 weight or a scale
            assert param.asnumpy().dtype == want.dtype and np.array_equal(param.asnumpy(), want), param.name
    assert checked > 10
    with pytest.raises(QuantizationError, match="does not divide the 12 inputs of model.layers.1.feed_forward.shared_experts.w2.weight"):
        DeepseekV2ForCausalLM(_config("lite", "int4", 8), local_shape(_config("lite", "int4", 8), 2, 0))


# ---------------------------------------------------------------------------------------------- numerics
def reference_model(layout, source="float32"):
    """transformers' model of seed 3, in float32; source "bfloat16": its weights rounded to bfloat16 (not its rotary
    buffers, which a checkpoint does not hold)."""
    import torch
    model = R.build_reference(LAYOUTS[layout], seed=3)
    if source == "bfloat16":
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16).to(torch.float32))
    return model


def dequantized_reference(layout, folder, quant, source="float32"):
    """transformers' model (seed 3, as the folder's source) holding the folder's dequantized weights, in float32."""
    import torch
    from safetensors.numpy import load_file
    tensors = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            tensors.update(load_file(str(folder / name)))
    model = reference_model(layout, source)
    state = model.state_dict()
    with torch.no_grad():
        for name, param in state.items():
            if name + "_scale" in tensors:
                param.copy_(torch.from_numpy(dequantize(tensors[name], tensors[name + "_scale"], quant)))
    return model


def quantized_net(layout, folder, dtype, group, kernel, **knobs):
    from research.deepseek2 import DeepseekV2ForCausalLM
    from research.deepseek2.checkpoints import load_checkpoint
    net = DeepseekV2ForCausalLM(_config(layout, dtype, group, use_weight_quant_kernel=kernel, **knobs))
    load_checkpoint(net, str(folder), progress=False)
    net.set_train(False)
    return net


CASES = [("v2", "int8", 0, False, "graph"), ("v2", "int4", GROUP, True, "graph"), ("v2", "int8", GROUP, True,
                                                                                   "pynative"),
         ("lite", "int8", GROUP, True, "graph"), ("lite", "int4", GROUP, False, "graph"),
         ("lite", "int4", GROUP, True, "pynative")]


@pytest.mark.parametrize("layout, dtype, group, kernel, mode", CASES,
                         ids=[f"{c[0]}-{c[1]}-g{c[2]}-{'cpu' if c[3] else 'basic'}-{c[4]}" for c in CASES])
def test_logits_equal_the_reference_holding_the_dequantized_weights(made, layout, dtype, group, kernel, mode):
    import mindspore as ms
    folder, quant = made(layout, dtype, group), settings(dtype, group)
    ids = np.random.default_rng(0).integers(0, LAYOUTS[layout]["vocab_size"], (2, 12))
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        ours = quantized_net(layout, folder, dtype, group, kernel)(ms.Tensor(ids, ms.int32)).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    theirs = R.reference_logits(dequantized_reference(layout, folder, quant), ids)
    unquantized = R.reference_logits(R.build_reference(LAYOUTS[layout], seed=3), ids)
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
    assert np.abs(unquantized - theirs).max() > 1e-2          # the weights really changed: not a vacuous parity


@pytest.mark.parametrize("layout, dtype, group, mode", [("lite", "int8", 0, "graph"), ("v2", "int4", GROUP, "pynative")])
def test_bfloat16_float_parts_run_on_a_cpu_as_held(made, layout, dtype, group, mode):
    """param_init_type bfloat16 on a CPU (a released checkpoint's float parts kept in its dtype, half the memory of
    float32): the embedding, lm_head, kv_b_proj and the other float weights stay bfloat16 in the model; the logits
    equal the float32 reference holding the same values, and so do the greedy tokens through the latent cache (its
    absorbed products read kv_b_proj in place) with the prompt prefilled in chunks."""
    import mindspore as ms
    folder, quant = made(layout, dtype, group, "bfloat16"), settings(dtype, group)
    fields = LAYOUTS[layout]
    ids = np.random.default_rng(0).integers(0, fields["vocab_size"], (2, 12))
    prompt = list(np.random.RandomState(1).randint(2, fields["vocab_size"], 9))
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        net = quantized_net(layout, folder, dtype, group, True, param_init_type="bfloat16")
        held = {p.name: p.dtype for p in net.get_parameters()}
        ours = net(ms.Tensor(ids, ms.int32)).asnumpy()
        cached = quantized_net(layout, folder, dtype, group, True, param_init_type="bfloat16", use_past=True,
                               batch_size=1, seq_length=24, prefill_chunk_size=4)
        assert all(layer.attention.latent_kernels for layer in cached.model.layers)
        tokens = list(map(int, cached.generate([prompt], max_new_tokens=6, do_sample=False)[0]))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert held["lm_head.weight"] == held["model.tok_embeddings.embedding_weight"] == ms.bfloat16
    assert held["model.norm_out.weight"] == held["model.layers.0.attention.lkv2kv.weight"] == ms.bfloat16
    ref = dequantized_reference(layout, folder, quant, "bfloat16")
    theirs = R.reference_logits(ref, ids)
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
    expected = list(map(int, R.reference_generate(ref, np.array([prompt]), 6)[0]))
    assert tokens[:len(expected)] == expected


def test_a_bfloat16_linear_and_embedding_on_a_cpu_and_their_gradients():
    """The CPU kernel's bfloat16 product and row gather equal float32 math on the widened weights, forward and
    backward (their gradients are basic ops; the weight's rounded to bfloat16)."""
    import mindspore as ms
    from research.deepseek2.layers import Embedding, Linear
    rng = np.random.default_rng(2)
    linear, table = Linear(96, 37, param_init_type=ms.bfloat16), Embedding(50, 96, param_init_type=ms.bfloat16)
    assert linear.bf16_matmul is not None and table.bf16_gather is not None
    for param in (linear.weight, table.embedding_weight):
        param.set_data(ms.Tensor(rng.normal(0, 0.1, param.shape).astype(np.float32)).astype(ms.bfloat16))
    w, e = (p.astype(ms.float32).asnumpy() for p in (linear.weight, table.embedding_weight))
    x, ids = rng.normal(0, 1, (5, 96)).astype(np.float32), np.array([[3, 49, 3], [0, 7, 3]], np.int32)
    dy, de = rng.normal(0, 1, (5, 37)).astype(np.float32), rng.normal(0, 1, (2, 3, 96)).astype(np.float32)
    y, rows = linear(ms.Tensor(x)).asnumpy(), table(ms.Tensor(ids)).asnumpy()
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)
    assert rows.dtype == np.float32 and np.array_equal(rows, e[ids])
    dx, (dw,) = ms.grad(lambda v: linear(v) * ms.Tensor(dy), 0, linear.trainable_params())(ms.Tensor(x))
    np.testing.assert_allclose(dx.asnumpy(), dy @ w, rtol=1e-5, atol=1e-5)
    bf16 = lambda a: ms.Tensor(a).astype(ms.bfloat16).astype(ms.float32).asnumpy()      # noqa: E731
    np.testing.assert_allclose(dw.astype(ms.float32).asnumpy(), bf16(dy.T @ x), rtol=1e-2)
    (dtable,) = ms.grad(lambda i: table(i) * ms.Tensor(de), None, table.trainable_params())(ms.Tensor(ids))
    expected = np.zeros_like(e)
    np.add.at(expected, ids.reshape(-1), de.reshape(-1, 96))
    np.testing.assert_allclose(dtable.astype(ms.float32).asnumpy(), bf16(expected), rtol=1e-2)
    with pytest.raises(ValueError, match=r"Bf16Matmul: x \[5, 95\], weight \[37, 96\]"):
        linear(ms.Tensor(x[:, :95]))


@pytest.mark.slow
@pytest.mark.parametrize("layout, dtype, group, kernel, mode", [("v2", "int8", 0, True, "graph"),
                                                                 ("lite", "int4", GROUP, False, "pynative")])
def test_greedy_tokens_through_the_cache_chunked_prefill_and_a_batch(made, layout, dtype, group, kernel, mode):
    import mindspore as ms
    folder, quant = made(layout, dtype, group), settings(dtype, group)
    fields = LAYOUTS[layout]
    pad = fields["pad_token_id"]
    a = list(np.random.RandomState(1).randint(2, fields["vocab_size"], 7))
    b = list(np.random.RandomState(2).randint(2, fields["vocab_size"], 11))
    ref = dequantized_reference(layout, folder, quant)
    expected = [list(R.reference_generate(ref, np.array([p]), 8)[0]) for p in (a, b)]
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        net = quantized_net(layout, folder, dtype, group, kernel, use_past=True, batch_size=2, seq_length=32,
                            prefill_chunk_size=4)
        rows = net.generate([a + [pad] * 4, b], max_new_tokens=8, do_sample=False)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert [list(map(int, r))[:len(e)] for r, e in zip(rows, expected)] == [list(map(int, e)) for e in expected]


# ---------------------------------------------------------------------------------------------- run_mindformer.py
@pytest.mark.slow
def test_run_mindformer_predicts_from_the_quantized_folder_as_from_its_dequantized_weights(tmp_path, tok_file,
                                                                                       capsys):
    """convert_weight.py --quantize --reverse from a MindSpore checkpoint, then run_mindformer.py --run_mode predict
    on the folder with the YAML's quantization_config: the text equals a float predict of the same weights
    dequantized (a Hugging Face folder written here), and the same folder under the float YAML is refused naming
    both sides (exit 2)."""
    from safetensors.numpy import load_file, save_file
    from conftest import PREDICT_FLAGS, PREDICT_YAML, predict_fields, run_cli_here, save_predict_model
    from research.deepseek2 import DeepseekV2Config
    checkpoint = save_predict_model(str(tmp_path / "tiny.ckpt"))
    (tmp_path / "config.json").write_text(json.dumps(DeepseekV2Config(**predict_fields()).to_hf_dict()))
    proc = _cli("--quantize", "int4", "--group_size", "8", "--reverse", "--mindspore_ckpt_path", checkpoint,
                "--torch_ckpt_path", str(tmp_path / "q4"), "--config", str(tmp_path / "config.json"),
                tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    quant = settings("int4", 8)
    tensors = {}
    for name in os.listdir(tmp_path / "q4"):
        if name.endswith(".safetensors"):
            tensors.update(load_file(str(tmp_path / "q4" / name)))
    plain = {n: (dequantize(t, tensors[n + "_scale"], quant) if n + "_scale" in tensors else t)
             for n, t in tensors.items() if not n.endswith(("_scale", "_offset"))}
    (tmp_path / "deq").mkdir()
    save_file(plain, str(tmp_path / "deq" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "deq" / "config.json").write_text((tmp_path / "config.json").read_text())
    common = ["--config", PREDICT_YAML, "--run_mode", "predict", "--tokenizer_file", tok_file, "--predict_data",
              "Write a function that adds two numbers.", "--predict_length", "12", *PREDICT_FLAGS]
    texts = {}
    for name, extra in (("q4", ["--model.model_config.quantization_config", "{weight_dtype: int4, group_size: 8}"]),
                        ("deq", [])):
        out = run_cli_here([*common, "--load_checkpoint", str(tmp_path / name), "--output_dir",
                            str(tmp_path / f"out_{name}"), *extra], capsys)
        texts[name] = (tmp_path / f"out_{name}" / "text_generation_result.txt").read_text()
        assert "[output]" in out
    assert texts["q4"] == texts["deq"] and json.loads(texts["q4"])["output"].strip()
    refused = run_cli_here([*common, "--load_checkpoint", str(tmp_path / "q4")], capsys, expect=2)
    assert "holds int4, group_size 8, but model.model_config.quantization_config says float weights" in refused


@pytest.mark.parametrize("dtype, group, kernel", [("int8", 0, "basic"), ("int8", 16, "cpu"), ("int4", 16, "cpu")])
def test_a_projection_errs_by_no_more_than_its_scales_allow(dtype, group, kernel):
    """|x W^T - x W_q^T| <= sum over groups g of (scale_g / 2) * sum_{k in g} |x_k| per output channel: round to
    nearest moves each weight by at most half a step. The bound holds for the quantized projection as the model
    runs it, and is not loose by orders of magnitude (random weights use a good share of it)."""
    import mindspore as ms
    from research.deepseek2.quantization.kernels import WeightQuantMatmul
    quant = settings(dtype, group)
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.05, (64, 96)).astype(np.float32)
    x = rng.normal(0, 1, (7, 96)).astype(np.float32)
    q, scale = quantize(w, quant)
    y = WeightQuantMatmul(quant.bits, group, kernel)(ms.Tensor(x), ms.Tensor(q), ms.Tensor(scale)).asnumpy()
    width = group or 96
    abs_sums = np.abs(x).reshape(7, 96 // width, width).sum(-1)                      # (t, groups)
    bound = abs_sums @ (scale / 2).T                                                 # (t, n)
    error = np.abs(y - x @ w.T)
    assert np.all(error <= bound + 1e-5)
    assert error.max() / bound.max() > 0.01
