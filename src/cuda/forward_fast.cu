/*
 * forward_fast.cu - the tensor-core MoDA forward for f16/bf16, d == dv in {64, 128}.
 *
 * Mapping (why it beats the paper's group-aware (C/G)*L masked tile):
 *  - A CTA owns BM consecutive query rows of ONE key/value head h, rows ordered R = t*G + g. For any G this is
 *    a block of tokens x all G query heads of h, so each sequence K/V tile loaded into shared memory serves
 *    every query head that uses it (GQA sharing for free), and the depth slots of a token are loaded once and
 *    serve its G rows.
 *  - The CTA's keys are one stream of stages through one cp.async pipeline (3 stages for d = 64, 2 for
 *    d = 128; SR key rows each, XOR-swizzled, read with ldmatrix): first the depth stages, then the sequence
 *    stages. Both kinds update ONE online-softmax state per row (spec.md §2).
 *  - Depth stages are warp-private: stage i holds, in shared rows DK*w .. DK*w + DK - 1 (DK = SR/4), keys
 *    [DK*i, DK*i + DK) of warp w's own depth list (its tokens x the visible slots, token-major; in chunk mode
 *    from the first token of its first row's chunk). Every warp computes on every depth stage, only against
 *    slots its own rows can see, and skips m16 tiles whose tokens own none of them: the masked waste is
 *    bounded by one m16 tile (G of 16 rows useful when G < 16), where the paper's (C/G)*L tile uses G/C. Depth
 *    K/V are read from HBM exactly once per call.
 *  - Causal sequence stages are skipped per warp and per 64-key step past the warp's last token; masks are
 *    evaluated only on steps that cross the diagonal or the end of the keys.
 *
 * Numerics: products in the storage dtype on mma.sync m16n8k16 with fp32 accumulation; logits scaled by
 * s*log2(e) and exponentiated with exp2; probabilities rounded to the storage dtype for P·V (as FlashAttention
 * and the same-precision reference do); softmax state and output accumulation in fp32.
 */
#include "common.cuh"

#include <math.h>

/* Variants kept for side-by-side timing only (bench/device_run.sh, stage "variants"; docs/cuda_notes.md, v3);
 * the build sets neither. */
#ifndef MODA_FWD_INTERLEAVE
#define MODA_FWD_INTERLEAVE 0
#endif
#ifndef MODA_FWD_RESCALE_SKIP
#define MODA_FWD_RESCALE_SKIP 0
#endif

namespace {

typedef moda_fwd_shape fast_params;

/* Kernel traits: tile shapes and pipeline depth. */
template <int D_, int MT_, int STAGES_, int SR_, bool QS_ = false> struct fast_traits {
    static constexpr int D = D_;
    static constexpr int MT = MT_;           /* m16 tiles per warp */
    static constexpr int STAGES = STAGES_;   /* cp.async pipeline depth */
    static constexpr int NW = 4;
    static constexpr int THREADS = NW * 32;
    static constexpr int BM = 16 * MT * NW;  /* query rows per CTA */
    static constexpr int SR = SR_;           /* key rows per pipeline stage (one barrier per stage) */
    static constexpr bool QS = QS_;          /* Q fragments read from shared memory per step, not kept in registers */
    static constexpr int BN = 64;            /* sequence keys per softmax step (SR / BN steps per stage) */
    static constexpr int CH = D / 8;         /* 16-byte chunks per row */
    static constexpr size_t SMEM = (size_t)(BM + 2 * STAGES * SR) * D * 2;
};

/* 2^x in one MUFU.EX2: exp2f's non-ftz form adds a range test and two multiplies per call to keep denormal
 * results, which a probability below 2^-126 next to a row maximum of 2^0 never needs. ex2(-inf) = 0. */
__device__ __forceinline__ float ex2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ int row_lo(int t, int chunk, int C) { return chunk ? (t / C) * C : t; }

/* The depth keys one warp's rows can see: tokens [u0, u0 + nkeys/L) x the L visible slots, token-major. */
struct warp_span {
    int t0, t1, u0, nkeys;
};
__device__ __forceinline__ warp_span span_of_warp(int Rw0, int rows, int NR, int G, int L, int chunk, int C) {
    warp_span w;
    if (Rw0 >= NR) {
        w.t0 = w.t1 = w.u0 = 0;
        w.nkeys = 0;
        return w;
    }
    w.t0 = Rw0 / G;
    w.t1 = min(Rw0 + rows - 1, NR - 1) / G;
    w.u0 = row_lo(w.t0, chunk, C);
    w.nkeys = (w.t1 - w.u0 + 1) * L;
    return w;
}

/* S[MT][NB] (16 x 8*NB per m-tile) = Q · K^T for the NB*8 keys at shared rows key0.. of tile tk. Q's A fragments
 * come from registers (qf, QS false) or, to free those registers for a second m-tile, from the shared Q tile sQ
 * at rows qrow0.. (QS true: one extra ldmatrix per m-tile and 16 columns). */
template <typename T, int D, int MT, int NB, bool QS>
__device__ __forceinline__ void tile_qk(float (&s)[MT][NB][4], const uint32_t (&qf)[MT][QS ? 1 : D / 16][4],
                                        const T *sQ, int qrow0, const T *tk, int key0, int lane,
                                        const bool (&on)[MT]) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int n = 0; n < NB; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[mt][n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t qa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            if constexpr (QS) {
                if (on[mt])
                    moda_ldmatrix_x4(qa[mt], moda_smem_addr(sQ + moda_swz<D>(qrow0 + mt * 16 + (lane & 15),
                                                                              kk * 16 + (lane >> 4) * 8)));
            } else {
#pragma unroll
                for (int e = 0; e < 4; e++) qa[mt][e] = qf[mt][kk][e];
            }
        }
#pragma unroll
        for (int n2 = 0; n2 < NB / 2; n2++) {
            uint32_t kf[4];
            const int key = key0 + n2 * 16 + (lane & 7) + ((lane >> 4) << 3);
            const int col = kk * 16 + ((lane >> 3) & 1) * 8;
            moda_ldmatrix_x4(kf, moda_smem_addr(tk + moda_swz<D>(key, col)));
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                if (!on[mt]) continue;
                moda_mma<T>::run(s[mt][2 * n2], qa[mt], kf[0], kf[1]);
                moda_mma<T>::run(s[mt][2 * n2 + 1], qa[mt], kf[2], kf[3]);
            }
        }
    }
}

/* Merges masked raw logits s (-inf where masked) into the rows' ONE online-softmax state and adds P·V (V at
 * shared rows key0.. of tile tv). The state keeps the row maximum m in raw units, so each probability is ONE
 * FFMA and one ex2: 2^(s*sl - m*sl), sl = scale*log2(e) > 0 (the max of raw logits is the max of scaled ones
 * only for a positive scale; moda_cuda_fast_forward_supports sends other scales to the generic kernel). The
 * S accumulators of keys 16kk..16kk+15 are exactly P's A fragment. */
template <typename T, int D, int MT, int NB>
__device__ __forceinline__ void tile_softmax_pv(float (&s)[MT][NB][4], float (&acc)[MT][D / 8][4],
                                                float (&mrow)[MT][2], float (&lrow)[MT][2], const T *tv, int key0,
                                                int lane, const bool (&on)[MT], float sl) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        if (!on[mt]) continue;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < NB; n++) mx = fmaxf(mx, fmaxf(s[mt][n][2 * i], s[mt][n][2 * i + 1]));
            mx = moda_quad_max(mx);
            const float mold = mrow[mt][i];
            const float mnew = fmaxf(mold, mx);
            /* A row with no visible key so far keeps m = -inf; 2^(-inf*sl - 0) = 0 avoids NaN. */
            const float msc = mnew == -INFINITY ? 0.f : mnew * sl;
            const float alpha = ex2_ftz(fmaf(mrow[mt][i], sl, -msc));
            mrow[mt][i] = mnew;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < NB; n++) {
                s[mt][n][2 * i] = ex2_ftz(fmaf(s[mt][n][2 * i], sl, -msc));
                s[mt][n][2 * i + 1] = ex2_ftz(fmaf(s[mt][n][2 * i + 1], sl, -msc));
                sum += s[mt][n][2 * i] + s[mt][n][2 * i + 1];
            }
#if MODA_FWD_RESCALE_SKIP
            /* No row of the warp's 8 grew its maximum: alpha is exactly 1 (`on` is warp-uniform). */
            if (!__any_sync(0xffffffffu, mnew > mold)) {
                lrow[mt][i] += sum;
                continue;
            }
#endif
            lrow[mt][i] = lrow[mt][i] * alpha + sum;
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                acc[mt][n][2 * i] *= alpha;
                acc[mt][n][2 * i + 1] *= alpha;
            }
        }
    }
#pragma unroll
    for (int kk = 0; kk < NB / 2; kk++) {
        uint32_t pf[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            pf[mt][0] = moda_dt<T>::pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
            pf[mt][1] = moda_dt<T>::pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
            pf[mt][2] = moda_dt<T>::pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
            pf[mt][3] = moda_dt<T>::pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int n2 = 0; n2 < D / 16; n2++) {
            uint32_t vf[4];
            const int key = key0 + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
            const int col = n2 * 16 + (lane >> 4) * 8;
            moda_ldmatrix_x4_trans(vf, moda_smem_addr(tv + moda_swz<D>(key, col)));
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                if (!on[mt]) continue;
                moda_mma<T>::run(acc[mt][2 * n2], pf[mt], vf[0], vf[1]);
                moda_mma<T>::run(acc[mt][2 * n2 + 1], pf[mt], vf[2], vf[3]);
            }
        }
    }
}

template <typename T, typename TR>
__global__ void __launch_bounds__(TR::THREADS) fast_fwd_kernel(const fast_params p) {
    constexpr int D = TR::D, MT = TR::MT, STAGES = TR::STAGES, BM = TR::BM, BN = TR::BN, CH = TR::CH;
    constexpr int SR = TR::SR;
    constexpr int WR = 16 * MT;      /* rows per warp */
    constexpr int DK = SR / TR::NW;  /* depth keys per warp per stage */
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T *sQ = reinterpret_cast<T *>(smem_raw);
    T *sK = sQ + BM * D;
    T *sV = sK + STAGES * SR * D;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    /* Heaviest (latest) row blocks first: causal work grows with t. Rows and tokens of one (b, h) fit in 32
     * bits (moda_cuda_fast_forward_supports checks T*G and T*L); element offsets stay 64-bit. */
    const int64_t bid = blockIdx.x;
    const int rb = (int)(p.nrb - 1 - bid % p.nrb);
    const int64_t bh = bid / p.nrb;
    const int64_t b = bh / p.Hk, h = bh % p.Hk;
    const int NR = p.NR, G = p.G, L = p.L;
    const int R0 = rb * BM;
    const int Rlast = min(R0 + BM, NR) - 1;
    const int T1 = Rlast / G;

    const T *qb = reinterpret_cast<const T *>(p.q) + b * p.qs[0] + h * p.qs[2];
    const T *kb = reinterpret_cast<const T *>(p.k) + b * p.ks[0] + h * p.ks[2];
    const T *vb = reinterpret_cast<const T *>(p.v) + b * p.vs[0] + h * p.vs[2];
    const T *kdb = reinterpret_cast<const T *>(p.kd) + b * p.kds[0] + h * p.kds[3];
    const T *vdb = reinterpret_cast<const T *>(p.vd) + b * p.vds[0] + h * p.vds[3];

    /* Depth tiles are warp-private: tile `it` holds, in shared rows DK*w.., keys [DK*it, DK*it + DK) of warp w's
     * own depth list, so every warp computes on every depth tile and only against slots its rows can see. */
    int ndt = 0;
    if (L > 0) {
        int mk = 0;
#pragma unroll
        for (int w = 0; w < TR::NW; w++) mk = max(mk, span_of_warp(R0 + w * WR, WR, NR, G, L, p.chunk, p.C).nkeys);
        ndt = (mk + DK - 1) / DK;
    }
    const int jend = p.sequence ? (p.causal ? T1 + 1 : p.T) : 0;
    const int nst = (jend + SR - 1) / SR;
    const int ntiles = ndt + nst;
#if MODA_FWD_INTERLEAVE
    /* Depth tiles spread evenly among the sequence tiles: tile `it` is depth when floor(it*ndt/ntiles) steps
     * up at it + 1 (32-bit: a 64-bit division made ptxas spill; past 2^16 tiles, depth first). */
    const bool spread = ntiles < 65536;
    auto depth_before = [&](int it) {
        return spread ? (int)((unsigned)it * (unsigned)ndt / (unsigned)ntiles) : min(it, ndt);
    };
#endif

    const int Rw0 = R0 + warp * WR;
    const bool wvalid = Rw0 < NR;
    const warp_span ws = span_of_warp(Rw0, WR, NR, G, L, p.chunk, p.C);

    /* Each thread's 2*MT rows: token and first visible depth token; each m-tile's token range. */
    int trow[MT][2], tlo[MT][2], mt_t0[MT], mt_t1[MT];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int R = min(Rw0 + mt * 16 + (lane >> 2) + 8 * i, NR - 1);
            trow[mt][i] = R / G;
            tlo[mt][i] = row_lo(trow[mt][i], p.chunk, p.C);
        }
        mt_t0[mt] = min(Rw0 + mt * 16, NR - 1) / G;
        mt_t1[mt] = min(Rw0 + mt * 16 + 15, NR - 1) / G;
    }

    auto load_tile = [&](int it, int stage) {
        T *dk = sK + stage * SR * D, *dvv = sV + stage * SR * D;
#if MODA_FWD_INTERLEAVE
        const int di = depth_before(it);
        const bool depth_tile = depth_before(it + 1) > di;
        const int seq_stage = it - di;
        if (depth_tile) it = di;
#else
        const bool depth_tile = it < ndt;
        const int seq_stage = it - ndt;
#endif
        if (depth_tile) {
            /* Each warp loads its own DK shared rows, so the depth list is the warp's own span ws. */
            static_assert(DK * CH % 32 == 0, "depth rows split evenly over the lanes");
            /* Key kx = (token u0 + dq, slot rem): one division per stage; with L >= DK a row's key is at most
             * one token past the stage's first. */
            const int q0 = (it * DK) / L, r0 = it * DK - q0 * L;
#pragma unroll
            for (int ci = 0; ci < DK * CH / 32; ci++) {
                const int c = lane + ci * 32;
                const int rl = c / CH, cc = c % CH;
                const int r = DK * warp + rl;
                const int kx = it * DK + rl;
                const bool ok = kx < ws.nkeys;
                const T *ks = kdb, *vs = vdb;
                if (ok) {
                    const int x = r0 + rl;
                    const int dx = L >= DK ? (x >= L ? 1 : 0) : x / L;
                    const int64_t tok = ws.u0 + q0 + dx, slot = p.d0 + (x - dx * L);
                    ks = kdb + tok * p.kds[1] + slot * p.kds[2] + cc * 8;
                    vs = vdb + tok * p.vds[1] + slot * p.vds[2] + cc * 8;
                }
                moda_cp_async16(moda_smem_addr(dk + moda_swz<D>(r, cc * 8)), ks, ok);
                moda_cp_async16(moda_smem_addr(dvv + moda_swz<D>(r, cc * 8)), vs, ok);
            }
        } else {
            const int j0 = seq_stage * SR;
            /* Not unrolled: unrolled, the compiler keeps every chunk's addresses live across the whole key
             * loop (up to 28 bytes of spills); the cp.async issue is not on the critical path. */
#pragma unroll 1
            for (int ci = 0; ci < SR * CH / TR::THREADS; ci++) {
                const int c = tid + ci * TR::THREADS;
                const int r = c / CH, cc = c % CH;
                const int64_t j = j0 + r;
                const bool ok = j < jend;
                const T *ks = ok ? kb + j * p.ks[1] + cc * 8 : kb;
                const T *vs = ok ? vb + j * p.vs[1] + cc * 8 : vb;
                moda_cp_async16(moda_smem_addr(dk + moda_swz<D>(r, cc * 8)), ks, ok);
                moda_cp_async16(moda_smem_addr(dvv + moda_swz<D>(r, cc * 8)), vs, ok);
            }
        }
    };

    float acc[MT][D / 8][4];
    float mrow[MT][2], lrow[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int n = 0; n < D / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[mt][n][e] = 0.f;
        mrow[mt][0] = mrow[mt][1] = -INFINITY;
        lrow[mt][0] = lrow[mt][1] = 0.f;
    }

    if (ntiles > 0) {
        /* Prologue: Q and the first STAGES-1 tiles, one commit group each (Q rides with tile 0). */
#pragma unroll
        for (int ci = 0; ci < BM * CH / TR::THREADS; ci++) {
            const int c = tid + ci * TR::THREADS;
            const int r = c / CH, cc = c % CH;
            const int R = R0 + r;
            const bool ok = R < NR;
            const T *src = ok ? qb + (int64_t)(R / G) * p.qs[1] + (int64_t)(R % G) * p.qs[3] + cc * 8 : qb;
            moda_cp_async16(moda_smem_addr(sQ + moda_swz<D>(r, cc * 8)), src, ok);
        }
#pragma unroll
        for (int st = 0; st < STAGES - 1; st++) {
            if (st < ntiles) load_tile(st, st);
            moda_cp_async_commit();
        }

        uint32_t qf[MT][TR::QS ? 1 : D / 16][4];
        for (int it = 0; it < ntiles; it++) {
            moda_cp_async_wait<STAGES - 2>();
            __syncthreads();
            if (!TR::QS && it == 0) {
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int kk = 0; kk < D / 16; kk++) {
                        const int r = warp * WR + mt * 16 + (lane & 15);
                        const int col = kk * 16 + (lane >> 4) * 8;
                        moda_ldmatrix_x4(qf[mt][kk], moda_smem_addr(sQ + moda_swz<D>(r, col)));
                    }
            }
            {
                const int nx = it + STAGES - 1;
                if (nx < ntiles) load_tile(nx, nx % STAGES);
                moda_cp_async_commit();
            }
            if (!wvalid) continue;
            const int stage = it % STAGES;
            const T *tk = sK + stage * SR * D;
            const T *tv = sV + stage * SR * D;
#if MODA_FWD_INTERLEAVE
            const int di = depth_before(it);
            const bool depth_tile = depth_before(it + 1) > di;
            const int seq_stage = it - di;
#else
            const int di = it;
            const bool depth_tile = it < ndt;
            const int seq_stage = it - ndt;
#endif
            if (depth_tile) {
                /* Depth: this warp's DK keys [kx0, kx0 + DK) of its own list, at shared rows DK*warp.. */
                const int kx0 = di * DK;
                if (kx0 >= ws.nkeys) continue;
                const int tok_lo = ws.u0 + kx0 / L;
                const int tok_hi = ws.u0 + (min(kx0 + DK, ws.nkeys) - 1) / L;
                bool on[MT];
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
                    on[mt] = tok_hi >= row_lo(mt_t0[mt], p.chunk, p.C) && tok_lo <= mt_t1[mt];
                float s[MT][DK / 8][4];
                tile_qk<T, D, MT, DK / 8, TR::QS>(s, qf, sQ, warp * WR, tk, DK * warp, lane, on);
                const int q0 = kx0 / L, r0 = kx0 - q0 * L;
#pragma unroll
                for (int n = 0; n < DK / 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int col = n * 8 + 2 * (lane & 3) + e;
                        const int ctok = ws.u0 + q0 + (r0 + col) / L;
                        const bool cok = kx0 + col < ws.nkeys;
#pragma unroll
                        for (int mt = 0; mt < MT; mt++)
#pragma unroll
                            for (int i = 0; i < 2; i++) {
                                const bool ok = cok && ctok >= tlo[mt][i] && ctok <= trow[mt][i];
                                float &x = s[mt][n][2 * i + e];
                                if (!ok) x = -INFINITY;
                            }
                    }
                tile_softmax_pv<T, D, MT, DK / 8>(s, acc, mrow, lrow, tv, DK * warp, lane, on, p.scale_log2);
            } else {
#pragma unroll
                for (int hh = 0; hh < SR / BN; hh++) {
                    const int j0 = seq_stage * SR + hh * BN;
                    bool on[MT];
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) on[mt] = !p.causal || j0 <= mt_t1[mt];
                    if (!on[MT - 1]) break; /* the last m-tile has the latest tokens */
                    float s[MT][BN / 8][4];
                    tile_qk<T, D, MT, BN / 8, TR::QS>(s, qf, sQ, warp * WR, tk, hh * BN, lane, on);
                    const bool need_mask = p.causal ? (j0 + BN - 1 > ws.t0) : (j0 + BN > jend);
                    if (need_mask) {
#pragma unroll
                        for (int n = 0; n < BN / 8; n++)
#pragma unroll
                            for (int e = 0; e < 2; e++) {
                                const int j = j0 + n * 8 + 2 * (lane & 3) + e;
#pragma unroll
                                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                                    for (int i = 0; i < 2; i++) {
                                        const bool ok = j < jend && (!p.causal || j <= trow[mt][i]);
                                        float &x = s[mt][n][2 * i + e];
                                        if (!ok) x = -INFINITY;
                                    }
                            }
                    }
                    tile_softmax_pv<T, D, MT, BN / 8>(s, acc, mrow, lrow, tv, hh * BN, lane, on, p.scale_log2);
                }
            }
        }
        moda_cp_async_wait<0>();
    }

    /* Epilogue: normalise, write O (and LSE in natural log). Empty rows: O = 0, LSE = -inf. */
    T *ob = reinterpret_cast<T *>(p.o) + b * p.os[0] + h * p.os[2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int R = Rw0 + mt * 16 + (lane >> 2) + 8 * i;
            const float l = moda_quad_sum(lrow[mt][i]);
            if (R >= NR) continue;
            const int64_t t = R / G, g = R % G;
            const float inv = l > 0.f ? 1.f / l : 0.f;
            T *orow = ob + t * p.os[1] + g * p.os[3];
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                const int col = n * 8 + 2 * (lane & 3);
                *reinterpret_cast<uint32_t *>(orow + col) =
                    moda_dt<T>::pack2(acc[mt][n][2 * i] * inv, acc[mt][n][2 * i + 1] * inv);
            }
            if (p.lse && (lane & 3) == 0) {
                const float lse = l > 0.f ? fmaf(mrow[mt][i], p.scale_log2, log2f(l)) * 0.69314718055994531f : -INFINITY;
                p.lse[b * p.lses[0] + t * p.lses[1] + h * p.lses[2] + g * p.lses[3]] = lse;
            }
        }
}

template <typename T, typename TR> moda_status launch_fast(const fast_params &prm, int64_t B, int64_t Hk,
                                                             cudaStream_t stream) {
    const int64_t nblocks = prm.nrb * B * Hk;
    if (nblocks > 2147483647LL)
        return moda_fail(MODA_ERR_UNSUPPORTED, "CUDA forward: %lld thread blocks exceed the grid limit",
                         (long long)nblocks);
    MODA_CUDA_TRY(cudaFuncSetAttribute(fast_fwd_kernel<T, TR>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)TR::SMEM));
    fast_fwd_kernel<T, TR><<<(unsigned)nblocks, TR::THREADS, TR::SMEM, stream>>>(prm);
    MODA_CUDA_TRY_LAUNCH("fast_fwd_kernel");
    return MODA_OK;
}

/* The dispatch table: one tile configuration per head dim (docs/cuda_notes.md). d = 64: 4 warps x 2 m16 tiles,
 * 128-key stages (two 64-key softmax steps per barrier, 32-key warp-private depth steps), 3 stages; d = 128:
 * 4 warps x 2 m16 tiles with Q read from shared memory per step (the registers hold the 128 accumulators),
 * 64-key stages, 2 stages. MODA_FWD_V1_TILES (never defined by the build; for A/B timing only) selects the
 * first measured shapes instead: 64-key stages for d = 64, one m16 tile per warp with Q in registers for 128. */
#ifdef MODA_FWD_V1_TILES
typedef fast_traits<64, 2, 3, 64> traits_d64;
typedef fast_traits<128, 1, 2, 64> traits_d128;
#else
typedef fast_traits<64, 2, 3, 128> traits_d64;
typedef fast_traits<128, 2, 2, 64, true> traits_d128;
#endif
template <typename T> moda_status dispatch_d(const moda_problem *p, fast_params &prm, cudaStream_t stream) {
    if (p->d == 64) {
        prm.nrb = (prm.NR + traits_d64::BM - 1) / traits_d64::BM;
        return launch_fast<T, traits_d64>(prm, p->B, p->Hk, stream);
    }
    prm.nrb = (prm.NR + traits_d128::BM - 1) / traits_d128::BM;
    return launch_fast<T, traits_d128>(prm, p->B, p->Hk, stream);
}

} // namespace

int moda_cuda_fast_forward_supports(const moda_problem *p) {
    if (p->dtype != MODA_F16 && p->dtype != MODA_BF16) return 0;
    if (p->d != p->dv || (p->d != 64 && p->d != 128)) return 0;
    /* The softmax state keeps raw maxima (tile_softmax_pv): a positive scale whose s*log2(e) is a normal float. */
    const double sl = p->scale * 1.4426950408889634;
    if (!(sl >= 1.1754943508222875e-38 && sl <= 3.4028234663852886e38)) return 0;
    /* 16-byte cp.async rows: every used base pointer 16-byte aligned, every outer stride a multiple of 8. */
    const moda_operand *ops[6] = {&p->q, &p->k, &p->v, &p->kd, &p->vd, &p->o};
    const int ndims[6] = {5, 4, 4, 5, 5, 5};
    for (int i = 0; i < 6; i++) {
        if (!ops[i]->data) continue;
        if (((uintptr_t)ops[i]->data) % 16) return 0;
        for (int k = 0; k < ndims[i] - 1; k++)
            if (ops[i]->stride[k] % 8) return 0;
    }
    /* 32-bit row, token and depth-key indices inside one (b, h); chunk mode may list up to C + BM tokens. */
    const int64_t lim = 2147483647LL - 4096;
    const int64_t toks = p->chunk ? (p->chunk_size < p->T ? p->chunk_size : p->T) + 256 : 256;
    if (p->T * p->G > lim || moda_problem_slots(p) > lim / toks) return 0;
    return 1;
}

moda_status moda_cuda_fast_forward(const moda_problem *p, cudaStream_t stream) {
    fast_params prm;
    moda_fwd_shape_fill(&prm, p);
    if (p->dtype == MODA_BF16) return dispatch_d<__nv_bfloat16>(p, prm, stream);
    return dispatch_d<__half>(p, prm, stream);
}
