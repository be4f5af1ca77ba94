"""Fast paths for quantized layers. :mod:`dmq.kernels.dispatch` picks one per call; every kernel has a reference
of the same signature."""
