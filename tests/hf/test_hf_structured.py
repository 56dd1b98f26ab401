"""WormCallback: worm/* metrics through trainer.log (report_to loggers), refusal of a
reused callback (issue 17), and heads/FFN searches that prune for retraining (issue 19)."""
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import worm
from worm.hf import WormCallback

from tiny_transformers import ablate, build  # noqa: E402


class Spy(transformers.TrainerCallback):
    """Stands where report_to loggers stand: before user callbacks, reading on_log's logs."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, 60, (n, seq), generator=g)
        self.labels = (self.ids[:, 0] % 3).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def _trainer(model, callbacks, tmp_path, epochs=3):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=epochs,
        learning_rate=1e-3, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


def test_worm_metrics_reach_loggers_through_trainer_log(tmp_path):
    spy = Spy()
    cb = WormCallback(mode="truncate", window=3, stop=1e-9, layers="qk")  # no ticket: 3 samples
    trainer = _trainer(build("bert"), [spy], tmp_path)
    assert cb.attach(trainer) is cb and cb in trainer.callback_handler.callbacks
    trainer.train()
    seen = [l for l in spy.logs if "worm/truncating" in l]
    assert len(seen) == len(cb.log) == 3  # one per epoch, every one to the logger
    assert "worm/d_max" not in seen[0] and seen[2]["worm/d_max"] == cb.log[2]["worm/d_max"]
    assert [l["worm/truncating"] for l in seen] == [float(e["worm/truncating"]) for e in cb.log]
    assert seen[0]["worm/truncating"] == 1.0
    hist = [e for e in trainer.state.log_history if "worm/truncating" in e]
    assert len(hist) == 3 and hist[-1]["step"] == trainer.state.global_step


def test_unattached_callback_with_loggers_warns():
    cb = WormCallback()
    with pytest.warns(UserWarning, match="attach"):
        cb.on_train_begin(types.SimpleNamespace(report_to=["wandb"]), None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.on_train_begin(types.SimpleNamespace(report_to=["none"]), None, None)
    with pytest.raises(TypeError, match="Trainer"):
        cb.attach(object())


def test_reused_callback_is_refused_then_reset_searches_afresh(tmp_path):
    cb = WormCallback(mode="truncate", window=3, stop=1e-9, layers="qk")
    model = build("bert")
    first = _trainer(model, [cb], tmp_path, epochs=2)  # window 3: no ticket in 2 epochs
    first.train()
    assert cb.found_at is None and cb.log[-1]["worm/truncating"]
    old_search = cb.search
    second = _trainer(model, [cb], tmp_path, epochs=2)
    with pytest.raises(RuntimeError, match="already ran a trainer.train"):
        second.train()
    assert len(cb.log) == 2  # nothing logged by the refused run
    cb.reset()
    spy = Spy()
    third = _trainer(model, [spy], tmp_path, epochs=2)
    cb.attach(third)
    third.train()
    assert cb.search is not old_search and [e["worm/sample"] for e in cb.log] == [1, 2]
    # the new search truncates the new run's optimizer, the old one truncates nothing
    assert cb.search._truncation is None or cb.search.truncating
    assert old_search._truncation is None


def test_callback_heads_ffn_ticket_prunes_for_retraining(tmp_path):
    model = build("llama")  # GQA
    cb = WormCallback(mode="truncate", layers=("heads", "ffn"), scope="layer", window=2,
                      stop=0.5, prune_ratio={"heads": 0.5, "ffn": 0.4}, apply_ticket=False)
    trainer = _trainer(model, [], tmp_path, epochs=4)
    cb.attach(trainer)
    trainer.train()
    assert cb.found_at is not None and cb.ticket.kind == "structures"
    small = cb.prune()
    assert type(small) is type(model) and small.config.num_key_value_heads == 1
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # equal to the trained dense model with the removed heads' o_proj columns zeroed
    o = [l.self_attn.o_proj.weight for l in model.model.layers]
    heads = {i: [h for h in range(4) if not cb.ticket[n][:, h * 8:(h + 1) * 8].any()]
             for i, n in enumerate(f"model.layers.{i}.self_attn.o_proj.weight" for i in range(len(o)))}
    downs = {i: (~cb.ticket[f"model.layers.{i}.mlp.down_proj.weight"].all(0)).nonzero().flatten().tolist()
             for i in range(len(o))}
    import copy
    ref = ablate(copy.deepcopy(model).eval(), "llama", heads, downs)
    x = Tokens()[0]
    batch = {"input_ids": x["input_ids"][None], "attention_mask": x["attention_mask"][None]}
    with torch.no_grad():
        assert torch.allclose(small.eval()(**batch).logits, ref(**batch).logits, atol=1e-5)
    _trainer(small, [], tmp_path, epochs=1).train()  # the small model retrains


def test_callback_applies_structured_ticket_in_place(tmp_path):
    cb = WormCallback(mode="truncate", layers="heads", window=2, stop=0.5, retrain_epochs=1)
    model = build("distilbert")
    _trainer(model, [cb], tmp_path, epochs=5).train()
    assert cb.found_at is not None
    params = dict(model.named_parameters())
    for n, keep in cb.ticket.items():
        assert (~keep).any() and bool((params[n].detach()[~keep] == 0).all()), n
