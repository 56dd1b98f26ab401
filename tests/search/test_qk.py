"""Query/key representative selection on real (tiny, random) transformers configs."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import worm
from worm.layers import select
from worm.qk import qk_reps

H, HEADS = 16, 4
SMALL = dict(hidden_size=H, num_attention_heads=HEADS, intermediate_size=20, num_hidden_layers=2)


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)


def bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(vocab_size=50, **SMALL))


def distilbert():
    cfg = transformers.DistilBertConfig(vocab_size=50, dim=H, n_heads=HEADS, hidden_dim=20, n_layers=2)
    return transformers.DistilBertForSequenceClassification(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=H, n_head=HEADS, n_layer=2,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=50, num_key_value_heads=2, **SMALL))


def _same(rep, tensor):
    return rep.param is tensor and rep.index is None


def test_bert_picks_query_then_key_weights_per_layer():
    m = bert()
    reps = qk_reps(m)
    want = []
    for layer in m.bert.encoder.layer:
        want += [layer.attention.self.query.weight, layer.attention.self.key.weight]
    assert len(reps) == len(want) == 4
    assert all(_same(r, w) for r, w in zip(reps, want))
    vals = {id(layer.attention.self.value.weight) for layer in m.bert.encoder.layer}
    assert not any(id(r.param) in vals for r in reps)
    assert [r.name for r in reps][:2] == ["bert.encoder.layer.0.attention.self.query.weight",
                                         "bert.encoder.layer.0.attention.self.key.weight"]


def test_distilbert_picks_q_lin_k_lin():
    m = distilbert()
    reps = qk_reps(m)
    want = []
    for layer in m.distilbert.transformer.layer:
        want += [layer.attention.q_lin.weight, layer.attention.k_lin.weight]
    assert len(reps) == 4 and all(_same(r, w) for r, w in zip(reps, want))


def test_llama_picks_q_proj_k_proj_with_grouped_kv_shapes():
    m = llama()
    reps = qk_reps(m)
    want = []
    for layer in m.model.layers:
        want += [layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight]
    assert len(reps) == 4 and all(_same(r, w) for r, w in zip(reps, want))
    assert reps[1].shape == (2 * H // HEADS, H)  # k_proj: 2 kv heads, not 4


def test_gpt2_packed_c_attn_is_sliced_into_q_and_k_columns():
    m = gpt2()
    reps = qk_reps(m)
    assert len(reps) == 4
    for li, layer in enumerate(m.transformer.h):
        w = layer.attn.c_attn.weight
        assert w.shape == (H, 3 * H)  # Conv1D: [in, 3h]
        q, k = reps[2 * li], reps[2 * li + 1]
        assert q.param is w and k.param is w
        assert q.index == (slice(None), slice(0, H)) and k.index == (slice(None), slice(H, 2 * H))
        assert torch.equal(q.values(), w.detach()[:, :H])
        assert torch.equal(k.values(), w.detach()[:, H:2 * H])
        # The full mask of a slice leaves V (and the other slice) kept.
        keep = torch.zeros(H, H, dtype=torch.bool)
        full = q.full_mask(keep)
        assert full.shape == w.shape and not full[:, :H].any() and full[:, H:].all()


def test_select_qk_goes_through_qk_reps():
    m = bert()
    assert [r.param for r in select(m, "qk")] == [r.param for r in qk_reps(m)]


def test_torch_multihead_attention_in_proj_rows():
    m = nn.TransformerEncoder(nn.TransformerEncoderLayer(H, HEADS, 20, batch_first=True), 2,
                              enable_nested_tensor=False)
    reps = qk_reps(m)
    assert len(reps) == 4
    w = m.layers[0].self_attn.in_proj_weight
    assert reps[0].param is w and reps[0].index == (slice(0, H),)
    assert reps[1].index == (slice(H, 2 * H),)


def test_gpt2_truncation_scales_q_k_grads_and_leaves_v_alone():
    """A real optimizer step through EarlyBird's pre-hook: V columns see the untouched gradient."""
    m = gpt2()
    r = 1e-3
    opt = torch.optim.SGD(m.parameters(), lr=0.1)  # plain SGD: update = -lr * grad, easy to check
    search = worm.EarlyBird(m, opt, mode="truncate", layers="qk", window=3, r=r)
    search.step()  # "truncate" switches on at the first sample
    assert search.truncating
    w = m.transformer.h[0].attn.c_attn.weight
    keep = search.mask[w]
    assert keep[:, 2 * H:].all()                      # V never pruned
    assert (~keep[:, :2 * H]).any()                   # something in Q/K is pruned
    before = {p: p.detach().clone() for p in m.parameters()}

    ids = torch.randint(0, 50, (2, 7))
    m(input_ids=ids, labels=ids).loss.backward()
    raw = {p: p.grad.detach().clone() for p in m.parameters()}
    opt.step()
    for layer in m.transformer.h:
        p = layer.attn.c_attn.weight
        keep = search.mask[p]
        expect = torch.where(keep, raw[p], raw[p] * r)
        assert torch.equal(p.grad, expect)
        assert torch.equal(p.grad[:, 2 * H:], raw[p][:, 2 * H:])        # V gradient untouched
        assert torch.allclose(p.detach()[:, 2 * H:], before[p][:, 2 * H:] - 0.1 * raw[p][:, 2 * H:])
        b = layer.attn.c_attn.bias
        assert torch.equal(b.grad, raw[b])                               # biases not representative
    search.close()


def test_gpt2_eb_ticket_masks_only_q_and_k():
    m = gpt2()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    search = worm.EarlyBird(m, opt, mode="eb", layers="qk", window=2, stop=0.5)
    search.step()
    assert search.step().found
    pruned = sum(int((~k).sum()) for k in search.ticket.values())
    n = 2 * 2 * H * H
    assert pruned == n // 2                                          # p = 0.5 of Q+K only
    for layer in m.transformer.h:
        assert search.ticket[layer.attn.c_attn.weight][:, 2 * H:].all()


@pytest.mark.parametrize("build,what", [
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "found no attention"),
    (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(vocab_size=50, **SMALL)),
     "query_key_value"),
    (lambda: transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=50, is_decoder=True, add_cross_attention=True, **SMALL)), "cross-attention"),
    (lambda: nn.Transformer(H, HEADS, 1, 1, 20, batch_first=True), "cross-attention"),
])
def test_unknown_or_cross_attention_is_a_clear_error(build, what):
    m = build()
    with pytest.raises(ValueError) as e:
        qk_reps(m)
    msg = str(e.value)
    assert what in msg and type(m).__name__ in msg and "layers=[" in msg


def test_unknown_attention_module_beside_known_ones_is_refused():
    class OddAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(H, H)

    m = bert()
    m.extra = OddAttention()
    with pytest.raises(ValueError, match="unknown layout at 'extra'.*OddAttention"):
        qk_reps(m)


def test_phi3_packed_qkv_proj_rows():
    cfg = transformers.Phi3Config(vocab_size=50, num_key_value_heads=2, pad_token_id=0, **SMALL)
    m = transformers.Phi3ForCausalLM(cfg)
    reps = qk_reps(m)
    d = H // HEADS
    w = m.model.layers[0].self_attn.qkv_proj.weight
    assert w.shape == (H + 2 * 2 * d, H)
    assert reps[0].param is w and reps[0].index == (slice(0, H),)
    assert reps[1].param is w and reps[1].index == (slice(H, H + 2 * d),)  # K: 2 kv heads
    assert len(reps) == 4
