"""Shared by the benchmark scripts: the results-file schema (see ../shared/DESIGN.md) and its writer."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dmq.evaluation.runner import results_document

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TOP_LEVEL_KEYS = ("device", "versions", "command", "rows")
VERSION_KEYS = ("torch", "triton", "diffusers", "dmq")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def validate(doc: dict[str, Any]) -> None:
    """Raise ValueError unless ``doc`` follows the results schema."""
    if tuple(doc) != TOP_LEVEL_KEYS:
        raise ValueError(f"top-level keys must be {TOP_LEVEL_KEYS}, got {tuple(doc)}")
    if not isinstance(doc["device"], str) or not doc["device"]:
        raise ValueError("device must be a non-empty string")
    if set(doc["versions"]) != set(VERSION_KEYS):
        raise ValueError(f"versions must have keys {VERSION_KEYS}")
    if not isinstance(doc["command"], str) or not doc["command"]:
        raise ValueError("command must be the exact command line")
    rows = doc["rows"]
    if not isinstance(rows, list) or not rows:
        raise ValueError("rows must be a non-empty list")
    for row in rows:
        if not isinstance(row, dict) or "case" not in row or "variant" not in row:
            raise ValueError(f"each row is a flat dict with 'case' and 'variant': {row!r}")
        if any(isinstance(v, (dict, list)) for v in row.values()):
            raise ValueError(f"rows must be flat: {row!r}")


def write_results(name: str, rows: list[dict[str, Any]], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results/<name>.json`` with device, versions, the exact command line and the rows."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    doc = results_document(rows, " ".join(shlex.quote(a) for a in ["python", *sys.argv]), device)
    validate(doc)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def gpu_script_args(doc: str, script: str,
                    extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The command line of a GPU micro-benchmark: ``--cases`` (comma-separated names, parsed into the set
    ``args.wanted``; empty = all), ``--results-dir`` (default ``$DMQ_RESULTS_DIR`` or benchmarks/results) and what
    ``extra`` adds; exits with a message when no CUDA GPU is present."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--results-dir", default=os.environ.get("DMQ_RESULTS_DIR", str(RESULTS_DIR)))
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"benchmarks/{script} needs a CUDA GPU")
    args.wanted = set(filter(None, args.cases.split(",")))
    return args


@contextlib.contextmanager
def switched(module: Any, name: str, value: Any) -> Iterator[None]:
    """``module.name`` set to ``value`` inside the block (a kernel switch such as
    ``dmq.kernels.triton.gemm.PERSISTENT``), and back to what it was after it."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)
