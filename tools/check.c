/* check.c - `moda check`: the operator on fresh random inputs on every device present, forward and backward,
 * against the float64 reference under spec.md §4's tolerance policy; prints a table and a timing per device.
 * `moda demo` runs it first, so a fresh clone shows in one command that the library computes the right thing. */
#include "commands.h"
#include "testutil.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef MODA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* The problem's tensors as the device sees them; device copies for CUDA. */
typedef struct {
    moda_tensor t[13];
    void *dev[13];
} device_views;

static tu_tensor *problem_tensors(tu_problem *p, int i) {
    tu_tensor *all[13] = {&p->q, &p->k, &p->v, &p->kd, &p->vd, &p->o, &p->lse, &p->dout, &p->dq, &p->dk, &p->dv, &p->dkd, &p->dvd};
    return all[i];
}

static int views_make(device_views *dv, tu_problem *p, moda_device device) {
    memset(dv, 0, sizeof *dv);
    for (int i = 0; i < 13; i++) {
        tu_tensor *t = problem_tensors(p, i);
        if (!t->alloc) continue;
        if (device == MODA_CPU) {
            dv->t[i] = t->view;
            continue;
        }
#ifdef MODA_WITH_CUDA
        if (cudaMalloc(&dv->dev[i], t->bytes) != cudaSuccess) return -1;
        if (cudaMemcpy(dv->dev[i], t->alloc, t->bytes, cudaMemcpyHostToDevice) != cudaSuccess) return -1;
        dv->t[i] = tu_rebase(t, dv->dev[i], MODA_CUDA);
#else
        return -1;
#endif
    }
    return 0;
}

static void views_fetch(device_views *dv, tu_problem *p) {
#ifdef MODA_WITH_CUDA
    for (int i = 0; i < 13; i++)
        if (dv->dev[i]) cudaMemcpy(problem_tensors(p, i)->alloc, dv->dev[i], problem_tensors(p, i)->bytes, cudaMemcpyDeviceToHost);
#endif
}

static void views_free(device_views *dv) {
#ifdef MODA_WITH_CUDA
    for (int i = 0; i < 13; i++)
        if (dv->dev[i]) cudaFree(dv->dev[i]);
#endif
    memset(dv, 0, sizeof *dv);
}

static const moda_tensor *arg(device_views *dv, tu_problem *p, int i) { return problem_tensors(p, i)->alloc ? &dv->t[i] : NULL; }

static void sync_device(moda_device device) {
#ifdef MODA_WITH_CUDA
    if (device == MODA_CUDA) cudaDeviceSynchronize();
#endif
}

typedef struct {
    double fwd_err, fwd_bound, bwd_err, bwd_bound, fwd_ms, bwd_ms;
    int pass;
    const char *why;
} check_result;

/* Runs one case on one device; compares O, LSE and every gradient with the reference. */
static check_result run_case(const tu_case *c, moda_dtype dtype, moda_device device, tu_rng *rng) {
    check_result res = {0, 0, 0, 0, 0, 0, 1, ""};
    tu_problem p, ref, low, bref, blow;
    if (tu_problem_alloc(&p, c, dtype, dtype)) {
        res.pass = 0;
        res.why = "out of host memory";
        return res;
    }
    tu_problem_randomize(&p, rng);
    tu_poison(&p.dkd);
    tu_poison(&p.dvd);
    moda_options opt = tu_case_options(c);
    device_views dv;
    if (views_make(&dv, &p, device)) {
        res.pass = 0;
        res.why = "device allocation failed";
        views_free(&dv);
        tu_problem_free(&p);
        return res;
    }
    double t0 = now_ms();
    moda_status st = moda_forward(&opt, arg(&dv, &p, 0), arg(&dv, &p, 1), arg(&dv, &p, 2), arg(&dv, &p, 3), arg(&dv, &p, 4),
                                  arg(&dv, &p, 5), arg(&dv, &p, 6), NULL);
    sync_device(device);
    res.fwd_ms = now_ms() - t0;
    if (st != MODA_OK) {
        res.pass = 0;
        res.why = moda_last_error();
        goto out;
    }
    views_fetch(&dv, &p);
    tu_reference_forward(&p, &ref, MODA_F64);
    tu_reference_forward(&p, &low, dtype);
    tu_compare_result ro = tu_compare(&p.o, &ref.o, &low.o, 1e-5), rl = tu_compare(&p.lse, &ref.lse, &low.lse, 1e-5);
    res.fwd_err = ro.max_err > rl.max_err ? ro.max_err : rl.max_err;
    res.fwd_bound = ro.bound < rl.bound ? ro.bound : rl.bound;
    res.pass = ro.pass && rl.pass;
    tu_problem_free(&ref);
    tu_problem_free(&low);
    /* backward from this device's own O and LSE */
    size_t ws_bytes = 0;
    void *ws = NULL;
    moda_backward_workspace_size(&opt, arg(&dv, &p, 0), arg(&dv, &p, 1), arg(&dv, &p, 2), arg(&dv, &p, 3), arg(&dv, &p, 4), &ws_bytes);
#ifdef MODA_WITH_CUDA
    if (device == MODA_CUDA && ws_bytes) cudaMalloc(&ws, ws_bytes);
#endif
    t0 = now_ms();
    st = moda_backward(&opt, arg(&dv, &p, 0), arg(&dv, &p, 1), arg(&dv, &p, 2), arg(&dv, &p, 3), arg(&dv, &p, 4),
                       arg(&dv, &p, 5), arg(&dv, &p, 6), arg(&dv, &p, 7), arg(&dv, &p, 8), arg(&dv, &p, 9),
                       arg(&dv, &p, 10), arg(&dv, &p, 11), arg(&dv, &p, 12), ws, ws_bytes, NULL);
    sync_device(device);
    res.bwd_ms = now_ms() - t0;
#ifdef MODA_WITH_CUDA
    if (ws) cudaFree(ws);
#endif
    if (st != MODA_OK) {
        res.pass = 0;
        res.why = moda_last_error();
        goto out;
    }
    views_fetch(&dv, &p);
    tu_reference_backward(&p, &bref, MODA_F64, 0);
    tu_reference_backward(&p, &blow, dtype, 0);
    tu_tensor *tests[5] = {&p.dq, &p.dk, &p.dv, &p.dkd, &p.dvd};
    tu_tensor *refs[5] = {&bref.dq, &bref.dk, &bref.dv, &bref.dkd, &bref.dvd};
    tu_tensor *lows[5] = {&blow.dq, &blow.dk, &blow.dv, &blow.dkd, &blow.dvd};
    res.bwd_bound = 1e300;
    for (int i = 0; i < 5; i++) {
        if (!tests[i]->alloc) continue;
        tu_compare_result r = tu_compare(tests[i], refs[i], lows[i], 1e-5);
        if (r.max_err > res.bwd_err) res.bwd_err = r.max_err;
        if (r.bound < res.bwd_bound) res.bwd_bound = r.bound;
        res.pass = res.pass && r.pass;
    }
    tu_problem_free(&bref);
    tu_problem_free(&blow);
    if (!res.pass) res.why = "out of tolerance";
out:
    views_free(&dv);
    tu_problem_free(&p);
    return res;
}

int moda_run_checks(int want_cpu, int want_cuda, int quiet) {
    tu_rng rng = {(uint64_t)time(NULL)};
    const tu_case cases[] = {
        /* B, T, Hk, G, d, dv, Lcap, d0, d1, causal, sequence, chunk, C, layout, scale */
        {2, 77, 2, 3, 64, 64, 7, 0, 7, 1, 1, 0, 1, TU_LAYOUT_STANDARD, 0},
        {1, 130, 2, 4, 128, 128, 16, 3, 16, 1, 1, 1, 5, TU_LAYOUT_FOLDED, 0},
        {1, 64, 1, 8, 64, 64, 12, 0, 12, 0, 1, 0, 1, TU_LAYOUT_STRIDED, 0},
        {1, 33, 2, 2, 80, 48, 9, 2, 9, 1, 0, 0, 1, TU_LAYOUT_STANDARD, 0},
    };
    const int ncases = sizeof cases / sizeof cases[0];
    int failures = 0, ran = 0;
    printf("%-6s %-5s %-60s %10s %10s %10s %10s %9s %9s  %s\n", "device", "dtype", "case", "fwd err", "fwd bound",
           "bwd err", "bwd bound", "fwd ms", "bwd ms", "result");
    for (int devi = 0; devi < 2; devi++) {
        moda_device device = devi ? MODA_CUDA : MODA_CPU;
        if ((device == MODA_CPU && !want_cpu) || (device == MODA_CUDA && !want_cuda)) continue;
        if (device == MODA_CUDA && moda_cuda_device_count() == 0) {
            printf("%-6s (no usable CUDA device%s: skipped)\n", "cuda",
#ifdef MODA_WITH_CUDA
                   ""
#else
                   "; built without CUDA"
#endif
            );
            continue;
        }
        const moda_dtype dtypes[3] = {MODA_F32, MODA_BF16, MODA_F16};
        for (int di = 0; di < 3; di++) {
            if (device == MODA_CUDA && dtypes[di] == MODA_F32) continue; /* the GPU path takes f16/bf16 */
            for (int ci = 0; ci < ncases; ci++) {
                check_result r = run_case(&cases[ci], dtypes[di], device, &rng);
                ran++;
                failures += !r.pass;
                if (quiet && r.pass) continue;
                printf("%-6s %-5s %-60.60s %10.3g %10.3g %10.3g %10.3g %9.2f %9.2f  %s%s%s\n", device == MODA_CUDA ? "cuda" : "cpu",
                       moda_dtype_name(dtypes[di]), tu_case_str(&cases[ci]), r.fwd_err, r.fwd_bound, r.bwd_err, r.bwd_bound,
                       r.fwd_ms, r.bwd_ms, r.pass ? "ok" : "FAIL", r.pass ? "" : ": ", r.pass ? "" : r.why);
            }
        }
    }
    printf("check: %d passed, %d failed\n", ran - failures, failures);
    return failures ? 1 : 0;
}

int moda_cmd_check(int argc, char **argv) {
    int cpu = 1, cuda = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--device") && i + 1 < argc) {
            const char *d = argv[++i];
            cpu = !strcmp(d, "cpu") || !strcmp(d, "all");
            cuda = !strcmp(d, "cuda") || !strcmp(d, "all");
            if (!cpu && !cuda) {
                fprintf(stderr, "moda check: --device must be cpu, cuda or all, not '%s'\n", d);
                return 2;
            }
        } else {
            fprintf(stderr, "usage: moda check [--device cpu|cuda|all]\n"
                            "  runs forward and backward on random inputs (f32, bf16, f16; several shapes and layouts)\n"
                            "  on every device present and compares them with the float64 reference.\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    return moda_run_checks(cpu, cuda, 0);
}
