// The pieces of the EBM loss shared by the device-independent drivers (ebm_loss.cpp, used by
// CUDA) and the CPU ops (ebm_loss_host.cpp): argument checks, the per-row backward coefficients
// and everything after the logits in the forward. Plain ATen, on any device.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace deltakern {
namespace loss {

// The forward's arguments (shapes, dtypes, devices, inv_temp and reset); raises naming `op`.
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& labels, double inv_temp, double reset);

// Every entry of `index` in [0, K): one reduction and one small device-to-host copy.
void check_index_range(const char* op, const char* name, const at::Tensor& index, int64_t K);

// The backward's arguments: the forward's and the per-row state's shapes, dtypes and devices,
// and labels and target in [0, K) (every epilogue reads columns t and y of its rows).
void check_backward_inputs(const at::Tensor& grad_ce, const at::Tensor& grad_delta,
                           const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                           const at::Tensor& target, const at::Tensor& lse,
                           const at::Tensor& lse_other, const at::Tensor& edited,
                           const at::Tensor& keep, double inv_temp, double reset);

// Per-row coefficients of the backward (all [N], contiguous, in acc). The row's loss is
// a*LSE(l) + b*LSE(l~) minus the label logit (l_y, or the edited logit when the CE is on edited
// logits and y == t), so d loss / d l_k = a softmax(l)_k + b softmax(l~)_k [k != t]
// - label_grad [k == y]; grad_edited is d loss / d s.
struct RowCoefficients {
  at::Tensor lse, lse_edited, coef_a, coef_b, label_grad, grad_edited;
};


RowCoefficients row_coefficients(const at::Tensor& grad_ce, const at::Tensor& grad_delta,
                                 const at::Tensor& y, const at::Tensor& t, const at::Tensor& lse,
                                 const at::Tensor& lse_other, const at::Tensor& edited,
                                 at::ScalarType acc, double inv_temp, double reset,
                                 bool ce_edited);

// Everything after the logits: the mask, the edited cosine, and ce and delta from the per-row
// log-sum-exps (ebm_loss.cpp says how). The unit class rows are w_hat's rows times w_scale (per
// class; undefined: 1). Returns (ce, delta, lse, lse_other, target, edited, keep).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
finish_forward(const at::Tensor& x_hat, const at::Tensor& w_hat, const at::Tensor& w_scale,
               const at::Tensor& y, const at::Tensor& target, const at::Tensor& lse,
               const at::Tensor& lse_other, const at::Tensor& label_logit, double inv_temp,
               double reset, int64_t mask_count, bool ce_edited);

}  // namespace loss
}  // namespace deltakern
