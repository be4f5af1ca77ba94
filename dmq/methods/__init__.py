"""Diffusion quantization methods, each a config plus a transform over a model: smoothing, low-rank (SVDQuant),
split shortcut, temporal cache, LoRA in the low-rank branch."""
