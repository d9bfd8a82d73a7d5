// The W8A8 / W4A8 linear on Intel AMX (see cpu_amx.py): per-token quantization to int8, then an int8 x int8
// GEMM on the AMX tiles (`tdpbssd`, exact int32 sums) whose epilogue applies the zero points, scales and bias
// to each 32 x 32 block while it is in cache and writes fp32 or bf16 straight to the output. Bit for bit
// torch_ops.linear_int: the same codes, exact int32 sums, and its float steps in its order.
//
// The AMX and AVX-512 code sits in functions compiled for those targets (`AMX_TARGET`), called only after
// `amx_ready()` said yes, so the module loads on any x86-64 CPU with AVX2.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_quantize.h"

#define AMX_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq")))

namespace {

constexpr int64_t TILE = 16;        // a tile: 16 rows; an int32 tile holds 16 x 16 sums
constexpr int64_t TILE_K = 64;      // int8 values per tile row (64 bytes)
constexpr int64_t BLOCK = 32;       // an output block: 2 x 2 int32 tiles
constexpr int64_t CHUNK_BLOCKS = 8; // output blocks per column chunk: 256 columns of weights stay in L2

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Whether this CPU has AMX-INT8 (and the AVX-512 the epilogue uses) and Linux lets this process use the tiles
// (they need a permission: arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA).
// Whether this CPU has the AVX-512 subsets the quantization and the epilogue use (F, DQ, BW, VL).
bool avx512_ready() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
}

bool amx_ready() {
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!avx512_ready() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx = (d & (1u << 24)) && (d & (1u << 25));  // AMX-TILE, AMX-INT8
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return amx && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ready;
}

struct TileConfig {  // the 64-byte operand of ldtilecfg, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: the 2 x 2 int32 sums of a block; 4, 5: two 16-row strips of activations; 6, 7: two 16-column
// strips of weights.
AMX_TARGET void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; t++) {
    config.rows[t] = TILE;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
}

// Weight codes int8 [N, K] -> the tile layout [Np / 16][Kp / 64][16][64]: for each 16 columns and 64 inputs,
// 16 rows of 4 consecutive inputs x 16 columns (the `tdpbssd` B operand). N is padded to 32, K to 64, with 0.
torch::Tensor pack_weight(torch::Tensor codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8, "pack_weight: int8 [N, K] codes");
  codes = codes.contiguous();
  const int64_t n = codes.size(0), k = codes.size(1), kp = round_up(k, TILE_K);
  auto packed = torch::zeros({round_up(n, BLOCK) / TILE, kp / TILE_K, TILE, TILE_K}, torch::kInt8);
  const int8_t* src = codes.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
      for (int64_t c = 0; c < k; c++) {
        const int64_t strip = r / TILE, column = r % TILE, kblock = c / TILE_K, quad = (c % TILE_K) / 4;
        dst[((strip * (kp / TILE_K) + kblock) * TILE + quad) * TILE_K + column * 4 + c % 4] = src[r * k + c];
      }
  });
  return packed;
}

// 16 values from `src` (fp32, or bf16 widened exactly), the lanes past `mask` 0.
AMX_TARGET inline __m512 load16(const float* src, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, src); }
AMX_TARGET inline __m512 load16(const uint16_t* src, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src)), 16));
}

AMX_TARGET inline __mmask16 first(int64_t count) {  // the first min(count, 16) lanes
  return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
}

// One row quantized per token into `dst` (K values, then 0 up to `kp`), its code sum into `sum`; returns the
// scale. The float steps of viditq::quantize_row (cpu_quantize.h) and so of the torch path: absmax / 127,
// IEEE division by viditq::code_divisor, round half to even, clamp to [-128, 127].
template <typename T>
AMX_TARGET float quantize_row_s8(const T* src, int64_t k, int64_t kp, int8_t* dst, int32_t* sum) {
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
  for (int64_t j = 0; j < kp; j += 16) {  // past k the lanes load 0 and quantize to 0
    __m512 v = _mm512_div_ps(load16(src + j, first(std::max<int64_t>(k - j, 0))), divisor);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
    total = _mm512_add_epi32(total, q);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), _mm512_cvtepi32_epi8(q));
  }
  *sum = _mm512_reduce_add_epi32(total);
  return scale;
}

template <typename T>
AMX_TARGET void quantize_rows(const T* x, int64_t r0, int64_t r1, int64_t k, int64_t kp, int8_t* codes,
                              float* scale, int32_t* rowsum) {
  for (int64_t r = r0; r < r1; r++) scale[r] = quantize_row_s8(x + r * k, k, kp, codes + r * kp, rowsum + r);
}

// x fp32 or bf16 [M, K] -> (int8 codes [Mp, Kp], zero-padded to 32 rows and 64 columns; scale fp32 [M];
// sum of the codes int32 [M]): quant.formats.quantize_activation_per_token's codes and scales on x in fp32.
std::vector<torch::Tensor> quantize_s8(torch::Tensor x) {
  TORCH_CHECK(avx512_ready(), "quantize_s8: this CPU has no AVX-512 (check amx_ready() first)");
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "quantize_s8: fp32 or bf16 [M, K] input");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1), mp = round_up(std::max<int64_t>(m, 1), BLOCK), kp = round_up(k, TILE_K);
  auto codes = torch::empty({mp, kp}, torch::kInt8);
  auto scale = torch::empty({m}, torch::kFloat32);
  auto rowsum = torch::empty({m}, torch::kInt32);
  int8_t* cp = codes.data_ptr<int8_t>();
  std::memset(cp + m * kp, 0, (mp - m) * kp);  // padding rows: codes 0
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    if (x.scalar_type() == torch::kBFloat16)
      quantize_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), r0, r1, k, kp, cp,
                    scale.data_ptr<float>(), rowsum.data_ptr<int32_t>());
    else
      quantize_rows(x.data_ptr<float>(), r0, r1, k, kp, cp, scale.data_ptr<float>(), rowsum.data_ptr<int32_t>());
  });
  return {codes, scale, rowsum};
}

// The per-column epilogue operands, padded to Np with 0 (zero points int32, weight scales and bias fp32).
struct Columns {
  std::vector<int32_t> zero;  // empty: symmetric
  std::vector<float> scale, bias;  // bias empty: none
};

struct Problem {
  const int8_t *a, *b;
  const float* x_scale;
  const int32_t* rowsum;
  const Columns* columns;
  int64_t m, n, kp, mp, np;
  float* out_f32;
  uint16_t* out_bf16;
};

// fp32 -> bf16 bits, round to nearest even (NaN -> 0x7fc0), as torch's conversion (not vcvtneps2bf16, which
// flushes subnormals).
AMX_TARGET inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i h = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(h);
}

// torch_ops.linear_int's epilogue on the int32 sums of one 32 x 32 block at (row0, col0):
// (float(acc - rowsum zero) * w_scale) * x_scale (+ bias), then the cast to the output dtype.
AMX_TARGET void epilogue(const Problem& p, const int32_t* sums, int64_t row0, int64_t col0) {
  const Columns& cols = *p.columns;
  const int64_t rows = std::min(BLOCK, p.m - row0);
  for (int64_t r = 0; r < rows; r++) {
    const int64_t row = row0 + r;
    const __m512 x_scale = _mm512_set1_ps(p.x_scale[row]);
    const __m512i rowsum = _mm512_set1_epi32(p.rowsum[row]);
    for (int64_t half = 0; half < 2; half++) {
      const int64_t col = col0 + half * TILE;
      if (col >= p.n) break;
      const __mmask16 mask = p.n - col >= TILE ? __mmask16(0xffff) : __mmask16((1u << (p.n - col)) - 1);
      __m512i acc = _mm512_load_si512(sums + r * BLOCK + half * TILE);
      if (!cols.zero.empty())
        acc = _mm512_sub_epi32(acc, _mm512_mullo_epi32(rowsum, _mm512_loadu_si512(cols.zero.data() + col)));
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(cols.scale.data() + col));
      v = _mm512_mul_ps(v, x_scale);
      if (!cols.bias.empty()) v = _mm512_add_ps(v, _mm512_loadu_ps(cols.bias.data() + col));
      if (p.out_f32)
        _mm512_mask_storeu_ps(p.out_f32 + row * p.n + col, mask, v);
      else
        _mm256_mask_storeu_epi16(p.out_bf16 + row * p.n + col, mask, to_bf16(v));
    }
  }
}

// One 32 x 32 output block: the whole K on the tiles, then the epilogue.
AMX_TARGET void block(const Problem& p, int64_t mb, int64_t nb, int32_t* sums) {
  const int64_t kblocks = p.kp / TILE_K;
  const int8_t* a = p.a + mb * BLOCK * p.kp;
  const int8_t* b0 = p.b + (2 * nb) * kblocks * TILE * TILE_K;
  const int8_t* b1 = b0 + kblocks * TILE * TILE_K;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < kblocks; kb++) {
    _tile_loadd(4, a + kb * TILE_K, p.kp);
    _tile_loadd(5, a + TILE * p.kp + kb * TILE_K, p.kp);
    _tile_loadd(6, b0 + kb * TILE * TILE_K, TILE_K);
    _tile_loadd(7, b1 + kb * TILE * TILE_K, TILE_K);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, sums, BLOCK * 4);
  _tile_stored(1, sums + TILE, BLOCK * 4);
  _tile_stored(2, sums + TILE * BLOCK, BLOCK * 4);
  _tile_stored(3, sums + TILE * BLOCK + TILE, BLOCK * 4);
  epilogue(p, sums, mb * BLOCK, nb * BLOCK);
}

// Output blocks [mb0, mb1) x [nb0, nb1) on this thread: columns in chunks whose weights stay in L2, every row
// block against a chunk before the next.
AMX_TARGET void blocks(const Problem& p, int64_t mb0, int64_t mb1, int64_t nb0, int64_t nb1) {
  alignas(64) int32_t sums[BLOCK * BLOCK];
  configure_tiles();
  for (int64_t chunk = nb0; chunk < nb1; chunk += CHUNK_BLOCKS)
    for (int64_t mb = mb0; mb < mb1; mb++)
      for (int64_t nb = chunk; nb < std::min(chunk + CHUNK_BLOCKS, nb1); nb++) block(p, mb, nb, sums);
  _tile_release();
}

template <typename T>
void spread(const torch::Tensor& t, int64_t n, std::vector<T>& out, const char* what) {  // 1 or n values
  TORCH_CHECK(t.numel() == 1 || t.numel() == n, "gemm: ", what, " must have 1 or N values");
  const T* src = t.data_ptr<T>();
  for (int64_t c = 0; c < n; c++) out[c] = src[t.numel() == 1 ? 0 : c];
}

Columns columns(int64_t n, int64_t np, const c10::optional<torch::Tensor>& zero, const torch::Tensor& w_scale,
                const c10::optional<torch::Tensor>& bias) {
  Columns cols;
  cols.scale.assign(np, 0.f);
  spread(w_scale.to(torch::kFloat32).contiguous(), n, cols.scale, "w_scale");
  if (zero.has_value()) {
    cols.zero.assign(np, 0);
    spread(zero->to(torch::kInt32).contiguous(), n, cols.zero, "zero");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n, "gemm: bias must have N values");
    cols.bias.assign(np, 0.f);
    spread(bias->to(torch::kFloat32).contiguous(), n, cols.bias, "bias");
  }
  return cols;
}

// (codes, x_scale, rowsum) from quantize_s8 x `packed` (pack_weight of [n, K] codes) -> [M, n] in fp32 or bf16:
// ((float(acc - rowsum zero) * w_scale) * x_scale + bias), zero / w_scale per channel or per tensor.
torch::Tensor gemm(torch::Tensor codes, torch::Tensor x_scale, torch::Tensor rowsum, torch::Tensor packed,
                   int64_t n, c10::optional<torch::Tensor> zero, torch::Tensor w_scale,
                   c10::optional<torch::Tensor> bias, bool bf16) {
  TORCH_CHECK(amx_ready(), "gemm: this CPU or process cannot use AMX (check amx_ready() first)");
  const int64_t m = x_scale.numel(), mp = codes.size(0), kp = codes.size(1);
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.is_contiguous() && mp % BLOCK == 0 && kp % TILE_K == 0
              && mp >= m && rowsum.numel() == m, "gemm: codes must come from quantize_s8");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * TILE_K == kp && packed.size(0) * TILE >= n
              && packed.size(0) % 2 == 0, "gemm: the packed weight's K or N does not match");
  const int64_t np = packed.size(0) * TILE;
  const Columns cols = columns(n, np, zero, w_scale, bias);
  auto out = torch::empty({m, n}, bf16 ? torch::kBFloat16 : torch::kFloat32);
  const auto xs = x_scale.contiguous();
  const auto rs = rowsum.contiguous();
  const Problem p{codes.data_ptr<int8_t>(), packed.data_ptr<int8_t>(), xs.data_ptr<float>(), rs.data_ptr<int32_t>(),
                  &cols, m, n, kp, mp, np, bf16 ? nullptr : out.data_ptr<float>(),
                  bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr};
  const int64_t mblocks = (m + BLOCK - 1) / BLOCK, nblocks = (n + BLOCK - 1) / BLOCK;
  if (m == 0 || n == 0) return out;
  if (nblocks >= at::get_num_threads())  // split the columns: each thread reads only its weights
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) { blocks(p, 0, mblocks, b0, b1); });
  else
    at::parallel_for(0, mblocks, 1, [&](int64_t b0, int64_t b1) { blocks(p, b0, b1, 0, nblocks); });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("amx_ready", &amx_ready, "whether this CPU has AMX-INT8 and this process may use it");
  module.def("avx512_ready", &avx512_ready, "whether quantize_s8 (AVX-512 only, no AMX) runs on this CPU");
  module.def("pack_weight", &pack_weight, "int8 [N, K] weight codes in the AMX tile layout");
  module.def("quantize_s8", &quantize_s8, "per-token int8 quantization, padded for the tiles, with row sums");
  module.def("gemm", &gemm, "the int8 GEMM on AMX tiles with the fused zero-point / scale / bias epilogue");
}
