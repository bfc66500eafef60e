"""Checkpoints into train / finetune runs the MindFormers 1.9 way, on CPU through run_mindformer.py.

- A Hugging Face folder (config.json + safetensors) is a checkpoint: finetune's first loss is transformers' loss of
  the same weights on the first batch.
- Never a silent partial load: a folder missing a tensor, a folder of another shape, a .ckpt missing a weight, a
  format other than ``load_ckpt_format`` -> exit 2 with one line naming the tensors, and nothing written.
- ``checkpoint_format: safetensors`` training checkpoints save and resume with the same continued losses.
- MindFormers' own loader reads an HF folder through the model's hooks (convert_weight_dict stacks the experts).
"""
import os
import shutil

import numpy as np
import pytest
import yaml

from conftest import (SMALL, TINY_MODEL, TINY_YAML, losses_of, reference_batch_loss, run_cli, run_cli_here,
                      tiny_fields)

pytestmark = pytest.mark.slow               # training or generation runs: not in the everyday loop

NO_AUX = ["--model.model_config.aux_loss_alpha", "0", "--model.model_config.device_aux_loss_alpha", "0",
          "--model.model_config.comm_aux_loss_alpha", "0"]
IN_ORDER = ["--train_dataset.data_loader.shuffle", "False"]
SAFETENSORS_SAVES = ["--callbacks", "[{type: MFLossMonitor}, {type: LossGuard}, {type: CheckpointMonitor, "
                     "prefix: tiny, save_checkpoint_steps: 4, keep_checkpoint_max: 10, integrated_save: False, "
                     "checkpoint_format: safetensors}]"]


def _hf_folder(folder, seed=3, drop=None, **changes):
    """A transformers DeepseekV2ForCausalLM saved as safetensors (``drop``: a tensor taken out afterwards)."""
    from safetensors.torch import load_file, save_file
    from reference import build_reference
    model = build_reference(tiny_fields(**changes), seed=seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    if drop:
        path = os.path.join(str(folder), "model.safetensors")
        tensors = load_file(path)
        del tensors[drop]
        save_file(tensors, path, metadata={"format": "pt"})
    return model


def _finetune(tmp_path, checkpoint, data, *extra):
    return run_cli(_finetune_args(tmp_path, checkpoint, data, *extra), tmp_path)


def _finetune_refused(tmp_path, checkpoint, data, capsys, *extra):
    """A finetune refused before it starts, run in this process: exit 2, its output."""
    return run_cli_here(_finetune_args(tmp_path, checkpoint, data, *extra), capsys, expect=2)


def _finetune_args(tmp_path, checkpoint, data, *extra):
    return ["--config", TINY_YAML, "--run_mode", "finetune", "--load_checkpoint", str(checkpoint), "--train_data",
            data, "--output_dir", str(tmp_path / "out"), "--runner_config.epochs", "1", *SMALL, *NO_AUX, *IN_ORDER,
            *extra]


def _refused(out, tmp_path, *needles):
    """Exit 2 already checked by _run: one error line naming every needle, no traceback, nothing written."""
    errors = [line for line in out.splitlines() if line.startswith("run_mindformer.py: error:")]
    assert len(errors) == 1, out[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in out
    assert not (tmp_path / "out").exists(), sorted(os.listdir(tmp_path / "out"))


def test_finetune_from_hf_folder_starts_at_the_reference_loss(dataset, tmp_path):
    model = _hf_folder(tmp_path / "hf")
    expected = reference_batch_loss(model, dataset, rows=4)
    out = _finetune(tmp_path, tmp_path / "hf", dataset, "--load_ckpt_format", "safetensors")
    assert "holds every weight of the model" in out and "every weight of the network" in out
    losses = losses_of(out)
    first = losses[min(losses)]
    print(f"\nfinetune from an HF folder: first loss {first:.6f}, transformers on the same batch {expected:.6f}")
    assert abs(expected - np.log(64)) > 0.05, expected           # the folder's weights, not a fresh init
    assert abs(first - expected) < 2e-5, (first, expected)
    assert os.listdir(tmp_path / "out" / "checkpoint" / "rank_0")


def test_finetune_refuses_an_hf_folder_missing_a_tensor(dataset, tmp_path, capsys):
    missing = "model.layers.1.mlp.experts.3.up_proj.weight"
    _hf_folder(tmp_path / "hf", drop=missing)
    out = _finetune_refused(tmp_path, tmp_path / "hf", dataset, capsys)
    _refused(out, tmp_path, "1 tensor(s) missing", missing)


def test_finetune_refuses_an_hf_folder_of_another_shape(dataset, tmp_path, capsys):
    _hf_folder(tmp_path / "hf", hidden_size=48)
    out = _finetune_refused(tmp_path, tmp_path / "hf", dataset, capsys)
    _refused(out, tmp_path, "has shape", "expected")


def test_finetune_refuses_a_ckpt_missing_a_weight(dataset, tmp_path, capsys):
    import mindspore as ms
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    net = DeepseekV2ForCausalLM(DeepseekV2Config(**tiny_fields()))
    params = [{"name": p.name, "data": p} for p in net.get_parameters() if p.name != "model.norm_out.weight"]
    ms.save_checkpoint(params, str(tmp_path / "partial.ckpt"))
    out = _finetune_refused(tmp_path, tmp_path / "partial.ckpt", dataset, capsys)
    _refused(out, tmp_path, "1 missing: model.norm_out.weight")


def test_finetune_refuses_a_format_other_than_load_ckpt_format(dataset, tmp_path, capsys):
    _hf_folder(tmp_path / "hf")
    out = _finetune_refused(tmp_path, tmp_path / "hf", dataset, capsys, "--load_ckpt_format", "ckpt")
    _refused(out, tmp_path, "load_ckpt_format is 'ckpt'", "safetensors")


@pytest.fixture(scope="module")
def safetensors_run(dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sf_train")
    out = run_cli(["--config", TINY_YAML, "--run_mode", "train", "--train_data", dataset, "--output_dir",
                str(tmp / "out"), "--runner_config.epochs", "2", *SMALL, *SAFETENSORS_SAVES], tmp)
    return tmp, out


def test_safetensors_training_checkpoints_resume_the_same_curve(safetensors_run, dataset, tmp_path):
    """checkpoint_format: safetensors saves MindSpore safetensors (every weight + AdamW state); resuming from a
    folder holding the step-4 file continues with the losses of the uninterrupted run."""
    import mindspore as ms
    from research.deepseek2.checkpoints.check import optimizer_state_names
    from research.deepseek2.planning.inventory import expected_shapes
    tmp, out = safetensors_run
    folder = tmp / "out" / "checkpoint" / "rank_0"
    step4 = [name for name in os.listdir(folder) if name.endswith("-1_4.safetensors")]
    assert step4, sorted(os.listdir(folder))
    saved = ms.load_checkpoint(str(folder / step4[0]), format="safetensors")
    weights = expected_shapes(tiny_fields())
    assert {n: tuple(saved[n].shape) for n in weights} == weights
    assert set(optimizer_state_names(weights)) <= set(saved)
    stopped = tmp_path / "stopped" / "rank_0"
    stopped.mkdir(parents=True)
    shutil.copy(folder / step4[0], stopped / step4[0])
    resumed = run_cli(["--config", TINY_YAML, "--run_mode", "train", "--train_data", dataset, "--output_dir",
                    str(tmp_path / "out"), "--runner_config.epochs", "2", "--load_checkpoint",
                    str(tmp_path / "stopped"), "--resume_training", "True", "--load_ckpt_format", "safetensors",
                    *SMALL, *SAFETENSORS_SAVES], tmp_path)
    reference, after = losses_of(out), losses_of(resumed)
    assert after and min(after) >= (1, 5), resumed[-3000:]
    for key, value in after.items():
        assert abs(value - reference[key]) < 1e-4, (key, value, reference[key])


def test_resume_refuses_a_checkpoint_without_optimizer_state(dataset, tmp_path, capsys):
    import mindspore as ms
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    (tmp_path / "weights" / "rank_0").mkdir(parents=True)
    ms.save_checkpoint(DeepseekV2ForCausalLM(DeepseekV2Config(**tiny_fields())),
                       str(tmp_path / "weights" / "rank_0" / "w.ckpt"))
    out = run_cli_here(["--config", TINY_YAML, "--run_mode", "train", "--train_data", dataset, "--output_dir",
                        str(tmp_path / "out"), "--load_checkpoint", str(tmp_path / "weights"), "--resume_training",
                        "True", *SMALL], capsys, expect=2)
    _refused(out, tmp_path, "missing: adam_m.")


def test_mindformers_loader_reads_an_hf_folder_through_the_hooks(tmp_path):
    """What MindFormers' single-process safetensors path does with an HF folder (ms.load_checkpoint of every file,
    the model's convert_weight_dict, load_param_into_net) loads every weight, bit-equal to this project's loader;
    convert_name leaves MindSpore names alone (how MindFormers tells the folders apart)."""
    import glob
    import mindspore as ms
    from mindformers.utils.safetensors.utils import is_hf_safetensors_dir
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    from research.deepseek2.checkpoints import load_checkpoint
    _hf_folder(tmp_path / "hf")
    config = DeepseekV2Config(**tiny_fields())
    ours = DeepseekV2ForCausalLM(config)
    load_checkpoint(ours, str(tmp_path / "hf"))
    theirs = DeepseekV2ForCausalLM(config)
    assert is_hf_safetensors_dir(str(tmp_path / "hf"), theirs)
    params = {}
    for file in sorted(glob.glob(str(tmp_path / "hf" / "*.safetensors"))):
        params.update(ms.load_checkpoint(file, format="safetensors"))
    params = theirs.convert_weight_dict(params, model_config=config)
    not_loaded, unused = ms.load_param_into_net(theirs, params)
    assert not_loaded == [] and unused == []
    for mine, other in zip(ours.get_parameters(), theirs.get_parameters()):
        assert mine.name == other.name
        np.testing.assert_array_equal(mine.asnumpy(), other.asnumpy())
    assert theirs.convert_name("model.layers.1.attention.wo.weight") == "model.layers.1.attention.wo.weight"
    assert theirs.convert_name("adam_m.lm_head.weight") == "adam_m.lm_head.weight"
    assert theirs.convert_name("model.layers.1.self_attn.o_proj.weight") == "model.layers.1.attention.wo.weight"
    index = {"model.layers.1.mlp.experts.0.up_proj.weight": "a.safetensors",
             "model.layers.1.mlp.experts.1.up_proj.weight": "b.safetensors", "lm_head.weight": "b.safetensors"}
    assert theirs.convert_map_dict(index) == {"model.layers.1.feed_forward.routed_experts.w3": "a.safetensors",
                                              "lm_head.weight": "b.safetensors"}
    from research.deepseek2.errors import CheckpointError
    with pytest.raises(CheckpointError, match="mlp.experts.0.*convert the folder first"):
        theirs.obtain_name_map(sorted(glob.glob(str(tmp_path / "hf" / "*.safetensors"))))


def test_tensor_parallel_slices_equal_from_every_kind(tmp_path):
    """load_for_rank (tensor-parallel predict) gives rank 1 of 2 the same slices from the HF folder, a .ckpt file
    and a converted safetensors folder (whose files it reads slice by slice); a folder missing a tensor is refused
    before anything is read."""
    import mindspore as ms
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    from research.deepseek2.convert_weight import convert_hf_to_ms
    from research.deepseek2.errors import CheckpointError
    from research.deepseek2.planning.inventory import local_shape
    from research.deepseek2.checkpoints.rank_slices import load_for_rank
    _hf_folder(tmp_path / "hf")
    convert_hf_to_ms(str(tmp_path / "hf"), str(tmp_path / "tiny.ckpt"))
    convert_hf_to_ms(str(tmp_path / "hf"), str(tmp_path / "ms") + "/")
    config = DeepseekV2Config(**tiny_fields())
    loaded = {}
    for kind in ("hf", "tiny.ckpt", "ms"):
        net = DeepseekV2ForCausalLM(config, local_shape(config, 2, 1))
        load_for_rank(net, str(tmp_path / kind), 1)
        loaded[kind] = {p.name: p.asnumpy() for p in net.get_parameters()}
    wo = "model.layers.0.attention.wo.weight"
    assert loaded["hf"][wo].shape[1] == config.num_attention_heads * config.v_head_dim // 2
    for kind in ("tiny.ckpt", "ms"):
        assert set(loaded[kind]) == set(loaded["hf"])
        for name, value in loaded["hf"].items():
            np.testing.assert_array_equal(loaded[kind][name], value, err_msg=f"{kind}: {name}")
    ms_file = next(f for f in os.listdir(tmp_path / "ms") if f.endswith(".safetensors"))
    partial = {k: v for k, v in ms.load_checkpoint(str(tmp_path / "ms" / ms_file), format="safetensors").items()
               if k != "lm_head.weight"}
    (tmp_path / "broken").mkdir()
    ms.save_checkpoint(partial, str(tmp_path / "broken" / "w.safetensors"), format="safetensors")
    with pytest.raises(CheckpointError, match="1 missing: lm_head.weight"):
        load_for_rank(DeepseekV2ForCausalLM(config, local_shape(config, 2, 1)), str(tmp_path / "broken"), 1)


def test_reverse_takes_a_training_output(safetensors_run, tmp_path):
    """convert_weight.py --reverse on a training checkpoint (weights + AdamW state, safetensors): the optimizer state
    is skipped, the weights come back as Hugging Face tensors bit for bit, and transformers loads the folder."""
    import subprocess
    import sys
    import mindspore as ms
    from safetensors.numpy import load_file
    from research.deepseek2.checkpoints.weight_map import ms_to_hf, is_stacked
    tmp, _ = safetensors_run
    folder = tmp / "out" / "checkpoint" / "rank_0"
    last = sorted(folder.glob("*.safetensors"), key=os.path.getmtime)[-1]
    model_yaml = tmp_path / "model.yaml"
    with open(TINY_YAML, encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    document["model"]["model_config"].update({k.rsplit(".", 1)[-1]: int(v)
                                              for k, v in zip(TINY_MODEL[::2], TINY_MODEL[1::2])})
    model_yaml.write_text(yaml.safe_dump(document))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "research", "deepseek2", "convert_weight.py"),
                           "--reverse", "--mindspore_ckpt_path", str(last), "--torch_ckpt_path", str(tmp_path / "hf"),
                           "--config", str(model_yaml)], capture_output=True, text=True, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(last), format="safetensors").items()}
    hf = {}
    for file in (tmp_path / "hf").glob("*.safetensors"):
        hf.update(load_file(str(file)))
    from research.deepseek2.planning.inventory import expected_shapes
    for name in expected_shapes(tiny_fields()):
        if is_stacked(name):
            for e in range(saved[name].shape[0]):
                np.testing.assert_array_equal(hf[ms_to_hf(name, e)], saved[name][e])
        else:
            np.testing.assert_array_equal(hf[ms_to_hf(name)], saved[name])
    assert not [n for n in hf if "adam" in n]
    from transformers import DeepseekV2ForCausalLM as HFModel
    HFModel.from_pretrained(str(tmp_path / "hf"))
