// Fused CPU kernels for shared-parameter planar and radial runs: the forward of all K layers and its
// analytic backward in one call each (flowprobe/layers/native.py builds and loads this file).
//
// Points are independent, so each call walks the K layers point by point in parallel; parameter
// gradients are summed per thread and reduced at the end. The formulas are those of the Python
// kernels (_PlanarRun, _RadialRun in planar.py / radial.py), which the tests compare with these.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
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

}  // namespace

// Planar run x <- x + u_k h(w_k.x + b_k), k = 0..K-1. Returns (x, logdet, inputs (K,N,d), pre (K,N)).
std::vector<at::Tensor> planar_forward(at::Tensor z, at::Tensor u, at::Tensor w, at::Tensor b, at::Tensor wu,
                                       int64_t act) {
  z = z.contiguous(); u = u.contiguous(); w = w.contiguous(); b = b.contiguous(); wu = wu.contiguous();
  const int64_t n = z.size(0), d = z.size(1), k = u.size(0);
  auto x = at::empty_like(z);
  auto logdet = at::empty({n}, z.options());
  auto inputs = at::empty({k, n, d}, z.options());
  auto pre = at::empty({k, n}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "planar_forward", [&] {
    const scalar_t *zp = z.data_ptr<scalar_t>(), *up = u.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(),
                   *bp = b.data_ptr<scalar_t>(), *ap = wu.data_ptr<scalar_t>();
    scalar_t *xp = x.data_ptr<scalar_t>(), *lp = logdet.data_ptr<scalar_t>(), *ip = inputs.data_ptr<scalar_t>(),
             *pp = pre.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> point(d);
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < d; ++j) point[j] = zp[i * d + j];
        scalar_t ld = 0;
        for (int64_t l = 0; l < k; ++l) {
          scalar_t s = bp[l];
          for (int64_t j = 0; j < d; ++j) {
            ip[(l * n + i) * d + j] = point[j];
            s += wp[l * d + j] * point[j];
          }
          pp[l * n + i] = s;
          scalar_t h, d1, d2;
          activate<scalar_t>(static_cast<int>(act), s, h, d1, d2);
          for (int64_t j = 0; j < d; ++j) point[j] += up[l * d + j] * h;
          ld += std::log1p(ap[l] * d1);
        }
        for (int64_t j = 0; j < d; ++j) xp[i * d + j] = point[j];
        lp[i] = ld;
      }
    });
  });
  return {x, logdet, inputs, pre};
}

// Backward of planar_forward: (grad_z, grad_u, grad_w, grad_b, grad_wu).
std::vector<at::Tensor> planar_backward(at::Tensor grad_x, at::Tensor grad_logdet, at::Tensor inputs, at::Tensor pre,
                                        at::Tensor u, at::Tensor w, at::Tensor wu, int64_t act) {
  grad_x = grad_x.contiguous(); grad_logdet = grad_logdet.contiguous(); u = u.contiguous(); w = w.contiguous();
  wu = wu.contiguous();
  const int64_t k = inputs.size(0), n = inputs.size(1), d = inputs.size(2);
  const int64_t width = k * (2 * d + 2);  // per thread: grad_u (K,d), grad_w (K,d), grad_b (K), grad_wu (K)
  const int64_t threads = at::get_num_threads();
  auto grad_z = at::empty_like(grad_x);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(grad_x.scalar_type(), "planar_backward", [&] {
    std::vector<scalar_t> partial(threads * width, 0);
    const scalar_t *gx = grad_x.data_ptr<scalar_t>(), *gl = grad_logdet.data_ptr<scalar_t>(),
                   *ip = inputs.data_ptr<scalar_t>(), *pp = pre.data_ptr<scalar_t>(), *up = u.data_ptr<scalar_t>(),
                   *wp = w.data_ptr<scalar_t>(), *ap = wu.data_ptr<scalar_t>();
    scalar_t* gz = grad_z.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      scalar_t* acc = partial.data() + at::get_thread_num() * width;
      scalar_t *gu = acc, *gw = acc + k * d, *gb = acc + 2 * k * d, *ga = acc + 2 * k * d + k;
      std::vector<scalar_t> g(d);
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < d; ++j) g[j] = gx[i * d + j];
        const scalar_t lam = gl[i];
        for (int64_t l = k - 1; l >= 0; --l) {
          scalar_t h, d1, d2;
          activate<scalar_t>(static_cast<int>(act), pp[l * n + i], h, d1, d2);
          const scalar_t weight = lam / (1 + ap[l] * d1);
          scalar_t gu_dot = 0;
          for (int64_t j = 0; j < d; ++j) gu_dot += g[j] * up[l * d + j];
          const scalar_t d_pre = d1 * gu_dot + weight * ap[l] * d2;
          for (int64_t j = 0; j < d; ++j) {
            gu[l * d + j] += h * g[j];
            gw[l * d + j] += d_pre * ip[(l * n + i) * d + j];
          }
          gb[l] += d_pre;
          ga[l] += weight * d1;
          for (int64_t j = 0; j < d; ++j) g[j] += d_pre * wp[l * d + j];
        }
        for (int64_t j = 0; j < d; ++j) gz[i * d + j] = g[j];
      }
    });
    auto total = reduce<scalar_t>(partial, threads, width, grad_x);
    out = {grad_z, total.narrow(0, 0, k * d).view({k, d}), total.narrow(0, k * d, k * d).view({k, d}),
           total.narrow(0, 2 * k * d, k), total.narrow(0, 2 * k * d + k, k)};
  });
  return out;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("planar_forward", &planar_forward, "planar run, forward");
  m.def("planar_backward", &planar_backward, "planar run, backward");
  m.def("radial_forward", &radial_forward, "radial run, forward");
  m.def("radial_backward", &radial_backward, "radial run, backward");
}
