"""Quantized layers: stored really quantized, exact byte counts, reference forward, conv == its GEMM form."""

import pytest
import torch
import torch.nn.functional as F

from dmq.errors import CalibrationRequiredError, NonFiniteError, UnsupportedModuleError
from dmq.formats import QuantSpec, fake_quantize
from dmq.nn import QuantConv2d, QuantLinear, quantize_module

SPECS = [QuantSpec("int8", "channel"), QuantSpec("int4", "group", 64), QuantSpec("fp8_e4m3", "channel"),
         QuantSpec("nvfp4", "group", 16), QuantSpec("int4", "group", 32, symmetric=False)]


def _state_bytes(m):
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_linear_stores_quantized_and_counts_bytes(spec):
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 64).to(torch.float16)
    q = QuantLinear.from_module(lin, spec, QuantSpec("int8", "token"))
    sd = q.state_dict()
    # no N×K tensor of 16 bits or more survives (fp8 codes are 1-byte floats)
    assert not any(t.is_floating_point() and t.element_size() >= 2 and t.numel() >= 64 * 192 for t in sd.values())
    assert q.nbytes() == _state_bytes(q)
    if spec.bits == 4:
        assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (64, 96)
        if spec.symmetric:  # the presets' 4-bit formats (g64 int4, nvfp4) come to ≤ 0.30 of fp16
            assert q.nbytes() <= 0.30 * (lin.weight.numel() + lin.bias.numel()) * 2
    x = torch.randn(3, 5, 192, dtype=torch.float16)
    ref = F.linear(fake_quantize(x, QuantSpec("int8", "token")),
                   q.dequantized_weight().reshape(64, 192).to(torch.float16), lin.bias)
    y = q(x)
    assert y.dtype == torch.float16 and torch.equal(y, ref)


def test_conv_equals_its_gemm_form():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(40, 64, 3, padding=1, stride=2)
    wspec, aspec = QuantSpec("int4", "group", 16), QuantSpec("int4", "group", 16)
    q = QuantConv2d.from_module(conv, wspec, aspec)
    x = torch.randn(2, 40, 9, 9)
    y = q(x)
    # GEMM over K = (kh, kw, Cin): activations quantized per input pixel along channels, then im2col
    xq = fake_quantize(x, aspec, channel_dim=1)
    cols = F.unfold(xq, 3, padding=1, stride=2)  # (B, Cin*9, L) ordered (Cin, kh, kw)
    cols = cols.reshape(2, 40, 9, -1).permute(0, 3, 2, 1).reshape(2, -1, 9 * 40)  # → (B, L, (kh, kw, Cin))
    w = q.dequantized_weight().reshape(64, 9 * 40)
    gemm = (cols @ w.T + conv.bias).permute(0, 2, 1).reshape(2, 64, 5, 5)
    torch.testing.assert_close(y, gemm, rtol=1e-4, atol=1e-4)
    assert q.nbytes() == _state_bytes(q)


def test_layer_spec_round_trip_shapes():
    conv = torch.nn.Conv2d(64, 128, 3, padding=1)
    for layer in (QuantLinear.from_module(torch.nn.Linear(100, 30), QuantSpec("nvfp4", "group", 16)),
                  QuantConv2d.from_module(conv, QuantSpec("int4", "group", 64), QuantSpec("int8", "token"))):
        shell = type(layer).from_layer_spec(layer.layer_spec())
        assert {k: (v.shape, v.dtype) for k, v in shell.state_dict().items()} == \
               {k: (v.shape, v.dtype) for k, v in layer.state_dict().items()}
        assert shell.layer_spec() == layer.layer_spec()


def test_unsupported_modules_are_named():
    with pytest.raises(UnsupportedModuleError, match="blocks.3.conv.*grouped"):
        quantize_module(torch.nn.Conv2d(64, 64, 3, groups=4), QuantSpec("int8", "channel"), None, "blocks.3.conv")
    with pytest.raises(UnsupportedModuleError, match="emb.*Embedding"):
        quantize_module(torch.nn.Embedding(10, 64), QuantSpec("int8", "channel"), None, "emb")
    with pytest.raises(UnsupportedModuleError, match="padding"):
        quantize_module(torch.nn.Conv2d(64, 64, 3, padding="same"), QuantSpec("int8", "channel"), None, "c")


def test_nan_weight_raises():
    lin = torch.nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="blk.proj"):
        QuantLinear.from_module(lin, QuantSpec("int8", "channel"), name="blk.proj")


def test_static_activation_needs_calibration():
    q = QuantLinear.from_module(torch.nn.Linear(64, 64), QuantSpec("int8", "channel"),
                                QuantSpec("int8", "tensor", dynamic=False))
    with pytest.raises(CalibrationRequiredError):
        q(torch.randn(2, 64))
    q.input_scale.fill_(0.01)
    assert torch.isfinite(q(torch.randn(2, 64))).all()
