/*
 * api.c - the public entry points: validate every argument (spec.md §5) into a moda_problem, then dispatch.
 *
 * Nothing here touches an output before validation has finished, so a failing call leaves every output
 * byte-identical. Backends receive a problem whose shapes agree, whose pointers are non-null where used, whose
 * extents fit in 64 bits and whose outputs do not alias inputs.
 */
#include "internal.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

/* ---- tensor constructors ---- */

moda_tensor moda_tensor_strided(void *data, moda_dtype dtype, moda_device device, int ndim, const int64_t *shape,
                                const int64_t *stride) {
    moda_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dtype;
    t.device = device;
    t.ndim = ndim;
    for (int i = 0; i < ndim && i < MODA_MAX_DIMS; i++) {
        t.shape[i] = shape[i];
        t.stride[i] = stride[i];
    }
    return t;
}

moda_tensor moda_tensor_contiguous(void *data, moda_dtype dtype, moda_device device, int ndim, const int64_t *shape) {
    int64_t stride[MODA_MAX_DIMS] = {0};
    int n = ndim < MODA_MAX_DIMS ? ndim : MODA_MAX_DIMS;
    int64_t s = 1;
    for (int i = n - 1; i >= 0; i--) {
        stride[i] = s;
        s *= shape[i] > 0 ? shape[i] : 1;
    }
    return moda_tensor_strided(data, dtype, device, ndim, shape, stride);
}

moda_tensor moda_tensor_q_standard(void *data, moda_dtype dtype, moda_device device, int64_t B, int64_t T, int64_t Hk,
                                   int64_t G, int64_t d) {
    const int64_t shape[5] = {B, T, Hk, G, d};
    return moda_tensor_contiguous(data, dtype, device, 5, shape);
}

moda_tensor moda_tensor_q_folded(void *data, moda_dtype dtype, moda_device device, int64_t B, int64_t T, int64_t Hk,
                                 int64_t G, int64_t d) {
    /* [B, T*G, Hk, d] with row t*G + g: g steps over Hk*d elements, h over d. */
    const int64_t shape[5] = {B, T, Hk, G, d};
    const int64_t stride[5] = {T * G * Hk * d, G * Hk * d, d, Hk * d, 1};
    return moda_tensor_strided(data, dtype, device, 5, shape, stride);
}

moda_options moda_default_options(void) {
    moda_options o;
    memset(&o, 0, sizeof o);
    o.causal = 1;
    o.sequence = 1;
    o.depth_mode = MODA_DEPTH_TOKEN;
    o.chunk_size = 64;
    o.depth_begin = 0;
    o.depth_end = MODA_DEPTH_ALL;
    o.scale = 0.0;
    o.depth_grad_mode = MODA_DEPTH_GRAD_OVERWRITE;
    o.deterministic = 1;
    o.num_threads = 0;
    return o;
}

/* ---- validation ---- */

enum { ROLE_Q, ROLE_K, ROLE_V, ROLE_KD, ROLE_VD, ROLE_O, ROLE_LSE, ROLE_DOUT, ROLE_DQ, ROLE_DK, ROLE_DV, ROLE_DKD,
       ROLE_DVD, ROLE_COUNT };

static const char *const role_name[ROLE_COUNT] = {"q", "k", "v", "kd", "vd", "o", "lse", "dout", "dq", "dk", "dv",
                                                  "dkd", "dvd"};
static const int role_ndim[ROLE_COUNT] = {5, 4, 4, 5, 5, 5, 4, 5, 5, 4, 4, 5, 5};
static const int role_is_output[ROLE_COUNT] = {0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1};
static const char *const role_dims[ROLE_COUNT] = {
    "[B, T, Hk, G, d]", "[B, T, Hk, d]",  "[B, T, Hk, dv]",       "[B, T, Lcap, Hk, d]", "[B, T, Lcap, Hk, dv]",
    "[B, T, Hk, G, dv]", "[B, T, Hk, G]", "[B, T, Hk, G, dv]",    "[B, T, Hk, G, d]",    "[B, T, Hk, d]",
    "[B, T, Hk, dv]",   "[B, T, Lcap, Hk, d]", "[B, T, Lcap, Hk, dv]"};

typedef struct call {
    const moda_tensor *t[ROLE_COUNT]; /* NULL: not passed */
    int used[ROLE_COUNT];             /* the call reads or writes this tensor */
    uintptr_t lo[ROLE_COUNT], hi[ROLE_COUNT]; /* byte range [lo, hi) of the used, non-empty tensors */
    int64_t within_lo[ROLE_COUNT], within_hi[ROLE_COUNT]; /* element range inside one token (dims >= 2) */
    int backward;
    int relaxed_dtypes; /* test hook: the reference accepts any dtype per operand */
} call;

/* Structure of one tensor on its own: rank, dtype, device, non-negative sizes/strides, 64-bit extents. */
static moda_status check_tensor(call *c, int role) {
    const moda_tensor *t = c->t[role];
    const char *name = role_name[role];
    if (t->ndim != role_ndim[role])
        return moda_fail(MODA_ERR_SHAPE_MISMATCH, "%s must be a %d-D view %s but has %d dimensions", name,
                         role_ndim[role], role_dims[role], t->ndim);
    if (moda_dtype_size(t->dtype) == 0)
        return moda_fail(MODA_ERR_INVALID_ARGUMENT, "%s has an unknown dtype (%d)", name, (int)t->dtype);
    if (t->device != MODA_CPU && t->device != MODA_CUDA)
        return moda_fail(MODA_ERR_INVALID_ARGUMENT, "%s has an unknown device (%d)", name, (int)t->device);
    int64_t numel = 1, extent = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0)
            return moda_fail(MODA_ERR_SHAPE_MISMATCH, "%s has a negative size %lld in dimension %d of %s", name,
                             (long long)t->shape[i], i, role_dims[role]);
        if (t->stride[i] < 0)
            return moda_fail(MODA_ERR_LAYOUT, "%s has a negative stride %lld in dimension %d; negative strides are not supported",
                             name, (long long)t->stride[i], i);
        int64_t span;
        if (__builtin_mul_overflow(numel, t->shape[i], &numel) ||
            (t->shape[i] > 0 && (__builtin_mul_overflow(t->shape[i] - 1, t->stride[i], &span) ||
                                 __builtin_add_overflow(extent, span, &extent))))
            return moda_fail(MODA_ERR_OVERFLOW, "%s: sizes x strides overflow 64 bits", name);
    }
    size_t esize = moda_dtype_size(t->dtype);
    int64_t bytes;
    if (numel > 0 && (__builtin_add_overflow(extent, 1, &extent) || __builtin_mul_overflow(extent, (int64_t)esize, &bytes) ||
                      (uint64_t)bytes > UINTPTR_MAX - (uintptr_t)t->data))
        return moda_fail(MODA_ERR_OVERFLOW, "%s: its extent of %lld elements overflows the address space", name,
                         (long long)extent);
    if (numel > 0 && !t->data)
        return moda_fail(MODA_ERR_NULL_POINTER, "%s has %lld elements but a NULL data pointer", name, (long long)numel);
    if (numel > 0 && ((uintptr_t)t->data % esize) != 0)
        return moda_fail(MODA_ERR_LAYOUT, "%s's data pointer is not aligned to its %zu-byte elements", name, esize);
    if (numel > 0 && role_is_output[role]) {
        /* A zero stride on an output dimension of size > 1 would make several results land on one element. */
        for (int i = 0; i < t->ndim; i++)
            if (t->shape[i] > 1 && t->stride[i] == 0)
                return moda_fail(MODA_ERR_OVERLAP, "output %s has stride 0 in dimension %d of size %lld: its elements would overlap",
                                 name, i, (long long)t->shape[i]);
    }
    c->lo[role] = (uintptr_t)t->data;
    c->hi[role] = numel > 0 ? (uintptr_t)t->data + (uintptr_t)extent * esize : (uintptr_t)t->data;
    /* Elements of one token, relative to the token's first element: used to accept packed layouts (q, k, v
     * or dq, dk, dv interleaved per token in one buffer) whose byte ranges overlap but whose elements do not. */
    int64_t w = 0;
    for (int i = 2; i < t->ndim; i++)
        if (t->shape[i] > 0) w += (t->shape[i] - 1) * t->stride[i];
    c->within_lo[role] = 0;
    c->within_hi[role] = w + 1;
    return MODA_OK;
}

/* Whether two used, non-empty tensors can share an element. Byte ranges that do not intersect cannot; ranges
 * that do are still disjoint when both are laid out token by token with the same batch/token strides and
 * their per-token element ranges do not meet within one token pitch (packed QKV-style buffers). */
static int may_overlap(const call *c, int a, int b) {
    if (c->hi[a] <= c->lo[b] || c->hi[b] <= c->lo[a]) return 0;
    const moda_tensor *ta = c->t[a], *tb = c->t[b];
    if (ta->dtype != tb->dtype) return 1;
    size_t es = moda_dtype_size(ta->dtype);
    int64_t s0 = ta->stride[0], s1 = ta->stride[1];
    if (tb->stride[0] != s0 || tb->stride[1] != s1 || s1 <= 0) return 1;
    int64_t T = ta->shape[1], B = ta->shape[0];
    if (B > 1 && s0 < T * s1) return 1; /* batches would interleave tokens */
    uintptr_t base = c->lo[a] < c->lo[b] ? c->lo[a] : c->lo[b];
    if ((c->lo[a] - base) % es || (c->lo[b] - base) % es) return 1;
    int64_t oa = (int64_t)((c->lo[a] - base) / es), ob = (int64_t)((c->lo[b] - base) / es);
    int64_t a0 = oa + c->within_lo[a], a1 = oa + c->within_hi[a];
    int64_t b0 = ob + c->within_lo[b], b1 = ob + c->within_hi[b];
    if (a1 > s1 || b1 > s1) return 1; /* a token's elements spill into the next token's pitch */
    return !(a1 <= b0 || b1 <= a0);
}

static int64_t dim_of(const call *c, int role, int i) { return c->t[role]->shape[i]; }

static moda_status expect_dim(const call *c, int role, int i, int64_t want, const char *sym, int ref_role) {
    int64_t got = dim_of(c, role, i);
    if (got != want)
        return moda_fail(MODA_ERR_SHAPE_MISMATCH, "%s has %s = %lld (dimension %d of %s) but %s has %s = %lld",
                         role_name[role], sym, (long long)got, i, role_dims[role], role_name[ref_role], sym,
                         (long long)want);
    return MODA_OK;
}

#define TRY(x)                           \
    do {                                 \
        moda_status st_ = (x);           \
        if (st_ != MODA_OK) return st_;  \
    } while (0)

static moda_status check_options(const moda_options *o) {
    if (o->causal != 0 && o->causal != 1)
        return moda_fail(MODA_ERR_INVALID_ARGUMENT, "options.causal must be 0 or 1, not %d", o->causal);
    if (o->sequence != 0 && o->sequence != 1)
        return moda_fail(MODA_ERR_INVALID_ARGUMENT, "options.sequence must be 0 or 1, not %d", o->sequence);
    if (o->depth_mode != MODA_DEPTH_TOKEN && o->depth_mode != MODA_DEPTH_CHUNK)
        return moda_fail(MODA_ERR_INVALID_ARGUMENT, "options.depth_mode must be MODA_DEPTH_TOKEN or MODA_DEPTH_CHUNK, not %d",
                         (int)o->depth_mode);
    if (o->depth_mode == MODA_DEPTH_CHUNK && !o->causal)
        return moda_fail(MODA_ERR_INVALID_ARGUMENT,
                         "chunk depth mode is defined for causal attention only: set options.causal = 1 or use MODA_DEPTH_TOKEN");
    if (o->depth_mode == MODA_DEPTH_CHUNK && o->chunk_size < 1)
        return moda_fail(MODA_ERR_INVALID_ARGUMENT, "chunk depth mode needs options.chunk_size >= 1, not %lld",
                         (long long)o->chunk_size);
    if (!isfinite(o->scale))
        return moda_fail(MODA_ERR_INVALID_ARGUMENT, "options.scale must be finite (0 selects 1/sqrt(d))");
    if (o->depth_grad_mode != MODA_DEPTH_GRAD_OVERWRITE && o->depth_grad_mode != MODA_DEPTH_GRAD_ACCUMULATE)
        return moda_fail(MODA_ERR_INVALID_ARGUMENT, "options.depth_grad_mode must be overwrite or accumulate, not %d",
                         (int)o->depth_grad_mode);
    if (o->deterministic != 0 && o->deterministic != 1)
        return moda_fail(MODA_ERR_INVALID_ARGUMENT, "options.deterministic must be 0 or 1, not %d", o->deterministic);
    if (o->num_threads < 0)
        return moda_fail(MODA_ERR_INVALID_ARGUMENT, "options.num_threads must be >= 0 (0: default), not %d",
                         o->num_threads);
    if (o->depth_begin < 0)
        return moda_fail(MODA_ERR_DEPTH_RANGE, "options.depth_begin must be >= 0, not %lld", (long long)o->depth_begin);
    if (o->depth_end < 0 && o->depth_end != MODA_DEPTH_ALL)
        return moda_fail(MODA_ERR_DEPTH_RANGE, "options.depth_end must be >= 0 or MODA_DEPTH_ALL, not %lld",
                         (long long)o->depth_end);
    return MODA_OK;
}

static void fill_operand(moda_operand *op, const moda_tensor *t) {
    memset(op, 0, sizeof *op);
    if (!t) return;
    op->data = t->data;
    op->dtype = t->dtype;
    for (int i = 0; i < t->ndim; i++) op->stride[i] = t->stride[i];
}

/* Validates a whole call and fills *p. `c` says which tensors were passed and whether this is the backward. */
static moda_status validate(call *c, const moda_options *opt_in, moda_problem *p) {
    moda_options opt = opt_in ? *opt_in : moda_default_options();
    TRY(check_options(&opt));
    memset(p, 0, sizeof *p);

    if (!c->t[ROLE_Q]) return moda_fail(MODA_ERR_NULL_POINTER, "q is required (got a NULL tensor)");
    if (!c->t[ROLE_O] && !(c->backward < 0))
        return moda_fail(MODA_ERR_NULL_POINTER, "o is required (got a NULL tensor)");

    /* Which tensors this call uses. The depth part needs kd/vd only when a slot is visible, which depends on
     * Lcap; resolve that first from kd when it is passed. */
    int64_t Lcap = 0;
    if (c->t[ROLE_KD] && c->t[ROLE_KD]->ndim == 5) Lcap = c->t[ROLE_KD]->shape[2];
    int64_t d0 = opt.depth_begin, d1 = opt.depth_end == MODA_DEPTH_ALL ? Lcap : opt.depth_end;
    if (d0 > d1)
        return moda_fail(MODA_ERR_DEPTH_RANGE, "the depth range [%lld, %lld) is reversed: depth_begin must be <= depth_end",
                         (long long)d0, (long long)d1);
    int depth = d1 > d0;
    int bwd = c->backward > 0;
    c->used[ROLE_Q] = 1;
    c->used[ROLE_O] = c->backward >= 0;
    c->used[ROLE_K] = c->used[ROLE_V] = opt.sequence;
    c->used[ROLE_KD] = c->used[ROLE_VD] = depth;
    c->used[ROLE_LSE] = bwd || c->t[ROLE_LSE] != NULL;
    c->used[ROLE_DOUT] = c->used[ROLE_DQ] = bwd;
    c->used[ROLE_DK] = c->used[ROLE_DV] = bwd && opt.sequence;
    c->used[ROLE_DKD] = c->used[ROLE_DVD] = bwd && depth;

    for (int r = 0; r < ROLE_COUNT; r++) {
        if (!c->used[r]) continue;
        if (!c->t[r]) {
            if (r == ROLE_KD || r == ROLE_VD || r == ROLE_DKD || r == ROLE_DVD)
                return moda_fail(MODA_ERR_NULL_POINTER,
                                 "%s is required: the depth range [%lld, %lld) makes %lld slots visible (pass %s, or an empty range)",
                                 role_name[r], (long long)d0, (long long)d1, (long long)(d1 - d0), role_name[r]);
            if (r == ROLE_K || r == ROLE_V || r == ROLE_DK || r == ROLE_DV)
                return moda_fail(MODA_ERR_NULL_POINTER,
                                 "%s is required while options.sequence = 1 (set it to 0 for depth-only attention)",
                                 role_name[r]);
            return moda_fail(MODA_ERR_NULL_POINTER, "%s is required (got a NULL tensor)", role_name[r]);
        }
        TRY(check_tensor(c, r));
    }

    /* Sizes come from q (B, T, Hk, G, d) and o (dv); everything else must agree. */
    const moda_tensor *q = c->t[ROLE_Q];
    int64_t B = q->shape[0], T = q->shape[1], Hk = q->shape[2], G = q->shape[3], d = q->shape[4];
    int ref_dv = c->used[ROLE_O] ? ROLE_O : (c->used[ROLE_V] ? ROLE_V : ROLE_VD);
    int64_t dv = c->used[ref_dv] ? c->t[ref_dv]->shape[c->t[ref_dv]->ndim - 1] : d;
    if (Hk < 1) return moda_fail(MODA_ERR_SHAPE_MISMATCH, "q has Hk = %lld key/value heads; at least 1 is needed", (long long)Hk);
    if (G < 1)
        return moda_fail(MODA_ERR_SHAPE_MISMATCH, "q has G = %lld query heads per key/value head; at least 1 is needed (Hq = Hk*G)",
                         (long long)G);
    if (d < 1) return moda_fail(MODA_ERR_SHAPE_MISMATCH, "q has head dimension d = %lld; at least 1 is needed", (long long)d);
    if (dv < 1) return moda_fail(MODA_ERR_SHAPE_MISMATCH, "the value head dimension dv = %lld; at least 1 is needed", (long long)dv);

    for (int r = 0; r < ROLE_COUNT; r++) {
        if (!c->used[r] || r == ROLE_Q) continue;
        TRY(expect_dim(c, r, 0, B, "B", ROLE_Q));
        TRY(expect_dim(c, r, 1, T, "T", ROLE_Q));
        int is_depth = r == ROLE_KD || r == ROLE_VD || r == ROLE_DKD || r == ROLE_DVD;
        int hdim = is_depth ? 3 : 2;
        TRY(expect_dim(c, r, hdim, Hk, "Hk", ROLE_Q));
        if (r == ROLE_O || r == ROLE_DOUT || r == ROLE_DQ || r == ROLE_LSE) TRY(expect_dim(c, r, 3, G, "G", ROLE_Q));
        int last = role_ndim[r] - 1;
        if (r == ROLE_K || r == ROLE_KD || r == ROLE_DQ || r == ROLE_DK || r == ROLE_DKD)
            TRY(expect_dim(c, r, last, d, "d", ROLE_Q));
        if (r == ROLE_V || r == ROLE_VD || r == ROLE_O || r == ROLE_DOUT || r == ROLE_DV || r == ROLE_DVD)
            TRY(expect_dim(c, r, last, dv, "dv", ref_dv));
        if (is_depth && r != ROLE_KD) TRY(expect_dim(c, r, 2, Lcap, "Lcap (depth slots)", ROLE_KD));
    }
    if (d1 > Lcap)
        return moda_fail(MODA_ERR_DEPTH_RANGE, "%s has %lld slots but the depth range ends at %lld",
                         c->t[ROLE_KD] ? "kd" : "the depth buffer (kd absent)", (long long)Lcap, (long long)d1);

    /* dtypes: one storage dtype; lse float32 (float64 with float64 inputs); dkd/dvd may be float32. */
    moda_dtype dt = q->dtype;
    if (!c->relaxed_dtypes) {
        for (int r = 0; r < ROLE_COUNT; r++) {
            if (!c->used[r] || r == ROLE_Q) continue;
            moda_dtype got = c->t[r]->dtype;
            if (r == ROLE_LSE) {
                if (got != MODA_F32 && !(dt == MODA_F64 && got == MODA_F64))
                    return moda_fail(MODA_ERR_UNSUPPORTED, "lse must be f32%s, not %s", dt == MODA_F64 ? " or f64" : "",
                                     moda_dtype_name(got));
            } else if (r == ROLE_DKD || r == ROLE_DVD) {
                if (got != dt && !(got == MODA_F32 && (dt == MODA_F16 || dt == MODA_BF16)))
                    return moda_fail(MODA_ERR_UNSUPPORTED, "%s must be %s%s, not %s", role_name[r], moda_dtype_name(dt),
                                     dt == MODA_F16 || dt == MODA_BF16 ? " or f32" : "", moda_dtype_name(got));
            } else if (got != dt) {
                return moda_fail(MODA_ERR_UNSUPPORTED, "%s is %s but q is %s: q, k, v, kd, vd, o, dout, dq, dk, dv share one dtype",
                                 role_name[r], moda_dtype_name(got), moda_dtype_name(dt));
            }
        }
    }

    /* devices */
    moda_device dev = q->device;
    for (int r = 0; r < ROLE_COUNT; r++)
        if (c->used[r] && c->t[r]->device != dev)
            return moda_fail(MODA_ERR_WRONG_DEVICE, "%s is on the %s but q is on the %s: all tensors of a call share a device",
                             role_name[r], c->t[r]->device == MODA_CUDA ? "GPU" : "CPU", dev == MODA_CUDA ? "GPU" : "CPU");
    if (c->relaxed_dtypes && dev != MODA_CPU)
        return moda_fail(MODA_ERR_WRONG_DEVICE, "the float64 reference runs on the CPU only");
    if (dev == MODA_CUDA && dt == MODA_F64)
        return moda_fail(MODA_ERR_UNSUPPORTED, "f64 (the reference implementation) runs on the CPU only; use f16 or bf16 on CUDA");

    /* aliasing: no output may share an element with an input or another output */
    for (int a = 0; a < ROLE_COUNT; a++) {
        if (!c->used[a] || !role_is_output[a] || c->hi[a] == c->lo[a]) continue;
        for (int b = 0; b < ROLE_COUNT; b++) {
            if (b == a || !c->used[b] || c->hi[b] == c->lo[b]) continue;
            if (role_is_output[b] && b < a) continue; /* each output pair once */
            if (may_overlap(c, a, b))
                return moda_fail(MODA_ERR_OVERLAP, "%s overlaps %s %s in memory; give the output its own buffer",
                                 role_name[a], role_is_output[b] ? "output" : "input", role_name[b]);
        }
    }

    p->B = B; p->T = T; p->Hk = Hk; p->G = G; p->d = d; p->dv = dv;
    p->Lcap = Lcap; p->d0 = d0; p->d1 = d1;
    p->causal = opt.causal;
    p->sequence = opt.sequence;
    p->chunk = opt.depth_mode == MODA_DEPTH_CHUNK;
    p->chunk_size = p->chunk ? opt.chunk_size : 1;
    p->scale = opt.scale != 0.0 ? opt.scale : 1.0 / sqrt((double)d);
    p->dtype = dt;
    p->device = dev;
    p->num_threads = opt.num_threads;
    p->accumulate_depth = opt.depth_grad_mode == MODA_DEPTH_GRAD_ACCUMULATE;
    p->deterministic = opt.deterministic;
    moda_operand *ops[ROLE_COUNT] = {&p->q, &p->k, &p->v, &p->kd, &p->vd, &p->o, &p->lse,
                                     &p->grad_o, &p->grad_q, &p->grad_k, &p->grad_v, &p->grad_kd, &p->grad_vd};
    for (int r = 0; r < ROLE_COUNT; r++) fill_operand(ops[r], c->used[r] ? c->t[r] : NULL);

    if (dev == MODA_CUDA) TRY(moda_cuda_check(p, bwd));
    return MODA_OK;
}

static int problem_empty(const moda_problem *p) { return p->B == 0 || p->T == 0; }

/* ---- entry points ---- */

/* The tensor table of a call; NULL where an entry point has no such argument. */
static void call_init(call *c, int backward, const moda_tensor *q, const moda_tensor *k, const moda_tensor *v,
                      const moda_tensor *kd, const moda_tensor *vd, const moda_tensor *o, const moda_tensor *lse) {
    memset(c, 0, sizeof *c);
    c->backward = backward;
    c->t[ROLE_Q] = q; c->t[ROLE_K] = k; c->t[ROLE_V] = v; c->t[ROLE_KD] = kd; c->t[ROLE_VD] = vd;
    c->t[ROLE_O] = o; c->t[ROLE_LSE] = lse;
}

static void call_grads(call *c, const moda_tensor *dout, const moda_tensor *dq, const moda_tensor *dk,
                       const moda_tensor *dv, const moda_tensor *dkd, const moda_tensor *dvd) {
    c->t[ROLE_DOUT] = dout; c->t[ROLE_DQ] = dq; c->t[ROLE_DK] = dk; c->t[ROLE_DV] = dv; c->t[ROLE_DKD] = dkd;
    c->t[ROLE_DVD] = dvd;
}

moda_status moda_forward(const moda_options *options, const moda_tensor *q, const moda_tensor *k, const moda_tensor *v,
                         const moda_tensor *kd, const moda_tensor *vd, const moda_tensor *o, const moda_tensor *lse,
                         void *stream) {
    call c;
    call_init(&c, 0, q, k, v, kd, vd, o, lse);
    moda_problem p;
    TRY(validate(&c, options, &p));
    moda_clear_error();
    if (problem_empty(&p)) return MODA_OK;
    if (p.device == MODA_CUDA) return moda_cuda_forward(&p, stream);
    if (p.dtype == MODA_F64) return moda_cpu_reference_forward(&p, MODA_F64);
    return moda_cpu_fast_forward(&p);
}

moda_status moda_backward_workspace_size(const moda_options *options, const moda_tensor *q, const moda_tensor *k,
                                         const moda_tensor *v, const moda_tensor *kd, const moda_tensor *vd,
                                         size_t *bytes) {
    if (!bytes) return moda_fail(MODA_ERR_NULL_POINTER, "moda_backward_workspace_size: bytes is NULL");
    call c;
    call_init(&c, -1, q, k, v, kd, vd, NULL, NULL); /* inputs only: enough to size the workspace */
    moda_problem p;
    TRY(validate(&c, options, &p));
    moda_clear_error();
    if (p.device == MODA_CUDA) *bytes = moda_cuda_backward_workspace(&p);
    else if (p.dtype == MODA_F64) *bytes = 0;
    else *bytes = moda_cpu_fast_backward_workspace(&p);
    return MODA_OK;
}

moda_status moda_backward(const moda_options *options, const moda_tensor *q, const moda_tensor *k, const moda_tensor *v,
                          const moda_tensor *kd, const moda_tensor *vd, const moda_tensor *o, const moda_tensor *lse,
                          const moda_tensor *dout, const moda_tensor *dq, const moda_tensor *dk, const moda_tensor *dv,
                          const moda_tensor *dkd, const moda_tensor *dvd, void *workspace, size_t workspace_bytes,
                          void *stream) {
    call c;
    call_init(&c, 1, q, k, v, kd, vd, o, lse);
    call_grads(&c, dout, dq, dk, dv, dkd, dvd);
    moda_problem p;
    TRY(validate(&c, options, &p));
    if (p.device == MODA_CUDA) {
        size_t need = moda_cuda_backward_workspace(&p);
        if (need > 0 && (!workspace || workspace_bytes < need))
            return moda_fail(MODA_ERR_WORKSPACE, "the CUDA backward needs %zu bytes of device workspace but got %zu%s", need,
                             workspace ? workspace_bytes : (size_t)0, workspace ? "" : " (NULL)");
    } else if (p.dtype != MODA_F64) {
        size_t need = moda_cpu_fast_backward_workspace(&p);
        if (workspace && workspace_bytes < need)
            return moda_fail(MODA_ERR_WORKSPACE, "the CPU backward needs %zu bytes of workspace but got %zu (pass NULL to let it allocate)",
                             need, workspace_bytes);
    }
    moda_clear_error();
    if (problem_empty(&p)) return MODA_OK;
    if (p.device == MODA_CUDA) return moda_cuda_backward(&p, workspace, workspace_bytes, stream);
    if (p.dtype == MODA_F64) return moda_cpu_reference_backward(&p, MODA_F64);
    return moda_cpu_fast_backward(&p, workspace, workspace_bytes);
}

/* ---- test hooks: the reference over mixed dtypes (see internal.h) ---- */

moda_status moda_testing_reference_forward(const moda_options *options, const moda_tensor *q, const moda_tensor *k,
                                           const moda_tensor *v, const moda_tensor *kd, const moda_tensor *vd,
                                           const moda_tensor *o, const moda_tensor *lse, moda_dtype round_dtype) {
    call c;
    call_init(&c, 0, q, k, v, kd, vd, o, lse);
    c.relaxed_dtypes = 1;
    moda_problem p;
    TRY(validate(&c, options, &p));
    moda_clear_error();
    if (problem_empty(&p)) return MODA_OK;
    return moda_cpu_reference_forward(&p, round_dtype);
}

moda_status moda_testing_reference_backward(const moda_options *options, const moda_tensor *q, const moda_tensor *k,
                                            const moda_tensor *v, const moda_tensor *kd, const moda_tensor *vd,
                                            const moda_tensor *o, const moda_tensor *lse, const moda_tensor *dout,
                                            const moda_tensor *dq, const moda_tensor *dk, const moda_tensor *dv,
                                            const moda_tensor *dkd, const moda_tensor *dvd, moda_dtype round_dtype) {
    call c;
    call_init(&c, 1, q, k, v, kd, vd, o, lse);
    call_grads(&c, dout, dq, dk, dv, dkd, dvd);
    c.relaxed_dtypes = 1;
    moda_problem p;
    TRY(validate(&c, options, &p));
    moda_clear_error();
    if (problem_empty(&p)) return MODA_OK;
    return moda_cpu_reference_backward(&p, round_dtype);
}

int moda_cuda_device_count(void) { return moda_cuda_devices(); }
