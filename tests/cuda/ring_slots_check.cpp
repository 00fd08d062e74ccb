// Copyright © 2026 mlx-qsdpa contributors.
//
// Checks csrc/backends/cuda/ring_slots.h (the slots of device memory that calls in flight
// hold) with random sequences of takes and give-backs, in and out of
// order: a range lies inside the ring and overlaps no range in flight, an
// empty ring always has room, and a ring never stays full once given back.
// Plain C++, no GPU. Prints one line per violation and "N failures".
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "backends/cuda/ring_slots.h"

using mlx_qsdpa::cuda::RingSlots;

namespace {

int failures = 0;

void expect(bool ok, const char* what, int64_t a, int64_t b) {
  if (!ok) {
    if (++failures < 20) {
      std::printf("FAIL %s (%lld, %lld)\n", what, (long long)a, (long long)b);
    }
  }
}

struct Held {
  int64_t ticket, offset, n;
};

} // namespace

int main() {
  std::mt19937_64 rng(7);
  long taken = 0, refused = 0;
  for (int64_t capacity : {1, 7, 64, 1000, 65536}) {
    RingSlots ring(capacity);
    std::vector<Held> held;
    for (int step = 0; step < 200000; ++step) {
      const bool take = held.empty() || rng() % 3 != 0;
      if (take) {
        const int64_t n = 1 + int64_t(rng() % uint64_t(capacity > 3 ? capacity / 3 : capacity));
        const int64_t t = ring.acquire(n);
        if (t < 0) {
          ++refused;
          expect(!held.empty(), "an empty ring refused", capacity, n);
          continue;
        }
        ++taken;
        const int64_t off = ring.offset(t);
        expect(off >= 0 && off + n <= capacity, "range outside the ring", off, n);
        for (const Held& h : held) {
          expect(off + n <= h.offset || h.offset + h.n <= off, "overlaps a range in flight", off, h.offset);
        }
        held.push_back({t, off, n});
      } else {
        // Give back one range: mostly the oldest (in-order completion),
        // sometimes any (calls on several streams).
        const size_t i = rng() % 4 == 0 ? size_t(rng() % held.size()) : 0;
        ring.release(held[i].ticket);
        held.erase(held.begin() + i);
      }
      expect(ring.in_flight() == held.size(), "in-flight count", int64_t(ring.in_flight()), int64_t(held.size()));
    }
    for (const Held& h : held) {
      ring.release(h.ticket);
    }
    const int64_t t = ring.acquire(capacity);
    expect(t >= 0 && ring.offset(t) == 0, "the whole ring once given back", capacity, t);
    expect(ring.acquire(capacity + 1) < 0, "more than the ring", capacity, 0);
    expect(ring.acquire(0) < 0, "an empty range", capacity, 0);
  }
  std::printf("%ld ranges taken, %ld refused, %d failures\n", taken, refused, failures);
  return failures ? 1 : 0;
}
