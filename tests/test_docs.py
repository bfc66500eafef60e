"""Every command and snippet of the README and docs/ runs as pasted after the main job.

The main job (scripts/demo.py, its finetune stopped after MAIN_JOB_STEPS steps here) runs once in a scratch copy of
the repository; then each document's ```bash and ```python blocks run there in order, from the repository root, each
in its own process with the project's interpreter first on PATH. A block that cannot run on this machine (real weights, Ascend cards,
several nodes, a download, or the set-up and test commands themselves) carries the line
``<!-- not run by the doc test: REASON -->`` just before its fence; for it the test checks that every path into the
repository it names exists. Other fences (```text, ```yaml ...) are shown output or fragments and are not run.
"""
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow               # the main job and every documented command: not in the everyday loop

DOCS = ["README.md", "README_zh.md"] + sorted(f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs"))
                                               if name.endswith(".md"))
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!-- not run by the doc test: (.+?) -->\s*$")
RUN_LANGUAGES = ("bash", "python")
# paths into the repository a block may name: a top-level folder of it, or a file of research/deepseek2
REPO_PATH = re.compile(r"(?<![\w./-])(?:\.\./)*((?:research|configs|scripts|docs|bench|tests|data)/[\w./-]*[\w/]"
                       r"|[\w-]+\.(?:yaml|py))")
BLOCK_TIMEOUT = 900
MAIN_JOB_STEPS = 40


def blocks(doc):
    """[(language, code, line number, reason it is not run or None)] of a Markdown file, in order."""
    with open(os.path.join(ROOT, doc), encoding="utf-8") as handle:
        text = handle.read()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        found.append((match.group(1), match.group(2), line, marker.group(1) if marker else None))
    return found


def test_the_markdown_parser_finds_blocks_and_markers():
    parsed = blocks("README.md")
    assert any(lang == "bash" and reason is None for lang, _, _, reason in parsed)
    assert any(reason for _, _, _, reason in parsed)                    # the quick start is not run here


@pytest.mark.parametrize("doc", DOCS)
def test_every_block_is_run_or_says_why_not(doc):
    """A ```bash/```python block either runs (the test below) or names its reason; an unmarked fence of another
    language is output or a fragment, so it holds no command prompt to paste."""
    for lang, code, line, reason in blocks(doc):
        if reason is not None:
            assert reason.strip(), f"{doc}:{line}: empty reason"
            assert lang in RUN_LANGUAGES, f"{doc}:{line}: a ```{lang} block is never run; drop the marker"
        elif lang in ("sh", "shell", "console", "py"):
            pytest.fail(f"{doc}:{line}: ```{lang}: tag it ```bash/```python (run) or ```text (shown output)")


def _exists(path):
    """A path a block names, against the places documents run commands from."""
    path = path.rstrip("/.")
    bases = [ROOT, os.path.join(ROOT, "research", "deepseek2"), os.path.join(ROOT, "research", "deepseek2",
                                                                             "deepseek2_lite")]
    return any(os.path.exists(os.path.join(base, path)) for base in bases)


@pytest.mark.parametrize("doc", DOCS)
def test_blocks_not_run_name_only_paths_that_exist(doc):
    missing = []
    for _, code, line, reason in blocks(doc):
        if reason is None:
            continue
        for path in REPO_PATH.findall(code):
            if not path.startswith(("/", "$")) and not _exists(path):
                missing.append(f"{doc}:{line}: {path}")
    assert not missing, missing


@pytest.fixture(scope="module")
def repo_after_main_job(tmp_path_factory):
    """A scratch copy of the repository in which the main job has run: work_dirs/demo/ as scripts/demo.py leaves
    it, its finetune stopped after MAIN_JOB_STEPS steps (the documents' commands need its files, not its figures;
    the demo still checks that both losses fall)."""
    repo = tmp_path_factory.mktemp("docs") / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".venv", "work_dirs", "output", "__pycache__",
                                                              "*.egg-info", ".pytest_cache"))
    env = _env(repo)
    started = time.monotonic()
    command = [sys.executable, "scripts/demo.py", "--epochs", "1", "--stop_step", str(MAIN_JOB_STEPS)]
    proc = subprocess.run(command, cwd=str(repo), env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\nmain job ({MAIN_JOB_STEPS} steps) in {time.monotonic() - started:.0f} s")
    return repo


def _env(repo):
    """The project's interpreter and console scripts first on PATH; the scratch copy's package first on sys.path."""
    bin_dir = os.path.dirname(sys.executable)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), PYTHONPATH=str(repo),
                LOCAL_DEFAULT_PATH=str(repo / "output" / "logs"), GLOG_v="3", MPLBACKEND="Agg")


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_run_after_the_main_job(doc, repo_after_main_job):
    repo = repo_after_main_job
    ran = []
    for lang, code, line, reason in blocks(doc):
        if reason is not None or lang not in RUN_LANGUAGES:
            continue
        started = time.monotonic()
        command = ["bash", "-e", "-c", code] if lang == "bash" else [sys.executable, "-"]
        proc = subprocess.run(command, cwd=str(repo), env=_env(repo), input=code if lang == "python" else None,
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
        assert proc.returncode == 0, (f"{doc}:{line} (```{lang}) exited {proc.returncode}:\n{code}\n--- stdout\n"
                                      f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
        ran.append(f"{doc}:{line} {time.monotonic() - started:.0f} s")
    print("\n" + "\n".join(ran))
