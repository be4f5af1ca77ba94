"""Fused q/k/v projections (``QuantConfig.fuse_projections``, :mod:`dmq.methods.fuse`): the float output is unchanged,
the originals are gone after quantization, errors roll the fusion back, checkpoints and LoRAs follow the fused
layout, ComfyUI refuses it clearly."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace

import pytest
import torch

import dmq
from dmq.config import QuantConfig, resolve_config
from dmq.errors import CheckpointMismatchError, ConfigError, DmqError
from dmq.methods.fuse import drop_originals, fuse_projections, fused_layers, unfuse
from dmq.methods.lora import add_lora, remove_lora
from dmq.nn import QuantGemm
from tiny_pipelines import PROMPT, T5_MAX_LENGTH, build_pipeline, denoiser_inputs, denoiser_output, get_denoiser

pytestmark = pytest.mark.usefixtures("one_thread")

FUSABLE = ("flux", "sd3", "pixart", "sd")
_FUSED_SUFFIXES = ("to_qkv", "to_kv", "to_added_qkv")


def _fused(config: str = "w8a8") -> QuantConfig:
    return replace(resolve_config(config), fuse_projections=True)


def _out(pipe, family: str, t: float = 500.0) -> torch.Tensor:
    return denoiser_output(pipe, family, denoiser_inputs(pipe, family, t))


def _psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.abs().max() ** 2 / (ref - x).pow(2).mean()))


def _snr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean()))


def _nbytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def _snapshot(model: torch.nn.Module) -> dict:
    """What 'left exactly as it was' compares: module tree, tensors, processors, plain attributes, fusion flags."""
    return {"modules": [(n, type(m)) for n, m in model.named_modules()],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "processors": {k: id(v) for k, v in getattr(model, "attn_processors", {}).items()},
            "attrs": set(vars(model)),
            "flags": [getattr(m, "fused_projections", None) for m in model.modules()]}


def _assert_same(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["processors"] == before["processors"]
    assert after["attrs"] == before["attrs"]
    assert after["flags"] == before["flags"]


# -- fusion alone ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FUSABLE)
def test_fusion_keeps_the_float_output_and_maps_every_original(family):
    pipe = build_pipeline(family)
    model = get_denoiser(pipe)
    ref = _out(pipe, family)
    mapping = fuse_projections(model)
    assert mapping and fused_layers(model) == mapping
    assert {n.rpartition(".")[2] for n in mapping} <= set(_FUSED_SUFFIXES)
    for name, rows in mapping.items():
        fused = model.get_submodule(name)
        assert [r[1] for r in rows] == list(itertools.accumulate([0] + [r[2] for r in rows[:-1]]))
        for orig, start, n in rows:  # the fused weight holds each original's rows at its slice
            assert torch.equal(fused.weight[start:start + n], model.get_submodule(orig).weight)
    torch.testing.assert_close(_out(pipe, family), ref, rtol=1e-5, atol=1e-6)
    drop_originals(model, mapping)
    gone = [orig for rows in mapping.values() for orig, _, _ in rows]
    names = {n for n, _ in model.named_modules()}
    assert gone and not names & set(gone)
    torch.testing.assert_close(_out(pipe, family), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(DmqError, match="cannot be undone"):
        unfuse(model)


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_unfuse_restores_the_model_exactly(family):
    pipe = build_pipeline(family)
    model = get_denoiser(pipe)
    before, ref = _snapshot(model), _out(pipe, family)
    fuse_projections(model)
    unfuse(model)
    _assert_same(before, _snapshot(model))
    assert torch.equal(_out(pipe, family), ref)


def test_models_diffusers_cannot_fuse_are_refused_clearly():
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    dit = build_pipeline("dit")
    before = _snapshot(dit.transformer)
    with pytest.raises(ConfigError, match="has no fuse_qkv_projections"):
        dmq.quantize_pipeline(dit, _fused(), progress=False)
    _assert_same(before, _snapshot(dit.transformer))
    unet = build_pipeline("sd").unet
    unet.set_attn_processor(AttnAddedKVProcessor())  # diffusers refuses models with added KV projections
    before = _snapshot(unet)
    with pytest.raises(ConfigError, match="added KV projections"):
        fuse_projections(unet)
    _assert_same(before, _snapshot(unet))  # diffusers' half-done attribute is gone too
    sd3 = build_pipeline("sd3").transformer
    sd3.fuse_qkv_projections()
    with pytest.raises(ConfigError, match="already fused"):
        fuse_projections(sd3)


def test_config_round_trip():
    cfg = _fused("svdquant-w4a4")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg and "fused q/k/v" in cfg.describe()
    old = resolve_config("w8a8").to_dict()
    del old["fuse_projections"]  # saved before the field existed
    assert QuantConfig.from_dict(old).fuse_projections is False
    assert not any(resolve_config(p).fuse_projections for p in dmq.list_presets())
    with pytest.raises(ConfigError, match="fuse_projections must be True or False"):
        replace(resolve_config("w8a8"), fuse_projections="yes")


# -- quantization ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FUSABLE)
def test_quantized_fused_model_drops_the_originals(family):
    ref = _out(build_pipeline(family), family)
    plain = dmq.quantize_pipeline(build_pipeline(family), "w8a8", progress=False)
    pipe = dmq.quantize_pipeline(build_pipeline(family), _fused(), progress=False)
    model = get_denoiser(pipe)
    mapping = fused_layers(model)
    names = {n for n, _ in model.named_modules()}
    originals = {orig for rows in mapping.values() for orig, _, _ in rows}
    assert not names & originals
    assert all(isinstance(model.get_submodule(n), QuantGemm) for n in mapping)
    reported = {e.name for e in pipe.dmq_report.entries}
    assert set(mapping) <= reported and not reported & originals
    assert any(f"{len(mapping)} fused linears replace {len(originals)}" in n for n in pipe.dmq_report.notes)
    # per-channel int8: the fused layers store exactly what the separate ones did, and no float leftover remains
    assert _nbytes(model) == _nbytes(get_denoiser(plain))
    out, out_plain = _out(pipe, family), _out(plain, family)
    assert _psnr(ref, out) >= 30.0 and abs(_psnr(ref, out) - _psnr(ref, out_plain)) <= 3.0


def test_svdquant_calibrates_the_fused_layers_and_shares_their_branch():
    cal = dmq.CalibrationConfig(prompts=(PROMPT,), num_samples=1, num_inference_steps=2,
                                pipeline_kwargs={"height": 32, "width": 32, "max_sequence_length": T5_MAX_LENGTH})
    ref = _out(build_pipeline("flux"), "flux")
    plain = dmq.quantize_pipeline(build_pipeline("flux"), "svdquant-w4a4", calibration=cal, progress=False)
    pipe = dmq.quantize_pipeline(build_pipeline("flux"), _fused("svdquant-w4a4"), calibration=cal, progress=False)
    model = pipe.transformer
    fused = [model.get_submodule(n) for n in fused_layers(model)]
    # smoothing needs each layer's calibrated input abs-max: the hooks saw the fused layers
    assert fused and all(layer.smooth is not None and layer.rank == 32 for layer in fused)
    assert _nbytes(model) < _nbytes(plain.transformer)  # one rank-32 branch per fused layer instead of three
    assert abs(_psnr(ref, _out(pipe, "flux")) - _psnr(ref, _out(plain, "flux"))) <= 3.0


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_an_error_leaves_the_model_unfused_and_unchanged(family):
    pipe = build_pipeline(family)
    model = get_denoiser(pipe)
    before, ref = _snapshot(model), _out(pipe, family)
    with pytest.raises(ConfigError, match="match no Linear/Conv"):
        dmq.quantize_pipeline(pipe, replace(_fused(), include=("no_such_layer*",)), progress=False)
    _assert_same(before, _snapshot(model))
    assert not hasattr(pipe, "dmq_report") and torch.equal(_out(pipe, family), ref)


# -- checkpoints -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_flux(tmp_path_factory):
    """A fused svdquant-w4a4 FLUX (data-free), saved once: (pipeline, checkpoint dir)."""
    pipe = dmq.quantize_pipeline(build_pipeline("flux"), _fused("svdquant-w4a4"), progress=False)
    return pipe, dmq.save_quantized(pipe, tmp_path_factory.mktemp("fused") / "q")


def _assert_same_state(model, ref) -> None:
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    assert all(sd[k].dtype == sd_ref[k].dtype and torch.equal(sd[k], sd_ref[k]) for k in sd)


def test_save_load_round_trip_is_bit_exact(saved_flux):
    pipe, path = saved_flux
    loaded = dmq.load_quantized(path, build_pipeline("flux"))
    assert fused_layers(loaded.transformer) == fused_layers(pipe.transformer)
    _assert_same_state(loaded.transformer, pipe.transformer)
    assert not any(n.endswith((".to_q", ".add_q_proj")) for n, _ in loaded.transformer.named_modules())
    assert torch.equal(_out(loaded, "flux"), _out(pipe, "flux"))


def test_failed_load_leaves_the_pipeline_unfused(saved_flux):
    other = build_pipeline("flux", seed=1)
    before = _snapshot(other.transformer)
    with pytest.raises(CheckpointMismatchError, match="fingerprint"):
        dmq.load_quantized(saved_flux[1], other)
    _assert_same(before, _snapshot(other.transformer))


def test_diffusers_from_pretrained_rebuilds_the_fused_layers(saved_flux):
    from diffusers import FluxTransformer2DModel

    from dmq.integrations.diffusers import register

    register()
    pipe, path = saved_flux
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FluxTransformer2DModel.from_pretrained(path / "transformer")
    assert fused_layers(model) == fused_layers(pipe.transformer)
    _assert_same_state(model, pipe.transformer)
    fresh = build_pipeline("flux")
    fresh.register_modules(transformer=model)
    assert torch.equal(_out(fresh, "flux"), _out(pipe, "flux"))


# -- LoRA ------------------------------------------------------------------------------------------------------------
_LORA_TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
                 "transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.0.attn.to_v")


def _lora(model, rank=4, strength=2.0, seed=0):
    """A random LoRA ``{name: (A (r, K), B (n, r))}`` on original (unfused) projection names of a float FLUX."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in _LORA_TARGETS:
        m = model.get_submodule(name)
        out[name] = (torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5,
                     strength * torch.randn(m.out_features, rank, generator=g) / rank ** 0.5)
    return out


@pytest.mark.parametrize("preset", ["w8a8", "svdquant-w4a4"])
def test_lora_on_original_names_lands_in_the_fused_rows(preset):
    fp = build_pipeline("flux")
    q = dmq.quantize_pipeline(build_pipeline("flux"), _fused(preset), progress=False)
    lora = _lora(fp.transformer)
    base_fp, base_q = _out(fp, "flux"), _out(q, "flux")
    layer = q.transformer.get_submodule("transformer_blocks.0.attn.to_qkv")
    rank0, down0, up0 = layer.rank, layer.proj_down, layer.proj_up
    x = torch.randn(3, layer.in_features)
    y0 = layer(x)
    add_lora(fp, lora, name="style")
    add_lora(q, lora, name="style")
    # the three parts on to_qkv form ONE branch extension; each one's B sits at its rows, zeros elsewhere
    assert layer.loras == {"style": (rank0, 12)} and layer.rank == rank0 + 12
    n = layer.out_features // 3
    expected = torch.zeros(3, layer.out_features)
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        a, b = lora[f"transformer_blocks.0.attn.{part}"]
        expected[:, i * n:(i + 1) * n] = x @ a.T @ b.T
    torch.testing.assert_close(layer(x) - y0, expected, rtol=1e-4, atol=1e-5)
    added = q.transformer.get_submodule("transformer_blocks.0.attn.to_added_qkv")
    assert added.loras == {"style": (added.rank - 4, 4)}
    fp_l, q_l = _out(fp, "flux"), _out(q, "flux")
    assert _snr(base_fp, fp_l) < 25  # the LoRA really moves the output
    assert abs(_snr(fp_l, q_l) - _snr(base_fp, base_q)) <= 1.0  # and the quantized model follows it
    remove_lora(q, "style")
    assert torch.equal(_out(q, "flux"), base_q) and layer.rank == rank0 and not layer.loras
    assert (down0 is None and layer.proj_down is None) or (torch.equal(layer.proj_down, down0)
                                                             and torch.equal(layer.proj_up, up0))


def test_lora_shape_mismatch_names_the_key_and_applies_nothing():
    q = dmq.quantize_pipeline(build_pipeline("flux"), _fused(), progress=False)
    lora = _lora(build_pipeline("flux").transformer)
    a, b = lora["transformer_blocks.0.attn.to_k"]
    lora["transformer_blocks.0.attn.to_k"] = (a, b[:-1])
    before = {k: v.clone() for k, v in q.transformer.state_dict().items()}
    with pytest.raises(DmqError, match=r"'transformer_blocks\.0\.attn\.to_k'.*do not fit rows 64:128"):
        add_lora(q, lora, name="bad")
    after = q.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_diffusers_load_lora_weights_routes_original_names_to_dmq():
    pipe = dmq.quantize_pipeline(build_pipeline("flux"), _fused(), progress=False)
    lora = _lora(build_pipeline("flux").transformer)
    sd = {}
    for name, (a, b) in lora.items():
        sd[f"transformer.{name}.lora_A.weight"] = a
        sd[f"transformer.{name}.lora_B.weight"] = b
    base = _out(pipe, "flux")
    pipe.load_lora_weights(sd, adapter_name="style")
    layer = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_qkv")
    assert layer.loras == {"style": (0, 12)}
    assert not torch.equal(_out(pipe, "flux"), base)
    remove_lora(pipe, "style")
    assert torch.equal(_out(pipe, "flux"), base)


# -- ComfyUI ---------------------------------------------------------------------------------------------------------
def test_comfyui_refuses_fused_projections_clearly():
    from dmq.integrations.comfyui.model import quantize_comfy_model, unsupported_reason

    assert "fuse_qkv_projections" in unsupported_reason(_fused())
    with pytest.raises(ConfigError, match="cannot run in ComfyUI: fused q/k/v projections"):
        quantize_comfy_model(object(), _fused())  # refused before the MODEL is touched
