/* model_f64.c - the model core in float64: the twin the finite-difference gradient tests differentiate (the
 * operator's MODA_F64 path runs the float64 reference; dgemm). */
#define REAL double
#define REAL_DTYPE MODA_F64
#define GEMM_FN cblas_dgemm
#define KN(name) name##_f64k
#define CORE(name) name##_f64
#include "model_core.h"
