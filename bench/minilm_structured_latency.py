"""Params, MACs and CPU latency of MiniLM pruned at EarlyBERT's ratios (1/3 heads and 40%
FFN neurons per layer), dense vs pruned, batch 1 and 32, sequence 128 (worm.prune_report).
The ticket is one heads+FFN sample of the pretrained weights (shapes are what matter for
speed: every per-layer ticket at these ratios gives the same shapes)."""
import json
import sys
import time

import torch

import worm
from worm.paper import text as _text

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.manual_seed(0)
model, _ = _text.load_minilm(2)
s = worm.EarlyBird(model, None, mode="eb", layers=("heads", "ffn"), scope="layer",
                   prune_ratio={"heads": 1 / 3, "ffn": 0.4}, window=3)
s.step()
small = worm.prune_channels(model, s.mask)
ids = torch.randint(1000, 2000, (1, 128))
rep = worm.prune_report(model, small, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                        batch_sizes=(1, 32), reps=3, min_time=0.0, threads=threads)
rep["config_after"] = {k: getattr(small.config, k) for k in ("num_attention_heads", "intermediate_size")}
rep["config_updated"] = small.worm_config_updated
rep["device"] = f"2-core CPU (AMD EPYC, shared with ~8 jobs, load ~20), torch {torch.__version__}, {threads} threads"
rep["date"] = time.strftime("%Y-%m-%d %H:%M")
print(rep["text"])
print(json.dumps({k: v for k, v in rep.items() if k != "text"}, default=str))
