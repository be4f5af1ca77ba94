"""State shared by every quantized GEMM layer: the stored quantized weight, the activation quantizer, bytes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dmq.errors import CalibrationRequiredError, ConfigError, NonFiniteError
from dmq.formats import Quantized, QuantSpec, dequantize, fake_quantize, quantize, storage_nbytes
from dmq.kernels.dispatch import find_kernel
from dmq.methods.lowrank import lowrank_split

__all__ = ["QuantModule", "QuantGemm", "outermost_quant_modules"]


class QuantModule(nn.Module):
    """Base of every module dmq swaps in. Subclasses provide ``nbytes()``, ``layer_spec()`` (JSON-able) and the
    classmethod ``from_layer_spec(spec)`` that rebuilds an empty module (meta buffers) of the same shapes."""

    def nbytes(self) -> int:
        raise NotImplementedError

    def layer_spec(self) -> dict[str, Any]:
        raise NotImplementedError


def outermost_quant_modules(model: nn.Module) -> dict[str, QuantModule]:
    """The dmq modules of ``model`` by name, leaving out those nested inside another dmq module."""
    found: dict[str, QuantModule] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantModule) and not any(name.startswith(f"{p}.") for p in found):
            found[name] = m
    return found


class QuantGemm(QuantModule):
    """Base of quantized layers whose weight is a GEMM operand viewed as ``(N, T, C)`` (see :mod:`dmq.formats`).

    Buffers: ``qweight`` (codes: int8 / fp8 ``(N, T * Cp)``, or uint8 ``(N, T * Cp // 2)`` for packed 4-bit),
    ``wscales`` (``()``, ``(N,)`` or ``(N, T * Cp // g)``), ``wzeros`` (int8, asymmetric only), ``wscale2`` (fp32
    scalar, nvfp4 only), ``input_scale`` (fp32 scalar, static activations only; NaN until calibrated). ``bias`` stays
    a 16-bit parameter. Optional 16-bit low-rank branch (SVDQuant's components and/or LoRAs): ``smooth`` ``(C,)``
    divides the input, ``proj_down`` ``(K, r)`` and ``proj_up`` ``(r, N)`` add ``(x/smooth)·proj_down·proj_up``;
    ``loras`` maps a LoRA name to its ``(start, rank)`` columns of the branch. Subclasses provide ``_gemm`` (the float
    op on dequantized operands), ``_branch`` (the branch on the smoothed input), the shapes and the channel dim.
    """

    act_channel_dim: int = -1

    def __init__(self, out_features: int, taps: int, channels: int, weight_spec: QuantSpec,
                 act_spec: QuantSpec | None, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 timestep_buckets: int = 0) -> None:
        super().__init__()
        self.out_features, self.taps, self.channels = out_features, taps, channels
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.compute_dtype = compute_dtype
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        if act_spec is not None and not act_spec.dynamic:
            shape = (timestep_buckets,) if timestep_buckets else ()
            self.register_buffer("input_scale", torch.full(shape, float("nan")))
        elif timestep_buckets:
            raise ConfigError("per-timestep activation ranges need a static activation quantizer")
        else:
            self.input_scale = None
        self.timestep_buckets = timestep_buckets
        self.timestep_state = None  # a dmq.nn.timestep.TimestepState when timestep_buckets > 0
        for name in ("smooth", "proj_down", "proj_up"):
            self.register_buffer(name, None)  # None buffers stay out of the state dict
        self.rank = 0
        self.loras: dict[str, tuple[int, int]] = {}

    # -- weights ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_finite(w: torch.Tensor, name: str) -> None:
        if w.device.type != "meta" and not torch.isfinite(w).all():
            raise NonFiniteError(f"{name}: the weight contains NaN or Inf; dmq will not quantize it")

    def _init_branch(self, w3: torch.Tensor, smooth: torch.Tensor | None, rank: int, name: str) -> torch.Tensor:
        """Smooth an ``(N, T, C)`` weight by ``smooth (C,)`` and split off its top-``rank`` singular components into
        the 16-bit branch (SVDQuant; rank 0 with smoothing is SmoothQuant); returns the residual to quantize."""
        n, t, c = w3.shape
        if rank < 0 or rank > min(n, t * c):
            raise ConfigError(f"{name}: rank {rank} is outside [0, min(N, K) = {min(n, t * c)}]")
        if smooth is not None:
            if smooth.shape != (c,) or not torch.isfinite(smooth).all() or (smooth <= 0).any():
                raise ConfigError(f"{name}: smoothing factors must be {c} finite positive values")
            self.register_buffer("smooth", smooth.to(device=w3.device, dtype=self.compute_dtype))
            w3 = w3.to(torch.float32) * self.smooth.to(torch.float32)
        if rank == 0:
            return w3
        down, up, residual = lowrank_split(w3.reshape(n, t * c), rank, self.compute_dtype)
        self.set_branch(down, up)
        return residual.reshape(n, t, c)

    def _set_weight(self, w3: torch.Tensor, name: str) -> None:
        """Quantize and store an ``(N, T, C)`` float weight."""
        self._check_finite(w3, name)
        q = quantize(w3, self.weight_spec)
        n = w3.shape[0]
        self.register_buffer("qweight", q.codes.reshape(n, -1).contiguous())
        self.register_buffer("wscales", q.scales.contiguous())
        for key, val in (("wzeros", q.zeros), ("wscale2", q.scale2)):
            if val is not None:
                self.register_buffer(key, val.contiguous())
            else:
                setattr(self, key, None)

    def quantized_weight(self) -> Quantized:
        n, t = self.out_features, self.taps
        return Quantized(self.qweight.reshape(n, t, -1), self.wscales, self.wzeros, self.wscale2)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``(N, T, C)``: what the quantized weight stands for."""
        return dequantize(self.quantized_weight(), self.weight_spec, self.channels)

    # -- activations -----------------------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the input activation (same shape and dtype) as the activation spec says."""
        if self.act_spec is None:
            return x
        scale = None
        if self.input_scale is not None:
            # checked eagerly only: a data-dependent branch would break a torch.compile graph
            if not torch.compiler.is_compiling() and torch.isnan(self.input_scale).any():
                raise CalibrationRequiredError(
                    f"{type(self).__name__} has a static activation quantizer that was never calibrated; "
                    "pass calibration data to dmq.quantize_pipeline")
            scale = self.input_scale
            if self.timestep_buckets:
                if self.timestep_state is None or self.timestep_state.bucket is None:
                    raise CalibrationRequiredError(f"{type(self).__name__} has per-timestep ranges but no timestep "
                                                   "context: call it through its denoiser")
                scale = scale.index_select(0, self.timestep_state.bucket.to(scale.device).reshape(1))[0]
        return fake_quantize(x, self.act_spec, scale, channel_dim=self.act_channel_dim)

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = find_kernel(self, x)
        if kernel is not None:
            return kernel(self, x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch: ``Q(x/λ)·Q(W)ᵀ + b`` plus the low-rank branch ``(x/λ)·proj_down·proj_up``, in x's dtype."""
        xs = self._smoothed(x)
        w = self.dequantized_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = self._gemm(self.quantize_input(xs), w, bias)
        if self.proj_down is not None:
            y = y + self._branch(xs)
        return y

    def _smoothed(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is None:
            return x
        shape = [1] * x.dim()
        shape[self.act_channel_dim] = -1
        return x / self.smooth.to(x.dtype).reshape(shape)

    def set_branch(self, proj_down: torch.Tensor | None, proj_up: torch.Tensor | None) -> None:
        """Replace the low-rank branch: ``proj_down (K, r)``, ``proj_up (r, N)`` (or both ``None``)."""
        if proj_down is None or proj_down.shape[1] == 0:
            self.register_buffer("proj_down", None)
            self.register_buffer("proj_up", None)
            self.rank = 0
            return
        self.register_buffer("proj_down", proj_down.contiguous())
        self.register_buffer("proj_up", proj_up.contiguous())
        self.rank = proj_down.shape[1]

    def _gemm(self, x: torch.Tensor, w3: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _branch(self, xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- bookkeeping ---------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes this layer stores: codes + scales (+ zeros) + bias (+ static input scale)."""
        total = storage_nbytes(self.weight_spec, self.out_features, self.taps, self.channels)
        if self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        if self.input_scale is not None:
            total += 4 * self.input_scale.numel()
        for t in (self.smooth, self.proj_down, self.proj_up):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def layer_spec(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_layer_spec` rebuilds an empty layer of the same shapes."""
        return {
            "type": type(self).__name__,
            "weight": self.weight_spec.to_dict(),
            "activation": self.act_spec.to_dict() if self.act_spec else None,
            "bias": self.bias is not None,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "rank": self.rank,
            "timestep_buckets": self.timestep_buckets,
            "smooth": self.smooth is not None,
            "loras": {name: list(cols) for name, cols in self.loras.items()},
            **self._shape_spec(),
        }

    def _shell_branch(self, spec: dict[str, Any], k: int) -> None:
        """Give an empty (meta) layer the smoothing / branch buffers a saved spec says it has."""
        with torch.device("meta"):
            if spec.get("smooth"):
                self.register_buffer("smooth", torch.empty(self.channels, dtype=self.compute_dtype))
            if spec.get("rank"):
                self.set_branch(torch.empty(k, spec["rank"], dtype=self.compute_dtype),
                                torch.empty(spec["rank"], self.out_features, dtype=self.compute_dtype))
        self.loras = {name: tuple(cols) for name, cols in spec.get("loras", {}).items()}

    def _shape_spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        act = self.act_spec.describe() if self.act_spec else "16-bit"
        return f"out={self.out_features}, taps={self.taps}, in={self.channels}, w={self.weight_spec.describe()}, " \
               f"a={act}, rank={self.rank}, smooth={self.smooth is not None}"
