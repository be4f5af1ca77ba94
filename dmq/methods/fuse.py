"""Fused attention projections (``QuantConfig.fuse_projections``): an attention's q/k/v linears as one linear, so a
quantized denoiser quantizes each attention input once and runs one larger GEMM (as Nunchaku does for FLUX).

The fusion is diffusers' own ``model.fuse_qkv_projections()``: ``to_qkv`` for self-attention, ``to_kv`` (k and v;
``to_q`` stays) for cross-attention, ``to_added_qkv`` for the added (text-stream) projections, and the fused
attention processors where the model sets them. diffusers leaves the original linears in place, unused; dmq
records which originals each fused linear replaces at which output rows (:func:`fused_layers`, kept on the model,
not in its state dict), leaves them out of planning, checkpoints and fingerprints, and drops them once the
quantized layers are in (:func:`drop_originals`). LoRAs on ``to_q`` etc. use the record to reach their rows of the
fused layer (:mod:`dmq.methods.lora`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from dmq.errors import ConfigError, DmqError

__all__ = ["Slice", "drop_originals", "fuse_projections", "fused_layers", "fused_until_error", "replaced_names",
           "unfuse"]

logger = logging.getLogger(__name__)

#: ``(original module name, first output row, number of rows)``: where an original's outputs sit in a fused linear
Slice = tuple[str, int, int]

#: the fused linears diffusers creates, by attribute, and the originals they concatenate (in output-row order)
_FUSED_PARTS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
_RECORD = "_dmq_fused_projections"


@dataclass
class _Fusion:
    """What :func:`fuse_projections` did to a model: the fused layers, the model attributes diffusers added (so that
    :func:`unfuse` can take them away again), and whether the originals were dropped."""

    layers: dict[str, list[Slice]]
    added_attrs: tuple[str, ...]
    dropped: bool = False


def _record(model: nn.Module) -> _Fusion | None:
    return vars(model).get(_RECORD)


def fused_layers(model: nn.Module) -> dict[str, list[Slice]]:
    """``{fused linear's module name: [(original name, first row, rows), ...]}`` of a fused model, else ``{}``."""
    rec = _record(model)
    return rec.layers if rec is not None else {}


def replaced_names(model: nn.Module) -> set[str]:
    """Module names of the original linears that fused projections replace (dropped or still in place, unused)."""
    return {orig for rows in fused_layers(model).values() for orig, _, _ in rows}


def _fused_mapping(model: nn.Module) -> dict[str, list[Slice]]:
    """The fused linears of every attention module that diffusers marked ``fused_projections``, with the slices of
    their originals; ConfigError where the shapes do not concatenate to the fused layer."""
    mapping: dict[str, list[Slice]] = {}
    for name, module in model.named_modules():
        if not getattr(module, "fused_projections", False):
            continue
        prefix = f"{name}." if name else ""
        for attr, parts in _FUSED_PARTS.items():
            fused = module._modules.get(attr)
            if fused is None:
                continue
            if not isinstance(fused, nn.Linear):
                raise ConfigError(f"{prefix}{attr} is a {type(fused).__name__}, not a Linear; dmq cannot map it")
            rows, start = [], 0
            for part in parts:
                orig = module._modules.get(part)
                if not isinstance(orig, nn.Linear) or orig.in_features != fused.in_features:
                    raise ConfigError(f"{prefix}{attr}: its original {prefix}{part} is not a Linear with "
                                      f"{fused.in_features} inputs; dmq cannot map this fusion")
                rows.append((prefix + part, start, orig.out_features))
                start += orig.out_features
            if fused.out_features != start:
                raise ConfigError(f"{prefix}{attr} has {fused.out_features} outputs, its originals "
                                  f"{', '.join(p for p, _, _ in rows)} {start} together")
            mapping[prefix + attr] = rows
    return mapping


def fuse_projections(model: nn.Module) -> dict[str, list[Slice]]:
    """Fuse the attention projections of a diffusers model with its own ``fuse_qkv_projections()`` (meta tensors
    work too) and record the result on the model. Returns ``{fused name: [(original name, first row, rows)]}``,
    e.g. ``{"transformer_blocks.0.attn.to_qkv": [("transformer_blocks.0.attn.to_q", 0, 3072), ...]}``.

    ConfigError for a model without ``fuse_qkv_projections``, one diffusers refuses to fuse, one already fused, or
    one in which nothing was fused; the model is then left as it was.
    """
    where = type(model).__name__
    if _record(model) is not None or any(getattr(m, "fused_projections", False) for m in model.modules()):
        raise ConfigError(f"{where} is already fused (fuse_qkv_projections was called): start from the unfused model")
    fuse = getattr(model, "fuse_qkv_projections", None)
    if not callable(fuse):
        raise ConfigError(f"{where} has no fuse_qkv_projections(): diffusers cannot fuse its attention projections; "
                          "quantize it without fuse_projections")
    before = set(vars(model))
    try:
        fuse()
    except ValueError as exc:  # diffusers' refusal, e.g. "not supported for models having added KV projections"
        for attr in set(vars(model)) - before:
            del vars(model)[attr]
        raise ConfigError(f"{where}: diffusers cannot fuse its attention projections ({exc}); quantize it without "
                          "fuse_projections") from None
    vars(model)[_RECORD] = _Fusion({}, tuple(sorted(set(vars(model)) - before)))
    try:
        mapping = _fused_mapping(model)
        if not mapping:
            raise ConfigError(f"{where}: fuse_qkv_projections() fused no attention projection; quantize it without "
                              "fuse_projections")
    except BaseException:
        unfuse(model)
        raise
    vars(model)[_RECORD].layers = mapping
    logger.info("dmq: fused %d attention projections of %s", len(mapping), where)
    return mapping


def unfuse(model: nn.Module) -> None:
    """Undo :func:`fuse_projections` whose originals are still in place: diffusers' ``unfuse_qkv_projections()``
    (original processors back), then the fused linears, the ``fused_projections`` flags and the record go. The
    model is then as it was before fusing. No-op on a model that is not fused by dmq."""
    rec = _record(model)
    if rec is None:
        return
    if rec.dropped:
        raise DmqError(f"{type(model).__name__}: the original projections were dropped; the fusion cannot be undone")
    model.unfuse_qkv_projections()
    for name, module in model.named_modules():
        if getattr(module, "fused_projections", False):
            for attr in _FUSED_PARTS:
                module._modules.pop(attr, None)
            module.fused_projections = False
    for attr in rec.added_attrs:
        vars(model).pop(attr, None)
    del vars(model)[_RECORD]


def drop_originals(model: nn.Module, mapping: dict[str, list[Slice]]) -> None:
    """Delete the original linears that the fused ones of ``mapping`` replace (diffusers leaves them in place,
    unused); after this the fusion can no longer be undone."""
    for rows in mapping.values():
        for orig, _, _ in rows:
            parent, _, child = orig.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, child)
    rec = _record(model)
    if rec is not None:
        rec.dropped = True


@contextmanager
def fused_until_error(model: nn.Module, enabled: bool) -> Iterator[dict[str, list[Slice]]]:
    """Fuse ``model`` (when ``enabled``) for the body of a ``with`` block and yield the mapping (``{}`` when not
    enabled); if the body raises, unfuse before the error propagates, so the model is as it was."""
    mapping = fuse_projections(model) if enabled else {}
    try:
        yield mapping
    except BaseException:
        if enabled:
            unfuse(model)
        raise
