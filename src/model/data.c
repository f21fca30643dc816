/* data.c - training data: byte-level text files, llm.c .bin token shards, the built-in corpus; a held-out
 * validation split; a loader reading sources in order with a seeded shuffle of window positions. */
#include "model.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t fnv_tokens(uint64_t h, const int32_t *t, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        h ^= (uint64_t)(uint32_t)t[i];
        h *= 0x100000001B3ull;
    }
    return h;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

moda_status moda_shard_read(const char *path, int32_t **tokens, int64_t *count) {
    *tokens = NULL;
    *count = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return moda_model_fail(MODA_ERR_IO, "cannot open shard %s: %s", path, strerror(errno));
    int32_t hdr[256];
    if (fread(hdr, sizeof(int32_t), 256, f) != 256) {
        fclose(f);
        return moda_model_fail(MODA_ERR_CORRUPT, "%s is shorter than the 1024-byte llm.c shard header", path);
    }
    if (hdr[0] != MODA_SHARD_MAGIC) {
        fclose(f);
        return moda_model_fail(MODA_ERR_CORRUPT, "%s: magic %d is not llm.c's %d (not a token shard?)", path, hdr[0], MODA_SHARD_MAGIC);
    }
    if (hdr[1] != MODA_SHARD_VERSION) {
        fclose(f);
        return moda_model_fail(MODA_ERR_CORRUPT, "%s: shard version %d, only version %d (uint16 tokens) is supported", path, hdr[1], MODA_SHARD_VERSION);
    }
    int64_t n = hdr[2];
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return moda_model_fail(MODA_ERR_IO, "cannot seek in %s", path);
    }
    long size = ftell(f);
    if (n < 0 || size != 1024 + 2 * n) {
        fclose(f);
        return moda_model_fail(MODA_ERR_CORRUPT, "%s: header says %lld tokens (%lld bytes) but the file has %ld bytes", path,
                         (long long)n, (long long)(1024 + 2 * n), size);
    }
    fseek(f, 1024, SEEK_SET);
    uint16_t *raw = malloc((size_t)(n ? n : 1) * sizeof(uint16_t));
    int32_t *t = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    if (!raw || !t) {
        free(raw);
        free(t);
        fclose(f);
        return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "cannot allocate %lld tokens of %s", (long long)n, path);
    }
    size_t got = fread(raw, sizeof(uint16_t), (size_t)n, f);
    fclose(f);
    if ((int64_t)got != n) {
        free(raw);
        free(t);
        return moda_model_fail(MODA_ERR_IO, "%s: read %zu of %lld tokens", path, got, (long long)n);
    }
    for (int64_t i = 0; i < n; i++) t[i] = raw[i];
    free(raw);
    *tokens = t;
    *count = n;
    return MODA_OK;
}

moda_status moda_shard_write(const char *path, const int32_t *tokens, int64_t count) {
    if (count < 0 || count > INT32_MAX) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "shard token count %lld out of range", (long long)count);
    FILE *f = fopen(path, "wb");
    if (!f) return moda_model_fail(MODA_ERR_IO, "cannot create %s: %s", path, strerror(errno));
    int32_t hdr[256] = {0};
    hdr[0] = MODA_SHARD_MAGIC;
    hdr[1] = MODA_SHARD_VERSION;
    hdr[2] = (int32_t)count;
    int ok = fwrite(hdr, sizeof hdr, 1, f) == 1;
    for (int64_t i = 0; ok && i < count; i++) {
        if (tokens[i] < 0 || tokens[i] > 65535) {
            fclose(f);
            return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "token %d does not fit a uint16 shard", tokens[i]);
        }
        uint16_t u = (uint16_t)tokens[i];
        ok = fwrite(&u, 2, 1, f) == 1;
    }
    if (fclose(f) != 0 || !ok) return moda_model_fail(MODA_ERR_IO, "writing %s failed", path);
    return MODA_OK;
}

static moda_status read_text(const char *path, int32_t **tokens, int64_t *count) {
    FILE *f = fopen(path, "rb");
    if (!f) return moda_model_fail(MODA_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (size < 0) {
        fclose(f);
        return moda_model_fail(MODA_ERR_IO, "cannot size %s", path);
    }
    unsigned char *raw = malloc((size_t)size + 1);
    int32_t *t = malloc(((size_t)size + 1) * sizeof(int32_t));
    if (!raw || !t) {
        free(raw);
        free(t);
        fclose(f);
        return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "cannot allocate %ld bytes for %s", size, path);
    }
    size_t got = fread(raw, 1, (size_t)size, f);
    fclose(f);
    for (size_t i = 0; i < got; i++) t[i] = raw[i];
    free(raw);
    *tokens = t;
    *count = (int64_t)got;
    return MODA_OK;
}

static moda_status load_source(const moda_data *dt, int i, int32_t **tokens, int64_t *count) {
    if (dt->builtin) {
        int64_t len;
        char *text = moda_corpus_generate(MODA_CORPUS_BYTES, MODA_CORPUS_SEED, &len);
        if (!text) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "cannot generate the built-in corpus");
        int32_t *t = malloc((size_t)len * sizeof(int32_t));
        if (!t) {
            free(text);
            return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "cannot allocate the built-in corpus");
        }
        for (int64_t j = 0; j < len; j++) t[j] = (unsigned char)text[j];
        free(text);
        *tokens = t;
        *count = len;
        return MODA_OK;
    }
    return dt->text ? read_text(dt->files[i], tokens, count) : moda_shard_read(dt->files[i], tokens, count);
}

static int is_val_name(const char *p) {
    const char *b = strrchr(p, '/');
    b = b ? b + 1 : p;
    return strstr(b, "_val") != NULL || strstr(b, "val_") == b;
}

void moda_data_close(moda_data *dt) {
    for (int i = 0; i < dt->nfiles; i++) free(dt->files[i]);
    free(dt->files);
    free(dt->file_tokens);
    free(dt->cur);
    free(dt->val);
    free(dt->order);
    memset(dt, 0, sizeof *dt);
}

moda_status moda_data_open(moda_data *dt, const char *const *paths, int npaths, const char *val_path) {
    memset(dt, 0, sizeof *dt);
    dt->cur_file = -1;
    moda_status st = MODA_OK;
    const char *val_named = val_path;
    dt->files = calloc((size_t)(npaths > 0 ? npaths : 1), sizeof(char *));
    if (!dt->files) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of memory");
    if (npaths == 0) {
        dt->builtin = 1;
        dt->text = 1;
        dt->nfiles = 1;
        dt->files[0] = strdup("builtin");
    } else {
        int shards = 0;
        for (int i = 0; i < npaths; i++) shards += ends_with(paths[i], ".bin");
        if (shards != 0 && shards != npaths) {
            free(dt->files);
            dt->files = NULL;
            return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "mix of .bin shards and text files: give one kind of data");
        }
        dt->text = shards == 0;
        for (int i = 0; i < npaths; i++) {
            if (!dt->text && !val_path && is_val_name(paths[i])) {
                if (val_named) {
                    moda_data_close(dt);
                    return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "two validation shards (%s, %s): pass one with --val", val_named, paths[i]);
                }
                val_named = paths[i];
                continue;
            }
            dt->files[dt->nfiles++] = strdup(paths[i]);
        }
        if (dt->nfiles == 0) {
            moda_data_close(dt);
            return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "no training data: every file given looks like a validation shard");
        }
    }
    dt->file_tokens = calloc((size_t)dt->nfiles, sizeof(int64_t));
    if (!dt->file_tokens) {
        moda_data_close(dt);
        return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of memory");
    }
    uint64_t h = 0xCBF29CE484222325ull;
    for (int i = 0; i < dt->nfiles; i++) {
        int32_t *t;
        int64_t n;
        st = load_source(dt, i, &t, &n);
        if (st != MODA_OK) {
            moda_data_close(dt);
            return st;
        }
        if (i == dt->nfiles - 1 && !val_named) {
            /* hold out the last 10 % of the last source: never trained on */
            int64_t nv = n / 10;
            if (nv < 2) {
                free(t);
                moda_data_close(dt);
                return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "%s has %lld tokens: too few to hold out a validation split",
                                 dt->files[i], (long long)n);
            }
            dt->val = malloc((size_t)nv * sizeof(int32_t));
            if (!dt->val) {
                free(t);
                moda_data_close(dt);
                return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of memory");
            }
            memcpy(dt->val, t + (n - nv), (size_t)nv * sizeof(int32_t));
            dt->val_count = nv;
            n -= nv;
        }
        for (int64_t j = 0; j < n; j++)
            if (t[j] > dt->max_token) dt->max_token = t[j];
        for (int64_t j = 0; j < dt->val_count && i == dt->nfiles - 1 && !val_named; j++)
            if (dt->val[j] > dt->max_token) dt->max_token = dt->val[j];
        dt->file_tokens[i] = n;
        h = fnv_tokens(h, t, n);
        free(t);
    }
    if (val_named) {
        st = dt->text ? read_text(val_named, &dt->val, &dt->val_count) : moda_shard_read(val_named, &dt->val, &dt->val_count);
        if (st != MODA_OK) {
            moda_data_close(dt);
            return st;
        }
        for (int64_t j = 0; j < dt->val_count; j++)
            if (dt->val[j] > dt->max_token) dt->max_token = dt->val[j];
    }
    dt->fingerprint = h;
    return MODA_OK;
}

/* Fisher-Yates over the window starts of the current source, seeded by (seed, epoch, source). */
static moda_status prepare_source(moda_data *dt) {
    if (dt->cur_file != dt->file) {
        free(dt->cur);
        dt->cur = NULL;
        int64_t n;
        moda_status st = load_source(dt, dt->file, &dt->cur, &n);
        if (st != MODA_OK) return st;
        dt->cur_count = dt->file_tokens[dt->file]; /* the held-out tail is never read */
        dt->cur_file = dt->file;
    }
    int64_t nwin = dt->cur_count > dt->T ? (dt->cur_count - 1) / dt->T : 0;
    free(dt->order);
    dt->order = malloc((size_t)(nwin ? nwin : 1) * sizeof(int64_t));
    if (!dt->order) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of memory");
    dt->nwin = nwin;
    for (int64_t i = 0; i < nwin; i++) dt->order[i] = i * dt->T;
    uint64_t s = dt->seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(dt->epoch + 1)) ^ ((uint64_t)dt->file << 32);
    for (int64_t i = nwin - 1; i > 0; i--) {
        int64_t j = (int64_t)(moda_rng_next(&s) % (uint64_t)(i + 1));
        int64_t tmp = dt->order[i];
        dt->order[i] = dt->order[j];
        dt->order[j] = tmp;
    }
    return MODA_OK;
}

moda_status moda_data_start(moda_data *dt, int64_t B, int64_t T, uint64_t seed) {
    if (B < 1 || T < 1) return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "batch %lld and sequence %lld must be >= 1", (long long)B, (long long)T);
    int64_t total = 0;
    for (int i = 0; i < dt->nfiles; i++) total += dt->file_tokens[i] > T ? (dt->file_tokens[i] - 1) / T : 0;
    if (total < 1)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "the training data holds no window of %lld + 1 tokens", (long long)T);
    dt->B = B;
    dt->T = T;
    dt->seed = seed;
    return moda_data_seek(dt, 0, 0, 0);
}

moda_status moda_data_seek(moda_data *dt, int64_t epoch, int file, int64_t pos) {
    if (file < 0 || file >= dt->nfiles || epoch < 0 || pos < 0)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "data position (epoch %lld, source %d, window %lld) is outside the data",
                         (long long)epoch, file, (long long)pos);
    dt->epoch = epoch;
    dt->file = file;
    moda_status st = prepare_source(dt);
    if (st != MODA_OK) return st;
    if (pos > dt->nwin)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "data position %lld is past the %lld windows of %s", (long long)pos,
                         (long long)dt->nwin, dt->files[file]);
    dt->pos = pos;
    return MODA_OK;
}

moda_status moda_data_next(moda_data *dt, int32_t *inputs, int32_t *targets) {
    for (int64_t b = 0; b < dt->B; b++) {
        while (dt->pos >= dt->nwin) {
            int file = dt->file + 1;
            int64_t epoch = dt->epoch;
            if (file >= dt->nfiles) {
                file = 0;
                epoch++;
            }
            dt->epoch = epoch;
            dt->file = file;
            moda_status st = prepare_source(dt);
            if (st != MODA_OK) return st;
            dt->pos = 0;
        }
        const int32_t *w = dt->cur + dt->order[dt->pos++];
        memcpy(inputs + b * dt->T, w, (size_t)dt->T * sizeof(int32_t));
        memcpy(targets + b * dt->T, w + 1, (size_t)dt->T * sizeof(int32_t));
    }
    return MODA_OK;
}

int64_t moda_data_val_batches(const moda_data *dt, int64_t B, int64_t T) {
    int64_t nwin = dt->val_count > T ? (dt->val_count - 1) / T : 0;
    return nwin / B;
}

void moda_data_val_batch(const moda_data *dt, int64_t i, int64_t B, int64_t T, int32_t *inputs, int32_t *targets) {
    for (int64_t b = 0; b < B; b++) {
        const int32_t *w = dt->val + (i * B + b) * T;
        memcpy(inputs + b * T, w, (size_t)T * sizeof(int32_t));
        memcpy(targets + b * T, w + 1, (size_t)T * sizeof(int32_t));
    }
}
