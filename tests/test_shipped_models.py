"""The shipped digits models: load offline, reproduce a stored fixed-seed sample, and the README main job runs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmq.cli import main as cli_main
from dmq.evaluation.digits import DigitsMetrics, generate
from dmq.models import available, load

REFERENCE = Path(__file__).parent / "data" / "shipped_reference.safetensors"
# the stored images were made on the CPU by the generate() call below; other BLAS builds may round differently
ATOL = 2e-3


def test_available_models_are_described():
    names = available()
    assert {"digits-unet", "digits-dit"} <= set(names) and all(names.values())


@pytest.mark.parametrize("name", ["digits-unet", "digits-dit"])
def test_fixed_seed_sample_matches_the_stored_reference(name):
    pipe = load(name)
    images, _ = generate(pipe, 4, seed=0, batch_size=4, num_inference_steps=4, progress=False)
    ref = load_file(str(REFERENCE))[name]
    assert images.shape == ref.shape == (4, 1, 32, 32)
    torch.testing.assert_close(images, ref, rtol=0, atol=ATOL)


def test_domain_metrics_move_the_right_way():
    m = DigitsMetrics()
    real = m.real[:100]
    noisy = (real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert m.fid(real, seed=1) < m.fid(noisy, seed=1)
    assert m.accuracy(real, m.real_labels[:100]) > 0.95


def test_demo_main_job_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli_main(["demo", "--out", str(out), "--num-images", "10", "--steps", "4", "--calibration-samples", "2",
                     "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "grid.png").stat().st_size > 0
    assert metrics["denoiser_bytes_quantized"] < metrics["denoiser_bytes_fp16"]
    assert 10 < metrics["psnr"] < 100 and 0 < metrics["ssim"] <= 1
    assert "PSNR" in capsys.readouterr().out


def test_cli_reports_user_mistakes_in_one_line(capsys):
    code = cli_main(["demo", "--preset", "w3a3", "--num-images", "2", "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown preset 'w3a3'" in err and len(err.strip().splitlines()) == 1
