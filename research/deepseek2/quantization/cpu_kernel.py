"""The CPU kernels of ``cpu_kernel.cc`` as MindSpore ``Custom`` ops (func_type "aot"), graph and PyNative mode.

The shared library is built from the source on first use with the system's C++ compiler (``CXX``, default g++;
``-O3 -march=native -fopenmp``: AVX2 + FMA where the CPU has them, a plain loop elsewhere) into
``$DS2_KERNEL_CACHE`` (default ``~/.cache/deepseek2``), named by a hash of the source and flags, so a changed
source or another machine builds its own; concurrent builds (test workers) each write a private file and rename it.
A machine without a compiler gets a ``QuantizationError`` naming the compiler and the switch to turn off
(``use_weight_quant_kernel: False``: the basic-op path).
"""
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

from mindspore import ops
from mindspore.common import dtype as mstype

from research.deepseek2.errors import QuantizationError

__all__ = ["library", "weight_quant_matmul_op", "gathered_weight_quant_matmul_op", "SOURCE"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernel.cc")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


@functools.lru_cache(maxsize=None)
def library() -> str:
    """Path of the built shared library (built now if this source and these flags have none yet)."""
    compiler = os.environ.get("CXX", "g++")
    with open(SOURCE, "rb") as handle:
        digest = hashlib.sha256(handle.read() + " ".join((compiler,) + _FLAGS).encode()).hexdigest()[:16]
    cache = os.environ.get("DS2_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "deepseek2")
    path = os.path.join(cache, f"ds2_weight_quant_{digest}.so")
    if os.path.isfile(path):
        return path
    if shutil.which(compiler) is None:
        raise QuantizationError(f"use_weight_quant_kernel = True on CPU builds {SOURCE} with a C++ compiler: "
                                f"{compiler!r} (CXX) is not on PATH; install one or set use_weight_quant_kernel: "
                                f"False")
    os.makedirs(cache, exist_ok=True)
    handle, staged = tempfile.mkstemp(dir=cache, prefix=".build-", suffix=".so")
    os.close(handle)
    try:
        proc = subprocess.run([compiler, *_FLAGS, "-o", staged, SOURCE], capture_output=True, text=True,
                              check=False)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise QuantizationError(f"use_weight_quant_kernel = True: building {SOURCE} with {compiler} failed "
                                    f"({last}); set use_weight_quant_kernel: False")
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    return path


def _checked(op: str, bits: int, x, q, scale, experts: bool):
    """The kernel reads raw buffers: a shape it does not take is refused here, at graph build, naming the op, rather
    than read out of bounds (or divided by a zero group count) in C++."""
    rows = 2 if bits == 4 else 1                                  # int4: two output channels a stored row
    want_q, want_scale = (3, 3) if experts else (2, 2)
    ok = len(x) == 2 and len(q) == want_q and len(scale) == want_scale and x[1] == q[-1]
    ok = ok and scale[-2] == q[-2] * rows and scale[-1] > 0 and x[1] % scale[-1] == 0
    ok = ok and (not experts or q[0] == scale[0])
    if not ok:
        raise ValueError(f"{op} (int{bits}): x {list(x)}, weight {list(q)}, scale {list(scale)}: expected x (T, K), "
                         f"weight ({'E, ' if experts else ''}N{'/2' if bits == 4 else ''}, K) and scale "
                         f"({'E, ' if experts else ''}N, G) with G dividing K")


def weight_quant_matmul_op(bits: int):
    """Custom op (x (T, K) float32, q, scale (N, G) float32) -> (T, N) float32."""
    def out_shape(x, q, scale):
        _checked("WeightQuantMatmul", bits, x, q, scale, experts=False)
        return [x[0], scale[0]]
    return ops.Custom(f"{library()}:WeightQuantMatmul", out_shape=out_shape,
                      out_dtype=lambda x, q, scale: mstype.float32, func_type="aot")


def gathered_weight_quant_matmul_op(bits: int):
    """Custom op (x (T, K) float32, q (E, ., K), scale (E, N, G) float32, index (T,) int32) -> (T, N) float32."""
    def out_shape(x, q, scale, index):
        _checked("GatheredWeightQuantMatmul", bits, x, q, scale, experts=True)
        return [x[0], scale[1]]
    return ops.Custom(f"{library()}:GatheredWeightQuantMatmul", out_shape=out_shape,
                      out_dtype=lambda x, q, scale, index: mstype.float32, func_type="aot")
