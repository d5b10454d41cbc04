// The fused importance clone loss of MEDIC on CPU tensors (DESIGN.md §1).
//
// One pass over each row's data: a row is cut into chunks of kChunk neurons; for each chunk,
// pass 1 computes a = tau*D((t-mu)/s), q = tau*s*g, r = (t-c)/s and r/s into a small scratch
// (L1-resident) and the chunk maxima, pass 2 evaluates h_a = exp((a-ma)/2), h_q = exp((q-mq)/2)
// (2 exponentials per neuron, as a lean 2^x: softmax(a)_i ~ h_a^2, and w_i ~ h_a*h_q needs no
// square root),
// accumulates S_a, S_q and N = sum h_a h_q r^2, and writes the unnormalised gradient h_a h_q r/s.
// At the end of the row the chunks merge (log-sum-exp style) into the loss and one factor per
// chunk, which rescales the row's gradient while it is still in cache.
//
// Parallelism: whole rows per task when there are enough rows; otherwise chunks of a row run in
// parallel and a second parallel pass rescales the gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

namespace medic_fast {
namespace {

constexpr int64_t kChunk = 1024;

using at::vec::Vectorized;

// Loads and stores of a tensor dtype T as vectors of its accumulation type.
template <typename T>
struct IO {
  using acc = T;
  using V = Vectorized<T>;
  static V load(const T* p) { return V::loadu(p); }
  static V load(const T* p, int64_t n) { return V::loadu(p, n); }
  static void store(T* p, V v, int64_t n) { v.store(p, static_cast<int>(n)); }
  static V exp2(V v) { return v.exp2(); }
};

// 2^x for x <= 0 in fp32, about 11 vector instructions against ~30 for Sleef's exp: 2^x =
// 2^n * 2^f with n = round(x), |f| <= 1/2, 2^f by a degree-5 polynomial (relative error 8e-8,
// below fp32 rounding of the sums it feeds). x is clamped at -125, where 2^x is already
// negligible next to the row maximum's 2^0 = 1.
inline Vectorized<float> exp2_nonpositive(Vectorized<float> x) {
  using V = Vectorized<float>;
  x = at::vec::maximum(x, V(-125.f));
  const V n = x.round();
  const V f = x - n;
  V p = at::vec::fmadd(V(0.0013266980f), f, V(0.0096754694f));
  p = at::vec::fmadd(p, f, V(0.055507427f));
  p = at::vec::fmadd(p, f, V(0.24022122f));
  p = at::vec::fmadd(p, f, V(0.69314695f));
  p = at::vec::fmadd(p, f, V(1.0000001f));
  const auto e = at::vec::convert_to_int_of_same_size(n) << Vectorized<int32_t>(23);
  return at::vec::cast<float>(at::vec::cast<int32_t>(p) + e);
}

template <>
struct IO<float> {
  using acc = float;
  using V = Vectorized<float>;
  static V load(const float* p) { return V::loadu(p); }
  static V load(const float* p, int64_t n) { return V::loadu(p, n); }
  static void store(float* p, V v, int64_t n) { v.store(p, static_cast<int>(n)); }
  static V exp2(V v) { return exp2_nonpositive(v); }
};

template <typename R>  // bfloat16 and float16: fp32 arithmetic
struct IOReduced {
  using acc = float;
  using V = Vectorized<float>;
  static V load(const R* p) {
    V out;
    at::vec::load_to_float<R>(p, out);
    return out;
  }
  static V load(const R* p, int64_t n) {
    R buf[V::size()] = {};
    std::copy(p, p + n, buf);
    return load(buf);
  }
  static void store(R* p, V v, int64_t n) {
    at::vec::convert_from_float<R>(v, v).store(p, static_cast<int>(n));
  }
  static V exp2(V v) { return exp2_nonpositive(v); }
};
template <>
struct IO<at::BFloat16> : IOReduced<at::BFloat16> {};
template <>
struct IO<at::Half> : IOReduced<at::Half> {};

// One layer, type-erased: [rows, m] views with unit stride along m.
struct Layer {
  at::ScalarType dtype;
  const void *t, *c, *g;
  int64_t st, sc, sg;  // row strides, in elements
  void* dc;            // contiguous [rows, m], or nullptr
  const void *mu, *inv_s, *tau_s;  // accumulation dtype, length nstat
  int64_t rows, m, inner, nstat;
  double row_scale;
};

template <typename acc>
struct Partial {
  acc ma, sa, mq, sq, n;
};

template <typename acc>
acc hmax(const Vectorized<acc>& v) {
  acc buf[Vectorized<acc>::size()];
  v.store(buf);
  return *std::max_element(buf, buf + Vectorized<acc>::size());
}

// Pass 1 + pass 2 over neurons [i0, i1) of one row. `scratch` holds 4 * (kChunk + V::size()).
// a and q are kept in units of log2(e)/2, so that h_a = 2^(a' - ma') = exp((a - ma)/2).
template <typename T, bool kSigned, bool kTauZero, bool kPerNeuron, bool kGrad>
Partial<typename IO<T>::acc> chunk(const Layer& L, int64_t row, int64_t i0, int64_t i1,
                                   typename IO<T>::acc tau, typename IO<T>::acc* scratch) {
  using acc = typename IO<T>::acc;
  using V = typename IO<T>::V;
  constexpr int64_t W = V::size();
  const acc half_log2e = acc(0.72134752044448170368);  // log2(e) / 2
  const T* t = static_cast<const T*>(L.t) + row * L.st;
  const T* c = static_cast<const T*>(L.c) + row * L.sc;
  const T* g = static_cast<const T*>(L.g) + row * L.sg;
  const acc* mu = static_cast<const acc*>(L.mu);
  const acc* inv_s = static_cast<const acc*>(L.inv_s);
  const acc* tau_s = static_cast<const acc*>(L.tau_s);
  const int64_t n = i1 - i0;
  acc* sa_ = scratch;
  acc* sq_ = scratch + (kChunk + W);
  acc* sr_ = scratch + 2 * (kChunk + W);
  acc* sb_ = scratch + 3 * (kChunk + W);
  const V vtau(tau * half_log2e), vhl(half_log2e), lowest(-std::numeric_limits<acc>::infinity());
  V vma = lowest, vmq = lowest;

  // Pass 1: runs of neurons that share statistics (the whole chunk when stats are per neuron).
  for (int64_t i = i0; i < i1;) {
    const int64_t k = kPerNeuron ? 0 : (i / L.inner) % L.nstat;
    const int64_t end = kPerNeuron ? i1 : std::min(i1, (i / L.inner + 1) * L.inner);
    const V bmu(mu[k]), binv(inv_s[k]), btau(tau_s[k] * half_log2e);
    for (int64_t j = i; j < end; j += W) {
      const int64_t cnt = std::min<int64_t>(W, end - j);
      const bool full = cnt == W;
      V vt = full ? IO<T>::load(t + j) : IO<T>::load(t + j, cnt);
      V vc = full ? IO<T>::load(c + j) : IO<T>::load(c + j, cnt);
      V vg = full ? IO<T>::load(g + j) : IO<T>::load(g + j, cnt);
      V vmu = bmu, vinv = binv, vts = btau;
      if (kPerNeuron) {
        vmu = full ? V::loadu(mu + j) : V::loadu(mu + j, cnt);
        vinv = full ? V::loadu(inv_s + j) : V::loadu(inv_s + j, cnt);
        vts = (full ? V::loadu(tau_s + j) : V::loadu(tau_s + j, cnt)) * vhl;
      }
      const V z = (vt - vmu) * vinv;
      V a = vtau * (kSigned ? z : z.abs());
      V q = vts * vg;
      const V r = (vt - vc) * vinv;
      if (!full) {
        a = V::set(lowest, a, cnt);
        q = V::set(lowest, q, cnt);
      }
      vma = at::vec::maximum(vma, a);
      vmq = at::vec::maximum(vmq, q);
      const int64_t o = j - i0;
      a.store(sa_ + o);
      q.store(sq_ + o);
      r.store(sr_ + o);
      if (kGrad) (r * vinv).store(sb_ + o);
    }
    i = end;
  }

  // Pass 2: exponentials, sums, unnormalised gradient h_a h_q r / s.
  const acc ma = kTauZero ? acc(0) : hmax(vma);
  const acc mq = kTauZero ? acc(0) : hmax(vmq);
  const V vma_s(ma), vmq_s(mq), zero(acc(0)), one(acc(1));
  V vsa = zero, vsq = zero, vn = zero;
  T* dc = kGrad ? static_cast<T*>(L.dc) + row * L.m + i0 : nullptr;
  for (int64_t o = 0; o < n; o += W) {
    const int64_t cnt = std::min<int64_t>(W, n - o);
    V ha = one, hq = one;
    if (!kTauZero) {
      ha = IO<T>::exp2(V::loadu(sa_ + o) - vma_s);
      hq = IO<T>::exp2(V::loadu(sq_ + o) - vmq_s);
    }
    V r = V::loadu(sr_ + o);
    if (cnt < W) {
      ha = V::set(zero, ha, cnt);
      hq = V::set(zero, hq, cnt);
      r = V::set(zero, r, cnt);
    }
    const V p = ha * hq;
    vsa = at::vec::fmadd(ha, ha, vsa);
    vsq = at::vec::fmadd(hq, hq, vsq);
    vn = at::vec::fmadd(p * r, r, vn);
    if (kGrad) IO<T>::store(dc + o, p * V::loadu(sb_ + o), cnt);
  }
  auto hsum = [](const V& v) {
    acc buf[V::size()];
    v.store(buf);
    acc s = 0;
    for (int64_t i = 0; i < V::size(); ++i) s += buf[i];
    return s;
  };
  return {ma, hsum(vsa), mq, hsum(vsq), hsum(vn)};
}

// Merge a row's chunk partials: the row loss, and (optionally) one gradient factor per chunk.
// Maxima are in units of log2(e)/2: exp(a_k - a) = 2^(2 (a'_k - a')).
template <typename acc>
acc merge(const Partial<acc>* p, int64_t nch, double row_scale, acc* factors) {
  acc Ma = p[0].ma, Mq = p[0].mq;
  for (int64_t k = 1; k < nch; ++k) {
    Ma = std::max(Ma, p[k].ma);
    Mq = std::max(Mq, p[k].mq);
  }
  acc Sa = 0, Sq = 0, N = 0;
  for (int64_t k = 0; k < nch; ++k) {
    Sa += p[k].sa * std::exp2(2 * (p[k].ma - Ma));
    Sq += p[k].sq * std::exp2(2 * (p[k].mq - Mq));
    N += p[k].n * std::exp2(p[k].ma - Ma + p[k].mq - Mq);
  }
  const acc norm = acc(1) / std::sqrt(Sa * Sq);
  if (factors) {
    const acc coef = acc(-2 * row_scale) * norm;
    for (int64_t k = 0; k < nch; ++k) factors[k] = coef * std::exp2(p[k].ma - Ma + p[k].mq - Mq);
  }
  return N * norm;
}

// Multiplies chunk k of row b's gradient by f.
template <typename T>
void scale_chunk(const Layer& L, int64_t b, int64_t k, typename IO<T>::acc f) {
  using V = typename IO<T>::V;
  T* p = static_cast<T*>(L.dc) + b * L.m + k * kChunk;
  const int64_t n = std::min(kChunk, L.m - k * kChunk);
  const V vf(f);
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t cnt = std::min<int64_t>(V::size(), n - j);
    V x = cnt == V::size() ? IO<T>::load(p + j) : IO<T>::load(p + j, cnt);
    IO<T>::store(p + j, x * vf, cnt);
  }
}

// Chunk k of a row, with the instantiation for the layer's options (all loop-invariant).
template <typename T>
Partial<typename IO<T>::acc> chunk_any(const Layer& L, int64_t row, int64_t k, double tau,
                                       bool is_signed, typename IO<T>::acc* scratch) {
  using acc = typename IO<T>::acc;
  const acc tau_ = acc(tau);
  const int64_t i0 = k * kChunk, i1 = std::min(L.m, i0 + kChunk);
  auto go = [&](auto per_neuron, auto grad) {
    constexpr bool kPN = decltype(per_neuron)::value, kG = decltype(grad)::value;
    if (tau == 0) return chunk<T, false, true, kPN, kG>(L, row, i0, i1, tau_, scratch);
    if (is_signed) return chunk<T, true, false, kPN, kG>(L, row, i0, i1, tau_, scratch);
    return chunk<T, false, false, kPN, kG>(L, row, i0, i1, tau_, scratch);
  };
  using Y = std::true_type;
  using N = std::false_type;
  if (L.inner == 1) return L.dc ? go(Y{}, Y{}) : go(Y{}, N{});
  return L.dc ? go(N{}, Y{}) : go(N{}, N{});
}

// Whole rows [b0, b1) of layer L, one after the other.
template <typename T>
void rows_task(const Layer& L, int64_t b0, int64_t b1, double tau, bool is_signed,
               typename IO<T>::acc* row_loss) {
  using acc = typename IO<T>::acc;
  const int64_t nch = (L.m + kChunk - 1) / kChunk;
  std::vector<acc> scratch(4 * (kChunk + IO<T>::V::size()));
  std::vector<Partial<acc>> parts(nch);
  std::vector<acc> factors(L.dc ? nch : 0);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t k = 0; k < nch; ++k)
      parts[k] = chunk_any<T>(L, b, k, tau, is_signed, scratch.data());
    row_loss[b] = merge<acc>(parts.data(), nch, L.row_scale, L.dc ? factors.data() : nullptr);
    if (L.dc)
      for (int64_t k = 0; k < nch; ++k) scale_chunk<T>(L, b, k, factors[k]);
  }
}

// Few long rows: chunks in parallel, then the merge, then the rescale in parallel.
template <typename T>
void split_rows(const Layer& L, double tau, bool is_signed, typename IO<T>::acc* row_loss) {
  using acc = typename IO<T>::acc;
  const int64_t nch = (L.m + kChunk - 1) / kChunk;
  std::vector<Partial<acc>> parts(L.rows * nch);
  at::parallel_for(0, L.rows * nch, 1, [&](int64_t j0, int64_t j1) {
    std::vector<acc> scratch(4 * (kChunk + IO<T>::V::size()));
    for (int64_t j = j0; j < j1; ++j) {
      parts[j] = chunk_any<T>(L, j / nch, j % nch, tau, is_signed, scratch.data());
    }
  });
  std::vector<acc> factors(L.dc ? L.rows * nch : 0);
  for (int64_t b = 0; b < L.rows; ++b)
    row_loss[b] = merge<acc>(parts.data() + b * nch, nch, L.row_scale,
                             L.dc ? factors.data() + b * nch : nullptr);
  if (!L.dc) return;
  at::parallel_for(0, L.rows * nch, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) scale_chunk<T>(L, j / nch, j % nch, factors[j]);
  });
}

// The gradient buffer, the op's one allocation of the inputs' size. A large buffer is fresh
// memory from the OS at every call (glibc maps it anew), and faulting it in 4 KiB pages costs
// more than the kernel itself (~7 ms for 32 MiB here): ask for 2 MiB pages instead.
at::Tensor empty_output(int64_t rows, int64_t m, const at::TensorOptions& opts) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t nbytes = size_t(rows) * size_t(m) * opts.dtype().itemsize();
  void* p = nullptr;
  if (nbytes < 8 * kHuge || posix_memalign(&p, kHuge, (nbytes + kHuge - 1) / kHuge * kHuge) != 0)
    return at::empty({rows, m}, opts);
#ifdef MADV_HUGEPAGE
  madvise(p, (nbytes + kHuge - 1) / kHuge * kHuge, MADV_HUGEPAGE);
#endif
  return at::from_blob(p, {rows, m}, [](void* q) { std::free(q); }, opts);
}

#define MF_DISPATCH(dtype, NAME, ...)                                                   \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, NAME, __VA_ARGS__)

std::tuple<at::Tensor, std::vector<at::Tensor>> importance_clone_loss_cpu(
    at::TensorList t, at::TensorList c, at::TensorList g, at::TensorList mu,
    at::TensorList inv_s, at::TensorList tau_s, at::IntArrayRef inner, double tau,
    bool is_signed, at::ArrayRef<double> row_scale, bool reduce_rows, bool need_grad) {
  const int64_t nl = static_cast<int64_t>(t.size());
  TORCH_CHECK(nl > 0, "importance_clone_loss: no layers");
  TORCH_CHECK(c.size() == t.size() && g.size() == t.size() && mu.size() == t.size() &&
                  inv_s.size() == t.size() && tau_s.size() == t.size() &&
                  static_cast<int64_t>(inner.size()) == nl &&
                  static_cast<int64_t>(row_scale.size()) == nl,
              "importance_clone_loss: per-layer lists differ in length");
  const auto acc_dtype = t[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<Layer> layers;
  std::vector<at::Tensor> dcs;
  std::vector<at::Tensor> row_losses;
  for (int64_t l = 0; l < nl; ++l) {
    const auto& x = t[l];
    TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "layer ", l, ": expected CPU [rows, m]");
    const int64_t rows = x.size(0), m = x.size(1);
    for (const auto* y : {&c[l], &g[l]}) {
      TORCH_CHECK(y->sizes() == x.sizes() && y->scalar_type() == x.scalar_type(),
                  "layer ", l, ": t, c, g must share shape and dtype");
      TORCH_CHECK(m == 1 || y->stride(1) == 1, "layer ", l, ": unit stride along m expected");
    }
    TORCH_CHECK(m == 1 || x.stride(1) == 1, "layer ", l, ": unit stride along m expected");
    const int64_t nstat = mu[l].numel();
    TORCH_CHECK(inner[l] >= 1 && nstat >= 1 && (inner[l] > 1 || nstat == m) &&
                    (inner[l] == 1 || m % (inner[l] * nstat) == 0),
                "layer ", l, ": statistics layout (inner=", inner[l], ", nstat=", nstat,
                ") does not fit m=", m);
    for (const auto* s : {&mu[l], &inv_s[l], &tau_s[l]})
      TORCH_CHECK(s->is_contiguous() && s->scalar_type() == acc_dtype && s->numel() == nstat,
                  "layer ", l, ": statistics must be contiguous ", acc_dtype, " of equal length");
    at::Tensor dc;
    if (need_grad) dc = empty_output(rows, m, x.options());
    dcs.push_back(dc);
    row_losses.push_back(at::empty({rows}, x.options().dtype(acc_dtype)));
    layers.push_back({x.scalar_type(), x.data_ptr(), c[l].data_ptr(), g[l].data_ptr(),
                      x.stride(0), c[l].stride(0), g[l].stride(0),
                      need_grad ? dc.data_ptr() : nullptr, mu[l].data_ptr(),
                      inv_s[l].data_ptr(), tau_s[l].data_ptr(), rows, m, inner[l], nstat,
                      row_scale[l]});
  }

  // Whole rows per task when there are enough rows to keep every thread busy; the rows are
  // dealt out in contiguous runs of equal cost (neurons), as layers differ in row length.
  int64_t total_rows = 0;
  for (const auto& L : layers) total_rows += L.rows;
  const int64_t threads = at::get_num_threads();
  if (total_rows >= 4 * threads || threads == 1) {
    std::vector<int64_t> first(nl + 1, 0), cost(nl + 1, 0);
    for (int64_t l = 0; l < nl; ++l) {
      first[l + 1] = first[l] + layers[l].rows;
      cost[l + 1] = cost[l] + layers[l].rows * layers[l].m;
    }
    // The first global row whose cost prefix reaches `target`.
    auto row_at = [&](int64_t target) {
      const int64_t l = std::upper_bound(cost.begin(), cost.end(), target) - cost.begin() - 1;
      if (l >= nl) return total_rows;
      const int64_t m = layers[l].m;
      return first[l] + (target - cost[l] + m - 1) / m;
    };
    const int64_t parts = std::min(total_rows, 4 * threads);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      const int64_t j0 = row_at(cost[nl] * p0 / parts), j1 = row_at(cost[nl] * p1 / parts);
      for (int64_t l = 0; l < nl; ++l) {
        const int64_t b0 = std::max(j0, first[l]) - first[l];
        const int64_t b1 = std::min(j1, first[l + 1]) - first[l];
        if (b0 >= b1) continue;
        const Layer& L = layers[l];
        MF_DISPATCH(L.dtype, "importance_clone_loss_rows", [&] {
          using acc = typename IO<scalar_t>::acc;
          rows_task<scalar_t>(L, b0, b1, tau, is_signed, row_losses[l].data_ptr<acc>());
        });
      }
    });
  } else {
    for (int64_t l = 0; l < nl; ++l) {
      const Layer& L = layers[l];
      MF_DISPATCH(L.dtype, "importance_clone_loss_split", [&] {
        using acc = typename IO<scalar_t>::acc;
        split_rows<scalar_t>(L, tau, is_signed, row_losses[l].data_ptr<acc>());
      });
    }
  }

  // Reduce in a fixed order, so the result does not depend on the number of threads.
  at::Tensor loss;
  if (reduce_rows) {
    double total = 0;
    for (int64_t l = 0; l < nl; ++l)
      total += row_scale[l] * row_losses[l].sum(at::kDouble).item<double>();
    loss = at::scalar_tensor(total, t[0].options().dtype(acc_dtype));
  } else {
    loss = row_losses[0].clone();
    for (int64_t l = 1; l < nl; ++l) {
      TORCH_CHECK(row_losses[l].numel() == loss.numel(), "reduction='none' needs equal rows");
      loss.add_(row_losses[l]);
    }
  }
  std::vector<at::Tensor> out;
  if (need_grad) out = dcs;
  return {loss, out};
}

}  // namespace

// The CPU kernel of medic_fast::importance_clone_loss. The op (schema, fake and autograd kernels)
// is defined in Python, medic_fast/ops/importance_clone.py; the dispatcher takes a kernel before
// or after its op's definition, so the order in which the two load does not matter.
TORCH_LIBRARY_IMPL(medic_fast, CPU, m) {
  m.impl("importance_clone_loss", &importance_clone_loss_cpu);
}

}  // namespace medic_fast
