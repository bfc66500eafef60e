"""The semi-auto parallel plan (Ascend training) as far as a CPU can check it: every weight strategy comes from the
LAYOUT declarations and divides its tensor for the 236B configs; Linear MatMuls get column/row strategies."""
import os

import pytest
import yaml

from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
from research.deepseek2.parallel import (apply_semi_auto, check_weight_strategies, split_dims, weight_strategies)

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
    assert check_weight_strategies(config, dp, mp, ep) == []
    plan = weight_strategies(config, dp, mp, ep)
    assert plan["model.layers.0.attention.l2q_proj.weight"] == (mp, 1)       # heads split
    assert plan["model.layers.0.attention.lkv2kv.weight"] == (mp, 1)
    assert plan["model.layers.0.attention.wo.weight"] == (1, mp)
    assert plan["model.layers.0.attention.kv2l.weight"] == (1, 1)            # latent replicated
    assert plan["model.layers.1.feed_forward.routed_experts.ffn.w1.weight"] == (ep, 1, 1)
    assert plan["model.layers.1.feed_forward.shared_experts.w2.weight"] == (1, mp)
    assert plan["model.tok_embeddings.embedding_weight"] == (1, 1)


def test_indivisible_plan_is_reported_by_name():
    config = DeepseekV2Config(hidden_size=64, num_attention_heads=6, n_routed_experts=6, num_experts_per_tok=2,
                              moe_intermediate_size=16, intermediate_size=96, kv_lora_rank=16, q_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=2,
                              first_k_dense_replace=1, n_shared_experts=1, vocab_size=64, seq_length=8)
    problems = check_weight_strategies(config, dp=1, mp=4, ep=4)
    assert any("num_attention_heads" in p and "l2q_proj" in p for p in problems)
    assert any("routed_experts.ffn.w1" in p for p in problems)


def test_apply_semi_auto_sets_matmul_strategies_from_layout():
    config = DeepseekV2Config(hidden_size=32, num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=16, intermediate_size=64, kv_lora_rank=16, q_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=2,
                              first_k_dense_replace=1, n_shared_experts=1, vocab_size=64, seq_length=8)
    net = DeepseekV2ForCausalLM(config)
    applied = apply_semi_auto(net, dp=2, mp=2)
    assert applied["model.layers.0.attention.l2q_proj.matmul"] == ((2, 1), (2, 1))
    assert applied["model.layers.0.attention.wo.matmul"] == ((2, 2), (1, 2))
    assert applied["model.layers.0.feed_forward.w2.matmul"] == ((2, 2), (1, 2))
    assert applied["model.layers.0.attention.kv2l.matmul"] == ((2, 1), (1, 1))
    assert applied["lm_head.matmul"] == ((2, 1), (1, 1))
    cells = dict(net.cells_and_names())
    assert cells["model.layers.0.attention.l2q_proj"].matmul.in_strategy == ((2, 1), (2, 1))
    # the strategies and the hand-written inference split read the same declarations
    dims = split_dims(net)
    assert dims["model.layers.0.attention.wo.weight"] == 1
    assert dims["model.layers.1.feed_forward.routed_experts.ffn.w1.weight"] == 0


def test_pipeline_stages_and_recompute_follow_parallel_config():
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig, TransformerRecomputeConfig
    pc = TransformerOpParallelConfig(data_parallel=1, model_parallel=1, pipeline_stage=2, micro_batch_num=2,
                                     recompute=TransformerRecomputeConfig(recompute=True))
    config = DeepseekV2Config(hidden_size=32, num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=16, intermediate_size=64, kv_lora_rank=16, q_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=4,
                              first_k_dense_replace=1, n_shared_experts=1, vocab_size=64, seq_length=8,
                              parallel_config=pc)
    net = DeepseekV2ForCausalLM(config)
    assert net.model.pipeline_stages == [0, 0, 1, 1]
    assert net.model.tok_embeddings.pipeline_stage == 0
    assert net.model.norm_out.pipeline_stage == 1 and net.lm_head.pipeline_stage == 1
    assert all(layer._has_config_recompute for layer in net.model.layers)
