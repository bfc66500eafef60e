"""run_mindformer.py end to end on CPU (graph mode): training lowers the loss, resume continues the same curve,
a non-finite loss stops the run naming the step, bad command lines fail with one clear line."""
import os
import re
import shutil

import numpy as np
import pytest

from conftest import SMALL, TINY_MODEL, TINY_YAML, losses_of, run_cli, run_cli_here

pytestmark = pytest.mark.slow               # training or generation runs: not in the everyday loop


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    out = run_cli(["--config", TINY_YAML, "--run_mode", "train", "--train_data", dataset, "--output_dir",
                str(tmp / "out"), "--runner_config.epochs", "2", *SMALL], tmp)
    return tmp, out


def test_train_loss_falls_and_checkpoints(full_run):
    tmp, out = full_run
    losses = losses_of(out)
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
    reference = losses_of(out)
    folder = tmp / "out" / "checkpoint" / "rank_0"
    step4 = [name for name in os.listdir(folder) if name.endswith("-1_4.ckpt")][0]
    resume_dir = tmp_path / "stopped" / "rank_0"                 # as if the run had stopped after step 4
    resume_dir.mkdir(parents=True)
    shutil.copy(folder / step4, resume_dir / step4)
    resumed = run_cli(["--config", TINY_YAML, "--run_mode", "train", "--train_data", dataset, "--output_dir",
                    str(tmp_path / "out"), "--runner_config.epochs", "2", "--load_checkpoint",
                    str(tmp_path / "stopped"), "--resume_training", "True", *SMALL], tmp_path)
    after = losses_of(resumed)
    assert after, resumed[-2000:]
    assert min(after) >= (1, 5)                                # it starts after the checkpoint's step
    for key, value in after.items():
        assert abs(value - reference[key]) < 1e-4, (key, value, reference[key])


def test_nonfinite_loss_stops_naming_the_step(dataset, tmp_path):
    out = run_cli(["--config", TINY_YAML, "--run_mode", "train", "--train_data", dataset, "--output_dir",
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
def test_bad_command_lines_fail_with_one_line(args, message, capsys):
    """In this process (runner.cli_main): exit 2 and one error line; test_a_bad_command_line_is_one_line_and_exit_2
    holds the real command line to the same."""
    out = run_cli_here(["--config", TINY_YAML, *args], capsys, expect=2)
    errors = [line for line in out.splitlines() if line.startswith("run_mindformer.py: error:")]
    assert len(errors) == 1 and message in errors[0], out[-1500:]
    assert "Traceback" not in out


def test_a_bad_command_line_is_one_line_and_exit_2(tmp_path):
    """run_mindformer.py itself (a subprocess): a missing config and an unknown flag, exit 2, one line each."""
    out = run_cli(["--config", str(tmp_path / "nope.yaml")], tmp_path, expect=2)
    assert "--config: no such file" in out and "Traceback" not in out
    out = run_cli(["--config", TINY_YAML, "--run_mode", "train", "--no_such_flag", "1"], tmp_path, expect=2)
    assert [line for line in out.splitlines() if line.startswith("run_mindformer.py: error:")] == \
        ["run_mindformer.py: error: unknown flag --no_such_flag (see --help; YAML keys are set as --a.b.c value)"]
    assert "Traceback" not in out


def test_recompute_gives_the_same_losses_and_stop_step_stops(full_run, dataset, tmp_path):
    """recompute_config.recompute (MindFormers' LayerSetting on every decoder layer) changes memory, not math: the
    losses equal the plain run's step for step; runner_config.stop_step 6 ends that run after its 6th step (of 16)."""
    _, out = full_run
    recomputed = run_cli(["--config", TINY_YAML, "--run_mode", "train", "--train_data", dataset, "--output_dir",
                          str(tmp_path / "out"), "--runner_config.epochs", "2", "--recompute_config.recompute", "True",
                          "--runner_config.stop_step", "6", *SMALL], tmp_path)
    assert "Set full recompute at layer 1" in recomputed
    assert "training stops after step 6" in recomputed
    before, after = losses_of(out), losses_of(recomputed)
    assert sorted(after) == sorted(before)[:6], sorted(after)
    for key in after:
        assert abs(before[key] - after[key]) < 1e-5, (key, before[key], after[key])
