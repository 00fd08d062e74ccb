// Copyright © 2026 mlx-qsdpa contributors.
//
// Bookkeeping of a ring of device-memory slots shared by the calls in
// flight (the split-K partials and the merge counters of
// csrc/backends/cuda/quant_sdpa_cuda.cpp): a call takes a range of consecutive slots
// when it is recorded and gives it back once the GPU has completed it.
// Ranges are taken in ring order and given back in any order. Plain C++,
// unit-tested without a GPU (tests/cuda/ring_slots_check.cpp); the caller
// holds a lock.
#pragma once

#include <cstdint>
#include <set>

namespace mlx_qsdpa::cuda {

class RingSlots {
 public:
  explicit RingSlots(int64_t capacity) : capacity_(capacity) {}

  // A ticket for n consecutive slots that no range in flight holds, or -1
  // where the ring has no such room now. The range starts at slot
  // offset(ticket).
  int64_t acquire(int64_t n) {
    if (n <= 0 || n > capacity_) {
      return -1;
    }
    int64_t begin = head_;
    if (begin % capacity_ + n > capacity_) {
      begin += capacity_ - begin % capacity_; // a range never wraps
    }
    // Tickets are positions on an unwrapped line; the ranges in flight lie in
    // [oldest, head_), so a new range is clear of all of them if it ends
    // within one ring length of the oldest.
    const int64_t oldest = live_.empty() ? begin : *live_.begin();
    if (begin + n - oldest > capacity_) {
      return -1;
    }
    live_.insert(begin);
    head_ = begin + n;
    return begin;
  }

  void release(int64_t ticket) {
    live_.erase(ticket);
  }

  int64_t offset(int64_t ticket) const {
    return ticket % capacity_;
  }

  int64_t capacity() const {
    return capacity_;
  }

  size_t in_flight() const {
    return live_.size();
  }

 private:
  int64_t capacity_;
  int64_t head_ = 0;
  std::set<int64_t> live_;
};

} // namespace mlx_qsdpa::cuda
