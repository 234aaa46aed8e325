// CPU implementation of deltakern::fused_score_state.
//
// Scale in the epilogue: the GEMM runs on the rows of x as given (no normalised copy of X),
// each row's norm is computed once, robustly, and the per-row factor inv_temp/|x| (times
// 1/|w_k| per column when W cannot be pre-normalised) is applied to each logit in the epilogue,
// which then reduces the row to its top-c list and outside log-sum-exp. W (small) is prepared
// once. Each thread takes chunks of rows in turn from a shared counter and runs norms, a
// single-threaded GEMM and the epilogue on them with its own buffers, sized so that a chunk's
// logits (chunk x K floats, ~1 MB) and converted rows stay in cache. Extra memory is
// O(threads*chunk*(K + D) + K*D), never O(N*K).
//
// GEMM per input dtype:
//   float32: at::mm (MKL sgemm) on x as given and the unit-norm float32 W.
//   float64 (either input): the same in float64.
//   bfloat16/float16 (both inputs, same dtype): on a CPU with native half-precision matrix
//     instructions, a GEMM with half inputs and float32 accumulation and output (products of
//     half values are exact in float32): MKL's mixed GEMM with AMX (bf16, fp16) or AVX512-FP16,
//     this extension's AVX512-BF16 kernel for bfloat16 without AMX (bf16_gemm_avx512.h).
//     Elsewhere a chunk of x is converted to float32 in cache and multiplied by the float32 W,
//     which is faster there. DELTAKERN_CPU_HALF_GEMM=auto|mkl|avx512_bf16|float32 forces one.
//   float32 with bf16_products (matmul_precision "high"/"medium"): on a CPU with native bf16, each
//     chunk of x is rounded to bfloat16 in cache and multiplied by a bfloat16 copy of W with the
//     same bfloat16 GEMM (norms still come from the float32 rows); elsewhere the float32 GEMM,
//     which is faster there and exact.
//
// Range safety: a dot product of rows as given can under- or overflow where the normalised one
// would not (a row at 1e-30 times W at 1e-20). A row whose norm lies outside a wide safe range
// (or whose factor inv_temp/|x| would overflow) is copied scaled by a power of two, which is exact,
// so tiny and huge finite rows are normalised within the accuracy contract.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "bf16_gemm_avx512.h"
#include "half_gemm.h"
#include "row_reduce.h"
#include "rows.h"

namespace deltakern {
namespace cpu {
namespace {

constexpr int64_t kChunkElements = int64_t{1} << 18;  // logits (or converted x) per chunk (1 MB)
constexpr int64_t kMinChunkRows = 256;  // keeps the matmul efficient for huge K (20 MB at K = 20000)
// Norms for which the GEMM on rows as given is exact to the contract: products that underflow
// are then below 2^-60 of the dot product's scale, and nothing can overflow.
constexpr double kFloatSafeLow = 0x1p-60, kFloatSafeHigh = 0x1p60;
constexpr double kHalfSafeLow = 0x1p-30, kHalfSafeHigh = 0x1p30;  // both factors of a half GEMM
constexpr double kDoubleSafeLow = 0x1p-500, kDoubleSafeHigh = 0x1p500;

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Everything the loops below rely on, so that a direct call of the op cannot read out of bounds,
// hang or return garbage for a bad argument.
void check_arguments(const at::Tensor& x, const at::Tensor& w, double inv_temp, int64_t c) {
  TORCH_CHECK(x.defined() && w.defined(), "fused_score_state: x and w must be tensors");
  TORCH_CHECK(x.layout() == at::kStrided && w.layout() == at::kStrided,
              "fused_score_state: x and w must be dense (strided) tensors, got ", x.layout(),
              " and ", w.layout());
  TORCH_CHECK(x.dim() == 2, "fused_score_state: x must be 2-D [N, D], got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2, "fused_score_state: w must be 2-D [K, D], got shape ", w.sizes());
  TORCH_CHECK(supported_dtype(x.scalar_type()),
              "fused_score_state: x must be float16, bfloat16, float32 or float64, got ",
              dtype_name(x.scalar_type()));
  TORCH_CHECK(supported_dtype(w.scalar_type()),
              "fused_score_state: w must be float16, bfloat16, float32 or float64, got ",
              dtype_name(w.scalar_type()));
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(),
              "fused_score_state: this kernel takes CPU tensors, got x on ", x.device(),
              " and w on ", w.device());
  TORCH_CHECK(x.size(1) == w.size(1), "fused_score_state: x and w must have the same D, got x ",
              x.sizes(), " and w ", w.sizes());
  TORCH_CHECK(c >= 1 && c <= w.size(0), "fused_score_state: c must satisfy 1 <= c <= K = ",
              w.size(0), " (the rows of w), got ", c);
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0.0,
              "fused_score_state: inv_temp must be finite and > 0, got ", inv_temp);
}

// ---------------------------------------------------------------- half-precision GEMM choice

// How this call multiplies: in a half dtype when both inputs have the same half dtype (or, with
// bf16_products, both are float32 and their rows are rounded to bfloat16 in cache) and the chosen
// GEMM takes x's layout; nullopt for the float32/float64 GEMM.
struct HalfPlan {
  at::ScalarType dtype;  // the dtype the GEMM multiplies in
  HalfGemm gemm;
};

std::optional<HalfPlan> half_gemm_plan(const at::Tensor& x, const at::Tensor& w, bool bf16_products) {
  const bool rounded = bf16_products && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat;
  const at::ScalarType t = rounded ? at::kBFloat16 : x.scalar_type();
  if (!rounded && (t != w.scalar_type() || (t != at::kBFloat16 && t != at::kHalf))) return std::nullopt;
  const std::optional<HalfGemm> gemm = requested_half_gemm(t);
  if (!gemm) return std::nullopt;
  const int64_t D = x.size(1);
  // Rounded rows are multiplied from a contiguous buffer; half rows are read where they are, with
  // MKL's int sizes and strides.
  const bool mkl_sizes = D <= INT_MAX && w.size(0) <= INT_MAX && (rounded || x.stride(0) <= INT_MAX);
  const bool layout_ok = D >= 1 && (rounded || (x.stride(1) == 1 && x.stride(0) >= D)) &&
                         (*gemm != HalfGemm::kMkl || mkl_sizes);
  return layout_ok ? std::optional{HalfPlan{t, *gemm}} : std::nullopt;
}

// ---------------------------------------------------------------- norms and prepared W

// Robust L2 norms (double) of `count` rows of a float or double matrix with unit column stride.
void row_norms(const at::Tensor& rows, int64_t count, double* out) {
  const int64_t D = rows.size(1), stride = rows.stride(0);
  if (rows.scalar_type() == at::kDouble) {
    const double* base = rows.data_ptr<double>();
    at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) out[r] = norm_f64(base + r * stride, D);
    });
  } else {
    const float* base = rows.data_ptr<float>();
    at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) out[r] = std::sqrt(sum_squares_f32(base + r * stride, D));
    });
  }
}

// The first row whose norm cannot normalise it (non-finite or zero) as (index, message), or
// (-1, "") when every row is fine.
std::pair<int64_t, std::string> bad_norm(const char* name, const double* norms, int64_t count,
                                         int64_t offset) {
  for (int64_t r = 0; r < count; ++r) {
    if (!std::isfinite(norms[r])) {
      return {offset + r, c10::str("fused_score_state: row ", offset + r, " of ", name,
                                   " has a non-finite L2 norm (a NaN or ±inf entry, or a norm beyond "
                                   "float64's range)")};
    }
    if (norms[r] == 0.0) {
      return {offset + r, c10::str("fused_score_state: row ", offset + r, " of ", name,
                                   " is zero; normalize=True needs rows with a non-zero norm")};
    }
  }
  return {-1, ""};
}

void check_norms(const char* name, const double* norms, int64_t count, int64_t offset) {
  const auto [row, message] = bad_norm(name, norms, count, offset);
  TORCH_CHECK(row < 0, message);
}

// The error of the lowest row found by any thread, raised after the parallel region so that a
// call reports the same row however its chunks were scheduled.
class FirstError {
 public:
  void record(int64_t row, std::string message) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (row_ < 0 || row < row_) {
      row_ = row;
      message_ = std::move(message);
    }
  }
  // False once a row below `row` has failed (later chunks then stop early).
  bool clear_below(int64_t row) {
    std::lock_guard<std::mutex> lock(mutex_);
    return row_ < 0 || row_ > row;
  }
  void raise() const { TORCH_CHECK(row_ < 0, message_); }

 private:
  std::mutex mutex_;
  int64_t row_ = -1;
  std::string message_;
};

// rows[r, :] *= 2^e for the listed (r, e): exact with ldexp, also where 2^e itself is past the
// dtype's range (a subnormal row scaled up). `rows` is one of this op's own buffers.
void scale_rows(at::Tensor& rows, const std::vector<std::pair<int64_t, int>>& exponents) {
  const int64_t D = rows.size(1);
  for (const auto& [r, e] : exponents) {
    if (rows.scalar_type() == at::kDouble) {
      double* row = rows.data_ptr<double>() + r * rows.stride(0);
      for (int64_t d = 0; d < D; ++d) row[d] = std::ldexp(row[d], e);
    } else {
      float* row = rows.data_ptr<float>() + r * rows.stride(0);
      for (int64_t d = 0; d < D; ++d) row[d] = std::ldexp(row[d], e);
    }
  }
}

// W converted to `acc` (a new tensor, never the caller's) and, when normalising, scaled to unit
// rows with robust norms.
at::Tensor prepare_w(const at::Tensor& w, at::ScalarType acc, bool normalize, const char* name) {
  at::Tensor out = w.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  const int64_t K = out.size(0), D = out.size(1);
  if (!normalize) {
    TORCH_CHECK(at::isfinite(out).all().item<bool>(), "fused_score_state: ", name, " holds NaN or ±inf");
    return out;
  }
  std::vector<double> norms(K);
  row_norms(out, K, norms.data());
  check_norms(name, norms.data(), K, 0);
  // Divide in double: 1/norm of a subnormal float row is past float's range, and a float64 row
  // that far out is first brought near 1 by an exact power of two.
  at::parallel_for(0, K, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      if (acc == at::kDouble) {
        double* row = out.data_ptr<double>() + k * D;
        if (norms[k] > 0x1p-1000 && norms[k] < 0x1p1000) {
          const double inv = 1.0 / norms[k];
          for (int64_t d = 0; d < D; ++d) row[d] *= inv;
        } else {
          const int e = -std::ilogb(norms[k]);
          const double inv = 1.0 / std::ldexp(norms[k], e);
          for (int64_t d = 0; d < D; ++d) row[d] = std::ldexp(row[d], e) * inv;
        }
      } else {
        float* row = out.data_ptr<float>() + k * D;
        const double inv = 1.0 / norms[k];
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(static_cast<double>(row[d]) * inv);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------- the epilogue

struct ChunkScales {
  std::vector<float> row_f32;  // per row of the chunk: inv_temp / |x| (or inv_temp)
  std::vector<double> row_f64;
  const float* col = nullptr;  // per class: 1/|w_k| when W is used as given, else null
};

// Scales, checks and reduces `rows` rows of logits; the first non-finite row's index or -1.
int64_t reduce_chunk(at::Tensor& logits, int64_t rows, int64_t start, int64_t c,
                     const ChunkScales& s, at::Tensor& top_values, int64_t* idx, at::Tensor& lse) {
  const int64_t K = logits.size(1);
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  const auto flag = [&first_bad](int64_t n) {
    int64_t seen = first_bad.load();
    while (n < seen && !first_bad.compare_exchange_weak(seen, n)) {
    }
  };
  if (logits.scalar_type() == at::kDouble) {
    double* lg = logits.data_ptr<double>();
    double* tv = top_values.data_ptr<double>();
    double* lo = lse.data_ptr<double>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = start + r;
        if (!scale_row_f64(lg + r * K, K, s.row_f64[r])) {
          flag(n);
          continue;
        }
        lo[n] = reduce_row_f64(lg + r * K, K, c, tv + n * c, idx + n * c);
      }
    });
  } else {
    float* lg = logits.data_ptr<float>();
    float* tv = top_values.data_ptr<float>();
    float* lo = lse.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = start + r;
        if (!scale_reduce_row_f32(lg + r * K, K, s.row_f32[r], s.col, c, tv + n * c, idx + n * c, lo + n)) {
          flag(n);
        }
      }
    });
  }
  const int64_t bad = first_bad.load();
  return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
}

// ---------------------------------------------------------------- negative-label groups

// The class matrix of one GEMM in the chunk loop: the ID classes, or the negative labels of the
// NegLabel state. Each is used as given with per-class factors 1/|w_k| by the half GEMM, or as
// a prepared copy with unit rows (as given without normalize) by the acc GEMM.
struct ClassRows {
  const char* name;
  at::Tensor given;             // the caller's rows (detached), never written
  at::Tensor native;            // contiguous half rows for MKL's mixed GEMM
  Bf16PackedClasses packed;     // the rows in the AVX512-BF16 kernel's layout (that kernel's GEMM)
  std::vector<float> col_scale; // per row: 1/|w_k| (half GEMM with normalize)
  at::Tensor prepared;          // [rows, D] in acc, for the acc GEMM
  at::Tensor prepared_t;

  // Sets up the half-GEMM operand; false when a row's norm is outside the half GEMM's safe range.
  bool setup_native(bool normalize, const HalfPlan& plan) {
    if (plan.gemm == HalfGemm::kAvx512Bf16) packed = pack_bf16_classes(given.to(plan.dtype));
    else native = given.to(plan.dtype).contiguous();
    if (!normalize) {
      TORCH_CHECK(at::isfinite(given).all().item<bool>(), "fused_score_state: ", name, " holds NaN or ±inf");
      return true;
    }
    const int64_t K = given.size(0);
    std::vector<double> norms(K);
    row_norms(given.to(at::kFloat).contiguous(), K, norms.data());
    check_norms(name, norms.data(), K, 0);
    col_scale.resize(K);
    for (int64_t k = 0; k < K; ++k) col_scale[k] = static_cast<float>(1.0 / norms[k]);
    return std::all_of(norms.begin(), norms.end(),
                       [](double v) { return v >= kHalfSafeLow && v <= kHalfSafeHigh; });
  }

  void prepare(at::ScalarType acc, bool normalize) {
    prepared = prepare_w(given, acc, normalize, name);
    prepared_t = prepared.t();
  }

  // logits[rows, K] = a · prepared^T (acc GEMM) or xc · given^T in half precision (xc: the
  // chunk's rows in the half GEMM's dtype, unit column stride).
  void multiply(at::Tensor& logits, const at::Tensor& a, const at::Tensor& xc, bool half) const {
    if (!half) {
      at::mm_out(logits, a, prepared_t);
      return;
    }
    const int64_t rows = logits.size(0), K = logits.size(1), D = xc.size(1);
    if (packed.data.defined()) {
      bf16_gemm_avx512(packed, xc.data_ptr<at::BFloat16>(), rows, xc.stride(0), logits.data_ptr<float>(), K);
      return;
    }
    mkl_mixed_gemm(xc.scalar_type(), static_cast<int>(rows), static_cast<int>(K), static_cast<int>(D),
                   xc.data_ptr(), static_cast<int>(xc.stride(0)), native.data_ptr(), static_cast<int>(D),
                   logits.data_ptr<float>(), static_cast<int>(K));
  }
};

// Scales `rows` rows of negative-label logits and reduces each to the log-sum-exp of each of
// `groups` consecutive, equal column blocks; the first non-finite row's index or -1.
int64_t reduce_negative_chunk(at::Tensor& logits, int64_t rows, int64_t start, int64_t groups,
                              const ChunkScales& s, at::Tensor& lse_neg) {
  const int64_t M = logits.size(1), size = M / groups;
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = start + r;
      bool finite;
      if (logits.scalar_type() == at::kDouble) {
        double* row = logits.data_ptr<double>() + r * M;
        double* out = lse_neg.data_ptr<double>() + n * groups;
        finite = scale_row_f64(row, M, s.row_f64[r]);
        for (int64_t g = 0; finite && g < groups; ++g) out[g] = lse_row_f64(row + g * size, size);
      } else {
        float* row = logits.data_ptr<float>() + r * M;
        float* out = lse_neg.data_ptr<float>() + n * groups;
        finite = scale_row_f32(row, M, s.row_f32[r], s.col);
        for (int64_t g = 0; finite && g < groups; ++g) out[g] = lse_row_f32(row + g * size, size);
      }
      if (!finite) {
        int64_t seen = first_bad.load();
        while (n < seen && !first_bad.compare_exchange_weak(seen, n)) {
        }
      }
    }
  });
  const int64_t bad = first_bad.load();
  return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
}

// ---------------------------------------------------------------- the op

// The state of both ops. `w_neg` undefined: the ID state alone (fused_score_state); else also
// the [N, groups] log-sum-exps against `groups` consecutive equal blocks of the rows of w_neg,
// from the same pass over x: each chunk of rows is read, normed and converted once and meets
// both class matrices while it is in cache.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_state(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& w_neg_in, double inv_temp,
    int64_t c, int64_t groups, bool normalize, bool bf16_products) {
  check_arguments(x_in, w_in, inv_temp, c);
  const bool has_neg = w_neg_in.defined();
  // Scores are computed without autograd: the out= GEMM refuses inputs that require grad, and
  // grad mode is per thread, so the inputs are detached (views of the same memory, never written).
  at::NoGradGuard no_grad;
  const at::Tensor x = x_in.detach();
  const int64_t N = x.size(0), K = w_in.size(0), D = x.size(1);
  const int64_t M = has_neg ? w_neg_in.size(0) : 0;
  const at::ScalarType acc = accumulation_type(x, w_in);
  const bool f64 = acc == at::kDouble;

  auto opts = x.options().dtype(acc);
  at::Tensor top_values = at::empty({N, c}, opts);
  at::Tensor top_indices = at::empty({N, c}, opts.dtype(at::kLong));
  at::Tensor lse_outside = at::empty({N}, opts);
  at::Tensor lse_neg = has_neg ? at::empty({N, groups}, opts) : at::Tensor();
  if (N == 0) return {top_values, top_indices, lse_outside, lse_neg};

  // The class matrices: the half GEMM uses them as given with per-class factors 1/|w_k|; every
  // other GEMM uses prepared copies, built once, before the parallel region, which only reads
  // them (a native chunk can fall back to them).
  std::vector<ClassRows> classes;
  classes.push_back(ClassRows{"w", w_in.detach()});
  if (has_neg) classes.push_back(ClassRows{"negatives", w_neg_in.detach()});
  const std::optional<HalfPlan> half = f64 ? std::nullopt : half_gemm_plan(x, classes[0].given, bf16_products);
  bool native = half.has_value();
  if (native) {
    for (auto& cls : classes) native = cls.setup_native(normalize, *half) && native;
  }
  // float32 rows rounded to bfloat16 for the half GEMM, chunk by chunk in cache.
  const bool round_x = native && x.scalar_type() != half->dtype;
  if (!native || normalize) {
    for (auto& cls : classes) cls.prepare(acc, normalize);
  }

  // One parallel region for the whole op: each thread takes chunks in increasing order from a
  // shared counter and runs norms, GEMM (single-threaded inside the region) and epilogue on them
  // with its own buffers. Three regions per chunk (norms, a multi-threaded GEMM, epilogue) made
  // every chunk wait for the slowest core three times, which a busy machine punished far more
  // than one GEMM; and a fixed split into one range per thread left the other cores idle at the
  // end for as long as the core that the machine slowed (another process, a VM's stolen time)
  // lagged behind, where taking chunks on demand keeps every core busy to the end.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_row = std::max(K + M, D);
  const int64_t cache_rows = std::max(kMinChunkRows, kChunkElements / std::max<int64_t>(per_row, 1));
  const int64_t chunk = std::max<int64_t>(1, std::min(cache_rows, (N + threads - 1) / threads));
  const int64_t num_chunks = (N + chunk - 1) / chunk;
  // x as the GEMM reads it directly: its own dtype is the GEMM's, with unit column stride.
  const bool x_direct = x.scalar_type() == acc && x.stride(1) == 1;
  const double safe_low = f64 ? kDoubleSafeLow : kFloatSafeLow;
  const double safe_high = f64 ? kDoubleSafeHigh : kFloatSafeHigh;
  const double scale_max = f64 ? DBL_MAX / 4 : FLT_MAX / 4;
  int64_t* idx_ptr = top_indices.data_ptr<int64_t>();

  FirstError errors;
  // Chunks are handed out in increasing order, so a chunk below a failed row is always
  // processed: the error raised is the lowest failing row's, however the chunks were shared.
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, std::min(threads, num_chunks), 1, [&](int64_t, int64_t) {
    at::Tensor logits_buf = at::empty({chunk, K}, opts);
    at::Tensor neg_buf = has_neg ? at::empty({chunk, M}, opts) : at::Tensor();
    at::Tensor x_buf;  // converted (and where needed rescaled) rows of x, in acc
    at::Tensor x_half_buf;  // rows of float32 x rounded for the half GEMM (round_x)
    std::vector<double> norms(chunk);
    std::vector<std::pair<int64_t, int>> rescale;  // (row, e): the row is multiplied by 2^e
    ChunkScales scales;
    scales.row_f32.resize(f64 ? 0 : chunk);
    scales.row_f64.resize(f64 ? chunk : 0);

    for (int64_t ci = next_chunk.fetch_add(1); ci < num_chunks; ci = next_chunk.fetch_add(1)) {
      const int64_t start = ci * chunk;
      if (!errors.clear_below(start)) break;  // a lower row already failed
      const int64_t rows = std::min(chunk, N - start);
      const at::Tensor xc = x.narrow(0, start, rows);
      // `a`: the chunk's rows in acc, read by the norms and by the acc GEMM: x itself where
      // possible, else an exact conversion in the cache-sized buffer (the native half GEMM reads
      // x itself and needs the conversion only for the norms).
      at::Tensor a;
      bool in_buffer = false;
      const auto to_buffer = [&]() {
        if (!x_buf.defined()) x_buf = at::empty({chunk, D}, opts);
        a = x_buf.narrow(0, 0, rows);
        a.copy_(xc);
        in_buffer = true;
      };
      if (x_direct) {
        a = xc;
      } else if (!native || normalize) {
        to_buffer();
      }

      bool chunk_native = native;
      if (normalize) {
        row_norms(a, rows, norms.data());
        if (auto [row, message] = bad_norm("x", norms.data(), rows, start); row >= 0) {
          errors.record(row, std::move(message));
          break;
        }
        rescale.clear();
        for (int64_t r = 0; r < rows; ++r) {
          const double v = norms[r];
          const bool big_scale = inv_temp / v > scale_max;
          if (v < kHalfSafeLow || v > kHalfSafeHigh || big_scale) chunk_native = false;
          if (v < safe_low || v > safe_high || big_scale) {
            rescale.emplace_back(r, -std::ilogb(v));  // v * 2^e in [1, 2)
          }
        }
        // A row outside the half GEMM's safe range sends its chunk to the acc GEMM (rare); a row
        // outside the acc GEMM's safe range is multiplied by a power of two, which is exact.
        if (!rescale.empty() && !chunk_native) {
          if (!in_buffer) to_buffer();
          scale_rows(a, rescale);
          for (const auto& [r, e] : rescale) norms[r] = std::ldexp(norms[r], e);
        }
        for (int64_t r = 0; r < rows; ++r) {
          if (f64) scales.row_f64[r] = inv_temp / norms[r];
          else scales.row_f32[r] = static_cast<float>(inv_temp / norms[r]);
        }
      } else {
        if (f64) std::fill(scales.row_f64.begin(), scales.row_f64.end(), inv_temp);
        else std::fill(scales.row_f32.begin(), scales.row_f32.end(), static_cast<float>(inv_temp));
      }

      const auto col_scale = [&](const ClassRows& cls) -> const float* {
        return chunk_native && normalize ? cls.col_scale.data() : nullptr;
      };
      at::Tensor x_half = xc;
      if (chunk_native && round_x) {
        if (!x_half_buf.defined()) x_half_buf = at::empty({chunk, D}, x.options().dtype(half->dtype));
        x_half = x_half_buf.narrow(0, 0, rows);
        x_half.copy_(xc);
      }
      at::Tensor logits = logits_buf.narrow(0, 0, rows);
      classes[0].multiply(logits, a, x_half, chunk_native);
      scales.col = col_scale(classes[0]);
      int64_t bad = reduce_chunk(logits, rows, start, c, scales, top_values, idx_ptr, lse_outside);
      const char* against = "";
      if (bad < 0 && has_neg) {
        at::Tensor neg_logits = neg_buf.narrow(0, 0, rows);
        classes[1].multiply(neg_logits, a, x_half, chunk_native);
        scales.col = col_scale(classes[1]);
        bad = reduce_negative_chunk(neg_logits, rows, start, groups, scales, lse_neg);
        against = " against the negatives";
      }
      if (bad >= 0) {
        errors.record(bad, c10::str("fused_score_state: the logits of row ", bad, against,
                                    " are not finite: x or w holds NaN or ±inf, or x·wᵀ·inv_temp ",
                                    "overflows ", dtype_name(acc), " (rescale the inputs or pass float64)"));
        break;
      }
    }
  });
  errors.raise();
  return {top_values, top_indices, lse_outside, lse_neg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_score_state_cpu(const at::Tensor& x,
                                                                     const at::Tensor& w,
                                                                     double inv_temp, int64_t c,
                                                                     bool normalize, bool bf16_products) {
  auto [top_values, top_indices, lse_outside, unused] =
      fused_state(x, w, at::Tensor(), inv_temp, c, /*groups=*/1, normalize, bf16_products);
  return {top_values, top_indices, lse_outside};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_score_neg_state_cpu(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_neg, double inv_temp, int64_t c,
    int64_t groups, bool normalize, bool bf16_products) {
  check_arguments(x, w, inv_temp, c);
  TORCH_CHECK(w_neg.defined() && w_neg.layout() == at::kStrided && w_neg.dim() == 2,
              "fused_score_neg_state: w_neg must be a dense 2-D tensor [M, D]");
  TORCH_CHECK(w.defined() && w_neg.scalar_type() == w.scalar_type(),
              "fused_score_neg_state: w_neg must have w's dtype ", dtype_name(w.scalar_type()),
              ", got ", dtype_name(w_neg.scalar_type()));
  TORCH_CHECK(w_neg.device().is_cpu(), "fused_score_neg_state: w_neg must be a CPU tensor, got ",
              w_neg.device());
  TORCH_CHECK(w_neg.size(1) == x.size(1), "fused_score_neg_state: w_neg must have x's D = ",
              x.size(1), ", got shape ", w_neg.sizes());
  TORCH_CHECK(groups >= 1 && w_neg.size(0) >= groups && w_neg.size(0) % groups == 0,
              "fused_score_neg_state: groups must divide the M = ", w_neg.size(0),
              " rows of w_neg into equal non-empty groups, got groups = ", groups);
  return fused_state(x, w, w_neg, inv_temp, c, groups, normalize, bf16_products);
}

}  // namespace
}  // namespace cpu
}  // namespace deltakern

TORCH_LIBRARY_IMPL(deltakern, CPU, m) {
  m.impl("fused_score_state", &deltakern::cpu::fused_score_state_cpu);
  m.impl("fused_score_neg_state", &deltakern::cpu::fused_score_neg_state_cpu);
}
