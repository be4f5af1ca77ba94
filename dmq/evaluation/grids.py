"""Image grids: rows of images side by side in one PNG (e.g. 16-bit, quantized, |difference| × 4)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["save_grid", "difference"]


def difference(ref: torch.Tensor, img: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """``|ref - img| × gain`` clipped to [0, 1], same shape as the inputs ``(N, C, H, W)``."""
    return ((ref.float() - img.float()).abs() * gain).clamp(0, 1)


def save_grid(rows: list[torch.Tensor], path: str | Path, columns: int) -> None:
    """Save image rows (each ``(N, C, H, W)`` in [0, 1], C = 1 or 3, all of one size) as one PNG, ``columns``
    images per line (a row longer than that wraps), 1 px grey border around each image."""
    from PIL import Image

    tiles = []
    for row in rows:
        for start in range(0, len(row), columns):
            chunk = row[start:start + columns].float().cpu()
            if len(chunk) < columns:
                chunk = torch.cat([chunk, torch.zeros(columns - len(chunk), *chunk.shape[1:])])
            tiles.append(torch.cat([torch.nn.functional.pad(t, (1, 1, 1, 1), value=0.5) for t in chunk], dim=-1))
    grid = (torch.cat(tiles, dim=-2).clamp(0, 1) * 255).round().to(torch.uint8)
    array = grid[0].numpy() if grid.shape[0] == 1 else grid.permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
