/*
 * test_model_gpu - the GPU trainer (src/model/cuda) against the CPU trainer, on a small model of the real
 * shapes' kind (head dim 64, the operator's tensor-core path):
 *  1. gradients of one batch from the same weights, per parameter tensor: relative L2 error of the GPU's fp32
 *     gradients (bf16 GEMM inputs, fp32 accumulation) against the CPU's float32 ones, for four variants
 *     (pre/post-norm, QK-norm on/off, depth none / attn / attn+ffn / extra-attn with a window, tied and untied),
 *     with the batch split into 2 micro-batches; the same call twice is bitwise equal (deterministic).
 *  2. 20 AdamW steps of two variants from the same initial weights and data: losses step by step.
 *  3. checkpoints: a GPU run's file resumes in the CPU trainer and a CPU run's in the GPU trainer, with
 *     bitwise-equal weights and matching losses after the switch.
 *  4. errors come back as statuses (bad micro-batch, out-of-vocabulary token).
 *  5. the attention backward's non-deterministic mode (--deterministic-attention off): one step's gradients
 *     against the CPU's with the same bound, for the four variants above (at these small shapes the operator
 *     runs its mma.sync fused pass with row splits) and for a shape with >= 512 key-block CTAs, where an sm_90
 *     device must run the wgmma backward (checked through the operator's test hook).
 *
 * Tolerances, and why: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %). Every GEMM input is
 * rounded once per layer, so the gradients of one step carry a relative error of a few 2^-9 summed over about a
 * dozen roundings per block: the bound is 5e-2 relative L2 per tensor (measured values are in the notes). The
 * loss of the first step (same weights) agrees to 1e-2 nats. Over 20 AdamW steps the trajectories drift apart
 * because Adam normalises each coordinate (a gradient near 0 flips its update on a rounding): the first device
 * run measured a largest step difference of 0.037 nats (mean 0.011) for the pre-norm variant, so the bounds are
 * 8e-2 nats per step and 3e-2 on average, while the loss itself falls by more than 1 nat. The per-tensor
 * gradient check is the sharp one: a wrong gradient or a missing term moves some tensor's error to O(1).
 */
#include "gpu_util.h"
#include "model.h"
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define GRAD_TOL 5e-2
#define LOSS0_TOL 1e-2
#define LOSS_TOL 8e-2
#define LOSS_MEAN_TOL 3e-2

enum { BATCH = 4, SEQ = 128, MICRO = 2, STEPS = 20 };

/* the operator's private hook (src/cuda/backward.cu): the kernel family of this thread's last backward */
MODA_API const char *moda_testing_cuda_last_backward(void);

static moda_model_config small(int variant) {
    moda_model_config c = moda_model_config_default();
    c.V = 256;
    c.D = 256;
    c.N = 4;
    c.Hq = 4;
    c.Hk = 2;
    c.d = 64;
    c.F = 0;
    switch (variant) {
    case 0: break; /* pre-norm, QK-norm, attn+ffn, untied: the default variant */
    case 1:
        c.post_norm = 1;
        c.qk_norm = 0;
        c.depth = MODA_DEPTH_SRC_ATTN;
        c.tied = 1;
        break;
    case 2:
        c.qk_norm = 0;
        c.depth = MODA_DEPTH_SRC_EXTRA;
        c.window = 3;
        break;
    default:
        c.post_norm = 1;
        c.depth = MODA_DEPTH_SRC_NONE;
        break;
    }
    return c;
}

static const char *variant_name(int v) {
    static const char *n[] = {"pre qk attn+ffn", "post tied attn", "pre extra-attn S=3", "post qk none"};
    return n[v];
}

static double rel_l2(const float *a, const float *b, int64_t n, double *ref_norm) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    if (ref_norm) *ref_norm = sqrt(den);
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void check_gradients(moda_data *data, int nvariants) {
    int32_t *in = malloc(sizeof(int32_t) * BATCH * SEQ), *tg = malloc(sizeof(int32_t) * BATCH * SEQ);
    for (int v = 0; v < nvariants; v++) {
        moda_model_config c = small(v);
        moda_model *cpu = NULL;
        moda_gpu_model *gpu = NULL, *gpu1 = NULL;
        TU_CHECK_STATUS(moda_model_create(&cpu, &c, MODA_F32, BATCH, SEQ), MODA_OK);
        if (!cpu) continue;
        moda_model_init(cpu, 11 + (uint64_t)v);
        TU_CHECK_STATUS(moda_gpu_model_create(&gpu, moda_model_get_config(cpu), MICRO, SEQ, BATCH / MICRO), MODA_OK);
        TU_CHECK_STATUS(moda_gpu_model_create(&gpu1, moda_model_get_config(cpu), BATCH, SEQ, 1), MODA_OK);
        if (!gpu || !gpu1) {
            fprintf(stderr, "  %s\n", moda_model_error());
            moda_model_free(cpu);
            moda_gpu_model_free(gpu);
            continue;
        }
        moda_data_start(data, BATCH, SEQ, 5 + (uint64_t)v);
        moda_data_next(data, in, tg);
        const int64_t n = moda_model_num_params(cpu);
        float *gg = malloc(sizeof(float) * (size_t)n), *gg2 = malloc(sizeof(float) * (size_t)n),
              *gg1 = malloc(sizeof(float) * (size_t)n);
        double lc = 0, lg = 0, lg2 = 0, lg1 = 0;
        TU_CHECK_STATUS(moda_model_step(cpu, in, tg, 1, &lc), MODA_OK);
        const float *gc = moda_model_grads(cpu);
        TU_CHECK_STATUS(moda_gpu_model_set_state(gpu, moda_model_params(cpu), NULL, NULL), MODA_OK);
        TU_CHECK_STATUS(moda_gpu_model_set_state(gpu1, moda_model_params(cpu), NULL, NULL), MODA_OK);
        TU_CHECK_STATUS(moda_gpu_model_loss(gpu, in, tg, BATCH, 1, &lg), MODA_OK);
        TU_CHECK_STATUS(moda_gpu_model_get_grads(gpu, gg), MODA_OK);
        TU_CHECK_STATUS(moda_gpu_model_loss(gpu, in, tg, BATCH, 1, &lg2), MODA_OK);
        TU_CHECK_STATUS(moda_gpu_model_get_grads(gpu, gg2), MODA_OK);
        TU_CHECK_STATUS(moda_gpu_model_loss(gpu1, in, tg, BATCH, 1, &lg1), MODA_OK);
        TU_CHECK_STATUS(moda_gpu_model_get_grads(gpu1, gg1), MODA_OK);
        TU_CHECK(fabs(lg - lc) <= LOSS0_TOL, "%s: loss GPU %.6f CPU %.6f", variant_name(v), lg, lc);
        TU_CHECK(lg == lg2 && memcmp(gg, gg2, sizeof(float) * (size_t)n) == 0,
                 "%s: two identical GPU gradient calls differ (not deterministic)", variant_name(v));
        double worst = 0, worst1 = 0;
        const char *wname = "";
        int64_t wblock = 0;
        for (int t = 0; t < moda_model_num_tensors(cpu); t++) {
            const moda_param_info *p = moda_model_tensor(cpu, t);
            const int64_t len = p->rows * p->cols;
            double ref = 0, e = rel_l2(gg + p->offset, gc + p->offset, len, &ref);
            double e1 = rel_l2(gg1 + p->offset, gg + p->offset, len, NULL);
            TU_CHECK(e <= GRAD_TOL && isfinite(e), "%s: gradient of %s (block %lld): relative L2 error %.3e (|g| %.3e)",
                     variant_name(v), moda_param_kind_name(p->kind), (long long)p->block, e, ref);
            if (e > worst) {
                worst = e;
                wname = moda_param_kind_name(p->kind);
                wblock = p->block;
            }
            if (e1 > worst1) worst1 = e1;
        }
        TU_CHECK(worst1 <= GRAD_TOL, "%s: 1 vs 2 micro-batches: gradients differ by %.3e", variant_name(v), worst1);
        printf("  gradients %-20s loss CPU %.6f GPU %.6f (diff %+.2e); worst tensor %s[%lld] rel L2 %.2e; "
               "1 vs 2 micro-batches %.2e\n",
               variant_name(v), lc, lg, lg - lc, wname, (long long)wblock, worst, worst1);
        /* the same step with the non-deterministic attention backward (gg2 is free again) */
        double lnd = 0, worst_nd = 0;
        TU_CHECK_STATUS(moda_gpu_model_set_deterministic_attention(gpu, 0), MODA_OK);
        TU_CHECK_STATUS(moda_gpu_model_loss(gpu, in, tg, BATCH, 1, &lnd), MODA_OK);
        TU_CHECK_STATUS(moda_gpu_model_get_grads(gpu, gg2), MODA_OK);
        const char *path = moda_testing_cuda_last_backward();
        TU_CHECK(fabs(lnd - lc) <= LOSS0_TOL, "%s, non-deterministic attention: loss GPU %.6f CPU %.6f", variant_name(v),
                 lnd, lc);
        for (int t = 0; t < moda_model_num_tensors(cpu); t++) {
            const moda_param_info *p = moda_model_tensor(cpu, t);
            double ref = 0, e = rel_l2(gg2 + p->offset, gc + p->offset, p->rows * p->cols, &ref);
            TU_CHECK(e <= GRAD_TOL && isfinite(e),
                     "%s, non-deterministic attention: gradient of %s (block %lld): relative L2 error %.3e (|g| %.3e)",
                     variant_name(v), moda_param_kind_name(p->kind), (long long)p->block, e, ref);
            if (e > worst_nd) worst_nd = e;
        }
        printf("  gradients %-20s non-deterministic attention (%s backward): loss diff %+.2e, worst rel L2 %.2e\n",
               variant_name(v), path, lnd - lc, worst_nd);
        free(gg);
        free(gg2);
        free(gg1);
        moda_gpu_model_free(gpu);
        moda_gpu_model_free(gpu1);
        moda_model_free(cpu);
    }
    free(in);
    free(tg);
}

/* The non-deterministic mode at a shape where the operator's key-block CTAs (128 keys of one (b, kv-head))
 * reach 512, so that it runs without row splits: on an sm_90 device that is the wgmma backward. 64 rows of
 * 128 tokens, 8 query and 8 key/value heads of 64, width 128: the CPU side stays about a second. */
static void check_nondeterministic_hopper(moda_data *data) {
    enum { HB = 64 };
    moda_model_config c = small(0);
    c.D = 128;
    c.Hq = 8;
    c.Hk = 8;
    int32_t *in = malloc(sizeof(int32_t) * HB * SEQ), *tg = malloc(sizeof(int32_t) * HB * SEQ);
    moda_model *cpu = NULL;
    moda_gpu_model *gpu = NULL;
    TU_CHECK_STATUS(moda_model_create(&cpu, &c, MODA_F32, HB, SEQ), MODA_OK);
    if (cpu) TU_CHECK_STATUS(moda_gpu_model_create(&gpu, moda_model_get_config(cpu), HB, SEQ, 1), MODA_OK);
    if (!cpu || !gpu || !in || !tg) {
        fprintf(stderr, "  %s\n", moda_model_error());
        moda_model_free(cpu);
        free(in);
        free(tg);
        return;
    }
    moda_model_init(cpu, 23);
    moda_data_start(data, HB, SEQ, 9);
    moda_data_next(data, in, tg);
    const int64_t n = moda_model_num_params(cpu);
    float *gg = malloc(sizeof(float) * (size_t)n);
    double lc = 0, lg = 0, worst = 0;
    TU_CHECK_STATUS(moda_model_step(cpu, in, tg, 1, &lc), MODA_OK);
    const float *gc = moda_model_grads(cpu);
    TU_CHECK_STATUS(moda_gpu_model_set_state(gpu, moda_model_params(cpu), NULL, NULL), MODA_OK);
    TU_CHECK_STATUS(moda_gpu_model_set_deterministic_attention(gpu, 0), MODA_OK);
    TU_CHECK_STATUS(moda_gpu_model_loss(gpu, in, tg, HB, 1, &lg), MODA_OK);
    const char *path = moda_testing_cuda_last_backward();
    TU_CHECK_STATUS(moda_gpu_model_get_grads(gpu, gg), MODA_OK);
    TU_CHECK(fabs(lg - lc) <= LOSS0_TOL, "non-deterministic attention, 512 CTAs: loss GPU %.6f CPU %.6f", lg, lc);
    for (int t = 0; t < moda_model_num_tensors(cpu); t++) {
        const moda_param_info *p = moda_model_tensor(cpu, t);
        double ref = 0, e = rel_l2(gg + p->offset, gc + p->offset, p->rows * p->cols, &ref);
        TU_CHECK(e <= GRAD_TOL && isfinite(e),
                 "non-deterministic attention, 512 CTAs: gradient of %s (block %lld): relative L2 error %.3e (|g| %.3e)",
                 moda_param_kind_name(p->kind), (long long)p->block, e, ref);
        if (e > worst) worst = e;
    }
    int dev = 0, major = 0;
    CUDA_OK(cudaGetDevice(&dev));
    CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (major == 9)
        TU_CHECK(!strcmp(path, "hopper"), "non-deterministic attention on sm_90 ran the %s backward, not the wgmma one",
                 path);
    printf("  gradients 8/8 heads B=%d     non-deterministic attention (%s backward): loss CPU %.6f GPU %.6f (diff "
           "%+.2e), worst rel L2 %.2e\n",
           HB, path, lc, lg, lg - lc, worst);
    free(gg);
    free(in);
    free(tg);
    moda_gpu_model_free(gpu);
    moda_model_free(cpu);
}

static moda_train_settings settings(void) {
    moda_train_settings s = {STEPS, BATCH, SEQ, 5, 3e-3, 3};
    return s;
}

static void check_training(int v) {
    moda_model_config c = small(v);
    moda_train_settings s = settings();
    moda_data dc, dg;
    TU_CHECK_STATUS(moda_data_open(&dc, NULL, 0, NULL), MODA_OK);
    TU_CHECK_STATUS(moda_data_open(&dg, NULL, 0, NULL), MODA_OK);
    moda_trainer tc, tg;
    moda_train_device dev = {MODA_CUDA, MICRO, 0};
    TU_CHECK_STATUS(moda_trainer_create(&tc, &c, &s, &dc), MODA_OK);
    moda_status st = moda_trainer_create_on(&tg, &c, &s, &dg, &dev);
    TU_CHECK_STATUS(st, MODA_OK);
    if (st != MODA_OK) {
        fprintf(stderr, "  %s\n", moda_model_error());
        moda_trainer_free(&tc);
        moda_data_close(&dc);
        moda_data_close(&dg);
        return;
    }
    double lc[STEPS], lg[STEPS], gc, gg, worst = 0, mean = 0;
    for (int i = 0; i < STEPS; i++) {
        TU_CHECK_STATUS(moda_trainer_step(&tc, &lc[i], &gc), MODA_OK);
        TU_CHECK_STATUS(moda_trainer_step(&tg, &lg[i], &gg), MODA_OK);
        double d = fabs(lc[i] - lg[i]);
        if (d > worst) worst = d;
        mean += d / STEPS;
        if (i == 0 || i == STEPS - 1)
            printf("  train %-20s step %2d: loss CPU %.4f GPU %.4f, grad norm CPU %.4f GPU %.4f\n", variant_name(v), i + 1,
                   lc[i], lg[i], gc, gg);
    }
    TU_CHECK(fabs(lc[0] - lg[0]) <= LOSS0_TOL, "%s: first-step losses %.5f vs %.5f", variant_name(v), lc[0], lg[0]);
    TU_CHECK(worst <= LOSS_TOL && mean <= LOSS_MEAN_TOL, "%s: %d steps: max loss difference %.4f, mean %.4f",
             variant_name(v), STEPS, worst, mean);
    TU_CHECK(lg[STEPS - 1] < lg[0] - 1.0, "%s: GPU loss did not fall (%.4f -> %.4f)", variant_name(v), lg[0],
             lg[STEPS - 1]);
    printf("  train %-20s %d steps: max |loss GPU - CPU| %.4f, mean %.4f\n", variant_name(v), STEPS, worst, mean);
    moda_trainer_free(&tc);
    moda_trainer_free(&tg);
    moda_data_close(&dc);
    moda_data_close(&dg);
}

/* a run of `first` steps on one device, checkpointed, resumed on the other; the reference continues */
static void check_checkpoint(int gpu_first, const char *dir) {
    moda_model_config c = small(0);
    moda_train_settings s = settings();
    moda_train_device cpu = {MODA_CPU, 0, 0}, gpu = {MODA_CUDA, MICRO, 0};
    moda_data d1, d2;
    TU_CHECK_STATUS(moda_data_open(&d1, NULL, 0, NULL), MODA_OK);
    TU_CHECK_STATUS(moda_data_open(&d2, NULL, 0, NULL), MODA_OK);
    moda_trainer a, b;
    TU_CHECK_STATUS(moda_trainer_create_on(&a, &c, &s, &d1, gpu_first ? &gpu : &cpu), MODA_OK);
    TU_CHECK_STATUS(moda_trainer_create_on(&b, &c, &s, &d2, gpu_first ? &cpu : &gpu), MODA_OK);
    char path[512];
    snprintf(path, sizeof path, "%s/ckpt_%s.bin", dir, gpu_first ? "gpu" : "cpu");
    double l, la[4], lb[4];
    for (int i = 0; i < 6; i++) TU_CHECK_STATUS(moda_trainer_step(&a, &l, NULL), MODA_OK);
    TU_CHECK_STATUS(moda_checkpoint_save(&a, path), MODA_OK);
    TU_CHECK_STATUS(moda_checkpoint_load(&b, path), MODA_OK);
    TU_CHECK(b.step == 6 && b.opt.t == 6, "resumed at step %lld, t %lld", (long long)b.step, (long long)b.opt.t);
    /* the loaded weights and moments are the saved ones, bit for bit, on the new device too */
    const int64_t n = moda_model_num_params(a.model);
    float *pa = malloc(sizeof(float) * (size_t)n * 3), *pb = malloc(sizeof(float) * (size_t)n * 3);
    TU_CHECK_STATUS(moda_trainer_sync_host(&a), MODA_OK);
    TU_CHECK_STATUS(moda_trainer_sync_host(&b), MODA_OK);
    memcpy(pa, moda_model_params(a.model), sizeof(float) * (size_t)n);
    memcpy(pa + n, a.opt.m, sizeof(float) * (size_t)n);
    memcpy(pa + 2 * n, a.opt.v, sizeof(float) * (size_t)n);
    memcpy(pb, moda_model_params(b.model), sizeof(float) * (size_t)n);
    memcpy(pb + n, b.opt.m, sizeof(float) * (size_t)n);
    memcpy(pb + 2 * n, b.opt.v, sizeof(float) * (size_t)n);
    TU_CHECK(memcmp(pa, pb, sizeof(float) * (size_t)n * 3) == 0, "%s checkpoint: state differs after loading on the %s",
             gpu_first ? "GPU" : "CPU", gpu_first ? "CPU" : "GPU");
    double worst = 0;
    for (int i = 0; i < 4; i++) {
        TU_CHECK_STATUS(moda_trainer_step(&a, &la[i], NULL), MODA_OK);
        TU_CHECK_STATUS(moda_trainer_step(&b, &lb[i], NULL), MODA_OK);
        if (fabs(la[i] - lb[i]) > worst) worst = fabs(la[i] - lb[i]);
    }
    TU_CHECK(worst <= LOSS_TOL, "after resuming a %s checkpoint on the %s: loss differs by %.4f", gpu_first ? "GPU" : "CPU",
             gpu_first ? "CPU" : "GPU", worst);
    printf("  checkpoint %s -> %s: state bitwise equal; steps 7-10 loss %.4f / %.4f ... max diff %.4f\n",
           gpu_first ? "GPU" : "CPU", gpu_first ? "CPU" : "GPU", la[0], lb[0], worst);
    free(pa);
    free(pb);
    remove(path);
    moda_trainer_free(&a);
    moda_trainer_free(&b);
    moda_data_close(&d1);
    moda_data_close(&d2);
}

static void check_errors(void) {
    moda_model_config c = small(0);
    moda_train_settings s = settings();
    moda_data d;
    TU_CHECK_STATUS(moda_data_open(&d, NULL, 0, NULL), MODA_OK);
    moda_trainer tr;
    moda_train_device bad = {MODA_CUDA, 3, 0};
    TU_CHECK_STATUS(moda_trainer_create_on(&tr, &c, &s, &d, &bad), MODA_ERR_INVALID_ARGUMENT);
    TU_CHECK(strstr(moda_model_error(), "micro-batch") != NULL, "message: %s", moda_model_error());
    moda_gpu_model *g = NULL;
    moda_model_config_resolve(&c);
    TU_CHECK_STATUS(moda_gpu_model_create(&g, &c, 1, 16, 1), MODA_OK);
    if (g) {
        int32_t in[16] = {0}, tg[16] = {0};
        in[5] = 300;
        double l;
        TU_CHECK_STATUS(moda_gpu_model_loss(g, in, tg, 1, 1, &l), MODA_ERR_INVALID_ARGUMENT);
        TU_CHECK_STATUS(moda_gpu_model_loss(g, in, tg, 2, 1, &l), MODA_ERR_INVALID_ARGUMENT);
        moda_gpu_model_free(g);
    }
    moda_data_close(&d);
}

int main(void) {
    char dir[] = "/tmp/moda_gpu_ckpt_XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    /* under the sanitizers (MODA_TEST_QUICK=1) the gradient check alone: it runs every kernel */
    const int quick = getenv("MODA_TEST_QUICK") && atoi(getenv("MODA_TEST_QUICK"));
    moda_data data;
    TU_CHECK_STATUS(moda_data_open(&data, NULL, 0, NULL), MODA_OK);
    check_gradients(&data, quick ? 2 : 4);
    if (!quick) check_nondeterministic_hopper(&data);
    moda_data_close(&data);
    if (quick) {
        check_errors();
        rmdir(dir);
        return tu_finish("test_model_gpu");
    }
    check_training(0);
    check_training(1);
    check_checkpoint(1, dir);
    check_checkpoint(0, dir);
    check_errors();
    rmdir(dir);
    return tu_finish("test_model_gpu");
}
