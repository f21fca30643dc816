/* gpu_stub.c - the GPU backend's entry points when libmoda is built without CUDA: each says so. */
#include "model.h"

#ifndef MODA_WITH_CUDA
static moda_status not_built(void) {
    return moda_model_fail(MODA_ERR_NOT_BUILT, "this moda was built without CUDA (configure with -DMODA_CUDA=ON)");
}
moda_status moda_gpu_model_create(moda_gpu_model **out, const moda_model_config *c, int64_t b, int64_t T, int64_t n) {
    (void)c, (void)b, (void)T, (void)n;
    *out = NULL;
    return not_built();
}
moda_status moda_gpu_model_set_deterministic_attention(moda_gpu_model *g, int deterministic) {
    (void)g, (void)deterministic;
    return not_built();
}
void moda_gpu_model_free(moda_gpu_model *g) { (void)g; }
int64_t moda_gpu_model_micro_batch(const moda_gpu_model *g) { (void)g; return 0; }
size_t moda_gpu_model_device_bytes(const moda_gpu_model *g) { (void)g; return 0; }
moda_status moda_gpu_model_set_state(moda_gpu_model *g, const float *p, const float *m, const float *v) {
    (void)g, (void)p, (void)m, (void)v;
    return not_built();
}
moda_status moda_gpu_model_get_state(moda_gpu_model *g, float *p, float *m, float *v) {
    (void)g, (void)p, (void)m, (void)v;
    return not_built();
}
moda_status moda_gpu_model_get_grads(moda_gpu_model *g, float *grads) {
    (void)g, (void)grads;
    return not_built();
}
moda_status moda_gpu_model_loss(moda_gpu_model *g, const int32_t *in, const int32_t *tgt, int64_t rows, int grads,
                                double *loss) {
    (void)g, (void)in, (void)tgt, (void)rows, (void)grads, (void)loss;
    return not_built();
}
moda_status moda_gpu_model_train_step(moda_gpu_model *g, const int32_t *in, const int32_t *tgt, int64_t rows,
                                      const moda_adamw *opt, double lr, int64_t t, double *loss, double *gn) {
    (void)g, (void)in, (void)tgt, (void)rows, (void)opt, (void)lr, (void)t, (void)loss, (void)gn;
    return not_built();
}
moda_status moda_gpu_model_profile(moda_gpu_model *g, int on) {
    (void)g, (void)on;
    return not_built();
}
int64_t moda_gpu_model_profile_report(const moda_gpu_model *g, double ms[MODA_GPU_PHASES]) {
    (void)g;
    for (int i = 0; i < MODA_GPU_PHASES; i++) ms[i] = 0;
    return 0;
}
const char *moda_gpu_phase_name(int phase) { (void)phase; return "?"; }
#else
typedef int moda_gpu_stub_unused; /* ISO C wants a translation unit to declare something */
#endif
