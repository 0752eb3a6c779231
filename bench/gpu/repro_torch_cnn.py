"""Narrows down the crash of the spill.torch cnn test on CUDA (H200, torch 2.11, 2026-12-04:
the training process died with SIGSEGV inside F.conv2d's C++ call, in the unlimited run that
measures the footprint, with spill only as the allocator: no offload, no guard, no Python
frame of spill's on the stack).

Run with no argument, it runs each case below in a process of its own (with the test's cuBLAS
workspaces, but for spill_torch_workspaces) and prints one line per case: its exit status and
the last line it wrote. Run with a case's name, it runs that case.
`bench/gpu/run_all.sh` (step torch-cnn-repro) runs it, then the first case that failed again
under cuda-gdb for the native stack. Needs a CUDA torch and SPILL_LIBRARY (and spill's python/
on PYTHONPATH), as the torch tests do."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Dict

import torch
from torch import nn


def _cnn(channels: int = 8, blocks: int = 16) -> nn.Module:
    """The test's CNN (tests/python/torch_train_models.py): conv, then batch norm, ReLU and
    conv blocks, then a linear head over the mean."""
    layers = [nn.Conv2d(3, channels, 3, padding=1, bias=False)]
    for _ in range(blocks):
        layers += [nn.BatchNorm2d(channels), nn.ReLU(),
                   nn.Conv2d(channels, channels, 3, padding=1, bias=False)]
    return nn.Sequential(*layers)


def _train(deterministic: bool = True, cudnn: bool = True, steps: int = 2) -> None:
    torch.backends.cudnn.enabled = cudnn
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    features = _cnn().cuda()
    head = nn.Linear(8, 10).cuda()
    opt = torch.optim.SGD([*features.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(2000)
    for step in range(steps):
        x = torch.randn(32, 3, 32, 32, generator=g).cuda()
        y = torch.randint(0, 10, (32,), generator=g).cuda()
        opt.zero_grad(set_to_none=True)
        print(f"step {step}: forward", flush=True)
        out = head(features(x).mean(dim=(2, 3)))
        loss = nn.functional.cross_entropy(out, y)
        print(f"step {step}: backward", flush=True)
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.6f}", flush=True)


def _one_conv() -> None:
    torch.backends.cudnn.deterministic = True
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False).cuda()
    x = torch.randn(32, 3, 32, 32, device="cuda", requires_grad=True)
    print("one conv: forward", flush=True)
    y = conv(x)
    torch.cuda.synchronize()
    print("one conv: backward", flush=True)
    y.sum().backward()
    torch.cuda.synchronize()
    print("one conv: done", flush=True)


# What the crashing test ran with: spill's configuration (tests/python/torch_bridge_run.py) and
# cuBLAS's small workspaces (CUDA_WORKSPACES in tests/python/test_torch_bridge.py), which every
# case but spill_torch_workspaces gets.
CONF = "policy:plan,swap_threshold:128KiB"
WORKSPACES = {"CUBLAS_WORKSPACE_CONFIG": ":16:8", "CUBLASLT_WORKSPACE_SIZE": "128"}


def _with_spill(body: Callable[[], None], conf: str = CONF) -> Callable[[], None]:
    def run() -> None:
        import spill.torch as st
        st.enable(conf)
        print(f"spill enabled: {st.is_enabled()}", flush=True)
        body()
        print(f"peak allocated {st.max_memory_allocated()} bytes", flush=True)
    return run


CASES: Dict[str, Callable[[], None]] = {
    "plain_torch": _train,
    "spill": _with_spill(_train),
    "spill_one_conv": _with_spill(_one_conv),
    "spill_nondeterministic": _with_spill(lambda: _train(deterministic=False)),
    "spill_no_cudnn": _with_spill(lambda: _train(cudnn=False)),
    "spill_policy_none": _with_spill(_train, "policy:none,swap_threshold:128KiB"),
    "spill_torch_workspaces": _with_spill(_train),  # cuBLAS's default workspaces
}


def main(argv: list) -> int:
    if len(argv) > 1:
        if argv[1] != "spill_torch_workspaces":  # read when torch makes its first workspace
            for key, value in WORKSPACES.items():
                os.environ.setdefault(key, value)
        CASES[argv[1]]()
        return 0
    failed = []
    for name in CASES:
        r = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True,
                           timeout=300)
        lines = (r.stdout + r.stderr).strip().splitlines()
        print(f"{name:24s} exit {r.returncode:4d}  {lines[-1][:150] if lines else ''}")
        if r.returncode != 0:
            failed.append(name)
            print("\n".join("    " + ln for ln in lines[-12:]))
    print("failed: " + " ".join(failed) if failed else "failed: none")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
