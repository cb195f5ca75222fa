// What the standalone kernel harnesses of tests/gpu share: the CUDA runtime check, the
// activation type and the copy bandwidth their ratios divide by.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

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

// Device-to-device copy bandwidth on `stream`, read + write (as worker/src/cuda/floors.rs counts
// it: the floors' rate), in GB/s: the median of 10 copies of 2 GiB, each timed alone outside any
// graph (a captured copy runs as a slower copy node).
inline double copy_bandwidth_gbs(cudaStream_t stream) {
    const size_t bytes = 2ull << 30;
    void *a, *b;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<double> ms;
    for (int i = 0; i < 10; ++i) {
        CK(cudaEventRecord(e0, stream));
        CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
        CK(cudaEventRecord(e1, stream));
        CK(cudaEventSynchronize(e1));
        float t;
        CK(cudaEventElapsedTime(&t, e0, e1));
        ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaFree(a));
    CK(cudaFree(b));
    return 2.0 * bytes / (ms[ms.size() / 2] * 1e6);
}
