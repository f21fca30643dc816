/* test_forward.c - the CUDA forward (all kernels: Hopper wgmma/TMA, mma.sync tensor-core, generic) against the
 * float64 reference. Every check runs once per forward path: MODA_CUDA_FORWARD=hopper (the sm_90a kernel where
 * the device and the problem allow it) and =mma (the mma.sync kernel), so the same grid covers both; on a
 * compute-capability-9 device the hopper pass must really have run the Hopper kernel on its eligible cases.
 *
 * 1. A grid of odd cases (spec.md §4 tolerance policy, full reference): T = 1 and 77, G = 1/3/8, d = 80,
 *    dv != d, 0/1/7/64 slots, ranges not starting at 0, chunk sizes 1/5/64, depth-only, non-causal, the
 *    three layouts, B > 1, in f16, bf16 and f32. Outputs are poisoned on the device before every call.
 * 2. The benchmark shapes (S2..S5) on a few hundred sampled rows against a float64 row reference written
 *    here (the full reference would take hours), S4's depth tensors beyond 2^31 elements included.
 *
 * Environment: MODA_TEST_SEED (rerun a failure), MODA_TEST_QUICK (grid only, small; sanitizer runs),
 * MODA_TEST_VERBOSE (print every comparison), MODA_TEST_FORWARD_PATHS (e.g. "hopper" or "mma,generic": the
 * paths to run, default "hopper,mma"). */
#include "testutil.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_util.h"

/* Private library hook (src/cuda/api.cu): the kernel family the last forward on this thread chose. */
MODA_API const char *moda_testing_cuda_last_forward(void);

/* Kernel families chosen in the current pass, counted over the grid cases. */
static int g_ran_hopper, g_ran_mma, g_ran_generic;
static void count_kernel(void) {
    const char *k = moda_testing_cuda_last_forward();
    if (!strcmp(k, "hopper")) g_ran_hopper++;
    else if (!strcmp(k, "mma")) g_ran_mma++;
    else if (!strcmp(k, "generic")) g_ran_generic++;
}

/* ---------------------------------------------------------------------------------------------------------
 * 1. Full-reference grid
 * ------------------------------------------------------------------------------------------------------- */
typedef struct {
    tu_tensor *host;
    void *dev;
} dev_tensor;

static void to_device(dev_tensor *d, tu_tensor *t) {
    d->host = t;
    d->dev = NULL;
    if (!t->alloc) return;
    CUDA_OK(cudaMalloc(&d->dev, t->bytes));
    CUDA_OK(cudaMemcpy(d->dev, t->alloc, t->bytes, cudaMemcpyHostToDevice));
}
static void from_device(dev_tensor *d) {
    if (d->dev) CUDA_OK(cudaMemcpy(d->host->alloc, d->dev, d->host->bytes, cudaMemcpyDeviceToHost));
}
static moda_tensor dview(const dev_tensor *d) { return tu_rebase(d->host, d->dev, MODA_CUDA); }

/* with_lse == 0 passes no LSE tensor (it is optional in the forward) and checks O alone. */
static void run_grid_case(const tu_case *c, moda_dtype dt, tu_rng *r, cudaStream_t stream, int with_lse) {
    tu_problem p, ref, low;
    if (tu_problem_alloc(&p, c, dt, dt)) {
        TU_CHECK(0, "host allocation failed [%s]", tu_case_str(c));
        return;
    }
    tu_problem_randomize(&p, r);
    tu_poison(&p.o);
    tu_poison(&p.lse);
    dev_tensor q, k, v, kd, vd, o, lse;
    to_device(&q, &p.q);
    to_device(&k, &p.k);
    to_device(&v, &p.v);
    to_device(&kd, &p.kd);
    to_device(&vd, &p.vd);
    to_device(&o, &p.o); /* the poison travels with the allocation */
    to_device(&lse, &p.lse);
    moda_tensor qv = dview(&q), kv = dview(&k), vv = dview(&v), kdv = dview(&kd), vdv = dview(&vd), ov = dview(&o),
                lv = dview(&lse);
    moda_options opt = tu_case_options(c);
    moda_status st = moda_forward(&opt, &qv, k.dev ? &kv : NULL, v.dev ? &vv : NULL, kd.dev ? &kdv : NULL,
                                  vd.dev ? &vdv : NULL, &ov, with_lse ? &lv : NULL, stream);
    TU_CHECK(st == MODA_OK, "moda_forward on CUDA returned %s (%s) [%s %s]", moda_status_string(st),
             moda_last_error(), tu_case_str(c), moda_dtype_name(dt));
    if (st == MODA_OK) count_kernel();
    CUDA_OK(cudaStreamSynchronize(stream));
    from_device(&o);
    from_device(&lse);
    if (st == MODA_OK) {
        TU_CHECK_STATUS(tu_reference_forward(&p, &ref, MODA_F64), MODA_OK);
        TU_CHECK_STATUS(tu_reference_forward(&p, &low, dt), MODA_OK);
        char what[64];
        snprintf(what, sizeof what, "O %s", moda_dtype_name(dt));
        tu_expect_close(what, c, &p.o, &ref.o, dt == MODA_F32 ? NULL : &low.o, dt == MODA_F32 ? 1e-5 : 1e-5);
        snprintf(what, sizeof what, "LSE %s", moda_dtype_name(dt));
        if (with_lse) tu_expect_close(what, c, &p.lse, &ref.lse, dt == MODA_F32 ? NULL : &low.lse, 1e-5);
        tu_problem_free(&ref);
        tu_problem_free(&low);
    }
    dev_tensor *all[] = {&q, &k, &v, &kd, &vd, &o, &lse};
    for (int i = 0; i < 7; i++) cudaFree(all[i]->dev);
    tu_problem_free(&p);
}

static void grid(tu_rng *r, cudaStream_t stream) {
    /* B, T, Hk, G, d, dv, Lcap, d0, d1, causal, sequence, chunk, C, layout, scale */
    const tu_case base[] = {
        {1, 1, 1, 1, 64, 64, 0, 0, 0, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},       /* T = 1 */
        {1, 77, 2, 3, 64, 64, 7, 2, 7, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},      /* odd T, G = 3, range from 2 */
        {2, 77, 2, 8, 64, 64, 64, 0, 64, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},    /* B > 1, 64 slots */
        {1, 130, 1, 8, 128, 128, 9, 1, 8, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},   /* d = 128 */
        {1, 77, 2, 3, 80, 80, 7, 0, 7, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},      /* d = 80: generic */
        {1, 50, 2, 2, 64, 40, 3, 0, 3, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},      /* dv != d */
        {1, 33, 1, 5, 24, 200, 2, 1, 2, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},     /* dv = 200, one slot */
        {1, 77, 2, 3, 64, 64, 7, 1, 6, 1, 1, 1, 5, TU_LAYOUT_STANDARD, 0},      /* chunk C = 5 */
        {1, 77, 1, 4, 64, 64, 3, 0, 3, 1, 1, 1, 1, TU_LAYOUT_STANDARD, 0},      /* chunk C = 1 == token */
        {1, 150, 2, 2, 64, 64, 4, 0, 4, 1, 1, 1, 64, TU_LAYOUT_STANDARD, 0},    /* chunk C = 64 */
        {1, 77, 2, 3, 128, 128, 5, 0, 5, 1, 1, 1, 64, TU_LAYOUT_STANDARD, 0},   /* chunk, d = 128 */
        {1, 77, 2, 3, 64, 64, 7, 0, 7, 1, 0, 0, 1, TU_LAYOUT_STANDARD, 0},      /* depth-only */
        {1, 20, 1, 2, 64, 64, 4, 2, 2, 1, 0, 0, 1, TU_LAYOUT_STANDARD, 0},      /* empty rows: O = 0, LSE = -inf */
        {1, 77, 2, 3, 64, 64, 7, 0, 7, 0, 1, 0, 1, TU_LAYOUT_STANDARD, 0},      /* non-causal */
        {1, 100, 2, 32, 64, 64, 2, 0, 2, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},    /* G = 32 */
        {2, 77, 2, 3, 64, 64, 7, 2, 7, 1, 1, 0, 1, TU_LAYOUT_FOLDED, 0},        /* the authors' layout */
        {2, 77, 2, 3, 64, 64, 7, 2, 7, 1, 1, 0, 1, TU_LAYOUT_STRIDED, 0},       /* padded, B/T permuted */
        {2, 45, 2, 8, 128, 128, 3, 0, 3, 0, 1, 0, 1, TU_LAYOUT_STRIDED, 0},     /* strided d = 128 */
        {1, 77, 2, 3, 80, 48, 7, 2, 7, 1, 1, 1, 5, TU_LAYOUT_FOLDED, 0},        /* generic, chunk, folded */
        {1, 64, 1, 1, 64, 64, 64, 0, 64, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0.3},  /* G = 1, explicit scale */
        {1, 70, 2, 2, 64, 64, 8, 0, 8, 1, 1, 0, 1, TU_LAYOUT_STANDARD, -0.3}, /* negative scale: generic route */
        /* visible slot counts that are multiples of 8 (the depth lists' 8-slot boxes), with half last sub-tiles */
        {1, 77, 2, 16, 64, 64, 24, 0, 24, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},   /* G = 16, 24 slots */
        {1, 77, 2, 3, 64, 64, 16, 8, 16, 1, 1, 1, 5, TU_LAYOUT_STANDARD, 0},    /* chunk, 8 slots from slot 8 */
        {2, 77, 2, 3, 64, 64, 16, 8, 16, 1, 1, 0, 1, TU_LAYOUT_FOLDED, 0},      /* folded, from slot 8 */
        {2, 77, 2, 3, 64, 64, 16, 0, 16, 1, 1, 0, 1, TU_LAYOUT_STRIDED, 0},     /* strided, 16 slots */
        /* no depth slots on the Hopper kernel (several tiles per warpgroup, both d) */
        {1, 300, 2, 3, 64, 64, 0, 0, 0, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},     /* L = 0, causal, G = 3 */
        {1, 281, 1, 4, 128, 128, 0, 0, 0, 0, 1, 0, 1, TU_LAYOUT_STRIDED, 0},    /* L = 0, d = 128, non-causal */
        /* keep these two last: the quick grid leaves their T uncapped */
        {1, 300, 1, 2, 64, 64, 8, 0, 8, 0, 1, 0, 1, TU_LAYOUT_STANDARD, 0},     /* non-causal, 3 tiles per warpgroup */
        {1, 200, 1, 16, 64, 64, 1, 0, 1, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},    /* many row blocks */
    };
    const int quick = tu_quick();
    const int ncases = (int)(sizeof base / sizeof base[0]);
    /* the quick grid (the sanitizers' run) caps T at 80, except for the last two cases: T > 128 reaches the
     * loops over several tiles per consumer warpgroup under memcheck and racecheck */
    const int uncapped = ncases - 2;
    for (int i = 0; i < ncases; i++) {
        const moda_dtype dts[3] = {MODA_BF16, MODA_F16, MODA_F32};
        for (int j = 0; j < 3; j++) {
            if (quick && j == 2) continue;
            tu_case c = base[i];
            if (quick && c.T > 80 && i < uncapped) c.T = 80;
            run_grid_case(&c, dts[j], r, stream, 1);
        }
    }
    /* LSE absent: the tensor-core and the generic kernel */
    run_grid_case(&base[2], MODA_BF16, r, stream, 0);
    run_grid_case(&base[4], MODA_F16, r, stream, 0);
}

/* ---------------------------------------------------------------------------------------------------------
 * 2. Benchmark shapes on sampled rows (standard layout, token mode, causal)
 * ------------------------------------------------------------------------------------------------------- */
typedef struct {
    const char *name;
    int64_t B, T, Hk, G, d, L;
} big_shape;

/* Approximately normal values from a fast generator (sum of four uniforms, centred): the data only need to
 * be random, not exactly Gaussian, and billions of them must be made in seconds. */
static void fill_host_f32(float *x, int64_t n, uint64_t *s) {
    for (int64_t i = 0; i < n; i++) {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        const uint64_t u = *s;
        const float a = (float)((u & 0xFFFF) + ((u >> 16) & 0xFFFF) + ((u >> 32) & 0xFFFF) + (u >> 48));
        x[i] = (a - 131070.0f) * (1.0f / 37837.0f); /* mean 0, sd ~1 */
    }
}

/* Fills n device elements of dtype with fresh random values through a host staging buffer; keeps a float copy
 * of the stored (rounded) values in `keep` when non-NULL. */
static void fill_device(void *dev, moda_dtype dt, int64_t n, uint64_t *s, float *keep) {
    const int64_t chunk = 1 << 24;
    float *f = malloc(sizeof(float) * (size_t)chunk);
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)chunk);
    for (int64_t i = 0; i < n; i += chunk) {
        const int64_t m = n - i < chunk ? n - i : chunk;
        fill_host_f32(f, m, s);
        moda_convert(h, dt, f, MODA_F32, m);
        CUDA_OK(cudaMemcpy((uint16_t *)dev + i, h, sizeof(uint16_t) * (size_t)m, cudaMemcpyHostToDevice));
        if (keep) moda_convert(keep + i, MODA_F32, h, dt, m);
    }
    free(f);
    free(h);
}


static void big_case(const big_shape *s, moda_dtype dt, int nsample, uint64_t seed, cudaStream_t stream,
                     const char *const *paths, int npaths) {
    const int64_t B = s->B, T = s->T, Hk = s->Hk, G = s->G, d = s->d, L = s->L, Hq = Hk * G;
    const int64_t nq = B * T * Hq * d, nk = B * T * Hk * d, nkd = B * T * L * Hk * d;
    size_t free_b = 0, total_b = 0;
    CUDA_OK(cudaMemGetInfo(&free_b, &total_b));
    const double need = 2.0 * (double)(2 * nq + 2 * nk + 2 * nkd) + 4.0 * (double)(B * T * Hq) + (1 << 28);
    if (need > (double)free_b) {
        printf("skip %s: needs %.1f GB of device memory, %.1f GB free\n", s->name, need / 1e9, free_b / 1e9);
        return;
    }
    float *hq = malloc(4 * (size_t)nq), *hk = malloc(4 * (size_t)nk), *hv = malloc(4 * (size_t)nk);
    void *q, *k, *v, *kd, *vd, *o;
    float *lse;
    CUDA_OK(cudaMalloc(&q, 2 * (size_t)nq));
    CUDA_OK(cudaMalloc(&o, 2 * (size_t)nq));
    CUDA_OK(cudaMalloc(&k, 2 * (size_t)nk));
    CUDA_OK(cudaMalloc(&v, 2 * (size_t)nk));
    CUDA_OK(cudaMalloc(&kd, 2 * (size_t)nkd));
    CUDA_OK(cudaMalloc(&vd, 2 * (size_t)nkd));
    CUDA_OK(cudaMalloc((void **)&lse, 4 * (size_t)(B * T * Hq)));
    uint64_t st = seed | 1;
    fill_device(q, dt, nq, &st, hq);
    fill_device(k, dt, nk, &st, hk);
    fill_device(v, dt, nk, &st, hv);
    fill_device(kd, dt, nkd, &st, NULL);
    fill_device(vd, dt, nkd, &st, NULL);
    const uint64_t st0 = st;
    for (int pi = 0; pi < npaths; pi++) {
        setenv("MODA_CUDA_FORWARD", paths[pi], 1);
        st = st0; /* the same sampled rows on every path */
        /* poison, on the forward's stream: a plain cudaMemset runs on the legacy default stream, which does not
         * order itself with this non-blocking stream, so the poison could land after the kernel's writes (session 7,
         * call M: 189 of S4's 200 sampled LSE values came back as poison on the mma.sync path) */
        CUDA_OK(cudaMemsetAsync(o, 0xFF, 2 * (size_t)nq, stream));
        CUDA_OK(cudaMemsetAsync(lse, 0xFF, 4 * (size_t)(B * T * Hq), stream));

        const int64_t qsh[4] = {B, T, Hk, d}, kdsh[5] = {B, T, L, Hk, d}, lsh[4] = {B, T, Hk, G};
        moda_tensor tq = moda_tensor_q_standard(q, dt, MODA_CUDA, B, T, Hk, G, d);
        moda_tensor to = moda_tensor_q_standard(o, dt, MODA_CUDA, B, T, Hk, G, d);
        moda_tensor tk = moda_tensor_contiguous(k, dt, MODA_CUDA, 4, qsh);
        moda_tensor tv = moda_tensor_contiguous(v, dt, MODA_CUDA, 4, qsh);
        moda_tensor tkd = moda_tensor_contiguous(kd, dt, MODA_CUDA, 5, kdsh);
        moda_tensor tvd = moda_tensor_contiguous(vd, dt, MODA_CUDA, 5, kdsh);
        moda_tensor tl = moda_tensor_contiguous(lse, MODA_F32, MODA_CUDA, 4, lsh);
        moda_options opt = moda_default_options();
        moda_status rc = moda_forward(&opt, &tq, &tk, &tv, &tkd, &tvd, &to, &tl, stream);
        TU_CHECK(rc == MODA_OK, "%s: moda_forward returned %s (%s)", s->name, moda_status_string(rc),
                 moda_last_error());
        CUDA_OK(cudaStreamSynchronize(stream));
        const char *kern = moda_testing_cuda_last_forward();

        /* Sampled rows: the last rows (longest sequence part), the first, the top of the depth tensor (offsets
         * beyond 2^31), and random ones. */
        double num2 = 0, den2 = 0, lse_err = 0;
        int64_t nonfinite = 0;
        double *z = malloc(sizeof(double) * (size_t)(T + L));
        uint16_t *kdrow = malloc(2 * (size_t)(L * d)), *vdrow = malloc(2 * (size_t)(L * d));
        uint16_t *orow = malloc(2 * (size_t)d);
        float *kdf = malloc(4 * (size_t)(L * d)), *vdf = malloc(4 * (size_t)(L * d)), *of = malloc(4 * (size_t)d);
        double *acc = malloc(sizeof(double) * (size_t)d);
        for (int si = 0; si < nsample; si++) {
            int64_t b, t, h, g;
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            if (si < 4) {
                b = B - 1, t = T - 1 - si, h = Hk - 1 - (si & 1), g = G - 1 - (si >> 1) % G;
            } else if (si < 6) {
                b = 0, t = si - 4, h = 0, g = si - 4;
            } else {
                b = (int64_t)(st % (uint64_t)B);
                t = (int64_t)((st >> 8) % (uint64_t)T);
                h = (int64_t)((st >> 24) % (uint64_t)Hk);
                g = (int64_t)((st >> 40) % (uint64_t)G);
            }
            const int64_t qoff = ((b * T + t) * Hq + h * G + g) * d;
            /* depth slots of token t, head h: rows of d with stride Hk*d */
            const int64_t kdoff = (((b * T + t) * L) * Hk + h) * d;
            CUDA_OK(cudaMemcpy2D(kdrow, 2 * (size_t)d, (uint16_t *)kd + kdoff, 2 * (size_t)(Hk * d), 2 * (size_t)d,
                                 (size_t)L, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy2D(vdrow, 2 * (size_t)d, (uint16_t *)vd + kdoff, 2 * (size_t)(Hk * d), 2 * (size_t)d,
                                 (size_t)L, cudaMemcpyDeviceToHost));
            CUDA_OK(cudaMemcpy(orow, (uint16_t *)o + qoff, 2 * (size_t)d, cudaMemcpyDeviceToHost));
            moda_convert(kdf, MODA_F32, kdrow, dt, L * d);
            moda_convert(vdf, MODA_F32, vdrow, dt, L * d);
            moda_convert(of, MODA_F32, orow, dt, d);
            float lse_dev;
            CUDA_OK(cudaMemcpy(&lse_dev, lse + (b * T + t) * Hq + h * G + g, 4, cudaMemcpyDeviceToHost));
            const double scale = 1.0 / sqrt((double)d);
            double m = -INFINITY;
            for (int64_t j = 0; j < t + 1 + L; j++) {
                const float *kr = j <= t ? hk + ((b * T + j) * Hk + h) * d : kdf + (j - t - 1) * d;
                double dot = 0;
                for (int64_t i = 0; i < d; i++) dot += (double)hq[qoff + i] * kr[i];
                z[j] = dot * scale;
                if (z[j] > m) m = z[j];
            }
            double sum = 0;
            for (int64_t i = 0; i < d; i++) acc[i] = 0;
            for (int64_t j = 0; j < t + 1 + L; j++) {
                const double pj = exp(z[j] - m);
                const float *vr = j <= t ? hv + ((b * T + j) * Hk + h) * d : vdf + (j - t - 1) * d;
                sum += pj;
                for (int64_t i = 0; i < d; i++) acc[i] += pj * vr[i];
            }
            for (int64_t i = 0; i < d; i++) {
                const double ref = acc[i] / sum, got = of[i];
                if (!isfinite(got)) nonfinite++;
                num2 += (got - ref) * (got - ref);
                den2 += ref * ref;
            }
            const double lref = m + log(sum);
            if (!isfinite(lse_dev)) nonfinite++;
            const double le = fabs(lse_dev - lref) / (1.0 + fabs(lref));
            if (le > lse_err) lse_err = le;
        }
        const double rel = sqrt(num2 / den2);
        const double guide = dt == MODA_BF16 ? 1e-2 : 2e-3;
        printf("%s %s [%s kernel, MODA_CUDA_FORWARD=%s] sampled %d rows: O rel_l2 %.3g (guide %.0e), LSE rel err %.3g, "
               "nonfinite %lld\n",
               s->name, moda_dtype_name(dt), kern, paths[pi], nsample, rel, guide, lse_err, (long long)nonfinite);
        TU_CHECK(nonfinite == 0 && rel < guide && lse_err < 1e-4, "%s sampled rows out of tolerance (%s kernel)",
                 s->name, kern);
        free(z);
        free(kdrow);
        free(vdrow);
        free(orow);
        free(kdf);
        free(vdf);
        free(of);
        free(acc);
    }
    free(hq);
    free(hk);
    free(hv);
    cudaFree(q);
    cudaFree(k);
    cudaFree(v);
    cudaFree(kd);
    cudaFree(vd);
    cudaFree(o);
    cudaFree(lse);
}

/* Rejections that must happen before any output is touched. */
static void rejections(cudaStream_t stream) {
    const int64_t B = 1, T = 8, Hk = 1, G = 2, d = 64;
    void *q, *o;
    CUDA_OK(cudaMalloc(&q, 2 * B * T * Hk * G * d));
    CUDA_OK(cudaMalloc(&o, 2 * B * T * Hk * G * d));
    uint16_t *host = calloc((size_t)(B * T * Hk * G * d), 2);
    moda_options opt = moda_default_options();
    opt.sequence = 0; /* depth-only, no depth: just q and o */
    moda_tensor tq = moda_tensor_q_standard(q, MODA_BF16, MODA_CUDA, B, T, Hk, G, d);
    moda_tensor to = moda_tensor_q_standard(o, MODA_BF16, MODA_CUDA, B, T, Hk, G, d);
    moda_tensor th = moda_tensor_q_standard(host, MODA_BF16, MODA_CUDA, B, T, Hk, G, d);
    TU_CHECK_STATUS(moda_forward(&opt, &th, NULL, NULL, NULL, NULL, &to, NULL, stream), MODA_ERR_WRONG_DEVICE);
    moda_tensor tbad = tq;
    tbad.stride[4] = 2;
    tbad.shape[4] = 32;
    moda_tensor tob = to;
    tob.shape[4] = 32;
    TU_CHECK_STATUS(moda_forward(&opt, &tbad, NULL, NULL, NULL, NULL, &tob, NULL, stream), MODA_ERR_LAYOUT);
    moda_tensor t64 = tq, o64 = to;
    t64.dtype = o64.dtype = MODA_F64;
    TU_CHECK(moda_forward(&opt, &t64, NULL, NULL, NULL, NULL, &o64, NULL, stream) != MODA_OK, "f64 on CUDA rejected");
    moda_tensor tmis = tq, omis = to;
    tmis.data = (char *)q + 1;
    TU_CHECK(moda_forward(&opt, &tmis, NULL, NULL, NULL, NULL, &omis, NULL, stream) != MODA_OK,
             "misaligned bf16 pointer rejected");
    cudaFree(q);
    cudaFree(o);
    free(host);
}

int main(void) {
    int n = moda_cuda_device_count();
    if (n <= 0) {
        printf("test_forward: no CUDA device; nothing to run\n");
        return 0;
    }
    tu_rng r = tu_rng_from_env("gpu_test_forward");
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    int dev = 0, major = 0;
    CUDA_OK(cudaGetDevice(&dev));
    CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));

    /* the forward paths to run, from MODA_TEST_FORWARD_PATHS (default hopper,mma) */
    static char pathbuf[64];
    const char *paths[4];
    int npaths = 0;
    {
        const char *e = getenv("MODA_TEST_FORWARD_PATHS");
        snprintf(pathbuf, sizeof pathbuf, "%s", e && *e ? e : "hopper,mma");
        for (char *tok = strtok(pathbuf, ","); tok && npaths < 4; tok = strtok(NULL, ",")) paths[npaths++] = tok;
    }
    for (int pi = 0; pi < npaths; pi++) {
        setenv("MODA_CUDA_FORWARD", paths[pi], 1);
        g_ran_hopper = g_ran_mma = g_ran_generic = 0;
        if (pi == 0) rejections(stream);
        grid(&r, stream);
        printf("grid with MODA_CUDA_FORWARD=%s: %d cases on the Hopper kernel, %d on mma.sync, %d on generic\n",
               paths[pi], g_ran_hopper, g_ran_mma, g_ran_generic);
        /* the grid has about 30 f16/bf16 runs with d == dv in {64, 128}, a positive scale and standard/folded
         * views. On a compute-capability-9 device a build without sm_90a code fails here on purpose: the Hopper
         * path would otherwise be missing without anyone noticing. */
        if (!strcmp(paths[pi], "hopper") && major == 9)
            TU_CHECK(g_ran_hopper >= 20, "the hopper pass ran the Hopper kernel on %d cases only", g_ran_hopper);
        if (strcmp(paths[pi], "hopper") != 0)
            TU_CHECK(g_ran_hopper == 0, "MODA_CUDA_FORWARD=%s still ran the Hopper kernel", paths[pi]);
        if (!strcmp(paths[pi], "mma"))
            TU_CHECK(g_ran_mma >= 20, "the mma pass ran the mma.sync kernel on %d cases only", g_ran_mma);
    }
    if (!tu_quick()) {
        const big_shape shapes[] = {
            {"S3", 1, 1024, 8, 8, 64, 64},
            {"S2", 8, 4096, 8, 2, 64, 72},
            {"S5", 1, 8192, 8, 4, 128, 64},
            {"S4 (depth > 2^31 elements)", 1, 16384, 8, 8, 64, 256},
        };
        for (int i = 0; i < 4; i++)
            big_case(&shapes[i], i == 1 ? MODA_F16 : MODA_BF16, 200, tu_next(&r), stream, paths, npaths);
    }
    cudaStreamDestroy(stream);
    return tu_finish("gpu_test_forward");
}
