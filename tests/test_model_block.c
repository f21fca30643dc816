/*
 * test_model_block - the float32 model's blocks against an explicit float64 computation written here
 * independently of the model code (loops, no BLAS, no operator): norms, projections, QK-norm, RoPE, the
 * MoDA attention over the sequence and the depth slots, the depth writes, SwiGLU, residuals. And: a MoDA
 * model whose depth reads are off (window 0) trains exactly like the baseline, bit for bit.
 */
#include "model.h"
#include "testutil.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static moda_model_config small(int depth, int post, int qk) {
    moda_model_config c = moda_model_config_default();
    c.V = 37;
    c.D = 24;
    c.N = 3;
    c.Hq = 4;
    c.Hk = 2;
    c.d = 6;
    c.F = 40;
    c.depth = (moda_depth_source)depth;
    c.post_norm = post;
    c.qk_norm = qk;
    return c;
}

static const float *param(moda_model *m, int64_t block, moda_param_kind k) {
    for (int i = 0; i < moda_model_num_tensors(m); i++) {
        const moda_param_info *t = moda_model_tensor(m, i);
        if (t->block == block && t->kind == k) return (const float *)moda_model_params(m) + t->offset;
    }
    return NULL;
}

/* y[M, out] = x[M, in] W[in, out] in double */
static void matmul(int64_t M, int64_t in, int64_t out, const double *x, const float *W, double *y) {
    for (int64_t r = 0; r < M; r++)
        for (int64_t j = 0; j < out; j++) {
            double s = 0;
            for (int64_t k = 0; k < in; k++) s += x[r * in + k] * (double)W[k * out + j];
            y[r * out + j] = s;
        }
}

static void rmsnorm(int64_t M, int64_t D, const double *x, const float *w, double *y) {
    for (int64_t r = 0; r < M; r++) {
        double ss = 0;
        for (int64_t j = 0; j < D; j++) ss += x[r * D + j] * x[r * D + j];
        double rs = 1.0 / sqrt(ss / (double)D + 1e-6);
        for (int64_t j = 0; j < D; j++) y[r * D + j] = x[r * D + j] * rs * (double)w[j];
    }
}

static void rope(int64_t M, int64_t T, int64_t H, int64_t d, double *x, double base) {
    for (int64_t r = 0; r < M; r++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < d / 2; i++) {
                double f = pow(base, -2.0 * (double)i / (double)d), ang = (double)(r % T) * f;
                double *p = x + r * H * d + h * d, a = p[i], b = p[i + d / 2];
                p[i] = a * cos(ang) - b * sin(ang);
                p[i + d / 2] = a * sin(ang) + b * cos(ang);
            }
}

static double maxdiff_f(const float *a, int64_t lda, const double *b, int64_t ldb, int64_t M, int64_t n, double *scale) {
    double e = 0, s = 0;
    for (int64_t r = 0; r < M; r++)
        for (int64_t j = 0; j < n; j++) {
            double d = fabs((double)a[r * lda + j] - b[r * ldb + j]);
            if (!(d <= e)) e = d; /* NaN propagates */
            if (fabs(b[r * ldb + j]) > s) s = fabs(b[r * ldb + j]);
        }
    *scale = s;
    return e;
}

/* Recomputes every block from its input X_i in float64 and compares its outputs with the model's. */
static void check_blocks(const moda_model_config *c, tu_rng *r) {
    const int64_t B = 2, T = 9, M = B * T;
    char name[256];
    moda_model_config_str(c, name, sizeof name);
    moda_model *m = NULL;
    TU_CHECK_STATUS(moda_model_create(&m, c, MODA_F32, B, T), MODA_OK);
    if (!m) return;
    /* parameters far from their initial values so that norms' weights and every path matter */
    float *p = moda_model_params(m);
    for (int i = 0; i < moda_model_num_tensors(m); i++) {
        const moda_param_info *t = moda_model_tensor(m, i);
        for (int64_t j = 0; j < t->rows * t->cols; j++)
            p[t->offset + j] = (float)(t->matrix ? 0.3 * tu_normal(r) : 1.0 + 0.3 * tu_normal(r));
    }
    int32_t in[18], tg[18];
    for (int64_t i = 0; i < M; i++) {
        in[i] = (int32_t)(tu_next(r) % (uint64_t)c->V);
        tg[i] = (int32_t)(tu_next(r) % (uint64_t)c->V);
    }
    double loss;
    TU_CHECK_STATUS(moda_model_step(m, in, tg, 0, &loss), MODA_OK);
    const moda_model_config *rc = moda_model_get_config(m);
    const int64_t D = rc->D, Hq = rc->Hq, Hk = rc->Hk, d = rc->d, F = rc->F, G = Hq / Hk, qd = Hq * d, kvd = Hk * d;
    const int64_t L = moda_model_slots(rc);
    double *x = malloc(sizeof(double) * M * D), *xin = malloc(sizeof(double) * M * D), *q = malloc(sizeof(double) * M * qd),
           *k = malloc(sizeof(double) * M * kvd), *v = malloc(sizeof(double) * M * kvd), *a = malloc(sizeof(double) * M * qd),
           *o = malloc(sizeof(double) * M * D), *xmid = malloc(sizeof(double) * M * D), *fin = malloc(sizeof(double) * M * D),
           *h1 = malloc(sizeof(double) * M * F), *h3 = malloc(sizeof(double) * M * F), *kx = malloc(sizeof(double) * M * kvd),
           *vx = malloc(sizeof(double) * M * kvd), *y = malloc(sizeof(double) * M * D);
    for (int64_t i = 0; i < rc->N; i++) {
        moda_block_view bv;
        TU_CHECK_STATUS(moda_model_block_view(m, i, &bv), MODA_OK);
        const float *kd = bv.kd, *vd = bv.vd;
        for (int64_t e = 0; e < M * D; e++) x[e] = ((const float *)bv.x)[e];
        if (!rc->post_norm) rmsnorm(M, D, x, param(m, i, MP_ATTN_NORM), xin);
        else memcpy(xin, x, sizeof(double) * M * D);
        matmul(M, D, qd, xin, param(m, i, MP_WQ), q);
        matmul(M, D, kvd, xin, param(m, i, MP_WK), k);
        matmul(M, D, kvd, xin, param(m, i, MP_WV), v);
        if (rc->qk_norm) {
            rmsnorm(M, qd, q, param(m, i, MP_QNORM), q);
            rmsnorm(M, kvd, k, param(m, i, MP_KNORM), k);
        }
        rope(M, T, Hq, d, q, rc->rope_base);
        rope(M, T, Hk, d, k, rc->rope_base);
        /* the operator, from the model's own q, k, v and depth buffer, in float64 (spec.md §2) */
        double s = 1.0 / sqrt((double)d);
        for (int64_t b = 0; b < B; b++)
            for (int64_t t = 0; t < T; t++)
                for (int64_t h = 0; h < Hk; h++)
                    for (int64_t g = 0; g < G; g++) {
                        const float *qq = (const float *)bv.q + (b * T + t) * qd + (h * G + g) * d;
                        double z[64], mx = -INFINITY;
                        int nz = 0;
                        for (int64_t j = 0; j <= t; j++) {
                            const float *kk = (const float *)bv.k + (b * T + j) * bv.k_ld + h * d;
                            double dot = 0;
                            for (int64_t e = 0; e < d; e++) dot += (double)qq[e] * kk[e];
                            z[nz++] = s * dot;
                        }
                        for (int64_t l = bv.d0; l < bv.d1; l++) {
                            const float *kk = kd + ((b * T + t) * L + l) * kvd + h * d;
                            double dot = 0;
                            for (int64_t e = 0; e < d; e++) dot += (double)qq[e] * kk[e];
                            z[nz++] = s * dot;
                        }
                        for (int e = 0; e < nz; e++) mx = z[e] > mx ? z[e] : mx;
                        double sum = 0;
                        for (int e = 0; e < nz; e++) sum += exp(z[e] - mx);
                        double *out = a + (b * T + t) * qd + (h * G + g) * d;
                        for (int64_t e = 0; e < d; e++) out[e] = 0;
                        int zi = 0;
                        for (int64_t j = 0; j <= t; j++, zi++) {
                            const float *vv = (const float *)bv.v + (b * T + j) * bv.v_ld + h * d;
                            for (int64_t e = 0; e < d; e++) out[e] += exp(z[zi] - mx) / sum * vv[e];
                        }
                        for (int64_t l = bv.d0; l < bv.d1; l++, zi++) {
                            const float *vv = vd + ((b * T + t) * L + l) * kvd + h * d;
                            for (int64_t e = 0; e < d; e++) out[e] += exp(z[zi] - mx) / sum * vv[e];
                        }
                    }
        double sc, e;
        e = maxdiff_f(bv.q, qd, q, qd, M, qd, &sc);
        TU_CHECK(e <= 2e-5 * sc + 1e-6, "%s block %lld: q differs by %.3e (scale %.3e)", name, (long long)i, e, sc);
        e = maxdiff_f(bv.k, bv.k_ld, k, kvd, M, kvd, &sc);
        TU_CHECK(e <= 2e-5 * sc + 1e-6, "%s block %lld: k differs by %.3e (scale %.3e)", name, (long long)i, e, sc);
        e = maxdiff_f(bv.a, qd, a, qd, M, qd, &sc);
        TU_CHECK(e <= 2e-5 * sc + 1e-6, "%s block %lld: the operator's output differs from float64 by %.3e (scale %.3e)",
                 name, (long long)i, e, sc);
        if (i == 0) printf("  %s: operator in block %lld reads slots [%lld, %lld), max err %.2e\n", name, (long long)i,
                           (long long)bv.d0, (long long)bv.d1, e);
        if (i == rc->N - 1) printf("  %s: operator in block %lld reads slots [%lld, %lld), max err %.2e\n", name,
                                   (long long)i, (long long)bv.d0, (long long)bv.d1, e);
        /* the attention slot this block wrote */
        if (bv.slot_attn >= 0) {
            if (rc->depth == MODA_DEPTH_SRC_EXTRA) {
                matmul(M, D, kvd, xin, param(m, i, MP_WKD), kx);
                matmul(M, D, kvd, xin, param(m, i, MP_WVD), vx);
                rope(M, T, Hk, d, kx, rc->rope_base);
            } else {
                memcpy(kx, k, sizeof(double) * M * kvd);
                memcpy(vx, v, sizeof(double) * M * kvd);
            }
            e = maxdiff_f(kd + bv.slot_attn * kvd, L * kvd, kx, kvd, M, kvd, &sc);
            TU_CHECK(e <= 2e-5 * sc + 1e-6, "%s block %lld: depth key slot %lld differs by %.3e", name, (long long)i,
                     (long long)bv.slot_attn, e);
            e = maxdiff_f(vd + bv.slot_attn * kvd, L * kvd, vx, kvd, M, kvd, &sc);
            TU_CHECK(e <= 2e-5 * sc + 1e-6, "%s block %lld: depth value slot %lld differs by %.3e", name, (long long)i,
                     (long long)bv.slot_attn, e);
        }
        /* the rest of the block from the model's attention output */
        for (int64_t j = 0; j < M * qd; j++) a[j] = ((const float *)bv.a)[j];
        matmul(M, qd, D, a, param(m, i, MP_WO), o);
        for (int64_t j = 0; j < M * D; j++) xmid[j] = x[j] + o[j];
        if (rc->post_norm) rmsnorm(M, D, xmid, param(m, i, MP_ATTN_NORM), xmid);
        if (!rc->post_norm) rmsnorm(M, D, xmid, param(m, i, MP_FFN_NORM), fin);
        else memcpy(fin, xmid, sizeof(double) * M * D);
        matmul(M, D, F, fin, param(m, i, MP_W1), h1);
        matmul(M, D, F, fin, param(m, i, MP_W3), h3);
        for (int64_t j = 0; j < M * F; j++) h1[j] = h1[j] / (1 + exp(-h1[j])) * h3[j];
        const float *W2 = param(m, i, MP_W2);
        for (int64_t rr = 0; rr < M; rr++)
            for (int64_t j = 0; j < D; j++) {
                double acc = 0;
                for (int64_t f = 0; f < F; f++) acc += h1[rr * F + f] * (double)W2[f * D + j];
                y[rr * D + j] = xmid[rr * D + j] + acc;
            }
        if (rc->post_norm) rmsnorm(M, D, y, param(m, i, MP_FFN_NORM), y);
        e = maxdiff_f(bv.xout, D, y, D, M, D, &sc);
        TU_CHECK(e <= 5e-5 * sc + 1e-5, "%s block %lld: block output differs by %.3e (scale %.3e)", name, (long long)i, e, sc);
        if (bv.slot_ffn >= 0) {
            matmul(M, D, kvd, fin, param(m, i, MP_WKF), kx);
            matmul(M, D, kvd, fin, param(m, i, MP_WVF), vx);
            rope(M, T, Hk, d, kx, rc->rope_base);
            e = maxdiff_f(kd + bv.slot_ffn * kvd, L * kvd, kx, kvd, M, kvd, &sc);
            TU_CHECK(e <= 5e-5 * sc + 1e-6, "%s block %lld: FFN depth key slot differs by %.3e", name, (long long)i, e);
            e = maxdiff_f(vd + bv.slot_ffn * kvd, L * kvd, vx, kvd, M, kvd, &sc);
            TU_CHECK(e <= 5e-5 * sc + 1e-6, "%s block %lld: FFN depth value slot differs by %.3e", name, (long long)i, e);
        }
    }
    free(x), free(xin), free(q), free(k), free(v), free(a), free(o), free(xmid), free(fin), free(h1), free(h3);
    free(kx), free(vx), free(y);
    moda_model_free(m);
}

/* A MoDA model with depth reads off (window 0) against the baseline: same init (per-tensor streams), same
 * batches, three AdamW steps: identical losses and identical shared weights, bit for bit. */
static void check_depth_off(int depth, int post, tu_rng *r) {
    const int64_t B = 2, T = 16, M = B * T;
    moda_model_config cb = small(MODA_DEPTH_SRC_NONE, post, 1), cm = small(depth, post, 1);
    cm.window = 0;
    moda_model *mb = NULL, *mm = NULL;
    TU_CHECK_STATUS(moda_model_create(&mb, &cb, MODA_F32, B, T), MODA_OK);
    TU_CHECK_STATUS(moda_model_create(&mm, &cm, MODA_F32, B, T), MODA_OK);
    if (!mb || !mm) return;
    moda_model_init(mb, 7);
    moda_model_init(mm, 7);
    moda_adamw ob, om;
    moda_adamw_init(&ob, moda_model_num_params(mb), 1e-2, 1, 3);
    moda_adamw_init(&om, moda_model_num_params(mm), 1e-2, 1, 3);
    int32_t in[32], tg[32];
    int same = 1;
    for (int step = 0; step < 3; step++) {
        for (int64_t i = 0; i < M; i++) {
            in[i] = (int32_t)(tu_next(r) % (uint64_t)cb.V);
            tg[i] = (int32_t)(tu_next(r) % (uint64_t)cb.V);
        }
        double lb, lm;
        moda_model_step(mb, in, tg, 1, &lb);
        moda_model_step(mm, in, tg, 1, &lm);
        same &= lb == lm;
        TU_CHECK(lb == lm, "depth-off %s %s-norm step %d: loss %.9g vs baseline %.9g", moda_depth_source_name(cm.depth),
                 post ? "post" : "pre", step, lm, lb);
        if (depth == MODA_DEPTH_SRC_ATTN) {
            /* no extra parameters: the gradient norm (and hence the clipping) must agree too */
            double gb = moda_adamw_update(&ob, mb), gm = moda_adamw_update(&om, mm);
            TU_CHECK(gb == gm, "depth-off attn: gradient norm %.9g vs %.9g", gm, gb);
        } else {
            /* the FFN depth projections get zero gradient; the global norm agrees as well */
            double gb = moda_adamw_update(&ob, mb), gm = moda_adamw_update(&om, mm);
            TU_CHECK(gb == gm, "depth-off %s: gradient norm %.9g vs %.9g", moda_depth_source_name(cm.depth), gm, gb);
        }
    }
    /* every tensor of the baseline equals its twin in the MoDA model */
    int64_t mism = 0;
    for (int i = 0; i < moda_model_num_tensors(mb); i++) {
        const moda_param_info *tb = moda_model_tensor(mb, i);
        for (int j = 0; j < moda_model_num_tensors(mm); j++) {
            const moda_param_info *tm = moda_model_tensor(mm, j);
            if (tm->kind != tb->kind || tm->block != tb->block) continue;
            if (memcmp((float *)moda_model_params(mb) + tb->offset, (float *)moda_model_params(mm) + tm->offset,
                       sizeof(float) * (size_t)(tb->rows * tb->cols)))
                mism++;
        }
    }
    TU_CHECK(mism == 0, "depth-off %s: %lld shared tensors differ after 3 steps", moda_depth_source_name(cm.depth), (long long)mism);
    printf("  depth-off %-20s %s-norm: 3 steps, losses and shared weights %s the baseline's\n",
           moda_depth_source_name(cm.depth), post ? "post" : "pre", same && !mism ? "bitwise equal to" : "DIFFER from");
    /* and depth reads on do change the model (the test can fail) */
    moda_model_config con = cm;
    con.window = -1;
    moda_model *mon = NULL;
    TU_CHECK_STATUS(moda_model_create(&mon, &con, MODA_F32, B, T), MODA_OK);
    if (mon) {
        moda_model_init(mon, 7);
        double l0, l1;
        moda_model_init(mb, 7);
        moda_model_step(mb, in, tg, 0, &l0);
        moda_model_step(mon, in, tg, 0, &l1);
        TU_CHECK(l0 != l1, "depth reads on should change the loss (%.9g == %.9g)", l0, l1);
        moda_model_free(mon);
    }
    moda_adamw_free(&ob);
    moda_adamw_free(&om);
    moda_model_free(mb);
    moda_model_free(mm);
}

int main(void) {
    tu_rng r = tu_rng_from_env("test_model_block");
    /* the blocks are checked with ctest's OpenMP threads (the parallel kernels and the operator's threaded
     * path); the BLAS on one thread, as two spinning pools on 2 cores are several times slower */
    openblas_set_num_threads(1);
    for (int depth = 0; depth < 4; depth++)
        for (int post = 0; post < 2; post++) {
            moda_model_config c = small(depth, post, (depth + post) % 2);
            check_blocks(&c, &r);
        }
    moda_model_config c = small(MODA_DEPTH_SRC_ATTN_FFN, 0, 1);
    c.window = 3;
    check_blocks(&c, &r);
    for (int depth = 1; depth < 4; depth++)
        for (int post = 0; post < 2; post++) check_depth_off(depth, post, &r);
    return tu_finish("test_model_block");
}
