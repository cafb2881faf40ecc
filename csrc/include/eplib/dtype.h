// Element types and their conversions to and from fp32: round to nearest even, bit-exact with
// torch's casts for every value but NaN. NaN stays NaN with a canonical payload (bf16 0x7FC0;
// fp16 0x7E00 with its sign); torch's vectorised CPU casts write other NaN bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "eplib/macros.h"

namespace eplib {

// Codes shared with Python (eplib/_dtypes.py); keep the two in step.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

EPLIB_HOST_DEVICE uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

EPLIB_HOST_DEVICE float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

EPLIB_HOST_DEVICE float to_float(float value) { return value; }

EPLIB_HOST_DEVICE float to_float(bf16_t value) { return float_from_bits(static_cast<uint32_t>(value.bits) << 16); }

EPLIB_HOST_DEVICE float to_float(fp16_t value) {
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000u) << 16;
  const uint32_t exponent = (value.bits >> 10) & 0x1Fu;
  uint32_t mantissa = value.bits & 0x3FFu;
  if (exponent == 0x1Fu) return float_from_bits(sign | 0x7F800000u | (mantissa << 13));  // inf / NaN
  if (exponent != 0) return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return float_from_bits(sign);  // signed zero
  // Subnormal half: renormalise into a normal float.
  uint32_t float_exponent = 113u;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    --float_exponent;
  }
  return float_from_bits(sign | (float_exponent << 23) | ((mantissa & 0x3FFu) << 13));
}

template <typename T>
EPLIB_HOST_DEVICE T from_float(float value);

template <>
EPLIB_HOST_DEVICE float from_float<float>(float value) { return value; }

template <>
EPLIB_HOST_DEVICE bf16_t from_float<bf16_t>(float value) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return bf16_t{0x7FC0};  // NaN, as c10::BFloat16 writes it
  const uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>((bits + rounding_bias) >> 16)};
}

template <>
EPLIB_HOST_DEVICE fp16_t from_float<fp16_t>(float value) {
  const uint32_t bits = float_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return fp16_t{static_cast<uint16_t>(sign | 0x7E00u)};  // NaN
  if (magnitude >= 0x477FF000u) return fp16_t{static_cast<uint16_t>(sign | 0x7C00u)};  // rounds to inf
  if (magnitude < 0x38800000u) {
    // Result is a half subnormal or zero: shift the full significand and round to nearest even.
    if (magnitude < 0x33000000u) return fp16_t{sign};  // below half the smallest subnormal
    const uint32_t exponent = magnitude >> 23;
    const uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // in [14, 24]
    uint32_t half_bits = significand >> shift;
    const uint32_t remainder = significand & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (remainder > halfway || (remainder == halfway && (half_bits & 1u))) ++half_bits;
    return fp16_t{static_cast<uint16_t>(sign | half_bits)};
  }
  // Normal half: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  uint32_t half_bits = (magnitude - 0x38000000u) >> 13;
  const uint32_t remainder = magnitude & 0x1FFFu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (half_bits & 1u))) ++half_bits;
  return fp16_t{static_cast<uint16_t>(sign | half_bits)};
}

// Reductions accumulate in AccumulatorOf<T>: fp32 for the 16- and 32-bit types, fp64 for fp64
// (so float64 gradchecks of the autograd ops see no fp32 rounding).
template <typename T>
struct Accumulator {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};
template <typename T>
using AccumulatorOf = typename Accumulator<T>::type;

// Element -> accumulator and back: to_float / from_float, except that fp64 passes through.
template <typename T>
EPLIB_HOST_DEVICE AccumulatorOf<T> to_accumulator(T value) { return to_float(value); }
template <>
EPLIB_HOST_DEVICE double to_accumulator<double>(double value) { return value; }

template <typename T>
EPLIB_HOST_DEVICE T from_accumulator(AccumulatorOf<T> value) { return from_float<T>(value); }
template <>
EPLIB_HOST_DEVICE double from_accumulator<double>(double value) { return value; }

}  // namespace eplib
