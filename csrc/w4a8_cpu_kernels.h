// The interface between the CPU kernel's driver (w4a8_cpu.cc: ONNX Runtime side, threads) and its
// per-instruction-set kernels (w4a8_cpu_<isa>.cc, each compiled with its own target flags). Plain
// C++ and no ONNX Runtime types, so an ISA file holds nothing but its own arithmetic.
//
// Numerics, the same in every kernel so that all of them give bitwise the same Y (int4 and int8 weights):
//   isum[m, n, g] = sum_{k in group g} xq[m, k] * wq[n, k]                 exact int32
//   acc[m, n]     = fma(scale[n, g], float(isum), acc)   for g = 0, 1, ...   from acc = +0.f
//   Y[m, n]       = acc * a_m, then + bias[n]                               two roundings, no fma
// The kernel files are compiled with -ffp-contract=off so that the compiler fuses nothing else.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "w4a8_layout.h"

namespace fptq {

// 64-byte aligned bytes (a cache line, and a zmm load that never splits one).
struct AlignedBytes {
  struct Free { void operator()(void* p) const; };
  std::unique_ptr<uint8_t, Free> data;
  size_t size = 0;
  static AlignedBytes Allocate(size_t bytes);  // zero-filled
};

// The weights in the kernels' layout, built from the contract's [N, Kp/2] layout once, when ONNX
// Runtime creates the kernel (or per Run when W is not a constant).
//
// Output channels are taken `block` at a time (16: one zmm of int32 lanes; 8: one ymm), and blocks
// `interleave` at a time (a superblock); N is padded to whole superblocks (padding channels have
// zero weights and scales and are never stored). Each group's length is padded to `group_padded` =
// group rounded up to 8 (activations there are zero).
// A block holds, for each group, for each run of 8 k (a "run"): `block` * 4 bytes, byte 4c + j being
//   low nibble:  wq[n0 + c, k0 + j] + 8        high nibble: wq[n0 + c, k0 + 4 + j] + 8     (j < 4)
// so one 32-bit broadcast of activations k0..k0+3 meets 4 k of every channel (vpdpbusd's layout)
// and the same load's high nibbles meet k0+4..k0+7. The blocks of a superblock take turns run by run
// (run 0 of each block, then run 1 of each, ...): a kernel that computes a superblock's channels
// together reads one sequential stream, which the hardware prefetcher follows best.
// Weights are stored unsigned (+8, 0..15): they are vpdpbusd's / vpmaddubsw's unsigned operand and
// the int8 activations the signed one, which the activations' per-group correction -8 * sum(xq)
// undoes (QuantizedRows::corr).
// int8 weights (bits 8, W8A8MatMul) keep the same blocks, groups and runs of 8 k, and a run takes twice
// the bytes: `block` * 4 bytes of k0..k0+3, byte 4c + j = wq[n0 + c, k0 + j] + 128, then `block` * 4
// bytes of k0+4..k0+7 likewise. The same 32-bit broadcasts of activations meet them (the first half
// where int4's low nibbles were, the second where the high ones were); the correction is
// -128 * sum(xq). vpdpbusd takes a full unsigned byte exactly; vpmaddubsw does not (two products of
// 255 x -128 overflow its int16 pair sum), so the AVX2 kernel splits each byte into its two nibbles
// and adds 16 x the high nibbles' sum in int32.
// Scales: per superblock, per group, per block `block` floats (one vector load per group).
struct PackedWeights {
  int64_t N = 0, groups = 0, group_padded = 0;
  int bits = 4;
  int block = 0, interleave = 1;
  int64_t blocks = 0;    // a multiple of interleave
  AlignedBytes nibbles;  // blocks * groups * group_padded * bits / 8 * block bytes
  AlignedBytes scales;   // blocks * groups * block floats
  int64_t Runs() const { return groups * group_padded / 8; }  // runs of 8 k along all of K
  // Bytes of one block's run: 8 k of `block` channels.
  int64_t RunBytes() const { return int64_t{block} * bits; }
  // Bytes from one run of a block to its next run.
  int64_t RunStride() const { return int64_t{interleave} * RunBytes(); }
  // Block b's run 0; run r is at + r * RunStride().
  const uint8_t* Block(int64_t b) const {
    return nibbles.data.get() + (b / interleave) * Runs() * RunStride() + (b % interleave) * RunBytes();
  }
  // Block b's scales of group 0; group g's are at + g * ScaleStride().
  int64_t ScaleStride() const { return int64_t{interleave} * block; }
  const float* BlockScales(int64_t b) const {
    return reinterpret_cast<const float*>(scales.data.get()) + (b / interleave) * groups * ScaleStride() +
           (b % interleave) * block;
  }
};

// Repacks the contract's weight (dims.bits wide) and scales (w4a8_cpu_pack.cc).
PackedWeights PackWeights(const void* weight, const float* scales, const W4A8Dims& dims, int block,
                          int interleave);

// What a weight code is stored as in the kernels' layout: code + WeightOffset(bits), unsigned.
constexpr int32_t WeightOffset(int bits) { return bits == 8 ? 128 : 8; }

// Group length in the kernels' layouts.
inline int64_t PaddedGroup(int64_t group) { return (group + 7) / 8 * 8; }

// Quantized activations: row m at xq + m * stride (stride = groups * group_padded), group g at
// g * group_padded, zero padded; corr[m * groups + g] = -WeightOffset(bits) * sum of row m's xq over
// group g.
struct QuantizedRows {
  const int8_t* xq = nullptr;
  const int32_t* corr = nullptr;
  const float* scale = nullptr;  // a_m
  int64_t stride = 0;
};

// One task's share of Y: rows [m0, m0 + rows) x output-channel blocks [b0, b1), written as float
// to y (row stride ldy, column 0 = channel 0), bias (may be null) added. Channels >= N are skipped.
struct TileArgs {
  const PackedWeights* w = nullptr;
  QuantizedRows x;
  const float* bias = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  int64_t m0 = 0, rows = 0, b0 = 0, b1 = 0;
};

// What one instruction set provides.
struct CpuKernels {
  const char* name;  // FPTQ_CPU_ISA's value for it
  int block;         // output channels per PackedWeights block
  int interleave;    // blocks per superblock
  // Quantizes one row (K floats) into the layout above (xq: stride bytes, corr: groups values, for
  // weights dims.bits wide). static_scale > 0: that scale; else per token. Returns a_m.
  float (*quantize_row)(const float* x, const W4A8Dims& dims, float static_scale, int8_t* xq, int32_t* corr);
  void (*tile)(const TileArgs& args);   // int4 weights
  void (*tile8)(const TileArgs& args);  // int8 weights
};

// Each ISA file defines one of these; only those the build compiled exist (FPTQ_HAVE_X86_KERNELS).
const CpuKernels& GenericKernels();
#ifdef FPTQ_HAVE_X86_KERNELS
const CpuKernels& Avx2Kernels();
const CpuKernels& AvxVnniKernels();
const CpuKernels& Avx512VnniKernels();
#endif

// Scalar quantization shared by every kernel for the rare groups that are not a multiple of 8 (and
// by the generic kernel always): division, rint, clamp, exactly as the vector loops do it.
float QuantizeRowScalar(const float* x, const W4A8Dims& dims, float static_scale, int8_t* xq, int32_t* corr);

// The kernels to run (w4a8_cpu_dispatch.cc): FPTQ_CPU_ISA if set, else the best this CPU runs.
// Returns null and sets *error when FPTQ_CPU_ISA is unknown or names a path this CPU cannot run.
const CpuKernels* SelectCpuKernels(std::string* error);

}  // namespace fptq
