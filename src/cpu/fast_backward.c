/*
 * fast_backward.c - the fast CPU backward of MoDA (spec.md §3): f32/f16/bf16 storage, fp32 arithmetic.
 *
 * Pass 0 converts the row side once: fp32 copies of Q and dO (row-major and transposed), LSE in base 2 and
 * Delta = <dO, O> per row. P is recomputed from LSE. Then two kinds of work item run in one parallel loop,
 * each the sole writer of its outputs, so the result is bitwise identical run to run and for any thread
 * count (no atomics, no reduction whose order depends on scheduling):
 *   - key items (pass 1): one key tile (sequence keys, or chunk-mode depth slots) meets, block by block,
 *     every query row that sees it and accumulates its dK, dV (dKd, dVd) in fp32, computed transposed
 *     (keys x rows) so that P^T dO and dS^T Q are plain GEMMs;
 *   - row items (pass 2): one block of query rows meets every key tile it sees and accumulates dQ; in token
 *     mode it also owns the depth slots of its tokens (only the G rows of token t see slot (t, l)) and writes
 *     their dKd, dVd directly, so a depth slot is read once per call.
 * The sequence logits and dP are computed twice (once per pass): 7 tile GEMMs instead of FlashAttention-2's
 * 5, the price of determinism without atomics.
 *
 * Workspace (moda_cpu_fast_backward_workspace), in bytes, each array rounded up to 64:
 *     64 + 4*B*Hk*[ 2*np + T*G*(dp + dvp) + (d + dv)*np ] + threads * scratch
 * with np = round8(T*G) + 8, dp = round8(d), dvp = round8(dv), and scratch the per-thread tile arena of
 * bwd_layout (independent of T: 290 KiB for d = dv = 64, G = 4). The T-dependent part is about twice q and
 * dout in fp32. With a smaller workspace the call uses as many threads as fit; with none it allocates its own.
 */
#include "fast_common.h"

/* fp32 copies of the row-side operands of one call, made once (pass 0) and read in place by both passes. Row
 * r = t*G + g of head (b, h) is row r of the [bh] slab; transposed copies have row pitch np (padded so that
 * 8-wide loads past the last row stay inside). */
typedef struct bwd_rows_f32 {
    int64_t n, np;  /* rows per (b, h) = T*G, padded pitch */
    float *lse2;    /* [bh][np]  LSE * log2(e) */
    float *delta;   /* [bh][np]  <dO, O> */
    float *q, *dout; /* [bh][n][dp], [bh][n][dvp] */
    float *qt, *dot; /* [bh][d][np], [bh][dv][np] */
} bwd_rows_f32;

typedef struct bwd_scratch {
    /* pass 1 (keys x rows) */
    float *kr, *vr;  /* P1_KEYS x dp, P1_KEYS x dvp */
    float *st, *dpt; /* P1_KEYS x P1_ROWS: logits -> P, dP -> dS */
    float *dk, *dv;  /* P1_KEYS x dp, P1_KEYS x dvp */
    /* pass 2 (rows x keys) */
    float *dq;             /* R2 x dp */
    float *k2, *kt2, *vt2; /* FAST_KEYS x dp, d x FAST_KEYS, dv x FAST_KEYS */
    float *s2, *dp2;       /* R2 x FAST_KEYS: logits -> dS, dP -> P */
    float *dkd2, *dvd2;    /* FAST_KEYS x dp, FAST_KEYS x dvp: token-mode depth gradients */
    float *tmp;
} bwd_scratch;

static int64_t p1_tokens(const moda_problem *p) { return fast_max(1, FAST_P1_ROWS / p->G); }
static int64_t p1_ld(const moda_problem *p) { return fast_round8(p1_tokens(p) * p->G); }
static int64_t p2_tokens(const moda_problem *p) { return fast_max(1, FAST_ROWS / p->G); }

static size_t bwd_layout(const moda_problem *p, char *base, bwd_scratch *w) {
    const int64_t d = p->d, dv = p->dv, dp = fast_round8(d), dvp = fast_round8(dv);
    const int64_t R1 = p1_ld(p), R2 = p2_tokens(p) * p->G, KB1 = FAST_P1_KEYS, KB2 = FAST_KEYS;
    fast_arena a = {base, 0};
    w->kr = fast_take(&a, KB1 * dp);
    w->vr = fast_take(&a, KB1 * dvp);
    w->st = fast_take(&a, KB1 * R1);
    w->dpt = fast_take(&a, KB1 * R1);
    w->dk = fast_take(&a, KB1 * dp);
    w->dv = fast_take(&a, KB1 * dvp);
    w->dq = fast_take(&a, R2 * dp);
    w->k2 = fast_take(&a, KB2 * dp);
    w->kt2 = fast_take(&a, d * KB2);
    w->vt2 = fast_take(&a, dv * KB2);
    w->s2 = fast_take(&a, R2 * KB2);
    w->dp2 = fast_take(&a, R2 * KB2);
    w->dkd2 = fast_take(&a, KB2 * dp);
    w->dvd2 = fast_take(&a, KB2 * dvp);
    w->tmp = fast_take(&a, 8 * fast_max(dp, dvp));
    return a.used;
}

static size_t rows_layout(const moda_problem *p, char *base, bwd_rows_f32 *r) {
    const int64_t nbh = p->B * p->Hk, dp = fast_round8(p->d), dvp = fast_round8(p->dv);
    r->n = p->T * p->G;
    r->np = fast_round8(r->n) + 8;
    fast_arena a = {base, 0};
    r->lse2 = fast_take(&a, nbh * r->np);
    r->delta = fast_take(&a, nbh * r->np);
    r->q = fast_take(&a, nbh * r->n * dp);
    r->dout = fast_take(&a, nbh * r->n * dvp);
    r->qt = fast_take(&a, nbh * p->d * r->np);
    r->dot = fast_take(&a, nbh * p->dv * r->np);
    return a.used;
}

/* ---- pass 0: fp32 (and transposed) Q and dO, LSE in base 2, Delta = <dO, O>, for tokens [t0, t1) ---- */
MODA_FAST_CLONES static void bwd_prepare(const moda_problem *p, const bwd_rows_f32 *rf, float *tmp, int64_t b,
                                         int64_t h, int64_t t0, int64_t t1) {
    const int64_t G = p->G, d = p->d, dv = p->dv, dp = fast_round8(d), dvp = fast_round8(dv);
    const int64_t bh = b * p->Hk + h, n = rf->n, np = rf->np, r0 = t0 * G;
    float *q = rf->q + (bh * n + r0) * dp, *dout = rf->dout + (bh * n + r0) * dvp;
    /* the transposed copies feed only key items (pass 1) */
    const int keys = p->sequence || (p->chunk && moda_problem_has_depth(p));
    fast_load_rows(&p->q, G, b, h, t0, t1, d, 1.0f, q, dp, keys ? rf->qt + bh * d * np + r0 : NULL, np, NULL);
    fast_load_rows(&p->grad_o, G, b, h, t0, t1, dv, 1.0f, dout, dvp, keys ? rf->dot + bh * dv * np + r0 : NULL, np,
                   NULL);
    const float *lse = (const float *)p->lse.data;
    float *lse2 = rf->lse2 + bh * np, *delta = rf->delta + bh * np;
    int64_t r = r0;
    for (int64_t t = t0; t < t1; t++)
        for (int64_t g = 0; g < G; g++, r++) {
            lse2[r] = (float)(lse[moda_off_lse(&p->lse, b, t, h, g)] * FAST_LOG2E);
            fast_load_row(tmp, &p->o, moda_off_q(&p->o, b, t, h, g, 0), p->o.stride[4], dv, 1.0f);
            const float *dr = rf->dout + (bh * n + r) * dvp;
            float acc = 0.0f;
            for (int64_t i = 0; i < dv; i++) acc += tmp[i] * dr[i];
            delta[r] = acc;
        }
    /* the pitch padding past the last row is read by 8-wide loads (and masked): keep it finite */
    if (t1 == p->T)
        for (int64_t c = n; c < np; c++) {
            lse2[c] = delta[c] = 0.0f;
            for (int64_t i = 0; i < d; i++) rf->qt[(bh * d + i) * np + c] = 0.0f;
            for (int64_t i = 0; i < dv; i++) rf->dot[(bh * dv + i) * np + c] = 0.0f;
        }
}

/* Writes the fp32 gradients of a tile's keys (row `key` of gk / gv) to dK/dV or dKd/dVd: s * gk and gv,
 * added into dKd/dVd in accumulate mode. */
MODA_FAST_INLINE void store_key_grads(const moda_problem *p, const float *gk, const float *gv, int64_t b, int64_t h,
                            const fast_tile *k) {
    const int64_t d = p->d, dv = p->dv, dp = fast_round8(d), dvp = fast_round8(dv);
    const moda_operand *ok = k->depth ? &p->grad_kd : &p->grad_k, *ov = k->depth ? &p->grad_vd : &p->grad_v;
    const int acc = k->depth && p->accumulate_depth;
    const float s = (float)p->scale;
    int64_t key = 0;
    for (int64_t u = k->ua; u < k->ub; u++)
        for (int64_t l = k->la; l < k->lb; l++, key++) {
            if (k->depth) {
                fast_store_row(ok, moda_off_kd(ok, b, u, l, h, 0), ok->stride[4], d, gk + key * dp, s, acc);
                fast_store_row(ov, moda_off_kd(ov, b, u, l, h, 0), ov->stride[4], dv, gv + key * dvp, 1.0f, acc);
            } else {
                fast_store_row(ok, moda_off_k(ok, b, u, h, 0), ok->stride[3], d, gk + key * dp, s, 0);
                fast_store_row(ov, moda_off_k(ov, b, u, h, 0), ov->stride[3], dv, gv + key * dvp, 1.0f, 0);
            }
        }
}

/* ---- pass 1: one key tile, every row that sees it -> dK, dV of the tile's keys ---- */
MODA_FAST_CLONES static void bwd_keys(const moda_problem *p, const bwd_scratch *w, const bwd_rows_f32 *rf, int64_t b,
                                      int64_t h, const fast_tile *k) {
    const int64_t G = p->G, d = p->d, dv = p->dv, dp = fast_round8(d), dvp = fast_round8(dv), ld = p1_ld(p);
    const int64_t nk = fast_tile_keys(k), ns = k->lb - k->la, tbk = p1_tokens(p);
    const int64_t bh = b * p->Hk + h, n = rf->n, np = rf->np;
    const float *q = rf->q + bh * n * dp, *dout = rf->dout + bh * n * dvp, *qt = rf->qt + bh * d * np;
    const float *dot = rf->dot + bh * dv * np, *lse2 = rf->lse2 + bh * np, *delta = rf->delta + bh * np;
    const float c = (float)(p->scale * FAST_LOG2E);
    const fast_v8i iota = {0, 1, 2, 3, 4, 5, 6, 7};
    const fast_v8 ninf = (fast_v8){0} - INFINITY, zero = {0};
    fast_load_keys(p, k->depth ? &p->kd : &p->k, b, h, k, d, w->kr, dp, NULL, 0, NULL);
    fast_load_keys(p, k->depth ? &p->vd : &p->v, b, h, k, dv, w->vr, dvp, NULL, 0, NULL);
    memset(w->dk, 0, (size_t)(nk * dp) * sizeof(float));
    memset(w->dv, 0, (size_t)(nk * dvp) * sizeof(float));

    int64_t ta, tb;
    fast_rows_of_tile(p, k, 0, p->T, &ta, &tb);
    for (int64_t t0 = ta; t0 < tb; t0 += tbk) {
        const int64_t t1 = fast_min(tb, t0 + tbk), R = (t1 - t0) * G, Rp = fast_round8(R), r0 = t0 * G;
        fast_gemm(nk, Rp, d, w->kr, dp, qt + r0, np, w->st, ld, 0);
        fast_gemm(nk, Rp, dv, w->vr, dvp, dot + r0, np, w->dpt, ld, 0);
        for (int64_t key = 0; key < nk; key++) {
            int64_t ra, rb;
            fast_rows_of_key(p, k->depth, k->ua + key / ns, &ra, &rb);
            ra = (fast_max(ra, t0) - t0) * G;
            rb = (fast_min(rb, t1) - t0) * G;
            float *s = w->st + key * ld, *dpr = w->dpt + key * ld;
            for (int64_t r = 0; r < Rp; r += 8) {
                fast_v8i idx = iota + (int32_t)r;
                fast_v8i in = (idx >= (int32_t)ra) & (idx < (int32_t)rb);
                fast_v8 x = fast_select(in, c * fast_ld(s + r) - fast_ld(lse2 + r0 + r), ninf);
                fast_v8 pr = fast_exp2(&x);
                fast_v8 ds = fast_select(in, pr * (fast_ld(dpr + r) - fast_ld(delta + r0 + r)), zero);
                fast_st(s + r, pr);
                fast_st(dpr + r, ds);
            }
        }
        fast_gemm(nk, dvp, R, w->st, ld, dout + r0 * dvp, dvp, w->dv, dvp, 1);
        fast_gemm(nk, dp, R, w->dpt, ld, q + r0 * dp, dp, w->dk, dp, 1);
    }
    store_key_grads(p, w->dk, w->dv, b, h, k);
}

/* ---- pass 2: one block of rows, every key tile it sees -> dQ ---- */
typedef struct bwd_block {
    const float *q, *dout, *lse2, *delta; /* the block's rows in the fp32 copies */
} bwd_block;

MODA_FAST_INLINE void bwd_rows_tile(const moda_problem *p, const bwd_scratch *w, const bwd_block *rb_, int64_t b,
                                    int64_t h, int64_t t0, int64_t t1, const fast_tile *k) {
    const int64_t G = p->G, d = p->d, dv = p->dv, dp = fast_round8(d), dvp = fast_round8(dv);
    const float c = (float)(p->scale * FAST_LOG2E);
    const fast_v8i iota = {0, 1, 2, 3, 4, 5, 6, 7};
    const fast_v8 ninf = (fast_v8){0} - INFINITY, zero = {0};
    int64_t ta, tb;
    fast_rows_of_tile(p, k, t0, t1, &ta, &tb);
    if (ta >= tb) return;
    int64_t nk = fast_tile_keys(k), nkp = fast_round8(nk);
    fast_load_keys(p, k->depth ? &p->kd : &p->k, b, h, k, d, w->k2, dp, w->kt2, FAST_KEYS, NULL);
    fast_load_keys(p, k->depth ? &p->vd : &p->v, b, h, k, dv, NULL, 0, w->vt2, FAST_KEYS, w->tmp);
    const int64_t ra = (ta - t0) * G, rb = (tb - t0) * G;
    const float *q = rb_->q + ra * dp, *dout = rb_->dout + ra * dvp;
    float *s2 = w->s2 + ra * FAST_KEYS, *dp2 = w->dp2 + ra * FAST_KEYS;
    fast_gemm(rb - ra, nkp, d, q, dp, w->kt2, FAST_KEYS, s2, FAST_KEYS, 0);
    fast_gemm(rb - ra, nkp, dv, dout, dvp, w->vt2, FAST_KEYS, dp2, FAST_KEYS, 0);
    for (int64_t r = ra; r < rb; r++) {
        int64_t k0, k1;
        fast_keys_of_row(p, k, t0 + r / G, &k0, &k1);
        float *s = w->s2 + r * FAST_KEYS, *dpr = w->dp2 + r * FAST_KEYS;
        const float l2 = rb_->lse2[r], dl = rb_->delta[r];
        for (int64_t j = 0; j < nkp; j += 8) {
            fast_v8i idx = iota + (int32_t)j;
            fast_v8i in = (idx >= (int32_t)k0) & (idx < (int32_t)k1);
            fast_v8 x = fast_select(in, c * fast_ld(s + j) - l2, ninf);
            fast_v8 pr = fast_exp2(&x);
            fast_st(s + j, fast_select(in, pr * (fast_ld(dpr + j) - dl), zero));
            fast_st(dpr + j, pr);
        }
    }
    fast_gemm(rb - ra, dp, nk, s2, FAST_KEYS, w->k2, dp, w->dq + ra * dp, dp, 1);
    if (k->depth && !p->chunk) {
        /* Token mode: this tile is one token's slots and its G rows, all in this block, are the only rows that
         * see them, so the block owns dKd/dVd of the tile: dS^T Q and P^T dO, no pass-1 item needed. */
        fast_gemm_tn(nk, dp, rb - ra, s2, FAST_KEYS, q, dp, w->dkd2, dp, 0);
        fast_gemm_tn(nk, dvp, rb - ra, dp2, FAST_KEYS, dout, dvp, w->dvd2, dvp, 0);
        store_key_grads(p, w->dkd2, w->dvd2, b, h, k);
    }
}

MODA_FAST_CLONES static void bwd_rows(const moda_problem *p, const bwd_scratch *w, const bwd_rows_f32 *rf, int64_t b,
                                      int64_t h, int64_t t0, int64_t t1) {
    const int64_t G = p->G, R = (t1 - t0) * G, dp = fast_round8(p->d), dvp = fast_round8(p->dv);
    const int64_t bh = b * p->Hk + h, r0 = t0 * G;
    const bwd_block blk = {rf->q + (bh * rf->n + r0) * dp, rf->dout + (bh * rf->n + r0) * dvp,
                           rf->lse2 + bh * rf->np + r0, rf->delta + bh * rf->np + r0};
    memset(w->dq, 0, (size_t)(R * dp) * sizeof(float));
    const fast_block_tiling bt = fast_block_tiles(p, t0, t1, FAST_KEYS);
    for (int64_t i = 0; i < bt.count; i++) {
        fast_tile k = fast_block_tile(p, &bt, i);
        bwd_rows_tile(p, w, &blk, b, h, t0, t1, &k);
    }
    for (int64_t r = 0; r < R; r++) {
        int64_t t = t0 + r / G, g = r % G;
        fast_store_row(&p->grad_q, moda_off_q(&p->grad_q, b, t, h, g, 0), p->grad_q.stride[4], p->d, w->dq + r * dp,
                       (float)p->scale, 0);
    }
}

static size_t bwd_scratch_bytes(const moda_problem *p) {
    bwd_scratch w;
    return bwd_layout(p, NULL, &w);
}
static size_t bwd_rows_bytes(const moda_problem *p) {
    bwd_rows_f32 r;
    return rows_layout(p, NULL, &r);
}

size_t moda_cpu_fast_backward_workspace(const moda_problem *p) {
    return FAST_ALIGN + bwd_rows_bytes(p) + (size_t)fast_threads(p) * bwd_scratch_bytes(p);
}

moda_status moda_cpu_fast_backward(const moda_problem *p, void *workspace, size_t workspace_bytes) {
    if (p->B == 0 || p->T == 0 || p->Hk == 0 || p->G == 0) return MODA_OK;
    const size_t per = bwd_scratch_bytes(p), fixed = FAST_ALIGN + bwd_rows_bytes(p);
    int nth = fast_threads(p);
    void *own = NULL;
    if (!workspace) {
        workspace_bytes = fixed + per * (size_t)nth;
        own = workspace = malloc(workspace_bytes);
        if (!own)
            return moda_fail(MODA_ERR_OUT_OF_MEMORY, "fast CPU backward: could not allocate %zu bytes of workspace",
                             workspace_bytes);
    } else {
        if (workspace_bytes < fixed + per)
            return moda_fail(MODA_ERR_WORKSPACE,
                             "fast CPU backward: workspace of %zu bytes is smaller than the %zu bytes one thread needs "
                             "(moda_backward_workspace_size says how much to pass)",
                             workspace_bytes, fixed + per);
        size_t fit = (workspace_bytes - fixed) / per;
        if (fit < (size_t)nth) nth = (int)fit;
    }
    char *base = (char *)(((uintptr_t)workspace + FAST_ALIGN - 1) & ~(uintptr_t)(FAST_ALIGN - 1));
    bwd_rows_f32 rf;
    char *arenas = base + rows_layout(p, base, &rf);
    /* Tile padding (rows past R, columns past the last key) must hold finite values. */
    memset(arenas, 0, per * (size_t)nth);

    const int64_t B = p->B, T = p->T, Hk = p->Hk, nbh = B * Hk;
    const int64_t tpb = 64, npb = (T + tpb - 1) / tpb; /* pass-0 token blocks */
    /* Work order: sequence key tiles (earliest first: under a causal mask they meet the most rows), then row
     * blocks (latest first), then chunk-mode depth tiles (small), so dynamic scheduling ends on cheap items. */
    const int64_t nkb = p->sequence ? (T + FAST_P1_KEYS - 1) / FAST_P1_KEYS : 0;
    const int64_t t2 = p2_tokens(p), nrb = (T + t2 - 1) / t2;
    int64_t ns = 0, nt = 1, nub = 0, nsg = 0;
    if (moda_problem_has_depth(p) && p->chunk) { /* token-mode depth gradients come from the row items */
        fast_depth_tiling(p, FAST_P1_KEYS, &ns, &nt);
        nub = (T + nt - 1) / nt;
        nsg = (moda_problem_slots(p) + ns - 1) / ns;
    }
    const int64_t n1 = nbh * nkb, n2 = nbh * nrb, n3 = nbh * nub * nsg;

#pragma omp parallel num_threads(nth)
    {
        const int tid = fast_thread_id();
        bwd_scratch w;
        bwd_layout(p, arenas + per * (size_t)tid, &w);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nbh * npb; i++) {
            int64_t bh = i / npb, t0 = (i % npb) * tpb;
            bwd_prepare(p, &rf, w.tmp, bh / Hk, bh % Hk, t0, fast_min(T, t0 + tpb));
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n1 + n2 + n3; i++) {
            if (i < n1) {
                int64_t kb = i / nbh, bh = i % nbh, j = kb * FAST_P1_KEYS;
                fast_tile k = {0, j, fast_min(T, j + FAST_P1_KEYS), 0, 1};
                bwd_keys(p, &w, &rf, bh / Hk, bh % Hk, &k);
            } else if (i < n1 + n2) {
                int64_t i2 = i - n1, blk = nrb - 1 - i2 / nbh, bh = i2 % nbh;
                int64_t t0 = blk * t2;
                bwd_rows(p, &w, &rf, bh / Hk, bh % Hk, t0, fast_min(T, t0 + t2));
            } else {
                int64_t i3 = i - n1 - n2, bh = i3 % nbh, rest = i3 / nbh, sg = rest % nsg, ug = rest / nsg;
                int64_t u = ug * nt, la = p->d0 + sg * ns;
                fast_tile k = {1, u, fast_min(T, u + nt), la, fast_min(p->d1, la + ns)};
                bwd_keys(p, &w, &rf, bh / Hk, bh % Hk, &k);
            }
        }
    }
    free(own);
    return MODA_OK;
}
