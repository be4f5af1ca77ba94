"""Conformance over the seven pipeline families on tiny models built from configs in code.

Every preset runs end to end; layers are really replaced; bytes match their format; w8a8 is faithful and clearly
better than plain w4a4 on the denoiser output; save → load gives bit-identical images.
"""

from __future__ import annotations

import functools

import pytest
import torch

import dmq
from dmq.nn import QuantGemm
from dmq.pipelines.quantize import denoiser_name
from tiny_pipelines import FAMILIES, build_pipeline, call_pipeline, denoiser_inputs, denoiser_output

PRESETS = ("w8a8", "w4a8", "w4a16", "w4a4", "fp8")
TIMESTEPS = {"flux": (0.9, 0.5, 0.1), "sd3": (0.9, 0.5, 0.1)}  # fractions of the schedule


def _timesteps(family: str) -> list[float]:
    return [f * 1000 for f in TIMESTEPS.get(family, (0.9, 0.5, 0.1))]


def psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR (dB) of ``x`` against ``ref``, peak = the reference's max |value|."""
    mse = (ref.double() - x.double()).pow(2).mean()
    return float(10 * torch.log10(ref.double().abs().max() ** 2 / mse))


@functools.lru_cache(maxsize=None)
def _fp_outputs(family: str) -> tuple:
    pipe = build_pipeline(family)
    outs = []
    for t in _timesteps(family):
        kw = denoiser_inputs(pipe, family, t)
        with torch.no_grad():
            outs.append(denoiser_output(pipe, family, kw))
    return tuple(outs)


@functools.lru_cache(maxsize=None)
def _quantized_psnr(family: str, preset: str) -> float:
    pipe = dmq.quantize_pipeline(build_pipeline(family), preset, progress=False)
    vals = []
    for t, ref in zip(_timesteps(family), _fp_outputs(family)):
        with torch.no_grad():
            out = denoiser_output(pipe, family, denoiser_inputs(pipe, family, t))
        vals.append(psnr(ref, out))
    return min(vals)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_end_to_end_and_replaces_layers(family, preset):
    pipe = build_pipeline(family)
    model = getattr(pipe, denoiser_name(pipe))
    fp_sizes = {n: (m.weight.numel(), m.weight.element_size(), m.bias) for n, m in model.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    dmq.quantize_pipeline(pipe, preset, progress=False)
    report = pipe.dmq_report
    q_layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantGemm)}
    assert len(q_layers) == report.num_quantized > 0
    assert {e.name for e in report.entries if e.action != "kept"} == set(q_layers)
    # every GEMM layer is accounted for: quantized or kept with a reason
    assert {e.name for e in report.entries} == set(fp_sizes)
    assert all(e.reason for e in report.by_action("kept"))
    sd = model.state_dict()
    for name, layer in q_layers.items():
        numel, elsize, bias = fp_sizes[name]
        own = {k: v for k, v in sd.items() if k.rpartition(".")[0] == name}
        # exact byte formula of the format: codes + scales (+ zeros) + bias
        assert layer.nbytes() == sum(v.numel() * v.element_size() for v in own.values())
        assert not any(v.is_floating_point() and v.element_size() >= 2 and v.numel() >= numel for v in own.values())
        # ratio against the fp16 layer, the bias counted at 16 bits on both sides (the tiny models are fp32)
        bias16 = bias.numel() * 2 if bias is not None else 0
        q16 = layer.nbytes() - (bias.numel() * bias.element_size() if bias is not None else 0) + bias16
        if layer.channels >= 64:
            limit = 0.55 if layer.weight_spec.bits == 8 else 0.30
            assert q16 <= limit * (numel * 2 + bias16), name
    images = call_pipeline(pipe, family, seed=0, steps=2)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_is_faithful_and_beats_w4a4(family):
    w8 = _quantized_psnr(family, "w8a8")
    w4 = _quantized_psnr(family, "w4a4")
    assert w8 >= 30.0, f"{family}: w8a8 PSNR {w8:.1f} dB"
    assert w8 >= w4 + 10.0, f"{family}: w8a8 {w8:.1f} dB vs w4a4 {w4:.1f} dB"


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_bit_identical(family, tmp_path):
    pipe = dmq.quantize_pipeline(build_pipeline(family), "w4a8", progress=False)
    ref = call_pipeline(pipe, family, seed=0, steps=2)
    dmq.save_quantized(pipe, tmp_path / "q")
    pipe2 = dmq.load_quantized(tmp_path / "q", build_pipeline(family))
    assert torch.equal(call_pipeline(pipe2, family, seed=0, steps=2), ref)
    assert pipe2.dmq_report.to_dict() == pipe.dmq_report.to_dict()
