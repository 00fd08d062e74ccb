// Uses the installed C++ API: quantizes a random cache with mx::quantize,
// runs mlx_qsdpa::quant_sdpa (and the LSE variant), and checks the result
// against attention over mx::dequantize'd K/V computed with MLX ops.
#include <cmath>
#include <cstdio>

#include "mlx/mlx.h"
#include "mlx_qsdpa/quant_sdpa.h"

namespace mx = mlx::core;

int main() {
  const int B = 1, Hq = 4, Hkv = 2, Lq = 3, Lk = 200, D = 64;
  const float scale = 1.0f / std::sqrt(float(D));
  auto q = mx::random::normal({B, Hq, Lq, D});
  auto k = mx::random::normal({B, Hkv, Lk, D});
  auto v = mx::random::normal({B, Hkv, Lk, D});
  auto kq = mx::quantize(k, 64, 4);
  auto vq = mx::quantize(v, 64, 4);

  auto out = mlx_qsdpa::quant_sdpa(
      q, kq[0], kq[1], kq[2], vq[0], vq[1], vq[2], scale, "causal");
  auto [out2, lse] = mlx_qsdpa::quant_sdpa_with_lse(
      q, kq[0], kq[1], kq[2], vq[0], vq[1], vq[2], scale, "causal");

  // Reference: dequantize, repeat K/V over the GQA group, masked softmax.
  auto kd = mx::repeat(mx::dequantize(kq[0], kq[1], kq[2], 64, 4), Hq / Hkv, 1);
  auto vd = mx::repeat(mx::dequantize(vq[0], vq[1], vq[2], 64, 4), Hq / Hkv, 1);
  auto s = mx::multiply(mx::matmul(q, mx::swapaxes(kd, -1, -2)), mx::array(scale));
  auto qi = mx::reshape(mx::arange(Lk - Lq, Lk), {Lq, 1});
  auto kj = mx::reshape(mx::arange(0, Lk), {1, Lk});
  s = mx::where(mx::greater_equal(qi, kj), s, mx::array(-INFINITY));
  auto ref = mx::matmul(mx::softmax(s, -1, true), vd);
  auto ref_lse = mx::squeeze(mx::logsumexp(s, -1, true), -1);

  float err = mx::max(mx::abs(mx::subtract(out, ref))).item<float>();
  float err2 = mx::max(mx::abs(mx::subtract(out2, ref))).item<float>();
  float lse_err = mx::max(mx::abs(mx::subtract(lse, ref_lse))).item<float>();
  std::printf(
      "mlx_qsdpa %s (mlx %s): max|out-ref| = %.3g, with lse %.3g, max|lse-ref| = %.3g\n",
      mlx_qsdpa::version(), mlx_qsdpa::mlx_build_version(), err, err2, lse_err);

  bool ok = err < 1e-4f && err2 < 1e-4f && lse_err < 1e-4f;
  // Bad input throws std::invalid_argument naming the argument.
  try {
    mlx_qsdpa::quant_sdpa(q, kq[0], kq[1], kq[2], vq[0], vq[1], vq[2], scale, "", {}, {}, 64, 3);
    std::printf("expected an exception for bits=3 with 4-bit words\n");
    ok = false;
  } catch (const std::invalid_argument& e) {
    std::printf("bad input raised: %s\n", e.what());
  }
  std::printf(ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
}
