"""Markdown tables for the README, generated from benchmarks/results/*.json.

    python benchmarks/tables.py fidelity-2 calibration
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _pm(row: dict, key: str, digits: int) -> str:
    if key not in row or row[key] is None:
        return "—"
    return f"{row[key]:.{digits}f} ± {row.get(key + '_std', 0.0):.{digits}f}"


def fidelity_table(name: str) -> str:
    doc = json.loads((RESULTS / f"{name}.json").read_text())
    lines = [f"`{doc['command']}` on {doc['device']} (N = {doc['rows'][0]['N']} images per seed, "
             f"{doc['rows'][0]['seeds']} seeds; mean ± std over seeds)", "",
             "| model | variant | PSNR vs fp32 (dB) | SSIM vs fp32 | domain-FID | class accuracy | denoiser MB |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        mb = f"{r['bytes'] / 1e6:.2f}" if r.get("bytes") else "—"
        lines.append(f"| {r['case']} | {r['variant']} | {_pm(r, 'psnr', 2)} | {_pm(r, 'ssim', 3)} | "
                     f"{_pm(r, 'fid', 2)} | {_pm(r, 'accuracy', 3)} | {mb} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for n in sys.argv[1:] or ["fidelity-2"]:
        print(fidelity_table(n))
        print()
