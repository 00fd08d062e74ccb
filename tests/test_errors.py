"""Every bad input raises ValueError or TypeError naming the argument (and
what is allowed), at call time, never a crash.

Every input here (random data, mx.quantize, and the bad variants made with
astype, slices, reshapes, mx.zeros/ones) is built on the CPU stream (the
autouse fixture below and oracle.py); only quant_sdpa runs on the test
device, through the explicit ``stream=device`` of every call."""

import re

import mlx.core as mx
import numpy as np
import pytest

from mlx_qsdpa import _ext, quant_sdpa
import oracle
from qsdpa_case import F16, F32, SCALE_CODE_FORMATS

B, HQ, HKV, LQ, LK, D = 2, 4, 2, 3, 10, 64
ARGS = ("queries", "keys", "key_scales", "key_biases", "values", "value_scales", "value_biases")


@pytest.fixture(autouse=True)
def _inputs_on_the_cpu():
    """Ops that build inputs inside a test run on the CPU stream."""
    with mx.stream(oracle.CPU):
        yield


def _inputs(mode="affine", bits=4, gs=64, d=D, lk=LK, hkv=HKV, b=B, dtype=F16, seed=0):
    q, k, v = oracle.make_qkv(b, HQ, hkv, LQ, lk, d, dtype=dtype, seed=seed)
    kq, vq = oracle.quantize(k, gs, bits, mode), oracle.quantize(v, gs, bits, mode)
    return dict(zip(ARGS, (q, *kq, *vq)))


@pytest.fixture(scope="module")
def affine():
    return _inputs()


@pytest.fixture(scope="module")
def mxfp4():
    return _inputs("mxfp4", 4, 32)


def call(arrays, device=None, **kw):
    kw.setdefault("scale", 0.125)
    if "mode" not in kw and arrays["key_biases"] is None and arrays["value_biases"] is None:
        kw.setdefault("mode", "mxfp4")
        kw.setdefault("group_size", 32)
    args = [arrays[n] for n in ARGS]
    return quant_sdpa(*args, stream=device, **kw)


def replaced(arrays, **kw):
    out = dict(arrays)
    out.update(kw)
    return out


def test_good_inputs_work(device, affine, mxfp4):
    # The baselines the cases below break one argument of.
    mx.eval(call(affine, device), call(mxfp4, device))


# --- format ---------------------------------------------------------------

FORMAT_CASES = [
    ("affine", 7, 64, "bits=7"),
    ("affine", 0, 64, "bits=0"),
    ("affine", 16, 64, "bits=16"),
    ("affine", 4, 16, "group_size=16"),
    ("affine", 4, 256, "group_size=256"),
    ("mxfp4", 4, 64, "group_size=64"),
    ("mxfp4", 8, 32, "bits=8"),
    ("mxfp8", 4, 32, "bits=4"),
    ("nvfp4", 4, 32, "group_size=32"),
    ("nvfp4", 8, 16, "bits=8"),
]


@pytest.mark.parametrize("mode,bits,gs,what", FORMAT_CASES)
def test_unsupported_format(device, affine, mxfp4, mode, bits, gs, what):
    arrays = affine if mode == "affine" else mxfp4
    with pytest.raises(ValueError, match=rf"unsupported format \(mode='{mode}'.*{what}.*allowed: mode='affine'"):
        call(arrays, device, mode=mode, bits=bits, group_size=gs)


@pytest.mark.parametrize("mode", ["int4", "AFFINE", "", "mxfp6", "fp4"])
def test_bad_mode_string(device, affine, mode):
    with pytest.raises(ValueError, match=r"mode must be one of 'affine', 'mxfp4', 'mxfp8', 'nvfp4'"):
        call(affine, device, mode=mode)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(mode=None), "mode must be a str"),
        (dict(mode=4), "mode must be a str"),
        (dict(bits="4"), "bits must be an int"),
        (dict(bits=4.0), "bits must be an int"),
        (dict(bits=True), "bits must be an int"),
        (dict(group_size=64.0), "group_size must be an int"),
        (dict(group_size=None), "group_size must be an int"),
        # NumPy integers are ints (test_api.py); NumPy floats and bools are not.
        (dict(group_size=64.5), r"group_size must be an int \(a Python or NumPy integer\); got float\."),
        (dict(group_size=np.float32(64)), r"group_size must be an int \(a Python or NumPy integer\); got float32\."),
        (dict(bits=np.float64(4)), r"bits must be an int \(a Python or NumPy integer\); got float64\."),
        (dict(bits=np.bool_(True)), r"bits must be an int \(a Python or NumPy integer\); got bool"),
        (dict(group_size="64"), r"group_size must be an int \(a Python or NumPy integer\); got str\."),
    ],
)
def test_format_argument_types(device, affine, kw, match):
    with pytest.raises(TypeError, match=match):
        call(affine, device, **kw)


# --- scale ----------------------------------------------------------------


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan"), 1e39, np.float32("inf"), np.float64("nan")])
def test_non_finite_scale(device, affine, scale):
    with pytest.raises(ValueError, match="scale must be a finite float"):
        call(affine, device, scale=scale)


@pytest.mark.parametrize("scale", ["0.1", None, True, mx.array(0.1), [0.1], np.bool_(True), np.array([0.1]), 1j])
def test_scale_type(device, affine, scale):
    # NumPy real scalars are floats (test_api.py); strings, arrays, bools are not.
    with pytest.raises(TypeError, match=r"scale must be a float \(a Python or NumPy real number\); got "):
        call(affine, device, scale=scale)


# --- queries --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(B, HQ, D), (B * HQ * LQ, D), (1, B, HQ, LQ, D)])
def test_queries_not_4d(device, affine, shape):
    q = mx.random.normal(shape).astype(F16)
    with pytest.raises(ValueError, match=r"queries must have 4 dimensions \[B, Hq, Lq, D\]"):
        call(replaced(affine, queries=q), device)


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint32, mx.bool_, mx.float64, mx.int8])
def test_queries_dtype(device, affine, dtype):
    q = affine["queries"].astype(dtype)
    with pytest.raises(TypeError, match=r"queries must be float16, bfloat16 or float32; got .*" + str(dtype).split(".")[-1]):
        call(replaced(affine, queries=q), device)


# --- packed keys / values -------------------------------------------------


@pytest.mark.parametrize("name", ["keys", "values"])
@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.float32, mx.uint64])
def test_packed_dtype(device, affine, name, dtype):
    with pytest.raises(TypeError, match=rf"{name} must be uint32"):
        call(replaced(affine, **{name: affine[name].astype(dtype)}), device)


@pytest.mark.parametrize("name", ["keys", "values"])
def test_packed_not_4d(device, affine, name):
    w = affine[name].reshape(B * HKV, LK, -1)
    with pytest.raises(ValueError, match=rf"{name} must have 4 dimensions"):
        call(replaced(affine, **{name: w}), device)


def test_packed_width_mismatch_bits(device, affine):
    # Quantized with 4 bits, called with bits=8.
    with pytest.raises(ValueError, match=r"keys last dimension must be D \* bits / 32 = 64 \* 8 / 32 = 16"):
        call(affine, device, bits=8)


def test_packed_width_mismatch_values_only(device, affine):
    v8 = _inputs(bits=8)
    arrays = replaced(affine, values=v8["values"], value_scales=v8["value_scales"], value_biases=v8["value_biases"])
    with pytest.raises(ValueError, match=r"values last dimension must be D \* bits / 32"):
        call(arrays, device)


def test_packed_width_mismatch_head_dim(device, affine):
    # Queries with D=128 against keys quantized with D=64.
    q = mx.random.normal((B, HQ, LQ, 128)).astype(F16)
    with pytest.raises(ValueError, match=r"keys last dimension must be D \* bits / 32 = 128"):
        call(replaced(affine, queries=q), device)


def test_packed_width_mismatch_mode(device, affine):
    # 8-bit mxfp8 words called as mxfp4 (bits 4).
    m8 = _inputs("mxfp8", 8, 32)
    with pytest.raises(ValueError, match=r"keys last dimension"):
        call(m8, device, mode="mxfp4", bits=4, group_size=32)


# --- scales ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["key_scales", "value_scales"])
def test_scales_shape(device, affine, name):
    bad = affine[name][:, :, :-1]
    with pytest.raises(ValueError, match=rf"{name} must have shape \(2, 2, 10, 1\)"):
        call(replaced(affine, **{name: bad}), device)


def test_scales_not_4d(device, affine):
    with pytest.raises(ValueError, match=r"key_scales must have 4 dimensions"):
        call(replaced(affine, key_scales=affine["key_scales"][0]), device)


def test_group_size_mismatch_caught_by_scales(device):
    # Words of 4-bit gs32 have the width of 4-bit gs64; the scales differ.
    arrays = _inputs(gs=32)
    with pytest.raises(ValueError, match=r"key_scales must have shape \(2, 2, 10, 1\).*group_size 64.*got \(2, 2, 10, 2\)"):
        call(arrays, device, group_size=64)


@pytest.mark.parametrize("name", ["key_scales", "value_scales"])
@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.float64])
def test_affine_scales_dtype(device, affine, name, dtype):
    bias = name.replace("scales", "biases")
    arrays = replaced(affine, **{name: affine[name].astype(dtype), bias: affine[bias].astype(dtype)})
    with pytest.raises(TypeError, match=rf"{name} must be float16, bfloat16 or float32 for mode 'affine'"):
        call(arrays, device)


@pytest.mark.parametrize("name", ["key_scales", "value_scales"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32, mx.int8])
def test_fp_scales_dtype(device, mxfp4, name, dtype):
    with pytest.raises(TypeError, match=rf"{name} must be uint8"):
        call(replaced(mxfp4, **{name: mxfp4[name].astype(dtype)}), device)


# --- biases ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["key_biases", "value_biases"])
def test_biases_missing_for_affine(device, affine, name):
    with pytest.raises(ValueError, match=rf"{name} is required for mode 'affine'"):
        call(replaced(affine, **{name: None}), device, mode="affine")


@pytest.mark.parametrize("mode,bits,gs", SCALE_CODE_FORMATS)
@pytest.mark.parametrize("name", ["key_biases", "value_biases"])
def test_biases_given_for_fp_modes(device, name, mode, bits, gs):
    arrays = _inputs(mode, bits, gs)
    fake = mx.zeros(arrays["key_scales"].shape, F16)
    with pytest.raises(ValueError, match=rf"{name} must be None for the fp modes"):
        call(replaced(arrays, **{name: fake}), device, mode=mode, bits=bits, group_size=gs)


@pytest.mark.parametrize("name", ["key_biases", "value_biases"])
def test_biases_dtype(device, affine, name):
    scales = name.replace("biases", "scales")
    with pytest.raises(TypeError, match=rf"{name} must have the dtype of {scales} \(float16\); got float32"):
        call(replaced(affine, **{name: affine[name].astype(F32)}), device)


@pytest.mark.parametrize("name", ["key_biases", "value_biases"])
def test_biases_shape(device, affine, name):
    with pytest.raises(ValueError, match=rf"{name} must have the shape of"):
        call(replaced(affine, **{name: affine[name][:1]}), device)


# --- shapes that do not agree ---------------------------------------------


def test_heads_not_divisible(device):
    arrays = _inputs(hkv=3)  # Hq = 4
    msg = r"number of query heads \(4\) must be a multiple of the number of key/value heads \(3\)"
    with pytest.raises(ValueError, match=msg):
        call(arrays, device)


def test_more_kv_heads_than_query_heads(device):
    arrays = _inputs(hkv=8)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of .* key/value heads \(8\)"):
        call(arrays, device)


@pytest.mark.parametrize("name", ["keys", "values"])
def test_batch_mismatch(device, affine, name):
    one = _inputs(b=1)
    prefix = name[:-1]
    names = (name, f"{prefix}_scales", f"{prefix}_biases")
    arrays = replaced(affine, **{n: one[n] for n in names})
    with pytest.raises(ValueError, match=rf"{name} has batch size 1 but queries have 2"):
        call(arrays, device)


@pytest.mark.parametrize("what", ["length", "heads"])
def test_keys_values_shape_mismatch(device, affine, what):
    other = _inputs(lk=LK + 1) if what == "length" else _inputs(hkv=1)
    names = ("values", "value_scales", "value_biases")
    arrays = replaced(affine, **{n: other[n] for n in names})
    with pytest.raises(ValueError, match=r"keys and values must have the same \[B, Hkv, Lk\]"):
        call(arrays, device)


@pytest.mark.parametrize(
    "d,mode,bits,gs",
    [(80, "affine", 4, 32), (80, "mxfp4", 4, 32), (80, "affine", 4, 64), (96, "affine", 4, 64),
     (96, "affine", 8, 128), (40, "nvfp4", 4, 16)],
)  # fmt: skip
def test_head_dim_not_divisible_by_group_size(device, d, mode, bits, gs):
    # D=80 exists in the matrix only for nvfp4 (gs 16): 80 % 32 != 0.
    q = mx.random.normal((B, HQ, LQ, d)).astype(F16)
    base = _inputs(mode, bits, gs, d=128 if d != 40 else 64)
    with pytest.raises(ValueError, match=rf"head dimension D .* multiple of group_size={gs}; got D={d}"):
        call(replaced(base, queries=q), device, mode=mode, bits=bits, group_size=gs)


# --- mask -----------------------------------------------------------------


@pytest.mark.parametrize("mask", ["causal_lower", "", "Causal", "none"])
def test_mask_bad_string(device, affine, mask):
    with pytest.raises(ValueError, match=r"mask must be None, 'causal' or an mx.array; got the string"):
        call(affine, device, mask=mask)


@pytest.mark.parametrize("mask", [np.ones((LQ, LK), bool), [[True] * LK] * LQ, 1, True, 0.5])
def test_mask_wrong_type(device, affine, mask):
    with pytest.raises(TypeError, match=r"mask must be None, 'causal' or an mx.array; got "):
        call(affine, device, mask=mask)


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.int8, mx.float64, mx.uint32])
def test_mask_wrong_dtype(device, affine, dtype):
    mask = mx.ones((LQ, LK)).astype(dtype)
    msg = r"mask must be .* a bool array .* or an additive float16/bfloat16/float32 array; got an array of dtype"
    with pytest.raises(TypeError, match=msg):
        call(affine, device, mask=mask)


@pytest.mark.parametrize(
    "shape",
    [(LQ, LK + 1), (LQ + 1, LK), (LK, 2), (3, LQ, LK), (B + 1, 1, LQ, LK), (B, HQ, LQ, LK, 1),
     (1, 1, 1, LQ, LK), (HKV, LQ, LK)],  # fmt: skip
)
def test_mask_not_broadcastable(device, affine, shape):
    # 5-D masks are refused too (at most [B, Hq, Lq, Lk]); a mask per KV
    # head [Hkv, Lq, Lk] does not broadcast to Hq = 4 heads.
    for dtype in (mx.bool_, F32):
        mask = mx.ones(shape).astype(dtype)
        msg = r"mask of shape .* does not broadcast to \[B, Hq, Lq, Lk\] = \(2, 4, 3, 10\)"
        with pytest.raises(ValueError, match=msg):
            call(affine, device, mask=mask)


# --- sinks ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(HQ + 1,), (HKV,), (1, HQ), (), (B, HQ)])
def test_sinks_shape(device, affine, shape):
    with pytest.raises(ValueError, match=r"sinks must have shape \[Hq\] = \(4,\)"):
        call(affine, device, sinks=mx.zeros(shape))


@pytest.mark.parametrize("dtype", [mx.int32, mx.bool_, mx.float64, mx.uint8])
def test_sinks_dtype(device, affine, dtype):
    with pytest.raises(TypeError, match=r"sinks must be float16, bfloat16 or float32"):
        call(affine, device, sinks=mx.zeros((HQ,)).astype(dtype))


# --- non-array arguments --------------------------------------------------


@pytest.mark.parametrize("name", ["queries", "keys", "key_scales", "values", "value_scales"])
@pytest.mark.parametrize("kind", ["numpy", "list", "none"])
def test_required_arrays_must_be_mx_arrays(device, affine, name, kind):
    a = affine[name]
    bad = {"numpy": np.array(a), "list": np.array(a).tolist(), "none": None}[kind]
    with pytest.raises(TypeError, match=rf"{name} must be an mx.array; got"):
        call(replaced(affine, **{name: bad}), device)


@pytest.mark.parametrize("name", ["key_biases", "value_biases"])
@pytest.mark.parametrize("kind", ["numpy", "list"])
def test_optional_arrays_must_be_mx_arrays(device, affine, name, kind):
    a = np.array(affine[name])
    bad = a if kind == "numpy" else a.tolist()
    with pytest.raises(TypeError, match=rf"{name} must be an mx.array or None"):
        call(replaced(affine, **{name: bad}), device)


@pytest.mark.parametrize("sinks", [np.zeros(HQ, np.float32), [0.0] * HQ, 0.5])
def test_sinks_must_be_an_mx_array(device, affine, sinks):
    with pytest.raises(TypeError, match=r"sinks must be an mx.array or None"):
        call(affine, device, sinks=sinks)


def test_stream_wrong_type(affine):
    with pytest.raises(TypeError, match="stream"):
        call(affine, "cpu")


# --- the C++ entry point's own mask checks ---------------------------------


@pytest.mark.parametrize(
    "mask_mode,mask_arr,match",
    [
        ("", True, "mask_arr was given but mask_mode is ''"),
        ("causal", True, "mask_mode 'causal' takes no mask array"),
        ("array", False, "mask_mode 'array' needs a mask array"),
        ("sliding", False, "mask must be None, 'causal' or an array; got mask mode 'sliding'"),
    ],
)
def test_ext_mask_mode(device, affine, mask_mode, mask_arr, match):
    args = [affine[n] for n in ARGS]
    m = mx.ones((LQ, LK), mx.bool_) if mask_arr else None
    with pytest.raises(ValueError, match=re.escape(match)):
        _ext.quant_sdpa(*args, 0.125, mask_mode, m, None, 64, 4, "affine", None, None, None, None, 0, False, device)


def test_errors_are_raised_at_call_time_and_leave_the_op_usable(device, affine):
    # The error comes from building the graph, not from a later eval.
    with pytest.raises(ValueError):
        call(affine, device, bits=3)
    out = call(affine, device)
    mx.eval(out)
    assert np.isfinite(np.array(out.astype(F32))).all()
