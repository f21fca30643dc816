/*
 * backward_mma.cu - tensor-core (mma.sync m16n8k16, fp32 accumulation) kernels of the sequence part of the
 * backward, for f16/bf16 with d = dv in {64, 128}. FlashAttention-2's recomputation scheme, split in two
 * passes so that no output needs atomics (determinism, spec.md §3):
 *
 *   dK/dV pass: a CTA owns 64 keys of one (b, h) (on small grids, one range of the rows that see them: fp32
 *     partials summed in order by bw_dkdv_reduce_kernel); each of its 4 warps owns 16 keys and walks every
 *     query row r = t*G + g that sees them:  S^T = K Q^T, P^T = exp2(S^T s log2e - lse2), dP^T = V dO^T,
 *     dS^T = P^T (dP^T - Delta),  dV += P^T dO,  dK += dS^T Q.
 *   dQ pass: a CTA owns 64 query rows; each warp owns 16 rows and walks every key they see:
 *     S = Q K^T, P, dP = dO V^T, dS,  dQ += dS K;  finally dq = s dQ + dQacc (the depth part).
 *
 * The non-deterministic mode runs one fused pass instead (bw_mma_fused_kernel: 8 warps, 128 keys per CTA,
 * dQ of each step added to dQacc with fp32 atomics, 5 products instead of 7); its deterministic variant
 * (ordered adds) is selectable for measurement.
 *
 * The probabilities and dS never leave registers: an m16n8 accumulator pair is exactly the A fragment of the
 * next product (the FlashAttention-2 register reuse). Q/dO (dK/dV pass) and K/V (dQ pass) stream through
 * shared memory double-buffered with cp.async; rows are padded by 8 elements so that ldmatrix reads of 8
 * rows hit 8 different 16-byte bank groups.
 */
#include "backward_common.cuh"

#define BW_MMA_THREADS 128
#define BW_MMA_WARPS 4

/* Thin adapters over common.cuh's instruction wrappers, in the shapes the loops below use. */
template <typename E>
static __device__ __forceinline__ void bw_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    moda_mma<E>::run(c, a, b0, b1);
}
static __device__ __forceinline__ void bw_ldsm4(uint32_t (&r)[4], const void *p) {
    moda_ldmatrix_x4(r, moda_smem_addr(p));
}
static __device__ __forceinline__ void bw_ldsm4_t(uint32_t (&r)[4], const void *p) {
    moda_ldmatrix_x4_trans(r, moda_smem_addr(p));
}
static __device__ __forceinline__ void bw_cp16(void *smem, const void *gmem, bool valid) {
    moda_cp_async16(moda_smem_addr(smem), gmem, valid);
}

/* Copies ROWS rows of D elements into a padded shared tile; row i of the tile is query row r0 + i of head
 * (b, h) (QROWS: r = t*G + g of operand a) or key r0 + i (else). Rows at or past `nrows` become zeros. */
template <typename E, int D, int ROWS, bool QROWS, int NTH = BW_MMA_THREADS>
static __device__ __forceinline__ void bw_load_tile(E *tile, const bw_view &a, int64_t b, int64_t h, int G, int r0,
                                                    int nrows) {
    constexpr int LD = D + 8, CPR = D / 8; /* 16-byte chunks per row */
    constexpr int RPP = NTH / CPR; /* rows per pass */
    const int c = threadIdx.x % CPR;
#pragma unroll
    for (int i = threadIdx.x / CPR; i < ROWS; i += RPP) {
        const int r = r0 + i;
        const bool ok = r < nrows;
        int64_t off = 0;
        if (ok) off = QROWS ? bw_off4(a, b, r / G, h, r % G) : bw_off4(a, b, r, h, 0);
        bw_cp16(tile + i * LD + c * 8, (const E *)a.data + off + c * 8, ok);
    }
}

/* Per-row softmax statistics of a tile of query rows: lse in the exp2 domain (+inf for padding rows, which
 * makes their probabilities exactly 0), Delta, and the row's token index (for the causal mask). */
template <int NTH = BW_MMA_THREADS>
static __device__ __forceinline__ void bw_load_row_stats(const bw_params &p, int64_t b, int64_t h, int r0, int rows,
                                                         float *lse2, float *dl, int *tok) {
    const int nrows = (int)(p.T * p.G), G = (int)p.G;
    for (int i = threadIdx.x; i < rows; i += NTH) {
        const int r = r0 + i;
        if (r < nrows) {
            const int t = r / G, g = r % G;
            lse2[i] = bw_load(p.lse, bw_off4(p.lse, b, t, h, g)) * BW_LOG2E;
            dl[i] = p.delta[bw_row(p, b, t, h, g)];
            tok[i] = t;
        } else {
            lse2[i] = __int_as_float(0x7f800000);
            dl[i] = 0.f;
            tok[i] = 0;
        }
    }
}

/* acc[M16 x 8*NT] += A(16 x 16*KT, A fragments given per k-tile by afrag) * B, where B (k x n) is read from a
 * shared tile stored n-major ([n][k], the "col" operand: K rows for S = Q K^T) with row stride LD. */
template <typename E, int KT, int NT, int LD>
static __device__ __forceinline__ void bw_mma_nk(float (&acc)[NT][4], const uint32_t (&afrag)[KT][4], const E *bs,
                                                 int lane) {
#pragma unroll
    for (int kt = 0; kt < KT; kt++) {
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            uint32_t r[4];
            bw_ldsm4(r, bs + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kt * 16 + ((lane >> 3) & 1) * 8);
            bw_mma<E>(acc[2 * np], afrag[kt], r[0], r[1]);
            bw_mma<E>(acc[2 * np + 1], afrag[kt], r[2], r[3]);
        }
    }
}

/* acc[16 x 8*NT] += X(16 x 16*KT) * B, X given as m16n8 accumulators x[2*KT][4] (probabilities or dS, packed
 * to A fragments here), B (k x n) read from a shared tile stored k-major ([k][n]) with row stride LD. */
template <typename E, int KT, int NT, int LD>
static __device__ __forceinline__ void bw_mma_kn(float (&acc)[NT][4], const float (&x)[2 * KT][4], const E *bs,
                                                 int lane) {
#pragma unroll
    for (int kt = 0; kt < KT; kt++) {
        uint32_t a[4];
        a[0] = moda_dt<E>::pack2(x[2 * kt][0], x[2 * kt][1]);
        a[1] = moda_dt<E>::pack2(x[2 * kt][2], x[2 * kt][3]);
        a[2] = moda_dt<E>::pack2(x[2 * kt + 1][0], x[2 * kt + 1][1]);
        a[3] = moda_dt<E>::pack2(x[2 * kt + 1][2], x[2 * kt + 1][3]);
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            uint32_t r[4];
            bw_ldsm4_t(r, bs + (kt * 16 + (lane & 15)) * LD + np * 16 + (lane >> 4) * 8);
            bw_mma<E>(acc[2 * np], a, r[0], r[1]);
            bw_mma<E>(acc[2 * np + 1], a, r[2], r[3]);
        }
    }
}

/* A fragments of the 16 rows starting at row m0 of a shared tile, for every k-tile. */
template <typename E, int KT, int LD>
static __device__ __forceinline__ void bw_load_afrag(uint32_t (&a)[KT][4], const E *s, int m0, int lane) {
#pragma unroll
    for (int kt = 0; kt < KT; kt++) bw_ldsm4(a[kt], s + (m0 + (lane & 15)) * LD + kt * 16 + (lane >> 4) * 8);
}

/* Stores a warp's 16 x D accumulator (times `mul`) to rows of a global operand; row i of the fragment goes to
 * element offset rowoff[i] (negative: skip). */
template <typename E, int NT>
static __device__ __forceinline__ void bw_store_acc(const float (&acc)[NT][4], float mul, E *base, int64_t off_lo,
                                                    int64_t off_hi, int lane) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int col = nt * 8 + (lane & 3) * 2;
        if (off_lo >= 0) *(uint32_t *)(base + off_lo + col) = moda_dt<E>::pack2(acc[nt][0] * mul, acc[nt][1] * mul);
        if (off_hi >= 0) *(uint32_t *)(base + off_hi + col) = moda_dt<E>::pack2(acc[nt][2] * mul, acc[nt][3] * mul);
    }
}

/* acc = X Y^T for the warp's 16 rows of the key tile X (K or V) and the rows of the tile Y (Q or dO). */
template <typename E, int D, int NT>
static __device__ __forceinline__ void bw_keys_times_rows(float (&acc)[NT][4], const E *xs, const E *ys, int w,
                                                          int lane) {
    constexpr int LD = D + 8, KT = D / 16;
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[n][c] = 0.f;
    uint32_t xa[KT][4];
    bw_load_afrag<E, KT, LD>(xa, xs, w * 16, lane);
    bw_mma_nk<E, KT, NT, LD>(acc, xa, ys, lane);
}

/* One step of the dK/dV products for a warp's 16 keys (jlo, jhi: its fragment rows' keys) against BM query
 * rows in shared memory (qs: Q, ds: dO; l2, dl, tk: their lse2, Delta, token):  S^T = K Q^T, P^T (masked
 * entries 0; need_mask: the block straddles the diagonal, or (FUSED) holds keys past T, whose zero K rows
 * would give probability exp2(-lse2): harmless where only dK/dV of real keys are kept, not in dQ), dV += P^T dO,
 * dP^T = V dO^T, dS^T = P^T (dP^T - Delta), dK += dS^T Q. Leaves dS^T in dst (the fused pass's dQ needs it). */
template <typename E, int D, int BM, bool FUSED>
static __device__ __forceinline__ void bw_dkdv_step(const bw_params &p, const E *Ks, const E *Vs, const E *qs,
                                                    const E *ds, const float *l2, const float *dl, const int *tk,
                                                    bool need_mask, int jlo, int jhi, int T, int w, int lane,
                                                    float (&dk)[D / 8][4], float (&dv)[D / 8][4],
                                                    float (&dst)[BM / 8][4]) {
    constexpr int LD = D + 8, NTD = D / 8, NTM = BM / 8;
    float s[NTM][4];
    bw_keys_times_rows<E, D, NTM>(s, Ks, qs, w, lane);
#pragma unroll
    for (int n = 0; n < NTM; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int col = n * 8 + (lane & 3) * 2 + (c & 1);
            const int j = (c & 2) ? jhi : jlo;
            const bool masked = FUSED ? need_mask && (j >= T || (p.causal && j > tk[col])) : need_mask && j > tk[col];
            s[n][c] = masked ? 0.f : bw_exp2(s[n][c] * p.scale_log2 - l2[col]);
        }
    bw_mma_kn<E, NTM / 2, NTD, LD>(dv, s, ds, lane);

    bw_keys_times_rows<E, D, NTM>(dst, Vs, ds, w, lane);
#pragma unroll
    for (int n = 0; n < NTM; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int col = n * 8 + (lane & 3) * 2 + (c & 1);
            dst[n][c] = s[n][c] * (dst[n][c] - dl[col]);
        }
    bw_mma_kn<E, NTM / 2, NTD, LD>(dk, dst, qs, lane);
}

/* The end of a key-block CTA: dK (times s) and dV of the warp's 16 keys to the outputs, or, when the pass is
 * split, the unscaled fp32 partials that bw_dkdv_reduce_kernel sums in split order. */
template <typename E, int D>
static __device__ __forceinline__ void bw_dkdv_epilogue(const bw_params &p, const float (&dk)[D / 8][4],
                                                        const float (&dv)[D / 8][4], int64_t b, int64_t h, int jlo,
                                                        int jhi, int lane) {
    constexpr int NTD = D / 8;
    const int T = (int)p.T;
    if (p.dkdv_nsplit > 1) {
        const int split = (int)blockIdx.x % p.dkdv_nsplit; /* recomputed: keeping it live costs a spill */
        float *pk = p.dkvpart + (((int64_t)split * p.B + b) * p.Hk + h) * p.T * 2 * D;
#pragma unroll
        for (int nt = 0; nt < NTD; nt++) {
            const int col = nt * 8 + (lane & 3) * 2;
            if (jlo < T) {
                *(float2 *)(pk + (int64_t)jlo * 2 * D + col) = make_float2(dk[nt][0], dk[nt][1]);
                *(float2 *)(pk + (int64_t)jlo * 2 * D + D + col) = make_float2(dv[nt][0], dv[nt][1]);
            }
            if (jhi < T) {
                *(float2 *)(pk + (int64_t)jhi * 2 * D + col) = make_float2(dk[nt][2], dk[nt][3]);
                *(float2 *)(pk + (int64_t)jhi * 2 * D + D + col) = make_float2(dv[nt][2], dv[nt][3]);
            }
        }
        return;
    }
    const int64_t olo = jlo < T ? bw_off4(p.dk, b, jlo, h, 0) : -1, ohi = jhi < T ? bw_off4(p.dk, b, jhi, h, 0) : -1;
    bw_store_acc<E, NTD>(dk, p.scale, (E *)p.dk.data, olo, ohi, lane);
    const int64_t vlo = jlo < T ? bw_off4(p.dv_, b, jlo, h, 0) : -1, vhi = jhi < T ? bw_off4(p.dv_, b, jhi, h, 0) : -1;
    bw_store_acc<E, NTD>(dv, 1.f, (E *)p.dv_.data, vlo, vhi, lane);
}

/* ------------------------------------------------------------------------------------------------------ */
/* dK/dV pass. grid (key blocks, Hk, B); BM query rows per step.                                           */
/* ------------------------------------------------------------------------------------------------------ */
template <typename E, int D, int BM>
__global__ void __launch_bounds__(BW_MMA_THREADS) bw_mma_dkdv_kernel(bw_params p) {
    constexpr int BN = 16 * BW_MMA_WARPS, LD = D + 8, NTD = D / 8, NTM = BM / 8;
    extern __shared__ __align__(16) unsigned char bw_smem[];
    E *Ks = (E *)bw_smem, *Vs = Ks + BN * LD, *Qs = Vs + BN * LD, *dOs = Qs + 2 * BM * LD;
    float *lse2 = (float *)(dOs + 2 * BM * LD), *dls = lse2 + 2 * BM;
    int *toks = (int *)(dls + 2 * BM);

    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int G = (int)p.G, T = (int)p.T, nrows = T * G;
    const int nkb = (T + BN - 1) / BN;
    /* causal: kbi 0 is the last key block (the fewest rows) */
    const int kbi = (int)blockIdx.x / p.dkdv_nsplit;
    const int kb = p.causal ? nkb - 1 - kbi : kbi;
    const int64_t h = blockIdx.y, b = blockIdx.z;
    const int j0 = kb * BN;
    /* rows [rbeg, rend): those that see the block, cut to this CTA's split. The split boundaries and the
     * causal start j0*G are multiples of BM, so a step never crosses into another split's rows. */
    int rbeg = p.causal ? j0 * G : 0, rend = nrows;
    if (p.dkdv_nsplit > 1) {
        const int s0 = (int)blockIdx.x % p.dkdv_nsplit * p.dkdv_rows, s1 = s0 + p.dkdv_rows;
        if (s1 <= rbeg || s0 >= nrows) return; /* empty split (whole CTA): bw_dkdv_reduce_kernel skips it */
        if (s0 > rbeg) rbeg = s0;
        if (s1 < rend) rend = s1;
    }
    const int nsteps = (rend - rbeg + BM - 1) / BM;

    bw_load_tile<E, D, BN, false>(Ks, p.k, b, h, G, j0, T);
    bw_load_tile<E, D, BN, false>(Vs, p.v, b, h, G, j0, T);
    bw_load_tile<E, D, BM, true>(Qs, p.q, b, h, G, rbeg, nrows);
    bw_load_tile<E, D, BM, true>(dOs, p.dout, b, h, G, rbeg, nrows);
    moda_cp_async_commit();
    bw_load_row_stats(p, b, h, rbeg, BM, lse2, dls, toks);

    float dk[NTD][4], dv[NTD][4];
#pragma unroll
    for (int n = 0; n < NTD; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) dk[n][c] = dv[n][c] = 0.f;

    const int jlo = j0 + w * 16 + (lane >> 2), jhi = jlo + 8; /* the two keys of this thread's fragment rows */
    for (int it = 0; it < nsteps; it++) {
        const int buf = it & 1;
        if (it + 1 < nsteps) {
            const int r1 = rbeg + (it + 1) * BM, nb = buf ^ 1;
            bw_load_tile<E, D, BM, true>(Qs + nb * BM * LD, p.q, b, h, G, r1, nrows);
            bw_load_tile<E, D, BM, true>(dOs + nb * BM * LD, p.dout, b, h, G, r1, nrows);
            moda_cp_async_commit();
            bw_load_row_stats(p, b, h, r1, BM, lse2 + nb * BM, dls + nb * BM, toks + nb * BM);
            moda_cp_async_wait<1>();
        } else {
            moda_cp_async_wait<0>();
        }
        __syncthreads();
        const int rcur = rbeg + it * BM;
        /* rows of tokens >= the block's last key see every key of the block: no mask needed */
        const bool need_mask = p.causal && rcur / G < j0 + BN - 1;
        float dsT[NTM][4]; /* unused here */
        bw_dkdv_step<E, D, BM, false>(p, Ks, Vs, Qs + buf * BM * LD, dOs + buf * BM * LD, lse2 + buf * BM,
                                      dls + buf * BM, toks + buf * BM, need_mask, jlo, jhi, T, w, lane, dk, dv, dsT);
        __syncthreads(); /* the next step's prefetch overwrites this buffer */
    }

    bw_dkdv_epilogue<E, D>(p, dk, dv, b, h, jlo, jhi, lane);
}

/* ------------------------------------------------------------------------------------------------------ */
/* dQ pass. grid (row blocks of 64 rows, Hk, B); BN keys per step.                                          */
/* ------------------------------------------------------------------------------------------------------ */
template <typename E, int D, int BN>
__global__ void __launch_bounds__(BW_MMA_THREADS) bw_mma_dq_kernel(bw_params p) {
    constexpr int BM = 16 * BW_MMA_WARPS, LD = D + 8, KT = D / 16, NTD = D / 8, NTN = BN / 8;
    extern __shared__ __align__(16) unsigned char bw_smem[];
    E *Qs = (E *)bw_smem, *dOs = Qs + BM * LD, *Ks = dOs + BM * LD, *Vs = Ks + 2 * BN * LD;
    float *lse2 = (float *)(Vs + 2 * BN * LD), *dls = lse2 + BM;
    int *toks = (int *)(dls + BM);

    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int G = (int)p.G, T = (int)p.T, nrows = T * G;
    const int nrb = (nrows + BM - 1) / BM;
    const int rb = p.causal ? nrb - 1 - (int)blockIdx.x : (int)blockIdx.x; /* heavy (late) rows first */
    const int64_t h = blockIdx.y, b = blockIdx.z;
    const int r0 = rb * BM;
    const int rlast = (r0 + BM < nrows ? r0 + BM : nrows) - 1;
    const int jend = p.causal ? rlast / G + 1 : T;
    const int nsteps = (jend + BN - 1) / BN;

    bw_load_tile<E, D, BM, true>(Qs, p.q, b, h, G, r0, nrows);
    bw_load_tile<E, D, BM, true>(dOs, p.dout, b, h, G, r0, nrows);
    bw_load_tile<E, D, BN, false>(Ks, p.k, b, h, G, 0, T);
    bw_load_tile<E, D, BN, false>(Vs, p.v, b, h, G, 0, T);
    moda_cp_async_commit();
    bw_load_row_stats(p, b, h, r0, BM, lse2, dls, toks);
    moda_cp_async_wait<0>();
    __syncthreads();

    uint32_t qa[KT][4], da[KT][4];
    bw_load_afrag<E, KT, LD>(qa, Qs, w * 16, lane);
    bw_load_afrag<E, KT, LD>(da, dOs, w * 16, lane);
    const int rlo = w * 16 + (lane >> 2), rhi = rlo + 8;
    const float l2lo = lse2[rlo], l2hi = lse2[rhi], dllo = dls[rlo], dlhi = dls[rhi];
    const int tlo = toks[rlo], thi = toks[rhi];

    float dq[NTD][4];
#pragma unroll
    for (int n = 0; n < NTD; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) dq[n][c] = 0.f;

    for (int it = 0; it < nsteps; it++) {
        const int buf = it & 1;
        if (it + 1 < nsteps) {
            const int j1 = (it + 1) * BN, nb = buf ^ 1;
            bw_load_tile<E, D, BN, false>(Ks + nb * BN * LD, p.k, b, h, G, j1, T);
            bw_load_tile<E, D, BN, false>(Vs + nb * BN * LD, p.v, b, h, G, j1, T);
            moda_cp_async_commit();
            moda_cp_async_wait<1>();
        } else {
            moda_cp_async_wait<0>();
        }
        __syncthreads();
        const E *ks = Ks + buf * BN * LD, *vs = Vs + buf * BN * LD;
        const int kb0 = it * BN;
        /* blocks wholly at or before the first row's token, and inside the sequence, need no mask */
        const bool need_mask = kb0 + BN > T || (p.causal && kb0 + BN - 1 > r0 / G);

        float s[NTN][4], dp[NTN][4];
#pragma unroll
        for (int n = 0; n < NTN; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) s[n][c] = dp[n][c] = 0.f;
        bw_mma_nk<E, KT, NTN, LD>(s, qa, ks, lane);
        bw_mma_nk<E, KT, NTN, LD>(dp, da, vs, lane);
#pragma unroll
        for (int n = 0; n < NTN; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int j = kb0 + n * 8 + (lane & 3) * 2 + (c & 1);
                const bool hi = (c & 2) != 0;
                const bool masked = need_mask && (j >= T || (p.causal && j > (hi ? thi : tlo)));
                const float pr = masked ? 0.f : bw_exp2(s[n][c] * p.scale_log2 - (hi ? l2hi : l2lo));
                s[n][c] = pr * (dp[n][c] - (hi ? dlhi : dllo));
            }
        bw_mma_kn<E, NTN / 2, NTD, LD>(dq, s, ks, lane);
        __syncthreads();
    }

    /* dq = s * dQ(sequence) + dQacc(depth, already scaled) */
    const int glo = r0 + rlo, ghi = r0 + rhi;
    E *base = (E *)p.dq.data;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int r = half ? ghi : glo;
        if (r >= nrows) continue;
        const int t = r / G, g = r % G;
        const int64_t off = bw_off4(p.dq, b, t, h, g);
        const float *acc_row = p.dqacc ? p.dqacc + bw_row(p, b, t, h, g) * D : NULL;
#pragma unroll
        for (int nt = 0; nt < NTD; nt++) {
            const int col = nt * 8 + (lane & 3) * 2;
            float x0 = dq[nt][half * 2] * p.scale, x1 = dq[nt][half * 2 + 1] * p.scale;
            if (acc_row) {
                const float2 a = *(const float2 *)(acc_row + col);
                x0 += a.x;
                x1 += a.y;
            }
            *(uint32_t *)(base + off + col) = moda_dt<E>::pack2(x0, x1);
        }
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* dK, dV from the split partials: one thread per 4 elements of a key row, splits summed in index order     */
/* (deterministic), starting at the first split that holds rows seeing the key.                             */
/* ------------------------------------------------------------------------------------------------------ */
template <typename E, int D> __global__ void bw_dkdv_reduce_kernel(bw_params p) {
    const int64_t n = p.B * p.Hk * p.T * (2 * D / 4);
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int c = (int)(i % (2 * D / 4)) * 4;
    const int64_t key = i / (2 * D / 4); /* (b, h, j) with j fastest */
    const int64_t j = key % p.T, h = (key / p.T) % p.Hk, b = key / (p.T * p.Hk);
    const int64_t rbeg = p.causal ? (j / p.dkdv_bn) * p.dkdv_bn * p.G : 0;
    const int64_t per_split = p.B * p.Hk * p.T * 2 * D;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = (int)(rbeg / p.dkdv_rows); s < p.dkdv_nsplit; s++) {
        const float4 x = *(const float4 *)(p.dkvpart + s * per_split + key * 2 * D + c);
        acc.x += x.x; acc.y += x.y; acc.z += x.z; acc.w += x.w;
    }
    const bool isk = c < D;
    const float mul = isk ? p.scale : 1.f;
    const bw_view &o = isk ? p.dk : p.dv_;
    const int64_t off = bw_off4(o, b, j, h, 0) + (isk ? c : c - D);
    uint2 u;
    u.x = moda_dt<E>::pack2(acc.x * mul, acc.y * mul);
    u.y = moda_dt<E>::pack2(acc.z * mul, acc.w * mul);
    *(uint2 *)((E *)o.data + off) = u;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Fused pass: dK, dV and dQ in one key-block-major walk (FlashAttention-2's 5 products instead of the two  */
/* passes' 7). grid (key blocks [x row splits], Hk, B); NW warps x 16 keys per CTA; BM query rows per step. */
/* Per step, after the dK/dV products of the dK/dV pass, each warp parks its dS^T (16 keys x BM rows, the   */
/* storage dtype) in shared memory, and the CTA computes dQ(BM x D) = s dS K, warp (m, c) owning 16 rows x  */
/* D/(NW/(BM/16)) columns, and adds it to the fp32 dqacc with red.global.add (which already holds the depth */
/* part, or zeros). DET: the adds into one row block are ordered by descending key block: a per-row-block   */
/* counter says how many key blocks have added; a CTA waits until it equals the number of key blocks after  */
/* its own that see the row block, adds, and (one step later, after a fence) increments it.                */
/* ------------------------------------------------------------------------------------------------------ */

/* dst[0..1] += (x, y) in fp32 at the L2 (no return value). sm_90 has the 8-byte vector form. */
static __device__ __forceinline__ void bw_red2(float *dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(x), "f"(y) : "memory");
#else
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(dst), "f"(x) : "memory");
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(dst + 1), "f"(y) : "memory");
#endif
}
static __device__ __forceinline__ unsigned bw_ld_acquire(const unsigned *a) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(a) : "memory");
    return v;
}

template <typename E, int D, int BM, int NW, bool DET>
__global__ void __launch_bounds__(NW * 32, 1) bw_mma_fused_kernel(bw_params p) {
    constexpr int NTH = NW * 32, BN = 16 * NW, LD = D + 8, LDS = BM + 8, NTD = D / 8, NTM = BM / 8;
    constexpr int MTQ = BM / 16, CQ = D / (NW / MTQ), NTQ = CQ / 8; /* dQ: warp tiles of 16 rows x CQ columns */
    static_assert(NW % MTQ == 0 && CQ % 16 == 0, "dQ warp tiling");
    extern __shared__ __align__(16) unsigned char bw_smem[];
    E *Ks = (E *)bw_smem, *Vs = Ks + BN * LD, *Qs = Vs + BN * LD, *dOs = Qs + 2 * BM * LD, *dSs = dOs + 2 * BM * LD;
    float *lse2 = (float *)(dSs + BN * LDS), *dls = lse2 + 2 * BM;
    int *toks = (int *)(dls + 2 * BM);

    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int G = (int)p.G, T = (int)p.T, nrows = T * G;
    const int nkb = (T + BN - 1) / BN;
    const int kbi = (int)blockIdx.x / p.dkdv_nsplit;
    /* DET: key blocks must start in the order they add (last first; a CTA waits only on CTAs launched before
     * it, so the wait cannot deadlock). Otherwise the heavy (early, causal) blocks start first. */
    const int kb = DET || !p.causal ? nkb - 1 - kbi : kbi;
    const int64_t h = blockIdx.y, b = blockIdx.z;
    const int j0 = kb * BN;
    int rbeg = p.causal ? j0 * G : 0, rend = nrows;
    if (p.dkdv_nsplit > 1) {
        const int s0 = (int)blockIdx.x % p.dkdv_nsplit * p.dkdv_rows, s1 = s0 + p.dkdv_rows;
        if (s1 <= rbeg || s0 >= nrows) return; /* empty split: no row block expects an add from it */
        if (s0 > rbeg) rbeg = s0;
        if (s1 < rend) rend = s1;
    }
    const int nsteps = (rend - rbeg + BM - 1) / BM;

    bw_load_tile<E, D, BN, false, NTH>(Ks, p.k, b, h, G, j0, T);
    bw_load_tile<E, D, BN, false, NTH>(Vs, p.v, b, h, G, j0, T);
    bw_load_tile<E, D, BM, true, NTH>(Qs, p.q, b, h, G, rbeg, nrows);
    bw_load_tile<E, D, BM, true, NTH>(dOs, p.dout, b, h, G, rbeg, nrows);
    moda_cp_async_commit();
    bw_load_row_stats<NTH>(p, b, h, rbeg, BM, lse2, dls, toks);

    float dk[NTD][4], dv[NTD][4];
#pragma unroll
    for (int n = 0; n < NTD; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) dk[n][c] = dv[n][c] = 0.f;

    const int jlo = j0 + w * 16 + (lane >> 2), jhi = jlo + 8; /* the two keys of this thread's fragment rows */
    const int qm0 = (w % MTQ) * 16, qc0 = (w / MTQ) * CQ;     /* this warp's dQ tile */
    unsigned *cnt = DET ? p.dqcnt + ((int64_t)b * p.Hk + h) * ((nrows + BM - 1) / BM) : NULL;
    for (int it = 0; it < nsteps; it++) {
        const int buf = it & 1;
        if (it + 1 < nsteps) {
            const int r1 = rbeg + (it + 1) * BM, nb = buf ^ 1;
            bw_load_tile<E, D, BM, true, NTH>(Qs + nb * BM * LD, p.q, b, h, G, r1, nrows);
            bw_load_tile<E, D, BM, true, NTH>(dOs + nb * BM * LD, p.dout, b, h, G, r1, nrows);
            moda_cp_async_commit();
            bw_load_row_stats<NTH>(p, b, h, r1, BM, lse2 + nb * BM, dls + nb * BM, toks + nb * BM);
            moda_cp_async_wait<1>();
        } else {
            moda_cp_async_wait<0>();
        }
        __syncthreads();
        const int rcur = rbeg + it * BM;
        /* the mask matters where the block straddles the diagonal, and for keys past T (their zero K rows
         * would otherwise give probability exp2(-lse2), harmless for dK/dV but not for every lse in dQ) */
        const bool need_mask = (p.causal && rcur / G < j0 + BN - 1) || j0 + BN > T;
        float dp[NTM][4];
        bw_dkdv_step<E, D, BM, true>(p, Ks, Vs, Qs + buf * BM * LD, dOs + buf * BM * LD, lse2 + buf * BM,
                                     dls + buf * BM, toks + buf * BM, need_mask, jlo, jhi, T, w, lane, dk, dv, dp);

        /* dS^T of this warp's 16 keys -> shared [key][row] (one 32-bit store per accumulator pair; the row
         * padding of 8 elements keeps the 32 lanes' words in distinct banks) */
        {
            E *dst = dSs + (w * 16 + (lane >> 2)) * LDS + (lane & 3) * 2;
#pragma unroll
            for (int n = 0; n < NTM; n++) {
                *(uint32_t *)(dst + n * 8) = moda_dt<E>::pack2(dp[n][0], dp[n][1]);
                *(uint32_t *)(dst + 8 * LDS + n * 8) = moda_dt<E>::pack2(dp[n][2], dp[n][3]);
            }
        }
        if (DET) __threadfence(); /* the previous step's adds are complete before its counter moves (below) */
        __syncthreads();
        if (DET && threadIdx.x == 0 && it > 0) atomicAdd(cnt + (rcur - BM) / BM, 1u);

        /* dQ tile = dS (rows x keys, A from the [key][row] tile through ldmatrix.trans) times K ([key][d]) */
        float dq[NTQ][4];
#pragma unroll
        for (int n = 0; n < NTQ; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) dq[n][c] = 0.f;
#pragma unroll
        for (int kt = 0; kt < BN / 16; kt++) {
            uint32_t a[4];
            bw_ldsm4_t(a, dSs + (kt * 16 + (lane & 7) + ((lane >> 4) & 1) * 8) * LDS + qm0 + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int np = 0; np < NTQ / 2; np++) {
                uint32_t r[4];
                bw_ldsm4_t(r, Ks + (kt * 16 + (lane & 15)) * LD + qc0 + np * 16 + (lane >> 4) * 8);
                bw_mma<E>(dq[2 * np], a, r[0], r[1]);
                bw_mma<E>(dq[2 * np + 1], a, r[2], r[3]);
            }
        }
        if (DET) {
            if (threadIdx.x == 0) {
                /* key blocks after this one that see the row block add first */
                const int rl = (rcur + BM < nrows ? rcur + BM : nrows) - 1;
                int kmax = p.causal ? rl / G / BN : nkb - 1;
                if (kmax > nkb - 1) kmax = nkb - 1;
                const unsigned want = (unsigned)(kmax - kb);
                /* bounded: a scheduler that ever started a later-launched CTA first must not hang the GPU
                 * (about 4 s, then the order is lost but the sum is still complete) */
                for (int spin = 0; bw_ld_acquire(cnt + rcur / BM) < want && spin < (1 << 22); spin++) __nanosleep(64);
            }
            __syncthreads();
        }
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int r = rcur + qm0 + (lane >> 2) + half * 8;
            if (r >= nrows) continue;
            float *row = p.dqacc + bw_row(p, b, r / G, h, r % G) * D + qc0 + (lane & 3) * 2;
#pragma unroll
            for (int nt = 0; nt < NTQ; nt++)
                bw_red2(row + nt * 8, dq[nt][half * 2] * p.scale, dq[nt][half * 2 + 1] * p.scale);
        }
        __syncthreads(); /* the next step's prefetch overwrites this buffer, its dS store this dS tile */
    }
    if (DET && nsteps > 0) {
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) atomicAdd(cnt + (rbeg + (nsteps - 1) * BM) / BM, 1u);
    }

    bw_dkdv_epilogue<E, D>(p, dk, dv, b, h, jlo, jhi, lane);
}

/* dq = dqacc (fp32: depth part plus s * sequence part) in the storage dtype; one thread per 8 elements. */
template <typename E, int D> __global__ void bw_dq_finish_kernel(bw_params p) {
    const int64_t n = p.B * p.T * p.Hk * p.G * (D / 8);
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int c = (int)(i % (D / 8)) * 8;
    const int64_t row = i / (D / 8); /* (b, t, h, g), g fastest */
    const int64_t g = row % p.G, h = (row / p.G) % p.Hk, t = (row / (p.G * p.Hk)) % p.T, b = row / (p.G * p.Hk * p.T);
    const float4 x = *(const float4 *)(p.dqacc + row * D + c), y = *(const float4 *)(p.dqacc + row * D + c + 4);
    uint4 u;
    u.x = moda_dt<E>::pack2(x.x, x.y);
    u.y = moda_dt<E>::pack2(x.z, x.w);
    u.z = moda_dt<E>::pack2(y.x, y.y);
    u.w = moda_dt<E>::pack2(y.z, y.w);
    *(uint4 *)((E *)p.dq.data + bw_off4(p.dq, b, t, h, g) + c) = u;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Host side: which problems take this path, and the launches.                                              */
/* ------------------------------------------------------------------------------------------------------ */
/* The shape part of the test (what the workspace query, which has no gradient operands, can decide). */
static int bw_mma_shape_ok(const moda_problem *p) {
    if (p->dtype != MODA_F16 && p->dtype != MODA_BF16) return 0;
    if (p->d != p->dv || (p->d != 64 && p->d != 128)) return 0;
    if (!p->sequence) return 0;
    /* row indices r = t*G + g and token indices are 32-bit inside the kernels (offsets stay 64-bit) */
    return p->T * p->G < ((int64_t)1 << 30) && p->B <= 65535 && p->Hk <= 65535;
}

int bw_mma_supported(const moda_problem *p) {
    return bw_mma_shape_ok(p) && bw_vec_ok(&p->q, 5) && bw_vec_ok(&p->grad_o, 5) && bw_vec_ok(&p->grad_q, 5) &&
           bw_vec_ok(&p->k, 4) && bw_vec_ok(&p->v, 4) && bw_vec_ok(&p->grad_k, 4) && bw_vec_ok(&p->grad_v, 4);
}

/* Row splits of the dK/dV pass. When (key blocks x Hk x B) CTAs cannot fill the GPU (S3: 128 CTAs walking
 * up to 128 steps each), the rows that see a key block are cut into nsplit ranges of `rows` rows (a multiple
 * of the step), each CTA writes fp32 partials and bw_dkdv_reduce_kernel sums them in order. Decided from the
 * shape alone (the workspace query has no gradient operands), so the workspace and the launch agree and the
 * result does not depend on the device. */
int bw_dkdv_split(const moda_problem *p, int *rows) {
    *rows = 0;
    if (!bw_mma_shape_ok(p)) return 1;
    if (!bw_new_kernel_on("MODA_CUDA_BWD_NOSPLIT")) return 1;
    const int fw = bw_fused_warps(p);
    const int64_t BN = 16 * (fw ? fw : BW_MMA_WARPS), BM = bw_mma_bm(p->d);
    const int64_t ctas = (p->T + BN - 1) / BN * p->Hk * p->B, nrows = p->T * p->G;
    if (ctas >= 512) return 1;
    int64_t want = (1024 + ctas - 1) / ctas;
    if (want > 8) want = 8;
    int64_t r = ((nrows + want - 1) / want + BM - 1) / BM * BM;
    if (r < 4 * BM) r = 4 * BM; /* at least four steps per CTA */
    const int64_t n = (nrows + r - 1) / r;
    if (n <= 1) return 1;
    *rows = (int)r;
    return (int)n;
}

size_t bw_dkdv_split_floats(const moda_problem *p) {
    int rows;
    const int n = bw_dkdv_split(p, &rows);
    return n > 1 ? (size_t)n * (size_t)(p->B * p->Hk * p->T) * 2 * (size_t)p->d : 0;
}

template <typename E, int D, int BM> static cudaError_t bw_run_dkdv(const bw_params *bp, cudaStream_t st) {
    constexpr int BN = 16 * BW_MMA_WARPS, LD = D + 8;
    const size_t smem = (size_t)(2 * BN * LD + 4 * BM * LD) * sizeof(E) + (size_t)2 * BM * 12;
    cudaError_t e = cudaFuncSetAttribute(bw_mma_dkdv_kernel<E, D, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem);
    if (e != cudaSuccess) return e;
    const dim3 grid((unsigned)((bp->T + BN - 1) / BN * bp->dkdv_nsplit), (unsigned)bp->Hk, (unsigned)bp->B);
    bw_mma_dkdv_kernel<E, D, BM><<<grid, BW_MMA_THREADS, smem, st>>>(*bp);
    if ((e = cudaGetLastError()) != cudaSuccess || bp->dkdv_nsplit <= 1) return e;
    const int64_t n = bp->B * bp->Hk * bp->T * (2 * D / 4);
    bw_dkdv_reduce_kernel<E, D><<<(unsigned)((n + 255) / 256), 256, 0, st>>>(*bp);
    return cudaGetLastError();
}

template <typename E, int D, int BN> static cudaError_t bw_run_dq(const bw_params *bp, cudaStream_t st) {
    constexpr int BM = 16 * BW_MMA_WARPS, LD = D + 8;
    const size_t smem = (size_t)(2 * BM * LD + 4 * BN * LD) * sizeof(E) + (size_t)BM * 12;
    cudaError_t e = cudaFuncSetAttribute(bw_mma_dq_kernel<E, D, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem);
    if (e != cudaSuccess) return e;
    const dim3 grid((unsigned)((bp->T * bp->G + BM - 1) / BM), (unsigned)bp->Hk, (unsigned)bp->B);
    bw_mma_dq_kernel<E, D, BN><<<grid, BW_MMA_THREADS, smem, st>>>(*bp);
    return cudaGetLastError();
}

cudaError_t bw_launch_mma_dkdv(const bw_params *bp, cudaStream_t st) {
    const int bf = bp->q.dtype == MODA_BF16;
    if (bp->d == 64) return bf ? bw_run_dkdv<__nv_bfloat16, 64, 64>(bp, st) : bw_run_dkdv<__half, 64, 64>(bp, st);
    return bf ? bw_run_dkdv<__nv_bfloat16, 128, 32>(bp, st) : bw_run_dkdv<__half, 128, 32>(bp, st);
}

cudaError_t bw_launch_mma_dq(const bw_params *bp, cudaStream_t st) {
    const int bf = bp->q.dtype == MODA_BF16;
    if (bp->d == 64) return bf ? bw_run_dq<__nv_bfloat16, 64, 64>(bp, st) : bw_run_dq<__half, 64, 64>(bp, st);
    return bf ? bw_run_dq<__nv_bfloat16, 128, 32>(bp, st) : bw_run_dq<__half, 128, 32>(bp, st);
}

int bw_fused_warps(const moda_problem *p) {
    if (!bw_mma_shape_ok(p) || !bw_new_kernel_on("MODA_CUDA_BWD_TWOPASS")) return 0;
    if (p->deterministic) { /* the ordered variant measured slower than the two passes (notes): opt-in only */
        const char *e = getenv("MODA_CUDA_BWD_FUSED_DET");
        if (!(e && e[0] == '1')) return 0;
    }
    return 8;
}

template <typename E, int D, int BM, int NW, bool DET>
static cudaError_t bw_run_fused(const bw_params *bp, cudaStream_t st) {
    constexpr int BN = 16 * NW, LD = D + 8;
    const size_t smem = (size_t)(2 * BN * LD + 4 * BM * LD + BN * (BM + 8)) * sizeof(E) + (size_t)2 * BM * 12;
    cudaError_t e = cudaFuncSetAttribute(bw_mma_fused_kernel<E, D, BM, NW, DET>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
    const dim3 grid((unsigned)((bp->T + BN - 1) / BN * bp->dkdv_nsplit), (unsigned)bp->Hk, (unsigned)bp->B);
    bw_mma_fused_kernel<E, D, BM, NW, DET><<<grid, NW * 32, smem, st>>>(*bp);
    if ((e = cudaGetLastError()) != cudaSuccess || bp->dkdv_nsplit <= 1) return e;
    const int64_t n = bp->B * bp->Hk * bp->T * (2 * D / 4);
    bw_dkdv_reduce_kernel<E, D><<<(unsigned)((n + 255) / 256), 256, 0, st>>>(*bp);
    return cudaGetLastError();
}

/* 8 warps only: the 4-warp variant measured slower at d = 64 (notes) and was removed. */
template <typename E> static cudaError_t bw_fused_e(const bw_params *bp, cudaStream_t st) {
    const int det = bp->deterministic != 0;
    if (bp->d == 128)
        return det ? bw_run_fused<E, 128, 32, 8, true>(bp, st) : bw_run_fused<E, 128, 32, 8, false>(bp, st);
    return det ? bw_run_fused<E, 64, 64, 8, true>(bp, st) : bw_run_fused<E, 64, 64, 8, false>(bp, st);
}

cudaError_t bw_launch_mma_fused(const bw_params *bp, cudaStream_t st) {
    return bp->q.dtype == MODA_BF16 ? bw_fused_e<__nv_bfloat16>(bp, st) : bw_fused_e<__half>(bp, st);
}

cudaError_t bw_launch_dq_finish(const bw_params *bp, cudaStream_t st) {
    const int bf = bp->q.dtype == MODA_BF16;
    const int64_t n = bp->B * bp->T * bp->Hk * bp->G * (bp->d / 8);
    const unsigned grid = (unsigned)((n + 255) / 256);
    if (bp->d == 64) {
        if (bf) bw_dq_finish_kernel<__nv_bfloat16, 64><<<grid, 256, 0, st>>>(*bp);
        else bw_dq_finish_kernel<__half, 64><<<grid, 256, 0, st>>>(*bp);
    } else {
        if (bf) bw_dq_finish_kernel<__nv_bfloat16, 128><<<grid, 256, 0, st>>>(*bp);
        else bw_dq_finish_kernel<__half, 128><<<grid, 256, 0, st>>>(*bp);
    }
    return cudaGetLastError();
}
