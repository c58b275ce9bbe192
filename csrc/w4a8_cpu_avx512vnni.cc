// The AVX-512 VNNI kernel: vpdpbusd on zmm, 16 output channels a vector. Compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512vnni (CMakeLists.txt); only called after CPUID says so.
//
// Inner step, per run of 8 k of a group: one 64-byte load holds 16 channels x 8 k as nibbles; the
// low nibbles (k0..k0+3 of each channel) and the high nibbles (k0+4..k0+7) are each one vpdpbusd
// operand against a 32-bit broadcast of 4 activation bytes, which vpdpbusd takes straight from
// memory ({1to16}). Low and high nibbles feed separate int32 accumulators: two independent
// dependency chains instead of one twice as long. At each group's end: int32 -> float, one fma.
// int8 weights (W8A8MatMul): the run is two 64-byte loads, each a vpdpbusd operand as it is (the
// unsigned byte is exact there); everything else is the int4 loop.
//
// Everything here has internal linkage: these functions are compiled for AVX-512 and must never be
// merged with a same-named copy from another ISA's file.
#include <immintrin.h>

#include "w4a8_cpu_kernels.h"

namespace fptq {
namespace {

constexpr int kBlock = 16;

// Per-token scale, quantization and per-group corrections of one row; 16 values a step.
float QuantizeRow(const float* x, const W4A8Dims& d, float static_scale, int8_t* xq, int32_t* corr) {
  if (d.group % 8) return QuantizeRowScalar(x, d, static_scale, xq, corr);  // layout has padding
  float scale = static_scale;
  if (!(static_scale > 0.f)) {
    __m512 amax = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= d.K; k += 16) amax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + k)), amax);
    const __mmask16 tail = static_cast<__mmask16>((1u << (d.K - k)) - 1);
    // max(|x|, amax) returns amax when |x| is NaN: a NaN never wins, as in the scalar loop.
    amax = _mm512_mask_max_ps(amax, tail, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, x + k)), amax);
    scale = _mm512_reduce_max_ps(amax) / 127.f;
    if (!(scale >= kMinTokenScale)) scale = kMinTokenScale;
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t g = 0; g < d.groups; ++g) {
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < d.group; i += 16) {
      const int64_t k = g * d.group + i;
      const int64_t left = (d.group - i < d.K - k) ? d.group - i : d.K - k;
      const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : __mmask16(0);
      // True division and round half to even; max then min sends NaN to -128 like fmax/fmin.
      __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, x + k), vscale),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
      const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_maskz_cvtps_epi32(m, q));
      const int64_t room = d.group - i < 16 ? d.group - i : 16;
      _mm_mask_storeu_epi8(xq + k, static_cast<__mmask16>(room >= 16 ? 0xFFFF : (1u << room) - 1), bytes);
      sum = _mm512_dpbusd_epi32(sum, ones, _mm512_zextsi128_si512(bytes));
    }
    corr[g] = -WeightOffset(d.bits) * _mm512_reduce_add_epi32(sum);
  }
  return scale;
}

// MR rows x NR blocks of 16 channels over all of K. Accumulators: 2 * MR * NR int32 and MR * NR
// float vectors, all in registers for the sizes instantiated below. The NR blocks lie in one
// superblock (b0 % interleave + NR <= interleave), so block j's run is 64 bytes after block 0's and
// one pointer walks them all; rows are one pointer plus multiples of the row stride.
template <int Bits, int MR, int NR>
void MicroTile(const TileArgs& a, int64_t m0, int64_t b0) {
  const PackedWeights& w = *a.w;
  const int64_t runs = w.group_padded / 8;
  const int64_t run_stride = w.RunStride();
  const int64_t xstride = a.x.stride;
  const uint8_t* wp = w.Block(b0);
  const float* sp = w.BlockScales(b0);
  const int8_t* xp = a.x.xq + m0 * xstride;
  const int32_t* corr = a.x.corr + m0 * w.groups;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 facc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) facc[r][j] = _mm512_setzero_ps();

  for (int64_t g = 0; g < w.groups; ++g) {
    __m512i lo_acc[MR][NR], hi_acc[MR][NR];
    for (int r = 0; r < MR; ++r) {
      const __m512i c = _mm512_set1_epi32(corr[r * w.groups + g]);
      for (int j = 0; j < NR; ++j) {
        lo_acc[r][j] = c;
        hi_acc[r][j] = _mm512_setzero_si512();
      }
    }
    for (int64_t s = 0; s < runs; ++s, wp += run_stride, xp += 8) {
      __m512i wl[NR], wh[NR];
      for (int j = 0; j < NR; ++j) {
        if constexpr (Bits == 8) {
          wl[j] = _mm512_load_si512(wp + j * 128);
          wh[j] = _mm512_load_si512(wp + j * 128 + 64);
        } else {
          const __m512i v = _mm512_load_si512(wp + j * 64);
          wl[j] = _mm512_and_si512(v, low4);
          wh[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
      }
      for (int r = 0; r < MR; ++r) {
        int32_t xl_bits, xh_bits;
        __builtin_memcpy(&xl_bits, xp + r * xstride, 4);
        __builtin_memcpy(&xh_bits, xp + r * xstride + 4, 4);
        const __m512i xl = _mm512_set1_epi32(xl_bits), xh = _mm512_set1_epi32(xh_bits);
        for (int j = 0; j < NR; ++j) {
          lo_acc[r][j] = _mm512_dpbusd_epi32(lo_acc[r][j], wl[j], xl);
          hi_acc[r][j] = _mm512_dpbusd_epi32(hi_acc[r][j], wh[j], xh);
        }
      }
    }
    xp += w.group_padded - runs * 8;
    for (int j = 0; j < NR; ++j) {
      const __m512 sc = _mm512_load_ps(sp + g * w.ScaleStride() + j * kBlock);
      for (int r = 0; r < MR; ++r) {
        const __m512i isum = _mm512_add_epi32(lo_acc[r][j], hi_acc[r][j]);
        facc[r][j] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(isum), facc[r][j]);
      }
    }
  }

  for (int j = 0; j < NR; ++j) {
    const int64_t n0 = (b0 + j) * kBlock;
    const int64_t cols = w.N - n0 < kBlock ? w.N - n0 : kBlock;
    if (cols <= 0) break;
    const __mmask16 m = cols == kBlock ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << cols) - 1);
    const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(m, a.bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      __m512 v = _mm512_mul_ps(facc[r][j], _mm512_set1_ps(a.x.scale[m0 + r]));
      if (a.bias) v = _mm512_add_ps(v, bias);
      _mm512_mask_storeu_ps(a.y + (m0 + r) * a.ldy + n0, m, v);
    }
  }
}

// Rows [m0, m0 + MR) against blocks [b0, b1): NR blocks at a time, then the leftover blocks.
template <int Bits, int MR, int NR>
void RowStrip(const TileArgs& a, int64_t m0) {
  int64_t b = a.b0;
  for (; b + NR <= a.b1; b += NR) MicroTile<Bits, MR, NR>(a, m0, b);
  for (; b < a.b1; ++b) MicroTile<Bits, MR, 1>(a, m0, b);
}

// Few rows (decode): the weights stream once from memory, so take many channels a pass (GEMV).
// More rows: 4 rows x 2 blocks, weights reused from cache across the row strips (GEMM).
template <int Bits>
void Tile(const TileArgs& a) {
  const int64_t end = a.m0 + a.rows;
  switch (a.rows) {
    case 1: return RowStrip<Bits, 1, 4>(a, a.m0);
    case 2: return RowStrip<Bits, 2, 4>(a, a.m0);
    case 3: return RowStrip<Bits, 3, 2>(a, a.m0);
    default: break;
  }
  for (int64_t b = a.b0; b < a.b1; b += 2) {
    TileArgs part = a;
    part.b0 = b;
    part.b1 = b + 2 < a.b1 ? b + 2 : a.b1;
    int64_t m = a.m0;
    for (; m + 4 <= end; m += 4) RowStrip<Bits, 4, 2>(part, m);
    switch (end - m) {
      case 1: RowStrip<Bits, 1, 2>(part, m); break;
      case 2: RowStrip<Bits, 2, 2>(part, m); break;
      case 3: RowStrip<Bits, 3, 2>(part, m); break;
      default: break;
    }
  }
}

const CpuKernels kKernels = {"avx512vnni", kBlock, 4, QuantizeRow, Tile<4>, Tile<8>};

}  // namespace

const CpuKernels& Avx512VnniKernels() { return kKernels; }

}  // namespace fptq
