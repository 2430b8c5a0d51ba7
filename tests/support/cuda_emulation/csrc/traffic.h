// Global-memory traffic of the emulated kernels (the DDF_EMU_TRAFFIC build; see traffic.cc).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ddf_emu {
namespace traffic {

#ifdef DDF_EMU_TRAFFIC
// Called by the runtime around each launch, block and emulated thread.
void begin_launch(const char* kernel, unsigned int grid, unsigned int block);
void end_launch();
void begin_block(int threads);
void end_block();
// The emulated thread now running (fibers only); its stack and the OS thread's stack are not global memory.
void set_lane(int linear, const void* stack, size_t stack_bytes);
void exclude(const void* data, size_t bytes);  // a shared array of the running block
// Stops counting for the calling fiber (returns what resume() restores).
void* pause();
void resume(void* saved);
#else
inline void* pause() { return nullptr; }
inline void resume(void*) {}
inline void begin_launch(const char*, unsigned int, unsigned int) {}
inline void end_launch() {}
inline void begin_block(int) {}
inline void end_block() {}
inline void set_lane(int, const void*, size_t) {}
inline void exclude(const void*, size_t) {}
#endif

}  // namespace traffic

namespace traffic {
// What one launch moved: per side, {warp requests, bytes requested, 32-byte sectors, distinct bytes}.
struct LaunchReport {
  std::string kernel;
  unsigned int grid = 0, block = 0;
  uint64_t load[4] = {}, store[4] = {};
};
bool available();  // false unless built with DDF_EMU_TRAFFIC
void start();      // clear the counters and count the following launches
std::vector<LaunchReport> stop();
}  // namespace traffic

}  // namespace ddf_emu
