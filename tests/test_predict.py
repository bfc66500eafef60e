"""``run_mindformer.py --run_mode predict`` on a tiny model: the text it prints and writes is what ``generate``
gives for the same prompt ids (greedy and seeded sampling), in every input format, batched or not, streamed or not,
in graph and PyNative mode; bad input ends with one line on stderr and exit code 2.

Most runs call ``runner.cli_main`` in this process (each subprocess costs ~10 s of imports); three go through
``run_mindformer.py`` in a subprocess (graph mode, PyNative mode, a failing one) to check the real command line.
The reference is a ``DeepseekV2ForCausalLM`` built here and loaded with ``mindspore.load_checkpoint``.
"""
import json
import os
import re

import pytest

from conftest import (PREDICT_FLAGS as FLAGS, PREDICT_YAML, predict_fields as _fields, run_cli_status as _subprocess,
                      save_predict_model as _save_model)

pytestmark = pytest.mark.slow               # training or generation runs: not in the everyday loop

PROMPTS = ["Write a function that adds two numbers.", "Sort a list", "Explain what a Python dictionary is and give "
           "an example of using one."]                     # different lengths: batching pads them differently
NEW = 12


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    """The predict YAML's mode for the in-process runs and the reference; restored afterwards."""
    import mindspore as ms
    before = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tok_file):
    """The session's tokenizer.json (vocab 512, trained on Code Alpaca) and a checkpoint of the tiny model."""
    folder = tmp_path_factory.mktemp("predict_assets")
    checkpoint = _save_model(str(folder / "tiny.ckpt"))
    return {"tokenizer": tok_file, "checkpoint": checkpoint, "folder": folder}


def _args(assets, tmp_path, *extra):
    return ["--config", PREDICT_YAML, "--load_checkpoint", assets["checkpoint"], "--tokenizer_file",
            assets["tokenizer"], "--output_dir", str(tmp_path / "out"), "--predict_length", str(NEW), *FLAGS, *extra]


def _cli(args, capsys):
    """runner.cli_main in this process -> (exit code, stdout, stderr)."""
    from research.deepseek2.run.runner import cli_main
    capsys.readouterr()
    code = cli_main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _results(tmp_path):
    with open(tmp_path / "out" / "text_generation_result.txt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


class Reference:
    """The tiny model and tokenizer built directly, ``generate`` called on ids made here."""

    def __init__(self, assets):
        import mindspore as ms
        from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV2Tokenizer
        from research.deepseek2 import build_chat_prompt
        from research.deepseek2.run.predict import setup_context
        from research.deepseek2.run.runner import build_parser, load_run_config, parse_overrides
        # MindFormers' context as predict sets it (on CPU sampling post-processing runs in numpy)
        args, rest = build_parser().parse_known_args(_args(assets, assets["folder"]))
        setup_context(load_run_config(args, parse_overrides(rest)))
        self.tokenizer = DeepseekV2Tokenizer(tokenizer_file=assets["tokenizer"])
        self.net = DeepseekV2ForCausalLM(DeepseekV2Config(**_fields(use_past=True, batch_size=1)))
        not_loaded, _ = ms.load_param_into_net(self.net, ms.load_checkpoint(assets["checkpoint"]))
        assert all("kv_cache" in name for name in not_loaded), not_loaded
        self.net.set_train(False)
        self.build_chat_prompt = build_chat_prompt

    def ids(self, prompt, chat):
        if chat:
            return self.tokenizer.encode(self.build_chat_prompt(prompt), add_special_tokens=False)
        return [self.tokenizer.bos_token_id] + self.tokenizer.encode(prompt, add_special_tokens=False)

    def new_ids(self, ids, new=NEW, **kwargs):
        out = self.net.generate([ids], max_new_tokens=new, do_sample=kwargs.pop("do_sample", False), **kwargs)
        return [int(x) for x in out[0][len(ids):]]

    def text(self, prompt, chat, new=NEW, **kwargs):
        return self.tokenizer.decode(self.new_ids(self.ids(prompt, chat), new, **kwargs), skip_special_tokens=True)


@pytest.fixture(scope="module")
def ref(assets):
    return Reference(assets)


# ------------------------------------------------------------------------------------------- pieces, no model
def test_read_prompts_formats(tmp_path):
    from research.deepseek2.run.predict import read_prompts
    from research.deepseek2.run.runner import UsageError
    assert read_prompts(["one prompt"]) == ["one prompt"]
    assert read_prompts(["a", "b c"]) == ["a", "b c"]
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("first\n\nsecond line\\nwith a newline\n", encoding="utf-8")
    assert read_prompts([str(text_file)]) == ["first", "second line\nwith a newline"]
    json_file = tmp_path / "prompts.json"
    json_file.write_text(json.dumps(["x", "y\nz"]), encoding="utf-8")
    assert read_prompts([str(json_file)]) == ["x", "y\nz"]
    json_file.write_text(json.dumps(["x", 3]), encoding="utf-8")
    with pytest.raises(UsageError, match="list of strings"):
        read_prompts([str(json_file)])
    with pytest.raises(UsageError, match="prompt 1 is empty"):
        read_prompts(["ok", "  "])


def test_prompt_ids_chat_and_plain(ref):
    from research.deepseek2.run.predict import encode_prompt
    tok = ref.tokenizer
    chat_ids = encode_prompt(tok, "hi there", chat=True)
    assert chat_ids == tok.encode(ref.build_chat_prompt("hi there"), add_special_tokens=False)
    assert chat_ids[0] == tok.bos_token_id and chat_ids.count(tok.bos_token_id) == 1
    assert tok.decode(chat_ids) == ref.build_chat_prompt("hi there")
    plain_ids = encode_prompt(tok, "hi there", chat=False)
    assert plain_ids == [tok.bos_token_id] + tok.encode("hi there", add_special_tokens=False)
    assert plain_ids[1:] != chat_ids[1:len(plain_ids)]


# ------------------------------------------------------------------------------------------- the command line
def test_graph_mode_one_prompt_matches_generate(assets, ref, tmp_path):
    """Subprocess, default YAML (graph mode, chat template on): one string in, generate's text out."""
    code, out, err = _subprocess(_args(assets, tmp_path, "--predict_data", PROMPTS[0]), tmp_path)
    assert code == 0, (out + err)[-3000:]
    expected = ref.text(PROMPTS[0], chat=True)
    assert expected.strip(), "the tiny model generated nothing visible; the comparison would be empty"
    assert _results(tmp_path) == [{"prompt": PROMPTS[0], "output": expected}]
    assert f"[prompt] {PROMPTS[0]}\n[output] {expected}\n" in out
    assert expected != ref.text(PROMPTS[0], chat=False)     # the template matters, so the check above is sharp


def test_pynative_mode_matches_generate(assets, ref, tmp_path):
    code, out, err = _subprocess(_args(assets, tmp_path, "--predict_data", PROMPTS[1], "--mode", "1", "--chat",
                                       "False", "--predict_length", "4"), tmp_path)
    assert code == 0, (out + err)[-3000:]
    assert _results(tmp_path) == [{"prompt": PROMPTS[1], "output": ref.text(PROMPTS[1], chat=False, new=4)}]


def test_json_list_file_in_order(assets, ref, tmp_path, capsys):
    data = tmp_path / "prompts.json"
    data.write_text(json.dumps(PROMPTS), encoding="utf-8")
    code, out, err = _cli(_args(assets, tmp_path, "--predict_data", str(data), "--chat", "False"), capsys)
    assert code == 0, err[-2000:]
    expected = [{"prompt": p, "output": ref.text(p, chat=False)} for p in PROMPTS]
    assert _results(tmp_path) == expected
    printed = [out.index(f"[prompt] {p}\n[output] {e['output']}\n") for p, e in zip(PROMPTS, expected)]
    assert printed == sorted(printed)


def test_text_file_batched_equals_one_at_a_time(assets, ref, tmp_path, capsys):
    """Batch 2 over 3 prompts of different lengths (right padding, a half-filled last batch) == one by one."""
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    code, _, err = _cli(_args(assets, tmp_path, "--predict_data", str(data), "--predict_batch_size", "2"), capsys)
    assert code == 0, err[-2000:]
    assert _results(tmp_path) == [{"prompt": p, "output": ref.text(p, chat=True)} for p in PROMPTS]


def test_several_strings_streamed(assets, ref, tmp_path, capsys, monkeypatch):
    from mindformers.generation.streamers import TextStreamer
    pieces = []
    original = TextStreamer.on_finalized_text

    def record(self, text, stream_end=False):
        pieces.append((text, stream_end))
        return original(self, text, stream_end)

    monkeypatch.setattr(TextStreamer, "on_finalized_text", record)
    prompts = PROMPTS[:2]
    code, out, err = _cli(_args(assets, tmp_path, "--predict_data", *prompts, "--stream", "True"), capsys)
    assert code == 0, err[-2000:]
    expected = [ref.text(p, chat=True) for p in prompts]
    assert _results(tmp_path) == [{"prompt": p, "output": e} for p, e in zip(prompts, expected)]
    # one stream per prompt, token by token: several non-empty pieces, then the end; together the output
    ends = [i for i, (_, end) in enumerate(pieces) if end]
    assert len(ends) == 2, pieces
    for text, (start, stop) in zip(expected, [(0, ends[0]), (ends[0] + 1, ends[1])]):
        streamed = [piece for piece, _ in pieces[start:stop + 1]]
        assert "".join(streamed) == text
        assert sum(1 for piece in streamed if piece) >= 2, streamed
    for prompt, text in zip(prompts, expected):
        assert f"[prompt] {prompt}\n[output] {text}\n" in out


def test_sampling_flags_reach_generate(assets, ref, tmp_path, capsys):
    """--do_sample/--seed/--temperature/--top_k/--top_p/--repetition_penalty == generate with the same values."""
    knobs = {"temperature": 1.5, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.1}
    flags = [x for key, value in knobs.items() for x in (f"--{key}", str(value))]
    code, _, err = _cli(_args(assets, tmp_path, "--predict_data", PROMPTS[1], "--do_sample", "True", "--seed", "7",
                              *flags), capsys)
    assert code == 0, err[-2000:]
    sampled = ref.text(PROMPTS[1], chat=True, do_sample=True, seed=7, **knobs)
    assert _results(tmp_path) == [{"prompt": PROMPTS[1], "output": sampled}]
    assert sampled != ref.text(PROMPTS[1], chat=True)        # sampling did happen


# ------------------------------------------------------------------------------------------- generate itself
def test_sampling_seeded_and_degenerate_cases(ref):
    ids = ref.ids(PROMPTS[0], chat=True)
    greedy = ref.new_ids(ids)
    hot = dict(do_sample=True, temperature=1.5, top_k=0)
    first = ref.new_ids(ids, seed=1, **hot)
    assert ref.new_ids(ids, seed=1, **hot) == first          # a seed fixes the sample
    assert any(ref.new_ids(ids, seed=s, **hot) != first for s in (2, 3))
    assert first != greedy
    # distributions narrowed to the top token give the greedy answer
    assert ref.new_ids(ids, seed=1, do_sample=True, top_k=1) == greedy
    assert ref.new_ids(ids, seed=1, do_sample=True, top_k=0, top_p=1e-6) == greedy
    assert ref.new_ids(ids, seed=1, do_sample=True, top_k=0, temperature=1e-3) == greedy


def test_repetition_penalty(ref):
    """Greedy repeats tokens on this prompt; a large penalty makes every new token one not seen before."""
    ids = ref.ids("a a a a a a a a", chat=False)
    new = 20
    greedy = ref.new_ids(ids, new=new)
    seen = ids + greedy
    assert len(set(seen)) < len(seen), "precondition: greedy output repeats a token"
    penalised = ref.new_ids(ids, new=new, repetition_penalty=1000.0)
    assert len(penalised) == new
    assert len(set(penalised)) == new and not set(penalised) & set(ids), penalised


# ------------------------------------------------------------------------------------------- bad input
def _one_error_line(code, err, message):
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("run_mindformer.py: error:")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("case, message", [
    ("empty_prompt", "prompt 0 is empty"),
    ("long_prompt", "seq_length is 64"),
    ("length_0", "--predict_length must be > 0, got 0"),
    ("length_-1", "--predict_length must be > 0, got -1"),
    ("missing_checkpoint", "--load_checkpoint: no such file or folder"),
    ("missing_tokenizer", "--tokenizer_file: no such file"),
    ("no_tokenizer", "predict needs a tokenizer"),
    ("not_a_tokenizer", "cannot parse tokenizer_file"),
    ("temperature_0", "--temperature must be > 0"),
    ("batch_0", "--predict_batch_size must be > 0"),
    ("small_vocab", "tokenizer and model do not match"),
    ("other_shape", "does not match the net"),
])
def test_bad_input_one_line(case, message, assets, tmp_path, capsys):
    args = _args(assets, tmp_path, "--predict_data", PROMPTS[0])
    def swap(flag, value):
        args[args.index(flag) + 1] = value
    if case == "empty_prompt":
        swap("--predict_data", "")
    elif case == "long_prompt":
        swap("--predict_data", "word " * 100)
    elif case.startswith("length_"):
        swap("--predict_length", case.split("_")[1])
    elif case == "missing_checkpoint":
        swap("--load_checkpoint", str(tmp_path / "nope.ckpt"))
    elif case == "missing_tokenizer":
        swap("--tokenizer_file", str(tmp_path / "nope.json"))
    elif case == "no_tokenizer":
        del args[args.index("--tokenizer_file"):args.index("--tokenizer_file") + 2]
    elif case == "not_a_tokenizer":
        swap("--tokenizer_file", PREDICT_YAML)
    elif case == "temperature_0":
        args += ["--do_sample", "True", "--temperature", "0"]
    elif case == "batch_0":
        args += ["--predict_batch_size", "0"]
    elif case == "small_vocab":
        args += ["--model.model_config.vocab_size", "260"]     # the 512-token tokenizer's ids do not fit
    elif case == "other_shape":
        swap("--load_checkpoint", _save_model(str(tmp_path / "wide.ckpt"), hidden_size=48))
    code, _, err = _cli(args, capsys)
    _one_error_line(code, err, message)
    assert not (tmp_path / "out" / "text_generation_result.txt").exists()


def test_bad_checkpoint_subprocess(assets, tmp_path):
    """The real process: a checkpoint of another shape -> exit 2, one line naming the mismatch, no traceback."""
    wide = _save_model(str(tmp_path / "wide.ckpt"), hidden_size=48)
    args = _args(assets, tmp_path, "--predict_data", PROMPTS[0])
    args[args.index("--load_checkpoint") + 1] = wide
    code, out, err = _subprocess(args, tmp_path)
    _one_error_line(code, err, "does not match the net")
    assert re.search(r"\d+ mis-shaped: lm_head.weight is \(512, 48\)", err), err
    assert "Traceback" not in out


def _hf_folder(assets, folder, drop=None):
    """The tiny checkpoint as a Hugging Face folder (convert_weight --reverse); ``drop``: a tensor left out."""
    from safetensors.numpy import load_file, save_file
    from research.deepseek2 import DeepseekV2Config
    from research.deepseek2.convert_weight import convert_ms_to_hf
    convert_ms_to_hf(assets["checkpoint"], str(folder), DeepseekV2Config(**_fields()), progress=False)
    if drop:
        for shard in folder.glob("*.safetensors"):
            tensors = load_file(str(shard))
            if drop in tensors:
                del tensors[drop]
                save_file(tensors, str(shard), metadata={"format": "pt"})
        index = folder / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            data["weight_map"].pop(drop, None)
            index.write_text(json.dumps(data))
    return str(folder)


def test_hugging_face_folder_is_a_checkpoint(assets, ref, tmp_path, capsys):
    """--load_checkpoint HF_DIR (config.json + safetensors): the same tokens as the .ckpt it was converted from."""
    args = _args(assets, tmp_path, "--predict_data", PROMPTS[0], "--chat", "False")
    args[args.index("--load_checkpoint") + 1] = _hf_folder(assets, tmp_path / "hf")
    code, _, err = _cli(args, capsys)
    assert code == 0, err[-2000:]
    assert _results(tmp_path) == [{"prompt": PROMPTS[0], "output": ref.text(PROMPTS[0], chat=False)}]


def test_hugging_face_folder_missing_a_tensor_is_refused(assets, tmp_path, capsys):
    missing = "model.layers.1.mlp.experts.3.up_proj.weight"
    args = _args(assets, tmp_path, "--predict_data", PROMPTS[0])
    args[args.index("--load_checkpoint") + 1] = _hf_folder(assets, tmp_path / "hf", drop=missing)
    code, _, err = _cli(args, capsys)
    _one_error_line(code, err, missing)
    assert not (tmp_path / "out" / "text_generation_result.txt").exists()


def test_hugging_face_folder_tokens_equal_transformers_greedy(assets, ref, tmp_path, capsys):
    """A folder written by transformers itself: run_mindformer.py predict's text is the decoding of transformers'
    own greedy tokens for the same weights and prompt (the YaRN-free tiny config needs no patch)."""
    import torch
    from reference import build_reference
    fields = {k: v for k, v in _fields().items() if k not in ("init_std",)}
    model = build_reference(fields, seed=9)
    model.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    ids = ref.ids(PROMPTS[1], chat=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=fields["eos_token_id"], pad_token_id=fields["pad_token_id"])
    new_ids = [int(x) for x in out[0][len(ids):]]
    if fields["eos_token_id"] in new_ids:                        # both stop at the end-of-sequence token
        new_ids = new_ids[:new_ids.index(fields["eos_token_id"])]
    args = _args(assets, tmp_path, "--predict_data", PROMPTS[1], "--chat", "False")
    args[args.index("--load_checkpoint") + 1] = str(tmp_path / "hf")
    code, _, err = _cli(args, capsys)
    assert code == 0, err[-2000:]
    assert len(set(new_ids)) > 2, new_ids                        # tokens that vary: a real comparison
    assert _results(tmp_path)[0]["output"] == ref.tokenizer.decode(new_ids, skip_special_tokens=True)


def test_converted_safetensors_folder_is_a_checkpoint(assets, ref, tmp_path, capsys):
    """convert_weight.py's MindSpore safetensors folder, with load_ckpt_format: safetensors: the .ckpt's tokens;
    the same folder with --load_ckpt_format ckpt is refused naming both formats."""
    from research.deepseek2.convert_weight import convert_hf_to_ms
    convert_hf_to_ms(_hf_folder(assets, tmp_path / "hf"), str(tmp_path / "ms") + "/")
    assert any(name.endswith(".safetensors") for name in os.listdir(tmp_path / "ms"))
    args = _args(assets, tmp_path, "--predict_data", PROMPTS[0], "--chat", "False", "--load_ckpt_format",
                 "safetensors")
    args[args.index("--load_checkpoint") + 1] = str(tmp_path / "ms")
    code, _, err = _cli(args, capsys)
    assert code == 0, err[-2000:]
    assert _results(tmp_path) == [{"prompt": PROMPTS[0], "output": ref.text(PROMPTS[0], chat=False)}]
    args[args.index("--load_ckpt_format") + 1] = "ckpt"
    os.remove(tmp_path / "out" / "text_generation_result.txt")
    code, _, err = _cli(args, capsys)
    _one_error_line(code, err, f"load_ckpt_format is 'ckpt' but {tmp_path / 'ms'} holds safetensors files")
    assert not (tmp_path / "out" / "text_generation_result.txt").exists()
