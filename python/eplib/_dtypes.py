"""Element types the native kernels accept, and their codes (csrc/include/eplib/dtype.h)."""

import torch

# Keep in step with eplib::DType.
KERNEL_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# FP8 dispatch input: (float8_e4m3fn [T, H], float32 scales [T, H / FP8_BLOCK]).
FP8_DTYPE = torch.float8_e4m3fn
FP8_BLOCK = 128
