// Attention over the paged KV cache (stage/paged_attention.py calls it).
// One work item per (sequence, chunk of 128 context tokens), as flash-decoding splits a context, so that a batch of
// one still uses every thread. A chunk's keys and values are copied from their blocks into two small contiguous tiles
// (half a MiB each at the 32B shape: they stay in cache, and each token's row of every KV head is read in one run),
// scored and weighted by two batched matrix products per chunk; the chunks' partial softmaxes are merged at the end.
// Measured at the 32B shape (bench/attention.py): 128-token chunks beat 64, 256 and 512, and the tiles with matrix
// products beat dot products straight off the blocks (2.3-2.5x the K/V-read floor).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

constexpr int64_t CHUNK = 128;  // context tokens per work item: a batch of one still spreads over every thread

template <typename T>
static void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
                   const at::Tensor& lens, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2), G = H / KVH, max_blocks = tables.size(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t token_stride = KVH * D, block_stride = BS * KVH * D;
  const float s = static_cast<float>(scale);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max(max_len, lp[b]);
  const int64_t NC = std::max<int64_t>(1, (max_len + CHUNK - 1) / CHUNK);
  // Each chunk's partial result: its running max and sum of exponentials per head, and its weighted V.
  std::vector<float> part_acc(B * NC * H * D), part_max(B * NC * H), part_sum(B * NC * H, 0.f);
  at::parallel_for(0, B * NC, 1, [&](int64_t begin, int64_t end) {
    // The chunk's keys and values copied into two contiguous [KVH, n, D] tiles (they stay in cache), then per KV head
    // two small matrix products: scores [G, n] = q [G, D] x K^T, and acc [G, D] = p [G, n] x V.
    at::Tensor kt = at::empty({KVH, CHUNK, D}, at::kFloat), vt = at::empty({KVH, CHUNK, D}, at::kFloat);
    float* ktp = kt.data_ptr<float>();
    float* vtp = vt.data_ptr<float>();
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / NC, c = w % NC, t0 = c * CHUNK, t1 = std::min(lp[b], t0 + CHUNK), n = t1 - t0;
      float* acc = part_acc.data() + w * H * D;
      float* top = part_max.data() + w * H;
      float* total = part_sum.data() + w * H;
      if (n <= 0) continue;  // this sequence is shorter: an empty part (sum 0)
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = t0 + t, off = tp[b * max_blocks + pos / BS] * block_stride + (pos % BS) * token_stride;
        for (int64_t kh = 0; kh < KVH; ++kh) {
          for (int64_t d = 0; d < D; ++d) {
            ktp[(kh * CHUNK + t) * D + d] = static_cast<float>(kp[off + kh * D + d]);
            vtp[(kh * CHUNK + t) * D + d] = static_cast<float>(vp[off + kh * D + d]);
          }
        }
      }
      at::Tensor qg = q[b].view({KVH, G, D});
      at::Tensor scores = at::bmm(qg, kt.narrow(1, 0, n).transpose(1, 2)).mul_(s);  // [KVH, G, n]
      at::Tensor m = std::get<0>(scores.max(2, true));
      at::Tensor e = (scores - m).exp_();
      at::Tensor sums = e.sum(2);
      at::Tensor a = at::bmm(e, vt.narrow(1, 0, n));  // [KVH, G, D]
      std::copy(a.data_ptr<float>(), a.data_ptr<float>() + H * D, acc);
      std::copy(m.data_ptr<float>(), m.data_ptr<float>() + H, top);
      std::copy(sums.data_ptr<float>(), sums.data_ptr<float>() + H, total);
    }
  });
  // Merge the chunks of each (sequence, head), rescaled to their common maximum.
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / H, h = w % H;
      float m = std::numeric_limits<float>::lowest();
      for (int64_t c = 0; c < NC; ++c)
        if (part_sum[(b * NC + c) * H + h] > 0.f) m = std::max(m, part_max[(b * NC + c) * H + h]);
      float* o = op + (b * H + h) * D;
      std::fill(o, o + D, 0.f);
      float total = 0.f;
      for (int64_t c = 0; c < NC; ++c) {
        const int64_t i = (b * NC + c) * H + h;
        if (part_sum[i] <= 0.f) continue;
        const float f = std::exp(part_max[i] - m);
        total += f * part_sum[i];
        const float* a = part_acc.data() + i * D;
        for (int64_t d = 0; d < D; ++d) o[d] += f * a[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= total;
    }
  });
}

constexpr int64_t QUERY_TILE = 128;  // query positions per work item: with its G heads, the rows of one matrix product

// A prefill chunk's queries (positions start .. start + n - 1) over the sequence's cache, its own keys included: one work
// item per (KV head, tile of queries), walking the keys in CHUNK-token tiles copied out of their blocks, with an online
// softmax (flash attention's), so that no context is ever materialised.
template <typename T>
static void prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& blocks,
                    int64_t start, double scale, at::Tensor& out) {
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2), G = H / KVH;
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* bp = blocks.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t token_stride = KVH * D, block_stride = BS * KVH * D;
  const float s = static_cast<float>(scale);
  const int64_t tiles = (n + QUERY_TILE - 1) / QUERY_TILE;
  at::parallel_for(0, KVH * tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor kt = at::empty({CHUNK, D}, at::kFloat), vt = at::empty({CHUNK, D}, at::kFloat);
    float* ktp = kt.data_ptr<float>();
    float* vtp = vt.data_ptr<float>();
    for (int64_t w = begin; w < end; ++w) {
      const int64_t kh = w / tiles, i0 = (w % tiles) * QUERY_TILE, qn = std::min(QUERY_TILE, n - i0), M = qn * G;
      // Rows (query i, head g) of this KV head's group: [qn * G, D]; row r is query i0 + r / G.
      at::Tensor qm = q.narrow(0, i0, qn).narrow(1, kh * G, G).reshape({M, D}).contiguous();
      at::Tensor acc = at::zeros({M, D}, at::kFloat);
      std::vector<float> row_max(M, -std::numeric_limits<float>::infinity()), row_sum(M, 0.f);
      const int64_t last_key = start + i0 + qn;  // keys [0, last_key) reach some query of the tile
      for (int64_t t0 = 0; t0 < last_key; t0 += CHUNK) {
        const int64_t t1 = std::min(last_key, t0 + CHUNK), m = t1 - t0;
        for (int64_t t = 0; t < m; ++t) {
          const int64_t pos = t0 + t, off = bp[pos / BS] * block_stride + (pos % BS) * token_stride + kh * D;
          for (int64_t d = 0; d < D; ++d) {
            ktp[t * D + d] = static_cast<float>(kp[off + d]);
            vtp[t * D + d] = static_cast<float>(vp[off + d]);
          }
        }
        at::Tensor scores = at::mm(qm, kt.narrow(0, 0, m).t());  // [M, m]
        float* sp = scores.data_ptr<float>();
        float* ap = acc.data_ptr<float>();
        for (int64_t r = 0; r < M; ++r) {
          const int64_t visible = std::min(m, start + i0 + r / G + 1 - t0);  // causal: keys up to the query's own position
          float* row = sp + r * m;
          float top = row_max[r];
#pragma omp simd reduction(max : top)
          for (int64_t j = 0; j < visible; ++j) top = row[j] * s > top ? row[j] * s : top;
          const float rescale = exp_neg(row_max[r] - top);
          float total = 0.f;
#pragma omp simd reduction(+ : total)
          for (int64_t j = 0; j < visible; ++j) {
            row[j] = exp_neg(row[j] * s - top);
            total += row[j];
          }
          for (int64_t j = std::max<int64_t>(visible, 0); j < m; ++j) row[j] = 0.f;
          row_sum[r] = row_sum[r] * rescale + total;
          row_max[r] = top;
          float* a = ap + r * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= rescale;
        }
        acc.addmm_(scores, vt.narrow(0, 0, m));  // acc += p [M, m] x V [m, D]
      }
      const float* ap = acc.data_ptr<float>();
      for (int64_t r = 0; r < M; ++r) {
        const int64_t i = i0 + r / G, h = kh * G + r % G;
        float* o = op + (i * H + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = ap[r * D + d] / row_sum[r];
      }
    }
  });
}

at::Tensor paged_prefill(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor blocks, int64_t start, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "shapes");
  TORCH_CHECK(q.scalar_type() == at::kFloat && blocks.scalar_type() == at::kLong, "dtypes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(), "cache layout");
  TORCH_CHECK(blocks.numel() * k_cache.size(1) >= start + q.size(0), "the blocks do not cover the chunk's positions");
  q = q.contiguous();
  blocks = blocks.contiguous();
  at::Tensor out = at::empty_like(q);
  by_dtype(k_cache.scalar_type(), "cache", [&](auto t) { prefill<decltype(t)>(q, k_cache, v_cache, blocks, start, scale, out); });
  return out;
}

at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor tables, at::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "shapes");
  TORCH_CHECK(q.scalar_type() == at::kFloat && tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "dtypes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(), "cache layout");
  q = q.contiguous();
  tables = tables.contiguous();
  lens = lens.contiguous();
  at::Tensor out = at::empty_like(q);
  by_dtype(k_cache.scalar_type(), "cache", [&](auto t) { decode<decltype(t)>(q, k_cache, v_cache, tables, lens, scale, out); });
  return out;
}
