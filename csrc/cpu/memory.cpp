#include <cstdint>

#include "kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace eplib::cpu {

void advise_huge_pages(void* address, int64_t num_bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(address);
  // Only whole huge pages inside the range: madvise needs an aligned start, and the partial
  // pages at either end may belong to other allocations.
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(num_bytes)) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)address;
  (void)num_bytes;
#endif
}

}  // namespace eplib::cpu
