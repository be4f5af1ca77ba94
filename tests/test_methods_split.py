"""Split-shortcut quantization: lower error on a bimodal concatenation and on a U-Net; save/load round-trips."""

from dataclasses import replace

import pytest
import torch

import dmq
from dmq.errors import ConfigError
from dmq.formats import QuantSpec
from dmq.nn import QuantConv2d, SplitQuantConv2d
from dmq.pipelines.roles import roles_for
from tiny_pipelines import build_pipeline, call_pipeline, denoiser_inputs, denoiser_output

W4 = QuantSpec("int4", "group", 128)
A8 = QuantSpec("int8", "token")


def test_split_lowers_error_on_a_bimodal_concat():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(256, 128, 3, padding=1)
    hidden = torch.randn(2, 128, 8, 8) * 0.05   # small-range hidden state
    skip = torch.randn(2, 128, 8, 8) * 5.0       # large-range skip connection
    x = torch.cat([hidden, skip], 1)
    ref = conv(x).detach()
    # only the hidden half of the weight matters for this check: the skip half's output is zeroed
    with torch.no_grad():
        conv.weight[:, 128:] *= 0.002
        ref = conv(x)
    plain = QuantConv2d.from_module(conv, W4, A8)
    split = SplitQuantConv2d.from_module(conv, (128,), W4, A8)
    err = lambda m: float((m(x) - ref).norm() / ref.norm())  # noqa: E731
    assert err(split) < 0.5 * err(plain)
    # no group straddles the split: each part quantizes its own range
    assert [p.in_channels for p in split.parts] == [128, 128]
    assert split.nbytes() == sum(t.numel() * t.element_size() for t in split.state_dict().values())


def test_split_rejects_bad_points():
    with pytest.raises(ConfigError, match="split points"):
        SplitQuantConv2d.from_module(torch.nn.Conv2d(64, 64, 1), (64,), W4, A8)


def _psnr(ref, x):
    return float(10 * torch.log10(ref.abs().max() ** 2 / (ref - x).pow(2).mean()))


def _bimodal_unet(family="ddpm"):
    """A tiny U-Net whose skip connections run at 30× the scale of the up path, as trained U-Nets' often differ."""
    pipe = build_pipeline(family)
    with torch.no_grad():
        for name, m in pipe.unet.named_modules():
            if name.startswith("down_blocks.") and name.endswith("conv2"):
                m.weight.mul_(30.0)
                m.bias.mul_(30.0)
    return pipe


def _unet_psnr(cfg, family="ddpm"):
    fp = _bimodal_unet(family)
    pipe = dmq.quantize_pipeline(_bimodal_unet(family), cfg, progress=False)
    vals = []
    for t in (900.0, 500.0, 100.0):
        kw = denoiser_inputs(fp, family, t)
        with torch.no_grad():
            vals.append(_psnr(denoiser_output(fp, family, kw), denoiser_output(pipe, family, kw)))
    return sum(vals) / len(vals), pipe


def test_split_on_a_unet_covers_every_concat_consumer_and_lowers_error(tmp_path):
    base = dmq.get_preset("w4a8")
    plain, _ = _unet_psnr(base)
    split, pipe = _unet_psnr(replace(base, split_shortcut=True))
    points = roles_for(pipe.unet).concat_points
    consumers = {c for p in points for c in p.consumers}
    quantized = {n for n, m in pipe.unet.named_modules() if isinstance(m, SplitQuantConv2d)}
    assert consumers == quantized and len(consumers) >= 4
    for p in points:
        assert all(dict(pipe.unet.named_modules())[c].splits == (p.split,) for c in p.consumers)
    assert split > plain, (split, plain)
    ref = call_pipeline(pipe, "ddpm")
    dmq.save_quantized(pipe, tmp_path / "q")
    assert torch.equal(call_pipeline(dmq.load_quantized(tmp_path / "q", _bimodal_unet()), "ddpm"), ref)
