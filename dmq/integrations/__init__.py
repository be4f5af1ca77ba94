"""Integrations with other tools: :mod:`dmq.integrations.diffusers` (loading dmq checkpoints through diffusers'
``from_pretrained``). Nothing here registers itself on import."""
