/*
 * test_model_kernels - the GPU trainer's row kernels (src/model/cuda/gpu_kernels.cu: RMSNorm forward and
 * backward, QK-norm + RoPE forward and backward) against a float64 CPU reference written from the math in
 * gpu_kernels.h, at every row width the vector kernels dispatch on (units per lane 1, 2, 3, 4, 6, 8; pair units
 * 1 with half the lanes idle, 1, 2, 3, 4) and at widths that take the scalar kernels. The whole-model parity test
 * (test_model_gpu) runs them only at its small widths; the speed configurations' widths (384, 768; 6 and 12
 * query heads) are checked here.
 *
 * Every case: fresh random inputs, outputs poisoned (NaN bytes) before the call, row strides wider than the rows
 * for some operands (the padding must stay poisoned), dw pre-filled (the kernels add into it), M not a multiple
 * of the chunk size, 512 chunks (the trainer's) and 7.
 *
 * Bounds, and why:
 * - fp32 outputs (dx32, rstd, dw) differ from the float64 reference only by fp32 rounding and summation order:
 *   relative L2 error <= 1e-5 (dx32, rstd) and 1e-4 (dw, sums over up to 4101 rows).
 * - bf16 outputs are one rounding of an fp32 value that is itself within ~1e-6 of the reference, so each element
 *   is within one bf16 ulp: |gpu - ref| <= 2^-7 |ref| + 1e-6 max|ref| (dx16, the norm's y, qk backward).
 * - The QK forward rounds the norm's output to bf16 before RoPE (as the trainer's CPU model does); an fp32
 *   difference can move that rounding by one ulp, and the rotation mixes the pair, so each element of a pair
 *   is within 2^-6 |(a, b)| (the rotation keeps the pair's length) of the reference.
 * A swapped column, a wrong head offset, a missing rotation, a lost accumulate or a weight-gradient row lost or
 * added twice moves an error to O(1); a skipped write leaves a NaN; a write past a row leaves the padding changed.
 */
#include "cuda/gpu_kernels.h"
#include "gpu_util.h"
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EPS 1e-6
#define POISON16 0xFFFFu

static tu_rng rng;

static float bf(float x) { return moda_bf16_to_f32(moda_f32_to_bf16(x)); }

static void *dalloc(size_t bytes) {
    void *p;
    CUDA_OK(cudaMalloc(&p, bytes ? bytes : 1));
    return p;
}
static void up(void *d, const void *h, size_t bytes) { CUDA_OK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice)); }
static void down(void *h, const void *d, size_t bytes) { CUDA_OK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost)); }

/* random bf16 values (normal * scale) */
static uint16_t *rand16(int64_t n, double scale) {
    uint16_t *h = malloc((size_t)n * 2);
    for (int64_t i = 0; i < n; i++) h[i] = moda_f32_to_bf16((float)(tu_normal(&rng) * scale));
    return h;
}
static float *rand32(int64_t n, double mean, double scale) {
    float *h = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) h[i] = (float)(mean + tu_normal(&rng) * scale);
    return h;
}
static double f16(uint16_t v) { return moda_bf16_to_f32(v); }

/* error accumulators of one output */
typedef struct err {
    double num, den, worst; /* L2 of the difference, L2 of the reference, worst element against its bound */
    long bad, nonfinite;
} err;
static void err_add(err *e, double got, double ref, double bound) {
    if (!isfinite(got)) {
        e->nonfinite++;
        return;
    }
    const double d = fabs(got - ref);
    e->num += d * d;
    e->den += ref * ref;
    if (bound > 0) {
        if (d > bound) e->bad++;
        if (d / bound > e->worst) e->worst = d / bound;
    }
}
static double err_rel(const err *e) { return e->den > 0 ? sqrt(e->num / e->den) : sqrt(e->num); }

static int vector_width(int64_t D) { return D % 4 == 0 && D >= 4 && D <= 1024; }
static int vector_pairs(int64_t H, int64_t d) { return d % 8 == 0 && H * d <= 1024; }

static double worst_rms_bwd, worst_qk_bwd, worst_rms_fwd, worst_qk_fwd, worst_dw;
static int cases_rms_bwd, cases_qk_bwd, cases_rms_fwd, cases_qk_fwd;

/* checks that the padding (columns [W, ld)) of a bf16 output with M rows is still poison */
static long padding_changed16(const uint16_t *h, int64_t M, int64_t W, int64_t ld) {
    long n = 0;
    for (int64_t r = 0; r < M; r++)
        for (int64_t j = W; j < ld; j++) n += h[r * ld + j] != POISON16;
    return n;
}

/* the float64 norm backward of one row: out = rs (g w - x rs mean(g w x rs)); dw += g x rs */
static void ref_norm_bwd_row(int64_t W, const double *g, const uint16_t *x, const float *w, double rs, double *out,
                             double *dw) {
    double dot = 0;
    for (int64_t j = 0; j < W; j++) dot += g[j] * w[j] * f16(x[j]) * rs;
    dot /= (double)W;
    for (int64_t j = 0; j < W; j++) {
        out[j] = rs * (g[j] * w[j] - f16(x[j]) * rs * dot);
        dw[j] += g[j] * f16(x[j]) * rs;
    }
}

static float *rstd_of(const uint16_t *x, int64_t M, int64_t W, int64_t ldx) {
    float *rs = malloc((size_t)M * 4);
    for (int64_t r = 0; r < M; r++) {
        double ss = 0;
        for (int64_t j = 0; j < W; j++) ss += f16(x[r * ldx + j]) * f16(x[r * ldx + j]);
        rs[r] = (float)(1.0 / sqrt(ss / (double)W + EPS));
    }
    return rs;
}

/* ---- mg_rmsnorm_bwd ---- */
static void check_rmsnorm_bwd(int64_t M, int64_t D, int64_t nchunk, int padded, int accumulate, int with32, int with16) {
    const int64_t ldx = D + (padded ? 8 : 0), ldy = D + (padded ? 4 : 0), ldh = D + (padded ? 12 : 0);
    uint16_t *x = rand16(M * ldx, 1.0);
    float *w = rand32(D, 1.0, 0.1), *dy = rand32(M * ldy, 0.0, 1.0), *old = rand32(M * D, 0.0, 1.0);
    float *dw0 = rand32(D, 0.0, 1.0), *rs = rstd_of(x, M, D, ldx);
    uint16_t *dx16 = malloc((size_t)M * ldh * 2);
    float *dx32 = malloc((size_t)M * D * 4), *dw = malloc((size_t)D * 4);
    uint16_t *d_x = dalloc((size_t)M * ldx * 2), *d_dx16 = dalloc((size_t)M * ldh * 2);
    float *d_w = dalloc((size_t)D * 4), *d_dy = dalloc((size_t)M * ldy * 4), *d_rs = dalloc((size_t)M * 4);
    float *d_dx32 = dalloc((size_t)M * D * 4), *d_part = dalloc((size_t)nchunk * D * 4), *d_dw = dalloc((size_t)D * 4);
    up(d_x, x, (size_t)M * ldx * 2);
    up(d_w, w, (size_t)D * 4);
    up(d_dy, dy, (size_t)M * ldy * 4);
    up(d_rs, rs, (size_t)M * 4);
    up(d_dw, dw0, (size_t)D * 4);
    if (accumulate) up(d_dx32, old, (size_t)M * D * 4);
    else CUDA_OK(cudaMemset(d_dx32, 0xFF, (size_t)M * D * 4));
    CUDA_OK(cudaMemset(d_dx16, 0xFF, (size_t)M * ldh * 2));
    CUDA_OK(cudaMemset(d_part, 0xFF, (size_t)nchunk * D * 4));
    int e = mg_rmsnorm_bwd(M, D, d_x, ldx, d_w, d_rs, d_dy, ldy, with32 ? d_dx32 : NULL, accumulate,
                           with16 ? d_dx16 : NULL, ldh, d_part, nchunk, d_dw, NULL);
    TU_CHECK(e == 0, "mg_rmsnorm_bwd launch: %d", e);
    CUDA_OK(cudaDeviceSynchronize());
    down(dx16, d_dx16, (size_t)M * ldh * 2);
    down(dx32, d_dx32, (size_t)M * D * 4);
    down(dw, d_dw, (size_t)D * 4);

    double *g = malloc((size_t)D * 8), *out = malloc((size_t)D * 8), *rdw = calloc((size_t)D, 8);
    err e32 = {0}, e16 = {0}, edw = {0};
    double maxref = 0;
    double *ref = malloc((size_t)M * D * 8);
    for (int64_t r = 0; r < M; r++) {
        for (int64_t j = 0; j < D; j++) g[j] = dy[r * ldy + j];
        ref_norm_bwd_row(D, g, x + r * ldx, w, rs[r], out, rdw);
        for (int64_t j = 0; j < D; j++) {
            ref[r * D + j] = (with32 && accumulate ? (double)old[r * D + j] : 0.0) + out[j];
            if (fabs(ref[r * D + j]) > maxref) maxref = fabs(ref[r * D + j]);
        }
    }
    for (int64_t i = 0; i < M * D; i++) {
        const int64_t r = i / D, j = i % D;
        if (with32) err_add(&e32, dx32[i], ref[i], 0);
        if (with16) err_add(&e16, f16(dx16[r * ldh + j]), ref[i], ldexp(fabs(ref[i]), -7) + 1e-6 * maxref);
    }
    for (int64_t j = 0; j < D; j++) err_add(&edw, dw[j], dw0[j] + rdw[j], 0);
    const long pad = with16 ? padding_changed16(dx16, M, D, ldh) : 0;
    char what[160];
    snprintf(what, sizeof what, "rmsnorm_bwd M=%lld D=%lld (%s) nchunk=%lld ld+%d acc=%d dx32=%d dx16=%d",
             (long long)M, (long long)D, vector_width(D) ? "vector" : "scalar", (long long)nchunk, padded ? 1 : 0,
             accumulate, with32, with16);
    TU_CHECK(!e32.nonfinite && err_rel(&e32) <= 1e-5, "%s: dx32 rel L2 %.3g, %ld non-finite", what, err_rel(&e32),
             e32.nonfinite);
    TU_CHECK(!e16.nonfinite && !e16.bad, "%s: dx16 %ld elements past one bf16 ulp (worst %.3g of the bound), %ld "
             "non-finite", what, e16.bad, e16.worst, e16.nonfinite);
    TU_CHECK(!edw.nonfinite && err_rel(&edw) <= 1e-4, "%s: dw rel L2 %.3g, %ld non-finite", what, err_rel(&edw),
             edw.nonfinite);
    TU_CHECK(pad == 0, "%s: %ld padding elements of dx16 written", what, pad);
    if (e16.worst > worst_rms_bwd) worst_rms_bwd = e16.worst;
    if (err_rel(&edw) > worst_dw) worst_dw = err_rel(&edw);
    cases_rms_bwd++;
    free(g), free(out), free(rdw), free(ref);
    free(x), free(w), free(dy), free(old), free(dw0), free(rs), free(dx16), free(dx32), free(dw);
    cudaFree(d_x), cudaFree(d_dx16), cudaFree(d_w), cudaFree(d_dy), cudaFree(d_rs), cudaFree(d_dx32);
    cudaFree(d_part), cudaFree(d_dw);
}

/* ---- mg_rmsnorm_fwd ---- */
static void check_rmsnorm_fwd(int64_t M, int64_t D, int padded, int with_b) {
    const int64_t lda = D + (padded ? 8 : 0), ldy = D + (padded ? 4 : 0);
    uint16_t *a = rand16(M * lda, 1.0), *b = rand16(M * D, 1.0);
    float *w = rand32(D, 1.0, 0.1);
    uint16_t *y = malloc((size_t)M * ldy * 2), *sum = malloc((size_t)M * D * 2);
    float *rs = malloc((size_t)M * 4);
    uint16_t *d_a = dalloc((size_t)M * lda * 2), *d_b = dalloc((size_t)M * D * 2), *d_y = dalloc((size_t)M * ldy * 2);
    uint16_t *d_sum = dalloc((size_t)M * D * 2);
    float *d_w = dalloc((size_t)D * 4), *d_rs = dalloc((size_t)M * 4);
    up(d_a, a, (size_t)M * lda * 2);
    up(d_b, b, (size_t)M * D * 2);
    up(d_w, w, (size_t)D * 4);
    CUDA_OK(cudaMemset(d_y, 0xFF, (size_t)M * ldy * 2));
    CUDA_OK(cudaMemset(d_sum, 0xFF, (size_t)M * D * 2));
    CUDA_OK(cudaMemset(d_rs, 0xFF, (size_t)M * 4));
    int e = mg_rmsnorm_fwd(M, D, d_a, lda, with_b ? d_b : NULL, with_b ? d_sum : NULL, d_w, d_y, ldy, d_rs, NULL);
    TU_CHECK(e == 0, "mg_rmsnorm_fwd launch: %d", e);
    CUDA_OK(cudaDeviceSynchronize());
    down(y, d_y, (size_t)M * ldy * 2);
    down(sum, d_sum, (size_t)M * D * 2);
    down(rs, d_rs, (size_t)M * 4);
    err ey = {0}, ers = {0}, esum = {0};
    double *s = malloc((size_t)D * 8);
    for (int64_t r = 0; r < M; r++) {
        double ss = 0, maxrow = 0;
        for (int64_t j = 0; j < D; j++) {
            s[j] = f16(a[r * lda + j]);
            if (with_b) {
                s[j] = bf((float)(s[j] + f16(b[r * D + j]))); /* the stored residual is the bf16 sum */
                err_add(&esum, f16(sum[r * D + j]), s[j], ldexp(fabs(s[j]), -7));
            }
            ss += s[j] * s[j];
        }
        const double rr = 1.0 / sqrt(ss / (double)D + EPS);
        err_add(&ers, rs[r], rr, 0);
        for (int64_t j = 0; j < D; j++)
            if (fabs(s[j] * rr * w[j]) > maxrow) maxrow = fabs(s[j] * rr * w[j]);
        for (int64_t j = 0; j < D; j++) {
            const double ref = s[j] * rr * w[j];
            err_add(&ey, f16(y[r * ldy + j]), ref, ldexp(fabs(ref), -7) + 1e-6 * maxrow);
        }
    }
    char what[128];
    snprintf(what, sizeof what, "rmsnorm_fwd M=%lld D=%lld (%s) ld+%d b=%d", (long long)M, (long long)D,
             vector_width(D) ? "vector" : "scalar", padded, with_b);
    TU_CHECK(!ey.nonfinite && !ey.bad, "%s: y %ld elements past one bf16 ulp (worst %.3g), %ld non-finite", what,
             ey.bad, ey.worst, ey.nonfinite);
    TU_CHECK(!ers.nonfinite && err_rel(&ers) <= 1e-5, "%s: rstd rel L2 %.3g", what, err_rel(&ers));
    TU_CHECK(!esum.nonfinite && !esum.bad, "%s: sum %ld elements off, %ld non-finite", what, esum.bad,
             esum.nonfinite);
    TU_CHECK(padding_changed16(y, M, D, ldy) == 0, "%s: padding of y written", what);
    if (ey.worst > worst_rms_fwd) worst_rms_fwd = ey.worst;
    cases_rms_fwd++;
    free(s), free(a), free(b), free(w), free(y), free(sum), free(rs);
    cudaFree(d_a), cudaFree(d_b), cudaFree(d_y), cudaFree(d_sum), cudaFree(d_w), cudaFree(d_rs);
}

/* RoPE tables [T, d/2] */
static void rope_tables(int64_t T, int64_t d, float **cs, float **sn) {
    const int64_t h2 = d / 2;
    *cs = malloc((size_t)(T * h2) * 4);
    *sn = malloc((size_t)(T * h2) * 4);
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < h2; k++) {
            const double ang = (double)t * pow(10000.0, -2.0 * (double)k / (double)d);
            (*cs)[t * h2 + k] = (float)cos(ang);
            (*sn)[t * h2 + k] = (float)sin(ang);
        }
}

/* ---- mg_qk_bwd ---- */
static void check_qk_bwd(int64_t M, int64_t T, int64_t H, int64_t d, int64_t nchunk, int rotate, int norm, int with_in,
                         int with_add, int padded) {
    const int64_t W = H * d, h2 = d / 2, ldi = W + (padded ? 8 : 0), lda = W + (padded ? 4 : 0),
                  ldo = W + (padded ? 12 : 0);
    uint16_t *in = rand16(M * ldi, 1.0), *x = rand16(M * W, 1.0);
    float *add = rand32(M * lda, 0.0, 0.5), *w = rand32(W, 1.0, 0.1), *dw0 = rand32(W, 0.0, 1.0);
    float *rs = rstd_of(x, M, W, W), *cs, *sn;
    rope_tables(T, d, &cs, &sn);
    uint16_t *out = malloc((size_t)M * ldo * 2);
    float *dw = malloc((size_t)W * 4);
    uint16_t *d_in = dalloc((size_t)M * ldi * 2), *d_x = dalloc((size_t)M * W * 2), *d_out = dalloc((size_t)M * ldo * 2);
    float *d_add = dalloc((size_t)M * lda * 4), *d_w = dalloc((size_t)W * 4), *d_rs = dalloc((size_t)M * 4);
    float *d_cs = dalloc((size_t)(T * h2) * 4), *d_sn = dalloc((size_t)(T * h2) * 4);
    float *d_scr = dalloc((size_t)M * W * 4), *d_part = dalloc((size_t)nchunk * W * 4), *d_dw = dalloc((size_t)W * 4);
    up(d_in, in, (size_t)M * ldi * 2);
    up(d_x, x, (size_t)M * W * 2);
    up(d_add, add, (size_t)M * lda * 4);
    up(d_w, w, (size_t)W * 4);
    up(d_rs, rs, (size_t)M * 4);
    up(d_cs, cs, (size_t)(T * h2) * 4);
    up(d_sn, sn, (size_t)(T * h2) * 4);
    up(d_dw, dw0, (size_t)W * 4);
    CUDA_OK(cudaMemset(d_out, 0xFF, (size_t)M * ldo * 2));
    CUDA_OK(cudaMemset(d_scr, 0xFF, (size_t)M * W * 4));
    CUDA_OK(cudaMemset(d_part, 0xFF, (size_t)nchunk * W * 4));
    int e = mg_qk_bwd(M, T, H, d, rotate, with_in ? d_in : NULL, ldi, with_add ? d_add : NULL, lda, norm ? d_x : NULL,
                      norm ? d_w : NULL, norm ? d_rs : NULL, d_out, ldo, d_scr, d_part, nchunk, norm ? d_dw : NULL,
                      d_cs, d_sn, NULL);
    TU_CHECK(e == 0, "mg_qk_bwd launch: %d", e);
    CUDA_OK(cudaDeviceSynchronize());
    down(out, d_out, (size_t)M * ldo * 2);
    down(dw, d_dw, (size_t)W * 4);

    double *g = malloc((size_t)W * 8), *o = malloc((size_t)W * 8), *rdw = calloc((size_t)W, 8);
    err eo = {0}, edw = {0};
    for (int64_t r = 0; r < M; r++) {
        const int64_t t = r % T;
        for (int64_t j = 0; j < W; j++)
            g[j] = (with_in ? f16(in[r * ldi + j]) : 0.0) + (with_add ? (double)add[r * lda + j] : 0.0);
        if (rotate)
            for (int64_t h = 0; h < H; h++)
                for (int64_t k = 0; k < h2; k++) {
                    const double a = g[h * d + k], b = g[h * d + k + h2], c = cs[t * h2 + k], s = sn[t * h2 + k];
                    g[h * d + k] = a * c + b * s;
                    g[h * d + k + h2] = -a * s + b * c;
                }
        if (norm) ref_norm_bwd_row(W, g, x + r * W, w, rs[r], o, rdw);
        else memcpy(o, g, (size_t)W * 8);
        double maxrow = 0;
        for (int64_t j = 0; j < W; j++)
            if (fabs(o[j]) > maxrow) maxrow = fabs(o[j]);
        for (int64_t j = 0; j < W; j++)
            err_add(&eo, f16(out[r * ldo + j]), o[j], ldexp(fabs(o[j]), -7) + 1e-6 * maxrow);
    }
    if (norm)
        for (int64_t j = 0; j < W; j++) err_add(&edw, dw[j], dw0[j] + rdw[j], 0);
    char what[192];
    snprintf(what, sizeof what, "qk_bwd M=%lld T=%lld H=%lld d=%lld (%s) nchunk=%lld rotate=%d norm=%d in16=%d "
             "add32=%d ld+%d", (long long)M, (long long)T, (long long)H, (long long)d,
             vector_pairs(H, d) ? "vector" : "scalar", (long long)nchunk, rotate, norm, with_in, with_add, padded);
    TU_CHECK(!eo.nonfinite && !eo.bad, "%s: out %ld elements past one bf16 ulp (worst %.3g of the bound), %ld "
             "non-finite", what, eo.bad, eo.worst, eo.nonfinite);
    TU_CHECK(!norm || (!edw.nonfinite && err_rel(&edw) <= 1e-4), "%s: dw rel L2 %.3g, %ld non-finite", what,
             err_rel(&edw), edw.nonfinite);
    TU_CHECK(padding_changed16(out, M, W, ldo) == 0, "%s: padding of out written", what);
    if (eo.worst > worst_qk_bwd) worst_qk_bwd = eo.worst;
    if (norm && err_rel(&edw) > worst_dw) worst_dw = err_rel(&edw);
    cases_qk_bwd++;
    free(g), free(o), free(rdw), free(in), free(x), free(add), free(w), free(dw0), free(rs), free(cs), free(sn);
    free(out), free(dw);
    cudaFree(d_in), cudaFree(d_x), cudaFree(d_out), cudaFree(d_add), cudaFree(d_w), cudaFree(d_rs), cudaFree(d_cs);
    cudaFree(d_sn), cudaFree(d_scr), cudaFree(d_part), cudaFree(d_dw);
}

/* ---- mg_qk_fwd (without the norm it works in place, as the trainer calls it) ---- */
static void check_qk_fwd(int64_t M, int64_t T, int64_t H, int64_t d, int norm, int padded) {
    const int64_t W = H * d, h2 = d / 2, ldi = W + (padded ? 8 : 0), ldo = norm ? W + (padded ? 4 : 0) : ldi;
    uint16_t *in = rand16(M * ldi, 1.0), *out = malloc((size_t)M * ldo * 2);
    float *w = rand32(W, 1.0, 0.1), *rs = malloc((size_t)M * 4), *cs, *sn;
    rope_tables(T, d, &cs, &sn);
    uint16_t *d_in = dalloc((size_t)M * ldi * 2), *d_out = norm ? dalloc((size_t)M * ldo * 2) : d_in;
    float *d_w = dalloc((size_t)W * 4), *d_rs = dalloc((size_t)M * 4);
    float *d_cs = dalloc((size_t)(T * h2) * 4), *d_sn = dalloc((size_t)(T * h2) * 4);
    up(d_in, in, (size_t)M * ldi * 2);
    up(d_w, w, (size_t)W * 4);
    up(d_cs, cs, (size_t)(T * h2) * 4);
    up(d_sn, sn, (size_t)(T * h2) * 4);
    if (norm) CUDA_OK(cudaMemset(d_out, 0xFF, (size_t)M * ldo * 2));
    CUDA_OK(cudaMemset(d_rs, 0xFF, (size_t)M * 4));
    int e = mg_qk_fwd(M, T, H, d, d_in, ldi, norm ? d_w : NULL, d_rs, d_out, ldo, d_cs, d_sn, NULL);
    TU_CHECK(e == 0, "mg_qk_fwd launch: %d", e);
    CUDA_OK(cudaDeviceSynchronize());
    down(out, d_out, (size_t)M * ldo * 2);
    down(rs, d_rs, (size_t)M * 4);
    err eo = {0}, ers = {0};
    double *y = malloc((size_t)W * 8);
    for (int64_t r = 0; r < M; r++) {
        const int64_t t = r % T;
        double rr = 1;
        if (norm) {
            double ss = 0;
            for (int64_t j = 0; j < W; j++) ss += f16(in[r * ldi + j]) * f16(in[r * ldi + j]);
            rr = 1.0 / sqrt(ss / (double)W + EPS);
            err_add(&ers, rs[r], rr, 0);
        }
        for (int64_t j = 0; j < W; j++) y[j] = norm ? bf((float)(f16(in[r * ldi + j]) * rr * w[j])) : f16(in[r * ldi + j]);
        for (int64_t h = 0; h < H; h++)
            for (int64_t k = 0; k < h2; k++) {
                const int64_t ja = h * d + k, jb = ja + h2;
                const double c = cs[t * h2 + k], s = sn[t * h2 + k];
                const double oa = y[ja] * c - y[jb] * s, ob = y[ja] * s + y[jb] * c;
                const double bound = ldexp(sqrt(oa * oa + ob * ob), -6) + 1e-30;
                err_add(&eo, f16(out[r * ldo + ja]), oa, bound);
                err_add(&eo, f16(out[r * ldo + jb]), ob, bound);
            }
    }
    char what[128];
    snprintf(what, sizeof what, "qk_fwd M=%lld T=%lld H=%lld d=%lld (%s) norm=%d ld+%d", (long long)M, (long long)T,
             (long long)H, (long long)d, vector_pairs(H, d) ? "vector" : "scalar", norm, padded);
    TU_CHECK(!eo.nonfinite && !eo.bad, "%s: out %ld elements past the bound (worst %.3g), %ld non-finite", what,
             eo.bad, eo.worst, eo.nonfinite);
    TU_CHECK(!norm || (!ers.nonfinite && err_rel(&ers) <= 1e-5), "%s: rstd rel L2 %.3g", what, err_rel(&ers));
    TU_CHECK(!norm || padding_changed16(out, M, W, ldo) == 0, "%s: padding of out written", what);
    if (eo.worst > worst_qk_fwd) worst_qk_fwd = eo.worst;
    cases_qk_fwd++;
    free(y), free(in), free(out), free(w), free(rs), free(cs), free(sn);
    cudaFree(d_in), cudaFree(d_w), cudaFree(d_rs), cudaFree(d_cs), cudaFree(d_sn);
    if (norm) cudaFree(d_out);
}

int main(void) {
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("test_model_kernels: no CUDA device, skipped\n");
        return 0;
    }
    rng = tu_rng_from_env("test_model_kernels");
    const int quick = tu_quick();
    /* every units-per-lane instantiation (1, 2, 3, 4, 6, 8; 100 and 640 leave lanes or units idle) and two
     * scalar widths (D % 4 != 0, D > 1024) */
    static const int64_t widths[] = {128, 256, 384, 512, 640, 768, 1024, 100, 102, 1028};
    const int nw = (int)(sizeof widths / sizeof widths[0]);
    for (int i = 0; i < nw; i++) {
        const int64_t D = widths[i];
        check_rmsnorm_bwd(37, D, 512, i % 2, 1, 1, 1);
        check_rmsnorm_bwd(37, D, 7, !(i % 2), 0, 1, 0);
        check_rmsnorm_bwd(37, D, 512, 1, 0, 0, 1);
        check_rmsnorm_fwd(37, D, i % 2, 1);
        check_rmsnorm_fwd(37, D, !(i % 2), 0);
        if (!quick && (D == 384 || D == 768 || D == 1024 || D == 102)) {
            check_rmsnorm_bwd(4101, D, 512, 1, 1, 1, 1); /* the trainer's accumulate form, many rows per chunk */
            check_rmsnorm_bwd(4101, D, 512, 0, 0, 1, 1);
            check_rmsnorm_fwd(4101, D, 0, 1);
        }
    }
    /* pair units 1 (half the lanes idle), 1, 2, 3, 4, 4 (d = 128), and a scalar shape (d % 8 != 0) */
    static const int64_t heads[][2] = {{2, 64}, {4, 64}, {6, 64}, {12, 64}, {16, 64}, {8, 128}, {3, 36}};
    const int nh = (int)(sizeof heads / sizeof heads[0]);
    for (int i = 0; i < nh; i++) {
        const int64_t H = heads[i][0], d = heads[i][1];
        check_qk_bwd(37, 13, H, d, 512, 1, 1, 1, 0, i % 2);  /* q: the attention's dq, norm, RoPE */
        check_qk_bwd(37, 13, H, d, 7, 1, 1, 1, 1, !(i % 2)); /* k with the depth gradient added */
        check_qk_bwd(37, 13, H, d, 512, 1, 0, 1, 1, 1);     /* no QK-norm */
        check_qk_bwd(37, 13, H, d, 512, 0, 0, 0, 1, 0);     /* v of a depth slot: add32 only, no rotation */
        check_qk_fwd(37, 13, H, d, 1, i % 2);
        check_qk_fwd(37, 13, H, d, 0, !(i % 2));
        if (!quick && (H * d == 384 || H * d == 768 || H * d == 128 || H * d == 256)) {
            check_qk_bwd(4101, 1024, H, d, 512, 1, 1, 1, 0, 0);
            check_qk_bwd(4101, 1024, H, d, 512, 1, 1, 1, 1, 1);
            check_qk_fwd(4101, 1024, H, d, 1, 0);
        }
    }
    printf("test_model_kernels: rmsnorm_bwd %d cases (worst bf16 error %.3g of its bound), rmsnorm_fwd %d (%.3g), "
           "qk_bwd %d (%.3g), qk_fwd %d (%.3g); worst dw rel L2 %.3g\n",
           cases_rms_bwd, worst_rms_bwd, cases_rms_fwd, worst_rms_fwd, cases_qk_bwd, worst_qk_bwd, cases_qk_fwd,
           worst_qk_fwd, worst_dw);
    return tu_finish("test_model_kernels");
}
