"""Every committed benchmarks/results/*.json follows the schema of ../shared/DESIGN.md."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from common import validate  # noqa: E402

RESULTS = sorted((BENCH / "results").glob("*.json"))


def test_there_are_results():
    assert RESULTS, "benchmarks/results/ holds no results"


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_results_follow_schema(path):
    doc = json.loads(path.read_text())
    validate(doc)
    assert doc["command"].startswith("python benchmarks/"), "the command must be rerunnable from the repo root"


def test_no_benchmark_script_shadows_an_installed_module():
    """Scripts run with benchmarks/ first on sys.path (and this test module puts it there): a script named like an
    installed top-level module would replace it for every import in the process. benchmarks/kernels.py did that to
    Hugging Face's ``kernels`` (a transformers dependency that diffusers imports when it is installed), which broke
    every benchmark importing diffusers' model loaders; it is benchmarks/kernel_bench.py now."""
    import importlib.metadata

    installed = importlib.metadata.packages_distributions()
    assert "kernels" in installed          # the case that bit: transformers brings it into CI's environment
    assert not [p.name for p in BENCH.glob("*.py") if p.stem in installed]


def test_validate_rejects_bad_documents():
    good = {"device": "cpu", "versions": {"torch": "x", "triton": None, "diffusers": "y", "dmq": "z"},
            "command": "python benchmarks/x.py", "rows": [{"case": "a", "variant": "b", "ms": 1.0}]}
    validate(good)
    for bad in ({**good, "rows": []}, {**good, "rows": [{"case": "a"}]}, {k: good[k] for k in list(good)[:3]},
                {**good, "rows": [{"case": "a", "variant": "b", "nested": {"x": 1}}]}):
        with pytest.raises(ValueError):
            validate(bad)


def test_memory_results_meet_the_flux_target():
    doc = json.loads((BENCH / "results" / "memory.json").read_text())
    rows = {(r["case"], r["variant"]): r for r in doc["rows"]}
    for preset in ("w4a4", "w4a8", "w4a16"):
        assert rows[("flux-dev", preset)]["ratio_vs_fp16"] <= 0.30


def _rows(name):
    doc = json.loads((BENCH / "results" / f"{name}.json").read_text())
    return {(r["case"], r["variant"]): r for r in doc["rows"]}


@pytest.mark.parametrize("model", ["digits-unet", "digits-dit"])
def test_fidelity_results_show_the_expected_ordering(model):
    """The shipped models' table: fp32 within 2× of real-vs-real; w8a8 within one pooled std of fp32 in domain-FID;
    plain w4a4 worse than fp32 by more than two pooled stds; w8a8 more faithful than every 4-bit preset."""
    rows = _rows("fidelity-2")
    fp, real = rows[(model, "fp32")], rows[(model, "real-vs-real")]
    assert fp["fid"] <= 2 * real["fid"]
    pooled = lambda a, b: ((a["fid_std"] ** 2 + b["fid_std"] ** 2) / 2) ** 0.5  # noqa: E731
    w8, w4 = rows[(model, "w8a8")], rows[(model, "w4a4")]
    assert abs(w8["fid"] - fp["fid"]) <= pooled(w8, fp)
    assert w4["fid"] - fp["fid"] > 2 * pooled(w4, fp)
    assert all(w8["psnr"] > r["psnr"] for (case, v), r in rows.items() if case == model and "4" in v)
    if model == "digits-dit":
        assert fp["accuracy"] >= 0.9


def test_e2e_breakdown_counts_inductor_fusions_as_other():
    """Inductor names its fused kernels after the ops they fuse, the quantized linear they feed included; the e2e
    breakdown counts them as "other" in every variant, dmq's and cuBLAS's GEMMs as linear, SDPA as attention."""
    from e2e import _kernel_kind

    assert _kernel_kind("triton_poi_fused_cat_gelu_permute_quantize_act_view_3") == "other"
    assert _kernel_kind("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_a") == "other"
    assert _kernel_kind("_gemm_tma_kernel") == "linear" and _kernel_kind("_token_kernel") == "linear"
    assert _kernel_kind("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "linear"
    assert _kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_") == "attention"
