// What the standalone kernel harnesses of tests/gpu (lora_kernels_bench.cu,
// decode_step_bench.cu) share: the CUDA runtime check and the activation type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

// Runs a CUDA runtime call; on an error, prints it with the call and the line, and exits 1.
#define CK(x)                                                                               \
    do {                                                                                    \
        cudaError_t e = (x);                                                                \
        if (e != cudaSuccess) {                                                             \
            printf("CUDA error %s at line %d: %s\n", #x, __LINE__, cudaGetErrorString(e)); \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

typedef __nv_bfloat16 bf;
