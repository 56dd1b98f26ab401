"""Structured transformer tickets (issue 19): heads (K/V groups) and FFN neurons.

Oracles built from torch alone: the pruned model against the dense model with the removed
heads' output-projection columns and neurons' down-projection columns zeroed
(tiny_transformers.ablate), structured truncation against torch.optim.SGD with gradient
hooks, and a fresh process rebuilding the pruned model from config + ticket + state_dict.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_transformers import FAMILIES, FF, H, NH, ablate, build, inputs, transformers

import worm
from worm.layouts import attention_layouts

T = transformers
D = H // NH


@pytest.fixture(autouse=True)
def _quiet():
    T.logging.set_verbosity_error()


def _search_ticket(model, kinds=("heads", "ffn"), ratio=None, scope="layer", seed=0):
    # perturb so scores differ clearly, then one sample: the newest mask is a structured ticket
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = worm.EarlyBird(model, opt, mode="eb", layers=kinds, window=2, scope=scope,
                       prune_ratio=ratio or {k: {"heads": 0.5, "ffn": 1 / 3}[k] for k in kinds})
    s.step()
    return s, s.mask


def _removed(model, family, ticket):
    """Removed query heads and neurons per layer, read off the ticket's output/down masks."""
    from tiny_transformers import _layers
    heads, neurons = {}, {}
    for i, (o, down, dim) in enumerate(_layers(model, family)):
        if o.weight in ticket:
            cols = ticket[o.weight].movedim(dim, 0).reshape(o.weight.shape[dim], -1).all(1)
            heads[i] = [h for h in range(NH) if not cols[h * D:(h + 1) * D].any()]
        if down.weight in ticket:
            cols = ticket[down.weight].movedim(dim, 0).reshape(down.weight.shape[dim], -1).all(1)
            neurons[i] = (~cols).nonzero().flatten().tolist()
    return heads, neurons


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_equals_ablated_dense_model(family):
    dense = build(family)
    _, ticket = _search_ticket(dense)
    heads, neurons = _removed(dense, family, ticket)
    gqa = family in ("llama", "mistral", "qwen2")
    for i in range(2):  # scope "layer": the same count in every layer
        assert len(heads[i]) == NH // 2 and len(neurons[i]) == round(FF / 3)
        if gqa:  # whole K/V groups: query heads 2g and 2g+1 go together
            assert all(h ^ 1 in heads[i] for h in heads[i])
    small = worm.prune_channels(dense, ticket, inputs(family))
    assert type(small) is type(dense)
    x = inputs(family)
    oracle = ablate(copy.deepcopy(dense), family, heads, neurons)
    with torch.no_grad():
        got, want, full = small(**x).logits, oracle(**x).logits, dense(**x).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, full, atol=1e-3)  # the ablation changed the output
    for lay in attention_layouts(small):
        assert lay.n_heads == NH // 2 and lay.n_kv == (1 if gqa else NH // 2) and lay.head_dim == D
        for a in ("num_heads", "num_attention_heads", "n_heads"):
            if isinstance(getattr(lay.module, a, None), int):
                assert getattr(lay.module, a) == NH // 2
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in dense.parameters())


def test_ffn_only_and_heads_only_tickets_and_global_scope():
    dense = build("bert")
    for kinds in (("heads",), ("ffn",)):
        _, ticket = _search_ticket(dense, kinds, scope="global", ratio=0.5)
        heads, neurons = _removed(dense, "bert", ticket)
        n = sum(map(len, (heads if kinds == ("heads",) else neurons).values()))
        assert n == round(0.5 * 2 * (NH if kinds == ("heads",) else FF))  # over all layers
        small = worm.prune_channels(dense, ticket)
        x = inputs("bert")
        with torch.no_grad():
            assert torch.allclose(small(**x).logits,
                                  ablate(copy.deepcopy(dense), "bert", heads, neurons)(**x).logits,
                                  atol=1e-5, rtol=1e-4)


def test_name_keyed_ticket_prunes_a_fresh_model():
    dense = build("llama")
    _, ticket = _search_ticket(dense)
    assert isinstance(ticket, worm.Ticket) and ticket.kind == "structures"
    params = dict(dense.named_parameters())
    by_param = {params[n]: m for n, m in ticket.items()}  # the old {param: mask} form
    a, b = worm.prune_channels(dense, by_param), worm.prune_channels(copy.deepcopy(dense), ticket)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("opt_name", ["sgd", "wormsgd"])
def test_structured_truncation_r0_freezes_every_entry_of_masked_structures(opt_name):
    model = build("gpt2")  # packed c_attn: Q, K, V columns and biases in one tensor
    twin = copy.deepcopy(model)
    mk = (lambda ps: torch.optim.SGD(ps, lr=0.5)) if opt_name == "sgd" else \
        (lambda ps: worm.WormSGD(ps, lr=0.5))
    opt = mk(model.parameters())
    s = worm.EarlyBird(model, opt, mode="truncate", layers=("heads", "ffn"), window=2, r=0.0,
                       prune_ratio={"heads": 0.5, "ffn": 0.5}, scope="layer")
    s.step()  # "truncate": on from the first sample
    keep = {n: s.mask[p] for n, p in model.named_parameters() if p in s.mask}
    assert {n.split(".")[-2] + "." + n.split(".")[-1] for n in keep} == {
        "c_attn.weight", "c_attn.bias", "c_proj.weight", "c_fc.weight", "c_fc.bias"}
    # the oracle: torch's SGD with gradient hooks multiplying the pruned entries by r = 0
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.5)
    for n, p in twin.named_parameters():
        if n in keep:
            p.register_hook(lambda g, k=keep[n]: g * torch.where(k, 1.0, 0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = inputs("gpt2")
    y = torch.tensor([0, 2])
    for m, o in ((model, opt), (twin, opt2)):
        for _ in range(3):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(**x).logits, y).backward()
            o.step()
    params = dict(model.named_parameters())
    for n, p in twin.named_parameters():
        assert torch.equal(params[n], p), n
    for n, k in keep.items():
        assert torch.equal(params[n][~k], before[n][~k]), n          # masked: never moved
        assert not torch.equal(params[n][k], before[n][k]), n        # kept: trained
    s.close()


def test_structured_search_resumes_identically():
    def run(resume_at=None):
        model = build("qwen2")
        opt = worm.WormSGD(model.parameters(), lr=0.05)
        kw = dict(mode="truncate", layers=("heads", "ffn"), window=3, r=0.1,
                  prune_ratio={"heads": 0.5, "ffn": 0.4})
        s = worm.EarlyBird(model, opt, **kw)
        x, y = inputs("qwen2"), torch.tensor([0, 1])
        for i in range(5):
            if i == resume_at:
                sd, msd, osd = s.state_dict(), model.state_dict(), opt.state_dict()
                s.close()
                model = build("qwen2")
                model.load_state_dict(msd)
                opt = worm.WormSGD(model.parameters(), lr=0.05)
                opt.load_state_dict(osd)
                s = worm.EarlyBird(model, opt, **kw)
                s.load_state_dict(sd)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(**x).logits, y).backward()
            opt.step()
            s.step()
        return [(h.d_max, h.d_avg, h.truncating) for h in s.history], model.state_dict()
    a, ma = run()
    b, mb = run(resume_at=2)
    assert a == b and any(t for *_, t in a)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_fresh_process_rebuilds_pruned_model_exactly(tmp_path):
    dense = build("bert")
    _, ticket = _search_ticket(dense)
    small = worm.prune_channels(dense, ticket)
    ticket.save(tmp_path / "ticket.pt")
    torch.save(small.state_dict(), tmp_path / "state.pt")
    (tmp_path / "config.json").write_text(dense.config.to_json_string())
    x = inputs("bert")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(small(**x).logits, tmp_path / "want.pt")
    code = f"""
import torch, transformers as T, worm
d = {str(tmp_path)!r}
cfg = T.BertConfig.from_json_file(d + "/config.json")
dense = T.BertForSequenceClassification(cfg)
small = worm.load_pruned(dense, worm.Ticket.load(d + "/ticket.pt"),
                         torch.load(d + "/state.pt", weights_only=True))
small.eval()
with torch.no_grad():
    got = small(**torch.load(d + "/x.pt", weights_only=True)).logits
assert torch.equal(got, torch.load(d + "/want.pt", weights_only=True)), (got,)
print("OK")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_save_pretrained_round_trip_where_the_config_expresses_it(family, tmp_path):
    dense = build(family)
    kinds = ("heads", "ffn") if family == "llama" else ("ffn",)  # BERT's config has no head_dim
    _, ticket = _search_ticket(dense, kinds)
    small = worm.prune_channels(dense, ticket)
    assert small.worm_config_updated
    if family == "llama":
        assert (small.config.num_attention_heads, small.config.num_key_value_heads,
                small.config.head_dim) == (NH // 2, 1, D)
    small.save_pretrained(tmp_path)
    back = type(small).from_pretrained(tmp_path).eval()
    x = inputs(family)
    with torch.no_grad():
        assert torch.equal(back(**x).logits, small(**x).logits)


def test_bert_heads_keep_the_dense_config():
    dense = build("bert")
    _, ticket = _search_ticket(dense, ("heads",))
    small = worm.prune_channels(dense, ticket)
    assert not small.worm_config_updated and small.config.num_attention_heads == NH


def test_unstructured_or_foreign_tickets_and_unknown_layouts_are_refused():
    dense = build("bert")
    opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    s = worm.EarlyBird(dense, opt, mode="eb", layers="qk", window=2)
    s.step()
    with pytest.raises(ValueError, match="apply_masks"):
        worm.prune_channels(dense, s.mask)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    with pytest.raises(ValueError, match="layers='qk'"):
        worm.EarlyBird(Block(), torch.optim.SGD(Block().parameters(), lr=0.1), mode="eb",
                       layers="heads")
    with pytest.raises(ValueError, match="structured set"):
        worm.EarlyBird(dense, opt, mode="eb", layers=("heads", "bn"))
    with pytest.raises(ValueError, match="must give a ratio"):
        worm.EarlyBird(dense, opt, mode="eb", layers=("heads", "ffn"), prune_ratio={"heads": 0.3})
    with pytest.raises(ValueError, match="l1"):
        worm.EarlyBird(dense, opt, mode="eb", layers="heads", l1=1e-4)


def test_a_layer_never_loses_every_head():
    dense = build("distilbert")
    _, ticket = _search_ticket(dense, ("heads",), ratio=0.99)
    with pytest.warns(UserWarning, match="kept the one with the largest score"):
        small = worm.prune_channels(dense, ticket)
    assert all(lay.n_heads == 1 for lay in attention_layouts(small))


def test_prune_report_counts_attention_macs_and_times_both():
    dense = build("bert")
    _, ticket = _search_ticket(dense)
    small = worm.prune_channels(dense, ticket)
    ids = torch.randint(2, 60, (1, 16))
    rep = worm.prune_report(dense, small, {"input_ids": ids}, batch_sizes=(1, 2), reps=1,
                            min_time=0.0)
    # oracle MACs: linear layers plus 2 * seq^2 * heads * head_dim per layer, by hand
    def macs(nh, ff):
        per_layer = 16 * (3 * H * nh * D + nh * D * H + 2 * H * ff) + 2 * 16 * 16 * nh * D
        return 2 * per_layer + H * H + H * 3  # pooler + classifier
    assert rep["flops_dense"] == macs(NH, FF)
    assert rep["flops_pruned"] == macs(NH // 2, FF - round(FF / 3))
    assert set(rep["latency_ms"]) == {1, 2} and rep["params_pruned"] < rep["params_dense"]


def test_apply_masks_with_a_structured_ticket_is_the_pruned_model():
    dense = build("roberta")
    _, ticket = _search_ticket(dense)
    small = worm.prune_channels(dense, ticket)
    masked = copy.deepcopy(dense)
    handle = worm.apply_masks(masked, ticket)
    params = dict(masked.named_parameters())
    for n, keep in ticket.items():  # every owned entry zero, each with its own mask
        assert bool((params[n].detach()[~keep] == 0).all()) and bool(keep.any()), n
    x = inputs("roberta")
    with torch.no_grad():
        assert torch.allclose(masked(**x).logits, small(**x).logits, atol=1e-5, rtol=1e-4)
    handle.remove()
