"""Trains docs/pytorch.md's 6x512 MLP (batch 1024, Adam, torch 1.13's zero_grad()) five steps
under spill.torch.offload() on the CPU bridge at the budget given (argv[1]), with
swap_threshold:128KiB,sim_granularity:64KiB, and prints RESULT ok, or RESULT oom and the step
and pass that ran out of memory (test_capture.py compares it with spill plan's answer)."""
from __future__ import annotations

import sys

import torch

import spill.torch


def main(budget: str) -> int:
    spill.torch.enable(f"budget:{budget},swap_threshold:128KiB,sim_granularity:64KiB",
                       target="cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU())
                                  for _ in range(6)], torch.nn.Linear(512, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    spill.torch.offload(model, optimizer)
    x, y = torch.randn(1024, 512), torch.randint(0, 10, (1024,))
    for step in range(5):
        where = "forward"
        try:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            where = "backward"
            loss.backward()
            where = "optimizer"
            optimizer.step()
        except torch.cuda.OutOfMemoryError:
            print(f"RESULT oom step {step} {where}")
            return 0
    print("RESULT ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
