// Copyright © 2026 mlx-qsdpa contributors.
//
// The function constants of the quantized SDPA kernels. The host sets them
// per pipeline (csrc/backends/metal/dispatch_plan.cpp lists them); the compiler folds
// every branch on them, so one compiled kernel per (format, head dim) serves
// all dtypes, masks, sinks and output modes.
#pragma once

#include "quant_sdpa_params.h"

constant int fc_query_type [[function_constant(qsdpa::kFcQueryType)]];
constant int fc_key_scale_type [[function_constant(qsdpa::kFcKeyScaleType)]];
constant int fc_value_scale_type [[function_constant(qsdpa::kFcValueScaleType)]];
constant int fc_group_size [[function_constant(qsdpa::kFcGroupSize)]];
constant bool fc_has_biases [[function_constant(qsdpa::kFcHasBiases)]];
constant bool fc_causal [[function_constant(qsdpa::kFcCausal)]];
constant bool fc_bool_mask [[function_constant(qsdpa::kFcBoolMask)]];
constant bool fc_float_mask [[function_constant(qsdpa::kFcFloatMask)]];
constant bool fc_has_sinks [[function_constant(qsdpa::kFcHasSinks)]];
constant bool fc_write_lse [[function_constant(qsdpa::kFcWriteLse)]];
constant bool fc_write_final [[function_constant(qsdpa::kFcWriteFinal)]];
constant bool fc_write_partials [[function_constant(qsdpa::kFcWritePartials)]];
