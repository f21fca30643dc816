/*
 * gpu_kernels.h - the model's CUDA kernels (gpu_kernels.cu), callable from the host control flow in
 * model_gpu.c. Every launcher enqueues on the given stream, never synchronises and never allocates; it returns
 * the launch's cudaError_t as an int (0 = success) so that the caller can turn it into a moda_status.
 *
 * Types: "h" buffers are bf16 (uint16_t bit patterns on the host side), "f" buffers float32. Rows are tokens;
 * every kernel that reduces does it in a fixed order (one thread or one warp owns each output), so results are
 * bitwise reproducible run to run.
 */
#ifndef MODA_GPU_KERNELS_H
#define MODA_GPU_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef uint16_t moda_bf16_t;

/* x[r, :] = wte16[tok[r], :] */
int mg_embed_fwd(int64_t M, int64_t D, const int32_t *tok, const moda_bf16_t *wte, moda_bf16_t *x, void *stream);
/* dwte[uniq[u], :] += the sum of dx[rows[k], :] over token u's rows, deterministically: segment s covers
 * rows[segb[s] .. segb[s+1]) (one token, row order) and is summed into partial[s, :]; token u owns segments
 * segoff[u] .. segoff[u+1] and adds them in order. partial holds nseg rows of D. */
#define MODA_EMB_SEG 64
int mg_embed_bwd(int64_t nuniq, int64_t nseg, int64_t D, const int32_t *uniq, const int32_t *segoff,
                 const int32_t *segb, const int32_t *rows, const float *dx, float *partial, float *dwte, void *stream);

/* s = a (+ b when b != NULL, rounded to bf16 and stored in sum when sum != NULL); y = s * rstd * w;
 * rstd = 1 / sqrt(mean(s^2) + 1e-6). a has row stride lda, y ldy; b and sum are dense [M, D]. */
int mg_rmsnorm_fwd(int64_t M, int64_t D, const moda_bf16_t *a, int64_t lda, const moda_bf16_t *b, moda_bf16_t *sum,
                   const float *w, moda_bf16_t *y, int64_t ldy, float *rstd, void *stream);
/* g = rstd * (dy * w - x * rstd * mean(dy * w * x * rstd)); dx32 (= or +=, accumulate) and/or dx16 = bf16(the
 * new dx32 value, or g when dx32 is NULL). dy may equal dx32 (in place). */
int mg_rmsnorm_bwd_dx(int64_t M, int64_t D, const moda_bf16_t *x, int64_t ldx, const float *w, const float *rstd,
                      const float *dy, int64_t ldy, float *dx32, int accumulate, moda_bf16_t *dx16, int64_t ld16,
                      void *stream);
/* dw[j] += sum_r dy[r, j] * x[r, j] * rstd[r], in two fixed-order passes through partial[nchunk * D] */
int mg_rmsnorm_bwd_dw(int64_t M, int64_t D, const moda_bf16_t *x, int64_t ldx, const float *rstd, const float *dy,
                      int64_t ldy, float *partial, int64_t nchunk, float *dw, void *stream);

/* Both gradients of an RMSNorm (mg_rmsnorm_bwd_dx and mg_rmsnorm_bwd_dw in one pass where the row fits the
 * vector kernels: dw's chunk partials come from the values read for dx). dy may equal dx32 (in place). */
int mg_rmsnorm_bwd(int64_t M, int64_t D, const moda_bf16_t *x, int64_t ldx, const float *w, const float *rstd,
                   const float *dy, int64_t ldy, float *dx32, int accumulate, moda_bf16_t *dx16, int64_t ldh,
                   float *partial, int64_t nchunk, float *dw, void *stream);
/* out = RoPE(w != NULL ? bf16(RMSNorm(in) * w) : in) on M rows of H heads of d, rstd written with the norm;
 * without the norm in must equal out (in place, ld_in == ld_out). */
int mg_qk_fwd(int64_t M, int64_t T, int64_t H, int64_t d, const moda_bf16_t *in, int64_t ld_in, const float *w,
              float *rstd, moda_bf16_t *out, int64_t ld_out, const float *cosv, const float *sinv, void *stream);
/* g = (in16 ? in16 : 0) + (add32 ? add32 : 0), inversely rotated with rotate; with w != NULL the backward of the
 * norm whose input was x (dense rows of H*d) and statistics rstd: out16 = its input gradient, dw += its weight
 * gradient (partial: nchunk * H*d floats of scratch); without w, out16 = bf16(g) (in place allowed).
 * scratch32 (dense [M, H*d] fp32) is used only by the scalar fallback with w. */
int mg_qk_bwd(int64_t M, int64_t T, int64_t H, int64_t d, int rotate, const moda_bf16_t *in16, int64_t ld_in,
              const float *add32, int64_t ld_add, const moda_bf16_t *x, const float *w, const float *rstd,
              moda_bf16_t *out16, int64_t ld_out, float *scratch32, float *partial, int64_t nchunk, float *dw,
              const float *cosv, const float *sinv, void *stream);
/* 1 when MODA_GPU_ELEM_LEGACY=1 (read once): every launcher takes the scalar kernels of the first version */
int mg_elem_legacy(void);

/* RoPE in place on M rows of H heads of d (row stride ld), pairs (i, i + d/2), row r at position r % T */
int mg_rope_fwd(int64_t M, int64_t T, int64_t H, int64_t d, moda_bf16_t *x, int64_t ld, const float *cosv,
                const float *sinv, void *stream);
/* g = (in16 ? in16 : 0) + (add32 ? add32 : 0); with rotate, the inverse rotation of g; written to out32 (dense
 * rows of H*d) and/or out16 (rows of stride ld_out16; in place over in16 allowed with ld_out16 == ld_in). */
int mg_grad_combine(int64_t M, int64_t T, int64_t H, int64_t d, int rotate, const moda_bf16_t *in16, int64_t ld_in,
                    const float *add32, int64_t ld_add, float *out32, moda_bf16_t *out16, int64_t ld_out16,
                    const float *cosv, const float *sinv, void *stream);

int mg_swiglu_fwd(int64_t n, const moda_bf16_t *h1, const moda_bf16_t *h3, moda_bf16_t *g, void *stream);
int mg_swiglu_bwd(int64_t n, const moda_bf16_t *h1, const moda_bf16_t *h3, const moda_bf16_t *dg, moda_bf16_t *dh1,
                  moda_bf16_t *dh3, void *stream);
/* dst[i] += src[i]; dst16 (if not NULL) = bf16(new dst) */
int mg_add_f32(int64_t n, float *dst, const float *src, moda_bf16_t *dst16, void *stream);
int mg_f32_to_bf16(int64_t n, const float *src, moda_bf16_t *dst, void *stream);

/* Cross-entropy of rows of fp32 logits [rows, V]: rowloss[r] = lse - z[tgt]; with dlogits != NULL,
 * dlogits = (softmax - onehot) * scale in bf16. */
int mg_cross_entropy(int64_t rows, int64_t V, const float *logits, const int32_t *tgt, float *rowloss,
                     moda_bf16_t *dlogits, float scale, void *stream);
/* *acc += sum of x[0 .. n) (one block, fixed order) */
int mg_sum_to(int64_t n, const float *x, double *acc, void *stream);

/* The optimiser works on chunks of one tensor each: start, length, weight-decay flag. */
typedef struct mg_chunk {
    int64_t start, len;
    int decay;
    int pad;
} mg_chunk;
/* partial[c] = sum of g^2 over chunk c; then *norm = sqrt(sum of partials) (fixed order) */
int mg_grad_norm(int64_t nchunks, const mg_chunk *chunks, const float *g, double *partial, double *norm,
                 void *stream);
/* AdamW with clipping at `clip` using *norm; skipped entirely when *skip_if_nan is not finite (a diverged
 * loss leaves the parameters unchanged). p16 = bf16(p). */
int mg_adamw(int64_t nchunks, const mg_chunk *chunks, float *p, moda_bf16_t *p16, const float *g, float *m, float *v,
             const double *norm, const double *skip_if_nan, float clip, float lr, float b1, float b2, float eps,
             float wd, float c1, float c2, void *stream);

#ifdef __cplusplus
}
#endif

#endif
