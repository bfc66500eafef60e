"""Hugging Face names and the inventory together: the expected tensors of a checkpoint in either naming, and a
whole HF state under this model's names.

The names themselves are ``names.py``'s (``NAME_MAP`` and the functions reading it, re-exported here); which tensors
exist for a config, and their shapes, is the inventory's (``planning/inventory.py``).
"""
from typing import Dict, Optional, Tuple

from research.deepseek2.checkpoints.names import (FILE_ONLY_SUFFIX, NAME_MAP, SCALE_SUFFIX, hf_to_ms, is_stacked,
                                                  ms_to_hf)
from research.deepseek2.errors import CheckpointError
from research.deepseek2.planning.inventory import expected_shapes

__all__ = ["NAME_MAP", "SCALE_SUFFIX", "FILE_ONLY_SUFFIX", "hf_to_ms", "ms_to_hf", "is_stacked", "expected_ms_shapes",
           "expected_hf_shapes", "hf_state_to_ms"]


def expected_ms_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Every weight the model holds for ``config``, MindSpore name -> shape (from the inventory)."""
    return expected_shapes(config)


def expected_hf_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the released HF checkpoint for ``config``, name -> shape: the inventory under HF names, each
    stacked expert weight (E, ...) as E tensors; quantized, each scale with its file-only offset."""
    shapes = {}
    for name, shape in expected_shapes(config).items():
        names = [name, name[:-len(SCALE_SUFFIX)] + FILE_ONLY_SUFFIX] if name.endswith(SCALE_SUFFIX) else [name]
        for each in names:
            if is_stacked(each):
                for expert in range(shape[0]):
                    shapes[ms_to_hf(each, expert)] = shape[1:]
            else:
                shapes[ms_to_hf(each)] = shape
    return shapes


def hf_state_to_ms(tensors, n_routed_experts: Optional[int] = None, keep_unknown: bool = False, stack=None):
    """A whole Hugging Face state in memory ({HF name: tensor}) under MindSpore names, each layer's routed experts
    stacked (E, out, in) in expert order. The one place experts are stacked in memory; the streaming reader
    (``HFCheckpoint.iter_parameters``) assembles them shard by shard instead.

    n_routed_experts: experts a stack must hold (default: up to the highest index given); a missing one is a
    ``CheckpointError`` naming the parameter. keep_unknown: names not in ``NAME_MAP`` pass unchanged (MindFormers'
    hooks see optimizer state too) instead of raising KeyError. stack: how rows are stacked (default ``np.stack``).
    """
    import numpy as np
    out, rows = {}, {}
    for hf_name, value in tensors.items():
        try:
            ms_name, expert = hf_to_ms(hf_name)
        except KeyError:
            if not keep_unknown:
                raise
            ms_name, expert = hf_name, None
        if expert is None:
            out[ms_name] = value
        else:
            rows.setdefault(ms_name, {})[expert] = value
    for ms_name, by_expert in rows.items():
        count = int(n_routed_experts or max(by_expert) + 1)
        missing = [e for e in range(count) if e not in by_expert]
        if missing:
            raise CheckpointError(f"{ms_name}: experts {missing[:8]} of {count} are missing (every expert of a "
                                  f"layer must come together; n_routed_experts = {count})")
        out[ms_name] = (stack or np.stack)([by_expert[e] for e in range(count)])
    return out
