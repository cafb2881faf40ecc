"""Element types eplib moves, and the codes that name them across the native boundary and between ranks."""

import torch

# FP8 dispatch input: (float8_e4m3fn [T, H], scales [T, S]); the scales are float32 (S = H / 128 for
# DeepSeek's 1x128 blocks) or int32 holding four UE8M0 exponents each, as DeepEP accepts them.
FP8_DTYPE = torch.float8_e4m3fn
SCALE_DTYPES = (torch.float32, torch.int32)

# Element types the native kernels handle; keep in step with eplib::DType (csrc/include/eplib/dtype.h).
# float64 (accumulated in float64) is for gradchecks of the autograd ops; CPU kernels only.
KERNEL_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

# The subset the CUDA kernels handle.
CUDA_KERNEL_DTYPES = (torch.float32, torch.bfloat16)

# Every dtype dispatch accepts, as a small int that ranks exchange to check they agree.
WIRE_DTYPE_IDS = {**KERNEL_DTYPE_CODES, FP8_DTYPE: 4}

# Positions, counts and source indices are int32, as in DeepEP.
INT32_LIMIT = 2**31 - 1
