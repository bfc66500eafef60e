"""Turn Code Alpaca records into a DeepSeek-V2-Chat fine-tuning MindRecord.

Each record ``{"instruction", "input", "output"}`` becomes one chat turn (``build_chat_prompt``): the user message
is the instruction, plus "\\n" + input when input is non-empty; the reply is the output. One row per record:

    input_ids  int32 (seq_length + 1,)  prompt ids + reply ids (ending with eos) + padding (tokenizer's pad id)
    labels     int32 (seq_length + 1,)  -100 on the prompt and on padding, labels[i] == input_ids[i] on the reply

The model shifts inputs and labels itself (tokens = input_ids[:-1], targets = labels[1:]).
Long samples are truncated (prompt kept whole, reply cut) or, with --drop_long, dropped; samples whose prompt
alone does not leave room for one reply token are always dropped.

Usage::

    python research/deepseek2/code_alpaca_preprocess.py --data_path data/code_alpaca/code_alpaca_2k.json \
        --tokenizer_file tokenizer.json --output_path OUT.mindrecord --seq_length 512 [--drop_long]

Writes OUT.mindrecord and OUT.mindrecord.db, both only once complete.
"""
import argparse
import json
import os
import sys
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm
from mindspore.mindrecord import FileWriter
from mindformers.tools.logger import logger

from research.deepseek2.deepseek2_tokenizer import BOS_TOKEN, EOS_TOKEN, DeepseekV2Tokenizer, build_chat_prompt
from research.deepseek2.errors import BadRecord
from research.deepseek2.fileio import StagedDir

__all__ = ["IGNORE_INDEX", "MINDRECORD_SCHEMA", "load_records", "record_to_turn", "encode_record", "iter_rows",
           "preprocess", "write_mindrecord", "new_stats", "main"]

IGNORE_INDEX = -100
MINDRECORD_SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]},
                     "labels": {"type": "int32", "shape": [-1]}}
_MAX_BAD_LOGGED = 20  # individual warnings for bad records; the rest are only counted


def load_records(data_path: str) -> list:
    """Read a JSON list of records; errors name the file and what was expected."""
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"data file '{data_path}' does not exist")
    try:
        with open(data_path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"data file '{data_path}' is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise ValueError(f"data file '{data_path}' must hold a JSON list of records, got {type(data).__name__}")
    return data


def record_to_turn(record) -> Tuple[str, str]:
    """Return (user message, reply) of one record, or raise BadRecord saying what is wrong."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected an object with 'instruction' and 'output', got {type(record).__name__}")
    for field in ("instruction", "output"):
        if field not in record:
            raise BadRecord(f"missing field '{field}'")
        if not isinstance(record[field], str):
            raise BadRecord(f"field '{field}' must be a string, got {type(record[field]).__name__}")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRecord(f"field 'input' must be a string, got {type(extra).__name__}")
    message = record["instruction"] + ("\n" + extra if extra else "")
    return message, record["output"]


def _special_ids(tokenizer) -> Tuple[int, int, int]:
    """(bos id, eos id, pad id) of a tokenizer, checking it reads BOS_TOKEN/EOS_TOKEN as single tokens."""
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    probe = tokenizer.encode(BOS_TOKEN + EOS_TOKEN, add_special_tokens=False)
    if bos_id is None or eos_id is None or list(probe) != [bos_id, eos_id]:
        raise ValueError(f"tokenizer must encode {BOS_TOKEN!r} and {EOS_TOKEN!r} as its bos/eos tokens "
                         f"(bos_token_id={bos_id}, eos_token_id={eos_id}, encoded={list(probe)[:8]})")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return bos_id, eos_id, pad_id


def encode_record(message: str, reply: str, tokenizer) -> Tuple[List[int], List[int]]:
    """Token ids of the prompt (bos ... "Assistant:") and of the reply (" " + reply + eos), without padding.

    Both parts come from build_chat_prompt, and they are tokenized separately so the prompt ids are exactly
    what the model sees at generation time.
    """
    prompt = build_chat_prompt(message)
    full = build_chat_prompt(message, reply)
    if not full.startswith(prompt):  # guards the split below if the chat format ever changes
        raise AssertionError("build_chat_prompt(message, reply) must start with build_chat_prompt(message)")
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    reply_ids = list(tokenizer.encode(full[len(prompt):], add_special_tokens=False))
    return prompt_ids, reply_ids


def new_stats() -> Dict:
    """Counters filled by iter_rows: total, written, truncated, dropped, bad, bad_records [(index, reason)]."""
    return {"total": 0, "written": 0, "truncated": 0, "dropped": 0, "bad": 0, "bad_records": []}


def iter_rows(records: Iterable, tokenizer, seq_length: int, drop_long: bool = False,
              stats: Optional[Dict] = None, progress: bool = False) -> Iterator[Dict[str, np.ndarray]]:
    """Yield {"input_ids", "labels"} rows (int32, shape (seq_length + 1,)) and update `stats` as it goes."""
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length must be a positive integer, got {seq_length!r}")
    stats = new_stats() if stats is None else stats
    _, _, pad_id = _special_ids(tokenizer)
    row_len = seq_length + 1
    total = len(records) if hasattr(records, "__len__") else None
    for index, record in enumerate(tqdm(records, total=total, desc="code_alpaca", unit="rec", disable=not progress)):
        stats["total"] += 1
        try:
            message, reply = record_to_turn(record)
        except BadRecord as err:
            stats["bad"] += 1
            stats["bad_records"].append((index, str(err)))
            if stats["bad"] <= _MAX_BAD_LOGGED:
                logger.warning("record %d skipped: %s", index, err)
            continue
        prompt_ids, reply_ids = encode_record(message, reply, tokenizer)
        if len(prompt_ids) >= row_len:
            stats["dropped"] += 1  # not even one reply token fits
            continue
        if len(prompt_ids) + len(reply_ids) > row_len:
            if drop_long:
                stats["dropped"] += 1
                continue
            reply_ids = reply_ids[:row_len - len(prompt_ids)]
            stats["truncated"] += 1
        n_pad = row_len - len(prompt_ids) - len(reply_ids)
        input_ids = np.array(prompt_ids + reply_ids + [pad_id] * n_pad, dtype=np.int32)         # (seq_length+1,)
        labels = np.array([IGNORE_INDEX] * len(prompt_ids) + reply_ids + [IGNORE_INDEX] * n_pad,
                          dtype=np.int32)                                                        # (seq_length+1,)
        stats["written"] += 1
        yield {"input_ids": input_ids, "labels": labels}


def preprocess(records: Iterable, tokenizer, seq_length: int, drop_long: bool = False,
               progress: bool = False) -> Tuple[List[Dict[str, np.ndarray]], Dict]:
    """All rows of `records` as a list, and the stats (see new_stats)."""
    stats = new_stats()
    rows = list(iter_rows(records, tokenizer, seq_length, drop_long=drop_long, stats=stats, progress=progress))
    return rows, stats


def write_mindrecord(rows: Iterable[Dict[str, np.ndarray]], path: str, chunk_size: int = 1000,
                     header_size: int = 1 << 20, page_size: int = 1 << 22) -> int:
    """Write rows to MindRecord `path` (plus `path`.db), atomically; returns the number of rows.

    header_size/page_size: FileWriter's defaults (16 MiB / 32 MiB) make even a tiny file about 50 MB; a 1 MiB
    header indexes over 10,000 pages (40 GiB of 4 MiB pages), and a row must fit in one page.

    FileWriter writes both files into a staging folder inside the output folder (``fileio.StagedDir``), under the
    final base name (the .db index refers to its data file by name); they are moved into place only after commit
    succeeds, and a failure removes the staging folder. Other files in the output folder are left alone.
    """
    path = os.path.abspath(path)
    out_dir, name = os.path.split(path)
    # the folder exists first, so StagedDir stages inside it (two runs writing to one new folder do not collide)
    os.makedirs(out_dir, exist_ok=True)
    count = 0
    with StagedDir(out_dir) as stage:
        writer = FileWriter(stage.file(name), shard_num=1, overwrite=True)
        writer.set_header_size(header_size)
        writer.set_page_size(page_size)
        writer.add_schema(MINDRECORD_SCHEMA, "deepseek2_code_alpaca")
        chunk = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= chunk_size:
                writer.write_raw_data(chunk)
                count += len(chunk)
                chunk = []
        if chunk:
            writer.write_raw_data(chunk)
            count += len(chunk)
        if count == 0:
            raise ValueError(f"no rows to write to '{path}'")
        writer.commit()
    return count


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Code Alpaca -> DeepSeek-V2-Chat MindRecord (input_ids, labels)")
    parser.add_argument("--data_path", required=True, help="Code Alpaca JSON list of records")
    parser.add_argument("--tokenizer_file", required=True, help="HuggingFace tokenizer.json")
    parser.add_argument("--output_path", required=True, help="output MindRecord file (a .db is written beside)")
    parser.add_argument("--seq_length", required=True, type=int, help="rows hold seq_length + 1 tokens")
    parser.add_argument("--drop_long", action="store_true", help="drop samples that do not fit (default: truncate)")
    args = parser.parse_args(argv)
    if args.seq_length < 1:
        parser.error(f"--seq_length must be >= 1, got {args.seq_length}")
    return args


def _fail(message: str) -> int:
    print(f"code_alpaca_preprocess: error: {message}", file=sys.stderr, flush=True)
    return 1


def main(argv=None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 bad input or nothing written, 2 bad arguments)."""
    args = _parse_args(argv)
    try:
        records = load_records(args.data_path)
        tokenizer = DeepseekV2Tokenizer(tokenizer_file=args.tokenizer_file)
        _special_ids(tokenizer)
    except (OSError, ValueError) as err:
        return _fail(str(err))
    if not records:
        return _fail(f"data file '{args.data_path}' holds an empty list")

    stats = new_stats()
    rows = iter_rows(records, tokenizer, args.seq_length, drop_long=args.drop_long, stats=stats, progress=True)
    try:
        write_mindrecord(rows, args.output_path)
    except ValueError as err:
        if stats["total"] and stats["bad"] == stats["total"]:
            return _fail(f"all {stats['total']} records of '{args.data_path}' are bad "
                         f"(first: record {stats['bad_records'][0][0]}: {stats['bad_records'][0][1]})")
        hint = "; a larger --seq_length keeps more records" if stats["dropped"] else ""
        return _fail(f"{err} (records={stats['total']}, dropped={stats['dropped']}, bad={stats['bad']}{hint})")
    except (OSError, RuntimeError) as err:
        return _fail(f"cannot write '{args.output_path}': {err}")
    if stats["bad"] > _MAX_BAD_LOGGED:
        logger.warning("%d more bad records not listed; bad indices: %s", stats["bad"] - _MAX_BAD_LOGGED,
                       [index for index, _ in stats["bad_records"]])
    logger.info("code_alpaca_preprocess: %d records -> %s: written=%d, truncated=%d, dropped=%d, bad=%d",
                stats["total"], args.output_path, stats["written"], stats["truncated"], stats["dropped"],
                stats["bad"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
