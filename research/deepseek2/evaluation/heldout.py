"""Held-out loss of a DeepSeek-V2 checkpoint: the mean token cross-entropy (and perplexity) on a MindRecord.

The MindRecord holds rows as written by ``code_alpaca_preprocess.py``: ``input_ids`` and ``labels`` (int32,
seq_length + 1 tokens, -100 where nothing is learned). The model is built as predict builds it
(``DeepseekV2Config(**model.model_config)``, ``DeepseekV2ForCausalLM``), loaded with the project's checkpoint loader,
and called in training mode with ``(input_ids, labels)``, which returns the mean cross-entropy of the batch over the
targets labels[:, 1:] != -100 (the model shifts inputs and labels itself). Nothing is trained: no gradient is taken
and the tiny model has no dropout.

The training-mode result also adds the MoE balance losses; for evaluation they are switched off by building the
config with ``aux_loss_alpha``, ``device_aux_loss_alpha`` and ``comm_aux_loss_alpha`` set to 0, so the number is the
cross-entropy alone. Batch means are weighted by their number of target tokens, so the result is the true mean over
all target tokens of the file. The last batch is filled up to ``batch_size`` with rows whose labels are all -100
(they count for nothing), so graph mode compiles one shape only.

    python research/deepseek2/evaluation/heldout.py --config configs/deepseek2/finetune_deepseek2_tiny.yaml \
        --load_checkpoint CKPT --eval_data heldout.mindrecord [--batch_size 8]      (or: deepseek2-evaluate ...)

prints one line ``evaluate: loss L perplexity P over T target tokens in R rows (CKPT)``; a bad flag or file ends
with one line ``heldout.py: error: ...`` on stderr and exit code 2.
"""
import argparse
import math
import os
import sys
from typing import Iterator, Tuple

import numpy as np

from research.deepseek2.errors import EvaluationError

__all__ = ["EvaluationError", "heldout_loss", "read_model_config", "main"]

_COLUMNS = ["input_ids", "labels"]
_BALANCE_LOSSES = ("aux_loss_alpha", "device_aux_loss_alpha", "comm_aux_loss_alpha")


def read_model_config(config_path: str) -> dict:
    """``model.model_config`` of a YAML (``base_config`` followed, as MindFormers does) as a plain dict."""
    from mindformers.tools.register import MindFormerConfig
    try:
        config = MindFormerConfig(os.path.abspath(config_path))
    except Exception as err:  # pylint: disable=broad-except  (yaml, io errors: all mean a bad file)
        raise EvaluationError(f"--config {config_path}: cannot read it ({str(err).splitlines()[0]})") from err
    fields = ((config.get("model") or {}).get("model_config")) if hasattr(config, "get") else None
    if not fields:
        raise EvaluationError(f"--config {config_path}: no model.model_config section")
    return dict(fields)


def _load_weights(net, checkpoint: str, pet_config=None):
    """The project's checkpoint loader; with a pet_config, a LoRA training output merged as predict merges it."""
    from research.deepseek2.checkpoints.load import load_checkpoint
    from research.deepseek2.errors import UsageError
    try:
        if pet_config:
            from research.deepseek2.lora.checkpoints import load_merged
            load_merged(net, checkpoint, pet_config)
        else:
            load_checkpoint(net, checkpoint)
    except (ValueError, KeyError, RuntimeError, OSError, UsageError) as err:   # CheckpointError, PetConfigError
        raise EvaluationError(f"--load_checkpoint {checkpoint}: {err}") from err


def _open_data(mindrecord: str):
    """(MindDataset over the two columns, rows, row length); errors name the file."""
    import mindspore.dataset as ds
    if not os.path.isfile(mindrecord):
        raise EvaluationError(f"--eval_data: no such file: {mindrecord}")
    try:
        data = ds.MindDataset(mindrecord, columns_list=_COLUMNS, shuffle=False, num_parallel_workers=1)
        rows = data.get_dataset_size()
        first = next(data.create_tuple_iterator(output_numpy=True, num_epochs=1), None)
    except (RuntimeError, ValueError, OSError) as err:
        raise EvaluationError(f"--eval_data {mindrecord}: not a MindRecord with columns {_COLUMNS} "
                              f"({str(err).strip().splitlines()[0]})") from err
    if not rows or first is None:
        raise EvaluationError(f"--eval_data {mindrecord}: holds no row")
    return data, rows, int(np.asarray(first[0]).shape[-1])


def _batches(data, batch_size: int, row_len: int, pad_id: int, ignore: int, mindrecord: str) -> Iterator[Tuple]:
    """(input_ids, labels, real rows) of batch_size rows each; the last batch is filled with rows that have no
    target (labels all `ignore`)."""
    ids, labels = [], []
    for index, (row_ids, row_labels) in enumerate(data.create_tuple_iterator(output_numpy=True, num_epochs=1)):
        row_ids, row_labels = np.asarray(row_ids, np.int32), np.asarray(row_labels, np.int32)
        if row_ids.shape != (row_len,) or row_labels.shape != (row_len,):
            raise EvaluationError(f"--eval_data {mindrecord}: row {index} has input_ids {row_ids.shape} and "
                                  f"labels {row_labels.shape}; every row must hold {row_len} tokens")
        ids.append(row_ids)
        labels.append(row_labels)
        if len(ids) == batch_size:
            yield np.stack(ids), np.stack(labels), batch_size
            ids, labels = [], []
    if ids:
        real = len(ids)
        ids += [np.full(row_len, pad_id, np.int32)] * (batch_size - real)
        labels += [np.full(row_len, ignore, np.int32)] * (batch_size - real)
        yield np.stack(ids), np.stack(labels), real


def heldout_loss(model_config: dict, checkpoint: str, mindrecord: str, batch_size: int = 8,
                 progress: bool = True) -> Tuple[float, int]:
    """Mean cross-entropy per target token of ``checkpoint`` on ``mindrecord``, and the number of target tokens.

    Args:
        model_config: the YAML's ``model.model_config`` fields (``type`` ignored; a ``pet_config`` means the
            checkpoint is a LoRA training output, its adapters merged into the weights). ``seq_length`` is taken from the
            data (row length - 1) and ``batch_size`` from the argument; the MoE balance-loss factors
            ``aux_loss_alpha``, ``device_aux_loss_alpha`` and ``comm_aux_loss_alpha`` are set to 0 so the
            training-mode loss is the cross-entropy alone.
        checkpoint: a ``.ckpt`` file or converted checkpoint folder (the project's loader reads it).
        mindrecord: rows of ``input_ids`` / ``labels`` (seq_length + 1 tokens, -100 = not a target).
        batch_size: rows per forward pass.
        progress: show a tqdm bar over the batches.
    Returns:
        (mean loss over all targets labels[:, 1:] != -100, number of such targets). Runs in graph mode (the
        previous execution mode is restored afterwards).
    Raises:
        EvaluationError: a bad config, checkpoint or data file (the message names it).
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise EvaluationError(f"--batch_size must be > 0, got {batch_size}")
    if not os.path.exists(checkpoint):
        raise EvaluationError(f"--load_checkpoint: no such file or folder: {checkpoint}")
    import mindspore as ms
    from tqdm import tqdm
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    from research.deepseek2.deepseek2 import DeepseekV2ForCausalLM

    data, rows, row_len = _open_data(mindrecord)
    if row_len < 2:
        raise EvaluationError(f"--eval_data {mindrecord}: rows of {row_len} token(s); at least 2 are needed")
    fields = {k: v for k, v in dict(model_config).items() if k not in ("type", "pet_config")}
    pet_config = dict(model_config).get("pet_config")
    fields.update(seq_length=row_len - 1, batch_size=batch_size, use_past=False,
                  **{name: 0.0 for name in _BALANCE_LOSSES})
    try:
        config = DeepseekV2Config(**fields)
    except (ValueError, TypeError) as err:
        raise EvaluationError(f"model.model_config: {err}") from err
    if pet_config:
        from research.deepseek2.errors import PetConfigError
        from research.deepseek2.lora.config import expected_adapter_shapes
        try:
            expected_adapter_shapes(config, pet_config)
        except PetConfigError as err:
            raise EvaluationError(f"model.model_config.{err}") from err
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    ignore = config.ignore_token_id                                      # -100, as code_alpaca_preprocess writes

    before = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = DeepseekV2ForCausalLM(config)
        _load_weights(net, checkpoint, pet_config)
        net.set_train(True)                       # the loss path; no gradient is taken, the weights stay as loaded
        total, tokens = 0.0, 0
        batches = _batches(data, batch_size, row_len, pad_id, ignore, mindrecord)
        for ids, labels, _ in tqdm(batches, total=math.ceil(rows / batch_size), desc="evaluate", unit="batch",
                                   disable=not progress):
            if ids.max() >= config.vocab_size or ids.min() < 0:
                raise EvaluationError(f"--eval_data {mindrecord}: token id {int(ids.max())} outside the model's "
                                      f"vocab_size {config.vocab_size} (tokenizer and model do not match)")
            count = int(np.count_nonzero(labels[:, 1:] != ignore))
            if count == 0:
                continue
            loss = net(ms.Tensor(ids), ms.Tensor(labels))
            total += float(loss.asnumpy()) * count
            tokens += count
    finally:
        ms.set_context(mode=before)
    if tokens == 0:
        raise EvaluationError(f"--eval_data {mindrecord}: no target token (every label is {ignore})")
    return total / tokens, tokens


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_args(argv=None):
    parser = _Parser(prog="heldout.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the YAML whose model.model_config builds the model")
    parser.add_argument("--load_checkpoint", required=True, help="a Hugging Face folder, a .ckpt or safetensors file, or a converted checkpoint folder")
    parser.add_argument("--eval_data", required=True, help="a MindRecord of input_ids / labels rows")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per forward pass (default 8)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """CLI entry point: 0 and one result line, or 2 and one error line on stderr."""
    args = _parse_args(argv)
    try:
        if args.batch_size <= 0:
            raise EvaluationError(f"--batch_size must be > 0, got {args.batch_size}")
        if not os.path.isfile(args.config):
            raise EvaluationError(f"--config: no such file: {args.config}")
        if not os.path.exists(args.load_checkpoint):
            raise EvaluationError(f"--load_checkpoint: no such file or folder: {args.load_checkpoint}")
        if not os.path.isfile(args.eval_data):
            raise EvaluationError(f"--eval_data: no such file: {args.eval_data}")
        fields = read_model_config(args.config)
        loss, tokens = heldout_loss(fields, args.load_checkpoint, args.eval_data, args.batch_size)
    except EvaluationError as err:
        print(f"heldout.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    rows = _open_data(args.eval_data)[1]
    print(f"evaluate: loss {loss:.6f} perplexity {math.exp(min(loss, 700.0)):.4f} over {tokens} target tokens "
          f"in {rows} rows ({args.load_checkpoint})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
