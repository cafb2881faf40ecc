// Running kernels on the host: every CUDA thread a fiber (ucontext), the fibers of a block on one
// host thread, blocks spread over a few host threads.
//
// Scheduling. A block's fibers run one at a time, each until it reaches a synchronisation point
// (__syncthreads, a warp intrinsic), yields (spin loops read the timer, which yields) or exits.
// Between such points the fibers of a block run in a freshly shuffled order, so code that reads
// what another thread writes without a barrier in between sees the old value in some schedules.
// A barrier completes once every thread that has not exited has reached it (exited threads do not
// count, as on sm_70+); a warp intrinsic completes once every lane named in its mask has reached
// the same intrinsic with the same mask. A block in which no fiber can run any more (a barrier that
// some threads never reach, lanes of a warp at different intrinsics) is a device fault, as are a
// warp intrinsic naming an exited lane and other undefined behaviour the executor can see.
// Blocks of a kernel start in a shuffled order, on block_workers() host threads at once.
#include "executor.h"

#include <sched.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

namespace eplib_cuda_cpu {

thread_local const BuiltinIds* current_ids = nullptr;

namespace {

constexpr int kWarpSize = 32;
#if defined(__SANITIZE_THREAD__)
constexpr size_t kStackBytes = 512 * 1024;  // instrumented frames are larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

enum class FiberState { kRunnable, kAtBlockBarrier, kAtWarpOp, kExited };

struct Fiber {
  ucontext_t context{};
  void* stack = nullptr;  // kStackBytes, with a guard page below
  BuiltinIds ids{};
  FiberState state = FiberState::kExited;
  bool yielded = false;
  // The warp intrinsic this fiber waits in, and its answer.
  int warp_kind = 0;
  unsigned warp_mask = 0;
  uint64_t warp_value = 0;
  int warp_argument = 0;
  uint64_t warp_result = 0;
#if defined(__SANITIZE_THREAD__)
  void* tsan_fiber = nullptr;
#endif
};

// A value a lane reads from a lane that did not take part (undefined on a GPU).
constexpr uint64_t kUndefinedLaneValue = 0xA5A5A5A5A5A5A5A5ull;

uint64_t initial_seed() {
  if (const char* text = std::getenv("EPLIB_CUDA_CPU_SEED")) return std::strtoull(text, nullptr, 0);
  return std::random_device{}() ^ (static_cast<uint64_t>(getpid()) << 32);
}

// Runs blocks on the host thread that owns it (one per thread, created on first use).
class BlockRunner {
 public:
  BlockRunner() : random_(schedule_seed() ^ std::hash<std::thread::id>{}(std::this_thread::get_id())) {
#if defined(__SANITIZE_THREAD__)
    scheduler_tsan_fiber_ = __tsan_get_current_fiber();
#endif
  }

  ~BlockRunner() {
    for (Fiber& fiber : fibers_) {
      if (fiber.stack != nullptr) munmap(static_cast<char*>(fiber.stack) - page_bytes(), kStackBytes + page_bytes());
#if defined(__SANITIZE_THREAD__)
      if (fiber.tsan_fiber != nullptr) __tsan_destroy_fiber(fiber.tsan_fiber);
#endif
    }
  }

  BlockRunner(const BlockRunner&) = delete;
  BlockRunner& operator=(const BlockRunner&) = delete;

  void run(const KernelLaunch& launch, unsigned linear_block);

  // The fiber side.
  void block_barrier();
  uint64_t warp_op(int kind, unsigned mask, uint64_t value, int argument);
  void yield();
  void* dynamic_shared() { return shared_memory_.data(); }
  const KernelLaunch* launch() const { return launch_; }

 private:
  static size_t page_bytes() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  static void fiber_entry();
  void prepare(Fiber& fiber);
  void resume(Fiber& fiber);
  void suspend();  // from the running fiber back to the scheduler
  bool complete_block_barrier(int num_threads, int live);
  bool complete_warp_ops(int num_threads);
  void fault_here(cudaError_t code, const std::string& what);
  void pause_host(int idle_passes);

  std::vector<Fiber> fibers_;
  ucontext_t scheduler_{};
  Fiber* running_ = nullptr;
  const KernelLaunch* launch_ = nullptr;
  unsigned linear_block_ = 0;
  bool abandoned_ = false;  // the block faulted: its fibers are left where they are
  std::vector<unsigned char> shared_memory_ = std::vector<unsigned char>(kMaxDynamicSharedBytes + 16);
  std::mt19937_64 random_;
#if defined(__SANITIZE_THREAD__)
  void* scheduler_tsan_fiber_ = nullptr;
#endif
};

struct Stall {
  double seconds;
  double probability;
  unsigned first_block;
  unsigned end_block;
};
std::mutex stalls_mutex;
std::map<std::string, Stall> stalls;  // by kernel name

// Sleeps when a stall is set for this kernel and block, and this synchronisation point draws it.
void maybe_stall(const std::string& name, unsigned block, std::mt19937_64& random) {
  double seconds = 0.0;
  {
    std::lock_guard<std::mutex> lock(stalls_mutex);
    const auto found = stalls.find(name);
    if (found == stalls.end() || block < found->second.first_block || block >= found->second.end_block) return;
    if (std::uniform_real_distribution<double>(0.0, 1.0)(random) < found->second.probability)
      seconds = found->second.seconds;
  }
  if (seconds > 0) std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
}

thread_local BlockRunner* this_runner = nullptr;

BlockRunner& runner() {
  // Never freed: a thread's fibers may still be referenced by its last (abandoned) block.
  if (this_runner == nullptr) this_runner = new BlockRunner();
  return *this_runner;
}

void BlockRunner::prepare(Fiber& fiber) {
  if (fiber.stack == nullptr) {
    void* mapping = mmap(nullptr, kStackBytes + page_bytes(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                         -1, 0);
    if (mapping == MAP_FAILED) throw std::runtime_error("eplib CPU execution: cannot map a fiber stack");
    mprotect(mapping, page_bytes(), PROT_NONE);  // overflow faults instead of corrupting the next stack
    fiber.stack = static_cast<char*>(mapping) + page_bytes();
#if defined(__SANITIZE_THREAD__)
    fiber.tsan_fiber = __tsan_create_fiber(0);
#endif
  }
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = fiber.stack;
  fiber.context.uc_stack.ss_size = kStackBytes;
  fiber.context.uc_link = nullptr;
  makecontext(&fiber.context, &BlockRunner::fiber_entry, 0);
  fiber.state = FiberState::kRunnable;
  fiber.yielded = false;
}

void BlockRunner::fiber_entry() {
  BlockRunner& self = runner();
  self.launch_->body->run();
  self.running_->state = FiberState::kExited;
  self.suspend();  // never resumed
}

void BlockRunner::resume(Fiber& fiber) {
  running_ = &fiber;
  current_ids = &fiber.ids;
  fiber.yielded = false;
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(fiber.tsan_fiber, 0);
#endif
  swapcontext(&scheduler_, &fiber.context);
  running_ = nullptr;
  current_ids = nullptr;
}

void BlockRunner::suspend() {
  Fiber& fiber = *running_;
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(scheduler_tsan_fiber_, 0);
#endif
  swapcontext(&fiber.context, &scheduler_);
}

void BlockRunner::block_barrier() {
  running_->state = FiberState::kAtBlockBarrier;
  suspend();
}

uint64_t BlockRunner::warp_op(int kind, unsigned mask, uint64_t value, int argument) {
  Fiber& fiber = *running_;
  fiber.state = FiberState::kAtWarpOp;
  fiber.warp_kind = kind;
  fiber.warp_mask = mask;
  fiber.warp_value = value;
  fiber.warp_argument = argument;
  suspend();
  return fiber.warp_result;
}

void BlockRunner::yield() {
  running_->yielded = true;
  suspend();
}

void BlockRunner::fault_here(cudaError_t code, const std::string& what) {
  const dim3 grid = launch_->grid;
  record_fault(code, "eplib CPU execution: " + what + " in kernel " + launch_->name + " (block " +
                         std::to_string(linear_block_) + " of " + std::to_string(grid.x * grid.y * grid.z) +
                         "; EPLIB_CUDA_CPU_SEED=" + std::to_string(schedule_seed()) + " replays the schedule)");
}

bool BlockRunner::complete_block_barrier(int num_threads, int live) {
  const int waiting = static_cast<int>(std::count_if(fibers_.begin(), fibers_.begin() + num_threads, [](const Fiber& f) {
    return f.state == FiberState::kAtBlockBarrier;
  }));
  if (waiting == 0 || waiting != live) return false;
  for (int t = 0; t < num_threads; ++t)
    if (fibers_[t].state == FiberState::kAtBlockBarrier) fibers_[t].state = FiberState::kRunnable;
  return true;
}

bool BlockRunner::complete_warp_ops(int num_threads) {
  bool completed = false;
  for (int warp_start = 0; warp_start < num_threads; warp_start += kWarpSize) {
    const int lanes = std::min(kWarpSize, num_threads - warp_start);
    Fiber* warp = &fibers_[warp_start];
    for (int lane = 0; lane < lanes; ++lane) {
      const Fiber& first = warp[lane];
      if (first.state != FiberState::kAtWarpOp) continue;
      if ((first.warp_mask >> lane & 1u) == 0) {
        fault_here(cudaErrorIllegalInstruction, "a warp intrinsic whose mask leaves out the calling lane");
        return false;
      }
      // Lanes past the end of a partial warp do not exist: they are not waited for.
      const unsigned existing = lanes == kWarpSize ? 0xFFFFFFFFu : ((1u << lanes) - 1u);
      const unsigned group = first.warp_mask & existing;
      bool ready = true;
      for (int other = 0; other < lanes && ready; ++other) {
        if ((group >> other & 1u) == 0) continue;
        const Fiber& member = warp[other];
        if (member.state == FiberState::kExited) {
          fault_here(cudaErrorIllegalInstruction, "a warp intrinsic whose mask names an exited lane");
          return false;
        }
        if (member.state != FiberState::kAtWarpOp) {
          ready = false;
        } else if (member.warp_mask != first.warp_mask || member.warp_kind != first.warp_kind) {
          fault_here(cudaErrorIllegalInstruction, "lanes of one warp mask at different warp intrinsics");
          return false;
        }
      }
      if (!ready) continue;
      for (int member_lane = 0; member_lane < lanes; ++member_lane) {
        if ((group >> member_lane & 1u) == 0) continue;
        Fiber& member = warp[member_lane];
        auto value_of = [&](int source) -> uint64_t {
          if (source < 0 || source >= kWarpSize) return member.warp_value;  // out of the warp: own value
          return (group >> source & 1u) ? warp[source].warp_value : kUndefinedLaneValue;
        };
        uint64_t result = 0;
        switch (member.warp_kind) {
          case kWarpSync: break;
          case kShuffle: result = value_of(member.warp_argument & (kWarpSize - 1)); break;
          case kShuffleUp: result = value_of(member_lane - member.warp_argument); break;
          case kShuffleDown: result = value_of(member_lane + member.warp_argument); break;
          case kShuffleXor: result = value_of(member_lane ^ member.warp_argument); break;
          case kMatchAny:
          case kBallot:
            for (int source = 0; source < lanes; ++source) {
              if ((group >> source & 1u) == 0) continue;
              const bool counts = member.warp_kind == kBallot ? warp[source].warp_value != 0
                                                                : warp[source].warp_value == member.warp_value;
              if (counts) result |= 1ull << source;
            }
            break;
          default: fault_here(cudaErrorIllegalInstruction, "an unknown warp intrinsic"); return false;
        }
        member.warp_result = result;
      }
      for (int member_lane = 0; member_lane < lanes; ++member_lane)
        if (group >> member_lane & 1u) warp[member_lane].state = FiberState::kRunnable;
      completed = true;
    }
  }
  return completed;
}

// Every fiber only spins: give the host's cores to whoever they wait for (other rank processes),
// backing off from a yield to a short sleep.
void BlockRunner::pause_host(int idle_passes) {
  if (idle_passes < 16) {
    sched_yield();
  } else {
    const int shift = std::min(idle_passes - 16, 8);
    std::this_thread::sleep_for(std::chrono::microseconds(1 << shift));
  }
}

void BlockRunner::run(const KernelLaunch& launch, unsigned linear_block) {
  const dim3 block = launch.block, grid = launch.grid;
  const int num_threads = static_cast<int>(block.x * block.y * block.z);
  launch_ = &launch;
  linear_block_ = linear_block;
  if (static_cast<int>(fibers_.size()) < num_threads) fibers_.resize(num_threads);
  // Shared memory starts with what the previous block left, or a pattern: never zeroed, as on a GPU.
  std::fill(shared_memory_.begin(), shared_memory_.begin() + launch.shared_bytes, 0xA5);
  const uint3 block_idx{linear_block % grid.x, linear_block / grid.x % grid.y, linear_block / (grid.x * grid.y)};
  for (int t = 0; t < num_threads; ++t) {
    Fiber& fiber = fibers_[t];
    prepare(fiber);
    fiber.ids = BuiltinIds{{t % block.x, t / block.x % block.y, t / (block.x * block.y)}, block_idx, block, grid};
  }
  for (size_t t = num_threads; t < fibers_.size(); ++t) fibers_[t].state = FiberState::kExited;
  std::vector<int> order(num_threads);
  for (int t = 0; t < num_threads; ++t) order[t] = t;
  int live = num_threads, idle_passes = 0;
  while (live > 0) {
    std::shuffle(order.begin(), order.end(), random_);
    bool ran = false, only_yields = true;
    for (int t : order) {
      Fiber& fiber = fibers_[t];
      if (fiber.state != FiberState::kRunnable) continue;
      resume(fiber);
      ran = true;
      if (!fiber.yielded) only_yields = false;
      if (fiber.state == FiberState::kExited) --live;
    }
    const bool released = complete_block_barrier(num_threads, live) | complete_warp_ops(num_threads);
    if (released) maybe_stall(launch.name, linear_block, random_);
    if (!ran && !released && live > 0) {
      if (!device_faulted())
        fault_here(cudaErrorIllegalInstruction,
                   "a block that cannot go on (a barrier or warp intrinsic that not every thread reaches)");
      break;  // the fibers are abandoned where they wait
    }
    if (ran && only_yields && !released) pause_host(idle_passes++);
    else idle_passes = 0;
  }
  launch_ = nullptr;
}

// Persistent host threads that run blocks beside the device thread.
class WorkerPool {
 public:
  // Runs job on the calling thread and on `helpers` pool threads; returns when all have returned.
  void run(int helpers, const std::function<void()>& job) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      while (static_cast<int>(threads_.size()) < helpers) {
        const int index = static_cast<int>(threads_.size());
        threads_.emplace_back([this, index] { serve(index); });
        threads_.back().detach();  // the pool lives as long as the process
      }
      job_ = &job;
      wanted_ = helpers;
      remaining_ = helpers;
      ++generation_;
    }
    changed_.notify_all();
    job();
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [this] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void serve(int index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void()>* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return generation_ != seen && index < wanted_; });
        seen = generation_;
        job = job_;
      }
      (*job)();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --remaining_;
      }
      changed_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::thread> threads_;
  const std::function<void()>* job_ = nullptr;
  int wanted_ = 0;
  int remaining_ = 0;
  uint64_t generation_ = 0;
};

WorkerPool& worker_pool() {
  static WorkerPool* pool = new WorkerPool();  // never destroyed: its threads run until exit
  return *pool;
}

}  // namespace

void set_stall(const std::string& name, double seconds, double probability, unsigned first_block,
               unsigned end_block) {
  std::lock_guard<std::mutex> lock(stalls_mutex);
  if (seconds <= 0) stalls.erase(name);
  else stalls[name] = Stall{seconds, probability, first_block, end_block};
}

uint64_t schedule_seed() {
  static const uint64_t seed = initial_seed();
  return seed;
}

int block_workers() {
  static const int workers = [] {
    const char* text = std::getenv("EPLIB_CUDA_CPU_BLOCK_WORKERS");
    const int value = text != nullptr ? std::atoi(text) : 2;
    return value < 1 ? 1 : value;
  }();
  return workers;
}

void run_kernel(const KernelLaunch& launch) {
  const unsigned num_blocks = launch.grid.x * launch.grid.y * launch.grid.z;
  std::vector<unsigned> order(num_blocks);
  for (unsigned b = 0; b < num_blocks; ++b) order[b] = b;
  static std::mt19937_64 random(schedule_seed());  // only the device thread runs kernels
  std::shuffle(order.begin(), order.end(), random);
  std::atomic<unsigned> next{0};
  const std::function<void()> job = [&] {
    for (;;) {
      const unsigned index = next.fetch_add(1);
      if (index >= num_blocks || (device_faulted() && !launch.cooperative)) return;
      runner().run(launch, order[index]);
    }
  };
  // A cooperative launch needs every block in flight at once (blocks may wait for each other).
  const unsigned workers = launch.cooperative ? num_blocks : std::min<unsigned>(num_blocks, block_workers());
  const int helpers = static_cast<int>(workers) - 1;
  worker_pool().run(helpers, job);
}

void sync_block() { runner().block_barrier(); }

uint64_t warp_exchange(int kind, unsigned mask, uint64_t value, int argument) {
  return runner().warp_op(kind, mask, value, argument);
}

void yield_thread() { runner().yield(); }

void* dynamic_shared_memory() {
  auto address = reinterpret_cast<uintptr_t>(runner().dynamic_shared());
  return reinterpret_cast<void*>((address + 15) / 16 * 16);
}

uint64_t globaltimer_ns() {
  yield_thread();
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

void device_fault(cudaError_t code, const char* what, const void* address) {
  char text[64];
  std::snprintf(text, sizeof(text), " (address %p)", address);
  const KernelLaunch* launch = runner().launch();
  const BuiltinIds* ids = current_ids;
  std::string where;
  if (launch != nullptr && ids != nullptr)
    where = " in kernel " + launch->name + ", block " + std::to_string(ids->block_idx.x) + ", thread " +
            std::to_string(ids->thread_idx.x);
  record_fault(code, std::string("eplib CPU execution: ") + what + text + where + " (EPLIB_CUDA_CPU_SEED=" +
                         std::to_string(schedule_seed()) + ")");
}

}  // namespace eplib_cuda_cpu
