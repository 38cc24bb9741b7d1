// The run-time choice between the two compiled copies of the CPU loops (cpu_common.h, run_isa).
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "xtk_cpu.h"

namespace xtk {
namespace cpu {
namespace {

Isa choose() {
  const char* env = std::getenv("XTK_CPU_ISA");
  if (env && std::strcmp(env, "baseline") == 0) return Isa::kBaseline;
  if (env && *env && std::strcmp(env, "auto") != 0)
    throw std::invalid_argument(std::string("XTK_CPU_ISA: expected auto or baseline, got '") + env + "'");
#if XTK_CPU_AVX2
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

}  // namespace

Isa isa() {
  static const Isa chosen = choose();  // once per process (a throw leaves it unset: the next call throws again)
  return chosen;
}

const char* isa_name(Isa i) { return i == Isa::kAvx2 ? "avx2+fma" : "baseline"; }

}  // namespace cpu
}  // namespace xtk
