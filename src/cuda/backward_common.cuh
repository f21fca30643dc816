/*
 * backward_common.cuh - private to the CUDA backward (src/cuda/backward*.cu).
 *
 * The backward runs as a short pipeline on the caller's stream (docs/cuda_backward_notes.md):
 *   1. preprocess:   Delta[row] = <dO, O>                         (fp32 workspace)
 *   2. depth:        dQacc[row] = s * sum over depth keys of dz*kd (fp32 workspace), dKd, dVd
 *   3. sequence, deterministic mode (default): two passes, no atomics
 *      a. dK/dV: key-block-major, each CTA owns its keys (small grids: row splits with fp32 partials,
 *         reduced in split order)
 *      b. dQ: row-block-major, adds dQacc, writes dq
 *      Every output element is produced by exactly one thread in a fixed summation order: bitwise
 *      reproducible run to run.
 *   3'. sequence, non-deterministic mode: one fused key-block-major pass writes dK, dV and adds dQ into
 *      dQacc with fp32 atomics; a last kernel converts dQacc to dq. dK, dV, dKd, dVd stay reproducible; dQ
 *      may differ in the last bits run to run. (With MODA_CUDA_BWD_FUSED_DET=1 the same pass orders the
 *      adds of each row block by key block and is reproducible too.)
 */
#ifndef MODA_CUDA_BACKWARD_COMMON_CUH
#define MODA_CUDA_BACKWARD_COMMON_CUH

#include "common.cuh"

#include <stdint.h>
#include <stdlib.h>

/* Strides of one operand, 64-bit, in the operand's logical dimension order (innermost last). */
typedef struct bw_view {
    char *data; /* byte pointer; element offsets are scaled by the dtype size */
    int dtype;  /* moda_dtype */
    int64_t s0, s1, s2, s3, s4;
} bw_view;

/* Everything a backward kernel needs, passed by value. */
typedef struct bw_params {
    int64_t B, T, Hk, G, d, dv, d0, d1, chunk_size;
    int causal, sequence, chunk, accumulate;
    float scale;      /* s */
    float scale_log2; /* s * log2(e): logits in the exp2 domain */
    bw_view q, k, v, kd, vd, o, lse, dout, dq, dk, dv_, dkd, dvd;
    float *delta; /* [B*T*Hk*G] */
    float *dqacc; /* [B*T*Hk*G, d] depth part of dQ, NULL when no depth slot is visible */
    int dkdv_nsplit, dkdv_rows; /* row splits of the tensor-core dK/dV pass (1: none) and rows per split */
    int dkdv_bn;                /* keys per CTA of that pass (the split reduction needs it) */
    float *dkvpart;             /* [nsplit][B][Hk][T][2d] fp32 partial dK|dV when dkdv_nsplit > 1 */
    int deterministic;          /* fused pass: order the dQ adds of a row block by key block */
    unsigned *dqcnt;            /* fused pass, deterministic: [B][Hk][row blocks] adds done so far */
    int64_t dqcnt_n;            /* counters the preprocessing kernel zeroes (0: none) */
    int dqacc_zero;             /* the preprocessing kernel zeroes dqacc (fused pass without depth slots) */
} bw_params;

#define BW_LOG2E 1.4426950408889634f

/* Row index of (b, t, h, g) in the fp32 workspace arrays. */
static __device__ __forceinline__ int64_t bw_row(const bw_params &p, int64_t b, int64_t t, int64_t h, int64_t g) {
    return ((b * p.T + t) * p.Hk + h) * p.G + g;
}

static __device__ __forceinline__ float bw_load(const bw_view &a, int64_t off) {
    return moda_load_f(a.data, a.dtype, off);
}
static __device__ __forceinline__ void bw_store(const bw_view &a, int64_t off, float x) {
    switch (a.dtype) {
    case MODA_F16: ((__half *)a.data)[off] = __float2half_rn(x); break;
    case MODA_BF16: ((__nv_bfloat16 *)a.data)[off] = __float2bfloat16_rn(x); break;
    default: ((float *)a.data)[off] = x; break;
    }
}

static __device__ __forceinline__ int64_t bw_off4(const bw_view &a, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
    return i0 * a.s0 + i1 * a.s1 + i2 * a.s2 + i3 * a.s3;
}
static __device__ __forceinline__ int64_t bw_off5(const bw_view &a, int64_t i0, int64_t i1, int64_t i2, int64_t i3,
                                                  int64_t i4) {
    return i0 * a.s0 + i1 * a.s1 + i2 * a.s2 + i3 * a.s3 + i4 * a.s4;
}

/* exp2 that maps -inf to +0 (ex2.approx does; the masked and padded logits rely on it). */
static __device__ __forceinline__ float bw_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* 8 consecutive f16/bf16 elements (one 16-byte load) as floats. */
template <typename E> static __device__ __forceinline__ void bw_unpack8(float (&f)[8], uint4 u) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 x = moda_dt<E>::unpack2(w[i]);
        f[2 * i] = x.x;
        f[2 * i + 1] = x.y;
    }
}

/* Whether 16-byte vector accesses of 8 elements work on an operand of ndim dims: aligned base, contiguous
 * last dim, every other stride a multiple of 8 elements. */
static inline int bw_vec_ok(const moda_operand *a, int ndim) {
    if (((uintptr_t)a->data & 15) != 0 || a->stride[ndim - 1] != 1) return 0;
    for (int i = 0; i < ndim - 1; i++)
        if (a->stride[i] % 8 != 0) return 0;
    return 1;
}

/* The row-split dK/dV pass and the warp-per-token depth kernel replace the previous kernels for the shapes
 * they support. 0 here restores the previous kernels everywhere; at run time, MODA_CUDA_BWD_NOSPLIT=1 and
 * MODA_CUDA_BWD_NOTDW=1 do it per process (gpu_test_backward checks both paths, and timings compare them). */
#define BW_NEW_KERNELS 1

/* Whether the new kernel that environment variable `name` can switch off is in use. */
static inline int bw_new_kernel_on(const char *name) {
    const char *e = getenv(name);
    return BW_NEW_KERNELS && !(e && e[0] == '1');
}

/* Fast (tensor-core) launchers, src/cuda/backward_mma.cu. Return cudaSuccess or the launch error. They assume
 * bw_mma_supported() holds. */
int bw_mma_supported(const moda_problem *p);
cudaError_t bw_launch_mma_dkdv(const bw_params *bp, cudaStream_t stream);
cudaError_t bw_launch_mma_dq(const bw_params *bp, cudaStream_t stream);
/* The fused pass (dK, dV and dQ in one key-block-major pass, FlashAttention-2's 5 products): warps per CTA
 * (16 keys each) for this problem, or 0 when the two-pass kernels run instead. It runs in the
 * non-deterministic mode (fp32 atomics for dQ); in the deterministic mode only with
 * MODA_CUDA_BWD_FUSED_DET=1 (ordered adds: bitwise reproducible, measured slower than the two passes);
 * MODA_CUDA_BWD_TWOPASS=1 switches it off in both. Decided from the shape, the mode and those switches; the
 * launch also needs bw_mma_supported(). */
int bw_fused_warps(const moda_problem *p);
/* Query-row step of the tensor-core passes (the fused pass's row block). */
static inline int bw_mma_bm(int64_t d) { return d == 64 ? 64 : 32; }
/* fp32 dQ accumulation (both passes with depth, the fused pass always) and the fused pass's row-block
 * counters; after it, bw_launch_dq_finish converts dqacc into dq. */
cudaError_t bw_launch_mma_fused(const bw_params *bp, cudaStream_t stream); /* 8 warps: bw_fused_warps() */
cudaError_t bw_launch_dq_finish(const bw_params *bp, cudaStream_t stream);
/* Row splits of the dK/dV pass for this shape (1: none; *rows: rows per split) and the fp32 workspace they
 * need; both decided from the shape alone (and the process's switches). */
int bw_dkdv_split(const moda_problem *p, int *rows);
size_t bw_dkdv_split_floats(const moda_problem *p);
/* Token-mode depth stage for f16/bf16, d = dv in {64, 128}, G <= 8, 16-byte aligned rows
 * (src/cuda/backward_depth.cu): the tensor-core kernel, or the warp (SIMT) one for f32 depth gradients and with
 * MODA_CUDA_BWD_NOTDC=1. */
int bw_tdw_supported(const moda_problem *p);
/* Whether the tensor-core kernel suits these gradients (else the warp kernel); bw_launch_tdw runs the one
 * `tdc` names. */
int bw_tdc_use(const bw_params *bp);
cudaError_t bw_launch_tdw(const bw_params *bp, int tdc, cudaStream_t stream);

#endif /* MODA_CUDA_BACKWARD_COMMON_CUH */
