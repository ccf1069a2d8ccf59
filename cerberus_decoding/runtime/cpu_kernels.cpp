// The lean runtime's CPU ops (runtime/cpu_kernels.py builds and loads them): a decoding step of a
// small model is bound by per-op overhead, so each op here replaces several torch ops, and each
// computes a row (one token) with arithmetic that depends on nothing but that row's inputs.
//
// rope_attention: RoPE on the rows' queries and keys, their keys and values written into the
// cache, then attention. Row r's query heads attend to the cache's first `context` entries, then
// to `own[r, :own_count[r]]` (a tree node's ancestors and itself, or the one-token step's own new
// entry), in that order. Nothing depends on which other rows are in the call, where the keys lie
// in the cache, or which thread computes a row: a tree node's row is bitwise the one-token step
// at that node, and every row of a verification is computed in one call per layer.
// rms_norm, silu_mul: RMSNorm and the MLP's SiLU(gate) * up, row by row.
// int4_linear, int8_linear: the quantized formats' matmuls, each weight decoded once for all rows.
// w4a8_linear: int4 weights x each row's activations rounded to int8, integer dot products;
// w8a8_linear: the same with int8 weights (w4a8's LM head).
// argmax_rows: greedy decoding's choice over each row of logits.
// draft_topk: the draft heads' top tokens at one position, heads.py's ops called from C++.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/add.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>
#include <immintrin.h>

namespace {
constexpr int MAX_GROUP = 8;  // query heads per kv head
typedef float v16 __attribute__((vector_size(64)));  // GCC lowers it to one AVX-512 or two AVX2 registers

// The quantized matmuls stream their weights once per call, and with several rows a call does
// enough arithmetic per cache line that the hardware prefetchers fall behind: each group asks for
// the lines PREFETCH_AHEAD bytes further on (the same tile's or the next one's, which follows it in
// memory and is this thread's next; a prefetch past the end is harmless). Measured on an Intel
// AVX-512 CPU, w4a8 forward over a 200-token cache: 1 row 2.9 -> 2.4-2.5 ms, 2 rows 3.5 -> 2.9-3.0
// (docs/runtime.md); 5-10 KB ahead was best. On an AMD Zen 3 (AVX2), 150 cached tokens: 1 row
// 0.955x, 2 rows 0.91x, 4 rows 0.84x the time without (4, 8 or 16 KB ahead alike).
constexpr int64_t PREFETCH_AHEAD = 8192;
inline void prefetch_ahead(const uint8_t* p, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_AHEAD + l), _MM_HINT_T0);
}

// f(std::integral_constant<int, min(m, MAX)>{}) for a count m >= 1: the quantized kernels' row block
// and the AVX2 attention's group of query heads are template arguments, so that their accumulators
// are registers
template <int MAX, typename F>
inline void with_count(int64_t m, F&& f) {
  if constexpr (MAX > 1) {
    if (m < MAX) return with_count<MAX - 1>(m, f);
  }
  f(std::integral_constant<int, MAX>{});
}

template <typename T>
inline v16 load16(const T* x);
template <>
inline v16 load16(const float* x) {
  v16 y;
  std::memcpy(&y, x, 64);
  return y;
}
template <>
inline v16 load16(const c10::BFloat16* x) {  // bfloat16 is the high half of a float: widen, shift
#if defined(__AVX512F__)
  // intrinsics: GCC kept the loop's array below on the stack here, and reloading it whole after 16
  // small stores stalls (attention took 35-50% longer, measured)
  return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16);
#else
  // a plain loop: GCC widens it well for AVX2 (two 256-bit halves put together: 2.7x slower)
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
  uint32_t wide[16];
  for (int l = 0; l < 16; l++) wide[l] = static_cast<uint32_t>(bits[l]) << 16;
  v16 y;
  std::memcpy(&y, wide, 64);
  return y;
#endif
}

// {x, ..., x}. Where a register holds half a v16 (AVX2) GCC builds a broadcast lane by lane on the
// stack; through a small array it is one broadcast instruction.
inline v16 splat(float x) {
#if defined(__AVX512F__)
  return v16{} + x;
#else
  alignas(64) float lanes[16];
  for (int l = 0; l < 16; l++) lanes[l] = x;
  return load16(lanes);
#endif
}

inline void store16(float* y, v16 x) { std::memcpy(y, &x, 64); }

// The lanes of a vector type (v16, or __m256) to bfloat16: round to nearest even, NaN to 0x7FC0, as
// c10::BFloat16 does
template <int BYTES>
struct Bf16Lanes {  // a vector's lanes as 32-bit patterns, and their bfloat16 halves
  typedef uint32_t bits __attribute__((vector_size(BYTES)));
  typedef uint16_t halves __attribute__((vector_size(BYTES / 2)));
};
template <typename V>
inline void store_bf16(c10::BFloat16* y, V x) {
  using bits = typename Bf16Lanes<sizeof(V)>::bits;
  using halves = typename Bf16Lanes<sizeof(V)>::halves;
  bits b;
  std::memcpy(&b, &x, sizeof(V));
  b = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  b = x != x ? bits{} + 0x7FC0u : b;  // NaN stays NaN
  const halves h = __builtin_convertvector(b, halves);
  std::memcpy(y, &h, sizeof(V) / 2);
}

#if defined(__AVX2__)
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const c10::BFloat16* x) {  // bfloat16 is the high half of a float
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))), 16));
}
inline void store8(float* y, __m256 x) { _mm256_storeu_ps(y, x); }
inline void store8(c10::BFloat16* y, __m256 x) { store_bf16(y, x); }
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
// Under AVX2 a v16 is two 256-bit registers, and GCC lowers comparisons and selects on it lane by
// lane (SiLU over a row of 1536 took 11-15 us as an op, 4-6 us on the halves): the element-wise
// helpers work on the native halves instead, with the same arithmetic in every lane.
#define NATIVE_HALVES 1
inline void store16(c10::BFloat16* y, v16 x) {
  store8(y, __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7));
  store8(y + 8, __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
}
#else
inline void store16(c10::BFloat16* y, v16 x) { store_bf16(y, x); }
#endif

inline float hsum(v16 x) {  // a fixed pairwise fold of the 16 lanes
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// e^x for x <= 0 (Cephes' expf polynomial), 0 below -87, on the lanes of a vector type (v16, or
// __m256 on the AVX2 attention path)
template <typename V>
inline V exp_nonpositive(V x) {
  const V big = V{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  V n = (x * 1.44269504088896341f + big) - big;
  V r = x - n * 0.693359375f - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  typedef int32_t lanes __attribute__((vector_size(sizeof(V))));
  lanes e = (__builtin_convertvector(n, lanes) + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof(V));
  return x < -87.f ? V{} : p * scale;
}
#if defined(NATIVE_HALVES)
template <>
inline v16 exp_nonpositive(v16 x) {
  const __m256 lo = exp_nonpositive<__m256>(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 hi = exp_nonpositive<__m256>(__builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
#endif

// RoPE (rotate-half, sign folded into `sin`) of one head x [D] -> float y [D]
template <typename T, int D>
inline void rope(const T* x, const T* cos, const T* sin, float* y) {
  constexpr int half = D / 2;
  for (int d = 0; d < half; d++)
    y[d] = static_cast<float>(x[d]) * static_cast<float>(cos[d]) + static_cast<float>(x[d + half]) * static_cast<float>(sin[d]);
  for (int d = half; d < D; d++)
    y[d] = static_cast<float>(x[d]) * static_cast<float>(cos[d]) + static_cast<float>(x[d - half]) * static_cast<float>(sin[d]);
}

#if defined(__AVX512BF16__)
// The lane sums of 16 vectors at once, each folded in one fixed order (about 3 instructions a sum
// where hsum takes 9): lane i of the result is the sum of v[REDUCE_ORDER[i]] (an involution, so
// v[REDUCE_ORDER[i]] holding item i puts item i's sum in lane i).
constexpr int REDUCE_ORDER[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
inline __m512 reduce16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; i++)  // 256-bit halves
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; i++)  // 128-bit quarters
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
  for (int i = 0; i < 2; i++)  // pairs of lanes
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[i], x[i + 2], 0x44), _mm512_shuffle_ps(x[i], x[i + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

// Scores over a bfloat16 cache, 16 keys at a time: the query rounded to bfloat16 (as the cache's
// keys are, and as torch's bfloat16 attention takes it), q.k as bfloat16 dot products into float,
// the 16 keys' lanes summed by reduce16. Half the time of float FMAs and hsum per key (measured on
// 8 rows x 300 keys: 27 vs 49-62 us).
template <int D, typename KeyAt>
void bf16_scores(const float* qf, KeyAt key, int64_t n_keys, int rep, float scale, float* s, int64_t padded) {
  constexpr int P = D / 32;  // bfloat16 pair vectors a head
  __m512bh qb[MAX_GROUP][P];
  for (int h = 0; h < rep; h++)
    for (int c = 0; c < P; c++)
      qb[h][c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qf + h * D + c * 32 + 16), _mm512_loadu_ps(qf + h * D + c * 32));
  for (int64_t j0 = 0; j0 < n_keys; j0 += 16) {
    const c10::BFloat16* kp[16];  // past the last key: any key (its score is masked afterwards)
    for (int l = 0; l < 16; l++) kp[l] = key(std::min<int64_t>(j0 + REDUCE_ORDER[l], n_keys - 1));
    for (int h = 0; h < rep; h++) {
      __m512 acc[16];
      for (int l = 0; l < 16; l++) {
        acc[l] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[h][0], (__m512bh)_mm512_loadu_si512(kp[l]));
        for (int c = 1; c < P; c++)
          acc[l] = _mm512_dpbf16_ps(acc[l], qb[h][c], (__m512bh)_mm512_loadu_si512(kp[l] + c * 32));
      }
      _mm512_storeu_ps(s + h * padded + j0, _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)));
    }
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512BF16__)
#define ATTEND_AVX2 1
// AVX2 attention over a bfloat16 cache. Two bfloat16 values in a 32-bit lane widen to floats with
// one instruction each (the high one: mask the low half off; the low one: shift it up), so 16 values
// of a row come as their even and odd elements, and the query is split the same way once. The scores
// run 4 keys at a time for up to 3 query heads of a kv head (12 independent FMA chains, each key
// widened once for them, the lanes summed 4 keys together), the weighted values 32 columns at a time
// for the same heads; the generic path spent ~110 ns a key per kv head here, mostly in one horizontal
// sum per key and GCC's split of 512-bit vectors (measured on AMD Zen 3).
inline void widen_pairs(const c10::BFloat16* x, __m256& even, __m256& odd) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// x [16] float -> its even and odd elements
inline void split_pairs(const float* x, __m256& even, __m256& odd) {
  alignas(32) float e[8], o[8];
  for (int i = 0; i < 8; i++) e[i] = x[2 * i], o[i] = x[2 * i + 1];
  even = _mm256_load_ps(e), odd = _mm256_load_ps(o);
}

// The lane sums of a[0..3], in that order, each folded in the same fixed order:
// ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
inline __m128 sum4(const __m256* a) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// Each head's scores s [rep, padded] (keys n_keys.. are padding) -> their softmax, in place
inline void avx2_softmax(float* s, int64_t n_keys, int rep, int64_t padded) {
  for (int h = 0; h < rep; h++) {
    float* sh = s + h * padded;
    for (int64_t j = n_keys; j < padded; j++) sh[j] = -INFINITY;
    __m256 mx = _mm256_loadu_ps(sh);
    for (int64_t j = 8; j < padded; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sh + j));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    float m = lanes[0];
    for (int l = 1; l < 8; l++) m = std::max(m, lanes[l]);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < padded; j += 8) {
      const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sh + j), mv));
      _mm256_storeu_ps(sh + j, p);
      total = _mm256_add_ps(total, p);
    }
    _mm256_store_ps(lanes, total);
    const float inv = 1.f / (((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7])));
    const __m256 iv = _mm256_set1_ps(inv);
    for (int64_t j = 0; j < padded; j += 8) _mm256_storeu_ps(sh + j, _mm256_mul_ps(_mm256_loadu_ps(sh + j), iv));
  }
}

// Scores of G query heads of one kv head (G <= 3: 12 accumulators), 4 keys at a time: each key is
// widened once for the group, not once per head (the queries come from L1); every head's products
// and sums are those of one head alone, in a fixed order, whatever its group
template <int D, int G, typename KeyAt>
void avx2_scores_group(const float* qf, KeyAt key, int64_t n_keys, float scale, float* s, int64_t padded) {
  constexpr int P = D / 16;  // 16-value chunks a head
  alignas(32) float q[G][P][2][8];  // each head's query chunks: even, odd elements
  for (int h = 0; h < G; h++)
    for (int c = 0; c < P; c++) {
      __m256 e, o;
      split_pairs(qf + h * D + 16 * c, e, o);
      _mm256_store_ps(q[h][c][0], e), _mm256_store_ps(q[h][c][1], o);
    }
  for (int64_t j0 = 0; j0 < n_keys; j0 += 4) {
    __m256 acc[G][4];
    for (int l = 0; l < 4; l++) {  // past the last key: any key (its score is masked afterwards)
      const c10::BFloat16* kp = key(std::min<int64_t>(j0 + l, n_keys - 1));
      __m256 e, o;
      widen_pairs(kp, e, o);
      for (int h = 0; h < G; h++)
        acc[h][l] = _mm256_fmadd_ps(_mm256_load_ps(q[h][0][1]), o, _mm256_mul_ps(_mm256_load_ps(q[h][0][0]), e));
      for (int c = 1; c < P; c++) {
        widen_pairs(kp + 16 * c, e, o);
        for (int h = 0; h < G; h++)
          acc[h][l] = _mm256_fmadd_ps(_mm256_load_ps(q[h][c][1]), o,
                                      _mm256_fmadd_ps(_mm256_load_ps(q[h][c][0]), e, acc[h][l]));
      }
    }
    for (int h = 0; h < G; h++) _mm_storeu_ps(s + h * padded + j0, _mm_mul_ps(sum4(acc[h]), _mm_set1_ps(scale)));
  }
}

// out [G, D] = the weights s [G, padded] times the values, 32 columns a pass (G x 4 accumulators),
// each value chunk widened once for the group; each column sums over the keys in order, as one head alone
template <int D, int G, typename ValueAt>
void avx2_weighted_values_group(const float* s, ValueAt value, int64_t n_keys, int64_t padded, c10::BFloat16* out) {
  constexpr int C = D < 32 ? 1 : 2;  // 16-column chunks a pass
  alignas(64) float y[G][D];
  for (int c0 = 0; c0 < D; c0 += 16 * C) {
    __m256 ae[G][C], ao[G][C];
    for (int h = 0; h < G; h++)
      for (int c = 0; c < C; c++) ae[h][c] = ao[h][c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n_keys; j++) {
      const c10::BFloat16* vp = value(j) + c0;
      for (int c = 0; c < C; c++) {
        __m256 e, o;
        widen_pairs(vp + 16 * c, e, o);
        for (int h = 0; h < G; h++) {
          const __m256 p = _mm256_broadcast_ss(s + h * padded + j);
          ae[h][c] = _mm256_fmadd_ps(p, e, ae[h][c]);
          ao[h][c] = _mm256_fmadd_ps(p, o, ao[h][c]);
        }
      }
    }
    for (int h = 0; h < G; h++)
      for (int c = 0; c < C; c++) {  // back to column order: e0 o0 e1 o1 ...
        const __m256 lo = _mm256_unpacklo_ps(ae[h][c], ao[h][c]), hi = _mm256_unpackhi_ps(ae[h][c], ao[h][c]);
        _mm256_store_ps(y[h] + c0 + 16 * c, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_store_ps(y[h] + c0 + 16 * c + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
      }
  }
  for (int h = 0; h < G; h++)
    for (int c = 0; c < D; c += 16) store16(out + h * D + c, load16(y[h] + c));
}

// f(std::integral_constant<int, G>{}, h0) for the rep query heads in groups of up to 3
template <typename F>
void head_groups(int rep, F&& f) {
  for (int h0 = 0; h0 < rep; h0 += 3) with_count<3>(rep - h0, [&](auto g) { f(g, h0); });
}
#endif

// One row's query heads of one kv head: qf [rep, D] (float, after RoPE) -> out [rep, D]
template <typename T, int D>
void attend_row(const float* qf, const T* k, const T* v, const int64_t* own, int64_t n_own, int64_t context, int rep,
                float scale, T* out, std::vector<float>& buf) {
  constexpr int C = D / 16;  // vectors per row
  const int64_t n_keys = context + n_own, padded = (n_keys + 15) / 16 * 16;
  buf.resize(rep * padded);
  float* s = buf.data();  // [rep, padded] scores, then weights
  auto key = [&](int64_t j) { return k + (j < context ? j : own[j - context]) * D; };
  auto value = [&](int64_t j) { return v + (j < context ? j : own[j - context]) * D; };
#if defined(ATTEND_AVX2)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    head_groups(rep, [&](auto g, int h0) {
      avx2_scores_group<D, decltype(g)::value>(qf + h0 * D, key, n_keys, scale, s + h0 * padded, padded);
    });
    avx2_softmax(s, n_keys, rep, padded);
    head_groups(rep, [&](auto g, int h0) {
      avx2_weighted_values_group<D, decltype(g)::value>(s + h0 * padded, value, n_keys, padded, out + h0 * D);
    });
    return;
  }
#endif
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && D >= 32) {
    bf16_scores<D>(qf, key, n_keys, rep, scale, s, padded);
  } else
#endif
  {
    v16 qv[MAX_GROUP][C];
    for (int h = 0; h < rep; h++)
      for (int c = 0; c < C; c++) qv[h][c] = load16(qf + h * D + c * 16);
    for (int64_t j = 0; j < n_keys; j++) {
      const T* kj = key(j);
      v16 kv[C];
      for (int c = 0; c < C; c++) kv[c] = load16(kj + c * 16);
      for (int h = 0; h < rep; h++) {
        v16 acc = qv[h][0] * kv[0];
        for (int c = 1; c < C; c++) acc += qv[h][c] * kv[c];
        s[h * padded + j] = hsum(acc) * scale;
      }
    }
  }
  for (int h = 0; h < rep; h++) {
    float* sh = s + h * padded;
    for (int64_t j = n_keys; j < padded; j++) sh[j] = -INFINITY;
    v16 mx = load16(sh);
    for (int64_t j = 16; j < padded; j += 16) {
      v16 x = load16(sh + j);
      mx = x > mx ? x : mx;
    }
    float m = mx[0];
    for (int l = 1; l < 16; l++) m = mx[l] > m ? mx[l] : m;
    v16 total{};
    const v16 mv = splat(m);
    for (int64_t j = 0; j < padded; j += 16) {
      v16 p = exp_nonpositive(load16(sh + j) - mv);
      std::memcpy(sh + j, &p, 64);
      total += p;
    }
    const float inv = 1.f / hsum(total);
    for (int64_t j = 0; j < padded; j++) sh[j] *= inv;
  }
  v16 acc[MAX_GROUP][C] = {};
  for (int64_t j = 0; j < n_keys; j++) {
    const T* vj = value(j);
    v16 vv[C];
    for (int c = 0; c < C; c++) vv[c] = load16(vj + c * 16);
    for (int h = 0; h < rep; h++) {
      const v16 p = splat(s[h * padded + j]);
      for (int c = 0; c < C; c++) acc[h][c] += p * vv[c];
    }
  }
  for (int h = 0; h < rep; h++)
    for (int c = 0; c < C; c++) store16(out + h * D + c * 16, acc[h][c]);
}

// One layer's attention over n rows, as pointers: rope_rows and attend_items each do part of it
template <typename T>
struct Attention {
  const T *qkv, *cos, *sin;
  T *k, *v, *out;  // k, v [Hkv, cap, D] one layer's cache; out [n, Hq D]
  const int64_t *slot, *own, *own_count;
  int64_t n, Hq, Hkv, cap, E, context;
  float* qf;  // [n, Hq, D] queries after RoPE
};

// Rows [r0, r1): RoPE on their queries (into qf) and keys, their keys and values into the cache
template <typename T, int D>
void rope_rows(const Attention<T>& a, int64_t r0, int64_t r1) {
  float kf[D];
  for (int64_t r = r0; r < r1; r++) {
    const T* row = a.qkv + r * (a.Hq + 2 * a.Hkv) * D;
    const T *c = a.cos + r * D, *s = a.sin + r * D;
    for (int64_t h = 0; h < a.Hq; h++) rope<T, D>(row + h * D, c, s, a.qf + (r * a.Hq + h) * D);
    for (int64_t h = 0; h < a.Hkv; h++) {
      rope<T, D>(row + (a.Hq + h) * D, c, s, kf);
      T* kdst = a.k + (h * a.cap + a.slot[r]) * D;
      T* vdst = a.v + (h * a.cap + a.slot[r]) * D;
      const T* vsrc = row + (a.Hq + a.Hkv + h) * D;
      for (int d = 0; d < D; d++) kdst[d] = static_cast<T>(kf[d]), vdst[d] = vsrc[d];
    }
  }
}

// Items [i0, i1) of the n x Hkv (row, kv head) attention items, once every row's keys are in the cache
template <typename T, int D>
void attend_items(const Attention<T>& a, int64_t i0, int64_t i1, std::vector<float>& buf) {
  const int rep = a.Hq / a.Hkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (int64_t i = i0; i < i1; i++) {
    const int64_t r = i / a.Hkv, h = i % a.Hkv;
    attend_row<T, D>(a.qf + (r * a.Hq + h * rep) * D, a.k + h * a.cap * D, a.v + h * a.cap * D, a.own + r * a.E,
                     a.own_count[r], a.context, rep, scale, a.out + (r * a.Hq + h * rep) * D, buf);
  }
}

// f(std::integral_constant<int, D>{}) for the compiled head dims
template <typename F>
void with_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: TORCH_CHECK(false, "rope_attention: head_dim 16, 32, 64 or 128");
  }
}

template <typename T>
void rope_attention_typed(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k,
                          at::Tensor& v, const at::Tensor& slots, int64_t context, const at::Tensor& own,
                          const at::Tensor& own_count, at::Tensor& out) {
  const int64_t n = qkv.size(0), Hkv = k.size(0), D = k.size(2);
  const int64_t Hq = qkv.size(1) / D - 2 * Hkv;
  std::vector<float> qf(n * Hq * D);
  const Attention<T> a{qkv.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
                       out.data_ptr<T>(), slots.data_ptr<int64_t>(), own.data_ptr<int64_t>(),
                       own_count.data_ptr<int64_t>(), n, Hq, Hkv, k.size(1), own.size(1), context, qf.data()};
  with_head_dim(D, [&](auto dim) {
    constexpr int DIM = decltype(dim)::value;
    rope_rows<T, DIM>(a, 0, n);
    at::parallel_for(0, n * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      attend_items<T, DIM>(a, begin, end, buf);
    });
  });
}

// rope_attention's inputs (k, v one layer's cache [Hkv, capacity, D]) for n rows of qkv [n, width]
void check_attention(int64_t n, int64_t width, at::ScalarType dtype, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, int64_t context,
                     const at::Tensor& own, const at::Tensor& own_count) {
  const int64_t D = k.size(2), Hkv = k.size(0);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
              slots.is_contiguous() && own.is_contiguous() && own_count.is_contiguous());
  TORCH_CHECK(width % D == 0 && width / D > 2 * Hkv, "rope_attention: qkv width");
  const int64_t Hq = width / D - 2 * Hkv;
  TORCH_CHECK(Hq % Hkv == 0 && Hq / Hkv <= MAX_GROUP, "rope_attention: query heads per kv head");
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && cos.scalar_type() == dtype &&
              sin.scalar_type() == dtype);
  TORCH_CHECK(slots.size(0) == n && own.size(0) == n && own_count.size(0) == n);
  const int64_t cap = k.size(1), E = own.size(1);
  const int64_t *slot = slots.data_ptr<int64_t>(), *own_p = own.data_ptr<int64_t>(), *cnt_p = own_count.data_ptr<int64_t>();
  TORCH_CHECK(context >= 0 && context <= cap, "rope_attention: context outside the cache");
  for (int64_t r = 0; r < n; r++) {  // every slot written or read lies in the cache
    TORCH_CHECK(slot[r] >= 0 && slot[r] < cap && cnt_p[r] >= 1 && cnt_p[r] <= E, "rope_attention: bad slots");
    for (int64_t e = 0; e < cnt_p[r]; e++)
      TORCH_CHECK(own_p[r * E + e] >= 0 && own_p[r * E + e] < cap, "rope_attention: bad slots");
  }
}

at::Tensor rope_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k,
                          at::Tensor v, const at::Tensor& slots, int64_t context, const at::Tensor& own,
                          const at::Tensor& own_count) {
  // qkv [n, (Hq + 2 Hkv) D] (the fused projection's output), cos, sin [n, D] (each row's position),
  // k, v [Hkv, capacity, D] (one layer's cache), slots [n], own [n, E], own_count [n] -> [n, Hq D]
  const int64_t D = k.size(2), Hkv = k.size(0), n = qkv.size(0);
  TORCH_CHECK(qkv.is_contiguous(), "rope_attention: qkv contiguous");
  check_attention(n, qkv.size(1), qkv.scalar_type(), cos, sin, k, v, slots, context, own, own_count);
  const int64_t Hq = qkv.size(1) / D - 2 * Hkv;
  auto out = at::empty({n, Hq * D}, qkv.options());
  if (qkv.scalar_type() == at::kBFloat16) rope_attention_typed<c10::BFloat16>(qkv, cos, sin, k, v, slots, context, own, own_count, out);
  else if (qkv.scalar_type() == at::kFloat) rope_attention_typed<float>(qkv, cos, sin, k, v, slots, context, own, own_count, out);
  else TORCH_CHECK(false, "rope_attention: float32 or bfloat16");
  return out;
}

template <typename T>
void rms_norm_row(const T* row, const T* w, int64_t H, double eps, T* out) {
  v16 acc{};
  for (int64_t i = 0; i < H; i += 16) {
    v16 a = load16(row + i);
    acc += a * a;
  }
  const float inv = 1.f / std::sqrt(hsum(acc) / static_cast<float>(H) + static_cast<float>(eps));
  const v16 scale = splat(inv);
  for (int64_t i = 0; i < H; i += 16) store16(out + i, load16(row + i) * scale * load16(w + i));
}

template <typename T>
void rms_norm_typed(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& out) {
  const int64_t n = x.size(0), H = x.size(1);
  for (int64_t r = 0; r < n; r++) rms_norm_row(x.data_ptr<T>() + r * H, w.data_ptr<T>(), H, eps, out.data_ptr<T>() + r * H);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  // x [n, H], weight [H] (or longer: its first H, e.g. the lean runtime's doubled LayerNorm weight)
  // -> [n, H]: x / sqrt(mean(x^2) + eps) * weight
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous() && x.size(1) % 16 == 0, "rms_norm: x [n, 16k]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.numel() >= x.size(1));
  auto out = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16) rms_norm_typed<c10::BFloat16>(x, weight, eps, out);
  else if (x.scalar_type() == at::kFloat) rms_norm_typed<float>(x, weight, eps, out);
  else TORCH_CHECK(false, "rms_norm: float32 or bfloat16");
  return out;
}

template <typename V>
inline V silu_times(V g, V u) {  // SiLU(g) * u
  const V e = exp_nonpositive(g < 0 ? g : -g);          // e^-|g|, in (0, 1]
  const V sig = g < 0 ? e / (1.f + e) : 1.f / (1.f + e);  // sigmoid(g) without overflow
  return g * sig * u;
}

template <typename T>
void silu_mul_row(const T* x, int64_t I, T* out) {  // x [2I] = [gate, up] -> out [I]
#if defined(NATIVE_HALVES)
  for (int64_t i = 0; i < I; i += 8) store8(out + i, silu_times(load8(x + i), load8(x + I + i)));
#else
  for (int64_t i = 0; i < I; i += 16) store16(out + i, silu_times(load16(x + i), load16(x + I + i)));
#endif
}

template <typename T>
void silu_mul_typed(const at::Tensor& x, at::Tensor& out) {
  const int64_t n = x.size(0), I = x.size(1) / 2;
  for (int64_t r = 0; r < n; r++) silu_mul_row(x.data_ptr<T>() + r * 2 * I, I, out.data_ptr<T>() + r * I);
}

at::Tensor silu_mul(const at::Tensor& x) {
  // x [n, 2I] = [gate, up] -> [n, I]: SiLU(gate) * up
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 32 == 0, "silu_mul: x [n, 32k]");
  auto out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  if (x.scalar_type() == at::kBFloat16) silu_mul_typed<c10::BFloat16>(x, out);
  else if (x.scalar_type() == at::kFloat) silu_mul_typed<float>(x, out);
  else TORCH_CHECK(false, "silu_mul: float32 or bfloat16");
  return out;
}

inline c10::BFloat16 add_bf16(c10::BFloat16 a, c10::BFloat16 b) {  // as at::add rounds: the float sum, to nearest even
  return c10::BFloat16(static_cast<float>(a) + static_cast<float>(b));
}
inline void add_rows(c10::BFloat16* x, const c10::BFloat16* y, int64_t n) {  // x += y, each sum rounded as add_bf16
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(x + i, load16(x + i) + load16(y + i));
  for (; i < n; i++) x[i] = add_bf16(x[i], y[i]);
}

// ---- Quantized linear layers: y [M, N] = x [M, K] W^T, x in bfloat16 ----
// The weights are stored 16 output columns ("a tile") at a time, so that a few instructions turn
// 32 bytes into bfloat16 pairs of weights (w[k], w[k+1]) for the tile's 16 columns (int4: two such
// pairs, inputs k..k+3; int8: one): lane j holds column j, and every row's step is one bfloat16
// dot-product instruction with the row's pair x[k], x[k+1] broadcast. A weight is decoded once for
// all the rows of a call, so an extra row costs only its dot products. Every row runs the
// same instructions in the same order whatever the other rows are: its bits are its own.
//   int4: per tile and group of 32 inputs, 320 bytes read as one stream: 256 bytes of weights,
//         then 16 scales and 16 mins in float16; w = q * scale + min (a GGUF Q4_0 / Q4_1 block
//         exactly), so y = sum_g scale_g * (x . q)_g + min_g * sum(x_g). The weights are 8 chunks of
//         32 bytes, chunk c holding inputs 4c..4c+3: byte 2j + e = q[j, 4c + e] | q[j, 4c + 2 + e] << 4
//         (column j, q in 0..15), so that widening a chunk to 16-bit lanes puts each nibble in its
//         place and a table lookup makes it bfloat16.
//   int8: tile bytes [K/2 pairs, 16 columns, 2], q in -127..127, and a float scale per column.
// They need AVX512-BF16: built without it (AVX2) they are absent (quantized_matmuls() is false),
// and the int4 / int8 formats run torch's kernels (a float32 version of these loops measured 10x
// slower than torch's own on an AVX2 build).
constexpr int64_t INT4_GROUP_BYTES = 256 + 64;

#if defined(__AVX512BF16__)
constexpr int ROW_BLOCK = 8;  // rows a pass over a tile: their accumulators stay in registers
typedef __m512bh pair16;  // 16 columns x (w[k], w[k+1]) in bfloat16: exact for these integers

inline void decode_int4(const uint8_t* b, __m512i table, pair16& lo, pair16& hi) {  // a chunk: two pairs
  __m512i t = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  lo = (pair16)_mm512_permutexvar_epi16(t, table);  // the table ignores bits above the low nibble
  hi = (pair16)_mm512_permutexvar_epi16(_mm512_srli_epi16(t, 4), table);
}
inline pair16 decode_int8(const uint8_t* b) {
  const __m128i* p = reinterpret_cast<const __m128i*>(b);
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);
}
inline v16 dot_pair(v16 acc, pair16 w, const c10::BFloat16* x) {  // acc + w[k] x[k] + w[k+1] x[k+1]
  int32_t xx;
  std::memcpy(&xx, x, 4);
  return (v16)_mm512_dpbf16_ps((__m512)acc, w, (__m512bh)_mm512_set1_epi32(xx));
}
inline v16 load_half16(const uint8_t* b) {
  return (v16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
}
// decode_int4's lookup table, entry i: the bfloat16 bits of i % 16 (a lookup reads 5 index bits)
alignas(64) constexpr std::array<uint16_t, 32> INT4_BF16 = [] {
  std::array<uint16_t, 32> t{};
  for (int i = 0; i < 32; i++) t[i] = static_cast<uint16_t>(std::bit_cast<uint32_t>(static_cast<float>(i % 16)) >> 16);
  return t;
}();
// Rows [MB] of one call over one tile. (Several tiles side by side, for more independent chains
// of dot products, measured slower: 3.2 vs 2.4 ms for one row through the default model's 120
// projections, AVX-512.)
template <bool INT4, int MB>
void quant_tile(const uint8_t* w, const float* scale, int64_t tile, const c10::BFloat16* x, const float* xsum,
                int64_t K, int64_t N, c10::BFloat16* y) {
  const __m512i table = _mm512_load_si512(INT4_BF16.data());
  const int64_t G = K / 32;
  constexpr int64_t BYTES = INT4 ? INT4_GROUP_BYTES : 512;  // a group: 32 inputs of the tile's 16 columns
  const uint8_t* wt = w + tile * G * BYTES;
  v16 out[MB] = {};
  for (int64_t g = 0; g < G; g++) {
    const uint8_t* wg = wt + g * BYTES;
    prefetch_ahead(wg, BYTES);
    v16 even[MB] = {}, odd[MB] = {};  // two chains a row: pairs 0, 2, .. and 1, 3, ..
    for (int p = 0; p < 16; p += 2) {
      pair16 w0, w1;
      if constexpr (INT4) {
        decode_int4(wg + p * 16, table, w0, w1);
      } else {
        w0 = decode_int8(wg + p * 32), w1 = decode_int8(wg + p * 32 + 32);
      }
      for (int m = 0; m < MB; m++) {
        even[m] = dot_pair(even[m], w0, x + m * K + g * 32 + 2 * p);
        odd[m] = dot_pair(odd[m], w1, x + m * K + g * 32 + 2 * p + 2);
      }
    }
    if constexpr (INT4) {
      const v16 s = load_half16(wg + 256), mn = load_half16(wg + 288);
      for (int m = 0; m < MB; m++) {
        out[m] += (even[m] + odd[m]) * s;
        out[m] += mn * splat(xsum[m * G + g]);
      }
    } else {
      for (int m = 0; m < MB; m++) out[m] += even[m] + odd[m];
    }
  }
  const v16 s = INT4 ? v16{} + 1.f : load16(scale + tile * 16);
  for (int m = 0; m < MB; m++) store16(y + m * N + tile * 16, INT4 ? out[m] : out[m] * s);
}

template <bool INT4>
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& packed, const float* scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "quantized linear: x [M, K] bfloat16");
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte, "quantized linear: packed weight uint8");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), N = tiles * 16, G = K / 32;
  TORCH_CHECK(K % 32 == 0 && packed.numel() == (INT4 ? tiles * G * INT4_GROUP_BYTES : N * K),
              "quantized linear: packed weight does not match x");
  auto y = at::empty({M, N}, x.options());
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  std::vector<float> xsum(INT4 ? M * G : 0);  // [M, G] each row's sum over each group
  for (int64_t i = 0; i < (INT4 ? M * G : 0); i++) xsum[i] = hsum(load16(xp + i * 32) + load16(xp + i * 32 + 16));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++)  // every row block over a tile while it is in cache
      for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK)
        with_count<ROW_BLOCK>(M - m0, [&](auto mb) {
          quant_tile<INT4, decltype(mb)::value>(w, scale, t, xp + m0 * K, xsum.data() + m0 * G, K, N, yp + m0 * N);
        });
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed) {
  // x [M, K] bf16, packed [N/16, K/32, 320] uint8 (weights, scales, mins) -> [M, N] bf16
  return quant_linear<true>(x, packed, nullptr);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale) {
  // x [M, K] bf16, packed [N/16, K/2, 16, 2] int8 (as uint8), scale [N] float -> [M, N] bf16
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == packed.size(0) * 16,
              "int8_linear: scale [N] float");
  return quant_linear<false>(x, packed, scale.data_ptr<float>());
}
#else
at::Tensor int4_linear(const at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "int4_linear needs AVX512-BF16"); }
at::Tensor int8_linear(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "int8_linear needs AVX512-BF16");
}
#endif

// ---- W4A8: int4 weights x int8 activations (llama.cpp's arithmetic for its Q4 formats) ----
// Each row's activations are quantized per group of 32 inputs on the fly: d = max|x| / 127,
// a = round(x / d) in -127..127 (a GGUF Q8_0 block), so a group's dot product is exact integer
// arithmetic, sum q_k a_k, one AVX512-VNNI instruction per 4 inputs x 16 columns (64 products, twice
// the bfloat16 instruction's 32, and no table lookup to decode the weights), then in float:
// y += (scale d) * isum + min * (d sum a). A row's quantization and sums read only that row, so
// rows stay bitwise independent.
//   layout per tile and group: 256 bytes of weights as 4 vectors of 64 bytes, vector i byte 4j + e =
//   q[j, 8i + e] | q[j, 8i + 4 + e] << 4 (column j), then 16 float16 scales and 16 float16 mins,
//   the int4 layout's 320 bytes with another order of nibbles.
// W8A8 (the LM head under w4a8): int8 weights per group of 32 with a float16 scale each (a GGUF Q8_0
// block: w = q * s) times the same int8 activations, as llama.cpp computes a Q8_0 tensor:
// y += (s d) * sum q_k a_k per group.
//   layout per tile and group: 512 bytes of signed weights as 8 vectors of 64 bytes, vector c byte
//   4j + e = q[j, 4c + e] (column j), then 16 float16 scales.
constexpr int64_t W8A8_GROUP_BYTES = 512 + 32;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define W4A8_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define W4A8_AVX2 1
#endif
#if defined(W4A8_VNNI) || defined(W4A8_AVX2)
#if defined(W4A8_VNNI)
constexpr int A8_ROW_BLOCK = 8;

// x [K] bfloat16 -> a [K] int8, and per group d, d * sum(a) and sum(a) [K/32]
void quantize_row_q8(const c10::BFloat16* x, int64_t K, int8_t* a, float* d, float* dsum, int32_t* asum) {
  for (int64_t g = 0; g < K / 32; g++) {
    const __m512 x0 = (__m512)load16(x + g * 32), x1 = (__m512)load16(x + g * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    // round half to even (the default rounding mode), as std::nearbyint
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a + g * 32), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a + g * 32 + 16), _mm512_cvtepi32_epi8(q1));
    d[g] = amax / 127.f;
    asum[g] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    dsum[g] = d[g] * static_cast<float>(asum[g]);
  }
}

// A group's integer dot products for 16 columns: q[c] holds inputs 4c..4c+3 of each column as
// unsigned bytes, a the row's 32 int8 activations; two chains of four vpdpbusd
inline __m512i group_dot(const __m512i* q, const int8_t* a) {
  const int32_t* am = reinterpret_cast<const int32_t*>(a);
  __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int c = 0; c < 8; c += 2) {
    even = _mm512_dpbusd_epi32(even, q[c], _mm512_set1_epi32(am[c]));
    odd = _mm512_dpbusd_epi32(odd, q[c + 1], _mm512_set1_epi32(am[c + 1]));
  }
  return _mm512_add_epi32(even, odd);
}

// The loop both formats' tiles share: the MB rows' accumulators for the tile's 16 columns, the
// groups in order (prefetching ahead), ``group(wg, g, out)`` adding group g's products into
// out[0..MB), then the store. A row's additions come in the same order whatever MB is.
template <int MB, int64_t BYTES, typename Group>
inline void a8_tile(const uint8_t* w, int64_t tile, int64_t K, int64_t N, c10::BFloat16* y, Group&& group) {
  const int64_t G = K / 32;
  const uint8_t* wt = w + tile * G * BYTES;
  __m512 out[MB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; m++) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    const uint8_t* wg = wt + g * BYTES;
    prefetch_ahead(wg, BYTES);
    group(wg, g, out);
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; m++) store16(y + m * N + tile * 16, (v16)out[m]);
}

template <int MB>
void w4a8_tile(const uint8_t* w, int64_t tile, const int8_t* a, const float* d, const float* dsum, int64_t K,
               int64_t N, c10::BFloat16* y) {
  const int64_t G = K / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  a8_tile<MB, INT4_GROUP_BYTES>(w, tile, K, N, y, [&](const uint8_t* wg, int64_t g, __m512* out) {
    __m512i q[8];  // q[c]: inputs 4c..4c+3 of the group, 16 columns
    for (int i = 0; i < 4; i++) {
      const __m512i v = _mm512_loadu_si512(wg + 64 * i);
      q[2 * i] = _mm512_and_si512(v, low);
      q[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 256)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 288)));
#pragma GCC unroll 8
    for (int m = 0; m < MB; m++) {
      const __m512 dot = _mm512_cvtepi32_ps(group_dot(q, a + m * K + g * 32));
      out[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(s, _mm512_set1_ps(d[m * G + g])), out[m]);
      out[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(dsum[m * G + g]), out[m]);
    }
  });
}

template <int MB>
void w8a8_tile(const uint8_t* w, int64_t tile, const int8_t* a, const float* d, const int32_t* asum, int64_t K,
               int64_t N, c10::BFloat16* y) {
  const int64_t G = K / 32;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  a8_tile<MB, W8A8_GROUP_BYTES>(w, tile, K, N, y, [&](const uint8_t* wg, int64_t g, __m512* out) {
    __m512i q[8];  // q[c] + 128, unsigned (VNNI multiplies unsigned by signed bytes): inputs 4c..4c+3, 16 columns
    for (int c = 0; c < 8; c++) q[c] = _mm512_xor_si512(_mm512_loadu_si512(wg + 64 * c), flip);
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 512)));
#pragma GCC unroll 8
    for (int m = 0; m < MB; m++) {
      // sum (q + 128) a - 128 sum a = sum q a, exactly
      const __m512i dot = _mm512_sub_epi32(group_dot(q, a + m * K + g * 32), _mm512_set1_epi32(128 * asum[m * G + g]));
      out[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(d[m * G + g])), out[m]);
    }
  });
}

#else  // AVX2: u8 x s8 pairs into 16-bit sums (vpmaddubsw), then into 32-bit (vpmaddwd), as llama.cpp does
// Rows a block shares each unpacked weight chunk over, at most: 7 or 8 spill (1.3x the time); 5 rows
// as one block take 0.87x the time of 4 + 1 (576 x 3072 w4a8, a8_tiles splits rows into even blocks)
constexpr int A8_ROW_BLOCK = 6;

// x [K] bfloat16 -> a [K] int8, and per group d, d * sum(a) and sum(a) [K/32]: the same arithmetic as
// above for finite x (a scalar loop here took ~30% of the row-wise work of a one-token forward)
void quantize_row_q8(const c10::BFloat16* x, int64_t K, int8_t* a, float* d, float* dsum, int32_t* asum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  for (int64_t g = 0; g < K / 32; g++) {
    __m256 v[4], top = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
      v[j] = load8(x + g * 32 + 8 * j);
      top = _mm256_max_ps(_mm256_andnot_ps(sign, v[j]), top);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i q[4];  // round half to even (the default rounding mode), as std::nearbyint
    for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));  // |q| <= 127
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + g * 32), _mm256_permutevar8x32_epi32(bytes, order));
    const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    const int32_t total = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
    d[g] = amax / 127.f;
    asum[g] = total;
    dsum[g] = d[g] * static_cast<float>(total);
  }
}

// The loop both formats' tiles share, for each half of the tile (columns 8h..8h+7: the second 32
// bytes of each 64): the MB rows' accumulators, the groups in order, ``group(wg, g, h, out)``
// adding group g's products into out[0..MB), then the store.
template <int MB, int64_t BYTES, typename Group>
inline void a8_tile(const uint8_t* w, int64_t tile, int64_t K, int64_t N, c10::BFloat16* y, Group&& group) {
  const int64_t G = K / 32;
  const uint8_t* wt = w + tile * G * BYTES;
  for (int h = 0; h < 2; h++) {
    __m256 out[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; m++) out[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
      if (h == 0) prefetch_ahead(wt + g * BYTES, BYTES);  // the second half reads the tile from L1
      group(wt + g * BYTES, g, h, out);
    }
    for (int m = 0; m < MB; m++) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, out[m]);
      for (int l = 0; l < 8; l++) y[m * N + tile * 16 + 8 * h + l] = c10::BFloat16(lanes[l]);
    }
  }
}

template <int MB>
void w4a8_tile(const uint8_t* w, int64_t tile, const int8_t* a, const float* d, const float* dsum, int64_t K,
               int64_t N, c10::BFloat16* y) {
  const int64_t G = K / 32;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  a8_tile<MB, INT4_GROUP_BYTES>(w, tile, K, N, y, [&](const uint8_t* wg, int64_t g, int h, __m256* out) {
    // Four of the group's eight chunks a pass: with all eight weight vectors live GCC spilled them and
    // reloaded them for every row of the block; four stay in registers (0.88x the time per row at 2-16 rows)
    __m256i isum[MB];
    for (int pass = 0; pass < 2; pass++) {  // chunks 4 pass .. 4 pass + 3 (h: the tile's column half)
      __m256i q[4];
      for (int i = 0; i < 2; i++) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * (2 * pass + i) + 32 * h));
        q[2 * i] = _mm256_and_si256(v, low);
        q[2 * i + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MB; m++) {  // four 16-bit pair sums of at most 2 * 15 * 127 each: no overflow
        const int32_t* am = reinterpret_cast<const int32_t*>(a + m * K + g * 32 + 16 * pass);
        const __m256i p = _mm256_madd_epi16(
            _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(q[0], _mm256_set1_epi32(am[0])),
                                              _mm256_maddubs_epi16(q[1], _mm256_set1_epi32(am[1]))),
                             _mm256_add_epi16(_mm256_maddubs_epi16(q[2], _mm256_set1_epi32(am[2])),
                                              _mm256_maddubs_epi16(q[3], _mm256_set1_epi32(am[3])))),
            ones);
        isum[m] = pass == 0 ? p : _mm256_add_epi32(isum[m], p);
      }
    }
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 256 + 16 * h)));
    const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 288 + 16 * h)));
#pragma GCC unroll 8
    for (int m = 0; m < MB; m++) {
      out[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_mul_ps(s, _mm256_set1_ps(d[m * G + g])), out[m]);
      out[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(dsum[m * G + g]), out[m]);
    }
  });
}

template <int MB>
void w8a8_tile(const uint8_t* w, int64_t tile, const int8_t* a, const float* d, const int32_t*, int64_t K,
               int64_t N, c10::BFloat16* y) {
  const int64_t G = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  a8_tile<MB, W8A8_GROUP_BYTES>(w, tile, K, N, y, [&](const uint8_t* wg, int64_t g, int h, __m256* out) {
    __m256i q[8], mag[8];  // the weights and their magnitudes
    for (int c = 0; c < 8; c++) {
      q[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 64 * c + 32 * h));
      mag[c] = _mm256_abs_epi8(q[c]);
    }
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 512 + 16 * h)));
#pragma GCC unroll 8
    for (int m = 0; m < MB; m++) {
      const int32_t* am = reinterpret_cast<const int32_t*>(a + m * K + g * 32);
      __m256i dot = _mm256_setzero_si256();
      for (int c = 0; c < 8; c++) {  // |q| x (a with q's sign): pair sums of at most 2 * 127 * 127, no saturation
        const __m256i pairs = _mm256_maddubs_epi16(mag[c], _mm256_sign_epi8(_mm256_set1_epi32(am[c]), q[c]));
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
      }
      out[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(s, _mm256_set1_ps(d[m * G + g])), out[m]);
    }
  });
}
#endif

// Rows of activations quantized to Q8_0 blocks: a [M, K] int8, and per group d, d sum(a), sum(a) [M, K/32]
struct Q8Rows {
  std::vector<int8_t> a;
  std::vector<float> d, dsum;
  std::vector<int32_t> asum;
  Q8Rows(int64_t M, int64_t K) : a(M * K), d(M * K / 32), dsum(M * K / 32), asum(M * K / 32) {}
  void quantize(const c10::BFloat16* x, int64_t m0, int64_t m1, int64_t K) {  // rows [m0, m1) of x [M, K]
    const int64_t G = K / 32;
    for (int64_t m = m0; m < m1; m++)
      quantize_row_q8(x + m * K, K, a.data() + m * K, d.data() + m * G, dsum.data() + m * G, asum.data() + m * G);
  }
};

// Tiles [t0, t1) of y [M, N] = x W^T for quantized rows x [M, K]: every row block over a tile while it is in cache
template <bool W8>
void a8_tiles(const uint8_t* w, int64_t t0, int64_t t1, const Q8Rows& x, int64_t M, int64_t K, int64_t N,
              c10::BFloat16* y) {
  const int64_t G = K / 32, blocks = (M + A8_ROW_BLOCK - 1) / A8_ROW_BLOCK;
  for (int64_t t = t0; t < t1; t++)
    for (int64_t b = 0; b < blocks; b++) {  // blocks of even sizes: 9 rows as 5 + 4, not 6 + 3
      const int64_t m0 = b * M / blocks;
      with_count<A8_ROW_BLOCK>((b + 1) * M / blocks - m0, [&](auto mb) {
        constexpr int MB = decltype(mb)::value;
        const int8_t* am = x.a.data() + m0 * K;
        if constexpr (W8)
          w8a8_tile<MB>(w, t, am, x.d.data() + m0 * G, x.asum.data() + m0 * G, K, N, y + m0 * N);
        else
          w4a8_tile<MB>(w, t, am, x.d.data() + m0 * G, x.dsum.data() + m0 * G, K, N, y + m0 * N);
      });
    }
}

// Both formats with 8-bit activations: each row quantized to Q8_0 blocks, then the tiles
template <bool W8, typename Chunk = void (*)(int64_t, int64_t, const at::Tensor&)>
at::Tensor a8_linear(const at::Tensor& x, const at::Tensor& packed, Chunk&& after = [](int64_t, int64_t, const at::Tensor&) {}) {
  // after(begin, end, y): the thread's own tiles [begin, end), once it has written them
  const char* name = W8 ? "w8a8_linear" : "w4a8_linear";
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, name, ": x [M, K] bfloat16");
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte, name, ": packed weight uint8");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), N = tiles * 16, G = K / 32;
  TORCH_CHECK(K % 32 == 0 && packed.numel() == tiles * G * (W8 ? W8A8_GROUP_BYTES : INT4_GROUP_BYTES), name,
              ": packed weight does not match x");
  auto y = at::empty({M, N}, x.options());
  Q8Rows q8(M, K);
  q8.quantize(x.data_ptr<c10::BFloat16>(), 0, M, K);
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    a8_tiles<W8>(packed.data_ptr<uint8_t>(), begin, end, q8, M, K, N, y.data_ptr<c10::BFloat16>());
    after(begin, end, y);
  });
  return y;
}

at::Tensor w4a8_linear(const at::Tensor& x, const at::Tensor& packed) {
  // x [M, K] bf16, packed [N/16, K/32, 320] uint8 (weights, scales, mins) -> [M, N] bf16
  return a8_linear<false>(x, packed);
}
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& packed) {
  // x [M, K] bf16, packed [N/16, K/32, 544] uint8 (signed weights, scales) -> [M, N] bf16
  return a8_linear<true>(x, packed);
}
#else
at::Tensor w4a8_linear(const at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "w4a8_linear needs AVX512-VNNI or AVX2"); }
at::Tensor w8a8_linear(const at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "w8a8_linear needs AVX512-VNNI or AVX2"); }
#endif

// ---- every decoder layer in one call: LeanLlama._layers on the kernel path, in C++ ----
// Per layer: rms_norm, qkv projection (+ bias), rope_attention, o projection, residual add, rms_norm,
// gate/up projection, silu_mul, down projection, residual add; then the final norm. The same ops in
// the same order as the Python loop, so the same bits; what it saves is the Python and the
// dispatcher between some 300 op calls a forward (about 1 ms of a 4-5 ms step on a 2-core CPU).
enum Projection : int64_t { W4A8 = 0, INT4 = 1, INT8 = 2, W8A8 = 3 };

at::Tensor project(const at::Tensor& x, int64_t kind, const at::Tensor& packed, const at::Tensor& scale,
                   const at::Tensor& bias) {
  at::Tensor y;
  switch (kind) {
    case W4A8: y = w4a8_linear(x, packed); break;
    case INT4: y = int4_linear(x, packed); break;
    case INT8: y = int8_linear(x, packed, scale); break;
    case W8A8: y = w8a8_linear(x, packed); break;
    default: TORCH_CHECK(false, "layers: unknown projection kind ", kind);
  }
  return bias.numel() ? at::add(y, bias) : y;
}

#if defined(W4A8_VNNI) || defined(W4A8_AVX2)
// ---- the same layers in one parallel region, where every projection has 8-bit activations ----
// The op-by-op forward above forks and joins the threads five times a layer (~2 us each with two
// threads: ~0.3 ms of a 2.3 ms one-token forward on a 2-core CPU) and allocates every result. Here
// the threads enter once: the forward is a fixed sequence of phases over preallocated buffers, each
// phase cut into pieces (tile ranges, rows, attention items) that the threads claim, and a phase
// starts when every piece of the one before is done. Any thread can run any piece and a row's
// arithmetic is the per-op path's in the same order, so the bits are the same (tested), whichever
// threads show up: one thread alone runs every piece, so no schedule can deadlock.
class Phases {
 public:
  explicit Phases(int64_t count) : claimed_(count), done_(count) {}
  // Claim and run pieces of the next phase (work(piece) for piece in [0, pieces)), then wait for all of them
  template <typename Work>
  void run(int64_t& phase, int64_t pieces, Work&& work) {
    const int64_t k = phase++;
    for (int64_t p; (p = claimed_[k].fetch_add(1, std::memory_order_relaxed)) < pieces;) {
      work(p);
      done_[k].fetch_add(1, std::memory_order_release);
    }
    for (int spins = 0; done_[k].load(std::memory_order_acquire) < pieces; spins++) {
      if (spins < 4096) _mm_pause();
      else std::this_thread::yield();  // the piece's thread is not running: let it
    }
  }

 private:
  std::vector<std::atomic<int64_t>> claimed_, done_;
};

at::Tensor layers_a8(const at::Tensor& x_in, at::TensorList norms, at::IntArrayRef kinds, at::TensorList packed,
                     at::TensorList biases, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k, at::Tensor& v,
                     const at::Tensor& slots, int64_t context, const at::Tensor& own, const at::Tensor& own_count,
                     double eps) {
  using bf16 = c10::BFloat16;
  const int64_t L = k.size(0), M = x_in.size(0), H = x_in.size(1), Hkv = k.size(1), cap = k.size(2), D = k.size(3);
  struct Proj {
    const uint8_t* w;
    const bf16* bias;  // or nullptr
    int64_t K, N;
    bool w8;
  };
  std::vector<Proj> proj;
  for (size_t j = 0; j < kinds.size(); j++)
    proj.push_back({packed[j].data_ptr<uint8_t>(), biases[j].numel() ? biases[j].data_ptr<bf16>() : nullptr,
                    packed[j].size(1) * 32, packed[j].size(0) * 16, kinds[j] == W8A8});
  const int64_t Nqkv = proj[0].N, Hq = Nqkv / D - 2 * Hkv, I = proj[3].K;
  for (int64_t i = 0; i < L; i++)
    TORCH_CHECK(proj[4 * i].K == H && proj[4 * i].N == Nqkv && proj[4 * i + 1].K == Hq * D && proj[4 * i + 1].N == H &&
                    proj[4 * i + 2].K == H && proj[4 * i + 2].N == 2 * I && proj[4 * i + 3].K == I &&
                    proj[4 * i + 3].N == H,
                "layers: projection shapes do not chain");
  with_head_dim(D, [](auto) {});  // an unsupported head_dim fails here, not inside the parallel region
  auto out = at::empty({M, H}, x_in.options());
  auto buf = [&](int64_t n) { return at::empty({n}, x_in.options()); };
  at::Tensor x = x_in.clone(), qkv = buf(M * Nqkv), attn = buf(M * Hq * D), mix = buf(M * H), gu = buf(M * 2 * I);
  at::Tensor h = buf(M * std::max(H, I));  // normalized or gated rows: a projection's input before quantization
  bf16 *xp = x.data_ptr<bf16>(), *qkvp = qkv.data_ptr<bf16>(), *attnp = attn.data_ptr<bf16>(), *mixp = mix.data_ptr<bf16>(),
       *gup = gu.data_ptr<bf16>(), *hp = h.data_ptr<bf16>();
  Q8Rows q8(M, std::max({H, Hq * D, I}));
  std::vector<float> qf(M * Hq * D);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  Phases phases(10 * L + 1);

  // projection j of the quantized rows into y: a thread's share of the tiles (+ bias)
  const auto project = [&](int64_t j, int64_t piece, bf16* y) {
    const Proj& p = proj[j];
    const int64_t tiles = p.N / 16, t0 = tiles * piece / threads, t1 = tiles * (piece + 1) / threads;
    if (p.w8) a8_tiles<true>(p.w, t0, t1, q8, M, p.K, p.N, y);
    else a8_tiles<false>(p.w, t0, t1, q8, M, p.K, p.N, y);
    if (p.bias)
      for (int64_t m = 0; m < M; m++) add_rows(y + m * p.N + t0 * 16, p.bias + t0 * 16, (t1 - t0) * 16);
  };
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int64_t phase = 0;
    std::vector<float> scores;
    for (int64_t i = 0; i < L; i++) {
      const bf16* attn_norm = norms[2 * i].data_ptr<bf16>();
      const bf16* mlp_norm = norms[2 * i + 1].data_ptr<bf16>();
      phases.run(phase, M, [&](int64_t m) {  // row m of the residual stream (+ the last down projection): norm, quantize
        if (i > 0) add_rows(xp + m * H, mixp + m * H, H);
        rms_norm_row(xp + m * H, attn_norm, H, eps, hp + m * H);
        q8.quantize(hp, m, m + 1, H);
      });
      phases.run(phase, threads, [&](int64_t piece) { project(4 * i, piece, qkvp); });
      const Attention<bf16> a{qkvp, cos.data_ptr<bf16>(), sin.data_ptr<bf16>(), k.data_ptr<bf16>() + i * Hkv * cap * D,
                              v.data_ptr<bf16>() + i * Hkv * cap * D, attnp, slots.data_ptr<int64_t>(),
                              own.data_ptr<int64_t>(), own_count.data_ptr<int64_t>(), M, Hq, Hkv, cap, own.size(1),
                              context, qf.data()};
      with_head_dim(D, [&](auto dim) {
        constexpr int DIM = decltype(dim)::value;
        phases.run(phase, M, [&](int64_t m) { rope_rows<bf16, DIM>(a, m, m + 1); });
        phases.run(phase, M * Hkv, [&](int64_t item) { attend_items<bf16, DIM>(a, item, item + 1, scores); });
      });
      phases.run(phase, M, [&](int64_t m) { q8.quantize(attnp, m, m + 1, Hq * D); });
      phases.run(phase, threads, [&](int64_t piece) { project(4 * i + 1, piece, mixp); });
      phases.run(phase, M, [&](int64_t m) {
        add_rows(xp + m * H, mixp + m * H, H);
        rms_norm_row(xp + m * H, mlp_norm, H, eps, hp + m * H);
        q8.quantize(hp, m, m + 1, H);
      });
      phases.run(phase, threads, [&](int64_t piece) { project(4 * i + 2, piece, gup); });
      phases.run(phase, M, [&](int64_t m) {
        silu_mul_row(gup + m * 2 * I, I, hp + m * I);
        q8.quantize(hp, m, m + 1, I);
      });
      phases.run(phase, threads, [&](int64_t piece) { project(4 * i + 3, piece, mixp); });
    }
    phases.run(phase, M, [&](int64_t m) {
      add_rows(xp + m * H, mixp + m * H, H);
      rms_norm_row(xp + m * H, norms[2 * L].data_ptr<bf16>(), H, eps, out.data_ptr<bf16>() + m * H);
    });
  });
  return out;
}
#endif

at::Tensor layers(const at::Tensor& x_in, at::TensorList norms, at::IntArrayRef kinds, at::TensorList packed,
                  at::TensorList scales, at::TensorList biases, const at::Tensor& cos, const at::Tensor& sin,
                  at::Tensor k, at::Tensor v, const at::Tensor& slots, int64_t context, const at::Tensor& own,
                  const at::Tensor& own_count, double eps) {
  // x [q, H] embeddings; norms [2L + 1] (attention, MLP per layer, then the final one); kinds, packed,
  // scales, biases [4L] (qkv, o, gate/up, down per layer; an empty tensor where there is none);
  // k, v [L, Hkv, capacity, D] the cache; the rest as rope_attention takes them -> [q, H] normalized
  const int64_t L = k.size(0);
  TORCH_CHECK(norms.size() == static_cast<size_t>(2 * L + 1) && kinds.size() == static_cast<size_t>(4 * L) &&
                  packed.size() == kinds.size() && scales.size() == kinds.size() && biases.size() == kinds.size(),
              "layers: 2L + 1 norms and 4L projections for the cache's L layers");
#if defined(W4A8_VNNI) || defined(W4A8_AVX2)
  const bool a8 = std::all_of(kinds.begin(), kinds.end(), [](int64_t kind) { return kind == W4A8 || kind == W8A8; });
  const auto bf16_or_none = [&](const at::Tensor& t) {
    return t.numel() == 0 || (t.scalar_type() == at::kBFloat16 && t.is_contiguous());
  };
  if (a8 && x_in.scalar_type() == at::kBFloat16 && x_in.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
      std::all_of(norms.begin(), norms.end(), bf16_or_none) && std::all_of(biases.begin(), biases.end(), bf16_or_none) &&
      std::all_of(packed.begin(), packed.end(), [](const at::Tensor& t) { return t.is_contiguous(); })) {
    check_attention(x_in.size(0), packed[0].size(0) * 16, x_in.scalar_type(), cos, sin, k.select(0, 0), v.select(0, 0),
                    slots, context, own, own_count);
    return layers_a8(x_in, norms, kinds, packed, biases, cos, sin, k, v, slots, context, own, own_count, eps);
  }
#endif
  at::Tensor x = x_in;
  for (int64_t i = 0; i < L; i++) {
    const auto p = [&](int64_t j, const at::Tensor& in) {
      return project(in, kinds[4 * i + j], packed[4 * i + j], scales[4 * i + j], biases[4 * i + j]);
    };
    const at::Tensor qkv = p(0, rms_norm(x, norms[2 * i], eps));
    const at::Tensor attn = rope_attention(qkv, cos, sin, k.select(0, i), v.select(0, i), slots, context, own, own_count);
    x = at::add(x, p(1, attn));
    x = at::add(x, p(3, silu_mul(p(2, rms_norm(x, norms[2 * i + 1], eps)))));
  }
  return rms_norm(x, norms[2 * L], eps);
}

// ---- the draft heads at one position: DraftHeads.forward, topk and token_ids in one call ----
// The same ATen ops and projections in the same order as heads.py's Python (so the same bits: tested),
// without the Python and dispatcher between some 60-100 small ops a draft (0.5-0.6 ms of a 0.85 ms
// draft on a 2-core CPU, against a 3 ms decoding step). Projections in the order the heads take
// them: lookup's token (heads that read lookup), then each head's blocks, then the shared LM head.
// Row i of a table [rows, H] (float32 or bfloat16) in bfloat16, rounded as .to(bfloat16) rounds
void row_bf16(const at::Tensor& table, int64_t i, c10::BFloat16* out) {
  const int64_t H = table.size(-1);
  TORCH_CHECK(table.is_contiguous() && i >= 0 && i * H < table.numel(), "draft_topk: row ", i, " outside its table");
  if (table.scalar_type() == at::kBFloat16) {
    std::memcpy(out, table.data_ptr<c10::BFloat16>() + i * H, H * sizeof(c10::BFloat16));
  } else {
    TORCH_CHECK(table.scalar_type() == at::kFloat, "draft_topk: float32 or bfloat16 tables");
    const float* row = table.data_ptr<float>() + i * H;
    for (int64_t j = 0; j < H; j++) out[j] = c10::BFloat16(row[j]);
  }
}

// torch.topk(row, k) (largest first) as ATen's CPU kernel selects it, ties included, over the logits
// x [V] and, where extra_col, the copy column's `extra` as column V: (value, index) pairs in index
// order, std::partial_sort where k * 64 <= n, else std::nth_element and a sort of the first k - 1;
// NaN counts as the largest -> queue[0, k): the k (value, column) pairs, best first
void topk_row(const c10::BFloat16* x, int64_t V, bool extra_col, float extra, int64_t k,
              std::vector<std::pair<float, int64_t>>& queue) {
  using Pair = std::pair<float, int64_t>;
  const auto larger = [](const Pair& a, const Pair& b) {
    return (std::isnan(a.first) && !std::isnan(b.first)) || a.first > b.first;
  };
  const int64_t n = V + (extra_col ? 1 : 0);
  const auto pair = [&](int64_t j) { return Pair{j < V ? static_cast<float>(x[j]) : extra, j}; };
  if (k * 64 > n) {
    queue.resize(n);
    for (int64_t j = 0; j < n; j++) queue[j] = pair(j);
    std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), larger);
    std::sort(queue.begin(), queue.begin() + k - 1, larger);
    return;
  }
  // std::partial_sort is a heap of the first k, each later pair larger than the heap's top swapped in
  // (pop_heap with the pair at the heap's end: the same steps), then sort_heap. Pairs no larger than
  // the top leave it as it is, so blocks of eight with none larger (or NaN) are skipped: the same
  // steps as over every pair, without writing all n pairs (with first_max's vector loop on AVX2: the
  // shipped heads' draft 1.65 -> 1.48 ms a step)
  queue.resize(k + 1);
  for (int64_t j = 0; j < k; j++) queue[j] = pair(j);
  std::make_heap(queue.begin(), queue.begin() + k, larger);
  const auto offer = [&](int64_t j) {
    const Pair p = pair(j);
    if (!larger(p, queue[0])) return;
    queue[k] = p;
    std::pop_heap(queue.begin(), queue.begin() + k + 1, larger);
  };
  int64_t j = k;
#if defined(__AVX2__)
  for (; j + 8 <= V; j += 8) {
    const __m256 v = load8(x + j);
    const __m256 top = _mm256_set1_ps(queue[0].first);  // a NaN top: no pair is larger, none passes
    const __m256 pass = _mm256_or_ps(_mm256_cmp_ps(v, top, _CMP_GT_OQ),
                                     _mm256_and_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_cmp_ps(top, top, _CMP_ORD_Q)));
    if (_mm256_movemask_ps(pass) == 0) continue;
    for (int64_t i = j; i < j + 8; i++) offer(i);
  }
#endif
  for (; j < n; j++) offer(j);
  queue.resize(k);
  std::sort_heap(queue.begin(), queue.end(), larger);
}

int64_t first_max(const c10::BFloat16* x, int64_t n);

// A head's softmax denominator: sum exp(v - m) over its logits x [V] and the copy column `extra`
// (-inf: none), m their maximum; the probability of v is exp(v - m) / sum
float exp_sum(const c10::BFloat16* x, int64_t V, float extra, float m) {
  const int64_t body = V / 16 * 16;
  v16 sum{};
  for (int64_t j = 0; j < body; j += 16) sum += exp_nonpositive(load16(x + j) - splat(m));
  float total = hsum(sum) + (extra > -INFINITY ? std::exp(extra - m) : 0.f);
  for (int64_t j = body; j < V; j++) total += std::exp(static_cast<float>(x[j]) - m);
  return total;
}

std::tuple<at::Tensor, at::Tensor> draft_topk(const at::Tensor& h, const at::Tensor& embed, int64_t root, const at::Tensor& lookup,
                      at::IntArrayRef kinds, at::TensorList packed, at::TensorList scales, at::TensorList biases,
                      const at::Tensor& ngram, const at::Tensor& bonus_weight, const at::Tensor& bonus_bias,
                      const at::Tensor& output_weight, const at::Tensor& vocab_ids, const at::Tensor& column,
                      bool sequential, int64_t num_layers, int64_t heads, int64_t top_k) {
  // h [H]; embed [V, H] (root_token heads, else empty: the chain starts from h); lookup [1 + T] int64
  // (n, t_1 .. t_T), empty for heads that do not read it; ngram [n_max + 1, H], bonus_weight
  // [T (n_max + 1), H], bonus_bias [T (n_max + 1)]; output_weight [V, H] the base LM head; vocab_ids
  // [V'] the head vocabulary; column [V] int64 each token's column in it (-1: outside)
  // sequential: Cerberus (block 0 of head k reads [h, what head k - 1 passes]), else Medusa (h alone)
  // -> ([heads, top_k] token ids, best first; [heads, top_k] float32 their probabilities under
  // each head's softmax, the copy column included)
  // Glue (rows of tables, concatenations, adds, the top-k) runs on raw rows with the rounding of the
  // ATen ops it replaces; SiLU and the bonus's sums stay ATen's (their own arithmetic).
  using bf16 = c10::BFloat16;
  const bool reads_lookup = lookup.numel() > 0;
  const size_t used = (reads_lookup ? 1 : 0) + heads * num_layers + 1;
  TORCH_CHECK(h.dim() == 1 && h.is_contiguous() && heads >= 1 && num_layers >= 1 && kinds.size() >= used &&
                  packed.size() == kinds.size() && scales.size() == kinds.size() && biases.size() == kinds.size(),
              "draft_topk: h [H] and a projection for lookup's token, each block and the LM head");
  TORCH_CHECK(h.scalar_type() == at::kBFloat16, "draft_topk: bfloat16 states (the 8-bit projections' input)");
  TORCH_CHECK(!reads_lookup || (lookup.is_contiguous() && lookup.scalar_type() == at::kLong && lookup.numel() >= 2),
              "draft_topk: lookup [1 + T] int64");
  const int64_t H = h.size(0), J = heads;
  const bf16* hp = h.data_ptr<bf16>();
  const auto row = [&](int64_t width) { return at::empty({1, width}, h.options()); };
  size_t next = 0;
  const auto project_row = [&](const at::Tensor& x) {  // x [1, K] -> [1, N], as heads.Linear runs a row
    const size_t j = next++;
    return project(x, kinds[j], packed[j], scales[j], biases[j]);
  };
  at::Tensor prev = h.view({1, H});  // what the chain passes the next head
  const int64_t* found_by_lookup = reads_lookup ? lookup.data_ptr<int64_t>() : nullptr;  // (n, t_1 .. t_T)
  const int64_t n = reads_lookup ? found_by_lookup[0] : 0;
  if (embed.numel()) {  // root_token: the chain starts at the root's embedding (and lookup's input)
    prev = row(H);
    bf16* pp = prev.data_ptr<bf16>();
    row_bf16(embed, root, pp);
    if (reads_lookup) {
      at::Tensor found = row(H);  // the token lookup found after the root, zero without a match
      bf16* fp = found.data_ptr<bf16>();
      row_bf16(embed, std::max<int64_t>(found_by_lookup[1], 0), fp);
      const float match = n > 0 ? 1.f : 0.f;
      for (int64_t j = 0; j < H; j++) fp[j] = bf16(static_cast<float>(fp[j]) * match);
      const at::Tensor token = project_row(found);
      std::vector<bf16> length(H);  // the match length's embedding
      row_bf16(ngram, n, length.data());
      const bf16* tp = token.data_ptr<bf16>();
      for (int64_t j = 0; j < H; j++) pp[j] = add_bf16(pp[j], add_bf16(tp[j], length[j]));
    }
  }
  at::Tensor z = at::empty({J, H}, h.options());  // [J, H] each head's state
  bf16* zp = z.data_ptr<bf16>();
  for (int64_t k = 0; k < J; k++) {
    at::Tensor in = h.view({1, H});
    if (sequential) {  // [h, prev]
      in = row(2 * H);
      std::memcpy(in.data_ptr<bf16>(), hp, H * sizeof(bf16));
      std::memcpy(in.data_ptr<bf16>() + H, prev.data_ptr<bf16>(), H * sizeof(bf16));
    }
    at::Tensor zk = z.narrow(0, k, 1);
    bf16* zkp = zp + k * H;
    std::memcpy(zkp, hp, H * sizeof(bf16));
    for (int64_t l = 0; l < num_layers; l++) {  // z = z + silu(block(input)); block 0 reads `in`, the others z
      const at::Tensor s = at::silu(project_row(l == 0 ? in : zk));
      add_rows(zkp, s.data_ptr<bf16>(), H);
    }
    prev = zk;
  }
  const size_t last = kinds.size() - 1;  // the LM head: last, after every head's blocks (this call may run fewer heads)
  const at::Tensor logits = project(z, kinds[last], packed[last], scales[last], biases[last]);  // [J, V']
  bf16* lp = logits.data_ptr<bf16>();
  const int64_t V = vocab_ids.size(0);
  TORCH_CHECK(logits.size(1) == V && vocab_ids.scalar_type() == at::kLong && vocab_ids.is_contiguous(),
              "draft_topk: the LM head's columns are the head vocabulary");
  std::vector<int64_t> copy_token(J, -1);  // lookup's token per head
  std::vector<float> copy(J, -INFINITY);  // the copy column's logit per head
  if (reads_lookup) {  // DraftHeads.copy_bonus, first = 0
    const int64_t lengths = ngram.size(0), T = bonus_weight.size(0) / lengths, R = std::min(J, T);
    TORCH_CHECK(lookup.numel() >= 1 + R, "draft_topk: lookup holds fewer tokens than the heads read");
    const at::Tensor weight = bonus_weight.view({T, lengths, -1}).narrow(0, 0, R).select(1, n);  // [R, H]
    const at::Tensor bias = bonus_bias.view({T, lengths}).narrow(0, 0, R).select(1, n).to(h.scalar_type()).contiguous();
    const at::Tensor dot = at::sum(at::mul(z.narrow(0, 0, R), weight.to(h.scalar_type())), -1);  // [R]
    std::vector<bf16> bonus(J, bf16(0.f));
    for (int64_t k = 0; k < R; k++) {
      bonus[k] = add_bf16(dot.data_ptr<bf16>()[k], bias.data_ptr<bf16>()[k]);
      copy_token[k] = found_by_lookup[1 + k];
    }
    const int64_t* col = column.data_ptr<int64_t>();
    std::vector<bool> outside(J);
    for (int64_t k = 0; k < J; k++) {  // the bonus on the token's column, or the copy column's logit
      const int64_t tok = copy_token[k];
      TORCH_CHECK(tok < column.size(0), "draft_topk: lookup's token ", tok, " is outside the vocabulary");
      if (tok < 0 || n <= 0) continue;
      if (col[tok] >= 0) lp[k * V + col[tok]] = add_bf16(lp[k * V + col[tok]], bonus[k]);
      else outside[k] = true;
    }
    if (std::find(outside.begin(), outside.end(), true) != outside.end()) {  // a copy from outside the vocabulary
      at::Tensor rows = at::empty({J, H}, h.options());  // each head's copied token's base LM-head row
      for (int64_t k = 0; k < J; k++) row_bf16(output_weight, std::max<int64_t>(copy_token[k], 0), rows.data_ptr<bf16>() + k * H);
      const at::Tensor copy_dot = at::sum(at::mul(z, rows), -1);  // [J]
      for (int64_t k = 0; k < J; k++)
        if (outside[k]) copy[k] = static_cast<float>(add_bf16(copy_dot.data_ptr<bf16>()[k], bonus[k]));
    }
  }
  auto out = at::empty({J, top_k}, vocab_ids.options());
  auto probs = at::empty({J, top_k}, vocab_ids.options().dtype(at::kFloat));
  int64_t* op = out.data_ptr<int64_t>();
  float* pp = probs.data_ptr<float>();
  const int64_t* vocab = vocab_ids.data_ptr<int64_t>();
  const int64_t width = V + (reads_lookup ? 1 : 0);  // the logits, then the copy column
  TORCH_CHECK(top_k >= 1 && top_k <= width, "draft_topk: top_k outside 1 ..", width);
  std::vector<std::pair<float, int64_t>> queue;
  for (int64_t k = 0; k < J; k++) {
    // the first largest column (a NaN first), then the copy column if larger: the top-1 of torch.topk
    // (partial_sort into one place keeps the first largest), and the softmax's maximum
    int64_t c = first_max(lp + k * V, V);
    float top = static_cast<float>(lp[k * V + c]);
    if (reads_lookup && (copy[k] > top || (std::isnan(copy[k]) && !std::isnan(top)))) c = V, top = copy[k];
    const float total = exp_sum(lp + k * V, V, reads_lookup ? copy[k] : -INFINITY, top);
    if (top_k == 1) {
      pp[k] = 1.f / total;  // exp(top - top) / total
      op[k] = c == V ? copy_token[k] : vocab[c];
      continue;
    }
    topk_row(lp + k * V, V, reads_lookup, copy[k], top_k, queue);
    for (int64_t j = 0; j < top_k; j++) {  // queue[j]: the j-th best (value, column)
      const int64_t c = queue[j].second;
      pp[k * top_k + j] = std::exp(queue[j].first - top) / total;
      op[k * top_k + j] = c == V ? copy_token[k] : vocab[c];
    }
  }
  return {out, probs};
}

// draft_topk's tokens and probabilities gathered into a tree's nodes: node i + 1 is the rank of the
// head at its depth that nodes[i] = head * top_k + rank names, parents[i] its parent (0: the root)
// -> (node tokens [N+1], the root first; each node's confidence [N+1] float32: the product of the
// probabilities along its path, multiplied from the root down as DraftHeads._draft does, the root 1)
std::tuple<at::Tensor, at::Tensor> draft_tree(const at::Tensor& h, const at::Tensor& embed, int64_t root, const at::Tensor& lookup,
                      at::IntArrayRef kinds, at::TensorList packed, at::TensorList scales, at::TensorList biases,
                      const at::Tensor& ngram, const at::Tensor& bonus_weight, const at::Tensor& bonus_bias,
                      const at::Tensor& output_weight, const at::Tensor& vocab_ids, const at::Tensor& column,
                      bool sequential, int64_t num_layers, int64_t heads, int64_t top_k, at::IntArrayRef nodes,
                      at::IntArrayRef parents) {
  const auto [ids, probs] = draft_topk(h, embed, root, lookup, kinds, packed, scales, biases, ngram, bonus_weight, bonus_bias,
                                       output_weight, vocab_ids, column, sequential, num_layers, heads, top_k);
  const int64_t N = static_cast<int64_t>(nodes.size());
  TORCH_CHECK(N >= 1 && static_cast<int64_t>(parents.size()) == N, "draft_tree: a parent for each of at least one node");
  auto tokens = at::empty({N + 1}, ids.options());
  auto confidence = at::empty({N + 1}, probs.options());
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* cp = confidence.data_ptr<float>();
  const int64_t* ip = ids.data_ptr<int64_t>();
  const float* pp = probs.data_ptr<float>();
  tp[0] = root, cp[0] = 1.f;
  for (int64_t i = 0; i < N; i++) {
    TORCH_CHECK(nodes[i] >= 0 && nodes[i] < ids.numel() && parents[i] >= 0 && parents[i] <= i,
                "draft_tree: node ", i + 1, " outside the heads' top-k or after its parent");
    tp[i + 1] = ip[nodes[i]];
    cp[i + 1] = cp[parents[i]] * pp[nodes[i]];
  }
  return {tokens, confidence};
}

// ---- argmax of each row (greedy decoding's choice), first index on ties, as torch's ----
// torch's argmax over a 49k vocabulary took 60-90 us a row (bfloat16 converted to float first);
// one vector pass takes ~12 on AVX-512. Built for AVX2 the same loop took 200 us (GCC splits each
// 16-lane vector in two, badly), so there bfloat16 rows take first_max's eight-lane loop and float32
// rows torch's argmax.
#if defined(__AVX512F__)
template <typename T>
int64_t argmax_row(const T* x, int64_t V) {
  typedef int32_t i16x __attribute__((vector_size(64)));
  const int64_t body = V / 16 * 16;
  v16 mx = splat(-INFINITY);
  i16x at = i16x{} - 1, nan{};  // lane l: where its maximum is first met (each lane keeps its first)
  const i16x lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t i = 0; i < body; i += 16) {
    const v16 v = load16(x + i);
    const i16x bigger = v > mx;
    mx = bigger ? v : mx;
    at = bigger ? lane + static_cast<int32_t>(i) : at;
    nan |= v != v;
  }
  float m = -INFINITY;
  int64_t best = 0;  // stays 0 if every value is -inf
  for (int l = 0; l < 16; l++)  // the largest lane value, at its first index
    if (at[l] >= 0 && (mx[l] > m || (mx[l] == m && at[l] < best))) m = mx[l], best = at[l];
  bool any_nan = false;
  for (int l = 0; l < 16; l++) any_nan |= nan[l] != 0;
  for (int64_t i = body; i < V; i++) {
    const float v = static_cast<float>(x[i]);
    any_nan |= v != v;
    if (v > m) m = v, best = i;
  }
  if (any_nan)  // torch counts NaN as the maximum: the first NaN
    for (int64_t i = 0; i < V; i++)
      if (static_cast<float>(x[i]) != static_cast<float>(x[i])) return i;
  return best;
}

#endif

at::Tensor argmax_rows(const at::Tensor& x) {
  // x [R, V] float32 or bfloat16 -> [R] int64: each row's first maximum
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0, "argmax_rows: x [R, V], contiguous");
  const int64_t R = x.size(0), V = x.size(1);
  auto out = at::empty({R}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  if (x.scalar_type() == at::kBFloat16) {  // first_max: a vector loop on AVX-512 and AVX2 alike
    for (int64_t r = 0; r < R; r++) o[r] = first_max(x.data_ptr<c10::BFloat16>() + r * V, V);
    return out;
  }
#if defined(__AVX512F__)
  TORCH_CHECK(x.scalar_type() == at::kFloat, "argmax_rows: float32 or bfloat16");
  for (int64_t r = 0; r < R; r++) o[r] = argmax_row(x.data_ptr<float>() + r * V, V);
  return out;
#else
  return at::argmax(x.to(at::kFloat), 1);
#endif
}

// The first maximum of x [n] (a NaN first if there is one), argmax_rows's rule
int64_t first_max(const c10::BFloat16* x, int64_t n) {
#if defined(__AVX512F__)
  return argmax_row(x, n);
#else
#if defined(__AVX2__)
  // eight lanes, each keeping its maximum where first met; a NaN anywhere: the scalar loop below finds
  // the first (which was all there was on AVX2: a head's draft, the fused LM head's argmax)
  const int64_t body = n / 8 * 8;
  __m256 mx = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
  __m256i at = _mm256_set1_epi32(-1), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < body; i += 8) {
    const __m256 v = load8(x + i);
    const __m256 bigger = _mm256_cmp_ps(v, mx, _CMP_GT_OQ);
    mx = _mm256_blendv_ps(mx, v, bigger);
    at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(lane), bigger));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    lane = _mm256_add_epi32(lane, _mm256_set1_epi32(8));
  }
  if (_mm256_movemask_ps(nan) == 0) {
    alignas(32) float m8[8];
    alignas(32) int32_t at8[8];
    _mm256_store_ps(m8, mx);
    _mm256_store_si256(reinterpret_cast<__m256i*>(at8), at);
    float m = -INFINITY;
    int64_t best = 0;  // stays 0 if every value is -inf
    for (int l = 0; l < 8; l++)  // the largest lane value, at its first index
      if (at8[l] >= 0 && (m8[l] > m || (m8[l] == m && at8[l] < best))) m = m8[l], best = at8[l];
    for (int64_t i = body; i < n; i++) {
      const float v = static_cast<float>(x[i]);
      if (v != v) return i;
      if (v > m) m = v, best = i;
    }
    return best;
  }
#endif
  int64_t best = 0;
  float m = -INFINITY;
  for (int64_t i = 0; i < n; i++) {
    const float v = static_cast<float>(x[i]);
    if (v != v) return i;
    if (v > m) m = v, best = i;
  }
  return best;
#endif
}

#if defined(W4A8_VNNI) || defined(W4A8_AVX2)
// w8a8_linear and each row's first maximum (greedy decoding's choice, argmax_rows's rule) in one
// call: each thread finds the maxima of the tiles it has just written, while they are in its cache
// (read afterwards from another core's cache, the 2 x 49152 logits of a verification took ~80 us
// against 12 us hot), then the threads' candidates are compared in column order.
std::tuple<at::Tensor, at::Tensor> w8a8_linear_argmax(const at::Tensor& x, const at::Tensor& packed) {
  // x [M, K] bf16, packed as w8a8_linear -> ([M, N] bf16, [M] int64)
  const int64_t M = x.size(0), tiles = packed.size(0), N = tiles * 16;
  std::vector<int64_t> found(tiles * M, -1);  // at a thread's first tile: each row's first maximum in its tiles
  const at::Tensor y = a8_linear<true>(x, packed, [&](int64_t begin, int64_t end, const at::Tensor& out) {
    const c10::BFloat16* yp = out.data_ptr<c10::BFloat16>();
    for (int64_t m = 0; m < M; m++)
      found[begin * M + m] = begin * 16 + first_max(yp + m * N + begin * 16, (end - begin) * 16);
  });
  auto ids = at::empty({M}, x.options().dtype(at::kLong));
  const c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  for (int64_t m = 0; m < M; m++) {
    int64_t best = 0;
    float top = -INFINITY;
    for (int64_t t = 0; t < tiles; t++) {  // the threads' candidates in column order: the first wins ties
      const int64_t c = found[t * M + m];
      if (c < 0) continue;
      const float v = static_cast<float>(yp[m * N + c]);
      if (v != v) {  // the first NaN (earlier threads' columns had none)
        best = c;
        break;
      }
      if (v > top) top = v, best = c;
    }
    ids.data_ptr<int64_t>()[m] = best;
  }
  return {y, ids};
}
#else
std::tuple<at::Tensor, at::Tensor> w8a8_linear_argmax(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "w8a8_linear_argmax needs AVX512-VNNI or AVX2");
}
#endif

bool quantized_matmuls() {  // whether int4_linear / int8_linear are built
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}
bool w4a8_matmuls() {  // whether w4a8_linear and w8a8_linear are built
#if defined(W4A8_VNNI) || defined(W4A8_AVX2)
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(cerberus, m) {
  m.def("rope_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k, Tensor(b!) v, Tensor slots, int context, Tensor own, Tensor own_count) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scale) -> Tensor");
  m.def("w4a8_linear(Tensor x, Tensor packed) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor packed) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("w8a8_linear_argmax(Tensor x, Tensor packed) -> (Tensor, Tensor)");
  m.def("layers(Tensor x, Tensor[] norms, int[] kinds, Tensor[] packed, Tensor[] scales, Tensor[] biases, Tensor cos, Tensor sin, Tensor(a!) k, Tensor(b!) v, Tensor slots, int context, Tensor own, Tensor own_count, float eps) -> Tensor");
  m.def("draft_topk(Tensor h, Tensor embed, int root, Tensor lookup, int[] kinds, Tensor[] packed, Tensor[] scales, Tensor[] biases, Tensor ngram, Tensor bonus_weight, Tensor bonus_bias, Tensor output_weight, Tensor vocab_ids, Tensor column, bool sequential, int num_layers, int heads, int top_k) -> (Tensor, Tensor)");
  m.def("draft_tree(Tensor h, Tensor embed, int root, Tensor lookup, int[] kinds, Tensor[] packed, Tensor[] scales, Tensor[] biases, Tensor ngram, Tensor bonus_weight, Tensor bonus_bias, Tensor output_weight, Tensor vocab_ids, Tensor column, bool sequential, int num_layers, int heads, int top_k, int[] nodes, int[] parents) -> (Tensor, Tensor)");
  m.def("quantized_matmuls() -> bool", quantized_matmuls);  // no tensors: one kernel for every device
  m.def("w4a8_matmuls() -> bool", w4a8_matmuls);
}
TORCH_LIBRARY_IMPL(cerberus, CPU, m) {
  m.impl("rope_attention", rope_attention);
  m.impl("rms_norm", rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("int4_linear", int4_linear);
  m.impl("int8_linear", int8_linear);
  m.impl("w4a8_linear", w4a8_linear);
  m.impl("w8a8_linear", w8a8_linear);
  m.impl("argmax_rows", argmax_rows);
  m.impl("w8a8_linear_argmax", w8a8_linear_argmax);
  m.impl("layers", layers);
  m.impl("draft_topk", draft_topk);
  m.impl("draft_tree", draft_tree);
}
