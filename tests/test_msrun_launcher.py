"""Tests of scripts/msrun_launcher.sh: argument handling (fast) and real msrun jobs on 127.0.0.1 (mccl on CPU).

The multi-process tests run tests/_mccl_probe.py (init + AllReduce + a result file per rank). They keep the
cluster timeout short and lower MindSpore's heartbeat timeout (MS_NODE_TIMEOUT) so a failed job is noticed in
seconds, and they start independent jobs concurrently (each on its own free port) to keep the file fast.
"""
import json
import os
import subprocess
import sys

import pytest

from _launch import (ROOT as REPO, TIMEOUT, Job, free_port, launch_env, launcher_argv, read_text, run_launcher,
                     start_launcher, wait_all)

PROBE = os.path.join(REPO, "tests", "_mccl_probe.py")
JOB_TIMEOUT = 240     # seconds before a test gives up on a launcher
CLUSTER_TIME_OUT = "90"


def _env(tmp_path):
    """MS_NODE_TIMEOUT is the heartbeat timeout: the scheduler notices a dead worker within ~10 s.
    GLOG_v=2: fewer INFO lines in the logs."""
    return launch_env(tmp_path / "mf_output", 2, MS_NODE_TIMEOUT="10")


def _run_fast(args, cwd, tmp_path):
    return run_launcher(args, cwd, _env(tmp_path), timeout=60)


def _job(args, cwd, tmp_path, name):
    """One launcher invocation running in the background."""
    return start_launcher(name, args, cwd, _env(tmp_path), tmp_path / f"{name}.console")


def _wait_all(jobs):
    codes = wait_all(jobs, JOB_TIMEOUT)
    for job, code in zip(jobs, codes):
        if code == TIMEOUT:
            pytest.fail(f"launcher job {job.name} did not finish in {JOB_TIMEOUT} s:\n{job.console()[-3000:]}")
    return codes


def _results(out_dir):
    found = {}
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        with open(os.path.join(out_dir, name), encoding="utf-8") as handle:
            record = json.load(handle)
        found[record["rank"]] = record
    return found


# ---------------------------------------------------------------------------------------------- usage (fast)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_usage_and_exits_0(flag, tmp_path):
    result = _run_fast([flag], tmp_path, tmp_path)
    assert result.returncode == 0
    for word in ("Usage", "WORKER_NUM", "LOCAL_WORKER", "MASTER_ADDR", "NODE_RANK", "CLUSTER_TIME_OUT"):
        assert word in result.stdout


@pytest.mark.parametrize("count", [0, 3, 4, 5, 7, 8, 10])
def test_wrong_argument_count_exits_2(count, tmp_path):
    args = [PROBE] + ["1"] * (count - 1) if count else []
    result = _run_fast(args, tmp_path, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Usage" in result.stderr
    assert f"got {count}" in result.stderr


@pytest.mark.parametrize("args, field", [
    (["2x"], "WORKER_NUM"),
    (["0"], "WORKER_NUM"),
    (["two", "8118", "log", "False", "60"], "WORKER_NUM"),
    (["2", "port", "log", "False", "60"], "MASTER_PORT"),
    (["2", "8118", "log", "maybe", "60"], "JOIN"),
    (["2", "8118", "log", "False", "1h"], "CLUSTER_TIME_OUT"),
    (["2", "one", "127.0.0.1", "8118", "0", "log", "False", "60"], "LOCAL_WORKER"),
    (["2", "1", "127.0.0.1", "99999", "0", "log", "False", "60"], "MASTER_PORT"),
    (["2", "1", "127.0.0.1", "8118", "first", "log", "False", "60"], "NODE_RANK"),
    (["2", "4", "127.0.0.1", "8118", "0", "log", "False", "60"], "LOCAL_WORKER"),
    (["4", "2", "127.0.0.1", "8118", "2", "log", "False", "60"], "NODE_RANK"),
])
def test_bad_values_exit_2_naming_the_field(args, field, tmp_path):
    result = _run_fast([PROBE, *args], tmp_path, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert field in result.stderr and "Usage" in result.stderr
    assert not (tmp_path / "log").exists()            # rejected before anything is created or started


def test_missing_script_exits_2(tmp_path):
    result = _run_fast(["no_such_dir/run.py --x 1", "2"], tmp_path, tmp_path)
    assert result.returncode == 2
    assert "no_such_dir/run.py" in result.stderr and "not found" in result.stderr


def test_unbalanced_quotes_exit_2(tmp_path):
    result = _run_fast([f"{PROBE} --out_dir 'unclosed", "2"], tmp_path, tmp_path)
    assert result.returncode == 2
    assert "cannot split CMD" in result.stderr


def _dry_run(args, cwd, tmp_path):
    env = _env(tmp_path)
    env["MSRUN_LAUNCHER_DRY_RUN"] = "1"
    return run_launcher(args, cwd, env, timeout=60)


@pytest.mark.parametrize("args, expected", [
    ([], {"worker_num": "8", "local_worker_num": "8", "master_addr": "127.0.0.1", "master_port": "8118",
          "node_rank": "0", "log_dir": "output/msrun_log", "join": "True", "cluster_time_out": "7200",
          "tail_worker_log": "8"}),
    (["4"], {"worker_num": "4", "local_worker_num": "4", "master_port": "8118", "log_dir": "output/msrun_log",
             "cluster_time_out": "7200"}),
    (["4", "9000", "logs", "True", "300"], {"worker_num": "4", "local_worker_num": "4", "master_port": "9000",
                                             "log_dir": "logs", "cluster_time_out": "300", "tail_worker_log": "-1"}),
    (["64", "8", "127.0.0.1", "9543", "0", "out/log", "False", "3000"],
     {"worker_num": "64", "local_worker_num": "8", "master_port": "9543", "node_rank": "0", "log_dir": "out/log",
      "cluster_time_out": "3000", "join": "True"}),
])
def test_four_forms_and_defaults(args, expected, tmp_path):
    """Dry run: the msrun command each form builds (JOIN False still joins; it only stops tailing worker logs)."""
    result = _dry_run([f"{PROBE} --x 1", *args], tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    line = [l for l in result.stdout.splitlines() if "dry run: " in l][0]
    for key, value in expected.items():
        if key == "log_dir":
            value = str(tmp_path / value)
        assert f"--{key}={value} " in line, (key, line)
    assert line.rstrip().endswith(f"{PROBE} --x 1")
    assert not (tmp_path / "output").exists()                          # a dry run creates nothing


def test_readme_style_command_from_a_subfolder(tmp_path):
    """README form: run from research/deepseek2 with "../../run_mindformer.py ... --predict_data '...'"."""
    (tmp_path / "research" / "deepseek2").mkdir(parents=True)
    (tmp_path / "run_mindformer.py").write_text("print('hi')\n", encoding="utf-8")
    cmd = ("../../run_mindformer.py --config run_predict_deepseek2_236B.yaml --run_mode=predict "
           "--predict_data 'An attention function can be described' --predict_length 128 --use_parallel True")
    result = _dry_run([cmd, "16", "8", "127.0.0.1", "8421", "0", "output/msrun_log", "False", "300"],
                      tmp_path / "research" / "deepseek2", tmp_path)
    assert result.returncode == 0, result.stderr
    line = [l for l in result.stdout.splitlines() if "dry run: " in l][0]
    assert f" {tmp_path / 'run_mindformer.py'} --config" in line
    assert r"--predict_data An\ attention\ function\ can\ be\ described --predict_length" in line
    assert f"PYTHONPATH={REPO}" in result.stdout
    for rank in range(8):
        assert str(tmp_path / "research" / "deepseek2" / "output" / "msrun_log" / f"worker_{rank}.log") in result.stdout


def test_second_node_on_local_master_gets_msrun_worker_environment(tmp_path):
    result = _dry_run([PROBE, "16", "8", "127.0.0.1", "8421", "1", "logs", "False", "300"], tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if "dry run: " in l]
    assert len(lines) == 8                                              # ranks 8..15, no scheduler
    for local, line in enumerate(lines):
        rank = 8 + local
        for item in ("MS_WORKER_NUM=16", "MS_SCHED_HOST=127.0.0.1", "MS_SCHED_PORT=8421", "MS_TOPO_TIMEOUT=300",
                     "MS_ROLE=MS_WORKER", f"MS_NODE_ID={rank}", f"RANK_ID={rank}", "RANK_SIZE=16",
                     f"DEVICE_ID={local}"):
            assert item in line.split(), (item, line)
    assert "scheduler log" not in result.stdout


# ---------------------------------------------------------------------------------------------- real jobs
@pytest.mark.slow
@pytest.mark.msrun
def test_two_workers_one_node_and_two_nodes_one_host(tmp_path):
    """2 workers on one node, and 2 nodes x 1 worker (two launcher calls) on 127.0.0.1, run side by side.

    The script is given relative to a working directory that is not the repo, as the README does from
    research/deepseek2 ("../../run_mindformer.py ...").
    """
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    probe_rel = os.path.relpath(PROBE, work)
    port_one, port_two = free_port(), free_port()
    jobs = [   # 'one node': a quoted argument with a space must reach the script whole (README's --predict_data)
        _job([f"{probe_rel} --out_dir 'one node'", "2", str(port_one), "logs_one", "False", CLUSTER_TIME_OUT],
             work, tmp_path, "one_node"),
        _job([f"python {probe_rel} --out_dir two_nodes", "2", "1", "127.0.0.1", str(port_two), "0", "logs_n0",
              "False", CLUSTER_TIME_OUT], work, tmp_path, "node0"),
        _job([f"{probe_rel} --out_dir two_nodes", "2", "1", "127.0.0.1", str(port_two), "1", "logs_n1", "True",
              CLUSTER_TIME_OUT], work, tmp_path, "node1"),
    ]
    codes = _wait_all(jobs)
    for job, code in zip(jobs, codes):
        assert code == 0, f"{job.name} exited {code}:\n{job.console()[-3000:]}"

    for out_dir in ("one node", "two_nodes"):
        results = _results(work / out_dir)
        assert sorted(results) == [0, 1], f"{out_dir}: result files for ranks {sorted(results)}"
        for record in results.values():
            assert record["size"] == 2 and record["ok"]
            assert record["allreduce"] == [3.0, 6.0, 9.0, 12.0]          # (1 + 2) * [1, 2, 3, 4]
            assert record["pythonpath"].split(os.pathsep)[0] == REPO      # project root first on PYTHONPATH
            assert record["cwd"] == str(work)

    one = jobs[0].console()
    for name in ("worker_0.log", "worker_1.log", "scheduler.log"):
        assert str(work / "logs_one" / name) in one                      # where each log is, printed
        assert (work / "logs_one" / name).is_file()
    # node 0 runs msrun (scheduler + rank 0); node 1 starts rank 1 without a second scheduler
    assert (work / "logs_n0" / "scheduler.log").is_file() and (work / "logs_n0" / "worker_0.log").is_file()
    assert (work / "logs_n1" / "worker_1.log").is_file() and not (work / "logs_n1" / "scheduler.log").exists()
    assert "without a second msrun scheduler" in jobs[2].console()
    assert "probe: rank 1 allreduce" in jobs[2].console()                # JOIN True streams the worker log


@pytest.mark.slow
@pytest.mark.msrun
def test_failing_worker_makes_launcher_fail(tmp_path):
    """A worker exiting 3 after init(): non-zero with JOIN True, and on both nodes of a 2-node job (JOIN False on
    one node: test_msrun_jobs_report_failed_workers_error_lines_and_passing_jobs_none)."""
    ports = [free_port() for _ in range(2)]
    fail = f"{PROBE} --out_dir {tmp_path / 'res'} --fail_rank 1"
    jobs = [
        _job([fail, "2", str(ports[0]), "logs_true", "True", CLUSTER_TIME_OUT], tmp_path, tmp_path, "join_true"),
        _job([fail, "2", "1", "127.0.0.1", str(ports[1]), "0", "logs_n0", "False", CLUSTER_TIME_OUT], tmp_path,
             tmp_path, "node0"),
        _job([fail, "2", "1", "127.0.0.1", str(ports[1]), "1", "logs_n1", "False", CLUSTER_TIME_OUT], tmp_path,
             tmp_path, "node1"),
    ]
    codes = _wait_all(jobs)
    for job, code in zip(jobs, codes):
        assert code != 0, f"{job.name} exited 0 though rank 1 failed:\n{job.console()[-3000:]}"
        assert "job FAILED" in job.console()
    assert "probe: rank 1 fails on purpose" in (tmp_path / "logs_true" / "worker_1.log").read_text()
    assert "worker rank 1 (pid" in jobs[2].console() and "exited with status 3" in jobs[2].console()
    # the probe's exit leaves no error line in its log: the report shows the log's last lines instead
    assert (f"rank 1 failed (exit status 3); no error line in {tmp_path / 'logs_n1' / 'worker_1.log'}, its last lines:"
            in jobs[2].console())
    assert "    probe: rank 1 fails on purpose" in jobs[2].console()
    # no worker left behind
    left = subprocess.run(["pgrep", "-f", fail], capture_output=True, text=True, check=False).stdout.split()
    assert not left, f"probe processes still running: {left}"


# ---------------------------------------------------------------------------------------------- failure report
USAGE_ERROR = "run_mindformer.py: error: parallel_config.model_parallel = 1 but 2 ranks were launched"
VALUE_ERROR = "ValueError: distinctive failure 7f3a on rank {rank}"
NOISE_MARK = "NOISE_MARK"
REPORT_MARKS = ("error lines of", "its last lines", "failed (exit status")   # in every report block's header
FAILING_WORKER = f'''"""Worker for the failure-report tests of scripts/msrun_launcher.sh: HOW FAIL_RANKS [init] [spam].

Prints MindSpore/MindFormers-style INFO/WARNING noise mentioning errors, with "init" joins the cluster, with
"spam" prints 20 distinct and then 40 near-identical error lines; then the ranks in FAIL_RANKS (RANK_ID,
comma-separated) fail as HOW says ("usage": exit with a run_mindformer.py-style usage error, "value": a ValueError
two calls deep) while the other ranks sleep until killed. With no failing rank, every rank prints a harmless
line with the word Error and exits 0.
"""
import os, sys, time

how, fail_ranks, flags = sys.argv[1], {{int(r) for r in sys.argv[2].split(",") if r}}, sys.argv[3:]
print("[WARNING] ME(11:22,MainProcess):2026-11-30-12:00:00.000.000 [noise.py:1] {NOISE_MARK} an Error warning")
print("2026-11-30 12:00:00,000 - mindformers[noise.py:2] - INFO - {NOISE_MARK} Exception-looking info")
sys.stdout.flush()
if "init" in flags:
    from mindspore.communication import init
    init()
    if os.environ.get("MS_ROLE") == "MS_SCHED":      # msrun's scheduler runs this script too
        sys.exit(0)
rank = int(os.environ["RANK_ID"])
if "spam" in flags:
    for i in range(20):
        print(f"distinct error " + chr(ord("A") + i))
    for i in range(40):
        print(f"attempt {{i}}: connection error {{i}}")
sys.stdout.flush()


def load(rank):
    check(rank)


def check(rank):
    raise ValueError(f"distinctive failure 7f3a on rank {{rank}}")


if rank in fail_ranks:
    if how == "usage":
        sys.exit("{USAGE_ERROR}")
    load(rank)
if fail_ranks:
    time.sleep(120)
print("training note: Error-free so far")
'''


def _failing_worker(tmp_path):
    """The worker script above, written into tmp_path; its path."""
    path = tmp_path / "failing_worker.py"
    path.write_text(FAILING_WORKER, encoding="utf-8")
    return str(path)


def _blocks(stderr):
    """The failure report's blocks in the launcher's stderr: {header line: [its indented lines]}."""
    blocks, current = {}, None
    for line in stderr.splitlines():
        if line.startswith("msrun_launcher.sh: ") and any(mark in line for mark in REPORT_MARKS[:2]):
            current = blocks.setdefault(line, [])
        elif current is not None and line.startswith("    "):
            current.append(line[4:])
        else:
            current = None
    return blocks


def _assert_no_report(stderr):
    for mark in REPORT_MARKS:
        assert mark not in stderr, stderr[-3000:]


class _SplitJob(Job):
    """A launcher call in the background like start_launcher's, but with stderr in its own file."""

    def __init__(self, name, args, cwd, env, tmp_path):  # pylint: disable=super-init-not-called
        self.name, self.console_path = name, tmp_path / f"{name}.console"
        self.stderr_path = tmp_path / f"{name}.stderr"
        self._out = open(self.console_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
        with open(self.stderr_path, "w", encoding="utf-8") as err:
            self.proc = subprocess.Popen(launcher_argv(args), cwd=cwd, env=env, stdout=self._out, stderr=err,
                                         start_new_session=True)
        self.returncode = None

    def stderr(self):
        return read_text(self.stderr_path)

    def console(self):
        return read_text(self.console_path) + read_text(self.stderr_path)


@pytest.mark.slow
@pytest.mark.msrun
def test_direct_worker_failure_reports_its_last_error_lines(tmp_path):
    """Node 1 of 2 on this host (workers started without msrun): rank 3 raises, rank 2 is killed by the launcher.

    The report names rank 3's log, ends with the exception, keeps at most 15 lines (the latest), folds lines that
    differ only in numbers, leaves out INFO/WARNING noise, and says nothing of the killed rank 2.
    """
    script = _failing_worker(tmp_path)
    result = run_launcher([f"{script} value 3 spam", "4", "2", "127.0.0.1", str(free_port()), "1", "logs", "False",
                           "60"], tmp_path, _env(tmp_path), timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    log = tmp_path / "logs" / "worker_3.log"
    header = f"msrun_launcher.sh: rank 3 failed (exit status 1); last error lines of {log}:"
    blocks = _blocks(result.stderr)
    assert list(blocks) == [header], result.stderr
    lines = blocks[header]
    assert 0 < len(lines) <= 16, lines                           # 15 lines and one "..." for the left-out frames
    assert lines[-1] == VALUE_ERROR.format(rank=3)                  # the cause last
    # the traceback shortened to its last frame (the one that raised, with its code line)
    assert lines[-5:-1] == ["Traceback (most recent call last):", "  ...", lines[-3],
                            '    raise ValueError(f"distinctive failure 7f3a on rank {rank}")'], lines
    assert lines[-3].startswith(f'  File "{script}"') and lines[-3].endswith("in check"), lines
    assert "distinct error T" in lines and "distinct error A" not in lines            # the latest kept
    assert "attempt 39: connection error 39  [40 similar lines]" in lines
    assert NOISE_MARK not in result.stderr and "worker_2.log" not in result.stderr
    assert "job FAILED (status 1)" in result.stderr


@pytest.mark.slow
@pytest.mark.msrun
def test_direct_worker_usage_error_is_reported(tmp_path):
    """A worker exiting with a run_mindformer.py-style usage message: that line is the report's cause."""
    script = _failing_worker(tmp_path)
    result = run_launcher([f"{script} usage 1", "2", "1", "127.0.0.1", str(free_port()), "1", "logs", "False", "60"],
                          tmp_path, _env(tmp_path), timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    log = tmp_path / "logs" / "worker_1.log"
    assert _blocks(result.stderr) == {
        f"msrun_launcher.sh: rank 1 failed (exit status 1); last error lines of {log}:":
            [USAGE_ERROR]}, result.stderr


@pytest.mark.slow
@pytest.mark.msrun
def test_direct_workers_passing_print_no_report(tmp_path):
    """Workers that exit 0 print no report, even though their logs hold lines with the word Error."""
    script = _failing_worker(tmp_path)
    result = run_launcher([f"{script} value ''", "4", "2", "127.0.0.1", str(free_port()), "1", "logs", "False",
                           "60"], tmp_path, _env(tmp_path), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Error-free" in (tmp_path / "logs" / "worker_3.log").read_text(encoding="utf-8")
    _assert_no_report(result.stderr)


@pytest.mark.slow
@pytest.mark.msrun
def test_msrun_jobs_report_failed_workers_error_lines_and_passing_jobs_none(tmp_path):
    """Real msrun jobs (2 workers on 127.0.0.1, init() first), run side by side:

    * both ranks exit with run_mindformer.py's usage error: the report shows that line and a failed log's path;
    * rank 1 raises a ValueError, rank 0 is killed by msrun: the report shows rank 1's log and the exception,
      and not rank 0's log (killed, no error in it);
    * no rank fails (JOIN True): exit 0 and no report, though the logs hold a line with the word Error.
    msrun does not say which rank failed, so the report is about the worker logs that show errors.
    """
    script = _failing_worker(tmp_path)
    env = _env(tmp_path)
    jobs = [_SplitJob(name, [f"{script} {how} init", "2", str(free_port()), f"logs_{name}", join, CLUSTER_TIME_OUT],
                      tmp_path, env, tmp_path)
            for name, how, join in (("usage", "usage 0,1", "False"), ("value", "value 1", "False"),
                                    ("passing", "value ''", "True"))]
    codes = _wait_all(jobs)
    usage, value, passing = jobs

    assert codes[0] != 0, usage.console()[-3000:]
    blocks = _blocks(usage.stderr())
    logs = [tmp_path / "logs_usage" / f"worker_{rank}.log" for rank in (0, 1)]
    headers = [f"msrun_launcher.sh: rank {rank} log shows errors; last error lines of {log}:"
               for rank, log in enumerate(logs)]
    assert blocks and set(blocks) <= set(headers), usage.stderr()[-3000:]
    for lines in blocks.values():
        assert lines[-1] == USAGE_ERROR, lines
    assert NOISE_MARK not in usage.stderr()

    assert codes[1] != 0, value.console()[-3000:]
    log = tmp_path / "logs_value" / "worker_1.log"
    blocks = _blocks(value.stderr())
    assert list(blocks) == [f"msrun_launcher.sh: rank 1 log shows errors; last error lines of {log}:"], \
        value.stderr()[-3000:]
    lines = list(blocks.values())[0]
    assert lines[-1] == VALUE_ERROR.format(rank=1) and "Traceback (most recent call last):" in lines, lines
    assert "worker_0.log" not in value.stderr() and NOISE_MARK not in value.stderr()
    assert value.stderr().rstrip().endswith(f"job FAILED (status {codes[1]}); see the logs in {log.parent}")

    assert codes[2] == 0, passing.console()[-3000:]
    assert "Error-free" in (tmp_path / "logs_passing" / "worker_1.log").read_text(encoding="utf-8")
    _assert_no_report(passing.stderr())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
