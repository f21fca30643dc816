/* config.c - the model's configuration: defaults, validation, the parameter table and cost estimates. */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

moda_model_config moda_model_config_default(void) {
    moda_model_config c;
    memset(&c, 0, sizeof c);
    c.V = 256;
    c.D = 128;
    c.N = 4;
    c.Hq = 4;
    c.Hk = 2;
    c.d = 32;
    c.F = 0;
    c.rope_base = 10000.0;
    c.post_norm = 0;
    c.qk_norm = 1;
    c.tied = 0;
    c.depth = MODA_DEPTH_SRC_ATTN_FFN;
    c.window = -1;
    return c;
}

static const char *const depth_names[] = {"none", "attn", "attn+ffn", "attn+ffn+extra-attn"};

const char *moda_depth_source_name(moda_depth_source s) {
    return (unsigned)s < 4 ? depth_names[s] : "unknown";
}

int moda_depth_source_parse(const char *s) {
    for (int i = 0; i < 4; i++)
        if (!strcmp(s, depth_names[i])) return i;
    if (!strcmp(s, "extra") || !strcmp(s, "extra-attn")) return MODA_DEPTH_SRC_EXTRA;
    if (!strcmp(s, "ffn")) return MODA_DEPTH_SRC_ATTN_FFN;
    return -1;
}

int64_t moda_model_slots_per_block(const moda_model_config *c) {
    switch (c->depth) {
    case MODA_DEPTH_SRC_NONE: return 0;
    case MODA_DEPTH_SRC_ATTN: return 1;
    default: return 2;
    }
}

int64_t moda_model_slots(const moda_model_config *c) { return c->N * moda_model_slots_per_block(c); }

moda_status moda_model_config_resolve(moda_model_config *c) {
    const int64_t big = (int64_t)1 << 24;
    if (c->V < 2 || c->V > big) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "vocab %lld must be in [2, %lld]", (long long)c->V, (long long)big);
    if (c->D < 1 || c->D > 65536) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "width D=%lld must be in [1, 65536]", (long long)c->D);
    if (c->N < 1 || c->N > 1024) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "blocks N=%lld must be in [1, 1024]", (long long)c->N);
    if (c->Hk < 1 || c->Hq < 1) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "heads must be >= 1 (Hq=%lld, Hk=%lld)", (long long)c->Hq, (long long)c->Hk);
    if (c->Hq % c->Hk)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "query heads Hq=%lld must be a multiple of key/value heads Hk=%lld", (long long)c->Hq, (long long)c->Hk);
    if (c->d == 0 && c->D % c->Hq == 0) c->d = c->D / c->Hq;
    if (c->d < 2 || c->d > 1024 || c->d % 2)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "head dim d=%lld must be even and in [2, 1024] (RoPE rotates pairs)", (long long)c->d);
    if (c->F == 0) {
        /* the multiple of 64 nearest 8D/3 (SwiGLU keeps the FFN's parameter count of a 4D GELU FFN) */
        int64_t f = (int64_t)llround(8.0 * (double)c->D / 3.0 / 64.0) * 64;
        c->F = f < 64 ? 64 : f;
    }
    if (c->F < 1 || c->F > 1 << 20) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "FFN hidden F=%lld must be in [1, 2^20]", (long long)c->F);
    if (!(c->rope_base > 1.0) || !isfinite(c->rope_base))
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "RoPE base %g must be a finite number > 1", c->rope_base);
    if (c->post_norm != 0 && c->post_norm != 1) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "norm placement must be pre or post");
    if (c->qk_norm != 0 && c->qk_norm != 1) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "QK-norm must be on or off");
    if (c->tied != 0 && c->tied != 1) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "tied embeddings must be on or off");
    if ((unsigned)c->depth > 3)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "depth sources must be none, attn, attn+ffn or attn+ffn+extra-attn");
    if (c->window < -1)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "depth window S=%lld must be >= 0 (or -1 for all slots)", (long long)c->window);
    if (c->window >= 0 && c->depth == MODA_DEPTH_SRC_NONE)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "a depth window S=%lld needs depth sources other than none", (long long)c->window);
    return MODA_OK;
}

void moda_model_config_str(const moda_model_config *c, char *buf, size_t n) {
    char w[32];
    if (c->window < 0) snprintf(w, sizeof w, "all");
    else snprintf(w, sizeof w, "%lld", (long long)c->window);
    snprintf(buf, n, "V=%lld D=%lld N=%lld Hq=%lld Hk=%lld d=%lld F=%lld rope=%g %s-norm qk-norm=%s %s depth=%s S=%s",
             (long long)c->V, (long long)c->D, (long long)c->N, (long long)c->Hq, (long long)c->Hk, (long long)c->d,
             (long long)c->F, c->rope_base, c->post_norm ? "post" : "pre", c->qk_norm ? "on" : "off",
             c->tied ? "tied" : "untied", moda_depth_source_name(c->depth), w);
}

int moda_model_config_equal(const moda_model_config *a, const moda_model_config *b) {
    return a->V == b->V && a->D == b->D && a->N == b->N && a->Hq == b->Hq && a->Hk == b->Hk && a->d == b->d &&
           a->F == b->F && a->rope_base == b->rope_base && a->post_norm == b->post_norm &&
           a->qk_norm == b->qk_norm && a->tied == b->tied && a->depth == b->depth && a->window == b->window;
}

static const char *const kind_names[MP_KIND_COUNT] = {
    "wte", "attn_norm", "wq", "wk", "wv", "q_norm", "k_norm", "wo", "ffn_norm", "w1", "w3", "w2",
    "wkd", "wvd", "wkf", "wvf", "final_norm", "lm_head"};

const char *moda_param_kind_name(moda_param_kind k) {
    return (unsigned)k < MP_KIND_COUNT ? kind_names[k] : "unknown";
}

int moda_model_param_table(const moda_model_config *c, moda_param_info *t, int max, int64_t *total) {
    int n = 0;
    int64_t off = 0;
    const int64_t D = c->D, qd = c->Hq * c->d, kd = c->Hk * c->d;
#define ADD(k, blk, r, cl, mat)                                                                   \
    do {                                                                                          \
        if (n < max) t[n] = (moda_param_info){(k), (blk), off, (r), (cl), (mat)};                 \
        n++;                                                                                      \
        off += (int64_t)(r) * (cl);                                                               \
    } while (0)
    ADD(MP_WTE, -1, c->V, D, 1);
    for (int64_t i = 0; i < c->N; i++) {
        ADD(MP_ATTN_NORM, i, 1, D, 0);
        ADD(MP_WQ, i, D, qd, 1);
        ADD(MP_WK, i, D, kd, 1);
        ADD(MP_WV, i, D, kd, 1);
        if (c->qk_norm) {
            ADD(MP_QNORM, i, 1, qd, 0);
            ADD(MP_KNORM, i, 1, kd, 0);
        }
        ADD(MP_WO, i, qd, D, 1);
        ADD(MP_FFN_NORM, i, 1, D, 0);
        ADD(MP_W1, i, D, c->F, 1);
        ADD(MP_W3, i, D, c->F, 1);
        ADD(MP_W2, i, c->F, D, 1);
        if (c->depth == MODA_DEPTH_SRC_EXTRA) {
            ADD(MP_WKD, i, D, kd, 1);
            ADD(MP_WVD, i, D, kd, 1);
        }
        if (c->depth >= MODA_DEPTH_SRC_ATTN_FFN) {
            ADD(MP_WKF, i, D, kd, 1);
            ADD(MP_WVF, i, D, kd, 1);
        }
    }
    if (!c->post_norm) ADD(MP_FINAL_NORM, -1, 1, D, 0);
    if (!c->tied) ADD(MP_HEAD, -1, c->V, D, 1);
#undef ADD
    if (total) *total = off;
    return n;
}

double moda_model_flops_per_token(const moda_model_config *c, int64_t T) {
    int64_t total = 0;
    moda_model_param_table(c, NULL, 0, &total);
    /* every weight is one multiply-add per token forward and two backward (6 FLOPs); the embedding lookup is
     * free unless the head reuses the matrix (tied) */
    double f = 6.0 * (double)(total - (c->tied ? 0 : c->V * c->D));
    /* attention: q.k and p.v against (T+1)/2 causal keys on average plus the visible depth slots, 2 FLOPs per
     * multiply-add, forward; the backward is 2.5x the forward */
    const double spb = (double)moda_model_slots_per_block(c);
    for (int64_t i = 0; i < c->N; i++) {
        double slots = spb * (double)i;
        if (c->window >= 0 && slots > (double)c->window) slots = (double)c->window;
        f += 3.5 * 2.0 * 2.0 * (double)(c->Hq * c->d) * (0.5 * (double)(T + 1) + slots);
    }
    return f;
}

int64_t moda_model_depth_bytes(const moda_model_config *c, int64_t B, int64_t T, size_t elem) {
    /* Kd and Vd, and the matching gradient buffers of the backward pass */
    return 4 * B * T * moda_model_slots(c) * c->Hk * c->d * (int64_t)elem;
}

moda_block_depth moda_model_block_depth(const moda_model_config *c, int64_t i) {
    const int64_t spb = moda_model_slots_per_block(c);
    moda_block_depth b;
    b.slot_attn = spb > 0 ? i * spb : -1;
    b.slot_ffn = spb > 1 ? i * spb + 1 : -1;
    b.d1 = i * spb;
    b.d0 = (c->window >= 0 && b.d1 > c->window) ? b.d1 - c->window : 0;
    if (c->window == 0) b.d0 = b.d1;
    return b;
}

moda_options moda_model_attn_options(int64_t d0, int64_t d1, int backward) {
    moda_options o = moda_default_options();
    o.causal = 1;
    o.sequence = 1;
    o.depth_begin = d1 > d0 ? d0 : 0;
    o.depth_end = d1 > d0 ? d1 : 0;
    o.deterministic = 1;
    if (backward) o.depth_grad_mode = MODA_DEPTH_GRAD_ACCUMULATE;
    return o;
}
