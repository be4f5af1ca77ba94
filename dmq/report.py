"""``pipe.dmq_report``: what was quantized with which format, what stayed 16-bit and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerEntry", "QuantReport"]


@dataclass(frozen=True)
class LayerEntry:
    """One GEMM layer of a quantized component. action: ``"quantized"``, ``"weight-only"`` or ``"kept"``."""

    component: str
    name: str
    module_type: str
    action: str
    format: str
    reason: str
    fp_bytes: int
    q_bytes: int


@dataclass
class QuantReport:
    """The report attached to a quantized pipeline as ``pipe.dmq_report``."""

    config: dict[str, Any]
    entries: list[LayerEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def by_action(self, action: str) -> list[LayerEntry]:
        return [e for e in self.entries if e.action == action]

    @property
    def num_quantized(self) -> int:
        return sum(e.action != "kept" for e in self.entries)

    def bytes_ratio(self) -> float:
        """Bytes of all reported layers after quantization / before (kept layers count as they are)."""
        before = sum(e.fp_bytes for e in self.entries)
        after = sum(e.q_bytes for e in self.entries)
        return after / before if before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "entries": [asdict(e) for e in self.entries], "notes": list(self.notes)}

    def __str__(self) -> str:
        lines = [f"dmq report — preset {self.config.get('name')!r}"]
        for action in ("quantized", "weight-only"):
            fmt = Counter(e.format for e in self.by_action(action))
            if fmt:
                lines.append(f"  {action}: " + ", ".join(f"{n} × {f}" for f, n in fmt.items()))
        kept = Counter(e.reason for e in self.by_action("kept"))
        for reason, n in kept.items():
            lines.append(f"  kept 16-bit ({n}): {reason}")
        lines.append(f"  GEMM-layer bytes after/before: {self.bytes_ratio():.3f}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)
