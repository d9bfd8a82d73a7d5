// fp32 -> bf16 rounding as torch's conversion (round to nearest, ties to even; NaN -> 0x7fc0), scalar and on 8
// AVX2 lanes, shared by the CPU kernels (cpu_direct.cpp, cpu_balance.cpp). Not vcvtneps2bf16, which flushes
// subnormals. Each returns the fp32 bit pattern of the rounded value (low 16 bits 0).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace viditq {

inline uint32_t bf16_rounded_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc00000u;  // NaN
  return (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}

inline __m256i bf16_rounded_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb),
                                           _mm256_set1_epi32(int(0xffff0000u)));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc00000),
                            _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

}  // namespace viditq
