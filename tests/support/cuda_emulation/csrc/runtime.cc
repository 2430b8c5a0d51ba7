// The CUDA emulation's runtime (cuda_emu.h): a launch's blocks, run one at a time, their threads as fibers
// (ucontext) or OS threads, __syncthreads and shuffles as waits on block state, and the checks.
//
// Both modes share one state machine, guarded by the block's mutex in threads mode (fibers never run
// concurrently). A thread waits for a generation counter to move: the block barrier's when it arrives at
// __syncthreads, its warp's when it arrives at a shuffle; the last arrival moves it. A failure (a check, or
// no thread able to move) marks the block aborted; every waiting thread then unwinds with `Abort`, and
// run_grid raises the first message.
//
// Fiber switches: swapcontext saves and restores the signal mask, a system call at every switch (about
// two thirds of the time of a shuffle-heavy kernel). A fiber is therefore entered once with swapcontext
// (its own stack) and afterwards switched with _setjmp/_longjmp, which keep the signal mask alone. The
// ASan build switches with swapcontext throughout: its fiber annotations are made for it.
#undef _FORTIFY_SOURCE  // glibc's checked longjmp refuses a jump to another stack
#include "cuda_emu.h"
#include "traffic.h"

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__) && !defined(DDF_EMU_TRAFFIC)  // the traffic build's callbacks are ours
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define DDF_EMU_ASAN 1
#endif
#ifndef DDF_EMU_ASAN
#define DDF_EMU_JMP 1  // switch started fibers with _setjmp/_longjmp (see the top)
#endif

namespace ddf_emu {

thread_local const ThreadCtx* tls_thread = nullptr;

namespace {

struct Thread;
class Block;
thread_local Thread* tls_self = nullptr;  // the emulated thread this OS thread / fiber runs
Block* g_block = nullptr;                 // the running block (one at a time)

std::atomic<Mode> g_mode{
#if defined(__SANITIZE_THREAD__)
    Mode::threads  // ThreadSanitizer sees races between OS threads only
#else
    Mode::fibers
#endif
};
std::mutex g_launch_mutex;        // one launch at a time: blocks and shared slots are process-wide
uint64_t g_block_serial = 0;      // bumped at every block start (under g_launch_mutex)

#ifdef DDF_EMU_ASAN
// ASan's swapcontext interceptor clears the shadow of the whole target stack at every switch, so the time
// of a fiber switch grows with the stack: 64 KiB (512 KiB made the runs 10x slower) still holds the kernels'
// frames with their redzones several times over (they also run with 16 KiB).
constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kGuardBytes = 0;           // ASan guards the arrays itself
#else
constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 64;
#endif
constexpr unsigned char kGuardByte = 0x5A;

struct Abort {};  // unwinds a thread of an aborted block

// On a GPU only __syncthreads orders one thread's shared-memory accesses before another's; a shuffle exchanges
// registers and an exit orders nothing. The runtime's block mutex, though, is taken at every shuffle and
// exit, and ThreadSanitizer would read each as a happens-before edge between the threads, hiding a missing
// __syncthreads. So under ThreadSanitizer a shuffle and an exit run with the mutex's synchronisation and the
// runtime's own accesses (its bookkeeping) ignored: what orders the kernel's accesses is __syncthreads alone.
#if defined(__SANITIZE_THREAD__)
extern "C" {
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
struct Unordered {
  Unordered() {
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Unordered() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  }
};
#else
struct Unordered {};
#endif

enum class Wait { none, barrier, shuffle };

struct Thread {
  ThreadCtx ctx;
  int linear = 0;
  Wait wait = Wait::none;
  int line = 0;          // source line of the __syncthreads / shuffle it waits at
  uint64_t gen = 0;      // generation it waits to move
  bool exited = false;
  bool started = false;  // fibers mode
  ucontext_t uc;
  std::unique_ptr<char[]> stack;
#ifdef DDF_EMU_ASAN
  void* fake_stack = nullptr;
#endif
#ifdef DDF_EMU_JMP
  jmp_buf jb;  // where a suspended fiber continues
#endif
};

struct Warp {
  int lanes = 0;        // threads in this warp (the last warp of a block may be partial)
  int arrived = 0;
  int exited = 0;
  int first_exited = -1;  // linear index of the first lane that exited
  int line = 0;
  Shuffle kind = Shuffle::down;
  uint64_t gen = 0;
  uint64_t value[2][kWarpSize];  // double-buffered by generation: a lane may run ahead into the next shuffle
};

struct SharedArray {
  const char* name;
  char* data;
  size_t bytes;
};

class Block {
 public:
  Block(const char* kernel, dim3 grid, dim3 block, size_t shmem, const std::function<void()>& body)
      : kernel_(kernel), body_(body), shmem_(shmem) {
    const int n = static_cast<int>(block.x * block.y * block.z);
    threads_.resize(n);
    for (int i = 0; i < n; ++i) {
      Thread& t = threads_[i];
      t.linear = i;
      t.ctx.thread_idx = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
      t.ctx.block_dim = block;
      t.ctx.grid_dim = grid;
    }
    warps_.resize((n + kWarpSize - 1) / kWarpSize);
    for (size_t w = 0; w < warps_.size(); ++w) {
      warps_[w].lanes = std::min<int>(kWarpSize, n - static_cast<int>(w * kWarpSize));
    }
  }

  // Runs block `idx`; returns an empty string or the failure.
  std::string run(uint3 idx) {
    serial_ = ++g_block_serial;
    for (Thread& t : threads_) {
      t.ctx.block_idx = idx;
      t.wait = Wait::none;
      t.exited = t.started = false;
    }
    for (Warp& w : warps_) {
      w.arrived = w.exited = 0;
      w.first_exited = -1;
    }
    barrier_arrived_ = exited_ = 0;
    shared_bytes_ = shmem_;
    arrays_.clear();
    aborted_ = false;
    error_.clear();
    traffic::begin_block(static_cast<int>(threads_.size()));
    if (mode_ == Mode::fibers) {
      run_fibers();
    } else {
      run_threads();
    }
    traffic::end_block();
    if (error_.empty()) check_guards();
    return error_;
  }

  // ---- called from the block's threads ----

  void syncthreads(Thread& t, int line) {
    Lock lock = this->lock();
    if (exited_ > 0) {
      fail(lock, describe(first_exited()) + " exited while other threads wait at __syncthreads line " +
                     std::to_string(line) + ": it is never reached by all threads");
    }
    if (barrier_arrived_ == 0) {
      barrier_line_ = line;
    } else if (barrier_line_ != line) {
      fail(lock, describe(t) + " waits at __syncthreads line " + std::to_string(line) + " while other threads wait "
                     "at __syncthreads line " + std::to_string(barrier_line_));
    }
    if (++barrier_arrived_ == static_cast<int>(threads_.size())) {
      barrier_arrived_ = 0;
      ++barrier_gen_;
      release(lock);
      return;
    }
    wait(lock, t, Wait::barrier, line, barrier_gen_);
  }

  uint64_t shuffle(Thread& t, unsigned int mask, uint64_t bits, Shuffle kind, int arg, int line) {
    const Unordered unordered;
    Lock lock = this->lock();
    Warp& w = warps_[t.linear / kWarpSize];
    const int lane = t.linear % kWarpSize;
    const auto where = [line] { return "shuffle at line " + std::to_string(line); };  // built on failure only
    if (mask != 0xffffffffu) {
      fail(lock, describe(t) + ": " + where() + " has mask " + hex(mask) + "; only the full-warp mask 0xffffffff "
                     "is supported");
    }
    if (w.lanes < static_cast<int>(kWarpSize)) {
      fail(lock, describe(t) + ": " + where() + " names all 32 lanes, but this warp has " + std::to_string(w.lanes) +
                     " threads (block size not a multiple of 32)");
    }
    if (w.exited > 0) {
      fail(lock, "divergent shuffle: " + describe(threads_[w.first_exited]) + " exited while other lanes of its "
                     "warp wait at the " + where());
    }
    if (w.arrived == 0) {
      w.line = line;
      w.kind = kind;
    } else if (w.line != line || w.kind != kind) {
      fail(lock, "divergent shuffle: " + describe(t) + " is at the " + where() + ", other lanes of its warp at the "
                     "shuffle at line " + std::to_string(w.line));
    }
    const uint64_t gen = w.gen;
    w.value[gen & 1][lane] = bits;
    if (++w.arrived == static_cast<int>(kWarpSize)) {
      w.arrived = 0;
      ++w.gen;
      release(lock);
    } else {
      wait(lock, t, Wait::shuffle, line, gen);
    }
    int src = lane;
    if (kind == Shuffle::down) {
      if (lane + arg < static_cast<int>(kWarpSize)) src = lane + arg;
    } else {
      src = (lane ^ arg) & (kWarpSize - 1);
    }
    return w.value[gen & 1][src];
  }

  void* shared_storage(SharedSlot& slot, size_t bytes, size_t align, const char* name, void (*poison)(void*, size_t)) {
    Lock lock = this->lock();
    if (slot.block_serial != serial_) {
      if (slot.data == nullptr) {  // first use ever: storage kept for the process (one block at a time)
        slot.data = ::operator new(bytes + kGuardBytes, std::align_val_t(std::max<size_t>(align, 16)));
      }
      shared_bytes_ += bytes;
      if (shared_bytes_ > kMaxSharedPerBlock) {
        fail(lock, "shared memory of the block is " + std::to_string(shared_bytes_) + " bytes with '" + name +
                       "', over the " + std::to_string(kMaxSharedPerBlock) + "-byte limit per block");
      }
      poison(slot.data, bytes);
      std::memset(static_cast<char*>(slot.data) + bytes, kGuardByte, kGuardBytes);
      arrays_.push_back({name, static_cast<char*>(slot.data), bytes});
      traffic::exclude(slot.data, bytes + kGuardBytes);
      slot.block_serial = serial_;
    }
    return slot.data;
  }

  void thread_exit(Thread& t) {
    const Unordered unordered;
    Lock lock = this->lock();
    t.exited = true;
    ++exited_;
    Warp& w = warps_[t.linear / kWarpSize];
    if (w.exited++ == 0) w.first_exited = t.linear;
    if (aborted_) return;
    if (barrier_arrived_ > 0) {
      fail_noabort(describe(t) + " exited while other threads wait at __syncthreads line " +
                   std::to_string(barrier_line_) + ": it is never reached by all threads");
    } else if (w.arrived > 0) {
      fail_noabort("divergent shuffle: " + describe(t) + " exited while other lanes of its warp wait at the "
                   "shuffle at line " + std::to_string(w.line));
    } else if (mode_ == Mode::threads && exited_ < static_cast<int>(threads_.size()) && !any_can_move()) {
      fail_noabort(deadlock_message());
    }
    if (mode_ == Mode::threads) cv_.notify_all();
  }

  std::string describe(const Thread& t) const {
    const uint3 i = t.ctx.thread_idx;
    return "thread (" + std::to_string(i.x) + ", " + std::to_string(i.y) + ", " + std::to_string(i.z) + ")";
  }

  Mode mode_ = Mode::fibers;

 private:
  using Lock = std::unique_lock<std::mutex>;
  Lock lock() { return mode_ == Mode::threads ? Lock(mutex_) : Lock(); }

  static std::string hex(unsigned int v) {
    std::ostringstream os;
    os << "0x" << std::hex << v;
    return os.str();
  }

  const Thread& first_exited() const {
    for (const Thread& t : threads_) {
      if (t.exited) return t;
    }
    return threads_[0];
  }

  bool moved(const Thread& t) const {
    return t.wait == Wait::barrier ? barrier_gen_ != t.gen : warps_[t.linear / kWarpSize].gen != t.gen;
  }

  void fail_noabort(const std::string& message) {
    if (error_.empty()) error_ = message;
    aborted_ = true;
    if (mode_ == Mode::threads) cv_.notify_all();
  }

  [[noreturn]] void fail(Lock&, const std::string& message) {
    fail_noabort(message);
    throw Abort{};
  }

  void release(Lock&) {
    if (mode_ == Mode::threads) cv_.notify_all();
  }

  void wait(Lock& lock, Thread& t, Wait what, int line, uint64_t gen) {
    t.wait = what;
    t.line = line;
    t.gen = gen;
    if (mode_ == Mode::fibers) {
      progressed_ = true;  // it ran up to here since it was resumed
      yield(t);
      while (!aborted_ && !moved(t)) {
        yield(t);
      }
      if (aborted_) throw Abort{};
      progressed_ = true;
    } else {
      if (!any_can_move()) fail(lock, deadlock_message());
      cv_.wait(lock, [&] { return aborted_ || moved(t); });
      if (aborted_) throw Abort{};
    }
    t.wait = Wait::none;
  }

  // Threads mode: whether some thread runs or is about to (its wait is over).
  bool any_can_move() const {
    for (const Thread& t : threads_) {
      if (!t.exited && (t.wait == Wait::none || moved(t))) return true;
    }
    return false;
  }

  std::string deadlock_message() const {
    std::string msg = "deadlock: no thread of the block can continue;";
    int listed = 0;
    int last_line = -1;
    Wait last_wait = Wait::none;
    for (const Thread& t : threads_) {
      if (t.exited || (t.wait == last_wait && t.line == last_line)) continue;
      if (++listed > 4) break;
      last_wait = t.wait;
      last_line = t.line;
      msg += " " + describe(t) + " waits at " + (t.wait == Wait::barrier ? "__syncthreads" : "a shuffle") +
             " (line " + std::to_string(t.line) + ");";
    }
    if (exited_ > 0) msg += " " + std::to_string(exited_) + " threads have exited";
    return msg;
  }

  void check_guards() {
    for (const SharedArray& a : arrays_) {
      for (size_t i = 0; i < kGuardBytes; ++i) {
        if (static_cast<unsigned char>(a.data[a.bytes + i]) != kGuardByte) {
          error_ = std::string("shared array '") + a.name + "' (" + std::to_string(a.bytes) +
                   " bytes) was written past its end, at byte " + std::to_string(a.bytes + i);
          return;
        }
      }
    }
  }

  // ---- fibers ----

  static void fiber_entry(unsigned int hi, unsigned int lo) {
    Block* self = reinterpret_cast<Block*>((static_cast<uintptr_t>(hi) << 32) | lo);
    Thread& t = self->threads_[self->current_];
#ifdef DDF_EMU_ASAN
    __sanitizer_finish_switch_fiber(t.fake_stack, &self->main_stack_bottom_, &self->main_stack_size_);
#endif
    self->run_body(t);
    self->progressed_ = true;
#ifdef DDF_EMU_JMP
    _longjmp(self->main_jb_, 1);
#else
#ifdef DDF_EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, self->main_stack_bottom_, self->main_stack_size_);
#endif
    swapcontext(&t.uc, &self->main_);
#endif
  }

  void run_body(Thread& t) {
    tls_thread = &t.ctx;
    tls_self = &t;
    try {
      traffic::set_lane(t.linear, t.stack.get(), t.stack ? kStackBytes : 0);
      body_();
    } catch (const Abort&) {
    } catch (const std::exception& e) {
      traffic::resume(nullptr);
      Lock lock = this->lock();
      fail_noabort(describe(t) + ": " + e.what());
    }
    traffic::resume(nullptr);
    thread_exit(t);
  }

  void yield(Thread& t) {
#ifdef DDF_EMU_JMP
    if (_setjmp(t.jb) == 0) _longjmp(main_jb_, 1);
#else
#ifdef DDF_EMU_ASAN
    __sanitizer_start_switch_fiber(&t.fake_stack, main_stack_bottom_, main_stack_size_);
#endif
    swapcontext(&t.uc, &main_);
#ifdef DDF_EMU_ASAN
    __sanitizer_finish_switch_fiber(t.fake_stack, &main_stack_bottom_, &main_stack_size_);
#endif
#endif
    tls_thread = &t.ctx;
    tls_self = &t;
  }

  void resume(int i) {
    Thread& t = threads_[i];
    current_ = i;
#ifdef DDF_EMU_JMP
    if (t.started) {
      if (_setjmp(main_jb_) == 0) _longjmp(t.jb, 1);
      tls_thread = nullptr;
      tls_self = nullptr;
      return;
    }
#endif
    if (!t.started) {
      t.started = true;
#ifdef DDF_EMU_ASAN
      t.fake_stack = nullptr;
#endif
      if (!t.stack) t.stack.reset(new char[kStackBytes]);
      getcontext(&t.uc);
      t.uc.uc_stack.ss_sp = t.stack.get();
      t.uc.uc_stack.ss_size = kStackBytes;
      t.uc.uc_link = nullptr;
      const uintptr_t self = reinterpret_cast<uintptr_t>(this);
      makecontext(&t.uc, reinterpret_cast<void (*)()>(&Block::fiber_entry), 2,
                  static_cast<unsigned int>(self >> 32), static_cast<unsigned int>(self & 0xffffffffu));
    }
#ifdef DDF_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, t.stack.get(), kStackBytes);
#endif
#ifdef DDF_EMU_JMP
    if (_setjmp(main_jb_) == 0) swapcontext(&main_, &t.uc);  // the fiber comes back with _longjmp
#else
    swapcontext(&main_, &t.uc);
#endif
#ifdef DDF_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    tls_thread = nullptr;
    tls_self = nullptr;
  }

  void run_fibers() {
    const int n = static_cast<int>(threads_.size());
    while (exited_ < n) {
      progressed_ = false;
      for (int i = 0; i < n; ++i) {
        if (!threads_[i].exited) resume(i);
        if (aborted_) break;
      }
      if (aborted_) break;
      if (!progressed_ && exited_ < n) fail_noabort(deadlock_message());
    }
    if (aborted_) {  // unwind the waiting fibers (each throws Abort from its wait)
      for (int i = 0; i < n; ++i) {
        Thread& t = threads_[i];
        if (t.exited) continue;
        if (t.started) {
          resume(i);
        } else {
          t.exited = true;
        }
      }
    }
  }

  // ---- threads ----

  void run_threads() {
    std::vector<std::thread> workers;
    workers.reserve(threads_.size());
    for (Thread& t : threads_) {
      workers.emplace_back([this, &t] { run_body(t); });
    }
    for (std::thread& w : workers) w.join();
  }

  const char* kernel_;
  const std::function<void()>& body_;
  size_t shmem_;
  std::vector<Thread> threads_;
  std::vector<Warp> warps_;
  std::vector<SharedArray> arrays_;
  uint64_t serial_ = 0;
  int barrier_arrived_ = 0, barrier_line_ = 0, exited_ = 0;
  uint64_t barrier_gen_ = 0;
  size_t shared_bytes_ = 0;
  bool aborted_ = false, progressed_ = false;
  std::string error_;
  std::mutex mutex_;
  std::condition_variable cv_;
  // fibers
  ucontext_t main_;
#ifdef DDF_EMU_JMP
  jmp_buf main_jb_;  // where run_fibers continues when the running fiber yields or ends
#endif
  int current_ = 0;
#ifdef DDF_EMU_ASAN
  const void* main_stack_bottom_ = nullptr;
  size_t main_stack_size_ = 0;
#endif
};

}  // namespace

// Runtime code inside a kernel's thread is not the kernel's traffic (traffic build).
struct Untraced {
  void* saved = traffic::pause();
  ~Untraced() { traffic::resume(saved); }
};

std::atomic<int> g_multiprocessors{kMultiprocessors};
int multiprocessors() { return g_multiprocessors; }
void set_multiprocessors(int count) {
  if (count < 1) throw std::invalid_argument("the multiprocessor count must be >= 1");
  g_multiprocessors = count;
}

void set_mode(Mode m) { g_mode = m; }
Mode mode() { return g_mode; }

void syncthreads(int line) {
  const Untraced untraced;
  g_block->syncthreads(*tls_self, line);
}

uint64_t shuffle_bits(unsigned int mask, uint64_t bits, Shuffle kind, int arg, int line) {
  const Untraced untraced;
  return g_block->shuffle(*tls_self, mask, bits, kind, arg, line);
}

void* shared_storage(SharedSlot& slot, size_t bytes, size_t align, const char* name, void (*poison)(void*, size_t)) {
  const Untraced untraced;
  return g_block->shared_storage(slot, bytes, align, name, poison);
}

void run_grid(const char* kernel, dim3 grid, dim3 block, size_t shmem, const std::function<void()>& body) {
  auto launch_error = [&](const std::string& why) {
    return std::runtime_error(std::string("CUDA emulation: launch of ") + kernel + " <<<(" + std::to_string(grid.x) +
                              ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), (" +
                              std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                              std::to_string(block.z) + "), " + std::to_string(shmem) + ">>>: " + why);
  };
  const unsigned int bdim[3] = {block.x, block.y, block.z};
  const unsigned int gdim[3] = {grid.x, grid.y, grid.z};
  for (int d = 0; d < 3; ++d) {
    if (bdim[d] == 0 || gdim[d] == 0) throw launch_error("invalid configuration: a grid or block dimension is 0");
    if (bdim[d] > kMaxBlockDim[d]) throw launch_error("block dimension " + std::to_string(d) + " over its limit " +
                                                      std::to_string(kMaxBlockDim[d]));
    if (gdim[d] > kMaxGridDim[d]) throw launch_error("grid dimension " + std::to_string(d) + " over its limit " +
                                                     std::to_string(kMaxGridDim[d]));
  }
  if (uint64_t(block.x) * block.y * block.z > kMaxThreadsPerBlock) {
    throw launch_error("more than " + std::to_string(kMaxThreadsPerBlock) + " threads per block");
  }
  if (shmem > kMaxSharedPerBlock) throw launch_error("dynamic shared memory over the per-block limit");

  const std::lock_guard<std::mutex> guard(g_launch_mutex);
  Block b(kernel, grid, block, shmem, body);
  b.mode_ = g_mode;
#ifdef DDF_EMU_TRAFFIC
  b.mode_ = Mode::fibers;  // the traffic model groups a warp's accesses on one OS thread
#endif
  traffic::begin_launch(kernel, grid.x * grid.y * grid.z, block.x * block.y * block.z);
  g_block = &b;
  for (unsigned int z = 0; z < grid.z; ++z) {
    for (unsigned int y = 0; y < grid.y; ++y) {
      for (unsigned int x = 0; x < grid.x; ++x) {
        const std::string error = b.run(uint3{x, y, z});
        if (!error.empty()) {
          g_block = nullptr;
          traffic::end_launch();
          throw std::runtime_error(std::string("CUDA emulation: kernel ") + kernel + ", block (" + std::to_string(x) +
                                   ", " + std::to_string(y) + ", " + std::to_string(z) + "): " + error);
        }
      }
    }
  }
  g_block = nullptr;
  traffic::end_launch();
}

}  // namespace ddf_emu
