/* bench_cuda.c - `moda bench --device cuda`: times the CUDA forward (and forward+backward when the backward
 * runs) on the benchmark shapes, with CUDA events, warm-up, the median of >= 20 timed runs, and
 * input sets rotated so that no run finds its inputs in L2. Prints a table for people and, with --json FILE,
 * writes the numbers for machines.
 *
 * Floors (spec.md §6, docs/cuda_notes.md): FLOPs = 4*B*Hq*d*(T(T+1)/2 + T*L) forward (x3.5 forward+backward),
 * bytes = every input read once and every output written once; floor = max(FLOPs / 737 TFLOP/s,
 * bytes / 2.9 TB/s), the ceilings measured on the H100 in docs/anchors.md. */
#include "commands.h"
#include "moda.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef MODA_WITH_CUDA
int moda_cmd_bench_cuda(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "moda bench --device cuda: this moda was built without CUDA\n");
    return 1;
}
#else
#include <cuda_runtime.h>

#define PEAK_FLOPS 737e12
#define PEAK_BYTES 2.9e12

typedef struct {
    const char *name;
    int64_t B, T, Hq, Hk, d, L;
} shape;

static const shape shapes[] = {
    {"S1", 1, 16384, 64, 8, 64, 64}, {"S2", 8, 4096, 16, 8, 64, 72},  {"S3", 1, 1024, 64, 8, 64, 64},
    {"S4", 1, 16384, 64, 8, 64, 256}, {"S5", 1, 8192, 32, 8, 128, 64},
    /* not run by default (--shapes): issue 5's long shape, and the same problems without depth slots, to split
     * sequence from depth */
    {"S6", 1, 32768, 64, 8, 64, 64},  {"S6n", 1, 32768, 64, 8, 64, 0},
    {"S1n", 1, 16384, 64, 8, 64, 0},  {"S2n", 8, 4096, 16, 8, 64, 0},  {"S5n", 1, 8192, 32, 8, 128, 0},
};
#define DEFAULT_SHAPES "S1,S2,S3,S4,S5"

/* 1 when name is one of the comma-separated entries of list. */
static int listed(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = list; p && *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && !strncmp(p, name, n)) return 1;
        p = e ? e + 1 : NULL;
    }
    return 0;
}

typedef struct {
    void *q, *k, *v, *kd, *vd, *o, *dout;
    float *lse;
} set;

#define CK(call)                                                                                          \
    do {                                                                                                  \
        cudaError_t e_ = (call);                                                                          \
        if (e_ != cudaSuccess) {                                                                          \
            fprintf(stderr, "moda bench: %s failed: %s\n", #call, cudaGetErrorString(e_));                \
            return -1;                                                                                    \
        }                                                                                                 \
    } while (0)

/* Random N(0,1)-like data in a 64 MB host pattern, replicated on the device by device-to-device copies:
 * timing needs random (never zero) data, not independent data, and gigabytes must be filled in seconds. */
static void *pattern;
static const size_t pattern_bytes = (size_t)64 << 20;
static int fill(void *dst, size_t bytes, moda_dtype dt) {
    if (!pattern) {
        size_t n = pattern_bytes / 2;
        float *f = malloc(n * sizeof(float));
        void *h = malloc(pattern_bytes);
        if (!f || !h) return -1;
        uint64_t s = 0x9E3779B97F4A7C15ull;
        for (size_t i = 0; i < n; i++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            float a = (float)((s & 0xFFFF) + ((s >> 16) & 0xFFFF) + ((s >> 32) & 0xFFFF) + (s >> 48));
            f[i] = (a - 131070.0f) * (1.0f / 37837.0f);
        }
        moda_convert(h, dt, f, MODA_F32, (int64_t)n);
        free(f);
        CK(cudaMalloc(&pattern, pattern_bytes));
        CK(cudaMemcpy(pattern, h, pattern_bytes, cudaMemcpyHostToDevice));
        free(h);
    }
    for (size_t off = 0; off < bytes; off += pattern_bytes) {
        size_t m = bytes - off < pattern_bytes ? bytes - off : pattern_bytes;
        CK(cudaMemcpy((char *)dst + off, pattern, m, cudaMemcpyDeviceToDevice));
    }
    return 0;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

typedef struct {
    const char *name;
    double fwd_ms, fb_ms, flops, bytes, depth_bytes, floor_ms, fb_floor_ms;
    int fb_ok;
    char fb_err[200];
} result;

/* Times one shape; returns 0 or -1 on a CUDA/moda failure. */
static int bench_shape(const shape *s, moda_dtype dt, int reps, int do_backward, int deterministic, result *res) {
    const int64_t B = s->B, T = s->T, Hk = s->Hk, G = s->Hq / s->Hk, d = s->d, L = s->L;
    const size_t es = 2;
    const size_t nq = (size_t)(B * T * s->Hq * d), nk = (size_t)(B * T * Hk * d), nkd = (size_t)(B * T * L * Hk * d);
    const size_t set_bytes = es * (2 * nq + 2 * nk + 2 * nkd);
    int nsets = (int)((200u << 20) / set_bytes) + 2; /* >= 200 MB in rotation, four times L2 */
    if (nsets > 8) nsets = 8;
    memset(res, 0, sizeof *res);
    res->name = s->name;
    const double tri = (double)T * (double)(T + 1) / 2.0;
    res->flops = 4.0 * (double)B * (double)s->Hq * (double)d * (tri + (double)T * (double)L);
    res->depth_bytes = (double)es * 2.0 * (double)nkd;
    res->bytes = (double)es * (2.0 * nq + 2.0 * nk + 2.0 * nkd) + 4.0 * (double)(B * T * s->Hq);
    double tf = res->flops / PEAK_FLOPS, tb = res->bytes / PEAK_BYTES;
    res->floor_ms = 1e3 * (tf > tb ? tf : tb);
    /* backward: reads q,k,v,kd,vd,o,dout,lse, writes dq,dk,dv,dkd,dvd: about 2.2x the forward's bytes */
    double tf2 = 3.5 * tf, tb2 = (res->bytes + (double)es * (3.0 * nq + 2.0 * nk + 2.0 * nkd)) / PEAK_BYTES + tb;
    res->fb_floor_ms = 1e3 * (tf2 > tb2 ? tf2 : tb2);

    set sets[8];
    memset(sets, 0, sizeof sets);
    void *dq = NULL, *dk = NULL, *dv = NULL, *dkd = NULL, *dvd = NULL, *ws = NULL;
    int rc = -1;
    for (int i = 0; i < nsets; i++) {
        CK(cudaMalloc(&sets[i].q, es * nq));
        CK(cudaMalloc(&sets[i].o, es * nq));
        CK(cudaMalloc(&sets[i].dout, es * nq));
        CK(cudaMalloc(&sets[i].k, es * nk));
        CK(cudaMalloc(&sets[i].v, es * nk));
        CK(cudaMalloc(&sets[i].kd, es * nkd));
        CK(cudaMalloc(&sets[i].vd, es * nkd));
        CK(cudaMalloc((void **)&sets[i].lse, 4 * (size_t)(B * T * s->Hq)));
        if (fill(sets[i].q, es * nq, dt) || fill(sets[i].k, es * nk, dt) || fill(sets[i].v, es * nk, dt) ||
            fill(sets[i].kd, es * nkd, dt) || fill(sets[i].vd, es * nkd, dt) || fill(sets[i].dout, es * nq, dt))
            goto out;
    }
    const int64_t ksh[4] = {B, T, Hk, d}, kdsh[5] = {B, T, L, Hk, d}, lsh[4] = {B, T, Hk, G};
    moda_options opt = moda_default_options();
    opt.deterministic = deterministic;
    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
#define VIEWS(S)                                                                                        \
    moda_tensor tq = moda_tensor_q_standard((S).q, dt, MODA_CUDA, B, T, Hk, G, d);                      \
    moda_tensor to = moda_tensor_q_standard((S).o, dt, MODA_CUDA, B, T, Hk, G, d);                      \
    moda_tensor tdo = moda_tensor_q_standard((S).dout, dt, MODA_CUDA, B, T, Hk, G, d);                  \
    moda_tensor tk = moda_tensor_contiguous((S).k, dt, MODA_CUDA, 4, ksh);                              \
    moda_tensor tv = moda_tensor_contiguous((S).v, dt, MODA_CUDA, 4, ksh);                              \
    moda_tensor tkd = moda_tensor_contiguous((S).kd, dt, MODA_CUDA, 5, kdsh);                           \
    moda_tensor tvd = moda_tensor_contiguous((S).vd, dt, MODA_CUDA, 5, kdsh);                           \
    moda_tensor tl = moda_tensor_contiguous((S).lse, MODA_F32, MODA_CUDA, 4, lsh);                      \
    (void)tdo; (void)to; (void)tl;

    cudaEvent_t ev[2];
    CK(cudaEventCreate(&ev[0]));
    CK(cudaEventCreate(&ev[1]));
    float *times = malloc(sizeof(float) * (size_t)reps);
    /* forward */
    for (int it = -3; it < reps; it++) {
        VIEWS(sets[(it + 3) % nsets]);
        CK(cudaEventRecord(ev[0], stream));
        moda_status st = moda_forward(&opt, &tq, &tk, &tv, L ? &tkd : NULL, L ? &tvd : NULL, &to, &tl, stream);
        CK(cudaEventRecord(ev[1], stream));
        if (st != MODA_OK) {
            fprintf(stderr, "moda bench %s: moda_forward: %s\n", s->name, moda_last_error());
            goto out_stream;
        }
        CK(cudaEventSynchronize(ev[1]));
        if (it >= 0) CK(cudaEventElapsedTime(&times[it], ev[0], ev[1]));
    }
    qsort(times, (size_t)reps, sizeof(float), cmp_float);
    res->fwd_ms = times[reps / 2];

    /* forward + backward, workspace allocated once outside the timed region */
    res->fb_ok = 0;
    if (do_backward) {
        VIEWS(sets[0]);
        size_t wsb = 0;
        moda_status st = moda_backward_workspace_size(&opt, &tq, &tk, &tv, L ? &tkd : NULL, L ? &tvd : NULL, &wsb);
        if (st != MODA_OK) {
            snprintf(res->fb_err, sizeof res->fb_err, "%s", moda_last_error());
        } else {
            CK(cudaMalloc(&dq, es * nq));
            CK(cudaMalloc(&dk, es * nk));
            CK(cudaMalloc(&dv, es * nk));
            CK(cudaMalloc(&dkd, es * nkd));
            CK(cudaMalloc(&dvd, es * nkd));
            if (wsb) CK(cudaMalloc(&ws, wsb));
            moda_tensor tdq = moda_tensor_q_standard(dq, dt, MODA_CUDA, B, T, Hk, G, d);
            moda_tensor tdk = moda_tensor_contiguous(dk, dt, MODA_CUDA, 4, ksh);
            moda_tensor tdv = moda_tensor_contiguous(dv, dt, MODA_CUDA, 4, ksh);
            moda_tensor tdkd = moda_tensor_contiguous(dkd, dt, MODA_CUDA, 5, kdsh);
            moda_tensor tdvd = moda_tensor_contiguous(dvd, dt, MODA_CUDA, 5, kdsh);
            res->fb_ok = 1;
            for (int it = -2; it < reps && res->fb_ok; it++) {
                VIEWS(sets[(it + 2) % nsets]);
                CK(cudaEventRecord(ev[0], stream));
                st = moda_forward(&opt, &tq, &tk, &tv, L ? &tkd : NULL, L ? &tvd : NULL, &to, &tl, stream);
                if (st == MODA_OK)
                    st = moda_backward(&opt, &tq, &tk, &tv, L ? &tkd : NULL, L ? &tvd : NULL, &to, &tl, &tdo, &tdq, &tdk, &tdv, L ? &tdkd : NULL, L ? &tdvd : NULL,
                                       ws, wsb, stream);
                CK(cudaEventRecord(ev[1], stream));
                if (st != MODA_OK) {
                    res->fb_ok = 0;
                    snprintf(res->fb_err, sizeof res->fb_err, "%s", moda_last_error());
                    break;
                }
                CK(cudaEventSynchronize(ev[1]));
                if (it >= 0) CK(cudaEventElapsedTime(&times[it], ev[0], ev[1]));
            }
            if (res->fb_ok) {
                qsort(times, (size_t)reps, sizeof(float), cmp_float);
                res->fb_ms = times[reps / 2];
            }
        }
    }
    rc = 0;
out_stream:
    free(times);
    cudaEventDestroy(ev[0]);
    cudaEventDestroy(ev[1]);
    cudaStreamDestroy(stream);
out:
    for (int i = 0; i < nsets; i++) {
        cudaFree(sets[i].q);
        cudaFree(sets[i].o);
        cudaFree(sets[i].dout);
        cudaFree(sets[i].k);
        cudaFree(sets[i].v);
        cudaFree(sets[i].kd);
        cudaFree(sets[i].vd);
        cudaFree(sets[i].lse);
    }
    cudaFree(dq);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dkd);
    cudaFree(dvd);
    cudaFree(ws);
    return rc;
}

static void usage(FILE *f) {
    fprintf(f, "usage: moda bench --device cuda [--shapes S1,S2,...] [--dtype bf16|f16] [--reps N (>= 20)]\n"
               "                  [--no-backward] [--nondeterministic] [--json FILE] [--commit TEXT]\n"
               "Times the CUDA forward (and forward+backward) on the issue's shapes:\n");
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        fprintf(f, "  %s: B=%lld T=%lld Hq=%lld Hk=%lld d=%lld L=%lld\n", shapes[i].name, (long long)shapes[i].B,
                (long long)shapes[i].T, (long long)shapes[i].Hq, (long long)shapes[i].Hk, (long long)shapes[i].d,
                (long long)shapes[i].L);
}

int moda_cmd_bench_cuda(int argc, char **argv) {
    const char *only = DEFAULT_SHAPES, *json = NULL, *commit = getenv("MODA_GIT_COMMIT");
    moda_dtype dt = MODA_BF16;
    int reps = 30, do_backward = 1, deterministic = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--device") && i + 1 < argc) {
            i++;
        } else if (!strcmp(argv[i], "--shapes") && i + 1 < argc) {
            only = argv[++i];
        } else if (!strcmp(argv[i], "--json") && i + 1 < argc) {
            json = argv[++i];
        } else if (!strcmp(argv[i], "--commit") && i + 1 < argc) {
            commit = argv[++i];
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
            if (reps < 20) reps = 20;
        } else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
            i++;
            if (!strcmp(argv[i], "f16")) dt = MODA_F16;
            else if (!strcmp(argv[i], "bf16")) dt = MODA_BF16;
            else {
                fprintf(stderr, "moda bench: --dtype must be bf16 or f16 on CUDA\n");
                return 2;
            }
        } else if (!strcmp(argv[i], "--no-backward")) {
            do_backward = 0;
        } else if (!strcmp(argv[i], "--nondeterministic")) {
            deterministic = 0;
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            i++; /* a CPU option of `moda bench --device all` */
        } else {
            fprintf(stderr, "moda bench --device cuda: unknown option '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (moda_cuda_device_count() <= 0) {
        fprintf(stderr, "moda bench --device cuda: no CUDA device\n");
        return 1;
    }
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return 1;
    char date[32];
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    printf("moda bench --device cuda: %s, %d SMs, %.0f MB L2; %s; %s backward; median of %d after warm-up; %s\n",
           prop.name, prop.multiProcessorCount, prop.l2CacheSize / 1e6, moda_dtype_name(dt),
           deterministic ? "deterministic" : "non-deterministic", reps, date);
    result res[sizeof shapes / sizeof shapes[0]];
    int nres = 0, rc = 0;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        if (!listed(only, shapes[i].name)) continue;
        if (bench_shape(&shapes[i], dt, reps, do_backward, deterministic, &res[nres]) != 0) {
            rc = 1;
            continue;
        }
        nres++;
    }
    printf("\n| shape | fwd ms | TFLOP/s | depth GB/s | floor ms | fwd/floor | fwd+bwd ms | fb floor ms | fb/floor |\n"
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for (int i = 0; i < nres; i++) {
        const result *r = &res[i];
        printf("| %s | %.3f | %.0f | %.0f | %.3f | %.2f |", r->name, r->fwd_ms, r->flops / r->fwd_ms / 1e9,
               r->depth_bytes / r->fwd_ms / 1e6, r->floor_ms, r->fwd_ms / r->floor_ms);
        if (r->fb_ok)
            printf(" %.3f | %.3f | %.2f |\n", r->fb_ms, r->fb_floor_ms, r->fb_ms / r->fb_floor_ms);
        else
            printf(" n/a | %.3f | n/a |\n", r->fb_floor_ms);
    }
    for (int i = 0; i < nres; i++)
        if (do_backward && !res[i].fb_ok) printf("%s fwd+bwd n/a: %s\n", res[i].name, res[i].fb_err);
    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) {
            fprintf(stderr, "moda bench: cannot write %s\n", json);
            return 1;
        }
        fprintf(f, "{\n  \"device\": \"%s\",\n  \"date\": \"%s\",\n  \"commit\": \"%s\",\n  \"dtype\": \"%s\",\n"
                   "  \"reps\": %d,\n  \"peak_tflops\": %.0f,\n  \"peak_tbps\": %.1f,\n  \"results\": [\n",
                prop.name, date, commit ? commit : "unknown", moda_dtype_name(dt), reps, PEAK_FLOPS / 1e12,
                PEAK_BYTES / 1e12);
        for (int i = 0; i < nres; i++) {
            const result *r = &res[i];
            fprintf(f,
                    "    {\"shape\": \"%s\", \"fwd_ms\": %.4f, \"fwd_tflops\": %.1f, \"depth_gbps\": %.1f, "
                    "\"flops\": %.6g, \"bytes\": %.6g, \"floor_ms\": %.4f, \"fwd_over_floor\": %.3f, ",
                    r->name, r->fwd_ms, r->flops / r->fwd_ms / 1e9, r->depth_bytes / r->fwd_ms / 1e6, r->flops,
                    r->bytes, r->floor_ms, r->fwd_ms / r->floor_ms);
            if (r->fb_ok)
                fprintf(f, "\"fwd_bwd_ms\": %.4f, \"fwd_bwd_floor_ms\": %.4f}%s\n", r->fb_ms, r->fb_floor_ms,
                        i + 1 < nres ? "," : "");
            else
                fprintf(f, "\"fwd_bwd_ms\": null, \"fwd_bwd_floor_ms\": %.4f}%s\n", r->fb_floor_ms,
                        i + 1 < nres ? "," : "");
        }
        fprintf(f, "  ]\n}\n");
        fclose(f);
    }
    if (pattern) cudaFree(pattern);
    pattern = NULL;
    return rc;
}
#endif
