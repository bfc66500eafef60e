"""The semi-auto/auto parallel layout of Ascend training: how each op of the model splits, and laying a built
network out that way. What each weight splits on is the inventory's (``inventory.py``: its cuts); what the other
ops split on is ``op_strategies`` here. Plain Python until ``apply_semi_auto`` is called with a network.

``apply_semi_auto(net, shape)`` gives every Linear's MatMul the strategy of its weight's cuts and the ops of
``op_strategies`` theirs; MindSpore propagates the rest (``parallel_mode: 2``, ``search_mode:
sharding_propagation``). The model is built with ``training_local_shape(shape, True)``, so the capacity dispatch and
token dropping group tokens by data-parallel rank. The degrees come from ``parallel_check.parallel_shape``.
"""
from typing import Dict, Tuple

from research.deepseek2.planning.capacity import expert_capacity
from research.deepseek2.planning.inventory import LocalShape, Param, parameters, parts
from research.deepseek2.planning.parallel_check import ParallelShape

__all__ = ["training_local_shape", "place_layers", "weight_strategies", "matmul_strategy", "op_strategies",
           "expert_buffers", "apply_semi_auto"]


def training_local_shape(sizes: ParallelShape, semi_auto: bool) -> LocalShape:
    """What a training process holds: everything; under semi-auto/auto parallel the graph sees the global batch, so
    the capacity dispatch and token dropping work in data_parallel token groups (one per rank's batch)."""
    return LocalShape(token_groups=sizes.dp if semi_auto else 1)


def place_layers(net, parallel_config, offset=0):
    """Pipeline stage, recompute and gradient fusion of every decoder layer of a built ``net`` from MindFormers'
    parallel_config object (its ``recompute`` included), through MindFormers' ``LayerSetting`` (the rule its own
    models use); the embedding goes to the first stage, the final norm and lm_head to the last. Returns the stage of
    every layer. A plain parallel_config (no ``pipeline_stage`` and ``recompute``) leaves the layers as they are."""
    layers = net.model.layers
    if not (hasattr(parallel_config, "pipeline_stage") and hasattr(parallel_config, "recompute")):
        return [0] * len(layers)
    from mindformers.parallel_core.training_graph.transformer.utils import LayerSetting
    setting = LayerSetting(len(layers), offset or 0, parallel_config)
    for layer_id, layer in enumerate(layers):
        setting(layer, layer_id)
    if parallel_config.pipeline_stage > 1:
        net.model.tok_embeddings.pipeline_stage = 0
        net.model.norm_out.pipeline_stage = parallel_config.pipeline_stage - 1
        net.lm_head.pipeline_stage = parallel_config.pipeline_stage - 1
    return [int(getattr(layer, "pipeline_stage", 0)) for layer in layers]


def weight_strategies(config, sizes: ParallelShape) -> Dict[str, Tuple[int, ...]]:
    """{parameter name: parts of each dimension} for the full model of ``config`` (no model is built)."""
    return {param.name: parts(param, sizes.axes()) for param in parameters(config)}


def matmul_strategy(param: Param, sizes: ParallelShape) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Strategy of a Linear's MatMul(x (tokens, in), W (out, in)^T) for its weight: column parallel when W is cut on
    its output rows, row parallel (partial sums) when cut on its input columns; tokens by data parallel."""
    out_parts, in_parts = parts(param, sizes.axes())
    if in_parts > 1:
        return (sizes.dp, in_parts), (1, in_parts)
    return (sizes.dp, 1), (out_parts, 1)


def op_strategies(cell_type: str, sizes: ParallelShape, experts: Param = None) -> Dict[str, tuple]:
    """{op attribute of a cell of type ``cell_type``: strategy}: the ops that are not a Linear's MatMul.

    Routing, ranking and gathers stay inside each data-parallel group (dp, 1, ...); the expert matmuls take experts
    by ep, each expert's G*C rows by dp // ep and widths by mp, so MindSpore moves the dispatched rows from their
    group's rank to their expert's rank (AlltoAll) and back. ``experts``: the inventory entry of the stacked w1.
    """
    dp, mp, ep = sizes.dp, sizes.mp, sizes.ep
    if cell_type == "Embedding":
        return {"gather": ((sizes.axes()["vocab"], 1), (dp, 1))}
    if cell_type == "RankWithin":
        return {"sort_desc": ((dp, 1),), "sort_asc": ((dp, 1),), "gather": ((dp, 1), (dp, 1))}
    if cell_type == "RoutedExperts":
        up = parts(experts, sizes.axes())                                         # (ep, mp, 1)
        return {"sort_slots": ((dp, 1),), "index_gather": ((dp, 1), (dp, 1)), "row_gather": ((dp, 1, 1), (dp, 1)),
                "bmm_up": ((ep, dp // ep, 1), up), "bmm_down": ((ep, dp // ep, mp), (up[0], up[2], up[1]))}
    return {}


def expert_buffers(config, sizes: ParallelShape) -> dict:
    """Shapes of the capacity dispatch for one micro-batch of ``batch_size`` sequences per data-parallel rank:
    groups G = dp, tokens per group T_g = batch_size * seq_length, rows per expert and group C, the buffer
    (E, G*C, hidden) and its per-rank part (E/ep, G*C/(dp/ep), hidden)."""
    tokens = config.batch_size * config.seq_length
    experts, dp, ep = config.n_routed_experts, sizes.dp, sizes.ep
    rows = expert_capacity(tokens, config.num_experts_per_tok, experts, config.expert_capacity_factor)
    return {"groups": dp, "group_tokens": tokens, "capacity": rows, "buffer": (experts, dp * rows, config.hidden_size),
            "per_rank": (experts // ep, dp * rows // (dp // ep), config.hidden_size)}


def apply_semi_auto(net, sizes: ParallelShape) -> Dict[str, tuple]:
    """Lay ``net`` out for semi-auto/auto parallel training (Ascend): returns {op path: strategy}.

    The net must be built with ``training_local_shape(sizes, True)`` (token groups = dp) and the capacity dispatch
    (``moe_dispatch: capacity``): a ValueError names what is wrong otherwise.
    """
    from research.deepseek2.layers import Linear
    from research.deepseek2.moe import RoutedExperts
    inventory = {p.name: p for p in parameters(net.config)}
    stacked_w1 = next((p for p in inventory.values() if p.name.endswith("routed_experts.w1")), None)
    applied = {}
    for path, cell in net.cells_and_names():
        kind = "RoutedExperts" if isinstance(cell, RoutedExperts) else type(cell).__name__   # LoRA subclasses too
        if isinstance(cell, RoutedExperts):
            if cell.dispatch != "capacity":
                raise ValueError("DeepseekV2Config.moe_dispatch = 'dropless': semi-auto/auto parallel training needs "
                                 "'capacity' (set model.model_config.moe_dispatch: capacity and expert_capacity_factor)")
            if cell.groups != sizes.dp:
                raise ValueError(f"{path}: built with {cell.groups} token group(s) but data_parallel = {sizes.dp}: "
                                 f"build the model with layout.training_local_shape(sizes, semi_auto=True)")
        if isinstance(cell, Linear):
            weight = inventory.get(f"{path}.weight")
            if weight is None:
                raise ValueError(f"{path}.weight is not in the parameter inventory (inventory.py)")
            strategy = matmul_strategy(weight, sizes)
            cell.matmul.shard(strategy)
            applied[f"{path}.matmul"] = strategy
            continue
        for op_name, strategy in op_strategies(kind, sizes, stacked_w1).items():
            getattr(cell, op_name).shard(strategy)
            applied[f"{path}.{op_name}"] = strategy
    return applied
