// CUDA row epilogues of the EBM loss (deltakern::ebm_loss_forward / ebm_loss_backward).
//
// The chunk loop, the mask, the per-row coefficients and the gradient matmuls are the
// device-independent drivers of csrc/cpu/ebm_loss.cpp (ATen on the current stream; at::mm is
// cuBLAS). This file adds the two kernels that turn a chunk of logits into per-row state
// (forward) and into d loss / d logits (backward), both launched on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ebm_loss.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>

namespace deltakern {
namespace loss {

namespace gpu {
namespace {

// One block per row, of 32 to 256 threads by K (a multiple of the warp size): at K = 10 a
// 256-thread block would leave 246 threads idle.
constexpr int kMaxThreads = 256;
// Chunks of up to 2^26 logits (256 MB in float32) keep the matmuls large on big GPUs.
constexpr int64_t kChunkElements = int64_t{1} << 26;
constexpr int64_t kMinChunkRows = 256;

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Larger value wins; equal values go to the lower column (the tie rule of docs/conventions.md §1).
template <typename T>
__device__ __forceinline__ void argmax_merge(T& v, int64_t& i, T other_v, int64_t other_i) {
  if (other_v > v || (other_v == v && other_i < i)) {
    v = other_v;
    i = other_i;
  }
}

template <typename T>
__device__ void warp_argmax(T& v, int64_t& i) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T ov = __shfl_down_sync(0xffffffffu, v, offset);
    const int64_t oi = __shfl_down_sync(0xffffffffu, i, offset);
    argmax_merge(v, i, ov, oi);
  }
}

// Block-wide (max, first index of the max); every thread receives the result.
template <typename T>
__device__ void block_argmax(T& v, int64_t& i) {
  __shared__ T values[kMaxThreads / 32];
  __shared__ int64_t indices[kMaxThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  warp_argmax(v, i);
  if (lane == 0) {
    values[warp] = v;
    indices[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? values[lane] : neg_inf<T>();
    i = lane < warps ? indices[lane] : std::numeric_limits<int64_t>::max();
    warp_argmax(v, i);
    if (lane == 0) {
      values[0] = v;
      indices[0] = i;
    }
  }
  __syncthreads();
  v = values[0];
  i = indices[0];
  __syncthreads();  // the shared slots may be reused by the next reduction
}

__device__ double block_sum(double v) {
  __shared__ double partial[kMaxThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? partial[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  v = partial[0];
  __syncthreads();
  return v;
}

// One block per row: target column, LSE of the row, LSE without column t, label logit. The
// other columns' maximum is found on its own, so their sum keeps its digits even when l_t
// dominates the row beyond the exponent range. Every index read stays in [0, K): a label out of
// range or a row without a finite maximum (all NaN or -inf, or +inf) sets a bit of `status`
// (csrc/ebm_loss.h) and the driver raises after the chunk loop.
template <typename T>
__global__ void forward_rows_kernel(const T* __restrict__ logits, int64_t K,
                                    const int64_t* __restrict__ labels, bool target_pred,
                                    int64_t* __restrict__ target, T* __restrict__ lse,
                                    T* __restrict__ lse_other, T* __restrict__ label_logit,
                                    int* __restrict__ status) {
  const int64_t r = blockIdx.x;
  const T* row = logits + r * K;
  T row_max = neg_inf<T>();
  int64_t row_arg = std::numeric_limits<int64_t>::max();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    if (row[k] > row_max) {  // strict: a thread keeps its first maximum
      row_max = row[k];
      row_arg = k;
    }
  }
  block_argmax(row_max, row_arg);
  // No entry beat -inf (all NaN or -inf): column 0 keeps every read in bounds; flagged below.
  if (row_arg >= K) row_arg = 0;
  const int64_t y = labels[r];
  const bool label_ok = y >= 0 && y < K;
  const int64_t t = target_pred ? row_arg : (label_ok ? y : 0);
  const T logit_t = row[t];

  T other_max = row_max;
  if (!(logit_t < row_max)) {  // t holds a maximum: the others' maximum may be lower
    T m = neg_inf<T>();
    int64_t unused = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
      if (k != t && row[k] > m) m = row[k];
    block_argmax(m, unused);
    other_max = m;
  }
  double sum = 0.0;
  if (K > 1) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
      if (k != t) sum += static_cast<double>(exp_of(row[k] - other_max));
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    const double inf = std::numeric_limits<double>::infinity();
    const double other = K > 1 ? static_cast<double>(other_max) + log(sum) : -inf;
    const double lt = static_cast<double>(logit_t);
    const double hi = other > lt ? other : lt, lo = other > lt ? lt : other;
    const double row_lse = lo == -inf ? hi : hi + log1p(exp(lo - hi));
    target[r] = t;
    lse_other[r] = static_cast<T>(other);
    lse[r] = static_cast<T>(row_lse);
    label_logit[r] = label_ok ? row[y] : std::numeric_limits<T>::quiet_NaN();
    int bad = label_ok ? 0 : kBadLabel;
    // Non-finite row: no finite maximum, or a NaN among the rest (the sum turns NaN).
    if (!isfinite(static_cast<double>(row_max)) || isnan(row_lse) || isnan(other)) bad |= kNonFiniteRow;
    if (bad) atomicOr(status, bad);
  }
}

// d loss / d logits in place: g_k = a softmax(l)_k + b softmax(l~)_k [k != t] - label_grad [k == y].
// Column t of the edited logits does not depend on l_t, so it only keeps the first term.
template <typename T>
__global__ void grad_rows_kernel(T* __restrict__ logits, int64_t K,
                                 const int64_t* __restrict__ target,
                                 const int64_t* __restrict__ labels, const T* __restrict__ lse,
                                 const T* __restrict__ lse_edited, const T* __restrict__ coef_a,
                                 const T* __restrict__ coef_b, const T* __restrict__ label_grad) {
  const int64_t r = blockIdx.x;
  T* row = logits + r * K;
  const int64_t t = target[r], y = labels[r];
  const T a = coef_a[r], b = coef_b[r], l = lse[r], le = lse_edited[r], g = label_grad[r];
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const T v = row[k];
    T grad = a * exp_of(v - l);
    // min(v - le, 0) written so that a NaN stays NaN, as on CPU (std::min(NaN, 0) is NaN).
    const T d = v - le;
    if (k != t) grad += b * exp_of(d > T(0) ? T(0) : d);
    if (k == y) grad -= g;
    row[k] = grad;
  }
}

// Threads per row: K rounded up to whole warps, at most kMaxThreads.
int threads_for(int64_t K) {
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (K + 31) / 32 * 32)));
}

void forward_rows_cuda(const at::Tensor& logits, const at::Tensor& labels, bool target_pred,
                       const at::Tensor& target, const at::Tensor& lse,
                       const at::Tensor& lse_other, const at::Tensor& label_logit,
                       const at::Tensor& status) {
  const int64_t rows = logits.size(0), K = logits.size(1);
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "ebm_loss_forward_rows", [&] {
    forward_rows_kernel<scalar_t><<<rows, threads_for(K), 0, stream>>>(
        logits.data_ptr<scalar_t>(), K, labels.data_ptr<int64_t>(), target_pred,
        target.data_ptr<int64_t>(), lse.data_ptr<scalar_t>(), lse_other.data_ptr<scalar_t>(),
        label_logit.data_ptr<scalar_t>(), status.data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward_rows_cuda(const at::Tensor& logits, const at::Tensor& target,
                        const at::Tensor& labels, const at::Tensor& lse,
                        const at::Tensor& lse_edited, const at::Tensor& coef_a,
                        const at::Tensor& coef_b, const at::Tensor& label_grad) {
  const int64_t rows = logits.size(0), K = logits.size(1);
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "ebm_loss_backward_rows", [&] {
    grad_rows_kernel<scalar_t><<<rows, threads_for(K), 0, stream>>>(
        logits.data_ptr<scalar_t>(), K, target.data_ptr<int64_t>(), labels.data_ptr<int64_t>(),
        lse.data_ptr<scalar_t>(), lse_edited.data_ptr<scalar_t>(), coef_a.data_ptr<scalar_t>(),
        coef_b.data_ptr<scalar_t>(), label_grad.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ebm_loss_forward_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                      double inv_temp, double reset, int64_t mask_count, bool target_pred,
                      bool ce_edited, bool normalize) {
  TORCH_CHECK(x.is_cuda(), "ebm_loss_forward: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());
  return forward_driver(x, w, labels, inv_temp, reset, mask_count, target_pred, ce_edited,
                        normalize, kChunkElements, kMinChunkRows, forward_rows_cuda);
}

std::tuple<at::Tensor, at::Tensor> ebm_loss_backward_cuda(
    const at::Tensor& grad_ce, const at::Tensor& grad_delta, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& labels, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& lse_other, const at::Tensor& edited,
    const at::Tensor& keep, double inv_temp, double reset, bool ce_edited, bool normalize,
    bool needs_x, bool needs_w) {
  TORCH_CHECK(x.is_cuda(), "ebm_loss_backward: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());
  return backward_driver(grad_ce, grad_delta, x, w, labels, target, lse, lse_other, edited, keep,
                         inv_temp, reset, ce_edited, normalize, needs_x, needs_w, kChunkElements,
                         kMinChunkRows, backward_rows_cuda);
}

}  // namespace
}  // namespace gpu
}  // namespace loss
}  // namespace deltakern

TORCH_LIBRARY_IMPL(deltakern, CUDA, m) {
  m.impl("ebm_loss_forward", &deltakern::loss::gpu::ebm_loss_forward_cuda);
  m.impl("ebm_loss_backward", &deltakern::loss::gpu::ebm_loss_backward_cuda);
}
