/* train.c - the model commands of `moda`: train, eval, sample, info, and the model half of `moda demo`. */
#include "commands.h"
#include "model.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---------------------------------------------------------------------------------------------------------
 * Options shared by the commands
 * ------------------------------------------------------------------------------------------------------- */
#define MAX_DATA 256

typedef struct opts {
    moda_model_config c;
    moda_train_settings s;
    unsigned set_config; /* which config options were given on the command line (bit per option) */
    unsigned set_train;
    const char *data[MAX_DATA];
    int ndata;
    const char *val, *out, *ckpt, *prompt;
    int resume;
    int64_t eval_every, eval_batches, log_every, ckpt_every, sample_tokens, top_k, threads, omp_threads, stop_after;
    double temperature;
    uint64_t sample_seed;
    int quiet;
    moda_train_device dev;   /* --device, --micro-batch, --deterministic-attention: where and how the run executes
                              * (not part of the checkpoint) */
    int64_t profile;         /* --profile N: time the last N steps per phase (GPU) */
} opts;

static void defaults(opts *o) {
    memset(o, 0, sizeof *o);
    o->c = moda_model_config_default();
    o->s.steps = 1000;
    o->s.batch = 8;
    o->s.seq = 128;
    o->s.warmup = 50;
    o->s.lr = 2e-3;
    o->s.seed = 1;
    o->out = "runs/moda";
    o->eval_every = 100;
    o->eval_batches = 20;
    o->log_every = 10;
    o->ckpt_every = 0;
    o->sample_tokens = 200;
    o->top_k = 40;
    o->temperature = 0.8;
    o->sample_seed = 1;
    o->prompt = "One day ";
}

static const char *const config_flags[] = {"--vocab", "--width", "--blocks", "--heads", "--kv-heads", "--head-dim",
                                           "--ffn", "--rope-base", "--norm", "--qk-norm", "--tied", "--depth",
                                           "--depth-window"};
static const char *const train_flags[] = {"--steps", "--batch", "--seq", "--lr", "--warmup", "--seed"};

static void usage_model(FILE *f) {
    fprintf(f,
            "model options (default in brackets):\n"
            "  --vocab V            vocabulary [256: bytes]\n"
            "  --width D            model width [128]\n"
            "  --blocks N           blocks [4]\n"
            "  --heads Hq           query heads [4]\n"
            "  --kv-heads Hk        key/value heads [2]\n"
            "  --head-dim d         head dim [32] (0: D/Hq)\n"
            "  --ffn F              SwiGLU hidden width [0: the multiple of 64 nearest 8D/3]\n"
            "  --rope-base X        RoPE theta [10000]\n"
            "  --norm pre|post      norm placement [pre]\n"
            "  --qk-norm on|off     RMSNorm on q and k [on]\n"
            "  --tied on|off        LM head tied to the embedding [off]\n"
            "  --depth SRC          depth sources none|attn|attn+ffn|attn+ffn+extra-attn [attn+ffn]\n"
            "  --depth-window S     attend only to the S most recent depth slots [all]\n");
}

static void usage_train(FILE *f) {
    fprintf(f,
            "usage: moda train [options]\n"
            "Trains a MoDA (or baseline, --depth none) language model on the CPU or one CUDA GPU.\n\n"
            "data:\n"
            "  --data PATH          a text file (byte-level) or an llm.c .bin shard; repeat for several\n"
            "                       [the built-in generated corpus]; shards named *_val* are the validation split\n"
            "  --val PATH           validation data [the last 10%% of the last file]\n"
            "training:\n"
            "  --steps N [1000]  --batch B [8]  --seq T [128]  --lr X [2e-3]  --warmup N [50]  --seed S [1]\n"
            "  --device cpu|cuda    where to train [cpu]; a checkpoint from either resumes on either\n"
            "  --micro-batch b      rows per forward/backward on cuda; gradients of batch/b of them are\n"
            "                       accumulated per update [the whole batch]\n"
            "  --deterministic-attention on|off\n"
            "                       cuda: off runs the attention backward in the operator's faster\n"
            "                       non-deterministic mode (not bitwise repeatable); the CPU ignores it [on]\n"
            "  --profile N          cuda: per-phase timing (GEMMs, attention, elementwise, optimizer) of the\n"
            "                       last N steps, and the throughput and MFU of the steps before them\n"
            "  --threads N          BLAS threads [OpenBLAS default: all cores]\n"
            "  --omp-threads N      threads of the other kernels and the attention operator [1, or OMP_NUM_THREADS]\n"
            "run:\n"
            "  --out DIR            checkpoint ckpt.bin, log.jsonl, loss.png [runs/moda]; none: no files\n"
            "  --resume             continue the run in --out from its checkpoint\n"
            "  --eval-every N [100]  --eval-batches N [20]  --log-every N [10]  --ckpt-every N [eval-every]\n"
            "  --stop-after N       checkpoint and stop after N steps of this invocation (continue with --resume)\n\n");
    usage_model(f);
}

static int parse_onoff(const char *v, int *out) {
    if (!strcmp(v, "on") || !strcmp(v, "1") || !strcmp(v, "yes")) *out = 1;
    else if (!strcmp(v, "off") || !strcmp(v, "0") || !strcmp(v, "no")) *out = 0;
    else return 0;
    return 1;
}

static int parse_i64(const char *v, int64_t *out) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || end == v || *end) return 0;
    *out = x;
    return 1;
}

static int parse_f64(const char *v, double *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end) return 0;
    *out = x;
    return 1;
}

/* Returns 0 ok, 1 --help, 2 usage error (message printed). */
static int parse(int argc, char **argv, opts *o, const char *cmd) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return 1;
        if (!strcmp(a, "--resume")) {
            o->resume = 1;
            continue;
        }
        if (!strcmp(a, "--quiet")) {
            o->quiet = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "moda %s: %s needs a value (or is unknown; see --help)\n", cmd, a);
            return 2;
        }
        const char *v = argv[++i];
        int ok = 1, k;
        int64_t n = 0;
        if (!strcmp(a, "--vocab")) ok = parse_i64(v, &o->c.V);
        else if (!strcmp(a, "--width")) ok = parse_i64(v, &o->c.D);
        else if (!strcmp(a, "--blocks")) ok = parse_i64(v, &o->c.N);
        else if (!strcmp(a, "--heads")) ok = parse_i64(v, &o->c.Hq);
        else if (!strcmp(a, "--kv-heads")) ok = parse_i64(v, &o->c.Hk);
        else if (!strcmp(a, "--head-dim")) ok = parse_i64(v, &o->c.d);
        else if (!strcmp(a, "--ffn")) ok = parse_i64(v, &o->c.F);
        else if (!strcmp(a, "--rope-base")) ok = parse_f64(v, &o->c.rope_base);
        else if (!strcmp(a, "--norm")) {
            ok = !strcmp(v, "pre") || !strcmp(v, "post");
            o->c.post_norm = !strcmp(v, "post");
        } else if (!strcmp(a, "--qk-norm")) ok = parse_onoff(v, &o->c.qk_norm);
        else if (!strcmp(a, "--tied")) ok = parse_onoff(v, &o->c.tied);
        else if (!strcmp(a, "--depth")) {
            k = moda_depth_source_parse(v);
            ok = k >= 0;
            o->c.depth = (moda_depth_source)k;
        } else if (!strcmp(a, "--depth-window")) {
            if (!strcmp(v, "all")) o->c.window = -1;
            else ok = parse_i64(v, &o->c.window);
        } else if (!strcmp(a, "--steps")) ok = parse_i64(v, &o->s.steps);
        else if (!strcmp(a, "--batch")) ok = parse_i64(v, &o->s.batch);
        else if (!strcmp(a, "--seq")) ok = parse_i64(v, &o->s.seq);
        else if (!strcmp(a, "--lr")) ok = parse_f64(v, &o->s.lr);
        else if (!strcmp(a, "--warmup")) ok = parse_i64(v, &o->s.warmup);
        else if (!strcmp(a, "--seed")) {
            ok = parse_i64(v, &n);
            o->s.seed = (uint64_t)n;
        } else if (!strcmp(a, "--data")) {
            if (o->ndata >= MAX_DATA) {
                fprintf(stderr, "moda %s: at most %d --data files\n", cmd, MAX_DATA);
                return 2;
            }
            o->data[o->ndata++] = v;
        } else if (!strcmp(a, "--val")) o->val = v;
        else if (!strcmp(a, "--out")) o->out = strcmp(v, "none") ? v : NULL; /* none: no files (benchmarks) */
        else if (!strcmp(a, "--ckpt")) o->ckpt = v;
        else if (!strcmp(a, "--eval-every")) ok = parse_i64(v, &o->eval_every);
        else if (!strcmp(a, "--eval-batches")) ok = parse_i64(v, &o->eval_batches);
        else if (!strcmp(a, "--log-every")) ok = parse_i64(v, &o->log_every);
        else if (!strcmp(a, "--ckpt-every")) ok = parse_i64(v, &o->ckpt_every);
        else if (!strcmp(a, "--threads")) ok = parse_i64(v, &o->threads);
        else if (!strcmp(a, "--device")) {
            ok = !strcmp(v, "cpu") || !strcmp(v, "cuda");
            o->dev.device = !strcmp(v, "cuda") ? MODA_CUDA : MODA_CPU;
        } else if (!strcmp(a, "--micro-batch")) ok = parse_i64(v, &o->dev.micro_batch) && o->dev.micro_batch >= 0;
        else if (!strcmp(a, "--deterministic-attention")) {
            int det = 1;
            ok = parse_onoff(v, &det);
            o->dev.attn_nondeterministic = !det;
        }
        else if (!strcmp(a, "--profile")) ok = parse_i64(v, &o->profile) && o->profile >= 0;
        else if (!strcmp(a, "--omp-threads")) ok = parse_i64(v, &o->omp_threads);
        else if (!strcmp(a, "--stop-after")) ok = parse_i64(v, &o->stop_after);
        else if (!strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "--tokens")) ok = parse_i64(v, &o->sample_tokens);
        else if (!strcmp(a, "--temperature")) ok = parse_f64(v, &o->temperature);
        else if (!strcmp(a, "--top-k")) ok = parse_i64(v, &o->top_k);
        else if (!strcmp(a, "--sample-seed")) {
            ok = parse_i64(v, &n);
            o->sample_seed = (uint64_t)n;
        } else {
            fprintf(stderr, "moda %s: unknown option %s (see --help)\n", cmd, a);
            return 2;
        }
        if (!ok) {
            fprintf(stderr, "moda %s: bad value '%s' for %s\n", cmd, v, a);
            return 2;
        }
        for (unsigned j = 0; j < sizeof config_flags / sizeof *config_flags; j++)
            if (!strcmp(a, config_flags[j])) o->set_config |= 1u << j;
        for (unsigned j = 0; j < sizeof train_flags / sizeof *train_flags; j++)
            if (!strcmp(a, train_flags[j])) o->set_train |= 1u << j;
    }
    /* Threads: the GEMMs (OpenBLAS's own pool) get the cores; the OpenMP loops (norms, RoPE, SwiGLU, the
     * attention operator) run on one thread unless asked. Both pools busy-waiting on the same few cores was
     * 5x slower than this split on 2 cores (docs/model_notes.md); results do not depend on either count. */
    if (o->threads > 0) openblas_set_num_threads((int)o->threads);
    if (o->omp_threads > 0) omp_set_num_threads((int)o->omp_threads);
    else if (!getenv("OMP_NUM_THREADS")) omp_set_num_threads(1);
    return 0;
}

static int fail(const char *cmd, const char *what) {
    fprintf(stderr, "moda %s: %s: %s\n", cmd, what, moda_model_error());
    return 1;
}

static void fmt_time(double s, char *buf, size_t n) {
    if (s < 0 || !isfinite(s)) s = 0;
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ldh%02ldm", t / 3600, (t / 60) % 60);
    else snprintf(buf, n, "%ldm%02lds", t / 60, t % 60);
}

/* bits per byte for byte-level data; for tokenised shards the loss per token in bits */
static double bits(double nats) { return nats / log(2.0); }

/* ---------------------------------------------------------------------------------------------------------
 * One training run (train and demo)
 * ------------------------------------------------------------------------------------------------------- */
typedef struct curve {
    double *x, *y;
    int64_t n, cap;
} curve;

static void curve_add(curve *c, double x, double y) {
    if (c->n == c->cap) {
        int64_t cap = c->cap ? 2 * c->cap : 256;
        double *nx = realloc(c->x, (size_t)cap * sizeof(double)), *ny = nx ? realloc(c->y, (size_t)cap * sizeof(double)) : NULL;
        if (!nx || !ny) {
            if (nx) c->x = nx;
            return;
        }
        c->x = nx;
        c->y = ny;
        c->cap = cap;
    }
    c->x[c->n] = x;
    c->y[c->n] = y;
    c->n++;
}

static void curve_free(curve *c) {
    free(c->x);
    free(c->y);
    memset(c, 0, sizeof *c);
}

/* Reads back a run's log (on --resume) so that the loss curve covers the whole run. */
static void read_log(const char *path, int64_t upto, curve *tr, curve *va) {
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        long long step;
        double v;
        const char *s = strstr(line, "\"step\":");
        if (!s || sscanf(s + 7, "%lld", &step) != 1 || step > upto) continue;
        const char *l = strstr(line, "\"loss\":"), *vl = strstr(line, "\"val_loss\":");
        if (l && sscanf(l + 7, "%lf", &v) == 1) curve_add(tr, (double)step, v);
        if (vl && sscanf(vl + 11, "%lf", &v) == 1) curve_add(va, (double)step, v);
    }
    fclose(f);
}

typedef struct run_result {
    double val_loss;
    double seconds;
    double tokens_per_s;
} run_result;

static int ensure_dir(const char *dir) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", dir);
    for (char *p = tmp + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir(tmp, 0755);
            *p = '/';
        }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return 0;
    return 1;
}

/* Trains per o (resuming when asked); files go to o->out unless it is NULL. label prefixes progress lines. */
static int run_training(const char *cmd, opts *o, moda_data *data, const char *label, moda_trainer *tr,
                        run_result *res) {
    char path[4096], logp[4096], pngp[4096];
    moda_status st;
    int64_t start_step = 0;
    if (o->out) {
        if (!ensure_dir(o->out)) {
            fprintf(stderr, "moda %s: cannot create %s: %s\n", cmd, o->out, strerror(errno));
            return 1;
        }
        snprintf(path, sizeof path, "%s/ckpt.bin", o->out);
        snprintf(logp, sizeof logp, "%s/log.jsonl", o->out);
        snprintf(pngp, sizeof pngp, "%s/loss.png", o->out);
    }
    if (o->resume) {
        moda_model_config cc;
        moda_train_settings cs;
        if (moda_checkpoint_peek(path, &cc, &cs, &start_step) != MODA_OK) return fail(cmd, "cannot resume");
        /* the checkpoint defines the run; an explicit flag that disagrees is a mistake, not an override */
        moda_model_config want = o->c;
        moda_model_config_resolve(&want);
        const int64_t cv[] = {cc.V, cc.D, cc.N, cc.Hq, cc.Hk, cc.d, cc.F, (int64_t)cc.rope_base, cc.post_norm,
                              cc.qk_norm, cc.tied, cc.depth, cc.window};
        const int64_t wv[] = {want.V, want.D, want.N, want.Hq, want.Hk, want.d, want.F, (int64_t)want.rope_base,
                              want.post_norm, want.qk_norm, want.tied, want.depth, want.window};
        for (unsigned j = 0; j < sizeof cv / sizeof *cv; j++)
            if ((o->set_config >> j & 1) && cv[j] != wv[j]) {
                fprintf(stderr, "moda %s: %s was trained with %s %lld, not %lld; drop the flag to resume it\n", cmd,
                        path, config_flags[j], (long long)cv[j], (long long)wv[j]);
                return 2;
            }
        const double tv[] = {(double)cs.steps, (double)cs.batch, (double)cs.seq, cs.lr, (double)cs.warmup, (double)cs.seed};
        const double ov[] = {(double)o->s.steps, (double)o->s.batch, (double)o->s.seq, o->s.lr, (double)o->s.warmup,
                             (double)o->s.seed};
        for (unsigned j = 0; j < sizeof tv / sizeof *tv; j++)
            if ((o->set_train >> j & 1) && tv[j] != ov[j]) {
                fprintf(stderr, "moda %s: %s was trained with %s %g, not %g; drop the flag to resume it\n", cmd, path,
                        train_flags[j], tv[j], ov[j]);
                return 2;
            }
        o->c = cc;
        o->s = cs;
    }
    if ((st = moda_trainer_create_on(tr, &o->c, &o->s, data, &o->dev)) != MODA_OK) return fail(cmd, "cannot set up training");
    if (o->resume) {
        if (moda_checkpoint_load(tr, path) != MODA_OK) {
            moda_trainer_free(tr);
            return fail(cmd, "cannot resume");
        }
    }
    const moda_model_config *c = moda_model_get_config(tr->model);
    char cstr[512];
    moda_model_config_str(c, cstr, sizeof cstr);
    /* Kd, Vd and their gradients: fp32 on the CPU; on the GPU bf16 Kd, Vd and fp32 gradients per micro-batch */
    const int64_t depth_bytes = tr->gpu ? moda_model_depth_bytes(c, moda_gpu_model_micro_batch(tr->gpu), o->s.seq, 3)
                                        : moda_model_depth_bytes(c, o->s.batch, o->s.seq, sizeof(float));
    if (!o->quiet) {
        printf("%s%s\n%s%lld parameters, %.1f MFLOP/token, depth buffer %.1f MB; %lld steps of %lld x %lld tokens%s\n",
               label, cstr, label, (long long)moda_model_num_params(tr->model),
               moda_model_flops_per_token(c, o->s.seq) / 1e6,
               (double)depth_bytes / 1e6, (long long)o->s.steps, (long long)o->s.batch, (long long)o->s.seq,
               o->resume ? " (resumed)" : "");
        if (tr->gpu)
            printf("%son cuda: micro-batches of %lld rows, %.2f GB of device memory, %s attention backward\n", label,
                   (long long)moda_gpu_model_micro_batch(tr->gpu), (double)moda_gpu_model_device_bytes(tr->gpu) / 1e9,
                   o->dev.attn_nondeterministic ? "non-deterministic" : "deterministic");
        if (o->resume) printf("%sresuming at step %lld\n", label, (long long)tr->step);
        fflush(stdout);
    }
    curve tc = {0}, vc = {0};
    FILE *log = NULL;
    if (o->out) {
        if (o->resume) read_log(logp, tr->step, &tc, &vc);
        log = fopen(logp, o->resume ? "a" : "w");
        if (!log) {
            fprintf(stderr, "moda %s: cannot write %s: %s\n", cmd, logp, strerror(errno));
            moda_trainer_free(tr);
            return 1;
        }
        if (!o->resume)
            fprintf(log, "{\"config\":\"%s\",\"params\":%lld,\"steps\":%lld,\"batch\":%lld,\"seq\":%lld,\"lr\":%g,\"warmup\":%lld,\"seed\":%llu}\n",
                    cstr, (long long)moda_model_num_params(tr->model), (long long)o->s.steps, (long long)o->s.batch,
                    (long long)o->s.seq, o->s.lr, (long long)o->s.warmup, (unsigned long long)o->s.seed);
    }
    const int64_t ckpt_every = o->ckpt_every > 0 ? o->ckpt_every : o->eval_every;
    const double t0 = now_s();
    double tw = t0, last_val = NAN;
    int64_t tw_step = tr->step;
    int rc = 0;
    /* throughput of the steady state: steps after the first 3 (cuBLASLt plans, caches) and before profiling */
    const int64_t prof_from = o->profile > 0 && tr->gpu ? o->s.steps - o->profile : o->s.steps;
    double ts0 = 0, ts1 = 0;
    int64_t ts_steps = 0;
    while (tr->step < o->s.steps) {
        double loss, gn;
        double lr = moda_lr_at(&tr->opt, tr->step);
        if (tr->gpu && tr->step == prof_from && moda_gpu_model_profile(tr->gpu, 1) != MODA_OK) {
            rc = fail(cmd, "cannot profile");
            break;
        }
        const double tb = now_s();
        if ((st = moda_trainer_step(tr, &loss, &gn)) != MODA_OK) {
            rc = fail(cmd, "training step failed");
            break;
        }
        if (tr->step > start_step + 3 && tr->step <= prof_from) {
            if (!ts_steps) ts0 = tb;
            ts1 = now_s();
            ts_steps++;
        }
        curve_add(&tc, (double)tr->step, loss);
        int last = tr->step == o->s.steps;
        int stop = o->stop_after > 0 && tr->step - start_step >= o->stop_after;
        if (log)
            fprintf(log, "{\"step\":%lld,\"loss\":%.6f,\"lr\":%.6g,\"grad_norm\":%.4f}\n", (long long)tr->step, loss, lr, gn);
        if ((o->log_every > 0 && tr->step % o->log_every == 0) || last) {
            double t = now_s();
            double tps = (double)((tr->step - tw_step) * o->s.batch * o->s.seq) / (t - tw > 1e-9 ? t - tw : 1e-9);
            double eta = (double)(o->s.steps - tr->step) * (t - t0) / (double)(tr->step - start_step);
            char es[32];
            fmt_time(eta, es, sizeof es);
            if (!o->quiet)
                printf("%sstep %5lld/%lld | loss %.4f | lr %.2e | grad norm %.3f | %7.0f tok/s | ETA %s\n", label,
                       (long long)tr->step, (long long)o->s.steps, loss, lr, gn, tps, es);
            fflush(stdout);
            tw = t;
            tw_step = tr->step;
        }
        if ((o->eval_every > 0 && tr->step % o->eval_every == 0) || last) {
            if (moda_trainer_eval(tr, o->eval_batches, &last_val) != MODA_OK) {
                rc = fail(cmd, "validation failed");
                break;
            }
            curve_add(&vc, (double)tr->step, last_val);
            if (!o->quiet) {
                printf("%s  validation loss %.4f (%.3f bits per %s)\n", label, last_val, bits(last_val),
                       data->text ? "byte" : "token");
                fflush(stdout);
            }
            if (log) {
                fprintf(log, "{\"step\":%lld,\"val_loss\":%.6f,\"val_bits\":%.6f}\n", (long long)tr->step, last_val,
                        bits(last_val));
                fflush(log);
            }
            if (o->out) moda_plot_losses(pngp, tc.x, tc.y, tc.n, vc.x, vc.y, vc.n);
        }
        if (o->out && ((ckpt_every > 0 && tr->step % ckpt_every == 0) || last || stop)) {
            if (log) fflush(log);
            if (moda_checkpoint_save(tr, path) != MODA_OK) {
                rc = fail(cmd, "cannot write the checkpoint");
                break;
            }
        }
        if (stop && !last) {
            if (!o->quiet) printf("%sstopped at step %lld; continue with --resume --out %s\n", label, (long long)tr->step,
                                  o->out ? o->out : "DIR");
            break;
        }
    }
    const double secs = now_s() - t0;
    if (rc == 0 && !o->quiet && ts_steps > 0) {
        const double tps = (double)(ts_steps * o->s.batch * o->s.seq) / (ts1 - ts0);
        const double fpt = moda_model_flops_per_token(c, o->s.seq);
        printf("%sthroughput %.0f tok/s over %lld steps (after 3 warm-up steps)", label, tps, (long long)ts_steps);
        if (tr->gpu) printf(", MFU %.1f%% (%.1f MFLOP/token against 798 TFLOP/s)", 100.0 * tps * fpt / 798e12, fpt / 1e6);
        printf("\n");
    }
    if (rc == 0 && tr->gpu && o->profile > 0 && !o->quiet) {
        double ms[MODA_GPU_PHASES], tot = 0;
        int64_t n = moda_gpu_model_profile_report(tr->gpu, ms);
        for (int k = 0; k < MODA_GPU_PHASES; k++) tot += ms[k];
        if (n > 0) {
            printf("%sprofile of %lld steps (ms per step):", label, (long long)n);
            for (int k = 0; k < MODA_GPU_PHASES; k++)
                printf(" %s %.2f (%.0f%%)%s", moda_gpu_phase_name(k), ms[k] / (double)n, tot > 0 ? 100.0 * ms[k] / tot : 0.0,
                       k + 1 < MODA_GPU_PHASES ? "," : "");
            printf("; total %.2f\n", tot / (double)n);
        }
    }
    if (log) fclose(log);
    curve_free(&tc);
    curve_free(&vc);
    if (rc == 0 && o->out && !o->quiet) printf("%swrote %s, %s, %s\n", label, path, logp, pngp);
    if (res) {
        res->val_loss = last_val;
        res->seconds = secs;
        res->tokens_per_s = (double)((o->s.steps - start_step) * o->s.batch * o->s.seq) / (secs > 0 ? secs : 1);
    }
    if (rc) moda_trainer_free(tr);
    return rc;
}

int moda_cmd_train(int argc, char **argv) {
    opts o;
    defaults(&o);
    int p = parse(argc, argv, &o, "train");
    if (p == 1) {
        usage_train(stdout);
        return 0;
    }
    if (p) return p;
    moda_data data;
    if (moda_data_open(&data, o.data, o.ndata, o.val) != MODA_OK) return fail("train", "cannot read the data");
    if (!(o.set_config & 1) && !data.text && !o.resume) o.c.V = 50257; /* llm.c's shards are GPT-2 tokens */
    moda_trainer tr;
    int rc = run_training("train", &o, &data, "", &tr, NULL);
    if (rc == 0) moda_trainer_free(&tr);
    moda_data_close(&data);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------
 * eval, sample, info
 * ------------------------------------------------------------------------------------------------------- */
/* The model of --ckpt FILE (or --out DIR's ckpt.bin) with B rows (0: the run's batch) of the run's T. */
static int load_model(const char *cmd, const opts *o, int64_t B, moda_model **m, moda_model_config *c,
                      moda_train_settings *s, int64_t *step) {
    char buf[4096];
    const char *path = o->ckpt;
    if (!path) {
        snprintf(buf, sizeof buf, "%s/ckpt.bin", o->out);
        path = buf;
    }
    *m = NULL;
    if (moda_checkpoint_peek(path, c, s, step) != MODA_OK) return fail(cmd, "cannot read the checkpoint");
    if (moda_model_create(m, c, MODA_F32, B ? B : s->batch, s->seq) != MODA_OK ||
        moda_checkpoint_load_model(*m, path) != MODA_OK) {
        moda_model_free(*m);
        *m = NULL;
        return fail(cmd, "cannot load the model");
    }
    return 0;
}

int moda_cmd_eval(int argc, char **argv) {
    opts o;
    defaults(&o);
    int p = parse(argc, argv, &o, "eval");
    if (p == 1) {
        printf("usage: moda eval [--ckpt FILE | --out DIR] [--data PATH]... [--val PATH] [--eval-batches N]\n"
               "Validation loss and bits per byte (per token for shards) of a checkpoint, on the held-out split of\n"
               "the data it was trained on (the same --data; default: the built-in corpus). --eval-batches 0: all.\n");
        return 0;
    }
    if (p) return p;
    moda_model_config c;
    moda_train_settings s;
    int64_t step;
    moda_model *m;
    if (load_model("eval", &o, 0, &m, &c, &s, &step)) return 1;
    moda_data data;
    if (moda_data_open(&data, o.data, o.ndata, o.val) != MODA_OK) {
        moda_model_free(m);
        return fail("eval", "cannot read the data");
    }
    int rc = 0;
    double loss = 0;
    if (moda_eval_model(m, &data, o.eval_batches != 20 ? o.eval_batches : 0, &loss) != MODA_OK) {
        rc = fail("eval", "evaluation failed");
    } else {
        char cs[512];
        moda_model_config_str(&c, cs, sizeof cs);
        printf("%s\nstep %lld: validation loss %.4f nats, %.4f bits per %s (%lld validation tokens)\n", cs,
               (long long)step, loss, bits(loss), data.text ? "byte" : "token", (long long)data.val_count);
    }
    moda_model_free(m);
    moda_data_close(&data);
    return rc;
}

/* Generates n tokens after the prompt into out (a byte string when V = 256); the context slides over the
 * model's T positions. */
static int generate(moda_model *m, const char *prompt, int64_t n, double temperature, int64_t top_k, uint64_t seed,
                    char *out, size_t outcap) {
    const int64_t T = moda_model_seq(m), V = moda_model_get_config(m)->V;
    int64_t plen = (int64_t)strlen(prompt);
    int32_t *ctx = malloc((size_t)(plen + n + 1) * sizeof(int32_t));
    double *logits = malloc((size_t)V * sizeof(double));
    if (!ctx || !logits) {
        free(ctx);
        free(logits);
        return 0;
    }
    int64_t len = 0;
    for (int64_t i = 0; i < plen; i++) ctx[len++] = (unsigned char)prompt[i] % (int32_t)V;
    if (len == 0) ctx[len++] = '\n' % (int32_t)V;
    size_t w = 0;
    out[0] = 0;
    uint64_t rng = seed;
    int ok = 1;
    for (int64_t k = 0; k < n; k++) {
        int64_t start = len > T ? len - T : 0;
        if (moda_model_logits(m, ctx + start, len - start, logits) != MODA_OK) {
            ok = 0;
            break;
        }
        int32_t t = moda_sample_token(logits, V, temperature, top_k, &rng);
        ctx[len++] = t;
        if (V == 256) {
            if (w + 1 < outcap) out[w++] = (char)t;
        } else {
            w += (size_t)snprintf(out + w, w < outcap ? outcap - w : 0, "%d ", t);
            if (w >= outcap) w = outcap - 1;
        }
        out[w] = 0;
    }
    free(ctx);
    free(logits);
    return ok;
}

int moda_cmd_sample(int argc, char **argv) {
    opts o;
    defaults(&o);
    int p = parse(argc, argv, &o, "sample");
    if (p == 1) {
        printf("usage: moda sample [--ckpt FILE | --out DIR] [--prompt TEXT] [--tokens N] [--temperature X]\n"
               "                   [--top-k K] [--sample-seed S]\n"
               "Generates text from a checkpoint (bytes for vocab 256, token ids otherwise). Temperature 0: greedy.\n"
               "Defaults: prompt \"One day \", 200 tokens, temperature 0.8, top-k 40, seed 1.\n");
        return 0;
    }
    if (p) return p;
    if (o.sample_tokens < 1 || o.sample_tokens > 100000) {
        fprintf(stderr, "moda sample: --tokens must be in [1, 100000]\n");
        return 2;
    }
    moda_model_config c;
    moda_train_settings s;
    int64_t step;
    moda_model *m;
    if (load_model("sample", &o, 1, &m, &c, &s, &step)) return 1;
    size_t cap = (size_t)o.sample_tokens * 8 + 16;
    char *text = malloc(cap);
    int ok = text && generate(m, o.prompt, o.sample_tokens, o.temperature, o.top_k, o.sample_seed, text, cap);
    if (ok) printf("%s%s\n", c.V == 256 ? o.prompt : "", text);
    else fail("sample", "generation failed");
    free(text);
    moda_model_free(m);
    return ok ? 0 : 1;
}

int moda_cmd_info(int argc, char **argv) {
    opts o;
    defaults(&o);
    int p = parse(argc, argv, &o, "info");
    if (p == 1) {
        printf("usage: moda info [model options] [--batch B] [--seq T] [--ckpt FILE]\n"
               "Parameter count, FLOPs per token and depth-buffer memory of a configuration (or a checkpoint's).\n\n");
        usage_model(stdout);
        return 0;
    }
    if (p) return p;
    moda_model_config c = o.c;
    if (o.ckpt) {
        moda_train_settings s;
        if (moda_checkpoint_peek(o.ckpt, &c, &s, NULL) != MODA_OK) return fail("info", "cannot read the checkpoint");
        if (!(o.set_train & 2)) o.s.batch = s.batch;
        if (!(o.set_train & 4)) o.s.seq = s.seq;
    }
    if (moda_model_config_resolve(&c) != MODA_OK) return fail("info", "invalid configuration");
    int64_t total = 0, per_kind[MP_KIND_COUNT] = {0};
    int n = moda_model_param_table(&c, NULL, 0, &total);
    moda_param_info *tab = malloc((size_t)n * sizeof *tab);
    if (!tab) {
        fprintf(stderr, "moda info: out of memory\n");
        return 1;
    }
    moda_model_param_table(&c, tab, n, NULL);
    for (int i = 0; i < n; i++) per_kind[tab[i].kind] += tab[i].rows * tab[i].cols;
    free(tab);
    char cs[512];
    moda_model_config_str(&c, cs, sizeof cs);
    const int64_t B = o.s.batch, T = o.s.seq, L = moda_model_slots(&c);
    printf("%s\n", cs);
    printf("parameters          %lld (%.2f M)\n", (long long)total, (double)total / 1e6);
    for (int k = 0; k < MP_KIND_COUNT; k++)
        if (per_kind[k]) printf("  %-17s %lld\n", moda_param_kind_name((moda_param_kind)k), (long long)per_kind[k]);
    printf("FLOPs per token     %.3f M (training: forward + backward, at T = %lld)\n",
           moda_model_flops_per_token(&c, T) / 1e6, (long long)T);
    printf("depth slots         %lld per token (%lld per block); block i reads %s\n", (long long)L,
           (long long)moda_model_slots_per_block(&c), c.window >= 0 ? "the S most recent" : "all earlier ones");
    printf("depth buffer        %.2f MB in fp32 at B = %lld, T = %lld (Kd, Vd and their gradients; %.2f MB in bf16)\n",
           (double)moda_model_depth_bytes(&c, B, T, 4) / 1e6, (long long)B, (long long)T,
           (double)moda_model_depth_bytes(&c, B, T, 2) / 1e6);
    printf("depth per token     %lld bytes forward in bf16 (read by the last block: %lld slots)\n",
           (long long)(2 * (c.N - 1) * moda_model_slots_per_block(&c) * c.Hk * c.d * 2),
           (long long)((c.N - 1) * moda_model_slots_per_block(&c)));
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * The model half of `moda demo`: a baseline and a MoDA model, same data, same seed, same everything else.
 * ------------------------------------------------------------------------------------------------------- */
int moda_demo_models(int argc, char **argv) {
    opts o;
    defaults(&o);
    /* small enough for a couple of minutes on 2 cores, big enough to learn the corpus's words and facts */
    o.c.D = 128;
    o.c.N = 4;
    o.c.Hq = 4;
    o.c.Hk = 2;
    o.c.d = 32;
    o.s.steps = 300;
    o.s.batch = 8;
    o.s.seq = 128;
    o.s.lr = 3e-3;
    o.s.warmup = 30;
    o.eval_every = 100;
    o.eval_batches = 16;
    o.log_every = 50;
    o.out = NULL;
    int p = parse(argc, argv, &o, "demo");
    if (p == 1) {
        printf("usage: moda demo [--data FILE] [--steps N] [--out DIR] [model options]\n");
        return 0;
    }
    if (p) return p;
    moda_data data;
    if (moda_data_open(&data, o.data, o.ndata, o.val) != MODA_OK) return fail("demo", "cannot read the data");
    printf("data: %s, %lld training and %lld validation tokens\n",
           data.builtin ? "the built-in generated corpus" : data.files[0], (long long)data.file_tokens[0],
           (long long)data.val_count);
    const char *labels[2] = {"[baseline] ", "[moda]     "};
    const moda_depth_source src[2] = {MODA_DEPTH_SRC_NONE, (o.set_config >> 11 & 1) ? o.c.depth : MODA_DEPTH_SRC_ATTN_FFN};
    run_result res[2];
    char *samples[2] = {NULL, NULL};
    const char *out_root = o.out;
    int rc = 0;
    for (int k = 0; k < 2 && rc == 0; k++) {
        opts run = o;
        run.c.depth = src[k];
        if (src[k] == MODA_DEPTH_SRC_NONE) run.c.window = -1;
        char dir[4096];
        if (out_root) {
            snprintf(dir, sizeof dir, "%s/%s", out_root, k ? "moda" : "baseline");
            run.out = dir;
        }
        moda_trainer tr;
        rc = run_training("demo", &run, &data, labels[k], &tr, &res[k]);
        if (rc) break;
        moda_model *m = NULL;
        size_t cap = 4096;
        samples[k] = malloc(cap);
        if (moda_model_create(&m, &run.c, MODA_F32, 1, run.s.seq) == MODA_OK && samples[k]) {
            memcpy(moda_model_params(m), moda_model_params(tr.model), (size_t)moda_model_num_params(m) * sizeof(float));
            if (!generate(m, o.prompt, 240, o.temperature, o.top_k, o.sample_seed, samples[k], cap)) samples[k][0] = 0;
        }
        moda_model_free(m);
        moda_trainer_free(&tr);
    }
    if (rc == 0) {
        printf("\n%-12s %-24s %10s %10s %10s %9s\n", "model", "depth sources", "val loss", "bits/byte", "tok/s", "time");
        for (int k = 0; k < 2; k++)
            printf("%-12s %-24s %10.4f %10.4f %10.0f %8.1fs\n", k ? "moda" : "baseline", moda_depth_source_name(src[k]),
                   res[k].val_loss, bits(res[k].val_loss), res[k].tokens_per_s, res[k].seconds);
        printf("difference (moda - baseline): %+.4f nats. One seed per arm on an easy toy corpus: not evidence\n"
               "either way (a claim needs two seeds per arm and a spread smaller than the gap; docs/model.md).\n",
               res[1].val_loss - res[0].val_loss);
        for (int k = 0; k < 2; k++)
            if (samples[k]) {
                printf("\n--- sample from the %s model (temperature %.1f, top-k %lld) ---\n%s%s\n", k ? "MoDA" : "baseline",
                       o.temperature, (long long)o.top_k, o.prompt, samples[k]);
            }
    }
    free(samples[0]);
    free(samples[1]);
    moda_data_close(&data);
    return rc;
}
