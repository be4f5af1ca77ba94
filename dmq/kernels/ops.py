"""The kernels as torch custom ops (``torch.ops.dmq.*``): the reference is the implementation on every device but
CUDA, the Triton launcher the CUDA one, and a fake (meta) implementation gives torch.compile the output shapes, so
compiled models trace them as single nodes, without graph breaks.

Ops (signatures as in :mod:`dmq.kernels.reference`):

- ``quantize_act(x, smooth?, proj_down?, qdtype, group_size, pack) -> (codes, scales, lowrank)`` (x: rows, or an
  NCHW image whose pixels are the rows)
- ``gemm_int(a, a_scales, w, w_scales, w_format, a_group, w_group, lowrank?, proj_up?, bias?, out_dtype) -> y``
- ``conv_gemm_int(codes, scales, w, w_scales, kh, kw, ph, pw, dh, dw, lowrank?, proj_up?, bias?, out_dtype) -> y``
  (an implicit-GEMM stride-1 convolution over NHWC codes, no im2col; CUDA: Hopper's TMA)
- ``weight_only_linear(x, w, w_scales, w_format, w_group, bias?) -> y`` (GEMV for M ≤ 16, else dequantize + cuBLAS)
- ``dequantize_weight(w, w_scales, w_format, w_group, k, out_dtype) -> w16``
- ``fp8_linear(x, w, w_scales, bias?) -> y`` (Triton quantization + ``torch._scaled_mm``)
- ``nvfp4_quantize(x, smooth?, amax) -> (codes, scales, global_scale)``
- ``nvfp4_linear(x, smooth?, proj_down?, proj_up?, w, w_scales, w_scale2, bias?) -> y``
- ``int8_attention(q, k, v, scale?) -> o`` (int8 QKᵀ, fp8 PV; :mod:`dmq.kernels.reference.attention`)
- ``im2col(t, kh, kw, sh, sw, ph, pw, dh, dw) -> rows`` (a convolution's GEMM rows from NHWC codes or scales)

and Python compositions of them: :func:`quantized_linear`, :func:`fused_w4a4_lowrank`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dmq.formats import padded_channels
from dmq.kernels.reference import attention as _ref_attn
from dmq.kernels.reference import fp8 as _ref_fp8
from dmq.kernels.reference import gemm as _ref_gemm
from dmq.kernels.reference import im2col as _ref_im2col
from dmq.kernels.reference import nvfp4 as _ref_nvfp4
from dmq.kernels.reference import quant_act as _ref_quant
from dmq.kernels.reference import weight_only as _ref_wo

__all__ = ["quantize_act", "gemm_int", "conv_gemm_int", "weight_only_linear", "dequantize_weight", "fp8_linear",
           "nvfp4_quantize", "nvfp4_linear", "int8_attention", "im2col", "quantized_linear", "fused_w4a4_lowrank",
           "fast"]


_MODULES: dict[str, object] = {}


def _tk(name: str):
    """The Triton module ``dmq.kernels.triton.<name>``, imported on first CUDA call."""
    mod = _MODULES.get(name)
    if mod is None:
        import importlib

        mod = _MODULES[name] = importlib.import_module(f"dmq.kernels.triton.{name}")
    return mod


# -- quantize_act ------------------------------------------------------------------------------------------------
@torch.library.custom_op("dmq::quantize_act", mutates_args=())
def quantize_act(x: Tensor, smooth: Optional[Tensor], proj_down: Optional[Tensor], qdtype: str, group_size: int,
                 pack: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _ref_quant.quantize_act(x, smooth, proj_down, qdtype, group_size, pack)


@quantize_act.register_kernel("cuda")
def _(x, smooth, proj_down, qdtype, group_size, pack):
    return _tk("quant_act").quantize_act(x, smooth, proj_down, qdtype, group_size, pack)


@quantize_act.register_fake
def _(x, smooth, proj_down, qdtype, group_size, pack):
    spec = _ref_quant.act_spec(qdtype, group_size)
    m, k = _ref_quant.pixel_rows(x).shape
    kp = padded_channels(spec, k)
    if qdtype == "fp8_e4m3":
        codes = x.new_empty((m, kp), dtype=torch.float8_e4m3fn)
    elif pack:
        codes = x.new_empty((m, kp // 2), dtype=torch.uint8)
    else:
        codes = x.new_empty((m, kp), dtype=torch.int8)
    scales = x.new_empty((m, kp // group_size), dtype=torch.float16) if group_size and not spec.two_level else \
        x.new_empty((m,), dtype=torch.float32)
    r = proj_down.shape[1] if proj_down is not None else 0
    return codes, scales, x.new_empty((m, r))


# -- gemm_int ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("dmq::gemm_int", mutates_args=())
def gemm_int(a: Tensor, a_scales: Tensor, w: Tensor, w_scales: Tensor, w_format: str, a_group: int, w_group: int,
             lowrank: Optional[Tensor], proj_up: Optional[Tensor], bias: Optional[Tensor],
             out_dtype: torch.dtype) -> Tensor:
    return _ref_gemm.gemm_int(a, a_scales, w, w_scales, w_format, a_group, w_group, lowrank, proj_up, bias,
                              out_dtype)


@gemm_int.register_kernel("cuda")
def _(a, a_scales, w, w_scales, w_format, a_group, w_group, lowrank, proj_up, bias, out_dtype):
    return _tk("gemm").gemm_int(a, a_scales, w, w_scales, w_format, a_group, w_group, lowrank, proj_up, bias,
                                out_dtype)


@gemm_int.register_fake
def _(a, a_scales, w, w_scales, w_format, a_group, w_group, lowrank, proj_up, bias, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("dmq::conv_gemm_int", mutates_args=())
def conv_gemm_int(codes: Tensor, scales: Tensor, w: Tensor, w_scales: Tensor, kh: int, kw: int, ph: int, pw: int,
                  dh: int, dw: int, lowrank: Optional[Tensor], proj_up: Optional[Tensor], bias: Optional[Tensor],
                  out_dtype: torch.dtype) -> Tensor:
    return _ref_gemm.conv_gemm_int(codes, scales, w, w_scales, kh, kw, ph, pw, dh, dw, lowrank, proj_up, bias,
                                   out_dtype)


@conv_gemm_int.register_kernel("cuda")
def _(codes, scales, w, w_scales, kh, kw, ph, pw, dh, dw, lowrank, proj_up, bias, out_dtype):
    return _tk("gemm").conv_gemm_int(codes, scales, w, w_scales, kh, kw, ph, pw, dh, dw, lowrank, proj_up, bias,
                                     out_dtype)


@conv_gemm_int.register_fake
def _(codes, scales, w, w_scales, kh, kw, ph, pw, dh, dw, lowrank, proj_up, bias, out_dtype):
    b, h, wd, _ = codes.shape
    return codes.new_empty((b * h * wd, w.shape[0]), dtype=out_dtype)


# -- weight-only -------------------------------------------------------------------------------------------------
@torch.library.custom_op("dmq::weight_only_linear", mutates_args=())
def weight_only_linear(x: Tensor, w: Tensor, w_scales: Tensor, w_format: str, w_group: int,
                       bias: Optional[Tensor]) -> Tensor:
    return _ref_wo.weight_only_linear(x, w, w_scales, w_format, w_group, bias)


@weight_only_linear.register_kernel("cuda")
def _(x, w, w_scales, w_format, w_group, bias):
    wo = _tk("weight_only")
    if x.shape[0] <= wo.GEMV_MAX_M:
        return wo.weight_only_linear(x, w, w_scales, w_format, w_group, bias)
    wd = wo.dequantize_weight(w, w_scales, w_format, w_group, x.shape[1], x.dtype)
    return F.linear(x, wd, bias.to(x.dtype) if bias is not None else None)


@weight_only_linear.register_fake
def _(x, w, w_scales, w_format, w_group, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("dmq::dequantize_weight", mutates_args=())
def dequantize_weight(w: Tensor, w_scales: Tensor, w_format: str, w_group: int, k: int,
                      out_dtype: torch.dtype) -> Tensor:
    return _ref_wo.dequantize_weight(w, w_scales, w_format, w_group, k, out_dtype)


@dequantize_weight.register_kernel("cuda")
def _(w, w_scales, w_format, w_group, k, out_dtype):
    return _tk("weight_only").dequantize_weight(w, w_scales, w_format, w_group, k, out_dtype)


@dequantize_weight.register_fake
def _(w, w_scales, w_format, w_group, k, out_dtype):
    return w.new_empty((w.shape[0], k), dtype=out_dtype)


# -- fp8 ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("dmq::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, w: Tensor, w_scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _ref_fp8.fp8_linear(x, w, w_scales, bias)


@fp8_linear.register_kernel("cuda")
def _(x, w, w_scales, bias):
    return _tk("fp8").fp8_linear(x, w, w_scales, bias)


@fp8_linear.register_fake
def _(x, w, w_scales, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


# -- nvfp4 -------------------------------------------------------------------------------------------------------
@torch.library.custom_op("dmq::nvfp4_quantize", mutates_args=())
def nvfp4_quantize(x: Tensor, smooth: Optional[Tensor], amax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _ref_nvfp4.nvfp4_quantize(x, smooth, amax)


@nvfp4_quantize.register_kernel("cuda")
def _(x, smooth, amax):
    return _tk("nvfp4").nvfp4_quantize(x, smooth, amax)


@nvfp4_quantize.register_fake
def _(x, smooth, amax):
    m, k = x.shape
    kp = -(-k // 16) * 16
    return (x.new_empty((m, kp // 2), dtype=torch.uint8), x.new_empty((m, kp // 16), dtype=torch.float8_e4m3fn),
            x.new_empty((), dtype=torch.float32))


@torch.library.custom_op("dmq::nvfp4_linear", mutates_args=())
def nvfp4_linear(x: Tensor, smooth: Optional[Tensor], proj_down: Optional[Tensor], proj_up: Optional[Tensor],
                 w: Tensor, w_scales: Tensor, w_scale2: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _ref_nvfp4.nvfp4_linear(x, smooth, proj_down, proj_up, w, w_scales, w_scale2, bias)


@nvfp4_linear.register_kernel("cuda")
def _(x, smooth, proj_down, proj_up, w, w_scales, w_scale2, bias):
    return _tk("nvfp4").nvfp4_linear(x, smooth, proj_down, proj_up, w, w_scales, w_scale2, bias)


@nvfp4_linear.register_fake
def _(x, smooth, proj_down, proj_up, w, w_scales, w_scale2, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


# -- attention ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("dmq::int8_attention", mutates_args=())
def int8_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    return _ref_attn.int8_attention(q, k, v, scale)


@int8_attention.register_kernel("cuda")
def _(q, k, v, scale):
    return _tk("attention").int8_attention(q, k, v, scale)


@int8_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape)


# -- im2col ------------------------------------------------------------------------------------------------------
@torch.library.custom_op("dmq::im2col", mutates_args=())
def im2col(t: Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int) -> Tensor:
    return _ref_im2col.im2col(t, kh, kw, sh, sw, ph, pw, dh, dw)


@im2col.register_kernel("cuda")
def _(t, kh, kw, sh, sw, ph, pw, dh, dw):
    return _tk("im2col").im2col(t, kh, kw, sh, sw, ph, pw, dh, dw)


@im2col.register_fake
def _(t, kh, kw, sh, sw, ph, pw, dh, dw):
    b, h, w, c = t.shape
    ho, wo = _ref_im2col.conv_out_hw(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    return t.new_empty((b * ho * wo, kh * kw * c))


# -- compositions ------------------------------------------------------------------------------------------------
_FAST = {"quantize_act": (quantize_act, "quant_act"), "gemm_int": (gemm_int, "gemm"),
         "conv_gemm_int": (conv_gemm_int, "gemm"), "dequantize_weight": (dequantize_weight, "weight_only"),
         "im2col": (im2col, "im2col")}


def fast(name: str, x: Tensor):
    """The custom op ``name`` (a key of ``_FAST``: ``quantize_act``, ``gemm_int``, ``conv_gemm_int``,
    ``dequantize_weight`` or ``im2col``), or, for an eager
    call on a CUDA tensor ``x``, its Triton launcher itself (the op's CUDA implementation: same signature and
    results). The dispatcher costs tens of µs of host time per call, which an eager FLUX step pays ~1,300 times
    (benchmarks/results/host-profile-h100.json); traced calls keep the op, one graph node."""
    op, module = _FAST[name]
    if x.is_cuda and not torch.compiler.is_compiling():
        return getattr(_tk(module), name)
    return op


def quantized_linear(x: Tensor, smooth: Optional[Tensor], proj_down: Optional[Tensor], proj_up: Optional[Tensor],
                     w: Tensor, w_scales: Tensor, w_format: str, w_group: int, bias: Optional[Tensor],
                     act_dtype: str, act_group: int, out_dtype: Optional[torch.dtype] = None,
                     folded_down: Optional[Tensor] = None) -> Tensor:
    """``y = Q(x/smooth) · Q(W)ᵀ + (x/smooth) · proj_down · proj_up + bias`` as two kernels: activation
    quantization with the down-projection, then the integer GEMM with up-projection and bias in its epilogue.
    x: ``(..., K)`` 16-bit; w in ``w_format`` (``"int4b"``: :func:`dmq.kernels.layouts.int4_to_blocked`, or
    ``"int8"``); act_dtype ``"int4"`` / ``"int8"`` / ``"int4_2l"`` (two-level int4 groups of act_group, multiplied out
    to int8 and scaled per token); act_group / w_group: 0 (per token / per channel) or a multiple of 64.
    folded_down: ``(K, R)`` ``proj_down / smooth`` in x's dtype (:func:`dmq.kernels._common.fold_down`),
    given instead of proj_down when the caller caches it."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if folded_down is not None:   # the branch input from a cached proj_down / smooth: one GEMM, no folding
        codes, scales, _ = fast("quantize_act", x2)(x2, smooth, None, act_dtype, act_group, False)
        lowrank = x2 @ folded_down
        has_lr = folded_down.shape[1] > 0
    else:
        codes, scales, lowrank = fast("quantize_act", x2)(x2, smooth, proj_down, act_dtype, act_group, False)
        has_lr = proj_down is not None and proj_down.shape[1] > 0
    gemm_group = 0 if act_dtype == _ref_quant.TWO_LEVEL else act_group   # two-level: int8 products, per token
    y = fast("gemm_int", x2)(codes, scales, w, w_scales, w_format, gemm_group, w_group,
                             lowrank if has_lr else None, proj_up if has_lr else None, bias, out_dtype or x.dtype)
    return y.reshape(*lead, w.shape[0])


def fused_w4a4_lowrank(x: Tensor, smooth: Optional[Tensor], proj_down: Optional[Tensor],
                       proj_up: Optional[Tensor], qweight_packed: Tensor, wscales: Tensor, bias: Optional[Tensor],
                       group_size: int = 64) -> Tensor:
    """The SVDQuant W4A4 linear: ``qweight_packed`` is the residual in the blocked int4 layout
    (:func:`dmq.kernels.layouts.int4_to_blocked` of the stored ``qweight``, converted once); ``wscales`` fp16
    ``(N, Kp/g)`` for groups of ``group_size`` (activations use the same groups) or fp32 ``(N,)`` with
    ``group_size=0`` (per-channel weights, per-token activations). LoRAs are extra columns of proj_down / rows of
    proj_up."""
    return quantized_linear(x, smooth, proj_down, proj_up, qweight_packed, wscales, "int4b", group_size, bias,
                            "int4", group_size)
