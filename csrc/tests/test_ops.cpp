// C++-level checks of the registered ops, called through the dispatcher exactly as Python
// does: the fused CPU scoring state against a direct computation on the full logits.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

using StateFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                double, int64_t, bool, bool);

c10::TypedOperatorHandle<StateFn> state_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("deltakern::fused_score_state", "")
      .typed<StateFn>();
}

// Rows of x scaled by x_scale (every other row) and of w by w_scale (every third row) before the
// op sees them in `dtype`: the reference uses the same rounded values, scaled back in double.
void check_state(int64_t n, int64_t k, int64_t d, int64_t c, double inv_temp,
                 at::ScalarType dtype = at::kFloat, double x_scale = 1.0, double w_scale = 1.0) {
  at::manual_seed(n * 131 + k);
  at::Tensor x = at::randn({n, d}, at::kDouble);
  at::Tensor w = at::randn({k, d}, at::kDouble);
  x.slice(0, 0, n, 2).mul_(x_scale);
  w.slice(0, 1, k, 3).mul_(w_scale);
  const at::Tensor x_in = x.to(dtype), w_in = w.to(dtype);
  x = x_in.to(at::kDouble);
  w = w_in.to(at::kDouble);
  auto [values, indices, outside] = state_op().call(x_in, w_in, inv_temp, c, true, false);
  const double tol = (dtype == at::kHalf || dtype == at::kBFloat16) ? 2e-3 : 1e-4;

  // Largest magnitude first: the float64 sum of squares of a row at 1e-200 would underflow.
  x = x / x.abs().amax({1}, true);
  w = w / w.abs().amax({1}, true);
  at::Tensor xn = x / x.norm(2, {1}, true);
  at::Tensor wn = w / w.norm(2, {1}, true);
  at::Tensor logits = at::mm(xn, wn.t()) * inv_temp;
  auto sorted = at::sort(logits, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  at::Tensor want_values = std::get<0>(sorted).narrow(1, 0, c);
  at::Tensor want_indices = std::get<1>(sorted).narrow(1, 0, c);
  at::Tensor rest = logits.scatter(1, want_indices, -std::numeric_limits<double>::infinity());
  at::Tensor want_outside = at::logsumexp(rest, {1});

  expect(at::allclose(values.to(at::kDouble), want_values, tol, tol), "top-c values");
  expect(dtype != at::kFloat || at::equal(indices, want_indices), "top-c indices");
  if (c < k) {
    expect(at::allclose(outside.to(at::kDouble), want_outside, tol, tol), "outside log-sum-exp");
  } else {
    expect(at::all(at::isinf(outside)).item<bool>(), "outside is -inf when c == K");
  }
}

// A bad argument is refused with an error message that names it.
void check_refused(const at::Tensor& x, const at::Tensor& w, double inv_temp, int64_t c,
                   const char* message) {
  try {
    state_op().call(x, w, inv_temp, c, true, false);
    expect(false, message);
  } catch (const c10::Error& e) {
    const bool named = std::string(e.what()).find(message) != std::string::npos;
    if (!named) std::fprintf(stderr, "unexpected message: %s\n", e.what());
    expect(named, message);
  }
}

}  // namespace

int main() {
  check_state(1, 1, 3, 1, 100.0);
  check_state(7, 3, 65, 3, 100.0);
  check_state(257, 1001, 64, 5, 100.0);
  check_state(300, 70, 16, 2, 1.0);
  // Tiny and huge rows as given: float32 norms would underflow or overflow without care.
  check_state(300, 70, 24, 2, 100.0, at::kFloat, 1e-30, 1e-23);
  check_state(300, 70, 24, 2, 100.0, at::kFloat, 1e35, 1.0);
  check_state(300, 70, 24, 2, 100.0, at::kDouble, 1e-300, 1e200);
  // Half inputs (native half GEMM or float32 conversion, whichever this CPU uses).
  check_state(257, 1001, 64, 5, 100.0, at::kBFloat16);
  check_state(257, 130, 64, 2, 100.0, at::kHalf);
  check_state(300, 70, 24, 2, 100.0, at::kBFloat16, 1e-30, 1e30);

  const at::Tensor x = at::randn({4, 8}), w = at::randn({3, 8});
  check_refused(x, w, 100.0, 4, "c must satisfy 1 <= c <= K = 3");
  check_refused(x, w, 0.0, 1, "inv_temp must be finite and > 0");
  check_refused(x, at::randn({3, 7}), 100.0, 1, "x and w must have the same D");
  check_refused(x.to(at::kInt), w, 100.0, 1, "x must be float16, bfloat16, float32 or float64");
  check_refused(at::zeros({4, 8}), w, 100.0, 1, "row 0 of x is zero");
  at::Tensor nan_row = x.clone();
  nan_row[2][1] = std::numeric_limits<float>::quiet_NaN();
  check_refused(nan_row, w, 100.0, 1, "row 2 of x has a non-finite L2 norm");
  if (failures == 0) std::printf("deltakern C++ op tests: all passed\n");
  return failures == 0 ? 0 : 1;
}
