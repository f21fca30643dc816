/* model_f32.c - the model core in float32: the trainer's path (the operator's MODA_F32 fast path, sgemm). */
#define REAL float
#define REAL_DTYPE MODA_F32
#define GEMM_FN cblas_sgemm
#define KN(name) name##_f32k
#define CORE(name) name##_f32
#include "model_core.h"
