"""Bad input raises the documented exception, and a failed call leaves the pipeline's state unchanged."""

from __future__ import annotations

import json

import pytest
import torch

import dmq
from dmq.config import QuantConfig, get_preset
from dmq.errors import (CalibrationRequiredError, CheckpointMismatchError, ConfigError, NonFiniteError,
                        UnsupportedModuleError, UnsupportedPipelineError)
from dmq.formats import QuantSpec
from dmq.nn.base import QuantModule
from tiny_pipelines import build_pipeline


def _snapshot(pipe):
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _assert_unchanged(pipe, snap):
    state, types = snap
    now_state, now_types = _snapshot(pipe)
    assert now_types == types
    assert state.keys() == now_state.keys()
    assert all(torch.equal(state[k], now_state[k]) for k in state)
    assert not hasattr(pipe, "dmq_report")


def test_unknown_preset_lists_valid_ones():
    pipe = build_pipeline("ddpm")
    with pytest.raises(ConfigError, match="unknown preset 'w3a3'.*w4a8.*w8a8"):
        dmq.quantize_pipeline(pipe, "w3a3")


def test_config_type_checked():
    with pytest.raises(ConfigError, match="preset name or a dmq.QuantConfig"):
        dmq.quantize_pipeline(build_pipeline("ddpm"), 8)


@pytest.mark.parametrize("make", [
    lambda: QuantSpec("int5", "channel"),
    lambda: QuantSpec("int4", "group", 100),
    lambda: QuantConfig(QuantSpec("int8", "token")),
    lambda: QuantConfig(QuantSpec("int8", "channel"), QuantSpec("int8", "channel")),
    lambda: QuantConfig(QuantSpec("int8", "channel"), QuantSpec("int8", "tensor", dynamic=False)),
    lambda: QuantConfig(QuantSpec("int8", "channel"), include="attn*"),
])
def test_invalid_configs_raise(make):
    with pytest.raises(ConfigError):
        make()


def test_config_dict_round_trip_and_version():
    cfg = get_preset("w4a4").with_patterns(exclude=("*.to_k",))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="version"):
        QuantConfig.from_dict({**cfg.to_dict(), "version": 99})


def test_pipeline_without_denoiser():
    class NotAPipeline:
        vae = torch.nn.Linear(4, 4)

    with pytest.raises(UnsupportedPipelineError, match="neither a `unet` nor a `transformer`"):
        dmq.quantize_pipeline(NotAPipeline(), "w8a8")


def test_unknown_denoiser_class():
    class Pipe:
        transformer = torch.nn.Sequential(torch.nn.Linear(64, 64))

    with pytest.raises(UnsupportedPipelineError, match="no role view of Sequential"):
        dmq.quantize_pipeline(Pipe(), "w8a8")


def test_targeted_unsupported_module_is_named_and_nothing_changes():
    pipe = build_pipeline("ddpm")
    pipe.unet.down_blocks[0].resnets[0].conv2 = torch.nn.Conv2d(64, 64, 3, padding=1, groups=2)
    snap = _snapshot(pipe)
    cfg = get_preset("w8a8").with_patterns(include=("down_blocks.0.resnets.0.*",))
    with pytest.raises(UnsupportedModuleError, match=r"down_blocks\.0\.resnets\.0\.conv2.*grouped"):
        dmq.quantize_pipeline(pipe, cfg, progress=False)
    _assert_unchanged(pipe, snap)
    # by default the same module is kept 16-bit and the report says why
    dmq.quantize_pipeline(pipe, "w8a8", progress=False)
    entry = next(e for e in pipe.dmq_report.entries if e.name == "down_blocks.0.resnets.0.conv2")
    assert entry.action == "kept" and "grouped" in entry.reason


def test_pattern_matching_nothing_raises():
    pipe = build_pipeline("ddpm")
    with pytest.raises(ConfigError, match="no_such_layer"):
        dmq.quantize_pipeline(pipe, get_preset("w8a8").with_patterns(exclude=("no_such_layer",)), progress=False)


def test_include_and_exclude_patterns():
    pipe = build_pipeline("ddpm")
    cfg = get_preset("w8a8").with_patterns(include=("up_blocks.*", "conv_in"), exclude=("*conv_shortcut",))
    dmq.quantize_pipeline(pipe, cfg, progress=False)
    quantized = {e.name for e in pipe.dmq_report.entries if e.action != "kept"}
    assert quantized and all(n.startswith("up_blocks.") or n == "conv_in" for n in quantized)
    assert "conv_in" in quantized  # include overrides the default keep
    assert not any(n.endswith("conv_shortcut") for n in quantized)


def test_nan_weight_halfway_leaves_pipeline_unchanged():
    pipe = build_pipeline("dit")
    last = pipe.transformer.transformer_blocks[-1].ff.net[2]
    with torch.no_grad():
        last.weight[0, 0] = float("inf")
    snap = _snapshot(pipe)
    with pytest.raises(NonFiniteError, match=r"transformer_blocks\.\d+\.ff\.net\.2"):
        dmq.quantize_pipeline(pipe, "w4a8", progress=False)
    _assert_unchanged(pipe, snap)


def test_already_quantized_raises():
    pipe = dmq.quantize_pipeline(build_pipeline("ddpm"), "w8a8", progress=False)
    with pytest.raises(ConfigError, match="already quantized"):
        dmq.quantize_pipeline(pipe, "w8a8", progress=False)


def test_calibration_data_with_dynamic_preset_raises():
    with pytest.raises(ConfigError, match="takes no calibration"):
        dmq.quantize_pipeline(build_pipeline("ddpm"), "w8a8", calibration=object())


def test_calibrated_config_without_data_raises():
    cfg = QuantConfig(QuantSpec("int8", "channel"), QuantSpec("int8", "tensor", dynamic=False),
                      needs_calibration=True)
    pipe = build_pipeline("ddpm")
    snap = _snapshot(pipe)
    with pytest.raises(CalibrationRequiredError, match="needs calibration"):
        dmq.quantize_pipeline(pipe, cfg)
    _assert_unchanged(pipe, snap)


@pytest.fixture
def saved_dit(tmp_path):
    pipe = dmq.quantize_pipeline(build_pipeline("dit"), "w8a8", progress=False)
    return dmq.save_quantized(pipe, tmp_path / "q")


def test_load_into_another_pipeline_class(saved_dit):
    with pytest.raises(CheckpointMismatchError, match="saved from a DiTPipeline"):
        dmq.load_quantized(saved_dit, build_pipeline("ddpm"))


def test_load_into_other_weights(saved_dit):
    pipe = build_pipeline("dit", seed=1)  # same config, other weights: a "fine-tune"
    snap = _snapshot(pipe)
    with pytest.raises(CheckpointMismatchError, match="fingerprint"):
        dmq.load_quantized(saved_dit, pipe)
    _assert_unchanged(pipe, snap)


def test_load_into_other_config(saved_dit, monkeypatch):
    pipe = build_pipeline("dit")
    pipe.transformer.register_to_config(num_layers=99)
    with pytest.raises(CheckpointMismatchError, match="num_layers"):
        dmq.load_quantized(saved_dit, pipe)


def test_load_corrupt_tensors(saved_dit):
    from safetensors.torch import load_file, save_file

    f = saved_dit / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    state.pop(next(k for k in state if k.endswith("qweight")))
    save_file(state, str(f))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        dmq.load_quantized(saved_dit, build_pipeline("dit"))


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_load_tensor_of_another_shape_or_dtype_leaves_the_pipeline_unchanged(tmp_path, change):
    """A two-component checkpoint whose second component holds a tensor of another shape (or dtype) fails before
    the first component is installed."""
    from safetensors.torch import load_file, save_file

    pipe = dmq.quantize_pipeline(build_pipeline("sd"), "w8a8", components=["unet", "text_encoder"], progress=False)
    path = dmq.save_quantized(pipe, tmp_path / "q")
    names = json.loads((path / "dmq_index.json").read_text())["components"]
    assert names == ["text_encoder", "unet"]                # the text encoder would be installed first
    f = path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("qweight"))
    state[key] = state[key][:-1] if change == "shape" else state[key].float()
    save_file(state, str(f))
    fresh = build_pipeline("sd")
    snap, encoder = _snapshot(fresh), {k: v.clone() for k, v in fresh.text_encoder.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="other shapes or dtypes"):
        dmq.load_quantized(path, fresh)
    _assert_unchanged(fresh, snap)
    assert not any(isinstance(m, QuantModule) for m in fresh.text_encoder.modules())
    now = fresh.text_encoder.state_dict()
    assert now.keys() == encoder.keys() and all(torch.equal(now[k], encoder[k]) for k in encoder)


def test_load_from_non_checkpoint(tmp_path):
    with pytest.raises(CheckpointMismatchError, match="not a dmq checkpoint"):
        dmq.load_quantized(tmp_path, build_pipeline("dit"))


def test_save_is_atomic_and_does_not_overwrite(saved_dit, monkeypatch):
    pipe = dmq.quantize_pipeline(build_pipeline("dit"), "w8a8", progress=False)
    with pytest.raises(FileExistsError):
        dmq.save_quantized(pipe, saved_dit)
    before = sorted(p.name for p in saved_dit.parent.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("dmq.serialization.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        dmq.save_quantized(pipe, saved_dit, overwrite=True)
    # no temporary directory is left behind, and the old checkpoint is intact
    assert sorted(p.name for p in saved_dit.parent.iterdir()) == before
    dmq.load_quantized(saved_dit, build_pipeline("dit"))


def test_save_unquantized_pipeline_raises(tmp_path):
    with pytest.raises(dmq.DmqError, match="quantize_pipeline first"):
        dmq.save_quantized(build_pipeline("ddpm"), tmp_path / "x")
