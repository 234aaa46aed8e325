// The one place where deltakern's custom-op schemas are declared.
//
// Every op is declared here once (TORCH_LIBRARY) and implemented per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL). Fake (meta) kernels, the
// autograd formula and the Python call wrappers are registered once, in one module:
// deltakern/ops/registry.py (docs/architecture.md §3).
#include <torch/library.h>

TORCH_LIBRARY(deltakern, m) {
  // Fused scoring state: for every row of x, the top-c logits (sorted, ties to the
  // lower class index), their class indices, and the log-sum-exp of every logit
  // outside that top-c list. Logits are (x/|x|)(w/|w|)^T * inv_temp when normalize,
  // x w^T * inv_temp otherwise. The [N, K] logits matrix is never materialised.
  // Returns (topk_values [N, c], topk_indices [N, c] int64, lse_outside [N]).
  // The CPU kernel checks its own arguments: 2-D float16/bfloat16/float32/float64 x and w with the
  // same D on one device, 1 <= c <= K, finite inv_temp > 0; a NaN/±inf row, a zero row (with
  // normalize) or logits that overflow raise an error naming the row. Any finite non-zero row,
  // however tiny or huge, is normalised within the accuracy contract. bf16_products (the
  // matmul_precision "high"/"medium" setting) lets float32 inputs multiply in bfloat16 on CPUs
  // with native bf16 (outside the float32 contract; docs/conventions.md §3.4).
  m.def(
      "fused_score_state(Tensor x, Tensor w, float inv_temp, int c, bool normalize, "
      "bool bf16_products=False) -> (Tensor, Tensor, Tensor)");

  // The same state plus, for NegLabel (docs/conventions.md §2.5), the log-sum-exp of the logits
  // against each of `groups` consecutive, equal blocks of the M rows of w_neg (same dtype as w),
  // from the same pass over x. The first three outputs equal fused_score_state's.
  // Returns (topk_values [N, c], topk_indices [N, c] int64, lse_outside [N], lse_neg [N, groups]).
  m.def(
      "fused_score_neg_state(Tensor x, Tensor w, Tensor w_neg, float inv_temp, int c, int groups, "
      "bool normalize, bool bf16_products=False) -> (Tensor, Tensor, Tensor, Tensor)");

  // EBM loss forward (docs/conventions.md §6). Per row: logits l = x_hat w_hat^T * inv_temp, target column
  // t (argmax of l when target_pred, ties to the lower class; else the label), the keep mask
  // (false on the mask_count largest entries of x_hat * w_hat_t, ties to the lower dimension),
  // the edited cosine s = sum(keep * x_hat * w_hat_t) before the clamp at `reset`, and the
  // log-sum-exps of l and of l without column t. Only a chunk of the logits exists at a time.
  // Returns (ce [N], delta [N], lse [N], lse_other [N], target [N] int64, edited [N],
  // keep [N, D] bool); ce is on the edited logits when ce_edited. Both loss ops check their own
  // arguments (shapes, dtypes, one device, labels and target in [0, K), 1 <= mask_count <= D,
  // inv_temp finite, > 0 and small enough that the logits cannot overflow) and raise on rows
  // whose logits are not finite: a direct call never hangs or reads outside its tensors.
  m.def(
      "ebm_loss_forward(Tensor x, Tensor w, Tensor labels, float inv_temp, float reset, "
      "int mask_count, bool target_pred, bool ce_edited, bool normalize) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // EBM loss backward: gradients of sum(grad_ce * ce + grad_delta * delta) with respect to x
  // and w from the forward's per-row state; the logits are recomputed chunk by chunk. A
  // gradient that is not needed comes back as an empty tensor. Returns (grad_x, grad_w).
  m.def(
      "ebm_loss_backward(Tensor grad_ce, Tensor grad_delta, Tensor x, Tensor w, Tensor labels, "
      "Tensor target, Tensor lse, Tensor lse_other, Tensor edited, Tensor keep, float inv_temp, "
      "float reset, bool ce_edited, bool normalize, bool needs_x, bool needs_w) "
      "-> (Tensor, Tensor)");

  // CLIP's image preprocessing of one uint8 [H, W, 3] RGB image in one pass (csrc/cpu/image_resample.cpp):
  // resize to (height, width) with PIL's "bicubic" or "bilinear" resampling (its vertical pass
  // first when vertical_first, as the caller's Pillow orders them), crop
  // [top, top + crop_height) x [left, left + crop_width), then (v / 255 - mean) / std per channel.
  // Returns float32 [3, crop_height, crop_width], bit for bit torchvision's Resize, CenterCrop,
  // ToTensor and Normalize on the PIL image. CPU only; checks its own arguments.
  m.def(
      "resample_crop_normalize(Tensor image, int height, int width, int top, int left, int crop_height, "
      "int crop_width, str filter, bool vertical_first, float[] mean, float[] std) -> Tensor");
}
