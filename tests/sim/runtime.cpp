// Copyright © 2026 mlx-qsdpa contributors.
//
// The simulators' runtime: executes a dispatch of a GPU kernel compiled as
// C++ on the CPU, and reports what a GPU would do wrong or undefined. Both
// front ends use it: the Metal simulator (tests/metal: MSL through
// tests/metal/sim/include/qsim_metal/compat.h) and the CUDA simulator
// (tests/cuda: a block is a threadgroup, a warp a simdgroup, through
// tests/cuda/sim/include/qsim_cuda/cuda_compat.h).
//
// * Threads: every thread of a threadgroup is a fiber (own stack, started
//   with makecontext, switched with _setjmp/_longjmp, which unlike
//   swapcontext make no system call). A fiber runs until it reaches a
//   barrier or a SIMD-group function, or returns. A simdgroup's 32 lanes run
//   until all of them wait at the same SIMD-group function, which then
//   completes; the threadgroup runs until all threads wait at the same
//   barrier, which then opens. Anything else is reported: a barrier that
//   not every thread reaches (a deadlock on the GPU), threads waiting at
//   different barriers, a SIMD-group function called by only some lanes.
// * Schedules (qsim_set_schedule): the order in which simdgroups and lanes
//   take their turns. A lane runs from one sync point (barrier or
//   SIMD-group function) to the next without interruption: fibers switch
//   only there, so the schedule decides the order of these stretches, never
//   an interleaving inside one. Ascending (the default) and descending run
//   each simdgroup from one barrier to the next before the next simdgroup,
//   in simdgroup order, and its lanes in lane order at every step. Random
//   (seeded) takes one step (every lane to its next sync point) of a
//   simdgroup picked at random among those that can go on, so simdgroups
//   interleave at SIMD-group functions, and orders the lanes of each step
//   by a fresh random permutation.
// * Race detector (qsim_set_race_detector, on by default): shadow state on
//   threadgroup memory records, per byte, the last write and the reads
//   that a later write must be checked against, each with the thread, its
//   barrier interval and the code address. A byte touched by two threads in
//   the same barrier interval, at least one of them writing, is reported
//   with both accesses' source lines, whatever the schedule. A barrier
//   interval ends where a threadgroup barrier with mem_threadgroup opens
//   (CUDA: __syncthreads). Lanes of one simdgroup are ordered, within an
//   interval, only by a SIMD-group barrier that orders threadgroup memory
//   (simdgroup_barrier(mem_threadgroup); CUDA: __syncwarp): MSL gives other
//   SIMD-group functions (simd_sum, shuffles, ...) no memory ordering, nor
//   does CUDA give it to shuffles, so they do not order the lanes' accesses.
// * Memory: every buffer lives alone in a 1 GiB slot of a reserved address
//   range, surrounded by inaccessible pages. The kernel translation unit is
//   compiled with -fsanitize-coverage=trace-loads,trace-stores, so each of
//   its loads and stores calls __sanitizer_cov_load/storeN below with the
//   address, before the access happens: an access outside its buffer is
//   reported with the buffer's name, and reads are checked against a shadow
//   of the bytes written (threadgroup memory starts unwritten in every
//   threadgroup; outputs and temporaries start unwritten).
// * Function constants: the kernel translation unit's globals, set per
//   launch; a kernel reading one that the launch did not set is reported.
//
// A report ends the launch: the fault is recorded and control jumps back to
// the launcher, which returns the message.

// Jumps between fiber stacks must not be checked by glibc's fortified
// longjmp (it rejects jumps to another stack).
#undef _FORTIFY_SOURCE

#include <dlfcn.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "qsim/float16.h"
#include "qsim/launch.h"
#include "qsim/runtime.h"

namespace qsim {
namespace {

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

std::string g_error; // the last launch's report
sigjmp_buf g_abort; // back to the launcher
bool g_in_launch = false;

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

// A code address as "lib+0xOFFSET" (the Python side turns it into a line).
std::string describe_pc(const void* pc) {
  Dl_info info;
  if (pc && dladdr(pc, &info) && info.dli_fbase) {
    return format(
        " [pc %s+0x%lx]",
        info.dli_fname,
        static_cast<unsigned long>(
            reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase)));
  }
  return "";
}

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

constexpr uint64_t kSlotBytes = 1ull << 30;
constexpr uint64_t kLead = 1ull << 29; // data starts half way into its slot
constexpr int kMaxSlots = 128;
constexpr int kThreadgroupSlot = 0; // threadgroup memory of the running group
constexpr int kUnboundSlot = 1; // [[buffer(i)]] the launch did not bind
constexpr int kAbsentSlot = 2; // argument disabled by its function constant
constexpr int kFirstBufferSlot = 3;
constexpr uint64_t kSentinelStride = 1ull << 20; // sentinel of index i at i MiB

struct Region {
  bool used = false;
  std::string name;
  uint8_t* data = nullptr;
  uint64_t size = 0;
  uint64_t mapped = 0; // bytes made accessible (whole pages)
  std::vector<uint8_t> written; // shadow: 1 where a byte holds a value
  uint64_t bytes_read = 0; // by kernel loads, over every launch
};

uint8_t* g_arena = nullptr;
uintptr_t g_arena_lo = 0;
uintptr_t g_arena_span = 0; // 0 while no launch runs: nothing is checked
Region g_regions[kMaxSlots];

uint8_t* slot_data(int slot) {
  return g_arena + slot * kSlotBytes + kLead;
}

void ensure_arena() {
  if (g_arena) {
    return;
  }
  void* p = mmap(
      nullptr, kMaxSlots * kSlotBytes, PROT_NONE,
      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    throw std::runtime_error("qsim: cannot reserve the simulator's address range");
  }
  g_arena = static_cast<uint8_t*>(p);
}

uint64_t page_round(uint64_t n) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  return (n + page - 1) / page * page;
}

void map_region(int slot, const std::string& name, uint64_t size, bool initialized) {
  Region& r = g_regions[slot];
  if (r.mapped) {
    madvise(r.data, r.mapped, MADV_DONTNEED);
    mprotect(r.data, r.mapped, PROT_NONE);
  }
  r.used = true;
  r.name = name;
  r.data = slot_data(slot);
  r.size = size;
  r.mapped = page_round(size);
  if (r.mapped && mprotect(r.data, r.mapped, PROT_READ | PROT_WRITE) != 0) {
    throw std::runtime_error("qsim: cannot map a buffer of " + std::to_string(size) + " bytes");
  }
  r.written.assign(size, initialized ? 1 : 0);
}

void unmap_region(int slot) {
  Region& r = g_regions[slot];
  if (r.mapped) {
    madvise(r.data, r.mapped, MADV_DONTNEED);
    mprotect(r.data, r.mapped, PROT_NONE);
  }
  r = Region();
}

// ---------------------------------------------------------------------------
// Function constants of the kernel library
// ---------------------------------------------------------------------------

struct ConstantState {
  const FunctionConstantInfo* info;
  uintptr_t addr;
  unsigned size;
  bool set;
};
std::vector<ConstantState> g_constants;
uintptr_t g_constants_lo = 0;
uintptr_t g_constants_span = 0;

void load_constant_table() {
  if (!g_constants.empty()) {
    return;
  }
  int n = 0;
  const FunctionConstantInfo* table = qsim_function_constant_table(&n);
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (int i = 0; i < n; ++i) {
    ConstantState s;
    s.info = &table[i];
    s.addr = reinterpret_cast<uintptr_t>(table[i].storage);
    s.size = table[i].type == FunctionConstantInfo::Bool ? sizeof(bool) : sizeof(int);
    s.set = false;
    g_constants.push_back(s);
    lo = std::min(lo, s.addr);
    hi = std::max(hi, s.addr + s.size);
  }
  if (n) {
    g_constants_lo = lo;
    g_constants_span = hi - lo;
  }
}

// ---------------------------------------------------------------------------
// Fibers and the threadgroup scheduler
// ---------------------------------------------------------------------------

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr unsigned kSimd = 32;

enum class State { Runnable, AtBarrier, AtSimd, Done };

struct Fiber {
  ucontext_t start;
  jmp_buf ctx;
  uint8_t* stack = nullptr; // lowest page is a guard
  bool started = false;
  State state = State::Done;
  // Where it waits.
  const char* op = nullptr;
  const char* file = nullptr;
  int line = 0;
  bool orders_memory = false; // the sync point it waits at orders threadgroup memory
  unsigned simd_seq = 0; // SIMD-group functions completed
  unsigned sg = 0, lane = 0;
  ThreadContext ctx_values;
};

Fiber g_fibers[kMaxThreads];
Fiber* g_current = nullptr;
jmp_buf g_scheduler;

struct Launch {
  const KernelInfo* kernel;
  uint32_t grid[3]; // threadgroups
  uint32_t threads[3]; // per threadgroup
  uint32_t n_threads;
  uint32_t group[3]; // the running threadgroup
  void* buffers[31];
  size_t tg_length;
  // SIMD exchange slots: [simdgroup][parity][lane][16 bytes].
  std::vector<uint8_t> simd_slots;
};
Launch g_launch;
int64_t g_threadgroup_limit = 32768; // Apple GPUs; qsim_set_threadgroup_limit

// ---------------------------------------------------------------------------
// The schedules
// ---------------------------------------------------------------------------

enum class Schedule : int { Ascending = 0, Descending = 1, Random = 2 };
Schedule g_schedule = Schedule::Ascending;
uint64_t g_rng = 0; // the random schedule's state (splitmix64)

uint64_t next_random() {
  uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The order in which items 0 .. n - 1 (simdgroups or lanes) take a turn.
void turn_order(unsigned* order, unsigned n) {
  for (unsigned i = 0; i < n; ++i) {
    order[i] = g_schedule == Schedule::Descending ? n - 1 - i : i;
  }
  if (g_schedule == Schedule::Random) {
    for (unsigned i = n; i > 1; --i) {
      std::swap(order[i - 1], order[next_random() % i]);
    }
  }
}

// ---------------------------------------------------------------------------
// Barrier intervals (the race detector's clock)
// ---------------------------------------------------------------------------

// The running threadgroup's barrier interval: it changes at the start of a
// threadgroup and where a barrier that orders threadgroup memory opens.
// Numbered through the launch, so that shadow entries of an earlier
// interval or threadgroup never match (0: no access).
uint32_t g_interval = 0;
const char* g_interval_file = nullptr; // the barrier that opened it (nullptr: the threadgroup's start)
int g_interval_line = 0;
// Per simdgroup: SIMD-group barriers that ordered threadgroup memory.
uint32_t g_simd_interval[kMaxThreads / kSimd];

void begin_interval(const char* file, int line) {
  ++g_interval;
  g_interval_file = file;
  g_interval_line = line;
}

void fiber_main();

void reset_fibers() {
  for (auto& f : g_fibers) {
    f.started = false;
    f.state = State::Done;
  }
  g_current = nullptr;
}

void prepare_fiber(Fiber& f) {
  if (!f.stack) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      throw std::runtime_error("qsim: cannot allocate a fiber stack");
    }
    f.stack = static_cast<uint8_t*>(p);
    mprotect(f.stack, page_round(1), PROT_NONE); // overflow guard
  }
  getcontext(&f.start);
  f.start.uc_stack.ss_sp = f.stack;
  f.start.uc_stack.ss_size = kStackBytes;
  f.start.uc_link = nullptr;
  makecontext(&f.start, fiber_main, 0);
  f.started = false;
}

// Runs fiber f until it waits or finishes.
void resume(Fiber& f) {
  g_current = &f;
  if (!_setjmp(g_scheduler)) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.start);
    }
    _longjmp(f.ctx, 1);
  }
  g_current = nullptr;
}

// Called on a fiber: back to the scheduler until resumed.
void yield() {
  Fiber* f = g_current;
  if (!_setjmp(f->ctx)) {
    _longjmp(g_scheduler, 1);
  }
}

void fiber_main() {
  for (;;) {
    Fiber* f = g_current;
    g_launch.kernel->run_thread(f->ctx_values);
    f->state = State::Done;
    yield();
  }
}

std::string thread_name(const Fiber& f) {
  const auto& v = f.ctx_values.values;
  const auto* t = v[int(Builtin::thread_position_in_threadgroup)];
  const auto* g = v[int(Builtin::threadgroup_position_in_grid)];
  return format(
      "thread (%u,%u,%u) [simdgroup %u, lane %u] of threadgroup (%u,%u,%u)",
      t[0], t[1], t[2], f.sg, f.lane, g[0], g[1], g[2]);
}

std::string group_name() {
  return format(
      "threadgroup (%u,%u,%u)", g_launch.group[0], g_launch.group[1], g_launch.group[2]);
}

// Ends the launch with a report (from a fiber, a callback or the scheduler).
[[noreturn]] void fail(const std::string& msg) {
  g_error = msg;
  siglongjmp(g_abort, 1);
}

std::string site(const Fiber& f) {
  const char* base = f.file ? strrchr(f.file, '/') : nullptr;
  return format("%s at %s:%d", f.op, base ? base + 1 : (f.file ? f.file : "?"), f.line);
}

// Compact list of thread indices, e.g. "0..15, 17".
std::string index_list(const std::vector<unsigned>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) {
      ++j;
    }
    if (!s.empty()) {
      s += ", ";
    }
    s += j > i ? format("%u..%u", ids[i], ids[j]) : format("%u", ids[i]);
    i = j + 1;
  }
  return s;
}

bool same_site(const Fiber& a, const Fiber& b) {
  return a.op == b.op && a.line == b.line &&
      (a.file == b.file || (a.file && b.file && strcmp(a.file, b.file) == 0));
}

// One step of simdgroup sg: runs each of its lanes that can go on (in the
// schedule's lane order) until it waits or returns. Returns true when every
// lane then waits at the same SIMD-group function, which completes (the
// lanes can go on); false when the simdgroup cannot go on before a barrier
// opens (or never: finished, or a misuse the scheduler reports).
bool step_simdgroup(unsigned sg) {
  const unsigned first = sg * kSimd;
  const unsigned last = std::min(g_launch.n_threads, first + kSimd);
  unsigned order[kSimd];
  turn_order(order, last - first);
  for (unsigned i = 0; i < last - first; ++i) {
    Fiber& f = g_fibers[first + order[i]];
    if (f.state == State::Runnable) {
      resume(f);
    }
  }
  const Fiber& lead = g_fibers[first];
  bool complete = lead.state == State::AtSimd;
  bool orders_memory = true;
  for (unsigned t = first; complete && t < last; ++t) {
    complete = g_fibers[t].state == State::AtSimd && same_site(g_fibers[t], lead) &&
        g_fibers[t].simd_seq == lead.simd_seq;
    orders_memory = orders_memory && g_fibers[t].orders_memory;
  }
  if (!complete) {
    return false;
  }
  if (orders_memory) {
    ++g_simd_interval[sg];
  }
  for (unsigned t = first; t < last; ++t) {
    g_fibers[t].state = State::Runnable;
  }
  return true;
}

// Runs the threadgroup's simdgroups until none can go on before a barrier
// opens, in the schedule's order: ascending and descending take the
// simdgroups one after another, each as far as it goes; random interleaves
// them, one step of a simdgroup picked at random at a time.
void run_simdgroups(unsigned n_sg) {
  unsigned order[kMaxThreads / kSimd];
  turn_order(order, n_sg);
  if (g_schedule != Schedule::Random) {
    for (unsigned i = 0; i < n_sg; ++i) {
      while (step_simdgroup(order[i])) {
      }
    }
    return;
  }
  unsigned n_live = n_sg;
  while (n_live > 0) {
    const unsigned k = static_cast<unsigned>(next_random() % n_live);
    if (!step_simdgroup(order[k])) {
      order[k] = order[--n_live];
    }
  }
}

// The report for a simdgroup whose lanes do not all wait at one function.
[[noreturn]] void fail_simd(unsigned sg) {
  const unsigned first = sg * kSimd;
  const unsigned last = std::min(g_launch.n_threads, first + kSimd);
  const Fiber* at = nullptr;
  for (unsigned t = first; t < last && !at; ++t) {
    if (g_fibers[t].state == State::AtSimd) {
      at = &g_fibers[t];
    }
  }
  // The other lanes, grouped by what they do instead.
  std::vector<unsigned> callers, returned;
  std::vector<std::pair<const Fiber*, std::vector<unsigned>>> elsewhere;
  for (unsigned t = first; t < last; ++t) {
    const Fiber& f = g_fibers[t];
    if (f.state == State::AtSimd && same_site(f, *at)) {
      callers.push_back(f.lane);
    } else if (f.state == State::Done) {
      returned.push_back(f.lane);
    } else {
      auto it = std::find_if(elsewhere.begin(), elsewhere.end(), [&](const auto& e) {
        return same_site(*e.first, f);
      });
      if (it == elsewhere.end()) {
        elsewhere.push_back({&f, {f.lane}});
      } else {
        it->second.push_back(f.lane);
      }
    }
  }
  std::string others;
  if (!returned.empty()) {
    others += "; lanes " + index_list(returned) + " had returned";
  }
  for (const auto& e : elsewhere) {
    others += "; lanes " + index_list(e.second) + " wait at " + site(*e.first);
  }
  fail(format(
      "SIMD-group function %s called by only some lanes of simdgroup %u of %s: "
      "lanes %s of %u%s (every lane of the simdgroup must call it together)",
      site(*at).c_str(), sg, group_name().c_str(), index_list(callers).c_str(),
      last - first, others.c_str()));
}

void run_threadgroup() {
  const unsigned n = g_launch.n_threads;
  const unsigned n_sg = (n + kSimd - 1) / kSimd;
  const uint32_t* tpg = g_launch.threads;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = g_fibers[t];
    if (!f.started) {
      prepare_fiber(f);
    }
    f.state = State::Runnable;
    f.simd_seq = 0;
    f.sg = t / kSimd;
    f.lane = t % kSimd;
    ThreadContext& c = f.ctx_values;
    const uint32_t local[3] = {t % tpg[0], (t / tpg[0]) % tpg[1], t / (tpg[0] * tpg[1])};
    for (int a = 0; a < 3; ++a) {
      c.values[int(Builtin::thread_position_in_threadgroup)][a] = local[a];
      c.values[int(Builtin::threadgroup_position_in_grid)][a] = g_launch.group[a];
      c.values[int(Builtin::threads_per_threadgroup)][a] = tpg[a];
      c.values[int(Builtin::threadgroups_per_grid)][a] = g_launch.grid[a];
      c.values[int(Builtin::thread_position_in_grid)][a] = g_launch.group[a] * tpg[a] + local[a];
      c.values[int(Builtin::threads_per_grid)][a] = g_launch.grid[a] * tpg[a];
    }
    auto scalar = [&](Builtin b, uint32_t v) {
      c.values[int(b)][0] = v;
      c.values[int(b)][1] = 0;
      c.values[int(b)][2] = 0;
    };
    scalar(Builtin::thread_index_in_threadgroup, t);
    scalar(Builtin::simdgroup_index_in_threadgroup, t / kSimd);
    scalar(Builtin::thread_index_in_simdgroup, t % kSimd);
    scalar(Builtin::simdgroups_per_threadgroup, n_sg);
    scalar(Builtin::threads_per_simdgroup, kSimd);
    c.buffers = g_launch.buffers;
    c.threadgroup_memory = g_regions[kThreadgroupSlot].data;
    c.threadgroup_memory_length = g_launch.tg_length;
  }
  begin_interval(nullptr, 0);
  std::fill(g_simd_interval, g_simd_interval + n_sg, 0u);
  for (;;) {
    run_simdgroups(n_sg);
    // No thread can go on: all finished, or all wait at one barrier.
    unsigned done = 0, at_barrier = 0;
    const Fiber* first_barrier = nullptr;
    for (unsigned t = 0; t < n; ++t) {
      const Fiber& f = g_fibers[t];
      if (f.state == State::AtSimd) {
        fail_simd(f.sg);
      }
      if (f.state == State::Done) {
        ++done;
      } else if (f.state == State::AtBarrier) {
        ++at_barrier;
        if (!first_barrier) {
          first_barrier = &f;
        }
      }
    }
    if (done == n) {
      return;
    }
    if (done > 0) {
      std::vector<unsigned> returned;
      for (unsigned t = 0; t < n; ++t) {
        if (g_fibers[t].state == State::Done) {
          returned.push_back(t);
        }
      }
      fail(format(
          "deadlock: %s reached by %u of the %u threads of %s; threads %s returned "
          "without reaching it (on a GPU the waiting threads hang or the barrier "
          "is undefined)",
          site(*first_barrier).c_str(), at_barrier, n, group_name().c_str(),
          index_list(returned).c_str()));
    }
    for (unsigned t = 0; t < n; ++t) {
      if (!same_site(g_fibers[t], *first_barrier)) {
        fail(format(
            "deadlock: threads of %s wait at different barriers: thread 0 at %s, "
            "thread %u at %s (every thread must reach the same barrier)",
            group_name().c_str(), site(g_fibers[0]).c_str(), t,
            site(g_fibers[t]).c_str()));
      }
    }
    bool orders_memory = true;
    for (unsigned t = 0; t < n; ++t) {
      orders_memory = orders_memory && g_fibers[t].orders_memory;
      g_fibers[t].state = State::Runnable;
    }
    if (orders_memory) {
      begin_interval(first_barrier->file, first_barrier->line);
    }
  }
}

// ---------------------------------------------------------------------------
// Memory checks (called before each load/store of the kernel code)
// ---------------------------------------------------------------------------

const char* kind_name(bool write) {
  return write ? "write" : "read";
}

std::string who(const void* pc) {
  return (g_current ? " by " + thread_name(*g_current) : std::string()) + describe_pc(pc);
}

[[noreturn]] void fail_sentinel(int slot, uintptr_t off, unsigned n, bool write, const void* pc) {
  const int64_t index = static_cast<int64_t>(off) / static_cast<int64_t>(kSentinelStride);
  if (slot == kUnboundSlot) {
    fail(format(
        "%s of %u bytes through [[buffer(%lld)]], which the launch did not bind%s",
        kind_name(write), n, static_cast<long long>(index), who(pc).c_str()));
  }
  fail(format(
      "%s of %u bytes through [[buffer(%lld)]], an argument absent from this "
      "pipeline because its function constant is false%s",
      kind_name(write), n, static_cast<long long>(index), who(pc).c_str()));
}

// ---------------------------------------------------------------------------
// The race detector (threadgroup memory)
// ---------------------------------------------------------------------------

struct Access {
  uint32_t interval = 0; // barrier interval (0: none)
  uint32_t simd_interval = 0; // of the thread's simdgroup, then
  uint16_t thread = 0; // index in the threadgroup
  uint16_t bytes = 0; // size of the access
  const void* pc = nullptr;
};

// What a byte's next access is checked against. A read races with the last
// write alone: an earlier write of the interval by another thread either
// raced with the last one (and was reported) or is ordered before the last
// one, and so before the read whenever the last one is. A write races with
// any read of the interval by another thread that is not ordered before it;
// three reads decide whether one exists:
// * the last read, and the last read by a simdgroup other than the last
//   reader's: when both exist, one of them is of another simdgroup than the
//   writer's, and races with it;
// * the last read by a lane of the last reader's simdgroup other than the
//   last reader: for a writer of that simdgroup (reads of its earlier SIMD
//   intervals are ordered before it, and the last reads are the latest),
//   the last read races with it unless the writer is the last reader, and
//   then this one decides.
struct ByteShadow {
  Access write;
  Access read;
  Access read_other_simdgroup;
  Access read_other_lane;
};

bool g_race_detector = true;
std::vector<ByteShadow> g_shadow; // one per byte of threadgroup memory

// Whether two accesses by different threads are unordered: the same barrier
// interval, and for lanes of one simdgroup the same SIMD interval too.
bool unordered(const Access& a, const Access& b) {
  return a.interval != 0 && a.interval == b.interval && a.thread != b.thread &&
      (a.thread / kSimd != b.thread / kSimd || a.simd_interval == b.simd_interval);
}

std::string thread_in_group(unsigned t) {
  const Fiber& f = g_fibers[t];
  const auto* p = f.ctx_values.values[int(Builtin::thread_position_in_threadgroup)];
  return format("thread (%u,%u,%u) [simdgroup %u, lane %u]", p[0], p[1], p[2], f.sg, f.lane);
}

[[noreturn]] void fail_race(int64_t byte, const Access& earlier, bool earlier_write, const Access& later, bool later_write) {
  const bool same_sg = earlier.thread / kSimd == later.thread / kSimd;
  const char* base = g_interval_file ? strrchr(g_interval_file, '/') : nullptr;
  const std::string since = g_interval_file
      ? format("threadgroup_barrier at %s:%d", base ? base + 1 : g_interval_file, g_interval_line)
      : std::string("the threadgroup's start");
  fail(format(
      "data race on threadgroup memory of %s at byte offset %lld: %s of %u bytes by %s%s, then "
      "%s of %u bytes by %s%s, with no %s between them (both since %s)",
      group_name().c_str(), static_cast<long long>(byte), kind_name(earlier_write), earlier.bytes,
      thread_in_group(earlier.thread).c_str(), describe_pc(earlier.pc).c_str(), kind_name(later_write),
      later.bytes, thread_in_group(later.thread).c_str(), describe_pc(later.pc).c_str(),
      same_sg ? "threadgroup barrier or SIMD-group barrier ordering threadgroup memory"
              : "threadgroup barrier ordering threadgroup memory",
      since.c_str()));
}

void record_read(ByteShadow& b, const Access& me) {
  if (b.read.interval != me.interval) {
    b.read = me;
    b.read_other_simdgroup = Access();
    b.read_other_lane = Access();
  } else if (b.read.thread / kSimd == me.thread / kSimd) {
    if (b.read.thread != me.thread) {
      b.read_other_lane = b.read;
    }
    b.read = me;
  } else {
    b.read_other_simdgroup = b.read;
    b.read_other_lane = Access();
    b.read = me;
  }
}

// An access of n bytes at byte offset off of threadgroup memory by the
// running thread.
void check_race(int64_t off, unsigned n, bool write, const void* pc) {
  Access me;
  me.thread = static_cast<uint16_t>(g_current - g_fibers);
  me.interval = g_interval;
  me.simd_interval = g_simd_interval[me.thread / kSimd];
  me.bytes = static_cast<uint16_t>(n);
  me.pc = pc;
  for (unsigned i = 0; i < n; ++i) {
    ByteShadow& b = g_shadow[off + i];
    if (unordered(b.write, me)) {
      fail_race(off + i, b.write, true, me, write);
    }
    if (!write) {
      record_read(b, me);
      continue;
    }
    for (const Access* r : {&b.read, &b.read_other_simdgroup, &b.read_other_lane}) {
      if (unordered(*r, me)) {
        fail_race(off + i, *r, false, me, true);
      }
    }
    b.write = me;
  }
}

void check_arena(uintptr_t a, unsigned n, bool write, const void* pc) {
  const int slot = static_cast<int>((a - g_arena_lo) / kSlotBytes);
  const uintptr_t base = reinterpret_cast<uintptr_t>(slot_data(slot));
  if (slot == kUnboundSlot || slot == kAbsentSlot) {
    fail_sentinel(slot, a - base, n, write, pc);
  }
  Region& r = g_regions[slot];
  if (!r.used) {
    fail(format(
        "%s of %u bytes at %p: not inside any buffer of the launch%s",
        kind_name(write), n, reinterpret_cast<void*>(a), who(pc).c_str()));
  }
  const int64_t off = static_cast<int64_t>(a - base);
  const bool tg = slot == kThreadgroupSlot;
  if (off < 0 || off + n > static_cast<int64_t>(r.size)) {
    if (tg) {
      fail(format(
          "out-of-bounds %s of %u bytes at byte offset %lld of threadgroup memory "
          "(%llu bytes set with set_threadgroup_memory_length)%s",
          kind_name(write), n, static_cast<long long>(off),
          static_cast<unsigned long long>(r.size), who(pc).c_str()));
    }
    fail(format(
        "out-of-bounds %s of %u bytes at byte offset %lld of buffer '%s' (%llu bytes)%s",
        kind_name(write), n, static_cast<long long>(off), r.name.c_str(),
        static_cast<unsigned long long>(r.size), who(pc).c_str()));
  }
  // Every access must be aligned to its size, as the GPUs require of their
  // loads and stores (Metal's float4 has alignment 16; on CUDA a misaligned
  // access faults the kernel). The kernels are built without
  // auto-vectorization, so an access of n bytes is one of the kernel's own
  // scalars or vectors. Buffers and threadgroup memory start 16-byte
  // aligned here, so the offset decides.
  if (off % n != 0) {
    fail(format(
        "%s of %u bytes at byte offset %lld of %s: not %u-byte aligned%s",
        kind_name(write), n, static_cast<long long>(off),
        tg ? "threadgroup memory" : ("buffer '" + r.name + "'").c_str(), n, who(pc).c_str()));
  }
  if (tg && g_race_detector && g_current) {
    check_race(off, n, write, pc);
  }
  uint8_t* sh = r.written.data() + off;
  if (!write) {
    r.bytes_read += n;
  }
  if (write) {
    std::memset(sh, 1, n);
    return;
  }
  for (unsigned i = 0; i < n; ++i) {
    if (!sh[i]) {
      if (tg) {
        fail(format(
            "read of threadgroup memory never written: %u bytes at byte offset %lld "
            "(byte %lld not written in this threadgroup)%s",
            n, static_cast<long long>(off), static_cast<long long>(off + i),
            who(pc).c_str()));
      }
      fail(format(
          "read of device memory never written: %u bytes at byte offset %lld of "
          "buffer '%s' (an output or temporary the kernels have not filled)%s",
          n, static_cast<long long>(off), r.name.c_str(), who(pc).c_str()));
    }
  }
}

void check_constant(uintptr_t a, bool write, const void* pc) {
  for (const auto& c : g_constants) {
    if (a >= c.addr && a < c.addr + c.size) {
      if (write) {
        fail(format(
            "write to function constant '%s'%s", c.info->name, who(pc).c_str()));
      }
      if (!c.set) {
        fail(format(
            "function constant '%s' (index %d) is read by the kernel but the launch "
            "did not set it%s",
            c.info->name, c.info->index, who(pc).c_str()));
      }
      return;
    }
  }
}

inline void on_access(const void* p, unsigned n, bool write, const void* pc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - g_arena_lo < g_arena_span) {
    check_arena(a, n, write, pc);
  } else if (a - g_constants_lo < g_constants_span) {
    check_constant(a, write, pc);
  }
}

// Faults that escaped the checks (a wild pointer, a fiber stack overflow).
struct sigaction g_old_segv, g_old_bus;
void on_fault(int sig, siginfo_t* info, void*) {
  g_error = format(
      "%s at address %p%s: the kernel accessed memory outside every buffer "
      "(wild pointer or stack overflow)",
      sig == SIGSEGV ? "segmentation fault" : "bus error", info->si_addr,
      g_current ? (" in " + thread_name(*g_current)).c_str() : "");
  siglongjmp(g_abort, 1);
}

std::vector<uint8_t> g_alt_stack(1 << 16);

} // namespace

// ---------------------------------------------------------------------------
// Interface of the compatibility header
// ---------------------------------------------------------------------------

const unsigned char* simd_exchange(
    const void* value,
    unsigned size,
    const char* op,
    const char* file,
    int line,
    unsigned* lanes,
    unsigned* lane,
    bool orders_threadgroup_memory) {
  Fiber* f = g_current;
  const unsigned sg = f->sg;
  uint8_t* slots = g_launch.simd_slots.data() + (sg * 2 + (f->simd_seq & 1)) * kSimd * 16;
  std::memcpy(slots + f->lane * 16, value, size);
  f->state = State::AtSimd;
  f->orders_memory = orders_threadgroup_memory;
  f->op = op;
  f->file = file;
  f->line = line;
  yield();
  f->simd_seq++;
  *lanes = std::min(kSimd, g_launch.n_threads - sg * kSimd);
  *lane = f->lane;
  return slots;
}

void threadgroup_barrier(const char* file, int line, bool orders_threadgroup_memory) {
  Fiber* f = g_current;
  f->state = State::AtBarrier;
  f->orders_memory = orders_threadgroup_memory;
  f->op = "threadgroup_barrier";
  f->file = file;
  f->line = line;
  yield();
}

void* buffer_argument(const ThreadContext& c, int index, bool enabled) {
  if (!enabled) {
    return slot_data(kAbsentSlot) + index * kSentinelStride;
  }
  return c.buffers[index];
}

void* threadgroup_argument(const ThreadContext& c, int) {
  return c.threadgroup_memory;
}

const ThreadContext& current_thread() {
  return g_current->ctx_values;
}

void kernel_fault(const char* message) {
  fail(std::string(message) + who(__builtin_return_address(0)));
}

} // namespace qsim

// ---------------------------------------------------------------------------
// Instrumentation callbacks (-fsanitize-coverage=trace-loads,trace-stores)
// ---------------------------------------------------------------------------
extern "C" {
#define QSIM_CALLBACK(n, T)                                              \
  __attribute__((noinline)) void __sanitizer_cov_load##n(T* p) {         \
    qsim::on_access(p, n, false, __builtin_return_address(0));           \
  }                                                                      \
  __attribute__((noinline)) void __sanitizer_cov_store##n(T* p) {        \
    qsim::on_access(p, n, true, __builtin_return_address(0));            \
  }
QSIM_CALLBACK(1, uint8_t)
QSIM_CALLBACK(2, uint16_t)
QSIM_CALLBACK(4, uint32_t)
QSIM_CALLBACK(8, uint64_t)
QSIM_CALLBACK(16, __int128)
#undef QSIM_CALLBACK
// The coverage counters that trace-loads needs alongside are not used.
void __sanitizer_cov_8bit_counters_init(char*, char*) {}
}

// ---------------------------------------------------------------------------
// Conversions of clang's __fp16 (the simulator's half). clang 14 calls these
// helpers with the half in an integer register, and libgcc does not provide
// them; newer clang calls __extendhfsf2 / __truncsfhf2 with _Float16 in SSE
// registers, which libgcc 12+ and compiler-rt provide. Round to nearest even.
// ---------------------------------------------------------------------------
#if defined(__clang__) && __clang_major__ < 15
extern "C" {
float __gnu_h2f_ieee(uint16_t h) {
  return qsim::half_bits_to_float(h);
}
uint16_t __gnu_f2h_ieee(float f) {
  return qsim::float_to_half_bits(f);
}
// double -> half goes through float (the two roundings can differ from one
// direct rounding only for doubles within 2^-37 relative of a half tie).
uint16_t __truncdfhf2(double d) {
  return qsim::float_to_half_bits(static_cast<float>(d));
}
}
#endif

// ---------------------------------------------------------------------------
// The launch interface (C, for ctypes and the plan runner)
// ---------------------------------------------------------------------------
extern "C" {

void qsim_set_threadgroup_limit(int64_t bytes) {
  qsim::g_threadgroup_limit = bytes;
}

int qsim_set_schedule(int schedule, uint64_t seed) {
  using qsim::Schedule;
  if (schedule < int(Schedule::Ascending) || schedule > int(Schedule::Random)) {
    return 1;
  }
  qsim::g_schedule = Schedule(schedule);
  qsim::g_rng = seed;
  return 0;
}

void qsim_set_race_detector(int on) {
  qsim::g_race_detector = on != 0;
}

const char* qsim_last_error() {
  return qsim::g_error.c_str();
}

// Frees every buffer.
void qsim_reset() {
  using namespace qsim;
  for (int s = kFirstBufferSlot; s < kMaxSlots; ++s) {
    if (g_regions[s].used) {
      unmap_region(s);
    }
  }
}

// A device buffer of nbytes; initialized = 0 for outputs and temporaries
// (reads of bytes the kernels did not write are reported). Returns its id
// (> 0) or -1.
int64_t qsim_alloc(int64_t nbytes, int initialized, const char* name) {
  using namespace qsim;
  try {
    ensure_arena();
    for (int s = kFirstBufferSlot; s < kMaxSlots; ++s) {
      if (!g_regions[s].used) {
        map_region(s, name, static_cast<uint64_t>(nbytes), initialized != 0);
        return s;
      }
    }
    g_error = "qsim: too many buffers";
  } catch (const std::exception& e) {
    g_error = e.what();
  }
  return -1;
}

void qsim_free(int64_t id) {
  using namespace qsim;
  if (id >= kFirstBufferSlot && id < kMaxSlots && g_regions[id].used) {
    unmap_region(static_cast<int>(id));
  }
}

// Bytes the kernels loaded from buffer `id` so far.
int64_t qsim_bytes_read(int64_t id) {
  return static_cast<int64_t>(qsim::g_regions[id].bytes_read);
}

void* qsim_data(int64_t id) {
  return qsim::g_regions[id].data;
}

// Names of the library's kernels, one per line.
int qsim_kernel_names(char* out, int len) {
  int n = 0;
  const qsim::KernelInfo* table = qsim_kernel_table(&n);
  std::string s;
  for (int i = 0; i < n; ++i) {
    s += table[i].name;
    s += '\n';
  }
  if (out && len > 0) {
    std::snprintf(out, static_cast<size_t>(len), "%s", s.c_str());
  }
  return static_cast<int>(s.size()) + 1;
}

// The library's function constants, one "index type name" line each.
int qsim_function_constants(char* out, int len) {
  int n = 0;
  const qsim::FunctionConstantInfo* table = qsim_function_constant_table(&n);
  std::string s;
  for (int i = 0; i < n; ++i) {
    s += std::to_string(table[i].index) + (table[i].type == qsim::FunctionConstantInfo::Bool ? " bool " : " int ") +
        table[i].name + "\n";
  }
  if (out && len > 0) {
    std::snprintf(out, static_cast<size_t>(len), "%s", s.c_str());
  }
  return static_cast<int>(s.size()) + 1;
}

// One dispatch: dispatch_threadgroups(grid, threads) of `kernel` with the
// given function constants (index, value), buffer bindings (index, buffer
// id, byte offset) and threadgroup memory length. Returns 0, or 1 with the
// report in qsim_last_error().
int qsim_launch(
    const char* kernel,
    int n_constants,
    const int* constant_index,
    const int64_t* constant_value,
    int n_bindings,
    const int* binding_index,
    const int64_t* binding_buffer,
    const int64_t* binding_offset,
    const uint32_t* grid,
    const uint32_t* threads,
    int64_t threadgroup_bytes) {
  using namespace qsim;
  g_error.clear();
  try {
    ensure_arena();
    load_constant_table();
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
  // The kernel.
  int n_kernels = 0;
  const KernelInfo* table = qsim_kernel_table(&n_kernels);
  const KernelInfo* k = nullptr;
  for (int i = 0; i < n_kernels; ++i) {
    if (std::strcmp(table[i].name, kernel) == 0) {
      k = &table[i];
    }
  }
  if (!k) {
    g_error = format("no kernel named '%s' in the library", kernel);
    return 1;
  }
  // Function constants.
  for (auto& c : g_constants) {
    c.set = false;
  }
  for (int i = 0; i < n_constants; ++i) {
    for (auto& c : g_constants) {
      if (c.info->index != constant_index[i]) {
        continue;
      }
      if (c.info->type == FunctionConstantInfo::Bool) {
        *static_cast<bool*>(c.info->storage) = constant_value[i] != 0;
      } else {
        *static_cast<int*>(c.info->storage) = static_cast<int>(constant_value[i]);
      }
      c.set = true;
    }
  }
  // Dimensions.
  const uint64_t n_threads = uint64_t(threads[0]) * threads[1] * threads[2];
  if (n_threads == 0 || n_threads > kMaxThreads) {
    g_error = format(
        "threads per threadgroup (%u,%u,%u) = %llu: must be 1..%d", threads[0],
        threads[1], threads[2], static_cast<unsigned long long>(n_threads), kMaxThreads);
    return 1;
  }
  if (threadgroup_bytes < 0 || threadgroup_bytes > g_threadgroup_limit) {
    g_error = format(
        "threadgroup memory length %lld exceeds the %lld bytes of the device",
        static_cast<long long>(threadgroup_bytes), static_cast<long long>(g_threadgroup_limit));
    return 1;
  }
  if (threadgroup_bytes % 16 != 0) {
    g_error = format(
        "threadgroup memory length %lld is not a multiple of 16 bytes (Metal requires it)",
        static_cast<long long>(threadgroup_bytes));
    return 1;
  }
  // Bindings: unbound indices point into a sentinel slot.
  for (int i = 0; i < 31; ++i) {
    g_launch.buffers[i] = slot_data(kUnboundSlot) + i * kSentinelStride;
  }
  std::vector<bool> bound(31, false);
  for (int i = 0; i < n_bindings; ++i) {
    const int idx = binding_index[i];
    const int64_t id = binding_buffer[i];
    if (idx < 0 || idx >= 31 || id < kFirstBufferSlot || id >= kMaxSlots || !g_regions[id].used) {
      g_error = format("invalid binding of buffer id %lld at index %d", static_cast<long long>(id), idx);
      return 1;
    }
    g_launch.buffers[idx] = g_regions[id].data + binding_offset[i];
    bound[idx] = true;
  }
  for (int i = 0; i < k->n_arguments; ++i) {
    const ArgumentInfo& a = k->arguments[i];
    if (a.kind != ArgumentInfo::Buffer) {
      continue;
    }
    if (a.function_constant) {
      bool set = false;
      for (const auto& c : g_constants) {
        set |= c.info->storage == static_cast<const void*>(a.enabled) && c.set;
      }
      if (!set) {
        g_error = format(
            "function constant '%s', which decides whether argument '%s' "
            "[[buffer(%d)]] exists, is not set by the launch",
            a.function_constant, a.name, a.index);
        return 1;
      }
    }
    const bool enabled = !a.enabled || *a.enabled;
    if (enabled && !bound[a.index]) {
      g_error = format(
          "kernel '%s' argument '%s' [[buffer(%d)]] is not bound", k->name, a.name, a.index);
      return 1;
    }
  }

  g_launch.kernel = k;
  for (int a = 0; a < 3; ++a) {
    g_launch.grid[a] = grid[a];
    g_launch.threads[a] = threads[a];
  }
  g_launch.n_threads = static_cast<uint32_t>(n_threads);
  g_launch.tg_length = static_cast<size_t>(threadgroup_bytes);
  g_launch.simd_slots.assign(((n_threads + kSimd - 1) / kSimd) * 2 * kSimd * 16, 0);
  try {
    map_region(kThreadgroupSlot, "threadgroup memory", static_cast<uint64_t>(threadgroup_bytes), false);
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
  Region& tg = g_regions[kThreadgroupSlot];
  g_interval = 0;
  g_shadow.assign(g_race_detector ? tg.size : 0, ByteShadow());

  // Faults that escape the checks end the launch with a report too.
  stack_t ss{};
  ss.ss_sp = g_alt_stack.data();
  ss.ss_size = g_alt_stack.size();
  stack_t old_ss;
  sigaltstack(&ss, &old_ss);
  struct sigaction sa{};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);

  int status = 0;
  if (sigsetjmp(g_abort, 1) == 0) {
    g_in_launch = true;
    g_arena_lo = reinterpret_cast<uintptr_t>(g_arena);
    g_arena_span = kMaxSlots * kSlotBytes;
    for (uint32_t z = 0; z < grid[2]; ++z) {
      for (uint32_t y = 0; y < grid[1]; ++y) {
        for (uint32_t x = 0; x < grid[0]; ++x) {
          g_launch.group[0] = x;
          g_launch.group[1] = y;
          g_launch.group[2] = z;
          // Fresh threadgroup memory: unwritten, filled with 0xff (NaN).
          std::memset(tg.data, 0xff, tg.size);
          std::fill(tg.written.begin(), tg.written.end(), 0);
          run_threadgroup();
        }
      }
    }
  } else {
    status = 1;
    // The fibers stopped mid-kernel: start them afresh next time.
    reset_fibers();
  }
  g_arena_span = 0;
  g_in_launch = false;
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
  sigaltstack(&old_ss, nullptr);
  return status;
}

} // extern "C"
