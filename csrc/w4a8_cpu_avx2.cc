// The AVX2 kernel (no VNNI): compiled with -mavx2 -mfma. Each 4-byte dot product is vpmaddubsw
// (unsigned weight nibble x signed activation, pairs summed to int16) then vpmaddwd by ones (int16
// pairs to int32). The low- and high-nibble products are added in int16 first: each is at most
// 2 * 15 * 128 = 3840 in magnitude, their sum 7680, far from int16's limit, so nothing saturates and
// the int32 group sums stay exact. int8 weights go through the same step a nibble at a time
// (w4a8_cpu_avx2_body.h).
#include "w4a8_cpu_avx2_body.h"

namespace fptq {
namespace {

struct MaddubsDot {
  static constexpr bool kFullByte = false;  // 255 x -128 twice overflows the int16 pair sum
  static constexpr bool kSplit = false;
  static constexpr int kRows = 4, kBlocks = 1;  // measured best on Zen 5 (4 rows x 1 block: 282 G MAC/s a core)
  static __m256i Step(__m256i acc, __m256i, __m256i) { return acc; }
  static __m256i Step2(__m256i acc, __m256i wl, __m256i xl, __m256i wh, __m256i xh) {
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(wl, xl), _mm256_maddubs_epi16(wh, xh));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

const CpuKernels kKernels = {"avx2", kBlock, 2, QuantizeRowYmm, TileYmm<MaddubsDot, 4>, TileYmm<MaddubsDot, 8>};

}  // namespace

const CpuKernels& Avx2Kernels() { return kKernels; }

}  // namespace fptq
