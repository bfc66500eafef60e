import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# `import mindformers` writes output/log under the working directory unless pointed elsewhere
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(tempfile.gettempdir(), "ds2_test_logs"))


import pytest  # noqa: E402


SESSION_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


def _reset_environ():
    own = {k: v for k, v in os.environ.items() if k.startswith("PYTEST_")}     # pytest's bookkeeping stays
    os.environ.clear()
    os.environ.update(SESSION_ENV)
    os.environ.update(own)


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process runs of MindFormers (build_context) export variables such as RUN_MODE=predict, also from
    module-scoped fixtures; a subprocess started later would inherit them and behave as that mode. Every test runs
    with, and leaves behind, the environment the session started with."""
    _reset_environ()
    yield
    _reset_environ()
