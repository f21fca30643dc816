/*
 * test_model_kernels - the GPU trainer's row kernels (src/model/cuda/gpu_kernels.cu: mg_rmsnorm_fwd,
 * mg_rmsnorm_bwd, mg_qk_fwd, mg_qk_bwd, mg_swiglu_fwd, mg_swiglu_bwd) against float64 references on the host,
 * at the widths the trainer's configurations use, at every vector width (units per lane 1, 2, 3, 4, 6, 8; pair
 * units 1 to 4), and at widths, strides and pointers that must take the scalar fallback. The whole-model parity
 * test (test_model_gpu) runs these kernels only at widths 256 and 128.
 *
 * Every case: fresh random inputs (bf16 values are rounded floats; rows get scales from 1e-3 to 10, so that the
 * norm's epsilon matters on some rows; weights around 1; RoPE tables of random angles, so that any index mix-up
 * of cos/sin or of positions moves the result); every buffer surrounded by poison (0xFF bytes, NaN: LEAD
 * elements before it, the row padding where ld > width, GUARD elements after it); outputs and scratch poisoned
 * before the call. After the call:
 *  - every output element is finite (the poison is gone; reading padding or an unwritten partial shows as NaN);
 *  - every element is within its bound of the float64 reference (below), and the tensor's relative L2 error is
 *    within spec.md §4's guide (bf16 1e-2, fp32 1e-4);
 *  - no byte outside any buffer's logical region changed, and the inputs' logical regions did not change;
 *  - on the vector path of mg_qk_bwd with the norm, scratch32 (only the scalar fallback uses it) is untouched,
 *    and without the norm mg_qk_fwd leaves rstd untouched. Each shape's line names the path its width selects.
 *
 * Bounds. The reference is evaluated in double at the kernel's own bf16 rounding points (the stored residual
 * sum; the QK-norm output before RoPE) and compared before the output's own rounding. `mag` is the sum of the
 * magnitudes of the terms behind an element (|a c| + |b s| for a rotation; rs (|g w| + |x| rs mean|g w x rs|) for
 * the norm's backward; |dw0| + sum |g x rs| for a weight gradient): the scale of fp32 rounding errors where the
 * terms cancel.
 *  - bf16 outputs: |gpu - ref| <= 2^-7 |ref| + 1e-3 mag. One round-to-nearest to bf16 (8 significant bits)
 *    moves a value by at most 2^-8 of itself; the factor 2 leaves room for the fp32 evaluation before it, whose
 *    error is a few 2^-24 mag per term plus n 2^-24 mag for a sum of n terms in sequence (n <= ~100 here),
 *    far below 1e-3 mag.
 *  - mg_qk_fwd with the norm: 2^-6 mag instead of 1e-3 mag. The kernel rounds the norm's output to bf16 before
 *    RoPE; from fp32 (GPU) and from double (reference) one element can round to neighbouring bf16 values, one
 *    ulp = at most 2^-7 of it, which the rotation carries into the output with weight |c| or |s|: at most
 *    2^-7 mag, doubled.
 *  - fp32 outputs (rstd, dx32, dw): |gpu - ref| <= 1e-4 mag: they differ only in the order of fp32 sums
 *    (< 4e-5 mag even in the worst case of ~100 terms in sequence plus the reduction trees).
 *  - the stored residual sum: bitwise equal to the host's bf16(fp32(a + b)) (the same two roundings).
 * The bugs such kernels have (two columns swapped, a head, unit or position off by one, cos and sin exchanged,
 * a lost term, row or chunk, = instead of +=, a wrong epsilon) move elements by a sizeable fraction of mag, at
 * least 10x these bounds.
 *
 * MODA_TEST_QUICK=1 (the sanitizer runs): fewer widths, no large row counts. MODA_GPU_ELEM_LEGACY=1 (read once
 * by the library) sends every case to the scalar kernels; the test then expects the scalar path everywhere.
 */
#include "cuda/gpu_kernels.h"
#include "gpu_util.h"
#include "testutil.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LEAD 8   /* poisoned elements before each buffer's first element (keeps 16-byte alignment) */
#define GUARD 64 /* poisoned elements after its last row */
#define RMS_EPS 1e-6
#define BIG_M (4096 + 5)

static const double TOL16 = 1.0 / 128; /* 2^-7 of |ref| for a bf16 output */
static const double MAG16 = 1e-3;      /* of mag for a bf16 output */
static const double MAG16_ROUNDED = 1.0 / 64; /* of mag, mg_qk_fwd with the norm (an intermediate bf16 rounding) */
static const double MAG32 = 1e-4;      /* of mag for an fp32 output */

static int g_legacy;

/* ---- buffers: a device allocation with a host image of all of it (poison included) ---- */
typedef struct buf {
    int64_t rows, cols, ld, off; /* logical [rows, cols], row stride ld, first element `off` into the allocation */
    size_t esz, n;               /* element size (2: bf16, 4: fp32); elements allocated */
    unsigned char *host;         /* what the device holds before the call */
    unsigned char *back;         /* what it holds after */
    void *dev;                   /* NULL: the argument is absent */
} buf;

static void buf_make(buf *b, int present, int64_t rows, int64_t cols, int64_t ld, int64_t off, size_t esz) {
    memset(b, 0, sizeof *b);
    if (!present) return;
    b->rows = rows;
    b->cols = cols;
    b->ld = ld;
    b->off = off;
    b->esz = esz;
    b->n = (size_t)(off + rows * ld + GUARD);
    b->host = malloc(b->n * esz);
    b->back = malloc(b->n * esz);
    if (!b->host || !b->back) {
        fprintf(stderr, "FATAL: out of host memory\n");
        exit(2);
    }
    memset(b->host, 0xFF, b->n * esz);
    CUDA_OK(cudaMalloc(&b->dev, b->n * esz));
}

static void buf_free(buf *b) {
    if (b->dev) CUDA_OK(cudaFree(b->dev));
    free(b->host);
    free(b->back);
    memset(b, 0, sizeof *b);
}

static void *ptr(const buf *b) { return b->dev ? (char *)b->dev + (size_t)b->off * b->esz : NULL; }
static size_t at(const buf *b, int64_t r, int64_t c) { return (size_t)(b->off + r * b->ld + c); }
static int logical(const buf *b, size_t i) {
    if ((int64_t)i < b->off) return 0;
    const int64_t k = (int64_t)i - b->off, r = k / b->ld;
    return r < b->rows && k - r * b->ld < b->cols;
}

static float bf16_round(float x) { return moda_bf16_to_f32(moda_f32_to_bf16(x)); }

/* Stores v at (r, c) of the host image (rounded to bf16 for a bf16 buffer); returns the value stored. */
static float put(buf *b, int64_t r, int64_t c, float v) {
    const size_t i = at(b, r, c);
    if (b->esz == 2) {
        const uint16_t h = moda_f32_to_bf16(v);
        memcpy(b->host + 2 * i, &h, 2);
        return moda_bf16_to_f32(h);
    }
    memcpy(b->host + 4 * i, &v, 4);
    return v;
}

static double get(const buf *b, int64_t r, int64_t c) {
    const size_t i = at(b, r, c);
    if (b->esz == 2) {
        uint16_t h;
        memcpy(&h, b->back + 2 * i, 2);
        return moda_bf16_to_f32(h);
    }
    float f;
    memcpy(&f, b->back + 4 * i, 4);
    return f;
}

/* Fills the logical region with center + scale * rowscale[r] * N(0,1) and keeps the stored values (dense). */
static float *fill(buf *b, tu_rng *rng, const double *rowscale, double center, double scale) {
    float *v = malloc(sizeof(float) * (size_t)(b->rows * b->cols));
    for (int64_t r = 0; r < b->rows; r++)
        for (int64_t c = 0; c < b->cols; c++)
            v[r * b->cols + c] = put(b, r, c, (float)(center + scale * (rowscale ? rowscale[r] : 1.0) * tu_normal(rng)));
    return v;
}

/* The host image to the device (inputs, prefilled outputs); poison: all 0xFF on both sides (pure outputs). */
static void upload(buf *b) {
    if (b->dev) CUDA_OK(cudaMemcpy(b->dev, b->host, b->n * b->esz, cudaMemcpyHostToDevice));
}
static void poison(buf *b) {
    if (!b->dev) return;
    memset(b->host, 0xFF, b->n * b->esz);
    CUDA_OK(cudaMemset(b->dev, 0xFF, b->n * b->esz));
}
static void download(buf *b) {
    if (b->dev) CUDA_OK(cudaMemcpy(b->back, b->dev, b->n * b->esz, cudaMemcpyDeviceToHost));
}

/* Nothing outside the logical region changed; with `input`, nothing inside it either. */
static void expect_intact(const char *cs, const char *what, const buf *b, int input) {
    if (!b->dev) return;
    int64_t outside = 0, inside = 0;
    for (size_t i = 0; i < b->n; i++) {
        if (!memcmp(b->host + i * b->esz, b->back + i * b->esz, b->esz)) continue;
        if (logical(b, i)) inside++;
        else outside++;
    }
    TU_CHECK(outside == 0, "%s: %s: %lld elements outside the logical region changed", cs, what, (long long)outside);
    if (input) TU_CHECK(inside == 0, "%s: input %s: %lld elements changed", cs, what, (long long)inside);
}

/* ---- statistics per shape and per operation ---- */
typedef struct stat {
    int cases, vec;
    double worst;       /* largest err / bound */
    char where[400];    /* where it was seen */
    double l2_16, l2_32; /* largest relative L2 error of a bf16 / fp32 output */
} stat;

static void merge(stat *into, const stat *s) {
    into->cases += s->cases;
    into->vec += s->vec;
    if (s->worst >= into->worst) {
        into->worst = s->worst;
        snprintf(into->where, sizeof into->where, "%s", s->where);
    }
    if (s->l2_16 > into->l2_16) into->l2_16 = s->l2_16;
    if (s->l2_32 > into->l2_32) into->l2_32 = s->l2_32;
}

/* An output against its reference (dense [rows, cols]): every element finite and within
 * rtol |ref| + mtol mag + floor (mag NULL: |ref|; floor: 1e-7 of the largest mag, for terms that vanish), and
 * the relative L2 error within the dtype's guide. Also checks that nothing outside the region changed. */
static void expect(stat *st, const char *cs, const char *what, const buf *o, const double *ref, const double *mag,
                   double rtol, double mtol) {
    const int64_t n = o->rows * o->cols;
    double maxmag = 0;
    for (int64_t i = 0; i < n; i++) {
        const double m = mag ? mag[i] : fabs(ref[i]);
        if (m > maxmag) maxmag = m;
    }
    const double floor_ = 1e-7 * maxmag;
    int64_t nonfinite = 0, bad = 0, first_bad = -1, iworst = 0;
    double worst = 0, num = 0, den = 0;
    for (int64_t r = 0; r < o->rows; r++)
        for (int64_t c = 0; c < o->cols; c++) {
            const int64_t i = r * o->cols + c;
            const double g = get(o, r, c), e = fabs(g - ref[i]);
            const double bound = rtol * fabs(ref[i]) + mtol * (mag ? mag[i] : fabs(ref[i])) + floor_;
            if (!isfinite(g)) {
                nonfinite++;
                continue;
            }
            num += e * e;
            den += ref[i] * ref[i];
            const double ratio = bound > 0 ? e / bound : (e > 0 ? INFINITY : 0);
            if (ratio > 1 && bad++ == 0) first_bad = i;
            if (ratio > worst) {
                worst = ratio;
                iworst = i;
            }
        }
    const double l2 = den > 0 ? sqrt(num / den) : sqrt(num);
    const double l2tol = o->esz == 2 ? 1e-2 : 1e-4;
    TU_CHECK(nonfinite == 0, "%s: %s: %lld of %lld elements not finite (poison left or NaN made)", cs, what,
             (long long)nonfinite, (long long)n);
    if (bad) {
        const int64_t r = first_bad / o->cols, c = first_bad % o->cols;
        TU_CHECK(0, "%s: %s: %lld of %lld elements beyond the bound; first [%lld, %lld]: gpu %.8g ref %.8g mag %.3g", cs,
                 what, (long long)bad, (long long)n, (long long)r, (long long)c, get(o, r, c), ref[first_bad],
                 mag ? mag[first_bad] : fabs(ref[first_bad]));
    } else {
        TU_CHECK(1, "within bound");
    }
    TU_CHECK(l2 <= l2tol, "%s: %s: relative L2 error %.3e > %.0e", cs, what, l2, l2tol);
    expect_intact(cs, what, o, 0);
    if (worst >= st->worst) {
        st->worst = worst;
        snprintf(st->where, sizeof st->where, "%s of %s at [%lld, %lld]", what, cs, (long long)(iworst / o->cols),
                 (long long)(iworst % o->cols));
    }
    if (o->esz == 2 && l2 > st->l2_16) st->l2_16 = l2;
    if (o->esz == 4 && l2 > st->l2_32) st->l2_32 = l2;
}

/* The end of a case: counted (vec: on the vector path), its buffers and host arrays freed. */
static void case_done(stat *st, int vec, buf **bufs, int nb, void **mem, int nm) {
    st->cases++;
    st->vec += vec;
    for (int i = 0; i < nb; i++) buf_free(bufs[i]);
    for (int i = 0; i < nm; i++) free(mem[i]);
}

/* ---- the launchers' dispatch rules (gpu_kernels.cu), to name the expected path ---- */
static int units_per_lane(int64_t D) {
    if (D % 4 || D > 1024 || D < 4) return 0;
    const int64_t u = (D / 4 + 31) / 32;
    return u <= 4 ? (int)u : u <= 6 ? 6 : 8;
}
static int pair_units_per_lane(int64_t H, int64_t d) {
    if (d % 8 || H * d > 1024 || H < 1) return 0;
    return (int)((H * d / 8 + 31) / 32);
}
static int al(const buf *b, unsigned bytes) { return ((uintptr_t)ptr(b) & (uintptr_t)(bytes - 1)) == 0; }

static double *dalloc(int64_t n) {
    double *p = calloc((size_t)(n > 0 ? n : 1), sizeof(double));
    if (!p) {
        fprintf(stderr, "FATAL: out of host memory\n");
        exit(2);
    }
    return p;
}

static double *row_scales(tu_rng *rng, int64_t M, double lo, double hi) {
    double *s = dalloc(M);
    for (int64_t r = 0; r < M; r++) s[r] = pow(10.0, lo + (hi - lo) * tu_uniform(rng));
    return s;
}

/* rstd of rows of stored values, as the forward computed it (rounded to float: the backward's input) */
static float *rstd_of(const float *x, int64_t M, int64_t D) {
    float *rs = malloc(sizeof(float) * (size_t)M);
    for (int64_t r = 0; r < M; r++) {
        double ss = 0;
        for (int64_t j = 0; j < D; j++) ss += (double)x[r * D + j] * x[r * D + j];
        rs[r] = (float)(1.0 / sqrt(ss / (double)D + RMS_EPS));
    }
    return rs;
}

/* The norm's backward of one row in double: out = rs (g w - x rs mean(g w x rs)) with its magnitude, and the
 * weight gradient's terms g x rs added to dw / dwm. g, gm: the incoming gradient and its magnitude. */
static void norm_bwd_ref(int64_t D, const double *g, const double *gm, const float *x, const float *w, double rs,
                         double *out, double *outm, double *dw, double *dwm) {
    double dot = 0, dotm = 0;
    for (int64_t j = 0; j < D; j++) {
        dot += g[j] * w[j] * x[j] * rs;
        dotm += gm[j] * fabs(w[j] * x[j]) * rs;
    }
    dot /= (double)D;
    dotm /= (double)D;
    for (int64_t j = 0; j < D; j++) {
        out[j] = rs * (g[j] * w[j] - x[j] * rs * dot);
        outm[j] = rs * (gm[j] * fabs(w[j]) + fabs(x[j]) * rs * dotm);
        dw[j] += g[j] * x[j] * rs;
        dwm[j] += gm[j] * fabs(x[j]) * rs;
    }
}

static void fill_rope(tu_rng *rng, buf *cb, buf *sb) {
    for (int64_t t = 0; t < cb->rows; t++)
        for (int64_t k = 0; k < cb->cols; k++) {
            const double th = 6.283185307179586 * tu_uniform(rng);
            put(cb, t, k, (float)cos(th));
            put(sb, t, k, (float)sin(th));
        }
}
static double tab(const buf *b, int64_t t, int64_t k) {
    float f;
    memcpy(&f, b->host + 4 * at(b, t, k), 4);
    return f;
}

/* ---- RMSNorm forward: s = a (+ b, stored rounded); y = bf16(s rstd w) ---- */
static void case_rmsnorm_fwd(tu_rng *rng, stat *st, int64_t M, int64_t D, int64_t lda, int64_t ldy, int has_b,
                             int has_sum, int64_t a_off) {
    buf a, b, sum, w, y, rstd;
    buf_make(&a, 1, M, D, lda, a_off, 2);
    buf_make(&b, has_b, M, D, D, LEAD, 2);
    buf_make(&sum, has_b && has_sum, M, D, D, LEAD, 2);
    buf_make(&w, 1, 1, D, D, LEAD, 4);
    buf_make(&y, 1, M, D, ldy, LEAD, 2);
    buf_make(&rstd, 1, 1, M, M, LEAD, 4);
    double *rs = row_scales(rng, M, -3, 1);
    float *av = fill(&a, rng, rs, 0, 1), *bv = has_b ? fill(&b, rng, rs, 0, 1) : NULL, *wv = fill(&w, rng, NULL, 1, 0.2);
    upload(&a);
    upload(&b);
    upload(&w);
    poison(&sum);
    poison(&y);
    poison(&rstd);
    const int mu = units_per_lane(D);
    const int vec = !g_legacy && mu && lda % 4 == 0 && ldy % 4 == 0 && al(&a, 8) && al(&b, 8) && al(&sum, 8) &&
                    al(&y, 8) && al(&w, 16);
    char cs[200];
    snprintf(cs, sizeof cs, "rmsnorm_fwd M=%lld D=%lld lda=%lld%s ldy=%lld%s%s [%s]", (long long)M, (long long)D,
             (long long)lda, a_off % 4 ? " (a misaligned)" : "", (long long)ldy, has_b ? " +b" : "",
             has_b && has_sum ? " +sum" : "", vec ? "vector" : "scalar");
    const int rc = mg_rmsnorm_fwd(M, D, ptr(&a), lda, ptr(&b), ptr(&sum), ptr(&w), ptr(&y), ldy, ptr(&rstd), NULL);
    CUDA_OK(cudaDeviceSynchronize());
    TU_CHECK(rc == 0, "%s: launcher returned %d", cs, rc);
    buf *all[] = {&a, &b, &sum, &w, &y, &rstd};
    for (int i = 0; i < 6; i++) download(all[i]);

    double *yref = dalloc(M * D), *sref = dalloc(M * D), *rref = dalloc(M);
    for (int64_t r = 0; r < M; r++) {
        double ss = 0;
        for (int64_t j = 0; j < D; j++) {
            float s = av[r * D + j];
            if (has_b) s = bf16_round(s + bv[r * D + j]); /* the kernel's fp32 add and bf16 store, exactly */
            sref[r * D + j] = s;
            ss += (double)s * s;
        }
        rref[r] = 1.0 / sqrt(ss / (double)D + RMS_EPS);
        for (int64_t j = 0; j < D; j++) yref[r * D + j] = sref[r * D + j] * rref[r] * wv[j];
    }
    expect(st, cs, "y", &y, yref, NULL, TOL16, MAG16);
    expect(st, cs, "rstd", &rstd, rref, NULL, 0, MAG32);
    if (sum.dev) expect(st, cs, "sum (bitwise)", &sum, sref, NULL, 0, 0);
    expect_intact(cs, "a", &a, 1);
    expect_intact(cs, "b", &b, 1);
    expect_intact(cs, "w", &w, 1);
    void *mem[] = {av, bv, wv, rs, yref, sref, rref};
    case_done(st, vec, all, 6, mem, (int)(sizeof mem / sizeof *mem));
}

/* ---- RMSNorm backward: dx32 (=, += or in place over dy), dx16, dw += ---- */
enum { DX_NONE, DX_SET, DX_ACC, DX_INPLACE };
static void case_rmsnorm_bwd(tu_rng *rng, stat *st, int64_t M, int64_t D, int64_t ldx, int64_t ldy, int64_t ldh,
                             int dxmode, int has_dx16, int64_t nchunk, int64_t dy_off) {
    buf x, w, rstd, dyb, dx32, dx16, partial, dw;
    const int inplace = dxmode == DX_INPLACE;
    if (inplace) ldy = D;
    buf_make(&x, 1, M, D, ldx, LEAD, 2);
    buf_make(&w, 1, 1, D, D, LEAD, 4);
    buf_make(&rstd, 1, 1, M, M, LEAD, 4);
    buf_make(&dyb, !inplace, M, D, ldy, dy_off, 4);
    buf_make(&dx32, dxmode != DX_NONE, M, D, D, LEAD, 4);
    buf_make(&dx16, has_dx16, M, D, ldh, LEAD, 2);
    buf_make(&partial, 1, nchunk, D, D, LEAD, 4);
    buf_make(&dw, 1, 1, D, D, LEAD, 4);
    double *xs = row_scales(rng, M, -3, 1), *gs = row_scales(rng, M, -2, 1);
    float *xv = fill(&x, rng, xs, 0, 1), *wv = fill(&w, rng, NULL, 1, 0.2);
    float *dyv = fill(inplace ? &dx32 : &dyb, rng, gs, 0, 1);
    float *old = dxmode == DX_ACC ? fill(&dx32, rng, gs, 0, 1) : NULL;
    float *dw0 = fill(&dw, rng, NULL, 0, 1);
    float *rsv = rstd_of(xv, M, D);
    for (int64_t r = 0; r < M; r++) put(&rstd, 0, r, rsv[r]);
    upload(&x);
    upload(&w);
    upload(&rstd);
    upload(&dyb);
    upload(&dw);
    if (dxmode == DX_SET) poison(&dx32);
    else upload(&dx32);
    poison(&dx16);
    poison(&partial);
    const buf *dyp = inplace ? &dx32 : &dyb;
    const int mu = units_per_lane(D);
    const int vec = !g_legacy && mu && ldx % 4 == 0 && ldy % 4 == 0 && ldh % 4 == 0 && al(&x, 8) && al(dyp, 16) &&
                    al(&dx32, 16) && al(&dx16, 8) && al(&w, 16);
    static const char *modes[] = {"no dx32", "dx32 =", "dx32 +=", "dx32 in place over dy"};
    char cs[200];
    snprintf(cs, sizeof cs, "rmsnorm_bwd M=%lld D=%lld ldx=%lld ldy=%lld%s ldh=%lld %s%s nchunk=%lld [%s]",
             (long long)M, (long long)D, (long long)ldx, (long long)ldy, dy_off % 4 ? " (dy misaligned)" : "",
             (long long)ldh, modes[dxmode], has_dx16 ? " +dx16" : "", (long long)nchunk, vec ? "vector" : "scalar");
    const int rc = mg_rmsnorm_bwd(M, D, ptr(&x), ldx, ptr(&w), ptr(&rstd), ptr(dyp), ldy, ptr(&dx32),
                                  dxmode == DX_ACC, ptr(&dx16), ldh, ptr(&partial), nchunk, ptr(&dw), NULL);
    CUDA_OK(cudaDeviceSynchronize());
    TU_CHECK(rc == 0, "%s: launcher returned %d", cs, rc);
    buf *all[] = {&x, &w, &rstd, &dyb, &dx32, &dx16, &partial, &dw};
    for (int i = 0; i < 8; i++) download(all[i]);

    double *ref = dalloc(M * D), *mag = dalloc(M * D), *g = dalloc(D), *gm = dalloc(D);
    double *dwr = dalloc(D), *dwm = dalloc(D);
    for (int64_t j = 0; j < D; j++) {
        dwr[j] = dw0[j];
        dwm[j] = fabs(dw0[j]);
    }
    for (int64_t r = 0; r < M; r++) {
        for (int64_t j = 0; j < D; j++) {
            g[j] = dyv[r * D + j];
            gm[j] = fabs(g[j]);
        }
        norm_bwd_ref(D, g, gm, xv + r * D, wv, rsv[r], ref + r * D, mag + r * D, dwr, dwm);
        if (old)
            for (int64_t j = 0; j < D; j++) {
                ref[r * D + j] += old[r * D + j];
                mag[r * D + j] += fabs(old[r * D + j]);
            }
    }
    if (dx32.dev) expect(st, cs, "dx32", &dx32, ref, mag, 0, MAG32);
    if (dx16.dev) expect(st, cs, "dx16", &dx16, ref, mag, TOL16, MAG16);
    expect(st, cs, "dw", &dw, dwr, dwm, 0, MAG32);
    expect_intact(cs, "partial", &partial, 0);
    expect_intact(cs, "x", &x, 1);
    expect_intact(cs, "w", &w, 1);
    expect_intact(cs, "rstd", &rstd, 1);
    expect_intact(cs, "dy", &dyb, 1);
    void *mem[] = {xs, gs, xv, wv, dyv, old, dw0, rsv, ref, mag, g, gm, dwr, dwm};
    case_done(st, vec, all, 8, mem, (int)(sizeof mem / sizeof *mem));
}

/* ---- QK-norm + RoPE forward: out = RoPE(w ? bf16(in rstd w) : in), in place without w ---- */
static void case_qk_fwd(tu_rng *rng, stat *st, int64_t M, int64_t T, int64_t H, int64_t d, int has_w, int64_t ld_in,
                        int64_t ld_out, int64_t in_off) {
    const int64_t W = H * d, h2 = d / 2;
    if (!has_w) ld_out = ld_in; /* in place */
    buf in, out, w, rstd, cb, sb;
    buf_make(&in, 1, M, W, ld_in, in_off, 2);
    buf_make(&out, has_w, M, W, ld_out, LEAD, 2);
    buf_make(&w, has_w, 1, W, W, LEAD, 4);
    buf_make(&rstd, 1, 1, M, M, LEAD, 4);
    buf_make(&cb, 1, T, h2, h2, LEAD, 4);
    buf_make(&sb, 1, T, h2, h2, LEAD, 4);
    buf *outp = has_w ? &out : &in;
    double *xs = row_scales(rng, M, -3, 1);
    float *iv = fill(&in, rng, xs, 0, 1), *wv = has_w ? fill(&w, rng, NULL, 1, 0.2) : NULL;
    fill_rope(rng, &cb, &sb);
    upload(&in);
    upload(&w);
    upload(&cb);
    upload(&sb);
    poison(&out);
    poison(&rstd);
    const int mu = pair_units_per_lane(H, d);
    const int vec = !g_legacy && mu && ld_in % 4 == 0 && ld_out % 4 == 0 && al(&in, 8) && al(outp, 8) && al(&w, 16) &&
                    al(&cb, 16) && al(&sb, 16);
    char cs[200];
    snprintf(cs, sizeof cs, "qk_fwd M=%lld T=%lld H=%lld d=%lld %s ld_in=%lld%s ld_out=%lld [%s]", (long long)M,
             (long long)T, (long long)H, (long long)d, has_w ? "norm" : "no norm (in place)", (long long)ld_in,
             in_off % 4 ? " (misaligned)" : "", (long long)ld_out, vec ? "vector" : "scalar");
    const int rc = mg_qk_fwd(M, T, H, d, ptr(&in), ld_in, ptr(&w), ptr(&rstd), ptr(outp), ld_out, ptr(&cb), ptr(&sb),
                             NULL);
    CUDA_OK(cudaDeviceSynchronize());
    TU_CHECK(rc == 0, "%s: launcher returned %d", cs, rc);
    buf *all[] = {&in, &out, &w, &rstd, &cb, &sb};
    for (int i = 0; i < 6; i++) download(all[i]);

    double *ref = dalloc(M * W), *mag = dalloc(M * W), *rref = dalloc(M), *n = dalloc(W);
    for (int64_t r = 0; r < M; r++) {
        const int64_t t = r % T;
        const float *x = iv + r * W;
        for (int64_t j = 0; j < W; j++) n[j] = x[j];
        if (has_w) {
            double ss = 0;
            for (int64_t j = 0; j < W; j++) ss += (double)x[j] * x[j];
            rref[r] = 1.0 / sqrt(ss / (double)W + RMS_EPS);
            for (int64_t j = 0; j < W; j++) n[j] = bf16_round((float)(x[j] * rref[r] * wv[j])); /* the kernel's rounding */
        }
        for (int64_t h = 0; h < H; h++)
            for (int64_t k = 0; k < h2; k++) {
                const int64_t c0 = h * d + k, c1 = c0 + h2;
                const double a = n[c0], b = n[c1], c = tab(&cb, t, k), s = tab(&sb, t, k);
                ref[r * W + c0] = a * c - b * s;
                ref[r * W + c1] = a * s + b * c;
                mag[r * W + c0] = fabs(a * c) + fabs(b * s);
                mag[r * W + c1] = fabs(a * s) + fabs(b * c);
            }
    }
    expect(st, cs, "out", outp, ref, mag, TOL16, has_w ? MAG16_ROUNDED : MAG16);
    if (has_w) {
        expect(st, cs, "rstd", &rstd, rref, NULL, 0, MAG32);
        expect_intact(cs, "in", &in, 1);
        expect_intact(cs, "w", &w, 1);
    } else {
        expect_intact(cs, "rstd (no norm: not written)", &rstd, 1);
    }
    expect_intact(cs, "cos", &cb, 1);
    expect_intact(cs, "sin", &sb, 1);
    void *mem[] = {xs, iv, wv, ref, mag, rref, n};
    case_done(st, vec, all, 6, mem, (int)(sizeof mem / sizeof *mem));
}

/* ---- the gradient before RoPE and QK-norm: g = in16 + add32, RoPE^-1 (rotate), norm backward (w) ---- */
typedef struct qkb {
    int rotate, has_in16, has_add32, has_w, inplace; /* inplace: out16 over in16 (no w) */
    int64_t ld_in, ld_add, ld_out, nchunk, in_off, add_off;
} qkb;

static void case_qk_bwd(tu_rng *rng, stat *st, int64_t M, int64_t T, int64_t H, int64_t d, qkb p) {
    const int64_t W = H * d, h2 = d / 2;
    if (p.inplace) p.ld_out = p.ld_in;
    if (!p.has_in16) p.ld_in = 0;
    if (!p.has_add32) p.ld_add = 0;
    buf in16, add32, x, w, rstd, out16, scratch, partial, dw, cb, sb;
    buf_make(&in16, p.has_in16, M, W, p.ld_in, p.in_off, 2);
    buf_make(&add32, p.has_add32, M, W, p.ld_add, p.add_off, 4);
    buf_make(&x, p.has_w, M, W, W, LEAD, 2);
    buf_make(&w, p.has_w, 1, W, W, LEAD, 4);
    buf_make(&rstd, p.has_w, 1, M, M, LEAD, 4);
    buf_make(&out16, !p.inplace, M, W, p.ld_out, LEAD, 2);
    buf_make(&scratch, p.has_w, M, W, W, LEAD, 4);
    buf_make(&partial, p.has_w, p.nchunk, W, W, LEAD, 4);
    buf_make(&dw, p.has_w, 1, W, W, LEAD, 4);
    buf_make(&cb, 1, T, h2, h2, LEAD, 4);
    buf_make(&sb, 1, T, h2, h2, LEAD, 4);
    buf *outp = p.inplace ? &in16 : &out16;
    double *gs = row_scales(rng, M, -2, 1), *xs = row_scales(rng, M, -3, 1);
    float *iv = p.has_in16 ? fill(&in16, rng, gs, 0, 1) : NULL, *av = p.has_add32 ? fill(&add32, rng, gs, 0, 1) : NULL;
    float *xv = p.has_w ? fill(&x, rng, xs, 0, 1) : NULL, *wv = p.has_w ? fill(&w, rng, NULL, 1, 0.2) : NULL;
    float *dw0 = p.has_w ? fill(&dw, rng, NULL, 0, 1) : NULL, *rsv = p.has_w ? rstd_of(xv, M, W) : NULL;
    for (int64_t r = 0; p.has_w && r < M; r++) put(&rstd, 0, r, rsv[r]);
    fill_rope(rng, &cb, &sb);
    buf *ins[] = {&in16, &add32, &x, &w, &rstd, &dw, &cb, &sb};
    for (int i = 0; i < 8; i++) upload(ins[i]);
    poison(&out16);
    poison(&scratch);
    poison(&partial);
    const int mu = pair_units_per_lane(H, d);
    const int vec = !g_legacy && mu && p.ld_in % 4 == 0 && p.ld_add % 4 == 0 && p.ld_out % 4 == 0 && al(&in16, 8) &&
                    al(&add32, 16) && al(&x, 8) && al(&w, 16) && al(outp, 8) && al(&cb, 16) && al(&sb, 16);
    char cs[240];
    snprintf(cs, sizeof cs, "qk_bwd M=%lld T=%lld H=%lld d=%lld rotate=%d %s%s%s%s ld_in=%lld ld_add=%lld ld_out=%lld%s "
             "nchunk=%lld [%s]", (long long)M, (long long)T, (long long)H, (long long)d, p.rotate,
             p.has_in16 ? "+in16" : "", p.has_add32 ? " +add32" : "", p.has_w ? " +norm" : "",
             p.in_off % 4 || p.add_off % 4 ? " (misaligned)" : "", (long long)p.ld_in, (long long)p.ld_add,
             (long long)p.ld_out, p.inplace ? " (in place)" : "", (long long)p.nchunk, vec ? "vector" : "scalar");
    const int rc = mg_qk_bwd(M, T, H, d, p.rotate, ptr(&in16), p.ld_in, ptr(&add32), p.ld_add, ptr(&x), ptr(&w),
                             ptr(&rstd), ptr(outp), p.ld_out, ptr(&scratch), ptr(&partial), p.nchunk, ptr(&dw),
                             ptr(&cb), ptr(&sb), NULL);
    CUDA_OK(cudaDeviceSynchronize());
    TU_CHECK(rc == 0, "%s: launcher returned %d", cs, rc);
    buf *all[] = {&in16, &add32, &x, &w, &rstd, &out16, &scratch, &partial, &dw, &cb, &sb};
    for (int i = 0; i < 11; i++) download(all[i]);

    double *ref = dalloc(M * W), *mag = dalloc(M * W), *g = dalloc(W), *gm = dalloc(W), *dwr = dalloc(W),
           *dwm = dalloc(W);
    for (int64_t j = 0; p.has_w && j < W; j++) {
        dwr[j] = dw0[j];
        dwm[j] = fabs(dw0[j]);
    }
    for (int64_t r = 0; r < M; r++) {
        const int64_t t = r % T;
        for (int64_t h = 0; h < H; h++)
            for (int64_t k = 0; k < h2; k++) {
                const int64_t c0 = h * d + k, c1 = c0 + h2;
                double a = 0, b = 0, ma = 0, mb = 0;
                if (iv) {
                    a += iv[r * W + c0];
                    b += iv[r * W + c1];
                    ma += fabs(iv[r * W + c0]);
                    mb += fabs(iv[r * W + c1]);
                }
                if (av) {
                    a += av[r * W + c0];
                    b += av[r * W + c1];
                    ma += fabs(av[r * W + c0]);
                    mb += fabs(av[r * W + c1]);
                }
                if (p.rotate) { /* the transpose of the forward rotation */
                    const double c = tab(&cb, t, k), s = tab(&sb, t, k);
                    g[c0] = a * c + b * s;
                    g[c1] = -a * s + b * c;
                    gm[c0] = ma * fabs(c) + mb * fabs(s);
                    gm[c1] = ma * fabs(s) + mb * fabs(c);
                } else {
                    g[c0] = a;
                    g[c1] = b;
                    gm[c0] = ma;
                    gm[c1] = mb;
                }
            }
        if (p.has_w) {
            norm_bwd_ref(W, g, gm, xv + r * W, wv, rsv[r], ref + r * W, mag + r * W, dwr, dwm);
        } else {
            memcpy(ref + r * W, g, sizeof(double) * (size_t)W);
            memcpy(mag + r * W, gm, sizeof(double) * (size_t)W);
        }
    }
    expect(st, cs, "out16", outp, ref, mag, TOL16, MAG16);
    if (p.has_w) {
        expect(st, cs, "dw", &dw, dwr, dwm, 0, MAG32);
        expect_intact(cs, "partial", &partial, 0);
        /* only the scalar fallback uses scratch32: untouched on the vector path (the dispatch made visible) */
        expect_intact(cs, "scratch32 (unused on the vector path)", &scratch, vec);
        expect_intact(cs, "x", &x, 1);
        expect_intact(cs, "w", &w, 1);
        expect_intact(cs, "rstd", &rstd, 1);
    }
    if (!p.inplace) expect_intact(cs, "in16", &in16, 1);
    expect_intact(cs, "add32", &add32, 1);
    expect_intact(cs, "cos", &cb, 1);
    expect_intact(cs, "sin", &sb, 1);
    void *mem[] = {gs, xs, iv, av, xv, wv, dw0, rsv, ref, mag, g, gm, dwr, dwm};
    case_done(st, vec, all, 11, mem, (int)(sizeof mem / sizeof *mem));
}

/* ---- SwiGLU: g = silu(h1) h3; dh3 = dg silu(h1), dh1 = dg h3 s (1 + h1 (1 - s)) ---- */
static void case_swiglu(tu_rng *rng, stat *stf, stat *stb, int64_t n, int64_t h1_off) {
    buf h1, h3, g, dg, dh1, dh3;
    buf_make(&h1, 1, 1, n, n, h1_off, 2);
    buf_make(&h3, 1, 1, n, n, LEAD, 2);
    buf_make(&g, 1, 1, n, n, LEAD, 2);
    buf_make(&dg, 1, 1, n, n, LEAD, 2);
    buf_make(&dh1, 1, 1, n, n, LEAD, 2);
    buf_make(&dh3, 1, 1, n, n, LEAD, 2);
    float *av = fill(&h1, rng, NULL, 0, 3), *bv = fill(&h3, rng, NULL, 0, 1), *gv = fill(&dg, rng, NULL, 0, 1);
    upload(&h1);
    upload(&h3);
    upload(&dg);
    poison(&g);
    poison(&dh1);
    poison(&dh3);
    const int vec = !g_legacy && n % 8 == 0 && al(&h1, 16) && al(&h3, 16) && al(&g, 16) && al(&dg, 16) &&
                    al(&dh1, 16) && al(&dh3, 16);
    char cs[160];
    snprintf(cs, sizeof cs, "swiglu n=%lld%s [%s]", (long long)n, h1_off % 8 ? " (h1 misaligned)" : "",
             vec ? "vector" : "scalar");
    int rc = mg_swiglu_fwd(n, ptr(&h1), ptr(&h3), ptr(&g), NULL);
    TU_CHECK(rc == 0, "%s: forward launcher returned %d", cs, rc);
    rc = mg_swiglu_bwd(n, ptr(&h1), ptr(&h3), ptr(&dg), ptr(&dh1), ptr(&dh3), NULL);
    TU_CHECK(rc == 0, "%s: backward launcher returned %d", cs, rc);
    CUDA_OK(cudaDeviceSynchronize());
    buf *all[] = {&h1, &h3, &g, &dg, &dh1, &dh3};
    for (int i = 0; i < 6; i++) download(all[i]);
    double *gr = dalloc(n), *r1 = dalloc(n), *m1 = dalloc(n), *r3 = dalloc(n);
    for (int64_t i = 0; i < n; i++) {
        const double a = av[i], b = bv[i], e = gv[i], s = 1.0 / (1.0 + exp(-a));
        gr[i] = a * s * b;
        r3[i] = e * a * s;
        r1[i] = e * b * s * (1.0 + a * (1.0 - s));
        m1[i] = fabs(e * b * s) * (1.0 + fabs(a) * (1.0 - s));
    }
    expect(stf, cs, "g", &g, gr, NULL, TOL16, MAG16);
    expect(stb, cs, "dh1", &dh1, r1, m1, TOL16, MAG16);
    expect(stb, cs, "dh3", &dh3, r3, NULL, TOL16, MAG16);
    expect_intact(cs, "h1", &h1, 1);
    expect_intact(cs, "h3", &h3, 1);
    expect_intact(cs, "dg", &dg, 1);
    stb->cases++;
    stb->vec += vec;
    void *mem[] = {av, bv, gv, gr, r1, m1, r3};
    case_done(stf, vec, all, 6, mem, (int)(sizeof mem / sizeof *mem));
}

/* ---- the grids ---- */
static void shape_line(const char *op, const char *shape, const char *path, const stat *s) {
    printf("  %-11s %-16s %-22s %2d cases (%2d vector, %2d scalar), worst err/bound %.3f\n", op, shape, path, s->cases,
           s->vec, s->cases - s->vec, s->worst);
}

static void op_line(const char *op, const stat *s) {
    printf("%-11s %3d cases (%d vector, %d scalar): worst err/bound %.3f (%s); worst rel L2 bf16 %.2e fp32 %.2e\n", op,
           s->cases, s->vec, s->cases - s->vec, s->worst, s->where, s->l2_16, s->l2_32);
}

static void rms_path(char *buf_, size_t n, int64_t D) {
    const int mu = units_per_lane(D);
    if (g_legacy || !mu) snprintf(buf_, n, "(scalar)");
    else snprintf(buf_, n, "(vector MAXU %d)", mu);
}

static void run_rmsnorm(tu_rng *rng, int quick) {
    static const int64_t widths[] = {100, 102, 128, 256, 384, 512, 640, 768, 896, 1024, 1028};
    static const int64_t quick_widths[] = {100, 102, 384, 768, 1024, 1028};
    const int64_t *ws = quick ? quick_widths : widths;
    const int nw = quick ? 6 : 11;
    stat fwd = {0}, bwd = {0};
    for (int i = 0; i < nw; i++) {
        const int64_t D = ws[i];
        const int big = !quick && (D == 384 || D == 768 || D == 1028);
        char shape[32], path[32];
        snprintf(shape, sizeof shape, "D=%lld", (long long)D);
        rms_path(path, sizeof path, D);
        stat f = {0}, b = {0};
        /* forward: residual + stored sum; padded strides; no residual; then two forced onto the scalar path
         * (lda % 4 != 0; a 4-byte-aligned a) */
        case_rmsnorm_fwd(rng, &f, 37, D, D, D, 1, 1, LEAD);
        case_rmsnorm_fwd(rng, &f, 37, D, D + 8, D + 4, 1, 0, LEAD);
        case_rmsnorm_fwd(rng, &f, 37, D, D, D + 12, 0, 0, LEAD);
        case_rmsnorm_fwd(rng, &f, 37, D, D + 2, D, 1, 1, LEAD);
        case_rmsnorm_fwd(rng, &f, 37, D, D, D, 0, 0, LEAD + 2);
        case_rmsnorm_fwd(rng, &f, 1, D, D, D, 1, 1, LEAD);
        case_rmsnorm_fwd(rng, &f, 1, D, D + 4, D + 8, 0, 0, LEAD);
        if (big) case_rmsnorm_fwd(rng, &f, BIG_M, D, D, D, 1, 1, LEAD);
        /* backward (ldx, ldy, ldh, dx32 mode, dx16, nchunk, dy offset): the trainer's in-place and accumulating
         * calls, padded strides, dx32 or dx16 alone; then forced scalar (ldx % 4 != 0; an 8-byte-aligned dy) */
        case_rmsnorm_bwd(rng, &b, 37, D, D, D, D, DX_SET, 1, 512, LEAD);
        case_rmsnorm_bwd(rng, &b, 37, D, D + 4, D + 8, D + 12, DX_ACC, 1, 7, LEAD);
        case_rmsnorm_bwd(rng, &b, 37, D, D, D, D, DX_INPLACE, 1, 512, LEAD);
        case_rmsnorm_bwd(rng, &b, 37, D, D, D + 4, D + 4, DX_NONE, 1, 7, LEAD);
        case_rmsnorm_bwd(rng, &b, 37, D, D + 8, D, D, DX_ACC, 0, 512, LEAD);
        case_rmsnorm_bwd(rng, &b, 37, D, D + 2, D, D, DX_ACC, 1, 7, LEAD);
        case_rmsnorm_bwd(rng, &b, 37, D, D, D, D, DX_SET, 1, 512, LEAD + 2);
        case_rmsnorm_bwd(rng, &b, 1, D, D, D, D, DX_SET, 1, 512, LEAD);
        case_rmsnorm_bwd(rng, &b, 1, D, D, D, D, DX_INPLACE, 1, 7, LEAD);
        if (big) {
            case_rmsnorm_bwd(rng, &b, BIG_M, D, D + 4, D + 8, D + 12, DX_ACC, 1, 7, LEAD);
            case_rmsnorm_bwd(rng, &b, BIG_M, D, D, D, D, DX_INPLACE, 1, 512, LEAD);
        }
        shape_line("rmsnorm_fwd", shape, path, &f);
        shape_line("rmsnorm_bwd", shape, path, &b);
        merge(&fwd, &f);
        merge(&bwd, &b);
    }
    op_line("rmsnorm_fwd", &fwd);
    op_line("rmsnorm_bwd", &bwd);
}

static void run_qk(tu_rng *rng, int quick) {
    /* (H, d): q of 6 heads (D 384), k of 2; q of 12 (D 768), k of 4; 8 x 128 and 16 x 64 (1024 wide, pair units
     * 4); d % 8 != 0 and H d > 1024: the scalar path */
    static const int64_t shapes[][2] = {{6, 64}, {2, 64}, {12, 64}, {4, 64}, {8, 128}, {16, 64}, {3, 36}, {16, 128}};
    stat fwd = {0}, bwd = {0};
    for (int i = 0; i < 8; i++) {
        const int64_t H = shapes[i][0], d = shapes[i][1], W = H * d;
        const int big = !quick && (i == 2 || i == 3 || i == 6);
        char shape[32], path[32];
        snprintf(shape, sizeof shape, "H=%lld d=%lld", (long long)H, (long long)d);
        const int mu = pair_units_per_lane(H, d);
        if (g_legacy || !mu) snprintf(path, sizeof path, "(scalar)");
        else snprintf(path, sizeof path, "(vector pair MAXU %d)", mu);
        stat f = {0}, b = {0};
        /* forward (has_w, ld_in, ld_out, in offset): the trainer's q (dense) and k (into a wider k row), the
         * depth slot's in-place RoPE (ld = L kvd); forced scalar: ld_out % 4 != 0, a 4-byte-aligned in */
        case_qk_fwd(rng, &f, 37, 1024, H, d, 1, W, W, LEAD);
        case_qk_fwd(rng, &f, 37, 13, H, d, 1, W + 8, W + 64, LEAD);
        case_qk_fwd(rng, &f, 37, 13, H, d, 0, W, W, LEAD);
        case_qk_fwd(rng, &f, 37, 1024, H, d, 0, 3 * W, 3 * W, LEAD);
        case_qk_fwd(rng, &f, 37, 13, H, d, 1, W, W + 2, LEAD);
        case_qk_fwd(rng, &f, 37, 13, H, d, 0, W, W, LEAD + 2);
        case_qk_fwd(rng, &f, 1, 1024, H, d, 1, W, W, LEAD);
        case_qk_fwd(rng, &f, 1, 13, H, d, 0, W, W, LEAD);
        if (big) {
            case_qk_fwd(rng, &f, BIG_M, 1024, H, d, 1, W, W, LEAD);
            case_qk_fwd(rng, &f, BIG_M, 13, H, d, 1, W + 8, W + 64, LEAD);
        }
        /* backward: {rotate, in16, add32, w, inplace, ld_in, ld_add, ld_out, nchunk, in_off, add_off} */
        const qkb v[] = {
            {1, 1, 0, 1, 0, W, 0, W, 512, LEAD, LEAD},            /* dq with QK-norm */
            {1, 1, 1, 1, 0, W + 8, 3 * W, W + 4, 7, LEAD, LEAD},  /* dk + the depth slot's gradient, QK-norm */
            {1, 0, 1, 0, 0, 0, 2 * W, W, 512, LEAD, LEAD},        /* the depth slot's dk alone */
            {0, 1, 1, 0, 1, W, W + 4, W, 512, LEAD, LEAD},        /* dv + the depth slot's, in place */
            {0, 1, 0, 1, 0, W, 0, W + 8, 7, LEAD, LEAD},          /* the norm without RoPE */
            {1, 1, 1, 1, 0, W + 2, W, W, 7, LEAD, LEAD},          /* forced scalar: ld_in % 4 != 0 */
            {1, 1, 1, 0, 0, W, W, W, 512, LEAD, LEAD + 2},        /* forced scalar: 8-byte-aligned add32 */
            {1, 1, 1, 0, 0, W, W, W + 8, 512, LEAD, LEAD},        /* no norm, padded out: the scalar fallback
                                                                   * once wrote dense rows here */
        };
        for (int k = 0; k < (int)(sizeof v / sizeof v[0]); k++) case_qk_bwd(rng, &b, 37, k % 2 ? 13 : 1024, H, d, v[k]);
        case_qk_bwd(rng, &b, 1, 1024, H, d, v[0]);
        case_qk_bwd(rng, &b, 1, 13, H, d, v[3]);
        if (big) {
            case_qk_bwd(rng, &b, BIG_M, 1024, H, d, v[0]);
            case_qk_bwd(rng, &b, BIG_M, 13, H, d, v[1]);
        }
        shape_line("qk_fwd", shape, path, &f);
        shape_line("qk_bwd", shape, path, &b);
        merge(&fwd, &f);
        merge(&bwd, &b);
    }
    op_line("qk_fwd", &fwd);
    op_line("qk_bwd", &bwd);
}

static void run_swiglu(tu_rng *rng, int quick) {
    stat f = {0}, b = {0};
    case_swiglu(rng, &f, &b, 37 * 1536, LEAD);
    case_swiglu(rng, &f, &b, 8, LEAD);
    case_swiglu(rng, &f, &b, 37 * 1536, LEAD + 4); /* 8-byte-aligned h1: scalar */
    case_swiglu(rng, &f, &b, 1001, LEAD);          /* n % 8: scalar */
    case_swiglu(rng, &f, &b, 12, LEAD);
    case_swiglu(rng, &f, &b, 1, LEAD);
    if (!quick) case_swiglu(rng, &f, &b, (int64_t)BIG_M * 1024, LEAD);
    op_line("swiglu_fwd", &f);
    op_line("swiglu_bwd", &b);
}

int main(void) {
    if (moda_cuda_device_count() <= 0) {
        printf("gpu_test_model_kernels: no CUDA device; nothing to run\n");
        return 0;
    }
    tu_rng rng = tu_rng_from_env("gpu_test_model_kernels");
    const int quick = tu_quick();
    g_legacy = mg_elem_legacy();
    if (g_legacy) printf("MODA_GPU_ELEM_LEGACY=1: every case expects the scalar kernels\n");
    run_rmsnorm(&rng, quick);
    run_qk(&rng, quick);
    run_swiglu(&rng, quick);
    return tu_finish("gpu_test_model_kernels");
}
