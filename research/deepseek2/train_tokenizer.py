"""Train a small byte-level BPE ``tokenizer.json`` on the bundled Code Alpaca records.

The result has the DeepSeek-V2 special tokens (bos ``<｜begin▁of▁sentence｜>`` = id 0, eos
``<｜end▁of▁sentence｜>`` = id 1), a byte-level pre-tokenizer and decoder, so ``decode(encode(x)) == x`` for any
text, and it loads with ``DeepseekV2Tokenizer(tokenizer_file=...)``. Training is deterministic and takes a few
seconds; it is meant for small end-to-end tests, not for real models (use the released tokenizer.json there).

Usage::

    python research/deepseek2/train_tokenizer.py --data_path data/code_alpaca/code_alpaca_2k.json \
        --output_path OUT/tokenizer.json [--vocab_size 2048]
"""
import argparse
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from research.deepseek2.code_alpaca_preprocess import load_records
from research.deepseek2.deepseek2_tokenizer import BOS_TOKEN, EOS_TOKEN
from research.deepseek2.fileio import atomic_write_text

__all__ = ["train_bpe_tokenizer", "record_texts"]

_TEXT_FIELDS = ("instruction", "input", "output")


def record_texts(records):
    """Yield the non-empty string fields (instruction, input, output) of each record, in order."""
    for record in records:
        if not isinstance(record, dict):
            continue
        for field in _TEXT_FIELDS:
            value = record.get(field)
            if isinstance(value, str) and value:
                yield value


def train_bpe_tokenizer(data_path: str, output_path: str, vocab_size: int = 2048) -> str:
    """Train a byte-level BPE tokenizer on a Code Alpaca JSON list and write it atomically as tokenizer.json.

    Args:
        data_path: JSON list of {"instruction", "input", "output"} records.
        output_path: where to write tokenizer.json (parent directories are created).
        vocab_size: total vocabulary size including the 256 byte symbols and the 2 special tokens.

    Returns:
        output_path.
    """
    min_size = 256 + 2
    if vocab_size < min_size:
        raise ValueError(f"train_bpe_tokenizer: vocab_size must be >= {min_size} (256 bytes + bos + eos), "
                         f"got {vocab_size}")
    texts = list(record_texts(load_records(data_path)))
    if not texts:
        raise ValueError(f"train_bpe_tokenizer: '{data_path}' holds no instruction/input/output text to train on")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  min_frequency=2,
                                  special_tokens=[BOS_TOKEN, EOS_TOKEN],  # ids 0 and 1
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return atomic_write_text(output_path, tokenizer.to_str(pretty=True))


def main(argv=None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--data_path", required=True, help="Code Alpaca JSON list")
    parser.add_argument("--output_path", required=True, help="output tokenizer.json")
    parser.add_argument("--vocab_size", type=int, default=2048, help="vocabulary size (default 2048)")
    args = parser.parse_args(argv)
    from mindformers.tools.logger import logger  # mindformers is already imported via deepseek2_tokenizer
    try:
        path = train_bpe_tokenizer(args.data_path, args.output_path, args.vocab_size)
    except (OSError, ValueError) as err:
        print(f"train_tokenizer: error: {err}", file=sys.stderr, flush=True)
        return 1
    size = Tokenizer.from_file(path).get_vocab_size()
    logger.info("train_tokenizer: wrote %s (vocab size %d, bos id 0, eos id 1)", path, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
