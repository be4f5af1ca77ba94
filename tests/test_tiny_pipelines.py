"""Tests of the tiny offline pipeline builders in ``tests/tiny_pipelines.py``."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

try:  # pytest's default "prepend" import mode puts tests/ on sys.path
    import tiny_pipelines as tp
except ImportError:  # pragma: no cover - tests/ turned into a package
    from tests import tiny_pipelines as tp

UNET_FAMILIES = ("sd", "sdxl", "ddpm")
MAX_DENOISER_PARAMS = 5_000_000


@pytest.fixture(scope="module", params=tp.FAMILIES)
def family_pipe(request):
    family = request.param
    return family, tp.build_pipeline(family, seed=0)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tp.clip_tokenizer, tp.t5_tokenizer], ids=["clip", "t5"])
def test_tokenizer_offline_and_cached(make):
    tok = make()
    assert make() is tok  # lru_cache'd per process
    ids = tok(tp.PROMPT + " zebra!").input_ids
    assert tok.unk_token_id not in ids[:-1]  # (CLIP's unk token is its eos token)
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" !", "!") == tp.PROMPT + " zebra!"
    batch = tok([tp.PROMPT, ""], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 16)


# --------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------


def test_unknown_family():
    with pytest.raises(ValueError):
        tp.build_pipeline("nope")


def test_eval_mode_and_no_grad(family_pipe):
    _, pipe = family_pipe
    for name, comp in pipe.components.items():
        if isinstance(comp, nn.Module):
            assert not any(m.training for m in comp.modules()), name
            assert not any(p.requires_grad for p in comp.parameters()), name


def test_build_is_seeded(family_pipe):
    family, pipe = family_pipe
    rng_before = torch.random.get_rng_state()
    ref = tp.get_denoiser(pipe).state_dict()
    same = tp.get_denoiser(tp.build_pipeline(family, seed=0)).state_dict()
    other = tp.get_denoiser(tp.build_pipeline(family, seed=1)).state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert any(not torch.equal(ref[k], other[k]) for k in ref)


def test_call_pipeline_deterministic_and_finite(family_pipe):
    family, pipe = family_pipe
    a = tp.call_pipeline(pipe, family, seed=0, steps=2)
    b = tp.call_pipeline(pipe, family, seed=0, steps=2)
    size = tp.IMAGE_SIZE[family]
    assert a.dtype == torch.float32
    assert a.shape == (1, 3, size, size)
    assert torch.isfinite(a).all()
    assert a.min() >= 0 and a.max() <= 1
    assert a.std() > 0.01  # not a constant image
    assert torch.equal(a, b)
    # a freshly built pipeline with the same seed gives the same image
    c = tp.call_pipeline(tp.build_pipeline(family, seed=0), family, seed=0, steps=2)
    assert torch.equal(a, c)
    d = tp.call_pipeline(pipe, family, seed=1, steps=2)
    assert not torch.equal(a, d)


def test_denoiser_inputs_and_output(family_pipe):
    family, pipe = family_pipe
    kw1 = tp.denoiser_inputs(pipe, family, timestep=100.0, batch=2, seed=0)
    kw1b = tp.denoiser_inputs(pipe, family, timestep=100.0, batch=2, seed=0)
    kw2 = tp.denoiser_inputs(pipe, family, timestep=900.0, batch=2, seed=0)
    out1 = tp.denoiser_output(pipe, family, kw1)
    out1b = tp.denoiser_output(pipe, family, kw1b)
    out2 = tp.denoiser_output(pipe, family, kw2)
    assert out1.dtype == torch.float32 and out1.shape[0] == 2
    assert torch.isfinite(out1).all() and torch.isfinite(out2).all()
    assert torch.equal(out1, out1b)
    assert (out1 - out2).abs().max() > 1e-4
    # batch and seed are honoured
    kw3 = tp.denoiser_inputs(pipe, family, timestep=100.0, batch=3, seed=1)
    out3 = tp.denoiser_output(pipe, family, kw3)
    assert out3.shape[0] == 3 and out3.shape[1:] == out1.shape[1:]


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + k + ".")
        else:
            yield prefix + k, v


def test_denoiser_inputs_match_pipeline_call(family_pipe):
    """denoiser_inputs produces the same argument names / shapes / timestep scale as the pipeline."""
    family, pipe = family_pipe
    den = tp.get_denoiser(pipe)
    sig = inspect.signature(den.forward)
    seen: list[dict] = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append(dict(sig.bind(*args, **kwargs).arguments))

    handle = den.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        tp.call_pipeline(pipe, family, steps=2)
    finally:
        handle.remove()
    recorded = dict(_flatten({k: v for k, v in seen[0].items() if v is not None}))
    first = next(v for k, v in recorded.items() if isinstance(v, torch.Tensor) and v.dim() >= 3)
    ours = dict(_flatten(tp.denoiser_inputs(pipe, family, timestep=500.0, batch=first.shape[0])))
    for key, value in ours.items():
        assert key in recorded, (key, sorted(recorded))
        if key == "timestep":  # pipelines may pass a 0-d tensor; compare the scale instead
            # first step: ~500-1000 on the native scale, <= 1 where divided by 1000 (Flux)
            assert (float(recorded[key].max()) > 1.0) == (float(value.max()) > 1.0), key
        elif isinstance(value, torch.Tensor):
            assert tuple(recorded[key].shape) == tuple(value.shape), key
        else:
            assert recorded[key] == value, key


def test_denoiser_is_small(family_pipe):
    family, pipe = family_pipe
    den = tp.get_denoiser(pipe)
    assert _n_params(den) < MAX_DENOISER_PARAMS
    wide = [m for m in den.modules() if isinstance(m, nn.Linear) and m.in_features >= 64]
    assert len(wide) >= 8


def test_quantizable_widths_multiple_of_64(family_pipe):
    family, pipe = family_pipe
    den = tp.get_denoiser(pipe)
    linears = [m for m in den.modules() if isinstance(m, nn.Linear)]
    good = [m for m in linears if m.in_features % 64 == 0]
    assert len(linears) >= 8
    assert len(good) / len(linears) >= 0.9, [m.in_features for m in linears]
    convs = [(n, m) for n, m in den.named_modules() if isinstance(m, nn.Conv2d)]
    if family in UNET_FAMILIES:
        good_convs = [m for _, m in convs if m.in_channels % 64 == 0]
        assert len(convs) >= 8
        assert len(good_convs) / len(convs) >= 0.9
    # the only exceptions are the input conv / patch embedding (in_channels = latent channels)
    bad = [(n, m.in_channels) for n, m in convs if m.in_channels % 64]
    assert all(c == den.config.in_channels for _, c in bad), bad


def test_save_load_roundtrip_offline(family_pipe, tmp_path, monkeypatch):
    """save_pretrained / from_pretrained works offline (tokenizers built in code serialise).

    Not bit-identical in general: safetensors-loaded weights are not 64-byte aligned,
    which can switch CPU kernels (observed ~1e-6 differences at batch 1), hence allclose.
    """
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family, pipe = family_pipe
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is type(pipe)
    loaded.set_progress_bar_config(disable=True)
    for comp in loaded.components.values():
        if isinstance(comp, nn.Module):
            comp.eval()
    a = tp.call_pipeline(pipe, family)
    b = tp.call_pipeline(loaded, family)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
