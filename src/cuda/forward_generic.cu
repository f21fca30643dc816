/*
 * forward_generic.cu - the MoDA forward for every case the tensor-core kernel does not take: any d, dv up to
 * 256 (dv != d included), f32 storage, unaligned pointers or strides. Slower, but the same function
 * (spec.md §2) with fp32 arithmetic throughout.
 *
 * One warp per query row. Keys come in chunks of 32, lane j owning key j: the lane computes the whole logit
 * (q is staged in shared memory, pre-scaled into log2 units), the warp merges the chunk into the row's ONE
 * online-softmax state, then every lane accumulates its dv/32 output columns over the chunk's keys with the
 * probabilities and value-row offsets broadcast by shuffles. Depth keys (the (token, slot) pairs the row
 * sees) come first, then the sequence keys.
 */
#include "common.cuh"

#include <math.h>

namespace {

constexpr int GEN_WARPS = 4;
constexpr int GEN_MAXD = 256;

struct gen_params : moda_fwd_operands {
    int64_t T, Hk, G, C, d0, L, rows;
    int d, dv;
    int causal, sequence, chunk;
    float scale_log2;
};

struct gen_state {
    float m, l;
    float acc[GEN_MAXD / 32];
};

/* Merges one chunk of up to 32 keys (lane j: logit z, value-row offset voff; valid for j < n). */
template <typename T>
__device__ __forceinline__ void gen_merge(gen_state &st, float z, int64_t voff, int n, const T *vbase, int dv,
                                          int lane) {
    const float cm = moda_warp_max(z);
    const float mnew = fmaxf(st.m, cm);
    if (mnew == -INFINITY) return; /* nothing visible yet */
    const float alpha = exp2f(st.m - mnew);
    const float pr = exp2f(z - mnew);
    st.l = st.l * alpha + moda_warp_sum(pr);
    st.m = mnew;
#pragma unroll
    for (int e = 0; e < GEN_MAXD / 32; e++) st.acc[e] *= alpha;
    for (int j = 0; j < n; j++) {
        const float pj = __shfl_sync(0xffffffffu, pr, j);
        const int64_t off = __shfl_sync(0xffffffffu, voff, j);
        const T *vrow = vbase + off;
#pragma unroll
        for (int e = 0; e < GEN_MAXD / 32; e++) {
            const int c = lane + 32 * e;
            if (c < dv) st.acc[e] += pj * moda_dt<T>::to_f(vrow[c]);
        }
    }
}

template <typename T>
__device__ __forceinline__ float gen_dot(const float *sq, const T *krow, int d) {
    float a = 0.f;
    for (int i = 0; i < d; i++) a += sq[i] * moda_dt<T>::to_f(krow[i]);
    return a;
}

template <typename T> __global__ void __launch_bounds__(GEN_WARPS * 32) generic_fwd_kernel(const gen_params p) {
    __shared__ float sq_all[GEN_WARPS][GEN_MAXD];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t row = (int64_t)blockIdx.x * GEN_WARPS + warp;
    if (row >= p.rows) return; /* warp-uniform: no block-wide barrier below */
    const int64_t NR = p.T * p.G;
    const int64_t R = row % NR, bh = row / NR;
    const int64_t b = bh / p.Hk, h = bh % p.Hk;
    const int64_t t = R / p.G, g = R % p.G;

    float *sq = sq_all[warp];
    const T *qrow = reinterpret_cast<const T *>(p.q) + b * p.qs[0] + t * p.qs[1] + h * p.qs[2] + g * p.qs[3];
    for (int i = lane; i < p.d; i += 32) sq[i] = moda_dt<T>::to_f(qrow[i]) * p.scale_log2;
    __syncwarp();

    gen_state st;
    st.m = -INFINITY;
    st.l = 0.f;
#pragma unroll
    for (int e = 0; e < GEN_MAXD / 32; e++) st.acc[e] = 0.f;

    if (p.L > 0) {
        const int64_t u0 = p.chunk ? (t / p.C) * p.C : t;
        const int64_t nk = (t - u0 + 1) * p.L;
        const T *kdb = reinterpret_cast<const T *>(p.kd) + b * p.kds[0] + h * p.kds[3];
        const T *vdb = reinterpret_cast<const T *>(p.vd) + b * p.vds[0] + h * p.vds[3];
        for (int64_t base = 0; base < nk; base += 32) {
            const int64_t kx = base + lane;
            float z = -INFINITY;
            int64_t voff = 0;
            if (kx < nk) {
                const int64_t tok = u0 + kx / p.L, slot = p.d0 + kx % p.L;
                z = gen_dot(sq, kdb + tok * p.kds[1] + slot * p.kds[2], p.d);
                voff = tok * p.vds[1] + slot * p.vds[2];
            }
            gen_merge<T>(st, z, voff, (int)(nk - base < 32 ? nk - base : 32), vdb, p.dv, lane);
        }
    }
    if (p.sequence) {
        const int64_t j1 = p.causal ? t + 1 : p.T;
        const T *kb = reinterpret_cast<const T *>(p.k) + b * p.ks[0] + h * p.ks[2];
        const T *vb = reinterpret_cast<const T *>(p.v) + b * p.vs[0] + h * p.vs[2];
        for (int64_t base = 0; base < j1; base += 32) {
            const int64_t j = base + lane;
            float z = -INFINITY;
            int64_t voff = 0;
            if (j < j1) {
                z = gen_dot(sq, kb + j * p.ks[1], p.d);
                voff = j * p.vs[1];
            }
            gen_merge<T>(st, z, voff, (int)(j1 - base < 32 ? j1 - base : 32), vb, p.dv, lane);
        }
    }

    const float inv = st.l > 0.f ? 1.f / st.l : 0.f;
    T *orow = reinterpret_cast<T *>(p.o) + b * p.os[0] + t * p.os[1] + h * p.os[2] + g * p.os[3];
#pragma unroll
    for (int e = 0; e < GEN_MAXD / 32; e++) {
        const int c = lane + 32 * e;
        if (c < p.dv) orow[c] = moda_dt<T>::from_f(st.acc[e] * inv);
    }
    if (p.lse && lane == 0)
        p.lse[b * p.lses[0] + t * p.lses[1] + h * p.lses[2] + g * p.lses[3]] =
            st.l > 0.f ? (st.m + log2f(st.l)) * 0.69314718055994531f : -INFINITY;
}

} // namespace

moda_status moda_cuda_generic_forward(const moda_problem *p, cudaStream_t stream) {
    gen_params prm;
    moda_fwd_operands_fill(&prm, p);
    prm.T = p->T;
    prm.Hk = p->Hk;
    prm.G = p->G;
    prm.C = p->chunk ? p->chunk_size : 1;
    prm.d0 = p->d0;
    prm.L = moda_problem_has_depth(p) ? moda_problem_slots(p) : 0;
    prm.rows = p->B * p->Hk * p->T * p->G;
    prm.d = (int)p->d;
    prm.dv = (int)p->dv;
    prm.causal = p->causal;
    prm.sequence = p->sequence;
    prm.chunk = p->chunk;
    prm.scale_log2 = (float)(p->scale * 1.4426950408889634);

    const int64_t nblocks = (prm.rows + GEN_WARPS - 1) / GEN_WARPS;
    if (nblocks > 2147483647LL)
        return moda_fail(MODA_ERR_UNSUPPORTED, "CUDA forward: %lld query rows exceed the grid limit",
                         (long long)prm.rows);
    const unsigned grid = (unsigned)nblocks;
    switch (p->dtype) {
    case MODA_F16: generic_fwd_kernel<__half><<<grid, GEN_WARPS * 32, 0, stream>>>(prm); break;
    case MODA_BF16: generic_fwd_kernel<__nv_bfloat16><<<grid, GEN_WARPS * 32, 0, stream>>>(prm); break;
    default: generic_fwd_kernel<float><<<grid, GEN_WARPS * 32, 0, stream>>>(prm); break;
    }
    MODA_CUDA_TRY_LAUNCH("generic_fwd_kernel");
    return MODA_OK;
}
