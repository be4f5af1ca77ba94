"""Design variants of the two bandwidth-bound kernels around a quantized linear (issue 7), in one process:

- per-token activation quantization (int8 and two-level int4 g64, with smoothing): dmq's autotuned two-pass
  kernel (``quant_act._token_kernel``), each of its configs alone (two passes over K, or the whole row held in
  registers), the same without smoothing (what the per-column reciprocal of ``smooth`` costs); against
  ``x.to(torch.int8)`` (the same bytes read and written);
- two-level int4 weight expansion to int8 ``code · sub``: dmq's ``_dequant_kernel`` at several tile heights, against
  a copy of the int8 result (device bandwidth).

Two variants measured by the first version of this script (commit 4656610, its rows in
``quant-variants-h200.json`` of that commit) and dropped: the whole-row kernel multiplying by a precomputed fp32
``1 / smooth`` (no faster than the reciprocal in the kernel: 18.7 against 14.8 us at 4096 x 3072), and an
integer-only expansion (0.92-1.01x the float one, which is already at the copy bandwidth).

Every variant's output is compared bit for bit with dmq's. Writes ``benchmarks/results/quant-variants-<device>.json``.

    python benchmarks/quant_variants.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, gpu_script_args, write_results  # noqa: E402
from kernel_bench import bench, make_data, slug  # noqa: E402

from dmq.formats import QuantSpec, padded_channels, quantize  # noqa: E402
from dmq.kernels._common import next_pow2  # noqa: E402
from dmq.kernels.layouts import int4_to_blocked  # noqa: E402
from dmq.kernels.reference.quant_act import act_spec  # noqa: E402
from dmq.kernels.triton import quant_act as tq  # noqa: E402
from dmq.kernels.triton import weight_only as two  # noqa: E402

SHAPES = [  # name, M, K (activations), N (weight rows)
    ("flux_qkv", 4096, 3072, 9216),
    ("flux_mlp_down", 4096, 12288, 3072),
    ("flux_single_out", 4608, 15360, 3072),
    ("pixart_mlp_cfg", 8192, 1152, 4608),
    ("sdxl_attn_cfg", 8192, 640, 640),
    ("sdxl_ff_down_cfg", 2048, 5120, 1280),
    ("small_m", 256, 3072, 3072),
]
ACTS = [("int8", 0), ("int4_2l", 64)]   # (per-token int4 runs the int8 code path with another qmax)
CONFIG_SWEEP = ("flux_qkv", "sdxl_attn_cfg")   # shapes where each config of the two-pass kernel is timed alone


def run_token_cfg(x, sm, qdtype, group, bm, bk, warps):
    """dmq's per-token kernel with one config; bk = 0: the whole (padded) row in one load."""
    spec = act_spec(qdtype, group)
    m, k = x.shape
    kp = padded_channels(spec, k)
    codes = torch.empty((m, kp), dtype=torch.int8, device=x.device)
    scales = torch.empty((m,), dtype=torch.float32, device=x.device)
    bk_max = max(next_pow2(kp), 64)
    tq._token_kernel[(triton.cdiv(m, bm),)](x, sm if sm is not None else x, codes, scales, m, k, kp, 1,
                                           x.stride(0), codes.stride(0), HAS_SMOOTH=sm is not None, IS_FP8=False,
                                           QMAX=float(spec.qtype.qmax), PACK=False,
                                           TWO_LEVEL_GROUP=group if qdtype == "int4_2l" else 0, BM=bm,
                                           BK=min(bk, bk_max) if bk else bk_max, WHOLE=bk == 0, num_warps=warps)
    return codes, scales


def quant_rows(name, m, k, dev, quick):
    x, _, _ = make_data(m, k, 64, dev)
    sm = (torch.rand(k, device=dev) + 0.5).to(torch.float16)
    t_floor, _ = bench(lambda: x.to(torch.int8))
    rows = [{"case": name, "kind": "quant", "variant": "torch-x.to(int8)", "M": m, "K": k, "ms": round(t_floor, 5),
             "GBps": round(3 * m * k / t_floor / 1e6)}]
    for qdtype, group in ACTS:
        ref = tq.quantize_act(x, sm, None, qdtype, group, False)[:2]
        variants = {"lib": lambda qdtype=qdtype, group=group: tq.quantize_act(x, sm, None, qdtype, group, False)[:2],
                    "lib-nosmooth": lambda qdtype=qdtype, group=group: tq.quantize_act(x, None, None, qdtype, group,
                                                                                       False)[:2]}
        if not quick and name in CONFIG_SWEEP:
            for bm, bk, w in ((16, 512, 8), (8, 1024, 8), (4, 2048, 8), (8, 512, 4), (4, 1024, 4), (2, 2048, 4)):
                variants[f"2pass-bm{bm}-bk{bk}-w{w}"] = \
                    lambda bm=bm, bk=bk, w=w, qdtype=qdtype, group=group: run_token_cfg(x, sm, qdtype, group, bm, bk, w)
        bkp = next_pow2(k)
        for bm, w in ((1, 4), (1, 8), (2, 8), (4, 8), (1, 16)):
            if bm * bkp > 32768 or bm * bkp < 32 * w * 4:
                continue
            variants[f"whole-bm{bm}-w{w}"] = \
                lambda bm=bm, w=w, qdtype=qdtype, group=group: run_token_cfg(x, sm, qdtype, group, bm, 0, w)
        for vname, fn in variants.items():
            out = fn()
            exact = vname == "lib-nosmooth" or all(torch.equal(a, b) for a, b in zip(out, ref))
            ms, timer = bench(fn)
            rows.append({"case": name, "kind": f"quant-{qdtype}", "variant": vname, "M": m, "K": k,
                         "ms": round(ms, 5), "vs_lib": None, "exact": exact, "timer": timer,
                         "GBps": round(3 * m * k / ms / 1e6)})
        lib_ms = next(r["ms"] for r in rows if r["kind"] == f"quant-{qdtype}" and r["variant"] == "lib")
        for r in rows:
            if r["kind"] == f"quant-{qdtype}":
                r["vs_lib"] = round(lib_ms / r["ms"], 3)
    return rows


def expand_rows(name, n, k, dev, quick):
    g = torch.Generator(device=dev).manual_seed(n + k)
    w = torch.randn(n, k, device=dev, generator=g)
    q = quantize(w.reshape(n, 1, k), QuantSpec("int4", "group", 64, two_level=True))
    wb = int4_to_blocked(q.codes.reshape(n, -1), k)
    subs = q.scales.contiguous()
    ref = two.dequantize_weight(wb, subs, "int4b", 64, k, torch.int8)
    t_copy, _ = bench(lambda: ref.clone())
    rows = [{"case": name, "kind": "expand", "variant": "torch-clone-int8-result", "N": n, "K": k,
             "ms": round(t_copy, 5), "GBps": round(2 * n * k / t_copy / 1e6)}]

    def lib_cfg(bn, warps):
        out = torch.empty((n, k), dtype=torch.int8, device=dev)
        two._dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, 128))](
            wb, subs, out, n, k, wb.shape[1] * 2, 64, subs.shape[1], wb.stride(0), subs.stride(0), out.stride(0),
            FMT=0, W_GROUP=True, SCALED=False, INT_SUB=True, HALF_GROUPS=True, BN=bn, BKH=64, num_warps=warps)
        return out

    variants = {"lib": lambda: two.dequantize_weight(wb, subs, "int4b", 64, k, torch.int8)}
    for bn, warps in ((32, 4), (64, 4), (128, 8)) if not quick else ((64, 4),):
        variants[f"lib-bn{bn}-w{warps}"] = lambda bn=bn, warps=warps: lib_cfg(bn, warps)
    for vname, fn in variants.items():
        exact = torch.equal(fn(), ref)
        ms, timer = bench(fn)
        rows.append({"case": name, "kind": "expand", "variant": vname, "N": n, "K": k, "ms": round(ms, 5),
                     "exact": exact, "timer": timer, "GBps": round(1.5 * n * k / ms / 1e6)})
    lib_ms = next(r["ms"] for r in rows if r["kind"] == "expand" and r["variant"] == "lib")
    for r in rows:
        r.setdefault("vs_lib", round(lib_ms / r["ms"], 3))
    return rows


def main() -> None:
    args = gpu_script_args(__doc__, "quant_variants.py", lambda ap: ap.add_argument(
        "--quick", action="store_true", help="fewer configs of dmq's own kernels"))
    dev = torch.device("cuda")
    rows: list[dict] = []
    for name, m, k, n in SHAPES:
        if args.wanted and name not in args.wanted:
            continue
        new = quant_rows(name, m, k, dev, args.quick) + expand_rows(name, n, k, dev, args.quick)
        for r in new:
            print(f"{name:18s} {r['kind']:14s} {r['variant']:28s} {r['ms'] * 1e3:8.1f} us  {r['GBps']:5d} GB/s "
                  f"x{r.get('vs_lib') or 0:5.2f}  {'' if r.get('exact', True) else 'MISMATCH'}", flush=True)
        rows += new
        write_results(f"quant-variants-{slug(device_name())}", rows, Path(args.results_dir))
    print(f"wrote {write_results(f'quant-variants-{slug(device_name())}', rows, Path(args.results_dir))}")


if __name__ == "__main__":
    main()
