/*
 * fast_forward.c - the fast CPU forward of MoDA (spec.md §2): f32/f16/bf16 storage, fp32 arithmetic.
 *
 * One work item is a block of query rows: the G heads of up to FAST_ROWS/G consecutive tokens of one (b, h).
 * They share K/V, so each key tile is converted to fp32 once and reused by every row of the block. The rows
 * meet the sequence key tiles and then the depth key tiles under ONE online softmax per row (FlashAttention-2
 * order: running max m, running sum l, unnormalised accumulator), in base 2 with s*log2(e) folded into q.
 * Memory beyond the outputs: one scratch arena per thread, O(tile), allocated once per call.
 */
#include "fast_common.h"

typedef struct fwd_scratch {
    float *q;   /* R x dp: q * s * log2(e) */
    float *kt;  /* d x FAST_KEYS: the key tile transposed */
    float *v;   /* FAST_KEYS x dvp */
    float *s;   /* R x FAST_KEYS: logits, then probabilities */
    float *acc; /* R x dvp: unnormalised output */
    float *m, *l;
    float *tmp;
} fwd_scratch;

static int64_t fwd_block_tokens(const moda_problem *p) { return fast_max(1, FAST_ROWS / p->G); }

static size_t fwd_layout(const moda_problem *p, char *base, fwd_scratch *w) {
    int64_t R = fwd_block_tokens(p) * p->G, dp = fast_round8(p->d), dvp = fast_round8(p->dv);
    fast_arena a = {base, 0};
    w->q = fast_take(&a, R * dp);
    w->kt = fast_take(&a, p->d * FAST_KEYS);
    w->v = fast_take(&a, FAST_KEYS * dvp);
    w->s = fast_take(&a, R * FAST_KEYS);
    w->acc = fast_take(&a, R * dvp);
    w->m = fast_take(&a, R);
    w->l = fast_take(&a, R);
    w->tmp = fast_take(&a, 8 * fast_max(dp, dvp));
    return a.used;
}

/* Folds logits row s[0, nkp) (keys [k0, k1) visible) into the row's softmax state and leaves the
 * probabilities exp2(s - m_new) in s (0 outside [k0, k1)); rescales the row's accumulator. */
MODA_FAST_INLINE void fwd_softmax_row(float *s, int64_t nkp, int64_t k0, int64_t k1, float *m, float *l, float *acc,
                                      int64_t dvp) {
    const fast_v8i iota = {0, 1, 2, 3, 4, 5, 6, 7};
    const fast_v8 ninf = (fast_v8){0} - INFINITY;
    if (k0 >= k1) {
        memset(s, 0, (size_t)nkp * sizeof(float));
        return;
    }
    int64_t c0 = k0 & ~(int64_t)7, c1 = fast_round8(k1);
    fast_v8 vm = ninf;
    for (int64_t c = c0; c < c1; c += 8) {
        fast_v8i idx = iota + (int32_t)c;
        fast_v8i in = (idx >= (int32_t)k0) & (idx < (int32_t)k1);
        vm = fast_vmax(vm, fast_select(in, fast_ld(s + c), ninf));
    }
    float mx = fast_hmax(&vm), mold = *m;
    float mnew = mx > mold ? mx : mold;
    float alpha = mold == -INFINITY ? 0.0f : exp2f(mold - mnew);
    fast_v8 vs = {0};
    for (int64_t c = 0; c < c0; c += 8) fast_st(s + c, (fast_v8){0});
    for (int64_t c = c0; c < c1; c += 8) {
        fast_v8i idx = iota + (int32_t)c;
        fast_v8i in = (idx >= (int32_t)k0) & (idx < (int32_t)k1);
        fast_v8 x = fast_select(in, fast_ld(s + c) - mnew, ninf);
        fast_v8 e = fast_exp2(&x);
        fast_st(s + c, e);
        vs += e;
    }
    for (int64_t c = c1; c < nkp; c += 8) fast_st(s + c, (fast_v8){0});
    *l = *l * alpha + fast_hsum(&vs);
    *m = mnew;
    if (alpha != 1.0f)
        for (int64_t c = 0; c < dvp; c += 8) fast_st(acc + c, fast_ld(acc + c) * alpha);
}

MODA_FAST_INLINE void fwd_tile(const moda_problem *p, const fwd_scratch *w, int64_t b, int64_t h, int64_t t0,
                               int64_t t1, const fast_tile *k) {
    const int64_t G = p->G, d = p->d, dv = p->dv, dp = fast_round8(d), dvp = fast_round8(dv);
    int64_t ta, tb;
    fast_rows_of_tile(p, k, t0, t1, &ta, &tb);
    if (ta >= tb) return;
    int64_t nk = fast_tile_keys(k), nkp = fast_round8(nk);
    fast_load_keys(p, k->depth ? &p->kd : &p->k, b, h, k, d, NULL, 0, w->kt, FAST_KEYS, w->tmp);
    fast_load_keys(p, k->depth ? &p->vd : &p->v, b, h, k, dv, w->v, dvp, NULL, 0, NULL);
    int64_t ra = (ta - t0) * G, rb = (tb - t0) * G;
    fast_gemm(rb - ra, nkp, d, w->q + ra * dp, dp, w->kt, FAST_KEYS, w->s + ra * FAST_KEYS, FAST_KEYS, 0);
    for (int64_t r = ra; r < rb; r++) {
        int64_t k0, k1;
        fast_keys_of_row(p, k, t0 + r / G, &k0, &k1);
        fwd_softmax_row(w->s + r * FAST_KEYS, nkp, k0, k1, w->m + r, w->l + r, w->acc + r * dvp, dvp);
    }
    fast_gemm(rb - ra, dvp, nk, w->s + ra * FAST_KEYS, FAST_KEYS, w->v, dvp, w->acc + ra * dvp, dvp, 1);
}

/* Rows of tokens [t0, t1) of head h: every key tile, then normalise and store O and LSE. */
MODA_FAST_CLONES static void fwd_block(const moda_problem *p, const fwd_scratch *w, int64_t b, int64_t h, int64_t t0,
                                       int64_t t1) {
    const int64_t G = p->G, R = (t1 - t0) * G, dvp = fast_round8(p->dv);
    const float c = (float)(p->scale * FAST_LOG2E);
    fast_load_rows(&p->q, G, b, h, t0, t1, p->d, c, w->q, fast_round8(p->d), NULL, 0, NULL);
    for (int64_t r = 0; r < R; r++) {
        w->m[r] = -INFINITY;
        w->l[r] = 0.0f;
    }
    memset(w->acc, 0, (size_t)(R * dvp) * sizeof(float));

    const fast_block_tiling bt = fast_block_tiles(p, t0, t1, FAST_KEYS);
    for (int64_t i = 0; i < bt.count; i++) {
        fast_tile k = fast_block_tile(p, &bt, i);
        fwd_tile(p, w, b, h, t0, t1, &k);
    }

    float *lse = (float *)p->lse.data;
    for (int64_t r = 0; r < R; r++) {
        int64_t t = t0 + r / G, g = r % G;
        float l = w->l[r];
        /* An empty key set (sequence off and d0 == d1) gives O = 0, LSE = -inf (spec.md §2). */
        float inv = l > 0.0f ? 1.0f / l : 0.0f;
        fast_store_row(&p->o, moda_off_q(&p->o, b, t, h, g, 0), p->o.stride[4], p->dv, w->acc + r * dvp, inv, 0);
        if (lse)
            lse[moda_off_lse(&p->lse, b, t, h, g)] =
                l > 0.0f ? (float)(((double)w->m[r] + log2((double)l)) * FAST_LN2) : -INFINITY;
    }
}

moda_status moda_cpu_fast_forward(const moda_problem *p) {
    if (p->B == 0 || p->T == 0 || p->Hk == 0 || p->G == 0) return MODA_OK;
    fwd_scratch w;
    size_t per = fwd_layout(p, NULL, &w);
    int nth = fast_threads(p);
    const int64_t tb = fwd_block_tokens(p), nblk = (p->T + tb - 1) / tb, nbh = p->B * p->Hk;
    if ((int64_t)nth > nbh * nblk) nth = (int)(nbh * nblk);
    char *arena = aligned_alloc(FAST_ALIGN, per * (size_t)nth);
    if (!arena)
        return moda_fail(MODA_ERR_OUT_OF_MEMORY, "fast CPU forward: could not allocate %zu bytes of scratch",
                         per * (size_t)nth);
    /* Zeroed once: tile padding (columns past the last key, rows past dv) must hold finite values. */
    memset(arena, 0, per * (size_t)nth);

#pragma omp parallel num_threads(nth)
    {
        const int tid = fast_thread_id();
        fwd_scratch tw;
        fwd_layout(p, arena + per * (size_t)tid, &tw);
        /* Latest blocks first: under a causal mask they carry the most keys, so dynamic scheduling ends with
         * the cheap ones and no core idles behind one long block. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nbh * nblk; i++) {
            int64_t blk = nblk - 1 - i / nbh, bh = i % nbh;
            int64_t t0 = blk * tb, t1 = fast_min(p->T, t0 + tb);
            fwd_block(p, &tw, bh / p->Hk, bh % p->Hk, t0, t1);
        }
    }
    free(arena);
    return MODA_OK;
}
