// The contract of fptq::W4A8MatMul and fptq::W8A8MatMul, shared by the CPU and CUDA kernels (no ONNX
// Runtime types here, so nvcc never sees ORT's headers). The two ops differ only in the weights' width.
//
//   Y[m, n] = a_m * sum_g ws[n, g] * sum_{k in group g} xq[m, k] * wq[n, k]   (+ bias[n])
//
// X [M, K] (float or float16) is quantized to int8 per tensor (a_m = act_scale, from calibration)
// or per token (a_m = max_k |X[m, k]| / 127, floored at kMinTokenScale), xq = clamp(rint(X / a_m),
// -128, 127) with rint rounding half to even: exactly what the qdq form's QuantizeLinear (or its
// Div/Round/Clip) computes.
//
// Weight layout: uint8 [N, Kp / 2], Kp = groups * group_size, groups = ceil(K / group_size).
// Row n holds wq[n, 0..Kp) as signed 4-bit two's complement, two a byte, element k in byte k / 2,
// the even k in the low nibble; k >= K is zero padding. One row per output channel keeps each
// group's values contiguous: the CPU kernel dots them with contiguous activations and the CUDA
// kernel loads them as the K-major B operand int8 tensor-core MMA expects.
// Scales: float32 [N, groups]. act_scale: float32 scalar (absent: per token). bias: float32 [N].
//
// W8A8MatMul (int8 weights: an LM head per output channel, the tied embedding table it shares):
// int8 [N, Kp], row n holding wq[n, 0..Kp) in [-128, 127], zero past K; any group_size >= 1
// (group_size = K is per output channel). Row n is also row n of an embedding table [N, Kp], so a tied
// lookup Gathers the very initializer the product reads. Group sums are exact in int32 for
// group_size <= kMaxInt8Group.
#pragma once

#include <cstdint>

namespace fptq {

constexpr float kMinTokenScale = 1e-12f;

// The largest group whose int8 x int8 sum always fits int32: 128 * 128 * group < 2^31.
constexpr int64_t kMaxInt8Group = 131071;

struct W4A8Dims {
  int64_t M = 0;       // rows of X (product of its leading dimensions)
  int64_t K = 0;
  int64_t N = 0;
  int64_t group = 0;
  int64_t groups = 0;  // ceil(K / group)
  int64_t Kp = 0;      // groups * group: the padded reduction length of the weights
  int bits = 4;        // weight width: 4 (W4A8MatMul) or 8 (W8A8MatMul)
};

// 4-bit two's complement nibble to int: 0..7 stay, 8..15 become -8..-1.
inline int8_t int4_value(uint8_t nibble) { return static_cast<int8_t>((nibble ^ 8) - 8); }

}  // namespace fptq
