"""Published configs of real diffusion denoisers, written out in code.

Nothing here downloads anything: each entry is the ``config.json`` of the
denoiser sub-folder of a public Hugging Face repository, transcribed as the
keyword arguments of the matching diffusers model class.  Only keys that the
class's ``__init__`` accepts are kept (``config.json`` files of older diffusers
releases carry a few extra legacy keys, e.g. PixArt's ``use_linear_projection``,
which diffusers ignores on load).

* :data:`MODEL_CONFIGS` — name -> (diffusers class name, config kwargs)
* :data:`EXPECTED_PARAMS` — published parameter counts of the denoisers
* :data:`RUNTIME_SHAPES` — how each denoiser is called by its pipeline at its
  native resolution (latent shape, text tokens, CFG batch doubling, ...)
* :func:`build_model` — instantiate a config (default on the ``meta`` device,
  i.e. without allocating weights)
* :func:`make_inputs` — random keyword arguments for one denoiser forward at
  the runtime shape

Example::

    from benchmarks.model_configs import build_model, make_inputs
    model = build_model("flux-dev", device="cuda")          # random weights
    out = model(**make_inputs("flux-dev", batch=1, device="cuda")).sample
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch

__all__ = [
    "MODEL_CONFIGS",
    "EXPECTED_PARAMS",
    "RUNTIME_SHAPES",
    "HF_REPOS",
    "DIFFUSERS_PARAMS",
    "published_param_count",
    "build_model",
    "make_inputs",
    "expected_output_shape",
    "count_params",
]

# --------------------------------------------------------------------------- #
# Configs
# --------------------------------------------------------------------------- #

# black-forest-labs/FLUX.1-dev, transformer/config.json
_FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,  # -> in_channels
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
_SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json
_PIXART_SIGMA = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 128,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
    "caption_channels": 4096,
    "attention_type": "default",
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
_SDXL = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "class_embed_type": None,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "num_class_embeds": None,
    "upcast_attention": False,  # published: null
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 * 256 time ids
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5 (formerly runwayml/...), unet/config.json
_SD15 = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # legacy name: this is the number of heads (8 heads)
}

# facebook/DiT-XL-2-256, transformer/config.json (published as the legacy
# Transformer2DModel class; diffusers maps it to DiTTransformer2DModel)
_DIT_XL_2 = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}

MODEL_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux-dev": ("FluxTransformer2DModel", _FLUX_DEV),
    "sd3-medium": ("SD3Transformer2DModel", _SD3_MEDIUM),
    "pixart-sigma": ("PixArtTransformer2DModel", _PIXART_SIGMA),
    "sdxl": ("UNet2DConditionModel", _SDXL),
    "sd15": ("UNet2DConditionModel", _SD15),
    "dit-xl-2": ("DiTTransformer2DModel", _DIT_XL_2),
}

HF_REPOS: dict[str, str] = {
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "pixart-sigma": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "dit-xl-2": "facebook/DiT-XL-2-256",
}

# Published (model card / paper) parameter counts of the denoiser alone.
# Compare with :func:`published_param_count`, not the raw module count: for
# DiT the diffusers module holds 28 copies of what the original shares.
EXPECTED_PARAMS: dict[str, float] = {
    "flux-dev": 11.9e9,
    "sd3-medium": 2.03e9,  # "2B" MMDiT
    "pixart-sigma": 0.61e9,  # "0.6B"
    "sdxl": 2.57e9,  # "2.6B" UNet
    "sd15": 0.86e9,  # "860M" UNet
    "dit-xl-2": 675e6,  # DiT paper, Table 1 (675M)
}

# Exact ``sum(p.numel() for p in model.parameters())`` of the diffusers module
# built by :func:`build_model` (diffusers 0.42).  These equal the sizes of the
# published checkpoints, except DiT: diffusers' ``ada_norm_zero`` blocks each
# own a timestep+class embedder (``transformer_blocks.i.norm1.emb``,
# 2,777,472 params) that the original DiT shares; the converted checkpoint
# stores the same weights 28 times, so the module has 27 x 2,777,472 =
# 74,991,744 more parameters than the 675M of the paper.
DIFFUSERS_PARAMS: dict[str, int] = {
    "flux-dev": 11_901_408_320,
    "sd3-medium": 2_028_328_000,
    "pixart-sigma": 610_856_096,
    "sdxl": 2_567_463_684,
    "sd15": 859_520_964,
    "dit-xl-2": 749_826_464,
}

# --------------------------------------------------------------------------- #
# Runtime shapes
# --------------------------------------------------------------------------- #
# ``latent_shape`` is the per-sample latent the VAE produces (C, H, W) at
# ``resolution``; ``model_input_shape`` is the per-sample ``hidden_states`` the
# denoiser receives (FLUX packs 2x2 latent patches into tokens in the pipeline).
# ``cfg`` means the pipeline concatenates unconditional + conditional inputs,
# so the denoiser batch is 2 x images.  ``image_tokens`` is the transformer
# sequence length of the image stream (UNets: None).

RUNTIME_SHAPES: dict[str, dict[str, Any]] = {
    "flux-dev": {
        "resolution": (1024, 1024),
        "vae_scale_factor": 8,
        "latent_shape": (16, 128, 128),
        "model_input_shape": (4096, 64),  # packed: (128/2)*(128/2) tokens x 16*2*2
        "output_shape": (4096, 64),
        "image_tokens": 4096,
        "text_tokens": 512,  # T5-XXL, max_sequence_length=512
        "text_dim": 4096,
        "pooled_dim": 768,  # CLIP-L pooled
        "cfg": False,  # guidance-distilled: guidance scale is an embedding input
        "guidance_scale": 3.5,
        "num_inference_steps": 50,
    },
    "sd3-medium": {
        "resolution": (1024, 1024),
        "vae_scale_factor": 8,
        "latent_shape": (16, 128, 128),
        "model_input_shape": (16, 128, 128),
        "output_shape": (16, 128, 128),
        "image_tokens": 4096,
        "text_tokens": 333,  # 77 (CLIP-L ++ CLIP-G) + 256 (T5, max_sequence_length=256)
        "text_dim": 4096,
        "pooled_dim": 2048,  # CLIP-L 768 ++ CLIP-G 1280
        "cfg": True,
        "guidance_scale": 7.0,
        "num_inference_steps": 28,
    },
    "pixart-sigma": {
        "resolution": (1024, 1024),
        "vae_scale_factor": 8,
        "latent_shape": (4, 128, 128),
        "model_input_shape": (4, 128, 128),
        "output_shape": (8, 128, 128),  # learned sigma: pipeline keeps first 4 channels
        "image_tokens": 4096,
        "text_tokens": 300,  # T5-XXL, max_sequence_length=300
        "text_dim": 4096,
        "pooled_dim": None,
        "cfg": True,
        "guidance_scale": 4.5,
        "num_inference_steps": 20,
    },
    "sdxl": {
        "resolution": (1024, 1024),
        "vae_scale_factor": 8,
        "latent_shape": (4, 128, 128),
        "model_input_shape": (4, 128, 128),
        "output_shape": (4, 128, 128),
        "image_tokens": None,
        "text_tokens": 77,
        "text_dim": 2048,  # CLIP-L 768 ++ OpenCLIP-bigG 1280
        "pooled_dim": 1280,  # added_cond_kwargs["text_embeds"]
        "time_ids_dim": 6,  # added_cond_kwargs["time_ids"]
        "cfg": True,
        "guidance_scale": 5.0,
        "num_inference_steps": 50,
    },
    "sd15": {
        "resolution": (512, 512),
        "vae_scale_factor": 8,
        "latent_shape": (4, 64, 64),
        "model_input_shape": (4, 64, 64),
        "output_shape": (4, 64, 64),
        "image_tokens": None,
        "text_tokens": 77,
        "text_dim": 768,
        "pooled_dim": None,
        "cfg": True,
        "guidance_scale": 7.5,
        "num_inference_steps": 50,
    },
    "dit-xl-2": {
        "resolution": (256, 256),
        "vae_scale_factor": 8,
        "latent_shape": (4, 32, 32),
        "model_input_shape": (4, 32, 32),
        "output_shape": (8, 32, 32),  # learned sigma
        "image_tokens": 256,
        "text_tokens": None,  # class-conditional (ImageNet label; 1000 = null class)
        "text_dim": None,
        "pooled_dim": None,
        "num_classes": 1000,
        "cfg": True,  # DiTPipeline default guidance_scale=4.0 appends null-class batch
        "guidance_scale": 4.0,
        "num_inference_steps": 50,
    },
}


# --------------------------------------------------------------------------- #
# Building
# --------------------------------------------------------------------------- #


def _resolve_class(class_name: str):
    import diffusers

    return getattr(diffusers, class_name)


def build_model(
    name: str,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.bfloat16,
) -> torch.nn.Module:
    """Instantiate the denoiser ``name`` from its published config.

    The model is created under ``torch.device(device)`` with ``dtype`` as the
    default dtype, so on ``"meta"`` (the default) no weight memory is
    allocated; on a real device the weights are random (diffusers' init).
    All parameters get ``dtype``; the fixed sin-cos position-embedding buffers
    of SD3 / PixArt / DiT stay float32, as they do after
    ``from_pretrained(..., torch_dtype=torch.bfloat16)`` (they are not in the
    checkpoint).  The default dtype is restored afterwards, also on error.
    Returns the model in eval mode.
    """
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODEL_CONFIGS)}")
    class_name, config = MODEL_CONFIGS[name]
    cls = _resolve_class(class_name)
    device = torch.device(device)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(**copy.deepcopy(config))
    finally:
        torch.set_default_dtype(previous)
    # Safety net for anything a constructor creates on an explicit device
    # (a no-op in diffusers 0.42, where everything follows the device context).
    model.to(device=device)
    return model.eval()


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (works on meta tensors)."""
    return sum(p.numel() for p in model.parameters())


_DIT_BLOCK_EMB = re.compile(r"^transformer_blocks\.(\d+)\.norm1\.emb\.")


def published_param_count(name: str, model: torch.nn.Module) -> int:
    """Parameter count comparable with :data:`EXPECTED_PARAMS`.

    Same as :func:`count_params` except for DiT, where the per-block copies of
    the timestep/class embedder beyond the first are not counted (the original
    model shares one).  The original DiT also counts its frozen sin-cos
    ``pos_embed`` (256 x 1152 = 294,912) as a parameter; diffusers keeps it as
    a buffer, and it is not added here (0.04% of 675M).
    """
    if MODEL_CONFIGS[name][1].get("norm_type") != "ada_norm_zero":
        return count_params(model)
    total = 0
    for pname, p in model.named_parameters():
        m = _DIT_BLOCK_EMB.match(pname)
        if m is not None and int(m.group(1)) > 0:
            continue
        total += p.numel()
    return total


# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #


def _denoiser_batch(name: str, batch: int, cfg: bool | None) -> int:
    use_cfg = RUNTIME_SHAPES[name]["cfg"] if cfg is None else cfg
    return batch * 2 if use_cfg else batch


def expected_output_shape(name: str, batch: int = 1, cfg: bool | None = None) -> tuple[int, ...]:
    """Shape of ``model(**make_inputs(name, batch)).sample``."""
    b = _denoiser_batch(name, batch, cfg)
    return (b, *RUNTIME_SHAPES[name]["output_shape"])


def make_inputs(
    name: str,
    batch: int = 1,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    cfg: bool | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Random keyword arguments for one denoiser forward at the runtime shape.

    ``batch`` is the number of images; where the pipeline uses classifier-free
    guidance (``RUNTIME_SHAPES[name]["cfg"]``, overridable with ``cfg``) the
    denoiser batch is ``2 * batch``, as in the real pipeline.  Returns a dict
    suitable for ``model(**inputs)`` (``return_dict`` is left at its default,
    so the output is ``out.sample``).
    """
    if name not in RUNTIME_SHAPES:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(RUNTIME_SHAPES)}")
    rs = RUNTIME_SHAPES[name]
    b = _denoiser_batch(name, batch, cfg)
    device = torch.device(device)
    if device.type == "meta":
        generator = None

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt, generator=generator)

    def timesteps_int():
        # discrete-time schedulers: integer timesteps in [0, 1000)
        return torch.randint(0, 1000, (b,), device=device, dtype=torch.long, generator=generator)

    if name == "flux-dev":
        n_img, c = rs["model_input_shape"]
        n_txt = rs["text_tokens"]
        h = w = rs["latent_shape"][1] // 2
        img_ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
        img_ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
        img_ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
        return {
            "hidden_states": randn(b, n_img, c),
            "encoder_hidden_states": randn(b, n_txt, rs["text_dim"]),
            "pooled_projections": randn(b, rs["pooled_dim"]),
            # FluxPipeline passes t / 1000 in [0, 1]; the model scales by 1000
            "timestep": torch.full((b,), 0.5, device=device, dtype=dtype),
            "img_ids": img_ids.reshape(n_img, 3),
            "txt_ids": torch.zeros(n_txt, 3, device=device, dtype=dtype),
            "guidance": torch.full((b,), rs["guidance_scale"], device=device, dtype=torch.float32),
        }
    if name == "sd3-medium":
        return {
            "hidden_states": randn(b, *rs["model_input_shape"]),
            "encoder_hidden_states": randn(b, rs["text_tokens"], rs["text_dim"]),
            "pooled_projections": randn(b, rs["pooled_dim"]),
            # FlowMatchEulerDiscreteScheduler timesteps: sigma * 1000 (float32)
            "timestep": torch.full((b,), 500.0, device=device, dtype=torch.float32),
        }
    if name == "pixart-sigma":
        return {
            "hidden_states": randn(b, *rs["model_input_shape"]),
            "encoder_hidden_states": randn(b, rs["text_tokens"], rs["text_dim"]),
            "encoder_attention_mask": torch.ones(b, rs["text_tokens"], device=device, dtype=torch.long),
            "timestep": timesteps_int(),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    if name == "sdxl":
        height, width = rs["resolution"]
        # (original_size, crops_coords_top_left, target_size)
        time_ids = torch.tensor(
            [height, width, 0, 0, height, width], device=device, dtype=dtype
        ).repeat(b, 1)
        return {
            "sample": randn(b, *rs["model_input_shape"]),
            "timestep": timesteps_int(),
            "encoder_hidden_states": randn(b, rs["text_tokens"], rs["text_dim"]),
            "added_cond_kwargs": {"text_embeds": randn(b, rs["pooled_dim"]), "time_ids": time_ids},
        }
    if name == "sd15":
        return {
            "sample": randn(b, *rs["model_input_shape"]),
            "timestep": timesteps_int(),
            "encoder_hidden_states": randn(b, rs["text_tokens"], rs["text_dim"]),
        }
    if name == "dit-xl-2":
        labels = torch.randint(
            0, rs["num_classes"], (b,), device=device, dtype=torch.long, generator=generator
        )
        if b != batch:  # CFG: second half is the null class, as in DiTPipeline
            labels[batch:] = rs["num_classes"]
        return {
            "hidden_states": randn(b, *rs["model_input_shape"]),
            "timestep": timesteps_int(),
            "class_labels": labels,
        }
    raise KeyError(name)  # pragma: no cover
