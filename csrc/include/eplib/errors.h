// Bits that CUDA kernels OR into a device error flag (int32) on input only the device can check.
// A kernel that sets one still stays in bounds (a bad id counts as -1, a row that does not fit
// is dropped); the host reads the flag at its next sync and raises ValueError. Exported to Python
// as _C.ERR_EXPERT_ID, _C.ERR_WEIGHT, _C.ERR_OVERFLOW, _C.ERR_RANK_COUNTS, _C.ERR_EXPERT_COUNTS, _C.ERR_LL_MESSAGE.
#pragma once

#include <cstdint>

namespace eplib {

constexpr int32_t kErrorExpertId = 1;  // an expert id outside [-1, E)
constexpr int32_t kErrorWeight = 2;    // a non-finite top-k weight
constexpr int32_t kErrorOverflow = 4;  // more rows than a fixed-size region holds
constexpr int32_t kErrorRankCounts = 1 << 8;    // num_tokens_per_rank differs from is_token_in_rank's counts
constexpr int32_t kErrorExpertCounts = 1 << 9;  // num_tokens_per_expert differs from topk_idx's counts
constexpr int32_t kErrorLowLatencyMessage = 1 << 10;  // a low-latency message was rejected by its sender or of
                                                      // another call (eplib/low_latency.h, ll_header_status)
// Not about this rank's input: an ipc exchange found a peer's stream closed as rejected (that peer's
// input failed a host check); the next normal-mode dispatch reports it on every rank (device_errors.py).
constexpr int32_t kErrorPeerInput = 1 << 29;

}  // namespace eplib
