"""Early-Bird / WORM search on an FSDP2-sharded model: the same calls as on one process.

CPU (gloo), two processes:

    torchrun --standalone --nproc-per-node 2 examples/fsdp_search.py

GPUs (nccl), one process per GPU:

    torchrun --standalone --nproc-per-node 8 examples/fsdp_search.py --device cuda

Each rank holds a shard of every parameter; the search's threshold is still the exact
k-th smallest |w| of the whole model's BatchNorm gammas (histograms are all-reduced,
never the weights), and every rank takes the same decision at the same step.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import worm
from worm.distributed import full_masks


def model() -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
    return nn.Sequential(block(3, 16), block(16, 32), nn.MaxPool2d(2), block(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(0)                      # the same initial weights on every rank
    net = model().to(device)
    for m in net:
        if isinstance(m, nn.Sequential):
            fully_shard(m)                    # parameters become DTensors sharded on dim 0
    fully_shard(net)

    opt = worm.WormSGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    search = worm.EarlyBird(net, opt, mode="worm", layers="bn", prune_ratio=0.5, window=5)

    g = torch.Generator().manual_seed(1 + rank)  # each rank its own (synthetic) data
    data = [(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(8)]
    for epoch in range(args.epochs):
        for x, y in data:
            loss = nn.functional.cross_entropy(net(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        rec = search.step()                   # the same call as on one process
        if rank == 0:
            print(f"epoch {rec.epoch}: d_max={rec.d_max} truncating={rec.truncating} found={rec.found}")
        if rec.found:
            break

    mask = search.ticket or search.mask       # DTensors, placed like their parameters
    full = full_masks(mask)                   # gathered full tensors, on request
    kept = sum(int(m.sum()) for m in full.values())
    if rank == 0:
        print(f"{world} ranks: kept {kept} of {search.numel} channels")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
