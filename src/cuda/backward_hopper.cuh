/*
 * backward_hopper.cuh - private to the CUDA backward: the sm_90a (wgmma) replacement of the fused
 * non-deterministic sequence pass (src/cuda/backward_hopper.cu), the default there on compute capability 9.x
 * since its first device run (2026-11-23; docs/cuda_backward_notes.md, "Hopper backward"); MODA_CUDA_BWD_HOPPER=0
 * switches back to the mma.sync pass.
 */
#ifndef MODA_CUDA_BACKWARD_HOPPER_CUH
#define MODA_CUDA_BACKWARD_HOPPER_CUH

#include "backward_common.cuh"

/* Whether the Hopper pass replaces bw_launch_mma_fused for this call: MODA_CUDA_BWD_HOPPER not "0", compute
 * capability 9.x with the sm_90a image loaded, f16/bf16, d == dv in {64, 128}, the non-deterministic fused pass
 * without row splits (bp as backward.cu filled it). */
int bw_hopper_use(const moda_problem *p, const bw_params *bp);
/* The launch (dK, dV written; s * dQ added to bp->dqacc); bw_launch_dq_finish still follows it. */
cudaError_t bw_launch_hopper(const bw_params *bp, cudaStream_t stream);
/* The dK/dV-only form for the two-pass (deterministic) path, in place of bw_launch_mma_dkdv (bw_launch_mma_dq
 * still computes dQ): the default unless MODA_CUDA_BWD_HOPPER_DKDV=0 (grid and sanitizers passed on the H100,
 * 2026-11-23), under the same conditions as above except the mode, and without row splits (bp->dkdv_nsplit == 1). dK, dV written, nothing else. */
int bw_hopper_dkdv_use(const moda_problem *p, const bw_params *bp);
cudaError_t bw_launch_hopper_dkdv(const bw_params *bp, cudaStream_t stream);

#endif /* MODA_CUDA_BACKWARD_HOPPER_CUH */
