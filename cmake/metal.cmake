# Metal backend (macOS, MLX built with Metal): the host code of
# csrc/backends/metal and mlx_qsdpa.metallib, built from
# csrc/backends/metal/*.metal by Apple's Metal compiler
# through MLX's mlx_build_metallib (from MLX's CMake package). The library
# finds the metallib next to itself at run time (csrc/backends/metal/
# quant_sdpa_metal.cpp), so both are installed into the same directory.

get_filename_component(MLX_QSDPA_ROOT ${CMAKE_CURRENT_LIST_DIR}/.. ABSOLUTE)
set(MLX_QSDPA_METAL_DIR ${MLX_QSDPA_ROOT}/csrc/backends/metal)

target_sources(mlx_qsdpa PRIVATE ${MLX_QSDPA_ROOT}/csrc/backends/metal/dispatch_plan.cpp
                                 ${MLX_QSDPA_ROOT}/csrc/backends/metal/quant_sdpa_metal.cpp)
# quant_sdpa_params.h (the kernels' interface) is shared with the host code.
target_include_directories(mlx_qsdpa PRIVATE ${MLX_QSDPA_METAL_DIR})
# The Python bindings compile in the Metal test entry point
# (backends/metal/test_hooks.h) when this is defined. Build tree only: the
# installed package's C++ users do not see it.
target_compile_definitions(mlx_qsdpa PUBLIC $<BUILD_INTERFACE:MLX_QSDPA_GPU_METAL>)

file(GLOB MLX_QSDPA_METAL_SOURCES CONFIGURE_DEPENDS ${MLX_QSDPA_METAL_DIR}/*.metal)
file(GLOB MLX_QSDPA_METAL_HEADERS CONFIGURE_DEPENDS ${MLX_QSDPA_METAL_DIR}/*.h)
mlx_build_metallib(
  TARGET
  mlx_qsdpa_metallib
  TITLE
  mlx_qsdpa
  SOURCES
  ${MLX_QSDPA_METAL_SOURCES}
  INCLUDE_DIRS
  ${MLX_QSDPA_ROOT}/csrc
  ${MLX_QSDPA_METAL_DIR}
  ${MLX_INCLUDE_DIRS}
  DEPS
  ${MLX_QSDPA_METAL_HEADERS}
  ${MLX_QSDPA_ROOT}/csrc/mlx_qsdpa/formats.h
  ${MLX_QSDPA_ROOT}/csrc/mlx_qsdpa/attention_math.h
  OUTPUT_DIRECTORY
  ${CMAKE_CURRENT_BINARY_DIR})
add_dependencies(mlx_qsdpa mlx_qsdpa_metallib)

# Next to libmlx_qsdpa in the wheel (the package directory, mlx_qsdpa/).
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/mlx_qsdpa.metallib DESTINATION mlx_qsdpa)
