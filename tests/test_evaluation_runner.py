"""The evaluation runner end to end, offline: the shipped digits U-Net (fp32 vs dmq:w8a8) with resume counted in
denoiser calls, a tiny text-to-image pipeline with a prompt file and a CLIP score, and 2 processes (gloo) giving the
same images and FID as 1 process."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from dmq.errors import ConfigError
from dmq.evaluation.runner import _load_png, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import validate  # noqa: E402

STEPS = 2


class _CountingDigitsUNet:
    """A pipeline factory (the shipped digits U-Net) that counts denoiser forwards over every pipeline it built."""

    __name__ = "digits-unet"

    def __init__(self):
        self.calls = 0

    def __call__(self):
        from dmq.models import load

        pipe = load("digits-unet")
        pipe.unet.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return pipe


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("eval-unet")
    factory = _CountingDigitsUNet()
    doc = evaluate(factory, out, variants=["dmq:w8a8"], num_images=4, steps=STEPS, batch_size=2,
                   fid_features="digits", progress=False)
    return out, factory, doc


def test_runner_writes_results_grids_and_images(unet_run):
    out, factory, doc = unet_run
    assert factory.calls == 2 * (4 // 2) * STEPS  # two variants, two batches each, one forward per step
    validate(doc)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(doc))
    ref, q = doc["rows"]
    assert (ref["variant"], q["variant"]) == ("fp32", "dmq:w8a8")
    assert ref["fid_features"] == q["fid_features"] == "digits-classifier penultimate features (128-d)"
    assert 15 < q["psnr"] < 100 and 0 < q["ssim"] <= 1 and q["fid_vs_ref"] >= 0
    assert "psnr" not in ref and q["generated"] == 4
    assert len(_pngs(out / "images" / "fp32")) == len(_pngs(out / "images" / "dmq-w8a8")) == 4
    assert (out / "grid-dmq-w8a8.png").is_file()


def test_runner_resumes_without_regenerating(unet_run):
    out, factory, doc = unet_run
    before = _load_png(out / "images" / "dmq-w8a8" / "00003.png")
    factory.calls = 0
    again = evaluate(factory, out, variants=["dmq:w8a8"], num_images=4, steps=STEPS, batch_size=2,
                     fid_features="digits", progress=False)
    assert factory.calls == 0 and [r["generated"] for r in again["rows"]] == [0, 0]
    assert again["rows"][1]["psnr"] == doc["rows"][1]["psnr"]
    (out / "images" / "dmq-w8a8" / "00003.png").unlink()
    third = evaluate(factory, out, variants=["dmq:w8a8"], num_images=4, steps=STEPS, batch_size=2,
                     fid_features="digits", progress=False)
    # its batch (items 2, 3) runs again, as in the first run, so the image comes back bit-identical
    assert factory.calls == STEPS and [r["generated"] for r in third["rows"]] == [0, 1]
    assert torch.equal(_load_png(out / "images" / "dmq-w8a8" / "00003.png"), before)
    with pytest.raises(ConfigError, match="other settings"):
        evaluate(factory, out, variants=["dmq:w8a8"], num_images=4, steps=STEPS + 1, progress=False)


def test_runner_text_pipeline_with_prompt_file_and_clip(tmp_path, one_thread):
    from tiny_pipelines import _clip_config, build_pipeline, clip_tokenizer
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    from dmq.evaluation.clip import ClipScorer

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=_clip_config(hidden=32, projection_dim=16).to_dict(),
                                 vision_config=vision.to_dict(), projection_dim=16)).eval()
    scorer = ClipScorer.from_transformers(model, clip_tokenizer(), name="tiny CLIPModel")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red cat\n\na wooden table\n")

    def sd():
        return build_pipeline("sd")

    features = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())  # 48-d colour layout
    doc = evaluate(sd, tmp_path / "out", variants=["w8a8"], num_images=3, steps=STEPS, batch_size=3,
                   prompt_file=prompts, fid_features=features, clip=scorer, progress=False)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [it["prompt"] for it in run["items"]] == ["a red cat", "a wooden table", "a red cat"]
    for row in doc["rows"]:
        assert row["clip_model"] == "tiny CLIPModel" and 0 <= row["clip_score"] <= 100
        assert row["fid_features"] == "Sequential"
    assert doc["rows"][1]["variant"] == "dmq:w8a8" and doc["rows"][1]["psnr"] > 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a process that used accelerate already
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    assert acc.num_processes == world
    evaluate("digits-unet", out, variants=["dmq:w8a8"], num_images=5, steps=STEPS, batch_size=2,
             accelerator=acc, progress=False)
    torch.distributed.destroy_process_group()


def test_two_processes_match_one(tmp_path, one_thread):
    """Same images (bit-identical PNGs: the same fixed batches run in both) and the same FIDs: features are gathered,
    so only the feature batches and the summation order differ (tolerance 1e-6 relative)."""
    from torch.multiprocessing import start_processes

    one = evaluate("digits-unet", tmp_path / "one", variants=["dmq:w8a8"], num_images=5, steps=STEPS,
                   batch_size=2, progress=False)
    start_processes(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, start_method="fork")
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for variant in ("fp32", "dmq-w8a8"):
        assert _pngs(tmp_path / "one" / "images" / variant) == _pngs(tmp_path / "two" / "images" / variant)
    for r1, r2 in zip(one["rows"], two["rows"]):
        assert (r1["num_processes"], r2["num_processes"]) == (1, 2)
        for key in ("fid", "fid_vs_ref", "psnr", "ssim"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-6, abs=1e-9), key
