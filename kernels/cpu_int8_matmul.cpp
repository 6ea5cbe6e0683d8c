// Integer-dot CPU decode kernel for the packed format (M <= small_m rows, h = b): activations are quantized once
// per call to int8 in blocks of `act_block` inputs (symmetric, d = max|x| / 127), and the codes are multiplied
// with them in integer instructions: u8 codes x s8 activations summed four at a time into int32 lanes, one lane
// per output column (AVX-512 VNNI vpdpbusd; AVX2 vpmaddubsw + vpmaddwd; a portable loop elsewhere). The packed
// words are used as stored: a 32-bit word of column n holds 32/b codes of consecutive inputs, and masking it
// with 0x0F0F0F0F (b = 4) or 0x03030303 (b = 2) after a shift of b*j leaves four codes, one per byte, of inputs
// t*(8/b) + j (t = 0..3); at b = 8 the word is four codes as it stands. The activations are stored in that
// order (permuted per word), so one broadcast 32-bit load feeds all 16 columns.
//
// A segment closes where a scale group, a salient scale group or an activation block ends:
//     y += d * (s * (S_normal - z X_normal) + hs * (S_salient - hz X_salient))
// with S the code x activation sums and X the activation sums of the groups of each kind. The AVX2 and portable
// tiles route each 16-row group's int32 sums to the normal or the salient accumulators (the bitmap bit, as a lane
// mask) and apply the scales at the close; the VNNI tile scales each group's sums at once (the bit picks the
// column's grid: three vector operations per row and group instead of six, 1.2x at M = 16). The result is
// exactly the dequantized weights times the dequantized int8 activations, up to fp32 rounding
// (kernels/reference.py, packed_matmul_int8_reference). h != b (the paper's 8-bit means) stays on the float
// kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <immintrin.h>
#include <omp.h>

#include "cpu_layout.h"

// kernels/cpu_matmul.cpp: the float kernel, for M > small_m and h != b.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& bitmap,
                         const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& hscales,
                         const at::Tensor& hzeros, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& out, int64_t bits, int64_t hbits, int64_t group_size,
                         int64_t salient_group_size, int64_t small_m, int64_t scratch_bytes);

namespace {

using mamp_cpu::Layer;
using mamp_cpu::load16_f16;
using mamp_cpu::load16_u32;
using mamp_cpu::load16_u8;

constexpr int GROUP = 16;  // rows per group, one bitmap bit
constexpr int NT = 16;     // output columns per tile
// Software prefetch this far ahead in the word stream: +8 % at M = 1 over SmolLM2's layers from DRAM, column-tiled
// (512, 1024 and 2048 bytes measured; the hardware prefetcher alone leaves some latency exposed).
constexpr int PF_BYTES = 512;


// Per 16-row group: whether a segment closes after it (a scale group, salient scale group or activation block
// ends there, or the last group), and the rows of the scales, salient scales and activation scales it uses.
// Computed once per call, so the tiles do no integer division.
struct GroupInfo {
  int32_t rs, rh, rb;
  bool close;
};

struct Act {                // the quantized activations of M rows
  const int8_t* q;          // [M, Kp], each word's inputs in extraction order (see quantize_rows)
  const float* d;           // [M, ceil(Kp/ablk)] block scales
  const int32_t* s;         // [M, G] 16-row sums of q
  const float* sf;          // [M, G] the same sums as floats (the VNNI tile's zero terms)
  const GroupInfo* gi;      // [G]
  int64_t ldq, ldd, lds;
};

// The activations' order: word r = k / (32/b) holds inputs r*(32/b) + t*E + e at byte t of extraction e
// (E = 8/b extractions of four codes each); quantize_rows stores them at r*(32/b) + 4e + t.

std::vector<GroupInfo> group_info(int64_t Kp, int64_t gs, int64_t sgs, int64_t ablk) {
  const int64_t G = Kp / GROUP;
  std::vector<GroupInfo> gi(G);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * GROUP, end = k0 + GROUP;
    gi[g] = {int32_t(k0 / gs), int32_t(k0 / sgs), int32_t(k0 / ablk),
             end % gs == 0 || end % sgs == 0 || end % ablk == 0 || g == G - 1};
  }
  return gi;
}

// ---- portable ----------------------------------------------------------------------------------------------
template <int B, int MB>
void tile_portable(const Layer& L, const Act& A, int64_t n0, int nt, float* y, int64_t ldy, const float* bias) {
  constexpr int VPW = 32 / B, WPG = B / 2, E = 8 / B;
  constexpr uint32_t CM = B == 2 ? 0x03030303u : B == 4 ? 0x0F0F0F0Fu : 0xFFFFFFFFu;
  const int64_t G = L.Kp / GROUP;
  float acc[MB][NT] = {};
  int32_t sall[MB][NT] = {}, ssal[MB][NT] = {}, xsal[MB][NT] = {}, xall[MB] = {};
  for (int64_t g = 0; g < G; ++g) {
    bool sal[NT];
    for (int j = 0; j < NT; ++j) sal[j] = j < nt && ((L.bm_at(g / 8, n0)[j] >> (g % 8)) & 1);
    int32_t t[MB][NT] = {};
    for (int wi = 0; wi < WPG; ++wi) {
      const int64_t r = g * WPG + wi;
      for (int j = 0; j < nt; ++j) {
        const uint32_t w = L.qw_at(r, n0)[j];
        for (int e = 0; e < E; ++e) {
          const uint32_t c = (w >> (B * e)) & CM;
          for (int m = 0; m < MB; ++m) {
            const int8_t* xq = A.q + m * A.ldq + r * VPW + 4 * e;
            int32_t s = 0;
            for (int b = 0; b < 4; ++b) s += int32_t((c >> (8 * b)) & 0xFF) * int32_t(xq[b]);
            t[m][j] += s;
          }
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      const int32_t xs = A.s[m * A.lds + g];
      xall[m] += xs;
      for (int j = 0; j < NT; ++j) {
        sall[m][j] += t[m][j];
        if (sal[j]) {
          ssal[m][j] += t[m][j];
          xsal[m][j] += xs;
        }
      }
    }
    const GroupInfo gi = A.gi[g];
    if (gi.close) {
      const int64_t rs = gi.rs, rh = gi.rh;
      for (int m = 0; m < MB; ++m) {
        const float d = A.d[m * A.ldd + gi.rb];
        for (int j = 0; j < nt; ++j) {
          const float s = float(L.sc_at(rs, n0)[j]), z = float(L.z_at(rs, n0)[j]);
          const float hs = float(L.hsc_at(rh, n0)[j]), hz = float(L.hz_at(rh, n0)[j]);
          const float fn = float(sall[m][j] - ssal[m][j]) - z * float(xall[m] - xsal[m][j]);
          const float fh = float(ssal[m][j]) - hz * float(xsal[m][j]);
          acc[m][j] += d * (s * fn + hs * fh);
          sall[m][j] = ssal[m][j] = xsal[m][j] = 0;
        }
        xall[m] = 0;
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < nt; ++j) y[m * ldy + n0 + j] = acc[m][j] + (bias ? bias[n0 + j] : 0.f);
}

// ---- AVX-512 VNNI ------------------------------------------------------------------------------------------
#define MAMP_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

// The words of a row are read as int32 straight from the int8 activation buffer (rows start at multiples of 16
// bytes), so each broadcast folds into its vpdpbusd as a memory operand.
typedef int32_t __attribute__((may_alias)) word_alias;

// Per 16-row group the int32 sums t become floats at once, each column scaled by its own grid's scale (the bitmap
// bit picks s or hs with one blend, shared by the rows) and the group's zero term taken off (z s or hz hs times
// the group's activation sum): u += a t - b X_g. No per-row routing of integer sums; a segment's u is scaled by
// the activation block's d where the segment closes. (The AVX2 and portable tiles route integer sums instead;
// both are the same product up to fp32 rounding.) SAL = false: no column of the tile has a salient group (an lm_head,
// RTN and GPTQ checkpoints: the bitmap is empty), so every group of a segment is on the normal grid, the integer
// sums run on over the whole segment and the scales are applied once at its close: four vpdpbusd per row and group
// and nothing else.
template <int B, int MB, bool SAL>
MAMP_VNNI void tile_vnni(const Layer& L, const Act& A, int64_t n0, int nt, float* y, int64_t ldy,
                         const float* bias) {
  constexpr int WPG = B / 2, E = 8 / B;
  const __mmask16 lanes = nt == NT ? __mmask16(0xFFFF) : __mmask16((1u << nt) - 1);
  const __m512i cmask = _mm512_set1_epi32(B == 2 ? 0x03030303 : B == 4 ? 0x0F0F0F0F : -1);
  const int64_t G = L.Kp / GROUP, ld = L.ld;
  const uint32_t* wq = L.qw_at(0, n0);  // word row r of the tile at wq + r * ld
  const uint8_t* bmp = L.bm_at(0, n0);
  const word_alias* xw[MB];  // row m's activation words: word r, extraction e at [r * E + e]
  const float* xsum[MB];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) {
    xw[m] = reinterpret_cast<const word_alias*>(A.q + m * A.ldq);
    xsum[m] = A.sf + m * A.lds;
  }
  __m512 acc[MB], u[MB];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) acc[m] = u[m] = _mm512_setzero_ps();
  __m512 s, hs, sz, hsz;  // the open segment's scales and scale x zero of both grids
  __m512 a, b;            // this group's: the grid each column's bit picks
  __m512i t[MB];          // the code x activation sums: of the group (SAL), of the open segment (!SAL)
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) t[m] = _mm512_setzero_si512();
  bool fresh = true;      // a segment opens at this group: load its scales
  int64_t g0 = 0;         // the open segment's first group
  for (int64_t g = 0; g < G; ++g) {
    const GroupInfo gi = A.gi[g];
    if (fresh) {
      s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, L.sc_at(gi.rs, n0)));
      sz = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, L.z_at(gi.rs, n0)))));
      if constexpr (SAL) {
        hs = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, L.hsc_at(gi.rh, n0)));
        hsz = _mm512_mul_ps(hs,
                            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, L.hz_at(gi.rh, n0)))));
      }
      fresh = false;
    }
    if constexpr (SAL) {
      const __m128i bb = _mm_maskz_loadu_epi8(lanes, bmp + (g / 8) * ld);
      const __mmask16 sk = _mm_test_epi8_mask(bb, _mm_set1_epi8(char(1 << (g % 8))));
      a = _mm512_mask_blend_ps(sk, s, hs), b = _mm512_mask_blend_ps(sk, sz, hsz);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) t[m] = _mm512_setzero_si512();
    }
#pragma GCC unroll 16
    for (int wi = 0; wi < WPG; ++wi) {
      const int64_t r = g * WPG + wi;
      const uint32_t* wp = wq + r * ld;
      _mm_prefetch(reinterpret_cast<const char*>(wp) + PF_BYTES, _MM_HINT_T0);
      const __m512i w = _mm512_maskz_loadu_epi32(lanes, wp);
#pragma GCC unroll 16
      for (int e = 0; e < E; ++e) {
        const __m512i c = _mm512_and_si512(e ? _mm512_srli_epi32(w, B * e) : w, cmask);
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) t[m] = _mm512_dpbusd_epi32(t[m], c, _mm512_set1_epi32(xw[m][r * E + e]));
      }
    }
    if constexpr (SAL) {
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        u[m] = _mm512_fmadd_ps(a, _mm512_cvtepi32_ps(t[m]), u[m]);
        u[m] = _mm512_fnmadd_ps(b, _mm512_set1_ps(xsum[m][g]), u[m]);
      }
    }
    if (gi.close) {
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        if constexpr (!SAL) {  // u = s S - s z X over the segment (X: sums of integers, exact in fp32)
          float xs = 0.f;
          for (int64_t k = g0; k <= g; ++k) xs += xsum[m][k];
          u[m] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(xs), _mm512_mul_ps(s, _mm512_cvtepi32_ps(t[m])));
          t[m] = _mm512_setzero_si512();
        }
        acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(A.d[m * A.ldd + gi.rb]), u[m], acc[m]);
        u[m] = _mm512_setzero_ps();
      }
      fresh = true;
      g0 = g + 1;
    }
  }
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(lanes, bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(y + m * ldy + n0, lanes, _mm512_add_ps(acc[m], bv));
}

// ---- AVX2: 16 columns as two 8-lane halves; vpmaddubsw (u8 x s8 -> pairs in int16, at most 2*15*127) then
// vpmaddwd with ones (-> int32 sums of four) -------------------------------------------------------------------
#define MAMP_AVX2 __attribute__((target("avx2,fma,f16c")))

MAMP_AVX2 inline __m256i dot4_avx2(__m256i c, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1));
}

template <int B, int MB>
MAMP_AVX2 void tile_avx2(const Layer& L, const Act& A, int64_t n0, int nt, float* y, int64_t ldy,
                         const float* bias) {
  constexpr int VPW = 32 / B, WPG = B / 2, E = 8 / B;
  const __m256i cmask = _mm256_set1_epi32(B == 2 ? 0x03030303 : B == 4 ? 0x0F0F0F0F : -1);
  const int64_t G = L.Kp / GROUP;
  __m256 acc[MB][2];
  __m256i sall[MB][2], ssal[MB][2], xsal[MB][2];
  int32_t xall[MB];
  for (int m = 0; m < MB; ++m) {
    for (int h = 0; h < 2; ++h) {
      acc[m][h] = _mm256_setzero_ps();
      sall[m][h] = ssal[m][h] = xsal[m][h] = _mm256_setzero_si256();
    }
    xall[m] = 0;
  }
  for (int64_t g = 0; g < G; ++g) {
    __m256i bits[2], sel[2];
    load16_u8(bits, L.bm_at(g / 8, n0), nt);
    const __m256i bit = _mm256_set1_epi32(1 << (g % 8));
    for (int h = 0; h < 2; ++h) sel[h] = _mm256_cmpeq_epi32(_mm256_and_si256(bits[h], bit), bit);
    const bool any = !_mm256_testz_si256(_mm256_or_si256(sel[0], sel[1]), _mm256_or_si256(sel[0], sel[1]));
    __m256i t[MB][2];
    for (int m = 0; m < MB; ++m) t[m][0] = t[m][1] = _mm256_setzero_si256();
    for (int wi = 0; wi < WPG; ++wi) {
      const int64_t r = g * WPG + wi;
      __m256i w[2];
      load16_u32(w, L.qw_at(r, n0), nt);
      for (int e = 0; e < E; ++e) {
        __m256i c[2];
        for (int h = 0; h < 2; ++h) c[h] = _mm256_and_si256(e ? _mm256_srli_epi32(w[h], B * e) : w[h], cmask);
        for (int m = 0; m < MB; ++m) {
          int32_t xv;
          std::memcpy(&xv, A.q + m * A.ldq + r * VPW + 4 * e, 4);
          const __m256i xb = _mm256_set1_epi32(xv);
          for (int h = 0; h < 2; ++h) {
            if constexpr (B == 8) {  // 8-bit codes would saturate vpmaddubsw: two nibble dots, high one x 16
              const __m256i nib = _mm256_set1_epi32(0x0F0F0F0F);
              const __m256i lo = dot4_avx2(_mm256_and_si256(c[h], nib), xb);
              const __m256i hi = dot4_avx2(_mm256_and_si256(_mm256_srli_epi32(c[h], 4), nib), xb);
              t[m][h] = _mm256_add_epi32(t[m][h], _mm256_add_epi32(lo, _mm256_slli_epi32(hi, 4)));
            } else {
              t[m][h] = _mm256_add_epi32(t[m][h], dot4_avx2(c[h], xb));
            }
          }
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      const int32_t xs = A.s[m * A.lds + g];
      xall[m] += xs;
      for (int h = 0; h < 2; ++h) {
        sall[m][h] = _mm256_add_epi32(sall[m][h], t[m][h]);
        if (any) {
          ssal[m][h] = _mm256_add_epi32(ssal[m][h], _mm256_and_si256(t[m][h], sel[h]));
          xsal[m][h] = _mm256_add_epi32(xsal[m][h], _mm256_and_si256(_mm256_set1_epi32(xs), sel[h]));
        }
      }
    }
    const GroupInfo gi = A.gi[g];
    if (gi.close) {
      const int64_t rs = gi.rs, rh = gi.rh;
      __m256 s[2], hs[2];
      __m256i zi[2], hzi[2];
      load16_f16(s, L.sc_at(rs, n0), nt);
      load16_f16(hs, L.hsc_at(rh, n0), nt);
      load16_u8(zi, L.z_at(rs, n0), nt);
      load16_u8(hzi, L.hz_at(rh, n0), nt);
      for (int m = 0; m < MB; ++m) {
        const __m256 d = _mm256_set1_ps(A.d[m * A.ldd + gi.rb]);
        for (int h = 0; h < 2; ++h) {
          const __m256 nx = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_set1_epi32(xall[m]), xsal[m][h]));
          const __m256 fn = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(zi[h]), nx,
                                             _mm256_cvtepi32_ps(_mm256_sub_epi32(sall[m][h], ssal[m][h])));
          const __m256 fh = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(hzi[h]), _mm256_cvtepi32_ps(xsal[m][h]),
                                             _mm256_cvtepi32_ps(ssal[m][h]));
          acc[m][h] = _mm256_fmadd_ps(d, _mm256_fmadd_ps(hs[h], fh, _mm256_mul_ps(s[h], fn)), acc[m][h]);
          sall[m][h] = ssal[m][h] = xsal[m][h] = _mm256_setzero_si256();
        }
        xall[m] = 0;
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

// ---- dispatch ----------------------------------------------------------------------------------------------
enum class Isa { Portable, Avx2, Vnni };

// What the CPU can run, detected once; MAMP_INT8_ISA ("avx2" or "portable", read at every call so tests can
// switch) forces a lesser path for tests and A/B runs.
Isa isa() {
  static const bool vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  static const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const char* env = std::getenv("MAMP_INT8_ISA");
  if (env && std::strcmp(env, "portable") == 0) return Isa::Portable;
  if (env && std::strcmp(env, "avx2") == 0) return avx2 ? Isa::Avx2 : Isa::Portable;
  if (vnni) return Isa::Vnni;
  return avx2 ? Isa::Avx2 : Isa::Portable;
}

template <int B, int MB>
void vnni_tile(bool sal, const Layer& L, const Act& A, int64_t n0, int nt, float* y, int64_t ldy, const float* bias) {
  if (sal) tile_vnni<B, MB, true>(L, A, n0, nt, y, ldy, bias);
  else tile_vnni<B, MB, false>(L, A, n0, nt, y, ldy, bias);
}

// A pass of 1 .. 8 rows on the VNNI tile.
template <int B>
void vnni_rows(int rows, bool sal, const Layer& L, const Act& A, int64_t n0, int nt, float* y, int64_t ldy,
               const float* bias) {
  switch (rows) {
    case 8: return vnni_tile<B, 8>(sal, L, A, n0, nt, y, ldy, bias);
    case 7: return vnni_tile<B, 7>(sal, L, A, n0, nt, y, ldy, bias);
    case 6: return vnni_tile<B, 6>(sal, L, A, n0, nt, y, ldy, bias);
    case 5: return vnni_tile<B, 5>(sal, L, A, n0, nt, y, ldy, bias);
    case 4: return vnni_tile<B, 4>(sal, L, A, n0, nt, y, ldy, bias);
    case 3: return vnni_tile<B, 3>(sal, L, A, n0, nt, y, ldy, bias);
    case 2: return vnni_tile<B, 2>(sal, L, A, n0, nt, y, ldy, bias);
    default: return vnni_tile<B, 1>(sal, L, A, n0, nt, y, ldy, bias);
  }
}

// The AVX2 and portable tiles: passes of 4, 2 and 1 rows.
template <int B, int MB>
void run_tile(Isa path, bool sal, const Layer& L, const Act& A, int64_t n0, int nt, float* y, int64_t ldy,
              const float* bias) {
  if (path == Isa::Avx2) tile_avx2<B, MB>(L, A, n0, nt, y, ldy, bias);
  else tile_portable<B, MB>(L, A, n0, nt, y, ldy, bias);
}

// Per 16-column tile: whether any of its columns has a salient group (a bit of its bitmap set).
std::vector<uint8_t> salient_tiles(const Layer& L) {
  const int64_t rows = (L.Kp / GROUP + 7) / 8, tiles = (L.N + NT - 1) / NT;
  std::vector<uint8_t> sal(tiles, 0);
  for (int64_t t = 0; t < tiles; ++t) {
    const int nt = int(std::min<int64_t>(NT, L.N - t * NT));
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* p = L.bm_at(r, t * NT);
      for (int j = 0; j < nt; ++j) sal[t] |= p[j];
    }
  }
  return sal;
}

#if defined(__AVX512F__) || defined(__AVX2__)
// One group: 16 inputs v times inv, rounded to nearest even (nearbyint) and clamped to -127..127, stored as 16
// int8 codes in the words' extraction order (perm); returns the codes' sum.
inline int32_t narrow16(const float* v, float inv, __m128i perm, int8_t* out) {
#if defined(__AVX512F__)
  const __m512 lim = _mm512_set1_ps(127.f);
  __m512 x = _mm512_mul_ps(_mm512_loadu_ps(v), _mm512_set1_ps(inv));
  x = _mm512_max_ps(_mm512_min_ps(x, lim), _mm512_set1_ps(-127.f));
  const __m512i c = _mm512_cvtps_epi32(x);  // round to nearest even, as nearbyint
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi8(_mm512_cvtepi32_epi8(c), perm));
  return _mm512_reduce_add_epi32(c);
#else
  const __m256 lim = _mm256_set1_ps(127.f), nlim = _mm256_set1_ps(-127.f), s = _mm256_set1_ps(inv);
  const __m256i c0 = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(_mm256_loadu_ps(v), s), lim), nlim));
  const __m256i c1 = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(_mm256_loadu_ps(v + 8), s), lim), nlim));
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(c0, c1), 0xD8);  // 16 int16 in order
  const __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi8(bytes, perm));
  const __m256i t = _mm256_add_epi32(c0, c1);
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
  return _mm_cvtsi128_si32(h);
#endif
}
#endif

// Quantize x [M, K] fp32 (K <= Kp; rows K..Kp are zero) into q (permuted), d and the 16-row sums.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t ablk, int bits, int8_t* q, float* d,
                   int32_t* s, float* sf) {
  const int64_t nblk = (Kp + ablk - 1) / ablk, G = Kp / GROUP;
#if defined(__AVX512F__) || defined(__AVX2__)
  // Vectors of 16 inputs = one group; the permutation (r*vpw + t*E + e -> r*vpw + 4e + t) stays inside 16 bytes.
  const __m128i perm = bits == 4   ? _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)
                       : bits == 2 ? _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)
                                   : _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) float tail[GROUP];
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* qm = q + m * Kp;
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t k0 = b * ablk, k1 = std::min(Kp, k0 + ablk), kx = std::min(K, k1);
      float amax = 0.f;
#pragma omp simd reduction(max : amax)
      for (int64_t k = k0; k < kx; ++k) amax = std::max(amax, std::fabs(xr[k]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      d[m * nblk + b] = amax / 127.f;
      for (int64_t k = k0; k < k1; k += GROUP) {
        const float* v = xr + k;
        if (k + GROUP > K) {  // the last group: zeros past K
          for (int i = 0; i < GROUP; ++i) tail[i] = k + i < K ? xr[k + i] : 0.f;
          v = tail;
        }
        const int32_t sum = narrow16(v, inv, perm, qm + k);
        s[m * G + k / GROUP] = sum;
        sf[m * G + k / GROUP] = float(sum);
      }
    }
  }
#else
  const int vpw = 32 / bits, e_n = 8 / bits;
  std::vector<int8_t> lin(Kp);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t k0 = b * ablk, k1 = std::min(Kp, k0 + ablk), kx = std::min(K, k1);
      float amax = 0.f;
      for (int64_t k = k0; k < kx; ++k) amax = std::max(amax, std::fabs(xr[k]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      d[m * nblk + b] = amax / 127.f;
      for (int64_t k = k0; k < k1; ++k) {
        const float v = k < K ? std::nearbyint(xr[k] * inv) : 0.f;
        lin[k] = int8_t(std::max(-127.f, std::min(127.f, v)));
      }
    }
    int8_t* qm = q + m * Kp;  // word r's input r*vpw + t*E + e goes to r*vpw + 4e + t (permuted_index)
    for (int64_t r = 0; r < Kp / vpw; ++r)
      for (int e = 0; e < e_n; ++e)
        for (int t = 0; t < 4; ++t) qm[r * vpw + 4 * e + t] = lin[r * vpw + t * e_n + e];
    for (int64_t g = 0; g < G; ++g) {  // the sum over a group is the same in either order
      int32_t acc = 0;
      for (int i = 0; i < GROUP; ++i) acc += lin[g * GROUP + i];
      s[m * G + g] = acc;
      sf[m * G + g] = float(acc);
    }
  }
#endif
}

// A run's next tile, one counter per cache line (threads take tiles from their own run and then from others').
struct alignas(64) Next {
  std::atomic<int64_t> t{0};
};

// The rows' activations quantized, then the tiles, in one parallel region: each thread quantizes its share of
// the rows, waits for the others at one barrier, and takes a contiguous run of tiles (as at::parallel_for would
// split them), then helps with what is left of the others' runs. One fork and join per call, and no thread idle
// while another quantizes alone.
// q [M, Kp], d [M, nblk], s [M, G], sf [M, G]: the quantized activations' buffers, written here;
// sal: salient_tiles(L).
template <int B>
void gemv_int8(const Layer& L, const std::vector<GroupInfo>& gi, const uint8_t* sal, const float* x, int64_t K,
               int64_t ablk, int8_t* q, float* d, int32_t* s, float* sf, int64_t M, const float* bias, float* y) {
  const Isa path = isa();
  const int64_t N = L.N, tiles = (N + NT - 1) / NT;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (L.Kp * NT));
  const int64_t nth = at::in_parallel_region() ? 1
                      : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (tiles + grain - 1) / grain));
  // Tiles per claim: about 2^17 multiply-adds (~1 us), so that claiming (an atomic add, a cache-line transfer
  // where two threads meet in one run) stays small beside the work it hands out.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 17) / (M * L.Kp * NT));
  const std::unique_ptr<Next[]> next(nth > 1 ? new Next[nth] : nullptr);
  const Act A{q, d, s, sf, gi.data(), L.Kp, (L.Kp + ablk - 1) / ablk, L.Kp / GROUP};
  auto work = [&](int64_t tid, int64_t team) {
    if (team > 1) next[tid].t.store(tiles * tid / team, std::memory_order_relaxed);  // seen by all after the barrier
    const int64_t m0 = M * tid / team, m1 = M * (tid + 1) / team;
    if (m1 > m0) {
      quantize_rows(x + m0 * K, m1 - m0, K, L.Kp, ablk, B, q + m0 * A.ldq, d + m0 * A.ldd, s + m0 * A.lds,
                    sf + m0 * A.lds);
    }
#pragma omp barrier
    auto tile = [&](int64_t t) {
      const int64_t n0 = t * NT;
      const int nt = int(std::min<int64_t>(NT, N - n0));
      int64_t m = 0;
      auto shifted = [&](int64_t mm) {
        Act a = A;
        a.q += mm * A.ldq;
        a.d += mm * A.ldd;
        a.s += mm * A.lds;
        a.sf += mm * A.lds;
        return a;
      };
      const bool st = sal[t];
      if (path == Isa::Vnni) {
        // Up to 8 rows per pass where 32 registers hold them, the rows spread evenly over the fewest passes
        // (15 rows: 8 + 7, not 8 + 4 + 2 + 1: a pass of one row is one chain of dependent vpdpbusd).
        const int64_t passes = (M + 7) / 8;
        for (int64_t k = 0; k < passes; ++k) {
          const int64_t m0 = M * k / passes, rows = M * (k + 1) / passes - m0;
          vnni_rows<B>(int(rows), st, L, shifted(m0), n0, nt, y + m0 * N, N, bias);
        }
        return;
      }
      for (; m + 4 <= M; m += 4) run_tile<B, 4>(path, st, L, shifted(m), n0, nt, y + m * N, N, bias);
      for (; m + 2 <= M; m += 2) run_tile<B, 2>(path, st, L, shifted(m), n0, nt, y + m * N, N, bias);
      for (; m < M; ++m) run_tile<B, 1>(path, st, L, shifted(m), n0, nt, y + m * N, N, bias);
    };
    if (team == 1) {
      for (int64_t t = 0; t < tiles; ++t) tile(t);
      return;
    }
    // Each thread works through its own contiguous run of tiles, then takes what is left of the others' runs:
    // a thread the OS has preempted (the server's event loop, a client on the same cores) no longer holds the
    // whole team at the join.
    for (int64_t k = 0; k < team; ++k) {
      const int64_t j = (tid + k) % team, end = tiles * (j + 1) / team;
      for (int64_t t; (t = next[j].t.fetch_add(chunk, std::memory_order_relaxed)) < end;) {
        for (const int64_t e = std::min(end, t + chunk); t < e; ++t) tile(t);
      }
    }
  };
  if (nth == 1) {  // one thread: no parallel region to open (a small layer's call is mostly fixed cost)
    work(0, 1);
    return;
  }
#pragma omp parallel num_threads(nth)
  work(omp_get_thread_num(), omp_get_num_threads());
}

}  // namespace

// The integer path's instruction set on this machine: "avx512-vnni", "avx2" or "portable" (MAMP_INT8_ISA forces
// "avx2" or "portable").
std::string int8_isa() {
  switch (isa()) {
    case Isa::Vnni: return "avx512-vnni";
    case Isa::Avx2: return "avx2";
    default: return "portable";
  }
}

// A layer prepared once for the integer path (kernels/cpu_decode_layer.cpp keeps one per linear): its view of the
// packed tensors (which the owner keeps alive), the per-group table and which tiles have salient groups, so a
// call builds none of them.
struct Int8Plan {
  Layer L;
  std::vector<GroupInfo> gi;
  std::vector<uint8_t> sal;
  int64_t bits = 0, act_block = 0;
};

// nullptr where the integer path does not apply (h != b, or b not 2, 4 or 8): the float kernel serves those.
std::shared_ptr<const Int8Plan> int8_plan(const at::Tensor& qweight, const at::Tensor& bitmap,
                                          const at::Tensor& scales, const at::Tensor& zeros,
                                          const at::Tensor& hscales, const at::Tensor& hzeros, int64_t bits,
                                          int64_t hbits, int64_t group_size, int64_t salient_group_size,
                                          int64_t act_block) {
  if (hbits != bits || (bits != 2 && bits != 4 && bits != 8)) return nullptr;
  TORCH_CHECK(act_block > 0 && act_block % GROUP == 0, "act_block: a positive multiple of 16, got ", act_block);
  auto p = std::make_shared<Int8Plan>();
  p->L = mamp_cpu::make_layer(qweight, bitmap, scales, zeros, hscales, hzeros, bits, group_size, salient_group_size);
  p->gi = group_info(p->L.Kp, group_size, salient_group_size, act_block);
  p->sal = salient_tiles(p->L);
  p->bits = bits, p->act_block = act_block;
  return p;
}

int64_t int8_plan_out(const Int8Plan& p) { return p.L.N; }

// y [M, N] = x [M, K] (fp32, rows contiguous) through the plan; the quantized activations in buffers of the
// calling thread, grown as needed and kept.
void int8_plan_run(const Int8Plan& p, const float* x, int64_t M, int64_t K, const float* bias, float* y) {
  TORCH_CHECK(K <= p.L.Kp && p.L.Kp - K < GROUP, "x has ", K, " features for K_pad = ", p.L.Kp);
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> d;
  thread_local std::vector<int32_t> s;
  thread_local std::vector<float> sf;
  const int64_t nblk = (p.L.Kp + p.act_block - 1) / p.act_block, G = p.L.Kp / GROUP;
  if (int64_t(q.size()) < M * p.L.Kp) q.resize(M * p.L.Kp);
  if (int64_t(d.size()) < M * nblk) d.resize(M * nblk);
  if (int64_t(s.size()) < M * G) s.resize(M * G), sf.resize(M * G);
  auto run = [&](auto gemv) {
    gemv(p.L, p.gi, p.sal.data(), x, K, p.act_block, q.data(), d.data(), s.data(), sf.data(), M, bias, y);
  };
  if (p.bits == 2) run(gemv_int8<2>);
  else if (p.bits == 4) run(gemv_int8<4>);
  else run(gemv_int8<8>);
}

// y [M, N] in x's dtype = x [M, K] (any float dtype and strides, M >= 1) through the plan, + bias [N] if given.
at::Tensor int8_plan_linear(const Int8Plan& p, const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = p.L.N;
  const at::Tensor xf = x.scalar_type() == at::kFloat && x.is_contiguous() ? x : x.to(at::kFloat).contiguous();
  const float* b = nullptr;
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias: [", N, "]");
    bf = bias->scalar_type() == at::kFloat && bias->is_contiguous() ? *bias : bias->to(at::kFloat).contiguous();
    b = bf.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, xf.options());
  int8_plan_run(p, xf.data_ptr<float>(), M, K, b, y.data_ptr<float>());
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// x [M, K] any float dtype and strides; returns [M, N] in x's dtype. M <= small_m with h = b takes the integer
// path; anything else the float kernel (packed_linear of cpu_matmul.cpp).
at::Tensor packed_linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& bitmap,
                              const at::Tensor& scales, const at::Tensor& zeros, const at::Tensor& hscales,
                              const at::Tensor& hzeros, const c10::optional<at::Tensor>& bias, int64_t bits,
                              int64_t hbits, int64_t group_size, int64_t salient_group_size, int64_t act_block,
                              int64_t small_m, int64_t scratch_bytes) {
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "x: [M, K] floating point");
  const int64_t M = x.size(0);
  if (M > small_m || M == 0 || hbits != bits || (bits != 2 && bits != 4 && bits != 8)) {
    return packed_linear(x, qweight, bitmap, scales, zeros, hscales, hzeros, bias, c10::nullopt, bits, hbits,
                         group_size, salient_group_size, small_m, scratch_bytes);
  }
  const auto plan = int8_plan(qweight, bitmap, scales, zeros, hscales, hzeros, bits, hbits, group_size,
                              salient_group_size, act_block);
  return int8_plan_linear(*plan, x, bias);
}

// A packed layer prepared once for the integer path, as PackedLinear keeps it (kernels/packed_linear.py): the plan
// (its view of the packed tensors, the group table, which tiles have salient groups) is built at load, and a call
// is x in, y out through pybind11: none of packed_linear_int8's per-call plan nor the dispatcher's boxing of 15
// arguments (M = 1, 576 x 16: 8.1 us through torch.ops, 2.9 us through pybind11 for the same C++). torch.compile'd
// code keeps the registered op (packed_linear_int8_cpu).
struct Int8Linear {
  std::vector<at::Tensor> keep;  // qweight, bitmap, scales, zeros, hscales, hzeros: what the plan points into
  std::shared_ptr<const Int8Plan> plan;
  int64_t in_features = 0;

  // p: bits, salient_bits, group_size, salient_group_size, act_block, in_features.
  Int8Linear(std::vector<at::Tensor> t, std::vector<int64_t> p) : keep(std::move(t)) {
    TORCH_CHECK(keep.size() == 6 && p.size() == 6, "Int8Linear: 6 packed tensors and 6 sizes");
    plan = int8_plan(keep[0], keep[1], keep[2], keep[3], keep[4], keep[5], p[0], p[1], p[2], p[3], p[4]);
    TORCH_CHECK(plan, "Int8Linear: the integer path takes salient_bits = bits in {2, 4, 8}, got ", p[0], " / ",
                p[1]);
    in_features = p[5];
    TORCH_CHECK(in_features <= plan->L.Kp && plan->L.Kp - in_features < GROUP, "Int8Linear: in_features ",
                in_features, " for K_pad = ", plan->L.Kp);
  }

  // x [..., K] any float dtype and strides; bias [N] or None; returns [..., N] in x's dtype.
  at::Tensor forward(const at::Tensor& x, const c10::optional<at::Tensor>& bias) const {
    TORCH_CHECK(x.is_floating_point() && x.device().is_cpu() && x.dim() >= 1, "x: a floating-point CPU tensor");
    TORCH_CHECK(x.size(-1) == in_features, "x has ", x.size(-1), " features, layer expects ", in_features);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = plan->L.N;
    const at::Tensor x2 = x.reshape({-1, in_features});
    if (x2.size(0) == 0) return at::empty(shape, x.options());
    return int8_plan_linear(*plan, x2, bias).view(shape);
  }
};

// Called by cpu_matmul.cpp's PYBIND11_MODULE.
void register_int8(pybind11::module& m) {
  pybind11::class_<Int8Linear, std::shared_ptr<Int8Linear>>(m, "Int8Linear")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<int64_t>>(), pybind11::arg("tensors"),
           pybind11::arg("sizes"))
      .def("forward", &Int8Linear::forward, pybind11::arg("x"), pybind11::arg("bias"),
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
