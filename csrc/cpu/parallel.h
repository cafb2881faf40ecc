// A minimal parallel-for over an index range, on std::thread. The thread count follows
// torch.get_num_threads() (set from Python), so eplib does not oversubscribe cores that torch and
// the other ranks on the machine already use.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <functional>
#include <system_error>
#include <thread>
#include <vector>

namespace eplib::cpu {

void set_num_threads(int num_threads);
int get_num_threads();

// How many chunks to cut [0, n) into: one per thread, but none smaller than `grain` items, so
// small calls run inline without paying for thread start-up.
inline int64_t num_chunks_for(int64_t n, int64_t grain) {
  const int64_t max_chunks = std::max<int64_t>(1, n / std::max<int64_t>(grain, 1));
  return std::max<int64_t>(1, std::min<int64_t>(get_num_threads(), max_chunks));
}

// Calls body(chunk_index, begin, end) for `num_chunks` contiguous chunks of [0, n), in parallel.
// Chunk k always covers the same range for a given (n, num_chunks), so kernels that keep one
// partial result per chunk combine them in a fixed order and stay deterministic.
template <typename Body>
void parallel_chunks(int64_t n, int64_t num_chunks, const Body& body) {
  if (n <= 0) return;
  const int64_t chunk = (n + num_chunks - 1) / num_chunks;
  auto run_chunk = [&](int64_t k, std::exception_ptr& error) {
    try {
      body(k, std::min(n, k * chunk), std::min(n, (k + 1) * chunk));
    } catch (...) {
      error = std::current_exception();
    }
  };
  std::vector<std::exception_ptr> errors(num_chunks);
  std::vector<std::thread> workers;
  workers.reserve(num_chunks - 1);
  int64_t next_chunk = 1;
  try {
    for (; next_chunk < num_chunks; ++next_chunk) workers.emplace_back(run_chunk, next_chunk, std::ref(errors[next_chunk]));
  } catch (const std::system_error&) {
    // No more threads to be had: the chunks not handed out run here instead.
  }
  for (int64_t k = next_chunk; k < num_chunks; ++k) run_chunk(k, errors[k]);
  run_chunk(0, errors[0]);
  for (auto& worker : workers) worker.join();
  for (auto& error : errors)
    if (error) std::rethrow_exception(error);
}

template <typename Body>
void parallel_for(int64_t n, int64_t grain, const Body& body) {
  parallel_chunks(n, num_chunks_for(n, grain), [&](int64_t, int64_t begin, int64_t end) { body(begin, end); });
}

}  // namespace eplib::cpu
