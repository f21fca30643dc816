/* test_train_toy.c - end to end: a few plain-SGD steps of a toy MoDA attention layer whose learnable
 * parameters are the q, k, v, kd, vd tensors themselves, fitted to a random target O under
 * loss = mean over rows of ||O - target||^2 / 2. The same optimisation runs once with the CUDA forward and
 * backward in bf16 (fp32 master parameters rounded to bf16 for each step, depth gradients in an fp32 buffer)
 * and once with the float64 reference on the CPU (same rounded parameters); the losses must agree step by
 * step within bf16 tolerance and must fall. */
#include "testutil.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_util.h"

enum { B = 1, T = 96, HK = 2, G = 2, D = 64, L = 4, STEPS = 6 };
enum { PQ, PK, PV, PKD, PVD, NP };
static const int64_t numel[NP] = {B * T * HK * G * D, B * T * HK * D, B * T * HK * D, B * T * L * HK * D,
                                  B * T * L * HK * D};
#define NO (B * T * HK * G * D)
#define NROWS (B * T * HK * G)
static const double LR = 40.0;

/* Views of the five parameters, O, LSE, dO and the five gradients over given buffers. */
typedef struct views {
    moda_tensor p[NP], g[NP], o, lse, dout;
} views;

static views make_views(void *const *pp, void *const *gg, void *o, void *lse, void *dout, moda_dtype dt,
                        moda_dtype gdt, moda_dtype lsedt, moda_device dev) {
    views v;
    const int64_t ks[4] = {B, T, HK, D}, kds[5] = {B, T, L, HK, D}, ls[4] = {B, T, HK, G};
    for (int k = 0; k < 2; k++) {
        void *const *src = k ? gg : pp;
        moda_tensor *dst = k ? v.g : v.p;
        dst[PQ] = moda_tensor_q_standard(src[PQ], dt, dev, B, T, HK, G, D);
        dst[PK] = moda_tensor_contiguous(src[PK], dt, dev, 4, ks);
        dst[PV] = moda_tensor_contiguous(src[PV], dt, dev, 4, ks);
        dst[PKD] = moda_tensor_contiguous(src[PKD], k ? gdt : dt, dev, 5, kds);
        dst[PVD] = moda_tensor_contiguous(src[PVD], k ? gdt : dt, dev, 5, kds);
    }
    v.o = moda_tensor_q_standard(o, dt, dev, B, T, HK, G, D);
    v.dout = moda_tensor_q_standard(dout, dt, dev, B, T, HK, G, D);
    v.lse = moda_tensor_contiguous(lse, lsedt, dev, 4, ls);
    return v;
}

static moda_status step_call(const views *v, const moda_options *o, void *ws, size_t wsb, int backward) {
    if (!backward)
        return moda_forward(o, &v->p[PQ], &v->p[PK], &v->p[PV], &v->p[PKD], &v->p[PVD], &v->o, &v->lse, NULL);
    return moda_backward(o, &v->p[PQ], &v->p[PK], &v->p[PV], &v->p[PKD], &v->p[PVD], &v->o, &v->lse, &v->dout,
                         &v->g[PQ], &v->g[PK], &v->g[PV], &v->g[PKD], &v->g[PVD], ws, wsb, NULL);
}

/* loss and dL/dO from O (as double) */
static double loss_and_grad(const double *o, const double *target, double *dout) {
    double s = 0;
    for (int64_t i = 0; i < NO; i++) {
        double e = o[i] - target[i];
        s += 0.5 * e * e;
        dout[i] = e / NROWS;
    }
    return s / NROWS;
}

/* The CPU path: float64 reference on the bf16-rounded parameters. */
static int run_cpu(float *const *master, const double *target, double *losses) {
    double *p64[NP], *g64[NP], *o = malloc(sizeof(double) * NO), *lse = malloc(sizeof(double) * NROWS),
                               *dout = malloc(sizeof(double) * NO);
    uint16_t *tmp = malloc(sizeof(uint16_t) * (size_t)numel[PKD]);
    float *tf = malloc(sizeof(float) * (size_t)numel[PKD]);
    for (int k = 0; k < NP; k++) {
        p64[k] = malloc(sizeof(double) * (size_t)numel[k]);
        g64[k] = malloc(sizeof(double) * (size_t)numel[k]);
    }
    views v = make_views((void *const *)p64, (void *const *)g64, o, lse, dout, MODA_F64, MODA_F64, MODA_F64, MODA_CPU);
    moda_options opt = moda_default_options();
    int ok = 1;
    for (int s = 0; s < STEPS && ok; s++) {
        for (int k = 0; k < NP; k++) { /* the same bf16 rounding the CUDA path sees */
            moda_convert(tmp, MODA_BF16, master[k], MODA_F32, numel[k]);
            moda_convert(p64[k], MODA_F64, tmp, MODA_BF16, numel[k]);
        }
        ok &= step_call(&v, &opt, NULL, 0, 0) == MODA_OK;
        losses[s] = loss_and_grad(o, target, dout);
        ok &= step_call(&v, &opt, NULL, 0, 1) == MODA_OK;
        for (int k = 0; k < NP; k++)
            for (int64_t i = 0; i < numel[k]; i++) master[k][i] -= (float)(LR * g64[k][i]);
    }
    if (!ok) fprintf(stderr, "CPU step failed: %s\n", moda_last_error());
    for (int k = 0; k < NP; k++) {
        free(p64[k]);
        free(g64[k]);
    }
    free(o), free(lse), free(dout), free(tmp), free(tf);
    return ok;
}

/* The CUDA path: bf16 storage, fp32 depth-gradient buffers. */
static int run_cuda(float *const *master, const double *target, double *losses) {
    void *dp[NP], *dg[NP], *d_o, *d_lse, *d_dout, *ws = NULL;
    size_t wsb = 0;
    uint16_t *h16 = malloc(sizeof(uint16_t) * (size_t)numel[PKD]);
    float *h32 = malloc(sizeof(float) * (size_t)numel[PKD]);
    double *o = malloc(sizeof(double) * NO), *dout = malloc(sizeof(double) * NO);
    for (int k = 0; k < NP; k++) {
        CUDA_OK(cudaMalloc(&dp[k], 2 * (size_t)numel[k]));
        CUDA_OK(cudaMalloc(&dg[k], 4 * (size_t)numel[k]));
    }
    CUDA_OK(cudaMalloc(&d_o, 2 * NO));
    CUDA_OK(cudaMalloc(&d_dout, 2 * NO));
    CUDA_OK(cudaMalloc(&d_lse, 4 * NROWS));
    views v = make_views(dp, dg, d_o, d_lse, d_dout, MODA_BF16, MODA_F32, MODA_F32, MODA_CUDA);
    moda_options opt = moda_default_options();
    int ok = moda_backward_workspace_size(&opt, &v.p[PQ], &v.p[PK], &v.p[PV], &v.p[PKD], &v.p[PVD], &wsb) == MODA_OK;
    CUDA_OK(cudaMalloc(&ws, wsb ? wsb : 1));
    for (int s = 0; s < STEPS && ok; s++) {
        for (int k = 0; k < NP; k++) {
            moda_convert(h16, MODA_BF16, master[k], MODA_F32, numel[k]);
            CUDA_OK(cudaMemcpy(dp[k], h16, 2 * (size_t)numel[k], cudaMemcpyHostToDevice));
        }
        if (step_call(&v, &opt, ws, wsb, 0) != MODA_OK) {
            fprintf(stderr, "CUDA forward failed: %s\n", moda_last_error());
            ok = 0;
            break;
        }
        CUDA_OK(cudaMemcpy(h16, d_o, 2 * NO, cudaMemcpyDeviceToHost));
        moda_convert(o, MODA_F64, h16, MODA_BF16, NO);
        losses[s] = loss_and_grad(o, target, dout);
        moda_convert(h16, MODA_BF16, dout, MODA_F64, NO);
        CUDA_OK(cudaMemcpy(d_dout, h16, 2 * NO, cudaMemcpyHostToDevice));
        if (step_call(&v, &opt, ws, wsb, 1) != MODA_OK) {
            fprintf(stderr, "CUDA backward failed: %s\n", moda_last_error());
            ok = 0;
            break;
        }
        for (int k = 0; k < NP; k++) {
            if (k >= PKD) {
                CUDA_OK(cudaMemcpy(h32, dg[k], 4 * (size_t)numel[k], cudaMemcpyDeviceToHost));
            } else {
                CUDA_OK(cudaMemcpy(h16, dg[k], 2 * (size_t)numel[k], cudaMemcpyDeviceToHost));
                moda_convert(h32, MODA_F32, h16, MODA_BF16, numel[k]);
            }
            for (int64_t i = 0; i < numel[k]; i++) master[k][i] -= (float)(LR * h32[i]);
        }
    }
    for (int k = 0; k < NP; k++) {
        cudaFree(dp[k]);
        cudaFree(dg[k]);
    }
    cudaFree(d_o), cudaFree(d_dout), cudaFree(d_lse), cudaFree(ws);
    free(h16), free(h32), free(o), free(dout);
    return ok;
}

int main(void) {
    tu_rng r = tu_rng_from_env("gpu_test_train_toy");
    float *init[NP], *m_cpu[NP], *m_gpu[NP];
    for (int k = 0; k < NP; k++) {
        init[k] = malloc(sizeof(float) * (size_t)numel[k]);
        m_cpu[k] = malloc(sizeof(float) * (size_t)numel[k]);
        m_gpu[k] = malloc(sizeof(float) * (size_t)numel[k]);
        for (int64_t i = 0; i < numel[k]; i++) init[k][i] = (float)tu_normal(&r);
        memcpy(m_cpu[k], init[k], sizeof(float) * (size_t)numel[k]);
        memcpy(m_gpu[k], init[k], sizeof(float) * (size_t)numel[k]);
    }
    double *target = malloc(sizeof(double) * NO);
    for (int64_t i = 0; i < NO; i++) target[i] = 0.5 * tu_normal(&r);

    double lc[STEPS], lg[STEPS];
    TU_CHECK(run_cpu(m_cpu, target, lc), "the CPU optimisation ran");
    if (moda_cuda_device_count() <= 0) {
        for (int s = 0; s < STEPS; s++) printf("step %d: cpu loss %.6f\n", s, lc[s]);
        printf("gpu_test_train_toy: no CUDA device\n");
        return 77;
    }
    TU_CHECK(run_cuda(m_gpu, target, lg), "the CUDA optimisation ran");
    for (int s = 0; s < STEPS; s++) {
        double rel = fabs(lg[s] - lc[s]) / fabs(lc[s]);
        printf("step %d: cpu loss %.6f  cuda loss %.6f  rel diff %.2e\n", s, lc[s], lg[s], rel);
        /* bf16 outputs and gradients: a few parts in a thousand per step, compounding mildly */
        TU_CHECK(rel < 1e-2, "step %d: CUDA loss %.6f vs CPU %.6f", s, lg[s], lc[s]);
    }
    TU_CHECK(lc[STEPS - 1] < 0.9 * lc[0], "the CPU loss falls (%.6f -> %.6f)", lc[0], lc[STEPS - 1]);
    TU_CHECK(lg[STEPS - 1] < 0.9 * lg[0], "the CUDA loss falls (%.6f -> %.6f)", lg[0], lg[STEPS - 1]);
    for (int k = 0; k < NP; k++) free(init[k]), free(m_cpu[k]), free(m_gpu[k]);
    free(target);
    return tu_finish("gpu_test_train_toy");
}
