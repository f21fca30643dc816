/* test_validation.c - every bad input of spec.md §5 is refused with its status and a message a user can act
 * on, before any output is touched (outputs compared byte for byte with a snapshot taken before the call). */
#include "testutil.h"

#include <stdlib.h>
#include <string.h>

enum { Q, K, V, KD, VD, O, LSE, DOUT, DQ, DK, DV, DKD, DVD, N_ROLES };

typedef struct {
    moda_options opt;
    moda_tensor t[N_ROLES];
    int absent[N_ROLES];
    void *ws;
    size_t ws_bytes;
} args;

static tu_tensor *role(tu_problem *p, int r) {
    tu_tensor *all[N_ROLES] = {&p->q, &p->k, &p->v, &p->kd, &p->vd, &p->o, &p->lse, &p->dout, &p->dq, &p->dk, &p->dv, &p->dkd, &p->dvd};
    return all[r];
}

static args make_args(tu_problem *p) {
    args a;
    memset(&a, 0, sizeof a);
    a.opt = tu_case_options(&p->c);
    for (int r = 0; r < N_ROLES; r++) {
        a.absent[r] = role(p, r)->alloc == NULL;
        if (!a.absent[r]) a.t[r] = role(p, r)->view;
    }
    return a;
}

static const moda_tensor *A(args *a, int r) { return a->absent[r] ? NULL : &a->t[r]; }

static moda_status run(args *a, int backward) {
    if (!backward) return moda_forward(&a->opt, A(a, Q), A(a, K), A(a, V), A(a, KD), A(a, VD), A(a, O), A(a, LSE), NULL);
    return moda_backward(&a->opt, A(a, Q), A(a, K), A(a, V), A(a, KD), A(a, VD), A(a, O), A(a, LSE), A(a, DOUT), A(a, DQ),
                         A(a, DK), A(a, DV), A(a, DKD), A(a, DVD), a->ws, a->ws_bytes, NULL);
}

/* Snapshot of every output allocation, to prove a refused call wrote nothing. */
typedef struct {
    void *copy[N_ROLES];
} snapshot;
static const int is_output[N_ROLES] = {0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1};
static snapshot take(tu_problem *p) {
    snapshot s;
    memset(&s, 0, sizeof s);
    for (int r = 0; r < N_ROLES; r++)
        if (is_output[r] && role(p, r)->alloc) {
            s.copy[r] = malloc(role(p, r)->bytes);
            memcpy(s.copy[r], role(p, r)->alloc, role(p, r)->bytes);
        }
    return s;
}
static int unchanged(tu_problem *p, snapshot *s) {
    int ok = 1;
    for (int r = 0; r < N_ROLES; r++)
        if (s->copy[r]) {
            ok = ok && !memcmp(s->copy[r], role(p, r)->alloc, role(p, r)->bytes);
            free(s->copy[r]);
        }
    return ok;
}

/* Runs a mutated call and checks it is refused with `want`, a message that mentions `needle`, untouched outputs. */
static void expect_reject(const char *what, tu_problem *p, args *a, int backward, moda_status want, const char *needle) {
    snapshot s = take(p);
    moda_status st = run(a, backward);
    const char *msg = moda_last_error();
    TU_CHECK(st == want, "%s: got %s, expected %s (message: %s)", what, moda_status_string(st), moda_status_string(want), msg);
    TU_CHECK(st == MODA_OK || strlen(msg) > 10, "%s: the message is empty or too short: '%s'", what, msg);
    TU_CHECK(!needle || strstr(msg, needle), "%s: the message '%s' does not mention '%s'", what, msg, needle);
    TU_CHECK(unchanged(p, &s), "%s: an output was written by a refused call", what);
    if (getenv("MODA_TEST_VERBOSE")) printf("  %-44s -> %s: %s\n", what, moda_status_string(st), msg);
}

static void test_forward_and_backward(tu_rng *r, int backward) {
    tu_case c = {2, 5, 2, 3, 8, 6, 4, 1, 3, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0};
    tu_problem p;
    tu_problem_alloc(&p, &c, MODA_F32, MODA_F32);
    tu_problem_randomize(&p, r);
    tu_poison(&p.dkd);
    const char *dir = backward ? "backward" : "forward";
    char what[128];
#define CASE(desc) (snprintf(what, sizeof what, "%s: %s", dir, desc), what)
    args a;

    a = make_args(&p); a.absent[Q] = 1;
    expect_reject(CASE("q missing"), &p, &a, backward, MODA_ERR_NULL_POINTER, "q");
    a = make_args(&p); a.t[Q].data = NULL;
    expect_reject(CASE("q data NULL"), &p, &a, backward, MODA_ERR_NULL_POINTER, "NULL");
    a = make_args(&p); a.absent[K] = 1;
    expect_reject(CASE("k missing with the sequence part on"), &p, &a, backward, MODA_ERR_NULL_POINTER, "sequence");
    a = make_args(&p); a.absent[VD] = 1;
    expect_reject(CASE("vd missing with visible slots"), &p, &a, backward, MODA_ERR_NULL_POINTER, "vd");
    a = make_args(&p); a.t[V].data = NULL;
    expect_reject(CASE("v data NULL"), &p, &a, backward, MODA_ERR_NULL_POINTER, "v");

    a = make_args(&p); a.t[K].shape[1] = 4;
    expect_reject(CASE("k has another T"), &p, &a, backward, MODA_ERR_SHAPE_MISMATCH, "T = 4");
    a = make_args(&p); a.t[V].shape[3] = 7;
    expect_reject(CASE("v has another dv than o"), &p, &a, backward, MODA_ERR_SHAPE_MISMATCH, "dv");
    a = make_args(&p); a.t[KD].shape[3] = 1;
    expect_reject(CASE("kd has another Hk"), &p, &a, backward, MODA_ERR_SHAPE_MISMATCH, "Hk");
    a = make_args(&p); a.t[VD].shape[2] = 3;
    expect_reject(CASE("vd has other Lcap than kd"), &p, &a, backward, MODA_ERR_SHAPE_MISMATCH, "Lcap");
    a = make_args(&p); a.t[O].shape[0] = 1;
    expect_reject(CASE("o has another B"), &p, &a, backward, MODA_ERR_SHAPE_MISMATCH, "B");
    a = make_args(&p); a.t[K].shape[3] = 9;
    expect_reject(CASE("k has another d than q"), &p, &a, backward, MODA_ERR_SHAPE_MISMATCH, "d = 9");
    a = make_args(&p); a.t[K].ndim = 5;
    expect_reject(CASE("k with 5 dimensions"), &p, &a, backward, MODA_ERR_SHAPE_MISMATCH, "4-D");
    a = make_args(&p); a.t[Q].shape[2] = 0; a.t[K].shape[2] = 0;
    expect_reject(CASE("zero key/value heads"), &p, &a, backward, MODA_ERR_SHAPE_MISMATCH, "Hk");
    a = make_args(&p); a.t[Q].shape[4] = -8;
    expect_reject(CASE("negative size"), &p, &a, backward, MODA_ERR_SHAPE_MISMATCH, "negative");

    a = make_args(&p); a.opt.depth_begin = 3; a.opt.depth_end = 2;
    expect_reject(CASE("reversed depth range"), &p, &a, backward, MODA_ERR_DEPTH_RANGE, "reversed");
    a = make_args(&p); a.opt.depth_end = 9;
    expect_reject(CASE("depth range past Lcap"), &p, &a, backward, MODA_ERR_DEPTH_RANGE, "kd has 4 slots but the depth range ends at 9");
    a = make_args(&p); a.opt.depth_begin = -1;
    expect_reject(CASE("negative depth_begin"), &p, &a, backward, MODA_ERR_DEPTH_RANGE, "depth_begin");
    a = make_args(&p); a.opt.depth_mode = MODA_DEPTH_CHUNK; a.opt.causal = 0;
    expect_reject(CASE("chunk mode, non-causal"), &p, &a, backward, MODA_ERR_INVALID_ARGUMENT, "causal");
    a = make_args(&p); a.opt.depth_mode = MODA_DEPTH_CHUNK; a.opt.chunk_size = 0;
    expect_reject(CASE("chunk size 0"), &p, &a, backward, MODA_ERR_INVALID_ARGUMENT, "chunk_size");
    a = make_args(&p); a.opt.scale = 0.0 / 0.0;
    expect_reject(CASE("NaN scale"), &p, &a, backward, MODA_ERR_INVALID_ARGUMENT, "scale");
    a = make_args(&p); a.opt.causal = 2;
    expect_reject(CASE("causal = 2"), &p, &a, backward, MODA_ERR_INVALID_ARGUMENT, "causal");
    a = make_args(&p); a.opt.num_threads = -1;
    expect_reject(CASE("negative thread count"), &p, &a, backward, MODA_ERR_INVALID_ARGUMENT, "num_threads");

    a = make_args(&p); a.t[K].dtype = MODA_F16;
    expect_reject(CASE("k f16 while q is f32"), &p, &a, backward, MODA_ERR_UNSUPPORTED, "one dtype");
    a = make_args(&p); a.t[LSE].dtype = MODA_BF16;
    expect_reject(CASE("lse bf16"), &p, &a, backward, MODA_ERR_UNSUPPORTED, "lse");
    a = make_args(&p); a.t[Q].dtype = (moda_dtype)42;
    expect_reject(CASE("unknown dtype"), &p, &a, backward, MODA_ERR_INVALID_ARGUMENT, "dtype");

    a = make_args(&p); a.t[K].device = MODA_CUDA;
    expect_reject(CASE("k on another device"), &p, &a, backward, MODA_ERR_WRONG_DEVICE, "device");
    a = make_args(&p); a.t[Q].device = (moda_device)7;
    expect_reject(CASE("unknown device"), &p, &a, backward, MODA_ERR_INVALID_ARGUMENT, "device");

    a = make_args(&p); a.t[O].data = a.t[Q].data; a.t[O].stride[4] = 1;
    expect_reject(CASE("o aliases q"), &p, &a, backward, MODA_ERR_OVERLAP, "overlaps");
    a = make_args(&p); a.t[O].stride[2] = 0;
    expect_reject(CASE("o with a zero stride"), &p, &a, backward, MODA_ERR_OVERLAP, "stride 0");
    a = make_args(&p); a.t[LSE].data = a.t[O].data;
    expect_reject(CASE("lse aliases o"), &p, &a, backward, MODA_ERR_OVERLAP, "overlaps");

    a = make_args(&p); a.t[Q].shape[0] = (int64_t)1 << 40; a.t[Q].shape[1] = (int64_t)1 << 40;
    expect_reject(CASE("sizes overflow 64 bits"), &p, &a, backward, MODA_ERR_OVERFLOW, "overflow");
    a = make_args(&p); a.t[KD].stride[0] = INT64_MAX / 2;
    expect_reject(CASE("extent overflows"), &p, &a, backward, MODA_ERR_OVERFLOW, "overflow");
    a = make_args(&p); a.t[K].stride[1] = -a.t[K].stride[1];
    expect_reject(CASE("negative stride"), &p, &a, backward, MODA_ERR_LAYOUT, "negative stride");
    a = make_args(&p); a.t[V].data = (char *)a.t[V].data + 1;
    expect_reject(CASE("misaligned pointer"), &p, &a, backward, MODA_ERR_LAYOUT, "aligned");

    if (backward) {
        a = make_args(&p); a.absent[LSE] = 1;
        expect_reject(CASE("lse missing"), &p, &a, backward, MODA_ERR_NULL_POINTER, "lse");
        a = make_args(&p); a.absent[DOUT] = 1;
        expect_reject(CASE("dout missing"), &p, &a, backward, MODA_ERR_NULL_POINTER, "dout");
        a = make_args(&p); a.t[DOUT].shape[3] = 2;
        expect_reject(CASE("dout has another G"), &p, &a, backward, MODA_ERR_SHAPE_MISMATCH, "G");
        a = make_args(&p); a.t[DKD].dtype = MODA_F16;
        expect_reject(CASE("dkd f16 with f32 inputs"), &p, &a, backward, MODA_ERR_UNSUPPORTED, "dkd");
        a = make_args(&p); a.t[DK].data = a.t[DQ].data;
        expect_reject(CASE("dk aliases dq"), &p, &a, backward, MODA_ERR_OVERLAP, "overlaps");
        a = make_args(&p); a.t[DKD].data = a.t[KD].data;
        expect_reject(CASE("dkd aliases kd"), &p, &a, backward, MODA_ERR_OVERLAP, "overlaps");
        size_t need = 0;
        moda_backward_workspace_size(&a.opt, &p.q.view, &p.k.view, &p.v.view, &p.kd.view, &p.vd.view, &need);
        if (need > 0) {
            char buf[8];
            a = make_args(&p); a.ws = buf; a.ws_bytes = 1;
            expect_reject(CASE("workspace too small"), &p, &a, backward, MODA_ERR_WORKSPACE, "workspace");
        }
    }
#undef CASE
    tu_problem_free(&p);
}

/* Layouts that look like overlap by address range but are not: packed per-token buffers are accepted. */
static void test_packed_layouts_accepted(tu_rng *r) {
    /* one buffer [B, T, Hq + 2Hk, d] holding q, k, v per token (FlashAttention's qkv-packed layout), and
     * o in its own buffer; float64 so the reference runs */
    const int64_t B = 2, T = 4, Hk = 2, G = 2, d = 4, W = (Hk * G + 2 * Hk) * d;
    double *qkv = malloc(sizeof(double) * B * T * W), *o = malloc(sizeof(double) * B * T * Hk * G * d);
    for (int64_t i = 0; i < B * T * W; i++) qkv[i] = tu_normal(r);
    const int64_t qs[5] = {B, T, Hk, G, d}, qst[5] = {T * W, W, G * d, d, 1};
    const int64_t ks[4] = {B, T, Hk, d}, kst[4] = {T * W, W, d, 1};
    moda_tensor q = moda_tensor_strided(qkv, MODA_F64, MODA_CPU, 5, qs, qst);
    moda_tensor k = moda_tensor_strided(qkv + Hk * G * d, MODA_F64, MODA_CPU, 4, ks, kst);
    moda_tensor v = moda_tensor_strided(qkv + Hk * G * d + Hk * d, MODA_F64, MODA_CPU, 4, ks, kst);
    moda_tensor ot = moda_tensor_contiguous(o, MODA_F64, MODA_CPU, 5, qs);
    moda_options opt = moda_default_options();
    TU_CHECK_STATUS(moda_forward(&opt, &q, &k, &v, NULL, NULL, &ot, NULL, NULL), MODA_OK);
    /* the same packed buffer as the gradient output dq|dk|dv is also fine */
    double *dqkv = malloc(sizeof(double) * B * T * W), *lse = malloc(sizeof(double) * B * T * Hk * G), *dout = malloc(sizeof(double) * B * T * Hk * G * d);
    for (int64_t i = 0; i < B * T * Hk * G * d; i++) dout[i] = tu_normal(r);
    const int64_t ls[4] = {B, T, Hk, G};
    moda_tensor lt = moda_tensor_contiguous(lse, MODA_F64, MODA_CPU, 4, ls);
    moda_tensor dt = moda_tensor_contiguous(dout, MODA_F64, MODA_CPU, 5, qs);
    TU_CHECK_STATUS(moda_forward(&opt, &q, &k, &v, NULL, NULL, &ot, &lt, NULL), MODA_OK);
    moda_tensor dq = moda_tensor_strided(dqkv, MODA_F64, MODA_CPU, 5, qs, qst);
    moda_tensor dk = moda_tensor_strided(dqkv + Hk * G * d, MODA_F64, MODA_CPU, 4, ks, kst);
    moda_tensor dv = moda_tensor_strided(dqkv + Hk * G * d + Hk * d, MODA_F64, MODA_CPU, 4, ks, kst);
    TU_CHECK_STATUS(moda_backward(&opt, &q, &k, &v, NULL, NULL, &ot, &lt, &dt, &dq, &dk, &dv, NULL, NULL, NULL, 0, NULL), MODA_OK);
    /* ... but dk shifted by one element into dq's part of each token is refused */
    moda_tensor bad = moda_tensor_strided(dqkv + Hk * G * d - 1, MODA_F64, MODA_CPU, 4, ks, kst);
    TU_CHECK_STATUS(moda_backward(&opt, &q, &k, &v, NULL, NULL, &ot, &lt, &dt, &dq, &bad, &dv, NULL, NULL, NULL, 0, NULL),
                    MODA_ERR_OVERLAP);
    free(qkv); free(o); free(dqkv); free(lse); free(dout);
}

static void test_optional_tensors(tu_rng *r) {
    /* depth-only with k, v absent; no depth with kd, vd absent; lse absent in the forward; B = 0 is a no-op */
    tu_case c = {1, 3, 1, 2, 4, 4, 2, 0, 2, 1, 0, 0, 1, TU_LAYOUT_STANDARD, 0};
    tu_problem p;
    tu_problem_alloc(&p, &c, MODA_F64, MODA_F64);
    tu_problem_randomize(&p, r);
    moda_options o = tu_case_options(&c);
    TU_CHECK_STATUS(moda_forward(&o, &p.q.view, NULL, NULL, &p.kd.view, &p.vd.view, &p.o.view, NULL, NULL), MODA_OK);
    o.depth_end = 0;
    o.sequence = 1;
    TU_CHECK_STATUS(moda_forward(&o, &p.q.view, NULL, NULL, NULL, NULL, &p.o.view, NULL, NULL), MODA_ERR_NULL_POINTER);
    tu_problem_free(&p);
    tu_case e = {0, 3, 1, 1, 4, 4, 0, 0, 0, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0};
    tu_problem_alloc(&p, &e, MODA_F32, MODA_F32);
    o = tu_case_options(&e);
    TU_CHECK_STATUS(moda_forward(&o, &p.q.view, &p.k.view, &p.v.view, NULL, NULL, &p.o.view, &p.lse.view, NULL), MODA_OK);
    tu_problem_free(&p);
    TU_CHECK(strlen(moda_last_error()) == 0, "a successful call clears the message");
}

static void test_misc_entry_points(void) {
    float f[4] = {1, 2, 3, 4};
    uint16_t h[4];
    TU_CHECK_STATUS(moda_convert(h, MODA_BF16, NULL, MODA_F32, 4), MODA_ERR_NULL_POINTER);
    TU_CHECK_STATUS(moda_convert(h, (moda_dtype)9, f, MODA_F32, 4), MODA_ERR_INVALID_ARGUMENT);
    TU_CHECK_STATUS(moda_convert(h, MODA_BF16, f, MODA_F32, -1), MODA_ERR_INVALID_ARGUMENT);
    TU_CHECK_STATUS(moda_convert((char *)f + 2, MODA_BF16, f, MODA_F32, 4), MODA_ERR_OVERLAP);
    TU_CHECK_STATUS(moda_convert(h, MODA_BF16, f, MODA_F32, 4), MODA_OK);
    TU_CHECK(moda_backward_workspace_size(NULL, NULL, NULL, NULL, NULL, NULL, NULL) == MODA_ERR_NULL_POINTER, "NULL bytes");
    TU_CHECK(!strcmp(moda_status_string(MODA_ERR_DEPTH_RANGE), "MODA_ERR_DEPTH_RANGE"), "status names");
    TU_CHECK(!strcmp(moda_version(), MODA_VERSION_STRING), "version string");
    /* f64 never runs on CUDA: it is the CPU reference */
    tu_case c = {1, 2, 1, 1, 4, 4, 0, 0, 0, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0};
    tu_problem p;
    tu_problem_alloc(&p, &c, MODA_F64, MODA_F64);
    moda_tensor q = p.q.view, k = p.k.view, v = p.v.view, o = p.o.view;
    q.device = k.device = v.device = o.device = MODA_CUDA;
    moda_options opt = moda_default_options();
    moda_status st = moda_forward(&opt, &q, &k, &v, NULL, NULL, &o, NULL, NULL);
    TU_CHECK(st == MODA_ERR_UNSUPPORTED, "f64 on CUDA is refused (%s: %s)", moda_status_string(st), moda_last_error());
    tu_problem_free(&p);
    /* f32 host memory labelled CUDA: refused, never run on the CPU by accident */
    tu_problem_alloc(&p, &c, MODA_BF16, MODA_BF16);
    q = p.q.view; k = p.k.view; v = p.v.view; o = p.o.view;
    q.device = k.device = v.device = o.device = MODA_CUDA;
    st = moda_forward(&opt, &q, &k, &v, NULL, NULL, &o, NULL, NULL);
    TU_CHECK(st == MODA_ERR_NOT_BUILT || st == MODA_ERR_WRONG_DEVICE || st == MODA_ERR_DEVICE_FAILURE,
             "host memory labelled CUDA is refused (%s: %s)", moda_status_string(st), moda_last_error());
    tu_problem_free(&p);
}

int main(void) {
    tu_rng r = tu_rng_from_env("test_validation");
    test_forward_and_backward(&r, 0);
    test_forward_and_backward(&r, 1);
    test_packed_layouts_accepted(&r);
    test_optional_tensors(&r);
    test_misc_entry_points();
    return tu_finish("test_validation");
}
