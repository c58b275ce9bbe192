#include "w4a8_cpu.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

// The int8 dot products are plain loops that gcc vectorizes; target_clones builds them for AVX-512,
// AVX2 and baseline x86-64 and picks one at load time, so one wheel is fast on any x86 machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FPTQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define FPTQ_CLONES
#endif

namespace fptq {
namespace {

// Tile of the output one task computes: rows of X x output channels. 32 x 32 keeps both operand
// tiles (32 x Kp int8 each, 128 KiB at K = 4096) within a core's L2.
constexpr int64_t kTileM = 32;
constexpr int64_t kTileN = 32;

inline float ToFloat(float v) { return v; }
inline float ToFloat(Ort::Float16_t v) { return v.ToFloat(); }
template <typename T>
inline T FromFloat(float v) { return T(v); }

template <typename F>
void ParallelFor(const Ort::KernelContext& ctx, size_t total, F& body) {
  if (total == 1) return body(size_t{0});
  ctx.ParallelFor([](void* data, size_t i) { (*static_cast<F*>(data))(i); }, total, 0, &body);
}

// One row of X to int8, padded with zeros to Kp. Division (not a reciprocal multiply) and rint
// (round half to even) match QuantizeLinear and the qdq form's Div/Round/Clip exactly.
// Within each group the values are stored even k first, then odd k: the order in which a packed
// weight byte's low and high nibbles come out of a vectorized unpack, so weights never need
// interleaving (the dot product is the same sum in another order).
template <typename T>
float QuantizeRow(const T* x, int64_t K, int64_t group, const float* static_scale, int8_t* out) {
  float scale;
  if (static_scale) {
    scale = *static_scale;
  } else {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(ToFloat(x[k])));
    scale = std::max(amax / 127.f, kMinTokenScale);
  }
  const int64_t half = group / 2;
  for (int64_t k = 0; k < K; ++k) {
    float q = std::nearbyint(ToFloat(x[k]) / scale);
    q = std::fmin(std::fmax(q, -128.f), 127.f);  // fmax/fmin also map NaN to a bound, never UB
    const int64_t in_group = k % group;
    out[k - in_group + (in_group % 2) * half + in_group / 2] = static_cast<int8_t>(q);
  }
  return scale;
}

// Rows [n0, n0 + rows) of the packed weight to one int8 per value, per group low nibbles (even k)
// then high nibbles (odd k), matching QuantizeRow's order. Plain byte-wise loops: they vectorize.
FPTQ_CLONES
void UnpackWeights(const uint8_t* packed, const W4A8Dims& d, int64_t n0, int64_t rows, int8_t* out) {
  const int64_t half = d.group / 2;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t grp = 0; grp < d.groups; ++grp) {
      const uint8_t* src = packed + (n0 + r) * (d.Kp / 2) + grp * half;
      int8_t* lo = out + r * d.Kp + grp * d.group;
      int8_t* hi = lo + half;
      for (int64_t b = 0; b < half; ++b) {
        lo[b] = int4_value(src[b] & 0xF);
        hi[b] = int4_value(src[b] >> 4);
      }
    }
  }
}

// acc[m][n] = sum_g scale[n, g] * (int32 dot of group g). Integer within a group, float across.
FPTQ_CLONES
void TileProduct(const int8_t* xq, const int8_t* w8, const float* scales, const W4A8Dims& d,
                 int64_t rows, int64_t cols, float* acc) {
  const int64_t g = d.group;
  for (int64_t m = 0; m < rows; ++m) {
    const int8_t* xrow = xq + m * d.Kp;
    for (int64_t n = 0; n < cols; ++n) {
      const int8_t* wrow = w8 + n * d.Kp;
      const float* srow = scales + n * d.groups;
      float sum = 0.f;
      for (int64_t grp = 0; grp < d.groups; ++grp) {
        const int8_t* a = xrow + grp * g;
        const int8_t* b = wrow + grp * g;
        int32_t dot = 0;
        for (int64_t i = 0; i < g; ++i) dot += static_cast<int32_t>(a[i]) * static_cast<int32_t>(b[i]);
        sum += srow[grp] * static_cast<float>(dot);
      }
      acc[m * cols + n] = sum;
    }
  }
}

template <typename T>
void Run(const Ort::KernelContext& ctx, const W4A8Run& run) {
  const W4A8Dims& d = run.dims;
  const T* x = static_cast<const T*>(run.x);
  T* y = static_cast<T*>(run.y);
  const float* act_scale = run.static_scale > 0.f ? &run.static_scale : nullptr;
  const uint8_t* packed = run.weight;
  const float* scales = run.scales;
  const float* bias = run.bias;
  std::vector<int8_t> xq(static_cast<size_t>(d.M * d.Kp), 0);
  std::vector<float> row_scale(static_cast<size_t>(d.M));
  auto quantize = [&](size_t m) {
    row_scale[m] = QuantizeRow(x + m * d.K, d.K, d.group, act_scale, xq.data() + m * d.Kp);
  };
  ParallelFor(ctx, static_cast<size_t>(d.M), quantize);

  const int64_t tiles_m = (d.M + kTileM - 1) / kTileM;
  const int64_t tiles_n = (d.N + kTileN - 1) / kTileN;
  auto tile = [&](size_t t) {
    const int64_t m0 = static_cast<int64_t>(t) / tiles_n * kTileM;
    const int64_t n0 = static_cast<int64_t>(t) % tiles_n * kTileN;
    const int64_t rows = std::min(kTileM, d.M - m0);
    const int64_t cols = std::min(kTileN, d.N - n0);
    std::vector<int8_t> w8(static_cast<size_t>(cols * d.Kp));
    float acc[kTileM * kTileN];
    UnpackWeights(packed, d, n0, cols, w8.data());
    TileProduct(xq.data() + m0 * d.Kp, w8.data(), scales + n0 * d.groups, d, rows, cols, acc);
    for (int64_t m = 0; m < rows; ++m) {
      const float a = row_scale[m0 + m];
      for (int64_t n = 0; n < cols; ++n) {
        float v = acc[m * cols + n] * a;
        if (bias) v += bias[n0 + n];
        y[(m0 + m) * d.N + n0 + n] = FromFloat<T>(v);
      }
    }
  };
  ParallelFor(ctx, static_cast<size_t>(tiles_m * tiles_n), tile);
}

}  // namespace

OrtStatusPtr W4A8CpuKernel::ComputeV2(OrtKernelContext* context) {
  return ComputeChecked(attrs_, context, [](Ort::KernelContext& ctx, const W4A8Run& run) -> OrtStatusPtr {
    if (run.x_half) {
      Run<Ort::Float16_t>(ctx, run);
    } else {
      Run<float>(ctx, run);
    }
    return nullptr;
  });
}

}  // namespace fptq
