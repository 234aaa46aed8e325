// One-pass top-c + outside log-sum-exp of a row (see row_reduce.h for why).
#include "row_reduce.h"

#include <cmath>

namespace deltakern {
namespace cpu {
namespace {

// Adds one logit to a running log-sum-exp, rescaling the sum when the maximum grows.
template <typename T>
inline void lse_add(T& max, double& sum, T x) {
  if (x > max) {
    sum = sum * std::exp(static_cast<double>(max - x)) + 1.0;
    max = x;
  } else {
    sum += std::exp(static_cast<double>(x - max));
  }
}

// The sorted top-c list of a row. Candidates arrive in increasing column order, so a new
// value is placed after every equal one: ties keep the lower class index first.
template <typename T>
struct TopList {
  T* values;
  int64_t* indices;
  int64_t capacity;
  int64_t filled = 0;

  bool accepts(T x) const { return filled < capacity || x > values[capacity - 1]; }

  // Inserts (x, j); returns true and the evicted value in `evicted` when the list was full.
  bool insert(T x, int64_t j, T& evicted) {
    const bool full = filled == capacity;
    int64_t pos = full ? capacity - 1 : filled;
    if (full) evicted = values[capacity - 1];
    while (pos > 0 && values[pos - 1] < x) {
      values[pos] = values[pos - 1];
      indices[pos] = indices[pos - 1];
      --pos;
    }
    values[pos] = x;
    indices[pos] = j;
    if (!full) ++filled;
    return full;
  }

  T threshold() const {
    return filled < capacity ? -std::numeric_limits<T>::infinity() : values[capacity - 1];
  }
};

template <typename T>
inline void take_scalar(TopList<T>& top, T& max, double& sum, T x, int64_t j) {
  if (top.accepts(x)) {
    // Initialised although insert() writes it whenever it returns true: GCC cannot see that
    // through the inlined loop and warns (-Wmaybe-uninitialized).
    T evicted = -std::numeric_limits<T>::infinity();
    if (top.insert(x, j, evicted)) lse_add(max, sum, evicted);
  } else {
    lse_add(max, sum, x);
  }
}

template <typename T>
inline T finish(T max, double sum) {
  return sum > 0.0 ? static_cast<T>(static_cast<double>(max) + std::log(sum))
                   : -std::numeric_limits<T>::infinity();
}

}  // namespace

// Blocks of 64 logits: a block whose maximum is not above the current c-th value lies wholly
// outside the top-c list (equal values have higher indices, so they rank lower), and its
// exponentials are summed with vector instructions. Only blocks holding a new top-c candidate
// take the scalar path, which after the first few blocks is rare.
__attribute__((target_clones("avx512f", "avx2", "default")))
float reduce_row_f32(const float* row, int64_t K, int64_t c, float* top_values,
                     int64_t* top_indices) {
  constexpr int64_t kBlock = 64;
  TopList<float> top{top_values, top_indices, c};
  float max = -std::numeric_limits<float>::infinity();
  double sum = 0.0;
  int64_t j = 0;
  for (; j + kBlock <= K; j += kBlock) {
    const float* block = row + j;
    float block_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : block_max)
    for (int64_t t = 0; t < kBlock; ++t) block_max = block[t] > block_max ? block[t] : block_max;
    if (block_max <= top.threshold()) {
      if (block_max > max) {
        sum *= std::exp(static_cast<double>(max - block_max));
        max = block_max;
      }
      const float shift = max;
      float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
      for (int64_t t = 0; t < kBlock; ++t) block_sum += exp_nonpositive(block[t] - shift);
      sum += block_sum;
    } else {
      for (int64_t t = 0; t < kBlock; ++t) take_scalar(top, max, sum, block[t], j + t);
    }
  }
  for (; j < K; ++j) take_scalar(top, max, sum, row[j], j);
  return finish(max, sum);
}

double reduce_row_f64(const double* row, int64_t K, int64_t c, double* top_values,
                      int64_t* top_indices) {
  TopList<double> top{top_values, top_indices, c};
  double max = -std::numeric_limits<double>::infinity();
  double sum = 0.0;
  for (int64_t j = 0; j < K; ++j) take_scalar(top, max, sum, row[j], j);
  return finish(max, sum);
}

}  // namespace cpu
}  // namespace deltakern
