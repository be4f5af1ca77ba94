"""8-bit attention (SageAttention2-style): int8 ``QKᵀ`` on integer tensor cores, online softmax in fp32 (exp2),
fp8 e4m3 ``P̃V`` with two-level fp32 accumulation. Non-causal, no mask; any head dim ≤ 256 (padded to a power of
two, at least 32); any sequence lengths (masked tails); separate query and key lengths (cross-attention).

Two launches: ``_quant_kernel`` quantizes Q, K (minus its mean over tokens, computed by PyTorch) and V in one grid
into the padded layout of :func:`dmq.kernels.reference.attention.quantize_qkv` (bit for bit), then ``_attn_kernel``
computes attention from the codes. Under Triton's interpreter the fp8 rounding of ``P̃`` goes through the integer
encoder (:func:`dmq.kernels._common.encode_e4m3`, the same bits as the hardware conversion), because in-kernel
casts to fp8 are miscomputed there (triton#8322); on the GPU it is the hardware cast. Reference:
:mod:`dmq.kernels.reference.attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dmq.kernels._common import FLOAT16, bench_fn, check, encode_e4m3, fixed_config, interpreting, m_bucket, rint_small
from dmq.kernels.reference import attention as _ref
from dmq.kernels.reference.attention import BLOCK_K, BLOCK_N, BLOCK_Q, BLOCK_V, LOG2E, PAD, head_dim_padded

__all__ = ["quantize_qkv", "attend_codes", "int8_attention"]

MAX_HEAD_DIM = 256
P_SCALE = tl.constexpr(_ref.P_SCALE)  # a jit function may read a global only when it is a constexpr


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn}, num_warps=warps, num_stages=stages)


# BN must divide BLOCK_V (one V scale row per key block) and be a multiple of BLOCK_K; BM must divide PAD.
_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3)]
_FIXED = _cfg(64, BLOCK_N, 4, 1)


# -- quantization pre-kernel ---------------------------------------------------------------------------------------
@triton.jit
def _quant_int8_block(x_ptr, c_ptr, s_ptr, mean_ptr, pid, bh, n_valid, NP, H, stride_b, stride_h, stride_n, mul,
                      D: tl.constexpr, DP: tl.constexpr, BLK: tl.constexpr, SUB_MEAN: tl.constexpr):
    """One block of BLK tokens of Q (times ``mul``) or K (minus its mean) → int8 codes and one fp32 scale."""
    rn = pid * BLK + tl.arange(0, BLK)
    rd = tl.arange(0, DP)
    valid = (rn[:, None] < n_valid) & (rd[None, :] < D)
    b = bh // H
    h = bh % H
    x = tl.load(x_ptr + b * stride_b + h * stride_h + rn[:, None] * stride_n + rd[None, :], mask=valid,
                other=0.0).to(tl.float32)
    if SUB_MEAN:
        km = tl.load(mean_ptr + bh * D + rd, mask=rd < D, other=0.0)
        x = tl.where(valid, x - km[None, :], 0.0)
    else:
        x = x * mul
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    s = tl.math.div_rn(amax, 127.0)
    tl.store(s_ptr + bh * (NP // BLK) + pid, s)
    y = tl.math.div_rn(x, tl.where(s > 0, s, 1.0))
    q = rint_small(tl.minimum(tl.maximum(y, -127.0), 127.0))
    tl.store(c_ptr + bh * NP * DP + rn[:, None] * DP + rd[None, :], q.to(tl.int8))


@triton.jit
def _quant_kernel(q_ptr, k_ptr, v_ptr, km_ptr, qc_ptr, sq_ptr, kc_ptr, sk_ptr, vt_ptr, sv_ptr,
                  NQ, NK, NQP, NKP, H, qk_scale,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                  D: tl.constexpr, DP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Grid (blocks of 64 tokens over the longer padded length, B·H, 3): axis 2 picks Q, K or V."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    which = tl.program_id(2)
    if which == 0:
        if pid * BQ < NQP:
            _quant_int8_block(q_ptr, qc_ptr, sq_ptr, km_ptr, pid, bh, NQ, NQP, H, sqb, sqh, sqn, qk_scale,
                              D, DP, BQ, False)
    elif which == 1:
        if pid * BK < NKP:
            _quant_int8_block(k_ptr, kc_ptr, sk_ptr, km_ptr, pid, bh, NK, NKP, H, skb, skh, skn, 1.0,
                              D, DP, BK, True)
    else:
        if pid * BV < NKP:
            rn = pid * BV + tl.arange(0, BV)
            rd = tl.arange(0, DP)
            b = bh // H
            h = bh % H
            valid = (rn[None, :] < NK) & (rd[:, None] < D)
            # loaded transposed, (DP, BV): the codes are stored with tokens contiguous
            x = tl.load(v_ptr + b * svb + h * svh + rn[None, :] * svn + rd[:, None], mask=valid,
                        other=0.0).to(tl.float32)
            s = tl.math.div_rn(tl.max(tl.abs(x), axis=1), P_SCALE)
            tl.store(sv_ptr + (bh * (NKP // BV) + pid) * DP + rd, s)
            y = tl.math.div_rn(x, tl.where(s > 0, s, 1.0)[:, None])
            code = encode_e4m3(tl.minimum(tl.maximum(y, -P_SCALE), P_SCALE))
            tl.store(vt_ptr + bh * DP * NKP + rd[:, None] * NKP + rn[None, :], code.to(tl.uint8))


# -- attention kernel ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_step(acc, m_i, l_i, q, sq, k_ptrs, vt_ptrs, sk_ptr, sv_ptr, start, NK,
               MASK: tl.constexpr, P_INT_ENCODE: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr):
    """One key block: ``s = (q·kᵀ)·sq·sk``, online softmax, fp8 ``P̃·V`` into a fresh accumulator."""
    rn = start + tl.arange(0, BN)
    k = tl.load(k_ptrs)
    sk = tl.load(sk_ptr + rn // BK)
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * sq[:, None] * sk[None, :]
    if MASK:
        s = tl.where(rn[None, :] < NK, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if P_INT_ENCODE:
        p8 = encode_e4m3(p * P_SCALE).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        p8 = (p * P_SCALE).to(tl.float8e4nv)
    vt = tl.load(vt_ptrs)
    pv = tl.dot(p8, tl.trans(vt))   # fresh fp32 accumulator per key block (two-level accumulation)
    sv = tl.load(sv_ptr + (start // BV) * DP + tl.arange(0, DP))
    acc = acc * alpha[:, None] + pv * sv[None, :]
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["NQ", "NK", "NQ_BUCKET", "NK_BUCKET"])
def _attn_kernel(qc_ptr, sq_ptr, kc_ptr, sk_ptr, vt_ptr, sv_ptr, o_ptr,
                 NQ, NK, NQP, NKP, H, NQ_BUCKET, NK_BUCKET, sob, soh, son,
                 D: tl.constexpr, DP: tl.constexpr, P_INT_ENCODE: tl.constexpr, BQ: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, DP)
    rn = tl.arange(0, BN)
    q = tl.load(qc_ptr + bh * NQP * DP + rm[:, None] * DP + rd[None, :])
    sq = tl.load(sq_ptr + bh * (NQP // BQ) + rm // BQ)
    k_ptrs = kc_ptr + bh * NKP * DP + rn[:, None] * DP + rd[None, :]
    vt_ptrs = vt_ptr + bh * DP * NKP + rd[:, None] * NKP + rn[None, :]
    sk_ptr = sk_ptr + bh * (NKP // BK)
    sv_ptr = sv_ptr + bh * (NKP // BV) * DP
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DP), tl.float32)
    n_full = (NK // BN) * BN
    for start in range(0, n_full, BN):
        acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, sq, k_ptrs + start * DP, vt_ptrs + start, sk_ptr, sv_ptr, start,
                                   NK, False, P_INT_ENCODE, DP, BN, BK, BV)
    if n_full < NK:
        acc, m_i, l_i = _attn_step(acc, m_i, l_i, q, sq, k_ptrs + n_full * DP, vt_ptrs + n_full, sk_ptr, sv_ptr,
                                   n_full, NK, True, P_INT_ENCODE, DP, BN, BK, BV)
    o = acc / (l_i * P_SCALE)[:, None]
    b = bh // H
    h = bh % H
    tl.store(o_ptr + b * sob + h * soh + rm[:, None] * son + rd[None, :], o.to(o_ptr.dtype.element_ty),
             mask=(rm[:, None] < NQ) & (rd[None, :] < D))


_attn_tuned = triton.autotune(_CONFIGS, key=["NQ_BUCKET", "NK_BUCKET", "DP"], do_bench=bench_fn)(_attn_kernel)


# -- launchers -----------------------------------------------------------------------------------------------------
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


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor, qk_scale: float,
                 ) -> tuple[torch.Tensor, ...]:
    """Triton launcher; same signature and outputs as :func:`dmq.kernels.reference.attention.quantize_qkv`."""
    _check_qkv(q, k, v)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    check(k_mean.shape == (b, h, d) and k_mean.dtype == torch.float32, "k_mean must be fp32 (B, H, D)")
    k_mean = k_mean.contiguous()
    nqp, nkp, dp = -(-nq // PAD) * PAD, -(-nk // PAD) * PAD, head_dim_padded(d)
    bh = b * h
    dev = q.device
    qc = torch.empty((bh, nqp, dp), dtype=torch.int8, device=dev)
    kc = torch.empty((bh, nkp, dp), dtype=torch.int8, device=dev)
    vt = torch.empty((bh, dp, nkp), dtype=torch.uint8, device=dev)
    sq = torch.empty((bh, nqp // BLOCK_Q), dtype=torch.float32, device=dev)
    sk = torch.empty((bh, nkp // BLOCK_K), dtype=torch.float32, device=dev)
    sv = torch.empty((bh, nkp // BLOCK_V, dp), dtype=torch.float32, device=dev)
    grid = (max(nqp // BLOCK_Q, nkp // BLOCK_K), bh, 3)
    _quant_kernel[grid](q, k, v, k_mean, qc, sq, kc, sk, vt, sv, nq, nk, nqp, nkp, h, qk_scale,
                        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                        v.stride(0), v.stride(1), v.stride(2),
                        D=d, DP=dp, BQ=BLOCK_Q, BK=BLOCK_K, BV=BLOCK_V, num_warps=8)
    return qc, sq, kc, sk, vt.view(torch.float8_e4m3fn), sv


def attend_codes(codes: tuple[torch.Tensor, ...], q_shape: torch.Size, nk: int, out_dtype: torch.dtype,
                 ) -> torch.Tensor:
    """The attention kernel alone, on the output of :func:`quantize_qkv` for q of shape ``q_shape``
    ``(B, H, Nq, D)`` and ``nk`` keys → ``(B, H, Nq, D)`` in ``out_dtype``."""
    qc, sq, kc, sk, vt, sv = codes
    b, h, nq, d = q_shape
    nqp, dp = qc.shape[1], qc.shape[2]
    nkp = kc.shape[1]
    o = torch.empty((b, h, nq, d), dtype=out_dtype, device=qc.device)
    args = (qc, sq, kc, sk, vt, sv, o, nq, nk, nqp, nkp, h, m_bucket(nq), m_bucket(nk),
            o.stride(0), o.stride(1), o.stride(2))
    consts = dict(D=d, DP=dp, P_INT_ENCODE=interpreting(), BQ=BLOCK_Q, BK=BLOCK_K, BV=BLOCK_V)
    if fixed_config():
        bm = _FIXED.kwargs["BM"]
        _attn_kernel[(nqp // bm, b * h)](*args, **consts, **_FIXED.kwargs, num_warps=_FIXED.num_warps,
                                         num_stages=_FIXED.num_stages)
    else:
        _attn_tuned[lambda meta: (nqp // meta["BM"], b * h)](*args, **consts)
    return o


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Triton launcher; same signature as :func:`dmq.kernels.reference.attention.int8_attention`: q ``(B, H, Nq, D)``,
    k / v ``(B, H, Nk, D)``, 16-bit, contiguous along D (other strides free) → ``(B, H, Nq, D)`` in q's dtype."""
    _check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    k_mean = k.mean(dim=2, dtype=torch.float32)
    codes = quantize_qkv(q, k, v, k_mean, scale * LOG2E)
    return attend_codes(codes, q.shape, k.shape[2], q.dtype)
