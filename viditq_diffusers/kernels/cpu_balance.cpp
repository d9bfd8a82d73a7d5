// Channel balancing before a CPU integer linear, one pass per row (see cpu_balance.py): the smoothing multiply,
// the rotation's input scale (random signs / sqrt(n)), the dense Hadamard factor H_p over the p axis and the fast
// Walsh-Hadamard transform over each run of pow2 channels, in quant.hadamard.rotate_kernel_order's order and
// rounding: every step is rounded to x's dtype as torch rounds it (fp32: IEEE; bf16: computed in fp32, rounded to
// nearest even), and the H_p sum runs in fp32 over c = 0, 1, ..., p - 1 from +0, rounded to x's dtype once.
// The row stays in cache from its load to its store. AVX2, or AVX-512 where the CPU has it (runtime dispatch).
//
// NaN in bf16: the vector steps round without a NaN check and the row's store writes every NaN as 0x7fc0 (torch
// itself writes 0x7fc0 or 0xffff, by code path: NaN payloads are not part of the contract). A NaN stays a NaN:
// every NaN here has its low 16 bits 0 (a bf16 input's, the default NaN of Inf - Inf, or an operand's NaN passed
// on), so the rounding (u + 0x7fff + lsb, low half cleared) leaves it a NaN; the other values round as torch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "cpu_bf16.h"

namespace {

template <bool BF16>
inline float to_dtype(float f) {  // rounded to x's dtype, as torch rounds (cpu_bf16.h)
  if (!BF16) return f;
  const uint32_t bits = viditq::bf16_rounded_bits(f);
  std::memcpy(&f, &bits, 4);
  return f;
}

// 8 lanes rounded to x's dtype as torch rounds, a NaN left a NaN of another payload (see the top).
inline __m256i bf16_rounded_bits8_any_nan(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb),
                          _mm256_set1_epi32(int(0xffff0000u)));
}

template <bool BF16>
inline __m256 to_dtype8(__m256 v) { return BF16 ? _mm256_castsi256_ps(bf16_rounded_bits8_any_nan(v)) : v; }

// 8 values of row x (fp32 or bf16) as fp32 (bf16 -> fp32 is a 16-bit shift: exact).
template <bool BF16>
inline __m256 load8(const void* x, int64_t j) {
  if (!BF16) return _mm256_loadu_ps(static_cast<const float*>(x) + j);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + j));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <bool BF16>
inline float load1(const void* x, int64_t j) {
  if (!BF16) return static_cast<const float*>(x)[j];
  const uint32_t bits = uint32_t(static_cast<const uint16_t*>(x)[j]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// w = (x * smooth) * scale, each product rounded to the dtype (smooth may be null: no smoothing). As
// channel_balance.balance_activation_kernel_order: `x * smoothing` first, then hadamard's `x * scale`.
template <bool BF16>
void scale_row(const void* x, const float* smooth, const float* scale, float* w, int64_t k) {
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    __m256 v = load8<BF16>(x, j);
    if (smooth) v = to_dtype8<BF16>(_mm256_mul_ps(v, _mm256_loadu_ps(smooth + j)));
    _mm256_storeu_ps(w + j, to_dtype8<BF16>(_mm256_mul_ps(v, _mm256_loadu_ps(scale + j))));
  }
  for (; j < k; j++) {
    float v = load1<BF16>(x, j);
    if (smooth) v = to_dtype<BF16>(v * smooth[j]);
    w[j] = to_dtype<BF16>(v * scale[j]);
  }
}

// The dense factor: u[a, b] = sum over c ascending of h[a * p + c] * w[c, b] (h = H_p transposed, entries +-1, so
// each product is exact and fma(h, w, acc) rounds as acc + h * w), from acc = +0, rounded to the dtype once.
// Rows [p, pow2], one scalar column at a time: the reference for pow2 < 8.
template <bool BF16>
void dense_scalar(const float* w, const float* h, float* u, int64_t p, int64_t pow2) {
  for (int64_t a = 0; a < p; a++)
    for (int64_t b = 0; b < pow2; b++) {
      float acc = 0.f;
      for (int64_t c = 0; c < p; c++) acc = acc + h[a * p + c] * w[c * pow2 + b];
      u[a * pow2 + b] = to_dtype<BF16>(acc);
    }
}

// The same on 8 lanes, NA outputs a at a time for NB vectors of b: NA * NB independent sums in flight.
template <bool BF16, int NA, int NB>
inline void dense8_block(const float* w, const float* h, float* u, int64_t a0, int64_t b0, int64_t p, int64_t pow2) {
  __m256 acc[NA][NB];
  for (int i = 0; i < NA; i++)
    for (int v = 0; v < NB; v++) acc[i][v] = _mm256_setzero_ps();
  for (int64_t c = 0; c < p; c++) {
    __m256 x[NB];
    for (int v = 0; v < NB; v++) x[v] = _mm256_loadu_ps(w + c * pow2 + b0 + 8 * v);
    for (int i = 0; i < NA; i++) {
      const __m256 s = _mm256_set1_ps(h[(a0 + i) * p + c]);
      for (int v = 0; v < NB; v++) acc[i][v] = _mm256_fmadd_ps(s, x[v], acc[i][v]);
    }
  }
  for (int i = 0; i < NA; i++)
    for (int v = 0; v < NB; v++) _mm256_storeu_ps(u + (a0 + i) * pow2 + b0 + 8 * v, to_dtype8<BF16>(acc[i][v]));
}

template <bool BF16>
void dense8(const float* w, const float* h, float* u, int64_t p, int64_t pow2) {  // pow2 a multiple of 8
  for (int64_t b = 0; b < pow2;) {
    if (b + 32 <= pow2) {
      int64_t a = 0;
      for (; a + 2 <= p; a += 2) dense8_block<BF16, 2, 4>(w, h, u, a, b, p, pow2);
      for (; a < p; a++) dense8_block<BF16, 1, 4>(w, h, u, a, b, p, pow2);
      b += 32;
    } else {
      int64_t a = 0;
      for (; a + 4 <= p; a += 4) dense8_block<BF16, 4, 1>(w, h, u, a, b, p, pow2);
      for (; a < p; a++) dense8_block<BF16, 1, 1>(w, h, u, a, b, p, pow2);
      b += 8;
    }
  }
}

// The AVX-512 row (pow2 a multiple of 32): the same steps on 16 lanes, the FWHT's stages h = 1 .. 16 done on each
// 32-channel chunk in registers as it leaves the H_p sum (or the scale, for p = 1), the wider ones over the row.
#define AVX512_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))

template <bool BF16>
AVX512_TARGET inline __m512 to_dtype16(__m512 v) {  // as to_dtype8
  if (!BF16) return v;
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb),
                                              _mm512_set1_epi32(int(0xffff0000u))));
}

template <bool BF16>
AVX512_TARGET inline __m512 load16(const void* x, int64_t j) {
  if (!BF16) return _mm512_loadu_ps(static_cast<const float*>(x) + j);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + j));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <bool BF16>
AVX512_TARGET inline __m512 scale16(const void* x, const float* smooth, const float* scale, int64_t j) {
  __m512 v = load16<BF16>(x, j);
  if (smooth) v = to_dtype16<BF16>(_mm512_mul_ps(v, _mm512_loadu_ps(smooth + j)));
  return to_dtype16<BF16>(_mm512_mul_ps(v, _mm512_loadu_ps(scale + j)));
}

// As butterfly8: the lanes in UPPER take swapped - v, the others v + swapped.
template <bool BF16, int UPPER>
AVX512_TARGET inline __m512 butterfly16(__m512 v, __m512 swapped) {
  return to_dtype16<BF16>(_mm512_mask_blend_ps(UPPER, _mm512_add_ps(v, swapped), _mm512_sub_ps(swapped, v)));
}

// The stages h = 1, 2, 4, 8 in each vector (swap neighbours, pairs, 128-bit lanes, 256-bit halves), then h = 16
// between the chunk's two vectors.
template <bool BF16>
AVX512_TARGET inline void fwht32(__m512& lo, __m512& hi) {
  __m512* halves[2] = {&lo, &hi};
  for (__m512* half : halves) {
    __m512 v = *half;
    v = butterfly16<BF16, 0xAAAA>(v, _mm512_permute_ps(v, 0xB1));
    v = butterfly16<BF16, 0xCCCC>(v, _mm512_permute_ps(v, 0x4E));
    v = butterfly16<BF16, 0xF0F0>(v, _mm512_shuffle_f32x4(v, v, 0xB1));
    v = butterfly16<BF16, 0xFF00>(v, _mm512_shuffle_f32x4(v, v, 0x4E));
    *half = v;
  }
  const __m512 a = lo, b = hi;
  lo = to_dtype16<BF16>(_mm512_add_ps(a, b));
  hi = to_dtype16<BF16>(_mm512_sub_ps(a, b));
}

// dense8_block on 16 lanes, NA outputs for one 32-channel chunk, whose low FWHT stages follow in registers.
template <bool BF16, int NA>
AVX512_TARGET inline void dense16_block(const float* w, const float* h, float* u, int64_t a0, int64_t b0, int64_t p,
                                        int64_t pow2) {
  __m512 acc[NA][2];
  for (int i = 0; i < NA; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < p; c++) {
    const __m512 x0 = _mm512_loadu_ps(w + c * pow2 + b0), x1 = _mm512_loadu_ps(w + c * pow2 + b0 + 16);
    for (int i = 0; i < NA; i++) {
      const __m512 s = _mm512_set1_ps(h[(a0 + i) * p + c]);
      acc[i][0] = _mm512_fmadd_ps(s, x0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(s, x1, acc[i][1]);
    }
  }
  for (int i = 0; i < NA; i++) {
    __m512 lo = to_dtype16<BF16>(acc[i][0]), hi = to_dtype16<BF16>(acc[i][1]);
    fwht32<BF16>(lo, hi);
    _mm512_storeu_ps(u + (a0 + i) * pow2 + b0, lo);
    _mm512_storeu_ps(u + (a0 + i) * pow2 + b0 + 16, hi);
  }
}

// One row: x (smoothed, scaled) -> w, H_p sum and low stages -> u (p > 1), wide stages; the result is in u
// (p > 1) or w.
template <bool BF16>
AVX512_TARGET __attribute__((noinline)) void rotate_row16(const void* x, const float* smooth, const float* scale,
                                                            const float* h, float* w, float* u, int64_t k, int64_t p,
                                                            int64_t pow2) {
  float* row = w;
  if (p > 1) {
    for (int64_t j = 0; j < k; j += 16) _mm512_storeu_ps(w + j, scale16<BF16>(x, smooth, scale, j));
    for (int64_t b = 0; b < pow2; b += 32) {
      int64_t a = 0;
      for (; a + 6 <= p; a += 6) dense16_block<BF16, 6>(w, h, u, a, b, p, pow2);
      for (; a < p; a++) dense16_block<BF16, 1>(w, h, u, a, b, p, pow2);
    }
    row = u;
  } else {
    for (int64_t j = 0; j < k; j += 32) {
      __m512 lo = scale16<BF16>(x, smooth, scale, j), hi = scale16<BF16>(x, smooth, scale, j + 16);
      fwht32<BF16>(lo, hi);
      _mm512_storeu_ps(w + j, lo);
      _mm512_storeu_ps(w + j + 16, hi);
    }
  }
  int64_t step = 32;
  for (; 4 * step <= pow2; step *= 4)  // two stages per pass over the row: step and 2 step on 4 vectors
    for (int64_t block = 0; block < k; block += 4 * step)
      for (int64_t j = block; j < block + step; j += 16) {
        float* q = row + j;
        const __m512 a = _mm512_loadu_ps(q), b = _mm512_loadu_ps(q + step);
        const __m512 c = _mm512_loadu_ps(q + 2 * step), d = _mm512_loadu_ps(q + 3 * step);
        const __m512 ab = to_dtype16<BF16>(_mm512_add_ps(a, b)), a_b = to_dtype16<BF16>(_mm512_sub_ps(a, b));
        const __m512 cd = to_dtype16<BF16>(_mm512_add_ps(c, d)), c_d = to_dtype16<BF16>(_mm512_sub_ps(c, d));
        _mm512_storeu_ps(q, to_dtype16<BF16>(_mm512_add_ps(ab, cd)));
        _mm512_storeu_ps(q + 2 * step, to_dtype16<BF16>(_mm512_sub_ps(ab, cd)));
        _mm512_storeu_ps(q + step, to_dtype16<BF16>(_mm512_add_ps(a_b, c_d)));
        _mm512_storeu_ps(q + 3 * step, to_dtype16<BF16>(_mm512_sub_ps(a_b, c_d)));
      }
  for (; step < pow2; step *= 2)
    for (int64_t block = 0; block < k; block += 2 * step)
      for (int64_t j = block; j < block + step; j += 16) {
        const __m512 a = _mm512_loadu_ps(row + j), b = _mm512_loadu_ps(row + j + step);
        _mm512_storeu_ps(row + j, to_dtype16<BF16>(_mm512_add_ps(a, b)));
        _mm512_storeu_ps(row + j + step, to_dtype16<BF16>(_mm512_sub_ps(a, b)));
      }
}

bool avx512_here() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}

template <bool BF16>
void dense(const float* w, const float* h, float* u, int64_t p, int64_t pow2) {
  if (pow2 % 8 == 0)
    dense8<BF16>(w, h, u, p, pow2);
  else
    dense_scalar<BF16>(w, h, u, p, pow2);
}

// The butterflies of hadamard._fwht in place: pairs (i, i + h) -> (a + b, a - b) for h = 1, 2, ..., pow2 / 2
// within each run of pow2.
template <bool BF16>
void fwht_scalar(float* w, int64_t k, int64_t pow2) {
  for (int64_t h = 1; h < pow2; h *= 2)
    for (int64_t block = 0; block < k; block += 2 * h)
      for (int64_t j = block; j < block + h; j++) {
        const float a = w[j], b = w[j + h];
        w[j] = to_dtype<BF16>(a + b);
        w[j + h] = to_dtype<BF16>(a - b);
      }
}

// One butterfly stage inside 8 lanes: `swapped` holds each lane's partner; the lanes in `upper` (the b of each
// pair) take a - b = swapped - v, the others a + b = v + swapped (addition commutes exactly).
template <bool BF16, int UPPER>
inline __m256 butterfly8(__m256 v, __m256 swapped) {
  return to_dtype8<BF16>(_mm256_blend_ps(_mm256_add_ps(v, swapped), _mm256_sub_ps(swapped, v), UPPER));
}

// fwht_scalar for pow2 >= 8 on 8 lanes: the stages h = 1, 2, 4 by lane permutes, the wider ones on whole vectors.
template <bool BF16>
void fwht8(float* w, int64_t k, int64_t pow2) {
  for (int64_t j = 0; j < k; j += 8) {
    __m256 v = _mm256_loadu_ps(w + j);
    v = butterfly8<BF16, 0xAA>(v, _mm256_permute_ps(v, 0xB1));             // h = 1: swap neighbours
    v = butterfly8<BF16, 0xCC>(v, _mm256_permute_ps(v, 0x4E));             // h = 2: swap pairs
    v = butterfly8<BF16, 0xF0>(v, _mm256_permute2f128_ps(v, v, 0x01));     // h = 4: swap halves
    _mm256_storeu_ps(w + j, v);
  }
  int64_t h = 8;
  for (; 4 * h <= pow2; h *= 4)  // two stages per pass over the row: h and 2 h on 4 vectors
    for (int64_t block = 0; block < k; block += 4 * h)
      for (int64_t j = block; j < block + h; j += 8) {
        float* q = w + j;
        const __m256 a = _mm256_loadu_ps(q), b = _mm256_loadu_ps(q + h);
        const __m256 c = _mm256_loadu_ps(q + 2 * h), d = _mm256_loadu_ps(q + 3 * h);
        const __m256 ab = to_dtype8<BF16>(_mm256_add_ps(a, b)), a_b = to_dtype8<BF16>(_mm256_sub_ps(a, b));
        const __m256 cd = to_dtype8<BF16>(_mm256_add_ps(c, d)), c_d = to_dtype8<BF16>(_mm256_sub_ps(c, d));
        _mm256_storeu_ps(q, to_dtype8<BF16>(_mm256_add_ps(ab, cd)));
        _mm256_storeu_ps(q + 2 * h, to_dtype8<BF16>(_mm256_sub_ps(ab, cd)));
        _mm256_storeu_ps(q + h, to_dtype8<BF16>(_mm256_add_ps(a_b, c_d)));
        _mm256_storeu_ps(q + 3 * h, to_dtype8<BF16>(_mm256_sub_ps(a_b, c_d)));
      }
  for (; h < pow2; h *= 2)
    for (int64_t block = 0; block < k; block += 2 * h)
      for (int64_t j = block; j < block + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(w + j), b = _mm256_loadu_ps(w + j + h);
        _mm256_storeu_ps(w + j, to_dtype8<BF16>(_mm256_add_ps(a, b)));
        _mm256_storeu_ps(w + j + h, to_dtype8<BF16>(_mm256_sub_ps(a, b)));
      }
}

template <bool BF16>
void fwht(float* w, int64_t k, int64_t pow2) {
  if (pow2 >= 8)
    fwht8<BF16>(w, k, pow2);
  else
    fwht_scalar<BF16>(w, k, pow2);
}

// The fp32 row w (values exact in bf16) stored as bf16, every NaN as 0x7fc0.
void store_row(const float* w, void* out, int64_t k) {
  uint16_t* dst = static_cast<uint16_t*>(out);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {  // the low halves are 0: keep the high ones, in order
    const __m256 v = _mm256_loadu_ps(w + j);
    const __m256i bits = _mm256_blendv_epi8(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fc00000),
                                            _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m256i hi = _mm256_srli_epi32(bits, 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), packed);
  }
  for (; j < k; j++) dst[j] = uint16_t(viditq::bf16_rounded_bits(w[j]) >> 16);  // exact: only a NaN changes
}

template <bool BF16>
void balance_rows(const char* x, int64_t x_row_bytes, const float* smooth, const float* scale, const float* h,
                  char* out, int64_t out_row_bytes, int64_t m, int64_t k, int64_t p, int64_t pow2, bool avx512) {
  at::parallel_for(0, m, 4, [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(2 * k);
    for (int64_t r = r0; r < r1; r++) {
      const char* row = x + r * x_row_bytes;
      // w: the scaled row, u: the H_p sum (p > 1). An fp32 row ends in the output row itself, no copy.
      float* w = scratch.data();
      float* u = scratch.data() + k;
      float* dst = reinterpret_cast<float*>(out + r * out_row_bytes);
      if (!BF16) {
        if (p > 1) u = dst; else w = dst;
      }
      float* rotated = p > 1 ? u : w;
      if (avx512 && pow2 % 32 == 0) {
        rotate_row16<BF16>(row, smooth, scale, h, w, u, k, p, pow2);
      } else {
        scale_row<BF16>(row, smooth, scale, w, k);
        if (p > 1) dense<BF16>(w, h, u, p, pow2);
        fwht<BF16>(rotated, k, pow2);
      }
      if (BF16) store_row(rotated, dst, k);
    }
  });
}

// x fp32 or bf16 [M, K] (rows may be strided), smooth [K] in x's dtype or empty, scale [K] in x's dtype, h = H_p
// transposed [p, p] (+-1; empty for p = 1), K = p * pow2 -> (x diag(smooth)) R in x's dtype, in
// rotate_kernel_order's order. `allow_avx512` false: the AVX2 code on any CPU (tests hold both to the reference).
torch::Tensor balance(torch::Tensor x, torch::Tensor smooth, torch::Tensor scale, torch::Tensor h, int64_t pow2,
                      bool allow_avx512) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "balance: fp32 or bf16 [M, K] input");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(pow2 >= 1 && (pow2 & (pow2 - 1)) == 0 && k % pow2 == 0,
              "balance: pow2 must be a power of two dividing K");
  const int64_t p = k / pow2;
  TORCH_CHECK(scale.numel() == k && scale.scalar_type() == x.scalar_type(), "balance: scale [K] in x's dtype");
  TORCH_CHECK(smooth.numel() == 0 || (smooth.numel() == k && smooth.scalar_type() == x.scalar_type()),
              "balance: smooth [K] in x's dtype, or empty");
  TORCH_CHECK(p == 1 ? h.numel() == 0 : h.numel() == p * p, "balance: h [p, p] with p = K / pow2, empty for p = 1");
  if (x.stride(1) != 1 || (m > 1 && x.stride(0) < k)) x = x.contiguous();
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const auto sf = scale.contiguous().to(torch::kFloat32);  // bf16 -> fp32 is exact
  const auto mf = smooth.contiguous().to(torch::kFloat32);
  const auto hf = h.contiguous().to(torch::kFloat32);
  auto out = torch::empty({m, k}, x.options());
  const int64_t elem = x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const float* smooth_ptr = mf.numel() ? mf.data_ptr<float>() : nullptr;
  const float* h_ptr = hf.numel() ? hf.data_ptr<float>() : nullptr;
  const bool avx512 = allow_avx512 && avx512_here();
  const int64_t x_row_bytes = x.stride(0) * elem;
  if (bf16)
    balance_rows<true>(src, x_row_bytes, smooth_ptr, sf.data_ptr<float>(), h_ptr, dst, k * elem, m, k, p, pow2, avx512);
  else
    balance_rows<false>(src, x_row_bytes, smooth_ptr, sf.data_ptr<float>(), h_ptr, dst, k * elem, m, k, p, pow2,
                        avx512);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("balance", &balance, "channel balancing (smoothing, Hadamard rotation) in rotate_kernel_order's order",
             pybind11::arg("x"), pybind11::arg("smooth"), pybind11::arg("scale"), pybind11::arg("h"),
             pybind11::arg("pow2"), pybind11::arg("allow_avx512") = true);
  module.def("avx512", &avx512_here, "whether the H_p sum runs on AVX-512 on this CPU");
}
