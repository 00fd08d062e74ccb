// Copyright © 2026 mlx-qsdpa contributors.
//
// The CPU kernel's host code: the call's description, the split of the work
// into items, the threads, and the finalize / exact merge of the items'
// results. The compute runs in the variant of kernel.cpp that this CPU
// supports best (variants.cpp).
//
// Work is cut into items (batch, kv head, block of query rows, range of
// keys). Items that cover only a part of the keys leave an unnormalised
// partial output with its running max and sum; a second pass merges them
// exactly (the LSE merge).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"

#include "backend.h"
#include "backends/cpu/kernel.h"
#include "backends/cpu/thread_pool.h"
#include "backends/cpu/variants.h"

namespace mlx_qsdpa {

namespace cpu {

namespace {

constexpr int kRowBlock = 64; // query rows per work item at most
constexpr int kMinKeysPerSplit = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The split of a call into items.
struct Split {
  int rows; // G * Lq query rows per (batch, kv head)
  int row_block; // rows per item
  int n_row_blocks;
  int keys_per_split;
  int n_splits;
  int base_items; // B * Hkv * n_row_blocks

  Item item(const Problem& p, int index) const {
    const int sp = index % n_splits;
    int rest = index / n_splits;
    const int rb = rest % n_row_blocks;
    rest /= n_row_blocks;
    Item it;
    it.kvh = rest % p.Hkv;
    it.b = rest / p.Hkv;
    it.r0 = rb * row_block;
    it.nr = std::min(row_block, rows - it.r0);
    it.k0 = sp * keys_per_split;
    it.k1 = std::min(p.Lk, it.k0 + keys_per_split);
    return it;
  }
};

Split plan(const Problem& p, int threads) {
  Split s;
  s.rows = p.G * p.Lq;
  s.row_block = std::min(s.rows, kRowBlock);
  s.n_row_blocks = s.rows == 0 ? 0 : (s.rows + s.row_block - 1) / s.row_block;
  s.base_items = p.B * p.Hkv * s.n_row_blocks;
  // Split the keys until there are a few items per thread, keeping at least
  // kMinKeysPerSplit keys per item.
  const int want = 4 * threads;
  int n = std::max(1, (want + std::max(s.base_items, 1) - 1) / std::max(s.base_items, 1));
  n = std::min(n, std::max(1, (p.Lk + kMinKeysPerSplit - 1) / kMinKeysPerSplit));
  int kps = (p.Lk + n - 1) / n;
  kps = std::max(64, (kps + 63) / 64 * 64);
  s.keys_per_split = kps;
  s.n_splits = std::max(1, (p.Lk + kps - 1) / kps);
  return s;
}

// A 64-byte aligned buffer that grows on demand, one per thread.
class Buffer {
 public:
  void* get(size_t bytes) {
    if (bytes > size_) {
      data_.reset(static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
      if (!data_) {
        throw std::bad_alloc();
      }
      size_ = bytes;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(char* p) const {
      std::free(p);
    }
  };
  std::unique_ptr<char, Free> data_;
  size_t size_ = 0;
};

Buffer& thread_scratch() {
  thread_local Buffer b;
  return b;
}

Buffer& thread_result() {
  thread_local Buffer b;
  return b;
}

void store_elem(void* p, int64_t i, float x, int type) {
  switch (type) {
    case qsdpa::kElemFloat32:
      static_cast<float*>(p)[i] = x;
      break;
    case qsdpa::kElemFloat16:
      static_cast<mx::float16_t*>(p)[i] = mx::float16_t(x);
      break;
    default:
      static_cast<mx::bfloat16_t*>(p)[i] = mx::bfloat16_t(x);
      break;
  }
}

// Normalises one row (attention_math.h's finalize_row: the sink, 1 / sum,
// lse) and writes its output and lse.
void finalize_row(const Problem& p, int b, const RowRef& ref, const float* acc, float m, float l) {
  const int64_t row = (static_cast<int64_t>(b) * p.Hq + ref.h) * p.Lq + ref.i;
  const int64_t base = row * p.D;
  const bool has_sink = p.sinks != nullptr;
  const float s2 = has_sink ? p.sinks[ref.h * p.sink_stride] * qsdpa::log2e() : 0.0f;
  const qsdpa::Finalized f = qsdpa::finalize_row(m, l, has_sink, s2);
  for (int d = 0; d < p.D; ++d) {
    store_elem(p.out, base + d, qsdpa::scaled_output(acc[d], f.mult), p.out_type);
  }
  if (p.lse) {
    p.lse[row] = f.lse;
  }
}

// Partial results of split items: per item o [row_block][D], m [row_block],
// l [row_block].
struct Partials {
  std::vector<float> data;
  int64_t item_stride = 0;

  ItemResult at(int item, int row_block, int D) {
    float* base = data.data() + item * item_stride;
    return {base, base + static_cast<int64_t>(row_block) * D,
            base + static_cast<int64_t>(row_block) * (D + 1)};
  }
};

// Exact merge of the split partials of one (b, kvh, row block)
// (attention_math.h's merge_stats, one split at a time): NaN if any split
// is NaN.
void merge_rows(const Problem& p, const Split& s, int group, Partials& partials) {
  const Item it = s.item(p, group * s.n_splits);
  std::vector<float> acc(p.D);
  for (int r = 0; r < it.nr; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    qsdpa::RowStats total{kNegInf, 0.0f};
    for (int sp = 0; sp < s.n_splits; ++sp) {
      const ItemResult part = partials.at(group * s.n_splits + sp, s.row_block, p.D);
      const qsdpa::Merged mg = qsdpa::merge_stats(total, {part.m[r], part.l[r]});
      total = mg.stats;
      const float* os = part.o + static_cast<int64_t>(r) * p.D;
      for (int d = 0; d < p.D; ++d) {
        acc[d] = (mg.ca == 0.0f ? 0.0f : acc[d] * mg.ca) + (mg.cb == 0.0f ? 0.0f : os[d] * mg.cb);
      }
    }
    finalize_row(p, it.b, row_ref(p, it.kvh, it.r0 + r), acc.data(), total.m, total.l);
  }
}

void run(const Problem& p) {
  ThreadPool& pool = ThreadPool::instance();
  const Split s = plan(p, pool.size());
  if (s.base_items == 0) {
    return;
  }
  const Variant& variant = active_variant();
  const size_t scratch = variant.scratch_bytes(p, s.row_block);
  Partials partials;
  if (s.n_splits > 1) {
    partials.item_stride = static_cast<int64_t>(s.row_block) * (p.D + 2);
    partials.data.resize(static_cast<size_t>(s.base_items) * s.n_splits * partials.item_stride);
  }
  pool.parallel_for(s.base_items * s.n_splits, [&](int index) {
    const Item it = s.item(p, index);
    void* work = thread_scratch().get(scratch);
    if (s.n_splits > 1) {
      variant.run_item(p, it, work, partials.at(index, s.row_block, p.D));
      return;
    }
    float* res = static_cast<float*>(
        thread_result().get(sizeof(float) * static_cast<size_t>(s.row_block) * (p.D + 2)));
    const ItemResult r = {res, res + static_cast<int64_t>(s.row_block) * p.D,
                          res + static_cast<int64_t>(s.row_block) * (p.D + 1)};
    variant.run_item(p, it, work, r);
    for (int i = 0; i < it.nr; ++i) {
      finalize_row(p, it.b, row_ref(p, it.kvh, it.r0 + i), r.o + static_cast<int64_t>(i) * p.D,
                   r.m[i], r.l[i]);
    }
  });
  if (s.n_splits > 1) {
    pool.parallel_for(s.base_items, [&](int g) { merge_rows(p, s, g, partials); });
  }
}

} // namespace
} // namespace cpu

void eval_cpu_kernel(
    const QuantSDPAConfig& c,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream) {
  const cpu::Problem p = describe_call(
      c, inputs, outputs, [](const mx::array& a) { return static_cast<const void*>(a.data<void>()); });

  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
  }
  for (auto& a : outputs) {
    encoder.set_output_array(a);
  }
  // The inputs stay alive until the task ran: the lambda holds them.
  encoder.dispatch([p, keep = inputs]() { cpu::run(p); });
}

} // namespace mlx_qsdpa
