/* test_cpu_fast_forward.c - the fast CPU forward (f32, f16, bf16) matches the float64 reference within spec.md
 * §4's policy on a grid that covers every axis once (shape edges, GQA sizes, head dims, depth ranges, masks,
 * depth modes, layouts, batch), writes nothing outside its views, and is bitwise reproducible across thread
 * counts. */
#include "testutil.h"

#include <stdlib.h>
#include <string.h>

/* {B, T, Hk, G, d, dv, Lcap, d0, d1, causal, sequence, chunk, C, layout, scale} */
static const tu_case cases[] = {
    /* edges: one token; T not a multiple of any tile (64 rows, 96 keys) */
    {1, 1, 1, 1, 16, 16, 0, 0, 0, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
    {1, 1, 2, 3, 16, 8, 7, 0, 7, 0, 1, 0, 1, TU_LAYOUT_FOLDED, 0},
    {1, 37, 2, 2, 64, 64, 0, 0, 0, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
    {1, 200, 1, 8, 64, 64, 0, 0, 0, 0, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
    /* token mode: 1, 7, 16, 64 slots, ranges not starting at 0, dv != d, every layout */
    {1, 150, 1, 8, 64, 64, 16, 0, 16, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
    {1, 97, 2, 3, 80, 48, 7, 2, 5, 1, 1, 0, 1, TU_LAYOUT_FOLDED, 0},
    {1, 130, 1, 1, 128, 128, 64, 0, 64, 1, 1, 0, 1, TU_LAYOUT_STRIDED, 0},
    {1, 70, 2, 2, 16, 24, 7, 1, 7, 0, 1, 0, 1, TU_LAYOUT_STANDARD, 0.3},
    {1, 19, 1, 3, 5, 3, 4, 1, 3, 1, 1, 0, 1, TU_LAYOUT_STRIDED, 0}, /* head dims below one vector */
    {2, 33, 1, 3, 80, 80, 1, 0, 1, 1, 1, 0, 1, TU_LAYOUT_STRIDED, 0},
    {1, 9, 1, 2, 16, 16, 130, 3, 130, 1, 1, 0, 1, TU_LAYOUT_FOLDED, 0}, /* more slots than a key tile */
    /* chunk mode: C = 1, 5, 64 */
    {1, 133, 1, 2, 64, 64, 7, 0, 7, 1, 1, 1, 1, TU_LAYOUT_STANDARD, 0},
    {1, 133, 2, 3, 16, 8, 7, 2, 7, 1, 1, 1, 5, TU_LAYOUT_FOLDED, 0},
    {1, 150, 1, 8, 80, 16, 16, 0, 16, 1, 1, 1, 64, TU_LAYOUT_STRIDED, 0},
    {1, 40, 1, 2, 16, 16, 100, 0, 100, 1, 1, 1, 5, TU_LAYOUT_STANDARD, 0},
    /* depth-only ("Flash Depth Attention"), including rows with no key at all */
    {1, 77, 2, 8, 64, 64, 16, 0, 16, 1, 0, 0, 1, TU_LAYOUT_STANDARD, 0},
    {1, 50, 1, 3, 16, 32, 7, 4, 7, 1, 0, 1, 5, TU_LAYOUT_STRIDED, 0},
    {1, 5, 1, 2, 16, 16, 7, 3, 3, 1, 0, 0, 1, TU_LAYOUT_FOLDED, 0},
    {2, 20, 1, 1, 128, 64, 1, 0, 1, 0, 0, 0, 1, TU_LAYOUT_STANDARD, 0},
    /* batch > 1 with everything on */
    {3, 65, 2, 2, 64, 80, 16, 5, 16, 1, 1, 0, 1, TU_LAYOUT_STRIDED, 0},
    {2, 101, 1, 3, 16, 16, 7, 0, 7, 1, 1, 1, 64, TU_LAYOUT_FOLDED, 0},
};

static moda_status run_forward(tu_problem *p, int threads) {
    moda_options o = tu_case_options(&p->c);
    o.num_threads = threads;
    return moda_forward(&o, &p->q.view, tu_arg(&p->k), tu_arg(&p->v), tu_arg(&p->kd), tu_arg(&p->vd), &p->o.view,
                        &p->lse.view, NULL);
}

static void check_case(const tu_case *c, moda_dtype dtype, tu_rng *rng, int check_determinism) {
    tu_problem p, r64, rlp;
    if (tu_problem_alloc(&p, c, dtype, dtype)) {
        TU_CHECK(0, "allocation failed [%s]", tu_case_str(c));
        return;
    }
    tu_problem_randomize(&p, rng);
    char what[64];
    moda_status st = run_forward(&p, 2);
    TU_CHECK(st == MODA_OK, "forward returned %s (%s) [%s %s]", moda_status_string(st), moda_last_error(),
             tu_case_str(c), moda_dtype_name(dtype));
    TU_CHECK_STATUS(tu_reference_forward(&p, &r64, MODA_F64), MODA_OK);
    TU_CHECK_STATUS(tu_reference_forward(&p, &rlp, dtype), MODA_OK);
    snprintf(what, sizeof what, "%s O", moda_dtype_name(dtype));
    tu_expect_close(what, c, &p.o, &r64.o, &rlp.o, 1e-5);
    snprintf(what, sizeof what, "%s LSE", moda_dtype_name(dtype));
    tu_expect_close(what, c, &p.lse, &r64.lse, &rlp.lse, 1e-5);

    if (check_determinism) {
        /* Same bytes with one thread and with three: no result depends on the work split. */
        void *o1 = malloc(p.o.bytes), *l1 = malloc(p.lse.bytes);
        if (o1 && l1) {
            memcpy(o1, p.o.alloc, p.o.bytes);
            memcpy(l1, p.lse.alloc, p.lse.bytes);
            for (int threads = 1; threads <= 3; threads += 2) {
                tu_poison(&p.o);
                tu_poison(&p.lse);
                TU_CHECK_STATUS(run_forward(&p, threads), MODA_OK);
                TU_CHECK(!memcmp(o1, p.o.alloc, p.o.bytes) && !memcmp(l1, p.lse.alloc, p.lse.bytes),
                         "forward with %d threads differs from 2 threads [%s %s]", threads, tu_case_str(c),
                         moda_dtype_name(dtype));
            }
        }
        free(o1);
        free(l1);
    }
    tu_problem_free(&rlp);
    tu_problem_free(&r64);
    tu_problem_free(&p);
}

int main(void) {
    tu_rng rng = tu_rng_from_env("test_cpu_fast_forward");
    const moda_dtype dtypes[] = {MODA_F32, MODA_F16, MODA_BF16};
    const int n = (int)(sizeof cases / sizeof cases[0]);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < 3; j++) {
            tu_case c = cases[i];
            if (!tu_quick_select(&c, i, j)) continue;
            check_case(&c, dtypes[j], &rng, j == i % 3);
        }
    return tu_finish("test_cpu_fast_forward");
}
