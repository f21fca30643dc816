/* dtype.c - storage dtypes: sizes, names, scalar conversions, and the thread's error message. */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* ---- error state: one message per thread, so concurrent callers never see each other's errors ---- */
static _Thread_local char last_error[1024];

const char *moda_last_error(void) { return last_error; }

void moda_clear_error(void) { last_error[0] = '\0'; }

moda_status moda_fail(moda_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

const char *moda_status_string(moda_status status) {
    switch (status) {
    case MODA_OK: return "MODA_OK";
    case MODA_ERR_INVALID_ARGUMENT: return "MODA_ERR_INVALID_ARGUMENT";
    case MODA_ERR_NULL_POINTER: return "MODA_ERR_NULL_POINTER";
    case MODA_ERR_SHAPE_MISMATCH: return "MODA_ERR_SHAPE_MISMATCH";
    case MODA_ERR_DEPTH_RANGE: return "MODA_ERR_DEPTH_RANGE";
    case MODA_ERR_UNSUPPORTED: return "MODA_ERR_UNSUPPORTED";
    case MODA_ERR_NOT_BUILT: return "MODA_ERR_NOT_BUILT";
    case MODA_ERR_WRONG_DEVICE: return "MODA_ERR_WRONG_DEVICE";
    case MODA_ERR_OVERLAP: return "MODA_ERR_OVERLAP";
    case MODA_ERR_OVERFLOW: return "MODA_ERR_OVERFLOW";
    case MODA_ERR_LAYOUT: return "MODA_ERR_LAYOUT";
    case MODA_ERR_WORKSPACE: return "MODA_ERR_WORKSPACE";
    case MODA_ERR_OUT_OF_MEMORY: return "MODA_ERR_OUT_OF_MEMORY";
    case MODA_ERR_DEVICE_FAILURE: return "MODA_ERR_DEVICE_FAILURE";
    case MODA_ERR_IO: return "MODA_ERR_IO";
    case MODA_ERR_CORRUPT: return "MODA_ERR_CORRUPT";
    }
    return "MODA_ERR_UNKNOWN";
}

const char *moda_version(void) { return MODA_VERSION_STRING; }

size_t moda_dtype_size(moda_dtype dtype) {
    switch (dtype) {
    case MODA_F32: return 4;
    case MODA_F16: return 2;
    case MODA_BF16: return 2;
    case MODA_F64: return 8;
    }
    return 0;
}

const char *moda_dtype_name(moda_dtype dtype) {
    switch (dtype) {
    case MODA_F32: return "f32";
    case MODA_F16: return "f16";
    case MODA_BF16: return "bf16";
    case MODA_F64: return "f64";
    }
    return "unknown";
}

/* ---- scalar conversions (bit-exact IEEE round to nearest even; no dependence on compiler _Float16) ---- */
static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float moda_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t moda_f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN, sign kept */
    uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)((u + rounding) >> 16);
}

float moda_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return bits_f32(sign);
        /* subnormal: value = man * 2^-24, exact in float */
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t moda_f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t au = u & 0x7fffffffu;
    if (au > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((au >> 13) & 0x3ffu));
    if (au >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: infinity */
    if (au < 0x38800000u) {
        /* result is subnormal or zero: scale so that one f16 subnormal ulp is 1.0, then round to even.
         * Done in double, where x * 2^24 is exact, so rint gives the correctly rounded integer. */
        double x = (double)bits_f32(au) * 16777216.0;
        return (uint16_t)(sign | (uint16_t)rint(x));
    }
    /* normal: drop 13 mantissa bits with round to nearest even; a carry into the exponent is correct */
    uint32_t r = au + 0xfffu + ((au >> 13) & 1u);
    return (uint16_t)(sign | (uint16_t)((r - 0x38000000u) >> 13));
}

double moda_load(const void *base, moda_dtype dtype, int64_t offset) {
    switch (dtype) {
    case MODA_F32: return ((const float *)base)[offset];
    case MODA_F16: return moda_f16_to_f32(((const uint16_t *)base)[offset]);
    case MODA_BF16: return moda_bf16_to_f32(((const uint16_t *)base)[offset]);
    case MODA_F64: return ((const double *)base)[offset];
    }
    return NAN;
}

void moda_store(void *base, moda_dtype dtype, int64_t offset, double value) {
    switch (dtype) {
    case MODA_F32: ((float *)base)[offset] = (float)value; break;
    case MODA_F16: ((uint16_t *)base)[offset] = moda_f32_to_f16((float)value); break;
    case MODA_BF16: ((uint16_t *)base)[offset] = moda_f32_to_bf16((float)value); break;
    case MODA_F64: ((double *)base)[offset] = value; break;
    }
}

double moda_round_to(double x, moda_dtype dtype) {
    switch (dtype) {
    case MODA_F32: return (float)x;
    case MODA_F16: return moda_f16_to_f32(moda_f32_to_f16((float)x));
    case MODA_BF16: return moda_bf16_to_f32(moda_f32_to_bf16((float)x));
    case MODA_F64: return x;
    }
    return x;
}

moda_status moda_convert(void *dst, moda_dtype dst_dtype, const void *src, moda_dtype src_dtype, int64_t n) {
    if (moda_dtype_size(dst_dtype) == 0 || moda_dtype_size(src_dtype) == 0)
        return moda_fail(MODA_ERR_INVALID_ARGUMENT, "moda_convert: unknown dtype (dst %d, src %d)", (int)dst_dtype,
                         (int)src_dtype);
    if (n < 0) return moda_fail(MODA_ERR_INVALID_ARGUMENT, "moda_convert: negative element count %lld", (long long)n);
    if (n == 0) return MODA_OK;
    if (!dst || !src) return moda_fail(MODA_ERR_NULL_POINTER, "moda_convert: %s pointer is NULL", dst ? "src" : "dst");
    size_t dsz = moda_dtype_size(dst_dtype), ssz = moda_dtype_size(src_dtype);
    if ((uint64_t)n > UINT64_MAX / (dsz > ssz ? dsz : ssz))
        return moda_fail(MODA_ERR_OVERFLOW, "moda_convert: %lld elements overflow the address space", (long long)n);
    const char *d = dst, *s = src;
    int same = dst == src && dst_dtype == src_dtype;
    if (!same && d < s + (size_t)n * ssz && s < d + (size_t)n * dsz)
        return moda_fail(MODA_ERR_OVERLAP, "moda_convert: src and dst overlap");
    if (same) return MODA_OK;
    /* f32 -> f16/bf16 must round from the float value, not via double, to avoid double rounding. */
    for (int64_t i = 0; i < n; i++) {
        if (src_dtype == MODA_F32 && dst_dtype == MODA_BF16)
            ((uint16_t *)dst)[i] = moda_f32_to_bf16(((const float *)src)[i]);
        else if (src_dtype == MODA_F32 && dst_dtype == MODA_F16)
            ((uint16_t *)dst)[i] = moda_f32_to_f16(((const float *)src)[i]);
        else
            moda_store(dst, dst_dtype, i, moda_load(src, src_dtype, i));
    }
    moda_clear_error();
    return MODA_OK;
}
