import os
import tempfile

# `import mindformers` writes output/log under the working directory unless pointed elsewhere
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(tempfile.gettempdir(), "ds2_test_logs"))


import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_ALPACA = os.path.join(ROOT, "data", "code_alpaca", "code_alpaca_2k.json")
BPE_VOCAB_SIZE = 512  # fits the tiny test models' vocab_size 512 (test_predict, test_evaluate)


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


@pytest.fixture(scope="session")
def bpe_vocab_size():
    """The vocabulary size of the ``tok_file`` tokenizer."""
    return BPE_VOCAB_SIZE


@pytest.fixture(scope="session")
def tok_file(tmp_path_factory, bpe_vocab_size):
    """A byte-level BPE tokenizer.json trained on the bundled Code Alpaca records, once per session."""
    from research.deepseek2.train_tokenizer import train_bpe_tokenizer
    return train_bpe_tokenizer(CODE_ALPACA, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"),
                               vocab_size=bpe_vocab_size)


@pytest.fixture(scope="module")
def tok(tok_file):
    """A DeepseekV2Tokenizer of ``tok_file`` (one object a test module)."""
    from research.deepseek2.deepseek2_tokenizer import DeepseekV2Tokenizer
    return DeepseekV2Tokenizer(tokenizer_file=tok_file)
