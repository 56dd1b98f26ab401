"""A ticket is named data: saved, loaded in another process (weights_only), and applied
to any model whose names and shapes match: a fresh initialisation, a copy, a model
loaded from a checkpoint. Mismatches name the parameter."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import worm

torchvision = pytest.importorskip("torchvision")


def _random_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.05)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _found_ticket(model):
    """A ticket from a real search: window 2, loose stop, two samples of fixed weights."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    search = worm.EarlyBird(model, opt, mode="eb", window=2, stop=1.0, delta=0.0)
    search.step()
    assert search.step().found
    t = search.ticket
    search.close()
    return t


_CHILD = textwrap.dedent("""
    import copy, json, sys, torch, torchvision, worm
    torch.set_num_threads(1)
    d = sys.argv[1]
    t = worm.Ticket.load(f"{d}/ticket.pt")
    x = torch.load(f"{d}/x.pt", weights_only=True)
    torch.manual_seed(123)
    fresh = torchvision.models.resnet18(num_classes=10)          # random init, never a download
    small_f, plan_f = worm.prune_channels(fresh, t, x, return_plan=True)
    ckpt = torchvision.models.resnet18(num_classes=10)
    ckpt.load_state_dict(torch.load(f"{d}/model.pt", weights_only=True))
    small_c = worm.prune_channels(ckpt, t, x)
    small_cp = worm.prune_channels(copy.deepcopy(ckpt), t, x)
    with torch.no_grad():
        torch.save({"ckpt": small_c.eval()(x), "copy": small_cp.eval()(x),
                    "realised": plan_f.realised}, f"{d}/out.pt")
    json.dump({"repr": repr(t), "meta": t.meta(), "names": list(t),
               "params": [sum(p.numel() for p in m.parameters()) for m in (small_f, small_c, small_cp)]},
              open(f"{d}/out.json", "w"))
""")


def test_saved_ticket_prunes_fresh_copied_and_checkpoint_models_in_a_new_process(tmp_path):
    torch.manual_seed(0)
    model = _random_bn(torchvision.models.resnet18(num_classes=10), 1).eval()
    ticket = _found_ticket(model)
    assert isinstance(ticket, worm.Ticket) and ticket.kind == "channels" and ticket.found
    assert ticket.model_class == "ResNet" and ticket.layers == "bn" and ticket.epoch == 2
    assert ticket.covers["bn1.bias"] == "bn1.weight"
    ticket.save(tmp_path / "ticket.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    x = torch.randn(1, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    # the file is plain data: torch's safe loader reads it
    raw = torch.load(tmp_path / "ticket.pt", weights_only=True)
    assert set(raw["masks"]) == set(ticket)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], check=True, env=env, timeout=600)
    out = json.load(open(tmp_path / "out.json"))
    tensors = torch.load(tmp_path / "out.pt", weights_only=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        small, plan = worm.prune_channels(model, ticket, x, return_plan=True)
        with torch.no_grad():
            want = small.eval()(x)
    finally:
        torch.set_num_threads(threads)
    assert out["names"] == list(ticket) and out["repr"] == repr(ticket)
    assert out["meta"] == json.loads(json.dumps(ticket.meta()))
    n = sum(p.numel() for p in small.parameters())
    assert out["params"] == [n, n, n]
    assert tensors["realised"].keys() == plan.realised.keys()
    assert all(torch.equal(tensors["realised"][k], plan.realised[k]) for k in plan.realised)
    assert torch.equal(tensors["ckpt"], want) and torch.equal(tensors["copy"], want)


def test_ticket_is_a_mapping_by_name_and_by_the_search_models_parameters():
    model = _random_bn(torchvision.models.resnet18(num_classes=10), 2)
    t = _found_ticket(model)
    assert t["layer1.0.bn1.weight"] is t[model.layer1[0].bn1.weight]
    assert model.layer1[0].bn1.weight in t and "nope" not in t
    with pytest.raises(KeyError, match="index a ticket by parameter name"):
        t[torch.nn.Parameter(torch.ones(3))]
    n = sum(m.numel() for m in t.values())
    assert sum(t.pruned_share[k] * t[k].numel() for k in t) == pytest.approx(n // 2)
    assert len(repr(t).splitlines()) <= 20 and "pruned" in repr(t)
    assert t.to("cpu") == t and worm.Ticket.from_state_dict(t.state_dict()) == t


def _net(c=8):
    return nn.Sequential(nn.Conv2d(3, c, 3), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 4, 1))


def test_mismatch_names_the_first_missing_or_differing_parameter(tmp_path):
    t = worm.Ticket({"1.weight": torch.ones(8, dtype=torch.bool)}, model_class="Sequential")
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(10,\) .* mask is \(8,\)"):
        worm.apply_masks(_net(10), t)
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(10,\)"):
        worm.prune_channels(_net(10), t, torch.zeros(1, 3, 8, 8))
    wrong = worm.Ticket({"layer9.bn1.weight": torch.ones(64, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'layer9.bn1.weight' of the ticket is not a parameter .*closest name here: 'layer4.1.bn1.weight'"):
        worm.apply_masks(torchvision.models.resnet18(num_classes=10), wrong)
    with pytest.raises(ValueError, match="not a parameter of this Sequential.*worm.Ticket"):
        worm.apply_masks(_net(), {_net()[1].weight: torch.ones(8, dtype=torch.bool)})
    # a DDP / torch.compile prefix does not stand in the way
    wrapped = nn.Module()
    wrapped.module = _net()
    h = worm.apply_masks(wrapped, worm.Ticket({"1.weight": torch.tensor([1, 0] * 4, dtype=torch.bool)}))
    assert (wrapped.module[1].weight[1::2] == 0).all()
    h.remove()
    (tmp_path / "bad.pt").write_bytes(b"")
    torch.save({"x": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved worm.Ticket"):
        worm.Ticket.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no ticket at"):
        worm.Ticket.load(str(tmp_path / "missing.pt"))
