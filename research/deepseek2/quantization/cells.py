"""The model's side of weight-only quantization: which projections a built model holds quantized (``QuantPlan``,
the inventory's answer) and the quantized projection (``QuantLinear``). The routed experts hold their stacked
int8/int4 weights themselves (``moe.RoutedExperts``) and multiply through ``kernels.GatheredWeightQuantMatmul``.

Quantized weights and their scales are not trained (``requires_grad`` False): a quantized model predicts and
evaluates; finetuning starts from float weights.
"""
from mindspore import nn, ops, Parameter
from mindspore.common import dtype as mstype
from mindspore.common.initializer import initializer

from research.deepseek2.planning.inventory import held_dtypes
from research.deepseek2.quantization.kernels import WeightQuantMatmul, kernel_for
from research.deepseek2.quantization.settings import scale_shape, stored_shape

__all__ = ["FLOAT", "QuantPlan", "QuantLinear", "quantized_parameter"]


class QuantPlan:
    """Which weights under ``prefix`` the model holds quantized, and with which kernel; ``scoped`` narrows it to a
    sub-cell ("model.layers.3." -> "model.layers.3.attention."). ``FLOAT``, the plan of a config without
    quantization_config (and the default of every cell), holds none."""

    def __init__(self, settings=None, names=frozenset(), kernel: str = "basic", prefix: str = ""):
        self.settings, self.names, self.kernel, self.prefix = settings, names, kernel, prefix

    @classmethod
    def for_config(cls, config) -> "QuantPlan":
        """The model's plan: the inventory's int8-held weights and the kernel the config asks for."""
        settings = config.weight_quantization
        if not settings:
            return FLOAT
        names = frozenset(n for n, d in held_dtypes(config).items() if d == "int8")
        kernel = kernel_for(config.use_weight_quant_kernel, settings.bits, group_size=settings.group_size,
                            compute_dtype=config.compute_dtype)
        return cls(settings, names, kernel)

    @property
    def bits(self) -> int:
        """Bits of a held weight (8 when the plan holds none: a float model's expert dispatch is the int8 one's)."""
        return self.settings.bits if self.settings else 8

    def scoped(self, sub: str) -> "QuantPlan":
        return QuantPlan(self.settings, self.names, self.kernel, self.prefix + sub)

    def holds(self, name: str) -> bool:
        """Whether the weight ``prefix + name`` is held quantized."""
        return self.prefix + name in self.names


FLOAT = QuantPlan()


def quantized_parameter(shape, settings, name: str, where: str = None):
    """(int8 weight, float32 scale) Parameters for a float weight of ``shape`` (..., n, k), stored as the
    converter writes them (``settings.stored_shape`` / ``scale_shape``); frozen. ``where``: the weight's name in
    the model, for errors (default ``name``)."""
    where = where or name
    weight = Parameter(initializer("zeros", stored_shape(shape, settings, where), mstype.int8), name=name,
                       requires_grad=False)
    scale = Parameter(initializer("ones", scale_shape(shape, settings, where), mstype.float32),
                      name=name + "_scale", requires_grad=False)
    return weight, scale


class QuantLinear(nn.Cell):
    """y = x W^T (+ b) with W = q * scale held quantized: ``weight`` int8 (out, in) or int4 packed (out/2, in),
    ``weight_scale`` (out, in / group_size) float32 (``quantization/rtn.py``'s layout); the bias stays float."""

    def __init__(self, in_features: int, out_features: int, plan: QuantPlan, has_bias: bool = False,
                 compute_dtype=mstype.float32, param_init_type=mstype.float32, where: str = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight, self.weight_scale = quantized_parameter((out_features, in_features), plan.settings, "weight",
                                                             where)
        self.bias = Parameter(initializer("zeros", (out_features,), param_init_type), name="bias") \
            if has_bias else None
        self.matmul = WeightQuantMatmul(plan.settings.bits, plan.settings.group_size, plan.kernel, compute_dtype)

    def construct(self, x):
        shape = x.shape
        x2 = ops.reshape(ops.cast(x, self.compute_dtype), (-1, shape[-1]))                # (tokens, in)
        y = self.matmul(x2, self.weight, self.weight_scale)                                 # (tokens, out)
        if self.bias is not None:
            y = y + ops.cast(self.bias, self.compute_dtype)
        return ops.reshape(y, shape[:-1] + (self.out_features,))

