"""Reference: per-token or per-group activation quantization fused with the low-rank down-projection."""

from __future__ import annotations

import functools

import torch

from dmq.formats import QuantSpec, pack_nibbles, padded_channels, quantize, unpack_int4

__all__ = ["quantize_act", "act_spec", "smoothed", "pixel_rows", "TWO_LEVEL"]

TWO_LEVEL = "int4_2l"   # two-level int4 groups (see QuantSpec.two_level), delivered as int8 code · sub-scale
_ACT_DTYPES = ("int4", "int8", "fp8_e4m3", TWO_LEVEL)


@functools.lru_cache(maxsize=64)   # called per quantize_act call; the spec is a frozen value
def act_spec(qdtype: str, group_size: int) -> QuantSpec:
    if qdtype not in _ACT_DTYPES:
        raise ValueError(f"activation dtype must be one of {_ACT_DTYPES}, got {qdtype!r}")
    if group_size and qdtype == "fp8_e4m3":
        raise ValueError("fp8 activations are quantized per token (group_size=0)")
    if qdtype == TWO_LEVEL:
        if not group_size:
            raise ValueError(f"{TWO_LEVEL} activations need a group size")
        return QuantSpec("int4", "group", group_size, two_level=True)
    return QuantSpec(qdtype, "group", group_size) if group_size else QuantSpec(qdtype, "token")


def quantize_act(x: torch.Tensor, smooth: torch.Tensor | None, proj_down: torch.Tensor | None, qdtype: str,
                 group_size: int, pack: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the rows of ``x · (1 / smooth)`` and project them onto ``proj_down``.

    x: ``(M, K)`` 16-bit, or an NCHW image ``(B, K, H, W)`` whose pixels are the rows (``M = B·H·W``, codes in NHWC
    order; no proj_down then: :func:`pixel_rows`). smooth: ``(K,)`` or None (activations are multiplied by its fp32
    reciprocal). proj_down: ``(K, R)`` 16-bit or None. qdtype: ``"int4"``, ``"int8"``, ``"fp8_e4m3"`` or ``"int4_2l"`` (two-level
    int4 groups, returned as int8 ``code · sub-scale`` with the fp32 per-token ``scale2`` as scales, ready for a
    per-token int8 GEMM); group_size: 0 for one scale per token, else the group size along K. pack: int4 only, two
    codes per byte as :func:`dmq.formats.pack_nibbles`.

    Returns ``codes`` (int8 ``(M, Kp)``, uint8 ``(M, Kp/2)`` when packed, float8 ``(M, K)`` for fp8), ``scales``
    (fp32 ``(M,)`` per token, fp16 ``(M, Kp/g)`` per group) and ``lowrank`` ``(M, R)`` in x's dtype
    (``(M, 0)`` without proj_down). lowrank is ``(x / smooth)`` rounded to proj_down's dtype, times proj_down,
    accumulated in fp32.

    Codes and scales follow :func:`dmq.formats.quantize` (scale = amax / qmax, rounded to fp16 for groups; codes
    = round-half-even(x · (1 / scale)), clamped) with every division correctly rounded, bit for bit on every device.
    """
    spec = act_spec(qdtype, group_size)
    if pack and qdtype != "int4":
        raise ValueError("pack=True is only meaningful for int4 codes")
    qt = spec.qtype
    if x.dim() == 4 and proj_down is not None:
        raise ValueError("an image input (B, C, H, W) takes no proj_down: a convolution's branch is a convolution")
    x = pixel_rows(x)
    m, k = x.shape
    xs = smoothed(x, smooth)
    kp = padded_channels(spec, k)
    if spec.two_level:
        q = quantize(xs.reshape(m, 1, k), spec)
        products = unpack_int4(q.codes.reshape(m, -1)).to(torch.int16) * q.scales.to(torch.int16).repeat_interleave(
            group_size, dim=1)
        return products.to(torch.int8).contiguous(), q.scale2.contiguous(), _lowrank(x, xs, proj_down)
    xb = torch.nn.functional.pad(xs, (0, kp - k)).reshape(m, kp // group_size if group_size else 1, -1)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    s = amax / torch.full_like(amax, qt.qmax)          # a tensor divisor: IEEE division on every device
    if group_size:
        s = s.to(torch.float16).to(torch.float32)
    y = xb * torch.reciprocal(torch.where(s > 0, s, torch.ones_like(s)))
    if qdtype == "fp8_e4m3":
        codes = y.clamp(qt.qmin, qt.qmax).to(torch.float8_e4m3fn).reshape(m, kp)
    else:
        codes = torch.round(y).clamp(qt.qmin, qt.qmax).to(torch.int8).reshape(m, kp)
        if pack:
            codes = pack_nibbles(codes)
    scales = s.reshape(m, -1).to(torch.float16) if group_size else s.reshape(m)
    return codes.contiguous(), scales.contiguous(), _lowrank(x, xs, proj_down)


def pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """``(M, K)`` rows as they are; an image ``(B, K, H, W)`` as its pixels ``(B·H·W, K)`` (a copy unless x is
    channels-last already)."""
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if x.dim() != 2:
        raise ValueError(f"x must be (M, K) or (B, C, H, W), got {tuple(x.shape)}")
    return x


def smoothed(x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """``x (M, K)`` in fp32 times the correctly rounded fp32 reciprocal of ``smooth (K,)`` (a kernel loads smooth
    and does the same: one division per channel, one multiply per element)."""
    xs = x.to(torch.float32)
    return xs if smooth is None else xs * torch.reciprocal(smooth.to(torch.float32))


def _lowrank(x: torch.Tensor, xs: torch.Tensor, proj_down: torch.Tensor | None) -> torch.Tensor:
    """``xs (M, K)`` fp32 rounded to proj_down's dtype, times ``proj_down (K, R)`` in fp32 → x's dtype."""
    if proj_down is None:
        return x.new_empty((x.shape[0], 0))
    return (xs.to(proj_down.dtype).to(torch.float32) @ proj_down.to(torch.float32)).to(x.dtype)
