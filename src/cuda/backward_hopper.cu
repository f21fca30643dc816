/*
 * backward_hopper.cu - the sm_90a (wgmma) form of the fused non-deterministic
 * sequence pass of the backward (issues 4/5): dK, dV written, s * dQ added to the fp32 dqacc workspace with
 * red.global.add; the preprocess (Delta), the depth stage and bw_dq_finish_kernel stay the existing ones.
 * The default there on compute capability 9.x (backward.cu's hook, bw_hopper_use; MODA_CUDA_BWD_HOPPER=0 turns it
 * off); the design record and its first measurements are in docs/cuda_backward_notes.md, "Hopper backward".
 * A second instantiation (bw_hopper_dkdv_kernel, DQ = false) computes dK and dV only, for the deterministic
 * two-pass (deterministic) path, the default there too (MODA_CUDA_BWD_HOPPER_DKDV=0 turns it off): no dS^T tile,
 * no dQ barrier, no atomics.
 *
 * CTA = 3 warpgroups and 128 keys (j0 .. j0+127) of one (b, h); d = dv in {64, 128}; the query rows
 * R = t*G + g of that head that see the keys are walked in steps of BM = 64 rows (d = 128: 32, so that dK and
 * dV, 128 accumulator registers, leave room for S^T and dP^T):
 *  - warpgroup 0 (producer, setmaxnreg.dec): its 128 threads gather the Q and dO rows of a step with
 *    cp.async into a 4-stage ring (128B-swizzled rows, zero-filled past the last row) and write the step's
 *    lse*log2e, Delta and token per row; each thread waits for its own copies one step later, fences them to
 *    the async proxy (wgmma reads them) and arrives on the stage's "full" mbarrier (count 128). cp.async, not
 *    TMA: a row tile is a (t, g) gather for any G, as in the forward.
 *  - warpgroups 1, 2 (consumers, 64 keys each): K and V of the CTA stay in shared memory (cp.async once).
 *    Per step:  S^T = K Q^T and dP^T = V dO^T (wgmma m64nBMk16, both operands K-major from shared memory),
 *    P^T = exp2(S^T s log2e - lse log2e) (masked: key >= T, causal key > token), dS^T = P^T (dP^T - Delta),
 *    dV += P^T dO and dK += dS^T Q (wgmma m64n64k16 per 64-column half, A = P^T / dS^T from registers: the
 *    m64nN accumulator layout of a warp is the mma.sync C layout of its 16 rows, whose packed pairs are the A
 *    fragment; B = dO / Q as the MN-major (transposed) operand, exactly the forward's P V), "empty" arrive.
 *    dS^T goes to a double-buffered shared tile [128 keys][BM rows]; after a 256-thread named barrier each
 *    consumer warp computes a 16-row x 32-column piece of dQ = dS K over all 128 keys with mma.sync
 *    (ldmatrix.trans, the fused kernel's tiling and addressing) and adds s * dQ to dqacc with
 *    red.global.add.v2.f32.
 *  - end: dK * s and dV in the storage dtype, one 32-bit store per accumulator pair (bw_store_acc's form).
 *
 * All sm_90a instructions sit under __CUDA_ARCH_FEAT_SM90_ALL: the sm_80 pass compiles an empty kernel, which
 * the host detects (binary version and the kernel's static shared memory) before it ever chooses this path.
 */
#include "backward_hopper.cuh"
#include "hopper_common.cuh"

#include <math.h>
#include <stdlib.h>

namespace {

constexpr int HB_BN = 128;      /* keys per CTA: 2 consumer warpgroups x 64 */
constexpr int HB_STAGES = 4;    /* Q/dO ring depth */
constexpr int HB_THREADS = 384; /* producer warpgroup + 2 consumer warpgroups */

/* d = dv = D (64 or 128); rows per step BM = 64 (d = 64) or 32 (d = 128: dK, dV take 128 accumulator
 * registers, so S^T, dP^T shrink to m64n32). Tiles of D columns are NH halves of 64 columns (128-byte rows,
 * 128B swizzle), each half a contiguous [rows][64] block, as the forward stores d = 128. */
template <int D_, bool DQ_ = true> struct hb_traits {
    static constexpr int D = D_, NH = D / 64;
    static constexpr int BM = D == 64 ? 64 : 32;
    static constexpr int LDS = BM + 8;                   /* dS^T rows [key][BM], padded (ldmatrix only) */
    static constexpr int KV_BYTES = HB_BN * D * 2;       /* one of K or V */
    static constexpr int ROW_BYTES = BM * D * 2;         /* one of Q or dO per stage */
    static constexpr int STAGE_BYTES = 2 * ROW_BYTES;    /* Q | dO */
    static constexpr int DS_BYTES = HB_BN * LDS * 2;     /* dS^T, two buffers */
    static constexpr int STAT_BYTES = BM * 12;           /* lse2 | Delta | token, per stage */
    /* K at 0, V at KV_BYTES; every wgmma tile starts on a 1024-byte boundary */
    static constexpr int OFF_RING = 2 * KV_BYTES;
    static constexpr int OFF_DS = OFF_RING + HB_STAGES * STAGE_BYTES;
    static constexpr int OFF_STAT = OFF_DS + (DQ_ ? 2 * DS_BYTES : 0); /* the dK/dV-only form has no dS^T tile */
    static constexpr size_t SMEM = 1024 + (size_t)OFF_STAT + (size_t)HB_STAGES * STAT_BYTES;
    static_assert(NH * 64 == D && BM * (D / 8) == 512, "4 16-byte chunks per producer thread");
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

/* the mbarrier, proxy-fence and wgmma primitives are in hopper_common.cuh */
__device__ __forceinline__ void hb_bar_consumers(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }

/* SS m64n64k16: both operands K-major from shared memory (S^T = K Q^T, dP^T = V dO^T); scale_d = 0 on the
 * first k-step. RS m64n64k16: A from registers, B MN-major (transpose bit), always accumulating. */
#define HB_WGMMA_SS_N64(NAME, TY) \
    static __device__ __forceinline__ void NAME(float (&d)[8][4], uint64_t da, uint64_t db, int scale_d) { \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" \
                     "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
                     "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31" \
                     "}, %32, %33, p, 1, 1, 0, 0;\n}\n" \
                     : MODA_HOP_ACC_N64(d) \
                     : "l"(da), "l"(db), "r"(scale_d)); \
    }
/* m64n32k16 SS: S^T and dP^T for d = 128 (32 rows per step); B = 32 K-major rows, the same descriptor */
#define HB_WGMMA_SS_N32(NAME, TY) \
    static __device__ __forceinline__ void NAME(float (&d)[4][4], uint64_t da, uint64_t db, int scale_d) { \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" \
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " {" \
                     "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15" \
                     "}, %16, %17, p, 1, 1, 0, 0;\n}\n" \
                     : MODA_HOP_ACC_N32(d) \
                     : "l"(da), "l"(db), "r"(scale_d)); \
    }
HB_WGMMA_SS_N64(hb_wgmma_ss64_bf16, "bf16")
HB_WGMMA_SS_N64(hb_wgmma_ss64_f16, "f16")
HB_WGMMA_SS_N32(hb_wgmma_ss32_bf16, "bf16")
HB_WGMMA_SS_N32(hb_wgmma_ss32_f16, "f16")
MODA_HOP_WGMMA_RS_N64(hb_wgmma_rs_bf16, "bf16")
MODA_HOP_WGMMA_RS_N64(hb_wgmma_rs_f16, "f16")

template <typename E> struct hb_mma;
template <> struct hb_mma<__nv_bfloat16> {
    static __device__ __forceinline__ void ss(float (&d)[8][4], uint64_t a, uint64_t b, int sc) {
        hb_wgmma_ss64_bf16(d, a, b, sc);
    }
    static __device__ __forceinline__ void ss(float (&d)[4][4], uint64_t a, uint64_t b, int sc) {
        hb_wgmma_ss32_bf16(d, a, b, sc);
    }
    static __device__ __forceinline__ void rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {
        hb_wgmma_rs_bf16(d, a, b);
    }
};
template <> struct hb_mma<__half> {
    static __device__ __forceinline__ void ss(float (&d)[8][4], uint64_t a, uint64_t b, int sc) {
        hb_wgmma_ss64_f16(d, a, b, sc);
    }
    static __device__ __forceinline__ void ss(float (&d)[4][4], uint64_t a, uint64_t b, int sc) {
        hb_wgmma_ss32_f16(d, a, b, sc);
    }
    static __device__ __forceinline__ void rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {
        hb_wgmma_rs_f16(d, a, b);
    }
};

/* dst[0..1] += (x, y) in fp32 at the L2, no return value (backward_mma.cu's bw_red2, sm_90 form). */
__device__ __forceinline__ void hb_red2(float *dst, float x, float y) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(x), "f"(y) : "memory");
}


/* Element offset of (row, col) in a tile of `rows` rows x D columns stored as D/64 swizzled 64-column halves. */
template <int D> __device__ __forceinline__ int hb_tile_off(int rows, int row, int col) {
    return (col >> 6) * rows * 64 + moda_swz<64>(row, col & 63);
}

/* Producer warpgroup: gathers the Q and dO rows of every step into the ring (see the file comment). */
template <typename E, int D, bool DQ>
__device__ __forceinline__ void hb_producer(const bw_params &p, unsigned char *base, uint32_t bar_full,
                                            uint32_t bar_empty, int64_t b, int64_t h, int rbeg, int nsteps) {
    typedef hb_traits<D, DQ> TR;
    constexpr int BM = TR::BM, CH = D / 8;
    const int pt = threadIdx.x; /* 0..127 */
    const int G = (int)p.G, nrows = (int)(p.T * p.G);
    const E *qb = reinterpret_cast<const E *>(p.q.data), *ob = reinterpret_cast<const E *>(p.dout.data);
    for (int it = 0; it < nsteps; it++) {
        const int stg = it % HB_STAGES;
        moda_mbar_wait(bar_empty + 8 * stg, (uint32_t)(((it / HB_STAGES) & 1) ^ 1));
        const int r0 = rbeg + it * BM;
        const uint32_t sq = moda_smem_addr(base + TR::OFF_RING + stg * TR::STAGE_BYTES), sd = sq + TR::ROW_BYTES;
#pragma unroll
        for (int ci = 0; ci < BM * CH / 128; ci++) {
            const int c = pt + 128 * ci;
            const int r = c / CH, cc = c % CH;
            const int R = r0 + r;
            const bool ok = R < nrows;
            int64_t oq = 0, od = 0;
            if (ok) {
                const int t = R / G, g = R - t * G;
                oq = bw_off4(p.q, b, t, h, g);
                od = bw_off4(p.dout, b, t, h, g);
            }
            const uint32_t so = 2u * (uint32_t)hb_tile_off<D>(BM, r, cc * 8);
            moda_cp_async16(sq + so, qb + oq + cc * 8, ok);
            moda_cp_async16(sd + so, ob + od + cc * 8, ok);
        }
        if (pt < BM) {
            float *st = reinterpret_cast<float *>(base + TR::OFF_STAT + stg * TR::STAT_BYTES);
            const int R = r0 + pt;
            float l2 = __int_as_float(0x7f800000), dl = 0.f; /* padding rows: P = exp2(-inf) = 0, dS = 0 */
            int tok = 0;
            if (R < nrows) {
                const int t = R / G, g = R - t * G;
                l2 = bw_load(p.lse, bw_off4(p.lse, b, t, h, g)) * BW_LOG2E;
                dl = p.delta[bw_row(p, b, t, h, g)];
                tok = t;
            }
            st[pt] = l2;
            st[BM + pt] = dl;
            reinterpret_cast<int *>(st)[2 * BM + pt] = tok;
        }
        moda_cp_async_commit();
        if (it > 0) {
            /* this thread's copies of the previous step have landed: publish them */
            moda_cp_async_wait<1>();
            moda_fence_async();
            moda_mbar_arrive(bar_full + 8 * ((it - 1) % HB_STAGES));
        }
    }
    if (nsteps > 0) {
        moda_cp_async_wait<0>();
        moda_fence_async();
        moda_mbar_arrive(bar_full + 8 * ((nsteps - 1) % HB_STAGES));
    }
}

template <typename E, int D, bool DQ>
__device__ __forceinline__ void hb_consumer(const bw_params &p, unsigned char *base, uint32_t bar_full,
                                            uint32_t bar_empty, int cwg, int64_t b, int64_t h, int j0, int rbeg,
                                            int nsteps) {
    typedef hb_traits<D, DQ> TR;
    constexpr int BM = TR::BM, NH = TR::NH, LDS = TR::LDS, CH = D / 8, NB = BM / 8, KB = BM / 16;
    constexpr int MTQ = BM / 16, CQ = D / (8 / MTQ); /* dQ: 8 warps as MTQ row tiles x (8 / MTQ) column tiles */
    static_assert(CQ == 32, "dQ warp tiles of 16 rows x 32 columns");
    const int ct = threadIdx.x - 128, lane = ct & 31, cw = ct >> 5, ww = cw & 3;
    const int T = (int)p.T, G = (int)p.G, nrows = T * G;
    E *sK = reinterpret_cast<E *>(base), *sV = reinterpret_cast<E *>(base + TR::KV_BYTES);

    /* K and V of the CTA's 128 keys (zero rows past T), once */
    {
        const E *kb = reinterpret_cast<const E *>(p.k.data), *vb = reinterpret_cast<const E *>(p.v.data);
#pragma unroll
        for (int ci = 0; ci < HB_BN * CH / 256; ci++) {
            const int c = ct + 256 * ci;
            const int r = c / CH, cc = c % CH;
            const int j = j0 + r;
            const bool ok = j < T;
            const int64_t ok_ = ok ? bw_off4(p.k, b, j, h, 0) : 0, ov = ok ? bw_off4(p.v, b, j, h, 0) : 0;
            const int so = hb_tile_off<D>(HB_BN, r, cc * 8);
            moda_cp_async16(moda_smem_addr(sK + so), kb + ok_ + cc * 8, ok);
            moda_cp_async16(moda_smem_addr(sV + so), vb + ov + cc * 8, ok);
        }
        moda_cp_async_commit();
        moda_cp_async_wait<0>();
        moda_fence_async();
        hb_bar_consumers(1);
    }

    float dk[NH][8][4], dv[NH][8][4];
#pragma unroll
    for (int hh = 0; hh < NH; hh++)
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dk[hh][n][e] = dv[hh][n][e] = 0.f;

    const int kg0 = j0 + 64 * cwg;                              /* first key of this warpgroup */
    const int jlo = kg0 + 16 * ww + (lane >> 2), jhi = jlo + 8; /* the keys of this thread's accumulator rows */
    /* the warpgroup's 64 K / V rows inside each 64-column half ([128 keys][64], 16 KB per half) */
    const uint32_t kaddr = moda_smem_addr(sK) + 64 * cwg * 128, vaddr = moda_smem_addr(sV) + 64 * cwg * 128;
    const float sl = p.scale_log2;
    const int qm0 = (cw % MTQ) * 16, qc0 = (cw / MTQ) * CQ; /* this warp's dQ piece: 16 rows x 32 columns */

    for (int it = 0; it < nsteps; it++) {
        const int stg = it % HB_STAGES;
        const int r0 = rbeg + it * BM;
        moda_mbar_wait(bar_full + 8 * stg, (uint32_t)((it / HB_STAGES) & 1));
        const uint32_t qaddr = moda_smem_addr(base + TR::OFF_RING + stg * TR::STAGE_BYTES);
        const uint32_t doaddr = qaddr + TR::ROW_BYTES;
        const float *l2 = reinterpret_cast<const float *>(base + TR::OFF_STAT + stg * TR::STAT_BYTES);
        const float *dl = l2 + BM;
        const int *tk = reinterpret_cast<const int *>(l2 + 2 * BM);

        /* S^T = K Q^T (group 1), dP^T = V dO^T (group 2), m64nBMk16: k16 step kk is half kk / 4 and a 32-byte
         * offset inside its swizzled 128-byte rows, as the forward's Q K^T */
        float s[NB][4], dp[NB][4];
        moda_wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            hb_mma<E>::ss(s, moda_sdesc(kaddr + (kk >> 2) * HB_BN * 128 + (kk & 3) * 32),
                          moda_sdesc(qaddr + (kk >> 2) * BM * 128 + (kk & 3) * 32), kk > 0);
        moda_wg_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            hb_mma<E>::ss(dp, moda_sdesc(vaddr + (kk >> 2) * HB_BN * 128 + (kk & 3) * 32),
                          moda_sdesc(doaddr + (kk >> 2) * BM * 128 + (kk & 3) * 32), kk > 0);
        moda_wg_commit();
        moda_wg_wait<1>();
        moda_reg_fence(s);

        /* P^T: accumulator (n, 2i+e) is key jlo/jhi (i) against tile row n*8 + 2*(lane&3) + e. The mask is
         * needed where the warpgroup's keys straddle the diagonal and for keys past T (zero K rows would give
         * exp2(-lse2) != 0). Warpgroup-uniform. */
        const bool need_mask = (p.causal && r0 / G < kg0 + 63) || kg0 + 64 > T;
#pragma unroll
        for (int n = 0; n < NB; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int col = n * 8 + 2 * (lane & 3) + e;
                const float lr = l2[col];
                const int tok = tk[col];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const int j = i ? jhi : jlo;
                    const float x = bw_exp2(fmaf(s[n][2 * i + e], sl, -lr));
                    s[n][2 * i + e] = need_mask && (j >= T || (p.causal && j > tok)) ? 0.f : x;
                }
            }
        moda_wg_wait<0>();
        moda_reg_fence(dp);
        /* dS^T = P^T (dP^T - Delta), in place in dp */
#pragma unroll
        for (int n = 0; n < NB; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const float dr = dl[n * 8 + 2 * (lane & 3) + e];
#pragma unroll
                for (int i = 0; i < 2; i++) dp[n][2 * i + e] = s[n][2 * i + e] * (dp[n][2 * i + e] - dr);
            }
        /* A fragments (k16 step kk over the step's rows): the forward's P packing */
        uint32_t pf[KB][4], df[KB][4];
#pragma unroll
        for (int kk = 0; kk < KB; kk++) {
            pf[kk][0] = moda_dt<E>::pack2(s[2 * kk][0], s[2 * kk][1]);
            pf[kk][1] = moda_dt<E>::pack2(s[2 * kk][2], s[2 * kk][3]);
            pf[kk][2] = moda_dt<E>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pf[kk][3] = moda_dt<E>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            df[kk][0] = moda_dt<E>::pack2(dp[2 * kk][0], dp[2 * kk][1]);
            df[kk][1] = moda_dt<E>::pack2(dp[2 * kk][2], dp[2 * kk][3]);
            df[kk][2] = moda_dt<E>::pack2(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
            df[kk][3] = moda_dt<E>::pack2(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
        }
        /* dS^T -> shared [key][row] (buffer it & 1, rows padded by 8 elements: the 8 keys x 4 lanes of one
         * 32-bit store hit 32 distinct banks), before the wgmma that reads df is issued */
        E *dsb = reinterpret_cast<E *>(base + TR::OFF_DS + (it & 1) * TR::DS_BYTES);
        if (DQ) {
            E *dst = dsb + (64 * cwg + 16 * ww + (lane >> 2)) * LDS + 2 * (lane & 3);
#pragma unroll
            for (int kk = 0; kk < KB; kk++) {
                *reinterpret_cast<uint32_t *>(dst + kk * 16) = df[kk][0];
                *reinterpret_cast<uint32_t *>(dst + 8 * LDS + kk * 16) = df[kk][1];
                *reinterpret_cast<uint32_t *>(dst + kk * 16 + 8) = df[kk][2];
                *reinterpret_cast<uint32_t *>(dst + 8 * LDS + kk * 16 + 8) = df[kk][3];
            }
        }
        /* dV += P^T dO, dK += dS^T Q: B = each 64-column half of the [row][D] tile as the MN-major operand,
         * k16 step = 16 rows = 2048 bytes (the forward's P V) */
#pragma unroll
        for (int hh = 0; hh < NH; hh++) {
            moda_reg_fence(dv[hh]);
            moda_reg_fence(dk[hh]);
        }
        moda_wg_fence();
#pragma unroll
        for (int kk = 0; kk < KB; kk++)
#pragma unroll
            for (int hh = 0; hh < NH; hh++)
                hb_mma<E>::rs(dv[hh], pf[kk], moda_sdesc(doaddr + hh * BM * 128 + kk * 16 * 128));
#pragma unroll
        for (int kk = 0; kk < KB; kk++)
#pragma unroll
            for (int hh = 0; hh < NH; hh++)
                hb_mma<E>::rs(dk[hh], df[kk], moda_sdesc(qaddr + hh * BM * 128 + kk * 16 * 128));
        moda_wg_commit();
        moda_wg_wait<0>();
#pragma unroll
        for (int hh = 0; hh < NH; hh++) {
            moda_reg_fence(dv[hh]);
            moda_reg_fence(dk[hh]);
        }
        moda_mbar_arrive(bar_empty + 8 * stg); /* Q, dO and the stats of this stage are no longer read */
        if (!DQ) continue; /* dK/dV only: dQ is the deterministic row-block pass's (bw_launch_mma_dq) */

        /* dQ(BM rows x D) = dS K over the CTA's 128 keys; both warpgroups' dS^T are in dsb after the barrier.
         * One barrier per step suffices: buffer it & 1 is rewritten at step it + 2, after every consumer has
         * passed step it + 1's barrier, i.e. finished reading it at step it. */
        hb_bar_consumers(2);
        float dq[4][4];
#pragma unroll
        for (int n = 0; n < 4; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dq[n][e] = 0.f;
#pragma unroll
        for (int kt = 0; kt < HB_BN / 16; kt++) {
            uint32_t a[4];
            moda_ldmatrix_x4_trans(
                a, moda_smem_addr(dsb + (kt * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * LDS + qm0 +
                                  ((lane >> 3) & 1) * 8));
#pragma unroll
            for (int np = 0; np < 2; np++) {
                uint32_t r[4];
                moda_ldmatrix_x4_trans(r, moda_smem_addr(sK + hb_tile_off<D>(HB_BN, kt * 16 + (lane & 15),
                                                                             qc0 + np * 16 + (lane >> 4) * 8)));
                moda_mma<E>::run(dq[2 * np], a, r[0], r[1]);
                moda_mma<E>::run(dq[2 * np + 1], a, r[2], r[3]);
            }
        }
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int R = r0 + qm0 + (lane >> 2) + half * 8;
            if (R >= nrows) continue;
            const int t = R / G, g = R - t * G;
            float *row = p.dqacc + bw_row(p, b, t, h, g) * D + qc0 + (lane & 3) * 2;
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
                hb_red2(row + nt * 8, dq[nt][half * 2] * p.scale, dq[nt][half * 2 + 1] * p.scale);
        }
    }

    /* dK * s and dV of this thread's two keys, storage dtype */
    E *dkb = reinterpret_cast<E *>(p.dk.data), *dvb = reinterpret_cast<E *>(p.dv_.data);
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int j = i ? jhi : jlo;
        if (j >= T) continue;
        const int64_t ok_ = bw_off4(p.dk, b, j, h, 0), ov = bw_off4(p.dv_, b, j, h, 0);
#pragma unroll
        for (int hh = 0; hh < NH; hh++)
#pragma unroll
            for (int n = 0; n < 8; n++) {
                const int col = hh * 64 + n * 8 + 2 * (lane & 3);
                *reinterpret_cast<uint32_t *>(dkb + ok_ + col) =
                    moda_dt<E>::pack2(dk[hh][n][2 * i] * p.scale, dk[hh][n][2 * i + 1] * p.scale);
                *reinterpret_cast<uint32_t *>(dvb + ov + col) =
                    moda_dt<E>::pack2(dv[hh][n][2 * i], dv[hh][n][2 * i + 1]);
            }
    }
}

/* The CTA (see the file comment); DQ = false: the dK/dV-only form of the deterministic two-pass path (no dS^T
 * tile, no dQ barrier, no atomics: every dK/dV element is written by the one CTA that owns its key). */
template <typename E, int D, bool DQ>
__device__ __forceinline__ void hb_cta(const bw_params &p, uint64_t *bars, unsigned char *smem_raw) {
    unsigned char *base =
        reinterpret_cast<unsigned char *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~(uintptr_t)1023);
    const uint32_t bar_full = moda_smem_addr(&bars[0]), bar_empty = moda_smem_addr(&bars[HB_STAGES]);
    constexpr int BM = hb_traits<D, DQ>::BM;
    const int G = (int)p.G, nrows = (int)(p.T * p.G);
    /* causal: the early key blocks see the most rows and start first */
    const int j0 = (int)blockIdx.x * HB_BN;
    const int64_t h = blockIdx.y, b = blockIdx.z;
    const int rbeg = p.causal ? j0 * G : 0; /* rows before the block's first key see none of its keys */
    const int nsteps = (nrows - rbeg + BM - 1) / BM;

    if (threadIdx.x == 0) moda_mbar_ring_init(bar_full, bar_empty, HB_STAGES, 128, 256);
    __syncthreads();

    const int wg = threadIdx.x >> 7;
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
        hb_producer<E, D, DQ>(p, base, bar_full, bar_empty, b, h, rbeg, nsteps);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
        hb_consumer<E, D, DQ>(p, base, bar_full, bar_empty, wg - 1, b, h, j0, rbeg, nsteps);
    }
}

#endif /* sm_90a */

/* grid (key blocks, Hk, B). Static shared memory (the mbarriers) only in the sm_90a body: the host's probe. */
template <typename E, int D>
__global__ void __launch_bounds__(HB_THREADS, 1) bw_hopper_kernel(const __grid_constant__ bw_params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __shared__ __align__(8) uint64_t bars[2 * HB_STAGES];
    extern __shared__ unsigned char smem_raw[];
    hb_cta<E, D, true>(p, bars, smem_raw);
#endif
}
/* dK, dV only (MODA_CUDA_BWD_HOPPER_DKDV=1 in the two-pass path); same grid, same probe. */
template <typename E, int D>
__global__ void __launch_bounds__(HB_THREADS, 1) bw_hopper_dkdv_kernel(const __grid_constant__ bw_params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    __shared__ __align__(8) uint64_t bars[2 * HB_STAGES];
    extern __shared__ unsigned char smem_raw[];
    hb_cta<E, D, false>(p, bars, smem_raw);
#endif
}

typedef void (*hb_kernel_fn)(bw_params);
/* The full pass (DQ) or the dK/dV-only one. */
template <typename E, int D, bool DQ> hb_kernel_fn hb_kernel(void) {
    return DQ ? bw_hopper_kernel<E, D> : bw_hopper_dkdv_kernel<E, D>;
}

/* Whether the loaded image is the sm_90a body (forward_hopper.cu's probe): binary version 9.x and the
 * mbarriers' static shared memory. Once per process and instantiation. */
template <typename E, int D, bool DQ> int hb_probe(void) {
    cudaFuncAttributes fa;
    if (cudaFuncGetAttributes(&fa, hb_kernel<E, D, DQ>()) != cudaSuccess) {
        moda_cuda_clear_error();
        return 0;
    }
    return fa.binaryVersion >= 90 && fa.binaryVersion < 100 && fa.sharedSizeBytes >= 2 * HB_STAGES * sizeof(uint64_t);
}
template <typename E, int D, bool DQ> int hb_ready(void) {
    static const int ok = hb_probe<E, D, DQ>();
    return ok;
}

template <typename E, int D, bool DQ> cudaError_t hb_run(const bw_params *bp, cudaStream_t st) {
    const size_t smem = hb_traits<D, DQ>::SMEM;
    const hb_kernel_fn k = hb_kernel<E, D, DQ>();
    cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    const dim3 grid((unsigned)((bp->T + HB_BN - 1) / HB_BN), (unsigned)bp->Hk, (unsigned)bp->B);
    k<<<grid, HB_THREADS, smem, st>>>(*bp);
    return cudaGetLastError();
}

/* The conditions both forms share: f16/bf16, d == dv in {64, 128}, a sequence part, no row split (the split
 * reduction is backward_mma.cu's), compute capability 9.x with the sm_90a image of this form loaded. */
template <bool DQ> int hb_usable(const moda_problem *p, const bw_params *bp) {
    if (p->dtype != MODA_F16 && p->dtype != MODA_BF16) return 0;
    if (p->d != p->dv || (p->d != 64 && p->d != 128) || !p->sequence) return 0;
    if (bp->dkdv_nsplit > 1) return 0;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
        moda_cuda_clear_error();
        return 0;
    }
    if (major != 9) return 0;
    const int bf = p->dtype == MODA_BF16;
    if (p->d == 64) return bf ? hb_ready<__nv_bfloat16, 64, DQ>() : hb_ready<__half, 64, DQ>();
    return bf ? hb_ready<__nv_bfloat16, 128, DQ>() : hb_ready<__half, 128, DQ>();
}

template <bool DQ> cudaError_t hb_launch(const bw_params *bp, cudaStream_t st) {
    const int bf = bp->q.dtype == MODA_BF16;
    if (bp->d == 64) return bf ? hb_run<__nv_bfloat16, 64, DQ>(bp, st) : hb_run<__half, 64, DQ>(bp, st);
    return bf ? hb_run<__nv_bfloat16, 128, DQ>(bp, st) : hb_run<__half, 128, DQ>(bp, st);
}

} // namespace

int bw_hopper_use(const moda_problem *p, const bw_params *bp) {
    const char *e = getenv("MODA_CUDA_BWD_HOPPER"); /* on unless "0": the switch back to the mma.sync pass */
    if (e && e[0] == '0') return 0;
    /* the fused non-deterministic pass */
    if (bp->deterministic || !bp->dqacc) return 0;
    return hb_usable<true>(p, bp);
}

cudaError_t bw_launch_hopper(const bw_params *bp, cudaStream_t st) { return hb_launch<true>(bp, st); }

int bw_hopper_dkdv_use(const moda_problem *p, const bw_params *bp) {
    /* on unless "0": the deterministic default on sm_90 since its grid passed (2026-11-23, session 4) */
    const char *e = getenv("MODA_CUDA_BWD_HOPPER_DKDV");
    if (e && e[0] == '0') return 0;
    return hb_usable<false>(p, bp);
}

cudaError_t bw_launch_hopper_dkdv(const bw_params *bp, cudaStream_t st) { return hb_launch<false>(bp, st); }
