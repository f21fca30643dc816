/*
 * api.cu - the CUDA backend's entry points that src/api.c calls: device count, the device-specific checks
 * that run inside validation (before any output is touched), and the forward dispatch.
 *
 * Dispatch: on compute capability 9.0 with the sm_90a image loaded, f16/bf16 with d == dv in {64, 128} and
 * TMA-legal views -> the Hopper kernel (forward_hopper.cu: wgmma, TMA, warp specialisation); otherwise f16/bf16
 * with d == dv in {64, 128} and 16-byte aligned rows -> the mma.sync tensor-core kernel (forward_fast.cu); every
 * other supported case (d, dv up to 256 in any combination, f32 storage, element-aligned views) -> the generic
 * kernel (forward_generic.cu). All compute spec.md §2 exactly; the choice never changes which problems are
 * accepted. MODA_CUDA_FORWARD=auto|hopper|mma|generic (read at each forward call) forces the first kernel tried, so
 * that tests and benchmarks can run each path on the same machine: "mma" skips the Hopper kernel, "generic"
 * uses the generic kernel for everything, "hopper" and "auto" take the order above.
 */
#include "common.cuh"
#include "forward_hopper.cuh"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" int moda_cuda_devices(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        moda_cuda_clear_error();
        return 0;
    }
    return n;
}

/* Whether "auto" takes the Hopper kernel: on since the GPU grid passed on an H100 on both paths with memcheck and
 * racecheck clean (docs/cuda_hopper_notes.md records the runs); -DMODA_HOPPER_FORWARD_DEFAULT=0 turns it off. */
#ifndef MODA_HOPPER_FORWARD_DEFAULT
#define MODA_HOPPER_FORWARD_DEFAULT 1
#endif

namespace {

const char *dtype_name(moda_dtype t) { return moda_dtype_name(t); }

/* Layout and location of one used operand: unit innermost stride, element-aligned base, device memory of
 * the current device. */
moda_status check_operand(const char *name, const moda_operand *a, int ndim, int64_t inner_extent, int device) {
    if (!a->data) return MODA_OK;
    if (a->stride[ndim - 1] != 1 && inner_extent > 1)
        return moda_fail(MODA_ERR_LAYOUT,
                         "%s has innermost stride %lld; the CUDA backend needs unit innermost stride "
                         "(make the last dimension contiguous)",
                         name, (long long)a->stride[ndim - 1]);
    const size_t es = moda_dtype_size(a->dtype);
    if (es && ((uintptr_t)a->data) % es)
        return moda_fail(MODA_ERR_LAYOUT, "%s data pointer %p is not aligned to its %s element size (%zu bytes)",
                         name, a->data, dtype_name(a->dtype), es);
    cudaPointerAttributes attr;
    cudaError_t err = cudaPointerGetAttributes(&attr, a->data);
    if (err != cudaSuccess) {
        moda_cuda_clear_error();
        return moda_fail(MODA_ERR_WRONG_DEVICE,
                         "%s (%p) is marked as a CUDA tensor but the CUDA runtime does not know the pointer (%s)",
                         name, a->data, cudaGetErrorString(err));
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
        return moda_fail(MODA_ERR_WRONG_DEVICE,
                         "%s (%p) is marked as a CUDA tensor but points to %s memory; copy it to the device "
                         "(cudaMalloc) or pass it as a CPU tensor",
                         name, a->data, attr.type == cudaMemoryTypeHost ? "pinned host" : "unregistered host");
    if (attr.type == cudaMemoryTypeDevice && attr.device != device)
        return moda_fail(MODA_ERR_WRONG_DEVICE,
                         "%s lives on CUDA device %d but the current device is %d; call cudaSetDevice(%d) "
                         "or move the tensor",
                         name, attr.device, device, attr.device);
    return MODA_OK;
}

} // namespace

extern "C" moda_status moda_cuda_check(const moda_problem *p, int backward) {
    if (moda_cuda_devices() <= 0)
        return moda_fail(MODA_ERR_WRONG_DEVICE, "tensors are on MODA_CUDA but no CUDA device is available");
    if (p->dtype != MODA_F16 && p->dtype != MODA_BF16 && p->dtype != MODA_F32)
        return moda_fail(MODA_ERR_UNSUPPORTED, "dtype %s is not supported on CUDA (f16, bf16 and f32 are)",
                         dtype_name(p->dtype));
    if (p->d < 1 || p->d > 256 || p->dv < 1 || p->dv > 256)
        return moda_fail(MODA_ERR_UNSUPPORTED,
                         "head dims d=%lld dv=%lld have no CUDA kernel (each must be in 1..256; d == dv in "
                         "{64, 128} with f16/bf16 takes the tensor-core path)",
                         (long long)p->d, (long long)p->dv);
    if (moda_problem_slots(p) > 2147483647LL - 64)
        return moda_fail(MODA_ERR_UNSUPPORTED, "%lld visible depth slots exceed what the CUDA kernels index",
                         (long long)moda_problem_slots(p));
    if (p->lse.data && p->lse.dtype != MODA_F32)
        return moda_fail(MODA_ERR_UNSUPPORTED, "lse must be float32 on CUDA (got %s)", dtype_name(p->lse.dtype));

    int device = 0;
    MODA_CUDA_TRY(cudaGetDevice(&device));
    struct {
        const char *name;
        const moda_operand *a;
        int ndim;
        int64_t inner;
    } ops[] = {
        {"q", &p->q, 5, p->d},       {"k", &p->k, 4, p->d},       {"v", &p->v, 4, p->dv},
        {"kd", &p->kd, 5, p->d},     {"vd", &p->vd, 5, p->dv},    {"o", &p->o, 5, p->dv},
        {"lse", &p->lse, 4, p->G},   {"dout", &p->grad_o, 5, p->dv}, {"dq", &p->grad_q, 5, p->d},
        {"dk", &p->grad_k, 4, p->d}, {"dv", &p->grad_v, 4, p->dv},  {"dkd", &p->grad_kd, 5, p->d},
        {"dvd", &p->grad_vd, 5, p->dv},
    };
    const int nops = backward ? (int)(sizeof ops / sizeof ops[0]) : 7;
    for (int i = 0; i < nops; i++) {
        /* lse is [B,T,Hk,G]: its innermost dimension is G, which needs no unit stride. */
        if (i == 6) {
            if (!p->lse.data) continue;
            moda_operand tmp = p->lse;
            tmp.stride[3] = 1;
            moda_status st = check_operand("lse", &tmp, 4, 1, device);
            if (st != MODA_OK) return st;
            continue;
        }
        moda_status st = check_operand(ops[i].name, ops[i].a, ops[i].ndim, ops[i].inner, device);
        if (st != MODA_OK) return st;
    }
    if (backward) {
        const moda_operand *g[2] = {&p->grad_kd, &p->grad_vd};
        const char *gn[2] = {"dkd", "dvd"};
        for (int i = 0; i < 2; i++)
            if (g[i]->data && g[i]->dtype != p->dtype && g[i]->dtype != MODA_F32)
                return moda_fail(MODA_ERR_UNSUPPORTED, "%s must be %s or f32 on CUDA (got %s)", gn[i],
                                 dtype_name(p->dtype), dtype_name(g[i]->dtype));
    }
    return MODA_OK;
}

namespace {

enum forward_path { PATH_AUTO, PATH_HOPPER, PATH_MMA, PATH_GENERIC };

/* MODA_CUDA_FORWARD at this call (a getenv per forward, negligible next to a launch, so that one test process
 * can run its grid on each path in turn); unset or unknown means auto. */
forward_path forced_path(void) {
    const char *e = getenv("MODA_CUDA_FORWARD");
    if (!e) return PATH_AUTO;
    if (!strcmp(e, "hopper")) return PATH_HOPPER;
    if (!strcmp(e, "mma")) return PATH_MMA;
    if (!strcmp(e, "generic")) return PATH_GENERIC;
    return PATH_AUTO;
}

/* The kernel family of this thread's last forward launch, for tests (moda_testing_cuda_last_forward). */
thread_local const char *last_forward = "none";

} // namespace

extern "C" moda_status moda_cuda_forward(const moda_problem *p, void *stream) {
    if (p->B == 0 || p->T == 0 || p->Hk == 0 || p->G == 0) return MODA_OK;
    cudaStream_t s = (cudaStream_t)stream;
    const forward_path path = forced_path();
    if (path != PATH_GENERIC) {
        if ((path == PATH_HOPPER || (path == PATH_AUTO && MODA_HOPPER_FORWARD_DEFAULT)) &&
            moda_cuda_hopper_forward_supports(p)) {
            int launched = 0;
            const moda_status st = moda_cuda_hopper_forward(p, s, &launched);
            if (st != MODA_OK || launched) {
                last_forward = "hopper";
                return st;
            }
        }
        if (moda_cuda_fast_forward_supports(p)) {
            last_forward = "mma";
            return moda_cuda_fast_forward(p, s);
        }
    }
    last_forward = "generic";
    return moda_cuda_generic_forward(p, s);
}

/* Private hook (not in moda.h; tests declare it): "hopper", "mma" or "generic" for the kernel family the last
 * forward on this thread chose ("none" before any). */
extern "C" MODA_API const char *moda_testing_cuda_last_forward(void) { return last_forward; }
