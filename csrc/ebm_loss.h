// Device-independent drivers of the EBM loss ops (defined in csrc/cpu/ebm_loss.cpp) and the
// row-epilogue signatures each device implements (CPU there, CUDA in csrc/cuda/ebm_loss.cu).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <tuple>

namespace deltakern {
namespace loss {

// Bits a forward row epilogue ORs into its int32 status word when a row cannot be computed; the
// driver reads the word once, after the last chunk (one device-to-host copy on CUDA), and raises.
constexpr int kBadLabel = 1;      // label outside [0, K): its logit is not read
constexpr int kNonFiniteRow = 2;  // no finite maximum, or a NaN in the row

// Device row epilogues the drivers call once per chunk of logits ([rows, K], contiguous). The
// per-row tensors are the chunk's slices.
// Forward: fill target, lse, lse_other and label_logit from the logits. Every index it writes or
// reads stays in [0, K) whatever the logits and labels hold; rows it cannot compute set a bit of
// `status` (int32 [1] on the logits' device).
using ForwardRows = std::function<void(
    const at::Tensor& logits, const at::Tensor& labels, bool target_pred, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& lse_other, const at::Tensor& label_logit,
    const at::Tensor& status)>;
// Backward: overwrite the logits with d loss / d logits (target and labels checked to lie in
// [0, K) by the driver; NaN in the state stays NaN in the gradient).
using BackwardRows = std::function<void(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& labels,
    const at::Tensor& lse, const at::Tensor& lse_edited, const at::Tensor& coef_a,
    const at::Tensor& coef_b, const at::Tensor& label_grad)>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
forward_driver(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
               double inv_temp, double reset, int64_t mask_count, bool target_pred,
               bool ce_edited, bool normalize, int64_t chunk_elements, int64_t min_rows,
               const ForwardRows& rows_fn);

std::tuple<at::Tensor, at::Tensor> backward_driver(
    const at::Tensor& grad_ce, const at::Tensor& grad_delta, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& labels, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& lse_other, const at::Tensor& edited,
    const at::Tensor& keep, double inv_temp, double reset, bool ce_edited, bool normalize,
    bool needs_x, bool needs_w, int64_t chunk_elements, int64_t min_rows,
    const BackwardRows& rows_fn);

}  // namespace loss
}  // namespace deltakern
