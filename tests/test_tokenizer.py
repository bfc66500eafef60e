"""DeepseekV2Tokenizer, the chat prompt format and the small BPE trainer."""
import json
import os
import subprocess
import sys

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer

from research.deepseek2.deepseek2_tokenizer import (BOS_TOKEN, EOS_TOKEN, DeepseekV2Tokenizer,
                                                    build_chat_prompt)
from research.deepseek2.train_tokenizer import train_bpe_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "code_alpaca", "code_alpaca_2k.json")
TRAIN_SCRIPT = os.path.join(ROOT, "research", "deepseek2", "train_tokenizer.py")

# chat_template of the released DeepSeek-V2-Chat tokenizer_config.json
RELEASED_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}")

SAMPLES = [
    "def f(x):\n    return x ** 2  # square\n",
    "  leading spaces, trailing tab\t",
    "Unicode: ünïcödé, 中文, emoji 🙂, math ∑",
    "",
    "multiple\n\n\nnewlines and    runs of spaces",
]


# tok_file (session-scoped, vocab bpe_vocab_size) and tok come from conftest.py


def _run(args, cwd, logs):
    """The script as a user runs it, without PYTHONPATH: from `cwd` = the repository root as
    research/deepseek2/train_tokenizer.py, or from research/deepseek2 as train_tokenizer.py."""
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(logs))
    env.pop("PYTHONPATH", None)
    script = os.path.relpath(TRAIN_SCRIPT, cwd)
    return subprocess.run([sys.executable, script] + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_special_token_strings():
    assert BOS_TOKEN == "<\uff5cbegin\u2581of\u2581sentence\uff5c>" == "<｜begin▁of▁sentence｜>"
    assert EOS_TOKEN == "<\uff5cend\u2581of\u2581sentence\uff5c>" == "<｜end▁of▁sentence｜>"


def test_trained_file_is_deterministic_byte_level(tok_file, bpe_vocab_size, tmp_path):
    again = train_bpe_tokenizer(DATA, str(tmp_path / "tokenizer.json"), vocab_size=bpe_vocab_size)
    with open(tok_file, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json"]  # no temporary left behind
    backend = Tokenizer.from_file(tok_file)
    assert backend.get_vocab_size() == bpe_vocab_size
    assert backend.token_to_id(BOS_TOKEN) == 0 and backend.token_to_id(EOS_TOKEN) == 1
    spec = json.load(open(tok_file, encoding="utf-8"))
    assert spec["model"]["type"] == "BPE" and spec["decoder"]["type"] == "ByteLevel"
    for text in SAMPLES:
        assert backend.decode(backend.encode(text).ids) == text


def test_train_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(DATA, str(tmp_path / "t.json"), vocab_size=100)


def test_round_trip_and_special_ids(tok):
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.pad_token == EOS_TOKEN and tok.pad_token_id == 1  # no pad token in the file: falls back to eos
    assert tok.all_special_ids == [0, 1]
    for text in SAMPLES:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids  # add_bos_token=True, no eos
        assert tok.encode(text) == ids
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids) == BOS_TOKEN + text
    # the special strings inside a text are single tokens
    assert tok.encode(BOS_TOKEN + "x" + EOS_TOKEN, add_special_tokens=False) == \
        [0] + tok.encode("x", add_special_tokens=False) + [1]


def test_add_eos_token_switch(tok_file):
    tok = DeepseekV2Tokenizer(tokenizer_file=tok_file, add_bos_token=False, add_eos_token=True)
    ids = tok.encode("abc")
    assert ids[0] != 0 and ids[-1] == 1
    tok.add_bos_token = True
    assert tok.encode("abc") == [0] + ids


def test_pipeline_calls(tok):
    """The calls mindformers' TextGenerationPipeline makes: batch encode padded to longest, then decode."""
    texts = ["short", "a somewhat longer input text"]
    batch = tok(texts, return_tensors=None, add_special_tokens=True, padding=True)["input_ids"]
    assert len(batch[0]) == len(batch[1])
    n_short = len(tok.encode(texts[0]))
    assert batch[0][n_short:] == [tok.pad_token_id] * (len(batch[0]) - n_short)  # right padding with pad id
    sequences = [np.array(row + [tok.eos_token_id]) for row in batch]
    assert tok.decode(sequences, skip_special_tokens=True) == texts  # legacy path: list of sequences
    assert tok.batch_decode(sequences, skip_special_tokens=True) == texts
    assert tok.decode(sequences[1], skip_special_tokens=True) == texts[1]


def test_pad_token_from_file(tok_file, tmp_path):
    backend = Tokenizer.from_file(tok_file)
    backend.add_special_tokens(["<pad>"])
    pad_id = backend.token_to_id("<pad>")
    backend.enable_padding(pad_id=pad_id, pad_token="<pad>")
    path = str(tmp_path / "with_pad.json")
    backend.save(path)
    tok = DeepseekV2Tokenizer(tokenizer_file=path)
    assert tok.pad_token == "<pad>" and tok.pad_token_id == pad_id != tok.eos_token_id
    assert DeepseekV2Tokenizer(tokenizer_file=tok_file, pad_token=BOS_TOKEN).pad_token_id == 0


def test_chat_prompt_exact():
    assert build_chat_prompt("hi") == "<｜begin▁of▁sentence｜>User: hi\n\nAssistant:"
    assert build_chat_prompt("hi", "hello") == "<｜begin▁of▁sentence｜>User: hi\n\nAssistant: hello<｜end▁of▁sentence｜>"
    assert build_chat_prompt("a\nb", bos=False) == "User: a\nb\n\nAssistant:"
    assert build_chat_prompt("q", "", bos=False) == "User: q\n\nAssistant: " + EOS_TOKEN
    with pytest.raises(TypeError, match="message"):
        build_chat_prompt(None)


@pytest.mark.parametrize("message,reply", [("hi", "hello"), ("Write code\nx = 1", "def f():\n    pass"),
                                           ("  spaced  ", "")])
def test_chat_prompt_matches_released_template(message, reply):
    template = jinja2.Environment().from_string(RELEASED_CHAT_TEMPLATE)
    user = [{"role": "user", "content": message}]
    prompt = template.render(messages=user, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, add_generation_prompt=True)
    full = template.render(messages=user + [{"role": "assistant", "content": reply}], bos_token=BOS_TOKEN,
                           eos_token=EOS_TOKEN)
    assert build_chat_prompt(message) == prompt
    assert build_chat_prompt(message, reply) == full


def test_registration_and_build_from_config(tok_file):
    from mindformers.models.build_tokenizer import build_tokenizer
    from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "DeepseekV2Tokenizer") is DeepseekV2Tokenizer
    for key in ("tokenizer_file", "vocab_file"):
        config = MindFormerConfig(**{"processor": {"tokenizer": {"type": "DeepseekV2Tokenizer", key: tok_file}}})
        tok = build_tokenizer(config.processor.tokenizer)
        assert isinstance(tok, DeepseekV2Tokenizer)
        assert tok.encode("hello world") == DeepseekV2Tokenizer(tokenizer_file=tok_file).encode("hello world")
        assert tok.pad_token_id == tok.eos_token_id == 1


def test_missing_or_bad_file_errors(tmp_path, tok_file):
    from mindformers.models.build_tokenizer import build_tokenizer
    missing = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="nope/tokenizer.json"):
        DeepseekV2Tokenizer(tokenizer_file=missing)
    with pytest.raises(FileNotFoundError, match="nope/tokenizer.json"):
        build_tokenizer({"type": "DeepseekV2Tokenizer", "tokenizer_file": missing})
    with pytest.raises(ValueError, match="tokenizer_file"):
        DeepseekV2Tokenizer()
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        DeepseekV2Tokenizer(tokenizer_file=str(broken))
    with pytest.raises(ValueError, match="bos_token"):
        DeepseekV2Tokenizer(tokenizer_file=tok_file, bos_token="<s>")


def test_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(str(tmp_path), save_json=True)
    assert os.path.isfile(tmp_path / "tokenizer.json")
    loaded = DeepseekV2Tokenizer.from_pretrained(str(tmp_path))
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.pad_token_id == tok.pad_token_id


@pytest.mark.slow
def test_cli(tmp_path):
    out = tmp_path / "out" / "tokenizer.json"
    ok = _run(["--data_path", DATA, "--output_path", str(out), "--vocab_size", "512"],
              os.path.dirname(TRAIN_SCRIPT), tmp_path / "logs")
    assert ok.returncode == 0, ok.stderr
    assert Tokenizer.from_file(str(out)).get_vocab_size() == 512
    assert "vocab size 512" in ok.stdout
    bad = _run(["--data_path", str(tmp_path / "missing.json"), "--output_path", str(tmp_path / "x.json")], ROOT,
               tmp_path / "logs")
    assert bad.returncode != 0
    assert "missing.json" in bad.stdout + bad.stderr
    assert not os.path.exists(tmp_path / "x.json")
