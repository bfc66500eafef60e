"""Is a checkpoint complete for a model? Decided from file headers, before any tensor is read or any run starts.

``compare`` is the one rule every loader applies: each weight of the model present with its shape and a floating
dtype; the model's declared non-weights (``inventory.buffers``: the latent KV cache) may be absent; optimizer and
step state (``STATE_PREFIXES``) may be present and is skipped, unless the caller asks for it (resuming); anything
else is unexpected. ``check_checkpoint`` applies it to an opened checkpoint (``checkpoint.open_checkpoint``: a
Hugging Face folder, a MindSpore ``.ckpt`` or safetensors file or folder) against a config, so a run can refuse a
checkpoint before it writes anything.
"""
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
from mindformers.tools.logger import logger

from research.deepseek2.checkpoints.arrays import describe
from research.deepseek2.checkpoints.checkpoint import Checkpoint
from research.deepseek2.checkpoints.weight_map import expected_ms_shapes
from research.deepseek2.errors import CheckpointError
from research.deepseek2.planning.inventory import buffers as declared_buffers, held_dtypes, quantization_settings

__all__ = ["STATE_PREFIXES", "FLOAT_DTYPES", "compare", "raise_problems", "check_checkpoint", "check_declared_format",
           "optimizer_state_names"]

# training state a MindFormers checkpoint may carry beside the weights (optimizer moments, step counters ...)
STATE_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "moments.", "accu_grads.", "accum_grads.",
                  "global_step", "learning_rate", "current_iterator_step", "last_overflow_iterator_step",
                  "epoch_num", "step_num", "loss_scale", "scale_sense", "global_batch_size")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _dtype_ok(dtype) -> bool:
    return dtype is None or np.dtype(dtype).name in FLOAT_DTYPES


def compare(want: Dict[str, Tuple[int, ...]], got: Dict[str, Tuple[Tuple[int, ...], object]], source: str,
            buffers: Iterable[str] = (), required_state: Iterable[str] = (),
            want_dtypes: Optional[Dict[str, str]] = None) -> List[str]:
    """Problems between the weights a model wants ({name: shape}) and a checkpoint's ({name: (shape, dtype)}).
    ``buffers``: declared non-weights, neither required nor refused. ``want_dtypes``: {name: dtype} of weights held
    in a dtype of their own (a quantized model's int8 weights, ``inventory.held_dtypes``); the others must be
    floating point.

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
    want_dtypes = {n: d for n, d in (want_dtypes or {}).items() if d != "float32"}     # scales: any float
    typed = [f"{n} ({np.dtype(got[n][1]).name})" for n in sorted(set(want) & set(got))
             if n not in want_dtypes and not _dtype_ok(got[n][1])]
    if typed:
        problems.append(f"{len(typed)} not floating point: {describe(typed, 5)}")
    held = [f"{n} ({np.dtype(got[n][1]).name}, expected {want_dtypes[n]})" for n in sorted(set(want_dtypes) & set(got))
            if got[n][1] is not None and np.dtype(got[n][1]).name != want_dtypes[n]]
    if held:
        problems.append(f"{len(held)} not of the quantized dtype: {describe(held, 5)}")
    return problems


def raise_problems(problems: List[str], source: str, verdict: str = "does not fit the model"):
    """CheckpointError: '<source> <verdict>: <problems>' (one line), if there are any."""
    if problems:
        raise CheckpointError(f"{source} {verdict}: " + "; ".join(problems))


def optimizer_state_names(weights: Iterable[str]) -> List[str]:
    """The AdamW moments MindFormers saves for each trained weight."""
    return [f"{prefix}.{name}" for name in weights for prefix in ("adam_m", "adam_v")]


def check_declared_format(checkpoint: Checkpoint, declared_format: Optional[str]):
    """CheckpointError naming both when the run's ``load_ckpt_format`` names another format than the checkpoint
    holds (a .bin Hugging Face folder is taken under either)."""
    fmt = checkpoint.format
    if declared_format and fmt != "bin" and declared_format != fmt:
        raise CheckpointError(f"load_ckpt_format is {declared_format!r} but {checkpoint.path} holds {fmt} files "
                              f"(set load_ckpt_format: {fmt}, or --load_ckpt_format {fmt})")


def check_checkpoint(config, checkpoint: Checkpoint, resume: bool = False, declared_format: Optional[str] = None,
                     adapters: Optional[Dict[str, Tuple[int, ...]]] = None) -> bool:
    """Refuse (``CheckpointError``) a checkpoint that does not give every weight of ``config`` its shape.

    ``checkpoint``: an opened checkpoint (``open_checkpoint``). ``adapters``: {name: shape} of a LoRA run's adapters
    (``lora.expected_adapter_shapes``): a checkpoint holds all of them (a LoRA training output, loaded as it is) or
    none (a base model; the adapters start fresh). ``resume``: the AdamW moments of every trained parameter must be
    there too (the adapters alone for LoRA). ``declared_format``: the run's ``load_ckpt_format``; a checkpoint of
    another format is refused naming both. Returns whether the checkpoint holds the adapters. Reads headers only.
    """
    check_declared_format(checkpoint, declared_format)
    if quantization_settings(config) is not None and getattr(checkpoint, "kind", None) != "hf":
        from research.deepseek2.errors import QuantizationError
        raise QuantizationError(f"--load_checkpoint {checkpoint.path}: model.model_config.quantization_config asks "
                                f"for quantized weights, which come in the folder convert_weight.py --quantize "
                                f"writes (a MindSpore checkpoint holds float weights)")
    got = checkpoint.parameters(config)
    want = dict(expected_ms_shapes(config))
    adapters = dict(adapters or {})
    has_adapters = bool(set(adapters) & set(got))
    if has_adapters or (adapters and resume):
        want.update(adapters)
    trained = adapters if adapters else want
    required = optimizer_state_names(trained) if resume else ()
    raise_problems(compare(want, got, checkpoint.description, declared_buffers(config), required,
                           held_dtypes(config)), checkpoint.description)
    return has_adapters
