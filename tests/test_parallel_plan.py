"""The parameter inventory and the parallel plan, as far as a CPU can check them: the built model holds exactly the
inventory's weights; weight and op strategies for the 236B configs and the per-rank slices of hand-written tensor
parallel are held against values written out by hand (not recomputed from the same declarations)."""
import os

import numpy as np
import pytest
import yaml
import mindspore as ms

import reference as R
from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
from research.deepseek2.planning.inventory import (buffers, divisibility_problems, expected_shapes, local_shape,
                                                   parameters)
from research.deepseek2.planning.layout import (apply_semi_auto, expert_buffers, place_layers, training_local_shape,
                                                weight_strategies)
from research.deepseek2.planning.parallel_check import ParallelShape, parallel_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _yaml(name):
    with open(os.path.join(ROOT, "research", "deepseek2", name), encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    fields = {k: v for k, v in config["model"]["model_config"].items() if k != "type"}
    return DeepseekV2Config(**fields), config["parallel_config"]


@pytest.mark.parametrize("name", ["run_train_deepseek2_236B.yaml", "finetune_deepseek2_236B.yaml",
                                  "run_predict_deepseek2_236B.yaml"])
def test_236b_weight_strategies_divide(name):
    config, pc = _yaml(name)
    dp, mp = pc.get("data_parallel", 1), pc.get("model_parallel", 1)
    ep = pc.get("expert_parallel", 1) if "predict" not in name else mp     # predict splits experts over mp ranks
    vocab_emb_dp = pc.get("vocab_emb_dp", True)
    sizes = ParallelShape(dp=dp, mp=mp, ep=ep, vocab_emb_dp=vocab_emb_dp)
    assert divisibility_problems(config, sizes.axes()) == []
    plan = weight_strategies(config, sizes)
    assert plan["model.layers.0.attention.l2q_proj.weight"] == (mp, 1)       # heads split
    assert plan["model.layers.0.attention.lkv2kv.weight"] == (mp, 1)
    assert plan["model.layers.0.attention.wo.weight"] == (1, mp)
    assert plan["model.layers.0.attention.kv2l.weight"] == (1, 1)            # latent replicated
    assert plan["model.layers.1.feed_forward.routed_experts.w1"] == (ep, mp, 1)   # experts, then widths
    assert plan["model.layers.1.feed_forward.routed_experts.w2"] == (ep, 1, mp)
    assert plan["model.layers.1.feed_forward.shared_experts.w2.weight"] == (1, mp)
    vocab = 1 if vocab_emb_dp else mp
    assert plan["model.tok_embeddings.embedding_weight"] == (vocab, 1)
    assert plan["lm_head.weight"] == (vocab, 1)
    if "predict" not in name:
        assert not vocab_emb_dp and vocab == 4                               # the training YAMLs split the vocabulary


@pytest.mark.parametrize("name", ["run_train_deepseek2_236B.yaml", "finetune_deepseek2_236B.yaml"])
def test_236b_expert_buffers(name):
    config, pc = _yaml(name)
    buffers = expert_buffers(config, parallel_shape(pc))
    # by hand: T_g = 1 x 4096 tokens per rank, C = ceil(2.0 x 4096 x 6 / 160) = ceil(307.2) = 308 rows per expert
    assert (buffers["groups"], buffers["group_tokens"], buffers["capacity"]) == (8, 4096, 308)
    assert buffers["buffer"] == (160, 8 * 308, 5120)
    assert buffers["per_rank"] == (20, 8 * 308, 5120)                        # ep 8 = dp 8: one rank per expert group


def test_indivisible_plan_is_reported_by_name():
    config = DeepseekV2Config(hidden_size=64, num_attention_heads=6, n_routed_experts=6, num_experts_per_tok=2,
                              moe_intermediate_size=16, intermediate_size=96, kv_lora_rank=16, q_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=2,
                              first_k_dense_replace=1, n_shared_experts=1, vocab_size=66, seq_length=8)
    problems = divisibility_problems(config, {"mp": 4, "ep": 4, "vocab": 4})
    assert any("num_attention_heads = 6" in p and "l2q_proj" in p for p in problems)
    assert any("n_routed_experts = 6" in p and "routed_experts.w1" in p for p in problems)
    assert any("vocab_size = 66" in p and "embedding_weight" in p for p in problems)


def _tiny(**fields):
    base = dict(hidden_size=32, num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=16, intermediate_size=64, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=2, first_k_dense_replace=1, n_shared_experts=1,
                vocab_size=64, seq_length=8, moe_dispatch="capacity")
    base.update(fields)
    return DeepseekV2Config(**base)


def test_apply_semi_auto_sets_strategies_from_the_plan():
    sizes = ParallelShape(dp=2, mp=2, ep=2, vocab_emb_dp=False)
    net = DeepseekV2ForCausalLM(_tiny(), training_local_shape(sizes, semi_auto=True))
    applied = apply_semi_auto(net, sizes)
    assert applied["model.layers.0.attention.l2q_proj.matmul"] == ((2, 1), (2, 1))
    assert applied["model.layers.0.attention.wo.matmul"] == ((2, 2), (1, 2))
    assert applied["model.layers.0.feed_forward.w2.matmul"] == ((2, 2), (1, 2))
    assert applied["model.layers.0.attention.kv2l.matmul"] == ((2, 1), (1, 1))
    assert applied["lm_head.matmul"] == ((2, 1), (2, 1))                     # vocabulary split (vocab_emb_dp False)
    cells = dict(net.cells_and_names())
    assert cells["model.layers.0.attention.l2q_proj"].matmul.in_strategy == ((2, 1), (2, 1))
    assert cells["model.tok_embeddings"].gather.in_strategy == ((2, 1), (2, 1))
    # the expert-parallel dispatch: groups per dp rank, experts by ep, rows by dp // ep, widths by mp
    ffn = cells["model.layers.1.feed_forward.routed_experts"]
    assert ffn.groups == 2 and cells["model.layers.1.feed_forward"].groups == 2
    assert ffn.bmm_up.in_strategy == ((2, 1, 1), (2, 2, 1))                # experts by ep, widths by mp
    assert ffn.bmm_down.in_strategy == ((2, 1, 2), (2, 1, 2))
    assert ffn.row_gather.in_strategy == ((2, 1, 1), (2, 1))
    assert ffn.rank_in_expert.sort_desc.in_strategy == ((2, 1),)
    assert cells["model.layers.1.feed_forward.rank_in_device"].gather.in_strategy == ((2, 1), (2, 1))


def test_apply_semi_auto_needs_the_token_groups():
    sizes = ParallelShape(dp=2, mp=1, ep=2)
    with pytest.raises(ValueError, match="token group"):
        apply_semi_auto(DeepseekV2ForCausalLM(_tiny()), sizes)


def test_inference_slices_by_hand():
    """Rank 1 of 2 of the V2-style reference config (4 heads, q_head_dim 24, v_head_dim 12, 8 experts of width 24,
    2 shared experts, dense FFN 96): shapes written out by hand."""
    config = DeepseekV2Config(**R.V2_STYLE, seq_length=16)
    local = local_shape(config, 2, 1)
    assert (local.tp, local.first_expert) == (2, 4)                          # experts 4..7
    net = DeepseekV2ForCausalLM(config, local)
    got = {p.name: tuple(p.shape) for p in net.get_parameters()}
    by_hand = {
        "model.layers.0.attention.l2q_proj.weight": (2 * 24, 32),             # 2 of 4 heads x (16 nope + 8 rope)
        "model.layers.0.attention.lkv2kv.weight": (2 * (16 + 12), 24),        # 2 heads x (nope + value), latent 24
        "model.layers.0.attention.wo.weight": (64, 2 * 12),                   # rows of 2 heads' values
        "model.layers.0.attention.kv2l.weight": (24 + 8, 64),                 # latent + rope key: whole
        "model.layers.0.feed_forward.w1.weight": (48, 64),                    # dense FFN 96 / 2
        "model.layers.0.feed_forward.w2.weight": (64, 48),
        "model.layers.1.feed_forward.router.weight": (8, 64),                 # router: whole
        "model.layers.1.feed_forward.routed_experts.w1": (4, 24, 64),         # 4 of 8 experts, full width
        "model.layers.1.feed_forward.routed_experts.w2": (4, 64, 24),
        "model.layers.1.feed_forward.shared_experts.w1.weight": (24, 64),     # 2 x 24 shared width / 2
        "model.tok_embeddings.embedding_weight": (160, 64),                   # vocabulary: whole
        "lm_head.weight": (160, 64),
    }
    assert {name: got[name] for name in by_hand} == by_hand
    with pytest.raises(ValueError, match="num_attention_heads = 4"):
        local_shape(config, 3, 0)


@pytest.mark.parametrize("fields", [R.V2_STYLE, R.LITE_STYLE, dict(R.LITE_STYLE, tie_word_embeddings=True),
                                    dict(R.V2_STYLE, attention_bias=True, moe_layer_freq=2, num_hidden_layers=4)],
                         ids=["v2", "lite", "tied", "bias-freq2"])
def test_built_model_holds_exactly_the_inventory(fields):
    config = DeepseekV2Config(**fields, seq_length=16, use_past=True)
    net = DeepseekV2ForCausalLM(config)
    got = {p.name: tuple(p.shape) for p in net.get_parameters()}
    weights = {n: s for n, s in got.items() if n not in buffers(config)}
    assert weights == expected_shapes(config)
    assert set(got) - set(weights) == set(buffers(config)) and buffers(config)   # the latent caches, declared
    assert [p.name for p in parameters(config)] == list(expected_shapes(config))


def test_apply_semi_auto_refuses_the_dropless_dispatch():
    net = DeepseekV2ForCausalLM(_tiny(moe_dispatch="dropless"))
    with pytest.raises(ValueError, match="moe_dispatch = 'dropless'"):
        apply_semi_auto(net, ParallelShape(dp=2, mp=1, ep=2))


def test_parallel_shape_from_mindformers_config():
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig
    pc = TransformerOpParallelConfig(data_parallel=8, model_parallel=4, expert_parallel=8, pipeline_stage=2,
                                     micro_batch_num=16, vocab_emb_dp=False)
    shape = parallel_shape(pc)
    assert (shape.dp, shape.mp, shape.pp, shape.ep, shape.micro_batch_num) == (8, 4, 2, 8, 16)
    assert shape.axes() == {"mp": 4, "ep": 8, "vocab": 4}
    shape = parallel_shape({"data_parallel": 2, "model_parallel": 2})
    assert (shape.dp, shape.mp, shape.pp, shape.ep) == (2, 2, 1, 1) and shape.axes() == {"mp": 2, "ep": 1, "vocab": 1}


@pytest.mark.parametrize("mode", ["pynative", pytest.param("graph", marks=pytest.mark.slow)])
def test_laid_out_model_computes_the_same_on_one_device(mode):
    """The grouped (dp = 2) capacity dispatch, run on one CPU device, gives the loss of the plain model (and, in
    inference, where it falls back to the dropless dispatch, its logits): the layout changes where rows are
    computed, never what."""
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_seed(3)
    sizes = ParallelShape(dp=2, mp=2, ep=2, vocab_emb_dp=False)
    plain = DeepseekV2ForCausalLM(_tiny(moe_dispatch="dropless", init_std=0.3))
    laid_out = DeepseekV2ForCausalLM(_tiny(init_std=0.3), training_local_shape(sizes, semi_auto=True))
    ms.load_param_into_net(laid_out, {p.name: ms.Parameter(p.data.copy(), name=p.name)
                                      for p in plain.get_parameters()})
    apply_semi_auto(laid_out, sizes)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32)
    for net in (plain, laid_out):
        net.set_train(False)
    np.testing.assert_allclose(laid_out(ms.Tensor(tokens[:, :8])).asnumpy(), plain(ms.Tensor(tokens[:, :8])).asnumpy(),
                               rtol=1e-5, atol=1e-5)
    for net in (plain, laid_out):
        net.set_train(True)
    assert abs(float(laid_out(ms.Tensor(tokens)).asnumpy()) - float(plain(ms.Tensor(tokens)).asnumpy())) < 1e-5


def test_pipeline_stages_and_recompute_follow_parallel_config():
    """The constructor places nothing, even given a parallel_config; place_layers puts the layers on their stages
    with recompute, as MindFormers' LayerSetting says."""
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig, TransformerRecomputeConfig
    pc = TransformerOpParallelConfig(data_parallel=1, model_parallel=1, pipeline_stage=2, micro_batch_num=2,
                                     recompute=TransformerRecomputeConfig(recompute=True))
    config = DeepseekV2Config(hidden_size=32, num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=16, intermediate_size=64, kv_lora_rank=16, q_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=4,
                              first_k_dense_replace=1, n_shared_experts=1, vocab_size=64, seq_length=8,
                              parallel_config=pc)
    net = DeepseekV2ForCausalLM(config)
    assert not any(getattr(layer, "_has_config_recompute", False) for layer in net.model.layers)
    assert place_layers(net, pc) == [0, 0, 1, 1]
    assert net.model.tok_embeddings.pipeline_stage == 0
    assert net.model.norm_out.pipeline_stage == 1 and net.lm_head.pipeline_stage == 1
    assert all(layer._has_config_recompute for layer in net.model.layers)


def test_training_builds_the_semi_auto_network_with_token_groups_and_layout():
    """The Ascend training path of run_mindformer.py, as far as a CPU goes: the network is built through MindFormers'
    registry with the data-parallel token groups and laid out before the Trainer would compile it."""
    from mindformers.tools.register import MindFormerConfig
    from research.deepseek2 import register
    from research.deepseek2.run.training import build_semi_auto_network, is_semi_auto
    register()
    config = MindFormerConfig(os.path.join(ROOT, "configs", "deepseek2", "finetune_deepseek2_tiny.yaml"))
    assert not is_semi_auto(config)                                      # the CPU YAML: data parallel only
    config.use_parallel = True
    config.parallel.parallel_mode = 2
    config.parallel_config.data_parallel = 2
    config.parallel_config.expert_parallel = 2
    config.model.model_config.moe_dispatch = "capacity"
    assert is_semi_auto(config)
    net = build_semi_auto_network(config)
    experts = [c for n, c in net.cells_and_names() if n.endswith("feed_forward.routed_experts")]
    assert experts and all(c.groups == 2 and c.bmm_up.in_strategy == ((2, 1, 1), (2, 1, 1)) for c in experts)
    assert "local" not in config.model.arch                              # the YAML is left as it was
