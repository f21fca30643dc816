/*
 * model.h - the MoDA language model on the CPU and one CUDA GPU (private to the trainer, the `moda` tool and the
 * model tests).
 *
 * A decoder-only transformer in the style of OLMo2 with the depth stream of MoDA (docs/model.md). One code
 * path serves the baseline (depth none) and every MoDA variant. The numeric core is compiled twice, for
 * float (the trainer) and for double (the finite-difference gradient tests), from model_core.h.
 *
 * Like libmoda, nothing here prints, aborts or exits: every fallible call returns a moda_status and sets the
 * thread's message through moda_model_fail().
 */
#ifndef MODA_MODEL_H
#define MODA_MODEL_H

#include "moda.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Errors: libmoda keeps moda_model_fail() private to the shared library, so the model keeps its own thread-local
 * message. moda_model_error() is the message of the last failing model call on this thread (operator failures
 * are copied into it with the operator's own text). Never NULL. */
moda_status moda_model_fail(moda_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
const char *moda_model_error(void);

/* ---------------------------------------------------------------------------------------------------------
 * Configuration
 * ------------------------------------------------------------------------------------------------------- */
typedef enum moda_depth_source {
    MODA_DEPTH_SRC_NONE = 0,      /* baseline: no depth stream */
    MODA_DEPTH_SRC_ATTN = 1,      /* the attention's own (k, v) written as one slot per block */
    MODA_DEPTH_SRC_ATTN_FFN = 2,  /* + (kf, vf) projected from the FFN input: 2 slots per block (default) */
    MODA_DEPTH_SRC_EXTRA = 3      /* separate Wkd, Wvd at the attention instead of (k, v), + the FFN slot */
} moda_depth_source;

typedef struct moda_model_config {
    int64_t V;           /* vocabulary */
    int64_t D;           /* width */
    int64_t N;           /* blocks */
    int64_t Hq, Hk;      /* query heads, key/value heads (Hq multiple of Hk) */
    int64_t d;           /* head dim (even: RoPE rotates pairs) */
    int64_t F;           /* SwiGLU hidden width; 0 = the multiple of 64 nearest 8D/3 */
    double rope_base;    /* RoPE theta */
    int post_norm;       /* 0: pre-norm (x + f(norm(x))), 1: post-norm (norm(x + f(x))) */
    int qk_norm;         /* RMSNorm over the whole q and k projections (OLMo2) */
    int tied;            /* LM head shares the embedding matrix */
    moda_depth_source depth;
    int64_t window;      /* depth window S: attend to the S most recent slots; -1 = all */
} moda_model_config;

/* Defaults: V 256, D 128, N 4, Hq 4, Hk 2, d 32, F auto, theta 10000, pre-norm, QK-norm on, untied,
 * depth attn+ffn, no window. */
moda_model_config moda_model_config_default(void);
/* Fills derived values (F when 0) and checks every option; a clear message on failure. */
moda_status moda_model_config_resolve(moda_model_config *c);
int64_t moda_model_slots_per_block(const moda_model_config *c);
int64_t moda_model_slots(const moda_model_config *c); /* Lcap = N * slots per block */
const char *moda_depth_source_name(moda_depth_source s);
/* "none", "attn", "attn+ffn", "attn+ffn+extra-attn" (also "extra"); -1 when unknown. */
int moda_depth_source_parse(const char *s);
/* One line: "V=256 D=128 N=4 Hq=4 Hk=2 d=32 F=320 rope=10000 pre-norm qk-norm untied depth=attn+ffn S=all" */
void moda_model_config_str(const moda_model_config *c, char *buf, size_t n);
int moda_model_config_equal(const moda_model_config *a, const moda_model_config *b);

/* ---------------------------------------------------------------------------------------------------------
 * Parameters: one flat array; each tensor is a named slice.
 * ------------------------------------------------------------------------------------------------------- */
typedef enum moda_param_kind {
    MP_WTE, MP_ATTN_NORM, MP_WQ, MP_WK, MP_WV, MP_QNORM, MP_KNORM, MP_WO, MP_FFN_NORM, MP_W1, MP_W3, MP_W2,
    MP_WKD, MP_WVD, MP_WKF, MP_WVF, MP_FINAL_NORM, MP_HEAD, MP_KIND_COUNT
} moda_param_kind;

typedef struct moda_param_info {
    moda_param_kind kind;
    int64_t block;         /* -1 for model-level tensors */
    int64_t offset, rows, cols; /* matrices are [rows, cols] row-major: y = x W with W [in, out] */
    int matrix;            /* weight decay applies */
} moda_param_info;

/* The tensor table of a (resolved) configuration: fills up to max entries (table may be NULL with max 0) and
 * returns the number of tensors; *total = the parameter count. */
int moda_model_param_table(const moda_model_config *c, moda_param_info *table, int max, int64_t *total);
const char *moda_param_kind_name(moda_param_kind k);

/* Block i's depth schedule: the slots its attention and FFN write (-1 none) and the slots [d0, d1) its
 * attention reads (the window applied; d0 == d1 when none). Shared by the CPU and GPU models. */
typedef struct moda_block_depth {
    int64_t slot_attn, slot_ffn, d0, d1;
} moda_block_depth;
moda_block_depth moda_model_block_depth(const moda_model_config *c, int64_t i);
/* The operator options of a block's attention (causal, sequence on, deterministic; the backward accumulates
 * into the depth-gradient buffer). */
moda_options moda_model_attn_options(int64_t d0, int64_t d1, int backward);

/* FLOPs of one training token (forward + backward, matrices x6 and attention at sequence length T) and the
 * bytes of the fp32 depth buffers (Kd, Vd and their gradients) of a micro-batch. */
double moda_model_flops_per_token(const moda_model_config *c, int64_t T);
int64_t moda_model_depth_bytes(const moda_model_config *c, int64_t B, int64_t T, size_t elem);

/* ---------------------------------------------------------------------------------------------------------
 * The model: parameters, gradients and activations of one micro-batch shape [B, T].
 * ------------------------------------------------------------------------------------------------------- */
typedef struct moda_model moda_model;

/* dtype MODA_F32 (the trainer) or MODA_F64 (the float64 twin used by the gradient tests). */
moda_status moda_model_create(moda_model **out, const moda_model_config *config, moda_dtype dtype, int64_t B,
                              int64_t T);
void moda_model_free(moda_model *m);
const moda_model_config *moda_model_get_config(const moda_model *m);
moda_dtype moda_model_dtype(const moda_model *m);
int64_t moda_model_batch(const moda_model *m);
int64_t moda_model_seq(const moda_model *m);
int64_t moda_model_num_params(const moda_model *m);
int moda_model_num_tensors(const moda_model *m);
const moda_param_info *moda_model_tensor(const moda_model *m, int i);
/* Flat parameter / gradient arrays, of the model's dtype. */
void *moda_model_params(moda_model *m);
void *moda_model_grads(moda_model *m);

/* Initialisation (docs/model_notes.md): matrices N(0, 0.02), the output projections Wo and W2 N(0, 0.02 /
 * sqrt(2N)), norm weights 1. Every tensor draws from its own stream seeded by (seed, kind, block), so a
 * tensor's values do not depend on which other tensors the configuration has. */
void moda_model_init(moda_model *m, uint64_t seed);

/* Mean cross-entropy of targets[B*T] given inputs[B*T] (row b is one sequence: targets are the inputs shifted
 * by one). With grads != 0 the gradients of every parameter are written (overwritten) to moda_model_grads().
 * Deterministic given the inputs, whatever the thread counts. Tokens outside [0, V) are rejected. */
moda_status moda_model_step(moda_model *m, const int32_t *inputs, const int32_t *targets, int grads,
                            double *loss);
/* Logits of the last position of row 0 for the first `len` tokens (1 <= len <= T); writes V doubles. */
moda_status moda_model_logits(moda_model *m, const int32_t *tokens, int64_t len, double *logits);

/* Introspection for tests: block i's buffers after a forward (pointers into the model's arena, model dtype).
 * x: block input [BT, D]; xout: block output [BT, D]; q [BT, Hq*d] after QK-norm and RoPE; k, v [BT, Hk*d]
 * with their row stride; a: attention output [BT, Hq*d]; kd/vd: the depth buffers [B, T, L, Hk, d]. */
typedef struct moda_block_view {
    const void *x, *xout, *q, *k, *v, *a, *kd, *vd;
    int64_t k_ld, v_ld;
    int64_t d0, d1;     /* the depth slots this block's attention read */
    int64_t slot_attn;  /* slot written at the attention (-1 none) */
    int64_t slot_ffn;   /* slot written at the FFN (-1 none) */
} moda_block_view;
moda_status moda_model_block_view(const moda_model *m, int64_t block, moda_block_view *view);

/* ---------------------------------------------------------------------------------------------------------
 * Optimiser: AdamW (beta1 0.9, beta2 0.95, eps 1e-8, weight decay on matrices only), linear warm-up then
 * cosine decay to 10 % of the peak, gradient clipping at global norm 1.0. fp32 state.
 * ------------------------------------------------------------------------------------------------------- */
typedef struct moda_adamw {
    double lr, beta1, beta2, eps, weight_decay, clip;
    int64_t warmup, total_steps;
    int64_t n;      /* parameters */
    float *m, *v;   /* moments */
    int64_t t;      /* updates done */
} moda_adamw;

moda_status moda_adamw_init(moda_adamw *opt, int64_t n, double lr, int64_t warmup, int64_t total_steps);
void moda_adamw_free(moda_adamw *opt);
double moda_lr_at(const moda_adamw *opt, int64_t step);
/* Clips the model's gradients, updates parameters; returns the gradient norm before clipping. */
double moda_adamw_update(moda_adamw *opt, moda_model *m);

/* ---------------------------------------------------------------------------------------------------------
 * Data: byte-level text or llm.c .bin shards; a held-out validation split.
 * ------------------------------------------------------------------------------------------------------- */
#define MODA_SHARD_MAGIC 20240520
#define MODA_SHARD_VERSION 1

/* Reads an llm.c shard: validates magic, version, token count against the file size. Tokens widened to
 * int32. */
moda_status moda_shard_read(const char *path, int32_t **tokens, int64_t *count);
moda_status moda_shard_write(const char *path, const int32_t *tokens, int64_t count);

typedef struct moda_data {
    int nfiles;            /* training sources (each a shard or a text file) */
    char **files;
    int text;              /* 1: byte-level text (vocab 256) */
    int builtin;           /* 1: the generated default corpus */
    int64_t *file_tokens;  /* training tokens per source (after the validation split) */
    int32_t *cur;          /* tokens of the current source */
    int64_t cur_count;
    int cur_file;          /* which source `cur` holds (-1 none) */
    int32_t *val;          /* validation tokens */
    int64_t val_count;
    int64_t max_token;
    uint64_t fingerprint;  /* hash of the training token stream (a resume must see the same data) */
    /* loader state */
    int64_t B, T;
    uint64_t seed;
    int64_t epoch;         /* completed passes over all sources */
    int file;              /* source being read */
    int64_t pos;           /* next entry of the shuffled window order of that source */
    int64_t *order;        /* shuffled window starts of the current source */
    int64_t nwin;
} moda_data;

/* paths: text files (byte-level) or .bin shards (all of one kind); NULL/0 paths = the built-in corpus.
 * val_path: an explicit validation source; otherwise shards named *_val* are the validation split, and when
 * there is none the last 10 % of the last source is held out (never trained on). */
moda_status moda_data_open(moda_data *dt, const char *const *paths, int npaths, const char *val_path);
void moda_data_close(moda_data *dt);
/* Sets the batch shape and shuffle seed and rewinds the loader. */
moda_status moda_data_start(moda_data *dt, int64_t B, int64_t T, uint64_t seed);
/* Next batch: inputs[B*T], targets[B*T]. Windows of T+1 tokens at stride T, in a seeded shuffled order per
 * source per epoch; sources in order. */
moda_status moda_data_next(moda_data *dt, int32_t *inputs, int32_t *targets);
/* Restores a loader position saved from (epoch, file, pos). */
moda_status moda_data_seek(moda_data *dt, int64_t epoch, int file, int64_t pos);
/* Number of validation batches of B windows of T+1 tokens, and batch i (sequential, non-overlapping windows;
 * 0 <= i < that number). */
int64_t moda_data_val_batches(const moda_data *dt, int64_t B, int64_t T);
void moda_data_val_batch(const moda_data *dt, int64_t i, int64_t B, int64_t T, int32_t *inputs,
                         int32_t *targets);

/* The built-in corpus: English-like text generated deterministically (about `bytes` bytes). */
char *moda_corpus_generate(int64_t bytes, uint64_t seed, int64_t *len);
#define MODA_CORPUS_BYTES 600000
#define MODA_CORPUS_SEED 20260323u

/* ---------------------------------------------------------------------------------------------------------
 * Trainer: model + optimiser + loader + step, checkpointed as one file.
 * ------------------------------------------------------------------------------------------------------- */
typedef struct moda_train_settings {
    int64_t steps, batch, seq, warmup;
    double lr;
    uint64_t seed;
} moda_train_settings;

typedef struct moda_gpu_model moda_gpu_model;

typedef struct moda_trainer {
    moda_model *model;      /* on the GPU: the host mirror of the parameters (checkpoints), B = T = 1 */
    moda_adamw opt;         /* on the GPU: hyper-parameters, t, and the host mirror of the moments */
    moda_data *data;        /* borrowed */
    moda_train_settings s;
    int64_t step;           /* steps done */
    uint64_t rng;           /* the run's RNG state (sampling, future dropout); checkpointed */
    int32_t *inputs, *targets;
    moda_gpu_model *gpu;    /* NULL: the CPU trainer */
} moda_trainer;

/* Where a trainer runs. micro_batch (GPU only): rows per forward/backward, the gradients of batch/micro_batch
 * of them accumulated before each update (0 = the whole batch). It changes memory, not the run: it is not
 * part of the checkpoint, and a run may resume on either device with any micro-batch.
 * attn_nondeterministic (GPU only; 0, the default, keeps runs reproducible): the attention backward in the
 * operator's non-deterministic mode (fp32 atomics in dQ; on sm_90 the wgmma backward), faster but not bitwise
 * repeatable. Like the device it is a runtime choice, not part of the checkpoint; the CPU ignores it (its
 * backward is deterministic in either mode). */
typedef struct moda_train_device {
    moda_device device;
    int64_t micro_batch;
    int attn_nondeterministic;
} moda_train_device;

moda_status moda_trainer_create(moda_trainer *tr, const moda_model_config *config, const moda_train_settings *s,
                                moda_data *data);
moda_status moda_trainer_create_on(moda_trainer *tr, const moda_model_config *config, const moda_train_settings *s,
                                   moda_data *data, const moda_train_device *dev);
/* GPU trainers: parameters and moments device -> host mirror (before a checkpoint) and back (after a load). */
moda_status moda_trainer_sync_host(const moda_trainer *tr);
moda_status moda_trainer_sync_device(moda_trainer *tr);
void moda_trainer_free(moda_trainer *tr);
/* One optimiser step on the next batch; loss and gradient norm out. */
moda_status moda_trainer_step(moda_trainer *tr, double *loss, double *grad_norm);
/* Mean validation loss over up to max_batches batches (0 = all). */
moda_status moda_trainer_eval(moda_trainer *tr, int64_t max_batches, double *loss);
moda_status moda_eval_model(moda_model *m, const moda_data *dt, int64_t max_batches, double *loss);

/* Checkpoint: magic, version, config, settings, step, parameters, AdamW moments, RNG, loader position,
 * data fingerprint, FNV-1a checksum. Written atomically (temp file, fflush, fsync, rename, fsync dir). */
moda_status moda_checkpoint_save(const moda_trainer *tr, const char *path);
/* Reads the header only: config and settings (to build a trainer before loading). */
moda_status moda_checkpoint_peek(const char *path, moda_model_config *config, moda_train_settings *s,
                                 int64_t *step);
/* Loads into a trainer built with the same config and settings; refuses corrupt, truncated or mismatched
 * files. */
moda_status moda_checkpoint_load(moda_trainer *tr, const char *path);
/* Loads only parameters into a model of the same config (eval / sample). */
moda_status moda_checkpoint_load_model(moda_model *m, const char *path);

/* Sampling: next token from logits with temperature and top-k (k <= 0: all). */
int32_t moda_sample_token(const double *logits, int64_t V, double temperature, int64_t top_k, uint64_t *rng);
uint64_t moda_rng_next(uint64_t *state);
double moda_rng_uniform(uint64_t *state);

/* ---------------------------------------------------------------------------------------------------------
 * The GPU backend (src/model/cuda, built with CUDA; without it every call fails with MODA_ERR_NOT_BUILT):
 * the same model, optimiser and parameter layout on one CUDA device, bf16 weights and activations for the
 * GEMMs with fp32 master weights, gradients and AdamW state (docs/model_notes.md, "GPU").
 * ------------------------------------------------------------------------------------------------------- */
enum { MODA_GPU_PHASE_GEMM, MODA_GPU_PHASE_ATTN_FWD, MODA_GPU_PHASE_ATTN_BWD, MODA_GPU_PHASE_ELEM,
       MODA_GPU_PHASE_OPT, MODA_GPU_PHASE_COPY, MODA_GPU_PHASES };

/* A model for micro-batches of micro_batch rows of T tokens, and batches of up to max_micro of them. Its
 * attention backward starts deterministic. */
moda_status moda_gpu_model_create(moda_gpu_model **out, const moda_model_config *config, int64_t micro_batch,
                                  int64_t T, int64_t max_micro);
/* The attention backward's mode from the next step on: 1 deterministic (bitwise repeatable, the default), 0 the
 * operator's faster non-deterministic mode. The workspace was sized for both at creation. */
moda_status moda_gpu_model_set_deterministic_attention(moda_gpu_model *g, int deterministic);
void moda_gpu_model_free(moda_gpu_model *g);
int64_t moda_gpu_model_micro_batch(const moda_gpu_model *g);
size_t moda_gpu_model_device_bytes(const moda_gpu_model *g);
/* fp32 parameters (and AdamW moments; NULL = zero) in the CPU model's flat layout, host <-> device. */
moda_status moda_gpu_model_set_state(moda_gpu_model *g, const float *params, const float *m, const float *v);
moda_status moda_gpu_model_get_state(moda_gpu_model *g, float *params, float *m, float *v);
moda_status moda_gpu_model_get_grads(moda_gpu_model *g, float *grads);
/* Mean loss of rows x T tokens (rows a multiple of the micro-batch); with grads, the gradients of that mean
 * (accumulated over the micro-batches) overwrite the device's gradient buffer. */
moda_status moda_gpu_model_loss(moda_gpu_model *g, const int32_t *in, const int32_t *tgt, int64_t rows, int grads,
                                double *loss);
/* Loss and gradients as above, then AdamW (opt's hyper-parameters, rate lr, update number t >= 1 for the bias
 * correction) with clipping; one host synchronisation at the end. A non-finite loss leaves the weights alone. */
moda_status moda_gpu_model_train_step(moda_gpu_model *g, const int32_t *in, const int32_t *tgt, int64_t rows,
                                      const moda_adamw *opt, double lr, int64_t t, double *loss, double *grad_norm);
/* Per-phase timing with CUDA events (costs a little); the report gives milliseconds per phase summed over the
 * profiled training steps and returns their number. */
moda_status moda_gpu_model_profile(moda_gpu_model *g, int on);
int64_t moda_gpu_model_profile_report(const moda_gpu_model *g, double ms[MODA_GPU_PHASES]);
const char *moda_gpu_phase_name(int phase);

/* A loss curve as PNG (train in blue, validation in red). */
moda_status moda_plot_losses(const char *path, const double *train_x, const double *train_y, int64_t ntrain,
                             const double *val_x, const double *val_y, int64_t nval);

#ifdef __cplusplus
}
#endif

#endif
