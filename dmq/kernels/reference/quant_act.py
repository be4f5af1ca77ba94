"""Reference: per-token or per-group activation quantization fused with the low-rank down-projection."""

from __future__ import annotations

import torch

from dmq.formats import QuantSpec, quantize, unpack_int4

__all__ = ["quantize_act", "act_spec"]

_ACT_DTYPES = ("int4", "int8", "fp8_e4m3")


def act_spec(qdtype: str, group_size: int) -> QuantSpec:
    if qdtype not in _ACT_DTYPES:
        raise ValueError(f"activation dtype must be one of {_ACT_DTYPES}, got {qdtype!r}")
    if group_size and qdtype == "fp8_e4m3":
        raise ValueError("fp8 activations are quantized per token (group_size=0)")
    return QuantSpec(qdtype, "group", group_size) if group_size else QuantSpec(qdtype, "token")


def quantize_act(x: torch.Tensor, smooth: torch.Tensor | None, proj_down: torch.Tensor | None, qdtype: str,
                 group_size: int, pack: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the rows of ``x / smooth`` and project them onto ``proj_down``.

    x: ``(M, K)`` 16-bit. smooth: ``(K,)`` or None (activations are divided by it, in fp32). proj_down: ``(K, R)``
    16-bit or None. qdtype: ``"int4"``, ``"int8"`` or ``"fp8_e4m3"``; group_size: 0 for one scale per token, else the
    group size along K. pack: int4 only, two codes per byte as :func:`dmq.formats.pack_nibbles`.

    Returns ``codes`` (int8 ``(M, Kp)``, uint8 ``(M, Kp/2)`` when packed, float8 ``(M, K)`` for fp8), ``scales``
    (fp32 ``(M,)`` per token, fp16 ``(M, Kp/g)`` per group) and ``lowrank`` ``(M, R)`` in x's dtype
    (``(M, 0)`` without proj_down). Codes and scales are exactly :func:`dmq.formats.quantize` of ``x / smooth``;
    lowrank is ``(x / smooth)`` rounded to proj_down's dtype, times proj_down, accumulated in fp32.
    """
    spec = act_spec(qdtype, group_size)
    if pack and qdtype != "int4":
        raise ValueError("pack=True is only meaningful for int4 codes")
    m, k = x.shape
    xs = x.to(torch.float32)
    if smooth is not None:
        xs = xs / smooth.to(torch.float32)
    q = quantize(xs.reshape(m, 1, k), spec)
    codes = q.codes.reshape(m, -1)
    if qdtype == "int4" and not pack:
        codes = unpack_int4(codes)
    if proj_down is not None:
        lowrank = (xs.to(proj_down.dtype).to(torch.float32) @ proj_down.to(torch.float32)).to(x.dtype)
    else:
        lowrank = x.new_empty((m, 0))
    return codes.contiguous(), q.scales.contiguous(), lowrank
