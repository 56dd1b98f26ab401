"""WormCallback inside a real transformers.Trainer, and mid-window resume of a step-sampled search."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import worm
from worm.hf import WormCallback, unwrap_optimizer

H = 16
CFG = dict(vocab_size=40, hidden_size=H, num_attention_heads=2, intermediate_size=20,
           num_hidden_layers=2, max_position_embeddings=16)


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**CFG, num_labels=2))


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, CFG["vocab_size"], (n, seq), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()  # learnable: parity of the first token

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def trainer_for(model, cb, tmp_path, epochs=4, lr=1e-3, extra=()):
    # transformers' Trainer itself refuses to run without accelerate (a test dependency).
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=epochs,
        learning_rate=lr, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, max_grad_norm=0.0)
    return transformers.Trainer(model=model, args=args, train_dataset=ListDataset(),
                                callbacks=[cb, *extra])


class GradSpy(transformers.TrainerCallback):
    """Records each step's raw gradients (callback, before optimizer.step) and the
    gradients the optimizer really used (a step pre-hook registered after WORM's)."""

    def __init__(self, worm_cb):
        self.worm_cb, self.checked, self._raw, self._keep = worm_cb, 0, None, None

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        unwrap_optimizer(optimizer).register_step_pre_hook(self._at_step)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        s = self.worm_cb.search
        self._keep = s.mask.bind(s.model) if (s is not None and s.truncating) else None
        self._raw = {p: p.grad.detach().clone() for p in (s.params if s else [])}

    def _at_step(self, optimizer, a, k):
        if self._keep is None:
            return
        r = self.worm_cb.search.r
        for p, keep in self._keep.items():
            assert torch.equal(p.grad, torch.where(keep, self._raw[p], self._raw[p] * r))
            assert not torch.equal(p.grad, self._raw[p])
        self.checked += 1


def test_callback_truncates_trainers_optimizer_finds_and_applies_ticket(tmp_path):
    model = tiny_bert()
    # "truncate" switches truncation on at the first sample; a loose stop finds the
    # ticket a few samples later; training then continues with the ticket applied.
    cb = WormCallback(mode="truncate", every=1, window=3, stop=0.3, r=1e-2, retrain_epochs="continue")
    spy = GradSpy(cb)
    trainer = trainer_for(model, cb, tmp_path, extra=(spy,))
    trainer.train()

    assert cb.search is not None and isinstance(unwrap_optimizer(trainer.optimizer), torch.optim.AdamW)
    assert spy.checked >= 2                             # truncated grads seen at real AdamW steps
    assert cb.found_at is not None and cb.found_at["sample"] >= 3
    total = trainer.state.global_step
    assert total == 16 and cb.found_at["step"] < total   # trained on after the ticket
    logged = [e for e in trainer.state.log_history if "worm/d_max" in e]
    assert len(logged) == cb.found_at["sample"]
    assert logged[0]["worm/d_max"] is None and logged[-1]["worm/d_max"] < 0.3
    assert logged[-1]["worm/found"] and all(e["worm/truncating"] for e in logged[:-1])

    ticket = cb.ticket
    assert isinstance(ticket, worm.Ticket) and set(ticket) == {rep.name for rep in cb.search.reps}
    pruned = sum(int((~k).sum()) for k in ticket.values())
    assert pruned == sum(k.numel() for k in ticket.values()) // 2
    for p, keep in ticket.bind(model).items():
        assert (p.detach()[~keep] == 0).all()           # still exactly zero after more steps
        assert (p.detach()[keep] != 0).all()
    # The value weights kept training: not frozen, not zeroed.
    v = model.bert.encoder.layer[0].attention.self.value.weight
    assert (v.detach() != 0).all()


def test_callback_per_epoch_stops_at_ticket_without_retraining(tmp_path):
    model = tiny_bert(1)
    cb = WormCallback(mode="eb", window=2, stop=0.9)   # window 2, huge stop: found at epoch 2
    trainer = trainer_for(model, cb, tmp_path, epochs=5)
    trainer.train()
    assert cb.found_at is not None and cb.found_at["sample"] == 2
    assert trainer.state.epoch == pytest.approx(2.0)    # stopped right at the ticket
    for p, keep in cb.ticket.bind(model).items():
        assert (p.detach()[~keep] == 0).all()


def test_callback_retrains_given_epochs_then_stops(tmp_path):
    model = tiny_bert(2)
    cb = WormCallback(mode="worm", window=2, stop=0.9, retrain_epochs=1)
    trainer = trainer_for(model, cb, tmp_path, epochs=6)
    trainer.train()
    assert cb.found_at["epoch"] == pytest.approx(2.0)
    assert trainer.state.epoch == pytest.approx(3.0)


def test_callback_rejects_bad_settings():
    with pytest.raises(ValueError, match="every"):
        WormCallback(every=0)
    with pytest.raises(ValueError, match="retrain_epochs"):
        WormCallback(retrain_epochs="forever")
    with pytest.raises(ValueError, match="mode"):
        WormCallback(mode="magic")


# ---------------------------------------------------------------- resume mid-window
def _batches(n_steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CFG["vocab_size"], (n_steps, 4, 8), generator=g)
    return [(x, (x[:, 0] % 2).long()) for x in ids]


def _train(model, opt, batches):
    model.train()
    for ids, y in batches:
        model(input_ids=ids, labels=y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _fresh(state=None):
    model = tiny_bert(3)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # deterministic forward: the resumed run must match bit for bit
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    # Tuned on this tiny model: truncation switches on at sample 3, the ticket is found at 7.
    search = worm.EarlyBird(model, opt, mode="worm", layers="qk", window=3, stop=0.11,
                            delta=0.2, r=3e-3, every=2)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        search.load_state_dict(state["search"])
    return model, opt, search


def _hist(search):
    return [(h.index, h.step, h.d_max, h.d_avg, h.truncating, h.found) for h in search.history]


def test_step_sampled_search_resumes_mid_window_identically():
    batches = _batches(14)
    model_a, opt_a, search_a = _fresh()
    _train(model_a, opt_a, batches)

    model_b, opt_b, search_b = _fresh()
    _train(model_b, opt_b, batches[:9])                 # 4 samples in, one step into the next
    assert search_b.truncating                          # resume must carry truncation too
    state = copy.deepcopy({"model": model_b.state_dict(), "opt": opt_b.state_dict(),
                           "search": search_b.state_dict()})
    search_b.close()
    model_c, opt_c, search_c = _fresh(state)
    _train(model_c, opt_c, batches[9:])

    assert len(search_a.history) == 7 and search_a.found and search_c.found
    assert _hist(search_c) == _hist(search_a)
    assert any(h.truncating for h in search_a.history)
    assert all(torch.equal(search_c.ticket[p], search_a.ticket[q])
               for p, q in zip(search_c.params, search_a.params))
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)
