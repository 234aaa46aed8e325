// The AVX512-BF16 GEMM of bf16_gemm_avx512.h.
//
// Register tile: MR <= 8 rows of x times NZ <= 3 blocks of 16 classes, 24 float32 accumulators
// in zmm registers. Each step over a pair of dimensions loads NZ vectors of packed W and
// broadcasts each row's pair (one 32-bit value), then issues MR x NZ vdpbf16ps. Loop order: for
// each column tile of 48 classes (48 KB of packed W at D = 512, kept in L2 while it is used), all
// rows of the call (the ops pass a cache-sized chunk), so W streams from memory once per chunk and
// the chunk's rows stay in cache.
#include "bf16_gemm_avx512.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "cpu_features.h"

#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 9) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define DELTAKERN_AVX512_BF16_KERNEL 1
#include <immintrin.h>
#endif

namespace deltakern {
namespace cpu {
namespace {

constexpr int64_t kLanes = 16;  // classes per block: one zmm of float32
constexpr int kMaxRows = 8;     // MR
constexpr int kMaxBlocks = 3;   // NZ

#ifdef DELTAKERN_AVX512_BF16_KERNEL
#define DELTAKERN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// acc[m][z] += x[m, 2p:2p+2] · W[block z, pair p] for one pair of dimensions; with kOdd the
// row's last (odd) dimension pairs with zero (packed W holds zero there too): reading two values
// would go past the row's end.
template <int MR, int NZ, bool kOdd>
DELTAKERN_AVX512_BF16 inline __attribute__((always_inline)) void pair_step(
    __m512 (&acc)[MR][NZ], const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t block_stride, int64_t p) {
  __m512bh b[NZ];
  for (int z = 0; z < NZ; ++z) b[z] = (__m512bh)_mm512_loadu_si512(w + z * block_stride + p * 2 * kLanes);
  for (int m = 0; m < MR; ++m) {
    int32_t pair = 0;
    if constexpr (kOdd) {
      pair = x[m * ldx + 2 * p];
    } else {
      std::memcpy(&pair, x + m * ldx + 2 * p, sizeof(pair));  // two bfloat16 values, any alignment
    }
    const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
    for (int z = 0; z < NZ; ++z) acc[m][z] = _mm512_dpbf16_ps(acc[m][z], a, b[z]);
  }
}

// out[m, z*16 + l] = x[m, :] · W[class of lane l in block z], for m < MR, z < NZ; the last
// block's lanes past K are masked off. `pairs` full dimension pairs, then the odd dimension.
template <int MR, int NZ>
DELTAKERN_AVX512_BF16 void tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t block_stride,
                                int64_t pairs, bool odd, float* out, int64_t ldo, __mmask16 last_mask) {
  __m512 acc[MR][NZ];
  for (int m = 0; m < MR; ++m) {
    for (int z = 0; z < NZ; ++z) acc[m][z] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p) pair_step<MR, NZ, false>(acc, x, ldx, w, block_stride, p);
  if (odd) pair_step<MR, NZ, true>(acc, x, ldx, w, block_stride, pairs);
  for (int m = 0; m < MR; ++m) {
    for (int z = 0; z + 1 < NZ; ++z) _mm512_storeu_ps(out + m * ldo + z * kLanes, acc[m][z]);
    _mm512_mask_storeu_ps(out + m * ldo + (NZ - 1) * kLanes, last_mask, acc[m][NZ - 1]);
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, bool, float*, int64_t,
                        __mmask16);

template <int MR>
constexpr TileFn tile_of_blocks(int nz) {
  return nz == 1 ? tile<MR, 1> : nz == 2 ? tile<MR, 2> : tile<MR, 3>;
}

// kTiles[MR - 1][NZ - 1]: full tiles and the row and column tails.
constexpr TileFn kTiles[kMaxRows][kMaxBlocks] = {
    {tile_of_blocks<1>(1), tile_of_blocks<1>(2), tile_of_blocks<1>(3)},
    {tile_of_blocks<2>(1), tile_of_blocks<2>(2), tile_of_blocks<2>(3)},
    {tile_of_blocks<3>(1), tile_of_blocks<3>(2), tile_of_blocks<3>(3)},
    {tile_of_blocks<4>(1), tile_of_blocks<4>(2), tile_of_blocks<4>(3)},
    {tile_of_blocks<5>(1), tile_of_blocks<5>(2), tile_of_blocks<5>(3)},
    {tile_of_blocks<6>(1), tile_of_blocks<6>(2), tile_of_blocks<6>(3)},
    {tile_of_blocks<7>(1), tile_of_blocks<7>(2), tile_of_blocks<7>(3)},
    {tile_of_blocks<8>(1), tile_of_blocks<8>(2), tile_of_blocks<8>(3)},
};
#endif

}  // namespace

bool avx512_bf16_usable() {
#ifdef DELTAKERN_AVX512_BF16_KERNEL
  static const bool usable = cpu_flag("avx512_bf16") && aten_allows_avx512();
  return usable;
#else
  return false;
#endif
}

Bf16PackedClasses pack_bf16_classes(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16,
              "pack_bf16_classes: w must be a 2-D bfloat16 tensor, got ", w.scalar_type(), " ", w.sizes());
  const int64_t K = w.size(0), D = w.size(1);
  const int64_t blocks = (K + kLanes - 1) / kLanes, pairs = (D + 1) / 2;
  Bf16PackedClasses packed{at::zeros({blocks, pairs, kLanes, 2}, w.options()), K, D};
  const at::Tensor src = w.contiguous();
  const uint16_t* from = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
  uint16_t* to = reinterpret_cast<uint16_t*>(packed.data.data_ptr<at::BFloat16>());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t k = b * kLanes; k < std::min(K, (b + 1) * kLanes); ++k) {
        for (int64_t d = 0; d < D; ++d) {
          to[((b * pairs + d / 2) * kLanes + (k - b * kLanes)) * 2 + d % 2] = from[k * D + d];
        }
      }
    }
  });
  return packed;
}

void bf16_gemm_avx512(const Bf16PackedClasses& w, const at::BFloat16* x, int64_t rows, int64_t ldx,
                      float* out, int64_t ldo) {
  TORCH_CHECK(avx512_bf16_usable(), "bf16_gemm_avx512: this CPU (or ATEN_CPU_CAPABILITY) does not allow AVX512-BF16");
#ifdef DELTAKERN_AVX512_BF16_KERNEL
  const int64_t blocks = (w.K + kLanes - 1) / kLanes;
  const int64_t block_stride = ((w.D + 1) / 2) * 2 * kLanes;  // bfloat16 values per packed block
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x);
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(w.data.data_ptr<at::BFloat16>());
  for (int64_t j = 0; j < blocks; j += kMaxBlocks) {
    const int nz = static_cast<int>(std::min<int64_t>(kMaxBlocks, blocks - j));
    const int64_t last_lanes = std::min<int64_t>(kLanes, w.K - (j + nz - 1) * kLanes);
    const __mmask16 last_mask = static_cast<__mmask16>((1u << last_lanes) - 1u);
    for (int64_t r = 0; r < rows; r += kMaxRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r));
      kTiles[mr - 1][nz - 1](xs + r * ldx, ldx, ws + j * block_stride, block_stride, w.D / 2, w.D % 2 == 1,
                             out + r * ldo + j * kLanes, ldo, last_mask);
    }
  }
#else
  (void)w, (void)x, (void)rows, (void)ldx, (void)out, (void)ldo;
#endif
}

}  // namespace cpu
}  // namespace deltakern
