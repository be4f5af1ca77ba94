"""Fast forwards for the quantized layers, registered with :mod:`dmq.kernels.dispatch` on import.

``import dmq.kernels.linear`` registers kernels for :class:`~dmq.nn.linear.QuantLinear` and
:class:`~dmq.nn.conv.QuantConv2d`; they run when the input is a 16-bit CUDA tensor on a GPU of compute capability
≥ 8.0 and the layer's specs are supported (below); everything else keeps the layer's reference forward.
SVDQuant-style layers (``smooth``, ``proj_down``, ``proj_up`` beside ``qweight``/``wscales``) are registered with
:func:`register_svdquant`.

Supported (dynamic, symmetric activations; symmetric weights):

- int8 / int4 activations per token or in groups of a multiple of 64 × int8 / int4 weights per channel or in
  groups of a multiple of 64: :func:`dmq.kernels.ops.quantized_linear` (w8a8, w4a8, w4a4, smoothquant/svdquant).
  Two-level int4 groups (:attr:`dmq.formats.QuantSpec.two_level`) on either side become int8 ``code · sub`` with
  per-token / per-channel scales, so they run on the per-row-scaled int8 GEMM (TMA on Hopper).
- weight-only int4 / int8 (w4a16, modulation linears): GEMV for M ≤ 16, dequantize + cuBLAS above.
- fp8 e4m3 per token × fp8 per channel (K, N multiples of 16): ``torch._scaled_mm``.
- nvfp4 × nvfp4: exact bf16 dequantization + cuBLAS (see :mod:`dmq.kernels.triton.nvfp4`).
- convolutions: the same int GEMM on an NHWC im2col of the *quantized* input (per-pixel scales become per-tap
  group scales), when the padded channel count is a multiple of 64, with smoothing and the low-rank branch (SVDQuant,
  LoRAs: the down-projection as a 16-bit conv, the up-projection in the epilogue), or without the im2col through
  the implicit-GEMM kernel (:data:`IMPLICIT_CONV`); weight-only convs dequantize + cuDNN (with a branch: the
  reference).

The kernel layout of a layer's weight (blocked int4, see :mod:`dmq.kernels.layouts`) is built on the first call
(or by :func:`prepare`) and cached on the layer as a plain attribute (not in the state dict).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dmq.formats import padded_channels
from dmq.kernels import ops
from dmq.kernels._common import FP8_CAPABILITY, HAS_TRITON, capability, fold_down, interpreting
from dmq.kernels.dispatch import register_kernel
from dmq.kernels.layouts import int4_to_blocked
from dmq.kernels.reference.gemm import conv_same_size
from dmq.kernels.reference.im2col import conv_out_hw
from dmq.kernels.reference.quant_act import TWO_LEVEL
from dmq.nn.conv import QuantConv2d
from dmq.nn.linear import QuantLinear

__all__ = ["prepare", "prepare_model", "linear_forward", "conv_forward", "svdquant_forward", "register_svdquant",
           "supported", "INT4_GEMM"]

# How int4 weights reach the int8 tensor cores: "int4b" unpacks the blocked layout inside the GEMM's K loop;
# "unpack" expands it to an int8 workspace per call and runs the int8 GEMM (TMA on Hopper; weights stay resident as
# 4-bit); "auto" picks what was faster on the H100 (benchmarks/results/kernels-h100.json): "unpack" when neither
# side has group scales (w4a4 per-channel + rank 32 at FLUX qkv: 1.13x vs 0.76x bf16 in-loop), in-kernel with group
# scales (w4a4 g64: 0.40x vs 0.35x; w4a8 g128: 0.60x vs 0.57x).
INT4_GEMM = "auto"

# Where the integer paths divide x by ``smooth`` inside a compiled graph: True = before the quantizer, as the layer
# reference's own 16-bit division, which Inductor fuses into the kernel that produced x (a norm, an activation, the
# attention output's layout copy), so that the quantizer runs without smoothing; its per-column reciprocal was ~40%
# of its time on the H200 (two-level int4 at 4096 x 3072: 22.5 against 13.7 us; 8192 x 640: 16.6 against 9.7 us,
# benchmarks/results/quant-variants-h200.json). Eager calls always smooth inside the quantizer: a separate division
# would be one more pass over x.
SMOOTH_IN_GRAPH = True

# Quantized stride-1 convolutions that keep the input size (a U-Net's 3×3 convs), with int8 weights (w8a8, two-level
# int4) and one activation scale per pixel: True = the implicit-GEMM kernel (:func:`dmq.kernels.ops.conv_gemm_int`,
# Hopper's TMA reads each tap's rows from the NHWC codes), False = im2col of codes and scales, then the GEMM. Off
# until measured on a GPU (benchmarks/conv_gemm.py's ``-implicit`` rows); checked bit-exact against the im2col path.
IMPLICIT_CONV = False

_CACHE_ATTR = "_dmq_kernel_weights"


def _gpu_ok(x: torch.Tensor) -> bool:
    if not (HAS_TRITON and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    return capability(x) >= (8, 0)


def _group(spec) -> int:
    return spec.group_size if spec.granularity == "group" else 0


def _act_args(spec) -> tuple[str, int, int]:
    """(quantize_act dtype, its group size, the GEMM's activation group): two-level groups reach the GEMM as int8
    ``code · sub`` with one scale per token."""
    if spec.two_level:
        return TWO_LEVEL, spec.group_size, 0
    return spec.dtype, _group(spec), _group(spec)


def _int_ok(spec, weight: bool) -> bool:
    if spec.dtype not in ("int4", "int8") or not spec.symmetric:
        return False
    grans = ("channel", "group") if weight else ("token", "group")
    if spec.granularity not in grans or (not weight and not spec.dynamic):
        return False
    return spec.granularity != "group" or spec.group_size % 64 == 0


def _path(layer) -> str | None:
    """Which kernel path serves this layer's specs, or None (reference)."""
    ws, acts = layer.weight_spec, layer.act_spec
    if getattr(layer, "wzeros", None) is not None:
        return None
    if acts is None:   # (two-level weights keep their per-channel scale for an int8 GEMM: reference here)
        return "weight_only" if _int_ok(ws, weight=True) and not ws.two_level else None
    if ws.dtype == "nvfp4" and acts.dtype == "nvfp4" and acts.dynamic:
        return "nvfp4"
    if ws.dtype == "fp8_e4m3" and acts.dtype == "fp8_e4m3":
        ok = ws.granularity == "channel" and acts.granularity == "token" and acts.dynamic
        return "fp8" if ok and layer.channels % 16 == 0 and layer.out_features % 16 == 0 and layer.taps == 1 \
            else None
    if _int_ok(ws, weight=True) and _int_ok(acts, weight=False):
        return "int"
    return None


def supported(layer, x: torch.Tensor) -> bool:
    """The dispatch predicate: a supported GPU and input, and specs a kernel path serves."""
    if not _gpu_ok(x):
        return False
    path = _path(layer)
    if path is None or (path == "fp8" and capability(x) < FP8_CAPABILITY):
        return False
    if isinstance(layer, QuantConv2d):
        if path == "weight_only":
            return True
        if path != "int":
            return False
        cp_w = padded_channels(layer.weight_spec, layer.channels)
        cp_a = padded_channels(layer.act_spec, layer.channels)
        return cp_w == cp_a and cp_a % 64 == 0
    return True


# -- weights in kernel layout --------------------------------------------------------------------------------------
def _k_act(layer) -> int:
    """Codes per GEMM row on the activation side (all taps)."""
    if layer.act_spec is None or layer.act_spec.dtype in ("fp8_e4m3", "nvfp4"):
        return layer.taps * layer.channels
    return layer.taps * padded_channels(layer.act_spec, layer.channels)


def _version(t: torch.Tensor) -> int:
    """In-place modification counter of ``t``; 0 for tensors made under ``torch.inference_mode()``, which keep
    none (a model quantized inside inference mode is keyed by storage alone)."""
    return 0 if t.is_inference() else t._version


def prepare(layer) -> dict[str, Any]:
    """Convert the layer's stored weight to the kernel layout once (cached on the layer; recomputed when the
    device changes or, outside torch.compile, when ``qweight`` is replaced or modified in place)."""
    qw = layer.qweight
    key = (qw.device, qw.data_ptr(), _version(qw)) if not torch.compiler.is_compiling() else None
    cache = layer.__dict__.get(_CACHE_ATTR)
    if cache is not None and (key is None or cache["key"] == key):
        return cache
    ws = layer.weight_spec
    wg = _group(ws)
    scales = layer.wscales
    k_a = _k_act(layer)
    if ws.dtype == "int4":
        w, fmt = int4_to_blocked(qw, k_a), "int4b"
    elif ws.dtype == "int8":
        w, fmt = qw, "int8"
        if w.shape[1] < k_a:
            w = F.pad(w, (0, k_a - w.shape[1]))
    else:
        w, fmt = qw, "fp4" if ws.dtype == "nvfp4" else ws.dtype
    if wg and scales.shape[1] * wg < k_a:        # activation padding reaches past the weight's last group
        scales = F.pad(scales, (0, -(-k_a // wg) - scales.shape[1]))
    cache = {"key": key, "w": w.contiguous(), "w_format": fmt, "w_group": wg, "w_scales": scales.contiguous(),
             "w_scale2": layer.wscale2 if ws.two_level else None, "k_act": k_a}
    layer.__dict__[_CACHE_ATTR] = cache
    return cache


def prepare_model(model: torch.nn.Module) -> int:
    """Convert every quantized layer's weight to its kernel layout now (call after loading and moving the model,
    before ``torch.compile``, so that compiled graphs only read the cache). Returns the number of layers."""
    count = 0
    for mod in model.modules():
        if isinstance(mod, (QuantLinear, QuantConv2d)) and mod.qweight.device.type == "cuda" and _path(mod):
            prepare(mod)
            count += 1
    return count


def _folded_down(prep: dict[str, Any], smooth: torch.Tensor | None, proj_down: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """``proj_down / smooth`` in ``dtype`` (:func:`dmq.kernels._common.fold_down`), cached beside the kernel weight
    until the branch or the smoothing changes (LoRAs replace proj_down); computed in the graph when compiling."""
    if torch.compiler.is_compiling():
        return fold_down(smooth, proj_down, dtype)
    key = (proj_down.data_ptr(), _version(proj_down), dtype,
           None if smooth is None else (smooth.data_ptr(), _version(smooth)))
    cached = prep.get("folded_down")
    if cached is None or cached[0] != key:
        cached = prep["folded_down"] = (key, fold_down(smooth, proj_down, dtype))
    return cached[1]


def _graph_smoothing(x: torch.Tensor, smooth: torch.Tensor | None,
                     channel_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x / smooth, None)`` in x's dtype when tracing a compiled graph (:data:`SMOOTH_IN_GRAPH`), else ``(x,
    smooth)`` for the quantizer. smooth: ``(C,)`` along ``channel_dim`` of x."""
    if smooth is None or not (SMOOTH_IN_GRAPH and torch.compiler.is_compiling()):
        return x, smooth
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return x / smooth.to(x.dtype).reshape(shape), None


def _int_weight(prep: dict[str, Any], act_group: int) -> tuple[torch.Tensor, str, torch.Tensor, int]:
    """The GEMM's weight operand: ``(w, w_format, w_scales, w_group)``. Two-level int4 is expanded to int8
    ``code · sub`` per call (the weight stays resident as 4-bit) and scaled per channel in the epilogue."""
    expand = ops.fast("dequantize_weight", prep["w"])
    if prep["w_scale2"] is not None:
        w8 = expand(prep["w"], prep["w_scales"], "int4b", prep["w_group"], prep["k_act"], torch.int8)
        return w8, "int8", prep["w_scale2"], 0
    mode = INT4_GEMM if INT4_GEMM != "auto" else ("unpack" if not (act_group or prep["w_group"]) else "int4b")
    if prep["w_format"] == "int4b" and mode == "unpack":
        w8 = expand(prep["w"], prep["w_scales"], "int4b", prep["w_group"], prep["k_act"], torch.int8)
        return w8, "int8", prep["w_scales"], prep["w_group"]
    return prep["w"], prep["w_format"], prep["w_scales"], prep["w_group"]


# -- linear ----------------------------------------------------------------------------------------------------------
def linear_forward(layer, x: torch.Tensor, smooth=None, proj_down=None, proj_up=None) -> torch.Tensor:
    """Kernel forward of a QuantLinear (or an SVDQuant layer when smooth / proj_down / proj_up are given)."""
    prep = prepare(layer)
    path = _path(layer)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = layer.out_features
    if path == "int":
        act_dtype, act_group, gemm_group = _act_args(layer.act_spec)
        w, fmt, w_scales, w_group = _int_weight(prep, gemm_group)
        x2, smooth = _graph_smoothing(x2, smooth, 1)
        folded = _folded_down(prep, smooth, proj_down, x2.dtype) if proj_down is not None else None
        y = ops.quantized_linear(x2, smooth, None, proj_up, w, w_scales, fmt, w_group, layer.bias, act_dtype,
                                 act_group, folded_down=folded)
    elif path == "weight_only":
        y = ops.weight_only_linear(x2, prep["w"], prep["w_scales"], prep["w_format"], prep["w_group"], layer.bias)
    elif path == "fp8":
        y = ops.fp8_linear(x2, prep["w"], prep["w_scales"], layer.bias)
    elif path == "nvfp4":
        y = ops.nvfp4_linear(x2, smooth, proj_down, proj_up, prep["w"], prep["w_scales"], layer.wscale2,
                             layer.bias)
    else:
        raise ValueError(f"no kernel path for {layer}")
    if path in ("weight_only", "fp8") and proj_down is not None:
        xs = x2 / smooth.to(x2.dtype) if smooth is not None else x2
        y = y + (xs @ proj_down.to(x2.dtype)) @ proj_up.to(x2.dtype)
    return y.reshape(*lead, n)


# -- conv ------------------------------------------------------------------------------------------------------------
def conv_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """Kernel forward of a QuantConv2d (an SVDQuant one too): quantize the smoothed input pixels (read from NCHW in
    place, codes written as NHWC rows), im2col the int8 codes and their scales on the GPU, run the int GEMM with
    per-(pixel, tap) activation scales as K-groups of one tap (or, with :data:`IMPLICIT_CONV`, the implicit-GEMM
    kernel on the codes themselves). The low-rank branch's kh×kw down-projection runs as a 16-bit convolution of x
    with ``proj_down / smooth`` (:func:`_folded_down`), its up-projection in the GEMM's epilogue."""
    prep = prepare(layer)
    kh, kw = layer.kernel_size
    cin, cout = layer.in_channels, layer.out_channels
    if _path(layer) == "weight_only":
        wd = ops.dequantize_weight(prep["w"], prep["w_scales"], prep["w_format"], prep["w_group"],
                                   layer.taps * padded_channels(layer.weight_spec, cin), x.dtype)
        wd = wd.reshape(cout, kh, kw, -1)[..., :cin].permute(0, 3, 1, 2)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.conv2d(x, wd, bias, layer.stride, layer.padding, layer.dilation)
    act_dtype, act_group, ag = _act_args(layer.act_spec)
    b, _, h, w = x.shape
    x, smooth = _graph_smoothing(x, layer.smooth, 1)
    proj_down = layer.proj_down
    codes, scales, _ = ops.fast("quantize_act", x)(x, smooth, None, act_dtype, act_group, False)   # NCHW in place
    cp = codes.shape[1]
    ho, wo = conv_out_hw(h, w, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    w_, fmt, w_scales, w_group = _int_weight(prep, ag or cp)
    lowrank = proj_up = None
    if proj_down is not None and proj_down.shape[1] > 0:
        down = _folded_down(prep, smooth, proj_down, x.dtype)      # (K, r), K ordered (kh, kw, Cin)
        r = down.shape[1]
        down = down.T.reshape(r, kh, kw, cin).permute(0, 3, 1, 2)
        lowrank = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation).permute(0, 2, 3, 1)
        lowrank, proj_up = lowrank.reshape(-1, r), layer.proj_up
    if _implicit(layer, x, fmt, ag, w_group):
        y = ops.fast("conv_gemm_int", x)(codes.reshape(b, h, w, cp), scales.reshape(b, h, w), w_, w_scales, kh, kw,
                                         *layer.padding, *layer.dilation, lowrank, proj_up, layer.bias, x.dtype)
    else:
        geometry = (kh, kw, *layer.stride, *layer.padding, *layer.dilation)
        im2col = ops.fast("im2col", x)
        a = im2col(codes.reshape(b, h, w, cp), *geometry)
        a_scales = im2col(scales.reshape(b, h, w, -1), *geometry)
        y = ops.fast("gemm_int", x)(a, a_scales, w_, w_scales, fmt, ag or cp, w_group, lowrank, proj_up,
                                    layer.bias, x.dtype)
    return y.reshape(b, ho, wo, cout).permute(0, 3, 1, 2)


def _implicit(layer, x: torch.Tensor, w_format: str, act_group: int, w_group: int) -> bool:
    """Whether :data:`IMPLICIT_CONV` serves this call: stride 1, output size = input size, int8 weights with
    per-channel scales, per-pixel activation scales, and a TMA GPU (compute capability 9.0; the interpreter in
    the CPU tests)."""
    if not (IMPLICIT_CONV and w_format == "int8" and not act_group and not w_group and layer.stride == (1, 1)
            and conv_same_size(*layer.kernel_size, *layer.padding, *layer.dilation)):
        return False
    return capability(x) >= (9, 0) if x.is_cuda else interpreting()


# -- SVDQuant ----------------------------------------------------------------------------------------------------------
def svdquant_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """Kernel forward of an SVDQuant linear: ``y = Q(x/smooth)·Q(R)ᵀ + (x/smooth)·proj_down·proj_up + b`` with the
    down-projection fused into activation quantization and the up-projection into the GEMM epilogue (rank 0 =
    SmoothQuant: no branch). x/smooth is computed in fp32 (the layer's reference divides in x's dtype)."""
    return linear_forward(layer, x, getattr(layer, "smooth", None), getattr(layer, "proj_down", None),
                          getattr(layer, "proj_up", None))


def _svdquant_ok(layer, x: torch.Tensor) -> bool:
    pd = getattr(layer, "proj_down", None)
    return _gpu_ok(x) and _path(layer) in ("int", "nvfp4") and getattr(layer, "taps", 1) == 1 and \
        (pd is None or (pd.dtype in (torch.float16, torch.bfloat16) and pd.shape[1] <= 256))


def register_svdquant(layer_type: type) -> None:
    """Register the fused kernels for an SVDQuant layer class (attributes ``smooth`` (K,) or None, ``proj_down``
    (K, r), ``proj_up`` (r, N), plus the QuantLinear buffers and specs). Register it before QuantLinear's kernels
    can match it: this module's QuantLinear predicate only accepts the exact QuantLinear class."""
    register_kernel(layer_type, _svdquant_ok, svdquant_forward)


def _plain_linear_ok(layer, x):
    return type(layer) is QuantLinear and supported(layer, x)


def _conv_ok(layer, x):
    # weight-only convs have no fused branch: with one (SVDQuant, LoRAs) they use the reference
    return supported(layer, x) and (_path(layer) == "int" or (layer.proj_down is None and layer.smooth is None))


def _register() -> None:
    # a plain QuantLinear may carry a branch too (LoRAs): pass it like an SVDQuant layer's
    register_kernel(QuantLinear, _plain_linear_ok, svdquant_forward)
    register_kernel(QuantConv2d, _conv_ok, conv_forward)   # SVDQuantConv2d too: the same forward, default rank
    try:
        from dmq.nn.svdquant import SVDQuantLinear
    except ModuleNotFoundError:  # pragma: no cover - trees without SVDQuant layers
        return
    register_svdquant(SVDQuantLinear)


_register()
