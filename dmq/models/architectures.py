"""Architectures of dmq's bundled digits models: the single source of truth for their configs, and builders.

Three models, all on 32x32 single-channel digits (see :mod:`dmq.models.data`):

* ``digits-unet``: diffusers ``UNet2DModel``, unconditional, epsilon-prediction DDPM. Widths (64, 128, 256),
  attention at 16x16 (128 ch) and 8x8 (256 ch), skip concatenations, no mid block (8.4M parameters: a 256-wide
  mid block alone would add 2.8M).
* ``digits-dit``: diffusers ``DiTTransformer2DModel``, class-conditional (10 digits + the null class 10 for
  classifier-free guidance), 6 layers of width 256 (4 heads x 64), patch 2, adaLN-Zero (8.0M parameters).
* ``digits-classifier``: a small plain-torch CNN, used to classify generated digits and, through its penultimate
  layer, as the feature extractor of an FID (:meth:`DigitClassifier.feature_extractor`).

Weights are stored as safetensors of at most ``MAX_WEIGHTS_BYTES``: in float32 where that fits, else in float16
(both diffusion models), and loaded in float32 unless asked otherwise.

Two quirks of diffusers that the builders here take care of:

* Every DiT block carries its own ``CombinedTimestepLabelEmbeddings`` whose ``LabelEmbedding`` drops labels
  *independently per block* while training (``class_dropout_prob=0.1``, not a config field). That is no
  classifier-free-guidance training: the null class would rarely be seen by all blocks at once. :func:`build_model`
  switches that off and the training loop drops labels itself, the same for every block.
* ``DiTPipeline`` hard-codes the null class as 1000 (ImageNet), which indexes past a 10-class label table.
  :class:`DigitsDiTPipeline` maps it to this model's null class (``num_embeds_ada_norm``, i.e. 10).

And one of pixel-space sampling: with the cosine schedule alpha_bar(999) is ~2e-9, so the samplers must clip the
predicted x0 to [-1, 1] (DDIM ``clip_sample``, DPM-Solver ``thresholding`` with ``sample_max_value=1``); without
it a trained DiT gave noise-independent saturated stripes (classifier accuracy 10%, against 95% with it).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES

logger = logging.getLogger(__name__)

UNET = "digits-unet"
DIT = "digits-dit"
CLASSIFIER = "digits-classifier"
NAMES = (UNET, DIT, CLASSIFIER)
ALIASES = {"unet": UNET, "dit": DIT, "classifier": CLASSIFIER}

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SCHEDULER_FILE = "scheduler_config.json"
MAX_WEIGHTS_BYTES = 20_000_000
"""Largest weights file committed to the repository; bigger models are stored in float16."""

ID2LABEL = {i: str(i) for i in range(NUM_CLASSES)}
NUM_TRAIN_TIMESTEPS = 1000

# --------------------------------------------------------------------------------------------------------------
# Configs (the single source of truth)
# --------------------------------------------------------------------------------------------------------------

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (64, 128, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": None,
    "attention_head_dim": 64,
    "norm_num_groups": 32,
    "dropout": 0.0,
}

DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 64,  # inner width 4 x 64 = 256
    "in_channels": 1,
    "out_channels": 1,  # epsilon only (no learned sigma)
    "num_layers": 6,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,  # class ids 0..9, null class = 10
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
    "dropout": 0.0,
}

CLASSIFIER_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "image_size": IMAGE_SIZE,
    "channels": (32, 64, 128),
    "feature_dim": 128,
    "num_classes": NUM_CLASSES,
    "dropout": 0.2,
}

# Training noise schedule: cosine ("squaredcos_cap_v2") suits small images better than the linear one.
TRAIN_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
}

UNET_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
}

DIT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "lower_order_final": True,
    "timestep_spacing": "trailing",
    # Clip the predicted x0 to [-1, 1] (dynamic thresholding capped at 1, i.e. DDIM's clip_sample). Without it
    # the first step, at alpha_bar(999) ~ 2e-9, amplifies any error of the predicted noise ~2e4-fold into x0
    # and the samples come out as saturated, noise-independent patterns.
    "thresholding": True,
    "sample_max_value": 1.0,
}


@dataclass(frozen=True)
class TrainDefaults:
    """Defaults of ``python -m dmq.models.train`` for one model (each can be overridden on the command line)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.0
    ema_decay: float | None = None
    grad_clip: float = 1.0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    label_dropout: float = 0.0
    augment: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "unet" | "dit" | "classifier"
    description: str
    config: dict[str, Any]
    train: TrainDefaults
    scheduler_class: str | None = None
    scheduler_config: dict[str, Any] | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None


SPECS: dict[str, ModelSpec] = {
    UNET: ModelSpec(
        name=UNET,
        kind="unet",
        description=(
            "unconditional 32x32 digits DDPM, UNet2DModel (64,128,256) with attention; DDPMPipeline, DDIM 50 steps"
        ),
        config=UNET_CONFIG,
        train=TrainDefaults(
            steps=3000, batch_size=512, lr=4e-4, warmup_steps=250, ema_decay=0.999, augment={"p": 0.5}
        ),
        scheduler_class="DDIMScheduler",
        scheduler_config=UNET_SCHEDULER_CONFIG,
        num_inference_steps=50,
    ),
    DIT: ModelSpec(
        name=DIT,
        kind="dit",
        description=(
            "class-conditional 32x32 digits DiT (6 layers, width 256, patch 2); DiTPipeline, DPM-Solver++ 25 steps, "
            "CFG 4"
        ),
        config=DIT_CONFIG,
        train=TrainDefaults(
            steps=3500,
            batch_size=512,
            lr=4e-4,
            warmup_steps=500,
            ema_decay=0.999,
            label_dropout=0.1,
            augment={"p": 0.5},
        ),
        scheduler_class="DPMSolverMultistepScheduler",
        scheduler_config=DIT_SCHEDULER_CONFIG,
        num_inference_steps=25,
        guidance_scale=4.0,
    ),
    CLASSIFIER: ModelSpec(
        name=CLASSIFIER,
        kind="classifier",
        description=(
            "digit classifier CNN on 32x32 digits; its 128-d penultimate features serve as an FID feature extractor"
        ),
        config=CLASSIFIER_CONFIG,
        train=TrainDefaults(
            steps=1500,
            batch_size=256,
            lr=2e-3,
            warmup_steps=100,
            weight_decay=0.05,
            min_lr_ratio=0.01,
            augment={"p": 0.9, "max_shift": 2.5 / 32, "max_rotation_deg": 12.0, "scale_range": (0.88, 1.12)},
        ),
    ),
}


def canonical_name(name: str) -> str:
    """``"digits-unet"`` for ``"digits-unet"`` or ``"unet"``; ``ValueError`` naming the choices otherwise."""
    key = ALIASES.get(name, name)
    if key not in SPECS:
        raise ValueError(f"unknown dmq model {name!r}; available: {', '.join(NAMES)}")
    return key


def spec(name: str) -> ModelSpec:
    return SPECS[canonical_name(name)]


def storage_dtype(num_params: int) -> torch.dtype:
    """float32 if the weights fit in ``MAX_WEIGHTS_BYTES`` that way, else float16."""
    return torch.float32 if num_params * 4 + 65_536 <= MAX_WEIGHTS_BYTES else torch.float16


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """Small CNN digit classifier.

    Takes images in **[0, 1]** (what the pipelines return with ``output_type="pt"``), shape ``(N, C, H, W)`` with
    ``C`` 1 or 3 (averaged to grey) and any size (resized to ``image_size``); uint8 images in [0, 255] work too.
    ``forward`` gives logits ``(N, 10)``, :meth:`features` the ``(N, feature_dim)`` penultimate features.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = IMAGE_SIZE,
        channels: tuple[int, ...] = (32, 64, 128),
        feature_dim: int = 128,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "image_size": image_size,
            "channels": tuple(channels),
            "feature_dim": feature_dim,
            "num_classes": num_classes,
            "dropout": dropout,
        }
        self.image_size = image_size
        self.num_features = feature_dim
        layers: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            layers += [
                nn.Conv2d(prev, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            prev = c
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images as described in the class docstring to the network's input: float ``(N, 1, S, S)`` in [-1, 1]."""
        if images.dim() == 3:
            images = images[:, None]
        ref = self.fc.weight
        if images.dtype == torch.uint8:
            images = images.to(ref.device, torch.float32) / 255.0
        images = images.to(ref.device, ref.dtype)
        if images.shape[1] != 1:
            images = images.mean(dim=1, keepdim=True)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return images * 2.0 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h = self.body(self.prepare(images))
        h = h.mean(dim=(2, 3))
        return F.relu(self.fc(h))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit ``(N,)`` (in eval mode)."""
        was_training = self.training
        self.eval()
        try:
            return self(images).argmax(dim=1)
        finally:
            self.train(was_training)

    def feature_extractor(self) -> DigitFeatureExtractor:
        """A module returning the ``(N, feature_dim)`` features, for ``FrechetInceptionDistance(feature=...)``."""
        return DigitFeatureExtractor(self)


class DigitFeatureExtractor(nn.Module):
    """Penultimate features of a :class:`DigitClassifier`; stays in eval mode whatever ``train()`` is called with.

    Use with torchmetrics as ``FrechetInceptionDistance(feature=clf.feature_extractor(), normalize=True)`` and
    feed it images in [0, 1] (float) or uint8.
    """

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> DigitFeatureExtractor:  # noqa: ARG002 - always eval
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


# --------------------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------------------


class IdentityVAE(ModelMixin, ConfigMixin):
    """Stands in for ``DiTPipeline``'s VAE: the digits DiT works in pixel space, so decoding is the identity."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, scaling_factor: float = 1.0, latent_channels: int = 1):
        super().__init__()
        # a buffer so that dtype / device queries on this parameterless module have an answer
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def encode(self, sample: torch.Tensor, return_dict: bool = True):
        return sample * self.config.scaling_factor

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        if not return_dict:
            return (z,)
        return DecoderOutput(sample=z)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return sample


class DigitsDDPMPipeline(DDPMPipeline):
    """``DDPMPipeline`` whose default step count suits its (DDIM) scheduler instead of DDPM's 1000."""

    default_num_inference_steps = SPECS[UNET].num_inference_steps

    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ):
        if num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps
        return super().__call__(
            batch_size=batch_size,
            generator=generator,
            num_inference_steps=num_inference_steps,
            output_type=output_type,
            return_dict=return_dict,
        )


class DigitsDiTPipeline(DiTPipeline):
    """``DiTPipeline`` for the 10-class digits DiT.

    ``DiTPipeline`` uses class 1000 as the unconditional class; this maps it to the model's own null class
    (``transformer.config.num_embeds_ada_norm``) while it runs. ``class_labels`` may be ints or digit strings.
    """

    default_num_inference_steps = SPECS[DIT].num_inference_steps
    default_guidance_scale = SPECS[DIT].guidance_scale

    def __call__(
        self,
        class_labels: int | str | list[int | str],
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ):
        if num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        if isinstance(class_labels, (int, str)) or torch.is_tensor(class_labels):
            class_labels = [class_labels] if not torch.is_tensor(class_labels) else class_labels.reshape(-1).tolist()
        null_class = int(self.transformer.config.num_embeds_ada_norm)
        ids: list[int] = []
        for label in class_labels:
            if isinstance(label, str):
                if label not in self.labels:
                    raise ValueError(f"unknown label {label!r}; known: {sorted(self.labels)}")
                label = self.labels[label]
            label = int(label)
            if not 0 <= label < null_class:
                raise ValueError(f"class label {label} out of range 0..{null_class - 1}")
            ids.append(label)

        def remap_null_class(module, args, kwargs):
            labels = kwargs.get("class_labels")
            if labels is not None:
                kwargs["class_labels"] = labels.clamp(max=null_class)
            return args, kwargs

        handle = self.transformer.register_forward_pre_hook(remap_null_class, with_kwargs=True)
        try:
            return super().__call__(
                ids,
                guidance_scale=guidance_scale,
                generator=generator,
                num_inference_steps=num_inference_steps,
                output_type=output_type,
                return_dict=return_dict,
            )
        finally:
            handle.remove()


# --------------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------------


def _init_dit_(model: DiTTransformer2DModel) -> None:
    """The DiT paper's initialisation (adaLN-Zero), which diffusers does not apply: xavier-uniform linears, N(0,
    0.02) timestep MLPs and label tables, zero adaLN modulations and a zero output layer."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def disable_internal_label_dropout(model: DiTTransformer2DModel) -> None:
    """Switch off the per-block label dropout of diffusers' ``LabelEmbedding`` (the null row stays)."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def model_class(name: str) -> type[nn.Module]:
    kind = spec(name).kind
    return {"unet": UNet2DModel, "dit": DiTTransformer2DModel, "classifier": DigitClassifier}[kind]


def build_model(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised model (for training), from its spec's config or ``config``."""
    s = spec(name)
    cfg = dict(copy.deepcopy(s.config if config is None else config))
    if s.kind == "unet":
        return UNet2DModel(**cfg)
    if s.kind == "dit":
        model = DiTTransformer2DModel(**cfg)
        _init_dit_(model)
        disable_internal_label_dropout(model)
        return model
    return DigitClassifier(**cfg)


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**TRAIN_SCHEDULER_CONFIG)


_SCHEDULERS = {
    "DDIMScheduler": DDIMScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "DDPMScheduler": DDPMScheduler,
}


def build_inference_scheduler(name: str, config: dict[str, Any] | None = None):
    """The sampling scheduler of a diffusion model: from a saved ``config`` (with ``_class_name``) or the spec."""
    s = spec(name)
    if s.scheduler_class is None:
        raise ValueError(f"{s.name} is not a diffusion model")
    if config is not None:
        import diffusers

        cls = getattr(diffusers, config.get("_class_name", s.scheduler_class))
        return cls.from_config(config)
    return _SCHEDULERS[s.scheduler_class](**s.scheduler_config)


def build_pipeline(name: str, model: nn.Module, scheduler=None):
    """The ready pipeline around a diffusion ``model``: :class:`DigitsDDPMPipeline` or :class:`DigitsDiTPipeline`."""
    s = spec(name)
    scheduler = scheduler if scheduler is not None else build_inference_scheduler(name)
    if s.kind == "unet":
        return DigitsDDPMPipeline(unet=model, scheduler=scheduler)
    if s.kind == "dit":
        vae = IdentityVAE(latent_channels=model.config.in_channels).to(model.device)
        if model.dtype != torch.float32:
            vae = vae.to(dtype=model.dtype)
        return DigitsDiTPipeline(transformer=model, vae=vae, scheduler=scheduler, id2label=dict(ID2LABEL))
    raise ValueError(f"{s.name} has no pipeline; load it with dmq.models.load_classifier()")
