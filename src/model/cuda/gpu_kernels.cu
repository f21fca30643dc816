/*
 * gpu_kernels.cu - the model's element-wise and reduction kernels on CUDA (the GEMMs are cuBLASLt's and the
 * attention is libmoda's operator). C-style: plain __global__ functions and extern "C" launchers.
 *
 * Precision: bf16 storage, fp32 arithmetic inside every kernel; norms, softmax and optimiser state in fp32,
 * sums of squares for the gradient norm in double. Determinism: no atomics; each output element is written by
 * one thread (or one warp, reduced by shuffles in a fixed tree), so the results repeat bit for bit.
 */
#include "gpu_kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>

#define RMS_EPS 1e-6f

static __device__ __forceinline__ float ld16(const moda_bf16_t *p, int64_t i) {
    return __bfloat162float(__ushort_as_bfloat16(p[i]));
}
static __device__ __forceinline__ moda_bf16_t to16(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
static __device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

static int launched(void) { return (int)cudaGetLastError(); }
static unsigned blocks_for(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    if (b > 65535LL * 32) b = 65535LL * 32; /* grid-stride loops cover the rest */
    return (unsigned)(b < 1 ? 1 : b);
}

/* ---- embedding ---- */
__global__ void k_embed_fwd(int64_t M, int64_t D, const int32_t *tok, const moda_bf16_t *wte, moda_bf16_t *x) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < M * D; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / D, j = i - r * D;
        x[i] = wte[(int64_t)tok[r] * D + j];
    }
}

/* the embedding's backward in two deterministic passes: every segment (at most EMB_SEG rows of one token, in
 * row order) sums its rows into partial[seg]; every distinct token then adds its segments in order */
__global__ void k_embed_bwd_seg(int64_t D, const int32_t *segb, const int32_t *rows, const float *dx, float *partial) {
    const int64_t sg = blockIdx.x;
    const int32_t a = segb[sg], b = segb[sg + 1];
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
        float s = 0;
        for (int32_t k = a; k < b; k++) s += dx[(int64_t)rows[k] * D + j];
        partial[sg * D + j] = s;
    }
}

__global__ void k_embed_bwd_tok(int64_t D, const int32_t *uniq, const int32_t *segoff, const float *partial,
                                float *dwte) {
    const int64_t u = blockIdx.x;
    float *dst = dwte + (int64_t)uniq[u] * D;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
        float s = dst[j];
        for (int32_t k = segoff[u]; k < segoff[u + 1]; k++) s += partial[(int64_t)k * D + j];
        dst[j] = s;
    }
}

int mg_embed_fwd(int64_t M, int64_t D, const int32_t *tok, const moda_bf16_t *wte, moda_bf16_t *x, void *stream) {
    k_embed_fwd<<<blocks_for(M * D, 256), 256, 0, (cudaStream_t)stream>>>(M, D, tok, wte, x);
    return launched();
}

int mg_embed_bwd(int64_t nuniq, int64_t nseg, int64_t D, const int32_t *uniq, const int32_t *segoff,
                 const int32_t *segb, const int32_t *rows, const float *dx, float *partial, float *dwte, void *stream) {
    if (nuniq <= 0) return 0;
    const int threads = D >= 256 ? 256 : 128;
    k_embed_bwd_seg<<<(unsigned)nseg, threads, 0, (cudaStream_t)stream>>>(D, segb, rows, dx, partial);
    k_embed_bwd_tok<<<(unsigned)nuniq, threads, 0, (cudaStream_t)stream>>>(D, uniq, segoff, partial, dwte);
    return launched();
}

/* ---- RMSNorm: one warp per row ---- */
__global__ void k_rmsnorm_fwd(int64_t M, int64_t D, const moda_bf16_t *a, int64_t lda, const moda_bf16_t *b,
                              moda_bf16_t *sum, const float *w, moda_bf16_t *y, int64_t ldy, float *rstd) {
    const int64_t r = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (r >= M) return;
    const moda_bf16_t *ar = a + r * lda;
    float ss = 0;
    for (int64_t j = lane; j < D; j += 32) {
        float s = ld16(ar, j);
        if (b) {
            s = __bfloat162float(__float2bfloat16_rn(s + ld16(b, r * D + j))); /* the stored residual */
            if (sum) sum[r * D + j] = to16(s);
        }
        ss += s * s;
    }
    ss = warp_sum(ss);
    const float rs = rsqrtf(ss / (float)D + RMS_EPS);
    if (lane == 0) rstd[r] = rs;
    for (int64_t j = lane; j < D; j += 32) {
        float s = ld16(ar, j);
        if (b) s = __bfloat162float(__float2bfloat16_rn(s + ld16(b, r * D + j)));
        y[r * ldy + j] = to16(s * rs * w[j]);
    }
}

__global__ void k_rmsnorm_bwd_dx(int64_t M, int64_t D, const moda_bf16_t *x, int64_t ldx, const float *w,
                                 const float *rstd, const float *dy, int64_t ldy, float *dx32, int accumulate,
                                 moda_bf16_t *dx16, int64_t ldh) {
    const int64_t r = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (r >= M) return;
    const moda_bf16_t *xr = x + r * ldx;
    const float *gr = dy + r * ldy;
    const float rs = rstd[r];
    float dot = 0;
    for (int64_t j = lane; j < D; j += 32) dot += gr[j] * w[j] * ld16(xr, j) * rs;
    dot = warp_sum(dot) / (float)D;
    /* each lane rewrites only the elements it read, so dy == dx32 is safe */
    for (int64_t j = lane; j < D; j += 32) {
        float v = rs * (gr[j] * w[j] - ld16(xr, j) * rs * dot);
        if (dx32) {
            float *d = dx32 + r * D + j;
            v = accumulate ? *d + v : v;
            *d = v;
        }
        if (dx16) dx16[r * ldh + j] = to16(v);
    }
}

/* The weight gradient of a norm, sum over rows of dy * x * rstd, in two fixed-order passes. A CTA of 32 x 8
 * threads owns 32 columns of one chunk of rows; thread (c, y) walks rows y, y + 8, ... of the chunk, and the 8
 * partial sums are added in y order. Many short chunks keep enough loads in flight: one thread per column
 * walking all rows (the first version) was latency-bound and cost about 0.2 ms a call. */
#define DW_COLS 32
#define DW_ROWS 8
__global__ void k_rmsnorm_dw_partial(int64_t M, int64_t D, const moda_bf16_t *x, int64_t ldx, const float *rstd,
                                     const float *dy, int64_t ldy, float *partial, int64_t rows_per_chunk) {
    __shared__ float sh[DW_ROWS][DW_COLS];
    const int64_t j = blockIdx.x * (int64_t)DW_COLS + threadIdx.x, c = blockIdx.y;
    const int64_t r0 = c * rows_per_chunk, r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
    float s = 0;
    if (j < D)
        for (int64_t r = r0 + threadIdx.y; r < r1; r += DW_ROWS) s += dy[r * ldy + j] * ld16(x, r * ldx + j) * rstd[r];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < D) {
        float t = 0;
        for (int y = 0; y < DW_ROWS; y++) t += sh[y][threadIdx.x];
        partial[c * D + j] = t;
    }
}

/* the chunks' partials: 32 threads per column, each a strided subset of the chunks, added in a fixed order */
#define DW_RED 32
__global__ void k_rmsnorm_dw_reduce(int64_t D, int64_t nchunk, const float *partial, float *dw) {
    __shared__ float sh[DW_RED][DW_COLS + 1];
    const int64_t j = blockIdx.x * (int64_t)DW_COLS + threadIdx.x;
    float s = 0;
    if (j < D)
        for (int64_t c = threadIdx.y; c < nchunk; c += DW_RED) s += partial[c * D + j];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < D) {
        float t = 0;
        for (int y = 0; y < DW_RED; y++) t += sh[y][threadIdx.x];
        dw[j] += t;
    }
}

int mg_rmsnorm_fwd(int64_t M, int64_t D, const moda_bf16_t *a, int64_t lda, const moda_bf16_t *b, moda_bf16_t *sum,
                   const float *w, moda_bf16_t *y, int64_t ldy, float *rstd, void *stream) {
    k_rmsnorm_fwd<<<(unsigned)((M + 7) / 8), 256, 0, (cudaStream_t)stream>>>(M, D, a, lda, b, sum, w, y, ldy, rstd);
    return launched();
}

int mg_rmsnorm_bwd_dx(int64_t M, int64_t D, const moda_bf16_t *x, int64_t ldx, const float *w, const float *rstd,
                      const float *dy, int64_t ldy, float *dx32, int accumulate, moda_bf16_t *dx16, int64_t ldh,
                      void *stream) {
    k_rmsnorm_bwd_dx<<<(unsigned)((M + 7) / 8), 256, 0, (cudaStream_t)stream>>>(M, D, x, ldx, w, rstd, dy, ldy, dx32,
                                                                                accumulate, dx16, ldh);
    return launched();
}

int mg_rmsnorm_bwd_dw(int64_t M, int64_t D, const moda_bf16_t *x, int64_t ldx, const float *rstd, const float *dy,
                      int64_t ldy, float *partial, int64_t nchunk, float *dw, void *stream) {
    const int64_t rpc = (M + nchunk - 1) / nchunk;
    const int64_t used = (M + rpc - 1) / rpc;
    const dim3 block(DW_COLS, DW_ROWS), grid((unsigned)((D + DW_COLS - 1) / DW_COLS), (unsigned)used);
    k_rmsnorm_dw_partial<<<grid, block, 0, (cudaStream_t)stream>>>(M, D, x, ldx, rstd, dy, ldy, partial, rpc);
    k_rmsnorm_dw_reduce<<<(unsigned)((D + DW_COLS - 1) / DW_COLS), dim3(DW_COLS, DW_RED), 0, (cudaStream_t)stream>>>(
        D, used, partial, dw);
    return launched();
}

/* ---- RoPE ---- */
__global__ void k_rope_fwd(int64_t M, int64_t T, int64_t H, int64_t d, moda_bf16_t *x, int64_t ld, const float *cosv,
                           const float *sinv) {
    const int64_t h2 = d / 2, per_row = H * h2;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < M * per_row;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / per_row, rem = i - r * per_row, h = rem / h2, k = rem - h * h2, t = r % T;
        moda_bf16_t *p = x + r * ld + h * d;
        float a = ld16(p, k), b = ld16(p, k + h2), c = cosv[t * h2 + k], s = sinv[t * h2 + k];
        p[k] = to16(a * c - b * s);
        p[k + h2] = to16(a * s + b * c);
    }
}

__global__ void k_grad_combine(int64_t M, int64_t T, int64_t H, int64_t d, int rotate, const moda_bf16_t *in16,
                               int64_t ld_in, const float *add32, int64_t ld_add, float *out32, moda_bf16_t *out16,
                               const float *cosv, const float *sinv) {
    const int64_t h2 = d / 2, per_row = H * h2, w = H * d;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < M * per_row;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / per_row, rem = i - r * per_row, h = rem / h2, k = rem - h * h2, t = r % T;
        int64_t c0 = h * d + k, c1 = c0 + h2;
        float a = 0, b = 0;
        if (in16) {
            a = ld16(in16, r * ld_in + c0);
            b = ld16(in16, r * ld_in + c1);
        }
        if (add32) {
            a += add32[r * ld_add + c0];
            b += add32[r * ld_add + c1];
        }
        if (rotate) { /* transpose rotation: the backward of the forward one */
            float c = cosv[t * h2 + k], s = sinv[t * h2 + k];
            float na = a * c + b * s, nb = -a * s + b * c;
            a = na;
            b = nb;
        }
        if (out32) {
            out32[r * w + c0] = a;
            out32[r * w + c1] = b;
        }
        if (out16) {
            out16[r * w + c0] = to16(a);
            out16[r * w + c1] = to16(b);
        }
    }
}

int mg_rope_fwd(int64_t M, int64_t T, int64_t H, int64_t d, moda_bf16_t *x, int64_t ld, const float *cosv,
                const float *sinv, void *stream) {
    k_rope_fwd<<<blocks_for(M * H * (d / 2), 256), 256, 0, (cudaStream_t)stream>>>(M, T, H, d, x, ld, cosv, sinv);
    return launched();
}

int mg_grad_combine(int64_t M, int64_t T, int64_t H, int64_t d, int rotate, const moda_bf16_t *in16, int64_t ld_in,
                    const float *add32, int64_t ld_add, float *out32, moda_bf16_t *out16, const float *cosv,
                    const float *sinv, void *stream) {
    k_grad_combine<<<blocks_for(M * H * (d / 2), 256), 256, 0, (cudaStream_t)stream>>>(
        M, T, H, d, rotate, in16, ld_in, add32, ld_add, out32, out16, cosv, sinv);
    return launched();
}

/* ---- SwiGLU, adds, conversions ---- */
__global__ void k_swiglu_fwd(int64_t n, const moda_bf16_t *h1, const moda_bf16_t *h3, moda_bf16_t *g) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float a = ld16(h1, i), s = 1.0f / (1.0f + __expf(-a));
        g[i] = to16(a * s * ld16(h3, i));
    }
}

__global__ void k_swiglu_bwd(int64_t n, const moda_bf16_t *h1, const moda_bf16_t *h3, const moda_bf16_t *dg,
                             moda_bf16_t *dh1, moda_bf16_t *dh3) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float a = ld16(h1, i), b = ld16(h3, i), gd = ld16(dg, i), s = 1.0f / (1.0f + __expf(-a));
        dh3[i] = to16(gd * a * s);
        dh1[i] = to16(gd * b * s * (1.0f + a * (1.0f - s)));
    }
}

__global__ void k_add_f32(int64_t n, float *dst, const float *src, moda_bf16_t *dst16) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v = dst[i] + src[i];
        dst[i] = v;
        if (dst16) dst16[i] = to16(v);
    }
}

__global__ void k_f32_to_bf16(int64_t n, const float *src, moda_bf16_t *dst) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = to16(src[i]);
}

int mg_swiglu_fwd(int64_t n, const moda_bf16_t *h1, const moda_bf16_t *h3, moda_bf16_t *g, void *stream) {
    k_swiglu_fwd<<<blocks_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, h1, h3, g);
    return launched();
}

int mg_swiglu_bwd(int64_t n, const moda_bf16_t *h1, const moda_bf16_t *h3, const moda_bf16_t *dg, moda_bf16_t *dh1,
                  moda_bf16_t *dh3, void *stream) {
    k_swiglu_bwd<<<blocks_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, h1, h3, dg, dh1, dh3);
    return launched();
}

int mg_add_f32(int64_t n, float *dst, const float *src, moda_bf16_t *dst16, void *stream) {
    k_add_f32<<<blocks_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, dst, src, dst16);
    return launched();
}

int mg_f32_to_bf16(int64_t n, const float *src, moda_bf16_t *dst, void *stream) {
    k_f32_to_bf16<<<blocks_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, src, dst);
    return launched();
}

/* ---- cross-entropy: one block of 256 threads per row ---- */
static __device__ float block_reduce(float v, float *sh, int is_max) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads(); /* sh may still be read from a previous reduction */
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    float r = lane < nw ? sh[lane] : (is_max ? -INFINITY : 0.0f);
    if (wid == 0) r = is_max ? warp_max(r) : warp_sum(r);
    if (threadIdx.x == 0) sh[32] = r;
    __syncthreads();
    return sh[32];
}

__global__ void k_cross_entropy(int64_t V, const float *logits, const int32_t *tgt, float *rowloss,
                                moda_bf16_t *dlogits, float scale) {
    __shared__ float sh[33];
    const int64_t r = blockIdx.x;
    const float *z = logits + r * V;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, z[j]);
    mx = block_reduce(mx, sh, 1);
    float s = 0;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s += __expf(z[j] - mx);
    s = block_reduce(s, sh, 0);
    const float lse = mx + logf(s);
    const int32_t t = tgt[r];
    if (threadIdx.x == 0) rowloss[r] = lse - z[t];
    if (dlogits) {
        moda_bf16_t *dz = dlogits + r * V;
        for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
            float p = __expf(z[j] - lse);
            dz[j] = to16((p - (j == t ? 1.0f : 0.0f)) * scale);
        }
    }
}

int mg_cross_entropy(int64_t rows, int64_t V, const float *logits, const int32_t *tgt, float *rowloss,
                     moda_bf16_t *dlogits, float scale, void *stream) {
    if (rows <= 0) return 0;
    k_cross_entropy<<<(unsigned)rows, 256, 0, (cudaStream_t)stream>>>(V, logits, tgt, rowloss, dlogits, scale);
    return launched();
}

__global__ void k_sum_to(int64_t n, const float *x, double *acc) {
    __shared__ double sh[256];
    double s = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += (double)x[i];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if ((int)threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) *acc += sh[0];
}

int mg_sum_to(int64_t n, const float *x, double *acc, void *stream) {
    k_sum_to<<<1, 256, 0, (cudaStream_t)stream>>>(n, x, acc);
    return launched();
}

/* ---- optimiser ---- */
__global__ void k_sumsq(const mg_chunk *chunks, const float *g, double *partial) {
    __shared__ double sh[256];
    const mg_chunk c = chunks[blockIdx.x];
    double s = 0;
    for (int64_t i = threadIdx.x; i < c.len; i += blockDim.x) {
        double x = (double)g[c.start + i];
        s += x * x;
    }
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if ((int)threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

__global__ void k_norm_final(int64_t n, const double *partial, double *norm) {
    __shared__ double sh[256];
    double s = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if ((int)threadIdx.x < k) sh[threadIdx.x] += sh[threadIdx.x + k];
        __syncthreads();
    }
    if (threadIdx.x == 0) *norm = sqrt(sh[0]);
}

int mg_grad_norm(int64_t nchunks, const mg_chunk *chunks, const float *g, double *partial, double *norm,
                 void *stream) {
    k_sumsq<<<(unsigned)nchunks, 256, 0, (cudaStream_t)stream>>>(chunks, g, partial);
    k_norm_final<<<1, 256, 0, (cudaStream_t)stream>>>(nchunks, partial, norm);
    return launched();
}

__global__ void k_adamw(const mg_chunk *chunks, float *p, moda_bf16_t *p16, const float *g, float *m, float *v,
                        const double *norm, const double *skip_if_nan, float clip, float lr, float b1, float b2,
                        float eps, float wd, float c1, float c2) {
    if (skip_if_nan && !isfinite(*skip_if_nan)) return;
    const mg_chunk c = chunks[blockIdx.x];
    const double nrm = *norm;
    const float scale = nrm > (double)clip ? (float)((double)clip / nrm) : 1.0f;
    const float w = c.decay ? wd : 0.0f;
    for (int64_t k = threadIdx.x; k < c.len; k += blockDim.x) {
        const int64_t i = c.start + k;
        float gi = g[i] * scale;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float mh = mi / c1, vh = vi / c2;
        float pi = p[i];
        pi -= lr * (mh / (sqrtf(vh) + eps) + w * pi);
        p[i] = pi;
        p16[i] = to16(pi);
    }
}

int mg_adamw(int64_t nchunks, const mg_chunk *chunks, float *p, moda_bf16_t *p16, const float *g, float *m, float *v,
             const double *norm, const double *skip_if_nan, float clip, float lr, float b1, float b2, float eps,
             float wd, float c1, float c2, void *stream) {
    k_adamw<<<(unsigned)nchunks, 256, 0, (cudaStream_t)stream>>>(chunks, p, p16, g, m, v, norm, skip_if_nan, clip, lr,
                                                                 b1, b2, eps, wd, c1, c2);
    return launched();
}
