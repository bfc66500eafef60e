"""LoRA finetuning through run_mindformer.py (configs/deepseek2/finetune_deepseek2_tiny_lora.yaml) on CPU: the loss
falls and only adapters change; the checkpoint holds base + adapters + the adapters' AdamW state; resuming continues
the same curve; predict merges the adapters; convert_weight.py --reverse merges them (or exports them alone, PEFT
layout); data parallel under msrun gives identical ranks; bad pet_config fields are refused naming the field."""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import LORA_YAML, ROOT, SMALL, TINY_MODEL, losses_of, run_cli, run_cli_here, tiny_fields

pytestmark = pytest.mark.slow               # training or generation runs: not in the everyday loop
ADAPTER = "mindpet_delta_lora"


def _fields(**changes):
    return tiny_fields(LORA_YAML, **changes)


def _pet_config():
    return _fields()["pet_config"]


def _model_yaml(path, **pet_changes):
    """The LoRA YAML with TINY_MODEL applied (for convert_weight.py --config)."""
    with open(LORA_YAML, encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    fields = document["model"]["model_config"]
    fields.update({key.rsplit(".", 1)[-1]: int(value) for key, value in zip(TINY_MODEL[::2], TINY_MODEL[1::2])})
    fields["pet_config"].update(pet_changes)
    path.write_text(yaml.safe_dump(document))
    return str(path)


def _load(path):
    import mindspore as ms
    fmt = "safetensors" if str(path).endswith(".safetensors") else "ckpt"
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path), format=fmt).items()}


@pytest.fixture(scope="module")
def lora_run(dataset, tmp_path_factory):
    """A base model (transformers, HF folder) LoRA-finetuned for 2 epochs; checkpoints at steps 4, 8, 12, 16."""
    from reference import build_reference
    from research.deepseek2.checkpoints.hf_folder import HFCheckpoint
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    tmp = tmp_path_factory.mktemp("lora")
    fields = {k: v for k, v in _fields().items() if k != "pet_config"}
    build_reference(fields, seed=3).save_pretrained(str(tmp / "hf"), safe_serialization=True)
    base = {name: np.array(array) for _, name, array in
            HFCheckpoint(str(tmp / "hf")).iter_parameters(DeepseekV2Config(**fields), progress=False)}
    out = run_cli(["--config", LORA_YAML, "--run_mode", "finetune", "--load_checkpoint", str(tmp / "hf"),
                "--train_data", dataset, "--output_dir", str(tmp / "out"), "--runner_config.epochs", "2", *SMALL,
                "--train_dataset.data_loader.shuffle", "False"], tmp)
    folder = tmp / "out" / "checkpoint" / "rank_0"
    return {"tmp": tmp, "out": out, "base": base, "folder": folder,
            "last": sorted(folder.glob("*.ckpt"), key=os.path.getmtime)[-1]}


def test_lora_finetune_trains_only_adapters(lora_run):
    out, base = lora_run["out"], lora_run["base"]
    assert "LoRA: " in out and "every base weight frozen" in out, out[-3000:]
    losses = [v for _, v in sorted(losses_of(out).items())]
    assert len(losses) == 16, out[-3000:]
    print(f"\nLoRA finetune: loss {np.mean(losses[:4]):.3f} (first 4 steps) -> {np.mean(losses[-4:]):.3f} (last 4)")
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2
    saved = _load(lora_run["last"])
    adapters = sorted(n for n in saved if ADAPTER in n and not n.startswith(("adam_", "moment")))
    from research.deepseek2.lora.config import expected_adapter_shapes
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    expected = expected_adapter_shapes(DeepseekV2Config(**_fields()), _pet_config())
    assert {n: tuple(saved[n].shape) for n in adapters} == expected
    for name, value in base.items():                           # every base weight bit-identical to the start
        np.testing.assert_array_equal(saved[name], value.astype(saved[name].dtype), err_msg=name)
    assert any(np.abs(saved[n]).max() > 0 for n in adapters if n.endswith("_b"))     # B moved away from 0
    states = [n for n in saved if n.startswith(("adam_m.", "adam_v."))]
    assert states and all(ADAPTER in n for n in states), [n for n in states if ADAPTER not in n][:5]


def test_lora_resume_continues_the_same_curve(lora_run, dataset, tmp_path):
    folder = lora_run["folder"]
    step4 = [p for p in folder.glob("*.ckpt") if p.name.endswith("-1_4.ckpt")][0]
    (tmp_path / "stopped" / "rank_0").mkdir(parents=True)
    shutil.copy(step4, tmp_path / "stopped" / "rank_0" / step4.name)
    resumed = run_cli(["--config", LORA_YAML, "--run_mode", "finetune", "--load_checkpoint", str(tmp_path / "stopped"),
                    "--resume_training", "True", "--train_data", dataset, "--output_dir", str(tmp_path / "out"),
                    "--runner_config.epochs", "2", *SMALL, "--train_dataset.data_loader.shuffle", "False"], tmp_path)
    reference, after = losses_of(lora_run["out"]), losses_of(resumed)
    assert after and min(after) >= (1, 5), resumed[-3000:]
    for key, value in after.items():
        assert abs(value - reference[key]) < 1e-4, (key, value, reference[key])


def test_predict_merges_the_adapters(lora_run):
    """predict.build_network with the LoRA pet_config: the plain (latent-cache) model holds W + alpha/r B A; its
    logits equal the LoRA training network's (base + adapters loaded, unmerged) within 1e-5."""
    import mindspore as ms
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    from research.deepseek2.checkpoints import load_checkpoint
    from research.deepseek2.lora.cells import apply_lora
    from research.deepseek2.lora.config import merge_state
    from research.deepseek2.run.predict import build_network
    saved = _load(lora_run["last"])
    weights = {n: v for n, v in saved.items() if ADAPTER not in n and not n.startswith(("adam_", "global", "epoch",
                                                                                         "step", "loss", "scale",
                                                                                         "current", "last"))}
    adapters = {n: v for n, v in saved.items() if ADAPTER in n and not n.startswith("adam_")}
    merged = merge_state(weights, adapters, _pet_config())
    net = build_network(DeepseekV2Config(**_fields(use_past=True, batch_size=1)), str(lora_run["last"]), 1, 0,
                        _pet_config())
    params = {p.name: p.asnumpy() for p in net.get_parameters()}
    changed = 0
    for name, value in merged.items():
        if name in params:
            np.testing.assert_array_equal(params[name], value, err_msg=name)
            changed += not np.array_equal(value, weights[name])
    assert changed >= 8
    ms.set_context(mode=ms.PYNATIVE_MODE)
    lora = DeepseekV2ForCausalLM(DeepseekV2Config(**_fields()))
    apply_lora(lora, _pet_config())
    load_checkpoint(lora, str(lora_run["last"]))
    lora.set_train(False)
    plain = DeepseekV2ForCausalLM(DeepseekV2Config(**_fields()))
    ms.load_param_into_net(plain, {n: ms.Parameter(ms.Tensor(v), name=n) for n, v in merged.items()})
    plain.set_train(False)
    ids = ms.Tensor(np.random.RandomState(0).randint(2, 60, (2, 16)).astype(np.int32))
    np.testing.assert_allclose(plain(ids).asnumpy(), lora(ids).asnumpy(), atol=1e-5, rtol=0)


def test_reverse_merges_or_exports_the_adapters(lora_run, tmp_path):
    """convert_weight.py --reverse with the LoRA YAML: plain HF weights, merged, that transformers loads;
    --adapters_only: the PEFT layout, whose A and B give the same merged weights."""
    from safetensors.numpy import load_file
    from research.deepseek2.lora.config import merge_state
    from research.deepseek2.checkpoints.weight_map import ms_to_hf, is_stacked
    config_yaml = _model_yaml(tmp_path / "lora.yaml")
    convert = os.path.join(ROOT, "research", "deepseek2", "convert_weight.py")
    env = dict(os.environ, PYTHONPATH=ROOT)
    for target, extra in ((tmp_path / "merged", []), (tmp_path / "peft", ["--adapters_only"])):
        proc = subprocess.run([sys.executable, convert, "--reverse", "--mindspore_ckpt_path", str(lora_run["last"]),
                               "--torch_ckpt_path", str(target), "--config", config_yaml, *extra],
                              capture_output=True, text=True, env=env, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr[-3000:]
    saved = _load(lora_run["last"])
    adapters = {n: v for n, v in saved.items() if ADAPTER in n and not n.startswith("adam_")}
    weights = {n: v for n, v in saved.items() if n in lora_run["base"]}
    merged = merge_state(weights, adapters, _pet_config())
    hf = {}
    for file in (tmp_path / "merged").glob("*.safetensors"):
        hf.update(load_file(str(file)))
    assert not [n for n in hf if "lora" in n or "adam" in n]
    for name, value in merged.items():
        if is_stacked(name):
            for e in range(value.shape[0]):
                np.testing.assert_array_equal(hf[ms_to_hf(name, e)], value[e])
        else:
            np.testing.assert_array_equal(hf[ms_to_hf(name)], value, err_msg=name)
    from transformers import DeepseekV2ForCausalLM as HFModel
    HFModel.from_pretrained(str(tmp_path / "merged"))
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    import json
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["r"] == 8 and peft_config["lora_alpha"] == 16 and peft_config["peft_type"] == "LORA"
    scaling = peft_config["lora_alpha"] / peft_config["r"]
    wo = "model.layers.1.self_attn.o_proj"
    a, b = peft[f"base_model.model.{wo}.lora_A.weight"], peft[f"base_model.model.{wo}.lora_B.weight"]
    base = lora_run["base"]["model.layers.1.attention.wo.weight"].astype(np.float64)
    np.testing.assert_allclose(base + scaling * b.astype(np.float64) @ a.astype(np.float64),
                               hf[f"{wo}.weight"], atol=1e-6)
    assert len(peft) == 2 * len([n for n in adapters if n.endswith("_a")])


@pytest.mark.parametrize("override, needle", [
    (["--model.model_config.pet_config.pet_type", "prefix"], "pet_config.pet_type = 'prefix'"),
    (["--model.model_config.pet_config.lora_rank", "0"], "pet_config.lora_rank = 0"),
    (["--model.model_config.pet_config.target_modules", "no_such_cell"], "target_modules"),
])
def test_bad_pet_config_is_refused_naming_the_field(lora_run, dataset, tmp_path, override, needle, capsys):
    out = run_cli_here(["--config", LORA_YAML, "--run_mode", "finetune", "--load_checkpoint",
                        lora_run["tmp"] / "hf", "--train_data", dataset, "--output_dir", tmp_path / "out", *SMALL,
                        *override], capsys, expect=2)
    errors = [line for line in out.splitlines() if line.startswith("run_mindformer.py: error:")]
    assert len(errors) == 1 and needle in errors[0], out[-3000:]
    assert "Traceback" not in out and not (tmp_path / "out" / "checkpoint").exists()


def test_adapters_of_another_rank_are_refused(lora_run, dataset, tmp_path, capsys):
    """A LoRA output (rank 8) loaded by a run with lora_rank 4: refused before anything starts, naming the
    adapter and both shapes."""
    out = run_cli_here(["--config", LORA_YAML, "--run_mode", "finetune", "--load_checkpoint", lora_run["last"],
                        "--train_data", dataset, "--output_dir", tmp_path / "out", *SMALL,
                        "--model.model_config.pet_config.lora_rank", "4"], capsys, expect=2)
    errors = [line for line in out.splitlines() if line.startswith("run_mindformer.py: error:")]
    assert len(errors) == 1 and "mis-shaped" in errors[0] and ADAPTER in errors[0], out[-3000:]
    assert not (tmp_path / "out").exists()


def test_lora_data_parallel_ranks_identical(lora_run, dataset, tmp_path):
    """2 workers under msrun_launcher.sh: both exit 0, parameters identical across ranks, base weights untouched."""
    from _launch import free_ports, launch_env, start_launcher, wait_all, worker_log
    env = launch_env(tmp_path / "mf_default", 3)
    words = [os.path.join(ROOT, "run_mindformer.py"), "--config", LORA_YAML, "--use_parallel", "True",
             "--load_checkpoint", str(lora_run["tmp"] / "hf"), "--run_mode", "finetune", "--train_data", dataset,
             *SMALL, "--runner_config.epochs", "1", "--parallel_config.data_parallel", "2",
             "--runner_config.batch_size", "2", "--train_dataset.batch_size", "2", "--output_dir",
             str(tmp_path / "out")]
    cmd = " ".join(f"'{word}'" if " " in word else word for word in words)
    job = start_launcher("lora_dp", [cmd, "2", str(free_ports(1)[0]), str(tmp_path / "log"), "False", "120"],
                         str(tmp_path), env, str(tmp_path / "lora_dp.console"))
    started = time.monotonic()
    code = wait_all([job], 600)[0]
    print(f"\nLoRA data-parallel job: {time.monotonic() - started:.0f} s, exit {code}")
    logs = [worker_log(tmp_path / "log", rank) for rank in (0, 1)]
    assert code == 0, job.console()[-3000:] + "".join(text[-3000:] for text in logs)
    ckpts = []
    for rank in (0, 1):
        folder = tmp_path / "out" / "checkpoint" / f"rank_{rank}"
        ckpts.append(_load(sorted(folder.glob("*.ckpt"), key=os.path.getmtime)[-1]))
    assert set(ckpts[0]) == set(ckpts[1])
    for name, value in ckpts[0].items():
        assert np.array_equal(value, ckpts[1][name]), f"{name} differs between rank 0 and rank 1"
    for name, value in lora_run["base"].items():
        np.testing.assert_array_equal(ckpts[0][name], value.astype(ckpts[0][name].dtype), err_msg=name)
