// The glue of oneDNN's direct int8 route, where that GEMM is exact (see cpu_direct.py): per-token quantization
// to the offset-binary u8 oneDNN takes, with the row sums the zero points need, and the epilogue that folds the
// zero points back in, each one pass over the data, fp32 or bf16 in and out.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_bf16.h"
#include "cpu_quantize.h"

namespace {

constexpr int64_t EXACT_FP32 = int64_t(1) << 24;  // integers up to here are fp32 numbers

// fp32 [n] -> bf16 [n], as torch's conversion (cpu_bf16.h).
void to_bf16(const float* src, int64_t n, uint16_t* dst) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256i h = _mm256_srli_epi32(viditq::bf16_rounded_bits8(_mm256_loadu_ps(src + c)), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), _mm256_castsi256_si128(packed));
  }
  for (; c < n; c++) dst[c] = uint16_t(viditq::bf16_rounded_bits(src[c]) >> 16);
}

// int16 codes [k] -> u8 `code + 128` into `dst`; returns the sum of the codes (|sum| <= 128 k: int32 for every
// K the GEMM's int32 accumulator allows).
int32_t to_offset_binary(const int16_t* codes, int64_t k, uint8_t* dst) {
  const __m256i ones = _mm256_set1_epi16(1), offset = _mm256_set1_epi16(128);
  __m256i sum8 = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + j));
    sum8 = _mm256_add_epi32(sum8, _mm256_madd_epi16(v, ones));
    const __m256i u = _mm256_add_epi16(v, offset);  // 0..255
    // packus interleaves the two 128-bit lanes; qwords 0 and 2 hold the 16 bytes in order
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(u, u), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), _mm256_castsi256_si128(packed));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum8);
  int32_t sum = 0;
  for (int i = 0; i < 8; i++) sum += lanes[i];
  for (; j < k; j++) {
    dst[j] = uint8_t(codes[j] + 128);
    sum += codes[j];
  }
  return sum;
}

// x fp32 or bf16 [M, K] -> (u8 codes + 128 [M, K], scale fp32 [M], sum of codes int32 [M]).
// The codes and scales are quant.formats.quantize_activation_per_token's on x in fp32.
std::vector<torch::Tensor> quantize_u8(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "quantize_u8: fp32 or bf16 [M, K] input");
  x = x.contiguous();
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const int64_t m = x.size(0), k = x.size(1);
  auto codes = torch::empty({m, k}, torch::kUInt8);
  auto scale = torch::empty({m}, torch::kFloat32);
  auto rowsum = torch::empty({m}, torch::kInt32);
  const float* xf = bf16 ? nullptr : x.data_ptr<float>();
  const uint16_t* xb = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  int32_t* rp = rowsum.data_ptr<int32_t>();
  at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int16_t> row(k + 1);
    std::vector<float> wide(bf16 ? k : 0);
    for (int64_t r = r0; r < r1; r++) {
      const float* src = bf16 ? viditq::widen_bf16(xb + r * k, k, wide.data()) : xf + r * k;
      sp[r] = viditq::quantize_row(src, k, row.data());
      rp[r] = to_offset_binary(row.data(), k, cp + r * k);
    }
  });
  return {codes, scale, rowsum};
}

// acc fp32 [M, N] (oneDNN's integer sums of codes x weight codes, converted to fp32) -> (((float)(acc -
// rowsum[m] zero[n]) * w_scale[n]) * x_scale[m] (+ bias[n]) in fp32 or bf16 (`bf16`), rounded [M] bool):
// torch_ops.linear_int's epilogue and its final cast. A sum below 2^24 in magnitude converted exactly (and a
// rounded one cannot come out below 2^24), so rows without such a value are exact: the difference is formed
// exactly before its one rounding (in fp32 where rowsum * 128 < 2^24, else in double), which then equals the
// int32 accumulator's conversion. `rounded` marks the other rows, for the caller to recompute.
std::vector<torch::Tensor> zero_point_epilogue(torch::Tensor acc, torch::Tensor rowsum,
                                               c10::optional<torch::Tensor> zero, torch::Tensor w_scale,
                                               torch::Tensor x_scale, c10::optional<torch::Tensor> bias, bool bf16) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == torch::kFloat32, "zero_point_epilogue: fp32 [M, N] acc");
  acc = acc.contiguous();
  const int64_t m = acc.size(0), n = acc.size(1);
  const auto rs = rowsum.to(torch::kInt32).contiguous();
  const auto ws = w_scale.to(torch::kFloat32).contiguous().reshape({-1});
  const auto xs = x_scale.to(torch::kFloat32).contiguous().reshape({-1});
  TORCH_CHECK(ws.numel() == n && xs.numel() == m && rs.numel() == m, "zero_point_epilogue: shapes");
  torch::Tensor zs, bs;
  if (zero.has_value()) zs = zero->to(torch::kFloat32).contiguous().reshape({-1});  // int8 values: exact
  if (bias.has_value()) bs = bias->to(torch::kFloat32).contiguous().reshape({-1});
  auto out = torch::empty({m, n}, bf16 ? torch::kBFloat16 : torch::kFloat32);
  auto rounded = torch::empty({m}, torch::kBool);
  bool* flag = rounded.data_ptr<bool>();
  const float *ap = acc.data_ptr<float>(), *wp = ws.data_ptr<float>(), *xp = xs.data_ptr<float>();
  const int32_t* rp = rs.data_ptr<int32_t>();
  const float* zp = zs.defined() ? zs.data_ptr<float>() : nullptr;
  const float* bp = bs.defined() ? bs.data_ptr<float>() : nullptr;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* ob = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> buffer(bf16 ? n : 0);
    for (int64_t r = r0; r < r1; r++) {
      const float* a = ap + r * n;
      const float s = xp[r];
      float* row = bf16 ? buffer.data() : of + r * n;
      float peak = 0.f;
      for (int64_t c = 0; c < n; c++) peak = std::max(peak, std::fabs(a[c]));
      flag[r] = peak >= float(EXACT_FP32);
      if (!zp) {
        for (int64_t c = 0; c < n; c++) row[c] = (a[c] * wp[c]) * s;
      } else if (int64_t(std::abs(rp[r])) * 128 < EXACT_FP32) {  // rowsum * zero is an exact fp32 integer
        const float rsum = float(rp[r]);
        for (int64_t c = 0; c < n; c++) row[c] = ((a[c] - rsum * zp[c]) * wp[c]) * s;
      } else {
        const double rsum = rp[r];
        for (int64_t c = 0; c < n; c++)
          row[c] = (static_cast<float>(static_cast<double>(a[c]) - rsum * zp[c]) * wp[c]) * s;
      }
      if (bp)
        for (int64_t c = 0; c < n; c++) row[c] += bp[c];
      if (bf16) to_bf16(row, n, ob + r * n);
    }
  });
  return {out, rounded};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("quantize_u8", &quantize_u8, "per-token int8 quantization to offset-binary u8, with row sums");
  module.def("zero_point_epilogue", &zero_point_epilogue, "the epilogue that folds the weight zero points in");
}
