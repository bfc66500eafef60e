"""The sandbox that runs model-written code (research/deepseek2/evaluation/sandbox.py), held to its promises with
programs written by hand to break them: a loop, a fork bomb, a memory hog, deleting and writing outside its
directory, the network, an early exit; each is stopped or fails, and leaves nothing behind."""
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest

from research.deepseek2.evaluation import sandbox
from research.deepseek2.evaluation.sandbox import Limits, isolation, run_program

QUICK = Limits(timeout=5.0, cpu_seconds=5)


def _left_running(mark: str):
    """Processes whose command line holds ``mark`` (a program's unique text)."""
    out = subprocess.run(["pgrep", "-f", mark], capture_output=True, text=True, check=False).stdout.split()
    return [pid for pid in out if int(pid) != os.getpid()]


def test_isolation_here_is_the_namespaces():
    """On this machine (root, util-linux, a kernel with namespaces) programs run in the namespaces; where that is not
    so, isolation() says what is in force instead."""
    info = isolation()
    can = os.geteuid() == 0 and shutil.which("unshare") is not None and sandbox.program_python() is not None
    assert info["isolated"] is can
    assert all(info[key] for key in ("network", "filesystem", "processes", "limits"))
    if can:
        assert "network namespace of its own" in info["network"]


def test_a_program_runs_and_its_output_comes_back():
    outcome = run_program("import sys\nprint('out', sum(range(10)))\nprint('err', file=sys.stderr)", QUICK)
    assert (outcome.returncode, outcome.timed_out) == (0, False)
    assert outcome.stdout == "out 45\n" and outcome.stderr == "err\n"


def test_a_loop_is_stopped_by_its_timeout_and_leaves_nothing_running():
    mark = uuid.uuid4().hex
    started = time.monotonic()
    outcome = run_program(f"# {mark}\nwhile True:\n    pass\n", Limits(timeout=2.0, cpu_seconds=30))
    assert outcome.timed_out and outcome.returncode is None
    assert time.monotonic() - started < 10
    assert not _left_running(mark)


def test_cpu_time_is_limited():
    outcome = run_program("while True:\n    pass\n", Limits(timeout=30.0, cpu_seconds=1))
    assert not outcome.timed_out and outcome.returncode not in (0, None)     # SIGXCPU / SIGKILL at 1 s of CPU


def test_a_fork_bomb_is_held_by_its_process_limit_and_dies_with_it():
    mark = uuid.uuid4().hex
    program = (f"# {mark}\nimport os, time\nchildren = 0\n"
               "for _ in range(200):\n    try:\n        if os.fork() == 0:\n            time.sleep(30)\n"
               "            os._exit(0)\n        children += 1\n    except OSError:\n        break\n"
               "print(children)\n")
    outcome = run_program(program, Limits(timeout=5.0, cpu_seconds=5, processes=8))
    assert outcome.returncode == 0, outcome.stderr
    assert int(outcome.stdout) < 8                                            # forks beyond the limit failed
    time.sleep(0.5)
    assert not _left_running(mark)                                           # the sleeping children are gone


def test_filling_memory_fails():
    outcome = run_program("x = bytearray(4 << 30)\n", Limits(timeout=10.0, memory_bytes=512 << 20))
    assert outcome.returncode != 0 and "MemoryError" in outcome.stderr


@pytest.fixture
def host_folder():
    """A folder of the host, root's, reachable by any user: the repository's work_dirs (outside /tmp, where the
    sandbox has a /tmp of its own, unless the repository itself was cloned under /tmp)."""
    from conftest import ROOT
    folder = os.path.join(ROOT, "work_dirs", f"sandbox_canary_{uuid.uuid4().hex}")
    os.makedirs(folder, mode=0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_deleting_or_writing_outside_its_directory_fails_and_leaves_nothing(host_folder):
    """A file of the host (root's, as everything here is) survives a program that tries to delete it; what the
    program writes under /tmp, /var/tmp or its own directory is gone afterwards."""
    canary = os.path.join(host_folder, "canary.txt")
    with open(canary, "w", encoding="utf-8") as handle:
        handle.write("still here")
    name = f"ds2_sandbox_{uuid.uuid4().hex}"
    program = (f"import os, shutil\nopen('/tmp/{name}', 'w').write('x')\nopen('/var/tmp/{name}', 'w').write('x')\n"
               f"open('{name}', 'w').write('x')\nprint(os.getcwd())\n"
               f"os.remove({str(canary)!r})\n")
    outcome = run_program(program, QUICK)
    with open(canary, encoding="utf-8") as handle:
        assert handle.read() == "still here"
    for folder in ("/tmp", "/var/tmp"):
        assert not os.path.exists(os.path.join(folder, name))
    if outcome.isolated:
        # read-only to the program; or, for a clone under /tmp, not there at all (the sandbox's /tmp is its own)
        hidden = host_folder.startswith(("/tmp/", "/var/tmp/"))
        refused = "PermissionError" in outcome.stderr or (hidden and "FileNotFoundError" in outcome.stderr)
        assert outcome.returncode != 0 and refused, outcome.stderr
        assert os.listdir(host_folder) == ["canary.txt"]
        work = outcome.stdout.strip()
        assert not os.path.exists(os.path.join(work, name))
    else:                                                   # the fallback: the host's permissions, removed folder
        assert not os.path.exists(os.path.join(outcome.stdout.strip(), name))


def test_no_network():
    """A server listening on this host's loopback is out of reach from the sandbox (its own network namespace)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(10)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True)
    thread.start()
    outcome = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                          f"print('connected')\n", QUICK)
    server.close()
    thread.join(timeout=15)
    if outcome.isolated:
        assert "connected" not in outcome.stdout and outcome.returncode != 0
        assert accepted == [None]


def _accept(server):
    try:
        return server.accept()[1]
    except OSError:
        return None


def test_output_is_cut_and_file_size_limited():
    outcome = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 4096)\n",
                          Limits(timeout=10.0, file_bytes=1 << 20, output_bytes=1000))
    assert not outcome.timed_out and outcome.returncode != 0                # SIGXFSZ at 1 MiB of output
    assert len(outcome.stdout) == 1000


def test_the_fallback_keeps_the_limits(tmp_path):
    """Where no namespaces can be made, the same limits still stop a loop and a memory hog."""
    assert sandbox._run_limited("while True:\n    pass\n", Limits(timeout=2.0, cpu_seconds=30)).timed_out
    hog = sandbox._run_limited("x = bytearray(4 << 30)\n", Limits(timeout=10.0, memory_bytes=512 << 20))
    assert hog.returncode != 0 and "MemoryError" in hog.stderr and not hog.isolated
