/*
 * fast_common.h - private helpers of the fast CPU path (fast_forward.c, fast_backward.c).
 *
 * The fast path is FlashAttention-2 on the CPU: a block of query rows (the G heads of a few tokens, which share
 * one K/V head) meets one key tile at a time; every product is a small fp32 GEMM on tiles converted from the
 * storage dtype once per tile, and the softmax state lives in the exponent base 2 (scale folded into q).
 *
 * Keys come in "tiles": tokens [ua, ub) x slots [la, lb) of one kind (sequence keys have one pseudo-slot).
 * Key k of a tile is token ua + k / ns, slot la + k % ns (ns = lb - la). Visibility is always an interval of
 * tokens (spec.md §2), so a row sees a contiguous run of a tile's keys and a key a contiguous run of rows:
 * no masks are stored, only ranges.
 */
#ifndef MODA_CPU_FAST_COMMON_H
#define MODA_CPU_FAST_COMMON_H

#include "internal.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* The library is built with plain -O3. The hot functions are compiled three times and the loader picks the
 * best one the CPU has. "arch=x86-64-v3" (AVX2 + FMA + F16C) and not "avx2","fma": in target_clones each
 * string is its own clone, so "avx2,fma" would give an AVX2 clone without FMA and a separate FMA clone, and
 * the resolver prefers the AVX2 one. The kernels are written for 8-float vectors, so the x86-64-v4 clone runs
 * the same 256-bit code (with 32 registers and EVEX encoding), not 512-bit; other compilers and ISAs get the
 * plain -O3 build. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MODA_NO_CLONES)
#define MODA_FAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MODA_FAST_CLONES
#endif
/* The v8 helpers are always inlined, so the 32-byte vector ABI note GCC gives for the default clone is moot. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#define MODA_FAST_INLINE static inline __attribute__((always_inline))

/* Tile shapes. Rows of a block are the G heads of consecutive tokens; the GEMM micro-kernel is 4 rows x 24
 * columns (12 of the 16 AVX2 registers accumulate), so key tiles are multiples of 24 where that is free. */
enum {
    FAST_ROWS = 64,     /* forward / dQ pass: target query rows per block */
    FAST_KEYS = 96,     /* forward / dQ pass: keys per tile */
    FAST_P1_ROWS = 96,  /* dK/dV pass: query rows per block */
    FAST_P1_KEYS = 64,  /* dK/dV pass: keys per tile */
    FAST_ALIGN = 64
};

#define FAST_LOG2E 1.4426950408889634
#define FAST_LN2 0.6931471805599453

typedef float fast_v8 __attribute__((vector_size(32)));
typedef int32_t fast_v8i __attribute__((vector_size(32)));
typedef float fast_v8u __attribute__((vector_size(32), aligned(4), may_alias));

static inline int64_t fast_round8(int64_t n) { return (n + 7) & ~(int64_t)7; }
static inline int64_t fast_min(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t fast_max(int64_t a, int64_t b) { return a > b ? a : b; }

/* Helpers that take vectors are macros (or take pointers): a by-value 32-byte vector parameter makes GCC print
 * an ABI note for the default clone, even though everything here is inlined. */
MODA_FAST_INLINE fast_v8 fast_ld(const float *p) { return *(const fast_v8u *)p; }
#define fast_st(p, v) (*(fast_v8u *)(p) = (v))
#define fast_select(mask, a, b) ((fast_v8)((((fast_v8i)(a)) & (mask)) | (((fast_v8i)(b)) & ~(mask))))
#define fast_vmax(a, b) fast_select((a) > (b), (a), (b))
MODA_FAST_INLINE float fast_hsum(const fast_v8 *v) {
    const float *x = (const float *)v;
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}
MODA_FAST_INLINE float fast_hmax(const fast_v8 *v) {
    const float *x = (const float *)v;
    float m = x[0];
    for (int i = 1; i < 8; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* 2^x for x <= 127; 0 below -126.5 (so exp2(-inf) = 0, which masks). Round-to-nearest split x = n + f,
 * |f| <= 1/2, and a degree-7 Taylor polynomial of e^(f ln 2) (truncation 5e-9): measured relative error
 * < 1e-7 (1.5 ulp) over [-126, 0], where results below 2^-126 flush to 0. */
MODA_FAST_INLINE fast_v8 fast_exp2(const fast_v8 *xp) {
    fast_v8 x = *xp;
    const fast_v8 lo = (fast_v8){0} - 127.5f, hi = (fast_v8){0} + 127.0f;
    x = fast_vmax(x, lo);
    x = fast_select(x > hi, hi, x);
    fast_v8 t = x + 127.5f;
    fast_v8i ni = __builtin_convertvector(t, fast_v8i); /* t >= 0: truncation is floor */
    fast_v8 f = x - (__builtin_convertvector(ni, fast_v8) - 127.0f);
    const float c1 = 0.6931471805599453f, c2 = 0.2402265069591007f, c3 = 0.05550410866482158f,
                c4 = 0.009618129107628477f, c5 = 0.0013333558146428443f, c6 = 0.00015403530393381606f,
                c7 = 1.5252733804059840e-05f;
    fast_v8 p = c7 * f + c6;
    p = p * f + c5;
    p = p * f + c4;
    p = p * f + c3;
    p = p * f + c2;
    p = p * f + c1;
    p = p * f + 1.0f;
    fast_v8i scale = ni << 23; /* biased exponent n + 127; 0 gives 0.0 */
    return p * (fast_v8)scale;
}

/* ---- storage conversions (inline so that tile loads vectorise; exact, round to nearest even) ---- */
MODA_FAST_INLINE float fast_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
MODA_FAST_INLINE uint32_t fast_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
/* Half to float without branches: the 15 magnitude bits shifted into a float's place are the value scaled by
 * 2^-112 for normals and subnormals alike; exponent 31 (inf/NaN) only needs the float exponent set. */
MODA_FAST_INLINE float fast_f16_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t em = h & 0x7fffu;
    float fin = fast_bits_f32(em << 13) * 0x1p112f;
    uint32_t special = 0x7f800000u | ((em << 13) & 0x007fffffu);
    uint32_t mag = em >= 0x7c00u ? special : fast_f32_bits(fin);
    return fast_bits_f32(sign | mag);
}
MODA_FAST_INLINE uint16_t fast_f32_bf16(float f) {
    uint32_t u = fast_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* dst[i] = scale * src[off + i*st], i < n, converted from the operand's dtype. */
MODA_FAST_INLINE void fast_load_row(float *restrict dst, const moda_operand *a, int64_t off, int64_t st, int64_t n,
                                    float scale) {
    switch (a->dtype) {
    case MODA_F32: {
        const float *s = (const float *)a->data + off;
        if (st == 1)
            for (int64_t i = 0; i < n; i++) dst[i] = s[i] * scale;
        else
            for (int64_t i = 0; i < n; i++) dst[i] = s[i * st] * scale;
        break;
    }
    case MODA_F16: {
        const uint16_t *s = (const uint16_t *)a->data + off;
        if (st == 1)
            for (int64_t i = 0; i < n; i++) dst[i] = fast_f16_f32(s[i]) * scale;
        else
            for (int64_t i = 0; i < n; i++) dst[i] = fast_f16_f32(s[i * st]) * scale;
        break;
    }
    case MODA_BF16: {
        const uint16_t *s = (const uint16_t *)a->data + off;
        if (st == 1)
            for (int64_t i = 0; i < n; i++) dst[i] = fast_bits_f32((uint32_t)s[i] << 16) * scale;
        else
            for (int64_t i = 0; i < n; i++) dst[i] = fast_bits_f32((uint32_t)s[i * st] << 16) * scale;
        break;
    }
    default: /* f64 never reaches the fast path (api.c sends it to the reference) */
        for (int64_t i = 0; i < n; i++) dst[i] = (float)moda_load(a->data, a->dtype, off + i * st) * scale;
        break;
    }
}

/* a[off + i*st] = scale * src[i] (+ the old value when accumulate), rounded once to the operand's dtype. */
MODA_FAST_INLINE void fast_store_row(const moda_operand *a, int64_t off, int64_t st, int64_t n, const float *src,
                                     float scale, int accumulate) {
    switch (a->dtype) {
    case MODA_F32: {
        float *d = (float *)a->data + off;
        if (accumulate)
            for (int64_t i = 0; i < n; i++) d[i * st] += src[i] * scale;
        else if (st == 1)
            for (int64_t i = 0; i < n; i++) d[i] = src[i] * scale;
        else
            for (int64_t i = 0; i < n; i++) d[i * st] = src[i] * scale;
        break;
    }
    case MODA_F16: {
        uint16_t *d = (uint16_t *)a->data + off;
        for (int64_t i = 0; i < n; i++)
            d[i * st] = moda_f32_to_f16(src[i] * scale + (accumulate ? fast_f16_f32(d[i * st]) : 0.0f));
        break;
    }
    case MODA_BF16: {
        uint16_t *d = (uint16_t *)a->data + off;
        for (int64_t i = 0; i < n; i++)
            d[i * st] =
                fast_f32_bf16(src[i] * scale + (accumulate ? fast_bits_f32((uint32_t)d[i * st] << 16) : 0.0f));
        break;
    }
    default:
        for (int64_t i = 0; i < n; i++) {
            int64_t o = off + i * st;
            moda_store(a->data, a->dtype, o, (accumulate ? moda_load(a->data, a->dtype, o) : 0.0) + src[i] * scale);
        }
        break;
    }
}

/* ---- key tiles and visibility (spec.md §2) ---- */
typedef struct fast_tile {
    int depth;      /* 0: sequence keys K/V; 1: depth slots Kd/Vd */
    int64_t ua, ub; /* tokens [ua, ub) */
    int64_t la, lb; /* slots [la, lb) (depth), [0, 1) (sequence) */
} fast_tile;

static inline int64_t fast_tile_keys(const fast_tile *k) { return (k->ub - k->ua) * (k->lb - k->la); }

/* First and one-past-last token whose rows see key token u. */
static inline void fast_rows_of_key(const moda_problem *p, int depth, int64_t u, int64_t *t0, int64_t *t1) {
    if (!depth) {
        *t0 = p->causal ? u : 0;
        *t1 = p->T;
    } else if (p->chunk) {
        *t0 = u;
        *t1 = fast_min(p->T, (u / p->chunk_size + 1) * p->chunk_size);
    } else {
        *t0 = u;
        *t1 = u + 1;
    }
}

/* Keys [k0, k1) of tile `k` that row token t sees (k0 >= k1: none). */
static inline void fast_keys_of_row(const moda_problem *p, const fast_tile *k, int64_t t, int64_t *k0, int64_t *k1) {
    int64_t lo, hi; /* inclusive token bounds */
    if (!k->depth) {
        lo = 0;
        hi = p->causal ? t : p->T - 1;
    } else {
        int64_t u0, u1;
        moda_depth_tokens(p, t, &u0, &u1);
        lo = u0;
        hi = u1 - 1;
    }
    lo = fast_max(lo, k->ua);
    hi = fast_min(hi, k->ub - 1);
    int64_t ns = k->lb - k->la;
    *k0 = (lo - k->ua) * ns;
    *k1 = hi >= lo ? (hi - k->ua + 1) * ns : *k0;
}

/* Row tokens within [t0, t1) that see at least one key of the tile. */
static inline void fast_rows_of_tile(const moda_problem *p, const fast_tile *k, int64_t t0, int64_t t1, int64_t *ta,
                                     int64_t *tb) {
    int64_t a, b, c, d;
    fast_rows_of_key(p, k->depth, k->ua, &a, &b);
    fast_rows_of_key(p, k->depth, k->ub - 1, &c, &d);
    *ta = fast_max(t0, a);
    *tb = fast_min(t1, d);
    if (*tb < *ta) *tb = *ta;
}

/* Depth tiling: slots per tile and tokens per tile. Token mode keeps one token per tile (its G rows are the
 * only ones that see it); chunk mode packs tokens up to `keys` keys. */
static inline void fast_depth_tiling(const moda_problem *p, int64_t keys, int64_t *ns, int64_t *nt) {
    int64_t L = moda_problem_slots(p);
    *ns = fast_min(L, keys);
    *nt = p->chunk ? fast_max(1, keys / (*ns > 0 ? *ns : 1)) : 1;
}

/* The key tiles that rows of tokens [t0, t1) meet, in a fixed order (sequence keys, then depth slots): tile i
 * of fast_block_tiles(...) is fast_block_tile(..., i). `keys` is the tile size. */
typedef struct fast_block_tiling {
    int64_t t1, keys, jend, nseq; /* sequence tiles [0, jend) */
    int64_t us, ns, nt, nsg;      /* depth tiles: tokens from us in steps of nt, slot groups of ns */
    int64_t count;
} fast_block_tiling;

static inline fast_block_tiling fast_block_tiles(const moda_problem *p, int64_t t0, int64_t t1, int64_t keys) {
    fast_block_tiling bt = {t1, keys, 0, 0, 0, 1, 1, 0, 0};
    if (p->sequence) {
        bt.jend = p->causal ? t1 : p->T;
        bt.nseq = (bt.jend + keys - 1) / keys;
    }
    int64_t ndep = 0;
    if (moda_problem_has_depth(p)) {
        int64_t ue;
        fast_depth_tiling(p, keys, &bt.ns, &bt.nt);
        moda_depth_tokens(p, t0, &bt.us, &ue);
        bt.nsg = (moda_problem_slots(p) + bt.ns - 1) / bt.ns;
        ndep = (t1 - bt.us + bt.nt - 1) / bt.nt * bt.nsg;
    }
    bt.count = bt.nseq + ndep;
    return bt;
}

static inline fast_tile fast_block_tile(const moda_problem *p, const fast_block_tiling *bt, int64_t i) {
    if (i < bt->nseq) {
        fast_tile k = {0, i * bt->keys, fast_min((i + 1) * bt->keys, bt->jend), 0, 1};
        return k;
    }
    i -= bt->nseq;
    int64_t u = bt->us + (i / bt->nsg) * bt->nt, la = p->d0 + (i % bt->nsg) * bt->ns;
    fast_tile k = {1, u, fast_min(u + bt->nt, bt->t1), la, fast_min(la + bt->ns, p->d1)};
    return k;
}

/* Transposes the 8 x 8 block whose row j starts at rows[j] (row-major, 8 floats each) into 8 columns stored at
 * dst + c*ld, c < 8. Three rounds of two-input shuffles (pairs, quads, halves): portable vector-extension code
 * that becomes unpck/shuf/perm2f128 on AVX. */
MODA_FAST_INLINE void fast_transpose8(const float *const rows[8], float *dst, int64_t ld) {
    const fast_v8i lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
    const fast_v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const fast_v8i lo3 = {0, 1, 2, 3, 8, 9, 10, 11}, hi3 = {4, 5, 6, 7, 12, 13, 14, 15};
    fast_v8 v[8], t[8], u[8];
    for (int j = 0; j < 8; j++) v[j] = fast_ld(rows[j]);
    for (int j = 0; j < 8; j += 2) {
        t[j] = __builtin_shuffle(v[j], v[j + 1], lo1);
        t[j + 1] = __builtin_shuffle(v[j], v[j + 1], hi1);
    }
    for (int j = 0; j < 8; j += 4) {
        u[j] = __builtin_shuffle(t[j], t[j + 2], lo2);
        u[j + 1] = __builtin_shuffle(t[j], t[j + 2], hi2);
        u[j + 2] = __builtin_shuffle(t[j + 1], t[j + 3], lo2);
        u[j + 3] = __builtin_shuffle(t[j + 1], t[j + 3], hi2);
    }
    for (int c = 0; c < 4; c++) {
        fast_st(dst + c * ld, __builtin_shuffle(u[c], u[c + 4], lo3));
        fast_st(dst + (c + 4) * ld, __builtin_shuffle(u[c], u[c + 4], hi3));
    }
}

/* Loads the tile's keys as fp32: rows-major (key k at kr + k*ldr, when kr) and/or transposed (element i of
 * key k at kt + i*ldt + k, when kt). `width` is d for keys, dv for values; tmp holds 8 rows when kr is NULL.
 * Keys go 8 at a time so the transpose is done in 8 x 8 register blocks. */
MODA_FAST_INLINE void fast_load_keys(const moda_problem *p, const moda_operand *a, int64_t b, int64_t h,
                                     const fast_tile *k, int64_t width, float *kr, int64_t ldr, float *kt,
                                     int64_t ldt, float *tmp) {
    const int64_t ns = k->lb - k->la, nk = fast_tile_keys(k), wp = fast_round8(width);
    for (int64_t k0 = 0; k0 < nk; k0 += 8) {
        const int64_t n8 = fast_min(8, nk - k0);
        const float *rows[8];
        for (int64_t j = 0; j < n8; j++) {
            const int64_t key = k0 + j, u = k->ua + key / ns, l = k->la + key % ns;
            float *row = kr ? kr + key * ldr : tmp + j * wp;
            if (k->depth)
                fast_load_row(row, a, moda_off_kd(a, b, u, l, h, 0), a->stride[4], width, 1.0f);
            else
                fast_load_row(row, a, moda_off_k(a, b, u, h, 0), a->stride[3], width, 1.0f);
            rows[j] = row;
        }
        if (!kt) continue;
        int64_t i0 = 0;
        if (n8 == 8)
            for (; i0 + 8 <= width; i0 += 8) {
                const float *blk[8];
                for (int j = 0; j < 8; j++) blk[j] = rows[j] + i0;
                fast_transpose8(blk, kt + i0 * ldt + k0, ldt);
            }
        for (int64_t j = 0; j < n8; j++)
            for (int64_t i = i0; i < width; i++) kt[i * ldt + k0 + j] = rows[j][i];
    }
}

/* Loads the G query-like rows of tokens [t0, t1) of head h (q, o or dout: [B,T,Hk,G,*]) as fp32 rows
 * (row r = (t - t0)*G + g at dst + r*ld) and/or transposed (element i of row r at dt + i*ldt + r). */
MODA_FAST_INLINE void fast_load_rows(const moda_operand *a, int64_t G, int64_t b, int64_t h, int64_t t0, int64_t t1,
                                     int64_t width, float scale, float *dst, int64_t ld, float *dt, int64_t ldt,
                                     float *tmp) {
    int64_t r = 0;
    for (int64_t t = t0; t < t1; t++)
        for (int64_t g = 0; g < G; g++, r++) {
            float *row = dst ? dst + r * ld : tmp;
            fast_load_row(row, a, moda_off_q(a, b, t, h, g, 0), a->stride[4], width, scale);
            if (dt)
                for (int64_t i = 0; i < width; i++) dt[i * ldt + r] = row[i];
        }
}

/* ---- the GEMMs: C[M x N] (+)= op(A) . B, row-major fp32, N a multiple of 8; op(A)[m][k] = AT(m, k) ---- */
#define FAST_A_N(m_, k_) A[(m_) * lda + (k_)] /* A stored M x K */
#define FAST_A_T(m_, k_) A[(k_) * lda + (m_)] /* A stored K x M: C = A^T B */
#define FAST_MICRO(MR, NV, AT)                                                                                 \
    do {                                                                                                       \
        fast_v8 acc[MR][NV];                                                                                   \
        for (int i_ = 0; i_ < (MR); i_++)                                                                      \
            for (int v_ = 0; v_ < (NV); v_++)                                                                  \
                acc[i_][v_] = accumulate ? fast_ld(C + (m + i_) * ldc + n + 8 * v_) : (fast_v8){0};            \
        const float *b_ = B + n;                                                                               \
        for (int64_t k_ = 0; k_ < K; k_++, b_ += ldb) {                                                        \
            fast_v8 bv[NV];                                                                                    \
            for (int v_ = 0; v_ < (NV); v_++) bv[v_] = fast_ld(b_ + 8 * v_);                                   \
            for (int i_ = 0; i_ < (MR); i_++) {                                                                \
                float av = AT(m + i_, k_);                                                                     \
                for (int v_ = 0; v_ < (NV); v_++) acc[i_][v_] += av * bv[v_];                                  \
            }                                                                                                  \
        }                                                                                                      \
        for (int i_ = 0; i_ < (MR); i_++)                                                                      \
            for (int v_ = 0; v_ < (NV); v_++) fast_st(C + (m + i_) * ldc + n + 8 * v_, acc[i_][v_]);           \
    } while (0)

/* 4 x 24 blocks (12 accumulators of the 16 AVX2 registers), then the 16/8-column and single-row edges. */
#define FAST_GEMM_BODY(AT)                                                                                     \
    do {                                                                                                       \
        int64_t m = 0;                                                                                         \
        for (; m + 4 <= M; m += 4) {                                                                           \
            int64_t n = 0;                                                                                     \
            for (; n + 24 <= N; n += 24) FAST_MICRO(4, 3, AT);                                                 \
            if (N - n == 16) FAST_MICRO(4, 2, AT);                                                             \
            else if (N - n == 8) FAST_MICRO(4, 1, AT);                                                         \
        }                                                                                                      \
        for (; m < M; m++) {                                                                                   \
            int64_t n = 0;                                                                                     \
            for (; n + 24 <= N; n += 24) FAST_MICRO(1, 3, AT);                                                 \
            if (N - n == 16) FAST_MICRO(1, 2, AT);                                                             \
            else if (N - n == 8) FAST_MICRO(1, 1, AT);                                                         \
        }                                                                                                      \
    } while (0)

/* The k-loop order is fixed and every C element is one lane's chain of FMAs: results depend on neither the
 * thread nor the blocking, only on the clone (FMA or not), which is fixed for a given machine. */
__attribute__((unused)) MODA_FAST_CLONES static void fast_gemm(int64_t M, int64_t N, int64_t K, const float *A,
                                                                int64_t lda, const float *B, int64_t ldb, float *C,
                                                                int64_t ldc, int accumulate) {
    FAST_GEMM_BODY(FAST_A_N);
}
__attribute__((unused)) MODA_FAST_CLONES static void fast_gemm_tn(int64_t M, int64_t N, int64_t K, const float *A,
                                                                   int64_t lda, const float *B, int64_t ldb, float *C,
                                                                   int64_t ldc, int accumulate) {
    FAST_GEMM_BODY(FAST_A_T);
}

/* ---- threads and scratch ---- */
static inline int fast_threads(const moda_problem *p) {
#ifdef _OPENMP
    return p->num_threads > 0 ? p->num_threads : omp_get_max_threads();
#else
    (void)p;
    return 1;
#endif
}

static inline int fast_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* A bump allocator over one thread's scratch: 64-byte aligned float arrays. */
typedef struct fast_arena {
    char *base;
    size_t used;
} fast_arena;

static inline float *fast_take(fast_arena *a, int64_t floats) {
    float *r = a->base ? (float *)(a->base + a->used) : NULL;
    a->used += ((size_t)floats * sizeof(float) + FAST_ALIGN - 1) & ~(size_t)(FAST_ALIGN - 1);
    return r;
}

#endif
