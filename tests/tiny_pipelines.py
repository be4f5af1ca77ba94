"""Tiny, randomly initialised but fully working diffusers pipelines for tests.

Everything here is built from configs in code and works offline (no hub access):
tokenizers are assembled from in-memory vocabularies, models are created from
small configs under ``torch.manual_seed(seed)`` and put in ``.eval()`` mode.

Denoiser widths are multiples of 64 (hidden sizes 64/128, attention inner dims
64/128) so that group-64 weight quantization applies to (almost) every Linear /
Conv layer of the denoiser.  VAEs are tiny (block_out_channels=(32, 64), so the
latent grid is image_size / 2) and are not meant to be quantized.

Public API::

    FAMILIES
    build_pipeline(family, seed=0) -> DiffusionPipeline
    get_denoiser(pipe) -> torch.nn.Module
    denoiser_inputs(pipe, family, timestep, batch=2, seed=0) -> dict
    denoiser_output(pipe, family, kwargs) -> torch.Tensor
    call_pipeline(pipe, family, seed=0, steps=2) -> torch.Tensor
"""

from __future__ import annotations

import functools
from typing import Any

import torch

FAMILIES = ("sd", "sdxl", "pixart", "sd3", "flux", "dit", "ddpm")

#: Pixel resolution used by :func:`call_pipeline` (square images).
IMAGE_SIZE = {
    "sd": 32,
    "sdxl": 32,
    "pixart": 32,
    "sd3": 32,
    "flux": 32,
    "dit": 32,  # fixed by transformer.config.sample_size (16) * VAE factor 2
    "ddpm": 32,  # pixel-space, fixed by unet.config.sample_size
}

#: VAE downsampling factor of every latent pipeline here (block_out_channels=(32, 64)).
VAE_SCALE_FACTOR = 2

#: Max length of the CLIP tokenizers (== CLIP max_position_embeddings).
CLIP_MAX_LENGTH = 77

#: T5 sequence length passed as ``max_sequence_length`` by :func:`call_pipeline`
#: and used for T5 embeddings in :func:`denoiser_inputs` (pipeline defaults are
#: 256-512, which would only make the tiny models slower).
T5_MAX_LENGTH = 32

PROMPT = "a photo of a red cat sitting on a wooden table"
DIT_LABELS = {0: "cat", 1: "dog", 2: "house", 3: "tree"}
DIT_CLASS_LABEL = 1

_CORPUS = (
    PROMPT
    + " an astronaut riding a horse on the moon, a painting of a blue dog in a garden,"
    " high quality detailed picture of mountains and a lake at sunset"
)


# --------------------------------------------------------------------------------------
# Tokenizers (built in code, cached per process)
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def clip_tokenizer():
    """Byte-level BPE ``CLIPTokenizer`` built from an in-memory vocab + merges list.

    Vocab: the 256 byte-level characters, the same with the ``</w>`` end-of-word
    suffix, one merged token per merge, and the two special tokens.  The merges are
    left-to-right chains over the words of a tiny corpus; since ranks from different
    words interleave, corpus words come out as a few sub-word pieces rather than
    always one token (e.g. "photo" -> "p", "ho", "t", "o</w>").  Unknown words fall
    back to byte characters, so any prompt tokenizes without ``<unk>`` (which, as
    in CLIP, is the ``<|endoftext|>`` eos/pad token).
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(tok, len(vocab))

    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    words = sorted({w.strip(",.").lower() for w in _CORPUS.split()} - {""})
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for nxt in symbols[1:]:
            pair = (cur, nxt)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)  # tokenizers>=0.20 BPE wants tuples, not "a b" strings
                vocab.setdefault(cur + nxt, len(vocab))
            cur = cur + nxt
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))

    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    assert tok.unk_token_id is not None
    return tok


@functools.lru_cache(maxsize=None)
def t5_tokenizer():
    """Unigram ``T5Tokenizer`` built from an in-memory list of ``(piece, score)`` pairs.

    Layout mirrors T5: ``<pad>=0, </s>=1, <unk>=2``, then ``▁`` + whole words of the
    tiny corpus + single characters (so unknown words split into characters).
    No ``<extra_id_*>`` sentinels (``extra_ids=0``).
    """
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    words = sorted({w.strip(",.").lower() for w in _CORPUS.split()} - {""})
    for w in words:
        p = "\u2581" + w
        if p not in seen:
            seen.add(p)
            pieces.append((p, -3.0 - 0.01 * len(pieces)))
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'-"
    for c in chars:
        for p in (c, "\u2581" + c):
            if p not in seen:
                seen.add(p)
                pieces.append((p, -8.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# --------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------

_CLIP_VOCAB = 1024
_T5_VOCAB = 256


def _clip_config(hidden: int = 64, projection_dim: int = 64):
    from transformers import CLIPTextConfig

    tok = clip_tokenizer()
    assert len(tok) <= _CLIP_VOCAB, len(tok)
    return CLIPTextConfig(
        vocab_size=_CLIP_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        # The pooled output is taken at the position of eos_token_id (unless it is
        # the legacy value 2), so the ids must match the tokenizer built above.
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _clip_text_model(with_projection: bool, hidden: int = 64, projection_dim: int = 64):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_config(hidden, projection_dim)).eval()


def _t5_encoder(d_model: int = 64):
    from transformers import T5Config, T5EncoderModel

    tok = t5_tokenizer()
    assert len(tok) <= _T5_VOCAB, len(tok)
    cfg = T5Config(
        vocab_size=_T5_VOCAB,
        d_model=d_model,
        d_kv=32,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 32,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return T5EncoderModel(cfg).eval()


# --------------------------------------------------------------------------------------
# VAEs
# --------------------------------------------------------------------------------------


def _vae(latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=32,
        **kw,
    ).eval()


def _flow_vae(scaling_factor: float, shift_factor: float):
    # SD3 / Flux style: 16 latent channels, no quant convs, scaling + shift factors.
    return _vae(
        latent_channels=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


# --------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------


def _build_sd():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE["sd"] // VAE_SCALE_FACTOR,  # 16x16 latents
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=2,  # (legacy naming: number of heads) -> head dim 32
        norm_num_groups=32,
    )
    vae = _vae()
    text_encoder = _clip_text_model(with_projection=False)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    text_encoder = _clip_text_model(with_projection=False, hidden=64)
    text_encoder_2 = _clip_text_model(with_projection=True, hidden=64, projection_dim=64)
    addition_time_embed_dim = 32
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE["sdxl"] // VAE_SCALE_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        attention_head_dim=(2, 4),  # head dim 32
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=64 + 64,  # concat of both CLIP penultimate hidden states
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        # 6 time ids * 32 + pooled text embeds (projection_dim 64) = 256
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + 64,
        norm_num_groups=32,
    )
    vae = _vae()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        sample_size=IMAGE_SIZE["pixart"] // VAE_SCALE_FACTOR,
        num_layers=2,
        patch_size=2,
        attention_head_dim=32,
        num_attention_heads=2,  # inner dim 64
        in_channels=4,
        out_channels=8,  # learned sigma (pipeline keeps the first 4 channels)
        cross_attention_dim=64,
        caption_channels=64,  # == T5 d_model
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    vae = _vae()
    text_encoder = _t5_encoder(d_model=64)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
    )
    return PixArtSigmaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def _build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE["sd3"] // VAE_SCALE_FACTOR,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,  # inner dim 64
        joint_attention_dim=128,  # == T5 d_model (>= 64 + 64 of the concatenated CLIPs)
        caption_projection_dim=64,  # must equal the inner dim
        pooled_projection_dim=128,  # concat of both CLIP projections (64 + 64)
        pos_embed_max_size=16,
    )
    text_encoder = _clip_text_model(with_projection=True, hidden=64, projection_dim=64)
    text_encoder_2 = _clip_text_model(with_projection=True, hidden=64, projection_dim=64)
    text_encoder_3 = _t5_encoder(d_model=128)
    vae = _flow_vae(scaling_factor=1.5305, shift_factor=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer(),
    )


def _build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=2,  # inner dim 64
        joint_attention_dim=64,  # == T5 d_model
        pooled_projection_dim=64,  # == CLIP hidden size (pooler output)
        guidance_embeds=True,  # FLUX.1-dev style distilled guidance
        axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim
    )
    text_encoder = _clip_text_model(with_projection=False, hidden=64)
    text_encoder_2 = _t5_encoder(d_model=64)
    vae = _flow_vae(scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )


def _build_dit():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        sample_size=IMAGE_SIZE["dit"] // VAE_SCALE_FACTOR,
        patch_size=2,
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,  # inner dim 64
        # DiTPipeline hard-codes the null class id 1000 for classifier-free guidance,
        # so the label embedding needs 1000 classes (+1 null row).
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    vae = _vae()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=dict(DIT_LABELS))


def _build_ddpm():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=IMAGE_SIZE["ddpm"],
        in_channels=3,
        out_channels=3,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=32,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    return DDPMPipeline(unet=unet, scheduler=scheduler)


_BUILDERS = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "pixart": _build_pixart,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "dit": _build_dit,
    "ddpm": _build_ddpm,
}


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_pipeline(family: str, seed: int = 0):
    """Build a tiny pipeline of ``family`` with weights drawn under ``torch.manual_seed(seed)``.

    All ``nn.Module`` components are in eval mode and the progress bar is disabled.
    The global RNG state is restored afterwards.
    """
    _check_family(family)
    # Tokenizers first, so that their (cached) construction never touches the RNG stream.
    if family in ("sd", "sdxl", "sd3", "flux"):
        clip_tokenizer()
    if family in ("pixart", "sd3", "flux"):
        t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[family]()
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
            comp.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def get_denoiser(pipe) -> torch.nn.Module:
    """The pipeline's denoiser: ``pipe.unet`` or ``pipe.transformer``."""
    den = getattr(pipe, "transformer", None)
    if den is None:
        den = getattr(pipe, "unet", None)
    if den is None:
        raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a unet")
    return den


# --------------------------------------------------------------------------------------
# Direct denoiser calls
# --------------------------------------------------------------------------------------


def _latent_hw(pipe, family: str) -> int:
    den = get_denoiser(pipe)
    if family == "ddpm":
        return den.config.sample_size
    if family == "dit":
        return den.config.sample_size
    return IMAGE_SIZE[family] // VAE_SCALE_FACTOR


def denoiser_inputs(pipe, family: str, timestep: float, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for a direct call of ``get_denoiser(pipe)``.

    Deterministic random tensors (``torch.Generator().manual_seed(seed)``) with the
    shapes the pipeline itself would pass at :data:`IMAGE_SIZE`.  ``timestep`` is in
    the scheduler's native range (0..1000); for Flux it is divided by 1000 here, as
    ``FluxPipeline`` does.
    """
    _check_family(family)
    den = get_denoiser(pipe)
    cfg = den.config
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    hw = _latent_hw(pipe, family)
    t = torch.full((batch,), float(timestep), dtype=torch.float32)

    if family in ("sd", "sdxl"):
        kw: dict[str, Any] = {
            "sample": randn(batch, cfg.in_channels, hw, hw),
            "timestep": t,
            "encoder_hidden_states": randn(batch, CLIP_MAX_LENGTH, cfg.cross_attention_dim),
        }
        if family == "sdxl":
            pooled_dim = pipe.text_encoder_2.config.projection_dim
            size = float(IMAGE_SIZE[family])
            time_ids = torch.tensor([size, size, 0.0, 0.0, size, size]).repeat(batch, 1)
            kw["added_cond_kwargs"] = {"text_embeds": randn(batch, pooled_dim), "time_ids": time_ids}
        return kw

    if family == "ddpm":
        return {"sample": randn(batch, cfg.in_channels, hw, hw), "timestep": t}

    if family == "pixart":
        return {
            "hidden_states": randn(batch, cfg.in_channels, hw, hw),
            "encoder_hidden_states": randn(batch, T5_MAX_LENGTH, cfg.caption_channels),
            "encoder_attention_mask": torch.ones(batch, T5_MAX_LENGTH, dtype=torch.long),
            "timestep": t,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    if family == "sd3":
        return {
            "hidden_states": randn(batch, cfg.in_channels, hw, hw),
            # CLIP tokens (zero-padded to the T5 width) concatenated with T5 tokens
            "encoder_hidden_states": randn(batch, CLIP_MAX_LENGTH + T5_MAX_LENGTH, cfg.joint_attention_dim),
            "pooled_projections": randn(batch, cfg.pooled_projection_dim),
            "timestep": t,
        }

    if family == "flux":
        lat = randn(batch, cfg.in_channels // 4, hw, hw)
        packed = pipe._pack_latents(lat, batch, cfg.in_channels // 4, hw, hw)
        kw = {
            "hidden_states": packed,
            "encoder_hidden_states": randn(batch, T5_MAX_LENGTH, cfg.joint_attention_dim),
            "pooled_projections": randn(batch, cfg.pooled_projection_dim),
            "timestep": t / 1000.0,
            "img_ids": pipe._prepare_latent_image_ids(batch, hw // 2, hw // 2, "cpu", torch.float32),
            "txt_ids": torch.zeros(T5_MAX_LENGTH, 3, dtype=torch.float32),
        }
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((batch,), 3.5, dtype=torch.float32)
        return kw

    if family == "dit":
        n_labels = len(DIT_LABELS)
        return {
            "hidden_states": randn(batch, cfg.in_channels, hw, hw),
            "timestep": t,
            "class_labels": torch.randint(0, n_labels, (batch,), generator=g),
        }

    raise AssertionError(family)  # unreachable


@torch.no_grad()
def denoiser_output(pipe, family: str, kwargs: dict[str, Any]) -> torch.Tensor:
    """Call the denoiser with ``kwargs`` and return its float output tensor."""
    _check_family(family)
    out = get_denoiser(pipe)(**kwargs, return_dict=False)
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif hasattr(out, "sample"):
        out = out.sample
    return out.float()


# --------------------------------------------------------------------------------------
# Full pipeline call
# --------------------------------------------------------------------------------------


@torch.no_grad()
def call_pipeline(pipe, family: str, seed: int = 0, steps: int = 2) -> torch.Tensor:
    """Run the full pipeline deterministically; returns images as float NCHW in [0, 1]."""
    _check_family(family)
    gen = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = {"num_inference_steps": steps, "generator": gen, "output_type": "pt"}
    size = IMAGE_SIZE[family]
    if family in ("sd", "sdxl", "pixart", "sd3", "flux"):
        kw.update(prompt=PROMPT, height=size, width=size)
    if family == "pixart":
        kw.update(use_resolution_binning=False, max_sequence_length=T5_MAX_LENGTH, clean_caption=False)
    elif family in ("sd3", "flux"):
        kw.update(max_sequence_length=T5_MAX_LENGTH)
    elif family == "dit":
        kw.update(class_labels=[DIT_CLASS_LABEL])
    elif family == "ddpm":
        kw.update(batch_size=1)
    out = pipe(**kw)
    images = out.images if hasattr(out, "images") else out[0]
    if not isinstance(images, torch.Tensor):
        import numpy as np

        images = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    return images.float()
