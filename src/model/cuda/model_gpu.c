/*
 * model_gpu.c - the MoDA language model on one CUDA device: the control flow of model_core.h in mixed
 * precision (docs/model_notes.md, "GPU").
 *
 * Precision: fp32 master weights, gradients and AdamW state; a bf16 copy of the weights that every GEMM reads;
 * bf16 activations; fp32 norm statistics, attention normalisers, logits and the depth-gradient accumulators
 * dKd/dVd; the residual gradient in fp32 (with a bf16 copy for the GEMMs). GEMMs are cuBLASLt bf16 x bf16 with
 * fp32 accumulation, writing bf16 activations or fp32 gradients (weight gradients accumulate with beta = 1,
 * which is also how micro-batches accumulate).
 *
 * Why a second control flow instead of another instantiation of model_core.h: the CPU core is written for one
 * element type, and here every buffer has its own (bf16 activations, fp32 statistics and gradients); the
 * block structure, buffer names and order of operations follow model_core.h line by line so that the two are
 * read side by side.
 *
 * Everything runs on one stream; all memory is allocated at creation (one arena for activations, one for the
 * parameter state); the only host synchronisations are the loss / gradient-norm read-back at the end of a
 * step and the checkpoint transfers. Errors come back as moda_status with a message; nothing exits.
 */
#include "gpu_kernels.h"
#include "model.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef moda_bf16_t bf16;

#define MAX_PLANS 256
#define PROF_EVENTS 16384
#define LT_WS_BYTES ((size_t)32 << 20)

typedef struct gemm_plan {
    int ta, tb, cf32, beta1, align;
    int64_t M, N, K, lda, ldb, ldc;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
} gemm_plan;

typedef struct gblock {
    bf16 *x, *xn_a, *xn_f, *sum_a, *sum_f;
    float *rstd_a, *rstd_f;
    bf16 *qr, *kr;
    float *rstd_q, *rstd_k;
    bf16 *q, *k, *v;
    int64_t k_ld, v_ld;
    bf16 *a;
    float *lse;
    bf16 *xmid, *h1, *h3, *g;
    int64_t d0, d1, slot_attn, slot_ffn;
} gblock;

struct moda_gpu_model {
    moda_model_config c;
    int64_t B, T, M, L, max_micro;
    int det_attn; /* the attention backward's mode (moda_options.deterministic) */
    int ntensors;
    moda_param_info *tab;
    int64_t nparams;
    int64_t *poff;
    cudaStream_t stream;
    cublasLtHandle_t lt;
    void *lt_ws;
    gemm_plan plans[MAX_PLANS];
    int nplans;
    /* parameter state (one allocation) */
    void *pstate;
    float *p32, *g32, *m32, *v32;
    bf16 *p16;
    mg_chunk *chunks;
    int64_t nchunks;
    double *partial, *scalars; /* scalars: [0] loss sum, [1] grad norm */
    double *host_scalars;      /* pinned */
    /* activations (one allocation) */
    void *arena;
    size_t arena_bytes;
    gblock *blk;
    bf16 *kd, *vd;
    float *dkd, *dvd;
    bf16 *xfinal, *xf;
    float *rstd_final;
    float *rope_cos, *rope_sin;
    float *dx, *dxin, *dqr32, *dkr32;
    bf16 *dx16, *tmp16, *dq, *dk, *dv, *da, *dh1, *dh3, *dg, *dkf16, *dvf16;
    float *logits;
    bf16 *dlogits;
    float *rowloss;
    float *dw_partial;
    int64_t dw_chunks;
    int64_t head_rows;
    void *ws;
    size_t ws_bytes;
    int32_t *tok; /* device: per micro-batch [in M | tgt M | uniq M | segoff M+1 | rows M | segb 2M+1] */
    float *emb_partial; /* the embedding backward's segment sums [max segments, D] */
    int64_t max_seg;
    int32_t *host_tok; /* pinned, max_micro of them */
    int64_t tok_stride;
    int32_t *count;    /* host scratch for the embedding's counting sort [V] */
    /* profiling */
    int prof;
    cudaEvent_t *ev;
    int *ev_phase;
    int nev, cur_phase;
    double prof_ms[MODA_GPU_PHASES];
    int64_t prof_steps;
};

static const char *const phase_names[MODA_GPU_PHASES] = {"gemm", "attention fwd", "attention bwd", "elementwise",
                                                          "optimizer", "copies"};
const char *moda_gpu_phase_name(int p) { return p >= 0 && p < MODA_GPU_PHASES ? phase_names[p] : "?"; }

static moda_status cuda_fail(cudaError_t e, const char *what) {
    return moda_model_fail(MODA_ERR_DEVICE_FAILURE, "%s: %s", what, cudaGetErrorString(e));
}
#define CK(call, what)                                                                                             \
    do {                                                                                                           \
        cudaError_t e_ = (call);                                                                                   \
        if (e_ != cudaSuccess) return cuda_fail(e_, what);                                                         \
    } while (0)
#define KL(call)                                                                                                   \
    do {                                                                                                           \
        int e_ = (call);                                                                                           \
        if (e_) return cuda_fail((cudaError_t)e_, #call);                                                          \
    } while (0)

/* ---- profiling: an event at every change of phase; durations summed after the step's synchronisation ---- */
static void mark(moda_gpu_model *g, int phase) {
    if (!g->prof || phase == g->cur_phase || g->nev >= PROF_EVENTS) return;
    cudaEventRecord(g->ev[g->nev], g->stream);
    g->ev_phase[g->nev] = phase;
    g->nev++;
    g->cur_phase = phase;
}

static void prof_collect(moda_gpu_model *g) {
    if (!g->prof) return;
    mark(g, MODA_GPU_PHASES); /* end marker */
    cudaEventSynchronize(g->ev[g->nev - 1]);
    for (int i = 0; i + 1 < g->nev; i++) {
        float ms = 0;
        cudaEventElapsedTime(&ms, g->ev[i], g->ev[i + 1]);
        g->prof_ms[g->ev_phase[i]] += ms;
    }
    g->nev = 0;
    g->cur_phase = -1;
}

/* ---- cuBLASLt GEMM, row-major: C[M,N] = op(A) op(B) (+ C when beta1); A, B bf16; C bf16 or fp32 ---- */
static int align_of(const void *p, int64_t ld, size_t esz) {
    uintptr_t a = (uintptr_t)p | (uintptr_t)((size_t)ld * esz);
    int al = 256;
    while (al > 2 && (a % (uintptr_t)al)) al >>= 1;
    return al;
}

static moda_status plan_get(moda_gpu_model *g, int ta, int tb, int64_t M, int64_t N, int64_t K, int64_t lda,
                            int64_t ldb, int64_t ldc, int cf32, int beta1, int align, gemm_plan **out) {
    for (int i = 0; i < g->nplans; i++) {
        gemm_plan *p = &g->plans[i];
        if (p->ta == ta && p->tb == tb && p->M == M && p->N == N && p->K == K && p->lda == lda && p->ldb == ldb &&
            p->ldc == ldc && p->cf32 == cf32 && p->beta1 == beta1 && p->align == align) {
            *out = p;
            return MODA_OK;
        }
    }
    if (g->nplans >= MAX_PLANS) return moda_model_fail(MODA_ERR_UNSUPPORTED, "more than %d GEMM shapes", MAX_PLANS);
    gemm_plan *p = &g->plans[g->nplans];
    memset(p, 0, sizeof *p);
    *p = (gemm_plan){ta, tb, cf32, beta1, align, M, N, K, lda, ldb, ldc, 0, 0, 0, 0, {{0}}};
    /* column-major view: C^T[N,M] = op(B)^T op(A)^T; Lt's A is our B, Lt's B is our A */
    cublasOperation_t opa = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasStatus_t s = cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatrixLayoutCreate(&p->la, CUDA_R_16BF, tb ? (uint64_t)K : (uint64_t)N, tb ? (uint64_t)N : (uint64_t)K, ldb);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatrixLayoutCreate(&p->lb, CUDA_R_16BF, ta ? (uint64_t)M : (uint64_t)K, ta ? (uint64_t)K : (uint64_t)M, lda);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatrixLayoutCreate(&p->lc, cf32 ? CUDA_R_32F : CUDA_R_16BF, (uint64_t)N, (uint64_t)M, ldc);
    cublasLtMatmulPreference_t pref = NULL;
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceCreate(&pref);
    size_t wsb = LT_WS_BYTES;
    uint32_t al = (uint32_t)align;
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al, sizeof al);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al, sizeof al);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al, sizeof al);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al, sizeof al);
    cublasLtMatmulHeuristicResult_t res;
    int nres = 0;
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulAlgoGetHeuristic(g->lt, p->desc, p->la, p->lb, p->lc, p->lc, pref, 1, &res, &nres);
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (s != CUBLAS_STATUS_SUCCESS || nres < 1) {
        if (p->la) cublasLtMatrixLayoutDestroy(p->la);
        if (p->lb) cublasLtMatrixLayoutDestroy(p->lb);
        if (p->lc) cublasLtMatrixLayoutDestroy(p->lc);
        if (p->desc) cublasLtMatmulDescDestroy(p->desc);
        return moda_model_fail(MODA_ERR_DEVICE_FAILURE,
                               "cuBLASLt has no algorithm for a %lldx%lldx%lld GEMM (ta %d tb %d, ld %lld %lld %lld, "
                               "%s output, alignment %d): %s",
                               (long long)M, (long long)N, (long long)K, ta, tb, (long long)lda, (long long)ldb,
                               (long long)ldc, cf32 ? "fp32" : "bf16", align, cublasLtGetStatusString(s));
    }
    p->algo = res.algo;
    g->nplans++;
    *out = p;
    return MODA_OK;
}

static moda_status gemm(moda_gpu_model *g, int ta, int tb, int64_t M, int64_t N, int64_t K, const bf16 *A,
                        int64_t lda, const bf16 *Bm, int64_t ldb, int beta1, void *C, int64_t ldc, int cf32) {
    if (M == 0 || N == 0) return MODA_OK;
    mark(g, MODA_GPU_PHASE_GEMM);
    int al = align_of(A, lda, 2), a2 = align_of(Bm, ldb, 2), a3 = align_of(C, ldc, cf32 ? 4 : 2);
    if (a2 < al) al = a2;
    if (a3 < al) al = a3;
    gemm_plan *p;
    moda_status st = plan_get(g, ta, tb, M, N, K, lda, ldb, ldc, cf32, beta1, al, &p);
    if (st != MODA_OK) return st;
    const float one = 1.0f, beta = beta1 ? 1.0f : 0.0f;
    cublasStatus_t s = cublasLtMatmul(g->lt, p->desc, &one, Bm, p->la, A, p->lb, &beta, C, p->lc, C, p->lc, &p->algo,
                                      g->lt_ws, LT_WS_BYTES, g->stream);
    if (s != CUBLAS_STATUS_SUCCESS)
        return moda_model_fail(MODA_ERR_DEVICE_FAILURE, "cublasLtMatmul %lldx%lldx%lld: %s", (long long)M, (long long)N,
                               (long long)K, cublasLtGetStatusString(s));
    return MODA_OK;
}
#define GEMM(...)                                                                                                  \
    do {                                                                                                           \
        moda_status s_ = gemm(__VA_ARGS__);                                                                        \
        if (s_ != MODA_OK) return s_;                                                                              \
    } while (0)
#define TRY(call)                                                                                                  \
    do {                                                                                                           \
        moda_status s_ = (call);                                                                                   \
        if (s_ != MODA_OK) return s_;                                                                              \
    } while (0)

/* ---- layout: a counting pass (base NULL), then the real one ---- */
typedef struct cursor {
    char *base;
    size_t used;
} cursor;

static void *take(cursor *a, int64_t elements, size_t esz) {
    size_t bytes = ((size_t)elements * esz + 255) & ~(size_t)255;
    void *p = a->base ? a->base + a->used : NULL;
    a->used += bytes;
    return p;
}
#define TAKE16(n) ((bf16 *)take(a, (n), 2))
#define TAKE32(n) ((float *)take(a, (n), 4))

static void layout(moda_gpu_model *g, cursor *a) {
    const moda_model_config *c = &g->c;
    const int64_t M = g->M, D = c->D, qd = c->Hq * c->d, kvd = c->Hk * c->d, F = c->F;
    g->kd = TAKE16(M * g->L * kvd);
    g->vd = TAKE16(M * g->L * kvd);
    g->dkd = TAKE32(M * g->L * kvd);
    g->dvd = TAKE32(M * g->L * kvd);
    for (int64_t i = 0; i < c->N; i++) {
        gblock *b = &g->blk[i];
        memset(b, 0, sizeof *b);
        b->x = TAKE16(M * D);
        if (!c->post_norm) {
            b->xn_a = TAKE16(M * D);
            b->xn_f = TAKE16(M * D);
        } else {
            b->sum_a = TAKE16(M * D);
            b->sum_f = TAKE16(M * D);
        }
        b->rstd_a = TAKE32(M);
        b->rstd_f = TAKE32(M);
        if (c->qk_norm) {
            b->qr = TAKE16(M * qd);
            b->kr = TAKE16(M * kvd);
            b->rstd_q = TAKE32(M);
            b->rstd_k = TAKE32(M);
        }
        b->q = TAKE16(M * qd);
        const moda_block_depth bd = moda_model_block_depth(c, i);
        b->slot_attn = bd.slot_attn;
        b->slot_ffn = bd.slot_ffn;
        b->d0 = bd.d0;
        b->d1 = bd.d1;
        if (c->depth == MODA_DEPTH_SRC_ATTN || c->depth == MODA_DEPTH_SRC_ATTN_FFN) {
            /* the layer's k, v are its depth slot: the projection GEMMs write there (ldc = L*Hk*d) */
            b->k = g->kd ? g->kd + b->slot_attn * kvd : NULL;
            b->v = g->vd ? g->vd + b->slot_attn * kvd : NULL;
            b->k_ld = b->v_ld = g->L * kvd;
        } else {
            b->k = TAKE16(M * kvd);
            b->v = TAKE16(M * kvd);
            b->k_ld = b->v_ld = kvd;
        }
        b->a = TAKE16(M * qd);
        b->lse = TAKE32(M * c->Hq);
        b->xmid = TAKE16(M * D);
        b->h1 = TAKE16(M * F);
        b->h3 = TAKE16(M * F);
        b->g = TAKE16(M * F);
    }
    g->xfinal = TAKE16(M * D);
    g->xf = TAKE16(M * D);
    g->rstd_final = TAKE32(M);
    g->rope_cos = TAKE32(g->T * (c->d / 2));
    g->rope_sin = TAKE32(g->T * (c->d / 2));
    g->dx = TAKE32(M * D);
    g->dxin = TAKE32(M * D);
    g->dqr32 = TAKE32(M * qd);
    g->dkr32 = TAKE32(M * kvd);
    g->dx16 = TAKE16(M * D);
    g->tmp16 = TAKE16(M * D);
    g->dq = TAKE16(M * qd);
    g->dk = TAKE16(M * kvd);
    g->dv = TAKE16(M * kvd);
    g->da = TAKE16(M * qd);
    g->dh1 = TAKE16(M * (F > qd ? F : qd));
    g->dh3 = TAKE16(M * (F > kvd ? F : kvd));
    g->dg = TAKE16(M * F);
    g->dkf16 = TAKE16(M * kvd);
    g->dvf16 = TAKE16(M * kvd);
    g->logits = TAKE32(g->head_rows * c->V);
    g->dlogits = TAKE16(g->head_rows * c->V);
    g->rowloss = TAKE32(M);
    int64_t widest = D > qd ? D : qd;
    g->dw_partial = TAKE32(g->dw_chunks * widest);
    g->tok = (int32_t *)take(a, g->max_micro * g->tok_stride, 4);
    g->emb_partial = TAKE32(g->max_seg * D);
    g->ws = take(a, (int64_t)g->ws_bytes, 1);
}

static moda_tensor kv_view(const moda_gpu_model *g, void *ptr, int64_t ld) {
    int64_t shape[4] = {g->B, g->T, g->c.Hk, g->c.d};
    int64_t stride[4] = {g->T * ld, ld, g->c.d, 1};
    return moda_tensor_strided(ptr, MODA_BF16, MODA_CUDA, 4, shape, stride);
}
static moda_tensor depth_view(const moda_gpu_model *g, void *ptr, moda_dtype dt) {
    int64_t shape[5] = {g->B, g->T, g->L, g->c.Hk, g->c.d};
    return moda_tensor_contiguous(ptr, dt, MODA_CUDA, 5, shape);
}
static moda_tensor lse_view(const moda_gpu_model *g, void *ptr) {
    int64_t shape[4] = {g->B, g->T, g->c.Hk, g->c.Hq / g->c.Hk};
    return moda_tensor_contiguous(ptr, MODA_F32, MODA_CUDA, 4, shape);
}
static moda_options attn_options(const moda_gpu_model *g, const gblock *b, int backward) {
    moda_options o = moda_model_attn_options(b->d0, b->d1, backward);
    o.deterministic = g->det_attn;
    return o;
}

static moda_status workspace_size(moda_gpu_model *g, size_t *bytes) {
    const moda_model_config *c = &g->c;
    const int64_t G = c->Hq / c->Hk;
    *bytes = 0;
    /* both modes of the backward: the mode can change between steps (moda_gpu_model_set_deterministic_attention)
     * and the non-deterministic one keeps a dQ accumulator the deterministic one does not */
    for (int64_t i = 0; i < 2 * c->N; i++) {
        gblock *b = &g->blk[i % c->N];
        moda_options o = attn_options(g, b, 1);
        o.deterministic = i < c->N;
        int depth = b->d1 > b->d0;
        moda_tensor q = moda_tensor_q_standard(b->q, MODA_BF16, MODA_CUDA, g->B, g->T, c->Hk, G, c->d);
        moda_tensor k = kv_view(g, b->k, b->k_ld), v = kv_view(g, b->v, b->v_ld);
        moda_tensor kd = depth_view(g, g->kd, MODA_BF16), vd = depth_view(g, g->vd, MODA_BF16);
        size_t w = 0;
        moda_status st = moda_backward_workspace_size(&o, &q, &k, &v, depth ? &kd : NULL, depth ? &vd : NULL, &w);
        if (st != MODA_OK) return moda_model_fail(st, "attention of block %lld: %s", (long long)(i % c->N), moda_last_error());
        if (w > *bytes) *bytes = w;
    }
    return MODA_OK;
}

static int64_t poff(const moda_gpu_model *g, int64_t block, moda_param_kind k) {
    return g->poff[(block < 0 ? g->c.N : block) * MP_KIND_COUNT + k];
}
#define P16(i, k) (g->p16 + poff(g, (i), (k)))
#define P32(i, k) (g->p32 + poff(g, (i), (k)))
#define G32(i, k) (g->g32 + poff(g, (i), (k)))

void moda_gpu_model_free(moda_gpu_model *g) {
    if (!g) return;
    if (g->stream) cudaStreamSynchronize(g->stream);
    for (int i = 0; i < g->nplans; i++) {
        cublasLtMatrixLayoutDestroy(g->plans[i].la);
        cublasLtMatrixLayoutDestroy(g->plans[i].lb);
        cublasLtMatrixLayoutDestroy(g->plans[i].lc);
        cublasLtMatmulDescDestroy(g->plans[i].desc);
    }
    if (g->ev) {
        for (int i = 0; i < PROF_EVENTS; i++)
            if (g->ev[i]) cudaEventDestroy(g->ev[i]);
        free(g->ev);
    }
    free(g->ev_phase);
    if (g->lt) cublasLtDestroy(g->lt);
    cudaFree(g->lt_ws);
    cudaFree(g->pstate);
    cudaFree(g->arena);
    cudaFree(g->chunks);
    cudaFree(g->partial);
    cudaFree(g->scalars);
    cudaFreeHost(g->host_scalars);
    cudaFreeHost(g->host_tok);
    if (g->stream) cudaStreamDestroy(g->stream);
    free(g->tab);
    free(g->poff);
    free(g->blk);
    free(g->count);
    free(g);
}

static moda_status create(moda_gpu_model *g, const moda_model_config *config, int64_t B, int64_t T, int64_t max_micro) {
    g->c = *config;
    TRY(moda_model_config_resolve(&g->c));
    const moda_model_config *c = &g->c;
    if (B < 1 || T < 1 || max_micro < 1)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "micro-batch %lld, sequence %lld and micro-batch count %lld must be >= 1",
                               (long long)B, (long long)T, (long long)max_micro);
    if (c->d % 2 || c->D % 8 || (c->Hk * c->d) % 8 || c->F % 8)
        return moda_model_fail(MODA_ERR_UNSUPPORTED, "the CUDA trainer needs D, F and Hk*d multiples of 8 (D=%lld F=%lld Hk*d=%lld)",
                               (long long)c->D, (long long)c->F, (long long)(c->Hk * c->d));
    if (B * T * (c->F > c->D ? c->F : c->D) > ((int64_t)1 << 31) || B * T > ((int64_t)1 << 30))
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "micro-batch %lld x %lld is too large; use --micro-batch", (long long)B, (long long)T);
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
        cudaGetLastError();
        return moda_model_fail(MODA_ERR_WRONG_DEVICE, "--device cuda: no CUDA device is available");
    }
    g->B = B;
    g->T = T;
    g->M = B * T;
    g->L = moda_model_slots(c);
    g->max_micro = max_micro;
    g->det_attn = 1;
    g->head_rows = ((int64_t)1 << 24) / c->V; /* fp32 logits chunk of at most 64 MB */
    if (g->head_rows < 1) g->head_rows = 1;
    if (g->head_rows > g->M) g->head_rows = g->M;
    g->dw_chunks = 512; /* chunks of rows of a norm's weight gradient (gpu_kernels.cu) */
    /* distinct tokens <= min(V, M); segments <= distinct + M / MODA_EMB_SEG */
    g->max_seg = (c->V < g->M ? c->V : g->M) + g->M / MODA_EMB_SEG + 1;
    g->tok_stride = 5 * g->M + 1 + g->max_seg + 1 + 64;
    g->cur_phase = -1;
    g->ntensors = moda_model_param_table(c, NULL, 0, &g->nparams);
    g->tab = calloc((size_t)g->ntensors, sizeof *g->tab);
    g->poff = malloc((size_t)(c->N + 1) * MP_KIND_COUNT * sizeof *g->poff);
    g->blk = calloc((size_t)c->N, sizeof *g->blk);
    g->count = calloc((size_t)c->V + 1, sizeof *g->count);
    if (!g->tab || !g->poff || !g->blk || !g->count) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of host memory");
    moda_model_param_table(c, g->tab, g->ntensors, NULL);
    for (int64_t i = 0; i < (c->N + 1) * MP_KIND_COUNT; i++) g->poff[i] = -1;
    for (int i = 0; i < g->ntensors; i++)
        g->poff[(g->tab[i].block < 0 ? c->N : g->tab[i].block) * MP_KIND_COUNT + g->tab[i].kind] = g->tab[i].offset;

    CK(cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking), "cudaStreamCreate");
    if (cublasLtCreate(&g->lt) != CUBLAS_STATUS_SUCCESS)
        return moda_model_fail(MODA_ERR_DEVICE_FAILURE, "cublasLtCreate failed");
    CK(cudaMalloc(&g->lt_ws, LT_WS_BYTES), "cudaMalloc (cuBLASLt workspace)");

    /* parameter state: p32, g32, m, v (fp32), p16 */
    const size_t n = (size_t)g->nparams, n4 = (n * 4 + 255) & ~(size_t)255, n2 = (n * 2 + 255) & ~(size_t)255;
    CK(cudaMalloc(&g->pstate, 4 * n4 + n2), "cudaMalloc (parameters, gradients, AdamW state)");
    g->p32 = (float *)g->pstate;
    g->g32 = (float *)((char *)g->pstate + n4);
    g->m32 = (float *)((char *)g->pstate + 2 * n4);
    g->v32 = (float *)((char *)g->pstate + 3 * n4);
    g->p16 = (bf16 *)((char *)g->pstate + 4 * n4);
    /* every transfer and fill goes through the model's (non-blocking) stream so that it is ordered with the
     * kernels; creation ends with one synchronisation */
    CK(cudaMemsetAsync(g->pstate, 0, 4 * n4 + n2, g->stream), "cudaMemsetAsync");

    /* optimiser chunks: pieces of one tensor each, so that the decay flag is per block of threads */
    const int64_t CH = 8192;
    int64_t nch = 0;
    for (int i = 0; i < g->ntensors; i++) nch += (g->tab[i].rows * g->tab[i].cols + CH - 1) / CH;
    mg_chunk *hc = malloc((size_t)nch * sizeof *hc);
    if (!hc) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of host memory");
    int64_t k = 0;
    for (int i = 0; i < g->ntensors; i++) {
        const int64_t len = g->tab[i].rows * g->tab[i].cols;
        for (int64_t s = 0; s < len; s += CH)
            hc[k++] = (mg_chunk){g->tab[i].offset + s, len - s < CH ? len - s : CH, g->tab[i].matrix, 0};
    }
    g->nchunks = nch;
    cudaError_t e = cudaMalloc((void **)&g->chunks, (size_t)nch * sizeof *hc);
    if (e == cudaSuccess) e = cudaMemcpyAsync(g->chunks, hc, (size_t)nch * sizeof *hc, cudaMemcpyHostToDevice, g->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(g->stream);
    free(hc);
    if (e != cudaSuccess) return cuda_fail(e, "optimiser chunk table");
    CK(cudaMalloc((void **)&g->partial, (size_t)nch * sizeof(double)), "cudaMalloc");
    CK(cudaMalloc((void **)&g->scalars, 4 * sizeof(double)), "cudaMalloc");
    CK(cudaMemsetAsync(g->scalars, 0, 4 * sizeof(double), g->stream), "cudaMemsetAsync");
    CK(cudaMallocHost((void **)&g->host_scalars, 4 * sizeof(double)), "cudaMallocHost");
    CK(cudaMallocHost((void **)&g->host_tok, (size_t)(max_micro * g->tok_stride) * 4), "cudaMallocHost");

    /* activations: count, query the operator's workspace with the real pointers, allocate, lay out */
    cursor a = {NULL, 0};
    layout(g, &a);
    CK(cudaMalloc(&g->arena, a.used), "cudaMalloc (activations)");
    g->arena_bytes = a.used;
    cursor real = {g->arena, 0};
    layout(g, &real);
    TRY(workspace_size(g, &g->ws_bytes));
    if (g->ws_bytes) {
        /* the workspace goes at the end: lay out again with it counted */
        cudaFree(g->arena);
        g->arena = NULL;
        cursor a2 = {NULL, 0};
        layout(g, &a2);
        CK(cudaMalloc(&g->arena, a2.used), "cudaMalloc (activations)");
        g->arena_bytes = a2.used;
        cursor r2 = {g->arena, 0};
        layout(g, &r2);
    }
    CK(cudaMemsetAsync(g->arena, 0, g->arena_bytes, g->stream), "cudaMemsetAsync");

    /* RoPE tables as the CPU computes them (double, rounded to float) */
    const int64_t h2 = c->d / 2;
    float *tc = malloc((size_t)(T * h2) * 2 * sizeof(float));
    if (!tc) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of host memory");
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < h2; i++) {
            double freq = pow(c->rope_base, -2.0 * (double)i / (double)c->d);
            tc[t * h2 + i] = (float)cos((double)t * freq);
            tc[T * h2 + t * h2 + i] = (float)sin((double)t * freq);
        }
    e = cudaMemcpyAsync(g->rope_cos, tc, (size_t)(T * h2) * sizeof(float), cudaMemcpyHostToDevice, g->stream);
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(g->rope_sin, tc + T * h2, (size_t)(T * h2) * sizeof(float), cudaMemcpyHostToDevice, g->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(g->stream);
    free(tc);
    if (e != cudaSuccess) return cuda_fail(e, "RoPE tables");
    return MODA_OK;
}

moda_status moda_gpu_model_create(moda_gpu_model **out, const moda_model_config *config, int64_t micro_batch,
                                  int64_t T, int64_t max_micro) {
    *out = NULL;
    moda_gpu_model *g = calloc(1, sizeof *g);
    if (!g) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of host memory");
    moda_status st = create(g, config, micro_batch, T, max_micro);
    if (st != MODA_OK) {
        moda_gpu_model_free(g);
        return st;
    }
    *out = g;
    return MODA_OK;
}

moda_status moda_gpu_model_set_deterministic_attention(moda_gpu_model *g, int deterministic) {
    if (deterministic != 0 && deterministic != 1)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "the attention determinism must be 0 or 1, not %d", deterministic);
    g->det_attn = deterministic;
    return MODA_OK;
}

int64_t moda_gpu_model_micro_batch(const moda_gpu_model *g) { return g->B; }
size_t moda_gpu_model_device_bytes(const moda_gpu_model *g) {
    return g->arena_bytes + (size_t)g->nparams * 18 + LT_WS_BYTES;
}

moda_status moda_gpu_model_set_state(moda_gpu_model *g, const float *params, const float *m, const float *v) {
    const size_t n = (size_t)g->nparams * sizeof(float);
    cudaStream_t s = g->stream;
    CK(cudaMemcpyAsync(g->p32, params, n, cudaMemcpyHostToDevice, s), "uploading parameters");
    if (m) CK(cudaMemcpyAsync(g->m32, m, n, cudaMemcpyHostToDevice, s), "uploading AdamW m");
    else CK(cudaMemsetAsync(g->m32, 0, n, s), "cudaMemsetAsync");
    if (v) CK(cudaMemcpyAsync(g->v32, v, n, cudaMemcpyHostToDevice, s), "uploading AdamW v");
    else CK(cudaMemsetAsync(g->v32, 0, n, s), "cudaMemsetAsync");
    KL(mg_f32_to_bf16(g->nparams, g->p32, g->p16, g->stream));
    CK(cudaStreamSynchronize(g->stream), "parameter upload");
    return MODA_OK;
}

moda_status moda_gpu_model_get_state(moda_gpu_model *g, float *params, float *m, float *v) {
    const size_t n = (size_t)g->nparams * sizeof(float);
    cudaStream_t s = g->stream;
    if (params) CK(cudaMemcpyAsync(params, g->p32, n, cudaMemcpyDeviceToHost, s), "downloading parameters");
    if (m) CK(cudaMemcpyAsync(m, g->m32, n, cudaMemcpyDeviceToHost, s), "downloading AdamW m");
    if (v) CK(cudaMemcpyAsync(v, g->v32, n, cudaMemcpyDeviceToHost, s), "downloading AdamW v");
    CK(cudaStreamSynchronize(s), "downloading the state");
    return MODA_OK;
}

moda_status moda_gpu_model_get_grads(moda_gpu_model *g, float *grads) {
    CK(cudaMemcpyAsync(grads, g->g32, (size_t)g->nparams * sizeof(float), cudaMemcpyDeviceToHost, g->stream),
       "downloading gradients");
    CK(cudaStreamSynchronize(g->stream), "downloading gradients");
    return MODA_OK;
}

/* ---- tokens: validated on the host, with the embedding's rows grouped by token (counting sort, rows in
 * order inside a group) so that its backward is a deterministic gather instead of a scatter ---- */
static moda_status stage_tokens(moda_gpu_model *g, const int32_t *in, const int32_t *tgt, int64_t u, int64_t *nuniq,
                                int64_t *nseg) {
    const int64_t M = g->M, V = g->c.V;
    int32_t *h = g->host_tok + u * g->tok_stride;
    int32_t *hin = h, *htg = h + M, *uniq = h + 2 * M, *segoff = h + 3 * M, *rows = h + 4 * M + 1,
            *segb = h + 5 * M + 1;
    for (int64_t i = 0; i < M; i++) {
        if (in[i] < 0 || in[i] >= V)
            return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "input token %d at position %lld is outside the vocabulary [0, %lld)",
                                   in[i], (long long)(u * M + i), (long long)V);
        if (tgt && (tgt[i] < 0 || tgt[i] >= V))
            return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "target token %d at position %lld is outside the vocabulary [0, %lld)",
                                   tgt[i], (long long)(u * M + i), (long long)V);
    }
    memcpy(hin, in, (size_t)M * 4);
    if (tgt) memcpy(htg, tgt, (size_t)M * 4);
    else memset(htg, 0, (size_t)M * 4);
    /* counting sort of the rows by token (stable: row order inside a token), then segments of at most
     * MODA_EMB_SEG rows so that a frequent token's sum is spread over many blocks */
    memset(g->count, 0, (size_t)(V + 1) * sizeof *g->count);
    for (int64_t i = 0; i < M; i++) g->count[in[i] + 1]++;
    int64_t nu = 0, pos = 0, ns = 0;
    for (int64_t t = 0; t < V; t++) {
        const int32_t cnt = g->count[t + 1];
        if (!cnt) continue;
        uniq[nu] = (int32_t)t;
        segoff[nu] = (int32_t)ns;
        for (int64_t s = 0; s < cnt; s += MODA_EMB_SEG) segb[ns++] = (int32_t)(pos + s);
        g->count[t + 1] = (int32_t)pos; /* now the write cursor of token t */
        pos += cnt;
        nu++;
    }
    segoff[nu] = (int32_t)ns;
    segb[ns] = (int32_t)pos;
    for (int64_t i = 0; i < M; i++) rows[g->count[in[i] + 1]++] = (int32_t)i;
    *nuniq = nu;
    *nseg = ns;
    return MODA_OK;
}

/* ---- the depth slot written straight from its projections (rows of stride L*Hk*d), RoPE on the key ---- */
static moda_status depth_write(moda_gpu_model *g, int64_t slot, const bf16 *in, const bf16 *Wk, const bf16 *Wv) {
    const int64_t kvd = g->c.Hk * g->c.d, ld = g->L * kvd, M = g->M, D = g->c.D;
    bf16 *ks = g->kd + slot * kvd, *vs = g->vd + slot * kvd;
    GEMM(g, 0, 0, M, kvd, D, in, D, Wk, kvd, 0, ks, ld, 0);
    GEMM(g, 0, 0, M, kvd, D, in, D, Wv, kvd, 0, vs, ld, 0);
    mark(g, MODA_GPU_PHASE_ELEM);
    KL(mg_qk_fwd(M, g->T, g->c.Hk, g->c.d, ks, ld, NULL, NULL, ks, ld, g->rope_cos, g->rope_sin, g->stream));
    return MODA_OK;
}

static moda_status depth_write_bwd(moda_gpu_model *g, int64_t slot, const bf16 *in, const bf16 *Wk, const bf16 *Wv,
                                   float *dWk, float *dWv, float *din) {
    const int64_t kvd = g->c.Hk * g->c.d, ld = g->L * kvd, M = g->M, D = g->c.D;
    mark(g, MODA_GPU_PHASE_ELEM);
    KL(mg_qk_bwd(M, g->T, g->c.Hk, g->c.d, 1, NULL, 0, g->dkd + slot * kvd, ld, NULL, NULL, NULL, g->dkf16, kvd, NULL,
                 NULL, g->dw_chunks, NULL, g->rope_cos, g->rope_sin, g->stream));
    KL(mg_qk_bwd(M, g->T, g->c.Hk, g->c.d, 0, NULL, 0, g->dvd + slot * kvd, ld, NULL, NULL, NULL, g->dvf16, kvd, NULL,
                 NULL, g->dw_chunks, NULL, g->rope_cos, g->rope_sin, g->stream));
    GEMM(g, 1, 0, D, kvd, M, in, D, g->dkf16, kvd, 1, dWk, kvd, 1);
    GEMM(g, 1, 0, D, kvd, M, in, D, g->dvf16, kvd, 1, dWv, kvd, 1);
    GEMM(g, 0, 1, M, D, kvd, g->dkf16, kvd, Wk, kvd, 1, din, D, 1);
    GEMM(g, 0, 1, M, D, kvd, g->dvf16, kvd, Wv, kvd, 1, din, D, 1);
    return MODA_OK;
}

static moda_status attn_call(moda_gpu_model *g, gblock *b, int64_t i, int backward) {
    const moda_model_config *c = &g->c;
    const int64_t G = c->Hq / c->Hk;
    moda_options o = attn_options(g, b, backward);
    moda_tensor q = moda_tensor_q_standard(b->q, MODA_BF16, MODA_CUDA, g->B, g->T, c->Hk, G, c->d);
    moda_tensor out = moda_tensor_q_standard(b->a, MODA_BF16, MODA_CUDA, g->B, g->T, c->Hk, G, c->d);
    moda_tensor k = kv_view(g, b->k, b->k_ld), v = kv_view(g, b->v, b->v_ld);
    moda_tensor kd = depth_view(g, g->kd, MODA_BF16), vd = depth_view(g, g->vd, MODA_BF16);
    moda_tensor lse = lse_view(g, b->lse);
    const int depth = b->d1 > b->d0;
    moda_status st;
    if (!backward) {
        mark(g, MODA_GPU_PHASE_ATTN_FWD);
        st = moda_forward(&o, &q, &k, &v, depth ? &kd : NULL, depth ? &vd : NULL, &out, &lse, g->stream);
    } else {
        mark(g, MODA_GPU_PHASE_ATTN_BWD);
        const int64_t kvd = c->Hk * c->d;
        moda_tensor dO = moda_tensor_q_standard(g->da, MODA_BF16, MODA_CUDA, g->B, g->T, c->Hk, G, c->d);
        moda_tensor dq = moda_tensor_q_standard(g->dq, MODA_BF16, MODA_CUDA, g->B, g->T, c->Hk, G, c->d);
        moda_tensor dk = kv_view(g, g->dk, kvd), dv = kv_view(g, g->dv, kvd);
        moda_tensor dkd = depth_view(g, g->dkd, MODA_F32), dvd = depth_view(g, g->dvd, MODA_F32);
        st = moda_backward(&o, &q, &k, &v, depth ? &kd : NULL, depth ? &vd : NULL, &out, &lse, &dO, &dq, &dk, &dv,
                           depth ? &dkd : NULL, depth ? &dvd : NULL, g->ws, g->ws_bytes, g->stream);
    }
    if (st != MODA_OK)
        return moda_model_fail(st, "attention %s of block %lld: %s", backward ? "backward" : "forward", (long long)i,
                               moda_last_error());
    return MODA_OK;
}

static moda_status forward_blocks(moda_gpu_model *g, const int32_t *tok) {
    const moda_model_config *c = &g->c;
    const int64_t M = g->M, D = c->D, qd = c->Hq * c->d, kvd = c->Hk * c->d, F = c->F;
    bf16 *tmp = g->tmp16;
    mark(g, MODA_GPU_PHASE_ELEM);
    KL(mg_embed_fwd(M, D, tok, P16(-1, MP_WTE), g->blk[0].x, g->stream));
    if (!c->post_norm)
        KL(mg_rmsnorm_fwd(M, D, g->blk[0].x, D, NULL, NULL, P32(0, MP_ATTN_NORM), g->blk[0].xn_a, D, g->blk[0].rstd_a,
                          g->stream));
    for (int64_t i = 0; i < c->N; i++) {
        gblock *b = &g->blk[i];
        bf16 *xout = i + 1 < c->N ? g->blk[i + 1].x : g->xfinal;
        /* ---- attention sublayer (pre-norm: xn_a was written by the previous block's last kernel) ---- */
        const bf16 *xin = c->post_norm ? b->x : b->xn_a;
        /* QK-norm (when on) and RoPE in one kernel per projection, from the GEMM's output into q / the k slot */
        if (c->qk_norm) {
            GEMM(g, 0, 0, M, qd, D, xin, D, P16(i, MP_WQ), qd, 0, b->qr, qd, 0);
            GEMM(g, 0, 0, M, kvd, D, xin, D, P16(i, MP_WK), kvd, 0, b->kr, kvd, 0);
        } else {
            GEMM(g, 0, 0, M, qd, D, xin, D, P16(i, MP_WQ), qd, 0, b->q, qd, 0);
            GEMM(g, 0, 0, M, kvd, D, xin, D, P16(i, MP_WK), kvd, 0, b->k, b->k_ld, 0);
        }
        GEMM(g, 0, 0, M, kvd, D, xin, D, P16(i, MP_WV), kvd, 0, b->v, b->v_ld, 0);
        mark(g, MODA_GPU_PHASE_ELEM);
        KL(mg_qk_fwd(M, g->T, c->Hq, c->d, c->qk_norm ? b->qr : b->q, qd, c->qk_norm ? P32(i, MP_QNORM) : NULL,
                     b->rstd_q, b->q, qd, g->rope_cos, g->rope_sin, g->stream));
        KL(mg_qk_fwd(M, g->T, c->Hk, c->d, c->qk_norm ? b->kr : b->k, c->qk_norm ? kvd : b->k_ld,
                     c->qk_norm ? P32(i, MP_KNORM) : NULL, b->rstd_k, b->k, b->k_ld, g->rope_cos, g->rope_sin,
                     g->stream));
        if (c->depth == MODA_DEPTH_SRC_EXTRA) TRY(depth_write(g, b->slot_attn, xin, P16(i, MP_WKD), P16(i, MP_WVD)));
        TRY(attn_call(g, b, i, 0));
        GEMM(g, 0, 0, M, D, qd, b->a, qd, P16(i, MP_WO), D, 0, tmp, D, 0);
        mark(g, MODA_GPU_PHASE_ELEM);
        if (!c->post_norm)
            KL(mg_rmsnorm_fwd(M, D, b->x, D, tmp, b->xmid, P32(i, MP_FFN_NORM), b->xn_f, D, b->rstd_f, g->stream));
        else
            KL(mg_rmsnorm_fwd(M, D, b->x, D, tmp, b->sum_a, P32(i, MP_ATTN_NORM), b->xmid, D, b->rstd_a, g->stream));
        /* ---- FFN sublayer ---- */
        const bf16 *fin = c->post_norm ? b->xmid : b->xn_f;
        GEMM(g, 0, 0, M, F, D, fin, D, P16(i, MP_W1), F, 0, b->h1, F, 0);
        GEMM(g, 0, 0, M, F, D, fin, D, P16(i, MP_W3), F, 0, b->h3, F, 0);
        mark(g, MODA_GPU_PHASE_ELEM);
        KL(mg_swiglu_fwd(M * F, b->h1, b->h3, b->g, g->stream));
        GEMM(g, 0, 0, M, D, F, b->g, F, P16(i, MP_W2), D, 0, tmp, D, 0);
        if (b->slot_ffn >= 0) TRY(depth_write(g, b->slot_ffn, fin, P16(i, MP_WKF), P16(i, MP_WVF)));
        mark(g, MODA_GPU_PHASE_ELEM);
        if (!c->post_norm) {
            /* the residual sum, fused with the next norm: the next block's attention norm, or the final one */
            const int last = i + 1 == c->N;
            KL(mg_rmsnorm_fwd(M, D, b->xmid, D, tmp, xout, last ? P32(-1, MP_FINAL_NORM) : P32(i + 1, MP_ATTN_NORM),
                              last ? g->xf : g->blk[i + 1].xn_a, D, last ? g->rstd_final : g->blk[i + 1].rstd_a,
                              g->stream));
        } else {
            KL(mg_rmsnorm_fwd(M, D, b->xmid, D, tmp, b->sum_f, P32(i, MP_FFN_NORM), xout, D, b->rstd_f, g->stream));
        }
    }
    return MODA_OK;
}

static moda_status backward_blocks(moda_gpu_model *g, const int32_t *tok_dev, int64_t nuniq, int64_t nseg) {
    const moda_model_config *c = &g->c;
    const int64_t M = g->M, D = c->D, qd = c->Hq * c->d, kvd = c->Hk * c->d, F = c->F, Ld = g->L * kvd;
    float *dx = g->dx, *dxin = g->dxin;
    bf16 *dx16 = g->dx16;
    const int64_t nch = g->dw_chunks;
    mark(g, MODA_GPU_PHASE_ELEM);
    if (g->L > 0) {
        CK(cudaMemsetAsync(g->dkd, 0, (size_t)(M * Ld) * 4, g->stream), "cudaMemsetAsync");
        CK(cudaMemsetAsync(g->dvd, 0, (size_t)(M * Ld) * 4, g->stream), "cudaMemsetAsync");
    }
    for (int64_t i = c->N - 1; i >= 0; i--) {
        gblock *b = &g->blk[i];
        /* ---- FFN sublayer: dx (and dx16) hold dL/d(block output) ---- */
        mark(g, MODA_GPU_PHASE_ELEM);
        if (c->post_norm) {
            /* the weight's gradient first: the input gradient then overwrites dx in place */
            KL(mg_rmsnorm_bwd(M, D, b->sum_f, D, P32(i, MP_FFN_NORM), b->rstd_f, dx, D, dx, 0, dx16, D, g->dw_partial, nch,
                              G32(i, MP_FFN_NORM), g->stream));
        }
        const bf16 *fin = c->post_norm ? b->xmid : b->xn_f;
        GEMM(g, 0, 1, M, F, D, dx16, D, P16(i, MP_W2), D, 0, g->dg, F, 0);
        GEMM(g, 1, 0, F, D, M, b->g, F, dx16, D, 1, G32(i, MP_W2), D, 1);
        mark(g, MODA_GPU_PHASE_ELEM);
        KL(mg_swiglu_bwd(M * F, b->h1, b->h3, g->dg, g->dh1, g->dh3, g->stream));
        GEMM(g, 1, 0, D, F, M, fin, D, g->dh1, F, 1, G32(i, MP_W1), F, 1);
        GEMM(g, 1, 0, D, F, M, fin, D, g->dh3, F, 1, G32(i, MP_W3), F, 1);
        GEMM(g, 0, 1, M, D, F, g->dh1, F, P16(i, MP_W1), F, 0, dxin, D, 1);
        GEMM(g, 0, 1, M, D, F, g->dh3, F, P16(i, MP_W3), F, 1, dxin, D, 1);
        if (b->slot_ffn >= 0)
            TRY(depth_write_bwd(g, b->slot_ffn, fin, P16(i, MP_WKF), P16(i, MP_WVF), G32(i, MP_WKF), G32(i, MP_WVF), dxin));
        mark(g, MODA_GPU_PHASE_ELEM);
        if (!c->post_norm) {
            KL(mg_rmsnorm_bwd(M, D, b->xmid, D, P32(i, MP_FFN_NORM), b->rstd_f, dxin, D, dx, 1, dx16, D, g->dw_partial,
                              nch, G32(i, MP_FFN_NORM), g->stream));
        } else {
            KL(mg_add_f32(M * D, dx, dxin, dx16, g->stream));
        }
        /* ---- attention sublayer: dx holds dL/d(xmid) ---- */
        if (c->post_norm) {
            KL(mg_rmsnorm_bwd(M, D, b->sum_a, D, P32(i, MP_ATTN_NORM), b->rstd_a, dx, D, dx, 0, dx16, D, g->dw_partial,
                              nch, G32(i, MP_ATTN_NORM), g->stream));
        }
        const bf16 *xin = c->post_norm ? b->x : b->xn_a;
        GEMM(g, 0, 1, M, qd, D, dx16, D, P16(i, MP_WO), D, 0, g->da, qd, 0);
        GEMM(g, 1, 0, qd, D, M, b->a, qd, dx16, D, 1, G32(i, MP_WO), D, 1);
        TRY(attn_call(g, b, i, 1));
        mark(g, MODA_GPU_PHASE_ELEM);
        /* the layer's own slot (source attn): the later blocks' depth gradient joins dk, dv; then RoPE's
         * backward. In place into dq / dk / dv (bf16) unless QK-norm needs them in fp32. */
        const int own_slot = c->depth == MODA_DEPTH_SRC_ATTN || c->depth == MODA_DEPTH_SRC_ATTN_FFN;
        const float *addk = own_slot ? g->dkd + b->slot_attn * kvd : NULL;
        const float *addv = own_slot ? g->dvd + b->slot_attn * kvd : NULL;
        /* QK-norm: its backward in the same kernel, into dh1 / dh3 (free here); otherwise in place */
        bf16 *dqr = c->qk_norm ? g->dh1 : g->dq, *dkr = c->qk_norm ? g->dh3 : g->dk;
        const int qn = c->qk_norm;
        KL(mg_qk_bwd(M, g->T, c->Hq, c->d, 1, g->dq, qd, NULL, 0, qn ? b->qr : NULL, qn ? P32(i, MP_QNORM) : NULL,
                     b->rstd_q, dqr, qd, g->dqr32, g->dw_partial, nch, qn ? G32(i, MP_QNORM) : NULL, g->rope_cos,
                     g->rope_sin, g->stream));
        KL(mg_qk_bwd(M, g->T, c->Hk, c->d, 1, g->dk, kvd, addk, Ld, qn ? b->kr : NULL, qn ? P32(i, MP_KNORM) : NULL,
                     b->rstd_k, dkr, kvd, g->dkr32, g->dw_partial, nch, qn ? G32(i, MP_KNORM) : NULL, g->rope_cos,
                     g->rope_sin, g->stream));
        if (own_slot)
            KL(mg_qk_bwd(M, g->T, c->Hk, c->d, 0, g->dv, kvd, addv, Ld, NULL, NULL, NULL, g->dv, kvd, NULL, NULL, nch,
                         NULL, g->rope_cos, g->rope_sin, g->stream));
        GEMM(g, 1, 0, D, qd, M, xin, D, dqr, qd, 1, G32(i, MP_WQ), qd, 1);
        GEMM(g, 1, 0, D, kvd, M, xin, D, dkr, kvd, 1, G32(i, MP_WK), kvd, 1);
        GEMM(g, 1, 0, D, kvd, M, xin, D, g->dv, kvd, 1, G32(i, MP_WV), kvd, 1);
        GEMM(g, 0, 1, M, D, qd, dqr, qd, P16(i, MP_WQ), qd, 0, dxin, D, 1);
        GEMM(g, 0, 1, M, D, kvd, dkr, kvd, P16(i, MP_WK), kvd, 1, dxin, D, 1);
        GEMM(g, 0, 1, M, D, kvd, g->dv, kvd, P16(i, MP_WV), kvd, 1, dxin, D, 1);
        if (c->depth == MODA_DEPTH_SRC_EXTRA)
            TRY(depth_write_bwd(g, b->slot_attn, xin, P16(i, MP_WKD), P16(i, MP_WVD), G32(i, MP_WKD), G32(i, MP_WVD), dxin));
        mark(g, MODA_GPU_PHASE_ELEM);
        if (!c->post_norm) {
            KL(mg_rmsnorm_bwd(M, D, b->x, D, P32(i, MP_ATTN_NORM), b->rstd_a, dxin, D, dx, 1, dx16, D, g->dw_partial, nch,
                              G32(i, MP_ATTN_NORM), g->stream));
        } else {
            KL(mg_add_f32(M * D, dx, dxin, dx16, g->stream));
        }
    }
    /* embedding: a gather per distinct token over its rows in order (deterministic) */
    const int32_t *uniq = tok_dev + 2 * M, *segoff = tok_dev + 3 * M, *rows = tok_dev + 4 * M + 1,
                  *segb = tok_dev + 5 * M + 1;
    KL(mg_embed_bwd(nuniq, nseg, D, uniq, segoff, segb, rows, dx, g->emb_partial, G32(-1, MP_WTE), g->stream));
    return MODA_OK;
}

/* One micro-batch: forward, loss (added into scalars[0] as a sum over rows), and with grads the backward with
 * the loss scaled by `scale` (1 / tokens of the whole batch). */
static moda_status micro_step(moda_gpu_model *g, int64_t u, int64_t nuniq, int64_t nseg, int grads, float scale) {
    const moda_model_config *c = &g->c;
    const int64_t M = g->M, D = c->D, V = c->V;
    const int32_t *tok = g->tok + u * g->tok_stride, *tgt = tok + M;
    TRY(forward_blocks(g, tok));
    const bf16 *xf = c->post_norm ? g->xfinal : g->xf;
    const bf16 *H = c->tied ? P16(-1, MP_WTE) : P16(-1, MP_HEAD);
    float *dH = c->tied ? G32(-1, MP_WTE) : G32(-1, MP_HEAD);
    /* post-norm: the head's input gradient is dL/dX_N itself */
    float *dxf = c->post_norm ? g->dx : g->dxin;
    for (int64_t r0 = 0; r0 < M; r0 += g->head_rows) {
        const int64_t rows = M - r0 < g->head_rows ? M - r0 : g->head_rows;
        GEMM(g, 0, 1, rows, V, D, xf + r0 * D, D, H, D, 0, g->logits, V, 1);
        mark(g, MODA_GPU_PHASE_ELEM);
        KL(mg_cross_entropy(rows, V, g->logits, tgt + r0, g->rowloss + r0, grads ? g->dlogits : NULL, scale, g->stream));
        if (grads) {
            GEMM(g, 0, 0, rows, D, V, g->dlogits, V, H, D, 0, dxf + r0 * D, D, 1);
            GEMM(g, 1, 0, V, D, rows, g->dlogits, V, xf + r0 * D, D, 1, dH, D, 1);
        }
    }
    mark(g, MODA_GPU_PHASE_ELEM);
    KL(mg_sum_to(M, g->rowloss, &g->scalars[0], g->stream));
    if (!grads) return MODA_OK;
    if (!c->post_norm) {
        KL(mg_rmsnorm_bwd(M, D, g->xfinal, D, P32(-1, MP_FINAL_NORM), g->rstd_final, dxf, D, g->dx, 0, g->dx16, D,
                          g->dw_partial, g->dw_chunks, G32(-1, MP_FINAL_NORM), g->stream));
    } else {
        KL(mg_f32_to_bf16(M * D, g->dx, g->dx16, g->stream));
    }
    return backward_blocks(g, tok, nuniq, nseg);
}

/* Forward (+ backward) over `rows` rows of T tokens, in micro-batches of B rows; gradients overwritten. */
static moda_status run_batch(moda_gpu_model *g, const int32_t *in, const int32_t *tgt, int64_t rows, int grads) {
    if (rows % g->B || rows / g->B > g->max_micro || rows < 1)
        return moda_model_fail(MODA_ERR_INVALID_ARGUMENT, "a batch of %lld rows is not 1..%lld micro-batches of %lld rows",
                               (long long)rows, (long long)g->max_micro, (long long)g->B);
    const int64_t nmicro = rows / g->B, M = g->M;
    int64_t counts[2 * 512];
    int64_t *nu = nmicro <= 512 ? counts : malloc((size_t)nmicro * 2 * sizeof *nu);
    if (!nu) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of host memory");
    moda_status st = MODA_OK;
    /* the previous step ended with a synchronisation, so the pinned staging buffer is free */
    for (int64_t u = 0; u < nmicro && st == MODA_OK; u++) st = stage_tokens(g, in + u * M, tgt + u * M, u, &nu[2 * u], &nu[2 * u + 1]);
    if (st == MODA_OK) {
        mark(g, MODA_GPU_PHASE_COPY);
        cudaError_t e = cudaMemcpyAsync(g->tok, g->host_tok, (size_t)(nmicro * g->tok_stride) * 4,
                                        cudaMemcpyHostToDevice, g->stream);
        if (e == cudaSuccess) e = cudaMemsetAsync(g->scalars, 0, sizeof(double), g->stream);
        if (e == cudaSuccess && grads) e = cudaMemsetAsync(g->g32, 0, (size_t)g->nparams * 4, g->stream);
        if (e != cudaSuccess) st = cuda_fail(e, "staging a batch");
    }
    const float scale = (float)(1.0 / (double)(rows * g->T));
    for (int64_t u = 0; u < nmicro && st == MODA_OK; u++) st = micro_step(g, u, nu[2 * u], nu[2 * u + 1], grads, scale);
    if (nu != counts) free(nu);
    return st;
}

static moda_status finish(moda_gpu_model *g, int64_t rows, double *loss, double *grad_norm) {
    mark(g, MODA_GPU_PHASE_COPY);
    CK(cudaMemcpyAsync(g->host_scalars, g->scalars, 2 * sizeof(double), cudaMemcpyDeviceToHost, g->stream),
       "reading the loss back");
    CK(cudaStreamSynchronize(g->stream), "the training step");
    prof_collect(g);
    if (loss) *loss = g->host_scalars[0] / (double)(rows * g->T);
    if (grad_norm) *grad_norm = g->host_scalars[1];
    return MODA_OK;
}

moda_status moda_gpu_model_loss(moda_gpu_model *g, const int32_t *in, const int32_t *tgt, int64_t rows, int grads,
                                double *loss) {
    TRY(run_batch(g, in, tgt, rows, grads));
    return finish(g, rows, loss, NULL);
}

moda_status moda_gpu_model_train_step(moda_gpu_model *g, const int32_t *in, const int32_t *tgt, int64_t rows,
                                      const moda_adamw *opt, double lr, int64_t t, double *loss, double *grad_norm) {
    TRY(run_batch(g, in, tgt, rows, 1));
    mark(g, MODA_GPU_PHASE_OPT);
    const float c1 = (float)(1.0 - pow(opt->beta1, (double)t)), c2 = (float)(1.0 - pow(opt->beta2, (double)t));
    KL(mg_grad_norm(g->nchunks, g->chunks, g->g32, g->partial, &g->scalars[1], g->stream));
    KL(mg_adamw(g->nchunks, g->chunks, g->p32, g->p16, g->g32, g->m32, g->v32, &g->scalars[1], &g->scalars[0],
                (float)opt->clip, (float)lr, (float)opt->beta1, (float)opt->beta2, (float)opt->eps,
                (float)opt->weight_decay, c1, c2, g->stream));
    if (g->prof) g->prof_steps++;
    return finish(g, rows, loss, grad_norm);
}

moda_status moda_gpu_model_profile(moda_gpu_model *g, int on) {
    if (on && !g->ev) {
        g->ev = calloc(PROF_EVENTS, sizeof *g->ev);
        g->ev_phase = calloc(PROF_EVENTS, sizeof *g->ev_phase);
        if (!g->ev || !g->ev_phase) return moda_model_fail(MODA_ERR_OUT_OF_MEMORY, "out of host memory");
        for (int i = 0; i < PROF_EVENTS; i++) CK(cudaEventCreate(&g->ev[i]), "cudaEventCreate");
    }
    g->prof = on;
    g->nev = 0;
    g->cur_phase = -1;
    memset(g->prof_ms, 0, sizeof g->prof_ms);
    g->prof_steps = 0;
    return MODA_OK;
}

int64_t moda_gpu_model_profile_report(const moda_gpu_model *g, double ms[MODA_GPU_PHASES]) {
    for (int i = 0; i < MODA_GPU_PHASES; i++) ms[i] = g->prof_ms[i];
    return g->prof_steps;
}
