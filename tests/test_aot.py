"""Compile-only checks for Hopper on the CPU (:mod:`dmq.kernels.aot`, ``benchmarks/aot_report.py`` over all the
kernel benchmark's shapes, SDXL's convolutions and three attention shapes): every config the kernels autotune over
compiles for sm_90, fits its shared memory and does not spill registers, and the int8 GEMMs (linear, persistent and
implicit-GEMM convolution) run on warpgroup MMAs fed by TMA. The compiler cannot run under
Triton's interpreter (set for the other tests), so the checks run in subprocesses without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}


def _python(code: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hopper_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot")
    proc = subprocess.run([sys.executable, "benchmarks/aot_report.py", "--results-dir", str(out), "--name", "aot"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "aot.json").read_text())["rows"]


def test_sass_mix_counts_opcodes_and_access_widths():
    from dmq.kernels.aot import sass_mix

    listing = """
        /*0100*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0110*/                   IGMMA.64x256x32.S8.S8 R24, gdesc[UR8], R24, gsb0 ;
        /*0120*/              @!P0 LDG.E.128.CONSTANT R4, desc[UR6][R2.64] ;
        /*0130*/                   LDG.E.U8 R5, desc[UR6][R2.64] ;
        /*0140*/                   LDG.E R6, desc[UR6][R2.64] ;
        /*0150*/               @P1 STG.E.64 desc[UR6][R8.64], R10 ;
        /*0160*/                   STL.64 [R1+0x8], R12 ;
        /*0170*/                   FMUL R3, R3, R4 ;
        /*0180*/                   MUFU.RCP R5, R3 ;
    """
    assert sass_mix(listing) == {"total": 9, "UTMALDG": 1, "IGMMA": 1, "LDG.128": 1, "LDG.8": 1, "LDG.32": 1,
                                 "STG.64": 1, "STL": 1, "MUFU": 1}


def test_programs_per_sm_follows_the_occupancy_limits():
    from dmq.kernels.aot import programs_per_sm

    assert programs_per_sm((9, 0), 8, 128, 0) == 2            # 8 warps × 32 × 128 registers: half the file
    assert programs_per_sm((9, 0), 4, 32, 0) == 16            # warps: 64 per SM
    assert programs_per_sm((9, 0), 1, 16, 0) == 32            # programs: 32 per SM
    assert programs_per_sm((9, 0), 4, 64, 100 * 1024) == 2    # shared memory: 228 KB, 1 KB reserved per program
    assert programs_per_sm((9, 0), 4, 255, 0) == 2            # 255 registers allocate as 256
    assert programs_per_sm((8, 6), 8, 32, 0) == 6             # 48 warps
    assert programs_per_sm((9, 0), 4, 64, 240 * 1024) == 0


def test_compile_only_refuses_the_interpreter():
    from dmq.kernels.aot import compile_only

    assert os.environ.get("TRITON_INTERPRET") == "1"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with compile_only():
            pass


# stack bytes known and left as they are: the MMA GEMV's 64-row configs keep 8 bytes outside their loop
_KNOWN_STACK = {"weight_only._gemv_kernel": 8}


def test_every_config_compiles_fits_and_keeps_its_registers(hopper_rows):
    kernels = {r["case"] for r in hopper_rows}
    assert {"quant_act._token_kernel", "quant_act._group_kernel", "gemm._gemm_tma_kernel", "gemm._gemm_kernel",
            "weight_only._dequant_kernel", "weight_only._gemv_kernel", "weight_only._gemv_int4b_kernel",
            "im2col._im2col_kernel", "attention._attn_kernel", "attention._quant_kernel",
            "nvfp4._nvfp4_quant_kernel"} <= kernels
    bad = [(r["case"], r["variant"], r["error"], r["shared_bytes"], r["stack_bytes"]) for r in hopper_rows
           if r["error"] or not r["fits"] or r["programs_per_sm"] < 1
           or r["stack_bytes"] > _KNOWN_STACK.get(r["case"], 0)]
    assert not bad


def test_int8_gemms_run_on_warpgroup_mma_fed_by_tma(hopper_rows):
    tma = [r for r in hopper_rows if r["case"] in ("gemm._gemm_tma_kernel", "gemm._gemm_tma_persistent_kernel")]
    conv = [r for r in tma if "CONV_KW=3" in r["variant"]]
    persistent = [r for r in tma if r["case"] == "gemm._gemm_tma_persistent_kernel"]
    assert conv and persistent and len(tma) > len(conv) + len(persistent)
    for r in tma:
        assert r.get("sass_IGMMA", 0) > 0 and r.get("sass_UTMALDG", 0) > 0, r["variant"]
        assert r.get("sass_HGMMA", 0) > 0, r["variant"]     # the rank-32 up-projection in the epilogue


def test_persistent_configs_fit_their_programs_per_sm(hopper_rows):
    """The persistent GEMM launches PER_SM programs per SM: each config fits that many on an sm_90 SM."""
    rows = [r for r in hopper_rows if r["case"] == "gemm._gemm_tma_persistent_kernel"]
    assert {r["variant"].split("PER_SM=")[1][0] for r in rows} == {"1", "2"}
    for r in rows:
        assert r["programs_per_sm"] >= int(r["variant"].split("PER_SM=")[1][0]), r["variant"]


def test_planar_quantizer_loads_sixteen_bytes_at_a_time(hopper_rows):
    """The per-pixel quantizer reading NCHW images in place loads runs of pixels with 128-bit loads (with a row
    mask, or without the contiguity hints, every load was 16-bit)."""
    planar = [r for r in hopper_rows if r["case"] == "quant_act._token_kernel" and "PLANAR=True" in r["variant"]]
    assert len(planar) >= 4
    for r in planar:
        assert r.get("sass_LDG.128", 0) >= 4, r["variant"]


def test_compile_only_leaves_triton_as_it_was():
    proc = _python("""
        import torch
        from triton import knobs
        from triton.runtime import driver
        from dmq.kernels import _common
        from dmq.kernels.aot import compile_only
        from dmq.kernels.triton import quant_act

        x = torch.zeros(64, 256, dtype=torch.bfloat16)
        with compile_only((9, 0)) as session:
            quant_act.quantize_act(x, None, None, "int8", 0, False)
            assert len(session.launches) > 1, session.launches      # every config of the autotuned kernel
            assert session.build(session.launches[0]).error is None
        assert _common.COMPILE_ONLY_TARGET is None and knobs.runtime.jit_cache_hook is None
        assert driver._active is None
        assert not quant_act._token_tuned.cache
        assert not quant_act._token_kernel.device_caches
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
