/*
 * forward_hopper.cu - the sm_90a (Hopper) MoDA forward: wgmma + TMA + warp specialisation for the sequence part,
 * with the depth part folded into the same online-softmax state (issue 5, forward half).
 *
 * Selected by api.cu on compute capability 9.0 for f16/bf16, d == dv in {64, 128}, TMA-legal views (16-byte
 * aligned bases, outer strides multiples of 16 bytes, unit innermost stride) and a positive scale; every other
 * problem keeps going to forward_fast.cu / forward_generic.cu. docs/cuda_hopper_notes.md has the design record.
 *
 * CTA = 3 warpgroups, BM = 128 query rows of ONE key/value head h, rows ordered R = t*G + g (as forward_fast:
 * a CTA's rows are whole tokens x all G heads, so one K/V tile serves the whole GQA group):
 *  - warpgroup 0 (producer, registers lowered with setmaxnreg): one thread streams the sequence K/V tiles
 *    (BN = 128 keys, 128B-swizzled, d = 128 as two 64-column halves) with cp.async.bulk.tensor into a STAGES-deep
 *    ring; "full" mbarriers complete on the transaction bytes, "empty" mbarriers collect the 256 consumer threads.
 *  - warpgroups 1 and 2 (consumers, 64 rows each): S = Q*K^T with wgmma m64n128k16 (Q and K K-major from shared
 *    memory), masked online softmax in registers (exp2 with the scale folded in, raw row maxima as in
 *    forward_fast), O += P*V with wgmma m64n64k16 (P from registers, V as the MN-major B operand).
 *  - depth part: each consumer warp walks its OWN depth list (its 16 rows' tokens x the visible slots,
 *    token-major; chunk mode from its first row's chunk start) in 16-key sub-tiles loaded with cp.async into
 *    warp-private shared buffers, with mma.sync m16n8k16 into the SAME accumulators: a warp's part of the wgmma
 *    m64nN accumulator is exactly the m16n8 C fragment of its 16 rows, and P's wgmma A fragment is the mma.sync A
 *    fragment. Waste is bounded by the warp's 16 rows (G of 16 useful per slot). When the token stride is L
 *    slots, key k of the list is at base + k x slot stride; otherwise positions in the list advance with carries
 *    instead of per-element divisions by L.
 *  - order, d = 64 (4-stage ring): the depth part first, then the sequence loop with intra-warpgroup overlap
 *    (S_j = Q*K_j^T issued together with O += P_{j-1}*V_{j-1}; tile j's softmax runs while that P*V does).
 *    d = 128 (2 stages, too few to hold two tiles): one tile at a time, the depth sub-tiles spread over the
 *    sequence tiles (after each tile's release) with their loads issued ahead.
 *
 * All sm_90a instructions sit under __CUDA_ARCH_FEAT_SM90_ALL: the sm_80 pass (and a plain sm_90 one) compiles
 * an empty kernel, which the host detects (binary version and the kernel's static shared memory) before it ever
 * chooses this path.
 */
#include "forward_hopper.cuh"
#include "hopper_common.cuh"

#include <cudaTypedefs.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

namespace {

constexpr int HOP_BM = 128;       /* query rows per CTA: 2 consumer warpgroups x 64 */
constexpr int HOP_BN = 128;       /* sequence keys per stage */
constexpr int HOP_THREADS = 384;  /* producer warpgroup + 2 consumer warpgroups */
constexpr int HOP_DK = 16;        /* depth keys per warp-private sub-tile */

/* MODA_HOPPER_RING3 (off by default): d = 128 with a THREE-stage ring and the d = 64 overlapped loop unchanged. The
 * shared memory comes from the warps' own depth buffers: the depth part runs after the loop entirely in the idle
 * ring (3 buffers per warp), its first load issued only then. Session 8 (calls B): S5n (no depth) -6 to -15 %, but
 * S5 +2 to +5 %: the depth part after an overlapped loop runs exposed, where the shipped d = 128 loop hides it in
 * its issue gaps (docs/cuda_hopper_notes.md, "Session 8"). Kept, validated, as the base for the next step. */
#ifndef MODA_HOPPER_RING3
#define MODA_HOPPER_RING3 0
#endif
/* MODA_HOPPER_PV128 (off by default; NOT YET RUN on a device: session 8's call C, its A/B and grid, could not start
 * for want of device time): d = 128's P*V as ONE m64n128k16 per k-step instead of two m64n64k16 (the A fragment of
 * P read once): V's two 64-column halves are the MN-major operand's two swizzle atoms, LBO apart. */
#ifndef MODA_HOPPER_PV128
#define MODA_HOPPER_PV128 0
#endif

template <int D_> struct hop_traits {
    static constexpr int D = D_;
    static constexpr int NH = D / 64;                       /* 64-column (128-byte) halves */
    static_assert(NH * 64 == D, "d is a multiple of 64");
    static constexpr int DK = HOP_DK;                       /* depth keys per sub-tile */
    static constexpr bool RING3 = MODA_HOPPER_RING3 && D == 128; /* 3 stages, overlap, depth after in the ring */
    static constexpr int STAGES = D == 64 ? 4 : RING3 ? 3 : 2; /* sequence ring depth */
    static constexpr int DB = D == 64 ? 2 : RING3 ? 0 : 1;  /* the warp's own depth buffers */
    static constexpr int DBX = RING3 ? 3 : DB;              /* RING3: 3 buffers in flight, all in the ring */
    static constexpr int ANCHOR_BYTES = RING3 ? 8 * 128 : 0; /* RING3: the loop's store anchor (there is no sD) */
    static constexpr int Q_BYTES = HOP_BM * D * 2;
    static constexpr int TILE_BYTES = HOP_BN * D * 2;       /* one of K or V for one stage */
    static constexpr int DEPTH_BYTES = DK * D * 2;          /* one of K or V for one depth buffer */
    static constexpr size_t SMEM = 1024 + (size_t)Q_BYTES + (size_t)STAGES * 2 * TILE_BYTES +
                                   (size_t)8 * DB * 2 * DEPTH_BYTES + (size_t)ANCHOR_BYTES;
    static_assert(!RING3 || (size_t)STAGES * 2 * TILE_BYTES == (size_t)8 * (DBX - DB) * 2 * DEPTH_BYTES,
                  "the ring holds the extra depth buffers of the 8 consumer warps");
    static_assert(SMEM <= 232448, "shared memory per block");
};

struct hop_params : moda_fwd_shape {
    CUtensorMap tmk, tmv;    /* 4-D maps of K and V: (column, then the three outer dims by ascending stride) */
    int perm[3];             /* perm[i]: which of (b, t, h) is tensor-map dimension i + 1 */
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ float hx2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ int hrow_lo(int t, int chunk, int C) { return chunk ? (t / C) * C : t; }

/* 128-byte swizzle of a row of 64 b16 elements: the 16-byte chunk index XOR row % 8. This is the pattern the
 * TMA writes with CU_TENSOR_MAP_SWIZZLE_128B and the one a wgmma descriptor with layout type 1 reads, so Q
 * (loaded with cp.async) and K/V (TMA) share it; also used for the warp-private depth tiles of D columns. */
template <int D> __device__ __forceinline__ int hswz(int row, int col) {
    return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

/* ---- TMA (the mbarrier and wgmma primitives are in hopper_common.cuh) ---- */
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap *map, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
                 "%3, %4, %5}], [%6];\n" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
                 : "memory");
}

/* ---- wgmma instructions (m64n128k16 SS for Q*K^T; m64n64k16 RS with B transposed for P*V) ---- */
/* One definition per shape, instantiated for both storage types (the type is part of the instruction name).
 * SS: Q*K^T, both operands K-major from shared memory, scale_d = 0 on the first k-step. RS: P*V, A (P) from
 * registers, B (V) from shared memory with the transpose bit (MN-major), always accumulating. */
#define HOP_WGMMA_SS_N128(NAME, TY) \
    static __device__ __forceinline__ void NAME(float (&d)[16][4], uint64_t da, uint64_t db, int scale_d) { \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" \
                     "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
                     "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
                     "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
                     "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63" \
                     "}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
                     : MODA_HOP_ACC_N128(d) \
                     : "l"(da), "l"(db), "r"(scale_d)); \
    }
HOP_WGMMA_SS_N128(wgmma_ss_n128_bf16, "bf16")
HOP_WGMMA_SS_N128(wgmma_ss_n128_f16, "f16")
MODA_HOP_WGMMA_RS_N64(wgmma_rs_n64_bf16, "bf16")
MODA_HOP_WGMMA_RS_N64(wgmma_rs_n64_f16, "f16")

/* m64n128k16, A from registers, B MN-major in two 64-column swizzle atoms LBO bytes apart; accumulates into the
 * two 64-column halves d0, d1 (register order: columns 0..127). */
#define HOP_WGMMA_RS_N128(NAME, TY) \
    static __device__ __forceinline__ void NAME(float (&d0)[8][4], float (&d1)[8][4], const uint32_t (&a)[4], \
                                                uint64_t db) { \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" \
                     "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
                     "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
                     "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
                     "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63" \
                     "}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n" \
                     : MODA_HOP_ACC_N64(d0), MODA_HOP_ACC_N64(d1) \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1)); \
    }
#if MODA_HOPPER_PV128
HOP_WGMMA_RS_N128(wgmma_rs_n128_bf16, "bf16")
HOP_WGMMA_RS_N128(wgmma_rs_n128_f16, "f16")
#endif

template <typename T> struct hop_mma;
template <> struct hop_mma<__nv_bfloat16> {
    static __device__ __forceinline__ void qk(float (&d)[16][4], uint64_t a, uint64_t b, int sc) {
        wgmma_ss_n128_bf16(d, a, b, sc);
    }
    static __device__ __forceinline__ void pv(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {
        wgmma_rs_n64_bf16(d, a, b);
    }
#if MODA_HOPPER_PV128
    static __device__ __forceinline__ void pv2(float (&d0)[8][4], float (&d1)[8][4], const uint32_t (&a)[4],
                                               uint64_t b) {
        wgmma_rs_n128_bf16(d0, d1, a, b);
    }
#endif
};
template <> struct hop_mma<__half> {
    static __device__ __forceinline__ void qk(float (&d)[16][4], uint64_t a, uint64_t b, int sc) {
        wgmma_ss_n128_f16(d, a, b, sc);
    }
    static __device__ __forceinline__ void pv(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {
        wgmma_rs_n64_f16(d, a, b);
    }
#if MODA_HOPPER_PV128
    static __device__ __forceinline__ void pv2(float (&d0)[8][4], float (&d1)[8][4], const uint32_t (&a)[4],
                                               uint64_t b) {
        wgmma_rs_n128_f16(d0, d1, a, b);
    }
#endif
};

/* Online softmax in two steps, so the overlapped loop can defer the rescale until its P*V has completed:
 * hop_softmax_row merges row i (0/1) of masked raw logits s (-inf where masked; NB*8 keys per row) into the
 * thread's online-softmax state of that row (m in raw units, l partial per quad lane), leaves the probabilities in
 * s and sets alpha, the factor for the row's output accumulators (hop_rescale_row). Same arithmetic as
 * forward_fast: one FFMA + one ex2 per probability. (alpha is an out-parameter rather than the return value:
 * returned, it let nvcc 13.0 commute an FFMA's operands in the overlapped loop, which changed the PTX that was
 * validated on the device.) */
template <int NB>
__device__ __forceinline__ void hop_softmax_row(float (&s)[NB][4], float (&m)[2], float (&l)[2], float sl, int i,
                                                float &alpha) {
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < NB; n++) mx = fmaxf(mx, fmaxf(s[n][2 * i], s[n][2 * i + 1]));
    mx = moda_quad_max(mx);
    const float mnew = fmaxf(m[i], mx);
    const float msc = mnew == -INFINITY ? 0.f : mnew * sl;
    alpha = hx2(fmaf(m[i], sl, -msc));
    m[i] = mnew;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < NB; n++) {
        s[n][2 * i] = hx2(fmaf(s[n][2 * i], sl, -msc));
        s[n][2 * i + 1] = hx2(fmaf(s[n][2 * i + 1], sl, -msc));
        sum += s[n][2 * i] + s[n][2 * i + 1];
    }
    l[i] = l[i] * alpha + sum;
}
template <int NO> __device__ __forceinline__ void hop_rescale_row(float (&o)[NO][8][4], int i, float alpha) {
#pragma unroll
    for (int h = 0; h < NO; h++)
#pragma unroll
        for (int n = 0; n < 8; n++) {
            o[h][n][2 * i] *= alpha;
            o[h][n][2 * i + 1] *= alpha;
        }
}
/* Both rows, each rescaling its accumulators at once. */
template <int NB, int NO>
__device__ __forceinline__ void hop_softmax(float (&s)[NB][4], float (&o)[NO][8][4], float (&m)[2], float (&l)[2],
                                            float sl) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float alpha;
        hop_softmax_row(s, m, l, sl, i, alpha);
        hop_rescale_row(o, i, alpha);
    }
}

/* moda_reg_fence for the output accumulators of all NH 64-column halves. */
template <int NH> __device__ __forceinline__ void hop_fence_o(float (&o)[NH][8][4]) {
#pragma unroll
    for (int hh = 0; hh < NH; hh++) moda_reg_fence(o[hh]);
}

/* S = Q*K^T of one warpgroup's 64 rows and a 128-key tile (both K-major, 128B-swizzled halves of 64 columns),
 * committed as one wgmma group. */
template <typename T, int D>
__device__ __forceinline__ void hop_issue_qk(float (&s)[HOP_BN / 8][4], uint32_t qaddr, uint32_t kaddr) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const uint32_t off = (kk & 3) * 32; /* k16 step inside the 128-byte row */
        const uint64_t da = moda_sdesc(qaddr + (kk >> 2) * HOP_BM * 128 + off);
        const uint64_t db = moda_sdesc(kaddr + (kk >> 2) * HOP_BN * 128 + off);
        hop_mma<T>::qk(s, da, db, kk > 0);
    }
    moda_wg_commit();
}
/* O += P*V for a 128-key tile, P as packed A fragments, V MN-major; one wgmma group. */
template <typename T, int NH>
__device__ __forceinline__ void hop_issue_pv(float (&o)[NH][8][4], uint32_t (&pf)[HOP_BN / 16][4], uint32_t vaddr) {
#if MODA_HOPPER_PV128
    if constexpr (NH == 2) {
        /* LBO (bits 16-29, in 16-byte units) = the distance between V's two 64-column halves */
        constexpr uint64_t lbo = (uint64_t)((HOP_BN * 128) >> 4) << 16;
#pragma unroll
        for (int kk = 0; kk < HOP_BN / 16; kk++)
            hop_mma<T>::pv2(o[0], o[1], pf[kk], (moda_sdesc(vaddr + kk * 16 * 128) & ~((uint64_t)0x3FFF << 16)) | lbo);
    } else
#endif
    {
#pragma unroll
        for (int kk = 0; kk < HOP_BN / 16; kk++)
#pragma unroll
            for (int hh = 0; hh < NH; hh++)
                hop_mma<T>::pv(o[hh], pf[kk], moda_sdesc(vaddr + hh * HOP_BN * 128 + kk * 16 * 128));
    }
    moda_wg_commit();
}
/* -inf outside the keys j0.. of a sequence tile that the thread's rows see (key < jend; causal: key <= the row's
 * token); only tiles crossing the diagonal (causal) or T need it. */
__device__ __forceinline__ void hop_mask_s(float (&s)[HOP_BN / 8][4], int j0, const hop_params &p, int jend, int tw0,
                                           const int (&trow)[2], int lane) {
    const bool need_mask = p.causal ? (j0 + HOP_BN - 1 > tw0) : (j0 + HOP_BN > jend);
    if (need_mask) {
#pragma unroll
        for (int n = 0; n < HOP_BN / 8; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = j0 + n * 8 + 2 * (lane & 3) + e;
#pragma unroll
                for (int i = 0; i < 2; i++)
                    if (!(j < jend && (!p.causal || j <= trow[i]))) s[n][2 * i + e] = -INFINITY;
            }
    }
}
/* Probabilities of keys 16k..16k+15 (s blocks 2k, 2k+1) as the A fragment of a k16 step (wgmma RS = mma.sync). */
template <typename T>
__device__ __forceinline__ void hop_pack_a(uint32_t (&a)[4], const float (&s0)[4], const float (&s1)[4]) {
    a[0] = moda_dt<T>::pack2(s0[0], s0[1]);
    a[1] = moda_dt<T>::pack2(s0[2], s0[3]);
    a[2] = moda_dt<T>::pack2(s1[0], s1[1]);
    a[3] = moda_dt<T>::pack2(s1[2], s1[3]);
}
template <typename T, int NB>
__device__ __forceinline__ void hop_pack_p(uint32_t (&pf)[NB / 2][4], const float (&s)[NB][4]) {
#pragma unroll
    for (int kk = 0; kk < NB / 2; kk++) hop_pack_a<T>(pf[kk], s[2 * kk], s[2 * kk + 1]);
}

template <typename T, int D>
__device__ __forceinline__ void hop_consumer(const hop_params &p, unsigned char *base, uint32_t bar_full,
                                             uint32_t bar_empty, int cwg, int ntiles, int64_t b, int64_t h, int R0,
                                             int jend) {
    typedef hop_traits<D> TR;
    constexpr int NH = TR::NH, STAGES = TR::STAGES, DB = TR::DB, DBX = TR::DBX, DK = TR::DK, CH = D / 8;
    const int ct = threadIdx.x - 128 * (cwg + 1), lane = ct & 31, ww = ct >> 5;
    const int cw = cwg * 4 + ww; /* consumer warp 0..7 */
    T *sQ = reinterpret_cast<T *>(base);
    unsigned char *ring = base + TR::Q_BYTES;
    T *sD = reinterpret_cast<T *>(ring + (size_t)STAGES * 2 * TR::TILE_BYTES) + (size_t)cw * DB * 2 * DK * D;
    const int NR = p.NR, G = p.G, L = p.L;
    const int Rg0 = R0 + 64 * cwg;            /* first row of this warpgroup */
    const int Rw0 = Rg0 + 16 * ww;            /* first row of this warp */
    const float sl = p.scale_log2;

    /* Q rows of this warpgroup -> shared (128B-swizzled halves), zero-filled beyond NR. */
    {
        const T *qb = reinterpret_cast<const T *>(p.q) + b * p.qs[0] + h * p.qs[2];
#pragma unroll
        for (int ci = 0; ci < 64 * CH / 128; ci++) {
            const int c = ct + ci * 128;
            const int r = c / CH, cc = c % CH;
            const int R = Rg0 + r;
            const bool ok = R < NR;
            const T *src = ok ? qb + (int64_t)(R / G) * p.qs[1] + (int64_t)(R % G) * p.qs[3] + cc * 8 : qb;
            moda_cp_async16(moda_smem_addr(sQ + (cc >> 3) * HOP_BM * 64 + hswz<64>(64 * cwg + r, (cc & 7) * 8)), src,
                            ok);
        }
        moda_cp_async_commit();
        moda_cp_async_wait<0>();
        /* the wgmma reads Q through the async proxy */
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cwg) : "memory");
    }

    float o[NH][8][4];
    float m[2], l[2];
#pragma unroll
    for (int hh = 0; hh < NH; hh++)
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[hh][n][e] = 0.f;
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.f;

    /* This thread's two rows: token, first visible depth token. */
    int trow[2], tlo[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int R = min(Rw0 + (lane >> 2) + 8 * i, NR - 1);
        trow[i] = R / G;
        tlo[i] = hrow_lo(trow[i], p.chunk, p.C);
    }

    /* ---------------- depth part: warp-private sub-tiles, mma.sync into the same state ----------------
     * Each sub-tile's cp.async is issued DB sub-tiles ahead. d = 64 runs all nd sub-tiles before the overlapped
     * sequence loop (which must hold no depth code: inlined into the loop, the sub-tile cost v2 its register
     * allocation and schedule, docs/cuda_hopper_notes.md); d = 128 spreads them over the warpgroup's sequence tiles
     * (after each tile's release; the rest after the loop), so their loads are in flight while the tensor cores
     * work on sequence tiles. */
    int wt0 = 0, wt1 = 0, u0 = 0, nkeys = 0, nd = 0;
    if (L > 0 && Rw0 < NR) {
        wt0 = Rw0 / G;
        wt1 = min(Rw0 + 15, NR - 1) / G;
        u0 = hrow_lo(wt0, p.chunk, p.C);
        nkeys = (wt1 - u0 + 1) * L;
        nd = (nkeys + DK - 1) / DK;
    }
    const T *kdb = reinterpret_cast<const T *>(p.kd) + b * p.kds[0] + h * p.kds[3];
    const T *vdb = reinterpret_cast<const T *>(p.vd) + b * p.vds[0] + h * p.vds[3];
    /* Key k of the warp's list is (token u0 + k / L, slot d0 + k % L). The loads of views whose token stride is not
     * L slots need that pair: instead of dividing per element, every offset is split once into (quotient,
     * remainder) by L, and positions advance with a carry: (q, r) + (dq, dr) with r, dr < L needs at most one
     * wrap. Loads are issued in order (the first DB, then one per depth_step), so the load stream carries its
     * (q, r) of k = it * DK. The mask needs no position: a row sees a contiguous key range of the list. */
    int dkq = 0, dkr = 0, lq0 = 0, lr0 = 0, lsq = 0, lsr = 0;
    if (nd > 0) {
        dkq = DK / L, dkr = DK - dkq * L;                       /* sub-tile stride */
        lq0 = (lane / CH) / L, lr0 = lane / CH - lq0 * L;       /* this lane's first loaded row */
        lsq = (32 / CH) / L, lsr = 32 / CH - lsq * L;           /* row step between a lane's loads */
    }
    int ldq = 0, ldr = 0; /* (q, r) of the next sub-tile to load */
    /* the keys of the list this thread's rows see: tokens tlo[i] .. trow[i] (tlo >= u0: the rows' tokens are at
     * least wt0, whose first visible token is u0; khi <= nkeys) */
    int klo[2], khi[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        klo[i] = (tlo[i] - u0) * L;
        khi[i] = (trow[i] - u0 + 1) * L;
    }
    auto adv = [&](int &q, int &r, int dq, int dr) {
        q += dq;
        r += dr;
        if (r >= L) {
            r -= L;
            q++;
        }
    };
    /* When both depth tensors' token stride is L slots (the standard [B, T, L, Hk, d] layout with every slot
     * visible, or any view with that property), key k of the list sits at klin + k * slot stride (and vlin): the
     * loads then need one multiply-add per copy instead of the (token, slot) carries below. Session 7 (call M):
     * S5 -9 %, S4 -2.7 %, S2 -2.2 % against the carried addressing. */
    const bool lin = p.kds[1] == (int64_t)L * p.kds[2] && p.vds[1] == (int64_t)L * p.vds[2];
    const T *klin = kdb + (int64_t)u0 * p.kds[1] + (int64_t)p.d0 * p.kds[2];
    const T *vlin = vdb + (int64_t)u0 * p.vds[1] + (int64_t)p.d0 * p.vds[2];
    auto load_depth = [&](int it, int buf) {
        T *dk = sD + buf * 2 * DK * D;
        if constexpr (TR::RING3)
            if (buf >= DB) dk = reinterpret_cast<T *>(ring) + (size_t)(cw * (DBX - DB) + buf - DB) * 2 * DK * D;
        T *dv = dk + DK * D;
        if (lin) {
#pragma unroll
            for (int ci = 0; ci < DK * CH / 32; ci++) {
                const int c = lane + ci * 32;
                const int rl = c / CH, cc = c % CH;
                const int kx = it * DK + rl;
                const bool ok = kx < nkeys;
                const T *ks = ok ? klin + (int64_t)kx * p.kds[2] + cc * 8 : kdb;
                const T *vs = ok ? vlin + (int64_t)kx * p.vds[2] + cc * 8 : vdb;
                moda_cp_async16(moda_smem_addr(dk + hswz<D>(rl, cc * 8)), ks, ok);
                moda_cp_async16(moda_smem_addr(dv + hswz<D>(rl, cc * 8)), vs, ok);
            }
            return;
        }
        const int q0 = ldq, r0 = ldr;
        adv(ldq, ldr, dkq, dkr);
        int eq = lq0, er = lr0; /* (q, r) of this lane's row rl */
#pragma unroll
        for (int ci = 0; ci < DK * CH / 32; ci++) {
            const int c = lane + ci * 32;
            const int rl = c / CH, cc = c % CH;
            const int kx = it * DK + rl;
            const bool ok = kx < nkeys;
            const T *ks = kdb, *vs = vdb;
            if (ok) {
                const int x = r0 + er, w = x >= L ? 1 : 0; /* r0 + rl = (eq + w) * L + (x - w * L) */
                const int64_t tok = u0 + q0 + eq + w, slot = p.d0 + (x - w * L);
                ks = kdb + tok * p.kds[1] + slot * p.kds[2] + cc * 8;
                vs = vdb + tok * p.vds[1] + slot * p.vds[2] + cc * 8;
            }
            adv(eq, er, lsq, lsr);
            moda_cp_async16(moda_smem_addr(dk + hswz<D>(rl, cc * 8)), ks, ok);
            moda_cp_async16(moda_smem_addr(dv + hswz<D>(rl, cc * 8)), vs, ok);
        }
    };
    /* Sub-tile `it` (its load was committed DB groups ago), then the load of sub-tile it + DB into its buffer. */
    auto depth_step = [&](int it) {
        moda_cp_async_wait<DBX - 1>();
        __syncwarp();
        const T *dk;
        if constexpr (TR::RING3) {
            const int buf = it % DBX;
            dk = buf < DB ? sD + buf * 2 * DK * D
                          : reinterpret_cast<const T *>(ring) + (size_t)(cw * (DBX - DB) + buf - DB) * 2 * DK * D;
        } else {
            dk = sD + (it % DB) * 2 * DK * D;
        }
        const T *dv = dk + DK * D;
        const int kx0 = it * DK;
        /* (every key of the list is seen by some row of the warp: no sub-tile can be skipped) */
        {
            float s[DK / 8][4];
#pragma unroll
            for (int n = 0; n < DK / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                /* Q's A fragment of the warp's 16 rows (mma.sync layout) from the swizzled Q tile */
                uint32_t qf[4];
                {
                    const int r = 64 * cwg + 16 * ww + (lane & 15);
                    const int col = (kk & 3) * 16 + (lane >> 4) * 8;
                    moda_ldmatrix_x4(qf, moda_smem_addr(sQ + (kk >> 2) * HOP_BM * 64 + hswz<64>(r, col)));
                }
#pragma unroll
                for (int n2 = 0; n2 < DK / 16; n2++) {
                    uint32_t kf[4];
                    const int key = n2 * 16 + (lane & 7) + ((lane >> 4) << 3);
                    const int col = kk * 16 + ((lane >> 3) & 1) * 8;
                    moda_ldmatrix_x4(kf, moda_smem_addr(dk + hswz<D>(key, col)));
                    moda_mma<T>::run(s[2 * n2], qf, kf[0], kf[1]);
                    moda_mma<T>::run(s[2 * n2 + 1], qf, kf[2], kf[3]);
                }
            }
#pragma unroll
            for (int n = 0; n < DK / 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int kx = kx0 + n * 8 + 2 * (lane & 3) + e;
#pragma unroll
                    for (int i = 0; i < 2; i++)
                        if (!(kx >= klo[i] && kx < khi[i])) s[n][2 * i + e] = -INFINITY;
                }
            hop_softmax<DK / 8, NH>(s, o, m, l, sl);
#pragma unroll
            for (int kk = 0; kk < DK / 16; kk++) {
                uint32_t pf[4];
                hop_pack_a<T>(pf, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
                for (int n2 = 0; n2 < D / 16; n2++) {
                    uint32_t vf[4];
                    const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int col = n2 * 16 + (lane >> 4) * 8;
                    moda_ldmatrix_x4_trans(vf, moda_smem_addr(dv + hswz<D>(key, col)));
                    moda_mma<T>::run(o[n2 >> 2][(2 * n2) & 7], pf, vf[0], vf[1]);
                    moda_mma<T>::run(o[n2 >> 2][(2 * n2 + 1) & 7], pf, vf[2], vf[3]);
                }
            }
        }
        __syncwarp(); /* every lane has read the buffer before it is refilled */
        const int nx = it + DBX;
        if (nx < nd) load_depth(nx, nx % DBX);
        moda_cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < DB; i++) {
        if (i < nd) load_depth(i, i);
        moda_cp_async_commit();
    }
    int dnext = 0;
    /* the overlapped sequence loop holds each stage until the next tile's iteration: it needs STAGES >= 3 */
    constexpr bool OVL = STAGES >= 3;
    if constexpr (OVL && !TR::RING3)
        while (dnext < nd) depth_step(dnext++);

    /* ---------------- sequence part: wgmma on the TMA ring ---------------- */
    const int tg1 = min(Rg0 + 63, NR - 1) / G;
    const int tw0 = min(Rw0, NR - 1) / G;
    const bool gvalid = Rg0 < NR;
    const uint32_t qaddr = moda_smem_addr(sQ) + 64 * cwg * 128;
    /* sequence tiles this warpgroup computes (causal: up to its last token) */
    const int nact = !gvalid ? 0 : p.causal ? min(ntiles, tg1 / HOP_BN + 1) : ntiles;
    if constexpr (OVL) {
        /* Intra-warpgroup overlap (FA3's scheme with one S accumulator set): per active tile j > first,
         *   wait full[j]; fence; S = Q*K_j^T (group A); O += P_{j-1}*V_{j-1} (group B, P packed in pf);
         *   wait_group 1 (A done: B may still run); mask + softmax of S without touching o;
         *   wait_group 0 (B done); release stage j-1; rescale o by alpha; pack S -> pf.
         * so the max/exp2 work of tile j runs while the tensor cores do P*V of tile j-1. A stage is released only
         * after the P*V that read its V has completed. The active tiles are a prefix [0, nact) of the CTA's tiles
         * (causal: up to the group's last token), the rest are waited for and released as before. The depth part ran
         * before, so no depth code sits in this loop. Each tile holds its stage until the NEXT tile's iteration
         * (V_{j-1} is read while K_j is), so the producer runs only STAGES - 2 tiles ahead: hence STAGES >= 3. */
        /* (a lambda local to this branch: defined for both branches, nvcc 13.0 reordered two independent integer
         * updates in the d = 128 depth loads, a PTX change against the validated build) */
        auto kaddr_of = [&](int stg) { return moda_smem_addr(ring + (size_t)stg * 2 * TR::TILE_BYTES); };
        float s[HOP_BN / 8][4];
        uint32_t pf[HOP_BN / 16][4];
        if (nact > 0) {
            /* first tile: nothing to overlap with; o may hold the depth part, rescaled as usual */
            moda_mbar_wait(bar_full, 0);
            hop_fence_o(o);
            moda_wg_fence();
            hop_issue_qk<T, D>(s, qaddr, kaddr_of(0));
            moda_wg_wait<0>();
            moda_reg_fence(s);
            hop_mask_s(s, 0, p, jend, tw0, trow, lane);
            hop_softmax<HOP_BN / 8, NH>(s, o, m, l, sl);
            hop_pack_p<T>(pf, s);
            for (int it = 1; it < nact; it++) {
                const int stg = it % STAGES, pstg = (it - 1) % STAGES;
                moda_mbar_wait(bar_full + 8 * stg, (uint32_t)((it / STAGES) & 1));
                hop_fence_o(o);
                moda_reg_fence(pf);
                moda_wg_fence(); /* orders the register writes to s, o and pf above before both groups */
                hop_issue_qk<T, D>(s, qaddr, kaddr_of(stg));
                hop_issue_pv<T, NH>(o, pf, kaddr_of(pstg) + TR::TILE_BYTES);
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); /* S done, P*V may run on */
                moda_reg_fence(s);
                hop_mask_s(s, it * HOP_BN, p, jend, tw0, trow, lane);
                float alpha[2];
#pragma unroll
                for (int i = 0; i < 2; i++) hop_softmax_row(s, m, l, sl, i, alpha[i]);
                /* Scheduling anchor (checked in the SASS with nvcc 13.0): ptxas hoists WARPGROUP.DEPBAR (the wait
                 * below) above plain arithmetic, which would put the whole softmax after the P*V wait and undo the
                 * overlap, but it keeps the wait after a shared-memory store. So store a value that depends on every
                 * probability (the row sums) to this warp's depth buffer, idle during the sequence loop (the depth
                 * part ran before it and its cp.async groups have all been waited for). */
                const float lsum2 = l[0] + l[1];
                uint32_t anchor;
                if constexpr (TR::RING3) /* (RING3 has no sD): an anchor slot of its own */
                    anchor = moda_smem_addr(ring) + STAGES * 2 * TR::TILE_BYTES + 8 * DB * 2 * TR::DEPTH_BYTES + cw * 128;
                else
                    anchor = moda_smem_addr(sD);
                asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(anchor + 4 * lane), "f"(lsum2) : "memory");
                moda_wg_wait<0>();
                hop_fence_o(o);
                moda_reg_fence(pf);
                moda_mbar_arrive(bar_empty + 8 * pstg); /* V_{it-1} has been read */
#pragma unroll
                for (int i = 0; i < 2; i++) hop_rescale_row(o, i, alpha[i]);
                hop_pack_p<T>(pf, s);
            }
            const int lstg = (nact - 1) % STAGES;
            hop_fence_o(o);
            moda_reg_fence(pf);
            moda_wg_fence();
            hop_issue_pv<T, NH>(o, pf, kaddr_of(lstg) + TR::TILE_BYTES);
            moda_wg_wait<0>();
            hop_fence_o(o);
            moda_reg_fence(pf);
            moda_mbar_arrive(bar_empty + 8 * lstg);
        }
        for (int it = nact; it < ntiles; it++) {
            const int stg = it % STAGES;
            moda_mbar_wait(bar_full + 8 * stg, (uint32_t)((it / STAGES) & 1));
            moda_mbar_arrive(bar_empty + 8 * stg);
        }
        if constexpr (TR::RING3) {
            /* the ring is idle once both warpgroups are past their last tile (every TMA write was waited for,
             * every wgmma read of it completed): its slices become depth buffers DB .. DBX-1 */
            asm volatile("bar.sync 3, 256;\n" ::: "memory");
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#pragma unroll
            for (int i = DB; i < DBX; i++) {
                if (i < nd) load_depth(i, i);
                moda_cp_async_commit();
            }
        }
    } else {
        /* d = 128 (2 stages): one tile at a time, each product waited for before its consumer; the depth
         * sub-tiles ride on the active tiles (after each tile's release, spread evenly; the rest after the loop) */
        for (int it = 0; it < ntiles; it++) {
            const int stg = it % STAGES;
            const uint32_t par = (uint32_t)((it / STAGES) & 1);
            const int j0 = it * HOP_BN;
            moda_mbar_wait(bar_full + 8 * stg, par);
            /* warpgroup-uniform: tiles entirely after the group's last token hold nothing for it */
            if (gvalid && !(p.causal && j0 > tg1)) {
                const uint32_t kaddr = moda_smem_addr(ring + (size_t)stg * 2 * TR::TILE_BYTES);
                const uint32_t vaddr = kaddr + TR::TILE_BYTES;
                float s[HOP_BN / 8][4];
                moda_wg_fence();
                hop_issue_qk<T, D>(s, qaddr, kaddr);
                moda_wg_wait<0>();
                moda_reg_fence(s);
                hop_mask_s(s, j0, p, jend, tw0, trow, lane);
                hop_softmax<HOP_BN / 8, NH>(s, o, m, l, sl);
                uint32_t pf[HOP_BN / 16][4];
                hop_pack_p<T>(pf, s);
                hop_fence_o(o);
                moda_wg_fence();
                hop_issue_pv<T, NH>(o, pf, vaddr);
                moda_wg_wait<0>();
                hop_fence_o(o);
            }
            moda_mbar_arrive(bar_empty + 8 * stg);
            if (it < nact) {
                const int upto = (int)(((int64_t)(it + 1) * nd) / nact);
                while (dnext < upto) depth_step(dnext++);
            }
        }
    }
    while (dnext < nd) depth_step(dnext++);
    moda_cp_async_wait<0>();

    /* Epilogue: normalise, write O and LSE (natural log). Empty rows: O = 0, LSE = -inf. */
    T *ob = reinterpret_cast<T *>(p.o) + b * p.os[0] + h * p.os[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int R = Rw0 + (lane >> 2) + 8 * i;
        const float lsum = moda_quad_sum(l[i]);
        if (R >= NR) continue;
        const int64_t t = R / G, g = R % G;
        const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
        T *orow = ob + t * p.os[1] + g * p.os[3];
#pragma unroll
        for (int hh = 0; hh < NH; hh++)
#pragma unroll
            for (int n = 0; n < 8; n++) {
                const int col = hh * 64 + n * 8 + 2 * (lane & 3);
                *reinterpret_cast<uint32_t *>(orow + col) =
                    moda_dt<T>::pack2(o[hh][n][2 * i] * inv, o[hh][n][2 * i + 1] * inv);
            }
        if (p.lse && (lane & 3) == 0) {
            const float lse = lsum > 0.f ? fmaf(m[i], sl, log2f(lsum)) * 0.69314718055994531f : -INFINITY;
            p.lse[b * p.lses[0] + t * p.lses[1] + h * p.lses[2] + g * p.lses[3]] = lse;
        }
    }
}

#endif /* sm_90a */

/* Static shared memory: the ring's mbarriers. Declared only in the sm_90a body, so a kernel whose attributes
 * show no static shared memory was compiled without it (api.cu / the launcher never choose it then). */
template <typename T, int D>
__global__ void __launch_bounds__(HOP_THREADS, 1) hopper_fwd_kernel(const __grid_constant__ hop_params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    typedef hop_traits<D> TR;
    constexpr int STAGES = TR::STAGES, NH = TR::NH;
    __shared__ __align__(8) uint64_t bars[2 * STAGES];
    extern __shared__ unsigned char smem_raw[];
    unsigned char *base =
        reinterpret_cast<unsigned char *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~(uintptr_t)1023);
    const uint32_t bar_full = moda_smem_addr(&bars[0]), bar_empty = moda_smem_addr(&bars[STAGES]);

    const int64_t bid = blockIdx.x;
    const int rb = (int)(p.nrb - 1 - bid % p.nrb); /* heaviest (latest) row blocks first */
    const int64_t bh = bid / p.nrb;
    const int64_t b = bh / p.Hk, h = bh % p.Hk;
    const int R0 = rb * HOP_BM;
    const int Rlast = min(R0 + HOP_BM, p.NR) - 1;
    const int jend = p.sequence ? (p.causal ? Rlast / p.G + 1 : p.T) : 0;
    const int ntiles = (jend + HOP_BN - 1) / HOP_BN;

    if (threadIdx.x == 0) moda_mbar_ring_init(bar_full, bar_empty, STAGES, 1, 256);
    __syncthreads();

    const int wg = threadIdx.x >> 7;
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (threadIdx.x == 0 && ntiles > 0) {
            unsigned char *ring = base + TR::Q_BYTES;
            for (int it = 0; it < ntiles; it++) {
                const int stg = it % STAGES;
                moda_mbar_wait(bar_empty + 8 * stg, (uint32_t)(((it / STAGES) & 1) ^ 1));
                moda_mbar_expect_tx(bar_full + 8 * stg, 2 * TR::TILE_BYTES);
                int c[3];
#pragma unroll
                for (int i = 0; i < 3; i++) c[i] = p.perm[i] == 1 ? it * HOP_BN : (int)(p.perm[i] == 0 ? b : h);
                const uint32_t kdst = moda_smem_addr(ring + (size_t)stg * 2 * TR::TILE_BYTES);
#pragma unroll
                for (int hh = 0; hh < NH; hh++) {
                    tma_load_4d(kdst + hh * HOP_BN * 128, &p.tmk, bar_full + 8 * stg, 64 * hh, c[0], c[1], c[2]);
                    tma_load_4d(kdst + TR::TILE_BYTES + hh * HOP_BN * 128, &p.tmv, bar_full + 8 * stg, 64 * hh, c[0],
                                c[1], c[2]);
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
        hop_consumer<T, D>(p, base, bar_full, bar_empty, wg - 1, ntiles, b, h, R0, jend);
    }
#endif
}

/* ---------------------------------------------------------------------------------------------------------
 * Host side
 * ------------------------------------------------------------------------------------------------------- */
/* cuTensorMapEncodeTiled through the runtime's driver entry point (no -lcuda); looked up once (a function-local
 * static: thread-safe initialisation). NULL when the driver does not offer it. */
PFN_cuTensorMapEncodeTiled_v12000 lookup_encode(void) {
    void *ptr = NULL;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) ==
            cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
        return (PFN_cuTensorMapEncodeTiled_v12000)ptr;
    moda_cuda_clear_error();
    return NULL;
}
PFN_cuTensorMapEncodeTiled_v12000 encode_fn(void) {
    static const PFN_cuTensorMapEncodeTiled_v12000 fn = lookup_encode();
    return fn;
}

/* K or V [B, T, Hk, D] as a 4-D tiled map: dimension 0 the columns (box 64 = 128 bytes, 128B swizzle), then
 * b, t, h ordered by ascending stride (perm says which is which); box (64, BN, 1, 1). Rows past T are
 * zero-filled by the copy engine. */
int encode_kv(CUtensorMap *map, int perm[3], const moda_operand *a, const moda_problem *p) {
    PFN_cuTensorMapEncodeTiled_v12000 fn = encode_fn();
    if (!fn) return 0;
    const int64_t ext[3] = {p->B, p->T, p->Hk};
    const int64_t str[3] = {a->stride[0], a->stride[1], a->stride[2]};
    int ord[3] = {0, 1, 2};
    for (int i = 0; i < 3; i++)
        for (int j = i + 1; j < 3; j++)
            if (str[ord[j]] < str[ord[i]]) {
                const int t = ord[i];
                ord[i] = ord[j];
                ord[j] = t;
            }
    cuuint64_t dims[4], strides[3];
    cuuint32_t box[4], es[4] = {1, 1, 1, 1};
    dims[0] = (cuuint64_t)p->d;
    box[0] = 64;
    for (int i = 0; i < 3; i++) {
        perm[i] = ord[i];
        dims[i + 1] = (cuuint64_t)ext[ord[i]];
        strides[i] = (cuuint64_t)str[ord[i]] * 2;
        box[i + 1] = ord[i] == 1 ? HOP_BN : 1;
    }
    const CUtensorMapDataType ty =
        p->dtype == MODA_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    const CUresult r = fn(map, ty, 4, a->data, dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS;
}

/* Whether the loaded image of the kernel is the sm_90a body: binary version 9.x and the mbarriers' static shared
 * memory (absent from the empty body an sm_80 or plain sm_90 pass compiles). Probed once per instantiation (one
 * process, one build: the image does not change between calls). */
template <typename T, int D> int probe_kernel(void) {
    cudaFuncAttributes fa;
    if (cudaFuncGetAttributes(&fa, hopper_fwd_kernel<T, D>) != cudaSuccess) {
        moda_cuda_clear_error();
        return 0;
    }
    return fa.binaryVersion >= 90 && fa.binaryVersion < 100 &&
           fa.sharedSizeBytes >= 2 * hop_traits<D>::STAGES * sizeof(uint64_t);
}
template <typename T, int D> int kernel_ready(void) {
    static const int ok = probe_kernel<T, D>();
    return ok;
}

template <typename T, int D> moda_status launch_hopper(hop_params &prm, const moda_problem *p, cudaStream_t stream) {
    prm.nrb = (prm.NR + HOP_BM - 1) / HOP_BM;
    const int64_t nblocks = prm.nrb * p->B * p->Hk;
    if (nblocks > 2147483647LL)
        return moda_fail(MODA_ERR_UNSUPPORTED, "CUDA forward: %lld thread blocks exceed the grid limit",
                         (long long)nblocks);
    /* per launch, as forward_fast: the limit belongs to the current device */
    MODA_CUDA_TRY(cudaFuncSetAttribute(hopper_fwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)hop_traits<D>::SMEM));
    hopper_fwd_kernel<T, D><<<(unsigned)nblocks, HOP_THREADS, hop_traits<D>::SMEM, stream>>>(prm);
    MODA_CUDA_TRY_LAUNCH("hopper_fwd_kernel");
    return MODA_OK;
}

} // namespace

int moda_cuda_hopper_forward_supports(const moda_problem *p) {
    /* forward_fast's conditions (f16/bf16, d == dv in {64, 128}, a positive scale, 16-byte aligned bases and
     * strides, its 32-bit per-(b, h) index limits) are this kernel's too */
    if (!moda_cuda_fast_forward_supports(p)) return 0;
    /* tensor maps: outer strides positive and below 2^40 bytes; int32 coordinates */
    const moda_operand *ops[2] = {&p->k, &p->v};
    for (int i = 0; i < 2; i++) {
        if (!ops[i]->data) continue;
        for (int k = 0; k < 3; k++)
            if (ops[i]->stride[k] <= 0 || ops[i]->stride[k] >= ((int64_t)1 << 38)) return 0;
    }
    if (p->B > 2147483647LL || p->Hk > 2147483647LL) return 0;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) !=
                                                    cudaSuccess) {
        moda_cuda_clear_error();
        return 0;
    }
    if (major != 9) return 0;
    const int bf = p->dtype == MODA_BF16;
    if (p->d == 64) return bf ? kernel_ready<__nv_bfloat16, 64>() : kernel_ready<__half, 64>();
    return bf ? kernel_ready<__nv_bfloat16, 128>() : kernel_ready<__half, 128>();
}

moda_status moda_cuda_hopper_forward(const moda_problem *p, cudaStream_t stream, int *launched) {
    *launched = 0;
    hop_params prm;
    memset(&prm, 0, sizeof prm);
    moda_fwd_shape_fill(&prm, p);
    if (p->sequence) {
        /* a view the copy engine refuses (the driver checks more than supports() does) keeps the mma.sync path */
        if (!encode_kv(&prm.tmk, prm.perm, &p->k, p)) return MODA_OK;
        int perm_v[3];
        if (!encode_kv(&prm.tmv, perm_v, &p->v, p) || memcmp(perm_v, prm.perm, sizeof perm_v) != 0) return MODA_OK;
    }
    const int bf = p->dtype == MODA_BF16;
    *launched = 1;
    if (p->d == 64)
        return bf ? launch_hopper<__nv_bfloat16, 64>(prm, p, stream) : launch_hopper<__half, 64>(prm, p, stream);
    return bf ? launch_hopper<__nv_bfloat16, 128>(prm, p, stream) : launch_hopper<__half, 128>(prm, p, stream);
}
