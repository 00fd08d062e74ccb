// Copyright © 2026 mlx-qsdpa contributors.
//
// A small persistent pool for the CPU kernel. MLX runs a CPU primitive on
// its stream's single worker thread; a decode step is one call over the
// whole cache, so the kernel spreads its work items over all cores itself.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_qsdpa::cpu {

class ThreadPool {
 public:
  // Threads = MLX_QSDPA_NUM_THREADS if set, else the hardware concurrency.
  // That variable is the user's thread count, as OMP_NUM_THREADS is for
  // OpenMP programs (README, Settings), and the library's only one read from
  // the environment (tests/test_product_code.py).
  static ThreadPool& instance() {
    static ThreadPool pool(default_threads());
    return pool;
  }

  int size() const {
    return static_cast<int>(workers_.size()) + 1; // + the calling thread
  }

  // Runs fn(i) for i in [0, n) on all threads; returns when all are done.
  // Items are handed out dynamically (work stealing by an atomic counter),
  // so uneven items (causal masks, the last key block) balance out.
  void parallel_for(int n, const std::function<void(int)>& fn) {
    if (n <= 0) {
      return;
    }
    if (n == 1 || workers_.empty()) {
      for (int i = 0; i < n; ++i) {
        fn(i);
      }
      return;
    }
    std::unique_lock<std::mutex> call_lock(call_mutex_); // one job at a time
    {
      std::lock_guard<std::mutex> lk(m_);
      job_ = &fn;
      n_items_ = n;
      next_.store(0);
      active_ = static_cast<int>(workers_.size());
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    run_items();
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [&] { return active_ == 0; });
    job_ = nullptr;
    if (error_) {
      std::rethrow_exception(error_);
    }
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : workers_) {
      t.join();
    }
  }

 private:
  static int default_threads() {
    if (const char* env = std::getenv("MLX_QSDPA_NUM_THREADS")) {
      int n = std::atoi(env);
      if (n > 0) {
        return n;
      }
    }
    return std::max(1u, std::thread::hardware_concurrency());
  }

  explicit ThreadPool(int threads) {
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this] { worker_loop(); });
    }
  }

  void run_items() {
    for (int i = next_.fetch_add(1); i < n_items_; i = next_.fetch_add(1)) {
      try {
        (*job_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(m_);
        if (!error_) {
          error_ = std::current_exception();
        }
      }
    }
  }

  void worker_loop() {
    long seen = 0;
    while (true) {
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) {
          return;
        }
        seen = generation_;
      }
      run_items();
      {
        std::lock_guard<std::mutex> lk(m_);
        if (--active_ == 0) {
          done_cv_.notify_one();
        }
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex call_mutex_;
  std::mutex m_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  const std::function<void(int)>* job_ = nullptr;
  int n_items_ = 0;
  std::atomic<int> next_{0};
  int active_ = 0;
  long generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

} // namespace mlx_qsdpa::cpu
