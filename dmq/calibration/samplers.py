"""Timestep samplers: which (sample, timestep) pairs of the denoising trajectories calibration records.

Every sampler has the signature::

    sampler(t_norm, num, num_batches, *, seed=0, features=None, **options) -> mask

- ``t_norm``: fp32 ``(S,)``, the trajectory's distinct timesteps in calling order, normalized to [0, 1]
  (1 = pure noise; scheduler timestep / ``num_train_timesteps``, which also holds for flow matching, whose
  timesteps are ``1000 * sigma``). Keying by normalized t keeps resolution-shifted flow schedules comparable.
- ``num``: timesteps recorded per trajectory (on average for ``eda``), ``1 <= num``; ``num >= S`` records all.
- ``num_batches``: pipeline calls (batches of samples) per pass; a batch is the unit of selection.
- ``features``: fp32 ``(num_batches, S, D)`` latent features per batch and step (only samplers with
  ``needs_features = True`` get them; collection then runs the pipeline twice).
- returns ``mask``: bool ``(num_batches, S)``; ``mask[b, s]`` means: record batch ``b`` at step ``s``.

Samplers are pure functions of their arguments (deterministic under ``seed``).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch

from dmq.errors import ConfigError

__all__ = ["uniform", "normal", "eda", "SAMPLERS", "get_sampler", "register_sampler", "check_sampler_options",
           "latent_features"]

Sampler = Callable[..., torch.Tensor]
SAMPLERS: dict[str, Sampler] = {}
_STANDARD_ARGS = {"t_norm", "num", "num_batches", "seed", "features"}


def register_sampler(name: str, fn: Sampler, needs_features: bool = False) -> Sampler:
    """Register a sampler under ``name`` (unique). ``needs_features``: it needs the latents of a first pass."""
    if name in SAMPLERS:
        raise ConfigError(f"sampler {name!r} is already registered")
    fn.needs_features = needs_features  # type: ignore[attr-defined]
    SAMPLERS[name] = fn
    return fn


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ConfigError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}") from None


def check_sampler_options(name: str, options: dict[str, Any]) -> None:
    """ConfigError when ``options`` has a keyword the sampler does not take."""
    fn = get_sampler(name)
    params = {p for p in inspect.signature(fn).parameters if p not in _STANDARD_ARGS}
    unknown = sorted(set(options) - params)
    if unknown:
        raise ConfigError(f"sampler {name!r} takes no option(s) {unknown}; its options: {sorted(params) or 'none'}")


def _check(t_norm: torch.Tensor, num: int, num_batches: int) -> int:
    if t_norm.dim() != 1 or t_norm.numel() == 0:
        raise ConfigError(f"t_norm must be a non-empty 1-D tensor of normalized timesteps, got {tuple(t_norm.shape)}")
    if num < 1 or num_batches < 1:
        raise ConfigError(f"num and num_batches must be >= 1, got {num}, {num_batches}")
    return t_norm.numel()


def uniform(t_norm: torch.Tensor, num: int, num_batches: int = 1, *, seed: int = 0,
            features: torch.Tensor | None = None) -> torch.Tensor:
    """Q-Diffusion's uniform timestep calibration: ``num`` steps evenly spaced over the trajectory (the first and
    the last step included when ``num >= 2``; the middle one when ``num == 1``), the same steps for every batch."""
    s = _check(t_norm, num, num_batches)
    mask = torch.zeros(num_batches, s, dtype=torch.bool)
    if num >= s:
        mask[:] = True
        return mask
    if num == 1:
        idx = torch.tensor([(s - 1) // 2])
    else:
        idx = torch.round(torch.linspace(0, s - 1, num, dtype=torch.float64)).long()
    mask[:, idx] = True
    return mask


def _cell_widths(t: torch.Tensor) -> torch.Tensor:
    """Width of the part of [0, 1] nearer to each t than to its neighbours (so that a discrete schedule with uneven
    spacing, like a shifted flow schedule, samples a continuous density faithfully)."""
    order = torch.argsort(t)
    ts = t[order].to(torch.float64)
    edges = torch.cat([ts.new_zeros(1), (ts[1:] + ts[:-1]) / 2, ts.new_ones(1)])
    w = torch.empty_like(ts)
    w[order] = (edges[1:] - edges[:-1]).clamp(min=1e-6)
    return w


def normal(t_norm: torch.Tensor, num: int, num_batches: int = 1, *, seed: int = 0,
           features: torch.Tensor | None = None, mean: float = 0.5, std: float = 0.25) -> torch.Tensor:
    """PTQ4DM's normally distributed time-step calibration: for each batch, ``num`` distinct steps drawn without
    replacement with probability proportional to the normal density ``N(mean, std²)`` of their normalized t
    (times the width of the t-interval each step stands for), i.e. a normal distribution of timesteps around the
    middle of the schedule, truncated to [0, 1]."""
    s = _check(t_norm, num, num_batches)
    if not (0.0 <= mean <= 1.0) or not std > 0:
        raise ConfigError(f"normal sampler needs 0 <= mean <= 1 and std > 0, got mean={mean}, std={std}")
    mask = torch.zeros(num_batches, s, dtype=torch.bool)
    if num >= s:
        mask[:] = True
        return mask
    t = t_norm.to(torch.float64)
    w = torch.exp(-0.5 * ((t - mean) / std) ** 2) * _cell_widths(t)
    w = w + 1e-12 * w.max()  # every step stays reachable
    g = torch.Generator().manual_seed(seed)
    for b in range(num_batches):
        mask[b, torch.multinomial(w, num, replacement=False, generator=g)] = True
    return mask


def _allocate(score: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Integer counts proportional to ``score`` summing to ``total``, each at most ``cap`` (largest remainder,
    overflow handed on to the uncapped entries)."""
    n = torch.zeros_like(score, dtype=torch.long)
    remaining, free = total, torch.ones_like(score, dtype=torch.bool)
    while remaining > 0 and free.any():
        sc = torch.where(free, score, torch.zeros_like(score))
        if sc.sum() <= 0:
            sc = free.to(score.dtype)
        share = sc / sc.sum() * remaining
        add = torch.floor(share).long()
        rest = remaining - int(add.sum())
        if rest > 0:  # largest remainders (ties: earlier step)
            frac = torch.where(free, share - add, torch.full_like(share, -1.0))
            order = sorted(range(len(frac)), key=lambda i: (-float(frac[i]), i))[:rest]
            add[order] += 1
        add = torch.minimum(add, cap - n)
        n += add
        remaining = total - int(n.sum())
        free = n < cap
        if int(add.sum()) == 0:  # cannot place more (all capped)
            break
    return n


def eda(t_norm: torch.Tensor, num: int, num_batches: int = 1, *, seed: int = 0,
        features: torch.Tensor | None = None, density_weight: float = 1.0, diversity_weight: float = 1.0,
        k: int = 8, max_anchors: int = 1024) -> torch.Tensor:
    """EDA-DM-style selection by density and diversity in latent space (after its temporal distribution alignment
    calibration). The budget ``num * num_batches`` of (batch, step) samples is split over steps in proportion to

    - density: the mean k-nearest-neighbour density, among all (batch, step) latents, of the step's latents (steps
      whose latents are typical of the whole trajectory distribution get more samples), plus
    - diversity: the mean pairwise distance among the step's latents across batches (varied steps get more),

    each normalized to sum to 1 and weighted by ``density_weight`` / ``diversity_weight``; a step gets at most
    ``num_batches`` samples. Within a step, batches are chosen by farthest-point sampling starting from the
    densest one, so the chosen latents are spread out. Features are standardized per dimension first.
    Cost: ``O(P * min(P, max_anchors) * D)`` for ``P = num_batches * S`` points.
    """
    s = _check(t_norm, num, num_batches)
    if features is None:
        raise ConfigError("the eda sampler needs the latent features of every (batch, step)")
    if features.dim() != 3 or features.shape[:2] != (num_batches, s):
        raise ConfigError(f"eda features must be (num_batches={num_batches}, S={s}, D), got {tuple(features.shape)}")
    if density_weight < 0 or diversity_weight < 0 or density_weight + diversity_weight <= 0:
        raise ConfigError("eda weights must be >= 0 and not both 0")
    if num >= s:
        return torch.ones(num_batches, s, dtype=torch.bool)
    f = features.to(torch.float64)
    if not torch.isfinite(f).all():
        raise ConfigError("eda features contain NaN or Inf (the trajectory diverged)")
    z = (f - f.mean(dim=(0, 1))) / (f.std(dim=(0, 1), unbiased=False) + 1e-8)
    z = z / math.sqrt(z.shape[-1])
    pts = z.reshape(num_batches * s, -1)
    p = pts.shape[0]
    g = torch.Generator().manual_seed(seed)
    anchors_idx = torch.arange(p) if p <= max_anchors else torch.randperm(p, generator=g)[:max_anchors]
    d = torch.cdist(pts, pts[anchors_idx])
    self_hit = anchors_idx.unsqueeze(0) == torch.arange(p).unsqueeze(1)
    d = torch.where(self_hit, torch.full_like(d, float("inf")), d)
    kk = max(1, min(k, len(anchors_idx) - 1))
    knn = torch.topk(d, kk, dim=1, largest=False).values
    knn = torch.where(torch.isfinite(knn), knn, torch.zeros_like(knn))
    rho = (1.0 / (knn.mean(dim=1) + 1e-8)).reshape(num_batches, s)

    dens = rho.mean(dim=0)
    dens = dens / dens.sum()
    if num_batches > 1:
        zs = z.transpose(0, 1)  # (S, B, D)
        div = torch.cdist(zs, zs).sum(dim=(1, 2)) / (num_batches * (num_batches - 1))
    else:
        div = torch.zeros(s, dtype=torch.float64)
    div = div / div.sum() if div.sum() > 0 else torch.full((s,), 1.0 / s, dtype=torch.float64)
    score = density_weight * dens + diversity_weight * div

    counts = _allocate(score, num * num_batches, num_batches)
    mask = torch.zeros(num_batches, s, dtype=torch.bool)
    for step in range(s):
        n = int(counts[step])
        if n == 0:
            continue
        zs = z[:, step]
        chosen = [int(torch.argmax(rho[:, step]))]
        mind = torch.cdist(zs, zs[chosen]).squeeze(1)
        while len(chosen) < n:
            mind[chosen] = -1.0
            nxt = int(torch.argmax(mind))
            chosen.append(nxt)
            mind = torch.minimum(mind, torch.cdist(zs, zs[nxt:nxt + 1]).squeeze(1))
        mask[chosen, step] = True
    return mask


def latent_features(x: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """A small fp32 ``(D,)`` feature of a batch of latents (the denoiser's input): ``(B, C, H, W)`` is average-pooled
    to 4 x 4 per channel, other shapes flattened per sample and average-pooled to ``dim`` values; the mean over the
    batch is returned (so with ``batch_size=1`` a feature is one sample's latent)."""
    x = x.detach().float()
    if x.dim() == 4:
        f = torch.nn.functional.adaptive_avg_pool2d(x, (min(4, x.shape[2]), min(4, x.shape[3]))).flatten(1)
    else:
        flat = x.reshape(x.shape[0], 1, -1)
        f = torch.nn.functional.adaptive_avg_pool1d(flat, min(dim, flat.shape[-1])).flatten(1)
    return f.mean(dim=0).cpu()


register_sampler("uniform", uniform)
register_sampler("normal", normal)
register_sampler("eda", eda, needs_features=True)
