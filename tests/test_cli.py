"""The ``dmq`` command line: help for each subcommand, one-line errors with exit code 2, quantize and bench end to
end on a shipped model. (``dmq demo`` end to end is tests/test_shipped_models.py::test_demo_main_job_end_to_end.)"""

import os
import re
import subprocess
import sys

import pytest
import torch

import dmq
import dmq.models
from dmq.cli import main
from dmq.config import list_presets


def _run(argv, capsys):
    """(exit code, stdout, stderr) of ``dmq argv`` in process (argparse's exits included)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("cmd", [[], ["quantize"], ["bench"], ["demo"], ["presets"]])
def test_help(cmd, capsys):
    code, out, _ = _run([*cmd, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: {' '.join(['dmq', *cmd])}")


def test_presets_lists_each_preset_with_its_description(capsys):
    code, out, _ = _run(["presets"], capsys)
    assert code == 0
    rows = dict(re.match(r"(\S+)\s+(.*)", line).groups() for line in out.splitlines())
    assert rows == list_presets()


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--model", "digits-unet", "--preset", "w3a3", "--out", "OUT"], "unknown preset 'w3a3'"),
    (["quantize", "--model", "./no/such/model", "--preset", "w8a8", "--out", "OUT"], "no model folder"),
    (["quantize", "--model", "org/not-downloaded", "--preset", "w8a8", "--out", "OUT"], "HF_HUB_OFFLINE"),
    (["quantize", "--model", "digits-classifier", "--preset", "w8a8", "--out", "OUT"], "not a diffusion model"),
    (["quantize", "--model", "digits-unet", "--preset", "w8a8-static", "--out", "OUT", "--calib-prompts", "NOFILE"],
     "no such file"),
    (["quantize", "--model", "digits-unet", "--preset", "w8a8-static", "--out", "OUT", "--calib-prompts", "EMPTY"],
     "has no prompts"),
    (["quantize", "--model", "digits-unet", "--preset", "w8a8-static", "--out", "OUT", "--calib-prompts", "BINARY"],
     "not a UTF-8 text file"),
    (["quantize", "--model", "digits-unet", "--preset", "w8a8", "--out", "OUT", "--calib-samples", "0"],
     "expected a positive integer, got 0"),
    (["quantize", "--model", "digits-unet", "--preset", "w8a8", "--out", "EXISTS"], "pass --overwrite"),
    (["quantize", "--preset", "w8a8", "--out", "OUT"], "the following arguments are required: --model"),
    (["quantize", "--model", "digits-dit", "--preset", "w8a8", "--out", "OUT", "--calib-class-labels", "x"],
     "expected a class label (an integer >= 0)"),
    (["bench", "--iters", "two"], "expected a positive integer, got 'two'"),
    (["bench", "--preset", "nope"], "unknown preset 'nope'"),
    (["bench", "--compile", "--compile-blocks"], "not allowed with argument --compile"),
    (["demo", "--num-images", "-1"], "expected a positive integer, got -1"),
    (["demo", "--model", "sdxl"], "invalid choice: 'sdxl'"),
    (["presets", "--verbose"], "unrecognized arguments: --verbose"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_user_mistakes_exit_2_with_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "EMPTY").write_text("\n  \n")
    (tmp_path / "BINARY").write_bytes(b"\xff\xfe\x00\x81prompt")
    (tmp_path / "EXISTS").mkdir()
    names = {"OUT": tmp_path / "out", "NOFILE": tmp_path / "none.txt", "EMPTY": tmp_path / "EMPTY",
             "BINARY": tmp_path / "BINARY", "EXISTS": tmp_path / "EXISTS"}
    code, out, err = _run([str(names.get(a, a)) for a in argv], capsys)
    prog = "dmq" if argv[0] == "frobnicate" else f"dmq {argv[0]}"
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"{prog}: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_console_script_error_has_no_traceback():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dmq.cli", "quantize", "--model", "digits-unet", "--preset", "w9",
                           "--out", "unused"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("dmq quantize: error: unknown preset 'w9'")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_quantize_end_to_end_matches_the_api(tmp_path, capsys, one_thread):
    out = tmp_path / "q"
    code, stdout, _ = _run(["quantize", "--model", "digits-unet", "--preset", "w8a8-static", "--calib-samples", "2",
                            "--calib-steps", "2", "--out", str(out), "--quiet"], capsys)
    assert code == 0 and "preset 'w8a8-static'" in stdout and str(out) in stdout
    loaded = dmq.load_quantized(out, dmq.models.load("digits-unet"))
    cal = dmq.CalibrationConfig(num_samples=2, num_inference_steps=2, batch_size=1, seed=0)
    direct = dmq.quantize_pipeline(dmq.models.load("digits-unet"), "w8a8-static", calibration=cal, progress=False)
    a, b = loaded.unet.state_dict(), direct.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("input_scale") and torch.isfinite(a[k]).all() for k in a)  # calibrated static ranges


def test_bench_prints_both_timings_and_their_ratio(capsys, one_thread):
    code, stdout, _ = _run(["bench", "--model", "digits-unet", "--preset", "w8a8", "--iters", "1", "--warmup", "0",
                            "--quiet"], capsys)
    assert code == 0
    fp = float(re.search(r"float\s+([\d.]+) ms", stdout).group(1))
    q, ratio = map(float, re.search(r"w8a8\s+([\d.]+) ms\s+ratio ([\d.]+)", stdout).groups())
    assert fp > 0 and q > 0 and ratio == pytest.approx(q / fp, abs=1e-3)


def test_bench_compile_blocks_compiles_both_denoisers(capsys, one_thread, monkeypatch):
    seen = []
    monkeypatch.setattr(dmq, "compile_blocks", lambda model: seen.append(model) or [])
    code, stdout, _ = _run(["bench", "--model", "digits-dit", "--preset", "w8a8", "--iters", "1", "--warmup", "0",
                            "--compile-blocks", "--quiet"], capsys)
    assert code == 0 and "dmq.compile_blocks" in stdout
    assert len(seen) == 2 and seen[0] is not seen[1]   # the float copy and the quantized denoiser
