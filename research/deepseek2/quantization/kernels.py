"""Matrix products with quantized weights: the one place a quantized weight meets an activation.

Two declared functions, each with three ways to run, chosen once per cell (``kernel_for``):

``weight_quant_matmul(x, weight, scale)``: y (t, n) = x (t, k) W^T for W = q * scale (``rtn.py``'s layout: int8
    (n, k) or int4 packed (n/2, k); scale (n, k/G) float32).
``gathered_weight_quant_matmul(x, weights, scales, index)``: y (N, n) with y[a] = x[a] W[index[a]]^T, the routed
    experts' per-assignment product (``index`` (N,) int32 picks one stacked expert (E, n, k) per row); only the
    experts picked are read.

kernel "basic" (use_weight_quant_kernel False): MindSpore basic ops on every device; the touched weights are
    dequantized to compute_dtype (int4 unpacked with float arithmetic, exact) and multiplied by MatMul /
    BatchMatMul. The stand-in every other path is held to.
kernel "ascend" (use_weight_quant_kernel True on Ascend): ``WEIGHT_QUANT_BATCH_MATMUL`` (MindSpore's
    ``WeightQuantBatchMatmul``, int8 weights) for the projections; the experts' gathered product stays basic ops.
kernel "cpu" (use_weight_quant_kernel True on CPU): ``cpu_kernel.py``'s C++ kernels, joined to the graph as
    MindSpore ``Custom`` ops: int8/int4 products accumulated in float32 without a dequantized copy.
"""
import mindspore as ms
from mindspore import nn, ops
from mindspore.common import dtype as mstype

from research.deepseek2.errors import QuantizationError

__all__ = ["kernel_for", "WEIGHT_QUANT_BATCH_MATMUL", "dequantize", "WeightQuantMatmul", "GatheredWeightQuantMatmul"]

# MindSpore's fused W8A16 kernel (Ascend only), read when a cell is built: the tests replace this reference with a
# stand-in from basic ops that keeps its contract (see ``WeightQuantMatmul``).
WEIGHT_QUANT_BATCH_MATMUL = ops.auto_generate.WeightQuantBatchMatmul
_ASCEND_KERNEL = ops.auto_generate.WeightQuantBatchMatmul


def kernel_for(use_kernel: bool, bits: int, device_target=None, group_size: int = 0, compute_dtype=None) -> str:
    """"basic", "ascend" or "cpu" for a model's use_weight_quant_kernel switch on this device (the context's
    device_target by default). The switch on where no fused kernel exists, or with weights or a compute_dtype the
    kernel does not take, is refused naming the switch."""
    if not use_kernel:
        return "basic"
    target = device_target if device_target is not None else ms.get_context("device_target")
    stand_in = WEIGHT_QUANT_BATCH_MATMUL is not _ASCEND_KERNEL      # the tests' stand-in of the Ascend kernel
    if stand_in:
        target = "Ascend"
    if target == "Ascend" and not stand_in and compute_dtype not in (mstype.float16, mstype.bfloat16):
        raise QuantizationError(f"use_weight_quant_kernel = True on Ascend needs compute_dtype bfloat16 or "
                                f"float16 (what WeightQuantBatchMatmul takes); compute_dtype is {compute_dtype}")
    if target == "Ascend":
        if bits != 8:
            raise QuantizationError("use_weight_quant_kernel = True with weight_dtype 'int4' on Ascend: "
                                    "WeightQuantBatchMatmul takes int4 weights only as a qint4x2 (k, n/2) "
                                    "parameter, which this model does not hold; set use_weight_quant_kernel: False "
                                    "(int4 then runs from basic ops) or use int8")
        if group_size % 32:
            raise QuantizationError(f"use_weight_quant_kernel = True on Ascend: WeightQuantBatchMatmul takes group "
                                    f"sizes that are multiples of 32 (quantization_config.group_size is "
                                    f"{group_size}); set use_weight_quant_kernel: False or quantize with another "
                                    f"group size")
        return "ascend"
    if target == "CPU":
        return "cpu"
    raise QuantizationError(f"use_weight_quant_kernel = True: no fused weight-quantized kernel for device_target "
                            f"{target!r} (Ascend and CPU have one); set use_weight_quant_kernel: False")


def _unpack_int4(packed, dtype):
    """(..., n/2, k) int8 of two int4 a byte -> (..., n, k) in ``dtype``: channel 2j is the low nibble. Float
    arithmetic, exact: a byte b = 16 high + low_u with low_u in [0, 15], so high = floor(b / 16)."""
    b = ops.cast(packed, mstype.float32)
    high = ops.floor(b / 16.0)
    low = b - 16.0 * high                                                   # [0, 15]
    low = low - 16.0 * ops.cast(low > 7.5, mstype.float32)                  # two's complement nibble
    both = ops.stack((low, high), -2)                                       # (..., n/2, 2, k)
    shape = packed.shape[:-2] + (packed.shape[-2] * 2, packed.shape[-1])
    return ops.cast(ops.reshape(both, shape), dtype)


def dequantize(weight, scale, bits: int, dtype):
    """W (..., n, k) in ``dtype`` from the stored int8 / packed int4 ``weight`` and its scale (..., n, g)."""
    values = _unpack_int4(weight, dtype) if bits == 4 else ops.cast(weight, dtype)
    n, k = values.shape[-2:]
    groups = scale.shape[-1]
    grouped = ops.reshape(values, values.shape[:-1] + (groups, k // groups))               # (..., n, g, G)
    return ops.reshape(grouped * ops.expand_dims(ops.cast(scale, dtype), -1), values.shape)


class WeightQuantMatmul(nn.Cell):
    """y (t, n) = x (t, k) (q * scale)^T, by the kernel chosen at construction.

    Contract of the Ascend call (``WEIGHT_QUANT_BATCH_MATMUL``; a stand-in must keep it):
      constructed  (transpose_x=False, transpose_weight=True, antiquant_group_size=G or 0 per channel)
      x            (t, k) compute_dtype (float16 / bfloat16 on Ascend)
      weight       (n, k) int8, as held
      scale        per channel: (n,); group-wise: (k / G, n) (the held (n, k / G) transposed): x's dtype
      offset       None (symmetric)
    returns (t, n) in x's dtype.
    """

    def __init__(self, bits: int, group_size: int, kernel: str, compute_dtype=mstype.float32):
        super().__init__()
        self.bits, self.group_size, self.kernel, self.compute_dtype = bits, group_size, kernel, compute_dtype
        self.matmul = ops.MatMul(transpose_b=True)
        if kernel == "ascend":
            self.fused = WEIGHT_QUANT_BATCH_MATMUL(False, True, group_size)
        elif kernel == "cpu":
            from research.deepseek2.quantization.cpu_kernel import weight_quant_matmul_op
            self.fused = weight_quant_matmul_op(bits)

    def construct(self, x, weight, scale):
        if self.kernel == "ascend":
            if self.group_size:
                antiquant_scale = ops.transpose(ops.cast(scale, x.dtype), (1, 0))                # (k/G, n)
            else:
                antiquant_scale = ops.reshape(ops.cast(scale, x.dtype), (-1,))                   # (n,)
            return self.fused(x, weight, antiquant_scale, None, None, None, None)
        if self.kernel == "cpu":
            return ops.cast(self.fused(ops.cast(x, mstype.float32), weight, scale), x.dtype)
        return self.matmul(x, dequantize(weight, scale, self.bits, x.dtype))


class GatheredWeightQuantMatmul(nn.Cell):
    """y (N, n): row a is x[a] (k,) times expert index[a]'s W^T, W = q * scale of the stacked (E, n, k) weights.

    basic (every device): the picked experts' int8 rows (N, n, k) and scales are gathered, dequantized and
    multiplied by BatchMatMul; cpu: one C++ kernel reads the picked experts in place.
    """

    def __init__(self, bits: int, kernel: str):
        super().__init__()
        self.bits = bits
        self.kernel = "cpu" if kernel == "cpu" else "basic"
        self.bmm = ops.BatchMatMul(transpose_b=True)
        if self.kernel == "cpu":
            from research.deepseek2.quantization.cpu_kernel import gathered_weight_quant_matmul_op
            self.fused = gathered_weight_quant_matmul_op(bits)

    def construct(self, x, weights, scales, index):
        if self.kernel == "cpu":
            return ops.cast(self.fused(ops.cast(x, mstype.float32), weights, scales, index), x.dtype)
        picked = dequantize(ops.gather(weights, index, 0), ops.gather(scales, index, 0), self.bits, x.dtype)
        return ops.squeeze(self.bmm(ops.expand_dims(x, 1), picked), 1)                          # (N, n)
