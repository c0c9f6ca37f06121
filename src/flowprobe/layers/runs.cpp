// Fused CPU kernels for shared-parameter planar and radial runs: the forward of all K layers and its
// analytic backward in one call each (flowprobe/layers/native.py builds and loads this file); the
// back-substitutions of a Sylvester layer's inverse and of its Jacobian's solve; and per-point Householder
// reflections, forward and backward; and the per-member draws of an ensemble's training step.
//
// Points are independent, so each call walks the K layers in parallel over points. The formulas are
// those of the Python kernels (_PlanarRun, _RadialRun in planar.py / radial.py), which the tests
// compare with these. Radial runs go point by point and sum parameter gradients per thread.
//
// Planar runs take an ensemble dimension E (E = 1 for one flow): each member has its own parameters
// and its own points. Points go through the layers in blocks of LANES, coordinate-major, as SIMD
// vectors (tanh and log1p included, in float32); each block's parameter gradients are summed over the
// blocks in a fixed order (docs/layers.md, section 1).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace {

enum Act { TANH = 0, SIGMOID = 1, ARCTAN = 2, SOFTPLUS = 3, ELU = 4, RELU = 5, LEAKY = 6, IDENTITY = 7 };
constexpr double LEAKY_SLOPE = 0.01;

// h, h', h'' of the activations, with the conventions of flowprobe/activations.py
// (h'(0) of relu / leaky_relu is the left slope).
template <typename T>
inline void activate(int act, T t, T& h, T& d1, T& d2) {
  switch (act) {
    case TANH: {
      h = std::tanh(t);
      d1 = 1 - h * h;
      d2 = -2 * h * d1;
      break;
    }
    case SIGMOID: {
      h = t >= 0 ? 1 / (1 + std::exp(-t)) : std::exp(t) / (1 + std::exp(t));
      d1 = h * (1 - h);
      d2 = d1 * (1 - 2 * h);
      break;
    }
    case ARCTAN: {
      h = std::atan(t);
      d1 = 1 / (1 + t * t);
      d2 = -2 * t * d1 * d1;
      break;
    }
    case SOFTPLUS: {
      h = t > 0 ? t + std::log1p(std::exp(-t)) : std::log1p(std::exp(t));
      d1 = t >= 0 ? 1 / (1 + std::exp(-t)) : std::exp(t) / (1 + std::exp(t));
      d2 = d1 * (1 - d1);
      break;
    }
    case ELU: {
      if (t > 0) { h = t; d1 = 1; d2 = 0; } else { h = std::expm1(t); d1 = std::exp(t); d2 = d1; }
      break;
    }
    case RELU: {
      if (t > 0) { h = t; d1 = 1; } else { h = 0; d1 = 0; }
      d2 = 0;
      break;
    }
    case LEAKY: {
      if (t > 0) { h = t; d1 = 1; } else { h = static_cast<T>(LEAKY_SLOPE) * t; d1 = static_cast<T>(LEAKY_SLOPE); }
      d2 = 0;
      break;
    }
    default: {
      h = t; d1 = 1; d2 = 0;
    }
  }
}

// Sums per-thread partial gradients (threads x size) into one vector of `size`.
template <typename T>
at::Tensor reduce(const std::vector<T>& partial, int64_t threads, int64_t size, const at::Tensor& like) {
  auto out = at::zeros({size}, like.options());
  T* o = out.data_ptr<T>();
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t i = 0; i < size; ++i) o[i] += partial[t * size + i];
  return out;
}

// Points go through a planar run in blocks of LANES: per coordinate, a Block of Q vectors of B bytes
// (GCC/Clang vector types), so that every step of a layer is Q independent SIMD instructions. Blocks are
// computed with 16-byte vectors (SSE2, NEON), or 32-byte ones with fused multiply-adds where the CPU has
// AVX2 and FMA (chosen at run time). 64 lanes give every step of a layer several independent vectors.
// (AVX-512's 64-byte vectors made the kernels faster alone but a solo U1 training step 16 % slower on the
// development machine, a Xeon VM.)
constexpr int64_t LANES = 64;
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define FLOWPROBE_SHUFFLE 1
#endif
#endif
#ifndef FLOWPROBE_SHUFFLE
#define FLOWPROBE_SHUFFLE 0
#endif
#define FLOWPROBE_INLINE inline __attribute__((always_inline))
#define FLOWPROBE_INLINE_LAMBDA __attribute__((always_inline))  // a lambda is compiled for the target of its caller only when inlined

template <typename T, int B> struct Vectors;
template <int B> struct Vectors<float, B> {
  typedef float type __attribute__((vector_size(B)));
  typedef int32_t mask __attribute__((vector_size(B)));
};
template <int B> struct Vectors<double, B> {
  typedef double type __attribute__((vector_size(B)));
  typedef int64_t mask __attribute__((vector_size(B)));
};

template <typename V> FLOWPROBE_INLINE V load(const void* from) { V v; std::memcpy(&v, from, sizeof(V)); return v; }
template <typename V> FLOWPROBE_INLINE void store(const V& v, void* to) { std::memcpy(to, &v, sizeof(V)); }

// float32 exp, log, log1p and tanh without branches (Cephes' polynomials, a few ulp) on vectors V of
// floats (I: int32 of the same width); float64 uses the C library's functions value by value.
template <typename V, typename I>
FLOWPROBE_INLINE V exp_vec(V x) {  // NaN gives exp(-87.3): converting NaN to an integer is undefined behaviour
  x = x > -87.3f ? x : V{} - 87.3f;
  x = x < 88.3f ? x : V{} + 88.3f;
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  V y = x * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  return (y * x * x + x + 1.0f) * std::bit_cast<V>((__builtin_convertvector(n, I) + 127) << 23);
}

template <typename V, typename I>
FLOWPROBE_INLINE V log_vec(V x) {  // x > 0 and finite
  const I bits = std::bit_cast<I>(x);
  V e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, V);
  V m = std::bit_cast<V>((bits & 0x007fffff) | 0x3f000000);  // x = m 2^e, m in [0.5, 1)
  const I low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const V z = m * m;
  V y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
  return m + y + 0.693359375f * e;
}

template <typename V, typename I>
FLOWPROBE_INLINE V log1p_vec(V t) {
  if constexpr (sizeof(t[0]) == sizeof(double)) {
    for (size_t i = 0; i < sizeof(V) / sizeof(double); ++i) t[i] = std::log1p(t[i]);
    return t;
  } else {
    constexpr float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
    const V u = 1.0f + t, rounding = u - 1.0f;  // log(u) t / (u - 1) undoes the rounding of 1 + t
    const V positive = u < inf ? log_vec<V, I>(u) * (t / rounding) : u;
    const V r = u > 0.0f ? positive : (u == 0.0f ? V{} - inf : V{} + nan);
    return rounding == 0.0f ? t : r;
  }
}

template <typename V, typename I>
FLOWPROBE_INLINE V tanh_vec(V x) {
  if constexpr (sizeof(x[0]) == sizeof(double)) {
    for (size_t i = 0; i < sizeof(V) / sizeof(double); ++i) x[i] = std::tanh(x[i]);
    return x;
  } else {
    const I sign = std::bit_cast<I>(x) & INT32_MIN;
    const V a = std::bit_cast<V>(std::bit_cast<I>(x) ^ sign), z = x * x;
    const V large = 1.0f - 2.0f / (exp_vec<V, I>(a + a) + 1.0f);
    const V small = ((((z * -5.70498872745e-3f + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                      1.33314422036e-1f) * z - 3.33332819422e-1f) * z * a + a;
    return std::bit_cast<V>(std::bit_cast<I>(a > 0.625f ? large : small) | sign);
  }
}

// A block of LANES values as Q vectors of B bytes.
template <typename T, int B>
struct Block {
  using V = typename Vectors<T, B>::type;
  using I = typename Vectors<T, B>::mask;
  static constexpr int64_t W = B / sizeof(T), Q = LANES / W;
  V v[Q];
  static FLOWPROBE_INLINE Block fill(T value) { Block b; for (int64_t q = 0; q < Q; ++q) b.v[q] = V{} + value; return b; }
  static FLOWPROBE_INLINE Block from(const T* p) { Block b; for (int64_t q = 0; q < Q; ++q) b.v[q] = load<V>(p + q * W); return b; }
  FLOWPROBE_INLINE void to(T* p) const { for (int64_t q = 0; q < Q; ++q) store(v[q], p + q * W); }
  FLOWPROBE_INLINE T sum() const {  // pairwise, lane i + h onto lane i for h = 32, 16, ..., 1: the same bits whatever B
    V s[Q];
    for (int64_t q = 0; q < Q; ++q) s[q] = v[q];
    for (int64_t half = Q / 2; half > 0; half /= 2)
      for (int64_t q = 0; q < half; ++q) s[q] += s[q + half];
    return fold<W / 2>(s[0], std::make_index_sequence<W>{})[0];
  }
  // Lane i + h onto lane i for h = H, H / 2, ..., 1 (in registers: a shuffle and an add each, where the
  // compiler has __builtin_shufflevector: GCC 12, Clang).
  template <int64_t H, size_t... i>
  static FLOWPROBE_INLINE V fold(V x, std::index_sequence<i...> order) {
    if constexpr (H == 0) return x;
#if FLOWPROBE_SHUFFLE
    else return fold<H / 2>(x + __builtin_shufflevector(x, x, static_cast<int>(i + H)...), order);
#else
    else { V y = x; for (int64_t j = 0; j < H; ++j) y[j] += x[j + H]; return fold<H / 2>(y, order); }
#endif
  }
  template <typename F> FLOWPROBE_INLINE Block map(const F& f) const { Block r; for (int64_t q = 0; q < Q; ++q) r.v[q] = f(v[q]); return r; }
};

#define FLOWPROBE_BLOCK_OP(op)                                                                                  \
  template <typename T, int B> FLOWPROBE_INLINE Block<T, B> operator op(const Block<T, B>& a, const Block<T, B>& b) { \
    Block<T, B> r; for (int64_t q = 0; q < Block<T, B>::Q; ++q) r.v[q] = a.v[q] op b.v[q]; return r;               \
  }                                                                                                             \
  template <typename T, int B> FLOWPROBE_INLINE Block<T, B> operator op(T a, const Block<T, B>& b) {                \
    Block<T, B> r; for (int64_t q = 0; q < Block<T, B>::Q; ++q) r.v[q] = a op b.v[q]; return r;                    \
  }
FLOWPROBE_BLOCK_OP(+)
FLOWPROBE_BLOCK_OP(-)
FLOWPROBE_BLOCK_OP(*)
FLOWPROBE_BLOCK_OP(/)
#undef FLOWPROBE_BLOCK_OP

// h, h', h'' value by value (the activations without a vector form).
template <typename T, int B>
FLOWPROBE_INLINE void activate_values(int act, const Block<T, B>& t, Block<T, B>& h, Block<T, B>& d1, Block<T, B>& d2) {
  for (int64_t q = 0; q < Block<T, B>::Q; ++q)
    for (int64_t i = 0; i < Block<T, B>::W; ++i) {
      T hv, d1v, d2v;
      activate(act, t.v[q][i], hv, d1v, d2v);
      h.v[q][i] = hv;
      d1.v[q][i] = d1v;
      d2.v[q][i] = d2v;
    }
}

// h and h' of a block of pre-activations, and what the forward keeps per layer for the backward: h for
// tanh (whose h', h'' are functions of h), the pre-activation for the other activations.
template <typename T, int B>
FLOWPROBE_INLINE void activate_block(int act, const Block<T, B>& t, Block<T, B>& h, Block<T, B>& d1, Block<T, B>& keep) {
  using V = typename Block<T, B>::V;
  using I = typename Block<T, B>::I;
  if (act == TANH) {
    h = t.map([](V x) { return tanh_vec<V, I>(x); });
    d1 = T(1) - h * h;
    keep = h;
    return;
  }
  Block<T, B> d2;
  activate_values(act, t, h, d1, d2);
  keep = t;
}

// h, h', h'' from what activate_block kept.
template <typename T, int B>
FLOWPROBE_INLINE void derivatives_block(int act, const Block<T, B>& kept, Block<T, B>& h, Block<T, B>& d1,
                                        Block<T, B>& d2) {
  if (act != TANH) return activate_values(act, kept, h, d1, d2);
  h = kept;
  d1 = T(1) - h * h;
  d2 = T(-2) * (h * d1);
}

// A planar run's arrays: points (E,N,d), u, w (K,E,d), b, wu (K,E) — or, per point (P), one parameter set per
// lane in the block layout (B,K,d,LANES), (B,K,LANES) (points_to_lanes); saved per layer, in blocks of LANES
// points (N padded to B blocks): its inputs (E,B,K,d,LANES), coordinate-major, and what activate_block
// keeps (E,B,K,LANES). A block's K layers are contiguous: the forward writes, and the backward reads, one
// stretch of memory per block (layer-major, the stores of a block were a page apart and cost a third of
// the forward).
template <typename T>
struct PlanarArrays {
  int64_t e, n, d, k, blocks;
  const T *u, *w, *b, *wu;
  T *inputs, *kept;
  T* input(int64_t l, int64_t m, int64_t block) const { return inputs + ((m * blocks + block) * k + l) * d * LANES; }
  T* keep(int64_t l, int64_t m, int64_t block) const { return kept + ((m * blocks + block) * k + l) * LANES; }
  // Layer l's vector parameters (coordinate j at j * stride<P>) and scalar ones, of member m or of the block.
  template <bool P> const T* vector(const T* p, int64_t l, int64_t m, int64_t block) const {
    return P ? p + (block * k + l) * d * LANES : p + (l * e + m) * d;
  }
  template <bool P> const T* scalar(const T* p, int64_t l, int64_t m, int64_t block) const {
    return P ? p + (block * k + l) * LANES : p + l * e + m;
  }
  template <bool P> static constexpr int64_t stride() { return P ? LANES : 1; }
};

// A parameter as a block of lanes: one value for every lane, or (per point) a value per lane.
template <typename T, int B, bool P>
FLOWPROBE_INLINE Block<T, B> lanes(const T* p) {
  if constexpr (P) return Block<T, B>::from(p);
  else return Block<T, B>::fill(*p);
}

// The log-det terms of `count` layers, sum_i log(1 + t_i). In float32 one log of their product where every
// lane's product lies in [1e-30, 1e30] (a float32 log per layer costs as much as the rest of the layer);
// otherwise, and in float64, log1p term by term.
template <typename T, int B>
FLOWPROBE_INLINE Block<T, B> log_det_terms(const Block<T, B>* t, int64_t count) {
  using Lanes = Block<T, B>;
  using V = typename Lanes::V;
  using I = typename Lanes::I;
  if constexpr (sizeof(T) == sizeof(float)) {
    Lanes product = T(1) + t[0];
    for (int64_t i = 1; i < count; ++i) product = product * (T(1) + t[i]);
    I inside = product.v[0] > T(1e-30) & product.v[0] < T(1e30);
    for (int64_t q = 1; q < Lanes::Q; ++q) inside &= product.v[q] > T(1e-30) & product.v[q] < T(1e30);
    bool all = true;
    for (int64_t i = 0; i < Lanes::W; ++i) all = all && inside[i] != 0;
    if (all) return product.map([](V x) { return log_vec<V, I>(x); });
  }
  Lanes total = t[0].map([](V x) { return log1p_vec<V, I>(x); });
  for (int64_t i = 1; i < count; ++i) total = total + t[i].map([](V x) { return log1p_vec<V, I>(x); });
  return total;
}

// One block through the K layers: reads its points from input(0, ...), writes every later layer's input,
// the last layer's output to `out` (d,LANES) and the log-det to `logdet` (LANES).
template <typename T, int B, bool P>
FLOWPROBE_INLINE void planar_block_forward(const PlanarArrays<T>& r, int act, int64_t m, int64_t block, T* out,
                                           T* logdet) {
  using Lanes = Block<T, B>;
  constexpr int64_t GROUP = 4, S = PlanarArrays<T>::template stride<P>();  // layers per log of a product
  const int64_t d = r.d;
  Lanes ld = Lanes::fill(0), h, d1, keep, terms[GROUP];
  for (int64_t l = 0; l < r.k; ++l) {
    const T *ul = r.template vector<P>(r.u, l, m, block), *wl = r.template vector<P>(r.w, l, m, block);
    const T* x = r.input(l, m, block);
    T* next = l + 1 < r.k ? r.input(l + 1, m, block) : out;
    Lanes s = lanes<T, B, P>(r.template scalar<P>(r.b, l, m, block));
    for (int64_t j = 0; j < d; ++j) s = s + lanes<T, B, P>(wl + j * S) * Lanes::from(x + j * LANES);
    activate_block(act, s, h, d1, keep);
    keep.to(r.keep(l, m, block));
    for (int64_t j = 0; j < d; ++j) (Lanes::from(x + j * LANES) + lanes<T, B, P>(ul + j * S) * h).to(next + j * LANES);
    terms[l % GROUP] = lanes<T, B, P>(r.template scalar<P>(r.wu, l, m, block)) * d1;
    if (l % GROUP == GROUP - 1 || l == r.k - 1) ld = ld + log_det_terms(terms, l % GROUP + 1);
  }
  ld.to(logdet);
}

// One block backward through the K layers: g (d,LANES) holds dL/dx on entry and dL/dz on exit; the block's
// parameter gradients (of its member) are added to grad_u, grad_w (K,d), grad_b, grad_wu (K) — or, per point
// (P), written lane by lane to grad_u, grad_w (K,d,LANES), grad_b, grad_wu (K,LANES).
template <typename T, int B, bool P>
FLOWPROBE_INLINE void planar_block_backward(const PlanarArrays<T>& r, int act, int64_t m, int64_t block, T* g,
                                            const T* lam_in, T* grad_u, T* grad_w, T* grad_b, T* grad_wu) {
  using Lanes = Block<T, B>;
  constexpr int64_t S = PlanarArrays<T>::template stride<P>();
  const int64_t d = r.d;
  const Lanes lam = Lanes::from(lam_in);
  Lanes h, d1, d2;
  for (int64_t l = r.k - 1; l >= 0; --l) {
    const T *ul = r.template vector<P>(r.u, l, m, block), *wl = r.template vector<P>(r.w, l, m, block);
    const T* x = r.input(l, m, block);
    const Lanes a = lanes<T, B, P>(r.template scalar<P>(r.wu, l, m, block));
    derivatives_block(act, Lanes::from(r.keep(l, m, block)), h, d1, d2);
    const Lanes weight = lam / (T(1) + a * d1);
    Lanes d_pre = a * (weight * d2);
    for (int64_t j = 0; j < d; ++j) d_pre = d_pre + lanes<T, B, P>(ul + j * S) * (d1 * Lanes::from(g + j * LANES));
    if constexpr (P) {
      d_pre.to(grad_b + l * LANES);
      (weight * d1).to(grad_wu + l * LANES);
    } else {
      grad_b[l] += d_pre.sum();
      grad_wu[l] += (weight * d1).sum();
    }
    for (int64_t j = 0; j < d; ++j) {
      const Lanes gj = Lanes::from(g + j * LANES);
      if constexpr (P) {
        (h * gj).to(grad_u + (l * d + j) * LANES);
        (d_pre * Lanes::from(x + j * LANES)).to(grad_w + (l * d + j) * LANES);
      } else {
        grad_u[l * d + j] += (h * gj).sum();
        grad_w[l * d + j] += (d_pre * Lanes::from(x + j * LANES)).sum();
      }
      (gj + lanes<T, B, P>(wl + j * S) * d_pre).to(g + j * LANES);
    }
  }
}

// The block functions compiled for 16-byte vectors and, on x86-64, for AVX2's 32-byte ones (with FMA); P:
// per-point parameters.
template <typename T, bool P>
struct PlanarBlocks {
  static void forward(const PlanarArrays<T>& r, int act, int64_t m, int64_t block, T* out, T* logdet) {
    planar_block_forward<T, 16, P>(r, act, m, block, out, logdet);
  }
  static void backward(const PlanarArrays<T>& r, int act, int64_t m, int64_t block, T* g, const T* lam, T* gu,
                       T* gw, T* gb, T* ga) {
    planar_block_backward<T, 16, P>(r, act, m, block, g, lam, gu, gw, gb, ga);
  }
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FLOWPROBE_AVX2 __attribute__((target("avx2,fma")))
template <typename T, bool P>
struct PlanarBlocksAVX2 {
  FLOWPROBE_AVX2 static void forward(const PlanarArrays<T>& r, int act, int64_t m, int64_t block, T* out, T* logdet) {
    planar_block_forward<T, 32, P>(r, act, m, block, out, logdet);
  }
  FLOWPROBE_AVX2 static void backward(const PlanarArrays<T>& r, int act, int64_t m, int64_t block, T* g, const T* lam,
                                      T* gu, T* gw, T* gb, T* ga) {
    planar_block_backward<T, 32, P>(r, act, m, block, g, lam, gu, gw, gb, ga);
  }
};
int widest = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 32 : 16;
#else
template <typename T, bool P> using PlanarBlocksAVX2 = PlanarBlocks<T, P>;
int widest = 16;
#endif
int vector_width = widest;  // bytes; vector_bytes() may lower it

// The planar block functions of a vector width (bytes).
template <typename T, bool P>
struct PlanarKernels {
  decltype(&PlanarBlocks<T, P>::forward) forward;
  decltype(&PlanarBlocks<T, P>::backward) backward;
  static PlanarKernels of(int width) {
    if (width == 32) return {PlanarBlocksAVX2<T, P>::forward, PlanarBlocksAVX2<T, P>::backward};
    return {PlanarBlocks<T, P>::forward, PlanarBlocks<T, P>::backward};
  }
};

// Runs visit(member, block) over every block of every member, in parallel.
template <typename F>
void for_blocks(int64_t members, int64_t blocks, const F& visit) {
  at::parallel_for(0, members * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) visit(index / blocks, index % blocks);
  });
}

// Copies the points of one block between (N,d) rows and a (d,LANES) block; padding lanes are zero.
template <typename T>
void gather_block(const T* rows, int64_t n, int64_t d, int64_t start, T* block) {
  const int64_t count = std::min(LANES, n - start);
  std::fill(block, block + d * LANES, T(0));
  for (int64_t i = 0; i < count; ++i)
    for (int64_t j = 0; j < d; ++j) block[j * LANES + i] = rows[(start + i) * d + j];
}

template <typename T>
void scatter_block(const T* block, int64_t n, int64_t d, int64_t start, T* rows) {
  const int64_t count = std::min(LANES, n - start);
  for (int64_t i = 0; i < count; ++i)
    for (int64_t j = 0; j < d; ++j) rows[(start + i) * d + j] = block[j * LANES + i];
}

}  // namespace

// The vector width of the planar and Sylvester kernels in bytes: 32 (AVX2 and FMA) where the CPU has them,
// else 16. `bytes` = 16 or 32 sets it (at most what the CPU has; the tests run both); 0 leaves it. Returns
// the width in use.
int64_t vector_bytes(int64_t bytes) {
  if (bytes == 16 || bytes == 32) vector_width = std::min<int>(static_cast<int>(bytes), widest);
  return vector_width;
}

// Per-point parameters p (K,N[,c]) as blocks of lanes (B,K,c,LANES) (padding lanes 0): what the per-point
// block functions read.
at::Tensor points_to_lanes(const at::Tensor& p) {
  const int64_t k = p.size(0), n = p.size(1), c = p.dim() == 3 ? p.size(2) : 1, blocks = (n + LANES - 1) / LANES;
  auto lanes = at::empty({blocks, k, c, LANES}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "points_to_lanes", [&] {
    const scalar_t* from = p.data_ptr<scalar_t>();
    scalar_t* to = lanes.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block)
        for (int64_t l = 0; l < k; ++l)
          for (int64_t j = 0; j < c; ++j) {
            scalar_t* lane = to + ((block * k + l) * c + j) * LANES;
            for (int64_t i = 0; i < LANES; ++i) {
              const int64_t point = block * LANES + i;
              lane[i] = point < n ? from[(l * n + point) * c + j] : scalar_t(0);
            }
          }
    });
  });
  return lanes;
}

// Back from blocks of lanes, block b's (K,c,LANES) values at from + b * block_stride, to (K,N,c).
template <typename T>
void lanes_to_points(const T* from, int64_t block_stride, int64_t k, int64_t n, int64_t c, T* to) {
  at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l)
      for (int64_t point = 0; point < n; ++point)
        for (int64_t j = 0; j < c; ++j)
          to[(l * n + point) * c + j] = from[(point / LANES) * block_stride + (l * c + j) * LANES + point % LANES];
  });
}

// Whether a planar run has one parameter set per point: z (N,d) with u (K,N,d).
static bool per_point(const at::Tensor& z, const at::Tensor& u) { return z.dim() == 2 && u.dim() == 3; }

// Planar runs x <- x + u_k h(w_k.x + b_k), k = 0..K-1, of E members: z (E,N,d), u, w (K,E,d), b, wu (K,E);
// of one flow: z (N,d), u, w (K,d), b, wu (K); or with one parameter set per point: z (N,d), u, w (K,N,d),
// b, wu (K,N). Returns (x, logdet (E,N) or (N), inputs, kept), the last two in the block layout of
// PlanarArrays.
std::vector<at::Tensor> planar_forward(at::Tensor z, at::Tensor u, at::Tensor w, at::Tensor b, at::Tensor wu,
                                       int64_t act) {
  z = z.contiguous(); u = u.contiguous(); w = w.contiguous(); b = b.contiguous(); wu = wu.contiguous();
  const bool points = per_point(z, u);
  const int64_t e = z.dim() == 3 ? z.size(0) : 1, n = z.size(-2), d = z.size(-1), k = u.size(0);
  const int64_t blocks = (n + LANES - 1) / LANES;
  auto x = at::empty_like(z);
  auto logdet = at::empty(z.sizes().slice(0, z.dim() - 1), z.options());
  auto inputs = at::empty({e, blocks, k, d, LANES}, z.options());
  auto kept = at::empty({e, blocks, k, LANES}, z.options());
  if (points) {  // the parameters in the lanes of their points
    u = points_to_lanes(u); w = points_to_lanes(w); b = points_to_lanes(b); wu = points_to_lanes(wu);
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "planar_forward", [&] {
    const PlanarArrays<scalar_t> r{e, n, d, k, blocks, u.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                   b.data_ptr<scalar_t>(), wu.data_ptr<scalar_t>(), inputs.data_ptr<scalar_t>(),
                                   kept.data_ptr<scalar_t>()};
    const auto run = points ? PlanarKernels<scalar_t, true>::of(vector_width).forward
                            : PlanarKernels<scalar_t, false>::of(vector_width).forward;
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t *xp = x.data_ptr<scalar_t>(), *lp = logdet.data_ptr<scalar_t>();
    for_blocks(e, blocks, [&](int64_t m, int64_t block) {
      std::vector<scalar_t> out(d * LANES);
      scalar_t ld[LANES];
      const int64_t start = block * LANES, count = std::min(LANES, n - start);
      gather_block(zp + m * n * d, n, d, start, r.input(0, m, block));
      run(r, static_cast<int>(act), m, block, out.data(), ld);
      scatter_block(out.data(), n, d, start, xp + m * n * d);
      std::copy(ld, ld + count, lp + m * n + start);
    });
  });
  return {x, logdet, inputs, kept};
}

// Backward of planar_forward: (grad_z, grad_u, grad_w, grad_b, grad_wu). Each block's parameter gradients
// go to a slot of their own and are summed over the blocks in order, so that the result does not depend
// on the number of threads and a member of an ensemble gets exactly the gradients of its solo run. With
// per-point parameters, each lane's gradients are its point's, written back to (K,N,d), (K,N).
std::vector<at::Tensor> planar_backward(at::Tensor grad_x, at::Tensor grad_logdet, at::Tensor inputs, at::Tensor kept,
                                        at::Tensor u, at::Tensor w, at::Tensor wu, int64_t act) {
  grad_x = grad_x.contiguous(); grad_logdet = grad_logdet.contiguous(); u = u.contiguous(); w = w.contiguous();
  wu = wu.contiguous();
  const bool points = per_point(grad_x, u);
  const int64_t e = inputs.size(0), blocks = inputs.size(1), k = inputs.size(2), d = inputs.size(3);
  const int64_t n = grad_x.size(-2), width = k * (2 * d + 2);  // a block's slot: u, w (K,d), b, wu (K)
  const int64_t lanes_per_slot = points ? LANES : 1;
  auto grad_z = at::empty_like(grad_x);
  auto grad_u = at::empty_like(u), grad_w = at::empty_like(w), grad_b = at::empty_like(wu), grad_wu = at::empty_like(wu);
  const at::Tensor param_u = points ? points_to_lanes(u) : u, param_w = points ? points_to_lanes(w) : w;
  const at::Tensor param_wu = points ? points_to_lanes(wu) : wu;
  AT_DISPATCH_FLOATING_TYPES(grad_x.scalar_type(), "planar_backward", [&] {
    const PlanarArrays<scalar_t> r{e, n, d, k, blocks, param_u.data_ptr<scalar_t>(), param_w.data_ptr<scalar_t>(),
                                   nullptr, param_wu.data_ptr<scalar_t>(), inputs.data_ptr<scalar_t>(),
                                   kept.data_ptr<scalar_t>()};
    const auto run = points ? PlanarKernels<scalar_t, true>::of(vector_width).backward
                            : PlanarKernels<scalar_t, false>::of(vector_width).backward;
    // Shared parameters: each block adds into its slot (zeros); per point: every lane of every slot is written.
    const int64_t slot_size = e * blocks * width * lanes_per_slot;
    const at::Tensor slot_tensor =
        points ? at::empty({slot_size}, grad_x.options()) : at::zeros({slot_size}, grad_x.options());
    scalar_t* slots = slot_tensor.data_ptr<scalar_t>();
    const scalar_t *gx = grad_x.data_ptr<scalar_t>(), *gl = grad_logdet.data_ptr<scalar_t>();
    scalar_t* gz = grad_z.data_ptr<scalar_t>();
    for_blocks(e, blocks, [&](int64_t m, int64_t block) {
      scalar_t* slot = slots + (m * blocks + block) * width * lanes_per_slot;
      std::vector<scalar_t> g(d * LANES);
      scalar_t lam[LANES] = {};  // padding lanes: no gradient, so they add nothing
      const int64_t start = block * LANES, count = std::min(LANES, n - start);
      gather_block(gx + m * n * d, n, d, start, g.data());
      std::copy(gl + m * n + start, gl + m * n + start + count, lam);
      run(r, static_cast<int>(act), m, block, g.data(), lam, slot, slot + k * d * lanes_per_slot,
          slot + 2 * k * d * lanes_per_slot, slot + (2 * k * d + k) * lanes_per_slot);
      scatter_block(g.data(), n, d, start, gz + m * n * d);
    });
    scalar_t *gu = grad_u.data_ptr<scalar_t>(), *gw = grad_w.data_ptr<scalar_t>(), *gb = grad_b.data_ptr<scalar_t>(),
             *ga = grad_wu.data_ptr<scalar_t>();
    if (points) {  // a block's slot: u, w (K,d,LANES), b, wu (K,LANES), each lane its point's
      const scalar_t* slot = slots;
      const int64_t stride = width * LANES;
      lanes_to_points(slot, stride, k, n, d, gu);
      lanes_to_points(slot + k * d * LANES, stride, k, n, d, gw);
      lanes_to_points(slot + 2 * k * d * LANES, stride, k, n, 1, gb);
      lanes_to_points(slot + (2 * k * d + k) * LANES, stride, k, n, 1, ga);
      return;
    }
    at::parallel_for(0, e, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> total(width);
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* slot = slots + m * blocks * width;
        std::fill(total.begin(), total.end(), scalar_t(0));  // safe for N = 0; 0 + x = x otherwise
        for (int64_t block = 0; block < blocks; ++block)
          for (int64_t i = 0; i < width; ++i) total[i] += slot[block * width + i];
        for (int64_t l = 0; l < k; ++l) {
          for (int64_t j = 0; j < d; ++j) {
            gu[(l * e + m) * d + j] = total[l * d + j];
            gw[(l * e + m) * d + j] = total[k * d + l * d + j];
          }
          gb[l * e + m] = total[2 * k * d + l];
          ga[l * e + m] = total[2 * k * d + k + l];
        }
      }
    });
  });
  return {grad_z, grad_u, grad_w, grad_b, grad_wu};
}

// Sylvester back-substitutions: one layer of a shared Sylvester run in the coordinates c = Q^T y, points in
// columns of (m, N) arrays, rows solved from the bottom (flowprobe/layers/sylvester.py, _newton_inverse and
// _solve_linearised, has the same formulas). Solving row i gives two rows a_i, b_i; every row j < i then
// loses R_ji a_i from c_j and gains R~_ji b_i in gamma_j. Rows go in chunks of 8: inside a chunk each solved
// row updates the chunk's rows above it, and a finished chunk updates every row above it in one pass (each
// row read and written once per chunk, not once per solved row). Points go in blocks of LANES lanes,
// copied into (m, LANES) scratch rows (padding lanes zero).
template <typename T, int B, typename Solve>
FLOWPROBE_INLINE void back_substitute(int64_t m, const T* r, const T* r_tilde, T* c, T* gamma, T* a, T* b,
                                      const Solve& solve) {
  using Lanes = Block<T, B>;
  constexpr int64_t CHUNK = 8;
  for (int64_t hi = m; hi > 0; hi -= CHUNK) {
    const int64_t lo = std::max<int64_t>(hi - CHUNK, 0);
    for (int64_t i = hi - 1; i >= lo; --i) {
      solve(i);  // reads c_i, gamma_i; writes a_i, b_i
      const Lanes ai = Lanes::from(a + i * LANES), bi = Lanes::from(b + i * LANES);
      for (int64_t j = lo; j < i; ++j) {
        (Lanes::from(c + j * LANES) - r[j * m + i] * ai).to(c + j * LANES);
        (Lanes::from(gamma + j * LANES) + r_tilde[j * m + i] * bi).to(gamma + j * LANES);
      }
    }
    for (int64_t j = 0; j < lo; ++j) {
      Lanes cj = Lanes::from(c + j * LANES);
      for (int64_t i = lo; i < hi; ++i) cj = cj - r[j * m + i] * Lanes::from(a + i * LANES);
      cj.to(c + j * LANES);
      Lanes gj = Lanes::from(gamma + j * LANES);
      for (int64_t i = lo; i < hi; ++i) gj = gj + r_tilde[j * m + i] * Lanes::from(b + i * LANES);
      gj.to(gamma + j * LANES);
    }
  }
}

// Copies lanes [start, start + LANES) of the m rows of an (m, N) array into (m, LANES) scratch, and back.
template <typename T>
void gather_rows(const T* rows, int64_t m, int64_t n, int64_t start, T* block) {
  const int64_t count = std::min(LANES, n - start);
  for (int64_t i = 0; i < m; ++i) {
    std::copy(rows + i * n + start, rows + i * n + start + count, block + i * LANES);
    std::fill(block + i * LANES + count, block + (i + 1) * LANES, T(0));
  }
}

template <typename T>
void scatter_rows(const T* block, int64_t m, int64_t n, int64_t start, T* rows) {
  const int64_t count = std::min(LANES, n - start);
  for (int64_t i = 0; i < m; ++i) std::copy(block + i * LANES, block + i * LANES + count, rows + i * n + start);
}

// One block of the tanh inverse: row i solves s + a_i tanh(s) = gamma_i + R~_ii c_i with budgets_i Newton
// steps from the clamp start (activations.py, tanh_newton), then v_i = c_i - R_ii tanh(s) (a_i = tanh(s)
// into h, b_i = v_i). Writes v and the slopes 1 - tanh(s)^2 into scratch rows; adds each lane's forward
// log-det terms log(1 + a_i (1 - tanh(s)^2)) to `logdet` and counts in `fails` the roots that fail
// activations.py's tanh_converged (C d^2 <= 2 eps (1 + |s|) after a last step d, C = 0.385 |a| / min(1, 1 + a)).
template <typename T, int B>
FLOWPROBE_INLINE void sylvester_block_newton(int64_t m, const T* r, const T* r_tilde, const T* alpha,
                                             const int64_t* budgets, T* c, T* gamma, T* h, T* v, T* slope, T* logdet,
                                             T* fails) {
  using Lanes = Block<T, B>;
  using V = typename Lanes::V;
  using I = typename Lanes::I;
  constexpr T tanh_curvature = T(0.385), tolerance = 2 * std::numeric_limits<T>::epsilon();
  Lanes ld = Lanes::fill(0), failed = Lanes::fill(0);
  back_substitute<T, B>(m, r, r_tilde, c, gamma, h, v, [&](int64_t i) FLOWPROBE_INLINE_LAMBDA {
    const T a = alpha[i], bound = 1 + a, shrink = a / bound, curvature = tanh_curvature * std::abs(a) / std::min<T>(1, bound);
    const int64_t steps = std::max<int64_t>(budgets[i], 1);
    const Lanes ci = Lanes::from(c + i * LANES), target = Lanes::from(gamma + i * LANES) + r_tilde[i * m + i] * ci;
    Lanes s, step, th;
    for (int64_t q = 0; q < Lanes::Q; ++q) {
      const V t = target.v[q], clamped = t < -bound ? V{} - bound : (t > bound ? V{} + bound : t);
      s.v[q] = t - shrink * clamped;
    }
    for (int64_t k = 0; k < steps; ++k) {  // a step over all Q vectors at once: Q independent chains in flight
      for (int64_t q = 0; q < Lanes::Q; ++q) th.v[q] = tanh_vec<V, I>(s.v[q]);
      step = (s + a * th - target) / (bound - a * (th * th));  // residual / (1 + a (1 - tanh^2))
      s = s - step;
    }
    for (int64_t q = 0; q < Lanes::Q; ++q) {
      th.v[q] = tanh_vec<V, I>(s.v[q]);
      const V magnitude = s.v[q] < 0 ? -s.v[q] : s.v[q];
      const I converged = curvature * (step.v[q] * step.v[q]) <= (1 + magnitude) * tolerance;  // false for NaN
      failed.v[q] += converged ? V{} : V{} + 1;
    }
    const Lanes si = T(1) - th * th;
    ld = ld + (a * si).map([](V x) FLOWPROBE_INLINE_LAMBDA { return log1p_vec<V, I>(x); });
    si.to(slope + i * LANES);
    th.to(h + i * LANES);
    (ci - r[i * m + i] * th).to(v + i * LANES);
  });
  (Lanes::from(logdet) + ld).to(logdet);
  (Lanes::from(fails) + failed).to(fails);
}

// One block of (I + R diag(s) R~) y = w: y_i = (c_i - R_ii s_i gamma_i) / (1 + R_ii R~_ii s_i) (b_i = y_i) and
// a_i = s_i (gamma_i + R~_ii y_i) into `scaled`. c holds w on entry.
template <typename T, int B>
FLOWPROBE_INLINE void sylvester_block_linear(int64_t m, const T* r, const T* r_tilde, const T* slopes, T* c, T* gamma,
                                             T* scaled, T* y) {
  using Lanes = Block<T, B>;
  back_substitute<T, B>(m, r, r_tilde, c, gamma, scaled, y, [&](int64_t i) FLOWPROBE_INLINE_LAMBDA {
    const T r_ii = r[i * m + i], rt_ii = r_tilde[i * m + i];
    const Lanes si = Lanes::from(slopes + i * LANES), gain = r_ii * si, gi = Lanes::from(gamma + i * LANES);
    const Lanes yi = (Lanes::from(c + i * LANES) - gain * gi) / (T(1) + rt_ii * gain);
    yi.to(y + i * LANES);
    ((gi + rt_ii * yi) * si).to(scaled + i * LANES);
  });
}

template <typename T>
struct SylvesterBlocks {
  static void newton(int64_t m, const T* r, const T* rt, const T* alpha, const int64_t* budgets, T* c, T* gamma, T* h,
                     T* v, T* slope, T* logdet, T* fails) {
    sylvester_block_newton<T, 16>(m, r, rt, alpha, budgets, c, gamma, h, v, slope, logdet, fails);
  }
  static void linear(int64_t m, const T* r, const T* rt, const T* slopes, T* c, T* gamma, T* scaled, T* y) {
    sylvester_block_linear<T, 16>(m, r, rt, slopes, c, gamma, scaled, y);
  }
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <typename T>
struct SylvesterBlocksAVX2 {
  FLOWPROBE_AVX2 static void newton(int64_t m, const T* r, const T* rt, const T* alpha, const int64_t* budgets, T* c,
                                    T* gamma, T* h, T* v, T* slope, T* logdet, T* fails) {
    sylvester_block_newton<T, 32>(m, r, rt, alpha, budgets, c, gamma, h, v, slope, logdet, fails);
  }
  FLOWPROBE_AVX2 static void linear(int64_t m, const T* r, const T* rt, const T* slopes, T* c, T* gamma, T* scaled,
                                    T* y) {
    sylvester_block_linear<T, 32>(m, r, rt, slopes, c, gamma, scaled, y);
  }
};
#else
template <typename T> using SylvesterBlocksAVX2 = SylvesterBlocks<T>;
#endif

// The tanh inverse of one layer of a shared Sylvester run: c = Q^T y (m, N), b, alpha = diag(R) diag(R~) (m),
// Newton budgets (m). Adds the layer's forward log-det to `logdet` (N), writes h'(pre) into `slopes` (m, N)
// when given, and returns v = Q^T z (m, N) and whether every root passed the convergence check.
std::tuple<at::Tensor, bool> sylvester_newton(at::Tensor c, at::Tensor r, at::Tensor r_tilde, at::Tensor b,
                                              at::Tensor alpha, at::Tensor budgets, at::Tensor logdet,
                                              std::optional<at::Tensor> slopes) {
  c = c.contiguous(); r = r.contiguous(); r_tilde = r_tilde.contiguous(); b = b.contiguous();
  alpha = alpha.contiguous(); budgets = budgets.to(at::kLong).contiguous();
  const int64_t m = c.size(0), n = c.size(1), blocks = (n + LANES - 1) / LANES;
  TORCH_CHECK(logdet.is_contiguous() && logdet.dim() == 1 && logdet.size(0) == n, "sylvester_newton: logdet must be (N,)");
  TORCH_CHECK(!slopes || (slopes->is_contiguous() && slopes->sizes() == c.sizes()),
              "sylvester_newton: slopes must be contiguous and shaped like c");
  auto v = at::empty_like(c);
  int64_t failures = 0;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "sylvester_newton", [&] {
    const auto run = vector_width == 32 ? SylvesterBlocksAVX2<scalar_t>::newton : SylvesterBlocks<scalar_t>::newton;
    const scalar_t *rp = r.data_ptr<scalar_t>(), *rtp = r_tilde.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>(),
                   *bp = b.data_ptr<scalar_t>(), *ap = alpha.data_ptr<scalar_t>();
    const int64_t* steps = budgets.data_ptr<int64_t>();
    scalar_t *vp = v.data_ptr<scalar_t>(), *lp = logdet.data_ptr<scalar_t>();
    scalar_t* sp = slopes ? slopes->data_ptr<scalar_t>() : nullptr;
    std::vector<int64_t> failed(blocks, 0);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(5 * m * LANES + 2 * LANES);
      scalar_t *cb = scratch.data(), *gb = cb + m * LANES, *hb = gb + m * LANES, *vb = hb + m * LANES,
               *sb = vb + m * LANES, *ldb = sb + m * LANES, *fb = ldb + LANES;
      for (int64_t block = begin; block < end; ++block) {
        const int64_t start = block * LANES, count = std::min(LANES, n - start);
        gather_rows(cp, m, n, start, cb);
        for (int64_t i = 0; i < m; ++i) std::fill(gb + i * LANES, gb + (i + 1) * LANES, bp[i]);
        std::fill(ldb, ldb + 2 * LANES, scalar_t(0));
        run(m, rp, rtp, ap, steps, cb, gb, hb, vb, sb, ldb, fb);
        scatter_rows(vb, m, n, start, vp);
        if (sp != nullptr) scatter_rows(sb, m, n, start, sp);
        for (int64_t i = 0; i < count; ++i) {  // padding lanes neither add nor fail
          lp[start + i] += ldb[i];
          failed[block] += fb[i] != 0;
        }
      }
    });
    for (const int64_t f : failed) failures += f;
  });
  return {v, failures == 0};
}

// (I + R diag(s) R~) y = w for every column of w (m, N), slopes s (m, N); R, R~ (m, m) upper triangular.
at::Tensor sylvester_linear(at::Tensor w, at::Tensor r, at::Tensor r_tilde, at::Tensor slopes) {
  w = w.contiguous(); r = r.contiguous(); r_tilde = r_tilde.contiguous(); slopes = slopes.contiguous();
  const int64_t m = w.size(0), n = w.size(1), blocks = (n + LANES - 1) / LANES;
  auto y = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "sylvester_linear", [&] {
    const auto run = vector_width == 32 ? SylvesterBlocksAVX2<scalar_t>::linear : SylvesterBlocks<scalar_t>::linear;
    const scalar_t *rp = r.data_ptr<scalar_t>(), *rtp = r_tilde.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(),
                   *sp = slopes.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(5 * m * LANES);
      scalar_t *cb = scratch.data(), *gb = cb + m * LANES, *sb = gb + m * LANES, *ab = sb + m * LANES,
               *yb = ab + m * LANES;
      for (int64_t block = begin; block < end; ++block) {
        gather_rows(wp, m, n, block * LANES, cb);
        gather_rows(sp, m, n, block * LANES, sb);
        std::fill(gb, gb + m * LANES, scalar_t(0));
        run(m, rp, rtp, sb, cb, gb, ab, yb);
        scatter_rows(yb, m, n, block * LANES, yp);
      }
    });
  });
  return y;
}

// The unit vector u = (v/s) r of a reflection vector v (d entries; layers/householder.py, _normalised): s the
// largest |v_j| (1 for v = 0), r = 1/||v/s|| (the square norm at least the smallest normal number); factors
// gets (s, r).
template <typename scalar_t>
inline void unit_vector(const scalar_t* __restrict__ v, int64_t d, scalar_t* __restrict__ u, scalar_t* __restrict__ factors) {
  scalar_t s = 0, square = 0;
  for (int64_t j = 0; j < d; ++j) s = std::max(s, std::abs(v[j]));
  if (!(s > 0)) s = 1;
  for (int64_t j = 0; j < d; ++j) {
    const scalar_t w = v[j] / s;
    square += w * w;
    u[j] = w;
  }
  const scalar_t r = 1 / std::sqrt(std::max(square, std::numeric_limits<scalar_t>::min()));
  for (int64_t j = 0; j < d; ++j) u[j] *= r;
  factors[0] = s;
  factors[1] = r;
}

// Householder reflections with per-point vectors (layers/householder.py, _Reflections): points z (N,d), raw
// vectors v (N,m,d), normalised here (unit_vector: all of a point's first, independent of each other);
// y_t = y_{t-1} - 2 (y_{t-1}.u_t) u_t, t = 1..m. Returns (y_m, inputs (N,m,d): every reflection's input
// y_{t-1}, the unit vectors u (N,m,d), their factors (N,m,2): s and r).
std::vector<at::Tensor> reflections_forward(at::Tensor z, at::Tensor v) {
  z = z.contiguous(); v = v.contiguous();
  const int64_t n = z.size(0), d = z.size(1), m = v.size(1);
  auto y = at::empty_like(z);
  auto inputs = at::empty_like(v);
  auto unit = at::empty_like(v);
  auto factors = at::empty({n, m, 2}, v.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "reflections_forward", [&] {
    const scalar_t *zp = z.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>(), *ip = inputs.data_ptr<scalar_t>(), *up = unit.data_ptr<scalar_t>();
    scalar_t* fp = factors.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t t = 0; t < m; ++t) {
          const int64_t at = (i * m + t) * d;
          unit_vector(vp + at, d, up + at, fp + 2 * (i * m + t));
        }
        scalar_t* point = yp + i * d;
        std::copy(zp + i * d, zp + (i + 1) * d, point);
        for (int64_t t = 0; t < m; ++t) {
          const scalar_t* u = up + (i * m + t) * d;
          std::copy(point, point + d, ip + (i * m + t) * d);
          scalar_t dot = 0;
          for (int64_t j = 0; j < d; ++j) dot += point[j] * u[j];
          for (int64_t j = 0; j < d; ++j) point[j] -= 2 * dot * u[j];
        }
      }
    });
  });
  return {y, inputs, unit, factors};
}

// Backward of reflections_forward: from g = dL/dy_m, going down t = m..1: dL/du_t = -2 ((g.u_t) y_{t-1} +
// (y_{t-1}.u_t) g), dL/dv_t = r (dL/du_t - (u_t.dL/du_t) u_t)/s, then g <- H_t g. Returns (dL/dz, dL/dv).
std::vector<at::Tensor> reflections_backward(at::Tensor grad, at::Tensor unit, at::Tensor factors,
                                             at::Tensor inputs) {
  grad = grad.contiguous(); unit = unit.contiguous(); factors = factors.contiguous(); inputs = inputs.contiguous();
  const int64_t n = grad.size(0), d = grad.size(1), m = unit.size(1);
  auto grad_z = at::empty_like(grad);
  auto grad_v = at::empty_like(unit);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "reflections_backward", [&] {
    const scalar_t *gp = grad.data_ptr<scalar_t>(), *up = unit.data_ptr<scalar_t>(), *ip = inputs.data_ptr<scalar_t>();
    const scalar_t* fp = factors.data_ptr<scalar_t>();
    scalar_t *gz = grad_z.data_ptr<scalar_t>(), *gv = grad_v.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* g = gz + i * d;
        std::copy(gp + i * d, gp + (i + 1) * d, g);
        for (int64_t t = m - 1; t >= 0; --t) {
          const scalar_t *u = up + (i * m + t) * d, *y = ip + (i * m + t) * d;
          scalar_t gu_dot = 0, yu_dot = 0;
          for (int64_t j = 0; j < d; ++j) {
            gu_dot += g[j] * u[j];
            yu_dot += y[j] * u[j];
          }
          scalar_t* out = gv + (i * m + t) * d;
          for (int64_t j = 0; j < d; ++j) out[j] = -2 * (gu_dot * y[j] + yu_dot * g[j]);  // dL/du_t
          for (int64_t j = 0; j < d; ++j) g[j] -= 2 * gu_dot * u[j];
        }
        for (int64_t t = 0; t < m; ++t) {  // the normalisation's backward, each vector on its own
          const scalar_t *u = up + (i * m + t) * d, scale = fp[2 * (i * m + t)], inverse_norm = fp[2 * (i * m + t) + 1];
          scalar_t* out = gv + (i * m + t) * d;
          scalar_t along = 0;
          for (int64_t j = 0; j < d; ++j) along += out[j] * u[j];
          for (int64_t j = 0; j < d; ++j) out[j] = (out[j] - along * u[j]) * inverse_norm / scale;
        }
      }
    });
  });
  return {grad_z, grad_v};
}

// Radial run x <- x + beta_k h (x - z0_k), h = 1/(alpha_k + |x - z0_k|).
// Returns (x, logdet, inputs (K,N,d)).
std::vector<at::Tensor> radial_forward(at::Tensor z, at::Tensor z0, at::Tensor alpha, at::Tensor beta) {
  z = z.contiguous(); z0 = z0.contiguous(); alpha = alpha.contiguous(); beta = beta.contiguous();
  const int64_t n = z.size(0), d = z.size(1), k = z0.size(0);
  auto x = at::empty_like(z);
  auto logdet = at::empty({n}, z.options());
  auto inputs = at::empty({k, n, d}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "radial_forward", [&] {
    const scalar_t *zp = z.data_ptr<scalar_t>(), *cp = z0.data_ptr<scalar_t>(), *alp = alpha.data_ptr<scalar_t>(),
                   *bep = beta.data_ptr<scalar_t>();
    scalar_t *xp = x.data_ptr<scalar_t>(), *lp = logdet.data_ptr<scalar_t>(), *ip = inputs.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> point(d);
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < d; ++j) point[j] = zp[i * d + j];
        scalar_t ld = 0;
        for (int64_t l = 0; l < k; ++l) {
          scalar_t r2 = 0;
          for (int64_t j = 0; j < d; ++j) {
            ip[(l * n + i) * d + j] = point[j];
            const scalar_t diff = point[j] - cp[l * d + j];
            r2 += diff * diff;
          }
          const scalar_t a = alp[l], be = bep[l], h = 1 / (a + std::sqrt(r2)), bh = be * h;
          for (int64_t j = 0; j < d; ++j) point[j] += bh * (point[j] - cp[l * d + j]);
          ld += (d - 1) * std::log1p(bh) + std::log1p(bh * a * h);
        }
        for (int64_t j = 0; j < d; ++j) xp[i * d + j] = point[j];
        lp[i] = ld;
      }
    });
  });
  return {x, logdet, inputs};
}

// Backward of radial_forward: (grad_z, grad_z0, grad_alpha, grad_beta).
std::vector<at::Tensor> radial_backward(at::Tensor grad_x, at::Tensor grad_logdet, at::Tensor inputs, at::Tensor z0,
                                        at::Tensor alpha, at::Tensor beta) {
  grad_x = grad_x.contiguous(); grad_logdet = grad_logdet.contiguous(); z0 = z0.contiguous();
  alpha = alpha.contiguous(); beta = beta.contiguous();
  const int64_t k = inputs.size(0), n = inputs.size(1), d = inputs.size(2);
  const int64_t width = k * (d + 2);  // per thread: grad_z0 (K,d), grad_alpha (K), grad_beta (K)
  const int64_t threads = at::get_num_threads();
  auto grad_z = at::empty_like(grad_x);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(grad_x.scalar_type(), "radial_backward", [&] {
    std::vector<scalar_t> partial(threads * width, 0);
    const scalar_t *gx = grad_x.data_ptr<scalar_t>(), *gl = grad_logdet.data_ptr<scalar_t>(),
                   *ip = inputs.data_ptr<scalar_t>(), *cp = z0.data_ptr<scalar_t>(),
                   *alp = alpha.data_ptr<scalar_t>(), *bep = beta.data_ptr<scalar_t>();
    scalar_t* gz = grad_z.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      scalar_t* acc = partial.data() + at::get_thread_num() * width;
      scalar_t *gc = acc, *ga = acc + k * d, *gb = acc + k * d + k;
      std::vector<scalar_t> g(d), delta(d);
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < d; ++j) g[j] = gx[i * d + j];
        const scalar_t lam = gl[i];
        for (int64_t l = k - 1; l >= 0; --l) {
          scalar_t r2 = 0, gamma = 0;
          for (int64_t j = 0; j < d; ++j) {
            delta[j] = ip[(l * n + i) * d + j] - cp[l * d + j];
            r2 += delta[j] * delta[j];
            gamma += g[j] * delta[j];
          }
          const scalar_t r = std::sqrt(r2), a = alp[l], be = bep[l], h = 1 / (a + r), bh = be * h;
          const scalar_t one_bh = 1 + bh, one_abh2 = 1 + bh * a * h;
          const scalar_t dl_dh = lam * ((d - 1) * be / one_bh + 2 * a * bh / one_abh2);
          const scalar_t dl_db = lam * ((d - 1) * h / one_bh + a * h * h / one_abh2);
          const scalar_t dl_da = lam * (bh * h / one_abh2);
          const scalar_t m = r > 0 ? -h * h / r : 0;
          const scalar_t coef = m * dl_dh + m * be * gamma;
          for (int64_t j = 0; j < d; ++j) {
            gc[l * d + j] -= bh * g[j] + coef * delta[j];
            g[j] = one_bh * g[j] + coef * delta[j];
          }
          ga[l] += dl_da - h * h * (be * gamma + dl_dh);
          gb[l] += h * gamma + dl_db;
        }
        for (int64_t j = 0; j < d; ++j) gz[i * d + j] = g[j];
      }
    });
    auto total = reduce<scalar_t>(partial, threads, width, grad_x);
    out = {grad_z, total.narrow(0, 0, k * d).view({k, d}), total.narrow(0, k * d, k), total.narrow(0, k * d + k, k)};
  });
  return out;
}

// Each ensemble member's random draws from its own generator, in one call instead of M (a training step
// draws them for every member): out (M, ...) with out[m] what torch.randn(out[m].shape, generator=
// generators[m]) (normal_members), or torch.randint(0, high, out[m].shape, generator=generators[m])
// (randint_members), draws: the same ATen call on a contiguous block of the same size, so the same bits.
void check_members(const at::Tensor& out, const std::vector<at::Generator>& generators, const char* name) {
  TORCH_CHECK(out.is_contiguous() && out.dim() >= 1 && out.size(0) == static_cast<int64_t>(generators.size()),
              name, ": out must be contiguous with one row per generator");
}

// Runs draw(m) for every member: in parallel where every member has a generator of its own (each guarded by
// its own lock, so the order of the members does not matter), in member order where one is shared.
template <typename F>
void for_members(const std::vector<at::Generator>& generators, const F& draw) {
  const int64_t count = static_cast<int64_t>(generators.size());
  bool distinct = true;
  for (int64_t i = 0; i < count && distinct; ++i)
    for (int64_t j = 0; j < i && distinct; ++j) distinct = !(generators[i] == generators[j]);
  if (!distinct) {
    for (int64_t m = 0; m < count; ++m) draw(m);
    return;
  }
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) draw(m);
  });
}

void normal_members(at::Tensor out, const std::vector<at::Generator>& generators) {
  check_members(out, generators, "normal_members");
  for_members(generators, [&](int64_t m) { out.select(0, m).normal_(0, 1, generators[m]); });
}

void randint_members(at::Tensor out, int64_t high, const std::vector<at::Generator>& generators) {
  check_members(out, generators, "randint_members");
  TORCH_CHECK(out.scalar_type() == at::kLong && high > 0, "randint_members: int64 out and high > 0");
  for_members(generators, [&](int64_t m) { out.select(0, m).random_(0, high, generators[m]); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("planar_forward", &planar_forward, "planar run, forward");
  m.def("planar_backward", &planar_backward, "planar run, backward");
  m.def("vector_bytes", &vector_bytes, "vector width of the planar and Sylvester kernels (bytes)");
  m.def("sylvester_newton", &sylvester_newton, "tanh Sylvester layer inverse, back-substitution");
  m.def("sylvester_linear", &sylvester_linear, "Sylvester layer Jacobian solve, back-substitution");
  m.def("reflections_forward", &reflections_forward, "per-point Householder reflections of raw vectors, forward");
  m.def("reflections_backward", &reflections_backward, "per-point Householder reflections, backward");
  m.def("radial_forward", &radial_forward, "radial run, forward");
  m.def("radial_backward", &radial_backward, "radial run, backward");
  m.def("normal_members", &normal_members, "standard normal noise per ensemble member, one generator each");
  m.def("randint_members", &randint_members, "random indices per ensemble member, one generator each");
}
