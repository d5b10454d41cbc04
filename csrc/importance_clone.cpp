// The fused importance clone loss of MEDIC on CPU tensors (DESIGN.md §1).
//
// One pass over each row's data. A row is cut into chunks of kChunk neurons, and each chunk is
// read once: for each neuron, a' = tau*D((t-mu)/s)*log2(e)/2 and q' = tau*s*g*log2(e)/2 are taken
// relative to the chunk's references (ra, rq), h_a = 2^(a'-ra), h_q = 2^(q'-rq) (2 exponentials
// per neuron: softmax(a)_i ~ h_a^2, and w_i ~ h_a h_q needs no square root), and the chunk
// accumulates S_a = sum h_a^2, S_q = sum h_q^2, N = sum h_a h_q r^2 and writes the provisional
// gradient h_a h_q r/s. The references are the running maxima of a' and q' over the row's earlier
// chunks (for the first chunk, its own maxima from a light pre-pass over t and g), so h <= 1 but
// for a new maximum; a chunk whose values exceed its references by more than kSlack
// (h > 2^kSlack) is redone at once against its own maxima, so every h stays below 2^kSlack. (The
// references play the part of the Triton kernel's per-lane running maxima with online rescaling:
// no pass over a chunk's scratch to find its maxima first, and no rescaling inside the loop.)
// At the end of the row the chunks merge (log-sum-exp style) into the loss and one factor per
// chunk.
//
// Memory: with the gradient, a row's provisional gradient goes to a per-thread fp32 scratch row
// (L2-resident for rows of up to kScratchMax neurons), and its final value (scratch times the
// chunk's factor) is written with streaming stores during the next row's pass, one vector per
// vector, so that the writes overlap the reads and the arithmetic; the inputs are software-
// prefetched. So t, c, g are read once and the gradient written once (the floor: 4 values per
// neuron), and a 16-bit gradient is only ever written in its final, normalised value. Without
// the scratch (longer rows, or few rows split across threads) the provisional gradient goes into
// the gradient buffer and is rescaled in place; float16 chunks are then stored with a power-of-
// two scale that puts their largest value near 2^14, so a provisional value cannot overflow
// where the final one does not. The gradients of all layers are parts of one block, kept for
// the next call when freed (empty_outputs).
//
// Parallelism: whole rows per task when there are enough rows; otherwise runs of chunks of a row
// in parallel, then a parallel in-place rescale of the gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <sys/mman.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

namespace medic_fast {
namespace {

constexpr int64_t kChunk = 1024;
// A chunk may exceed its references by this much (log2 units of h) before it is redone.
constexpr double kSlack = 8;
// Rows up to this many neurons keep their provisional gradient in a per-thread scratch row.
constexpr int64_t kScratchMax = int64_t(1) << 18;
// Software prefetch distance on the input streams (measured: 1.5-3 KiB ahead are equally good
// at rows=64 fp32, 1 thread, and ~10% faster than the hardware prefetchers alone).
constexpr int64_t kPrefetchBytes = 2048;

using at::vec::Vectorized;

// 2^x in fp32, for x <= kSlack (the chunk references guarantee it where the result is used):
// 2^x = 2^n * 2^f with n = round(x), |f| <= 1/2, 2^f by a degree-5 polynomial (relative error
// 8e-8, below fp32 rounding of the sums it feeds). With AVX-512, vscalefps applies 2^n and
// flushes very negative x to 0 by itself; otherwise x is clamped at -125, where 2^x is already
// negligible next to a reference's 2^0 = 1.
inline Vectorized<float> exp2_fast(Vectorized<float> x) {
  using V = Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = x;
  const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(v, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.0013266980f), f, _mm512_set1_ps(0.0096754694f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.055507427f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022122f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314695f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001f));
  return V(_mm512_scalef_ps(p, n));
#else
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
#endif
}

// max(a, b) lane by lane, without at::vec::maximum's NaN propagation (4 instructions instead
// of 1 on AVX-512): the running maxima only pick references, and a NaN input makes the sums, so
// the loss and gradient, NaN anyway.
template <typename acc>
inline Vectorized<acc> vmax(const Vectorized<acc>& a, const Vectorized<acc>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc, float>) return Vectorized<acc>(_mm512_max_ps(a, b));
  if constexpr (std::is_same_v<acc, double>) return Vectorized<acc>(_mm512_max_pd(a, b));
#endif
  return at::vec::maximum(a, b);
}

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

template <>
struct IO<float> {
  using acc = float;
  using V = Vectorized<float>;
  static V load(const float* p) { return V::loadu(p); }
  static V load(const float* p, int64_t n) { return V::loadu(p, n); }
  static void store(float* p, V v, int64_t n) { v.store(p, static_cast<int>(n)); }
  static V exp2(V v) { return exp2_fast(v); }
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
  static V exp2(V v) { return exp2_fast(v); }
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

// One chunk's sums, relative to its references ma, mq (in units of log2(e)/2).
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

template <typename acc>
acc hsum(const Vectorized<acc>& v) {
  acc buf[Vectorized<acc>::size()];
  v.store(buf);
  acc s = 0;
  for (int64_t i = 0; i < Vectorized<acc>::size(); ++i) s += buf[i];
  return s;
}

// Calls f(i, end, mu, inv_s, tau_s) for each run [i, end) of neurons of [i0, i1) that share
// statistics, the pointers at the run's statistics (when kPerNeuron: the whole range, the
// pointers at neuron i0's).
template <bool kPerNeuron, typename acc, typename F>
void for_runs(const Layer& L, int64_t i0, int64_t i1, F&& f) {
  const acc* mu = static_cast<const acc*>(L.mu);
  const acc* inv_s = static_cast<const acc*>(L.inv_s);
  const acc* tau_s = static_cast<const acc*>(L.tau_s);
  if (kPerNeuron) {
    f(i0, i1, mu + i0, inv_s + i0, tau_s + i0);
    return;
  }
  for (int64_t i = i0; i < i1;) {
    const int64_t k = (i / L.inner) % L.nstat;
    const int64_t end = std::min(i1, (i / L.inner + 1) * L.inner);
    f(i, end, mu + k, inv_s + k, tau_s + k);
    i = end;
  }
}

// The maxima of a' and q' over neurons [i0, i1) of one row: the first chunk's references.
template <typename T, bool kSigned, bool kPerNeuron>
std::pair<typename IO<T>::acc, typename IO<T>::acc> chunk_max(const Layer& L, int64_t row,
                                                              int64_t i0, int64_t i1,
                                                              typename IO<T>::acc tau) {
  using acc = typename IO<T>::acc;
  using V = typename IO<T>::V;
  constexpr int64_t W = V::size();
  const acc hl = acc(0.72134752044448170368);  // log2(e) / 2
  const T* t = static_cast<const T*>(L.t) + row * L.st;
  const T* g = static_cast<const T*>(L.g) + row * L.sg;
  const V lowest(-std::numeric_limits<acc>::infinity()), vthl(tau * hl), vhl(hl);
  V vma = lowest, vmq = lowest;
  for_runs<kPerNeuron, acc>(L, i0, i1, [&](int64_t i, int64_t end, const acc* mu,
                                           const acc* inv_s, const acc* tau_s) {
    const V bmu(mu[0]), bka(tau * hl * inv_s[0]), bkq(tau_s[0] * hl);
    for (int64_t j = i; j < end; j += W) {
      const int64_t cnt = std::min<int64_t>(W, end - j);
      const bool full = cnt == W;
      const V vt = full ? IO<T>::load(t + j) : IO<T>::load(t + j, cnt);
      const V vg = full ? IO<T>::load(g + j) : IO<T>::load(g + j, cnt);
      V vmu = bmu, ka = bka, kq = bkq;
      if (kPerNeuron) {
        const int64_t o = j - i;
        vmu = full ? V::loadu(mu + o) : V::loadu(mu + o, cnt);
        ka = (full ? V::loadu(inv_s + o) : V::loadu(inv_s + o, cnt)) * vthl;
        kq = (full ? V::loadu(tau_s + o) : V::loadu(tau_s + o, cnt)) * vhl;
      }
      const V u = vt - vmu;
      V a = (kSigned ? u : u.abs()) * ka;
      V q = vg * kq;
      if (!full) {
        a = V::set(lowest, a, cnt);
        q = V::set(lowest, q, cnt);
      }
      vma = vmax(a, vma);
      vmq = vmax(q, vmq);
    }
  });
  return {hmax(vma), hmax(vmq)};
}

// Stores one full vector to p, bypassing the caches: p is aligned to the vector's size in T.
template <typename T>
inline void stream_store(T* p, const typename IO<T>::V& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v);
    return;
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(p, v);
    return;
  } else {
    const auto h = at::vec::convert_from_float<T>(v, v);  // 16 values: 256 bits
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(__m512i(h)));
    return;
  }
#endif
  IO<T>::store(p, v, IO<T>::V::size());
}

// The previous row's final gradient, written out during a chunk's pass over the same neurons:
// dst[o] = src[o] * f for the chunk's offsets o.
template <typename T>
struct Pending {
  const typename IO<T>::acc* src;
  T* dst;
  typename IO<T>::acc f;
};

// One pass over a chunk's sums: the partial, and the chunk's maxima of a' and q'.
template <typename acc>
struct Pass {
  Partial<acc> p;
  acc ma, mq;
};

// Neurons [i0, i1) of one row against references (ra, rq); the provisional gradient
// h_a h_q r / s goes to out[0, i1 - i0) when kGrad.
template <typename T, bool kSigned, bool kTauZero, bool kPerNeuron, bool kGrad, bool kPend>
Pass<typename IO<T>::acc> chunk(const Layer& L, int64_t row, int64_t i0, int64_t i1,
                                typename IO<T>::acc tau, typename IO<T>::acc ra,
                                typename IO<T>::acc rq, typename IO<T>::acc* out,
                                Pending<T> pend) {
  using acc = typename IO<T>::acc;
  using V = typename IO<T>::V;
  constexpr int64_t W = V::size();
  const acc hl = acc(0.72134752044448170368);  // log2(e) / 2
  const T* t = static_cast<const T*>(L.t) + row * L.st;
  const T* c = static_cast<const T*>(L.c) + row * L.sc;
  const T* g = static_cast<const T*>(L.g) + row * L.sg;
  constexpr int64_t kAhead = kPrefetchBytes / int64_t(sizeof(T));
  const V lowest(-std::numeric_limits<acc>::infinity()), zero(acc(0)), one(acc(1));
  const V vra(-ra), vrq(-rq), vthl(tau * hl), vhl(hl), vf(pend.f);
  V vsa = zero, vsq = zero, vn = zero, vma = lowest, vmq = lowest;
  for_runs<kPerNeuron, acc>(L, i0, i1, [&](int64_t i, int64_t end, const acc* mu,
                                           const acc* inv_s, const acc* tau_s) {
    const V bmu(mu[0]), bka(tau * hl * inv_s[0]), bkq(tau_s[0] * hl),
        binv2(inv_s[0] * inv_s[0]);
    // One vector of neurons from j: cnt of them (W when kFull).
    auto body = [&](int64_t j, int64_t cnt, auto full_tag) {
      constexpr bool kFull = decltype(full_tag)::value;
      if (kFull) {
        __builtin_prefetch(t + j + kAhead);
        __builtin_prefetch(c + j + kAhead);
        if (!kTauZero) __builtin_prefetch(g + j + kAhead);
      }
      const V vt = kFull ? IO<T>::load(t + j) : IO<T>::load(t + j, cnt);
      const V vc = kFull ? IO<T>::load(c + j) : IO<T>::load(c + j, cnt);
      V vmu = bmu, ka = bka, kq = bkq, inv2 = binv2;
      if (kPerNeuron) {
        const int64_t o = j - i;
        const V vinv = kFull ? V::loadu(inv_s + o) : V::loadu(inv_s + o, cnt);
        vmu = kFull ? V::loadu(mu + o) : V::loadu(mu + o, cnt);
        ka = vinv * vthl;
        kq = (kFull ? V::loadu(tau_s + o) : V::loadu(tau_s + o, cnt)) * vhl;
        inv2 = vinv * vinv;
      }
      V p = one;
      if (!kTauZero) {
        const V vg = kFull ? IO<T>::load(g + j) : IO<T>::load(g + j, cnt);
        const V u = vt - vmu;
        // a' and q' as chunk_max computes them (no fused multiply-add), so that a' - ra is 0,
        // not one rounding of the product away from it, where ra is a' (at tau ~1e10 that
        // rounding is ~2^9: 2^-512 for the largest weight would underflow the row's sums).
        V a = (kSigned ? u : u.abs()) * ka;
        V q = vg * kq;
        if (!kFull) {
          a = V::set(lowest, a, cnt);
          q = V::set(lowest, q, cnt);
        }
        vma = vmax(a, vma);
        vmq = vmax(q, vmq);
        V ha = IO<T>::exp2(a + vra), hq = IO<T>::exp2(q + vrq);
        if (!kFull) {
          ha = V::set(zero, ha, cnt);
          hq = V::set(zero, hq, cnt);
        }
        p = ha * hq;
        vsa = at::vec::fmadd(ha, ha, vsa);
        vsq = at::vec::fmadd(hq, hq, vsq);
      } else {
        if (!kFull) p = V::set(zero, one, cnt);
        vsa = vsa + p;
      }
      const V d = vt - vc;
      const V pe = p * (d * inv2);  // h_a h_q r / s
      vn = at::vec::fmadd(pe, d, vn);
      if (kGrad) {
        if (kFull)
          pe.store(out + (j - i0));
        else
          pe.store(out + (j - i0), static_cast<int>(cnt));
      }
      if (kPend) {
        const int64_t o = j - i0;
        if (kFull)
          stream_store<T>(pend.dst + o, V::loadu(pend.src + o) * vf);
        else
          IO<T>::store(pend.dst + o, V::loadu(pend.src + o, cnt) * vf, cnt);
      }
    };
    int64_t j = i;
    for (; j + W <= end; j += W) body(j, W, std::true_type{});
    if (j < end) body(j, end - j, std::false_type{});
  });
  if (kTauZero) {
    const acc n = hsum(vsa);
    return {{acc(0), n, acc(0), n, hsum(vn)}, acc(0), acc(0)};
  }
  return {{ra, hsum(vsa), rq, hsum(vsq), hsum(vn)}, hmax(vma), hmax(vmq)};
}

// Writes src * f to dst (n values); with `stream`, bypassing the caches where aligned (the
// gradient's one write, not read again here).
template <typename T>
void store_scaled(T* dst, const typename IO<T>::acc* src, int64_t n, typename IO<T>::acc f,
                  bool stream) {
  using V = typename IO<T>::V;
  constexpr int64_t W = V::size();
  const V vf(f);
  int64_t j = 0;
  (void)stream;  // streaming stores only with AVX-512
#if defined(CPU_CAPABILITY_AVX512)
  if (stream && reinterpret_cast<std::uintptr_t>(dst) % 64 == 0) {
    if constexpr (std::is_same_v<T, float>) {
      for (; j + 16 <= n; j += 16)
        _mm512_stream_ps(dst + j, _mm512_mul_ps(_mm512_loadu_ps(src + j), __m512(vf)));
    } else if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
      for (; j + 32 <= n; j += 32) {
        const auto h = at::vec::convert_from_float<T>(V::loadu(src + j) * vf,
                                                      V::loadu(src + j + 16) * vf);
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + j), __m512i(h));
      }
    }
  }
#endif
  for (; j < n; j += W) {
    const int64_t cnt = std::min<int64_t>(W, n - j);
    IO<T>::store(dst + j, V::loadu(src + j, cnt) * vf, cnt);
  }
}

// Multiplies n values of dst by f, in place.
template <typename T>
void scale_inplace(T* p, int64_t n, typename IO<T>::acc f) {
  using V = typename IO<T>::V;
  const V vf(f);
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t cnt = std::min<int64_t>(V::size(), n - j);
    V x = cnt == V::size() ? IO<T>::load(p + j) : IO<T>::load(p + j, cnt);
    IO<T>::store(p + j, x * vf, cnt);
  }
}

// Where chunks put their provisional gradient: a contiguous acc buffer for the whole range
// (`out`: the scratch row, or the gradient itself when T is the accumulation type), or, for
// 16-bit gradients written in place, `buf` (one chunk) converted into the gradient after each
// chunk, float16 with a power-of-two scale per chunk (`pow2`, to undo at the rescale).
// `prev_src`, `prev_dst`, `prev_f`: a previous row of the same layer whose final gradient the
// chunks write out as they go (scratch row, gradient row, factors per chunk), or nullptr.
template <typename T>
struct Sink {
  using acc = typename IO<T>::acc;
  acc* out;
  acc* buf;
  acc* pow2;
  const acc* prev_src;
  T* prev_dst;
  const acc* prev_f;
};

// Chunks [k0, k1) of one row, with running references; parts[k - k0] per chunk.
template <typename T, bool kSigned, bool kTauZero, bool kPerNeuron, bool kGrad>
void run_chunks(const Layer& L, int64_t row, int64_t k0, int64_t k1, typename IO<T>::acc tau,
                Partial<typename IO<T>::acc>* parts, const Sink<T>& sink) {
  using acc = typename IO<T>::acc;
  acc ra = 0, rq = 0;
  if (!kTauZero) {
    const auto m0 = chunk_max<T, kSigned, kPerNeuron>(L, row, k0 * kChunk,
                                                      std::min(L.m, (k0 + 1) * kChunk), tau);
    ra = m0.first;
    rq = m0.second;
  }
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t i0 = k * kChunk, i1 = std::min(L.m, i0 + kChunk);
    acc* dst = sink.out ? sink.out + (i0 - k0 * kChunk) : sink.buf;
    auto pass = [&] {
      if (kGrad && sink.prev_dst)
        return chunk<T, kSigned, kTauZero, kPerNeuron, kGrad, true>(
            L, row, i0, i1, tau, ra, rq, dst,
            {sink.prev_src + i0, sink.prev_dst + i0, sink.prev_f[k]});
      return chunk<T, kSigned, kTauZero, kPerNeuron, kGrad, false>(L, row, i0, i1, tau, ra, rq,
                                                                   dst, {nullptr, nullptr, 0});
    };
    auto r = pass();
    if (!kTauZero) {
      if (r.ma - ra > acc(kSlack) || r.mq - rq > acc(kSlack)) {
        // A new maximum far above the references: redo the chunk against its own maxima.
        ra = std::max(ra, r.ma);
        rq = std::max(rq, r.mq);
        r = pass();
      }
      ra = std::max(ra, r.ma);  // the running maxima
      rq = std::max(rq, r.mq);
    }
    parts[k - k0] = r.p;
    if (kGrad && !sink.out) {
      T* d = static_cast<T*>(L.dc) + row * L.m + i0;
      acc scale = 1;
      if (std::is_same_v<T, at::Half>) {
        // The chunk's largest value near 2^14: no overflow, and 2^28 of range below it.
        acc big = 0;
        for (int64_t i = 0; i < i1 - i0; ++i) big = std::max(big, std::abs(sink.buf[i]));
        if (big > 0 && std::isfinite(big))
          scale = std::ldexp(acc(1), std::clamp(14 - std::ilogb(big), -126, 126));
        sink.pow2[k - k0] = 1 / scale;
      }
      store_scaled<T>(d, sink.buf, i1 - i0, scale, false);
    }
  }
}

// run_chunks with the instantiation for the layer's options (all loop-invariant).
template <typename T>
void run_chunks_any(const Layer& L, int64_t row, int64_t k0, int64_t k1, double tau,
                    bool is_signed, Partial<typename IO<T>::acc>* parts, const Sink<T>& sink) {
  using acc = typename IO<T>::acc;
  const acc tau_ = acc(tau);
  auto go = [&](auto per_neuron, auto grad) {
    constexpr bool kPN = decltype(per_neuron)::value, kG = decltype(grad)::value;
    if (tau == 0) return run_chunks<T, false, true, kPN, kG>(L, row, k0, k1, tau_, parts, sink);
    if (is_signed) return run_chunks<T, true, false, kPN, kG>(L, row, k0, k1, tau_, parts, sink);
    return run_chunks<T, false, false, kPN, kG>(L, row, k0, k1, tau_, parts, sink);
  };
  using Y = std::true_type;
  using N = std::false_type;
  if (L.inner == 1) return L.dc ? go(Y{}, Y{}) : go(Y{}, N{});
  return L.dc ? go(N{}, Y{}) : go(N{}, N{});
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

// A per-thread buffer of at least n values of A, 64-byte aligned, kept between calls.
template <typename A>
A* thread_buffer(int64_t n) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<void, Free> mem;
  thread_local int64_t cap = 0;
  if (n > cap) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, size_t(n) * sizeof(A)) != 0) throw std::bad_alloc();
    mem.reset(p);
    cap = n;
  }
  return static_cast<A*>(mem.get());
}

// Whole rows [b0, b1) of layer L, one after the other. With the scratch, two scratch rows are
// used in turn, and row b's final gradient is written (streaming stores) during row b + 1's
// pass, one vector per vector, so that the stores overlap the reads and the arithmetic; the
// task's last row is written out after it.
template <typename T>
void rows_task(const Layer& L, int64_t b0, int64_t b1, double tau, bool is_signed,
               typename IO<T>::acc* row_loss) {
  using acc = typename IO<T>::acc;
  using V = typename IO<T>::V;
  const int64_t nch = (L.m + kChunk - 1) / kChunk;
  const bool scratch = L.dc && L.m <= kScratchMax;
  // Overlapping needs every full vector of the gradient aligned: rows aligned, and runs of
  // shared statistics a whole number of vectors.
  const bool overlap = scratch && (L.m * int64_t(sizeof(T))) % 64 == 0 &&
                       reinterpret_cast<std::uintptr_t>(L.dc) % 64 == 0 &&
                       (L.inner == 1 || L.inner % V::size() == 0);
  const int64_t m64 = (L.m + 63) / 64 * 64, nf = (nch + 63) / 64 * 64;
  const int64_t nparts =
      (nch * int64_t(sizeof(Partial<acc>)) + 63) / 64 * 64 / int64_t(sizeof(acc));
  // [parts | factors x 2 | pow2 | buf | scratch rows x 2]
  acc* mem = thread_buffer<acc>(nparts + 3 * nf + kChunk + (scratch ? 2 * m64 : 0));
  auto* parts = reinterpret_cast<Partial<acc>*>(mem);
  acc* factors[2] = {mem + nparts, mem + nparts + nf};
  acc* pow2 = mem + nparts + 2 * nf;
  acc* buf = pow2 + nf;
  acc* rows[2] = {buf + kChunk, buf + kChunk + m64};
  T* pending = nullptr;  // the gradient row still to be written from rows[slot ^ 1]
  int slot = 0;
  for (int64_t b = b0; b < b1; ++b) {
    T* dc = L.dc ? static_cast<T*>(L.dc) + b * L.m : nullptr;
    Sink<T> sink{nullptr, buf, pow2, rows[slot ^ 1], pending, factors[slot ^ 1]};
    if (scratch)
      sink.out = rows[slot];
    else if (std::is_same_v<T, acc>)
      sink.out = reinterpret_cast<acc*>(dc);
    std::fill(pow2, pow2 + nch, acc(1));
    run_chunks_any<T>(L, b, 0, nch, tau, is_signed, parts, sink);
    row_loss[b] = merge<acc>(parts, nch, L.row_scale, L.dc ? factors[slot] : nullptr);
    pending = nullptr;
    if (!L.dc) continue;
    if (overlap && b + 1 < b1) {
      pending = dc;
      slot ^= 1;
      continue;
    }
    for (int64_t k = 0; k < nch; ++k) {
      const int64_t i0 = k * kChunk, n = std::min(kChunk, L.m - i0);
      if (scratch)
        store_scaled<T>(dc + i0, rows[slot] + i0, n, factors[slot][k], true);
      else
        scale_inplace<T>(dc + i0, n, factors[slot][k] * pow2[k]);
    }
  }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // the streaming stores, visible before the task ends
#endif
}

// Few long rows: runs of chunks in parallel, then the merge, then the rescale in parallel.
template <typename T>
void split_rows(const Layer& L, double tau, bool is_signed, typename IO<T>::acc* row_loss) {
  using acc = typename IO<T>::acc;
  const int64_t nch = (L.m + kChunk - 1) / kChunk;
  const int64_t segs = std::min(nch, (4 * at::get_num_threads() + L.rows - 1) / L.rows);
  std::vector<Partial<acc>> parts(L.rows * nch);
  std::vector<acc> pow2(L.dc ? L.rows * nch : 0, acc(1));
  at::parallel_for(0, L.rows * segs, 1, [&](int64_t j0, int64_t j1) {
    std::vector<acc> buf(L.dc && !std::is_same_v<T, acc> ? kChunk : 0);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / segs, s = j % segs;
      const int64_t k0 = nch * s / segs, k1 = nch * (s + 1) / segs;
      Sink<T> sink{nullptr, buf.data(), L.dc ? pow2.data() + b * nch + k0 : nullptr,
                   nullptr, nullptr, nullptr};
      if (L.dc && std::is_same_v<T, acc>)
        sink.out = reinterpret_cast<acc*>(static_cast<T*>(L.dc) + b * L.m + k0 * kChunk);
      run_chunks_any<T>(L, b, k0, k1, tau, is_signed, parts.data() + b * nch + k0, sink);
    }
  });
  std::vector<acc> factors(L.dc ? L.rows * nch : 0);
  for (int64_t b = 0; b < L.rows; ++b)
    row_loss[b] = merge<acc>(parts.data() + b * nch, nch, L.row_scale,
                             L.dc ? factors.data() + b * nch : nullptr);
  if (!L.dc) return;
  at::parallel_for(0, L.rows * nch, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b = j / nch, k = j % nch, i0 = k * kChunk;
      scale_inplace<T>(static_cast<T*>(L.dc) + b * L.m + i0, std::min(kChunk, L.m - i0),
                       factors[j] * pow2[j]);
    }
  });
}

// The gradient buffers, the op's one allocation of the inputs' size: one block for all layers,
// each layer's gradient a tensor on its part of it. Fresh memory from the OS costs more than the
// kernel itself (faulted in 4 KiB pages: ~7 ms for 32 MiB here, and the WRN case's 25 buffers
// took ~11000 faults per call; in 2 MiB pages, still ~1 ms per 16 MiB to zero them), so a large
// block asks for 2 MiB pages, and when its last gradient is freed the block is kept as the one
// spare, which the next call of about the same size takes instead of fresh memory. The spare is
// marked MADV_FREE: the OS may take its pages back under memory pressure (they then fault in
// again as fresh ones); otherwise it stays resident and is reused without faults.
constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kBlockMin = 2 * kHuge;  // smaller totals: one at::empty per layer

struct SpareBlock {
  std::mutex mu;
  void* p = nullptr;
  size_t n = 0;
};

SpareBlock& spare_block() {
  static auto* s = new SpareBlock;  // never destroyed: gradients may outlive static destruction
  return *s;
}

void* take_block(size_t n) {
  auto& s = spare_block();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.p && s.n >= n && s.n <= 2 * n) {
      void* p = s.p;
      s.p = nullptr;
      return p;
    }
  }
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, n) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
  madvise(p, n, MADV_HUGEPAGE);
#endif
  return p;
}

void give_block(void* p, size_t n) {
#ifdef MADV_FREE
  madvise(p, n, MADV_FREE);
#endif
  auto& s = spare_block();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.p || s.n < n) {  // keep the larger
      std::swap(s.p, p);
      std::swap(s.n, n);
    }
  }
  std::free(p);
}

// Uninitialised contiguous gradients of the given sizes and dtypes (those of acts_c).
std::vector<at::Tensor> empty_outputs(const std::vector<at::IntArrayRef>& shapes,
                                      const std::vector<at::TensorOptions>& opts) {
  const size_t nl = shapes.size();
  std::vector<size_t> offset(nl + 1, 0);
  for (size_t l = 0; l < nl; ++l) {
    const size_t nbytes = size_t(c10::multiply_integers(shapes[l])) * opts[l].dtype().itemsize();
    offset[l + 1] = offset[l] + (nbytes + 4095) / 4096 * 4096;
  }
  const size_t total = (offset[nl] + kHuge - 1) / kHuge * kHuge;
  void* p = offset[nl] >= kBlockMin ? take_block(total) : nullptr;
  std::vector<at::Tensor> out;
  if (!p) {
    for (size_t l = 0; l < nl; ++l) out.push_back(at::empty(shapes[l], opts[l]));
    return out;
  }
  // Each gradient holds a reference; the last one gives the block back.
  auto block = std::shared_ptr<void>(p, [total](void* q) { give_block(q, total); });
  for (size_t l = 0; l < nl; ++l)
    out.push_back(at::from_blob(static_cast<char*>(p) + offset[l], shapes[l],
                                [block](void*) {}, opts[l]));
  return out;
}

#define MF_DISPATCH(dtype, NAME, ...)                                                   \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, NAME, __VA_ARGS__)

// The stride between rows of x viewed as [rows, m] (dims before sd the rows, from sd on the
// neurons), or -1 when that view needs a copy: the neuron dims must be row-major with unit
// inner stride and the row dims one arithmetic progression (dims of size 1 are free).
int64_t row_stride(const at::Tensor& x, int64_t sd) {
  int64_t expect = 1;
  for (int64_t d = x.dim() - 1; d >= sd; --d) {
    if (x.size(d) == 1) continue;
    if (x.stride(d) != expect) return -1;
    expect *= x.size(d);
  }
  int64_t stride = -1;
  for (int64_t d = sd - 1; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (stride == -1) {
      stride = x.stride(d);
      expect = stride * x.size(d);
    } else {
      if (x.stride(d) != expect) return -1;
      expect *= x.size(d);
    }
  }
  return stride == -1 ? 0 : stride;
}

// The statistics of one layer in the kernels' layout, as the accumulation type: statistic
// k = (i / inner) % nstat of neuron i, and per statistic mu, 1 / (std + eps), tau (std + eps).
// Made at each call from the caller's mean and std, so no derived value outlives a change to
// them; a negative std is refused (a zero one is warned about where the op plans a layout, in
// Python, once per process). Mean and std whose layouts differ, runs of equal statistics shorter than kMinRun, and
// statistics that repeat along the row (inner == 1, nstat < m) are expanded to one per neuron.
constexpr int64_t kMinRun = 16;

template <typename acc>
void derive_stats(Layer& L, const std::string& name, const at::Tensor& mean,
                  const at::Tensor& std_, int64_t inner_mu, int64_t inner_sd, double tau, double eps,
                  std::vector<acc>& out) {
  const int64_t n_mu = mean.numel(), n_sd = std_.numel();
  int64_t inner = inner_mu, nstat = n_mu;
  if (inner_mu != inner_sd || n_mu != n_sd || (inner > 1 && inner < kMinRun) ||
      (inner == 1 && nstat != L.m)) {
    inner = 1;
    nstat = L.m;
  }
  const size_t base = out.size();
  out.resize(base + 3 * nstat);
  acc* mu = out.data() + base;
  acc* inv_s = mu + nstat;
  acc* tau_s = inv_s + nstat;
  double lowest = std::numeric_limits<double>::infinity();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mean.scalar_type(), "mean", [&] {
    const scalar_t* p = mean.data_ptr<scalar_t>();
    for (int64_t k = 0; k < nstat; ++k) mu[k] = acc(p[(k * inner / inner_mu) % n_mu]);
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, std_.scalar_type(), "std", [&] {
    const scalar_t* p = std_.data_ptr<scalar_t>();
    for (int64_t k = 0; k < nstat; ++k) {
      const acc sd = acc(p[(k * inner / inner_sd) % n_sd]);
      lowest = std::min(lowest, double(sd));
      const acc s = sd + acc(eps);
      inv_s[k] = acc(1) / s;
      tau_s[k] = acc(tau) * s;
    }
  });
  TORCH_CHECK_VALUE(!(lowest < 0), name, " must be >= 0 (a standard deviation), got a minimum of ",
                    lowest);
  L.mu = mu;
  L.inv_s = inv_s;
  L.tau_s = tau_s;
  L.inner = inner;
  L.nstat = nstat;
}

// The CPU kernel of the op's contract (medic_fast/ops/importance_clone.py, _check_args):
// per layer t, c, g of one dtype and shape, rows = the dims before start_dim, viewable as
// [rows, m] with unit inner stride (the caller copies other layouts); mean and std contiguous
// of any float dtype, statistic (i / inner) % numel for neuron i. The loss in float64 if a
// layer is float64, else float32; the gradient per layer in the shape and dtype of c.
std::tuple<at::Tensor, std::vector<at::Tensor>> importance_clone_loss_cpu(
    at::TensorList t, at::TensorList c, at::TensorList g, at::TensorList mean,
    at::TensorList std_, at::IntArrayRef start_dim, at::IntArrayRef mean_inner,
    at::IntArrayRef std_inner, double tau, double eps, int64_t criterion,
    at::ArrayRef<double> row_scale, bool reduce_rows, bool need_grad) {
  const int64_t nl = static_cast<int64_t>(t.size());
  TORCH_CHECK(nl > 0, "importance_clone_loss: no layers");
  for (size_t n : {c.size(), g.size(), mean.size(), std_.size(), start_dim.size(),
                   mean_inner.size(), std_inner.size(), row_scale.size()})
    TORCH_CHECK(static_cast<int64_t>(n) == nl,
                "importance_clone_loss: per-layer lists differ in length");
  TORCH_CHECK(criterion == 0 || criterion == 1, "importance_clone_loss: criterion must be 0 ",
              "(abs) or 1 (signed), got ", criterion);
  const bool is_signed = criterion == 1;
  bool wide = false;
  int64_t n_float = 0, n_double = 0;
  std::vector<Layer> layers(nl);
  std::vector<at::IntArrayRef> shapes;
  std::vector<at::TensorOptions> dc_opts;
  for (int64_t l = 0; l < nl; ++l) {
    const auto& x = t[l];
    const int64_t sd = start_dim[l];
    TORCH_CHECK(x.device().is_cpu() && sd >= 0 && sd < x.dim(), "layer ", l,
                ": expected a CPU tensor with a feature dim at start_dim=", sd);
    const int64_t rows = c10::multiply_integers(x.sizes().slice(0, sd));
    const int64_t m = c10::multiply_integers(x.sizes().slice(sd));
    int64_t strides[3];
    for (int i = 0; i < 3; ++i) {
      const auto& y = i == 0 ? t[l] : i == 1 ? c[l] : g[l];
      TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() &&
                      y.device().is_cpu(),
                  "layer ", l, ": t, c, g must share shape, dtype and device");
      strides[i] = row_stride(y, sd);
      TORCH_CHECK(strides[i] >= 0, "layer ", l, ": ", "tcg"[i], " cannot be viewed as [rows, m] ",
                  "with unit inner stride");
    }
    for (const auto* s : {&mean[l], &std_[l]})
      TORCH_CHECK(s->is_contiguous() && s->numel() >= 1 && s->is_floating_point() &&
                      s->device().is_cpu(),
                  "layer ", l, ": statistics must be contiguous CPU float tensors");
    for (int64_t inner : {mean_inner[l], std_inner[l]})
      TORCH_CHECK(inner >= 1, "layer ", l, ": inner must be >= 1");
    TORCH_CHECK(m % (mean_inner[l] * mean[l].numel()) == 0 &&
                    m % (std_inner[l] * std_[l].numel()) == 0,
                "layer ", l, ": statistics layout does not fit m=", m);
    const bool dbl = x.scalar_type() == at::kDouble;
    wide |= dbl;
    (dbl ? n_double : n_float) += 3 * m;
    layers[l] = Layer{x.scalar_type(), x.data_ptr(), c[l].data_ptr(), g[l].data_ptr(),
                      strides[0], strides[1], strides[2], nullptr, nullptr, nullptr, nullptr,
                      rows, m, 1, 1, row_scale[l]};
    shapes.push_back(c[l].sizes());
    dc_opts.push_back(c[l].options());
  }
  // Statistics in the kernels' layout; reserved first, so that pointers into them stay valid.
  std::vector<float> f_stats;
  std::vector<double> d_stats;
  f_stats.reserve(n_float);
  d_stats.reserve(n_double);
  for (int64_t l = 0; l < nl; ++l) {
    const std::string name = nl > 1 ? "std (layer " + std::to_string(l) + ")" : "std";
    if (layers[l].dtype == at::kDouble)
      derive_stats<double>(layers[l], name, mean[l], std_[l], mean_inner[l], std_inner[l], tau,
                           eps, d_stats);
    else
      derive_stats<float>(layers[l], name, mean[l], std_[l], mean_inner[l], std_inner[l], tau,
                          eps, f_stats);
  }
  std::vector<at::Tensor> dcs;
  if (need_grad) {
    dcs = empty_outputs(shapes, dc_opts);
    for (int64_t l = 0; l < nl; ++l) layers[l].dc = dcs[l].data_ptr();
  }
  // Per-row losses, in the accumulation type of each layer (plain buffers: no tensor ops).
  std::vector<float> f_rows;
  std::vector<double> d_rows;
  std::vector<int64_t> row_base(nl);
  for (int64_t l = 0; l < nl; ++l) {
    const bool dbl = layers[l].dtype == at::kDouble;
    row_base[l] = dbl ? d_rows.size() : f_rows.size();
    dbl ? d_rows.resize(d_rows.size() + layers[l].rows)
        : f_rows.resize(f_rows.size() + layers[l].rows);
  }
  auto row_loss = [&](int64_t l) -> void* {
    return layers[l].dtype == at::kDouble ? static_cast<void*>(d_rows.data() + row_base[l])
                                          : static_cast<void*>(f_rows.data() + row_base[l]);
  };

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
          rows_task<scalar_t>(L, b0, b1, tau, is_signed, static_cast<acc*>(row_loss(l)));
        });
      }
    });
  } else {
    for (int64_t l = 0; l < nl; ++l) {
      const Layer& L = layers[l];
      MF_DISPATCH(L.dtype, "importance_clone_loss_split", [&] {
        using acc = typename IO<scalar_t>::acc;
        split_rows<scalar_t>(L, tau, is_signed, static_cast<acc*>(row_loss(l)));
      });
    }
  }

  // Reduce in a fixed order, so the result does not depend on the number of threads. The
  // row losses of a layer are scaled by its row_scale, in both reductions.
  auto row = [&](int64_t l, int64_t b) {
    return layers[l].dtype == at::kDouble ? d_rows[row_base[l] + b]
                                          : double(f_rows[row_base[l] + b]);
  };
  const auto loss_opts = at::TensorOptions().dtype(wide ? at::kDouble : at::kFloat);
  if (reduce_rows) {
    double total = 0;
    for (int64_t l = 0; l < nl; ++l) {
      double sum = 0;
      for (int64_t b = 0; b < layers[l].rows; ++b) sum += row(l, b);
      total += row_scale[l] * sum;
    }
    return {at::scalar_tensor(total, loss_opts), dcs};
  }
  const int64_t rows = layers[0].rows;
  for (const auto& L : layers)
    TORCH_CHECK(L.rows == rows, "reduction='none' needs equal rows in every layer");
  std::vector<double> total(rows, 0.0);
  for (int64_t l = 0; l < nl; ++l)
    for (int64_t b = 0; b < rows; ++b) total[b] += row_scale[l] * row(l, b);
  at::Tensor loss = at::empty({rows}, loss_opts);
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "loss", [&] {
    std::copy(total.begin(), total.end(), loss.data_ptr<scalar_t>());
  });
  return {loss, dcs};
}

}  // namespace

// The CPU kernel of medic_fast::importance_clone_loss_cpu. The op (schema and fake kernel) is
// defined in Python, medic_fast/ops/importance_clone.py; the dispatcher takes a kernel before
// or after its op's definition, so the order in which the two load does not matter.
TORCH_LIBRARY_IMPL(medic_fast, CPU, m) {
  m.impl("importance_clone_loss_cpu", &importance_clone_loss_cpu);
}

}  // namespace medic_fast
