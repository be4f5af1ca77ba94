"""Role view of ComfyUI's own denoiser classes (its ``comfy.ldm`` modules, not diffusers').

ComfyUI's U-Net (``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``, used for SD1.x, SD2 and SDXL) names
its layers after the original LDM code: ``input_blocks.0.0`` is the first convolution, ``out.2`` the last,
``time_embed`` / ``label_emb`` the time path (``label_emb``: SDXL's pooled text and size conditioning), each
ResBlock's ``emb_layers.1`` projects the time embedding, and every ResBlock of ``output_blocks`` reads
``cat([hidden, skip])`` through ``in_layers.2`` (and ``skip_connection``). The choices are the same as for diffusers'
U-Net in :mod:`dmq.pipelines.roles`; only the names differ. Its layers come from ``comfy.ops`` (subclasses of
``nn.Linear`` / ``nn.Conv2d``), which dmq quantizes like the torch classes.
"""

from __future__ import annotations

from torch import nn

from dmq.errors import UnsupportedPipelineError
from dmq.pipelines.roles import ArchRoles, ConcatPoint

__all__ = ["comfy_roles_for", "comfy_supported_classes"]

_TIME_PATH = "time path (depends only on t: kept 16-bit)"
_UNET_KEEP = {
    "input_blocks.0.0": "first convolution (few input channels; kept 16-bit as in Q-Diffusion)",
    "out.2": "last convolution (writes the prediction; kept 16-bit as in Q-Diffusion)",
    "time_embed*": _TIME_PATH,
    "label_emb*": _TIME_PATH + " and pooled text / size conditioning (SDXL)",
    "*.emb_layers.1": _TIME_PATH,
}
_UNET_TIME_PATH = ("time_embed", "label_emb", "*.emb_layers")


def _unet_concat_points(model: nn.Module) -> tuple[ConcatPoint, ...]:
    """The first module of every output block is a ResBlock reading ``cat([hidden, skip])``; the hidden part has
    the channels of what ran before it (the middle block's output, then each output block's ResBlock output)."""
    points = []
    prev = model.middle_block[-1].out_channels
    for b, block in enumerate(model.output_blocks):
        res = block[0]
        consumers = [f"output_blocks.{b}.0.in_layers.2"]
        if isinstance(res.skip_connection, nn.Conv2d):
            consumers.append(f"output_blocks.{b}.0.skip_connection")
        points.append(ConcatPoint(f"output_blocks.{b}.0", prev, res.channels, tuple(consumers)))
        prev = res.out_channels
    return tuple(points)


def _unet(model: nn.Module) -> ArchRoles:
    family = "sdxl" if getattr(model, "num_classes", None) is not None else "sd"
    return ArchRoles(family, dict(_UNET_KEEP), (), _UNET_TIME_PATH, _unet_concat_points(model))


_ROLE_BUILDERS = {"comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel": _unet}


def comfy_supported_classes() -> tuple[str, ...]:
    """Qualified names of the ComfyUI denoiser classes dmq has a role view of."""
    return tuple(_ROLE_BUILDERS)


def comfy_roles_for(model: nn.Module) -> ArchRoles:
    """The role view of a ComfyUI diffusion model (``BaseModel.diffusion_model``); UnsupportedPipelineError for a
    class dmq has no view of."""
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    builder = _ROLE_BUILDERS.get(cls)
    if builder is None:
        raise UnsupportedPipelineError(f"dmq has no role view of ComfyUI's {cls}; supported: "
                                       f"{', '.join(_ROLE_BUILDERS)}")
    return builder(model)
