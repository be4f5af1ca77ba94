"""Triton kernels; each module holds its configs, the @triton.jit kernel and a launcher that checks its inputs and
has the signature of the reference in :mod:`dmq.kernels.reference`."""
