"""Range estimators: from collected statistics (or a raw tensor) to the fp32 scale a static quantizer uses.

The scale follows :func:`dmq.formats.quantize`'s convention for symmetric formats: ``value = code * scale`` with
``scale = clip / qmax`` (127 for int8, 7 for int4, 448 for fp8 e4m3, 6 for fp4 e2m1). Shapes: ``()`` per tensor
(what ``QuantGemm.input_scale`` holds), ``(C,)`` per input channel of collected activations, ``(R,)`` per row
(output channel) of a raw weight tensor ``(R, ...)``.

Methods:

- ``"minmax"``: ``clip = max |x|``.
- ``"percentile"``: ``clip`` = the ``percentile``-th percentile of ``|x|`` (from the streamed histogram, linear
  inside a bin; exact ``torch.quantile`` on a raw tensor).
- ``"mse"``: ``clip = r * max |x|`` for the ratio ``r`` in ``linspace(min_ratio, 1, grid)`` that minimizes the
  mean ``|Q(x) - x|^norm``, ``Q`` being the spec's own quantizer (so fp8 and int formats are both searched
  faithfully), over: the streamed histogram (``source="histogram"``, the default when collected: it covers every
  value seen, so rare outliers weigh in as they should; each bin's count is spread over 8 points inside it), or
  the reservoir of sampled values (``source="reservoir"``: exact values, but a sample), or the raw tensor.
"""

from __future__ import annotations

from typing import Mapping

import torch

from dmq.calibration.stats import LayerStats, StatsView
from dmq.errors import ConfigError, NonFiniteError
from dmq.formats import QuantSpec, fp4_decode, fp4_encode

__all__ = ["estimate_scale", "estimate_bucket_scales", "activation_scales", "apply_input_scales", "channel_absmax",
           "static_activation_targets", "calibrate_activation_scales", "METHODS"]

METHODS = ("minmax", "percentile", "mse")
_MIN_SCALE = 1e-12
_HIST_SUBPOINTS = 8


def _check_spec(spec: QuantSpec) -> None:
    if not spec.symmetric:
        raise ConfigError("static ranges are estimated for symmetric formats only (dmq.formats supports no static "
                          "asymmetric activation quantization)")
    if spec.dtype == "nvfp4":
        raise ConfigError("nvfp4 scales are computed per group at run time; there is no static nvfp4 range")


def _to_scale(clip: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return (clip.to(torch.float32) / spec.qtype.qmax).clamp(min=_MIN_SCALE)


def _hist_percentile(view: StatsView, q: float) -> float:
    h = view.hist
    total = float(h.sum())
    if total <= 0 or view.hist_max <= 0:
        return 0.0
    cdf = torch.cumsum(h, 0) / total
    i = int(torch.searchsorted(cdf, torch.tensor([q], dtype=cdf.dtype)).clamp(max=len(h) - 1))
    lo_cdf = float(cdf[i - 1]) if i > 0 else 0.0
    frac = 0.0 if float(h[i]) == 0 else (q - lo_cdf) / (float(cdf[i]) - lo_cdf)
    width = view.hist_max / len(h)
    return min((i + min(max(frac, 0.0), 1.0)) * width, view.absmax)


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Symmetric fake quantization with broadcast scales, exactly as :func:`dmq.formats.quantize` /
    ``dequantize`` compute it for a static fp32 scale (vectorized over candidate scales)."""
    qt = spec.qtype
    s = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = x / s
    if spec.dtype == "fp8_e4m3":
        q = y.clamp(qt.qmin, qt.qmax).to(torch.float8_e4m3fn).to(torch.float32)
    elif spec.dtype == "fp4_e2m1":
        q = fp4_decode(fp4_encode(y.clamp(qt.qmin, qt.qmax)))
    else:
        q = torch.round(y).clamp(qt.qmin, qt.qmax)
    return q * s


def _mse_clip(values: torch.Tensor, amax: torch.Tensor, spec: QuantSpec, grid: int, min_ratio: float,
              norm: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Best clip per row of ``values`` (R, N) given the rows' abs-max (R,); ``weights`` (R, N): how many values
    each entry stands for (histogram search), else every entry counts once."""
    x = values.to(torch.float32)
    r, n = x.shape
    w = None if weights is None else (weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-30)).float()
    ratios = torch.linspace(min_ratio, 1.0, grid, device=x.device)
    errs = []
    step = max(1, (1 << 23) // max(r * n, 1))  # candidates per chunk: bounded temporary memory
    for c0 in range(0, grid, step):
        clip = amax.to(torch.float32).unsqueeze(0) * ratios[c0:c0 + step].unsqueeze(1)  # (G, R)
        scale = _to_scale(clip, spec).unsqueeze(-1)  # (G, R, 1)
        e = (_fake_quant(x.unsqueeze(0), scale, spec) - x.unsqueeze(0)).abs().pow(norm)  # (G, R, N)
        errs.append(e.mean(dim=-1) if w is None else (e * w.unsqueeze(0)).sum(dim=-1))
    err = torch.cat(errs)  # (grid, R)
    best = torch.argmin(err, dim=0)  # first minimum: the smallest ratio among ties
    return amax.to(torch.float32) * ratios[best]


def estimate_scale(stats: LayerStats | StatsView | torch.Tensor, spec: QuantSpec, method: str = "minmax", *,
                   granularity: str = "tensor", bucket: int | None = None, percentile: float = 99.99,
                   grid: int = 100, min_ratio: float = 0.02, norm: float = 2.0, source: str = "auto") -> torch.Tensor:
    """The fp32 static scale for ``spec`` (symmetric int8/int4/fp8/fp4) from collected statistics or a tensor.

    ``stats``: a :class:`LayerStats` (``bucket`` selects a timestep bucket), one of its views, or a raw tensor
    (e.g. a weight ``(R, ...)``). ``granularity``: ``"tensor"`` → shape ``()``; ``"channel"`` → per input channel
    ``(C,)`` for statistics (min-max only: histograms and reservoirs are per tensor) or per row ``(R,)`` for a raw
    tensor. ``method``: see the module docstring. A tensor or layer with no data (all zeros, never called) gets the
    smallest positive scale rather than 0.
    """
    _check_spec(spec)
    if method not in METHODS:
        raise ConfigError(f"unknown range method {method!r}; valid: {', '.join(METHODS)}")
    if granularity not in ("tensor", "channel"):
        raise ConfigError(f"granularity must be 'tensor' or 'channel', got {granularity!r}")
    if not 0 < percentile <= 100:
        raise ConfigError(f"percentile must be in (0, 100], got {percentile}")
    if source not in ("auto", "histogram", "reservoir"):
        raise ConfigError(f"source must be 'auto', 'histogram' or 'reservoir', got {source!r}")
    if not 0 < min_ratio <= 1 or grid < 1:
        raise ConfigError(f"mse search needs 0 < min_ratio <= 1 and grid >= 1, got {min_ratio}, {grid}")

    if isinstance(stats, torch.Tensor):
        x = stats.detach().to(torch.float32)
        if not torch.isfinite(x).all():
            raise NonFiniteError("estimate_scale: the tensor contains NaN or Inf")
        rows = x.reshape(1, -1) if granularity == "tensor" else x.reshape(x.shape[0], -1)
        amax = rows.abs().amax(dim=1)
        if method == "minmax":
            clip = amax
        elif method == "percentile":
            a = rows.abs()
            if a.shape[1] > 1 << 24:  # torch.quantile's input limit: use an even subsample
                a = a[:, torch.linspace(0, a.shape[1] - 1, 1 << 24).long()]
            clip = torch.quantile(a, percentile / 100.0, dim=1)
        else:
            clip = _mse_clip(rows, amax, spec, grid, min_ratio, norm)
        scale = _to_scale(clip, spec)
        return scale.reshape(()) if granularity == "tensor" else scale

    view = stats.view(bucket) if isinstance(stats, LayerStats) else stats
    name = getattr(stats, "name", "layer")
    if granularity == "channel":
        if method != "minmax":
            raise ConfigError("per-channel ranges of collected activations support method='minmax' only")
        if view.channel_absmax is None:
            raise ConfigError(f"{name}: no per-channel abs-max was collected (StatsConfig(channel_absmax=True), "
                              "and bucket=None)")
        return _to_scale(view.channel_absmax, spec)
    if view.count == 0:
        return _to_scale(torch.tensor(0.0), spec)
    amax = torch.tensor(view.absmax, dtype=torch.float32)
    if method == "minmax":
        clip = amax
    elif method == "percentile":
        if view.hist is None:
            raise ConfigError(f"{name}: no histogram was collected (StatsConfig(histogram=True))")
        clip = torch.tensor(_hist_percentile(view, percentile / 100.0), dtype=torch.float32)
    else:
        if source == "histogram" or (source == "auto" and view.hist is not None):
            if view.hist is None:
                raise ConfigError(f"{name}: no histogram was collected (StatsConfig(histogram=True))")
            # every bin stands for its count of values spread evenly over _HIST_SUBPOINTS points inside it
            bins = len(view.hist)
            width = view.hist_max / bins
            u = (torch.arange(bins * _HIST_SUBPOINTS, dtype=torch.float64) + 0.5) / _HIST_SUBPOINTS * width
            w = view.hist.repeat_interleave(_HIST_SUBPOINTS)
            keep = w > 0
            clip = _mse_clip(u[keep].float().reshape(1, -1), amax.reshape(1), spec, grid, min_ratio, norm,
                             w[keep].reshape(1, -1))[0]
        else:
            if view.reservoir is None:
                raise ConfigError(f"{name}: no reservoir was collected (StatsConfig(reservoir=True))")
            clip = _mse_clip(view.reservoir.reshape(1, -1), amax.reshape(1), spec, grid, min_ratio, norm)[0]
    return _to_scale(clip, spec).reshape(())


def estimate_bucket_scales(stats: LayerStats, spec: QuantSpec, method: str = "minmax", **kwargs) -> torch.Tensor:
    """fp32 ``(num_buckets,)`` per-tensor scales, one per timestep bucket (TFMQ-DM-style finite-set ranges); a
    bucket that saw no data gets the all-timestep scale."""
    if stats.num_buckets == 0:
        raise ConfigError(f"{stats.name}: collected without timestep buckets (CalibrationConfig("
                          "per_timestep_buckets=N))")
    fallback = estimate_scale(stats, spec, method, **kwargs)
    out = []
    for b in range(stats.num_buckets):
        out.append(estimate_scale(stats, spec, method, bucket=b, **kwargs) if stats.view(b).count else fallback)
    return torch.stack(out)


def channel_absmax(stats: LayerStats) -> torch.Tensor:
    """fp32 ``(C,)``: per-input-channel ``max |x|`` over every recorded call (SmoothQuant's activation statistic;
    C is the last dim of a Linear's input, dim 1 of a Conv's)."""
    view = stats.view()
    if view.channel_absmax is None:
        if view.count == 0:
            raise ConfigError(f"{stats.name}: no data was recorded for this layer (was it called?)")
        raise ConfigError(f"{stats.name}: collected with StatsConfig(channel_absmax=False)")
    return view.channel_absmax


def activation_scales(stats: Mapping[str, LayerStats], specs: Mapping[str, QuantSpec], method: str = "mse",
                      **kwargs) -> dict[str, torch.Tensor]:
    """``{layer name: fp32 () scale}`` for every layer in ``specs`` (each layer's activation spec). A layer that
    has no statistics, or never saw data, is a ConfigError naming it."""
    out = {}
    for name, spec in specs.items():
        st = stats.get(name)
        if st is None or st.view().count == 0:
            raise ConfigError(f"{name}: no activations were collected for this layer; it is not called by the "
                              "pipeline at the calibrated timesteps, or was not in collect()'s layer_names")
        out[name] = estimate_scale(st, spec, method, **kwargs)
    return out


def apply_input_scales(layers: Mapping[str, torch.nn.Module], scales: Mapping[str, torch.Tensor]) -> None:
    """Write calibrated scales into the ``input_scale`` buffers of quantized layers (all checked first, so an error
    changes nothing)."""
    for name, scale in scales.items():
        layer = layers.get(name)
        if layer is None or getattr(layer, "input_scale", None) is None:
            raise ConfigError(f"{name}: not a quantized layer with a static activation quantizer")
        if scale.shape != layer.input_scale.shape:
            raise ConfigError(f"{name}: scale shape {tuple(scale.shape)} != input_scale shape "
                              f"{tuple(layer.input_scale.shape)}")
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise NonFiniteError(f"{name}: calibrated scale {scale} is not a finite positive number")
    with torch.no_grad():
        for name, scale in scales.items():
            buf = layers[name].input_scale
            buf.copy_(scale.to(device=buf.device, dtype=buf.dtype))


def static_activation_targets(built: Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """The layers among ``built`` (module name → dmq module, e.g. from ``prepare_model``) whose activation
    quantizer is static, keyed by the statistics name :func:`~dmq.calibration.collect.collect` takes: the module
    name, or ``"name[a:b]"`` for each part of a split-shortcut layer (its input channels ``[a, b)``)."""
    out: dict[str, torch.nn.Module] = {}
    for name, layer in built.items():
        parts = getattr(layer, "parts", None)
        if parts is not None and hasattr(layer, "bounds"):
            for (a, b), part in zip(layer.bounds, parts):
                if getattr(part, "input_scale", None) is not None:
                    out[f"{name}[{a}:{b}]"] = part
        elif getattr(layer, "input_scale", None) is not None:
            out[name] = layer
    return out


def calibrate_activation_scales(pipe, built: Mapping[str, torch.nn.Module], config, *, method: str = "mse",
                                stats=None, progress: bool = True, **estimator_kwargs):
    """Calibrate every static activation quantizer among ``built`` in one collection run on ``pipe`` (whose
    denoiser must still be the floating-point one, i.e. before ``commit_model``) and write the scales into their
    ``input_scale`` buffers (all estimated before any is written). Returns the
    :class:`~dmq.calibration.collect.CalibrationResult` (its ``stats`` also give per-channel abs-max and, with
    ``per_timestep_buckets``, per-bucket ranges)."""
    from dmq.calibration.collect import collect
    from dmq.calibration.stats import StatsConfig

    targets = static_activation_targets(built)
    if not targets:
        raise ConfigError("none of the given layers has a static activation quantizer to calibrate")
    result = collect(pipe, list(targets), config, stats=stats or StatsConfig(), progress=progress)
    scales = activation_scales(result.stats, {n: layer.act_spec for n, layer in targets.items()}, method,
                               **estimator_kwargs)
    apply_input_scales(targets, scales)
    return result
