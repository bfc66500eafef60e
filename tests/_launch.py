"""Helpers for tests that start jobs through scripts/msrun_launcher.sh (not a test module itself).

Used by tests/test_msrun_launcher.py, tests/test_distributed_train.py and tests/test_tensor_parallel.py:
  * free_port() / free_ports(n): loopback ports for msrun's scheduler;
  * launch_env(...):             the environment a launched job runs with;
  * run_launcher(...):           one launcher call in the foreground (output captured, with a timeout);
  * Job / start_launcher(...):   a command (or launcher call) in the background, console to a file;
  * wait_all(...):               wait for several background jobs under one deadline, stopping late ones;
  * worker_log(...) / worker_log_tails(...): what msrun's workers wrote into the log folder.
"""
import os
import signal
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "scripts", "msrun_launcher.sh")
TIMEOUT = "timeout"     # Job.wait's result for a job that had to be stopped at the deadline


def free_ports(count):
    """``count`` distinct free TCP ports on 127.0.0.1 (all sockets are held until every port is chosen)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port():
    """One free TCP port on 127.0.0.1."""
    return free_ports(1)[0]


def launch_env(default_path, glog_v, **extra):
    """A copy of os.environ for a launched job.

    MindFormers writes its default output under ``default_path`` (LOCAL_DEFAULT_PATH), MindSpore logs at level
    ``glog_v``, the caller's PYTHONPATH is dropped (the launcher puts the project root first), and ``extra``
    (strings, e.g. MS_NODE_TIMEOUT="10" or PYTHONPATH=ROOT) is set last.
    """
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(default_path), GLOG_v=str(glog_v))
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def launcher_argv(args):
    """The command line that runs msrun_launcher.sh with ``args`` (a list of strings)."""
    return ["bash", LAUNCHER, *args]


def run_launcher(args, cwd, env, timeout):
    """Run the launcher with ``args`` in the foreground; return the CompletedProcess (text stdout/stderr)."""
    return subprocess.run(launcher_argv(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def read_text(path):
    """A log or console file's text (undecodable bytes replaced)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


class Job:
    """A command running in the background in its own process group, stdout and stderr to the file ``console``."""

    def __init__(self, name, argv, cwd, env, console):
        self.name, self.console_path = name, console
        self._out = open(console, "w", encoding="utf-8")  # pylint: disable=consider-using-with
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.returncode = None

    def wait(self, deadline):
        """Wait until ``deadline`` (time.monotonic()); return the exit status, or TIMEOUT if it had to be stopped."""
        try:
            self.returncode = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)   # the launcher forwards it to msrun / its workers
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.returncode = TIMEOUT
        finally:
            self._out.close()
        return self.returncode

    def console(self):
        """Everything the job printed so far."""
        return read_text(self.console_path)


def start_launcher(name, args, cwd, env, console):
    """Start the launcher with ``args`` in the background; return its Job."""
    return Job(name, launcher_argv(args), cwd, env, console)


def wait_all(jobs, timeout):
    """Wait for ``jobs`` (started together) with one deadline ``timeout`` seconds from now; their results in order."""
    deadline = time.monotonic() + timeout
    return [job.wait(deadline) for job in jobs]


def worker_log(log_dir, rank):
    """The text of rank ``rank``'s worker log (``worker_<rank>.log``) in the launcher's LOG_DIR."""
    return read_text(os.path.join(str(log_dir), f"worker_{rank}.log"))


def worker_log_tails(log_dir, chars=2000):
    """The last ``chars`` characters of every worker log in ``log_dir``, joined (for failure messages; "" if none)."""
    log_dir = str(log_dir)
    if not os.path.isdir(log_dir):
        return ""
    return "".join(read_text(os.path.join(log_dir, name))[-chars:]
                   for name in sorted(os.listdir(log_dir)) if name.startswith("worker"))
