/* gpu_util.h - shared by the GPU test programs: a CUDA runtime call that fails ends the test program at once,
 * naming the call and the CUDA error (a test harness may exit; the library never does). */
#ifndef MODA_GPU_UTIL_H
#define MODA_GPU_UTIL_H

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>

#define CUDA_OK(call)                                                                                        \
    do {                                                                                                     \
        cudaError_t e_ = (call);                                                                             \
        if (e_ != cudaSuccess) {                                                                             \
            fprintf(stderr, "FATAL %s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(2);                                                                                         \
        }                                                                                                    \
    } while (0)

#endif
