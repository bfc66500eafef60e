"""The CPU kernels of ``cpu_kernel.cc`` as MindSpore ``Custom`` ops (func_type "aot"), graph and PyNative mode:
the weight-quantized products, and the bfloat16 weights' product and row gather (MindSpore's CPU MatMul and Gather
have no bfloat16 kernel: without these a bfloat16 float part is a float32 copy on a CPU).

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

import mindspore as ms
from mindspore import ops
from mindspore.common import dtype as mstype

from research.deepseek2.errors import QuantizationError

__all__ = ["library", "weight_quant_matmul_op", "gathered_weight_quant_matmul_op", "runs_bf16_weights",
           "bf16_matmul_op", "bf16_gather_op", "latent_query_op", "latent_value_op", "SOURCE"]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernel.cc")

# OMP_WAIT_POLICY: the kernels run their loops on OpenMP threads, which by default spin for a while after a product
# waiting for the next one; MindSpore runs the graph's other ops meanwhile on threads of its own, and on a machine
# with few cores a spinning thread takes a core from each of them (docs/benchmarks.md: a V2-Lite decode step's
# other ops took 170 ms instead of 35). PASSIVE makes them sleep. The OpenMP runtime reads it once, when MindSpore
# loads it, so it must be in the environment before ``import mindspore`` (run_mindformer.py sets it): ``library``
# warns once when it is not.
WAIT_POLICY = "OMP_WAIT_POLICY"
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


@functools.lru_cache(maxsize=None)
def library() -> str:
    """Path of the built shared library (built now if this source and these flags have none yet)."""
    compiler = os.environ.get("CXX", "g++")
    with open(SOURCE, "rb") as handle:
        digest = hashlib.sha256(handle.read() + " ".join((compiler,) + _FLAGS).encode()).hexdigest()[:16]
    cache = os.environ.get("DS2_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "deepseek2")
    path = os.path.join(cache, f"ds2_weight_quant_{digest}.so")
    if WAIT_POLICY not in os.environ:
        from mindformers.tools.logger import logger
        logger.warning(f"{WAIT_POLICY} is not set: the CPU kernel's OpenMP threads spin between products and slow "
                       f"the graph's other ops where cores are few; set {WAIT_POLICY}=PASSIVE before Python starts "
                       f"(run_mindformer.py does)")
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


def runs_bf16_weights(param_dtype) -> bool:
    """Whether a float weight of ``param_dtype`` is multiplied / gathered by this module's kernels: bfloat16 on a CPU
    (the context's device_target), where MindSpore has no bfloat16 MatMul or Gather."""
    return param_dtype == mstype.bfloat16 and ms.get_context("device_target") == "CPU"


def _bf16_matmul_bprop(x, w, out, dout):
    """Basic ops (training is not what the kernel is for): dx = dout w, dw = dout^T x in w's dtype."""
    dx = ops.matmul(dout, ops.cast(w, mstype.float32))                                   # (T, K)
    dw = ops.cast(ops.matmul(ops.transpose(dout, (1, 0)), x), w.dtype)                   # (N, K)
    return dx, dw


def _bf16_gather_bprop(w, ids, out, dout):
    """dw: each row's gradient summed over the tokens that read it, in w's dtype; ids take none."""
    rows = ops.reshape(dout, (-1, w.shape[1]))                                           # (T, H)
    dw = ops.unsorted_segment_sum(rows, ops.reshape(ids, (-1,)), w.shape[0])
    return ops.cast(dw, w.dtype), ops.zeros_like(ids)


def bf16_matmul_op():
    """Custom op (x (T, K) float32, w (N, K) bfloat16) -> x w^T (T, N) float32, accumulated in float32."""
    def out_shape(x, w):
        if len(x) != 2 or len(w) != 2 or x[1] != w[1]:
            raise ValueError(f"Bf16Matmul: x {list(x)}, weight {list(w)}: expected x (T, K) and weight (N, K)")
        return [x[0], w[0]]
    return ops.Custom(f"{library()}:Bf16Matmul", out_shape=out_shape, out_dtype=lambda x, w: mstype.float32,
                      func_type="aot", bprop=_bf16_matmul_bprop)


def bf16_gather_op():
    """Custom op (w (V, H) bfloat16, ids (...) int32) -> rows (..., H) float32 (exact: a widening)."""
    def out_shape(w, ids):
        if len(w) != 2:
            raise ValueError(f"Bf16Gather: table {list(w)}: expected (V, H)")
        return list(ids) + [w[1]]
    return ops.Custom(f"{library()}:Bf16Gather", out_shape=out_shape, out_dtype=lambda w, ids: mstype.float32,
                      func_type="aot", bprop=_bf16_gather_bprop)


def _latent_checked(op: str, x, w, head_rows: int, width=None):
    """x (n, T, .) against kv_b_proj's weight (n (D + V), R); head_rows: the rows of a head the op reads (D or V),
    fewer than the D + V a head holds; width: R where x's last axis must be it. Refused here, naming the op, rather
    than read out of bounds in C++."""
    ok = len(x) == 3 and len(w) == 2 and w[0] % x[0] == 0 and w[0] // x[0] > head_rows
    if not ok or (width is not None and w[1] != width):
        raise ValueError(f"{op}: x {list(x)}, weight {list(w)}: expected x (n, T, .) and kv_b_proj's weight "
                         f"(n * (qk_nope_head_dim + v_head_dim), kv_lora_rank)")


def latent_query_op():
    """Custom op (q_nope (n, T, D) float32, w (n (D + V), R) float32 / bfloat16) -> q_nope W^UK (n, T, R) float32:
    MLA's query absorbed into the latent space, the weight read in place."""
    def out_shape(q, w):
        _latent_checked("LatentQuery", q, w, q[2])
        return [q[0], q[1], w[1]]
    return ops.Custom(f"{library()}:LatentQuery", out_shape=out_shape, out_dtype=lambda q, w: mstype.float32,
                      func_type="aot")


def latent_value_op(v_dim: int):
    """Custom op (o_latent (n, T, R) float32, w (n (D + V), R)) -> o_latent W^UV^T (n, T, V) float32, V = v_dim."""
    def out_shape(o, w):
        _latent_checked("LatentValue", o, w, v_dim, width=o[2] if len(o) == 3 else None)
        return [o[0], o[1], v_dim]
    return ops.Custom(f"{library()}:LatentValue", out_shape=out_shape, out_dtype=lambda o, w: mstype.float32,
                      func_type="aot")
