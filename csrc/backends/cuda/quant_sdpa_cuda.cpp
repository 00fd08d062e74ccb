// Copyright © 2026 mlx-qsdpa contributors.
//
// GPU hooks of MLX's CUDA build: describes the call (call.h), plans its
// launch (launch_plan.h: the kernel, its grid, the key splits) and records
// the kernel into MLX's CUDA command encoder (a CUDA graph): one node per
// call, the kernel merges its own splits (split_merge.cuh).
//
// Three things differ from MLX's own CUDA primitives, because this library is
// outside libmlx: libmlx links the CUDA runtime statically, so kernels are
// handed over as driver handles (cudaGetFuncBySymbol through this library's
// own, shared, runtime); the outputs come from allocator::malloc and the
// split-K scratch from this library's own device memory (MLX's async
// allocation is not exported); and mlx/primitives.h is included explicitly
// (primitive.h).
#include <cuda_runtime.h>

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "mlx/allocator.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

#include "backend.h"
#include "backends/cuda/launch_plan.h"
#include "backends/cuda/params.h"
#include "backends/cuda/ring_slots.h"

namespace mlx_qsdpa {

namespace {

namespace cu = mlx_qsdpa::cuda;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(
        std::string("[quant_sdpa] CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

// Per kernel: the driver handle and how many blocks fit on one SM.
struct KernelInfo {
  CUfunction function;
  int smem_bytes;
  int blocks_per_sm;
};

const KernelInfo& kernel_info(cu::KernelRef ref) {
  static std::mutex mutex;
  static std::unordered_map<const void*, KernelInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(ref.fn);
  if (it == cache.end()) {
    KernelInfo info{};
    cudaFunction_t f;
    check(cudaGetFuncBySymbol(&f, ref.fn), "cudaGetFuncBySymbol");
    info.function = reinterpret_cast<CUfunction>(f);
    info.smem_bytes = ref.smem_bytes;
    if (ref.smem_bytes > 48 * 1024) {
      // The function's attribute, so it holds for MLX's graph launches too.
      check(
          cudaFuncSetAttribute(ref.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, ref.smem_bytes),
          "cudaFuncSetAttribute");
    }
    check(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.blocks_per_sm, ref.fn, cu::kThreads, ref.smem_bytes),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    it = cache.emplace(ref.fn, info).first;
  }
  return it->second;
}

// Device memory for the split-K partials and the merge counters of the
// calls in flight: two rings per device, allocated once (cudaMalloc: MLX's
// allocator::malloc gives managed memory, which the kernels reach at
// host-link speed, and its device allocation is not exported). A call
// takes its ranges when it is recorded and gives them back from the
// encoder's completion handler, so nothing is allocated or zeroed on the
// stream per call. The counter ring starts zeroed and stays so: the last
// block of each tile resets its counter (split_merge.cuh).
// Where a ring has no room (more calls in flight than fit), the call takes
// its memory from a stream-ordered pool instead and zeroes its counters
// there.
constexpr int64_t kPartialUnit = 256; // bytes; keeps every range 16-byte aligned
constexpr int64_t kPartialRingBytes = int64_t(32) << 20;
constexpr int64_t kCounterRingSlots = int64_t(1) << 16;

struct Workspace {
  std::mutex mutex;
  cu::RingSlots partial_slots{kPartialRingBytes / kPartialUnit};
  cu::RingSlots counter_slots{kCounterRingSlots};
  unsigned char* partials = nullptr;
  unsigned int* counters = nullptr;
  cudaMemPool_t pool = nullptr; // the fallback
};

Workspace& workspace(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, std::unique_ptr<Workspace>> spaces;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = spaces.find(device);
  if (it == spaces.end()) {
    auto ws = std::make_unique<Workspace>();
    check(cudaMalloc(&ws->partials, kPartialRingBytes), "cudaMalloc (partials)");
    check(cudaMalloc(&ws->counters, kCounterRingSlots * sizeof(unsigned int)), "cudaMalloc (counters)");
    check(cudaMemset(ws->counters, 0, kCounterRingSlots * sizeof(unsigned int)), "cudaMemset (counters)");
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    check(cudaMemPoolCreate(&ws->pool, &props), "cudaMemPoolCreate");
    // Keep freed blocks for the next call instead of returning them.
    uint64_t keep = UINT64_MAX;
    check(cudaMemPoolSetAttribute(ws->pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
    it = spaces.emplace(device, std::move(ws)).first;
  }
  return *it->second;
}

int sm_count(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it == cache.end()) {
    int n = 0;
    check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    it = cache.emplace(device, n).first;
  }
  return it->second;
}

// Points p's partials and counters at the plan's split-K workspace: ring
// ranges where there is room (given back once the GPU has run the call),
// else a stream-ordered allocation with zeroed counters (always, with the
// force_pool test override).
void bind_split_memory(
    cu::Params& p, const cu::LaunchPlan& plan, bool force_pool, mx::cu::CommandEncoder& encoder, int device) {
  const int64_t o_bytes = plan.partial_o_bytes;
  const int64_t ml_bytes = plan.partial_ml_bytes;
  const int64_t n_counters = plan.counters;
  Workspace& ws = workspace(device);
  const int64_t units = (o_bytes + ml_bytes + kPartialUnit - 1) / kPartialUnit;
  if (!force_pool) {
    std::unique_lock<std::mutex> lock(ws.mutex);
    const int64_t pt = ws.partial_slots.acquire(units);
    const int64_t ct = pt >= 0 ? ws.counter_slots.acquire(n_counters) : -1;
    if (ct >= 0) {
      unsigned char* part = ws.partials + ws.partial_slots.offset(pt) * kPartialUnit;
      p.part_o = reinterpret_cast<float*>(part);
      p.part_ml = reinterpret_cast<float*>(part + o_bytes);
      p.counters = ws.counters + ws.counter_slots.offset(ct);
      lock.unlock();
      Workspace* w = &ws;
      encoder.add_completed_handler([w, pt, ct]() {
        std::lock_guard<std::mutex> guard(w->mutex);
        w->partial_slots.release(pt);
        w->counter_slots.release(ct);
      });
      return;
    }
    if (pt >= 0) {
      ws.partial_slots.release(pt);
    }
  }
  // The fallback: memory allocated and zeroed in stream order on the
  // encoder's stream, before the graph that uses it is launched there, and
  // freed in stream order once that graph has completed.
  const int64_t counter_bytes = n_counters * int64_t(sizeof(unsigned int));
  cudaStream_t stream = encoder.stream();
  void* scratch = nullptr;
  check(cudaMallocFromPoolAsync(&scratch, o_bytes + ml_bytes + counter_bytes, ws.pool, stream), "cudaMallocFromPoolAsync");
  unsigned char* base = static_cast<unsigned char*>(scratch);
  check(cudaMemsetAsync(base + o_bytes + ml_bytes, 0, counter_bytes, stream), "cudaMemsetAsync");
  p.part_o = reinterpret_cast<float*>(base);
  p.part_ml = reinterpret_cast<float*>(base + o_bytes);
  p.counters = reinterpret_cast<unsigned int*>(base + o_bytes + ml_bytes);
  encoder.add_completed_handler([scratch, stream, device]() {
    cudaSetDevice(device);
    cudaFreeAsync(scratch, stream);
  });
}

// The test overrides (launch_plan.h), read once per call.
std::mutex overrides_mutex;
cu::TestOverrides overrides_in_effect;

} // namespace

namespace cuda {

void set_test_overrides(const TestOverrides& overrides) {
  std::lock_guard<std::mutex> lock(overrides_mutex);
  overrides_in_effect = overrides;
}

TestOverrides test_overrides() {
  std::lock_guard<std::mutex> lock(overrides_mutex);
  return overrides_in_effect;
}

} // namespace cuda

bool gpu_kernel_supports(const QuantSDPAConfig&, const CallShape& s) {
  // Every format (validated before this), keys and values each their own
  // (the generic kernel decodes the values by their format at run time;
  // the tensor-core kernel takes calls whose keys and values share one),
  // head dims up to 256, any query
  // length from 1: the kernels tile the G * Lq rows of a kv head (decode
  // and speculative decode are what they are tuned for; longer Lq stays
  // correct and exact in float32, whereas the dequantize fallback's float32
  // matmuls run in TF32 on MLX's CUDA build and miss float32 accuracy).
  // Shapes whose grid would exceed CUDA's limits (e.g. Hq * Lq beyond
  // ~500K) take the fallback.
  return cu::kernels_cover(s.B, s.Hq, s.Hkv, s.Lq, s.D);
}

void eval_gpu_kernel(
    const QuantSDPAConfig& c,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream) {
  if (outputs[0].size() == 0) {
    return;
  }
  const Call call = describe_call(c, inputs, outputs, [](const mx::array& a) { return mx::gpu_ptr<void>(a); });
  // The kernels hold a row of at most kMaxHeadDim elements (the generic
  // kernel in registers, kMaxHeadDim / 32 per lane): wider rows never get
  // here (gpu_kernel_supports routes them to the dequantize fallback).
  if (call.D > cu::kMaxHeadDim) {
    throw std::invalid_argument("[quant_sdpa] head dim beyond the CUDA kernels' " + std::to_string(cu::kMaxHeadDim));
  }
  const cu::TestOverrides overrides = cu::test_overrides();
  const cu::KernelChoice choice = cu::choose_kernel(call, overrides);
  const cu::KernelRef kernel = choice.kind == cu::KernelKind::Mma
      ? cu::mma_kernel(call.q_type, call.k.mode, call.k.bits, call.k.group_size, call.D, choice.row_tiles)
      : cu::simt_kernel(call.k.mode, call.k.bits);
  if (!kernel.fn) {
    throw std::runtime_error("[quant_sdpa] no CUDA kernel for this format");
  }

  auto& encoder = mx::cu::get_command_encoder(stream);
  const int device = mx::cu::device(stream.device).cuda_device();
  check(cudaSetDevice(device), "cudaSetDevice");
  const KernelInfo& info = kernel_info(kernel);
  const cu::LaunchPlan plan =
      cu::plan_launch(call, choice, cu::KernelFacts{info.smem_bytes, info.blocks_per_sm}, sm_count(device), overrides);
  cu::Params p = cu::make_params(call, plan);

  for (const auto& a : inputs) {
    encoder.set_input_array(a);
  }
  for (auto& o : outputs) {
    encoder.set_output_array(o);
  }
  if (plan.n_splits > 1) {
    bind_split_memory(p, plan, overrides.force_pool, encoder, device);
  }
  const dim3 grid(plan.grid[0], plan.grid[1], plan.grid[2]);
  encoder.add_kernel_node_ex(info.function, grid, dim3(plan.block), dim3(), plan.smem_bytes, p);
}

const char* gpu_backend_name() {
  return "cuda";
}

} // namespace mlx_qsdpa
