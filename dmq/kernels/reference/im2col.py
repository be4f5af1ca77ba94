"""Reference: the rows of a convolution's GEMM gathered from an NHWC tensor (im2col), on the tensor's device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["im2col", "conv_out_hw"]


def conv_out_hw(h: int, w: int, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> tuple[int, int]:
    """The output height and width of a convolution over an ``h × w`` input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def im2col(t: torch.Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int) -> torch.Tensor:
    """NHWC ``t (B, H, W, C)`` of any dtype → ``(B · H' · W', kh · kw · C)``: row ``(b, ho, wo)`` holds the input
    pixels its kernel window covers, taps outer (row-major over kh, kw) and channels inner; taps outside the input
    (zero padding) are zeros. A new tensor, never a view of ``t``."""
    b, h, w, c = t.shape
    tp = F.pad(t, (0, 0, pw, pw, ph, ph)) if (ph or pw) else t
    tp = tp.contiguous()
    ho, wo = conv_out_hw(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    s = tp.stride()
    view = tp.as_strided((b, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]))
    rows = view.reshape(b * ho * wo, kh * kw * c)
    return rows.clone() if rows.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else rows
