/* test_cpu_fast_backward.c - the fast CPU backward (f32, f16, bf16) matches the float64 reference within
 * spec.md §4's policy in both depth-gradient modes, with dKd/dVd in the storage dtype and in float32; leaves
 * the slots outside [d0, d1) byte for byte as they were; and is bitwise reproducible across thread counts and
 * between a caller's workspace and its own allocation. */
#include "testutil.h"

#include <stdlib.h>
#include <string.h>

/* {B, T, Hk, G, d, dv, Lcap, d0, d1, causal, sequence, chunk, C, layout, scale} */
static const tu_case cases[] = {
    {1, 1, 1, 1, 16, 16, 0, 0, 0, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
    {1, 1, 2, 3, 16, 8, 7, 0, 7, 0, 1, 0, 1, TU_LAYOUT_FOLDED, 0},
    {1, 70, 2, 2, 64, 64, 0, 0, 0, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
    {1, 131, 1, 8, 64, 64, 0, 0, 0, 0, 1, 0, 1, TU_LAYOUT_STRIDED, 0},
    {1, 150, 1, 8, 64, 64, 16, 0, 16, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
    {1, 97, 2, 3, 80, 48, 7, 2, 5, 1, 1, 0, 1, TU_LAYOUT_FOLDED, 0},
    {1, 100, 1, 1, 128, 128, 64, 0, 64, 1, 1, 0, 1, TU_LAYOUT_STRIDED, 0},
    {1, 70, 2, 2, 16, 24, 7, 1, 7, 0, 1, 0, 1, TU_LAYOUT_STANDARD, 0.3},
    {1, 19, 1, 3, 5, 3, 4, 1, 3, 1, 1, 0, 1, TU_LAYOUT_STRIDED, 0}, /* head dims below one vector */
    {1, 9, 1, 2, 16, 16, 130, 3, 130, 1, 1, 0, 1, TU_LAYOUT_FOLDED, 0}, /* more slots than a key tile */
    {1, 133, 1, 2, 64, 64, 7, 0, 7, 1, 1, 1, 1, TU_LAYOUT_STANDARD, 0},
    {1, 133, 2, 3, 16, 8, 7, 2, 7, 1, 1, 1, 5, TU_LAYOUT_FOLDED, 0},
    {1, 150, 1, 8, 80, 16, 16, 0, 16, 1, 1, 1, 64, TU_LAYOUT_STRIDED, 0},
    {1, 40, 1, 2, 16, 16, 100, 0, 100, 1, 1, 1, 5, TU_LAYOUT_STANDARD, 0},
    {1, 77, 2, 8, 64, 64, 16, 0, 16, 1, 0, 0, 1, TU_LAYOUT_STANDARD, 0},
    {1, 50, 1, 3, 16, 32, 7, 4, 7, 1, 0, 1, 5, TU_LAYOUT_STRIDED, 0},
    {1, 5, 1, 2, 16, 16, 7, 3, 3, 1, 0, 0, 1, TU_LAYOUT_FOLDED, 0},
    {3, 65, 2, 2, 64, 80, 16, 5, 16, 1, 1, 0, 1, TU_LAYOUT_STRIDED, 0},
    {2, 101, 1, 3, 16, 16, 7, 0, 7, 1, 1, 1, 64, TU_LAYOUT_FOLDED, 0},
};

static moda_status run_backward(tu_problem *p, int threads, int accumulate, int own_workspace) {
    moda_options o = tu_case_options(&p->c);
    o.num_threads = threads;
    o.depth_grad_mode = accumulate ? MODA_DEPTH_GRAD_ACCUMULATE : MODA_DEPTH_GRAD_OVERWRITE;
    size_t bytes = 0;
    void *ws = NULL;
    if (!own_workspace) {
        moda_status st = moda_backward_workspace_size(&o, &p->q.view, tu_arg(&p->k), tu_arg(&p->v), tu_arg(&p->kd),
                                                      tu_arg(&p->vd), &bytes);
        if (st != MODA_OK) return st;
        ws = malloc(bytes ? bytes : 1);
        if (!ws) return MODA_ERR_OUT_OF_MEMORY;
    }
    moda_status st = moda_backward(&o, &p->q.view, tu_arg(&p->k), tu_arg(&p->v), tu_arg(&p->kd), tu_arg(&p->vd),
                                   &p->o.view, &p->lse.view, &p->dout.view, &p->dq.view, tu_arg(&p->dk),
                                   tu_arg(&p->dv), tu_arg(&p->dkd), tu_arg(&p->dvd), ws, bytes, NULL);
    free(ws);
    return st;
}

/* 1 when every byte of the slots outside [d0, d1) of t equals the same byte of `before` (same layout). */
static int invisible_slots_equal(const tu_tensor *t, const unsigned char *before, const tu_case *c) {
    if (!t->alloc) return 1;
    const moda_tensor *v = &t->view;
    size_t es = moda_dtype_size(v->dtype), lead = (size_t)((char *)v->data - (char *)t->alloc);
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t tk = 0; tk < c->T; tk++)
            for (int64_t l = 0; l < c->Lcap; l++) {
                if (l >= c->d0 && l < c->d1) continue;
                for (int64_t h = 0; h < c->Hk; h++)
                    for (int64_t i = 0; i < v->shape[4]; i++) {
                        size_t off = lead + es * (size_t)(b * v->stride[0] + tk * v->stride[1] + l * v->stride[2] +
                                                          h * v->stride[3] + i * v->stride[4]);
                        if (memcmp((const char *)t->alloc + off, before + off, es)) return 0;
                    }
            }
    return 1;
}

static unsigned char *snapshot(const tu_tensor *t) {
    if (!t->alloc) return NULL;
    unsigned char *s = malloc(t->bytes);
    if (s) memcpy(s, t->alloc, t->bytes);
    return s;
}
static void restore(tu_tensor *t, const unsigned char *s) {
    if (t->alloc && s) memcpy(t->alloc, s, t->bytes);
}
static int same_bytes(const tu_tensor *t, const unsigned char *s) { return !t->alloc || !memcmp(t->alloc, s, t->bytes); }

static void check_case(const tu_case *c, moda_dtype dtype, moda_dtype grad_dtype, int accumulate, tu_rng *rng,
                       int check_determinism) {
    tu_problem p, r64, rlp;
    if (tu_problem_alloc(&p, c, dtype, grad_dtype)) {
        TU_CHECK(0, "allocation failed [%s]", tu_case_str(c));
        return;
    }
    tu_problem_randomize(&p, rng);
    moda_options fo = tu_case_options(c);
    TU_CHECK_STATUS(moda_forward(&fo, &p.q.view, tu_arg(&p.k), tu_arg(&p.v), tu_arg(&p.kd), tu_arg(&p.vd), &p.o.view,
                                 &p.lse.view, NULL),
                    MODA_OK);
    /* Overwrite mode starts from poison, so an unwritten visible slot fails; accumulate mode from random
     * values, which the result must contain. */
    if (!accumulate) {
        tu_poison(&p.dkd);
        tu_poison(&p.dvd);
    }
    unsigned char *kd0 = snapshot(&p.dkd), *vd0 = snapshot(&p.dvd);
    TU_CHECK_STATUS(tu_reference_backward(&p, &r64, MODA_F64, accumulate), MODA_OK);
    TU_CHECK_STATUS(tu_reference_backward(&p, &rlp, dtype, accumulate), MODA_OK);
    moda_status st = run_backward(&p, 2, accumulate, 0);
    TU_CHECK(st == MODA_OK, "backward returned %s (%s) [%s %s]", moda_status_string(st), moda_last_error(),
             tu_case_str(c), moda_dtype_name(dtype));

    char what[96];
    const char *mode = accumulate ? "accumulate" : "overwrite";
    const struct {
        const char *name;
        tu_tensor *test, *ref, *lowp;
    } outs[] = {{"dQ", &p.dq, &r64.dq, &rlp.dq},       {"dK", &p.dk, &r64.dk, &rlp.dk},
                {"dV", &p.dv, &r64.dv, &rlp.dv},       {"dKd", &p.dkd, &r64.dkd, &rlp.dkd},
                {"dVd", &p.dvd, &r64.dvd, &rlp.dvd}};
    for (int i = 0; i < 5; i++) {
        if (!outs[i].test->alloc) continue;
        snprintf(what, sizeof what, "%s %s (%s, grad %s)", moda_dtype_name(dtype), outs[i].name, mode,
                 moda_dtype_name(grad_dtype));
        tu_expect_close(what, c, outs[i].test, outs[i].ref, outs[i].lowp, 1e-5);
    }
    TU_CHECK(invisible_slots_equal(&p.dkd, kd0, c) && invisible_slots_equal(&p.dvd, vd0, c),
             "slots outside [d0, d1) of dKd/dVd were written [%s %s %s]", tu_case_str(c), moda_dtype_name(dtype), mode);

    if (check_determinism) {
        unsigned char *dq = snapshot(&p.dq), *dk = snapshot(&p.dk), *dv = snapshot(&p.dv);
        unsigned char *dkd = snapshot(&p.dkd), *dvd = snapshot(&p.dvd);
        for (int run = 0; run < 2; run++) {
            tu_poison(&p.dq);
            tu_poison(&p.dk);
            tu_poison(&p.dv);
            restore(&p.dkd, kd0);
            restore(&p.dvd, vd0);
            /* one thread with the library's own scratch, then three with the caller's workspace */
            TU_CHECK_STATUS(run_backward(&p, run ? 3 : 1, accumulate, run == 0), MODA_OK);
            TU_CHECK(same_bytes(&p.dq, dq) && same_bytes(&p.dk, dk) && same_bytes(&p.dv, dv) &&
                         same_bytes(&p.dkd, dkd) && same_bytes(&p.dvd, dvd),
                     "backward run %d is not bitwise identical to the first [%s %s %s]", run, tu_case_str(c),
                     moda_dtype_name(dtype), mode);
        }
        free(dq), free(dk), free(dv), free(dkd), free(dvd);
    }
    free(kd0);
    free(vd0);
    tu_problem_free(&rlp);
    tu_problem_free(&r64);
    tu_problem_free(&p);
}

int main(void) {
    tu_rng rng = tu_rng_from_env("test_cpu_fast_backward");
    const moda_dtype dtypes[] = {MODA_F32, MODA_F16, MODA_BF16};
    const int n = (int)(sizeof cases / sizeof cases[0]);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < 3; j++) {
            tu_case c = cases[i];
            if (!tu_quick_select(&c, i, j)) continue;
            /* Rotate the depth-gradient mode and the dKd/dVd dtype so each meets every storage dtype. */
            int accumulate = (i + j) % 2;
            moda_dtype grad = (dtypes[j] != MODA_F32 && (i / 2 + j) % 2) ? MODA_F32 : dtypes[j];
            check_case(&c, dtypes[j], grad, accumulate, &rng, j == i % 3);
        }
    return tu_finish("test_cpu_fast_backward");
}
