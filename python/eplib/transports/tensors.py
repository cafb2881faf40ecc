"""The raw views of tensors that every transport hands to the native kernels."""

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def ptr(tensor: Optional[Tensor]) -> int:
    """Device or host address of ``tensor``'s data; 0 for None (an absent optional input)."""
    return 0 if tensor is None else tensor.data_ptr()


def row_bytes(tensor: Optional[Tensor]) -> int:
    """Bytes of one row of a 2-D ``tensor``; 0 for None."""
    return 0 if tensor is None else tensor.shape[1] * tensor.element_size()


def scale_strides(x_scales: Optional[Tensor]) -> Tuple[int, int]:
    """(token, column) strides of FP8 scales [T, S] in elements, which the pack kernels read them
    through; (0, 0) for None."""
    return (0, 0) if x_scales is None else (x_scales.stride(0), x_scales.stride(1))


def as_bytes(tensor: Tensor) -> Tensor:
    """A contiguous ``tensor`` as a flat uint8 view of the same memory."""
    return tensor.reshape(-1).view(torch.uint8)
