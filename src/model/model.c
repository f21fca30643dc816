/* model.c - the model's memory (parameters, one activation arena, the depth buffer), initialisation, the
 * dtype dispatch into the numeric core, and the AdamW optimiser. */
#include "model_impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- a bump allocator over one arena: a counting pass (base NULL), then the real one ---- */
typedef struct arena_cursor {
    char *base;
    size_t used;
    size_t esz;
} arena_cursor;

static void *take(arena_cursor *a, int64_t elements) {
    size_t bytes = ((size_t)elements * a->esz + 63) & ~(size_t)63;
    void *p = a->base ? a->base + a->used : NULL;
    a->used += bytes;
    return p;
}

static void layout(moda_model *m, arena_cursor *a) {
    const moda_model_config *c = &m->c;
    const int64_t M = m->M, D = c->D, qd = c->Hq * c->d, kvd = c->Hk * c->d, F = c->F;
    m->kd = take(a, M * m->L * kvd);
    m->vd = take(a, M * m->L * kvd);
    m->dkd = take(a, M * m->L * kvd);
    m->dvd = take(a, M * m->L * kvd);
    for (int64_t i = 0; i < c->N; i++) {
        moda_block_acts *b = &m->blk[i];
        memset(b, 0, sizeof *b);
        b->x = take(a, M * D);
        if (!c->post_norm) {
            b->xn_a = take(a, M * D);
            b->xn_f = take(a, M * D);
        } else {
            b->sum_a = take(a, M * D);
            b->sum_f = take(a, M * D);
        }
        b->rstd_a = take(a, M);
        b->rstd_f = take(a, M);
        if (c->qk_norm) {
            b->qr = take(a, M * qd);
            b->kr = take(a, M * kvd);
            b->rstd_q = take(a, M);
            b->rstd_k = take(a, M);
        }
        b->q = take(a, M * qd);
        const moda_block_depth bd = moda_model_block_depth(c, i);
        b->slot_attn = bd.slot_attn;
        b->slot_ffn = bd.slot_ffn;
        b->d0 = bd.d0;
        b->d1 = bd.d1;
        if (c->depth == MODA_DEPTH_SRC_ATTN || c->depth == MODA_DEPTH_SRC_ATTN_FFN) {
            /* the layer's keys and values live in its depth slot: written once, read by this layer's sequence
             * attention and by later layers' depth attention */
            b->k = a->base ? (char *)m->kd + (size_t)(b->slot_attn * kvd) * a->esz : NULL;
            b->v = a->base ? (char *)m->vd + (size_t)(b->slot_attn * kvd) * a->esz : NULL;
            b->k_ld = b->v_ld = m->L * kvd;
        } else {
            b->k = take(a, M * kvd);
            b->v = take(a, M * kvd);
            b->k_ld = b->v_ld = kvd;
        }
        b->a = take(a, M * qd);
        b->lse = take(a, M * c->Hq);
        b->xmid = take(a, M * D);
        b->h1 = take(a, M * F);
        b->h3 = take(a, M * F);
        b->g = take(a, M * F);
    }
    m->xfinal = take(a, M * D);
    m->xf = take(a, M * D);
    m->rstd_final = take(a, M);
    m->rope_cos = take(a, m->T * (c->d / 2));
    m->rope_sin = take(a, m->T * (c->d / 2));
    m->dx = take(a, M * D);
    m->dxin = take(a, M * D);
    m->dtmp = take(a, M * D);
    m->dq = take(a, M * qd);
    m->dk = take(a, M * kvd);
    m->dv = take(a, M * kvd);
    m->da = take(a, M * qd);
    m->dh1 = take(a, M * (F > qd ? F : qd));
    m->dh3 = take(a, M * (F > kvd ? F : kvd));
    m->dg = take(a, M * F);
    m->logits = take(a, m->head_rows * c->V);
}

static moda_status workspace_size(moda_model *m, size_t *bytes) {
    const moda_model_config *c = &m->c;
    const moda_dtype dt = m->dtype;
    const int64_t G = c->Hq / c->Hk, kvd = c->Hk * c->d;
    *bytes = 0;
    for (int64_t i = 0; i < c->N; i++) {
        moda_block_acts *b = &m->blk[i];
        moda_options o = moda_model_attn_options(b->d0, b->d1, 1);
        int depth = b->d1 > b->d0;
        moda_tensor q = moda_tensor_q_standard(b->q, dt, MODA_CPU, m->B, m->T, c->Hk, G, c->d);
        int64_t ks[4] = {m->B, m->T, c->Hk, c->d};
        int64_t kst[4] = {m->T * b->k_ld, b->k_ld, c->d, 1}, vst[4] = {m->T * b->v_ld, b->v_ld, c->d, 1};
        moda_tensor k = moda_tensor_strided(b->k, dt, MODA_CPU, 4, ks, kst);
        moda_tensor v = moda_tensor_strided(b->v, dt, MODA_CPU, 4, ks, vst);
        int64_t ds[5] = {m->B, m->T, m->L, c->Hk, c->d};
        moda_tensor kd = moda_tensor_contiguous(m->kd, dt, MODA_CPU, 5, ds);
        moda_tensor vd = moda_tensor_contiguous(m->vd, dt, MODA_CPU, 5, ds);
        size_t w = 0;
        moda_status st = moda_backward_workspace_size(&o, &q, &k, &v, depth ? &kd : NULL, depth ? &vd : NULL, &w);
        if (st != MODA_OK) return moda_model_fail(st, "attention of block %lld: %s", (long long)i, moda_last_error());
        if (w > *bytes) *bytes = w;
        (void)kvd;
    }
    return MODA_OK;
}

moda_status moda_model_create(moda_model **out, const moda_model_config *config, moda_dtype dtype, int64_t B,
                              int64_t T) {
    *out = NULL;
    if (dtype != MODA_F32 && dtype != MODA_F64)
        return moda_model_fail(MODA_ERR_UNSUPPORTED, "the model runs in f32 (training) or f64 (tests), not %s", moda_dtype_name(dtype));
    if (B < 1 || T < 1 || B > (1 << 20) || T > (1 << 24))
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "batch %lld and sequence length %lld must be >= 1", (long long)B, (long long)T);
    moda_model_config c = *config;
    moda_status st = moda_model_config_resolve(&c);
    if (st != MODA_OK) return st;
    if (B * T * (c.D > c.F ? c.D : c.F) > ((int64_t)1 << 31))
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "B*T*max(D, F) = %lld exceeds the BLAS's 32-bit sizes",
                         (long long)(B * T * (c.D > c.F ? c.D : c.F)));
    moda_model *m = calloc(1, sizeof *m);
    if (!m) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "cannot allocate the model");
    m->c = c;
    m->dtype = dtype;
    m->esz = moda_dtype_size(dtype);
    m->B = B;
    m->T = T;
    m->M = B * T;
    m->L = moda_model_slots(&c);
    m->head_rows = ((int64_t)1 << 22) / c.V; /* logits chunk of at most 4M elements */
    if (m->head_rows < 1) m->head_rows = 1;
    if (m->head_rows > m->M) m->head_rows = m->M;
    m->ntensors = moda_model_param_table(&c, NULL, 0, &m->nparams);
    m->tab = calloc((size_t)m->ntensors, sizeof *m->tab);
    m->poff = malloc((size_t)(c.N + 1) * MP_KIND_COUNT * sizeof *m->poff);
    m->blk = calloc((size_t)c.N, sizeof *m->blk);
    m->params = calloc((size_t)m->nparams, m->esz);
    m->grads = calloc((size_t)m->nparams, m->esz);
    m->tok_in = calloc((size_t)m->M, sizeof(int32_t));
    m->tok_tgt = calloc((size_t)m->M, sizeof(int32_t));
    if (!m->tab || !m->poff || !m->blk || !m->params || !m->grads || !m->tok_in || !m->tok_tgt) {
        moda_model_free(m);
        return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "cannot allocate %lld parameters", (long long)m->nparams);
    }
    moda_model_param_table(&c, m->tab, m->ntensors, NULL);
    for (int64_t i = 0; i < (c.N + 1) * MP_KIND_COUNT; i++) m->poff[i] = -1;
    for (int i = 0; i < m->ntensors; i++) {
        int64_t row = m->tab[i].block < 0 ? c.N : m->tab[i].block;
        m->poff[row * MP_KIND_COUNT + m->tab[i].kind] = m->tab[i].offset;
    }
    arena_cursor a = {NULL, 0, m->esz};
    layout(m, &a);
    m->arena = aligned_alloc(64, a.used ? a.used : 64);
    if (!m->arena) {
        size_t need = a.used;
        moda_model_free(m);
        return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MB of activations (B=%lld, T=%lld)",
                         (double)need / 1e6, (long long)B, (long long)T);
    }
    memset(m->arena, 0, a.used);
    arena_cursor real = {m->arena, 0, m->esz};
    layout(m, &real);
    if (dtype == MODA_F32) moda_model_rope_tables_f32(m);
    else moda_model_rope_tables_f64(m);
    st = workspace_size(m, &m->ws_bytes);
    if (st != MODA_OK) {
        moda_model_free(m);
        return st;
    }
    if (m->ws_bytes) {
        m->ws = malloc(m->ws_bytes);
        if (!m->ws) {
            moda_model_free(m);
            return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "cannot allocate %zu bytes of operator workspace", m->ws_bytes);
        }
    }
    moda_model_init(m, 0);
    *out = m;
    return MODA_OK;
}

void moda_model_free(moda_model *m) {
    if (!m) return;
    free(m->tab);
    free(m->poff);
    free(m->blk);
    free(m->params);
    free(m->grads);
    free(m->arena);
    free(m->ws);
    free(m->tok_in);
    free(m->tok_tgt);
    free(m);
}

const moda_model_config *moda_model_get_config(const moda_model *m) { return &m->c; }
moda_dtype moda_model_dtype(const moda_model *m) { return m->dtype; }
int64_t moda_model_batch(const moda_model *m) { return m->B; }
int64_t moda_model_seq(const moda_model *m) { return m->T; }
int64_t moda_model_num_params(const moda_model *m) { return m->nparams; }
int moda_model_num_tensors(const moda_model *m) { return m->ntensors; }
const moda_param_info *moda_model_tensor(const moda_model *m, int i) {
    return i >= 0 && i < m->ntensors ? &m->tab[i] : NULL;
}
void *moda_model_params(moda_model *m) { return m->params; }
void *moda_model_grads(moda_model *m) { return m->grads; }

/* ---- initialisation ---- */
static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t moda_rng_next(uint64_t *state) { return splitmix(state); }
double moda_rng_uniform(uint64_t *state) { return (double)(splitmix(state) >> 11) * (1.0 / 9007199254740992.0); }

void moda_model_init(moda_model *m, uint64_t seed) {
    const double std = 0.02, out_std = 0.02 / sqrt(2.0 * (double)m->c.N);
    for (int i = 0; i < m->ntensors; i++) {
        const moda_param_info *t = &m->tab[i];
        int64_t n = t->rows * t->cols;
        /* a stream per tensor: its values do not depend on which other tensors exist, so a baseline and a
         * MoDA model of the same seed share every common weight */
        uint64_t s = seed * 0x9E3779B97F4A7C15ull ^ ((uint64_t)t->kind << 40) ^ (uint64_t)(t->block + 1);
        splitmix(&s);
        double sd = (t->kind == MP_WO || t->kind == MP_W2) ? out_std : std;
        for (int64_t j = 0; j < n; j++) {
            double v;
            if (!t->matrix) {
                v = 1.0;
            } else {
                double u1 = moda_rng_uniform(&s), u2 = moda_rng_uniform(&s);
                v = sd * sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2);
            }
            if (m->dtype == MODA_F32) ((float *)m->params)[t->offset + j] = (float)v;
            else ((double *)m->params)[t->offset + j] = v;
        }
    }
}

/* ---- forward / backward dispatch ---- */
static moda_status load_tokens(moda_model *m, const int32_t *in, const int32_t *tgt, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (in[i] < 0 || in[i] >= m->c.V)
            return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "input token %d at position %lld is outside the vocabulary [0, %lld)",
                             in[i], (long long)i, (long long)m->c.V);
        if (tgt && (tgt[i] < 0 || tgt[i] >= m->c.V))
            return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "target token %d at position %lld is outside the vocabulary [0, %lld)",
                             tgt[i], (long long)i, (long long)m->c.V);
    }
    memcpy(m->tok_in, in, (size_t)n * sizeof(int32_t));
    if (tgt) memcpy(m->tok_tgt, tgt, (size_t)n * sizeof(int32_t));
    return MODA_OK;
}

moda_status moda_model_step(moda_model *m, const int32_t *inputs, const int32_t *targets, int grads, double *loss) {
    if (!inputs || !targets || !loss) return moda_model_fail(MODA_ERR_NULL_POINTER, "moda_model_step needs inputs, targets and loss");
    moda_status st = load_tokens(m, inputs, targets, m->M);
    if (st != MODA_OK) return st;
    return m->dtype == MODA_F32 ? moda_model_step_f32(m, grads, loss) : moda_model_step_f64(m, grads, loss);
}

moda_status moda_model_logits(moda_model *m, const int32_t *tokens, int64_t len, double *logits) {
    if (len < 1 || len > m->T)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "context of %lld tokens must be in [1, T=%lld]", (long long)len, (long long)m->T);
    moda_status st = load_tokens(m, tokens, NULL, len);
    if (st != MODA_OK) return st;
    /* causal attention and per-token depth: positions after len-1 cannot change its logits */
    for (int64_t i = len; i < m->M; i++) m->tok_in[i] = 0;
    return m->dtype == MODA_F32 ? moda_model_logits_f32(m, len - 1, logits) : moda_model_logits_f64(m, len - 1, logits);
}

moda_status moda_model_block_view(const moda_model *m, int64_t block, moda_block_view *v) {
    if (block < 0 || block >= m->c.N)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "block %lld outside [0, %lld)", (long long)block, (long long)m->c.N);
    const moda_block_acts *b = &m->blk[block];
    v->x = b->x;
    v->xout = block + 1 < m->c.N ? m->blk[block + 1].x : m->xfinal;
    v->q = b->q;
    v->k = b->k;
    v->v = b->v;
    v->k_ld = b->k_ld;
    v->v_ld = b->v_ld;
    v->a = b->a;
    v->kd = m->kd;
    v->vd = m->vd;
    v->d0 = b->d0;
    v->d1 = b->d1;
    v->slot_attn = b->slot_attn;
    v->slot_ffn = b->slot_ffn;
    return MODA_OK;
}

/* ---- AdamW ---- */
moda_status moda_adamw_init(moda_adamw *o, int64_t n, double lr, int64_t warmup, int64_t total_steps) {
    memset(o, 0, sizeof *o);
    if (!(lr > 0) || !isfinite(lr)) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "learning rate %g must be > 0", lr);
    if (warmup < 0 || total_steps < 1)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "warm-up %lld must be >= 0 and steps %lld >= 1", (long long)warmup, (long long)total_steps);
    o->lr = lr;
    o->beta1 = 0.9;
    o->beta2 = 0.95;
    o->eps = 1e-8;
    o->weight_decay = 0.1;
    o->clip = 1.0;
    o->warmup = warmup;
    o->total_steps = total_steps;
    o->n = n;
    o->m = calloc((size_t)n, sizeof(float));
    o->v = calloc((size_t)n, sizeof(float));
    if (!o->m || !o->v) {
        moda_adamw_free(o);
        return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "cannot allocate the optimiser state of %lld parameters", (long long)n);
    }
    return MODA_OK;
}

void moda_adamw_free(moda_adamw *o) {
    free(o->m);
    free(o->v);
    o->m = o->v = NULL;
}

double moda_lr_at(const moda_adamw *o, int64_t step) {
    if (step < o->warmup) return o->lr * (double)(step + 1) / (double)o->warmup;
    double span = (double)(o->total_steps - o->warmup);
    double p = span > 0 ? (double)(step - o->warmup) / span : 1.0;
    if (p > 1) p = 1;
    double floor = 0.1 * o->lr;
    return floor + 0.5 * (o->lr - floor) * (1.0 + cos(3.141592653589793 * p));
}

double moda_adamw_update(moda_adamw *o, moda_model *mdl) {
    if (mdl->dtype != MODA_F32 || o->n != mdl->nparams) return NAN;
    float *p = mdl->params, *g = mdl->grads;
    double ss = 0;
    for (int64_t i = 0; i < o->n; i++) ss += (double)g[i] * (double)g[i];
    double norm = sqrt(ss);
    const float scale = norm > o->clip ? (float)(o->clip / norm) : 1.0f;
    const double lr = moda_lr_at(o, o->t);
    o->t++;
    const float b1 = (float)o->beta1, b2 = (float)o->beta2;
    const float c1 = (float)(1.0 - pow(o->beta1, (double)o->t)), c2 = (float)(1.0 - pow(o->beta2, (double)o->t));
    for (int ti = 0; ti < mdl->ntensors; ti++) {
        const moda_param_info *t = &mdl->tab[ti];
        const float wd = t->matrix ? (float)o->weight_decay : 0.0f, lrf = (float)lr, eps = (float)o->eps;
        const int64_t a = t->offset, b = t->offset + t->rows * t->cols;
#pragma omp parallel for schedule(static)
        for (int64_t i = a; i < b; i++) {
            float gi = g[i] * scale;
            o->m[i] = b1 * o->m[i] + (1.0f - b1) * gi;
            o->v[i] = b2 * o->v[i] + (1.0f - b2) * gi * gi;
            float mh = o->m[i] / c1, vh = o->v[i] / c2;
            p[i] -= lrf * (mh / (sqrtf(vh) + eps) + wd * p[i]);
        }
    }
    return norm;
}
