"""The Ascend call site of quantized projections (``use_weight_quant_kernel: True``: MindSpore's
``WeightQuantBatchMatmul``), checked on CPU with a stand-in of the kernel written from basic ops that keeps the
contract ``kernels.WeightQuantMatmul`` declares (constructor flags, int8 (n, k) weight, scale (n,) per channel or
(k / G, n) per group in x's dtype, no offset). The stand-in refuses anything else, counts its calls in a Parameter (so
a compiled graph records them too), and the model's logits through it equal the basic-op path's. Where the real
kernel cannot run (int4, a group size it does not take, float32 activations) the switch is refused by name."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common import dtype as mstype

import reference as R
from research.deepseek2.errors import QuantizationError
from research.deepseek2.quantization import kernels
from research.deepseek2.quantization.rtn import dequantize, quantize
from research.deepseek2.quantization.settings import parse_quantization_config

CALLS = Parameter(Tensor(0, mstype.int32), name="wqbmm_stand_in_calls", requires_grad=False)
SEEN = Parameter(Tensor(np.zeros(6, np.int32)), name="wqbmm_stand_in_seen", requires_grad=False)


class BasicWeightQuantBatchMatmul(nn.Cell):
    """WeightQuantBatchMatmul(transpose_x, transpose_weight, antiquant_group_size)(x, weight, antiquant_scale,
    antiquant_offset, quant_scale, quant_offset, bias) for what WeightQuantMatmul asks of it, from basic ops:
    y = x ((weight + offset) * scale)^T with the weight (n, k) transposed, the scale per channel or per group."""

    def __init__(self, transpose_x=False, transpose_weight=False, antiquant_group_size=0):
        super().__init__()
        if transpose_x or not transpose_weight:
            raise ValueError("stand-in: x as given (transpose_x False) and the weight (n, k) transposed")
        self.group = antiquant_group_size

    def construct(self, x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None,
                  bias=None):
        if antiquant_offset is not None or quant_scale is not None or quant_offset is not None or bias is not None:
            raise ValueError("stand-in: symmetric weights only: no offsets, no output quantization, no bias")
        if weight.dtype != mstype.int8 or len(weight.shape) != 2 or weight.shape[1] != x.shape[1]:
            raise ValueError("stand-in: an int8 (n, k) weight for x (t, k)")
        if antiquant_scale.dtype != x.dtype:
            raise ValueError("stand-in: the scale comes in x's dtype")
        n, k = weight.shape
        if self.group:
            if antiquant_scale.shape != (k // self.group, n):
                raise ValueError("stand-in: a per-group scale is (k / G, n)")
            scale = ops.transpose(antiquant_scale, (1, 0))                                     # (n, k / G)
        else:
            if antiquant_scale.shape != (n,):
                raise ValueError("stand-in: a per-channel scale is (n,)")
            scale = ops.expand_dims(antiquant_scale, 1)                                        # (n, 1)
        ops.assign_add(CALLS, Tensor(1, mstype.int32))
        ops.assign(SEEN, Tensor(x.shape + weight.shape + antiquant_scale.shape[:1] + (self.group,), mstype.int32))
        groups = scale.shape[1]
        w = ops.reshape(ops.cast(weight, x.dtype), (n, groups, k // groups)) * ops.expand_dims(scale, -1)
        return ops.matmul(x, ops.transpose(ops.reshape(w, (n, k)), (1, 0)))


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(kernels, "WEIGHT_QUANT_BATCH_MATMUL", BasicWeightQuantBatchMatmul)
    CALLS.set_data(Tensor(0, mstype.int32))
    yield


@pytest.mark.parametrize("group", [0, 32])
def test_the_call_keeps_the_contract_and_the_product(stand_in, group):
    quant = parse_quantization_config({"weight_dtype": "int8", "group_size": group})
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (48, 96)).astype(np.float32)
    x = rng.normal(0, 1, (5, 96)).astype(np.float32)
    q, scale = quantize(w, quant)
    cell = kernels.WeightQuantMatmul(8, group, kernels.kernel_for(True, 8, group_size=group))
    assert cell.kernel == "ascend"
    y = cell(Tensor(x), Tensor(q), Tensor(scale)).asnumpy()
    np.testing.assert_allclose(y, x @ dequantize(q, scale, quant).T, rtol=0, atol=1e-5)
    assert int(CALLS.asnumpy()) == 1
    assert list(SEEN.asnumpy()) == [5, 96, 48, 96, 96 // group if group else 48, group]


@pytest.mark.parametrize("mode", [pytest.param(ms.GRAPH_MODE, marks=pytest.mark.slow), ms.PYNATIVE_MODE],
                         ids=["graph", "pynative"])
def test_the_model_through_the_kernel_equals_the_basic_op_path(stand_in, mode, tmp_path):
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
    from research.deepseek2.checkpoints import load_checkpoint
    from research.deepseek2.quantization.convert import quantize_checkpoint
    fields = R.V2_STYLE
    R.build_reference(fields, seed=3).save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    quant = parse_quantization_config({"weight_dtype": "int8"})
    quantize_checkpoint(str(tmp_path / "hf"), str(tmp_path / "q"), quant, progress=False)
    ids = Tensor(np.random.default_rng(1).integers(0, fields["vocab_size"], (2, 10)), ms.int32)
    logits = {}
    ms.set_context(mode=mode)
    try:
        for switch in (False, True):
            net = DeepseekV2ForCausalLM(DeepseekV2Config(**fields, quantization_config=quant.to_dict(),
                                                         use_weight_quant_kernel=switch))
            load_checkpoint(net, str(tmp_path / "q"), progress=False)
            net.set_train(False)
            logits[switch] = net(ids).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=1e-5)
    # every quantized projection went through it: 3 layers x (q2l, l2q, kv2l, wo) + dense FFN 3 + 2 MoE layers'
    # shared experts 3 each; routed experts gather with basic ops on every device
    assert int(CALLS.asnumpy()) == 3 * 4 + 3 + 2 * 3


def test_where_the_ascend_kernel_cannot_run_the_switch_is_refused_by_name():
    with pytest.raises(QuantizationError, match="needs compute_dtype bfloat16 or float16"):
        kernels.kernel_for(True, 8, device_target="Ascend", compute_dtype=mstype.float32)
    with pytest.raises(QuantizationError, match="weight_dtype 'int4' on Ascend"):
        kernels.kernel_for(True, 4, device_target="Ascend", compute_dtype=mstype.bfloat16)
    with pytest.raises(QuantizationError, match=r"multiples of 32 \(quantization_config.group_size is 8\)"):
        kernels.kernel_for(True, 8, device_target="Ascend", group_size=8, compute_dtype=mstype.bfloat16)
    with pytest.raises(QuantizationError, match="no fused weight-quantized kernel for device_target 'GPU'"):
        kernels.kernel_for(True, 8, device_target="GPU")
    assert kernels.kernel_for(True, 8, device_target="Ascend", group_size=128, compute_dtype=mstype.bfloat16) == \
        "ascend"
    assert kernels.kernel_for(True, 4, device_target="CPU") == "cpu"
    assert kernels.kernel_for(False, 4, device_target="Ascend") == "basic"
