// CPU implementation of deltakern::fused_score_state.
//
// Rows are processed in chunks sized so that the chunk's logits (chunk x K floats, ~8 MB)
// stay in the last-level cache: at::mm (MKL/oneDNN) writes them into one reusable buffer,
// then a parallel epilogue reduces each row to its top-c list and outside log-sum-exp.
// Extra memory is O(chunk*K + K*D), never O(N*K).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "row_reduce.h"
#include "rows.h"

namespace deltakern {
namespace cpu {
namespace {

constexpr int64_t kChunkElements = int64_t{1} << 21;  // logits per chunk buffer (8 MB in fp32)
constexpr int64_t kMinChunkRows = 256;  // keeps the matmul efficient for huge K (20 MB at K = 20000)

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_score_state_cpu(const at::Tensor& x,
                                                                     const at::Tensor& w,
                                                                     double inv_temp, int64_t c,
                                                                     bool normalize) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "fused_score_state: x and w must be 2-D");
  TORCH_CHECK(x.size(1) == w.size(1), "fused_score_state: x and w must have the same D");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "fused_score_state: CPU tensors");
  const int64_t N = x.size(0);
  const int64_t K = w.size(0);
  TORCH_CHECK(c >= 1 && c <= K, "fused_score_state: c must be in [1, K], got ", c);

  const at::ScalarType acc = accumulation_type(x, w);
  const bool use_double = acc == at::kDouble;
  // 1/tau is folded into the (small) class matrix once, so the epilogue reads final logits.
  const at::Tensor w_scaled = (prepare_rows(w, acc, normalize) * inv_temp).contiguous();
  const at::Tensor w_t = w_scaled.t();

  auto opts = x.options().dtype(acc);
  at::Tensor top_values = at::empty({N, c}, opts);
  at::Tensor top_indices = at::empty({N, c}, opts.dtype(at::kLong));
  at::Tensor lse_outside = at::empty({N}, opts);
  if (N == 0) return {top_values, top_indices, lse_outside};

  const int64_t chunk = std::min(N, std::max(kMinChunkRows, kChunkElements / K));
  at::Tensor buffer = at::empty({chunk, K}, opts);
  int64_t* idx_ptr = top_indices.data_ptr<int64_t>();

  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t rows = std::min(chunk, N - start);
    at::Tensor logits = buffer.narrow(0, 0, rows);
    at::mm_out(logits, prepare_rows(x.narrow(0, start, rows), acc, normalize), w_t);
    if (use_double) {
      const double* lg = logits.data_ptr<double>();
      double* tv = top_values.data_ptr<double>();
      double* lo = lse_outside.data_ptr<double>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = start + r;
          lo[n] = reduce_row_f64(lg + r * K, K, c, tv + n * c, idx_ptr + n * c);
        }
      });
    } else {
      const float* lg = logits.data_ptr<float>();
      float* tv = top_values.data_ptr<float>();
      float* lo = lse_outside.data_ptr<float>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = start + r;
          lo[n] = reduce_row_f32(lg + r * K, K, c, tv + n * c, idx_ptr + n * c);
        }
      });
    }
  }
  return {top_values, top_indices, lse_outside};
}

}  // namespace
}  // namespace cpu
}  // namespace deltakern

TORCH_LIBRARY_IMPL(deltakern, CPU, m) {
  m.impl("fused_score_state", &deltakern::cpu::fused_score_state_cpu);
}
