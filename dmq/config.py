"""Quantization configs (frozen data, versioned dict form) and the preset registry."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from dmq.errors import ConfigError
from dmq.formats import QuantSpec

__all__ = ["QuantConfig", "CONFIG_VERSION", "register_preset", "get_preset", "list_presets", "resolve_config"]

CONFIG_VERSION = 1


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize in a denoiser, and how.

    weight / activation: specs for the main GEMM layers (linears, and convolutions when ``quantize_convs``);
    ``activation=None`` means weight-only. modulation: spec for the per-block modulation linears (adaLN), which are
    always weight-only; ``None`` keeps them 16-bit. include / exclude: shell-style patterns over module names
    (``fnmatch``); ``include`` restricts the targets to matching names and also forces modules that dmq keeps
    16-bit by default; ``exclude`` wins over both. ``needs_calibration``: set by presets whose activation ranges
    or methods need calibration data. rank: SVDQuant's 16-bit low-rank branch for the main layers (0 = none).
    smooth_alpha: SmoothQuant's migration strength α; smoothing is applied when calibration data is given (it is
    required when ``rank == 0``, where smoothing is the whole method). split_shortcut: quantize the layers that
    read a U-Net skip concatenation with one quantizer per channel range (Q-Diffusion). act_estimator: how static
    activation ranges are estimated from calibration statistics (``minmax``, ``percentile`` or ``mse``).
    reconstruct: learn the weight rounding block by block on calibration data (BRECQ/AdaRound, as Q-Diffusion).
    timestep_buckets: static activation ranges per bucket of normalized timestep (TFMQ-DM); temporal_cache: serve
    the time path from the temporal-feature cache (:mod:`dmq.methods.temporal_cache`). attention: ``"int8"`` runs
    the self- and joint-attention of the denoiser with 8-bit attention (int8 QKᵀ, fp8 PV,
    :mod:`dmq.methods.attention`); None keeps it 16-bit. fuse_projections: fuse each attention's q/k/v projections
    (and the added text-stream ones) into one linear with diffusers' ``fuse_qkv_projections`` before quantizing, so
    the input is quantized once for one larger GEMM (:mod:`dmq.methods.fuse`); the denoiser only.
    """

    weight: QuantSpec
    activation: QuantSpec | None = None
    modulation: QuantSpec | None = None
    quantize_convs: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    name: str = "custom"
    needs_calibration: bool = False
    rank: int = 0
    smooth_alpha: float | None = None
    split_shortcut: bool = False
    act_estimator: str = "mse"
    reconstruct: bool = False
    timestep_buckets: int = 0
    temporal_cache: bool = False
    attention: str | None = None
    fuse_projections: bool = False

    def __post_init__(self) -> None:
        if self.weight.granularity == "token":
            raise ConfigError("weights cannot be quantized per token; use 'tensor', 'channel' or 'group'")
        if self.modulation is not None and self.modulation.granularity == "token":
            raise ConfigError("modulation weights cannot be quantized per token")
        if self.activation is not None:
            if self.activation.granularity == "channel":
                raise ConfigError("activations cannot be quantized per input channel (no GEMM can apply such "
                                  "scales); use 'token', 'group' or 'tensor'")
            if not self.activation.dynamic and not self.needs_calibration:
                raise ConfigError("static activation ranges need calibration: set needs_calibration=True")
        if self.act_estimator not in ("minmax", "percentile", "mse"):
            raise ConfigError(f"act_estimator must be 'minmax', 'percentile' or 'mse', got {self.act_estimator!r}")
        if self.reconstruct and not self.needs_calibration:
            raise ConfigError("reconstruction learns from calibration data: set needs_calibration=True")
        if self.timestep_buckets and (self.activation is None or self.activation.dynamic):
            raise ConfigError("per-timestep ranges (timestep_buckets) need static activation quantization")
        if self.timestep_buckets and self.reconstruct:
            raise ConfigError("block reconstruction with per-timestep ranges is not supported")
        if self.attention not in (None, "int8"):
            raise ConfigError(f"attention must be None or 'int8', got {self.attention!r}")
        if not isinstance(self.fuse_projections, bool):
            raise ConfigError(f"fuse_projections must be True or False, got {self.fuse_projections!r}")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"rank must be a non-negative integer, got {self.rank!r}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth_alpha must lie in [0, 1], got {self.smooth_alpha}")
        if self.smooth_alpha is not None and self.rank == 0 and not self.needs_calibration:
            raise ConfigError("smoothing without a low-rank branch needs calibration: set needs_calibration=True")
        for attr in ("include", "exclude"):
            pats = getattr(self, attr)
            if isinstance(pats, str) or not all(isinstance(p, str) for p in pats):
                raise ConfigError(f"{attr} must be a tuple of shell-style patterns, got {pats!r}")
            object.__setattr__(self, attr, tuple(pats))

    @property
    def accepts_calibration(self) -> bool:
        """Whether calibration data is used (static ranges, smoothing)."""
        return self.needs_calibration or self.smooth_alpha is not None

    def describe(self) -> str:
        act = self.activation.describe() if self.activation else "16-bit"
        extra = f", rank-{self.rank} branch" if self.rank else ""
        extra += f", {self.attention} attention" if self.attention else ""
        extra += ", fused q/k/v projections" if self.fuse_projections else ""
        return f"weights {self.weight.describe()}, activations {act}{extra}"

    def with_patterns(self, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> "QuantConfig":
        """A copy with more include/exclude patterns."""
        return replace(self, include=self.include + tuple(include), exclude=self.exclude + tuple(exclude))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "name": self.name,
            "weight": self.weight.to_dict(),
            "activation": self.activation.to_dict() if self.activation else None,
            "modulation": self.modulation.to_dict() if self.modulation else None,
            "quantize_convs": self.quantize_convs,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "needs_calibration": self.needs_calibration,
            "rank": self.rank,
            "smooth_alpha": self.smooth_alpha,
            "split_shortcut": self.split_shortcut,
            "act_estimator": self.act_estimator,
            "reconstruct": self.reconstruct,
            "timestep_buckets": self.timestep_buckets,
            "temporal_cache": self.temporal_cache,
            "attention": self.attention,
            "fuse_projections": self.fuse_projections,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        version = d.get("version")
        if version != CONFIG_VERSION:
            raise ConfigError(f"QuantConfig version {version!r} is not supported by this dmq "
                              f"(expects {CONFIG_VERSION}); re-quantize with this version")
        spec = lambda v: QuantSpec.from_dict(v) if v else None  # noqa: E731
        return cls(weight=QuantSpec.from_dict(d["weight"]), activation=spec(d["activation"]),
                   modulation=spec(d["modulation"]), quantize_convs=d["quantize_convs"],
                   include=tuple(d["include"]), exclude=tuple(d["exclude"]), name=d["name"],
                   needs_calibration=d["needs_calibration"], rank=d["rank"], smooth_alpha=d["smooth_alpha"],
                   split_shortcut=d["split_shortcut"], act_estimator=d["act_estimator"],
                   reconstruct=d["reconstruct"], timestep_buckets=d["timestep_buckets"],
                   temporal_cache=d["temporal_cache"], attention=d.get("attention"),
                   fuse_projections=d.get("fuse_projections", False))


@dataclass(frozen=True)
class _Preset:
    config: QuantConfig
    description: str


_PRESETS: dict[str, _Preset] = {}


def register_preset(name: str, config: QuantConfig, description: str) -> None:
    """Register a named preset (names are unique)."""
    if name in _PRESETS:
        raise ConfigError(f"preset {name!r} is already registered")
    _PRESETS[name] = _Preset(replace(config, name=name), description)


def get_preset(name: str) -> QuantConfig:
    """The config of a preset; a clear error listing the valid names otherwise."""
    try:
        return _PRESETS[name].config
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(_PRESETS))}") from None


def list_presets() -> dict[str, str]:
    """Preset name → one-line description."""
    return {name: p.description for name, p in sorted(_PRESETS.items())}


def resolve_config(config: str | QuantConfig) -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return get_preset(config)
    raise ConfigError(f"config must be a preset name or a dmq.QuantConfig, got {type(config).__name__}")


_INT8_CH = QuantSpec("int8", "channel")
_INT8_TOK = QuantSpec("int8", "token")
_INT4_G64 = QuantSpec("int4", "group", 64)
_INT4_G128 = QuantSpec("int4", "group", 128)
_FP8_CH = QuantSpec("fp8_e4m3", "channel")
_FP8_TOK = QuantSpec("fp8_e4m3", "token")

register_preset("w8a8", QuantConfig(_INT8_CH, _INT8_TOK, modulation=_INT8_CH),
                "int8 weights per output channel, int8 activations per token (dynamic)")
register_preset("w4a8", QuantConfig(_INT4_G128, _INT8_TOK, modulation=_INT4_G64),
                "int4 weights in groups of 128, int8 activations per token (dynamic)")
register_preset("w4a16", QuantConfig(_INT4_G64, None, modulation=_INT4_G64),
                "int4 weights in groups of 64, 16-bit activations (weight-only)")
register_preset("w4a4", QuantConfig(_INT4_G64, QuantSpec("int4", "group", 64), modulation=_INT4_G64),
                "plain round-to-nearest int4 weights and activations, groups of 64 (activations dynamic per token)")
register_preset("fp8", QuantConfig(_FP8_CH, _FP8_TOK, modulation=_FP8_CH),
                "fp8 e4m3 weights per output channel, fp8 e4m3 activations per token (dynamic)")
register_preset("smoothquant-w4a4",
                QuantConfig(_INT4_G64, QuantSpec("int4", "group", 64), modulation=_INT4_G64, smooth_alpha=0.5,
                            needs_calibration=True),
                "SmoothQuant (alpha 0.5, calibrated) then int4 g64 weights and activations")
register_preset("svdquant-w4a4",
                QuantConfig(_INT4_G64, QuantSpec("int4", "group", 64), modulation=_INT4_G64, rank=32,
                            smooth_alpha=0.5),
                "SVDQuant: smoothing (with calibration data) + rank-32 16-bit branch + int4 g64 residual and "
                "activations; data-free without calibration")
register_preset("svdquant-w4a4-2l",
                QuantConfig(QuantSpec("int4", "group", 64, two_level=True),
                            QuantSpec("int4", "group", 64, two_level=True), modulation=_INT4_G64, rank=32,
                            smooth_alpha=0.5),
                "SVDQuant with two-level int4 g64 scales (integer sub-scales × one fp32 scale per row): group-wise "
                "accuracy at per-channel GEMM speed on Hopper's int8 tensor cores")
register_preset("svdquant-w4a8-2l",
                QuantConfig(QuantSpec("int4", "group", 64, two_level=True), _INT8_TOK, modulation=_INT4_G64, rank=32,
                            smooth_alpha=0.5),
                "SVDQuant with two-level int4 g64 weights and int8 per-token activations: the same 4-bit weights "
                "and int8 GEMM as svdquant-w4a4-2l (Hopper has no 4-bit tensor cores, so 4-bit activations reach "
                "the GEMM as int8 anyway), with a cheaper activation quantizer and 8-bit activation accuracy")
register_preset("svdquant-nvfp4",
                QuantConfig(QuantSpec("nvfp4", "group", 16), QuantSpec("nvfp4", "group", 16), modulation=_INT4_G64,
                            rank=32, smooth_alpha=0.5),
                "SVDQuant with NVFP4 (fp4 e2m1 g16, fp8 e4m3 scales, fp32 tensor scale) residual and activations")

_INT8_STATIC = QuantSpec("int8", "tensor", dynamic=False)
register_preset("w8a8-static", QuantConfig(_INT8_CH, _INT8_STATIC, modulation=_INT8_CH, needs_calibration=True),
                "int8 weights per output channel, int8 activations per tensor with calibrated (static) ranges")
register_preset("w4a8-static", QuantConfig(_INT4_G128, _INT8_STATIC, modulation=_INT4_G64, needs_calibration=True),
                "int4 weights in groups of 128, int8 activations per tensor with calibrated (static) ranges")
register_preset("qdiffusion-w4a8",
                QuantConfig(QuantSpec("int4", "channel"), _INT8_STATIC, modulation=_INT4_G64, split_shortcut=True,
                            reconstruct=True, needs_calibration=True),
                "Q-Diffusion: int4 per-channel weights with learned rounding (block reconstruction), int8 static "
                "activations calibrated over the trajectory, split shortcut on U-Net skip concatenations")
register_preset("tfmq-w4a8",
                QuantConfig(_INT4_G128, _INT8_STATIC, modulation=_INT4_G64, timestep_buckets=4, temporal_cache=True,
                            needs_calibration=True),
                "TFMQ-DM: int4 g128 weights, int8 static activations with one range per quarter of the schedule, "
                "time path served by the temporal-feature cache")
