/*
 * common.cuh - private helpers of the CUDA backend, shared by the forward (forward*.cu) and the backward
 * (backward*.cu): status mapping for runtime errors, storage-dtype traits, warp reductions, and thin wrappers
 * over the sm_80 instructions the kernels are built from (mma.sync m16n8k16, ldmatrix, cp.async).
 *
 * Everything here is static inline / __device__ so that each .cu file compiles on its own (no separable
 * compilation). Nothing here prints or aborts: host helpers return a moda_status with moda_fail's message.
 */
#ifndef MODA_CUDA_COMMON_CUH
#define MODA_CUDA_COMMON_CUH

#include "internal.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

/* ---------------------------------------------------------------------------------------------------------
 * Host: runtime errors -> MODA_ERR_DEVICE_FAILURE with the runtime's own words and the call site.
 * ------------------------------------------------------------------------------------------------------- */
static inline moda_status moda_cuda_status(cudaError_t err, const char *what, const char *file, int line) {
    if (err == cudaSuccess) return MODA_OK;
    return moda_fail(MODA_ERR_DEVICE_FAILURE, "CUDA error in %s (%s:%d): %s (%s)", what, file, line,
                     cudaGetErrorName(err), cudaGetErrorString(err));
}
/* `MODA_CUDA_TRY(cudaFoo(...));` inside a function returning moda_status. */
#define MODA_CUDA_TRY(call)                                                          \
    do {                                                                             \
        moda_status moda_st_ = moda_cuda_status((call), #call, __FILE__, __LINE__);  \
        if (moda_st_ != MODA_OK) return moda_st_;                                    \
    } while (0)
/* After a launch: a bad configuration surfaces here, asynchronous faults at the caller's next sync. */
#define MODA_CUDA_TRY_LAUNCH(name) \
    do { \
        moda_status moda_st_ = moda_cuda_status(cudaGetLastError(), "launch of " name, __FILE__, __LINE__); \
        if (moda_st_ != MODA_OK) return moda_st_; \
    } while (0)

/* cudaGetLastError clears a non-sticky error; called where a failing probe must not leak into the next
 * launch check (e.g. cudaPointerGetAttributes on a host pointer of an old runtime). */
static inline void moda_cuda_clear_error(void) { (void)cudaGetLastError(); }

/* ---------------------------------------------------------------------------------------------------------
 * Storage dtypes. Kernels are templates over the element type only; these traits give the float
 * conversions and the packed-pair forms the mma operands use.
 * ------------------------------------------------------------------------------------------------------- */
template <typename T> struct moda_dt;
template <> struct moda_dt<float> {
    static __device__ __forceinline__ float to_f(float x) { return x; }
    static __device__ __forceinline__ float from_f(float x) { return x; }
};
template <> struct moda_dt<__half> {
    static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
    static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
    /* Two floats -> one 32-bit register holding (lo, hi) as the mma fragments expect. */
    static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    static __device__ __forceinline__ float2 unpack2(uint32_t u) {
        __half2 h = *reinterpret_cast<__half2 *>(&u);
        return __half22float2(h);
    }
};
template <> struct moda_dt<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
    static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    static __device__ __forceinline__ float2 unpack2(uint32_t u) {
        __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162 *>(&u);
        return __bfloat1622float2(h);
    }
};

/* Element load from any storage dtype by moda_dtype at run time (generic/slow paths only). */
static __device__ __forceinline__ float moda_load_f(const void *base, int dtype, int64_t off) {
    switch (dtype) {
    case MODA_F16: return __half2float(reinterpret_cast<const __half *>(base)[off]);
    case MODA_BF16: return __bfloat162float(reinterpret_cast<const __nv_bfloat16 *>(base)[off]);
    default: return reinterpret_cast<const float *>(base)[off];
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * Warp reductions (full warp) and quad reductions (the 4 lanes that share an mma accumulator row).
 * ------------------------------------------------------------------------------------------------------- */
static __device__ __forceinline__ float moda_warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
static __device__ __forceinline__ float moda_warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
static __device__ __forceinline__ float moda_quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}
static __device__ __forceinline__ float moda_quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    return x;
}

/* ---------------------------------------------------------------------------------------------------------
 * mma.sync m16n8k16, fp32 accumulate. Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"):
 *   A (16x16, row):  a0 (r, k..k+1) a1 (r+8, k..k+1) a2 (r, k+8..k+9) a3 (r+8, k+8..k+9), r = lane/4,
 *                    k = 2*(lane%4)
 *   B (16x8, col):   b0 (k..k+1, n) b1 (k+8..k+9, n), n = lane/4
 *   C (16x8):        c0,c1 (r, 2*(lane%4)+{0,1})  c2,c3 (r+8, same columns)
 * ------------------------------------------------------------------------------------------------------- */
template <typename T> struct moda_mma;
template <> struct moda_mma<__half> {
    static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct moda_mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

/* ---------------------------------------------------------------------------------------------------------
 * ldmatrix: four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i. The .trans form
 * delivers the transpose (used for V, stored [key][dv], as the B operand of P·V).
 * ------------------------------------------------------------------------------------------------------- */
static __device__ __forceinline__ uint32_t moda_smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
static __device__ __forceinline__ void moda_ldmatrix_x4(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
static __device__ __forceinline__ void moda_ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
static __device__ __forceinline__ void moda_ldmatrix_x2(uint32_t r[2], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
static __device__ __forceinline__ void moda_ldmatrix_x2_trans(uint32_t r[2], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}

/* ---------------------------------------------------------------------------------------------------------
 * cp.async (16 bytes, L2-cached, bypassing L1). With valid == false the 16 destination bytes are zero-filled
 * and nothing is read, so out-of-range rows need no separate store.
 * ------------------------------------------------------------------------------------------------------- */
static __device__ __forceinline__ void moda_cp_async16(uint32_t dst, const void *src, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
static __device__ __forceinline__ void moda_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> static __device__ __forceinline__ void moda_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* Swizzled offset (elements) of (row, col) in a shared tile of rows of D b16 elements (D % 64 == 0): the
 * 16-byte chunk index is XORed with row % 8 so that the 8 row addresses of one ldmatrix hit 8 distinct
 * bank groups instead of one. */
template <int D> static __device__ __forceinline__ int moda_swz(int row, int col) {
    return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

/* ---------------------------------------------------------------------------------------------------------
 * The forward's operands as kernel parameters: base pointers and element strides (spec.md §1 order). Both
 * forward kernels' parameter structs derive from this one.
 * ------------------------------------------------------------------------------------------------------- */
struct moda_fwd_operands {
    const void *q, *k, *v, *kd, *vd;
    void *o;
    float *lse; /* NULL: no LSE output */
    int64_t qs[5], ks[4], vs[4], kds[5], vds[5], os[5], lses[4];
};
static inline void moda_fwd_operands_fill(moda_fwd_operands *a, const moda_problem *p) {
    a->q = p->q.data;
    a->k = p->k.data;
    a->v = p->v.data;
    a->kd = p->kd.data;
    a->vd = p->vd.data;
    a->o = p->o.data;
    a->lse = (float *)p->lse.data;
    for (int i = 0; i < 5; i++) {
        a->qs[i] = p->q.stride[i];
        a->kds[i] = p->kd.stride[i];
        a->vds[i] = p->vd.stride[i];
        a->os[i] = p->o.stride[i];
    }
    for (int i = 0; i < 4; i++) {
        a->ks[i] = p->k.stride[i];
        a->vs[i] = p->v.stride[i];
        a->lses[i] = p->lse.stride[i];
    }
}

/* The row-block view of a forward problem that both tensor-core kernels take: rows R = t*G + g of one (b, h),
 * visible slots [d0, d0 + L), and s*log2(e) for the exp2 softmax. */
struct moda_fwd_shape : moda_fwd_operands {
    int64_t Hk, d0;
    int T, G, C, NR;             /* C: chunk size (1 in token mode); NR = T*G rows per (b, h) */
    int L;                       /* visible slots d1 - d0 (0: no depth part) */
    int causal, sequence, chunk;
    int64_t nrb;                 /* row blocks per (b, h), set by the launcher */
    float scale_log2;            /* s * log2(e), > 0 on the tensor-core paths */
};
static inline void moda_fwd_shape_fill(moda_fwd_shape *a, const moda_problem *p) {
    moda_fwd_operands_fill(a, p);
    a->T = (int)p->T;
    a->Hk = p->Hk;
    a->G = (int)p->G;
    a->C = p->chunk ? (int)(p->chunk_size < p->T ? p->chunk_size : p->T) : 1;
    a->d0 = p->d0;
    a->NR = (int)(p->T * p->G);
    a->L = moda_problem_has_depth(p) ? (int)moda_problem_slots(p) : 0;
    a->causal = p->causal;
    a->sequence = p->sequence;
    a->chunk = p->chunk;
    a->scale_log2 = (float)(p->scale * 1.4426950408889634);
    a->nrb = 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * Forward launchers (forward_fast.cu, forward_generic.cu), called by api.cu's dispatch only. Both assume a
 * problem that passed moda_cuda_check and has at least one query row.
 * ------------------------------------------------------------------------------------------------------- */
int moda_cuda_fast_forward_supports(const moda_problem *p); /* f16/bf16, d == dv in {64,128}, 16-B aligned */
moda_status moda_cuda_fast_forward(const moda_problem *p, cudaStream_t stream);
moda_status moda_cuda_generic_forward(const moda_problem *p, cudaStream_t stream); /* any d, dv <= 256 */

#endif /* MODA_CUDA_COMMON_CUH */
