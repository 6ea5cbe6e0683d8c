// CPU matmul with a 16-bit weight: y[M, N] = x[M, K] @ W[N, K]^T + bias, W in bf16 or fp16 (nn.Linear layout,
// row-major [N, K]), x converted to fp32 once, fp32 accumulation. Built together with cpu_matmul.cpp into one
// extension by kernels/cpu_matmul.py (`load_extension`); cpu_matmul.cpp's PYBIND11_MODULE calls register_half.
//
// Decode (M <= small_m): the weight is never upcast as a whole. W is cut into tiles of TR consecutive rows
// (output columns; the unit at::parallel_for splits across threads). For M >= upcast_m a tile is first widened
// into a per-thread fp32 buffer of TR x K floats (bf16: zero-extend and shift left 16; fp16: vcvtph2ps), which
// stays in L1/L2 while every block of x rows passes over it; below upcast_m the 16-bit rows are widened in
// registers inside the dot products instead. (kernels/half_linear.py passes upcast_m = 1: on a Zen 3 core the
// tile buffer measured faster for every M, even M = 1.) Each block of MB rows of x and NR rows of W is one
// register block of MB x NR (x U) independent accumulator chains along K, 8 values at a time; the chains are
// reduced horizontally at the end and the K % 8 tail is done in scalar code. W is read from memory once per
// call: half the bytes of an fp32 weight, which is what decode (memory-bound) pays for.
// Prefill (M > small_m): blocks of W rows are upcast into a bounded fp32 scratch (scratch_bytes, freed on return)
// and each block is one BLAS call (at::addmm_out / at::mm_out); no full fp32 copy of W exists at any time.
//
// dot_block is written with AVX2+FMA+F16C intrinsics when the compiler targets them (kernels/cpu_matmul.py passes
// -mavx2 -mfma -mf16c on AVX2 CPUs), and as portable scalar code otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MAMP_HALF_AVX2 1
#endif

namespace {

constexpr int64_t TR = 12;  // W rows per tile (the parallel unit); a multiple of every NR below

enum WKind { F16 = 0, BF16 = 1, F32 = 2 };  // the weight's storage; F32: a tile already upcast to fp32
template <int WK> struct Storage { using T = uint16_t; };
template <> struct Storage<F32> { using T = float; };

template <int WK>
inline float to_float(typename Storage<WK>::T v) {
  if constexpr (WK == BF16) {
    return static_cast<float>(c10::BFloat16(v, c10::BFloat16::from_bits()));
  } else if constexpr (WK == F16) {
    return static_cast<float>(c10::Half(v, c10::Half::from_bits()));
  } else {
    return v;
  }
}

#ifdef MAMP_HALF_AVX2
template <int WK>
inline __m256 load8(const typename Storage<WK>::T* p) {  // 8 weights -> 8 fp32
  if constexpr (WK == F32) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (WK == BF16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {  // [sum a, sum b, sum c, sum d]
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// y[m, r] (m < MB, r < NR) = sum_k x[m, k] w[r, k] (+ bias[r]). x: rows ldx floats apart; w: rows ldw apart;
// y: rows ldy apart. U chains per output when MB * NR alone is too few to cover the FMA latency.
template <int WK, int MB, int NR, int U>
inline void dot_block(const float* x, int64_t ldx, const typename Storage<WK>::T* w, int64_t ldw, int64_t K, float* y,
                      int64_t ldy, const float* bias) {
  constexpr int C = MB * NR;
  __m256 acc[U][C];
  for (int u = 0; u < U; ++u)
    for (int c = 0; c < C; ++c) acc[u][c] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      __m256 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k + 8 * u);
      for (int r = 0; r < NR; ++r) {
        const __m256 wv = load8<WK>(w + r * ldw + k + 8 * u);
        for (int m = 0; m < MB; ++m) acc[u][m * NR + r] = _mm256_fmadd_ps(wv, xv[m], acc[u][m * NR + r]);
      }
    }
  }
  if constexpr (U > 1) {
    for (; k + 8 <= K; k += 8) {
      for (int r = 0; r < NR; ++r) {
        const __m256 wv = load8<WK>(w + r * ldw + k);
        for (int m = 0; m < MB; ++m)
          acc[0][m * NR + r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[0][m * NR + r]);
      }
    }
    for (int u = 1; u < U; ++u)
      for (int c = 0; c < C; ++c) acc[0][c] = _mm256_add_ps(acc[0][c], acc[u][c]);
  }
  alignas(16) float s[C + 3];
  int c = 0;
  for (; c + 4 <= C; c += 4) _mm_store_ps(s + c, hsum4(acc[0][c], acc[0][c + 1], acc[0][c + 2], acc[0][c + 3]));
  for (; c < C; ++c) s[c] = hsum(acc[0][c]);
  for (; k < K; ++k) {  // K % 8 tail
    for (int r = 0; r < NR; ++r) {
      const float wk = to_float<WK>(w[r * ldw + k]);
      for (int m = 0; m < MB; ++m) s[m * NR + r] += x[m * ldx + k] * wk;
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) y[m * ldy + r] = s[m * NR + r] + (bias ? bias[r] : 0.f);
}

// Register blocks (NR W rows, U chains) per MB: 8 to 12 accumulators, so that two FMAs per cycle of latency 4
// always have independent work, plus MB x rows and one W row (MB = 4: 17 ymm, one x row is reloaded from L1;
// measured ~10% faster than NR = 2).
template <int MB> struct Shape;
template <> struct Shape<1> { static constexpr int NR = 4, U = 2; };
template <> struct Shape<2> { static constexpr int NR = 4, U = 1; };
template <> struct Shape<3> { static constexpr int NR = 3, U = 1; };
template <> struct Shape<4> { static constexpr int NR = 3, U = 1; };

// Upcast n contiguous 16-bit values to fp32.
template <int WK>
inline void upcast(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8<WK>(src + i));
  for (; i < n; ++i) dst[i] = to_float<WK>(src[i]);
}
#else   // portable scalar versions, same contracts
template <int WK, int MB, int NR, int U>
inline void dot_block(const float* x, int64_t ldx, const typename Storage<WK>::T* w, int64_t ldw, int64_t K, float* y,
                      int64_t ldy, const float* bias) {
  float s[MB][NR][4] = {};  // 4 partial sums per output (K strided by 4): breaks the add chain
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    for (int r = 0; r < NR; ++r) {
      float wk[4];
      for (int j = 0; j < 4; ++j) wk[j] = to_float<WK>(w[r * ldw + k + j]);
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < 4; ++j) s[m][r][j] += x[m * ldx + k + j] * wk[j];
    }
  }
  for (; k < K; ++k)
    for (int r = 0; r < NR; ++r) {
      const float wk = to_float<WK>(w[r * ldw + k]);
      for (int m = 0; m < MB; ++m) s[m][r][0] += x[m * ldx + k] * wk;
    }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r)
      y[m * ldy + r] = (s[m][r][0] + s[m][r][1]) + (s[m][r][2] + s[m][r][3]) + (bias ? bias[r] : 0.f);
}

template <int MB> struct Shape;
template <> struct Shape<1> { static constexpr int NR = 4, U = 1; };
template <> struct Shape<2> { static constexpr int NR = 4, U = 1; };
template <> struct Shape<3> { static constexpr int NR = 3, U = 1; };
template <> struct Shape<4> { static constexpr int NR = 3, U = 1; };

template <int WK>
inline void upcast(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float<WK>(src[i]);
}
#endif  // MAMP_HALF_AVX2

// Rows [r0, r1) of W (rows ldw apart) against MB rows of x (rows K apart): NR rows at a time, then one by one.
template <int WK, int MB>
inline void rows_block(const float* x, int64_t K, const typename Storage<WK>::T* w, int64_t ldw, int64_t nr,
                       float* y, int64_t ldy, const float* bias) {
  constexpr int NR = Shape<MB>::NR, U = Shape<MB>::U;
  int64_t r = 0;
  for (; r + NR <= nr; r += NR)
    dot_block<WK, MB, NR, U>(x, K, w + r * ldw, ldw, K, y + r, ldy, bias ? bias + r : nullptr);
  for (; r < nr; ++r)
    dot_block<WK, MB, 1, (U > 1 ? U : 2)>(x, K, w + r * ldw, ldw, K, y + r, ldy, bias ? bias + r : nullptr);
}

// The nr rows of one tile of W against all M rows of x, 4 rows of x at a time (then 3, 2 or 1): the tile
// stays in cache while the blocks of x pass over it.
template <int WK>
inline void tile_all_m(const float* x, int64_t M, int64_t K, const typename Storage<WK>::T* w, int64_t ldw,
                       int64_t nr, float* y, int64_t N, const float* bias) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows_block<WK, 4>(x + m * K, K, w, ldw, nr, y + m * N, N, bias);
  switch (M - m) {
    case 3: rows_block<WK, 3>(x + m * K, K, w, ldw, nr, y + m * N, N, bias); break;
    case 2: rows_block<WK, 2>(x + m * K, K, w, ldw, nr, y + m * N, N, bias); break;
    case 1: rows_block<WK, 1>(x + m * K, K, w, ldw, nr, y + m * N, N, bias); break;
    default: break;
  }
}

// y [M, N] (fp32, contiguous) = x [M, K] (fp32, contiguous) W^T + bias, streaming W once. From upcast_m rows
// of x on, each tile is first upcast into a small fp32 buffer (TR x K floats per thread), so that the blocks of
// x rows reuse converted weights instead of converting them again.
template <int WK>
void gemv_all(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias, float* y,
              int64_t upcast_m) {
  const int64_t tiles = (N + TR - 1) / TR;
  // Below ~64k weights per chunk a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K * TR));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(M >= upcast_m ? TR * K : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * TR, nr = std::min(N - r0, TR);
      const float* b = bias ? bias + r0 : nullptr;
      if (M >= upcast_m) {
        upcast<WK>(w + r0 * K, buf.data(), nr * K);
        tile_all_m<F32>(x, M, K, buf.data(), K, nr, y + r0, N, b);
      } else {
        tile_all_m<WK>(x, M, K, w + r0 * K, K, nr, y + r0, N, b);
      }
    }
  });
}

template <int WK>
void upcast_rows(const uint16_t* w, int64_t K, int64_t r0, int64_t nr, float* dst) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, K));
  at::parallel_for(0, nr, grain, [&](int64_t a, int64_t b) {
    upcast<WK>(w + (r0 + a) * K, dst + a * K, (b - a) * K);
  });
}

}  // namespace

// x: [M, K] fp32 contiguous; weight: [N, K] bf16/fp16 contiguous; out: [M, N] fp32 contiguous, fully written;
// bias: [N] fp32 contiguous or undefined. Streaming kernel for M <= small_m (tiles upcast first from M >= upcast_m),
// else row blocks of W upcast into a scratch of at most scratch_bytes (at least 16 rows) + BLAS.
void half_matmul_f32(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     at::Tensor& out, int64_t small_m, int64_t upcast_m, int64_t scratch_bytes) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous() &&
              (weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf),
              "weight: [N, K] contiguous bf16/fp16 CPU tensor");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x: [M, K] fp32 contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "x has ", K, " features, weight expects ", weight.size(1));
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(0) == M &&
              out.size(1) == N, "out: [M, N] fp32 contiguous");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: [N] fp32");
    b = bias->data_ptr<float>();
  }
  if (M == 0 || N == 0) return;
  const bool bf = weight.scalar_type() == at::kBFloat16;
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  if (K == 0) {
    if (b) out.copy_(bias->unsqueeze(0).expand({M, N}));
    else out.zero_();
    return;
  }
  float* y = out.data_ptr<float>();
  if (M <= small_m) {
    if (bf) gemv_all<BF16>(x.data_ptr<float>(), M, K, w, N, b, y, upcast_m);
    else gemv_all<F16>(x.data_ptr<float>(), M, K, w, N, b, y, upcast_m);
    return;
  }
  const int64_t nb = std::min(N, std::max<int64_t>(16, scratch_bytes / int64_t(sizeof(float)) / K));
  at::Tensor scratch = at::empty({nb, K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t nbb = std::min(nb, N - n0);
    if (bf) upcast_rows<BF16>(w, K, n0, nbb, scratch.data_ptr<float>());
    else upcast_rows<F16>(w, K, n0, nbb, scratch.data_ptr<float>());
    const at::Tensor wt = scratch.narrow(0, 0, nbb).t();  // [K, nbb]
    at::Tensor o = out.narrow(1, n0, nbb);
    if (b) {
      at::addmm_out(o, bias->narrow(0, n0, nbb).unsqueeze(0), x, wt);
    } else {
      at::mm_out(o, x, wt);
    }
  }
}

// The Python entry point: x [M, K] any float dtype and strides; weight [N, K] bf16/fp16 contiguous; bias [N] any
// float dtype or None; out [M, N] in x's dtype or None. Returns out (or a new [M, N] tensor in x's dtype). All
// conversions happen here, so a decode step costs one Python -> C++ call.
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& out, int64_t small_m, int64_t upcast_m,
                       int64_t scratch_bytes) {
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "x: [M, K] floating point");
  TORCH_CHECK(weight.dim() == 2, "weight: [N, K]");
  const int64_t M = x.size(0), N = weight.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  c10::optional<at::Tensor> bf;
  if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat).contiguous();
  const bool has_out = out.has_value() && out->defined();
  if (has_out) {
    TORCH_CHECK(out->dim() == 2 && out->size(0) == M && out->size(1) == N && out->scalar_type() == x.scalar_type(),
                "out: [M, N] in x's dtype");
  }
  const bool direct = has_out && out->scalar_type() == at::kFloat && out->is_contiguous();
  at::Tensor y = direct ? *out : at::empty({M, N}, xf.options());
  half_matmul_f32(xf, weight, bf, y, small_m, upcast_m, scratch_bytes);
  if (direct) return y;
  if (has_out) return out->copy_(y);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

void register_half(pybind11::module& m) {
  m.def("half_linear", &half_linear, "y = x W^T + bias with W [N, K] in bf16/fp16, fp32 accumulation",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("out"),
        pybind11::arg("small_m"), pybind11::arg("upcast_m"), pybind11::arg("scratch_bytes"));
  m.def("half_matmul_f32", &half_matmul_f32, "half matmul into out (fp32)");
}
