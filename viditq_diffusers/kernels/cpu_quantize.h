// Per-token activation quantization on AVX2, shared by the CPU kernels (cpu_int16.cpp, cpu_direct.cpp): the
// float steps of quant.formats.quantize_activation_per_token in its order (IEEE division, round half to even),
// so the codes and scales are bit-identical to the torch path's.
#pragma once

#include <immintrin.h>

#include <algorithm>
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

inline float row_absmax(const float* row, int64_t k) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(row + j)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float absmax = 0.f;
  for (float v : lanes) absmax = std::max(absmax, v);
  for (; j < k; j++) absmax = std::max(absmax, std::fabs(row[j]));
  return absmax;
}

// Row `row` of x quantized per token (scale absmax / 127, codes round(x / scale) clamped to int8) into
// `codes` (K rounded up to even, the pad stays 0); returns the scale.
inline float quantize_row(const float* row, int64_t k, int16_t* codes) {
  const float scale = row_absmax(row, k) / 127.0f;
  const float safe = scale > 0.f ? scale : 1.0f;  // a zero row: scale 0, codes 0, no NaN
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
