/*
 * test_model_train - training end to end on the CPU: configuration errors, llm.c shards, the loader, the loss
 * falling on a learnable sequence, checkpoints (round trip, corrupt / truncated / mismatched files refused,
 * nothing changed by a refused load) and resume (a run stopped at step k and resumed gives the same losses
 * as an uninterrupted one, bit for bit).
 */
#include "model.h"
#include "testutil.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[256];

static void path(char *buf, const char *name) { snprintf(buf, 512, "%s/%s", tmpdir, name); }

static void check_config_errors(void) {
    moda_model_config c = moda_model_config_default();
    TU_CHECK_STATUS(moda_model_config_resolve(&c), MODA_OK);
    TU_CHECK(c.F == 320, "default F for D=128 should be 320 (the multiple of 64 nearest 341.3), got %lld", (long long)c.F);
    c = moda_model_config_default();
    c.Hq = 3;
    TU_CHECK_STATUS(moda_model_config_resolve(&c), MODA_ERR_INVALID_ARGUMENT);
    TU_CHECK(strstr(moda_model_error(), "multiple") != NULL, "message should explain Hq/Hk: %s", moda_model_error());
    c = moda_model_config_default();
    c.d = 5;
    TU_CHECK_STATUS(moda_model_config_resolve(&c), MODA_ERR_INVALID_ARGUMENT);
    c = moda_model_config_default();
    c.depth = MODA_DEPTH_SRC_NONE;
    c.window = 2;
    TU_CHECK_STATUS(moda_model_config_resolve(&c), MODA_ERR_INVALID_ARGUMENT);
    c = moda_model_config_default();
    c.rope_base = 0.5;
    TU_CHECK_STATUS(moda_model_config_resolve(&c), MODA_ERR_INVALID_ARGUMENT);
    TU_CHECK(moda_depth_source_parse("attn+ffn+extra-attn") == MODA_DEPTH_SRC_EXTRA && moda_depth_source_parse("x") < 0,
             "depth source names");
    moda_model *m = NULL;
    c = moda_model_config_default();
    TU_CHECK_STATUS(moda_model_create(&m, &c, MODA_F16, 1, 8), MODA_ERR_UNSUPPORTED);
    TU_CHECK_STATUS(moda_model_create(&m, &c, MODA_F32, 0, 8), MODA_ERR_INVALID_ARGUMENT);
    TU_CHECK(m == NULL, "failed create leaves no model");
    /* tokens outside the vocabulary are refused */
    c.V = 16;
    c.D = 16;
    c.Hq = 2;
    c.Hk = 1;
    c.d = 8;
    c.N = 1;
    TU_CHECK_STATUS(moda_model_create(&m, &c, MODA_F32, 1, 4), MODA_OK);
    int32_t in[4] = {1, 2, 16, 3}, tg[4] = {2, 3, 4, 5};
    double loss;
    TU_CHECK_STATUS(moda_model_step(m, in, tg, 1, &loss), MODA_ERR_INVALID_ARGUMENT);
    moda_model_free(m);
}

static void check_shards(void) {
    char p[512];
    path(p, "toy_train.bin");
    int32_t toks[1000];
    for (int i = 0; i < 1000; i++) toks[i] = (i * 7919) % 50257;
    TU_CHECK_STATUS(moda_shard_write(p, toks, 1000), MODA_OK);
    int32_t *back = NULL;
    int64_t n = 0;
    TU_CHECK_STATUS(moda_shard_read(p, &back, &n), MODA_OK);
    TU_CHECK(n == 1000 && back && !memcmp(back, toks, sizeof toks), "shard round trip");
    free(back);
    /* a corrupt magic, a wrong version, a count that disagrees with the size */
    FILE *f = fopen(p, "r+b");
    int32_t bad = 1234;
    fwrite(&bad, 4, 1, f);
    fclose(f);
    TU_CHECK_STATUS(moda_shard_read(p, &back, &n), MODA_ERR_CORRUPT);
    TU_CHECK(strstr(moda_model_error(), "magic") != NULL, "message names the magic: %s", moda_model_error());
    moda_shard_write(p, toks, 1000);
    f = fopen(p, "r+b");
    int32_t hdr[3] = {MODA_SHARD_MAGIC, 2, 1000};
    fwrite(hdr, 4, 3, f);
    fclose(f);
    TU_CHECK_STATUS(moda_shard_read(p, &back, &n), MODA_ERR_CORRUPT);
    moda_shard_write(p, toks, 1000);
    TU_CHECK(truncate(p, 1024 + 2 * 999) == 0, "truncate");
    TU_CHECK_STATUS(moda_shard_read(p, &back, &n), MODA_ERR_CORRUPT);
    moda_shard_write(p, toks, 1000);
    /* shards named *_val* are the validation split */
    char pv[512];
    path(pv, "toy_val.bin");
    moda_shard_write(pv, toks, 300);
    const char *files[2] = {p, pv};
    moda_data dt;
    TU_CHECK_STATUS(moda_data_open(&dt, files, 2, NULL), MODA_OK);
    TU_CHECK(dt.nfiles == 1 && dt.file_tokens[0] == 1000 && dt.val_count == 300 && !dt.text,
             "train/val shards: %d sources, %lld train, %lld val", dt.nfiles, (long long)dt.file_tokens[0], (long long)dt.val_count);
    /* the loader: every window once per epoch, in a seeded order that differs between epochs */
    TU_CHECK_STATUS(moda_data_start(&dt, 3, 10, 42), MODA_OK);
    int32_t in[30], tg[30];
    int seen[100] = {0};
    int64_t first[33];
    for (int b = 0; b < 33; b++) { /* 99 windows: exactly one epoch */
        moda_data_next(&dt, in, tg);
        first[b] = 0;
        for (int k = 0; k < 3; k++) {
            int w = -1;
            for (int s = 0; s < 99; s++)
                if (!memcmp(toks + s * 10, in + k * 10, 40)) w = s;
            TU_CHECK(w >= 0 && !memcmp(toks + w * 10 + 1, tg + k * 10, 40), "batch %d row %d is a window with shifted targets", b, k);
            if (w >= 0) seen[w]++;
            if (k == 0) first[b] = w;
        }
    }
    int once = 1;
    for (int s = 0; s < 99; s++) once &= seen[s] == 1;
    TU_CHECK(once && dt.epoch == 0, "each of the 99 windows once in the first epoch");
    moda_data_next(&dt, in, tg);
    TU_CHECK(dt.epoch == 1, "the loader moves to epoch 1");
    moda_data_close(&dt);
    (void)first;
}

static void write_text(const char *p, int64_t bytes) {
    FILE *f = fopen(p, "wb");
    const char *s = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs! ";
    size_t n = strlen(s);
    for (int64_t i = 0; i < bytes; i += (int64_t)n) fwrite(s, 1, n, f);
    fclose(f);
}

static moda_model_config tiny(void) {
    moda_model_config c = moda_model_config_default();
    c.D = 32;
    c.N = 2;
    c.Hq = 2;
    c.Hk = 1;
    c.d = 16;
    c.F = 64;
    return c;
}

static void check_learns(const char *text) {
    moda_data dt;
    const char *files[1] = {text};
    TU_CHECK_STATUS(moda_data_open(&dt, files, 1, NULL), MODA_OK);
    moda_model_config c = tiny();
    moda_train_settings s = {120, 4, 32, 10, 1e-2, 3};
    moda_trainer tr;
    TU_CHECK_STATUS(moda_trainer_create(&tr, &c, &s, &dt), MODA_OK);
    double first = 0, last = 0, v0 = 0, v1 = 0, gn;
    moda_trainer_eval(&tr, 4, &v0);
    for (int i = 0; i < 120; i++) {
        double l;
        TU_CHECK_STATUS(moda_trainer_step(&tr, &l, &gn), MODA_OK);
        if (i == 0) first = l;
        last = l;
    }
    moda_trainer_eval(&tr, 4, &v1);
    printf("  learnable text: train loss %.3f -> %.3f, validation %.3f -> %.3f over 120 steps\n", first, last, v0, v1);
    TU_CHECK(first > 4.5 && last < 1.0 && v1 < 1.0, "loss should fall from ~ln 256 to < 1 (%.3f -> %.3f, val %.3f)", first, last, v1);
    moda_trainer_free(&tr);
    moda_data_close(&dt);
}

/* --deterministic-attention off is a GPU option: the CPU trainer takes it and its run is bitwise the default
 * one (the CPU operator's backward is deterministic in both modes); a value other than 0 or 1 is refused */
static void check_cpu_ignores_attention_mode(const char *text) {
    moda_model_config c = tiny();
    moda_train_settings s = {5, 2, 32, 1, 1e-2, 5};
    moda_train_device dev[2] = {{MODA_CPU, 0, 0}, {MODA_CPU, 0, 1}};
    double loss[2][5];
    float *params[2] = {NULL, NULL};
    int64_t n = 0;
    for (int k = 0; k < 2; k++) {
        moda_data dt;
        const char *files[1] = {text};
        TU_CHECK_STATUS(moda_data_open(&dt, files, 1, NULL), MODA_OK);
        moda_trainer tr;
        TU_CHECK_STATUS(moda_trainer_create_on(&tr, &c, &s, &dt, &dev[k]), MODA_OK);
        for (int i = 0; i < 5; i++) TU_CHECK_STATUS(moda_trainer_step(&tr, &loss[k][i], NULL), MODA_OK);
        n = moda_model_num_params(tr.model);
        params[k] = malloc(sizeof(float) * (size_t)n);
        if (params[k]) memcpy(params[k], moda_model_params(tr.model), sizeof(float) * (size_t)n);
        moda_trainer_free(&tr);
        moda_data_close(&dt);
    }
    TU_CHECK(params[0] && params[1] && memcmp(loss[0], loss[1], sizeof loss[0]) == 0 &&
                 memcmp(params[0], params[1], sizeof(float) * (size_t)n) == 0,
             "the CPU trainer's run changed with the attention determinism option");
    free(params[0]);
    free(params[1]);
    moda_data dt;
    const char *files[1] = {text};
    TU_CHECK_STATUS(moda_data_open(&dt, files, 1, NULL), MODA_OK);
    moda_train_device bad = {MODA_CPU, 0, 2};
    moda_trainer tr;
    TU_CHECK_STATUS(moda_trainer_create_on(&tr, &c, &s, &dt, &bad), MODA_ERR_INVALID_ARGUMENT);
    moda_data_close(&dt);
}

static int file_corrupt(const char *src, const char *dst, long offset, long truncate_to) {
    FILE *a = fopen(src, "rb"), *b = fopen(dst, "wb");
    if (!a || !b) return 0;
    int ch;
    long i = 0;
    while ((ch = fgetc(a)) != EOF) {
        if (truncate_to >= 0 && i >= truncate_to) break;
        if (i == offset) ch ^= 0x10;
        fputc(ch, b);
        i++;
    }
    fclose(a);
    fclose(b);
    return 1;
}

static void check_checkpoints_and_resume(const char *text) {
    const int64_t K = 7, TOTAL = 16;
    moda_data dt;
    const char *files[1] = {text};
    TU_CHECK_STATUS(moda_data_open(&dt, files, 1, NULL), MODA_OK);
    moda_model_config c = tiny();
    c.depth = MODA_DEPTH_SRC_ATTN_FFN;
    c.post_norm = 1;
    /* 16 steps of 4 x 64 cross two epochs of this small file (28 windows): the loader's position is part of the state */
    moda_train_settings s = {TOTAL, 4, 64, 4, 5e-3, 11};
    double ref[16], res[16];
    moda_trainer a;
    TU_CHECK_STATUS(moda_trainer_create(&a, &c, &s, &dt), MODA_OK);
    for (int64_t i = 0; i < TOTAL; i++) moda_trainer_step(&a, &ref[i], NULL);
    int64_t epochs = dt.epoch;
    float *final_ref = malloc(sizeof(float) * (size_t)moda_model_num_params(a.model));
    memcpy(final_ref, moda_model_params(a.model), sizeof(float) * (size_t)moda_model_num_params(a.model));
    moda_trainer_free(&a);

    char ck[512];
    path(ck, "ckpt.bin");
    moda_trainer b;
    TU_CHECK_STATUS(moda_trainer_create(&b, &c, &s, &dt), MODA_OK);
    for (int64_t i = 0; i < K; i++) moda_trainer_step(&b, &res[i], NULL);
    TU_CHECK_STATUS(moda_checkpoint_save(&b, ck), MODA_OK);
    const int64_t n = moda_model_num_params(b.model);
    float *pk = malloc(sizeof(float) * (size_t)n), *mk = malloc(sizeof(float) * (size_t)n), *vk = malloc(sizeof(float) * (size_t)n);
    memcpy(pk, moda_model_params(b.model), sizeof(float) * (size_t)n);
    memcpy(mk, b.opt.m, sizeof(float) * (size_t)n);
    memcpy(vk, b.opt.v, sizeof(float) * (size_t)n);
    moda_trainer_free(&b);

    /* a fresh process-like start: new data handle, new trainer, load, continue */
    moda_data dt2;
    TU_CHECK_STATUS(moda_data_open(&dt2, files, 1, NULL), MODA_OK);
    moda_model_config pc;
    moda_train_settings ps;
    int64_t pstep;
    TU_CHECK_STATUS(moda_checkpoint_peek(ck, &pc, &ps, &pstep), MODA_OK);
    TU_CHECK(moda_model_config_equal(&pc, &(moda_model_config){0}) == 0 && pstep == K && ps.seed == 11, "peek");
    moda_trainer r;
    TU_CHECK_STATUS(moda_trainer_create(&r, &pc, &ps, &dt2), MODA_OK);
    TU_CHECK_STATUS(moda_checkpoint_load(&r, ck), MODA_OK);
    TU_CHECK(r.step == K && !memcmp(moda_model_params(r.model), pk, sizeof(float) * (size_t)n) &&
                 !memcmp(r.opt.m, mk, sizeof(float) * (size_t)n) && !memcmp(r.opt.v, vk, sizeof(float) * (size_t)n),
             "checkpoint round trip restores step, parameters and both AdamW moments exactly");

    /* refused files leave the trainer untouched */
    char bad[512];
    path(bad, "bad.bin");
    long size;
    {
        FILE *f = fopen(ck, "rb");
        fseek(f, 0, SEEK_END);
        size = ftell(f);
        fclose(f);
    }
    struct {
        long offset, trunc;
        moda_status want;
        const char *what;
    } cases[] = {{size / 2, -1, MODA_ERR_CORRUPT, "a flipped bit in the parameters"},
                 {size - 3, -1, MODA_ERR_CORRUPT, "a flipped bit in the checksum"},
                 {2, -1, MODA_ERR_CORRUPT, "a bad magic"},
                 {-1, size - 100, MODA_ERR_CORRUPT, "a truncated file"},
                 {-1, 20, MODA_ERR_CORRUPT, "a file cut inside its header"}};
    for (unsigned i = 0; i < sizeof cases / sizeof *cases; i++) {
        file_corrupt(ck, bad, cases[i].offset, cases[i].trunc);
        moda_trainer_step(&r, &res[0], NULL); /* moves the state so that an untouched one can be recognised */
        float *before = malloc(sizeof(float) * (size_t)n);
        memcpy(before, moda_model_params(r.model), sizeof(float) * (size_t)n);
        int64_t step_before = r.step;
        moda_status st = moda_checkpoint_load(&r, bad);
        TU_CHECK(st == cases[i].want, "%s: got %s (%s)", cases[i].what, moda_status_string(st), moda_model_error());
        TU_CHECK(r.step == step_before && !memcmp(before, moda_model_params(r.model), sizeof(float) * (size_t)n),
                 "%s: a refused load changed the trainer", cases[i].what);
        printf("  refused %-34s %s\n", cases[i].what, moda_model_error());
        free(before);
    }
    /* a checkpoint of another configuration or other settings */
    {
        moda_model_config c2 = c;
        c2.depth = MODA_DEPTH_SRC_ATTN;
        moda_trainer o2;
        TU_CHECK_STATUS(moda_trainer_create(&o2, &c2, &s, &dt2), MODA_OK);
        TU_CHECK_STATUS(moda_checkpoint_load(&o2, ck), MODA_ERR_SHAPE_MISMATCH);
        printf("  refused %-34s %s\n", "another configuration", moda_model_error());
        moda_trainer_free(&o2);
        moda_train_settings s2 = s;
        s2.lr = 1e-3;
        TU_CHECK_STATUS(moda_trainer_create(&o2, &c, &s2, &dt2), MODA_OK);
        TU_CHECK_STATUS(moda_checkpoint_load(&o2, ck), MODA_ERR_SHAPE_MISMATCH);
        moda_trainer_free(&o2);
    }
    /* resume for real from the good checkpoint: the steps after k equal the uninterrupted run's, bit for bit */
    TU_CHECK_STATUS(moda_checkpoint_load(&r, ck), MODA_OK);
    TU_CHECK(r.step == K, "reloaded at step %lld", (long long)r.step);
    for (int64_t i = K; i < TOTAL; i++) moda_trainer_step(&r, &res[i], NULL);
    int same = 1;
    for (int64_t i = K; i < TOTAL; i++) {
        TU_CHECK(res[i] == ref[i], "step %lld: resumed loss %.17g vs uninterrupted %.17g", (long long)i + 1, res[i], ref[i]);
        same &= res[i] == ref[i];
    }
    TU_CHECK(!memcmp(final_ref, moda_model_params(r.model), sizeof(float) * (size_t)n), "final parameters differ after resume");
    TU_CHECK(epochs >= 1, "the run should cross an epoch boundary (epoch %lld)", (long long)epochs);
    printf("  resume at step %lld of %lld (%lld epoch boundaries crossed): losses %s; last %.9f vs %.9f\n", (long long)K,
           (long long)TOTAL, (long long)epochs, same ? "bitwise equal" : "DIFFER", res[TOTAL - 1], ref[TOTAL - 1]);
    moda_trainer_free(&r);
    free(final_ref), free(pk), free(mk), free(vk);
    moda_data_close(&dt);
    moda_data_close(&dt2);
    /* other data is refused */
    char other[512];
    path(other, "other.txt");
    write_text(other, 20000);
    FILE *f = fopen(other, "ab");
    fputs("something else entirely", f);
    fclose(f);
    const char *of[1] = {other};
    moda_data dt3;
    TU_CHECK_STATUS(moda_data_open(&dt3, of, 1, NULL), MODA_OK);
    moda_trainer o3;
    TU_CHECK_STATUS(moda_trainer_create(&o3, &c, &s, &dt3), MODA_OK);
    TU_CHECK_STATUS(moda_checkpoint_load(&o3, ck), MODA_ERR_SHAPE_MISMATCH);
    moda_trainer_free(&o3);
    moda_data_close(&dt3);
    /* the atomic writer leaves no temporary file behind */
    char tmpf[600];
    snprintf(tmpf, sizeof tmpf, "%s.tmp.%ld", ck, (long)getpid());
    TU_CHECK(access(tmpf, F_OK) != 0, "temporary checkpoint file left behind");
}

static void check_builtin_corpus(void) {
    int64_t a, b;
    char *x = moda_corpus_generate(50000, 5, &a), *y = moda_corpus_generate(50000, 5, &b);
    TU_CHECK(x && y && a == b && a >= 50000 && !memcmp(x, y, (size_t)a), "the built-in corpus is deterministic");
    int ascii = 1;
    for (int64_t i = 0; i < a; i++) ascii &= (unsigned char)x[i] < 128;
    TU_CHECK(ascii, "the built-in corpus is ASCII text");
    free(x);
    free(y);
}

int main(void) {
    tu_rng rng = tu_rng_from_env("test_model_train");
    /* Tiny shapes: one thread each, since busy-waiting thread pools on a loaded 2-core machine cost 100x here;
     * the resume check alone runs the OpenMP loops and the operator with ctest's threads (determinism with
     * threads is part of what it proves). */
    openblas_set_num_threads(1);
    const int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    (void)rng;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/moda_test_model_train.XXXXXX");
    if (!mkdtemp(tmpdir)) {
        fprintf(stderr, "cannot create a temporary folder\n");
        return 1;
    }
    char text[512];
    path(text, "toy.txt");
    write_text(text, 12000);
    check_config_errors();
    check_shards();
    check_builtin_corpus();
    check_learns(text);
    check_cpu_ignores_attention_mode(text);
    char small[512];
    path(small, "toy_small.txt");
    write_text(small, 2000);
    omp_set_num_threads(threads);
    check_checkpoints_and_resume(small);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    return tu_finish("test_model_train");
}
