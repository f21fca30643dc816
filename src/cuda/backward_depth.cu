/*
 * backward_depth.cu - the token-mode depth stage for f16/bf16 with d = dv in {64, 128} and G <= 8: one warp
 * owns token t of KV head h with all of its G query heads (spec.md §3: the depth gradient of slot (t, l, h)
 * is a sum over those G rows only, so no atomics and a fixed summation order).
 *
 * The stage is memory-bound (each depth K/V element is read once and each dKd/dVd element written once;
 * about 2 FMAs per byte), so the mapping is chosen for the loads: a slot row of D elements is read by D/8
 * lanes with one 16-byte load each, and a warp handles 32/(D/8) slots at a time. The logits and dP of a
 * (slot, g) pair are reduced over those D/8 lanes with log2(D/8) shuffles; dKd, dVd of the slot stay
 * lane-local (each lane owns 8 dimensions); dQ of the G rows accumulates lane-locally per slot group and is
 * reduced across the groups once at the end.
 */
#include "backward_common.cuh"

#define BW_TDW_WARPS 4

template <typename E> static __device__ __forceinline__ void bw_unpack8(float (&f)[8], uint4 u) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 x = moda_dt<E>::unpack2(w[i]);
        f[2 * i] = x.x;
        f[2 * i + 1] = x.y;
    }
}

static __device__ __forceinline__ void bw_ld8(float (&f)[8], const float *src) {
    const float4 a = ((const float4 *)src)[0], b = ((const float4 *)src)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

/* Writes 8 consecutive depth-gradient elements (storage dtype E or f32), adding the old content in
 * accumulate mode. */
template <typename E>
static __device__ __forceinline__ void bw_store8(const bw_params &p, const bw_view &a, int64_t off, float (&x)[8]) {
    if (a.dtype == MODA_F32) {
        float4 *dst = (float4 *)((float *)a.data + off);
        if (p.accumulate) {
            const float4 o0 = dst[0], o1 = dst[1];
            x[0] += o0.x; x[1] += o0.y; x[2] += o0.z; x[3] += o0.w;
            x[4] += o1.x; x[5] += o1.y; x[6] += o1.z; x[7] += o1.w;
        }
        dst[0] = make_float4(x[0], x[1], x[2], x[3]);
        dst[1] = make_float4(x[4], x[5], x[6], x[7]);
    } else {
        uint4 *dst = (uint4 *)((E *)a.data + off);
        if (p.accumulate) {
            float o[8];
            bw_unpack8<E>(o, *dst);
#pragma unroll
            for (int i = 0; i < 8; i++) x[i] += o[i];
        }
        uint4 u;
        u.x = moda_dt<E>::pack2(x[0], x[1]);
        u.y = moda_dt<E>::pack2(x[2], x[3]);
        u.z = moda_dt<E>::pack2(x[4], x[5]);
        u.w = moda_dt<E>::pack2(x[6], x[7]);
        *dst = u;
    }
}

template <typename E, int D, int GMAX>
__global__ void __launch_bounds__(BW_TDW_WARPS * 32) bw_tdw_kernel(bw_params p) {
    constexpr int LPR = D / 8, SPW = 32 / LPR; /* lanes per slot row, slots per warp step */
    const int lane = threadIdx.x & 31;
    const int64_t th = (int64_t)blockIdx.x * BW_TDW_WARPS + (threadIdx.x >> 5);
    if (th >= p.B * p.T * p.Hk) return; /* whole warps only */
    const int64_t h = th % p.Hk, t = (th / p.Hk) % p.T, b = th / (p.Hk * p.T);
    const int sub = lane / LPR, col = (lane % LPR) * 8, G = (int)p.G;

    /* q and dO of the G rows as fp32 in shared memory (read back as broadcasts): holding them unpacked in
     * registers next to the dQ accumulators would cost 16*G registers more and halve the occupancy */
    __shared__ __align__(16) float qsm[BW_TDW_WARPS][GMAX][D], osm[BW_TDW_WARPS][GMAX][D];
    float(*qs)[D] = qsm[threadIdx.x >> 5], (*os)[D] = osm[threadIdx.x >> 5];
    float l2[GMAX], dl[GMAX], dq[GMAX][8];
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        l2[g] = __int_as_float(0x7f800000);
        dl[g] = 0.f;
        if (g < G) {
            if (sub == 0) {
                float f[8];
                bw_unpack8<E>(f, *(const uint4 *)((const E *)p.q.data + bw_off4(p.q, b, t, h, g) + col));
#pragma unroll
                for (int i = 0; i < 8; i++) qs[g][col + i] = f[i];
                bw_unpack8<E>(f, *(const uint4 *)((const E *)p.dout.data + bw_off4(p.dout, b, t, h, g) + col));
#pragma unroll
                for (int i = 0; i < 8; i++) os[g][col + i] = f[i];
            }
            l2[g] = bw_load(p.lse, bw_off4(p.lse, b, t, h, g)) * BW_LOG2E;
            dl[g] = p.delta[bw_row(p, b, t, h, g)];
        }
#pragma unroll
        for (int i = 0; i < 8; i++) dq[g][i] = 0.f;
    }
    __syncwarp();
    const int64_t kbase = b * p.kd.s0 + t * p.kd.s1 + h * p.kd.s3 + col;
    const int64_t vbase = b * p.vd.s0 + t * p.vd.s1 + h * p.vd.s3 + col;
    const int64_t dkbase = b * p.dkd.s0 + t * p.dkd.s1 + h * p.dkd.s3 + col;
    const int64_t dvbase = b * p.dvd.s0 + t * p.dvd.s1 + h * p.dvd.s3 + col;

    for (int64_t lb = p.d0; lb < p.d1; lb += SPW) {
        const int64_t l = lb + sub;
        const bool ok = l < p.d1;
        float kf[8], vf[8];
        if (ok) {
            bw_unpack8<E>(kf, *(const uint4 *)((const E *)p.kd.data + kbase + l * p.kd.s2));
            bw_unpack8<E>(vf, *(const uint4 *)((const E *)p.vd.data + vbase + l * p.vd.s2));
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) kf[i] = vf[i] = 0.f;
        }
        float pz[GMAX], dz[GMAX];
#pragma unroll
        for (int g = 0; g < GMAX; g++) {
            pz[g] = dz[g] = 0.f;
            if (g < G) { /* warp-uniform */
                float qf[8], of[8], z = 0.f, dp = 0.f;
                bw_ld8(qf, qs[g] + col);
                bw_ld8(of, os[g] + col);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    z += qf[i] * kf[i];
                    dp += of[i] * vf[i];
                }
#pragma unroll
                for (int o = 1; o < LPR; o <<= 1) {
                    z += __shfl_xor_sync(0xffffffffu, z, o);
                    dp += __shfl_xor_sync(0xffffffffu, dp, o);
                }
                if (ok) {
                    pz[g] = bw_exp2(z * p.scale_log2 - l2[g]);
                    dz[g] = pz[g] * (dp - dl[g]);
                }
            }
        }
        if (ok) {
            float gk[8], gv[8];
#pragma unroll
            for (int i = 0; i < 8; i++) gk[i] = gv[i] = 0.f;
#pragma unroll
            for (int g = 0; g < GMAX; g++) {
                if (g < G) {
                    float qf[8], of[8];
                    bw_ld8(qf, qs[g] + col);
                    bw_ld8(of, os[g] + col);
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        gk[i] += dz[g] * qf[i];
                        gv[i] += pz[g] * of[i];
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < 8; i++) gk[i] *= p.scale;
            bw_store8<E>(p, p.dkd, dkbase + l * p.dkd.s2, gk);
            bw_store8<E>(p, p.dvd, dvbase + l * p.dvd.s2, gv);
        }
#pragma unroll
        for (int g = 0; g < GMAX; g++)
#pragma unroll
            for (int i = 0; i < 8; i++) dq[g][i] += dz[g] * kf[i];
    }
    /* dQacc of the G rows: sum the slot groups (lanes LPR apart), then lanes of group 0 write 8 dims each */
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        if (g < G) {
#pragma unroll
            for (int i = 0; i < 8; i++)
#pragma unroll
                for (int o = LPR; o < 32; o <<= 1) dq[g][i] += __shfl_xor_sync(0xffffffffu, dq[g][i], o);
            if (sub == 0) {
                float4 *dst = (float4 *)(p.dqacc + bw_row(p, b, t, h, g) * D + col);
                dst[0] = make_float4(dq[g][0] * p.scale, dq[g][1] * p.scale, dq[g][2] * p.scale, dq[g][3] * p.scale);
                dst[1] = make_float4(dq[g][4] * p.scale, dq[g][5] * p.scale, dq[g][6] * p.scale, dq[g][7] * p.scale);
            }
        }
    }
}

int bw_tdw_supported(const moda_problem *p) {
    if (p->chunk || !moda_problem_has_depth(p)) return 0;
    if (p->dtype != MODA_F16 && p->dtype != MODA_BF16) return 0;
    if (p->d != p->dv || (p->d != 64 && p->d != 128) || p->G > 8) return 0;
    return bw_vec_ok(&p->q, 5) && bw_vec_ok(&p->grad_o, 5) && bw_vec_ok(&p->kd, 5) && bw_vec_ok(&p->vd, 5) &&
           bw_vec_ok(&p->grad_kd, 5) && bw_vec_ok(&p->grad_vd, 5);
}

template <typename E, int D, int GMAX> static cudaError_t bw_run_tdw(const bw_params *bp, cudaStream_t st) {
    const int64_t warps = bp->B * bp->T * bp->Hk;
    const int64_t blocks = (warps + BW_TDW_WARPS - 1) / BW_TDW_WARPS;
    bw_tdw_kernel<E, D, GMAX><<<(unsigned)blocks, BW_TDW_WARPS * 32, 0, st>>>(*bp);
    return cudaGetLastError();
}

template <typename E> static cudaError_t bw_run_tdw_e(const bw_params *bp, cudaStream_t st) {
    if (bp->d == 64) return bp->G <= 2 ? bw_run_tdw<E, 64, 2>(bp, st) : bw_run_tdw<E, 64, 8>(bp, st);
    return bp->G <= 2 ? bw_run_tdw<E, 128, 2>(bp, st) : bw_run_tdw<E, 128, 8>(bp, st);
}

cudaError_t bw_launch_tdw(const bw_params *bp, cudaStream_t st) {
    return bp->q.dtype == MODA_BF16 ? bw_run_tdw_e<__nv_bfloat16>(bp, st) : bw_run_tdw_e<__half>(bp, st);
}
