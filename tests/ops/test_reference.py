"""The oracle itself: hand-worked masks, packing, distance, window, input errors."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from worm import reference as ref


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_hand_worked_global_mask_no_ties():
    # scores .1 .5 .3 .2 ; p=.5 -> k=2 -> threshold .2 -> keep .5 and .3
    (keep,) = ref.masks([t(0.1, -0.5, 0.3, 0.2)], 0.5)
    assert keep.tolist() == [False, True, True, False]


def test_hand_worked_ties_are_pruned():
    # k = 1, threshold .5, three entries tie at .5: all three go
    (keep,) = ref.masks([t(0.5, -0.5, 0.5, 1.0)], 0.25)
    assert keep.tolist() == [False, False, False, True]


def test_global_vs_layer_scope():
    a, b = t(1.0, 2.0, 3.0, 4.0), t(0.1, 0.2, 0.3, 0.4)
    ga, gb = ref.masks([a, b], 0.5, scope="global")  # k=4: all of b goes
    assert ga.tolist() == [True] * 4 and gb.tolist() == [False] * 4
    la, lb = ref.masks([a, b], 0.5, scope="layer")  # k=2 each
    assert la.tolist() == [False, False, True, True]
    assert lb.tolist() == [False, False, True, True]
    thr = ref.thresholds([a, b], 0.5, scope="layer")
    assert thr.tolist() == pytest.approx([2.0, 0.2])


def test_k_zero_keeps_everything_even_zeros():
    (keep,) = ref.masks([t(0.0, 0.0, 1.0, 2.0)], 0.1)  # round(0.4) = 0
    assert keep.all()
    thr = ref.thresholds([t(0.0, 1.0)], 0.0)
    assert thr[0] == -math.inf


def test_k_uses_bankers_rounding_like_torch_prune():
    assert ref.num_pruned(5, 0.5) == 2  # round(2.5) == 2
    assert ref.num_pruned(7, 0.5) == 4  # round(3.5) == 4
    assert ref.num_pruned(10, 0.99) == 10 - 0 - 0  # round(9.9) == 10


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="prune_ratio"):
        ref.masks([t(1.0, 2.0)], ratio)


def test_empty_set_and_nonfinite_and_dtype():
    with pytest.raises(ValueError, match="empty"):
        ref.masks([], 0.5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ref.masks([t(1.0, float("nan"))], 0.5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ref.masks([t(1.0, 2.0), t(float("inf"))], 0.5)
    with pytest.raises(TypeError, match="dtype"):
        ref.masks([torch.tensor([1, 2])], 0.5)


@pytest.mark.parametrize("p", [0.1, 0.37, 0.5, 0.9])
def test_matches_torch_global_unstructured(p):
    torch.manual_seed(1)
    mods = [nn.Linear(13, 7), nn.Linear(7, 5), nn.Conv2d(3, 4, 3)]
    weights = [m.weight.detach().clone() for m in mods]
    assert len(torch.cat([w.abs().flatten() for w in weights]).unique()) == sum(w.numel() for w in weights)
    prune.global_unstructured([(m, "weight") for m in mods], pruning_method=prune.L1Unstructured, amount=p)
    ours = ref.masks(weights, p)
    for m, keep in zip(mods, ours):
        assert torch.equal(m.weight_mask.bool(), keep)


def test_pack_bit_order_and_roundtrip():
    keep = torch.zeros(9, dtype=torch.bool)
    keep[0] = keep[8] = True
    assert ref.pack([keep]).tolist() == [1, 1]
    keep2 = torch.tensor([False, True, True])  # bits 1 and 2 -> 6; padding zero
    packed = ref.pack([keep, keep2])
    assert packed.tolist() == [1, 1, 6]
    assert ref.byte_offsets([9, 3]) == [0, 2, 3]
    g = torch.Generator().manual_seed(0)
    shapes = [(1,), (31,), (3, 5), (8,), (2, 2, 3)]
    masks = [torch.rand(s, generator=g) > 0.5 for s in shapes]
    back = ref.unpack(ref.pack(masks), shapes)
    for a, b in zip(masks, back):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="bytes"):
        ref.unpack(packed, [(9,), (9,)])
    with pytest.raises(TypeError, match="bool"):
        ref.pack([torch.ones(3)])


def test_distance_hand_made():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    assert ref.distance(a, b) == 0.5
    assert ref.distance([a, a], [a, b]) == 2 / 8
    assert ref.popcount(ref.pack([a]) ^ ref.pack([b])) == 2
    with pytest.raises(ValueError, match="shape"):
        ref.distance(a, torch.ones(3, dtype=torch.bool))


def test_mask_update_ring():
    x = t(0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6, 0.5)
    thr = ref.thresholds([x], 0.5)  # k = 4 (round 4.5) -> threshold 0.4
    window = torch.zeros(3, 2, dtype=torch.uint8)
    window[1] = torch.tensor([0xFF, 0x01], dtype=torch.uint8)
    counts = ref.mask_update_([x], thr, window, head=2)
    keep = x > 0.4
    assert torch.equal(window[2], ref.pack([keep]))
    kept = int(keep.sum())
    assert counts.tolist() == [kept, 9 - kept, kept]  # rows 0 and 2 held zeros
    assert ref.window_stats([2, 4], 8) == (0.5, 0.375)
