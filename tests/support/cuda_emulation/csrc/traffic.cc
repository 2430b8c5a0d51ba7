// Global-memory traffic model of the emulated kernels (built with DDF_EMU_TRAFFIC).
//
// The kernel files are compiled with gcc's -fsanitize=kernel-address and a call threshold of 0, so every
// load and store they make calls __asan_{load,store}{1,2,4,8,16,N}_noabort, defined here (this file is
// not instrumented; nothing else provides them: no ASan runtime is linked). An access counts as global
// when it is made while an emulated thread runs and lies neither on a stack (the fiber's, or the OS
// thread's, which holds the launch's arguments) nor in a shared array of the block.
//
// Accesses are grouped into warp instructions the way a SIMT warp issues them: the n-th execution of one
// instruction (return address of the callback) by each lane of a warp forms one request. Per request the
// model counts the bytes the lanes asked for and the distinct 32-byte sectors they touch (what the memory
// system transfers between L2 and the SMs); per launch, the distinct bytes touched (each byte once, the
// best any cache could do).
#include "traffic.h"

#ifdef DDF_EMU_TRAFFIC
#include <pthread.h>

#include <algorithm>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#endif

#ifdef DDF_EMU_TRAFFIC
namespace ddf_emu {
namespace traffic {
namespace {

struct Access {
  uintptr_t site, addr;
  uint32_t bytes;
  bool store;
};

struct Counts {
  uint64_t requests = 0, bytes = 0, sectors = 0, distinct = 0;
};

struct LaunchStats {
  std::string kernel;
  unsigned int grid = 0, block = 0;
  Counts load, store;
  std::unordered_map<uint64_t, uint32_t> load_mask, store_mask;  // sector -> bytes touched (bit per byte)
};

bool g_enabled = false;
std::vector<LaunchStats> g_launches;
LaunchStats* g_launch = nullptr;
struct Lane {
  std::vector<Access> log;
  uintptr_t stack_lo = 0, stack_hi = 0;  // its fiber's stack
};
std::vector<Lane> g_lanes;  // per emulated thread of the running block
std::vector<std::pair<uintptr_t, uintptr_t>> g_excluded;
thread_local Lane* tls_lane = nullptr;  // the lane running on this OS thread, while it runs kernel code
uintptr_t g_os_lo = 0, g_os_hi = 0;     // the launching thread's stack (the launch's arguments)

void os_stack(uintptr_t& lo, uintptr_t& hi) {
  pthread_attr_t attr;
  void* base = nullptr;
  size_t size = 0;
  pthread_getattr_np(pthread_self(), &attr);
  pthread_attr_getstack(&attr, &base, &size);
  pthread_attr_destroy(&attr);
  lo = reinterpret_cast<uintptr_t>(base);
  hi = lo + size;
}

// Not instrumented itself; what it calls is, and finds tls_lane null while it runs.
__attribute__((no_sanitize_address)) void record(uintptr_t addr, uint32_t bytes, bool store, uintptr_t site) {
  Lane* lane = tls_lane;
  if (lane == nullptr) return;
  if ((addr >= lane->stack_lo && addr < lane->stack_hi) || (addr >= g_os_lo && addr < g_os_hi)) return;
  tls_lane = nullptr;
  bool excluded = false;
  for (const auto& [lo, hi] : g_excluded) excluded = excluded || (addr >= lo && addr < hi);
  if (!excluded) lane->log.push_back({site, addr, bytes, store});
  tls_lane = lane;
}

void mark(std::unordered_map<uint64_t, uint32_t>& masks, std::unordered_set<uint64_t>& sectors, const Access& a) {
  for (uintptr_t b = a.addr; b < a.addr + a.bytes; ++b) {
    masks[b / 32] |= uint32_t(1) << (b % 32);
    sectors.insert(b / 32);
  }
}

}  // namespace

void begin_launch(const char* kernel, unsigned int grid, unsigned int block) {
  if (!g_enabled) return;
  g_launches.push_back({});
  g_launch = &g_launches.back();
  g_launch->kernel = kernel;
  g_launch->grid = grid;
  g_launch->block = block;
}

void end_launch() {
  if (g_launch == nullptr) return;
  for (auto* side : {&g_launch->load, &g_launch->store}) {
    auto& masks = side == &g_launch->load ? g_launch->load_mask : g_launch->store_mask;
    for (const auto& [sector, mask] : masks) side->distinct += __builtin_popcount(mask);
    masks.clear();
  }
  g_launch = nullptr;
}

void begin_block(int threads) {
  if (g_launch == nullptr) return;
  g_lanes.assign(threads, {});
  g_excluded.clear();
  os_stack(g_os_lo, g_os_hi);
}

void end_block() {
  if (g_launch == nullptr) return;
  tls_lane = nullptr;
  const size_t warps = (g_lanes.size() + 31) / 32;
  for (size_t w = 0; w < warps; ++w) {
    // request (site, n-th execution by a lane) -> its accesses
    std::unordered_map<uintptr_t, std::vector<std::vector<const Access*>>> requests;
    for (size_t lane = w * 32; lane < std::min(g_lanes.size(), w * 32 + 32); ++lane) {
      std::unordered_map<uintptr_t, size_t> seen;
      for (const Access& a : g_lanes[lane].log) {
        auto& list = requests[a.site];
        const size_t n = seen[a.site]++;
        if (list.size() <= n) list.resize(n + 1);
        list[n].push_back(&a);
      }
    }
    for (const auto& [site, executions] : requests) {
      for (const auto& accesses : executions) {
        std::unordered_set<uint64_t> sectors;
        const bool store = accesses.front()->store;
        Counts& c = store ? g_launch->store : g_launch->load;
        auto& masks = store ? g_launch->store_mask : g_launch->load_mask;
        for (const Access* a : accesses) {
          c.bytes += a->bytes;
          mark(masks, sectors, *a);
        }
        ++c.requests;
        c.sectors += sectors.size();
      }
    }
  }
  g_lanes.clear();
}

void set_lane(int linear, const void* stack, size_t stack_bytes) {
  if (g_launch == nullptr) return;
  Lane& lane = g_lanes[linear];
  lane.stack_lo = reinterpret_cast<uintptr_t>(stack);
  lane.stack_hi = lane.stack_lo + stack_bytes;
  tls_lane = &lane;
}

void* pause() {
  void* saved = tls_lane;
  tls_lane = nullptr;
  return saved;
}

void resume(void* saved) { tls_lane = static_cast<Lane*>(saved); }

void exclude(const void* data, size_t bytes) {
  if (g_launch == nullptr) return;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(data);
  g_excluded.emplace_back(lo, lo + bytes);
}

}  // namespace traffic
}  // namespace ddf_emu

// The instrumentation's callbacks (gcc -fsanitize=kernel-address, asan-instrumentation-with-call-threshold=0).
#define DDF_EMU_ACCESS(n)                                                                                        \
  extern "C" __attribute__((no_sanitize_address)) void __asan_load##n##_noabort(uintptr_t p) {                                                       \
    ddf_emu::traffic::record(p, n, false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));           \
  }                                                                                                              \
  extern "C" __attribute__((no_sanitize_address)) void __asan_store##n##_noabort(uintptr_t p) {                                                      \
    ddf_emu::traffic::record(p, n, true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));            \
  }
DDF_EMU_ACCESS(1)
DDF_EMU_ACCESS(2)
DDF_EMU_ACCESS(4)
DDF_EMU_ACCESS(8)
DDF_EMU_ACCESS(16)
extern "C" __attribute__((no_sanitize_address)) void __asan_loadN_noabort(uintptr_t p, size_t n) {
  ddf_emu::traffic::record(p, static_cast<uint32_t>(n), false, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" __attribute__((no_sanitize_address)) void __asan_storeN_noabort(uintptr_t p, size_t n) {
  ddf_emu::traffic::record(p, static_cast<uint32_t>(n), true, reinterpret_cast<uintptr_t>(__builtin_return_address(0)));
}
extern "C" void __asan_handle_no_return() {}
extern "C" void __asan_before_dynamic_init(const char*) {}
extern "C" void __asan_after_dynamic_init() {}

namespace ddf_emu {
namespace traffic {
bool available() { return true; }

void start() {
  g_launches.clear();
  g_enabled = true;
}

std::vector<LaunchReport> stop() {
  g_enabled = false;
  std::vector<LaunchReport> out;
  for (const auto& l : g_launches) {
    LaunchReport r;
    r.kernel = l.kernel;
    r.grid = l.grid;
    r.block = l.block;
    for (const auto& [c, to] : {std::pair{&l.load, r.load}, std::pair{&l.store, r.store}}) {
      to[0] = c->requests;
      to[1] = c->bytes;
      to[2] = c->sectors;
      to[3] = c->distinct;
    }
    out.push_back(std::move(r));
  }
  g_launches.clear();
  return out;
}
}  // namespace traffic
}  // namespace ddf_emu
#else
namespace ddf_emu {
namespace traffic {
bool available() { return false; }
void start() {}
std::vector<LaunchReport> stop() { return {}; }
}  // namespace traffic
}  // namespace ddf_emu
#endif
