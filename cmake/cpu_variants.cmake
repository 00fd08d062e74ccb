# The CPU kernel's instruction-set variants (csrc/backends/cpu/kernel.h): kernel.cpp
# is compiled once per target into an object library of its own, with the
# target's flags on that file alone; csrc/backends/cpu/variants.cpp picks one at run
# time. The list here and the one in variants.cpp follow the same
# architecture tests.
include(CheckCXXCompilerFlag)

# qsdpa_cpu_variant(<Variant symbol> <name> <flags>...)
function(qsdpa_cpu_variant symbol name)
  string(MAKE_C_IDENTIFIER "${name}" ns)
  set(lib mlx_qsdpa_cpu_${ns})
  add_library(${lib} OBJECT csrc/backends/cpu/kernel.cpp)
  target_include_directories(${lib} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
  target_compile_definitions(${lib} PRIVATE QSDPA_CPU_VARIANT=${symbol}
                                            QSDPA_CPU_VARIANT_NAME="${name}"
                                            QSDPA_CPU_VARIANT_NS=${ns})
  # -Wno-psabi: the vector types never cross a non-inlined call boundary
  # whose ABI another build would see (everything is internal).
  target_compile_options(${lib} PRIVATE ${ARGN} -ffp-contract=fast -Wno-psabi
                                        $<$<CONFIG:Release>:-O3>)
  set_target_properties(${lib} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  target_sources(mlx_qsdpa PRIVATE $<TARGET_OBJECTS:${lib}>)
endfunction()

# The flags of an x86-64 microarchitecture level, spelled out for compilers
# that do not know the level's name.
function(qsdpa_x86_level_flags level explicit out)
  string(MAKE_C_IDENTIFIER "MLX_QSDPA_HAS_${level}" var)
  check_cxx_compiler_flag("-march=${level}" ${var})
  if(${var})
    set(${out} "-march=${level}" PARENT_SCOPE)
  else()
    set(${out} ${explicit} PARENT_SCOPE)
  endif()
endfunction()

set(MLX_QSDPA_CPU_VARIANTS "")
if(MLX_QSDPA_NATIVE_CPU)
  qsdpa_cpu_variant(kVariantNative native -march=native)
  target_compile_definitions(mlx_qsdpa PRIVATE QSDPA_CPU_NATIVE)
  list(APPEND MLX_QSDPA_CPU_VARIANTS native)
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
  set(_v2 -msse4.2 -mpopcnt -mssse3 -mcx16 -msahf)
  set(_v3 ${_v2} -mavx -mavx2 -mfma -mf16c -mbmi -mbmi2 -mlzcnt -mmovbe)
  set(_v4 ${_v3} -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512cd)
  qsdpa_x86_level_flags(x86-64-v2 "${_v2}" flags_v2)
  qsdpa_x86_level_flags(x86-64-v3 "${_v3}" flags_v3)
  qsdpa_x86_level_flags(x86-64-v4 "${_v4}" flags_v4)
  qsdpa_cpu_variant(kVariantX86V4 x86-64-v4 ${flags_v4})
  qsdpa_cpu_variant(kVariantX86V3 x86-64-v3 ${flags_v3})
  qsdpa_cpu_variant(kVariantX86V2 x86-64-v2 ${flags_v2})
  list(APPEND MLX_QSDPA_CPU_VARIANTS x86-64-v4 x86-64-v3 x86-64-v2)
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "^(aarch64|arm64|ARM64)$")
  qsdpa_cpu_variant(kVariantArm64Neon arm64-neon)
  list(APPEND MLX_QSDPA_CPU_VARIANTS arm64-neon)
else()
  qsdpa_cpu_variant(kVariantGeneric generic)
  list(APPEND MLX_QSDPA_CPU_VARIANTS generic)
endif()
message(STATUS "mlx_qsdpa: CPU kernel variants = ${MLX_QSDPA_CPU_VARIANTS}")
