// W4A8 on the CPU: y = x W^T with W in group-wise INT4 and x quantized to INT8 per block of 32 inputs, the
// scheme of llama.cpp's Q4_0 x Q8_0 dot product. kernels/w4a8.py documents the layout, holds the plain torch
// reference and registers these functions as the op frugal::w4a8_linear.
//
// Shapes: x (M, K) fp32; packed (N, K / 2) uint8; scale and min (N, G) bf16 with G = K / group_size.
// Block b of a row (inputs 32b .. 32b + 31) is the 16 bytes at 16b: byte i holds input 32b + i in its low
// nibble and input 32b + 16 + i in its high nibble. The weight is w = q * scale + min (min = zero - 8 scale).
//
// Per call, x is quantized once: xq (int8) and dx (fp32 per block), so that x ~ xq * dx. Then for each output
// row n and block b, the integer dot sum(q * xq) is scaled by scale[n, g(b)] * dx[b], and
// sum_g min[n, g] * xs[g] is added, where xs[g] is the sum of the dequantized x over group g. The result equals
// (xq * dx) W^T up to the order of float additions.
//
// Three paths, chosen by the caller from ATEN_CPU_CAPABILITY (torch's own switch): 0 plain C++, 1 AVX2, 2
// AVX-512 (F, BW, VNNI; a CPU with AVX-512 but without VNNI takes the AVX2 path). Each is compiled for its instruction set with a target attribute, so one build serves every
// CPU, and a path never runs on a CPU torch was told not to use.
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

struct Problem {
  int64_t M, N, K, G, group;
  const uint8_t* w;      // (N, K / 2)
  const uint16_t* s;     // (N, G) bf16 bits
  const uint16_t* mn;    // (N, G) bf16 bits
  const int8_t* xq;      // (M, K), laid out for the path (see quantize_x)
  const float* dx;       // (M, K / 32)
  const float* xs;       // (M, G)
  const float* dxv;      // (M, B / 2, 16): dx per lane of the AVX-512 path
  int shift;             // log2(group / 32): block b is in group b >> shift
  float* y;              // (M, N)
};

inline float bf16(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// x (M, K) -> xq, dx (per block: absmax / 127), xs (per group). For the AVX-512 path (pairs = true) each pair of
// blocks (b, b + 1) is stored as [b 0..15, b+1 0..15, b 16..31, b+1 16..31], the order in which that path
// unpacks 32 weight bytes; an odd last block stays in plain order.
void quantize_x(const float* x, int64_t M, int64_t K, int64_t group, bool pairs, int8_t* xq, float* dx, float* xs) {
  const int64_t B = K / kBlock, G = K / group;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = xq + m * K;
    float* xsr = xs + m * G;
    for (int64_t g = 0; g < G; ++g) xsr[g] = 0.f;
    for (int64_t b = 0; b < B; ++b) {
      const float* v = xr + b * kBlock;
      float amax = 0.f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      dx[m * B + b] = d;
      int8_t q[kBlock];
      int32_t sum = 0;
      for (int i = 0; i < kBlock; ++i) {
        q[i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
        sum += q[i];
      }
      xsr[b * kBlock / group] += d * static_cast<float>(sum);
      const bool paired = pairs && (b + 1 < B || b % 2 == 1);
      if (!paired) {
        std::memcpy(qr + b * kBlock, q, kBlock);
      } else {
        int8_t* base = qr + (b / 2) * 2 * kBlock;
        const int64_t off = (b % 2) * 16;
        std::memcpy(base + off, q, 16);
        std::memcpy(base + 32 + off, q + 16, 16);
      }
    }
  }
}

float min_term(const Problem& p, int64_t n, int64_t m) {
  const uint16_t* mn = p.mn + n * p.G;
  const float* xs = p.xs + m * p.G;
  float acc = 0.f;
  for (int64_t g = 0; g < p.G; ++g) acc += bf16(mn[g]) * xs[g];
  return acc;
}

void rows_plain(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t B = p.K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = p.w + n * p.K / 2;
    const uint16_t* s = p.s + n * p.G;
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* xq = p.xq + m * p.K;
      const float* dx = p.dx + m * B;
      float acc = 0.f;
      for (int64_t b = 0; b < B; ++b) {
        const uint8_t* wb = w + b * 16;
        const int8_t* xb = xq + b * kBlock;
        int32_t dot = 0;
        for (int i = 0; i < 16; ++i) dot += (wb[i] & 15) * xb[i] + (wb[i] >> 4) * xb[16 + i];
        acc += bf16(s[b >> p.shift]) * dx[b] * static_cast<float>(dot);
      }
      p.y[m * p.N + n] = acc + min_term(p, n, m);
    }
  }
}

#if FRUGAL_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One block's 16 bytes -> its 32 values 0..15 in input order (low nibbles, then high nibbles).
__attribute__((target("avx2,fma"))) inline __m256i unpack_block(const uint8_t* wb) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb));
  const __m128i mask = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

// sum_g min[n, g] * xs[m, g], 8 groups at a time (bf16 -> fp32 is a 16-bit shift).
__attribute__((target("avx2,fma"))) float min_term_avx2(const Problem& p, int64_t n, int64_t m) {
  const uint16_t* mn = p.mn + n * p.G;
  const float* xs = p.xs + m * p.G;
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= p.G; g += 8) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + g));
    const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    acc = _mm256_fmadd_ps(v, _mm256_loadu_ps(xs + g), acc);
  }
  float total = hsum256(acc);
  for (; g < p.G; ++g) total += bf16(mn[g]) * xs[g];
  return total;
}

// The weight of a row is unpacked once per block and multiplied by up to kTile activation rows at a time, so
// that a batch of M rows reads each weight byte once and pays the unpacking once per kTile rows.
constexpr int kTile = 4;

template <int T>
__attribute__((target("avx2,fma"))) void tile_avx2(const Problem& p, int64_t n, int64_t m0) {
  const int64_t B = p.K / kBlock;
  const uint8_t* w = p.w + n * p.K / 2;
  const uint16_t* s = p.s + n * p.G;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const __m256i wv = unpack_block(w + b * 16);
    const __m256 sv = _mm256_set1_ps(bf16(s[b >> p.shift]));
    for (int t = 0; t < T; ++t) {
      const int64_t m = m0 + t;
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + m * p.K + b * kBlock));
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
      const __m256 c = _mm256_mul_ps(sv, _mm256_broadcast_ss(p.dx + m * B + b));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), c, acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) p.y[(m0 + t) * p.N + n] = hsum256(acc[t]) + min_term_avx2(p, n, m0 + t);
}

__attribute__((target("avx2,fma"))) void rows_avx2(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + kTile <= p.M; m += kTile) tile_avx2<kTile>(p, n, m);
    switch (p.M - m) {
      case 3: tile_avx2<3>(p, n, m); break;
      case 2: tile_avx2<2>(p, n, m); break;
      case 1: tile_avx2<1>(p, n, m); break;
      default: break;
    }
  }
}

// Pairs of blocks: 32 weight bytes, low nibbles then high nibbles, against 64 int8 inputs in quantize_x's paired
// order. Of the 16 int32 lanes (4 inputs each), 0-3 and 8-11 belong to block 2q, 4-7 and 12-15 to block 2q + 1;
// `dxv` holds each lane's activation scale in that pattern.
template <int T, bool kOneScale>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) void tile_avx512(const Problem& p, int64_t n, int64_t m0) {
  const int64_t B = p.K / kBlock, pairs = B / 2;
  const uint8_t* w = p.w + n * p.K / 2;
  const uint16_t* s = p.s + n * p.G;
  const __m256i mask = _mm256_set1_epi8(15);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t q = 0; q < pairs; ++q) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * 32));
    const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    const int64_t b = 2 * q;
    // The two blocks' weight scales, bf16 -> fp32 by a shift: lanes of block 2q take s[2q >> shift], the others
    // s[(2q + 1) >> shift]; with groups of 64 inputs or more (kOneScale) the two are the same.
    const __m512 sv = kOneScale ? _mm512_set1_ps(bf16(s[b >> p.shift]))
                                : _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(bf16(s[b])), _mm512_set1_ps(bf16(s[b + 1])));
    for (int t = 0; t < T; ++t) {
      const int64_t m = m0 + t;
      const __m512i xv = _mm512_loadu_si512(p.xq + m * p.K + q * 64);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);  // u8 x s8, 4 per lane
      const __m512 c = _mm512_mul_ps(sv, _mm512_loadu_ps(p.dxv + (m * pairs + q) * 16));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), c, acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    const int64_t m = m0 + t;
    float total = _mm512_reduce_add_ps(acc[t]);
    if (B % 2) {  // an odd last block, in plain order
      const int64_t b = B - 1;
      const __m256i wv = unpack_block(w + b * 16);
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + m * p.K + b * kBlock));
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), _mm256_set1_epi16(1));
      total += hsum256(_mm256_cvtepi32_ps(dot)) * bf16(s[b >> p.shift]) * p.dx[m * B + b];
    }
    p.y[m * p.N + n] = total + min_term_avx2(p, n, m);
  }
}

template <bool kOneScale>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma"))) void rows_avx512(const Problem& p, int64_t n0,
                                                                                  int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + kTile <= p.M; m += kTile) tile_avx512<kTile, kOneScale>(p, n, m);
    switch (p.M - m) {
      case 3: tile_avx512<3, kOneScale>(p, n, m); break;
      case 2: tile_avx512<2, kOneScale>(p, n, m); break;
      case 1: tile_avx512<1, kOneScale>(p, n, m); break;
      default: break;
    }
  }
}

#endif  // FRUGAL_X86

}  // namespace

at::Tensor w4a8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const at::Tensor& min, int64_t group, int64_t level) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "w4a8_linear: x must be a contiguous 2-D fp32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "w4a8_linear: packed must be a contiguous 2-D uint8 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(group > 0 && group % kBlock == 0 && K % group == 0, "w4a8_linear: K=", K,
              " must split into groups of ", group, ", a multiple of ", kBlock);
  TORCH_CHECK(packed.size(1) * 2 == K, "w4a8_linear: packed has ", packed.size(1), " bytes per row for K=", K);
  const int64_t G = K / group;
  for (const auto* t : {&scale, &min}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == G,
                "w4a8_linear: scale and min must be contiguous bf16 (", N, ", ", G, "), got ", t->sizes());
  }
  TORCH_CHECK(level >= 0 && level <= 2, "w4a8_linear: level must be 0, 1 or 2");
#if !FRUGAL_X86
  TORCH_CHECK(level == 0, "w4a8_linear: the AVX2 and AVX-512 paths exist only on x86-64");
#endif
#if FRUGAL_X86
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  const bool wide = level == 2 && vnni;  // the AVX-512 path
#else
  const bool wide = false;
#endif
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  auto dx = at::empty({M, K / kBlock}, x.options());
  auto xs = at::empty({M, G}, x.options());
  quantize_x(x.data_ptr<float>(), M, K, group, wide, xq.data_ptr<int8_t>(), dx.data_ptr<float>(),
             xs.data_ptr<float>());
  // The AVX-512 path's activation scales, one per int32 lane: [dx_2q x4, dx_2q+1 x4, dx_2q x4, dx_2q+1 x4].
  const int64_t B = K / kBlock, pairs = B / 2;
  auto dxv = at::empty({M, pairs, 16}, x.options());
  if (wide) {
    const float* d = dx.data_ptr<float>();
    float* v = dxv.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t q = 0; q < pairs; ++q)
        for (int lane = 0; lane < 16; ++lane) v[(m * pairs + q) * 16 + lane] = d[m * B + 2 * q + (lane / 4) % 2];
  }
  int shift = 0;
  while ((kBlock << shift) < group) ++shift;
  TORCH_CHECK((kBlock << shift) == group, "w4a8_linear: the group size must be 32 times a power of two, not ", group);
  const Problem p{M, N, K, G, group, packed.data_ptr<uint8_t>(),
                  reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>()),
                  reinterpret_cast<const uint16_t*>(min.data_ptr<at::BFloat16>()), xq.data_ptr<int8_t>(),
                  dx.data_ptr<float>(), xs.data_ptr<float>(), dxv.data_ptr<float>(), shift, y.data_ptr<float>()};
  // Rows are independent: split them over torch's threads, a few cache lines' worth of work each at least.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, M * K / 64));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#if FRUGAL_X86
    if (wide) return shift ? rows_avx512<true>(p, n0, n1) : rows_avx512<false>(p, n0, n1);
    if (level >= 1) return rows_avx2(p, n0, n1);
#endif
    rows_plain(p, n0, n1);
  });
  return y;
}

TORCH_LIBRARY(frugal_w4a8, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor scale, Tensor min, int group, int level) -> Tensor");
}

TORCH_LIBRARY_IMPL(frugal_w4a8, CPU, m) { m.impl("linear", &w4a8_linear); }
