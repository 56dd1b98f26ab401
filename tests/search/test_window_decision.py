"""The pieces EarlyBird coordinates: the pure decision rule, the packed mask window
(truncation bits of sliced Q/K/V parameters), and a package without import circles."""
import ast
import pathlib

import pytest
import torch

from worm import packing
from worm.decision import decide
from worm.rep import RepTensor
from worm.window import MaskWindow

PKG = pathlib.Path(__file__).resolve().parents[2] / "python" / "worm"


@pytest.mark.parametrize("dists,mode,before,want", [
    (None, "worm", False, (False, False)),          # window not full: nothing decided
    (None, "truncate", False, (False, True)),       # Table 1: truncate from the first step
    ([0.05, 0.08], "worm", False, (True, False)),   # d_max < s: found, truncation off
    ([0.05, 0.12], "worm", False, (False, True)),   # d_avg 0.085 < s + delta
    ([0.05, 0.30], "worm", False, (False, False)),  # d_avg 0.175 too far
    ([0.05, 0.30], "worm", True, (False, True)),    # once on, stays on
    ([0.05, 0.12], "eb", False, (False, False)),    # EB Train never truncates
    ([0.01, 0.02], "truncate", True, (True, False)),
    ([0.10, 0.10], "worm", False, (False, True)),   # d_max == s is not < s
])
def test_decision_rule(dists, mode, before, want):
    assert tuple(decide(dists, mode=mode, stop=0.1, delta=0.05, truncating=before)) == want


def test_decision_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        decide([0.0], mode="lottery", stop=0.1, delta=0.0, truncating=False)


def _push_random(win, g, reps):
    for rep in reps:
        rep.param.data.copy_(torch.randn(rep.param.shape, generator=g))
    return win.push([packing_k(reps)], "global")


def packing_k(reps):
    return sum(r.numel for r in reps) // 2


def test_truncation_bits_of_sliced_params_match_packed_full_masks():
    """Q and K slices of packed weights (rows of an in_proj, columns of a GPT-2 c_attn)
    get bits gathered on the device equal to packing the full mask (V kept)."""
    g = torch.Generator().manual_seed(0)
    in_proj = torch.nn.Parameter(torch.empty(3 * 6, 6))
    c_attn = torch.nn.Parameter(torch.empty(5, 3 * 4))
    bn = torch.nn.Parameter(torch.empty(7))
    bias = torch.nn.Parameter(torch.empty(7))
    reps = [RepTensor(in_proj, "q", (slice(0, 6),)), RepTensor(in_proj, "k", (slice(6, 12),)),
            RepTensor(c_attn, "cq", (slice(None), slice(0, 4))),
            RepTensor(c_attn, "ck", (slice(None), slice(4, 8))),
            RepTensor(bn, "bn", None, [bias])]
    win = MaskWindow(reps, 3, "cpu")
    for _ in range(4):
        _push_random(win, g, reps)
        full = win.masks()
        bits = win.truncation_bits()
        assert set(bits) == {in_proj, c_attn, bn, bias}
        for p in (in_proj, c_attn, bn):
            assert torch.equal(bits[p], packing.pack([full[p]])), p.shape
        assert torch.equal(bits[bias], bits[bn])
        assert full[in_proj][12:].all() and full[c_attn][:, 8:].all()  # V stays kept


def test_window_distances_oldest_first():
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.empty(40))
    reps = [RepTensor(p, "w")]
    win = MaskWindow(reps, 3, "cpu")
    rows = []
    for i in range(5):
        counts = _push_random(win, g, reps)
        rows.append(win.masks()[p].clone())
        d = win.distances(counts)
        if i < 2:
            assert d is None
        else:
            want = [float((rows[-1] ^ rows[j]).sum()) / 40 for j in (i - 2, i - 1)]
            assert d == want


def test_window_length_checked_when_built():
    p = torch.nn.Parameter(torch.ones(8))
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            MaskWindow([RepTensor(p, "w")], bad, "cpu")
    assert MaskWindow([RepTensor(p, "w")], 65, "cpu").length == 65  # split into op calls of <= 64 rows


def _module(path: pathlib.Path) -> str:
    """Dotted name of a file of the package relative to it (a package is its __init__)."""
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set:
    """worm modules imported by ``path``, at module level or inside functions (a lazy
    import only hides a circle); importing ``a.b`` also runs package ``a``."""
    here = _module(path)
    pkg = list(path.relative_to(PKG).parent.parts)
    targets = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = pkg[:len(pkg) - (node.level - 1)]
            if node.module:
                targets.append(base + node.module.split("."))
            targets.extend(base + (node.module.split(".") if node.module else []) + [a.name]
                           for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("worm."):
            targets.append(node.module.split(".")[1:])
        elif isinstance(node, ast.Import):
            targets.extend(a.name.split(".")[1:] for a in node.names if a.name.startswith("worm."))
    out = set()
    for t in targets:
        for i in range(1, len(t) + 1):
            name = ".".join(t[:i])
            if name != here and not here.startswith(name + "."):  # its own packages
                out.add(name)
    return out


def test_no_import_circle_in_the_package():
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    assert "ops.mask_update" in mods and "_backends" in mods
    graph = {m: {d for d in _imports(p) if d in mods} for m, p in mods.items()}
    assert "_backends" in graph["ops._common"] and "ops.mask_update" in graph["reference"]
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                raise AssertionError(f"import circle: {' -> '.join(stack + [m, d])}")
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])
