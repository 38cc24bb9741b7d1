// The run-time choice between the two compiled copies of the CPU loops (cpu_common.h, run_isa).
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "xtk_cpu.h"

namespace xtk {
namespace cpu {
namespace {

// The best copy this CPU can run.
Isa best() {
#if XTK_CPU_AVX2
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (avx2 && avx512) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

Isa choose() {
  const char* env = std::getenv("XTK_CPU_ISA");
  const Isa found = best();
  if (!env || !*env || std::strcmp(env, "auto") == 0) return found;
  if (std::strcmp(env, "baseline") == 0) return Isa::kBaseline;
  if (std::strcmp(env, "avx2") == 0) {
    if (found == Isa::kBaseline)
      throw std::invalid_argument("XTK_CPU_ISA=avx2: this CPU (or this build) has no AVX2 + FMA copy; use auto or baseline");
    return Isa::kAvx2;
  }
  throw std::invalid_argument(std::string("XTK_CPU_ISA: expected auto, avx2 or baseline, got '") + env + "'");
}

}  // namespace

Isa isa() {
  static const Isa chosen = choose();  // once per process (a throw leaves it unset: the next call throws again)
  return chosen;
}

const char* isa_name(Isa i) {
  if (i == Isa::kAvx512) return "avx512";
  return i == Isa::kAvx2 ? "avx2+fma" : "baseline";
}

}  // namespace cpu
}  // namespace xtk
