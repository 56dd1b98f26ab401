"""The C++ sampling step's plan (csrc/sample_cpu.cpp, docs/ops.md "Sampling in one
pass") on the inputs that drive each of its paths, against the reference.

Sets of 2^19+ entries take the sampled level one; the tests below build inputs whose
sample lies (the window misses the k-th key: rerun with the exact plan), whose window
overflows (massive ties outside the sample), whose NaN hides outside the sample (the
window must be restored), and the exact plan's own fallbacks (a bucket too large to
collect, bf16 buckets of one key). Everything must equal select + mask update of
the reference, bit for bit.
"""
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from worm import _backends, ops
from worm import reference as R

pytestmark = pytest.mark.skipif(_backends.unusable("cpp", torch.device("cpu")) is not None,
                                reason="worm._C is not built (test_ops checks that it is)")

RUN_BYTES = 16384     # the sampled runs: one 16 KiB run per stratum (sample_cpu.cpp)
SAMPLE_MIN = 1 << 19  # smaller segments take the exact level one


@pytest.fixture(autouse=True)
def cpp(monkeypatch):
    monkeypatch.setenv("WORM_BACKEND", "cpp")


PATHS = ("sampled hit", "sampled miss", "overflow", "NaN/Inf outside the sample",
         "radix finish", "bf16 one-key bin")  # torch.ops.worm_native.plan_counters(), in order


@contextmanager
def drives(*paths):
    """Asserts that the block ran each named path of the plan at least once."""
    before = torch.ops.worm_native.plan_counters()
    yield
    after = torch.ops.worm_native.plan_counters()
    for path in paths:
        i = PATHS.index(path)
        assert after[i] > before[i], f"the input did not drive the plan's {path!r} path " \
                                     f"(counters {before} -> {after})"


def sampled_runs(n, esz):
    """[(first, last)] of the entries the sampled level one reads in a tensor of n."""
    log_stride = 4 if n >= 1 << 23 else (3 if n >= 1 << 22 else 2)
    run = RUN_BYTES // esz
    span = run << log_stride
    out = []
    for base in range(0, n, span):
        stratum = base // span
        i0 = base + run * (((stratum * 0x9E3779B1) & 0xFFFFFFFF) >> (32 - log_stride))
        if i0 < n:
            out.append((i0, min(i0 + run, n)))
    return out


def in_sample(n, esz):
    mask = torch.zeros(n, dtype=torch.bool)
    for a, b in sampled_runs(n, esz):
        mask[a:b] = True
    return mask


def check(ts, ks, scope, length=3, head=1, seed=0):
    nbytes = R.byte_offsets([t.numel() for t in ts])[-1]
    g = torch.Generator().manual_seed(seed)
    win = torch.randint(0, 256, (length, nbytes), generator=g, dtype=torch.uint8)
    want_thr, want_nf = R.select_thresholds(ts, ks, scope)
    want_win = win.clone()
    if int(want_nf.sum()) == 0:
        want_counts = R.mask_update_(ts, want_thr, want_win, head)
    else:
        want_counts = torch.zeros(length, dtype=torch.int64)
    thr, nf, counts = ops.sample_mask_(ts, ks, scope, win, head)
    sel_thr, sel_nf = ops.select_thresholds(ts, ks, scope)
    for name, got, want in (("thr", thr, want_thr), ("select thr", sel_thr, want_thr),
                            ("nonfinite", nf, want_nf), ("select nonfinite", sel_nf, want_nf),
                            ("counts", counts, want_counts)):
        assert torch.equal(got, want) or (got.isnan().all() and want.isnan().all()), \
            f"{name}: got {got.tolist()[:8]}, want {want.tolist()[:8]}"
    diff = (win != want_win).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} window bytes differ, first at {diff[:4].tolist()}"


def ks_for(ts, p, scope):
    """ks for prune ratio p (p == 1: every entry, beyond what num_pruned takes)."""
    def k(n):
        return n if p == 1 else R.num_pruned(n, p)
    if scope == "global":
        return [k(sum(t.numel() for t in ts))]
    return [k(t.numel()) for t in ts]


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("p", [1e-6, 0.3, 0.5, 0.97, 1.0])
def test_sampled_plan_on_gaussian_sets(scope, p):
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(SAMPLE_MIN + 17, generator=g), torch.randn(700, 1000, generator=g)]
    with drives("sampled hit"):
        check(ts, ks_for(ts, p, scope), scope, length=5, head=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sampled_plan_16bit_and_mixed(dtype):
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(SAMPLE_MIN * 2, generator=g).to(dtype), torch.randn(SAMPLE_MIN, generator=g),
          torch.randn(999, generator=g).to(dtype)]
    for scope in ("global", "layer"):
        check(ts, ks_for(ts, 0.6, scope), scope)


def test_rows_of_different_scale_widen_the_window():
    """Weights whose scale changes by row: the sampled runs correlate; still exact."""
    g = torch.Generator().manual_seed(3)
    scale = torch.logspace(-4, 1, 1024)[torch.randperm(1024, generator=g)]
    t = (torch.randn(1024, 1024, generator=g) * scale[:, None]).reshape(-1)
    check([t], [R.num_pruned(t.numel(), 0.5)], "global")
    check([t.sort().values], [R.num_pruned(t.numel(), 0.5)], "global", head=0)


@pytest.mark.parametrize("esz,dtype,n", [(4, torch.float32, SAMPLE_MIN * 3),
                                         (2, torch.float16, SAMPLE_MIN * 3),
                                         (2, torch.bfloat16, SAMPLE_MIN * 3),
                                         (2, torch.float16, (1 << 23) + 5)])  # 1 run in 16
def test_a_lying_sample_reruns_the_exact_plan(esz, dtype, n):
    """The sampled runs hold small values, the rest large: the window misses."""
    seen = in_sample(n, esz)
    g = torch.Generator().manual_seed(4)
    t = torch.where(seen, torch.rand(n, generator=g), 10 + torch.rand(n, generator=g)).to(dtype)
    for p in (0.5, 0.95):
        with drives("sampled miss"):
            check([t], [R.num_pruned(n, p)], "global")
        with drives("sampled miss"):
            check([t], [R.num_pruned(n, p)], "layer", head=2)


def test_ties_outside_the_sample_overflow_and_rerun():
    """The sample is Gaussian, every other entry equals its median: the window would
    collect most of the tensor; level two stops collecting and the exact plan (a
    bucket too large to collect: the radix finish) runs."""
    n = SAMPLE_MIN * 2
    seen = in_sample(n, 4)
    g = torch.Generator().manual_seed(5)
    t = torch.where(seen, torch.randn(n, generator=g), torch.tensor(0.6745))
    with drives("overflow", "radix finish"):
        check([t], [R.num_pruned(n, 0.5)], "global")
    check([t], [R.num_pruned(n, 0.3)], "global")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_outside_the_sample_leaves_the_window(value):
    n = SAMPLE_MIN * 2
    seen = in_sample(n, 4)
    t = torch.randn(n, generator=torch.Generator().manual_seed(6))
    hidden = int((~seen).nonzero()[12345])
    t[hidden] = value
    other = torch.randn(SAMPLE_MIN + 5)
    for scope in ("global", "layer"):
        with drives("NaN/Inf outside the sample"):
            check([other, t], ks_for([other, t], 0.5, scope), scope)


@pytest.mark.parametrize("kind", ["zeros", "constant", "few_values"])
def test_massive_ties(kind):
    g = torch.Generator().manual_seed(7)
    n = SAMPLE_MIN * 2 + 3
    if kind == "zeros":  # a pruned-and-retrained net: most weights exactly 0
        t = torch.where(torch.rand(n, generator=g) < 0.8, 0.0, torch.randn(n, generator=g))
    elif kind == "constant":
        t = torch.full((n,), -0.25)
    else:
        t = torch.randint(-3, 4, (n,), generator=g).float() / 4
    with drives("radix finish"):  # the median is tied at least
        check([t], [R.num_pruned(n, 0.5)], "global")
    for p in (0.1, 0.9):
        check([t], [R.num_pruned(n, p)], "global")
    check([t.bfloat16()], [R.num_pruned(n, 0.5)], "global")


def test_exact_plan_bf16_buckets_and_subnormals():
    g = torch.Generator().manual_seed(8)
    ts = [torch.randn(300_000, generator=g).bfloat16(),
          (torch.randn(200_000, generator=g) * 1e-39).bfloat16()]  # subnormal keys
    for scope in ("global", "layer"):
        check(ts, ks_for(ts, 0.5, scope), scope)


def test_bf16_exact_bins_hold_one_key():
    """A lying bf16 sample of 2^20+ entries reruns on the exact level one, whose bins
    of 16 bits hold a single bf16 key: the threshold without any collection."""
    n = 1 << 21
    seen = in_sample(n, 2)
    g = torch.Generator().manual_seed(10)
    t = torch.where(seen, torch.rand(n, generator=g), 10 + torch.rand(n, generator=g)).bfloat16()
    with drives("sampled miss", "bf16 one-key bin"):
        check([t], [R.num_pruned(n, 0.5)], "global")


def test_the_baseline_path_without_avx2():
    """WORM_CPU_BASELINE=1: level two without AVX2/POPCNT (SSE2 or scalar), same results."""
    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); sys.path.insert(0, 'tests/ops')\n"
        "import test_sample_plan as T\n"
        "assert torch.ops.worm_native.plan_counters()[-1] == 0, 'the AVX2 path is on'\n"
        "g = torch.Generator().manual_seed(11)\n"
        "for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    ts = [torch.randn(T.SAMPLE_MIN + 100, generator=g).to(dt), torch.randn(77, generator=g)]\n"
        "    for scope in ('global', 'layer'):\n"
        "        T.check(ts, T.ks_for(ts, 0.4, scope), scope, length=4, head=3)\n"
        "print('ok')\n")
    env = dict(os.environ, WORM_CPU_BASELINE="1", WORM_BACKEND="cpp")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_64_window_rows():
    """Each collected entry carries its bit in every row: up to 64 rows."""
    g = torch.Generator().manual_seed(9)
    ts = [torch.randn(SAMPLE_MIN + 1, generator=g)]
    check(ts, ks_for(ts, 0.5, "global"), "global", length=64, head=63)
