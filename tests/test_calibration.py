"""Calibration: config validation, samplers, streaming statistics, range estimators, collection on the real
pipeline of every tiny family. Reconstruction is tested in test_calibration_reconstruction.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

try:
    import tiny_pipelines as tp
except ImportError:  # pragma: no cover
    from tests import tiny_pipelines as tp

from dmq.calibration.collect import BlockRecord, collect, collect_block_inputs, timestep_bucket
from dmq.calibration.config import CalibrationConfig
from dmq.calibration.estimators import (activation_scales, apply_input_scales, channel_absmax,
                                        estimate_bucket_scales, estimate_scale)
from dmq.calibration.samplers import SAMPLERS, eda, get_sampler, normal, uniform
from dmq.calibration.stats import LayerStats, StatsConfig
from dmq.errors import ConfigError, NonFiniteError
from dmq.formats import QuantSpec, fake_quantize
from dmq.nn import QuantLinear, quantize_module

TEXT = ("sd", "sdxl", "pixart", "sd3", "flux")
CFG_FAMILIES = ("sd", "sdxl", "pixart", "sd3", "dit")  # batched classifier-free guidance by default
_HW = {"height": 32, "width": 32}  # the tiny pipelines' resolution (FLUX's default would be 256 px)
PIPE_KW = {"sd": _HW, "sdxl": _HW,
           "pixart": {"use_resolution_binning": False, "max_sequence_length": tp.T5_MAX_LENGTH,
                      "clean_caption": False, **_HW},
           "sd3": {"max_sequence_length": tp.T5_MAX_LENGTH, **_HW},
           "flux": {"max_sequence_length": tp.T5_MAX_LENGTH, **_HW}}
STATIC_I8 = QuantSpec("int8", "tensor", dynamic=False)
STATIC_I4 = QuantSpec("int4", "tensor", dynamic=False)



pytestmark = pytest.mark.usefixtures("one_thread")

def calib(family: str, **kw) -> CalibrationConfig:
    inputs: dict = {}
    if family in TEXT:
        inputs["prompts"] = ["a photo of a cat", "a red house"]
    elif family == "dit":
        inputs["class_labels"] = [1, 2]
    base = dict(num_samples=1, num_inference_steps=3, num_timesteps=2, pipeline_kwargs=PIPE_KW.get(family))
    base.update(inputs)
    base.update(kw)
    return CalibrationConfig(**base)


def gemm_names(den: nn.Module) -> list[str]:
    return [n for n, m in den.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


_PIPES: dict = {}


def pipe_of(family: str):
    if family not in _PIPES:
        _PIPES[family] = tp.build_pipeline(family)
    return _PIPES[family]


def no_hooks_left(den: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in den.modules())


# ---------------------------------------------------------------------------------------------------------------
# config


def test_config_roundtrip_and_defaults():
    c = CalibrationConfig(prompts=["a", "b"], num_samples=4, sampler="normal", sampler_options={"std": 0.2},
                          pipeline_kwargs={"height": 64}, timesteps=[999, 500], per_timestep_buckets=4)
    assert c.prompts == ("a", "b") and c.timesteps == (999.0, 500.0)
    assert c.input_kind == "text" and c.num_batches == 4
    assert CalibrationConfig.from_dict(c.to_dict()) == c
    assert CalibrationConfig(num_samples=3).input_kind == "unconditional"
    assert CalibrationConfig(class_labels=[3], num_samples=5, batch_size=2).num_batches == 3


@pytest.mark.parametrize("kw, match", [
    (dict(prompts=[]), "empty"),
    (dict(prompts="a cat"), "list"),
    (dict(prompts=["a", 3]), "strings"),
    (dict(class_labels=[]), "empty"),
    (dict(class_labels=[-1]), "non-negative"),
    (dict(prompts=["a"], class_labels=[1]), "not both"),
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=-3), "num_samples"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(sampler="fancy"), "unknown sampler"),
    (dict(num_timesteps=0), "num_timesteps"),
    (dict(num_inference_steps=10, num_timesteps=11), "cannot exceed"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(timesteps=[]), "empty"),
    (dict(timesteps=[-5]), "timesteps"),
    (dict(sampler="uniform", sampler_options={"std": 1.0}), "takes no option"),
    (dict(per_timestep_buckets=-1), "per_timestep_buckets"),
    (dict(pipeline_kwargs={"prompt": "x"}), "may not set"),
    (dict(pipeline_kwargs={"x": object()}), "JSON"),
])
def test_config_rejects_bad_input(kw, match):
    with pytest.raises(ConfigError, match=match):
        CalibrationConfig(**kw)


def test_config_from_dict_checks_version():
    d = CalibrationConfig(num_samples=2).to_dict()
    with pytest.raises(ConfigError, match="version"):
        CalibrationConfig.from_dict({**d, "version": 99})
    with pytest.raises(ConfigError, match="unknown"):
        CalibrationConfig.from_dict({**d, "bogus": 1})


# ---------------------------------------------------------------------------------------------------------------
# samplers


def test_sampler_registry():
    assert set(SAMPLERS) >= {"uniform", "normal", "eda"}
    assert get_sampler("eda").needs_features and not get_sampler("uniform").needs_features
    with pytest.raises(ConfigError):
        get_sampler("nope")


def test_uniform_spacing_and_coverage():
    t = torch.linspace(1, 0, 50)
    m = uniform(t, 10, num_batches=3)
    assert m.shape == (3, 50) and (m == m[0]).all()  # the same steps for every batch
    idx = m[0].nonzero().flatten()
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 49  # first and last step covered
    gaps = set(idx.diff().tolist())
    assert gaps <= {5, 6}  # evenly spaced: 49 / 9 = 5.44
    assert uniform(t, 1)[0].nonzero().flatten().tolist() == [24]
    assert uniform(t, 80).all()


def _truncated_normal_moments(mu: float, sd: float) -> tuple[float, float]:
    x = torch.linspace(0, 1, 200001, dtype=torch.float64)
    w = torch.exp(-0.5 * ((x - mu) / sd) ** 2)
    m = float((w * x).sum() / w.sum())
    return m, math.sqrt(float((w * (x - m) ** 2).sum() / w.sum()))


@pytest.mark.parametrize("mu, sd", [(0.5, 0.25), (0.3, 0.1)])
def test_normal_mean_and_std(mu, sd):
    t = torch.linspace(1, 0, 100)
    m = normal(t, 1, num_batches=4000, seed=0, mean=mu, std=sd)
    assert (m.sum(dim=1) == 1).all()
    picked = t[m.nonzero()[:, 1]].double()
    exp_mean, exp_std = _truncated_normal_moments(mu, sd)
    assert abs(float(picked.mean()) - exp_mean) < 0.015
    assert abs(float(picked.std()) - exp_std) < 0.015


def test_normal_distinct_steps_deterministic_and_shift_aware():
    t = torch.linspace(1, 0, 20)
    m = normal(t, 5, num_batches=50, seed=3)
    assert (m.sum(dim=1) == 5).all()  # distinct steps per batch
    assert torch.equal(m, normal(t, 5, num_batches=50, seed=3))
    assert not torch.equal(m, normal(t, 5, num_batches=50, seed=4))
    # a shifted (flow-matching) schedule crowds steps near t = 1: the distribution over t stays centred
    shifted = torch.linspace(1, 0.02, 60)
    shifted = 3 * shifted / (1 + 2 * shifted)
    mm = normal(shifted, 1, num_batches=3000, seed=0)
    assert abs(float(shifted[mm.nonzero()[:, 1]].mean()) - 0.5) < 0.03


def test_eda_density_diversity_budget():
    torch.manual_seed(0)
    nb, s, d = 6, 10, 16
    feats = torch.randn(nb, s, d) * 0.05
    feats[:, :5] += torch.randn(1, 1, d)  # steps 0-4: one tight, dense cluster
    feats[:, 5:] = torch.randn(nb, 5, d) * 3.0  # steps 5-9: scattered latents, low density, high diversity
    m = eda(torch.linspace(1, 0, s), 3, nb, seed=0, features=feats)
    assert int(m.sum()) == 3 * nb  # the budget of uniform sampling
    assert (m.sum(dim=0) <= nb).all()
    assert torch.equal(m, eda(torch.linspace(1, 0, s), 3, nb, seed=0, features=feats))
    # density-only prefers the cluster, diversity-only the scattered steps
    dens = eda(torch.linspace(1, 0, s), 3, nb, features=feats, diversity_weight=0.0)
    div = eda(torch.linspace(1, 0, s), 3, nb, features=feats, density_weight=0.0)
    assert dens[:, :5].sum() > dens[:, 5:].sum()
    assert div[:, 5:].sum() > div[:, :5].sum()
    # within a step, duplicated latents are not both chosen when a distinct one is available
    f2 = torch.randn(3, 4, d)
    f2[1] = f2[0]
    m2 = eda(torch.linspace(1, 0, 4), 2, 3, features=f2)
    for step in range(4):
        if int(m2[:, step].sum()) == 2:
            assert m2[2, step]
    with pytest.raises(ConfigError, match="features"):
        eda(torch.linspace(1, 0, 4), 2, 3)
    # coverage: with every step alike in density and diversity, the budget is spread over all steps
    even = eda(torch.linspace(1, 0, 8), 4, 6, features=torch.randn(6, 8, d))
    assert (even.sum(dim=0) >= 1).all() and int(even.sum(dim=0).max()) <= 6


def test_normal_covers_every_step_given_enough_draws():
    t = torch.linspace(1, 0, 10)
    m = normal(t, 3, num_batches=400, std=0.3)
    assert (m.sum(dim=0) > 0).all()  # every step reachable, the middle ones most often
    assert m[:, 4:6].sum() > m[:, [0, 9]].sum()


# ---------------------------------------------------------------------------------------------------------------
# streaming statistics and estimators


def heavy_tailed(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Student-t with 2 degrees of freedom: a normal over the square root of an independent chi-square / 2
    z = torch.randn(64, 4096, generator=g)
    chi2 = (torch.randn(64, 4096, 2, generator=g) ** 2).sum(-1)
    return z / torch.sqrt(chi2 / 2)


def test_mse_search_beats_minmax_on_heavy_tails_at_4_bits():
    x = heavy_tailed()
    st = LayerStats("x", -1)
    for chunk in x.split(8):
        st.update(chunk)

    def err(scale):
        return float(((fake_quantize(x, STATIC_I4, scale) - x) ** 2).mean())

    e_minmax = err(estimate_scale(st, STATIC_I4, "minmax"))
    e_mse = err(estimate_scale(st, STATIC_I4, "mse"))
    e_res = err(estimate_scale(st, STATIC_I4, "mse", source="reservoir"))
    e_raw = err(estimate_scale(x, STATIC_I4, "mse"))
    assert e_mse < 0.8 * e_minmax and e_res < e_minmax and e_raw < 0.8 * e_minmax
    assert e_mse <= 1.02 * e_raw  # the streamed histogram search is as good as searching the full tensor
    assert float(estimate_scale(st, STATIC_I4, "minmax")) == pytest.approx(float(x.abs().max()) / 7)


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp8_e4m3", "fp4_e2m1"])
def test_mse_search_uses_the_formats_quantizer(dtype):
    from dmq.calibration.estimators import _fake_quant

    spec = QuantSpec(dtype, "tensor", dynamic=False)
    x = heavy_tailed(3)[:4].flatten()
    for s in (0.01, 0.3, 2.0):
        assert torch.equal(_fake_quant(x, torch.tensor(s), spec), fake_quantize(x, spec, torch.tensor(s)))


def test_histogram_and_reservoir_are_exact_and_bounded():
    x = heavy_tailed(1)
    cfg = StatsConfig(histogram_bins=256, reservoir_size=512)
    st = LayerStats("x", -1, cfg)
    for i, chunk in enumerate(x.split(4)):
        st.update(chunk * (1 + i))  # growing range: the histogram doubles its range and merges bins
    v = st.view()
    assert v.count == x.numel() and float(v.hist.sum()) == x.numel()
    assert st.nbytes() == cfg.nbytes(4096) and v.reservoir.shape == (512,)
    full = torch.cat([c * (1 + i) for i, c in enumerate(x.split(4))])
    assert v.min == float(full.min()) and v.max == float(full.max())
    assert torch.equal(v.channel_absmax, full.abs().amax(dim=0))
    q = float(torch.quantile(full.abs().flatten()[::7], 0.999))
    got = float(estimate_scale(st, STATIC_I8, "percentile", percentile=99.9)) * 127
    assert abs(got - q) / q < 0.15


def test_channel_dim_of_linear_and_conv_inputs():
    lin, conv = LayerStats("lin", -1), LayerStats("conv", 1)
    a = torch.randn(2, 5, 8)
    b = torch.randn(2, 6, 4, 4)
    lin.update(a)
    conv.update(b)
    assert torch.equal(channel_absmax(lin), a.abs().amax(dim=(0, 1)))
    assert torch.equal(channel_absmax(conv), b.abs().amax(dim=(0, 2, 3)))
    s = estimate_scale(conv, STATIC_I8, "minmax", granularity="channel")
    assert s.shape == (6,) and torch.allclose(s, b.abs().amax(dim=(0, 2, 3)) / 127)
    with pytest.raises(ConfigError, match="channels"):
        conv.update(torch.randn(1, 7, 2, 2))
    with pytest.raises(ConfigError, match="minmax"):
        estimate_scale(conv, STATIC_I8, "mse", granularity="channel")


def test_weight_scales_per_row_and_bucket_scales():
    w = heavy_tailed(2)[:16, :256]
    for method in ("minmax", "percentile", "mse"):
        s = estimate_scale(w, QuantSpec("int4", "channel", dynamic=False), method, granularity="channel")
        assert s.shape == (16,) and s.dtype == torch.float32 and (s > 0).all()
    st = LayerStats("x", -1, num_buckets=3)
    st.update(torch.ones(4, 8), bucket=0)
    st.update(torch.full((4, 8), 10.0), bucket=2)
    bs = estimate_bucket_scales(st, STATIC_I8, "minmax")
    assert torch.allclose(bs, torch.tensor([1.0, 10.0, 10.0]) / 127)  # bucket 1 saw nothing: global fallback
    assert st.view(0).count == 32 and st.view().count == 64
    assert st.nbytes() == StatsConfig().nbytes(8, num_buckets=3)


def test_estimator_bad_input():
    st = LayerStats("x", -1)
    st.update(torch.randn(4, 8))
    with pytest.raises(ConfigError, match="unknown range method"):
        estimate_scale(st, STATIC_I8, "kl")
    with pytest.raises(ConfigError, match="symmetric"):
        estimate_scale(st, QuantSpec("int8", "token", symmetric=False), "minmax")
    with pytest.raises(NonFiniteError):
        estimate_scale(torch.tensor([1.0, float("nan")]), STATIC_I8)
    lin = QuantLinear.from_module(nn.Linear(8, 4), QuantSpec("int8", "channel"), STATIC_I8)
    with pytest.raises(ConfigError, match="shape"):
        apply_input_scales({"l": lin}, {"l": torch.ones(3)})
    with pytest.raises(NonFiniteError):
        apply_input_scales({"l": lin}, {"l": torch.tensor(float("inf"))})
    assert torch.isnan(lin.input_scale)  # nothing written by a failed call
    apply_input_scales({"l": lin}, activation_scales({"l": st}, {"l": STATIC_I8}))
    assert torch.isfinite(lin.input_scale) and lin(torch.randn(2, 8)).shape == (2, 4)
    with pytest.raises(ConfigError, match="no activations"):
        activation_scales({}, {"missing": STATIC_I8})


# ---------------------------------------------------------------------------------------------------------------
# collection on the real pipelines


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_collect_runs_on_every_family(family):
    pipe = pipe_of(family)
    den = tp.get_denoiser(pipe)
    names = gemm_names(den)
    cfg = calib(family, num_inference_steps=3, num_timesteps=2, per_timestep_buckets=2)
    res = collect(pipe, names, cfg, progress=False)
    assert len(res.timesteps) == 3 and all(0.0 <= t <= 1.0 for t in res.t_norm)
    assert res.t_norm == sorted(res.t_norm, reverse=True)  # calling order: noise → image
    rec = [c for c in res.calls if c.recorded]
    assert len({c.step for c in rec}) == 2 and rec[0].step == 0  # uniform: first and last step
    # classifier-free guidance: hooks see [uncond, cond] (DiT: [cond, null]); FLUX-dev and DDPM have none
    expected = 2 if family in CFG_FAMILIES else 1
    assert all(c.batch_size == expected for c in res.calls)
    seen = [n for n, s in res.stats.items() if s.view().count]
    assert len(seen) >= 0.9 * len(names)  # (a few layers, e.g. unused embedders, are never called)
    for n in seen:
        v = res.stats[n].view()
        assert math.isfinite(v.min) and math.isfinite(v.max) and v.max >= v.min
        assert sum(res.stats[n].view(b).count for b in range(2)) == v.count
    scales = activation_scales(res.stats, {n: STATIC_I8 for n in seen}, method="mse")
    assert all(s.shape == () and s.dtype == torch.float32 and s > 0 for s in scales.values())
    assert no_hooks_left(den)


def test_guidance_off_keeps_the_batch_and_batches_are_cycled():
    pipe = pipe_of("sd")
    den = tp.get_denoiser(pipe)
    res = collect(pipe, gemm_names(den)[:3], calib("sd", guidance_scale=1.0, num_samples=3, batch_size=2),
                  progress=False)
    assert [c.batch_size for c in res.calls if c.step == 0] == [2, 1]  # batches of 2 then 1, no CFG doubling
    assert res.mask.shape == (2, 3)


def test_memory_bound_and_determinism():
    pipe = pipe_of("ddpm")
    names = gemm_names(tp.get_denoiser(pipe))
    r1 = collect(pipe, names, CalibrationConfig(num_samples=1, num_inference_steps=3), progress=False)
    r2 = collect(pipe, names, CalibrationConfig(num_samples=2, num_inference_steps=3), progress=False)
    r2b = collect(pipe, names, CalibrationConfig(num_samples=2, num_inference_steps=3), progress=False)
    r3 = collect(pipe, names, CalibrationConfig(num_samples=2, num_inference_steps=3, seed=1), progress=False)
    for n in names:
        # buffers do not grow when the number of samples doubles
        assert r1.stats[n].nbytes() == r2.stats[n].nbytes() == StatsConfig().nbytes(r1.stats[n].channels)
        assert r2.stats[n].view().count == 2 * r1.stats[n].view().count
    assert r1.nbytes() == r2.nbytes()
    for method in ("minmax", "percentile", "mse"):
        a = activation_scales(r2.stats, {n: STATIC_I8 for n in names}, method)
        b = activation_scales(r2b.stats, {n: STATIC_I8 for n in names}, method)
        assert all(torch.equal(a[n], b[n]) for n in names)  # same seed, same ranges
    for n in names:
        assert torch.equal(r2.stats[n].reservoir, r2b.stats[n].reservoir)
    c = activation_scales(r3.stats, {n: STATIC_I8 for n in names}, "minmax")
    a = activation_scales(r2.stats, {n: STATIC_I8 for n in names}, "minmax")
    assert any(not torch.equal(a[n], c[n]) for n in names)


def test_flow_matching_and_flux_timesteps_are_normalized():
    for family in ("sd3", "flux"):
        pipe = pipe_of(family)
        res = collect(pipe, gemm_names(tp.get_denoiser(pipe))[:2], calib(family, num_inference_steps=4,
                                                                         num_timesteps=4), progress=False)
        assert res.t_norm[0] == pytest.approx(1.0)
        sigmas = pipe.scheduler.sigmas[:4].tolist()  # flow matching: t_norm is sigma (FLUX passes t / 1000)
        assert res.t_norm == pytest.approx(sigmas, abs=1e-4)
        assert [c.step for c in res.calls] == [0, 1, 2, 3]


def test_explicit_timesteps():
    pipe = pipe_of("dit")
    den = tp.get_denoiser(pipe)
    names = gemm_names(den)[:2]
    res = collect(pipe, names, calib("dit", num_inference_steps=4, timesteps=[500]), progress=False)
    assert [c.timestep for c in res.calls if c.recorded] == [500.0]
    assert max(c.step for c in res.calls) == res.timesteps.index(500.0)  # the run stopped after it
    with pytest.raises(ConfigError, match="not in the pipeline's schedule"):
        collect(pipe, names, calib("dit", num_inference_steps=4, timesteps=[123]), progress=False)
    assert no_hooks_left(den)


def test_eda_sampler_on_the_pipeline():
    pipe = pipe_of("ddpm")
    cfg = CalibrationConfig(num_samples=3, num_inference_steps=4, num_timesteps=2, sampler="eda")
    res = collect(pipe, gemm_names(tp.get_denoiser(pipe))[:2], cfg, progress=False)
    assert int(res.mask.sum()) == 6
    assert sum(c.phase == "features" for c in res.calls) == 3 * 4  # a full first pass for the features
    rec = {(c.batch, c.step) for c in res.calls if c.recorded}
    assert rec == {tuple(i) for i in res.mask.nonzero().tolist()}


def test_collect_bad_inputs():
    sd, ddpm, dit = pipe_of("sd"), pipe_of("ddpm"), pipe_of("dit")
    names = gemm_names(tp.get_denoiser(sd))[:2]
    with pytest.raises(ConfigError, match="needs prompts"):
        collect(sd, names, CalibrationConfig(num_samples=1), progress=False)
    with pytest.raises(ConfigError, match="takes no text prompts"):
        collect(ddpm, gemm_names(ddpm.unet)[:1], CalibrationConfig(prompts=["x"], num_samples=1), progress=False)
    with pytest.raises(ConfigError, match="class_labels"):
        collect(dit, gemm_names(dit.transformer)[:1], CalibrationConfig(num_samples=1), progress=False)
    with pytest.raises(ConfigError, match="out of range"):
        collect(dit, gemm_names(dit.transformer)[:1], CalibrationConfig(class_labels=[1000], num_samples=1),
                progress=False)
    with pytest.raises(ConfigError, match="guidance_scale"):
        collect(ddpm, gemm_names(ddpm.unet)[:1], CalibrationConfig(num_samples=1, guidance_scale=3.0),
                progress=False)
    with pytest.raises(ConfigError, match="no module"):
        collect(sd, ["nope"], calib("sd"), progress=False)
    with pytest.raises(ConfigError, match="Linear and Conv"):
        collect(sd, ["down_blocks.0"], calib("sd"), progress=False)
    with pytest.raises(ConfigError, match="nothing to collect"):
        collect(sd, [], calib("sd"), progress=False)


def test_nonfinite_activation_names_layer_and_timestep():
    pipe = pipe_of("sd")
    den = tp.get_denoiser(pipe)
    target = "down_blocks.0.resnets.0.conv2"
    h = den.get_submodule(target).register_forward_pre_hook(lambda m, a: (a[0] * float("nan"),))
    try:
        with pytest.raises(NonFiniteError, match=r"down_blocks\.0\.resnets\.0\.conv2.*timestep 751"):
            collect(pipe, gemm_names(den), calib("sd", num_inference_steps=4), progress=False)
    finally:
        h.remove()
    assert no_hooks_left(den)
    assert not hasattr(pipe, "_progress_bar_config") or pipe._progress_bar_config.get("disable") is True


def test_already_quantized_denoiser_is_refused():
    pipe = tp.build_pipeline("dit")
    den = pipe.transformer
    name = "transformer_blocks.0.ff.net.2"
    parent, _, child = name.rpartition(".")
    setattr(den.get_submodule(parent), child,
            quantize_module(den.get_submodule(name), QuantSpec("int8", "channel"), None))
    with pytest.raises(ConfigError, match="already quantized"):
        collect(pipe, ["transformer_blocks.0.attn1.to_q"], calib("dit"), progress=False)


def test_block_records_in_memory_and_on_disk(tmp_path):
    pipe = pipe_of("sd")
    blocks = ["down_blocks.0.resnets.0", "mid_block.attentions.0"]
    mem = collect_block_inputs(pipe, blocks, calib("sd", num_samples=2, num_inference_steps=3, num_timesteps=3),
                               max_block_records=4, progress=False)
    disk = collect_block_inputs(pipe, blocks, calib("sd", num_samples=2, num_inference_steps=3, num_timesteps=3,
                                                    cache_dir=str(tmp_path)), max_block_records=4, progress=False)
    for b in blocks:
        assert len(mem[b]) == len(disk[b]) == 4  # 6 recorded calls, a bounded subset of 4 kept
        for rm, rd in zip(mem[b], disk[b]):
            assert (rm.batch, rm.step) == (rd.batch, rd.step) and rd.path is not None
            (am, km), (ad, kd) = rm.load(), BlockRecord.from_file(rd.path).load()
            assert len(am) == len(ad) and all(torch.equal(x, y) for x, y in zip(am, ad) if torch.is_tensor(x))
            assert km.keys() == kd.keys()
            out_m, out_d = pipe.unet.get_submodule(b)(*am, **km), pipe.unet.get_submodule(b)(*ad, **kd)
            out_m = out_m[0] if isinstance(out_m, tuple) else out_m
            out_d = out_d[0] if isinstance(out_d, tuple) else out_d
            assert torch.equal(out_m, out_d)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 8


def test_timestep_bucket():
    assert [timestep_bucket(t, 4) for t in (0.0, 0.24, 0.25, 0.99, 1.0)] == [0, 0, 1, 3, 3]


def test_channel_slices_for_split_layers():
    pipe = pipe_of("sd")
    conv = "up_blocks.0.resnets.0.conv1"
    cin = pipe.unet.get_submodule(conv).in_channels
    res = collect(pipe, [conv, f"{conv}[0:64]", f"{conv}[64:{cin}]"], calib("sd"), progress=False)
    full = channel_absmax(res.stats[conv])
    assert torch.equal(channel_absmax(res.stats[f"{conv}[0:64]"]), full[:64])
    assert torch.equal(channel_absmax(res.stats[f"{conv}[64:{cin}]"]), full[64:])
    assert res.stats[f"{conv}[0:64]"].view().count * (cin - 64) == res.stats[f"{conv}[64:{cin}]"].view().count * 64
    with pytest.raises(ConfigError, match="channel range"):
        collect(pipe, [f"{conv}[0:{cin + 1}]"], calib("sd"), progress=False)


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_static_activation_calibration_end_to_end(family):
    """Plan with a static-activation config (and split shortcuts on the U-Net), calibrate every static quantizer
    in one run, swap, and run the pipeline: no layer is left uncalibrated."""
    from dmq.calibration.estimators import calibrate_activation_scales, static_activation_targets
    from dmq.config import QuantConfig
    from dmq.nn.split import SplitQuantConv2d
    from dmq.pipelines.quantize import commit_model, prepare_model
    from dmq.pipelines.roles import roles_for

    pipe = tp.build_pipeline(family)
    den = tp.get_denoiser(pipe)
    qc = QuantConfig(QuantSpec("int8", "channel"), STATIC_I8, needs_calibration=True,
                     split_shortcut=family == "sd")
    _, built = prepare_model(den, qc, roles_for(den), progress=False)
    targets = static_activation_targets(built)
    if family == "sd":
        assert any(isinstance(m, SplitQuantConv2d) for m in built.values())
        assert any(n.endswith("]") for n in targets)
    assert all(torch.isnan(t.input_scale) for t in targets.values())
    res = calibrate_activation_scales(pipe, built, calib(family, num_inference_steps=2), progress=False)
    assert set(res.stats) == set(targets)
    assert all(torch.isfinite(t.input_scale) and t.input_scale > 0 for t in targets.values())
    commit_model(den, built, qc)
    out = tp.call_pipeline(pipe, family, steps=2)
    assert torch.isfinite(out).all()


def test_heun_two_evaluations_per_step_map_to_one_timestep():
    from diffusers import HeunDiscreteScheduler

    pipe = tp.build_pipeline("sd")
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    res = collect(pipe, ["down_blocks.0.resnets.0.conv1"], calib("sd", num_inference_steps=4, num_timesteps=2),
                  progress=False)
    assert len(pipe.scheduler.timesteps) == 7 and len(res.timesteps) == 4  # 2N - 1 calls, N distinct timesteps
    assert [c.step for c in res.calls] == [0, 1, 1, 2, 2, 3, 3]
    assert [c.step for c in res.calls if c.recorded] == [0, 3, 3]  # both evaluations of the last step



def test_low_precision_timesteps_still_match_the_schedule():
    """FLUX-dev runs in bf16 and passes t / 1000 in bf16: rounding must not make a call look off-schedule."""
    from dmq.calibration.collect import match_step

    sig = torch.linspace(1, 1 / 50, 50, dtype=torch.float64)
    shift = math.exp(1.15)  # FLUX-dev's dynamic shift at 1024 px
    sched = (shift * sig / (1 + (shift - 1) * sig) * 1000).tolist()
    for i, t in enumerate(sched):
        passed = float(torch.tensor(t / 1000).to(torch.bfloat16)) * 1000
        assert match_step(passed, sched, torch.bfloat16) == i
        assert match_step(t, sched, torch.float32) == i
    assert match_step(sched[10] + 0.5 * (sched[9] - sched[10]) + 1.0, sched[10:12], torch.float32) == -1
