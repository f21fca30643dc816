/*
 * checkpoint.c - one file per run state:
 *   "MODACKPT" | u32 version | u32 reserved | config (13 x 8 bytes) | settings (6 x 8) | step | rng |
 *   data epoch, source, window | data fingerprint | nparams | optimiser t | params f32[n] | m f32[n] |
 *   v f32[n] | FNV-1a 64 of every byte before it.
 * Little-endian host layout (the file is not meant to move between architectures of other endianness).
 * Written atomically: a temporary file in the same folder, fflush + fsync, rename over the target, fsync of
 * the folder, so a crash leaves either the old or the new checkpoint, never a torn one.
 */
#include "model.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CKPT_MAGIC "MODACKPT"
#define CKPT_VERSION 1u

typedef struct hio {
    FILE *f;
    uint64_t h;
    int ok;
} hio;

static void hash(uint64_t *h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        *h ^= b[i];
        *h *= 0x100000001B3ull;
    }
}

static void w(hio *o, const void *p, size_t n) {
    if (!o->ok) return;
    hash(&o->h, p, n);
    if (fwrite(p, 1, n, o->f) != n) o->ok = 0;
}
static void r(hio *o, void *p, size_t n) {
    if (!o->ok) return;
    if (fread(p, 1, n, o->f) != n) {
        o->ok = 0;
        return;
    }
    hash(&o->h, p, n);
}

typedef struct ckpt_header {
    moda_model_config c;
    moda_train_settings s;
    int64_t step;
    uint64_t rng;
    int64_t epoch, file, pos;
    uint64_t fingerprint;
    int64_t nparams, opt_t;
} ckpt_header;

static void wm(hio *o, void *p, size_t n) { w(o, p, n); }

static void io_header(hio *o, ckpt_header *h, int write) {
    void (*f)(hio *, void *, size_t) = write ? wm : r;
    int64_t v[13];
    if (write) {
        int64_t c[13] = {h->c.V, h->c.D, h->c.N, h->c.Hq, h->c.Hk, h->c.d, h->c.F, 0, h->c.post_norm, h->c.qk_norm,
                         h->c.tied, (int64_t)h->c.depth, h->c.window};
        memcpy(&c[7], &h->c.rope_base, 8);
        memcpy(v, c, sizeof v);
    }
    f(o, v, sizeof v);
    if (!write) {
        h->c.V = v[0], h->c.D = v[1], h->c.N = v[2], h->c.Hq = v[3], h->c.Hk = v[4], h->c.d = v[5], h->c.F = v[6];
        memcpy(&h->c.rope_base, &v[7], 8);
        h->c.post_norm = (int)v[8], h->c.qk_norm = (int)v[9], h->c.tied = (int)v[10];
        h->c.depth = (moda_depth_source)v[11], h->c.window = v[12];
    }
    f(o, &h->s.steps, 8);
    f(o, &h->s.batch, 8);
    f(o, &h->s.seq, 8);
    f(o, &h->s.warmup, 8);
    f(o, &h->s.lr, 8);
    f(o, &h->s.seed, 8);
    f(o, &h->step, 8);
    f(o, &h->rng, 8);
    f(o, &h->epoch, 8);
    f(o, &h->file, 8);
    f(o, &h->pos, 8);
    f(o, &h->fingerprint, 8);
    f(o, &h->nparams, 8);
    f(o, &h->opt_t, 8);
}

moda_status moda_checkpoint_save(const moda_trainer *tr, const char *path) {
    /* a GPU trainer's state lives on the device: the file holds the same fp32 arrays as the CPU's */
    moda_status sync = moda_trainer_sync_host(tr);
    if (sync != MODA_OK) return sync;
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 32);
    if (!tmp) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of memory");
    snprintf(tmp, plen + 32, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        moda_status st = moda_model_fail(MODA_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
        free(tmp);
        return st;
    }
    hio o = {f, 0xCBF29CE484222325ull, 1};
    ckpt_header h;
    memset(&h, 0, sizeof h);
    h.c = *moda_model_get_config(tr->model);
    h.s = tr->s;
    h.step = tr->step;
    h.rng = tr->rng;
    h.epoch = tr->data->epoch;
    h.file = tr->data->file;
    h.pos = tr->data->pos;
    h.fingerprint = tr->data->fingerprint;
    h.nparams = moda_model_num_params(tr->model);
    h.opt_t = tr->opt.t;
    uint32_t ver[2] = {CKPT_VERSION, 0};
    w(&o, CKPT_MAGIC, 8);
    w(&o, ver, sizeof ver);
    io_header(&o, &h, 1);
    w(&o, moda_model_params(tr->model), (size_t)h.nparams * sizeof(float));
    w(&o, tr->opt.m, (size_t)h.nparams * sizeof(float));
    w(&o, tr->opt.v, (size_t)h.nparams * sizeof(float));
    uint64_t sum = o.h;
    if (o.ok && fwrite(&sum, 8, 1, f) != 1) o.ok = 0;
    if (o.ok && fflush(f) != 0) o.ok = 0;
    if (o.ok && fsync(fileno(f)) != 0) o.ok = 0;
    if (fclose(f) != 0) o.ok = 0;
    if (!o.ok) {
        moda_status st = moda_model_fail(MODA_ERR_IO, "writing checkpoint %s failed: %s", tmp, strerror(errno));
        remove(tmp);
        free(tmp);
        return st;
    }
    if (rename(tmp, path) != 0) {
        moda_status st = moda_model_fail(MODA_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        remove(tmp);
        free(tmp);
        return st;
    }
    free(tmp);
    /* the rename is durable only once the folder's entry is */
    char *dir = strdup(path);
    if (dir) {
        char *slash = strrchr(dir, '/');
        const char *dname = ".";
        if (slash) {
            *slash = 0;
            dname = slash == dir ? "/" : dir;
        }
        int fd = open(dname, O_RDONLY);
        if (fd >= 0) {
            fsync(fd);
            close(fd);
        }
        free(dir);
    }
    return MODA_OK;
}

/* Opens, checks magic/version/size, reads the header. Leaves the stream after the header. */
static moda_status open_checked(const char *path, FILE **fp, hio *o, ckpt_header *h) {
    FILE *f = fopen(path, "rb");
    if (!f) return moda_model_fail(MODA_ERR_IO, "cannot open checkpoint %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    *o = (hio){f, 0xCBF29CE484222325ull, 1};
    char magic[8];
    uint32_t ver[2];
    r(o, magic, 8);
    if (!o->ok || memcmp(magic, CKPT_MAGIC, 8) != 0) {
        fclose(f);
        return moda_model_fail(MODA_ERR_CORRUPT, "%s is not a moda checkpoint (bad magic)", path);
    }
    r(o, ver, sizeof ver);
    if (!o->ok || ver[0] != CKPT_VERSION) {
        fclose(f);
        return moda_model_fail(MODA_ERR_CORRUPT, "%s: checkpoint version %u, this moda reads version %u", path, o->ok ? ver[0] : 0, CKPT_VERSION);
    }
    memset(h, 0, sizeof *h);
    io_header(o, h, 0);
    if (!o->ok) {
        fclose(f);
        return moda_model_fail(MODA_ERR_CORRUPT, "%s is truncated inside its header", path);
    }
    moda_model_config c = h->c;
    int64_t n = -1;
    if (moda_model_config_resolve(&c) != MODA_OK || !moda_model_config_equal(&c, &h->c)) {
        fclose(f);
        return moda_model_fail(MODA_ERR_CORRUPT, "%s holds an invalid model configuration", path);
    }
    moda_model_param_table(&c, NULL, 0, &n);
    if (n != h->nparams) {
        fclose(f);
        return moda_model_fail(MODA_ERR_CORRUPT, "%s says %lld parameters but its configuration has %lld", path,
                         (long long)h->nparams, (long long)n);
    }
    long header = (long)ftell(f);
    long want = header + (long)(3 * n * (int64_t)sizeof(float)) + 8;
    if (size != want) {
        fclose(f);
        return moda_model_fail(MODA_ERR_CORRUPT, "%s has %ld bytes but its header implies %ld (truncated or padded)", path,
                         size, want);
    }
    *fp = f;
    return MODA_OK;
}

moda_status moda_checkpoint_peek(const char *path, moda_model_config *config, moda_train_settings *s, int64_t *step) {
    FILE *f;
    hio o;
    ckpt_header h;
    moda_status st = open_checked(path, &f, &o, &h);
    if (st != MODA_OK) return st;
    fclose(f);
    if (config) *config = h.c;
    if (s) *s = h.s;
    if (step) *step = h.step;
    return MODA_OK;
}

/* Reads the arrays and checks the checksum; the caller's buffers are written only when all is well. */
static moda_status read_body(FILE *f, hio *o, const char *path, int64_t n, float **params, float **m, float **v) {
    *params = malloc((size_t)n * sizeof(float));
    *m = malloc((size_t)n * sizeof(float));
    *v = malloc((size_t)n * sizeof(float));
    moda_status st = MODA_OK;
    if (!*params || !*m || !*v) st = moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "cannot allocate %lld parameters", (long long)n);
    if (st == MODA_OK) {
        r(o, *params, (size_t)n * sizeof(float));
        r(o, *m, (size_t)n * sizeof(float));
        r(o, *v, (size_t)n * sizeof(float));
        uint64_t want = o->h, got = 0;
        if (!o->ok || fread(&got, 8, 1, f) != 1) st = moda_model_fail(MODA_ERR_CORRUPT, "%s is truncated", path);
        else if (got != want)
            st = moda_model_fail(MODA_ERR_CORRUPT, "%s failed its checksum (stored %016llx, computed %016llx): the file is corrupt",
                           path, (unsigned long long)got, (unsigned long long)want);
    }
    fclose(f);
    if (st != MODA_OK) {
        free(*params);
        free(*m);
        free(*v);
        *params = *m = *v = NULL;
    }
    return st;
}

moda_status moda_checkpoint_load(moda_trainer *tr, const char *path) {
    FILE *f;
    hio o;
    ckpt_header h;
    moda_status st = open_checked(path, &f, &o, &h);
    if (st != MODA_OK) return st;
    const moda_model_config *mc = moda_model_get_config(tr->model);
    if (!moda_model_config_equal(mc, &h.c)) {
        char a[256], b[256];
        moda_model_config_str(&h.c, a, sizeof a);
        moda_model_config_str(mc, b, sizeof b);
        fclose(f);
        return moda_model_fail(MODA_ERR_SHAPE_MISMATCH, "%s was trained with [%s], not [%s]", path, a, b);
    }
    if (h.s.batch != tr->s.batch || h.s.seq != tr->s.seq || h.s.steps != tr->s.steps || h.s.warmup != tr->s.warmup ||
        h.s.lr != tr->s.lr || h.s.seed != tr->s.seed) {
        fclose(f);
        return moda_model_fail(MODA_ERR_SHAPE_MISMATCH,
                         "%s was trained with steps %lld batch %lld seq %lld warmup %lld lr %g seed %llu; this run has "
                         "steps %lld batch %lld seq %lld warmup %lld lr %g seed %llu",
                         path, (long long)h.s.steps, (long long)h.s.batch, (long long)h.s.seq, (long long)h.s.warmup,
                         h.s.lr, (unsigned long long)h.s.seed, (long long)tr->s.steps, (long long)tr->s.batch,
                         (long long)tr->s.seq, (long long)tr->s.warmup, tr->s.lr, (unsigned long long)tr->s.seed);
    }
    if (h.fingerprint != tr->data->fingerprint) {
        fclose(f);
        return moda_model_fail(MODA_ERR_SHAPE_MISMATCH, "%s was trained on other data (fingerprint %016llx, this data %016llx)",
                         path, (unsigned long long)h.fingerprint, (unsigned long long)tr->data->fingerprint);
    }
    float *p, *m, *v;
    st = read_body(f, &o, path, h.nparams, &p, &m, &v);
    if (st != MODA_OK) return st;
    st = moda_data_seek(tr->data, h.epoch, (int)h.file, h.pos);
    if (st == MODA_OK) {
        memcpy(moda_model_params(tr->model), p, (size_t)h.nparams * sizeof(float));
        memcpy(tr->opt.m, m, (size_t)h.nparams * sizeof(float));
        memcpy(tr->opt.v, v, (size_t)h.nparams * sizeof(float));
        tr->opt.t = h.opt_t;
        tr->step = h.step;
        tr->rng = h.rng;
        st = moda_trainer_sync_device(tr);
    }
    free(p);
    free(m);
    free(v);
    return st;
}

moda_status moda_checkpoint_load_model(moda_model *model, const char *path) {
    FILE *f;
    hio o;
    ckpt_header h;
    moda_status st = open_checked(path, &f, &o, &h);
    if (st != MODA_OK) return st;
    if (!moda_model_config_equal(moda_model_get_config(model), &h.c) || moda_model_dtype(model) != MODA_F32) {
        fclose(f);
        return moda_model_fail(MODA_ERR_SHAPE_MISMATCH, "%s holds a model of another configuration", path);
    }
    float *p, *m, *v;
    st = read_body(f, &o, path, h.nparams, &p, &m, &v);
    if (st != MODA_OK) return st;
    memcpy(moda_model_params(model), p, (size_t)h.nparams * sizeof(float));
    free(p);
    free(m);
    free(v);
    return MODA_OK;
}
