// The W8A8 linear for AVX2 CPUs without VNNI: per-token activation quantization, an exact integer GEMM on
// `vpmaddwd`, and the fp32 epilogue, in one call (see cpu_int16.py for why this route).
//
// Codes are widened to int16 and packed so that one `vpmaddwd` multiplies a pair of K values of one
// activation row (broadcast as an int32) with the same pair of 16 weight columns and adds the two products
// in int32: exact for activation codes in [-128, 127] and weights `code - zero` in [-255, 255].
//   weights:     [N/16 panels][K/2 pairs][16 columns][2]   (packed once per weight, zero points folded in)
//   activations: [M/4 panels][K/2 pairs][4 rows][2]        (quantized and packed per call)
// Per column panel, a 4 x 16 register tile (8 ymm accumulators) runs over K in blocks of KC_PAIRS pairs (the
// weight block stays in L1 while every row panel passes; K = 1152 is two blocks), keeping partial sums per
// thread between blocks; the last block applies
// the epilogue `((float)acc * w_scale[n]) * x_scale[m] + bias[n]`. Every float step is the one
// quant.formats.quantize_activation_per_token and torch_ops.linear_int take, in their order (IEEE division,
// round half to even, no FMA contraction: built with -ffp-contract=off), so the result is bit-identical.
// `linear_grouped` (group-wise weight scales) blocks K by whole groups and sums each group's exact int32 result into
// fp32 with its scale, in the torch path's order; with AVX-512 VNNI it runs on `vpdpbusd` over an int8 layout.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <unistd.h>

#include "cpu_quantize.h"

namespace {

constexpr int64_t NR = 16;         // columns per weight panel
constexpr int64_t MR = 4;          // rows per activation panel
constexpr int64_t KC_PAIRS = 288;  // K pairs per block: the 16 x 576 int16 weight block (18 KiB) stays in a 32 KiB L1

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }


// acc (8 vectors: row r, columns 8h..8h+7 at 2r + h) += the 4 x 16 tile product over `pairs` K pairs.
// Named accumulators, not an array: GCC keeps them in registers. Not inlined: compiled on its own, the loop
// keeps every accumulator in place (inlined into the caller, GCC spills and copies them).
// `MADD(c, x, b)` is c + (pairwise products of x and b, summed in int32): `vpmaddwd` + `vpaddd` on AVX2, one
// `vpdpwssd` with VNNI (the same int32 result, wrapping, never saturating).
// One K unit (a pair of int16, or a quad of int8: 4 bytes per row and per column) of the 4 x 16 tile into c0..c7.
#define VIDITQ_TILE_STEP(MADD)                                                                                 \
  {                                                                                                            \
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b));                                 \
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + 16));                            \
    __m256i x = _mm256_broadcastd_epi32(_mm_loadu_si32(a));                                                    \
    c0 = MADD(c0, x, b0);                                                                                      \
    c1 = MADD(c1, x, b1);                                                                                      \
    x = _mm256_broadcastd_epi32(_mm_loadu_si32(a + 2));                                                        \
    c2 = MADD(c2, x, b0);                                                                                      \
    c3 = MADD(c3, x, b1);                                                                                      \
    x = _mm256_broadcastd_epi32(_mm_loadu_si32(a + 4));                                                        \
    c4 = MADD(c4, x, b0);                                                                                      \
    c5 = MADD(c5, x, b1);                                                                                      \
    x = _mm256_broadcastd_epi32(_mm_loadu_si32(a + 6));                                                        \
    c6 = MADD(c6, x, b0);                                                                                      \
    c7 = MADD(c7, x, b1);                                                                                      \
  }

#define VIDITQ_TILE_4X16(NAME, TARGET, MADD)                                                                    \
  __attribute__((noinline, target(TARGET))) void NAME(const int16_t* a, const int16_t* b, int64_t pairs,       \
                                                       __m256i* acc) {                                         \
    __m256i c0 = acc[0], c1 = acc[1], c2 = acc[2], c3 = acc[3], c4 = acc[4], c5 = acc[5], c6 = acc[6],         \
            c7 = acc[7];                                                                                       \
    _Pragma("GCC unroll 2")                                                                                    \
    for (int64_t i = 0; i < pairs; i++, a += MR * 2, b += NR * 2) VIDITQ_TILE_STEP(MADD)                       \
    acc[0] = c0, acc[1] = c1, acc[2] = c2, acc[3] = c3, acc[4] = c4, acc[5] = c5, acc[6] = c6, acc[7] = c7;    \
  }

// The group-wise tile over `groups` whole groups of `units` K units: per group the int32 sums c (less `corr`, the
// int8 layout's offset correction, where given), then y = (float)c * scale (the block's first group when `first`)
// or y = y + (float)c * scale, in registers (AVX-512VL has 32 of them: 8 int32 and 8 fp32 accumulators fit).
#define VIDITQ_PART(c, s) _mm256_mul_ps(_mm256_cvtepi32_ps(c), s)
#define VIDITQ_GROUP_TILE(NAME, TARGET, MADD)                                                                   \
  __attribute__((noinline, target(TARGET))) void NAME(const int16_t* a, const int16_t* b, int64_t groups,      \
                                                       int64_t units, const int32_t* corr, const float* scale, \
                                                       bool first, __m256* y) {                                \
    __m256 y0 = y[0], y1 = y[1], y2 = y[2], y3 = y[3], y4 = y[4], y5 = y[5], y6 = y[6], y7 = y[7];             \
    for (int64_t g = 0; g < groups; g++, scale += NR) {                                                        \
      /* the sums start at -corr (wrapping int32: the same p_g as subtracting it after, in 2 ops instead of 8) */ \
      __m256i k0 = _mm256_setzero_si256(), k1 = k0;                                                            \
      if (corr) {                                                                                              \
        k0 = _mm256_sub_epi32(k0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr)));                 \
        k1 = _mm256_sub_epi32(k1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + 8)));             \
        corr += NR;                                                                                            \
      }                                                                                                        \
      __m256i c0 = k0, c1 = k1, c2 = k0, c3 = k1, c4 = k0, c5 = k1, c6 = k0, c7 = k1;                          \
      _Pragma("GCC unroll 2")                                                                                  \
      for (int64_t i = 0; i < units; i++, a += MR * 2, b += NR * 2) VIDITQ_TILE_STEP(MADD)                     \
      const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);                               \
      if (first && g == 0) {                                                                                   \
        y0 = VIDITQ_PART(c0, s0), y1 = VIDITQ_PART(c1, s1), y2 = VIDITQ_PART(c2, s0);                          \
        y3 = VIDITQ_PART(c3, s1), y4 = VIDITQ_PART(c4, s0), y5 = VIDITQ_PART(c5, s1);                          \
        y6 = VIDITQ_PART(c6, s0), y7 = VIDITQ_PART(c7, s1);                                                    \
      } else {                                                                                                 \
        y0 = _mm256_add_ps(y0, VIDITQ_PART(c0, s0)), y1 = _mm256_add_ps(y1, VIDITQ_PART(c1, s1));              \
        y2 = _mm256_add_ps(y2, VIDITQ_PART(c2, s0)), y3 = _mm256_add_ps(y3, VIDITQ_PART(c3, s1));              \
        y4 = _mm256_add_ps(y4, VIDITQ_PART(c4, s0)), y5 = _mm256_add_ps(y5, VIDITQ_PART(c5, s1));              \
        y6 = _mm256_add_ps(y6, VIDITQ_PART(c6, s0)), y7 = _mm256_add_ps(y7, VIDITQ_PART(c7, s1));              \
      }                                                                                                        \
    }                                                                                                          \
    y[0] = y0, y[1] = y1, y[2] = y2, y[3] = y3, y[4] = y4, y[5] = y5, y[6] = y6, y[7] = y7;                    \
  }

#define VIDITQ_MADD_AVX2(c, x, b) _mm256_add_epi32(c, _mm256_madd_epi16(x, b))
#define VIDITQ_MADD_VNNI(c, x, b) _mm256_dpwssd_epi32(c, x, b)
#define VIDITQ_MADD_U8S8(c, x, b) _mm256_dpbusd_epi32(c, x, b)
VIDITQ_TILE_4X16(tile_4x16_avx2, "avx2", VIDITQ_MADD_AVX2)
VIDITQ_TILE_4X16(tile_4x16_vnni, "avx2,avx512f,avx512vl,avx512vnni", VIDITQ_MADD_VNNI)
// The int8 layout (`pack_weight_s8`): K in quads of u8 activations (code + 128) x s8 weights; one unit is 4 bytes per
// row or column, as a pair of int16 is, so the same tile loop walks it. `vpdpbusd` adds 4 products in int32 (wrapping,
// exact), twice the multiply-adds of `vpdpwssd`.
VIDITQ_GROUP_TILE(group_tile_avx2, "avx2", VIDITQ_MADD_AVX2)
VIDITQ_GROUP_TILE(group_tile_vnni, "avx2,avx512f,avx512vl,avx512vnni", VIDITQ_MADD_VNNI)
VIDITQ_GROUP_TILE(group_tile_u8s8, "avx2,avx512f,avx512vl,avx512vnni", VIDITQ_MADD_U8S8)
using GroupTileFn = void (*)(const int16_t*, const int16_t*, int64_t, int64_t, const int32_t*, const float*, bool,
                             __m256*);

using TileFn = void (*)(const int16_t*, const int16_t*, int64_t, __m256i*);

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
}

// The microkernel this CPU runs: VNNI's fused multiply-add where the CPU has AVX-512 VNNI (`microkernel` switches
// it, for the tests that hold both to the torch path).
TileFn tile_4x16 = cpu_has_vnni() ? tile_4x16_vnni : tile_4x16_avx2;

}  // namespace

// codes int8 [N, K] (zero int8 [N] or [N, G] or None: one zero point per channel or per group of K / G inputs)
// -> int16 panels [ceil(N/16), ceil(K/2), 16, 2] of codes - zero.
torch::Tensor pack_weight(torch::Tensor codes, c10::optional<torch::Tensor> zero) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8, "pack_weight: int8 [N, K] codes");
  codes = codes.contiguous();
  const int64_t n = codes.size(0), k = codes.size(1), pairs = ceil_div(k, 2), panels = ceil_div(n, NR);
  auto out = torch::zeros({panels, pairs, NR, 2}, torch::kInt16);
  const int8_t* c = codes.data_ptr<int8_t>();
  torch::Tensor z;
  if (zero.has_value()) z = zero->to(torch::kInt8).contiguous().reshape({n, -1});
  const int64_t groups = z.defined() ? z.size(1) : 1;
  TORCH_CHECK(k % groups == 0, "pack_weight: K must be a multiple of the number of zero-point groups");
  const int64_t size = k / groups;
  const int8_t* zp = z.defined() ? z.data_ptr<int8_t>() : nullptr;
  int16_t* p = out.data_ptr<int16_t>();
  for (int64_t col = 0; col < n; col++) {
    int16_t* dst = p + (col / NR) * pairs * NR * 2 + (col % NR) * 2;
    for (int64_t j = 0; j < k; j++) {
      const int16_t offset = zp ? zp[col * groups + j / size] : 0;
      dst[(j / 2) * NR * 2 + (j % 2)] = int16_t(c[col * k + j]) - offset;
    }
  }
  return out;
}

// codes int8 [N, K], zero int8 [N, G] or None -> (int8 panels [ceil(N/16), K/4, 16, 4] of codes - zero, which
// must fit int8 (W4; W8 without zero points), and int32 [ceil(N/16), G, 16]: 128 x each group's weight sum, what the
// u8 activations' offset of 128 adds to a group's sum).
std::vector<torch::Tensor> pack_weight_s8(torch::Tensor codes, c10::optional<torch::Tensor> zero, int64_t groups) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8, "pack_weight_s8: int8 [N, K] codes");
  codes = codes.contiguous();
  const int64_t n = codes.size(0), k = codes.size(1), panels = ceil_div(n, NR);
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups) % 4 == 0, "pack_weight_s8: groups of a multiple of 4");
  const int64_t size = k / groups, quads = k / 4;
  torch::Tensor z;
  if (zero.has_value()) z = zero->to(torch::kInt8).contiguous().reshape({n, groups});
  const int8_t* zp = z.defined() ? z.data_ptr<int8_t>() : nullptr;
  auto out = torch::zeros({panels, quads, NR, 4}, torch::kInt8);
  auto corr = torch::zeros({panels, groups, NR}, torch::kInt32);
  const int8_t* c = codes.data_ptr<int8_t>();
  int8_t* p = out.data_ptr<int8_t>();
  int32_t* q = corr.data_ptr<int32_t>();
  for (int64_t col = 0; col < n; col++) {
    int8_t* dst = p + (col / NR) * quads * NR * 4 + (col % NR) * 4;
    for (int64_t j = 0; j < k; j++) {
      const int d = int(c[col * k + j]) - (zp ? zp[col * groups + j / size] : 0);
      TORCH_CHECK(d >= -128 && d <= 127, "pack_weight_s8: code - zero = ", d, " does not fit int8");
      dst[(j / 4) * NR * 4 + (j % 4)] = int8_t(d);
      q[((col / NR) * groups + j / size) * NR + col % NR] += 128 * d;
    }
  }
  return {out, corr};
}

namespace {

// 4 rows of `words` 32-bit words (row r at `rows` + r * row_bytes) -> [words][4 rows], the panel layout both
// activation packs write (a word is a K pair of int16 codes or a K quad of u8 ones); 4 words at a time.
void interleave_4_rows(const void* rows, int64_t row_bytes, int64_t words, void* out) {
  static_assert(MR == 4, "a panel is a 4 x 4 transpose of 32-bit words");
  const char* src = static_cast<const char*>(rows);
  char* dst = static_cast<char*>(out);
  int64_t p = 0;
  for (; p + 4 <= words; p += 4) {
    __m128 r0 = _mm_loadu_ps(reinterpret_cast<const float*>(src + 0 * row_bytes + 4 * p));
    __m128 r1 = _mm_loadu_ps(reinterpret_cast<const float*>(src + 1 * row_bytes + 4 * p));
    __m128 r2 = _mm_loadu_ps(reinterpret_cast<const float*>(src + 2 * row_bytes + 4 * p));
    __m128 r3 = _mm_loadu_ps(reinterpret_cast<const float*>(src + 3 * row_bytes + 4 * p));
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // bit moves only (shuffles), no float arithmetic
    _mm_storeu_ps(reinterpret_cast<float*>(dst + (p + 0) * 16), r0);
    _mm_storeu_ps(reinterpret_cast<float*>(dst + (p + 1) * 16), r1);
    _mm_storeu_ps(reinterpret_cast<float*>(dst + (p + 2) * 16), r2);
    _mm_storeu_ps(reinterpret_cast<float*>(dst + (p + 3) * 16), r3);
  }
  for (; p < words; p++)
    for (int64_t r = 0; r < 4; r++) std::memcpy(dst + (p * 4 + r) * 4, src + r * row_bytes + 4 * p, 4);
}

// fp32 x [M, K] (K a multiple of 4) quantized per token, as u8 code + 128, packed as [ceil(M/4) panels][K/4 quads]
// [4 rows][4]; the token scales go to `x_scale` (ceil(M/4) * 4 entries, 0 past M).
torch::Tensor pack_activations_u8(const float* xp, int64_t m, int64_t k, std::vector<float>& x_scale) {
  const int64_t quads = k / 4, m_panels = ceil_div(m, MR);
  auto apack = torch::empty({m_panels, quads, MR, 4}, torch::kUInt8);
  x_scale.assign(m_panels * MR, 0.f);
  uint8_t* a = apack.data_ptr<uint8_t>();
  at::parallel_for(0, m_panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<int16_t> codes(k, 0);
    std::vector<uint8_t> rows(MR * k);  // the panel's 4 rows of u8 codes
    for (int64_t panel = p0; panel < p1; panel++) {
      for (int64_t r = 0; r < MR; r++) {
        const int64_t row = panel * MR + r;
        if (row < m) {
          x_scale[row] = viditq::quantize_row(xp + row * k, k, codes.data());
        } else {
          std::fill(codes.begin(), codes.end(), int16_t(0));  // rows past M: codes 0
        }
        uint8_t* dst = rows.data() + r * k;
        int64_t j = 0;
        for (; j + 16 <= k; j += 16) {  // code + 128 in [0, 255]: the unsigned pack is exact
          const __m256i v = _mm256_add_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes.data() + j)),
                                             _mm256_set1_epi16(128));
          const __m128i u = _mm_packus_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), u);
        }
        for (; j < k; j++) dst[j] = uint8_t(codes[j] + 128);
      }
      // one 32-bit word = one K quad of one row
      interleave_4_rows(rows.data(), k, quads, a + panel * quads * MR * 4);
    }
  });
  return apack;
}

// fp32 x [M, K] quantized per token and packed as [ceil(M/4) panels][ceil(K/2) pairs][4 rows][2] int16;
// the token scales go to `x_scale` (ceil(M/4) * 4 entries, 0 past M).
torch::Tensor pack_activations(const float* xp, int64_t m, int64_t k, std::vector<float>& x_scale) {
  const int64_t pairs = ceil_div(k, 2), m_panels = ceil_div(m, MR);
  auto apack = torch::empty({m_panels, pairs, MR, 2}, torch::kInt16);  // every element is written below
  x_scale.assign(m_panels * MR, 0.f);
  int16_t* a = apack.data_ptr<int16_t>();
  at::parallel_for(0, m_panels, 1, [&](int64_t p0, int64_t p1) {
    const int64_t stride = pairs * 2;  // one row's codes, K rounded up to even (the pad code is 0)
    std::vector<int16_t> rows(MR * stride, 0);
    for (int64_t panel = p0; panel < p1; panel++) {
      for (int64_t r = 0; r < MR; r++) {
        int16_t* codes = rows.data() + r * stride;
        if (panel * MR + r < m) {
          x_scale[panel * MR + r] = viditq::quantize_row(xp + (panel * MR + r) * k, k, codes);
        } else {
          std::memset(codes, 0, stride * sizeof(int16_t));  // rows past M: codes 0
        }
      }
      // one 32-bit word = one K pair of one row
      interleave_4_rows(rows.data(), stride * sizeof(int16_t), pairs, a + panel * pairs * MR * 2);
    }
  });
  return apack;
}

// The tile's fp32 results (row r, columns 8h..8h+7 at 2r + h) times x_scale (+ bias) into the output: whole tiles
// straight to the output rows, a ragged one through `vals`.
void store_tile(const __m256* y, const float* x_scale, const float* bcol, bool has_bias, float* o, int64_t m,
                int64_t n, int64_t rp, int64_t cp) {
  const bool whole = cp * NR + NR <= n && rp * MR + MR <= m;
  alignas(32) float vals[MR * NR];
  float* dst = whole ? o + rp * MR * n + cp * NR : vals;
  const int64_t ld = whole ? n : NR;
  for (int r = 0; r < MR; r++) {
    const __m256 s = _mm256_set1_ps(x_scale[rp * MR + r]);
    for (int h = 0; h < 2; h++) {
      __m256 v = _mm256_mul_ps(y[2 * r + h], s);
      if (has_bias) v = _mm256_add_ps(v, _mm256_load_ps(bcol + 8 * h));
      _mm256_storeu_ps(dst + r * ld + 8 * h, v);
    }
  }
  if (whole) return;
  const int64_t cols = std::min(NR, n - cp * NR);
  for (int r = 0; r < MR && rp * MR + r < m; r++)
    std::memcpy(o + (rp * MR + r) * n + cp * NR, vals + r * NR, cols * sizeof(float));
}

// How many row panels of packed activations (`units` 4-byte K units a row) stay in half of this core's L2 while every
// column panel of a thread passes over them: at K = 4608 the whole activation (2.4 MB at M = 512) does not, and
// streaming it from L3 once per column panel made the GEMM memory-bound. At least one panel.
int64_t row_panels_in_l2(int64_t units) {
  static const int64_t l2 = [] {
    const long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return bytes > 0 ? int64_t(bytes) : int64_t(512) << 10;  // unknown: the smallest L2 of the CPUs we run on
  }();
  return std::max<int64_t>(1, l2 / 2 / (units * 4 * MR));
}

}  // namespace

// fp32 x [M, K] -> ((float)(Q(x) @ (codes - zero)^T) * w_scale[n]) * x_scale[m] (+ bias[n]), fp32 [M, N].
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, int64_t n, torch::Tensor w_scale,
                     c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "linear: fp32 [M, K] input");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1), pairs = ceil_div(k, 2);
  const int64_t m_panels = ceil_div(m, MR), n_panels = ceil_div(n, NR);
  TORCH_CHECK(packed.scalar_type() == torch::kInt16 && packed.dim() == 4 && packed.size(0) == n_panels &&
              packed.size(1) == pairs, "linear: the packed weight does not match the input or N");
  auto out = torch::empty({m, n}, torch::kFloat32);
  if (m == 0 || n == 0) return out;
  const auto ws = w_scale.to(torch::kFloat32).contiguous().reshape({-1});
  TORCH_CHECK(ws.numel() == n, "linear: w_scale must have N elements");
  torch::Tensor bs;
  if (bias.has_value()) bs = bias->to(torch::kFloat32).contiguous().reshape({-1});
  const float* xp = x.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  const float* bsp = bs.defined() ? bs.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();

  std::vector<float> x_scale;
  const auto apack = pack_activations(xp, m, k, x_scale);
  const int16_t* a = apack.data_ptr<int16_t>();

  const int16_t* b = packed.data_ptr<int16_t>();
  const int64_t chunk = row_panels_in_l2(pairs);
  at::parallel_for(0, n_panels, 1, [&](int64_t c0, int64_t c1) {
    // int32 partial sums of one column panel between K blocks, one 4 x 16 tile per row panel of the chunk
    std::vector<int32_t> partial(pairs > KC_PAIRS ? chunk * MR * NR : 0);
    for (int64_t r0 = 0; r0 < m_panels; r0 += chunk)  // rows whose activations stay in L2, then every column panel
    for (int64_t cp = c0; cp < c1; cp++) {
      alignas(32) float wcol[NR], bcol[NR];
      for (int j = 0; j < NR; j++) {
        const int64_t col = cp * NR + j;
        wcol[j] = col < n ? wsp[col] : 0.f;
        bcol[j] = bsp && col < n ? bsp[col] : 0.f;
      }
      for (int64_t k0 = 0; k0 < pairs; k0 += KC_PAIRS) {
        const int64_t kp = std::min(KC_PAIRS, pairs - k0);
        const bool first = k0 == 0, last = k0 + kp == pairs;
        const int16_t* bp = b + (cp * pairs + k0) * NR * 2;  // this block of the panel stays in L1
        for (int64_t rp = r0; rp < std::min(r0 + chunk, m_panels); rp++) {
          __m256i acc[8];
          int32_t* tile = partial.empty() ? nullptr : partial.data() + (rp - r0) * MR * NR;
          for (int i = 0; i < 8; i++)
            acc[i] = first ? _mm256_setzero_si256()
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 8 * i));
          tile_4x16(a + (rp * pairs + k0) * MR * 2, bp, kp, acc);
          if (!last) {
            for (int i = 0; i < 8; i++) _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + 8 * i), acc[i]);
            continue;
          }
          __m256 y[8];
          for (int i = 0; i < 8; i++)
            y[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i]), _mm256_load_ps(wcol + 8 * (i & 1)));
          store_tile(y, x_scale.data(), bcol, bsp != nullptr, o, m, n, rp, cp);
        }
      }
    }
  });
  return out;
}

// Group-wise weight scales (`w_scale [N, G]`, groups of K / G inputs, an even size): per group, the exact int32
// sum p_g of the tile, then y = (float)p_0 * s_0, y = y + (float)p_g * s_g for g = 1..G-1 (mul then add, in
// torch_ops.linear_int's order), then y * x_scale[m] (+ bias[n]). K blocks hold whole groups; the fp32 sums of a
// column panel stay per thread between blocks.
// With `correction` (`pack_weight_s8`'s second tensor), `packed` is the int8 layout and the GEMM runs on
// `vpdpbusd` (AVX-512 VNNI): each group's sum less its correction is the same exact int32 p_g.
torch::Tensor linear_grouped(torch::Tensor x, torch::Tensor packed, int64_t n, torch::Tensor w_scale,
                             c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> correction) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "linear_grouped: fp32 [M, K] input");
  x = x.contiguous();
  const bool u8 = correction.has_value();
  const int64_t m = x.size(0), k = x.size(1), pairs = u8 ? k / 4 : ceil_div(k, 2);  // K units of 4 bytes a row
  const int64_t m_panels = ceil_div(m, MR), n_panels = ceil_div(n, NR);
  TORCH_CHECK(packed.scalar_type() == (u8 ? torch::kInt8 : torch::kInt16) && packed.dim() == 4 &&
              packed.size(0) == n_panels && packed.size(1) == pairs,
              "linear_grouped: the packed weight does not match the input or N");
  const auto ws = w_scale.to(torch::kFloat32).contiguous();
  TORCH_CHECK(ws.dim() == 2 && ws.size(0) == n, "linear_grouped: w_scale must be [N, G]");
  const int64_t groups = ws.size(1), unit = u8 ? 4 : 2;
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups) % unit == 0,
              "linear_grouped: K must split into groups of a multiple of ", unit);
  TORCH_CHECK(!u8 || (cpu_has_vnni() && correction->scalar_type() == torch::kInt32 &&
                      correction->numel() == n_panels * groups * NR),
              "linear_grouped: the int8 layout needs AVX-512 VNNI and its [N/16, G, 16] int32 correction");
  const int32_t* corr = u8 ? correction->data_ptr<int32_t>() : nullptr;
  const GroupTileFn group_tile = u8                              ? group_tile_u8s8
                                 : tile_4x16 == tile_4x16_vnni ? group_tile_vnni
                                                               : group_tile_avx2;
  auto out = torch::empty({m, n}, torch::kFloat32);
  if (m == 0 || n == 0) return out;
  const int64_t group_pairs = k / groups / unit, block = group_pairs * std::max<int64_t>(1, KC_PAIRS / group_pairs);
  torch::Tensor bs;
  if (bias.has_value()) bs = bias->to(torch::kFloat32).contiguous().reshape({-1});
  const float* bsp = bs.defined() ? bs.data_ptr<float>() : nullptr;
  const float* wsp = ws.data_ptr<float>();
  float* o = out.data_ptr<float>();

  std::vector<float> x_scale;
  const auto apack = u8 ? pack_activations_u8(x.data_ptr<float>(), m, k, x_scale)
                        : pack_activations(x.data_ptr<float>(), m, k, x_scale);
  // both layouts as 4-byte units (the tile loop steps and loads in bytes)
  const int16_t* a = reinterpret_cast<const int16_t*>(apack.data_ptr());
  const int16_t* b = reinterpret_cast<const int16_t*>(packed.data_ptr());
  const int64_t chunk = row_panels_in_l2(pairs);
  at::parallel_for(0, n_panels, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> partial(pairs > block ? chunk * MR * NR : 0);  // fp32 sums between K blocks
    std::vector<float> scol(groups * NR);  // this panel's scales, [G][16]
    for (int64_t r0 = 0; r0 < m_panels; r0 += chunk)  // rows whose activations stay in L2, then every column panel
    for (int64_t cp = c0; cp < c1; cp++) {
      alignas(32) float bcol[NR];
      for (int j = 0; j < NR; j++) {
        const int64_t col = cp * NR + j;
        bcol[j] = bsp && col < n ? bsp[col] : 0.f;
        for (int64_t g = 0; g < groups; g++) scol[g * NR + j] = col < n ? wsp[col * groups + g] : 0.f;
      }
      for (int64_t k0 = 0; k0 < pairs; k0 += block) {
        const int64_t kp = std::min(block, pairs - k0);
        const bool first = k0 == 0, last = k0 + kp == pairs;
        for (int64_t rp = r0; rp < std::min(r0 + chunk, m_panels); rp++) {
          __m256 y[8];
          float* tile = partial.empty() ? nullptr : partial.data() + (rp - r0) * MR * NR;
          for (int i = 0; i < 8; i++) y[i] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(tile + 8 * i);
          group_tile(a + (rp * pairs + k0) * MR * 2, b + (cp * pairs + k0) * NR * 2, kp / group_pairs, group_pairs,
                     u8 ? corr + (cp * groups + k0 / group_pairs) * NR : nullptr,
                     scol.data() + (k0 / group_pairs) * NR, first, y);
          if (!last) {
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(tile + 8 * i, y[i]);
            continue;
          }
          store_tile(y, x_scale.data(), bcol, bsp != nullptr, o, m, n, rp, cp);
        }
      }
    }
  });
  return out;
}

// The microkernel in use ("avx2" or "vnni"); `name` non-empty switches to it first (for tests).
std::string microkernel(const std::string& name) {
  TORCH_CHECK(name.empty() || name == "avx2" || (name == "vnni" && cpu_has_vnni()),
              "microkernel: \"avx2\", or \"vnni\" on a CPU with AVX-512 VNNI; got \"", name, "\"");
  if (!name.empty()) tile_4x16 = name == "vnni" ? tile_4x16_vnni : tile_4x16_avx2;
  return tile_4x16 == tile_4x16_vnni ? "vnni" : "avx2";
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("microkernel", &microkernel, "the GEMM microkernel in use; a name switches to it");
  module.def("pack_weight", &pack_weight, "int8 codes [N, K] (and zero points) -> int16 weight panels");
  module.def("linear", &linear, "per-token int8 quantization, exact integer GEMM and fp32 epilogue");
  module.def("linear_grouped", &linear_grouped, "the same with group-wise weight scales summed in fp32");
  module.def("pack_weight_s8", &pack_weight_s8, "int8 codes [N, K] (and zero points) -> int8 panels, correction");
}
