"""A Hugging Face DeepSeek-V2 checkpoint seen as this model's parameters: checked against a config, then streamed.

``check_hf_tensors`` compares the tensors of an ``HFCheckpoint`` with what the config expects (names through
``weight_map``) before anything is converted; ``iter_hf_as_ms`` yields MindSpore names and arrays shard by shard,
stacking each layer's routed experts on the way. Memory: one tensor, or one stack being assembled.
"""
from typing import Dict, Iterator, List, Tuple

import numpy as np
from mindformers.tools.logger import logger
from tqdm import tqdm

from research.deepseek2.ckpt_common import cast_array, describe, np_dtype
from research.deepseek2.ckpt_folders import HFCheckpoint
from research.deepseek2.errors import CheckpointError
from research.deepseek2.weight_map import expected_hf_shapes, hf_to_ms, is_stacked

__all__ = ["check_hf_tensors", "iter_hf_as_ms"]


def check_hf_tensors(hf: HFCheckpoint, config) -> Dict[str, Tuple[Tuple[int, ...], np.dtype, int]]:
    """Check an HF checkpoint against ``config`` before converting anything.

    Raises ``CheckpointError`` for unknown (extra) tensors, missing tensors, and shape mismatches, naming the tensor,
    the file and expected vs got. Returns ``hf.tensor_info()``.
    """
    info = hf.tensor_info()
    expected = expected_hf_shapes(config)
    extra = [n for n in info if n not in expected]
    if extra:
        where = {n: hf.shards[info[n][2]] for n in extra}
        detail = "; ".join(f"{n} (in {where[n]})" for n in sorted(extra)[:10])
        raise CheckpointError(f"{hf.hf_dir}: {len(extra)} unexpected tensor(s) not in the model of this config.json "
                              f"(weight_map.NAME_MAP / expected_hf_shapes): {detail}"
                              + (" ..." if len(extra) > 10 else ""))
    missing = [n for n in expected if n not in info]
    if missing:
        raise CheckpointError(f"{hf.hf_dir}: {len(missing)} tensor(s) missing: {describe(missing)}")
    for name, shape in expected.items():
        got = info[name][0]
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"{hf.shard_path(info[name][2])}: tensor {name!r} has shape {tuple(got)}, "
                                  f"expected {tuple(shape)} from the config")
    return info


def _plan(config, info):
    """rows: {MindSpore name: [HF names, expert order for stacks]} in model order; owner: {MindSpore name: the input
    shard it is yielded with (the one holding its last row)}; last_use: {input shard: last owner shard reading it}."""
    rows: Dict[str, List] = {}
    for hf_name in expected_hf_shapes(config):
        ms_name, expert = hf_to_ms(hf_name)
        rows.setdefault(ms_name, []).append((expert, hf_name))
    rows = {ms_name: [n for _, n in sorted(r, key=lambda x: x[0] or 0)] for ms_name, r in rows.items()}
    owner = {ms_name: max(info[n][2] for n in hf_names) for ms_name, hf_names in rows.items()}
    last_use = {}
    for ms_name, hf_names in rows.items():
        for n in hf_names:
            last_use[info[n][2]] = max(last_use.get(info[n][2], 0), owner[ms_name])
    return rows, owner, last_use


def iter_hf_as_ms(hf: HFCheckpoint, config, dtype=None, progress: bool = True
                  ) -> Iterator[Tuple[int, str, np.ndarray]]:
    """Yield (shard index, MindSpore name, array) for every parameter, in shard order, then model order.

    A plain tensor goes with the input shard holding it; a stacked routed-expert parameter (n_routed_experts,
    out, in) goes with the input shard holding its last expert row and is assembled right before it is yielded,
    reading rows from earlier shards by offset. Memory: one tensor, or one stack being assembled.
    ``dtype`` (numpy dtype, 'bf16'/'fp16'/'fp32', or None = keep the source dtype) is the output dtype.
    Runs ``check_hf_tensors`` first.
    """
    info = check_hf_tensors(hf, config)
    out_dtype = None if dtype is None else np_dtype(dtype)
    rows, owner, last_use = _plan(config, info)
    readers = {}

    def read(hf_name):
        shard = info[hf_name][2]
        if shard not in readers:
            logger.info(f"reading {hf.shard_path(shard)}")
            readers[shard] = hf.open(shard)
        return readers[shard].get(hf_name)

    bar = tqdm(total=len(info), desc="tensors", unit="tensor", disable=not progress)
    try:
        for i in range(len(hf.shards)):
            for ms_name in (m for m in rows if owner[m] == i):
                hf_names = rows[ms_name]
                if not is_stacked(ms_name):
                    array = cast_array(read(hf_names[0]), out_dtype)
                    bar.update(1)
                    yield i, ms_name, array
                    del array
                    continue
                stacked = None
                for expert, hf_name in enumerate(hf_names):
                    row = read(hf_name)
                    if stacked is None:
                        target = out_dtype if out_dtype is not None else row.dtype
                        stacked = np.empty((len(hf_names),) + row.shape, dtype=target)
                    stacked[expert] = cast_array(row, stacked.dtype)
                    del row
                    bar.update(1)
                yield i, ms_name, stacked
                del stacked
            for shard in [s for s in readers if last_use[s] <= i]:
                readers.pop(shard).close()
    finally:
        bar.close()
        for reader in readers.values():
            reader.close()
