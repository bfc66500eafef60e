"""Tests of the memory planner (research/deepseek2/planning/) against hand-computed numbers and the released model
sizes."""
import copy
import os
import subprocess
import sys

import pytest
import yaml

from research.deepseek2.planning.memory import GIB, count_parameters, plan, smallest_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "research", "deepseek2")

# released config.json values (DeepSeek-V2 236B and DeepSeek-V2-Lite), the fields the counts need
V2_236B = dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
               num_hidden_layers=60, num_attention_heads=128, n_shared_experts=2, n_routed_experts=160,
               kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
               num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1, tie_word_embeddings=False,
               topk_method="group_limited_greedy", n_group=8, topk_group=3)
V2_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
               num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
               kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
               num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1, tie_word_embeddings=False,
               topk_method="greedy")

# A small model whose numbers are worked out by hand below.
TINY = dict(vocab_size=100, hidden_size=8, intermediate_size=16, moe_intermediate_size=4, num_hidden_layers=2,
            num_attention_heads=2, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
            kv_lora_rank=4, q_lora_rank=6, qk_rope_head_dim=2, qk_nope_head_dim=2, v_head_dim=2,
            first_k_dense_replace=1, moe_layer_freq=1, tie_word_embeddings=False,
            seq_length=4, batch_size=1, compute_dtype="float32", param_init_type="float32",
            softmax_compute_type="float32", capacity_factor=0.0)
# By hand (h=8, a=2, dn=dr=dv=2, r=4, rq=6, f=16, fm=4, E=4, ns=1, k=2, V=100):
#   MLA per layer: q_a 8*6=48, q_a_norm 6, q_b 6*2*4=48, kv_a 8*6=48, kv_a_norm 4, kv_b 4*2*4=32, o 2*2*8=32 -> 218
#   norms 2*8=16; layer 0 dense FFN 3*8*16=384; layer 1 MoE: routed 4*3*8*4=384, shared 3*8*4=96, gate 4*8=32
#   embedding 800, lm_head 800, final norm 8 -> total 800+800+8 + (218+16+384) + (218+16+512) = 2972
#   activated = 2972 - embedding 800 - unchosen experts (4-2)*96 = 1980
TINY_TOTAL, TINY_ACTIVATED = 2972, 1980


def _config(model_config, parallel_config, **top):
    config = {"run_mode": "train", "model": {"model_config": dict(model_config, type="DeepseekV2Config")},
              "parallel_config": parallel_config, "runner_config": {"batch_size": 1},
              "parallel": {"enable_parallel_optimizer": False}, "optimizer": {"type": "AdamW"},
              "recompute_config": {"recompute": False}}
    config.update(top)
    return config


def test_tiny_counts_by_hand():
    counts = count_parameters(TINY)
    assert counts["attention"] == 2 * 218
    assert counts["norms"] == 2 * 16
    assert counts["dense_ffn"] == 384
    assert counts["routed_experts"] == 384 and counts["shared_experts"] == 96 and counts["gate"] == 32
    assert counts["embedding"] == counts["lm_head"] == 800 and counts["final_norm"] == 8
    assert counts["num_dense_layers"] == 1 and counts["num_moe_layers"] == 1
    assert counts["total"] == TINY_TOTAL
    assert counts["activated"] == TINY_ACTIVATED


def test_full_rank_query_and_tied_embeddings_by_hand():
    model = dict(TINY, q_lora_rank=None, tie_word_embeddings=True)
    counts = count_parameters(model)
    # q_proj 8 * 2*(2+2) = 64 replaces q_a 48 + q_a_norm 6 + q_b 48 = 102 per layer; no lm_head
    assert counts["attention_per_layer"] == 218 - 102 + 64
    assert counts["lm_head"] == 0
    assert counts["total"] == TINY_TOTAL - 2 * (102 - 64) - 800


def test_released_deepseek_v2_236b_counts():
    counts = count_parameters(V2_236B)
    assert abs(counts["total"] - 235.7e9) < 0.05e9          # "236B", the release holds ~235.7B
    assert 20.5e9 <= counts["activated"] < 21.5e9           # "21B activated"
    assert counts["num_moe_layers"] == 59 and counts["num_dense_layers"] == 1


def test_released_deepseek_v2_lite_counts():
    counts = count_parameters(V2_LITE)
    assert abs(counts["total"] - 15.7e9) < 0.05e9           # "15.7B"
    assert abs(counts["activated"] - 2.4e9) < 0.1e9         # "2.4B activated"


@pytest.mark.parametrize("model", [TINY, V2_LITE, V2_236B], ids=["tiny", "lite", "236b"])
def test_counts_match_the_weight_table(model):
    """The analytic total equals the sum over every tensor the weight map expects for the same config."""
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    from research.deepseek2.checkpoints.weight_map import expected_hf_shapes
    keep = {k: v for k, v in model.items() if k not in ("compute_dtype", "param_init_type", "softmax_compute_type")}
    config = DeepseekV2Config(**keep, num_key_value_heads=model["num_attention_heads"])
    total = 0
    for shape in expected_hf_shapes(config).values():
        size = 1
        for dim in shape:
            size *= dim
        total += size
    assert total == count_parameters(model)["total"]


def _flash(config, on):
    """A copy of a config with model_config.use_flash_attention set."""
    config = copy.deepcopy(config)
    config["model"]["model_config"]["use_flash_attention"] = on
    return config


def test_train_plan_by_hand():
    """dp 2 x mp 2 x pp 1, ep 2, fp32 weights: per-card parameters, states and activations worked out by hand."""
    config = _config(TINY, {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 1, "expert_parallel": 2})
    result = plan(config, card_memory_gb=1.0, overhead_gb=0.0)
    # whole per layer: norms 16 + q_a 48 + q_a_norm 6 + kv_a 48 + kv_a_norm 4 = 122 (+ gate 32 on the MoE layer)
    # split by mp:     q_b 48 + kv_b 32 + o 32 = 112, + dense FFN 384 (layer 0) / shared expert 96 (layer 1)
    # experts / (ep*mp): 384 / 4 = 96;  vocab_emb_dp (default True): embedding, lm_head, final norm whole
    # card: 800 + 800 + 8 + (122 + 496/2) + (154 + 208/2 + 96) = 2332
    assert result["params_per_card"] == 2332
    assert result["bytes"]["weights"] == 2332 * 4
    assert result["bytes"]["gradients"] == 2332 * 4
    assert result["bytes"]["optimizer"] == 2332 * 8               # two fp32 moments, fp32 weights: no master copy
    # activations, no recompute, s=4, b=1, c=4, t=2:
    #   attention: s*b*c*(2h + 2rq + a(dn+dr)/t + (r+dr) + r + a(dn+dv)/t + 2a(dn+dr)/t + a*dv/t)
    #              = 16*(16+12+4+6+4+4+8+2) = 896 per layer (no scores kept: the backward recomputes them)
    #   layer 0 dense FFN: 16*(16 + 3*16/2) = 640                                          -> 1536
    #   layer 1 MoE: 16*(16 + 3*1*4/2) = 352, router 8*s*b*E = 128, rows k*s*b = 8: 8*4*(16 + 3*4/2) = 704
    #                                                                                      -> 896 + 1184 = 2080
    #   the attention backward once: b*(a/t)*s^2*(2*4 + 4) = 16*12 = 192
    #   logits s*b*V*(4+4+4) = 4800 (vocab_emb_dp: not split)
    assert result["bytes"]["activations"] == 1536 + 2080 + 192 + 4800
    assert result["total_bytes"] == 2332 * 16 + 1536 + 2080 + 192 + 4800
    assert result["fits"] and result["mode"] == "train" and result["problems"] == []

    recompute = plan(dict(config, recompute_config={"recompute": True}), overhead_gb=0.0)
    # layer inputs in_flight 1 x 2 layers x s*b*h*c = 256, + the largest layer 2080, + the backward once 192, logits
    assert recompute["bytes"]["activations"] == 256 + 2080 + 192 + 4800


def test_capacity_dispatch_rows_by_hand():
    """moe_dispatch: capacity keeps E buffers of C rows instead of the k*s*b dispatched rows."""
    parallel = {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 1, "expert_parallel": 2}
    dropless = plan(_config(TINY, parallel), overhead_gb=0.0)["bytes"]["activations"]
    per_row = 4 * (16 + 3 * 4 / 2)                     # c (2h + 3 fm / t) = 88 bytes per dispatched row
    # factor 1.5: C = min(s*b = 4, ceil(1.5 * 2 * 4 / 4) = 3) = 3, rows E*C = 12 instead of k*s*b = 8
    capacity = plan(_config(dict(TINY, moe_dispatch="capacity", expert_capacity_factor=1.5), parallel),
                    overhead_gb=0.0)["bytes"]["activations"]
    assert capacity - dropless == (12 - 8) * per_row
    # factor 0: C = s*b = 4, rows 16
    every = plan(_config(dict(TINY, moe_dispatch="capacity"), parallel), overhead_gb=0.0)["bytes"]["activations"]
    assert every - dropless == (16 - 8) * per_row


def test_parallel_optimizer_swap_and_bf16_master_copy():
    parallel = {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 1, "expert_parallel": 2}
    sharded = plan(_config(TINY, parallel, parallel={"enable_parallel_optimizer": True}), overhead_gb=0.0)
    # copies: whole weights dp*mp = 4 -> (1608 + 122 + 154) / 4 = 471; mp-split dp = 2 -> (248 + 104) / 2 = 176;
    # experts dp/ep = 1 -> 96.   8 bytes each: 8 * 743 = 5944
    assert sharded["bytes"]["optimizer"] == 5944
    swapped = plan(_config(TINY, parallel, optimizer={"type": "AdamW", "swap": True}), overhead_gb=0.0)
    assert swapped["bytes"]["optimizer"] == 0
    assert swapped["host_optimizer_bytes_per_node"] == 2332 * 8 * 4          # 4 cards in the job
    bf16 = plan(_config(dict(TINY, param_init_type="bfloat16"), parallel), overhead_gb=0.0)
    assert bf16["bytes"]["weights"] == 2332 * 2 and bf16["bytes"]["gradients"] == 2332 * 2
    assert bf16["bytes"]["optimizer"] == 2332 * (8 + 4)                     # moments + fp32 master copy


def test_pipeline_stages_by_hand():
    """pp 2: stage 0 = embedding + layer 0, stage 1 = layer 1 + final norm + lm_head; 1F1B in-flight micro-batches."""
    config = _config(TINY, {"data_parallel": 2, "model_parallel": 1, "pipeline_stage": 2, "expert_parallel": 2,
                            "micro_batch_num": 4}, recompute_config={"recompute": True})
    result = plan(config, overhead_gb=0.0)
    stage0, stage1 = result["stages"]
    assert stage0["params_per_card"] == 800 + 618
    assert stage1["params_per_card"] == 154 + 208 + 384 / 2 + 8 + 800
    # stage 0 keeps 2 micro-batches of layer inputs (1F1B), stage 1 one; t = 1 now
    # plus, once per stage, the attention backward's b (a/t) s^2 (2 x 4 + c) = 2 x 16 x 12 = 384
    layer0 = 16 * (16 + 12 + 8 + 6 + 4 + 8 + 16 + 4) + 16 * (16 + 48)                    # 1184 + 1024
    assert stage0["activations"] == 2 * 1 * 128 + layer0 + 384
    layer1 = 1184 + 16 * (16 + 12) + 128 + 8 * 4 * (16 + 12)
    assert stage1["activations"] == 1 * 1 * 128 + layer1 + 384 + 4800
    assert result["busiest_stage"] == max(range(2), key=lambda i: result["stages"][i]["total"])


def test_predict_plan_by_hand():
    model = dict(TINY, use_past=True, param_init_type="bfloat16", compute_dtype="bfloat16")
    config = _config(model, {"data_parallel": 1, "model_parallel": 2}, run_mode="predict")
    result = plan(config, overhead_gb=0.0)
    assert result["mode"] == "predict"
    assert result["params_per_card"] == 800 + 800 + 8 + (122 + 496 / 2) + (154 + 208 / 2 + 384 / 2)
    assert result["bytes"]["weights"] == result["params_per_card"] * 2
    assert result["bytes"]["gradients"] == 0 and result["bytes"]["optimizer"] == 0
    # latent cache: batch 1 x 2 layers x seq 4 x (r 4 + dr 2) x 2 bytes
    assert result["bytes"]["kv_cache"] == 1 * 2 * 4 * 6 * 2
    assert result["bytes"]["workspace"] > 1 * 4 * 100 * 4                     # includes fp32 logits


def test_236b_yaml_plans(tmp_path):
    with open(os.path.join(PKG, "finetune_deepseek2_236B.yaml"), encoding="utf-8") as handle:
        train = yaml.safe_load(handle)
    result = plan(train, card_memory_gb=64)
    assert result["shape"]["device_num"] == 64 and result["fits"] and result["problems"] == []
    assert 40 * GIB < result["total_bytes"] < 60 * GIB
    # use_flash_attention (on in the YAML): dp 5 x mp 4 x pp 2 fits (61.8 GB); without it the basic-op backward
    # holds one query chunk's (s, s)-wide buffers once: 40 cards still hold it in chunks of 1024 query rows (1.25
    # GiB), without attention chunks (5 GiB) the smallest cluster is the YAML's 64 cards
    assert smallest_cluster(train)["device_num"] == 40
    unfused = _flash(train, False)
    assert smallest_cluster(unfused)["device_num"] == 40
    unfused["model"]["model_config"]["attention_chunk_size"] = 0
    assert smallest_cluster(unfused)["device_num"] == 64
    whole = plan(unfused)["bytes"]["activations"]
    unfused["model"]["model_config"]["attention_chunk_size"] = 1024
    chunked = plan(unfused)["bytes"]["activations"]
    assert chunked < whole
    # without the optimizer offload the same 64 cards do not hold it
    no_swap = copy.deepcopy(train)
    no_swap["optimizer"]["swap"] = False
    assert not plan(no_swap)["fits"]
    assert smallest_cluster(no_swap)["device_num"] > 64

    with open(os.path.join(PKG, "run_predict_deepseek2_236B.yaml"), encoding="utf-8") as handle:
        predict = yaml.safe_load(handle)
    result = plan(predict, card_memory_gb=64)
    assert result["mode"] == "predict" and result["shape"]["device_num"] == 16 and result["fits"]
    # bf16 weights: about 235.7B * 2 bytes / 16 plus the whole embedding/lm_head and latent projections
    assert 28 * GIB < result["bytes"]["weights"] < 33 * GIB
    assert smallest_cluster(predict)["device_num"] == 16


def test_cli_prints_the_table():
    script = os.path.join(PKG, "planning", "memory.py")
    out = subprocess.run([sys.executable, script, "--config", os.path.join(PKG, "finetune_deepseek2_236B.yaml")],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    for text in ("235.74B parameters", "dp 8 x mp 4 x pp 2 = 64 cards", "weights", "gradients",
                 "optimizer states", "activations", "of 64 GB per card: fits", "smallest cluster that fits: 40",
                 "use_flash_attention True:  attention 0.07 GB per layer and micro-batch + 0.00 GB once, "
                 "activations 3.71 GB, total 46.03 GB per card",
                 "use_flash_attention False: attention 0.00 GB per layer and micro-batch + 1.25 GB once, "
                 "activations 4.89 GB, total 47.21 GB per card"):
        assert text in out.stdout, text
    small = subprocess.run([sys.executable, script, "--config", os.path.join(PKG, "run_predict_deepseek2_236B.yaml"),
                            "--card_memory_gb", "16"], capture_output=True, text=True, check=False, timeout=60)
    assert small.returncode == 1 and "does NOT fit" in small.stdout and "latent KV cache" in small.stdout
    assert "use_flash_attention" not in small.stdout                     # the switch is off there: no comparison


def test_plain_python_modules_import_no_mindspore():
    """The memory plan and parallel_check run on a login node: a fresh interpreter importing them loads no MindSpore."""
    code = ("import sys; import research.deepseek2.planning.memory, research.deepseek2.planning.parallel_check; "
            "print('mindspore' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr


def test_cli_runs_from_the_package_directory():
    """``cd research/deepseek2 && python planning/memory.py --config X.yaml`` (absolute imports, no sys.path hack)."""
    out = subprocess.run([sys.executable, "planning/memory.py", "--config", "run_predict_deepseek2_236B.yaml"], cwd=PKG,
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0 and "latent KV cache" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------- LoRA (pet_config)
LORA = {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "lora_dropout": 0.0}
# By hand for TINY, rank R = 2 (adapter parameters R (in + out) per targeted weight, default targets):
#   MLA per layer: q_a (6, 8) 14R, q_b (8, 6) 14R, kv_a (6, 8) 14R, kv_b (8, 4) 12R, o (8, 4) 12R -> 66R
#   layer 0 dense FFN: w1, w3 (16, 8) 24R each, w2 (8, 16) 24R -> 72R;  layer 1 shared expert (width 4): 3 x 12R = 36R
#   total 66R + 72R + 66R + 36R = 240R = 480; routed experts: E R (in + out) = 4 * 2 * 12 = 96 x 3 = 288 more
# Per card, dp 2 x mp 2, ep 2 (A keeps a cut of the weight's input columns, B of its output rows, both the expert cut):
#   q_a 14R, q_b A (R, 6) 6R + B (8, R)/2 4R = 10R, kv_a 14R, kv_b 4R + 4R = 8R, o A (R, 4)/2 2R + B 8R = 10R -> 56R
#   dense w1, w3: A 8R + B 16R/2 = 16R each, w2: A 16R/2 + B 8R = 16R -> 48R;  shared: 3 x (8R + 4R/2) = 30R
#   -> 56R + 48R + 56R + 30R = 190R = 380;  routed: w1, w3 A (4, R, 8)/ep 16R + B (4, 4, R)/(ep mp) 4R = 20R each,
#   w2 A (4, R, 4)/(ep mp) 4R + B (4, 8, R)/ep 16R = 20R -> 60R = 120 more
TINY_ADAPTERS, TINY_ADAPTERS_ROUTED, TINY_CARD_ADAPTERS = 480, 480 + 288, 380


def test_lora_counts_by_hand():
    from research.deepseek2.planning.counts import count_adapters
    assert count_adapters(TINY, LORA) == TINY_ADAPTERS
    assert count_adapters(TINY, dict(LORA, target_routed_experts=True)) == TINY_ADAPTERS_ROUTED
    assert count_adapters(TINY, dict(LORA, target_modules="kv_b_proj")) == 2 * 12 * 2      # HF names work too
    assert count_adapters(TINY, dict(LORA, lora_rank=4)) == 2 * TINY_ADAPTERS


def test_lora_train_plan_by_hand():
    """The base frozen (weights only), adapters with gradients and AdamW states, LoRA's own activations."""
    parallel = {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 1, "expert_parallel": 2}
    result = plan(_config(dict(TINY, pet_config=LORA), parallel), overhead_gb=0.0)
    b = result["bytes"]
    assert result["params_per_card"] == 2332                      # the base, as in test_train_plan_by_hand
    assert result["stages"][0]["adapter_params_per_card"] == TINY_CARD_ADAPTERS
    assert b["weights"] == 2332 * 4                               # frozen: no gradients, no optimizer states
    assert b["adapters"] == b["gradients"] == TINY_CARD_ADAPTERS * 4
    assert b["optimizer"] == TINY_CARD_ADAPTERS * 8               # fp32 adapters: two moments, no master copy
    # activations: the full finetune's 1536 + 2080 + 192 + 4800, plus every Linear adapter's s b R c = 4*1*2*4 = 32
    # bytes, 8 targeted Linear cells per layer
    assert b["activations"] == 1536 + 2080 + 192 + 4800 + 2 * 8 * 32
    assert result["total_bytes"] == 2332 * 4 + TINY_CARD_ADAPTERS * 16 + 1536 + 2080 + 192 + 4800 + 512
    assert result["lora"]["adapter_params"] == TINY_ADAPTERS and result["lora"]["rank"] == 2
    assert result["lora"]["share"] == TINY_ADAPTERS / (TINY_ADAPTERS + TINY_TOTAL)

    full = plan(_config(TINY, parallel), overhead_gb=0.0)
    assert result["total_bytes"] < full["total_bytes"]


def test_lora_options_by_hand():
    parallel = {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 1, "expert_parallel": 2}
    base = plan(_config(dict(TINY, pet_config=LORA), parallel), overhead_gb=0.0)["bytes"]
    # dropout keeps each Linear adapter's dropped input and mask: s b in' (c + 1) = 20 in' bytes, in' the input
    # columns a card holds: layer 0: 8 + 6 + 8 + 4 + 4/2 + 8 + 8 + 16/2 = 52, layer 1: 28 + 8 + 8 + 4/2 = 46
    dropout = plan(_config(dict(TINY, pet_config=dict(LORA, lora_dropout=0.1)), parallel), overhead_gb=0.0)["bytes"]
    assert dropout["activations"] - base["activations"] == 20 * (52 + 46)
    # routed experts: 120 more adapter parameters per card; the layer's effective expert weights, 3 x 4*4*8/(ep mp)
    # = 96 elements x 4 bytes, kept for the backward
    routed = plan(_config(dict(TINY, pet_config=dict(LORA, target_routed_experts=True)), parallel), overhead_gb=0.0)
    assert routed["stages"][0]["adapter_params_per_card"] == TINY_CARD_ADAPTERS + 120
    assert routed["bytes"]["activations"] - base["activations"] == 96 * 4
    # bf16 adapters: 2 bytes each, gradients too, and an fp32 master copy beside the moments (12 bytes)
    bf16 = plan(_config(dict(TINY, pet_config=dict(LORA, param_init_type="bfloat16")), parallel), overhead_gb=0.0)
    assert bf16["bytes"]["adapters"] == bf16["bytes"]["gradients"] == TINY_CARD_ADAPTERS * 2
    assert bf16["bytes"]["optimizer"] == TINY_CARD_ADAPTERS * 12
    # parallel optimizer: every adapter's states over its copies, size / (dp x mp) = 480 / 4 per card
    sharded = plan(_config(dict(TINY, pet_config=LORA), parallel, parallel={"enable_parallel_optimizer": True}),
                   overhead_gb=0.0)
    assert sharded["bytes"]["optimizer"] == TINY_ADAPTERS / 4 * 8
    # prediction runs merged weights: pet_config changes nothing
    model = dict(TINY, use_past=True, param_init_type="bfloat16", compute_dtype="bfloat16")
    config = _config(model, {"data_parallel": 1, "model_parallel": 2}, run_mode="predict")
    with_pet = copy.deepcopy(config)
    with_pet["model"]["model_config"]["pet_config"] = LORA
    assert plan(with_pet)["total_bytes"] == plan(config)["total_bytes"] and plan(with_pet)["lora"] is None


@pytest.mark.parametrize("change, field", [({"lora_rank": 0}, "lora_rank"), ({"pet_type": "ptuning2"}, "pet_type"),
                                           ({"target_modules": "nothing_here"}, "target_modules")])
def test_lora_bad_pet_config_names_the_field(change, field):
    from research.deepseek2.errors import PetConfigError
    config = _config(dict(TINY, pet_config=dict(LORA, **change)), {"data_parallel": 1})
    with pytest.raises(PetConfigError, match=f"^pet_config.{field} = "):
        plan(config)


# ---------------------------------------------------------------------------------------------- the recipes
RECIPES = {"deepseek2_lite/finetune_deepseek2_lite.yaml": 8, "deepseek2_lite/finetune_deepseek2_lite_lora.yaml": 8,
           "deepseek2_lite/predict_deepseek2_lite.yaml": 1, "finetune_deepseek2_236B_lora.yaml": 16,
           "deepseek2_lite/predict_deepseek2_lite_w8a16.yaml": 1, "predict_deepseek2_236B_w8a16.yaml": 8,
           "predict_deepseek2_236B_w4a16.yaml": 4}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_pass_parallel_check_and_fit(name):
    from research.deepseek2.planning.parallel_check import load_yaml_checks
    path = os.path.join(PKG, name)
    assert load_yaml_checks(path) == [] and load_yaml_checks(path, device_num=RECIPES[name]) == []
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    result = plan(config, card_memory_gb=64)
    assert result["shape"]["device_num"] == RECIPES[name] and result["fits"] and result["problems"] == []
    assert config["load_ckpt_format"] == "safetensors" and config["load_checkpoint"].startswith("/path/to/")
    mc = config["model"]["model_config"]
    lite = dict(V2_LITE, num_key_value_heads=16) if "lite" in name else None
    for key, value in (lite or {}).items():
        assert mc[key] == value, f"{name}: model_config.{key}"
    if "lite" in name:
        assert mc["rope_scaling"] == {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
        assert (mc["routed_scaling_factor"], mc["n_group"], mc["topk_group"]) == (1.0, 1, 1)
    assert ("pet_config" in mc) == ("lora" in name) and (result["lora"] is not None) == ("lora" in name)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_build_the_model_config(name):
    """MindFormers parses the file and DeepseekV2Config accepts its model_config, pet_config included."""
    from mindformers.tools.register import MindFormerConfig
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    from research.deepseek2.lora.cells import validate_pet_config
    parsed = MindFormerConfig(os.path.join(PKG, name))
    fields = {k: v for k, v in parsed.model.model_config.items() if k != "type"}
    config = DeepseekV2Config(**fields)
    assert config.cache_width == 512 + 64 and config.num_hidden_layers in (27, 60)
    if "lora" in name:
        settings = validate_pet_config(config.pet_config)
        assert (settings.lora_rank, settings.lora_alpha, settings.target_routed_experts) == (8, 16, False)


def test_lora_needs_fewer_cards_than_the_full_finetune():
    """236B: LoRA on 8 cards (the planner's smallest, 63.6 of 64 GB; the YAML keeps 16 for its 58 GB device limit);
    the same YAML without pet_config needs 80, the full-finetune recipe 40 with its AdamW
    states offloaded to host memory and the fused attention (64 without it). V2-Lite LoRA fits one card; its full
    finetune needs the 8 of a node."""
    from research.deepseek2.planning.memory import full_finetune
    recipes = {}
    for name in ("finetune_deepseek2_236B_lora.yaml", "finetune_deepseek2_236B.yaml",
                 "deepseek2_lite/finetune_deepseek2_lite_lora.yaml", "deepseek2_lite/finetune_deepseek2_lite.yaml"):
        with open(os.path.join(PKG, name), encoding="utf-8") as handle:
            recipes[name] = yaml.safe_load(handle)
    lora = recipes["finetune_deepseek2_236B_lora.yaml"]
    assert smallest_cluster(lora)["device_num"] == 8
    full = full_finetune(lora)
    assert not full["fits"] and full["device_num"] == 16 and full["smallest_cluster"]["device_num"] == 80
    assert smallest_cluster(recipes["finetune_deepseek2_236B.yaml"])["device_num"] == 40
    assert smallest_cluster(recipes["deepseek2_lite/finetune_deepseek2_lite_lora.yaml"])["device_num"] == 1
    assert smallest_cluster(recipes["deepseek2_lite/finetune_deepseek2_lite.yaml"])["device_num"] == 8
    assert full_finetune(recipes["deepseek2_lite/finetune_deepseek2_lite.yaml"]) is None


def test_cli_prints_lora_against_full_finetune():
    script = os.path.join(PKG, "planning", "memory.py")
    out = subprocess.run([sys.executable, script, "--config", os.path.join(PKG, "finetune_deepseek2_236B_lora.yaml")],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    for text in ("LoRA: rank 8, alpha 16", "56.78M adapter parameters", "weights (frozen)", "LoRA adapters",
                 "dp 2 x mp 4 x pp 2 = 16 cards", "smallest cluster that fits: 8 cards",
                 "full finetune of the same YAML (no pet_config)", "smallest cluster: 80 cards"):
        assert text in out.stdout, text


# ---------------------------------------------------------------------------------------------- use_flash_attention
def test_flash_attention_236b_by_hand():
    """finetune_deepseek2_236B.yaml (use_flash_attention: True): b 1, 128 heads / mp 4 = 32 per card, s 4096, softmax
    fp32 (f 4), bf16 compute (c 2), dq 128 + 64 = 192, dv 128. Per micro-batch and card:
      fused, kept per layer  64 b (a/t) s = 64 x 32 x 4096              =     8,388,608 B (softmax max and sum)
                           + c b (a/t) s (2 dq - dv) = 2 x 32 x 4096 x 256 =   67,108,864 B (padded v and output)
      unfused, kept per layer nothing beyond q, k, v and the context (the backward recomputes the probabilities);
               once per stage, the backward of the last query chunk of attention_chunk_size 1024 (rows [3072, 4096)
               against keys [0, 4096)): b (a/t) 1024 x 4096 (2 f + c) = 32 x 1024 x 4096 x 10 = 1,342,177,280 B
               (1.25 GiB; the whole (s, s), 32 x 4096^2 x 10 = 5 GiB, with attention_chunk_size 0)."""
    with open(os.path.join(PKG, "finetune_deepseek2_236B.yaml"), encoding="utf-8") as handle:
        train = yaml.safe_load(handle)
    assert train["model"]["model_config"]["use_flash_attention"] is True
    fused, unfused = plan(train), plan(_flash(train, False))
    assert fused["settings"]["use_flash_attention"] and not unfused["settings"]["use_flash_attention"]
    assert unfused["flash_attention"] is None                            # the switch off: no comparison
    summary = fused["flash_attention"]
    kept, once = 8388608 + 67108864, 1342177280
    assert (summary["fused"]["attention_per_layer"], summary["fused"]["attention_once"]) == (kept, 0)
    assert (summary["unfused"]["attention_per_layer"], summary["unfused"]["attention_once"]) == (0, once)
    # recompute (on in the YAML): the fused buffers sit in the one layer re-run at a time, on every stage
    for with_it, without in zip(fused["stages"], unfused["stages"]):
        assert without["activations"] - with_it["activations"] == once - kept
    assert fused["bytes"]["activations"] == summary["fused"]["activations"]
    assert summary["unfused"]["activations"] == unfused["bytes"]["activations"]
    assert summary["unfused"]["total"] == unfused["total_bytes"] == fused["total_bytes"] + once - kept
    assert round(fused["total_bytes"] / GIB, 2) == 46.03 and round(unfused["total_bytes"] / GIB, 2) == 47.21
    # no recompute: every layer of the stage keeps the fused buffers, for each micro-batch in flight (1F1B: 2 on
    # stage 0, 1 on stage 1), where the unfused path holds one chunk's backward once
    no_recompute = dict(train, recompute_config={"recompute": False})
    stages_with, stages_without = plan(no_recompute)["stages"], plan(_flash(no_recompute, False))["stages"]
    assert [b["activations"] - a["activations"] for a, b in zip(stages_with, stages_without)] == \
        [once - 2 * 30 * kept, once - 1 * 30 * kept]


def test_flash_attention_small_config_by_hand():
    """TINY with bf16 compute (c 2), fp32 softmax (f 4), dp 2 x mp 2: b 1, a/t = 1, s 4, dq 2 + 2 = 4, dv 2.
    Kept per layer for the backward: unfused nothing beyond q, k, v and the context (mla.SoftmaxAttention recomputes
    its probabilities), fused 64 b (a/t) s = 256 + c b (a/t) s (2 dq - dv) = 48, 304 B. Once per stage, unfused: the
    backward's recomputed probabilities, their gradient (fp32) and the scores' gradient (bf16), b (a/t) s^2 (2 f + c)
    = 16 x 10 = 160 B. In a forward (prediction) unfused b (a/t) s^2 (f + c) = 16 x 6 = 96 B."""
    model = dict(TINY, compute_dtype="bfloat16")
    parallel = {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 1, "expert_parallel": 2}
    config = _config(model, parallel)
    # unfused, by hand (c 2): attention s b c (2h + 2rq + a(dn+dr)/t + (r+dr) + r + a(dn+dv)/t + 2a(dn+dr)/t + a dv/t)
    #   = 8 x 56 = 448; layer 0 dense FFN 8 x (16 + 24) = 320; layer 1 MoE 8 x (16 + 6) = 176, router
    #   8 s b E = 128, rows k s b = 8: 8 x 2 x (16 + 6) = 352 -> 656; logits s b V (c + 4 + 4) = 4 x 100 x 10 = 4000
    unfused = plan(config, overhead_gb=0.0)
    assert unfused["bytes"]["activations"] == (448 + 320) + (448 + 656) + 4000 + 160
    fused = plan(_flash(config, True), overhead_gb=0.0)
    assert fused["bytes"]["activations"] == (752 + 320) + (752 + 656) + 4000
    summary = fused["flash_attention"]
    assert [(summary[side]["attention_per_layer"], summary[side]["attention_once"]) for side in ("fused", "unfused")] \
        == [(304, 0), (0, 160)]
    assert (summary["fused"]["total"], summary["unfused"]["total"]) == (fused["total_bytes"], unfused["total_bytes"])
    assert fused["total_bytes"] - unfused["total_bytes"] == 2 * 304 - 160
    # recompute: the largest layer (layer 1) re-run keeps the fused buffers; the unfused backward's chunk once
    recompute = dict(config, recompute_config={"recompute": True})
    assert plan(_flash(recompute, True))["bytes"]["activations"] - plan(recompute)["bytes"]["activations"] == \
        304 - 160
    # prediction: the prefill workspace of one layer (b / dp = 1 row per card, t = mp 2)
    predict = _config(dict(model, use_past=True, param_init_type="bfloat16"),
                      {"data_parallel": 1, "model_parallel": 2}, run_mode="predict")
    on, off = plan(_flash(predict, True), overhead_gb=0.0), plan(predict, overhead_gb=0.0)
    assert on["bytes"]["workspace"] - off["bytes"]["workspace"] == 304 - 96
    assert on["flash_attention"]["unfused"] == {"attention_per_layer": 96, "attention_once": 0.0,
                                                "workspace": off["bytes"]["workspace"], "total": off["total_bytes"]}


@pytest.mark.parametrize("value", ["True", 1, None])
def test_flash_attention_must_be_a_bool(value):
    config = _config(dict(TINY, use_flash_attention=value), {"data_parallel": 1})
    with pytest.raises(ValueError, match="^model_config.use_flash_attention = "):
        plan(config)


def test_attention_chunks_and_prefill_chunks_by_hand():
    """The (s, s) term: attention_chunk_size C keeps the causal blocks sum_i C_i stop_i; prefill_chunk_size p with
    use_past plans a prefill call of p tokens against the whole cache: (b, a, p, s) scores, logits of p tokens."""
    from research.deepseek2.planning import memory as pm
    from research.deepseek2.planning.activations import attention_core_bytes
    config = {"model": {"model_config": dict(TINY, seq_length=10, attention_chunk_size=4)}}
    st = pm._settings(config)
    heads = TINY["num_attention_heads"]
    blocks = 4 * 4 + 4 * 8 + 2 * 10                                   # rows [0,4) see 4 keys, [4,8) 8, [8,10) 10
    assert attention_core_bytes(st, 1, 1, False) == heads * blocks * (4 + 4)
    st0 = pm._settings({"model": {"model_config": dict(TINY, seq_length=10, attention_chunk_size=0)}})
    assert attention_core_bytes(st0, 1, 1, False) == heads * 100 * (4 + 4)
    # a prefill chunk of p = 10 tokens against 40 cache slots: blocks of max(1, C // p) of the 2 heads
    assert attention_core_bytes(st0, 1, 1, False, keys=40) == heads * 10 * 40 * (4 + 4)
    assert attention_core_bytes(st, 1, 1, False, keys=40) == 1 * 10 * 40 * (4 + 4)
    predict = {"model": {"model_config": dict(TINY, seq_length=4096, use_past=True)}, "run_mode": "predict"}
    whole = plan(predict)["bytes"]["workspace"]
    predict["model"]["model_config"]["prefill_chunk_size"] = 256
    chunked = plan(predict)["bytes"]["workspace"]
    assert chunked < whole / 4
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        predict["model"]["model_config"]["prefill_chunk_size"] = -1
        plan(predict)


# ---------------------------------------------------------------------------------------------- quantized prediction
# TINY held int8 per channel, by hand (mp 1): the projections q_a 48, q_b 48, kv_a 48, o 32 per layer, the dense FFN
# 384, the routed experts 384 and the shared expert 96 -> 560 + 656 = 1216 int8 bytes; their float32 scales, one per
# output channel: q_a 6, q_b 8, kv_a 6, o 8 per layer, dense 16+16+8, routed 4*(4+4+8), shared 4+4+8 -> 176 scales;
# the rest in param_init_type (bf16): embedding 800, lm_head 800, final norm 8, norms 2*16, q_a / kv_a norms 2*10,
# kv_b 2*32, gate 32 -> 1756 parameters. 1216 + 1756 = TINY_TOTAL.
QUANT_PREDICT = dict(TINY, use_past=True, param_init_type="bfloat16", compute_dtype="bfloat16")


def _quant_plan(quantization_config, **parallel):
    model = dict(QUANT_PREDICT, quantization_config=quantization_config)
    return plan(_config(model, dict({"data_parallel": 1, "model_parallel": 1}, **parallel), run_mode="predict"),
                overhead_gb=0.0)


def test_quantized_predict_weights_by_hand():
    int8 = _quant_plan({"weight_dtype": "int8"})
    assert int8["weights_held"]["by_dtype"] == {"int8": 1216, "float32 scales": 176 * 4, "bfloat16": 1756 * 2}
    assert int8["bytes"]["weights"] == 1216 + 176 * 4 + 1756 * 2
    # int4, one scale per 2 inputs: half the bytes, a scale per 2 weights
    int4 = _quant_plan({"weight_dtype": "int4", "group_size": 2})
    assert int4["weights_held"]["by_dtype"] == {"int4": 608, "float32 scales": 608 * 4, "bfloat16": 1756 * 2}
    # attention left float: its four projections (176 per layer... 2 x 176 = 352 weights, 2 x 28 scales) move back
    skip = _quant_plan({"weight_dtype": "int8", "modules_to_not_convert": ["self_attn"]})
    assert skip["weights_held"]["by_dtype"] == {"int8": 1216 - 352, "float32 scales": (176 - 56) * 4,
                                                "bfloat16": (1756 + 352) * 2}
    assert int8["weights_held"]["by_part"]["routed_experts"] == 384 + 64 * 4
    # the float plan of the same model: every parameter in bf16
    float_plan = plan(_config(QUANT_PREDICT, {"data_parallel": 1, "model_parallel": 1}, run_mode="predict"),
                      overhead_gb=0.0)
    assert float_plan["bytes"]["weights"] == TINY_TOTAL * 2 and float_plan["weights_held"]["quantization"] is None


def test_quantized_training_plans_are_refused_naming_the_key():
    from research.deepseek2.errors import QuantizationError
    model = dict(TINY, quantization_config={"weight_dtype": "int8"})
    with pytest.raises(QuantizationError, match="quantization_config .*predict only"):
        plan(_config(model, {"data_parallel": 1, "model_parallel": 1}))
    with pytest.raises(QuantizationError, match="group_size"):
        _quant_plan({"weight_dtype": "int4", "group_size": 4})          # q_b's 6 inputs do not split into groups of 4


def test_fewest_predict_cards_of_the_recipes():
    """The bf16 236B needs 16 cards, int8 8, int4 4 (mp must divide its 128 heads: 5-7 cards never fit); the
    V2-Lite recipes one card each."""
    from research.deepseek2.planning.memory import fewest_predict_cards
    expected = {"run_predict_deepseek2_236B.yaml": 16, "predict_deepseek2_236B_w8a16.yaml": 8,
                "predict_deepseek2_236B_w4a16.yaml": 4, "deepseek2_lite/predict_deepseek2_lite.yaml": 1,
                "deepseek2_lite/predict_deepseek2_lite_w8a16.yaml": 1}
    for name, cards in expected.items():
        with open(os.path.join(PKG, name), encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
        fewest = fewest_predict_cards(config)
        assert fewest["device_num"] == cards, name
        assert fewest["total_bytes"] <= fewest["limit_gb"] * GIB
        assert config["parallel_config"]["model_parallel"] == cards, f"{name} is laid out on the fewest cards"
    train = copy.deepcopy(config)
    train["run_mode"], train["model"]["model_config"]["use_past"] = "finetune", False
    train["model"]["model_config"].pop("quantization_config")
    assert fewest_predict_cards(train) is None


def test_cli_prints_the_weights_by_dtype_and_refuses_a_quantized_training_yaml(tmp_path):
    path = os.path.join(PKG, "predict_deepseek2_236B_w8a16.yaml")
    out = subprocess.run([sys.executable, "-m", "research.deepseek2.planning.memory", "--config", path],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "int8 projections + float32 scales (one per output channel)" in out.stdout
    assert "per card bfloat16 2.28 GB, int8 27.73 GB, float32 scales 0.20 GB" in out.stdout
    assert ("fewest cards for prediction (data_parallel 1, model_parallel = cards, within 59 GB): 8 card(s)"
            in out.stdout)
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config["run_mode"], config["model"]["model_config"]["use_past"] = "finetune", False
    bad = tmp_path / "train_w8a16.yaml"
    bad.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "research.deepseek2.planning.memory", "--config", str(bad)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "train_w8a16.yaml" in out.stderr and "predict only" in out.stderr
