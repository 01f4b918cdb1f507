// condkernels.cpu_vector_isa(): which instruction set the hand-written CPU kernels run with here.
#include <torch/library.h>

#include <string>

#include "cpu/cpu_features.h"

namespace condkernels::cpu {

std::string vector_isa_name() {
  switch (vector_isa()) {
    case VectorIsa::kAvx512: return "avx512";
    case VectorIsa::kAvx2: return "avx2";
    default: return "none";
  }
}

}  // namespace condkernels::cpu

TORCH_LIBRARY_FRAGMENT(condkernels, m) {
  m.def("_cpu_vector_isa() -> str", &condkernels::cpu::vector_isa_name);
}
