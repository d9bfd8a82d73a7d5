// Per-token activation quantization on AVX2, shared by the CPU kernels (cpu_int16.cpp, cpu_direct.cpp): the
// float steps of quant.formats.quantize_activation_per_token in its order (IEEE division, round half to even),
// so the codes and scales are bit-identical to the torch path's, and NaN / Inf rows give its NaN / Inf scales.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace viditq {

// bf16 [k] -> fp32 into `wide` (a 16-bit shift: exact); returns `wide`.
inline const float* widen_bf16(const uint16_t* src, int64_t k, float* wide) {
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(wide + j), _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  for (; j < k; j++) {
    const uint32_t bits = uint32_t(src[j]) << 16;
    std::memcpy(wide + j, &bits, 4);
  }
  return wide;
}

// max |x| of a row; NaN where the row holds a NaN, else Inf where it holds an Inf, as torch's amax. Taken on the
// bit patterns with the sign cleared: for non-negative floats their order as integers is the float order, and
// every NaN is above Inf, so no NaN is dropped (max_ps returns its second operand when one is NaN).
inline float row_absmax(const float* row, int64_t k) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  __m256i vmax = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
    vmax = _mm256_max_epu32(vmax, _mm256_and_si256(magnitude, v));
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vmax);
  uint32_t bits = 0;
  for (uint32_t v : lanes) bits = std::max(bits, v);
  for (; j < k; j++) {
    uint32_t v;
    std::memcpy(&v, row + j, 4);
    bits = std::max(bits, v & 0x7fffffffu);
  }
  float absmax;
  std::memcpy(&absmax, &bits, 4);
  return absmax;
}

// What a row is divided by for its codes, as quant.formats.round_to_codes: the scale; 1 for a zero row (codes 0)
// or a NaN one (the NaN scale makes the output NaN whatever the codes); the largest float for an Inf scale, so
// that +-Inf saturate to 127 / -128 and the output has the sign of FP's Inf * w.
inline float code_divisor(float scale) { return scale > 0.f ? std::min(scale, FLT_MAX) : 1.0f; }

// Row `row` of x quantized per token (scale absmax / 127, codes round(x / scale) clamped to int8) into
// `codes` (K rounded up to even, the pad stays 0); returns the scale.
inline float quantize_row(const float* row, int64_t k, int16_t* codes) {
  const float scale = row_absmax(row, k) / 127.0f;
  const float safe = code_divisor(scale);
  const __m256 divisor = _mm256_set1_ps(safe), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(row + j), divisor);
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even, as torch.round
    const __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + j), q16);
  }
  for (; j < k; j++) codes[j] = int16_t(std::min(127.f, std::max(-128.f, std::nearbyint(row[j] / safe))));
  return scale;
}

}  // namespace viditq
