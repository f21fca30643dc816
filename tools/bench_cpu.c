/* bench_cpu.c - `moda bench --device cpu`: times the fast CPU forward and backward, reports GFLOP/s, the
 * fraction of this machine's fp32 FMA peak (measured here with an FMA-bound loop, since the clock is unknown),
 * and the speed-up over the float64 reference. Prints a table; --json FILE writes the same numbers. */
#include "commands.h"
#include "internal.h"
#include "moda.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct shape {
    int64_t B, T, Hq, Hk, d, slots;
    int sequence;
} shape;

typedef struct result {
    shape s;
    double flops_fwd, fwd_ms, bwd_ms, ref_fwd_ms, ref_bwd_ms; /* ref_*: scaled to this T */
    int64_t ref_T;
} result;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* ---- the machine's fp32 FMA peak: independent FMA chains, enough to cover latency x units ---- */
typedef float bench_v8 __attribute__((vector_size(32)));
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static float fma_loop(int64_t iters, float seed) {
    bench_v8 acc[12], a = (bench_v8){0} + 0.999999f, b = (bench_v8){0} + 1e-7f * seed;
    for (int i = 0; i < 12; i++) acc[i] = (bench_v8){0} + (float)i * seed;
    for (int64_t it = 0; it < iters; it++)
        for (int i = 0; i < 12; i++) acc[i] = acc[i] * a + b;
    float s = 0;
    for (int i = 0; i < 12; i++)
        for (int j = 0; j < 8; j++) s += acc[i][j];
    return s;
}

/* GFLOP/s of `threads` cores running fma_loop together (best of `reps`). On a shared machine the best
 * single-thread figure times the thread count is the steadier estimate of the machine's peak. */
static double measure_peak(int threads, int reps) {
    const int64_t iters = 20 * 1000 * 1000;
    double best = 0;
    volatile float sink = 0;
    for (int rep = 0; rep < reps; rep++) {
        double t0 = now_s();
#pragma omp parallel num_threads(threads)
        {
            float s = fma_loop(iters, 1.0f);
#pragma omp atomic
            sink += s;
        }
        double dt = now_s() - t0;
        double g = (double)threads * (double)iters * 12 * 8 * 2 / dt * 1e-9;
        if (g > best) best = g;
    }
    (void)sink;
    return best;
}

/* ---- problem set-up ---- */
typedef struct bench_tensors {
    moda_tensor q, k, v, kd, vd, o, lse, dout, dq, dk, dv, dkd, dvd;
    void *mem[13];
} bench_tensors;

static void *alloc_random(size_t n, moda_dtype dtype, uint64_t *rng, int fill) {
    void *p = malloc(n * moda_dtype_size(dtype) + 64);
    if (!p || !fill) return p;
    float *tmp = malloc(n * sizeof(float));
    if (!tmp) {
        free(p);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        *rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
        tmp[i] = (float)((double)(*rng >> 11) * (1.0 / 9007199254740992.0) * 3.4641016 - 1.7320508); /* var 1 */
    }
    moda_convert(p, dtype, tmp, MODA_F32, (int64_t)n);
    free(tmp);
    return p;
}

static int setup(bench_tensors *t, const shape *s, moda_dtype dtype) {
    memset(t, 0, sizeof *t);
    uint64_t rng = 12345;
    const int64_t G = s->Hq / s->Hk, L = s->slots;
    const int64_t qs[5] = {s->B, s->T, s->Hk, G, s->d}, ls[4] = {s->B, s->T, s->Hk, G};
    const int64_t ks[4] = {s->B, s->T, s->Hk, s->d}, kds[5] = {s->B, s->T, L, s->Hk, s->d};
    const size_t nq = (size_t)(s->B * s->T * s->Hq * s->d), nk = (size_t)(s->B * s->T * s->Hk * s->d);
    const size_t nkd = nk * (size_t)L, nl = (size_t)(s->B * s->T * s->Hq);
    struct {
        moda_tensor *t;
        size_t n;
        moda_dtype dt;
        int ndim, fill;
        const int64_t *shape;
    } all[13] = {{&t->q, nq, dtype, 5, 1, qs},           {&t->k, nk, dtype, 4, 1, ks},
                 {&t->v, nk, dtype, 4, 1, ks},           {&t->kd, nkd, dtype, 5, 1, kds},
                 {&t->vd, nkd, dtype, 5, 1, kds},        {&t->o, nq, dtype, 5, 0, qs},
                 {&t->lse, nl, MODA_F32, 4, 0, ls},
                 {&t->dout, nq, dtype, 5, 1, qs},        {&t->dq, nq, dtype, 5, 0, qs},
                 {&t->dk, nk, dtype, 4, 0, ks},      {&t->dv, nk, dtype, 4, 0, ks},
                 {&t->dkd, nkd, dtype, 5, 0, kds},   {&t->dvd, nkd, dtype, 5, 0, kds}};
    for (int i = 0; i < 13; i++) {
        t->mem[i] = alloc_random(all[i].n, all[i].dt, &rng, all[i].fill);
        if (!t->mem[i]) return -1;
        *all[i].t = moda_tensor_contiguous(t->mem[i], all[i].dt, MODA_CPU, all[i].ndim, all[i].shape);
    }
    return 0;
}

static void release(bench_tensors *t) {
    for (int i = 0; i < 13; i++) free(t->mem[i]);
}

static moda_options shape_options(const shape *s, int threads) {
    moda_options o = moda_default_options();
    o.sequence = s->sequence;
    o.num_threads = threads;
    return o;
}

#define SEQ_ARGS(t, s) ((s)->sequence ? &(t)->k : NULL), ((s)->sequence ? &(t)->v : NULL)
#define DEPTH_ARGS(t, s) ((s)->slots ? &(t)->kd : NULL), ((s)->slots ? &(t)->vd : NULL)
#define SEQ_GRADS(t, s) ((s)->sequence ? &(t)->dk : NULL), ((s)->sequence ? &(t)->dv : NULL)
#define DEPTH_GRADS(t, s) ((s)->slots ? &(t)->dkd : NULL), ((s)->slots ? &(t)->dvd : NULL)

/* Bytes the forward must move at least: every input element once, outputs once. */
static double forward_bytes(const shape *s, moda_dtype dtype) {
    double es = (double)moda_dtype_size(dtype), rows = (double)(s->B * s->T);
    double per_token = (double)s->Hq * (double)(s->d + s->d) * es + (double)s->Hq * 4.0 +
                       (double)(s->sequence + s->slots) * (double)s->Hk * (double)(s->d + s->d) * es;
    return rows * per_token;
}

/* Exact FLOPs of the forward (spec.md §6): 2*(d + dv) per visible (row, key) pair, summed over rows. */
static double forward_flops(const shape *s) {
    double keys = 0;
    for (int64_t t = 0; t < s->T; t++) keys += (double)(s->sequence ? t + 1 : 0) + (double)s->slots;
    return 2.0 * (double)(s->d + s->d) * (double)(s->B * s->Hq) * keys;
}

enum { CALL_FWD, CALL_BWD, CALL_REF_FWD, CALL_REF_BWD };

static moda_status call_once(int kind, bench_tensors *t, const shape *s, const moda_options *o, void *ws,
                             size_t ws_bytes) {
    switch (kind) {
    case CALL_FWD: return moda_forward(o, &t->q, SEQ_ARGS(t, s), DEPTH_ARGS(t, s), &t->o, &t->lse, NULL);
    case CALL_BWD:
        return moda_backward(o, &t->q, SEQ_ARGS(t, s), DEPTH_ARGS(t, s), &t->o, &t->lse, &t->dout, &t->dq,
                             SEQ_GRADS(t, s), DEPTH_GRADS(t, s), ws, ws_bytes, NULL);
    case CALL_REF_FWD:
        return moda_testing_reference_forward(o, &t->q, SEQ_ARGS(t, s), DEPTH_ARGS(t, s), &t->o, &t->lse, MODA_F64);
    default:
        return moda_testing_reference_backward(o, &t->q, SEQ_ARGS(t, s), DEPTH_ARGS(t, s), &t->o, &t->lse, &t->dout,
                                               &t->dq, SEQ_GRADS(t, s), DEPTH_GRADS(t, s), MODA_F64);
    }
}

/* Median wall time in ms of `runs` calls after `warmup` calls; < 0 when a call fails. */
static double time_call(int kind, bench_tensors *t, const shape *s, int threads, int warmup, int runs, void *ws,
                        size_t ws_bytes) {
    moda_options o = shape_options(s, threads);
    double ms[64];
    if (runs > 64) runs = 64;
    for (int r = -warmup; r < runs; r++) {
        double t0 = now_s();
        moda_status st = call_once(kind, t, s, &o, ws, ws_bytes);
        if (st != MODA_OK) {
            fprintf(stderr, "moda bench: %s (%s)\n", moda_status_string(st), moda_last_error());
            return -1;
        }
        if (r >= 0) ms[r] = (now_s() - t0) * 1e3;
    }
    qsort(ms, (size_t)runs, sizeof ms[0], cmp_double);
    return ms[runs / 2];
}

/* Times one shape: the fast path at full size, the float64 reference at T <= ref_T scaled by the FLOP ratio. */
static int run_shape(const shape *s, moda_dtype dtype, int threads, int runs, int64_t ref_T, result *res) {
    memset(res, 0, sizeof *res);
    res->s = *s;
    res->flops_fwd = forward_flops(s);
    bench_tensors t;
    int rc = -1;
    void *ws = NULL;
    size_t ws_bytes = 0;
    if (setup(&t, s, dtype)) goto out;
    moda_options o = shape_options(s, threads);
    if (moda_backward_workspace_size(&o, &t.q, SEQ_ARGS(&t, s), DEPTH_ARGS(&t, s), &ws_bytes) != MODA_OK) goto out;
    ws = malloc(ws_bytes ? ws_bytes : 1);
    if (!ws) goto out;
    res->fwd_ms = time_call(CALL_FWD, &t, s, threads, 1, runs, NULL, 0);
    res->bwd_ms = time_call(CALL_BWD, &t, s, threads, 1, runs, ws, ws_bytes);
    if (res->fwd_ms < 0 || res->bwd_ms < 0) goto out;
    if (ref_T > 0) {
        shape rs = *s;
        rs.T = s->T < ref_T ? s->T : ref_T;
        bench_tensors rt;
        if (setup(&rt, &rs, dtype) == 0) {
            double scale = forward_flops(s) / forward_flops(&rs);
            res->ref_T = rs.T;
            res->ref_fwd_ms = time_call(CALL_REF_FWD, &rt, &rs, threads, 0, 1, NULL, 0) * scale;
            /* the reference backward reads the forward's O and LSE */
            if (time_call(CALL_FWD, &rt, &rs, threads, 0, 1, NULL, 0) >= 0)
                res->ref_bwd_ms = time_call(CALL_REF_BWD, &rt, &rs, threads, 0, 1, NULL, 0) * scale;
        }
        release(&rt);
    }
    rc = 0;
out:
    free(ws);
    release(&t);
    return rc;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: moda bench --device cpu [--T N --Hq N --Hk N --d N --slots N --B N --depth-only]\n"
            "                  [--threads N] [--dtype f32|f16|bf16] [--runs N] [--ref-T N] [--json FILE]\n"
            "Times the fast CPU forward and backward (median of --runs after a warm-up, wall clock).\n"
            "Without shape options: B=1 Hq=8 Hk=2 d=64 16 slots at T=1024 and T=2048, and a depth-only T=2048.\n"
            "FLOPs: 4*B*Hq*d per visible (row, key) pair, summed exactly (backward: 2.5x). %%peak is against the\n"
            "fp32 FMA peak measured here with an FMA-bound loop on the same threads (256-bit vectors). The float64\n"
            "reference is timed at T <= --ref-T (default 256) and scaled to T by the FLOP ratio.\n");
}

static void cpu_name(char *buf, size_t n) {
    snprintf(buf, n, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "model name", 10)) {
            char *c = strchr(line, ':');
            if (c) {
                c += 1 + (c[1] == ' ');
                c[strcspn(c, "\n")] = 0;
                snprintf(buf, n, "%s", c);
            }
            break;
        }
    fclose(f);
}

static void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fputc('\\', f);
        if ((unsigned char)*s >= 0x20) fputc(*s, f);
    }
    fputc('"', f);
}

int moda_cmd_bench_cpu(int argc, char **argv) {
    shape custom = {1, 1024, 8, 2, 64, 16, 1};
    int have_custom = 0, threads = 0, runs = 5;
    int64_t ref_T = 256;
    const char *json = NULL, *dtype_name = "f32";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int64_t *field = NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--depth-only")) {
            custom.sequence = 0;
            have_custom = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "moda bench: %s needs a value\n", a);
            return 2;
        }
        const char *val = argv[++i];
        if (!strcmp(a, "--device")) continue;
        if (!strcmp(a, "--T")) field = &custom.T;
        else if (!strcmp(a, "--Hq")) field = &custom.Hq;
        else if (!strcmp(a, "--Hk")) field = &custom.Hk;
        else if (!strcmp(a, "--d")) field = &custom.d;
        else if (!strcmp(a, "--slots")) field = &custom.slots;
        else if (!strcmp(a, "--B")) field = &custom.B;
        else if (!strcmp(a, "--threads")) threads = atoi(val);
        else if (!strcmp(a, "--runs")) runs = atoi(val);
        else if (!strcmp(a, "--ref-T")) ref_T = atoll(val);
        else if (!strcmp(a, "--json")) json = val;
        else if (!strcmp(a, "--dtype")) dtype_name = val;
        else {
            fprintf(stderr, "moda bench: unknown option %s\n", a);
            usage(stderr);
            return 2;
        }
        if (field) {
            *field = atoll(val);
            have_custom = 1;
        }
    }
    moda_dtype dtype;
    if (!strcmp(dtype_name, "f32")) dtype = MODA_F32;
    else if (!strcmp(dtype_name, "f16")) dtype = MODA_F16;
    else if (!strcmp(dtype_name, "bf16")) dtype = MODA_BF16;
    else {
        fprintf(stderr, "moda bench: --dtype must be f32, f16 or bf16, not '%s'\n", dtype_name);
        return 2;
    }
    if (custom.B < 1 || custom.T < 1 || custom.Hk < 1 || custom.Hq < custom.Hk || custom.Hq % custom.Hk ||
        custom.d < 1 || custom.slots < 0 || runs < 1) {
        fprintf(stderr, "moda bench: need B, T, Hk, d >= 1, Hq a multiple of Hk, slots >= 0, runs >= 1\n");
        return 2;
    }
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
#else
    threads = 1;
#endif
    shape shapes[3] = {{1, 1024, 8, 2, 64, 16, 1}, {1, 2048, 8, 2, 64, 16, 1}, {1, 2048, 8, 2, 64, 16, 0}};
    int nshapes = 3;
    if (have_custom) {
        shapes[0] = custom;
        nshapes = 1;
    }

    char cpu[256];
    cpu_name(cpu, sizeof cpu);
    double peak1 = measure_peak(1, 5), peak_all = measure_peak(threads, 3);
    double peak = peak1 * threads > peak_all ? peak1 * threads : peak_all;
    printf("moda bench cpu: %s, %d threads, dtype %s\n", cpu, threads, dtype_name);
    printf("fp32 FMA peak (256-bit FMA loop): %.1f GFLOP/s per thread, %.1f all threads together; using %.1f\n",
           peak1, peak_all, peak);
    printf("%-34s %9s %8s %6s %6s %9s %8s %6s %10s %10s\n", "shape", "fwd ms", "GFLOP/s", "peak", "GB/s", "bwd ms",
           "GFLOP/s", "peak", "ref fwd x", "ref bwd x");
    result res[3];
    int rc = 0;
    for (int i = 0; i < nshapes; i++) {
        const shape *s = &shapes[i];
        if (run_shape(s, dtype, threads, runs, ref_T, &res[i])) {
            fprintf(stderr, "moda bench: shape %d failed\n", i);
            rc = 1;
            nshapes = i;
            break;
        }
        const result *r = &res[i];
        char name[64];
        snprintf(name, sizeof name, "B%lld T%lld Hq%lld Hk%lld d%lld L%lld%s", (long long)s->B, (long long)s->T,
                 (long long)s->Hq, (long long)s->Hk, (long long)s->d, (long long)s->slots,
                 s->sequence ? "" : " depth");
        double gf = r->flops_fwd / (r->fwd_ms * 1e6), gb = 2.5 * r->flops_fwd / (r->bwd_ms * 1e6);
        printf("%-34s %9.3f %8.1f %5.1f%% %6.1f %9.3f %8.1f %5.1f%% %10.0f %10.0f\n", name, r->fwd_ms, gf,
               100 * gf / peak, forward_bytes(s, dtype) / (r->fwd_ms * 1e6), r->bwd_ms, gb, 100 * gb / peak,
               r->ref_fwd_ms / r->fwd_ms, r->ref_bwd_ms / r->bwd_ms);
    }
    printf("GB/s: the forward's compulsory traffic (q, k, v, visible kd/vd, o, lse once) per second; the\n"
           "depth-only shape is bound by it rather than by FLOPs (spec.md section 6)\n");
    if (ref_T > 0 && nshapes > 0)
        printf("ref x: speed-up over the float64 reference (same threads), timed at T <= %lld and scaled by FLOPs\n",
               (long long)ref_T);

    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) {
            fprintf(stderr, "moda bench: cannot write %s\n", json);
            return 1;
        }
        char date[64], commit[64] = "unknown";
        time_t now = time(NULL);
        strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
        FILE *g = popen("git rev-parse --short HEAD 2>/dev/null", "r");
        if (g) {
            if (fgets(commit, sizeof commit, g)) commit[strcspn(commit, "\n")] = 0;
            if (!commit[0]) snprintf(commit, sizeof commit, "unknown");
            pclose(g);
        }
        fprintf(f, "{\n  \"device\": ");
        json_string(f, cpu);
        fprintf(f, ",\n  \"date\": \"%s\",\n  \"commit\": ", date);
        json_string(f, commit);
        fprintf(f, ",\n  \"command\": \"moda");
        for (int i = 0; i < argc; i++) {
            fputc(' ', f);
            for (const char *c = argv[i]; *c; c++) {
                if (*c == '"' || *c == '\\') fputc('\\', f);
                fputc(*c, f);
            }
        }
        fprintf(f, "\",\n  \"threads\": %d,\n  \"dtype\": \"%s\",\n  \"peak_fp32_fma_gflops\": %.2f,\n"
                "  \"peak_per_thread_gflops\": %.2f,\n  \"peak_all_threads_measured_gflops\": %.2f,\n  \"runs\": %d,\n",
                threads, dtype_name, peak, peak1, peak_all, runs);
        fprintf(f, "  \"results\": [\n");
        for (int i = 0; i < nshapes; i++) {
            const result *r = &res[i];
            const shape *s = &r->s;
            double gf = r->flops_fwd / (r->fwd_ms * 1e6), gb = 2.5 * r->flops_fwd / (r->bwd_ms * 1e6);
            fprintf(f,
                    "    {\"B\": %lld, \"T\": %lld, \"Hq\": %lld, \"Hk\": %lld, \"d\": %lld, \"slots\": %lld, "
                    "\"sequence\": %d, \"causal\": 1, \"fwd_flops\": %.6g, \"fwd_ms\": %.4f, \"fwd_gflops\": %.2f, "
                    "\"fwd_gbytes_per_s\": %.2f, "
                    "\"fwd_peak_fraction\": %.4f, \"bwd_ms\": %.4f, \"bwd_gflops\": %.2f, \"bwd_peak_fraction\": %.4f, "
                    "\"ref_T\": %lld, \"ref_fwd_ms_scaled\": %.2f, \"ref_bwd_ms_scaled\": %.2f, "
                    "\"speedup_fwd\": %.1f, \"speedup_bwd\": %.1f}%s\n",
                    (long long)s->B, (long long)s->T, (long long)s->Hq, (long long)s->Hk, (long long)s->d,
                    (long long)s->slots, s->sequence, r->flops_fwd, r->fwd_ms, gf, forward_bytes(s, dtype) / (r->fwd_ms * 1e6), gf / peak, r->bwd_ms, gb, gb / peak,
                    (long long)r->ref_T, r->ref_fwd_ms, r->ref_bwd_ms, r->ref_fwd_ms / r->fwd_ms,
                    r->ref_bwd_ms / r->bwd_ms, i + 1 < nshapes ? "," : "");
        }
        fprintf(f, "  ]\n}\n");
        fclose(f);
        printf("wrote %s\n", json);
    }
    return rc;
}
