// The Hadamard rotation's elementwise part on CPU (see cpu_balance.py): the input scale (random signs / sqrt(n))
// and the fast Walsh-Hadamard transform over each run of `pow2` channels, one pass per row instead of a dozen
// torch ops over the whole tensor. Every step is rounded to x's dtype as torch rounds it (fp32: IEEE; bf16:
// computed in fp32, rounded to nearest even), in quant.hadamard.rotate's order, so the bits are its bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>

#include "cpu_bf16.h"

namespace {

template <bool BF16>
inline float to_dtype(float f) {  // rounded to x's dtype, as torch rounds (cpu_bf16.h)
  if (!BF16) return f;
  const uint32_t bits = viditq::bf16_rounded_bits(f);
  std::memcpy(&f, &bits, 4);
  return f;
}

// One row in place (fp32 values that are exact in the dtype): w * scale, then the butterflies of
// hadamard._fwht, pairs (i, i + h) -> (a + b, a - b) for h = 1, 2, ..., pow2 / 2 within each run of pow2.
template <bool BF16>
void rotate_row(float* w, const float* scale, int64_t k, int64_t pow2) {
  for (int64_t j = 0; j < k; j++) w[j] = to_dtype<BF16>(w[j] * scale[j]);
  for (int64_t h = 1; h < pow2; h *= 2)
    for (int64_t block = 0; block < k; block += 2 * h)
      for (int64_t j = block; j < block + h; j++) {
        const float a = w[j], b = w[j + h];
        w[j] = to_dtype<BF16>(a + b);
        w[j + h] = to_dtype<BF16>(a - b);
      }
}

// The same on 8 lanes (AVX2).
template <bool BF16>
inline __m256 to_dtype8(__m256 v) { return BF16 ? _mm256_castsi256_ps(viditq::bf16_rounded_bits8(v)) : v; }

// One butterfly stage inside 8 lanes: `swapped` holds each lane's partner; the lanes in `upper` (the b of each
// pair) take a - b = swapped - v, the others a + b = v + swapped (addition commutes exactly).
template <bool BF16, int UPPER>
inline __m256 butterfly8(__m256 v, __m256 swapped) {
  return to_dtype8<BF16>(_mm256_blend_ps(_mm256_add_ps(v, swapped), _mm256_sub_ps(swapped, v), UPPER));
}

// rotate_row for pow2 >= 8 on 8 lanes: the stages h = 1, 2, 4 by lane permutes, the wider ones on whole vectors.
template <bool BF16>
void rotate_row8(float* w, const float* scale, int64_t k, int64_t pow2) {
  for (int64_t j = 0; j < k; j += 8) {
    __m256 v = to_dtype8<BF16>(_mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(scale + j)));
    v = butterfly8<BF16, 0xAA>(v, _mm256_permute_ps(v, 0xB1));             // h = 1: swap neighbours
    v = butterfly8<BF16, 0xCC>(v, _mm256_permute_ps(v, 0x4E));             // h = 2: swap pairs
    v = butterfly8<BF16, 0xF0>(v, _mm256_permute2f128_ps(v, v, 0x01));     // h = 4: swap halves
    _mm256_storeu_ps(w + j, v);
  }
  for (int64_t h = 8; h < pow2; h *= 2)
    for (int64_t block = 0; block < k; block += 2 * h)
      for (int64_t j = block; j < block + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(w + j), b = _mm256_loadu_ps(w + j + h);
        _mm256_storeu_ps(w + j, to_dtype8<BF16>(_mm256_add_ps(a, b)));
        _mm256_storeu_ps(w + j + h, to_dtype8<BF16>(_mm256_sub_ps(a, b)));
      }
}

template <bool BF16>
void rotate(float* w, const float* scale, int64_t k, int64_t pow2) {
  if (pow2 >= 8)
    rotate_row8<BF16>(w, scale, k, pow2);
  else
    rotate_row<BF16>(w, scale, k, pow2);
}

// x fp32 or bf16 [M, K], scale [K] in x's dtype, pow2 dividing K -> the FWHT of x * scale, in x's dtype.
torch::Tensor scale_and_fwht(torch::Tensor x, torch::Tensor scale, int64_t pow2) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "scale_and_fwht: fp32 or bf16 [M, K] input");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(scale.numel() == k && scale.scalar_type() == x.scalar_type(), "scale_and_fwht: scale [K] in x's dtype");
  TORCH_CHECK(pow2 >= 1 && (pow2 & (pow2 - 1)) == 0 && k % pow2 == 0, "scale_and_fwht: pow2 must be a power of two dividing K");
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const auto xf = x.contiguous().to(torch::kFloat32);  // bf16 -> fp32 is exact
  const auto sf = scale.contiguous().to(torch::kFloat32);
  auto out = torch::empty({m, k}, torch::kFloat32);
  const float *src = xf.data_ptr<float>(), *sp = sf.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, m, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      std::memcpy(dst + r * k, src + r * k, k * sizeof(float));
      if (bf16)
        rotate<true>(dst + r * k, sp, k, pow2);
      else
        rotate<false>(dst + r * k, sp, k, pow2);
    }
  });
  return bf16 ? out.to(torch::kBFloat16) : out;  // the values are bf16 numbers: the cast is exact
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("scale_and_fwht", &scale_and_fwht, "the Hadamard rotation's input scale and FWHT, rounded as torch");
}
