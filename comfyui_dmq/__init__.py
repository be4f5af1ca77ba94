"""ComfyUI custom-node package of dmq: link or copy this folder into ``ComfyUI/custom_nodes/`` and pip-install dmq
(``dmq-diffusers``) into ComfyUI's Python."""

from dmq.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
