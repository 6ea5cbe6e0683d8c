// One Llama-family decoder layer's decode step in native code (torch.classes.mamp.DecodeLayer), for packed layers
// served by the C++ CPU kernels: one call per layer and step instead of some fifteen small torch ops from Python.
// It does what kernels/llama_block.py's stages and server/batched_llama.py's decode do, in the same order:
//
//     x    = rms_norm(h) * w_in                      (fp32, HF's formula)
//     q,k,v= fused qkv (packed kernel), RoPE with the caller's cos/sin (rotate-half convention)
//     cache[kvh, block(pos), pos % BS] = k, v          (the paged cache; int8/int4: rotated, quantized on write;
//                                                     int4 keys less R(pos) mu, the row's key center, and
//                                                     position 0 kept exact beside the pool)
//     core = softmax(q K^T / sqrt(D)) V              over positions 0 .. pos of the sequence, its blocks read in place
//     mid  = h + o_proj(core)
//     out  = mid + down(silu(gate) * up)             gate/up one fused packed call, on rms_norm(mid) * w_post
//
// Each row of h is one sequence's new token (M = number of sequences). The linear layers go through the same
// functions as their registered ops (packed_linear_int8 / packed_linear), so their results are those of the
// Python path; attention and the elementwise steps are fp32 loops that differ from torch's only in summation
// order. kernels/native_decode.py builds the object and decides where it applies.
#include <torch/extension.h>
#include <torch/custom_class.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <omp.h>

// Defined in cpu_matmul.cpp and cpu_int8_matmul.cpp (the same module).
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& bitmap,
                         const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& hscales,
                         const at::Tensor& hzeros, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& out, int64_t bits, int64_t hbits, int64_t group_size,
                         int64_t salient_group_size, int64_t small_m, int64_t scratch_bytes);
at::Tensor packed_linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& bitmap,
                              const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& hscales,
                              const at::Tensor& hzeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                              int64_t hbits, int64_t group_size, int64_t salient_group_size, int64_t act_block,
                              int64_t small_m, int64_t scratch_bytes);
// cpu_int8_matmul.cpp: a linear layer prepared once for the integer path, and its product.
struct Int8Plan;
std::shared_ptr<const Int8Plan> int8_plan(const at::Tensor& qweight, const at::Tensor& bitmap,
                                          const at::Tensor& scales, const at::Tensor& zeros,
                                          const at::Tensor& hscales, const at::Tensor& hzeros, int64_t bits,
                                          int64_t hbits, int64_t group_size, int64_t salient_group_size,
                                          int64_t act_block);
int64_t int8_plan_out(const Int8Plan& p);
void int8_plan_run(const Int8Plan& p, const float* x, int64_t M, int64_t K, const float* bias, float* y);

namespace {

constexpr int TENSORS_PER_LINEAR = 6;  // qweight, bitmap, scales, zeros, hscales, hzeros (no bias)
constexpr int INTS_PER_LINEAR = 4;     // bits, salient_bits, group_size, salient_group_size

struct Linear {
  at::Tensor t[TENSORS_PER_LINEAR];
  int64_t bits = 0, hbits = 0, gs = 0, sgs = 0;
};

void rms_norm_rows(const float* x, const float* w, float eps, int64_t rows, int64_t n, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / float(n) + eps);
    float* yr = y + r * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

// x [D] in place: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2]).
inline void rope(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

// kernels/kv_quant.py's rotate: the orthonormal Hadamard transform of x [D] in place, in blocks of the largest
// power of two dividing D, butterflies in the same order (bit for bit the reference's result); its own inverse.
void rotate(float* x, int64_t D) {
  const int64_t P = D & -D;
#if defined(__AVX512F__)
  if (P >= 16 && P <= 256) {  // the same butterflies on vectors: fma(+-1, x, partner) rounds as a + b and a - b do
    const __m512 s1 = _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
    const __m512 s2 = _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1);
    const __m512 s4 = _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
    const __m512 s8 = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m512 sc = _mm512_set1_ps(float(1.0 / std::sqrt(double(P))));
    const int64_t nv = P / 16;
    __m512 v[16];
    for (int64_t base = 0; base < D; base += P) {
      for (int64_t i = 0; i < nv; ++i) {
        __m512 a = _mm512_loadu_ps(x + base + 16 * i);
        a = _mm512_fmadd_ps(s1, a, _mm512_permute_ps(a, 0xB1));          // h = 1: partner j ^ 1
        a = _mm512_fmadd_ps(s2, a, _mm512_permute_ps(a, 0x4E));          // h = 2
        a = _mm512_fmadd_ps(s4, a, _mm512_shuffle_f32x4(a, a, 0xB1));    // h = 4: 128-bit lanes swapped in pairs
        v[i] = _mm512_fmadd_ps(s8, a, _mm512_shuffle_f32x4(a, a, 0x4E));  // h = 8
      }
      for (int64_t h = 1; h < nv; h *= 2) {  // h = 16, 32, ... elements: whole vectors
        for (int64_t i = 0; i < nv; ++i) {
          if (i & h) continue;
          const __m512 a = v[i], b = v[i + h];
          v[i] = _mm512_add_ps(a, b);
          v[i + h] = _mm512_sub_ps(a, b);
        }
      }
      for (int64_t i = 0; i < nv; ++i) _mm512_storeu_ps(x + base + 16 * i, _mm512_mul_ps(v[i], sc));
    }
    return;
  }
#endif
  for (int64_t base = 0; base < D; base += P) {
    for (int64_t h = 1; h < P; h *= 2) {
      for (int64_t i = 0; i < P; i += 2 * h) {
        for (int64_t j = base + i; j < base + i + h; ++j) {
          const float a = x[j], b = x[j + h];
          x[j] = a + b;
          x[j + h] = a - b;
        }
      }
    }
  }
  const float s = float(1.0 / std::sqrt(double(P)));
  for (int64_t i = 0; i < D; ++i) x[i] *= s;
}

// One token's key or value of one head, x [D] (already rotated), quantized as kernels/kv_quant.py does (the same operations in the
// same order, so the codes are those of the reference): int8 symmetric with an fp16 scale.
void store_int8(const float* x, int64_t D, int8_t* codes, at::Half* scale) {
  float amax = 0.f;
  for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
  const at::Half sh(amax / 127.f);
  const float s = float(sh);
  *scale = sh;
  for (int64_t i = 0; i < D; ++i) {
    const float c = s > 0.f ? std::nearbyint(x[i] / s) : 0.f;
    codes[i] = int8_t(std::min(127.f, std::max(-127.f, c)));
  }
}

// int4 asymmetric over the head: zero = min, scale = (max - min) / 15 (both fp16), two codes per byte.
void store_int4(const float* x, int64_t D, uint8_t* codes, at::Half* scale, at::Half* zero) {
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < D; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
  const at::Half zh(lo), sh((hi - lo) / 15.f);
  const float z = float(zh), s = float(sh);
  *zero = zh;
  *scale = sh;
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    uint8_t c[2];
    for (int k = 0; k < 2; ++k) {
      const float v = s > 0.f ? std::nearbyint((x[i + k * half] - z) / s) : 0.f;
      c[k] = uint8_t(std::min(15.f, std::max(0.f, v)));
    }
    codes[i] = uint8_t(c[0] | (c[1] << 4));  // element i in the low nibble, i + D / 2 in the high one
  }
}

// int4 key centering: sc[r * n + j] += sum_i tab[i * npos + j] * a[r * D + i] for R query heads r and positions
// 1 .. n - 1, each table row read once for all R heads (vectorised along the positions).
template <int R>
void center_terms(float* sc, int64_t n, const float* a, int64_t D, const float* tab, int64_t npos) {
  for (int64_t i = 0; i < D; ++i) {
    const float* row = tab + i * npos;
    float ar[R];
    for (int r = 0; r < R; ++r) ar[r] = a[r * D + i];
#pragma omp simd
    for (int64_t j = 1; j < n; ++j) {
      const float t = row[j];
      for (int r = 0; r < R; ++r) sc[r * n + j] += ar[r] * t;
    }
  }
}

#if defined(__AVX512F__)
// exp of 16 floats, Cephes' single-precision method (range reduction by ln 2 in two parts, a degree-6 polynomial,
// 2^n through the exponent bits): within about 2 ulp of expf over [-88.38, 88.38], clamped outside.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f)), _mm512_set1_ps(88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}
#elif defined(__AVX2__)
inline __m256 exp8(__m256 x) {  // as exp16, eight lanes
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// max_i x[i] over n >= 1 floats, in vectors (a scalar max is one dependent chain: a third of a long row's
// attention went to it). The order does not change a maximum.
inline float max_of(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -INFINITY;
#if defined(__AVX512F__)
  __m512 acc = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= n; i += 16) acc = _mm512_max_ps(acc, _mm512_loadu_ps(x + i));
  m = _mm512_reduce_max_ps(acc);
#elif defined(__AVX2__)
  __m256 acc = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= n; i += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(x + i));
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  for (int k = 0; k < 8; ++k) m = std::max(m, t[k]);
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x[i] = exp(x[i] - m) for n floats; returns their sum (the softmax's denominator).
inline float exp_sub_sum(float* x, int64_t n, float m) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(m)));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(m)));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, acc);
  for (int k = 0; k < 8; ++k) s += t[k];
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}

// out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u.
inline void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
  }
#elif defined(__AVX2__)
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// n fp16 values to floats (exact), and floats to fp16 (round to nearest even, as torch's .to(torch.float16)).
inline void halves_to_floats(const at::Half* h, int64_t n, float* out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  }
#endif
  for (; i < n; ++i) out[i] = float(h[i]);
}

inline void floats_to_halves(const float* x, int64_t n, at::Half* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = at::Half(x[i]);
}

// y[i] += x[i] (distinct arrays).
inline void add_to(float* __restrict y, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

// sum_i a[i] b[i] over D floats: vector partial sums, one horizontal reduction (the build's widest vectors; the
// extension is compiled once per instruction set, kernels/cpu_matmul.py), then the tail.
inline float dot(const float* a, const float* b, int64_t D) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  if (D >= 16) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    for (i = 16; i + 16 <= D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
  }
#elif defined(__AVX2__)
  if (D >= 8) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    for (i = 8; i + 8 <= D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    s = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
  }
#endif
  for (; i < D; ++i) s += a[i] * b[i];
  return s;
}

// out[r * D + i] += sum_{o < cnt} p[r * ldp + o] * v[o * D + i] for R rows r: each output chunk held in a register
// across the block's positions (positions in order, as a running sum would take them), stored once per block.
inline void accumulate_block(float* out, const float* p, int64_t ldp, const float* v, int64_t cnt, int64_t R,
                             int64_t D) {
  int64_t c = 0;
#if defined(__AVX512F__)
  for (; c + 16 <= D; c += 16) {
    for (int64_t r = 0; r < R; ++r) {
      __m512 acc = _mm512_loadu_ps(out + r * D + c);
      const float* pr = p + r * ldp;
      for (int64_t o = 0; o < cnt; ++o) acc = _mm512_fmadd_ps(_mm512_set1_ps(pr[o]), _mm512_loadu_ps(v + o * D + c), acc);
      _mm512_storeu_ps(out + r * D + c, acc);
    }
  }
#elif defined(__AVX2__)
  for (; c + 8 <= D; c += 8) {
    for (int64_t r = 0; r < R; ++r) {
      __m256 acc = _mm256_loadu_ps(out + r * D + c);
      const float* pr = p + r * ldp;
      for (int64_t o = 0; o < cnt; ++o) acc = _mm256_fmadd_ps(_mm256_set1_ps(pr[o]), _mm256_loadu_ps(v + o * D + c), acc);
      _mm256_storeu_ps(out + r * D + c, acc);
    }
  }
#endif
  for (; c < D; ++c) {
    for (int64_t r = 0; r < R; ++r) {
      float acc = out[r * D + c];
      for (int64_t o = 0; o < cnt; ++o) acc += p[r * ldp + o] * v[o * D + c];
      out[r * D + c] = acc;
    }
  }
}

#if defined(__AVX512F__)
// The attention's two products register-blocked (AVX-512, head_dim D a multiple of 16; other builds and head
// sizes use dot and accumulate_block above).
//
// dst[0 .. 3] = the horizontal sums of a0 .. a3: per 128-bit lane [a0 a1 a0 a1] pairs, then [a0 a1 a2 a3]
// partials, the four lanes summed.
inline void store_four_sums(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* dst) {
  const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
  _mm_storeu_ps(dst, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

// Scores: dots[r * BS + o] = q_r . k_o for R query rows and the cnt <= BS keys of a block, four keys at a time: one
// accumulator per key over D / 16 vector chunks (independent chains), then the four folded into one vector
// (unpack + add twice: each 128-bit lane holds the four keys' partial sums) and the 128-bit lanes added. A
// remainder of fewer than four keys goes through dot.
inline void block_dots(const float* q, int64_t R, int64_t D, const float* k, int64_t cnt, float* dots,
                       int64_t ldd) {
  int64_t o = 0;
  for (; D % 16 == 0 && o + 4 <= cnt; o += 4) {  // other head sizes: every key through dot below
    const float *k0 = k + o * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
    for (int64_t r = 0; r < R; ++r) {
      const float* qr = q + r * D;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t c = 0; c < D; c += 16) {
        const __m512 qv = _mm512_loadu_ps(qr + c);
        a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + c), a0);
        a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k1 + c), a1);
        a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k2 + c), a2);
        a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k3 + c), a3);
      }
      store_four_sums(a0, a1, a2, a3, dots + r * ldd + o);
    }
  }
  for (; o < cnt; ++o) {
    for (int64_t r = 0; r < R; ++r) dots[r * ldd + o] = dot(q + r * D, k + o * D, D);
  }
}

// A 16-float chunk of keys or values: fp32 as stored, fp16 converted in the register (exact), so an fp16 cache
// is read without a converted copy of each block.
inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16f(const int8_t* p) {  // int8 codes as floats (exact)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16f(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// block_dots over fp16 keys: each key chunk converted once for NR <= 3 query rows (a KV head's query heads), the
// same products in the same order as block_dots over the keys as floats (the same scores, bit for bit).
template <int NR, typename E>
inline void block_dots_h_rows(const float* q, int64_t D, const E* k, int64_t cnt, float* dots, int64_t ldd) {
  int64_t o = 0;
  for (; o + 4 <= cnt; o += 4) {
    __m512 a[NR][4];
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < 4; ++j) a[r][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 16) {
      __m512 kv[4];
      for (int j = 0; j < 4; ++j) kv[j] = load16f(k + (o + j) * D + c);
      for (int r = 0; r < NR; ++r) {
        const __m512 qv = _mm512_loadu_ps(q + r * D + c);
        for (int j = 0; j < 4; ++j) a[r][j] = _mm512_fmadd_ps(qv, kv[j], a[r][j]);
      }
    }
    for (int r = 0; r < NR; ++r) store_four_sums(a[r][0], a[r][1], a[r][2], a[r][3], dots + r * ldd + o);
  }
  for (; o < cnt; ++o) {  // as dot: a product, then fused adds, then one reduction
    for (int r = 0; r < NR; ++r) {
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + r * D), load16f(k + o * D));
      for (int64_t c = 16; c < D; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * D + c), load16f(k + o * D + c), acc);
      dots[r * ldd + o] = _mm512_reduce_add_ps(acc);
    }
  }
}

// Scores of R query rows against cnt <= BS fp16 keys or int8 codes (D a multiple of 16), three rows at a time.
template <typename E>
inline void block_dots_h(const float* q, int64_t R, int64_t D, const E* k, int64_t cnt, float* dots, int64_t ldd) {
  int64_t r = 0;
  for (; r + 3 <= R; r += 3) block_dots_h_rows<3, E>(q + r * D, D, k, cnt, dots + r * ldd, ldd);
  if (R - r == 2) block_dots_h_rows<2, E>(q + r * D, D, k, cnt, dots + r * ldd, ldd);
  else if (R - r == 1) block_dots_h_rows<1, E>(q + r * D, D, k, cnt, dots + r * ldd, ldd);
}

// Values: out[r * D + :] += sum_{o < cnt} p[r * ldp + o] v[o * D + :] for RB rows with every output chunk
// (NC = D / 16 of them per row) in its own register across the block: RB * NC independent chains, each value chunk
// loaded once for all rows; positions in order, as accumulate_block takes them (the same sums, the same rounding).
template <int NC, int RB, typename E>
inline void block_values(float* out, const float* p, int64_t ldp, const E* v, int64_t cnt, int64_t R) {
  (void)R;  // == RB: every loop below runs to the constant
  constexpr int64_t D = NC * 16;
  __m512 acc[RB][NC];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_loadu_ps(out + r * D + c * 16);
  for (int64_t o = 0; o < cnt; ++o) {
    __m512 vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = load16f(v + o * D + c * 16);
    for (int r = 0; r < RB; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * ldp + o]);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + r * D + c * 16, acc[r][c]);
}

template <int NC, typename E>
inline void block_values_rows(float* out, const float* p, int64_t ldp, const E* v, int64_t cnt, int64_t R) {
  constexpr int RB = NC <= 4 ? 4 : NC <= 5 ? 3 : 2;  // RB * NC accumulators + NC values fit 32 registers
  // A pass of exactly `rows` rows (the accumulators stay in registers: a row count known only at run time kept them
  // on the stack).
  auto pass = [&](int64_t r, int64_t rows) {
    float* o = out + r * NC * 16;
    const float* pr = p + r * ldp;
    if (rows >= 4) block_values<NC, RB >= 4 ? 4 : RB, E>(o, pr, ldp, v, cnt, rows);
    else if (rows == 3) block_values<NC, RB >= 3 ? 3 : RB, E>(o, pr, ldp, v, cnt, rows);
    else if (rows == 2) block_values<NC, 2, E>(o, pr, ldp, v, cnt, rows);
    else block_values<NC, 1, E>(o, pr, ldp, v, cnt, rows);
  };
  for (int64_t r = 0; r < R; r += RB) pass(r, std::min<int64_t>(RB, R - r));
}

// The blocked value product where the head size allows it (D = 16 .. 128 in steps of 16), over fp32 values, or
// fp16 / int8 codes converted in the register; other head sizes (fp32 only: the in-place kinds require a multiple
// of 16 up to 128) through accumulate_block.
template <typename E>
inline void values_block(float* out, const float* p, int64_t ldp, const E* v, int64_t cnt, int64_t R, int64_t D) {
  switch (D) {
    case 16: return block_values_rows<1>(out, p, ldp, v, cnt, R);
    case 32: return block_values_rows<2>(out, p, ldp, v, cnt, R);
    case 48: return block_values_rows<3>(out, p, ldp, v, cnt, R);
    case 64: return block_values_rows<4>(out, p, ldp, v, cnt, R);
    case 80: return block_values_rows<5>(out, p, ldp, v, cnt, R);
    case 96: return block_values_rows<6>(out, p, ldp, v, cnt, R);
    case 112: return block_values_rows<7>(out, p, ldp, v, cnt, R);
    case 128: return block_values_rows<8>(out, p, ldp, v, cnt, R);
  }
  if constexpr (std::is_same_v<E, float>) accumulate_block(out, p, ldp, v, cnt, R, D);
}
// The fp16 cache is read in place (no converted copy) where the head size allows it.
constexpr bool kHalfInPlace = true;

// ---- a prompt chunk's rows together (the run path) ---------------------------------------------------------
// R <= 16 consecutive rows of one sequence (a prompt chunk: positions p0 .. p0 + R - 1) and the G query heads of
// one KV head: 16 G queries, held transposed (qt [D][16 G], lane j * 16 + r = head j, row r), against every key
// of the sequence up to p0 + R - 1, so each key is read once for all of them and the products are register-blocked
// outer products with no horizontal sums (a 64-row chunk at 1,984 positions: both products at ~90 % of the fp32
// FMA peak; the chunk's step 1.2x faster than row by row). Values are read from the cache in place (fp16
// converted in the register; int8 rows dequantized into a buffer); the scores and probabilities sit in a
// [positions][16 G] buffer, so the softmax runs across lanes too.
constexpr int64_t kRunRows = 16;  // rows per run task: the 16 lanes of a vector
constexpr int64_t kRunMin = 4;    // shorter runs go row by row

// s[o][:] = scale * (k_o . q) for the cnt keys of a block (rows of D floats), the 16 G queries of qt.
template <int G>
inline void run_scores(const float* qt, const float* k, int64_t cnt, int64_t D, float scale, float* s) {
  constexpr int QW = G * 16, KB = G <= 3 ? 4 : G == 4 ? 3 : G <= 6 ? 2 : 1;  // KB * G accumulators <= 12
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t o = 0;
  auto keys = [&](auto nk) {
    constexpr int NK = decltype(nk)::value;
    __m512 acc[NK][G];
    for (int a = 0; a < NK; ++a)
      for (int j = 0; j < G; ++j) acc[a][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      __m512 qv[G];
      for (int j = 0; j < G; ++j) qv[j] = _mm512_loadu_ps(qt + d * QW + j * 16);
      for (int a = 0; a < NK; ++a) {
        const __m512 kv = _mm512_set1_ps(k[(o + a) * D + d]);
        for (int j = 0; j < G; ++j) acc[a][j] = _mm512_fmadd_ps(kv, qv[j], acc[a][j]);
      }
    }
    for (int a = 0; a < NK; ++a)
      for (int j = 0; j < G; ++j) _mm512_storeu_ps(s + (o + a) * QW + j * 16, _mm512_mul_ps(acc[a][j], sc));
  };
  for (; o + KB <= cnt; o += KB) keys(std::integral_constant<int, KB>());
  for (; o < cnt; ++o) keys(std::integral_constant<int, 1>());
}

// Softmax over the n positions of s [n][16 G], per lane: row r (position p0 + r) sees positions up to its own,
// lanes r >= R none. Probabilities replace the scores (0 where masked); inv[lane] = 1 / their sum.
template <int G>
inline void run_softmax(float* s, int64_t n, int64_t p0, int64_t R, float* inv) {
  constexpr int QW = G * 16;
  const __mmask16 rows = R >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << R) - 1);
  auto valid = [&](int64_t o) -> __mmask16 {  // lanes r with p0 + r >= o
    const int64_t first = o - p0;
    return first <= 0 ? rows : first >= 16 ? __mmask16(0) : __mmask16(rows & (0xFFFFu << first));
  };
  __m512 m[G], sum[G];
  for (int j = 0; j < G; ++j) m[j] = _mm512_set1_ps(-INFINITY), sum[j] = _mm512_setzero_ps();
  for (int64_t o = 0; o < n; ++o) {
    const __mmask16 v = valid(o);
    for (int j = 0; j < G; ++j) m[j] = _mm512_mask_max_ps(m[j], v, m[j], _mm512_loadu_ps(s + o * QW + j * 16));
  }
  for (int j = 0; j < G; ++j) m[j] = _mm512_mask_mov_ps(_mm512_setzero_ps(), rows, m[j]);  // no -inf in exp
  for (int64_t o = 0; o < n; ++o) {
    const __mmask16 v = valid(o);
    for (int j = 0; j < G; ++j) {
      float* x = s + o * QW + j * 16;
      const __m512 e = _mm512_maskz_mov_ps(v, exp16(_mm512_sub_ps(_mm512_loadu_ps(x), m[j])));
      _mm512_storeu_ps(x, e);
      sum[j] = _mm512_add_ps(sum[j], e);
    }
  }
  for (int j = 0; j < G; ++j) _mm512_storeu_ps(inv + j * 16, _mm512_div_ps(_mm512_set1_ps(1.f), sum[j]));
}

// out[i][:] = sum_o p[o][lane_i] v_o over n positions for QP lanes; v_o (NC * 16 values, fp32 or fp16 as cached)
// is row o % bs of block(o / bs), read in place.
template <int NC, int QP, typename E, typename Block>
inline void run_values(const float* p, int64_t QW, Block block, int64_t bs, int64_t n, const int64_t* lane,
                       float* out) {
  constexpr int64_t D = NC * 16;
  __m512 acc[QP][NC];
  for (int i = 0; i < QP; ++i)
    for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t j0 = 0, bi = 0; j0 < n; j0 += bs, ++bi) {
    const E* v = block(bi);
    const int64_t cnt = std::min(bs, n - j0);
    for (int64_t o = 0; o < cnt; ++o) {
      __m512 vv[NC];
      for (int c = 0; c < NC; ++c) vv[c] = load16f(v + o * D + c * 16);
      const float* po = p + (j0 + o) * QW;
      for (int i = 0; i < QP; ++i) {
        const __m512 pb = _mm512_set1_ps(po[lane[i]]);
        for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_fmadd_ps(pb, vv[c], acc[i][c]);
      }
    }
  }
  for (int i = 0; i < QP; ++i)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + i * D + c * 16, acc[i][c]);
}

// Whether the run path serves a layer: 1 .. 8 query heads per KV head, head size 64 or 128.
inline bool run_path_applies(int64_t group, int64_t D) { return group >= 1 && group <= 8 && (D == 64 || D == 128); }

// f(std::integral_constant<int, G>()) for G = 1 .. 8: a run task's query heads per KV head as a constant.
template <typename F>
inline void with_group(int64_t G, F f) {
  switch (G) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    case 6: return f(std::integral_constant<int, 6>());
    case 7: return f(std::integral_constant<int, 7>());
    default: return f(std::integral_constant<int, 8>());
  }
}
inline void run_scores_any(int64_t G, const float* qt, const float* k, int64_t cnt, int64_t D, float scale,
                           float* s) {
  with_group(G, [&](auto g) { run_scores<decltype(g)::value>(qt, k, cnt, D, scale, s); });
}
inline void run_softmax_any(int64_t G, float* s, int64_t n, int64_t p0, int64_t R, float* inv) {
  with_group(G, [&](auto g) { run_softmax<decltype(g)::value>(s, n, p0, R, inv); });
}
// All lanes of `lanes` through run_values, QP at a time (the last pass padded with its first lane).
template <typename E, typename Block>
inline void run_values_any(int64_t D, const float* p, int64_t QW, Block block, int64_t bs, int64_t n,
                           const std::vector<int64_t>& lanes, float* out) {
  const int64_t QP = D == 64 ? 6 : 3;  // QP * D / 16 accumulators + D / 16 values fit 32 registers
  int64_t pad[6];
  for (size_t i = 0; i < lanes.size(); i += QP) {
    const int64_t nq = std::min<int64_t>(QP, int64_t(lanes.size()) - int64_t(i));
    for (int64_t a = 0; a < QP; ++a) pad[a] = lanes[i + (a < nq ? a : 0)];
    float tmp[6 * 128];
    if (D == 64) run_values<4, 6, E>(p, QW, block, bs, n, pad, tmp);
    else run_values<8, 3, E>(p, QW, block, bs, n, pad, tmp);
    std::memcpy(out + i * D, tmp, sizeof(float) * nq * D);
  }
}
#else
inline void block_dots(const float* q, int64_t R, int64_t D, const float* k, int64_t cnt, float* dots,
                       int64_t ldd) {
  for (int64_t o = 0; o < cnt; ++o)
    for (int64_t r = 0; r < R; ++r) dots[r * ldd + o] = dot(q + r * D, k + o * D, D);
}

template <typename E>
inline void values_block(float* out, const float* p, int64_t ldp, const E* v, int64_t cnt, int64_t R, int64_t D) {
  if constexpr (std::is_same_v<E, float>) accumulate_block(out, p, ldp, v, cnt, R, D);  // (in-place kinds: AVX-512)
}
constexpr bool kHalfInPlace = false;
constexpr int64_t kRunRows = 16, kRunMin = 4;
inline bool run_path_applies(int64_t, int64_t) { return false; }
inline void run_scores_any(int64_t, const float*, const float*, int64_t, int64_t, float, float*) {}
inline void run_softmax_any(int64_t, float*, int64_t, int64_t, int64_t, float*) {}
template <typename E, typename Block>
inline void run_values_any(int64_t, const float*, int64_t, Block, int64_t, int64_t, const std::vector<int64_t>&,
                           float*) {}
template <typename E>
inline void block_dots_h(const float*, int64_t, int64_t, const E*, int64_t, float*, int64_t) {}
#endif

// Tasks 0 .. n - 1 as one list per thread: contiguous runs of equal length (as at::parallel_for splits a range)
// when equal, else balanced by cost (longest first, each to the least loaded thread).
template <typename Cost>
std::vector<std::vector<int64_t>> split_tasks(int64_t n, int64_t nth, bool equal, Cost cost) {
  std::vector<std::vector<int64_t>> lists(nth);
  if (equal) {
    const int64_t chunk = (n + nth - 1) / nth;
    for (int64_t t = 0; t < n; ++t) lists[t / chunk].push_back(t);
    return lists;
  }
  std::vector<int64_t> order(n), load(nth, 0);
  for (int64_t t = 0; t < n; ++t) order[t] = t;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return cost(a) > cost(c); });
  for (const int64_t t : order) {
    const int64_t j = std::min_element(load.begin(), load.end()) - load.begin();
    lists[j].push_back(t);
    load[j] += cost(t);
  }
  return lists;
}

// A task list's next index, one counter per cache line.
struct alignas(64) NextTask {
  std::atomic<int64_t> i{0};
};

}  // namespace

struct DecodeLayer : torch::CustomClassHolder {
  // lin: qkv (fused), o, gate_up (fused), down. ints: per linear bits, salient_bits, group_size,
  // salient_group_size; then num_heads, num_kv_heads, head_dim, intermediate, int8 (0/1), act_block, small_m,
  // scratch_bytes.
  Linear lin[4];
  std::shared_ptr<const Int8Plan> plan[4];  // int8 activations: each linear prepared once (nullptr: not integer)
  at::Tensor w_in, w_post;
  double eps = 1e-6;
  int64_t H = 0, KVH = 0, D = 0, I = 0, int8 = 1, act_block = 64, small_m = 16, scratch = 4 << 20;

  DecodeLayer(std::vector<at::Tensor> tensors, std::vector<int64_t> ints, double eps_) : eps(eps_) {
    TORCH_CHECK(tensors.size() == 4 * TENSORS_PER_LINEAR + 2, "DecodeLayer: 26 tensors");
    TORCH_CHECK(ints.size() == 4 * INTS_PER_LINEAR + 8, "DecodeLayer: 24 ints");
    for (int l = 0; l < 4; ++l) {
      for (int j = 0; j < TENSORS_PER_LINEAR; ++j) lin[l].t[j] = tensors[l * TENSORS_PER_LINEAR + j];
      lin[l].bits = ints[l * INTS_PER_LINEAR];
      lin[l].hbits = ints[l * INTS_PER_LINEAR + 1];
      lin[l].gs = ints[l * INTS_PER_LINEAR + 2];
      lin[l].sgs = ints[l * INTS_PER_LINEAR + 3];
    }
    w_in = tensors[24].to(at::kFloat).contiguous();
    w_post = tensors[25].to(at::kFloat).contiguous();
    const int64_t* p = ints.data() + 4 * INTS_PER_LINEAR;
    H = p[0], KVH = p[1], D = p[2], I = p[3], int8 = p[4], act_block = p[5], small_m = p[6], scratch = p[7];
    TORCH_CHECK(H > 0 && KVH > 0 && H % KVH == 0 && D > 0 && D % 2 == 0 && I > 0, "DecodeLayer: head geometry");
    for (int l = 0; l < 4 && int8; ++l) {
      const Linear& L = lin[l];
      plan[l] = int8_plan(L.t[0], L.t[1], L.t[2], L.t[3], L.t[4], L.t[5], L.bits, L.hbits, L.gs, L.sgs, act_block);
    }
  }

  at::Tensor linear(int l, const at::Tensor& x) const {
    const Linear& L = lin[l];
    if (plan[l] && x.size(0) <= small_m) {  // the prepared integer path: no per-call layer view, table or scratch
      const at::Tensor xc = x.contiguous();
      at::Tensor y = at::empty({xc.size(0), int8_plan_out(*plan[l])}, xc.options());
      int8_plan_run(*plan[l], xc.data_ptr<float>(), xc.size(0), xc.size(1), nullptr, y.data_ptr<float>());
      return y;
    }
    if (int8) {
      return packed_linear_int8(x, L.t[0], L.t[1], L.t[2], L.t[3], L.t[4], L.t[5], c10::nullopt, L.bits, L.hbits,
                                L.gs, L.sgs, act_block, small_m, scratch);
    }
    return packed_linear(x, L.t[0], L.t[1], L.t[2], L.t[3], L.t[4], L.t[5], c10::nullopt, c10::nullopt, L.bits,
                         L.hbits, L.gs, L.sgs, small_m, scratch);
  }

  // h [B, hidden] fp32; cache: this layer's paged cache (server/kv_cache.py), k, v [KVH, blocks, BS, D] fp32 or
  // fp16, or int8 codes [.., D] with fp16 scales k_scale, v_scale [KVH, blocks, BS], or int4 codes [.., D / 2]
  // (uint8) with fp16 scales and zeros, then the key centers mu [rows, KVH, D] fp32, the sinks [rows, 2, KVH, D] fp32
  // (position 0's k and v, rotated, exact) and the RoPE table [D, positions] fp32 (row i < D / 2: cos of pair i
  // at each position, row D / 2 + i: its sin; kernels/kv_quant.py: an int4 key is stored as k - R(p) mu); table [rows, max_blocks] int32 maps a row's block i to its
  // pool block; slots (rows), positions [B] int64; cos, sin [B, D] fp32. The new k, v are written (quantized)
  // at (:, table[slots[b], p / BS], p % BS) for p = positions[b]. Returns the layer's output [B, hidden].
  at::Tensor forward(const at::Tensor& h_in, const std::vector<at::Tensor>& cache, const at::Tensor& table_t,
                     const at::Tensor& slots_t, const at::Tensor& pos_t, const at::Tensor& cos_t,
                     const at::Tensor& sin_t) const {
    TORCH_CHECK(h_in.dim() == 2 && h_in.scalar_type() == at::kFloat, "h: [B, hidden] fp32");
    const at::Tensor h = h_in.contiguous();
    const int64_t B = h.size(0), hidden = h.size(1);
    TORCH_CHECK(w_in.numel() == hidden && w_post.numel() == hidden, "h: ", hidden, " features, norms ",
                w_in.numel());
    TORCH_CHECK(cache.size() == 2 || cache.size() == 4 || cache.size() == 9, "cache: 2, 4 or 9 tensors");
    const at::Tensor& k_cache = cache[0];
    const at::Tensor& v_cache = cache[1];
    const auto st = k_cache.scalar_type();
    // kind: 0 fp32, 16 fp16 (entries as they are, in half precision), 8 int8, 4 int4 (both quantized after a
    // Hadamard rotation).
    const int kind = st == at::kFloat ? 0 : st == at::kHalf ? 16 : st == at::kChar ? 8 : st == at::kByte ? 4 : -1;
    const bool quantized = kind == 8 || kind == 4;
    TORCH_CHECK(kind >= 0 && size_t(kind == 8 ? 4 : kind == 4 ? 9 : 2) == cache.size(),
                "cache: fp32 or fp16 k, v; int8 k, v and fp16 scales; or uint8 (int4) k, v, scales, zeros, key "
                "centers, sinks and RoPE table");
    const int64_t CD = kind == 4 ? D / 2 : D;
    TORCH_CHECK(v_cache.scalar_type() == st && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                    k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == KVH &&
                    k_cache.size(3) == CD, "caches: contiguous [", KVH, ", blocks, block_size, ", CD, "]");
    const int64_t NB = k_cache.size(1), BS = k_cache.size(2);
    for (size_t j = 2; j < std::min<size_t>(cache.size(), 6); ++j) {
      TORCH_CHECK(cache[j].scalar_type() == at::kHalf && cache[j].is_contiguous() && cache[j].dim() == 3 &&
                      cache[j].size(0) == KVH && cache[j].size(1) == NB && cache[j].size(2) == BS,
                  "cache scales / zeros: contiguous fp16 [", KVH, ", blocks, block_size]");
    }
    TORCH_CHECK(table_t.dim() == 2 && table_t.scalar_type() == at::kInt && table_t.is_contiguous(),
                "table: contiguous [rows, max_blocks] int32");
    TORCH_CHECK(slots_t.numel() == B && pos_t.numel() == B && slots_t.scalar_type() == at::kLong &&
                    pos_t.scalar_type() == at::kLong, "slots, positions: [B] int64");
    TORCH_CHECK(cos_t.scalar_type() == at::kFloat && sin_t.scalar_type() == at::kFloat && cos_t.numel() == B * D &&
                    sin_t.numel() == B * D, "cos, sin: [B, D] fp32");
    const at::Tensor slots = slots_t.contiguous(), pos = pos_t.contiguous();
    const at::Tensor cs = cos_t.contiguous(), sn = sin_t.contiguous();
    const int64_t* sl = slots.data_ptr<int64_t>();
    const int64_t* ps = pos.data_ptr<int64_t>();
    const int32_t* table = table_t.data_ptr<int32_t>();
    const int64_t rows = table_t.size(0), max_blocks = table_t.size(1);
    // int4: the key centers, the sinks and the RoPE table the centers rotate by.
    const float* mu = nullptr;
    float* sinks = nullptr;
    const float* cstab = nullptr;
    int64_t npos = 0;
    if (kind == 4) {
      const at::Tensor &m = cache[6], &sk = cache[7], &ct = cache[8];
      TORCH_CHECK(m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 3 && m.size(0) == rows &&
                      m.size(1) == KVH && m.size(2) == D, "key centers: contiguous fp32 [", rows, ", ", KVH, ", ", D,
                  "]");
      TORCH_CHECK(sk.scalar_type() == at::kFloat && sk.is_contiguous() && sk.dim() == 4 && sk.size(0) == rows &&
                      sk.size(1) == 2 && sk.size(2) == KVH && sk.size(3) == D,
                  "sinks: contiguous fp32 [", rows, ", 2, ", KVH, ", ", D, "]");
      sinks = sk.data_ptr<float>();
      TORCH_CHECK(ct.scalar_type() == at::kFloat && ct.is_contiguous() && ct.dim() == 2 && ct.size(0) == D,
                  "rope table: contiguous fp32 [", D, ", positions]");
      npos = ct.size(1);
      for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(ps[b] < npos, "position ", ps[b], " beyond the rope table's ", npos);
      }
      mu = m.data_ptr<float>(), cstab = ct.data_ptr<float>();
    }
    // R(p) mu of row r, KV head g, element i: mu * cos + rotate_half(mu) * sin, as kernels/kv_quant.rope_rotate
    // (cos and sin of element i are those of pair i mod D / 2).
    const int64_t hd = D / 2;
    auto key_offset = [&](int64_t r, int64_t g, int64_t p, int64_t i) -> float {
      const float* m = mu + (r * KVH + g) * D;
      const float rh = i < hd ? -m[i + hd] : m[i - hd];
      return m[i] * cstab[(i % hd) * npos + p] + rh * cstab[(hd + i % hd) * npos + p];
    };
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(sl[b] >= 0 && sl[b] < rows && ps[b] >= 0 && ps[b] < max_blocks * BS, "row ", sl[b],
                  " position ", ps[b], " outside the block table [", rows, " rows, ", max_blocks * BS,
                  " positions]");
      for (int64_t i = 0; i <= ps[b] / BS; ++i) {
        const int32_t blk = table[sl[b] * max_blocks + i];
        TORCH_CHECK(blk >= 0 && blk < NB, "row ", sl[b], " block ", i, " -> ", blk, " outside the pool of ", NB);
      }
    }

    // Attention input and the fused q/k/v projection.
    at::Tensor x = at::empty_like(h);
    rms_norm_rows(h.data_ptr<float>(), w_in.data_ptr<float>(), float(eps), B, hidden, x.data_ptr<float>());
    at::Tensor qkv = linear(0, x).contiguous();  // [B, (H + 2 KVH) D]
    const int64_t qkv_w = (H + 2 * KVH) * D;
    TORCH_CHECK(qkv.size(1) == qkv_w, "qkv: ", qkv.size(1), " outputs for ", qkv_w);
    float* qkvp = qkv.data_ptr<float>();
    const float* cp = cs.data_ptr<float>();
    const float* sp = sn.data_ptr<float>();
    // Entry (g, block, offset) of the pool: codes at entry * CD, its scale / zero at entry.
    auto entry = [&](int64_t b, int64_t g, int64_t p) -> int64_t {
      return (g * NB + int64_t(table[sl[b] * max_blocks + p / BS])) * BS + p % BS;
    };
    std::vector<float> rot(D);
    for (int64_t b = 0; b < B; ++b) {
      float* row = qkvp + b * qkv_w;
      for (int64_t hh = 0; hh < H + KVH; ++hh) rope(row + hh * D, cp + b * D, sp + b * D, D);
      for (int64_t g = 0; g < KVH; ++g) {
        const int64_t e = entry(b, g, ps[b]);
        for (int kv = 0; kv < 2; ++kv) {
          const float* src = row + (H + kv * KVH + g) * D;
          const at::Tensor& pool = cache[kv];
          if (kind == 0) {
            float* dst = pool.data_ptr<float>() + e * CD;
            for (int64_t i = 0; i < D; ++i) dst[i] = src[i];
            continue;
          }
          if (kind == 16) {
            floats_to_halves(src, D, pool.data_ptr<at::Half>() + e * CD);
            continue;
          }
          for (int64_t i = 0; i < D; ++i) rot[i] = src[i];
          if (kind == 4 && kv == 0) {
            for (int64_t i = 0; i < D; ++i) rot[i] = src[i] - key_offset(sl[b], g, ps[b], i);
          }
          rotate(rot.data(), D);
          if (kind == 4 && ps[b] == 0) {  // the sink: position 0 exact (k itself, rotated)
            float* sink = sinks + ((sl[b] * 2 + kv) * KVH + g) * D;
            for (int64_t i = 0; i < D; ++i) sink[i] = src[i];
            rotate(sink, D);
          }
          if (kind == 8) {
            store_int8(rot.data(), D, pool.data_ptr<int8_t>() + e * CD, cache[2 + kv].data_ptr<at::Half>() + e);
          } else {
            store_int4(rot.data(), D, pool.data_ptr<uint8_t>() + e * CD, cache[2 + kv].data_ptr<at::Half>() + e,
                       cache[4 + kv].data_ptr<at::Half>() + e);
          }
        }
      }
    }

    // Attention over each sequence's positions 0 .. pos, read from its blocks in place; one task per (sequence,
    // KV head) serving the query heads that share it, so each cached key and value is read (and dequantized into
    // a small buffer of codes) once for all of them. Quantized entries hold rotated vectors: the queries are
    // rotated (q . k = Hq . Hk) and the outputs rotated back (sum p Hv = H sum p v).
    at::Tensor core = at::empty({B, H * D}, h.options());
    float* corep = core.data_ptr<float>();
    const float scale = 1.f / std::sqrt(float(D));
    const int64_t group = H / KVH;
    const float* kf = kind == 0 ? k_cache.data_ptr<float>() : nullptr;
    const float* vf = kind == 0 ? v_cache.data_ptr<float>() : nullptr;
    const int8_t* k8 = kind == 8 ? k_cache.data_ptr<int8_t>() : nullptr;
    const int8_t* v8 = kind == 8 ? v_cache.data_ptr<int8_t>() : nullptr;
    const uint8_t* k4 = kind == 4 ? k_cache.data_ptr<uint8_t>() : nullptr;
    const uint8_t* v4 = kind == 4 ? v_cache.data_ptr<uint8_t>() : nullptr;
    const at::Half* kh = kind == 16 ? k_cache.data_ptr<at::Half>() : nullptr;
    const at::Half* vh = kind == 16 ? v_cache.data_ptr<at::Half>() : nullptr;
    const at::Half* ksc = quantized ? cache[2].data_ptr<at::Half>() : nullptr;
    const at::Half* vsc = quantized ? cache[3].data_ptr<at::Half>() : nullptr;
    const at::Half* kz = kind == 4 ? cache[4].data_ptr<at::Half>() : nullptr;
    const at::Half* vz = kind == 4 ? cache[5].data_ptr<at::Half>() : nullptr;
    const bool half_in_place = kHalfInPlace && kind == 16 && D % 16 == 0 && D <= 128;
    const bool int8_in_place = kHalfInPlace && kind == 8 && D % 16 == 0 && D <= 128;  // codes converted likewise
    // The codes of entry e as floats in buf (int4: low nibbles the first half, high nibbles the second).
    auto codes = [&](const int8_t* c8, const uint8_t* c4, int64_t e, float* buf) {
      if (kind == 8) {
        const int8_t* c = c8 + e * CD;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) buf[i] = float(c[i]);
      } else {
        const uint8_t* c = c4 + e * CD;
#pragma omp simd
        for (int64_t i = 0; i < CD; ++i) buf[i] = float(c[i] & 15);
#pragma omp simd
        for (int64_t i = 0; i < CD; ++i) buf[CD + i] = float(c[i] >> 4);
      }
    };
    // A prompt chunk's rows (kRunMin or more consecutive rows of one sequence at consecutive positions) go
    // together, up to kRunRows a task per KV head, on fp32, fp16 and int8 caches (the run path above); other rows
    // one at a time. Which rows run together depends on the rows alone, not on the threads.
    std::vector<int64_t> single;               // rows attended one at a time
    std::vector<std::pair<int64_t, int64_t>> runs;  // (first row, rows) of each run task
    const bool run_path = (kind == 0 || kind == 16 || kind == 8) && run_path_applies(group, D);
    for (int64_t b = 0; b < B;) {
      int64_t e = b + 1;
      while (e < B && sl[e] == sl[b] && ps[e] == ps[e - 1] + 1) ++e;
      if (run_path && e - b >= kRunMin) {
        for (int64_t r = b; r < e; r += kRunRows) runs.emplace_back(r, std::min(kRunRows, e - r));
      } else {
        for (int64_t r = b; r < e; ++r) single.push_back(r);
      }
      b = e;
    }
    const int64_t NS = int64_t(single.size());
    // Few rows (fewer tasks than two per thread): one task per query head instead, so that all threads work
    // (each then reads its KV head's entries itself).
    const int64_t per_task = NS * KVH >= 2 * at::get_num_threads() ? group : 1;
    const int64_t tasks_per_kv = group / per_task;
    // Tasks cost as many positions as their rows attend to times their query heads, and rows differ (a new stream
    // beside long ones, a prompt chunk's rows): each thread gets a list balanced by that cost (longest first, each
    // to the least loaded thread) instead of an equal run of task numbers.
    const int64_t nsingle = NS * KVH * tasks_per_kv, ntasks = nsingle + int64_t(runs.size()) * KVH;
    const int64_t nth =
        at::in_parallel_region() ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
    bool equal = runs.empty();  // rows of one length: contiguous runs, so a thread's query heads share KV heads
    for (int64_t i = 1; i < NS && equal; ++i) equal = ps[single[i]] / BS == ps[single[0]] / BS;
    const std::vector<std::vector<int64_t>> lists = split_tasks(ntasks, nth, equal, [&](int64_t t) {
      if (t < nsingle) return (ps[single[t / (KVH * tasks_per_kv)]] + 1 + BS) * per_task;
      const auto& run = runs[(t - nsingle) / KVH];
      return (ps[run.first] + run.second + BS) * run.second * group;
    });
    // Each thread takes the tasks of its own list, then what is left of the others' (a thread the OS preempted
    // no longer holds the team at the join); a smaller team than asked for still covers every list. Returns -1
    // when no task is left.
    std::unique_ptr<NextTask[]> next(new NextTask[nth]);
    auto claim = [&](int64_t tid, int64_t& k) -> int64_t {
      for (; k < nth; ++k) {
        const int64_t j = (tid + k) % nth;
        const int64_t i = next[j].i.fetch_add(1, std::memory_order_relaxed);
        if (i < int64_t(lists[j].size())) return lists[j][i];
      }
      return -1;
    };
    // A run task: rows run.first .. + run.second of one sequence, KV head g, every query head sharing it.
    // int8 entries hold rotated vectors times a per-entry scale: the queries are rotated, each key and value row
    // dequantized (codes x scale) as it is read, the outputs rotated back (as the row-by-row path does).
    auto attend_run = [&](std::pair<int64_t, int64_t> run, int64_t g, std::vector<float>& qt, std::vector<float>& kb,
                          std::vector<float>& score, std::vector<float>& inv, std::vector<int64_t>& lanes,
                          std::vector<float>& outs, std::vector<float>& vrows) {
      const int64_t b0 = run.first, R = run.second, p0 = ps[b0], n = p0 + R, QW = group * kRunRows;
      const int32_t* trow = table + sl[b0] * max_blocks;
      qt.assign(D * QW, 0.f);
      lanes.clear();
      for (int64_t j = 0; j < group; ++j) {
        for (int64_t r = 0; r < R; ++r) {
          const float* q = qkvp + (b0 + r) * qkv_w + (g * group + j) * D;
          if (kind == 8) {  // kb as scratch for the rotated query
            std::copy(q, q + D, kb.data());
            rotate(kb.data(), D);
            q = kb.data();
          }
          for (int64_t d = 0; d < D; ++d) qt[d * QW + j * kRunRows + r] = q[d];
          lanes.push_back(j * kRunRows + r);
        }
      }
      score.resize(n * QW);
      if (k8) vrows.resize(n * D);
      for (int64_t j0 = 0, i = 0; j0 < n; j0 += BS, ++i) {
        const int64_t cnt = std::min(BS, n - j0), e0 = (g * NB + int64_t(trow[i])) * BS;
        const float* keys = kf ? kf + e0 * CD : kb.data();
        if (kh) halves_to_floats(kh + e0 * CD, cnt * CD, kb.data());
        if (k8) {
          for (int64_t o = 0; o < cnt; ++o) {
            float* row = kb.data() + o * D;
            codes(k8, nullptr, e0 + o, row);
            const float w = float(ksc[e0 + o]);
            for (int64_t d = 0; d < D; ++d) row[d] *= w;
          }
          for (int64_t o = 0; o < cnt; ++o) {
            float* row = vrows.data() + (j0 + o) * D;
            codes(v8, nullptr, e0 + o, row);
            const float w = float(vsc[e0 + o]);
            for (int64_t d = 0; d < D; ++d) row[d] *= w;
          }
        }
        run_scores_any(group, qt.data(), keys, cnt, D, scale, score.data() + j0 * QW);
      }
      run_softmax_any(group, score.data(), n, p0, R, inv.data());
      outs.resize(lanes.size() * D);
      if (k8) {  // the dequantized rows, in order
        run_values_any<float>(D, score.data(), QW, [&](int64_t i) { return vrows.data() + i * BS * D; }, BS, n, lanes,
                              outs.data());
      } else if (vf) {
        run_values_any<float>(D, score.data(), QW, [&](int64_t i) { return vf + (g * NB + int64_t(trow[i])) * BS * CD; },
                              BS, n, lanes, outs.data());
      } else {
        run_values_any<at::Half>(D, score.data(), QW,
                                 [&](int64_t i) { return vh + (g * NB + int64_t(trow[i])) * BS * CD; }, BS, n, lanes,
                                 outs.data());
      }
      for (size_t i = 0; i < lanes.size(); ++i) {
        const int64_t j = lanes[i] / kRunRows, r = lanes[i] % kRunRows;
        float* o = corep + (b0 + r) * H * D + (g * group + j) * D;
        const float w = inv[lanes[i]];
        for (int64_t d = 0; d < D; ++d) o[d] = outs[i * D + d] * w;
        if (kind == 8) rotate(o, D);
      }
    };
    auto attend = [&](int64_t tid) {
      std::vector<float> score, qs(per_task * D), qsum(per_task), zsum(per_task), ab(per_task * D);
      // Quantized kinds: one block's entries as floats (their codes) with each entry's scale and zero, and the
      // block's probabilities times the value scales per query head (fp32 entries use the scores as they are).
      std::vector<float> blk(BS * D), bsc(BS), bzr(BS), pw(per_task * BS), dots(per_task * BS);
      std::vector<float> qt, inv(group * kRunRows), outs, vrows;  // the run path's
      std::vector<int64_t> lanes;
      int64_t k = 0;  // the list claim() is taking from: (tid + k) % nth
      for (int64_t t; (t = claim(tid, k)) >= 0;) {
        if (t >= nsingle) {
          attend_run(runs[(t - nsingle) / KVH], (t - nsingle) % KVH, qt, blk, score, inv, lanes, outs, vrows);
          continue;
        }
        const int64_t b = single[t / (KVH * tasks_per_kv)], g = (t / tasks_per_kv) % KVH;
        const int64_t h0 = g * group + (t % tasks_per_kv) * per_task, n = ps[b] + 1;  // first query head
        const int32_t* trow = table + sl[b] * max_blocks;
        auto prefetch_next = [&](int64_t i, const auto* pool) {  // as load_block does for the next block
          if ((i + 1) * BS >= n) return;
          const char* nxt = reinterpret_cast<const char*>(pool + (g * NB + int64_t(trow[i + 1])) * BS * CD);
          for (int64_t off = 0; off < BS * CD * int64_t(sizeof(*pool)); off += 64) __builtin_prefetch(nxt + off);
        };
        for (int64_t r = 0; r < per_task; ++r) {
          const float* q = qkvp + b * qkv_w + (h0 + r) * D;
          float* qr = qs.data() + r * D;
          for (int64_t i = 0; i < D; ++i) qr[i] = q[i];
          if (kind == 4) {  // q . R(p) mu = sum_i<D/2 cos_p,i A_i + sin_p,i B_i (the tables repeat in both halves)
            const float* m = mu + (sl[b] * KVH + g) * D;
            float* a = ab.data() + r * D;
            for (int64_t i = 0; i < hd; ++i) {
              a[i] = q[i] * m[i] + q[i + hd] * m[i + hd];
              a[hd + i] = q[i + hd] * m[i] - q[i] * m[i + hd];
            }
          }
          if (quantized) rotate(qr, D);
          float sum = 0.f;
          for (int64_t i = 0; i < D; ++i) sum += qr[i];
          qsum[r] = sum;
          zsum[r] = 0.f;
        }
        // Block i of the sequence (cnt entries): its rows of D floats, and per-entry scales and zeros (nullptr for
        // fp32 and fp16: 1 and 0). fp32 entries are read in place; fp16 ones are converted into blk, quantized
        // ones expanded into it. int4: position 0 from the row's sink (exact, rotated), not the pool.
        auto load_block = [&](int64_t i, int64_t cnt, const float* f, const at::Half* f16, const int8_t* c8,
                              const uint8_t* c4, const at::Half* sc, const at::Half* zr, const float* sink,
                              const float*& rows_out, const float*& sc_out, const float*& z_out) {
          const int64_t e0 = (g * NB + int64_t(trow[i])) * BS;
          if ((i + 1) * BS < n) {  // the next block: its own place in the pool, so the hardware prefetcher starts late
            const int64_t e1 = (g * NB + int64_t(trow[i + 1])) * BS;
            const char* nxt = f ? reinterpret_cast<const char*>(f + e1 * CD)
                                : f16 ? reinterpret_cast<const char*>(f16 + e1 * CD)
                                : c8 ? reinterpret_cast<const char*>(c8 + e1 * CD)
                                     : reinterpret_cast<const char*>(c4 + e1 * CD);
            const int64_t bytes = BS * CD * (f ? 4 : f16 ? 2 : 1);
            for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(nxt + off);
          }
          if (f) {
            rows_out = f + e0 * CD, sc_out = nullptr, z_out = nullptr;
            return;
          }
          if (f16) {
            halves_to_floats(f16 + e0 * CD, cnt * CD, blk.data());
            rows_out = blk.data(), sc_out = nullptr, z_out = nullptr;
            return;
          }
          for (int64_t o = 0; o < cnt; ++o) {
            float* row = blk.data() + o * D;
            if (sink && i == 0 && o == 0) {
              for (int64_t d = 0; d < D; ++d) row[d] = sink[d];
              bsc[0] = 1.f, bzr[0] = 0.f;
              continue;
            }
            codes(c8, c4, e0 + o, row);
            bsc[o] = float(sc[e0 + o]);
            bzr[o] = zr ? float(zr[e0 + o]) : 0.f;
          }
          rows_out = blk.data(), sc_out = bsc.data(), z_out = bzr.data();
        };
        // score starts as each key's center term: int4, q . R(j) mu = sum_i table[i, j] (A, B)_i for j > 0 (the
        // sink holds k itself), vectorised along the positions; zero otherwise.
        score.assign(per_task * n, 0.f);
        if (kind == 4) {
          for (int64_t r = 0; r < per_task; r += 4) {
            const int64_t nr = std::min<int64_t>(4, per_task - r);
            float* sc = score.data() + r * n;
            const float* a = ab.data() + r * D;
            if (nr == 4) center_terms<4>(sc, n, a, D, cstab, npos);
            else if (nr == 3) center_terms<3>(sc, n, a, D, cstab, npos);
            else if (nr == 2) center_terms<2>(sc, n, a, D, cstab, npos);
            else center_terms<1>(sc, n, a, D, cstab, npos);
          }
        }
        const float* ksink = sinks ? sinks + ((sl[b] * 2) * KVH + g) * D : nullptr;
        const float* vsink = sinks ? sinks + ((sl[b] * 2 + 1) * KVH + g) * D : nullptr;
        for (int64_t j0 = 0, i = 0; j0 < n; j0 += BS, ++i) {
          const int64_t cnt = std::min(BS, n - j0);
          const float *keys, *ks, *kzero;
          if (half_in_place) {
            prefetch_next(i, kh);
            block_dots_h(qs.data(), per_task, D, kh + (g * NB + int64_t(trow[i])) * BS * CD, cnt, dots.data(), BS);
            ks = nullptr;
          } else if (int8_in_place) {
            prefetch_next(i, k8);
            const int64_t e0 = (g * NB + int64_t(trow[i])) * BS;
            block_dots_h(qs.data(), per_task, D, k8 + e0 * CD, cnt, dots.data(), BS);
            for (int64_t o = 0; o < cnt; ++o) bsc[o] = float(ksc[e0 + o]), bzr[o] = 0.f;
            ks = bsc.data(), kzero = bzr.data();
          } else {
            load_block(i, cnt, kf, kh, k8, k4, ksc, kz, ksink, keys, ks, kzero);
            block_dots(qs.data(), per_task, D, keys, cnt, dots.data(), BS);
          }
          for (int64_t r = 0; r < per_task; ++r) {
            float* s = score.data() + r * n + j0;
            const float* dr = dots.data() + r * BS;
            if (ks) {
              const float qz = qsum[r];
#pragma omp simd
              for (int64_t o = 0; o < cnt; ++o) s[o] = (dr[o] * ks[o] + qz * kzero[o] + s[o]) * scale;
            } else {
#pragma omp simd
              for (int64_t o = 0; o < cnt; ++o) s[o] = (dr[o] + s[o]) * scale;
            }
          }
        }
        for (int64_t r = 0; r < per_task; ++r) {  // softmax of each head's scores, unnormalised
          float* sc = score.data() + r * n;
          const float mx = max_of(sc, n);
          qsum[r] = 1.f / exp_sub_sum(sc, n, mx);  // reused: the normaliser
          float* o = corep + b * H * D + (h0 + r) * D;
          for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
        }
        for (int64_t j0 = 0, i = 0; j0 < n; j0 += BS, ++i) {
          const int64_t cnt = std::min(BS, n - j0);
          const float *vals, *vs, *vzero;
          float* out = corep + b * H * D + h0 * D;
          if (half_in_place) {
            prefetch_next(i, vh);
            values_block(out, score.data() + j0, n, vh + (g * NB + int64_t(trow[i])) * BS * CD, cnt, per_task, D);
            continue;
          }
          if (int8_in_place) {  // the probabilities times each entry's scale, then the codes as they are cached
            prefetch_next(i, v8);
            const int64_t e0 = (g * NB + int64_t(trow[i])) * BS;
            for (int64_t r = 0; r < per_task; ++r) {
              for (int64_t o = 0; o < cnt; ++o) pw[r * BS + o] = score[r * n + j0 + o] * float(vsc[e0 + o]);
            }
            values_block(out, pw.data(), BS, v8 + e0 * CD, cnt, per_task, D);
            continue;
          }
          load_block(i, cnt, vf, vh, v8, v4, vsc, vz, vsink, vals, vs, vzero);
          if (!vs) {  // fp32: the probabilities as they are
            values_block(out, score.data() + j0, n, vals, cnt, per_task, D);
            continue;
          }
          for (int64_t r = 0; r < per_task; ++r) {
            for (int64_t o = 0; o < cnt; ++o) {
              const float p = score[r * n + j0 + o];
              pw[r * BS + o] = p * vs[o];
              zsum[r] += p * vzero[o];  // int4: the zeros' share, added to every element at the end (int8: 0)
            }
          }
          values_block(out, pw.data(), BS, vals, cnt, per_task, D);
        }
        for (int64_t r = 0; r < per_task; ++r) {
          float* o = corep + b * H * D + (h0 + r) * D;
          for (int64_t i = 0; i < D; ++i) o[i] = (o[i] + zsum[r]) * qsum[r];
          if (quantized) rotate(o, D);
        }
      }
    };
#pragma omp parallel num_threads(nth)
    attend(omp_get_thread_num());

    // mid = h + o_proj(core); the gated MLP on rms_norm(mid).
    at::Tensor mid = linear(1, core).contiguous();
    float* midp = mid.data_ptr<float>();
    const float* hp = h.data_ptr<float>();
    TORCH_CHECK(mid.size(1) == hidden, "o_proj: ", mid.size(1), " outputs for ", hidden);
    add_to(midp, hp, B * hidden);
    rms_norm_rows(midp, w_post.data_ptr<float>(), float(eps), B, hidden, x.data_ptr<float>());
    at::Tensor gu = linear(2, x).contiguous();  // [B, 2 I]: gate then up
    TORCH_CHECK(gu.size(1) == 2 * I, "gate_up: ", gu.size(1), " outputs for ", 2 * I);
    at::Tensor act = at::empty({B, I}, h.options());
    const float* gup = gu.data_ptr<float>();
    float* ap = act.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) silu_mul(gup + b * 2 * I, gup + b * 2 * I + I, ap + b * I, I);
    at::Tensor out = linear(3, act).contiguous();
    TORCH_CHECK(out.size(1) == hidden, "down_proj: ", out.size(1), " outputs for ", hidden);
    float* op = out.data_ptr<float>();
    add_to(op, midp, B * hidden);
    return out;
  }
};

// Every decoder layer's decode step in one call (torch.classes.mamp.DecodeStack): the layers' DecodeLayer arguments
// concatenated, and forward walks them in order. One call per step instead of one per layer, so the caller's
// thread takes Python's lock once per step: between per-layer calls it had to take it back from the server's
// event loop at every layer (up to its switch interval each time) while other streams were being written.
struct DecodeStack : torch::CustomClassHolder {
  static constexpr int64_t TENSORS = 4 * TENSORS_PER_LINEAR + 2, INTS = 4 * INTS_PER_LINEAR + 8;
  std::vector<c10::intrusive_ptr<DecodeLayer>> layers;

  DecodeStack(std::vector<at::Tensor> tensors, std::vector<int64_t> ints, std::vector<double> eps) {
    const int64_t n = int64_t(eps.size());
    TORCH_CHECK(n > 0 && int64_t(tensors.size()) == n * TENSORS && int64_t(ints.size()) == n * INTS,
                "DecodeStack: ", TENSORS, " tensors and ", INTS, " ints per layer");
    for (int64_t l = 0; l < n; ++l) {
      layers.push_back(c10::make_intrusive<DecodeLayer>(
          std::vector<at::Tensor>(tensors.begin() + l * TENSORS, tensors.begin() + (l + 1) * TENSORS),
          std::vector<int64_t>(ints.begin() + l * INTS, ints.begin() + (l + 1) * INTS), eps[l]));
    }
  }

  // cache: every layer's cache tensors (DecodeLayer.forward's), concatenated in layer order.
  at::Tensor forward(const at::Tensor& h_in, const std::vector<at::Tensor>& cache, const at::Tensor& table,
                     const at::Tensor& slots, const at::Tensor& pos, const at::Tensor& cos,
                     const at::Tensor& sin) const {
    const size_t n = layers.size(), per = cache.size() / n;
    TORCH_CHECK(per * n == cache.size(), "DecodeStack: ", cache.size(), " cache tensors for ", n, " layers");
    at::Tensor h = h_in;
    for (size_t l = 0; l < n; ++l) {
      h = layers[l]->forward(h, std::vector<at::Tensor>(cache.begin() + l * per, cache.begin() + (l + 1) * per),
                             table, slots, pos, cos, sin);
    }
    return h;
  }
};

TORCH_LIBRARY_FRAGMENT(mamp, m) {
  m.class_<DecodeLayer>("DecodeLayer")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double>())
      .def("forward", &DecodeLayer::forward);
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("forward", &DecodeStack::forward);
}
