// CUDA kernels of fptq::W4A8MatMul (contract: w4a8_layout.h).
//
// and of fptq::W8A8MatMul (int8 weights: d.bits == 8, the same kernels without the nibble unpacking).
//
// The paths, a table chosen per Run by the rows (kCudaPaths in w4a8_cuda_launch.h; FPTQ_CUDA_KERNEL forces one):
//   decode (M <= 16): the weights stream once from memory: a lane loads 16 bytes of a channel's row a
//     step, a warp 4 channels at once, the next step's loads issued before this step's dp4a; up to 4
//     rows the block quantizes X itself into shared memory (one launch), above that quantize_rows first.
//   reference (any M): the first kernels, kept as the twin the new paths are tested against:
//     1. quantize_rows: X -> int8 [M, Kp] (zero padded past K) and one scale per row, one block a row.
//     2. M < 16, gemv: a warp per output channel streams its packed row once, and each 8-value chunk
//        is one pair of dp4a per row of X (a chunk never straddles a group).
//     3. M >= 16, tensor cores: int8 mma.sync m16n8k32 (s8 x s8 -> s32). A block computes 64 x 64
//        outputs with 4 warps of 32 x 32; int4 weights are unpacked to int8 into shared memory as the
//        K-major B operand; int32 accumulators are scaled into float at each group's end
//        (group_size % 32 == 0).
// Every per-thread index (loads, nibble expansion, fragments, accumulator placement, group scales) is
// a function of w4a8_cuda_indexing.h, which tests/cuda_emulation/emulate.cc runs on the CPU.
// The workspace (int8 X and row scales) comes from ONNX Runtime's allocator (w4a8_cuda_op.cc).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "w4a8_cuda_launch.h"
#include "w4a8_cuda_indexing.h"

namespace fptq {
namespace cuda {
namespace {

__device__ __forceinline__ float load_float(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_float(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
quantize_rows(const T* __restrict__ x, int64_t K, int64_t Kp, float static_scale, int8_t* __restrict__ xq,
              float* __restrict__ row_scale) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * K;
  float scale = static_scale;
  if (scale <= 0.f) {
    __shared__ float warp_max[kQuantThreads / kWarpSize];
    float amax = 0.f;
    for (int64_t k = threadIdx.x; k < K; k += kQuantThreads) amax = fmaxf(amax, fabsf(load_float(row, k)));
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    if (threadIdx.x % kWarpSize == 0) warp_max[quant_warp_slot(threadIdx.x)] = amax;
    __syncthreads();
    amax = 0.f;
    for (int w = 0; w < kQuantThreads / kWarpSize; ++w) amax = fmaxf(amax, warp_max[w]);
    scale = token_scale(amax);
  }
  if (threadIdx.x == 0) row_scale[m] = scale;
  for (int64_t k = threadIdx.x; k < Kp; k += kQuantThreads) {
    xq[m * Kp + k] = k < K ? quantize_value(load_float(row, k), scale) : int8_t(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kGemvWarps * kWarpSize)
gemv(const int8_t* __restrict__ xq, const float* __restrict__ row_scale, const uint8_t* __restrict__ weight,
     const float* __restrict__ scales, const float* __restrict__ bias, T* __restrict__ y, W4A8Dims d) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n = gemv_channel(blockIdx.x, threadIdx.x);
  if (n >= d.N) return;
  float acc[kGemvMaxRows];
#pragma unroll
  for (int m = 0; m < kGemvMaxRows; ++m) acc[m] = 0.f;
  const int64_t chunks = gemv_chunks(d);
  for (int64_t c = lane; c < chunks; c += kWarpSize) gemv_chunk(xq, weight, scales, d, n, c, acc);
#pragma unroll
  for (int m = 0; m < kGemvMaxRows; ++m) {
    if (m < d.M) {
      float v = acc[m];
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) store(y, m * d.N + n, epilogue(v, row_scale[m], bias ? bias[n] : 0.f));
    }
  }
}

// The decode path's own quantization of X (Rows <= kDecodeFusedRows): the contract's codes and scales,
// as quantize_rows computes them, into shared memory; every thread of the block takes part.
template <typename T, int Rows>
__device__ __forceinline__ void decode_quantize(const T* __restrict__ x, float static_scale, const W4A8Dims& d,
                                                int8_t* xs, float (&warp_max)[Rows][kDecodeWarps], float (&rs)[Rows]) {
  const int t = threadIdx.x;
  if (static_scale <= 0.f) {
#pragma unroll
    for (int m = 0; m < Rows; ++m) {
      if (m >= d.M) break;
      float amax = 0.f;
      for (int64_t k = t; k < d.K; k += kDecodeThreads) amax = fmaxf(amax, fabsf(load_float(x + m * d.K, k)));
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
      if (t % kWarpSize == 0) warp_max[m][decode_warp_slot(t)] = amax;
    }
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < Rows; ++m) {
    if (m >= d.M) break;
    float scale = static_scale;
    if (scale <= 0.f) {
      float amax = 0.f;
      for (int w = 0; w < kDecodeWarps; ++w) amax = fmaxf(amax, warp_max[m][w]);
      scale = token_scale(amax);
    }
    if (t == 0) rs[m] = scale;
    for (int64_t k = t; k < d.Kp; k += kDecodeThreads) {
      xs[m * d.Kp + k] = k < d.K ? quantize_value(load_float(x + m * d.K, k), scale) : int8_t(0);
    }
  }
  __syncthreads();
}

// The decode path (see the top of this file; every index from w4a8_cuda_indexing.h's decode section).
// Fused: X is quantized here (xq and row_scale unused); else xq and row_scale are quantize_rows' output.
template <typename T, int Rows, bool Fused>
__global__ void __launch_bounds__(kDecodeThreads)
decode(const T* __restrict__ x, float static_scale, const int8_t* __restrict__ xq, const float* __restrict__ row_scale,
       const uint8_t* __restrict__ weight, const float* __restrict__ scales, const float* __restrict__ bias,
       T* __restrict__ y, W4A8Dims d) {
  extern __shared__ __align__(16) int8_t xs[];   // Fused: X's int8 rows [M, Kp]
  __shared__ float warp_max[Rows][kDecodeWarps];
  __shared__ float rs[Rows];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t chunks = decode_chunks(d);
  int64_t n[kDecodeChannels];
  Bytes16 w[kDecodeChannels];
#pragma unroll
  for (int j = 0; j < kDecodeChannels; ++j) {
    n[j] = decode_channel(blockIdx.x, warp, j);
    w[j] = lane < chunks ? decode_load(weight, d, n[j], lane) : Bytes16{0, 0, 0, 0};   // in flight meanwhile
  }
  const int8_t* rows = xq;
  const float* a = row_scale;
  if constexpr (Fused) {
    decode_quantize<T, Rows>(x, static_scale, d, xs, warp_max, rs);
    rows = xs;
    a = rs;
  }
  float acc[kDecodeChannels][Rows];
#pragma unroll
  for (int j = 0; j < kDecodeChannels; ++j)
#pragma unroll
    for (int m = 0; m < Rows; ++m) acc[j][m] = 0.f;
  for (int64_t c = lane; c < chunks; c += kWarpSize) {
    const bool more = c + kWarpSize < chunks;
    Bytes16 next[kDecodeChannels];
#pragma unroll
    for (int j = 0; j < kDecodeChannels; ++j) next[j] = more ? decode_load(weight, d, n[j], c + kWarpSize) : w[j];
#pragma unroll
    for (int j = 0; j < kDecodeChannels; ++j) decode_chunk<Rows>(w[j], rows, scales, d, n[j], c, acc[j]);
#pragma unroll
    for (int j = 0; j < kDecodeChannels; ++j) w[j] = next[j];
  }
#pragma unroll
  for (int j = 0; j < kDecodeChannels; ++j) {
#pragma unroll
    for (int m = 0; m < Rows; ++m) {
      if (m < d.M) {
        float v = acc[j][m];
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (lane == 0 && n[j] < d.N) store(y, m * d.N + n[j], epilogue(v, a[m], bias ? bias[n[j]] : 0.f));
      }
    }
  }
}

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The fragment layouts and every index are in w4a8_cuda_indexing.h (shared with the CPU emulation).
template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
gemm_mma(const int8_t* __restrict__ xq, const float* __restrict__ row_scale, const uint8_t* __restrict__ weight,
         const float* __restrict__ scales, const float* __restrict__ bias, T* __restrict__ y, W4A8Dims d) {
  __shared__ __align__(16) int8_t As[kTileM * kSmemStride];
  __shared__ __align__(16) int8_t Bs[kTileN * kSmemStride];
  const int t = threadIdx.x, lane = t % kWarpSize, warp = t / kWarpSize;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;

  GemmAcc acc;
  gemm_acc_zero(acc);
  const int64_t steps = gemm_steps(d), steps_per_group = gemm_steps_per_group(d);
  for (int64_t step = 0; step < steps; ++step) {
    gemm_load_a(t, m0, step, xq, d, As);
    if (gemm_loads_b(t)) gemm_load_b(t, n0, step, weight, d, Bs);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kMmaTilesM; ++i) {
      uint32_t a[4];
      gemm_a_frag(As, warp, lane, i, a);
#pragma unroll
      for (int j = 0; j < kMmaTilesN; ++j) {
        uint32_t b[2];
        gemm_b_frag(Bs, warp, lane, j, b);
        mma_s8(acc.i[i][j], a, b);
      }
    }
    __syncthreads();
    if (gemm_group_ends(step, steps_per_group)) {
      gemm_fold_group(acc, warp, lane, n0, gemm_group_of(step, steps_per_group), scales, d);
    }
  }
  gemm_store(acc, warp, lane, m0, n0, row_scale, bias, d, [y](int64_t i, float v) { store(y, i, v); });
}

template <typename T>
const char* Launch(const W4A8Dims& d, const T* x, const uint8_t* weight, const float* scales, float static_scale,
                   const float* bias, T* y, void* workspace, cudaStream_t stream, int path) {
  int8_t* xq = static_cast<int8_t*>(workspace);
  float* row_scale = reinterpret_cast<float*>(static_cast<char*>(workspace) + workspace_xq_bytes(d));
  const unsigned quant_blocks = static_cast<unsigned>(d.M);
  const int rows = path == kPathDecode ? decode_rows(d.M, d.Kp) : 0;
  if (rows == 1 || rows == kDecodeFusedRows) {
    const size_t smem = static_cast<size_t>(d.M * d.Kp);
    const unsigned blocks = static_cast<unsigned>(decode_blocks(d.N));
    if (rows == 1) {
      decode<T, 1, true><<<blocks, kDecodeThreads, smem, stream>>>(x, static_scale, nullptr, nullptr, weight, scales, bias, y, d);
    } else {
      decode<T, kDecodeFusedRows, true><<<blocks, kDecodeThreads, smem, stream>>>(x, static_scale, nullptr, nullptr, weight,
                                                                                  scales, bias, y, d);
    }
  } else {
    quantize_rows<T><<<quant_blocks, kQuantThreads, 0, stream>>>(x, d.K, d.Kp, static_scale, xq, row_scale);
    if (rows == kDecodeMaxRows) {
      decode<T, kDecodeMaxRows, false><<<static_cast<unsigned>(decode_blocks(d.N)), kDecodeThreads, 0, stream>>>(
          x, static_scale, xq, row_scale, weight, scales, bias, y, d);
    } else if (use_gemv(d.M)) {
      gemv<T><<<static_cast<unsigned>(gemv_blocks(d.N)), kGemvWarps * kWarpSize, 0, stream>>>(xq, row_scale, weight, scales,
                                                                                               bias, y, d);
    } else {
      const GemmGrid g = gemm_grid(d);
      gemm_mma<T><<<dim3(static_cast<unsigned>(g.blocks_n), static_cast<unsigned>(g.blocks_m)), kGemmThreads, 0, stream>>>(
          xq, row_scale, weight, scales, bias, y, d);
    }
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace
}  // namespace cuda

size_t W4A8WorkspaceBytes(const W4A8Dims& dims) { return cuda::workspace_bytes(dims); }

const char* CudaDeviceSm(int* sm) {
  int device = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  *sm = major * 10 + minor;
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* LaunchW4A8(const W4A8Dims& dims, const void* x, bool x_half, const uint8_t* weight, const float* scales,
                       float static_scale, const float* bias, void* y, void* workspace, void* stream, int path) {
  if (dims.M > 0x7fffffff) return "more than 2^31 - 1 rows";
  if (reinterpret_cast<uintptr_t>(workspace) % 16) return "the workspace is not 16-byte aligned";
  auto s = static_cast<cudaStream_t>(stream);
  if (x_half) {
    return cuda::Launch(dims, static_cast<const __half*>(x), weight, scales, static_scale, bias, static_cast<__half*>(y),
                        workspace, s, path);
  }
  return cuda::Launch(dims, static_cast<const float*>(x), weight, scales, static_scale, bias, static_cast<float*>(y),
                      workspace, s, path);
}

}  // namespace fptq
