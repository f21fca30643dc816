/*
 * kernels.h - the model's math kernels on the CPU, written once for an element type REAL (float or double)
 * and included by model_core.h. Each kernel is a pure function of its buffers so that a GPU backend can
 * provide the same set (one file of kernels per device) without touching the model's control flow.
 *
 * Determinism: every output element is produced by one thread in a fixed order (row-parallel loops; the
 * reductions over rows that produce weight gradients are column-parallel), so results do not depend on the
 * thread count.
 *
 * Expects: REAL, KN(name) (suffixes a name with the type), GEMM_FN (cblas_sgemm or cblas_dgemm).
 */
#include <cblas.h>
#include <math.h>
#include <string.h>

#define RMS_EPS 1e-6

/* expf for float (the hot SwiGLU and softmax loops), exp for double; the branch folds at compile time */
static inline REAL KN(exp)(REAL x) { return sizeof(REAL) == sizeof(float) ? (REAL)expf((float)x) : (REAL)exp((double)x); }

/* C[M,N] = alpha op(A) op(B) + beta C, row-major */
static void KN(gemm)(int ta, int tb, int64_t M, int64_t N, int64_t K, double alpha, const REAL *A, int64_t lda,
                     const REAL *B, int64_t ldb, double beta, REAL *C, int64_t ldc) {
    if (M == 0 || N == 0) return;
    GEMM_FN(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K,
            (REAL)alpha, A, (int)lda, B, (int)ldb, (REAL)beta, C, (int)ldc);
}

/* y = x / rms(x) * w per row; rstd = 1 / rms */
static void KN(rmsnorm_fwd)(int64_t M, int64_t D, const REAL *x, int64_t ldx, const REAL *w, REAL *y, int64_t ldy,
                            REAL *rstd) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; r++) {
        const REAL *xr = x + r * ldx;
        REAL *yr = y + r * ldy;
        REAL ss = 0;
        for (int64_t j = 0; j < D; j++) ss += xr[j] * xr[j];
        REAL rs = (REAL)(1.0 / sqrt((double)(ss / (REAL)D) + RMS_EPS));
        rstd[r] = rs;
        for (int64_t j = 0; j < D; j++) yr[j] = xr[j] * rs * w[j];
    }
}

/* dx (= or +=) d/dx of rmsnorm given dy; dw += sum over rows of dy * xhat */
static void KN(rmsnorm_bwd)(int64_t M, int64_t D, const REAL *x, int64_t ldx, const REAL *w, const REAL *rstd,
                            const REAL *dy, int64_t ldy, REAL *dx, int64_t lddx, int accumulate, REAL *dw) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; r++) {
        const REAL *xr = x + r * ldx, *gr = dy + r * ldy;
        REAL *dr = dx + r * lddx;
        REAL rs = rstd[r], dot = 0;
        for (int64_t j = 0; j < D; j++) dot += gr[j] * w[j] * xr[j] * rs;
        dot /= (REAL)D;
        for (int64_t j = 0; j < D; j++) {
            REAL v = rs * (gr[j] * w[j] - xr[j] * rs * dot);
            dr[j] = accumulate ? dr[j] + v : v;
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < D; j++) {
        REAL s = 0;
        for (int64_t r = 0; r < M; r++) s += dy[r * ldy + j] * x[r * ldx + j] * rstd[r];
        dw[j] += s;
    }
}

/* Rotary embedding in place on M rows of H heads of d (row stride ld); row r is position r % T. Pairs are
 * (i, i + d/2). inverse = 1 applies the transpose rotation (the backward of the forward rotation). */
static void KN(rope)(int64_t M, int64_t T, int64_t H, int64_t d, REAL *x, int64_t ld, const REAL *cosv,
                     const REAL *sinv, int inverse) {
    const int64_t h2 = d / 2;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; r++) {
        const REAL *c = cosv + (r % T) * h2, *s = sinv + (r % T) * h2;
        for (int64_t h = 0; h < H; h++) {
            REAL *p = x + r * ld + h * d;
            for (int64_t i = 0; i < h2; i++) {
                REAL a = p[i], b = p[i + h2], si = inverse ? -s[i] : s[i];
                p[i] = a * c[i] - b * si;
                p[i + h2] = a * si + b * c[i];
            }
        }
    }
}

static inline REAL KN(sigmoid)(REAL a) { return (REAL)1 / ((REAL)1 + KN(exp)(-a)); }

static void KN(swiglu_fwd)(int64_t n, const REAL *h1, const REAL *h3, REAL *g) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) g[i] = h1[i] * KN(sigmoid)(h1[i]) * h3[i];
}

static void KN(swiglu_bwd)(int64_t n, const REAL *h1, const REAL *h3, const REAL *dg, REAL *dh1, REAL *dh3) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        REAL s = KN(sigmoid)(h1[i]);
        dh3[i] = dg[i] * h1[i] * s;
        dh1[i] = dg[i] * h3[i] * s * ((REAL)1 + h1[i] * ((REAL)1 - s));
    }
}

/* dst[r, :n] += src[r, :n] */
static void KN(add_rows)(int64_t M, int64_t n, REAL *dst, int64_t ldd, const REAL *src, int64_t lds) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; r++)
        for (int64_t j = 0; j < n; j++) dst[r * ldd + j] += src[r * lds + j];
}

/* dst = a + b (rows of n) */
static void KN(sum_rows)(int64_t M, int64_t n, REAL *dst, const REAL *a, const REAL *b) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M * n; i++) dst[i] = a[i] + b[i];
}

/* Cross-entropy of `rows` rows of logits [rows, V]: per-row losses into rowloss; with grad, the logits are
 * replaced by d(mean loss)/d(logits) = (softmax - onehot) * inv_count. */
static void KN(cross_entropy)(int64_t rows, int64_t V, REAL *logits, const int32_t *targets, double *rowloss,
                              int grad, double inv_count) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        REAL *z = logits + r * V;
        REAL mx = z[0];
        for (int64_t j = 1; j < V; j++) mx = z[j] > mx ? z[j] : mx;
        REAL s = 0;
        for (int64_t j = 0; j < V; j++) s += KN(exp)(z[j] - mx);
        double lse = (double)mx + log((double)s);
        rowloss[r] = lse - (double)z[targets[r]];
        if (grad) {
            const REAL shift = (REAL)lse, scale = (REAL)inv_count;
            for (int64_t j = 0; j < V; j++) z[j] = KN(exp)(z[j] - shift) * scale;
            z[targets[r]] -= (REAL)inv_count;
        }
    }
}
