/*
 * testutil.h - shared helpers of the test suites: a tiny check harness, a seeded RNG, MoDA problems with
 * every layout the API accepts, poisoning, and spec.md §4's tolerance policy.
 *
 * A test file is a main() that runs checks with TU_CHECK and ends with `return tu_finish("name");`, which
 * prints "name: N passed, N failed" and returns the exit code ctest reads.
 */
#ifndef MODA_TESTUTIL_H
#define MODA_TESTUTIL_H

#include "internal.h"
#include "moda.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- harness ---- */
extern long tu_checks, tu_failures;
#define TU_CHECK(cond, ...)                                                   \
    do {                                                                      \
        tu_checks++;                                                          \
        if (!(cond)) {                                                        \
            tu_failures++;                                                    \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);              \
            fprintf(stderr, __VA_ARGS__);                                     \
            fputc('\n', stderr);                                              \
        }                                                                     \
    } while (0)
/* Checks that a call returned `want`; prints moda_last_error() when it did not. */
#define TU_CHECK_STATUS(call, want)                                                                   \
    do {                                                                                              \
        moda_status tu_st_ = (call);                                                                  \
        TU_CHECK(tu_st_ == (want), "%s returned %s, expected %s (%s)", #call, moda_status_string(tu_st_), \
                 moda_status_string(want), moda_last_error());                                        \
    } while (0)
int tu_finish(const char *suite);
/* 1 when MODA_TEST_QUICK is set (sanitizer builds run a reduced grid). */
int tu_quick(void);

/* ---- RNG (splitmix64; seeded from MODA_TEST_SEED or the time, printed so that a failure can be rerun) ---- */
typedef struct tu_rng {
    uint64_t state;
} tu_rng;
tu_rng tu_rng_from_env(const char *suite);
uint64_t tu_next(tu_rng *r);
double tu_uniform(tu_rng *r); /* [0, 1) */
double tu_normal(tu_rng *r);

/* ---- one MoDA configuration ---- */
typedef enum tu_layout {
    TU_LAYOUT_STANDARD = 0, /* contiguous [B,T,Hq,d] q/o, [B,T,Hk,d] k/v, [B,T,Lcap,Hk,d] kd/vd */
    TU_LAYOUT_FOLDED = 1,   /* the authors' time-folded q/o [B,T*G,Hk,d] */
    TU_LAYOUT_STRIDED = 2   /* every tensor padded (rows longer than d) and with B/T axes permuted:
                               non-contiguous views, unit innermost stride */
} tu_layout;

typedef struct tu_case {
    int64_t B, T, Hk, G, d, dv, Lcap, d0, d1;
    int causal, sequence, chunk;
    int64_t chunk_size;
    tu_layout layout;
    double scale; /* 0: 1/sqrt(d) */
} tu_case;

/* "B=1 T=7 Hk=2 G=3 d=16 dv=8 L=7[2,5) causal seq token standard" */
const char *tu_case_str(const tu_case *c);
moda_options tu_case_options(const tu_case *c);
/* The reduced grid of the quick (sanitizer) run, for a test that runs case i in dtype j of three: each case
 * keeps one dtype, rotating so that all three are exercised, and T is capped at 40 (still not a multiple of
 * any tile, still several row blocks for G >= 2). Returns 0 when (i, j) is skipped; may shrink c->T. */
int tu_quick_select(tu_case *c, int i, int j);

/* A host tensor that owns its allocation; `view` is what the API sees. Absent tensors have alloc == NULL. */
typedef struct tu_tensor {
    moda_tensor view;
    void *alloc;   /* start of the allocation (view.data may point inside it) */
    size_t bytes;  /* allocation size */
    int poisoned;  /* set by tu_poison: bytes outside the logical view must stay 0xFF */
} tu_tensor;

/* Pointer for the API: NULL for an absent tensor. */
const moda_tensor *tu_arg(const tu_tensor *t);
/* The same view over another base (e.g. a device copy of the allocation). */
moda_tensor tu_rebase(const tu_tensor *t, void *new_alloc, moda_device device);
void tu_tensor_free(tu_tensor *t);

/* All operands of one forward + backward call of a case, in one storage dtype (lse float32, or float64 for
 * dtype f64). Inputs q,k,v,kd,vd,dout; outputs o,lse,dq,dk,dv,dkd,dvd. k/v are absent when the sequence part
 * is off; kd/vd/dkd/dvd when Lcap == 0. `grad_dtype` is the dtype of dkd/dvd (dtype or MODA_F32). */
typedef struct tu_problem {
    tu_case c;
    moda_dtype dtype, grad_dtype;
    tu_tensor q, k, v, kd, vd, o, lse, dout, dq, dk, dv, dkd, dvd;
} tu_problem;

int tu_problem_alloc(tu_problem *p, const tu_case *c, moda_dtype dtype, moda_dtype grad_dtype);
void tu_problem_free(tu_problem *p);
/* Fresh N(0,1) inputs (rounded to the dtype); dkd/dvd filled with N(0,1) too (their prior content matters in
 * accumulate mode); every output allocation poisoned with 0xFF bytes (NaN in every float dtype). */
void tu_problem_randomize(tu_problem *p, tu_rng *r);
/* Poisons every byte of an allocation (0xFF: NaN in f16, bf16, f32, f64). */
void tu_poison(tu_tensor *t);
/* Copies the logical elements of src into dst (any dtypes, any layouts, same logical shape). */
void tu_copy(tu_tensor *dst, const tu_tensor *src);

/* float64 reference of the problem's forward / backward, reading p's inputs as stored. Results go to the
 * f64 tensors of `out` (allocated by the call with tu_problem_alloc(out, &p->c, MODA_F64, MODA_F64));
 * round_dtype = MODA_F64 gives the oracle, another dtype the same-precision reference. In accumulate mode the
 * reference adds into out's dkd/dvd, which the caller should tu_copy from p first. */
moda_status tu_reference_forward(const tu_problem *p, tu_problem *out, moda_dtype round_dtype);
moda_status tu_reference_backward(const tu_problem *p, tu_problem *out, moda_dtype round_dtype,
                                  int accumulate);

/* ---- tolerance policy (spec.md §4) ---- */
typedef struct tu_compare_result {
    double max_err;    /* max |test - ref64| over logical elements */
    double lowp_err;   /* max |lowp - ref64| (the same-precision reference's error) */
    double bound;      /* 2 * lowp_err + 1e-5 */
    double rel_l2;     /* ||test - ref64|| / ||ref64|| */
    int64_t nonfinite; /* test elements that are NaN/Inf where ref64 is finite (or unwritten poison) */
    int64_t worst;     /* flat logical index of the largest error */
    int pass;
} tu_compare_result;

/* Compares test against the f64 oracle ref64 with the bound taken from lowp (a same-precision reference
 * result; may be NULL: then the bound is `abs_tol`). Where ref64 is NaN (an element the call must not write,
 * e.g. a depth slot outside [d0, d1) that was poisoned) test must be NaN too. Also applies spec.md §4's
 * relative-L2 guide for test's dtype (f32 1e-5, f16 2e-3, bf16 1e-2). */
tu_compare_result tu_compare(const tu_tensor *test, const tu_tensor *ref64, const tu_tensor *lowp, double abs_tol);
/* 1 when every byte of t's allocation outside its logical view is still 0xFF (nothing wrote outside it). */
int tu_padding_intact(const tu_tensor *t);
/* TU_CHECKs a comparison and prints one line with the numbers on failure (or always when MODA_TEST_VERBOSE);
 * also checks tu_padding_intact when test was poisoned. Returns 1 on pass. */
int tu_expect_close(const char *what, const tu_case *c, const tu_tensor *test, const tu_tensor *ref64,
                    const tu_tensor *lowp, double abs_tol);

/* The private reference hooks (moda_testing_reference_*) are declared in src/internal.h. */

#ifdef __cplusplus
}
#endif

#endif
