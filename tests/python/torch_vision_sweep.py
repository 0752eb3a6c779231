#!/usr/bin/env python3
"""Real architectures (torchvision 0.14 models) trained under spill.torch.offload() against plain
torch.

Not part of CI: a tool, run by hand on the CPU bridge, as tests/python/torch_sweep.py is for
ordinary configurations of toy models. Each configuration runs in a process of its own: plain
torch first (PyTorch's CPU allocator), then spill.torch.enable() on the CPU bridge, the
footprint measured (`max_memory_allocated()` over two steps without offload), then
`offload(model, optimizer)` with the budget at a fraction of it, 4 training steps, an
evaluation pass (model.eval(), torch.no_grad()) after each step and inference after training.
The models are built small (32x32 or 64x64 inputs, 10 classes, batches of 2-32, 128 for the
small ViT), seeded (dropout, stochastic depth), and compared on losses, validation losses,
inference outputs and the final state_dict (buffers included), bit for bit (torch.equal on
the bytes: a NaN equals the same NaN). Outcomes as torch_sweep.py's:

  ok        everything is plain torch's, and bytes were swapped out
  noswap    everything is plain torch's but nothing was swapped
  mismatch  a result differs from plain torch's
  oom       torch.cuda.OutOfMemoryError (spill's message is kept)
  crash     the process died of a signal (SIGSEGV on the bridge: a tensor touched unpinned)
  error     another exception (the traceback's last lines are kept)
  invalid   plain torch itself refused the configuration
  timeout   the process ran past --timeout

Usage (from the repository root, with SPILL_LIBRARY set to build/libspill.so):
  /usr/bin/python3 tests/python/torch_vision_sweep.py [--matrix main|extra] [--jobs 1] [--out f]
  /usr/bin/python3 tests/python/torch_vision_sweep.py --list
  /usr/bin/python3 tests/python/torch_vision_sweep.py --only 'model=resnet18,opt=adamw,budget=3'
budget=N is the footprint divided by N; policy=lru swaps without plans (the planned steps'
yardstick: compare demand fetches and stall from the third step on, with steps=6).
"""
from __future__ import annotations

import sys
from typing import Dict, List

import sweep_runner as runner

# Models too large to sweep in seconds on two cores (28M parameters) come last.
MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5",
          "densenet121", "densenet121_me", "squeezenet1_1", "googlenet", "regnet_x_400mf",
          "vit", "vit_wide", "convnext_tiny", "swin_t"]
OPTIMIZERS = ["sgd", "adamw"]
DEFAULTS: Dict[str, str] = {"model": "resnet18", "opt": "sgd", "budget": "3", "steps": "4",
                            "eval": "1", "infer": "1", "batch": "auto",
                            "size": "auto", "zero": "none", "amp": "0", "fmt": "contiguous",
                            "accum": "1", "gran": "64KiB", "policy": "plan"}
# Axes the extra matrix varies one at a time: zero_grad(set_to_none=False), bf16 autocast,
# channels_last, two micro-batches per step (gradient accumulation), a GPU's 2 MiB granularity.
EXTRA = {"zero": "zeros", "amp": "bf16", "fmt": "channels_last", "accum": "2", "gran": "2MiB"}


def name(cfg: Dict[str, str]) -> str:
    return runner.name(cfg, DEFAULTS)


def parse(text: str) -> Dict[str, str]:
    return runner.parse(text, DEFAULTS)


def matrix(kind: str) -> List[Dict[str, str]]:
    """main: every model with SGD (momentum) and AdamW at half and a third of its footprint.
    extra: every model but the two largest with AdamW at a third, each EXTRA axis varied
    alone."""
    if kind == "main":
        return [parse(f"model={m},opt={o},budget={b}")
                for m in MODELS for o in OPTIMIZERS for b in ("2", "3")]
    return [parse(f"model={m},opt=adamw,{k}={v}")
            for m in MODELS[:-2] for k, v in EXTRA.items()]


WORKER = r'''
import gc, json, struct, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
import torchvision
import spill, spill.torch as st
torch.set_num_threads(1)
cfg = json.loads(sys.argv[1])
STEPS = int(cfg["steps"])
M = cfg["model"]
tv = torchvision.models
# Batch and image size by default: the smallest that keep the footprint's movable part (blocks
# over swap_threshold) well above the small pool's 2 MiB segments and sub-128 KiB parameters.
AUTO = {"mobilenet_v3_small": (32, 64), "shufflenet_v2_x0_5": (32, 64),
        "squeezenet1_1": (16, 64), "googlenet": (4, 64), "vit": (128, 32), "vit_wide": (8, 32),
        "convnext_tiny": (2, 32), "swin_t": (2, 32)}
N = AUTO.get(M, (4, 32))[0] if cfg["batch"] == "auto" else int(cfg["batch"])
SIZE = AUTO.get(M, (4, 32))[1] if cfg["size"] == "auto" else int(cfg["size"])

def build_model():
    if M == "densenet121":
        return tv.densenet121(num_classes=10)
    if M == "densenet121_me":
        return tv.densenet121(num_classes=10, memory_efficient=True)
    if M == "googlenet":
        return tv.googlenet(num_classes=10, aux_logits=True, init_weights=True)
    if M == "vit":
        return tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                    hidden_dim=64, mlp_dim=128, num_classes=10)
    if M == "vit_wide":  # weights over the swap threshold (they move), activations small
        return tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                    hidden_dim=256, mlp_dim=1024, num_classes=10)
    if M == "swin_t":
        return tv.swin_t(num_classes=10)
    return getattr(tv, M)(num_classes=10)

FMT = torch.channels_last if cfg["fmt"] == "channels_last" else torch.contiguous_format

def batch(g):
    x = torch.randn(N, 3, SIZE, SIZE, generator=g).contiguous(memory_format=FMT)
    return x, torch.randint(0, 10, (N,), generator=g)

def forward(model, x):
    if cfg["amp"] == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)
    return model(x)

def loss_fn(out, y):
    if isinstance(out, tuple):  # googlenet in train mode: logits and two auxiliary heads
        return (F.cross_entropy(out[0], y) + 0.3 * F.cross_entropy(out[1], y)
                + 0.3 * F.cross_entropy(out[2], y))
    return F.cross_entropy(out, y)

def build_optimizer(params):
    if cfg["opt"] == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-3)

late, late_end = {}, {}  # spill's stats before the third step and after the last

def train(steps, wrap=None):
    torch.manual_seed(0)
    model = build_model().to(memory_format=FMT)
    opt = build_optimizer(model.parameters())
    h = wrap(model, opt) if wrap else None
    g = torch.Generator().manual_seed(1)
    if cfg["eval"] == "1" or cfg["infer"] == "1":
        xv, yv = batch(torch.Generator().manual_seed(2))
    losses, val = [], []
    for i in range(steps):
        if wrap and i == 2:
            late.update(spill.stats())  # the first two steps record; the rest may follow plans
        opt.zero_grad(set_to_none=cfg["zero"] == "none")
        for _ in range(int(cfg["accum"])):
            x, y = batch(g)
            loss = loss_fn(forward(model, x), y) / int(cfg["accum"])
            loss.backward()
            losses.append(loss.item())
        opt.step()
        if cfg["eval"] == "1":
            model.eval()
            with torch.no_grad():
                val.append(loss_fn(forward(model, xv), yv).float().item())
            model.train()
    if wrap and late:
        late_end.update(spill.stats())
    out = None
    if cfg["infer"] == "1":
        model.eval()
        with torch.no_grad():
            out = forward(model, xv).clone()
    return losses, val, out, model, h

def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

def same(a, b):
    """Bit for bit (a NaN equals the same NaN, where torch.equal and == say no)."""
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if a is None or b is None:
        return a is b
    return (a.dtype == b.dtype and a.shape == b.shape and
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))

t0 = time.time()
try:
    base_losses, base_val, base_out, bm, _ = train(STEPS)
except Exception as e:  # plain torch refused the configuration
    print("RESULT " + json.dumps({"outcome": "invalid", "detail": f"{type(e).__name__}: {e}"}))
    sys.exit(0)
base_seconds = time.time() - t0
base_state = state(bm)
del bm
st.enable(f"budget:8GiB,swap_threshold:128KiB,sim_granularity:{cfg['gran']},"
          f"policy:{cfg['policy']}", target="cpu")
gc.collect()
st.reset_peak_memory_stats()
train(2)
gc.collect()
footprint = st.max_memory_allocated()
budget = int(footprint / float(cfg["budget"]))
def wrap(m, o):
    h = st.offload(m, o)
    spill.set_budget(budget)
    return h
before = spill.stats()
t0 = time.time()
losses, val, out, m, h = train(STEPS, wrap)
elapsed = time.time() - t0
after = spill.stats()
with st.guard(release_on_exit=False):
    got = state(m)
    params_equal = (got.keys() == base_state.keys() and
                    all(same(got[k], base_state[k]) for k in got))
    out_equal = same(out, base_out)
result = {
    "losses_equal": same(losses, base_losses), "val_equal": same(val, base_val),
    "out_equal": out_equal, "params_equal": params_equal,
    "losses": losses, "base_losses": base_losses, "val": val, "base_val": base_val,
    "footprint": footprint, "budget": budget, "seconds": round(elapsed, 2),
    "base_seconds": round(base_seconds, 2),
    "bytes_out": after["swap.bytes_out"] - before["swap.bytes_out"],
    "planned": after["swap.steps_planned"] - before["swap.steps_planned"],
    "quiet_steps": h.quiet_steps,
}
if late:  # from the third step to the last (evaluation passes included): planned steps'
    # figures; the inference after training is left out
    result["late"] = {k.split(".")[1]: late_end[k] - late[k] for k in (
        "swap.demand_fetches", "swap.stall_s", "swap.deviations", "swap.steps_planned")}
ok = all(result[k] for k in ("losses_equal", "val_equal", "out_equal", "params_equal"))
result["outcome"] = ("ok" if result["bytes_out"] > 0 else "noswap") if ok else "mismatch"
spill.set_budget(8 << 30)
h.remove()
print("RESULT " + json.dumps(result))
'''


def main() -> int:
    return runner.main(__doc__.split("\n\n")[0], DEFAULTS, WORKER, ["main", "extra"],
                       lambda kind, args: matrix(kind), 600)


if __name__ == "__main__":
    sys.exit(main())
