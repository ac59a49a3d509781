// The grouped quantized matrix product (stage/quantized.py calls it): out [M, N] = x [M, K] · wᵀ (+ bias), where each
// weight is w = scale · q + offset, with one scale (and, for formats that have them, one offset) per group of G
// consecutive weights of an output row. Two layouts of q:
// - int8: [N, K] signed bytes (GGUF's Q8_0, Q5_0, Q4_0, Q5_K, G = 32; Q6_K, G = 16);
// - int4: [N, K / 2] bytes, per block of 32 sixteen bytes, byte j holding q[j] in its low and q[j + 16] in its high
//   nibble, q in 0..15 (GGUF's Q4_K, with an offset per group). A group is one block (G = 32), or four (S = 4:
//   GPTQ's and AWQ's groups of 128, a quarter of the scale and offset bytes).
// Few rows (decode): each output row's groups are turned into floats once, in registers, and multiplied into up to
// RT rows of x at once, so the packed weights are read from memory once per call (the product is bound by that read).
// Many rows (prefill chunks): tiles of weight rows are dequantized into a float buffer and multiplied with at::mm.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>

constexpr int64_t DENSE_ROWS = 24;   // from this many rows of x on, dequantize tiles and use at::mm (bench/quantized.py)
constexpr int64_t DENSE_TILE = 512;  // weight rows per dequantized tile
// Few rows: weights are prefetched this many bytes ahead of the group being multiplied (the next rows' bytes: rows lie
// one after another). 4 KiB gave 1.3-2.1x at one row over the hardware prefetcher alone (bench/quantized.py's shapes).
#ifndef PREFETCH
#define PREFETCH 4096
#endif

// One group's G weights as floats.
template <int G, bool I4>
static inline void group_values(const uint8_t* q, float scale, float offset, float* w) {
  if constexpr (I4) {
    for (int j = 0; j < G / 2; ++j) {
      w[j] = scale * static_cast<float>(q[j] & 15) + offset;
      w[j + G / 2] = scale * static_cast<float>(q[j] >> 4) + offset;
    }
  } else {
    const int8_t* s = reinterpret_cast<const int8_t*>(q);
    for (int j = 0; j < G; ++j) w[j] = scale * static_cast<float>(s[j]) + offset;
  }
}

#if defined(__AVX512F__)
#include <immintrin.h>
constexpr int64_t RT = 8;  // rows of x per pass over the weights

// The group's G / 16 vectors of weights: q (int8, or 0..15 nibbles) → scale · q + offset.
template <int G, bool I4>
static inline void group_vectors(const uint8_t* q, float scale, float offset, __m512* w) {
  const __m512 s = _mm512_set1_ps(scale), o = _mm512_set1_ps(offset);
  if constexpr (I4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), s, o);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), s, o);
  } else {
    for (int k = 0; k < G / 16; ++k) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * k));
      w[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), s, o);
    }
  }
}

// R rows of x (row stride ldx) times one weight row: R dot products of length K. Each row keeps U · V sums (one row:
// four), indexed by constants so that they stay in registers, which keeps the FMAs' latency chains short.
template <int G, bool I4, int S, int R>
static inline void dot_rows(const float* x, int64_t ldx, const uint8_t* qrow, const float* sc, const float* off,
                            int64_t K, float* sums) {
  constexpr int64_t QB = I4 ? G / 2 : G;
  constexpr int V = G / 16;              // vectors per group
  constexpr int U = R == 1 ? 4 / V : 1;  // groups per step
  __m512 acc[R][U * V], w[V];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < U * V; ++a) acc[r][a] = _mm512_setzero_ps();
  const int64_t NG = K / G;
  auto step = [&](int64_t g, int u) {
    if ((g * QB) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(qrow + g * QB + PREFETCH), _MM_HINT_T0);
    group_vectors<G, I4>(qrow + g * QB, sc[g / S], off ? off[g / S] : 0.f, w);
    for (int k = 0; k < V; ++k)
      for (int r = 0; r < R; ++r)
        acc[r][u * V + k] = _mm512_fmadd_ps(w[k], _mm512_loadu_ps(x + r * ldx + g * G + 16 * k), acc[r][u * V + k]);
  };
  int64_t g = 0;
  for (; g + U <= NG; g += U)
    for (int u = 0; u < U; ++u) step(g + u, u);
  for (; g < NG; ++g) step(g, 0);
  for (int r = 0; r < R; ++r) {
    __m512 t = acc[r][0];
    for (int a = 1; a < U * V; ++a) t = _mm512_add_ps(t, acc[r][a]);
    sums[r] = _mm512_reduce_add_ps(t);
  }
}

// Eight rows of x times two weight rows at once: each row of x loaded is used twice, each weight vector eight times.
template <int G, bool I4, int S>
static inline void dot_8x2(const float* x, int64_t ldx, const uint8_t* const q[2], const float* const sc[2],
                           const float* const off[2], int64_t K, float* sums) {
  constexpr int64_t QB = I4 ? G / 2 : G;
  __m512 acc[8][2], w[2][G / 16];
  for (int r = 0; r < 8; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / G; ++g) {
    if ((g * QB) % 64 == 0)
      for (int j = 0; j < 2; ++j) _mm_prefetch(reinterpret_cast<const char*>(q[j] + g * QB + PREFETCH), _MM_HINT_T0);
    for (int j = 0; j < 2; ++j) group_vectors<G, I4>(q[j] + g * QB, sc[j][g / S], off[j] ? off[j][g / S] : 0.f, w[j]);
    for (int k = 0; k < G / 16; ++k)
      for (int r = 0; r < 8; ++r) {
        const __m512 xv = _mm512_loadu_ps(x + r * ldx + g * G + 16 * k);
        acc[r][0] = _mm512_fmadd_ps(w[0][k], xv, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(w[1][k], xv, acc[r][1]);
      }
  }
  for (int r = 0; r < 8; ++r) {
    sums[2 * r] = _mm512_reduce_add_ps(acc[r][0]);
    sums[2 * r + 1] = _mm512_reduce_add_ps(acc[r][1]);
  }
}
#define HAVE_AVX512_PATH 1  // dot_8x2 and the vector dequantization below
#elif defined(__AVX2__)
#include <immintrin.h>
constexpr int64_t RT = 4;  // rows of x per pass over the weights

// Eight weights as floats: q (int8, or 0..15 nibbles already split into bytes) → scale · q + offset.
static inline __m256 eight(__m128i bytes8, bool is_signed, __m256 scale, __m256 offset) {
  const __m256i ints = is_signed ? _mm256_cvtepi8_epi32(bytes8) : _mm256_cvtepu8_epi32(bytes8);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), scale, offset);
}

// The group's G / 8 vectors of weights.
template <int G, bool I4>
static inline void group_vectors(const uint8_t* q, float scale, float offset, __m256* w) {
  const __m256 s = _mm256_set1_ps(scale), o = _mm256_set1_ps(offset);
  if constexpr (I4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    w[0] = eight(lo, false, s, o);
    w[1] = eight(_mm_srli_si128(lo, 8), false, s, o);
    w[2] = eight(hi, false, s, o);
    w[3] = eight(_mm_srli_si128(hi, 8), false, s, o);
  } else {
    for (int k = 0; k < G / 8; ++k)
      w[k] = eight(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * k)), true, s, o);
  }
}

static inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// R rows of x (row stride ldx) times one weight row: R dot products of length K. A accumulators per row keep the
// FMAs' latency chains short.
template <int G, bool I4, int S, int R>
static inline void dot_rows(const float* x, int64_t ldx, const uint8_t* qrow, const float* sc, const float* off,
                            int64_t K, float* sums) {
  constexpr int64_t QB = I4 ? G / 2 : G;
  constexpr int A = R == 1 ? 4 : 2;
  __m256 acc[R][A], w[G / 8];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / G; ++g) {
    if ((g * QB) % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(qrow + g * QB + PREFETCH), _MM_HINT_T0);
    group_vectors<G, I4>(qrow + g * QB, sc[g / S], off ? off[g / S] : 0.f, w);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + g * G;
      for (int k = 0; k < G / 8; ++k) acc[r][k % A] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xr + 8 * k), acc[r][k % A]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 t = acc[r][0];
    for (int a = 1; a < A; ++a) t = _mm256_add_ps(t, acc[r][a]);
    sums[r] = horizontal_sum(t);
  }
}
#else
// Without AVX2: the same in plain C++, left to the compiler.
constexpr int64_t RT = 4;
template <int G, bool I4, int S, int R>
static inline void dot_rows(const float* x, int64_t ldx, const uint8_t* qrow, const float* sc, const float* off,
                            int64_t K, float* sums) {
  constexpr int64_t QB = I4 ? G / 2 : G;
  float acc[R][G] = {};
  float w[G];
  for (int64_t g = 0; g < K / G; ++g) {
    group_values<G, I4>(qrow + g * QB, sc[g / S], off ? off[g / S] : 0.f, w);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + g * G;
      for (int j = 0; j < G; ++j) acc[r][j] += w[j] * xr[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int j = 0; j < G; ++j) s += acc[r][j];
    sums[r] = s;
  }
}
#endif

// Rows m .. m + R - 1 of x times weight rows [begin, end).
template <int G, bool I4, int S, int R>
static void row_block(const float* xp, const uint8_t* q, const float* sc, const float* off, int64_t m, int64_t begin,
                      int64_t end, int64_t N, int64_t K, float* op) {
  const int64_t QB = I4 ? K / 2 : K, NS = K / (G * S);  // bytes and scales per weight row
  float sums[R];
  for (int64_t n = begin; n < end; ++n) {
    dot_rows<G, I4, S, R>(xp + m * K, K, q + n * QB, sc + n * NS, off ? off + n * NS : nullptr, K, sums);
    for (int r = 0; r < R; ++r) op[(m + r) * N + n] = sums[r];
  }
}

#ifdef HAVE_AVX512_PATH
// Rows m .. m + 7 of x times weight rows [begin, end), two weight rows at a time.
template <int G, bool I4, int S>
static void row_block_8x2(const float* xp, const uint8_t* q, const float* sc, const float* off, int64_t m,
                          int64_t begin, int64_t end, int64_t N, int64_t K, float* op) {
  const int64_t QB = I4 ? K / 2 : K, NS = K / (G * S);
  float sums[16];
  int64_t n = begin;
  for (; n + 2 <= end; n += 2) {
    const uint8_t* qs[2] = {q + n * QB, q + (n + 1) * QB};
    const float* scs[2] = {sc + n * NS, sc + (n + 1) * NS};
    const float* offs[2] = {off ? off + n * NS : nullptr, off ? off + (n + 1) * NS : nullptr};
    dot_8x2<G, I4, S>(xp + m * K, K, qs, scs, offs, K, sums);
    for (int r = 0; r < 8; ++r) {
      op[(m + r) * N + n] = sums[2 * r];
      op[(m + r) * N + n + 1] = sums[2 * r + 1];
    }
  }
  if (n < end) row_block<G, I4, S, 8>(xp, q, sc, off, m, n, end, N, K, op);
}
#endif

template <int G, bool I4, int S>
static void few_rows(const at::Tensor& x, const uint8_t* q, const float* sc, const float* off, int64_t N, int64_t K,
                     at::Tensor& out) {
  const int64_t M = x.size(0);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    int64_t m = 0;
#ifdef HAVE_AVX512_PATH
    for (; m + 8 <= M; m += 8) row_block_8x2<G, I4, S>(xp, q, sc, off, m, begin, end, N, K, op);
#endif
    for (; m + RT <= M; m += RT) row_block<G, I4, S, RT>(xp, q, sc, off, m, begin, end, N, K, op);
    if constexpr (RT > 4)
      for (; m + 4 <= M; m += 4) row_block<G, I4, S, 4>(xp, q, sc, off, m, begin, end, N, K, op);
    for (; m + 2 <= M; m += 2) row_block<G, I4, S, 2>(xp, q, sc, off, m, begin, end, N, K, op);
    for (; m < M; ++m) row_block<G, I4, S, 1>(xp, q, sc, off, m, begin, end, N, K, op);
  });
}

template <int G, bool I4, int S>
static void dequantize_rows(const uint8_t* q, const float* sc, const float* off, int64_t n0, int64_t n1, int64_t K,
                            float* dst) {
  const int64_t QB = I4 ? K / 2 : K, NG = K / G, NS = NG / S, GB = I4 ? G / 2 : G;
  at::parallel_for(n0, n1, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t g = 0; g < NG; ++g) {
        const uint8_t* qg = q + n * QB + g * GB;
        const float s = sc[n * NS + g / S], o = off ? off[n * NS + g / S] : 0.f;
        float* out = dst + (n - n0) * K + g * G;
#ifdef HAVE_AVX512_PATH
        __m512 w[G / 16];
        group_vectors<G, I4>(qg, s, o, w);
        for (int k = 0; k < G / 16; ++k) _mm512_storeu_ps(out + 16 * k, w[k]);
#else
        group_values<G, I4>(qg, s, o, out);
#endif
      }
  });
}

template <int G, bool I4, int S>
static void many_rows(const at::Tensor& x, const uint8_t* q, const float* sc, const float* off, int64_t N, int64_t K,
                      at::Tensor& out) {
  at::Tensor tile = at::empty({std::min(DENSE_TILE, N), K}, at::kFloat);
  for (int64_t n0 = 0; n0 < N; n0 += DENSE_TILE) {
    const int64_t n1 = std::min(N, n0 + DENSE_TILE);
    dequantize_rows<G, I4, S>(q, sc, off, n0, n1, K, tile.data_ptr<float>());
    out.narrow(1, n0, n1 - n0).copy_(at::mm(x, tile.narrow(0, 0, n1 - n0).t()));
  }
}

template <int G, bool I4, int S>
static void product(const at::Tensor& x, const uint8_t* q, const float* sc, const float* off, int64_t N, int64_t K,
                    at::Tensor& out) {
  if (x.size(0) >= DENSE_ROWS)
    many_rows<G, I4, S>(x, q, sc, off, N, K, out);
  else
    few_rows<G, I4, S>(x, q, sc, off, N, K, out);
}

// x: [M, K] float32; qweight: int8 [N, K] or uint8 [N, K / 2] (int4); scales, offsets: float32 [N, K / group] (offsets
// may be empty: none); bias: float32 [N] or empty.
at::Tensor quant_linear(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor offsets, at::Tensor bias,
                        int64_t group, bool int4) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x: float32 [rows, in]");
  x = x.contiguous();
  const int64_t K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.is_contiguous() && qweight.element_size() == 1 && qweight.size(1) == (int4 ? K / 2 : K),
              "qweight: [out, in] bytes (int8) or [out, in / 2] (int4)");
  TORCH_CHECK(group == 32 || (group == 128 && int4) || (group == 16 && !int4), "group: 32, or 128 for int4, 16 for int8");
  TORCH_CHECK(K % group == 0, "in features must be a multiple of the group size");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * (K / group), "scales");
  const bool has_off = offsets.numel() > 0;
  TORCH_CHECK(!has_off || (offsets.scalar_type() == at::kFloat && offsets.is_contiguous() && offsets.numel() == N * (K / group)),
              "offsets");
  at::Tensor out = at::empty({x.size(0), N}, at::kFloat);
  const uint8_t* q = static_cast<const uint8_t*>(qweight.data_ptr());
  const float* sc = scales.data_ptr<float>();
  const float* off = has_off ? offsets.data_ptr<float>() : nullptr;
  if (int4 && group == 128)
    product<32, true, 4>(x, q, sc, off, N, K, out);  // GPTQ's and AWQ's groups of 128: a scale per four blocks
  else if (int4)
    product<32, true, 1>(x, q, sc, off, N, K, out);
  else if (group == 32)
    product<32, false, 1>(x, q, sc, off, N, K, out);
  else
    product<16, false, 1>(x, q, sc, off, N, K, out);
  if (bias.numel() > 0) out.add_(bias);
  return out;
}
