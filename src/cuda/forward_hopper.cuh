/*
 * forward_hopper.cuh - the sm_90a forward's two entry points (forward_hopper.cu), for api.cu's dispatch only.
 * Kept out of common.cuh so that only the files that use them see them.
 */
#ifndef MODA_CUDA_FORWARD_HOPPER_CUH
#define MODA_CUDA_FORWARD_HOPPER_CUH

#include "common.cuh"

/* 1 when the current device is compute capability 9.x, the loaded kernel image is the sm_90a body, and the
 * problem is f16/bf16 with d == dv in {64, 128}, a positive scale and TMA-legal views. */
int moda_cuda_hopper_forward_supports(const moda_problem *p);
/* Assumes supports() said 1 and at least one query row. Sets *launched = 0 and launches nothing when the driver
 * refuses a tensor map of the views (the caller then takes the mma.sync path). */
moda_status moda_cuda_hopper_forward(const moda_problem *p, cudaStream_t stream, int *launched);

#endif /* MODA_CUDA_FORWARD_HOPPER_CUH */
