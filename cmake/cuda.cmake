# CUDA backend (MLX's CUDA build): the decode kernels of csrc/backends/cuda/*.cu,
# their launch plan (launch_plan.cpp, plain C++) and the host code
# (quant_sdpa_cuda.cpp), compiled into the mlx_qsdpa library.
#
# The kernels are launched through MLX's CUDA command encoder as driver
# handles taken with this library's own CUDA runtime, which must therefore be
# the shared one (libmlx links its runtime statically; a kernel registered in
# a static runtime of ours would be unknown to MLX's graph).

# Ampere and Hopper machine code, plus Hopper PTX that newer GPUs JIT.
# The target exists before this file runs, so the property is set on it
# directly (CMAKE_CUDA_ARCHITECTURES, when given, still wins).
if(CMAKE_CUDA_ARCHITECTURES)
  set(MLX_QSDPA_CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
else()
  set(MLX_QSDPA_CUDA_ARCHITECTURES "80-real;90-real;90-virtual")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

get_filename_component(MLX_QSDPA_ROOT ${CMAKE_CURRENT_LIST_DIR}/.. ABSOLUTE)
file(GLOB MLX_QSDPA_CUDA_SOURCES CONFIGURE_DEPENDS ${MLX_QSDPA_ROOT}/csrc/backends/cuda/*.cu)
target_sources(
  mlx_qsdpa PRIVATE ${MLX_QSDPA_CUDA_SOURCES} ${MLX_QSDPA_ROOT}/csrc/backends/cuda/launch_plan.cpp
                    ${MLX_QSDPA_ROOT}/csrc/backends/cuda/quant_sdpa_cuda.cpp)
# csrc/backends/cuda/params.h is the interface between the kernels and the host code.
target_include_directories(mlx_qsdpa PRIVATE ${MLX_QSDPA_ROOT})
# The Python bindings (built in this tree, linked to mlx_qsdpa) expose the
# CUDA backend's private test entry point (launch_plan.h's
# set_test_overrides) only where it exists; installed C++ users do not see
# the definition.
target_compile_definitions(mlx_qsdpa INTERFACE $<BUILD_INTERFACE:MLX_QSDPA_CUDA_BACKEND=1>)
target_link_libraries(mlx_qsdpa PRIVATE CUDA::cudart)
set_target_properties(
  mlx_qsdpa
  PROPERTIES CUDA_ARCHITECTURES "${MLX_QSDPA_CUDA_ARCHITECTURES}"
             CUDA_RUNTIME_LIBRARY Shared
             CUDA_STANDARD 20
             CUDA_STANDARD_REQUIRED ON)
# -lineinfo: compute-sanitizer and profilers map findings to source lines.
target_compile_options(mlx_qsdpa PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo>)

# MLX's CUDA headers (mlx/backend/cuda/device.h) include fmt.
find_path(
  MLX_QSDPA_FMT_INCLUDE_DIR fmt/format.h
  HINTS $ENV{FMT_INCLUDE_DIR} ${MLX_INCLUDE_DIRS})
if(NOT MLX_QSDPA_FMT_INCLUDE_DIR)
  message(FATAL_ERROR "mlx_qsdpa: MLX's CUDA headers need fmt; set FMT_INCLUDE_DIR to a directory holding fmt/format.h")
endif()
target_include_directories(mlx_qsdpa PRIVATE ${MLX_QSDPA_FMT_INCLUDE_DIR})
target_compile_definitions(mlx_qsdpa PRIVATE FMT_HEADER_ONLY=1)
