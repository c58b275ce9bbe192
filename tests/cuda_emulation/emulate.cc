// The CUDA kernels of fptq::W4A8MatMul (csrc/w4a8_cuda.cu), run on the CPU thread block by thread
// block, warp by warp, lane by lane. Every per-thread index (which bytes a thread loads, how nibbles
// are expanded, which fragment register holds which element, where accumulators go, which group scale
// applies) comes from csrc/w4a8_cuda_indexing.h, the same functions the kernels call. What a GPU does
// for a whole warp or block is emulated here, from the vendor's documentation and not from our kernels:
//   - mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 from the PTX ISA's fragment layouts (below);
//   - __dp4a, __vsub4, __byte_perm from the CUDA Math API's descriptions;
//   - __shfl_xor_sync as a butterfly over the warp's 32 values, __syncthreads as the boundary between
//     two loops over all threads of the block; shared memory is a host array filled with garbage
//     before each step (a read of anything not written in that step shows up in the result).
// Global buffers are allocated at their exact sizes (build with -fsanitize=address to catch any read
// or write past them), and every vector access is checked for the alignment the device requires.
//
//   emulate DIR M K N GROUP ACT_SCALE BIAS [--path auto|decode|gemv|gemm] [--bits 4|8] [--wrong-layout a|b|c|nibble]
//
// reads DIR/x.bin (float32 [M, K]), w.bin (uint8 [N, Kp/2]; --bits 8: int8 [N, Kp]), s.bin (float32
// [N, groups]), b.bin (float32 [N], when BIAS is 1); ACT_SCALE > 0 is the static activation scale, 0 per
// token. Writes DIR/y.bin (float32 [M, N]), xq.bin (int8 [M, Kp]) and rs.bin (float32 [M]; the decode
// path's fused quantization: block 0's shared memory) and prints which kernel ran. auto: the path
// table's choice on an sm_90 device (w4a8_cuda_launch.h), then the reference's gemv or gemm by M.
// --wrong-layout swaps one mapping of the emulated hardware (a: MMA A registers 1 and 2; b: MMA B
// registers 0 and 1; c: MMA C elements 1 and 2; nibble: byte_perm's two inputs): the test suite
// checks that each makes the comparison with the reference fail.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "w4a8_cuda_indexing.h"
#include "w4a8_cuda_launch.h"

namespace {

std::string g_wrong;   // --wrong-layout

}  // namespace

namespace fptq {
namespace cuda {
namespace emu {

// __vsub4(a, b): per-byte a - b, each byte wrapping modulo 256 (no borrow into the next byte).
uint32_t vsub4(uint32_t a, uint32_t b) {
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t d = ((a >> (8 * i)) - (b >> (8 * i))) & 0xFFu;
    r |= d << (8 * i);
  }
  return r;
}

// __byte_perm(x, y, s): the 8 bytes {y, x} (x bytes 0-3, y bytes 4-7); result byte n is the input
// byte numbered by bits [4n+2 : 4n] of s (bit 4n+3 unused here: the kernels never set it).
uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  if (g_wrong == "nibble") std::swap(x, y);
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) {
    const uint32_t sel = (s >> (4 * n)) & 0x7u;
    r |= static_cast<uint32_t>((bytes >> (8 * sel)) & 0xFFu) << (8 * n);
  }
  return r;
}

// __dp4a(a, b, c): c + the sum of the four products of a's and b's bytes, each a signed 8-bit value.
int dp4a(int a, int b, int c) {
  int sum = c;
  for (int i = 0; i < 4; ++i) {
    sum += static_cast<int8_t>((static_cast<uint32_t>(a) >> (8 * i)) & 0xFF) *
           static_cast<int8_t>((static_cast<uint32_t>(b) >> (8 * i)) & 0xFF);
  }
  return sum;
}

void check_aligned(const void* p, int bytes) {
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) {
    std::fprintf(stderr, "misaligned %d-byte access at %p: the device would fault\n", bytes, p);
    std::abort();
  }
}

}  // namespace emu
}  // namespace cuda
}  // namespace fptq

namespace {

using namespace fptq;
using namespace fptq::cuda;

// ---- the warp-wide instructions ------------------------------------------------------------------

int8_t byte_of(uint32_t reg, int i) { return static_cast<int8_t>((reg >> (8 * i)) & 0xFF); }

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 d, a, b, c for one warp: D = A (16x32) x B (32x8) + C.
// PTX ISA, "Matrix Fragments for mma.m16n8k32", .s8 (groupID = laneid >> 2, threadID_in_group = laneid % 4):
//   A: four .b32 registers of four .s8 each, elements a0..a15 (low byte first: a_i is byte i % 4 of register i / 4);
//      row = groupID for 0 <= i < 4 || 8 <= i < 12, groupID + 8 otherwise;
//      col = threadID_in_group * 4 + (i & 0x3) for i < 8, threadID_in_group * 4 + (i & 0x3) + 16 otherwise.
//   B: two .b32 registers, elements b0..b7; row = threadID_in_group * 4 + (i & 0x3) for i < 4, + 16 for i >= 4;
//      col = groupID.
//   C, D: four .s32 elements c0..c3; row = groupID for i < 2, groupID + 8 otherwise;
//      col = threadID_in_group * 2 + (i & 0x1).
void mma_m16n8k32_s8(const uint32_t (&a)[kWarpSize][4], const uint32_t (&b)[kWarpSize][2], int (&c)[kWarpSize][4]) {
  int8_t A[16][32], B[32][8];
  int C[16][8];
  bool seen_a[16][32] = {}, seen_b[32][8] = {}, seen_c[16][8] = {};
  auto fail = [](const char* what) {
    std::fprintf(stderr, "emulated mma: %s\n", what);
    std::abort();
  };
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int group_id = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 16; ++i) {
      int row = (i < 4 || (i >= 8 && i < 12)) ? group_id : group_id + 8;
      int col = tig * 4 + (i & 0x3) + (i < 8 ? 0 : 16);
      if (g_wrong == "a" && i >= 4 && i < 12) {   // registers 1 and 2 swapped
        row = i < 8 ? group_id : group_id + 8;
        col = tig * 4 + (i & 0x3) + (i < 8 ? 16 : 0);
      }
      if (seen_a[row][col]) fail("two lanes hold the same A element");
      seen_a[row][col] = true;
      A[row][col] = byte_of(a[lane][i / 4], i % 4);
    }
    for (int i = 0; i < 8; ++i) {
      int row = tig * 4 + (i & 0x3) + (i < 4 ? 0 : 16);
      if (g_wrong == "b") row = tig * 4 + (i & 0x3) + (i < 4 ? 16 : 0);   // registers 0 and 1 swapped
      const int col = group_id;
      if (seen_b[row][col]) fail("two lanes hold the same B element");
      seen_b[row][col] = true;
      B[row][col] = byte_of(b[lane][i / 4], i % 4);
    }
  }
  auto c_place = [](int lane, int i, int& row, int& col) {
    const int group_id = lane >> 2, tig = lane % 4;
    int e = i;
    if (g_wrong == "c" && (i == 1 || i == 2)) e = 3 - i;   // elements 1 and 2 swapped
    row = e < 2 ? group_id : group_id + 8;
    col = tig * 2 + (e & 0x1);
  };
  for (int lane = 0; lane < kWarpSize; ++lane) {
    for (int i = 0; i < 4; ++i) {
      int row, col;
      c_place(lane, i, row, col);
      if (seen_c[row][col]) fail("two lanes hold the same C element");
      seen_c[row][col] = true;
      C[row][col] = c[lane][i];
    }
  }
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      int sum = C[m][n];
      for (int k = 0; k < 32; ++k) sum += A[m][k] * B[k][n];
      C[m][n] = sum;
    }
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    for (int i = 0; i < 4; ++i) {
      int row, col;
      c_place(lane, i, row, col);
      c[lane][i] = C[row][col];
    }
  }
}

// __shfl_xor_sync(0xffffffff, v, offset) for every offset 16, 8, 4, 2, 1, each lane combining its
// value with lane ^ offset's (all lanes read before any writes).
template <typename Op>
void butterfly(float (&v)[kWarpSize], Op op) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    float before[kWarpSize];
    std::memcpy(before, v, sizeof(v));
    for (int lane = 0; lane < kWarpSize; ++lane) v[lane] = op(before[lane], before[lane ^ offset]);
  }
}

// ---- device memory: exact sizes, 256-byte aligned (as cudaMalloc and ORT's arena give) ---------------

template <typename T>
struct DeviceBuffer {
  T* data = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n) : count(n) {
    data = static_cast<T*>(::operator new(n > 0 ? n * sizeof(T) : 1, std::align_val_t(256)));
  }
  ~DeviceBuffer() { ::operator delete(data, std::align_val_t(256)); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// ---- the kernels, as the GPU would run them --------------------------------------------------------

// quantize_rows<<<M, kQuantThreads>>>
void run_quantize(const float* x, const W4A8Dims& d, float static_scale, int8_t* xq, float* row_scale) {
  for (int64_t m = 0; m < d.M; ++m) {          // blockIdx.x
    const float* row = x + m * d.K;
    float scale[kQuantThreads];
    for (int t = 0; t < kQuantThreads; ++t) scale[t] = static_scale;
    if (static_scale <= 0.f) {
      float warp_max[kQuantThreads / kWarpSize];
      for (int w = 0; w < kQuantThreads / kWarpSize; ++w) std::memset(&warp_max[w], 0xA5, sizeof(float));
      for (int w = 0; w < kQuantThreads / kWarpSize; ++w) {
        float amax[kWarpSize];
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int t = w * kWarpSize + lane;
          amax[lane] = 0.f;
          for (int64_t k = t; k < d.K; k += kQuantThreads) amax[lane] = fmaxf(amax[lane], fabsf(row[k]));
        }
        butterfly(amax, [](float a, float b) { return fmaxf(a, b); });
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int t = w * kWarpSize + lane;
          if (t % kWarpSize == 0) warp_max[quant_warp_slot(t)] = amax[lane];
        }
      }
      // __syncthreads()
      for (int t = 0; t < kQuantThreads; ++t) {
        float amax = 0.f;
        for (int w = 0; w < kQuantThreads / kWarpSize; ++w) amax = fmaxf(amax, warp_max[w]);
        scale[t] = token_scale(amax);
      }
    }
    for (int t = 0; t < kQuantThreads; ++t) {
      if (t == 0) row_scale[m] = scale[t];
      for (int64_t k = t; k < d.Kp; k += kQuantThreads) {
        xq[m * d.Kp + k] = k < d.K ? quantize_value(row[k], scale[t]) : int8_t(0);
      }
    }
  }
}

// gemv<<<gemv_blocks(N), kGemvWarps * 32>>>
void run_gemv(const int8_t* xq, const float* row_scale, const uint8_t* weight, const float* scales, const float* bias,
              float* y, const W4A8Dims& d) {
  const int threads = kGemvWarps * kWarpSize;
  for (int block = 0; block < gemv_blocks(d.N); ++block) {
    for (int w = 0; w < kGemvWarps; ++w) {
      float acc[kWarpSize][kGemvMaxRows];
      const int64_t n = gemv_channel(block, w * kWarpSize);
      if (n >= d.N) continue;   // the whole warp returns
      for (int lane = 0; lane < kWarpSize; ++lane) {
        const int t = w * kWarpSize + lane;
        if (t >= threads || gemv_channel(block, t) != n) std::abort();   // a warp = one channel
        for (int m = 0; m < kGemvMaxRows; ++m) acc[lane][m] = 0.f;
        for (int64_t c = lane; c < gemv_chunks(d); c += kWarpSize) gemv_chunk(xq, weight, scales, d, n, c, acc[lane]);
      }
      for (int m = 0; m < kGemvMaxRows && m < d.M; ++m) {
        float v[kWarpSize];
        for (int lane = 0; lane < kWarpSize; ++lane) v[lane] = acc[lane][m];
        butterfly(v, [](float a, float b) { return a + b; });
        y[m * d.N + n] = epilogue(v[0], row_scale[m], bias ? bias[n] : 0.f);   // lane 0 stores
      }
    }
  }
}

// decode<T, Rows, Fused><<<decode_blocks(N), kDecodeThreads, Fused ? M * Kp : 0>>>. Fused: each block
// quantizes X into its own shared memory first (decode_quantize); block 0's result is copied to xq and
// row_scale for the caller's checks. Else xq and row_scale are quantize_rows' output.
template <int Rows>
void run_decode(const float* x, float static_scale, int8_t* xq, float* row_scale, const uint8_t* weight,
                const float* scales, const float* bias, float* y, const W4A8Dims& d, bool fused) {
  DeviceBuffer<int8_t> xs(fused ? d.M * d.Kp : 0);        // extern __shared__
  std::vector<char> written(d.M * d.N, 0);
  const int64_t chunks = decode_chunks(d);
  for (int block = 0; block < decode_blocks(d.N); ++block) {
    const int8_t* rows = xq;
    const float* a = row_scale;
    float rs[Rows];
    if (fused) {
      std::memset(xs.data, 0x5A, xs.count);            // garbage: a code not written here is read wrong
      float warp_max[Rows][kDecodeWarps];
      std::memset(warp_max, 0xA5, sizeof(warp_max));
      if (static_scale <= 0.f) {
        for (int64_t m = 0; m < d.M; ++m) {
          for (int w = 0; w < kDecodeWarps; ++w) {
            float amax[kWarpSize];
            for (int lane = 0; lane < kWarpSize; ++lane) {
              const int t = w * kWarpSize + lane;
              amax[lane] = 0.f;
              for (int64_t k = t; k < d.K; k += kDecodeThreads) amax[lane] = fmaxf(amax[lane], fabsf(x[m * d.K + k]));
            }
            butterfly(amax, [](float p, float q) { return fmaxf(p, q); });
            warp_max[m][decode_warp_slot(w * kWarpSize)] = amax[0];
          }
        }
      }
      // __syncthreads()
      for (int64_t m = 0; m < d.M; ++m) {
        for (int t = 0; t < kDecodeThreads; ++t) {
          float scale = static_scale;
          if (scale <= 0.f) {
            float amax = 0.f;
            for (int w = 0; w < kDecodeWarps; ++w) amax = fmaxf(amax, warp_max[m][w]);
            scale = token_scale(amax);
          }
          if (t == 0) rs[m] = scale;
          for (int64_t k = t; k < d.Kp; k += kDecodeThreads) {
            xs.data[m * d.Kp + k] = k < d.K ? quantize_value(x[m * d.K + k], scale) : int8_t(0);
          }
        }
      }
      // __syncthreads()
      if (block == 0) {
        std::memcpy(xq, xs.data, xs.count);
        std::memcpy(row_scale, rs, sizeof(float) * d.M);
      }
      rows = xs.data;
      a = rs;
    }
    for (int warp = 0; warp < kDecodeWarps; ++warp) {
      float acc[kWarpSize][kDecodeChannels][Rows];
      for (int lane = 0; lane < kWarpSize; ++lane) {
        for (int j = 0; j < kDecodeChannels; ++j) {
          for (int m = 0; m < Rows; ++m) acc[lane][j][m] = 0.f;
          const int64_t n = decode_channel(block, warp, j);
          for (int64_t c = lane; c < chunks; c += kWarpSize) {
            decode_chunk<Rows>(decode_load(weight, d, n, c), rows, scales, d, n, c, acc[lane][j]);
          }
        }
      }
      for (int j = 0; j < kDecodeChannels; ++j) {
        const int64_t n = decode_channel(block, warp, j);
        for (int m = 0; m < Rows && m < d.M; ++m) {
          float v[kWarpSize];
          for (int lane = 0; lane < kWarpSize; ++lane) v[lane] = acc[lane][j][m];
          butterfly(v, [](float p, float q) { return p + q; });
          if (n >= d.N) continue;
          const int64_t i = m * d.N + n;
          if (written[i]) {
            std::fprintf(stderr, "Y[%lld] written twice\n", static_cast<long long>(i));
            std::abort();
          }
          written[i] = 1;
          y[i] = epilogue(v[0], a[m], bias ? bias[n] : 0.f);   // lane 0 stores
        }
      }
    }
  }
  for (size_t i = 0; i < written.size(); ++i) {
    if (!written[i]) {
      std::fprintf(stderr, "Y[%zu] never written\n", i);
      std::exit(3);
    }
  }
}

// gemm_mma<<<(blocks_n, blocks_m), kGemmThreads>>>
void run_gemm(const int8_t* xq, const float* row_scale, const uint8_t* weight, const float* scales, const float* bias,
              float* y, const W4A8Dims& d) {
  const GemmGrid grid = gemm_grid(d);
  DeviceBuffer<int8_t> As(kTileM * kSmemStride), Bs(kTileN * kSmemStride);   // __shared__
  std::vector<GemmAcc> acc(kGemmThreads);
  std::vector<char> written(d.M * d.N, 0);
  for (int by = 0; by < grid.blocks_m; ++by) {
    for (int bx = 0; bx < grid.blocks_n; ++bx) {
      const int64_t m0 = static_cast<int64_t>(by) * kTileM, n0 = static_cast<int64_t>(bx) * kTileN;
      for (int t = 0; t < kGemmThreads; ++t) gemm_acc_zero(acc[t]);
      const int64_t steps = gemm_steps(d), steps_per_group = gemm_steps_per_group(d);
      for (int64_t step = 0; step < steps; ++step) {
        std::memset(As.data, 0x5A, As.count);   // what the previous step left: not to be read again
        std::memset(Bs.data, 0x5A, Bs.count);
        for (int t = 0; t < kGemmThreads; ++t) {
          gemm_load_a(t, m0, step, xq, d, As.data);
          if (gemm_loads_b(t)) gemm_load_b(t, n0, step, weight, d, Bs.data);
        }
        // __syncthreads()
        for (int warp = 0; warp < kGemmThreads / kWarpSize; ++warp) {
          for (int i = 0; i < kMmaTilesM; ++i) {
            uint32_t a[kWarpSize][4];
            for (int lane = 0; lane < kWarpSize; ++lane) gemm_a_frag(As.data, warp, lane, i, a[lane]);
            for (int j = 0; j < kMmaTilesN; ++j) {
              uint32_t b[kWarpSize][2];
              int c[kWarpSize][4];
              for (int lane = 0; lane < kWarpSize; ++lane) {
                gemm_b_frag(Bs.data, warp, lane, j, b[lane]);
                std::memcpy(c[lane], acc[warp * kWarpSize + lane].i[i][j], sizeof(c[lane]));
              }
              mma_m16n8k32_s8(a, b, c);
              for (int lane = 0; lane < kWarpSize; ++lane) {
                std::memcpy(acc[warp * kWarpSize + lane].i[i][j], c[lane], sizeof(c[lane]));
              }
            }
          }
        }
        // __syncthreads()
        if (gemm_group_ends(step, steps_per_group)) {
          for (int t = 0; t < kGemmThreads; ++t) {
            gemm_fold_group(acc[t], t / kWarpSize, t % kWarpSize, n0, gemm_group_of(step, steps_per_group), scales, d);
          }
        }
      }
      for (int t = 0; t < kGemmThreads; ++t) {
        gemm_store(acc[t], t / kWarpSize, t % kWarpSize, m0, n0, row_scale, bias, d, [&](int64_t i, float v) {
          if (written[i]) {
            std::fprintf(stderr, "Y[%lld] written twice\n", static_cast<long long>(i));
            std::abort();
          }
          written[i] = 1;
          y[i] = v;
        });
      }
    }
  }
  for (size_t i = 0; i < written.size(); ++i) {
    if (!written[i]) {
      std::fprintf(stderr, "Y[%zu] never written\n", i);
      std::exit(3);
    }
  }
}

// ---- files ----------------------------------------------------------------------------------------

template <typename T>
void read_file(const std::string& path, T* data, size_t count) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(data, sizeof(T), count, f) != count || std::fgetc(f) != EOF) {
    std::fprintf(stderr, "%s: expected %zu values of %zu bytes\n", path.c_str(), count, sizeof(T));
    std::exit(2);
  }
  std::fclose(f);
}

template <typename T>
void write_file(const std::string& path, const T* data, size_t count) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data, sizeof(T), count, f) != count) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr, "usage: %s DIR M K N GROUP ACT_SCALE BIAS [--path auto|decode|gemv|gemm] [--bits 4|8] "
                 "[--wrong-layout a|b|c|nibble]\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  W4A8Dims d;
  d.M = std::atoll(argv[2]);
  d.K = std::atoll(argv[3]);
  d.N = std::atoll(argv[4]);
  d.group = std::atoll(argv[5]);
  const float static_scale = static_cast<float>(std::atof(argv[6]));
  const bool has_bias = std::atoi(argv[7]) != 0;
  std::string path = "auto";
  for (int i = 8; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--path") path = argv[i + 1];
    else if (flag == "--bits") d.bits = std::atoi(argv[i + 1]);
    else if (flag == "--wrong-layout") g_wrong = argv[i + 1];
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (d.M < 1 || d.K < 1 || d.N < 1 || d.group < 32 || d.group % 32) {
    std::fprintf(stderr, "bad dims (the CUDA kernels need group_size %% 32 == 0)\n");
    return 2;
  }
  d.groups = (d.K + d.group - 1) / d.group;
  d.Kp = d.groups * d.group;
  if (d.bits != 4 && d.bits != 8) {
    std::fprintf(stderr, "--bits takes 4 or 8\n");
    return 2;
  }
  if (path == "auto") {
    path = CudaPathFor(nullptr, 90, d) == kPathDecode ? "decode" : use_gemv(d.M) ? "gemv" : "gemm";
  }
  if (path == "decode" && decode_rows(d.M, d.Kp) == 0) {
    std::fprintf(stderr, "the decode path takes at most %d rows\n", kDecodeMaxRows);
    return 2;
  }
  if (path == "gemv" && d.M > kGemvMaxRows) {
    std::fprintf(stderr, "the gemv takes at most %d rows\n", kGemvMaxRows);
    return 2;
  }

  DeviceBuffer<float> x(d.M * d.K), scales(d.N * d.groups), bias(has_bias ? d.N : 0), y(d.M * d.N);
  DeviceBuffer<uint8_t> weight(d.N * d.Kp * d.bits / 8);
  DeviceBuffer<char> workspace(workspace_bytes(d));
  read_file(dir + "/x.bin", x.data, x.count);
  read_file(dir + "/w.bin", weight.data, weight.count);
  read_file(dir + "/s.bin", scales.data, scales.count);
  if (has_bias) read_file(dir + "/b.bin", bias.data, bias.count);
  std::memset(y.data, 0xFF, y.count * sizeof(float));               // NaN where nothing is written
  std::memset(workspace.data, 0x5A, workspace.count);
  int8_t* xq = reinterpret_cast<int8_t*>(workspace.data);
  float* row_scale = reinterpret_cast<float*>(workspace.data + workspace_xq_bytes(d));

  const float* b = has_bias ? bias.data : nullptr;
  if (path == "decode") {
    const int rows = decode_rows(d.M, d.Kp);
    const bool fused = rows <= kDecodeFusedRows;
    if (!fused) run_quantize(x.data, d, static_scale, xq, row_scale);
    if (rows == 1) run_decode<1>(x.data, static_scale, xq, row_scale, weight.data, scales.data, b, y.data, d, fused);
    else if (rows == kDecodeFusedRows) run_decode<kDecodeFusedRows>(x.data, static_scale, xq, row_scale, weight.data, scales.data, b, y.data, d, fused);
    else run_decode<kDecodeMaxRows>(x.data, static_scale, xq, row_scale, weight.data, scales.data, b, y.data, d, fused);
    path += rows <= kDecodeFusedRows ? " (fused quantization)" : " (quantize_rows first)";
  } else {
    run_quantize(x.data, d, static_scale, xq, row_scale);
    if (path == "gemv") run_gemv(xq, row_scale, weight.data, scales.data, b, y.data, d);
    else run_gemm(xq, row_scale, weight.data, scales.data, b, y.data, d);
  }

  write_file(dir + "/y.bin", y.data, y.count);
  write_file(dir + "/xq.bin", xq, static_cast<size_t>(d.M * d.Kp));
  write_file(dir + "/rs.bin", row_scale, static_cast<size_t>(d.M));
  std::printf("%s bits=%d M=%lld K=%lld N=%lld group=%lld%s%s\n", path.c_str(), d.bits, static_cast<long long>(d.M),
              static_cast<long long>(d.K), static_cast<long long>(d.N), static_cast<long long>(d.group),
              static_scale > 0 ? " static" : " per-token", g_wrong.empty() ? "" : (" wrong-layout=" + g_wrong).c_str());
  return 0;
}
