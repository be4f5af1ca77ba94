"""Timing a denoiser forward, float vs quantized, in one process (``dmq bench``).

The denoiser's inputs are captured from a real one-step pipeline call (a forward pre-hook records the first
denoiser call and stops the pipeline), so any supported pipeline can be timed without knowing its input layout.
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any

import torch
from torch import nn

__all__ = ["capture_denoiser_inputs", "time_forward"]


class _Captured(Exception):
    """Raised by the capture hook to stop the pipeline after the first denoiser call."""


def capture_denoiser_inputs(pipe: Any, batch_size: int = 1, seed: int = 0) -> tuple[tuple, dict[str, Any]]:
    """The ``(args, kwargs)`` of the first denoiser call of a one-step generation: ``batch_size`` images of a short
    prompt (text-to-image), of class 0 (class-conditional) or unconditional, seed ``seed``. The pipeline is stopped
    right after that call."""
    from dmq.pipelines.quantize import denoiser_name

    denoiser: nn.Module = getattr(pipe, denoiser_name(pipe))
    params = inspect.signature(pipe.__call__).parameters
    call: dict[str, Any] = {"num_inference_steps": 1, "generator": torch.Generator().manual_seed(seed)}
    if "prompt" in params:
        call.update(prompt=["a photo of a cat"] * batch_size)
    elif "class_labels" in params:
        call.update(class_labels=[0] * batch_size)
    else:
        call.update(batch_size=batch_size)
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # a forward hook sees the inputs as the pipeline's own pre-hooks left them (e.g. a remapped null class)
        captured["args"], captured["kwargs"] = args, dict(kwargs)
        raise _Captured

    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        pipe(**call)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise RuntimeError(f"{type(pipe).__name__} finished without calling its denoiser")
    return captured["args"], captured["kwargs"]


def time_forward(model: nn.Module, args: tuple, kwargs: dict[str, Any], warmup: int = 2, iters: int = 10) -> float:
    """Median milliseconds of ``model(*args, **kwargs)`` under ``torch.inference_mode`` over ``iters`` calls after
    ``warmup`` untimed ones (CUDA is synchronized around each call)."""
    sync = torch.cuda.synchronize if any(
        isinstance(t, torch.Tensor) and t.is_cuda for t in [*args, *kwargs.values()]) else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            sync()
            t0 = time.perf_counter()
            model(*args, **kwargs)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
