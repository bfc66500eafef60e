"""The Python that ``scripts/msrun_launcher.sh`` needs, as plain functions a linter and the tests reach.

Standard library only (no MindSpore, no MindFormers): the launcher calls it before any worker starts and after the
job has ended.

* ``split_command(text)``: the launcher's CMD split into words the way a POSIX shell splits it;
* ``probe_master(addr)``: the IP that MASTER_ADDR resolves to, and whether it is an address of this host;
* ``error_lines(lines)`` / ``last_lines(lines)``: what of a failed worker's log is worth showing;
* ``report_errors(start_epoch, entries)``: the failure report over this node's worker logs (and the scheduler's);
* ``worker_environment(...)`` / ``run_workers(...)``: a node's workers started without msrun, for the launcher's
  several "nodes" on one host (see run_workers).

Command line (the launcher runs it with the project root on PYTHONPATH)::

    python -m research.deepseek2.run.launcher split CMD
        CMD's words, each shell-quoted, on one line (for bash's ``eval "WORDS=(...)"``); exit 2 on bad quotes
    python -m research.deepseek2.run.launcher probe ADDR
        the IP that ADDR resolves to; exit 0 if it is this host's, 1 if not, 2 if ADDR does not resolve
    python -m research.deepseek2.run.launcher report START_EPOCH KIND NAME LOG [KIND NAME LOG ...]
        the failure report on stdout (see report_errors); exit 0 if it printed something, 1 if not
    python -m research.deepseek2.run.launcher workers CWD WORKER_NUM FIRST_RANK LOCAL_WORKER SCHED_HOST SCHED_PORT
                                              TIMEOUT LOG_DIR JOIN DRY_RUN CMD [ARG ...]
        runs this node's workers (see run_workers): exit 0 if all exit 0, 1 if one fails, 130 if stopped
"""
import ipaddress
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

__all__ = ["split_command", "probe_master", "read_tail", "shorten", "error_lines", "last_lines", "report_errors",
           "worker_environment", "run_workers", "main", "LOCAL", "REMOTE", "UNRESOLVED"]

PROG = "msrun_launcher.sh"     # the report reads as the launcher's own output
LOCAL, REMOTE, UNRESOLVED = 0, 1, 2                   # probe_master's states, also `probe`'s exit status
MAX_LINES = 15                 # error lines shown per log
MAX_CHARS = 300                # a longer line is cut
LAST_LINES = 8                 # lines shown of a failed worker's log that holds no error line
TAIL_BYTES = 1 << 20           # only the end of a log is read
ERROR = re.compile(r"error|Error|ERROR|Traceback|Exception")
NOISE = re.compile(r"^\s*\[(DEBUG|INFO|WARNING|WARN)\]"          # MindSpore: [WARNING] ME(pid,...):time [...] ...
                   r"|^\S.{0,200}? - (DEBUG|INFO|WARNING) - "      # MindFormers: time - name[file:line] - INFO - ...
                   r"|^\S+:\d+: [A-Z]\w*Warning: ")                # Python warnings: file.py:12: UserWarning: ...
USAGE_ERROR = re.compile(r"^\S+: error: ")                         # argparse-style: run_mindformer.py: error: ...
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TRACEBACK = "Traceback (most recent call last)"
FRAME = 'File "'               # a traceback frame's first line, after its indent
CAUSE, CONTEXT, OTHER = 0, 1, 2                       # error_lines' priorities: lower is kept first
USAGE = __doc__[__doc__.index("    python -m"):] if __doc__ else "    python -m research.deepseek2.run.launcher " \
    "split|probe|report|workers ...\n"                # python -OO drops docstrings


def split_command(text: str) -> list:
    """``text`` split into words as a POSIX shell would: quotes group words, nothing is expanded.

    Raises ValueError on an unclosed quote or a trailing backslash."""
    return shlex.split(text)


def probe_master(addr: str) -> tuple:
    """``(ip, state)``: the IP that ``addr`` resolves to (blanks and the brackets of "[::1]" dropped) and LOCAL
    (a loopback address, or one a socket of this host can bind), REMOTE, or UNRESOLVED (``ip`` None)."""
    try:
        ip = socket.getaddrinfo(addr.strip().strip("[]"), None, socket.AF_UNSPEC, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        return None, UNRESOLVED
    if ipaddress.ip_address(ip).is_loopback:
        return ip, LOCAL
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((ip, 0))          # binding works only for an address of this host
        except OSError:
            return ip, REMOTE
    return ip, LOCAL


def read_tail(path: str, limit: int = TAIL_BYTES) -> list:
    """The last ``limit`` bytes of the log ``path`` as lines: decoded (bad bytes replaced), colour codes and trailing
    blanks dropped, and the first line left out when the file was longer (it may be cut). Raises OSError."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - limit))
        data = handle.read()
    lines = [ANSI.sub("", line).rstrip() for line in data.decode("utf-8", "replace").splitlines()]
    return lines[1:] if size > limit else lines


def shorten(line: str) -> str:
    """``line`` cut to MAX_CHARS characters, " ..." added where it was cut."""
    return line if len(line) <= MAX_CHARS else line[:MAX_CHARS] + " ..."


def _final_traceback(lines: list) -> tuple:
    """The last traceback of ``lines``: ``((first, last), {index: priority})`` with its first and last line and the
    lines to keep of it (its header, the frame that raised with its code line, the exception lines); (None, {}) if
    ``lines`` hold no traceback."""
    tb = max((i for i, line in enumerate(lines) if line.startswith(TRACEBACK)), default=None)
    if tb is None:
        return None, {}
    keep = {tb: CONTEXT}
    i, frame = tb + 1, None
    while i < len(lines) and lines[i][:1] in (" ", "\t"):       # frames: "  File ...", "    code", "    ^^^"
        if lines[i].lstrip().startswith(FRAME):
            frame = i
        i += 1
    if frame is not None:
        keep[frame] = CONTEXT
        if frame + 1 < i and not lines[frame + 1].lstrip().startswith((FRAME, "^", "~")):
            keep[frame + 1] = CONTEXT                               # its code line
    start = i
    while i < len(lines) and i - start < 4 and lines[i].strip() and not NOISE.search(lines[i]) \
            and not lines[i].startswith("-----"):
        keep[i] = CAUSE                                             # the exception line(s), at most 4
        i += 1
    return (tb, i - 1), keep


def error_lines(lines: list) -> list:
    """The lines of a log worth showing after a failure, in log order; [] if it shows no error.

    At most MAX_LINES of them, chosen in this order: the cause (the last traceback's exception lines, and the last
    usage-error line such as ``run_mindformer.py: error: ...``), the last traceback's header and the frame that
    raised, then the other lines matching ERROR, the latest first. MindSpore/MindFormers DEBUG/INFO/WARNING lines and
    Python warnings are left out; lines that differ only in numbers (pids, times, counters) are shown once, the
    latest with "  [N similar lines]"; "  ..." stands for the traceback frames left out; long lines are cut."""
    final, priority = _final_traceback(lines)
    usage = [i for i, line in enumerate(lines) if USAGE_ERROR.search(line)]
    if usage:
        priority[usage[-1]] = CAUSE
    similar = {}                                    # line with digits as "#" -> [latest index, count]
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if i in priority or (final and final[0] <= i <= final[1]) or not ERROR.search(line) or NOISE.search(line):
            continue
        key = re.sub(r"\d+", "#", line)
        if key in similar:
            similar[key][1] += 1
        else:
            similar[key] = [i, 1]
            priority[i] = OTHER
    repeats = {i: count for i, count in similar.values() if count > 1}
    chosen = sorted(sorted(priority, key=lambda i: (priority[i], -i))[:MAX_LINES])
    shown, previous = [], None
    for i in chosen:
        if final and previous is not None and final[0] <= previous and i <= final[1] \
                and any(lines[j].lstrip().startswith(FRAME) for j in range(previous + 1, i)):
            shown.append("  ...")                   # frames left out
        shown.append(shorten(lines[i]) + (f"  [{repeats[i]} similar lines]" if i in repeats else ""))
        previous = i
    return shown


def last_lines(lines: list, count: int = LAST_LINES) -> list:
    """The last ``count`` non-blank lines of a log that are not DEBUG/INFO/WARNING noise, cut if long."""
    kept = [line for line in lines if line.strip() and not NOISE.search(line)]
    return [shorten(line) for line in kept[-count:]]


def report_errors(start_epoch: float, entries, out=None) -> bool:
    """Print the failure report to ``out`` (default stdout): for each ``(kind, name, path)`` of ``entries``, in
    order, a header naming the log, then its lines (``error_lines``) indented by 4 spaces. ``kind`` is

    * ``"failed:STATUS"``: a worker known to have exited with STATUS: its error lines or, if none, its last lines
      (``last_lines``); a log it cannot read is said so;
    * ``"worker"``: a worker that may have failed (msrun does not say which rank did): its error lines, nothing if
      its log shows none;
    * ``"scheduler"``: only when nothing was printed for the entries before it: its error lines.

    "worker" and "scheduler" logs last written before ``start_epoch`` (left by an earlier job) are skipped, as are
    logs that cannot be read. True if anything was printed."""
    out = sys.stdout if out is None else out
    printed = False
    for kind, name, path in entries:
        if kind == "scheduler" and printed:
            continue
        failed = f"{PROG}: {name} failed (exit status {kind[7:]})" if kind.startswith("failed:") else None
        try:
            if not failed and os.path.getmtime(path) < start_epoch - 1:
                continue                            # left by an earlier job
            lines = read_tail(path)
        except OSError as exc:
            if failed:
                print(f"{failed}; cannot read its log {path}: {exc.strerror}", file=out)
                printed = True
            continue
        shown = error_lines(lines)
        if failed and shown:
            print(f"{failed}; last error lines of {path}:", file=out)
        elif failed:
            shown = last_lines(lines)
            print(f"{failed}; no error line in {path}, its last lines:", file=out)
        elif shown and kind == "scheduler":
            print(f"{PROG}: no worker log of this node shows an error; last error lines of {path}:", file=out)
        elif shown:
            print(f"{PROG}: {name} log shows errors; last error lines of {path}:", file=out)
        else:
            continue
        for line in shown:
            print("    " + line, file=out)
        printed = True
    return printed


def worker_environment(rank: int, device_id: int, worker_num: int, sched_host: str, sched_port: int,
                       timeout: int) -> dict:
    """The variables msrun sets for a worker (``mindspore/parallel/cluster/process_entity/_api.py``), as strings:
    the cluster's size and scheduler, ``MS_ROLE=MS_WORKER``, the global ``rank`` as MS_NODE_ID and RANK_ID, and
    ``device_id`` (the worker's index on its node) as DEVICE_ID."""
    return {"MS_WORKER_NUM": str(worker_num), "MS_SCHED_HOST": str(sched_host), "MS_SCHED_PORT": str(sched_port),
            "MS_TOPO_TIMEOUT": str(timeout), "MS_ROLE": "MS_WORKER", "MS_NODE_ID": str(rank), "RANK_ID": str(rank),
            "RANK_SIZE": str(worker_num), "DEVICE_ID": str(device_id)}


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived while run_workers watched its workers."""


def _stop(signum, frame):   # pylint: disable=unused-argument
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)      # a second signal must not cut the clean-up short
    raise _Stopped()


def _exit_status(returncode: int) -> int:
    """A Popen returncode as bash reports it: -N (killed by signal N) is 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def run_workers(cmd: list, workers: list, cwd=None, join: bool = False, dry_run: bool = False,
                poll: float = 1.0) -> int:
    """Start one process of ``cmd`` per ``(rank, environment, log)`` of ``workers`` (``environment`` added to
    this process's, output to ``log``, in a session of its own, in ``cwd``) and watch it; ``join``: also stream the
    logs to stdout (``tail -F``); ``dry_run``: print each worker's environment and command and start nothing.

    This is how the launcher runs the workers of a node whose MASTER_ADDR is this host when NODE_RANK > 0: several
    "nodes" on one host exist for the tests, which run multi-node jobs on 127.0.0.1. There msrun would start a
    second scheduler, which cannot bind the master port, and that node would exit 1 though its workers succeed.

    The workers are polled every ``poll`` seconds. Every worker found failed in a round is reported on stderr
    (``report_errors``), the others are then killed. Returns 0 when every worker exits 0, 1 when one fails, 130
    when SIGINT or SIGTERM stops the run (the workers are killed)."""
    for i, (rank, environment, log) in enumerate(workers):
        print(f"{PROG}: start worker rank {rank} (RANK_ID={rank}, DEVICE_ID={environment.get('DEVICE_ID', i)}), "
              f"log file: {log}", flush=True)
        if dry_run:
            print(f"{PROG}: dry run: {' '.join(f'{k}={v}' for k, v in environment.items())} {shlex.join(cmd)}")
    if dry_run:
        return 0
    procs, tail, failed = [], None, []
    saved = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            for _, environment, log in workers:
                with open(log, "wb") as handle:
                    procs.append(subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **environment},
                                                  stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            if join:
                tail = subprocess.Popen(["tail", "-n", "+1", "-F", *(log for _, _, log in workers)],
                                        stderr=subprocess.DEVNULL)
        except OSError as exc:
            print(f"{PROG}: error: cannot start the workers: {exc}", file=sys.stderr, flush=True)
            return 1
        running = dict(enumerate(procs))
        while running and not failed:
            time.sleep(poll)
            for i, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[i]
                status = _exit_status(proc.returncode)
                if status:
                    rank, _, log = workers[i]
                    print(f"{PROG}: worker rank {rank} (pid {proc.pid}) exited with status {status}; "
                          "killing the others", file=sys.stderr, flush=True)
                    failed.append((f"failed:{status}", f"rank {rank}", log))
    except _Stopped:
        return 130
    finally:
        for sig in saved:
            signal.signal(sig, signal.SIG_IGN)
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)     # the worker and whatever it started
                except OSError:
                    proc.kill()
            proc.wait()
        if tail is not None:
            tail.terminate()
            tail.wait()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if failed:
        sys.stdout.flush()
        report_errors(0, failed, out=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    """The command line the launcher calls (see the module's docstring); returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    command = args.pop(0) if args else ""
    if command == "split" and len(args) == 1:
        try:
            print(shlex.join(split_command(args[0])))
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        return 0
    if command == "probe" and len(args) == 1:
        ip, state = probe_master(args[0])
        if ip is not None:
            print(ip)
        return state
    if command == "report" and len(args) % 3 == 1:
        try:
            start_epoch = float(args[0])
        except ValueError:
            start_epoch = None
        if start_epoch is not None:
            entries = [tuple(args[i:i + 3]) for i in range(1, len(args), 3)]
            return 0 if report_errors(start_epoch, entries) else 1
    if command == "workers" and len(args) > 10:
        cwd, worker_num, first_rank, local_worker, host, port, timeout, log_dir, join, dry_run = args[:10]
        ranks = range(int(first_rank), int(first_rank) + int(local_worker))
        workers = [(rank, worker_environment(rank, i, worker_num, host, port, timeout),
                    os.path.join(log_dir, f"worker_{rank}.log")) for i, rank in enumerate(ranks)]
        return run_workers(args[10:], workers, cwd=cwd, join=join == "True", dry_run=dry_run == "1")
    print(f"usage:\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
