// The ymm kernel body shared by w4a8_cpu_avx2.cc (AVX2: vpmaddubsw + vpmaddwd) and
// w4a8_cpu_avxvnni.cc (AVX-VNNI: vpdpbusd on ymm). Each includes this after defining its Dot policy;
// each is compiled with its own flags, so everything here is in an anonymous namespace (a copy per
// file, never merged by the linker across ISAs). Layout: 8 output channels a vector; per run of 8 k
// a 32-byte load gives the low nibbles (k0..k0+3 of 8 channels) and the high ones (k0+4..k0+7).
//
// int8 weights (W8A8MatMul): a run is two 32-byte loads (k0..k0+3 and k0+4..k0+7 of 8 channels,
// w4a8_cpu_kernels.h). A Dot that multiplies a full unsigned byte exactly (kFullByte: vpdpbusd) takes
// them where int4's low and high nibbles went; one that does not (vpmaddubsw) takes each load's low
// nibbles into one accumulator and its high nibbles into another, and the group's sum is
// low + 16 * high in int32.
//
// The Dot policy provides:
//   static constexpr bool kFullByte; // Step is exact for unsigned operands up to 255
//   static constexpr bool kSplit;   // true: low and high nibbles into separate int32 accumulators
//   static constexpr int kRows, kBlocks;  // the many-row micro-tile: rows x blocks of 8 channels
//   static __m256i Step(__m256i acc, __m256i w, __m256i x);                  // kSplit: one operand
//   static __m256i Step2(__m256i acc, __m256i wl, __m256i xl, __m256i wh, __m256i xh);  // !kSplit
#pragma once

#include <immintrin.h>

#include "w4a8_cpu_kernels.h"

namespace fptq {
namespace {

constexpr int kBlock = 8;

inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline int32_t HorizontalSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Lane mask for the first `count` of 8 floats (maskload / maskstore).
inline __m256i FirstLanes(int64_t count) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), index);
}

// Per-token scale, quantization and per-group corrections of one row; 8 values a step, groups a
// multiple of 8 (QuantizeRowScalar does the others), tails through a zero-filled copy.
inline float QuantizeRowYmm(const float* x, const W4A8Dims& d, float static_scale, int8_t* xq, int32_t* corr) {
  if (d.group % 8) return QuantizeRowScalar(x, d, static_scale, xq, corr);
  float scale = static_scale;
  const __m256 sign = _mm256_set1_ps(-0.f);
  if (!(static_scale > 0.f)) {
    __m256 amax = _mm256_setzero_ps();
    int64_t k = 0;
    // max(|x|, amax) returns amax when |x| is NaN: a NaN never wins, as in the scalar loop.
    for (; k + 8 <= d.K; k += 8) amax = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)), amax);
    if (k < d.K) {
      const __m256 v = _mm256_maskload_ps(x + k, FirstLanes(d.K - k));
      amax = _mm256_max_ps(_mm256_andnot_ps(sign, v), amax);
    }
    scale = HorizontalMax(amax) / 127.f;
    if (!(scale >= kMinTokenScale)) scale = kMinTokenScale;
  }
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  for (int64_t g = 0; g < d.groups; ++g) {
    __m256i sum = _mm256_setzero_si256();
    for (int64_t i = 0; i < d.group; i += 8) {
      const int64_t k = g * d.group + i;
      const int64_t left = d.K - k;
      __m256 v;
      if (left >= 8) {
        v = _mm256_loadu_ps(x + k);
      } else if (left > 0) {
        v = _mm256_maskload_ps(x + k, FirstLanes(left));
      } else {
        v = _mm256_setzero_ps();
      }
      // True division and round half to even; max then min sends NaN to -128 like fmax/fmin.
      __m256 q = _mm256_round_ps(_mm256_div_ps(v, vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
      const __m256i q32 = _mm256_cvtps_epi32(q);
      // 8 int32 -> 8 int8: pack to int16 (in-lane), then to int8, then gather the two 32-bit halves.
      const __m256i q16 = _mm256_packs_epi32(q32, q32);
      const __m256i q8 = _mm256_packs_epi16(q16, q16);
      const __m128i bytes = _mm_unpacklo_epi32(_mm256_castsi256_si128(q8), _mm256_extracti128_si256(q8, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(xq + k), bytes);
      sum = _mm256_add_epi32(sum, q32);
    }
    corr[g] = -WeightOffset(d.bits) * HorizontalSum(sum);
  }
  return scale;
}

// MR rows x NR blocks of 8 channels over all of K. The NR blocks lie in one superblock, so block j's
// run is 32 bytes after block 0's; rows are one pointer plus multiples of the row stride.
template <class Dot, int Bits, int MR, int NR>
void MicroTile(const TileArgs& a, int64_t m0, int64_t b0) {
  // int8 weights through a Dot that cannot take a full byte: nibble halves, as described above.
  constexpr bool kNibbles8 = Bits == 8 && !Dot::kFullByte;
  const PackedWeights& w = *a.w;
  const int64_t runs = w.group_padded / 8;
  const int64_t run_stride = w.RunStride();
  const int64_t xstride = a.x.stride;
  const uint8_t* wp = w.Block(b0);
  const float* sp = w.BlockScales(b0);
  const int8_t* xp = a.x.xq + m0 * xstride;
  const int32_t* corr = a.x.corr + m0 * w.groups;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 facc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) facc[r][j] = _mm256_setzero_ps();

  for (int64_t g = 0; g < w.groups; ++g) {
    __m256i lo_acc[MR][NR], hi_acc[MR][NR];
    for (int r = 0; r < MR; ++r) {
      const __m256i c = _mm256_set1_epi32(corr[r * w.groups + g]);
      for (int j = 0; j < NR; ++j) {
        lo_acc[r][j] = c;
        hi_acc[r][j] = _mm256_setzero_si256();
      }
    }
    for (int64_t s = 0; s < runs; ++s, wp += run_stride, xp += 8) {
      __m256i wl[NR], wh[NR];
      __m256i wl_hi[kNibbles8 ? NR : 1], wh_hi[kNibbles8 ? NR : 1];   // kNibbles8: the high nibbles
      for (int j = 0; j < NR; ++j) {
        if constexpr (Bits == 8) {
          const __m256i v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wp + j * 64));
          const __m256i v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(wp + j * 64 + 32));
          if constexpr (kNibbles8) {
            wl[j] = _mm256_and_si256(v0, low4);
            wh[j] = _mm256_and_si256(v1, low4);
            wl_hi[j] = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
            wh_hi[j] = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
          } else {
            wl[j] = v0;
            wh[j] = v1;
          }
        } else {
          const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(wp + j * 32));
          wl[j] = _mm256_and_si256(v, low4);
          wh[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        }
      }
      for (int r = 0; r < MR; ++r) {
        int32_t xl_bits, xh_bits;
        __builtin_memcpy(&xl_bits, xp + r * xstride, 4);
        __builtin_memcpy(&xh_bits, xp + r * xstride + 4, 4);
        const __m256i xl = _mm256_set1_epi32(xl_bits), xh = _mm256_set1_epi32(xh_bits);
        for (int j = 0; j < NR; ++j) {
          if constexpr (kNibbles8) {   // low nibbles of both halves, then their high nibbles
            lo_acc[r][j] = Dot::Step2(lo_acc[r][j], wl[j], xl, wh[j], xh);
            hi_acc[r][j] = Dot::Step2(hi_acc[r][j], wl_hi[j], xl, wh_hi[j], xh);
          } else if constexpr (Dot::kSplit) {
            lo_acc[r][j] = Dot::Step(lo_acc[r][j], wl[j], xl);
            hi_acc[r][j] = Dot::Step(hi_acc[r][j], wh[j], xh);
          } else {
            lo_acc[r][j] = Dot::Step2(lo_acc[r][j], wl[j], xl, wh[j], xh);
          }
        }
      }
    }
    xp += w.group_padded - runs * 8;
    for (int j = 0; j < NR; ++j) {
      const __m256 sc = _mm256_load_ps(sp + g * w.ScaleStride() + j * kBlock);
      for (int r = 0; r < MR; ++r) {
        const __m256i isum = kNibbles8    ? _mm256_add_epi32(lo_acc[r][j], _mm256_slli_epi32(hi_acc[r][j], 4))
                             : Dot::kSplit ? _mm256_add_epi32(lo_acc[r][j], hi_acc[r][j])
                                           : lo_acc[r][j];
        facc[r][j] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(isum), facc[r][j]);
      }
    }
  }

  for (int j = 0; j < NR; ++j) {
    const int64_t n0 = (b0 + j) * kBlock;
    const int64_t cols = w.N - n0 < kBlock ? w.N - n0 : kBlock;
    if (cols <= 0) break;
    const __m256i lanes = FirstLanes(cols);
    const __m256 bias = a.bias ? _mm256_maskload_ps(a.bias + n0, lanes) : _mm256_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      __m256 v = _mm256_mul_ps(facc[r][j], _mm256_set1_ps(a.x.scale[m0 + r]));
      if (a.bias) v = _mm256_add_ps(v, bias);
      _mm256_maskstore_ps(a.y + (m0 + r) * a.ldy + n0, lanes, v);
    }
  }
}

template <class Dot, int Bits, int MR, int NR>
void RowStrip(const TileArgs& a, int64_t m0) {
  int64_t b = a.b0;
  for (; b + NR <= a.b1; b += NR) MicroTile<Dot, Bits, MR, NR>(a, m0, b);
  for (; b < a.b1; ++b) MicroTile<Dot, Bits, MR, 1>(a, m0, b);
}

// One row: two blocks a pass (the weights stream once). More: Dot::kRows rows x Dot::kBlocks blocks
// (what 16 ymm registers hold), weights reused from cache across the row strips.
template <class Dot, int Bits>
void TileYmm(const TileArgs& a) {
  constexpr int MR = Dot::kRows, NR = Dot::kBlocks;
  const int64_t end = a.m0 + a.rows;
  if (a.rows == 1) return RowStrip<Dot, Bits, 1, 2>(a, a.m0);
  for (int64_t b = a.b0; b < a.b1; b += NR) {
    TileArgs part = a;
    part.b0 = b;
    part.b1 = b + NR < a.b1 ? b + NR : a.b1;
    int64_t m = a.m0;
    for (; m + MR <= end; m += MR) RowStrip<Dot, Bits, MR, NR>(part, m);
    for (; m < end; ++m) RowStrip<Dot, Bits, 1, NR>(part, m);
  }
}

}  // namespace
}  // namespace fptq
