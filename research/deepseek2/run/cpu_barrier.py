"""A CPU stand-in for the ``barrier()`` MindFormers calls while loading a checkpoint in a distributed run.

Why: MindSpore's ``Barrier`` primitive has no CPU kernel (behind ``mindspore.communication.comm_func.barrier``, which
MindFormers 1.9 binds, and ``mindspore.mint.distributed.barrier``, which MindFormers 2.1 binds), so a
data-parallel finetune on CPU under msrun with ``--use_parallel True --load_checkpoint X`` dies on every rank with
``Unsupported op [Barrier] on CPU``: MindFormers' ``preload_ckpt`` (``mindformers/trainer/utils.py``) calls
``barrier()`` whenever ``use_parallel`` is set and a ``.ckpt`` is given, ``mindformers/utils/load_checkpoint_utils.py``
calls ``barrier()`` / ``barrier_world()`` while loading safetensors, and ``mindformers/tools/resume_ckpt.py`` calls
``barrier_world()`` when resuming from a checkpoint folder. mccl (MindSpore's CPU collective backend) does run
AllReduce, and an AllReduce over the world group completes on a rank only once every rank has entered it: it is a
barrier.

What ``install_cpu_barrier()`` does: only when the device target is CPU *and* communication is initialised
(``mindspore.communication.init()`` has run, i.e. ``use_parallel`` with msrun), it rebinds exactly the names those
modules imported (``PATCHED_NAMES``) to a barrier made of a one-element AllReduce. Nothing else changes: MindSpore's
own ``comm_func.barrier`` and every other MindFormers module keep their bindings, and on Ascend/GPU, or in a
single-process run, it does nothing at all. Calling it again is harmless.
"""
import importlib

from mindformers.tools.logger import logger

__all__ = ["install_cpu_barrier", "cpu_barrier", "cpu_barrier_world", "should_install", "mindspore_barriers",
           "PATCHED_NAMES"]

# (MindFormers module, name it bound at import) -> our replacement's name; every binding of MindSpore's barrier
# (directly, or through mindformers.utils.parallel_utils.barrier_world) on run_training's checkpoint paths.
PATCHED_NAMES = (
    ("mindformers.trainer.utils", "barrier", "cpu_barrier"),                 # preload_ckpt (.ckpt finetune)
    ("mindformers.utils.load_checkpoint_utils", "barrier", "cpu_barrier"),   # safetensors loading
    ("mindformers.utils.load_checkpoint_utils", "barrier_world", "cpu_barrier_world"),  # HF conversion wait
    ("mindformers.tools.resume_ckpt", "barrier_world", "cpu_barrier_world"),  # resume from a folder
)


def mindspore_barriers() -> tuple:
    """MindSpore's barrier functions a MindFormers version may have bound under the name ``barrier``:
    ``communication.comm_func.barrier`` (MindFormers 1.9) and ``mint.distributed.barrier`` (2.1), where they exist."""
    found = []
    for module_name in ("mindspore.communication.comm_func", "mindspore.mint.distributed"):
        try:
            function = getattr(importlib.import_module(module_name), "barrier", None)
        except ImportError:
            function = None
        if function is not None:
            found.append(function)
    return tuple(found)


def cpu_barrier(group=None):
    """Block until every rank of ``group`` (default: the world group) has called this: an AllReduce-sum of a
    one-element tensor, read back to the host so it has completed; checks the sum equals the group size."""
    import numpy as np
    import mindspore as ms
    from mindspore import ops
    from mindspore.communication import GlobalComm, get_group_size

    group = group or GlobalComm.WORLD_COMM_GROUP
    total = ops.AllReduce(ops.ReduceOp.SUM, group)(ms.Tensor(np.ones((1,), np.float32))).asnumpy()
    size = get_group_size(group)
    if float(total[0]) != float(size):
        raise RuntimeError(f"CPU barrier over {group}: AllReduce gave {float(total[0])}, expected {size}")
    logger.info(f"CPU barrier over {group}: all {size} ranks arrived")


def cpu_barrier_world(action: str = None):
    """MindFormers' ``barrier_world`` (same logging, same single-rank shortcut) over ``cpu_barrier``."""
    from mindformers.tools.utils import get_real_group_size
    if get_real_group_size() > 1:
        logger.info("Wait " + str(action) if action is not None else "Now barriered...")
        cpu_barrier()


def should_install() -> bool:
    """True only for a CPU run whose communication is initialised (a distributed CPU run)."""
    import mindspore as ms
    from mindspore.communication import GlobalComm
    return ms.get_context("device_target") == "CPU" and bool(GlobalComm.INITED)


def install_cpu_barrier():
    """On a distributed CPU run, rebind PATCHED_NAMES to the AllReduce barrier; return the 'module.name' strings
    rebound ([] when not a distributed CPU run). A module that lacks the name (another MindFormers version) is
    skipped with a warning."""
    if not should_install():
        return []
    replacements = {"cpu_barrier": cpu_barrier, "cpu_barrier_world": cpu_barrier_world}
    patched = []
    for module_name, name, replacement in PATCHED_NAMES:
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            logger.warning(f"install_cpu_barrier: {module_name} has no {name}; left alone")
            continue
        setattr(module, name, replacements[replacement])
        patched.append(f"{module_name}.{name}")
    logger.info(f"CPU distributed run: MindSpore's Barrier has no CPU kernel; {', '.join(patched)} now wait on an "
                "AllReduce over the world group")
    return patched
