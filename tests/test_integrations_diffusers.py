"""dmq checkpoints through diffusers' from_pretrained: same layers and images, bit for bit, and clear errors."""

import shutil
import warnings

import pytest
import torch
from diffusers import DDPMPipeline, DiTTransformer2DModel, PipelineQuantizationConfig, UNet2DModel
from safetensors.torch import load_file, save_file

import dmq
import dmq.models
from dmq.integrations.diffusers import DmqConfig, register
from dmq.nn import QuantModule

MODELS = {"digits-unet": (UNet2DModel, "unet", "w4a8"), "digits-dit": (DiTTransformer2DModel, "transformer",
                                                                     "svdquant-w4a4")}


@pytest.fixture(scope="module", autouse=True)
def _registered(one_thread):
    register()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{model name: (quantized pipeline, checkpoint dir, its images)}, quantized data-free and saved once."""
    out = {}
    for name, (_, _, preset) in MODELS.items():
        pipe = dmq.quantize_pipeline(dmq.models.load(name), preset, progress=False)
        out[name] = (pipe, dmq.save_quantized(pipe, tmp_path_factory.mktemp(name) / "q"), _images(pipe, name))
    return out


def _images(pipe, name):
    """3 sampler steps, seed 0, as an (N, 1, 32, 32) tensor."""
    kw = {"class_labels": [7]} if name == "digits-dit" else {"batch_size": 2}
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="pt", **kw).images


def _load(cls, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers: "the model's own quantization_config will be used"
        return cls.from_pretrained(path, **kw)


@pytest.mark.parametrize("name, pass_config", [("digits-unet", True), ("digits-unet", False), ("digits-dit", True)],
                         ids=["unet-DmqConfig", "unet-saved-config", "dit-DmqConfig"])
def test_from_pretrained_is_bit_identical(saved, name, pass_config):
    cls, attr, _ = MODELS[name]
    qpipe, path, images = saved[name]
    kw = {"quantization_config": DmqConfig()} if pass_config else {}
    model = _load(cls, path / attr, **kw)
    ref = getattr(qpipe, attr)
    assert {n: type(m) for n, m in model.named_modules() if isinstance(m, QuantModule)} == \
        {n: type(m) for n, m in ref.named_modules() if isinstance(m, QuantModule)}
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    assert all(sd[k].dtype == sd_ref[k].dtype and torch.equal(sd[k], sd_ref[k]) for k in sd)
    pipe = dmq.models.load(name)
    pipe.register_modules(**{attr: model})
    assert torch.equal(_images(pipe, name), images)


def test_pipeline_quantization_config(saved, tmp_path):
    _, path, images = saved["digits-unet"]
    dmq.models.load("digits-unet").save_pretrained(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "unet")
    shutil.copytree(path / "unet", tmp_path / "pipe" / "unet")
    quant = PipelineQuantizationConfig(quant_mapping={"unet": DmqConfig()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe", quantization_config=quant)
    assert any(isinstance(m, QuantModule) for m in pipe.unet.modules())
    assert torch.equal(_images(pipe, "digits-unet"), images)


def test_register_is_idempotent_and_version_checked(monkeypatch):
    from diffusers.quantizers import auto

    register()
    register()
    assert auto.AUTO_QUANTIZER_MAPPING["dmq"].__name__ == "DmqQuantizer"
    monkeypatch.setattr("diffusers.__version__", "0.31.0")
    with pytest.raises(dmq.DmqError, match=r"needs diffusers >= 0\.42"):
        register()


def test_floating_point_checkpoint_with_dmqconfig(tmp_path):
    dmq.models.load("digits-unet").save_pretrained(tmp_path / "fp")
    with pytest.raises(dmq.ConfigError, match="quantize it with dmq.quantize_pipeline"):
        UNet2DModel.from_pretrained(tmp_path / "fp" / "unet", quantization_config=DmqConfig())


def test_checkpoint_of_another_model(saved):
    with pytest.raises(dmq.CheckpointMismatchError, match="holds a quantized UNet2DModel, not a DiT"):
        _load(DiTTransformer2DModel, saved["digits-unet"][1] / "unet")


def test_other_dtype_is_refused(saved):
    with pytest.raises(dmq.ConfigError, match="torch_dtype=torch.float32"):
        _load(UNet2DModel, saved["digits-unet"][1] / "unet", torch_dtype=torch.float16)


@pytest.mark.parametrize("edit", ["drop-qweight", "change-kept-weight"])
def test_edited_checkpoint(saved, tmp_path, edit):
    ckpt = shutil.copytree(saved["digits-unet"][1] / "unet", tmp_path / "unet")
    f = ckpt / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    if edit == "drop-qweight":
        state.pop(next(k for k in state if k.endswith("qweight")))
        match = "missing"
    else:
        state["conv_in.weight"] = state["conv_in.weight"] + 1e-3
        match = "fingerprint"
    save_file(state, str(f))
    with pytest.raises(dmq.CheckpointMismatchError, match=match):
        _load(UNet2DModel, ckpt)
