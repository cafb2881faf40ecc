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
// the inputs it does not send to NaN (|value| < 464). Branch-free (selects), so that the compiler
// can vectorize the loops that call it.
EPLIB_HOST_DEVICE uint8_t e4m3_from_float(float value) {
  const uint32_t bits = float_bits(value);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  // Normal results: round the 20 dropped mantissa bits to nearest even, then move the exponent's bias
  // from 127 to 7 (a carry out of the mantissa lands in the exponent, as it should). Wraps (unused)
  // below the smallest normal; saturates at 0x7E = 448.
  const uint32_t rounded = (magnitude + 0x7FFFFu + ((magnitude >> 20) & 1u)) >> 20;
  const uint32_t normal = rounded - (120u << 3) > 0x7Eu ? 0x7Eu : rounded - (120u << 3);
  // Below the smallest normal 2^-6: a multiple of the subnormal step 2^-9. |value| * 512 < 8 is exact,
  // and adding 2^23 rounds it to an integer, to nearest even (8 steps is 0x08, the smallest normal).
  // Computed for every input (clamped, so that the conversion to an integer stays in range).
  const float small = float_from_bits(magnitude < 0x3C800000u ? magnitude : 0x3C800000u);
  const float steps = (small * 512.0f + 8388608.0f) - 8388608.0f;
  uint32_t result = magnitude < 0x3C800000u ? static_cast<uint32_t>(static_cast<int32_t>(steps)) : normal;
  result = magnitude > 0x7F800000u ? 0x7Fu : result;  // NaN
  return static_cast<uint8_t>(sign | result);
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

// The two steps of bf16_block_amax, for kernels that split a block between threads (the CUDA
// low-latency pack): the magnitude bits that a value adds to the block's maximum (0 for NaN), and the
// amax of the largest of them.
EPLIB_HOST_DEVICE uint16_t bf16_amax_bits(bf16_t value) {
  const uint16_t magnitude = static_cast<uint16_t>(value.bits & 0x7FFFu);
  return magnitude > 0x7F80u ? 0 : magnitude;
}

EPLIB_HOST_DEVICE float fp8_amax_of_bits(uint16_t largest) {
  const float amax = to_float(bf16_t{largest});
  return amax > kFp8AmaxFloor ? amax : kFp8AmaxFloor;
}

// The largest magnitude of a block of kFp8BlockSize bf16 values, at least kFp8AmaxFloor; NaN is
// passed over. On the bits: bf16 magnitudes order as their bits do, and integer maxima vectorize
// (signed 16-bit ones even with SSE2 alone; a magnitude fits in 15 bits).
EPLIB_HOST_DEVICE float bf16_block_amax(const bf16_t* block) {
  int16_t largest = 0;
  for (int i = 0; i < kFp8BlockSize; ++i) {
    const int16_t magnitude = static_cast<int16_t>(block[i].bits & 0x7FFF);
    const int16_t finite_or_inf = magnitude > 0x7F80 ? 0 : magnitude;
    largest = finite_or_inf > largest ? finite_or_inf : largest;
  }
  return fp8_amax_of_bits(static_cast<uint16_t>(largest));
}

}  // namespace eplib
