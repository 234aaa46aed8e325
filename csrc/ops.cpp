// The one place where deltakern's custom-op schemas are declared.
//
// Every op is declared here once (TORCH_LIBRARY) and implemented per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL). Fake (meta) kernels and
// autograd formulas are registered from Python with torch.library, next to the
// Python wrappers (deltakern/_ops.py and deltakern/loss.py).
#include <torch/library.h>

TORCH_LIBRARY(deltakern, m) {
  // Fused scoring state: for every row of x, the top-c logits (sorted, ties to the
  // lower class index), their class indices, and the log-sum-exp of every logit
  // outside that top-c list. Logits are (x/|x|)(w/|w|)^T * inv_temp when normalize,
  // x w^T * inv_temp otherwise. The [N, K] logits matrix is never materialised.
  // Returns (topk_values [N, c], topk_indices [N, c] int64, lse_outside [N]).
  m.def(
      "fused_score_state(Tensor x, Tensor w, float inv_temp, int c, bool normalize) "
      "-> (Tensor, Tensor, Tensor)");
}
