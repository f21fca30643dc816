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
#include <stdint.h>
#include <stdlib.h>

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
                               int64_t ld_out16, const float *cosv, const float *sinv) {
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
            out16[r * ld_out16 + c0] = to16(a);
            out16[r * ld_out16 + c1] = to16(b);
        }
    }
}

int mg_rope_fwd(int64_t M, int64_t T, int64_t H, int64_t d, moda_bf16_t *x, int64_t ld, const float *cosv,
                const float *sinv, void *stream) {
    k_rope_fwd<<<blocks_for(M * H * (d / 2), 256), 256, 0, (cudaStream_t)stream>>>(M, T, H, d, x, ld, cosv, sinv);
    return launched();
}

int mg_grad_combine(int64_t M, int64_t T, int64_t H, int64_t d, int rotate, const moda_bf16_t *in16, int64_t ld_in,
                    const float *add32, int64_t ld_add, float *out32, moda_bf16_t *out16, int64_t ld_out16,
                    const float *cosv, const float *sinv, void *stream) {
    k_grad_combine<<<blocks_for(M * H * (d / 2), 256), 256, 0, (cudaStream_t)stream>>>(
        M, T, H, d, rotate, in16, ld_in, add32, ld_add, out32, out16, ld_out16, cosv, sinv);
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

/* ---- the vectorised row kernels (the default path; MODA_GPU_ELEM_LEGACY=1 selects the kernels above) ----
 *
 * One warp per row; a lane owns units of 4 consecutive columns (8-byte bf16 and 16-byte fp32 accesses) and keeps
 * its units of the row in registers, so a row is read once. MAXU (units per lane, compile time) bounds the row
 * width at 128 * MAXU columns; wider rows, odd shapes and misaligned pointers take the scalar kernels. The
 * backward kernels walk chunks of rows (one CTA per chunk) and also produce the norm weight's per-chunk partial
 * sums (the dw pass of the scalar path, without reading x and dy again); the warps' sums are added in warp order
 * and the chunks by k_rmsnorm_dw_reduce, so the results stay bitwise reproducible. The arithmetic is the scalar
 * kernels' expression for expression (the bf16 roundings of the unfused path included); only the order of the
 * fp32 sums (a row's sum of squares or dot product, a weight gradient) differs. */
static int elem_legacy(void) {
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("MODA_GPU_ELEM_LEGACY");
        v = e && e[0] == '1';
    }
    return v;
}
int mg_elem_legacy(void) { return elem_legacy(); }

static int aligned(const void *p, unsigned bytes) { return ((uintptr_t)p & (uintptr_t)(bytes - 1)) == 0; }

/* bf16 x 4: loaded packed (2 registers, as the backward row kernels keep x until used), unpacked to float */
static __device__ __forceinline__ uint2 ld4h_raw(const moda_bf16_t *p) { return *(const uint2 *)p; }
static __device__ __forceinline__ void unpack4h(uint2 u, float f[4]) {
    f[0] = __uint_as_float(u.x << 16);
    f[1] = __uint_as_float(u.x & 0xffff0000u);
    f[2] = __uint_as_float(u.y << 16);
    f[3] = __uint_as_float(u.y & 0xffff0000u);
}
static __device__ __forceinline__ void ld4h(const moda_bf16_t *p, float f[4]) { unpack4h(ld4h_raw(p), f); }
static __device__ __forceinline__ void st4h(moda_bf16_t *p, const float f[4]) {
    uint2 u;
    u.x = (uint32_t)to16(f[0]) | ((uint32_t)to16(f[1]) << 16);
    u.y = (uint32_t)to16(f[2]) | ((uint32_t)to16(f[3]) << 16);
    *(uint2 *)p = u;
}
static __device__ __forceinline__ void ld4f(const float *p, float f[4]) {
    const float4 u = *(const float4 *)p;
    f[0] = u.x;
    f[1] = u.y;
    f[2] = u.z;
    f[3] = u.w;
}
static __device__ __forceinline__ void st4f(float *p, const float f[4]) {
    *(float4 *)p = make_float4(f[0], f[1], f[2], f[3]);
}
static __device__ __forceinline__ float rnd16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

/* RMSNorm forward with the residual add, as k_rmsnorm_fwd */
template <int MAXU>
__global__ void k_rmsnorm_fwd_v(int64_t M, int D, const moda_bf16_t *a, int64_t lda, const moda_bf16_t *b,
                                moda_bf16_t *sum, const float *w, moda_bf16_t *y, int64_t ldy, float *rstd) {
    const int64_t r = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31, U = D / 4;
    if (r >= M) return;
    float s[MAXU][4];
    float ss = 0;
#pragma unroll
    for (int i = 0; i < MAXU; i++) {
        const int u = lane + 32 * i;
        if (u < U) {
            ld4h(a + r * lda + 4 * u, s[i]);
            if (b) {
                float t[4];
                ld4h(b + r * (int64_t)D + 4 * u, t);
#pragma unroll
                for (int j = 0; j < 4; j++) s[i][j] = rnd16(s[i][j] + t[j]); /* the stored residual */
                if (sum) st4h(sum + r * (int64_t)D + 4 * u, s[i]);
            }
#pragma unroll
            for (int j = 0; j < 4; j++) ss += s[i][j] * s[i][j];
        }
    }
    ss = warp_sum(ss);
    const float rs = rsqrtf(ss / (float)D + RMS_EPS);
    if (lane == 0) rstd[r] = rs;
#pragma unroll
    for (int i = 0; i < MAXU; i++) {
        const int u = lane + 32 * i;
        if (u < U) {
            float wv[4], o[4];
            ld4f(w + 4 * u, wv);
#pragma unroll
            for (int j = 0; j < 4; j++) o[j] = s[i][j] * rs * wv[j];
            st4h(y + r * ldy + 4 * u, o);
        }
    }
}

/* The weight-gradient sums live in shared memory, not registers: warp wp owns row wp of sh (8 x D floats) and
 * each lane the columns of its units, so no two threads touch one word and no barrier is needed until the end.
 * The rows are added in the same order as before (a warp's rows in turn), so the weight gradient stays bitwise
 * reproducible. Held in registers the sums took 4 per unit: at D = 768 the kernel needed 218 registers, one CTA
 * of 8 warps per SM, and ran at 2/3 of the bandwidth floor, latency-bound. */
template <int NU>
static __device__ __forceinline__ void dw_rows_zero(float *sh, int D, const int *cols) {
    float *mine = sh + (threadIdx.x >> 5) * D;
#pragma unroll
    for (int i = 0; i < NU; i++)
        if (cols[i] >= 0) *(float4 *)(mine + cols[i]) = make_float4(0, 0, 0, 0);
}

/* the warps' sums of a chunk, added in warp order: partial[c, :] */
static __device__ __forceinline__ void dw_chunk_store(int D, const float *sh, float *partial, int64_t c) {
    __syncthreads();
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float t = 0;
        for (int k = 0; k < (int)(blockDim.x >> 5); k++) t += sh[k * D + j];
        partial[c * D + j] = t;
    }
}

/* The norm's backward on a row held in registers (NU units of 4 columns per lane, cols < 0: not this lane's;
 * x packed bf16): the warp's weight-gradient sums (its row of sh) += g x rs, then g becomes the input gradient
 * rs (g w - x rs mean(g w x rs)), the expressions of k_rmsnorm_dw_partial and k_rmsnorm_bwd_dx. */
template <int NU>
static __device__ __forceinline__ void norm_bwd_row(float (*g)[4], const uint2 *xh, const int *cols, const float *w,
                                                    float rs, int D, float *sh) {
    float *mine = sh + (threadIdx.x >> 5) * D;
    float dot = 0;
#pragma unroll
    for (int i = 0; i < NU; i++) {
        if (cols[i] < 0) continue;
        float wv[4], xv[4], a[4];
        ld4f(w + cols[i], wv);
        unpack4h(xh[i], xv);
        ld4f(mine + cols[i], a);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            dot += g[i][j] * wv[j] * xv[j] * rs;
            a[j] += g[i][j] * xv[j] * rs;
        }
        st4f(mine + cols[i], a);
    }
    dot = warp_sum(dot) / (float)D;
#pragma unroll
    for (int i = 0; i < NU; i++)
        if (cols[i] >= 0) {
            float wv[4], xv[4];
            ld4f(w + cols[i], wv); /* w is read twice (L1 hits) rather than held in registers */
            unpack4h(xh[i], xv);
#pragma unroll
            for (int j = 0; j < 4; j++) g[i][j] = rs * (g[i][j] * wv[j] - xv[j] * rs * dot);
        }
}

/* RMSNorm backward, input and weight gradient in one pass (k_rmsnorm_bwd_dx + k_rmsnorm_dw_partial) */
template <int MAXU>
__global__ void __launch_bounds__(256, MAXU <= 4 ? 3 : 2)
    k_rmsnorm_bwd_v(int64_t M, int D, const moda_bf16_t *x, int64_t ldx, const float *w, const float *rstd,
                    const float *dy, int64_t ldy, float *dx32, int accumulate, moda_bf16_t *dx16, int64_t ldh,
                    float *partial, int64_t rows_per_chunk) {
    extern __shared__ float sh_dw[];
    const int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, nw = blockDim.x >> 5, U = D / 4;
    const int64_t c = blockIdx.x, r0 = c * rows_per_chunk, r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
    int cols[MAXU];
#pragma unroll
    for (int i = 0; i < MAXU; i++) {
        const int u = lane + 32 * i;
        cols[i] = u < U ? 4 * u : -1;
    }
    dw_rows_zero<MAXU>(sh_dw, D, cols);
    const int acc_old = dx32 && accumulate;
    for (int64_t r = r0 + wp; r < r1; r += nw) {
        const float rs = rstd[r];
        float g[MAXU][4], old[MAXU][4];
        uint2 xh[MAXU];
        /* every load of the row first (the accumulated dx too), then the reduction */
#pragma unroll
        for (int i = 0; i < MAXU; i++) {
            if (cols[i] >= 0) {
                ld4f(dy + r * ldy + cols[i], g[i]);
                xh[i] = ld4h_raw(x + r * ldx + cols[i]);
                if (acc_old) ld4f(dx32 + r * (int64_t)D + cols[i], old[i]);
            }
        }
        norm_bwd_row<MAXU>(g, xh, cols, w, rs, D, sh_dw);
#pragma unroll
        for (int i = 0; i < MAXU; i++) {
            if (cols[i] >= 0) {
                if (dx32) {
                    if (acc_old) {
#pragma unroll
                        for (int j = 0; j < 4; j++) g[i][j] = old[i][j] + g[i][j];
                    }
                    st4f(dx32 + r * (int64_t)D + cols[i], g[i]);
                }
                if (dx16) st4h(dx16 + r * ldh + cols[i], g[i]);
            }
        }
    }
    dw_chunk_store(D, sh_dw, partial, c);
}

/* QK-norm (optional) and RoPE of M rows of H heads of d (k_rmsnorm_fwd then k_rope_fwd, with the norm's bf16
 * output rounding kept). A lane's unit is 4 columns of a head's first half and the 4 they pair with. */
template <int MAXU>
__global__ void k_qk_fwd_v(int64_t M, int64_t T, int H, int d, const moda_bf16_t *in, int64_t ld_in, const float *w,
                           float *rstd, moda_bf16_t *out, int64_t ld_out, const float *cosv, const float *sinv) {
    const int64_t r = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31, h2 = d / 2, q4 = h2 / 4, U = H * q4, W = H * d;
    if (r >= M) return;
    const int64_t t = r % T;
    float a[MAXU][4], b[MAXU][4];
    int c0[MAXU], k4[MAXU];
    float ss = 0;
#pragma unroll
    for (int i = 0; i < MAXU; i++) {
        const int u = lane + 32 * i;
        c0[i] = -1;
        k4[i] = 0;
        if (u < U) {
            const int h = u / q4;
            k4[i] = (u - h * q4) * 4;
            c0[i] = h * d + k4[i];
            ld4h(in + r * ld_in + c0[i], a[i]);
            ld4h(in + r * ld_in + c0[i] + h2, b[i]);
#pragma unroll
            for (int j = 0; j < 4; j++) ss += a[i][j] * a[i][j] + b[i][j] * b[i][j];
        }
    }
    if (w) {
        ss = warp_sum(ss);
        const float rs = rsqrtf(ss / (float)W + RMS_EPS);
        if (lane == 0) rstd[r] = rs;
#pragma unroll
        for (int i = 0; i < MAXU; i++) {
            if (c0[i] >= 0) {
                float wa[4], wb[4];
                ld4f(w + c0[i], wa);
                ld4f(w + c0[i] + h2, wb);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    a[i][j] = rnd16(a[i][j] * rs * wa[j]);
                    b[i][j] = rnd16(b[i][j] * rs * wb[j]);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < MAXU; i++) {
        if (c0[i] >= 0) {
            float cv[4], sv[4], oa[4], ob[4];
            ld4f(cosv + t * h2 + k4[i], cv);
            ld4f(sinv + t * h2 + k4[i], sv);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                oa[j] = a[i][j] * cv[j] - b[i][j] * sv[j];
                ob[j] = a[i][j] * sv[j] + b[i][j] * cv[j];
            }
            st4h(out + r * ld_out + c0[i], oa);
            st4h(out + r * ld_out + c0[i] + h2, ob);
        }
    }
}

/* The gradient of a projection's output before RoPE and QK-norm: g = in16 + add32, rotated back (rotate), then
 * the norm's backward with its weight-gradient partials (w != NULL); bf16 out (k_grad_combine then
 * k_rmsnorm_dw_partial and k_rmsnorm_bwd_dx, without the fp32 round trip in between). */
template <int MAXU>
__global__ void __launch_bounds__(256, MAXU == 1 ? 4 : MAXU <= 3 ? 3 : 2)
    k_qk_bwd_v(int64_t M, int64_t T, int H, int d, int rotate, const moda_bf16_t *in16, int64_t ld_in,
               const float *add32, int64_t ld_add, const moda_bf16_t *x, const float *w, const float *rstd,
               moda_bf16_t *out16, int64_t ld_out, float *partial, int64_t rows_per_chunk, const float *cosv,
               const float *sinv) {
    extern __shared__ float sh_dw[];
    const int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int h2 = d / 2, q4 = h2 / 4, U = H * q4, W = H * d;
    const int64_t c = blockIdx.x, r0 = c * rows_per_chunk, r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
    int cols[2 * MAXU], k4[MAXU];
#pragma unroll
    for (int i = 0; i < MAXU; i++) {
        const int u = lane + 32 * i;
        cols[2 * i] = cols[2 * i + 1] = -1;
        k4[i] = 0;
        if (u < U) {
            const int h = u / q4;
            k4[i] = (u - h * q4) * 4;
            cols[2 * i] = h * d + k4[i];
            cols[2 * i + 1] = cols[2 * i] + h2;
        }
    }
    if (w) dw_rows_zero<2 * MAXU>(sh_dw, W, cols);
    for (int64_t r = r0 + wp; r < r1; r += nw) {
        const int64_t t = r % T;
        float g[2 * MAXU][4];
        uint2 xh[2 * MAXU];
        /* every load of the row first (x too: it does not depend on the rotation), then the arithmetic */
#pragma unroll
        for (int i = 0; i < 2 * MAXU; i++) {
#pragma unroll
            for (int j = 0; j < 4; j++) g[i][j] = 0;
            if (cols[i] >= 0) {
                if (in16) ld4h(in16 + r * ld_in + cols[i], g[i]);
                if (add32) {
                    float e[4];
                    ld4f(add32 + r * ld_add + cols[i], e);
#pragma unroll
                    for (int j = 0; j < 4; j++) g[i][j] += e[j];
                }
                if (w) xh[i] = ld4h_raw(x + r * (int64_t)W + cols[i]);
            }
        }
        if (rotate) { /* transpose rotation: the backward of the forward one */
#pragma unroll
            for (int i = 0; i < MAXU; i++) {
                if (cols[2 * i] >= 0) {
                    float cv[4], sv[4];
                    ld4f(cosv + t * h2 + k4[i], cv);
                    ld4f(sinv + t * h2 + k4[i], sv);
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        const float a = g[2 * i][j], b = g[2 * i + 1][j];
                        g[2 * i][j] = a * cv[j] + b * sv[j];
                        g[2 * i + 1][j] = -a * sv[j] + b * cv[j];
                    }
                }
            }
        }
        if (w) norm_bwd_row<2 * MAXU>(g, xh, cols, w, rstd[r], W, sh_dw);
#pragma unroll
        for (int i = 0; i < 2 * MAXU; i++)
            if (cols[i] >= 0) st4h(out16 + r * ld_out + cols[i], g[i]);
    }
    if (w) dw_chunk_store(W, sh_dw, partial, c);
}

/* SwiGLU, 8 elements (16 bytes of each operand) per thread: the scalar kernels' arithmetic */
__global__ void k_swiglu_fwd_v(int64_t n8, const uint4 *h1, const uint4 *h3, uint4 *g) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8; i += (int64_t)gridDim.x * blockDim.x) {
        const uint4 a4 = h1[i], b4 = h3[i];
        const moda_bf16_t *a = (const moda_bf16_t *)&a4, *b = (const moda_bf16_t *)&b4;
        uint4 o4;
        moda_bf16_t *o = (moda_bf16_t *)&o4;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float x = ld16(a, j), s = 1.0f / (1.0f + __expf(-x));
            o[j] = to16(x * s * ld16(b, j));
        }
        g[i] = o4;
    }
}

__global__ void k_swiglu_bwd_v(int64_t n8, const uint4 *h1, const uint4 *h3, const uint4 *dg, uint4 *dh1, uint4 *dh3) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n8; i += (int64_t)gridDim.x * blockDim.x) {
        const uint4 a4 = h1[i], b4 = h3[i], g4 = dg[i];
        const moda_bf16_t *a = (const moda_bf16_t *)&a4, *b = (const moda_bf16_t *)&b4, *gd = (const moda_bf16_t *)&g4;
        uint4 o1, o3;
        moda_bf16_t *p1 = (moda_bf16_t *)&o1, *p3 = (moda_bf16_t *)&o3;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float x = ld16(a, j), y = ld16(b, j), e = ld16(gd, j), s = 1.0f / (1.0f + __expf(-x));
            p3[j] = to16(e * x * s);
            p1[j] = to16(e * y * s * (1.0f + x * (1.0f - s)));
        }
        dh3[i] = o3;
        dh1[i] = o1;
    }
}

int mg_swiglu_fwd(int64_t n, const moda_bf16_t *h1, const moda_bf16_t *h3, moda_bf16_t *g, void *stream) {
    if (elem_legacy() || n % 8 || !aligned(h1, 16) || !aligned(h3, 16) || !aligned(g, 16))
        k_swiglu_fwd<<<blocks_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, h1, h3, g);
    else
        k_swiglu_fwd_v<<<blocks_for(n / 8, 256), 256, 0, (cudaStream_t)stream>>>(n / 8, (const uint4 *)h1,
                                                                                 (const uint4 *)h3, (uint4 *)g);
    return launched();
}

int mg_swiglu_bwd(int64_t n, const moda_bf16_t *h1, const moda_bf16_t *h3, const moda_bf16_t *dg, moda_bf16_t *dh1,
                  moda_bf16_t *dh3, void *stream) {
    if (elem_legacy() || n % 8 || !aligned(h1, 16) || !aligned(h3, 16) || !aligned(dg, 16) || !aligned(dh1, 16) ||
        !aligned(dh3, 16))
        k_swiglu_bwd<<<blocks_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, h1, h3, dg, dh1, dh3);
    else
        k_swiglu_bwd_v<<<blocks_for(n / 8, 256), 256, 0, (cudaStream_t)stream>>>(
            n / 8, (const uint4 *)h1, (const uint4 *)h3, (const uint4 *)dg, (uint4 *)dh1, (uint4 *)dh3);
    return launched();
}

/* the residual adds and conversions, 4 elements per thread */
__global__ void k_add_f32_v(int64_t n4, float *dst, const float *src, moda_bf16_t *dst16) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
        float a[4], b[4];
        ld4f(dst + 4 * i, a);
        ld4f(src + 4 * i, b);
#pragma unroll
        for (int j = 0; j < 4; j++) a[j] = a[j] + b[j];
        st4f(dst + 4 * i, a);
        if (dst16) st4h(dst16 + 4 * i, a);
    }
}

__global__ void k_f32_to_bf16_v(int64_t n4, const float *src, moda_bf16_t *dst) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
        float a[4];
        ld4f(src + 4 * i, a);
        st4h(dst + 4 * i, a);
    }
}

int mg_add_f32(int64_t n, float *dst, const float *src, moda_bf16_t *dst16, void *stream) {
    if (elem_legacy() || n % 4 || !aligned(dst, 16) || !aligned(src, 16) || !aligned(dst16, 8))
        k_add_f32<<<blocks_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, dst, src, dst16);
    else
        k_add_f32_v<<<blocks_for(n / 4, 256), 256, 0, (cudaStream_t)stream>>>(n / 4, dst, src, dst16);
    return launched();
}

int mg_f32_to_bf16(int64_t n, const float *src, moda_bf16_t *dst, void *stream) {
    if (elem_legacy() || n % 4 || !aligned(src, 16) || !aligned(dst, 8))
        k_f32_to_bf16<<<blocks_for(n, 256), 256, 0, (cudaStream_t)stream>>>(n, src, dst);
    else
        k_f32_to_bf16_v<<<blocks_for(n / 4, 256), 256, 0, (cudaStream_t)stream>>>(n / 4, src, dst);
    return launched();
}

/* units per lane of a row of D columns for the vector kernels (0: take the scalar path) */
static int units_per_lane(int64_t D) {
    if (D % 4 || D > 1024 || D < 4) return 0;
    const int64_t u = (D / 4 + 31) / 32;
    return u <= 4 ? (int)u : u <= 6 ? 6 : 8;
}
#define ROWS_GRID(M) (unsigned)(((M) + 7) / 8)
/* the launch of kernel macro L<units> for the units_per_lane() value mu */
#define UNITS_DISPATCH(mu, L)                                                                                      \
    do {                                                                                                           \
        if ((mu) == 1) L(1);                                                                                       \
        else if ((mu) == 2) L(2);                                                                                  \
        else if ((mu) == 3) L(3);                                                                                  \
        else if ((mu) == 4) L(4);                                                                                  \
        else if ((mu) == 6) L(6);                                                                                  \
        else L(8);                                                                                                 \
    } while (0)

static int rows_per_chunk(int64_t M, int64_t nchunk, int64_t *used) {
    const int64_t rpc = (M + nchunk - 1) / nchunk;
    *used = (M + rpc - 1) / rpc;
    return (int)rpc;
}

/* Chunks of rows for the backward row kernels: no more than fit on the GPU at once (SMs x resident CTAs of the
 * kernel), so that they run in one wave. With the trainer's 512 chunks and 3 CTAs per SM (396 on an H100) a
 * second wave of 116 CTAs took as long as the first: the kernels are latency-bound, each warp walking its rows
 * one after another (session 6 profile). The weight gradient's summation order then depends on the GPU's SM
 * count; on one GPU it stays the same run to run. */
static int64_t one_wave_chunks(const void *kernel, size_t smem, int64_t nchunk) {
    int dev = 0, sms = 0, per_sm = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 256, smem) != cudaSuccess || sms <= 0 ||
        per_sm <= 0) {
        (void)cudaGetLastError(); /* a failed query must not read as the next launch's error */
        return nchunk;
    }
    const int64_t slots = (int64_t)sms * per_sm;
    return slots < nchunk ? slots : nchunk;
}

int mg_rmsnorm_fwd(int64_t M, int64_t D, const moda_bf16_t *a, int64_t lda, const moda_bf16_t *b, moda_bf16_t *sum,
                   const float *w, moda_bf16_t *y, int64_t ldy, float *rstd, void *stream) {
    const int mu = units_per_lane(D);
    cudaStream_t st = (cudaStream_t)stream;
    if (elem_legacy() || !mu || lda % 4 || ldy % 4 || !aligned(a, 8) || !aligned(b, 8) || !aligned(sum, 8) ||
        !aligned(y, 8) || !aligned(w, 16)) {
        k_rmsnorm_fwd<<<ROWS_GRID(M), 256, 0, st>>>(M, D, a, lda, b, sum, w, y, ldy, rstd);
        return launched();
    }
#define FWD(U) k_rmsnorm_fwd_v<U><<<ROWS_GRID(M), 256, 0, st>>>(M, (int)D, a, lda, b, sum, w, y, ldy, rstd)
    UNITS_DISPATCH(mu, FWD);
#undef FWD
    return launched();
}

int mg_rmsnorm_bwd(int64_t M, int64_t D, const moda_bf16_t *x, int64_t ldx, const float *w, const float *rstd,
                   const float *dy, int64_t ldy, float *dx32, int accumulate, moda_bf16_t *dx16, int64_t ldh,
                   float *partial, int64_t nchunk, float *dw, void *stream) {
    const int mu = units_per_lane(D);
    cudaStream_t st = (cudaStream_t)stream;
    if (elem_legacy() || !mu || ldx % 4 || ldy % 4 || ldh % 4 || !aligned(x, 8) || !aligned(dy, 16) ||
        !aligned(dx32, 16) || !aligned(dx16, 8) || !aligned(w, 16)) {
        int e = mg_rmsnorm_bwd_dw(M, D, x, ldx, rstd, dy, ldy, partial, nchunk, dw, stream);
        if (e) return e;
        return mg_rmsnorm_bwd_dx(M, D, x, ldx, w, rstd, dy, ldy, dx32, accumulate, dx16, ldh, stream);
    }
    int64_t used = 0;
    const size_t smem = (size_t)8 * D * sizeof(float);
#define BWD(U)                                                                                                     \
    do {                                                                                                           \
        const int64_t rpc_ = rows_per_chunk(M, one_wave_chunks((const void *)k_rmsnorm_bwd_v<U>, smem, nchunk), &used); \
        k_rmsnorm_bwd_v<U><<<(unsigned)used, 256, smem, st>>>(M, (int)D, x, ldx, w, rstd, dy, ldy, dx32, accumulate,   \
                                                             dx16, ldh, partial, rpc_);                            \
    } while (0)
    UNITS_DISPATCH(mu, BWD);
#undef BWD
    int e = launched();
    if (e) return e;
    k_rmsnorm_dw_reduce<<<(unsigned)((D + DW_COLS - 1) / DW_COLS), dim3(DW_COLS, DW_RED), 0, st>>>(D, used, partial, dw);
    return launched();
}

/* units per lane of the (RoPE pair) kernels: rows of H heads of d, d a multiple of 8, at most 1024 wide */
static int pair_units_per_lane(int64_t H, int64_t d) {
    if (d % 8 || H * d > 1024 || H < 1) return 0;
    const int64_t u = (H * d / 8 + 31) / 32;
    return (int)u;
}

int mg_qk_fwd(int64_t M, int64_t T, int64_t H, int64_t d, const moda_bf16_t *in, int64_t ld_in, const float *w,
              float *rstd, moda_bf16_t *out, int64_t ld_out, const float *cosv, const float *sinv, void *stream) {
    const int mu = pair_units_per_lane(H, d);
    cudaStream_t st = (cudaStream_t)stream;
    if (elem_legacy() || !mu || ld_in % 4 || ld_out % 4 || !aligned(in, 8) || !aligned(out, 8) || !aligned(w, 16) ||
        !aligned(cosv, 16) || !aligned(sinv, 16)) {
        if (w) {
            int e = mg_rmsnorm_fwd(M, H * d, in, ld_in, NULL, NULL, w, out, ld_out, rstd, stream);
            if (e) return e;
        }
        return mg_rope_fwd(M, T, H, d, out, ld_out, cosv, sinv, stream);
    }
#define QF(U) k_qk_fwd_v<U><<<ROWS_GRID(M), 256, 0, st>>>(M, T, (int)H, (int)d, in, ld_in, w, rstd, out, ld_out, cosv, sinv)
    if (mu == 1) QF(1);
    else if (mu == 2) QF(2);
    else if (mu == 3) QF(3);
    else QF(4);
#undef QF
    return launched();
}

int mg_qk_bwd(int64_t M, int64_t T, int64_t H, int64_t d, int rotate, const moda_bf16_t *in16, int64_t ld_in,
              const float *add32, int64_t ld_add, const moda_bf16_t *x, const float *w, const float *rstd,
              moda_bf16_t *out16, int64_t ld_out, float *scratch32, float *partial, int64_t nchunk, float *dw,
              const float *cosv, const float *sinv, void *stream) {
    const int mu = pair_units_per_lane(H, d);
    const int64_t W = H * d;
    cudaStream_t st = (cudaStream_t)stream;
    if (elem_legacy() || !mu || ld_in % 4 || ld_add % 4 || ld_out % 4 || !aligned(in16, 8) || !aligned(add32, 16) ||
        !aligned(x, 8) || !aligned(w, 16) || !aligned(out16, 8) || !aligned(cosv, 16) || !aligned(sinv, 16)) {
        if (!w)
            return mg_grad_combine(M, T, H, d, rotate, in16, ld_in, add32, ld_add, NULL, out16, ld_out, cosv, sinv,
                                   stream);
        int e = mg_grad_combine(M, T, H, d, rotate, in16, ld_in, add32, ld_add, scratch32, NULL, W, cosv, sinv, stream);
        if (!e) e = mg_rmsnorm_bwd_dw(M, W, x, W, rstd, scratch32, W, partial, nchunk, dw, stream);
        if (!e) e = mg_rmsnorm_bwd_dx(M, W, x, W, w, rstd, scratch32, W, NULL, 0, out16, ld_out, stream);
        return e;
    }
    int64_t used = 0;
    const size_t smem = w ? (size_t)8 * W * sizeof(float) : 0;
#define QB(U)                                                                                                      \
    do {                                                                                                           \
        const int64_t rpc_ = rows_per_chunk(M, one_wave_chunks((const void *)k_qk_bwd_v<U>, smem, nchunk), &used);  \
        k_qk_bwd_v<U><<<(unsigned)used, 256, smem, st>>>(M, T, (int)H, (int)d, rotate, in16, ld_in, add32, ld_add, x, w,  \
                                                         rstd, out16, ld_out, partial, rpc_, cosv, sinv);          \
    } while (0)
    if (mu == 1) QB(1);
    else if (mu == 2) QB(2);
    else if (mu == 3) QB(3);
    else QB(4);
#undef QB
    int e = launched();
    if (e || !w) return e;
    k_rmsnorm_dw_reduce<<<(unsigned)((W + DW_COLS - 1) / DW_COLS), dim3(DW_COLS, DW_RED), 0, st>>>(W, used, partial, dw);
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
