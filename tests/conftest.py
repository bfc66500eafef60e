"""Shared fixtures and helpers of the suite (test modules import helpers from here, never from each other).

Markers (registered in pytest.ini): ``slow`` for what the everyday loop leaves out (``bash scripts/test.sh -m "not
slow"``); ``msrun`` for jobs launched through scripts/msrun_launcher.sh. Tests run in two worker processes
(pytest-xdist, ``--dist loadgroup``): each test module is one group, so its module-scoped fixtures are paid once;
every msrun test is in one group, so two multi-process jobs never share the two cores.
"""
import os
import re
import subprocess
import sys
import tempfile

# `import mindformers` writes output/log under the working directory unless pointed elsewhere
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(tempfile.gettempdir(), "ds2_test_logs"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_ALPACA = os.path.join(ROOT, "data", "code_alpaca", "code_alpaca_2k.json")
TINY_YAML = os.path.join(ROOT, "configs", "deepseek2", "finetune_deepseek2_tiny.yaml")
PREDICT_YAML = os.path.join(ROOT, "configs", "deepseek2", "predict_deepseek2_tiny.yaml")
LORA_YAML = os.path.join(ROOT, "configs", "deepseek2", "finetune_deepseek2_tiny_lora.yaml")
BPE_VOCAB_SIZE = 512  # fits the tiny predict model's vocab_size 512 (test_predict, test_evaluate)

# ---------------------------------------------------------------------------------------------- training runs
LOSS = re.compile(r"Epoch:\[\s*(\d+)/\s*\d+\], step:\[\s*(\d+)/\s*(\d+)\], loss:\[([0-9.eE+-]+|nan|inf)/")
# the tiny model every CLI training test shrinks the YAML to
TINY_MODEL = ["--model.model_config.seq_length", "32", "--model.model_config.hidden_size", "32",
              "--model.model_config.intermediate_size", "64", "--model.model_config.moe_intermediate_size", "16",
              "--model.model_config.kv_lora_rank", "16", "--model.model_config.q_lora_rank", "16",
              "--model.model_config.qk_rope_head_dim", "8", "--model.model_config.qk_nope_head_dim", "8",
              "--model.model_config.v_head_dim", "8", "--model.model_config.vocab_size", "64"]
# TINY_MODEL with a batch of 4, a learning rate that moves it, and checkpoints every 4 steps
SMALL = TINY_MODEL + [
    "--runner_config.batch_size", "4", "--train_dataset.batch_size", "4", "--lr_schedule.learning_rate", "0.01",
    "--callbacks", "[{type: MFLossMonitor}, {type: LossGuard}, {type: CheckpointMonitor, prefix: tiny, "
                   "save_checkpoint_steps: 4, keep_checkpoint_max: 10, integrated_save: False}]"]


def run_cli(args, tmp_path, expect=0):
    """run_mindformer.py ``args`` in a subprocess (cwd tmp_path); asserts its exit code, returns stdout + stderr."""
    env = dict(os.environ, PYTHONPATH=ROOT, LOCAL_DEFAULT_PATH=str(tmp_path / "logs"), GLOG_v="3")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run_mindformer.py"), *args], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-3000:]
    return out


def run_cli_here(args, capsys, expect=0):
    """``runner.cli_main(args)`` in this process, for runs refused before anything starts (no interpreter start
    and imports to pay, about 7 s a run); asserts its exit code, returns stdout + stderr. An exception other than the
    one-line errors cli_main reports fails the test with its traceback."""
    import logging
    from mindformers.tools.logger import get_logger
    from research.deepseek2.run.runner import cli_main
    for handler in get_logger().handlers:       # MindFormers' console handler keeps the stream it was made with,
        if type(handler).__module__.startswith("mindformers") and not isinstance(handler, logging.FileHandler):
            handler.stream = sys.__stderr__     # maybe an earlier test's capture, closed by now: the process's own
    capsys.readouterr()
    code = cli_main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    assert code == expect, (out + err)[-3000:]
    return out + err


def losses_of(out):
    """{(epoch, step): loss} from MindFormers' loss monitor lines."""
    return {(int(m.group(1)), int(m.group(2))): float(m.group(4)) for m in LOSS.finditer(out)}


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


def write_pattern_rows(path, rows=32):
    """``rows`` rows of a learnable pattern (4 random tokens repeated), 33 tokens, labels masking the first 4: every
    row has the same 28 counted targets."""
    from mindspore.mindrecord import FileWriter
    writer = FileWriter(path, 1)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}})
    rng = np.random.RandomState(0)
    records = []
    for _ in range(rows):
        ids = np.tile(rng.randint(2, 60, 4), 9)[:33].astype(np.int32)
        labels = ids.copy()
        labels[:4] = -100
        records.append({"input_ids": ids, "labels": labels})
    writer.write_raw_data(records)
    writer.commit()
    return path


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """32 rows of a learnable pattern, seq_length 32 (+1), labels masking the first 4 tokens (read-only)."""
    return write_pattern_rows(str(tmp_path_factory.mktemp("data") / "toy.mindrecord"))


# ---------------------------------------------------------------------------------------------- predict runs
# the tiny predict model (vocab 512, so a BPE tokenizer trained on Code Alpaca fits)
PREDICT_MODEL = dict(seq_length=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, kv_lora_rank=16,
                     q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, vocab_size=BPE_VOCAB_SIZE)
PREDICT_FLAGS = [x for key, value in PREDICT_MODEL.items() for x in (f"--model.model_config.{key}", str(value))]


def predict_fields(**changes):
    """The predict YAML's model fields (as the CLI builds them) with PREDICT_MODEL and ``changes`` applied."""
    return tiny_fields(TINY_YAML, **dict(PREDICT_MODEL, **changes))


def save_predict_model(path, seed=0, **changes):
    """A random tiny predict model saved with mindspore.save_checkpoint; init_std 0.5, so that its greedy tokens
    vary (with 0.02 it repeats one token, which hides bugs)."""
    import mindspore as ms
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    ms.set_seed(seed)
    net = DeepseekV2ForCausalLM(DeepseekV2Config(**predict_fields(init_std=0.5, **changes)))
    ms.save_checkpoint(net, path)
    return path


def run_cli_status(args, tmp_path):
    """run_mindformer.py ``args`` in a subprocess -> (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT, LOCAL_DEFAULT_PATH=str(tmp_path / "logs"), GLOG_v="3")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run_mindformer.py"), *args], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


# ---------------------------------------------------------------------------------------------- session state
SESSION_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


def _reset_environ():
    own = {k: v for k, v in os.environ.items() if k.startswith("PYTEST_")}     # pytest's bookkeeping stays
    os.environ.clear()
    os.environ.update(SESSION_ENV)
    os.environ.update(own)


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process runs of MindFormers (build_context) export variables such as RUN_MODE=predict, also from
    module-scoped fixtures; a subprocess started later would inherit them and behave as that mode. Every test runs
    with, and leaves behind, the environment the session started with."""
    _reset_environ()
    yield
    _reset_environ()


@pytest.fixture(scope="session")
def bpe_vocab_size():
    """The vocabulary size of the ``tok_file`` tokenizer."""
    return BPE_VOCAB_SIZE


@pytest.fixture(scope="session")
def tok_file(tmp_path_factory, bpe_vocab_size):
    """A byte-level BPE tokenizer.json trained on the bundled Code Alpaca records, once per session (read-only)."""
    from research.deepseek2.train_tokenizer import train_bpe_tokenizer
    return train_bpe_tokenizer(CODE_ALPACA, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"),
                               vocab_size=bpe_vocab_size)


@pytest.fixture(scope="module")
def tok(tok_file):
    """A DeepseekV2Tokenizer of ``tok_file`` (one object a test module)."""
    from research.deepseek2.deepseek2_tokenizer import DeepseekV2Tokenizer
    return DeepseekV2Tokenizer(tokenizer_file=tok_file)


# ---------------------------------------------------------------------------------------------- scheduling
def pytest_itemcollected(item):
    """Each test module is one xdist group (its module fixtures run in one worker), all msrun tests one group.
    Marked as each item is collected: xdist reads the groups in its own pytest_collection_modifyitems."""
    if item.get_closest_marker("xdist_group"):
        return
    group = "msrun" if item.get_closest_marker("msrun") else item.module.__name__
    layout = getattr(item, "callspec", None) and item.callspec.params.get("layout")
    if layout and group != "msrun":                      # a module fixture per layout: its own group
        group = f"{group}-{layout}"        # no "]" after the "@" xdist puts in front: it would not see a group
    item.add_marker(pytest.mark.xdist_group(group))
