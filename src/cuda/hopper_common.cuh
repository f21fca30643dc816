/*
 * hopper_common.cuh - the sm_90a primitives both Hopper kernels use (forward_hopper.cu, backward_hopper.cu):
 * mbarriers, the proxy fence, wgmma group control, the shared-memory matrix descriptor and the RS m64n64k16
 * product (A from registers, B MN-major). Only for code under __CUDA_ARCH_FEAT_SM90_ALL.
 */
#ifndef MODA_HOPPER_COMMON_CUH
#define MODA_HOPPER_COMMON_CUH

#include <stdint.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

static __device__ __forceinline__ void moda_mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
/* The full/empty mbarrier pairs of a STAGES-deep ring (8 bytes apart), initialised by one thread and fenced so
 * that the async proxy sees them; the caller's __syncthreads publishes them to the CTA. */
static __device__ __forceinline__ void moda_mbar_ring_init(uint32_t bar_full, uint32_t bar_empty, int stages,
                                                           uint32_t full_count, uint32_t empty_count) {
    for (int s = 0; s < stages; s++) {
        moda_mbar_init(bar_full + 8 * s, full_count);
        moda_mbar_init(bar_empty + 8 * s, empty_count);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
static __device__ __forceinline__ void moda_mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
static __device__ __forceinline__ void moda_mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
static __device__ __forceinline__ void moda_mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile("{\n"
                 ".reg .pred P1;\n"
                 "LAB_WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
                 "@!P1 bra LAB_WAIT;\n"
                 "}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}
/* generic-proxy writes (cp.async, st.shared) made visible to the async proxy (wgmma operand reads, TMA) */
static __device__ __forceinline__ void moda_fence_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

static __device__ __forceinline__ void moda_wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
static __device__ __forceinline__ void moda_wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N> static __device__ __forceinline__ void moda_wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* Keeps the compiler from moving accumulator reads/writes across the asynchronous wgmma window. */
template <int N> static __device__ __forceinline__ void moda_reg_fence(float (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(r[i][e])::"memory");
}
/* The same fence for packed A fragments, kept live and untouched while a wgmma reads them from registers. */
template <int N> static __device__ __forceinline__ void moda_reg_fence(uint32_t (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+r"(r[i][e])::"memory");
}
/* The asm operand lists of an m64nN fp32 accumulator float d[N/8][4] (N = 32, 64, 128), in register order. */
#define MODA_HOP_ACC4(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define MODA_HOP_ACC_N32(d) MODA_HOP_ACC4(d, 0), MODA_HOP_ACC4(d, 1), MODA_HOP_ACC4(d, 2), MODA_HOP_ACC4(d, 3)
#define MODA_HOP_ACC_N64(d) \
    MODA_HOP_ACC_N32(d), MODA_HOP_ACC4(d, 4), MODA_HOP_ACC4(d, 5), MODA_HOP_ACC4(d, 6), MODA_HOP_ACC4(d, 7)
#define MODA_HOP_ACC_N128(d) \
    MODA_HOP_ACC_N64(d), MODA_HOP_ACC4(d, 8), MODA_HOP_ACC4(d, 9), MODA_HOP_ACC4(d, 10), MODA_HOP_ACC4(d, 11), \
        MODA_HOP_ACC4(d, 12), MODA_HOP_ACC4(d, 13), MODA_HOP_ACC4(d, 14), MODA_HOP_ACC4(d, 15)
/* Shared memory descriptor: 128B swizzle (layout type 1), SBO = 1024 bytes between 8-row groups (K-major: 8
 * M/N rows; MN-major: 8 K rows), LBO unused for these shapes (K-major swizzled; MN-major with N = 64). */
static __device__ __forceinline__ uint64_t moda_sdesc(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

/* m64n64k16 with A from registers and B (shared memory) MN-major: the transpose bit set, always accumulating.
 * One definition per storage type (the type is part of the instruction name). */
#define MODA_HOP_WGMMA_RS_N64(NAME, TY) \
    static __device__ __forceinline__ void NAME(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db) { \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" \
                     "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
                     "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31" \
                     "}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n" \
                     : MODA_HOP_ACC_N64(d) \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1)); \
    }

#endif /* sm_90a */

#endif /* MODA_HOPPER_COMMON_CUH */
