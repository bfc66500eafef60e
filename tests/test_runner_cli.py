"""run_mindformer.py's command line without running a job: flags, ``--a.b.c value`` overrides (MindFormers'
``parse_value`` and ``MindFormerConfig.merge_from_dict`` under the project's type check), one-line errors."""
import os
import subprocess
import sys

import pytest

from research.deepseek2 import errors
from research.deepseek2.run import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "deepseek2", "finetune_deepseek2_tiny.yaml")


def _config(*argv):
    args, rest = runner.build_parser().parse_known_args(["--config", TINY_YAML, "--run_mode", "train", *argv])
    return runner.load_run_config(args, runner.parse_overrides(rest))


def test_usage_error_is_the_shared_one():
    assert runner.UsageError is errors.UsageError


@pytest.mark.parametrize("text, value", [("True", True), ("false", False), ("TRUE", True)])
def test_bool_flags(text, value):
    args, _ = runner.build_parser().parse_known_args(["--config", "x", "--use_parallel", text])
    assert args.use_parallel is value


def test_bool_flag_rejects_other_words(capsys):
    with pytest.raises(SystemExit) as exc:
        runner.build_parser().parse_known_args(["--config", "x", "--use_parallel", "maybe"])
    assert exc.value.code == 2
    assert "--use_parallel: expected True or False, got 'maybe'" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("1.0", 1.0), ("1e3", 1000.0), ("inf", float("inf")), ("True", True), ("true", True), ("null", None),
    ("", ""), ("[1, 2]", [1, 2]), ("[a, b]", ["a", "b"]), ("{a: 1}", {"a": 1}), ("abc", "abc"), ("x=y", "x=y"),
    ("[unclosed", "[unclosed"),
])
def test_override_values(text, value):
    assert runner.parse_override_value(text) == value


def test_override_pairs():
    parsed = runner.parse_overrides(["--a.b", "1", "--c=x=y", "--d", ""])
    assert [(o.path, o.value, o.text) for o in parsed] == [(["a", "b"], 1, "1"), (["c"], "x=y", "x=y"), (["d"], "", "")]
    with pytest.raises(errors.UsageError, match="--a.b needs a value"):
        runner.parse_overrides(["--a.b", "--c", "1"])
    with pytest.raises(errors.UsageError, match="unexpected argument 'stray'"):
        runner.parse_overrides(["stray"])


def test_overrides_keep_the_yaml_types():
    config = _config("--model.model_config.seq_length", "64.0", "--lr_schedule.learning_rate", "1",
                     "--output_dir", "1.10", "--callbacks", "[{type: MFLossMonitor}]",
                     "--model.model_config", "{hidden_size: 32}", "--new_section.a.b", "3", "--batch_size", "4")
    model = config.model.model_config
    assert model.seq_length == 64 and isinstance(model.seq_length, int)
    assert config.lr_schedule.learning_rate == 1.0 and isinstance(config.lr_schedule.learning_rate, float)
    assert config.output_dir == "1.10"                                    # a string key keeps the text as typed
    assert config.callbacks == [{"type": "MFLossMonitor"}]
    assert model.hidden_size == 32 and model.type == "DeepseekV2Config"  # a mapping merges into the YAML's
    assert type(model).__name__ == "MindFormerConfig" and config.new_section.a.b == 3
    assert config.runner_config.batch_size == 4


@pytest.mark.parametrize("argv, message", [
    (["--model.model_config.seq_length", "abc"], "override: model.model_config.seq_length expects int"),
    (["--model.model_config.seq_length", "2.5"], "model.model_config.seq_length expects int"),
    (["--run_mode.x", "1"], "run_mode.x: run_mode is not a mapping in the YAML"),
    (["--no_such_flag", "1"], "unknown flag --no_such_flag"),
    (["--recompute_config.recompute", "3"], "recompute_config.recompute expects bool"),
])
def test_override_errors(argv, message):
    with pytest.raises(errors.UsageError, match=message):
        _config(*argv)


def test_help_is_quick_and_needs_no_path(tmp_path):
    """run_mindformer.py finds the installed package from any folder, and --help does not import MindSpore."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run_mindformer.py"), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout
