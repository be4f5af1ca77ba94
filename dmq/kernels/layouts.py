"""Weight layouts the kernels read, converted once from the stored formats of :mod:`dmq.formats`.

``int4b`` (blocked int4): uint8 ``(N, Kb // 2)`` with ``Kb = K`` rounded up to 128. K is cut into blocks of 128;
byte ``j`` (0 ≤ j < 64) of block ``b`` holds code ``b*128 + j`` in its low nibble and code ``b*128 + 64 + j`` in its
high nibble (signed two's complement nibbles). The GEMM loads one ``(BN, 64)`` byte tile per block and gets the two
K-halves with one shift each, with no interleaving shuffle (``tl.join``/``reshape``), so each half goes to the
tensor cores as a plain K-contiguous int8 tile; a K-half is 64 codes, one int4 g64 group. Stored format: element
``2i`` low, ``2i + 1`` high (pairs), which needs a register interleave before an MMA.
"""

from __future__ import annotations

import torch

from dmq.formats import pack_nibbles, unpack_int4

__all__ = ["KBLOCK", "int4_to_blocked", "blocked_to_int8", "blocked_kb"]

KBLOCK = 128


def blocked_kb(k: int) -> int:
    """K padded to the 128-code block of the ``int4b`` layout."""
    return -(-k // KBLOCK) * KBLOCK


def int4_to_blocked(qweight: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Stored int4 codes uint8 ``(N, Kp // 2)`` (pairs) → ``int4b`` uint8 ``(N, Kb // 2)``; runs on the tensor's
    device (once per layer)."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"int4 weights are uint8 (N, K/2), got {qweight.dtype} {tuple(qweight.shape)}")
    codes = unpack_int4(qweight)                      # (N, Kp) int8
    n, kp = codes.shape
    kb = blocked_kb(kp if k is None else max(k, kp))
    codes = torch.nn.functional.pad(codes, (0, kb - kp))
    blocks = codes.reshape(n, kb // KBLOCK, 2, KBLOCK // 2)
    pairs = torch.stack((blocks[:, :, 0], blocks[:, :, 1]), dim=-1)   # (N, nb, 64, 2): low, high
    return pack_nibbles(pairs.reshape(n, kb)).contiguous()


def blocked_to_int8(wb: torch.Tensor, k: int) -> torch.Tensor:
    """``int4b`` uint8 ``(N, Kb // 2)`` → int8 codes ``(N, k)`` in natural order (the unpack-once path)."""
    n = wb.shape[0]
    c = unpack_int4(wb).reshape(n, -1, KBLOCK // 2, 2)     # (N, nb, 64, [low, high])
    codes = torch.cat((c[..., 0], c[..., 1]), dim=-1).reshape(n, -1)
    return codes[:, :k].contiguous()
