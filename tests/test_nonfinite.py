"""NaN and inf in the inputs behave as in MLX's own SDPA
(mx.fast.scaled_dot_product_attention on the dequantized cache), on the
test device (QSDPA_DEVICE), and through the GPU backends' dequantize
fallback (which runs on any device).

The semantics (oracle.attention64 computes them in float64):
* a query row whose visible scores hold a NaN or +inf (from the query, a
  visible key's decoded value or an additive mask entry; the sink counts
  as a score) is NaN in every output element and in lse;
* -inf scores (causal, bool False, additive -inf) have probability 0, and
  a row that sees no key gives zeros and lse = -inf (with a sink: the
  sink-only result);
* a NaN in a visible key's decoded value reaches the output through
  p @ v: the elements of that value's group are NaN in the rows that see
  the key, and only there.

Each case poisons one input element (or masks one whole row) at a query
row and a key it sees (qsdpa_case.POISONS, poison_site); the other rows
of the call, those of the same kv head included, must stay exact. The
shapes cover single-token decode and Lq > 1, GQA, the three query dtypes,
sinks, lse on and off, and contexts long enough that the GPU kernels
split the keys (CUDA: 512 keys per split at the least; Metal: 2-pass from
512 keys), so the poison has to survive the merge of the splits.
"""

import mlx.core as mx
import numpy as np
import pytest

from qsdpa_case import BF16, F16, F32, POISONS, Case, assert_matches, build, emptied_row, poison_premise, run

# Shapes: (id, Case). Masks are chosen per poison below.
SHAPES = [
    ("decode-f16", Case(Hq=8, Hkv=2, Lq=1, Lk=300, D=128, dtype=F16, seed=1)),
    ("decode-bf16-sinks", Case(Hq=4, Hkv=1, Lq=1, Lk=200, D=64, fmt=("nvfp4", 4, 16), dtype=BF16, sinks="f32", seed=2)),
    ("prefill-f32", Case(Hq=4, Hkv=2, Lq=5, Lk=120, D=64, fmt=("affine", 8, 32), dtype=F32, seed=3)),
    ("long-f16-nolse", Case(Hq=4, Hkv=1, Lq=1, Lk=4096, D=128, dtype=F16, lse=False, seed=4)),
    ("long-bf16-lq4-sinks", Case(Hq=4, Hkv=2, Lq=4, Lk=2500, D=64, dtype=BF16, sinks="bf16", seed=5)),
]

# The mask each poison runs under, by shape: poisons of the mask need a
# mask of their kind; the others alternate between none/causal and a bool
# mask (whose False entries must not hide the poisoned key: poisoned()
# makes it visible).
ADDITIVE_MASK = {"mask_nan", "mask_inf", "mask_ninf", "mask_ninf_row"}


def mask_for(poison: str, shape_id: str, c: Case):
    if poison in ADDITIVE_MASK:
        return ("f32:BHQK", "f16:HQK", "bf16:QK", "f32:B1QK", "f32:HQK")[SHAPE_IDS.index(shape_id)]
    if poison == "bool_row_empty":
        return ("bool:BHQK", "bool:HQK", "bool:QK")[SHAPE_IDS.index(shape_id) % 3]
    if SHAPE_IDS.index(shape_id) % 2:
        return "bool:HQK"
    return "causal" if c.Lq > 1 else None


SHAPE_IDS = [s for s, _ in SHAPES]
KINDS = sorted(POISONS)
CASES = [
    (f"{kind}-{sid}", c.replace(poison=kind, mask=mask_for(kind, sid, c)))
    for kind in KINDS
    for sid, c in SHAPES
]


@pytest.mark.parametrize("cid,c", CASES, ids=[cid for cid, _ in CASES])
def test_nonfinite_matches_oracle(device, cid, c):
    out, lse, ref, ref_lse = run(c, device)
    poison_premise(c, ref, ref_lse)
    assert_matches(c, out, lse, ref, ref_lse)


# The fallback: every poison on two shapes (its ops do not depend on the
# key count).
FALLBACK_CASES = [(cid, c) for cid, c in CASES if cid.endswith(("decode-bf16-sinks", "prefill-f32"))]


@pytest.mark.parametrize("cid,c", FALLBACK_CASES, ids=[cid for cid, _ in FALLBACK_CASES])
def test_nonfinite_fallback_matches_oracle(device, cid, c):
    out, lse, ref, ref_lse = run(c, device, fallback=True)
    poison_premise(c, ref, ref_lse)
    assert_matches(c, out, lse, ref, ref_lse)


@pytest.mark.parametrize("fallback", [False, True], ids=["device", "fallback"])
@pytest.mark.parametrize("poison", ["q_nan", "vscale_nan"])
def test_empty_row_beside_poisoned_rows(device, poison, fallback):
    """A row that sees no key is zero (lse -inf) in the same call, kv head
    and tile of rows as poisoned ones: beside a NaN row, and beside rows
    that see a key whose value is NaN (which the empty row meets, masked,
    with weight 0 in the kernels' accumulation and the fallback's p @ v)."""
    c = Case(Hq=8, Hkv=2, Lq=2, Lk=700, D=64, dtype=F16, mask="bool:HQK", poison=poison, seed=9)
    h = c.Hq - 1  # the poisoned row's head: its kv head's other rows
    out, lse, ref, ref_lse = run(c, device, emptied_row(c, build(c), h=h, i=0), fallback=fallback)
    assert (ref[0, h, 0] == 0).all() and np.isneginf(ref_lse[0, h, 0])
    assert np.isnan(ref[0, h, 1]).any()
    assert_matches(c, out, lse, ref, ref_lse)


@pytest.mark.parametrize("fallback", [False, True], ids=["kernel", "fallback"])
@pytest.mark.parametrize("Lk", [40, 2500], ids=["short", "split"])
def test_neg_inf_sink_is_no_key(device, fallback, Lk):
    """A -inf sink weighs nothing: rows that see keys are as without a
    sink, and a row whose keys are all masked stays zero with lse = -inf
    (not 0 * inf = NaN)."""
    c = Case(Hq=4, Hkv=2, Lq=3, Lk=Lk, D=64, dtype=F16, mask="bool:HQK", sinks="f32", seed=6)
    q, kq, vq, mask, sinks = build(c)
    m = np.array(mask)
    m[1, 2, :] = False  # head 1, position 2 sees nothing
    s = np.array(sinks)
    s[[0, 1]] = -np.inf  # heads 0 and 1: -inf sinks
    inputs = (q, kq, vq, mx.array(m), mx.array(s))
    out, lse, ref, ref_lse = run(c, device, inputs=inputs, fallback=fallback)
    assert np.isneginf(ref_lse[0, 1, 2]) and np.all(np.isfinite(ref_lse[0, 0]))
    assert_matches(c, out, lse, ref, ref_lse)
