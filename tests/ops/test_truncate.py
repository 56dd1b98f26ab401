"""``truncate_`` through every implementation against the reference
(``worm.reference.truncate_``): truncated gradients equal exactly."""
from __future__ import annotations

import pytest

import op_cases as C
from impl_cases import DEV, assert_same, impl_kind_params, keep_bits
from worm import ops
from worm import reference as R


@pytest.mark.parametrize("impl,kind", impl_kind_params(
    ["one", "n31", "n4097", "many_small", "zeros", "small_and_large", "n1000003"]), indirect=["impl"])
@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_truncate_exact(impl, kind, dtype):
    grads = C.make(kind, dtype, DEV, seed=11)
    bits = keep_bits(grads, seed=2)
    for r in (3e-3, 0.5, 0.0, 1.0):
        got = [g.clone() for g in grads]
        want = [g.cpu().clone() for g in grads]
        R.truncate_(want, [b.cpu() for b in bits], r)
        ops.truncate_(got, bits, r)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{kind} r={r} grad {i}")
