"""Loading checkpoints into a net: a MindSpore ``.ckpt`` (file or converted folder) or a Hugging Face folder.

Both loaders compare the checkpoint's names and shapes with the net's parameters before loading anything, then give
each parameter its tensor as it is read (``set_data`` over the array's own buffer): memory is the model plus one
tensor (or one stacked expert parameter being assembled), never a second model.
"""
import json
import os
from typing import Dict, List

import numpy as np
import mindspore as ms
from mindformers.tools.logger import logger
from tqdm import tqdm

from research.deepseek2.ckpt_check import compare, raise_problems
from research.deepseek2.ckpt_common import cast_array, np_dtype
from research.deepseek2.ckpt_folders import HFCheckpoint, MSCheckpoint
from research.deepseek2.ckpt_hf_as_ms import check_hf_tensors, iter_hf_as_ms
from research.deepseek2.errors import CheckpointError
from research.deepseek2.inventory import buffers as declared_buffers
from research.deepseek2.weight_map import expected_ms_shapes

__all__ = ["load_ms_checkpoint", "load_hf_checkpoint"]

def _net_params(net) -> Dict[str, "ms.Parameter"]:
    return {p.name: p for p in net.get_parameters()}


def _declared_buffers(net) -> set:
    """The net's non-weights, as the inventory declares them (the latent KV cache); empty for a net without one."""
    config = getattr(net, "config", None)
    return set(declared_buffers(config)) if config is not None else set()


def _check_names(net_params, ckpt_info, source: str, strict: bool, buffers_declared=frozenset()):
    """``ckpt_check.compare`` between the net's parameters and a checkpoint's {name: (shape, dtype)}; raise
    (strict) or warn."""
    problems = compare({n: tuple(p.shape) for n, p in net_params.items()}, ckpt_info, source, buffers_declared)
    if problems and not strict:
        logger.warning(f"{source} does not match the net: " + "; ".join(problems))
        return
    raise_problems(problems, source, "does not match the net")


def _to_parameter(name: str, array: np.ndarray, dtype) -> "ms.Parameter":
    return ms.Parameter(ms.Tensor(cast_array(array, dtype)), name=name, requires_grad=False)


def _assign(param, array: np.ndarray, via=None):
    """Give ``param`` the values of ``array`` (cast to its dtype, through ``via`` first if given), sharing the array's
    buffer (``Tensor.from_numpy``): one copy of a tensor at most, where ``Parameter(Tensor(array))`` +
    ``load_param_into_net`` held three (docs/benchmarks.md, checkpoint loading)."""
    data = cast_array(cast_array(array, via), np_dtype(param.dtype))
    if not (data.flags.c_contiguous and data.flags.owndata and data.flags.writeable):
        data = np.array(data, order="C")               # a buffer of its own for the tensor to keep
    param.set_data(ms.Tensor.from_numpy(data))


def load_ms_checkpoint(net, path: str, strict: bool = True, skip=frozenset()):
    """Load a MindSpore checkpoint (``.ckpt`` or ``.safetensors`` file, or a converted folder) into ``net`` shard by
    shard.

    Args:
        net: a ``mindspore.nn.Cell`` or None.
        path: a ``.ckpt`` / ``.safetensors`` file, a folder of them (with ``MS_NAME_MAP`` or ``MS_INDEX_NAME``) or
            that index json.
        strict: raise ``CheckpointError`` listing missing/unexpected/mis-shaped names (else log a warning and load
            what matches).
        skip: checkpoint entries the caller reads itself (LoRA adapters merged by ``lora_io.load_merged``).
    Returns:
        net None: {name: Parameter} of the whole checkpoint (dtype as stored). Otherwise the list of loaded names.
        Every tensor is cast to the dtype of the net parameter it fills.
    """
    source = MSCheckpoint(path)
    if net is None:
        out = {}
        for _, tensors in source.iter_files():
            for name, array in tensors:
                out[name] = _to_parameter(name, array, None)
        return out
    info = source.tensor_info()
    params = _net_params(net)
    _check_names(params, {n: (v[0], v[1]) for n, v in info.items() if n not in skip}, path, strict,
                 _declared_buffers(net))
    loaded = []
    with tqdm(total=len(info), desc="loading", unit="tensor") as bar:
        for file, tensors in source.iter_files():
            logger.info(f"loading {file}")
            for name, array in tensors:                # one tensor in memory at a time
                bar.update(1)
                if name not in params or tuple(params[name].shape) != tuple(array.shape):
                    continue
                _assign(params[name], array)
                loaded.append(name)
                del array
    return loaded


def _hf_config(hf_dir: str):
    from research.deepseek2.deepseek2_config import DeepseekV2Config  # pylint: disable=import-outside-toplevel
    config_file = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{config_file} not found (pass config= to load_hf_checkpoint)")
    with open(config_file) as f:
        return DeepseekV2Config(**json.load(f))


def load_hf_checkpoint(net, hf_dir: str, dtype=None, config=None, strict: bool = True) -> List[str]:
    """Load Hugging Face DeepSeek-V2 weights (safetensors shards or .bin) straight into ``net``, one shard at a time.

    Names are mapped through ``weight_map`` and routed experts stacked on the fly. ``config`` defaults to
    ``DeepseekV2Config(**hf_dir/config.json)``; ``dtype`` None casts each tensor to its net parameter's dtype,
    otherwise through ``dtype`` first (then to the parameter's dtype).
    Raises ``CheckpointError`` listing missing/unexpected/mis-shaped names before loading anything (strict).
    Returns the loaded parameter names.
    """
    if config is None:
        config = _hf_config(hf_dir)
    hf = HFCheckpoint(hf_dir)
    check_hf_tensors(hf, config)
    params = _net_params(net)
    _check_names(params, {n: (shape, None) for n, shape in expected_ms_shapes(config).items()}, hf_dir, strict,
                 _declared_buffers(net))
    want = None if dtype is None else np_dtype(dtype)
    loaded = []
    for _, name, array in iter_hf_as_ms(hf, config, dtype=None):
        if name not in params or tuple(params[name].shape) != tuple(array.shape):
            continue
        _assign(params[name], array, via=want)
        loaded.append(name)
        del array
    return loaded
