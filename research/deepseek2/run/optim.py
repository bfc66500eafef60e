"""AdamW for CPU training: torch.optim.AdamW's update in MindSpore's one-kernel AdamWeightDecay.

MindFormers' ``AdamW`` (the YAMLs' ``optimizer: {type: AdamW}``) writes the update as about ten element-wise kernels
per parameter, two of them slow per element on CPU: ``Addcmul`` (the second moment) and ``Div`` (the bias correction
and m / denominator); docs/profile.md has the figures. MindSpore's ``AdamWeightDecay`` primitive does the whole
update of one parameter in one CPU kernel, without bias correction:

    m <- m + (g - m)(1 - beta1);  v <- v + (g^2 - v)(1 - beta2);  p <- p - lr' (m / (sqrt(v) + eps') + decay' p)

torch's AdamW at step t is the same update with the bias correction folded into the three scalars (bc1 = 1 - beta1^t,
bc2 = 1 - beta2^t):  lr' = lr sqrt(bc2) / bc1,  eps' = eps sqrt(bc2),  decay' = weight_decay bc1 / sqrt(bc2)
(so lr' decay' = lr weight_decay), because  lr (m / bc1) / (sqrt(v / bc2) + eps) = lr' m / (sqrt(v) + eps').

``CpuAdamW`` takes MindFormers' AdamW arguments and parameter groups (the Trainer groups weights by weight decay)
and keeps its state under the same names (``adam_m.*``, ``adam_v.*``, ``global_step``), so a checkpoint saved with
one resumes with the other. On Ascend keep MindFormers' AdamW (``use_fused: True`` there runs the NPU's fused
kernel); ``swap`` (moments in host memory) is an NPU feature and is refused here.
"""
import math

from mindspore import Tensor, ops
from mindspore.common import dtype as mstype
from mindspore.nn.optim.optimizer import Optimizer
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

_update = ops.MultitypeFuncGraph("cpu_adamw_update")


@_update.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                  "Tensor", "Tensor")
def _update_one(kernel, beta1, beta2, eps, decay_scale, lr, weight_decay, param, m, v, grad):
    """One parameter's AdamW step in one AdamWeightDecay kernel; lr (already lr'), weight_decay: its group's."""
    kernel(param, m, v, lr, beta1, beta2, eps, weight_decay * decay_scale, ops.cast(grad, param.dtype))
    return True


def _check(name: str, value, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= float(value) < high:
        raise ValueError(f"optimizer.{name}: expected a number in [{low}, {high}), got {value!r}")
    return float(value)


@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER)
class CpuAdamW(Optimizer):
    """torch.optim.AdamW (bias-corrected, decoupled weight decay) as one AdamWeightDecay kernel per parameter.

    Args: those of MindFormers' AdamW: params (parameters or groups with "params", "lr", "weight_decay",
    "order_params"), learning_rate (number, Tensor, schedule), betas, eps, weight_decay; swap must stay False.
    """

    def __init__(self, params, learning_rate=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, swap=False):
        if swap:
            raise ValueError("optimizer.swap: CpuAdamW keeps its moments with the weights; swap (moments in host "
                              "memory) is MindFormers' AdamW's NPU feature: use type AdamW for it")
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f"optimizer.betas: expected two numbers, got {betas!r}")
        beta1, beta2 = (_check(f"betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))
        eps = _check("eps", eps, 0.0, math.inf)
        if isinstance(weight_decay, (int, float)):
            _check("weight_decay", weight_decay, 0.0, math.inf)
        super().__init__(learning_rate, params, weight_decay)
        if self.dynamic_weight_decay:
            raise ValueError("optimizer.weight_decay: CpuAdamW takes a number per group, not a schedule")
        decays = self.weight_decay if self.is_group else (self.weight_decay,) * len(self._parameters)
        self.decays = tuple(Tensor([float(w)], mstype.float32) for w in decays)  # one per parameter
        self.beta1 = Tensor([beta1], mstype.float32)
        self.beta2 = Tensor([beta2], mstype.float32)
        self.eps = Tensor([eps], mstype.float32)
        self.exp_avg = self._parameters.clone(prefix="adam_m", init="zeros")       # MindFormers' AdamW's names
        self.exp_avg_sq = self._parameters.clone(prefix="adam_v", init="zeros")
        self.kernel = ops.AdamWeightDecay()

    def construct(self, gradients):
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        step = ops.cast(self.global_step, mstype.float32)
        bc1 = 1.0 - ops.pow(self.beta1, step)                                         # (1,)
        sqrt_bc2 = ops.sqrt(1.0 - ops.pow(self.beta2, step))
        lr_scale, decay_scale, eps = sqrt_bc2 / bc1, bc1 / sqrt_bc2, self.eps * sqrt_bc2
        gradients = self.flatten_gradients(gradients)
        update = ops.partial(_update, self.kernel, self.beta1, self.beta2, eps, decay_scale)
        if self.is_group_lr:                                       # a learning rate per parameter (groups with "lr")
            lrs = tuple(x * lr_scale for x in lr)
        else:
            lrs = (lr * lr_scale,) * len(self.decays)
        return self.hyper_map(update, lrs, self.decays, self._parameters, self.exp_avg, self.exp_avg_sq, gradients)
