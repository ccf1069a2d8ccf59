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
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
  uint32_t wide[16];  // a plain loop: GCC widens it well for AVX2 too (generic vector casts it does not)
  for (int l = 0; l < 16; l++) wide[l] = static_cast<uint32_t>(bits[l]) << 16;
  v16 y;
  std::memcpy(&y, wide, 64);
  return y;
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
inline void store16(c10::BFloat16* y, v16 x) {  // round to nearest even, as c10::BFloat16 does
  u16x b;
  std::memcpy(&b, &x, 64);
  b = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  b = x != x ? u16x{} + 0x7FC0u : b;  // NaN stays NaN
  h16 h = __builtin_convertvector(b, h16);
  std::memcpy(y, &h, 32);
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

// RoPE (rotate-half, sign folded into `sin`) of one head x [D] -> float y [D]
template <typename T, int D>
inline void rope(const T* x, const T* cos, const T* sin, float* y) {
  constexpr int half = D / 2;
  for (int d = 0; d < half; d++)
    y[d] = static_cast<float>(x[d]) * static_cast<float>(cos[d]) + static_cast<float>(x[d + half]) * static_cast<float>(sin[d]);
  for (int d = half; d < D; d++)
    y[d] = static_cast<float>(x[d]) * static_cast<float>(cos[d]) + static_cast<float>(x[d - half]) * static_cast<float>(sin[d]);
}

// One row's query heads of one kv head: qf [rep, D] (float, after RoPE) -> out [rep, D]
template <typename T, int D>
void attend_row(const float* qf, const T* k, const T* v, const int64_t* own, int64_t n_own, int64_t context, int rep,
                float scale, T* out, std::vector<float>& buf) {
  constexpr int C = D / 16;  // vectors per row
  const int64_t n_keys = context + n_own, padded = (n_keys + 15) / 16 * 16;
  buf.resize(rep * padded);
  float* s = buf.data();  // [rep, padded] scores, then weights
  v16 qv[MAX_GROUP][C];
  for (int h = 0; h < rep; h++)
    for (int c = 0; c < C; c++) qv[h][c] = load16(qf + h * D + c * 16);
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
    const T* vj = v + (j < context ? j : own[j - context]) * D;
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

template <typename T, int D>
void rope_attention_rows(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k,
                         at::Tensor& v, const at::Tensor& slots, int64_t context, const at::Tensor& own,
                         const at::Tensor& own_count, at::Tensor& out) {
  const int64_t n = qkv.size(0), Hkv = k.size(0), cap = k.size(1), E = own.size(1);
  const int64_t Hq = qkv.size(1) / D - 2 * Hkv;
  const int rep = Hq / Hkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const T *x = qkv.data_ptr<T>(), *cp = cos.data_ptr<T>(), *sp = sin.data_ptr<T>();
  T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *op = out.data_ptr<T>();
  const int64_t *slot = slots.data_ptr<int64_t>(), *own_p = own.data_ptr<int64_t>(), *cnt_p = own_count.data_ptr<int64_t>();
  std::vector<float> qf(n * Hq * D);  // [n, Hq, D] queries after RoPE
  float kf[D];
  for (int64_t r = 0; r < n; r++) {  // RoPE, and this forward's keys and values into their cache slots
    const T* row = x + r * (Hq + 2 * Hkv) * D;
    for (int64_t h = 0; h < Hq; h++) rope<T, D>(row + h * D, cp + r * D, sp + r * D, qf.data() + (r * Hq + h) * D);
    for (int64_t h = 0; h < Hkv; h++) {
      rope<T, D>(row + (Hq + h) * D, cp + r * D, sp + r * D, kf);
      T* kdst = kp + (h * cap + slot[r]) * D;
      T* vdst = vp + (h * cap + slot[r]) * D;
      const T* vsrc = row + (Hq + Hkv + h) * D;
      for (int d = 0; d < D; d++) kdst[d] = static_cast<T>(kf[d]), vdst[d] = vsrc[d];
    }
  }
  at::parallel_for(0, n * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t i = begin; i < end; i++) {
      const int64_t r = i / Hkv, h = i % Hkv;
      attend_row<T, D>(qf.data() + (r * Hq + h * rep) * D, kp + h * cap * D, vp + h * cap * D, own_p + r * E, cnt_p[r],
                       context, rep, scale, op + (r * Hq + h * rep) * D, buf);
    }
  });
}

template <typename T>
void rope_attention_typed(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k,
                          at::Tensor& v, const at::Tensor& slots, int64_t context, const at::Tensor& own,
                          const at::Tensor& own_count, at::Tensor& out) {
  switch (k.size(2)) {
    case 16: return rope_attention_rows<T, 16>(qkv, cos, sin, k, v, slots, context, own, own_count, out);
    case 32: return rope_attention_rows<T, 32>(qkv, cos, sin, k, v, slots, context, own, own_count, out);
    case 64: return rope_attention_rows<T, 64>(qkv, cos, sin, k, v, slots, context, own, own_count, out);
    case 128: return rope_attention_rows<T, 128>(qkv, cos, sin, k, v, slots, context, own, own_count, out);
    default: TORCH_CHECK(false, "rope_attention: head_dim 16, 32, 64 or 128");
  }
}

at::Tensor rope_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k,
                          at::Tensor v, const at::Tensor& slots, int64_t context, const at::Tensor& own,
                          const at::Tensor& own_count) {
  // qkv [n, (Hq + 2 Hkv) D] (the fused projection's output), cos, sin [n, D] (each row's position),
  // k, v [Hkv, capacity, D] (one layer's cache), slots [n], own [n, E], own_count [n] -> [n, Hq D]
  const int64_t D = k.size(2), Hkv = k.size(0), n = qkv.size(0);
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && k.is_contiguous() &&
              v.is_contiguous() && slots.is_contiguous() && own.is_contiguous() && own_count.is_contiguous());
  TORCH_CHECK(qkv.size(1) % D == 0 && qkv.size(1) / D > 2 * Hkv, "rope_attention: qkv width");
  const int64_t Hq = qkv.size(1) / D - 2 * Hkv;
  TORCH_CHECK(Hq % Hkv == 0 && Hq / Hkv <= MAX_GROUP, "rope_attention: query heads per kv head");
  TORCH_CHECK(k.scalar_type() == qkv.scalar_type() && v.scalar_type() == qkv.scalar_type() &&
              cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type());
  TORCH_CHECK(slots.size(0) == n && own.size(0) == n && own_count.size(0) == n);
  const int64_t cap = k.size(1), E = own.size(1);
  const int64_t *slot = slots.data_ptr<int64_t>(), *own_p = own.data_ptr<int64_t>(), *cnt_p = own_count.data_ptr<int64_t>();
  TORCH_CHECK(context >= 0 && context <= cap, "rope_attention: context outside the cache");
  for (int64_t r = 0; r < n; r++) {  // every slot written or read lies in the cache
    TORCH_CHECK(slot[r] >= 0 && slot[r] < cap && cnt_p[r] >= 1 && cnt_p[r] <= E, "rope_attention: bad slots");
    for (int64_t e = 0; e < cnt_p[r]; e++)
      TORCH_CHECK(own_p[r * E + e] >= 0 && own_p[r * E + e] < cap, "rope_attention: bad slots");
  }
  auto out = at::empty({n, Hq * D}, qkv.options());
  if (qkv.scalar_type() == at::kBFloat16) rope_attention_typed<c10::BFloat16>(qkv, cos, sin, k, v, slots, context, own, own_count, out);
  else if (qkv.scalar_type() == at::kFloat) rope_attention_typed<float>(qkv, cos, sin, k, v, slots, context, own, own_count, out);
  else TORCH_CHECK(false, "rope_attention: float32 or bfloat16");
  return out;
}

template <typename T>
void rms_norm_typed(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& out) {
  const int64_t n = x.size(0), H = x.size(1);
  const T *xp = x.data_ptr<T>(), *wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for (int64_t r = 0; r < n; r++) {
    const T* row = xp + r * H;
    v16 acc{};
    for (int64_t i = 0; i < H; i += 16) {
      v16 a = load16(row + i);
      acc += a * a;
    }
    const float inv = 1.f / std::sqrt(hsum(acc) / static_cast<float>(H) + static_cast<float>(eps));
    const v16 scale = splat(inv);
    for (int64_t i = 0; i < H; i += 16) store16(op + r * H + i, load16(row + i) * scale * load16(wp + i));
  }
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

template <typename T>
void silu_mul_typed(const at::Tensor& x, at::Tensor& out) {
  const int64_t n = x.size(0), I = x.size(1) / 2;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for (int64_t r = 0; r < n; r++)
    for (int64_t i = 0; i < I; i += 16) {
      v16 g = load16(xp + r * 2 * I + i), u = load16(xp + r * 2 * I + I + i);
      v16 e = exp_nonpositive(g < 0 ? g : -g);      // e^-|g|, in (0, 1]
      v16 sig = g < 0 ? e / (1.f + e) : 1.f / (1.f + e);  // sigmoid(g) without overflow
      store16(op + r * I + i, g * sig * u);
    }
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
}  // namespace

TORCH_LIBRARY(cerberus, m) {
  m.def("rope_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k, Tensor(b!) v, Tensor slots, int context, Tensor own, Tensor own_count) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(cerberus, CPU, m) {
  m.impl("rope_attention", rope_attention);
  m.impl("rms_norm", rms_norm);
  m.impl("silu_mul", silu_mul);
}
