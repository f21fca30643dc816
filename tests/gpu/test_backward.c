/* test_backward.c - the CUDA backward against the float64 reference (spec.md §3, §4).
 *
 * For every case: fresh random inputs, O and LSE from the float64 reference forward stored in the storage
 * dtype (so the backward is checked on its own), every array copied to the device allocation for
 * allocation (padding and lead bytes included), outputs poisoned, the workspace poisoned. Then:
 *   - dq, dk, dv, dkd, dvd against the float64 reference with the tolerance of the same-precision reference;
 *   - bytes outside each view, and depth slots outside [d0, d1), byte-identical afterwards;
 *   - a second run gives bit-identical gradients (deterministic mode).
 * The non-deterministic mode (fp32 atomics for dQ in the fused pass) gets the same comparison against the
 * reference, without the bitwise check. The tensor-core cases also run the kernels the default path
 * replaces, through the process switches of backward_common.cuh, and on compute capability 9.x the sm_90a
 * pass (non-deterministic) and its dK/dV-only form in the deterministic two-pass path
 * (the default there; with the bitwise check), each checked to have run; MODA_CUDA_BWD_HOPPER_DKDV=0 keeps the
 * mma.sync dK/dV pass it replaces under test.
 * Plus sampled float64 checks on benchmark-sized shapes, and with --bench a timing of the target shapes
 * (MODA_TEST_NONDET=1: in the non-deterministic mode).
 *
 * Usage: gpu_test_backward [--bench]     (MODA_TEST_SEED, MODA_TEST_QUICK, MODA_TEST_VERBOSE as elsewhere)
 */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "testutil.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_util.h"

/* Private hook of the CUDA backend (src/cuda/backward.cu): the kernel family the last backward ran. */
MODA_API const char *moda_testing_cuda_last_backward(void);
MODA_API const char *moda_testing_cuda_last_depth_backward(void);

/* Whether this device runs the sm_90a backward (compute capability 9.x); MODA_TEST_BWD_HOPPER=0 skips it. */
static int hopper_backward_testable(void) {
    const char *e = getenv("MODA_TEST_BWD_HOPPER");
    if (e && !strcmp(e, "0")) return 0;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
        return 0;
    return major == 9;
}

/* Device mirror of a host tu_tensor: same bytes, same offsets. */
static void *to_device(const tu_tensor *t) {
    if (!t->alloc) return NULL;
    void *d = NULL;
    CUDA_OK(cudaMalloc(&d, t->bytes));
    CUDA_OK(cudaMemcpy(d, t->alloc, t->bytes, cudaMemcpyHostToDevice));
    return d;
}
static void from_device(tu_tensor *t, const void *d) {
    if (t->alloc) CUDA_OK(cudaMemcpy(t->alloc, d, t->bytes, cudaMemcpyDeviceToHost));
}

enum { Q, K, V, KD, VD, O, LSE, DOUT, DQ, DK, DV, DKD, DVD, NT };
static tu_tensor *slot(tu_problem *p, int i) {
    tu_tensor *all[NT] = {&p->q, &p->k, &p->v, &p->kd, &p->vd, &p->o, &p->lse, &p->dout, &p->dq, &p->dk, &p->dv, &p->dkd, &p->dvd};
    return all[i];
}

typedef struct dev_problem {
    void *a[NT];
    moda_tensor v[NT];
    void *ws;
    size_t ws_bytes;
} dev_problem;

static const moda_tensor *darg(const dev_problem *d, int i) { return d->a[i] ? &d->v[i] : NULL; }

static void dev_upload(dev_problem *d, tu_problem *p) {
    memset(d, 0, sizeof *d);
    for (int i = 0; i < NT; i++) {
        d->a[i] = to_device(slot(p, i));
        d->v[i] = tu_rebase(slot(p, i), d->a[i], MODA_CUDA);
    }
}
static void dev_free(dev_problem *d) {
    for (int i = 0; i < NT; i++) cudaFree(d->a[i]);
    cudaFree(d->ws);
}

static moda_status dev_backward(dev_problem *d, const moda_options *o) {
    if (!d->ws) {
        moda_status s = moda_backward_workspace_size(o, &d->v[Q], darg(d, K), darg(d, V), darg(d, KD), darg(d, VD),
                                                     &d->ws_bytes);
        if (s != MODA_OK) return s;
        CUDA_OK(cudaMalloc(&d->ws, d->ws_bytes ? d->ws_bytes : 1));
    }
    /* unwritten workspace must not leak into results */
    CUDA_OK(cudaMemset(d->ws, 0xFF, d->ws_bytes ? d->ws_bytes : 1));
    moda_status s = moda_backward(o, &d->v[Q], darg(d, K), darg(d, V), darg(d, KD), darg(d, VD), &d->v[O], &d->v[LSE],
                                  &d->v[DOUT], &d->v[DQ], darg(d, DK), darg(d, DV), darg(d, DKD), darg(d, DVD), d->ws,
                                  d->ws_bytes, NULL);
    CUDA_OK(cudaDeviceSynchronize());
    return s;
}

/* 1 when every element of depth slots outside [d0, d1) has the same bytes in a and b. */
static int invisible_slots_identical(const tu_tensor *a, const tu_tensor *b, const tu_case *c) {
    if (!a->alloc) return 1;
    const moda_tensor *v = &a->view;
    const size_t es = moda_dtype_size(v->dtype);
    for (int64_t bb = 0; bb < v->shape[0]; bb++)
        for (int64_t t = 0; t < v->shape[1]; t++)
            for (int64_t l = 0; l < v->shape[2]; l++) {
                if (l >= c->d0 && l < c->d1) continue;
                for (int64_t h = 0; h < v->shape[3]; h++)
                    for (int64_t i = 0; i < v->shape[4]; i++) {
                        int64_t off = bb * v->stride[0] + t * v->stride[1] + l * v->stride[2] + h * v->stride[3] +
                                      i * v->stride[4];
                        if (memcmp((char *)a->view.data + off * es, (char *)b->view.data + off * es, es)) return 0;
                    }
            }
    return 1;
}

/* One case in one dtype: the full comparison against the reference, then (deterministic mode, overwrite) the
 * bitwise repeatability check. */
static void check_case(const tu_case *c, moda_dtype dt, moda_dtype gdt, int accumulate, int det, tu_rng *r) {
    tu_problem p, got, r64, rlo, fwd;
    if (tu_problem_alloc(&p, c, dt, gdt) || tu_problem_alloc(&got, c, dt, gdt)) {
        TU_CHECK(0, "allocation failed [%s]", tu_case_str(c));
        return;
    }
    tu_problem_randomize(&p, r);
    if (!accumulate) {
        tu_poison(&p.dkd);
        tu_poison(&p.dvd);
    }
    /* O, LSE: the float64 forward stored in the storage dtype, exactly what a forward would hand over */
    TU_CHECK_STATUS(tu_reference_forward(&p, &fwd, MODA_F64), MODA_OK);
    tu_copy(&p.o, &fwd.o);
    tu_copy(&p.lse, &fwd.lse);
    tu_problem_free(&fwd);

    dev_problem d;
    dev_upload(&d, &p);
    moda_options o = tu_case_options(c);
    o.depth_grad_mode = accumulate ? MODA_DEPTH_GRAD_ACCUMULATE : MODA_DEPTH_GRAD_OVERWRITE;
    o.deterministic = det;
    moda_status st = dev_backward(&d, &o);
    TU_CHECK(st == MODA_OK, "backward returned %s (%s) [%s]", moda_status_string(st), moda_last_error(), tu_case_str(c));
    for (int i = DQ; i < NT; i++) {
        from_device(slot(&got, i), d.a[i]);
        slot(&got, i)->poisoned = 1; /* padding bytes are 0xFF in every output allocation */
    }

    TU_CHECK_STATUS(tu_reference_backward(&p, &r64, MODA_F64, accumulate), MODA_OK);
    TU_CHECK_STATUS(tu_reference_backward(&p, &rlo, dt, accumulate), MODA_OK);
    static const char *names[NT] = {0, 0, 0, 0, 0, 0, 0, 0, "dq", "dk", "dv", "dkd", "dvd"};
    char what[64];
    for (int i = DQ; i < NT; i++) {
        if (!slot(&got, i)->alloc) continue;
        snprintf(what, sizeof what, "%s %s%s%s%s", names[i], moda_dtype_name(dt), i >= DKD && gdt != dt ? "/f32" : "",
                 i >= DKD && accumulate ? " acc" : "", det ? "" : " nondet");
        tu_expect_close(what, c, slot(&got, i), slot(&r64, i), slot(&rlo, i), 1e-5);
    }
    TU_CHECK(invisible_slots_identical(&got.dkd, &p.dkd, c) && invisible_slots_identical(&got.dvd, &p.dvd, c),
             "depth slots outside [%lld, %lld) were modified [%s]", (long long)c->d0, (long long)c->d1, tu_case_str(c));

    if (!accumulate && det) { /* determinism: poison the outputs, run again, compare bit for bit */
        for (int i = DQ; i < NT; i++)
            if (d.a[i]) CUDA_OK(cudaMemset(d.a[i], 0xFF, slot(&got, i)->bytes));
        st = dev_backward(&d, &o);
        TU_CHECK(st == MODA_OK, "second backward returned %s", moda_status_string(st));
        int same = 1;
        for (int i = DQ; i < NT; i++) {
            tu_tensor *t = slot(&got, i);
            if (!t->alloc) continue;
            void *again = malloc(t->bytes);
            CUDA_OK(cudaMemcpy(again, d.a[i], t->bytes, cudaMemcpyDeviceToHost));
            if (memcmp(again, t->alloc, t->bytes)) same = 0;
            free(again);
        }
        TU_CHECK(same, "two runs differ bitwise [%s %s]", tu_case_str(c), moda_dtype_name(dt));
    }
    dev_free(&d);
    tu_problem_free(&r64);
    tu_problem_free(&rlo);
    tu_problem_free(&got);
    tu_problem_free(&p);
}

/* ---- sampled float64 check on a benchmark-sized problem (the full reference would take minutes) ---- */
/* One element as double through the public conversion (the private moda_load is not exported). */
static double ld(const moda_tensor *t, int64_t off) {
    double x;
    moda_convert(&x, MODA_F64, (const char *)t->data + off * (int64_t)moda_dtype_size(t->dtype), t->dtype, 1);
    return x;
}
static int64_t off5(const moda_tensor *t, int64_t a, int64_t b, int64_t c, int64_t d, int64_t e) {
    return a * t->stride[0] + b * t->stride[1] + c * t->stride[2] + d * t->stride[3] + e * t->stride[4];
}
static int64_t off4(const moda_tensor *t, int64_t a, int64_t b, int64_t c, int64_t d) {
    return a * t->stride[0] + b * t->stride[1] + c * t->stride[2] + d * t->stride[3];
}

/* P and dz of row (b,t,h,g) against key vector kv (d) / value vv (dv) given as views and offsets. */
static void row_key(const tu_problem *p, int64_t b, int64_t t, int64_t h, int64_t g, const moda_tensor *kt,
                    int64_t koff, int64_t kstr, const moda_tensor *vt, int64_t voff, int64_t vstr, double s,
                    double delta, double *prob, double *dz) {
    const tu_case *c = &p->c;
    double z = 0, dp = 0;
    for (int64_t i = 0; i < c->d; i++) z += ld(&p->q.view, off5(&p->q.view, b, t, h, g, i)) * ld(kt, koff + i * kstr);
    for (int64_t i = 0; i < c->dv; i++)
        dp += ld(&p->dout.view, off5(&p->dout.view, b, t, h, g, i)) * ld(vt, voff + i * vstr);
    double pr = exp(s * z - ld(&p->lse.view, off4(&p->lse.view, b, t, h, g)));
    *prob = pr;
    *dz = pr * (dp - delta);
}
static double row_delta(const tu_problem *p, int64_t b, int64_t t, int64_t h, int64_t g) {
    double s = 0;
    for (int64_t i = 0; i < p->c.dv; i++)
        s += ld(&p->o.view, off5(&p->o.view, b, t, h, g, i)) * ld(&p->dout.view, off5(&p->dout.view, b, t, h, g, i));
    return s;
}

/* Accumulates |got - ref|^2 and |ref|^2 over sampled vectors. */
typedef struct { double num, den; } l2acc;
static void acc_vec(l2acc *a, const double *ref, const moda_tensor *got, int64_t off, int64_t stride, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        double x = ld(got, off + i * stride);
        double e = isfinite(x) ? x - ref[i] : 1e300;
        a->num += e * e;
        a->den += ref[i] * ref[i];
    }
}

static void sampled_check(const tu_case *c, moda_dtype dt, int det, tu_rng *r) {
    tu_problem p, got;
    if (tu_problem_alloc(&p, c, dt, dt) || tu_problem_alloc(&got, c, dt, dt)) {
        TU_CHECK(0, "allocation failed [%s]", tu_case_str(c));
        return;
    }
    tu_problem_randomize(&p, r);
    tu_poison(&p.dkd);
    tu_poison(&p.dvd);
    /* O and LSE from the CPU path in the storage dtype (fast, and the backward is checked given them) */
    moda_options o = tu_case_options(c);
    TU_CHECK_STATUS(moda_forward(&o, &p.q.view, tu_arg(&p.k), tu_arg(&p.v), tu_arg(&p.kd), tu_arg(&p.vd), &p.o.view,
                                 &p.lse.view, NULL),
                    MODA_OK);
    dev_problem d;
    dev_upload(&d, &p);
    o.deterministic = det;
    moda_status st = dev_backward(&d, &o);
    TU_CHECK(st == MODA_OK, "backward returned %s (%s) [%s]", moda_status_string(st), moda_last_error(), tu_case_str(c));
    for (int i = DQ; i < NT; i++) from_device(slot(&got, i), d.a[i]);

    const double s = 1.0 / sqrt((double)c->d);
    const int samples = 24;
    l2acc adq = {0, 0}, adk = {0, 0}, adv = {0, 0}, adkd = {0, 0}, advd = {0, 0};
    double *ra = calloc((size_t)(c->d + c->dv), sizeof(double)), *rb = ra + c->d;
    for (int n = 0; n < samples; n++) {
        int64_t b = (int64_t)(tu_uniform(r) * c->B), h = (int64_t)(tu_uniform(r) * c->Hk);
        int64_t t = n == 0 ? c->T - 1 : (int64_t)(tu_uniform(r) * c->T), g = (int64_t)(tu_uniform(r) * c->G);
        /* dq of row (b,t,h,g) */
        double delta = row_delta(&p, b, t, h, g), pr, dz;
        memset(ra, 0, sizeof(double) * (size_t)c->d);
        for (int64_t j = 0; j <= (c->causal ? t : c->T - 1); j++) {
            row_key(&p, b, t, h, g, &p.k.view, off4(&p.k.view, b, j, h, 0), p.k.view.stride[3], &p.v.view,
                    off4(&p.v.view, b, j, h, 0), p.v.view.stride[3], s, delta, &pr, &dz);
            for (int64_t i = 0; i < c->d; i++) ra[i] += s * dz * ld(&p.k.view, off4(&p.k.view, b, j, h, i));
        }
        for (int64_t l = c->d0; l < c->d1; l++) {
            row_key(&p, b, t, h, g, &p.kd.view, off5(&p.kd.view, b, t, l, h, 0), p.kd.view.stride[4], &p.vd.view,
                    off5(&p.vd.view, b, t, l, h, 0), p.vd.view.stride[4], s, delta, &pr, &dz);
            for (int64_t i = 0; i < c->d; i++) ra[i] += s * dz * ld(&p.kd.view, off5(&p.kd.view, b, t, l, h, i));
        }
        acc_vec(&adq, ra, &got.dq.view, off5(&got.dq.view, b, t, h, g, 0), got.dq.view.stride[4], c->d);
        /* dk, dv of key (b, t, h): every row t' >= t, all g */
        memset(ra, 0, sizeof(double) * (size_t)(c->d + c->dv));
        for (int64_t u = c->causal ? t : 0; u < c->T; u++)
            for (int64_t gg = 0; gg < c->G; gg++) {
                double du = row_delta(&p, b, u, h, gg);
                row_key(&p, b, u, h, gg, &p.k.view, off4(&p.k.view, b, t, h, 0), p.k.view.stride[3], &p.v.view,
                        off4(&p.v.view, b, t, h, 0), p.v.view.stride[3], s, du, &pr, &dz);
                for (int64_t i = 0; i < c->d; i++) ra[i] += s * dz * ld(&p.q.view, off5(&p.q.view, b, u, h, gg, i));
                for (int64_t i = 0; i < c->dv; i++) rb[i] += pr * ld(&p.dout.view, off5(&p.dout.view, b, u, h, gg, i));
            }
        acc_vec(&adk, ra, &got.dk.view, off4(&got.dk.view, b, t, h, 0), got.dk.view.stride[3], c->d);
        acc_vec(&adv, rb, &got.dv.view, off4(&got.dv.view, b, t, h, 0), got.dv.view.stride[3], c->dv);
        /* dkd, dvd of slot (b, t, l, h): the G rows of token t */
        if (c->d1 > c->d0) {
            int64_t l = c->d0 + (int64_t)(tu_uniform(r) * (double)(c->d1 - c->d0));
            memset(ra, 0, sizeof(double) * (size_t)(c->d + c->dv));
            for (int64_t gg = 0; gg < c->G; gg++) {
                double du = row_delta(&p, b, t, h, gg);
                row_key(&p, b, t, h, gg, &p.kd.view, off5(&p.kd.view, b, t, l, h, 0), p.kd.view.stride[4], &p.vd.view,
                        off5(&p.vd.view, b, t, l, h, 0), p.vd.view.stride[4], s, du, &pr, &dz);
                for (int64_t i = 0; i < c->d; i++) ra[i] += s * dz * ld(&p.q.view, off5(&p.q.view, b, t, h, gg, i));
                for (int64_t i = 0; i < c->dv; i++) rb[i] += pr * ld(&p.dout.view, off5(&p.dout.view, b, t, h, gg, i));
            }
            acc_vec(&adkd, ra, &got.dkd.view, off5(&got.dkd.view, b, t, l, h, 0), got.dkd.view.stride[4], c->d);
            acc_vec(&advd, rb, &got.dvd.view, off5(&got.dvd.view, b, t, l, h, 0), got.dvd.view.stride[4], c->dv);
        }
    }
    free(ra);
    const double guide = dt == MODA_BF16 ? 1e-2 : 2e-3;
    const char *nm[5] = {"dq", "dk", "dv", "dkd", "dvd"};
    l2acc *all[5] = {&adq, &adk, &adv, &adkd, &advd};
    for (int i = 0; i < 5; i++) {
        if (all[i]->den == 0) continue;
        double rel = sqrt(all[i]->num / all[i]->den);
        printf("sampled %s %s%s [%s]: rel_l2 %.3g\n", nm[i], moda_dtype_name(dt), det ? "" : " nondet",
               tu_case_str(c), rel);
        TU_CHECK(rel <= guide, "sampled %s rel_l2 %.3g > %.3g [%s]", nm[i], rel, guide, tu_case_str(c));
    }
    dev_free(&d);
    tu_problem_free(&got);
    tu_problem_free(&p);
}

/* ---- timing of the target shapes (issue 4): forward (if the CUDA forward runs) and backward ---- */
static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* Fills a whole allocation with uniform values in [-1.7, 1.7) (bf16 or f32) from a counter hash: the timed
 * shapes hold billions of elements, too many for the normal sampler; values only need to be non-trivial. */
static void fast_fill(tu_tensor *t, uint64_t seed, float lo, float span) {
    if (!t->alloc) return;
    const int bf = t->view.dtype == MODA_BF16;
    const int64_t n = (int64_t)(t->bytes / (bf ? 2 : 4));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        uint64_t z = (uint64_t)i * 0x9e3779b97f4a7c15ull + seed;
        z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9ull;
        z ^= z >> 29;
        float x = lo + span * (float)(z >> 40) * (1.0f / 16777216.0f);
        if (bf) {
            uint32_t u;
            memcpy(&u, &x, 4);
            ((uint16_t *)t->alloc)[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        } else {
            ((float *)t->alloc)[i] = x;
        }
    }
}

static void bench(tu_rng *r) {
    struct { const char *name; tu_case c; } shapes[] = {
        {"S1", {1, 16384, 8, 8, 64, 64, 64, 0, 64, 1, 1, 0, 64, TU_LAYOUT_STANDARD, 0}},
        {"S2", {8, 4096, 8, 2, 64, 64, 72, 0, 72, 1, 1, 0, 64, TU_LAYOUT_STANDARD, 0}},
        {"S3", {1, 1024, 8, 8, 64, 64, 64, 0, 64, 1, 1, 0, 64, TU_LAYOUT_STANDARD, 0}},
        {"S5", {1, 8192, 8, 4, 128, 128, 64, 0, 64, 1, 1, 0, 64, TU_LAYOUT_STANDARD, 0}},
        {"S1-seq", {1, 16384, 8, 8, 64, 64, 0, 0, 0, 1, 1, 0, 64, TU_LAYOUT_STANDARD, 0}},
        {"S2-seq", {8, 4096, 8, 2, 64, 64, 0, 0, 0, 1, 1, 0, 64, TU_LAYOUT_STANDARD, 0}},
    };
    printf("%-7s %10s %10s %10s\n", "shape", "fwd ms", "bwd ms", "fwd+bwd");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const tu_case *c = &shapes[s].c;
        tu_problem p;
        if (tu_problem_alloc(&p, c, MODA_BF16, MODA_BF16)) continue;
        uint64_t seed = tu_next(r);
        for (int i = 0; i < NT; i++) fast_fill(slot(&p, i), seed + 7919u * (uint64_t)i, -1.7f, 3.4f);
        fast_fill(&p.lse, seed, 6.f, 2.f); /* used only if there is no CUDA forward: finite, plausible */
        dev_problem d;
        dev_upload(&d, &p);
        moda_options o = tu_case_options(c);
        const char *nd = getenv("MODA_TEST_NONDET");
        if (nd && nd[0] == '1') o.deterministic = 0;
        cudaEvent_t e0, e1;
        CUDA_OK(cudaEventCreate(&e0));
        CUDA_OK(cudaEventCreate(&e1));
        float fwd[25], bwd[25];
        int fwd_ok = 1, bwd_ok = 1;
        moda_status st = moda_forward(&o, &d.v[Q], darg(&d, K), darg(&d, V), darg(&d, KD), darg(&d, VD), &d.v[O],
                                      &d.v[LSE], NULL);
        if (st != MODA_OK) { /* no CUDA forward: time the backward on the random O and LSE uploaded above */
            fwd_ok = 0;
            printf("(forward: %s)\n", moda_last_error());
            CUDA_OK(cudaMemcpy(d.a[O], p.o.alloc, p.o.bytes, cudaMemcpyHostToDevice));
            CUDA_OK(cudaMemcpy(d.a[LSE], p.lse.alloc, p.lse.bytes, cudaMemcpyHostToDevice));
        }
        if (dev_backward(&d, &o) != MODA_OK) bwd_ok = 0;
        for (int it = 0; it < 3 + 25; it++) { /* 3 warm-ups */
            if (fwd_ok) {
                CUDA_OK(cudaEventRecord(e0, NULL));
                moda_forward(&o, &d.v[Q], darg(&d, K), darg(&d, V), darg(&d, KD), darg(&d, VD), &d.v[O], &d.v[LSE], NULL);
                CUDA_OK(cudaEventRecord(e1, NULL));
                CUDA_OK(cudaEventSynchronize(e1));
                if (it >= 3) CUDA_OK(cudaEventElapsedTime(&fwd[it - 3], e0, e1));
            }
            if (bwd_ok) {
                CUDA_OK(cudaEventRecord(e0, NULL));
                moda_backward(&o, &d.v[Q], darg(&d, K), darg(&d, V), darg(&d, KD), darg(&d, VD), &d.v[O], &d.v[LSE],
                              &d.v[DOUT], &d.v[DQ], darg(&d, DK), darg(&d, DV), darg(&d, DKD), darg(&d, DVD), d.ws,
                              d.ws_bytes, NULL);
                CUDA_OK(cudaEventRecord(e1, NULL));
                CUDA_OK(cudaEventSynchronize(e1));
                if (it >= 3) CUDA_OK(cudaEventElapsedTime(&bwd[it - 3], e0, e1));
            }
        }
        qsort(fwd, 25, sizeof(float), cmp_float);
        qsort(bwd, 25, sizeof(float), cmp_float);
        double f = fwd_ok ? fwd[12] : NAN, b = bwd_ok ? bwd[12] : NAN;
        printf("%-7s %10.3f %10.3f %10.3f   (median of 25; %s)\n", shapes[s].name, f, b, f + b, tu_case_str(c));
        fflush(stdout);
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
        dev_free(&d);
        tu_problem_free(&p);
    }
}

int main(int argc, char **argv) {
    tu_rng r = tu_rng_from_env("gpu_test_backward");
    if (moda_cuda_device_count() <= 0) {
        printf("gpu_test_backward: no CUDA device\n");
        return 77;
    }
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
        bench(&r);
        return 0;
    }
    /* {B, T, Hk, G, d, dv, Lcap, d0, d1, causal, sequence, chunk, C, layout, scale} */
    const tu_case grid[] = {
        /* generic path: odd sizes, every variant */
        {1, 1, 1, 1, 16, 16, 1, 0, 1, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
        {2, 77, 2, 3, 80, 48, 9, 2, 9, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
        {1, 77, 1, 3, 80, 80, 0, 0, 0, 0, 1, 0, 1, TU_LAYOUT_FOLDED, 0},
        {2, 33, 2, 2, 24, 40, 7, 0, 7, 1, 1, 1, 5, TU_LAYOUT_STRIDED, 0},
        {1, 40, 1, 3, 32, 32, 3, 1, 2, 1, 1, 1, 1, TU_LAYOUT_STANDARD, 0.3},
        {1, 70, 2, 2, 16, 16, 2, 0, 2, 1, 1, 1, 64, TU_LAYOUT_FOLDED, 0},
        {1, 50, 2, 3, 48, 16, 7, 3, 7, 1, 0, 0, 1, TU_LAYOUT_STANDARD, 0},  /* depth-only, token */
        {1, 50, 1, 2, 48, 48, 4, 0, 4, 1, 0, 1, 5, TU_LAYOUT_STRIDED, 0},   /* depth-only, chunk */
        {1, 9, 1, 2, 8, 8, 5, 2, 2, 1, 0, 0, 1, TU_LAYOUT_STANDARD, 0},     /* depth-only, empty range */
        {1, 20, 1, 32, 16, 16, 64, 0, 64, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
        {1, 1, 2, 3, 256, 200, 3, 0, 3, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
        /* tensor-core path: d = dv in {64, 128}, T not a multiple of the tiles */
        {1, 1, 1, 1, 64, 64, 1, 0, 1, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
        {2, 77, 2, 3, 64, 64, 7, 2, 7, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
        {1, 130, 2, 8, 64, 64, 64, 0, 64, 1, 1, 0, 1, TU_LAYOUT_FOLDED, 0},
        {1, 100, 1, 4, 64, 64, 0, 0, 0, 0, 1, 0, 1, TU_LAYOUT_STRIDED, 0},
        {1, 129, 2, 1, 64, 64, 8, 1, 8, 1, 1, 1, 64, TU_LAYOUT_STANDARD, 0},
        {1, 95, 1, 5, 128, 128, 4, 0, 4, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
        {2, 67, 1, 2, 128, 128, 3, 0, 3, 0, 1, 0, 1, TU_LAYOUT_STRIDED, 0},
        {1, 64, 1, 32, 64, 64, 2, 0, 2, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
        /* several key blocks of the fused pass (128 keys), so that the ordered dQ adds wait on each other */
        {1, 300, 1, 4, 64, 64, 5, 0, 5, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
        {1, 270, 1, 2, 64, 64, 0, 0, 0, 0, 1, 0, 1, TU_LAYOUT_STRIDED, 0},
        /* index 21: in the quick grid (every third case), so the sanitizers see a d = 128 tensor-core case */
        {1, 281, 1, 2, 128, 128, 3, 0, 3, 1, 1, 0, 1, TU_LAYOUT_FOLDED, 0},
        /* the tensor-core depth stage over several 16-slot chunks, the last one partial */
        {1, 45, 2, 6, 64, 64, 40, 3, 40, 1, 1, 0, 1, TU_LAYOUT_STRIDED, 0},
        {1, 33, 1, 7, 128, 128, 50, 5, 50, 1, 0, 0, 1, TU_LAYOUT_FOLDED, 0}, /* depth-only */
        /* index 24: in the quick grid, so the sanitizers see three chunks with two in flight */
        {2, 40, 2, 8, 64, 64, 48, 0, 47, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
    };
    const int ncases = (int)(sizeof grid / sizeof grid[0]);
    const int quick = tu_quick();
    const int hopper = hopper_backward_testable();
    int hopper_ran = 0, hopper_cases = 0, dkdv_ran = 0, dkdv_cases = 0, tdc_ran = 0, tdc_cases = 0;
    int tdc_f32_ran = 0, tdc_f32_cases = 0;
    for (int i = 0; i < ncases; i++) {
        const tu_case *c = &grid[i];
        if (quick && i % 3 != 0) continue;
        check_case(c, MODA_BF16, MODA_BF16, 0, 1, &r);
        /* the tensor-core depth stage must have run where it applies (standard layout: aligned rows) */
        const int tdc_case = c->Lcap > 0 && c->d1 > c->d0 && !c->chunk && c->d == c->dv && (c->d == 64 || c->d == 128) &&
                             c->G <= 8 && c->layout == TU_LAYOUT_STANDARD;
        tdc_cases += tdc_case;
        tdc_ran += tdc_case && !strcmp(moda_testing_cuda_last_depth_backward(), "tdc");
        check_case(c, MODA_F16, MODA_F16, 0, 1, &r);
        if (c->Lcap > 0) {
            check_case(c, MODA_BF16, MODA_F32, 1, 1, &r);
            check_case(c, MODA_F16, MODA_F16, 1, 1, &r);
            if (!quick) check_case(c, MODA_BF16, MODA_F32, 0, 1, &r);
        }
        if (!quick && i < 3) check_case(c, MODA_F32, MODA_F32, 0, 1, &r);
        if (i >= 11) {
            /* the non-deterministic mode: the fused pass (split as the shape decides, and unsplit as the
             * big shapes run it), against the reference */
            setenv("MODA_CUDA_BWD_HOPPER", "0", 1); /* the mma.sync pass, which the sm_90a one replaces there */
            check_case(c, MODA_BF16, MODA_BF16, 0, 0, &r);
            setenv("MODA_CUDA_BWD_NOSPLIT", "1", 1);
            check_case(c, MODA_F16, c->Lcap > 0 ? MODA_F32 : MODA_F16, c->Lcap > 0, 0, &r);
            unsetenv("MODA_CUDA_BWD_HOPPER");
            /* the fused pass with ordered dQ adds (deterministic, opt-in), with its bitwise check */
            setenv("MODA_CUDA_BWD_FUSED_DET", "1", 1);
            check_case(c, MODA_BF16, MODA_BF16, 0, 1, &r);
            unsetenv("MODA_CUDA_BWD_NOSPLIT");
            unsetenv("MODA_CUDA_BWD_FUSED_DET");
            /* the kernels the default path replaces for these shapes, kept selectable: the unsplit dK/dV
             * pass (big shapes take it) and the CTA-per-token depth kernel */
            /* the warp (SIMT) depth kernel that the tensor-core one replaces (f32 depth gradients take it by
             * default), and the tensor-core kernel on f32 depth gradients, overwrite and accumulate */
            if (c->Lcap > 0) {
                setenv("MODA_CUDA_BWD_NOTDC", "1", 1);
                check_case(c, MODA_BF16, MODA_BF16, 0, 1, &r);
                check_case(c, MODA_F16, MODA_F32, 1, 1, &r);
                unsetenv("MODA_CUDA_BWD_NOTDC");
                setenv("MODA_CUDA_BWD_TDC_F32", "1", 1);
                check_case(c, MODA_BF16, MODA_F32, 1, 1, &r);
                tdc_f32_cases += tdc_case;
                tdc_f32_ran += tdc_case && !strcmp(moda_testing_cuda_last_depth_backward(), "tdc");
                check_case(c, MODA_F16, MODA_F32, 0, 1, &r);
                unsetenv("MODA_CUDA_BWD_TDC_F32");
            }
            setenv("MODA_CUDA_BWD_NOSPLIT", "1", 1);
            setenv("MODA_CUDA_BWD_NOTDW", "1", 1);
            setenv("MODA_CUDA_BWD_HOPPER_DKDV", "0", 1); /* on sm_90 the unsplit dK/dV pass is the sm_90a one */
            check_case(c, MODA_BF16, MODA_BF16, 0, 1, &r);
            if (c->Lcap > 0 && !quick) check_case(c, MODA_F16, MODA_F32, 1, 1, &r);
            unsetenv("MODA_CUDA_BWD_NOSPLIT");
            unsetenv("MODA_CUDA_BWD_NOTDW");
            unsetenv("MODA_CUDA_BWD_HOPPER_DKDV");
            if (hopper && c->sequence) {
                /* the sm_90a pass (non-deterministic, unsplit), both dtypes, overwrite and accumulate */
                setenv("MODA_CUDA_BWD_HOPPER", "1", 1);
                setenv("MODA_CUDA_BWD_NOSPLIT", "1", 1);
                check_case(c, MODA_BF16, MODA_BF16, 0, 0, &r);
                hopper_ran += !strcmp(moda_testing_cuda_last_backward(), "hopper");
                check_case(c, MODA_F16, c->Lcap > 0 ? MODA_F32 : MODA_F16, c->Lcap > 0, 0, &r);
                hopper_ran += !strcmp(moda_testing_cuda_last_backward(), "hopper");
                hopper_cases += 2;
                unsetenv("MODA_CUDA_BWD_HOPPER");
                /* its dK/dV-only form in the deterministic two-pass path (MODA_CUDA_BWD_HOPPER_DKDV=1, unsplit),
                 * both dtypes, overwrite: check_case also runs it twice and compares bit for bit */
                setenv("MODA_CUDA_BWD_HOPPER_DKDV", "1", 1);
                check_case(c, MODA_BF16, MODA_BF16, 0, 1, &r);
                dkdv_ran += !strcmp(moda_testing_cuda_last_backward(), "hopper-dkdv");
                check_case(c, MODA_F16, MODA_F16, 0, 1, &r);
                dkdv_ran += !strcmp(moda_testing_cuda_last_backward(), "hopper-dkdv");
                dkdv_cases += 2;
                unsetenv("MODA_CUDA_BWD_HOPPER_DKDV");
                unsetenv("MODA_CUDA_BWD_NOSPLIT");
            }
        }
    }
    printf("gpu_test_backward: the tensor-core depth stage ran %d of %d cases\n", tdc_ran, tdc_cases);
    TU_CHECK(tdc_cases > 0 && tdc_ran == tdc_cases, "the tensor-core depth stage ran %d of %d cases that should take it",
             tdc_ran, tdc_cases);
    printf("gpu_test_backward: the tensor-core depth stage on f32 gradients ran %d of %d cases\n", tdc_f32_ran,
           tdc_f32_cases);
    TU_CHECK(tdc_f32_ran == tdc_f32_cases, "the tensor-core depth stage on f32 gradients ran %d of %d cases", tdc_f32_ran,
             tdc_f32_cases);
    if (hopper) {
        printf("gpu_test_backward: the sm_90a backward ran %d of %d Hopper cases\n", hopper_ran, hopper_cases);
        /* every case asked for is f16/bf16, d = dv in {64, 128}, unsplit: a silent fallback is a failure */
        TU_CHECK(hopper_ran == hopper_cases, "the sm_90a backward ran %d of %d cases that asked for it", hopper_ran,
                 hopper_cases);
        /* every case asked for is f16/bf16, d = dv in {64, 128}, unsplit: each must have taken the dK/dV form */
        printf("gpu_test_backward: the sm_90a dK/dV pass ran %d of %d deterministic cases\n", dkdv_ran, dkdv_cases);
        TU_CHECK(dkdv_ran == dkdv_cases, "the sm_90a dK/dV pass ran %d of %d cases that asked for it", dkdv_ran,
                 dkdv_cases);
    }
    if (!quick) {
        /* sampled checks on benchmark-sized problems (S3, and S5's head dim at a shorter T) */
        const tu_case s3 = {1, 1024, 8, 8, 64, 64, 64, 0, 64, 1, 1, 0, 64, TU_LAYOUT_STANDARD, 0};
        const tu_case s5 = {1, 2048, 8, 4, 128, 128, 64, 0, 64, 1, 1, 0, 64, TU_LAYOUT_STANDARD, 0};
        sampled_check(&s3, MODA_BF16, 1, &r);
        setenv("MODA_CUDA_BWD_NOSPLIT", "1", 1); /* non-deterministic: the fused pass unsplit, as S1, S5 run it */
        setenv("MODA_CUDA_BWD_HOPPER", "0", 1);
        sampled_check(&s5, MODA_BF16, 0, &r);
        unsetenv("MODA_CUDA_BWD_HOPPER");
        if (hopper) {
            setenv("MODA_CUDA_BWD_HOPPER", "1", 1);
            sampled_check(&s5, MODA_BF16, 0, &r);
            TU_CHECK(!strcmp(moda_testing_cuda_last_backward(), "hopper"), "the S5-like sampled case did not run the sm_90a backward (%s)",
                     moda_testing_cuda_last_backward());
            unsetenv("MODA_CUDA_BWD_HOPPER");
            /* deterministic, dK/dV by the sm_90a kernel's dK/dV-only form */
            setenv("MODA_CUDA_BWD_HOPPER_DKDV", "1", 1);
            sampled_check(&s5, MODA_BF16, 1, &r);
            TU_CHECK(!strcmp(moda_testing_cuda_last_backward(), "hopper-dkdv"),
                     "the S5-like sampled case did not run the sm_90a dK/dV pass (%s)", moda_testing_cuda_last_backward());
            unsetenv("MODA_CUDA_BWD_HOPPER_DKDV");
        }
        unsetenv("MODA_CUDA_BWD_NOSPLIT");
    }
    return tu_finish("gpu_test_backward");
}
