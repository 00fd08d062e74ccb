// Copyright © 2026 mlx-qsdpa contributors.
//
// nanobind bindings of the C++ op. The Python-facing signature (mask as
// None / "causal" / array, return_lse) lives in mlx_qsdpa/_api.py; this
// module exposes the C++ functions one to one.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx_qsdpa/formats.h"
#include "mlx_qsdpa/quant_sdpa.h"

#include "backend.h"
#include "backends/cpu/variants.h"
#include "errors.h"
#if defined(MLX_QSDPA_GPU_METAL)
#include "backends/metal/test_hooks.h"
#endif
#if defined(MLX_QSDPA_CUDA_BACKEND)
#include "backends/cuda/launch_plan.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

// Decodes every code of a format through formats.h, for the tests that
// hold each backend's decoders against mx.dequantize.
std::vector<float> decode_table(const std::string& what) {
  std::vector<float> out;
  if (what == "fp4_e2m1") {
    for (uint32_t i = 0; i < 16; ++i) {
      out.push_back(qsdpa::fp4_e2m1_to_float(i));
    }
  } else if (what == "fp8_e4m3") {
    for (uint32_t i = 0; i < 256; ++i) {
      out.push_back(qsdpa::fp8_e4m3_to_float(i));
    }
  } else if (what == "e8m0") {
    for (uint32_t i = 0; i < 256; ++i) {
      out.push_back(qsdpa::e8m0_to_float(i));
    }
  } else if (what == "float16") {
    for (uint32_t i = 0; i < 65536; ++i) {
      out.push_back(qsdpa::half_bits_to_float(i));
    }
  } else if (what == "bfloat16") {
    for (uint32_t i = 0; i < 65536; ++i) {
      out.push_back(qsdpa::bf16_bits_to_float(i));
    }
  } else {
    throw std::invalid_argument("unknown table " + what);
  }
  return out;
}

// Unpacks a row of packed words with formats.h's unpack_element, for every
// element width of the format table.
std::vector<uint32_t> unpack_row(const std::vector<uint32_t>& words, int bits) {
  std::vector<uint32_t> out;
  bool found = false;
  for (const qsdpa::FormatRow& r : qsdpa::kFormatTable) {
    if (r.bits != bits || found) {
      continue;
    }
    found = qsdpa::dispatch_format(r.mode, r.bits, [&](auto fmt) {
      constexpr int kBits = decltype(fmt)::bits;
      const int n = static_cast<int>(words.size()) * 32 / kBits;
      for (int i = 0; i < n; ++i) {
        out.push_back(qsdpa::unpack_element<kBits>(words.data(), i));
      }
    });
  }
  if (!found) {
    throw std::invalid_argument("bits: no format of the table has " + std::to_string(bits) + "-bit elements");
  }
  return out;
}

// formats.h's table, one tuple per row: (mode, bits, group sizes, kernel
// name token, whether groups have a bias).
nb::list format_table() {
  nb::list rows;
  for (const qsdpa::FormatRow& r : qsdpa::kFormatTable) {
    nb::list groups;
    qsdpa::for_each_group_size(r.group_sizes, [&](int g) { groups.append(g); });
    rows.append(nb::make_tuple(
        r.mode_name, r.bits, nb::tuple(groups), r.token, qsdpa::mode_has_bias(r.mode),
        qsdpa::mode_float_scales(r.mode)));
  }
  return rows;
}

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "mlx-qsdpa: fused attention over a quantized KV cache (C++ core).";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const mlx_qsdpa::type_error& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  m.def(
      "quant_sdpa",
      [](const mx::array& q,
         const mx::array& k,
         const mx::array& ks,
         const std::optional<mx::array>& kb,
         const mx::array& v,
         const mx::array& vs,
         const std::optional<mx::array>& vb,
         float scale,
         const std::string& mask_mode,
         const std::optional<mx::array>& mask_arr,
         const std::optional<mx::array>& sinks,
         int group_size,
         int bits,
         const std::string& mode,
         const std::optional<std::string>& value_mode,
         std::optional<int> value_bits,
         std::optional<int> value_group_size,
         const std::optional<std::string>& rotation,
         int rotation_seed,
         bool return_lse,
         mx::StreamOrDevice s) -> nb::object {
        mlx_qsdpa::QuantSDPAOptions o;
        o.mask_mode = mask_mode;
        o.mask_arr = mask_arr;
        o.sinks = sinks;
        o.group_size = group_size;
        o.bits = bits;
        o.mode = mode;
        o.value_mode = value_mode;
        o.value_bits = value_bits;
        o.value_group_size = value_group_size;
        o.rotation = rotation;
        o.rotation_seed = rotation_seed;
        o.return_lse = return_lse;
        auto outs = mlx_qsdpa::quant_sdpa(q, k, ks, kb, v, vs, vb, scale, o, s);
        if (return_lse) {
          return nb::make_tuple(outs[0], outs[1]);
        }
        return nb::cast(outs[0]);
      },
      "queries"_a,
      "keys"_a,
      "key_scales"_a,
      "key_biases"_a.none(),
      "values"_a,
      "value_scales"_a,
      "value_biases"_a.none(),
      "scale"_a,
      "mask_mode"_a,
      "mask_arr"_a.none(),
      "sinks"_a.none(),
      "group_size"_a,
      "bits"_a,
      "mode"_a,
      "value_mode"_a.none(),
      "value_bits"_a.none(),
      "value_group_size"_a.none(),
      "rotation"_a.none(),
      "rotation_seed"_a,
      "return_lse"_a,
      "stream"_a.none(),
      "The C++ op; use mlx_qsdpa.quant_sdpa.");

  m.def(
      "quantize",
      [](const mx::array& x, int group_size, int bits, const std::string& mode,
         const std::optional<std::string>& rotation, int rotation_seed, mx::StreamOrDevice s) {
        nb::list out;
        for (auto& a : mlx_qsdpa::quantize(x, group_size, bits, mode, rotation, rotation_seed, s)) {
          out.append(a);
        }
        return nb::tuple(out);
      },
      "x"_a,
      "group_size"_a,
      "bits"_a,
      "mode"_a,
      "rotation"_a.none(),
      "rotation_seed"_a,
      "stream"_a.none(),
      "The C++ quantize; use mlx_qsdpa.quantize.");
  m.def(
      "dequantize",
      [](const mx::array& w, const mx::array& scales, const std::optional<mx::array>& biases, int group_size,
         int bits, const std::string& mode, const std::optional<std::string>& rotation, int rotation_seed,
         std::optional<mx::Dtype> dtype, mx::StreamOrDevice s) {
        return mlx_qsdpa::dequantize(w, scales, biases, group_size, bits, mode, rotation, rotation_seed, dtype, s);
      },
      "w"_a,
      "scales"_a,
      "biases"_a.none(),
      "group_size"_a,
      "bits"_a,
      "mode"_a,
      "rotation"_a.none(),
      "rotation_seed"_a,
      "dtype"_a.none(),
      "stream"_a.none(),
      "The C++ dequantize; use mlx_qsdpa.dequantize.");
  m.def("rotation_matrix", &mlx_qsdpa::rotation_matrix, "D"_a, "seed"_a, "The C++ rotation_matrix.");

  m.def(
      "_set_dequantized_fallback",
      &mlx_qsdpa::set_dequantized_fallback,
      "on"_a,
      "Tests only: route every call through the GPU backends' dequantize fallback, on any device.");

  m.def("is_supported_format", &mlx_qsdpa::is_supported_format, "mode"_a, "bits"_a, "group_size"_a);
  m.def(
      "format_table",
      &format_table,
      "The format table (formats.h): (mode, bits, group_sizes, kernel_token, has_biases, float_scales) per row.");
  m.def("version", &mlx_qsdpa::version);
  m.def("mlx_build_version", &mlx_qsdpa::mlx_build_version);
  m.def("gpu_backend", &mlx_qsdpa::gpu_backend_name);
  m.def(
      "cpu_variant",
      [] { return std::string(mlx_qsdpa::cpu::active_variant().name); },
      "The CPU kernel variant in use (the instruction set it was compiled for).");
  m.def(
      "cpu_variants",
      &mlx_qsdpa::cpu::compiled_variants,
      "The compiled CPU kernel variants, best first, as (name, runs on this CPU).");
  m.def(
      "_set_cpu_variant",
      [](const std::optional<std::string>& name) {
        mlx_qsdpa::cpu::select_variant(name.value_or(""));
      },
      "name"_a.none(),
      "Tests only: run the CPU kernel variant `name` (None: the automatic choice).");
  m.def(
      "_set_metal_test_blocks",
      [](int blocks) {
#if defined(MLX_QSDPA_GPU_METAL)
        mlx_qsdpa::set_metal_test_key_blocks(blocks);
#else
        (void)blocks;
        throw std::runtime_error(
            std::string("_set_metal_test_blocks: this build has no Metal backend (gpu_backend() is '") +
            mlx_qsdpa::gpu_backend_name() + "').");
#endif
      },
      "blocks"_a,
      "Tests only, Metal builds only: split every call's keys into `blocks` blocks (2-pass from 2 on); 0: the plan decides.");
#if defined(MLX_QSDPA_CUDA_BACKEND)
  m.def(
      "_set_cuda_test_overrides",
      [](const std::optional<std::string>& kernel, int splits, const std::optional<std::string>& workspace) {
        if (kernel && *kernel != "simt") {
          throw std::invalid_argument("kernel: None or 'simt', got '" + *kernel + "'");
        }
        if (workspace && *workspace != "pool") {
          throw std::invalid_argument("workspace: None or 'pool', got '" + *workspace + "'");
        }
        if (splits < 0) {
          throw std::invalid_argument("splits: 0 (the plan's) or a positive count");
        }
        mlx_qsdpa::cuda::TestOverrides o;
        o.force_simt = kernel.has_value();
        o.splits = splits;
        o.force_pool = workspace.has_value();
        mlx_qsdpa::cuda::set_test_overrides(o);
      },
      "kernel"_a.none() = nb::none(),
      "splits"_a = 0,
      "workspace"_a.none() = nb::none(),
      "Tests and tuning only: how later CUDA calls launch (the defaults restore the plan).");
#endif
  m.def("_decode_table", &decode_table, "what"_a);
  m.def("_unpack_row", &unpack_row, "words"_a, "bits"_a);
}
