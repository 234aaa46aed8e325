// C++-level checks of the registered ops, called through the dispatcher exactly as Python
// does: the fused CPU scoring state against a direct computation on the full logits.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
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
                                                                double, int64_t, bool);

void check_state(int64_t n, int64_t k, int64_t d, int64_t c, double inv_temp) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("deltakern::fused_score_state", "")
                .typed<StateFn>();
  at::manual_seed(n * 131 + k);
  at::Tensor x = at::randn({n, d}, at::kDouble);
  at::Tensor w = at::randn({k, d}, at::kDouble);
  auto [values, indices, outside] = op.call(x.to(at::kFloat), w.to(at::kFloat), inv_temp, c, true);

  at::Tensor xn = x / x.norm(2, {1}, true);
  at::Tensor wn = w / w.norm(2, {1}, true);
  at::Tensor logits = at::mm(xn, wn.t()) * inv_temp;
  auto sorted = at::sort(logits, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  at::Tensor want_values = std::get<0>(sorted).narrow(1, 0, c);
  at::Tensor want_indices = std::get<1>(sorted).narrow(1, 0, c);
  at::Tensor rest = logits.scatter(1, want_indices, -std::numeric_limits<double>::infinity());
  at::Tensor want_outside = at::logsumexp(rest, {1});

  expect(at::allclose(values.to(at::kDouble), want_values, 1e-5, 1e-4), "top-c values");
  expect(at::equal(indices, want_indices), "top-c indices");
  if (c < k) {
    expect(at::allclose(outside.to(at::kDouble), want_outside, 1e-5, 1e-4), "outside log-sum-exp");
  } else {
    expect(at::all(at::isinf(outside)).item<bool>(), "outside is -inf when c == K");
  }
}

}  // namespace

int main() {
  check_state(1, 1, 3, 1, 100.0);
  check_state(7, 3, 65, 3, 100.0);
  check_state(257, 1001, 64, 5, 100.0);
  check_state(300, 70, 16, 2, 1.0);
  if (failures == 0) std::printf("deltakern C++ op tests: all passed\n");
  return failures == 0 ? 0 : 1;
}
