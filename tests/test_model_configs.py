"""Published denoiser configs in benchmarks/model_configs.py: build on meta,
parameter counts, and a meta-device forward at the runtime shape."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import model_configs as mc  # noqa: E402

NAMES = sorted(mc.MODEL_CONFIGS)


@functools.lru_cache(maxsize=None)
def _meta_model(name: str) -> torch.nn.Module:
    return mc.build_model(name)  # meta, bf16


def test_tables_cover_the_same_models():
    assert set(mc.MODEL_CONFIGS) == {"flux-dev", "sd3-medium", "pixart-sigma", "sdxl", "sd15", "dit-xl-2"}
    for table in (mc.EXPECTED_PARAMS, mc.DIFFUSERS_PARAMS, mc.RUNTIME_SHAPES, mc.HF_REPOS):
        assert set(table) == set(mc.MODEL_CONFIGS)


@pytest.mark.parametrize("name", NAMES)
def test_builds_on_meta_with_published_param_count(name):
    model = _meta_model(name)
    class_name, config = mc.MODEL_CONFIGS[name]
    assert type(model).__name__ == class_name
    assert not model.training
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert torch.get_default_dtype() == torch.float32

    n = mc.count_params(model)
    assert n == mc.DIFFUSERS_PARAMS[name]
    published = mc.published_param_count(name, model)
    rel = abs(published / mc.EXPECTED_PARAMS[name] - 1)
    assert rel < 0.02, f"{name}: {published:,} vs published {mc.EXPECTED_PARAMS[name]:,.0f}"
    # the config stored in the model is the one we wrote down
    for key, value in config.items():
        stored = model.config[key]
        if isinstance(value, tuple):
            stored = tuple(stored)
        assert stored == value, key


@pytest.mark.parametrize("name", NAMES)
def test_meta_forward_output_shape(name):
    model = _meta_model(name)
    with torch.device("meta"), torch.no_grad():
        inputs = mc.make_inputs(name, batch=1, device="meta")
        out = model(**inputs).sample
    assert out.device.type == "meta"
    assert tuple(out.shape) == mc.expected_output_shape(name, batch=1)
    assert out.dtype == torch.bfloat16


def test_cfg_doubles_batch_except_flux():
    for name, rs in mc.RUNTIME_SHAPES.items():
        assert rs["cfg"] is (name != "flux-dev")
        inputs = mc.make_inputs(name, batch=3, device="meta")
        first = next(iter(inputs.values()))
        assert first.shape[0] == (6 if rs["cfg"] else 3)
        assert mc.expected_output_shape(name, batch=3)[0] == first.shape[0]
        no_cfg = mc.make_inputs(name, batch=3, device="meta", cfg=False)
        assert next(iter(no_cfg.values())).shape[0] == 3


def test_meta_forward_batch2_without_cfg():
    model = _meta_model("sd3-medium")
    with torch.device("meta"), torch.no_grad():
        out = model(**mc.make_inputs("sd3-medium", batch=2, device="meta", cfg=False)).sample
    assert tuple(out.shape) == (2, 16, 128, 128)


def test_runtime_shapes_match_configs():
    for name, (_, cfg) in mc.MODEL_CONFIGS.items():
        rs = mc.RUNTIME_SHAPES[name]
        h, w = rs["resolution"]
        c, lh, lw = rs["latent_shape"]
        assert (lh, lw) == (h // rs["vae_scale_factor"], w // rs["vae_scale_factor"])
        if "patch_size" in cfg and name != "flux-dev":
            assert rs["image_tokens"] == (lh // cfg["patch_size"]) * (lw // cfg["patch_size"])
        if "sample_size" in cfg:
            assert cfg["sample_size"] == lh  # native resolution of each model

    flux = mc.RUNTIME_SHAPES["flux-dev"]
    assert flux["model_input_shape"] == (4096, mc.MODEL_CONFIGS["flux-dev"][1]["in_channels"])
    assert flux["text_dim"] == mc.MODEL_CONFIGS["flux-dev"][1]["joint_attention_dim"]
    assert flux["pooled_dim"] == mc.MODEL_CONFIGS["flux-dev"][1]["pooled_projection_dim"]
    sd3 = mc.MODEL_CONFIGS["sd3-medium"][1]
    assert mc.RUNTIME_SHAPES["sd3-medium"]["pooled_dim"] == sd3["pooled_projection_dim"]
    assert mc.RUNTIME_SHAPES["pixart-sigma"]["text_dim"] == mc.MODEL_CONFIGS["pixart-sigma"][1]["caption_channels"]
    sdxl = mc.MODEL_CONFIGS["sdxl"][1]
    rs = mc.RUNTIME_SHAPES["sdxl"]
    assert rs["text_dim"] == sdxl["cross_attention_dim"]
    assert rs["pooled_dim"] + rs["time_ids_dim"] * sdxl["addition_time_embed_dim"] == (
        sdxl["projection_class_embeddings_input_dim"]
    )
    assert mc.RUNTIME_SHAPES["sd15"]["text_dim"] == mc.MODEL_CONFIGS["sd15"][1]["cross_attention_dim"]


def test_make_inputs_flux_and_sdxl_layout():
    f = mc.make_inputs("flux-dev", batch=1, device="cpu")
    assert f["hidden_states"].shape == (1, 4096, 64)
    assert f["encoder_hidden_states"].shape == (1, 512, 4096)
    assert f["pooled_projections"].shape == (1, 768)
    assert f["img_ids"].shape == (4096, 3) and f["txt_ids"].shape == (512, 3)
    assert f["img_ids"][:, 1].max() == 63 and f["img_ids"][:, 2].max() == 63
    assert f["guidance"].shape == (1,)
    s = mc.make_inputs("sdxl", batch=1, device="cpu")
    assert s["sample"].shape == (2, 4, 128, 128)
    assert s["encoder_hidden_states"].shape == (2, 77, 2048)
    assert s["added_cond_kwargs"]["text_embeds"].shape == (2, 1280)
    assert s["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    d = mc.make_inputs("dit-xl-2", batch=2, device="cpu")
    assert (d["class_labels"][2:] == 1000).all() and (d["class_labels"][:2] < 1000).all()


def test_build_restores_default_dtype_on_error(monkeypatch):
    cls_name, cfg = mc.MODEL_CONFIGS["dit-xl-2"]
    monkeypatch.setitem(mc.MODEL_CONFIGS, "broken", (cls_name, {**cfg, "no_such_kwarg": 1}))
    before = torch.get_default_dtype()
    with pytest.raises(TypeError):
        mc.build_model("broken", dtype=torch.float16)
    assert torch.get_default_dtype() == before
    with pytest.raises(KeyError):
        mc.build_model("nope")


def test_build_dtype_argument():
    model = mc.build_model("dit-xl-2", dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert torch.get_default_dtype() == torch.float32
