// The AVX-VNNI kernel (vpdpbusd on ymm, VEX-encoded: Alder Lake and later, Zen 5): compiled with
// -mavx2 -mfma -mavxvnni. Low and high nibbles feed separate int32 accumulators, two independent
// dependency chains (w4a8_cpu_avx2_body.h has the loops).
#include "w4a8_cpu_avx2_body.h"

namespace fptq {
namespace {

struct VnniDot {
  static constexpr bool kFullByte = true;   // vpdpbusd sums u8 x s8 products in int32
  static constexpr bool kSplit = true;
  static constexpr int kRows = 3, kBlocks = 1;  // measured best on Zen 5 (3 rows x 1 block: 346 G MAC/s a core)
  static __m256i Step(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_avx_epi32(acc, w, x); }
  static __m256i Step2(__m256i acc, __m256i, __m256i, __m256i, __m256i) { return acc; }
};

const CpuKernels kKernels = {"avxvnni", kBlock, 2, QuantizeRowYmm, TileYmm<VnniDot, 4>, TileYmm<VnniDot, 8>};

}  // namespace

const CpuKernels& AvxVnniKernels() { return kKernels; }

}  // namespace fptq
