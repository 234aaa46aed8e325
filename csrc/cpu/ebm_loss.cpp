// The EBM loss (docs/conventions.md §6): deltakern::ebm_loss_forward / ebm_loss_backward.
//
// The device-independent part lives here as two drivers that loop over row chunks: each chunk's
// logits are computed with at::mm into one reusable [chunk, K] buffer and handed to a device
// row epilogue (CPU below, CUDA in csrc/cuda/ebm_loss.cu), so at most chunk x K logits exist at
// a time. The O(N) and O(N*D) work around the chunks (mask, edited cosine, per-row
// coefficients, the sparse target-column gradient, the normalisation's tangent projection) is
// plain ATen and runs on whichever device the tensors live on.
//
// Per row, with t the target column, s the edited cosine and e = max(s, reset) / tau:
//   lse   = LSE(l)                       lse_e = LSE(l with l_t := e) = logaddexp(lse_other, e)
//   delta = lse_e - lse                  ce    = lse - l_y  (or lse_e - l~_y on edited logits)
// lse_e is built from lse_other, the log-sum-exp of the columns other than t, so nothing is ever
// subtracted from a sum of exponentials.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "ebm_loss.h"
#include "row_reduce.h"
#include "rows.h"

namespace deltakern {
namespace loss {

namespace {

constexpr int64_t kMaskChunkRows = 4096;  // rows whose products are sorted at once

// Rows per chunk: about chunk_elements logits, but at least min_rows so the matmuls stay
// efficient when K is huge.
int64_t chunk_rows(int64_t n, int64_t k, int64_t chunk_elements, int64_t min_rows) {
  return std::max<int64_t>(1, std::min(n, std::max(min_rows, chunk_elements / k)));
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& labels, double inv_temp, double reset) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, op, ": x and w must be 2-D, got ", x.dim(), "-D and ",
              w.dim(), "-D");
  TORCH_CHECK(x.size(1) == w.size(1), op, ": x and w must have the same D, got ", x.size(1),
              " and ", w.size(1));
  TORCH_CHECK(x.size(0) > 0 && w.size(0) > 0 && x.size(1) > 0, op, ": empty x or w, got x ",
              x.sizes(), " and w ", w.sizes());
  for (const at::Tensor* t : {&x, &w}) {
    const at::ScalarType st = t->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                ": x and w must be float16, bfloat16, float32 or float64, got ", st);
  }
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), op,
              ": labels must have shape [N] = [", x.size(0), "], got ", labels.sizes());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), op,
              ": labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK(x.device() == w.device() && x.device() == labels.device(), op,
              ": x, w and labels must be on one device, got ", x.device(), ", ", w.device(),
              " and ", labels.device());
  // Logits are |x_hat . w_hat| * inv_temp <= inv_temp when normalising; with half of the
  // accumulation dtype's range as the bound, the logits, their base-2 form and their
  // log-sum-exp stay finite. 1/temperature past that (temperature below ~6e-39 in float32)
  // would turn every logit into inf and every result into NaN.
  const double limit = accumulation_type(x, w) == at::kDouble
                           ? std::numeric_limits<double>::max() / 2
                           : static_cast<double>(std::numeric_limits<float>::max()) / 2;
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0 && inv_temp <= limit, op,
              ": inv_temp (1/temperature) must be finite, > 0 and at most ", limit,
              " (logits would overflow ", accumulation_type(x, w), "), got ", inv_temp);
  TORCH_CHECK(std::isfinite(reset), op, ": reset must be finite, got ", reset);
}

// A per-row tensor of the backward: shape [N], on x's device, of the expected kind.
void check_row_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                      bool integral) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), op, ": ", name, " must have shape [N] = [",
              x.size(0), "], got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ",
              t.device());
  TORCH_CHECK(integral ? at::isIntegralType(t.scalar_type(), false)
                       : at::isFloatingType(t.scalar_type()),
              op, ": ", name, " must be ", integral ? "an integer" : "a floating-point",
              " tensor, got ", t.scalar_type());
}

// Every entry of `index` in [0, K): one reduction and one small device-to-host copy.
void check_index_range(const char* op, const char* name, const at::Tensor& index, int64_t K) {
  const auto [lo, hi] = at::aminmax(index);
  const at::Tensor bounds = at::stack({lo.to(at::kLong), hi.to(at::kLong)}).cpu();
  const int64_t* b = bounds.data_ptr<int64_t>();
  TORCH_CHECK(b[0] >= 0 && b[1] < K, op, ": ", name, " must lie in [0, K) = [0, ", K,
              "), got values in [", b[0], ", ", b[1], "]");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
forward_driver(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
               double inv_temp, double reset, int64_t mask_count, bool target_pred,
               bool ce_edited, bool normalize, int64_t chunk_elements,
               int64_t min_rows, const ForwardRows& rows_fn) {
  check_inputs("ebm_loss_forward", x, w, labels, inv_temp, reset);
  const int64_t N = x.size(0), K = w.size(0), D = x.size(1);
  TORCH_CHECK(mask_count >= 1 && mask_count <= D,
              "ebm_loss_forward: mask_count must be in [1, D] = [1, ", D, "], got ", mask_count);
  // float32 products on every device: on CUDA at::mm would otherwise follow the global TF32
  // switch (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision), a setting
  // made for something else, and the loss would move by ~1e-3.
  const at::NoTF32Guard no_tf32;
  const at::ScalarType acc = accumulation_type(x, w);
  const at::Tensor x_hat = prepare_rows(x, acc, normalize);
  const at::Tensor w_hat = prepare_rows(w, acc, normalize);
  // 1/tau is folded into the (small) class matrix once, so the epilogue reads final logits.
  const at::Tensor w_scaled = (w_hat * inv_temp).contiguous();
  const at::Tensor y = labels.to(at::kLong).contiguous();

  auto opts = x_hat.options();
  at::Tensor target = at::empty({N}, opts.dtype(at::kLong));
  at::Tensor lse = at::empty({N}, opts);
  at::Tensor lse_other = at::empty({N}, opts);
  at::Tensor label_logit = at::empty({N}, opts);
  at::Tensor status = at::zeros({1}, opts.dtype(at::kInt));

  const int64_t chunk = chunk_rows(N, K, chunk_elements, min_rows);
  at::Tensor buffer = at::empty({chunk, K}, opts);
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t rows = std::min(chunk, N - start);
    at::Tensor logits = buffer.narrow(0, 0, rows);
    at::mm_out(logits, x_hat.narrow(0, start, rows), w_scaled.t());
    rows_fn(logits, y.narrow(0, start, rows), target_pred, target.narrow(0, start, rows),
            lse.narrow(0, start, rows), lse_other.narrow(0, start, rows),
            label_logit.narrow(0, start, rows), status);
  }
  buffer.reset();
  // Rows the epilogue could not compute (it never reads outside a row): one check for all.
  const int bad = status.item<int>();
  if (bad & kBadLabel) check_index_range("ebm_loss_forward", "labels", y, K);
  if (bad & kNonFiniteRow) {
    const at::Tensor rows_bad = at::nonzero(~at::isfinite(lse)).flatten();
    const int64_t row = rows_bad.numel() > 0 ? rows_bad[0].item<int64_t>() : -1;
    TORCH_CHECK(false, "ebm_loss_forward: row ", row, " has non-finite logits (NaN or infinity in ",
                "x or w, or x.w * inv_temp overflows ", acc, ")");
  }

  // Mask: false on the mask_count largest products (a stable descending sort keeps the lower
  // dimension first among equal products), true elsewhere; then the edited cosine.
  at::Tensor keep = at::empty({N, D}, opts.dtype(at::kBool));
  at::Tensor edited = at::empty({N}, opts);
  for (int64_t start = 0; start < N; start += kMaskChunkRows) {
    const int64_t rows = std::min(kMaskChunkRows, N - start);
    const at::Tensor t = target.narrow(0, start, rows);
    const at::Tensor product = x_hat.narrow(0, start, rows) * w_hat.index_select(0, t);
    const at::Tensor order = std::get<1>(at::sort(product, /*stable=*/true, /*dim=*/1,
                                                  /*descending=*/true));
    at::Tensor keep_rows = keep.narrow(0, start, rows);
    keep_rows.fill_(true);
    keep_rows.scatter_(1, order.narrow(1, 0, mask_count), false);
    at::Tensor edited_rows = edited.narrow(0, start, rows);
    at::sum_out(edited_rows, product * keep_rows, {1});
  }

  const at::Tensor edited_logit = at::clamp_min(edited, reset) * inv_temp;
  const at::Tensor lse_edited = at::logaddexp(lse_other, edited_logit);
  at::Tensor delta = lse_edited - lse;
  at::Tensor ce = ce_edited
                      ? lse_edited - at::where(y == target, edited_logit, label_logit)
                      : lse - label_logit;
  return {ce, delta, lse, lse_other, target, edited, keep};
}

std::tuple<at::Tensor, at::Tensor> backward_driver(
    const at::Tensor& grad_ce, const at::Tensor& grad_delta, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& labels, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& lse_other, const at::Tensor& edited,
    const at::Tensor& keep, double inv_temp, double reset, bool ce_edited, bool normalize,
    bool needs_x, bool needs_w, int64_t chunk_elements, int64_t min_rows,
    const BackwardRows& rows_fn) {
  const char* op = "ebm_loss_backward";
  check_inputs(op, x, w, labels, inv_temp, reset);
  const int64_t N = x.size(0), K = w.size(0), D = x.size(1);
  TORCH_CHECK(keep.sizes() == x.sizes() && keep.scalar_type() == at::kBool &&
                  keep.device() == x.device(),
              op, ": keep must be a bool tensor of x's shape ", x.sizes(), " on ", x.device(),
              ", got ", keep.scalar_type(), " ", keep.sizes(), " on ", keep.device());
  check_row_tensor(op, "grad_ce", grad_ce, x, false);
  check_row_tensor(op, "grad_delta", grad_delta, x, false);
  check_row_tensor(op, "target", target, x, true);
  check_row_tensor(op, "lse", lse, x, false);
  check_row_tensor(op, "lse_other", lse_other, x, false);
  check_row_tensor(op, "edited", edited, x, false);
  // The row epilogue reads columns t and y of every row and index_select reads row t of w.
  check_index_range(op, "labels", labels, K);
  check_index_range(op, "target", target, K);
  const at::NoTF32Guard no_tf32;  // as in the forward
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, w.options());
  if (!needs_x && !needs_w) return {grad_x, grad_w};

  const at::ScalarType acc = accumulation_type(x, w);
  const at::Tensor x_hat = prepare_rows(x, acc, normalize);
  const at::Tensor w_hat = prepare_rows(w, acc, normalize);
  const at::Tensor w_scaled = (w_hat * inv_temp).contiguous();
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const at::Tensor t = target.to(at::kLong).contiguous();
  const at::Tensor g_ce = grad_ce.to(acc).contiguous();
  const at::Tensor g_delta = grad_delta.to(acc).contiguous();
  const at::Tensor row_lse = lse.to(acc).contiguous();
  const at::Tensor s = edited.to(acc);

  // Per-row coefficients. The row's loss is a*LSE(l) + b*LSE(l~) minus the label logit
  // (l_y, or the edited logit when the CE is on edited logits and y == t).
  const at::Tensor edited_logit = at::clamp_min(s, reset) * inv_temp;
  const at::Tensor lse_edited = at::logaddexp(lse_other.to(acc), edited_logit).contiguous();
  const at::Tensor label_is_edited =
      ce_edited ? (y == t) : at::zeros({N}, y.options().dtype(at::kBool));
  const at::Tensor coef_a = (ce_edited ? -g_delta : g_ce - g_delta).contiguous();
  const at::Tensor coef_b = (ce_edited ? g_ce + g_delta : g_delta).contiguous();
  const at::Tensor label_grad = at::where(label_is_edited, at::zeros_like(g_ce), g_ce).contiguous();
  // d loss / d s: through l~_t = max(s, reset) * inv_temp (clamp_min passes the gradient at
  // s == reset, as autograd's clamp does).
  const at::Tensor grad_edited =
      (coef_b * at::exp(edited_logit - lse_edited) - at::where(label_is_edited, g_ce, 0.0)) *
      inv_temp * (s >= reset).to(acc);

  at::Tensor grad_x_hat = needs_x ? at::empty({N, D}, x_hat.options()) : at::Tensor();
  at::Tensor grad_w_hat = needs_w ? at::zeros({K, D}, x_hat.options()) : at::Tensor();
  const int64_t chunk = chunk_rows(N, K, chunk_elements, min_rows);
  at::Tensor buffer = at::empty({chunk, K}, x_hat.options());
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t rows = std::min(chunk, N - start);
    at::Tensor dlogits = buffer.narrow(0, 0, rows);
    const at::Tensor x_rows = x_hat.narrow(0, start, rows);
    at::mm_out(dlogits, x_rows, w_scaled.t());
    // logits -> d loss / d logits, in place in the chunk buffer.
    rows_fn(dlogits, t.narrow(0, start, rows), y.narrow(0, start, rows),
            row_lse.narrow(0, start, rows), lse_edited.narrow(0, start, rows),
            coef_a.narrow(0, start, rows), coef_b.narrow(0, start, rows),
            label_grad.narrow(0, start, rows));
    if (needs_x) {
      at::Tensor grad_rows = grad_x_hat.narrow(0, start, rows);
      at::mm_out(grad_rows, dlogits, w_scaled);
    }
    if (needs_w) grad_w_hat.addmm_(dlogits.t(), x_rows);
  }
  buffer.reset();

  // The sparse target-column term: s = sum_d keep_d x_hat_d w_hat_{t,d}.
  const at::Tensor sparse = grad_edited.unsqueeze(1) * keep.to(acc);
  if (needs_x) grad_x_hat.add_(sparse * w_hat.index_select(0, t));
  if (needs_w) {
    grad_w_hat.mul_(inv_temp);
    grad_w_hat.index_add_(0, t, sparse * x_hat);
  }

  // Through the normalisation v_hat = v / |v|: grad_v = (g - v_hat (v_hat . g)) / |v|.
  auto project = [&](const at::Tensor& g, const at::Tensor& v_hat, const at::Tensor& v) {
    if (!normalize) return g;
    const at::Tensor norm = at::linalg_vector_norm(v.to(acc), 2, {1}, /*keepdim=*/true);
    return (g - v_hat * (v_hat * g).sum(1, /*keepdim=*/true)) / norm;
  };
  if (needs_x) grad_x = project(grad_x_hat, x_hat, x).to(x.scalar_type());
  if (needs_w) grad_w = project(grad_w_hat, w_hat, w).to(w.scalar_type());
  return {grad_x, grad_w};
}

namespace host {
namespace {

// Large enough that the three matmuls per chunk run at full speed (a few hundred rows at
// K = 20000); the epilogues are memory-bound either way.
constexpr int64_t kChunkElements = int64_t{1} << 23;  // 32 MB of float logits per chunk
constexpr int64_t kMinChunkRows = 256;
constexpr int64_t kBlock = 64;
constexpr float kInfF = std::numeric_limits<float>::infinity();

// Largest value of row[begin:end) (-inf when empty).
__attribute__((target_clones("avx512f", "avx2", "default")))
float range_max_f32(const float* row, int64_t begin, int64_t end) {
  float m = -kInfF;
#pragma omp simd reduction(max : m)
  for (int64_t k = begin; k < end; ++k) m = row[k] > m ? row[k] : m;
  return m;
}

// Sum of exp(row[k] - shift) over [begin, end) with shift >= every row[k]; float blocks of 64
// summed with vector instructions, blocks added in double.
__attribute__((target_clones("avx512f", "avx2", "default")))
double range_sum_exp_f32(const float* row, int64_t begin, int64_t end, float shift) {
  double sum = 0.0;
  int64_t k = begin;
  for (; k + kBlock <= end; k += kBlock) {
    float block = 0.0f;
#pragma omp simd reduction(+ : block)
    for (int64_t j = k; j < k + kBlock; ++j) block += deltakern::cpu::exp_nonpositive(row[j] - shift);
    sum += block;
  }
  for (; k < end; ++k) sum += deltakern::cpu::exp_nonpositive(row[k] - shift);
  return sum;
}

double range_max_f64(const double* row, int64_t begin, int64_t end) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t k = begin; k < end; ++k) m = std::max(m, row[k]);
  return m;
}

double range_sum_exp_f64(const double* row, int64_t begin, int64_t end, double shift) {
  double sum = 0.0;
  for (int64_t k = begin; k < end; ++k) sum += std::exp(row[k] - shift);
  return sum;
}

float range_max(const float* r, int64_t b, int64_t e) { return range_max_f32(r, b, e); }
double range_max(const double* r, int64_t b, int64_t e) { return range_max_f64(r, b, e); }
double range_sum_exp(const float* r, int64_t b, int64_t e, float s) {
  return range_sum_exp_f32(r, b, e, s);
}
double range_sum_exp(const double* r, int64_t b, int64_t e, double s) {
  return range_sum_exp_f64(r, b, e, s);
}

double logaddexp(double a, double b) {
  const double hi = std::max(a, b), lo = std::min(a, b);
  if (lo == -std::numeric_limits<double>::infinity()) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

// One row of logits -> target column, LSE of the row, LSE of the row without column t, and the
// label's logit. The maximum over the other columns is found separately so that their sum
// keeps its digits even when l_t dominates the row by more than float's exponent range.
template <typename T>
int forward_row(const T* row, int64_t K, int64_t label, bool target_pred, int64_t& target,
                T& lse, T& lse_other, T& label_logit) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  int status = 0;
  const bool label_ok = label >= 0 && label < K;
  if (!label_ok) status |= kBadLabel;
  label_logit = label_ok ? row[label] : nan;
  const T row_max = range_max(row, 0, K);  // NaN entries never win a comparison
  if (!std::isfinite(row_max)) {  // all NaN or -inf, or +inf: nothing below is meaningful
    target = target_pred || !label_ok ? 0 : label;
    lse = lse_other = nan;
    return status | kNonFiniteRow;
  }
  int64_t t = label_ok ? label : 0;
  if (target_pred) {
    t = 0;
    while (row[t] != row_max) ++t;  // first maximum (ties to the lower class); row_max is an entry
  }
  const T logit_t = row[t];
  const T other_max =
      logit_t < row_max ? row_max : std::max(range_max(row, 0, t), range_max(row, t + 1, K));
  double other = -std::numeric_limits<double>::infinity();
  if (K > 1) {
    const double sum = range_sum_exp(row, 0, t, other_max) + range_sum_exp(row, t + 1, K, other_max);
    other = static_cast<double>(other_max) + std::log(sum);
  }
  target = t;
  lse_other = static_cast<T>(other);
  lse = static_cast<T>(logaddexp(other, static_cast<double>(logit_t)));
  if (std::isnan(lse) || std::isnan(lse_other)) status |= kNonFiniteRow;  // a NaN among the rest
  return status;
}

template <typename T>
void forward_rows_typed(const at::Tensor& logits, const at::Tensor& labels, bool target_pred,
                        const at::Tensor& target, const at::Tensor& lse,
                        const at::Tensor& lse_other, const at::Tensor& label_logit,
                        const at::Tensor& status) {
  const int64_t rows = logits.size(0), K = logits.size(1);
  const T* lg = logits.data_ptr<T>();
  const int64_t* y = labels.data_ptr<int64_t>();
  int64_t* t = target.data_ptr<int64_t>();
  T* lse_p = lse.data_ptr<T>();
  T* other_p = lse_other.data_ptr<T>();
  T* label_p = label_logit.data_ptr<T>();
  int* status_p = status.data_ptr<int>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    int bad = 0;
    for (int64_t r = begin; r < end; ++r)
      bad |= forward_row(lg + r * K, K, y[r], target_pred, t[r], lse_p[r], other_p[r], label_p[r]);
    if (bad) __atomic_fetch_or(status_p, bad, __ATOMIC_RELAXED);
  });
}

void forward_rows_cpu(const at::Tensor& logits, const at::Tensor& labels, bool target_pred,
                      const at::Tensor& target, const at::Tensor& lse,
                      const at::Tensor& lse_other, const at::Tensor& label_logit,
                      const at::Tensor& status) {
  if (logits.scalar_type() == at::kDouble)
    forward_rows_typed<double>(logits, labels, target_pred, target, lse, lse_other, label_logit,
                               status);
  else
    forward_rows_typed<float>(logits, labels, target_pred, target, lse, lse_other, label_logit,
                              status);
}

// coef * exp(v) for v <= 0 (up to rounding) without denormal results: the coefficient is
// folded into the exponent as log|coef|, and terms below float's normal range become 0.
// (Denormal products of tiny probabilities and a 1/N coefficient run ~100x slower.) The
// range reduction of exp_nonpositive is exact for positive arguments too, up to float's
// exponent range, so coefficients above 1 are fine.
inline __attribute__((always_inline)) float scaled_exp(float v, float log_coef, float sign) {
  const float arg = std::min(std::min(v, 0.0f) + log_coef, 88.0f);
  return arg < -87.0f ? 0.0f : sign * deltakern::cpu::exp_nonpositive(arg);
}

// One row of logits -> d loss / d logits in place:
//   g_k = a softmax(l)_k + b softmax(l~)_k [k != t] - label_grad [k == y].
// Column t of l~ holds the edited logit, which does not depend on l_t, hence the fix-up.
__attribute__((target_clones("avx512f", "avx2", "default")))
void grad_row_f32(float* row, int64_t K, int64_t t, int64_t y, float lse, float lse_edited,
                  float a, float b, float label_grad) {
  const float logit_t = row[t];
  const float log_a = std::log(std::abs(a)), sign_a = a < 0.0f ? -1.0f : 1.0f;
  const float log_b = std::log(std::abs(b)), sign_b = b < 0.0f ? -1.0f : 1.0f;
  // One loop for every (a, b): a zero coefficient gives log 0 = -inf and its term is 0.
#pragma omp simd
  for (int64_t k = 0; k < K; ++k)
    row[k] = scaled_exp(row[k] - lse, log_a, sign_a) +
             scaled_exp(row[k] - lse_edited, log_b, sign_b);
  row[t] = a * std::exp(std::min(logit_t - lse, 0.0f));
  row[y] -= label_grad;
}

void grad_row_f64(double* row, int64_t K, int64_t t, int64_t y, double lse, double lse_edited,
                  double a, double b, double label_grad) {
  const double logit_t = row[t];
  for (int64_t k = 0; k < K; ++k)
    row[k] = a * std::exp(row[k] - lse) + b * std::exp(std::min(row[k] - lse_edited, 0.0));
  row[t] = a * std::exp(logit_t - lse);
  row[y] -= label_grad;
}

void grad_row(float* row, int64_t K, int64_t t, int64_t y, float lse, float lse_e, float a,
              float b, float g) {
  grad_row_f32(row, K, t, y, lse, lse_e, a, b, g);
}
void grad_row(double* row, int64_t K, int64_t t, int64_t y, double lse, double lse_e, double a,
              double b, double g) {
  grad_row_f64(row, K, t, y, lse, lse_e, a, b, g);
}

template <typename T>
void backward_rows_typed(const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& labels, const at::Tensor& lse,
                         const at::Tensor& lse_edited, const at::Tensor& coef_a,
                         const at::Tensor& coef_b, const at::Tensor& label_grad) {
  const int64_t rows = logits.size(0), K = logits.size(1);
  T* lg = logits.data_ptr<T>();
  const int64_t* t = target.data_ptr<int64_t>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const T* lse_p = lse.data_ptr<T>();
  const T* lse_e = lse_edited.data_ptr<T>();
  const T* a = coef_a.data_ptr<T>();
  const T* b = coef_b.data_ptr<T>();
  const T* g = label_grad.data_ptr<T>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      grad_row(lg + r * K, K, t[r], y[r], lse_p[r], lse_e[r], a[r], b[r], g[r]);
  });
}

void backward_rows_cpu(const at::Tensor& logits, const at::Tensor& target,
                       const at::Tensor& labels, const at::Tensor& lse,
                       const at::Tensor& lse_edited, const at::Tensor& coef_a,
                       const at::Tensor& coef_b, const at::Tensor& label_grad) {
  if (logits.scalar_type() == at::kDouble)
    backward_rows_typed<double>(logits, target, labels, lse, lse_edited, coef_a, coef_b,
                                label_grad);
  else
    backward_rows_typed<float>(logits, target, labels, lse, lse_edited, coef_a, coef_b,
                               label_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ebm_loss_forward_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                     double inv_temp, double reset, int64_t mask_count, bool target_pred,
                     bool ce_edited, bool normalize) {
  TORCH_CHECK(x.device().is_cpu(), "ebm_loss_forward: expected CPU tensors");
  return forward_driver(x, w, labels, inv_temp, reset, mask_count, target_pred, ce_edited,
                        normalize, kChunkElements, kMinChunkRows, forward_rows_cpu);
}

std::tuple<at::Tensor, at::Tensor> ebm_loss_backward_cpu(
    const at::Tensor& grad_ce, const at::Tensor& grad_delta, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& labels, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& lse_other, const at::Tensor& edited,
    const at::Tensor& keep, double inv_temp, double reset, bool ce_edited, bool normalize,
    bool needs_x, bool needs_w) {
  TORCH_CHECK(x.device().is_cpu(), "ebm_loss_backward: expected CPU tensors");
  return backward_driver(grad_ce, grad_delta, x, w, labels, target, lse, lse_other, edited, keep,
                         inv_temp, reset, ce_edited, normalize, needs_x, needs_w, kChunkElements, kMinChunkRows,
                         backward_rows_cpu);
}

}  // namespace
}  // namespace host
}  // namespace loss
}  // namespace deltakern

TORCH_LIBRARY_IMPL(deltakern, CPU, m) {
  m.impl("ebm_loss_forward", &deltakern::loss::host::ebm_loss_forward_cpu);
  m.impl("ebm_loss_backward", &deltakern::loss::host::ebm_loss_backward_cpu);
}
