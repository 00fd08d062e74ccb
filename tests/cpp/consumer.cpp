// Uses the installed C++ API: quantizes a random cache with mx::quantize,
// runs mlx_qsdpa::quant_sdpa (and the LSE variant), and checks the result
// against attention over mx::dequantize'd K/V computed with MLX ops.
//
// Devices: only the op runs on the test device: MLX's default device, or the
// one QSDPA_DEVICE (cpu|gpu) names (tests/test_cpp_package.py passes the
// suite's). The inputs (random data, mx::quantize) and the reference
// (mx::dequantize, matmuls, softmax) are computed on the CPU, in float32, so
// that they do not depend on a GPU backend's own kernels (MLX-CUDA runs
// float32 matmuls in TF32 and lacks some quantize kernels).
//
// Prints one line per check and, when one fails, which ("FAILED: ...").
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/mlx.h"
#include "mlx_qsdpa/quant_sdpa.h"

namespace mx = mlx::core;

// Tolerance on max|out - ref| (and on the lse): both sides accumulate in
// float32 over 200 keys with outputs of magnitude ~1, so they differ by
// float32 rounding (~1e-6); 1e-4 leaves room for any summation order and
// still catches a wrong result (a misread cache is off by ~1e-1 or more).
constexpr float kTol = 1e-4f;

int run() {
  std::vector<std::string> failed;
  auto check = [&](bool ok, const std::string& what) {
    std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
    if (!ok) {
      failed.push_back(what);
    }
  };

  // The device of the op under test.
  const char* env = std::getenv("QSDPA_DEVICE");
  std::string want = env ? env : "";
  if (want == "gpu" || want == "cpu") {
    mx::Device d = want == "gpu" ? mx::Device::gpu : mx::Device::cpu;
    if (!mx::is_available(d)) {
      std::printf("FAILED: QSDPA_DEVICE=%s but MLX has no such device here\n", want.c_str());
      return 1;
    }
    mx::set_default_device(d);
  }
  const mx::Device dev = mx::default_device();
  const mx::Device cpu = mx::Device::cpu;
  std::printf("op device: %s\n", dev == mx::Device::gpu ? "gpu" : "cpu");

  const int B = 1, Hq = 4, Hkv = 2, Lq = 3, Lk = 200, D = 64;
  const float scale = 1.0f / std::sqrt(float(D));
  auto [k1, rest] = mx::random::split(mx::random::key(0), cpu);
  auto [k2, k3] = mx::random::split(rest, cpu);
  auto q = mx::random::normal({B, Hq, Lq, D}, k1, cpu);
  auto k = mx::random::normal({B, Hkv, Lk, D}, k2, cpu);
  auto v = mx::random::normal({B, Hkv, Lk, D}, k3, cpu);
  auto kq = mx::quantize(k, 64, 4, "affine", std::nullopt, cpu);
  auto vq = mx::quantize(v, 64, 4, "affine", std::nullopt, cpu);
  mx::eval({q, kq[0], kq[1], kq[2], vq[0], vq[1], vq[2]});

  // The op under test, on `dev`.
  auto out = mlx_qsdpa::quant_sdpa(
      q, kq[0], kq[1], kq[2], vq[0], vq[1], vq[2], scale, "causal", {}, {}, 64, 4, "affine", dev);
  auto [out2, lse] = mlx_qsdpa::quant_sdpa_with_lse(
      q, kq[0], kq[1], kq[2], vq[0], vq[1], vq[2], scale, "causal", {}, {}, 64, 4, "affine", dev);
  mx::eval({out, out2, lse});

  // Reference, on the CPU: dequantize, repeat K/V over the GQA group,
  // masked softmax.
  auto deq = [&](const std::vector<mx::array>& t) {
    return mx::repeat(
        mx::dequantize(t[0], t[1], t[2], 64, 4, "affine", std::nullopt, mx::float32, cpu),
        Hq / Hkv, 1, cpu);
  };
  auto kd = deq(kq);
  auto vd = deq(vq);
  auto s = mx::multiply(mx::matmul(q, mx::swapaxes(kd, -1, -2, cpu), cpu), mx::array(scale), cpu);
  auto qi = mx::reshape(mx::arange(Lk - Lq, Lk, cpu), {Lq, 1}, cpu);
  auto kj = mx::reshape(mx::arange(0, Lk, cpu), {1, Lk}, cpu);
  s = mx::where(mx::greater_equal(qi, kj, cpu), s, mx::array(-INFINITY), cpu);
  auto ref = mx::matmul(mx::softmax(s, -1, true, cpu), vd, cpu);
  auto ref_lse = mx::squeeze(mx::logsumexp(s, -1, true, cpu), -1, cpu);

  auto max_abs_diff = [&](const mx::array& a, const mx::array& b) {
    return mx::max(mx::abs(mx::subtract(a, b, cpu), cpu), cpu).item<float>();
  };
  float err = max_abs_diff(out, ref);
  float err2 = max_abs_diff(out2, ref);
  float lse_err = max_abs_diff(lse, ref_lse);
  std::printf(
      "mlx_qsdpa %s (mlx %s): max|out-ref| = %.3g, with lse %.3g, max|lse-ref| = %.3g (tolerance %.0e)\n",
      mlx_qsdpa::version(), mlx_qsdpa::mlx_build_version(), err, err2, lse_err, kTol);
  check(out.shape() == q.shape() && out.dtype() == mx::float32, "quant_sdpa output shape and dtype");
  check(lse.shape() == mx::Shape({B, Hq, Lq}) && lse.dtype() == mx::float32, "lse shape and dtype");
  check(err < kTol, "quant_sdpa output vs the CPU reference");
  check(err2 < kTol, "quant_sdpa_with_lse output vs the CPU reference");
  check(lse_err < kTol, "quant_sdpa_with_lse lse vs the CPU reference");

  // Bad input throws std::invalid_argument naming the argument, when the
  // graph is built (before any evaluation, on any device).
  std::string bad;
  try {
    mlx_qsdpa::quant_sdpa(
        q, kq[0], kq[1], kq[2], vq[0], vq[1], vq[2], scale, "", {}, {}, 64, 3, "affine", dev);
    bad = "no exception";
  } catch (const std::invalid_argument& e) {
    std::printf("bad input raised: %s\n", e.what());
    if (std::string(e.what()).find("bits") == std::string::npos) {
      bad = std::string("std::invalid_argument not naming bits: ") + e.what();
    }
  } catch (const std::exception& e) {
    bad = std::string("another exception type: ") + e.what();
  }
  check(bad.empty(), "bits=3 with 4-bit words throws std::invalid_argument naming bits" +
                         (bad.empty() ? std::string() : " (got " + bad + ")"));

  if (failed.empty()) {
    std::printf("OK\n");
    return 0;
  }
  std::printf("FAILED (%zu check(s)):", failed.size());
  for (const auto& f : failed) {
    std::printf(" [%s]", f.c_str());
  }
  std::printf("\n");
  return 1;
}

int main() {
  // An exception out of any step (other than the expected one above) is a
  // failed check too, named with its message.
  try {
    return run();
  } catch (const std::exception& e) {
    std::printf("FAILED: unexpected exception: %s\n", e.what());
    return 1;
  }
}
