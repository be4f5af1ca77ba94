"""8-bit attention: the Triton kernel (interpreter) against its PyTorch reference, the reference against SDPA, and
the diffusers integration on the tiny pipelines (quantize_pipeline, save/load, removal).

Under the interpreter the kernel rounds P̃ to fp8 with the integer encoder (in-kernel fp8 casts are miscomputed
there, triton#8322); the encoder gives the same bits as ``Tensor.to(torch.float8_e4m3fn)`` (test_kernels covers
it), which is what the reference uses, so the whole fp8 PV path is compared here; only the GPU's hardware cast is not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dmq
from dmq.errors import ConfigError
from dmq.kernels import ops
from dmq.kernels.reference import attention as ref
from dmq.kernels.triton import attention as tri
from dmq.methods.attention import (attention_targets, disable_quantized_attention, enable_quantized_attention,
                                   quantized_attention_hooks)
from tiny_pipelines import build_pipeline, denoiser_inputs, denoiser_output, get_denoiser

#: kernel vs reference: the codes are bit-identical, so the outputs differ by exp2's last bits (numpy vs torch),
#: the order of fp32 sums and the final rounding to fp16
KERNEL_ATOL = 2e-3
#: reference vs fp32 SDPA on Gaussian inputs with outlier channels in K
MIN_COSINE = 0.995


def _qkv(b, h, nq, nk, d, dtype=torch.float16, outliers=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.randn(b, h, nk, d, generator=g)
    v = torch.randn(b, h, nk, d, generator=g)
    if outliers:  # a few channels of K with a large offset and a large spread (what smoothing K is for)
        k[..., :3] += 25.0
        k[..., 7] *= 10.0
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _cos(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("nq,nk,d", [(1, 1, 64), (77, 77, 64), (333, 333, 128), (77, 333, 128), (40, 19, 72)])
def test_quantization_bit_exact(nq, nk, d):
    q, k, v = _qkv(1, 2, nq, nk, d)
    scale = d ** -0.5 * ref.LOG2E
    for a, b in zip(ref.quantize_qkv(q, k, v, scale), tri.quantize_qkv(q, k, v, scale), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("nq,nk,d", [(1, 1, 64), (77, 77, 64), (333, 333, 128), (1, 77, 128), (77, 333, 64)])
def test_kernel_matches_reference(nq, nk, d):
    q, k, v = _qkv(1, 2, nq, nk, d)
    out = tri.int8_attention(q, k, v)
    expect = ref.int8_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), expect.float(), atol=KERNEL_ATOL, rtol=0)


@pytest.mark.parametrize("cfg", tri.CONFIGS, ids=tri.config_name)
def test_every_config_matches_reference(cfg):
    """Each tile shape the GPU autotuner may pick, against the reference with the same key block (the fp8 rounding
    of P̃ depends on the running max, hence on the block size)."""
    q, k, v = _qkv(1, 2, 200, 333, 64)
    out = tri.attend(tri.prepare(q, k, v, 64 ** -0.5 * ref.LOG2E), q.dtype, cfg)
    expect = ref.int8_attention(q, k, v, block_n=cfg.kwargs["BN"])
    torch.testing.assert_close(out.float(), expect.float(), atol=KERNEL_ATOL, rtol=0)


def test_kernel_extreme_scores():
    """Codes all ±127 at head dim 256: |q·k| = 127²·256, the largest integer product, which the kernel's int→float
    trick represents exactly (< 2**22); the softmax is then one-hot within float precision."""
    q = torch.ones(1, 1, 64, 256)
    k = torch.ones(1, 1, 64, 256) * torch.tensor([1.0, -1.0]).repeat(32)[:, None]
    v = torch.randn(1, 1, 64, 256, generator=torch.Generator().manual_seed(0))
    q, k, v = q.half(), k.half(), v.half()
    out = tri.int8_attention(q, k, v)
    torch.testing.assert_close(out.float(), ref.int8_attention(q, k, v).float(), atol=KERNEL_ATOL, rtol=0)
    torch.testing.assert_close(out.float(), v[:, :, 0::2].float().mean(dim=2, keepdim=True).expand_as(out),
                               atol=2e-2, rtol=0)


def test_kernel_strided_inputs_and_scale():
    """(B, N, H, D) tensors seen as (B, H, N, D), as diffusers' dispatcher passes them, and an explicit scale."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(2, 3, 50, 50, 64))
    assert not q.is_contiguous()
    out = tri.int8_attention(q, k, v, 0.1)
    torch.testing.assert_close(out.float(), ref.int8_attention(q, k, v, 0.1).float(), atol=KERNEL_ATOL, rtol=0)


@pytest.mark.parametrize("nq,nk,d", [(77, 77, 64), (333, 333, 128), (256, 77, 64)])
def test_reference_close_to_sdpa(nq, nk, d):
    q, k, v = _qkv(2, 2, nq, nk, d, dtype=torch.bfloat16)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert _cos(ref.int8_attention(q, k, v), exact) >= MIN_COSINE


def test_smoothing_k_matters():
    """K channels with a large common offset (typical of DiT keys) eat the int8 range; subtracting a smoothing vector
    (exact for softmax) removes them: the error of the quantized scores QKᵀ drops several times, and the mean of
    K_SAMPLES evenly spaced tokens does as well as the mean of all tokens."""
    q, k, v = _qkv(1, 2, 512, 512, 64, outliers=False)
    k = (k.float() + torch.linspace(-30, 30, 64)).half()
    qs = q.float().reshape(2, 512, 64) * 64 ** -0.5
    exact = qs @ k.float().reshape(2, 512, 64).transpose(1, 2)

    def score_error(k_smooth):
        _, _, kc, sk, _, _ = ref.quantize_qkv(q, k, v, 1.0, k_smooth)
        kd = kc.float() * sk.repeat_interleave(ref.BLOCK_K, dim=1)[:, :, None] + k_smooth.reshape(2, 1, 64)
        return (qs @ kd.transpose(1, 2) - exact).norm()

    err_sampled = score_error(ref.smoothing_vector(k))
    assert score_error(torch.zeros(1, 2, 64)) > 4 * err_sampled
    assert err_sampled < 1.1 * score_error(k.float().mean(dim=2))


def test_smoothing_vector_definition():
    k = torch.randn(2, 3, 100, 40, generator=torch.Generator().manual_seed(1)).bfloat16()
    idx = [i * 100 // ref.K_SAMPLES for i in range(ref.K_SAMPLES)]
    torch.testing.assert_close(ref.smoothing_vector(k), k[:, :, idx].float().mean(dim=2), rtol=1e-6, atol=1e-6)


def test_launcher_checks_inputs():
    q, k, v = _qkv(1, 2, 8, 8, 64)
    with pytest.raises(ValueError, match="16-bit"):
        tri.int8_attention(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="matching"):
        tri.int8_attention(q, k[..., :32], v)
    with pytest.raises(ValueError, match="contiguous along the head dim"):
        tri.int8_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v)


def test_kernel_needs_fp8_tensor_cores(monkeypatch, caplog):
    """The PV product is fp8 (compute capability ≥ 8.9; found by compiling for sm_80 on a CPU): on an older GPU the
    launcher raises a clear error and the hooks fall back to SDPA with one warning per device."""
    from dmq.methods import attention as method

    q, k, v = _qkv(1, 2, 8, 8, 64)
    monkeypatch.setattr(method, "capability", lambda t: (8, 0))
    monkeypatch.setattr(tri, "capability", lambda t: (8, 0))
    monkeypatch.setattr(method, "_WARNED", set())
    with pytest.raises(ValueError, match="compute capability ≥ 8.9"):
        tri.int8_attention(q, k, v)
    with caplog.at_level("WARNING", logger="dmq.methods.attention"):
        assert not method._fp8_gpu(q) and not method._fp8_gpu(q)
    assert sum("fp8 tensor cores" in r.message for r in caplog.records) == 1
    monkeypatch.setattr(method, "capability", lambda t: (9, 0))
    assert method._fp8_gpu(q)


def test_op_is_the_reference_on_cpu():
    q, k, v = _qkv(1, 2, 33, 33, 64)
    assert torch.equal(ops.int8_attention(q, k, v, None), ref.int8_attention(q, k, v))


# -- integration --------------------------------------------------------------------------------------------------
#: relative L2 error of the denoiser output with 8-bit attention (random tiny models; measured 2e-4 .. 2e-3)
MAX_REL_ERR = 1e-2


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family,n_self,n_cross", [("sd", 4, 4), ("pixart", 2, 2), ("sd3", 2, 0), ("flux", 2, 0),
                                                   ("dit", 2, 0)])
def test_hooks_on_tiny_pipelines(family, n_self, n_cross, one_thread):
    pipe = build_pipeline(family)
    model = get_denoiser(pipe)
    kwargs = denoiser_inputs(pipe, family, 500.0)
    base = denoiser_output(pipe, family, kwargs)
    targets = enable_quantized_attention(model)
    assert (len(targets), len(attention_targets(model)[1])) == (n_self, n_cross)
    out = denoiser_output(pipe, family, kwargs)
    hooks = quantized_attention_hooks(model)
    assert sum(h.quantized for h in hooks.values()) == n_self and sum(h.fallback for h in hooks.values()) == 0
    assert 0 < _rel(out, base) < MAX_REL_ERR
    disable_quantized_attention(model)
    assert not quantized_attention_hooks(model)
    assert torch.equal(denoiser_output(pipe, family, kwargs), base)


def test_masked_calls_fall_back():
    """A hooked module whose SDPA call carries a mask runs PyTorch's SDPA, counted as a fallback."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(64, heads=2, dim_head=32).eval()
    wrapper = torch.nn.Sequential(attn)
    enable_quantized_attention(wrapper)
    x = torch.randn(2, 10, 64)
    mask = torch.ones(2, 1, 10, dtype=torch.bool)
    with torch.no_grad():
        attn(x, attention_mask=mask)
        attn(x)
    hook = quantized_attention_hooks(wrapper)["0"]
    assert (hook.quantized, hook.fallback) == (1, 1)


def test_quantize_pipeline_attention_save_load(tmp_path, one_thread):
    pipe = build_pipeline("dit")
    kwargs = denoiser_inputs(pipe, "dit", 500.0)
    dmq.quantize_pipeline(pipe, "w8a8", attention="int8", progress=False)
    model = get_denoiser(pipe)
    assert model._dmq_config.attention == "int8" and len(quantized_attention_hooks(model)) == 2
    assert any("int8 attention" in n for n in pipe.dmq_report.notes)
    out = denoiser_output(pipe, "dit", kwargs)
    dmq.save_quantized(pipe, tmp_path / "q")
    loaded = dmq.load_quantized(tmp_path / "q", build_pipeline("dit"))
    assert len(quantized_attention_hooks(get_denoiser(loaded))) == 2
    assert torch.equal(denoiser_output(loaded, "dit", kwargs), out)


def test_config_field():
    cfg = dmq.QuantConfig(dmq.QuantSpec("int8", "channel"), attention="int8")
    assert dmq.QuantConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["attention"]   # dicts written before the field existed
    assert dmq.QuantConfig.from_dict(old).attention is None
    with pytest.raises(ConfigError, match="attention"):
        dmq.QuantConfig(dmq.QuantSpec("int8", "channel"), attention="int4")
    with pytest.raises(ConfigError, match="attention"):
        dmq.quantize_pipeline(build_pipeline("dit"), "w8a8", attention="fp4", progress=False)
