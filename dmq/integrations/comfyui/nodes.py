"""ComfyUI node classes: DMQ Quantize Model, DMQ Save Quantized, DMQ Load Quantized, DMQ LoRA.

Each follows ComfyUI's node conventions (``INPUT_TYPES`` classmethod, ``RETURN_TYPES``, ``FUNCTION``,
``CATEGORY``); every MODEL they return is a new ModelPatcher over a copy of the model, never the input changed in
place. Quantized checkpoints live in ComfyUI's model folder ``dmq`` (``models/dmq/*.safetensors``); LoRAs come from
its ``loras`` folder. ComfyUI's ``folder_paths`` is imported when a node is used, not when this module is.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from dmq.config import list_presets, resolve_config
from dmq.integrations.comfyui.model import (
    CalibrationRun,
    add_comfy_lora,
    load_comfy_quantized,
    quantize_comfy_model,
    save_comfy_quantized,
    unsupported_reason,
)

__all__ = [
    "FOLDER",
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "DMQLoRA",
    "DMQLoadQuantized",
    "DMQQuantizeModel",
    "DMQSaveQuantized",
]

#: ComfyUI model folder of quantized checkpoints
FOLDER = "dmq"
_CATEGORY = "dmq"
_MAX_SEED = 0xFFFFFFFFFFFFFFFF


def _folder_paths() -> Any:
    """ComfyUI's ``folder_paths`` with the ``dmq`` model folder registered (``models/dmq``)."""
    fp = importlib.import_module("folder_paths")
    if FOLDER not in fp.folder_names_and_paths:
        fp.folder_names_and_paths[FOLDER] = ([os.path.join(fp.models_dir, FOLDER)], {".safetensors"})
    return fp


def comfy_presets() -> list[str]:
    """The dmq presets that can run inside ComfyUI."""
    return [name for name in list_presets() if unsupported_reason(resolve_config(name)) is None]


class DMQQuantizeModel:
    """MODEL + preset (+ optional CONDITIONING and LATENT to calibrate on a short KSampler run) → quantized MODEL."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        presets = comfy_presets()
        return {
            "required": {
                "model": ("MODEL",),
                "preset": (presets, {"default": "svdquant-w4a4" if "svdquant-w4a4" in presets else presets[0]}),
            },
            "optional": {
                "calibration_positive": ("CONDITIONING",),
                "calibration_negative": ("CONDITIONING",),
                "calibration_latent": ("LATENT",),
                "calibration_steps": ("INT", {"default": 8, "min": 1, "max": 200}),
                "calibration_cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1}),
                "seed": ("INT", {"default": 0, "min": 0, "max": _MAX_SEED}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "quantize"
    CATEGORY = _CATEGORY
    DESCRIPTION = "Quantize the diffusion model with a dmq preset; the input MODEL is left unchanged."

    def quantize(self, model: Any, preset: str, calibration_positive: Any = None, calibration_negative: Any = None,
                 calibration_latent: Any = None, calibration_steps: int = 8, calibration_cfg: float = 7.0,
                 seed: int = 0) -> tuple[Any]:
        calibration = None
        if calibration_positive is not None or calibration_latent is not None:
            calibration = CalibrationRun(calibration_positive, calibration_negative, calibration_latent,
                                         calibration_steps, calibration_cfg, seed)
        return (quantize_comfy_model(model, preset, calibration),)


class DMQSaveQuantized:
    """Write a quantized MODEL to ``models/dmq/<filename>.safetensors``."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",), "filename": ("STRING", {"default": "dmq-model"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = _CATEGORY

    def save(self, model: Any, filename: str) -> dict[str, Any]:
        name = os.path.basename(filename.removesuffix(".safetensors")) + ".safetensors"
        path = save_comfy_quantized(model, os.path.join(_folder_paths().get_folder_paths(FOLDER)[0], name))
        return {"ui": {"text": [str(path)]}}


class DMQLoadQuantized:
    """Floating-point MODEL (the one that was quantized) + a saved dmq checkpoint → the quantized MODEL."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",), "quantized_name": (_folder_paths().get_filename_list(FOLDER),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = _CATEGORY

    def load(self, model: Any, quantized_name: str) -> tuple[Any]:
        return (load_comfy_quantized(_folder_paths().get_full_path(FOLDER, quantized_name), model),)


class DMQLoRA:
    """Quantized MODEL + a LoRA file → MODEL with the LoRA in the quantized layers' 16-bit low-rank branch."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (_folder_paths().get_filename_list("loras"),),
            "strength": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = _CATEGORY

    def apply(self, model: Any, lora_name: str, strength: float) -> tuple[Any]:
        from safetensors.torch import load_file

        state = load_file(_folder_paths().get_full_path("loras", lora_name))
        return (add_comfy_lora(model, state, strength, name=lora_name),)


NODE_CLASS_MAPPINGS = {
    "DMQQuantizeModel": DMQQuantizeModel,
    "DMQSaveQuantized": DMQSaveQuantized,
    "DMQLoadQuantized": DMQLoadQuantized,
    "DMQLoRA": DMQLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DMQQuantizeModel": "DMQ Quantize Model",
    "DMQSaveQuantized": "DMQ Save Quantized",
    "DMQLoadQuantized": "DMQ Load Quantized",
    "DMQLoRA": "DMQ LoRA",
}
