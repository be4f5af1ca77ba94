"""Streaming per-layer activation statistics with a fixed memory footprint.

A :class:`LayerStats` is updated with every recorded input of one layer and never keeps the activations
themselves. Its buffers are allocated at the first update and never grow:

========================  =======================  ==========================================================
buffer                    shape, dtype             what
========================  =======================  ==========================================================
``count``                 ``(R,)`` int64           values seen
``min`` / ``max``         ``(R,)`` fp32            running extrema
``hist``                  ``(R, bins)`` fp64       histogram of ``|x|`` over ``[0, hist_max]``
``hist_max``              ``(R,)`` fp32            histogram range; doubles (merging bin pairs) when exceeded
``reservoir``             ``(R, K)`` fp32          K values, each an independent uniform draw from the stream
``channel_absmax``        ``(C,)`` fp32            per-input-channel ``max |x|`` (global row only)
========================  =======================  ==========================================================

``R = 1 + num_buckets``: row 0 is over all recorded timesteps, row ``1 + b`` over timestep bucket ``b``.
Bytes per layer: ``R * (8 + 4 + 4 + 4 + 8 * bins + 4 * K) + 4 * C`` — independent of how many samples are seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmq.errors import ConfigError

__all__ = ["StatsConfig", "LayerStats", "StatsView"]


@dataclass(frozen=True)
class StatsConfig:
    """Which statistics collection keeps per layer, and their fixed sizes.

    ``histogram_bins`` (power of two, for percentiles), ``reservoir_size`` (values kept for MSE search),
    ``channel_absmax`` (per-input-channel abs-max, for SmoothQuant).
    """

    histogram_bins: int = 1024
    reservoir_size: int = 2048
    histogram: bool = True
    reservoir: bool = True
    channel_absmax: bool = True

    def __post_init__(self) -> None:
        b = self.histogram_bins
        if not isinstance(b, int) or b < 2 or b & (b - 1):
            raise ConfigError(f"histogram_bins must be a power of two >= 2, got {b!r}")
        if not isinstance(self.reservoir_size, int) or self.reservoir_size < 1:
            raise ConfigError(f"reservoir_size must be a positive int, got {self.reservoir_size!r}")

    def nbytes(self, channels: int, num_buckets: int = 0) -> int:
        """Exact buffer bytes of one layer's statistics (see the module docstring)."""
        rows = 1 + num_buckets
        per_row = 8 + 4 + 4
        if self.histogram:
            per_row += 4 + 8 * self.histogram_bins
        if self.reservoir:
            per_row += 4 * self.reservoir_size
        return rows * per_row + (4 * channels if self.channel_absmax else 0)


@dataclass(frozen=True)
class StatsView:
    """Read-only statistics of one row (all timesteps, or one bucket), on the CPU.

    ``hist``: fp64 ``(bins,)`` or None; ``reservoir``: fp32 ``(K,)`` or None; ``channel_absmax``: fp32 ``(C,)`` or
    None (global row only)."""

    count: int
    min: float
    max: float
    hist: torch.Tensor | None
    hist_max: float
    reservoir: torch.Tensor | None
    channel_absmax: torch.Tensor | None

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0


class LayerStats:
    """Streaming statistics of one layer's input activation (see the module docstring for the buffers).

    ``channel_dim``: the channel dim of the activation (``-1`` for Linear, ``1`` for Conv). ``seed``: the reservoir's
    random stream (deterministic for a deterministic sequence of updates).
    """

    def __init__(self, name: str, channel_dim: int, config: StatsConfig = StatsConfig(), num_buckets: int = 0,
                 seed: int = 0) -> None:
        self.name, self.channel_dim, self.config = name, channel_dim, config
        self.num_buckets, self.seed = num_buckets, seed
        self.channels: int | None = None
        self._gen: torch.Generator | None = None
        self.count = self.min = self.max = self.hist = self.hist_max = self.reservoir = None
        self.channel_absmax = None

    # -- buffers -----------------------------------------------------------------------------------------------
    def _allocate(self, channels: int, device: torch.device) -> None:
        rows, cfg = 1 + self.num_buckets, self.config
        self.channels = channels
        self.count = torch.zeros(rows, dtype=torch.int64, device=device)
        self.min = torch.full((rows,), float("inf"), device=device)
        self.max = torch.full((rows,), float("-inf"), device=device)
        if cfg.histogram:
            self.hist = torch.zeros(rows, cfg.histogram_bins, dtype=torch.float64, device=device)
            self.hist_max = torch.zeros(rows, device=device)
        if cfg.reservoir:
            self.reservoir = torch.zeros(rows, cfg.reservoir_size, device=device)
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
        if cfg.channel_absmax:
            self.channel_absmax = torch.zeros(channels, device=device)

    def buffers(self) -> dict[str, torch.Tensor]:
        """The state tensors (empty before the first update)."""
        names = ("count", "min", "max", "hist", "hist_max", "reservoir", "channel_absmax")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def nbytes(self) -> int:
        """Bytes held by the buffers (0 before the first update)."""
        return sum(t.numel() * t.element_size() for t in self.buffers().values())

    # -- update ------------------------------------------------------------------------------------------------
    def update(self, x: torch.Tensor, bucket: int | None = None) -> tuple[float, float]:
        """Add one activation tensor (any shape with the channel dim at ``channel_dim``); ``bucket``: its timestep
        bucket (``None`` or ignored when ``num_buckets == 0``). Returns the tensor's (min, max) as floats, which
        are NaN/Inf when the input is not finite (the caller decides what to do; nothing is recorded then)."""
        x = x.detach()
        channels = x.shape[self.channel_dim]
        if self.count is None:
            self._allocate(channels, x.device)
        elif channels != self.channels:
            raise ConfigError(f"{self.name}: input has {channels} channels at dim {self.channel_dim}, earlier "
                              f"inputs had {self.channels}")
        if x.numel() == 0:
            return 0.0, 0.0
        xf = x.float()
        mn, mx = torch.aminmax(xf)
        mn_f, mx_f = float(mn), float(mx)
        if not (torch.isfinite(mn) and torch.isfinite(mx)):
            return mn_f, mx_f
        a = xf.abs()
        amax = max(-mn_f, mx_f)
        rows = [0] if (bucket is None or self.num_buckets == 0) else [0, 1 + int(bucket)]
        n = x.numel()
        for r in rows:
            self.min[r] = torch.minimum(self.min[r], mn)
            self.max[r] = torch.maximum(self.max[r], mx)
            if self.hist is not None:
                self._hist_update(r, a, amax)
            if self.reservoir is not None:
                self._reservoir_update(r, xf, n)
            self.count[r] += n
        if self.channel_absmax is not None:
            dims = [d for d in range(x.dim()) if d != self.channel_dim % x.dim()]
            cmax = a.amax(dim=dims) if dims else a
            torch.maximum(self.channel_absmax, cmax, out=self.channel_absmax)
        return mn_f, mx_f

    def _hist_update(self, r: int, a: torch.Tensor, amax: float) -> None:
        bins = self.config.histogram_bins
        hmax = float(self.hist_max[r])
        if hmax == 0.0:
            if amax == 0.0:
                self.hist[r, 0] += a.numel()
                return
            hmax = amax
        elif amax > hmax:
            # double the range until it covers amax; bins 2i and 2i + 1 merge into bin i each time (exact)
            k = 0
            while hmax * (2 ** k) < amax:
                k += 1
            f = 2 ** k
            h = self.hist[r]
            if f >= bins:
                merged = torch.zeros_like(h)
                merged[0] = h.sum()
            else:
                merged = torch.cat([h.reshape(bins // f, f).sum(dim=1), h.new_zeros(bins - bins // f)])
            self.hist[r] = merged
            hmax = hmax * f
        self.hist_max[r] = hmax
        self.hist[r] += torch.histc(a, bins=bins, min=0.0, max=hmax).to(torch.float64)

    def _reservoir_update(self, r: int, xf: torch.Tensor, n: int) -> None:
        # Each slot is an independent uniform draw over every value seen so far: a slot is replaced by a uniform
        # draw from the new values with probability n / (seen + n). O(K) work, whatever n is.
        k = self.config.reservoir_size
        seen = int(self.count[r])
        p = n / (seen + n)
        replace = torch.rand(k, generator=self._gen, device=xf.device) < p
        m = int(replace.sum())
        if m:
            idx = torch.randint(0, n, (m,), generator=self._gen, device=xf.device)
            self.reservoir[r, replace] = xf.reshape(-1)[idx]

    # -- read --------------------------------------------------------------------------------------------------
    def view(self, bucket: int | None = None) -> StatsView:
        """Statistics over all recorded timesteps (``bucket=None``) or one timestep bucket, on the CPU."""
        if self.count is None:
            return StatsView(0, 0.0, 0.0, None, 0.0, None, None)
        if bucket is None:
            r = 0
        else:
            if not 0 <= bucket < self.num_buckets:
                raise ConfigError(f"{self.name}: bucket {bucket} out of range (collected with "
                                  f"{self.num_buckets} buckets)")
            r = 1 + bucket
        count = int(self.count[r])
        if count == 0:
            return StatsView(0, 0.0, 0.0, None, 0.0, None, None)
        return StatsView(
            count, float(self.min[r]), float(self.max[r]),
            self.hist[r].cpu() if self.hist is not None else None,
            float(self.hist_max[r]) if self.hist_max is not None else 0.0,
            self.reservoir[r].cpu() if self.reservoir is not None else None,
            self.channel_absmax.cpu() if (self.channel_absmax is not None and r == 0) else None)

    def __repr__(self) -> str:
        v = self.view()
        return (f"LayerStats({self.name!r}, count={v.count}, min={v.min:.4g}, max={v.max:.4g}, "
                f"buckets={self.num_buckets}, {self.nbytes()} bytes)")
