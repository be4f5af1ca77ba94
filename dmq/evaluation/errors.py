"""Errors of the evaluation harness: a missing optional package or missing pretrained weights. Both say how to
provide what is missing; neither is ever answered with a random-weight stand-in."""

from __future__ import annotations

from dmq.errors import DmqError

__all__ = ["MissingPackageError", "MissingWeightsError"]


class MissingPackageError(DmqError, ImportError):
    """An optional package that the requested metric or backend needs is not installed (the message names it and
    the install command)."""


class MissingWeightsError(DmqError, FileNotFoundError):
    """Pretrained weights that a metric needs are not on this machine (the message says where to put them)."""
