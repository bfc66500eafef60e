"""The three DeepSeek-V2 236B YAMLs: MindFormers layout, released model values, and parallel consistency.

Broken copies of the YAMLs must fail research/deepseek2/planning/parallel_check.py with a message naming the field.
"""
import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from research.deepseek2.planning.inventory import model_shape, parameters, parts
from research.deepseek2.planning.parallel_check import (ParallelShape, check_parallel_config, layers_per_stage, load_yaml_checks,
                                               parallel_shape)
from research.deepseek2.planning.memory import count_parameters, plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "research", "deepseek2")
TRAIN_YAMLS = ("finetune_deepseek2_236B.yaml", "run_train_deepseek2_236B.yaml")
PREDICT_YAML = "run_predict_deepseek2_236B.yaml"
ALL_YAMLS = TRAIN_YAMLS + (PREDICT_YAML,)
CARDS = {"finetune_deepseek2_236B.yaml": 64, "run_train_deepseek2_236B.yaml": 64, PREDICT_YAML: 16}

RELEASED_236B = {
    "vocab_size": 102400, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 2,
    "n_routed_experts": 160, "routed_scaling_factor": 16.0, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "group_limited_greedy",
    "n_group": 8, "topk_group": 3, "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.003, "seq_aux": True,
    "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001,
}


def _load(name):
    with open(os.path.join(PKG, name), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _write(tmp_path, name, config):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------- the YAMLs
@pytest.mark.parametrize("name", ALL_YAMLS)
def test_yaml_is_consistent(name):
    assert load_yaml_checks(os.path.join(PKG, name)) == []
    assert load_yaml_checks(os.path.join(PKG, name), device_num=CARDS[name]) == []
    pc = _load(name)["parallel_config"]
    assert pc["data_parallel"] * pc["model_parallel"] * pc["pipeline_stage"] == CARDS[name]


@pytest.mark.parametrize("name", ALL_YAMLS)
def test_yaml_layout_and_released_values(name):
    config = _load(name)
    mc = config["model"]["model_config"]
    for key, value in RELEASED_236B.items():
        assert mc[key] == value, f"{name}: model_config.{key}"
    assert mc["type"] == "DeepseekV2Config" and config["model"]["arch"]["type"] == "DeepseekV2ForCausalLM"
    assert config["trainer"]["type"] == "CausalLanguageModelingTrainer"
    assert config["processor"]["tokenizer"]["type"] == "DeepseekV2Tokenizer"
    assert config["processor"]["return_tensors"] == "ms" and "tokenizer_file" in config["processor"]["tokenizer"]
    # training: auto parallel, declared key-op strategies propagated; predict: collectives only, the model splits
    # itself (research/deepseek2/planning/layout.py)
    assert config["use_parallel"] is True and config["parallel"]["parallel_mode"] == (0 if name == PREDICT_YAML else 2)
    assert config["context"]["mode"] == 0 and config["context"]["device_target"] == "Ascend"
    assert mc["seq_length"] == 4096 and mc["compute_dtype"] == "bfloat16"
    if name == PREDICT_YAML:
        assert config["run_mode"] == "predict" and mc["use_past"] is True
        assert mc["param_init_type"] == "bfloat16" and mc["checkpoint_name_or_path"]
        assert config["processor"]["tokenizer"]["tokenizer_file"]
    else:
        assert mc["use_past"] is False and mc["param_init_type"] == "float32"
        assert config["load_checkpoint"] == "" and config["train_dataset"]["data_loader"]["dataset_dir"] == ""
        assert config["train_dataset"]["data_loader"]["type"] == "MindDataset"
        assert config["train_dataset"]["input_columns"] == ["input_ids", "labels"]
        assert config["runner_wrapper"]["type"] == "MFTrainOneStepCell"
        assert config["runner_wrapper"]["use_clip_grad"] is True
        assert config["optimizer"]["type"] == "AdamW" and config["lr_schedule"]["type"] == "CosineWithWarmUpLR"
        assert config["recompute_config"]["recompute"] is True
        assert (mc["device_aux_loss_alpha"], mc["comm_aux_loss_alpha"]) == (0.05, 0.02)
        assert config["parallel"]["search_mode"] == "sharding_propagation" and mc["moe_dispatch"] == "capacity"
        assert mc["capacity_factor"] == 1.0 and mc["never_drop_seq_ratio"] == 0.1        # the paper's dropping
        assert {"MFLossMonitor", "CheckpointMonitor"} <= {cb["type"] for cb in config["callbacks"]}


@pytest.mark.parametrize("name", ALL_YAMLS)
def test_yaml_builds_the_model_config(name):
    """MindFormers parses the file, and DeepseekV2Config accepts its model_config (all of its own checks pass)."""
    from mindformers.tools.register import MindFormerConfig
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    parsed = MindFormerConfig(os.path.join(PKG, name))
    assert parsed.parallel_config.model_parallel == _load(name)["parallel_config"]["model_parallel"]
    fields = {k: v for k, v in _load(name)["model"]["model_config"].items() if k != "type"}
    config = DeepseekV2Config(**fields)
    hf = config.to_hf_dict()
    for key, value in RELEASED_236B.items():
        assert hf[key] == value, key
    assert config.moe_num_devices == 8 and config.cache_width == 512 + 64


# ---------------------------------------------------------------------------------------------- broken copies
BROKEN = [
    # (yaml, section, key, value, device_num, text the message must contain)
    (TRAIN_YAMLS[0], "parallel_config", "data_parallel", 4, 64, "data_parallel x model_parallel x pipeline_stage"),
    (TRAIN_YAMLS[0], "parallel_config", "model_parallel", 3, None, "num_attention_heads"),
    (PREDICT_YAML, "parallel_config", "model_parallel", 12, None, "12 cards does not fill whole"),
    (TRAIN_YAMLS[0], "parallel_config", "expert_parallel", 16, None, "expert_parallel = 16 does not divide"),
    (TRAIN_YAMLS[1], "parallel_config", "expert_parallel", 3, None, "n_routed_experts = 160"),
    (TRAIN_YAMLS[1], "parallel_config", "micro_batch_num", 1, None, "micro_batch_num = 1"),
    (TRAIN_YAMLS[1], "parallel_config", "pipeline_stage", 7, None, "num_hidden_layers = 60 is not divisible"),
    (TRAIN_YAMLS[1], "parallel_config", "data_parallel", "8", None, "parallel_config.data_parallel = '8'"),
    (TRAIN_YAMLS[0], "model_config", "vocab_size", 102402, None, "model_config.vocab_size = 102402"),
    (TRAIN_YAMLS[0], "model_config", "moe_intermediate_size", 1538, None, "model_config.moe_intermediate_size"),
    (TRAIN_YAMLS[0], "model_config", "intermediate_size", 12290, None, "model_config.intermediate_size"),
    (TRAIN_YAMLS[0], "model_config", "hidden_size", 5122, None, "model_config.hidden_size"),
    (TRAIN_YAMLS[0], "model_config", "kv_lora_rank", 0, None, "model_config.kv_lora_rank"),
    (TRAIN_YAMLS[0], "model_config", "q_lora_rank", -1, None, "model_config.q_lora_rank"),
    (TRAIN_YAMLS[0], "model_config", "offset", [1, 0], None, "model_config.offset"),
    (PREDICT_YAML, "parallel_config", "model_parallel", 12, 12, "num_attention_heads = 128"),
    (PREDICT_YAML, "parallel_config", "pipeline_stage", 2, None, "pipeline_stage = 2: prediction"),
    (PREDICT_YAML, "parallel_config", "data_parallel", 2, None, "batch_size = 1 is not divisible"),
    (TRAIN_YAMLS[0], "parallel", "parallel_mode", 1, None, "parallel.parallel_mode = 1"),
    (TRAIN_YAMLS[1], "parallel", "search_mode", "recursive_programming", None, "search_mode sharding_propagation"),
    (TRAIN_YAMLS[0], "model_config", "moe_dispatch", "dropless", None, "model_config.moe_dispatch = 'dropless'"),
]


@pytest.mark.parametrize("name, section, key, value, device_num, text", BROKEN,
                         ids=[f"{b[0].split('_')[0]}-{b[2]}={b[3]}" for b in BROKEN])
def test_broken_copy_fails_naming_the_field(tmp_path, name, section, key, value, device_num, text):
    config = copy.deepcopy(_load(name))
    target = config["model"]["model_config"] if section == "model_config" else config[section]
    target[key] = value
    problems = load_yaml_checks(_write(tmp_path, name, config), device_num=device_num)
    assert any(text in problem for problem in problems), problems
    assert all(problem.startswith(name + ": ") for problem in problems)


def test_seq_parallel_needs_divisible_sequence(tmp_path):
    config = copy.deepcopy(_load(TRAIN_YAMLS[0]))
    config["parallel_config"]["use_seq_parallel"] = True
    assert load_yaml_checks(_write(tmp_path, "sp.yaml", config)) == []
    config["model"]["model_config"]["seq_length"] = 4098
    problems = load_yaml_checks(_write(tmp_path, "sp.yaml", config))
    assert any("model_config.seq_length = 4098" in p and "use_seq_parallel" in p for p in problems), problems


def test_vocab_split_only_matters_without_vocab_emb_dp():
    model = {"vocab_size": 102402, "hidden_size": 5120, "num_attention_heads": 128}
    parallel = {"data_parallel": 2, "model_parallel": 4, "vocab_emb_dp": True}
    assert check_parallel_config(model, parallel, 8) == []
    problems = check_parallel_config(model, dict(parallel, vocab_emb_dp=False), 8)
    assert len(problems) == 1 and "vocab_size = 102402" in problems[0] and "vocab_emb_dp = False" in problems[0]


def test_uneven_pipeline_split_with_offset(tmp_path):
    config = copy.deepcopy(_load(TRAIN_YAMLS[0]))
    config["model"]["model_config"]["num_hidden_layers"] = 61
    problems = load_yaml_checks(_write(tmp_path, "odd.yaml", config))
    assert any("num_hidden_layers = 61" in p and "offset" in p for p in problems), problems
    config["model"]["model_config"]["offset"] = [0, 1]                  # stages of 30 and 31 layers
    assert load_yaml_checks(_write(tmp_path, "odd.yaml", config)) == []
    assert layers_per_stage(61, 2, [0, 1]) == [30, 31]
    assert layers_per_stage(61, 2) == [30, 31] and layers_per_stage(60, 4) == [15] * 4


def test_expert_parallel_rule_small_cases():
    model = {"n_routed_experts": 8, "num_attention_heads": 4, "hidden_size": 16, "num_hidden_layers": 2}
    assert check_parallel_config(model, {"data_parallel": 4, "expert_parallel": 4}, 4) == []
    assert check_parallel_config(model, {"data_parallel": 4, "expert_parallel": 2, "model_parallel": 2}, 8) == []
    bad = check_parallel_config(model, {"data_parallel": 2, "expert_parallel": 4, "model_parallel": 2}, 4)
    assert any("expert_parallel = 4 does not divide parallel_config.data_parallel = 2" in p for p in bad), bad
    dense = check_parallel_config({"num_attention_heads": 4}, {"data_parallel": 2, "expert_parallel": 2}, 2)
    assert any("n_routed_experts is not set" in p for p in dense), dense


def test_cli_exit_status(tmp_path):
    script = os.path.join(PKG, "planning", "parallel_check.py")
    ok = subprocess.run([sys.executable, script, "--config", *[os.path.join(PKG, n) for n in ALL_YAMLS]],
                        capture_output=True, text=True, check=False, timeout=60)
    assert ok.returncode == 0 and ok.stdout.count(": OK") == 3, ok.stdout + ok.stderr
    config = copy.deepcopy(_load(PREDICT_YAML))
    config["parallel_config"]["model_parallel"] = 8
    bad = subprocess.run([sys.executable, script, "--config", _write(tmp_path, PREDICT_YAML, config),
                          "--device_num", "16"], capture_output=True, text=True, check=False, timeout=60)
    assert bad.returncode == 1 and "device_num = 16" in bad.stdout, bad.stdout


# ---------------------------------------------------------------------------------------------- by hand
def test_parallel_shape_is_a_frozen_dataclass():
    shape = parallel_shape({"data_parallel": 8, "model_parallel": 4, "expert_parallel": 8, "vocab_emb_dp": False})
    assert shape == ParallelShape(dp=8, mp=4, pp=1, ep=8, micro_batch_num=1, vocab_emb_dp=False,
                                  use_seq_parallel=False, gradient_aggregation_group=4)
    assert (shape.dp, shape.mp, shape.ep, shape.vocab_emb_dp) == (8, 4, 8, False)    # what parallel.py reads
    assert shape.axes() == {"mp": 4, "ep": 8, "vocab": 4}
    assert parallel_shape(None).axes() == {"mp": 1, "ep": 1, "vocab": 1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        shape.dp = 2


def test_236b_finetune_layout_by_hand():
    """finetune_deepseek2_236B.yaml (dp 8, mp 4, pp 2, ep 8, vocab_emb_dp False) against numbers worked out by hand
    from the released shapes, not from the inventory: h 5120, 128 heads, q_lora_rank 1536, kv_lora_rank 512,
    qk_nope 128, qk_rope 64, v_head 128, moe_intermediate 1536, 160 routed + 2 shared experts, vocab 102400,
    60 layers (layer 0 dense with intermediate 12288, layers 1-59 MoE)."""
    config = _load(TRAIN_YAMLS[0])
    axes = parallel_shape(config["parallel_config"]).axes()
    weights = {p.name: p for p in parameters(model_shape(config["model"]["model_config"]))}

    def shape_and_parts(name):
        return weights[name].shape, parts(weights[name], axes)

    # l2q_proj (q_b_proj): 128 heads x (128 + 64) = 24576 rows of q_lora_rank 1536, split by heads over mp 4
    assert shape_and_parts("model.layers.1.attention.l2q_proj.weight") == ((24576, 1536), (4, 1))
    # wo (o_proj): (hidden 5120, 128 heads x v_head 128 = 16384), split on its input (the heads) over mp 4
    assert shape_and_parts("model.layers.1.attention.wo.weight") == ((5120, 16384), (1, 4))
    # kv2l (kv_a_proj_with_mqa): kv_lora_rank 512 + rope 64 = 576 rows, the latent: whole
    assert shape_and_parts("model.layers.1.attention.kv2l.weight") == ((576, 5120), (1, 1))
    # routed experts: (160 experts, 1536, 5120) split (ep 8, mp 4, 1); w2 (160, 5120, 1536) split (8, 1, 4)
    assert shape_and_parts("model.layers.1.feed_forward.routed_experts.w1") == ((160, 1536, 5120), (8, 4, 1))
    assert shape_and_parts("model.layers.1.feed_forward.routed_experts.w2") == ((160, 5120, 1536), (8, 1, 4))
    # embedding (102400, 5120): split by vocabulary over mp 4 (vocab_emb_dp False); whole with vocab_emb_dp True
    assert shape_and_parts("model.tok_embeddings.embedding_weight") == ((102400, 5120), (4, 1))
    whole_vocab = parallel_shape(dict(config["parallel_config"], vocab_emb_dp=True)).axes()
    assert parts(weights["model.tok_embeddings.embedding_weight"], whole_vocab) == (1, 1)

    # Per layer, whole on every card: 2 RMSNorms 2 x 5120 = 10240, q2l 1536 x 5120 = 7864320, lq_norm 1536,
    #   kv2l 576 x 5120 = 2949120, lkv_norm 512                                     -> 10825728
    #   (+ MoE router 160 x 5120 = 819200)                                          -> 11644928
    # split by mp: l2q 24576 x 1536 = 37748736, lkv2kv 128 x (128 + 128) x 512 = 16777216, wo 5120 x 16384 = 83886080
    #   -> 138412032 / 4 = 34603008
    # dense FFN (layer 0): 3 x 12288 x 5120 = 188743680 / 4 = 47185920
    # shared experts: 3 x (2 x 1536) x 5120 = 47185920 / 4 = 11796480
    # routed experts: 160 x 3 x 1536 x 5120 = 3774873600 / (ep 8 x mp 4) = 117964800
    # MoE layer per card: 11644928 + 34603008 + 11796480 + 117964800 = 176009216
    # dense layer per card: 10825728 + 34603008 + 47185920 = 92614656
    # embedding / lm_head 102400 x 5120 = 524288000 / 4 = 131072000; final norm 5120
    # stage 0 (layers 0-29): 131072000 + 92614656 + 29 x 176009216 = 5327953920
    # stage 1 (layers 30-59): 30 x 176009216 + 5120 + 131072000 = 5411353600
    stages = plan(config)["stages"]
    assert [stage["layers"] for stage in stages] == [30, 30]
    assert [stage["params_per_card"] for stage in stages] == [5327953920, 5411353600]
    # whole model: 2 x 524288000 + 5120 + (10825728 + 138412032 + 188743680)
    #   + 59 x (11644928 + 138412032 + 47185920 + 3774873600) = 235741434880 ("236B")
    # activated: minus the embedding 524288000 and 59 x (160 - 6) unchosen experts of 3 x 1536 x 5120 = 23592960
    #   -> 235741434880 - 524288000 - 214365634560 = 20851512320 ("21B")
    counts = count_parameters(config["model"]["model_config"])
    assert (counts["total"], counts["activated"]) == (235741434880, 20851512320)


def test_divisibility_messages_name_the_field_the_degree_and_a_tensor():
    model = _load(TRAIN_YAMLS[0])["model"]["model_config"]
    problems = check_parallel_config(model, {"data_parallel": 4, "model_parallel": 3, "expert_parallel": 4}, 12)
    heads = [p for p in problems if p.startswith("model_config.num_attention_heads = 128 is not divisible")]
    assert len(heads) == 1 and "parallel_config.model_parallel = 3" in heads[0] and "l2q_proj" in heads[0], problems
    # the MLA latents are never cut: no message about kv_lora_rank / q_lora_rank
    assert not any("lora_rank" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------- quantized tensors
def test_quantized_tensors_must_split_over_the_inference_ranks(tmp_path):
    """int4 with one scale per 128 inputs: the shared experts' w2 of the 236B model holds 3072 / 128 = 24 scale
    groups per row, which 8 ranks split and 16 do not: one message naming the tensor and counting its layers."""
    config = _load("predict_deepseek2_236B_w4a16.yaml")
    mc = {k: v for k, v in config["model"]["model_config"].items() if k != "type"}
    layout = dict(config["parallel_config"], model_parallel=16)
    problems = check_parallel_config(mc, layout, 16)
    assert problems == [
        "model.layers.1.feed_forward.shared_experts.w2.weight_scale (and the same tensor of 58 more layers): the "
        "quantized (int4, group_size 128) tensor (5120, 24) has 24 columns of scale groups on dimension 1, which do "
        "not split into parallel_config.model_parallel = 16 ranks; use a model_parallel dividing 24, another "
        "group_size, or modules_to_not_convert"]
    assert check_parallel_config(mc, dict(layout, model_parallel=8), 8) == []
    # the same tensor left float (modules_to_not_convert) splits like the bf16 recipe
    skip = dict(mc, quantization_config=dict(mc["quantization_config"], modules_to_not_convert=["shared_experts"]))
    assert check_parallel_config(skip, layout, 16) == []
    # per output channel (int8): no scale groups, 16 ranks split every tensor
    int8 = dict(mc, quantization_config={"weight_dtype": "int8"})
    assert check_parallel_config(int8, layout, 16) == []
    # a bad quantization_config: one message naming the key
    for group, text in ((0, "group_size = 0: int4 needs groups"), (100, "group_size = 100 does not divide the 5120 "
                                                                        "inputs of model.layers.0.attention.q2l_proj")):
        bad = dict(mc, quantization_config={"weight_dtype": "int4", "group_size": group})
        problems = check_parallel_config(bad, dict(layout, model_parallel=4), 4)
        assert len(problems) == 1 and text in problems[0], problems


def test_a_quantized_training_yaml_is_refused(tmp_path):
    config = _load(TRAIN_YAMLS[0])
    config["model"]["model_config"]["quantization_config"] = {"weight_dtype": "int8"}
    problems = load_yaml_checks(_write(tmp_path, "train_int8.yaml", config))
    assert any(p.startswith("train_int8.yaml: model_config.quantization_config with run_mode 'finetune'") and
               "predict only" in p for p in problems), problems
