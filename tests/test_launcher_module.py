"""Tests of research/deepseek2/run/launcher.py, the Python of scripts/msrun_launcher.sh, called directly (fast: no
msrun, no MindSpore): CMD splitting, the MASTER_ADDR probe, the failure report on hand-written logs, the workers
started without msrun, and the command line the launcher calls."""
import io
import os
import socket
import subprocess
import sys
import time

import pytest

from research.deepseek2.run import launcher as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACEBACK = [
    "Traceback (most recent call last):",
    '  File "/work/run_mindformer.py", line 30, in <module>',
    "    main(config)",
    '  File "/work/run_mindformer.py", line 12, in main',
    "    load(config)",
    '  File "/work/loader.py", line 7, in load',
    "    raise ValueError(f\"no checkpoint at {path}\")",
    "ValueError: no checkpoint at /ckpt/rank_0",
]
NOISE = [
    "[WARNING] ME(1234:5678,MainProcess):2026-11-30-12:00:00.000.000 [ops.py:1] an Error in a warning",
    "[INFO] ME(1234:5678,MainProcess):2026-11-30-12:00:00.000.000 [ops.py:2] Exception-looking info",
    "2026-11-30 12:00:00,000 - mindformers[trainer.py:3] - INFO - error count 0",
    "/work/x.py:12: UserWarning: this Error is only a warning",
]


def _cli(*args, cwd=ROOT):
    """``python -m research.deepseek2.run.launcher ARGS`` as the launcher runs it: (exit status, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "research.deepseek2.run.launcher", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _log(tmp_path, name, lines, age=None):
    """A log file ``name`` in tmp_path holding ``lines``; ``age`` seconds old if given. Its path as a string."""
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if age is not None:
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
    return str(path)


def _report(start_epoch, entries):
    """report_errors' result and what it printed, as lines."""
    out = io.StringIO()
    printed = L.report_errors(start_epoch, entries, out=out)
    return printed, out.getvalue().splitlines()


# ---------------------------------------------------------------------------------------------- the module itself
def test_imports_no_mindspore_or_mindformers():
    code = ("import sys, research.deepseek2.run.launcher\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mindspore', 'mindformers', 'numpy')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- CMD splitting
def test_split_command_groups_quoted_words_and_expands_nothing():
    text = """../../run_mindformer.py --predict_data 'An attention function' --name "a 'b' c" x\\ y '' $HOME *.py"""
    assert L.split_command(text) == ["../../run_mindformer.py", "--predict_data", "An attention function", "--name",
                                     "a 'b' c", "x y", "", "$HOME", "*.py"]


@pytest.mark.parametrize("text", ["run.py --data 'unclosed", 'run.py --data "unclosed', "run.py trailing\\"])
def test_split_command_rejects_bad_quotes(text):
    with pytest.raises(ValueError):
        L.split_command(text)


def test_split_output_is_rebuilt_word_for_word_by_bash_eval():
    """The launcher does `eval "CMD_WORDS=($(... split CMD))"`: each word must come back whole and literal."""
    text = """run.py --data 'a b' --x "it's" --glob '*.py' --var '$(rm -rf x)' --semi ';'"""
    code, out, err = _cli("split", text)
    assert code == 0, err
    words = subprocess.run(["bash", "-c", 'eval "W=($1)"; printf "%s\\n" "${W[@]}"', "_", out.strip()],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert words == ["run.py", "--data", "a b", "--x", "it's", "--glob", "*.py", "--var", "$(rm -rf x)", "--semi",
                     ";"]


def test_split_cli_bad_quotes_exit_2_with_the_reason():
    code, out, err = _cli("split", "run.py 'unclosed")
    assert code == 2 and out == ""
    assert err.strip() == "No closing quotation"


# ---------------------------------------------------------------------------------------------- MASTER_ADDR probe
@pytest.mark.parametrize("addr", ["127.0.0.1", " 127.0.0.1 ", "localhost"])
def test_probe_loopback_is_local(addr):
    ip, state = L.probe_master(addr)
    assert state == L.LOCAL
    assert ip in ("127.0.0.1", "::1")


def test_probe_unresolvable_name():
    assert L.probe_master("no-such-host.invalid") == (None, L.UNRESOLVED)


def test_probe_address_of_another_host_is_remote():
    assert L.probe_master("192.0.2.1") == ("192.0.2.1", L.REMOTE)       # TEST-NET-1: never this host's


def test_probe_loopback_is_local_without_binding(monkeypatch):
    """A loopback address is local even where a socket cannot bind it; any other address then is not."""
    class NoBind(socket.socket):
        def bind(self, address):
            raise OSError("bind refused")
    monkeypatch.setattr(L.socket, "socket", NoBind)
    assert L.probe_master("127.0.0.1") == ("127.0.0.1", L.LOCAL)
    assert L.probe_master("192.0.2.1") == ("192.0.2.1", L.REMOTE)


def test_probe_non_loopback_address_of_this_host_is_local():
    """An address of this host that is not loopback (the one it would send from) is found local by binding it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))                              # UDP: sends nothing, picks a source address
        except OSError:
            pytest.skip("no IPv4 route on this host")
        ip = sock.getsockname()[0]
    if ip.startswith("127."):
        pytest.skip("this host's only IPv4 address is loopback")
    assert L.probe_master(ip) == (ip, L.LOCAL)


@pytest.mark.parametrize("addr, code, out", [("127.0.0.1", 0, "127.0.0.1\n"), ("192.0.2.1", 1, "192.0.2.1\n"),
                                             ("no-such-host.invalid", 2, "")])
def test_probe_cli_exit_status_and_ip(addr, code, out):
    assert _cli("probe", addr)[:2] == (code, out)


# ---------------------------------------------------------------------------------------------- error lines
def test_traceback_frames_elided_down_to_the_one_that_raised():
    lines = ["step 1 loss 2.5"] + TRACEBACK + ["", "bye"]
    assert L.error_lines(lines) == [
        "Traceback (most recent call last):",
        "  ...",                                                          # two frames left out
        '  File "/work/loader.py", line 7, in load',
        "    raise ValueError(f\"no checkpoint at {path}\")",
        "ValueError: no checkpoint at /ckpt/rank_0",
    ]


def test_traceback_of_one_frame_has_no_ellipsis():
    lines = ["Traceback (most recent call last):", '  File "/w/a.py", line 1, in <module>', "    1 / 0",
             "             ~~^~~", "ZeroDivisionError: division by zero"]
    assert L.error_lines(lines) == ["Traceback (most recent call last):", '  File "/w/a.py", line 1, in <module>',
                                    "    1 / 0", "ZeroDivisionError: division by zero"]


def test_only_the_last_traceback_is_shortened_an_earlier_one_counts_as_error_lines():
    earlier = ["Traceback (most recent call last):", '  File "/w/a.py", line 1, in <module>',
               "KeyError: 'first'"]
    shown = L.error_lines(earlier + ["retrying"] + TRACEBACK)
    assert shown[-1] == "ValueError: no checkpoint at /ckpt/rank_0"
    assert "KeyError: 'first'" in shown and shown.count("Traceback (most recent call last):") == 2


def test_usage_error_line_is_the_cause():
    usage = "run_mindformer.py: error: argument --run_mode: invalid choice: 'trian'"
    lines = ["usage: run_mindformer.py [-h] [--config CONFIG] [--run_mode RUN_MODE]", usage]
    assert L.error_lines(lines) == [usage]
    # kept ahead of later error lines that fill the 15
    later = [f"teardown error {chr(ord('A') + i)}" for i in range(20)]
    shown = L.error_lines(lines + later)
    assert len(shown) == L.MAX_LINES and shown[0] == usage and shown[-1] == "teardown error T"


def test_mindspore_and_mindformers_info_and_warning_lines_are_left_out():
    assert L.error_lines(NOISE) == []
    assert L.error_lines(NOISE + ["RuntimeError: real one"] + NOISE) == ["RuntimeError: real one"]


def test_lines_differing_only_in_numbers_are_collapsed():
    lines = [f"attempt {i}: connection error {i * 7} at 10.0.0.{i}" for i in range(40)]
    assert L.error_lines(lines + ["other error"]) == [
        "attempt 39: connection error 273 at 10.0.0.39  [40 similar lines]", "other error"]


def test_over_long_line_is_cut():
    shown = L.error_lines(["E" * 500 + " error at the end"])
    assert shown == ["E" * L.MAX_CHARS + " ..."]


def test_at_most_15_lines_the_cause_and_the_latest_kept():
    lines = [f"distinct error {chr(ord('A') + i)}" for i in range(20)] + TRACEBACK
    shown = L.error_lines(lines)
    assert len(shown) == L.MAX_LINES + 1                                  # and one "  ..."
    assert shown[-1] == "ValueError: no checkpoint at /ckpt/rank_0"
    # the traceback keeps 4 lines (header, last frame, its code, the cause): the 11 latest others are J ... T
    assert "distinct error J" in shown and "distinct error I" not in shown
    assert shown.index("distinct error J") < shown.index("distinct error T")   # log order


def test_exception_lines_stop_at_a_separator():
    lines = TRACEBACK[:-1] + ["RuntimeError: first line", "  second line of the message", "-" * 20,
                              "C++ Call Stack: (For framework developers)"]
    shown = L.error_lines(lines)
    assert shown[-2:] == ["RuntimeError: first line", "  second line of the message"]


def test_no_error_line_gives_nothing():
    assert L.error_lines(["step 1", "step 2", ""]) == []


def test_last_lines_skip_blanks_and_noise():
    lines = [f"step {i}" for i in range(12)] + ["", NOISE[0], NOISE[2]]
    assert L.last_lines(lines) == [f"step {i}" for i in range(4, 12)]


def test_read_tail_strips_colours_and_the_cut_first_line(tmp_path):
    path = _log(tmp_path, "w.log", ["x" * 50, "\x1b[31mERROR\x1b[0m red  ", "end"])
    assert L.read_tail(path) == ["x" * 50, "ERROR red", "end"]
    assert L.read_tail(path, limit=30) == ["ERROR red", "end"]          # the first line read is partial


# ---------------------------------------------------------------------------------------------- the report
def test_failed_worker_report_names_the_log_and_shows_its_error_lines(tmp_path):
    log = _log(tmp_path, "worker_3.log", NOISE + TRACEBACK)
    printed, out = _report(0, [("failed:1", "rank 3", log)])
    assert printed
    assert out[0] == f"msrun_launcher.sh: rank 3 failed (exit status 1); last error lines of {log}:"
    assert out[1:] == ["    " + line for line in L.error_lines(NOISE + TRACEBACK)]
    assert out[-1] == "    ValueError: no checkpoint at /ckpt/rank_0"


def test_failed_worker_without_error_line_shows_its_last_lines(tmp_path):
    log = _log(tmp_path, "worker_1.log", ["probe: rank 1 of 2", NOISE[0], "probe: rank 1 fails on purpose"])
    printed, out = _report(0, [("failed:3", "rank 1", log)])
    assert printed
    assert out == [f"msrun_launcher.sh: rank 1 failed (exit status 3); no error line in {log}, its last lines:",
                   "    probe: rank 1 of 2", "    probe: rank 1 fails on purpose"]


def test_failed_worker_with_a_missing_log_is_said_so(tmp_path):
    log = str(tmp_path / "worker_0.log")
    printed, out = _report(0, [("failed:137", "rank 0", log)])
    assert printed
    assert out == [f"msrun_launcher.sh: rank 0 failed (exit status 137); cannot read its log {log}: "
                   "No such file or directory"]


def test_msrun_worker_logs_only_those_with_errors_and_none_older_than_the_job(tmp_path):
    """msrun does not say which rank failed: each worker log showing errors is reported, a clean one is not, and a
    log last written before the job started (an earlier job's) is skipped though it holds errors."""
    start = time.time()
    clean = _log(tmp_path, "worker_0.log", ["step 1", "killed"])
    failed = _log(tmp_path, "worker_1.log", TRACEBACK)
    old = _log(tmp_path, "worker_2.log", ["RuntimeError: from yesterday's job"], age=3600)
    missing = str(tmp_path / "worker_3.log")
    printed, out = _report(start, [("worker", "rank 0", clean), ("worker", "rank 1", failed),
                                   ("worker", "rank 2", old), ("worker", "rank 3", missing)])
    assert printed
    headers = [line for line in out if not line.startswith("    ")]
    assert headers == [f"msrun_launcher.sh: rank 1 log shows errors; last error lines of {failed}:"]
    assert "yesterday" not in "\n".join(out)


def test_scheduler_log_only_when_no_worker_log_shows_errors(tmp_path):
    start = time.time()
    clean = _log(tmp_path, "worker_0.log", ["step 1"])
    failed = _log(tmp_path, "worker_1.log", ["RuntimeError: worker side"])
    scheduler = _log(tmp_path, "scheduler.log", ["The node rank 1 is timed out: error"])

    printed, out = _report(start, [("worker", "rank 1", failed), ("scheduler", "scheduler", scheduler)])
    assert printed
    assert out == [f"msrun_launcher.sh: rank 1 log shows errors; last error lines of {failed}:",
                   "    RuntimeError: worker side"]

    printed, out = _report(start, [("worker", "rank 0", clean), ("scheduler", "scheduler", scheduler)])
    assert printed
    assert out == [f"msrun_launcher.sh: no worker log of this node shows an error; last error lines of {scheduler}:",
                   "    The node rank 1 is timed out: error"]


def test_nothing_to_report_prints_nothing(tmp_path):
    start = time.time()
    clean = _log(tmp_path, "worker_0.log", ["step 1", "saved checkpoint"])
    assert _report(start, [("worker", "rank 0", clean), ("scheduler", "scheduler", str(tmp_path / "none"))]) == \
        (False, [])


def test_report_cli_exit_status(tmp_path):
    failed = _log(tmp_path, "worker_1.log", TRACEBACK)
    clean = _log(tmp_path, "worker_0.log", ["step 1"])
    code, out, _ = _cli("report", "0", "worker", "rank 1", failed, "scheduler", "scheduler", clean)
    assert code == 0 and out.splitlines()[-1] == "    ValueError: no checkpoint at /ckpt/rank_0"
    assert _cli("report", str(time.time()), "worker", "rank 0", clean)[:2] == (1, "")
    assert _cli("report", "0", "worker", "rank 0")[0] == 2                     # not whole entries
    assert _cli("report", "soon", "worker", "rank 0", clean)[0] == 2
    assert _cli("nonsense")[0] == 2


# ---------------------------------------------------------------------------------------------- workers without msrun
WORKER = '''import os, sys, time
keys = ("MS_WORKER_NUM", "MS_SCHED_HOST", "MS_SCHED_PORT", "MS_TOPO_TIMEOUT", "MS_ROLE", "MS_NODE_ID", "RANK_ID",
        "RANK_SIZE", "DEVICE_ID")
print(" ".join(f"{k}={os.environ.get(k)}" for k in keys), "cwd=" + os.getcwd(), flush=True)
open(f"pid_{os.environ['RANK_ID']}", "w").write(str(os.getpid()))
if os.environ["RANK_ID"] == sys.argv[1]:
    time.sleep(1)                     # the other ranks have written their pid by then
    print("ValueError: rank", sys.argv[1], "gives up", flush=True)
    sys.exit(3)
if sys.argv[1] != "none":
    time.sleep(60)
'''


def _workers(tmp_path, first_rank=4, count=2):
    return [(first_rank + i, L.worker_environment(first_rank + i, i, 8, "127.0.0.1", 8118, 90),
             str(tmp_path / f"worker_{first_rank + i}.log")) for i in range(count)]


def test_worker_environment_is_msruns():
    assert L.worker_environment(9, 1, 16, "10.0.0.1", 8118, 300) == {
        "MS_WORKER_NUM": "16", "MS_SCHED_HOST": "10.0.0.1", "MS_SCHED_PORT": "8118", "MS_TOPO_TIMEOUT": "300",
        "MS_ROLE": "MS_WORKER", "MS_NODE_ID": "9", "RANK_ID": "9", "RANK_SIZE": "16", "DEVICE_ID": "1"}


def test_run_workers_passing(tmp_path, capsys):
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    workers = _workers(tmp_path)
    assert L.run_workers([sys.executable, str(script), "none"], workers, cwd=str(tmp_path), poll=0.1) == 0
    first = (tmp_path / "worker_4.log").read_text(encoding="utf-8")
    assert ("MS_WORKER_NUM=8 MS_SCHED_HOST=127.0.0.1 MS_SCHED_PORT=8118 MS_TOPO_TIMEOUT=90 MS_ROLE=MS_WORKER "
            f"MS_NODE_ID=4 RANK_ID=4 RANK_SIZE=8 DEVICE_ID=0 cwd={tmp_path}") in first
    assert "RANK_ID=5" in (tmp_path / "worker_5.log").read_text(encoding="utf-8")
    out, err = capsys.readouterr()
    assert f"msrun_launcher.sh: start worker rank 5 (RANK_ID=5, DEVICE_ID=1), log file: {workers[1][2]}" in out
    assert err == ""


def test_run_workers_one_fails_the_others_are_killed_and_it_is_reported(tmp_path, capsys):
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    workers = _workers(tmp_path)
    began = time.monotonic()
    assert L.run_workers([sys.executable, str(script), "5"], workers, cwd=str(tmp_path), poll=0.1) == 1
    assert time.monotonic() - began < 30                                  # rank 4 did not sleep its 60 s
    survivor = int((tmp_path / "pid_4").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)                                              # killed, and reaped
    err = capsys.readouterr().err
    pid = (tmp_path / "pid_5").read_text()
    assert f"msrun_launcher.sh: worker rank 5 (pid {pid}) exited with status 3; killing the others" in err
    assert (f"msrun_launcher.sh: rank 5 failed (exit status 3); last error lines of {workers[1][2]}:\n"
            "    ValueError: rank 5 gives up\n") in err
    assert "rank 4 failed" not in err


def test_run_workers_dry_run_starts_nothing(tmp_path, capsys):
    workers = _workers(tmp_path, first_rank=8, count=1)
    assert L.run_workers(["python", "/w/run.py", "--data", "a b"], workers, dry_run=True) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == ("msrun_launcher.sh: dry run: MS_WORKER_NUM=8 MS_SCHED_HOST=127.0.0.1 MS_SCHED_PORT=8118 "
                      "MS_TOPO_TIMEOUT=90 MS_ROLE=MS_WORKER MS_NODE_ID=8 RANK_ID=8 RANK_SIZE=8 DEVICE_ID=0 "
                      "python /w/run.py --data 'a b'")
    assert not os.listdir(tmp_path)
