"""Number formats and how tensors are quantized to them.

A :class:`QType` is a small value object (bits, code range, storage dtype). A :class:`QuantSpec` says how one tensor
is quantized: which qtype, at which granularity, symmetric or not, dynamic or static. :func:`quantize` and
:func:`dequantize` implement every spec in plain PyTorch; they are the reference that kernels are checked against.

Layout convention. Tensors are viewed as ``(R, T, C)``: R rows (output channels of a weight, tokens of an
activation), T taps (kernel positions of a convolution, 1 for a linear) and C channels. Groups run along C within
one row and one tap, so a convolution and its GEMM form over ``K = T * C`` agree. C is zero-padded to a multiple of
the group size (and to an even count for 4-bit codes, which are packed two per byte along C: element ``2i`` in the
low nibble, ``2i + 1`` in the high nibble).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch

from dmq.errors import ConfigError

__all__ = [
    "QType",
    "QTYPES",
    "QuantSpec",
    "Quantized",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack_nibbles",
    "unpack_nibbles",
    "unpack_int4",
    "fp4_encode",
    "fp4_decode",
    "padded_channels",
    "storage_nbytes",
    "SUB_MAX",
]


@dataclass(frozen=True)
class QType:
    """A number format: ``bits`` per code, codes in ``[qmin, qmax]``, stored as ``storage`` (packed two per byte
    when ``packed``)."""

    name: str
    bits: int
    is_float: bool
    qmin: float
    qmax: float
    packed: bool
    storage: torch.dtype


QTYPES: dict[str, QType] = {
    "int8": QType("int8", 8, False, -128, 127, False, torch.int8),
    "int4": QType("int4", 4, False, -8, 7, True, torch.uint8),
    "fp8_e4m3": QType("fp8_e4m3", 8, True, -448.0, 448.0, False, torch.float8_e4m3fn),
    "fp4_e2m1": QType("fp4_e2m1", 4, True, -6.0, 6.0, True, torch.uint8),
    # fp4 e2m1 codes in groups of 16 with fp8 e4m3 group scales and an fp32 per-tensor second-level scale.
    "nvfp4": QType("nvfp4", 4, True, -6.0, 6.0, True, torch.uint8),
}

GRANULARITIES = ("tensor", "channel", "group", "token")
_E4M3_MAX = 448.0
# two-level int4: integer group sub-scales in [1, SUB_MAX]; |code · sub| ≤ 8 · 15 = 120 fits an int8
SUB_MAX = 15


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``granularity``: ``"tensor"`` (one scale), ``"channel"`` (one per output channel, weights), ``"token"`` (one per
    token row, activations, dynamic), ``"group"`` (one per ``group_size`` consecutive channels of a row).
    ``dynamic``: activation scales computed at every call; ``False`` means a calibrated (static) scale is used.
    ``two_level`` (int4 groups only): each group's scale is an integer sub-scale in ``[1, SUB_MAX]`` times one fp32
    scale per row (QServe's progressive group quantization, here on both GEMM operands), so ``code · sub`` is an
    exact int8 value and an int8 GEMM needs only per-row × per-column scales, none inside its K loop.
    """

    dtype: str
    granularity: str
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = True
    two_level: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in QTYPES:
            raise ConfigError(f"unknown quantization dtype {self.dtype!r}; valid: {', '.join(QTYPES)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if self.granularity == "group":
            g = self.group_size
            if not isinstance(g, int) or g < 16 or g > 256 or g & (g - 1):
                raise ConfigError(f"group_size must be a power of two from 16 to 256, got {g!r}")
        elif self.group_size is not None:
            raise ConfigError(f"group_size is only meaningful with granularity='group', got {self.group_size}")
        if self.dtype == "nvfp4" and (self.granularity != "group" or self.group_size != 16):
            raise ConfigError("nvfp4 is defined with granularity='group' and group_size=16")
        if self.qtype.is_float and not self.symmetric:
            raise ConfigError(f"{self.dtype} is a floating-point format and supports only symmetric quantization")
        if self.two_level and (self.dtype != "int4" or self.granularity != "group" or not self.symmetric):
            raise ConfigError("two_level scales are defined for symmetric int4 with granularity='group', got "
                              f"{self.dtype} {self.granularity}{'' if self.symmetric else ' asymmetric'}")
        if not self.dynamic and self.granularity not in ("tensor", "channel"):
            raise ConfigError(f"static (calibrated) quantization needs granularity 'tensor' or 'channel', "
                              f"got {self.granularity!r}")

    @property
    def qtype(self) -> QType:
        return QTYPES[self.dtype]

    @property
    def bits(self) -> int:
        return self.qtype.bits

    @property
    def scale_dtype(self) -> torch.dtype:
        """fp8 e4m3 for nvfp4 group scales, uint8 for two-level integer sub-scales, fp16 for other group scales, fp32
        for per-tensor/channel/token scales."""
        if self.dtype == "nvfp4":
            return torch.float8_e4m3fn
        if self.two_level:
            return torch.uint8
        return torch.float16 if self.granularity == "group" else torch.float32

    def fitted(self, channels: int) -> "QuantSpec":
        """This spec for a tensor of ``channels`` channels: a group size that does not divide ``channels`` is
        lowered to the largest power of two ≥ 16 that does (finer, never coarser), so that K needs no padding;
        when none divides it, the group size is kept and K is zero-padded."""
        if self.granularity != "group" or channels % self.group_size == 0 or self.dtype == "nvfp4":
            return self
        g = self.group_size // 2
        while g >= 16:
            if channels % g == 0:
                return replace(self, group_size=g)
            g //= 2
        return self

    def describe(self) -> str:
        """Short human-readable name, e.g. ``int4 g64`` or ``int8 per-token``."""
        gran = {"tensor": "per-tensor", "channel": "per-channel", "token": "per-token"}.get(
            self.granularity, f"g{self.group_size}")
        extra = (" two-level" if self.two_level else "") + ("" if self.symmetric else " asym")
        static = "" if self.dynamic else " static"
        return f"{self.dtype} {gran}{extra}{static}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(**d)


class Quantized(NamedTuple):
    """Quantized parts of an ``(R, T, C)`` tensor.

    codes: ``(R, T, Cp)`` int8 / fp8, or ``(R, T, Cp // 2)`` uint8 when packed.
    scales: ``()`` per tensor, ``(R,)`` per channel/token, ``(R, T * Cp // g)`` per group, in ``spec.scale_dtype``.
    zeros: int8, same shape as scales, asymmetric int formats only (codes and zeros are both shifted to the signed
    range, value = (code - zero) * scale).
    scale2: fp32 second-level scale: a scalar for nvfp4, ``(R,)`` per row for two-level int4 (value =
    code · sub-scale · scale2[row]).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    scale2: torch.Tensor | None = None


def padded_channels(spec: QuantSpec, channels: int) -> int:
    """Channel count after zero-padding to the group size (or to an even count for packed 4-bit codes)."""
    if spec.granularity == "group":
        g = spec.group_size
        return -(-channels // g) * g
    if spec.qtype.packed:
        return channels + (channels % 2)
    return channels


def storage_nbytes(spec: QuantSpec, rows: int, taps: int, channels: int) -> int:
    """Exact bytes of codes + scales (+ zeros, + the nvfp4 global scale) for an ``(rows, taps, channels)`` tensor."""
    cp = padded_channels(spec, channels)
    n_codes = rows * taps * cp
    code_bytes = n_codes * spec.bits // 8
    if spec.granularity == "group":
        n_scales = rows * taps * (cp // spec.group_size)
    elif spec.granularity in ("channel", "token"):
        n_scales = rows
    else:
        n_scales = 1
    scale_bytes = n_scales * torch.empty((), dtype=spec.scale_dtype).element_size()
    zero_bytes = 0 if spec.symmetric else n_scales
    scale2_bytes = 4 if spec.dtype == "nvfp4" else 4 * rows if spec.two_level else 0
    return code_bytes + scale_bytes + zero_bytes + scale2_bytes


# ---------------------------------------------------------------------------------------------------------------
# 4-bit packing and the fp4 e2m1 code table


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``(..., C)`` (C even; int4 values in [-8, 7] or raw nibbles in [0, 15]) into uint8
    ``(..., C // 2)``: element ``2i`` in the low nibble, ``2i + 1`` in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got {tuple(codes.shape)}")
    c = codes.to(torch.int16) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles` without sign extension: uint8 ``(..., C // 2)`` → uint8 ``(..., C)`` in
    [0, 15]."""
    p = packed.to(torch.uint8)
    out = torch.stack((p & 0xF, p >> 4), dim=-1)
    return out.reshape(*p.shape[:-1], p.shape[-1] * 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., C // 2)`` → signed int8 ``(..., C)`` in [-8, 7]."""
    return ((unpack_nibbles(packed).to(torch.int8) ^ 8) - 8).to(torch.int8)


_FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Python floats, so that torch.compile traces fp4_encode without a graph break (no Tensor.tolist() inside it)
_FP4_MIDPOINTS = tuple(((_FP4_VALUES[1:] + _FP4_VALUES[:-1]) / 2).tolist())


def fp4_encode(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by their scale) to fp4 e2m1 nibbles (sign << 3 | magnitude index),
    round-to-nearest with ties to the even code, saturating at ±6. Returns uint8 in [0, 15]."""
    a = x.abs().to(torch.float32)
    mag = torch.zeros_like(a, dtype=torch.uint8)
    for i, m in enumerate(_FP4_MIDPOINTS):
        # a tie between codes i and i + 1 goes to the even one
        above = (a >= m) if i % 2 else (a > m)
        mag += above.to(torch.uint8)
    sign = (x < 0).to(torch.uint8) << 3
    return torch.where(mag == 0, torch.zeros_like(mag), sign | mag)


def fp4_decode(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 fp4 e2m1 nibbles → fp32 values."""
    n = nibbles.to(torch.int64)
    mag = _FP4_VALUES.to(nibbles.device)[n & 7]
    return torch.where((n & 8) != 0, -mag, mag)


# ---------------------------------------------------------------------------------------------------------------
# quantize / dequantize


def _blocks(x3: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View a padded ``(R, T, Cp)`` tensor as ``(R, T, nblocks, block)`` blocks that share one scale."""
    r, t, cp = x3.shape
    if spec.granularity == "group":
        return x3.reshape(r, t, cp // spec.group_size, spec.group_size)
    if spec.granularity in ("channel", "token"):
        return x3.reshape(r, 1, 1, t * cp)
    return x3.reshape(1, 1, 1, r * t * cp)


def _store_scales(s: torch.Tensor, spec: QuantSpec, r: int, t: int) -> torch.Tensor:
    """Squeeze the ``(*, *, *, 1)`` scale tensor to its stored shape."""
    if spec.granularity == "group":
        return s.reshape(r, -1)
    if spec.granularity in ("channel", "token"):
        return s.reshape(r)
    return s.reshape(())


def _expand_scales(s: torch.Tensor, spec: QuantSpec, r: int, t: int) -> torch.Tensor:
    if spec.granularity == "group":
        return s.reshape(r, t, -1, 1)
    if spec.granularity in ("channel", "token"):
        return s.reshape(r, 1, 1, 1)
    return s.reshape(1, 1, 1, 1)


def _pad(x3: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    c = x3.shape[-1]
    cp = padded_channels(spec, c)
    return torch.nn.functional.pad(x3, (0, cp - c)) if cp != c else x3


def _div(t: torch.Tensor, c: float) -> torch.Tensor:
    """``t / c`` correctly rounded on every device (CUDA turns ``tensor / python_float`` into a multiply by the
    reciprocal, one ulp away at times; a kernel's scale is the IEEE quotient)."""
    return t / torch.full_like(t, c)


def _reciprocal(s: torch.Tensor) -> torch.Tensor:
    """``1 / s`` correctly rounded in fp32 (1 where ``s`` is 0): codes are ``x · (1 / scale)``, one IEEE reciprocal
    per scale and one multiply per element, which a GPU kernel reproduces bit for bit at a fraction of the cost of
    a correctly rounded division per element (that division made activation quantization instruction-bound on
    the H100, issue 7)."""
    s = s.to(torch.float32)
    return torch.reciprocal(torch.where(s > 0, s, torch.ones_like(s)))


def quantize(x3: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None) -> Quantized:
    """Quantize an ``(R, T, C)`` tensor (any float dtype) to ``spec``.

    ``scale`` (fp32, shaped as the stored scales) replaces the computed one: static activation quantization with a
    calibrated range. Scales are rounded to ``spec.scale_dtype`` before the codes are computed, so that
    ``dequantize(quantize(x))`` is exactly what a kernel reading the stored scales computes.
    """
    if x3.dim() != 3:
        raise ValueError(f"quantize expects an (R, T, C) tensor, got shape {tuple(x3.shape)}")
    qt = spec.qtype
    r, t, _ = x3.shape
    xb = _blocks(_pad(x3.to(torch.float32), spec), spec)
    zeros = scale2 = None

    if spec.dtype == "nvfp4":
        amax_t = xb.abs().amax() if scale is None else scale.to(torch.float32).reshape(())
        scale2 = _div(amax_t.to(torch.float32), qt.qmax * _E4M3_MAX)
        g_safe = torch.where(scale2 > 0, scale2, torch.ones_like(scale2))
        s_blk = (_div(xb.abs().amax(dim=-1, keepdim=True), qt.qmax) / g_safe).clamp(max=_E4M3_MAX)
        s_store = s_blk.to(torch.float8_e4m3fn)
        eff = s_store.to(torch.float32) * scale2
        nib = fp4_encode(xb * _reciprocal(eff))
        nib = torch.where(eff > 0, nib, torch.zeros_like(nib))
        codes = pack_nibbles(nib.reshape(r, t, -1))
        return Quantized(codes, _store_scales(s_store, spec, r, t), None, scale2)

    if spec.two_level:
        return _quantize_two_level(xb, spec, r, t)

    if scale is None:
        if spec.symmetric:
            s = _div(xb.abs().amax(dim=-1, keepdim=True), qt.qmax)
        else:
            lo = xb.amin(dim=-1, keepdim=True).clamp(max=0)
            hi = xb.amax(dim=-1, keepdim=True).clamp(min=0)
            s = _div(hi - lo, qt.qmax - qt.qmin)
    else:
        s = _expand_scales(scale.to(torch.float32), spec, r, t)
    s_store = s.to(spec.scale_dtype)
    s32 = s_store.to(torch.float32)
    inv = _reciprocal(s32)

    if qt.is_float:
        y = (xb * inv).clamp(qt.qmin, qt.qmax)
        if spec.dtype == "fp8_e4m3":
            codes = y.to(torch.float8_e4m3fn).reshape(r, t, -1)
        else:
            codes = pack_nibbles(fp4_encode(y).reshape(r, t, -1))
    else:
        if spec.symmetric:
            q = torch.round(xb * inv).clamp(qt.qmin, qt.qmax)
        else:
            if scale is not None:
                raise ConfigError("static asymmetric activation ranges are not supported; use symmetric=True")
            z_u = torch.round(-lo * inv).clamp(0, qt.qmax - qt.qmin)
            q = (torch.round(xb * inv) + z_u).clamp(0, qt.qmax - qt.qmin) + qt.qmin
            zeros = _store_scales((z_u + qt.qmin).to(torch.int8), spec, r, t)
        q = q.to(torch.int8).reshape(r, t, -1)
        codes = pack_nibbles(q) if qt.packed else q
    return Quantized(codes, _store_scales(s_store, spec, r, t), zeros, scale2)


def _quantize_two_level(xb: torch.Tensor, spec: QuantSpec, r: int, t: int) -> Quantized:
    """Two-level int4 of fp32 blocks ``(R, T, G, g)``: ideal group scales ``s_g = amax_g / qmax``, one fp32 scale
    per row ``scale2 = max(s_g) / SUB_MAX``, sub-scales ``round(s_g / scale2)`` clamped to ``[1, SUB_MAX]``, codes
    ``round(x · (1 / (sub · scale2)))`` clamped to the int4 range. Every division has a tensor divisor (IEEE on every
    device), so a kernel doing the same operations gets the same bits."""
    qt = spec.qtype
    amax = xb.abs().amax(dim=-1, keepdim=True)
    s_g = _div(amax, qt.qmax)
    row_max = s_g.reshape(r, -1).amax(dim=1)
    scale2 = _div(row_max, SUB_MAX)
    s2 = torch.where(scale2 > 0, scale2, torch.ones_like(scale2)).reshape(r, 1, 1, 1)
    sub = torch.round(s_g / s2).clamp(1, SUB_MAX)
    q = torch.round(xb * _reciprocal(sub * s2)).clamp(qt.qmin, qt.qmax).to(torch.int8).reshape(r, t, -1)
    return Quantized(pack_nibbles(q), _store_scales(sub.to(torch.uint8), spec, r, t), None, scale2)


def dequantize(q: Quantized, spec: QuantSpec, channels: int) -> torch.Tensor:
    """Quantized parts → fp32 ``(R, T, channels)`` (padding removed)."""
    qt = spec.qtype
    codes = q.codes
    if qt.packed:
        nib = unpack_nibbles(codes)
        vals = fp4_decode(nib) if qt.is_float else ((nib.to(torch.int8) ^ 8) - 8).to(torch.float32)
    else:
        vals = codes.to(torch.float32)
    r, t, _ = vals.shape
    vb = _blocks(vals, spec)
    s = _expand_scales(q.scales.to(torch.float32), spec, r, t)
    if q.zeros is not None:
        vb = vb - _expand_scales(q.zeros.to(torch.float32), spec, r, t)
    if q.scale2 is not None:
        s2 = q.scale2.to(torch.float32)
        s = s * (s2.reshape(r, 1, 1, 1) if s2.dim() else s2)   # per row (two-level) or per tensor (nvfp4)
    return (vb * s).reshape(r, t, -1)[..., :channels]


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                  channel_dim: int = -1) -> torch.Tensor:
    """Quantize then dequantize an activation, returning the same shape and dtype.

    Each position along every dim except ``channel_dim`` is one token (a linear's row, a conv's input pixel);
    per-token and per-group scales run along ``channel_dim``. ``scale``: a calibrated static scale (fp32).
    """
    xm = x.movedim(channel_dim, -1)
    shape = xm.shape
    x3 = xm.reshape(-1, 1, shape[-1])
    y = dequantize(quantize(x3, spec, scale), spec, shape[-1])
    return y.reshape(shape).movedim(-1, channel_dim).to(x.dtype)
