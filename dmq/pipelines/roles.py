"""Role views of the denoiser architectures dmq supports.

A role view says, for one model class, which GEMM layers stay 16-bit by default (and why), which linears are the
per-block modulation (adaLN) role, which modules form the time path (inputs that depend only on the timestep, plus
pooled text or class where the family mixes them in), and where U-Net skip concatenations enter the next ResNet.
Methods and ``quantize_pipeline`` work on roles and never on class names.

Default choices follow SVDQuant (keep embedders, the patch embedding and the final projection 16-bit; modulation
linears weight-only) and Q-Diffusion/TFMQ-DM (keep the first and last convolution and the time path 16-bit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from dmq.errors import UnsupportedPipelineError

__all__ = ["ArchRoles", "ConcatPoint", "roles_for", "supported_classes", "matches_any"]

_TIME_PATH = "time path (depends only on t: kept 16-bit, served by the temporal cache)"


def matches_any(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether a module name matches one of the shell-style patterns (case-sensitive)."""
    return any(fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class ConcatPoint:
    """A ResNet whose input is ``cat([hidden, skip], dim=1)``: channels ``[0, split)`` come from the hidden state,
    ``[split, C)`` from the skip connection. ``consumers`` are the layers that read that concatenation."""

    resnet: str
    split: int
    channels: int
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class ArchRoles:
    """The role view of one architecture: name patterns (``fnmatch``) over ``named_modules()``."""

    family: str
    keep: dict[str, str] = field(default_factory=dict)
    modulation: tuple[str, ...] = ()
    time_path: tuple[str, ...] = ()
    concat_points: tuple[ConcatPoint, ...] = ()

    def role_of(self, name: str) -> tuple[str, str]:
        """``("keep", reason)``, ``("modulation", "")`` or ``("main", "")`` for a module name."""
        for pattern, reason in self.keep.items():
            if fnmatchcase(name, pattern):
                return "keep", reason
        if matches_any(name, self.modulation):
            return "modulation", ""
        return "main", ""


_UNET_KEEP = {
    "conv_in": "first convolution (few input channels; kept 16-bit as in Q-Diffusion)",
    "conv_out": "last convolution (writes the prediction; kept 16-bit as in Q-Diffusion)",
    "time_embedding*": _TIME_PATH,
    "add_embedding*": _TIME_PATH,
    "class_embedding*": "class-label embedding (conditioning path)",
    "encoder_hid_proj*": "text embedding projection (conditioning path)",
    "*time_emb_proj": _TIME_PATH,
}
_UNET_TIME_PATH = ("time_proj", "time_embedding", "add_time_proj", "add_embedding", "*.time_emb_proj")

_DIT_LIKE_KEEP = {
    "pos_embed*": "patch embedding (kept 16-bit as in SVDQuant)",
    "proj_out": "final projection to the prediction (kept 16-bit as in SVDQuant)",
}


def _unet_concat_points(model: nn.Module) -> tuple[ConcatPoint, ...]:
    """Every up-block ResNet reads ``cat([hidden, skip])``; the hidden part has the channels of what ran before it
    (the mid block's output for the first ResNet of the first up block, else the previous ResNet's output)."""
    points = []
    prev_channels = model.config.block_out_channels[-1]
    for b, block in enumerate(model.up_blocks):
        for r, resnet in enumerate(block.resnets):
            channels = resnet.conv1.in_channels
            consumers = [f"up_blocks.{b}.resnets.{r}.conv1"]
            if getattr(resnet, "conv_shortcut", None) is not None:
                consumers.append(f"up_blocks.{b}.resnets.{r}.conv_shortcut")
            points.append(ConcatPoint(f"up_blocks.{b}.resnets.{r}", prev_channels, channels, tuple(consumers)))
            prev_channels = resnet.conv2.out_channels
    return tuple(points)


def _unet2d_condition(model: nn.Module) -> ArchRoles:
    family = "sdxl" if model.config.addition_embed_type == "text_time" else "sd"
    return ArchRoles(family, dict(_UNET_KEEP), (), _UNET_TIME_PATH, _unet_concat_points(model))


def _unet2d(model: nn.Module) -> ArchRoles:
    return ArchRoles("ddpm", dict(_UNET_KEEP), (), _UNET_TIME_PATH, _unet_concat_points(model))


def _pixart(model: nn.Module) -> ArchRoles:
    keep = {**_DIT_LIKE_KEEP,
            "adaln_single*": _TIME_PATH,
            "caption_projection*": "caption projection (text conditioning path)"}
    return ArchRoles("pixart", keep, (), ("adaln_single",))


def _sd3(model: nn.Module) -> ArchRoles:
    keep = {**_DIT_LIKE_KEEP,
            "time_text_embed*": _TIME_PATH + " and pooled text",
            "context_embedder": "text input projection (kept 16-bit as in SVDQuant)"}
    modulation = ("*.norm1.linear", "*.norm1_context.linear", "norm_out.linear")
    return ArchRoles("sd3", keep, modulation, ("time_text_embed",) + modulation)


def _flux(model: nn.Module) -> ArchRoles:
    keep = {**_DIT_LIKE_KEEP,
            "x_embedder": "image input projection (kept 16-bit as in SVDQuant)",
            "context_embedder": "text input projection (kept 16-bit as in SVDQuant)",
            "time_text_embed*": _TIME_PATH + ", guidance and pooled text"}
    modulation = ("*.norm1.linear", "*.norm1_context.linear", "single_transformer_blocks.*.norm.linear",
                  "norm_out.linear")
    return ArchRoles("flux", keep, modulation, ("time_text_embed",) + modulation)


def _dit(model: nn.Module) -> ArchRoles:
    keep = {"pos_embed*": _DIT_LIKE_KEEP["pos_embed*"],
            "*norm1.emb*": _TIME_PATH + " and class label",
            "proj_out_2": "final projection to the prediction (kept 16-bit as in SVDQuant)"}
    modulation = ("*.norm1.linear", "proj_out_1")
    return ArchRoles("dit", keep, modulation, ("transformer_blocks.*.norm1.emb",) + modulation)


_ROLE_BUILDERS = {
    "UNet2DConditionModel": _unet2d_condition,
    "UNet2DModel": _unet2d,
    "PixArtTransformer2DModel": _pixart,
    "SD3Transformer2DModel": _sd3,
    "FluxTransformer2DModel": _flux,
    "DiTTransformer2DModel": _dit,
}


def supported_classes() -> tuple[str, ...]:
    return tuple(_ROLE_BUILDERS)


def roles_for(model: nn.Module) -> ArchRoles:
    """The role view of a denoiser; UnsupportedPipelineError for a class dmq has no view of."""
    cls = type(model).__name__
    try:
        return _ROLE_BUILDERS[cls](model)
    except KeyError:
        raise UnsupportedPipelineError(
            f"dmq has no role view of {cls}; supported denoisers: {', '.join(_ROLE_BUILDERS)}") from None
