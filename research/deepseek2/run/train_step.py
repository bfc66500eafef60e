"""Training pieces MindFormers' Trainer can name in a YAML, for hardware without the NPU overflow check.

``DeepseekV2TrainOneStepCell`` (runner_wrapper): forward, backward, data-parallel gradient mean, global-norm
clipping, and an update that is skipped when the loss or a gradient is not finite. MindFormers' default
``MFTrainOneStepCell`` calls an Ascend-only overflow status op, so CPU runs use this one.
``LossGuard`` (callback): stops the run when the loss becomes NaN or inf, naming the step, and logs the MoE
balance loss of each step.

The balance loss reaches the log without a side channel in the model: the wrapper asks the model for
``(loss, balance loss)`` (``return_moe_loss``), differentiates the loss alone, and keeps the balance loss of the last
step in its own ``moe_loss`` Parameter, which LossGuard reads from the train network it is given. That Parameter's
name ends in ``_device_local_loss``, which MindFormers' CheckpointMonitor leaves out of checkpoints (its
``filter_list``, as for its own per-device loss statistics): no checkpoint holds it.
"""
import math

import numpy as np
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common import dtype as mstype
from mindspore.train.callback import Callback
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

from research.deepseek2.errors import NonFiniteLossError

__all__ = ["DeepseekV2TrainOneStepCell", "LossGuard", "NonFiniteLossError"]


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class DeepseekV2TrainOneStepCell(nn.TrainOneStepCell):
    """One optimizer step: returns (loss, overflow, scale_sense, learning_rate, global_norm) for MFLossMonitor."""

    def __init__(self, network, optimizer, use_clip_grad: bool = True, max_grad_norm: float = 1.0,
                 scale_sense=1.0, **kwargs):
        # kwargs the trainer passes for other wrappers (calculate_per_token_loss, local_norm, ...) do not apply
        super().__init__(network, optimizer, sens=None)
        network.add_flags_recursive(return_moe_loss=True)      # the model returns (loss, balance loss)
        self.moe_loss = Parameter(Tensor(0.0, mstype.float32), name="moe_balance_device_local_loss",
                                  requires_grad=False)
        self.use_clip_grad = use_clip_grad
        self.max_grad_norm = float(max_grad_norm)
        self.scale_sense = Tensor(float(scale_sense if isinstance(scale_sense, (int, float)) else 1.0),
                                  mstype.float32)

    def _global_norm(self, grads):
        squares = [ops.reduce_sum(ops.square(ops.cast(g, mstype.float32))) for g in grads]
        return ops.sqrt(ops.addn(squares))

    def construct(self, *inputs):
        loss, moe_loss = self.network(*inputs)                 # loss includes the balance loss
        sens = (ops.ones_like(loss), ops.zeros_like(moe_loss))
        grads = self.grad(self.network, self.weights)(*inputs, sens)
        loss = ops.depend(loss, ops.assign(self.moe_loss, moe_loss))
        grads = self.grad_reducer(grads)                       # mean over data-parallel ranks (identity alone)
        global_norm = self._global_norm(grads)
        if self.use_clip_grad:
            factor = self.max_grad_norm / ops.maximum(global_norm, self.max_grad_norm)   # 1 when within the norm
            grads = tuple(g * ops.cast(factor, g.dtype) for g in grads)
        finite = ops.logical_and(ops.isfinite(loss), ops.isfinite(global_norm))
        overflow = ops.logical_not(finite)
        if finite:
            loss = ops.depend(loss, self.optimizer(grads))
        learning_rate = self.optimizer.get_lr() if self.optimizer.dynamic_lr else self.optimizer.learning_rate
        return loss, overflow, self.scale_sense, learning_rate, global_norm


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class LossGuard(Callback):
    """Stops training at the first NaN/inf loss or gradient norm, naming the step; logs the MoE balance loss."""

    def __init__(self, log_steps: int = 1):
        super().__init__()
        self.log_steps = max(1, int(log_steps))

    def on_train_step_end(self, run_context):
        params = run_context.original_args()
        outputs = params.net_outputs
        loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        value = float(np.mean(loss.asnumpy())) if isinstance(loss, Tensor) else float(loss)
        step = params.cur_step_num
        norm = outputs[4] if isinstance(outputs, (tuple, list)) and len(outputs) == 5 else None
        norm = float(np.mean(norm.asnumpy())) if isinstance(norm, Tensor) else None
        for what, number in (("loss", value), ("gradient norm", norm)):
            if number is not None and not math.isfinite(number):
                run_context.request_stop()
                raise NonFiniteLossError(f"training {what} became {number} at step {step} (loss {value}); the "
                                         f"update of that step was skipped and the run stopped (lower the "
                                         f"learning rate, check the data and the initial weights)")
        aux = getattr(params.train_network, "moe_loss", None)     # DeepseekV2TrainOneStepCell's
        if aux is not None and step % self.log_steps == 0:
            logger.info(f"step {step}: loss {value:.6f}, MoE balance loss {float(aux.asnumpy()):.6f}")
