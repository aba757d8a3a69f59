// W4A8 on the CPU: y = x W^T with W in group-wise INT4 and x quantized to INT8 per block of 32 inputs, the
// scheme of llama.cpp's Q4_0 x Q8_0 dot product. kernels/w4a8.py documents the layout, holds the plain torch
// reference and registers this function as the op frugal_w4a8::linear.
//
// Layout (kernels/w4a8.py `pack`): output rows in tiles of 16 (the last padded with zero rows). For tile t and
// block b (inputs 32b .. 32b + 31) there are 256 bytes, four chunks k of 64: 4 bytes per row r, whose low nibbles
// are the row's inputs 32b + 4k .. + 3 and whose high nibbles are inputs 32b + 16 + 4k .. + 3. The scales and mins
// are (tiles, groups, 16) bf16, w = q * scale + min (min = zero - 8 scale).
//
// So one 512-bit load holds 4 weights of each of 16 rows, and one dot-product instruction (vpdpbusd: 4 unsigned
// by 4 signed bytes per int32 lane) multiplies them by the same 4 activations, broadcast: a lane is a row. A
// block's integer sums come out as one vector of 16 rows, scaled by the rows' scales times the block's
// activation scale; there is no horizontal sum. This is how llama.cpp repacks Q4_0 for its AVX GEMV kernels.
//
// Per call, x is quantized once: xq (int8) and dx (fp32 per block), so that x ~ xq * dx; xs[g] is the sum of the
// dequantized x over group g, which the mins multiply. The result equals (xq * dx) W^T up to the order of float
// additions.
//
// Three paths, chosen by the caller from ATEN_CPU_CAPABILITY (torch's own switch): 0 plain C++, 1 AVX2 (two
// halves of 8 rows, vpmaddubsw + vpmaddwd), 2 AVX-512 (F, BW, VNNI; a CPU with AVX-512 but without VNNI takes the
// AVX2 path). Each is compiled for its instruction set with a target attribute, so one build serves every CPU,
// and a path never runs on a CPU torch was told not to use.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define FRUGAL_X86 1
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRows = 16;        // output rows per tile
constexpr int64_t kTileBlock = 256;  // bytes of one tile's block: 16 rows x 32 nibbles
constexpr int kTile = 4;             // activation rows computed together (they share each weight load)

struct Problem {
  int64_t M, N, K, G, B, tiles;
  int shift;              // log2(group / 32): block b is in group b >> shift
  const uint8_t* w;       // (tiles, B, 256)
  const uint16_t* s;      // (tiles, G, 16) bf16 bits
  const uint16_t* mn;     // (tiles, G, 16) bf16 bits
  const int8_t* xq;       // (M, K)
  const float* dx;        // (M, B)
  const float* xs;        // (M, G)
  float* y;               // (M, N)
};

inline float bf16(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// x (M, K) -> xq, dx (per block: absmax / 127), xs (per group: the sum of xq * dx).
void quantize_x(const float* x, int64_t M, int64_t K, int shift, int8_t* xq, float* dx, float* xs) {
  const int64_t B = K / kBlock, G = B >> shift;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) xs[m * G + g] = 0.f;
    for (int64_t b = 0; b < B; ++b) {
      const float* v = x + m * K + b * kBlock;
      float amax = 0.f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int i = 0; i < kBlock; ++i) {
        const int8_t q = static_cast<int8_t>(std::nearbyint(v[i] * inv));
        xq[m * K + b * kBlock + i] = q;
        sum += q;
      }
      dx[m * B + b] = d;
      xs[m * G + (b >> shift)] += d * static_cast<float>(sum);
    }
  }
}

void tiles_plain(const Problem& p, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t m = 0; m < p.M; ++m) {
      float acc[kRows] = {};
      for (int64_t b = 0; b < p.B; ++b) {
        const uint8_t* wb = p.w + (t * p.B + b) * kTileBlock;
        const int8_t* xb = p.xq + m * p.K + b * kBlock;
        const uint16_t* s = p.s + (t * p.G + (b >> p.shift)) * kRows;
        for (int r = 0; r < kRows; ++r) {
          int32_t dot = 0;
          for (int k = 0; k < 4; ++k)
            for (int i = 0; i < 4; ++i) {
              const uint8_t byte = wb[k * 64 + r * 4 + i];
              dot += (byte & 15) * xb[4 * k + i] + (byte >> 4) * xb[16 + 4 * k + i];
            }
          acc[r] += bf16(s[r]) * p.dx[m * p.B + b] * static_cast<float>(dot);
        }
      }
      for (int64_t g = 0; g < p.G; ++g)
        for (int r = 0; r < kRows; ++r) acc[r] += bf16(p.mn[(t * p.G + g) * kRows + r]) * p.xs[m * p.G + g];
      for (int r = 0; r < kRows && t * kRows + r < p.N; ++r) p.y[m * p.N + t * kRows + r] = acc[r];
    }
  }
}

#if FRUGAL_X86
// 8 bf16 -> 8 fp32 (a 16-bit shift).
__attribute__((target("avx2,fma"))) inline __m256 bf16x8(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// Rows 8h .. 8h + 7 of a tile, T activation rows from m0.
template <int T>
__attribute__((target("avx2,fma"))) void half_avx2(const Problem& p, int64_t t, int h, int64_t m0) {
  const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int j = 0; j < T; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.B; ++b) {
    const uint8_t* wb = p.w + (t * p.B + b) * kTileBlock + h * 32;
    __m256i dot[T];
    for (int j = 0; j < T; ++j) dot[j] = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + k * 64));
      const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      for (int j = 0; j < T; ++j) {
        const int8_t* xb = p.xq + (m0 + j) * p.K + b * kBlock;
        const __m256i xl = _mm256_set1_epi32(load4(xb + 4 * k)), xh = _mm256_set1_epi32(load4(xb + 16 + 4 * k));
        const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), ones);
        const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), ones);
        dot[j] = _mm256_add_epi32(dot[j], _mm256_add_epi32(pl, ph));
      }
    }
    const __m256 s = bf16x8(p.s + (t * p.G + (b >> p.shift)) * kRows + h * 8);
    for (int j = 0; j < T; ++j) {
      const __m256 c = _mm256_mul_ps(s, _mm256_set1_ps(p.dx[(m0 + j) * p.B + b]));
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[j]), c, acc[j]);
    }
  }
  for (int64_t g = 0; g < p.G; ++g) {
    const __m256 mv = bf16x8(p.mn + (t * p.G + g) * kRows + h * 8);
    for (int j = 0; j < T; ++j) acc[j] = _mm256_fmadd_ps(mv, _mm256_set1_ps(p.xs[(m0 + j) * p.G + g]), acc[j]);
  }
  const int64_t n0 = t * kRows + h * 8, valid = std::min<int64_t>(8, p.N - n0);
  for (int j = 0; j < T; ++j) {
    float* out = p.y + (m0 + j) * p.N + n0;
    if (valid == 8) {
      _mm256_storeu_ps(out, acc[j]);
    } else if (valid > 0) {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc[j]);
      std::memcpy(out, tmp, valid * sizeof(float));
    }
  }
}

__attribute__((target("avx2,fma"))) void tiles_avx2(const Problem& p, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t)
    for (int h = 0; h < 2; ++h) {
      int64_t m = 0;
      for (; m + kTile <= p.M; m += kTile) half_avx2<kTile>(p, t, h, m);
      switch (p.M - m) {
        case 3: half_avx2<3>(p, t, h, m); break;
        case 2: half_avx2<2>(p, t, h, m); break;
        case 1: half_avx2<1>(p, t, h, m); break;
        default: break;
      }
    }
}

// 16 bf16 -> 16 fp32.
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) inline __m512 bf16x16(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// A whole tile of 16 rows, T activation rows from m0.
template <int T>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) void tile_avx512(const Problem& p, int64_t t,
                                                                                  int64_t m0) {
  const __m512i mask = _mm512_set1_epi8(15);
  __m512 acc[T];
  for (int j = 0; j < T; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < p.B; ++b) {
    const uint8_t* wb = p.w + (t * p.B + b) * kTileBlock;
    __m512i dot[T];
    for (int j = 0; j < T; ++j) dot[j] = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k) {
      const __m512i v = _mm512_loadu_si512(wb + k * 64);
      const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
      for (int j = 0; j < T; ++j) {
        const int8_t* xb = p.xq + (m0 + j) * p.K + b * kBlock;
        dot[j] = _mm512_dpbusd_epi32(dot[j], lo, _mm512_set1_epi32(load4(xb + 4 * k)));
        dot[j] = _mm512_dpbusd_epi32(dot[j], hi, _mm512_set1_epi32(load4(xb + 16 + 4 * k)));
      }
    }
    const __m512 s = bf16x16(p.s + (t * p.G + (b >> p.shift)) * kRows);
    for (int j = 0; j < T; ++j) {
      const __m512 c = _mm512_mul_ps(s, _mm512_set1_ps(p.dx[(m0 + j) * p.B + b]));
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[j]), c, acc[j]);
    }
  }
  for (int64_t g = 0; g < p.G; ++g) {
    const __m512 mv = bf16x16(p.mn + (t * p.G + g) * kRows);
    for (int j = 0; j < T; ++j) acc[j] = _mm512_fmadd_ps(mv, _mm512_set1_ps(p.xs[(m0 + j) * p.G + g]), acc[j]);
  }
  const int64_t n0 = t * kRows, valid = std::min<int64_t>(kRows, p.N - n0);
  const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
  for (int j = 0; j < T; ++j) _mm512_mask_storeu_ps(p.y + (m0 + j) * p.N + n0, keep, acc[j]);
}

__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) void tiles_avx512(const Problem& p, int64_t t0,
                                                                                   int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (; m + kTile <= p.M; m += kTile) tile_avx512<kTile>(p, t, m);
    switch (p.M - m) {
      case 3: tile_avx512<3>(p, t, m); break;
      case 2: tile_avx512<2>(p, t, m); break;
      case 1: tile_avx512<1>(p, t, m); break;
      default: break;
    }
  }
}
#endif  // FRUGAL_X86

}  // namespace

at::Tensor w4a8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& min, int64_t n_out, int64_t group, int64_t level) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "w4a8_linear: x must be a contiguous 2-D fp32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = n_out;
  TORCH_CHECK(group > 0 && group % kBlock == 0 && K % group == 0, "w4a8_linear: K=", K,
              " must split into groups of ", group, ", a multiple of ", kBlock);
  int shift = 0;
  while ((kBlock << shift) < group) ++shift;
  TORCH_CHECK((kBlock << shift) == group, "w4a8_linear: the group size must be 32 times a power of two, not ", group);
  const int64_t B = K / kBlock, G = K / group, tiles = (N + kRows - 1) / kRows;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(0) == tiles && packed.size(1) == B && packed.size(2) == kTileBlock,
              "w4a8_linear: packed must be contiguous uint8 (", tiles, ", ", B, ", ", kTileBlock, ") for N=", N,
              ", K=", K, ", got ", packed.sizes());
  for (const auto* t : {&scale, &min}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 3 && t->size(0) == tiles &&
                    t->size(1) == G && t->size(2) == kRows,
                "w4a8_linear: scale and min must be contiguous bf16 (", tiles, ", ", G, ", ", kRows, "), got ",
                t->sizes());
  }
  TORCH_CHECK(level >= 0 && level <= 2, "w4a8_linear: level must be 0, 1 or 2");
#if FRUGAL_X86
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
#else
  TORCH_CHECK(level == 0, "w4a8_linear: the AVX2 and AVX-512 paths exist only on x86-64");
#endif
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  auto dx = at::empty({M, B}, x.options());
  auto xs = at::empty({M, G}, x.options());
  quantize_x(x.data_ptr<float>(), M, K, shift, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), xs.data_ptr<float>());
  const Problem p{M, N, K, G, B, tiles, shift, packed.data_ptr<uint8_t>(),
                  reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>()),
                  reinterpret_cast<const uint16_t*>(min.data_ptr<at::BFloat16>()), xq.data_ptr<int8_t>(),
                  dx.data_ptr<float>(), xs.data_ptr<float>(), y.data_ptr<float>()};
  // Tiles are independent: split them over torch's threads, at least 16 KiB of weight each.
  const int64_t grain = std::max<int64_t>(1, 16384 / (B * kTileBlock));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
#if FRUGAL_X86
    if (level == 2 && vnni) return tiles_avx512(p, t0, t1);
    if (level >= 1) return tiles_avx2(p, t0, t1);
#endif
    tiles_plain(p, t0, t1);
  });
  return y;
}

TORCH_LIBRARY(frugal_w4a8, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor scale, Tensor min, int n_out, int group, int level) -> Tensor");
}

TORCH_LIBRARY_IMPL(frugal_w4a8, CPU, m) { m.impl("linear", &w4a8_linear); }
