// CLEAR's batched pocket search on the CPU (DESIGN.md §2): the CPU kernels of the ops of
// torch.ops.medic_fast, defined (schemas and fake kernels) in medic_fast/ops/pocket_search.py:
//
// pocket_search_mlp     the whole search for a head that is a stack of Linear (+ ReLU) layers.
//                       Problems are cut into tiles that the threads take one at a time; a thread
//                       runs every step of its tile (forward and input gradient as GEMMs over the
//                       tile's active rows, then tests, update and compaction) so that a tile's
//                       rows stay in its core's cache for the whole search.
// pocket_step_logits    for any other head, after PyTorch ran the head's forward: the success and
//                       box tests and the cross-entropy gradients w.r.t. the logits.
// pocket_step_update    after PyTorch back-propagated those gradients to the head's input: the
//                       centroid and compactness terms, the SGD update, and compaction of the
//                       active set (stopped problems are written to the outputs and leave).
// pocket_search_mlp_smem  no tensors: the shared memory the CUDA whole-search kernel needs for a
//                       head, by which pocket_search picks the whole search or the steps.
//
// Layout: a problem's k anchors and then its centroid are k+1 consecutive rows of D floats.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <tuple>
#include <vector>

#include "pocket_search.h"

namespace {

using medic_fast::pocket::anchor_step;
using medic_fast::pocket::ce_grad;
using medic_fast::pocket::decide;
using medic_fast::pocket::kActive;
using medic_fast::pocket::label_margin;
using medic_fast::pocket::outside_box;
using medic_fast::pocket::step_coef;
using medic_fast::pocket::StepCoef;
using medic_fast::pocket::update_coordinate;

// Rows of one tile of the MLP search: enough for the GEMMs to run near peak while the tile's
// activations and gradients stay in a core's L2 cache.
constexpr int64_t kTileRows = 256;

void check_problem_tensors(const at::Tensor& source, const at::Tensor& target, int64_t q) {
  TORCH_CHECK(source.scalar_type() == at::kLong && target.scalar_type() == at::kLong,
              "source and target must be int64 tensors");
  TORCH_CHECK(source.dim() == 1 && target.dim() == 1 && source.size(0) == q &&
                  target.size(0) == q,
              "source and target must be 1-D with one entry per problem (", q, ")");
}

// Tests one problem (k anchor rows, then the centroid row, of logits with C columns; `x` is the
// problem's k+1 input rows of D floats) and writes its logit gradients into `g`.
int8_t test_and_grad(const float* z, float* g, const float* x, int64_t k, int64_t C, int64_t D,
                     int64_t ls, int64_t lt, float lo, float hi, float margin) {
  bool left = false;
  const float* c = x + k * D;
  for (int64_t d = 0; d < D; ++d) left |= outside_box(c[d], lo, hi);
  bool hold = true;
  for (int64_t j = 0; j < k; ++j) hold &= label_margin(z + j * C, C, ls) > margin;
  const bool flips = label_margin(z + k * C, C, lt) > margin;
  const float inv_k = 1.f / static_cast<float>(k);
  for (int64_t j = 0; j < k; ++j) ce_grad(z + j * C, C, ls, inv_k, g + j * C);
  ce_grad(z + k * C, C, lt, 1.f, g + k * C);
  return decide(left, hold, flips);
}

// One SGD step of one problem in place (anchors, then centroid), from its input gradients: the
// arithmetic of update_coordinate in the same order, with loops over contiguous coordinates so
// that they vectorise. `dev` is scratch of D floats.
void step_problem(float* x, const float* gx, int64_t k, int64_t D, StepCoef s, float* dev) {
  float* c = x + k * D;
  const float* gc = gx + k * D;
  std::fill(dev, dev + D, 0.f);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t d = 0; d < D; ++d) dev[d] += x[j * D + d] - c[d];
  }
  for (int64_t d = 0; d < D; ++d) dev[d] *= s.inv_k;
  for (int64_t j = 0; j < k; ++j) {
    float* p = x + j * D;
    const float* g = gx + j * D;
    for (int64_t d = 0; d < D; ++d) p[d] = anchor_step(p[d], c[d], dev[d], g[d], gc[d], s);
  }
  std::fill(c, c + D, 0.f);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t d = 0; d < D; ++d) c[d] += x[j * D + d];
  }
  for (int64_t d = 0; d < D; ++d) c[d] *= s.inv_k;
}

void relu_(float* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] > 0.f ? a[i] : 0.f;
}

// g *= (a > 0): back through a ReLU whose output (or input) is `a`.
void relu_backward_(float* g, const float* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = a[i] > 0.f ? g[i] : 0.f;
}

// ----------------------------------------------------------------------------------------------
// The whole search for Linear (+ ReLU) heads
// ----------------------------------------------------------------------------------------------

struct Mlp {
  std::vector<at::Tensor> w, wt, b;  // W_l [out, in], its transpose (a view), b_l [out]
  std::vector<int64_t> width;        // width[0] = D, width[l + 1] = out_l
  std::vector<bool> relu;            // relu[0]: on the input; relu[l + 1]: after layer l
};

struct SearchArgs {
  const float* anchors;  // [Q, k, D]
  const int64_t* source;
  const int64_t* target;
  float* out;            // [Q, k, D]
  int8_t* status;
  int64_t* stop;
  int64_t k, steps;
  float lo, hi, margin;
  StepCoef coef;
};

// Scratch of one thread: the tile's inputs, every layer's activations and their gradients.
struct TileBuffers {
  at::Tensor x;                  // [rows, D]: the problems' rows
  std::vector<at::Tensor> act;   // act[l]: input of layer l after its ReLU (act[0] only if relu[0])
  std::vector<at::Tensor> grad;  // grad[l]: gradient w.r.t. act[l]; grad[L]: w.r.t. the logits
  std::vector<float> dev;        // scratch of step_problem

  TileBuffers(const Mlp& m, int64_t rows) : dev(m.width[0]) {
    const auto opt = at::TensorOptions().dtype(at::kFloat);
    x = at::empty({rows, m.width[0]}, opt);
    for (int64_t w : m.width) {
      act.push_back(at::empty({rows, w}, opt));
      grad.push_back(at::empty({rows, w}, opt));
    }
  }
};

// Runs every step of problems [first, first + count) and writes their outcomes.
void search_tile(const Mlp& m, const SearchArgs& a, TileBuffers& buf, int64_t first,
                 int64_t count) {
  const int64_t k = a.k, r = k + 1, D = m.width[0], L = static_cast<int64_t>(m.w.size());
  const int64_t C = m.width[L];
  float* x = buf.x.data_ptr<float>();
  std::vector<int64_t> id(count);
  std::vector<int8_t> st(count);
  for (int64_t i = 0; i < count; ++i) {
    id[i] = first + i;
    float* xi = x + i * r * D;
    std::memcpy(xi, a.anchors + (first + i) * k * D, sizeof(float) * k * D);
    for (int64_t d = 0; d < D; ++d) {
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) sum += xi[j * D + d];
      xi[k * D + d] = sum * a.coef.inv_k;
    }
  }
  int64_t n = count;  // active problems, stored first
  for (int64_t s = 0; s <= a.steps && n > 0; ++s) {
    const int64_t rows = n * r;
    // Forward: act[l + 1] = relu?(act[l] W_l^T + b_l).
    at::Tensor in = buf.x.narrow(0, 0, rows);
    if (m.relu[0]) {
      at::Tensor a0 = buf.act[0].narrow(0, 0, rows);
      a0.copy_(in);
      relu_(a0.data_ptr<float>(), rows * D);
      in = a0;
    }
    for (int64_t l = 0; l < L; ++l) {
      at::Tensor z = buf.act[l + 1].narrow(0, 0, rows);
      at::addmm_out(z, m.b[l], in, m.wt[l]);
      if (m.relu[l + 1]) relu_(z.data_ptr<float>(), rows * m.width[l + 1]);
      in = z;
    }
    // Tests and logit gradients.
    const float* z = in.data_ptr<float>();
    float* gz = buf.grad[L].data_ptr<float>();
    bool any_active = false;
    for (int64_t i = 0; i < n; ++i) {
      st[i] = test_and_grad(z + i * r * C, gz + i * r * C, x + i * r * D, k, C, D,
                            a.source[id[i]], a.target[id[i]], a.lo, a.hi, a.margin);
      any_active |= st[i] == kActive;
    }
    const bool update = any_active && s < a.steps;
    if (update) {  // Backward to the input: grad[l] = (grad[l + 1] * relu'(act[l + 1])) W_l.
      for (int64_t l = L - 1; l >= 0; --l) {
        at::Tensor g = buf.grad[l + 1].narrow(0, 0, rows);
        if (m.relu[l + 1]) {
          relu_backward_(g.data_ptr<float>(), buf.act[l + 1].data_ptr<float>(),
                         rows * m.width[l + 1]);
        }
        at::Tensor gin = buf.grad[l].narrow(0, 0, rows);
        at::mm_out(gin, g, m.w[l]);
      }
      if (m.relu[0]) relu_backward_(buf.grad[0].data_ptr<float>(), x, rows * D);
    }
    // Update the problems that go on, write out the others, and compact.
    const float* gx = buf.grad[0].data_ptr<float>();
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      float* xi = x + i * r * D;
      if (update && st[i] == kActive) {
        step_problem(xi, gx + i * r * D, k, D, a.coef, buf.dev.data());
        if (kept != i) {
          std::memcpy(x + kept * r * D, xi, sizeof(float) * r * D);
          id[kept] = id[i];
        }
        ++kept;
      } else {
        std::memcpy(a.out + id[i] * k * D, xi, sizeof(float) * k * D);
        a.status[id[i]] = st[i];
        a.stop[id[i]] = s;
      }
    }
    n = kept;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pocket_search_mlp_cpu(
    const at::Tensor& anchors, at::TensorList weights, at::TensorList biases,
    at::IntArrayRef relu, const at::Tensor& source, const at::Tensor& target, double alpha,
    double lr, int64_t steps, double lo, double hi, double margin) {
  TORCH_CHECK(anchors.dim() == 3 && anchors.scalar_type() == at::kFloat,
              "anchors must be a float32 tensor [problems, k, D]");
  const int64_t q = anchors.size(0), k = anchors.size(1), D = anchors.size(2);
  TORCH_CHECK(k >= 1 && D >= 1, "anchors must have k >= 1 and D >= 1");
  TORCH_CHECK(steps >= 0, "steps must be >= 0");
  check_problem_tensors(source, target, q);
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(biases.size()) == L &&
                  static_cast<int64_t>(relu.size()) == L + 1,
              "need L >= 1 weights, L biases and L + 1 relu flags");
  Mlp m;
  m.width.push_back(D);
  m.relu.push_back(relu[0] != 0);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.size(1) == m.width.back(),
                "weight ", l, " must be float32 [out, ", m.width.back(), "]");
    TORCH_CHECK(biases[l].dim() == 1 && biases[l].scalar_type() == at::kFloat &&
                    biases[l].size(0) == w.size(0),
                "bias ", l, " must be float32 [", w.size(0), "]");
    m.w.push_back(w.contiguous());
    m.wt.push_back(m.w.back().t());
    m.b.push_back(biases[l].contiguous());
    m.width.push_back(w.size(0));
    m.relu.push_back(relu[l + 1] != 0);
  }
  const int64_t C = m.width.back();
  TORCH_CHECK(C >= 2, "the head must output at least 2 classes");
  const at::Tensor src = source.contiguous(), tgt = target.contiguous();
  const int64_t* sp = src.data_ptr<int64_t>();
  const int64_t* tp = tgt.data_ptr<int64_t>();
  for (int64_t i = 0; i < q; ++i) {
    TORCH_CHECK(sp[i] >= 0 && sp[i] < C && tp[i] >= 0 && tp[i] < C,
                "source and target classes must be in [0, ", C, ")");
  }
  const at::Tensor in = anchors.contiguous();
  at::Tensor out = at::empty_like(in);
  at::Tensor status = at::empty({q}, at::TensorOptions().dtype(at::kChar));
  at::Tensor stop = at::empty({q}, at::TensorOptions().dtype(at::kLong));
  SearchArgs a{in.data_ptr<float>(), sp, tp, out.data_ptr<float>(), status.data_ptr<int8_t>(),
               stop.data_ptr<int64_t>(), k, steps, static_cast<float>(lo),
               static_cast<float>(hi), static_cast<float>(margin),
               step_coef(static_cast<int>(k), static_cast<float>(alpha), static_cast<float>(lr))};

  // Tiles of about kTileRows rows, but at least four per thread so that threads whose problems
  // stop early take more tiles; threads take the next tile from a shared counter.
  const int64_t threads = at::get_num_threads();
  const int64_t tile = std::max<int64_t>(
      1, std::min<int64_t>(kTileRows / (k + 1), (q + 4 * threads - 1) / (4 * threads)));
  const int64_t tiles = (q + tile - 1) / tile;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, tiles), 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      TileBuffers buf(m, tile * (k + 1));
      for (int64_t t = next++; t < tiles; t = next++) {
        search_tile(m, a, buf, t * tile, std::min(tile, q - t * tile));
      }
    }
  });
  return {out, status, stop};
}

// ----------------------------------------------------------------------------------------------
// The fused step for any other head
// ----------------------------------------------------------------------------------------------

// The shapes and dtypes pocket_step_logits takes, on either device; returns {n, D, C}:
// active problems, features, classes.
std::array<int64_t, 3> check_logits_args(const at::Tensor& logits, const at::Tensor& rows,
                                         const at::Tensor& idx, const at::Tensor& source,
                                         const at::Tensor& target) {
  TORCH_CHECK(rows.dim() == 3 && rows.scalar_type() == at::kFloat,
              "rows must be float32 [active, k + 1, D]");
  const int64_t n = rows.size(0), r = rows.size(1), D = rows.size(2);
  TORCH_CHECK(r >= 2, "rows must hold k >= 1 anchors and a centroid");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat &&
                  logits.size(0) == n * r && logits.size(1) >= 2,
              "logits must be float32 [", n * r, ", classes >= 2]");
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == n && idx.scalar_type() == at::kLong,
              "idx must be int64 [active]");
  check_problem_tensors(source, target, source.size(0));
  return {n, D, logits.size(1)};
}

// logits [A (k+1), C] of rows [A, k+1, D] (active problems `idx` into source/target).
// Returns the logit gradients and each active problem's status at this step.
std::tuple<at::Tensor, at::Tensor> pocket_step_logits_cpu(
    const at::Tensor& logits, const at::Tensor& rows, const at::Tensor& idx,
    const at::Tensor& source, const at::Tensor& target, double lo, double hi, double margin) {
  const std::array<int64_t, 3> dims = check_logits_args(logits, rows, idx, source, target);
  const int64_t n = dims[0], D = dims[1], C = dims[2], r = rows.size(1), k = r - 1;
  const at::Tensor z = logits.contiguous(), x = rows.contiguous(), ix = idx.contiguous();
  const at::Tensor src = source.contiguous(), tgt = target.contiguous();
  at::Tensor g = at::empty_like(z);
  at::Tensor status = at::empty({n}, at::TensorOptions().dtype(at::kChar));
  const float* zp = z.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t* ip = ix.data_ptr<int64_t>();
  const int64_t* sp = src.data_ptr<int64_t>();
  const int64_t* tp = tgt.data_ptr<int64_t>();
  float* gp = g.data_ptr<float>();
  int8_t* stp = status.data_ptr<int8_t>();
  const int64_t q = src.size(0);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = ip[i];
      TORCH_CHECK(p >= 0 && p < q && sp[p] >= 0 && sp[p] < C && tp[p] >= 0 && tp[p] < C,
                  "problem index or class out of range");
      stp[i] = test_and_grad(zp + i * r * C, gp + i * r * C, xp + i * r * D, k, C, D, sp[p],
                             tp[p], static_cast<float>(lo), static_cast<float>(hi),
                             static_cast<float>(margin));
    }
  });
  return {g, status};
}

// The shapes and dtypes pocket_step_update takes, on either device; returns {n, k, D, q}:
// active problems, anchors, features, problems.
std::array<int64_t, 4> check_update_args(const at::Tensor& rows, const at::Tensor& status,
                                         const at::Tensor& idx, const at::Tensor& anchors_out,
                                         const at::Tensor& status_out,
                                         const at::Tensor& stop_out) {
  TORCH_CHECK(rows.dim() == 3 && rows.scalar_type() == at::kFloat,
              "rows must be float32 [active, k + 1, D]");
  const int64_t n = rows.size(0), D = rows.size(2), k = rows.size(1) - 1;
  TORCH_CHECK(k >= 1, "rows must hold k >= 1 anchors and a centroid");
  TORCH_CHECK(status.scalar_type() == at::kChar && status.numel() == n,
              "status must be int8 [active]");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.numel() == n, "idx must be int64 [active]");
  TORCH_CHECK(anchors_out.is_contiguous() && anchors_out.scalar_type() == at::kFloat &&
                  anchors_out.dim() == 3 && anchors_out.size(1) == k && anchors_out.size(2) == D,
              "anchors_out must be contiguous float32 [problems, k, D]");
  const int64_t q = anchors_out.size(0);
  TORCH_CHECK(status_out.is_contiguous() && status_out.scalar_type() == at::kChar &&
                  status_out.numel() == q && stop_out.is_contiguous() &&
                  stop_out.scalar_type() == at::kLong && stop_out.numel() == q,
              "status_out must be int8 [problems] and stop_out int64 [problems]");
  return {n, k, D, q};
}

// Steps the active problems whose status is kActive and returns them compacted (rows and their
// problem indices); every other problem, and all of them when `grads` is None (the step budget
// is spent), is written to anchors_out/status_out/stop_out at its index and leaves.
std::tuple<at::Tensor, at::Tensor> pocket_step_update_cpu(
    const at::Tensor& rows, const std::optional<at::Tensor>& grads, const at::Tensor& status,
    const at::Tensor& idx, at::Tensor& anchors_out, at::Tensor& status_out, at::Tensor& stop_out,
    int64_t step, double alpha, double lr) {
  const std::array<int64_t, 4> dims =
      check_update_args(rows, status, idx, anchors_out, status_out, stop_out);
  const int64_t n = dims[0], k = dims[1], D = dims[2], q = dims[3], r = k + 1;
  const bool update = grads.has_value();
  const at::Tensor x = rows.contiguous();
  const at::Tensor gx = update ? grads->contiguous() : at::Tensor();
  TORCH_CHECK(!update || (gx.sizes() == x.sizes() && gx.scalar_type() == at::kFloat),
              "grads must be float32 with the shape of rows");
  const at::Tensor st = status.contiguous(), ix = idx.contiguous();
  const int8_t* stp = st.data_ptr<int8_t>();
  const int64_t* ip = ix.data_ptr<int64_t>();
  // Destination of each kept problem (an exclusive prefix count), -1 for those that leave.
  std::vector<int64_t> dest(n);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < q, "problem index out of range");
    dest[i] = (update && stp[i] == kActive) ? kept++ : -1;
  }
  at::Tensor next = at::empty({kept, r, D}, x.options());
  at::Tensor next_idx = at::empty({kept}, ix.options());
  const float* xp = x.data_ptr<float>();
  const float* gp = update ? gx.data_ptr<float>() : nullptr;
  float* np = next.data_ptr<float>();
  int64_t* nip = next_idx.data_ptr<int64_t>();
  float* op = anchors_out.data_ptr<float>();
  int8_t* sop = status_out.data_ptr<int8_t>();
  int64_t* top = stop_out.data_ptr<int64_t>();
  const StepCoef coef =
      step_coef(static_cast<int>(k), static_cast<float>(alpha), static_cast<float>(lr));
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = xp + i * r * D;
      if (dest[i] < 0) {
        std::memcpy(op + ip[i] * k * D, xi, sizeof(float) * k * D);
        sop[ip[i]] = stp[i];
        top[ip[i]] = step;
        continue;
      }
      float* ni = np + dest[i] * r * D;
      for (int64_t d = 0; d < D; ++d) update_coordinate(xi, gp + i * r * D, ni, k, D, d, coef);
      nip[dest[i]] = ip[i];
    }
  });
  return {next, next_idx};
}

// Bytes of shared memory the CUDA whole-search kernel needs per problem for a head of these
// widths ([D, out_0, ..., out_{L-1}]), with a ReLU on its input or not, at k anchors; -1 when it
// cannot take the head (more than kMaxLayers layers). The formula is mlp_search_smem
// (pocket_search.h); this op gives it to pocket_search, which routes the heads that do not fit to
// the per-step path. No tensor arguments: one kernel for every build, CUDA or not.
int64_t pocket_search_mlp_smem(at::IntArrayRef widths, bool relu_in, int64_t k) {
  return medic_fast::pocket::mlp_search_smem(widths.data(), static_cast<int64_t>(widths.size()) - 1,
                                             relu_in, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(medic_fast, CPU, m) {
  m.impl("pocket_search_mlp", &pocket_search_mlp_cpu);
  m.impl("pocket_step_logits", &pocket_step_logits_cpu);
  m.impl("pocket_step_update", &pocket_step_update_cpu);
}

TORCH_LIBRARY_IMPL(medic_fast, CompositeExplicitAutograd, m) {
  m.impl("pocket_search_mlp_smem", &pocket_search_mlp_smem);
}

// ----------------------------------------------------------------------------------------------
// CUDA tensors: only where the extension is built with CUDA (the build defines
// MEDIC_FAST_WITH_CUDA and compiles pocket_search.cu). Tensor checks and allocation here, the
// kernels in pocket_search.cu.
// ----------------------------------------------------------------------------------------------
#ifdef MEDIC_FAST_WITH_CUDA
// The light c10/cuda headers and the CUDA runtime's alone: ATen/cuda/CUDAContext.h pulls in the
// cuBLAS and cuSPARSE headers, which a plain CUDA toolkit may lack.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace {

using medic_fast::pocket::kMaxLayers;
using medic_fast::pocket::MlpParams;

void cuda_ok(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// Each op first makes its tensors' device the current one (a CUDAGuard), so its kernels run there,
// on that device's current stream (the caller's).
void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The device of a CUDA op: that of its first tensor, which must be a CUDA tensor (the dispatcher
// sends an op here as soon as any of its tensors is on CUDA).
at::Device op_device(const at::Tensor& first, const char* name, const char* op) {
  TORCH_CHECK(first.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ",
              first.device());
  return first.device();
}

// Every other tensor must be on the same device: a host pointer (or another GPU's) in a kernel is
// an illegal access, or a silent race.
void check_on(const at::Tensor& t, const char* name, const at::Device& device, const char* op) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device,
              " with the other tensors, got one on ", t.device());
}

// The range checks of the CPU ops, on the device, with one copy back: source and target classes
// in [0, classes) and, when `idx` is defined, problem indices in [0, q). A class out of range would
// index past a logit row (in shared memory, in the whole-search kernel).
void check_ranges(const at::Tensor& source, const at::Tensor& target, int64_t classes,
                  const at::Tensor& idx, int64_t q, const char* op) {
  auto outside = [](const at::Tensor& t, int64_t n) {
    return at::logical_or(t < 0, t >= n).any();
  };
  std::vector<at::Tensor> bad{outside(source, classes), outside(target, classes)};
  if (idx.defined()) bad.push_back(outside(idx, q));
  const at::Tensor host = at::stack(bad).cpu();
  const bool* b = host.data_ptr<bool>();
  TORCH_CHECK(!b[0] && !b[1], op, ": source and target classes must be in [0, ", classes, ")");
  TORCH_CHECK(!idx.defined() || !b[2], op, ": problem index out of range [0, ", q, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pocket_search_mlp_cuda(
    const at::Tensor& anchors, at::TensorList weights, at::TensorList biases,
    at::IntArrayRef relu, const at::Tensor& source, const at::Tensor& target, double alpha,
    double lr, int64_t steps, double lo, double hi, double margin) {
  const char* op = "pocket_search_mlp";
  const at::Device device = op_device(anchors, "anchors", op);
  const c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(anchors.dim() == 3 && anchors.scalar_type() == at::kFloat,
              "anchors must be a float32 tensor [problems, k, D]");
  const int64_t q = anchors.size(0), k = anchors.size(1), D = anchors.size(2);
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(k >= 1 && D >= 1, "anchors must have k >= 1 and D >= 1");
  TORCH_CHECK(steps >= 0, "steps must be >= 0");
  TORCH_CHECK(L >= 1 && L <= kMaxLayers && static_cast<int64_t>(biases.size()) == L &&
                  static_cast<int64_t>(relu.size()) == L + 1,
              "need 1 to ", kMaxLayers, " weights, as many biases and one more relu flag");
  check_problem_tensors(source, target, q);
  check_on(source, "source", device, op);
  check_on(target, "target", device, op);
  MlpParams p{};
  std::vector<at::Tensor> keep;
  p.layers = static_cast<int>(L);
  p.width[0] = static_cast<int>(D);
  p.relu = relu[0] ? 1u : 0u;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    const at::Tensor& b = biases[l];
    check_on(w, "every weight", device, op);
    check_on(b, "every bias", device, op);
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.size(1) == p.width[l],
                "weight ", l, " must be float32 [out, ", p.width[l], "]");
    TORCH_CHECK(b.dim() == 1 && b.scalar_type() == at::kFloat && b.size(0) == w.size(0),
                "bias ", l, " must be float32 [", w.size(0), "]");
    keep.push_back(w.contiguous());
    keep.push_back(w.t().contiguous());
    keep.push_back(b.contiguous());
    p.w[l] = keep[keep.size() - 3].data_ptr<float>();
    p.wt[l] = keep[keep.size() - 2].data_ptr<float>();
    p.b[l] = keep.back().data_ptr<float>();
    p.width[l + 1] = static_cast<int>(w.size(0));
    if (relu[l + 1]) p.relu |= 1u << (l + 1);
  }
  const int64_t C = p.width[L];
  TORCH_CHECK(C >= 2, "the head must output at least 2 classes");
  const int64_t smem = medic_fast::pocket::mlp_search_smem(p, static_cast<int>(k));
  int optin = 0;
  cuda_ok(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()),
          "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  TORCH_CHECK(smem >= 0 && smem <= optin, op, ": this head needs ", smem,
              " bytes of shared memory per problem, more than the ", optin, " that ", device,
              " allows a block; pocket_search runs such heads on the per-step path "
              "(pocket_step_logits / pocket_step_update)");
  const at::Tensor in = anchors.contiguous(), src = source.contiguous(), tgt = target.contiguous();
  check_ranges(src, tgt, C, at::Tensor(), q, op);
  at::Tensor out = at::empty_like(in);
  at::Tensor status = at::empty({q}, in.options().dtype(at::kChar));
  at::Tensor stop = at::empty({q}, in.options().dtype(at::kLong));
  cuda_ok(medic_fast::pocket::launch_mlp_search(
              p, in.data_ptr<float>(), src.data_ptr<int64_t>(), tgt.data_ptr<int64_t>(),
              out.data_ptr<float>(), status.data_ptr<int8_t>(), stop.data_ptr<int64_t>(), q,
              static_cast<int>(k), steps, static_cast<float>(lo), static_cast<float>(hi),
              static_cast<float>(margin),
              step_coef(static_cast<int>(k), static_cast<float>(alpha), static_cast<float>(lr)),
              stream()),
          op);
  return {out, status, stop};
}

std::tuple<at::Tensor, at::Tensor> pocket_step_logits_cuda(
    const at::Tensor& logits, const at::Tensor& rows, const at::Tensor& idx,
    const at::Tensor& source, const at::Tensor& target, double lo, double hi, double margin) {
  const char* op = "pocket_step_logits";
  const at::Device device = op_device(logits, "logits", op);
  const c10::cuda::CUDAGuard guard(device);
  check_on(rows, "rows", device, op);
  check_on(idx, "idx", device, op);
  check_on(source, "source", device, op);
  check_on(target, "target", device, op);
  const std::array<int64_t, 3> dims = check_logits_args(logits, rows, idx, source, target);
  const int64_t n = dims[0], D = dims[1], C = dims[2], r = rows.size(1), k = r - 1;
  const at::Tensor z = logits.contiguous(), x = rows.contiguous(), ix = idx.contiguous();
  const at::Tensor src = source.contiguous(), tgt = target.contiguous();
  check_ranges(src, tgt, C, ix, src.size(0), op);
  at::Tensor g = at::empty_like(z);
  at::Tensor status = at::empty({n}, x.options().dtype(at::kChar));
  cuda_ok(medic_fast::pocket::launch_step_logits(
              z.data_ptr<float>(), x.data_ptr<float>(), ix.data_ptr<int64_t>(),
              src.data_ptr<int64_t>(), tgt.data_ptr<int64_t>(), g.data_ptr<float>(),
              status.data_ptr<int8_t>(), n, static_cast<int>(k), static_cast<int>(C), D,
              static_cast<float>(lo), static_cast<float>(hi), static_cast<float>(margin),
              stream()),
          op);
  return {g, status};
}

std::tuple<at::Tensor, at::Tensor> pocket_step_update_cuda(
    const at::Tensor& rows, const std::optional<at::Tensor>& grads, const at::Tensor& status,
    const at::Tensor& idx, at::Tensor& anchors_out, at::Tensor& status_out, at::Tensor& stop_out,
    int64_t step, double alpha, double lr) {
  const char* op = "pocket_step_update";
  const at::Device device = op_device(rows, "rows", op);
  const c10::cuda::CUDAGuard guard(device);
  const bool update = grads.has_value();
  if (update) check_on(*grads, "grads", device, op);
  check_on(status, "status", device, op);
  check_on(idx, "idx", device, op);
  check_on(anchors_out, "anchors_out", device, op);
  check_on(status_out, "status_out", device, op);
  check_on(stop_out, "stop_out", device, op);
  const std::array<int64_t, 4> dims =
      check_update_args(rows, status, idx, anchors_out, status_out, stop_out);
  const int64_t n = dims[0], k = dims[1], D = dims[2], q = dims[3], r = k + 1;
  const at::Tensor x = rows.contiguous(), ix = idx.contiguous().view(-1);
  const at::Tensor st = status.contiguous().view(-1);
  const at::Tensor gx = update ? grads->contiguous() : at::Tensor();
  TORCH_CHECK(!update || (gx.sizes() == x.sizes() && gx.scalar_type() == at::kFloat),
              "grads must be float32 with the shape of rows");
  // Destination of each kept problem (an exclusive prefix count), -1 for those that leave; how
  // many stay and how many indices are out of range come back in one copy.
  const at::Tensor keep = update ? (st == 0).to(at::kLong) : at::zeros({n}, ix.options());
  const at::Tensor dest = at::where(keep.to(at::kBool), keep.cumsum(0) - 1, -1);
  const at::Tensor counts =
      at::stack({keep.sum(), at::logical_or(ix < 0, ix >= q).sum()}).cpu();
  const int64_t kept = counts[0].item<int64_t>();
  TORCH_CHECK(counts[1].item<int64_t>() == 0, op, ": problem index out of range [0, ", q, ")");
  at::Tensor next = at::empty({kept, r, D}, x.options());
  at::Tensor next_idx = at::empty({kept}, ix.options());
  cuda_ok(medic_fast::pocket::launch_step_update(
              x.data_ptr<float>(), update ? gx.data_ptr<float>() : nullptr, st.data_ptr<int8_t>(),
              ix.data_ptr<int64_t>(), dest.data_ptr<int64_t>(), next.data_ptr<float>(),
              next_idx.data_ptr<int64_t>(), anchors_out.data_ptr<float>(),
              status_out.data_ptr<int8_t>(), stop_out.data_ptr<int64_t>(), n,
              static_cast<int>(k), D, step,
              step_coef(static_cast<int>(k), static_cast<float>(alpha), static_cast<float>(lr)),
              stream()),
          op);
  return {next, next_idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(medic_fast, CUDA, m) {
  m.impl("pocket_search_mlp", &pocket_search_mlp_cuda);
  m.impl("pocket_step_logits", &pocket_step_logits_cuda);
  m.impl("pocket_step_update", &pocket_step_update_cuda);
}
#endif  // MEDIC_FAST_WITH_CUDA
