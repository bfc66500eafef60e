"""lm-evaluation-harness on this model (research/deepseek2/evaluation/lm_eval_model.py), held to lm-eval's own ``hf``
model through the harness itself: one tiny model saved as a Hugging Face folder, evaluated by both on two local tasks
(tests/lm_eval_tasks: a multiple-choice and a generate_until task, YAML + JSON, no download); the per-request
log-likelihoods agree within 1e-4, the greedy flags, the generated texts and the accuracies are equal; the
``deepseek2-lm-eval`` command line takes lm-eval's flags and our model's name."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT, TINY_YAML, tiny_fields

pytestmark = pytest.mark.slow               # two models through the harness: not in the everyday loop

TASKS = os.path.join(ROOT, "tests", "lm_eval_tasks")
TASK_NAMES = ["ds2_local_mc", "ds2_local_gen"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok_file):
    """A tiny DeepSeek-V2 made by the reference, saved as a Hugging Face folder with the session's tokenizer, and a
    YAML of the same model for ours."""
    from transformers import PreTrainedTokenizerFast
    from reference import build_reference
    from research.deepseek2.deepseek2_tokenizer import BOS_TOKEN, EOS_TOKEN
    tmp = tmp_path_factory.mktemp("lm_eval")
    fields = tiny_fields(vocab_size=512, seq_length=64)
    build_reference(fields, seed=1).save_pretrained(str(tmp / "hf"), safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_file=tok_file, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                            pad_token=EOS_TOKEN).save_pretrained(str(tmp / "hf"))
    with open(TINY_YAML, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config.update(run_mode="predict")
    config["model"]["model_config"] = dict(fields, type="DeepseekV2Config", use_past=True)
    (tmp / "model.yaml").write_text(yaml.safe_dump(config))
    return tmp


def _evaluate(model, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    monkeypatch.chdir(ROOT)                                   # the tasks' data_files are relative to the root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return simple_evaluate(model=model, tasks=TASK_NAMES, task_manager=TaskManager(include_path=TASKS),
                           log_samples=True, bootstrap_iters=0, random_seed=0)


@pytest.fixture(scope="module")
def both(folder):
    """lm-eval's hf model and ours on the same folder, through simple_evaluate."""
    from lm_eval.models.huggingface import HFLM
    from research.deepseek2.evaluation.lm_eval_model import DeepseekV2LM
    monkeypatch = pytest.MonkeyPatch()
    try:
        theirs = _evaluate(HFLM(pretrained=str(folder / "hf"), device="cpu", batch_size=2, dtype="float32"),
                           monkeypatch)
        ours = _evaluate(DeepseekV2LM(config=str(folder / "model.yaml"), load_checkpoint=str(folder / "hf"),
                                      batch_size=2), monkeypatch)
    finally:
        monkeypatch.undo()
    return theirs, ours


def test_log_likelihoods_equal_lm_evals_hf_model(both):
    theirs, ours = both
    pairs = list(zip(theirs["samples"]["ds2_local_mc"], ours["samples"]["ds2_local_mc"]))
    assert len(pairs) == 8
    worst, spread = 0.0, []
    for their, our in pairs:
        assert their["doc_id"] == our["doc_id"]
        their_ll = np.array([r[0][0] for r in their["resps"]])
        our_ll = np.array([r[0][0] for r in our["resps"]])
        assert [r[0][1] for r in their["resps"]] == [r[0][1] for r in our["resps"]]     # is_greedy
        worst = max(worst, float(np.abs(their_ll - our_ll).max()))
        spread.append(float(their_ll.max() - their_ll.min()))
    print(f"\nmax |log-likelihood difference| {worst:.2e} over {len(pairs) * 4} requests")
    assert worst <= 1e-4
    assert min(spread) > 1e-3                                  # the choices are told apart: not a vacuous parity


def test_accuracies_and_generations_equal_lm_evals_hf_model(both):
    theirs, ours = both
    assert ours["results"]["ds2_local_mc"]["acc,none"] == theirs["results"]["ds2_local_mc"]["acc,none"]
    assert ours["results"]["ds2_local_gen"]["exact_match,none"] == \
        theirs["results"]["ds2_local_gen"]["exact_match,none"]
    their_texts = [s["resps"][0][0] for s in theirs["samples"]["ds2_local_gen"]]
    our_texts = [s["resps"][0][0] for s in ours["samples"]["ds2_local_gen"]]
    assert len(our_texts) == 6 and our_texts == their_texts
    assert any(text.strip() for text in our_texts)             # the model generated something to compare


def test_the_command_line_takes_lm_evals_flags(folder, both, tmp_path):
    """deepseek2-lm-eval (lm-eval's own CLI with our model registered): the multiple-choice task's accuracy as
    simple_evaluate gave it; the tokenizer defaults to the checkpoint folder's tokenizer.json."""
    _, ours = both
    proc = subprocess.run([sys.executable, "-m", "research.deepseek2.evaluation.lm_eval_model", "--model",
                           "deepseek2-mindspore", "--model_args",
                           f"config={folder / 'model.yaml'},load_checkpoint={folder / 'hf'}", "--tasks",
                           "ds2_local_mc", "--include_path", TASKS, "--batch_size", "2", "--output_path",
                           str(tmp_path / "results")], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=ROOT, HF_DATASETS_OFFLINE="1",
                                   LOCAL_DEFAULT_PATH=str(tmp_path / "logs")), check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "results") for f in files
               if f.startswith("results") and f.endswith(".json")]
    assert len(written) == 1, written
    with open(written[0], encoding="utf-8") as handle:
        accuracy = json.load(handle)["results"]["ds2_local_mc"]["acc,none"]
    assert accuracy == ours["results"]["ds2_local_mc"]["acc,none"]


def test_rolling_log_likelihoods_equal_lm_evals_hf_model(folder):
    """loglikelihood_rolling (perplexity tasks) with both models cut to 16-token windows: two documents of several
    windows each, equal sums within 1e-4 (the windows themselves are lm-eval's, the scores each model's own)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from research.deepseek2.evaluation.lm_eval_model import DeepseekV2LM
    documents = ["def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n\nprint(add(2, 3), mul(4, 5))\n",
                 "Write a function that sorts a list of numbers and returns the largest one, then print the list "
                 "and its length."]
    requests = [Instance("loglikelihood_rolling", {}, (text,), index) for index, text in enumerate(documents)]
    theirs = HFLM(pretrained=str(folder / "hf"), device="cpu", batch_size=2, dtype="float32", max_length=16)
    ours = DeepseekV2LM(config=str(folder / "model.yaml"), load_checkpoint=str(folder / "hf"), batch_size=2,
                        max_length=16)
    assert all(len(ours.tok_encode(text)) > 32 for text in documents)        # three windows or more each
    their_scores = theirs.loglikelihood_rolling(requests, disable_tqdm=True)
    our_scores = ours.loglikelihood_rolling(requests, disable_tqdm=True)
    np.testing.assert_allclose(our_scores, their_scores, rtol=0, atol=1e-4)
    assert all(score < -10 for score in our_scores)


def test_unknown_model_args_are_refused_naming_them(folder):
    from research.deepseek2.errors import EvaluationError
    from research.deepseek2.evaluation.lm_eval_model import DeepseekV2LM
    with pytest.raises(EvaluationError, match="--model_args checkpoint: not a key of deepseek2-mindspore"):
        DeepseekV2LM(config=str(folder / "model.yaml"), load_checkpoint=str(folder / "hf"), checkpoint="x")
    with pytest.raises(EvaluationError, match="tokenizer_file=.*no such file"):
        DeepseekV2LM(config=str(folder / "model.yaml"), load_checkpoint=str(folder / "hf"),
                     tokenizer_file=str(folder / "none.json"))
