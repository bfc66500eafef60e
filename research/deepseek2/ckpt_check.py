"""Is a checkpoint complete for a model? Decided from file headers, before any tensor is read or any run starts.

``compare`` is the one rule every loader applies: each weight of the model present with its shape and a floating
dtype; the model's declared non-weights (``inventory.buffers``: the latent KV cache) may be absent; optimizer and
step state (``STATE_PREFIXES``) may be present and is skipped, unless the caller asks for it (resuming); anything
else is unexpected. ``check_checkpoint`` applies it to a path (a Hugging Face folder, a MindSpore ``.ckpt`` or
safetensors file or folder) against a config, so a run can refuse a checkpoint before it writes anything.
"""
import os
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
from mindformers.tools.logger import logger

from research.deepseek2.ckpt_common import describe
from research.deepseek2.ckpt_folders import HFCheckpoint, MSCheckpoint, is_hf_folder
from research.deepseek2.errors import CheckpointError
from research.deepseek2.inventory import buffers as declared_buffers
from research.deepseek2.weight_map import expected_ms_shapes

__all__ = ["STATE_PREFIXES", "FLOAT_DTYPES", "compare", "check_checkpoint", "check_declared_format", "stored_format",
           "optimizer_state_names"]

# training state a MindFormers checkpoint may carry beside the weights (optimizer moments, step counters ...)
STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "moments.", "accu_grads.", "accum_grads.",
                  "global_step", "learning_rate", "current_iterator_step", "last_overflow_iterator_step",
                  "epoch_num", "step_num", "loss_scale", "scale_sense", "global_batch_size")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _dtype_ok(dtype) -> bool:
    return dtype is None or np.dtype(dtype).name in FLOAT_DTYPES


def compare(want: Dict[str, Tuple[int, ...]], got: Dict[str, Tuple[Tuple[int, ...], object]], source: str,
            buffers: Iterable[str] = (), required_state: Iterable[str] = ()) -> List[str]:
    """Problems between the weights a model wants ({name: shape}) and a checkpoint's ({name: (shape, dtype)}).
    ``buffers``: declared non-weights, neither required nor refused.

    Returns one message per kind (missing, unexpected, mis-shaped, not floating); empty when the checkpoint fits.
    ``required_state``: state entries that must be present too (a resumed run's optimizer moments).
    """
    absent = set(want) - set(got)
    kept = sorted(absent & set(buffers))
    missing = sorted((absent - set(kept)) | (set(required_state) - set(got)))
    extra = set(got) - set(want)
    saved_buffers = sorted(extra & set(buffers))      # a use_past model's checkpoint carries its latent cache
    state = sorted(n for n in extra - set(saved_buffers) if n.startswith(STATE_PREFIXES))
    unexpected = sorted(extra - set(state) - set(saved_buffers))
    if kept:
        logger.info(f"{source}: declared non-weights not in the checkpoint keep their values: {describe(kept)}")
    if saved_buffers:
        logger.info(f"{source}: declared non-weights in the checkpoint are skipped: {describe(saved_buffers)}")
    if state:
        logger.info(f"{source}: {len(state)} training-state entries beside the weights: {describe(state, 5)}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {describe(missing, 5)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (not in the model): {describe(unexpected, 5)}")
    shaped = [f"{n} is {tuple(got[n][0])}, the model's is {tuple(want[n])}"
              for n in sorted(set(want) & set(got)) if tuple(got[n][0]) != tuple(want[n])]
    if shaped:
        problems.append(f"{len(shaped)} mis-shaped: " + "; ".join(shaped[:5]) + (" ..." if len(shaped) > 5 else ""))
    typed = [f"{n} ({np.dtype(got[n][1]).name})" for n in sorted(set(want) & set(got)) if not _dtype_ok(got[n][1])]
    if typed:
        problems.append(f"{len(typed)} not floating point: {describe(typed, 5)}")
    return problems


def raise_problems(problems: List[str], source: str, verdict: str = "does not fit the model"):
    """CheckpointError: '<source> <verdict>: <problems>' (one line), if there are any."""
    if problems:
        raise CheckpointError(f"{source} {verdict}: " + "; ".join(problems))


def stored_format(path: str) -> str:
    """'safetensors', 'ckpt' or 'bin' (a Hugging Face folder of pytorch_model*.bin): what ``path`` holds.

    A folder is looked into (a MindFormers training output counts by its ``rank_*`` subfolders' files).
    """
    if os.path.isfile(path):
        for suffix in ("safetensors", "ckpt", "bin"):
            if path.endswith("." + suffix):
                return suffix
        if path.endswith(".json"):
            return stored_format(os.path.dirname(path) or os.curdir)
        raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors or .ckpt)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    names = os.listdir(path)
    for rank_dir in sorted(n for n in names if n.startswith("rank_") and os.path.isdir(os.path.join(path, n))):
        names += os.listdir(os.path.join(path, rank_dir))
    found = [suffix for suffix in ("safetensors", "ckpt", "bin") if any(n.endswith("." + suffix) for n in names)]
    if not found:
        raise CheckpointError(f"{path}: no .safetensors, .ckpt or .bin files in this folder")
    if len(found) > 1 and "bin" in found:
        found.remove("bin")
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds both {found[0]} and {found[1]} files; give a folder of one format")
    return found[0]


def optimizer_state_names(weights: Iterable[str]) -> List[str]:
    """The AdamW moments MindFormers saves for each trained weight."""
    return [f"{prefix}.{name}" for name in weights for prefix in ("adam_m", "adam_v")]


def headers(path: str, config=None) -> Tuple[Dict[str, Tuple[Tuple[int, ...], object]], str]:
    """({parameter name: (shape, dtype)}, description) of a checkpoint, from its headers only.

    A Hugging Face folder is checked tensor by tensor against ``config`` (``check_hf_tensors``: missing, unexpected
    and mis-shaped HF names raise there) and reported under MindSpore names, experts stacked.
    """
    if is_hf_folder(path):
        from research.deepseek2.ckpt_hf_as_ms import check_hf_tensors  # pylint: disable=import-outside-toplevel
        from research.deepseek2.weight_map import hf_to_ms  # pylint: disable=import-outside-toplevel
        info = check_hf_tensors(HFCheckpoint(path), config)
        out = {}
        for name, (shape, dtype, _) in info.items():
            ms_name, expert = hf_to_ms(name)
            if expert is None:
                out[ms_name] = (tuple(shape), dtype)
            else:
                count = out.get(ms_name, ((0,), dtype))[0][0] + 1
                out[ms_name] = ((count,) + tuple(shape), dtype)
        return out, f"Hugging Face folder {path}"
    info = MSCheckpoint(path).tensor_info()
    return {name: (tuple(shape), dtype) for name, (shape, dtype, _) in info.items()}, f"checkpoint {path}"


def check_declared_format(path: str, declared_format: Optional[str]) -> str:
    """The format ``path`` holds (``stored_format``); CheckpointError naming both when the run's
    ``load_ckpt_format`` names another (a .bin Hugging Face folder is taken under either)."""
    fmt = stored_format(path)
    if declared_format and fmt != "bin" and declared_format != fmt:
        raise CheckpointError(f"load_ckpt_format is {declared_format!r} but {path} holds {fmt} files "
                              f"(set load_ckpt_format: {fmt}, or --load_ckpt_format {fmt})")
    return fmt


def check_checkpoint(config, path: str, resume: bool = False, declared_format: Optional[str] = None,
                     adapters: Optional[Dict[str, Tuple[int, ...]]] = None) -> Tuple[str, bool]:
    """Refuse (``CheckpointError``) a checkpoint that does not give every weight of ``config`` its shape.

    ``adapters``: {name: shape} of a LoRA run's adapters (``lora.expected_adapter_shapes``): a checkpoint holds all
    of them (a LoRA training output, loaded as it is) or none (a base model; the adapters start fresh).
    ``resume``: the AdamW moments of every trained parameter must be there too (the adapters alone for LoRA).
    ``declared_format``: the run's ``load_ckpt_format``; a path holding another format is refused naming both.
    Returns (the stored format, whether the checkpoint holds the adapters). Reads headers only.
    """
    fmt = check_declared_format(path, declared_format)
    got, source = headers(path, config)
    want = dict(expected_ms_shapes(config))
    adapters = dict(adapters or {})
    has_adapters = bool(set(adapters) & set(got))
    if has_adapters or (adapters and resume):
        want.update(adapters)
    trained = adapters if adapters else want
    required = optimizer_state_names(trained) if resume else ()
    raise_problems(compare(want, got, source, declared_buffers(config), required), source)
    return fmt, has_adapters
