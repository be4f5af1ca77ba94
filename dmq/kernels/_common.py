"""Helpers shared by the Triton kernels: interpreter detection, M buckets, input checks and small @triton.jit
routines (exact rounding and fp8 / fp4 encoders written with integer operations, so that they compute the same bits
on a GPU and in Triton's CPU interpreter, where in-kernel casts to fp8 / bf16 are miscomputed)."""

from __future__ import annotations

import os
from typing import Callable

import torch

try:  # Triton is optional: the references work without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "interpreting", "fixed_config", "next_pow2", "m_bucket", "check", "fold_down", "FLOAT16",
           "tl_dtype", "bench_fn", "capability", "FP8_CAPABILITY"]

FLOAT16 = (torch.float16, torch.bfloat16)

# The compute capability of a compile-only session (:func:`dmq.kernels.aot.compile_only`), None outside one.
COMPILE_ONLY_TARGET: tuple[int, int] | None = None
_CAPABILITY: dict[int, tuple[int, int]] = {}
# fp8 tensor cores (Ada, Hopper): torch._scaled_mm and the 8-bit attention's fp8 PV product need them; on older GPUs
# fp8 layers run their reference and attention PyTorch's SDPA (found by compiling for sm_80 on a CPU,
# benchmarks/aot_report.py --arch 8.0)
FP8_CAPABILITY = (8, 9)


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``, the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def capability(t: torch.Tensor) -> tuple[int, int] | None:
    """The compute capability the kernels run on for tensor ``t``: its GPU's, or, inside
    :func:`dmq.kernels.aot.compile_only`, the target compiled for (tensors on the CPU there); None otherwise."""
    if COMPILE_ONLY_TARGET is not None:
        return COMPILE_ONLY_TARGET
    if not t.is_cuda:
        return None
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(idx)
    if cap is None:   # cached: the launchers run ~1,300 times per FLUX step
        cap = _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return cap


def fixed_config() -> bool:
    """Bypass autotuning and launch one fixed small config: under the interpreter (where autotuning crashes) and
    with ``DMQ_KERNELS_NO_AUTOTUNE=1`` (quick GPU correctness checks)."""
    return interpreting() or os.environ.get("DMQ_KERNELS_NO_AUTOTUNE", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def m_bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two, capped at 8192 (a raw M would re-tune on every new
    sequence length)."""
    return min(next_pow2(m), 8192)


def fold_down(smooth: torch.Tensor | None, proj_down: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``proj_down (K, R) / smooth`` in fp32, rounded once to ``dtype``: ``x · fold_down(...)`` is the kernel
    path's low-rank branch input ``(x / smooth) · proj_down`` as one GEMM on x as it is. smooth: ``(C,)`` with C
    dividing K, repeated along K (a convolution's ``K = (kh, kw, C)``; C = K for a linear)."""
    pd = proj_down.float()
    if smooth is not None:
        k, r = pd.shape
        pd = (pd.reshape(k // smooth.numel(), smooth.numel(), r) / smooth.float()[:, None]).reshape(k, r)
    return pd.to(dtype)


def check(cond: bool, msg: str | Callable[[], str]) -> None:
    """Input validation that survives ``python -O`` (unlike assert). ``msg`` may be a function that builds the
    message only on failure: the launchers run ~1,300 times per FLUX step, and formatting their messages eagerly was
    a visible part of the host time (benchmarks/results/host-profile-h100.json)."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def bench_fn(fn, quantiles):
    """Short timing for the autotuner (the default 25 ms warm-up / 100 ms per config adds minutes over many keys).
    Inside :func:`dmq.kernels.aot.compile_only`, calls ``fn`` once (which records the config's launch) and returns
    zeros."""
    if COMPILE_ONLY_TARGET is not None:
        fn()
        return [0.0] * len(quantiles) if quantiles else 0.0
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


if HAS_TRITON:
    _TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

    def tl_dtype(dtype: torch.dtype):
        return _TL[dtype]

    @triton.jit
    def rint_small(y):
        """Round fp32 to the nearest integer, ties to even, for |y| < 2**22 (the magic-number trick: adding
        1.5 * 2**23 leaves no fraction bits, and IEEE addition rounds half to even)."""
        return (y + 12582912.0) - 12582912.0

    @triton.jit
    def small_int_f32(u, offset: tl.constexpr):
        """int32 ``u`` in [0, 2**23) → fp32 ``u - offset``, exact, with integer/fp32 ALU operations only: OR-ing u
        into the mantissa of 2**23 gives 2**23 + u, instead of an int→float conversion: an MMA GEMV decoding int4
        weights this way took 30 instead of 45 µs at 1×3072×18432 on the H100 (benchmarks/gemv_variants.py)."""
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)

    @triton.jit
    def rcp(s):
        """Correctly rounded fp32 ``1 / s`` (s > 0): codes are ``x · (1 / scale)`` (:func:`dmq.formats.quantize`),
        one IEEE division per scale and one multiply per element."""
        return tl.math.div_rn(tl.zeros_like(s) + 1.0, s)

    @triton.jit
    def encode_e4m3(y):
        """fp32 values already clamped to [-448, 448] → fp8 e4m3fn bit patterns (int32 in [0, 255]), rounded to
        nearest with ties to even, subnormals included; the same bits as ``y.to(torch.float8_e4m3fn)``."""
        bits = y.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = tl.abs(y)
        abits = a.to(tl.int32, bitcast=True)
        normal = ((abits + 0x7FFFF + ((abits >> 20) & 1)) >> 20) - (120 << 3)
        sub = rint_small(a * 512.0).to(tl.int32)
        code = tl.where(a < 0.015625, sub, normal)
        return code | sign

    @triton.jit
    def decode_e4m3(code):
        """fp8 e4m3fn bit patterns (int32 in [0, 255]) → fp32 (finite codes only)."""
        mag = code & 0x7F
        e = mag >> 3
        m = (mag & 7).to(tl.float32)
        sub = m * 0.001953125
        nbits = ((e + 120) << 23) | ((mag & 7) << 20)
        normal = nbits.to(tl.float32, bitcast=True)
        v = tl.where(e == 0, sub, normal)
        return tl.where((code & 0x80) != 0, -v, v)

    @triton.jit
    def encode_e2m1(y):
        """fp32 values (already divided by their scale) → fp4 e2m1 nibbles (int32 in [0, 15]); the same rounding
        as :func:`dmq.formats.fp4_encode` (nearest, ties to the even code, saturating at ±6, no negative zero)."""
        a = tl.abs(y)
        mag = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) \
            + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) \
            + (a > 5.0).to(tl.int32)
        sign = (y < 0).to(tl.int32) << 3
        return tl.where(mag == 0, 0, sign | mag)

    @triton.jit
    def decode_e2m1(nib):
        """fp4 e2m1 nibbles (int32 in [0, 15]) → fp32, with integer operations only."""
        mag = nib & 7
        e = mag >> 1
        m = (mag & 1).to(tl.float32)
        # e == 0: 0 or 0.5; e >= 1: 2**(e-1) * (1 + m/2)
        pow2 = (1 << tl.maximum(e - 1, 0)).to(tl.float32)
        v = tl.where(e == 0, m * 0.5, pow2 * (1.0 + 0.5 * m))
        return tl.where((nib & 8) != 0, -v, v)
else:  # pragma: no cover
    def tl_dtype(dtype):
        raise RuntimeError("triton is not installed")
