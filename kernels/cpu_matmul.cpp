// CPU packed matmul for the mamp format (see kernels/packing.py, docs/FORMAT.md). Built on first use by
// kernels/cpu_matmul.py with torch.utils.cpp_extension; threads come from at::parallel_for, so
// torch.set_num_threads applies.
//
// Decode (small M): per tile of NT consecutive output columns, stream the qweight words row by row (they are
// contiguous along N, so one word row of a tile is one SIMD load), decode both kinds with shifts and masks,
// and apply scale and zero once per scale group:
//     sum_k (q_k - z) s x_k = s (sum_k q_k x_k - z sum_k x_k)
// with the 16-row sums of x (and the h/b-row run sums a salient code multiplies) computed once per call.
// The bitmap bit of each 16-row group routes its partial sums to the normal or the salient accumulators.
// Prefill (large M): dequantize a block of columns into a bounded fp32 scratch (freed on return) and let
// at::mm (MKL/oneDNN) multiply it.
//
// gemv_tile / dequant_tile are the portable versions; with AVX2+FMA+F16C the *_avx2 twins below replace them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_layout.h"

namespace {

using mamp_cpu::Layer;
#if defined(__AVX2__) && defined(__FMA__)
using mamp_cpu::load16_f16;
using mamp_cpu::load16_u32;
using mamp_cpu::load16_u8;
#endif
using mamp_cpu::make_layer;

constexpr int GROUP = 16;  // rows per group, one bitmap bit
constexpr int NT = 16;     // output columns per tile: two AVX2 registers of fp32


// Load one row of NT values starting at column n0 (nt <= NT valid, the rest zero).
template <typename T>
inline void load_row(T* dst, const T* src, int nt) {
  if (nt == NT) {
    for (int j = 0; j < NT; ++j) dst[j] = src[j];
  } else {
    for (int j = 0; j < NT; ++j) dst[j] = j < nt ? src[j] : T(0);
  }
}

inline void load_half_row(float* dst, const at::Half* src, int nt) {
  for (int j = 0; j < NT; ++j) dst[j] = j < nt ? static_cast<float>(src[j]) : 0.f;
}

// y[m, n0:n0+nt] for m < MB rows of x. x: [MB, Kp] fp32 rows ldx apart (zero beyond K);
// xg: [MB, G] 16-row sums; xr: [MB, Kp/run] run sums.
template <int B, int H, int MB>
void gemv_tile(const Layer& L, const float* x, int64_t ldx, const float* xg, int64_t ldg, const float* xr,
               int64_t ldr, int64_t n0, int nt, float* y, int64_t ldy, const float* bias) {
  constexpr int VPW = 32 / B;  // rows per word
  constexpr int WPG = B / 2;   // words per group
  constexpr int RUN = H / B;   // rows per salient code
  constexpr int HPW = 32 / H;  // salient codes per word
  constexpr uint32_t MASK = (1u << B) - 1;
  constexpr uint32_t HMASK = (1u << H) - 1;
  const int64_t G = L.Kp / GROUP;

  float acc[MB][NT] = {};
  float lq[MB][NT] = {}, lx[MB][NT] = {};  // normal groups of the current scale group: sum q x, sum x
  float hq[MB][NT] = {}, hx[MB][NT] = {};  // salient groups of the current salient scale group
  for (int64_t g = 0; g < G; ++g) {
    uint32_t w[WPG][NT];
    for (int wi = 0; wi < WPG; ++wi) load_row(w[wi], L.qw_at(g * WPG + wi, n0), nt);
    uint8_t bits[NT];
    load_row(bits, L.bm_at(g / 8, n0), nt);
    float sel[NT];
    int n_sal = 0;
    for (int j = 0; j < NT; ++j) {
      sel[j] = float((bits[j] >> (g % 8)) & 1);
      n_sal += (bits[j] >> (g % 8)) & 1;
    }
    float sl[MB][NT] = {}, sh[MB][NT] = {};
    if (n_sal < NT || H == B) {  // some column holds a normal group here (or h = b: one decode serves both)
      for (int wi = 0; wi < WPG; ++wi) {
        for (int i = 0; i < VPW; ++i) {
          float qf[NT];
          for (int j = 0; j < NT; ++j) qf[j] = float(int32_t((w[wi][j] >> (B * i)) & MASK));
          const int64_t k = g * GROUP + wi * VPW + i;
          for (int m = 0; m < MB; ++m) {
            const float xv = x[m * ldx + k];
            for (int j = 0; j < NT; ++j) sl[m][j] += qf[j] * xv;
          }
        }
      }
    }
    if (H == B) {  // the same codes at the same rows: only the bitmap tells the kinds apart
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NT; ++j) sh[m][j] = sl[m][j];
    } else if (n_sal > 0) {  // some column holds a salient group: h-bit codes, each covering RUN rows
      for (int wi = 0; wi < WPG; ++wi) {
        for (int c = 0; c < HPW; ++c) {
          float qf[NT];
          for (int j = 0; j < NT; ++j) qf[j] = float(int32_t((w[wi][j] >> (H * c)) & HMASK));
          const int64_t kr = (g * GROUP + wi * VPW) / RUN + c;
          for (int m = 0; m < MB; ++m) {
            const float xv = xr[m * ldr + kr];
            for (int j = 0; j < NT; ++j) sh[m][j] += qf[j] * xv;
          }
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      const float xs = xg[m * ldg + g];
      for (int j = 0; j < NT; ++j) {
        lq[m][j] += sl[m][j] * (1.f - sel[j]);
        lx[m][j] += xs * (1.f - sel[j]);
        hq[m][j] += sh[m][j] * sel[j];
        hx[m][j] += xs * sel[j];
      }
    }
    const int64_t row_end = (g + 1) * GROUP;
    if (row_end % L.gs == 0 || g == G - 1) {  // close a normal scale group
      float s[NT];
      uint8_t zz[NT];
      const int64_t r = g * GROUP / L.gs;
      load_half_row(s, L.sc_at(r, n0), nt);
      load_row(zz, L.z_at(r, n0), nt);
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NT; ++j) {
          acc[m][j] += s[j] * (lq[m][j] - float(zz[j]) * lx[m][j]);
          lq[m][j] = 0.f;
          lx[m][j] = 0.f;
        }
    }
    if (row_end % L.sgs == 0 || g == G - 1) {  // close a salient scale group
      float s[NT];
      uint8_t zz[NT];
      const int64_t r = g * GROUP / L.sgs;
      load_half_row(s, L.hsc_at(r, n0), nt);
      load_row(zz, L.hz_at(r, n0), nt);
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NT; ++j) {
          acc[m][j] += s[j] * (hq[m][j] - float(zz[j]) * hx[m][j]);
          hq[m][j] = 0.f;
          hx[m][j] = 0.f;
        }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < nt; ++j) y[m * ldy + n0 + j] = acc[m][j] + (bias ? bias[n0 + j] : 0.f);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <cstring>
#define MAMP_AVX2 1

// load16_u32 / load16_u8 / load16_f16: kernels/cpu_layout.h.

template <int A>
inline __m256 sum_chains(const __m256* v) {
  if constexpr (A == 1) return v[0];
  else if constexpr (A == 2) return _mm256_add_ps(v[0], v[1]);
  else return _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
}

// Same contract as gemv_tile, written with AVX2 intrinsics (GCC's auto-vectorizer picks the wrong loop).
template <int B, int H, int MB>
void gemv_tile_avx2(const Layer& L, const float* x, int64_t ldx, const float* xg, int64_t ldg, const float* xr,
                    int64_t ldr, int64_t n0, int nt, float* y, int64_t ldy, const float* bias) {
  constexpr int VPW = 32 / B, WPG = B / 2, RUN = H / B, HPW = 32 / H;
  constexpr int A = MB >= 4 ? 1 : 4 / MB;
  const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
  const __m256i hmask = _mm256_set1_epi32((1 << H) - 1);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256 onef = _mm256_set1_ps(1.f);
  const int64_t G = L.Kp / GROUP;
  __m256 acc[MB][2], lq[MB][2], lx[MB][2], hq[MB][2], hx[MB][2];
  for (int m = 0; m < MB; ++m)
    for (int h = 0; h < 2; ++h)
      acc[m][h] = lq[m][h] = lx[m][h] = hq[m][h] = hx[m][h] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i w[WPG][2], bits[2];
    for (int wi = 0; wi < WPG; ++wi) load16_u32(w[wi], L.qw_at(g * WPG + wi, n0), nt);
    load16_u8(bits, L.bm_at(g / 8, n0), nt);
    const __m128i shift = _mm_cvtsi32_si128(int(g % 8));
    __m256 sel[2];
    int n_sal = 0;
    for (int h = 0; h < 2; ++h) {
      const __m256i b = _mm256_and_si256(_mm256_srl_epi32(bits[h], shift), one);
      sel[h] = _mm256_cvtepi32_ps(b);
      n_sal += __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32(b, 31))));
    }
    __m256 xs[MB];
    for (int m = 0; m < MB; ++m) xs[m] = _mm256_set1_ps(xg[m * ldg + g]);
    // h = b: both kinds are sixteen b-bit codes at the same rows, so one decode and one set of dot products
    // serves both and the bitmap only routes the sums (salient groups are common: this halves the work).
    constexpr bool kOneWidth = H == B;
    if (n_sal < nt || (kOneWidth && n_sal > 0)) {  // normal groups: sixteen b-bit codes
      __m256 s[MB][2][A];  // A independent chains per output: an FMA's latency, not its throughput, binds
      for (int m = 0; m < MB; ++m)
        for (int a = 0; a < A; ++a) s[m][0][a] = s[m][1][a] = _mm256_setzero_ps();
      for (int wi = 0; wi < WPG; ++wi) {
        for (int i = 0; i < VPW; ++i) {
          const __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w[wi][0], B * i), mask));
          const __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w[wi][1], B * i), mask));
          const int64_t k = g * GROUP + wi * VPW + i;
          const int a = (wi * VPW + i) % A;
          for (int m = 0; m < MB; ++m) {
            const __m256 xv = _mm256_broadcast_ss(x + m * ldx + k);
            s[m][0][a] = _mm256_fmadd_ps(q0, xv, s[m][0][a]);
            s[m][1][a] = _mm256_fmadd_ps(q1, xv, s[m][1][a]);
          }
        }
      }
      for (int m = 0; m < MB; ++m)
        for (int h = 0; h < 2; ++h) {
          const __m256 keep = _mm256_sub_ps(onef, sel[h]);
          const __m256 t = sum_chains<A>(s[m][h]);
          lq[m][h] = _mm256_fmadd_ps(t, keep, lq[m][h]);
          lx[m][h] = _mm256_fmadd_ps(xs[m], keep, lx[m][h]);
          if constexpr (kOneWidth) {
            hq[m][h] = _mm256_fmadd_ps(t, sel[h], hq[m][h]);
            hx[m][h] = _mm256_fmadd_ps(xs[m], sel[h], hx[m][h]);
          }
        }
    }
    if (!kOneWidth && n_sal > 0) {  // salient groups: h-bit codes, each covering RUN rows
      __m256 s[MB][2][A];
      for (int m = 0; m < MB; ++m)
        for (int a = 0; a < A; ++a) s[m][0][a] = s[m][1][a] = _mm256_setzero_ps();
      for (int wi = 0; wi < WPG; ++wi) {
        for (int c = 0; c < HPW; ++c) {
          const __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w[wi][0], H * c), hmask));
          const __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w[wi][1], H * c), hmask));
          const int64_t kr = (g * GROUP + wi * VPW) / RUN + c;
          const int a = (wi * HPW + c) % A;
          for (int m = 0; m < MB; ++m) {
            const __m256 xv = _mm256_broadcast_ss(xr + m * ldr + kr);
            s[m][0][a] = _mm256_fmadd_ps(q0, xv, s[m][0][a]);
            s[m][1][a] = _mm256_fmadd_ps(q1, xv, s[m][1][a]);
          }
        }
      }
      for (int m = 0; m < MB; ++m)
        for (int h = 0; h < 2; ++h) {
          hq[m][h] = _mm256_fmadd_ps(sum_chains<A>(s[m][h]), sel[h], hq[m][h]);
          hx[m][h] = _mm256_fmadd_ps(xs[m], sel[h], hx[m][h]);
        }
    }
    const int64_t row_end = (g + 1) * GROUP;
    if (row_end % L.gs == 0 || g == G - 1) {  // close a normal scale group: acc += s (sum q x - z sum x)
      const int64_t r = g * GROUP / L.gs;
      __m256 sc[2];
      __m256i zi[2];
      load16_f16(sc, L.sc_at(r, n0), nt);
      load16_u8(zi, L.z_at(r, n0), nt);
      for (int h = 0; h < 2; ++h) {
        const __m256 z = _mm256_cvtepi32_ps(zi[h]);
        for (int m = 0; m < MB; ++m) {
          acc[m][h] = _mm256_fmadd_ps(sc[h], _mm256_fnmadd_ps(z, lx[m][h], lq[m][h]), acc[m][h]);
          lq[m][h] = lx[m][h] = _mm256_setzero_ps();
        }
      }
    }
    if (row_end % L.sgs == 0 || g == G - 1) {  // close a salient scale group
      const int64_t r = g * GROUP / L.sgs;
      __m256 sc[2];
      __m256i zi[2];
      load16_f16(sc, L.hsc_at(r, n0), nt);
      load16_u8(zi, L.hz_at(r, n0), nt);
      for (int h = 0; h < 2; ++h) {
        const __m256 z = _mm256_cvtepi32_ps(zi[h]);
        for (int m = 0; m < MB; ++m) {
          acc[m][h] = _mm256_fmadd_ps(sc[h], _mm256_fnmadd_ps(z, hx[m][h], hq[m][h]), acc[m][h]);
          hq[m][h] = hx[m][h] = _mm256_setzero_ps();
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    alignas(32) float row[NT];
    _mm256_store_ps(row, acc[m][0]);
    _mm256_store_ps(row + 8, acc[m][1]);
    for (int j = 0; j < nt; ++j) y[m * ldy + n0 + j] = row[j] + (bias ? bias[n0 + j] : 0.f);
  }
}

// Same contract as dequant_tile, with AVX2 intrinsics.
template <int B, int H>
void dequant_tile_avx2(const Layer& L, int64_t k0, int64_t kt, int64_t n0, int nt, float* w, int64_t ldw) {
  constexpr int VPW = 32 / B, WPG = B / 2, RUN = H / B;
  const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
  const __m256i hmask = _mm256_set1_epi32((1 << H) - 1);
  for (int64_t g = k0 / GROUP; g < (k0 + kt) / GROUP; ++g) {
    __m256 s[2], hs[2], zs[2], hzs[2], sel[2];
    __m256i zi[2], hzi[2], bits[2];
    load16_f16(s, L.sc_at(g * GROUP / L.gs, n0), nt);
    load16_u8(zi, L.z_at(g * GROUP / L.gs, n0), nt);
    load16_f16(hs, L.hsc_at(g * GROUP / L.sgs, n0), nt);
    load16_u8(hzi, L.hz_at(g * GROUP / L.sgs, n0), nt);
    load16_u8(bits, L.bm_at(g / 8, n0), nt);
    for (int h = 0; h < 2; ++h) {
      zs[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(zi[h]), s[h]);  // (q - z) s = q s - z s
      hzs[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(hzi[h]), hs[h]);
      sel[h] = _mm256_castsi256_ps(_mm256_slli_epi32(bits[h], 31 - int(g % 8)));  // blendv reads the sign bit
    }
    for (int wi = 0; wi < WPG; ++wi) {
      __m256i wv[2];
      load16_u32(wv, L.qw_at(g * WPG + wi, n0), nt);
      for (int i = 0; i < VPW; ++i) {
        float* dst = w + (g * GROUP + wi * VPW + i - k0) * ldw;
        __m256 row[2];
        for (int h = 0; h < 2; ++h) {
          const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(wv[h], B * i), mask));
          const __m256 hq = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(wv[h], H * (i / RUN)), hmask));
          row[h] = _mm256_blendv_ps(_mm256_fmsub_ps(q, s[h], zs[h]), _mm256_fmsub_ps(hq, hs[h], hzs[h]), sel[h]);
        }
        if (nt == NT) {
          _mm256_storeu_ps(dst, row[0]);
          _mm256_storeu_ps(dst + 8, row[1]);
        } else {
          alignas(32) float buf[NT];
          _mm256_store_ps(buf, row[0]);
          _mm256_store_ps(buf + 8, row[1]);
          std::memcpy(dst, buf, nt * sizeof(float));
        }
      }
    }
  }
}
#define MAMP_DEQUANT_TILE dequant_tile_avx2
#define MAMP_GEMV_TILE gemv_tile_avx2
#else
#define MAMP_DEQUANT_TILE dequant_tile
#define MAMP_GEMV_TILE gemv_tile
#endif

// Dequantize rows [k0, k0 + kt) (k0, kt multiples of 16) of columns [n0, n0 + nt) into w [kt, ldw] fp32.
template <int B, int H>
void dequant_tile(const Layer& L, int64_t k0, int64_t kt, int64_t n0, int nt, float* w, int64_t ldw) {
  constexpr int VPW = 32 / B, WPG = B / 2, RUN = H / B;
  constexpr uint32_t MASK = (1u << B) - 1;
  constexpr uint32_t HMASK = (1u << H) - 1;
  for (int64_t g = k0 / GROUP; g < (k0 + kt) / GROUP; ++g) {
    float s[NT], zs[NT], hs[NT], hzs[NT], sel[NT];
    uint8_t zz[NT], hzz[NT], bits[NT];
    load_half_row(s, L.sc_at(g * GROUP / L.gs, n0), nt);
    load_row(zz, L.z_at(g * GROUP / L.gs, n0), nt);
    load_half_row(hs, L.hsc_at(g * GROUP / L.sgs, n0), nt);
    load_row(hzz, L.hz_at(g * GROUP / L.sgs, n0), nt);
    load_row(bits, L.bm_at(g / 8, n0), nt);
    for (int j = 0; j < NT; ++j) {
      zs[j] = float(zz[j]);
      hzs[j] = float(hzz[j]);
      sel[j] = float((bits[j] >> (g % 8)) & 1);
    }
    for (int wi = 0; wi < WPG; ++wi) {
      uint32_t wv[NT];
      load_row(wv, L.qw_at(g * WPG + wi, n0), nt);
      for (int i = 0; i < VPW; ++i) {
        const int64_t k = g * GROUP + wi * VPW + i;
        float* dst = w + (k - k0) * ldw;
        float row[NT];
        for (int j = 0; j < NT; ++j) {
          const float lo = (float(int32_t((wv[j] >> (B * i)) & MASK)) - zs[j]) * s[j];
          const float hi = (float(int32_t((wv[j] >> (H * (i / RUN))) & HMASK)) - hzs[j]) * hs[j];
          row[j] = sel[j] != 0.f ? hi : lo;
        }
        for (int j = 0; j < nt; ++j) dst[j] = row[j];
      }
    }
  }
}


template <int B, int H>
void gemv_all(const Layer& L, const float* x, int64_t M, const float* bias, float* y) {
  constexpr int RUN = H / B;
  const int64_t Kp = L.Kp, G = Kp / GROUP, N = L.N;
  // Per-call sums of x: 16-row group sums and RUN-row run sums (tiny: M * K floats).
  std::vector<float> xg(M * G), xr(M * (Kp / RUN));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int i = 0; i < GROUP; ++i) s += x[m * Kp + g * GROUP + i];
      xg[m * G + g] = s;
    }
    for (int64_t r = 0; r < Kp / RUN; ++r) {
      float s = 0.f;
      for (int i = 0; i < RUN; ++i) s += x[m * Kp + r * RUN + i];
      xr[m * (Kp / RUN) + r] = s;
    }
  }
  const int64_t tiles = (N + NT - 1) / NT;
  // Below ~64k weights a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (Kp * NT));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NT;
      const int nt = int(std::min<int64_t>(NT, N - n0));
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        MAMP_GEMV_TILE<B, H, 4>(L, x + m * Kp, Kp, xg.data() + m * G, G, xr.data() + m * (Kp / RUN), Kp / RUN, n0, nt,
                           y + m * N, N, bias);
      for (; m + 2 <= M; m += 2)
        MAMP_GEMV_TILE<B, H, 2>(L, x + m * Kp, Kp, xg.data() + m * G, G, xr.data() + m * (Kp / RUN), Kp / RUN, n0, nt,
                           y + m * N, N, bias);
      for (; m < M; ++m)
        MAMP_GEMV_TILE<B, H, 1>(L, x + m * Kp, Kp, xg.data() + m * G, G, xr.data() + m * (Kp / RUN), Kp / RUN, n0, nt,
                           y + m * N, N, bias);
    }
  });
}

// Dequantize rows [k0, k0 + kt) of columns [n0, n0 + nb) into w [kt, ldw] fp32, in parallel over 16-column tiles.
template <int B, int H>
void dequant_block(const Layer& L, int64_t k0, int64_t kt, int64_t n0, int64_t nb, float* w, int64_t ldw) {
  const int64_t tiles = (nb + NT - 1) / NT;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (kt * NT));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      MAMP_DEQUANT_TILE<B, H>(L, k0, kt, n0 + t * NT, int(std::min<int64_t>(NT, nb - t * NT)), w + t * NT, ldw);
  });
}

#define MAMP_DISPATCH_WIDTHS(bits, hbits, FN, ...)                      \
  do {                                                                  \
    if (bits == 2 && hbits == 2) FN<2, 2>(__VA_ARGS__);                 \
    else if (bits == 2 && hbits == 4) FN<2, 4>(__VA_ARGS__);            \
    else if (bits == 2 && hbits == 8) FN<2, 8>(__VA_ARGS__);            \
    else if (bits == 4 && hbits == 4) FN<4, 4>(__VA_ARGS__);            \
    else if (bits == 4 && hbits == 8) FN<4, 8>(__VA_ARGS__);            \
    else if (bits == 8 && hbits == 8) FN<8, 8>(__VA_ARGS__);            \
    else TORCH_CHECK(false, "unsupported widths b=", bits, " h=", hbits); \
  } while (0)

}  // namespace

// x: [M, K] fp32 contiguous; out: [M, N] fp32 contiguous (fully written); bias: [N] fp32 or undefined.
// Uses the streaming kernel for M <= small_m, else column blocks dequantized into a scratch + BLAS.
void packed_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& bitmap,
                   const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& hscales,
                   const at::Tensor& hzeros, const c10::optional<at::Tensor>& bias, at::Tensor& out, int64_t bits,
                   int64_t hbits, int64_t group_size, int64_t salient_group_size, int64_t small_m,
                   int64_t scratch_bytes) {
  const Layer L = make_layer(qweight, bitmap, scales, zeros, hscales, hzeros, bits, group_size, salient_group_size);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: [M, K] fp32 contiguous");
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(0) == x.size(0) &&
              out.size(1) == L.N, "out: [M, N] fp32 contiguous");
  const int64_t M = x.size(0), K = x.size(1), Kp = L.Kp, N = L.N;
  TORCH_CHECK(K <= Kp && Kp - K < GROUP, "x has ", K, " features for K_pad = ", Kp);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: [N] fp32");
    b = bias->data_ptr<float>();
  }
  if (M == 0) return;
  if (M <= small_m) {
    at::Tensor xp = x;
    if (K != Kp) {  // rows K..K_pad of the weights are padding: pair them with zeros
      xp = at::zeros({M, Kp}, x.options());
      xp.narrow(1, 0, K).copy_(x);
    }
    MAMP_DISPATCH_WIDTHS(bits, hbits, gemv_all, L, xp.data_ptr<float>(), M, b, out.data_ptr<float>());
    return;
  }
  // Prefill: dequantize blocks of nb columns (all K rows) into a scratch of at most scratch_bytes, freed on
  // return, and multiply each block with one BLAS call.
  const int64_t nb = std::min(N, std::max<int64_t>(NT, scratch_bytes / int64_t(sizeof(float)) / Kp / NT * NT));
  at::Tensor scratch = at::empty({Kp * nb}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t nbb = std::min(nb, N - n0);
    MAMP_DISPATCH_WIDTHS(bits, hbits, dequant_block, L, 0, Kp, n0, nbb, scratch.data_ptr<float>(), nbb);
    at::Tensor w = scratch.narrow(0, 0, K * nbb).view({K, nbb});  // padded rows K..K_pad skipped
    at::Tensor o = out.narrow(1, n0, nbb);
    if (b) {
      at::addmm_out(o, bias->narrow(0, n0, nbb).unsqueeze(0), x, w);
    } else {
      at::mm_out(o, x, w);
    }
  }
}

// The Python entry point: x [M, K] any float dtype and strides; bias [N] any float dtype or None; out [M, N] in
// x's dtype, contiguous, or None. Returns out (or a new [M, N] tensor in x's dtype). All conversions happen here,
// so a decode step costs one Python -> C++ call.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& bitmap,
                         const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& hscales,
                         const at::Tensor& hzeros, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& out, int64_t bits, int64_t hbits, int64_t group_size,
                         int64_t salient_group_size, int64_t small_m, int64_t scratch_bytes) {
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "x: [M, K] floating point");
  const int64_t M = x.size(0), N = mamp_cpu::out_features(qweight);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  c10::optional<at::Tensor> bf;
  if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat).contiguous();
  const bool direct = out.has_value() && out->defined() && out->scalar_type() == at::kFloat && out->is_contiguous();
  if (out.has_value() && out->defined()) {
    TORCH_CHECK(out->dim() == 2 && out->size(0) == M && out->size(1) == N && out->scalar_type() == x.scalar_type(),
                "out: [M, N] in x's dtype");
  }
  at::Tensor y = direct ? *out : at::empty({M, N}, xf.options());
  packed_matmul(xf, qweight, bitmap, scales, zeros, hscales, hzeros, bf, y, bits, hbits, group_size,
                salient_group_size, small_m, scratch_bytes);
  if (direct) return y;
  if (out.has_value() && out->defined()) return out->copy_(y);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// Dequantize the whole layer to [K_pad, N] fp32 (tests and the benchmark's "dequantize then mm" baseline).
at::Tensor dequantize_t(const at::Tensor& qweight, const at::Tensor& bitmap, const at::Tensor& scales,
                        const at::Tensor& zeros, const at::Tensor& hscales, const at::Tensor& hzeros, int64_t bits,
                        int64_t hbits, int64_t group_size, int64_t salient_group_size) {
  const Layer L = make_layer(qweight, bitmap, scales, zeros, hscales, hzeros, bits, group_size, salient_group_size);
  at::Tensor w = at::empty({L.Kp, L.N}, qweight.options().dtype(at::kFloat));
  MAMP_DISPATCH_WIDTHS(bits, hbits, dequant_block, L, 0, L.Kp, 0, L.N, w.data_ptr<float>(), L.N);
  return w;
}

// The embedding lookup of a packed, tied lm_head: out[i, k] = weight k of output column ids[i], dequantized with
// the reference's arithmetic ((q - z) * s in fp32, exactly kernels.packing.dequantize), from either layout. A few
// microseconds per id against ~100 for the torch reference (kernels/ops.py packed_rows).
template <int B, int H>
void packed_rows_impl(const Layer& L, const int64_t* ids, int64_t n, int64_t K, float* out) {
  constexpr int VPW = 32 / B, WPG = B / 2, RUN = H / B;
  constexpr uint32_t MASK = (1u << B) - 1;
  constexpr uint32_t HMASK = (1u << H) - 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t col = ids[i], n0 = col - col % NT, j = col % NT;
    float* dst = out + i * K;
    for (int64_t g = 0; g < L.Kp / GROUP; ++g) {
      const bool sal = (L.bm_at(g / 8, n0)[j] >> (g % 8)) & 1;
      const int64_t r = g * GROUP / (sal ? L.sgs : L.gs);
      const float s = float(sal ? L.hsc_at(r, n0)[j] : L.sc_at(r, n0)[j]);
      const float z = float(sal ? L.hz_at(r, n0)[j] : L.z_at(r, n0)[j]);
      for (int wi = 0; wi < WPG; ++wi) {
        const uint32_t w = L.qw_at(g * WPG + wi, n0)[j];
        for (int v = 0; v < VPW; ++v) {
          const int64_t k = g * GROUP + wi * VPW + v;
          if (k >= K) break;
          const uint32_t q = sal ? (w >> (H * (v / RUN))) & HMASK : (w >> (B * v)) & MASK;
          dst[k] = (float(int32_t(q)) - z) * s;
        }
      }
    }
  }
}

static at::Tensor packed_rows_op(const at::Tensor& ids, const at::Tensor& qweight, const at::Tensor& bitmap,
                                 const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& hscales,
                                 const at::Tensor& hzeros, int64_t bits, int64_t hbits, int64_t group_size,
                                 int64_t salient_group_size, int64_t in_features) {
  const Layer L = make_layer(qweight, bitmap, scales, zeros, hscales, hzeros, bits, group_size, salient_group_size);
  TORCH_CHECK(in_features <= L.Kp && L.Kp - in_features < GROUP, "in_features ", in_features, " for K_pad ", L.Kp);
  const at::Tensor flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t n = flat.numel();
  const int64_t* p = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(p[i] >= 0 && p[i] < L.N, "id ", p[i], " outside [0, ", L.N, ")");
  at::Tensor out = at::empty({n, in_features}, qweight.options().dtype(at::kFloat));
  MAMP_DISPATCH_WIDTHS(bits, hbits, packed_rows_impl, L, p, n, in_features, out.data_ptr<float>());
  return out;
}

// kernels/cpu_half_matmul.cpp (the same extension): matmul with a bf16/fp16 weight (half_linear, half_matmul_f32).
void register_half(pybind11::module& m);
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& out, int64_t small_m, int64_t upcast_m,
                       int64_t scratch_bytes);

// kernels/cpu_int8_matmul.cpp (the same extension): the integer-dot decode kernel.
std::string int8_isa();
at::Tensor packed_linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& bitmap,
                              const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& hscales,
                              const at::Tensor& hzeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                              int64_t hbits, int64_t group_size, int64_t salient_group_size, int64_t act_block,
                              int64_t small_m, int64_t scratch_bytes);

// The registered ops (torch.ops.mamp.*): x [..., K] -> [..., N] in x's dtype, a new tensor (no out=), so that
// torch.compile, graph capture and other engines can call them. Fake (meta) kernels: kernels/ops.py.
static at::Tensor packed_linear_op(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& bitmap,
                                   const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& hscales,
                                   const at::Tensor& hzeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                                   int64_t hbits, int64_t group_size, int64_t salient_group_size, int64_t small_m,
                                   int64_t scratch_bytes) {
  const int64_t K = x.size(-1), N = mamp_cpu::out_features(qweight);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = packed_linear(x.reshape({-1, K}), qweight, bitmap, scales, zeros, hscales, hzeros, bias,
                               c10::nullopt, bits, hbits, group_size, salient_group_size, small_m, scratch_bytes);
  return y.view(shape);
}

static at::Tensor packed_linear_int8_op(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& bitmap,
                                        const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& hscales,
                                        const at::Tensor& hzeros, const c10::optional<at::Tensor>& bias,
                                        int64_t bits, int64_t hbits, int64_t group_size, int64_t salient_group_size,
                                        int64_t act_block, int64_t small_m, int64_t scratch_bytes) {
  const int64_t K = x.size(-1), N = mamp_cpu::out_features(qweight);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return packed_linear_int8(x.reshape({-1, K}), qweight, bitmap, scales, zeros, hscales, hzeros, bias, bits, hbits,
                            group_size, salient_group_size, act_block, small_m, scratch_bytes).view(shape);
}

static at::Tensor half_linear_op(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 int64_t small_m, int64_t upcast_m, int64_t scratch_bytes) {
  const int64_t K = x.size(-1), N = weight.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return half_linear(x.reshape({-1, K}), weight, bias, c10::nullopt, small_m, upcast_m, scratch_bytes).view(shape);
}

TORCH_LIBRARY_FRAGMENT(mamp, m) {
  m.def("packed_linear_cpu(Tensor x, Tensor qweight, Tensor bitmap, Tensor scales, Tensor zeros, Tensor hscales, "
        "Tensor hzeros, Tensor? bias, int bits, int salient_bits, int group_size, int salient_group_size, "
        "int small_m, int scratch_bytes) -> Tensor");
  m.def("packed_linear_int8_cpu(Tensor x, Tensor qweight, Tensor bitmap, Tensor scales, Tensor zeros, "
        "Tensor hscales, Tensor hzeros, Tensor? bias, int bits, int salient_bits, int group_size, "
        "int salient_group_size, int act_block, int small_m, int scratch_bytes) -> Tensor");
  m.def("half_linear_cpu(Tensor x, Tensor weight, Tensor? bias, int small_m, int upcast_m, int scratch_bytes) "
        "-> Tensor");
  m.def("packed_rows_cpu(Tensor ids, Tensor qweight, Tensor bitmap, Tensor scales, Tensor zeros, Tensor hscales, "
        "Tensor hzeros, int bits, int salient_bits, int group_size, int salient_group_size, int in_features) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(mamp, CPU, m) {
  m.impl("packed_linear_cpu", &packed_linear_op);
  m.impl("packed_linear_int8_cpu", &packed_linear_int8_op);
  m.impl("half_linear_cpu", &half_linear_op);
  m.impl("packed_rows_cpu", &packed_rows_op);
}

void register_int8(pybind11::module& m);  // kernels/cpu_int8_matmul.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_linear", &packed_linear, "y = x W^T + bias from the packed tensors");
  m.def("packed_matmul", &packed_matmul, "packed matmul into out (fp32)");
  m.def("dequantize_t", &dequantize_t, "dequantize to [K_pad, N] fp32");
  m.def("int8_isa", &int8_isa, "the integer-dot kernel's instruction set here");
  register_half(m);
  register_int8(m);
}
