"""run_mindformer.py end to end on CPU (graph mode): training lowers the loss, resume continues the same curve,
a non-finite loss stops the run naming the step, bad command lines fail with one clear line."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "deepseek2", "finetune_deepseek2_tiny.yaml")
LOSS = re.compile(r"Epoch:\[\s*(\d+)/\s*\d+\], step:\[\s*(\d+)/\s*(\d+)\], loss:\[([0-9.eE+-]+|nan|inf)/")
# the tiny model every CLI training test shrinks the YAML to (also tests/test_distributed_train.py)
TINY_MODEL = ["--model.model_config.seq_length", "32", "--model.model_config.hidden_size", "32",
              "--model.model_config.intermediate_size", "64", "--model.model_config.moe_intermediate_size", "16",
              "--model.model_config.kv_lora_rank", "16", "--model.model_config.q_lora_rank", "16",
              "--model.model_config.qk_rope_head_dim", "8", "--model.model_config.qk_nope_head_dim", "8",
              "--model.model_config.v_head_dim", "8", "--model.model_config.vocab_size", "64"]
SMALL = TINY_MODEL + [
    "--runner_config.batch_size", "4", "--train_dataset.batch_size", "4", "--lr_schedule.learning_rate", "0.01",
    "--callbacks", "[{type: MFLossMonitor}, {type: LossGuard}, {type: CheckpointMonitor, prefix: tiny, "
                   "save_checkpoint_steps: 4, keep_checkpoint_max: 10, integrated_save: False}]"]


def _run(args, tmp_path, expect=0):
    env = dict(os.environ, PYTHONPATH=ROOT, LOCAL_DEFAULT_PATH=str(tmp_path / "logs"), GLOG_v="3")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run_mindformer.py"), *args], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-3000:]
    return out


def tiny_fields(yaml_path=TINY_YAML, **changes):
    """The model fields of a tiny CLI run (the YAML's model_config with TINY_MODEL applied, as the CLI builds them;
    ``type`` dropped), as DeepseekV2Config and transformers' config take them."""
    import yaml
    with open(yaml_path, encoding="utf-8") as handle:
        fields = dict(yaml.safe_load(handle)["model"]["model_config"])
    fields.pop("type")
    fields.update({key.rsplit(".", 1)[-1]: int(value) for key, value in zip(TINY_MODEL[::2], TINY_MODEL[1::2])})
    fields.update(changes)
    return fields


def reference_batch_loss(model, data, rows):
    """transformers' mean token loss on the first ``rows`` records of a MindRecord file in file order (inputs
    ids[:-1], targets labels[1:]): what a training run's first step sees with shuffle off."""
    import torch
    import mindspore.dataset as ds
    batch = list(ds.MindDataset(data, columns_list=["input_ids", "labels"], shuffle=False)
                 .create_dict_iterator(output_numpy=True, num_epochs=1))[:rows]
    ids = torch.tensor(np.stack([r["input_ids"] for r in batch]).astype(np.int64))
    labels = torch.tensor(np.stack([r["labels"] for r in batch]).astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits.float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                   ignore_index=-100))


def _losses(out):
    """{(epoch, step): loss} from MindFormers' loss monitor lines."""
    return {(int(m.group(1)), int(m.group(2))): float(m.group(4)) for m in LOSS.finditer(out)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """32 rows of a learnable pattern, seq_length 32 (+1), labels masking the first 4 tokens."""
    from mindspore.mindrecord import FileWriter
    path = str(tmp_path_factory.mktemp("data") / "toy.mindrecord")
    writer = FileWriter(path, 1)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}})
    rng = np.random.RandomState(0)
    rows = []
    for _ in range(32):
        ids = np.tile(rng.randint(2, 60, 4), 9)[:33].astype(np.int32)
        labels = ids.copy()
        labels[:4] = -100
        rows.append({"input_ids": ids, "labels": labels})
    writer.write_raw_data(rows)
    writer.commit()
    return path


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    out = _run(["--config", TINY_YAML, "--run_mode", "train", "--train_data", dataset, "--output_dir",
                str(tmp / "out"), "--runner_config.epochs", "2", *SMALL], tmp)
    return tmp, out


def test_train_loss_falls_and_checkpoints(full_run):
    tmp, out = full_run
    losses = _losses(out)
    assert len(losses) == 16, out[-2000:]                     # 2 epochs x 8 steps
    ordered = [losses[k] for k in sorted(losses)]
    assert np.mean(ordered[-4:]) < np.mean(ordered[:4]) - 0.3
    assert "MoE balance loss" in out                          # LossGuard logs the balance loss
    ckpts = sorted(os.listdir(tmp / "out" / "checkpoint" / "rank_0"))
    assert any(name.endswith("-1_4.ckpt") for name in ckpts), ckpts


def test_checkpoints_hold_weights_and_training_state_only(full_run):
    """Every weight of the inventory is saved; the balance-loss log value and the latent cache are not."""
    import mindspore as ms
    from research.deepseek2.planning.inventory import expected_shapes
    tmp, out = full_run
    folder = tmp / "out" / "checkpoint" / "rank_0"
    saved = ms.load_checkpoint(str(folder / sorted(n for n in os.listdir(folder) if n.endswith(".ckpt"))[-1]))
    fields = dict(zip(TINY_MODEL[::2], TINY_MODEL[1::2]))
    import yaml
    with open(TINY_YAML, encoding="utf-8") as handle:
        model_config = yaml.safe_load(handle)["model"]["model_config"]
    model_config.update({k.rsplit(".", 1)[-1]: int(v) for k, v in fields.items()})
    weights = expected_shapes(model_config)
    assert {n: tuple(saved[n].shape) for n in weights} == weights
    assert not [n for n in saved if "balance" in n or "kv_cache" in n or "aux_loss" in n]
    values = [float(v) for v in re.findall(r"MoE balance loss ([0-9.eE+-]+)", out)]
    assert values and all(v > 0 for v in values)              # the wrapper's value reached the log


def test_resume_continues_the_same_curve(full_run, dataset, tmp_path):
    tmp, out = full_run
    reference = _losses(out)
    folder = tmp / "out" / "checkpoint" / "rank_0"
    step4 = [name for name in os.listdir(folder) if name.endswith("-1_4.ckpt")][0]
    resume_dir = tmp_path / "stopped" / "rank_0"                 # as if the run had stopped after step 4
    resume_dir.mkdir(parents=True)
    shutil.copy(folder / step4, resume_dir / step4)
    resumed = _run(["--config", TINY_YAML, "--run_mode", "train", "--train_data", dataset, "--output_dir",
                    str(tmp_path / "out"), "--runner_config.epochs", "2", "--load_checkpoint",
                    str(tmp_path / "stopped"), "--resume_training", "True", *SMALL], tmp_path)
    after = _losses(resumed)
    assert after, resumed[-2000:]
    assert min(after) >= (1, 5)                                # it starts after the checkpoint's step
    for key, value in after.items():
        assert abs(value - reference[key]) < 1e-4, (key, value, reference[key])


def test_nonfinite_loss_stops_naming_the_step(dataset, tmp_path):
    out = _run(["--config", TINY_YAML, "--run_mode", "train", "--train_data", dataset, "--output_dir",
                str(tmp_path / "out"), "--runner_config.epochs", "1", *SMALL,
                "--model.model_config.init_std", "1.0e+39"], tmp_path, expect=3)   # weights past float32: inf
    assert re.search(r"training (loss|gradient norm) became (nan|inf) at step 1", out), out[-2000:]
    assert "step:[    2/" not in out                            # stopped at once


@pytest.mark.parametrize("args, message", [
    (["--run_mode", "train", "--no_such_flag", "1"], "unknown flag --no_such_flag"),
    (["--run_mode", "train", "--train_data", "/no/such/data.mindrecord"], "--train_data: no such file"),
    (["--run_mode", "train", "--model.model_config.seq_length", "abc"], "model.model_config.seq_length expects int"),
    (["--run_mode", "finetune"], "finetune needs --load_checkpoint"),
    (["--run_mode", "predict", "--predict_data", "hi", "--predict_length", "0", "--tokenizer_file", TINY_YAML],
     "--predict_length must be > 0"),
])
def test_bad_command_lines_fail_with_one_line(args, message, tmp_path):
    out = _run(["--config", TINY_YAML, *args], tmp_path, expect=2)
    assert message in out, out[-1500:]
    assert "Traceback" not in out


def test_missing_config_file(tmp_path):
    out = _run(["--config", str(tmp_path / "nope.yaml")], tmp_path, expect=2)
    assert "--config: no such file" in out


def test_recompute_gives_the_same_losses(full_run, dataset, tmp_path):
    """recompute_config.recompute (MindFormers' LayerSetting on every decoder layer) changes memory, not math."""
    _, out = full_run
    recomputed = _run(["--config", TINY_YAML, "--run_mode", "train", "--train_data", dataset, "--output_dir",
                       str(tmp_path / "out"), "--runner_config.epochs", "2", "--recompute_config.recompute", "True",
                       *SMALL], tmp_path)
    assert "Set full recompute at layer 1" in recomputed
    before, after = _losses(out), _losses(recomputed)
    assert set(before) == set(after)
    for key in before:
        assert abs(before[key] - after[key]) < 1e-5, (key, before[key], after[key])
