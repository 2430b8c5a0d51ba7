// The CUDA constructs our kernels use, executed on the CPU: a test-only build of the unchanged csrc/cuda
// sources (ddf_cuda.cuh includes this file instead of the CUDA headers when DDFNET_CUDA_EMULATION is
// defined; see csrc/README.md, "CUDA emulation").
//
// A launch runs the grid's blocks one after another. A block's threads run as fibers on the calling
// thread (the default: deterministic and fast) or as one OS thread each (`set_mode(Mode::threads)`, so
// that ThreadSanitizer sees the block's real concurrency). Threads switch only at __syncthreads and at
// shuffles. What a GPU punishes and a CPU would forgive is checked, each as an exception raised from the
// launch (a RuntimeError in Python), never a hang:
//   - launch configuration over the hardware limits of sm_80 / sm_90 (block and grid size, shared memory);
//   - a __syncthreads that some thread of the block does not reach (it exited, waits at another
//     __syncthreads, or waits at a shuffle): reported as a deadlock;
//   - a shuffle whose mask is not the whole warp, in a warp with fewer than 32 threads, or whose lanes are
//     not all at the same shuffle (another shuffle, a __syncthreads, an exited lane);
//   - shared memory: every array is filled at each block start with a poison (quiet NaN for floating
//     types, bytes 0xA5 otherwise), so a read of a slot no thread wrote shows up in the results; writes
//     past an array's end are caught by a guard zone checked at block end (by AddressSanitizer in its
//     build, which also catches such reads).
// A construct not listed here (atomics, __ldg, other warp intrinsics, __constant__, dynamic shared memory,
// `<<<...>>>`) does not compile. Not checked: registers per thread and __launch_bounds__ (ignored).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>

// ---- CUDA's global names ----------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct ddf_emu_stream*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Declared with DDF_SHARED(type, name, [dims]) (ddf_cuda.cuh), which knows the array's type and size.
#define __shared__ static_assert(false, "CUDA emulation: declare shared arrays with DDF_SHARED(type, name, dims)");
#define __constant__ static_assert(false, "CUDA emulation: __constant__ is not supported");

#define threadIdx (::ddf_emu::thread_idx())
#define blockIdx (::ddf_emu::block_idx())
#define blockDim (::ddf_emu::block_dim())
#define gridDim (::ddf_emu::grid_dim())
#define __syncthreads() ::ddf_emu::syncthreads(__LINE__)
#define __shfl_down_sync(mask, value, delta) ::ddf_emu::shuffle(mask, value, ::ddf_emu::Shuffle::down, delta, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) \
  ::ddf_emu::shuffle(mask, value, ::ddf_emu::Shuffle::xor_, lane_mask, __LINE__)

#define DDF_LAUNCH(grid, block, shmem, stream, ...) \
  ::ddf_emu::make_launch(grid, block, shmem, stream, #__VA_ARGS__, &__VA_ARGS__)
#define DDF_SHARED(type, name, dims)                                                              \
  using ddf_emu_shared_##name##_t = type dims;                                                    \
  static ::ddf_emu::SharedSlot ddf_emu_slot_##name;                                               \
  ddf_emu_shared_##name##_t& name = ::ddf_emu::shared<ddf_emu_shared_##name##_t>(ddf_emu_slot_##name, #name)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)  // an emulated launch raises its errors itself

namespace ddf_emu {

// Hardware limits, equal on sm_80 (A100) and sm_90 (H100/H200). Shared memory: the static limit (a block
// may use more only after cudaFuncSetAttribute, which the kernels do not call).
constexpr unsigned int kWarpSize = 32;
constexpr unsigned int kMaxThreadsPerBlock = 1024;
constexpr unsigned int kMaxBlockDim[3] = {1024, 1024, 64};
constexpr uint64_t kMaxGridDim[3] = {(uint64_t(1) << 31) - 1, 65535, 65535};
constexpr size_t kMaxSharedPerBlock = 48 * 1024;
constexpr int kMultiprocessors = 132;  // an H200: what grid_size() sizes grids for, by default

// The SM count the launchers see (tests lower it to force many grid-stride iterations on small inputs).
int multiprocessors();
void set_multiprocessors(int count);

enum class Mode { fibers, threads };
void set_mode(Mode mode);
Mode mode();

struct ThreadCtx {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern thread_local const ThreadCtx* tls_thread;
// The traffic build counts the kernels' memory accesses; reading the emulator's own state is not one.
#ifdef DDF_EMU_TRAFFIC
#define DDF_EMU_UNTRACED __attribute__((no_sanitize_address, noinline))
#else
#define DDF_EMU_UNTRACED
#endif
DDF_EMU_UNTRACED inline uint3 thread_idx() { return tls_thread->thread_idx; }
DDF_EMU_UNTRACED inline uint3 block_idx() { return tls_thread->block_idx; }
DDF_EMU_UNTRACED inline dim3 block_dim() { return tls_thread->block_dim; }
DDF_EMU_UNTRACED inline dim3 grid_dim() { return tls_thread->grid_dim; }

void syncthreads(int line);

enum class Shuffle { down, xor_ };
uint64_t shuffle_bits(unsigned int mask, uint64_t bits, Shuffle kind, int arg, int line);

template <typename T>
T shuffle(unsigned int mask, T value, Shuffle kind, int arg, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t), "shuffle of a value over 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle_bits(mask, bits, kind, arg, line);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// One DDF_SHARED declaration (a function-local static): the block it was last allocated for, and where.
struct SharedSlot {
  uint64_t block_serial = 0;
  void* data = nullptr;
};
// The storage of `slot` for the running block, allocated (and filled with `poison`) by the block's first
// thread that reaches the declaration.
void* shared_storage(SharedSlot& slot, size_t bytes, size_t align, const char* name,
                     void (*poison)(void* data, size_t bytes));

template <typename T>
void poison_fill(void* data, size_t bytes) {
  using E = std::remove_all_extents_t<T>;
  if constexpr (std::is_floating_point_v<E> || std::is_same_v<E, c10::Half> || std::is_same_v<E, c10::BFloat16>) {
    const E nan = std::numeric_limits<E>::quiet_NaN();
    for (size_t i = 0; i < bytes / sizeof(E); ++i) std::memcpy(static_cast<char*>(data) + i * sizeof(E), &nan, sizeof(E));
  } else {
    std::memset(data, 0xA5, bytes);
  }
}

template <typename T>
T& shared(SharedSlot& slot, const char* name) {
  return *static_cast<T*>(shared_storage(slot, sizeof(T), alignof(T), name, &poison_fill<T>));
}

// Runs `body` once per thread of every block (checks first; raises on any failure).
void run_grid(const char* kernel, dim3 grid, dim3 block, size_t shmem, const std::function<void()>& body);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t shmem;

  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // converted as a kernel call would
    run_grid(name, grid, block, shmem, [&] { std::apply(kernel, params); });
  }
};

template <typename... P>
Launch<P...> make_launch(dim3 grid, dim3 block, size_t shmem, cudaStream_t, const char* name, void (*kernel)(P...)) {
  return Launch<P...>{kernel, name, grid, block, shmem};
}

}  // namespace ddf_emu
