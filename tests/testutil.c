/* testutil.c - see testutil.h. */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

long tu_checks, tu_failures;

int tu_finish(const char *suite) {
    printf("%s: %ld passed, %ld failed\n", suite, tu_checks - tu_failures, tu_failures);
    return tu_failures ? 1 : 0;
}

int tu_quick(void) {
    const char *q = getenv("MODA_TEST_QUICK");
    return q && *q && strcmp(q, "0") != 0;
}

int tu_quick_select(tu_case *c, int i, int j) {
    if (!tu_quick()) return 1;
    if (c->T > 40) c->T = 40;
    return j == i % 3;
}

/* ---- RNG ---- */
uint64_t tu_next(tu_rng *r) {
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double tu_uniform(tu_rng *r) { return (double)(tu_next(r) >> 11) * (1.0 / 9007199254740992.0); }

double tu_normal(tu_rng *r) {
    double u1 = tu_uniform(r), u2 = tu_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

tu_rng tu_rng_from_env(const char *suite) {
    const char *s = getenv("MODA_TEST_SEED");
    uint64_t seed = s && *s ? strtoull(s, NULL, 0) : ((uint64_t)time(NULL) * 1000003u) ^ (uint64_t)getpid();
    printf("%s: seed %llu (rerun with MODA_TEST_SEED=%llu)\n", suite, (unsigned long long)seed, (unsigned long long)seed);
    fflush(stdout);
    tu_rng r = {seed};
    return r;
}

/* ---- cases ---- */
const char *tu_case_str(const tu_case *c) {
    static _Thread_local char buf[256];
    static const char *const layouts[] = {"standard", "folded", "strided"};
    snprintf(buf, sizeof buf, "B=%lld T=%lld Hk=%lld G=%lld d=%lld dv=%lld L=%lld[%lld,%lld) %s %s %s%s%lld %s%s",
             (long long)c->B, (long long)c->T, (long long)c->Hk, (long long)c->G, (long long)c->d, (long long)c->dv,
             (long long)c->Lcap, (long long)c->d0, (long long)c->d1, c->causal ? "causal" : "noncausal",
             c->sequence ? "seq" : "depth-only", c->chunk ? "chunk" : "token", c->chunk ? "=" : "",
             c->chunk ? (long long)c->chunk_size : 0LL, layouts[c->layout % 3], c->scale != 0 ? " scaled" : "");
    return buf;
}

moda_options tu_case_options(const tu_case *c) {
    moda_options o = moda_default_options();
    o.causal = c->causal;
    o.sequence = c->sequence;
    o.depth_mode = c->chunk ? MODA_DEPTH_CHUNK : MODA_DEPTH_TOKEN;
    o.chunk_size = c->chunk ? c->chunk_size : 64;
    o.depth_begin = c->d0;
    o.depth_end = c->d1;
    o.scale = c->scale;
    return o;
}

/* ---- tensors ---- */
const moda_tensor *tu_arg(const tu_tensor *t) { return t->alloc ? &t->view : NULL; }

moda_tensor tu_rebase(const tu_tensor *t, void *new_alloc, moda_device device) {
    moda_tensor v = t->view;
    v.data = new_alloc ? (char *)new_alloc + ((char *)t->view.data - (char *)t->alloc) : NULL;
    v.device = device;
    return v;
}

void tu_tensor_free(tu_tensor *t) {
    free(t->alloc);
    memset(t, 0, sizeof *t);
}

/* Allocates a view of `shape` stored with physical dimension order `perm` (perm[ndim-1] == ndim-1: the
 * innermost dimension stays innermost), the innermost physical rows padded by `pad` elements, and the view
 * starting `lead` elements into the allocation. Padding and lead bytes are poison-checked by tests. */
static int alloc_view(tu_tensor *t, int ndim, const int64_t *shape, moda_dtype dtype, const int *perm, int64_t pad,
                      int64_t lead) {
    memset(t, 0, sizeof *t);
    int64_t stride[MODA_MAX_DIMS];
    int64_t s = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        int dim = perm[i];
        stride[dim] = s;
        s *= shape[dim] + (i == ndim - 1 ? pad : 0);
    }
    size_t es = moda_dtype_size(dtype);
    t->bytes = (size_t)(s + lead) * es + es; /* + one element of tail padding */
    t->alloc = malloc(t->bytes);
    if (!t->alloc) return -1;
    memset(t->alloc, 0xFF, t->bytes);
    t->view = moda_tensor_strided((char *)t->alloc + lead * es, dtype, MODA_CPU, ndim, shape, stride);
    return 0;
}

static int alloc_role(tu_tensor *t, const tu_case *c, int ndim, const int64_t *shape, moda_dtype dtype, int q_like) {
    static const int ident[5] = {0, 1, 2, 3, 4};
    static const int folded[5] = {0, 1, 3, 2, 4};  /* physical [B, T, G, Hk, d]: row t*G + g */
    static const int swap_bt[5] = {1, 0, 2, 3, 4}; /* physical [T, B, ...] */
    const int *perm = ident;
    int64_t pad = 0, lead = 0;
    if (c->layout == TU_LAYOUT_FOLDED && q_like) perm = folded;
    if (c->layout == TU_LAYOUT_STRIDED) {
        perm = swap_bt;
        pad = 8; /* keeps 16-byte row alignment for 16-bit dtypes, which GPU paths may require */
        lead = 8;
    }
    return alloc_view(t, ndim, shape, dtype, perm, pad, lead);
}

int tu_problem_alloc(tu_problem *p, const tu_case *c, moda_dtype dtype, moda_dtype grad_dtype) {
    memset(p, 0, sizeof *p);
    p->c = *c;
    p->dtype = dtype;
    p->grad_dtype = grad_dtype;
    const int64_t qs[5] = {c->B, c->T, c->Hk, c->G, c->d}, os[5] = {c->B, c->T, c->Hk, c->G, c->dv};
    const int64_t ls[4] = {c->B, c->T, c->Hk, c->G};
    const int64_t ks[4] = {c->B, c->T, c->Hk, c->d}, vs[4] = {c->B, c->T, c->Hk, c->dv};
    const int64_t kds[5] = {c->B, c->T, c->Lcap, c->Hk, c->d}, vds[5] = {c->B, c->T, c->Lcap, c->Hk, c->dv};
    moda_dtype lse_dtype = dtype == MODA_F64 ? MODA_F64 : MODA_F32;
    int err = 0;
    err |= alloc_role(&p->q, c, 5, qs, dtype, 1);
    err |= alloc_role(&p->o, c, 5, os, dtype, 1);
    err |= alloc_role(&p->lse, c, 4, ls, lse_dtype, 1);
    err |= alloc_role(&p->dout, c, 5, os, dtype, 1);
    err |= alloc_role(&p->dq, c, 5, qs, dtype, 1);
    if (c->sequence) {
        err |= alloc_role(&p->k, c, 4, ks, dtype, 0);
        err |= alloc_role(&p->v, c, 4, vs, dtype, 0);
        err |= alloc_role(&p->dk, c, 4, ks, dtype, 0);
        err |= alloc_role(&p->dv, c, 4, vs, dtype, 0);
    }
    if (c->Lcap > 0) {
        err |= alloc_role(&p->kd, c, 5, kds, dtype, 0);
        err |= alloc_role(&p->vd, c, 5, vds, dtype, 0);
        err |= alloc_role(&p->dkd, c, 5, kds, grad_dtype, 0);
        err |= alloc_role(&p->dvd, c, 5, vds, grad_dtype, 0);
    }
    if (err) {
        tu_problem_free(p);
        return -1;
    }
    return 0;
}

void tu_problem_free(tu_problem *p) {
    tu_tensor *all[] = {&p->q, &p->k, &p->v, &p->kd, &p->vd, &p->o, &p->lse, &p->dout, &p->dq, &p->dk, &p->dv, &p->dkd, &p->dvd};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) tu_tensor_free(all[i]);
}

/* Calls fn(offset, logical_index, ctx) for every logical element of a view. */
typedef void (*elem_fn)(int64_t off, int64_t idx, void *ctx);
static void for_each(const moda_tensor *v, elem_fn fn, void *ctx) {
    int64_t sh[5] = {1, 1, 1, 1, 1}, st[5] = {0, 0, 0, 0, 0};
    int n = v->ndim;
    for (int i = 0; i < n; i++) {
        sh[5 - n + i] = v->shape[i];
        st[5 - n + i] = v->stride[i];
    }
    int64_t idx = 0;
    for (int64_t a = 0; a < sh[0]; a++)
        for (int64_t b = 0; b < sh[1]; b++)
            for (int64_t c = 0; c < sh[2]; c++)
                for (int64_t d = 0; d < sh[3]; d++)
                    for (int64_t e = 0; e < sh[4]; e++)
                        fn(a * st[0] + b * st[1] + c * st[2] + d * st[3] + e * st[4], idx++, ctx);
}

typedef struct {
    const moda_tensor *v;
    tu_rng *r;
} fill_ctx;
static void fill_one(int64_t off, int64_t idx, void *vc) {
    fill_ctx *c = vc;
    moda_store(c->v->data, c->v->dtype, off, tu_normal(c->r));
}
static void fill_normal(tu_tensor *t, tu_rng *r) {
    if (!t->alloc) return;
    fill_ctx c = {&t->view, r};
    for_each(&t->view, fill_one, &c);
    t->poisoned = 0;
}

void tu_poison(tu_tensor *t) {
    if (!t->alloc) return;
    memset(t->alloc, 0xFF, t->bytes);
    t->poisoned = 1;
}

void tu_problem_randomize(tu_problem *p, tu_rng *r) {
    fill_normal(&p->q, r);
    fill_normal(&p->k, r);
    fill_normal(&p->v, r);
    fill_normal(&p->kd, r);
    fill_normal(&p->vd, r);
    fill_normal(&p->dout, r);
    fill_normal(&p->dkd, r);
    fill_normal(&p->dvd, r);
    tu_poison(&p->o);
    tu_poison(&p->lse);
    tu_poison(&p->dq);
    tu_poison(&p->dk);
    tu_poison(&p->dv);
}

typedef struct {
    const moda_tensor *src;
    const moda_tensor *dst;
    int64_t *offs;
} copy_ctx;
static void collect_off(int64_t off, int64_t idx, void *vc) { ((copy_ctx *)vc)->offs[idx] = off; }
static void copy_one(int64_t off, int64_t idx, void *vc) {
    copy_ctx *c = vc;
    int64_t soff = c->offs[idx];
    if (c->src->dtype == c->dst->dtype) {
        size_t es = moda_dtype_size(c->src->dtype);
        memcpy((char *)c->dst->data + off * (int64_t)es, (const char *)c->src->data + soff * (int64_t)es, es);
    } else {
        moda_store(c->dst->data, c->dst->dtype, off, moda_load(c->src->data, c->src->dtype, soff));
    }
}

static int64_t view_numel(const moda_tensor *v) {
    int64_t n = 1;
    for (int i = 0; i < v->ndim; i++) n *= v->shape[i];
    return n;
}

void tu_copy(tu_tensor *dst, const tu_tensor *src) {
    if (!dst->alloc || !src->alloc) return;
    int64_t n = view_numel(&src->view);
    copy_ctx c = {&src->view, &dst->view, malloc(sizeof(int64_t) * (size_t)(n + 1))};
    if (!c.offs) return;
    for_each(&src->view, collect_off, &c);
    for_each(&dst->view, copy_one, &c);
    free(c.offs);
}

/* ---- references ---- */
moda_status tu_reference_forward(const tu_problem *p, tu_problem *out, moda_dtype round_dtype) {
    if (tu_problem_alloc(out, &p->c, MODA_F64, MODA_F64)) return MODA_ERR_OUT_OF_MEMORY;
    moda_options o = tu_case_options(&p->c);
    return moda_testing_reference_forward(&o, &p->q.view, tu_arg(&p->k), tu_arg(&p->v), tu_arg(&p->kd), tu_arg(&p->vd),
                                          &out->o.view, &out->lse.view, round_dtype);
}

moda_status tu_reference_backward(const tu_problem *p, tu_problem *out, moda_dtype round_dtype, int accumulate) {
    if (tu_problem_alloc(out, &p->c, MODA_F64, MODA_F64)) return MODA_ERR_OUT_OF_MEMORY;
    /* Prior depth-gradient content (poison, or the values accumulate mode adds to) carries over, so that
     * slots the call must not touch compare equal and accumulate mode has the same starting point. */
    tu_copy(&out->dkd, &p->dkd);
    tu_copy(&out->dvd, &p->dvd);
    moda_options o = tu_case_options(&p->c);
    o.depth_grad_mode = accumulate ? MODA_DEPTH_GRAD_ACCUMULATE : MODA_DEPTH_GRAD_OVERWRITE;
    return moda_testing_reference_backward(&o, &p->q.view, tu_arg(&p->k), tu_arg(&p->v), tu_arg(&p->kd), tu_arg(&p->vd),
                                           &p->o.view, &p->lse.view, &p->dout.view, &out->dq.view, tu_arg(&out->dk),
                                           tu_arg(&out->dv), tu_arg(&out->dkd), tu_arg(&out->dvd), round_dtype);
}

/* ---- comparison ---- */
typedef struct {
    const moda_tensor *test, *ref, *lowp;
    int64_t *ref_offs, *lowp_offs;
    tu_compare_result *res;
    double num2, den2;
} cmp_ctx;
static void collect_ref(int64_t off, int64_t idx, void *vc) { ((cmp_ctx *)vc)->ref_offs[idx] = off; }
static void collect_lowp(int64_t off, int64_t idx, void *vc) { ((cmp_ctx *)vc)->lowp_offs[idx] = off; }
static void cmp_one(int64_t off, int64_t idx, void *vc) {
    cmp_ctx *c = vc;
    double x = moda_load(c->test->data, c->test->dtype, off);
    double r = moda_load(c->ref->data, c->ref->dtype, c->ref_offs[idx]);
    if (isnan(r)) { /* an element the call must leave alone */
        if (!isnan(x)) {
            c->res->nonfinite++;
            c->res->worst = idx;
        }
        return;
    }
    if (isinf(r)) {
        if (x != r) {
            c->res->nonfinite++;
            c->res->worst = idx;
        }
        return;
    }
    if (!isfinite(x)) {
        c->res->nonfinite++;
        c->res->worst = idx;
        return;
    }
    double e = fabs(x - r);
    if (e > c->res->max_err) {
        c->res->max_err = e;
        if (c->res->nonfinite == 0) c->res->worst = idx;
    }
    if (c->lowp) {
        double l = moda_load(c->lowp->data, c->lowp->dtype, c->lowp_offs[idx]);
        double le = isfinite(l) ? fabs(l - r) : 0.0;
        if (le > c->res->lowp_err) c->res->lowp_err = le;
    }
    c->num2 += e * e;
    c->den2 += r * r;
}

tu_compare_result tu_compare(const tu_tensor *test, const tu_tensor *ref64, const tu_tensor *lowp, double abs_tol) {
    tu_compare_result res;
    memset(&res, 0, sizeof res);
    int64_t n = view_numel(&test->view);
    cmp_ctx c = {&test->view, &ref64->view, lowp ? &lowp->view : NULL, malloc(sizeof(int64_t) * (size_t)(n + 1)),
                 malloc(sizeof(int64_t) * (size_t)(n + 1)), &res, 0, 0};
    if (!c.ref_offs || !c.lowp_offs) {
        free(c.ref_offs);
        free(c.lowp_offs);
        res.nonfinite = -1;
        return res;
    }
    for_each(&ref64->view, collect_ref, &c);
    if (lowp) for_each(&lowp->view, collect_lowp, &c);
    for_each(&test->view, cmp_one, &c);
    free(c.ref_offs);
    free(c.lowp_offs);
    res.bound = 2.0 * res.lowp_err + abs_tol;
    res.rel_l2 = c.den2 > 0 ? sqrt(c.num2 / c.den2) : sqrt(c.num2);
    double guide = test->view.dtype == MODA_BF16 ? 1e-2 : test->view.dtype == MODA_F16 ? 2e-3 : test->view.dtype == MODA_F32 ? 1e-5 : 1e-12;
    res.pass = res.nonfinite == 0 && res.max_err <= res.bound && (c.den2 == 0 || res.rel_l2 <= guide);
    return res;
}

typedef struct {
    unsigned char *mark;
    size_t es, base;
} pad_ctx;
static void mark_one(int64_t off, int64_t idx, void *vc) {
    pad_ctx *c = vc;
    memset(c->mark + c->base + (size_t)off * c->es, 1, c->es);
}

int tu_padding_intact(const tu_tensor *t) {
    if (!t->alloc) return 1;
    pad_ctx c = {calloc(t->bytes, 1), moda_dtype_size(t->view.dtype), (size_t)((char *)t->view.data - (char *)t->alloc)};
    if (!c.mark) return 0;
    for_each(&t->view, mark_one, &c);
    int ok = 1;
    for (size_t i = 0; i < t->bytes; i++)
        if (!c.mark[i] && ((unsigned char *)t->alloc)[i] != 0xFF) {
            ok = 0;
            break;
        }
    free(c.mark);
    return ok;
}

int tu_expect_close(const char *what, const tu_case *c, const tu_tensor *test, const tu_tensor *ref64,
                    const tu_tensor *lowp, double abs_tol) {
    tu_compare_result r = tu_compare(test, ref64, lowp, abs_tol);
    const char *verbose = getenv("MODA_TEST_VERBOSE");
    int pad_ok = !test->poisoned || tu_padding_intact(test);
    if (!r.pass || (verbose && *verbose))
        fprintf(r.pass ? stdout : stderr, "%s %s [%s]: max_err %.3g bound %.3g (lowp %.3g) rel_l2 %.3g nonfinite %lld worst #%lld\n",
                r.pass ? "ok  " : "FAIL", what, tu_case_str(c), r.max_err, r.bound, r.lowp_err, r.rel_l2,
                (long long)r.nonfinite, (long long)r.worst);
    TU_CHECK(r.pass, "%s out of tolerance", what);
    TU_CHECK(pad_ok, "%s: bytes outside the view were written [%s]", what, tu_case_str(c));
    return r.pass && pad_ok;
}
