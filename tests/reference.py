"""The PyTorch reference (transformers' DeepseekV2ForCausalLM) that the parity checks hold the model against, and
tiny model factories. Test code, not part of the installed package: the tests, ``scripts/check_parity.py`` and the
benchmarks (``bench/common.py``) import it from here; it needs the test extras (torch, transformers:
``pip install -e .[test]``), which the package itself never imports.

transformers 4.57.1 lacks one factor of the released DeepSeek-V2 code: with YaRN the released attention multiplies
the softmax scale by yarn_get_mscale(factor, mscale_all_dim) ** 2. ``build_reference`` patches it in.
"""
import copy
import math

import torch

from research.deepseek2.checkpoints.weight_map import hf_state_to_ms
from research.deepseek2.deepseek2_config import DeepseekV2Config
from research.deepseek2.planning.inventory import buffers
from research.deepseek2.rope import yarn_get_mscale

# V2-style: low-rank query, device-limited routing, YaRN, routed_scaling_factor 16, first layer dense
V2_STYLE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
                num_attention_heads=4, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=3,
                routed_scaling_factor=16.0, kv_lora_rank=24, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=12,
                qk_nope_head_dim=16, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False, max_position_embeddings=64,
                rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8})
# Lite-style: full-rank query, greedy routing, no rope scaling
LITE_STYLE = dict(V2_STYLE, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, rope_scaling=None,
                  routed_scaling_factor=1.0, n_shared_experts=1, num_experts_per_tok=2)


def hf_config(fields):
    from transformers import DeepseekV2Config as HFConfig
    fields = copy.deepcopy(fields)
    cfg = HFConfig(**fields)
    cfg._attn_implementation = "eager"
    return cfg


def _parity_weights(name, param, gen):
    """Random enough that routing and RoPE matter: norms 1 + 0.2 N(0, 1), router and embeddings N(0, 1) (decisive
    routing), other matrices N(0, 1/fan_in)."""
    if name.endswith("norm.weight") or "layernorm" in name:
        return 1.0 + 0.2 * torch.randn(param.shape, generator=gen)
    if name.endswith("mlp.gate.weight") or "embed_tokens" in name:
        return torch.randn(param.shape, generator=gen)
    return torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1])


def _benchmark_weights(name, param, gen):
    """A model that computes like a trained one: norms 1, embeddings N(0, 1), every matrix N(0, 1/fan_in), the router
    too, so routing spreads over the experts as a trained, balanced router spreads it (a benchmark must not hand
    every token to one expert)."""
    if param.dim() == 1:
        return torch.ones(param.shape)
    if "embed_tokens" in name:
        return torch.randn(param.shape, generator=gen)
    return torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1])


WEIGHTS = {"parity": _parity_weights, "benchmark": _benchmark_weights}


def build_reference(fields, seed=0, weights="parity"):
    """A transformers DeepseekV2ForCausalLM in eval mode with seeded weights (``WEIGHTS[weights]``) and the released
    code's YaRN softmax factor."""
    from transformers import DeepseekV2ForCausalLM as HFModel
    torch.manual_seed(seed)
    model = HFModel(hf_config(fields)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(WEIGHTS[weights](name, param, gen))
    scaling = (fields.get("rope_scaling") or {})
    if scaling.get("type") == "yarn" and scaling.get("mscale_all_dim"):
        m = yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"])
        for layer in model.model.layers:
            layer.self_attn.scaling = layer.self_attn.scaling * m * m             # the released code's factor
    return model


def ms_params(model, fields):
    """The reference's weights under MindSpore names (float32 numpy)."""
    arrays = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    return hf_state_to_ms(arrays, fields["n_routed_experts"])


def build_ms(fields, ref_model, local=None, **knobs):
    """Our model with the reference's weights (``local``: a LocalShape; the whole model by default)."""
    import mindspore as ms
    from research.deepseek2.deepseek2 import DeepseekV2ForCausalLM
    cfg = DeepseekV2Config(**copy.deepcopy(fields), **knobs)
    net = DeepseekV2ForCausalLM(cfg, local)
    params = {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in ms_params(ref_model, fields).items()}
    not_loaded, unused = ms.load_param_into_net(net, params, strict_load=True)
    weights = [n for n in not_loaded if n not in buffers(cfg)]
    assert not weights and not unused, (weights, unused)
    net.set_train(False)
    return net


def reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def reference_generate(model, ids, max_new_tokens):
    with torch.no_grad():
        out = model.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=model.config.pad_token_id)
    return out.numpy()
