"""Triton kernels vs their references under TRITON_INTERPRET=1 (set in conftest.py), at small odd shapes.

Integer outputs (codes, scales, dequantized weights) must be bit-exact. Float outputs are compared with
``max |kernel - reference| <= TOL * max |reference|`` where the kernel only reorders fp32 sums and rounds once to
fp16 (TOL = 2e-3 ≈ 4 fp16 half-ulps of the largest output). The interpreter miscomputes in-kernel casts to bf16, so
bf16 inputs are checked on integer outputs only here (the GPU run of benchmarks/kernel_bench.py checks them).
"""

from __future__ import annotations

import types

import pytest
import torch

triton = pytest.importorskip("triton")

from dmq.formats import QuantSpec, fake_quantize, pack_nibbles, quantize, unpack_int4  # noqa: E402
from dmq.kernels import linear as klinear  # noqa: E402
from dmq.kernels import ops  # noqa: E402
from dmq.kernels.dispatch import find_kernel  # noqa: E402
from dmq.kernels.layouts import blocked_kb, blocked_to_int8, int4_to_blocked  # noqa: E402
from dmq.kernels.reference import fp8 as rfp8  # noqa: E402
from dmq.kernels.reference import gemm as rgemm  # noqa: E402
from dmq.kernels.reference import im2col as ri2c  # noqa: E402
from dmq.kernels.reference import nvfp4 as rnv  # noqa: E402
from dmq.kernels.reference import quant_act as rq  # noqa: E402
from dmq.kernels.reference import weight_only as rwo  # noqa: E402
from dmq.kernels.triton import gemm as tgemm  # noqa: E402
from dmq.kernels.triton import im2col as ti2c  # noqa: E402
from dmq.kernels.triton import nvfp4 as tnv  # noqa: E402
from dmq.kernels.triton import quant_act as tq  # noqa: E402
from dmq.kernels.triton import weight_only as two  # noqa: E402
from dmq.nn.conv import QuantConv2d  # noqa: E402
from dmq.nn.linear import QuantLinear  # noqa: E402

TOL = 2e-3
MS = (1, 37, 130)


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    got, ref = got.float(), ref.float()
    assert got.shape == ref.shape
    assert torch.isfinite(got).all()
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item() or 1.0
    assert err <= tol * scale, f"max error {err:.3g} > {tol} * {scale:.3g}"


def _x(m, k, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x[:, 1] *= 20                                   # an outlier channel
    return x.to(dtype)


# -- layouts ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [37, 128, 200])
def test_blocked_int4_layout_roundtrip(k):
    codes = torch.randint(-8, 8, (5, k + k % 2), dtype=torch.int8)
    wb = int4_to_blocked(pack_nibbles(codes))
    assert wb.shape == (5, blocked_kb(k) // 2) and wb.dtype == torch.uint8
    assert torch.equal(blocked_to_int8(wb, k), codes[:, :k])
    # byte j of block 0: low nibble = code j, high nibble = code 64 + j
    if k >= 128:
        assert int(wb[0, 3]) & 15 == int(codes[0, 3]) & 15 and int(wb[0, 3]) >> 4 == int(codes[0, 67]) & 15


# -- activation quantization + low-rank down ---------------------------------------------------------------------------
QA_CASES = [  # qdtype, group, pack, smooth, rank
    ("int4", 64, False, True, 32),
    ("int4", 64, True, False, 0),
    ("int4", 0, True, True, 24),
    ("int8", 0, False, True, 64),
    ("int8", 128, False, False, 16),
    ("int4", 16, True, False, 0),
    ("fp8_e4m3", 0, False, False, 0),
    ("int4_2l", 64, False, True, 32),
    ("int4_2l", 128, False, False, 0),
]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("case", QA_CASES, ids=lambda c: f"{c[0]}-g{c[1]}-p{int(c[2])}-s{int(c[3])}-r{c[4]}")
def test_quantize_act_matches_reference(m, case):
    qdtype, group, pack, use_smooth, r = case
    k = {1: 37, 37: 100, 130: 200}[m]               # never a multiple of the group or block
    x = _x(m, k, seed=m)
    smooth = (torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5).half() if use_smooth else None
    pd = (torch.randn(k, r) / 8).half() if r else None
    got = tq.quantize_act(x, smooth, pd, qdtype, group, pack)
    ref = rq.quantize_act(x, smooth, pd, qdtype, group, pack)
    view = (lambda t: t.view(torch.uint8)) if qdtype == "fp8_e4m3" else (lambda t: t)
    assert got[0].dtype == ref[0].dtype and torch.equal(view(got[0]), view(ref[0]))
    assert got[1].dtype == ref[1].dtype and torch.equal(got[1], ref[1])
    assert got[2].shape == (m, r)
    if r:
        _close(got[2], ref[2])


@pytest.mark.parametrize("qdtype,group", [("int4", 64), ("int8", 0), ("fp8_e4m3", 0), ("int4", 0)])
def test_quantize_act_codes_equal_formats_quantize(qdtype, group):
    """On the CPU the reference (correctly rounded divisions) is exactly dmq.formats.quantize."""
    x = _x(37, 100)
    codes, scales, _ = rq.quantize_act(x, None, None, qdtype, group, qdtype == "int4")
    spec = QuantSpec(qdtype, "group", group) if group else QuantSpec(qdtype, "token")
    q = quantize(x.float().reshape(37, 1, 100), spec)
    view = (lambda t: t.view(torch.uint8)) if qdtype == "fp8_e4m3" else (lambda t: t)
    assert torch.equal(view(codes), view(q.codes.reshape(37, -1))) and torch.equal(scales, q.scales)


@pytest.mark.parametrize("qdtype,group", [("int8", 0), ("int4_2l", 64), ("int4", 0)])
def test_every_per_token_config_is_exact(qdtype, group):
    """Each autotuning config of the per-token kernel (rows per program, K step or the whole row, as pruned for the
    row length) gives the reference's codes and scales bit for bit."""
    m, k = 9, 700
    x = _x(m, k)
    ref = rq.quantize_act(x, None, None, qdtype, group, False)
    kp = ref[0].shape[1]
    two_level = group if qdtype == "int4_2l" else 0
    configs = tq._token_prune(tq._TOKEN_CONFIGS, {"KP": kp}, TWO_LEVEL_GROUP=two_level)
    assert len(configs) >= 5 and all(c.kwargs["BK"] <= 1024 for c in configs)
    whole = [c.kwargs["BM"] for c in configs if c.kwargs["WHOLE"]]
    assert whole == ([1] if two_level else [4, 2, 1])   # two-level: whole rows one at a time only
    for c in configs:
        codes, scales = torch.empty_like(ref[0]), torch.empty_like(ref[1])
        tq._token_kernel[(triton.cdiv(m, c.kwargs["BM"]),)](
            x, x, codes, scales, m, k, kp, 16, x.stride(0), 1, codes.stride(0), HAS_SMOOTH=False, PLANAR=False,
            IS_FP8=False, QMAX=float(127 if qdtype == "int8" else 7), PACK=False, TWO_LEVEL_GROUP=two_level,
            **c.kwargs)
        assert torch.equal(codes, ref[0]) and torch.equal(scales, ref[1]), c


@pytest.mark.parametrize("qdtype,group", [("int8", 0), ("int4_2l", 64)])
def test_every_planar_config_is_exact(qdtype, group):
    """Each config of the per-token kernel reading an NCHW image in place (pixels as rows, runs of BM pixels per
    program, two images) gives the reference's codes (NHWC rows) and scales bit for bit."""
    img = _x(2 * 70, 64).reshape(2, 70, 8, 8)       # B = 2, C = 70 (not a multiple of the K step), H·W = 64
    ref = rq.quantize_act(img, None, None, qdtype, group, False)
    m, kp = ref[0].shape
    two_level = group if qdtype == "int4_2l" else 0
    configs = tq._token_prune(tq._PLANAR_CONFIGS, {"KP": kp}, TWO_LEVEL_GROUP=two_level)
    assert len(configs) >= 3 and all(c.kwargs["BK"] >= two_level for c in configs)
    for c in configs:
        codes, scales = torch.empty_like(ref[0]), torch.empty_like(ref[1])
        tq._token_kernel[(triton.cdiv(m, c.kwargs["BM"]),)](
            img, img, codes, scales, m, 70, kp, 128, 0, 64, codes.stride(0), HAS_SMOOTH=False, PLANAR=True,
            IS_FP8=False, QMAX=float(127 if qdtype == "int8" else 7), PACK=False, TWO_LEVEL_GROUP=two_level,
            **c.kwargs)
        assert torch.equal(codes, ref[0]) and torch.equal(scales, ref[1]), c


@pytest.mark.parametrize("qdtype,group", [("int8", 0), ("int4_2l", 64), ("int4", 64), ("fp8_e4m3", 0)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "odd_size"])
def test_image_input_matches_rows(qdtype, group, layout):
    """quantize_act on an image (B, C, H, W) quantizes its pixels as rows: an NCHW image in place (per-token and
    per-group kernels), a channels-last one through its row view, other sizes through a copy; smoothing included."""
    h, w = (5, 7) if layout == "odd_size" else (8, 16)
    img = _x(3 * 40, h * w).reshape(3, 40, h, w)
    if layout == "channels_last":
        img = img.contiguous(memory_format=torch.channels_last)
    smooth = (torch.rand(40) + 0.5).half()
    rows = img.permute(0, 2, 3, 1).reshape(-1, 40).contiguous()
    want = rq.quantize_act(rows, smooth, None, qdtype, group, False)
    for got in (tq.quantize_act(img, smooth, None, qdtype, group, False),
                rq.quantize_act(img, smooth, None, qdtype, group, False)):
        view = (lambda t: t.view(torch.uint8)) if qdtype == "fp8_e4m3" else (lambda t: t)
        assert torch.equal(view(got[0]), view(want[0])) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="no proj_down"):
        tq.quantize_act(img, None, torch.zeros(40, 4).half(), qdtype, group, False)


def test_two_level_act_codes_are_formats_codes_times_sub_scales():
    """int4_2l delivers dmq.formats' two-level codes multiplied by their integer sub-scales (exact int8) and the
    per-token second-level scale: the GEMM then sees a per-token int8 operand."""
    x = _x(37, 200)
    prods, scales, _ = rq.quantize_act(x, None, None, "int4_2l", 64, False)
    q = quantize(x.float().reshape(37, 1, 200), QuantSpec("int4", "group", 64, two_level=True))
    codes = unpack_int4(q.codes.reshape(37, -1)).int()
    assert prods.dtype == torch.int8 and prods.shape == (37, 256)
    assert torch.equal(prods.int(), codes * q.scales.int().repeat_interleave(64, dim=1))
    assert torch.equal(scales, q.scale2) and scales.dtype == torch.float32
    assert prods.int().abs().max() <= 120


def test_quantize_act_bf16_codes_exact():
    x = _x(37, 100, torch.bfloat16)
    got = tq.quantize_act(x, None, None, "int4", 64, False)
    ref = rq.quantize_act(x, None, None, "int4", 64, False)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# -- integer GEMM ------------------------------------------------------------------------------------------------------
GEMM_CASES = [  # w_format, a_group, w_group, rank
    ("int8", 0, 0, 0),        # w8a8
    ("int4b", 0, 0, 32),      # w4a4 per-channel + rank 32
    ("int4b", 64, 64, 24),    # w4a4 g64 + odd rank
    ("int4b", 0, 128, 0),     # w4a8 (int4 g128 weights, int8 per-token activations)
    ("int8", 0, 128, 0),      # w4a8 through the unpack-once int8 path
    ("int8", 64, 0, 16),      # group activations, per-channel int8 weights
]


def _gemm_inputs(m, k, n, fmt, ag, wg, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    qa = 8 if (fmt == "int4b" or ag) else 128
    a = torch.randint(-qa, qa, (m, k), dtype=torch.int8, generator=g)
    wc = torch.randint(-8 if fmt == "int4b" else -128, 8 if fmt == "int4b" else 128, (n, k), dtype=torch.int8,
                       generator=g)
    w = int4_to_blocked(pack_nibbles(torch.nn.functional.pad(wc, (0, k % 2)))) if fmt == "int4b" else wc
    norm = 1.0 / (qa * 16 * k ** 0.5)
    a_s = ((torch.rand(m, -(-k // ag), generator=g) + 0.5) * norm).half() if ag else \
        (torch.rand(m, generator=g) + 0.5) * norm
    w_s = ((torch.rand(n, -(-k // wg), generator=g) + 0.5) * 10).half() if wg else (torch.rand(n, generator=g) + .5)
    lr = torch.randn(m, r, generator=g).half() if r else None
    up = (torch.randn(r, n, generator=g) / 4).half() if r else None
    bias = torch.randn(n, generator=g).half()
    return a, a_s, w, w_s, lr, up, bias


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: f"{c[0]}-a{c[1]}-w{c[2]}-r{c[3]}")
def test_gemm_matches_reference(m, case):
    fmt, ag, wg, r = case
    k, n = {1: (64, 37), 37: (200, 50), 130: (320, 70)}[m]
    args = _gemm_inputs(m, k, n, fmt, ag, wg, r, seed=m)
    a, a_s, w, w_s, lr, up, bias = args
    got = tgemm.gemm_int(a, a_s, w, w_s, fmt, ag, wg, lr, up, bias, torch.float16)
    ref = rgemm.gemm_int(a, a_s, w, w_s, fmt, ag, wg, lr, up, bias, torch.float16)
    _close(got, ref)
    if fmt == "int4b" and m > 1:     # the swapped-operand variant (weight tile as the MMA's first operand)
        _close(tgemm.gemm_int(a, a_s, w, w_s, fmt, ag, wg, lr, up, bias, torch.float16, swap=True), ref)


def test_gemm_int8_tma_and_pointer_paths_agree():
    """int8 weights take the TMA kernel when rows are 16-byte aligned (always under the interpreter) and the pointer
    kernel otherwise; a weight with more K columns than the activations is read only up to K by both."""
    a, a_s, w, w_s, lr, up, bias = _gemm_inputs(37, 320, 50, "int8", 0, 0, 16, seed=3)
    wide = torch.nn.functional.pad(w, (0, 16))
    assert tgemm.tma_ok(a, wide)
    ref = rgemm.gemm_int(a, a_s, w, w_s, "int8", 0, 0, lr, up, bias, torch.float16)
    _close(tgemm.gemm_int(a, a_s, wide, w_s, "int8", 0, 0, lr, up, bias, torch.float16), ref)
    a2 = torch.nn.functional.pad(a, (0, 8))[:, :320]          # row stride 328: not 16-byte aligned
    assert not tgemm.tma_ok(a2, wide)
    _close(tgemm.gemm_int(a2, a_s, wide, w_s, "int8", 0, 0, lr, up, bias, torch.float16), ref)


def test_grouped_gemm_exact_at_extreme_codes():
    """Group-scaled int8 GEMMs (TMA and pointer kernels) at the largest products (-128 · -128 over every K step):
    the per-step int32 sums are at their largest and the result stays exact."""
    m, k, n = 16, 320, 16
    a = torch.full((m, k), -128, dtype=torch.int8)
    w = torch.full((n, k), -128, dtype=torch.int8)
    a_s = torch.full((m, k // 64), 2.0 ** -10).half()
    w_s = torch.full((n,), 2.0 ** -10)
    want = torch.full((m, n), k * 128 * 128 / 2 ** 20, dtype=torch.float16)
    a_unaligned = torch.nn.functional.pad(a, (0, 8))[:, :k]
    assert tgemm.tma_ok(a, w) and not tgemm.tma_ok(a_unaligned, w)
    for aa in (a, a_unaligned):
        assert torch.equal(tgemm.gemm_int(aa, a_s, w, w_s, "int8", 64, 0, None, None, None, torch.float16), want)


@pytest.mark.parametrize("runs", [0, 1])
@pytest.mark.parametrize("ag,wg", [(192, 0), (0, 128), (384, 128), (192, 128)])
def test_tma_gemm_group_runs_match_reference(runs, ag, wg, monkeypatch):
    """Group scales applied per K step or once per run of K columns that share them (a convolution's per-tap
    activation scales: runs of Cin): the same result as the reference."""
    monkeypatch.setattr(tgemm, "GROUP_RUNS", runs)
    m, k, n = 37, 768 + 192, 50                        # a last activation group cut short by K
    args = _gemm_inputs(m, k, n, "int8", ag, wg, 16, seed=5)
    a, a_s, w, w_s, lr, up, bias = args
    assert tgemm.tma_ok(a, w)
    got = tgemm.gemm_int(a, a_s, w, w_s, "int8", ag, wg, lr, up, bias, torch.float16)
    _close(got, rgemm.gemm_int(a, a_s, w, w_s, "int8", ag, wg, lr, up, bias, torch.float16))


@pytest.mark.parametrize("m,k,n,r", [(130, 256, 200, 16), (37, 208, 50, 0), (1, 64, 37, 16)])
def test_persistent_tma_gemm_is_the_tma_gemm(m, k, n, r, monkeypatch):
    """The persistent TMA GEMM (3 programs walking the tiles under the interpreter: up to 4 tiles each, a K tail,
    ragged M and N) gives bit for bit the one-tile-per-program kernel's output; grouped scales keep the latter."""
    a, a_s, w, w_s, lr, up, bias = _gemm_inputs(m, k, n, "int8", 0, 0, r, seed=m)
    assert tgemm.tma_ok(a, w)
    want = tgemm.gemm_int(a, a_s, w, w_s, "int8", 0, 0, lr, up, bias, torch.float16)
    launched = []
    monkeypatch.setattr(tgemm, "PERSISTENT", True)
    monkeypatch.setattr(tgemm, "_launch_persistent", lambda *args, f=tgemm._launch_persistent: (launched.append(1),
                                                                                               f(*args))[1])
    got = tgemm.gemm_int(a, a_s, w, w_s, "int8", 0, 0, lr, up, bias, torch.float16)
    assert launched and torch.equal(got, want)
    _close(got, rgemm.gemm_int(a, a_s, w, w_s, "int8", 0, 0, lr, up, bias, torch.float16))


# -- im2col ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32])
@pytest.mark.parametrize("geometry", [(3, 3, 1, 1, 1, 1, 1, 1), (3, 3, 2, 2, 1, 1, 1, 1), (1, 1, 1, 1, 0, 0, 1, 1),
                                      (3, 2, 1, 2, 2, 0, 2, 1)], ids=lambda g: "k{}x{}-s{}x{}-p{}x{}-d{}x{}".format(*g))
def test_im2col_matches_reference(dtype, geometry):
    """The GEMM rows of a convolution gathered from NHWC codes (int8) or scales (fp32), zeros in the padding: bit
    for bit the reference's, for odd sizes, strides, padding and dilation; and the layout a convolution expects."""
    g = torch.Generator().manual_seed(0)
    t = torch.randint(-128, 128, (2, 7, 9, 70), dtype=torch.int8, generator=g) if dtype == torch.int8 else \
        torch.randn(2, 7, 9, 3, generator=g)
    got = ti2c.im2col(t, *geometry)
    ref = ri2c.im2col(t, *geometry)
    assert got.dtype == t.dtype and torch.equal(got, ref)
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    wts = torch.randn(5, t.shape[3], kh, kw, generator=g)
    conv = torch.nn.functional.conv2d(t.float().permute(0, 3, 1, 2), wts, None, (sh, sw), (ph, pw), (dh, dw))
    gemm = got.float() @ wts.permute(0, 2, 3, 1).reshape(5, -1).T
    assert torch.allclose(gemm.reshape(*conv.shape[:1], *conv.shape[2:], 5).permute(0, 3, 1, 2), conv, atol=1e-3)
    assert torch.equal(torch.ops.dmq.im2col(t, *geometry), ref)


def test_im2col_rejects_bad_geometry():
    with pytest.raises(ValueError, match="bad conv geometry"):
        ti2c.im2col(torch.zeros(1, 4, 4, 8, dtype=torch.int8), 3, 3, 0, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="NHWC"):
        ti2c.im2col(torch.zeros(4, 4, 8, dtype=torch.int8), 3, 3, 1, 1, 1, 1, 1, 1)


CONV_GEOMETRIES = [(3, 3, 1, 1, 1, 1), (3, 3, 2, 2, 2, 2), (5, 3, 2, 1, 1, 1), (1, 1, 0, 0, 1, 1)]   # kh kw ph pw dh dw


def _conv_gemm_inputs(kh, kw, r, b=2, h=5, w=7, cp=128, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (b, h, w, cp), dtype=torch.int8, generator=g)
    scales = torch.rand(b, h, w, generator=g) * 1e-2 + 1e-3
    wt = torch.randint(-127, 128, (n, kh * kw * cp), dtype=torch.int8, generator=g)
    ws = torch.rand(n, generator=g) + 0.5
    lr = (torch.randn(b * h * w, r, generator=g) / 4).half() if r else None
    up = (torch.randn(r, n, generator=g) / 4).half() if r else None
    return codes, scales, wt, ws, lr, up, torch.randn(n, generator=g).half()


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=lambda g: "k{}x{}-p{}x{}-d{}x{}".format(*g))
@pytest.mark.parametrize("r", [0, 16])
def test_conv_gemm_int_matches_im2col_gemm(geometry, r):
    """The implicit-GEMM convolution (each tap's rows read from the NHWC codes through a shifted descriptor window,
    zero scales outside the image) equals im2col + the same GEMM bit for bit, and the reference within fp16
    rounding; 5 × 7 images, so tiles cross image rows and the two images."""
    kh, kw, ph, pw, dh, dw = geometry
    codes, scales, wt, ws, lr, up, bias = _conv_gemm_inputs(kh, kw, r)
    got = tgemm.conv_gemm_int(codes, scales, wt, ws, *geometry, lr, up, bias, torch.float16)
    im2col = (kh, kw, 1, 1, ph, pw, dh, dw)
    via_im2col = tgemm.gemm_int(ri2c.im2col(codes, *im2col), ri2c.im2col(scales[..., None], *im2col), wt, ws,
                                "int8", codes.shape[3], 0, lr, up, bias, torch.float16)
    assert got.shape == (70, 40) and torch.equal(got, via_im2col)
    ref = rgemm.conv_gemm_int(codes, scales, wt, ws, *geometry, lr, up, bias, torch.float16)
    _close(got, ref, tol=1e-3)
    assert torch.equal(torch.ops.dmq.conv_gemm_int(codes, scales, wt, ws, *geometry, lr, up, bias, torch.float16),
                       ref)


def test_conv_gemm_int_rejects_what_it_does_not_serve():
    codes, scales, wt, ws, _, _, _ = _conv_gemm_inputs(3, 3, 0)
    for fn in (tgemm.conv_gemm_int, rgemm.conv_gemm_int):
        with pytest.raises(ValueError, match="keep the input size"):
            fn(codes, scales, wt, ws, 3, 3, 0, 0, 1, 1, None, None, None, torch.float16)
    with pytest.raises(ValueError, match="multiple of 64"):
        tgemm.conv_gemm_int(codes[..., :96].contiguous(), scales, wt, ws, 3, 3, 1, 1, 1, 1, None, None, None,
                            torch.float16)
    with pytest.raises(ValueError, match="scales must be fp32"):
        tgemm.conv_gemm_int(codes, scales.half(), wt, ws, 3, 3, 1, 1, 1, 1, None, None, None, torch.float16)
    with pytest.raises(ValueError, match="w must be K-contiguous int8"):
        tgemm.conv_gemm_int(codes, scales, wt[:, :500], ws, 3, 3, 1, 1, 1, 1, None, None, None, torch.float16)


def test_gemm_rejects_unsupported_layouts():
    a, a_s, w, w_s, lr, up, bias = _gemm_inputs(5, 128, 16, "int4b", 0, 0, 0)
    with pytest.raises(ValueError, match="multiple of 64"):
        tgemm.gemm_int(a, a_s.new_ones(5, 4), w, w_s, "int4b", 32, 0, None, None, None, torch.float16)
    with pytest.raises(ValueError, match="int4b weight holds"):
        tgemm.gemm_int(torch.zeros(5, 256, dtype=torch.int8), a_s, w, w_s, "int4b", 0, 0, None, None, None,
                       torch.float16)
    with pytest.raises(ValueError, match="out_dtype"):
        tgemm.gemm_int(a, a_s, w, w_s, "int4b", 0, 0, None, None, None, torch.float32)
    with pytest.raises(ValueError, match="must be int8"):
        tgemm.gemm_int(a.half(), a_s, w, w_s, "int4b", 0, 0, None, None, None, torch.float16)
    with pytest.raises(ValueError, match="R ≤ 256"):
        tgemm.gemm_int(a, a_s, w, w_s, "int4b", 0, 0, torch.zeros(5, 300).half(), torch.zeros(300, 16).half(),
                       None, torch.float16)


def test_quantize_act_rejects_bad_inputs():
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        tq.quantize_act(torch.randn(3, 64), None, None, "int8", 0, False)
    with pytest.raises(ValueError, match="rank must be"):
        tq.quantize_act(torch.randn(3, 64).half(), None, torch.zeros(64, 300).half(), "int8", 0, False)
    with pytest.raises(ValueError, match="per token"):
        tq.quantize_act(torch.randn(3, 64).half(), None, None, "fp8_e4m3", 64, False)


# -- weight-only -------------------------------------------------------------------------------------------------------
def _weights(n, k, spec, seed=0):
    wf = torch.randn(n, 1, k, generator=torch.Generator().manual_seed(seed))
    q = quantize(wf, spec)
    w = q.codes.reshape(n, -1)
    fmt = {"int4": "int4b", "int8": "int8", "nvfp4": "fp4"}[spec.dtype]
    if fmt == "int4b":
        w = int4_to_blocked(w, k)
    return w, q.scales, fmt, (spec.group_size or 0), q


WO_SPECS = [QuantSpec("int4", "group", 64), QuantSpec("int4", "channel"), QuantSpec("int8", "channel"),
            QuantSpec("int8", "group", 128), QuantSpec("nvfp4", "group", 16)]


@pytest.mark.parametrize("group", (64, 128))
def test_two_level_weight_expands_to_exact_int8_products(group):
    spec = QuantSpec("int4", "group", group, two_level=True)
    w, s, fmt, g, q = _weights(37, 200, spec)
    got = two.dequantize_weight(w, s, fmt, g, 256, torch.int8)
    assert torch.equal(got, rwo.dequantize_weight(w, s, fmt, g, 256, torch.int8))
    expect = unpack_int4(q.codes.reshape(37, -1)).int() * s.int().repeat_interleave(group, dim=1)
    assert torch.equal(got.int(), expect)
    for f in (two.dequantize_weight, rwo.dequantize_weight):   # the per-channel scale2 is the GEMM's, not here
        with pytest.raises(ValueError, match="two-level"):
            f(w, s, fmt, g, 256, torch.float16)


@pytest.mark.parametrize("spec", WO_SPECS, ids=lambda s: s.describe())
def test_dequantize_weight_exact(spec):
    w, s, fmt, g, _ = _weights(37, 200, spec)
    assert torch.equal(two.dequantize_weight(w, s, fmt, g, 200, torch.float16),
                       rwo.dequantize_weight(w, s, fmt, g, 200, torch.float16))
    if fmt != "fp4":
        assert torch.equal(two.dequantize_weight(w, s, fmt, g, 200, torch.int8),
                           rwo.dequantize_weight(w, s, fmt, g, 200, torch.int8))


@pytest.mark.parametrize("m", (1, 3, 5, 16))
@pytest.mark.parametrize("spec", WO_SPECS, ids=lambda s: s.describe())
def test_weight_only_gemv_matches_reference(m, spec):
    n, k = 70, 200
    w, s, fmt, g, q = _weights(n, k, spec, seed=m)
    x = _x(m, k, seed=m)
    if fmt == "fp4":                                  # the per-tensor scale is not applied: keep y in fp16 range
        x = (x.float() * q.scale2).half()
    bias = torch.randn(n).half()
    _close(two.weight_only_linear(x, w, s, fmt, g, bias), rwo.weight_only_linear(x, w, s, fmt, g, bias))


def test_gemv_rejects_large_m_and_bad_groups():
    w, s, fmt, g, _ = _weights(16, 128, QuantSpec("int4", "group", 64))
    with pytest.raises(ValueError, match="M ≤ 16"):
        two.weight_only_linear(_x(17, 128), w, s, fmt, g, None)
    w, s, fmt, g, _ = _weights(16, 128, QuantSpec("int4", "group", 32))
    with pytest.raises(ValueError, match="multiple of 64"):
        two.weight_only_linear(_x(2, 128), w, s, fmt, 32, None)


# -- nvfp4 and fp8 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", MS)
def test_nvfp4_quantize_exact(m):
    k = {1: 37, 37: 100, 130: 200}[m]
    x = _x(m, k, seed=m)
    smooth = (torch.rand(k) + 0.5).half()
    amax = rnv.nvfp4_amax(x, smooth)
    assert torch.equal(amax, rq.smoothed(x, smooth).abs().amax())
    got, ref = tnv.nvfp4_quantize(x, smooth, amax), rnv.nvfp4_quantize(x, smooth, amax)
    q = quantize(rq.smoothed(x, smooth).reshape(m, 1, k), QuantSpec("nvfp4", "group", 16))
    assert torch.equal(ref[0], q.codes.reshape(m, -1))          # the reference is dmq.formats' recipe
    assert torch.equal(ref[1].view(torch.uint8), q.scales.view(torch.uint8)) and torch.equal(ref[2], q.scale2)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1].view(torch.uint8), ref[1].view(torch.uint8))
    assert torch.equal(got[2], ref[2])


def test_nvfp4_linear_matches_reference():
    m, k, n, r = 37, 100, 50, 16
    x = _x(m, k)
    w, s, _, _, q = _weights(n, k, QuantSpec("nvfp4", "group", 16))
    smooth = (torch.rand(k) + 0.5).half()
    pd, pu = (torch.randn(k, r) / 8).half(), (torch.randn(r, n) / 8).half()
    bias = torch.randn(n).half()
    args = (x, smooth, pd, pu, w, s, q.scale2, bias)
    _close(tnv.nvfp4_linear(*args), rnv.nvfp4_linear(*args), tol=5e-3)


def test_fp8_codes_exact_and_reference_matches_layer():
    x = _x(37, 64)
    got = tq.quantize_act(x, None, None, "fp8_e4m3", 0, False)
    ref = rq.quantize_act(x, None, None, "fp8_e4m3", 0, False)
    assert torch.equal(got[0].view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(got[1], ref[1])
    layer = QuantLinear.from_module(torch.nn.Linear(64, 32).half(), QuantSpec("fp8_e4m3", "channel"),
                                    QuantSpec("fp8_e4m3", "token"))
    y = rfp8.fp8_linear(x, layer.qweight, layer.wscales, layer.bias)
    _close(y, layer.reference_forward(x), tol=2e-2)


# -- custom ops ----------------------------------------------------------------------------------------------------------
def _op_samples():
    x = _x(5, 100)
    a, a_s, w, w_s, lr, up, bias = _gemm_inputs(5, 200, 24, "int4b", 64, 64, 16)
    wq, sq, fmt, g, q = _weights(24, 100, QuantSpec("int4", "group", 64))
    wn, sn, _, _, qn = _weights(24, 100, QuantSpec("nvfp4", "group", 16))
    w8 = QuantLinear.from_module(torch.nn.Linear(64, 32).half(), QuantSpec("fp8_e4m3", "channel"),
                                 QuantSpec("fp8_e4m3", "token"))
    return [
        (torch.ops.dmq.quantize_act.default, (x, None, (torch.randn(100, 16) / 8).half(), "int4", 64, False)),
        (torch.ops.dmq.quantize_act.default, (x, (torch.rand(100) + .5).half(), None, "int8", 0, False)),
        (torch.ops.dmq.gemm_int.default, (a, a_s, w, w_s, "int4b", 64, 64, lr, up, bias, torch.float16)),
        (torch.ops.dmq.weight_only_linear.default, (x, wq, sq, fmt, g, None)),
        (torch.ops.dmq.dequantize_weight.default, (wq, sq, fmt, g, 100, torch.float16)),
        (torch.ops.dmq.fp8_linear.default, (_x(3, 64), w8.qweight, w8.wscales, w8.bias)),
        (torch.ops.dmq.nvfp4_quantize.default, (x, None, rnv.nvfp4_amax(x, None))),
        (torch.ops.dmq.nvfp4_linear.default, (x, None, None, None, wn, sn, qn.scale2, None)),
        (torch.ops.dmq.im2col.default, (torch.randint(-8, 8, (2, 5, 6, 64), dtype=torch.int8), 3, 3, 2, 1, 1, 1, 1,
                                        1)),
        (torch.ops.dmq.conv_gemm_int.default, (*_conv_gemm_inputs(3, 3, 8, cp=64)[:4], 3, 3, 1, 1, 1, 1,
                                               *_conv_gemm_inputs(3, 3, 8, cp=64)[4:], torch.float16)),
    ]


@pytest.mark.parametrize("i", range(10))
def test_custom_op_opcheck(i):
    op, args = _op_samples()[i]
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args):
        utils = utils[1:]    # the schema checker multiplies inputs, which CPU fp8 tensors do not support
    torch.library.opcheck(op, args, test_utils=utils)


def test_cpu_op_equals_reference():
    x = _x(37, 100)
    pd = (torch.randn(100, 16) / 8).half()
    for a, b in zip(torch.ops.dmq.quantize_act(x, None, pd, "int4", 64, False),
                    rq.quantize_act(x, None, pd, "int4", 64, False)):
        assert torch.equal(a, b)


def test_fused_linear_compiles_without_graph_breaks():
    m, k, n = 9, 128, 32
    x = _x(m, k)
    w, s, fmt, g, _ = _weights(n, k, QuantSpec("int4", "group", 64))
    pd, pu = (torch.randn(k, 32) / 8).half(), (torch.randn(32, n) / 8).half()
    smooth = (torch.rand(k) + 0.5).half()

    def f(x):
        return ops.fused_w4a4_lowrank(x, smooth, pd, pu, w, s, None, 64)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))


def test_implicit_conv_compiles_as_one_graph(monkeypatch):
    """The implicit-GEMM conv path traces without graph breaks, its GEMM one ``dmq::conv_gemm_int`` node (on the CPU
    the op runs its reference), and the smoothing becomes a graph division; the result matches the layer's eager
    kernel path."""
    from dmq.nn.svdquant import SVDQuantConv2d

    torch.manual_seed(0)
    monkeypatch.setattr(klinear, "IMPLICIT_CONV", True)
    layer = SVDQuantConv2d.from_module(torch.nn.Conv2d(64, 24, 3, padding=1).half(), _TWO_LEVEL, _TWO_LEVEL, rank=8,
                                       smooth=torch.rand(64) + 0.5)
    x = torch.randn(1, 64, 5, 6).half()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    y = torch.compile(lambda t: klinear.conv_forward(layer, t), fullgraph=True, backend=backend)(x)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert len(graphs) == 1 and "dmq.conv_gemm_int.default" in targets and "dmq.im2col.default" not in targets
    _close(y, klinear.conv_forward(layer, x), tol=2e-2)


# -- layers through the kernel path --------------------------------------------------------------------------------------
def _use_triton(monkeypatch) -> None:
    """Make the layer kernel path call the Triton launchers (the CPU custom ops run the references): the
    compositions of dmq.kernels.ops take their launchers from ``ops.fast``, the rest from this namespace."""
    from dmq.kernels.triton import fp8 as tfp8

    launchers = {"quantize_act": tq.quantize_act, "gemm_int": tgemm.gemm_int,
                 "dequantize_weight": two.dequantize_weight, "im2col": ti2c.im2col,
                 "conv_gemm_int": tgemm.conv_gemm_int}
    monkeypatch.setattr(ops, "fast", lambda name, x: launchers[name])

    def weight_only(x, w, s, fmt, g, bias):     # as the CUDA op: GEMV for M ≤ 16, else dequantize + F.linear
        if x.shape[0] <= two.GEMV_MAX_M:
            return two.weight_only_linear(x, w, s, fmt, g, bias)
        wd = two.dequantize_weight(w, s, fmt, g, x.shape[1], x.dtype)
        return torch.nn.functional.linear(x, wd, bias.to(x.dtype) if bias is not None else None)

    monkeypatch.setattr(klinear, "ops", types.SimpleNamespace(
        quantize_act=tq.quantize_act, gemm_int=tgemm.gemm_int, dequantize_weight=two.dequantize_weight,
        weight_only_linear=weight_only, quantized_linear=ops.quantized_linear, fast=ops.fast,
        fp8_linear=tfp8.fp8_linear, nvfp4_linear=tnv.nvfp4_linear))


LAYER_SPECS = {  # preset-like (weight, activation) pairs
    "w8a8": (QuantSpec("int8", "channel"), QuantSpec("int8", "token")),
    "w4a8": (QuantSpec("int4", "group", 128), QuantSpec("int8", "token")),
    "w4a4": (QuantSpec("int4", "group", 64), QuantSpec("int4", "group", 64)),
    "w4a4-channel": (QuantSpec("int4", "channel"), QuantSpec("int4", "token")),
    "w4a16": (QuantSpec("int4", "group", 64), None),
    "nvfp4": (QuantSpec("nvfp4", "group", 16), QuantSpec("nvfp4", "group", 16)),
    "w4a4-2l": (QuantSpec("int4", "group", 64, two_level=True), QuantSpec("int4", "group", 64, two_level=True)),
    "w4a8-2l": (QuantSpec("int4", "group", 128, two_level=True), QuantSpec("int8", "token")),
}


@pytest.mark.parametrize("name", LAYER_SPECS)
def test_quant_linear_kernel_path_matches_layer_reference(name, monkeypatch):
    """Kernel path vs the layer's own reference forward (which rounds dequantized operands to the input dtype):
    within 1% of max |y|."""
    _use_triton(monkeypatch)
    ws, acts = LAYER_SPECS[name]
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 48).half()
    layer = QuantLinear.from_module(lin, ws, acts)
    x = _x(3 if acts is None else 37, 100)
    assert klinear._path(layer) is not None
    _close(klinear.linear_forward(layer, x), layer.reference_forward(x), tol=1e-2)


@pytest.mark.parametrize("mode,swap", [("unpack", True), ("int4b", True), ("int4b", False)])
@pytest.mark.parametrize("preset", ["w4a4", "w4a8"])
def test_int4_strategies_match(mode, swap, preset, monkeypatch):
    """Every way of feeding int4 weights to the tensor cores (in-kernel unpack in either operand order, or an int8
    workspace) gives the layer's result."""
    _use_triton(monkeypatch)
    monkeypatch.setattr(klinear, "INT4_GEMM", mode)
    monkeypatch.setattr(tgemm, "INT4_SWAP", swap)
    layer = QuantLinear.from_module(torch.nn.Linear(128, 48).half(), *LAYER_SPECS[preset])
    x = _x(37, 128)
    _close(klinear.linear_forward(layer, x), layer.reference_forward(x), tol=1e-2)


def test_kernel_path_serves_layers_quantized_in_inference_mode(monkeypatch):
    """Layers built and run under torch.inference_mode() (tensors without version counters) take the kernel path:
    the kernel-layout caches key inference tensors by storage alone."""
    _use_triton(monkeypatch)
    with torch.inference_mode():
        lin = torch.nn.Linear(128, 48).half()
        layer = QuantLinear.from_module(lin, *LAYER_SPECS["w4a4-2l"])
        layer.set_branch((torch.randn(128, 16) / 8).half(), (torch.randn(16, 48) / 8).half())
        x = _x(37, 128)
        _close(klinear.svdquant_forward(layer, x), layer.reference_forward(x), tol=1e-2)
        assert klinear.svdquant_forward(layer, x).shape == (37, 48)   # cached layouts reused


def test_svdquant_forward_matches_formula(monkeypatch):
    _use_triton(monkeypatch)
    k, n, r = 128, 40, 64                             # rank 32 + two LoRAs of 16
    torch.manual_seed(0)
    layer = QuantLinear.from_module(torch.nn.Linear(k, n).half(), *LAYER_SPECS["w4a4"])
    layer.smooth = (torch.rand(k) + 0.5).half()
    layer.set_branch((torch.randn(k, r) / 8).half(), (torch.randn(r, n) / 8).half())
    x = _x(37, k)
    # every quantized layer's reference applies its smoothing and branch: Q(x/λ)·Q(W)ᵀ + b + (x/λ)·down·up
    _close(klinear.svdquant_forward(layer, x), layer.reference_forward(x), tol=1e-2)


@pytest.mark.parametrize("rank", [0, 16, 64])
@pytest.mark.parametrize("preset", ["w4a4", "w4a4-channel", "w4a8", "w4a4-2l", "w4a8-2l"])
def test_svdquant_layer_kernel_path_matches_its_reference(rank, preset, monkeypatch):
    """dmq.nn.svdquant.SVDQuantLinear through the fused kernels (registered on import) vs its reference forward."""
    svdquant = pytest.importorskip("dmq.nn.svdquant")
    from dmq.kernels import dispatch

    assert any(t is svdquant.SVDQuantLinear for t, _, _ in dispatch._KERNELS)
    _use_triton(monkeypatch)
    torch.manual_seed(0)
    k = 128
    lin = torch.nn.Linear(k, 72).half()
    smooth = torch.rand(k) + 0.5
    layer = svdquant.SVDQuantLinear.from_module(lin, *LAYER_SPECS[preset], rank=rank, smooth=smooth)
    x = _x(37, k)
    _close(klinear.svdquant_forward(layer, x), layer.reference_forward(x), tol=2e-2)


_TWO_LEVEL = QuantSpec("int4", "group", 64, two_level=True)


@pytest.mark.parametrize("weights,acts", [(QuantSpec("int4", "group", 64), QuantSpec("int8", "token")),
                                          (QuantSpec("int4", "group", 64), QuantSpec("int4", "group", 64)),
                                          (QuantSpec("int4", "group", 64), None),
                                          (_TWO_LEVEL, _TWO_LEVEL)],
                         ids=["int8-token", "int4-g64", "weight-only", "two-level"])
def test_quant_conv_kernel_path_matches_layer_reference(weights, acts, monkeypatch):
    _use_triton(monkeypatch)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 24, 3, stride=2, padding=1).half()
    layer = QuantConv2d.from_module(conv, weights, acts)
    x = torch.randn(1, 64, 9, 7).half()
    assert klinear.supported.__name__ and klinear._path(layer) is not None
    y = klinear.conv_forward(layer, x)
    _close(y, layer.reference_forward(x), tol=1e-2)


@pytest.mark.parametrize("weights,acts", [(QuantSpec("int4", "group", 64), QuantSpec("int4", "group", 64)),
                                          (_TWO_LEVEL, _TWO_LEVEL)], ids=["int4-g64", "two-level"])
def test_svdquant_conv_kernel_path_matches_layer_reference(weights, acts, monkeypatch):
    """Smoothing and the rank-r branch (kh×kw down-projection conv, up-projection in the GEMM epilogue), stride 2."""
    from dmq.nn.svdquant import SVDQuantConv2d

    _use_triton(monkeypatch)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 24, 3, stride=2, padding=1).half()
    # powers of two: x / smooth is exact both in the reference (16-bit) and in the kernel (x · (1/smooth) in fp32),
    # so no 4-bit code flips on a rounding difference of the smoothed input
    smooth = 2.0 ** torch.randint(-1, 2, (64,)).float()
    layer = SVDQuantConv2d.from_module(conv, weights, acts, rank=16, smooth=smooth)
    x = torch.randn(1, 64, 9, 7).half()
    assert klinear._conv_ok.__name__ and find_kernel(layer, x) is None   # CPU input: the reference
    y = klinear.conv_forward(layer, x)
    ref = layer.reference_forward(x)
    _close(y, ref, tol=1e-2)
    layer.proj_up.zero_()                             # the branch is really added: without it the output moves
    assert (klinear.conv_forward(layer, x).float() - y.float()).abs().max() > 1e-2 * ref.abs().max()


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_smoothing_in_a_compiled_graph_is_the_reference_division(conv, monkeypatch):
    """While tracing a compiled graph, the integer paths divide x by smooth in x's dtype before the quantizer (the
    layer reference's own division, for Inductor to fuse into x's producer) and the quantizer gets no smoothing;
    the result still matches the layer's reference."""
    from dmq.nn.svdquant import SVDQuantConv2d, SVDQuantLinear

    _use_triton(monkeypatch)
    torch.manual_seed(0)
    smooth = torch.rand(64) + 0.5                     # not powers of two: the division rounds
    if conv:
        layer = SVDQuantConv2d.from_module(torch.nn.Conv2d(64, 24, 3, padding=1).half(), _TWO_LEVEL, _TWO_LEVEL,
                                           rank=16, smooth=smooth)
        x = torch.randn(1, 64, 5, 7).half()
    else:
        layer = SVDQuantLinear.from_module(torch.nn.Linear(64, 40).half(), _TWO_LEVEL, _TWO_LEVEL, rank=16,
                                           smooth=smooth)
        x = _x(37, 64)
    seen = []

    def spy(xq, sm, *args):
        seen.append((xq, sm))
        return tq.quantize_act(xq, sm, *args)

    fast = ops.fast                                   # (as _use_triton set it, for both call sites)
    for owner in (ops, klinear.ops):
        monkeypatch.setattr(owner, "fast", lambda name, t: spy if name == "quantize_act" else fast(name, t))
    forward = klinear.conv_forward if conv else klinear.svdquant_forward
    eager = forward(layer, x)
    assert seen[-1][1] is not None                    # eager: smoothing inside the quantizer
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = forward(layer, x)
    xq, sm = seen[-1]
    divided = x / layer.smooth.to(x.dtype).reshape((1, -1, 1, 1) if conv else (-1,))
    assert sm is None and torch.equal(xq, divided)       # (a conv passes its NCHW input itself)
    ref = layer.reference_forward(x)
    _close(traced, ref, tol=2e-2)
    _close(eager, ref, tol=2e-2)
    monkeypatch.setattr(klinear, "SMOOTH_IN_GRAPH", False)
    forward(layer, x)
    assert seen[-1][1] is not None


@pytest.mark.parametrize("weights,acts,stride", [(QuantSpec("int8", "channel"), QuantSpec("int8", "token"), 1),
                                                 (_TWO_LEVEL, _TWO_LEVEL, 1), (_TWO_LEVEL, _TWO_LEVEL, 2)],
                         ids=["w8a8", "two-level", "two-level-stride2"])
def test_implicit_conv_path_equals_the_im2col_path(weights, acts, stride, monkeypatch):
    """With IMPLICIT_CONV, a stride-1 same-size conv (SVDQuant branch included) runs the implicit-GEMM kernel and
    gives the im2col path's output bit for bit; a stride-2 conv keeps the im2col path."""
    from dmq.nn.svdquant import SVDQuantConv2d

    _use_triton(monkeypatch)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 24, 3, stride=stride, padding=1).half()
    layer = SVDQuantConv2d.from_module(conv, weights, acts, rank=16, smooth=torch.rand(64) + 0.5)
    x = torch.randn(2, 64, 6, 5).half()
    calls = []
    fast = ops.fast
    for owner in (ops, klinear.ops):
        monkeypatch.setattr(owner, "fast", lambda name, t: calls.append(name) or fast(name, t))
    y_im2col = klinear.conv_forward(layer, x)
    assert "conv_gemm_int" not in calls
    monkeypatch.setattr(klinear, "IMPLICIT_CONV", True)
    calls.clear()
    y = klinear.conv_forward(layer, x)
    assert ("conv_gemm_int" in calls) == (stride == 1) and ("im2col" in calls) == (stride == 2)
    assert torch.equal(y, y_im2col)
    _close(y, layer.reference_forward(x), tol=2e-2)


def test_fp8_layers_need_fp8_tensor_cores(monkeypatch):
    """torch._scaled_mm needs compute capability ≥ 8.9: on an A100 an fp8 layer runs its reference; int layers keep
    their kernels (the GPU is faked: the predicate reads capability through dmq.kernels._common)."""
    fp8 = QuantLinear.from_module(torch.nn.Linear(64, 32).half(), QuantSpec("fp8_e4m3", "channel"),
                                  QuantSpec("fp8_e4m3", "token"))
    w8a8 = QuantLinear.from_module(torch.nn.Linear(64, 32).half(), *LAYER_SPECS["w8a8"])
    monkeypatch.setattr(klinear, "_gpu_ok", lambda x: True)
    for cap, fp8_kernel in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(klinear, "capability", lambda x, cap=cap: cap)
        assert klinear.supported(fp8, _x(3, 64)) is fp8_kernel
        assert klinear.supported(w8a8, _x(3, 64))


def test_dispatch_registration_and_cpu_fallback():
    layer = QuantLinear.from_module(torch.nn.Linear(64, 16).half(), *LAYER_SPECS["w4a4"])
    x = _x(3, 64)
    assert find_kernel(layer, x) is None            # CPU input: the reference forward runs
    assert not klinear.supported(layer, x)
    from dmq.kernels import dispatch

    assert any(t is QuantLinear for t, _, _ in dispatch._KERNELS)
    assert any(t is QuantConv2d for t, _, _ in dispatch._KERNELS)


def test_fake_quantize_consistency_of_int4_token_codes():
    """The per-token int4 path pads odd K to an even count exactly as dmq.formats does."""
    x = _x(5, 37)
    codes, s, _ = tq.quantize_act(x, None, None, "int4", 0, False)
    deq = (codes[:, :37].float() * s[:, None]).half()
    assert torch.equal(deq, fake_quantize(x, QuantSpec("int4", "token")))
