// Global-memory traffic of the emulated kernels (the DDF_EMU_TRAFFIC build; see traffic.cc).
#pragma once

#include <cstddef>
#include <cstdint>

namespace pybind11 {
class module_;
}

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

// Adds the module's `traffic` functions (or traffic_available = False in other builds).
void bind_traffic(pybind11::module_& m);

}  // namespace ddf_emu
