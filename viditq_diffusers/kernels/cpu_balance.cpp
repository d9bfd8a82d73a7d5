// The Hadamard rotation's elementwise part on CPU (see cpu_balance.py): the input scale (random signs / sqrt(n))
// and the fast Walsh-Hadamard transform over each run of `pow2` channels, one pass per row instead of a dozen
// torch ops over the whole tensor. Every step is rounded to x's dtype as torch rounds it (fp32: IEEE; bf16:
// computed in fp32, rounded to nearest even), in quant.hadamard.rotate's order, so the bits are its bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace {

inline float round_bf16(float f) {  // to the nearest bf16, ties to even, as torch's conversion (NaN stays NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  u = (u & 0x7fffffffu) > 0x7f800000u ? u : rounded;  // a select, not a branch: the loops stay vectorized
  std::memcpy(&f, &u, 4);
  return f;
}

template <bool BF16>
inline float to_dtype(float f) { return BF16 ? round_bf16(f) : f; }

// One row in place (fp32 values that are exact in the dtype): w * scale, then the butterflies of
// hadamard._fwht, pairs (i, i + h) -> (a + b, a - b) for h = 1, 2, ..., pow2 / 2 within each run of pow2.
// Stages h < 8 run per 8 values in registers; the wider ones are contiguous and vectorize.
template <bool BF16>
void rotate_row(float* w, const float* scale, int64_t k, int64_t pow2) {
  for (int64_t j = 0; j < k; j++) w[j] = to_dtype<BF16>(w[j] * scale[j]);
  const int64_t narrow = pow2 < 8 ? pow2 : 8;
  for (int64_t base = 0; base < k; base += narrow) {
    float v[8];
    for (int64_t i = 0; i < narrow; i++) v[i] = w[base + i];
    for (int64_t h = 1; h < narrow; h *= 2)
      for (int64_t block = 0; block < narrow; block += 2 * h)
        for (int64_t j = block; j < block + h; j++) {
          const float a = v[j], b = v[j + h];
          v[j] = to_dtype<BF16>(a + b);
          v[j + h] = to_dtype<BF16>(a - b);
        }
    for (int64_t i = 0; i < narrow; i++) w[base + i] = v[i];
  }
  for (int64_t h = 8; h < pow2; h *= 2)
    for (int64_t block = 0; block < k; block += 2 * h) {
      float* lo = w + block;
      float* hi = w + block + h;
#pragma GCC ivdep
      for (int64_t j = 0; j < h; j++) {
        const float a = lo[j], b = hi[j];
        lo[j] = to_dtype<BF16>(a + b);
        hi[j] = to_dtype<BF16>(a - b);
      }
    }
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
        rotate_row<true>(dst + r * k, sp, k, pow2);
      else
        rotate_row<false>(dst + r * k, sp, k, pow2);
    }
  });
  return bf16 ? out.to(torch::kBFloat16) : out;  // the values are bf16 numbers: the cast is exact
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("scale_and_fwht", &scale_and_fwht, "the Hadamard rotation's input scale and FWHT, rounded as torch");
}
