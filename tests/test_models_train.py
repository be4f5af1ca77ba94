"""dmq.models: the digits data, a few-step training run of each bundled model, and loading what it wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

import dmq.models as models  # noqa: E402
from dmq.models import architectures as arch  # noqa: E402
from dmq.models import data  # noqa: E402
from dmq.models import train as train_mod  # noqa: E402


def test_split_is_fixed_disjoint_and_stratified():
    tr1, ho1 = data.split_indices()
    tr2, ho2 = data.split_indices()
    np.testing.assert_array_equal(tr1, tr2)
    np.testing.assert_array_equal(ho1, ho2)
    assert len(np.intersect1d(tr1, ho1)) == 0
    assert len(tr1) + len(ho1) == 1797
    assert np.array_equal(np.sort(np.concatenate([tr1, ho1])), np.arange(1797))
    assert len(ho1) == 360
    held = data.load_split("heldout")
    counts = torch.bincount(held.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each digit


def test_images_shape_range_and_augment():
    train = data.load_split("train")
    assert train.images.shape == (1437, 1, data.IMAGE_SIZE, data.IMAGE_SIZE)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.images.min() >= -1.0 and train.images.max() <= 1.0
    assert train.images.min() == -1.0 and train.images.max() > 0.9  # background -1, ink reaches ~+1
    assert set(train.labels.unique().tolist()) == set(range(10))
    x = train.images[:16]
    a1 = data.augment(x, torch.Generator().manual_seed(3), p=1.0)
    a2 = data.augment(x, torch.Generator().manual_seed(3), p=1.0)
    assert a1.shape == x.shape and torch.equal(a1, a2)
    assert a1.min() >= -1.0 and a1.max() <= 1.0 and not torch.equal(a1, x)
    assert torch.allclose(data.augment(x, torch.Generator().manual_seed(3), p=0.0), x)


def test_available_and_missing_weights(tmp_path):
    names = models.available()
    assert {"digits-unet", "digits-dit", "digits-classifier"} <= set(names)
    assert all(isinstance(d, str) and d for d in names.values())
    with pytest.raises(FileNotFoundError, match="python -m dmq.models.train --model digits-unet"):
        models.load("digits-unet", weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="--model classifier"):
        models.load_classifier(weights_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dmq model"):
        models.load("digits-vae", weights_dir=tmp_path)


def test_weights_budget_of_configs():
    """Each model's stored weights stay under the 20 MB limit; the diffusion models keep >= 256-wide layers."""
    for name in arch.NAMES:
        with torch.device("meta"):
            model = arch.build_model(name)
        n = arch.count_params(model)
        size = n * torch.finfo(arch.storage_dtype(n)).bits // 8
        assert size <= arch.MAX_WEIGHTS_BYTES, (name, n)
    assert max(arch.UNET_CONFIG["block_out_channels"]) >= 256
    assert arch.DIT_CONFIG["num_attention_heads"] * arch.DIT_CONFIG["attention_head_dim"] >= 256


def _train(out, model, seed=0, steps=3):
    return train_mod.main(
        [
            "--model", model, "--steps", str(steps), "--batch-size", "2", "--out", str(out), "--device", "cpu",
            "--seed", str(seed), "--log-every", "2", "--sample-steps", "2", "--num-samples", "2",
            "--eval-samples", "0",
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("dmq_weights")
    infos = {m: _train(out, m) for m in ("classifier", "digits-unet", "digits-dit")}
    return out, infos


@pytest.mark.parametrize("name", ["digits-classifier", "digits-unet", "digits-dit"])
def test_training_writes_everything(trained, name):
    out, _ = trained
    folder = out / name
    for f in ("config.json", "model.safetensors", "loss_log.json", "samples.png", "train_info.json"):
        assert (folder / f).is_file(), f
    info = json.loads((folder / "train_info.json").read_text())
    assert info["steps_done"] == 3 and info["model"] == name
    assert np.isfinite(info["final_loss"]) and info["device"].startswith("cpu")
    assert info["command"].startswith("python -m dmq.models.train --model")
    assert info["weights_bytes"] <= arch.MAX_WEIGHTS_BYTES
    log = json.loads((folder / "loss_log.json").read_text())
    assert [e["step"] for e in log] == [2, 3]
    if name != "digits-classifier":
        assert (folder / "scheduler_config.json").is_file()


def test_load_unet_pipeline_generates(trained):
    out, _ = trained
    pipe = models.load("digits-unet", weights_dir=out)
    assert isinstance(pipe, arch.DDPMPipeline)
    assert not pipe.unet.training and pipe.unet.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert img.shape == (1, 1, 32, 32) and torch.isfinite(img).all()
    assert img.min() >= 0 and img.max() <= 1


def test_load_dit_pipeline_generates_with_cfg(trained):
    out, _ = trained
    pipe = models.load("digits-dit", weights_dir=out / "digits-dit")  # the model folder itself works too
    assert isinstance(pipe, arch.DiTPipeline)
    assert pipe.labels == {str(i): i for i in range(10)}
    pipe.set_progress_bar_config(disable=True)
    # guidance > 1 needs the null class (DiTPipeline's hard-coded 1000 mapped to 10)
    img = pipe(class_labels=[3, "7"], guidance_scale=3.0, num_inference_steps=2, generator=torch.manual_seed(0),
               output_type="pt").images  # fmt: skip
    assert img.shape == (2, 1, 32, 32) and torch.isfinite(img).all()
    with pytest.raises(ValueError):
        pipe(class_labels=[10], num_inference_steps=1)


def test_dit_label_dropout_is_not_per_block():
    model = arch.build_model("digits-dit")
    from diffusers.models.embeddings import LabelEmbedding

    tables = [m for m in model.modules() if isinstance(m, LabelEmbedding)]
    assert len(tables) == arch.DIT_CONFIG["num_layers"]
    assert all(t.dropout_prob == 0.0 and t.embedding_table.num_embeddings == 11 for t in tables)


def test_load_classifier_and_fid_features(trained):
    out, _ = trained
    clf = models.load_classifier(weights_dir=out)
    assert not clf.training
    x = torch.rand(3, 1, 32, 32)
    assert clf(x).shape == (3, 10)
    fx = clf.feature_extractor()
    fx.train()
    assert not fx.training and fx(x).shape == (3, fx.num_features)
    assert fx((x * 255).to(torch.uint8).expand(3, 3, 32, 32)).shape == (3, fx.num_features)  # uint8 RGB works too
    tm = pytest.importorskip("torchmetrics.image.fid")
    fid = tm.FrechetInceptionDistance(feature=fx, normalize=True)
    fid.update(torch.rand(8, 1, 32, 32), real=True)
    fid.update(torch.rand(8, 1, 32, 32), real=False)
    assert torch.isfinite(fid.compute())


def test_training_is_deterministic(trained, tmp_path):
    """The same command gives the same weights: a second DiT run (augmentation, noise, timesteps, label dropout)."""
    from safetensors.torch import load_file

    out, infos = trained
    info = _train(tmp_path, "digits-dit")
    assert info["final_loss"] == infos["digits-dit"]["final_loss"]
    wa = load_file(str(out / "digits-dit" / "model.safetensors"))
    wb = load_file(str(tmp_path / "digits-dit" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
