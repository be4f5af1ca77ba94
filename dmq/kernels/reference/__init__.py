"""Pure-PyTorch references: one module per op, each with the signature of its Triton launcher in
:mod:`dmq.kernels.triton`. They define what the kernels compute (tests compare the two) and are the CPU
implementations of the custom ops in :mod:`dmq.kernels.ops`."""
