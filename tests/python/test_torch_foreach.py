"""Ops over lists of tensors under spill's pin-every-op modes (guard, offload's window and its
optimizer step under pressure): torch's foreach ops (clip_grad_norm_ on a GPU since torch 2.0,
the foreach optimizers), the fused optimizers' kernels and GradScaler's unscale_ take every
gradient at once. Over a quarter of the budget they run in chunks that fit
(python/spill/torch/_foreach.py), with the one call's results. On the CPU bridge (torch 1.13)
the loops call the foreach ops themselves, as torch 2.x's clip_grad_norm_ does on a GPU; with
SPILL_TORCH_TARGET=cuda they run PyTorch's own foreach and fused code. Each scenario runs in a
process of its own.
"""
from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("torch", reason="spill.torch needs PyTorch (Debian: python3-torch)")

from test_torch_bridge import (AT_A_THIRD, MATCHES_PLAIN_TORCH, TARGET,  # noqa: E402
                               quiet_preamble, run_ok)

# Eight 1 MiB tensors and what the foreach ops of a training loop do with them; `ops(xs)`
# returns the norms and leaves xs updated.
OPS = textwrap.indent("""
def ops(xs):
    norms = torch._foreach_norm(xs)
    torch._foreach_mul_(xs, 0.5)                                          # Scalar
    torch._foreach_add_(xs, [x.flip(0) for x in xs], alpha=0.25)          # List
    torch._foreach_addcdiv_(xs, xs, [x.abs() + 1 for x in xs],
                            [0.125 * i for i in range(len(xs))])          # ScalarList
    return norms
def tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(512, 512, generator=g).to(dev) for _ in range(8)]
""", " " * 8)


def test_foreach_ops_over_more_than_the_budget_run_in_chunks_with_one_calls_results() -> None:
    """Inside guard(), foreach ops over eight 1 MiB tensors (declared swappable and moved to
    the host first) at a budget of 6 MiB (chunks of a quarter, 1.5 MiB: one index each):
    norms and updated tensors equal plain torch's, each op ran as several calls, and bytes
    moved both ways. Before the chunks, the first op's pins ran out of memory (it needs all 8
    MiB resident)."""
    out = run_ok(quiet_preamble("64MiB") + OPS + """
        base = tensors()
        base_norms = ops(base)
        base = [t.cpu() for t in base]
        base_norms = [t.cpu() for t in base_norms]
        enable()
        xs = tensors()
        with st.guard() as g:
            torch._foreach_add_(xs, 0.0)  # declared swappable by the guard
            spill.set_budget(6 << 20)
            before = spill.stats()
            calls = g.ops
            norms = ops(xs)
            calls = g.ops - calls
            after = spill.stats()
            spill.set_budget(64 << 20)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(norms, base_norms)), "norms differ"
        assert all(torch.equal(a.cpu(), b) for a, b in zip(xs, base)), "tensors differ"
        # 4 foreach ops in 8 chunks each, 18 other ops (flip, abs, add) and 6 outside lists
        assert calls > 4 * 8, calls
        assert after["swap.bytes_out"] > before["swap.bytes_out"], "nothing moved out"
        assert after["swap.bytes_in"] > before["swap.bytes_in"], "nothing came back"
        print("ok", calls)
    """)
    assert "ok" in out


# A loop that clips its gradients with foreach ops between backward and step: torch 2.x's
# clip_grad_norm_ on a GPU (foreach=True: a norm of every gradient in one op, then one op that
# scales them all); on the CPU, where it has no foreach path, the same two ops written out.
# Eight 4 MiB weights and plain SGD (no state): at a third of the footprint the gradients alone
# hold more than the budget. Batch 512: the activations are 2 MiB, a GPU's granularity.
LOOP = textwrap.indent("""
import torch.nn as nn
def clip(params, max_norm):
    if dev == "cuda" and int(torch.__version__.split(".")[0]) >= 2:
        return nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    total = torch.stack(norms).norm()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef.item())
    return total
def build(optimizer):
    torch.manual_seed(0)
    layers = []
    for i in range(8):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    m = nn.Sequential(*layers[:-1]).to(dev)
    if optimizer == "sgd":
        return m, torch.optim.SGD(m.parameters(), lr=0.1)
    return m, torch.optim.Adam(m.parameters(), lr=1e-3, fused=True)
def train(optimizer, clipping, wrap=lambda m, o: None, steps=5):
    m, opt = build(optimizer)
    h = wrap(m, opt)
    g = torch.Generator().manual_seed(1)
    losses, norms = [], []
    for i in range(steps):
        x = torch.randn(512, 1024, generator=g).to(dev)
        y = torch.randn(512, 1024, generator=g).to(dev)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        if clipping == "foreach":
            norms.append(clip(list(m.parameters()), 0.5).item())
        opt.step()
        losses.append(loss.item())
    return losses, norms, m, h
""", " " * 8)


@pytest.mark.parametrize("clipping", ["none", "foreach"])
@pytest.mark.parametrize("optimizer", [
    "sgd",
    pytest.param("adam_fused", marks=pytest.mark.skipif(
        TARGET != "cuda", reason="fused=True optimizers need CUDA (torch 2.x)"))])
def test_plain_sgd_and_foreach_clipping_train_as_plain_torch_at_a_third_of_the_footprint(
        optimizer: str, clipping: str) -> None:
    """offload(model, optimizer) at a third of the footprint (no clipping, or the loop
    clipping gradients with foreach ops between backward and step, in offload's window):
    losses, gradient norms and final parameters are plain torch's, and bytes were swapped.
    With a fused Adam (CUDA), its step's one kernel over every parameter, gradient and state
    runs in chunks as well. Before, plain SGD ran out of memory in the second step's backward
    (each new gradient stayed undeclared until the next parameter's gradient hook, which runs
    after the next layer's backward has made that parameter's gradient: "the swapper cannot
    evict 8.00 MiB pinned and 12.00 MiB never declared swappable"), and the norm op's pins
    ran out of memory (every gradient resident at once)."""
    out = run_ok(quiet_preamble("1GiB") + LOOP + f"""
        import gc
        base, base_norms, bm, _ = train("{optimizer}", "{clipping}")
        base_params = [p.detach().cpu().clone() for p in bm.parameters()]
        del bm
        enable()
        gc.collect()
        st.reset_peak_memory_stats()
        train("{optimizer}", "{clipping}", steps=2)
""" + AT_A_THIRD + f"""
        losses, norms, m, h = train("{optimizer}", "{clipping}", wrap)
        after = spill.stats()
""" + MATCHES_PLAIN_TORCH + """
        assert norms == base_norms, (norms, base_norms)
        spill.set_budget(1 << 30)
        h.remove()
        print("ok", footprint, after["swap.bytes_out"] - before["swap.bytes_out"])
    """)
    assert "ok" in out


# Adam with the caller's foreach setting (or torch's default) over six 1 MiB weights, a StepLR
# schedule, and a count of the torch._foreach_* calls of each step (the optimizer's foreach
# implementation calls them through the torch module, on torch 1.13 and 2.x alike).
ADAM = textwrap.indent("""
import collections, gc
import torch.nn as nn
calls = collections.Counter()
def counted(name):
    f = getattr(torch, name)
    def call(*args, **kwargs):
        calls[name] += 1
        return f(*args, **kwargs)
    return call
for name in dir(torch):
    if name.startswith("_foreach_"):
        setattr(torch, name, counted(name))
def build(foreach):
    torch.manual_seed(0)
    layers = []
    for i in range(6):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    m = nn.Sequential(*layers[:-1]).to(dev)
    kwargs = {} if foreach == "default" else {"foreach": foreach}
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-2, **kwargs)
    return m, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
def train(foreach, wrap=lambda m, o: None, steps=5):
    m, opt, sched = build(foreach)
    h = wrap(m, opt)
    g = torch.Generator().manual_seed(1)
    losses, per_step = [], []
    for i in range(steps):
        x = torch.randn(256, 512, generator=g).to(dev)
        y = torch.randn(256, 512, generator=g).to(dev)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        calls.clear()
        opt.step()
        per_step.append(sum(calls.values()))
        sched.step()
        losses.append(loss.item())
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return losses, m, h, per_step, groups, opt.state_dict()["param_groups"]
""", " " * 8)


@pytest.mark.parametrize("foreach", [True, "default"])
@pytest.mark.parametrize("pressure", ["quiet", "a_third"])
def test_an_optimizer_under_offload_runs_the_implementation_plain_torch_runs(
        foreach: object, pressure: str) -> None:
    """offload(model, optimizer) with Adam (weight decay, a StepLR schedule) set to foreach=True
    or left at torch's default (foreach on CUDA parameters since torch 2.0, the per-parameter
    loop on torch 1.13's CPU): every step after the first calls torch's foreach ops exactly
    when plain torch's does, in quiet steps (a budget of eight footprints: the step runs whole,
    as many calls as plain torch) and at a third of the footprint (armed steps: the param group
    runs in chunks of parameters that fit an eighth of the budget, one weight each here, so more
    calls than plain torch's, each over fewer tensors); losses and final parameters are plain
    torch's, and param_groups and state_dict() show the caller's one group after the step.
    Before, offload set foreach=False for every step it ran: no foreach call at all, and on
    CUDA the loop rounded otherwise than the foreach kernels plain torch ran (GPU run
    2026-12-04: final parameters differed in a dozen tests)."""
    foreach_arg = repr(foreach)
    out = run_ok(quiet_preamble("1GiB") + ADAM + f"""
        base, bm, _, base_calls, base_groups, base_saved = train({foreach_arg})
        base_params = [p.detach().cpu().clone() for p in bm.parameters()]
        del bm
        enable()
        gc.collect()
        st.reset_peak_memory_stats()
        train({foreach_arg}, steps=2)
        gc.collect()
        footprint = st.max_memory_allocated()
        budget = footprint // 3 if "{pressure}" == "a_third" else 8 * footprint
        def wrap(m, o):
            h = st.offload(m, o)
            spill.set_budget(budget)
            return h
        before = spill.stats()
        losses, m, h, per_step, groups, saved = train({foreach_arg}, wrap)
        after = spill.stats()
        if {foreach_arg} is True:
            assert all(base_calls), base_calls  # the scenario runs the foreach implementation
        assert [c > 0 for c in per_step[1:]] == [c > 0 for c in base_calls[1:]], (
            per_step, base_calls)
        if "{pressure}" == "quiet":
            assert h.quiet_steps > 0, h.quiet_steps
            assert per_step[1:] == base_calls[1:], (per_step, base_calls)
        else:
            assert h.quiet_steps == 0, h.quiet_steps
            assert all(c > b for c, b in zip(per_step[1:], base_calls[1:]) if b), (
                per_step, base_calls)
        assert groups == base_groups and saved == base_saved, (groups, base_groups)
""" + (MATCHES_PLAIN_TORCH if pressure == "a_third" else
       MATCHES_PLAIN_TORCH.replace('assert after["swap.bytes_out"]', "#")) + """
        spill.set_budget(1 << 30)
        h.remove()
        print("ok", footprint, per_step, base_calls)
    """)
    assert "ok" in out
