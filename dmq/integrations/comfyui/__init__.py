"""ComfyUI integration: a custom-node package (``comfyui_dmq/`` at the repository top, copied or linked into
``ComfyUI/custom_nodes/``) with the nodes DMQ Quantize Model, DMQ Save Quantized, DMQ Load Quantized and DMQ LoRA,
and the functions behind them (:mod:`dmq.integrations.comfyui.model`) over a role view of ComfyUI's own model
classes (:mod:`dmq.integrations.comfyui.roles`)."""

from dmq.integrations.comfyui.nodes import (
    NODE_CLASS_MAPPINGS,
    NODE_DISPLAY_NAME_MAPPINGS,
)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
