"""Exceptions raised by dmq. Every user mistake maps to one of these, with a message that says what to do."""


class DmqError(Exception):
    """Base class of all dmq errors."""


class ConfigError(DmqError, ValueError):
    """An invalid quantization config: unknown preset, unsupported bit width or granularity, bad group size."""


class UnsupportedModuleError(DmqError, TypeError):
    """A module that the config targets but dmq cannot quantize (named in the message)."""


class UnsupportedPipelineError(DmqError, TypeError):
    """A pipeline (or model) that dmq does not know how to quantize."""


class NonFiniteError(DmqError, ValueError):
    """NaN or Inf found in a weight (or a collected activation); the message names where."""


class CheckpointMismatchError(DmqError, ValueError):
    """A quantized checkpoint that does not belong to the model it is loaded into."""


class CalibrationRequiredError(DmqError, ValueError):
    """A preset that needs calibration data was used without it."""
