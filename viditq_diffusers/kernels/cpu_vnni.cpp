// The W8A8 / W4A8 linear on AVX-512 VNNI CPUs (see cpu_vnni.py): per-token quantization to int8, then an int8
// GEMM on `vpdpbusd` (exact int32 sums) whose epilogue applies the zero points, scales and bias to each 8 x 48
// register tile and writes fp32 or bf16 straight to the output. Bit for bit torch_ops.linear_int: the same codes,
// the same int32 sums, and its float steps in its order (no FMA contraction: built with -ffp-contract=off).
//
// `vpdpbusd` multiplies u8 by s8. The weights take the u8 side as `code + 128` (every int8 code fits), the
// activation codes the s8 side, broadcast 4 at a time from memory. So a tile's sum is
//   sum_k x (w + 128) = sum_k x w + 128 rowsum(x),
// and torch's `sum_k x w - rowsum(x) zero` is that sum less `rowsum(x) (zero + 128)`, one product per output.
// int32 arithmetic wraps, as torch's int32 does, so the two agree for every K.
//   weights:     [ceil(N/48) panels][ceil(K/4) quads][48 columns][4] u8, packed once per weight
//   activations: [ceil(M/8) panels][ceil(K/4) quads][8 rows][4] s8, quantized and packed per call
//
// The AVX-512 code sits in functions compiled for that target (`VNNI_TARGET`), called only after `vnni_ready()`
// said yes, so the module loads on any x86-64 CPU with AVX2.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_quantize.h"

// prfchw: every CPU with AVX-512 VNNI has PREFETCHW (Cascade Lake and Zen 4 on)
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,prfchw")))

namespace {

constexpr int64_t MR = 8;        // rows per activation panel (the register tile's rows)
constexpr int64_t NV = 3;        // 16-column vectors per weight panel
constexpr int64_t NR = 16 * NV;  // columns per weight panel
constexpr int64_t QUAD = 4;      // K values per `vpdpbusd` lane

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether this CPU has AVX-512 F, DQ, BW, VL and VNNI, and the OS saves the zmm registers.
bool vnni_ready() {
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE: xgetbv is there
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xe6) != 0xe6) return false;  // the OS saves the SSE, AVX, opmask and zmm state
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
    return avx512 && (c & (1u << 11));  // AVX512_VNNI
  }();
  return ready;
}

// Weight codes int8 [N, K] -> u8 `code + 128` in the panel layout, N padded to 48 and K to 4 with 0.
torch::Tensor pack_weight(torch::Tensor codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8, "pack_weight: int8 [N, K] codes");
  codes = codes.contiguous();
  const int64_t n = codes.size(0), k = codes.size(1), quads = ceil_div(k, QUAD), panels = ceil_div(n, NR);
  auto packed = torch::zeros({panels, quads, NR, QUAD}, torch::kUInt8);
  const int8_t* src = codes.data_ptr<int8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t col = r0; col < r1; col++) {
      uint8_t* panel = dst + (col / NR) * quads * NR * QUAD + (col % NR) * QUAD;
      for (int64_t j = 0; j < k; j++) panel[(j / QUAD) * NR * QUAD + j % QUAD] = uint8_t(src[col * k + j] + 128);
    }
  });
  return packed;
}

VNNI_TARGET inline __mmask16 first(int64_t count) {  // the first min(max(count, 0), 16) lanes
  return count >= 16 ? __mmask16(0xffff) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// 16 values from `src` (fp32, or bf16 widened exactly), the lanes past `mask` 0.
VNNI_TARGET inline __m512 load16(const float* src, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, src); }
VNNI_TARGET inline __m512 load16(const uint16_t* src, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src)), 16));
}

// One row quantized per token into row `r` of its activation panel `dst` (K codes, then 0 up to the quads);
// returns the scale, its code sum into `sum`. The float steps of viditq::quantize_row (cpu_quantize.h) and so of
// the torch path: absmax / 127, IEEE division by viditq::code_divisor, round half to even, clamp to [-128, 127].
template <typename T>
VNNI_TARGET float quantize_row(const T* src, int64_t k, int64_t quads, int8_t* dst, int64_t r, int32_t* sum) {
  // max |x| on the bit patterns with the sign cleared, as viditq::row_absmax: a NaN is never dropped
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512i vmax = _mm512_setzero_si512();
  for (int64_t j = 0; j < k; j += 16)
    vmax = _mm512_max_epu32(vmax, _mm512_and_si512(magnitude, _mm512_castps_si512(load16(src + j, first(k - j)))));
  const uint32_t bits = _mm512_reduce_max_epu32(vmax);
  float absmax;
  std::memcpy(&absmax, &bits, 4);
  const float scale = absmax / 127.0f;
  const __m512 divisor = _mm512_set1_ps(viditq::code_divisor(scale));  // 0, NaN and Inf scales as the torch path
  const __m512 lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
  __m512i total = _mm512_setzero_si512();
  for (int64_t j = 0; j < quads * QUAD; j += 16) {  // past k the lanes load 0 and quantize to 0
    __m512 v = _mm512_div_ps(load16(src + j, first(k - j)), divisor);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
    total = _mm512_add_epi32(total, q);
    alignas(16) int32_t words[4];  // 16 codes: 4 quads, each to its place in the panel
    _mm_store_si128(reinterpret_cast<__m128i*>(words), _mm512_cvtepi32_epi8(q));
    const int64_t q0 = j / QUAD;
    for (int64_t i = 0; i < std::min<int64_t>(4, quads - q0); i++)
      std::memcpy(dst + ((q0 + i) * MR + r) * QUAD, words + i, 4);
  }
  *sum = _mm512_reduce_add_epi32(total);
  return scale;
}

// x fp32 or bf16 [M, K] (rows `ld` elements apart) -> its activation panels in `a` (rows past M: codes 0), the
// scales and code sums of its rows.
template <typename T>
VNNI_TARGET void quantize_panels(const T* x, int64_t m, int64_t k, int64_t ld, int8_t* a, float* scale,
                                 int32_t* rowsum) {
  const int64_t quads = ceil_div(k, QUAD), panels = ceil_div(m, MR);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
      int8_t* panel = a + p * quads * MR * QUAD;
      if ((p + 1) * MR > m) std::memset(panel, 0, quads * MR * QUAD);
      for (int64_t r = 0; r < std::min(MR, m - p * MR); r++) {
        const int64_t row = p * MR + r;
        scale[row] = quantize_row(x + row * ld, k, quads, panel, r, rowsum + row);
      }
    }
  });
}

// The per-column epilogue operands, padded to whole panels with 0: zero point + 128 (128 where symmetric: the
// weights' u8 offset), weight scale, bias (empty: none).
struct Columns {
  std::vector<int32_t> offset;
  std::vector<float> scale, bias;
};

struct Problem {
  const int8_t* a;   // activation panels
  const uint8_t* b;  // weight panels
  const float* x_scale;
  const int32_t* rowsum;
  const Columns* columns;
  int64_t m, n, quads;
  float* out_f32;
  uint16_t* out_bf16;
};

// fp32 -> bf16 bits, round to nearest even (NaN -> 0x7fc0), as torch's conversion (not vcvtneps2bf16, which
// flushes subnormals).
VNNI_TARGET inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i h = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(h);
}

// acc (row r, columns 16v..16v+15 at 16 (NV r + v)) = the sums of an R x 48 tile over `quads` K quads (R <= 8: the
// panel's other rows are padding, not multiplied). Named accumulators, not an array: GCC keeps them in registers
// (with an array it stores every one to the stack at each step).
#define VIDITQ_ROW(r)                                                                              \
  if constexpr (R > r) {                                                                           \
    int32_t word;                                                                                  \
    std::memcpy(&word, a + QUAD * r, 4);                                                           \
    const __m512i x = _mm512_set1_epi32(word);                                                     \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, w0, x);                                                 \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, w1, x);                                                 \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, w2, x);                                                 \
  }
#define VIDITQ_STORE_ROW(r)                                                                        \
  if constexpr (R > r) {                                                                           \
    _mm512_store_si512(acc + 16 * (NV * r + 0), c##r##0);                                          \
    _mm512_store_si512(acc + 16 * (NV * r + 1), c##r##1);                                          \
    _mm512_store_si512(acc + 16 * (NV * r + 2), c##r##2);                                          \
  }

template <int R>
VNNI_TARGET __attribute__((noinline)) void tile_sums(const int8_t* a, const uint8_t* b, int64_t quads, int32_t* acc) {
  static_assert(NV == 3 && MR == 8, "the named accumulators are 8 rows x 3 vectors");
  const __m512i zero = _mm512_setzero_si512();
  __m512i c00 = zero, c01 = zero, c02 = zero, c10 = zero, c11 = zero, c12 = zero, c20 = zero, c21 = zero;
  __m512i c22 = zero, c30 = zero, c31 = zero, c32 = zero, c40 = zero, c41 = zero, c42 = zero, c50 = zero;
  __m512i c51 = zero, c52 = zero, c60 = zero, c61 = zero, c62 = zero, c70 = zero, c71 = zero, c72 = zero;
  for (int64_t q = 0; q < quads; q++, a += MR * QUAD, b += NR * QUAD) {
    const __m512i w0 = _mm512_loadu_si512(b), w1 = _mm512_loadu_si512(b + 64), w2 = _mm512_loadu_si512(b + 128);
    VIDITQ_ROW(0) VIDITQ_ROW(1) VIDITQ_ROW(2) VIDITQ_ROW(3) VIDITQ_ROW(4) VIDITQ_ROW(5) VIDITQ_ROW(6) VIDITQ_ROW(7)
  }
  VIDITQ_STORE_ROW(0) VIDITQ_STORE_ROW(1) VIDITQ_STORE_ROW(2) VIDITQ_STORE_ROW(3)
  VIDITQ_STORE_ROW(4) VIDITQ_STORE_ROW(5) VIDITQ_STORE_ROW(6) VIDITQ_STORE_ROW(7)
}

using SumsFn = void (*)(const int8_t*, const uint8_t*, int64_t, int32_t*);
const SumsFn TILE_SUMS[MR + 1] = {nullptr,       tile_sums<1>, tile_sums<2>, tile_sums<3>, tile_sums<4>,
                                  tile_sums<5>, tile_sums<6>, tile_sums<7>, tile_sums<8>};

// The output tile at row panel `rp`, column panel `cp`: its sums over the whole K, then, from L1,
// torch_ops.linear_int's epilogue ((float)(acc - rowsum zero) * w_scale) * x_scale (+ bias) and the cast.
VNNI_TARGET void tile(const Problem& p, int64_t rp, int64_t cp) {
  alignas(64) int32_t acc[MR * NR];
  const int64_t rows = std::min(MR, p.m - rp * MR), col0 = cp * NR;
  // fetch the output tile's lines for writing while the sums run: its stores then hit the cache instead of stalling
  // on the misses (the output is larger than L2 at DiT shapes)
  const int64_t bytes = p.out_f32 ? 4 : 2, width = std::min(NR, p.n - col0) * bytes;
  for (int64_t r = 0; r < rows; r++) {
    const char* line = p.out_f32 ? reinterpret_cast<const char*>(p.out_f32 + (rp * MR + r) * p.n + col0)
                                 : reinterpret_cast<const char*>(p.out_bf16 + (rp * MR + r) * p.n + col0);
    for (int64_t offset = 0; offset < width + 63; offset += 64)
      __builtin_prefetch(line + std::min(offset, width - 1), 1, 3);  // prefetchw: a hint, never faults
  }
  TILE_SUMS[rows](p.a + rp * p.quads * MR * QUAD, p.b + cp * p.quads * NR * QUAD, p.quads, acc);
  const Columns& cols = *p.columns;
  for (int64_t r = 0; r < rows; r++) {
    const int64_t row = rp * MR + r;
    const __m512i rowsum = _mm512_set1_epi32(p.rowsum[row]);
    const __m512 x_scale = _mm512_set1_ps(p.x_scale[row]);
    for (int64_t v = 0; v < NV; v++) {
      const int64_t col = col0 + 16 * v;
      const __mmask16 mask = first(p.n - col);
      if (!mask) break;
      const __m512i offset = _mm512_loadu_si512(cols.offset.data() + col);
      const __m512i sum = _mm512_load_si512(acc + 16 * (NV * r + v));
      const __m512i c = _mm512_sub_epi32(sum, _mm512_mullo_epi32(rowsum, offset));
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(c), _mm512_loadu_ps(cols.scale.data() + col));
      y = _mm512_mul_ps(y, x_scale);
      if (!cols.bias.empty()) y = _mm512_add_ps(y, _mm512_loadu_ps(cols.bias.data() + col));
      if (p.out_f32)
        _mm512_mask_storeu_ps(p.out_f32 + row * p.n + col, mask, y);
      else
        _mm256_mask_storeu_epi16(p.out_bf16 + row * p.n + col, mask, to_bf16(y));
    }
  }
}

// How many row panels of activations (`quads` 4-byte K units a row) stay in half of this core's L2 while a
// thread's column panels pass over them (at K = 4608, M = 512 the whole activation does not). At least one.
int64_t row_panels_in_l2(int64_t quads) {
  static const int64_t l2 = [] {
    const long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return bytes > 0 ? int64_t(bytes) : int64_t(512) << 10;  // unknown: the smallest L2 of the CPUs we run on
  }();
  return std::max<int64_t>(1, l2 / 2 / (quads * QUAD * MR));
}

// Tiles of row panels [rp0, rp1) x column panels [cp0, cp1) on this thread: rows in chunks whose activations stay
// in L2, every column panel against a chunk before the next.
VNNI_TARGET void tiles(const Problem& p, int64_t rp0, int64_t rp1, int64_t cp0, int64_t cp1) {
  const int64_t chunk = row_panels_in_l2(p.quads);
  for (int64_t r0 = rp0; r0 < rp1; r0 += chunk)
    for (int64_t cp = cp0; cp < cp1; cp++)
      for (int64_t rp = r0; rp < std::min(r0 + chunk, rp1); rp++) tile(p, rp, cp);
}

template <typename T>
void spread(const torch::Tensor& t, int64_t n, std::vector<T>& out, const char* what) {  // 1 or n values
  TORCH_CHECK(t.numel() == 1 || t.numel() == n, "linear: ", what, " must have 1 or N values, got ", t.numel());
  const T* src = t.data_ptr<T>();
  for (int64_t c = 0; c < n; c++) out[c] = src[t.numel() == 1 ? 0 : c];
}

Columns columns(int64_t n, int64_t np, const c10::optional<torch::Tensor>& zero, const torch::Tensor& w_scale,
                const c10::optional<torch::Tensor>& bias) {
  Columns cols;
  cols.scale.assign(np, 0.f);
  spread(w_scale.to(torch::kFloat32).contiguous(), n, cols.scale, "w_scale");
  cols.offset.assign(np, 0);
  if (zero.has_value()) spread(zero->to(torch::kInt32).contiguous(), n, cols.offset, "zero");
  for (int64_t c = 0; c < n; c++) cols.offset[c] += 128;  // the weights' u8 offset
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n, "linear: bias must have N = ", n, " values, got ", bias->numel());
    cols.bias.assign(np, 0.f);
    spread(bias->to(torch::kFloat32).contiguous(), n, cols.bias, "bias");
  }
  return cols;
}

// x fp32 or bf16 [M, K] -> (s8 activation panels [ceil(M/8), ceil(K/4), 8, 4], scale fp32 [M], code sums int32
// [M]): quant.formats.quantize_activation_per_token's codes and scales on x in fp32 (for the tests; `linear`
// quantizes into its own buffer).
std::vector<torch::Tensor> quantize(torch::Tensor x) {
  TORCH_CHECK(vnni_ready(), "quantize: this CPU has no AVX-512 VNNI (check vnni_ready() first)");
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "quantize: fp32 or bf16 [M, K] input");
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1), ld = x.stride(0);
  auto codes = torch::empty({ceil_div(m, MR), ceil_div(k, QUAD), MR, QUAD}, torch::kInt8);
  auto scale = torch::empty({m}, torch::kFloat32);
  auto rowsum = torch::empty({m}, torch::kInt32);
  if (x.scalar_type() == torch::kBFloat16)
    quantize_panels(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), m, k, ld, codes.data_ptr<int8_t>(),
                    scale.data_ptr<float>(), rowsum.data_ptr<int32_t>());
  else
    quantize_panels(x.data_ptr<float>(), m, k, ld, codes.data_ptr<int8_t>(), scale.data_ptr<float>(),
                    rowsum.data_ptr<int32_t>());
  return {codes, scale, rowsum};
}

// x fp32 or bf16 [M, K] x `packed` (pack_weight of [n, K] codes) -> [M, n] in x's dtype:
// ((float)(Q(x) @ codes^T - rowsum zero) * w_scale) * x_scale (+ bias), zero / w_scale per channel or per tensor.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, int64_t n, c10::optional<torch::Tensor> zero,
                     torch::Tensor w_scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(vnni_ready(), "linear: this CPU has no AVX-512 VNNI (check vnni_ready() first)");
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "linear: fp32 or bf16 [M, K] input");
  const int64_t m = x.size(0), k = x.size(1), quads = ceil_div(k, QUAD);
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 4 && packed.is_contiguous() &&
              packed.size(1) == quads && packed.size(2) == NR && packed.size(0) == ceil_div(n, NR),
              "linear: the packed weight [", packed.sizes(), "] does not match K = ", k, " and N = ", n,
              "; pack it with pack_weight");
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  auto out = torch::empty({m, n}, x.scalar_type());
  if (m == 0 || n == 0) return out;
  const Columns cols = columns(n, packed.size(0) * NR, zero, w_scale, bias);
  const auto q = quantize(x);  // codes, x_scale, rowsum
  const Problem p{q[0].data_ptr<int8_t>(), packed.data_ptr<uint8_t>(), q[1].data_ptr<float>(),
                  q[2].data_ptr<int32_t>(), &cols, m, n, quads, bf16 ? nullptr : out.data_ptr<float>(),
                  bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr};
  const int64_t row_panels = ceil_div(m, MR), col_panels = packed.size(0);
  if (col_panels >= at::get_num_threads())  // split the columns: each thread reads only its weights
    at::parallel_for(0, col_panels, 1, [&](int64_t c0, int64_t c1) { tiles(p, 0, row_panels, c0, c1); });
  else
    at::parallel_for(0, row_panels, 1, [&](int64_t r0, int64_t r1) { tiles(p, r0, r1, 0, col_panels); });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("vnni_ready", &vnni_ready, "whether this CPU has AVX-512 VNNI (and the OS saves the zmm registers)");
  module.def("pack_weight", &pack_weight, "int8 [N, K] weight codes as u8 code + 128 in the VNNI panel layout");
  module.def("quantize", &quantize, "per-token int8 quantization into the activation panels, with row sums");
  module.def("linear", &linear, "per-token quantization, the int8 GEMM on vpdpbusd and the fused epilogue");
}
