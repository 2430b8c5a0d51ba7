// ddf_cuda.cu compiled against the CUDA emulation (cuda_emu.h): the same source text nvcc compiles.
#include "ddf_cuda.cu"
