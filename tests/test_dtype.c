/* test_dtype.c - storage conversions are exact IEEE round-to-nearest-even: every f16 and bf16 value round
 * trips through f32, and f32 -> f16/bf16 matches rounding done independently in double arithmetic. */
#include "testutil.h"

#include <math.h>
#include <string.h>

/* Round x to a binary format with `mant` fraction bits, minimum normal exponent `emin`, by scaling in double
 * (exact for these widths) and rint (round half to even): an independent oracle for the bit tricks. */
static double round_format(double x, int mant, int emin, double maxval) {
    if (isnan(x) || x == 0) return x;
    int e;
    frexp(x, &e);
    e -= 1; /* x = m * 2^e with 1 <= |m| < 2 */
    if (e < emin) e = emin;
    double ulp = ldexp(1.0, e - mant);
    double r = rint(x / ulp) * ulp;
    if (fabs(r) > maxval) return copysign(INFINITY, x);
    return r;
}

int main(void) {
    tu_rng rng = tu_rng_from_env("test_dtype");
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = moda_f16_to_f32((uint16_t)h);
        if (isnan(f)) continue;
        if (moda_f32_to_f16(f) != h) bad++;
    }
    TU_CHECK(bad == 0, "%d f16 values do not round trip", bad);
    bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = moda_bf16_to_f32((uint16_t)h);
        if (isnan(f)) continue;
        if (moda_f32_to_bf16(f) != h) bad++;
    }
    TU_CHECK(bad == 0, "%d bf16 values do not round trip", bad);
    int bad16 = 0, badb = 0;
    for (int i = 0; i < 2000000; i++) {
        /* log-uniform magnitudes over the f16 subnormal..overflow range and beyond */
        float x = (float)(ldexp(1.0 + tu_uniform(&rng), (int)(tu_uniform(&rng) * 50) - 30) * (tu_uniform(&rng) < 0.5 ? -1 : 1));
        double want16 = round_format(x, 10, -14, 65504.0);
        double wantb = round_format(x, 7, -126, 3.3895313892515355e38);
        if ((double)moda_f16_to_f32(moda_f32_to_f16(x)) != want16) bad16++;
        if ((double)moda_bf16_to_f32(moda_f32_to_bf16(x)) != wantb) badb++;
    }
    TU_CHECK(bad16 == 0, "%d f32 -> f16 roundings differ from round-to-nearest-even", bad16);
    TU_CHECK(badb == 0, "%d f32 -> bf16 roundings differ from round-to-nearest-even", badb);
    TU_CHECK(isnan(moda_bf16_to_f32(moda_f32_to_bf16(NAN))), "NaN stays NaN in bf16");
    TU_CHECK(isnan(moda_f16_to_f32(moda_f32_to_f16(NAN))), "NaN stays NaN in f16");
    TU_CHECK(isinf(moda_f16_to_f32(moda_f32_to_f16(70000.f))), "f16 overflow gives infinity");
    /* moda_convert over an array agrees with the scalar conversions */
    float src[64];
    uint16_t dst[64];
    for (int i = 0; i < 64; i++) src[i] = (float)tu_normal(&rng);
    TU_CHECK_STATUS(moda_convert(dst, MODA_BF16, src, MODA_F32, 64), MODA_OK);
    for (int i = 0; i < 64; i++) TU_CHECK(dst[i] == moda_f32_to_bf16(src[i]), "moda_convert element %d", i);
    return tu_finish("test_dtype");
}
