/*
 * backward.cu - the CUDA MoDA backward (spec.md §3): host launcher, the Delta preprocessing kernel, the
 * depth-gradient kernels, and generic (any head dim, any dtype) sequence kernels that the tensor-core path in
 * backward_mma.cu replaces for f16/bf16 with d = dv in {64, 128}.
 *
 * Determinism (p->deterministic, the default): no kernel uses atomics; every output element is written by one
 * thread after a sum in a fixed order, and the stages communicate only through the caller's workspace in
 * stream order, so the results are bitwise identical run to run. The non-deterministic mode replaces the two
 * tensor-core sequence passes by one fused pass that adds dQ with fp32 atomics (backward_mma.cu).
 */
#include "backward_common.cuh"
#include "backward_hopper.cuh"

#include <stddef.h>
#include <stdint.h>

/* Generic kernels keep a row of up to BW_GEN_MAXC * 32 elements spread over a warp's lanes. */
#define BW_GEN_MAXC 8
#define BW_GEN_MAXD (BW_GEN_MAXC * 32)
#define BW_WARPS 4

/* ------------------------------------------------------------------------------------------------------ */
/* Delta[row] = <dO[row], O[row]> in fp32 (spec.md §3); one warp per row.                                  */
/* ------------------------------------------------------------------------------------------------------ */
/* The fused pass's row-block counters start at zero on every call (grid-stride, any grid). */
static __device__ __forceinline__ void bw_zero_dqcnt(const bw_params &p) {
    const int64_t nthreads = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.dqcnt_n; i += nthreads) p.dqcnt[i] = 0u;
}

__global__ void bw_preprocess_kernel(bw_params p) {
    const int lane = threadIdx.x & 31;
    const int64_t rows = p.B * p.T * p.Hk * p.G;
    const int64_t nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += nwarps) {
        const int64_t g = row % p.G, h = (row / p.G) % p.Hk, t = (row / (p.G * p.Hk)) % p.T;
        const int64_t b = row / (p.G * p.Hk * p.T);
        const int64_t oo = bw_off4(p.o, b, t, h, g), od = bw_off4(p.dout, b, t, h, g);
        float acc = 0.f;
        for (int64_t i = lane; i < p.dv; i += 32)
            acc += bw_load(p.o, oo + i * p.o.s4) * bw_load(p.dout, od + i * p.dout.s4);
        acc = moda_warp_sum(acc);
        if (lane == 0) p.delta[row] = acc;
        if (p.dqacc_zero)
            for (int64_t i = lane; i < p.d; i += 32) p.dqacc[row * p.d + i] = 0.f;
    }
    bw_zero_dqcnt(p);
}

/* The same for f16/bf16 O and dO with dv in {64, 128} and 16-byte aligned rows: DV/8 lanes per row, one
 * 16-byte load each, so a warp covers 32/(DV/8) rows per step. The warp-per-row form above issues 2-byte
 * loads and ran S1's 268 MB at 0.37 TB/s (0.72 ms, ncu, 2026-11-23). */
template <typename E, int DV> __global__ void bw_preprocess_vec_kernel(bw_params p) {
    constexpr int LPR = DV / 8, RPW = 32 / LPR;
    const int lane = threadIdx.x & 31, sub = lane / LPR, col = (lane % LPR) * 8;
    const int64_t rows = p.B * p.T * p.Hk * p.G;
    const int64_t nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t rb = (((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * RPW; rb < rows; rb += nwarps * RPW) {
        const int64_t row = rb + sub;
        float acc = 0.f;
        if (row < rows) {
            const int64_t g = row % p.G, h = (row / p.G) % p.Hk, t = (row / (p.G * p.Hk)) % p.T;
            const int64_t b = row / (p.G * p.Hk * p.T);
            float o[8], d[8];
            bw_unpack8<E>(o, *(const uint4 *)((const E *)p.o.data + bw_off4(p.o, b, t, h, g) + col));
            bw_unpack8<E>(d, *(const uint4 *)((const E *)p.dout.data + bw_off4(p.dout, b, t, h, g) + col));
#pragma unroll
            for (int i = 0; i < 8; i++) acc += o[i] * d[i];
        }
#pragma unroll
        for (int o = 1; o < LPR; o <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (row < rows) {
            if (lane % LPR == 0) p.delta[row] = acc;
            if (p.dqacc_zero) { /* d == dv here */
                float4 *z = (float4 *)(p.dqacc + row * DV + col);
                z[0] = z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
    }
    bw_zero_dqcnt(p);
}

/* Loads the lane's share of a row of n elements (element i = lane + 32c) into registers as float. */
static __device__ __forceinline__ void bw_gen_load_row(float (&r)[BW_GEN_MAXC], const bw_view &a, int64_t base,
                                                       int64_t stride, int64_t n, int lane) {
#pragma unroll
    for (int c = 0; c < BW_GEN_MAXC; c++) {
        const int64_t i = lane + 32 * c;
        r[c] = i < n ? bw_load(a, base + i * stride) : 0.f;
    }
}
static __device__ __forceinline__ float bw_gen_dot(const float (&x)[BW_GEN_MAXC], const float (&y)[BW_GEN_MAXC]) {
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < BW_GEN_MAXC; c++) s += x[c] * y[c];
    return moda_warp_sum(s);
}

/* The scalar (probability, dz) pair of one row against one key, given the key and value rows in registers. */
static __device__ __forceinline__ void bw_gen_row_key(const bw_params &p, const float (&q)[BW_GEN_MAXC],
                                                      const float (&dO)[BW_GEN_MAXC], const float (&kr)[BW_GEN_MAXC],
                                                      const float (&vr)[BW_GEN_MAXC], float lse, float delta,
                                                      float *prob, float *dz) {
    const float z = bw_gen_dot(q, kr) * p.scale;
    const float pr = expf(z - lse);
    const float dp = bw_gen_dot(dO, vr);
    *prob = pr;
    *dz = pr * (dp - delta);
}

/* One key (kr, vr) against the G heads of tokens [t0, t1) of (b, h): adds dz*q to dk and p*dO to dvv. The walk
 * of both generic key-major kernels (sequence keys and depth slots). */
static __device__ __forceinline__ void bw_gen_key_rows(const bw_params &p, int64_t b, int64_t h, int64_t t0, int64_t t1,
                                                       const float (&kr)[BW_GEN_MAXC], const float (&vr)[BW_GEN_MAXC],
                                                       float (&dk)[BW_GEN_MAXC], float (&dvv)[BW_GEN_MAXC], int lane) {
    float q[BW_GEN_MAXC], dO[BW_GEN_MAXC];
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t g = 0; g < p.G; g++) {
            bw_gen_load_row(q, p.q, bw_off4(p.q, b, t, h, g), p.q.s4, p.d, lane);
            bw_gen_load_row(dO, p.dout, bw_off4(p.dout, b, t, h, g), p.dout.s4, p.dv, lane);
            const float lse = bw_load(p.lse, bw_off4(p.lse, b, t, h, g));
            float pr, dz;
            bw_gen_row_key(p, q, dO, kr, vr, lse, p.delta[bw_row(p, b, t, h, g)], &pr, &dz);
#pragma unroll
            for (int c = 0; c < BW_GEN_MAXC; c++) {
                dk[c] += dz * q[c];
                dvv[c] += pr * dO[c];
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* Generic sequence dK, dV: one warp owns one key j of one (b, h) and walks every row that sees it.        */
/* ------------------------------------------------------------------------------------------------------ */
__global__ void bw_generic_dkdv_kernel(bw_params p) {
    const int lane = threadIdx.x & 31;
    const int64_t keys = p.B * p.Hk * p.T;
    const int64_t nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < keys; w += nwarps) {
        const int64_t j = w % p.T, h = (w / p.T) % p.Hk, b = w / (p.T * p.Hk);
        float kr[BW_GEN_MAXC], vr[BW_GEN_MAXC], dk[BW_GEN_MAXC], dvv[BW_GEN_MAXC];
        bw_gen_load_row(kr, p.k, bw_off4(p.k, b, j, h, 0), p.k.s3, p.d, lane);
        bw_gen_load_row(vr, p.v, bw_off4(p.v, b, j, h, 0), p.v.s3, p.dv, lane);
#pragma unroll
        for (int c = 0; c < BW_GEN_MAXC; c++) dk[c] = dvv[c] = 0.f;
        bw_gen_key_rows(p, b, h, p.causal ? j : 0, p.T, kr, vr, dk, dvv, lane);
        const int64_t ok = bw_off4(p.dk, b, j, h, 0), ov = bw_off4(p.dv_, b, j, h, 0);
#pragma unroll
        for (int c = 0; c < BW_GEN_MAXC; c++) {
            const int64_t i = lane + 32 * c;
            if (i < p.d) bw_store(p.dk, ok + i * p.dk.s3, dk[c] * p.scale);
            if (i < p.dv) bw_store(p.dv_, ov + i * p.dv_.s3, dvv[c]);
        }
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* Generic dQ: one warp per row; the sequence part plus the depth part that the depth stage left in dqacc. */
/* ------------------------------------------------------------------------------------------------------ */
__global__ void bw_generic_dq_kernel(bw_params p) {
    const int lane = threadIdx.x & 31;
    const int64_t rows = p.B * p.T * p.Hk * p.G;
    const int64_t nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += nwarps) {
        const int64_t g = row % p.G, h = (row / p.G) % p.Hk, t = (row / (p.G * p.Hk)) % p.T;
        const int64_t b = row / (p.G * p.Hk * p.T);
        float acc[BW_GEN_MAXC];
#pragma unroll
        for (int c = 0; c < BW_GEN_MAXC; c++) acc[c] = 0.f;
        if (p.sequence) {
            float q[BW_GEN_MAXC], dO[BW_GEN_MAXC], kr[BW_GEN_MAXC], vr[BW_GEN_MAXC];
            bw_gen_load_row(q, p.q, bw_off4(p.q, b, t, h, g), p.q.s4, p.d, lane);
            bw_gen_load_row(dO, p.dout, bw_off4(p.dout, b, t, h, g), p.dout.s4, p.dv, lane);
            const float lse = bw_load(p.lse, bw_off4(p.lse, b, t, h, g));
            const float delta = p.delta[row];
            const int64_t j1 = p.causal ? t + 1 : p.T;
            for (int64_t j = 0; j < j1; j++) {
                bw_gen_load_row(kr, p.k, bw_off4(p.k, b, j, h, 0), p.k.s3, p.d, lane);
                bw_gen_load_row(vr, p.v, bw_off4(p.v, b, j, h, 0), p.v.s3, p.dv, lane);
                float pr, dz;
                bw_gen_row_key(p, q, dO, kr, vr, lse, delta, &pr, &dz);
#pragma unroll
                for (int c = 0; c < BW_GEN_MAXC; c++) acc[c] += dz * kr[c];
            }
        }
        const int64_t oq = bw_off4(p.dq, b, t, h, g);
#pragma unroll
        for (int c = 0; c < BW_GEN_MAXC; c++) {
            const int64_t i = lane + 32 * c;
            if (i < p.d) {
                const float depth = p.dqacc ? p.dqacc[row * p.d + i] : 0.f;
                bw_store(p.dq, oq + i * p.dq.s4, acc[c] * p.scale + depth);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* Depth part of dQ in any depth mode: one warp per row walks the depth slots D(t) (spec.md §2).           */
/* ------------------------------------------------------------------------------------------------------ */
__global__ void bw_generic_depth_dq_kernel(bw_params p) {
    const int lane = threadIdx.x & 31;
    const int64_t rows = p.B * p.T * p.Hk * p.G;
    const int64_t nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < rows; row += nwarps) {
        const int64_t g = row % p.G, h = (row / p.G) % p.Hk, t = (row / (p.G * p.Hk)) % p.T;
        const int64_t b = row / (p.G * p.Hk * p.T);
        float q[BW_GEN_MAXC], dO[BW_GEN_MAXC], kr[BW_GEN_MAXC], vr[BW_GEN_MAXC], acc[BW_GEN_MAXC];
        bw_gen_load_row(q, p.q, bw_off4(p.q, b, t, h, g), p.q.s4, p.d, lane);
        bw_gen_load_row(dO, p.dout, bw_off4(p.dout, b, t, h, g), p.dout.s4, p.dv, lane);
        const float lse = bw_load(p.lse, bw_off4(p.lse, b, t, h, g));
        const float delta = p.delta[row];
#pragma unroll
        for (int c = 0; c < BW_GEN_MAXC; c++) acc[c] = 0.f;
        const int64_t u0 = p.chunk ? (t / p.chunk_size) * p.chunk_size : t;
        for (int64_t u = u0; u <= t; u++) {
            for (int64_t l = p.d0; l < p.d1; l++) {
                bw_gen_load_row(kr, p.kd, bw_off5(p.kd, b, u, l, h, 0), p.kd.s4, p.d, lane);
                bw_gen_load_row(vr, p.vd, bw_off5(p.vd, b, u, l, h, 0), p.vd.s4, p.dv, lane);
                float pr, dz;
                bw_gen_row_key(p, q, dO, kr, vr, lse, delta, &pr, &dz);
#pragma unroll
                for (int c = 0; c < BW_GEN_MAXC; c++) acc[c] += dz * kr[c];
            }
        }
#pragma unroll
        for (int c = 0; c < BW_GEN_MAXC; c++) {
            const int64_t i = lane + 32 * c;
            if (i < p.d) p.dqacc[row * p.d + i] = acc[c] * p.scale;
        }
    }
}

/* Writes one depth-gradient element: overwrite, or add into what the caller's buffer holds. */
static __device__ __forceinline__ void bw_store_depth_grad(const bw_params &p, const bw_view &a, int64_t off, float x) {
    if (p.accumulate) x += bw_load(a, off);
    bw_store(a, off, x);
}

/* ------------------------------------------------------------------------------------------------------ */
/* dKd, dVd in any depth mode: one warp owns one slot (b, u, l, h) and walks the rows that see it: the G    */
/* heads of token u (token mode) or of every token t in [u, end of u's chunk) (chunk mode).                 */
/* ------------------------------------------------------------------------------------------------------ */
__global__ void bw_generic_depth_dkv_kernel(bw_params p) {
    const int lane = threadIdx.x & 31;
    const int64_t L = p.d1 - p.d0;
    const int64_t slots = p.B * p.T * L * p.Hk;
    const int64_t nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < slots; w += nwarps) {
        const int64_t h = w % p.Hk, l = p.d0 + (w / p.Hk) % L, u = (w / (p.Hk * L)) % p.T;
        const int64_t b = w / (p.Hk * L * p.T);
        float kr[BW_GEN_MAXC], vr[BW_GEN_MAXC], dk[BW_GEN_MAXC], dvv[BW_GEN_MAXC];
        bw_gen_load_row(kr, p.kd, bw_off5(p.kd, b, u, l, h, 0), p.kd.s4, p.d, lane);
        bw_gen_load_row(vr, p.vd, bw_off5(p.vd, b, u, l, h, 0), p.vd.s4, p.dv, lane);
#pragma unroll
        for (int c = 0; c < BW_GEN_MAXC; c++) dk[c] = dvv[c] = 0.f;
        int64_t t1 = u + 1;
        if (p.chunk) {
            t1 = (u / p.chunk_size + 1) * p.chunk_size;
            if (t1 > p.T) t1 = p.T;
        }
        bw_gen_key_rows(p, b, h, u, t1, kr, vr, dk, dvv, lane);
        const int64_t ok = bw_off5(p.dkd, b, u, l, h, 0), ov = bw_off5(p.dvd, b, u, l, h, 0);
#pragma unroll
        for (int c = 0; c < BW_GEN_MAXC; c++) {
            const int64_t i = lane + 32 * c;
            if (i < p.d) bw_store_depth_grad(p, p.dkd, ok + i * p.dkd.s4, dk[c] * p.scale);
            if (i < p.dv) bw_store_depth_grad(p, p.dvd, ov + i * p.dvd.s4, dvv[c]);
        }
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* Token-mode depth stage (the fast one): one CTA owns token t of head h with all of its G query heads, so  */
/* the depth gradient of each slot is a complete sum over g inside the CTA (spec.md §3) and no atomics are  */
/* needed. Per tile of BW_TD_SLOTS slots, in shared memory (fp32, rows padded by one word against bank      */
/* conflicts):                                                                                             */
/*   phase 1: (slot, g) pairs:  z, P = exp(z - lse), dP = <dO, vd>, dz = P (dP - Delta)                     */
/*   phase 2: (slot, i):        dKd = s * sum_g dz q,  dVd = sum_g P dO       (written to global)           */
/*   phase 3: (g, i):           dQacc += sum_slot dz kd                       (kept in shared memory)       */
/* ------------------------------------------------------------------------------------------------------ */
#define BW_TD_THREADS 128

typedef struct bw_td_layout {
    int slots;                  /* slots per tile */
    int ldk, ldv;               /* padded row lengths (floats) of d- and dv-rows */
    int off_q, off_do, off_dq;  /* [G][ldk], [G][ldv], [G][ldk] */
    int off_kd, off_vd;         /* [slots][ldk], [slots][ldv] */
    int off_p, off_dz;          /* [slots][G] */
    int off_lse, off_delta;     /* [G] */
    int floats;
} bw_td_layout;

static __host__ __device__ bw_td_layout bw_td_make_layout(int G, int d, int dv, int slots) {
    bw_td_layout y;
    y.slots = slots;
    y.ldk = d + 1;
    y.ldv = dv + 1;
    int o = 0;
    y.off_q = o;     o += G * y.ldk;
    y.off_do = o;    o += G * y.ldv;
    y.off_dq = o;    o += G * y.ldk;
    y.off_kd = o;    o += slots * y.ldk;
    y.off_vd = o;    o += slots * y.ldv;
    y.off_p = o;     o += slots * G;
    y.off_dz = o;    o += slots * G;
    y.off_lse = o;   o += G;
    y.off_delta = o; o += G;
    y.floats = o;
    return y;
}

__global__ void __launch_bounds__(BW_TD_THREADS) bw_token_depth_kernel(bw_params p, int slots_per_tile) {
    extern __shared__ float sm[];
    const int G = (int)p.G, d = (int)p.d, dv = (int)p.dv;
    const bw_td_layout y = bw_td_make_layout(G, d, dv, slots_per_tile);
    float *qs = sm + y.off_q, *dos = sm + y.off_do, *dqs = sm + y.off_dq, *kds = sm + y.off_kd, *vds = sm + y.off_vd;
    float *ps = sm + y.off_p, *dzs = sm + y.off_dz, *lses = sm + y.off_lse, *dls = sm + y.off_delta;
    const int tid = threadIdx.x;
    /* blockIdx.x enumerates (b, t, h) with h fastest. */
    const int64_t h = blockIdx.x % p.Hk, t = (blockIdx.x / p.Hk) % p.T, b = blockIdx.x / (p.Hk * p.T);

    for (int e = tid; e < G * d; e += BW_TD_THREADS) {
        const int g = e / d, i = e % d;
        qs[g * y.ldk + i] = bw_load(p.q, bw_off4(p.q, b, t, h, g) + i * p.q.s4);
        dqs[g * y.ldk + i] = 0.f;
    }
    for (int e = tid; e < G * dv; e += BW_TD_THREADS) {
        const int g = e / dv, i = e % dv;
        dos[g * y.ldv + i] = bw_load(p.dout, bw_off4(p.dout, b, t, h, g) + i * p.dout.s4);
    }
    for (int g = tid; g < G; g += BW_TD_THREADS) {
        lses[g] = bw_load(p.lse, bw_off4(p.lse, b, t, h, g));
        dls[g] = p.delta[bw_row(p, b, t, h, g)];
    }

    for (int64_t l0 = p.d0; l0 < p.d1; l0 += y.slots) {
        const int ns = (int)((p.d1 - l0) < y.slots ? (p.d1 - l0) : y.slots);
        __syncthreads(); /* previous tile's phase 3 is done with kds; first tile: q/dO are loaded */
        for (int e = tid; e < ns * d; e += BW_TD_THREADS) {
            const int s = e / d, i = e % d;
            kds[s * y.ldk + i] = bw_load(p.kd, bw_off5(p.kd, b, t, l0 + s, h, 0) + i * p.kd.s4);
        }
        for (int e = tid; e < ns * dv; e += BW_TD_THREADS) {
            const int s = e / dv, i = e % dv;
            vds[s * y.ldv + i] = bw_load(p.vd, bw_off5(p.vd, b, t, l0 + s, h, 0) + i * p.vd.s4);
        }
        __syncthreads();
        for (int e = tid; e < ns * G; e += BW_TD_THREADS) {
            const int s = e / G, g = e % G;
            const float *kr = kds + s * y.ldk, *qr = qs + g * y.ldk, *vr = vds + s * y.ldv, *dr = dos + g * y.ldv;
            float z = 0.f, dp = 0.f;
            for (int i = 0; i < d; i++) z += qr[i] * kr[i];
            for (int i = 0; i < dv; i++) dp += dr[i] * vr[i];
            const float pr = expf(z * p.scale - lses[g]);
            ps[s * G + g] = pr;
            dzs[s * G + g] = pr * (dp - dls[g]);
        }
        __syncthreads();
        for (int e = tid; e < ns * d; e += BW_TD_THREADS) {
            const int s = e / d, i = e % d;
            float acc = 0.f;
            for (int g = 0; g < G; g++) acc += dzs[s * G + g] * qs[g * y.ldk + i];
            bw_store_depth_grad(p, p.dkd, bw_off5(p.dkd, b, t, l0 + s, h, 0) + i * p.dkd.s4, acc * p.scale);
        }
        for (int e = tid; e < ns * dv; e += BW_TD_THREADS) {
            const int s = e / dv, i = e % dv;
            float acc = 0.f;
            for (int g = 0; g < G; g++) acc += ps[s * G + g] * dos[g * y.ldv + i];
            bw_store_depth_grad(p, p.dvd, bw_off5(p.dvd, b, t, l0 + s, h, 0) + i * p.dvd.s4, acc);
        }
        for (int e = tid; e < G * d; e += BW_TD_THREADS) {
            const int g = e / d, i = e % d;
            float acc = dqs[g * y.ldk + i];
            for (int s = 0; s < ns; s++) acc += dzs[s * G + g] * kds[s * y.ldk + i];
            dqs[g * y.ldk + i] = acc;
        }
    }
    __syncthreads();
    for (int e = tid; e < G * d; e += BW_TD_THREADS) {
        const int g = e / d, i = e % d;
        p.dqacc[bw_row(p, b, t, h, g) * p.d + i] = dqs[g * y.ldk + i] * p.scale;
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* Host side                                                                                               */
/* ------------------------------------------------------------------------------------------------------ */
static size_t bw_align(size_t x) { return (x + 255) & ~(size_t)255; }

static bw_view bw_view_of(const moda_operand *a) {
    bw_view v;
    v.data = (char *)a->data;
    v.dtype = (int)a->dtype;
    v.s0 = a->stride[0];
    v.s1 = a->stride[1];
    v.s2 = a->stride[2];
    v.s3 = a->stride[3];
    v.s4 = a->stride[4];
    return v;
}

/* Workspace layout (byte offsets; 0 size: absent), from the shape alone so that the size query (which has no
 * gradient operands) and the launch agree: Delta [rows] | dqacc [rows][d] fp32 (depth part of dQ; with the
 * fused pass the whole dQ) | dK/dV split partials | fused pass's row-block counters. */
typedef struct bw_ws {
    size_t delta, dqacc, part, cnt, total;
    int64_t ncnt;
} bw_ws;

static bw_ws bw_ws_layout(const moda_problem *p) {
    bw_ws y;
    const size_t rows = (size_t)(p->B * p->T * p->Hk * p->G);
    const int fused = bw_fused_warps(p) > 0;
    y.ncnt = fused ? p->B * p->Hk * ((p->T * p->G + bw_mma_bm(p->d) - 1) / bw_mma_bm(p->d)) : 0;
    y.delta = 0;
    y.dqacc = bw_align(rows * sizeof(float));
    y.part = y.dqacc + (moda_problem_has_depth(p) || fused ? bw_align(rows * (size_t)p->d * sizeof(float)) : 0);
    y.cnt = y.part + bw_align(bw_dkdv_split_floats(p) * sizeof(float));
    y.total = y.cnt + bw_align((size_t)y.ncnt * sizeof(unsigned));
    return y;
}

extern "C" size_t moda_cuda_backward_workspace(const moda_problem *p) { return bw_ws_layout(p).total; }

/* Grid for a warp-per-item kernel with a grid-stride loop. */
static unsigned bw_warp_grid(int64_t items) {
    int64_t blocks = (items + BW_WARPS - 1) / BW_WARPS;
    if (blocks > (1 << 20)) blocks = 1 << 20;
    if (blocks < 1) blocks = 1;
    return (unsigned)blocks;
}

static moda_status bw_check_launch(const char *what) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return moda_fail(MODA_ERR_DEVICE_FAILURE, "CUDA backward: launching %s failed: %s", what, cudaGetErrorString(e));
    return MODA_OK;
}

/* Largest slot tile (<= 32, >= 1) whose shared memory fits in `limit` bytes. */
static int bw_td_slots(const moda_problem *p, size_t limit, size_t *bytes) {
    for (int s = 32; s >= 1; s /= 2) {
        const bw_td_layout y = bw_td_make_layout((int)p->G, (int)p->d, (int)p->dv, s);
        *bytes = (size_t)y.floats * sizeof(float);
        if (*bytes <= limit) return s;
    }
    return 0;
}

/* The sequence-kernel family of this thread's last backward, for tests (moda_testing_cuda_last_backward). */
static thread_local const char *bw_last_path = "none";
/* ... and of its depth stage: "tdc" (tensor cores), "tdw" (warp per token), "token" (CTA per token), "generic"
 * or "none" (no visible slot). */
static thread_local const char *bw_last_depth = "none";

extern "C" moda_status moda_cuda_backward(const moda_problem *p, void *workspace, size_t workspace_bytes, void *stream) {
    const size_t need = moda_cuda_backward_workspace(p);
    if (need > 0 && (workspace == NULL || workspace_bytes < need))
        return moda_fail(MODA_ERR_WORKSPACE, "CUDA backward needs %zu bytes of device workspace, got %zu%s", need,
                         workspace_bytes, workspace ? "" : " (NULL)");
    if (p->d > BW_GEN_MAXD || p->dv > BW_GEN_MAXD)
        return moda_fail(MODA_ERR_UNSUPPORTED, "CUDA backward supports head dims up to %d (d=%lld, dv=%lld)",
                         BW_GEN_MAXD, (long long)p->d, (long long)p->dv);
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t rows = p->B * p->T * p->Hk * p->G;
    const int has_depth = moda_problem_has_depth(p);

    bw_params bp;
    bp.B = p->B; bp.T = p->T; bp.Hk = p->Hk; bp.G = p->G; bp.d = p->d; bp.dv = p->dv;
    bp.d0 = p->d0; bp.d1 = p->d1; bp.chunk_size = p->chunk ? p->chunk_size : 1;
    bp.causal = p->causal; bp.sequence = p->sequence; bp.chunk = p->chunk; bp.accumulate = p->accumulate_depth;
    bp.scale = (float)p->scale;
    bp.scale_log2 = (float)(p->scale * 1.4426950408889634);
    bp.q = bw_view_of(&p->q); bp.k = bw_view_of(&p->k); bp.v = bw_view_of(&p->v);
    bp.kd = bw_view_of(&p->kd); bp.vd = bw_view_of(&p->vd); bp.o = bw_view_of(&p->o);
    bp.lse = bw_view_of(&p->lse); bp.dout = bw_view_of(&p->grad_o); bp.dq = bw_view_of(&p->grad_q);
    bp.dk = bw_view_of(&p->grad_k); bp.dv_ = bw_view_of(&p->grad_v); bp.dkd = bw_view_of(&p->grad_kd);
    bp.dvd = bw_view_of(&p->grad_vd);
    const bw_ws ws = bw_ws_layout(p);
    const int mma = p->sequence && bw_mma_supported(p);
    const int fused_warps = mma ? bw_fused_warps(p) : 0;
    char *wsb = (char *)workspace;
    bp.delta = (float *)(wsb + ws.delta);
    bp.dqacc = has_depth || fused_warps ? (float *)(wsb + ws.dqacc) : NULL;
    bp.dqacc_zero = fused_warps && !has_depth;
    bp.deterministic = p->deterministic;
    bp.dqcnt = fused_warps && p->deterministic ? (unsigned *)(wsb + ws.cnt) : NULL;
    bp.dqcnt_n = bp.dqcnt ? ws.ncnt : 0;
    bp.dkdv_nsplit = 1;
    bp.dkdv_rows = 0;
    bp.dkdv_bn = 16 * (fused_warps ? fused_warps : 4);
    bp.dkvpart = NULL;
    if (mma) {
        bp.dkdv_nsplit = bw_dkdv_split(p, &bp.dkdv_rows);
        if (bp.dkdv_nsplit > 1) bp.dkvpart = (float *)(wsb + ws.part);
    }
    if (rows == 0) return MODA_OK;

    moda_status s;
    if ((p->dtype == MODA_F16 || p->dtype == MODA_BF16) && p->o.dtype == p->dtype && p->grad_o.dtype == p->dtype &&
        p->d == p->dv && (p->dv == 64 || p->dv == 128) && bw_vec_ok(&p->o, 5) && bw_vec_ok(&p->grad_o, 5)) {
        const unsigned grid = bw_warp_grid((rows + 32 / (p->dv / 8) - 1) / (32 / (p->dv / 8)));
        if (p->dtype == MODA_BF16)
            p->dv == 64 ? bw_preprocess_vec_kernel<__nv_bfloat16, 64><<<grid, BW_WARPS * 32, 0, st>>>(bp)
                        : bw_preprocess_vec_kernel<__nv_bfloat16, 128><<<grid, BW_WARPS * 32, 0, st>>>(bp);
        else
            p->dv == 64 ? bw_preprocess_vec_kernel<__half, 64><<<grid, BW_WARPS * 32, 0, st>>>(bp)
                        : bw_preprocess_vec_kernel<__half, 128><<<grid, BW_WARPS * 32, 0, st>>>(bp);
    } else {
        bw_preprocess_kernel<<<bw_warp_grid(rows), BW_WARPS * 32, 0, st>>>(bp);
    }
    if ((s = bw_check_launch("the Delta preprocessing kernel")) != MODA_OK) return s;

    bw_last_depth = "none";
    if (has_depth && bw_tdw_supported(p) && p->B * p->T * p->Hk < ((int64_t)1 << 32) &&
        bw_new_kernel_on("MODA_CUDA_BWD_NOTDW")) {
        const int tdc = bw_tdc_use(&bp);
        bw_last_depth = tdc ? "tdc" : "tdw";
        const cudaError_t e = bw_launch_tdw(&bp, tdc, st);
        if (e != cudaSuccess)
            return moda_fail(MODA_ERR_DEVICE_FAILURE, "CUDA backward: launching the depth kernel failed: %s",
                             cudaGetErrorString(e));
    } else if (has_depth) {
        size_t smem = 0;
        const int slots = p->chunk ? 0 : bw_td_slots(p, 96 * 1024, &smem);
        if (slots > 0 && p->B * p->T * p->Hk < (int64_t)1 << 31) {
            if (smem > 48 * 1024) {
                const cudaError_t e = cudaFuncSetAttribute(bw_token_depth_kernel,
                                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
                if (e != cudaSuccess)
                    return moda_fail(MODA_ERR_DEVICE_FAILURE, "CUDA backward: shared memory for the depth kernel: %s",
                                     cudaGetErrorString(e));
            }
            bw_last_depth = "token";
            bw_token_depth_kernel<<<(unsigned)(p->B * p->T * p->Hk), BW_TD_THREADS, smem, st>>>(bp, slots);
            if ((s = bw_check_launch("the token-mode depth kernel")) != MODA_OK) return s;
        } else {
            bw_last_depth = "generic";
            bw_generic_depth_dq_kernel<<<bw_warp_grid(rows), BW_WARPS * 32, 0, st>>>(bp);
            if ((s = bw_check_launch("the depth dQ kernel")) != MODA_OK) return s;
            bw_generic_depth_dkv_kernel<<<bw_warp_grid(p->B * p->T * p->Hk * (p->d1 - p->d0)), BW_WARPS * 32, 0, st>>>(bp);
            if ((s = bw_check_launch("the depth dKd/dVd kernel")) != MODA_OK) return s;
        }
    }

    if (mma) {
        cudaError_t e;
        if (fused_warps) {
            /* the sm_90a pass (backward_hopper.cu) in place of the mma.sync one where it applies */
            const int hopper = bw_hopper_use(p, &bp);
            bw_last_path = hopper ? "hopper" : bp.deterministic ? "fused-ordered" : "fused";
            e = hopper ? bw_launch_hopper(&bp, st) : bw_launch_mma_fused(&bp, st);
            if (e == cudaSuccess) e = bw_launch_dq_finish(&bp, st);
        } else {
            /* dK, dV by the sm_90a kernel's dK/dV-only form on sm_90 (MODA_CUDA_BWD_HOPPER_DKDV=0: the mma.sync pass) */
            const int hopper_dkdv = bw_hopper_dkdv_use(p, &bp);
            bw_last_path = hopper_dkdv ? "hopper-dkdv" : "twopass";
            e = hopper_dkdv ? bw_launch_hopper_dkdv(&bp, st) : bw_launch_mma_dkdv(&bp, st);
            if (e == cudaSuccess) e = bw_launch_mma_dq(&bp, st);
        }
        if (e != cudaSuccess)
            return moda_fail(MODA_ERR_DEVICE_FAILURE, "CUDA backward: launching the tensor-core kernels failed: %s",
                             cudaGetErrorString(e));
        return MODA_OK;
    }
    bw_last_path = "generic";
    if (p->sequence) {
        bw_generic_dkdv_kernel<<<bw_warp_grid(p->B * p->Hk * p->T), BW_WARPS * 32, 0, st>>>(bp);
        if ((s = bw_check_launch("the sequence dK/dV kernel")) != MODA_OK) return s;
    }
    bw_generic_dq_kernel<<<bw_warp_grid(rows), BW_WARPS * 32, 0, st>>>(bp);
    return bw_check_launch("the dQ kernel");
}

/* Private hook (not in moda.h; tests declare it): "hopper", "fused", "fused-ordered", "twopass", "hopper-dkdv"
 * (the two passes with dK/dV from the sm_90a kernel) or "generic" for the kernels the last backward on this
 * thread ran ("none" before any). */
extern "C" MODA_API const char *moda_testing_cuda_last_backward(void) { return bw_last_path; }
/* Private hook: the depth-stage kernel of this thread's last backward (bw_last_depth above). */
extern "C" MODA_API const char *moda_testing_cuda_last_depth_backward(void) { return bw_last_depth; }
