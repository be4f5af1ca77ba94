"""Formats: bit-exact packing, quantize→dequantize error bounds per format and granularity, exact byte formulas."""

import pytest
import torch

from dmq.errors import ConfigError
from dmq.formats import (QTYPES, SUB_MAX, QuantSpec, dequantize, fake_quantize, fp4_decode, fp4_encode, pack_nibbles,
                         padded_channels, quantize, storage_nbytes, unpack_int4, unpack_nibbles)


@pytest.mark.parametrize("shape", [(1, 2), (3, 5, 18), (7, 130), (2, 1, 4098)])
def test_int4_pack_unpack_bit_exact(shape):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == shape[-1] // 2
    assert torch.equal(unpack_int4(packed), codes)


def test_nibble_order_is_fixed():
    codes = torch.tensor([1, -2, 7, -8], dtype=torch.int8)
    # element 2i in the low nibble, 2i+1 in the high nibble; -2 = 0xE, -8 = 0x8
    assert pack_nibbles(codes).tolist() == [0xE1, 0x87]
    raw = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(raw)), raw)


def test_pack_rejects_odd_length():
    with pytest.raises(ValueError):
        pack_nibbles(torch.zeros(3, dtype=torch.int8))


def test_fp4_table_and_ties_to_even():
    vals = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    for sign in (1, -1):
        assert torch.equal(fp4_decode(fp4_encode(sign * vals)), sign * vals)
    # midpoints go to the even code: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4; saturation at 6
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 9.0])
    assert fp4_decode(fp4_encode(mids)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


WEIGHT_SPECS = [
    QuantSpec("int8", "channel"), QuantSpec("int8", "tensor"), QuantSpec("int8", "group", 16),
    QuantSpec("int4", "channel"), QuantSpec("int4", "group", 64), QuantSpec("int4", "group", 256),
    QuantSpec("int4", "group", 32, symmetric=False), QuantSpec("int8", "channel", symmetric=False),
    QuantSpec("fp8_e4m3", "channel"), QuantSpec("fp8_e4m3", "tensor"), QuantSpec("fp4_e2m1", "group", 32),
    QuantSpec("nvfp4", "group", 16), QuantSpec("int4", "group", 64, two_level=True),
]


def _bound(spec, x3):
    """Per-element error bound: half a step for ints (scale rounding allowed for), relative for floats."""
    q = quantize(x3, spec)
    deq = dequantize(q, spec, x3.shape[-1])
    return q, deq


@pytest.mark.parametrize("spec", WEIGHT_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("shape", [(5, 1, 100), (3, 9, 37)])
def test_quantize_dequantize_error_bound(spec, shape):
    g = torch.Generator().manual_seed(1)
    x3 = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[0]).reshape(-1, 1, 1)
    q, deq = _bound(spec, x3)
    assert deq.shape == x3.shape
    err = (deq - x3).abs()
    qt = spec.qtype
    if spec.granularity == "group":
        blocks = torch.nn.functional.pad(x3, (0, padded_channels(spec, shape[-1]) - shape[-1]))
        amax = blocks.reshape(shape[0], shape[1], -1, spec.group_size).abs().amax(-1, keepdim=True)
        amax = amax.expand(-1, -1, -1, spec.group_size).reshape(shape[0], shape[1], -1)[..., :shape[-1]]
    elif spec.granularity == "channel":
        amax = x3.abs().amax(dim=(1, 2), keepdim=True).expand_as(x3)
    else:
        amax = x3.abs().amax().expand_as(x3)
    if spec.two_level:
        # sub = round(s_g / scale2) may undershoot the group's ideal scale by half a unit of scale2 (a little
        # clipping, ≤ 3.5 · scale2) or overshoot it by as much (a coarser step): err ≤ amax_g / 14 + 3.5 · scale2
        scale2 = x3.abs().amax(dim=(1, 2), keepdim=True) / qt.qmax / SUB_MAX
        assert (err <= (amax / 14 + 3.5 * scale2) * 1.01 + 1e-7).all()
    elif not qt.is_float:
        step = amax / qt.qmax * (1 if spec.symmetric else 2)
        assert (err <= step * 0.5 * 1.01 + 1e-7).all()
    elif spec.dtype == "fp8_e4m3":
        # 3 mantissa bits: relative error ≤ 2^-4 in the normal range, absolute below it
        assert (err <= x3.abs() * 2 ** -4 + amax / 448 * 2 ** -9 * 1.01 + 1e-7).all()
    else:
        # fp4 e2m1: the worst gap is between 4 and 6 (half-gap 1 of 6 → 1/6 of the group max), plus the
        # nvfp4 e4m3 scale rounding (2^-4 relative)
        assert (err <= amax * (1 / 6 + 2 ** -4) * 1.01 + 1e-7).all()
    # more bits → smaller error, and the error is not zero (something was quantized)
    assert err.max() > 0


def test_zero_and_tiny_groups_are_exact_zeros():
    x3 = torch.zeros(2, 1, 64)
    x3[1, 0, :32] = 1e-9
    for spec in WEIGHT_SPECS:
        deq = dequantize(quantize(x3, spec), spec, 64)
        assert torch.isfinite(deq).all()
        assert (deq - x3).abs().max() < 1e-6


@pytest.mark.parametrize("spec", WEIGHT_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("shape", [(4, 1, 64), (3, 9, 37), (6, 1, 130)])
def test_storage_nbytes_is_exact(spec, shape):
    q = quantize(torch.randn(shape), spec)
    actual = sum(t.numel() * t.element_size() for t in q if t is not None)
    assert actual == storage_nbytes(spec, *shape)


def test_group_padding_and_conv_groups_within_tap():
    spec = QuantSpec("int4", "group", 16)
    x3 = torch.randn(2, 9, 20)  # 9 taps, 20 channels → padded to 32 per tap
    q = quantize(x3, spec)
    assert q.codes.shape == (2, 9, 16) and q.scales.shape == (2, 18)
    # a huge value in tap 0 must not coarsen the scales of tap 1: groups never straddle taps
    x3[:, 0, 0] = 1000.0
    q2 = quantize(x3, spec)
    assert torch.equal(q2.scales[:, 2:], q.scales[:, 2:])


def test_activation_per_token_and_group():
    x = torch.randn(4, 7, 128)
    x[0, 0, 5] = 200.0  # an outlier only affects its own token (and its own group)
    for spec in (QuantSpec("int8", "token"), QuantSpec("int4", "group", 64)):
        y = fake_quantize(x, spec)
        assert y.shape == x.shape and y.dtype == x.dtype
        # tokens without the outlier keep a fine step: half a step of their own max
        clean = x[1:].abs().amax(-1, keepdim=True)
        assert ((y[1:] - x[1:]).abs() <= clean / spec.qtype.qmax * 0.5 * 1.01).all()
        assert torch.equal(fake_quantize(x[1:], spec), y[1:])
    conv_x = torch.randn(2, 64, 5, 5)
    spec = QuantSpec("int8", "token")
    y = fake_quantize(conv_x, spec, channel_dim=1)
    # per input pixel along channels: the same as quantizing the NHWC view per row
    ref = fake_quantize(conv_x.permute(0, 2, 3, 1), spec).permute(0, 3, 1, 2)
    assert torch.equal(y, ref)


def test_two_level_codes_fit_int8_and_stay_close_to_float_groups():
    """Two-level int4: sub-scales in [1, SUB_MAX] and |code · sub| ≤ 120, so an int8 GEMM takes the products; on
    data with outlier channels its error stays within 10% of float g64 scales (and far below per-channel int4)."""
    g = torch.Generator().manual_seed(0)
    x3 = torch.randn(64, 1, 1024, generator=g)
    x3[..., torch.randperm(1024, generator=g)[:10]] *= 20
    spec = QuantSpec("int4", "group", 64, two_level=True)
    q = quantize(x3, spec)
    assert q.scales.dtype == torch.uint8 and q.scales.shape == (64, 16) and q.scale2.shape == (64,)
    assert q.scales.min() >= 1 and q.scales.max() == SUB_MAX
    codes = unpack_int4(q.codes.reshape(64, -1)).int()
    assert (codes * q.scales.int().repeat_interleave(64, dim=1)).abs().max() <= 120
    mse = {name: (dequantize(quantize(x3, sp), sp, 1024) - x3).pow(2).mean().item() for name, sp in
           (("2l", spec), ("g64", QuantSpec("int4", "group", 64)), ("ch", QuantSpec("int4", "channel")))}
    assert mse["2l"] <= 1.1 * mse["g64"] and mse["2l"] < 0.5 * mse["ch"]


def test_static_scale_is_used():
    spec = QuantSpec("int8", "tensor", dynamic=False)
    x = torch.linspace(-2, 2, 100).reshape(1, 100)
    y = fake_quantize(x, spec, scale=torch.tensor(1 / 127))  # range ±1: values beyond are clipped
    assert y.max().item() == pytest.approx(1.0) and y.min().item() == pytest.approx(-1.0 * 128 / 127)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(dtype="int3", granularity="channel"), "unknown quantization dtype"),
    (dict(dtype="int4", granularity="group", group_size=48), "power of two"),
    (dict(dtype="int4", granularity="group", group_size=512), "power of two"),
    (dict(dtype="int4", granularity="group", group_size=8), "power of two"),
    (dict(dtype="int4", granularity="group"), "power of two"),
    (dict(dtype="int4", granularity="row"), "unknown granularity"),
    (dict(dtype="fp8_e4m3", granularity="channel", symmetric=False), "only symmetric"),
    (dict(dtype="nvfp4", granularity="group", group_size=32), "nvfp4"),
    (dict(dtype="int8", granularity="token", dynamic=False), "static"),
    (dict(dtype="int8", granularity="group", group_size=64, two_level=True), "two_level"),
    (dict(dtype="int4", granularity="channel", two_level=True), "two_level"),
])
def test_bad_specs_raise(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        QuantSpec(**kwargs)


def test_qtypes_are_consistent():
    for qt in QTYPES.values():
        assert qt.packed == (qt.bits == 4)
        assert qt.qmin < 0 < qt.qmax


def test_group_size_fits_the_channel_count():
    g128 = QuantSpec("int4", "group", 128)
    assert g128.fitted(256) is g128
    assert g128.fitted(192).group_size == 64 and g128.fitted(320).group_size == 64
    assert g128.fitted(48).group_size == 16
    assert g128.fitted(40) is g128  # no power of two ≥ 16 divides 40: keep 128 and zero-pad
    assert QuantSpec("int8", "channel").fitted(7).granularity == "channel"
