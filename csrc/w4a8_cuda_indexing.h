// The per-thread index math of the CUDA kernels of fptq::W4A8MatMul (w4a8_cuda.cu), as functions
// that nvcc compiles for the device and a host C++ compiler compiles for the CPU: which thread
// loads which bytes of X and W, how packed nibbles become int8, which fragment register holds which
// element of the MMA operands, where each accumulator element goes, and how each K-group's scale is
// applied. The kernels call exactly these functions; tests/cuda_emulation/emulate.cc runs them lane by
// lane on the CPU, with the warp-wide instructions (mma.sync, shuffles) emulated from the PTX ISA's
// documented layouts, and compares with the float64 reference (tests/runtime/test_cuda_emulation.py).
//
// Under nvcc's device pass the intrinsics (__vsub4, __byte_perm, __dp4a, __fdiv_rn, __ldg, 16-byte
// vector loads) are used; elsewhere the same names go to fptq::cuda::emu, declared here and defined
// only by the emulation program (the shipped library's host code never calls these functions).
#pragma once

#include <math.h>

#include <cstdint>

#include "w4a8_layout.h"

#if defined(__CUDACC__)
#define FPTQ_HD __host__ __device__ __forceinline__
#else
#define FPTQ_HD inline
#endif

namespace fptq {
namespace cuda {

constexpr int kWarpSize = 32;

// quantize_rows: one block a row.
constexpr int kQuantThreads = 256;
// gemv (M <= kGemvMaxRows): a warp per output channel, kGemvWarps warps a block.
constexpr int kGemvWarps = 8;
constexpr int kGemvMaxRows = 15;
// gemm_mma: a block computes kTileM x kTileN outputs with 4 warps (2 x 2) of 32 x 32, stepping K by kTileK.
constexpr int kTileM = 64, kTileN = 64, kTileK = 32;
constexpr int kGemmThreads = 128;
constexpr int kWarpTileM = 32, kWarpTileN = 32;
constexpr int kMmaM = 16, kMmaN = 8;                     // mma.m16n8k32
constexpr int kMmaTilesM = kWarpTileM / kMmaM;           // 2
constexpr int kMmaTilesN = kWarpTileN / kMmaN;           // 4
constexpr int kSmemStride = kTileK + 16;                 // 48 bytes: fragment reads of 8 rows hit 8 distinct bank groups

FPTQ_HD bool use_gemv(int64_t M) { return M <= kGemvMaxRows; }

#if !defined(__CUDA_ARCH__)
// Host stand-ins for the device intrinsics; defined by the emulation program only.
namespace emu {
uint32_t vsub4(uint32_t a, uint32_t b);
uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t selector);
int dp4a(int a, int b, int c);
void check_aligned(const void* p, int bytes);   // the device faults on a misaligned vector access
}  // namespace emu
#endif

FPTQ_HD uint32_t vsub4(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __vsub4(a, b);
#else
  return emu::vsub4(a, b);
#endif
}
FPTQ_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, selector);
#else
  return emu::byte_perm(x, y, selector);
#endif
}
FPTQ_HD int dp4a(int a, int b, int c) {
#if defined(__CUDA_ARCH__)
  return __dp4a(a, b, c);
#else
  return emu::dp4a(a, b, c);
#endif
}
// A true (IEEE, round to nearest even) division, as the qdq form's Div and QuantizeLinear.
FPTQ_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
template <typename T>
FPTQ_HD T ldg(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}
// Vector copies: 16 bytes (uint4) and 8 bytes (int2), aligned as the device requires.
struct alignas(16) Bytes16 { uint32_t x, y, z, w; };
struct alignas(8) Bytes8 { int x, y; };
template <typename V>
FPTQ_HD V load_vec(const void* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const V*>(p);
#else
  emu::check_aligned(p, sizeof(V));
  V v;
  const unsigned char* s = static_cast<const unsigned char*>(p);
  unsigned char* d = reinterpret_cast<unsigned char*>(&v);
  for (unsigned i = 0; i < sizeof(V); ++i) d[i] = s[i];
  return v;
#endif
}
template <typename V>
FPTQ_HD void store_vec(void* p, const V& v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<V*>(p) = v;
#else
  emu::check_aligned(p, sizeof(V));
  const unsigned char* s = reinterpret_cast<const unsigned char*>(&v);
  unsigned char* d = static_cast<unsigned char*>(p);
  for (unsigned i = 0; i < sizeof(V); ++i) d[i] = s[i];
#endif
}
FPTQ_HD uint32_t load_u32(const void* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  emu::check_aligned(p, 4);
  const unsigned char* s = static_cast<const unsigned char*>(p);
  return uint32_t(s[0]) | uint32_t(s[1]) << 8 | uint32_t(s[2]) << 16 | uint32_t(s[3]) << 24;
#endif
}

// ---- nibbles -------------------------------------------------------------------------------------

// Eight packed nibbles (one 32-bit word, k ascending from the low nibble) -> two words of four int8
// each, in k order (byte 0 = lowest k). vsub4 sign-extends every byte without borrowing across bytes.
FPTQ_HD void unpack8(uint32_t word, uint32_t& k0123, uint32_t& k4567) {
  const uint32_t even = vsub4((word & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);         // k0 k2 k4 k6
  const uint32_t odd = vsub4(((word >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);   // k1 k3 k5 k7
  k0123 = byte_perm(even, odd, 0x5140);
  k4567 = byte_perm(even, odd, 0x7362);
}

// ---- quantize_rows -------------------------------------------------------------------------------

// The per-token scale from a row's max |x|, as the contract says (a true division, floored).
FPTQ_HD float token_scale(float amax) { return fmaxf(div_rn(amax, 127.f), kMinTokenScale); }
// One activation: clamp(rint(x / scale), -128, 127), rint rounding half to even; zero past K.
FPTQ_HD int8_t quantize_value(float x, float scale) {
  return static_cast<int8_t>(fminf(fmaxf(rintf(div_rn(x, scale)), -128.f), 127.f));
}
// Thread t of a row's block handles k = t, t + kQuantThreads, ...; its warp's max lands in slot t / 32.
FPTQ_HD int quant_warp_slot(int thread) { return thread / kWarpSize; }

// ---- gemv ----------------------------------------------------------------------------------------

FPTQ_HD int64_t gemv_channel(int block, int thread) {
  return static_cast<int64_t>(block) * kGemvWarps + thread / kWarpSize;
}
FPTQ_HD int gemv_blocks(int64_t N) { return static_cast<int>((N + kGemvWarps - 1) / kGemvWarps); }
// Chunks of 8 values (one 32-bit word of weights): lane handles c = lane, lane + 32, ... < Kp / 8.
FPTQ_HD int64_t gemv_chunks(const W4A8Dims& d) { return d.Kp / 8; }
// One chunk for every row: two dp4a of 4 int8 activations x 4 int4 weights, an exact int32, then
// scaled by the chunk's group scale (a chunk never straddles a group: group_size % 32 == 0).
FPTQ_HD void gemv_chunk(const int8_t* xq, const uint8_t* weight, const float* scales, const W4A8Dims& d,
                        int64_t n, int64_t c, float (&acc)[kGemvMaxRows]) {
  uint32_t w0, w1;
  if (d.bits == 8) {   // int8 weights (W8A8MatMul): the chunk's 8 bytes are the values
    const Bytes8 v = load_vec<Bytes8>(weight + n * d.Kp + c * 8);
    w0 = static_cast<uint32_t>(v.x);
    w1 = static_cast<uint32_t>(v.y);
  } else {
    unpack8(ldg(reinterpret_cast<const uint32_t*>(weight + n * (d.Kp / 2)) + c), w0, w1);
  }
  const float s = ldg(scales + n * d.groups + (c * 8) / d.group);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int m = 0; m < kGemvMaxRows; ++m) {
    if (m < d.M) {
      const Bytes8 xv = load_vec<Bytes8>(xq + m * d.Kp + c * 8);
      const int dot = dp4a(xv.x, static_cast<int>(w0), dp4a(xv.y, static_cast<int>(w1), 0));
      acc[m] = fmaf(s, static_cast<float>(dot), acc[m]);
    }
  }
}

// The output of one element: acc * a_m + bias (one fma: what nvcc makes of `acc * a_m + bias`).
FPTQ_HD float epilogue(float acc, float row_scale, float bias) { return fmaf(acc, row_scale, bias); }

// ---- decode --------------------------------------------------------------------------------------
// M <= kDecodeMaxRows: the weights stream once from memory, so each lane loads 16 bytes of a channel's
// row a step (a warp: 512 consecutive bytes), kDecodeChannels channels at once (independent loads in
// flight), the next step's loads issued before this step's arithmetic. A chunk (16 bytes: 32 int4 or
// 16 int8 values) never straddles a group (group_size % 32 == 0); its exact dp4a sum is scaled by the
// group's scale into the row's float sum, as the gemv does. Up to kDecodeFusedRows rows the block
// quantizes X itself into shared memory (no separate launch; the same arithmetic as quantize_rows, so
// the same codes and scales); more rows read quantize_rows' output.
constexpr int kDecodeWarps = 8;
constexpr int kDecodeThreads = kDecodeWarps * kWarpSize;
constexpr int kDecodeChannels = 4;                               // channels a warp streams together
constexpr int kDecodeBlockChannels = kDecodeWarps * kDecodeChannels;
constexpr int kDecodeMaxRows = 16;
constexpr int kDecodeFusedRows = 4;
constexpr int kDecodeChunkBytes = 16;
constexpr int64_t kDecodeFusedSmemBytes = 48 * 1024;            // X's int8 rows in (static limit of shared memory)

// Which decode variant takes M rows of Kp: 1 or kDecodeFusedRows (fused quantization, X's rows in shared
// memory), kDecodeMaxRows (quantize_rows first), 0 (none: M too large).
FPTQ_HD int decode_rows(int64_t M, int64_t Kp) {
  if (M == 1 && Kp <= kDecodeFusedSmemBytes) return 1;
  if (M <= kDecodeFusedRows && M * Kp <= kDecodeFusedSmemBytes) return kDecodeFusedRows;
  return M <= kDecodeMaxRows ? kDecodeMaxRows : 0;
}
FPTQ_HD int decode_blocks(int64_t N) { return static_cast<int>((N + kDecodeBlockChannels - 1) / kDecodeBlockChannels); }
// Output channel j (0..kDecodeChannels) of warp `warp` of block `block`.
FPTQ_HD int64_t decode_channel(int block, int warp, int j) {
  return static_cast<int64_t>(block) * kDecodeBlockChannels + warp * kDecodeChannels + j;
}
FPTQ_HD int64_t decode_row_bytes(const W4A8Dims& d) { return d.Kp * d.bits / 8; }
FPTQ_HD int64_t decode_chunks(const W4A8Dims& d) { return decode_row_bytes(d) / kDecodeChunkBytes; }
FPTQ_HD int decode_chunk_values(const W4A8Dims& d) { return d.bits == 8 ? 16 : 32; }
// Chunk c of channel n's row (zero for channels past N: their lanes compute, nothing is stored).
FPTQ_HD Bytes16 decode_load(const uint8_t* weight, const W4A8Dims& d, int64_t n, int64_t c) {
  if (n >= d.N) return Bytes16{0, 0, 0, 0};
  return load_vec<Bytes16>(weight + n * decode_row_bytes(d) + c * kDecodeChunkBytes);
}
// One chunk against every row: exact dp4a sums of its 16 (int8) or 32 (int4, unpacked in registers)
// values with the row's activations from x (row m at x + m * Kp), each scaled by the chunk's group scale.
template <int Rows>
FPTQ_HD void decode_chunk(const Bytes16& w, const int8_t* x, const float* scales, const W4A8Dims& d, int64_t n,
                          int64_t c, float (&acc)[Rows]) {
  uint32_t q[8];
  int words = 4;
  if (d.bits == 8) {
    q[0] = w.x, q[1] = w.y, q[2] = w.z, q[3] = w.w;
  } else {
    unpack8(w.x, q[0], q[1]);
    unpack8(w.y, q[2], q[3]);
    unpack8(w.z, q[4], q[5]);
    unpack8(w.w, q[6], q[7]);
    words = 8;
  }
  const int64_t k0 = c * decode_chunk_values(d);
  const float s = n < d.N ? ldg(scales + n * d.groups + k0 / d.group) : 0.f;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int m = 0; m < Rows; ++m) {
    if (m < d.M) {
      const Bytes16 x0 = load_vec<Bytes16>(x + m * d.Kp + k0);
      int dot = dp4a(static_cast<int>(x0.x), static_cast<int>(q[0]), 0);
      dot = dp4a(static_cast<int>(x0.y), static_cast<int>(q[1]), dot);
      dot = dp4a(static_cast<int>(x0.z), static_cast<int>(q[2]), dot);
      dot = dp4a(static_cast<int>(x0.w), static_cast<int>(q[3]), dot);
      if (words == 8) {
        const Bytes16 x1 = load_vec<Bytes16>(x + m * d.Kp + k0 + 16);
        dot = dp4a(static_cast<int>(x1.x), static_cast<int>(q[4]), dot);
        dot = dp4a(static_cast<int>(x1.y), static_cast<int>(q[5]), dot);
        dot = dp4a(static_cast<int>(x1.z), static_cast<int>(q[6]), dot);
        dot = dp4a(static_cast<int>(x1.w), static_cast<int>(q[7]), dot);
      }
      acc[m] = fmaf(s, static_cast<float>(dot), acc[m]);
    }
  }
}
// Fused quantization: thread t takes k = t, t + kDecodeThreads, ... of each row; a per-token row's max
// reduces over its warp, then over the block's warps in slot order (the same order as quantize_rows'
// kQuantThreads = kDecodeThreads, so the same scale).
FPTQ_HD int decode_warp_slot(int thread) { return thread / kWarpSize; }

// ---- gemm_mma ------------------------------------------------------------------------------------

struct GemmGrid { int blocks_n, blocks_m; };
FPTQ_HD GemmGrid gemm_grid(const W4A8Dims& d) {
  return {static_cast<int>((d.N + kTileN - 1) / kTileN), static_cast<int>((d.M + kTileM - 1) / kTileM)};
}

// Global -> shared, A (activations): 64 rows x 32 int8 a step, thread t copies 16 bytes of row t / 2.
// Rows past M are zero.
FPTQ_HD void gemm_load_a(int t, int64_t m0, int64_t step, const int8_t* xq, const W4A8Dims& d, int8_t* As) {
  const int row = t / 2, half = t % 2;
  Bytes16 v = {0, 0, 0, 0};
  if (m0 + row < d.M) v = load_vec<Bytes16>(xq + (m0 + row) * d.Kp + step * kTileK + half * 16);
  store_vec(As + row * kSmemStride + half * 16, v);
}
// Global -> shared, B (weights): threads t < 64 each take output channel n0 + t, 32 int4 (16 bytes)
// unpacked to 32 int8 in k order (int8 weights: 32 bytes copied): Bs holds B K-major, row = channel,
// column = k. Channels past N are zero.
FPTQ_HD bool gemm_loads_b(int t) { return t < kTileN; }
FPTQ_HD void gemm_load_b(int t, int64_t n0, int64_t step, const uint8_t* weight, const W4A8Dims& d, int8_t* Bs) {
  if (d.bits == 8) {
    Bytes16 lo = {0, 0, 0, 0}, hi = {0, 0, 0, 0};
    if (n0 + t < d.N) {
      lo = load_vec<Bytes16>(weight + (n0 + t) * d.Kp + step * kTileK);
      hi = load_vec<Bytes16>(weight + (n0 + t) * d.Kp + step * kTileK + 16);
    }
    store_vec(Bs + t * kSmemStride, lo);
    store_vec(Bs + t * kSmemStride + 16, hi);
    return;
  }
  Bytes16 v = {0, 0, 0, 0};
  if (n0 + t < d.N) v = load_vec<Bytes16>(weight + (n0 + t) * (d.Kp / 2) + step * (kTileK / 2));
  Bytes16 lo, hi;
  unpack8(v.x, lo.x, lo.y);
  unpack8(v.y, lo.z, lo.w);
  unpack8(v.z, hi.x, hi.y);
  unpack8(v.w, hi.z, hi.w);
  store_vec(Bs + t * kSmemStride, lo);
  store_vec(Bs + t * kSmemStride + 16, hi);
}

// The warp's place in the block: 2 x 2 warps of 32 x 32 outputs.
FPTQ_HD int warp_row(int warp) { return warp / 2; }
FPTQ_HD int warp_col(int warp) { return warp % 2; }

// Operand fragments for mma.m16n8k32.row.col.s8 (PTX ISA, "Matrix Fragments for mma.m16n8k32"),
// gid = lane / 4, tid = lane % 4:
//   A 16x32 row-major: a0 = A[gid][4tid..+3], a1 = A[gid+8][4tid..], a2 = A[gid][16+4tid..], a3 = A[gid+8][16+4tid..]
//   B 32x8 column-major (K-major): b0 = B[4tid..+3][gid], b1 = B[16+4tid..][gid]
// A fragment i (rows 16i..16i+15 of the warp's 32) of the tile in shared memory.
FPTQ_HD void gemm_a_frag(const int8_t* As, int warp, int lane, int i, uint32_t (&a)[4]) {
  const int gid = lane / 4, tid = lane % 4;
  const int8_t* base = As + (warp_row(warp) * kWarpTileM + i * kMmaM + gid) * kSmemStride + tid * 4;
  a[0] = load_u32(base);
  a[1] = load_u32(base + 8 * kSmemStride);
  a[2] = load_u32(base + 16);
  a[3] = load_u32(base + 8 * kSmemStride + 16);
}
// B fragment j (channels 8j..8j+7 of the warp's 32).
FPTQ_HD void gemm_b_frag(const int8_t* Bs, int warp, int lane, int j, uint32_t (&b)[2]) {
  const int gid = lane / 4, tid = lane % 4;
  const int8_t* base = Bs + (warp_col(warp) * kWarpTileN + j * kMmaN + gid) * kSmemStride + tid * 4;
  b[0] = load_u32(base);
  b[1] = load_u32(base + 16);
}
// Accumulator element c (0..3) of MMA tile (i, j): its row and column in the block's 64 x 64 tile.
//   C 16x8: c0 = C[gid][2tid], c1 = C[gid][2tid+1], c2 = C[gid+8][2tid], c3 = C[gid+8][2tid+1]
FPTQ_HD int gemm_c_row(int warp, int lane, int i, int c) {
  return warp_row(warp) * kWarpTileM + i * kMmaM + lane / 4 + (c >= 2 ? 8 : 0);
}
FPTQ_HD int gemm_c_col(int warp, int lane, int j, int c) {
  return warp_col(warp) * kWarpTileN + j * kMmaN + (lane % 4) * 2 + (c & 1);
}

// One thread's accumulators: exact int32 sums of the running group, float sums of the finished ones.
struct GemmAcc {
  int i[kMmaTilesM][kMmaTilesN][4];
  float f[kMmaTilesM][kMmaTilesN][4];
};
FPTQ_HD void gemm_acc_zero(GemmAcc& acc) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < kMmaTilesM; ++i)
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int j = 0; j < kMmaTilesN; ++j)
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int c = 0; c < 4; ++c) acc.i[i][j][c] = 0, acc.f[i][j][c] = 0.f;
}
FPTQ_HD int64_t gemm_steps(const W4A8Dims& d) { return d.Kp / kTileK; }
FPTQ_HD int64_t gemm_steps_per_group(const W4A8Dims& d) { return d.group / kTileK; }
// After step `step`, has a group ended? (group_size % 32 == 0, so a step never straddles one.)
FPTQ_HD bool gemm_group_ends(int64_t step, int64_t steps_per_group) { return (step + 1) % steps_per_group == 0; }
FPTQ_HD int64_t gemm_group_of(int64_t step, int64_t steps_per_group) { return step / steps_per_group; }
// A group ends: every int32 sum is scaled by its channel's group scale into the float sum
// (acc = fma(scale, float(sum), acc), as the CPU kernels), and restarts at zero.
FPTQ_HD void gemm_fold_group(GemmAcc& acc, int warp, int lane, int64_t n0, int64_t group, const float* scales,
                             const W4A8Dims& d) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int j = 0; j < kMmaTilesN; ++j) {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int c = 0; c < 2; ++c) {   // c and c + 2 share a column
      const int64_t n = n0 + gemm_c_col(warp, lane, j, c);
      const float s = n < d.N ? ldg(scales + n * d.groups + group) : 0.f;
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int i = 0; i < kMmaTilesM; ++i) {
        acc.f[i][j][c] = fmaf(s, static_cast<float>(acc.i[i][j][c]), acc.f[i][j][c]);
        acc.f[i][j][c + 2] = fmaf(s, static_cast<float>(acc.i[i][j][c + 2]), acc.f[i][j][c + 2]);
        acc.i[i][j][c] = 0;
        acc.i[i][j][c + 2] = 0;
      }
    }
  }
}
// The end: every accumulator element inside [M, N) goes to Y through store(flat index, value).
// Elements c and c + 1 share a row (c = 0 or 2): one row scale a pair of rows of each tile.
template <typename Store>
FPTQ_HD void gemm_store(const GemmAcc& acc, int warp, int lane, int64_t m0, int64_t n0, const float* row_scale,
                        const float* bias, const W4A8Dims& d, Store&& store) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < kMmaTilesM; ++i) {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int c0 = 0; c0 < 4; c0 += 2) {
      const int64_t m = m0 + gemm_c_row(warp, lane, i, c0);
      if (m >= d.M) continue;
      const float a_m = row_scale[m];
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int j = 0; j < kMmaTilesN; ++j) {
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int c = c0; c < c0 + 2; ++c) {
          const int64_t n = n0 + gemm_c_col(warp, lane, j, c);
          if (n < d.N) store(m * d.N + n, epilogue(acc.f[i][j][c], a_m, bias ? bias[n] : 0.f));
        }
      }
    }
  }
}

// The per-Run workspace: int8 X [M, Kp] (rounded up to 256 bytes), then float row scales [M].
FPTQ_HD size_t workspace_xq_bytes(const W4A8Dims& d) { return static_cast<size_t>(d.M * d.Kp + 255) / 256 * 256; }
FPTQ_HD size_t workspace_bytes(const W4A8Dims& d) {
  return workspace_xq_bytes(d) + static_cast<size_t>(d.M) * sizeof(float);
}

}  // namespace cuda
}  // namespace fptq
