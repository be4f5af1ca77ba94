"""Role views per architecture and ``quantize_pipeline``."""
