"""Static shapes of the routed experts' capacity dispatch, in plain Python (no MindSpore import).

One rule, used by the layer (``RoutedExperts.capacity``), the parallel plan (``parallel.expert_buffers``) and the
memory planner (``plan_memory.py``, which runs on a login node without MindSpore).
"""
import math

__all__ = ["expert_capacity"]


def expert_capacity(group_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Rows per expert and token group: C = min(T_g, ceil(factor * T_g * k / E)), at least 1; factor 0: C = T_g
    (an expert can take every token of the group: nothing is ever dropped)."""
    if factor <= 0:
        return group_tokens
    return max(1, min(group_tokens, math.ceil(factor * group_tokens * top_k / num_experts)))
