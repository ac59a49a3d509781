// What both CPU kernels share, compiled ahead of them (torch's load_inline puts torch/extension.h first):
// - exp(x) for x <= 0 as a branch-free polynomial the compiler vectorises (torch's exp is scalar on some CPUs, and
//   std::floor is not vectorised under -fPIC); relative error about 2e-7; below -87 the term counts as exp(-87);
// - by_dtype: calls f with a value of the C++ type of a float32, bfloat16 or float16 tensor.
#include <cstdint>

template <typename F>
static void by_dtype(at::ScalarType type, const char* what, F&& f) {
  if (type == at::kFloat) {
    f(float{});
  } else if (type == at::kBFloat16) {
    f(at::BFloat16{});
  } else if (type == at::kHalf) {
    f(at::Half{});
  } else {
    TORCH_CHECK(false, "unsupported ", what, " dtype");
  }
}

static inline float exp_neg(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f, f = t - n;  // 2^t = 2^n * 2^f, n rounded to nearest (1.5 * 2^23)
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  return p * __builtin_bit_cast(float, static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}
