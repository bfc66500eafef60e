"""research/deepseek2/evaluation/heldout.py: the held-out loss is the mean cross-entropy over every target token (batches
weighted by their token counts, balance losses off), equal to one computed here from the inference logits in
numpy; the CLI prints one line, and refuses bad files with exit 2 and one line naming them."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import CODE_ALPACA as DATA, ROOT, predict_fields as _fields, save_predict_model as _save_model
SCRIPT = os.path.join(ROOT, "research", "deepseek2", "evaluation", "heldout.py")
ROWS, BATCH = 7, 3                     # 7 rows in batches of 3: the last batch is filled up with target-less rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tok):
    """A checkpoint of test_predict's tiny model (vocab 512, seq_length 64) and a MindRecord of Code Alpaca rows
    made by the project's preprocessing with conftest's 512-token tokenizer (prompt masked, replies of different
    lengths)."""
    from research.deepseek2.code_alpaca_preprocess import preprocess, write_mindrecord
    folder = tmp_path_factory.mktemp("evaluate")
    with open(DATA, encoding="utf-8") as handle:
        records = json.load(handle)[:300]
    rows, _ = preprocess(records, tok, _fields()["seq_length"], drop_long=True)
    rows = rows[:ROWS]
    assert len(rows) == ROWS
    data = str(folder / "heldout.mindrecord")
    write_mindrecord(rows, data)
    checkpoint = _save_model(str(folder / "tiny.ckpt"))
    return {"rows": rows, "data": data, "checkpoint": checkpoint, "folder": folder}


@pytest.fixture(scope="module")
def per_row(assets):
    """(sum, count) per row over labels[:, 1:] != -100 of -log softmax(logits)[target], in float64 numpy from the
    logits of the model loaded with mindspore.load_checkpoint and called in inference mode."""
    import mindspore as ms
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    net = DeepseekV2ForCausalLM(DeepseekV2Config(**_fields(init_std=0.5)))
    not_loaded, _ = ms.load_param_into_net(net, ms.load_checkpoint(assets["checkpoint"]))
    assert not not_loaded, not_loaded
    net.set_train(False)
    ids = np.stack([row["input_ids"] for row in assets["rows"]])                    # (rows, seq_length + 1)
    labels = np.stack([row["labels"] for row in assets["rows"]])
    logits = net(ms.Tensor(ids[:, :-1])).asnumpy().astype(np.float64)             # (rows, seq_length, vocab)
    targets, keep = labels[:, 1:], labels[:, 1:] != -100
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    return -(picked * keep).sum(-1), keep.sum(-1)


def test_heldout_loss_is_the_token_mean_cross_entropy(assets, per_row):
    import mindspore as ms
    from research.deepseek2.evaluation.heldout import heldout_loss
    sums, counts = per_row
    assert len(set(counts.tolist())) > 1, "precondition: rows hold different numbers of targets"
    # precondition: the YAML adds a balance loss in training, which heldout_loss must switch off to match
    assert _fields()["aux_loss_alpha"] > 0
    mode = ms.get_context("mode")
    loss, tokens = heldout_loss(_fields(), assets["checkpoint"], assets["data"], batch_size=BATCH, progress=False)
    assert ms.get_context("mode") == mode                              # graph mode only while it runs
    assert tokens == counts.sum()
    assert loss == pytest.approx(sums.sum() / counts.sum(), rel=1e-5, abs=1e-5), (loss, sums.sum() / counts.sum())
    # the check can tell: a mean of per-batch means (the last batch holds one row) is another number
    batch_means = [sums[i:i + BATCH].sum() / counts[i:i + BATCH].sum() for i in range(0, ROWS, BATCH)]
    assert abs(np.mean(batch_means) - loss) > 1e-3


def _cli(*args, tmp_path):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "logs"), GLOG_v="3")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_yaml(assets):
    """A YAML whose model.model_config is the tiny model of the checkpoint."""
    path = assets["folder"] / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": {"model_config": dict(_fields(), type="DeepseekV2Config")}}))
    return str(path)


def test_cli_prints_one_line(assets, tiny_yaml, per_row, tmp_path):
    proc = _cli("--config", tiny_yaml, "--load_checkpoint", assets["checkpoint"], "--eval_data", assets["data"],
                "--batch_size", str(BATCH), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("evaluate:")]
    assert len(lines) == 1, proc.stdout[-2000:]
    sums, counts = per_row
    loss = float(lines[0].split("loss ")[1].split()[0])
    assert loss == pytest.approx(sums.sum() / counts.sum(), rel=1e-5, abs=1e-5), lines[0]
    assert f"over {counts.sum()} target tokens in {ROWS} rows ({assets['checkpoint']})" in lines[0], lines[0]


@pytest.mark.parametrize("case, flag", [("checkpoint", "--load_checkpoint"), ("data", "--eval_data"),
                                        ("config", "--config"), ("batch", "--batch_size"),
                                        ("no_flag", "--eval_data")])
def test_cli_refuses_bad_input_with_one_line(case, flag, assets, tiny_yaml, tmp_path):
    args = {"--config": tiny_yaml, "--load_checkpoint": assets["checkpoint"], "--eval_data": assets["data"],
            "--batch_size": "4"}
    bad = {"batch": "0", "no_flag": ""}.get(case, str(tmp_path / "nope.ckpt"))
    if case == "no_flag":
        del args[flag]
    else:
        args[flag] = bad
    proc = _cli(*[x for pair in args.items() for x in pair], tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("heldout.py: error:"), proc.stderr[-2000:]
    assert flag in lines[0] and bad in lines[0], lines[0]


def test_a_lora_output_is_evaluated_merged(assets):
    """A YAML with a pet_config reads a LoRA training output (base weights + adapters) and merges it as predict
    does: the loss equals that of the merged weights saved as a plain checkpoint, and differs from the base's."""
    import mindspore as ms
    from research.deepseek2 import DeepseekV2Config
    from research.deepseek2.evaluation.heldout import heldout_loss
    from research.deepseek2.lora.config import expected_adapter_shapes, merge_state
    pet_config = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": ".*"}
    base = {name: param.asnumpy() for name, param in ms.load_checkpoint(assets["checkpoint"]).items()}
    rng = np.random.default_rng(0)
    shapes = expected_adapter_shapes(DeepseekV2Config(**_fields()), pet_config)
    adapters = {name: rng.normal(0, 0.2, shape).astype(np.float32) for name, shape in shapes.items()}
    lora, merged = str(assets["folder"] / "lora.ckpt"), str(assets["folder"] / "merged.ckpt")
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in {**base, **adapters}.items()], lora)
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)}
                        for n, a in merge_state(base, adapters, pet_config).items()], merged)
    args = dict(mindrecord=assets["data"], batch_size=BATCH, progress=False)
    with_adapters, _ = heldout_loss(dict(_fields(), pet_config=pet_config), lora, **args)
    assert with_adapters == pytest.approx(heldout_loss(_fields(), merged, **args)[0], rel=1e-6)
    assert abs(with_adapters - heldout_loss(_fields(), assets["checkpoint"], **args)[0]) > 1e-3


def test_a_quantized_folder_is_evaluated_under_its_quantization_config(assets):
    """convert_weight.py's int4 folder of the checkpoint, under a YAML with the folder's quantization_config: the
    loss equals that of its dequantized weights saved as a float Hugging Face folder, and the folder under the float
    fields is refused naming both sides."""
    from safetensors.numpy import load_file, save_file
    from research.deepseek2 import DeepseekV2Config
    from research.deepseek2.errors import EvaluationError
    from research.deepseek2.evaluation.heldout import heldout_loss
    from research.deepseek2.quantization.convert import quantize_checkpoint
    from research.deepseek2.quantization.rtn import dequantize
    from research.deepseek2.quantization.settings import parse_quantization_config
    quant = {"weight_dtype": "int4", "group_size": 16}
    settings = parse_quantization_config(quant)
    folder, plain = assets["folder"] / "int4", assets["folder"] / "int4_dequantized"
    quantize_checkpoint(assets["checkpoint"], str(folder), settings, config=DeepseekV2Config(**_fields()),
                        progress=False)
    tensors = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            tensors.update(load_file(str(folder / name)))
    plain.mkdir()
    save_file({n: (dequantize(t, tensors[n + "_scale"], settings) if n + "_scale" in tensors else t)
               for n, t in tensors.items() if not n.endswith(("_scale", "_offset"))},
              str(plain / "model.safetensors"), metadata={"format": "pt"})
    (plain / "config.json").write_text(json.dumps(DeepseekV2Config(**_fields()).to_hf_dict()))
    args = dict(mindrecord=assets["data"], batch_size=BATCH, progress=False)
    quantized, _ = heldout_loss(dict(_fields(), quantization_config=quant), str(folder), **args)
    assert quantized == pytest.approx(heldout_loss(_fields(), str(plain), **args)[0], rel=1e-5)
    with pytest.raises(EvaluationError, match="holds int4, group_size 16, but model.model_config.quantization_config "
                                              "says float weights"):
        heldout_loss(_fields(), str(folder), **args)
