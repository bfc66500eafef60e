"""DeepseekV2Config takes the released config.json as it is: every key is used, refused naming it, or (bookkeeping of
the PyTorch code) named once in a warning; nothing a user sets is dropped silently."""
import json

import pytest

from research.deepseek2.deepseek2_config import DeepseekV2Config

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, seq_length=8)


@pytest.mark.parametrize("key, value, expected", [
    ("attention_dropout", 0.1, "attention_dropout = 0.1: expected 0.0"),
    ("layernorm_compute_type", "bfloat16", "layernorm_compute_type = mindspore.bfloat16: expected float32"),
    ("mlp_bias", True, "mlp_bias = True: this model supports only False"),
    ("num_nextn_predict_layers", 1, "num_nextn_predict_layers = 1: this model supports only 0"),
    ("output_attentions", True, "output_attentions = True: this model supports only False"),
    ("quantization_config", {"quant_method": "fp8"}, "quantization_config.quant_method = 'fp8'"),
])
def test_a_value_the_model_cannot_honour_is_refused_naming_the_key(key, value, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        DeepseekV2Config(**TINY, **{key: value})


def test_released_values_are_accepted():
    config = DeepseekV2Config(**TINY, attention_dropout=0.0, layernorm_compute_type="float32", mlp_bias=False,
                              num_nextn_predict_layers=0, output_attentions=False, quantization_config=None)
    assert config.attention_dropout == 0.0


def test_initializer_range_is_init_std():
    assert DeepseekV2Config(**TINY).init_std == 0.02
    assert DeepseekV2Config(**TINY, initializer_range=0.006).init_std == 0.006
    assert DeepseekV2Config(**TINY, initializer_range=0.006, init_std=0.5).init_std == 0.5   # ours wins
    assert DeepseekV2Config(**TINY, init_std=0.3).to_hf_dict()["initializer_range"] == 0.3


def test_bookkeeping_keys_are_named_once_in_a_warning(monkeypatch):
    """The keys transformers writes into a config.json that this model has no use for (architectures, torch_dtype,
    use_cache ...) are dropped with one warning naming each and why, once per process for the same keys."""
    from research.deepseek2 import deepseek2_config
    warnings = []
    monkeypatch.setattr(deepseek2_config.logger, "warning", warnings.append)
    monkeypatch.setattr(deepseek2_config, "_PRINTED_IGNORED", set())
    released = dict(TINY, architectures=["DeepseekV2ForCausalLM"], torch_dtype="bfloat16", use_cache=True,
                    transformers_version="4.57.1", ep_size=1)
    config = DeepseekV2Config(**released)
    DeepseekV2Config(**released)
    assert len(warnings) == 1 and warnings[0].startswith("DeepseekV2Config ignores"), warnings
    for key in ("architectures", "torch_dtype", "use_cache", "transformers_version", "ep_size"):
        assert key in warnings[0]
    for key in ("torch_dtype", "use_cache", "transformers_version", "ep_size"):
        assert not hasattr(config, key)


def test_seq_aux_is_kept_for_the_balance_loss():
    assert DeepseekV2Config(**TINY).seq_aux is True
    assert DeepseekV2Config(**TINY, seq_aux=False).seq_aux is False


def test_every_key_transformers_writes_is_used_or_named(tmp_path):
    """Each key of a config.json as transformers writes it for a DeepSeek-V2 model is a field of DeepseekV2Config, a
    key accepted at its released value, or a named bookkeeping key; the file builds the config."""
    import inspect
    from transformers import DeepseekV2Config as HFConfig
    from research.deepseek2 import deepseek2_config
    (tmp_path / "config.json").write_text(json.dumps(HFConfig(**TINY, n_routed_experts=4, num_experts_per_tok=2,
                                                              n_shared_experts=1, moe_intermediate_size=8)
                                                     .to_diff_dict()))
    fields = json.loads((tmp_path / "config.json").read_text())
    used = set(inspect.signature(DeepseekV2Config.__init__).parameters)
    named = {key for key, _ in deepseek2_config._IGNORED_KEYS} | set(deepseek2_config._FIXED_KEYS)
    assert len(fields) > 30 and sorted(set(fields) - used - named) == []
    assert DeepseekV2Config(**fields).kv_lora_rank == 8


def test_no_yaml_recipe_states_a_key_twice():
    """YAML keeps the last of two equal keys without a word: every recipe is read with a loader that refuses them."""
    import glob
    import os
    import yaml
    from conftest import ROOT

    class Strict(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            twice = sorted({k for k in keys if keys.count(k) > 1})
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"key(s) {twice} stated twice", node.start_mark)
            return super().construct_mapping(node, deep)

    recipes = glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "research", "deepseek2", "**", "*.yaml"), recursive=True)
    assert len(recipes) >= 10
    for path in recipes:
        with open(path, encoding="utf-8") as handle:
            yaml.load(handle, Loader=Strict)                  # raises naming the key and the line
