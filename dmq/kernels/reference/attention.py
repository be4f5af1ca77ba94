"""Reference: 8-bit attention (SageAttention2-style), non-causal, no mask.

Q and K are quantized to int8 with one scale per block of tokens per head, K after subtracting a smoothing vector
(exact for softmax: it shifts every row of ``QKᵀ`` by a constant). The smoothing vector is the mean of
:data:`K_SAMPLES` tokens spread evenly over the sequence, summed in token order in fp32: it removes the per-channel
offsets of DiT keys as well as the full mean does, and every K block can compute it in the same launch that
quantizes it (the full mean needs a pass over all tokens first). ``QKᵀ`` is an exact integer product; the softmax
runs online in fp32 base 2 (``scale · log2 e`` is folded into Q before quantization); the probabilities
``exp2(s - m) ∈ [0, 1]`` are computed times 448 (``exp2(s - m + log2 448)``, fp8 e4m3's largest value) and rounded
to fp8 e4m3; V is fp8 e4m3 with one scale per channel over all tokens, applied once to the output; each key block's
``P̃V`` starts from a fresh fp32 accumulator that is added to the running one (two-level accumulation: Hopper's fp8
MMA accumulates with limited precision).

:func:`quantize_qkv` gives the codes in the padded layout the Triton kernel reads (bit for bit the Triton
pre-kernel's output); :func:`int8_attention` computes attention from them with key blocks of :data:`BLOCK_N` or
128 (the online softmax depends on the block size through the fp8 rounding of ``P̃``; the GPU autotuner chooses).
The fidelity reference is ``torch.nn.functional.scaled_dot_product_attention`` in 16 bits.
"""

from __future__ import annotations

import math

import torch

__all__ = ["quantize_qkv", "smoothing_vector", "int8_attention", "head_dim_padded", "BLOCK_Q", "BLOCK_K", "BLOCK_N",
           "PAD", "K_SAMPLES", "P_SCALE", "LOG2_P_SCALE", "LOG2E"]

BLOCK_Q = 64      #: tokens per Q scale
BLOCK_K = 128     #: tokens per K scale (a key tile of the kernel, at most 128 tokens, has one K scale)
BLOCK_N = 64      #: key block of the online softmax in this reference (the kernel's fixed / interpreter config)
PAD = 128         #: token counts of the code buffers are padded to this (the largest kernel tile)
K_SAMPLES = 64    #: tokens averaged into K's smoothing vector
P_SCALE = 448.0   #: P̃ ∈ [0, 1] is computed times this (fp8 e4m3's largest value) before rounding
LOG2_P_SCALE = math.log2(P_SCALE)
LOG2E = 1.4426950408889634


def head_dim_padded(d: int) -> int:
    """Head dim of the code buffers: the next power of two, at least 32 (the K step of int8 MMAs); zero channels
    change no product."""
    return max(32, 1 << (d - 1).bit_length())


def _pad_tokens(n: int) -> int:
    return -(-n // PAD) * PAD


def _flat_padded(x: torch.Tensor, n_pad: int, d_pad: int) -> torch.Tensor:
    """(B, H, N, D) → fp32 (B·H, n_pad, d_pad), zeros outside."""
    b, h, n, d = x.shape
    out = x.new_zeros((b * h, n_pad, d_pad), dtype=torch.float32)
    out[:, :n, :d] = x.reshape(b * h, n, d).float()
    return out


def _int8_blocks(x: torch.Tensor, blk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 (BH, N, D), N a multiple of blk → int8 codes (BH, N, D), fp32 scales (BH, N/blk) = amax / 127."""
    bh, n, d = x.shape
    xb = x.reshape(bh, n // blk, blk * d)
    amax = xb.abs().amax(dim=-1)
    s = amax / torch.full_like(amax, 127.0)   # a tensor divisor: IEEE division on CUDA too (the kernel's div_rn)
    codes = torch.round(xb * torch.reciprocal(torch.where(s > 0, s, 1.0))[..., None]).clamp_(-127, 127)
    return codes.to(torch.int8).reshape(bh, n, d), s


def smoothing_vector(k: torch.Tensor) -> torch.Tensor:
    """K ``(B, H, N, D)`` → fp32 ``(B, H, D)``: the mean of the tokens ``⌊i·N / K_SAMPLES⌋``, i < K_SAMPLES
    (repeats when N < K_SAMPLES), summed one token after another from i = 0 in fp32, then times 1 / K_SAMPLES
    (exact)."""
    n = k.shape[2]
    acc = torch.zeros(k.shape[0], k.shape[1], k.shape[3], dtype=torch.float32, device=k.device)
    for i in range(K_SAMPLES):
        acc = acc + k[:, :, i * n // K_SAMPLES].float()
    return acc * (1.0 / K_SAMPLES)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_scale: float,
                 k_smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Quantize Q, K, V for the attention kernel.

    q: ``(B, H, Nq, D)``, k / v: ``(B, H, Nk, D)``, 16-bit (or fp32). qk_scale: the softmax scale times log2 e
    (multiplied into Q in fp32 before quantization). k_smooth: fp32 ``(B, H, D)`` subtracted from K, default
    :func:`smoothing_vector` ``(k)``.

    Returns, with ``BH = B·H``, ``Nqp / Nkp`` the token counts padded to :data:`PAD` and ``Dp =``
    :func:`head_dim_padded` ``(D)`` (codes and scales are zero in the padding):
    ``q_codes`` int8 ``(BH, Nqp, Dp)``, ``q_scales`` fp32 ``(BH, Nqp/BLOCK_Q)``, ``k_codes`` int8 ``(BH, Nkp, Dp)``
    of ``K - k_smooth``, ``k_scales`` fp32 ``(BH, Nkp/BLOCK_K)``, ``v_codes_t`` float8_e4m3fn ``(BH, Dp, Nkp)``
    (transposed: tokens contiguous, as Hopper's fp8 MMA reads its second operand), ``v_scales`` fp32 ``(BH, Dp)``
    = per-channel amax over all tokens / 448. Int8 scales are amax / 127, codes round-half-even(x · (1 / scale))
    clamped to ±127; every division is correctly rounded.
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    nqp, nkp, dp = _pad_tokens(nq), _pad_tokens(nk), head_dim_padded(d)
    k_smooth = smoothing_vector(k) if k_smooth is None else k_smooth
    qf = _flat_padded(q, nqp, dp) * qk_scale
    kf = _flat_padded(k, nkp, dp)
    kf[:, :nk, :d] -= k_smooth.reshape(b * h, 1, d).float()
    q_codes, q_scales = _int8_blocks(qf, BLOCK_Q)
    k_codes, k_scales = _int8_blocks(kf, BLOCK_K)
    vf = _flat_padded(v, nkp, dp)
    v_amax = vf.abs().amax(dim=1)
    v_scales = v_amax / torch.full_like(v_amax, P_SCALE)   # (CUDA turns "/ python float" into "* reciprocal")
    vq = (vf * torch.reciprocal(torch.where(v_scales > 0, v_scales, 1.0))[:, None, :]).clamp_(-P_SCALE, P_SCALE)
    v_codes_t = vq.to(torch.float8_e4m3fn).transpose(1, 2).contiguous()
    return q_codes, q_scales, k_codes, k_scales, v_codes_t, v_scales


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   block_n: int = BLOCK_N) -> torch.Tensor:
    """``softmax(Q Kᵀ · scale) V`` with 8-bit operands (see the module docstring for the exact quantization).

    q: ``(B, H, Nq, D)``; k, v: ``(B, H, Nk, D)``; 16-bit, same dtype. scale: softmax scale, default
    ``1/sqrt(D)``. block_n: key block of the online softmax (64 or 128, the kernel's tile). Returns
    ``(B, H, Nq, D)`` in q's dtype.
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qc, sq, kc, sk, vt, sv = quantize_qkv(q, k, v, scale * LOG2E)
    nkp = kc.shape[1]
    qf = qc.float()
    sq_rows = sq.repeat_interleave(BLOCK_Q, dim=1)[:, :, None]          # (BH, Nqp, 1)
    sk_cols = sk.repeat_interleave(BLOCK_K, dim=1)[:, None, :]          # (BH, 1, Nkp)
    bh, nqp, dp = qf.shape
    dev = q.device
    m = torch.full((bh, nqp), float("-inf"), device=dev)
    l = torch.zeros((bh, nqp), device=dev)
    acc = torch.zeros((bh, nqp, dp), device=dev)
    cols = torch.arange(nkp, device=dev)
    for start in range(0, nk, block_n):
        sl = slice(start, start + block_n)
        s = (qf @ kc[:, sl].float().transpose(1, 2)) * (sq_rows * sk_cols[:, :, sl])   # exact integer product
        s = torch.where(cols[sl][None, None, :] < nk, s, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1))
        p = torch.exp2(s - (m_new - LOG2_P_SCALE)[..., None])                # P̃ · 448
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(dim=-1)
        p8 = p.clamp(max=P_SCALE).to(torch.float8_e4m3fn).float()            # the hardware cast saturates
        acc = acc * alpha[..., None] + p8 @ vt[:, :, sl].float().transpose(1, 2)
        m = m_new
    o = acc * sv[:, None, :] / l[..., None]
    return o[:, :nq, :d].reshape(b, h, nq, d).to(q.dtype)
