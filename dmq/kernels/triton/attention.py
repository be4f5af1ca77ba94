"""8-bit attention (SageAttention2-style): int8 ``QKᵀ`` on integer tensor cores, online softmax in fp32 (exp2),
fp8 e4m3 ``P̃V`` with two-level fp32 accumulation. Non-causal, no mask; any head dim ≤ 256 (padded to a power of
two, at least 32); any sequence lengths (masked tails); separate query and key lengths (cross-attention).

Two launches. ``_quant_kernel`` quantizes Q, K (minus its smoothing vector, which every K block computes from the
same :data:`~dmq.kernels.reference.attention.K_SAMPLES` tokens) and V (one scale per channel: one program per
16 channels reads all tokens twice) in one 1-D grid into one int8 and one fp32 buffer, in the padded layout of
:func:`dmq.kernels.reference.attention.quantize_qkv` (bit for bit); ``_attn_kernel`` computes attention from them.
Under Triton's interpreter fp8 rounding goes through the integer encoder (:func:`dmq.kernels._common.encode_e4m3`,
the same bits as the hardware conversion), because in-kernel casts to fp8 are miscomputed there (triton#8322); on the
GPU it is the hardware cast. Reference: :mod:`dmq.kernels.reference.attention`.

Main loop per key tile (one K scale per tile; a score costs an integer add, a max, a subtraction, an FMA, an exp2):
``f = bits(qk + 0x4B400000)`` is ``1.5·2²³ + qk`` as fp32 (exact for |qk| < 2²², always true for int8 codes and
D ≤ 256): an integer add instead of an int→float conversion, which has a lower throughput than adds on NVIDIA GPUs
(not measured separately here); ``P̃·448 = exp2((f - 1.5·2²³)·c - (m - log2 448))``, ``c = q scale · k scale``;
V's per-channel scales are applied once to the output, so the accumulator update is one FMA per element.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dmq.kernels._common import (FLOAT16, FP8_CAPABILITY, bench_fn, capability, check, encode_e4m3, fixed_config,
                                interpreting, m_bucket, rcp, rint_small)
from dmq.kernels.reference import attention as _ref
from dmq.kernels.reference.attention import BLOCK_K, BLOCK_N, BLOCK_Q, K_SAMPLES, LOG2E, PAD, head_dim_padded

__all__ = ["QuantizedQKV", "CONFIGS", "prepare", "attend", "quantize_qkv", "int8_attention", "config_name",
           "tuned_config"]

MAX_HEAD_DIM = 256
P_SCALE = tl.constexpr(_ref.P_SCALE)  # a jit function may read a global only when it is a constexpr
LOG2_P = tl.constexpr(_ref.LOG2_P_SCALE)
MAGIC = tl.constexpr(12582912.0)      # 1.5 * 2**23: fp32 values in [2**23, 2**24) have integer steps
MAGIC_BITS = tl.constexpr(0x4B400000)  # its bit pattern
# The pre-pass tiling, swept on the H100 (FLUX 1×24×4608×128, PixArt-Σ 2×16×4096×72, SDXL 2×10×4096×64; codes are
# bit-identical for every tiling): 4 warps instead of 8 took FLUX from 0.085 to 0.061 ms and PixArt-Σ from 0.174 to
# 0.069 ms; 8 or 32 channels per V program and 512–2048 tokens per load were within 10 % of this choice at FLUX
# (benchmarks/attention_prepass.py).
V_CHANNELS = 16    # channels per V program (32-byte rows of 16-bit V; 8 programs per head at D = 128)
V_TOKENS = 1024    # tokens per V load (32 KB): fewer, larger loads for the two serial passes over the sequence
PREPASS_WARPS = 4


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn}, num_warps=warps, num_stages=stages)


# BN must divide BLOCK_K (one K scale per key tile) and BM must divide PAD. On the H100 the previous kernel chose
# 64×64, 4 warps, 3 stages at FLUX (several CTAs per SM overlap one CTA's softmax with another's MMAs); the larger
# tiles halve the per-tile work (row max, rescale) per score and need fewer CTAs. (128 x 64 with 4 warps spilled
# registers on sm_90 at head dim 128, `python benchmarks/aot_report.py`, and was never chosen in
# benchmarks/results/attention-h100.json: dropped.)
CONFIGS = [_cfg(64, 64, 4, 3), _cfg(64, 64, 4, 4), _cfg(64, 128, 4, 2), _cfg(64, 128, 4, 3), _cfg(128, 64, 8, 3),
           _cfg(128, 128, 8, 2), _cfg(128, 128, 8, 3)]
_FIXED = _cfg(64, BLOCK_N, 4, 1)


def config_name(cfg: triton.Config) -> str:
    """``BM=128,BN=64,w8,s3``."""
    return ",".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f",w{cfg.num_warps},s{cfg.num_stages}"


# -- quantization pre-kernel ---------------------------------------------------------------------------------------
@triton.jit
def _store_int8_block(x, c_ptrs, s_ptr):
    """A block of fp32 values → int8 codes at ``c_ptrs`` and one scale (amax / 127) at ``s_ptr``."""
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    s = tl.math.div_rn(amax, 127.0)
    tl.store(s_ptr, s)
    y = x * rcp(tl.where(s > 0, s, 1.0))
    tl.store(c_ptrs, rint_small(tl.minimum(tl.maximum(y, -127.0), 127.0)).to(tl.int8))


@triton.jit
def _quant_q(x_ptr, c_ptr, s_ptr, j, NQ, NQP, H, stride_b, stride_h, stride_n, qk_scale,
             D: tl.constexpr, DP: tl.constexpr, BQ: tl.constexpr):
    """Q block ``j`` (of BQ tokens, over all heads) times ``qk_scale`` → int8 codes, one scale."""
    nb = NQP // BQ
    bh = j // nb
    rn = (j % nb) * BQ + tl.arange(0, BQ)
    rd = tl.arange(0, DP)
    valid = (rn[:, None] < NQ) & (rd[None, :] < D)
    base = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    x = tl.load(base + rn[:, None] * stride_n + rd[None, :], mask=valid, other=0.0).to(tl.float32) * qk_scale
    _store_int8_block(x, c_ptr + bh.to(tl.int64) * NQP * DP + rn[:, None] * DP + rd[None, :], s_ptr + j)


@triton.jit
def _quant_k(x_ptr, c_ptr, s_ptr, j, NK, NKP, H, stride_b, stride_h, stride_n,
             D: tl.constexpr, DP: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr):
    """K block ``j`` minus the head's smoothing vector (the same KS sampled tokens, summed in order) → int8."""
    nb = NKP // BK
    bh = j // nb
    rn = (j % nb) * BK + tl.arange(0, BK)
    rd = tl.arange(0, DP)
    base = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    mu = tl.zeros((DP,), tl.float32)
    for i in tl.static_range(KS):
        mu += tl.load(base + (i * NK // KS) * stride_n + rd, mask=rd < D, other=0.0).to(tl.float32)
    mu = mu * (1.0 / KS)
    valid = (rn[:, None] < NK) & (rd[None, :] < D)
    x = tl.load(base + rn[:, None] * stride_n + rd[None, :], mask=valid, other=0.0).to(tl.float32)
    x = tl.where(valid, x - mu[None, :], 0.0)
    _store_int8_block(x, c_ptr + bh.to(tl.int64) * NKP * DP + rn[:, None] * DP + rd[None, :], s_ptr + j)


@triton.jit
def _quant_v(x_ptr, c_ptr, c8_ptr, s_ptr, j, NK, NKP, H, stride_b, stride_h, stride_n,
             D: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, TV: tl.constexpr, INT_ENCODE: tl.constexpr):
    """DC channels of one head of V: amax over all tokens (one pass), then fp8 codes stored transposed
    (tokens contiguous, a second pass that mostly hits L2)."""
    nc = DP // DC
    bh = j // nc
    rc = (j % nc) * DC + tl.arange(0, DC)
    base = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h + rc[:, None]
    amax = tl.zeros((DC,), tl.float32)
    for t in range(0, NK, TV):
        rn = t + tl.arange(0, TV)
        x = tl.load(base + rn[None, :] * stride_n, mask=(rn[None, :] < NK) & (rc[:, None] < D), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    s = tl.math.div_rn(amax, P_SCALE)
    tl.store(s_ptr + bh * DP + rc, s)
    inv = rcp(tl.where(s > 0, s, 1.0))
    out = bh.to(tl.int64) * DP * NKP + rc[:, None] * NKP
    for t in range(0, NKP, TV):
        rn = t + tl.arange(0, TV)
        x = tl.load(base + rn[None, :] * stride_n, mask=(rn[None, :] < NK) & (rc[:, None] < D), other=0.0)
        y = tl.minimum(tl.maximum(x.to(tl.float32) * inv[:, None], -P_SCALE), P_SCALE)
        if INT_ENCODE:
            tl.store(c_ptr + out + rn[None, :], encode_e4m3(y).to(tl.int8), mask=rn[None, :] < NKP)
        else:
            tl.store(c8_ptr + out + rn[None, :], y.to(tl.float8e4nv), mask=rn[None, :] < NKP)


@triton.jit(do_not_specialize=["NQ", "NK", "BH", "H"])
def _quant_kernel(q_ptr, k_ptr, v_ptr, c_ptr, c8_ptr, s_ptr, NQ, NK, NQP, NKP, BH, H, qk_scale,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                  D: tl.constexpr, DP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr,
                  DC: tl.constexpr, TV: tl.constexpr, INT_ENCODE: tl.constexpr):
    """1-D grid: the V programs (longest, so they start first), then the K blocks, then the Q blocks."""
    pid = tl.program_id(0)
    n_v = BH * (DP // DC)
    n_k = BH * (NKP // BK)
    kc_off = (BH * NQP).to(tl.int64) * DP
    vt_off = (BH * (NQP + NKP)).to(tl.int64) * DP
    sk_off = BH * (NQP // BQ)
    if pid < n_v:
        _quant_v(v_ptr, c_ptr + vt_off, c8_ptr + vt_off, s_ptr + sk_off + BH * (NKP // BK), pid, NK, NKP, H,
                 svb, svh, svn, D, DP, DC, TV, INT_ENCODE)
    elif pid < n_v + n_k:
        _quant_k(k_ptr, c_ptr + kc_off, s_ptr + sk_off, pid - n_v, NK, NKP, H, skb, skh, skn, D, DP, BK, KS)
    else:
        _quant_q(q_ptr, c_ptr, s_ptr, pid - n_v - n_k, NQ, NQP, H, sqb, sqh, sqn, qk_scale, D, DP, BQ)


# -- attention kernel ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_step(acc, m_i, l_i, q, cq, k_ptrs, vt_ptrs, sk, start, NK,
               MASK: tl.constexpr, P_INT_ENCODE: tl.constexpr, BN: tl.constexpr):
    """One key tile: scores ``(q·kᵀ)·cq·sk``, online softmax, fp8 ``P̃·V`` into a fresh accumulator."""
    k = tl.load(k_ptrs)
    f = (tl.dot(q, tl.trans(k)) + MAGIC_BITS).to(tl.float32, bitcast=True)   # MAGIC + qk, exactly
    c = cq * sk
    if MASK:
        valid = (start + tl.arange(0, BN))[None, :] < NK
        f = tl.where(valid, f, 0.0)   # below every MAGIC + qk (> 2**22): ignored by the row max
    m_new = tl.maximum(m_i, (tl.max(f, axis=1) - MAGIC) * c)
    # P̃·448 = exp2(qk·c - (m - log2 448)): a subtraction and one FMA per score. Folding MAGIC·c into the FMA's
    # addend would save the subtraction but round the exponent at MAGIC·c's scale (~1e-3): the fp8 rounding of P̃
    # then differs from the reference's for ~1% of the scores.
    p = tl.math.exp2((f - MAGIC) * c[:, None] - (m_new - LOG2_P)[:, None])
    if MASK:
        p = tl.where(valid, p, 0.0)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if P_INT_ENCODE:
        p8 = encode_e4m3(tl.minimum(p, P_SCALE)).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        p8 = p.to(tl.float8e4nv)   # saturating: the row max may come out a few ulps above 448
    vt = tl.load(vt_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(vt))   # fresh fp32 MMA accumulator per tile (two-level)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["NQ", "NK", "BH", "H", "D", "NQ_BUCKET", "NK_BUCKET"])
def _attn_kernel(c_ptr, c8_ptr, s_ptr, o_ptr, NQ, NK, NQP, NKP, BH, H, D, NQ_BUCKET, NK_BUCKET, sob, soh, son,
                 DP: tl.constexpr, P_INT_ENCODE: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, DP)
    rn = tl.arange(0, BN)
    q = tl.load(c_ptr + bh.to(tl.int64) * NQP * DP + rm[:, None] * DP + rd[None, :])
    cq = tl.load(s_ptr + bh * (NQP // BQ) + rm // BQ)
    k_ptrs = c_ptr + (BH * NQP + bh * NKP).to(tl.int64) * DP + rn[:, None] * DP + rd[None, :]
    vt_ptrs = c8_ptr + (BH * (NQP + NKP) + bh * NKP).to(tl.int64) * DP + rd[:, None] * NKP + rn[None, :]
    sk_ptr = s_ptr + BH * (NQP // BQ) + bh * (NKP // BK)
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DP), tl.float32)
    n_full = (NK // BN) * BN
    for start in range(0, n_full, BN):
        acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, cq, k_ptrs + start * DP, vt_ptrs + start,
                                   tl.load(sk_ptr + start // BK), start, NK, False, P_INT_ENCODE, BN)
    if n_full < NK:
        acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, cq, k_ptrs + n_full * DP, vt_ptrs + n_full,
                                   tl.load(sk_ptr + n_full // BK), n_full, NK, True, P_INT_ENCODE, BN)
    sv = tl.load(s_ptr + BH * (NQP // BQ + NKP // BK) + bh * DP + rd)
    o = acc * sv[None, :] / l_i[:, None]
    b = bh // H
    h = bh % H
    tl.store(o_ptr + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rm[:, None] * son + rd[None, :],
             o.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < NQ) & (rd[None, :] < D))


_attn_tuned = triton.autotune(CONFIGS, key=["NQ_BUCKET", "NK_BUCKET", "DP"], do_bench=bench_fn)(_attn_kernel)


def tuned_config() -> triton.Config | None:
    """The config the autotuner chose for the latest tuned launch (None before any)."""
    return getattr(_attn_tuned, "best_config", None)


# -- launchers -----------------------------------------------------------------------------------------------------
class QuantizedQKV(NamedTuple):
    """Output of :func:`prepare`. ``codes`` int8, flat: Q codes ``(BH, Nqp, Dp)``, K codes ``(BH, Nkp, Dp)``, V fp8
    codes transposed ``(BH, Dp, Nkp)``; ``scales`` fp32, flat: Q ``(BH, Nqp/BLOCK_Q)``, K ``(BH, Nkp/BLOCK_K)``,
    V ``(BH, Dp)`` (the layout of :func:`dmq.kernels.reference.attention.quantize_qkv`, see :func:`quantize_qkv`)."""
    codes: torch.Tensor
    scales: torch.Tensor
    q_shape: torch.Size   # (B, H, Nq, D)
    nk: int
    nqp: int
    nkp: int
    dp: int


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be (B, H, N, D)")
    check(q.dtype in FLOAT16 and k.dtype == q.dtype and v.dtype == q.dtype,
          f"q, k, v must share one 16-bit dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check(q.device == k.device == v.device, "q, k, v must be on one device")
    b, h, nq, d = q.shape
    check(k.shape[:2] == (b, h) and k.shape[3] == d and v.shape == k.shape,
          f"k and v must be (B, H, Nk, D) matching q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    check(nq >= 1 and k.shape[2] >= 1, "sequence lengths must be at least 1")
    check(1 <= d <= MAX_HEAD_DIM, f"head dim must be at most {MAX_HEAD_DIM}, got {d}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(t.stride(3) == 1, f"{name} must be contiguous along the head dim")


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_scale: float) -> QuantizedQKV:
    """The quantization pre-pass (one launch, two allocations) on checked inputs: q ``(B, H, Nq, D)``, k / v
    ``(B, H, Nk, D)``, 16-bit, contiguous along D; qk_scale: the softmax scale times log2 e."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    nqp, nkp, dp = -(-nq // PAD) * PAD, -(-nk // PAD) * PAD, head_dim_padded(d)
    bh = b * h
    codes = torch.empty(bh * dp * (nqp + 2 * nkp), dtype=torch.int8, device=q.device)
    scales = torch.empty(bh * (nqp // BLOCK_Q + nkp // BLOCK_K + dp), dtype=torch.float32, device=q.device)
    grid = (bh * (dp // V_CHANNELS + nkp // BLOCK_K + nqp // BLOCK_Q),)
    _quant_kernel[grid](q, k, v, codes, codes.view(torch.float8_e4m3fn), scales, nq, nk, nqp, nkp, bh, h, qk_scale,
                        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                        v.stride(0), v.stride(1), v.stride(2),
                        D=d, DP=dp, BQ=BLOCK_Q, BK=BLOCK_K, KS=K_SAMPLES, DC=V_CHANNELS, TV=V_TOKENS,
                        INT_ENCODE=interpreting(), num_warps=PREPASS_WARPS)
    return QuantizedQKV(codes, scales, q.shape, nk, nqp, nkp, dp)


def attend(qkv: QuantizedQKV, out_dtype: torch.dtype, config: triton.Config | None = None) -> torch.Tensor:
    """The attention kernel alone on the output of :func:`prepare` → ``(B, H, Nq, D)`` in ``out_dtype``. config: one
    of :data:`CONFIGS` to launch instead of the autotuned choice (for timing sweeps)."""
    codes, scales, (b, h, nq, d), nk, nqp, nkp, dp = qkv
    o = torch.empty((b, h, nq, d), dtype=out_dtype, device=codes.device)
    args = (codes, codes.view(torch.float8_e4m3fn), scales, o, nq, nk, nqp, nkp, b * h, h, d, m_bucket(nq),
            m_bucket(nk), o.stride(0), o.stride(1), o.stride(2))
    consts = dict(DP=dp, P_INT_ENCODE=interpreting(), BQ=BLOCK_Q, BK=BLOCK_K)
    if config is None and not fixed_config():
        _attn_tuned[lambda meta: (nqp // meta["BM"], b * h)](*args, **consts)
    else:
        cfg = _FIXED if config is None else config
        _attn_kernel[(nqp // cfg.kwargs["BM"], b * h)](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps,
                                                       num_stages=cfg.num_stages)
    return o


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_scale: float) -> tuple[torch.Tensor, ...]:
    """Triton pre-pass; same signature (without ``k_smooth``) and outputs as
    :func:`dmq.kernels.reference.attention.quantize_qkv` (views of :func:`prepare`'s buffers)."""
    _check_qkv(q, k, v)
    codes, scales, (b, h, _, _), _, nqp, nkp, dp = prepare(q, k, v, qk_scale)
    bh = b * h
    n_q, n_k = bh * nqp * dp, bh * nkp * dp
    s_q, s_k = bh * (nqp // BLOCK_Q), bh * (nkp // BLOCK_K)
    return (codes[:n_q].view(bh, nqp, dp), scales[:s_q].view(bh, -1), codes[n_q:n_q + n_k].view(bh, nkp, dp),
            scales[s_q:s_q + s_k].view(bh, -1), codes[n_q + n_k:].view(bh, dp, nkp).view(torch.float8_e4m3fn),
            scales[s_q + s_k:].view(bh, dp))


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Triton launcher; same signature as :func:`dmq.kernels.reference.attention.int8_attention`: q ``(B, H, Nq, D)``,
    k / v ``(B, H, Nk, D)``, 16-bit, contiguous along D (other strides free) → ``(B, H, Nq, D)`` in q's dtype."""
    _check_qkv(q, k, v)
    cap = capability(q)
    check(cap is None or cap >= FP8_CAPABILITY,
          lambda: f"the 8-bit attention kernel needs fp8 tensor cores (compute capability ≥ 8.9), {q.device} has "
                  f"{cap[0]}.{cap[1]}: use the reference (dmq.kernels.reference.attention) or PyTorch's SDPA")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    return attend(prepare(q, k, v, scale * LOG2E), q.dtype)
