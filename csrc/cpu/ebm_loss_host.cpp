// The CPU ops of the EBM loss (docs/conventions.md §6): deltakern::ebm_loss_forward /
// ebm_loss_backward on CPU tensors. The logits are tiled by rows and classes inside one parallel
// region, with single-threaded GEMMs per thread, a cache-sized tile, inv_temp applied in the
// epilogue, and in the backward no [K, D] temporaries beyond the prepared W and grad_w. The
// argument checks and the O(N) and O(N*D) work around the logits are shared with the
// device-independent drivers (ebm_loss_shared.h, ebm_loss.cpp); the math is described there.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#define DK_LOSS_AVX2 1
#else
#define DK_LOSS_AVX2 0
#endif

#include "ebm_loss_shared.h"
#include "row_reduce.h"
#include "rows.h"
#include "simd_avx2.h"

// MKL's thread-local thread count (the C entry point: the lower-case names are the Fortran one,
// which takes a pointer), exported by the MKL that x86 builds of torch link statically; weak so
// that the extension also loads with a torch without MKL (the pointer is then null).
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

namespace deltakern {
namespace loss {

namespace host {
namespace {

// The CPU ops tile the logits: a block of rows (kRowBlock) times a block of classes
// (kClassBlock) is one single-threaded GEMM whose 1 MB result stays in cache while the epilogue
// reads it (and, in the backward, while the two gradient GEMMs read it back). 256 rows keep the
// GEMMs efficient (each element of a class block is reused by 256 rows); full rows of logits at
// K = 20,000 would be 80 KB each and every pass over them would go to memory.
// One parallel region per op (per 1024 rows in the backward): every thread runs its own GEMMs
// and epilogues, so a chunk never waits for the slowest core between GEMM and epilogue (the
// reason given in csrc/cpu/fused_score.cpp).
constexpr int64_t kRowBlock = 256;
constexpr int64_t kClassBlock = 1024;
constexpr int64_t kBackwardRows = 1024;  // rows per backward region: bounds the dX accumulators
constexpr int64_t kGroupsPerThread = 4;  // backward: groups of class blocks (and dX buffers) per thread
constexpr int64_t kBlock = 64;
// Below this many multiply-adds per GEMM (N x K x D; 256 x 1000 x 512 is 2^27) an op runs on one
// thread: every parallel region waits for its slowest thread, and on a shared 2-core machine a
// descheduled thread cost a small call ~8x its single-threaded time (256 x 1000: 260 ms on two
// threads vs 34 ms on one).
constexpr double kSerialMacs = 0x1p28;
constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr double kInf = std::numeric_limits<double>::infinity();

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

// row[k] *= factor[k] over [0, n).
__attribute__((target_clones("avx512f", "avx2", "default")))
void scale_cols_f32(float* row, const float* factor, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) row[k] *= factor[k];
}

#if DK_LOSS_AVX2
// AVX2+FMA versions of the float epilogues. GCC leaves the `omp simd` loops over
// exp_nonpositive scalar for AVX2 (it vectorises them only with AVX-512 masks; see
// csrc/cpu/row_reduce.cpp), which made the exponentials cost ~40% of a GEMM. Used whenever
// row_reduce's kernels use AVX2 or AVX-512 (so ATEN_CPU_CAPABILITY=default turns them off too).
bool use_avx2() {
  static const bool avx2 = std::strcmp(deltakern::cpu::kernel_isa(), "default") != 0;
  return avx2;
}


// range_sum_exp_f32 on 8 lanes: float blocks of 64, blocks added in double.
__attribute__((target("avx2,fma")))
double range_sum_exp_avx2(const float* row, int64_t begin, int64_t end, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  double sum = 0.0;
  int64_t k = begin;
  for (; k + kBlock <= end; k += kBlock) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = k; j < k + kBlock; j += 8)
      acc = _mm256_add_ps(acc, cpu::exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + j), sh)));
    sum += cpu::sum_lanes_avx2(acc);
  }
  __m256 acc = _mm256_setzero_ps();
  for (; k + 8 <= end; k += 8) acc = _mm256_add_ps(acc, cpu::exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + k), sh)));
  sum += cpu::sum_lanes_avx2(acc);
  for (; k < end; ++k) sum += deltakern::cpu::exp_nonpositive(row[k] - shift);
  return sum;
}
#endif

double range_max_f64(const double* row, int64_t begin, int64_t end) {
  double m = -kInf;
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
#if DK_LOSS_AVX2
  if (use_avx2()) return range_sum_exp_avx2(r, b, e, s);
#endif
  return range_sum_exp_f32(r, b, e, s);
}
double range_sum_exp(const double* r, int64_t b, int64_t e, double s) {
  return range_sum_exp_f64(r, b, e, s);
}
void scale_cols(float* r, const float* f, int64_t n) { scale_cols_f32(r, f, n); }
void scale_cols(double* r, const double* f, int64_t n) {
  for (int64_t k = 0; k < n; ++k) r[k] *= f[k];
}

double logaddexp(double a, double b) {
  const double hi = std::max(a, b), lo = std::min(a, b);
  if (lo == -kInf) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

// Smallest index recorded by any thread (first_bad starts at `none`).
void record_min(std::atomic<int64_t>& first_bad, int64_t n) {
  int64_t seen = first_bad.load();
  while (n < seen && !first_bad.compare_exchange_weak(seen, n)) {
  }
}

// Whether an op on x and w runs on one thread (kSerialMacs, SerialScope).
bool is_small(const at::Tensor& x, const at::Tensor& w) {
  return static_cast<double>(x.size(0)) * static_cast<double>(w.size(0)) *
             static_cast<double>(x.size(1)) < kSerialMacs;
}

// One thread for everything an op runs while it lives, when `serial`: the calling thread's OpenMP
// thread count (a per-thread setting, which ATen's parallel_for reads) and MKL's thread-local
// one are 1, so ATen's kernels run inline and MKL's GEMMs on the calling thread; both are
// restored on exit.
class SerialScope {
 public:
  explicit SerialScope(bool serial) : serial_(serial) {
    if (!serial_) return;
#ifdef _OPENMP
    previous_omp_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    if (MKL_Set_Num_Threads_Local != nullptr) previous_mkl_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialScope() {
    if (!serial_) return;
#ifdef _OPENMP
    omp_set_num_threads(previous_omp_);
#endif
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_mkl_);  // 0: global
  }
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  bool serial_;
  int previous_omp_ = 1;
  int previous_mkl_ = 0;
};

// Threads the parallel regions below will use: 1 where ATen's parallel_for runs inline.
int64_t worker_threads() {
  return at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
}

// Runs `work` once on each of up to `threads` threads in one parallel region. The callers share
// their chunks through an atomic counter, so a thread that the (shared) machine slows down takes
// fewer chunks instead of holding up the others at the end of a static split.
template <typename F>
void for_each_thread(int64_t threads, const F& work) {
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) work();
  });
}

// ---------------------------------------------------------------- prepared rows

// Robust L2 norms of the rows of v (acc, contiguous): a float row's sum of squares accumulated in
// double, where the square of every finite float (subnormals included) is normal; a double row
// scaled by its largest entry first (row_reduce.h). Rows with a zero or non-finite norm are
// refused.
void robust_norms(const char* op, const char* name, const at::Tensor& v, std::vector<double>& norms) {
  const int64_t R = v.size(0), D = v.size(1);
  norms.assign(R, 1.0);
  std::atomic<int64_t> first_bad{R};
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double n = v.scalar_type() == at::kDouble
                           ? deltakern::cpu::norm_f64(v.data_ptr<double>() + r * D, D)
                           : std::sqrt(deltakern::cpu::sum_squares_f32(v.data_ptr<float>() + r * D, D));
      norms[r] = n;
      if (!(n > 0.0 && n < kInf)) record_min(first_bad, r);
    }
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK(bad == R, op, ": row ", bad, " of ", name, " has a ",
              norms[bad] == 0.0 ? "zero" : "non-finite", " L2 norm (normalize=True needs finite, ",
              "non-zero rows)");
}

// A new tensor holding the rows of v (acc, contiguous) divided by their norms, the factor in
// double: 1/|row| of a subnormal float row is past float's range, and a float64 row that far
// out is first brought near 1 by an exact power of two.
at::Tensor unit_copy(const at::Tensor& v, const std::vector<double>& norms) {
  const int64_t R = v.size(0), D = v.size(1);
  at::Tensor out = at::empty_like(v);
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double n = norms[r];
      if (v.scalar_type() == at::kDouble) {
        const double* in = v.data_ptr<double>() + r * D;
        double* row = out.data_ptr<double>() + r * D;
        if (n > 0x1p-1000 && n < 0x1p1000) {
          const double inv = 1.0 / n;
          for (int64_t d = 0; d < D; ++d) row[d] = in[d] * inv;
        } else {
          const int e = -std::ilogb(n);
          const double inv = 1.0 / std::ldexp(n, e);
          for (int64_t d = 0; d < D; ++d) row[d] = std::ldexp(in[d], e) * inv;
        }
      } else {
        const float* in = v.data_ptr<float>() + r * D;
        float* row = out.data_ptr<float>() + r * D;
        const double inv = 1.0 / n;
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(static_cast<double>(in[d]) * inv);
      }
    }
  });
  return out;
}

// Rows as the GEMMs read them, with per-row factors. The unit row v_hat_r is gemm_r * scale[r];
// the gradient with respect to v_r is (u - v_hat (v_hat . u)) * post[r], where u is the gradient
// with respect to gemm_r's unit row times scale[r] (what the GEMMs on `gemm` produce).
//   - x (and W whose norms are unsafe for a GEMM as given): gemm = unit rows, scale = 1,
//     post = 1/|v_r|: one [rows, D] copy;
//   - W whose norms lie in a safe range: gemm = W as given (no copy when it is already in acc and
//     contiguous), scale = 1/|w_k| applied in the epilogues, post = 1;
//   - without normalising: gemm = the rows as given, scale = post = 1.
struct PreparedRows {
  at::Tensor gemm;
  std::vector<double> scale, post;
  bool scaled = false;  // scale holds 1/|v_r| (W as given)
};

// Norms for which a float GEMM on rows as given is exact to the contract (csrc/cpu/fused_score.cpp):
// products that underflow are then below 2^-60 of the dot product's scale, nothing can overflow.
constexpr double kFloatSafeLow = 0x1p-60, kFloatSafeHigh = 0x1p60;
constexpr double kDoubleSafeLow = 0x1p-500, kDoubleSafeHigh = 0x1p500;

PreparedRows prepare(const char* op, const char* name, const at::Tensor& v, at::ScalarType acc,
                     bool normalize, bool as_given_if_safe, double inv_temp) {
  const int64_t R = v.size(0);
  PreparedRows p;
  p.scale.assign(R, 1.0);
  p.post.assign(R, 1.0);
  const at::Tensor rows = v.to(acc).contiguous();  // read only: may be the caller's tensor
  if (!normalize) {
    p.gemm = rows;
    return p;
  }
  std::vector<double> norms;
  robust_norms(op, name, rows, norms);
  const bool f64 = acc == at::kDouble;
  const double low = f64 ? kDoubleSafeLow : kFloatSafeLow, high = f64 ? kDoubleSafeHigh : kFloatSafeHigh;
  const double factor_max = (f64 ? std::numeric_limits<double>::max()
                                 : static_cast<double>(std::numeric_limits<float>::max())) / 4;
  const bool safe = as_given_if_safe && std::all_of(norms.begin(), norms.end(), [&](double n) {
                      return n >= low && n <= high && inv_temp / n <= factor_max;
                    });
  if (safe) {
    p.gemm = rows;
    for (int64_t r = 0; r < R; ++r) p.scale[r] = 1.0 / norms[r];
    p.scaled = true;
  } else {
    p.gemm = unit_copy(rows, norms);
    for (int64_t r = 0; r < R; ++r) p.post[r] = 1.0 / norms[r];
  }
  return p;
}

// The per-class factors of the epilogues in T: logit = product * (inv_temp * scale[k]), and the
// gradient's column factor scale[k].
template <typename T>
void class_factors(const PreparedRows& w, double inv_temp, std::vector<T>& logit_factor,
                   std::vector<T>& grad_factor) {
  const int64_t K = static_cast<int64_t>(w.scale.size());
  logit_factor.resize(K);
  grad_factor.resize(K);
  for (int64_t k = 0; k < K; ++k) {
    logit_factor[k] = static_cast<T>(inv_temp * w.scale[k]);
    grad_factor[k] = static_cast<T>(w.scale[k]);
  }
}

// Rows per row block and classes per class block for N rows and K classes: at most the
// constants above, and small enough that every thread gets a block when N (forward) or K
// (backward) is small.
int64_t row_block(int64_t N, int64_t threads) {
  return std::max<int64_t>(1, std::min(kRowBlock, (N + threads - 1) / threads));
}
int64_t class_block(int64_t K, int64_t threads) {
  return std::max<int64_t>(1, std::min(kClassBlock, (K + threads - 1) / threads));
}

// A [rows, cols] contiguous view at the start of a per-thread tile buffer.
at::Tensor tile_view(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.view(-1).narrow(0, 0, rows * cols).view({rows, cols});
}

// ---------------------------------------------------------------- forward

// A row's running state over its class blocks: the target logit l_t and the log-sum-exp of the
// other columns as (max, sum of exp(v - max)) in double. With target="pred" the target is the
// first maximum so far; when a later block holds a strictly larger logit, the old target joins
// the other columns. Each block's others are summed relative to their own maximum, so their
// digits survive even when l_t dominates the row by more than float's exponent range.
template <typename T>
struct RowState {
  T target_logit;
  int64_t target;
  double other_max, other_sum;
  T label_logit;
  bool bad;  // a block without any finite-or-+inf logit among its others (NaN or -inf only)
  void reset() {
    target_logit = -std::numeric_limits<T>::infinity();
    target = -1;
    other_max = -kInf;
    other_sum = 0.0;
    label_logit = std::numeric_limits<T>::quiet_NaN();
    bad = false;
  }
  void add_other(double m, double s) {  // NaN in m or s propagates to the sum
    if (m == -kInf) return;
    if (other_max == -kInf) {
      other_max = m;
      other_sum = s;
    } else if (m > other_max) {
      other_sum = other_sum * std::exp(other_max - m) + s;
      other_max = m;
    } else {
      other_sum += s * std::exp(m - other_max);
    }
  }
};

// One row's logits in classes [k0, k0 + kb) (already over tau) into its state.
template <typename T>
void forward_block(const T* blk, int64_t k0, int64_t kb, int64_t label, bool target_pred,
                   RowState<T>& s) {
  if (label >= k0 && label < k0 + kb) s.label_logit = blk[label - k0];
  int64_t i = -1;  // the target's position in this block, when it is here
  T block_max = 0;
  if (target_pred) {
    block_max = range_max(blk, 0, kb);  // NaN entries never win a comparison
    if (block_max > s.target_logit) {   // strictly larger: ties stay with the lower class
      i = 0;
      while (blk[i] != block_max) ++i;  // the first maximum; block_max is an entry
      if (s.target >= 0) s.add_other(static_cast<double>(s.target_logit), 1.0);
      s.target_logit = block_max;
      s.target = k0 + i;
    }
  } else if (label >= k0 && label < k0 + kb) {
    i = label - k0;
    s.target_logit = blk[i];
    s.target = label;
  }
  if (i >= 0 && kb == 1) return;  // the block is the target alone
  const T other_max = i < 0 ? (target_pred ? block_max : range_max(blk, 0, kb))
                            : std::max(range_max(blk, 0, i), range_max(blk, i + 1, kb));
  if (!(other_max > -std::numeric_limits<T>::infinity())) {
    s.bad = true;
    return;
  }
  const double sum = i < 0 ? range_sum_exp(blk, 0, kb, other_max)
                           : range_sum_exp(blk, 0, i, other_max) +
                                 range_sum_exp(blk, i + 1, kb, other_max);
  s.add_other(static_cast<double>(other_max), sum);
}

template <typename T>
void forward_typed(const at::Tensor& x_hat, const at::Tensor& w_hat, const T* logit_factor,
                   const at::Tensor& y, bool target_pred, at::Tensor& target, at::Tensor& lse,
                   at::Tensor& lse_other, at::Tensor& label_logit, int64_t& first_bad_row) {
  const int64_t N = x_hat.size(0), K = w_hat.size(0);
  const int64_t threads = worker_threads();
  const int64_t R = row_block(N, threads), KB = std::min(kClassBlock, K);
  const int64_t num_chunks = (N + R - 1) / R;
  const int64_t* yp = y.data_ptr<int64_t>();
  int64_t* tp = target.data_ptr<int64_t>();
  T* lse_p = lse.data_ptr<T>();
  T* other_p = lse_other.data_ptr<T>();
  T* label_p = label_logit.data_ptr<T>();
  std::atomic<int64_t> first_bad{N};
  std::atomic<int64_t> next_chunk{0};
  for_each_thread(threads, [&]() {
    at::Tensor buffer = at::empty({R * KB}, x_hat.options());
    std::vector<RowState<T>> states(R);
    for (int64_t ci = next_chunk++; ci < num_chunks; ci = next_chunk++) {
      const int64_t start = ci * R, rows = std::min(R, N - start);
      const at::Tensor x_rows = x_hat.narrow(0, start, rows);
      for (int64_t r = 0; r < rows; ++r) states[r].reset();
      for (int64_t k0 = 0; k0 < K; k0 += KB) {
        const int64_t kb = std::min(KB, K - k0);
        at::Tensor tile = tile_view(buffer, rows, kb);
        at::mm_out(tile, x_rows, w_hat.narrow(0, k0, kb).t());
        T* p = tile.data_ptr<T>();
        for (int64_t r = 0; r < rows; ++r) {
          scale_cols(p + r * kb, logit_factor + k0, kb);
          forward_block(p + r * kb, k0, kb, yp[start + r], target_pred, states[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const RowState<T>& s = states[r];
        const int64_t n = start + r;
        const double other =
            s.other_max == -kInf ? -kInf : s.other_max + std::log(s.other_sum);  // K == 1: -inf
        const double total = logaddexp(other, static_cast<double>(s.target_logit));
        tp[n] = s.target < 0 ? 0 : s.target;
        lse_p[n] = static_cast<T>(total);
        other_p[n] = static_cast<T>(other);
        label_p[n] = s.label_logit;
        if (s.bad || s.target < 0 || !std::isfinite(lse_p[n]) || std::isnan(other_p[n]))
          record_min(first_bad, n);
      }
    }
  });
  first_bad_row = first_bad.load() == N ? -1 : first_bad.load();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ebm_loss_forward_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels,
                     double inv_temp, double reset, int64_t mask_count, bool target_pred,
                     bool ce_edited, bool normalize) {
  const char* op = "ebm_loss_forward";
  check_inputs(op, x_in, w_in, labels, inv_temp, reset);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": expected CPU tensors");
  const int64_t N = x_in.size(0), K = w_in.size(0), D = x_in.size(1);
  TORCH_CHECK(mask_count >= 1 && mask_count <= D, op, ": mask_count must be in [1, D] = [1, ", D,
              "], got ", mask_count);
  const at::Tensor y = labels.to(at::kLong).contiguous();
  check_index_range(op, "labels", y, K);
  // The out= GEMMs refuse inputs that require grad; grad mode is per thread.
  at::NoGradGuard no_grad;
  const SerialScope serial(is_small(x_in, w_in));
  const at::Tensor x = x_in.detach(), w = w_in.detach();
  const at::ScalarType acc = accumulation_type(x, w);
  const PreparedRows xp = prepare(op, "x", x, acc, normalize, /*as_given_if_safe=*/false, inv_temp);
  const PreparedRows wp = prepare(op, "w", w, acc, normalize, /*as_given_if_safe=*/true, inv_temp);
  const at::Tensor& x_hat = xp.gemm;
  const at::Tensor& w_gemm = wp.gemm;

  auto opts = x_hat.options();
  at::Tensor target = at::empty({N}, opts.dtype(at::kLong));
  at::Tensor lse = at::empty({N}, opts);
  at::Tensor lse_other = at::empty({N}, opts);
  at::Tensor label_logit = at::empty({N}, opts);
  int64_t bad = -1;
  if (acc == at::kDouble) {
    std::vector<double> logit_factor, unused;
    class_factors(wp, inv_temp, logit_factor, unused);
    forward_typed<double>(x_hat, w_gemm, logit_factor.data(), y, target_pred, target, lse,
                          lse_other, label_logit, bad);
  } else {
    std::vector<float> logit_factor, unused;
    class_factors(wp, inv_temp, logit_factor, unused);
    forward_typed<float>(x_hat, w_gemm, logit_factor.data(), y, target_pred, target, lse,
                         lse_other, label_logit, bad);
  }
  TORCH_CHECK(bad < 0, op, ": row ", bad, " has non-finite logits (NaN or infinity in x or w, or ",
              "x.w * inv_temp overflows ", acc, ")");
  const at::Tensor w_scale =
      wp.scaled ? at::tensor(wp.scale, at::TensorOptions().dtype(at::kDouble)).to(acc) : at::Tensor();
  return finish_forward(x_hat, w_gemm, w_scale, y, target, lse, lse_other, label_logit,
                        inv_temp, reset, mask_count, ce_edited);
}

// ---------------------------------------------------------------- backward

// coef * exp(v) for v <= 0 (up to rounding) without denormal results: the coefficient is
// folded into the exponent as log|coef|, and terms below float's normal range become 0.
// (Denormal products of tiny probabilities and a 1/N coefficient run ~100x slower.) The
// range reduction of exp_nonpositive is exact for positive arguments too, up to float's
// exponent range, so coefficients above 1 are fine.
inline __attribute__((always_inline)) float scaled_exp(float v, float log_coef, float sign) {
  const float arg = std::min(std::min(v, 0.0f) + log_coef, 88.0f);
  return arg < -87.0f ? 0.0f : sign * deltakern::cpu::exp_nonpositive(arg);
}

// A row's backward coefficients, each already multiplied by inv_temp (d logit / d x_hat.w_hat),
// the products formed in double so that a huge inv_temp cannot overflow a coefficient.
struct GradRow {
  int64_t t, y;
  double lse, lse_edited, a, b, label_grad;  // a, b, label_grad times inv_temp
};

// One row's raw products in classes [k0, k0 + kb) -> the GEMMs' gradient tile, in place:
//   G_k = (a softmax(l)_k + b softmax(l~)_k [k != t] - label_grad [k == y]) * grad_factor[k]
// with l_k = product_k * logit_factor[k] (a, b, label_grad already times inv_temp). Column t of
// l~ holds the edited logit, which does not depend on l_t, hence the fix-up. `lf` and `gf` point
// at the block's first class. The float variants (portable, AVX2) share the pieces below and
// differ only in how they run the column loop.

// A row's coefficients as the float column loop uses them: one loop for every (a, b), a zero
// coefficient gives log 0 = -inf and its term is 0.
struct GradCoefsF32 {
  float lse, lse_e, log_a, sign_a, log_b, sign_b;
  explicit GradCoefsF32(const GradRow& g)
      : lse(static_cast<float>(g.lse)), lse_e(static_cast<float>(g.lse_edited)),
        log_a(static_cast<float>(std::log(std::abs(g.a)))), sign_a(g.a < 0 ? -1.0f : 1.0f),
        log_b(static_cast<float>(std::log(std::abs(g.b)))), sign_b(g.b < 0 ? -1.0f : 1.0f) {}
};

// The column loop over [begin, end) of the block.
inline __attribute__((always_inline)) void grad_columns_f32(float* row, int64_t begin, int64_t end,
                                                            const float* lf, const float* gf,
                                                            const GradCoefsF32& c) {
#pragma omp simd
  for (int64_t k = begin; k < end; ++k) {
    const float v = row[k] * lf[k];
    row[k] = (scaled_exp(v - c.lse, c.log_a, c.sign_a) + scaled_exp(v - c.lse_e, c.log_b, c.sign_b)) * gf[k];
  }
}

// The target column's logit, read before the loop overwrites the row (0 when t is not in it).
inline __attribute__((always_inline)) float target_logit_f32(const float* row, int64_t kb, int64_t k0,
                                                             const float* lf, const GradRow& g) {
  return g.t >= k0 && g.t < k0 + kb ? row[g.t - k0] * lf[g.t - k0] : 0.0f;
}

// Columns t (edited logit) and y (label term) after the loop.
inline __attribute__((always_inline)) void fix_up_f32(float* row, int64_t kb, int64_t k0, const float* gf,
                                                      const GradRow& g, float logit_t, float lse) {
  if (g.t >= k0 && g.t < k0 + kb)
    row[g.t - k0] = static_cast<float>(g.a * std::exp(std::min(logit_t - lse, 0.0f)) * gf[g.t - k0]);
  if (g.y >= k0 && g.y < k0 + kb) row[g.y - k0] -= static_cast<float>(g.label_grad * gf[g.y - k0]);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void grad_block_f32(float* row, int64_t kb, int64_t k0, const float* lf, const float* gf,
                    const GradRow& g) {
  const float logit_t = target_logit_f32(row, kb, k0, lf, g);
  const GradCoefsF32 c(g);
  grad_columns_f32(row, 0, kb, lf, gf, c);
  fix_up_f32(row, kb, k0, gf, g, logit_t, c.lse);
}

#if DK_LOSS_AVX2
// scaled_exp on 8 lanes, NaN kept NaN as in the scalar version (the operand orders of min_ps,
// and a keep-mask that is true for NaN).
__attribute__((target("avx2,fma"))) inline __m256 scaled_exp8(__m256 v, __m256 log_coef, __m256 sign) {
  const __m256 arg = _mm256_min_ps(
      _mm256_set1_ps(88.0f), _mm256_add_ps(_mm256_min_ps(_mm256_setzero_ps(), v), log_coef));
  const __m256 keep = _mm256_cmp_ps(arg, _mm256_set1_ps(-87.0f), _CMP_NLT_UQ);
  return _mm256_and_ps(keep, _mm256_mul_ps(sign, cpu::exp_nonpositive_avx2(arg)));
}

// grad_block_f32 with the column loop on 8 lanes.
__attribute__((target("avx2,fma")))
void grad_block_avx2(float* row, int64_t kb, int64_t k0, const float* lf, const float* gf,
                     const GradRow& g) {
  const float logit_t = target_logit_f32(row, kb, k0, lf, g);
  const GradCoefsF32 c(g);
  const __m256 l = _mm256_set1_ps(c.lse), le = _mm256_set1_ps(c.lse_e);
  const __m256 la = _mm256_set1_ps(c.log_a), sa = _mm256_set1_ps(c.sign_a);
  const __m256 lb = _mm256_set1_ps(c.log_b), sb = _mm256_set1_ps(c.sign_b);
  int64_t k = 0;
  for (; k + 8 <= kb; k += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(lf + k));
    const __m256 sum = _mm256_add_ps(scaled_exp8(_mm256_sub_ps(v, l), la, sa),
                                     scaled_exp8(_mm256_sub_ps(v, le), lb, sb));
    _mm256_storeu_ps(row + k, _mm256_mul_ps(sum, _mm256_loadu_ps(gf + k)));
  }
  grad_columns_f32(row, k, kb, lf, gf, c);
  fix_up_f32(row, kb, k0, gf, g, logit_t, c.lse);
}
#endif

void grad_block_f64(double* row, int64_t kb, int64_t k0, const double* lf, const double* gf,
                    const GradRow& g) {
  const bool has_t = g.t >= k0 && g.t < k0 + kb;
  const double logit_t = has_t ? row[g.t - k0] * lf[g.t - k0] : 0.0;
  for (int64_t k = 0; k < kb; ++k) {
    const double v = row[k] * lf[k];
    row[k] = (g.a * std::exp(v - g.lse) + g.b * std::exp(std::min(v - g.lse_edited, 0.0))) * gf[k];
  }
  if (has_t) row[g.t - k0] = g.a * std::exp(logit_t - g.lse) * gf[g.t - k0];
  if (g.y >= k0 && g.y < k0 + kb) row[g.y - k0] -= g.label_grad * gf[g.y - k0];
}

void grad_block(float* row, int64_t kb, int64_t k0, const float* lf, const float* gf,
                const GradRow& g) {
#if DK_LOSS_AVX2
  if (use_avx2()) return grad_block_avx2(row, kb, k0, lf, gf, g);
#endif
  grad_block_f32(row, kb, k0, lf, gf, g);
}
void grad_block(double* row, int64_t kb, int64_t k0, const double* lf, const double* gf,
                const GradRow& g) {
  grad_block_f64(row, kb, k0, lf, gf, g);
}

// grad_x_hat = G W and grad_w_hat = G^T X_hat over every tile, G the gradient tiles of
// grad_block (both outputs zero on entry; W as the GEMMs read it, see PreparedRows). Threads split the classes: the class blocks form a fixed
// set of groups (a few per thread) that threads take from a shared counter, so a thread slowed
// by a busy machine takes fewer. Each block's rows of grad_w_hat are written by one thread only;
// each group accumulates its share of grad_x_hat in its own [rows, D] buffer, and the buffers
// are added in group order after the region, so the result does not depend on the schedule
// (autograd's gradcheck asks for a reentrant backward). Rows go in regions of kBackwardRows,
// which bounds those buffers at groups x kBackwardRows x D.
template <typename T>
void backward_gemms(const at::Tensor& x_hat, const at::Tensor& w_hat, const T* logit_factor,
                    const T* grad_factor, const std::vector<GradRow>& rows_info,
                    at::Tensor& grad_x_hat, at::Tensor& grad_w_hat) {
  const int64_t N = x_hat.size(0), K = w_hat.size(0), D = x_hat.size(1);
  const bool needs_x = grad_x_hat.defined(), needs_w = grad_w_hat.defined();
  const int64_t threads = worker_threads();
  const int64_t KB = class_block(K, threads), R = std::min(kRowBlock, N);
  const int64_t num_blocks = (K + KB - 1) / KB;
  const int64_t groups = std::min(num_blocks, kGroupsPerThread * threads);
  at::Tensor dx_groups =
      needs_x ? at::empty({groups, std::min(kBackwardRows, N), D}, x_hat.options()) : at::Tensor();
  for (int64_t s0 = 0; s0 < N; s0 += kBackwardRows) {
    const int64_t region_rows = std::min(kBackwardRows, N - s0);
    if (needs_x) dx_groups.zero_();
    std::atomic<int64_t> next_group{0};
    for_each_thread(threads, [&]() {
      at::Tensor buffer = at::empty({R * KB}, x_hat.options());
      for (int64_t gi = next_group++; gi < groups; gi = next_group++) {
        at::Tensor dx = needs_x ? dx_groups[gi] : at::Tensor();
        for (int64_t bi = gi * num_blocks / groups; bi < (gi + 1) * num_blocks / groups; ++bi) {
          const int64_t k0 = bi * KB, kb = std::min(KB, K - k0);
          const at::Tensor w_block = w_hat.narrow(0, k0, kb);
          at::Tensor dw_block = needs_w ? grad_w_hat.narrow(0, k0, kb) : at::Tensor();
          for (int64_t r0 = 0; r0 < region_rows; r0 += R) {
            const int64_t rows = std::min(R, region_rows - r0);
            const at::Tensor x_rows = x_hat.narrow(0, s0 + r0, rows);
            at::Tensor tile = tile_view(buffer, rows, kb);
            at::mm_out(tile, x_rows, w_block.t());
            T* p = tile.data_ptr<T>();
            for (int64_t r = 0; r < rows; ++r)
              grad_block(p + r * kb, kb, k0, logit_factor + k0, grad_factor + k0,
                         rows_info[s0 + r0 + r]);
            if (needs_x) dx.narrow(0, r0, rows).addmm_(tile, w_block);
            if (needs_w) dw_block.addmm_(tile.t(), x_rows);
          }
        }
      }
    });
    if (needs_x) {
      at::Tensor out = grad_x_hat.narrow(0, s0, region_rows);
      for (int64_t gi = 0; gi < groups; ++gi) out.add_(dx_groups[gi].narrow(0, 0, region_rows));
    }
  }
}

// The target column's term, in place: the edited cosine s_n = sum_d keep_nd x_hat_nd w_hat_td
// adds grad_edited_n keep_nd w_hat_td to x's row n and grad_edited_n keep_nd x_hat_nd to W's row
// t (times W's scale, as the GEMMs' gradient of W's rows). W's rows are visited in row order by
// one thread: several rows may share a target.
template <typename T>
void add_target_terms(at::Tensor& grad_x, at::Tensor& grad_w, const at::Tensor& x_hat,
                      const PreparedRows& w, const at::Tensor& keep, const at::Tensor& grad_edited,
                      const at::Tensor& target) {
  const int64_t N = x_hat.size(0), D = x_hat.size(1);
  const T* xp = x_hat.data_ptr<T>();
  const T* wp = w.gemm.data_ptr<T>();
  const bool* kp = keep.data_ptr<bool>();
  const T* ge = grad_edited.data_ptr<T>();
  const int64_t* tp = target.data_ptr<int64_t>();
  if (grad_x.defined()) {
    T* gx = grad_x.data_ptr<T>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T coef = static_cast<T>(ge[n] * w.scale[tp[n]]);
        const T* wt = wp + tp[n] * D;
        for (int64_t d = 0; d < D; ++d)
          if (kp[n * D + d]) gx[n * D + d] += coef * wt[d];
      }
    });
  }
  if (grad_w.defined()) {
    T* gw = grad_w.data_ptr<T>();
    for (int64_t n = 0; n < N; ++n) {
      const T coef = static_cast<T>(ge[n] * w.scale[tp[n]]);
      T* row = gw + tp[n] * D;
      for (int64_t d = 0; d < D; ++d)
        if (kp[n * D + d]) row[d] += coef * xp[n * D + d];
    }
  }
}

// Through the normalisation v_hat = v / |v|, in place row by row (nothing without normalising):
// g = (g - v_hat (v_hat . g)) * post with v_hat = gemm * scale (PreparedRows), in double.
template <typename T>
void project_rows(at::Tensor& g, const PreparedRows& v, bool normalize) {
  if (!normalize) return;
  const int64_t R = g.size(0), D = g.size(1);
  T* gp = g.data_ptr<T>();
  const T* vp = v.gemm.data_ptr<T>();
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> unit(D);
    for (int64_t r = begin; r < end; ++r) {
      T* row = gp + r * D;
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        unit[d] = static_cast<double>(vp[r * D + d]) * v.scale[r];
        dot += unit[d] * static_cast<double>(row[d]);
      }
      for (int64_t d = 0; d < D; ++d)
        row[d] = static_cast<T>((static_cast<double>(row[d]) - unit[d] * dot) * v.post[r]);
    }
  });
}

// The backward after the per-row coefficients, in the accumulation type T: the tiled GEMMs, the
// target column's term and the projection through the normalisation, into the zeroed grad_x and
// grad_w (undefined: not asked for).
template <typename T>
void backward_in(const PreparedRows& xp, const PreparedRows& wp, double inv_temp,
                 const std::vector<GradRow>& rows_info, const at::Tensor& keep,
                 const at::Tensor& grad_edited, const at::Tensor& target, bool normalize,
                 at::Tensor& grad_x, at::Tensor& grad_w) {
  std::vector<T> logit_factor, grad_factor;
  class_factors(wp, inv_temp, logit_factor, grad_factor);
  backward_gemms<T>(xp.gemm, wp.gemm, logit_factor.data(), grad_factor.data(), rows_info, grad_x,
                    grad_w);
  add_target_terms<T>(grad_x, grad_w, xp.gemm, wp, keep, grad_edited, target);
  if (grad_x.defined()) project_rows<T>(grad_x, xp, normalize);
  if (grad_w.defined()) project_rows<T>(grad_w, wp, normalize);
}

std::tuple<at::Tensor, at::Tensor> ebm_loss_backward_cpu(
    const at::Tensor& grad_ce, const at::Tensor& grad_delta, const at::Tensor& x_in,
    const at::Tensor& w_in, const at::Tensor& labels, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& lse_other, const at::Tensor& edited,
    const at::Tensor& keep, double inv_temp, double reset, bool ce_edited, bool normalize,
    bool needs_x, bool needs_w) {
  const char* op = "ebm_loss_backward";
  check_backward_inputs(grad_ce, grad_delta, x_in, w_in, labels, target, lse, lse_other, edited,
                        keep, inv_temp, reset);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": expected CPU tensors");
  at::Tensor grad_x = at::empty({0}, x_in.options());
  at::Tensor grad_w = at::empty({0}, w_in.options());
  if (!needs_x && !needs_w) return {grad_x, grad_w};
  at::NoGradGuard no_grad;
  const SerialScope serial(is_small(x_in, w_in));
  const at::Tensor x = x_in.detach(), w = w_in.detach();
  const int64_t N = x.size(0), K = w.size(0), D = x.size(1);
  const at::ScalarType acc = accumulation_type(x, w);
  const PreparedRows xp = prepare(op, "x", x, acc, normalize, /*as_given_if_safe=*/false, inv_temp);
  const PreparedRows wp = prepare(op, "w", w, acc, normalize, /*as_given_if_safe=*/true, inv_temp);
  const at::Tensor& x_hat = xp.gemm;
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const at::Tensor t = target.to(at::kLong).contiguous();
  const RowCoefficients c = row_coefficients(grad_ce, grad_delta, y, t, lse, lse_other, edited,
                                             acc, inv_temp, reset, ce_edited);
  // The coefficients as doubles per row (small: N rows), times inv_temp.
  std::vector<GradRow> rows_info(N);
  {
    const at::Tensor cols = at::stack({c.lse, c.lse_edited, c.coef_a, c.coef_b, c.label_grad}, 1)
                                .to(at::kDouble)
                                .contiguous();
    const double* cp = cols.data_ptr<double>();
    const int64_t* tp = t.data_ptr<int64_t>();
    const int64_t* yp = y.data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n) {
      const double* v = cp + 5 * n;
      rows_info[n] = GradRow{tp[n], yp[n], v[0], v[1], v[2] * inv_temp, v[3] * inv_temp,
                             v[4] * inv_temp};
    }
  }
  at::Tensor grad_x_hat = needs_x ? at::zeros({N, D}, x_hat.options()) : at::Tensor();
  at::Tensor grad_w_hat = needs_w ? at::zeros({K, D}, x_hat.options()) : at::Tensor();
  const at::Tensor keep_rows = keep.contiguous();
  if (acc == at::kDouble) {
    backward_in<double>(xp, wp, inv_temp, rows_info, keep_rows, c.grad_edited, t, normalize,
                        grad_x_hat, grad_w_hat);
  } else {
    backward_in<float>(xp, wp, inv_temp, rows_info, keep_rows, c.grad_edited, t, normalize,
                       grad_x_hat, grad_w_hat);
  }
  if (needs_x) grad_x = grad_x_hat.to(x.scalar_type());
  if (needs_w) grad_w = grad_w_hat.to(w.scalar_type());
  return {grad_x, grad_w};
}

}  // namespace
}  // namespace host
}  // namespace loss
}  // namespace deltakern

TORCH_LIBRARY_IMPL(deltakern, CPU, m) {
  m.impl("ebm_loss_forward", &deltakern::loss::host::ebm_loss_forward_cpu);
  m.impl("ebm_loss_backward", &deltakern::loss::host::ebm_loss_backward_cpu);
}
