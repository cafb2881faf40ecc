// FP8 (float8_e4m3fn) casts of the low-latency dispatch, shared by the CPU and CUDA kernels: per
// block of 128 channels an fp32 scale from the block's largest magnitude, as DeepEP's low-latency
// dispatch computes it, then a round-to-nearest-even cast that saturates at +-448. The same
// operations in the same order as eplib.reference.fp8_quantize, so every build gives the same bits.
#pragma once

#include <cstdint>

#include "eplib/dtype.h"
#include "eplib/macros.h"

namespace eplib {

constexpr int kFp8BlockSize = 128;       // channels per scale
constexpr float kFp8Max = 448.0f;        // largest finite float8_e4m3fn
constexpr float kFp8AmaxFloor = 1e-4f;   // a block's amax never goes below this (no division by 0)

// float8_e4m3fn bits of `value`: round to nearest even, magnitudes above 448 (inf included) saturate
// to 448, NaN stays NaN (0x7F with its sign). Exact for every finite input, as torch's cast is for
// the inputs it does not send to NaN (|value| < 464).
EPLIB_HOST_DEVICE uint8_t e4m3_from_float(float value) {
  const uint32_t bits = float_bits(value);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return static_cast<uint8_t>(sign | 0x7Fu);  // NaN
  if (magnitude >= 0x43E00000u) return static_cast<uint8_t>(sign | 0x7Eu);  // >= 448: saturate
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  if (exponent < -6) {
    // Below the smallest normal (2^-6): a multiple of the subnormal step 2^-9, rounded to nearest even.
    // value * 2^9 < 8 is exact in fp32; its integer part and remainder come from the significand.
    if (exponent < -10) return sign;  // below 2^-10 = a quarter step: rounds to zero
    const uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
    const int shift = 23 - (exponent + 9);  // in [21, 24]
    uint32_t steps = significand >> shift;
    const uint32_t remainder = significand & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (remainder > halfway || (remainder == halfway && (steps & 1u))) ++steps;
    return static_cast<uint8_t>(sign | steps);  // 8 steps is 0x08, the smallest normal: the same bits
  }
  // Normal: keep 3 of the 23 mantissa bits, rounding the 20 dropped ones to nearest even.
  uint32_t mantissa = (magnitude >> 20) & 0x7u;
  uint32_t biased = static_cast<uint32_t>(exponent + 7);
  const uint32_t remainder = magnitude & 0xFFFFFu;
  if (remainder > 0x80000u || (remainder == 0x80000u && (mantissa & 1u))) {
    if (++mantissa == 8u) {
      mantissa = 0;
      ++biased;
    }
  }
  if (biased > 15u || (biased == 15u && mantissa == 7u)) return static_cast<uint8_t>(sign | 0x7Eu);
  return static_cast<uint8_t>(sign | (biased << 3) | mantissa);
}

// The two factors of one block: x * scale is cast to FP8; fp8 * scale_inv gives x back (the scale
// that travels). round_scale: both are powers of two (scale_inv = 2^ceil(log2(amax / 448))).
struct Fp8BlockScale {
  float scale;
  float scale_inv;
};

// 2^exponent for -126 <= exponent <= 127, built from its bits.
EPLIB_HOST_DEVICE float power_of_two(int exponent) {
  return float_from_bits(static_cast<uint32_t>(exponent + 127) << 23);
}

// ceil(log2(value)) of a positive normal float, from its bits.
EPLIB_HOST_DEVICE int ceil_log2(float value) {
  const uint32_t bits = float_bits(value);
  return static_cast<int>((bits >> 23) & 0xFFu) - 127 + ((bits & 0x7FFFFFu) != 0 ? 1 : 0);
}

// amax: the block's largest magnitude, at least kFp8AmaxFloor.
EPLIB_HOST_DEVICE Fp8BlockScale fp8_block_scale(float amax, bool round_scale) {
  const float max_inv = 1.0f / kFp8Max;
  if (round_scale) {
    const int exponent = ceil_log2(amax * max_inv);
    return {power_of_two(-exponent), power_of_two(exponent)};
  }
  return {kFp8Max / amax, amax * max_inv};
}

// The UE8M0 byte of a power-of-two scale: its biased exponent.
EPLIB_HOST_DEVICE uint8_t ue8m0_of(float scale_inv) { return static_cast<uint8_t>((float_bits(scale_inv) >> 23) & 0xFFu); }

// Largest of amax and |value| (a NaN value is passed over, as fmaxf does).
EPLIB_HOST_DEVICE float fp8_amax_step(float amax, float value) {
  const float magnitude = value < 0.0f ? -value : value;
  return magnitude > amax ? magnitude : amax;
}

}  // namespace eplib
