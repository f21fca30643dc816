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

/* ---------------------------------------------------------------------------------------------------------
 * The same stage on the tensor cores (bw_tdc_kernel, the default; MODA_CUDA_BWD_NOTDC=1 runs the warp kernel
 * above). Per token and KV head the depth part is a handful of tiny matrix products over the G <= 8 query
 * rows of the token and its visible slots, taken 16 slots at a time:
 *   S^T  = Kd Q^T, dP^T = Vd dO^T             (16 slots x 8 rows, m16n8k16 over d)
 *   P^T  = exp2(s log2e S^T - lse log2e), dS^T = P^T (dP^T - Delta)
 *   dVd  = P^T dO, dKd = s dS^T Q             (16 slots x d, m16n8k16 with the rows as k, 8..15 zero)
 *   dQ^T += Kd^T dS^T                          (d x 8, m16n8k16 over the slots; dS^T transposed by movmatrix)
 * The SIMT kernel spends ~60 issue slots per (slot, row) pair on FMAs and shuffles and ran S1 (G = 8) at
 * 4x the byte floor; here the arithmetic is ~30 mma per 16 slots and the stage is left with its bytes: Kd,
 * Vd read once (cp.async, two chunks in flight per warp), dKd, dVd written once through a shared tile
 * (16-byte stores; in accumulate mode the old tile arrives with the chunk). One warp per (token, head): dKd,
 * dVd, and the dQ rows are each produced by one warp in a fixed order, so the stage stays deterministic.
 * P^T and dS^T enter the products rounded to the storage dtype, as in the sequence passes; into f32 depth
 * gradients they enter as two terms (rounded value and residual), which keeps those at f32 accuracy (spec.md §4:
 * relative L2 < 1e-5; one term gives ~1e-4 in bf16).
 * ------------------------------------------------------------------------------------------------------- */
template <int D> struct bw_tdc_traits {
    static constexpr int WARPS = D == 64 ? 4 : 2; /* 72 KB per CTA either way: 3 CTAs per SM (launch bounds) */
    static constexpr int TILE = 16 * D;                           /* elements of one 16-slot tile */
    static constexpr int WARP_ELEMS = 2 * 8 * D + 2 * 4 * TILE;   /* Q, dO; 2 stages x (Kd, Vd, dKd, dVd) */
    static constexpr size_t SMEM = (size_t)WARPS * WARP_ELEMS * 2; /* b16 elements */
};

static __device__ __forceinline__ uint32_t bw_movmatrix_t(uint32_t x) {
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}

/* (x, y) - the packed pair hi that rounds them, packed: the part of (x, y) the storage dtype drops. */
template <typename E> static __device__ __forceinline__ uint32_t bw_residual2(float x, float y, uint32_t hi) {
    const float2 h = moda_dt<E>::unpack2(hi);
    return moda_dt<E>::pack2(x - h.x, y - h.y);
}

/* Issues the cp.async copies of the 16-slot chunk starting at slot l0 into one stage: Kd and Vd always, the
 * old dKd / dVd tiles when they are accumulated into in the storage dtype. Rows past d1 become zeros. */
template <typename E, int D>
static __device__ __forceinline__ void bw_tdc_load_chunk(const bw_params &p, E *stage, int64_t l0, int64_t kb,
                                                         int64_t vb, int64_t dkb, int64_t dvb, bool old_k, bool old_v,
                                                         int lane) {
    constexpr int CPR = D / 8, TILE = bw_tdc_traits<D>::TILE; /* 16-byte chunks per row */
#pragma unroll
    for (int i = 0; i < 16 * CPR / 32; i++) {
        const int idx = lane + 32 * i, r = idx / CPR, ch = idx % CPR;
        const int64_t l = l0 + r;
        const bool ok = l < p.d1;
        const int64_t ll = ok ? l : p.d0; /* a valid address even where nothing is read */
        const int so = moda_swz<D>(r, ch * 8);
        moda_cp_async16(moda_smem_addr(stage + so), (const E *)p.kd.data + kb + ll * p.kd.s2 + ch * 8, ok);
        moda_cp_async16(moda_smem_addr(stage + TILE + so), (const E *)p.vd.data + vb + ll * p.vd.s2 + ch * 8, ok);
        if (old_k)
            moda_cp_async16(moda_smem_addr(stage + 2 * TILE + so), (const E *)p.dkd.data + dkb + ll * p.dkd.s2 + ch * 8,
                            ok);
        if (old_v)
            moda_cp_async16(moda_smem_addr(stage + 3 * TILE + so), (const E *)p.dvd.data + dvb + ll * p.dvd.s2 + ch * 8,
                            ok);
    }
}

/* acc (16 slots x 64 columns from col0) = a (16 slots x the query rows g as k, 8..15 zero) times rows g of x (Q
 * or dO, B by transposed ldmatrix); with lo, plus alo (the residual of a) times the same. */
template <typename E, int D>
static __device__ __forceinline__ void bw_tdc_rows_product(float (&acc)[8][4], const uint32_t (&a)[4],
                                                           const uint32_t (&alo)[4], bool lo, const E *x, int col0,
                                                           int lrow, int lq) {
#pragma unroll
    for (int jp = 0; jp < 2; jp++) {
        uint32_t bx[4];
        moda_ldmatrix_x4_trans(bx, moda_smem_addr(x + moda_swz<D>(lrow, col0 + 32 * jp + 8 * lq)));
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float *c = acc[4 * jp + q];
            c[0] = c[1] = c[2] = c[3] = 0.f;
            moda_mma<E>::run(c, a, bx[q], 0u);
            if (lo) moda_mma<E>::run(c, alo, bx[q], 0u);
        }
    }
}

/* acc (16 slots x 64 columns from col0, m16n8 C fragments, n-tile j = columns col0 + 8j ..) times mul into
 * depth-gradient rows l0..l0+15 of view a (rows at or past d1 skipped): f32 gradients with 8-byte stores straight
 * from the fragments; the storage dtype into the shared tile `sm` (which holds the old values in accumulate
 * mode), written out by bw_tdc_flush once all columns are in. */
template <typename E, int D>
static __device__ __forceinline__ void bw_tdc_put(const bw_params &p, const bw_view &a, int64_t base, int64_t l0,
                                                  const float (&acc)[8][4], int col0, float mul, E *sm, int lane) {
    const int r = lane >> 2, c2 = col0 + 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float x = acc[j][2 * h] * mul, y = acc[j][2 * h + 1] * mul;
            if (a.dtype == MODA_F32) {
                const int64_t l = l0 + r + 8 * h;
                if (l >= p.d1) continue;
                float2 *dst = (float2 *)((float *)a.data + base + l * a.s2 + 8 * j + c2);
                if (p.accumulate) {
                    const float2 o = *dst;
                    x += o.x;
                    y += o.y;
                }
                *dst = make_float2(x, y);
            } else {
                uint32_t *cell = (uint32_t *)(sm + moda_swz<D>(r + 8 * h, 8 * j + c2));
                if (p.accumulate) {
                    const float2 o = moda_dt<E>::unpack2(*cell);
                    x += o.x;
                    y += o.y;
                }
                *cell = moda_dt<E>::pack2(x, y);
            }
        }
}

/* The shared tile of bw_tdc_put -> rows l0..l0+15 of a (storage dtype only), 16-byte stores. */
template <typename E, int D>
static __device__ __forceinline__ void bw_tdc_flush(const bw_params &p, const bw_view &a, int64_t base, int64_t l0,
                                                    const E *sm, int lane) {
    if (a.dtype == MODA_F32) return;
    __syncwarp();
    constexpr int CPR = D / 8;
#pragma unroll
    for (int i = 0; i < 16 * CPR / 32; i++) {
        const int idx = lane + 32 * i, rr = idx / CPR, ch = idx % CPR;
        const int64_t l = l0 + rr;
        if (l < p.d1) *(uint4 *)((E *)a.data + base + l * a.s2 + ch * 8) = *(const uint4 *)(sm + moda_swz<D>(rr, ch * 8));
    }
}

template <typename E, int D>
__global__ void __launch_bounds__(bw_tdc_traits<D>::WARPS * 32, 3) bw_tdc_kernel(bw_params p) {
    typedef bw_tdc_traits<D> TR;
    constexpr int TILE = TR::TILE, CPR = D / 8;
    extern __shared__ __align__(128) unsigned char bw_tdc_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t th = (int64_t)blockIdx.x * TR::WARPS + warp;
    if (th >= p.B * p.T * p.Hk) return; /* whole warps only; no block-wide barrier below */
    const int64_t h = th % p.Hk, t = (th / p.Hk) % p.T, b = th / (p.Hk * p.T);
    const int G = (int)p.G;
    E *qs = (E *)bw_tdc_smem + (size_t)warp * TR::WARP_ELEMS, *os = qs + 8 * D, *stages = os + 8 * D;

    /* Q and dO of the token's G rows (rows G..7 zero), then the first two chunks */
#pragma unroll
    for (int i = 0; i < 8 * CPR / 32; i++) {
        const int idx = lane + 32 * i, g = idx / CPR, ch = idx % CPR;
        const bool ok = g < G;
        const int gg = ok ? g : 0;
        moda_cp_async16(moda_smem_addr(qs + moda_swz<D>(g, ch * 8)),
                        (const E *)p.q.data + bw_off4(p.q, b, t, h, gg) + ch * 8, ok);
        moda_cp_async16(moda_smem_addr(os + moda_swz<D>(g, ch * 8)),
                        (const E *)p.dout.data + bw_off4(p.dout, b, t, h, gg) + ch * 8, ok);
    }
    moda_cp_async_commit();
    const int64_t kb = b * p.kd.s0 + t * p.kd.s1 + h * p.kd.s3, vb = b * p.vd.s0 + t * p.vd.s1 + h * p.vd.s3;
    const int64_t dkb = b * p.dkd.s0 + t * p.dkd.s1 + h * p.dkd.s3, dvb = b * p.dvd.s0 + t * p.dvd.s1 + h * p.dvd.s3;
    const bool f32_k = p.dkd.dtype == MODA_F32, f32_v = p.dvd.dtype == MODA_F32;
    const bool old_k = p.accumulate && !f32_k, old_v = p.accumulate && !f32_v;
    const int64_t nchunks = (p.d1 - p.d0 + 15) / 16;
#pragma unroll
    for (int c = 0; c < 2; c++) {
        if (c < nchunks) bw_tdc_load_chunk<E, D>(p, stages + c * 4 * TILE, p.d0 + 16 * c, kb, vb, dkb, dvb, old_k, old_v, lane);
        moda_cp_async_commit();
    }

    /* this lane's two rows g0, g0 + 1 of the C fragments: lse (exp2 domain) and Delta; +inf / 0 past G */
    const int g0 = 2 * (lane & 3);
    float l2[2], dl[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int g = g0 + i;
        l2[i] = g < G ? bw_load(p.lse, bw_off4(p.lse, b, t, h, g)) * BW_LOG2E : __int_as_float(0x7f800000);
        dl[i] = g < G ? p.delta[bw_row(p, b, t, h, g)] : 0.f;
    }
    /* ldmatrix row addresses: Q / dO (8 rows), the chunk's tiles read as A (rows = slots) and as A^T */
    const int lrow = lane & 7, lq = lane >> 3;
    float dqt[D / 16][4]; /* dQ^T: rows = dims, columns = query rows g */
#pragma unroll
    for (int m = 0; m < D / 16; m++) dqt[m][0] = dqt[m][1] = dqt[m][2] = dqt[m][3] = 0.f;

    for (int64_t c = 0; c < nchunks; c++) {
        E *ks = stages + (c & 1) * 4 * TILE, *vs = ks + TILE, *dks = vs + TILE, *dvs = dks + TILE;
        const int64_t l0 = p.d0 + 16 * c;
        moda_cp_async_wait<1>();
        __syncwarp();
        /* S^T and dP^T: A = the slot rows (non-transposed ldmatrix), B = Q / dO rows as columns */
        float st[4] = {0.f, 0.f, 0.f, 0.f}, dpt[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kp = 0; kp < D / 32; kp++) {
            uint32_t bq[4], bo[4];
            moda_ldmatrix_x4(bq, moda_smem_addr(qs + moda_swz<D>(lrow, 32 * kp + 8 * lq)));
            moda_ldmatrix_x4(bo, moda_smem_addr(os + moda_swz<D>(lrow, 32 * kp + 8 * lq)));
#pragma unroll
            for (int k2 = 0; k2 < 2; k2++) {
                const int kk = 2 * kp + k2;
                uint32_t ak[4], av[4];
                const int arow = (lq & 1) * 8 + lrow, acol = 16 * kk + (lq >> 1) * 8;
                moda_ldmatrix_x4(ak, moda_smem_addr(ks + moda_swz<D>(arow, acol)));
                moda_ldmatrix_x4(av, moda_smem_addr(vs + moda_swz<D>(arow, acol)));
                moda_mma<E>::run(st, ak, bq[2 * k2], bq[2 * k2 + 1]);
                moda_mma<E>::run(dpt, av, bo[2 * k2], bo[2 * k2 + 1]);
            }
        }
        /* P^T, dS^T; slots past d1 and rows past G are exactly 0 */
        const int r = lane >> 2;
        float pt[4], dst[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const bool ok = l0 + r + 8 * (i >> 1) < p.d1;
            pt[i] = ok ? bw_exp2(st[i] * p.scale_log2 - l2[i & 1]) : 0.f;
            dst[i] = pt[i] * (dpt[i] - dl[i & 1]);
        }
        const uint32_t ap[4] = {moda_dt<E>::pack2(pt[0], pt[1]), moda_dt<E>::pack2(pt[2], pt[3]), 0u, 0u};
        const uint32_t as[4] = {moda_dt<E>::pack2(dst[0], dst[1]), moda_dt<E>::pack2(dst[2], dst[3]), 0u, 0u};
        /* f32 depth gradients (a model's accumulation buffers) keep f32 accuracy: P^T and dS^T also enter as
         * the residual after rounding (x = hi + lo to about 2^-17 relative in bf16, 2^-22 in f16) */
        const uint32_t aplo[4] = {bw_residual2<E>(pt[0], pt[1], ap[0]), bw_residual2<E>(pt[2], pt[3], ap[1]), 0u, 0u};
        const uint32_t aslo[4] = {bw_residual2<E>(dst[0], dst[1], as[0]), bw_residual2<E>(dst[2], dst[3], as[1]), 0u, 0u};
        /* dQ^T += Kd^T dS^T: A = the Kd tile transposed, B = dS^T moved into the B layout */
        const uint32_t bs0 = bw_movmatrix_t(as[0]), bs1 = bw_movmatrix_t(as[1]);
#pragma unroll
        for (int m = 0; m < D / 16; m++) {
            uint32_t a[4];
            moda_ldmatrix_x4_trans(a, moda_smem_addr(ks + moda_swz<D>((lq >> 1) * 8 + lrow, 16 * m + (lq & 1) * 8)));
            moda_mma<E>::run(dqt[m], a, bs0, bs1);
        }
        /* dVd = P^T dO and dKd = s dS^T Q, 64 columns at a time */
#pragma unroll
        for (int half = 0; half < D / 64; half++) {
            float acc[8][4];
            bw_tdc_rows_product<E, D>(acc, ap, aplo, f32_v, os, 64 * half, lrow, lq);
            bw_tdc_put<E, D>(p, p.dvd, dvb, l0, acc, 64 * half, 1.f, dvs, lane);
        }
        bw_tdc_flush<E, D>(p, p.dvd, dvb, l0, dvs, lane);
#pragma unroll
        for (int half = 0; half < D / 64; half++) {
            float acc[8][4];
            bw_tdc_rows_product<E, D>(acc, as, aslo, f32_k, qs, 64 * half, lrow, lq);
            bw_tdc_put<E, D>(p, p.dkd, dkb, l0, acc, 64 * half, p.scale, dks, lane);
        }
        bw_tdc_flush<E, D>(p, p.dkd, dkb, l0, dks, lane);
        __syncwarp(); /* every lane is done with this stage before it is refilled */
        if (c + 2 < nchunks)
            bw_tdc_load_chunk<E, D>(p, ks, l0 + 32, kb, vb, dkb, dvb, old_k, old_v, lane);
        moda_cp_async_commit();
    }
    /* dQacc rows g < G: dims 16m + r (+8), rows g0, g0 + 1 */
    const int r = lane >> 2;
#pragma unroll
    for (int m = 0; m < D / 16; m++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int g = g0 + (i & 1), dim = 16 * m + r + 8 * (i >> 1);
            if (g < G) p.dqacc[bw_row(p, b, t, h, g) * D + dim] = dqt[m][i] * p.scale;
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

template <typename E, int D> static cudaError_t bw_run_tdc(const bw_params *bp, cudaStream_t st) {
    typedef bw_tdc_traits<D> TR;
    const cudaError_t e = cudaFuncSetAttribute(bw_tdc_kernel<E, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)TR::SMEM);
    if (e != cudaSuccess) return e;
    const int64_t warps = bp->B * bp->T * bp->Hk;
    bw_tdc_kernel<E, D><<<(unsigned)((warps + TR::WARPS - 1) / TR::WARPS), TR::WARPS * 32, TR::SMEM, st>>>(*bp);
    return cudaGetLastError();
}

template <typename E> static cudaError_t bw_run_tdc_e(const bw_params *bp, cudaStream_t st) {
    return bp->d == 64 ? bw_run_tdc<E, 64>(bp, st) : bw_run_tdc<E, 128>(bp, st);
}

/* f32 depth gradients (the trainer's accumulation buffers) stay on the warp kernel: there the tensor-core kernel
 * adds into them with synchronous 8-byte read-modify-writes, and the trainer's attention backward measured
 * 40.4 ms per step with it against ~35 expected with the warp kernel (d384 T1024 attn+ffn, H100, 2026-11-23;
 * docs/cuda_backward_notes.md). MODA_CUDA_BWD_TDC_F32=1 sends them to the tensor-core kernel (tests, timing). */
int bw_tdc_use(const bw_params *bp) {
    if (!bw_new_kernel_on("MODA_CUDA_BWD_NOTDC")) return 0;
    if (bp->dkd.dtype != MODA_F32 && bp->dvd.dtype != MODA_F32) return 1;
    const char *e = getenv("MODA_CUDA_BWD_TDC_F32");
    return e && e[0] == '1';
}

cudaError_t bw_launch_tdw(const bw_params *bp, int tdc, cudaStream_t st) {
    const int bf = bp->q.dtype == MODA_BF16;
    if (tdc)
        return bf ? bw_run_tdc_e<__nv_bfloat16>(bp, st) : bw_run_tdc_e<__half>(bp, st);
    return bf ? bw_run_tdw_e<__nv_bfloat16>(bp, st) : bw_run_tdw_e<__half>(bp, st);
}
