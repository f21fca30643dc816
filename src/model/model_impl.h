/* model_impl.h - the model's private layout, shared by model.c and the two instantiations of model_core.h. */
#ifndef MODA_MODEL_IMPL_H
#define MODA_MODEL_IMPL_H

#include "model.h"

/* Activations of one block kept for the backward pass (element type = the model's dtype). Rows are the
 * M = B*T tokens, row-major. */
typedef struct moda_block_acts {
    void *x;                 /* block input X_i [M, D] */
    void *xn_a, *rstd_a;     /* pre-norm: RMSNorm(X_i) and its 1/rms; post-norm: rstd of sum_a */
    void *sum_a;             /* post-norm: X_i + attention output */
    void *qr, *kr, *rstd_q, *rstd_k; /* QK-norm: raw projections and their 1/rms */
    void *q;                 /* [M, Hq*d] after QK-norm and RoPE */
    void *k, *v;             /* [M, Hk*d] rows of stride k_ld/v_ld: a depth slot (source attn) or own buffer */
    int64_t k_ld, v_ld;
    void *a, *lse;           /* attention output [M, Hq*d], its normaliser [M, Hq] */
    void *xmid;              /* after the attention sublayer [M, D] */
    void *xn_f, *rstd_f, *sum_f;
    void *h1, *h3, *g;       /* SwiGLU: f_in W1, f_in W3, silu(h1)*h3 [M, F] */
    int64_t d0, d1, slot_attn, slot_ffn;
} moda_block_acts;

struct moda_model {
    moda_model_config c;
    moda_dtype dtype;
    size_t esz;
    int64_t B, T, M, L;         /* L: depth slots per token (Lcap) */
    int ntensors;
    moda_param_info *tab;
    int64_t nparams;
    int64_t *poff;              /* offset of (block, kind) in the flat array; -1 when absent; block -1 at row N */
    void *params, *grads;
    void *arena;                /* every activation and scratch buffer */
    moda_block_acts *blk;
    void *xfinal, *xf, *rstd_final; /* X_N, final-normed (pre-norm) */
    void *kd, *vd, *dkd, *dvd;  /* the ONE depth buffer of the micro-batch and its gradient */
    void *rope_cos, *rope_sin;  /* [T, d/2] */
    /* backward scratch */
    void *dx, *dxin, *dtmp, *dq, *dk, *dv, *da, *dh1, *dh3, *dg, *logits;
    int64_t head_rows;          /* rows per chunk of the LM head (bounds the logits buffer) */
    void *ws;                   /* operator backward workspace */
    size_t ws_bytes;
    int32_t *tok_in, *tok_tgt;  /* copies of the current batch */
};

static inline int64_t moda_poff(const struct moda_model *m, int64_t block, moda_param_kind k) {
    int64_t row = block < 0 ? m->c.N : block;
    return m->poff[row * MP_KIND_COUNT + k];
}

/* the numeric core, per element type (model_f32.c, model_f64.c) */
moda_status moda_model_step_f32(struct moda_model *m, int grads, double *loss);
moda_status moda_model_step_f64(struct moda_model *m, int grads, double *loss);
moda_status moda_model_logits_f32(struct moda_model *m, int64_t row, double *logits);
moda_status moda_model_logits_f64(struct moda_model *m, int64_t row, double *logits);
void moda_model_rope_tables_f32(struct moda_model *m);
void moda_model_rope_tables_f64(struct moda_model *m);

#endif
