// The CPU kernel's ONNX Runtime side: prepacking at creation, per-Run quantization and the split of
// the product into tasks. The arithmetic is in the per-ISA files (w4a8_cpu_kernels.h).
#include "w4a8_cpu.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fptq {
namespace {

// Task sizes are constants, never derived from the thread count: which task computes an output
// element then never changes, and each element's sum has one fixed order inside its task.
constexpr int64_t kTaskChannels = 64;   // a multiple of every kernel's block (16, 8)
constexpr int64_t kTaskRows = 64;       // rows a task takes against its channels (weights reused)
constexpr int64_t kQuantizeRows = 4;    // rows a quantization task takes

template <typename F>
void ParallelFor(const Ort::KernelContext& ctx, size_t total, F& body) {
  if (total == 1) return body(size_t{0});
  ctx.ParallelFor([](void* data, size_t i) { (*static_cast<F*>(data))(i); }, total, 0, &body);
}

// W and scales as constant initializers of the right type and shape, else false (then Run checks
// them and says what is wrong, or packs them per Run when they are graph inputs).
bool ConstantWeights(const OrtKernelInfo* info, const W4A8Dims& d, const void** weight, const float** scales) {
  Ort::ConstKernelInfo kernel_info(info);
  if (kernel_info.GetInputCount() < 3) return false;
  int w_const = 0, s_const = 0;
  Ort::ConstValue w = kernel_info.GetTensorConstantInput(1, &w_const);
  Ort::ConstValue s = kernel_info.GetTensorConstantInput(2, &s_const);
  if (!w_const || !s_const || !w || !s) return false;
  auto w_info = w.GetTensorTypeAndShapeInfo();
  auto s_info = s.GetTensorTypeAndShapeInfo();
  const bool int8 = d.bits == 8;
  if (w_info.GetElementType() != (int8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) ||
      w_info.GetShape() != std::vector<int64_t>{d.N, int8 ? d.Kp : d.Kp / 2} ||
      s_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
      s_info.GetShape() != std::vector<int64_t>{d.N, d.groups}) {
    return false;
  }
  *weight = w.GetTensorRawData();
  *scales = s.GetTensorData<float>();
  return true;
}

inline float ToFloat(float v) { return v; }
inline float ToFloat(Ort::Float16_t v) { return v.ToFloat(); }

template <typename T>
void Run(const Ort::KernelContext& ctx, const W4A8Run& run, const CpuKernels& kernels, const PackedWeights* packed) {
  const W4A8Dims& d = run.dims;
  PackedWeights per_run;
  if (!packed) {
    per_run = PackWeights(run.weight, run.scales, d, kernels.block, kernels.interleave);
    packed = &per_run;
  }

  // X to int8, rows in parallel.
  const int64_t stride = d.groups * packed->group_padded;
  AlignedBytes xq = AlignedBytes::Allocate(static_cast<size_t>(d.M * stride));
  std::vector<int32_t> corr(static_cast<size_t>(d.M * d.groups));
  std::vector<float> row_scale(static_cast<size_t>(d.M));
  int8_t* xq_data = reinterpret_cast<int8_t*>(xq.data.get());
  const T* x = static_cast<const T*>(run.x);
  auto quantize = [&](size_t task) {
    const int64_t m0 = static_cast<int64_t>(task) * kQuantizeRows;
    const int64_t m1 = std::min(d.M, m0 + kQuantizeRows);
    std::vector<float> row;  // float16 X is widened first (exact)
    for (int64_t m = m0; m < m1; ++m) {
      const float* xf;
      if constexpr (std::is_same_v<T, float>) {
        xf = x + m * d.K;
      } else {
        row.resize(static_cast<size_t>(d.K));
        for (int64_t k = 0; k < d.K; ++k) row[k] = ToFloat(x[m * d.K + k]);
        xf = row.data();
      }
      row_scale[m] = kernels.quantize_row(xf, d, run.static_scale, xq_data + m * stride, corr.data() + m * d.groups);
    }
  };
  ParallelFor(ctx, static_cast<size_t>((d.M + kQuantizeRows - 1) / kQuantizeRows), quantize);

  // The product, in tiles of up to kTaskRows rows x kTaskChannels output channels.
  std::vector<float> y_float;
  float* y;
  if constexpr (std::is_same_v<T, float>) {
    y = static_cast<float*>(run.y);
  } else {
    y_float.resize(static_cast<size_t>(d.M * d.N));
    y = y_float.data();
  }
  TileArgs args;
  args.w = packed;
  args.x = {xq_data, corr.data(), row_scale.data(), stride};
  args.bias = run.bias;
  args.y = y;
  args.ldy = d.N;
  const auto kernel_tile = d.bits == 8 ? kernels.tile8 : kernels.tile;
  const int64_t blocks_per_task = kTaskChannels / kernels.block;
  const int64_t blocks = (d.N + kernels.block - 1) / kernels.block;  // without the superblock padding
  const int64_t tasks_n = (blocks + blocks_per_task - 1) / blocks_per_task;
  const int64_t tasks_m = (d.M + kTaskRows - 1) / kTaskRows;
  auto tile = [&](size_t task) {
    TileArgs t = args;
    t.m0 = static_cast<int64_t>(task) / tasks_n * kTaskRows;
    t.rows = std::min(kTaskRows, d.M - t.m0);
    t.b0 = static_cast<int64_t>(task) % tasks_n * blocks_per_task;
    t.b1 = std::min(blocks, t.b0 + blocks_per_task);
    kernel_tile(t);
  };
  ParallelFor(ctx, static_cast<size_t>(tasks_m * tasks_n), tile);

  if constexpr (!std::is_same_v<T, float>) {
    T* out = static_cast<T*>(run.y);
    for (int64_t i = 0; i < d.M * d.N; ++i) out[i] = T(y_float[i]);
  }
}

}  // namespace

OrtStatusPtr W4A8CpuKernel::Init(const OrtKernelInfo* info) {
  std::string error;
  kernels_ = SelectCpuKernels(&error);
  if (!kernels_) return Error(attrs_, error);
  W4A8Dims d;
  d.K = attrs_.K;
  d.N = attrs_.N;
  d.group = attrs_.group;
  d.groups = (d.K + d.group - 1) / d.group;
  d.Kp = d.groups * d.group;
  d.bits = attrs_.bits;
  const void* weight = nullptr;
  const float* scales = nullptr;
  if (ConstantWeights(info, d, &weight, &scales)) {
    packed_ = std::make_unique<PackedWeights>(PackWeights(weight, scales, d, kernels_->block, kernels_->interleave));
  }
  return nullptr;
}

OrtStatusPtr W4A8CpuKernel::ComputeV2(OrtKernelContext* context) {
  return ComputeChecked(attrs_, context, [this](Ort::KernelContext& ctx, const W4A8Run& run) -> OrtStatusPtr {
    if (run.x_half) {
      Run<Ort::Float16_t>(ctx, run, *kernels_, packed_.get());
    } else {
      Run<float>(ctx, run, *kernels_, packed_.get());
    }
    return nullptr;
  });
}

}  // namespace fptq
