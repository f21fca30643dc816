/*
 * moda.h - Mixture-of-Depths Attention (MoDA): the one public header of libmoda.
 *
 * Each query row attends, under ONE softmax, to the causal sequence keys/values of its layer and to the
 * "depth" keys/values that earlier layers wrote for the same token (Zhu et al., 2026). The exact semantics,
 * layouts and numerics are in docs/spec.md; this header is the C contract.
 *
 * Conventions
 *  - Every entry point validates all of its arguments before it touches an output and returns a moda_status.
 *    On any status other than MODA_OK the outputs are untouched and moda_last_error() says why, in words a
 *    user can act on. The library never aborts, exits or prints on the caller's behalf.
 *  - The caller owns all memory (inputs, outputs, workspace). Hot paths do not allocate.
 *  - Tensors are strided views: a data pointer, a dtype, a device, and a 64-bit shape and stride (in elements)
 *    per logical dimension. All offsets are computed in 64 bits.
 */
#ifndef MODA_H
#define MODA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MODA_VERSION_MAJOR 0
#define MODA_VERSION_MINOR 1
#define MODA_VERSION_PATCH 0
#define MODA_VERSION_STRING "0.1.0"

#if defined(_WIN32) && defined(MODA_BUILDING_SHARED)
#define MODA_API __declspec(dllexport)
#elif defined(__GNUC__)
#define MODA_API __attribute__((visibility("default")))
#else
#define MODA_API
#endif

/* ---------------------------------------------------------------------------------------------------------
 * Status codes
 * ------------------------------------------------------------------------------------------------------- */
typedef enum moda_status {
    MODA_OK = 0,
    MODA_ERR_INVALID_ARGUMENT = 1, /* an option or argument is out of its domain */
    MODA_ERR_NULL_POINTER = 2,     /* a tensor that this call uses has no data pointer */
    MODA_ERR_SHAPE_MISMATCH = 3,   /* B, T, Hk, G, d, dv or Lcap disagree across tensors */
    MODA_ERR_DEPTH_RANGE = 4,      /* d0 > d1, or d1 > Lcap */
    MODA_ERR_UNSUPPORTED = 5,      /* a dtype, head dim, layout or option the chosen device does not support */
    MODA_ERR_NOT_BUILT = 6,        /* the device's backend was not compiled into this libmoda */
    MODA_ERR_WRONG_DEVICE = 7,     /* tensors on different devices, or memory not where the view says */
    MODA_ERR_OVERLAP = 8,          /* an output overlaps an input or another output */
    MODA_ERR_OVERFLOW = 9,         /* sizes whose product or extent overflows 64 bits */
    MODA_ERR_LAYOUT = 10,          /* a stride the device cannot use (e.g. non-unit innermost stride on GPU) */
    MODA_ERR_WORKSPACE = 11,       /* workspace missing or smaller than moda_backward_workspace_size says */
    MODA_ERR_OUT_OF_MEMORY = 12,   /* a host allocation failed (only outside hot paths) */
    MODA_ERR_DEVICE_FAILURE = 13,  /* the device runtime reported an error (the message carries its text) */
    MODA_ERR_IO = 14,              /* reading or writing a file failed */
    MODA_ERR_CORRUPT = 15          /* a file failed validation (magic, version, size, checksum) */
} moda_status;

/* The message of the last failing call on this thread ("" when none). Valid until the next call on this
 * thread that fails. Never NULL. */
MODA_API const char *moda_last_error(void);
/* A fixed name for a status ("MODA_ERR_SHAPE_MISMATCH"). */
MODA_API const char *moda_status_string(moda_status status);
MODA_API const char *moda_version(void);

/* ---------------------------------------------------------------------------------------------------------
 * Data types and devices
 * ------------------------------------------------------------------------------------------------------- */
typedef enum moda_dtype {
    MODA_F32 = 0,
    MODA_F16 = 1,
    MODA_BF16 = 2,
    /* float64 runs the float64 reference implementation on the CPU: the oracle of every test, written for
     * clarity, not speed. */
    MODA_F64 = 3
} moda_dtype;

typedef enum moda_device {
    MODA_CPU = 0,
    MODA_CUDA = 1
} moda_device;

MODA_API size_t moda_dtype_size(moda_dtype dtype);     /* 0 for an unknown dtype */
MODA_API const char *moda_dtype_name(moda_dtype dtype); /* "f32", "f16", "bf16", "f64", or "unknown" */

/* Converts n host elements between dtypes (round to nearest even; NaN stays NaN). src and dst may not
 * overlap unless they are the same pointer with the same dtype. */
MODA_API moda_status moda_convert(void *dst, moda_dtype dst_dtype, const void *src, moda_dtype src_dtype,
                                  int64_t n);

/* Number of CUDA devices usable by this libmoda (0 when built without CUDA or when none is present). */
MODA_API int moda_cuda_device_count(void);

/* ---------------------------------------------------------------------------------------------------------
 * Tensors
 *
 * Logical shapes (spec.md §1). Strides are in elements, may be any non-negative value, and are 64-bit.
 *   q, o     [B, T, Hk, G, d]  / [B, T, Hk, G, dv]   query head hq = h*G + g uses key/value head h
 *   k, v     [B, T, Hk, d]     / [B, T, Hk, dv]
 *   kd, vd   [B, T, Lcap, Hk, d] / [B, T, Lcap, Hk, dv]
 *   lse      [B, T, Hk, G]     float32 (float64 allowed when the inputs are float64)
 * Two zero-copy views of q that users have today:
 *   standard [B, T, Hq, d]:           strides (T*Hq*d, Hq*d, G*d, d, 1)
 *   the authors' folded [B, T*G, Hk, d] (row t*G+g): strides (T*G*Hk*d, G*Hk*d, d, Hk*d, 1)
 * ------------------------------------------------------------------------------------------------------- */
#define MODA_MAX_DIMS 5

typedef struct moda_tensor {
    void *data;
    moda_dtype dtype;
    moda_device device;
    int ndim;
    int64_t shape[MODA_MAX_DIMS];
    int64_t stride[MODA_MAX_DIMS];
} moda_tensor;

/* A row-major contiguous view of ndim (1..5) dimensions. */
MODA_API moda_tensor moda_tensor_contiguous(void *data, moda_dtype dtype, moda_device device, int ndim,
                                            const int64_t *shape);
/* A view with explicit strides (elements). */
MODA_API moda_tensor moda_tensor_strided(void *data, moda_dtype dtype, moda_device device, int ndim,
                                         const int64_t *shape, const int64_t *stride);
/* q (or o) stored as the standard contiguous [B, T, Hq = Hk*G, d], presented as the 5-D [B, T, Hk, G, d]. */
MODA_API moda_tensor moda_tensor_q_standard(void *data, moda_dtype dtype, moda_device device, int64_t B,
                                            int64_t T, int64_t Hk, int64_t G, int64_t d);
/* q (or o) stored in the authors' time-folded contiguous [B, T*G, Hk, d], presented as [B, T, Hk, G, d]. */
MODA_API moda_tensor moda_tensor_q_folded(void *data, moda_dtype dtype, moda_device device, int64_t B,
                                          int64_t T, int64_t Hk, int64_t G, int64_t d);

/* ---------------------------------------------------------------------------------------------------------
 * Options
 * ------------------------------------------------------------------------------------------------------- */
typedef enum moda_depth_mode {
    MODA_DEPTH_TOKEN = 0, /* row t sees its own token's slots [d0, d1) (the paper's MoDA) */
    MODA_DEPTH_CHUNK = 1  /* row t sees slots [d0, d1) of every token t' in [C*floor(t/C), t]; causal only */
} moda_depth_mode;

typedef enum moda_depth_grad_mode {
    MODA_DEPTH_GRAD_OVERWRITE = 0,  /* dKd/dVd of the visible slots are overwritten */
    MODA_DEPTH_GRAD_ACCUMULATE = 1  /* dKd/dVd of the visible slots are added into (a model accumulates the
                                       depth gradients of every later layer in one buffer) */
} moda_depth_grad_mode;

/* Passed as depth_end: every allocated slot (d1 = Lcap). */
#define MODA_DEPTH_ALL (-1)

typedef struct moda_options {
    int causal;            /* 1: sequence keys j <= t; 0: all j < T. Default 1. */
    int sequence;          /* 1: sequence keys on; 0: depth-only attention ("Flash Depth Attention"). Default 1. */
    moda_depth_mode depth_mode;   /* default MODA_DEPTH_TOKEN */
    int64_t chunk_size;           /* C for MODA_DEPTH_CHUNK (>= 1). Default 64. */
    int64_t depth_begin;          /* d0. Default 0. */
    int64_t depth_end;            /* d1, or MODA_DEPTH_ALL for Lcap. Default MODA_DEPTH_ALL. */
    double scale;                 /* logit scale s; 0 means 1/sqrt(d). Default 0. Must be finite. */
    moda_depth_grad_mode depth_grad_mode; /* backward only; default overwrite */
    int deterministic;     /* backward: 1 gives bitwise-identical results run to run. Default 1. */
    int num_threads;       /* CPU: worker threads; 0 = the OpenMP default. */
} moda_options;

MODA_API moda_options moda_default_options(void);

/* ---------------------------------------------------------------------------------------------------------
 * The operator
 *
 * The device is the tensors' device (all must agree). `stream` is a cudaStream_t for MODA_CUDA (NULL: the
 * default stream) and ignored on the CPU. CUDA calls are asynchronous on the stream and never synchronise
 * the host.
 *
 * Tensors that a call does not use may be NULL: k and v when options.sequence == 0; kd and vd when no depth
 * slot is visible (d0 == d1, or Lcap == 0 with depth_end == MODA_DEPTH_ALL); lse in the forward.
 * kd/vd present with Lcap = shape[2] define Lcap; absent, Lcap = 0.
 * Storage dtypes: f32, f16, bf16 (and f64 on the CPU, which runs the reference). q, k, v, kd, vd, o, dout
 * and dq, dk, dv share one dtype; dkd and dvd may instead be float32 when the inputs are f16/bf16 (an fp32
 * depth-gradient accumulator across layers).
 * ------------------------------------------------------------------------------------------------------- */
MODA_API moda_status moda_forward(const moda_options *options, const moda_tensor *q, const moda_tensor *k,
                                  const moda_tensor *v, const moda_tensor *kd, const moda_tensor *vd,
                                  const moda_tensor *o, const moda_tensor *lse, void *stream);

/* Bytes of workspace moda_backward needs for these arguments (device memory for CUDA, host memory for the
 * CPU). 0 is a valid answer. */
MODA_API moda_status moda_backward_workspace_size(const moda_options *options, const moda_tensor *q,
                                                  const moda_tensor *k, const moda_tensor *v,
                                                  const moda_tensor *kd, const moda_tensor *vd,
                                                  size_t *bytes);

/* Gradients of the forward's O with respect to every input, given dout = dL/dO and the forward's o and lse.
 * dq, dk, dv are overwritten; dkd, dvd follow options.depth_grad_mode and only the visible slots [d0, d1)
 * are touched. dk/dv may be NULL when the sequence part is off; dkd/dvd when no depth slot is visible.
 * On the CPU a NULL workspace with a non-zero size is allowed (the CPU path then allocates); CUDA needs it. */
MODA_API moda_status moda_backward(const moda_options *options, const moda_tensor *q, const moda_tensor *k,
                                   const moda_tensor *v, const moda_tensor *kd, const moda_tensor *vd,
                                   const moda_tensor *o, const moda_tensor *lse, const moda_tensor *dout,
                                   const moda_tensor *dq, const moda_tensor *dk, const moda_tensor *dv,
                                   const moda_tensor *dkd, const moda_tensor *dvd, void *workspace,
                                   size_t workspace_bytes, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* MODA_H */
