// Picks the CPU kernel once per ONNX Runtime kernel (at session creation): FPTQ_CPU_ISA if set,
// else the best instruction set this CPU and OS run. The CPU check is GCC/clang's
// __builtin_cpu_supports, which reads CPUID once per process and also checks (xgetbv) that the OS
// saves the ymm / zmm registers. fptq_graph.runtime.library_info() asks this check (FptqCpuKernels,
// below) rather than re-deriving it, so Python and the kernels never disagree on what this CPU runs.
#include <cstdlib>
#include <string>

#include "w4a8_cpu_kernels.h"

namespace fptq {
namespace {

struct Path {
  const char* name;
  const CpuKernels& (*kernels)();
  bool (*supported)();
  const char* needs;  // for the error message
};

#ifdef FPTQ_HAVE_X86_KERNELS
bool HasAvx512Vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("fma");
}
bool HasAvx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool HasAvxVnni() {
  __builtin_cpu_init();
  return HasAvx2() && __builtin_cpu_supports("avxvnni");
}
#endif
bool Always() { return true; }

// Best first.
const Path kPaths[] = {
#ifdef FPTQ_HAVE_X86_KERNELS
    {"avx512vnni", Avx512VnniKernels, HasAvx512Vnni, "AVX-512 F/BW/VL and AVX-512 VNNI"},
    {"avxvnni", AvxVnniKernels, HasAvxVnni, "AVX2, FMA and AVX-VNNI"},
    {"avx2", Avx2Kernels, HasAvx2, "AVX2 and FMA"},
#endif
    {"generic", GenericKernels, Always, "nothing"},
};

std::string Names() {
  std::string out;
  for (const Path& p : kPaths) out += (out.empty() ? "" : ", ") + std::string(p.name);
  return out;
}

}  // namespace

const CpuKernels* SelectCpuKernels(std::string* error) {
  const char* forced = std::getenv("FPTQ_CPU_ISA");
  if (!forced || !*forced) {
    for (const Path& p : kPaths) {
      if (p.supported()) return &p.kernels();
    }
    return &GenericKernels();
  }
  std::string supported;
  for (const Path& p : kPaths) {
    if (p.supported()) supported += (supported.empty() ? "" : ", ") + std::string(p.name);
  }
  for (const Path& p : kPaths) {
    if (std::string(forced) != p.name) continue;
    if (p.supported()) return &p.kernels();
    *error = std::string("FPTQ_CPU_ISA=") + forced + " asks for a CPU kernel this CPU cannot run (it needs " +
             p.needs + "); this CPU runs: " + supported;
    return nullptr;
  }
  *error = std::string("FPTQ_CPU_ISA=") + forced + " is not a CPU kernel of this library; it has: " + Names() +
           " (this CPU runs: " + supported + ")";
  return nullptr;
}

}  // namespace fptq

// The CPU kernels this library has that this CPU runs, best first, comma-separated ("avx512vnni,avx2,
// generic"): what SelectCpuKernels picks from. Exported (exports.map) for fptq_graph.runtime.library_info,
// which loads the library with ctypes; no ONNX Runtime call is made.
extern "C" __attribute__((visibility("default"))) const char* FptqCpuKernels() {
  static const std::string runs = [] {
    std::string out;
    for (const fptq::Path& p : fptq::kPaths) {
      if (p.supported()) out += (out.empty() ? "" : ",") + std::string(p.name);
    }
    return out;
  }();
  return runs.c_str();
}
