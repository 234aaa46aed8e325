// The EBM loss (docs/conventions.md §6): deltakern::ebm_loss_forward / ebm_loss_backward.
//
// Two implementations share the O(N) and O(N*D) work around the logits (argument checks, mask
// and edited cosine, per-row backward coefficients), which is plain ATen:
// - the device-independent drivers (used by CUDA, csrc/cuda/ebm_loss.cu) loop over row chunks:
//   each chunk's logits are computed with at::mm into one reusable [chunk, K] buffer and handed
//   to a device row epilogue, so at most chunk x K logits exist at a time;
// - the CPU ops (csrc/cpu/ebm_loss_host.cpp) tile the logits by rows and classes inside one
//   parallel region, with single-threaded GEMMs per thread, a cache-sized tile, inv_temp applied
//   in the epilogue, and in the backward no [K, D] temporaries beyond the prepared W and grad_w.
// This file holds the shared pieces (ebm_loss_shared.h) and the drivers (ebm_loss.h).
//
// Per row, with t the target column, s the edited cosine and e = max(s, reset) / tau:
//   lse   = LSE(l)                       lse_e = LSE(l with l_t := e) = logaddexp(lse_other, e)
//   delta = lse_e - lse                  ce    = lse - l_y  (or lse_e - l~_y on edited logits)
// lse_e is built from lse_other, the log-sum-exp of the columns other than t, so nothing is ever
// subtracted from a sum of exponentials.
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "ebm_loss.h"
#include "ebm_loss_shared.h"
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

}  // namespace

// The argument checks shared with the CPU ops (ebm_loss_shared.h).
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

// Every entry of `index` in [0, K): one reduction and one small device-to-host copy.
void check_index_range(const char* op, const char* name, const at::Tensor& index, int64_t K) {
  const auto [lo, hi] = at::aminmax(index);
  const at::Tensor bounds = at::stack({lo.to(at::kLong), hi.to(at::kLong)}).cpu();
  const int64_t* b = bounds.data_ptr<int64_t>();
  TORCH_CHECK(b[0] >= 0 && b[1] < K, op, ": ", name, " must lie in [0, K) = [0, ", K,
              "), got values in [", b[0], ", ", b[1], "]");
}

// The backward's arguments: the forward's and the per-row state's shapes, dtypes and devices,
// and labels and target in [0, K) (every epilogue reads columns t and y of its rows).
void check_backward_inputs(const at::Tensor& grad_ce, const at::Tensor& grad_delta,
                           const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                           const at::Tensor& target, const at::Tensor& lse,
                           const at::Tensor& lse_other, const at::Tensor& edited,
                           const at::Tensor& keep, double inv_temp, double reset) {
  const char* op = "ebm_loss_backward";
  check_inputs(op, x, w, labels, inv_temp, reset);
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
  check_index_range(op, "labels", labels, w.size(0));
  check_index_range(op, "target", target, w.size(0));
}

RowCoefficients row_coefficients(const at::Tensor& grad_ce, const at::Tensor& grad_delta,
                                 const at::Tensor& y, const at::Tensor& t, const at::Tensor& lse,
                                 const at::Tensor& lse_other, const at::Tensor& edited,
                                 at::ScalarType acc, double inv_temp, double reset,
                                 bool ce_edited) {
  const at::Tensor g_ce = grad_ce.to(acc).contiguous();
  const at::Tensor g_delta = grad_delta.to(acc).contiguous();
  const at::Tensor s = edited.to(acc);
  RowCoefficients c;
  c.lse = lse.to(acc).contiguous();
  const at::Tensor edited_logit = at::clamp_min(s, reset) * inv_temp;
  c.lse_edited = at::logaddexp(lse_other.to(acc), edited_logit).contiguous();
  const at::Tensor label_is_edited =
      ce_edited ? (y == t) : at::zeros({y.size(0)}, y.options().dtype(at::kBool));
  c.coef_a = (ce_edited ? -g_delta : g_ce - g_delta).contiguous();
  c.coef_b = (ce_edited ? g_ce + g_delta : g_delta).contiguous();
  c.label_grad = at::where(label_is_edited, at::zeros_like(g_ce), g_ce).contiguous();
  // Through l~_t = max(s, reset) * inv_temp (clamp_min passes the gradient at s == reset, as
  // autograd's clamp does).
  c.grad_edited =
      ((c.coef_b * at::exp(edited_logit - c.lse_edited) - at::where(label_is_edited, g_ce, 0.0)) *
       inv_temp * (s >= reset).to(acc))
          .contiguous();
  return c;
}

// Everything after the logits: the mask (false on the mask_count largest products, a stable
// descending sort keeping the lower dimension first among equal products, true elsewhere), the
// edited cosine, and ce and delta from the per-row log-sum-exps. Plain ATen on [N, D] and [N].
// The unit class rows are w_hat's rows times w_scale (per class; undefined: 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
finish_forward(const at::Tensor& x_hat, const at::Tensor& w_hat, const at::Tensor& w_scale,
               const at::Tensor& y, const at::Tensor& target, const at::Tensor& lse,
               const at::Tensor& lse_other, const at::Tensor& label_logit, double inv_temp,
               double reset, int64_t mask_count, bool ce_edited) {
  const int64_t N = x_hat.size(0), D = x_hat.size(1);
  auto opts = x_hat.options();
  at::Tensor keep = at::empty({N, D}, opts.dtype(at::kBool));
  at::Tensor edited = at::empty({N}, opts);
  for (int64_t start = 0; start < N; start += kMaskChunkRows) {
    const int64_t rows = std::min(kMaskChunkRows, N - start);
    const at::Tensor t = target.narrow(0, start, rows);
    at::Tensor w_rows = w_hat.index_select(0, t);
    if (w_scale.defined()) w_rows.mul_(w_scale.index_select(0, t).unsqueeze(1));
    const at::Tensor product = x_hat.narrow(0, start, rows) * w_rows;
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

  return finish_forward(x_hat, w_hat, at::Tensor(), y, target, lse, lse_other, label_logit,
                        inv_temp, reset, mask_count, ce_edited);
}

std::tuple<at::Tensor, at::Tensor> backward_driver(
    const at::Tensor& grad_ce, const at::Tensor& grad_delta, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& labels, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& lse_other, const at::Tensor& edited,
    const at::Tensor& keep, double inv_temp, double reset, bool ce_edited, bool normalize,
    bool needs_x, bool needs_w, int64_t chunk_elements, int64_t min_rows,
    const BackwardRows& rows_fn) {
  check_backward_inputs(grad_ce, grad_delta, x, w, labels, target, lse, lse_other, edited, keep,
                        inv_temp, reset);
  const int64_t N = x.size(0), K = w.size(0), D = x.size(1);
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
  const RowCoefficients c = row_coefficients(grad_ce, grad_delta, y, t, lse, lse_other, edited,
                                             acc, inv_temp, reset, ce_edited);
  const at::Tensor& row_lse = c.lse;
  const at::Tensor& lse_edited = c.lse_edited;
  const at::Tensor& coef_a = c.coef_a;
  const at::Tensor& coef_b = c.coef_b;
  const at::Tensor& label_grad = c.label_grad;
  const at::Tensor& grad_edited = c.grad_edited;

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
    return divide_by_row_norms(g - v_hat * (v_hat * g).sum(1, /*keepdim=*/true), v.to(acc));
  };
  if (needs_x) grad_x = project(grad_x_hat, x_hat, x).to(x.scalar_type());
  if (needs_w) grad_w = project(grad_w_hat, w_hat, w).to(w.scalar_type());
  return {grad_x, grad_w};
}

}  // namespace loss
}  // namespace deltakern
