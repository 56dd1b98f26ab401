"""The controls of `worm compare` (dense, random ticket, uniform ticket), the paper
authors' protocol (--prune weights), BN recalibration after pruning, the overhead
columns and the last-channel warning; oracles from torch alone where there is one."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

from worm.paper import controls as ctl
from worm.paper import experiments as ex
from worm.paper import models


def _tiny(**kw):
    base = dict(dataset="digits", model="cnn", width=0.5, train_subset=200, test_subset=100,
                seeds=(0,), max_epochs=2, retrain_epochs=2, window=2, batch_size=50,
                progress=False, threads=1, latency=False, recal_batches=2)
    base.update(kw)
    return ex.CNNConfig(**base)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return models.build("cnn", 1, 10, 1.0)


# ------------------------------------------------------------------ the tickets
def test_weight_ticket_is_torch_global_magnitude_pruning():
    m = _cnn()
    got = ctl.weight_ticket(m, 0.5)
    ref = copy.deepcopy(m)
    pairs = [(mod, "weight") for mod in ref.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    tprune.global_unstructured(pairs, pruning_method=tprune.L1Unstructured, amount=0.5)
    assert len(got) == len(pairs) == 4          # three convs and the head
    for (p, keep), (mod, _) in zip(got.items(), pairs):
        assert torch.equal(keep, mod.weight_mask.bool())
    total = sum(k.numel() for k in got.values())
    assert sum(int((~k).sum()) for k in got.values()) == round(0.5 * total)


def test_random_ticket_keeps_the_per_layer_widths_and_is_seeded():
    m = _cnn()
    ticket = {bn.weight: torch.rand(bn.num_features) > 0.7 for bn in m.modules() if isinstance(bn, nn.BatchNorm2d)}
    a, b, c = ctl.random_like(ticket, 0), ctl.random_like(ticket, 0), ctl.random_like(ticket, 1)
    for p in ticket:
        assert a[p].shape == ticket[p].shape and int(a[p].sum()) == int(ticket[p].sum())
        assert torch.equal(a[p], b[p])
    assert any(not torch.equal(a[p], c[p]) for p in ticket)


def test_uniform_ticket_prunes_every_layer_by_the_same_share_by_magnitude():
    m = _cnn()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.copy_(torch.randn(bn.num_features))
    ticket = {bn.weight: torch.ones(bn.num_features, dtype=torch.bool)
              for bn in m.modules() if isinstance(bn, nn.BatchNorm2d)}
    uni = ctl.uniform_like(ticket, 0.5)
    for p, keep in uni.items():
        n = p.numel()
        assert int(keep.sum()) == n - round(0.5 * n)
        want = torch.zeros(n, dtype=torch.bool)
        want[p.detach().abs().topk(n - round(0.5 * n)).indices] = True
        assert torch.equal(keep, want)


def test_tickets_keyed_by_name_are_accepted():
    m = _cnn()
    named = {n: torch.ones_like(p, dtype=torch.bool) for n, p in m.named_parameters() if n.endswith("1.weight")}
    out = ctl.as_param_ticket(m, named)
    assert set(map(id, out)) == {id(dict(m.named_parameters())[n]) for n in named}


def test_last_channel_warning_names_the_layer_and_the_remedy():
    m = _cnn()
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    ticket = {bn.weight: torch.ones(bn.num_features, dtype=torch.bool) for bn in bns}
    ticket[bns[0].weight] = torch.zeros(bns[0].num_features, dtype=torch.bool)
    ticket[bns[0].weight][3] = True            # the global ranking left one channel
    small, fields, masks = ctl.make_variant(m, ticket, "channels", torch.zeros(1, 1, 32, 32))
    assert masks is None and fields["layers"][0] == {
        "name": "features.1.weight", "entries": 16, "ticket_kept": 1, "kept": 1}
    (w,) = fields["warnings"]
    assert "features.1.weight with 1 of 16 channels" in w and "--floor" in w
    assert small.features[0].out_channels == 1
    # a ticket that leaves two channels does not warn
    ticket[bns[0].weight][4] = True
    assert ctl.make_variant(m, ticket, "channels", torch.zeros(1, 1, 32, 32))[1]["warnings"] == []


# ------------------------------------------------------------------ retraining
def test_weights_protocol_keeps_the_masks_through_retraining():
    cfg = _tiny(prune="weights")
    train, test, info = ex._prepare(cfg)
    m = _cnn()
    ticket = ctl.weight_ticket(m, 0.5)
    before = {p: p.detach().clone() for p in ticket}
    accs, times = ex.retrain(cfg, 0, m, train, test, "t", masks=ticket)
    assert len(accs) == len(times) == 2
    for p, keep in ticket.items():
        assert torch.all(p[~keep] == 0)                   # pruned entries exactly zero
        assert not torch.equal(p[keep], before[p][keep])  # kept entries trained


def test_compare_rows_controls_and_overhead():
    res = ex.compare(_tiny())
    runs = res["runs"]
    names = ["EB Train", "WORM", "dense (no pruning)", "random ticket", "uniform ticket"]
    assert [r["method"] for r in runs] == names
    for seed in (0,):
        eb, wo, dense, rnd, uni = [r for r in runs if r["seed"] == seed]
        # controls are built on EB's search: same pre-prune model, same widths for random
        assert dense["pre_prune_acc"] == rnd["pre_prune_acc"] == uni["pre_prune_acc"] == eb["pre_prune_acc"]
        assert [x["ticket_kept"] for x in rnd["layers"]] == [x["ticket_kept"] for x in eb["layers"]]
        assert sum(x["ticket_kept"] for x in uni["layers"]) == sum(
            x["entries"] - round(0.5 * x["entries"]) for x in uni["layers"])
        # the same retraining budget for every variant; dense trains as long as EB's search + it
        assert {len(r["retrain_accs"]) for r in (eb, wo, dense, rnd, uni)} == {2}
        assert dense["total_epochs"] == eb["search_epochs"] + 2 and "params_after" not in dense
        assert dense["final_acc"] == dense["retrain_accs"][-1]
        # overhead: each search's seconds per epoch against the dense control's plain epochs
        for r in (eb, wo):
            assert r["epoch_time_vs_plain"] == pytest.approx(r["epoch_time_s"] / dense["epoch_time_s"])
            assert r["sampling_ms"] > 0
        # BN recalibration: a column with and without it
        for r in (eb, wo, rnd, uni):
            assert 0 <= r["pruned_acc"] <= 1 and 0 <= r["pruned_recal_acc"] <= 1
    table = ex.format_table(res)
    for h in ("after pruning, BN recal", "acc after all retraining", "epoch time / plain training",
              "sampling ms/step"):
        assert h in table


def test_recalibration_off_and_weights_protocol_in_compare():
    res = ex.compare(_tiny(prune="weights", recal_batches=0, retrain_epochs=1))
    eb, wo, dense, rnd, uni = res["runs"]
    assert eb["pruned_recal_acc"] is None and eb["pre_prune_recal_acc"] is None
    for r in (eb, wo, rnd, uni):
        assert r["protocol"] == "weights"
        pruned = sum(x["entries"] - x["kept"] for x in r["layers"])
        assert r["params_after"] == r["params_before"] - pruned
        assert r["flops_after"] == r["flops_before"]      # masks do not save dense compute
        assert {x["name"].split(".")[0] for x in r["layers"]} == {"features", "classifier"}
    total = sum(x["entries"] for x in eb["layers"])
    assert sum(x["entries"] - x["kept"] for x in eb["layers"]) == round(0.5 * total)
    assert [x["kept"] for x in rnd["layers"]] == [x["kept"] for x in eb["layers"]]


def test_bad_protocol_is_refused_at_build():
    with pytest.raises(ValueError, match="prune must be one of"):
        ex.CNNConfig(prune="filters")


def test_distance_plot_leaves_the_controls_out(tmp_path, monkeypatch):
    import matplotlib.axes
    from worm.paper.report import plot_distances
    labels = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: labels.append(k.get("label")) or real(self, *a, **k))
    run = {"seed": 0, "method": "EB Train", "d_max": [None, 0.2, 0.05], "d_avg": [None, 0.2, 0.05],
           "truncation_epoch": None, "found": True}
    dense = {"seed": 0, "method": "dense (no pruning)", "protocol": "dense", "retrain_accs": [0.5]}
    plot_distances({"config": {"window": 2, "stop": 0.1, "delta": 0.05}, "runs": [run, dense]},
                   tmp_path / "d.png")
    assert "EB Train" in labels and "dense (no pruning)" not in labels
