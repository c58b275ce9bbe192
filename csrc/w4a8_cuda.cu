// CUDA kernels of fptq::W4A8MatMul (contract: w4a8_layout.h).
//
// 1. quantize_rows: X -> int8 [M, Kp] (zero padded past K) and one scale per row, one block a row.
// 2. M < 16, gemv: memory bound on the weights; a warp per output channel streams its packed row
//    once, and each 8-value chunk is one pair of dp4a per row of X (a chunk never straddles a group).
// 3. M >= 16, tensor cores: int8 mma.sync m16n8k32 (s8 x s8 -> s32). A block computes 64 x 64 outputs
//    with 4 warps of 32 x 32; int4 weights are unpacked to int8 into shared memory as the K-major B
//    operand; int32 accumulators are scaled into float at each group's end (group_size % 32 == 0).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "w4a8_cuda_launch.h"

namespace fptq {
namespace {

__device__ __forceinline__ float load_float(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_float(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

// Eight packed nibbles (one 32-bit word, k ascending from the low nibble) -> two words of four int8
// each, in k order. __vsub4 sign-extends every byte without borrowing across bytes.
__device__ __forceinline__ void unpack8(uint32_t word, uint32_t& k0123, uint32_t& k4567) {
  const uint32_t even = __vsub4((word & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);         // k0 k2 k4 k6
  const uint32_t odd = __vsub4(((word >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u, 0x08080808u);   // k1 k3 k5 k7
  k0123 = __byte_perm(even, odd, 0x5140);
  k4567 = __byte_perm(even, odd, 0x7362);
}

constexpr int kQuantThreads = 256;

template <typename T>
__global__ void quantize_rows(const T* __restrict__ x, int64_t K, int64_t Kp, float static_scale,
                              int8_t* __restrict__ xq, float* __restrict__ row_scale) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * K;
  float scale = static_scale;
  if (scale <= 0.f) {
    __shared__ float warp_max[kQuantThreads / 32];
    float amax = 0.f;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(load_float(row, k)));
    for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = 0.f;
    for (int w = 0; w < kQuantThreads / 32; ++w) amax = fmaxf(amax, warp_max[w]);
    scale = fmaxf(amax / 127.f, kMinTokenScale);  // a true division, as the qdq form's Div
  }
  if (threadIdx.x == 0) row_scale[m] = scale;
  for (int64_t k = threadIdx.x; k < Kp; k += blockDim.x) {
    float q = 0.f;
    if (k < K) q = fminf(fmaxf(rintf(__fdiv_rn(load_float(row, k), scale)), -128.f), 127.f);
    xq[m * Kp + k] = static_cast<int8_t>(q);
  }
}

constexpr int kGemvWarps = 8;
constexpr int kGemvMaxRows = 15;

template <typename T>
__global__ void __launch_bounds__(kGemvWarps * 32)
gemv(const int8_t* __restrict__ xq, const float* __restrict__ row_scale, const uint8_t* __restrict__ weight,
     const float* __restrict__ scales, const float* __restrict__ bias, T* __restrict__ y, W4A8Dims d) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  if (n >= d.N) return;
  const uint32_t* wrow = reinterpret_cast<const uint32_t*>(weight + n * (d.Kp / 2));
  const float* srow = scales + n * d.groups;
  float acc[kGemvMaxRows];
#pragma unroll
  for (int m = 0; m < kGemvMaxRows; ++m) acc[m] = 0.f;
  const int64_t chunks = d.Kp / 8;  // 8 values per 32-bit word
  for (int64_t c = lane; c < chunks; c += 32) {
    uint32_t w0, w1;
    unpack8(__ldg(wrow + c), w0, w1);
    const float s = __ldg(srow + (c * 8) / d.group);
#pragma unroll
    for (int m = 0; m < kGemvMaxRows; ++m) {
      if (m < d.M) {
        const int2 xv = *reinterpret_cast<const int2*>(xq + m * d.Kp + c * 8);
        acc[m] += s * static_cast<float>(__dp4a(xv.x, static_cast<int>(w0), __dp4a(xv.y, static_cast<int>(w1), 0)));
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kGemvMaxRows; ++m) {
    if (m < d.M) {
      float v = acc[m];
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) store(y, m * d.N + n, v * row_scale[m] + (bias ? bias[n] : 0.f));
    }
  }
}

constexpr int kTileM = 64, kTileN = 64, kTileK = 32;
constexpr int kGemmThreads = 128;           // 4 warps, 2 x 2, each 32 x 32 outputs
constexpr int kSmemStride = kTileK + 16;    // 48 bytes: fragment reads of 8 rows hit 8 distinct bank groups

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Fragment layouts (PTX ISA, mma.m16n8k32 .s8), gid = lane / 4, tid = lane % 4:
//   A 16x32 row-major: a0 = A[gid][4tid..], a1 = A[gid+8][4tid..], a2 = A[gid][16+4tid..], a3 = A[gid+8][16+4tid..]
//   B 32x8 K-major:    b0 = B[4tid..][gid], b1 = B[16+4tid..][gid]
//   C 16x8:            c0 = C[gid][2tid], c1 = C[gid][2tid+1], c2 = C[gid+8][2tid], c3 = C[gid+8][2tid+1]
template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
gemm_mma(const int8_t* __restrict__ xq, const float* __restrict__ row_scale, const uint8_t* __restrict__ weight,
         const float* __restrict__ scales, const float* __restrict__ bias, T* __restrict__ y, W4A8Dims d) {
  __shared__ __align__(16) int8_t As[kTileM * kSmemStride];
  __shared__ __align__(16) int8_t Bs[kTileN * kSmemStride];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int gid = lane / 4, tid = lane % 4;
  const int wm = warp / 2, wn = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;

  int iacc[2][4][4];
  float facc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) iacc[i][j][c] = 0, facc[i][j][c] = 0.f;

  const int64_t steps = d.Kp / kTileK;
  const int64_t steps_per_group = d.group / kTileK;
  for (int64_t step = 0; step < steps; ++step) {
    {  // A: 64 rows x 32 int8, 16 bytes a thread
      const int row = t / 2, half = t % 2;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m0 + row < d.M) v = *reinterpret_cast<const uint4*>(xq + (m0 + row) * d.Kp + step * kTileK + half * 16);
      *reinterpret_cast<uint4*>(As + row * kSmemStride + half * 16) = v;
    }
    if (t < kTileN) {  // B: 64 output channels x 32 int4 (16 bytes) unpacked to 32 int8
      uint4 v = make_uint4(0, 0, 0, 0);
      if (n0 + t < d.N) v = *reinterpret_cast<const uint4*>(weight + (n0 + t) * (d.Kp / 2) + step * (kTileK / 2));
      uint4 lo, hi;
      unpack8(v.x, lo.x, lo.y);
      unpack8(v.y, lo.z, lo.w);
      unpack8(v.z, hi.x, hi.y);
      unpack8(v.w, hi.z, hi.w);
      *reinterpret_cast<uint4*>(Bs + t * kSmemStride) = lo;
      *reinterpret_cast<uint4*>(Bs + t * kSmemStride + 16) = hi;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int8_t* a_base = As + (wm * 32 + i * 16 + gid) * kSmemStride + tid * 4;
      const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(a_base),
                             *reinterpret_cast<const uint32_t*>(a_base + 8 * kSmemStride),
                             *reinterpret_cast<const uint32_t*>(a_base + 16),
                             *reinterpret_cast<const uint32_t*>(a_base + 8 * kSmemStride + 16)};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int8_t* b_base = Bs + (wn * 32 + j * 8 + gid) * kSmemStride + tid * 4;
        mma_s8(iacc[i][j], a, *reinterpret_cast<const uint32_t*>(b_base), *reinterpret_cast<const uint32_t*>(b_base + 16));
      }
    }
    __syncthreads();
    if ((step + 1) % steps_per_group == 0) {  // a group ends: scale its int32 sums into the float ones
      const int64_t grp = step / steps_per_group;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t n = n0 + wn * 32 + j * 8 + tid * 2 + c;
          const float s = n < d.N ? __ldg(scales + n * d.groups + grp) : 0.f;
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            facc[i][j][c] += s * static_cast<float>(iacc[i][j][c]);
            facc[i][j][c + 2] += s * static_cast<float>(iacc[i][j][c + 2]);
            iacc[i][j][c] = 0;
            iacc[i][j][c + 2] = 0;
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t m = m0 + wm * 32 + i * 16 + gid + (c >= 2 ? 8 : 0);
        const int64_t n = n0 + wn * 32 + j * 8 + tid * 2 + (c & 1);
        if (m < d.M && n < d.N) store(y, m * d.N + n, facc[i][j][c] * row_scale[m] + (bias ? bias[n] : 0.f));
      }
}

template <typename T>
const char* Launch(const W4A8Dims& d, const T* x, const uint8_t* weight, const float* scales, float static_scale,
                   const float* bias, T* y, cudaStream_t stream) {
  // Workspace from the stream-ordered pool: int8 X [M, Kp] then float row scales [M].
  const size_t xq_bytes = static_cast<size_t>(d.M * d.Kp + 255) / 256 * 256;
  void* workspace = nullptr;
  cudaError_t err = cudaMallocAsync(&workspace, xq_bytes + static_cast<size_t>(d.M) * sizeof(float), stream);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  int8_t* xq = static_cast<int8_t*>(workspace);
  float* row_scale = reinterpret_cast<float*>(static_cast<char*>(workspace) + xq_bytes);
  quantize_rows<T><<<static_cast<unsigned>(d.M), kQuantThreads, 0, stream>>>(x, d.K, d.Kp, static_scale, xq, row_scale);
  if (d.M <= kGemvMaxRows) {
    const unsigned blocks = static_cast<unsigned>((d.N + kGemvWarps - 1) / kGemvWarps);
    gemv<T><<<blocks, kGemvWarps * 32, 0, stream>>>(xq, row_scale, weight, scales, bias, y, d);
  } else {
    const dim3 grid(static_cast<unsigned>((d.N + kTileN - 1) / kTileN), static_cast<unsigned>((d.M + kTileM - 1) / kTileM));
    gemm_mma<T><<<grid, kGemmThreads, 0, stream>>>(xq, row_scale, weight, scales, bias, y, d);
  }
  err = cudaGetLastError();
  cudaError_t free_err = cudaFreeAsync(workspace, stream);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  if (free_err != cudaSuccess) return cudaGetErrorString(free_err);
  return nullptr;
}

}  // namespace

const char* LaunchW4A8(const W4A8Dims& dims, const void* x, bool x_half, const uint8_t* weight, const float* scales,
                       float static_scale, const float* bias, void* y, void* stream) {
  if (dims.M > 0x7fffffff) return "more than 2^31 - 1 rows";
  auto s = static_cast<cudaStream_t>(stream);
  if (x_half) {
    return Launch(dims, static_cast<const __half*>(x), weight, scales, static_scale, bias, static_cast<__half*>(y), s);
  }
  return Launch(dims, static_cast<const float*>(x), weight, scales, static_scale, bias, static_cast<float*>(y), s);
}

}  // namespace fptq
