// The portable CPU kernel: plain C++, baseline flags, any machine. Also the scalar quantization the
// vector kernels fall back to for groups that are not a multiple of 8. Same layout and the same
// arithmetic as the vector kernels (w4a8_cpu_kernels.h), so it gives bitwise their results.
#include <algorithm>
#include <cmath>
#include <vector>

#include "w4a8_cpu_kernels.h"

namespace fptq {

float QuantizeRowScalar(const float* x, const W4A8Dims& d, float static_scale, int8_t* xq, int32_t* corr) {
  float scale = static_scale;
  if (!(static_scale > 0.f)) {
    float amax = 0.f;
    for (int64_t k = 0; k < d.K; ++k) amax = std::max(amax, std::fabs(x[k]));  // a NaN never wins
    scale = std::max(amax / 127.f, kMinTokenScale);
  }
  const int64_t gp = PaddedGroup(d.group);
  for (int64_t g = 0; g < d.groups; ++g) {
    int8_t* out = xq + g * gp;
    int32_t sum = 0;
    for (int64_t i = 0; i < gp; ++i) {
      const int64_t k = g * d.group + i;
      int8_t q = 0;
      if (i < d.group && k < d.K) {
        // True division and rint (half to even), as QuantizeLinear; fmax/fmin send NaN to -128.
        float v = std::nearbyint(x[k] / scale);
        v = std::fmin(std::fmax(v, -128.f), 127.f);
        q = static_cast<int8_t>(v);
      }
      out[i] = q;
      sum += q;
    }
    corr[g] = -WeightOffset(d.bits) * sum;
  }
  return scale;
}

namespace {

constexpr int kRows = 4;  // rows a pass over a block's weights serves

// Exact int16 dot product: a plain reduction loop the compiler turns into its vector multiply-add
// (pmaddwd on x86's baseline SSE2, sdot/smlal on NEON).
int32_t Dot16(const int16_t* a, const int16_t* b, int64_t n) {
  uint32_t s = 0;   // wraps, never overflows (see the caller)
  for (int64_t i = 0; i < n; ++i) s += static_cast<uint32_t>(static_cast<int32_t>(a[i]) * static_cast<int32_t>(b[i]));
  return static_cast<int32_t>(s);
}

// For each block, up to kRows rows at a time: per group, the block's weights are widened to int16
// once (channel-major, contiguous along k) and each (row, channel) pair is one Dot16; then one fma.
void GenericTile(const TileArgs& a) {
  const PackedWeights& w = *a.w;
  const int block = w.block;
  const int64_t gp = w.group_padded;
  std::vector<int16_t> w16(static_cast<size_t>(block * gp));
  std::vector<int16_t> x16(static_cast<size_t>(kRows * gp));
  float acc[kRows][64];
  for (int64_t b = a.b0; b < a.b1; ++b) {
    const int64_t n0 = b * block;
    const int cols = static_cast<int>(std::min<int64_t>(block, w.N - n0));
    for (int64_t m0 = a.m0; m0 < a.m0 + a.rows; m0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, a.m0 + a.rows - m0));
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < block; ++c) acc[r][c] = 0.f;
      const uint8_t* wp = w.Block(b);
      const float* sp = w.BlockScales(b);
      for (int64_t g = 0; g < w.groups; ++g) {
        for (int64_t run = 0; run < gp / 8; ++run, wp += w.RunStride()) {
          for (int c = 0; c < block; ++c) {
            for (int j = 0; j < 4; ++j) {
              if (w.bits == 8) {   // the run's two halves: k0..k0+3, then k0+4..k0+7
                w16[c * gp + run * 8 + j] = wp[c * 4 + j];
                w16[c * gp + run * 8 + 4 + j] = wp[block * 4 + c * 4 + j];
              } else {
                w16[c * gp + run * 8 + j] = wp[c * 4 + j] & 0xF;
                w16[c * gp + run * 8 + 4 + j] = wp[c * 4 + j] >> 4;
              }
            }
          }
        }
        for (int r = 0; r < rows; ++r) {
          const int8_t* xg = a.x.xq + (m0 + r) * a.x.stride + g * gp;
          for (int64_t i = 0; i < gp; ++i) x16[r * gp + i] = xg[i];
        }
        for (int r = 0; r < rows; ++r) {
          const int32_t corr = a.x.corr[(m0 + r) * w.groups + g];
          for (int c = 0; c < block; ++c) {
            // Unsigned: an int8 group's sum of x * (w + 128) may pass int32 before the correction
            // brings it back; wrapping arithmetic then gives the exact result (w4a8_layout.h).
            const int32_t isum = static_cast<int32_t>(static_cast<uint32_t>(corr) +
                                                      static_cast<uint32_t>(Dot16(&x16[r * gp], &w16[c * gp], gp)));
            acc[r][c] = std::fma(sp[g * w.ScaleStride() + c], static_cast<float>(isum), acc[r][c]);
          }
        }
      }
      for (int r = 0; r < rows; ++r) {
        float* yrow = a.y + (m0 + r) * a.ldy + n0;
        const float am = a.x.scale[m0 + r];
        for (int c = 0; c < cols; ++c) {
          float v = acc[r][c] * am;
          if (a.bias) v += a.bias[n0 + c];
          yrow[c] = v;
        }
      }
    }
  }
}

const CpuKernels kGeneric = {"generic", 8, 1, QuantizeRowScalar, GenericTile, GenericTile};

}  // namespace

const CpuKernels& GenericKernels() { return kGeneric; }

}  // namespace fptq
