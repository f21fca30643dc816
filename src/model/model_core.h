/*
 * model_core.h - forward, loss and backward of the MoDA model for one element type REAL, included by
 * model_f32.c (the trainer: REAL = float, the operator's MODA_F32 fast path, cblas_sgemm) and model_f64.c
 * (the gradient tests: REAL = double, the operator's float64 reference, cblas_dgemm). One source, two
 * precisions, so the finite-difference check in float64 tests the very code the trainer runs.
 *
 * Expects: REAL, KN(name), GEMM_FN, REAL_DTYPE (MODA_F32 or MODA_F64), CORE(name) (the exported suffix).
 */
#include "model_impl.h"

#include "kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define P(blk, kind) ((REAL *)m->params + moda_poff(m, (blk), (kind)))
#define G(blk, kind) ((REAL *)m->grads + moda_poff(m, (blk), (kind)))

void CORE(moda_model_rope_tables)(struct moda_model *m) {
    const int64_t h2 = m->c.d / 2;
    REAL *c = m->rope_cos, *s = m->rope_sin;
    for (int64_t t = 0; t < m->T; t++)
        for (int64_t i = 0; i < h2; i++) {
            double freq = pow(m->c.rope_base, -2.0 * (double)i / (double)m->c.d);
            c[t * h2 + i] = (REAL)cos((double)t * freq);
            s[t * h2 + i] = (REAL)sin((double)t * freq);
        }
}

/* k/v [M, Hk*d] with row stride ld, presented to the operator as [B, T, Hk, d]. */
static moda_tensor KN(kv_view)(const struct moda_model *m, void *ptr, int64_t ld) {
    int64_t shape[4] = {m->B, m->T, m->c.Hk, m->c.d};
    int64_t stride[4] = {m->T * ld, ld, m->c.d, 1};
    return moda_tensor_strided(ptr, REAL_DTYPE, MODA_CPU, 4, shape, stride);
}

static moda_tensor KN(depth_view)(const struct moda_model *m, void *ptr) {
    int64_t shape[5] = {m->B, m->T, m->L, m->c.Hk, m->c.d};
    return moda_tensor_contiguous(ptr, REAL_DTYPE, MODA_CPU, 5, shape);
}

static moda_tensor KN(lse_view)(const struct moda_model *m, void *ptr) {
    int64_t shape[4] = {m->B, m->T, m->c.Hk, m->c.Hq / m->c.Hk};
    return moda_tensor_contiguous(ptr, REAL_DTYPE, MODA_CPU, 4, shape);
}

static moda_options KN(attn_options)(const moda_block_acts *a, int backward) {
    return moda_model_attn_options(a->d0, a->d1, backward);
}

/* A depth slot written straight from its projection: the GEMMs' output rows have the slot stride L*Hk*d
 * (no concatenation, no copy), then RoPE on the key in place. */
static void KN(depth_write)(struct moda_model *m, int64_t slot, const REAL *in, const REAL *Wk, const REAL *Wv) {
    const int64_t kvd = m->c.Hk * m->c.d, ld = m->L * kvd;
    REAL *ks = (REAL *)m->kd + slot * kvd, *vs = (REAL *)m->vd + slot * kvd;
    KN(gemm)(0, 0, m->M, kvd, m->c.D, 1, in, m->c.D, Wk, kvd, 0, ks, ld);
    KN(gemm)(0, 0, m->M, kvd, m->c.D, 1, in, m->c.D, Wv, kvd, 0, vs, ld);
    KN(rope)(m->M, m->T, m->c.Hk, m->c.d, ks, ld, m->rope_cos, m->rope_sin, 0);
}

/* The backward of depth_write once the slot's gradient is complete (every later block has added its share):
 * weight gradients and the input's gradient (added into din), read from the gradient buffer in place. */
static void KN(depth_write_bwd)(struct moda_model *m, int64_t slot, const REAL *in, const REAL *Wk, const REAL *Wv,
                                REAL *dWk, REAL *dWv, REAL *din) {
    const int64_t kvd = m->c.Hk * m->c.d, ld = m->L * kvd, M = m->M, D = m->c.D;
    REAL *dks = (REAL *)m->dkd + slot * kvd, *dvs = (REAL *)m->dvd + slot * kvd;
    KN(rope)(M, m->T, m->c.Hk, m->c.d, dks, ld, m->rope_cos, m->rope_sin, 1);
    KN(gemm)(1, 0, D, kvd, M, 1, in, D, dks, ld, 1, dWk, kvd);
    KN(gemm)(1, 0, D, kvd, M, 1, in, D, dvs, ld, 1, dWv, kvd);
    KN(gemm)(0, 1, M, D, kvd, 1, dks, ld, Wk, kvd, 1, din, D);
    KN(gemm)(0, 1, M, D, kvd, 1, dvs, ld, Wv, kvd, 1, din, D);
}

/* Forward through every block; leaves X_N in m->xfinal and the final-normed rows in m->xf. */
static moda_status KN(forward_blocks)(struct moda_model *m) {
    const moda_model_config *c = &m->c;
    const int64_t M = m->M, D = c->D, qd = c->Hq * c->d, kvd = c->Hk * c->d, F = c->F, G = c->Hq / c->Hk;
    const REAL *wte = P(-1, MP_WTE);
    REAL *x0 = m->blk[0].x;
    for (int64_t r = 0; r < M; r++) memcpy(x0 + r * D, wte + (int64_t)m->tok_in[r] * D, (size_t)D * sizeof(REAL));
    REAL *tmp = m->dtmp; /* sublayer outputs before the residual (free during the forward) */

    for (int64_t i = 0; i < c->N; i++) {
        moda_block_acts *a = &m->blk[i];
        REAL *x = a->x, *xout = i + 1 < c->N ? m->blk[i + 1].x : m->xfinal;
        /* ---- attention sublayer ---- */
        const REAL *xin = x;
        if (!c->post_norm) {
            KN(rmsnorm_fwd)(M, D, x, D, P(i, MP_ATTN_NORM), a->xn_a, D, a->rstd_a);
            xin = a->xn_a;
        }
        if (c->qk_norm) {
            KN(gemm)(0, 0, M, qd, D, 1, xin, D, P(i, MP_WQ), qd, 0, a->qr, qd);
            KN(gemm)(0, 0, M, kvd, D, 1, xin, D, P(i, MP_WK), kvd, 0, a->kr, kvd);
            KN(rmsnorm_fwd)(M, qd, a->qr, qd, P(i, MP_QNORM), a->q, qd, a->rstd_q);
            KN(rmsnorm_fwd)(M, kvd, a->kr, kvd, P(i, MP_KNORM), a->k, a->k_ld, a->rstd_k);
        } else {
            KN(gemm)(0, 0, M, qd, D, 1, xin, D, P(i, MP_WQ), qd, 0, a->q, qd);
            /* with source attn this GEMM writes straight into the layer's depth slot (ldc = the slot stride) */
            KN(gemm)(0, 0, M, kvd, D, 1, xin, D, P(i, MP_WK), kvd, 0, a->k, a->k_ld);
        }
        KN(gemm)(0, 0, M, kvd, D, 1, xin, D, P(i, MP_WV), kvd, 0, a->v, a->v_ld);
        KN(rope)(M, m->T, c->Hq, c->d, a->q, qd, m->rope_cos, m->rope_sin, 0);
        KN(rope)(M, m->T, c->Hk, c->d, a->k, a->k_ld, m->rope_cos, m->rope_sin, 0);
        if (c->depth == MODA_DEPTH_SRC_EXTRA) KN(depth_write)(m, a->slot_attn, xin, P(i, MP_WKD), P(i, MP_WVD));
        {
            moda_options o = KN(attn_options)(a, 0);
            moda_tensor q = moda_tensor_q_standard(a->q, REAL_DTYPE, MODA_CPU, m->B, m->T, c->Hk, G, c->d);
            moda_tensor out = moda_tensor_q_standard(a->a, REAL_DTYPE, MODA_CPU, m->B, m->T, c->Hk, G, c->d);
            moda_tensor k = KN(kv_view)(m, a->k, a->k_ld), v = KN(kv_view)(m, a->v, a->v_ld);
            moda_tensor kd = KN(depth_view)(m, m->kd), vd = KN(depth_view)(m, m->vd), lse = KN(lse_view)(m, a->lse);
            int depth = a->d1 > a->d0;
            moda_status st = moda_forward(&o, &q, &k, &v, depth ? &kd : NULL, depth ? &vd : NULL, &out, &lse, NULL);
            if (st != MODA_OK) return moda_model_fail(st, "attention forward of block %lld: %s", (long long)i, moda_last_error());
        }
        KN(gemm)(0, 0, M, D, qd, 1, a->a, qd, P(i, MP_WO), D, 0, tmp, D);
        if (!c->post_norm) {
            KN(sum_rows)(M, D, a->xmid, x, tmp);
        } else {
            KN(sum_rows)(M, D, a->sum_a, x, tmp);
            KN(rmsnorm_fwd)(M, D, a->sum_a, D, P(i, MP_ATTN_NORM), a->xmid, D, a->rstd_a);
        }
        /* ---- FFN sublayer ---- */
        const REAL *fin = a->xmid;
        if (!c->post_norm) {
            KN(rmsnorm_fwd)(M, D, a->xmid, D, P(i, MP_FFN_NORM), a->xn_f, D, a->rstd_f);
            fin = a->xn_f;
        }
        KN(gemm)(0, 0, M, F, D, 1, fin, D, P(i, MP_W1), F, 0, a->h1, F);
        KN(gemm)(0, 0, M, F, D, 1, fin, D, P(i, MP_W3), F, 0, a->h3, F);
        KN(swiglu_fwd)(M * F, a->h1, a->h3, a->g);
        KN(gemm)(0, 0, M, D, F, 1, a->g, F, P(i, MP_W2), D, 0, tmp, D);
        if (a->slot_ffn >= 0) KN(depth_write)(m, a->slot_ffn, fin, P(i, MP_WKF), P(i, MP_WVF));
        if (!c->post_norm) {
            KN(sum_rows)(M, D, xout, a->xmid, tmp);
        } else {
            KN(sum_rows)(M, D, a->sum_f, a->xmid, tmp);
            KN(rmsnorm_fwd)(M, D, a->sum_f, D, P(i, MP_FFN_NORM), xout, D, a->rstd_f);
        }
    }
    if (!c->post_norm) KN(rmsnorm_fwd)(M, D, m->xfinal, D, P(-1, MP_FINAL_NORM), m->xf, D, m->rstd_final);
    return MODA_OK;
}

static moda_status KN(backward_blocks)(struct moda_model *m) {
    const moda_model_config *c = &m->c;
    const int64_t M = m->M, D = c->D, qd = c->Hq * c->d, kvd = c->Hk * c->d, F = c->F, G = c->Hq / c->Hk;
    const int64_t Ld = m->L * kvd;
    REAL *dx = m->dx, *dxin = m->dxin, *dtmp = m->dtmp;
    /* gradient w.r.t. X_N is in dx; depth gradients accumulate from zero */
    if (m->L > 0) {
        memset(m->dkd, 0, (size_t)(M * Ld) * sizeof(REAL));
        memset(m->dvd, 0, (size_t)(M * Ld) * sizeof(REAL));
    }
    for (int64_t i = c->N - 1; i >= 0; i--) {
        moda_block_acts *a = &m->blk[i];
        /* ---- FFN sublayer: dx holds dL/d(block output) ---- */
        REAL *dy = dx; /* gradient of the FFN branch output */
        if (c->post_norm) {
            /* xout = norm(sum_f): dtmp = d sum_f; both the residual and the branch receive it */
            KN(rmsnorm_bwd)(M, D, a->sum_f, D, P(i, MP_FFN_NORM), a->rstd_f, dx, D, dtmp, D, 0, G(i, MP_FFN_NORM));
            memcpy(dx, dtmp, (size_t)(M * D) * sizeof(REAL));
            dy = dtmp;
        }
        const REAL *fin = c->post_norm ? a->xmid : a->xn_f;
        KN(gemm)(0, 1, M, F, D, 1, dy, D, P(i, MP_W2), D, 0, m->dg, F);
        KN(gemm)(1, 0, F, D, M, 1, a->g, F, dy, D, 1, G(i, MP_W2), D);
        KN(swiglu_bwd)(M * F, a->h1, a->h3, m->dg, m->dh1, m->dh3);
        KN(gemm)(1, 0, D, F, M, 1, fin, D, m->dh1, F, 1, G(i, MP_W1), F);
        KN(gemm)(1, 0, D, F, M, 1, fin, D, m->dh3, F, 1, G(i, MP_W3), F);
        KN(gemm)(0, 1, M, D, F, 1, m->dh1, F, P(i, MP_W1), F, 0, dxin, D);
        KN(gemm)(0, 1, M, D, F, 1, m->dh3, F, P(i, MP_W3), F, 1, dxin, D);
        if (a->slot_ffn >= 0)
            KN(depth_write_bwd)(m, a->slot_ffn, fin, P(i, MP_WKF), P(i, MP_WVF), G(i, MP_WKF), G(i, MP_WVF), dxin);
        if (!c->post_norm)
            KN(rmsnorm_bwd)(M, D, a->xmid, D, P(i, MP_FFN_NORM), a->rstd_f, dxin, D, dx, D, 1, G(i, MP_FFN_NORM));
        else
            KN(add_rows)(M, D, dx, D, dxin, D);
        /* ---- attention sublayer: dx holds dL/d(xmid) ---- */
        REAL *dout = dx;
        if (c->post_norm) {
            KN(rmsnorm_bwd)(M, D, a->sum_a, D, P(i, MP_ATTN_NORM), a->rstd_a, dx, D, dtmp, D, 0, G(i, MP_ATTN_NORM));
            memcpy(dx, dtmp, (size_t)(M * D) * sizeof(REAL));
            dout = dtmp;
        }
        const REAL *xin = c->post_norm ? a->x : a->xn_a;
        KN(gemm)(0, 1, M, qd, D, 1, dout, D, P(i, MP_WO), D, 0, m->da, qd);
        KN(gemm)(1, 0, qd, D, M, 1, a->a, qd, dout, D, 1, G(i, MP_WO), D);
        {
            moda_options o = KN(attn_options)(a, 1);
            moda_tensor q = moda_tensor_q_standard(a->q, REAL_DTYPE, MODA_CPU, m->B, m->T, c->Hk, G, c->d);
            moda_tensor out = moda_tensor_q_standard(a->a, REAL_DTYPE, MODA_CPU, m->B, m->T, c->Hk, G, c->d);
            moda_tensor dO = moda_tensor_q_standard(m->da, REAL_DTYPE, MODA_CPU, m->B, m->T, c->Hk, G, c->d);
            moda_tensor dq = moda_tensor_q_standard(m->dq, REAL_DTYPE, MODA_CPU, m->B, m->T, c->Hk, G, c->d);
            moda_tensor k = KN(kv_view)(m, a->k, a->k_ld), v = KN(kv_view)(m, a->v, a->v_ld);
            moda_tensor dk = KN(kv_view)(m, m->dk, kvd), dv = KN(kv_view)(m, m->dv, kvd);
            moda_tensor kd = KN(depth_view)(m, m->kd), vd = KN(depth_view)(m, m->vd);
            moda_tensor dkd = KN(depth_view)(m, m->dkd), dvd = KN(depth_view)(m, m->dvd);
            moda_tensor lse = KN(lse_view)(m, a->lse);
            int depth = a->d1 > a->d0;
            moda_status st = moda_backward(&o, &q, &k, &v, depth ? &kd : NULL, depth ? &vd : NULL, &out, &lse, &dO,
                                           &dq, &dk, &dv, depth ? &dkd : NULL, depth ? &dvd : NULL, m->ws,
                                           m->ws_bytes, NULL);
            if (st != MODA_OK) return moda_model_fail(st, "attention backward of block %lld: %s", (long long)i, moda_last_error());
        }
        if (c->depth == MODA_DEPTH_SRC_ATTN || c->depth == MODA_DEPTH_SRC_ATTN_FFN) {
            /* the layer's own (k, v) are its depth slot: the later blocks' gradient joins dk, dv */
            KN(add_rows)(M, kvd, m->dk, kvd, (REAL *)m->dkd + a->slot_attn * kvd, Ld);
            KN(add_rows)(M, kvd, m->dv, kvd, (REAL *)m->dvd + a->slot_attn * kvd, Ld);
        }
        KN(rope)(M, m->T, c->Hq, c->d, m->dq, qd, m->rope_cos, m->rope_sin, 1);
        KN(rope)(M, m->T, c->Hk, c->d, m->dk, kvd, m->rope_cos, m->rope_sin, 1);
        REAL *dqr = m->dq, *dkr = m->dk;
        if (c->qk_norm) {
            /* dh1/dh3 are free here; model.c sizes them for [M, max(F, Hq*d)] and [M, max(F, Hk*d)] */
            KN(rmsnorm_bwd)(M, qd, a->qr, qd, P(i, MP_QNORM), a->rstd_q, m->dq, qd, m->dh1, qd, 0, G(i, MP_QNORM));
            KN(rmsnorm_bwd)(M, kvd, a->kr, kvd, P(i, MP_KNORM), a->rstd_k, m->dk, kvd, m->dh3, kvd, 0, G(i, MP_KNORM));
            dqr = m->dh1;
            dkr = m->dh3;
        }
        KN(gemm)(1, 0, D, qd, M, 1, xin, D, dqr, qd, 1, G(i, MP_WQ), qd);
        KN(gemm)(1, 0, D, kvd, M, 1, xin, D, dkr, kvd, 1, G(i, MP_WK), kvd);
        KN(gemm)(1, 0, D, kvd, M, 1, xin, D, m->dv, kvd, 1, G(i, MP_WV), kvd);
        KN(gemm)(0, 1, M, D, qd, 1, dqr, qd, P(i, MP_WQ), qd, 0, dxin, D);
        KN(gemm)(0, 1, M, D, kvd, 1, dkr, kvd, P(i, MP_WK), kvd, 1, dxin, D);
        KN(gemm)(0, 1, M, D, kvd, 1, m->dv, kvd, P(i, MP_WV), kvd, 1, dxin, D);
        if (c->depth == MODA_DEPTH_SRC_EXTRA)
            KN(depth_write_bwd)(m, a->slot_attn, xin, P(i, MP_WKD), P(i, MP_WVD), G(i, MP_WKD), G(i, MP_WVD), dxin);
        if (!c->post_norm)
            KN(rmsnorm_bwd)(M, D, a->x, D, P(i, MP_ATTN_NORM), a->rstd_a, dxin, D, dx, D, 1, G(i, MP_ATTN_NORM));
        else
            KN(add_rows)(M, D, dx, D, dxin, D);
    }
    /* embedding: rows in order, so repeated tokens sum deterministically */
    REAL *dwte = G(-1, MP_WTE);
    for (int64_t r = 0; r < M; r++) {
        REAL *g = dwte + (int64_t)m->tok_in[r] * D;
        const REAL *s = dx + r * D;
        for (int64_t j = 0; j < D; j++) g[j] += s[j];
    }
    return MODA_OK;
}

moda_status CORE(moda_model_step)(struct moda_model *m, int grads, double *loss) {
    const moda_model_config *c = &m->c;
    const int64_t M = m->M, D = c->D, V = c->V;
    if (grads) memset(m->grads, 0, (size_t)m->nparams * sizeof(REAL));
    moda_status st = KN(forward_blocks)(m);
    if (st != MODA_OK) return st;
    const REAL *xf = c->post_norm ? m->xfinal : m->xf;
    const REAL *H = c->tied ? P(-1, MP_WTE) : P(-1, MP_HEAD);
    REAL *dH = grads ? (c->tied ? G(-1, MP_WTE) : G(-1, MP_HEAD)) : NULL;
    REAL *dxf = m->dxin; /* d loss / d xf */
    double total = 0;
    double *rowloss = malloc((size_t)m->head_rows * sizeof(double));
    if (!rowloss) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "cannot allocate %lld row losses", (long long)m->head_rows);
    /* The head runs in chunks of rows so that the logits never exceed [head_rows, V]; the gradient of each
     * chunk is taken at once (the head is the last layer), so no logits are kept. */
    for (int64_t r0 = 0; r0 < M; r0 += m->head_rows) {
        int64_t rows = M - r0 < m->head_rows ? M - r0 : m->head_rows;
        REAL *z = m->logits;
        KN(gemm)(0, 1, rows, V, D, 1, xf + r0 * D, D, H, D, 0, z, V);
        KN(cross_entropy)(rows, V, z, m->tok_tgt + r0, rowloss, grads, 1.0 / (double)M);
        for (int64_t r = 0; r < rows; r++) total += rowloss[r];
        if (grads) {
            KN(gemm)(0, 0, rows, D, V, 1, z, V, H, D, 0, dxf + r0 * D, D);
            KN(gemm)(1, 0, V, D, rows, 1, z, V, xf + r0 * D, D, 1, dH, D);
        }
    }
    free(rowloss);
    *loss = total / (double)M;
    if (!grads) return MODA_OK;
    if (!c->post_norm)
        KN(rmsnorm_bwd)(M, D, m->xfinal, D, P(-1, MP_FINAL_NORM), m->rstd_final, dxf, D, m->dx, D, 0,
                        G(-1, MP_FINAL_NORM));
    else
        memcpy(m->dx, dxf, (size_t)(M * D) * sizeof(REAL));
    return KN(backward_blocks)(m);
}

moda_status CORE(moda_model_logits)(struct moda_model *m, int64_t row, double *logits) {
    const moda_model_config *c = &m->c;
    const int64_t D = c->D, V = c->V;
    moda_status st = KN(forward_blocks)(m);
    if (st != MODA_OK) return st;
    const REAL *xf = (c->post_norm ? (REAL *)m->xfinal : (REAL *)m->xf) + row * D;
    const REAL *H = c->tied ? P(-1, MP_WTE) : P(-1, MP_HEAD);
    REAL *z = m->logits;
    KN(gemm)(0, 1, 1, V, D, 1, xf, D, H, D, 0, z, V);
    for (int64_t j = 0; j < V; j++) logits[j] = (double)z[j];
    return MODA_OK;
}

#undef P
#undef G
