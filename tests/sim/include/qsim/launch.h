// Copyright © 2026 mlx-qsdpa contributors.
//
// The simulator's C launch interface (runtime.cpp), for ctypes and for the
// plan runner.
#pragma once

#include <cstdint>

extern "C" {
const char* qsim_last_error();
void qsim_reset();
int64_t qsim_alloc(int64_t nbytes, int initialized, const char* name);
void qsim_free(int64_t id);
void* qsim_data(int64_t id);
int64_t qsim_bytes_read(int64_t id);
int qsim_kernel_names(char* out, int len);
int qsim_function_constants(char* out, int len);
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
    int64_t threadgroup_bytes);
// The largest threadgroup memory a launch may ask for: 32768 bytes (Apple
// GPUs) unless changed; the CUDA front end raises it to its per-block limit.
void qsim_set_threadgroup_limit(int64_t bytes);
// The order in which the threads of a threadgroup run (runtime.cpp, "The
// schedules"): 0 ascending (the default), 1 descending, 2 random from
// `seed`. Applies to the launches that follow; returns 0, or 1 for an
// unknown schedule.
int qsim_set_schedule(int schedule, uint64_t seed);
// The race detector on threadgroup memory: on (1, the default) or off (0).
void qsim_set_race_detector(int on);
}
