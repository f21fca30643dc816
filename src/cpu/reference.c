/*
 * reference.c - the float64 reference of the MoDA operator: spec.md §2 and §3 written out row by row, for
 * clarity, not speed. It is the oracle of every test.
 *
 * With round_dtype != MODA_F64 it rounds every matrix-product result (logits, dP), the probabilities and the
 * outputs to that dtype: the "straightforward same-precision version" whose error against the float64 run
 * sets the tolerance of a fast path (spec.md §4, FlashAttention's policy).
 */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* One key visible to a row: a sequence key j, or depth slot l of token u. */
typedef struct key_ref {
    int depth;
    int64_t tok, slot;
} key_ref;

static int64_t max_keys_per_row(const moda_problem *p) {
    int64_t seq = p->sequence ? p->T : 0;
    int64_t toks = p->chunk ? (p->chunk_size < p->T ? p->chunk_size : p->T) : 1;
    return seq + toks * moda_problem_slots(p);
}

/* The key set of row t (spec.md §2): sequence keys S(t), then depth slots D(t). */
static int64_t row_keys(const moda_problem *p, int64_t t, key_ref *keys) {
    int64_t n = 0, j0, j1, u0, u1;
    moda_seq_range(p, t, &j0, &j1);
    for (int64_t j = j0; j < j1; j++) keys[n++] = (key_ref){0, j, 0};
    if (moda_problem_has_depth(p)) {
        moda_depth_tokens(p, t, &u0, &u1);
        for (int64_t u = u0; u < u1; u++)
            for (int64_t l = p->d0; l < p->d1; l++) keys[n++] = (key_ref){1, u, l};
    }
    return n;
}

static double key_elem(const moda_problem *p, int64_t b, int64_t h, key_ref k, int64_t i) {
    if (k.depth) return moda_load(p->kd.data, p->kd.dtype, moda_off_kd(&p->kd, b, k.tok, k.slot, h, i));
    return moda_load(p->k.data, p->k.dtype, moda_off_k(&p->k, b, k.tok, h, i));
}

static double value_elem(const moda_problem *p, int64_t b, int64_t h, key_ref k, int64_t i) {
    if (k.depth) return moda_load(p->vd.data, p->vd.dtype, moda_off_kd(&p->vd, b, k.tok, k.slot, h, i));
    return moda_load(p->v.data, p->v.dtype, moda_off_k(&p->v, b, k.tok, h, i));
}

/* z = s * <q, key> for every visible key, rounded like a low-precision matrix product would be. */
static void row_logits(const moda_problem *p, int64_t b, int64_t t, int64_t h, int64_t g, const key_ref *keys,
                       int64_t n, double *z, moda_dtype rd) {
    for (int64_t k = 0; k < n; k++) {
        double dot = 0.0;
        for (int64_t i = 0; i < p->d; i++)
            dot += moda_load(p->q.data, p->q.dtype, moda_off_q(&p->q, b, t, h, g, i)) * key_elem(p, b, h, keys[k], i);
        z[k] = moda_round_to(p->scale * dot, rd);
    }
}

moda_status moda_cpu_reference_forward(const moda_problem *p, moda_dtype rd) {
    const int64_t max_keys = max_keys_per_row(p);
    const int64_t rows = p->B * p->T * p->Hk * p->G;
    moda_status status = MODA_OK;
#pragma omp parallel
    {
        key_ref *keys = malloc(sizeof(key_ref) * (size_t)(max_keys + 1));
        double *z = malloc(sizeof(double) * (size_t)(max_keys + 1));
        if (!keys || !z) {
#pragma omp atomic write
            status = MODA_ERR_OUT_OF_MEMORY;
        } else {
#pragma omp for schedule(dynamic, 16)
            for (int64_t r = 0; r < rows; r++) {
                int64_t g = r % p->G, h = (r / p->G) % p->Hk, t = (r / (p->G * p->Hk)) % p->T, b = r / (p->G * p->Hk * p->T);
                int64_t n = row_keys(p, t, keys);
                row_logits(p, b, t, h, g, keys, n, z, rd);
                double m = -INFINITY;
                for (int64_t k = 0; k < n; k++) m = z[k] > m ? z[k] : m;
                double sum = 0.0;
                for (int64_t k = 0; k < n; k++) sum += exp(z[k] - m);
                /* an empty key set (depth-only with d0 == d1) gives O = 0 and LSE = -inf (spec.md §2) */
                double lse = n > 0 ? m + log(sum) : -INFINITY;
                for (int64_t k = 0; k < n; k++) z[k] = moda_round_to(exp(z[k] - m) / sum, rd); /* z now holds P */
                for (int64_t i = 0; i < p->dv; i++) {
                    double acc = 0.0;
                    for (int64_t k = 0; k < n; k++) acc += z[k] * value_elem(p, b, h, keys[k], i);
                    moda_store(p->o.data, p->o.dtype, moda_off_q(&p->o, b, t, h, g, i), moda_round_to(acc, rd));
                }
                if (p->lse.data) moda_store(p->lse.data, p->lse.dtype, moda_off_lse(&p->lse, b, t, h, g), lse);
            }
        }
        free(keys);
        free(z);
    }
    if (status != MODA_OK) return moda_fail(status, "reference forward: out of host memory for a row of %lld keys", (long long)max_keys);
    return MODA_OK;
}

moda_status moda_cpu_reference_backward(const moda_problem *p, moda_dtype rd) {
    const int64_t max_keys = max_keys_per_row(p);
    const int64_t L = moda_problem_slots(p);
    const int64_t nk = p->B * p->T * p->Hk; /* tokens x kv heads */
    key_ref *keys = malloc(sizeof(key_ref) * (size_t)(max_keys + 1));
    double *z = malloc(sizeof(double) * (size_t)(max_keys + 1));
    double *dz = malloc(sizeof(double) * (size_t)(max_keys + 1));
    double *P = malloc(sizeof(double) * (size_t)(max_keys + 1));
    /* float64 accumulators of the key/value gradients, indexed [b, t, (slot - d0), h, i] */
    double *dK = calloc((size_t)(nk * p->d) + 1, sizeof(double));
    double *dV = calloc((size_t)(nk * p->dv) + 1, sizeof(double));
    double *dKd = calloc((size_t)(nk * L * p->d) + 1, sizeof(double));
    double *dVd = calloc((size_t)(nk * L * p->dv) + 1, sizeof(double));
    moda_status status = MODA_OK;
    if (!keys || !z || !dz || !P || !dK || !dV || !dKd || !dVd) {
        status = moda_fail(MODA_ERR_OUT_OF_MEMORY, "reference backward: out of host memory");
        goto done;
    }
    for (int64_t b = 0; b < p->B; b++)
        for (int64_t t = 0; t < p->T; t++)
            for (int64_t h = 0; h < p->Hk; h++)
                for (int64_t g = 0; g < p->G; g++) {
                    int64_t n = row_keys(p, t, keys);
                    row_logits(p, b, t, h, g, keys, n, z, rd);
                    double lse = moda_load(p->lse.data, p->lse.dtype, moda_off_lse(&p->lse, b, t, h, g));
                    double delta = 0.0; /* Δ = <dO, O> */
                    for (int64_t i = 0; i < p->dv; i++)
                        delta += moda_load(p->grad_o.data, p->grad_o.dtype, moda_off_q(&p->grad_o, b, t, h, g, i)) *
                                 moda_load(p->o.data, p->o.dtype, moda_off_q(&p->o, b, t, h, g, i));
                    for (int64_t k = 0; k < n; k++) {
                        P[k] = moda_round_to(exp(z[k] - lse), rd);
                        double dp = 0.0; /* dP = <dO, value> */
                        for (int64_t i = 0; i < p->dv; i++)
                            dp += moda_load(p->grad_o.data, p->grad_o.dtype, moda_off_q(&p->grad_o, b, t, h, g, i)) *
                                  value_elem(p, b, h, keys[k], i);
                        dz[k] = moda_round_to(P[k] * (moda_round_to(dp, rd) - delta), rd);
                    }
                    for (int64_t i = 0; i < p->d; i++) {
                        double acc = 0.0;
                        for (int64_t k = 0; k < n; k++) acc += dz[k] * key_elem(p, b, h, keys[k], i);
                        moda_store(p->grad_q.data, p->grad_q.dtype, moda_off_q(&p->grad_q, b, t, h, g, i), moda_round_to(p->scale * acc, rd));
                    }
                    for (int64_t k = 0; k < n; k++) {
                        int64_t base = keys[k].depth ? ((b * p->T + keys[k].tok) * L + (keys[k].slot - p->d0)) * p->Hk + h
                                                     : (b * p->T + keys[k].tok) * p->Hk + h;
                        double *gk = keys[k].depth ? dKd + base * p->d : dK + base * p->d;
                        double *gv = keys[k].depth ? dVd + base * p->dv : dV + base * p->dv;
                        for (int64_t i = 0; i < p->d; i++)
                            gk[i] += p->scale * dz[k] * moda_load(p->q.data, p->q.dtype, moda_off_q(&p->q, b, t, h, g, i));
                        for (int64_t i = 0; i < p->dv; i++)
                            gv[i] += P[k] * moda_load(p->grad_o.data, p->grad_o.dtype, moda_off_q(&p->grad_o, b, t, h, g, i));
                    }
                }
    for (int64_t b = 0; b < p->B; b++)
        for (int64_t t = 0; t < p->T; t++)
            for (int64_t h = 0; h < p->Hk; h++) {
                if (p->sequence) {
                    int64_t base = (b * p->T + t) * p->Hk + h;
                    for (int64_t i = 0; i < p->d; i++)
                        moda_store(p->grad_k.data, p->grad_k.dtype, moda_off_k(&p->grad_k, b, t, h, i), moda_round_to(dK[base * p->d + i], rd));
                    for (int64_t i = 0; i < p->dv; i++)
                        moda_store(p->grad_v.data, p->grad_v.dtype, moda_off_k(&p->grad_v, b, t, h, i), moda_round_to(dV[base * p->dv + i], rd));
                }
                for (int64_t l = p->d0; l < p->d1; l++) {
                    int64_t base = ((b * p->T + t) * L + (l - p->d0)) * p->Hk + h;
                    for (int64_t i = 0; i < p->d; i++) {
                        int64_t off = moda_off_kd(&p->grad_kd, b, t, l, h, i);
                        double prior = p->accumulate_depth ? moda_load(p->grad_kd.data, p->grad_kd.dtype, off) : 0.0;
                        moda_store(p->grad_kd.data, p->grad_kd.dtype, off, moda_round_to(prior + dKd[base * p->d + i], rd));
                    }
                    for (int64_t i = 0; i < p->dv; i++) {
                        int64_t off = moda_off_kd(&p->grad_vd, b, t, l, h, i);
                        double prior = p->accumulate_depth ? moda_load(p->grad_vd.data, p->grad_vd.dtype, off) : 0.0;
                        moda_store(p->grad_vd.data, p->grad_vd.dtype, off, moda_round_to(prior + dVd[base * p->dv + i], rd));
                    }
                }
            }
done:
    free(keys); free(z); free(dz); free(P);
    free(dK); free(dV); free(dKd); free(dVd);
    return status;
}
