"""Code Alpaca -> MindRecord preprocessing: row layout, masks, padding, truncation, bad records, CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

from research.deepseek2.code_alpaca_preprocess import (IGNORE_INDEX, load_records, main, preprocess,
                                                       write_mindrecord)
from research.deepseek2.deepseek2_tokenizer import DeepseekV2Tokenizer, build_chat_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "code_alpaca", "code_alpaca_2k.json")
SCRIPT = os.path.join(ROOT, "research", "deepseek2", "code_alpaca_preprocess.py")

RECORDS = [
    {"instruction": "Write a Python function that adds two numbers.", "input": "",
     "output": "def add(a, b):\n    return a + b"},
    {"instruction": "What does this print?", "input": "print(1 + 1)", "output": "It prints 2."},
]


# tok_file (a 512-token BPE tokenizer.json, trained once a session) and tok come from conftest.py.


def _parts(tok, record):
    """(prompt ids, reply ids incl. eos) as the preprocessing must produce them."""
    message = record["instruction"] + ("\n" + record["input"] if record["input"] else "")
    prompt = tok.encode(build_chat_prompt(message), add_special_tokens=False)
    reply = tok.encode(" " + record["output"], add_special_tokens=False) + [tok.eos_token_id]
    return message, prompt, reply


def test_row_layout_and_masks(tok):
    seq_length = 96
    rows, stats = preprocess(RECORDS, tok, seq_length)
    assert stats["written"] == 2 and stats["truncated"] == stats["dropped"] == stats["bad"] == 0
    for record, row in zip(RECORDS, rows):
        ids, labels = row["input_ids"], row["labels"]
        assert ids.dtype == labels.dtype == np.int32
        assert ids.shape == labels.shape == (seq_length + 1,)
        message, prompt, reply = _parts(tok, record)
        n_p, n_r = len(prompt), len(reply)
        assert ids[0] == tok.bos_token_id
        assert ids[:n_p].tolist() == prompt and ids[n_p:n_p + n_r].tolist() == reply
        assert ids[n_p + n_r - 1] == tok.eos_token_id
        # -100 exactly on the prompt and the padding; labels == input_ids on the reply (the model shifts)
        assert (labels[:n_p] == IGNORE_INDEX).all()
        assert (labels[n_p:n_p + n_r] == ids[n_p:n_p + n_r]).all()
        assert (labels[n_p + n_r:] == IGNORE_INDEX).all()
        assert (ids[n_p + n_r:] == tok.pad_token_id).all()
        # the row decodes back to the exact chat training text
        assert tok.decode(ids[:n_p + n_r].tolist()) == build_chat_prompt(message, record["output"])
    assert "\nprint(1 + 1)\n\nAssistant:" in tok.decode(rows[1]["input_ids"].tolist())


def test_padding_uses_tokenizer_pad_id(tok_file, tmp_path):
    backend = Tokenizer.from_file(tok_file)
    backend.add_special_tokens(["<pad>"])
    pad_id = backend.token_to_id("<pad>")
    backend.enable_padding(pad_id=pad_id, pad_token="<pad>")
    path = str(tmp_path / "with_pad.json")
    backend.save(path)
    tok = DeepseekV2Tokenizer(tokenizer_file=path)
    rows, _ = preprocess(RECORDS[:1], tok, 96)
    _, prompt, reply = _parts(tok, RECORDS[0])
    tail = rows[0]["input_ids"][len(prompt) + len(reply):]
    assert len(tail) > 0 and (tail == pad_id).all() and pad_id != tok.eos_token_id
    assert rows[0]["input_ids"][len(prompt) + len(reply) - 1] == tok.eos_token_id


def test_truncation_and_drop(tok):
    _, prompt, reply = _parts(tok, RECORDS[0])
    seq_length = len(prompt) + 2  # row holds the prompt and 3 reply tokens
    rows, stats = preprocess(RECORDS[:1], tok, seq_length)
    assert (stats["written"], stats["truncated"], stats["dropped"]) == (1, 1, 0)
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    assert ids.tolist() == prompt + reply[:3]  # prompt kept whole, reply cut, no padding
    assert labels.tolist() == [IGNORE_INDEX] * len(prompt) + reply[:3]

    rows, stats = preprocess(RECORDS[:1], tok, seq_length, drop_long=True)
    assert rows == [] and (stats["written"], stats["truncated"], stats["dropped"]) == (0, 0, 1)

    # the prompt alone fills the row: dropped even when truncating
    rows, stats = preprocess(RECORDS[:1], tok, len(prompt) - 1)
    assert rows == [] and (stats["dropped"], stats["truncated"]) == (1, 0)

    # an exact fit is neither truncated nor dropped
    rows, stats = preprocess(RECORDS[:1], tok, len(prompt) + len(reply) - 1)
    assert stats["written"] == 1 and stats["truncated"] == 0 and rows[0]["input_ids"][-1] == tok.eos_token_id


def test_bad_records_reported_with_index(tok):
    records = [RECORDS[0],
               {"input": "", "output": "x"},                         # 1: no instruction
               {"instruction": "q", "input": "", "output": 3},       # 2: output not a string
               "not a dict",                                          # 3
               {"instruction": "q", "input": ["x"], "output": "y"},  # 4: input not a string
               RECORDS[1],
               {"instruction": "q", "output": "y"}]                  # 6: no input field is fine
    rows, stats = preprocess(records, tok, 96)
    assert stats["total"] == 7 and stats["written"] == 3 and stats["bad"] == 4 and len(rows) == 3
    reasons = dict(stats["bad_records"])
    assert sorted(reasons) == [1, 2, 3, 4]
    assert "instruction" in reasons[1] and "output" in reasons[2] and "input" in reasons[4]


def test_mindrecord_round_trip_and_atomic(tok, tmp_path):
    import mindspore.dataset as ds
    rows, _ = preprocess(RECORDS, tok, 64)
    path = str(tmp_path / "train.mindrecord")
    assert write_mindrecord(rows, path) == 2
    assert sorted(os.listdir(tmp_path)) == ["train.mindrecord", "train.mindrecord.db"]  # no temporaries
    dataset = ds.MindDataset(path, columns_list=["input_ids", "labels"], shuffle=False)
    assert dataset.get_dataset_size() == 2
    for row, back in zip(rows, dataset.create_dict_iterator(output_numpy=True)):
        assert back["input_ids"].dtype == np.int32
        np.testing.assert_array_equal(back["input_ids"], row["input_ids"])
        np.testing.assert_array_equal(back["labels"], row["labels"])
    # rewriting replaces both files in place
    assert write_mindrecord(rows[:1], path) == 1
    assert ds.MindDataset(path, shuffle=False).get_dataset_size() == 1
    assert sorted(os.listdir(tmp_path)) == ["train.mindrecord", "train.mindrecord.db"]


def test_write_failure_leaves_nothing(tok, tmp_path):
    rows, _ = preprocess(RECORDS, tok, 64)

    def failing():
        yield rows[0]
        raise RuntimeError("boom")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        write_mindrecord(failing(), str(out / "x.mindrecord"), chunk_size=1)
    assert os.listdir(out) == []
    with pytest.raises(ValueError, match="no rows"):
        write_mindrecord([], str(out / "x.mindrecord"))
    assert os.listdir(out) == []


def test_load_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_records(str(tmp_path / "absent.json"))
    (tmp_path / "obj.json").write_text('{"instruction": "x"}')
    with pytest.raises(ValueError, match="obj.json.*JSON list"):
        load_records(str(tmp_path / "obj.json"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        load_records(str(tmp_path / "broken.json"))


def test_main_in_process_errors(tok_file, tmp_path, capsys):
    (tmp_path / "obj.json").write_text("{}")
    out = str(tmp_path / "o.mindrecord")
    common = ["--tokenizer_file", tok_file, "--output_path", out, "--seq_length", "32"]
    assert main(["--data_path", str(tmp_path / "obj.json")] + common) == 1
    assert "obj.json" in capsys.readouterr().err
    assert main(["--data_path", DATA, "--tokenizer_file", str(tmp_path / "no_tok.json"), "--output_path", out,
                 "--seq_length", "32"]) == 1
    assert "no_tok.json" in capsys.readouterr().err
    assert not os.path.exists(out)
    # every prompt is longer than the row: nothing written, exit 1 with the counts
    assert main(["--data_path", DATA, "--tokenizer_file", tok_file, "--output_path", out, "--seq_length", "4"]) == 1
    err = capsys.readouterr().err
    assert "no rows" in err and "dropped=2017" in err and "o.mindrecord" in err
    assert not os.path.exists(out) and not os.path.exists(out + ".db")
    with pytest.raises(SystemExit) as exc:
        main(["--data_path", DATA] + common[:-1] + ["0"])
    assert exc.value.code == 2


def test_cli_subprocess(tok_file, tmp_path):
    """Run the script three times in parallel: a good run with one bad record, a missing file, all-bad records."""
    good = tmp_path / "good.json"
    good.write_text(json.dumps(RECORDS + [{"instruction": 5, "output": "x"}] + RECORDS))
    all_bad = tmp_path / "all_bad.json"
    all_bad.write_text(json.dumps([{"output": "x"}, {"instruction": "y"}]))
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "logs"))
    env.pop("PYTHONPATH", None)  # the installed package, no path set up

    def start(data, out, cwd):
        """Both ways a user runs it: `cd research/deepseek2 && python code_alpaca_preprocess.py ...` and
        `python research/deepseek2/code_alpaca_preprocess.py ...` from the repository root."""
        args = [sys.executable, os.path.relpath(SCRIPT, cwd), "--data_path", str(data), "--tokenizer_file",
                tok_file, "--output_path", str(tmp_path / out), "--seq_length", "48"]
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = {"good": start(good, "good.mindrecord", os.path.dirname(SCRIPT)),
             "missing": start(tmp_path / "missing.json", "m.mindrecord", ROOT),
             "all_bad": start(all_bad, "bad.mindrecord", ROOT)}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        results[name] = (proc.returncode, stdout, stderr)

    code, stdout, stderr = results["good"]
    assert code == 0, stderr
    assert "record 2 skipped" in stdout and "instruction" in stdout
    assert "written=4, truncated=0, dropped=0, bad=1" in stdout
    import mindspore.dataset as ds
    assert ds.MindDataset(str(tmp_path / "good.mindrecord"), shuffle=False).get_dataset_size() == 4

    code, _, stderr = results["missing"]
    assert code == 1 and "missing.json" in stderr
    code, _, stderr = results["all_bad"]
    assert code == 1 and "all 2 records" in stderr and "all_bad.json" in stderr
    for out in ("m.mindrecord", "bad.mindrecord"):
        assert not os.path.exists(tmp_path / out) and not os.path.exists(tmp_path / (out + ".db"))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no staging folder left
