"""Small models and a deterministic training loop for the spill.torch tests and benchmarks:
an MLP, a CNN with batch norm and a GPT-style transformer (AdamW), each small enough to train
a few steps on one CPU core in seconds while its tensors are large enough (>= 256 KiB) for
spill to move them."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from models import Block  # GPT-2's block, as the capture tests build it


class MLP(nn.Module):
    def __init__(self, width: int = 1024, depth: int = 8, classes: int = 64) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Convolution, batch norm and ReLU blocks: activations (1 MiB each) dominate."""

    def __init__(self, channels: int = 8, blocks: int = 16, classes: int = 10) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1, bias=False)]
        for _ in range(blocks):
            layers += [nn.BatchNorm2d(channels), nn.ReLU(),
                       nn.Conv2d(channels, channels, 3, padding=1, bias=False)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class GPT(nn.Module):
    """GPT-2's shape in small: pre-norm blocks in a ModuleList, the LM head tied to the token
    embedding and written as a matmul in the parent's forward (a parameter used outside its
    module, which offload() must find)."""

    def __init__(self, vocab: int = 1024, d: int = 256, layers: int = 3, heads: int = 4,
                 n_ctx: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(n_ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for emb in (self.wte, self.wpe):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()


class DropMLP(nn.Module):
    """Residual blocks (Linear, ReLU) with stochastic depth: each forward skips each block
    with probability 0.3, drawn from a generator seeded by the forward's number, so that every
    step runs other ops than the last (the skipped blocks' parameters get no gradient and the
    optimizer leaves them alone)."""

    def __init__(self, width: int = 512, depth: int = 8, classes: int = 64) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, classes)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(7000 + self.calls)
        self.calls += 1
        keep = torch.rand(len(self.blocks), generator=g) >= 0.3
        for block, k in zip(self.blocks, keep.tolist()):
            if k:
                x = x + torch.relu(block(x))
        return self.head(x)


class MoE(nn.Module):
    """Two mixture-of-experts layers with top-2 routing (topk, nonzero, index_select,
    index_add_): each expert gets a number of tokens of its own every step, and one may get
    none (its ops do not run)."""

    def __init__(self, d: int = 256, hidden: int = 1024, experts: int = 8, layers: int = 2,
                 classes: int = 64) -> None:
        super().__init__()
        self.routers = nn.ModuleList(nn.Linear(d, experts) for _ in range(layers))
        self.experts = nn.ModuleList(
            nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
                          for _ in range(experts)) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for router, experts in zip(self.routers, self.experts):
            weight, chosen = torch.softmax(router(x), dim=-1).topk(2, dim=-1)
            out = torch.zeros_like(x)
            for e, expert in enumerate(experts):
                rows, slot = (chosen == e).nonzero(as_tuple=True)
                if rows.numel() == 0:
                    continue
                y = expert(x.index_select(0, rows)) * weight[rows, slot].unsqueeze(-1)
                out = out.index_add(0, rows, y)
            x = x + out
        return self.head(x)


def _drop_batch(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5000 + step)
    return torch.randn(128, 512, generator=g), torch.randint(0, 64, (128,), generator=g)


def _moe_batch(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6000 + step)
    return torch.randn(512, 256, generator=g), torch.randint(0, 64, (512,), generator=g)


# name: (model factory, optimizer factory, batch maker(step) -> (inputs, targets), loss)
def _mlp_batch(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(64, 1024, generator=g), torch.randint(0, 64, (64,), generator=g)


def _cnn_batch(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)


def _gpt_batch(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3000 + step)
    ids = torch.randint(0, 1024, (4, 65), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _gpt_lengths_batch(step: int, lengths: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch padded to its own longest sequence (dynamic padding): every step has the same
    ops in the same order at a sequence length drawn from ``lengths``."""
    g = torch.Generator().manual_seed(4000 + step)
    n = lengths[int(torch.randint(0, len(lengths), (1,), generator=g))]
    ids = torch.randint(0, 1024, (4, n + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _adamw(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)


# The optimizers run torch's default implementation, as a user's would: on CUDA the foreach
# kernels, which offload() runs too (over chunks of parameters under pressure); on the CPU the
# per-parameter loop.
MODELS: Dict[str, Tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.optim.Optimizer],
                        Callable[[int], Tuple[torch.Tensor, torch.Tensor]]]] = {
    "mlp": (MLP, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), _mlp_batch),
    "cnn": (CNN, lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), _cnn_batch),
    "gpt": (GPT, _adamw, _gpt_batch),
    # The GPT at 128 positions with each batch's length drawn from 96..128 (gpt_var), from
    # {64, 96, 128} (gpt_bucket), or always 128 (gpt128, whose footprint is theirs).
    "gpt_var": (lambda: GPT(n_ctx=128), _adamw,
                lambda i: _gpt_lengths_batch(i, list(range(96, 129)))),
    "gpt_bucket": (lambda: GPT(n_ctx=128), _adamw,
                   lambda i: _gpt_lengths_batch(i, [64, 96, 128])),
    "gpt128": (lambda: GPT(n_ctx=128), _adamw, lambda i: _gpt_lengths_batch(i, [128])),
    # Lengths 32 and 48: a block's activation (batch * length * width * 4 bytes) is 128 KiB at
    # 32 tokens, not over swap_threshold (never moved, unseen by the swapper), and 192 KiB at
    # 48, so that the two lengths' steps differ in their blocks, not only in their sizes.
    "gpt_straddle": (lambda: GPT(n_ctx=128), _adamw, lambda i: _gpt_lengths_batch(i, [32, 48])),
    # Steps whose ops differ from the last step's: stochastic depth, top-2 experts, a varying
    # number of micro-batches (MICRO_BATCHES).
    "drop": (DropMLP, _adamw, _drop_batch),
    "moe": (MoE, _adamw, _moe_batch),
    "mlp_accum": (MLP, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), _mlp_batch),
}
# A model trained with gradient accumulation -> its number of micro-batches at step i.
MICRO_BATCHES: Dict[str, Callable[[int], int]] = {"mlp_accum": lambda i: [1, 3, 2, 4][i % 4]}
# A model whose batches vary -> the same model at its largest batch (its training footprint).
FOOTPRINT_OF = {"gpt_var": "gpt128", "gpt_bucket": "gpt128", "gpt_straddle": "gpt128"}


def train(name: str, steps: int, before_step: Callable[[int], None] = lambda i: None,
          wrap: Callable[[nn.Module, torch.optim.Optimizer], Any] = lambda m, o: None,
          context: Optional[Callable[[nn.Module, torch.optim.Optimizer], Any]] = None,
          device: str = "cpu", before_update: Callable[[int], None] = lambda i: None
          ) -> Tuple[List[float], nn.Module, Any]:
    """Trains model ``name`` for ``steps`` steps from seed 0 on ``device``; returns the losses,
    the model and what ``wrap(model, optimizer)`` returned (e.g. an offload handle). With
    ``context``, the loop runs inside ``context(model, optimizer)`` (e.g. spill.torch.guard).
    ``before_step(i)`` runs before step i's forward, ``before_update(i)`` after its backward,
    before optimizer.step()."""
    make_model, make_optimizer, batch = MODELS[name]
    if device != "cpu":
        # Runs compared bit for bit need cuDNN's deterministic convolution algorithms (its
        # heuristics may pick ones with atomics, which differ from run to run without spill).
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    model = make_model().to(device)
    optimizer = make_optimizer(model)
    extra = wrap(model, optimizer)
    losses = []
    with context(model, optimizer) if context is not None else contextlib.nullcontext():
        for i in range(steps):
            x, y = (t.to(device) for t in batch(i))
            before_step(i)
            optimizer.zero_grad(set_to_none=True)
            n = MICRO_BATCHES[name](i) if name in MICRO_BATCHES else 1
            if n == 1:
                loss = _ce(model(x), y)
                loss.backward()
                total = loss.item()
            else:  # gradient accumulation, each micro-batch's loss weighted by its share
                total = 0.0
                for xs, ys in zip(x.tensor_split(n), y.tensor_split(n)):
                    loss = _ce(model(xs), ys) * (ys.shape[0] / y.shape[0])
                    loss.backward()
                    total += loss.item()
            before_update(i)
            optimizer.step()
            losses.append(total)
    return losses, model, extra
