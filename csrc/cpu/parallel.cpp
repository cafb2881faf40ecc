#include "parallel.h"

#include <atomic>

namespace eplib::cpu {

namespace {
std::atomic<int> g_num_threads{1};
}

void set_num_threads(int num_threads) { g_num_threads.store(std::max(1, num_threads)); }

int get_num_threads() { return g_num_threads.load(); }

}  // namespace eplib::cpu
