#!/usr/bin/env python3
"""A sweep of ordinary training configurations under spill.torch.offload() against plain torch.

Not part of CI (a full sweep takes many minutes): a tool, run by hand on the CPU bridge, to find
the configurations nobody tried before users do. Each configuration runs in a process of its
own: plain torch first (PyTorch's CPU allocator), then spill.torch.enable() on the CPU bridge,
the footprint measured (`max_memory_allocated()` over two steps without offload), then
`offload(model, optimizer)` with the budget at a fraction of it. Outcomes:

  ok        losses, validation losses, inference outputs and the final state_dict are plain
            torch's (torch.equal), and bytes were swapped out
  mismatch  a result differs from plain torch's
  noswap    the results match but nothing was swapped (expected with budget=0.25: four times
            the footprint, where steps run quiet unless quiet=off)
  oom       torch.cuda.OutOfMemoryError (spill's message is kept)
  crash     the process died of a signal (SIGSEGV on the bridge: a tensor touched unpinned)
  error     another exception (the traceback's last line is kept)
  invalid   plain torch itself refused the configuration

Usage (from the repository root; SPILL_LIBRARY and SPILL_CLI as for the pytest suite):
  /usr/bin/python3 tests/python/torch_sweep.py --matrix quick [--jobs 2] [--out sweep.json]
  /usr/bin/python3 tests/python/torch_sweep.py --list --matrix full
  /usr/bin/python3 tests/python/torch_sweep.py --only 'model=mlp,opt=sgd,budget=3'
One configuration is `key=value` pairs over the axes in DEFAULTS; --only runs the given ones.
budget=N is the footprint divided by N (0.25: four times the footprint, no pressure).
"""
from __future__ import annotations

import argparse
import random
import sys
from typing import Dict, List

import sweep_runner as runner

MODELS = ["mlp", "mlp_nobias", "mlp_ln", "mlp_dropout", "cnn", "transformer", "attn", "lstm",
          "gru"]
OPTIMIZERS = ["sgd", "sgd_nesterov", "sgd_wd", "adam", "adamw", "adam_amsgrad", "rmsprop",
              "adagrad", "adamax", "nadam", "radam"]
# The axes and their defaults; a configuration names only what differs.
DEFAULTS: Dict[str, str] = {
    "model": "mlp", "opt": "adam", "loss": "ce", "batch": "small", "budget": "3",
    "gran": "64KiB", "quiet": "default", "zero": "none", "sched": "none", "eval": "0",
    "infer": "0", "steps": "4", "amp": "none",
}
AXES: Dict[str, List[str]] = {
    "model": MODELS, "opt": OPTIMIZERS, "loss": ["ce", "mse"], "batch": ["small", "large"],
    "budget": ["2", "3", "4", "0.25"], "gran": ["64KiB", "2MiB"], "quiet": ["default", "off"],
    "zero": ["none", "zeros"], "sched": ["none", "step", "onecycle"], "eval": ["0", "1"],
    "infer": ["0", "1"], "amp": ["none", "bf16"],
}


def name(cfg: Dict[str, str]) -> str:
    return runner.name(cfg, DEFAULTS)


def parse(text: str) -> Dict[str, str]:
    return runner.parse(text, DEFAULTS)


def matrix(kind: str, seed: int) -> List[Dict[str, str]]:
    """quick: every model with SGD and Adam, small and large batches, at a third; every
    optimizer on the MLP, the CNN and the transformer. full: quick, plus every other axis
    varied alone from each model's defaults, plus a seeded sample of random combinations."""
    out: List[Dict[str, str]] = []
    for model in MODELS:
        for opt in ["sgd", "adam"]:
            for batch in ["small", "large"]:
                out.append(parse(f"model={model},opt={opt},batch={batch}"))
    for model in ["mlp", "cnn", "transformer"]:
        for opt in OPTIMIZERS:
            out.append(parse(f"model={model},opt={opt}"))
    if kind == "full":
        for model in MODELS:
            for axis, values in AXES.items():
                if axis in ("model", "opt", "batch"):
                    continue
                for v in values:
                    if v != DEFAULTS[axis]:
                        out.append(parse(f"model={model},{axis}={v}"))
        rng = random.Random(seed)
        for _ in range(40):
            # (amp, added later, is left out: the sample stays the one docs/pytorch.md counts)
            out.append({k: rng.choice(AXES[k]) if k in AXES and k != "amp" else DEFAULTS[k]
                        for k in DEFAULTS})
    seen, unique = set(), []
    for cfg in out:
        if name(cfg) not in seen:
            seen.add(name(cfg))
            unique.append(cfg)
    return unique


# ------------------------------------------------------------------ the worker (one config)

WORKER = r'''
import gc, json, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
import spill, spill.torch as st
torch.set_num_threads(1)
cfg = json.loads(sys.argv[1])
STEPS = int(cfg["steps"])
LARGE = cfg["batch"] == "large"

class Attn(nn.Module):
    """A hand-written GPT block stack with an Embedding and an LM head tied to it."""
    def __init__(self, vocab=2048, d=256, blocks=2, heads=4):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Parameter(torch.randn(64, d) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            b = nn.Module()
            b.ln1, b.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            b.qkv, b.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            b.fc, b.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.blocks.append(b)
        self.lnf = nn.LayerNorm(d)
        self.heads = heads
    def forward(self, idx):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe[:T]
        mask = torch.ones(T, T).tril().bool()
        for b in self.blocks:
            q, k, v = b.qkv(b.ln1(x)).split(x.shape[-1], dim=-1)
            q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, -1)
            x = x + b.proj(y)
            x = x + b.out(F.gelu(b.fc(b.ln2(x))))
        return self.lnf(x) @ self.wte.weight.t()

class Encoder(nn.Module):
    def __init__(self, vocab=2048, d=256):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(d, 4, 1024, batch_first=True)
                                     for _ in range(2)])
        self.head = nn.Linear(d, vocab)
    def forward(self, idx):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

class Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(128, 512, num_layers=2,
                                                           batch_first=True)
        self.head = nn.Linear(512, 10)
    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])

def build_model():
    m = cfg["model"]
    if m.startswith("mlp"):
        layers = []
        for _ in range(6):
            layers.append(nn.Linear(512, 512, bias=m != "mlp_nobias"))
            if m == "mlp_ln":
                layers.append(nn.LayerNorm(512))
            layers.append(nn.ReLU())
            if m == "mlp_dropout":
                layers.append(nn.Dropout(0.2))
        return nn.Sequential(*layers, nn.Linear(512, 10))
    if m == "cnn":
        # Activations dominate (1 MiB each at the small batch), as in a real CNN: no single
        # layer's working set comes near a third of the footprint.
        layers = [nn.Conv2d(3, 16, 3, padding=1)]
        for _ in range(10):
            layers += [nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)]
        return nn.Sequential(*layers, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16 * 16, 10))
    if m == "transformer":
        return Encoder()
    if m == "attn":
        return Attn()
    if m in ("lstm", "gru"):
        return Recurrent(m)
    raise SystemExit(f"unknown model {m}")

def batch(g):
    """An input and a target for the model and loss; small or large against the weights."""
    m = cfg["model"]
    if m.startswith("mlp"):
        n = 1024 if LARGE else 16
        x = torch.randn(n, 512, generator=g)
        shape = (n,)
    elif m == "cnn":
        n = 64 if LARGE else 16
        x = torch.randn(n, 3, 32, 32, generator=g)
        shape = (n,)
    elif m in ("transformer", "attn"):
        n = 16 if LARGE else 2
        x = torch.randint(0, 2048, (n, 64), generator=g)
        y = torch.randint(0, 2048, (n, 64), generator=g)
        if cfg["loss"] == "mse":
            return x, torch.randn(n, 64, 2048, generator=g)
        return x, y
    else:
        n = 128 if LARGE else 4
        x = torch.randn(n, 32, 128, generator=g)
        shape = (n,)
    if cfg["loss"] == "mse":
        return x, torch.randn(n, 10, generator=g)
    return x, torch.randint(0, 10, shape, generator=g)

def loss_fn(out, y):
    if cfg["loss"] == "mse":
        return F.mse_loss(out, y)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

def build_optimizer(params):
    o, optim = cfg["opt"], torch.optim
    table = {
        "sgd": lambda: optim.SGD(params, lr=0.01),
        "sgd_nesterov": lambda: optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True),
        "sgd_wd": lambda: optim.SGD(params, lr=0.01, weight_decay=1e-4),
        "adam": lambda: optim.Adam(params, lr=1e-3),
        "adamw": lambda: optim.AdamW(params, lr=1e-3),
        "adam_amsgrad": lambda: optim.Adam(params, lr=1e-3, amsgrad=True),
        "rmsprop": lambda: optim.RMSprop(params, lr=1e-3),
        "adagrad": lambda: optim.Adagrad(params, lr=1e-2),
        "adamax": lambda: optim.Adamax(params, lr=1e-3),
        "nadam": lambda: optim.NAdam(params, lr=1e-3),
        "radam": lambda: optim.RAdam(params, lr=1e-3),
    }
    return table[o]()

def build_scheduler(opt):
    s = cfg["sched"]
    if s == "step":
        return torch.optim.lr_scheduler.StepLR(opt, 1, 0.7)
    if s == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS + 1)
    return None

def train(steps, wrap=None):
    torch.manual_seed(0)
    model = build_model()
    opt = build_optimizer(model.parameters())
    sched = build_scheduler(opt)
    h = wrap(model, opt) if wrap else None
    g = torch.Generator().manual_seed(1)
    # The validation batch exists only when used: a tensor the loop keeps outside the model
    # is never declared swappable (by design), and would count against the budget.
    if cfg["eval"] == "1" or cfg["infer"] == "1":
        xv, yv = batch(torch.Generator().manual_seed(2))
    losses, val = [], []
    for _ in range(steps):
        x, y = batch(g)
        opt.zero_grad(set_to_none=cfg["zero"] == "none")
        if cfg["amp"] == "bf16":  # the CPU's autocast (the bridge has no fp16 one)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
        else:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if cfg["eval"] == "1":
            model.eval()
            with torch.no_grad():
                val.append(loss_fn(model(xv), yv).item())
            model.train()
    out = None
    if cfg["infer"] == "1":
        model.eval()
        with torch.no_grad():
            out = model(xv).clone()
    return losses, val, out, model, h

def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

try:
    base_losses, base_val, base_out, bm, _ = train(STEPS)
except Exception as e:  # plain torch refused the configuration
    print("RESULT " + json.dumps({"outcome": "invalid", "detail": f"{type(e).__name__}: {e}"}))
    sys.exit(0)
base_state = state(bm)
del bm
gran = cfg["gran"]
st.enable(f"budget:4GiB,swap_threshold:128KiB,sim_granularity:{gran}", target="cpu")
gc.collect()
st.reset_peak_memory_stats()
train(2)
gc.collect()
footprint = st.max_memory_allocated()
budget = int(footprint / float(cfg["budget"]))
quiet = False if cfg["quiet"] == "off" else 0.5
def wrap(m, o):
    h = st.offload(m, o, quiet=quiet)
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
                    all(torch.equal(got[k], base_state[k]) for k in got))
    out_equal = (base_out is None) or torch.equal(out, base_out)
result = {
    "losses_equal": losses == base_losses, "val_equal": val == base_val,
    "out_equal": out_equal, "params_equal": params_equal,
    "losses": losses, "base_losses": base_losses,
    "footprint": footprint, "budget": budget, "seconds": round(elapsed, 2),
    "bytes_out": after["swap.bytes_out"] - before["swap.bytes_out"],
    "planned": after["swap.steps_planned"] - before["swap.steps_planned"],
    "quiet_steps": h.quiet_steps,
}
ok = all(result[k] for k in ("losses_equal", "val_equal", "out_equal", "params_equal"))
result["outcome"] = ("ok" if result["bytes_out"] > 0 else "noswap") if ok else "mismatch"
spill.set_budget(4 << 30)
h.remove()
print("RESULT " + json.dumps(result))
'''


def main() -> int:
    def add_seed(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--seed", type=int, default=13)
    return runner.main(__doc__.split("\n\n")[0], DEFAULTS, WORKER, ["quick", "full"],
                       lambda kind, args: matrix(kind, args.seed), 240, add_seed)


if __name__ == "__main__":
    sys.exit(main())
