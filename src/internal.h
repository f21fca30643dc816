/*
 * internal.h - what every backend receives: a validated, normalised description of one MoDA call.
 *
 * src/api.c turns the public tensor views and options into a moda_problem, checking everything spec.md §5
 * lists, and only then hands it to a backend (src/cpu/reference.c, src/cpu/fast_*.c, src/cuda/...).
 * Backends may therefore assume: shapes agree, the depth range is inside [0, Lcap], every used pointer is
 * non-null, outputs do not overlap inputs, every extent fits in int64, and dtypes are ones the device accepts.
 */
#ifndef MODA_INTERNAL_H
#define MODA_INTERNAL_H

#include "moda.h"

#include <stdarg.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One operand: base pointer and element strides in the operand's logical dimension order (spec.md §1).
 * For an absent operand data == NULL and the strides are zero. */
typedef struct moda_operand {
    void *data;
    moda_dtype dtype;
    int64_t stride[MODA_MAX_DIMS];
} moda_operand;

typedef struct moda_problem {
    /* sizes */
    int64_t B, T, Hk, G, d, dv;
    int64_t Lcap;       /* depth slots allocated per token (0 when kd/vd absent) */
    int64_t d0, d1;     /* visible depth slots [d0, d1) */
    /* semantics */
    int causal;         /* 1: j <= t */
    int sequence;       /* 0: depth-only */
    int chunk;          /* 0: token mode; 1: chunk mode */
    int64_t chunk_size; /* C (chunk mode only) */
    double scale;       /* resolved: never 0 */
    moda_dtype dtype;   /* storage dtype of q, k, v, kd, vd, o, dout, dq, dk, dv */
    moda_device device;
    int num_threads;
    /* forward operands (q,o: [B,T,Hk,G,*]; k,v: [B,T,Hk,*]; kd,vd: [B,T,Lcap,Hk,*]; lse: [B,T,Hk,G]) */
    moda_operand q, k, v, kd, vd, o, lse;
    /* backward operands: grad_o is the incoming dO (shaped like o); grad_q/k/v/kd/vd are the outputs dQ, dK,
     * dV, dKd, dVd (shaped like q, k, v, kd, vd). Named grad_* because `dv` is the value head dimension. */
    moda_operand grad_o, grad_q, grad_k, grad_v, grad_kd, grad_vd;
    int accumulate_depth; /* backward: add into dkd/dvd instead of overwriting */
    int deterministic;
} moda_problem;

/* Depth slots visible to the call, and whether the depth part is present at all. */
static inline int64_t moda_problem_slots(const moda_problem *p) { return p->d1 - p->d0; }
static inline int moda_problem_has_depth(const moda_problem *p) { return p->d1 > p->d0; }

/* Element offsets (64-bit) of one element of each operand kind. */
static inline int64_t moda_off_q(const moda_operand *a, int64_t b, int64_t t, int64_t h, int64_t g, int64_t i) {
    return b * a->stride[0] + t * a->stride[1] + h * a->stride[2] + g * a->stride[3] + i * a->stride[4];
}
static inline int64_t moda_off_k(const moda_operand *a, int64_t b, int64_t t, int64_t h, int64_t i) {
    return b * a->stride[0] + t * a->stride[1] + h * a->stride[2] + i * a->stride[3];
}
static inline int64_t moda_off_kd(const moda_operand *a, int64_t b, int64_t t, int64_t l, int64_t h, int64_t i) {
    return b * a->stride[0] + t * a->stride[1] + l * a->stride[2] + h * a->stride[3] + i * a->stride[4];
}
static inline int64_t moda_off_lse(const moda_operand *a, int64_t b, int64_t t, int64_t h, int64_t g) {
    return b * a->stride[0] + t * a->stride[1] + h * a->stride[2] + g * a->stride[3];
}

/* First sequence key and one-past-last sequence key visible to row t (empty when sequence is off). */
static inline void moda_seq_range(const moda_problem *p, int64_t t, int64_t *j0, int64_t *j1) {
    *j0 = 0;
    *j1 = p->sequence ? (p->causal ? t + 1 : p->T) : 0;
}
/* Tokens whose depth slots row t sees: [t, t] in token mode, [C*floor(t/C), t] in chunk mode. */
static inline void moda_depth_tokens(const moda_problem *p, int64_t t, int64_t *u0, int64_t *u1) {
    *u0 = p->chunk ? (t / p->chunk_size) * p->chunk_size : t;
    *u1 = t + 1;
}

/* Error reporting: sets the thread's message and returns the status, so call sites read
 * `return moda_fail(MODA_ERR_..., "Kd has %lld slots but ...", ...);` */
moda_status moda_fail(moda_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void moda_clear_error(void);

/* Scalar conversions between storage dtypes and float/double (src/dtype.c). Round to nearest even.
 * Exported (not in moda.h) because the test utilities and tools use them. */
MODA_API float moda_f16_to_f32(uint16_t h);
MODA_API uint16_t moda_f32_to_f16(float f);
MODA_API float moda_bf16_to_f32(uint16_t h);
MODA_API uint16_t moda_f32_to_bf16(float f);
/* Reads element `offset` of an array of `dtype` as double; writes one element from double. */
MODA_API double moda_load(const void *base, moda_dtype dtype, int64_t offset);
MODA_API void moda_store(void *base, moda_dtype dtype, int64_t offset, double value);
/* Rounds a double to the precision of dtype (identity for f64). */
MODA_API double moda_round_to(double x, moda_dtype dtype);

/* ---- backends (each validated by api.c before it is called) ---- */

/* float64 reference (src/cpu/reference.c): computes in double whatever the storage dtype. With
 * round_dtype != MODA_F64 it rounds every product result and the probabilities to that dtype, which is the
 * "straightforward same-precision version" of spec.md §4's tolerance policy. */
moda_status moda_cpu_reference_forward(const moda_problem *p, moda_dtype round_dtype);
moda_status moda_cpu_reference_backward(const moda_problem *p, moda_dtype round_dtype);

/* fast CPU path (src/cpu/fast_forward.c, fast_backward.c): f32, f16, bf16 storage, fp32 arithmetic. */
moda_status moda_cpu_fast_forward(const moda_problem *p);
size_t moda_cpu_fast_backward_workspace(const moda_problem *p);
moda_status moda_cpu_fast_backward(const moda_problem *p, void *workspace, size_t workspace_bytes);

/* CUDA (src/cuda/ *.cu; src/cuda_stub.c when built without CUDA). `check` runs inside validation, before any
 * output is touched: device-specific support (dtype, head dim, alignment, pointer location). */
int moda_cuda_devices(void);
moda_status moda_cuda_check(const moda_problem *p, int backward);
moda_status moda_cuda_forward(const moda_problem *p, void *stream);
size_t moda_cuda_backward_workspace(const moda_problem *p);
moda_status moda_cuda_backward(const moda_problem *p, void *workspace, size_t workspace_bytes, void *stream);

/* ---- private library hooks used by tests and tools (exported from libmoda, not part of moda.h) ---- */
/* The float64 reference over any input/output dtypes: computes in double; with round_dtype other than F64
 * rounds logits, probabilities and outputs to it (the same-precision reference). */
MODA_API moda_status moda_testing_reference_forward(const moda_options *options, const moda_tensor *q,
                                                    const moda_tensor *k, const moda_tensor *v,
                                                    const moda_tensor *kd, const moda_tensor *vd,
                                                    const moda_tensor *o, const moda_tensor *lse,
                                                    moda_dtype round_dtype);
MODA_API moda_status moda_testing_reference_backward(const moda_options *options, const moda_tensor *q,
                                                     const moda_tensor *k, const moda_tensor *v,
                                                     const moda_tensor *kd, const moda_tensor *vd,
                                                     const moda_tensor *o, const moda_tensor *lse,
                                                     const moda_tensor *dout, const moda_tensor *dq,
                                                     const moda_tensor *dk, const moda_tensor *dv,
                                                     const moda_tensor *dkd, const moda_tensor *dvd,
                                                     moda_dtype round_dtype);

#ifdef __cplusplus
}
#endif

#endif /* MODA_INTERNAL_H */
