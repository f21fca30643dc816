/* trainer.c - one training run: model + AdamW + loader; evaluation; sampling. */
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

moda_status moda_trainer_create(moda_trainer *tr, const moda_model_config *config, const moda_train_settings *s,
                                moda_data *data) {
    moda_train_device cpu = {MODA_CPU, 0, 0};
    return moda_trainer_create_on(tr, config, s, data, &cpu);
}

moda_status moda_trainer_create_on(moda_trainer *tr, const moda_model_config *config, const moda_train_settings *s,
                                   moda_data *data, const moda_train_device *dev) {
    memset(tr, 0, sizeof *tr);
    if (s->steps < 1) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "steps %lld must be >= 1", (long long)s->steps);
    if (data->max_token >= config->V)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "the data holds token %lld but the vocabulary is %lld (set --vocab)",
                         (long long)data->max_token, (long long)config->V);
    const int gpu = dev && dev->device == MODA_CUDA;
    const int64_t micro = gpu && dev->micro_batch > 0 ? dev->micro_batch : s->batch;
    if (dev && dev->attn_nondeterministic != 0 && dev->attn_nondeterministic != 1)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "the attention determinism must be on or off");
    if (gpu && (micro > s->batch || s->batch % micro))
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "--micro-batch %lld must divide --batch %lld", (long long)micro,
                               (long long)s->batch);
    /* on the GPU the host model only mirrors the parameters (checkpoints, sampling): no activations */
    moda_status st = moda_model_create(&tr->model, config, MODA_F32, gpu ? 1 : s->batch, gpu ? 1 : s->seq);
    if (st != MODA_OK) return st;
    moda_model_init(tr->model, s->seed);
    st = moda_adamw_init(&tr->opt, moda_model_num_params(tr->model), s->lr, s->warmup, s->steps);
    if (st == MODA_OK && gpu) {
        st = moda_gpu_model_create(&tr->gpu, moda_model_get_config(tr->model), micro, s->seq, s->batch / micro);
        if (st == MODA_OK) st = moda_gpu_model_set_deterministic_attention(tr->gpu, !dev->attn_nondeterministic);
        if (st == MODA_OK) st = moda_gpu_model_set_state(tr->gpu, moda_model_params(tr->model), NULL, NULL);
    }
    if (st == MODA_OK) st = moda_data_start(data, s->batch, s->seq, s->seed);
    tr->inputs = malloc((size_t)(s->batch * s->seq) * sizeof(int32_t));
    tr->targets = malloc((size_t)(s->batch * s->seq) * sizeof(int32_t));
    if (st == MODA_OK && (!tr->inputs || !tr->targets)) st = moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of memory");
    if (st != MODA_OK) {
        moda_trainer_free(tr);
        return st;
    }
    tr->data = data;
    tr->s = *s;
    tr->rng = s->seed ^ 0x5851F42D4C957F2Dull;
    return MODA_OK;
}

void moda_trainer_free(moda_trainer *tr) {
    moda_gpu_model_free(tr->gpu);
    moda_model_free(tr->model);
    moda_adamw_free(&tr->opt);
    free(tr->inputs);
    free(tr->targets);
    memset(tr, 0, sizeof *tr);
}

moda_status moda_trainer_sync_host(const moda_trainer *tr) {
    if (!tr->gpu) return MODA_OK;
    return moda_gpu_model_get_state(tr->gpu, moda_model_params(tr->model), tr->opt.m, tr->opt.v);
}

moda_status moda_trainer_sync_device(moda_trainer *tr) {
    if (!tr->gpu) return MODA_OK;
    return moda_gpu_model_set_state(tr->gpu, moda_model_params(tr->model), tr->opt.m, tr->opt.v);
}

moda_status moda_trainer_step(moda_trainer *tr, double *loss, double *grad_norm) {
    moda_status st = moda_data_next(tr->data, tr->inputs, tr->targets);
    if (st != MODA_OK) return st;
    double gn = 0;
    if (tr->gpu) {
        /* the schedule and the bias correction use the update number as the CPU's moda_adamw_update does */
        const double lr = moda_lr_at(&tr->opt, tr->opt.t);
        st = moda_gpu_model_train_step(tr->gpu, tr->inputs, tr->targets, tr->s.batch, &tr->opt, lr, tr->opt.t + 1, loss,
                                       &gn);
        if (st != MODA_OK) return st;
        if (!isfinite(*loss)) /* the device skipped the update */
            return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "the loss became %g at step %lld (lower the learning rate)",
                                   *loss, (long long)tr->step);
        tr->opt.t++;
    } else {
        st = moda_model_step(tr->model, tr->inputs, tr->targets, 1, loss);
        if (st != MODA_OK) return st;
        if (!isfinite(*loss))
            return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "the loss became %g at step %lld (lower the learning rate)", *loss,
                             (long long)tr->step);
        gn = moda_adamw_update(&tr->opt, tr->model);
    }
    if (grad_norm) *grad_norm = gn;
    tr->step++;
    return MODA_OK;
}

moda_status moda_eval_model(moda_model *m, const moda_data *dt, int64_t max_batches, double *loss) {
    const int64_t B = moda_model_batch(m), T = moda_model_seq(m);
    int64_t nb = moda_data_val_batches(dt, B, T);
    if (nb < 1)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "the validation split (%lld tokens) holds no batch of %lld x %lld + 1",
                         (long long)dt->val_count, (long long)B, (long long)T);
    if (max_batches > 0 && nb > max_batches) nb = max_batches;
    int32_t *in = malloc((size_t)(B * T) * sizeof(int32_t)), *tg = malloc((size_t)(B * T) * sizeof(int32_t));
    if (!in || !tg) {
        free(in);
        free(tg);
        return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of memory");
    }
    double sum = 0;
    moda_status st = MODA_OK;
    for (int64_t i = 0; i < nb && st == MODA_OK; i++) {
        double l;
        moda_data_val_batch(dt, i, B, T, in, tg);
        st = moda_model_step(m, in, tg, 0, &l);
        sum += l;
    }
    free(in);
    free(tg);
    if (st == MODA_OK) *loss = sum / (double)nb;
    return st;
}

moda_status moda_trainer_eval(moda_trainer *tr, int64_t max_batches, double *loss) {
    if (!tr->gpu) return moda_eval_model(tr->model, tr->data, max_batches, loss);
    const int64_t B = tr->s.batch, T = tr->s.seq;
    int64_t nb = moda_data_val_batches(tr->data, B, T);
    if (nb < 1)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "the validation split (%lld tokens) holds no batch of %lld x %lld + 1",
                               (long long)tr->data->val_count, (long long)B, (long long)T);
    if (max_batches > 0 && nb > max_batches) nb = max_batches;
    double sum = 0;
    for (int64_t i = 0; i < nb; i++) {
        double l;
        /* the training batch buffers are free between steps */
        moda_data_val_batch(tr->data, i, B, T, tr->inputs, tr->targets);
        moda_status st = moda_gpu_model_loss(tr->gpu, tr->inputs, tr->targets, B, 0, &l);
        if (st != MODA_OK) return st;
        sum += l;
    }
    *loss = sum / (double)nb;
    return MODA_OK;
}

int32_t moda_sample_token(const double *logits, int64_t V, double temperature, int64_t top_k, uint64_t *rng) {
    int64_t best = 0;
    for (int64_t j = 1; j < V; j++)
        if (logits[j] > logits[best]) best = j;
    if (!(temperature > 0)) return (int32_t)best;
    /* the k-th largest logit is the cut-off (ties at the cut-off all stay in) */
    double cut = -INFINITY;
    if (top_k > 0 && top_k < V) {
        double *tmp = malloc((size_t)V * sizeof(double));
        if (tmp) {
            memcpy(tmp, logits, (size_t)V * sizeof(double));
            for (int64_t k = 0; k < top_k; k++) {
                int64_t bi = k;
                for (int64_t j = k + 1; j < V; j++)
                    if (tmp[j] > tmp[bi]) bi = j;
                double t = tmp[k];
                tmp[k] = tmp[bi];
                tmp[bi] = t;
            }
            cut = tmp[top_k - 1];
            free(tmp);
        }
    }
    double total = 0;
    for (int64_t j = 0; j < V; j++)
        if (logits[j] >= cut) total += exp((logits[j] - logits[best]) / temperature);
    double u = moda_rng_uniform(rng) * total, acc = 0;
    for (int64_t j = 0; j < V; j++) {
        if (logits[j] < cut) continue;
        acc += exp((logits[j] - logits[best]) / temperature);
        if (acc >= u) return (int32_t)j;
    }
    return (int32_t)best;
}
