// The step math of CLEAR's pocket search (DESIGN.md §2), shared by the CPU code
// (pocket_search.cpp) and the CUDA kernels (pocket_search.cu). Plain C++ on floats, no PyTorch:
// it compiles with g++ and with nvcc.
//
// One problem holds k anchors P_1..P_k and their centroid c = mean_j P_j. Its loss is
//   L = (1/k) sum_j CE(head(P_j), ls) + CE(head(c), lt) + (alpha/k) sum_j ||P_j - c||^2
// and one SGD step is P_j -= lr * dL/dP_j. Before each step the problem is tested: it is
// abandoned when c leaves the box [lo, hi], found when every anchor is classified ls and c is
// classified lt, each by more than `margin`.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MF_HD __host__ __device__ __forceinline__
#else
#define MF_HD inline
#endif

namespace medic_fast {
namespace pocket {

// Per-problem outcome; a problem that neither stops nor is found by the last step stays kActive.
enum Status : int8_t { kActive = 0, kFound = 1, kAbandoned = 2 };

// Logit of `label` minus the largest other logit. A NaN anywhere gives NaN, which never beats
// a margin, so a problem with NaN logits is never reported found.
MF_HD float label_margin(const float* z, int num_classes, int label) {
  float best = -INFINITY;
  for (int j = 0; j < num_classes; ++j) {
    if (j != label && (z[j] > best || z[j] != z[j])) best = z[j];
  }
  return z[label] - best;
}

// g = scale * (softmax(z) - onehot(label)): the gradient of scale * CE(z, label) w.r.t. z.
MF_HD void ce_grad(const float* z, int num_classes, int label, float scale, float* g) {
  float m = z[0];
  for (int j = 1; j < num_classes; ++j) m = fmaxf(m, z[j]);
  float sum = 0.f;
  for (int j = 0; j < num_classes; ++j) {
    g[j] = expf(z[j] - m);
    sum += g[j];
  }
  const float s = scale / sum;
  for (int j = 0; j < num_classes; ++j) g[j] *= s;
  g[label] -= scale;
}

// A centroid coordinate outside [lo, hi] (or NaN) abandons the problem.
MF_HD bool outside_box(float c, float lo, float hi) { return !(c >= lo && c <= hi); }

// Leaving the box wins over success: a "pocket" outside the clean features' range is no pocket.
MF_HD int8_t decide(bool left_box, bool anchors_hold, bool centroid_flips) {
  if (left_box) return kAbandoned;
  return (anchors_hold && centroid_flips) ? kFound : kActive;
}

// Coefficients of one problem's step, fixed for the whole search.
struct StepCoef {
  float inv_k;             // 1/k: d c / d P_j
  float two_alpha_over_k;  // 2 alpha / k: the compactness term's gradient factor
  float lr;
};

MF_HD StepCoef step_coef(int k, float alpha, float lr) {
  return StepCoef{1.f / static_cast<float>(k), 2.f * alpha / static_cast<float>(k), lr};
}

// New value of one coordinate of anchor j.
//   p        the coordinate of P_j;  c  the centroid's;  dev_mean = (1/k) sum_i (P_i - c)
//   g_anchor d[(1/k) CE(head(P_j), ls)]/dP_j;  g_centroid  d[CE(head(c), lt)]/dc
// dL/dP_j = g_anchor + g_centroid / k + (2 alpha / k) ((P_j - c) - dev_mean); dev_mean is zero in
// exact arithmetic and kept so that the step is the exact gradient of L in floats as well.
MF_HD float anchor_step(float p, float c, float dev_mean, float g_anchor, float g_centroid,
                        StepCoef s) {
  return p - s.lr * (g_anchor + g_centroid * s.inv_k + s.two_alpha_over_k * ((p - c) - dev_mean));
}

// Updates one feature coordinate `d` of a problem stored as k anchor rows then the centroid row
// (row stride `ld`), given the input gradients of the same layout, and recomputes the centroid.
// Reads rows/grads at column d, writes `out` (which may alias `rows`) at column d.
MF_HD void update_coordinate(const float* rows, const float* grads, float* out, int k,
                             int64_t ld, int64_t d, StepCoef s) {
  const float c = rows[k * ld + d];
  const float gc = grads[k * ld + d];
  float dev = 0.f;
  for (int j = 0; j < k; ++j) dev += rows[j * ld + d] - c;
  dev *= s.inv_k;
  float sum = 0.f;
  for (int j = 0; j < k; ++j) {
    const float p = anchor_step(rows[j * ld + d], c, dev, grads[j * ld + d], gc, s);
    out[j * ld + d] = p;
    sum += p;
  }
  out[k * ld + d] = sum * s.inv_k;
}

}  // namespace pocket
}  // namespace medic_fast

// ------------------------------------------------------------------------------------------------
// CUDA launchers (pocket_search.cu). They take raw pointers and a cudaStream_t passed as void*, so
// that this header needs no CUDA or PyTorch headers; they return the cudaError_t as an int.
// ------------------------------------------------------------------------------------------------
namespace medic_fast {
namespace pocket {

constexpr int kMaxLayers = 8;

// A Linear (+ ReLU) head on the device: W_l [width[l+1], width[l]] and its transpose, b_l, and
// relu bit l (l = 0: on the input; l + 1: after layer l).
struct MlpParams {
  int layers;
  int width[kMaxLayers + 1];
  const float* w[kMaxLayers];
  const float* wt[kMaxLayers];
  const float* b[kMaxLayers];
  unsigned relu;
};

// Bytes of shared memory one problem (one block) of the whole-search kernel, mlp_search_kernel,
// needs: for each of its k + 1 rows, every layer's input and the gradient w.r.t. it
// (width[0..layers], the last being the logits), plus the input after its ReLU when relu_in:
// (k + 1) * 4 * (2 * sum(width) [+ width[0]]). Or -1 when the kernel cannot take the head at all
// (more than kMaxLayers layers). The one place of this formula: the launcher sizes the kernel with
// it, the CUDA op checks it against the device, and pocket_search routes heads with it (through
// the op pocket_search_mlp_smem).
template <typename Int>
inline int64_t mlp_search_smem(const Int* width, int64_t layers, bool relu_in, int64_t k) {
  if (layers < 1 || layers > kMaxLayers || k < 1) return -1;
  int64_t floats = 0;
  for (int64_t l = 0; l <= layers; ++l) floats += 2 * static_cast<int64_t>(width[l]);
  if (relu_in) floats += width[0];
  return floats * (k + 1) * static_cast<int64_t>(sizeof(float));
}

inline int64_t mlp_search_smem(const MlpParams& m, int k) {
  return mlp_search_smem(m.width, m.layers, (m.relu & 1u) != 0, k);
}

int launch_mlp_search(const MlpParams& m, const float* anchors, const int64_t* source,
                      const int64_t* target, float* out, int8_t* status, int64_t* stop, int64_t q,
                      int k, int64_t steps, float lo, float hi, float margin, StepCoef coef,
                      void* stream);

int launch_step_logits(const float* logits, const float* rows, const int64_t* idx,
                       const int64_t* source, const int64_t* target, float* grad, int8_t* status,
                       int64_t n, int k, int classes, int64_t dim, float lo, float hi,
                       float margin, void* stream);

// dest[i]: where active problem i goes in next_rows, or -1 when it leaves (then it is written to
// anchors_out/status_out/stop_out at idx[i]). grads may be null: every problem leaves.
int launch_step_update(const float* rows, const float* grads, const int8_t* status,
                       const int64_t* idx, const int64_t* dest, float* next_rows,
                       int64_t* next_idx, float* anchors_out, int8_t* status_out,
                       int64_t* stop_out, int64_t n, int k, int64_t dim, int64_t step,
                       StepCoef coef, void* stream);

}  // namespace pocket
}  // namespace medic_fast
