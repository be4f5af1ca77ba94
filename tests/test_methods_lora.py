"""LoRAs in the quantized layers' low-rank branch: fidelity kept, exact removal, stacking, clear errors."""

import pytest
import torch

import dmq
from dmq.errors import DmqError
from dmq.methods.lora import add_lora, remove_lora
from dmq.nn import QuantGemm
from tiny_pipelines import build_pipeline, denoiser_inputs, denoiser_output

FAMILY = "dit"


def _lora(model, rank=8, seed=0, strength=0.5, names=None):
    """A random LoRA on every attention/ff linear of the denoiser: A (r, K), B (N, r)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if names is not None and name not in names:
            continue
        if names is None and not any(s in name for s in ("attn1.to_q", "attn1.to_v", "ff.net.2")):
            continue
        k = m.in_features if hasattr(m, "in_features") else m.channels
        n = m.out_features
        out[name] = (torch.randn(rank, k, generator=g) / k ** 0.5,
                     strength * torch.randn(n, rank, generator=g) / rank ** 0.5)
    return out


def _out(pipe, t=500.0):
    with torch.no_grad():
        return denoiser_output(pipe, FAMILY, denoiser_inputs(pipe, FAMILY, t))


def _snr(ref, x):
    """Signal-to-error ratio (dB): unlike a peak PSNR it does not move when a LoRA rescales the output."""
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean()))


@pytest.mark.parametrize("preset", ["svdquant-w4a4", "w8a8"])
def test_quantized_lora_keeps_fidelity_and_removal_is_exact(preset):
    fp = build_pipeline(FAMILY)
    q = dmq.quantize_pipeline(build_pipeline(FAMILY), preset, progress=False)
    lora = _lora(fp.transformer, strength=0.3)
    base_fp, base_q = _out(fp), _out(q)
    layer = q.transformer.get_submodule(next(iter(lora)))
    rank0 = layer.rank
    add_lora(fp, lora, name="style")
    add_lora(q, lora, name="style")
    fp_l, q_l = _out(fp), _out(q)
    assert _snr(base_fp, fp_l) < 25  # the LoRA really moves the output
    # quantized+LoRA vs fp+LoRA is within ±1 dB of quantized vs fp
    assert abs(_snr(fp_l, q_l) - _snr(base_fp, base_q)) <= 1.0
    assert isinstance(layer, QuantGemm) and layer.rank == rank0 + 8 and layer.loras == {"style": (rank0, 8)}
    remove_lora(q, "style")
    remove_lora(fp, "style")
    assert torch.equal(_out(q), base_q) and torch.equal(_out(fp), base_fp)
    assert layer.rank == rank0 and (rank0 or layer.proj_down is None)


def test_loras_stack_on_the_svdquant_branch_and_account_for_smoothing():
    pipe = build_pipeline(FAMILY)
    smooth_cfg = dmq.CalibrationConfig(class_labels=(1, 2), num_samples=2, num_inference_steps=3, batch_size=2)
    q = dmq.quantize_pipeline(pipe, "svdquant-w4a4", calibration=smooth_cfg, progress=False)
    base = _out(q)
    name = next(iter(_lora(q.transformer)))
    layer = q.transformer.get_submodule(name)
    assert layer.smooth is not None and layer.rank == 32
    down0, up0 = layer.proj_down.clone(), layer.proj_up.clone()
    first, second = _lora(q.transformer, seed=1), _lora(q.transformer, rank=4, seed=2)
    add_lora(q, first, name="a")
    with_a = _out(q)
    add_lora(q, second, name="b", scale=0.5)
    assert layer.rank == 32 + 8 + 4 and layer.loras == {"a": (32, 8), "b": (40, 4)}
    # the branch computes x·Aᵀ·Bᵀ exactly as the float LoRA would, smoothing undone
    x = torch.randn(3, layer.in_features)
    xs = x / layer.smooth.float()
    a, b = first[name]
    got = (xs @ layer.proj_down[:, 32:40].float()) @ layer.proj_up[32:40].float()
    torch.testing.assert_close(got, x @ a.T @ b.T, rtol=1e-4, atol=1e-5)
    remove_lora(q, "b")
    assert torch.equal(_out(q), with_a)
    remove_lora(q, "a")
    assert torch.equal(layer.proj_down, down0) and torch.equal(layer.proj_up, up0)
    assert torch.equal(_out(q), base)


def test_lora_on_a_kept_float_layer_works():
    q = dmq.quantize_pipeline(build_pipeline(FAMILY), "w4a8", progress=False)
    base = _out(q)
    model = q.transformer
    assert not isinstance(model.proj_out_2, QuantGemm)  # kept 16-bit by the role view
    add_lora(q, _lora(model, names={"proj_out_2"}, strength=2.0), name="out")
    assert not torch.equal(_out(q), base)
    remove_lora(q, "out")
    assert torch.equal(_out(q), base)


def test_peft_style_state_dict_with_alpha():
    q = dmq.quantize_pipeline(build_pipeline(FAMILY), "w8a8", progress=False)
    name = "transformer_blocks.0.attn1.to_q"
    a, b = _lora(q.transformer, rank=4, names={name})[name]
    add_lora(q, {f"transformer.{name}.lora_A.weight": a, f"transformer.{name}.lora_B.weight": b,
                 f"transformer.{name}.alpha": torch.tensor(2.0)}, name="peft")
    layer = q.transformer.get_submodule(name)
    torch.testing.assert_close(layer.proj_up.float(), 0.5 * b.T)  # alpha / rank = 2 / 4


@pytest.mark.parametrize("bad, match", [
    (lambda m: {"transformer_blocks.0.attn1.nope": (torch.zeros(4, 64), torch.zeros(64, 4))}, "names no module"),
    (lambda m: {"transformer_blocks.0.attn1.to_q": (torch.zeros(4, 63), torch.zeros(64, 4))}, "do not fit"),
    (lambda m: {"transformer_blocks.0.norm1.emb.class_embedder.embedding_table":
                (torch.zeros(4, 64), torch.zeros(64, 4))}, "takes no LoRA"),
    (lambda m: {"x.lora_A.weight": torch.zeros(4, 64)}, "lacks its up"),
])
def test_bad_loras_raise_and_apply_nothing(bad, match):
    q = dmq.quantize_pipeline(build_pipeline(FAMILY), "w8a8", progress=False)
    good = _lora(q.transformer)
    lora = {**good, **bad(q.transformer)} if isinstance(next(iter(bad(q.transformer).values())), tuple) \
        else bad(q.transformer)
    before = {k: v.clone() for k, v in q.transformer.state_dict().items()}
    with pytest.raises(DmqError, match=match):
        add_lora(q, lora, name="bad")
    after = q.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_duplicate_name_and_unknown_removal():
    q = dmq.quantize_pipeline(build_pipeline(FAMILY), "w8a8", progress=False)
    add_lora(q, _lora(q.transformer), name="x")
    with pytest.raises(DmqError, match="already added"):
        add_lora(q, _lora(q.transformer), name="x")
    with pytest.raises(DmqError, match="no LoRA named 'y'"):
        remove_lora(q, "y")


def test_save_load_keeps_the_lora_branch(tmp_path):
    q = dmq.quantize_pipeline(build_pipeline(FAMILY), "svdquant-w4a4", progress=False)
    add_lora(q, _lora(q.transformer), name="style")
    ref = _out(q)
    dmq.save_quantized(q, tmp_path / "q")
    q2 = dmq.load_quantized(tmp_path / "q", build_pipeline(FAMILY))
    assert torch.equal(_out(q2), ref)


def test_diffusers_load_lora_weights_is_routed_to_the_branch():
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tiny_pipelines import call_pipeline

    pipe = dmq.quantize_pipeline(build_pipeline("sd"), "w8a8", progress=False)
    unet = pipe.unet
    quantized = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    kept = "time_embedding.linear_1"  # 16-bit by the role view: peft takes it as usual
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in (quantized, kept):
        m = unet.get_submodule(name)
        k, n = m.in_features, m.out_features
        sd[f"unet.{name}.lora_A.weight"] = torch.randn(4, k, generator=g) / k ** 0.5
        sd[f"unet.{name}.lora_B.weight"] = torch.randn(n, 4, generator=g)
    base = call_pipeline(pipe, "sd")
    pipe.load_lora_weights(sd, adapter_name="style")
    assert unet.get_submodule(quantized).loras == {"style": (0, 4)}
    assert isinstance(unet.get_submodule(kept), BaseTunerLayer)
    assert not torch.equal(call_pipeline(pipe, "sd"), base)
    remove_lora(pipe, "style")
    pipe.delete_adapters("style")
    torch.testing.assert_close(call_pipeline(pipe, "sd"), base, rtol=0, atol=1e-6)
