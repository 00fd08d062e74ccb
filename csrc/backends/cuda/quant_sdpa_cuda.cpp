// Copyright © 2026 mlx-qsdpa contributors.
//
// GPU hooks of MLX's CUDA build: picks a decode kernel (csrc/backends/cuda/*.cu), splits
// the keys over at most one wave of blocks, and records the kernel
// into MLX's CUDA command encoder (a CUDA graph): one node per call, the
// kernel merges its own splits (csrc/backends/cuda/split_merge.cuh).
//
// Three things differ from MLX's own CUDA primitives, because this library is
// outside libmlx (../shared GPU notes): libmlx links the CUDA runtime
// statically, so kernels are handed over as driver handles
// (cudaGetFuncBySymbol through this library's own, shared, runtime); the
// outputs come from allocator::malloc and the split-K scratch from this
// library's own device memory (MLX's async allocation is not exported); and
// mlx/primitives.h is included explicitly (primitive.h).
#include <cuda_runtime.h>

#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "mlx/allocator.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

#include "backend.h"
#include "backends/cuda/params.h"
#include "backends/cuda/ring_slots.h"
#include "backends/cuda/split_plan.h"

namespace mlx_qsdpa {

namespace {

namespace cu = mlx_qsdpa::cuda;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(
        std::string("[quant_sdpa] CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

void copy_strides(int64_t (&dst)[4], const mx::array& a) {
  for (int i = 0; i < 4; ++i) {
    dst[i] = a.strides()[i];
  }
}

cu::QuantTensor quant_tensor(const mx::array& w, const mx::array& s, const mx::array* b) {
  cu::QuantTensor t{};
  t.w = mx::gpu_ptr<uint32_t>(w);
  copy_strides(t.ws, w);
  t.scales = mx::gpu_ptr<void>(s);
  copy_strides(t.ss, s);
  t.scale_type = elem_type(s.dtype());
  if (b) {
    t.biases = mx::gpu_ptr<void>(*b);
    copy_strides(t.bs, *b);
  }
  return t;
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
// allocator::malloc gives managed memory, which the kernels reached at
// host-link speed on the H100 machine, and its device allocation is not
// exported). A call takes its ranges when it is recorded and gives them back
// from the encoder's completion handler, so nothing is allocated or zeroed
// on the stream per call. The counter ring starts zeroed and stays so: the
// last block of each tile resets its counter (csrc/backends/cuda/split_merge.cuh).
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

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

// The base and the byte strides of the first `dims` axes (those of size
// 1 do not matter) are multiples of 16.
bool aligned16(const mx::array& a, int dims) {
  if (reinterpret_cast<uintptr_t>(mx::gpu_ptr<void>(a)) % 16 != 0) {
    return false;
  }
  for (int i = 0; i < dims; ++i) {
    if (a.shape(i) > 1 && (a.strides()[i] * int64_t(a.itemsize())) % 16 != 0) {
      return false;
    }
  }
  return true;
}

// The tensor-core kernel copies whole chunks of key rows with 16-byte
// copies: the packed rows must start on 16-byte boundaries with a contiguous
// last axis, and the scale/bias rows must be dense (D / group_size
// elements, consecutive keys adjacent) with 16-byte aligned (batch, head)
// bases. mx.quantize's arrays and mlx-lm's QuantizedKVCache (and prefix
// views of it) are. Affine scales must have the query dtype (the kernel
// feeds them to the fp16/bf16 arithmetic as they are).
bool mma_words_ok(const mx::array& w) {
  return (w.shape(3) == 1 || w.strides()[3] == 1) && aligned16(w, 3);
}

bool mma_scales_ok(const mx::array& s, int n_groups) {
  return (s.shape(3) == 1 || s.strides()[3] == 1) && (s.shape(2) == 1 || s.strides()[2] == n_groups) &&
      aligned16(s, 2);
}

bool mma_layout_ok(const QuantSDPAConfig& c, const std::vector<mx::array>& inputs, const InputSlots& in, int D) {
  const mx::Dtype q_type = inputs[in.q].dtype();
  const int n_groups = D / c.group_size;
  for (int slot : {in.k_scales, in.v_scales, in.k_biases, in.v_biases}) {
    if (slot < 0) {
      continue;
    }
    const mx::array& s = inputs[slot];
    if (c.mode == qsdpa::kAffine && s.dtype() != q_type) {
      return false;
    }
    if (!mma_scales_ok(s, n_groups)) {
      return false;
    }
  }
  return mma_words_ok(inputs[in.k]) && mma_words_ok(inputs[in.v]);
}

// Each split pays a block epilogue and a step of the merge: at least this
// many keys per block. The tensor-core kernel's plan (512 keys per split,
// at most 3 blocks per SM in a wave) was chosen by a sweep of forced split
// counts on the H200 (benchmarks/cuda/h200-2026-11-29d/2_split_sweep, one
// call alone): 512 keys per split won at 4K and 16K keys (4K: 8 splits
// 11.8 us, 16 splits 12.3 us), and 3 of the 4 blocks an SM holds won at 64K
// and 128K (128K: 48 splits 48.2 us, 64 splits 50.4-51.3 us), as fewer
// partials to merge than 4 and more warps to hide latency than 2. The
// generic kernel keeps 8 tiles per warp and the occupancy's wave (not
// swept).
constexpr int kMinKeysPerSplitMma = 8 * cu::kKeysPerBlockStep;
constexpr int kMinKeysPerSplitSimt = 8 * cu::kKeysPerBlockStep;
#ifndef QSDPA_MMA_WAVE_BLOCKS // a measurement knob (run_gpu.sh variants)
#define QSDPA_MMA_WAVE_BLOCKS 3
#endif
constexpr int kMmaWaveBlocksPerSm = QSDPA_MMA_WAVE_BLOCKS;

// Points p's partials and counters at memory for this call: ring ranges
// where there is room (given back once the GPU has run the call), else a
// stream-ordered allocation with zeroed counters (QSDPA_CUDA_WORKSPACE=pool
// forces this path, for its tests).
void bind_split_memory(
    cu::Params& p, mx::cu::CommandEncoder& encoder, int device, int64_t o_bytes, int64_t ml_bytes, int64_t n_counters) {
  static const bool force_pool = [] {
    const char* v = std::getenv("QSDPA_CUDA_WORKSPACE");
    return v && std::string(v) == "pool";
  }();
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

} // namespace

bool gpu_kernel_supports(const QuantSDPAConfig&, const CallShape& s) {
  // Every format (validated before this), head dims up to 256 (a multiple of
  // the group size, so of 16), any query length from 1: the kernels tile the
  // G * Lq rows of a kv head (decode and speculative decode are what they
  // are tuned for; longer Lq stays correct and exact in float32, whereas
  // the dequantize fallback's float32 matmuls run in TF32 on MLX's CUDA
  // build and miss float32 accuracy). Shapes whose grid would exceed CUDA's
  // limits (kv heads x row tiles of the smallest, 8-row, blocks > 65535,
  // e.g. Hq * Lq beyond ~500K) take the fallback.
  const int rows = (s.Hq / std::max(s.Hkv, 1)) * s.Lq;
  return s.D >= 16 && s.D <= cu::kMaxHeadDim && s.Lq >= 1 && cu::grid_fits(s.B, s.Hkv, rows, cu::kSimtRows);
}

void eval_gpu_kernel(
    const QuantSDPAConfig& c,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream) {
  InputSlots in(c);
  const mx::array& q = inputs[in.q];
  mx::array& out = outputs[0];
  if (out.size() == 0) {
    return;
  }

  // The kernels hold a row of at most kMaxHeadDim elements (the generic
  // kernel in registers, kMaxHeadDim / 32 per lane): wider rows never get
  // here (gpu_kernel_supports routes them to the dequantize fallback).
  if (q.shape(3) > cu::kMaxHeadDim) {
    throw std::invalid_argument("[quant_sdpa] head dim beyond the CUDA kernels' " + std::to_string(cu::kMaxHeadDim));
  }
  cu::Params p{};
  p.B = q.shape(0);
  p.Hq = q.shape(1);
  p.Lq = q.shape(2);
  p.D = q.shape(3);
  p.Hkv = inputs[in.k].shape(1);
  p.Lk = inputs[in.k].shape(2);
  p.G = p.Hq / p.Hkv;
  p.rows = p.G * p.Lq;
  cu::set_divisors(p);
  p.group_size = c.group_size;
  p.scale_log2 = c.scale * 1.4426950408889634f;
  p.q = mx::gpu_ptr<void>(q);
  copy_strides(p.qs, q);
  p.q_type = elem_type(q.dtype());
  const mx::array* kb = in.k_biases >= 0 ? &inputs[in.k_biases] : nullptr;
  const mx::array* vb = in.v_biases >= 0 ? &inputs[in.v_biases] : nullptr;
  p.k = quant_tensor(inputs[in.k], inputs[in.k_scales], kb);
  p.v = quant_tensor(inputs[in.v], inputs[in.v_scales], vb);
  p.mask_type = c.mask == MaskKind::Causal ? cu::kMaskCausal
      : c.mask == MaskKind::Bool           ? cu::kMaskBool
      : c.mask == MaskKind::Additive       ? cu::kMaskAdditive
                                           : cu::kMaskNone;
  if (in.mask >= 0) {
    p.mask = mx::gpu_ptr<void>(inputs[in.mask]);
    copy_strides(p.ms, inputs[in.mask]);
  }
  if (in.sinks >= 0) {
    p.sinks = mx::gpu_ptr<float>(inputs[in.sinks]);
    p.sink_stride = inputs[in.sinks].strides()[0];
  }
  p.out = mx::gpu_ptr<void>(out);
  p.out_type = p.q_type;
  p.lse = c.return_lse ? mx::gpu_ptr<float>(outputs[1]) : nullptr;

  // The kernel: tensor cores for fp16/bf16 queries where a kernel exists for
  // the format and head dim and the cache layout allows vector loads; the
  // generic kernel otherwise. QSDPA_CUDA_KERNEL=simt forces the generic one.
  static const bool force_simt = [] {
    const char* force = std::getenv("QSDPA_CUDA_KERNEL");
    return force && std::string(force) == "simt";
  }();
  // The generic kernel's settings unless a tensor-core kernel takes the call.
  cu::KernelRef kernel = cu::simt_kernel(c.mode, c.bits);
  int rows_per_block = cu::kSimtRows;
  int min_keys_per_split = kMinKeysPerSplitSimt;
  int wave_blocks_per_sm = std::numeric_limits<int>::max(); // caps the occupancy in the wave
  if (!force_simt && mma_layout_ok(c, inputs, in, p.D)) {
    // Blocks of 8 query rows where the G * Lq rows of a kv head fit (one
    // decode token: G <= 8), else 16.
    const int row_tiles = p.rows <= 8 ? 1 : 2;
    const cu::KernelRef mma = cu::mma_kernel(p.q_type, c.mode, c.bits, c.group_size, p.D, row_tiles);
    if (mma.fn) {
      kernel = mma;
      rows_per_block = 8 * row_tiles;
      min_keys_per_split = kMinKeysPerSplitMma;
      wave_blocks_per_sm = kMmaWaveBlocksPerSm;
    }
  }
  if (!kernel.fn) {
    throw std::runtime_error("[quant_sdpa] no CUDA kernel for this format");
  }

  auto& encoder = mx::cu::get_command_encoder(stream);
  const int device = mx::cu::device(stream.device).cuda_device();
  check(cudaSetDevice(device), "cudaSetDevice");
  const KernelInfo& info = kernel_info(kernel);

  cu::SplitInput si;
  si.B = p.B;
  si.Hkv = p.Hkv;
  si.rows = p.rows;
  si.Lk = p.Lk;
  si.D = p.D;
  si.n_rows = int64_t(p.B) * p.Hq * p.Lq;
  si.rows_per_block = rows_per_block;
  si.wave = int64_t(std::max(std::min(info.blocks_per_sm, wave_blocks_per_sm), 1)) * sm_count(device);
  si.min_keys_per_split = min_keys_per_split;
  static const int forced_splits = env_int("QSDPA_CUDA_SPLITS", 0);
  si.forced_splits = forced_splits;
  const cu::SplitPlan plan = cu::plan_splits(si);
  const int row_tiles = plan.row_tiles;
  const int64_t n_rows = si.n_rows;
  p.keys_per_split = plan.keys_per_split;
  p.n_splits = plan.n_splits;

  for (const auto& a : inputs) {
    encoder.set_input_array(a);
  }
  for (auto& o : outputs) {
    encoder.set_output_array(o);
  }
  const dim3 grid(p.n_splits, p.Hkv * row_tiles, p.B);
  const dim3 block(cu::kThreads);
  if (p.n_splits > 1) {
    // Split K: the partials and counters of the kernel's merge tree
    // (csrc/backends/cuda/split_merge.cuh).
    const cu::MergeTree tree = cu::merge_tree(p.n_splits);
    const int64_t n_counters = int64_t(p.B) * p.Hkv * row_tiles * tree.counters;
    const int64_t o_bytes = tree.slots * n_rows * p.D * int64_t(sizeof(float));
    const int64_t ml_bytes = tree.slots * n_rows * 2 * int64_t(sizeof(float));
    bind_split_memory(p, encoder, device, o_bytes, ml_bytes, n_counters);
  }
  encoder.add_kernel_node_ex(info.function, grid, block, dim3(), info.smem_bytes, p);
}

const char* gpu_backend_name() {
  return "cuda";
}

} // namespace mlx_qsdpa
