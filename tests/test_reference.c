/* test_reference.c - the float64 reference is the oracle of every other test, so it is checked on its own:
 * hand-computed cases, equivalences between modes and layouts, and its backward against central finite
 * differences of its forward (both depth-gradient modes, every variant). */
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static moda_status forward64(tu_problem *p) {
    moda_options o = tu_case_options(&p->c);
    return moda_forward(&o, &p->q.view, tu_arg(&p->k), tu_arg(&p->v), tu_arg(&p->kd), tu_arg(&p->vd), &p->o.view,
                        &p->lse.view, NULL);
}

static double get(const tu_tensor *t, const int64_t *idx) {
    int64_t off = 0;
    for (int i = 0; i < t->view.ndim; i++) off += idx[i] * t->view.stride[i];
    return ((double *)t->view.data)[off];
}
static double *at(tu_tensor *t, const int64_t *idx) {
    int64_t off = 0;
    for (int i = 0; i < t->view.ndim; i++) off += idx[i] * t->view.stride[i];
    return (double *)t->view.data + off;
}

/* T = 1 with one sequence key and no depth: the softmax has one term, so O = V and LSE = s*<q,k>. */
static void test_single_key(tu_rng *r) {
    tu_case c = {1, 1, 1, 1, 4, 3, 0, 0, 0, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0};
    tu_problem p;
    tu_problem_alloc(&p, &c, MODA_F64, MODA_F64);
    tu_problem_randomize(&p, r);
    TU_CHECK_STATUS(forward64(&p), MODA_OK);
    double dot = 0;
    for (int64_t i = 0; i < 4; i++) dot += ((double *)p.q.view.data)[i] * ((double *)p.k.view.data)[i];
    TU_CHECK(fabs(((double *)p.lse.view.data)[0] - dot / 2.0) < 1e-14, "LSE of one key is s*<q,k>");
    for (int64_t i = 0; i < 3; i++)
        TU_CHECK(((double *)p.o.view.data)[i] == ((double *)p.v.view.data)[i], "O of one key is its value");
    tu_problem_free(&p);
}

/* Two keys, one sequence and one depth, with equal logits: they share the probability mass equally. */
static void test_depth_competes_with_sequence(tu_rng *r) {
    tu_case c = {1, 1, 1, 1, 2, 2, 1, 0, 1, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0};
    tu_problem p;
    tu_problem_alloc(&p, &c, MODA_F64, MODA_F64);
    tu_problem_randomize(&p, r);
    double *k = p.k.view.data, *kd = p.kd.view.data, *v = p.v.view.data, *vd = p.vd.view.data;
    kd[0] = k[0];
    kd[1] = k[1];
    TU_CHECK_STATUS(forward64(&p), MODA_OK);
    double *o = p.o.view.data;
    for (int i = 0; i < 2; i++) TU_CHECK(fabs(o[i] - 0.5 * (v[i] + vd[i])) < 1e-14, "equal logits split the mass");
    double *q = p.q.view.data;
    double z = (q[0] * k[0] + q[1] * k[1]) / sqrt(2.0);
    TU_CHECK(fabs(((double *)p.lse.view.data)[0] - (z + log(2.0))) < 1e-13, "LSE of two equal logits is z + log 2");
    tu_problem_free(&p);
}

/* Depth-only attention with an empty range: every row has no keys, O = 0 and LSE = -inf (spec.md §2). */
static void test_empty_rows(tu_rng *r) {
    tu_case c = {1, 3, 1, 2, 4, 4, 5, 2, 2, 1, 0, 0, 1, TU_LAYOUT_STANDARD, 0};
    tu_problem p;
    tu_problem_alloc(&p, &c, MODA_F64, MODA_F64);
    tu_problem_randomize(&p, r);
    TU_CHECK_STATUS(forward64(&p), MODA_OK);
    for (int64_t i = 0; i < 3 * 2 * 4; i++) TU_CHECK(((double *)p.o.view.data)[i] == 0.0, "empty row gives O = 0");
    for (int64_t i = 0; i < 3 * 2; i++) TU_CHECK(isinf(((double *)p.lse.view.data)[i]) && ((double *)p.lse.view.data)[i] < 0, "empty row gives LSE = -inf");
    tu_problem_free(&p);
}

/* Properties that tie the variants together. */
static void test_equivalences(tu_rng *r) {
    /* chunk mode with C = 1 sees exactly the token's own slots: equal to token mode */
    tu_case tok = {2, 9, 2, 3, 5, 4, 6, 1, 5, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0};
    tu_case ch = tok;
    ch.chunk = 1;
    ch.chunk_size = 1;
    tu_problem a, b;
    tu_problem_alloc(&a, &tok, MODA_F64, MODA_F64);
    tu_problem_randomize(&a, r);
    tu_problem_alloc(&b, &ch, MODA_F64, MODA_F64);
    tu_problem_randomize(&b, r);
    tu_copy(&b.q, &a.q); tu_copy(&b.k, &a.k); tu_copy(&b.v, &a.v); tu_copy(&b.kd, &a.kd); tu_copy(&b.vd, &a.vd);
    TU_CHECK_STATUS(forward64(&a), MODA_OK);
    TU_CHECK_STATUS(forward64(&b), MODA_OK);
    tu_expect_close("chunk C=1 equals token mode (O)", &ch, &b.o, &a.o, NULL, 1e-14);
    tu_expect_close("chunk C=1 equals token mode (LSE)", &ch, &b.lse, &a.lse, NULL, 1e-14);
    tu_problem_free(&b);

    /* folded and strided views of the same numbers give the same result as the standard layout */
    for (int lay = 1; lay <= 2; lay++) {
        tu_case lc = tok;
        lc.layout = (tu_layout)lay;
        tu_problem_alloc(&b, &lc, MODA_F64, MODA_F64);
        tu_problem_randomize(&b, r);
        tu_copy(&b.q, &a.q); tu_copy(&b.k, &a.k); tu_copy(&b.v, &a.v); tu_copy(&b.kd, &a.kd); tu_copy(&b.vd, &a.vd);
        TU_CHECK_STATUS(forward64(&b), MODA_OK);
        tu_expect_close("layout does not change O", &lc, &b.o, &a.o, NULL, 0.0);
        tu_expect_close("layout does not change LSE", &lc, &b.lse, &a.lse, NULL, 0.0);
        tu_problem_free(&b);
    }

    /* slots outside [d0, d1) do not influence the result */
    tu_problem_alloc(&b, &tok, MODA_F64, MODA_F64);
    tu_problem_randomize(&b, r);
    tu_copy(&b.q, &a.q); tu_copy(&b.k, &a.k); tu_copy(&b.v, &a.v); tu_copy(&b.kd, &a.kd); tu_copy(&b.vd, &a.vd);
    for (int64_t t = 0; t < tok.T; t++)
        for (int64_t h = 0; h < tok.Hk; h++)
            for (int64_t i = 0; i < tok.d; i++) {
                int64_t idx0[5] = {0, t, 0, h, i}, idx5[5] = {1, t, 5, h, i};
                *at(&b.kd, idx0) = 1e3 * tu_normal(r); /* slot 0 < d0 */
                *at(&b.kd, idx5) = 1e3 * tu_normal(r); /* slot 5 = d1 */
            }
    TU_CHECK_STATUS(forward64(&b), MODA_OK);
    tu_expect_close("invisible slots are ignored", &tok, &b.o, &a.o, NULL, 0.0);
    tu_problem_free(&b);

    /* causal row t of a non-causal call with keys beyond t zeroed out of the softmax is the causal result:
       checked through the last row, which sees every key either way */
    tu_case nc = tok;
    nc.causal = 0;
    tu_problem_alloc(&b, &nc, MODA_F64, MODA_F64);
    tu_problem_randomize(&b, r);
    tu_copy(&b.q, &a.q); tu_copy(&b.k, &a.k); tu_copy(&b.v, &a.v); tu_copy(&b.kd, &a.kd); tu_copy(&b.vd, &a.vd);
    TU_CHECK_STATUS(forward64(&b), MODA_OK);
    for (int64_t bb = 0; bb < tok.B; bb++)
        for (int64_t h = 0; h < tok.Hk; h++)
            for (int64_t g = 0; g < tok.G; g++) {
                int64_t idx[4] = {bb, tok.T - 1, h, g};
                TU_CHECK(get(&a.lse, idx) == get(&b.lse, idx), "the last row sees the same keys causal or not");
            }
    tu_problem_free(&b);
    tu_problem_free(&a);
}

/* L = <W, O> for a fixed random W; dL/dO = W is the backward's dout. */
static double loss(tu_problem *p) {
    if (forward64(p) != MODA_OK) return NAN;
    double s = 0;
    int64_t n = p->c.B * p->c.T * p->c.Hk * p->c.G * p->c.dv;
    const double *o = p->o.view.data, *w = p->dout.view.data; /* standard layout: contiguous */
    for (int64_t i = 0; i < n; i++) s += o[i] * w[i];
    return s;
}

/* Central finite differences of every input element against the analytic backward. */
static void fd_check(const tu_case *c, int accumulate, tu_rng *r) {
    tu_problem p;
    tu_problem_alloc(&p, c, MODA_F64, MODA_F64);
    tu_problem_randomize(&p, r);
    TU_CHECK_STATUS(forward64(&p), MODA_OK);
    /* depth gradients start from random content in accumulate mode, from poison otherwise */
    tu_problem prior;
    tu_problem_alloc(&prior, c, MODA_F64, MODA_F64);
    if (!accumulate) {
        tu_poison(&p.dkd);
        tu_poison(&p.dvd);
    }
    tu_copy(&prior.dkd, &p.dkd);
    tu_copy(&prior.dvd, &p.dvd);
    moda_options o = tu_case_options(c);
    o.depth_grad_mode = accumulate ? MODA_DEPTH_GRAD_ACCUMULATE : MODA_DEPTH_GRAD_OVERWRITE;
    TU_CHECK_STATUS(moda_backward(&o, &p.q.view, tu_arg(&p.k), tu_arg(&p.v), tu_arg(&p.kd), tu_arg(&p.vd), &p.o.view,
                                  &p.lse.view, &p.dout.view, &p.dq.view, tu_arg(&p.dk), tu_arg(&p.dv), tu_arg(&p.dkd),
                                  tu_arg(&p.dvd), NULL, 0, NULL),
                    MODA_OK);
    struct {
        tu_tensor *x, *g, *g0;
        const char *name;
        int depth;
    } inputs[5] = {{&p.q, &p.dq, NULL, "dq", 0}, {&p.k, &p.dk, NULL, "dk", 0}, {&p.v, &p.dv, NULL, "dv", 0},
                   {&p.kd, &p.dkd, &prior.dkd, "dkd", 1}, {&p.vd, &p.dvd, &prior.dvd, "dvd", 1}};
    const double h = 1e-6;
    for (int k = 0; k < 5; k++) {
        tu_tensor *x = inputs[k].x;
        if (!x->alloc) continue;
        int64_t n = 1;
        for (int i = 0; i < x->view.ndim; i++) n *= x->view.shape[i];
        double max_err = 0, max_g = 0;
        int untouched_ok = 1;
        for (int64_t e = 0; e < n; e++) { /* standard layout: element e at offset e */
            double *xe = (double *)x->view.data + e;
            double saved = *xe;
            *xe = saved + h;
            double lp = loss(&p);
            *xe = saved - h;
            double lm = loss(&p);
            *xe = saved;
            double fd = (lp - lm) / (2 * h);
            double g = ((double *)inputs[k].g->view.data)[e];
            int64_t slot = inputs[k].depth ? (e / (c->Hk * x->view.shape[4])) % c->Lcap : 0;
            int visible = !inputs[k].depth || (slot >= c->d0 && slot < c->d1);
            if (inputs[k].depth) {
                double g0 = ((double *)inputs[k].g0->view.data)[e];
                if (!visible) { /* never written: still the prior bytes (poison or random) */
                    if (memcmp(&g, &g0, sizeof g)) untouched_ok = 0;
                    continue;
                }
                if (accumulate) g -= g0;
            }
            double err = fabs(g - fd);
            if (err > max_err) max_err = err;
            if (fabs(fd) > max_g) max_g = fabs(fd);
        }
        TU_CHECK(max_err <= 1e-6 * (1 + max_g), "%s vs finite differences: max err %.3g (|grad| up to %.3g) [%s]%s",
                 inputs[k].name, max_err, max_g, tu_case_str(c), accumulate ? " accumulate" : "");
        TU_CHECK(untouched_ok, "%s: slots outside [d0, d1) were written [%s]", inputs[k].name, tu_case_str(c));
    }
    tu_problem_free(&prior);
    tu_problem_free(&p);
}

int main(void) {
    tu_rng r = tu_rng_from_env("test_reference");
    test_single_key(&r);
    test_depth_competes_with_sequence(&r);
    test_empty_rows(&r);
    test_equivalences(&r);
    const tu_case fd_cases[] = {
        /* B, T, Hk, G, d, dv, Lcap, d0, d1, causal, sequence, chunk, C, layout, scale */
        {1, 4, 2, 2, 4, 3, 3, 0, 3, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},    /* causal, token depth */
        {2, 3, 1, 3, 3, 5, 4, 1, 3, 0, 1, 0, 1, TU_LAYOUT_STANDARD, 0},    /* non-causal, range not from 0 */
        {1, 5, 1, 2, 4, 4, 2, 0, 2, 1, 1, 1, 2, TU_LAYOUT_STANDARD, 0.7},  /* chunk mode C=2, custom scale */
        {1, 4, 2, 1, 3, 2, 3, 1, 3, 1, 0, 0, 1, TU_LAYOUT_STANDARD, 0},    /* depth-only */
        {1, 3, 1, 2, 4, 4, 0, 0, 0, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},    /* no depth at all */
    };
    for (size_t i = 0; i < sizeof fd_cases / sizeof fd_cases[0]; i++) {
        fd_check(&fd_cases[i], 0, &r);
        if (fd_cases[i].Lcap > 0) fd_check(&fd_cases[i], 1, &r);
    }
    return tu_finish("test_reference");
}
