"""Rows per expert of DeepSeekMoE's capacity dispatch: the static buffer size each routed expert gets per token
group. Read by the model (``moe.RoutedExperts``), the semi-auto layout (``layout.expert_buffers``) and the memory
plan. Plain Python.
"""
import math

__all__ = ["expert_capacity"]


def expert_capacity(group_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Rows per expert and token group of the capacity dispatch: C = min(T_g, ceil(factor * T_g * k / E)), at least
    1; factor 0: C = T_g (an expert can take every token of the group: nothing is ever dropped)."""
    if factor <= 0:
        return group_tokens
    return max(1, min(group_tokens, math.ceil(factor * group_tokens * top_k / num_experts)))
