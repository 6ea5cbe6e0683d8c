// The packed tensors of one layer as the CPU kernels address them (kernels/cpu_matmul.cpp, cpu_int8_matmul.cpp).
//
// Two layouts of every [rows, N] packed tensor (qweight, bitmap, scales, zeros, hscales, hzeros):
//   row-major, as stored in the checkpoint: element (r, n) at r*N + n;
//   column-tiled, [N/16, rows, 16] (kernels/cpu_layout.py builds it at load when N % 16 == 0): element (r, n) at
//   (n/16)*rows*16 + r*16 + n%16, so a kernel walking one 16-column tile down the rows reads one contiguous
//   stream instead of one cache line every N*4 bytes (which hardware prefetchers do not follow).
// Kernels take tiles of 16 columns starting at multiples of 16 and address rows through the *_at helpers.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

#include <immintrin.h>

namespace mamp_cpu {

constexpr int TILE = 16;  // columns per tile of the column-tiled layout

struct Layer {
  const uint32_t* qw;   // [K_pad*b/32, N]
  const uint8_t* bm;    // [ceil(G/8), N]
  const at::Half* sc;   // [ceil(K_pad/gs), N]
  const uint8_t* z;     // [ceil(K_pad/gs), N]
  const at::Half* hsc;  // [ceil(K_pad/sgs), N]
  const uint8_t* hz;    // [ceil(K_pad/sgs), N]
  int64_t N, Kp, gs, sgs;
  int64_t ld;                   // row stride: N (row-major) or 16 (column-tiled)
  int64_t tq, tb, ts, th;       // tile stride of qweight, bitmap, scales/zeros, hscales/hzeros

  // Row r of the 16-column tile starting at column n0 (a multiple of 16).
  const uint32_t* qw_at(int64_t r, int64_t n0) const { return qw + (n0 / TILE) * tq + r * ld; }
  const uint8_t* bm_at(int64_t r, int64_t n0) const { return bm + (n0 / TILE) * tb + r * ld; }
  const at::Half* sc_at(int64_t r, int64_t n0) const { return sc + (n0 / TILE) * ts + r * ld; }
  const uint8_t* z_at(int64_t r, int64_t n0) const { return z + (n0 / TILE) * ts + r * ld; }
  const at::Half* hsc_at(int64_t r, int64_t n0) const { return hsc + (n0 / TILE) * th + r * ld; }
  const uint8_t* hz_at(int64_t r, int64_t n0) const { return hz + (n0 / TILE) * th + r * ld; }
};

// The AVX2 loads of one 16-column row, shared by the kernels; usable from code compiled without -mavx2 (the
// integer kernel picks its instruction set at run time), hence the target attribute.
#define MAMP_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

// Two 8-lane halves of a 16-column row; partial tiles go through a zero-filled copy.
MAMP_TARGET_AVX2 inline void load16_u32(__m256i* v, const uint32_t* p, int nt) {
  if (nt == TILE) {
    v[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    v[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8));
  } else {
    alignas(32) uint32_t buf[TILE] = {};
    std::memcpy(buf, p, nt * sizeof(uint32_t));
    v[0] = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
    v[1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf + 8));
  }
}

MAMP_TARGET_AVX2 inline void load16_u8(__m256i* v, const uint8_t* p, int nt) {  // -> two int32 x 8
  __m128i b;
  if (nt == TILE) {
    b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint8_t buf[TILE] = {};
    std::memcpy(buf, p, nt);
    b = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  }
  v[0] = _mm256_cvtepu8_epi32(b);
  v[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
}

MAMP_TARGET_AVX2 inline void load16_f16(__m256* v, const at::Half* p, int nt) {
  __m256i h;
  if (nt == TILE) {
    h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else {
    alignas(32) uint16_t buf[TILE] = {};
    std::memcpy(buf, p, nt * sizeof(uint16_t));
    h = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
  }
  v[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  v[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// Output features of a packed qweight in either layout.
inline int64_t out_features(const at::Tensor& qweight) {
  return qweight.dim() == 3 ? qweight.size(0) * qweight.size(2) : qweight.size(1);
}

inline Layer make_layer(const at::Tensor& qweight, const at::Tensor& bitmap, const at::Tensor& scales,
                        const at::Tensor& zeros, const at::Tensor& hscales, const at::Tensor& hzeros, int64_t bits,
                        int64_t group_size, int64_t salient_group_size) {
  const bool tiled = qweight.dim() == 3;
  for (const at::Tensor* t : {&qweight, &bitmap, &scales, &zeros, &hscales, &hzeros}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->dim() == (tiled ? 3 : 2),
                "packed tensors: contiguous CPU, all 2-D (row-major) or all 3-D (column-tiled)");
    if (tiled) TORCH_CHECK(t->size(0) == qweight.size(0) && t->size(2) == TILE, "column-tiled: [N/16, rows, 16]");
  }
  TORCH_CHECK(qweight.scalar_type() == at::kInt && bitmap.scalar_type() == at::kByte &&
              scales.scalar_type() == at::kHalf && hscales.scalar_type() == at::kHalf &&
              zeros.scalar_type() == at::kByte && hzeros.scalar_type() == at::kByte, "packed tensor dtypes");
  const int rows_dim = tiled ? 1 : 0;
  Layer L;
  L.qw = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  L.bm = bitmap.data_ptr<uint8_t>();
  L.sc = scales.data_ptr<at::Half>();
  L.z = zeros.data_ptr<uint8_t>();
  L.hsc = hscales.data_ptr<at::Half>();
  L.hz = hzeros.data_ptr<uint8_t>();
  L.N = out_features(qweight);
  L.Kp = qweight.size(rows_dim) * 32 / bits;
  L.gs = group_size;
  L.sgs = salient_group_size;
  TORCH_CHECK(scales.size(rows_dim) == zeros.size(rows_dim) && hscales.size(rows_dim) == hzeros.size(rows_dim),
              "scales/zeros rows");
  if (tiled) {
    L.ld = TILE;
    L.tq = qweight.size(1) * TILE;
    L.tb = bitmap.size(1) * TILE;
    L.ts = scales.size(1) * TILE;
    L.th = hscales.size(1) * TILE;
  } else {
    TORCH_CHECK(bitmap.size(1) == L.N && scales.size(1) == L.N && hscales.size(1) == L.N, "packed tensor widths");
    L.ld = L.N;
    L.tq = L.tb = L.ts = L.th = TILE;
  }
  return L;
}

}  // namespace mamp_cpu
