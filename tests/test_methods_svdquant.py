"""SmoothQuant and SVDQuant: invariants, and the error ordering RTN W4A4 > SmoothQuant > SVDQuant."""

import pytest
import torch

import dmq
from dmq.formats import QuantSpec
from dmq.methods.smoothing import smoothing_factors, weight_channel_absmax
from dmq.nn import QuantLinear, SVDQuantConv2d, SVDQuantLinear
from dmq.nn.svdquant import lowrank_split
from tiny_pipelines import build_pipeline, call_pipeline

W4 = QuantSpec("int4", "group", 64)
A4 = QuantSpec("int4", "group", 64)


def _outlier_layer(k=512, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        # a few strong directions, as trained weights have
        u, v = torch.randn(n, 8, generator=g), torch.randn(8, k, generator=g)
        lin.weight.add_(u @ v / k ** 0.5)
    x = torch.randn(256, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:8]] *= 40.0  # activation outlier channels
    return lin, x


def _rel_err(layer, lin, x):
    with torch.no_grad():
        ref = lin(x)
        return float((layer(x) - ref).norm() / ref.norm())


def test_smoothing_alone_leaves_float_output_unchanged():
    lin, x = _outlier_layer()
    lam = smoothing_factors(x.abs().amax(0), weight_channel_absmax(lin), 0.5)
    y = (x / lam) @ (lin.weight.detach() * lam).T + lin.bias.detach()
    ref = lin(x).detach()
    assert float((y - ref).norm() / ref.norm()) <= 1e-5


def test_lowrank_plus_residual_reconstructs_smoothed_weight():
    lin, x = _outlier_layer()
    lam = smoothing_factors(x.abs().amax(0), weight_channel_absmax(lin), 0.5)
    ws = lin.weight.detach() * lam
    down, up, residual = lowrank_split(ws, 32, torch.float32)
    assert down.shape == (512, 32) and up.shape == (32, 512)
    torch.testing.assert_close((down @ up).T + residual, ws, rtol=0, atol=1e-5)
    # the branch holds the top singular directions: the residual's spectral norm is the 33rd singular value
    s = torch.linalg.svdvals(ws)
    assert torch.linalg.matrix_norm(residual, ord=2) == pytest.approx(float(s[32]), rel=1e-3)


def test_randomized_top_singular_matches_exact_svd_on_a_large_weight():
    """Above EXACT_SVD_MAX the branch comes from a seeded randomized subspace iteration: deterministic, and it
    captures the same energy as the exact SVD (trained weights have a decaying spectrum; so does this one)."""
    from dmq.methods.lowrank import EXACT_SVD_MAX, captured_energy

    g = torch.Generator().manual_seed(0)
    n, k = EXACT_SVD_MAX + 76, EXACT_SVD_MAX + 276
    decay = torch.logspace(0, -3, min(n, k))
    u = torch.linalg.qr(torch.randn(n, min(n, k), generator=g)).Q
    v = torch.linalg.qr(torch.randn(k, min(n, k), generator=g)).Q
    w = (u * decay) @ v.T + 1e-3 * torch.randn(n, k, generator=g)
    exact = lowrank_split(w, 32, torch.float32, method="exact")
    fast = lowrank_split(w, 32, torch.float32)  # auto → randomized at this size
    again = lowrank_split(w, 32, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(fast, again))
    torch.testing.assert_close((fast[0] @ fast[1]).T + fast[2], w, rtol=0, atol=1e-5)
    # a slowly decaying spectrum is the hard case: the residual is still within 0.1% of the optimal one
    left_exact, left_fast = 1 - captured_energy(w, *exact[:2]), 1 - captured_energy(w, *fast[:2])
    assert left_exact <= left_fast <= left_exact * 1.001


def test_error_ordering_rtn_smoothquant_svdquant_also_at_equal_bytes():
    lin, x = _outlier_layer()
    rank = 512 // 16  # ≤ min(K, N) / 8
    lam = smoothing_factors(x.abs().amax(0), weight_channel_absmax(lin), 0.5)
    rtn = QuantLinear.from_module(lin, W4, A4)
    smooth = SVDQuantLinear.from_module(lin, W4, A4, rank=0, smooth=lam)
    svd = SVDQuantLinear.from_module(lin, W4, A4, rank=rank, smooth=lam)
    e_rtn, e_smooth, e_svd = (_rel_err(m, lin, x) for m in (rtn, smooth, svd))
    assert e_rtn > e_smooth > e_svd
    # at (about) equal bytes: give plain RTN the branch's bytes as 8-bit weights
    rtn_w8 = QuantLinear.from_module(lin, QuantSpec("int8", "channel"), A4)
    assert rtn_w8.nbytes() >= 0.95 * svd.nbytes()
    assert _rel_err(rtn_w8, lin, x) > e_svd


def test_svdquant_conv_matches_its_float_conv_at_full_rank():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(2, 64, 6, 6)
    lam = smoothing_factors(x.abs().amax(dim=(0, 2, 3)), weight_channel_absmax(conv), 0.5)
    layer = SVDQuantConv2d.from_module(conv, W4, None, rank=64, smooth=lam)  # rank = N: residual vanishes
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)
    assert layer.nbytes() == sum(t.numel() * t.element_size() for t in layer.state_dict().values())


@pytest.mark.parametrize("preset", ["svdquant-w4a4", "svdquant-w4a4-2l", "svdquant-w4a8-2l"])
def test_svdquant_preset_runs_data_free_and_round_trips(tmp_path, preset):
    pipe = dmq.quantize_pipeline(build_pipeline("dit"), preset, progress=False)
    assert any("data-free" in n for n in pipe.dmq_report.notes)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, SVDQuantLinear)]
    assert layers and all(m.rank == 32 and m.smooth is None for m in layers)
    ref = call_pipeline(pipe, "dit")
    dmq.save_quantized(pipe, tmp_path / "q")
    pipe2 = dmq.load_quantized(tmp_path / "q", build_pipeline("dit"))
    assert torch.equal(call_pipeline(pipe2, "dit"), ref)


def test_smoothquant_preset_needs_calibration():
    with pytest.raises(dmq.CalibrationRequiredError):
        dmq.quantize_pipeline(build_pipeline("dit"), "smoothquant-w4a4")


@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart", "sd3", "flux", "dit", "ddpm"])
@pytest.mark.parametrize("preset", ["svdquant-w4a4", "svdquant-nvfp4", "svdquant-w4a4-2l", "svdquant-w4a8-2l"])
def test_svdquant_presets_run_on_every_family(family, preset):
    pipe = dmq.quantize_pipeline(build_pipeline(family), preset, progress=False)
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    assert any(isinstance(m, (SVDQuantLinear, SVDQuantConv2d)) for m in model.modules())
    assert torch.isfinite(call_pipeline(pipe, family)).all()
