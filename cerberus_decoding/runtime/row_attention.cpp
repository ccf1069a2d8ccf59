// Exact attention rows for the lean runtime on a CPU (runtime/row_attention.py builds and loads it).
//
// Each row is one query token: its query heads attend to the cache's first `context` entries, then
// to its own entries `own[r, :own_count[r]]` (a tree node's ancestors and itself, or the one-token
// step's own new entry). A row's arithmetic depends only on its query and the keys it reads, in
// that order: never on which other rows are in the call, where its keys lie in the cache, or
// which thread computes it. So a tree node's row is bitwise the one-token step at that node, and
// every row of a verification is computed in one call per layer.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <cmath>
#include <cstring>
#include <vector>

namespace {
constexpr int MAX_GROUP = 8;  // query heads per kv head
typedef float v16 __attribute__((vector_size(64)));  // GCC lowers it to one AVX-512 or two AVX2 registers
typedef uint32_t u16x __attribute__((vector_size(64)));
typedef uint16_t h16 __attribute__((vector_size(32)));

template <typename T>
inline v16 load16(const T* x);
template <>
inline v16 load16(const float* x) {
  v16 y;
  std::memcpy(&y, x, 64);
  return y;
}
template <>
inline v16 load16(const c10::BFloat16* x) {  // bfloat16 is the high half of a float
  h16 h;
  std::memcpy(&h, x, 32);
  u16x b = __builtin_convertvector(h, u16x) << 16;
  v16 y;
  std::memcpy(&y, &b, 64);
  return y;
}

inline float hsum(v16 x) {  // a fixed pairwise fold of the 16 lanes
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// e^x for x <= 0 (Cephes' expf polynomial), 0 below -87, on 16 lanes.
inline v16 exp_nonpositive(v16 x) {
  const v16 big = v16{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  v16 n = (x * 1.44269504088896341f + big) - big;
  v16 r = x - n * 0.693359375f - n * -2.12194440e-4f;
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  typedef int32_t i16x __attribute__((vector_size(64)));
  i16x e = (__builtin_convertvector(n, i16x) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &e, 64);
  return x < -87.f ? v16{} : p * scale;
}

template <typename T, int D>
void attend_row(const T* q, const T* k, const T* v, const int64_t* own, int64_t n_own, int64_t context, int rep,
                float scale, T* out, std::vector<float>& buf) {
  constexpr int C = D / 16;  // vectors per row
  const int64_t n_keys = context + n_own, padded = (n_keys + 15) / 16 * 16;
  buf.resize(rep * padded);
  float* s = buf.data();  // [rep, padded] scores, then weights
  v16 qv[MAX_GROUP][C];
  for (int h = 0; h < rep; h++)
    for (int c = 0; c < C; c++) qv[h][c] = load16(q + h * D + c * 16);
  for (int64_t j = 0; j < n_keys; j++) {
    const T* kj = k + (j < context ? j : own[j - context]) * D;
    v16 kv[C];
    for (int c = 0; c < C; c++) kv[c] = load16(kj + c * 16);
    for (int h = 0; h < rep; h++) {
      v16 acc = qv[h][0] * kv[0];
      for (int c = 1; c < C; c++) acc += qv[h][c] * kv[c];
      s[h * padded + j] = hsum(acc) * scale;
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
    for (int64_t j = 0; j < padded; j += 16) {
      v16 p = exp_nonpositive(load16(sh + j) - m);
      std::memcpy(sh + j, &p, 64);
      total += p;
    }
    const float inv = 1.f / hsum(total);
    for (int64_t j = 0; j < padded; j++) sh[j] *= inv;
  }
  v16 acc[MAX_GROUP][C] = {};
  for (int64_t j = 0; j < n_keys; j++) {
    const T* vj = v + (j < context ? j : own[j - context]) * D;
    v16 vv[C];
    for (int c = 0; c < C; c++) vv[c] = load16(vj + c * 16);
    for (int h = 0; h < rep; h++) {
      const float p = s[h * padded + j];
      for (int c = 0; c < C; c++) acc[h][c] += p * vv[c];
    }
  }
  for (int h = 0; h < rep; h++)
    for (int c = 0; c < C; c++)
      for (int l = 0; l < 16; l++) out[h * D + c * 16 + l] = static_cast<T>(acc[h][c][l]);
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t context, const at::Tensor& own,
         const at::Tensor& own_count, at::Tensor& out) {
  const int64_t n = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(0), cap = k.size(1), E = own.size(1);
  const int rep = Hq / Hkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const int64_t *own_p = own.data_ptr<int64_t>(), *cnt_p = own_count.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  auto row = D == 16 ? attend_row<T, 16> : D == 32 ? attend_row<T, 32> : D == 64 ? attend_row<T, 64> : attend_row<T, 128>;
  at::parallel_for(0, n * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t i = begin; i < end; i++) {
      const int64_t r = i / Hkv, h = i % Hkv;
      row(qp + (r * Hq + h * rep) * D, kp + h * cap * D, vp + h * cap * D, own_p + r * E, cnt_p[r], context, rep,
          scale, op + (r * Hq + h * rep) * D, buf);
    }
  });
}

at::Tensor row_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t context,
                         const at::Tensor& own, const at::Tensor& own_count) {
  // q [n, Hq, D]; k, v [Hkv, capacity, D]; own [n, E] slots, own_count [n]
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && own.is_contiguous());
  const int64_t D = q.size(2);
  TORCH_CHECK(D == 16 || D == 32 || D == 64 || D == 128, "row_attention: head_dim 16, 32, 64 or 128");
  TORCH_CHECK(q.size(1) % k.size(0) == 0 && q.size(1) / k.size(0) <= MAX_GROUP, "row_attention: query heads per kv head");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type());
  auto out = at::empty_like(q);
  if (q.scalar_type() == at::kBFloat16) run<c10::BFloat16>(q, k, v, context, own, own_count, out);
  else if (q.scalar_type() == at::kFloat) run<float>(q, k, v, context, own, own_count, out);
  else TORCH_CHECK(false, "row_attention: float32 or bfloat16");
  return out;
}
}  // namespace

TORCH_LIBRARY(cerberus, m) { m.def("row_attention(Tensor q, Tensor k, Tensor v, int context, Tensor own, Tensor own_count) -> Tensor"); }
TORCH_LIBRARY_IMPL(cerberus, CPU, m) { m.impl("row_attention", row_attention); }
