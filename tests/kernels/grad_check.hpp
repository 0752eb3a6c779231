// Helpers of the kernel tests: seeded random inputs and a central finite-difference check of
// an analytic gradient. The function under test is evaluated in float (the kernels' own
// precision) and its weighted output summed in double; `eps` and the tolerances are chosen per
// kernel for that.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace spill::test {

inline std::vector<float> random_vec(std::size_t n, std::uint64_t seed, float lo = -1.0f,
                                     float hi = 1.0f) {
  std::vector<float> v(n);
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x = lo + (hi - lo) * static_cast<float>((s >> 11) * (1.0 / 9007199254740992.0));
  }
  return v;
}

// sum(w * y) in double.
inline double weighted(const std::vector<float>& w, const float* y) {
  double s = 0;
  for (std::size_t i = 0; i < w.size(); ++i) s += double(w[i]) * y[i];
  return s;
}

struct GradTolerance {
  float eps = 1e-2f;
  double atol = 1e-3;
  double rtol = 1e-2;
  int samples = 24;
};

// Compares grad[i] with (loss(x + eps e_i) - loss(x - eps e_i)) / 2 eps for `samples` indices
// spread over x. `loss` must read x.
inline void expect_gradient(const std::string& what, std::vector<float>& x,
                            const std::vector<float>& grad, const std::function<double()>& loss,
                            GradTolerance tol = {}) {
  ASSERT_EQ(x.size(), grad.size()) << what;
  const std::size_t n = x.size();
  const int samples = static_cast<int>(std::min<std::size_t>(n, std::size_t(tol.samples)));
  int bad = 0;
  for (int k = 0; k < samples; ++k) {
    const std::size_t i = (std::size_t(k) * n) / std::size_t(samples) + (k * 7) % std::max<std::size_t>(1, n / samples);
    const float keep = x[i];
    x[i] = keep + tol.eps;
    const double up = loss();
    x[i] = keep - tol.eps;
    const double down = loss();
    x[i] = keep;
    const double numeric = (up - down) / (2.0 * double(tol.eps));
    const double diff = std::abs(numeric - grad[i]);
    if (diff > tol.atol + tol.rtol * std::abs(numeric) && bad++ < 5) {
      ADD_FAILURE() << what << "[" << i << "]: analytic " << grad[i] << ", numeric " << numeric;
    }
  }
}

}  // namespace spill::test
