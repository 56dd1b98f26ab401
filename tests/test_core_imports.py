"""The core package (WormSGD, EarlyBird, tickets, ops) imports neither the paper's
plotting/data stack nor torchvision; worm.paper does, and the `worm` command works."""
import subprocess
import sys

BLOCK = ("matplotlib", "sklearn", "torchvision", "pandas", "torch_pruning")

CODE = f"""
import sys
import worm, worm.ops, worm.search, worm.optim, worm.ticket, worm.prune, worm.hf, worm.distributed
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in {BLOCK!r}))
"""


def test_core_imports_without_the_paper_stack():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok []"
    assert "worm.paper" not in out.stdout


def test_worm_command_runs_from_the_paper_subpackage():
    out = subprocess.run([sys.executable, "-m", "worm", "--version"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("worm ")
