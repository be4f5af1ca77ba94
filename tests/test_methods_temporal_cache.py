"""Temporal-feature cache: bit-identical images, no time-path compute after warm-up, invalidation on a new schedule."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dmq.methods.temporal_cache import disable_temporal_cache, enable_temporal_cache
from tiny_pipelines import FAMILIES, build_pipeline, call_pipeline


class _TimePathOps(TorchFunctionMode):
    """Counts torch ops that read a parameter of a time-path module (a served call reads none)."""

    def __init__(self, model, names):
        super().__init__()
        modules = dict(model.named_modules())
        self.params = {id(p) for n in names for p in modules[n].parameters()}
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        attribute_read = getattr(func, "__name__", "") == "__get__"  # e.g. `weight.dtype`: no compute
        if not attribute_read and any(id(a) in self.params for a in (*args, *kwargs.values())):
            self.n += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_is_bit_identical_and_skips_the_time_path(family):
    ref_pipe = build_pipeline(family)
    ref = call_pipeline(ref_pipe, family, seed=0, steps=2)
    pipe = build_pipeline(family)
    cache = enable_temporal_cache(pipe)
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    with _TimePathOps(model, cache.modules) as warm_ops:
        warm = call_pipeline(pipe, family, seed=0, steps=2)
    assert torch.equal(warm, ref)
    assert cache.computes > 0 and warm_ops.n > 0
    computes = cache.computes
    with _TimePathOps(model, cache.modules) as served_ops:
        served = call_pipeline(pipe, family, seed=0, steps=2)
    assert torch.equal(served, ref)
    assert cache.computes == computes and served_ops.n == 0 and cache.hits >= computes


def test_cache_invalidates_on_a_new_schedule():
    pipe = build_pipeline("dit")
    cache = enable_temporal_cache(pipe)
    call_pipeline(pipe, "dit", steps=2)
    per_step = cache.computes // 2
    before = cache.computes
    # another schedule (it shares t = 0 with the first): everything is dropped and recomputed, t = 0 included
    call_pipeline(pipe, "dit", steps=3)
    assert cache.computes - before == 3 * per_step
    assert len(cache.entries) == 3 * per_step
    ref = call_pipeline(build_pipeline("dit"), "dit", steps=3)
    assert torch.equal(call_pipeline(pipe, "dit", steps=3), ref)


def test_disable_restores_plain_forward():
    pipe = build_pipeline("ddpm")
    enable_temporal_cache(pipe)
    call_pipeline(pipe, "ddpm")
    disable_temporal_cache(pipe)
    assert pipe.unet.dmq_temporal_cache is None
    assert torch.equal(call_pipeline(pipe, "ddpm"), call_pipeline(build_pipeline("ddpm"), "ddpm"))
