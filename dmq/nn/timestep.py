"""The timestep a denoiser call runs at, for layers with per-timestep activation ranges (TFMQ-DM's finite set).

A forward pre-hook on the denoiser reads its ``timestep`` argument once per call, normalizes it to ``t`` in [0, 1]
(1 = pure noise: ``t_raw / num_train_timesteps``; FLUX's transformer already receives ``t_raw / 1000``) and stores
its bucket ``min(int(t · B), B − 1)`` in a :class:`TimestepState` that the layers share.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from dmq.errors import DmqError

__all__ = ["TimestepState", "attach_timestep_state"]


@dataclass
class TimestepState:
    """``num_buckets`` buckets of normalized t; ``bucket`` (int64 0-d tensor) is set at each denoiser call (``None``
    outside one). It stays a tensor, computed in float64 like ``min(int(t / divisor · B), B − 1)``, so that
    torch.compile traces it without a ``.item()`` graph break or a recompile per bucket."""

    num_buckets: int
    divisor: float
    bucket: torch.Tensor | None = None

    def set_from(self, timestep: torch.Tensor | float) -> None:
        t = timestep.detach().reshape(-1)[0] if isinstance(timestep, torch.Tensor) else torch.tensor(timestep)
        t_norm = (t.to(torch.float64) / self.divisor).clamp(0.0, 1.0)
        self.bucket = (t_norm * self.num_buckets).to(torch.int64).clamp(max=self.num_buckets - 1)


def attach_timestep_state(model: nn.Module, layers: list[nn.Module], num_buckets: int, num_train_timesteps: int,
                          family: str) -> TimestepState:
    """Share one TimestepState among ``layers`` and keep it current with a pre-hook on ``model`` (the denoiser)."""
    state = TimestepState(num_buckets, 1.0 if family == "flux" else float(num_train_timesteps))
    params = list(inspect.signature(model.forward).parameters)
    position = params.index("timestep") if "timestep" in params else None

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep")
        if t is None and position is not None and len(args) > position:
            t = args[position]
        if t is None:
            raise DmqError(f"{type(module).__name__} was called without a timestep: its quantized layers have "
                           "per-timestep activation ranges")
        state.set_from(t)

    old = getattr(model, "_dmq_timestep_hook", None)
    if old is not None:
        old.remove()
    model._dmq_timestep_hook = model.register_forward_pre_hook(hook, with_kwargs=True)
    for layer in layers:
        layer.timestep_state = state
    return state
