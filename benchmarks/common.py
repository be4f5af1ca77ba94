"""Shared by the benchmark scripts: the results-file schema (see ../shared/DESIGN.md) and its writer."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

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
