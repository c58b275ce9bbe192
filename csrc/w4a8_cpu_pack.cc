// The contract's weight layout ([N, Kp/2] int4 or [N, Kp] int8, a row per output channel) to the CPU
// kernels' blocked layout (PackedWeights in w4a8_cpu_kernels.h). Runs once per kernel, or per Run for weights that
// are not constants; plain loops, no ISA flags.
#include <cstdlib>
#include <cstring>
#include <new>

#include "w4a8_cpu_kernels.h"

namespace fptq {

void AlignedBytes::Free::operator()(void* p) const { std::free(p); }

AlignedBytes AlignedBytes::Allocate(size_t bytes) {
  AlignedBytes out;
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded ? rounded : 64);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, rounded);
  out.data.reset(static_cast<uint8_t*>(p));
  out.size = bytes;
  return out;
}

namespace {

// int8 weights: run r of group g of channel n is wq[n, k0 .. k0 + 8) + 128 (128: a zero weight, in the
// padding), its first 4 bytes in the run's first half, the last 4 in its second half.
void PackInt8(const int8_t* weight, const W4A8Dims& d, PackedWeights& w) {
  const int64_t runs_per_group = w.group_padded / 8;
  const int block = w.block;
  for (int64_t b = 0; b < w.blocks; ++b) {
    uint8_t* out = const_cast<uint8_t*>(w.Block(b));
    for (int64_t g = 0; g < w.groups; ++g) {
      for (int64_t r = 0; r < runs_per_group; ++r, out += w.RunStride()) {
        for (int c = 0; c < block; ++c) {
          const int64_t n = b * block + c;
          for (int i = 0; i < 8; ++i) {
            const int64_t at = r * 8 + i;   // position in the group
            const int32_t code = n < d.N && at < d.group ? weight[n * d.Kp + g * d.group + at] : 0;
            out[(i / 4) * block * 4 + c * 4 + i % 4] = static_cast<uint8_t>(code + 128);
          }
        }
      }
    }
  }
}

}  // namespace

PackedWeights PackWeights(const void* weight_data, const float* scales, const W4A8Dims& d, int block,
                          int interleave) {
  PackedWeights w;
  w.N = d.N;
  w.groups = d.groups;
  w.group_padded = PaddedGroup(d.group);
  w.bits = d.bits;
  w.block = block;
  w.interleave = interleave;
  const int64_t super = int64_t{block} * interleave;
  w.blocks = (d.N + super - 1) / super * interleave;
  w.nibbles = AlignedBytes::Allocate(static_cast<size_t>(w.blocks * w.Runs() * w.RunBytes()));
  w.scales = AlignedBytes::Allocate(static_cast<size_t>(w.blocks * w.groups * block) * sizeof(float));
  for (int64_t b = 0; b < w.blocks; ++b) {
    float* out_scales = const_cast<float*>(w.BlockScales(b));
    for (int64_t g = 0; g < w.groups; ++g) {
      for (int c = 0; c < block; ++c) {
        const int64_t n = b * block + c;
        out_scales[g * w.ScaleStride() + c] = n < d.N ? scales[n * d.groups + g] : 0.f;
      }
    }
  }
  if (d.bits == 8) {
    PackInt8(static_cast<const int8_t*>(weight_data), d, w);
    return w;
  }
  const uint8_t* weight = static_cast<const uint8_t*>(weight_data);
  const int64_t row_bytes = d.Kp / 2;
  const int64_t runs_per_group = w.group_padded / 8;
  // Unsigned weight (+8) at position i of group g of row n; 8 (a zero weight) in the padding.
  auto value = [&](int64_t n, int64_t g, int64_t i) -> uint8_t {
    if (n >= d.N || i >= d.group) return 8;
    const int64_t k = g * d.group + i;
    const uint8_t byte = weight[n * row_bytes + k / 2];
    return static_cast<uint8_t>(int4_value(k % 2 ? byte >> 4 : byte & 0xF) + 8);
  };
  for (int64_t b = 0; b < w.blocks; ++b) {
    uint8_t* out = const_cast<uint8_t*>(w.Block(b));
    for (int64_t g = 0; g < w.groups; ++g) {
      for (int64_t r = 0; r < runs_per_group; ++r) {
        for (int c = 0; c < block; ++c) {
          const int64_t n = b * block + c;
          if (n < d.N && d.group % 8 == 0) {
            // Fast path: the run's 8 values are 4 whole source bytes; +8 on a 4-bit two's complement
            // value is flipping its top bit.
            const uint8_t* src = weight + n * row_bytes + (g * d.group + r * 8) / 2;
            const uint8_t nib[8] = {uint8_t(src[0] & 0xF), uint8_t(src[0] >> 4), uint8_t(src[1] & 0xF), uint8_t(src[1] >> 4),
                                    uint8_t(src[2] & 0xF), uint8_t(src[2] >> 4), uint8_t(src[3] & 0xF), uint8_t(src[3] >> 4)};
            for (int j = 0; j < 4; ++j) out[c * 4 + j] = static_cast<uint8_t>((nib[j] ^ 8) | (nib[4 + j] ^ 8) << 4);
            continue;
          }
          for (int j = 0; j < 4; ++j) {
            out[c * 4 + j] = static_cast<uint8_t>(value(n, g, r * 8 + j) | value(n, g, r * 8 + 4 + j) << 4);
          }
        }
        out += w.RunStride();
      }
    }
  }
  return w;
}

}  // namespace fptq
