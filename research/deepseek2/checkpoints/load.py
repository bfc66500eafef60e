"""Loading a checkpoint into a built net: any kind ``open_checkpoint`` opens (a Hugging Face folder, a MindSpore
``.ckpt`` or safetensors file or folder).

The checkpoint's names and shapes are compared with the net's parameters (``check.compare``, from the headers)
before anything is read; then each parameter gets its tensor as it is read (``set_data`` over the array's own
buffer): memory is the model plus one tensor (or one stacked expert parameter being assembled), never a second model.
"""
from typing import Dict, Iterable

import numpy as np
from mindformers.tools.logger import logger

from research.deepseek2.checkpoints.arrays import cast_array, np_dtype
from research.deepseek2.checkpoints.check import compare, raise_problems
from research.deepseek2.checkpoints import open_checkpoint
from research.deepseek2.planning.inventory import buffers as declared_buffers

__all__ = ["load_checkpoint", "read_checkpoint", "build_empty"]


def build_empty(build, *args, **kwargs):
    """``build(*args, **kwargs)`` under MindSpore's ``no_init_parameters``: parameters are declared, not filled with
    random numbers, because a checkpoint is about to give them their values. Call ``net.init_parameters_data()``
    after loading for what the checkpoint does not hold (declared non-weights such as the latent cache)."""
    from mindspore.nn.utils import no_init_parameters
    with no_init_parameters():
        return build(*args, **kwargs)


def _assign(param, array: np.ndarray, via=None):
    """Give ``param`` the values of ``array`` (cast to its dtype, through ``via`` first if given), sharing the array's
    buffer (``Tensor.from_numpy``): one copy of a tensor at most, where ``Parameter(Tensor(array))`` +
    ``load_param_into_net`` held three (docs/benchmarks.md, checkpoint loading)."""
    import mindspore as ms
    data = cast_array(cast_array(array, via), np_dtype(param.dtype))
    if not (data.flags.c_contiguous and data.flags.owndata and data.flags.writeable):
        data = np.array(data, order="C")               # a buffer of its own for the tensor to keep
    param.set_data(ms.Tensor.from_numpy(data))


def load_checkpoint(net, checkpoint, strict: bool = True, keep: Iterable[str] = (), dtype=None,
                    progress: bool = True):
    """Load a checkpoint into ``net``, one tensor at a time; returns the names loaded.

    Args:
        net: a built ``mindspore.nn.Cell``; a Hugging Face folder is read against ``net.config`` (the shapes of the
            net, whatever seq_length-like knobs the folder's config.json holds).
        checkpoint: a path or an opened ``Checkpoint``.
        strict: raise ``CheckpointError`` listing missing/unexpected/mis-shaped names before loading anything (else
            log a warning and load what matches).
        keep: checkpoint entries the caller reads itself (LoRA adapters): not compared with the net, returned.
        dtype: cast through this dtype first (then to each parameter's dtype); None: straight to the parameter's.
    Returns:
        the loaded names, or with ``keep`` (loaded names, {kept name: array}).
    """
    checkpoint = open_checkpoint(checkpoint)
    config = getattr(net, "config", None)
    keep = set(keep)
    params = {p.name: p for p in net.get_parameters()}
    got = {name: info for name, info in checkpoint.parameters(config).items() if name not in keep}
    held = {n: np_dtype(p.dtype).name for n, p in params.items() if np_dtype(p.dtype).kind == "i"}
    problems = compare({n: tuple(p.shape) for n, p in params.items()}, got, checkpoint.description,
                       declared_buffers(config) if config is not None else (), want_dtypes=held)
    if problems and not strict:
        logger.warning(f"{checkpoint.description} does not match the net: " + "; ".join(problems))
    else:
        raise_problems(problems, checkpoint.description, "does not match the net")
    via = None if dtype is None else np_dtype(dtype)
    loaded, kept = [], {}
    for file, name, array in checkpoint.iter_parameters(config, progress=progress):
        if name in keep:
            kept[name] = np.array(array)
        elif name in params and tuple(params[name].shape) == tuple(array.shape):
            _assign(params[name], array, via)
            loaded.append(name)
        del array
    logger.info(f"loaded {len(loaded)} tensors from {checkpoint.description}")
    return (loaded, kept) if keep else loaded


def read_checkpoint(checkpoint) -> Dict[str, "np.ndarray"]:
    """{name: numpy array} of a whole (small) MindSpore checkpoint, dtypes as stored: for tests and inspection."""
    checkpoint = open_checkpoint(checkpoint)
    return {name: array for _, name, array in checkpoint.iter_parameters(progress=False)}
