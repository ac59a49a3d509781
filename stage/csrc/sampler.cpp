// One pass over each row of logits for the batched sampler (stage/sampler_kernel.py calls it).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr int64_t BLOCK = 256;  // terms summed in float (vectorised) before adding to a double: accurate and fast

// sum of exp((x[j] - m) * s) over the row
static double mass(const float* __restrict x, int64_t V, float m, float s) {
  double total = 0.0;
  for (int64_t b = 0; b < V; b += BLOCK) {
    const int64_t e = std::min(V, b + BLOCK);
    float part = 0.f;
#pragma omp simd reduction(+ : part)
    for (int64_t j = b; j < e; ++j) part += exp_neg((x[j] - m) * s);
    total += part;
  }
  return total;
}

static float row_max(const float* __restrict x, int64_t V) {
  float m = NEG_INF;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// The n largest values offered and their indices, largest first; among equal values the smallest index first.
// Offers above the current threshold gather unsorted in a buffer of 2n; a full buffer keeps its best n (nth_element),
// which raises the threshold: amortised O(1) per offer whatever n is.
struct Top {
  int64_t n;
  float* out_v;
  int64_t* out_i;
  std::vector<std::pair<float, int64_t>>& buf;
  bool compacted = false;
  float threshold = NEG_INF;
  int64_t threshold_index = 0;
  static bool before(const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  }
  Top(int64_t n, float* v, int64_t* i, std::vector<std::pair<float, int64_t>>& buf) : n(n), out_v(v), out_i(i), buf(buf) { buf.clear(); }
  void offer(float x, int64_t idx) {
    if (x != x) return;  // NaN never enters
    if (compacted && !before({x, idx}, {threshold, threshold_index})) return;
    buf.emplace_back(x, idx);
    if (static_cast<int64_t>(buf.size()) >= 2 * n) compact();
  }
  void compact() {
    std::nth_element(buf.begin(), buf.begin() + (n - 1), buf.end(), before);
    buf.resize(n);
    compacted = true;
    threshold = buf[n - 1].first;
    threshold_index = buf[n - 1].second;
  }
  void finish() {  // the best n, sorted, into the outputs (rows with fewer values keep -inf, -1 after them)
    if (static_cast<int64_t>(buf.size()) > n) compact();
    std::sort(buf.begin(), buf.end(), before);
    for (size_t k = 0; k < buf.size(); ++k) {
      out_v[k] = buf[k].first;
      out_i[k] = buf[k].second;
    }
  }
};

// Offers x[0..V) in index order to `a` and to `b` (either may be null), to `b` except the indices marked in `b_skip`:
// one read of the row for both.
static void scan_tops(const float* __restrict x, int64_t V, Top* a, Top* b, const uint64_t* b_skip) {
  constexpr int64_t W = 32;  // a block whose maximum cannot enter is skipped whole (the usual case after the first few)
  for (int64_t j = 0; j < V; j += W) {
    const int64_t e = std::min(V, j + W);
    float m = NEG_INF;
#pragma omp simd reduction(max : m)
    for (int64_t k = j; k < e; ++k) m = x[k] > m ? x[k] : m;
    // An equal value comes later than a threshold's own: it cannot enter.
    const bool to_a = a != nullptr && (!a->compacted || m > a->threshold);
    const bool to_b = b != nullptr && (!b->compacted || m > b->threshold);
    if (!to_a && !to_b) continue;
    for (int64_t k = j; k < e; ++k) {
      if (to_a) a->offer(x[k], k);
      if (to_b && (b_skip == nullptr || !((b_skip[k >> 6] >> (k & 63)) & 1))) b->offer(x[k], k);
    }
  }
}

struct Outputs {
  at::Tensor lse, raw_v, raw_i, top_v, top_i, masses, draws;
};

template <typename T>
static void scan_rows(const at::Tensor& logits, const std::vector<at::Tensor>& seen_ids, const std::vector<at::Tensor>& seen_counts,
                      const at::Tensor& penalties, const at::Tensor& inv_temp, const at::Tensor& uniform, bool with_lse, Outputs& out) {
  const int64_t R = logits.size(0), V = logits.size(1), NR = out.raw_v.size(1), NT = out.top_v.size(1);
  const T* lp = logits.data_ptr<T>();
  const float* pp = penalties.data_ptr<float>();
  const float* itp = inv_temp.data_ptr<float>();
  const double* up = uniform.data_ptr<double>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(V), values;
    std::vector<std::pair<float, int64_t>> raw_pairs, top_pairs;
    std::vector<uint64_t> marked((V + 63) / 64, 0);
    for (int64_t r = begin; r < end; ++r) {
      const T* src = lp + r * V;
      const int64_t L = seen_ids[r].numel();
      const int64_t* ids = seen_ids[r].data_ptr<int64_t>();
      const float* counts = seen_counts[r].data_ptr<float>();
      // The penalised row is written out only for a whole-vocabulary mass or draw; the top-k candidates read the
      // logits where they lie, skip the seen tokens and are offered the seen tokens' penalised values after.
      const bool copy = !std::is_same_v<T, float> || (L > 0 && itp[r] > 0.f);
      float* x = copy ? buf.data() : reinterpret_cast<float*>(const_cast<T*>(src));
      if (copy)
        for (int64_t j = 0; j < V; ++j) x[j] = static_cast<float>(src[j]);
      // HF's repetition penalty, then OpenAI's presence and frequency penalties: the float32 operations torch does.
      const float rep = pp[r * 3], presence = pp[r * 3 + 1], frequency = pp[r * 3 + 2];
      values.resize(L);
      for (int64_t k = 0; k < L; ++k) {
        TORCH_CHECK(ids[k] >= 0 && ids[k] < V, "seen token ", ids[k], " is outside the vocabulary");
        float v = x[ids[k]];
        v = v < 0.f ? v * rep : v / rep;
        values[k] = v - (frequency * counts[k] + presence * (counts[k] > 0.f ? 1.f : 0.f));
      }
      Top raw(NR, out.raw_v.data_ptr<float>() + r * NR, out.raw_i.data_ptr<int64_t>() + r * NR, raw_pairs);
      Top top(NT, out.top_v.data_ptr<float>() + r * NT, out.top_i.data_ptr<int64_t>() + r * NT, top_pairs);
      auto lse = [&] {  // of the raw row; the raw top's first is its maximum
        const float m = NR > 0 ? out.raw_v.data_ptr<float>()[r * NR] : row_max(x, V);
        out.lse.data_ptr<float>()[r] = m == NEG_INF ? NEG_INF : m + static_cast<float>(std::log(mass(x, V, m, 1.f)));
      };
      if (!copy) {  // one read for both tops; the seen tokens are offered their penalised values after
        for (int64_t k = 0; k < L; ++k) marked[ids[k] >> 6] |= uint64_t{1} << (ids[k] & 63);
        scan_tops(x, V, NR > 0 ? &raw : nullptr, NT > 0 ? &top : nullptr, marked.data());
        for (int64_t k = 0; k < L; ++k) {
          if (NT > 0) top.offer(values[k], ids[k]);
          marked[ids[k] >> 6] = 0;
        }
        if (NR > 0) raw.finish();
        if (with_lse) lse();
      } else {  // the raw row's figures first, then the penalised values written over it
        if (NR > 0) {
          scan_tops(x, V, &raw, nullptr, nullptr);
          raw.finish();
        }
        if (with_lse) lse();
        for (int64_t k = 0; k < L; ++k) x[ids[k]] = values[k];
        if (NT > 0) scan_tops(x, V, &top, nullptr, nullptr);
      }
      if (NT > 0) top.finish();
      const float s = itp[r];
      if (s <= 0.f) continue;  // no mass or whole-vocabulary draw asked for this row
      const float m = NT > 0 ? out.top_v.data_ptr<float>()[r * NT] : row_max(x, V);  // the penalised maximum
      const double total = mass(x, V, m, s);
      out.masses.data_ptr<double>()[r] = total;
      if (up[r] < 0.0) continue;
      // Inverse CDF in token-id order: the first token whose running mass exceeds u * total.
      const double target = up[r] * total;
      double run = 0.0;
      int64_t pick = -1;
      for (int64_t b = 0; b < V && pick < 0; b += BLOCK) {
        const int64_t e = std::min(V, b + BLOCK);
        float part = 0.f;
#pragma omp simd reduction(+ : part)
        for (int64_t j = b; j < e; ++j) part += exp_neg((x[j] - m) * s);
        if (run + part <= target) {
          run += part;
          continue;
        }
        for (int64_t j = b; j < e; ++j) {
          run += exp_neg((x[j] - m) * s);
          if (run > target && x[j] != NEG_INF) {
            pick = j;
            break;
          }
        }
      }
      if (pick < 0)  // rounding left the running mass just short of the target: the last token that can be drawn
        for (int64_t j = V - 1; j >= 0 && pick < 0; --j)
          if (x[j] != NEG_INF) pick = j;
      out.draws.data_ptr<int64_t>()[r] = pick;
    }
  });
}

std::vector<at::Tensor> scan(at::Tensor logits, std::vector<at::Tensor> seen_ids, std::vector<at::Tensor> seen_counts,
                             at::Tensor penalties, at::Tensor inv_temp, at::Tensor uniform, bool with_lse, int64_t n_raw, int64_t n_top) {
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits: [batch, vocab], contiguous");
  TORCH_CHECK(static_cast<int64_t>(seen_ids.size()) == R && static_cast<int64_t>(seen_counts.size()) == R, "a seen list per row");
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(seen_ids[r].scalar_type() == at::kLong && seen_counts[r].scalar_type() == at::kFloat && seen_ids[r].is_contiguous() &&
                seen_counts[r].is_contiguous() && seen_ids[r].numel() == seen_counts[r].numel(), "seen tokens of row ", r);
  }
  TORCH_CHECK(penalties.scalar_type() == at::kFloat && penalties.is_contiguous() && penalties.numel() == 3 * R, "penalties [R, 3]");
  TORCH_CHECK(inv_temp.scalar_type() == at::kFloat && uniform.scalar_type() == at::kDouble && inv_temp.numel() == R && uniform.numel() == R, "dtypes");
  TORCH_CHECK(n_top <= V && n_raw <= V, "more candidates than the vocabulary");
  inv_temp = inv_temp.contiguous();
  uniform = uniform.contiguous();
  auto f = at::TensorOptions().dtype(at::kFloat);
  auto l = at::TensorOptions().dtype(at::kLong);
  Outputs out{at::full({R}, NEG_INF, f), at::full({R, n_raw}, NEG_INF, f), at::full({R, n_raw}, -1, l), at::full({R, n_top}, NEG_INF, f),
              at::full({R, n_top}, -1, l), at::zeros({R}, at::TensorOptions().dtype(at::kDouble)), at::full({R}, -1, l)};
  by_dtype(logits.scalar_type(), "logits", [&](auto t) { scan_rows<decltype(t)>(logits, seen_ids, seen_counts, penalties, inv_temp, uniform, with_lse, out); });
  return {out.lse, out.raw_v, out.raw_i, out.top_v, out.top_i, out.masses, out.draws};
}
