// CLEAR's pocket search on CUDA: raw pointers and a stream, no PyTorch headers (DESIGN.md §4).
// The step math is pocket_search.h, shared with the CPU code.
//
// mlp_search_kernel   one block per problem: the problem's rows (k anchors + centroid) and every
//                     layer's activations and gradients live in shared memory for all steps;
//                     weights are read from global memory (L2-resident: every block reads them).
// step_logits_kernel  fused step for other heads, part 1: tests and logit gradients.
// step_update_kernel  part 2: centroid and compactness terms, update, compaction.
#include <cuda_runtime.h>

#include "pocket_search.h"

namespace medic_fast {
namespace pocket {

static constexpr int kThreads = 256;
static constexpr int kRowChunk = 8;  // rows accumulated in registers at once

// out[r, o] = relu?(b[o] + sum_i in[r, i] * wt[i, o]) for rows r < rows; in and out in shared
// memory, wt [n_in, n_out] in global memory (coalesced over o).
static __device__ void linear_forward(const float* in, float* out, const float* wt, const float* b,
                               int rows, int n_in, int n_out, bool relu) {
  for (int o = threadIdx.x; o < n_out; o += blockDim.x) {
    for (int r0 = 0; r0 < rows; r0 += kRowChunk) {
      float acc[kRowChunk];
#pragma unroll
      for (int r = 0; r < kRowChunk; ++r) acc[r] = b[o];
      for (int i = 0; i < n_in; ++i) {
        const float w = wt[static_cast<int64_t>(i) * n_out + o];
#pragma unroll
        for (int r = 0; r < kRowChunk; ++r) {
          if (r0 + r < rows) acc[r] = fmaf(in[(r0 + r) * n_in + i], w, acc[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < kRowChunk; ++r) {
        if (r0 + r < rows) out[(r0 + r) * n_out + o] = relu ? fmaxf(acc[r], 0.f) : acc[r];
      }
    }
  }
}

// gin[r, i] = sum_o g[r, o] * w[o, i]; w [n_out, n_in] in global memory (coalesced over i).
static __device__ void linear_backward(const float* g, float* gin, const float* w, int rows, int n_in,
                                int n_out) {
  for (int i = threadIdx.x; i < n_in; i += blockDim.x) {
    for (int r0 = 0; r0 < rows; r0 += kRowChunk) {
      float acc[kRowChunk];
#pragma unroll
      for (int r = 0; r < kRowChunk; ++r) acc[r] = 0.f;
      for (int o = 0; o < n_out; ++o) {
        const float wv = w[static_cast<int64_t>(o) * n_in + i];
#pragma unroll
        for (int r = 0; r < kRowChunk; ++r) {
          if (r0 + r < rows) acc[r] = fmaf(g[(r0 + r) * n_out + o], wv, acc[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < kRowChunk; ++r) {
        if (r0 + r < rows) gin[(r0 + r) * n_in + i] = acc[r];
      }
    }
  }
}

// Tests one problem whose k+1 logit rows are z and whose centroid is c (dim floats), writes the
// logit gradients g, and returns its status; every thread of the block gets the same answer.
static __device__ int8_t test_problem(const float* z, float* g, const float* c, int k, int classes,
                               int64_t dim, int64_t ls, int64_t lt, float lo, float hi,
                               float margin) {
  int left = 0;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) left |= outside_box(c[d], lo, hi);
  int hold = 1, flips = 1;
  for (int r = threadIdx.x; r <= k; r += blockDim.x) {
    const int label = static_cast<int>(r < k ? ls : lt);
    const bool ok = label_margin(z + r * classes, classes, label) > margin;
    if (r < k) hold &= ok; else flips &= ok;
    ce_grad(z + r * classes, classes, label, r < k ? 1.f / k : 1.f, g + r * classes);
  }
  left = __syncthreads_or(left);
  hold = __syncthreads_and(hold);
  flips = __syncthreads_and(flips);
  return decide(left, hold, flips);
}

static __global__ void __launch_bounds__(kThreads)
mlp_search_kernel(MlpParams m, const float* anchors, const int64_t* source, const int64_t* target,
                  float* out, int8_t* status, int64_t* stop, int k, int64_t steps, float lo,
                  float hi, float margin, StepCoef coef) {
  extern __shared__ float smem[];
  const int64_t p = blockIdx.x;
  const int rows = k + 1, D = m.width[0], L = m.layers, C = m.width[L];
  // act[l]: input of layer l (act[0] = x, the problem's rows); grad[l]: its gradient.
  float* act[kMaxLayers + 1];
  float* grad[kMaxLayers + 1];
  float* cursor = smem;
  for (int l = 0; l <= L; ++l) {
    act[l] = cursor;
    cursor += rows * m.width[l];
    grad[l] = cursor;
    cursor += rows * m.width[l];
  }
  float* x = act[0];
  float* x_relu = (m.relu & 1u) ? cursor : x;
  for (int64_t e = threadIdx.x; e < static_cast<int64_t>(k) * D; e += blockDim.x) {
    x[e] = anchors[p * k * D + e];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.f;
    for (int j = 0; j < k; ++j) sum += x[j * D + d];
    x[k * D + d] = sum * coef.inv_k;
  }
  const int64_t ls = source[p], lt = target[p];
  for (int64_t s = 0;; ++s) {
    __syncthreads();
    if (m.relu & 1u) {
      for (int e = threadIdx.x; e < rows * D; e += blockDim.x) x_relu[e] = fmaxf(x[e], 0.f);
      __syncthreads();
    }
    for (int l = 0; l < L; ++l) {
      linear_forward(l == 0 ? x_relu : act[l], act[l + 1], m.wt[l], m.b[l], rows, m.width[l],
                     m.width[l + 1], (m.relu >> (l + 1)) & 1u);
      __syncthreads();
    }
    const int8_t st = test_problem(act[L], grad[L], x + k * D, k, C, D, ls, lt, lo, hi, margin);
    if (st != kActive || s == steps) {
      for (int64_t e = threadIdx.x; e < static_cast<int64_t>(k) * D; e += blockDim.x) {
        out[p * k * D + e] = x[e];
      }
      if (threadIdx.x == 0) {
        status[p] = st;
        stop[p] = s;
      }
      return;
    }
    for (int l = L - 1; l >= 0; --l) {
      if ((m.relu >> (l + 1)) & 1u) {
        for (int e = threadIdx.x; e < rows * m.width[l + 1]; e += blockDim.x) {
          if (!(act[l + 1][e] > 0.f)) grad[l + 1][e] = 0.f;
        }
        __syncthreads();
      }
      linear_backward(grad[l + 1], grad[l], m.w[l], rows, m.width[l], m.width[l + 1]);
      __syncthreads();
    }
    if (m.relu & 1u) {
      for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
        if (!(x[e] > 0.f)) grad[0][e] = 0.f;
      }
      __syncthreads();
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) update_coordinate(x, grad[0], x, k, D, d, coef);
  }
}

static __global__ void __launch_bounds__(kThreads)
step_logits_kernel(const float* logits, const float* rows, const int64_t* idx,
                   const int64_t* source, const int64_t* target, float* grad, int8_t* status,
                   int k, int classes, int64_t dim, float lo, float hi, float margin) {
  const int64_t i = blockIdx.x, p = idx[i], r = k + 1;
  const int8_t st = test_problem(logits + i * r * classes, grad + i * r * classes,
                                 rows + (i * r + k) * dim, k, classes, dim, source[p], target[p],
                                 lo, hi, margin);
  if (threadIdx.x == 0) status[i] = st;
}

static __global__ void __launch_bounds__(kThreads)
step_update_kernel(const float* rows, const float* grads, const int8_t* status,
                   const int64_t* idx, const int64_t* dest, float* next_rows, int64_t* next_idx,
                   float* anchors_out, int8_t* status_out, int64_t* stop_out, int k, int64_t dim,
                   int64_t step, StepCoef coef) {
  const int64_t i = blockIdx.x, p = idx[i], r = k + 1;
  const float* xi = rows + i * r * dim;
  if (dest[i] < 0) {
    for (int64_t e = threadIdx.x; e < k * dim; e += blockDim.x) anchors_out[p * k * dim + e] = xi[e];
    if (threadIdx.x == 0) {
      status_out[p] = status[i];
      stop_out[p] = step;
    }
    return;
  }
  float* ni = next_rows + dest[i] * r * dim;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    update_coordinate(xi, grads + i * r * dim, ni, k, dim, d, coef);
  }
  if (threadIdx.x == 0) next_idx[dest[i]] = p;
}

int launch_mlp_search(const MlpParams& m, const float* anchors, const int64_t* source,
                      const int64_t* target, float* out, int8_t* status, int64_t* stop, int64_t q,
                      int k, int64_t steps, float lo, float hi, float margin, StepCoef coef,
                      void* stream) {
  const int64_t need = mlp_search_smem(m, k);
  if (need < 0) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(need);
  if (smem > 48 * 1024) {  // beyond the default: opt in (for the current device)
    const cudaError_t e = cudaFuncSetAttribute(
        mlp_search_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  if (q == 0) return cudaSuccess;
  mlp_search_kernel<<<static_cast<unsigned>(q), kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      m, anchors, source, target, out, status, stop, k, steps, lo, hi, margin, coef);
  return cudaGetLastError();
}

int launch_step_logits(const float* logits, const float* rows, const int64_t* idx,
                       const int64_t* source, const int64_t* target, float* grad, int8_t* status,
                       int64_t n, int k, int classes, int64_t dim, float lo, float hi,
                       float margin, void* stream) {
  if (n == 0) return cudaSuccess;
  step_logits_kernel<<<static_cast<unsigned>(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      logits, rows, idx, source, target, grad, status, k, classes, dim, lo, hi, margin);
  return cudaGetLastError();
}

int launch_step_update(const float* rows, const float* grads, const int8_t* status,
                       const int64_t* idx, const int64_t* dest, float* next_rows,
                       int64_t* next_idx, float* anchors_out, int8_t* status_out,
                       int64_t* stop_out, int64_t n, int k, int64_t dim, int64_t step,
                       StepCoef coef, void* stream) {
  if (n == 0) return cudaSuccess;
  step_update_kernel<<<static_cast<unsigned>(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      rows, grads, status, idx, dest, next_rows, next_idx, anchors_out, status_out, stop_out, k,
      dim, step, coef);
  return cudaGetLastError();
}

}  // namespace pocket
}  // namespace medic_fast
