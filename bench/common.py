"""Shared pieces of the benchmarks: small model configs, the PyTorch reference, weights, memory, subprocess workers.

The benchmarks are scripts run by hand, not tests. Each figure is measured in its own worker process (one per
framework) so that peak memory belongs to one framework only; the driver process stays light (no torch, no
MindSpore) and prints the side-by-side table.

Weights: the reference worker builds transformers' DeepseekV2ForCausalLM with a fixed seed and saves its state
(Hugging Face names, float32) to an .npz; our worker loads that file and maps it through
``research.deepseek2.checkpoints.weight_map`` (the same table the parity tests use), so both frameworks run the same weights.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `import mindformers` writes output/log under the working directory unless pointed elsewhere
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(tempfile.gettempdir(), "ds2_bench_logs"))
os.environ.setdefault("GLOG_v", "3")                  # MindSpore's C++ log: errors only
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULT_MARK = "BENCH_RESULT_FILE"

# The released DeepSeek-V2 field names (Hugging Face config.json); both frameworks read the same dict.
COMMON_FIELDS = dict(topk_method="greedy", n_group=1, topk_group=1, moe_layer_freq=1, first_k_dense_replace=1,
                     norm_topk_prob=False, routed_scaling_factor=1.0, rope_theta=10000.0, rope_scaling=None,
                     rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=1, aux_loss_alpha=0.0,
                     attention_bias=False, tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) since the process started or since the last ``reset_peak_rss``."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5). False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- reference
def _reference():
    """tests/reference.py, the one builder of the PyTorch reference (test code, not installed with the package)."""
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import reference  # pylint: disable=import-outside-toplevel
    return reference


def hf_config(fields: dict):
    """transformers' DeepseekV2Config for ``fields``, eager attention (the reference path of the parity tests)."""
    return _reference().hf_config(fields)


def build_reference(fields: dict, seed: int = 0):
    """transformers' DeepseekV2ForCausalLM with the benchmark's seeded weights (``reference.WEIGHTS["benchmark"]``:
    matrices N(0, 1/fan_in), norms 1, embeddings N(0, 1), a balanced router) and the released YaRN factor."""
    return _reference().build_reference(fields, seed, weights="benchmark")


def save_reference_weights(model, path: str) -> None:
    """The reference's state (HF names, float32) to ``path`` (.npz), written under a temporary name then renamed."""
    import numpy as np
    from research.deepseek2.fileio import staged_path
    arrays = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    with staged_path(path) as tmp:
        with open(tmp, "wb") as handle:                   # a file object: np.savez would append ".npz" to a name
            np.savez(handle, **arrays)


def load_weights_into_ms(net, path: str, n_routed_experts: int) -> None:
    """Load an .npz written by ``save_reference_weights`` into our model through weight_map (strict)."""
    import numpy as np
    import mindspore as ms
    from research.deepseek2.checkpoints.weight_map import hf_state_to_ms
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    params = {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in hf_state_to_ms(arrays, n_routed_experts).items()}
    not_loaded, unused = ms.load_param_into_net(net, params, strict_load=True)
    from research.deepseek2.planning.inventory import buffers
    missing = [n for n in not_loaded if n not in buffers(net.config)]
    if missing or unused:
        raise RuntimeError(f"{path}: weights do not fit the model: not loaded {missing[:5]}, unused {unused[:5]}")


def silence_mindformers() -> None:
    """Quiet MindFormers' logger (its generate logs every step at INFO, to stdout and to files)."""
    import logging
    from mindformers.tools.logger import get_logger
    get_logger().setLevel(logging.ERROR)          # the cached logger behind ``mindformers.tools.logger.logger``


# ---------------------------------------------------------------------------------------------- workers
def write_result(result: dict) -> None:
    """A worker's result, as JSON, to the file the driver named in the environment (atomic)."""
    path = os.environ.get(RESULT_MARK)
    if not path:
        print(json.dumps(result, indent=1))
        return
    from research.deepseek2.fileio import atomic_write_text
    atomic_write_text(path, json.dumps(result))


class WorkerFailed(RuntimeError):
    """A benchmark worker that exited non-zero or wrote no result: its exit code (negative: the signal that stopped
    it) and its output ("" with --verbose, where the output went to the screen)."""

    def __init__(self, message: str, returncode: int, output: str):
        super().__init__(message)
        self.returncode, self.output = returncode, output


def run_worker(script: str, argv: Sequence[str], label: str, verbose: bool = False,
               timeout: Optional[float] = None, memory_limit: Optional[int] = None) -> dict:
    """Run ``python script argv`` in a fresh process and return the dict it wrote with ``write_result``.

    The worker's output (MindSpore/MindFormers logs) is hidden unless ``verbose``; on failure its tail is shown.
    memory_limit: bytes of data segment (RLIMIT_DATA: heap and private mappings) the worker may allocate; past it
    an allocation fails in the worker (an error, not the kernel's OOM killer picking some other process).
    """
    def limit_memory():
        import resource
        resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
    with tempfile.TemporaryDirectory(prefix="ds2_bench_") as tmp:
        result_path = os.path.join(tmp, "result.json")
        env = dict(os.environ, **{RESULT_MARK: result_path})
        cmd = [sys.executable, script] + list(argv)
        start = time.perf_counter()
        load_before = load_average()
        print(f"[bench] {label} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, cwd=tmp, timeout=timeout, text=True,
                              preexec_fn=limit_memory if memory_limit else None,
                              stdout=None if verbose else subprocess.PIPE,
                              stderr=None if verbose else subprocess.STDOUT)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not os.path.exists(result_path):
            tail, log = "", ""
            if not verbose:
                fd, log = tempfile.mkstemp(prefix="ds2_bench_failed_", suffix=".log")
                with os.fdopen(fd, "w") as handle:
                    handle.write(proc.stdout or "")
                tail = "\n".join((proc.stdout or "").splitlines()[-40:]) + f"\n(whole worker log: {log})"
            raise WorkerFailed(f"benchmark worker {label!r} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}",
                               proc.returncode, proc.stdout or "")
        with open(result_path) as handle:
            result = json.load(handle)
        print(f"[bench] {label} done in {wall:.0f} s", file=sys.stderr, flush=True)
        WORKER_LOADS.append((label, load_before, load_average(), wall))
        return result


WORKER_LOADS: List[tuple] = []      # (label, load before, load after, seconds) of every worker run so far


def worker_load_lines() -> List[str]:
    """One line per worker: its wall time and the 1-minute load average around it (2 = both cores busy)."""
    return [f"  {label}: {wall:.0f} s, load {before:.2f} -> {after:.2f}" for label, before, after, wall in WORKER_LOADS]


# ---------------------------------------------------------------------------------------------- printing
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(ours: Optional[float], ref: Optional[float]) -> str:
    if ours is None or ref is None or ref == 0:
        return "-"
    return f"{ours / ref:.2f}x"


def mib(nbytes: Optional[float]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2 ** 20:.1f}"


def table(headers: List[str], rows: List[List[object]]) -> str:
    """A GitHub-markdown table (readable in a terminal too)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]]
    return "\n".join(lines)


def machine_line() -> str:
    """One line on where the figures were taken (cores, CPU model, versions are added by the workers)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}"


def evict(path: str) -> None:
    """Drop a checkpoint's own files (a file, or every file under a folder) from the page cache: fsync, then
    posix_fadvise DONTNEED, so the next read comes from the disk. Touches no other file."""
    files = [os.path.join(d, n) for d, _, names in os.walk(path) for n in names] if os.path.isdir(path) else [path]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_average() -> float:
    """1-minute load average; above the core count other processes share the CPU and timings are unreliable."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def load_line(start: float) -> str:
    """The load before the run (other processes) and after it (includes the benchmark's own workers)."""
    end = load_average()
    line = (f"load average (1 min): {start:.2f} before the run, {end:.2f} after it (the benchmark's own workers "
            f"included) on {os.cpu_count()} cores")
    if start > 0.5 * (os.cpu_count() or 1) or end > 1.5 * (os.cpu_count() or 1):
        line += " -- other processes shared the CPU: timings are noisy, rerun on an idle machine"
    return "\n".join([line, "per worker (a worker alone brings the load towards the core count):"] + worker_load_lines())


def timed(fn, *args) -> float:
    """Wall time of ``fn(*args)`` in seconds (fn must block until its result exists)."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run_train_steps(step, warmup: int, steps: int) -> dict:
    """Times a training ``step()`` (returns the loss): the first call alone (it compiles), warmup - 1 more untimed,
    then ``steps`` timed calls. Peak RSS of the warm-up and of the timed steps, as the training table reports."""
    start = time.perf_counter()
    first_loss = step()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    peak_run = peak_rss_bytes()
    reset_peak_rss()
    rss_steady = rss_bytes()
    times = []
    last_loss = first_loss
    for _ in range(steps):
        start = time.perf_counter()
        last_loss = step()
        times.append(time.perf_counter() - start)
    peak_step = peak_rss_bytes()
    return dict(first_step_s=first, step_s=median(times), times=times, first_loss=first_loss, last_loss=last_loss,
                peak_run=max(peak_run, peak_step), rss_steady=rss_steady, peak_step=peak_step)
