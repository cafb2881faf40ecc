"""Argument checks run before any collective or kernel starts (DESIGN.md section 3).

Each raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, range or layout)
naming the argument, the expected form and what was given. Checks that need a scan of the values
(expert ids in range, finite weights) run in the native kernels, still before any collective.
"""

import os
from typing import Optional, Sequence, Tuple, Union

import torch

from ._dtypes import FP8_DTYPE, INT32_LIMIT, SCALE_DTYPES

INT64_LIMIT = 2**63 - 1

Tensor = torch.Tensor


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"[:200]


def check_tensor(name: str, value, dtypes: Sequence[torch.dtype], shape: Sequence[Optional[int]],
                 device: Optional[torch.device] = None, contiguous: bool = True) -> Tensor:
    """A tensor of one of ``dtypes`` whose shape matches ``shape`` (None = any size), contiguous
    unless ``contiguous`` is False (the kernels then read it through its strides)."""
    expected = f"{' or '.join(str(d) for d in dtypes)} tensor of shape [{', '.join('*' if s is None else str(s) for s in shape)}]"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a {expected}, got {_describe(value)}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name}: expected a {expected}, got {_describe(value)}")
    if value.dim() != len(shape) or any(s is not None and s != got for s, got in zip(shape, value.shape)):
        raise ValueError(f"{name}: expected a {expected}, got {_describe(value)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where x is), got {_describe(value)}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (eplib does not copy), got strides {value.stride()}; "
                         f"call .contiguous() first")
    return value


def check_x(x: Union[Tensor, Tuple[Tensor, Tensor]], x_dtypes: Sequence[torch.dtype],
            allow_fp8: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Split ``x`` into (values [T, H], FP8 scales [T, S] or None) after checking both.

    As in DeepEP, the scales are float32, or int32 holding four UE8M0 exponents each, of any count S
    per token, and may have any strides (DeepEP's tests pass column-major ones): the kernels read
    them through their strides. The values must be contiguous."""
    if isinstance(x, tuple):
        if not allow_fp8:
            raise TypeError("x: the FP8 tuple is accepted by dispatch only, got a tuple here")
        if len(x) != 2:
            raise ValueError(f"x: expected the FP8 tuple (float8_e4m3fn [T, H], float32 or int32 scales [T, S]), "
                             f"got a tuple of {len(x)} items")
        values = check_tensor("x[0]", x[0], [FP8_DTYPE], [None, None])
        if values.shape[1] == 0:
            raise ValueError(f"x[0]: expected a hidden size > 0, got {_describe(values)}")
        scales = check_tensor("x[1]", x[1], list(SCALE_DTYPES), [values.shape[0], None], values.device,
                              contiguous=False)
        if scales.shape[1] == 0:
            raise ValueError(f"x[1]: expected at least one scale per token, got {_describe(scales)}")
        return values, scales
    values = check_tensor("x", x, list(x_dtypes), [None, None])
    if values.shape[1] == 0:
        raise ValueError(f"x: expected a hidden size > 0, got {_describe(values)}")
    return values, None


def check_int(name: str, value, minimum: int, maximum: int = INT32_LIMIT) -> int:
    """A Python int in [minimum, maximum] (bools are rejected); counts and sizes are int32 in the kernels."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int in [{minimum}, {maximum}], got {_describe(value)}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name}: expected an int in [{minimum}, {maximum}], got {value}")
    return value


def check_int32_product(name: str, what: str, *factors: int) -> None:
    """Positions and counts are int32 in the kernels (as in DeepEP): reject sizes they cannot index."""
    product = 1
    for factor in factors:
        product *= factor
    if product > INT32_LIMIT:
        raise ValueError(f"{name}: {what} = {product} exceeds the int32 limit {INT32_LIMIT}")


def device_memory_bytes(device: torch.device) -> Optional[int]:
    """Bytes of memory the device has (CPU: physical memory; CUDA: the GPU's), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_allocation(name: str, what: str, num_bytes: int, device: torch.device) -> None:
    """Raises ValueError naming the argument ``name`` before anything is allocated when ``what`` (the
    allocation it sizes, e.g. "2147483647 output rows of 4100 bytes") needs ``num_bytes`` bytes that
    cannot exist: more than int64 counts, or more than the device's memory."""
    if num_bytes > INT64_LIMIT:
        raise ValueError(f"{name}: {what} need {num_bytes} bytes, more than int64 can count")
    capacity = device_memory_bytes(device)
    if capacity is not None and num_bytes > capacity:
        raise ValueError(f"{name}: {what} need {num_bytes / 2**30:.1f} GiB, more than the {capacity / 2**30:.1f} GiB "
                         f"of memory on {device}")


def check_num_experts(num_experts, num_ranks: int) -> int:
    """E > 0 with E % R == 0, so every rank owns E / R experts."""
    check_int("num_experts", num_experts, 1)
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts: expected a multiple of the group size {num_ranks}, got {num_experts}")
    return num_experts


def check_topk(topk_idx, topk_weights, num_tokens: Optional[int], device: torch.device,
               require_weights: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """topk_idx int64 [T, K] and topk_weights float32 [T, K] (same T as x when num_tokens is set)."""
    if topk_idx is None:
        if topk_weights is not None:
            raise ValueError("topk_weights: given without topk_idx; pass both or neither")
        return None, None
    topk_idx = check_tensor("topk_idx", topk_idx, [torch.int64], [num_tokens, None], device)
    if topk_idx.shape[1] == 0:
        raise ValueError(f"topk_idx: expected at least one slot per token (K >= 1), got {_describe(topk_idx)}")
    if topk_weights is None:
        if require_weights:
            raise ValueError(f"topk_weights: expected a float32 tensor of shape {list(topk_idx.shape)} "
                             f"alongside topk_idx, got None")
        return topk_idx, None
    topk_weights = check_tensor("topk_weights", topk_weights, [torch.float32], list(topk_idx.shape), device)
    return topk_idx, topk_weights


def check_bias(bias, num_tokens: int, hidden: int, dtype: torch.dtype,
               device: torch.device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """None, one [T, H] tensor, or a tuple of two (either may be None), in x's dtype."""
    if not isinstance(bias, tuple):
        bias = (bias, None)
    if len(bias) != 2:
        raise ValueError(f"bias: expected a tensor or a tuple of two tensors, got a tuple of {len(bias)}")
    return tuple(None if b is None else check_tensor(f"bias[{i}]", b, [dtype], [num_tokens, hidden], device)
                 for i, b in enumerate(bias))
