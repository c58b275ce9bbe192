#include "w4a8_cuda.h"

#include <cstdlib>
#include <memory>
#include <string>

#include "w4a8_cuda_launch.h"

namespace fptq {

namespace {

// A buffer from an OrtAllocator, given back when it goes out of scope.
struct AllocatorBuffer {
  OrtAllocator* allocator = nullptr;
  void* data = nullptr;
  ~AllocatorBuffer() {
    if (data) allocator->Free(allocator, data);
    if (allocator) Ort::GetApi().ReleaseAllocator(allocator);
  }
};

}  // namespace

OrtStatusPtr W4A8CudaKernel::Init(const OrtKernelInfo* /*info*/) {
  if (const char* error = CudaDeviceSm(&sm_)) return Error(attrs_, std::string("CUDA error: ") + error);
  const char* forced = std::getenv("FPTQ_CUDA_KERNEL");
  if (!forced || !*forced) return nullptr;
  std::string names;
  for (const CudaPath& p : kCudaPaths) {
    names += (names.empty() ? "" : ", ") + std::string(p.name);
    if (std::string(forced) != p.name) continue;
    if (sm_ < p.min_sm) {
      return Error(attrs_, std::string("FPTQ_CUDA_KERNEL=") + forced + " needs compute capability " +
                               std::to_string(p.min_sm / 10) + "." + std::to_string(p.min_sm % 10) + ", this GPU has " +
                               std::to_string(sm_ / 10) + "." + std::to_string(sm_ % 10));
    }
    forced_ = &p;
    return nullptr;
  }
  return Error(attrs_, std::string("FPTQ_CUDA_KERNEL=") + forced + " is not a CUDA kernel of this library; it has: " + names);
}

OrtStatusPtr W4A8CudaKernel::ComputeV2(OrtKernelContext* context) {
  return ComputeChecked(attrs_, context, [this](Ort::KernelContext& ctx, const W4A8Run& run) -> OrtStatusPtr {
    // The workspace (int8 X, row scales) comes from ONNX Runtime's allocator for X's device: the CUDA
    // provider's arena, so a Run allocates no device memory once the arena has grown. It is freed
    // when this returns, with the kernels still queued: like ORT's own CUDA kernels' scratch buffers,
    // a later allocation that reuses it is used by work queued after ours on the same compute stream.
    AllocatorBuffer workspace;
    const Ort::ConstMemoryInfo x_memory = ctx.GetInput(0).GetTensorMemoryInfo();
    workspace.allocator = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(x_memory));
    if (!workspace.allocator) return Error(attrs_, "ONNX Runtime gave no allocator for the CUDA workspace");
    workspace.data = workspace.allocator->Alloc(workspace.allocator, W4A8WorkspaceBytes(run.dims));
    if (!workspace.data) return Error(attrs_, "could not allocate the CUDA workspace");
    const int path = CudaPathFor(forced_, sm_, run.dims);
    const char* error = LaunchW4A8(run.dims, run.x, run.x_half, static_cast<const uint8_t*>(run.weight), run.scales,
                                   run.static_scale, run.bias, run.y, workspace.data, ctx.GetGPUComputeStream(), path);
    return error ? Error(attrs_, std::string("CUDA error: ") + error) : nullptr;
  });
}

}  // namespace fptq
