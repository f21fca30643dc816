/* cuda_stub.c - the CUDA entry points of a libmoda built without CUDA: every CUDA call is refused with
 * MODA_ERR_NOT_BUILT and a message that says how to get the backend, never a silent CPU fallback. */
#include "internal.h"

static moda_status not_built(void) {
    return moda_fail(MODA_ERR_NOT_BUILT,
                     "this libmoda was built without CUDA: rebuild where nvcc is installed (cmake -DMODA_CUDA=ON) to run on a GPU");
}

int moda_cuda_devices(void) { return 0; }
moda_status moda_cuda_check(const moda_problem *p, int backward) { return not_built(); }
moda_status moda_cuda_forward(const moda_problem *p, void *stream) { return not_built(); }
size_t moda_cuda_backward_workspace(const moda_problem *p) { return 0; }
moda_status moda_cuda_backward(const moda_problem *p, void *workspace, size_t workspace_bytes, void *stream) {
    return not_built();
}
