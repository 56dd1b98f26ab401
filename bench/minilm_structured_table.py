"""bench/results/minilm-structured/record.json -> table.md (mean ± std over seeds)."""
import json
import statistics
import sys
from pathlib import Path

d = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/minilm-structured")
rec = json.loads((d / "record.json").read_text())
runs = [r for r in rec["runs"] if r["method"] != "dense"]
dense = [r for r in rec["runs"] if r["method"] == "dense"]
lat = rec.get("latency", {})


def ms(xs, pct=False):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.2f}")
    return f(statistics.mean(xs)) + (f" ± {f(statistics.stdev(xs))}" if len(xs) > 1 else "")


names = {"eb-struct": "EB heads+FFN (1/3 heads, 40% FFN per layer)",
         "worm-struct": "WORM heads+FFN (same ratios)",
         "eb-qk": "EB Q/K unstructured (paper, p=0.5)", "worm-qk": "WORM Q/K unstructured (paper)"}
lines = ["| method | seeds | found | search epochs | acc at ticket | acc after pruning | acc after 1 retrain epoch | dense acc, same epochs + 1 | params | latency b1 / b32 (ms) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
ld = lat.get("latency_ms", {})
dl = f"{ld.get('1', {}).get('dense', 0):.0f} / {ld.get('32', {}).get('dense', 0):.0f}" if ld else "-"
pl = f"{ld.get('1', {}).get('pruned', 0):.0f} / {ld.get('32', {}).get('pruned', 0):.0f}" if ld else "-"
for m in ("eb-struct", "worm-struct", "eb-qk", "worm-qk"):
    rs = [r for r in runs if r["method"] == m]
    if not rs:
        continue
    lines.append(f"| {names[m]} | {len(rs)} | {sum(r['found'] for r in rs)}/{len(rs)} | "
                 f"{ms([r['search_epochs'] for r in rs])} | {ms([r['pre_prune_acc'] for r in rs], 1)} | "
                 f"{ms([r['pruned_acc'] for r in rs], 1)} | {ms([r['retrain1_acc'] for r in rs], 1)} | "
                 f"{ms([r['dense_acc_plus1'] for r in rs], 1)} | {rs[0]['params']:,} | "
                 f"{pl if m.endswith('struct') else dl + ' (dense shapes)'} |")
if dense:
    accs = [r["dense_acc_per_epoch"] for r in dense]
    lines.append(f"| dense (no pruning), per epoch | {len(accs)} | - | - | " +
                 " / ".join(ms([a[i] for a in accs if i < len(a)], 1) for i in range(max(map(len, accs))))
                 + f" | | | | {lat.get('params_dense', 0):,} | {dl} |")
out = "\n".join(lines)
if lat:
    out += (f"\n\nprune_report (MiniLM, seq 128, {lat.get('threads')} threads): {lat.get('text')}\n"
            f"MACs per sequence: dense {lat.get('flops_dense'):,}, pruned {lat.get('flops_pruned'):,}.")
out += f"\n\nConfig: {json.dumps(rec['config'])}\n"
(d / "table.md").write_text(out)
print(out)
