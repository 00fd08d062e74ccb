// Copyright © 2026 mlx-qsdpa contributors.
//
// The function constants of the quantized SDPA kernels. The host sets them
// per pipeline (csrc/backends/metal/dispatch_plan.cpp lists them); the compiler folds
// every branch on them, so one compiled kernel per (keys' format, head dim)
// serves all dtypes, masks, sinks, output modes and values' formats.
#pragma once

#include "quant_sdpa_params.h"

constant int fc_query_type [[function_constant(qsdpa::kFcQueryType)]];
constant int fc_key_scale_type [[function_constant(qsdpa::kFcKeyScaleType)]];
constant int fc_value_scale_type [[function_constant(qsdpa::kFcValueScaleType)]];
constant int fc_key_group_size [[function_constant(qsdpa::kFcKeyGroupSize)]];
constant bool fc_key_has_biases [[function_constant(qsdpa::kFcKeyHasBiases)]];
constant int fc_value_mode [[function_constant(qsdpa::kFcValueMode)]];
constant int fc_value_bits [[function_constant(qsdpa::kFcValueBits)]];
constant int fc_value_group_size [[function_constant(qsdpa::kFcValueGroupSize)]];
constant bool fc_value_has_biases [[function_constant(qsdpa::kFcValueHasBiases)]];
constant bool fc_causal [[function_constant(qsdpa::kFcCausal)]];
constant bool fc_bool_mask [[function_constant(qsdpa::kFcBoolMask)]];
constant bool fc_float_mask [[function_constant(qsdpa::kFcFloatMask)]];
constant bool fc_has_sinks [[function_constant(qsdpa::kFcHasSinks)]];
constant bool fc_write_lse [[function_constant(qsdpa::kFcWriteLse)]];
constant bool fc_write_final [[function_constant(qsdpa::kFcWriteFinal)]];
constant bool fc_write_partials [[function_constant(qsdpa::kFcWritePartials)]];
