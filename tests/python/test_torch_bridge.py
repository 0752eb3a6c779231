"""spill.torch on the CPU bridge: spill's simulated device as PyTorch's CPU allocator, where a
swapped-out tensor faults if touched, so every missing pin crashes instead of passing. The
same tests run on a GPU (SPILL_TORCH_TARGET=cuda, from bench/gpu/run_all.sh); the GPU-only
ones skip here with the reason.

Each training scenario runs in a process of its own (torch_bridge_run.py): spill's
configuration and PyTorch's allocator are process-wide.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any, Dict, List, Tuple

import pytest

from fork_server import ForkServer

torch = pytest.importorskip("torch", reason="spill.torch needs PyTorch (Debian: python3-torch)")

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TARGET = os.environ.get("SPILL_TORCH_TARGET", "cpu")
# The simulated device's mapping granularity. A GPU's is 2 MiB (H100, H200): every block over
# the swap threshold rounds up to it there, so a scenario sized for 64 KiB may not fit on a GPU.
# SPILL_TEST_SIM_GRANULARITY=2MiB rehearses a GPU's rounding on the CPU bridge (the tests sized
# for 64 KiB then skip, as they do on CUDA).
SIM_GRANULARITY = os.environ.get("SPILL_TEST_SIM_GRANULARITY", "64KiB")
SIZED_FOR_64K = TARGET != "cpu" or SIM_GRANULARITY != "64KiB"
STEPS = 6
needs_cuda = pytest.mark.skipif(TARGET != "cuda" or not torch.cuda.is_available(),
                                reason="needs a GPU (run with SPILL_TORCH_TARGET=cuda there)")


# PyTorch takes its cuBLAS and cuBLASLt workspaces from the allocator, one per handle and
# stream (a handle per thread that runs a matrix product: the caller's, and autograd's device
# thread in a backward), kept for the process, never declared swappable. Over the swap
# threshold each rounds up to the GPU's 2 MiB: in the GPU run of 2026-12-04
# (CUBLAS_WORKSPACE_CONFIG=:64:8, CUBLASLT_WORKSPACE_SIZE=512, 512 KiB each) the out-of-memory
# reports at 12 MiB budgets listed three undeclared 2 MiB blocks besides the tests' own, and
# 6 MiB stayed allocated after a freed model (inferred to be these: not verified on the GPU).
# At 128 KiB (the swap threshold of every test's configuration) they are small-pool blocks,
# as on the CPU bridge, which has no cuBLAS: the same budgets fit both.
CUDA_WORKSPACES = {"CUBLAS_WORKSPACE_CONFIG": ":16:8", "CUBLASLT_WORKSPACE_SIZE": "128"}


def _env(extra: Dict[str, str] | None = None) -> Dict[str, str]:
    env = dict(os.environ)
    if TARGET == "cuda":
        for name, value in CUDA_WORKSPACES.items():
            env.setdefault(name, value)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


# On the CPU bridge, scenarios run in children forked from a process that has imported torch
# (fork_server.py: a second of CPU saved per scenario, a quarter of these tests' time) unless
# SPILL_TEST_FRESH_INTERPRETERS=1; on CUDA, and where the environment differs from the
# server's in more than spill's variables, each starts a fresh interpreter.
_forks = (ForkServer(_env()) if TARGET == "cpu"
          and os.environ.get("SPILL_TEST_FRESH_INTERPRETERS") != "1" else None)


def run_python(args: List[str], env: Dict[str, str], timeout: int
               ) -> subprocess.CompletedProcess:
    """``python ARGS`` (``-c CODE`` or ``SCRIPT ...``) as a process of its own, with its
    output captured: a child of the fork server where it can be, else a fresh interpreter."""
    if _forks is not None:
        done = (_forks.run(env, timeout, code=args[1]) if args[0] == "-c" else
                _forks.run(env, timeout, script=args[0], argv=args[1:]))
        if done is not None:
            return done
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_code(code: str, extra_env: Dict[str, str] | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a process of its own with the source package importable."""
    return run_python(["-c", textwrap.dedent(code)], _env(extra_env), timeout)


def run_ok(code: str, extra_env: Dict[str, str] | None = None) -> str:
    r = run_code(code, extra_env)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


_runs: Dict[tuple, Dict[str, Any]] = {}


def training(model: str, policy: str = "plan", modes: str = "offload,guard",
             backward_thread: bool = False) -> Dict[str, Any]:
    """The result of torch_bridge_run.py for one model (cached per process); with
    ``backward_thread``, each backward runs on a thread of its own on the CPU bridge, as on
    CUDA (where every backward does)."""
    key = (model, policy, modes, backward_thread and TARGET == "cpu")
    if key not in _runs:
        extra = {"SPILL_TEST_BACKWARD_THREAD": "1"} if key[-1] else {}
        r = run_python([str(HERE / "torch_bridge_run.py"), model, modes, policy, str(STEPS),
                        TARGET], _env(extra), timeout=600)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        assert r.returncode == 0 and lines, (
            f"{model} ({policy}) failed: exit {r.returncode}\n{r.stdout[-3000:]}\n"
            f"{r.stderr[-6000:]}")
        _runs[key] = json.loads(lines[-1][len("RESULT "):])
    return _runs[key]


def backward_thread_env() -> Dict[str, str]:
    """The environment of a child whose every backward runs on a thread of its own on the CPU
    bridge, as on CUDA (tests/python/rehearse/sitecustomize.py); nothing on CUDA, where every
    backward does already."""
    if TARGET != "cpu":
        return {}
    return {"SPILL_TEST_BACKWARD_THREAD": "1",
            "PYTHONPATH": os.pathsep.join([str(HERE / "rehearse"), str(ROOT / "python"),
                                           os.environ.get("PYTHONPATH", "")])}


def step_delta(per_step: List[Dict[str, float]], key: str, first: int) -> float:
    """`key` summed over steps first.. (per_step[i] is the state before step i)."""
    return per_step[-1][key] - per_step[first][key]


# ------------------------------------------------------------------ training at 1/3 budget

# gpt_var: the GPT with each batch padded to its own length, drawn from 96..128 tokens (the
# budget is a third of its footprint at 128): every step's tensors have other sizes than the
# last step's, and steps still follow a plan (before, every step deviated).
@pytest.mark.parametrize("model", ["mlp", "cnn", "gpt", "gpt_var"])
@pytest.mark.parametrize("mode", ["offload", "guard"])
def test_training_at_a_third_of_the_footprint_is_bit_identical(model: str, mode: str) -> None:
    result = training(model)
    run = result["runs"][mode]
    assert run["losses_equal"], (run["losses"], run["base_losses"])
    assert run["params_equal"], "final parameters differ from the run without spill"
    steps = run["per_step"]
    assert step_delta(steps, "swap.bytes_out", 0) > 0, "nothing was swapped out"
    assert step_delta(steps, "swap.bytes_in", 0) > 0, "nothing came back"
    assert step_delta(steps, "swap.steps_planned", 0) > 0, "no step followed a plan"
    assert result["budget"] * 3 <= result["footprint"] + 3
    assert run["quiet_steps"] == 0, "a step at a third of the footprint ran quiet"


@pytest.mark.parametrize("model,ratio", [("mlp", 5), ("cnn", 5), ("gpt", 40), ("gpt_var", 5)])
def test_planned_steps_beat_lru(model: str, ratio: int) -> None:
    """Offload mode at 1/3 of the footprint: from the third step on (the first creates gradients
    and optimizer state, the second becomes the plan), planned steps have at most a fifth of
    LRU's demand fetches (the GPT a fortieth) and a third of its stall (simulated link), with
    at most one deviation; also when each step's sequence length differs (gpt_var). The GPT
    had 17 to LRU's 380 while an activation of its second step could take the id of AdamW's
    state (the plan's next block after a weight's access in the optimizer step), which made
    the plan hold that activation until the optimizer; none since (2026-12-05)."""
    plan = training(model)["runs"]["offload"]["per_step"]
    lru = training(model, "lru", "offload")["runs"]["offload"]["per_step"]
    first = 2
    demand_plan = step_delta(plan, "swap.demand_fetches", first)
    demand_lru = step_delta(lru, "swap.demand_fetches", first)
    stall_plan = step_delta(plan, "swap.stall_s", first)
    stall_lru = step_delta(lru, "swap.stall_s", first)
    detail = (f"steps {first}..{STEPS - 1}: demand fetches plan {demand_plan:.0f} / lru "
              f"{demand_lru:.0f}, stall plan {stall_plan * 1e3:.2f} ms / lru "
              f"{stall_lru * 1e3:.2f} ms")
    assert demand_lru > 0 and stall_lru > 0, detail
    assert demand_plan * ratio <= demand_lru, detail
    # Robust at time_scale:0 with wall queries: each of LRU's demand fetches stalls at least
    # its copy's link time however the host learns that it landed (SwapStats::stall_s), so
    # LRU's stall no longer depends on how fast the copy thread ran.
    assert stall_plan * 3 <= stall_lru, detail
    assert step_delta(plan, "swap.steps_planned", first) >= STEPS - first - 1, detail
    assert step_delta(plan, "swap.deviations", first) <= 1, detail


@pytest.mark.parametrize("mode", ["offload", "guard"])
def test_steps_of_lengths_on_both_sides_of_the_swap_threshold_follow_their_own_plans(
        mode: str) -> None:
    """gpt_straddle: batches of 32 or 48 tokens, whose steps differ in their blocks (a tensor
    under swap_threshold at 32, over it at 48). offload keys each step by its batch's shapes
    (spill_step_key), guard by those of the step's first op that pins (the embedding's), and
    the scope keeps a plan per length: after each length's step was recorded (steps 0 and 1,
    and 4, the first 48 after the state was made), every step follows its own, at each change
    of length too (steps 7, 13 and 15). Before (the same runs without keys, 2026-12-06), each
    change left the plan and was recorded again: offload 6 plans in 16 steps, 8 to 32 demand
    fetches at each change after step 4, against 0 to 3 now; guard 7 plans, 16 to 28."""
    steps = 16
    r = run_python([str(HERE / "torch_bridge_run.py"), "gpt_straddle", mode, "plan",
                    str(steps), TARGET], _env(), timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    run = json.loads(lines[-1][len("RESULT "):])["runs"][mode]
    assert run["losses_equal"], (run["losses"], run["base_losses"])
    assert run["params_equal"], "final parameters differ from the run without spill"
    per_step, first = run["per_step"], 5
    detail = {k: step_delta(per_step, k, first) for k in
              ("swap.steps_planned", "swap.deviations", "swap.steps_recorded",
               "swap.demand_fetches")}
    assert detail["swap.deviations"] == 0, detail
    assert detail["swap.steps_recorded"] == 0, detail
    assert detail["swap.steps_planned"] == steps - first, detail


@pytest.mark.parametrize("first", ["linear", "embedding", "conv"])
def test_guard_keys_each_step_by_its_batch(first: str) -> None:
    """guard(optimizer=...) keys a step by the shapes of the tensors its ops saw before its
    first pin, that op's arguments included: for a model whose first op pins only a weight
    (a Linear's transpose of it, torch 1.13) the batch comes from the ops that made it. Before
    (audit 34d), such a model had one key for batches of 64 and 96 rows. Steps of one batch
    size share their key from the first step on (zero_grad's record_function handle, a scalar
    made from the second step on, is left out)."""
    out = run_ok(ENABLE + f"""
        from spill.torch import _steps
        keys = []
        original = _steps.StepBoundaries.key
        def key(self, k):
            keys.append(k)
            return original(self, k)
        _steps.StepBoundaries.key = key
        first = {first!r}
        torch.manual_seed(0)
        if first == "linear":
            m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                    torch.nn.Linear(512, 10))
            batch = lambda n: torch.randn(n, 512, device=dev)
        elif first == "embedding":
            m = torch.nn.Sequential(torch.nn.Embedding(1000, 256), torch.nn.Linear(256, 10))
            batch = lambda n: torch.randint(0, 1000, (n,), device=dev)
        else:
            m = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(64 * 14 * 14, 10))
            batch = lambda n: torch.randn(n, 3, 16, 16, device=dev)
        m = m.to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        sizes = [64, 64, 96, 96, 64, 96]
        with st.guard(optimizer=opt):
            for n in sizes:
                m(batch(n)).float().pow(2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        by_size = {{}}
        for n, k in zip(sizes, keys):
            by_size.setdefault(n, set()).add(k)
        print("ok", len(keys), len(by_size[64]), len(by_size[96]), len(by_size[64] & by_size[96]))
    """)
    assert out.startswith("ok "), out
    steps, keys_64, keys_96, shared = (int(v) for v in out.split()[1:5])
    assert steps == 6 and keys_64 == 1 and keys_96 == 1 and shared == 0, out


def test_guard_keys_a_step_by_a_batch_no_op_under_it_made() -> None:
    """A batch made before the guard (a list of batches, indexed by the loop: no op under the
    guard makes it) of a model whose first op is a Linear's transpose of its weight: a view,
    which pins nothing, so the step's first pinning op is the matrix product, which takes the
    batch, and its shapes key the step. Before, the transpose pinned the weight and keyed the
    step by the weight alone: batches of 64 and 96 rows had one key."""
    out = run_ok(ENABLE + """
        from spill.torch import _steps
        keys = []
        original = _steps.StepBoundaries.key
        def key(self, k):
            keys.append(k)
            return original(self, k)
        _steps.StepBoundaries.key = key
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10)).to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        sizes = [64, 64, 96, 96, 64, 96]
        batches = [torch.randn(n, 512, device=dev) for n in sizes]
        with st.guard(optimizer=opt) as g:
            for x in batches:
                m(x).float().pow(2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        by_size = {}
        for n, k in zip(sizes, keys):
            by_size.setdefault(n, set()).add(k)
        print("ok", len(keys), len(by_size[64]), len(by_size[96]), len(by_size[64] & by_size[96]))
    """)
    assert out.startswith("ok "), out
    steps, keys_64, keys_96, shared = (int(v) for v in out.split()[1:5])
    assert steps == 6 and keys_64 == 1 and keys_96 == 1 and shared == 0, out


def test_copies_under_inference_mode_between_steps_pin_what_they_read() -> None:
    """Under ``torch.inference_mode()`` (autograd off) PyTorch hands a dispatch mode the
    composite ops that may return their argument or a copy (``to(dtype)``, ``contiguous()``,
    ``reshape()``, ``flatten()``) instead of the copy they make. Between steps, the window
    took them for views and ran them unpinned: an offloaded weight on the host read so
    faulted. Now only ops of their own that make views run unpinned; each copy here reads the
    weight's values."""
    out = run_ok(ENABLE + """
        import time
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10)).to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        h = st.offload(m, opt)
        x, y = torch.randn(64, 1024, device=dev), torch.randint(0, 10, (64,), device=dev)
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        w = m[0].weight
        copies = {"to": lambda: w.to(torch.float64), "contiguous": lambda: w.t().contiguous(),
                  "reshape": lambda: w.t().reshape(-1), "flatten": lambda: w.t().flatten()}
        with torch.no_grad():
            expected = {name: copy().clone() for name, copy in copies.items()}
        for name, copy in copies.items():
            spill.evict(w.data_ptr())
            deadline = time.monotonic() + 30
            while spill.residence(w.data_ptr()) != "on_host" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert spill.residence(w.data_ptr()) == "on_host", name
            with torch.inference_mode():
                r = copy()
            assert torch.equal(r, expected[name]), name
        print("ok")
    """)
    assert "ok" in out, out


def test_a_forward_given_keyword_arguments_only_is_keyed_by_their_shapes() -> None:
    """``model(ids=x)``: torch 1.13's forward pre-hooks see no keyword arguments, so every step
    had one key and the lengths 32 and 48 left the plan at each change (as without keys);
    offload's forward wrapper keys such a step by them. The GPT of gpt_straddle, behind a
    forward of keyword arguments only, at 22 MiB (a third of its footprint at 128 tokens);
    steps 6-13 (at a GPU's 2 MiB granule the second step of 48 tokens, step 5, is recorded
    again: the variant settles one step later)."""
    out = run_ok(ENABLE + f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import torch_train_models as m
        class KwGPT(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.gpt = m.GPT(n_ctx=128)
            def forward(self, *, ids, scale=1.0):
                return self.gpt(ids) * scale
        torch.manual_seed(0)
        model = KwGPT().to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        handle = st.offload(model, opt)  # (declares the weights: a GPU's 2 MiB blocks of them
        spill.set_budget(22 << 20)       # are more than 22 MiB)
        seen = []
        for i in range(14):
            x, y = m._gpt_lengths_batch(i, [32, 48])
            seen.append(x.shape[1])
            if i == 6:
                before = spill.stats()
            loss = m._ce(model(ids=x.to(dev)), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        after = spill.stats()
        changes = sum(a != b for a, b in zip(seen[6:], seen[7:]))
        print("ok", changes, after["swap.deviations"] - before["swap.deviations"],
              after["swap.steps_recorded"] - before["swap.steps_recorded"])
    """)
    assert out.startswith("ok "), out
    changes, deviations, recorded = (int(v) for v in out.split()[1:4])
    assert changes >= 2, out  # the lengths do change in steps 7-13
    assert deviations == 0 and recorded == 0, out


def test_a_list_of_batches_made_before_the_loop_follows_its_plan_epoch_after_epoch() -> None:
    """A list of batches made before the loop (a small data set preloaded on the device),
    trained over 3 epochs in order, then 3 shuffled, at 28 MiB (about half its footprint):
    each step's batch takes the plan's batch's place as the batches take turns, and the
    plan's prefetch brings in the batch that came next the last time. Before, the second
    epoch's batches (blocks a step had used before) were taken for blocks the plan did not
    have: no step of the later epochs followed its plan (here, 2026-12-07: 0 of 4 steps
    planned an epoch and 11-14 demand fetches, now 4 and 0-2). Sized in 2 MiB blocks (a GPU's
    granule)."""
    out = run_ok(ENABLE + """
        import json, random
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                    torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                    torch.nn.Linear(1024, 10)).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        batches = [(torch.randn(512, 1024, device=dev), torch.randint(0, 10, (512,), device=dev))
                   for _ in range(4)]
        handle = st.offload(model, opt)
        spill.set_budget(28 << 20)
        rng = random.Random(0)
        for shuffled in (False, True):
            epochs = []
            for epoch in range(3):
                before = spill.stats()
                order = list(range(len(batches)))
                if shuffled:
                    rng.shuffle(order)
                for i in order:
                    x, y = batches[i]
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                after = spill.stats()
                epochs.append(tuple(int(after["swap." + k] - before["swap." + k])
                                    for k in ("steps_planned", "deviations", "demand_fetches")))
            print("epochs", json.dumps(epochs))
        print("ok")
    """)
    assert out.rstrip().endswith("ok"), out
    for line in out.splitlines():
        if line.startswith("epochs"):
            epochs = json.loads(line.split(" ", 1)[1])
            for planned, deviations, demand in epochs[1:]:
                assert planned == 4 and deviations == 0, out
                assert demand <= 4, out  # at most one a step (a shuffled order's wrong prefetch)


# Steps whose ops differ from the last step's (torch_train_models.py): stochastic depth (drop:
# each block skipped at random), top-2 mixture of experts (moe: each expert's batch has its
# own size, an expert may get none), gradient accumulation over 1, 3, 2, 4 micro-batches
# (mlp_accum). A step follows its plan where it matches it (skipping the plan's ops it does
# not run, serving its own extra ops reactively, running the plan's ops again for another
# micro-batch); before, it left the plan at its first differing access and ran as LRU does
# (0 to 2 planned steps of 8, demand fetches 0.7 to 0.9 of LRU's).
# moe: 62 demand fetches to LRU's 752 before an activation could no longer take the id of
# optimizer state (see test_planned_steps_beat_lru), 15 after; at a GPU's 2 MiB granule
# (SPILL_TEST_SIM_GRANULARITY=2MiB, 2026-12-06) 42 to LRU's 736, hence 10 there.
@pytest.mark.parametrize("model,ratio", [("drop", 1.25), ("moe", 10 if SIZED_FOR_64K else 20),
                                         ("mlp_accum", 2)])
def test_steps_whose_ops_vary_follow_their_plan(model: str, ratio: float) -> None:
    resynced, detail = planned_against_lru(model, ratio)
    assert resynced >= 1, detail  # the steps do differ


def planned_against_lru(model: str, ratio: float, backward_thread: bool = False
                        ) -> Tuple[float, str]:
    """Trains ``model`` with offload and a plan, and with LRU: checks that the planned run is
    plain torch's bits, that steps 3 on followed their plan (exactly or resynchronised) and
    that they fetched on demand at most 1/``ratio`` of what LRU did. Returns the steps
    resynchronised and the figures, for the caller's own checks."""
    run = training(model, modes="offload", backward_thread=backward_thread)["runs"]["offload"]
    assert run["losses_equal"], (run["losses"], run["base_losses"])
    assert run["params_equal"], "final parameters differ from the run without spill"
    plan = run["per_step"]
    lru = training(model, "lru", "offload")["runs"]["offload"]["per_step"]
    first = 2
    demand_plan = step_delta(plan, "swap.demand_fetches", first)
    demand_lru = step_delta(lru, "swap.demand_fetches", first)
    resynced = step_delta(plan, "swap.steps_resynced", first)
    followed = step_delta(plan, "swap.steps_planned", first) + resynced
    detail = (f"steps {first}..{STEPS - 1}: demand fetches plan {demand_plan:.0f} / lru "
              f"{demand_lru:.0f}, followed {followed:.0f} (resynchronised {resynced:.0f})")
    assert followed >= STEPS - first - 1, detail
    assert demand_plan * ratio <= demand_lru, detail
    return resynced, detail


# The backward on a thread of its own, as PyTorch's CUDA backward runs on autograd's device
# thread: spill.torch named the step's scope there with spill_begin_op, which made every later
# pin of the step (the whole backward and the optimizer step) one recorded op. The plan then
# prefetched nothing inside it (on an H200, 2026-12-04: demand fetches 367 planned / 376 LRU
# for gpt, and moe's 862 above LRU's 756), and a block passing its id to a later one within
# that op made the recording unplannable (mlp_accum here, drop on the GPU: "reads tensor ...
# which is first written later by op N"). spill_set_scope names the scope without an op.
@pytest.mark.parametrize("model,ratio", [("gpt", 5), ("mlp_accum", 2)])
def test_steps_whose_backward_runs_on_another_thread_follow_their_plan(model: str,
                                                                     ratio: float) -> None:
    planned_against_lru(model, ratio, backward_thread=True)


def test_each_new_thread_of_a_step_names_its_scope_even_with_an_ended_threads_ident() -> None:
    """StepBoundaries.ensure names the step's scope (spill_set_scope) once on each thread that
    joins the step, also on a thread that got the ident of one that ended (Linux reuses
    them at once), whose native current scope is unset. Before, the threads were a set of
    idents: a second backward of the step on a fresh thread (the rehearsal's autograd.grad
    then backward of a gradient penalty) pinned into no scope, and the penalty loops with the
    backward on another thread followed no plan (planned 0 of 2, 3 runs in 4)."""
    out = run_ok(ENABLE + """
        import threading, time
        from spill.torch._steps import StepBoundaries
        steps = StepBoundaries(12345, manage=True)
        calls = []
        steps._call = lambda name, *args: calls.append((name, threading.get_ident()))
        idents = []
        def join_the_step():
            idents.append(threading.get_ident())
            steps.ensure()
            steps.ensure()  # once per thread and step
        for step in range(2):
            steps.ensure()
            for _ in range(2):
                t = threading.Thread(target=join_the_step)
                t.start()
                t.join()
                time.sleep(0.05)  # (join returns before the thread's exit frees its ident)
            steps.end()
        names = [name for name, _ in calls]
        assert names == ["spill_begin_step", "spill_set_scope", "spill_set_scope",
                         "spill_end_step"] * 2, (names, idents)
        print("ok", len(set(idents)))
    """)
    assert out.startswith("ok "), out


def test_a_scope_is_named_again_on_a_thread_where_another_scope_was_named_since() -> None:
    """Two models' hooks on one thread in one step (a GAN's generator loss: its backward runs
    through the discriminator, then the generator): each StepBoundaries makes its scope
    current again when another one's made theirs current there since, so each model's pins
    go to its own recording. Before, a scope was named once per thread and step: on the
    backward's thread the discriminator named its scope after the generator had, and the
    generator's later pins went to the discriminator's recording (the GAN loop with the
    backward on another thread followed no plan)."""
    out = run_ok(ENABLE + """
        from spill.torch._steps import StepBoundaries
        g, d = StepBoundaries(1001, manage=True), StepBoundaries(1002, manage=True)
        calls = []
        for s in (g, d):
            s._call = lambda name, device, scope: calls.append((name, scope.value))
        g.ensure(); d.ensure(); d.ensure(); g.ensure(); g.ensure(); d.ensure()
        g.end(); d.end()
        assert calls == [("spill_begin_step", 1001), ("spill_begin_step", 1002),
                         ("spill_set_scope", 1001), ("spill_set_scope", 1002),
                         ("spill_end_step", 1001), ("spill_end_step", 1002)], calls
        print("ok")
    """)
    assert out.startswith("ok"), out


def test_the_rehearsed_backward_thread_carries_the_saved_tensor_hooks() -> None:
    """torch_bridge_run.backward_on_another_thread carries the caller's saved-tensor default
    hooks to the backward's thread, as CUDA's engine does (they are part of the thread-local
    state it gives autograd's device thread): a backward with create_graph (a gradient
    penalty's autograd.grad) packs what its graph saves with them there. Before, it carried
    only the modes and grad mode: offload's window never saw the penalty's graph save the
    weights (MmBackward0's), and the later backward read them unpinned once swapped out (a
    segmentation fault in the rehearsal of the penalty loops; CUDA had no such fault)."""
    out = run_ok(f"""
        import sys, threading, torch
        sys.path.insert(0, {str(HERE)!r})
        import torch_bridge_run
        torch_bridge_run.backward_on_another_thread()
        packed, unpacked = [], []
        def pack(t):
            packed.append(threading.get_ident())
            return t
        def unpack(t):
            unpacked.append(threading.get_ident())
            return t
        w = torch.randn(4, 4, requires_grad=True)
        x = torch.randn(2, 4, requires_grad=True)
        out = (x @ w).tanh().sum()
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            grad, = torch.autograd.grad(out, x, create_graph=True)
        me = threading.get_ident()
        assert packed and all(t != me for t in packed), (packed, me)
        n = len(packed)
        grad.square().sum().backward()  # no hooks here now: nothing more is packed
        assert len(packed) == n, (len(packed), n)
        assert len(unpacked) == n and all(t != me for t in unpacked), (unpacked, n, me)
        assert w.grad is not None
        try:  # inside a transform the backward stays on the caller's thread (see there)
            from torch.func import grad as transform_grad
        except ImportError:
            from functorch import grad as transform_grad
        g = transform_grad(lambda v: (v * v).sum())(torch.ones(3))
        assert torch.equal(g, torch.full((3,), 2.0)), g
        print("ok", n)
    """)
    assert out.startswith("ok "), out


# ------------------------------------------------------------------ the allocator itself

# The bodies below are indented by 8 spaces; so is this preamble, so that dedent fits both.
ENABLE = textwrap.indent(f"""
import torch, spill, spill.torch as st
torch.set_num_threads(1)
st.enable("budget:64MiB,swap_threshold:128KiB,sim_granularity:{SIM_GRANULARITY}", target="{TARGET}")
dev = "{'cpu' if TARGET == 'cpu' else 'cuda'}"
""", " " * 8)


def test_stats_answer_with_spills_figures_and_the_patch_is_undone() -> None:
    out = run_ok(ENABLE + """
        st.enable(target="%s")  # a second call is harmless
        x = torch.empty(3 << 20, dtype=torch.uint8, device=dev)
        s, m = spill.stats(), st.memory_stats()
        assert m["allocated_bytes.all.current"] == s["allocated_bytes.current"] >= 3 << 20
        assert m["reserved_bytes.all.peak"] == s["reserved_bytes.peak"]
        assert m["num_ooms"] == s["num_ooms"] == 0
        for k, v in s.items():
            assert m[k] == v, k           # spill's own keys, unchanged
        assert torch.cuda.memory_stats() == st.memory_stats()
        assert torch.cuda.memory_allocated() == s["allocated_bytes.current"]
        assert torch.cuda.max_memory_allocated() == s["allocated_bytes.peak"]
        assert torch.cuda.memory_reserved() == s["reserved_bytes.current"]
        nested = torch.cuda.memory_stats_as_nested_dict()
        assert nested["allocated_bytes"]["all"]["current"] == s["allocated_bytes.current"]
        assert nested["swap"]["bytes_out"] == s["swap.bytes_out"]
        # the device's virtual-memory calls (the block above was mapped) and their host time
        assert s["vmm.map_calls"] >= 1 and s["vmm.host_s"] >= s["vmm.map_s"] > 0, s
        assert "Virtual-memory calls (host time)" in torch.cuda.memory_summary()
        # spill records its history itself: torch's switch is taken and ignored (the pluggable
        # allocator raises for it; torch 1.13's CPU build has no recorder at all)
        torch.cuda.memory._record_memory_history("all", max_entries=1000)
        torch.cuda.memory._record_memory_history(None)
        del x
        st.reset_peak_memory_stats()
        assert st.max_memory_allocated() == st.memory_allocated() < 3 << 20
        assert "spill memory summary" in torch.cuda.memory_summary()
        # torch's accumulated counts start again from a reset; spill's own keys do not.
        # spill.torch exports the reset too (audit 45b #1: documented, but an AttributeError)
        assert "reset_accumulated_memory_stats" in st.__all__
        assert torch.cuda.reset_accumulated_memory_stats is st.reset_accumulated_memory_stats
        s0 = spill.stats()
        st.reset_accumulated_memory_stats()
        y = torch.empty(1 << 20, dtype=torch.uint8, device=dev)
        del y
        m, s = st.memory_stats(), spill.stats()
        assert m["allocation.all.allocated"] == s["num_allocs"] - s0["num_allocs"] >= 1, m
        assert m["allocated_bytes.all.freed"] == (
            s["allocated_bytes.freed"] - s0["allocated_bytes.freed"]) >= 1 << 20, m
        assert m["allocated_bytes.all.current"] == s["allocated_bytes.current"]
        assert m["allocated_bytes.freed"] == s["allocated_bytes.freed"]
        st.disable()
        assert torch.cuda.memory_stats is not st.memory_stats
        print("ok")
    """ % TARGET)
    assert "ok" in out


def test_stats_before_enable_start_nothing_and_enable_says_what_started_spill() -> None:
    """Before, memory_stats() before enable() started device 0's runtime with the defaults,
    and every later enable(conf) failed with ALREADY_INITIALIZED, not saying why."""
    out = run_ok(f"""
        import collections, torch, spill, spill.torch as st
        assert st.memory_stats() == collections.OrderedDict()   # as torch.cuda's before CUDA
        assert st.memory_allocated() == st.max_memory_allocated() == 0
        assert st.memory_reserved() == st.max_memory_reserved() == 0
        st.reset_peak_memory_stats()
        assert "has not started" in st.memory_summary()
        snap = st.memory_snapshot()
        assert snap in ([], {{"segments": [], "device_traces": []}}), snap
        st.enable("budget:64MiB,swap_threshold:128KiB", target={TARGET!r})   # nothing started
        x = torch.ones(1 << 20, device={"cpu" if TARGET == "cpu" else "cuda"!r})
        assert st.memory_allocated() >= 4 << 20
        print("ok")
    """)
    assert "ok" in out
    out = run_ok(f"""
        import spill, spill.torch as st
        spill.stats()                       # starts device 0 with the defaults
        try:
            st.enable("budget:64MiB", target={TARGET!r})
            raise AssertionError("enable() accepted other settings")
        except spill.Error as e:
            assert e.code == spill.Status.ALREADY_INITIALIZED, e
            message = str(e)
        assert "an earlier spill call" in message and "spill.stats()" in message, message
        assert "before any other spill call" in message, message
        assert "spill.shutdown() first" in message and "runtimes already run" in message, message
        spill.shutdown()                    # the way out the message gives
        st.enable("budget:64MiB", target={TARGET!r})
        assert spill.budget() == 64 << 20
        try:
            st.enable("budget:32MiB", target={TARGET!r})
            raise AssertionError("a second enable() with other settings accepted")
        except spill.Error as e:
            assert "an earlier spill.torch.enable()" in str(e), e
        print("ok")
    """)
    assert "ok" in out


def test_shutdown_is_refused_while_spill_holds_pytorchs_tensors() -> None:
    """Before, spill.shutdown() with the CPU bridge installed freed every tensor's memory: new
    tensors raised RuntimeError while is_enabled() still said "cpu", and after configure()
    reading a tensor from before crashed the process (SIGSEGV)."""
    out = run_ok(ENABLE + """
        import gc
        a = torch.ones(1 << 20, device=dev)
        def refused(*words):
            try:
                spill.shutdown()
            except st.AllocatorInUseError as e:
                assert isinstance(e, spill.Error) and all(w in str(e) for w in words), e
                return
            raise AssertionError("shutdown accepted")
        refused("PyTorch's", "allocator")
        assert float(a.sum()) == 1 << 20 and st.is_enabled() == {TARGET!r}
        st.disable()
        if {TARGET!r} == "cuda":
            refused("cannot change back")
        else:
            refused("bytes spill allocated are still held", "Drop them")
            assert float(a.sum()) == 1 << 20          # still spill's, still readable
            del a
            gc.collect()
            spill.shutdown()                          # nothing of PyTorch's left in spill
            assert st.memory_stats() == {} and st.memory_allocated() == 0
            b = torch.ones(1 << 20)                   # PyTorch's default allocator
            assert float(b.sum()) == 1 << 20
            st.enable("budget:32MiB", target="cpu")   # a fresh session
            c = torch.ones(1 << 20)
            assert spill.residence(c.data_ptr()) == "resident" and spill.budget() == 32 << 20
        print("ok")
    """.replace("{TARGET!r}", repr(TARGET)))
    assert "ok" in out


def test_stats_functions_take_torchs_device_arguments_and_refuse_other_devices() -> None:
    """Before, memory_stats(device=5), device="garbage" and memory_allocated(device=-3) all
    answered with device 0's figures."""
    out = run_ok(ENABLE + """
        x = torch.ones(1 << 20, device=dev)
        here = st.memory_allocated()
        for device in [None, 0, "cuda", "cuda:0", torch.device("cuda", 0)] + (
                ["cpu", torch.device("cpu")] if dev == "cpu" else []):
            assert st.memory_allocated(device) == here, device
            assert st.memory_stats(device=device)["device"] == 0, device
            assert torch.cuda.memory_allocated(device) == here, device
        st.reset_peak_memory_stats("cuda:0")
        assert "spill memory summary, device 0" in st.memory_summary(device=0)
        for bad, why in [(999, "999"), (-3, "-3"), ("cuda:999", "cuda:999"),
                         ("garbage", "'garbage' is not a device"), ("meta", "'meta'"),
                         (1.5, "must be None, an int"), (True, "must be None, an int")]:
            for fn in (st.memory_stats, st.memory_allocated, st.max_memory_reserved,
                       st.reset_peak_memory_stats, st.memory_summary, st.memory_snapshot,
                       torch.cuda.memory_stats):
                try:
                    fn(bad)
                except spill.InvalidArgumentError as e:
                    assert why in str(e) and fn.__name__ in str(e), (fn.__name__, e)
                    assert isinstance(e, TypeError) == isinstance(bad, (float, bool)), e
                    continue
                raise AssertionError(f"{fn.__name__}({bad!r}) accepted")
        print("ok")
    """)
    assert "ok" in out


def test_cpu_bridge_serves_cpu_tensors_and_disable_restores_the_default() -> None:
    if TARGET != "cpu":
        pytest.skip("the CPU bridge is the target=cpu path")
    out = run_ok("""
        import torch, spill, spill.torch as st
        before = torch.randn(1 << 20)              # PyTorch's allocator: keeps its deleter
        st.enable("swap_threshold:256KiB", target="cpu")
        try:
            spill.residence(before.data_ptr())
            raise AssertionError("a tensor from before enable() is spill's")
        except spill.InvalidArgumentError:
            pass
        x = torch.randn(1 << 20)
        assert spill.residence(x.data_ptr()) == "resident"   # spill's block
        y = before * 2                             # old and new tensors mix freely
        assert spill.residence(y.data_ptr()) == "resident"
        st.disable()
        z = torch.randn(1 << 20)                   # the default allocator again
        try:
            spill.residence(z.data_ptr())
            raise AssertionError("a tensor from after disable() is spill's")
        except spill.InvalidArgumentError:
            pass
        frees = spill.stats()["num_frees"]
        del x, y                                   # spill's tensors still free into spill
        assert spill.stats()["num_frees"] == frees + 2
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.parametrize("threshold,sizes", [
    ("128KiB", (128 << 10, (128 << 10) + 512)),
    (None, (1 << 20, (1 << 20) + 512)),           # the default, 1 MiB: the small pool's limit
    # Above 1 MiB a large block (a granule multiple) moves when it reaches the threshold, so
    # the requests that round up to it move: at 64 KiB granules, those past 4 MiB - 64 KiB.
    pytest.param("4MiB", ((4 << 20) - (64 << 10), (4 << 20) - (64 << 10) + 512),
                 marks=pytest.mark.skipif(TARGET != "cpu", reason="sized for 64 KiB granules")),
])
@pytest.mark.parametrize("given", ["string", "SPILL_CONF"])
def test_offload_takes_as_movable_exactly_what_the_allocator_moves(threshold, sizes,
                                                                   given) -> None:
    """The smallest block the hooks declare and pin is the smallest the allocator can move: a
    request up to min(swap_threshold, 1 MiB) is served from the small pool, whose blocks never
    move, so at a threshold up to 1 MiB a block of exactly the threshold stays put (above
    1 MiB, one that rounds up to the threshold can move). Each size is checked against the
    allocator itself: declared swappable and evicted, does it reach the host? Before the fix
    offload took a block of exactly the threshold as movable, declared it, and counted on
    moving it (at swap_threshold:128KiB, with 128 KiB activations, that ran out of memory).
    The configuration comes as enable()'s string or from SPILL_CONF (enable() with none): the
    hooks read the rules from the runtime. Before, on CUDA, they read them from enable()'s
    string alone and took the defaults under SPILL_CONF; and they took a request under
    the threshold as unmovable even when its block rounded up to it."""
    conf = "sim_granularity:64KiB" + (f",swap_threshold:{threshold}" if threshold else "")
    out = run_ok(f"""
        import time, torch, spill, spill.torch as st
        st.enable({conf if given == "string" else None!r}, target={TARGET!r})
        from spill.torch._pins import Pinner
        pinner = Pinner()
        for nbytes in {sizes!r}:
            t = torch.ones(nbytes // 4, device={"cpu" if TARGET == "cpu" else "cuda"!r})
            spill.set_swappable(t.data_ptr())
            spill.evict(t.data_ptr())
            deadline = time.monotonic() + 30
            while spill.residence(t.data_ptr()) == "swapping_out" and time.monotonic() < deadline:
                time.sleep(0.01)
            moved = spill.residence(t.data_ptr()) == "on_host"
            print(nbytes, moved, pinner.movable(t) != 0)
    """, {"SPILL_CONF": conf} if given == "SPILL_CONF" else None)
    rows = [line.split() for line in out.splitlines()]
    assert [r[0] for r in rows] == [str(n) for n in sizes], out
    assert [r[1] for r in rows] == ["False", "True"], f"the allocator moved other sizes: {out}"
    assert [r[2] for r in rows] == [r[1] for r in rows], f"offload disagrees: {out}"


def test_enable_refuses_a_bad_target_and_names_it() -> None:
    r = run_code("""
        import spill.torch as st
        st.enable(target="tpu")
    """)
    assert r.returncode != 0 and "target must be 'cuda' or 'cpu'" in r.stderr


def test_arguments_of_the_wrong_type_are_refused_naming_them() -> None:
    """Before, enable(5) raised AttributeError ('int' object has no attribute 'split'),
    offload(None) and offload("model") AttributeError ('NoneType' object has no attribute
    'modules'), enable(device="0") configured spill before refusing the device."""
    out = run_ok(f"""
        import torch, spill, spill.torch as st

        def refused(call, name):
            try:
                call()
            except spill.InvalidArgumentError as e:
                assert isinstance(e, TypeError) and name in str(e), (name, e)
                return
            raise AssertionError(f"{{name}}: accepted")
        refused(lambda: st.enable(5, target={TARGET!r}), "conf")
        refused(lambda: st.enable("budget:64MiB", target={TARGET!r}, device="0"), "device")
        refused(lambda: st.enable("budget:64MiB", target={TARGET!r}, patch_torch="no"),
                "patch_torch")
        assert st.is_enabled() is None
        st.enable("budget:64MiB,swap_threshold:128KiB", target={TARGET!r})  # nothing started
        m = torch.nn.Linear(4, 4)
        refused(lambda: st.offload(None), "model")
        refused(lambda: st.offload("model"), "model")
        refused(lambda: st.offload(m, "opt"), "optimizer")
        refused(lambda: st.guard(object()), "optimizer")
        print("ok")
    """)
    assert "ok" in out


def test_offload_and_guard_check_a_scope_as_begin_step_does() -> None:
    """Before, int() and ctypes took scope=2**64 + 7 as 7 (another scope's), 2**70 as 0
    (spill.step()'s), -1 as 2**64 - 1, 7.9 and "7" as 7, and "abc" raised a bare ValueError."""
    out = run_ok(ENABLE + """
        m = torch.nn.Linear(256, 256).to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for bad in [2**64 + 7, 2**70, -1, 7.9, "7", "abc", True]:
            for make in (lambda: st.offload(m, opt, scope=bad), lambda: st.guard(opt, scope=bad)):
                try:
                    make()
                    raise AssertionError(f"scope={bad!r} accepted")
                except spill.InvalidArgumentError as e:
                    assert "scope" in str(e) and (repr(bad) in str(e) or str(bad) in str(e)), e
        try:
            spill.begin_step(scope=-1)
        except spill.InvalidArgumentError as e:
            begin_step_says = str(e)
        try:
            st.offload(m, opt, scope=-1)
        except spill.InvalidArgumentError as e:
            assert str(e) == begin_step_says, (str(e), begin_step_says)
        h = st.offload(m, opt, scope=2**64 - 1)   # the largest scope is fine
        assert h.scope == 2**64 - 1
        h.remove()
        with st.guard(opt, scope=7) as g:
            assert g.scope == 7
        print("ok")
    """)
    assert "ok" in out


def test_importing_needs_torch_113_and_accepts_debian_versions(tmp_path: pathlib.Path) -> None:
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '1.12.1'\n")
    r = run_code("import spill.torch", {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT / 'python'}"})
    assert r.returncode != 0 and "needs PyTorch >= 1.13, found 1.12.1" in r.stderr
    run_ok("""
        import torch
        from spill.torch._state import torch_version
        torch.__version__ = "1.13.0a0"
        assert torch_version() == (1, 13, 0)
        torch.__version__ = "2.11.0+cu130"
        assert torch_version() == (2, 11, 0)
    """)


def test_pool_needs_mempool_and_says_so() -> None:
    r = run_code("""
        import torch, spill.torch as st
        if hasattr(torch.cuda, "MemPool"):
            print("has MemPool")
        else:
            st.pool()
    """)
    if "has MemPool" in r.stdout:
        pytest.skip(f"torch {torch.__version__} has MemPool (the GPU run tests pool())")
    assert r.returncode != 0 and "has no MemPool" in r.stderr and "torch >= 2.5" in r.stderr, \
        r.stderr


def test_the_shims_compile_at_first_use_for_this_torch(tmp_path: pathlib.Path) -> None:
    """Where CMake found no Torch (a GPU machine with pip's torch), spill.torch compiles its
    shims at first use through torch.utils.cpp_extension, with the standard and ABI flags the
    running torch chooses (C++14 on 1.13; C++17 on 2.x up to 2.13; C++20 from 2.14). Both
    compile here into SPILL_TORCH_BUILD_DIR, say they were built for this torch, and the CUDA
    one has the three functions PyTorch is given. (The CPU tests otherwise use the shims CMake
    built, so this path ran only on a GPU machine, first.)"""
    out = run_ok("""
        from spill.torch import _shim
        libs = {}
        for kind in ("cuda", "cpu"):
            libs[kind] = lib = _shim._compile(kind)
            _shim._declare(kind, lib)
            assert lib.spill_torch_shim_built_for().decode() == _shim._torch_key(), kind
            print(kind, lib._name)
        for symbol in ("spill_torch_shim_malloc", "spill_torch_shim_pool_malloc",
                       "spill_torch_shim_free"):
            assert _shim.address(libs["cuda"], symbol), symbol
        print("ok")
    """, {"SPILL_TORCH_BUILD_DIR": str(tmp_path)})
    assert "ok" in out and all(str(tmp_path) in line for line in out.splitlines()[:2]), out


def test_the_pools_malloc_returns_null_when_out_of_memory() -> None:
    """pool()'s allocator is called by PyTorch's caching allocator (raw_alloc, for a segment of
    the pool), which takes NULL as out of memory: it then gives the pool's cached segments back
    and retries before raising torch.cuda.OutOfMemoryError itself. enable()'s malloc throws
    (PyTorch uses what it returns unchecked). The pool's malloc serves within the budget and
    returns NULL past it, spill's account kept; pool() hands it to _cuda_customAllocator.
    Before, pool() used the throwing malloc, whose exception skipped PyTorch's retry. (Called
    here through ctypes on the simulated device; the MemPool itself needs a GPU.)"""
    out = run_ok("""
        import ctypes, torch, spill
        from spill.torch import _enable
        from spill.torch._shim import address, shim
        spill.configure("device:sim,budget:8MiB,sim_granularity:64KiB")
        lib = shim("cuda")
        malloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                  ctypes.c_void_p)(address(lib, "spill_torch_shim_pool_malloc"))
        free = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                ctypes.c_void_p)(address(lib, "spill_torch_shim_free"))
        p = malloc(4 << 20, 0, None)
        assert p and spill.residence(p) == "resident"
        assert malloc(0, 0, None) is None
        assert malloc(64 << 20, 0, None) is None          # past the budget: NULL, no throw
        assert spill.stats()["num_ooms"] == 1 and "budget" in spill.last_oom_message().lower()
        free(p, 4 << 20, 0, None)
        assert spill.stats()["allocated_bytes.current"] == 0
        seen = []
        torch._C._cuda_customAllocator = lambda m, f: seen.append((m, f)) or object()
        _enable._cuda_allocator(lib, for_pool=True)
        _enable._cuda_allocator(lib)
        names = [("spill_torch_shim_pool_malloc", "spill_torch_shim_free"),
                 ("spill_torch_shim_malloc", "spill_torch_shim_free")]
        assert seen == [tuple(address(lib, n) for n in pair) for pair in names], seen
        print("ok")
    """)
    assert "ok" in out


def test_oom_raises_torch_oom_with_the_breakdown_and_training_continues() -> None:
    out = run_ok(ENABLE + """
        import torch.nn as nn
        model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            model(torch.randn(12000, 1024, device=dev)).sum().backward()  # 2 x 47 MiB
        except torch.cuda.OutOfMemoryError as e:
            msg = str(e)
            assert "out of memory" in msg and "Budget" in msg and "swapped out" in msg, msg
            print("class", type(e).__module__ + "." + type(e).__qualname__)
        else:
            raise AssertionError("no OutOfMemoryError")
        opt.zero_grad(set_to_none=True)
        model(torch.randn(64, 1024, device=dev)).sum().backward()  # a smaller batch trains
        opt.step()
        assert st.memory_stats()["num_ooms"] >= 1
        # The history has the failure as torch 2's memory_viz.trace() reads it ("N requested,
        # M free in CUDA": "size" and "device_free"; spill gives what its budget still had).
        ooms = [e for trace in spill.snapshot()["device_traces"] for e in trace
                if e["action"] == "oom"]
        assert ooms, "no out-of-memory entry in the snapshot's history"
        assert ooms[0]["size"] >= 12000 * 1024 * 4, ooms[0]
        assert 0 <= ooms[0]["device_free"] < ooms[0]["size"], ooms[0]
        print("ok")
    """)
    assert "ok" in out and "OutOfMemoryError" in out


def test_offload_names_blocks_in_the_oom_message_and_the_snapshot() -> None:
    """offload() names the parameters, buffers, gradients (a gradient made anew, named again)
    and optimizer state by their qualified names; an out-of-memory error with them resident
    (a host cap of 1 MiB leaves no room to swap them out) lists them, largest first, and
    memory_snapshot() shows them as frames. name_tensor names a user's tensor (a view names
    its storage's block)."""
    out = run_ok(f"""
        import torch, spill, spill.torch as st
        import torch.nn as nn
        torch.set_num_threads(1)
        st.enable("budget:64MiB,host_cap:1MiB,swap_threshold:128KiB,"
                  "sim_granularity:{SIM_GRANULARITY}", target="{TARGET}")
        dev = "{'cpu' if TARGET == 'cpu' else 'cuda'}"
        COARSE = {SIZED_FOR_64K}
    """ + """
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 256),
                          nn.BatchNorm1d(256)).to(dev)  # weights of 2 MiB and 512 KiB
        o = torch.optim.Adam(m.parameters(), lr=1e-3)
        h = st.offload(m, o)
        x = torch.randn(32, 1024, device=dev)
        def step():
            o.zero_grad(set_to_none=True)  # each step's gradients are new tensors
            m(x).square().mean().backward()
            o.step()
        for _ in range(3):
            step()
        try:
            torch.empty(60 << 20, dtype=torch.uint8, device=dev)
            raise AssertionError("no out-of-memory error")
        except torch.cuda.OutOfMemoryError as e:
            message = str(e)
        assert "largest named resident blocks:" in message, message
        listed = message.split("largest named resident blocks:")[1].split(". ")[0]
        largest = ['"0.weight (param)" 2.00 MiB', '"grad of 0.weight" 2.00 MiB',
                   '"exp_avg of 0.weight" 2.00 MiB', '"exp_avg_sq of 0.weight" 2.00 MiB']
        if not COARSE:
            for name in largest:
                assert name in listed, (name, listed)
        else:  # at a GPU's 2 MiB granule 2.weight's blocks take 2 MiB too: 8 of one size
            import re
            also = [n.replace("0.weight", "2.weight") for n in largest]
            shown_names = [f'"{n}" 2.00 MiB' for n in re.findall(r'"([^"]*)" [0-9.]+ [KMG]?i?B',
                                                                   listed)]
            assert len(shown_names) == 5 and all(n in largest + also for n in shown_names), \
                (shown_names, listed)
        step()  # training goes on
        def shown(t):
            snap = st.memory_snapshot()
            segments = snap if isinstance(snap, list) else snap["segments"]
            s = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
            return [[f["name"] for f in b["frames"]] for seg in segments for b in seg["blocks"]
                    if b["address"] == s.data_ptr() and b["state"] == "active_allocated"][0]
        w = m[0].weight
        assert "0.weight (param)" in shown(w), shown(w)
        assert "grad of 0.weight" in shown(w.grad), shown(w.grad)
        assert "exp_avg of 0.weight" in shown(o.state[w]["exp_avg"])
        assert "2.bias (param)" in shown(m[2].bias)                  # a small-pool block
        assert "3.running_mean (buffer)" in shown(m[3].running_mean)
        snap = st.memory_snapshot()
        if isinstance(snap, list):  # torch 1.13's memory_viz shows it (from "history")
            from torch.cuda import _memory_viz as viz
            assert "spill:0:0.weight (param)" in viz.segments(snap, format_flamegraph=str)
        t = torch.empty(1 << 20, device=dev)
        st.name_tensor(t[100:], "my tensor")                          # a view: its storage
        assert spill.block_name(t.data_ptr()) == "my tensor" and "my tensor" in shown(t)
        st.name_tensor(t, None)
        assert spill.block_name(t.data_ptr()) == ""
        try:
            st.name_tensor(torch.ones(3, device="meta"), "x")
            raise AssertionError("a meta tensor was named")
        except spill.InvalidArgumentError:
            pass
        h.remove()
        print("ok")
    """)
    assert "ok" in out


def test_name_tensor_names_a_bad_name_not_the_storage() -> None:
    """Before, name_tensor(x, 5) on a tensor of spill's said its storage was not spill's (and
    was no TypeError); the name is checked first now, and the address is blamed only for a
    tensor whose storage really is not a block of spill's."""
    out = run_ok(ENABLE + """
        x = torch.empty(1 << 20, device=dev)
        for name, kind, said in ((5, TypeError, "spill: name must be a string, got 5"),
                                 ("a\\0b", ValueError, "spill: name 'a\\\\x00b' holds a NUL")):
            try:
                st.name_tensor(x, name)
                raise AssertionError(f"{name!r} was taken")
            except spill.InvalidArgumentError as e:
                assert isinstance(e, kind) and str(e).startswith(said), e
                assert "storage" not in str(e) and e.code == spill.Status.INVALID_ARGUMENT, e
        st.name_tensor(x, "x")
        assert spill.block_name(x.data_ptr()) == "x"
        import numpy
        try:  # memory of NumPy's
            st.name_tensor(torch.from_numpy(numpy.ones(4)), "y")
            raise AssertionError("a tensor of another allocator was named")
        except spill.InvalidArgumentError as e:
            assert "is not a block of spill's" in str(e), e
        print("ok")
    """)
    assert "ok" in out


def test_memory_snapshot_loads_in_memory_viz_and_spill_tools(tmp_path: pathlib.Path) -> None:
    snap_json, pickle_path = tmp_path / "snap.json", tmp_path / "snap.pickle"
    trace = tmp_path / "trace.json"
    out = run_ok(ENABLE + f"""
        import pickle
        from torch.cuda import _memory_viz as viz
        x = torch.randn(1 << 20, device=dev)
        snap = st.memory_snapshot()
        segments = snap if isinstance(snap, list) else snap["segments"]
        assert segments and any(b["state"] == "active_allocated" for s in segments
                                for b in s["blocks"])
        keep = lambda lines: lines                       # no flamegraph.pl download
        if isinstance(snap, list):                       # torch 1.13's layout
            assert viz.segments(snap, format_flamegraph=keep)
            assert viz.memory(snap, format_flamegraph=keep)
            print(viz.stats(snap))
        else:
            viz.segment_plot(snap); viz.trace_plot(snap)
        assert torch.cuda.memory_snapshot() == segments
        # As torch 2.10+ calls them: MemPool.snapshot() passes the pool's id and
        # include_traces, _dump_snapshot() passes augment_with_fx_traces.
        assert torch.cuda.memory_snapshot((0, 0), include_traces=False) == segments
        again = torch.cuda.memory._snapshot(None, augment_with_fx_traces=False)
        assert (again if isinstance(again, list) else again["segments"]) == segments
        spill.snapshot({str(snap_json)!r})
        spill.trace({str(trace)!r})
        print("ok")
    """)
    assert "ok" in out
    tool = subprocess.run([sys.executable, str(ROOT / "tools" / "snapshot_to_pickle.py"),
                           str(snap_json), str(pickle_path)], capture_output=True, text=True)
    assert tool.returncode == 0, tool.stderr
    cli = pathlib.Path(os.environ.get("SPILL_CLI", ROOT / "build" / "spill"))
    if cli.exists():
        report = subprocess.run([str(cli), "report", str(trace), "-o", str(tmp_path / "r.html")],
                                capture_output=True, text=True)
        assert report.returncode == 0, report.stderr


def test_the_report_names_the_scopes_offload_and_guard_make(tmp_path) -> None:
    """Their step scopes are numbers from 2**63 up: each is named (spill_set_scope_name) by
    what made it and the model's or optimizer's class, and ``spill report`` shows the names
    (before, two of these 19-digit numbers)."""
    trace = tmp_path / "trace.json"
    out = run_ok(ENABLE + f"""
        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(256, 256)
            def forward(self, x):
                return self.fc(x).relu()
        a, b = Tiny().to(dev), Tiny().to(dev)
        opt_a = torch.optim.Adam(a.parameters())
        opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
        spill.set_budget(16 << 20)
        handle = st.offload(a, opt_a)
        x = torch.randn(64, 256, device=dev)
        for _ in range(2):
            a(x).sum().backward(); opt_a.step(); opt_a.zero_grad()
        with st.guard(optimizer=opt_b):
            for _ in range(2):
                b(x).sum().backward(); opt_b.step(); opt_b.zero_grad()
        spill.trace({str(trace)!r})
        handle.remove()
        print("ok")
    """)
    assert "ok" in out
    cli = pathlib.Path(os.environ.get("SPILL_CLI", ROOT / "build" / "spill"))
    if not cli.exists():
        pytest.skip(f"no spill CLI at {cli} (SPILL_CLI)")
    html = tmp_path / "r.html"
    report = subprocess.run([str(cli), "report", str(trace), "-o", str(html)],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    step_count = html.read_text().split("<td id='step-count'>")[1].split("</td>")[0]
    assert "offload Tiny (scope 92233720368547758" in step_count, step_count
    assert "guard SGD (scope 92233720368547758" in step_count, step_count


def test_a_block_no_hook_saw_is_never_evicted() -> None:
    """Under pressure (offload at a third of the footprint, beside the unseen tensor), a large
    tensor no hook ever saw stays resident with its bytes, while declared ones move. (A fixed
    48 MiB fitted the simulated device's 64 KiB granularity only: on a GPU, at 2 MiB, the
    MLP's 256 KiB activations take 2 MiB each and its first backward ran out of memory.)"""
    out = run_ok(ENABLE + """
        import sys; sys.path.insert(0, %r)
        from torch_train_models import train
        spill.set_budget(1 << 30)  # the footprint: the peak of two steps without hooks
        train("mlp", 2, device=dev)
        spill.set_budget((8 << 20) + st.max_memory_allocated() // 3)
        unseen = torch.arange(2 << 20, dtype=torch.float32, device=dev)  # 8 MiB, never used
        ptr = unseen.data_ptr()
        def check(i):
            assert spill.residence(ptr) == "resident", (i, spill.residence(ptr))
        train("mlp", 4, check, device=dev, wrap=lambda m, o: st.offload(m, o))
        assert spill.stats()["swap.bytes_out"] > 0
        assert spill.residence(ptr) == "resident"
        assert torch.equal(unseen, torch.arange(2 << 20, dtype=torch.float32, device=dev))
        print("ok")
    """ % str(HERE))
    assert "ok" in out


def scope_recorded(path: pathlib.Path) -> str:
    """Scenario code defining ``recorded(scope)``: whether spill still holds a recorded step of
    ``scope`` (spill.write_step_graph into ``path``; NOT_FOUND once the scope has ended)."""
    return textwrap.indent(f"""
import pathlib
graph = pathlib.Path({str(path)!r})
def recorded(scope):
    try:
        spill.write_step_graph(graph, scope=scope)
        return True
    except spill.Error as e:
        assert e.code == spill.Status.NOT_FOUND, e
        return False
""", " " * 8)


def test_remove_and_guard_exit_end_their_scope_and_new_models_get_new_scopes(
        tmp_path: pathlib.Path) -> None:
    """offload's remove() and guard's exit end the default scope they used (its recording is
    gone: write_step_graph says NOT_FOUND); a scope the caller named survives until
    spill.end_scope. The same model keeps its scope; a new model never gets an old one's, even
    where Python reuses its id()."""
    out = run_ok(ENABLE + scope_recorded(tmp_path / "g.json") + """
        import gc

        def train(model, opt, steps=2):
            x = torch.ones(64, 512, device=dev)
            for _ in range(steps):
                model(x).square().sum().backward()
                opt.step()
                opt.zero_grad()

        def make():
            model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(),
                                        torch.nn.Linear(1024, 512)).to(dev)
            return model, torch.optim.SGD(model.parameters(), lr=0.01)

        model, opt = make()
        h = st.offload(model, opt)
        train(model, opt)
        assert recorded(h.scope)
        scope = h.scope
        h.remove()
        assert not recorded(scope), "remove() left the scope's recording"
        h = st.offload(model, opt)
        assert h.scope == scope, "the same model got another scope"
        h.remove()

        with st.guard(optimizer=opt) as g:
            train(model, opt)
            assert recorded(g.scope)
        assert not recorded(g.scope), "the guard's exit left the scope's recording"

        h = st.offload(model, opt, scope=77)
        train(model, opt)
        h.remove()
        assert recorded(77), "remove() ended a scope the caller named"
        spill.end_scope(77)
        assert not recorded(77)
        spill.end_scope(77)  # nothing left: harmless

        scopes = {scope}
        for _ in range(20):
            del model, opt, h
            gc.collect()  # the handle and the model's hooks hold cycles
            model, opt = make()
            h = st.offload(model, opt)
            assert h.scope not in scopes, ("a new model got an old scope", h.scope)
            scopes.add(h.scope)
            h.remove()
        # Where Python reuses an id() (a plain object freed and another made at once), the
        # new object still gets a new scope.
        from spill.torch._steps import default_scope
        class Obj:
            pass
        seen, reused = {}, 0
        for _ in range(200):
            o = Obj()
            s = default_scope(o)
            assert default_scope(o) == s
            if id(o) in seen:
                reused += 1
                assert seen[id(o)] != s, "a reused id() got the old object's scope"
            seen[id(o)] = s
            del o
        assert reused > 0, "no id() was reused: the check above proved nothing"
        print("ok")
    """)
    assert "ok" in out


def test_offload_pins_the_whole_optimizer_step_when_it_fits() -> None:
    """With room for all the step's tensors, offload's optimizer step pins them all around the
    unchanged step (no dispatch mode): with every parameter and optimizer state on the host
    when optimizer.step() is called (evicted after the backward and waited for; a missed pin
    faults on the CPU bridge), training under an LR scheduler created after offload() is
    bit-identical to the run without the hooks."""
    out = run_ok(ENABLE.replace("budget:64MiB,", "") + """
        import sys, time; sys.path.insert(0, %r)
        from torch_train_models import train
        import spill.torch._offload_optimizer as offload_module  # (where _wrap_step is)
        spill.set_budget(1 << 30)
        STEPS = 5

        def run(hooks):
            handles = {}
            def wrap(m, o):
                # Armed steps (quiet=False): quiet ones open no swapper step, so an eviction
                # started between steps is still in flight at the pin, which cancels it.
                handles["offload"] = st.offload(m, o, quiet=False) if hooks else None
                handles["lr"] = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
            def before(i):
                if i > 0:
                    handles["lr"].step()
            def before_update(i):
                # Evicted after the backward, not before the forward: a step that follows its
                # plan brings back at its start what the plan has resident there, and a
                # prefetch of a block still being copied out cancels the copy.
                h = handles["offload"]
                if h is None or i < 2:
                    return
                tensors = list(h.model.parameters())
                tensors += [v for s in h.optimizer.state.values() for v in s.values()
                            if isinstance(v, torch.Tensor)]
                ptrs = [ptr for ptr in map(h.pinner.movable, tensors) if ptr]
                for ptr in ptrs:
                    spill.evict(ptr)
                deadline = time.time() + 10
                for ptr in ptrs:
                    while spill.residence(ptr) == "swapping_out" and time.time() < deadline:
                        time.sleep(0.001)
                assert all(spill.residence(ptr) == "on_host" for ptr in ptrs), \
                    [spill.residence(ptr) for ptr in ptrs]
            losses, model, _ = train("mlp", STEPS, before, wrap=wrap, device=dev,
                                     before_update=before_update)
            if hooks:
                handles["offload"].remove()
                # The scheduler's wrapper of step (made after offload's) survives remove().
                step = handles["lr"].optimizer.step
                assert getattr(step, "_with_counter", False) or \
                    getattr(step, "_wrapped_by_lr_sched", False), step
            return losses, [p.detach().clone() for p in model.parameters()], handles["lr"]

        base_losses, base_params, base_lr = run(False)
        outcomes = []
        original = offload_module.pinned_step
        def counted(*args):
            done, result = original(*args)
            outcomes.append(done)
            return done, result
        offload_module.pinned_step = counted
        bytes_in = spill.stats()["swap.bytes_in"]
        losses, params, lr = run(True)
        assert outcomes == [True] * (STEPS - 1), outcomes  # the first step: the dispatch mode
        assert spill.stats()["swap.bytes_in"] > bytes_in, "nothing was evicted"
        assert losses == base_losses, (losses, base_losses)
        assert all(torch.equal(p, q) for p, q in zip(params, base_params))
        assert lr.get_last_lr() == base_lr.get_last_lr()
        print("ok")
    """ % str(HERE))
    assert "ok" in out


def test_a_forked_dataloader_worker_leaves_the_parents_state_alone() -> None:
    """Workers forked after enable() allocate with PyTorch's default allocator and never call
    into the parent's runtime; the parent's tensors and runtime are intact afterwards. On the
    CPU bridge a worker reads the parent's tensor in spill's memory (the forked copy of it); on
    CUDA a forked child must not use CUDA at all (plain torch's rule: its first call fails with
    "initialization error"), so a worker makes its rows from a host copy the parent made before
    forking, and the parent moves them to the device."""
    out = run_ok(ENABLE + """
        from torch.utils.data import DataLoader, Dataset
        from spill.torch._state import state
        from spill.torch._shim import shim
        data = torch.arange(4 << 20, dtype=torch.float32, device=dev)  # spill's memory
        source = data if dev == "cpu" else data.cpu()  # what a worker may read
        class Rows(Dataset):
            def __len__(self): return 8
            def __getitem__(self, i):
                row = source[i * 1024:(i + 1) * 1024] * 2 + torch.ones(1024)
                assert row.device.type == "cpu"
                bridge = dev != "cpu" or shim("cpu").spill_torch_cpu_forked()
                forked = state.forked_child and bridge
                return row, torch.tensor(int(forked))
        before = spill.stats()
        got = list(DataLoader(Rows(), batch_size=2, num_workers=2, multiprocessing_context="fork"))
        assert len(got) == 4 and all(int(f.min()) == 1 for _, f in got), "workers not marked"
        rows = [r.to(dev) for r, _ in got]  # the parent moves the batches into spill's memory
        assert torch.equal(rows[1][0], data[2048:3072] * 2 + 1)
        assert torch.equal(torch.cat(rows).flatten(), data[:8 * 1024] * 2 + 1)
        assert torch.equal(data, torch.arange(4 << 20, dtype=torch.float32, device=dev))
        after = spill.stats()
        assert after["num_free_errors"] == before["num_free_errors"]
        y = torch.ones(1 << 20, device=dev) * 3     # the parent's runtime still serves
        assert spill.residence(y.data_ptr()) == "resident" and float(y.sum()) == 3 * (1 << 20)
        print("ok")
    """)
    assert "ok" in out


def test_a_side_stream_use_delays_reuse_on_the_cpu_bridge() -> None:
    """spill.record_stream on a bridge tensor's block: while a side stream of spill's device
    still has work queued (here waiting for a slow copy), the freed block is not handed out
    again; once that stream has finished, it is."""
    if TARGET != "cpu":
        pytest.skip("the CUDA run tests Tensor.record_stream (test_record_stream_delays_reuse)")
    out = run_ok("""
        import torch, spill, spill.torch as st
        st.enable("budget:64MiB,swap_threshold:128KiB,sim_granularity:64KiB,time_scale:1,"
                  "link_gbps:0.005", target="cpu")
        n = 1 << 20                                  # 4 MiB of float32
        y = torch.ones(n)
        spill.set_swappable(y.data_ptr())
        spill.evict(y.data_ptr())                    # a copy out that takes about 0.8 s
        side = spill.stream_create()
        token = spill.pin(y.data_ptr(), side)        # cancelled: side waits for that copy
        x = torch.empty(n)
        ptr = x.data_ptr()
        spill.record_stream(ptr, side)               # x is also used by work queued on side
        del x
        x2 = torch.empty(n)
        assert x2.data_ptr() != ptr, "reused while the side stream still had work queued"
        spill.stream_synchronize(side)
        spill.unpin(token, side, False)
        del x2
        again = [torch.empty(n) for _ in range(2)]
        assert ptr in [t.data_ptr() for t in again], "never reused after the stream finished"
        token = spill.pin_for_host(y.data_ptr())    # y is swappable: read it pinned
        assert float(y.sum()) == n                   # its bytes survived the cancelled copy
        spill.unpin(token, None, False)
        print("ok")
    """)
    assert "ok" in out


# ------------------------------------------------------------------ GPU only

@needs_cuda
def test_enable_after_cuda_started_points_to_pool() -> None:
    r = run_code("""
        import torch, spill.torch as st
        torch.zeros(1, device="cuda")
        st.enable("budget:1GiB")
    """)
    assert r.returncode != 0 and "spill.torch.pool()" in r.stderr


@needs_cuda
def test_pool_serves_a_region_of_code_once_cuda_runs() -> None:
    out = run_ok("""
        import torch, spill, spill.torch as st
        torch.zeros(1, device="cuda")              # CUDA has allocated: enable() would refuse
        pool = st.pool("budget:1GiB")
        with torch.cuda.use_mem_pool(pool):
            x = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
        assert spill.residence(x.data_ptr()) == "resident"    # spill's block
        y = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
        try:
            spill.residence(y.data_ptr())
            raise AssertionError("a tensor outside the pool is spill's")
        except spill.InvalidArgumentError:
            pass
        print("ok")
    """)
    assert "ok" in out


@needs_cuda
def test_record_stream_delays_reuse() -> None:
    out = run_ok("""
        import torch, spill.torch as st
        st.enable("budget:1GiB")
        side = torch.cuda.Stream()
        x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        ptr = x.data_ptr()
        x.add_(1)                                     # the kernels' modules are loaded
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(2_000_000_000)          # the side stream is busy for about a second
            x.add_(1)
        x.record_stream(side)
        del x
        busy = not side.query()
        y = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        assert busy, "the side stream finished before the reuse was tried: the test proved nothing"
        assert y.data_ptr() != ptr, "reused while the side stream still used it"
        side.synchronize()
        print("ok")
    """)
    assert "ok" in out


# ------------------------------------------------------------------ quiet steps (offload)

def _workspace_bytes() -> int:
    """The larger of the cuBLAS and cuBLASLt workspaces a CUDA run of these tests has: the
    environment's, else CUDA_WORKSPACES ("CUBLAS_WORKSPACE_CONFIG=:KiB:count..." pairs,
    CUBLASLT_WORKSPACE_SIZE in KiB)."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG", CUDA_WORKSPACES["CUBLAS_WORKSPACE_CONFIG"])
    numbers = [int(n) for n in config.split(":") if n]
    cublas = sum(size * count for size, count in zip(numbers[::2], numbers[1::2]))
    lt = int(os.environ.get("CUBLASLT_WORKSPACE_SIZE", CUDA_WORKSPACES["CUBLASLT_WORKSPACE_SIZE"]))
    return max(cublas, lt) << 10


# The CPU bridge's rehearsal at a GPU's granularity also holds what PyTorch holds there beside
# a scenario's tensors and the bridge does not: three buffers of the workspaces' size, never
# declared swappable (three undeclared blocks in the GPU run of 2026-12-04: a cuBLAS and a
# cuBLASLt workspace per thread that ran a product), made when spill is enabled. With 512 KiB
# workspaces (CUBLAS_WORKSPACE_CONFIG=:64:8 CUBLASLT_WORKSPACE_SIZE=512) the rehearsal runs out
# of memory where the GPU did, with the same breakdown.
REHEARSED_WORKSPACES = (
    f"globals()['_workspaces'] = [torch.empty({_workspace_bytes()}, dtype=torch.uint8) "
    "for _ in range(3)]" if TARGET == "cpu" and SIM_GRANULARITY != "64KiB" else "pass")


def quiet_preamble(budget: str) -> str:
    """The start of a quiet-step scenario: spill is enabled by ``enable()``; the baseline runs
    before it on the CPU (plain torch: the bridge replaces the CPU allocator), after it without
    hooks on CUDA (whose allocator cannot change once used; the allocator changes no result).
    On CUDA what the baseline leaves on the device is in spill's memory, never declared
    swappable: a scenario drops it (its model) before it sets a budget."""
    return textwrap.indent(f"""
import torch, spill, spill.torch as st
torch.set_num_threads(1)
dev = "{'cpu' if TARGET == 'cpu' else 'cuda'}"
def enable():
    st.enable("budget:{budget},swap_threshold:128KiB,sim_granularity:{SIM_GRANULARITY}",
              target="{TARGET}")
    {REHEARSED_WORKSPACES}
if dev == "cuda":
    enable()
""", " " * 8)


# Asserts, inside a scenario, that the run under spill (losses, m; stats before/after) gave
# plain torch's losses (base) and parameters (base_params) and swapped bytes out.
MATCHES_PLAIN_TORCH = """
        with st.guard(release_on_exit=False):
            equal = all(torch.equal(p.detach().cpu(), q)
                        for p, q in zip(m.parameters(), base_params))
        assert losses == base, (losses, base)
        assert equal, "final parameters differ from plain torch"
        assert after["swap.bytes_out"] > before["swap.bytes_out"], "nothing was swapped"
"""


# Inside a scenario, after a run under spill that set the peak: `wrap(m, o)` offloads a model
# and its optimizer and sets the budget to a third of that peak (`footprint`); `before` holds
# spill's stats for MATCHES_PLAIN_TORCH.
AT_A_THIRD = """
        gc.collect()
        footprint = st.max_memory_allocated()
        def wrap(m, o):
            h = st.offload(m, o)
            spill.set_budget(footprint // 3)
            return h
        before = spill.stats()
"""


def test_zero_grad_keeping_gradients_runs_at_a_budget_of_a_few_tensors() -> None:
    """offload(model, optimizer) with zero_grad(set_to_none=False), of the optimizer and of the
    model, six 2 MiB weights and Adam (48 MiB of parameters, gradients and state) at a 12 MiB
    budget: zero_grad zeroes each gradient in place, pinned, as plain torch does; losses and
    parameters are plain torch's. model.zero_grad() copies no gradient back from the host (it
    ran in the window, which copied each one back to zero it: 52 MB more copied in over 8
    steps of a 512-wide MLP at a third; now one on the host is discarded, mapped back with no
    copy, and zeroed), and a copy of the model
    has the class's zero_grad. The weights are 724 x 724 floats, 2 MiB once rounded to the
    granularity of a GPU or of the simulated device alike; the batch's tensors stay under the
    swap threshold (small-pool blocks): the same blocks on both, so the budget fits both (on
    CUDA with cuBLAS's workspaces small too: CUDA_WORKSPACES). Adam runs torch's default in
    both runs (on CUDA the foreach kernels, under offload over chunks of parameters that fit)."""
    out = run_ok(quiet_preamble("1GiB") + """
        import copy, time
        def train(zero, wrap=None):
            torch.manual_seed(0)
            m = torch.nn.Sequential(*[torch.nn.Linear(724, 724) for _ in range(6)]).to(dev)
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            h = wrap(m, opt) if wrap else None
            g = torch.Generator().manual_seed(1)
            losses = []
            for _ in range(4):
                x = torch.randn(32, 724, generator=g).to(dev)
                y = torch.randn(32, 724, generator=g).to(dev)
                (opt if zero == "opt" else m).zero_grad(set_to_none=False)
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            return losses, m, h
        bases = {}
        for zero in ("opt", "model"):
            base, bm, _ = train(zero)
            bases[zero] = base, [p.detach().cpu().clone() for p in bm.parameters()]
            del bm  # on a GPU the baseline ran in spill's memory: it must not hold the budgets
        enable()
        for zero in ("opt", "model"):
            base, base_params = bases[zero]
            def wrap(m, o):
                h = st.offload(m, o)
                spill.set_budget(12 << 20)
                return h
            before = spill.stats()
            losses, m, h = train(zero, wrap)
            after = spill.stats()
""" + textwrap.indent(MATCHES_PLAIN_TORCH, "    ") + """
            if zero == "model":
                ptrs = [h.pinner.movable(p.grad) for p in m.parameters()]
                ptrs = [ptr for ptr in ptrs if ptr]  # (the biases' are small blocks)
                assert len(ptrs) == 6, ptrs
                for ptr in ptrs:
                    spill.evict(ptr)
                for ptr in ptrs:
                    while spill.residence(ptr) == "swapping_out":
                        time.sleep(0.001)
                came_in = spill.stats()["swap.bytes_in"]
                m.zero_grad(set_to_none=False)
                assert spill.stats()["swap.bytes_in"] == came_in, "a gradient came back"
                assert all(p.grad.count_nonzero().item() == 0 for p in m.parameters())
            spill.set_budget(1 << 30)  # (a copy is plain torch memory)
            if zero == "model":
                assert "zero_grad" in vars(m) and "zero_grad" not in vars(copy.deepcopy(m))
            h.remove()
            del m, h
        print("ok")
    """)
    assert "ok" in out


def test_zero_grad_keeping_gradients_zeroes_the_tensors_code_kept() -> None:
    """zero_grad(set_to_none=False) zeroes the gradients in place: references code kept to
    p.grad (a logger, a hand-written scaling) stay the live gradients, as in plain torch.
    Before, offload replaced each gradient that could move by new zeros, and a loop that
    scaled the gradients through references kept from the first step scaled dead tensors: its
    losses left plain torch's from the third step, with or without swapping (an audit)."""
    out = run_ok(quiet_preamble("1GiB") + """
        def train(wrap=None):
            torch.manual_seed(0)
            m = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)]).to(dev)
            opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
            h = wrap(m, opt) if wrap else None
            g = torch.Generator().manual_seed(1)
            kept, losses, live = None, [], []
            for _ in range(5):
                x = torch.randn(32, 512, generator=g).to(dev)
                opt.zero_grad(set_to_none=False)
                loss = m(x).pow(2).mean()
                loss.backward()
                kept = kept or [p.grad for p in m.parameters()]
                live.append(all(k is p.grad for k, p in zip(kept, m.parameters())))
                for k in kept:
                    k.mul_(0.5)
                opt.step()
                losses.append(loss.item())
            return losses, [p.detach().cpu().clone() for p in m.parameters()], live, h
        base, base_params, base_live, _ = train()
        enable()
        def wrap(m, o):
            h = st.offload(m, o)
            spill.set_budget(8 << 20)  # 6 MiB of weights, 6 of gradients, 6 of momentum
            return h
        losses, params, live, h = train(wrap)
        assert all(base_live) and all(live), (base_live, live)
        assert losses == base, (losses, base)
        assert all(torch.equal(a, b) for a, b in zip(params, base_params))
        assert spill.stats()["swap.bytes_out"] > 0
        print("ok")
    """)
    assert "ok" in out


def test_zero_grad_keeps_the_rest_of_a_buffer_a_gradient_is_a_view_of() -> None:
    """A gradient that is a view into a larger buffer (a flat gradient buffer, DDP's
    ``gradient_as_bucket_view``, another optimizer's gradients beside it), on the host at
    zero_grad(set_to_none=False): only the view is zeroed, so the buffer's other bytes must
    come back. Before (audit 34a), the whole block was discarded (mapped back without a copy:
    zeros on the simulated device, stale bytes on a GPU)."""
    out = run_ok(quiet_preamble("1GiB") + """
        import time
        enable()
        m = torch.nn.Linear(512, 512, bias=False).to(dev)  # a 1 MiB weight
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        flat = torch.zeros(2 * 512 * 512, device=dev)      # its gradient and a neighbour
        m.weight.grad = flat[:512 * 512].view(512, 512)
        m.weight.grad.fill_(1.0)
        neighbour = flat[512 * 512:]
        neighbour.fill_(7.0)
        h = st.offload(m, opt)
        ptr = h.pinner.movable(m.weight.grad)
        assert ptr == flat.data_ptr(), (ptr, flat.data_ptr())
        spill.set_swappable(ptr, True)
        spill.evict(ptr)
        while spill.residence(ptr) == "swapping_out":
            time.sleep(0.001)
        assert spill.residence(ptr) == "on_host", spill.residence(ptr)
        opt.zero_grad(set_to_none=False)
        with st.guard(release_on_exit=False):  # (reads pinned)
            kept = neighbour.sum().item()
            left = m.weight.grad.count_nonzero().item()
        assert left == 0, left
        assert kept == 7.0 * 512 * 512, kept
        spill.set_budget(1 << 30)
        h.remove()
        print("ok")
    """)
    assert "ok" in out


def test_a_zero_grad_override_that_keeps_the_gradients_gets_them_back_whole() -> None:
    """An optimizer whose zero_grad(set_to_none=False) zeroes only every second call (gradient
    accumulation written into it): spill discards gradients before torch's own zero_grad
    only, so on a skipped call the kept gradients come back by a copy, their values intact.
    Before (audit 35d), every gradient on the host was discarded first and came back with no
    copy: undefined bytes on a GPU (0 KiB copied in)."""
    out = run_ok(quiet_preamble("1GiB") + """
        import time
        enable()
        class Accumulating(torch.optim.SGD):
            calls = 0
            def zero_grad(self, set_to_none=False):
                Accumulating.calls += 1
                if Accumulating.calls % 2 == 0:
                    super().zero_grad(set_to_none=set_to_none)
        torch.manual_seed(0)
        m = torch.nn.Sequential(*[torch.nn.Linear(512, 512, bias=False)
                                  for _ in range(4)]).to(dev)
        opt = Accumulating(m.parameters(), lr=0.1)
        h = st.offload(m, opt)
        m(torch.randn(8, 512, device=dev)).sum().backward()
        opt.step()
        with st.guard(release_on_exit=False):
            want = [p.grad.clone() for p in m.parameters()]
        ptrs = [h.pinner.movable(p.grad) for p in m.parameters()]
        for ptr in ptrs:
            spill.evict(ptr)
        for ptr in ptrs:
            while spill.residence(ptr) == "swapping_out":
                time.sleep(0.001)
        assert all(spill.residence(ptr) == "on_host" for ptr in ptrs)
        came_in = spill.stats()["swap.bytes_in"]
        opt.zero_grad(set_to_none=False)  # the first call keeps them
        with st.guard(release_on_exit=False):
            same = all(torch.equal(p.grad, w) for p, w in zip(m.parameters(), want))
        assert same
        assert spill.stats()["swap.bytes_in"] - came_in >= 4 * 512 * 512 * 4
        opt.zero_grad(set_to_none=False)  # the second zeroes them
        with st.guard(release_on_exit=False):
            assert all(p.grad.count_nonzero().item() == 0 for p in m.parameters())
        h.remove()
        print("ok")
    """)
    assert "ok" in out


def test_zero_grad_of_a_gradient_over_part_of_a_block_or_not_spills_keeps_the_rest() -> None:
    """A gradient whose own storage lies inside a larger block, or over its first half (made
    over the block's memory by from_blob or numpy; on CUDA, DLPack or __cuda_array_interface__)
    covers its storage but not the block: zero_grad(set_to_none=False) must not discard the
    block (spill_discard, told the storage's bytes, discards only a block they cover). And a
    gradient on memory not spill's (numpy's) is zeroed as plain torch does: before (audit 34d),
    the block's other half read 0.0, and the numpy gradient raised InvalidArgumentError from
    spill_discard; a gradient over the block's first half lost the second until session 35."""
    out = run_ok(quiet_preamble("1GiB") + """
        import ctypes, time
        import numpy as np
        enable()
        m = torch.nn.Linear(512, 512, bias=False).to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        n = 512 * 512
        for second in ([True, False] if dev == "cpu" else []):
            # one block of spill's: the gradient over one half, a neighbour over the other
            flat = torch.zeros(2 * n)
            at = flat.data_ptr() + (n * 4 if second else 0)
            g = torch.from_numpy(np.ctypeslib.as_array((ctypes.c_float * n).from_address(at)))
            m.weight.grad = g.view(512, 512)
            m.weight.grad.fill_(1.0)
            neighbour = flat[:n] if second else flat[n:]
            neighbour.fill_(7.0)
            h = st.offload(m, opt)
            spill.set_swappable(flat.data_ptr(), True)
            spill.evict(flat.data_ptr())
            while spill.residence(flat.data_ptr()) == "swapping_out":
                time.sleep(0.001)
            assert spill.residence(flat.data_ptr()) == "on_host"
            copied_in = spill.stats()["swap.bytes_in"]
            opt.zero_grad(set_to_none=False)
            with st.guard(release_on_exit=False):  # (reads pinned)
                kept = neighbour.sum().item()
                left = m.weight.grad.count_nonzero().item()
            assert kept == 7.0 * n and left == 0, (second, kept, left)
            # came back by a copy (a discarded block's fresh memory may still hold its old
            # bytes, which the values alone could not tell)
            copied_in = spill.stats()["swap.bytes_in"] - copied_in
            assert copied_in >= 2 * n * 4, (second, copied_in)
            spill.set_budget(1 << 30)
            h.remove()
            del m.weight.grad, g, neighbour, flat
        # numpy's memory, not spill's (on CUDA .to() copies it into spill's: a plain case)
        m.weight.grad = torch.from_numpy(np.ones((512, 512), dtype=np.float32)).to(dev)
        h = st.offload(m, opt)
        m(torch.randn(4, 512, device=dev)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        assert m.weight.grad.count_nonzero().item() == 0
        h.remove()
        print("ok")
    """)
    assert "ok" in out


def test_a_remove_that_finds_no_room_leaves_every_tensor_reachable_until_called_again() -> None:
    """handle.remove() at a budget that cannot hold the model's tensors once unswappable
    brings back what fits and raises out of memory; what is left stays swappable with every op
    of the thread pinned, so reading a parameter raises out of memory (no room) instead of
    faulting; after the budget is raised, remove() again brings the rest back. Before, the
    first tensor that did not fit stopped remove() and the next read of a parameter was a
    segmentation fault (an audit)."""
    out = run_ok(quiet_preamble("1GiB") + """
        enable()
        torch.manual_seed(0)
        m = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)]).to(dev)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        h = st.offload(m, opt)
        spill.set_budget(8 << 20)  # 6 MiB of weights, 6 of gradients, 12 of Adam's state
        x = torch.randn(64, 512).to(dev)
        for _ in range(3):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
        try:
            h.remove()
            raise SystemExit("remove() fitted: the test needs a budget it does not fit")
        except torch.cuda.OutOfMemoryError as e:
            assert "call remove() again" in str(e), str(e)
        try:
            total = sum(float(p.sum()) for p in m.parameters())
        except torch.cuda.OutOfMemoryError:
            pass  # no room to bring one back: an error, not a fault
        spill.set_budget(1 << 30)
        h.remove()
        ptrs = [h.pinner.movable(p) for p in m.parameters()]
        assert all(spill.residence(ptr) == "resident" for ptr in ptrs if ptr)
        total = sum(float(p.sum()) for p in m.parameters())  # plain reads, no hook left
        h.remove()  # nothing left: a no-op
        print("ok")
    """)
    assert "ok" in out


def test_offload_after_steps_taken_without_it_lets_their_gradients_move() -> None:
    """offload() of a model that has trained (gradients and Adam's state exist), then a budget
    lowered to a third: the gradients are declared at offload() as the optimizer's state is
    (an eviction moves them), and the steps after train as plain torch's. Before, they stayed
    resident until the first optimizer step (and, while zero_grad replaced gradients by new
    zeros, the first zero_grad ran out of memory: an audit)."""
    out = run_ok(quiet_preamble("1GiB") + """
        def train(m, opt, n, g, losses):
            for _ in range(n):
                x = torch.randn(64, 512, generator=g).to(dev)
                opt.zero_grad(set_to_none=False)
                loss = m(x).pow(2).mean()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            return losses
        def model():
            torch.manual_seed(0)
            m = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)]).to(dev)
            return m, torch.optim.Adam(m.parameters(), lr=1e-3)
        pm, popt = model()
        base = train(pm, popt, 5, torch.Generator().manual_seed(1), [])
        base_params = [p.detach().cpu().clone() for p in pm.parameters()]
        del pm, popt
        enable()
        m, opt = model()
        g = torch.Generator().manual_seed(1)
        losses = train(m, opt, 2, g, [])
        h = st.offload(m, opt)
        grads = [ptr for ptr in (h.pinner.movable(p.grad) for p in m.parameters()) if ptr]
        assert len(grads) == 6, grads
        for ptr in grads:  # declared: an eviction moves them (an undeclared block stays)
            spill.evict(ptr)
            assert spill.residence(ptr) != "resident", ptr
        spill.set_budget(8 << 20)  # 6 MiB of weights, 6 of gradients, 12 of Adam's state
        losses = train(m, opt, 3, g, losses)
        assert losses == base, (losses, base)
        assert all(torch.equal(p.detach().cpu(), b) for p, b in zip(m.parameters(), base_params))
        assert spill.stats()["swap.bytes_out"] > 0
        print("ok")
    """)
    assert "ok" in out


def test_quiet_steps_pin_and_declare_only_parameters_gradients_and_state() -> None:
    """Without budget pressure (the previous step's peak under half the budget), offload's
    steps after the first run quiet: every block they pin is a parameter, gradient or
    optimizer state tensor, or the batch given to the model (which another model's armed
    step may have declared: test_a_quiet_model_pins_the_batch_another_models_armed_step_
    declared), and every block they declare is one of the former (no activation, inner
    module input or output); they open no swapper step (nothing recorded or planned). With
    quiet=False every step pins activations and is a swapper step. Both train
    bit-identically to plain torch."""
    out = run_ok(quiet_preamble("1GiB") + """
        import sys; sys.path.insert(0, %r)
        from torch_train_models import train
        from spill.torch._pins import Pinner
        STEPS = 5
        base_losses, base_model, _ = train("mlp", STEPS, device=dev)
        enable()
        calls = []
        pin, declare = Pinner.pin, Pinner.declare
        def counted_pin(self, ptr, stream):
            if calls:  # from the first step on
                calls[-1]["pins"].add(ptr)
            return pin(self, ptr, stream)
        def counted_declare(self, ptr, swappable=True):
            if swappable and calls:
                calls[-1]["declared"].add(ptr)
            return declare(self, ptr, swappable)
        Pinner.pin, Pinner.declare = counted_pin, counted_declare

        def run(quiet):
            handles = {}
            def before(i):
                s = spill.stats()
                calls.append({"pins": set(), "declared": set(), "inputs": set(),
                              "swapper_steps": s["swap.steps_recorded"] + s["swap.steps_planned"]})
                if i > 0:
                    h = handles["h"]
                    calls[-2]["quiet"] = h.step_is_quiet
                    # What the step before may pin: parameters, gradients, optimizer state.
                    known = {p.data_ptr() for p in h.model.parameters()}
                    known |= {p.grad.data_ptr() for p in h.model.parameters()
                              if p.grad is not None}
                    known |= {v.data_ptr() for s in h.optimizer.state.values()
                              for v in s.values() if isinstance(v, torch.Tensor)}
                    calls[-2]["known"] = known
            def wrap(m, o):
                handles["h"] = st.offload(m, o, quiet=quiet)
                m.register_forward_pre_hook(lambda mod, args: calls[-1]["inputs"].update(
                    a.data_ptr() for a in args if isinstance(a, torch.Tensor)) if calls else None)
                return handles["h"]
            del calls[:]
            losses, model, h = train("mlp", STEPS, before, wrap=wrap, device=dev)
            before(STEPS)
            steps = calls[1:STEPS]  # the first step discovers: armed in both
            assert losses == base_losses, (quiet, losses, base_losses)
            with st.guard(release_on_exit=False):
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(),
                                                             base_model.parameters()))
            swapper = [b["swapper_steps"] - a["swapper_steps"] for a, b in zip(calls, calls[1:])]
            h.remove()
            return h, steps, swapper[1:STEPS]

        h, steps, swapper = run(0.5)
        assert h.quiet == 0.5 and h.quiet_steps == STEPS - 1 and h.armed_steps == 1, \\
            (h.quiet_steps, h.armed_steps)
        for i, s in enumerate(steps):
            assert s["quiet"], i
            assert s["pins"], ("a quiet step pinned no parameter", i)
            assert s["pins"] <= s["known"] | s["inputs"], ("a quiet step pinned an activation", i)
            assert s["inputs"] and s["inputs"] <= s["pins"], ("the batch was not pinned", i)
            assert s["declared"] <= s["known"], ("a quiet step declared an activation", i)
        assert swapper == [0] * (STEPS - 1), ("quiet steps opened swapper steps", swapper)

        h, steps, swapper = run(False)
        assert h.quiet == 0.0 and h.quiet_steps == 0 and h.armed_steps == STEPS
        for i, s in enumerate(steps):
            assert not s["quiet"], i
            assert s["pins"] - s["known"], ("an armed step pinned no activation", i)
            assert s["declared"] - s["known"], ("an armed step declared no activation", i)
        assert swapper == [1] * (STEPS - 1), ("armed steps are swapper steps", swapper)
        print("ok")
    """ % str(HERE))
    assert "ok" in out


QUIET_MODEL = quiet_preamble("160MiB") + """
        import torch.nn as nn
        # 37 MiB of parameters, gradients and momentum; activations of batch B: B x 4 KiB each.
        class Repeat(nn.Sequential):
            # Repeats the batch's rows `times` times: a batch grown inside the forward, which
            # the forward's arguments do not show (a larger input arms the step).
            times = 1
            def forward(self, x):
                return super().forward(x.repeat(Repeat.times, 1) if Repeat.times > 1 else x)

        def make():
            torch.manual_seed(0)
            model = Repeat(nn.Linear(64, 1024), nn.ReLU(),
                                  *[m for _ in range(3) for m in (nn.Linear(1024, 1024),
                                                                  nn.ReLU())]).to(dev)
            return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def batch(i, rows):
            g = torch.Generator().manual_seed(100 + i)
            return torch.randn(rows, 64, generator=g).to(dev)

        def step(model, opt, x, times=1):
            Repeat.times = times
            try:
                opt.zero_grad(set_to_none=True)
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                return loss.item()
            finally:
                Repeat.times = 1
"""


@pytest.mark.skipif(SIZED_FOR_64K, reason="the batch is sized for the simulated device's 64 KiB "
                    "granularity (room for the grown step only by moving parameters)")
def test_a_step_whose_batch_grows_arms_the_next_and_completes_by_moving_parameters() -> None:
    """A quiet step whose activations grow past the budget (the input is the same: the growth
    comes inside the forward, where no larger input arms the step) still completes:
    parameters, gradients and optimizer state move to make room. The next step is armed (its
    peak passed half the budget), the one after is quiet again, and losses and parameters
    equal plain torch's across the transitions."""
    out = run_ok(QUIET_MODEL + """
        rows = [256, 256, 256, 4608, 256, 256, 256]
        model, opt = make()
        base = [step(model, opt, batch(i, 256), r // 256) for i, r in enumerate(rows)]
        base_params = [p.detach().clone() for p in model.parameters()]
        enable()
        model, opt = make()
        h = st.offload(model, opt)
        losses, modes, moved = [], [], []
        for i, r in enumerate(rows):
            before = spill.stats()["swap.bytes_out"]
            losses.append(step(model, opt, batch(i, 256), r // 256))
            modes.append(h.step_is_quiet)
            moved.append(spill.stats()["swap.bytes_out"] - before)
        assert modes == [False, True, True, True, False, True, True], modes
        assert moved[3] > 0, ("the grown step fitted without moving anything", moved)
        assert moved[1:3] == [0, 0], moved
        assert losses == base, (losses, base)
        with st.guard(release_on_exit=False):
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base_params))
        assert spill.stats()["num_ooms"] == 0
        h.remove()
        print("ok")
    """)
    assert "ok" in out


def test_growth_beyond_what_can_move_is_torch_oom_saying_the_step_ran_quiet() -> None:
    """A quiet step whose activations cannot fit even with everything else moved raises
    torch.cuda.OutOfMemoryError with spill's breakdown and the quiet explanation (the previous
    step's peak, the fraction, the budget, quiet=False); the caller catches it and training
    continues with a smaller batch: the next step is armed, later ones quiet again, and the
    results equal plain torch's without the failed step. (The batch grows inside the
    forward: a larger input would arm the step.)"""
    out = run_ok(QUIET_MODEL + """
        rows = [256, 256, 256, 16384, 256, 256, 256]
        model, opt = make()
        base = [step(model, opt, batch(i, 256), r // 256) for i, r in enumerate(rows)
                if r < 16384]
        base_params = [p.detach().clone() for p in model.parameters()]
        enable()
        model, opt = make()
        h = st.offload(model, opt)
        losses, modes = [], []
        for i, r in enumerate(rows):
            try:
                losses.append(step(model, opt, batch(i, 256), r // 256))
            except torch.cuda.OutOfMemoryError as e:
                msg = str(e)
                assert r == 16384 and h.step_is_quiet, (i, msg)
            modes.append(h.step_is_quiet)
        for part in ("out of memory", "Budget 160.00 MiB", "ran this step quiet",
                     "without swapping activations", "was under 0.5 of the budget, 160.0 MiB",
                     "quiet=False"):
            assert part in msg, (part, msg)
        assert modes == [False, True, True, True, False, True, True], modes
        assert losses == base, (losses, base)
        with st.guard(release_on_exit=False):
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base_params))
        assert "ran this step quiet" in spill.last_oom_message()
        h.remove()
        # The note went with the handle.
        try:
            torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        except torch.cuda.OutOfMemoryError as e:
            assert "quiet" not in str(e), str(e)
        else:
            raise AssertionError("no OutOfMemoryError")
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.skipif(SIZED_FOR_64K, reason="sized for the simulated device's 64 KiB granularity "
                    "(the larger batch fits only by swapping its activations)")
def test_a_quiet_run_whose_input_batch_grows_16x_arms_the_step_and_trains_as_plain_torch() -> None:
    """A quiet run (a 512-wide MLP with AdamW, batch 256: its peak under half of a 70 MiB
    budget) whose batch grows to 4096 rows: the first larger step is armed, since the previous
    peak's activations scaled by the inputs' ratio pass half the budget, and it trains by
    swapping them; losses and parameters are plain torch's, with no out-of-memory error.
    Before, that step ran quiet (the previous peak plus an 8 MiB batch stayed under the line)
    and ran out of memory (the audit's MLP, at 80 MiB, in its backward, where the same loop
    at 70 MiB, armed all along, trained: audit 31a, F1). Later steps of 256 rows run quiet
    again."""
    out = run_ok(quiet_preamble("70MiB") + """
        import torch.nn as nn, torch.nn.functional as F
        def make():
            torch.manual_seed(0)
            model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(512, 512), nn.ReLU())],
                                  nn.Linear(512, 64)).to(dev)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

        def step(model, opt, i, rows):
            g = torch.Generator().manual_seed(100 + i)
            x = torch.randn(rows, 512, generator=g).to(dev)
            y = torch.randint(0, 64, (rows,), generator=g).to(dev)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss.item()

        rows = [256, 256, 256, 256, 4096, 4096, 256, 256, 256]
        model, opt = make()
        base = [step(model, opt, i, r) for i, r in enumerate(rows)]
        base_params = [p.detach().clone() for p in model.parameters()]
        enable()
        model, opt = make()
        h = st.offload(model, opt)
        losses, modes, moved = [], [], []
        for i, r in enumerate(rows):
            before = spill.stats()["swap.bytes_out"]
            losses.append(step(model, opt, i, r))
            modes.append(h.step_is_quiet)
            moved.append(spill.stats()["swap.bytes_out"] - before)
        assert modes == [False, True, True, True, False, False, False, True, True], modes
        assert moved[4] > 0, ("the larger step fitted without swapping", moved)
        assert spill.stats()["num_ooms"] == 0
        assert losses == base, (losses, base)
        with st.guard(release_on_exit=False):
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base_params))
        h.remove()
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.skipif(SIZED_FOR_64K, reason="the batch is sized for the simulated device's 64 KiB "
                    "granularity (an armed step's forward fits by swapping, its backward not)")
@pytest.mark.parametrize("quiet", [False, True])
def test_a_caught_oom_leaves_nothing_of_the_abandoned_step_allocated(quiet: bool) -> None:
    """A step that runs out of memory (armed: in its backward, after its activations were
    swapped out; quiet: in its forward), caught, gives back all its memory once the caller's
    references are gone, with Python's collector off (plain torch needs none): allocated bytes
    are back to their level before the step, as with spill's allocator and no hooks on the same
    code. Training then continues with a smaller batch, equal to plain torch without the
    failed step. (The batch grows inside the forward: a larger input would arm the quiet
    step.)"""
    out = run_ok(QUIET_MODEL + """
        import gc, traceback
        rows = [256, 256, 256, 16384, 256, 256]
        model, opt = make()
        base = [step(model, opt, batch(i, 256), r // 256) for i, r in enumerate(rows)
                if r < 16384]
        enable()

        def run(hooks):
            model, opt = make()
            h = st.offload(model, opt, quiet=%r) if hooks else None
            losses, where, left = [], None, None
            for i, r in enumerate(rows):
                before = torch.cuda.memory_allocated()
                try:
                    losses.append(step(model, opt, batch(i, 256), r // 256))
                except torch.cuda.OutOfMemoryError as e:
                    assert r == 16384, (i, str(e))
                    where = [f.name for f in traceback.extract_tb(e.__traceback__)]
                    quiet = h.step_is_quiet if h else None
                if r == 16384:
                    left = torch.cuda.memory_allocated() - before
            if h:
                h.remove()
            return losses, where, left, quiet

        gc.disable()
        bare_losses, bare_where, bare_left, _ = run(False)
        losses, where, left, quiet = run(True)
        assert bare_where and losses == bare_losses == base, (losses, bare_losses, base)
        assert bare_left <= 0, ("spill's allocator alone kept bytes", bare_left)
        assert quiet == %r, quiet
        # The armed step's forward fits by swapping its activations out; its backward does not.
        assert ("backward" in where) != quiet, where
        assert left <= 0, ("bytes of the abandoned step still allocated", left >> 20, where)
        print("ok")
    """ % (quiet, quiet))
    assert "ok" in out


@pytest.mark.skipif(SIZED_FOR_64K, reason="sized for the simulated device's 64 KiB granularity "
                    "(room for the input, not for a parameter)")
@pytest.mark.parametrize("quiet", [True, False])
def test_a_parameter_that_cannot_come_back_is_torch_oom_and_training_continues(
        quiet: bool) -> None:
    """A step whose forward fills the budget with a tensor no hook declared (made inside the
    forward, after the step's mode was decided) pushes the parameters out, and the first
    module's pre-hook cannot pin its weight back: torch.cuda.OutOfMemoryError (also
    spill.OutOfMemoryError), in a quiet step with the quiet sentence, armed without it. The
    step leaves nothing allocated; the next step is armed and trains; losses and parameters
    equal plain torch's without the failed step."""
    out = run_ok(quiet_preamble("64MiB") + """
        import torch.nn as nn, traceback
        fill = {"on": False}
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.l1, self.l2 = nn.Linear(1024, 1024), nn.Linear(1024, 1024)  # 4 MiB each
            def forward(self, x):
                tmp = torch.empty(61 << 20, dtype=torch.uint8, device=x.device) \\
                    if fill["on"] else None
                return self.l2(self.l1(x).relu())
        def make():
            torch.manual_seed(0)
            m = M().to(dev)
            return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        def batch(i):
            return torch.randn(64, 1024, generator=torch.Generator().manual_seed(100 + i))
        def step(m, o, x):
            o.zero_grad(set_to_none=True)
            loss = m(x.to(dev)).square().mean()
            loss.backward()
            o.step()
            return loss.item()
        N, FAIL = 7, 4
        m, o = make()
        base = [step(m, o, batch(i)) for i in range(N) if i != FAIL]
        base_params = [p.detach().clone() for p in m.parameters()]
        enable()
        m, o = make()
        h = st.offload(m, o, quiet=%r)
        losses, modes, msg = [], [], None
        for i in range(N):
            x = batch(i)
            fill["on"] = i == FAIL
            before = torch.cuda.memory_allocated()
            try:
                losses.append(step(m, o, x))
            except torch.cuda.OutOfMemoryError as e:
                assert i == FAIL and isinstance(e, spill.OutOfMemoryError), (i, e)
                msg, where = str(e), [f.name for f in traceback.extract_tb(e.__traceback__)]
                failed_quiet = h.step_is_quiet
            fill["on"] = False
            modes.append(h.step_is_quiet)
            if i == FAIL:
                assert torch.cuda.memory_allocated() <= before, "the failed step kept bytes"
        assert msg is not None, "no OutOfMemoryError"
        assert "_pre" in where and "pin" in msg and "cannot bring 4.00 MiB" in msg, (where, msg)
        assert failed_quiet == %r and ("ran this step quiet" in msg) == %r, (failed_quiet, msg)
        assert modes[FAIL + 1] is False, modes  # armed after the error
        assert losses == base, (losses, base)
        with st.guard(release_on_exit=False):
            assert all(torch.equal(p, q) for p, q in zip(m.parameters(), base_params))
        h.remove()
        print("ok")
    """ % (quiet, quiet, quiet))
    assert "ok" in out


# Two-model scenarios: Model's forward, backward or SGD step allocates 1 GiB (out of memory)
# while fail[what] is set; oom(what, m, o) makes it so and returns the error's message.
OOM_MODELS = """
        import torch.nn as nn
        # The quiet model's steps must stay under half the budget with the armed model's
        # tensors beside them: on a GPU every 256 KiB weight and 512 KiB activation takes a
        # 2 MiB block, a peak of 36 MiB, over half of 64 MiB.
        spill.set_budget(256 << 20)
        fail = {"forward": False, "backward": False, "step": False}
        class Fail(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                if fail["forward"]:
                    torch.empty(1 << 30, dtype=torch.uint8, device=dev)
                return x.clone()
            @staticmethod
            def backward(ctx, g):
                if fail["backward"]:
                    torch.empty(1 << 30, dtype=torch.uint8, device=dev)
                return g
        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256)
            def forward(self, x):
                return self.b(Fail.apply(self.a(x).relu()))
        class SGD(torch.optim.SGD):
            def step(self, closure=None):
                if fail["step"]:
                    torch.empty(1 << 30, dtype=torch.uint8, device=dev)
                return super().step(closure)
        def make(quiet):
            m = Model().to(dev)
            o = SGD(m.parameters(), lr=0.01, momentum=0.9)
            return m, o, st.offload(m, o, quiet=quiet)
        x = torch.randn(512, 256, device=dev)
        def forward(m, o):
            o.zero_grad(set_to_none=True)
            return m(x).square().mean()
        def oom(what, m, o, loss=None):
            fail[what] = True
            try:
                if loss is None:
                    loss = forward(m, o)
                loss.backward()
            except torch.cuda.OutOfMemoryError as e:
                return str(e)
            finally:
                fail[what] = False
            raise AssertionError("no OutOfMemoryError")
"""


def test_two_models_on_one_device_each_get_their_own_oom_note() -> None:
    """The quiet explanation in an out-of-memory message belongs to the step that raised it:
    with two models on one device, one stepping quiet and one armed (quiet=False), an error in
    the armed model's forward or backward right after the quiet model's step carries no quiet
    sentence; an error in the quiet model's backward carries its sentence even when the armed
    model ran a whole step between that forward and backward; an error in the quiet model's
    optimizer step (its momentum buffer) does too."""
    out = run_ok(ENABLE + OOM_MODELS + """
        q, qo, qh = make(0.5)
        a, ao, ah = make(False)
        for _ in range(3):
            for m, o in ((q, qo), (a, ao)):
                forward(m, o).backward(); o.step()
        assert not ah.step_is_quiet
        QUIET = "ran this step quiet"
        def quiet_step():  # the step after an error on the device is armed
            for _ in range(2):
                forward(q, qo).backward(); qo.step()
            assert qh.step_is_quiet, qh._policy.reason
        for what in ("forward", "backward"):
            quiet_step()
            msg = oom(what, a, ao)
            assert "out of memory" in msg and QUIET not in msg, (what, msg)
        for _ in range(2):  # a clean pair of steps: both models' errors are behind them
            forward(a, ao).backward(); ao.step()
            quiet_step()
        loss = forward(q, qo)  # the quiet model's forward; the armed model steps; then backward
        forward(a, ao).backward(); ao.step()
        msg = oom("backward", q, qo, loss)
        assert QUIET in msg and "quiet=False" in msg, msg
        assert QUIET in spill.last_oom_message()
        # The quiet model's optimizer step, after the armed model's step.
        forward(a, ao).backward(); ao.step()
        quiet_step()
        forward(q, qo).backward()
        forward(a, ao).backward(); ao.step()
        fail["step"] = True
        try:
            qo.step()
        except torch.cuda.OutOfMemoryError as e:
            assert QUIET in str(e), str(e)
        else:
            raise AssertionError("no OutOfMemoryError")
        print("ok")
    """)
    assert "ok" in out


def test_a_quiet_model_pins_the_batch_another_models_armed_step_declared() -> None:
    """Two models trained on one batch, one stepping quiet and one armed: the armed model's
    step declares the batch swappable (autograd saves it), so the quiet model, whose forward
    pins no module argument, must pin what its forward is given. With every block evicted in
    the middle of the quiet model's forward, both train as plain torch, and check_pins finds
    no use without a pin (before: the quiet model's third step read the batch unpinned, a
    segmentation fault once it was on the host; check_pins named it)."""
    out = run_ok(quiet_preamble("256MiB") + EVICT_ALL + """
        import torch.nn as nn
        def make():
            m = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).to(dev)
            return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        def train(spilled):
            torch.manual_seed(0)
            (q, qo), (a, ao) = make(), make()
            if spilled:
                q[2].register_forward_pre_hook(lambda mod, args: evict_all())
                qh, ah = st.offload(q, qo, quiet=0.5), st.offload(a, ao, quiet=False)
            x = torch.randn(512, 256, device=dev)
            losses, quiet = [], []
            for _ in range(5):
                for m, o in ((q, qo), (a, ao)):
                    o.zero_grad(set_to_none=True)
                    loss = m(x).square().mean()
                    loss.backward()
                    o.step()
                    losses.append(loss.item())
                if spilled:
                    quiet.append((qh.step_is_quiet, ah.step_is_quiet))
            with (st.guard(release_on_exit=False) if spilled else contextlib.nullcontext()):
                params = [p.detach().cpu().clone() for m in (q, a) for p in m.parameters()]
                return losses, quiet, params
        import contextlib
    """ + CHECKED_AGAINST_PLAIN + """
        assert (True, False) in quiet, quiet
        assert losses == base, (losses, base)
        with st.guard(release_on_exit=False):
            assert all(torch.equal(p, b) for p, b in zip(params, base_params))
        assert check.found == [], check.found
        print("ok")
    """)
    assert "ok" in out, out


def test_a_quiet_model_pins_what_it_saved_that_another_models_armed_step_declared() -> None:
    """A GAN's generator step: G steps quiet and feeds D, armed every step. D's forward
    declares its input, G's output, swappable; G's Tanh saved that output for its backward,
    which runs after D's. With every block evicted between D's part of the backward and G's,
    both train as plain torch and check_pins finds no use without a pin (before: a quiet step
    pinned only the parameters autograd saved, and tanh_backward read G's output unpinned:
    named by check_pins, a segmentation fault once on the host; audit 38a F0)."""
    out = run_ok(quiet_preamble("256MiB") + EVICT_ALL + """
        import contextlib
        import torch.nn as nn
        def train(spilled):
            torch.manual_seed(0)
            g = nn.Sequential(nn.Linear(128, 512), nn.Tanh()).to(dev)
            d = nn.Linear(512, 1).to(dev)
            go = torch.optim.SGD(g.parameters(), lr=0.1)
            do = torch.optim.SGD(d.parameters(), lr=0.1)
            if spilled:
                gh, dh = st.offload(g, go), st.offload(d, do, quiet=False)
            losses, quiet = [], []
            for _ in range(4):
                fake = g(torch.randn(256, 128, device=dev))
                if spilled:
                    fake.register_hook(lambda grad: (evict_all(), grad)[1])
                go.zero_grad(set_to_none=True)
                do.zero_grad(set_to_none=True)
                loss = d(fake).mean()
                loss.backward()
                go.step()
                do.step()
                losses.append(loss.item())
                if spilled:
                    quiet.append(gh.step_is_quiet)
            with (st.guard(release_on_exit=False) if spilled else contextlib.nullcontext()):
                params = [p.detach().cpu().clone() for m in (g, d) for p in m.parameters()]
            return losses, quiet, params
    """ + CHECKED_AGAINST_PLAIN + """
        assert True in quiet, quiet  # G stepped quiet
        assert check.found == [], check.found
        assert losses == base, (losses, base)
        assert all(torch.equal(p, b) for p, b in zip(params, base_params))
        print("ok")
    """)
    assert "ok" in out, out


def test_an_out_of_memory_error_arms_only_the_next_step_of_its_own_model() -> None:
    """Two models stepping quiet on one device; one runs out of memory in its forward, then
    (after a clean pair of steps) in its backward: that model's next step is armed, saying
    why, and the other's stays quiet (the device's out-of-memory counter is not per model)."""
    out = run_ok(ENABLE + OOM_MODELS + """
        p, po, ph = make(0.5)
        q, qo, qh = make(0.5)
        def step(m, o, h):
            forward(m, o).backward()
            o.step()
            return h.step_is_quiet
        for _ in range(3):
            quiet = step(p, po, ph), step(q, qo, qh)
        assert quiet == (True, True), quiet
        for what in ("forward", "backward"):
            oom(what, p, po)
            assert step(q, qo, qh), qh._policy.reason
            assert not step(p, po, ph)
            assert "ran out of memory" in ph._policy.reason, ph._policy.reason
            quiet = step(p, po, ph), step(q, qo, qh)
            assert quiet == (True, True), quiet
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.parametrize("quiet", [True, False])
def test_evict_between_steps_settles_on_the_host(quiet: bool) -> None:
    """spill.evict of a parameter between two steps (quiet or armed) moves it out: its
    residence reads on_host once the copy has finished (not swapping_out for good), its device
    memory is given back, and the next step brings it back and trains as plain torch does."""
    out = run_ok(QUIET_MODEL + """
        import time
        model, opt = make()
        base = [step(model, opt, batch(i, 256)) for i in range(5)]
        enable()
        model, opt = make()
        h = st.offload(model, opt, quiet=%r)
        losses = [step(model, opt, batch(i, 256)) for i in range(3)]
        assert h.step_is_quiet == %r
        w = model[2].weight  # 4 MiB
        before = spill.stats()
        spill.evict(w.data_ptr())
        deadline = time.monotonic() + 30
        while spill.residence(w.data_ptr()) != "on_host":
            assert time.monotonic() < deadline, spill.residence(w.data_ptr())
            time.sleep(0.01)
        after = spill.stats()
        assert after["swap.bytes_out"] - before["swap.bytes_out"] == 4 << 20
        assert after["swapped_out_bytes"] - before["swapped_out_bytes"] == 4 << 20, after
        assert after["allocated_bytes.current"] == before["allocated_bytes.current"]
        losses += [step(model, opt, batch(i, 256)) for i in range(3, 5)]
        assert spill.residence(w.data_ptr()) == "resident"
        assert losses == base, (losses, base)
        h.remove()
        print("ok")
    """ % (quiet, quiet))
    assert "ok" in out


def test_activation_addresses_stay_bounded_over_armed_steps_of_varying_shapes() -> None:
    """The addresses of activations armed steps declared (what the first quiet step makes
    unswappable again) lose those whose blocks were freed: over 150 armed steps of random
    batch sizes, whose activations take new addresses each step, the set stays near its size
    in the first steps (it grew by about 2 a step, without bound: audit 31a, F4), and the
    output of an early step the loop keeps, still alive, stays in it."""
    out = run_ok(quiet_preamble("1GiB") + """
        import random, torch.nn as nn
        enable()
        torch.manual_seed(0)
        m = nn.Sequential(*[x for _ in range(4) for x in (nn.Linear(256, 256), nn.ReLU())]).to(dev)
        o = torch.optim.SGD(m.parameters(), lr=0.01)
        h = st.offload(m, o, quiet=False)
        rnd = random.Random(0)
        lens, kept = [], None
        for i in range(150):
            x = torch.randn(rnd.randrange(128, 2048), 256).to(dev)
            o.zero_grad(set_to_none=True)
            y = m(x)
            y.square().mean().backward()
            o.step()
            if i == 3:
                kept, ptr = y, h.pinner.movable(y)
                assert ptr in h._acts
            lens.append(len(h._acts))
        assert max(lens) <= 2 * max(lens[:20]) + 64, (lens[::10], max(lens[:20]))
        assert ptr in h._acts, "a live activation was dropped"
        h.remove()
        print("ok")
    """)
    assert "ok" in out


def test_quiet_decisions_hysteresis_and_bad_values() -> None:
    """The decision at each step boundary from the previous step's peak: armed from the line
    (quiet x budget) up, quiet again only under 7/8 of it, armed after an out-of-memory error,
    always armed with quiet=False or None; quiet values other than a fraction in [0, 1], a
    bool or None are rejected naming the argument, a number out of range as a ValueError,
    anything else (a string "0.5" too) as a TypeError."""
    out = run_ok(ENABLE + """
        from types import SimpleNamespace
        from spill.torch._quiet import QuietSteps
        def modes(value, peaks, ooms=None):
            q = QuietSteps(value, 0)
            ooms = ooms or [0] * len(peaks)
            it = iter(zip(peaks, ooms))
            figures = {}
            def take():
                figures["peak"], figures["ooms"] = next(it)
                return figures["peak"]
            q._take_peak = take
            q._stats = lambda: SimpleNamespace(budget_bytes=1000, ooms=figures["ooms"])
            out = []
            for i in range(len(peaks)):
                quiet = q.decide(first=i == 0)
                q.begin(quiet)
                out.append("q" if quiet else "a")
            return "".join(out)
        #            first  quiet  stays  passes  near   under 7/8  at the line
        assert modes(0.5, [0,   400,   499,   501,    450,   430,       500]) == "aqqaaqq"
        assert modes(0.5, [0, 100, 100, 100], [0, 0, 1, 1]) == "aqaq"  # an OOM arms the next
        assert modes(False, [0, 100, 100]) == "aaa"
        assert modes(0, [0, 100, 100]) == "aaa"
        assert modes(None, [0, 100, 100]) == "aaa"
        assert modes(True, [0, 400, 600]) == "aqa"
        assert modes(0.25, [0, 200, 260]) == "aqa"
        model = torch.nn.Linear(4, 4).to(dev)
        for bad in (-0.1, 1.5, float("nan"), float("inf"), "half", "0.5", [0.5]):
            try:
                st.offload(model, quiet=bad)
            except spill.InvalidArgumentError as e:
                assert "quiet" in str(e) and repr(bad) in str(e), str(e)
                assert isinstance(e, ValueError)
                assert isinstance(e, TypeError) == (not isinstance(bad, float)), (bad, type(e))
            else:
                raise AssertionError(f"quiet={bad!r} accepted")
        st.offload(model, quiet=None).remove()
        import numpy
        st.offload(model, quiet=numpy.float32(0.25)).remove()  # a number, if not a float
        st.offload(model, quiet=1).remove()
        print("ok")
    """)
    assert "ok" in out


# Inside a scenario: settle(tensors) starts moving each tensor to the host now (nothing moves
# a pinned or unswappable one: an unpinned use of a moved one then faults) and waits until the
# copies, which run on their own, have landed; it returns how many are on the host.
SETTLE = textwrap.indent("""
import time
def settle(tensors):
    for t in tensors:
        spill.evict(t.data_ptr())
    deadline = time.monotonic() + 30
    while True:
        where = [spill.residence(t.data_ptr()) for t in tensors]
        if "swapping_out" not in where or time.monotonic() > deadline:
            return where.count("on_host")
        time.sleep(0.001)
""", " " * 8)


# ------------------------------------------------------------------ submodules called directly

# A model whose training loop calls its submodules itself (the root's forward never runs in
# "loop"): 6 blocks of a 4 MiB Linear, trained with Adam; `how` picks the calls of a step i.
DIRECT_MODEL = textwrap.indent("""
import torch.nn as nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(1024, 1024), nn.ReLU())
                                    for _ in range(6))
        self.head = nn.Linear(1024, 10)
    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)
def hint(w):  # before a use outside every module: spill.evict (when spill runs)
    pass
def forward(m, x, how, i):
    if how == "root" or (how == "mixed" and i % 2):  # mixed: the root in odd steps only
        return m(x)
    w = m.blocks[2][0].weight
    if how == "regularizer":  # a weight read outside every module, after the root's forward
        y = m(x)
        hint(w)
        return y + 1e-3 * w.square().sum()
    for b in m.blocks:
        x = b(x) + x if how == "residual" else b(x)
    if how == "outside":  # loop code between the calls reading a weight
        hint(w)
        x = x @ w.t()
    if how == "shared":  # the first block again: its weights used twice in the step
        x = m.blocks[0](x)
    return m.head(x)
def train(steps, how, wrap=None, mid=None):
    torch.manual_seed(0)
    m = Net().to(dev)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    h = wrap(m, opt) if wrap else None
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(steps):
        # 128 KiB batches stay in the small pool: the blocks are the same on a GPU (2 MiB
        # granularity, where a batch of 64 took 2 MiB blocks and backward ran out of memory
        # at a third) and on the simulated device.
        x = torch.randn(32, 1024, generator=g).to(dev)
        y = torch.randint(0, 10, (32,), generator=g).to(dev)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(forward(m, x, how, i), y)
        if mid:
            mid(m)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, m, h
""", " " * 8)


@pytest.mark.parametrize("how", ["loop", "residual", "shared", "mixed", "outside",
                                 "regularizer"])
def test_submodules_called_directly_are_pinned_at_a_third_of_the_footprint(how: str) -> None:
    """offload(model, optimizer) where the training loop calls the model's submodules itself
    (the root's forward never runs, or in some steps only; a block called twice; code between
    the calls reading their outputs or a weight), or reads a weight outside every module: at
    a third of the footprint, losses and parameters are plain torch's and bytes were swapped
    (before the fix, backward or the loop's code read evicted weights)."""
    out = run_ok(quiet_preamble("1GiB") + DIRECT_MODEL + SETTLE + f"""
        base, bm, _ = train(6, "{how}")
        base_params = [p.detach().cpu().clone() for p in bm.parameters()]
        del bm  # on a GPU the baseline ran in spill's memory: it must not hold the budgets
        enable()
        def hint(w):
            settle([w])
        train(2, "{how}")
        footprint = st.max_memory_allocated()
        spill.set_budget(footprint // 3)
        before = spill.stats()
        losses, m, h = train(6, "{how}", lambda m, o: st.offload(m, o))
        after = spill.stats()
""" + MATCHES_PLAIN_TORCH + """
        assert after["swap.steps_planned"] > before["swap.steps_planned"], "no planned step"
        assert h.quiet_steps == 0 and h.armed_steps == 6, (h.quiet_steps, h.armed_steps)
        spill.set_budget(4 * footprint)
        h.remove()
        print("ok", footprint, after["swap.bytes_out"] - before["swap.bytes_out"])
    """)
    assert "ok" in out


@pytest.mark.parametrize("quiet", [True, False])
def test_submodules_called_directly_pin_their_weights_in_backward(quiet: bool) -> None:
    """Every parameter evicted between the forward and the backward of each step (no budget
    pressure: quiet steps after the first when quiet=True), with the submodules called
    directly: backward brings back what it reads, and training equals plain torch's."""
    out = run_ok(quiet_preamble("1GiB") + DIRECT_MODEL + SETTLE + f"""
        base, _, _ = train(5, "loop")
        enable()
        moved = []
        def evict_all(m):
            moved.append(settle(list(m.parameters())))
        losses, m, h = train(5, "loop", lambda m, o: st.offload(m, o, quiet={quiet}),
                             mid=evict_all)
        assert losses == base, (losses, base)
        assert moved[0] > 0 and min(moved[1:]) >= 6, moved
        assert (h.quiet_steps == 4) if {quiet} else (h.quiet_steps == 0), h.quiet_steps
        h.remove()
        print("ok", moved)
    """)
    assert "ok" in out


# ------------------------------------------------------------------ code outside the hooks

# A training loop (six 1 MiB weights, Adam) doing one thing users do between the hooked
# regions (`use`), with settle() moving what it reads to the host first; `seen` collects what
# the loop read, to compare with plain torch's.
OUTSIDE_HOOKS = textwrap.indent("""
import copy, hashlib, io, pickle, zipfile
def settle(tensors):  # plain torch: nothing moves (SETTLE's, once spill runs)
    return 0
def swappable(m, opt):
    ts = list(m.parameters()) + [p.grad for p in m.parameters() if p.grad is not None]
    return ts + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
def digest(t):
    return tuple(t.shape), hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest()
def contents(data):  # a torch.save file read back without loading it into spill's memory
    z = zipfile.ZipFile(io.BytesIO(data))
    root = z.namelist()[0].split("/")[0]
    class Reader(pickle.Unpickler):
        def find_class(self, module, name):  # a tensor: its arguments and the bytes' digest
            if module.startswith("torch"):
                return lambda *args: (name,) + args
            return super().find_class(module, name)
        def persistent_load(self, pid):
            return hashlib.sha256(z.read(f"{root}/data/{pid[2]}")).hexdigest()
    return Reader(io.BytesIO(z.read(f"{root}/data.pkl"))).load()
def train(use, wrap=None, steps=4):
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)]).to(dev)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    ema = copy.deepcopy(m) if use == "ema" else None
    h = wrap(m, opt) if wrap else None
    he = st.offload(ema) if wrap and ema is not None else None  # the average moves too
    g = torch.Generator().manual_seed(1)
    losses, seen = [], []
    for i in range(steps):
        opt.zero_grad(set_to_none=use != "clip_keep")
        for _ in range(3 if use == "accumulate" else 1):
            x = torch.randn(64, 512, generator=g).to(dev)
            y = torch.randn(64, 512, generator=g).to(dev)
            loss = torch.nn.functional.mse_loss(m(x), y)
            if use == "regularizer" and i >= 2:  # first read outside every module at step 3
                settle([m[0].weight])
                loss = loss + 1e-3 * m[0].weight.square().sum()
            loss.backward()
            settle(swappable(m, opt))
        if use in ("clip", "clip_keep"):
            seen.append(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05).item())
        if use == "logging":
            seen.append([p.grad.norm().item() for p in m.parameters()])
            seen.append([p.grad.detach().cpu().numpy().sum() for p in m.parameters()])
        opt.step()
        losses.append(loss.item())
        settle(swappable(m, opt) + (list(ema.parameters()) if ema else []))
        if use == "logging":
            seen.append([p.norm().item() for p in m.parameters()])
            seen.append([p.detach().cpu().numpy().sum() for p in m.parameters()])
            seen.append([p.detach().view(-1)[:4].tolist() for p in m.parameters()])
        elif use == "ema":
            with torch.no_grad():
                for e, p in zip(ema.parameters(), m.parameters()):
                    e.mul_(0.9).add_(p, alpha=0.1)
        elif use == "eval":
            m.eval()
            with torch.no_grad():
                seen.append(m(torch.ones(8, 512).to(dev)).sum().item())
            m.train()
        elif use == "checkpoint":
            buf = io.BytesIO()
            torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
            seen.append(contents(buf.getvalue()))
            if i == 0:
                first = io.BytesIO()
                torch.save(m.state_dict(), first)
            if i == 2:  # the weights back to step 0's
                m.load_state_dict(torch.load(io.BytesIO(first.getvalue())))
    if ema is not None:
        seen.append([digest(e) for e in ema.parameters()])
        if he is not None:
            he.remove()
    return losses, m, h, seen
""", " " * 8)


@pytest.mark.parametrize("use", ["checkpoint", "logging", "clip", "clip_keep", "ema", "eval",
                                 "accumulate", "regularizer"])
def test_code_between_the_hooks_reads_swapped_tensors_as_plain_torch(use: str) -> None:
    """offload(model, optimizer) with the loop's own code between the hooked regions reading
    tensors that were just moved to the host: a checkpoint (state_dict() of model and optimizer
    through torch.save, the file read back equal to plain torch's; load_state_dict of an older
    one), logging (norm().item(), .numpy(), .tolist() of parameters and gradients),
    clip_grad_norm_ (gradients set to None or kept), an EMA of the weights after the step (the
    average offloaded too), an evaluation pass, gradient accumulation (three backward passes a
    step) and a regularizer reading a weight outside every module first at step 3. At a third
    of the footprint (armed steps) and with no pressure (quiet steps after the first): losses,
    parameters and what the loop read are plain torch's (before the window, all but the
    evaluation pass and clipping fresh gradients crashed or ran out of memory)."""
    out = run_ok(quiet_preamble("1GiB") + OUTSIDE_HOOKS + f"""
        base, bm, _, base_seen = train("{use}")
        base_params = [p.detach().cpu().clone() for p in bm.parameters()]
        del bm  # on a GPU the baseline ran in spill's memory: it must not hold the budgets
        enable()
""" + SETTLE + f"""
        import gc
        move = settle
        train("{use}", steps=3)
        gc.collect()
        footprint = st.max_memory_allocated()
        for quiet, budget in ((False, footprint // 3), (True, 8 * footprint)):
            m = h = seen = None
            gc.collect()
            moved = []
            spill.set_budget(1 << 30)
            def wrap(m, o):
                h = st.offload(m, o, quiet=quiet)
                spill.set_budget(budget)
                return h
            def settle(tensors):
                moved.append(move(tensors))
            before = spill.stats()
            losses, m, h, seen = train("{use}", wrap)
            after = spill.stats()
""" + textwrap.indent(MATCHES_PLAIN_TORCH, "    ") + """
            assert seen == base_seen, "what the loop read differs from plain torch's"
            assert sum(moved) > 0 and (h.quiet_steps > 0) == quiet, (moved, h.quiet_steps)
            spill.set_budget(8 * footprint)
            h.remove()
            print("ok", quiet, footprint, sum(moved))
    """)
    assert out.count("ok") == 2


def test_a_thread_reading_the_model_under_pin_reads_keeps_the_training_bit_identical_and_planned(
) -> None:
    """Another thread (an asynchronous logging, EMA or checkpoint thread) reads an offloaded
    MLP's parameters under ``pin_reads()`` again and again while the main thread trains 3 steps
    at a third of the footprint: the reads are finite, and the losses, the final parameters and
    the plan are those of the same training without the reader (which are plain torch's:
    test_training_at_a_third_of_the_footprint_is_bit_identical): as many planned steps, no more
    deviations (before the fix the reader's unpins landed in the training's step scope and
    split or merged its ops: every step with a reader deviated, none was planned). After training, with parameters on the host, a thread saves the model with
    torch.save and reads .numpy() and .tolist() under pin_reads: plain values (on the bridge,
    unpinned, these reads fault)."""
    out = run_ok(quiet_preamble("1GiB") + f"""
        import io, math, sys, threading, time
        sys.path.insert(0, {str(HERE)!r})
        from torch_train_models import train
        STEPS = 3
        enable()
        train("mlp", 2, device=dev)
        footprint = st.max_memory_allocated()
        spill.set_budget(footprint // 3)
        def run(reader):
            stop, models, reads, current = threading.Event(), [], [], [0]
            def read():
                while not stop.is_set():
                    if not models:
                        time.sleep(0.001)
                        continue
                    step = current[0]
                    with st.pin_reads():
                        total = sum(float(p.detach().sum()) for p in models[0].parameters())
                    reads.append((step, total))
                    time.sleep(0.002)
            def wrap(m, o):
                models.append(m)
                return st.offload(m, o)
            def before_step(i):
                current[0] = i
            t = threading.Thread(target=read, daemon=True)
            if reader:
                t.start()
            try:
                before = spill.stats()
                losses, m, h = train("mlp", STEPS, before_step, wrap, device=dev)
                after = spill.stats()
            finally:
                stop.set()
            if reader:
                t.join()
            return losses, m, h, before, after, reads
        base, m0, h0, b0, a0, _ = run(False)
        # Copies outside spill's memory (on the bridge a clone would hold the budget).
        base_params = [torch.from_numpy(p.detach().cpu().numpy().copy()) for p in m0.parameters()]
        spill.set_budget(8 * footprint)  # remove() brings everything back
        h0.remove()
        del m0, h0
        spill.set_budget(footprint // 3)
        losses, m, h, before, after, reads = run(True)
""" + MATCHES_PLAIN_TORCH + """
        assert all(math.isfinite(s) for _, s in reads)
        assert all(any(i == step for step, _ in reads) for i in range(2, STEPS)), \
            ("the reader did not read during every planned step", [r[0] for r in reads])
        planned = after["swap.steps_planned"] - before["swap.steps_planned"]
        deviations = after["swap.deviations"] - before["swap.deviations"]
        alone = (a0["swap.steps_planned"] - b0["swap.steps_planned"],
                 a0["swap.deviations"] - b0["swap.deviations"])
        assert alone[0] > 0, alone
        assert (planned, deviations) == alone, ("the reader changed the plan", planned,
                                                deviations, alone)
        print("reads", len(reads), "planned", planned, "deviations", deviations,
              "out", after["swap.bytes_out"] - before["swap.bytes_out"],
              "alone out", a0["swap.bytes_out"] - b0["swap.bytes_out"])
        ptrs = [p.data_ptr() for p in m.parameters()]
        for q in ptrs:  # the window's reads above brought them back
            spill.evict(q)
        deadline = time.monotonic() + 30
        while spill.residence(ptrs[0]) != "on_host":
            assert time.monotonic() < deadline, spill.residence(ptrs[0])
            time.sleep(0.01)
        on_host = sum(spill.residence(q) == "on_host" for q in ptrs)
        got = {}
        def checkpoint():
            with st.pin_reads():
                buf = io.BytesIO()
                torch.save(m.state_dict(), buf)
                got["numpy"] = [float(p.detach().cpu().numpy().sum()) for p in m.parameters()]
                got["list"] = [p.detach().view(-1)[-3:].tolist() for p in m.parameters()]
            got["saved"] = buf.getvalue()
        t = threading.Thread(target=checkpoint)
        t.start()
        t.join()
        spill.set_budget(8 * footprint)
        h.remove()
        loaded = torch.load(io.BytesIO(got["saved"]), map_location="cpu")
        assert all(torch.equal(v.cpu(), q) for v, q in zip(loaded.values(), base_params))
        assert got["numpy"] == [float(q.numpy().sum()) for q in base_params]
        assert got["list"] == [q.view(-1)[-3:].tolist() for q in base_params]
        print("ok", on_host, len(ptrs))
    """)
    assert "ok" in out, out


@pytest.mark.skipif(TARGET != "cpu", reason="on a GPU an unpinned read of a swapped-out tensor "
                    "is an illegal address that ends the CUDA context")
def test_an_unpinned_read_from_another_thread_faults_with_a_note_naming_pin_reads() -> None:
    """A thread reads a tensor that is on the host without pin_reads(): on the CPU bridge the
    process still dies of SIGSEGV (spill cannot turn a kernel's read into an exception), but
    first the simulated device's fault handler says on stderr what happened and what to use;
    the same read under pin_reads() gives the value."""
    code = quiet_preamble("64MiB") + """
        import sys, threading, time
        enable()
        with st.guard(release_on_exit=False):  # declared swappable
            w = torch.ones(1 << 20) * 2
        def settle():
            spill.evict(w.data_ptr())
            deadline = time.monotonic() + 30
            while spill.residence(w.data_ptr()) != "on_host":
                assert time.monotonic() < deadline, spill.residence(w.data_ptr())
                time.sleep(0.01)
        def read(pinned):
            if pinned:
                with st.pin_reads():
                    print("sum", float(w.sum()), flush=True)
            else:
                print("sum", float(w.sum()), flush=True)
        for pinned in (True, False):
            settle()
            t = threading.Thread(target=read, args=(pinned,))
            t.start()
            t.join()
        print("not reached")
    """
    r = run_code(code)
    assert r.returncode == -11, (r.returncode, r.stdout, r.stderr[-3000:])
    assert r.stdout.count("sum 2097152.0") == 1 and "not reached" not in r.stdout, r.stdout
    assert "spill: segmentation fault at 0x" in r.stderr, r.stderr[-3000:]
    assert "spill.torch.pin_reads()" in r.stderr, r.stderr[-3000:]


@pytest.mark.skipif(TARGET != "cpu", reason="a forked child cannot use CUDA at all")
def test_a_forked_child_reads_only_the_tensors_resident_at_the_fork() -> None:
    """What docs/pytorch.md says of a child forked after enable() (a DataLoader worker), on the
    CPU bridge: a tensor resident at the fork reads its value there; one swapped out at the
    fork is unmapped memory, and reading it kills the child with a segmentation fault (spill
    refuses the child's calls, pins included); the parent goes on. Before, the docs said that
    reading every inherited tensor was fine."""
    out = run_code(quiet_preamble("64MiB") + """
        import os, time
        enable()
        with st.guard(release_on_exit=False):  # declared swappable
            kept = torch.ones(1 << 20) * 2
            moved = torch.ones(1 << 20) * 3
        spill.evict(moved.data_ptr())
        deadline = time.monotonic() + 30
        while spill.residence(moved.data_ptr()) != "on_host":
            assert time.monotonic() < deadline, spill.residence(moved.data_ptr())
            time.sleep(0.01)
        assert spill.residence(kept.data_ptr()) == "resident"
        statuses = []
        for t in (kept, moved):
            pid = os.fork()
            if pid == 0:
                ok = float(t.sum()) == float(t.numel() * (2 if t is kept else 3))
                os._exit(0 if ok else 1)
            statuses.append(os.waitpid(pid, 0)[1])
        assert os.WIFEXITED(statuses[0]) and os.WEXITSTATUS(statuses[0]) == 0, statuses
        assert os.WIFSIGNALED(statuses[1]) and os.WTERMSIG(statuses[1]) == 11, statuses
        with st.guard(release_on_exit=False):
            assert float(moved.sum()) == 3 * (1 << 20)
        print("ok")
    """)
    assert out.returncode == 0 and "ok" in out.stdout, (out.stdout, out.stderr)
    # The child's fault note says what happened there (not the trainer's thread advice).
    assert "in a process forked from the one that runs spill" in out.stderr, out.stderr


def test_models_trained_on_other_threads_one_after_another_train_as_plain_torch() -> None:
    """Each offloaded model trains on a thread of its own, whatever became of the handles
    before (none removed, none collected: the models are kept alive): a model trained on the
    main thread, then one made there and trained on a new thread; one made and trained on a
    thread, then one on the main thread; a model trained on a thread that has ended, then on
    the main thread. Each gives plain torch's losses at a 24 MiB budget (a model's four
    512-wide layers with Adam take about 17 MiB). A forward of a model whose thread still
    runs, on another thread, is refused naming both threads. Before, one window served the
    process, on the thread of the first handle: a forward on any other thread was taken for
    a recomputation inside a backward, and the second model's second step read a weight on
    the host (a segmentation fault on the CPU bridge; sometimes an abort at exit)."""
    out = run_ok(quiet_preamble("24MiB") + """
        import threading
        def make(seed):
            torch.manual_seed(seed)
            m = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)]).to(dev)
            return m, torch.optim.Adam(m.parameters())
        def train(m, opt, steps, losses):
            torch.manual_seed(100)
            x = torch.randn(64, 512, device=dev)
            for _ in range(steps):
                opt.zero_grad()
                loss = m(x).pow(2).mean()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            return losses
        def on_thread(fn, *args):
            t = threading.Thread(target=fn, args=args)
            t.start()
            t.join()
        base = {seed: train(*make(seed), 4, []) for seed in range(4)}
        enable()
        kept, got = [], {}
        def offloaded(seed):
            m, opt = make(seed)
            kept.append((m, opt, st.offload(m, opt)))
            return m, opt
        a = offloaded(0)
        got[0] = train(*a, 4, [])                       # the main thread
        b = offloaded(1)
        on_thread(train, *b, 4, got.setdefault(1, []))  # made here, trained on a thread
        on_thread(lambda: train(*offloaded(2), 4, got.setdefault(2, [])))
        c = offloaded(3)                                # two steps on a thread, which ends,
        on_thread(train, *c, 2, got.setdefault(3, []))  # then two on the main thread
        train(*c, 2, got[3])
        assert got == base, (got, base)
        refused = []
        def forward_elsewhere():
            try:
                a[0](torch.ones(2, 512, device=dev))
            except spill.Error as e:
                refused.append(str(e))
        on_thread(forward_elsewhere)
        assert refused and "'MainThread', which is still running" in refused[0], refused
        assert "handle.remove()" in refused[0], refused
        train(*a, 1, [])                                # and it still trains here
        print("ok", got[0][-1])
    """)
    assert "ok" in out, out


@pytest.mark.skipif(SIZED_FOR_64K, reason="sized for the simulated device's 64 KiB granularity "
                    "(at a GPU's 2 MiB each 1 MiB weight takes 2 MiB)")
def test_a_guard_whose_exit_finds_no_room_keeps_what_is_left_pinned_until_release() -> None:
    """guard(opt) around a loop whose parameters and gradients (12 MiB) exceed an 8 MiB
    budget: its exit raises torch.cuda.OutOfMemoryError (also spill.OutOfMemoryError) that
    says what is left and what to do, having brought back what fit; the rest stays swappable
    and every op of the thread runs pinned meanwhile. After the budget is raised, the loop's
    next step gives plain torch's loss, ``release()`` brings everything back and takes the
    guard's mode off the stack, and plain code runs after it. Before, the exit stopped at the
    first tensor that did not fit: the gradients stayed on the host, swappable, with nothing
    pinning them, and the next step died of a segmentation fault on the CPU bridge."""
    out = run_ok(quiet_preamble("64MiB") + """
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as modes
        def make():
            torch.manual_seed(0)
            m = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)]).to(dev)
            return m, torch.optim.SGD(m.parameters(), lr=0.01), torch.randn(64, 512, device=dev)
        def step():
            opt.zero_grad()
            loss = m(x).pow(2).mean()
            loss.backward()
            opt.step()
            return loss.item()
        m, opt, x = make()
        base = [step() for _ in range(5)]
        del m, opt, x
        enable()
        spill.set_budget("8MiB")
        m, opt, x = make()
        g = st.guard(opt)
        losses = []
        try:
            with g:
                losses += [step() for _ in range(3)]
        except spill.OutOfMemoryError as e:
            assert isinstance(e, torch.cuda.OutOfMemoryError), type(e).__mro__
            message = str(e)
        else:
            raise AssertionError("the exit found room for 12 MiB in 8 MiB")
        assert "of the tensors it made swappable do not fit" in message, message
        assert "call release() on the guard" in message, message
        assert len(modes()) == 1, modes()       # every op of this thread runs pinned
        spill.set_budget("64MiB")
        losses.append(step())
        g.release()
        assert modes() == [], modes()
        assert all(spill.residence(t.data_ptr()) == "resident"
                   for p in m.parameters() for t in (p, p.grad)), "not all brought back"
        losses.append(step())                   # plain code: nothing is swappable now
        g.release()                             # nothing left: does nothing
        assert losses == base, (losses, base)
        print("ok", losses[-1])
    """)
    assert "ok" in out, out


# Evicts every block spill holds that can move and waits for the copies: a tensor that is
# swappable and then read without a pin faults on the CPU bridge (audits 36a, 36b).
# The end of a scenario whose ``train(spilled)`` returns (losses, what it logged..., the final
# parameters): trained without spill, then under it (after enable()); the losses, what it
# logged and the parameters must be plain torch's. ``base`` and ``got`` hold the two results.
TRAINS_AS_PLAIN = """
        base = train(False)
        enable()
        got = train(True)
        assert got[0] == base[0], (got[0], base[0])
        assert got[1:-1] == base[1:-1], (got[1:-1], base[1:-1])
        assert all(torch.equal(a, b) for a, b in zip(got[-1], base[-1]))
"""


# A two-model scenario's train(spilled) run plainly, then enabled under check_pins(collect=True):
# base, base_params (plain torch), losses, quiet, params and check (spill's) for its asserts.
CHECKED_AGAINST_PLAIN = """
        base, _, base_params = train(False)
        enable()
        with st.check_pins(collect=True) as check:
            losses, quiet, params = train(True)
"""


EVICT_ALL = """
        import time
        def evict_all():
            addrs = [b["address"] for s in spill.snapshot()["segments"] for b in s["blocks"]
                     if b["state"] == "active_allocated"]
            for a in addrs:
                spill.evict(a)
            deadline = time.monotonic() + 30
            while any(spill.residence(a) == "swapping_out" for a in addrs) \\
                    and time.monotonic() < deadline:
                time.sleep(0.001)
"""


# Eight 1 MiB tensors made and used under a guard whose exit finds 4 MiB (audit 36a's).
LEFT_BY_AN_EXIT = """
        import io, time
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as modes
        def evict_all(tensors):
            for t in tensors:
                spill.evict(t.data_ptr())
            deadline = time.monotonic() + 30
            while any(spill.residence(t.data_ptr()) == "swapping_out" for t in tensors) \\
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            return [t for t in tensors if spill.residence(t.data_ptr()) == "on_host"]
        def fill(n=8):
            ts = [torch.full((512, 512), float(i), device=dev) for i in range(n)]
            return ts, [t * 1 for t in ts]  # (every one an argument too)
"""


@pytest.mark.parametrize("wrap", ["guard", "offload"])
def test_view_ops_of_a_sparse_tensor_pin_its_indices_and_values(wrap: str) -> None:
    """Ops whose schema says they make a view run without pins under spill's modes, but not
    with a sparse tensor argument: their sparse kernels make new indices and values from the
    argument's (``unsqueeze``, ``_sparse_broadcast_to``, ``transpose`` of a COO tensor). With
    the indices and values moved to the host, each such op under guard(), and under
    offload()'s first step (its dispatch mode), gives plain torch's result. Before, they ran
    unpinned and read the host copy's unmapped memory: a segmentation fault on the CPU bridge
    (review 44r: under guard since views stopped pinning; under offload's modes since they
    did too)."""
    out = run_ok(quiet_preamble("64MiB") + LEFT_BY_AN_EXIT + """
        n = 1 << 16  # (indices 1 MiB, values 256 KiB)
        def sparse():
            i = torch.arange(n, device=dev)
            return torch.sparse_coo_tensor(torch.stack([i, i]), torch.ones(n, device=dev) * 3,
                                           (n, n)).coalesce()
        def views(s):
            return [s.unsqueeze(0).coalesce(), s.t().coalesce(),
                    torch._sparse_broadcast_to(s.unsqueeze(0), [2, n, n]).coalesce()]
        plain = views(sparse())
        enable()
        def check(s):
            parts = [s._indices(), s._values()]
            assert len(evict_all(parts)) == 2, "the sparse tensor's parts stayed resident"
            got = views(s)
            assert all(torch.equal(a._indices(), b._indices()) and
                       torch.equal(a._values(), b._values()) for a, b in zip(got, plain))
        if "%s" == "guard":
            with st.guard(release_on_exit=False):
                s = sparse()
                s * 1  # (an op's argument: its indices and values declared swappable)
                check(s)
        else:
            class M(torch.nn.Module):
                def forward(self, x):
                    s = sparse()
                    s * 1
                    check(s)
                    return x * 2
            m = M()
            h = st.offload(m, None)
            with spill.torch.step():
                m(torch.ones(4, device=dev, requires_grad=True)).sum().backward()
            h.remove()
        print("ok")
    """ % wrap)
    assert "ok" in out, out


def test_what_a_guards_exit_leaves_is_read_pinned_by_host_reads_too() -> None:
    """After an exit that found no room, what is left stays swappable and every op runs
    pinned until release(), as the guide says, and so do the CPU bridge's host reads
    (``.tolist()``, ``torch.save``): before, the exit took the host reads' mode off with it
    and those read a tensor on the host unpinned (a segmentation fault, audit 36a F1)."""
    out = run_ok(quiet_preamble("64MiB") + LEFT_BY_AN_EXIT + """
        enable()
        g = st.guard()
        try:
            with g:
                ts, copies = fill()
                spill.set_budget("4MiB")
        except spill.OutOfMemoryError as e:
            assert "do not fit" in str(e), str(e)
        spill.set_budget("16MiB")
        on_host = evict_all(ts)
        assert on_host, "nothing the exit left went to the host"
        t = on_host[0]
        value = float(next(i for i, u in enumerate(ts) if u is t))
        assert t.tolist()[0][:2] == [value, value]
        evict_all(ts)
        buffer = io.BytesIO()
        torch.save(t, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer), torch.full((512, 512), value))
        spill.set_budget("64MiB")
        g.release()
        assert evict_all(ts + copies) == []
        print("ok")
    """)
    assert "ok" in out, out


def test_a_guards_exit_takes_its_own_mode_off_the_stack() -> None:
    """torch 1.13's exit of a dispatch mode pops the top one. A caller's mode around a guard
    whose exit found no room popped the guard's pins-only mode and stayed on for good, and
    an inner guard's failed exit inside an outer guard left the outer's mode on after both
    exits, declaring every later op's tensors (audit 36a F2). Now each exit takes its own
    mode out wherever it is and the pins-only mode sits at the bottom of the stack: the
    caller's mode and the outer guard come off at their exits, what is left is read pinned
    meanwhile, and nothing made after every exit can move."""
    out = run_ok(quiet_preamble("64MiB") + LEFT_BY_AN_EXIT + """
        enable()
        class Count(TorchDispatchMode):
            n = 0
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Count.n += 1
                return func(*args, **(kwargs or {}))
        g = st.guard()
        with Count():
            try:
                with g:
                    ts, copies = fill()
                    spill.set_budget("4MiB")
            except spill.OutOfMemoryError:
                pass
        assert [type(m).__name__ for m in modes()] == ["_StillPinning"], modes()
        spill.set_budget("12MiB")
        t = evict_all(ts + copies)[0]
        i = next(i for i, u in enumerate(ts + copies) if u is t)
        assert t.sum().item() == 512 * 512 * float(i % 8)
        spill.set_budget("64MiB")
        g.release()
        assert modes() == [], modes()
        seen = Count.n
        torch.ones(3) + 1
        assert Count.n == seen, "the caller's mode still sees ops after its with"
        del ts, copies, t
        outer, inner = st.guard(), st.guard()
        with outer:
            try:
                with inner:
                    ts, copies = fill()
                    spill.set_budget("4MiB")
            except spill.OutOfMemoryError:
                pass
            spill.set_budget("64MiB")
        inner.release()
        assert modes() == [], modes()
        later = torch.randn(512, 512, device=dev) * 2
        assert evict_all([later] + ts + copies) == []
        print("ok")
    """)
    assert "ok" in out, out


def test_a_guards_block_exception_is_not_replaced_by_its_exits_out_of_memory() -> None:
    """The block raises and the exit then finds no room for what it made swappable: the
    block's exception goes on (``except ValueError`` catches it) with the exit's message as
    a note, and what is left stays pinned until release(), as after any exit that found no
    room. Before, the exit's out-of-memory error took its place (audit 36a F3)."""
    out = run_ok(quiet_preamble("64MiB") + LEFT_BY_AN_EXIT + """
        enable()
        g = st.guard()
        try:
            with g:
                ts, copies = fill()
                spill.set_budget("4MiB")
                raise ValueError("the block's own error")
        except ValueError as e:
            notes = getattr(e, "__notes__", [])
            assert any("do not fit" in n for n in notes), notes
        assert [type(m).__name__ for m in modes()] == ["_StillPinning"], modes()
        spill.set_budget("64MiB")
        g.release()
        assert modes() == [] and evict_all(ts + copies) == []
        print("ok")
    """)
    assert "ok" in out, out


@pytest.mark.parametrize("quiet", ["armed", "quiet"])
def test_saved_tensor_hooks_entered_inside_the_forward_keep_offloads_pins(quiet) -> None:
    """The caller's saved-tensor hooks entered inside an offloaded model's forward (audit 39a
    F1): a counting pair that keeps the tensor, ``save_on_cpu()`` (on the CPU bridge it keeps
    the tensor itself) and the two nested (an exception raised inside the inner pair and
    caught under the outer one), each around every block in the parent's forward, and a
    counting pair in a module's own forward. With everything evicted at a hook as each
    backward starts and after each step, training (the first step, then armed steps, or
    quiet ones) gives plain torch's losses, parameters and pack counts. Before, such a pair
    sat above offload's hooks and replaced them (PyTorch calls only the top pair): offload
    never saw a Linear's saved ``weight.t()``, the backward's unpack pinned nothing and its
    ``mm`` read the weight on the host (a segmentation fault on the CPU bridge from the
    second step; check_pins raised UnpinnedUseError). A pair entered while offload's hooks
    are pushed is now pushed chained with them (_caller_hooks.py)."""
    out = run_ok(quiet_preamble("64MiB") + EVICT_ALL + f"""
        quiet = {quiet == "quiet"!r}
        import torch.nn.functional as F
        from torch.autograd.graph import save_on_cpu, saved_tensors_hooks
        counts = [0]
        def pack(t):
            counts[0] += 1
            return t
        def counting():
            return saved_tensors_hooks(pack, lambda t: t)
        class Own(torch.nn.Linear):  # the pair entered and left in a module's own forward
            def forward(self, x):
                with counting():
                    return super().forward(x)
        class Net(torch.nn.Module):
            def __init__(self, kind):
                super().__init__()
                self.kind = kind
                self.blocks = torch.nn.ModuleList(
                    torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU())
                    for _ in range(3))
                self.own = Own(512, 512)
                self.head = torch.nn.Linear(512, 10)
            def forward(self, x):
                for i, b in enumerate(self.blocks):
                    if self.kind == "count":
                        with counting():
                            x = b(x)
                    elif self.kind == "save_on_cpu":
                        with save_on_cpu():
                            x = b(x)
                    else:  # nested, an exception left inside the inner pair
                        with counting():
                            try:
                                with save_on_cpu():
                                    x = b(x)
                                    raise KeyError(i)
                            except KeyError:
                                pass
                            x = torch.tanh(x)
                return self.head(F.relu(self.own(x)))
        def train(kind, spilled):
            torch.manual_seed(0)
            m = Net(kind).to(dev)
            o = torch.optim.SGD(m.parameters(), 0.1, momentum=0.9)
            if spilled:  # everything on the host as each backward starts
                m.head.register_forward_hook(
                    lambda mod, a, out: out.register_hook(lambda g: (evict_all(), g)[1])
                    and None)
                h = st.offload(m, o, quiet=quiet)
            xs = [torch.randn(128, 512, device=dev) for _ in range(5)]
            ys = [torch.randint(0, 10, (128,), device=dev) for _ in range(5)]
            losses, packs = [], []
            for x, y in zip(xs, ys):
                counts[0] = 0
                o.zero_grad()
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                o.step()
                losses.append(loss.item())
                packs.append(counts[0])
                if spilled:
                    evict_all()
            if spilled:
                h.remove()
            return losses, packs, [p.detach().clone() for p in m.parameters()]
        kinds = ("count", "save_on_cpu", "nested")
        base = {{k: train(k, False) for k in kinds}}
        enable()
        for k in kinds:
            before = spill.stats()["swap.bytes_out"]
            losses, packs, params = train(k, True)
            assert losses == base[k][0], (k, losses, base[k][0])
            assert packs == base[k][1] and packs[0] > 0, (k, packs, base[k][1])
            assert all(torch.equal(a, b) for a, b in zip(params, base[k][2])), k
            assert spill.stats()["swap.bytes_out"] > before, k
        print("ok")
    """)
    assert "ok" in out, out


def test_state_a_module_keeps_on_itself_across_steps_is_pinned_by_its_forward() -> None:
    """A module that carries a tensor from one step to the next on itself (``h + self.prev;
    self.prev = h.detach()``, a stateful RNN's or a memory bank's idiom): in armed steps the
    kept tensor is an activation declared swappable, and the module's pre-hook pinned only
    its parameters and arguments, so its forward read it on the host unpinned (audit 36b F2:
    a segmentation fault on the CPU bridge). Its pre-hook now pins the tensors the module
    keeps as attributes; with everything evicted at a hook of the caller's in each forward,
    training gives plain torch's losses and parameters."""
    out = run_ok(quiet_preamble("64MiB") + EVICT_ALL + """
        import torch.nn.functional as F
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.l1, self.l2 = torch.nn.Linear(512, 512), torch.nn.Linear(512, 512)
                self.prev = None
            def forward(self, x):
                h = F.relu(self.l1(x))
                if self.prev is not None:
                    h = h + self.prev
                self.prev = h.detach()
                return self.l2(h)
        def train(spilled):
            torch.manual_seed(0)
            m = Net().to(dev)
            o = torch.optim.SGD(m.parameters(), 0.1)
            if spilled:
                m.l1.register_forward_hook(lambda mod, a, out: evict_all())
                h = st.offload(m, o, quiet=False)
            xs = [torch.randn(128, 512, device=dev) for _ in range(4)]
            losses = []
            for x in xs:
                o.zero_grad()
                loss = m(x).square().mean()
                loss.backward()
                o.step()
                losses.append(loss.item())
            if spilled:
                evict_all()
                h.remove()
            return losses, [p.detach().clone() for p in m.parameters()]
    """ + TRAINS_AS_PLAIN + """
        assert spill.stats()["swap.bytes_out"] > 0
        print("ok")
    """)
    assert "ok" in out, out


@pytest.mark.parametrize("quiet", ["armed", "quiet"])
def test_a_forward_reading_a_weight_the_first_step_did_not_see_reads_it_pinned(quiet) -> None:
    """A parent's forward that reads a child's weight only from the fifth call on (an
    auxiliary term after a warm-up) and a forward hook registered after the second step that
    reads another module's weight: reads the first step did not see, so no pre-hook pins
    them. Read by attribute (``nn.Module.__getattr__``) while the model's training forward
    runs and the owner does not, they are pinned until the module running then ends. With
    everything evicted at a hook in each forward (after the child), training gives plain
    torch's losses and parameters, armed and in quiet steps. Before, both read the weight on
    the host (audit 36b F1: a segmentation fault on the CPU bridge)."""
    out = run_ok(quiet_preamble("64MiB") + EVICT_ALL + f"""
        quiet = {quiet!r}
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                                torch.nn.Linear(512, 512))
                self.head = torch.nn.Linear(512, 512)
                self.calls = 0
            def forward(self, x):
                self.calls += 1
                h = self.body(x)
                if self.calls > 4:
                    h = h + self.body[0].weight.mean(0)
                return self.head(h)
        def train(spilled):
            torch.manual_seed(0)
            m = Net().to(dev)
            o = torch.optim.Adam(m.parameters())
            logged = []
            if spilled:
                m.body[2].register_forward_hook(lambda mod, a, out: evict_all())
                h = st.offload(m, o, quiet=False if quiet == "armed" else 0.5)
            xs = [torch.randn(128, 512, device=dev) for _ in range(6)]
            losses = []
            for i, x in enumerate(xs):
                if i == 2:
                    m.body[0].register_forward_hook(
                        lambda mod, a, out: logged.append(m.head.weight.sum().item()))
                o.zero_grad()
                loss = m(x).square().mean()
                loss.backward()
                o.step()
                losses.append(loss.item())
            if spilled:
                h.remove()
            return losses, logged, [p.detach().clone() for p in m.parameters()]
    """ + TRAINS_AS_PLAIN + """
        assert len(got[1]) == 4, got[1]  # (what was logged)
        print("ok")
    """)
    assert "ok" in out, out


@pytest.mark.skipif(SIZED_FOR_64K, reason="sized for the CPU bridge's 64 KiB granule")
def test_training_in_eval_mode_swaps_activations_as_train_mode_does() -> None:
    """Training with the model in eval mode (``model.eval()``: batch norm and dropout frozen,
    as in fine-tuning) and grad on: its forwards are training forwards, whose saved
    activations move, not evaluation forwards that pin every op. A 6-layer MLP with AdamW at
    9 MiB (train mode fits there) gives plain torch's losses and parameters. Before, it ran
    out of memory in the second step's backward (audit 36f F2)."""
    out = run_ok(quiet_preamble("64MiB") + """
        import torch.nn.functional as F
        def train(spilled):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(64, 512),
                                    *[torch.nn.Sequential(torch.nn.Linear(512, 512),
                                                          torch.nn.ReLU()) for _ in range(4)],
                                    torch.nn.Linear(512, 10)).to(dev)
            o = torch.optim.AdamW(m.parameters(), lr=1e-3)
            if spilled:
                h = st.offload(m, o)
                spill.set_budget(9 << 20)
            m.eval()
            x = torch.randn(1024, 64, device=dev)
            y = torch.randint(0, 10, (1024,), device=dev)
            losses = []
            for _ in range(4):
                o.zero_grad(set_to_none=True)
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                o.step()
                losses.append(loss.item())
            if spilled:
                spill.set_budget(64 << 20)
                h.remove()
            return losses, [p.detach().clone() for p in m.parameters()]
    """ + TRAINS_AS_PLAIN + """
        assert st.memory_stats()["swap.bytes_out"] > 0
        print("ok")
    """)
    assert "ok" in out, out


def test_a_forward_whose_ops_a_mode_pins_reads_another_modules_weight_on_the_host_pinned(
        ) -> None:
    """An evaluation forward (``torch.no_grad()``) and the first step's training forward whose
    parent reads a child's weight with ``.tolist()`` after the child ran and everything was
    evicted: a mode pins every aten op there, but on the CPU bridge ``.tolist()`` reads memory
    without one, and read the weight on the host (audit 36f F1 in an evaluation forward, the
    first step's since: a segmentation fault). Both run the window's host reads too now."""
    out = run_ok(quiet_preamble("64MiB") + EVICT_ALL + """
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = torch.nn.Linear(512, 512), torch.nn.Linear(512, 512)
                self.evicting = False
            def forward(self, x):
                x = self.a(x)
                if self.evicting:
                    evict_all()  # (self.a's call is over: its weight goes too)
                return self.b(x + self.a.weight.tolist()[0][0])
        def run(spilled):
            torch.manual_seed(0)
            m = Net().to(dev)
            o = torch.optim.SGD(m.parameters(), lr=0.1)
            if spilled:
                m.evicting = True
                h = st.offload(m, o, quiet=False)
            x = torch.randn(64, 512, device=dev)
            outs = []
            for _ in range(3):
                o.zero_grad()
                m(x).square().mean().backward()
                o.step()
                with torch.no_grad():
                    outs.append(m(x).sum().item())
            if spilled:
                h.remove()
            return outs
        base = run(False)
        enable()
        assert run(True) == base
        print("ok")
    """)
    assert "ok" in out, out


def test_reads_a_forward_makes_that_no_hook_pins_are_pinned_under_pin_reads() -> None:
    """What the guide says offload does not pin inside a forward, read under
    ``spill.torch.pin_reads()`` as it says: a parent's forward that reads a child's weight
    only from the third step on (the first step saw no such read) and a forward pre-hook
    that logs a gradient's norm between two micro-batches (the gradient is swappable once
    the backward made it). With everything evicted at a hook in each forward, training gives
    plain torch's losses, parameters and logged norms (unpinned, both read a block on the
    host: audit 36b F1, F3)."""
    out = run_ok(quiet_preamble("64MiB") + EVICT_ALL + """
        class Net(torch.nn.Module):
            def __init__(self, spilled):
                super().__init__()
                self.body = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                                torch.nn.Linear(512, 512))
                self.head = torch.nn.Linear(512, 512)
                self.calls, self.spilled = 0, spilled
            def forward(self, x):
                self.calls += 1
                h = self.body(x)
                if self.calls > 4:
                    with (st.pin_reads() if self.spilled else contextlib.nullcontext()):
                        h = h + self.body[0].weight.mean(0)
                return self.head(h)
        import contextlib
        def train(spilled):
            torch.manual_seed(0)
            m = Net(spilled).to(dev)
            o = torch.optim.Adam(m.parameters())
            norms = []
            def log_grad(mod, args):
                if mod.weight.grad is not None:
                    with (st.pin_reads() if spilled else contextlib.nullcontext()):
                        norms.append(mod.weight.grad.norm().item())
            m.head.register_forward_pre_hook(log_grad)
            if spilled:
                m.body[2].register_forward_hook(lambda mod, a, out: evict_all())
                h = st.offload(m, o, quiet=False)
            xs = [torch.randn(128, 512, device=dev) for _ in range(8)]
            losses = []
            for i in range(0, 8, 2):
                o.zero_grad(set_to_none=True)
                for x in xs[i:i + 2]:  # two micro-batches
                    loss = m(x).square().mean()
                    loss.backward()
                    losses.append(loss.item())
                o.step()
            if spilled:
                h.remove()
            return losses, norms, [p.detach().clone() for p in m.parameters()]
    """ + TRAINS_AS_PLAIN + """
        assert len(got[1]) == 4, got[1]  # (the norms logged)
        print("ok")
    """)
    assert "ok" in out, out


def test_check_pins_names_a_read_no_hook_pins_before_any_fault() -> None:
    """spill.torch.check_pins() on the training thread: a forward pre-hook that logs a
    gradient's norm between two micro-batches (a read offload does not pin, audit 36b F3)
    raises UnpinnedUseError naming the op and the gradient's block, with nothing evicted (the
    gradient is resident: unchecked, this run passes here and faults only when the block
    happens to be on the host); collect=True lists it once for all steps, also when the
    gradient is on the host as it is read (the op then runs with it pinned: collecting let it
    run unpinned and the process died of SIGSEGV, audit 38b #1); under pin_reads() nothing is
    found, and the checked training gives plain torch's losses, norms and parameters, in
    offload and in guard mode."""
    out = run_ok(quiet_preamble("64MiB") + """
        import contextlib, time
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                                torch.nn.Linear(512, 512))
                self.head = torch.nn.Linear(512, 512)
            def forward(self, x):
                return self.head(self.body(x))
        def train(mode, pinned, evict=False):
            torch.manual_seed(0)
            m = Net().to(dev)
            o = torch.optim.Adam(m.parameters())
            norms = []
            def log_grad(mod, args):
                if mod.weight.grad is not None:
                    if evict:  # the gradient on the host as it is read
                        ptr = mod.weight.grad.data_ptr()
                        spill.evict(ptr)
                        for _ in range(5000):  # (the copy out runs on its own stream)
                            if spill.residence(ptr) == "on_host":
                                break
                            time.sleep(0.001)
                        assert spill.residence(ptr) == "on_host", spill.residence(ptr)
                    with (st.pin_reads() if pinned else contextlib.nullcontext()):
                        norms.append(mod.weight.grad.norm().item())
            m.head.register_forward_pre_hook(log_grad)
            h = st.offload(m, o, quiet=False) if mode == "offload" else None
            xs = [torch.randn(128, 512, device=dev) for _ in range(8)]
            losses = []
            for i in range(0, 8, 2):
                with (st.guard(release_on_exit=False) if mode == "guard"
                      else contextlib.nullcontext()):
                    o.zero_grad(set_to_none=True)
                    for x in xs[i:i + 2]:  # two micro-batches
                        loss = m(x).square().mean()
                        loss.backward()
                        losses.append(loss.item())
                    o.step()
            if h is not None:
                h.remove()
            # (guard mode: the parameters stay swappable after the steps' guards, so the
            # copies are taken under one too; taken unpinned, check_pins names each clone)
            with (st.guard(release_on_exit=False) if mode == "guard"
                  else contextlib.nullcontext()):
                return losses, norms, [p.detach().clone() for p in m.parameters()]
        base, base_norms, base_params = train("plain", False)
        enable()
        try:
            with st.check_pins():
                train("offload", False)
            raise AssertionError("nothing was found")
        except st.UnpinnedUseError as e:
            assert isinstance(e, spill.Error) and isinstance(e, RuntimeError)
            text = str(e)
        # The raising run's handle, left in a cycle by the exception, keeps the window's modes
        # on (which pin every op) until it is collected: gone, so the runs below get no pin
        # it would give them.
        import gc
        gc.collect()
        # (torch 1.13's Tensor.norm() is aten.norm, torch 2's aten.linalg_vector_norm)
        assert "aten.norm" in text or "aten.linalg_vector_norm" in text, text
        for says in ("argument 0", "float32 [512, 512]", "'grad of head.weight'",
                     "resident now", "pin_reads()"):
            assert says in text, (says, text)
        with st.check_pins(collect=True) as check:
            losses, norms, params = train("offload", False)
        assert len(check.found) == 1 and "'grad of head.weight'" in check.found[0], check.found
        assert losses == base and norms == base_norms  # (nothing was evicted)
        with st.check_pins(collect=True) as check:
            losses, norms, params = train("offload", False, evict=True)
        assert len(check.found) == 1 and "on the host now" in check.found[0], check.found
        assert losses == base and norms == base_norms and len(norms) == 4
        assert all(torch.equal(a, b) for a, b in zip(params, base_params))
        for mode in ("offload", "guard"):
            with st.check_pins(collect=True) as check:
                losses, norms, params = train(mode, True)
            assert check.found == [], (mode, check.found)
            assert losses == base, (mode, losses, base)
            assert norms == base_norms and len(norms) == 4, (mode, norms, base_norms)
            assert all(torch.equal(a, b) for a, b in zip(params, base_params)), mode
        print("ok")
    """)
    assert "ok" in out, out


def test_check_pins_passes_the_ops_that_read_no_bytes_and_names_one_that_does() -> None:
    """Ops that take a tensor for its shape alone (empty_like, zeros_like, new_zeros, ...),
    ask about it (is_pinned, is_same_size) or alias it (set_) read none of its bytes: the check
    lets them pass, as documented; before, its set of them held overload packets and was asked
    about overloads, so it never matched and each was named (audit 38a F3). sum() of the same
    swappable, unpinned tensor is named."""
    out = run_ok(quiet_preamble("64MiB") + """
        enable()
        t = torch.randn(512, 512, device=dev)
        spill.set_swappable(t.data_ptr(), True)  # swappable, no pin: as a gradient between hooks
        with st.check_pins():
            for use in (lambda: torch.empty_like(t), lambda: torch.zeros_like(t),
                        lambda: torch.ones_like(t), lambda: torch.randn_like(t),
                        lambda: torch.full_like(t, 2.0), lambda: t.new_zeros(3),
                        lambda: t.new_empty(3), lambda: t.is_pinned(),
                        lambda: t.is_same_size(t), lambda: torch.empty(0, device=dev).set_(t)):
                use()
            try:
                t.sum()
            except st.UnpinnedUseError as e:
                assert "aten.sum" in str(e), e
            else:
                raise AssertionError("sum() of a swappable tensor with no pin passed")
        spill.set_swappable(t.data_ptr(), False)
        print("ok")
    """)
    assert "ok" in out, out


def test_check_pins_checks_the_bridges_host_reads_as_ops() -> None:
    """On the CPU bridge ``.tolist()``, ``.numpy()`` and printing read a tensor's memory with
    no aten op, and check_pins did not see them (a read of a block on the host faulted with no
    finding: audits 36b F4, 36f F1): each is named now (on a GPU they are copy ops, named as
    any op). Collecting with the block on the host, the reads run with it pinned and give its
    values (the array of ``.numpy()`` keeps it pinned while it lives); under pin_reads() none
    is found."""
    out = run_ok(quiet_preamble("64MiB") + """
        import time
        enable()
        t = torch.randn(512, 512, device=dev)
        expected = t.clone()
        ptr = t.data_ptr()
        spill.set_swappable(ptr, True)  # swappable, no pin: as a gradient between hooks
        reads = [(lambda: t.tolist(), "Tensor.tolist()"), (lambda: str(t), "Tensor.__repr__()")]
        if dev == "cpu":
            reads.append((lambda: t.numpy(), "Tensor.numpy()"))
        with st.check_pins():
            for read, name in reads:
                try:
                    read()
                except st.UnpinnedUseError as e:
                    assert (name if dev == "cpu" else "aten.") in str(e), (name, e)
                    assert "float32 [512, 512]" in str(e) and "resident now" in str(e), e
                else:
                    raise AssertionError(f"{name} of a swappable tensor with no pin passed")
        def to_host():
            spill.evict(ptr)
            for _ in range(5000):  # (the copy out runs on its own stream)
                if spill.residence(ptr) == "on_host":
                    break
                time.sleep(0.001)
            assert spill.residence(ptr) == "on_host", spill.residence(ptr)
        with st.check_pins(collect=True) as check:
            to_host()
            assert t.tolist()[0][:4] == expected[0, :4].tolist()
            if dev == "cpu":
                to_host()
                array = t.numpy()
                spill.evict(ptr)  # (refused while the array holds its pin)
                assert float(array[511][511]) == float(expected[511, 511])
                del array
        if dev == "cpu":
            assert len(check.found) == 2, check.found
            assert all("on the host now" in f for f in check.found), check.found
            assert "Tensor.tolist()" in check.found[0] and "Tensor.numpy()" in check.found[1]
        else:
            assert check.found, check.found
        with st.pin_reads(), st.check_pins():
            for read, name in reads:
                read()
        spill.set_swappable(ptr, False)
        print("ok")
    """)
    assert "ok" in out, out


def test_offload_of_lazy_modules_not_yet_made_says_to_run_a_forward_first() -> None:
    """A model of nn.LazyLinear with no forward run yet: offload() raises
    spill.InvalidArgumentError naming the parameters and the dry run (torch's ValueError came
    from inside offload(), audit 39a F4); after one forward, the model trains as plain torch."""
    out = run_ok(quiet_preamble("64MiB") + """
        import torch.nn.functional as F
        def train(spilled):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.LazyLinear(256), torch.nn.ReLU(),
                                    torch.nn.LazyLinear(10)).to(dev)
            o = torch.optim.Adam(m.parameters())
            x, y = torch.randn(64, 128, device=dev), torch.randint(0, 10, (64,), device=dev)
            if spilled:
                try:
                    st.offload(m, o)
                except spill.InvalidArgumentError as e:
                    assert "'0.weight', '0.bias', '2.weight', ..." in str(e), e
                    assert "run one forward" in str(e), e
                else:
                    raise AssertionError("offload() of unmade lazy parameters passed")
                with torch.no_grad():
                    m(x)  # the dry run
                h = st.offload(m, o, quiet=False)
            losses = []
            for _ in range(3):
                o.zero_grad()
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                o.step()
                losses.append(loss.item())
            if spilled:
                h.remove()
            return losses
        base = train(False)
        enable()
        assert train(True) == base
        print("ok")
    """)
    assert "ok" in out, out


def test_jit_trace_of_an_offloaded_model_passes_its_own_check() -> None:
    """torch.jit.trace (check_trace=True, the default) of an offloaded model in eval mode
    traces, and the trace gives the model's output: on the CPU bridge its check run (an
    evaluation forward) ran under the host reads' function mode, whose Python frame the
    tracer took for the ops' source, and failed with "Graphs differed across invocations"
    (audit 38a F1)."""
    out = run_ok(quiet_preamble("64MiB") + """
        enable()
        m = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10)).to(dev).eval()
        h = st.offload(m)
        x = torch.randn(8, 64, device=dev)
        with torch.no_grad():
            traced = torch.jit.trace(m, x)
            assert torch.equal(traced(x), m(x))
        h.remove()
        print("ok")
    """)
    assert "ok" in out, out


@pytest.mark.parametrize("model", ["mlp", "cnn", "gpt"])
def test_the_models_train_at_a_third_with_every_use_of_a_movable_tensor_pinned(model: str
                                                                                 ) -> None:
    """SPILL_TORCH_CHECK_PINS=report (check_pins on the thread that called enable(), findings
    printed at exit): each model trains at a third of its footprint in offload and in guard
    mode with no op using a tensor spill may move without a pin, whether the tensor was on the
    host then or not, and the checked runs give plain torch's losses and parameters."""
    r = run_python([str(HERE / "torch_bridge_run.py"), model, "offload,guard", "plan",
                    str(STEPS), TARGET], _env({"SPILL_TORCH_CHECK_PINS": "report"}),
                   timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert "every use of a tensor spill may move was pinned" in r.stderr, r.stderr[-6000:]
    result = json.loads(lines[-1][len("RESULT "):])
    for mode in ("offload", "guard"):
        run = result["runs"][mode]
        assert run["losses_equal"] and run["params_equal"], mode
        assert step_delta(run["per_step"], "swap.bytes_out", 0) > 0, mode


def test_check_pins_refuses_what_it_cannot_do() -> None:
    """A SPILL_TORCH_CHECK_PINS that names no mode fails enable() naming the variable, before
    anything changes (spill is not the allocator after it); check_pins before enable() and a
    collect that is not a bool are named errors."""
    out = run_ok(f"""
        import os, torch, spill, spill.torch as st
        try:
            with st.check_pins():
                pass
            raise AssertionError("no error")
        except spill.Error as e:
            assert "enable() first" in str(e), e
        try:
            st.check_pins(collect="yes")
            raise AssertionError("no error")
        except TypeError as e:
            assert isinstance(e, spill.InvalidArgumentError) and "collect" in str(e), e
        os.environ["SPILL_TORCH_CHECK_PINS"] = "loud"
        try:
            st.enable("budget:64MiB", target="{TARGET}")
            raise AssertionError("no error")
        except spill.InvalidArgumentError as e:
            assert "SPILL_TORCH_CHECK_PINS='loud'" in str(e) and "report" in str(e), e
        assert st.is_enabled() is None
        os.environ["SPILL_TORCH_CHECK_PINS"] = " Off "
        st.enable("budget:64MiB", target="{TARGET}")
        assert st.is_enabled() == "{TARGET}"
        print("ok")
    """)
    assert "ok" in out, out


def test_a_plain_models_weights_a_penalty_graph_saved_are_unswappable_once_no_handle_is_left(
        ) -> None:
    """A model no handle knows (plain, in spill's memory) takes a gradient penalty
    (autograd.grad with create_graph) while an offloaded model's handle lives: the window
    declares what the penalty's graph saves, its weight among them (through a view), and pins
    its ops while a handle lives. Once the handle is removed nothing pins them: they are
    unswappable again, and with every block evicted the plain model still gives plain torch's
    output (before: its weight stayed swappable and was read on the host, a segmentation
    fault; found by check_pins in second-order MAML)."""
    out = run_ok(quiet_preamble("256MiB") + EVICT_ALL + """
        def penalty_then(offloaded):
            torch.manual_seed(0)
            a = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                    torch.nn.Linear(512, 512)).to(dev)
            ao = torch.optim.SGD(a.parameters(), lr=0.01)
            b = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Tanh(),
                                    torch.nn.Linear(512, 512)).to(dev)
            h = st.offload(a, ao, quiet=False) if offloaded else None
            x = torch.randn(256, 512, device=dev)
            for _ in range(2):
                ao.zero_grad()
                a(x).square().mean().backward()
                ao.step()
            xr = x.clone().requires_grad_(True)
            g, = torch.autograd.grad(b(xr).sum(), xr, create_graph=True)
            g.square().mean().backward()
            del g
            if h is not None:
                h.remove()
                assert not any(spill.block_info(p.data_ptr()).swappable
                               for p in b.parameters())
                evict_all()
            return b(x).sum().item(), [p.grad.clone() for p in b.parameters()
                                       if p.grad is not None]
        base, base_grads = penalty_then(False)
        enable()
        with st.check_pins(collect=True) as check:
            out, grads = penalty_then(True)
        assert out == base and len(grads) == len(base_grads) == 3
        assert all(torch.equal(g, e) for g, e in zip(grads, base_grads))
        assert check.found == [], check.found
        print("ok")
    """)
    assert "ok" in out, out


def test_checkpointing_in_the_forward_leaves_nothing_behind_and_trains_at_a_third() -> None:
    """Activation checkpointing of every block inside an offloaded model's forward
    (``checkpoint(block, x, use_reentrant=...)``, both ways), activations of 256 KiB (above
    the 128 KiB swap threshold). With no budget pressure, after each step (and a collection)
    the bytes allocated are the same from the second step on, and after remove() the model
    goes and everything it allocated with it. At a third of the footprint, losses and final
    parameters are plain torch's, with bytes swapped. Before, with use_reentrant=False, each
    step left its recomputed blocks' arguments behind (0.75 MiB more a step) and the model
    outlived its last reference (the hook on a recomputed call's argument kept a hold whose
    pins kept tensors whose graph reached that hook: a cycle through autograd's nodes); with
    use_reentrant=True every recomputed block stayed pinned until the backward ended (the
    inputs it recomputes from are leaves it detached, which got no hook): out of memory."""
    out = run_ok(quiet_preamble("1GiB") + """
        import gc, weakref
        from torch.utils.checkpoint import checkpoint
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = torch.nn.ModuleList(
                    torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                        torch.nn.Linear(512, 512)) for _ in range(4))
                self.inp = torch.nn.Linear(512, 512)  # (reentrant: an input needing grad)
                self.head = torch.nn.Linear(512, 10)
            def forward(self, x):
                x = self.inp(x)
                for b in self.blocks:
                    x = x + checkpoint(b, x, use_reentrant=REENTRANT)
                return self.head(x)
        def train(wrap, budget=None, steps=6):
            torch.manual_seed(0)
            m = Net().to(dev)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            h = wrap(m, opt)
            if budget:
                spill.set_budget(budget)
            g = torch.Generator().manual_seed(1)
            losses, after = [], []
            for _ in range(steps):
                x = torch.randn(128, 512, generator=g).to(dev)
                y = torch.randint(0, 10, (128,), generator=g).to(dev)
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                del x, y, loss
                gc.collect()
                if h is not None:
                    after.append(st.memory_allocated())
            params = [p.detach().cpu().numpy().copy() for p in m.parameters()] if not h else []
            return losses, params, m, opt, h, after
        base = {}
        for REENTRANT in (False, True):
            base[REENTRANT] = train(lambda m, o: None)[:2]
        enable()
        for REENTRANT in (False, True):
            gc.collect()
            spill.set_budget(1 << 30)
            start = st.memory_allocated()
            st.reset_peak_memory_stats()
            losses, _, m, opt, h, after = train(st.offload)
            footprint = st.max_memory_allocated() - start
            assert losses == base[REENTRANT][0], REENTRANT
            assert len(set(after[1:])) == 1, (REENTRANT, after)
            h.remove()
            gone = weakref.ref(m)
            del m, opt, h
            gc.collect()
            assert gone() is None, (REENTRANT, "the model outlived its last reference")
            assert st.memory_allocated() == start, (REENTRANT, st.memory_allocated(), start)
            before = spill.stats()["swap.bytes_out"]
            losses, _, m, opt, h, _ = train(st.offload, footprint // 3)
            assert losses == base[REENTRANT][0], (REENTRANT, losses, base[REENTRANT][0])
            with st.guard(release_on_exit=False):
                same = [bool((p.detach().cpu().numpy() == q).all())
                        for p, q in zip(m.parameters(), base[REENTRANT][1])]
            assert all(same), (REENTRANT, "final parameters differ from plain torch")
            assert spill.stats()["swap.bytes_out"] > before, REENTRANT
            spill.set_budget(1 << 30)
            h.remove()
            del m, opt, h
            print("ok", REENTRANT, footprint, after[-1])
    """)
    assert out.count("ok ") == 2, out


def test_host_reads_under_guard_of_tensors_on_the_host_read_plain_values() -> None:
    """Under guard(), an optimizer's state tensor and a weight moved to the host are read by
    ``.tolist()``, ``.numpy()``, printing and ``torch.save`` (of the tensor and of the
    optimizer's state_dict) with no op before the read to bring them back: each gives the
    values they had before they moved. Before, on the CPU bridge, where those read tensor
    memory directly (on a GPU they copy with an op, which guard's mode pins), ``.tolist()``
    and ``torch.save`` of the state were a segmentation fault; guard now runs the window's
    host reads too. After the exit no function mode of spill's is left on PyTorch's stack."""
    out = run_ok(quiet_preamble("64MiB") + SETTLE + """
        import io
        from torch.overrides import _get_current_function_mode_stack as functions
        enable()
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10)).to(dev)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        x, y = torch.randn(64, 512, device=dev), torch.randint(0, 10, (64,), device=dev)
        with st.guard(opt):
            for _ in range(2):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
            w, state = m[0].weight, opt.state[m[0].weight]["exp_avg"]
            with st.pin_reads():
                want = (w.detach().cpu().numpy().copy(), state.detach().cpu().numpy().copy())
            def moved():
                return settle([w, state]) == 2 or dev == "cuda"
            reads = {
                "tolist": lambda: torch.tensor(state.tolist()),
                "numpy": lambda: torch.from_numpy(state.numpy().copy()),
                "print": lambda: str(state).replace(", device='cuda:0'", "")
                    == str(torch.from_numpy(want[1])),
                "save": lambda: torch.load(save(state)),
                "save_weight": lambda: torch.load(save(w)).detach(),
                "save_state_dict": lambda: torch.load(save(opt.state_dict()))["state"][0][
                    "exp_avg"],
            }
            def save(obj):
                buf = io.BytesIO()
                torch.save(obj, buf)
                buf.seek(0)
                return buf
            for name, read in reads.items():
                assert moved(), name
                got = read()
                if name == "print":
                    assert got, name
                    continue
                expect = want[0] if name == "save_weight" else want[1]
                assert torch.equal(got.cpu(), torch.from_numpy(expect)), name
        assert functions() == [], functions()
        print("ok", len(reads))
    """)
    assert "ok 6" in out, out


def test_a_callers_dispatch_mode_around_the_first_step_goes_with_its_with() -> None:
    """A TorchDispatchMode of the caller's entered around a step's forward and backward (an op
    counter; a mode emulating low precision) leaves the stack at the end of its ``with``, the
    first step's too, and sees no op outside it (the optimizer's step). Before, offload's
    first-step mode was pushed above it, torch 1.13's exit popped that one instead, and the
    caller's mode stayed on for the rest of the process (a bf16-rounding mode around the first
    step rounded every later matmul: losses left plain torch's)."""
    out = run_ok(quiet_preamble("64MiB") + """
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as modes
        enable()
        class Count(TorchDispatchMode):
            n = 0
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Count.n += 1
                return func(*args, **(kwargs or {}))
        m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10)).to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        h = st.offload(m, opt)
        x = torch.randn(64, 512, device=dev)
        y = torch.randint(0, 10, (64,), device=dev)
        for i in range(3):
            opt.zero_grad()
            with Count():
                torch.nn.functional.cross_entropy(m(x), y).backward()
            assert not any(isinstance(md, Count) for md in modes()), (i, modes())
            seen = Count.n
            opt.step()
            assert Count.n == seen, (i, "the caller's mode saw the step outside its with")
        h.remove()
        print("ok")
    """)
    assert "ok" in out, out


def test_a_guards_record_of_what_it_declared_drops_freed_blocks() -> None:
    """guard() keeps (block, generation) of each argument it declared, to bring them back at
    exit; over a long run with ever new addresses it grew for good (audit 35a: 2,197 entries
    after 1,500 steps, 98% freed blocks). Entries of freed blocks (or of an address another
    block holds now) are dropped as the record doubles; live ones stay, and exit brings them
    back as before."""
    out = run_ok(quiet_preamble("64MiB") + """
        enable()
        x = torch.ones(256 * 1024, device=dev)
        with st.guard() as g:
            x.add_(1)
            mode = g._mode
            base = spill.generation(x.data_ptr())
            assert mode.declared == {x.data_ptr(): base}, mode.declared
            # freed blocks' entries, as a long run leaves (addresses spill does not hold)
            mode.declared.update({4096 * (i + 1): 7 for i in range(1100)})
            y = torch.ones(256 * 1024, device=dev)
            y.add_(1)  # a new entry past the line prunes the record
            assert mode.declared == {x.data_ptr(): base, y.data_ptr(): spill.generation(
                y.data_ptr())}, len(mode.declared)
        assert spill.residence(x.data_ptr()) == "resident"
        assert x.sum().item() == 2 * 256 * 1024
        print("ok")
    """)
    assert "ok" in out, out


def test_what_a_guards_ops_make_is_unswappable_after_its_exit() -> None:
    """An output made inside a guard that no later op inside takes (``y = model(x)`` under a
    guard, read after it; a list of them) is brought back and made unswappable at the exit,
    as the guard's arguments are: an eviction asked for after the exit moves none of them, and
    code after the guard reads them. Before, they stayed swappable and a swap-out unmapped
    them (reading one after the exit faulted on the CPU bridge)."""
    out = run_ok(quiet_preamble("64MiB") + """
        import time
        enable()
        w = torch.randn(512, 512, device=dev)
        x = torch.randn(256, 512, device=dev)
        with st.guard():
            y = x @ w
            kept = [x * float(i) for i in range(3)]
        for t in [y] + kept:
            spill.evict(t.data_ptr())
        deadline = time.monotonic() + 30
        while any(spill.residence(t.data_ptr()) == "swapping_out" for t in [y] + kept) \\
                and time.monotonic() < deadline:
            time.sleep(0.01)
        where = [spill.residence(t.data_ptr()) for t in [y] + kept]
        assert where == ["resident"] * 4, where
        assert torch.equal(y, x @ w) and all(torch.equal(k, x * float(i))
                                               for i, k in enumerate(kept))
        print("ok")
    """)
    assert "ok" in out, out


def test_a_guard_entered_again_while_it_runs_is_refused_and_leaves_no_mode() -> None:
    """``g = guard(); with g: with g: ...``: the inner entry raises spill.Error saying the
    guard is already entered; the outer exit then leaves PyTorch's dispatch stack as it was,
    and the guard can be entered again afterwards. Before, the outer exit raised a bare
    AssertionError and left a PinEveryOp on the stack for the rest of the process."""
    out = run_ok(quiet_preamble("16MiB") + """
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as modes
        enable()
        m = torch.nn.Linear(512, 512).to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        x = torch.randn(64, 512, device=dev)
        def step():
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
        g = st.guard(opt)
        try:
            with g:
                with g:
                    step()
        except spill.Error as e:
            assert "already entered" in str(e), e
        else:
            raise AssertionError("entered twice")
        assert modes() == [], modes()
        with g:
            step()
        assert modes() == [], modes()
        step()
        print("ok")
    """)
    assert "ok" in out, out


@pytest.mark.parametrize("how", ["armed", "quiet", "no_optimizer"])
def test_an_exception_escaping_a_forward_leaves_a_clean_state(how: str) -> None:
    """A forward that raises midway (a check the caller catches), in the first step and in a
    later one: at once, nothing of it is left (allocated bytes and pinned bytes as before it,
    no saved-tensor hook left: plain torch code run next declares nothing, so spill moves none
    of its tensors; no pin left: every weight can move), and training goes on equal to plain
    torch without the failed calls. Three cases: armed (quiet=False) with Adam at a 12 MiB
    budget, half of the 24 MiB its three weights, their gradients and Adam's state take;
    quiet (quiet=True, 0.5) at 128 MiB, where steps after the first run quiet; and without an
    optimizer (SGD's step runs in the window, a step begins at each forward), armed at 12 MiB,
    about its weights and gradients. The weights are 724 x 724 floats (2 MiB
    blocks on a GPU and on the simulated device alike) and the batches 32 rows (small-pool
    blocks): the budgets fit both, on CUDA with cuBLAS's workspaces small too
    (CUDA_WORKSPACES: at 512 KiB three of them took 6 MiB of the 12, GPU run 2026-12-04).
    Adam runs torch's default in both runs (on CUDA the foreach kernels, which offload runs
    too, over chunks of parameters under pressure; the quiet case's last loss differed in its
    last digits on the GPU on 2026-12-04, when offload ran the per-parameter loop instead)."""
    out = run_ok(quiet_preamble("1GiB") + SETTLE + f"""
        import gc
        how = "{how}"
        class Check(torch.nn.Module):
            def forward(self, x):
                if x.shape[0] == 7:
                    raise ValueError("a batch of 7")
                return x
        def state():
            if not spill_runs:
                return None
            gc.collect()
            s = spill.stats()
            return s["allocated_bytes.current"], s["swap.pinned_bytes"]
        def train(wrap=None):
            torch.manual_seed(0)
            plain = torch.nn.Linear(724, 724).to(dev)  # no hook on it
            m = torch.nn.Sequential(torch.nn.Linear(724, 724), torch.nn.ReLU(),
                                    torch.nn.Linear(724, 724), torch.nn.ReLU(), Check(),
                                    torch.nn.Linear(724, 724)).to(dev)
            if how == "no_optimizer":  # its step runs in the window: each op pinned
                opt = torch.optim.SGD(m.parameters(), lr=1e-2)
            else:
                opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            h = wrap(m, None if how == "no_optimizer" else opt) if wrap else None
            g = torch.Generator().manual_seed(1)
            losses, left = [], []
            for i in range(5):
                x = torch.randn(32, 724, generator=g).to(dev)
                y = torch.randn(32, 724, generator=g).to(dev)
                if i in (0, 2):
                    before = state()
                    try:
                        m(torch.ones(7, 724).to(dev))
                        raise AssertionError("no exception")
                    except ValueError:
                        pass
                    z = plain(x).relu()  # plain torch: nothing of it may move
                    moved = settle([z])
                    z.sum().backward()
                    z = None
                    plain.zero_grad(set_to_none=True)
                    left.append((before, state(), moved, settle(list(m.parameters()))))
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            return losses, m, h, left
        def settle(tensors, move=settle):
            return move(tensors) if spill_runs else 0
        spill_runs = False
        base, bm, _, _ = train()
        base_params = [p.detach().cpu().clone() for p in bm.parameters()]
        del bm  # on a GPU the baseline ran in spill's memory: it must not hold the budgets
        enable()
        spill_runs = True
        quiet = how == "quiet"
        def wrap(m, o):
            h = st.offload(m, o, quiet=quiet)
            spill.set_budget((128 if quiet else 12) << 20)
            return h
        before = spill.stats()
        losses, m, h, left = train(wrap)
        after = spill.stats()
""" + MATCHES_PLAIN_TORCH + """
        for was, now, moved, weights in left:  # nothing pins the weights: all three move
            # (Without an optimizer a forward begins a step: the last one's outputs go.)
            assert now[0] == was[0] and now[1] <= was[1], (was, now)
            assert moved == 0 and weights == 3, (moved, weights)
        assert h.quiet_steps > 0 if quiet else h.quiet_steps == 0, h.quiet_steps
        spill.set_budget(1 << 30)
        h.remove()
        print("ok", left)
    """)
    assert "ok" in out


@pytest.mark.parametrize("backward_thread", [False, True])
def test_a_checkpointed_function_reading_its_input_before_any_module_trains_as_plain_torch(
        backward_thread: bool) -> None:
    """Non-reentrant activation checkpointing (``checkpoint(fn, x, use_reentrant=False)``) of
    functions whose own code reads the region's input (and weights) outside every module:
    ``F.relu(F.linear(h, l.weight, l.bias))`` (no module call at all), ``F.relu(l(F.gelu(h)))``
    (an op before the module call), ``h + F.relu(l(F.layer_norm(h, ...)))``, a statistic of
    the input under ``torch.no_grad()`` before the module (review 39d: not pinned while only
    calls with grad enabled were looked at) and a module that raises before ``l(F.gelu(h))``
    (as torch 2 stops a recomputation: its call was taken as running and the gelu skipped,
    review 39d), in armed steps
    (``quiet=False``) with everything evicted as each backward starts. The recomputation's own
    ops pin what they use into the region's hold (_recompute.py, _window._RecomputedOps):
    losses and parameters are plain torch's, with bytes swapped, and check_pins finds nothing.
    Before, only recomputed modules pinned: the recomputation read the region's input (the
    batch, declared swappable at the entry) on the host unpinned (audit 39a F2: a segmentation
    fault on the CPU bridge; under check_pins, UnpinnedUseError on addmm, gelu,
    native_layer_norm). Also with each backward on a thread of its own (backward_thread_env),
    as CUDA's device thread runs them: the engine carries the function mode there."""
    out = run_ok(quiet_preamble("64MiB") + EVICT_ALL + """
        import torch.nn.functional as F
        from torch.utils.checkpoint import checkpoint
        class Stop(torch.nn.Module):  # a module that raises, as torch 2 stops a recomputation
            def forward(self):
                raise KeyError("stop")
        def no_grad_first(h, l, stop):
            with torch.no_grad():  # a statistic of the input, before any module
                scale = 1.0 + float(h.abs().amax() > 1e9)
            return F.relu(l(h)) * scale
        def stopped_then_gelu(h, l, stop):
            try:
                stop()  # (its forward hook never runs: the module stays "running")
            except KeyError:
                pass
            return l(F.gelu(h))
        KINDS = {
            "function": lambda h, l, stop: F.relu(F.linear(h, l.weight, l.bias)),
            "gelu_first": lambda h, l, stop: F.relu(l(F.gelu(h))),
            "residual": lambda h, l, stop: h + F.relu(l(F.layer_norm(h, (512,)))),
            "no_grad_first": no_grad_first,
            "stopped_then_gelu": stopped_then_gelu,
        }
        class Net(torch.nn.Module):
            def __init__(self, fn):
                super().__init__()
                self.fn = fn
                self.ls = torch.nn.ModuleList(torch.nn.Linear(512, 512) for _ in range(4))
                self.stop = Stop()
                self.head = torch.nn.Linear(512, 10)
            def forward(self, x):
                for l in self.ls:
                    x = checkpoint(self.fn, x, l, self.stop, use_reentrant=False)
                return self.head(x)
        def train(kind, spilled):
            torch.manual_seed(0)
            m = Net(KINDS[kind]).to(dev)
            o = torch.optim.Adam(m.parameters(), lr=1e-3)
            h = None
            if spilled:  # everything evicted as the backward starts
                m.head.register_forward_hook(
                    lambda mod, a, out: out.register_hook(lambda g: (evict_all(), g)[1]) and None)
                h = st.offload(m, o, quiet=False)
            g = torch.Generator().manual_seed(1)
            losses = []
            for _ in range(4):
                x = torch.randn(128, 512, generator=g).to(dev)
                y = torch.randint(0, 10, (128,), generator=g).to(dev)
                o.zero_grad()
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                o.step()
                losses.append(loss.item())
            return losses, m, h
        plain = {}
        for kind in KINDS:
            losses, m, _ = train(kind, False)
            plain[kind] = (losses, [p.detach().clone() for p in m.parameters()])
        enable()
        for kind in KINDS:
            base, base_params = plain[kind]
            before = spill.stats()
            losses, m, h = train(kind, True)
            after = spill.stats()
""" + textwrap.indent(MATCHES_PLAIN_TORCH, "    ") + """
            assert h.quiet_steps == 0, h.quiet_steps
            h.remove()
            with st.check_pins(collect=True) as check:
                losses, m, h = train(kind, True)
            assert losses == base, (kind, losses, base)
            assert check.found == [], (kind, check.found)
            h.remove()
            print("ok", kind)
    """, backward_thread_env() if backward_thread else None)
    assert out.count("ok ") == 5, out


# ------------------------------------------------------------------ training-loop patterns

# The loops users run beside the plain one, each in models small enough for a few steps on a
# CPU core (`pattern` picks one): activation checkpointing (reentrant, non-reentrant,
# checkpoint_sequential), bf16 autocast, steps a loop skips (GradScaler's on inf/NaN
# gradients), frozen parameters, progressive unfreezing (add_param_group, gradients kept and
# accumulated), an LM head tied to the embedding, a block used twice in one forward, a GAN
# (two models, two optimizers, .detach() between them), one optimizer over two models, the
# model called twice before one backward (siamese) and a gradient penalty (autograd.grad with
# create_graph, on the batch or on a mix of two).
# run(pattern, wrap, steps, mid) trains from seed 0 and returns the losses, the models and
# what wrap(model, optimizer) returned for each pair; mid(models) runs between each forward
# and its backward.
LOOP_PATTERNS = textwrap.indent("""
import torch.nn as nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential
W, B = 512, 32
class Scale(nn.Module):  # autograd saves the factor as a wrapped number (a 0-dim tensor)
    def forward(self, x):
        return x * 0.5
class Net(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.inp = nn.Linear(W, W)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(W, W), nn.ReLU(), nn.Linear(W, W),
                                                    Scale(), nn.ReLU()) for _ in range(3)])
        self.head = nn.Linear(W, 16)
    def forward(self, x):
        x = self.inp(x)
        if self.how in ("reentrant", "non_reentrant"):
            for b in self.blocks:
                x = checkpoint(b, x, use_reentrant=self.how == "reentrant")
        elif self.how == "sequential":
            x = checkpoint_sequential(self.blocks, 2, x)
        else:
            x = self.blocks(x)
            if self.how == "twice":  # the first block's weights used twice in one forward
                x = self.blocks[0](x)
        return self.head(x)
class TiedLM(nn.Module):  # lm_head.weight is the embedding's weight: one parameter, two owners
    def __init__(self, vocab=2048, d=256):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(),
                                                  nn.Linear(4 * d, d)) for _ in range(4)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
    def forward(self, ids):
        return self.lm_head(self.body(self.wte(ids)))
def mlp(i, o):
    return nn.Sequential(nn.Linear(i, W), nn.ReLU(), nn.Linear(W, W), nn.ReLU(),
                         nn.Linear(W, W), nn.ReLU(), nn.Linear(W, o))
def run(pattern, wrap=lambda m, o: None, steps=4, mid=lambda ms: None):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    def batch(*shape, classes=None):
        t = (torch.randint(0, classes, shape, generator=g) if classes else
             torch.randn(*shape, generator=g))
        return t.to(dev)
    ce = nn.functional.cross_entropy
    losses = []
    if pattern == "gan":
        G, D = mlp(64, W).to(dev), mlp(W, 1).to(dev)
        og, od = (torch.optim.Adam(m.parameters(), lr=1e-3) for m in (G, D))
        hs = [wrap(G, og), wrap(D, od)]
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(B, 1).to(dev), torch.zeros(B, 1).to(dev)
        for i in range(steps):
            real, z = batch(B, W), batch(B, 64)
            fake = G(z)
            od.zero_grad()
            ld = bce(D(real), ones) + bce(D(fake.detach()), zeros)
            mid([G, D])
            ld.backward()
            od.step()
            og.zero_grad()
            lg = bce(D(fake), ones)  # D's gradients too: od.zero_grad() discards them
            lg.backward()
            og.step()
            losses.append((ld.item(), lg.item()))
        return losses, [G, D], hs
    if pattern == "one_optimizer":
        A, C = mlp(W, W).to(dev), mlp(W, 16).to(dev)
        opt = torch.optim.Adam(list(A.parameters()) + list(C.parameters()), lr=1e-3)
        hs = [wrap(A, opt), wrap(C, opt)]
        for i in range(steps):
            x, y = batch(B, W), batch(B, classes=16)
            opt.zero_grad()
            loss = ce(C(A(x)), y)
            mid([A, C])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [A, C], hs
    if pattern == "tied":
        m = TiedLM().to(dev)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        hs = [wrap(m, opt)]
        for i in range(steps):
            ids = batch(8, 65, classes=2048)
            opt.zero_grad()
            loss = ce(m(ids[:, :-1]).reshape(-1, 2048), ids[:, 1:].reshape(-1))
            mid([m])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [m], hs
    m = Net(pattern).to(dev)
    if pattern in ("loose", "outer"):
        # Parameters of the optimizer's outside the offloaded model, their gradients kept
        # (zero_grad(set_to_none=False)): a cosine classifier's weight beside the backbone
        # (ArcFace), or a layer of a wrapper around it that the loop calls.
        extra = (nn.Parameter(torch.randn(1024, W, generator=g).to(dev) * 0.01)
                 if pattern == "loose" else nn.Linear(W, W).to(dev))
        ps = [extra] if pattern == "loose" else list(extra.parameters())
        opt = torch.optim.Adam(list(m.parameters()) + ps, lr=1e-3)
        hs = [wrap(m, opt)]
        for i in range(steps):
            x, y = batch(B, W), batch(B, classes=16)
            opt.zero_grad(set_to_none=False)
            if pattern == "loose":
                out = nn.functional.linear(nn.functional.normalize(m.inp(x)),
                                           nn.functional.normalize(extra)) * 16
                loss = ce(m(out[:, :W]), y)
            else:
                loss = ce(m(torch.relu(extra(x))), y)
            mid([m])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [m, extra] if pattern == "outer" else [m, nn.ParameterList(ps)], hs
    if pattern == "in_backward":  # the optimizer in the backward: one optimizer a parameter,
        # stepped by a hook once its gradient is accumulated (PyTorch's tutorial; LOMO)
        opts = [torch.optim.SGD([p], lr=1e-2, momentum=0.9) for p in m.parameters()]
        hs = [wrap(m, opts)]
        m.accumulators = []  # (kept by the model: on a parameter, a cycle gc cannot see)
        for p, o in zip(m.parameters(), opts):
            def step(*_, p=p, o=o):
                o.step()
                p.grad = None
            if hasattr(p, "register_post_accumulate_grad_hook"):
                p.register_post_accumulate_grad_hook(step)
            else:  # torch 1.13: a hook on the parameter's AccumulateGrad node
                m.accumulators.append(p.expand_as(p).grad_fn.next_functions[0][0])
                m.accumulators[-1].register_hook(step)
        for i in range(steps):
            x, y = batch(B, W), batch(B, classes=16)
            loss = ce(m(x), y)
            mid([m])
            loss.backward()
            losses.append(loss.item())
        return losses, [m], hs
    frozen = list(m.inp.parameters()) + list(m.blocks[0].parameters())
    if pattern in ("frozen", "unfreeze"):
        for p in frozen:
            p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    hs = [wrap(m, opt)]
    for i in range(steps):
        if pattern == "unfreeze" and i == 2:  # progressive unfreezing, a lower rate for them
            for p in frozen:
                p.requires_grad_(True)
            opt.add_param_group({"params": frozen, "lr": 1e-4})
        opt.zero_grad(set_to_none=pattern != "unfreeze")
        for _ in range(2 if pattern == "unfreeze" else 1):  # unfreeze: accumulates two
            x, y = batch(B, W), batch(B, classes=16)
            if pattern == "autocast":
                with torch.autocast(dev, dtype=torch.bfloat16):
                    out = m(x)
                loss = ce(out.float(), y)
            elif pattern == "siamese":  # the model called twice before one backward
                loss = (m(x) - m(batch(B, W))).square().mean()
            elif pattern in ("adversarial", "two_losses"):
                # Two losses summed: each entry's output is freed when its loss is made, its
                # graph lives on in the loss. adversarial (FGSM): a forward and a backward on
                # the input first, then the model on the batch and on the perturbed batch.
                x2 = batch(B, W)
                if pattern == "adversarial":
                    xa = x.clone().requires_grad_(True)
                    ce(m(xa), y).backward()
                    x2 = (x + 0.01 * xa.grad.sign()).detach()
                    opt.zero_grad()
                loss = ce(m(x), y) + ce(m(x2), y)
            elif pattern in ("penalty", "interpolate"):  # a gradient penalty (WGAN-GP, R1)
                if pattern == "interpolate":  # on a mix of two batches, as WGAN-GP's
                    a = torch.rand(B, 1, generator=g).to(dev)
                    x = a * x + (1 - a) * batch(B, W)
                x.requires_grad_(True)
                out = m(x)
                grad, = torch.autograd.grad(out.sum(), x, create_graph=True)
                loss = out.mean() + (grad.norm(2, dim=1) - 1).square().mean()
            else:
                loss = ce(m(x), y)
            mid([m])
            loss.backward()
            if pattern == "scaled_grads":  # gradients replaced in the loop's code (unscaled
                for p in m.parameters():  # by hand): new tensors, not the backward's
                    p.grad = p.grad * 0.5
        if not (pattern == "skip" and i in (0, 2)):  # as GradScaler skips inf/NaN steps
            opt.step()
        losses.append(loss.item())
    return losses, [m], hs
def params(models):
    with (st.guard(release_on_exit=False) if spill_runs else contextlib.nullcontext()):
        return [p.detach().cpu().clone() for m in models for p in m.parameters()]
def same_params(models, expected):
    # Compared under the guard: a clone made under guard(release_on_exit=False) stays
    # swappable, and read outside it (torch.equal after params()) it was a use without a pin
    # (check_pins found it).
    with st.guard(release_on_exit=False):
        return [torch.equal(p.detach().cpu(), q)
                for p, q in zip([p for m in models for p in m.parameters()], expected)]
""", " " * 8)


@pytest.mark.parametrize("group", ["checkpoint", "precision", "finetune", "two_models",
                                   "penalty", "two_losses", "in_backward", "outside",
                                   "two_models_backward_thread", "penalty_backward_thread",
                                   "in_backward_backward_thread"])
def test_training_loop_patterns_train_as_plain_torch_at_a_third_of_the_footprint(
        group: str) -> None:
    """offload(model, optimizer) in the loops of LOOP_PATTERNS, each at a third of its
    footprint (armed steps): losses and final parameters are plain torch's (torch.equal),
    bytes were swapped out and steps followed a plan (also under guard() for the reentrant
    and non-reentrant checkpointing and the autocast loops); the checkpointing loops also
    with no budget pressure (quiet steps) and every weight moved to the host between each
    forward and its backward, so that the recomputation must bring them back. Before the fix,
    non-reentrant checkpointing raised "Attempt to retrieve a tensor saved by autograd
    multiple times" (offload's saved-tensor hooks were pushed above checkpoint's in the
    recomputation; the first step's pin-every-op mode, and guard(), refused the detach()
    of the wrapped number a scalar multiply saves, which non-reentrant checkpointing's
    recomputation calls), and unfreezing parameters and accumulating into their kept
    gradients crashed (no gradient hook pinned them: a segmentation fault), and the model called
    twice before one backward (siamese) ran out of memory (the first part of each weight's
    gradient waited in autograd's buffer, undeclared, through the other graph's backward);
    so did two losses summed (``ce(m(x), y) + ce(m(x2), y)``, also after a forward and
    backward on the input as FGSM's adversarial training makes), until the parts were also
    looked for when the backward begins (the first entry's output was gone by the second
    entry's end, and with it what its graph was examined from). The optimizer in the backward
    (one optimizer a parameter, stepped by a gradient hook) ran out of memory: the step ended
    in the backward, whose leaving the first step's mode the engine undid when the backward
    returned, and that mode pinned every weight through every later step. Parameters of the
    optimizer's outside the model (a loose cosine-classifier weight, a wrapper's layer around
    it) with gradients kept across steps crashed (their gradients were made swappable, but
    only the model's parameters had the hook that pins one before AccumulateGrad adds into
    it: a segmentation fault). Gradients replaced in the loop's code (``p.grad = p.grad *
    0.5``, the scaled_grads loop) train too; in audit 29a's loop (a 5-block model returning
    two activations the loop kept, at 9.38 MiB) they ran out of memory, the step's region
    making them all unswappable again first (this loop did not reproduce that).
    Batches of 32 rows: the blocks are the same at a GPU's 2 MiB granularity
    (SPILL_TEST_SIM_GRANULARITY=2MiB passes). The two-model, penalty and in-backward loops also with each
    backward on a thread of its own (backward_thread_env), as CUDA's device thread runs them."""
    backward_thread = group.endswith("_backward_thread")
    group = group.removesuffix("_backward_thread")
    patterns = {"checkpoint": ["reentrant", "non_reentrant", "sequential"],
                "precision": ["autocast", "skip", "scaled_grads"],
                "finetune": ["frozen", "unfreeze", "tied", "twice"],
                "two_models": ["gan", "one_optimizer", "siamese"],
                "in_backward": ["in_backward"],
                "outside": ["loose", "outer"],
                "two_losses": ["adversarial", "two_losses"],
                "penalty": ["penalty", "interpolate"]}[group]
    out = run_ok(quiet_preamble("1GiB") + LOOP_PATTERNS + SETTLE + f"""
        import contextlib, gc
        spill_runs = False
        patterns = {patterns!r}
        base = {{}}
        for pattern in patterns:
            losses, models, _ = run(pattern)
            base[pattern] = losses, params(models)
            del models  # on a GPU the baseline ran in spill's memory
        enable()
        spill_runs = True
        for pattern in patterns:
            gc.collect()
            spill.set_budget(1 << 30)
            st.reset_peak_memory_stats()
            run(pattern, steps=2)
            gc.collect()
            footprint = st.max_memory_allocated()
            runs = [("offload", False, footprint // 3, lambda ms: None)]
            if "{group}" == "checkpoint":
                runs.append(("offload", True, 8 * footprint, lambda ms: moved.append(
                    settle([p for m in ms for p in m.parameters()]))))
            if pattern in ("reentrant", "non_reentrant", "autocast"):
                runs.append(("guard", False, footprint // 3, lambda ms: None))
            for mode, quiet, budget, mid in runs:
                moved = []
                def wrap(m, o):
                    if mode == "guard":
                        h = st.guard(optimizer=o)
                        h.__enter__()
                    else:
                        h = st.offload(m, o, quiet=quiet)
                    spill.set_budget(budget)
                    return h
                before = spill.stats()
                losses, models, hs = run(pattern, wrap, mid=mid)
                after = spill.stats()
                if mode == "guard":  # its exit brings every tensor back: room for them first
                    spill.set_budget(8 * footprint)
                    hs[0].__exit__(None, None, None)
                same = same_params(models, base[pattern][1])
                detail = (pattern, mode, quiet, footprint)
                assert losses == base[pattern][0], (detail, losses, base[pattern][0])
                assert same and all(same), (detail, "final parameters differ from plain torch")
                assert after["swap.bytes_out"] > before["swap.bytes_out"], (detail, "no swap")
                if "{group}" == "penalty":  # the double backward's weight reads are backward's
                    assert not any(h._outside for h in hs), (detail, "weights pinned all step")
                planned = after["swap.steps_planned"] - before["swap.steps_planned"]
                if quiet:
                    assert min(moved) > 0 and all(h.quiet_steps > 0 for h in hs), (
                        detail, moved, [h.quiet_steps for h in hs])
                else:  # unfreeze: the step changes at the third of four; skip: a skipped
                    # step runs on into the next one (see docs/pytorch.md): no plan fits yet
                    assert planned > 0 or pattern in ("unfreeze", "skip"), (detail, planned)
                    assert mode == "guard" or all(h.quiet_steps == 0 for h in hs), detail
                spill.set_budget(8 * footprint)
                for handle in hs:
                    if mode == "offload":
                        handle.remove()
                del models, hs, handle
                print("ok", pattern, mode, quiet, footprint, planned,
                      after["swap.bytes_out"] - before["swap.bytes_out"])
    """, backward_thread_env() if backward_thread else None)
    guarded = {"checkpoint": 2, "precision": 1}.get(group, 0)
    assert out.count("ok ") == len(patterns) * (2 if group == "checkpoint" else 1) + guarded, out


@needs_cuda
def test_fp16_autocast_with_grad_scaler_trains_as_plain_torch() -> None:
    """CUDA's mixed precision (fp16 autocast around the forward, GradScaler's scale, backward,
    unscale_ and clip_grad_norm_, step, update) through offload(model, optimizer) at a third
    of the footprint: losses, scales and final parameters are plain torch's, bytes were
    swapped, and the scaler skipped at least one step (a scale of 2**30 overflows fp16
    gradients; each skip divides it by 64), so that a skipped optimizer step (offload's step
    then runs on into the next iteration's) is covered. Torch 1.13's CPU build has no
    GradScaler (it disables itself without CUDA) and no fp16 autocast: CPU runs test bf16
    autocast and a loop that skips steps the way GradScaler does
    (test_training_loop_patterns_train_as_plain_torch_at_a_third_of_the_footprint)."""
    out = run_ok(quiet_preamble("1GiB") + LOOP_PATTERNS + """
        import gc
        def scaler_of():
            kwargs = dict(init_scale=2.0 ** 30, backoff_factor=2.0 ** -6, growth_interval=2)
            if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
                return torch.amp.GradScaler("cuda", **kwargs)
            return torch.cuda.amp.GradScaler(**kwargs)
        def train(wrap=lambda m, o: None, steps=6):
            torch.manual_seed(0)
            g = torch.Generator().manual_seed(1)
            m = Net("plain").to(dev)
            opt = torch.optim.Adam(m.parameters(), lr=1e-3, foreach=False)
            h = wrap(m, opt)
            scaler = scaler_of()
            assert scaler.is_enabled()  # (it disables itself where CUDA is not available)
            losses, scales = [], []
            for i in range(steps):
                x = torch.randn(B, W, generator=g).to(dev)
                y = torch.randint(0, 16, (B,), generator=g).to(dev)
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = torch.nn.functional.cross_entropy(m(x), y)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
                losses.append(loss.item())
                scales.append(scaler.get_scale())
            return losses, scales, m, h
        base, base_scales, bm, _ = train()
        with torch.no_grad():
            base_params = [p.detach().cpu().clone() for p in bm.parameters()]
        del bm
        gc.collect()
        st.reset_peak_memory_stats()
        train(steps=4)  # (the first two steps are skipped: no optimizer state before the third)
""" + AT_A_THIRD + """
        losses, scales, m, h = train(wrap)
        after = spill.stats()
""" + MATCHES_PLAIN_TORCH + """
        assert scales == base_scales, (scales, base_scales)
        assert any(b < a for a, b in zip([2.0 ** 30] + scales, scales)), ("no skipped step", scales)
        spill.set_budget(1 << 30)
        h.remove()
        print("ok", footprint, scales)
    """)
    assert "ok" in out


# A 6x512 MLP and Adam (batch 64: about 24 MiB of parameters, gradients, state and
# activations): `make()`, `batches`, `step(m, o, x, y)`; `footprint(wrap)` trains two steps at
# a large budget under `wrap(m, o)` and returns the peak allocated.
INTERRUPTED_MLP = quiet_preamble("1GiB") + """
        import gc, io, math, random, signal, sys, threading, time, traceback
        import torch.nn as nn
        ce = nn.functional.cross_entropy
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(64, 512, generator=g), torch.randint(0, 10, (64,), generator=g))
                   for _ in range(4)]
        def make():
            torch.manual_seed(0)
            m = nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.ReLU()) for _ in range(6)],
                              nn.Linear(512, 10)).to(dev)
            return m, torch.optim.Adam(m.parameters(), lr=1e-3)
        def step(m, o, x, y):
            o.zero_grad()
            loss = ce(m(x.to(dev)), y.to(dev))
            loss.backward()
            o.step()
            return loss.item()
        enable()
"""


@pytest.mark.parametrize("mode,signame", [("offload", "SIGINT"), ("guard", "SIGINT"),
                                           ("offload", "SIGTERM")])
def test_ctrl_c_is_raised_outside_spills_code_and_training_goes_on(mode: str,
                                                                   signame: str) -> None:
    """SIGINT sent to the main thread at random moments (50 us to 20 ms into three steps at a
    third of the footprint, 40 times): each KeyboardInterrupt is raised in the caller's code
    (or PyTorch's), never inside spill's, and exactly one per signal; after each, the
    parameters read, a checkpoint is written, a step trains and nothing stays pinned. Then the
    state continues bit-identically to plain torch from the same state, and the handler is the
    one found again. Before spill's handler, an interrupt between a pin and the note of its
    token left the block pinned for good (6 MiB of an 8 MiB budget pinned after 60 interrupts:
    out of memory), and one between taking the window's modes off PyTorch's stacks and putting
    them back left the loop's code reading swapped-out tensors unpinned (a segmentation
    fault). SIGTERM: a preempted job's handler of the caller's, installed before, that raises
    (to write a checkpoint and leave); before, spill stood before SIGINT's handler only, and
    the first SIGTERM left a 1 MiB block pinned for good."""
    out = run_ok(INTERRUPTED_MLP + f"""
        mode, signum = "{mode}", signal.{signame}
        class Preempted(Exception):
            pass
        def preempted(signum, frame):
            raise Preempted(signum)
        if signum == signal.SIGINT:
            found, Interrupt = signal.default_int_handler, KeyboardInterrupt
            # (a shell's background job starts with SIGINT ignored: Python's handler then
            # is not installed)
            signal.signal(signum, found)
        else:
            found, Interrupt = preempted, Preempted
            signal.signal(signum, preempted)
        assert signal.getsignal(signum) is found
        m, o = make()
        if mode == "offload":
            h = st.offload(m, o)
        else:
            h = st.guard(optimizer=o)
            h.__enter__()
        st.reset_peak_memory_stats()
        for x, y in batches[:2]:
            step(m, o, x, y)
        spill.set_budget(st.max_memory_allocated() // 3)
        main = threading.main_thread().ident
        rng = random.Random(5)
        raised, where = 0, []
        for trial in range(40):
            delay = math.exp(rng.uniform(math.log(50e-6), math.log(20e-3)))
            timer = threading.Timer(delay, signal.pthread_kill, (main, signum))
            try:
                timer.start()
                for x, y in batches[:3]:
                    step(m, o, x, y)
                timer.join()
                time.sleep(0.01)  # (one sent after the steps lands here)
            except Interrupt as e:
                raised += 1
                frames = [f for f in traceback.extract_tb(e.__traceback__)
                          if not f.filename.endswith("_interrupts.py")]
                where.append(frames[-1].filename + ":" + str(frames[-1].lineno))
            timer.join()
            if mode == "offload":  # (the bridge's torch.save reads storages: outside a guard)
                torch.save(m.state_dict(), io.BytesIO())
            assert all(math.isfinite(p.sum().item()) for p in m.parameters())
            step(m, o, *batches[3])
            pinned = spill.stats()["swap.pinned_bytes"]
            assert pinned == 0, (trial, pinned)
        assert raised == 40, raised
        inside = [w for w in where if "/spill/" in w]
        assert not inside, inside
        assert spill.stats()["swap.bytes_out"] > 0
        spill.set_budget(1 << 30)
        if mode == "guard":  # (the bridge's torch.save reads storages directly: outside it)
            h.__exit__(None, None, None)
            h = st.guard(optimizer=o)
            h.__enter__()
        buf = io.BytesIO()
        torch.save({{"m": m.state_dict(), "o": o.state_dict()}}, buf)
        losses = [step(m, o, *b) for b in batches[:3]]
        if mode == "offload":
            h.remove()
        else:
            h.__exit__(None, None, None)
        assert signal.getsignal(signum) is found
        buf.seek(0)
        saved = torch.load(buf)
        m2, o2 = make()
        m2.load_state_dict(saved["m"])
        o2.load_state_dict(saved["o"])
        plain = [step(m2, o2, *b) for b in batches[:3]]
        assert losses == plain, (losses, plain)
        print("ok", sorted(set(w.rsplit("/", 1)[-1].split(":")[0] for w in where)))
    """)
    assert "ok" in out


def test_spills_sigint_handler_stands_in_only_while_offload_handles_or_guards_live() -> None:
    """spill's SIGINT handler is installed by offload() and guard() on the main thread, over
    the handler it finds (Python's, or the caller's own, which still gets every signal that
    finds the thread outside spill's code), and the one it found comes back after the last
    handle's remove() or guard's exit; one the caller installs meanwhile is left alone."""
    out = run_ok(INTERRUPTED_MLP + """
        got = []
        def mine(signum, frame):
            got.append(signum)
        signal.signal(signal.SIGINT, mine)
        m, o = make()
        h1 = st.offload(m, o)
        m2, o2 = make()
        h2 = st.offload(m2, o2)
        assert signal.getsignal(signal.SIGINT) not in (mine, signal.default_int_handler)
        signal.raise_signal(signal.SIGINT)  # (outside spill's code: delivered at once)
        assert got == [signal.SIGINT], got
        h1.remove()
        assert signal.getsignal(signal.SIGINT) not in (mine, signal.default_int_handler)
        h2.remove()
        assert signal.getsignal(signal.SIGINT) is mine
        with st.guard():
            assert signal.getsignal(signal.SIGINT) is not mine
        assert signal.getsignal(signal.SIGINT) is mine
        h3 = st.offload(m, o)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the caller's choice
        h3.remove()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        print("ok")
    """)
    assert "ok" in out


def test_a_region_that_cannot_begin_for_lack_of_memory_leaves_the_window_on() -> None:
    """Tensors the loop's code keeps (made in the window, declared swappable there when its
    ops ran out of memory) that do not fit once unswappable again when the next region
    begins: ``opt.zero_grad()`` raises torch.cuda.OutOfMemoryError, and the window is on, as
    before it: the loop's code after the caught error reads swapped-out parameters pinned,
    nothing stays pinned, and training continues as plain torch's. Before, the handle stayed
    inside the region and the window's modes off: the first read after the caught error was a
    segmentation fault. The backward's last pins now go when it ends (they stayed until the
    next region began)."""
    out = run_ok(INTERRUPTED_MLP + """
        size = 2 << 20  # (2 MiB: a granule even on a GPU)
        def run(spilled, count=None):
            m, o = make()
            h = st.offload(m, o) if spilled else None
            st.reset_peak_memory_stats()
            losses, raised, norms = [], False, None
            for i in range(5):
                x, y = batches[i % 4]
                if i == 1 and spilled:
                    spill.set_budget(st.max_memory_allocated() // 3)
                if i == 3:
                    count = count or spill.budget() // size + 1  # (more than the budget)
                    kept = [torch.full((size // 4,), float(j), device=dev)
                            for j in range(count)]
                    try:
                        o.zero_grad()
                    except torch.cuda.OutOfMemoryError:
                        raised = True
                    del kept
                    if spilled:
                        assert spill.stats()["swap.pinned_bytes"] == 0
                    norms = [p.norm().item() for p in m.parameters()]
                losses.append(step(m, o, x, y))
            if h is not None:
                spill.set_budget(1 << 30)
                h.remove()
            return losses, raised, norms, count
        spilled = run(True)
        plain = run(False, spilled[3])
        assert spilled[1], "zero_grad did not run out of memory"
        assert spilled[0] == plain[0] and spilled[2] == plain[2], (spilled, plain)
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.parametrize("mode", ["offload", "guard"])
def test_out_of_memory_in_a_backward_hook_is_torch_out_of_memory_error(mode: str) -> None:
    """A saved tensor that cannot come back in a backward (the budget lowered to what cannot
    move as the backward begins, by a gradient hook of the caller's) raises
    torch.cuda.OutOfMemoryError from ``loss.backward()`` and from ``torch.autograd.grad`` with
    spill's message, as the guide says; under offload torch 1.13's engine handed the hook's
    error on as a plain RuntimeError ("TorchOutOfMemoryError: ..."), which ``except
    torch.cuda.OutOfMemoryError`` did not catch (under guard alone the pin is the dispatch
    mode's, whose error the engine passes on as itself; there the first op that needs room
    may be an allocation, whose error is the allocator's, also torch.cuda.OutOfMemoryError).
    Training continues after it as plain torch's without those steps."""
    out = run_ok(INTERRUPTED_MLP + f"""
        mode = "{mode}"
        def squeeze(grad):  # the smallest budget it takes (all else evicted)
            for mib in range(2, 64):
                try:
                    return spill.set_budget(mib << 20)
                except spill.OutOfMemoryError:
                    pass
        def run(spilled):
            m, o = make()
            h = None
            if spilled and mode == "offload":
                h = st.offload(m, o)
            elif spilled:
                h = st.guard(optimizer=o)
                h.__enter__()
            st.reset_peak_memory_stats()
            losses, caught = [], []
            for i in range(6):
                x, y = batches[i % 4]
                if i == 1 and spilled:
                    budget = st.max_memory_allocated() // 3
                    spill.set_budget(budget)
                if i in (3, 4):
                    o.zero_grad()
                    loss = ce(m(x.to(dev)), y.to(dev))
                    if spilled:
                        loss.register_hook(squeeze)
                        try:
                            if i == 3:
                                loss.backward()
                            else:
                                torch.autograd.grad(loss, list(m.parameters()))
                        except torch.cuda.OutOfMemoryError as e:
                            caught.append(e)
                        spill.set_budget(budget)
                    del loss
                    continue
                losses.append(step(m, o, x, y))
            if h is not None:
                spill.set_budget(1 << 30)
                if mode == "offload":
                    h.remove()
                else:
                    h.__exit__(None, None, None)
            return losses, caught
        spill.set_budget(1 << 30)
        plain, _ = run(False)
        losses, caught = run(True)
        assert len(caught) == 2, caught
        for e in caught:
            if mode == "offload" or isinstance(e, spill.OutOfMemoryError):
                assert isinstance(e, spill.OutOfMemoryError), (type(e), str(e))
                assert "cannot bring" in str(e), str(e)[:300]
            else:  # guard: the backward's first op that needs room may allocate before any
                # op pins (a view of a saved tensor pins nothing): spill's allocator's error
                assert "spill_malloc" in str(e) and "Budget" in str(e), str(e)[:300]
        assert losses == plain, (losses, plain)
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.skipif(SIZED_FOR_64K, reason="sized for the CPU bridge at 64 KiB granularity")
@pytest.mark.parametrize("mode", ["offload", "guard"])
def test_out_of_memory_in_a_checkpointed_regions_recomputation_is_torch_out_of_memory_error(
        mode: str) -> None:
    """Out of memory in an allocation of a non-reentrant ``torch.utils.checkpoint`` region's
    recomputation (which runs inside checkpoint's unpack hook, in the backward) under
    offload, and under guard alone: ``loss.backward()`` raises torch.cuda.OutOfMemoryError
    (also spill.OutOfMemoryError) with the allocator's breakdown, and training continues, as
    plain torch's without the failed step, once it is caught and the budget raised again. The
    budget is squeezed by a forward pre-hook of the caller's on the last region's second
    convolution as the recomputation reaches it (under offload after its hook has pinned the
    weight, so the failure is the convolution's output allocation; under guard the
    convolution's pins may fail first). Before, torch 1.13's engine handed it on as a plain
    ``RuntimeError("OutOfMemoryError: spill: cannot allocate ...")`` (or ``"TorchOutOfMemoryError:
    ..."``), which ``except torch.cuda.OutOfMemoryError`` missed (audit 43u F2; under guard
    until 2026-12-07)."""
    out = run_ok(quiet_preamble("1GiB") + f"""
        mode = "{mode}"
        import torch.nn as nn
        from torch.utils.checkpoint import checkpoint
        C = 128
        class Blk(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1 = nn.Conv2d(C, C, 3, padding=1, bias=False)
                self.c2 = nn.Conv2d(C, C, 3, padding=1, bias=False)
                self.r1, self.r2 = nn.ReLU(), nn.ReLU()
            def forward(self, x):
                return self.r2(self.c2(self.r1(self.c1(x))) + x)
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stages = nn.ModuleList(nn.Sequential(Blk(), Blk()) for _ in range(3))
            def forward(self, x):
                for s in self.stages:
                    x = checkpoint(s, x, use_reentrant=False)
                return x.mean()
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(4, C, 16, 16, generator=g) for _ in range(3)]
        armed = []
        def squeeze(module, args):
            if armed:  # the recomputation: the smallest budget that holds what cannot move
                armed.clear()
                for kib in range(2 << 10, 64 << 10, 64):
                    try:
                        return spill.set_budget(kib << 10)
                    except spill.OutOfMemoryError:
                        pass
        def run(spilled):
            torch.manual_seed(0)
            m = Net().to(dev)
            o = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
            g = None
            if spilled:
                if mode == "offload":
                    st.offload(m, o)
                else:
                    g = st.guard(o)
                    g.__enter__()
                m.stages[2][1].c2.register_forward_pre_hook(squeeze)
            losses, caught = [], []
            for i, x in enumerate(batches):
                o.zero_grad()
                loss = m(x.to(dev))
                if spilled and i == 1:
                    loss.register_hook(lambda grad: armed.append(1))
                    try:
                        loss.backward()
                    except torch.cuda.OutOfMemoryError as e:
                        caught.append(e)
                    spill.set_budget(1 << 30)
                    o.zero_grad()
                    loss = m(x.to(dev))
                loss.backward()
                o.step()
                losses.append(loss.item())
            if g is not None:
                g.__exit__(None, None, None)
            return losses, caught
        plain, _ = run(False)
        enable()
        losses, caught = run(True)
        assert len(caught) == 1, caught
        e = caught[0]
        assert isinstance(e, spill.OutOfMemoryError), type(e).__mro__
        # (under guard the convolution's pin of its weight may be what finds no room)
        failed = ("spill: cannot allocate",) + (("spill_pin",) if mode == "guard" else ())
        assert str(e).startswith(failed) and "Budget" in str(e), str(e)[:300]
        if int(torch.__version__.split(".")[0]) < 2:
            # what torch 1.13's engine handed on, as a RuntimeError (torch 2's hands on the
            # error itself)
            cause = e.__cause__
            assert type(cause) is RuntimeError and str(cause).startswith(
                ("OutOfMemoryError: spill: cannot allocate", "TorchOutOfMemoryError: ")
                ), repr(cause)[:300]
        assert losses == plain, (losses, plain)
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.skipif(TARGET != "cpu", reason="sized for the CPU bridge (what else the budget "
                    "holds on a GPU is not counted)")
def test_an_op_whose_second_argument_cannot_come_back_leaves_the_first_unpinned() -> None:
    """Under guard(), ``a + b`` with both on the host and room for one: the pin of ``b``
    raises torch.cuda.OutOfMemoryError and ``a``, pinned first, is let go (it stayed pinned
    for good: the arguments were pinned before the op's try); with room made, the op runs and
    nothing stays pinned."""
    out = run_ok(quiet_preamble("8MiB") + """
        import gc
        enable()
        n = (2 << 20) // 4
        g = st.guard(release_on_exit=False)
        with g:
            a = torch.ones(n)
            b = torch.ones(n) * 2  # made inside the guard: swappable
        for t in (a, b):
            spill.evict(t.data_ptr())
        for _ in range(400):
            if all(spill.residence(t.data_ptr()) == "on_host" for t in (a, b)):
                break
            time.sleep(0.005)
        fill = [torch.zeros(n) for _ in range(3)]  # never declared: 6 of the 8 MiB
        try:
            with g:
                a + b
            raise AssertionError("no out-of-memory error")
        except torch.cuda.OutOfMemoryError:
            pass
        assert spill.stats()["swap.pinned_bytes"] == 0, spill.stats()["swap.pinned_bytes"]
        del fill
        gc.collect()
        with g:
            assert (a + b)[0].item() == 3.0
        assert spill.stats()["swap.pinned_bytes"] == 0
        print("ok")
    """.replace("import gc", "import gc, time"))
    assert "ok" in out


def test_offload_takes_an_optimizer_like_wrapper_and_a_failed_offload_leaves_nothing() -> None:
    """An optimizer-like wrapper with step() and param_groups but no load_state_dict or
    zero_grad is taken (what it lacks is not wrapped; before: AttributeError). An offload()
    that fails part way (an optimizer object that cannot take an attribute) leaves the model
    and the optimizer as they were: no hook, no wrapper, and a later offload() of the model
    works and trains as plain torch. Before, the model kept the failed handle's hooks, and the
    second offload() ran over them."""
    out = run_ok(INTERRUPTED_MLP + """
        class Wrapper:  # (a scheduler-free wrapper of an optimizer, as some trainers write)
            def __init__(self, inner):
                self.inner, self.param_groups, self.state = inner, inner.param_groups, inner.state
            def step(self, closure=None):
                return self.inner.step(closure)
        class Slotted:  # (no instance dict: offload cannot put its wrapper on it)
            __slots__ = ("inner", "param_groups", "state")
            def __init__(self, inner):
                self.inner, self.param_groups, self.state = inner, inner.param_groups, inner.state
            def step(self, closure=None):
                return self.inner.step(closure)
        def hooks(m):
            return sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in m.modules())
        m, o = make()
        h = st.offload(m, Wrapper(o))
        x, y = batches[0]
        o.zero_grad(); ce(m(x.to(dev)), y.to(dev)).backward()
        h.remove()
        assert hooks(m) == 0 and "forward" not in m.__dict__
        m, o = make()
        try:
            st.offload(m, Slotted(o))
            raise AssertionError("offload() of an object without an instance dict succeeded")
        except (AttributeError, TypeError):
            pass
        assert hooks(m) == 0, hooks(m)
        assert "forward" not in m.__dict__ and "zero_grad" not in m.__dict__
        h = st.offload(m, o)
        losses = [step(m, o, *b) for b in batches]
        h.remove()
        m2, o2 = make()
        assert losses == [step(m2, o2, *b) for b in batches]
        print("ok")
    """)
    assert "ok" in out


@pytest.mark.parametrize("trained_on", ["its thread", "another thread"])
def test_a_handle_collected_without_remove_takes_its_oom_note_along(trained_on: str) -> None:
    """A handle whose quiet steps set the device's out-of-memory note, dropped without
    remove() with its model and optimizer (collected), no longer explains later errors: an
    allocation that fails afterwards with no model at all carried "ran this step quiet". Also
    for a handle made on the main thread whose model trained on another one (the handle moves
    to the thread of its first forward: _offload_entries._follow_thread), and nothing is
    reported from its finalizer: before, the finalizer made at the move lacked the quiet-step
    policy, and collecting the handle printed a TypeError ("Exception ignored in: <finalize
    object ...>") and kept the note."""
    r = run_code(INTERRUPTED_MLP + """
        import weakref
        m, o = make()
        h = st.offload(m, o)
        train = lambda: [step(m, o, *b) for b in batches[:3]]
        if %r == "its thread":
            train()
        else:
            t = threading.Thread(target=train)
            t.start()
            t.join()
        assert h.step_is_quiet
        ref = weakref.ref(h)
        del h, m, o
        gc.collect()
        assert ref() is None, "the handle was not collected"
        spill.set_budget(4 << 20)
        try:
            torch.empty(8 << 20, dtype=torch.uint8, device=dev)
            raise AssertionError("no out-of-memory error")
        except torch.cuda.OutOfMemoryError as e:
            assert "out of memory" in str(e) and "ran this step quiet" not in str(e), str(e)
        print("ok")
    """ % trained_on)
    assert r.returncode == 0 and "ok" in r.stdout, (r.stdout, r.stderr)
    assert "Exception ignored" not in r.stderr and "TypeError" not in r.stderr, r.stderr


def test_out_of_memory_in_an_optimizer_offload_does_not_know_names_it() -> None:
    """Resuming into a fresh optimizer that was not given to offload() (``opt2 =
    Adam(...); opt2.load_state_dict(opt.state_dict())``) at a third of the footprint: its
    deep copies of the state are the loop's own tensors, resident, and loading runs out of
    memory; the message names the optimizer and says to give it to the handle
    (handle.add_optimizer), which works at the same budget. A replacement optimizer made in
    the loop without telling offload (its state resident, the old one kept by the handle) runs
    out of memory where a region begins or a module pins its weights; the message names it and
    says to add it, which works (before session 35 the recipe was remove() and offload()
    again, which must first bring every tensor back: at a third, out of memory)."""
    out = run_ok(INTERRUPTED_MLP + """
        m, o = make()
        h = st.offload(m, o)
        st.reset_peak_memory_stats()
        for b in batches[:2]:
            step(m, o, *b)
        third = st.max_memory_allocated() // 3
        spill.set_budget(third)
        step(m, o, *batches[2])
        o2 = torch.optim.Adam(m.parameters(), lr=1e-3)
        try:
            o2.load_state_dict(o.state_dict())
            raise AssertionError("no out-of-memory error")
        except torch.cuda.OutOfMemoryError as e:
            assert "optimizer (Adam) that no offload() handle knows" in str(e), str(e)[-600:]
            assert "handle.add_optimizer(new_optimizer)" in str(e), str(e)[-600:]
        o2.state.clear()
        gc.collect()
        h.add_optimizer(o2)
        o2.load_state_dict(o.state_dict())
        o.state.clear()
        step(m, o2, *batches[3])
        # A new optimizer made in the loop to replace o2, not given to the handle: its state
        # stays resident; the message names it and says what to do, which works.
        o3 = torch.optim.Adam(m.parameters(), lr=1e-3)
        try:
            for i in range(8):
                step(m, o3, *batches[i % 4])
            raise AssertionError("no out-of-memory error")
        except torch.cuda.OutOfMemoryError as e:
            assert "(Adam) is one no offload() handle knows" in str(e), str(e)[-600:]
            assert "handle.add_optimizer(new_optimizer, replaces=old_optimizer)" in str(e)
        h.add_optimizer(o3, replaces=o2)
        o2.state.clear()
        gc.collect()
        for i in range(3):
            step(m, o3, *batches[i])
        assert spill.budget() == third
        print("ok")
    """)
    assert "ok" in out


def test_out_of_memory_of_a_forwards_op_names_an_optimizer_offload_does_not_know() -> None:
    """A replacement optimizer made in the loop and not given to offload holds resident state;
    an op of the next forward (a temporary it allocates) runs out of memory: the message
    names the optimizer and add_optimizer, as where a region cannot begin. Before, only there
    (audit 39a F5: the op's message called the state 'unnamed')."""
    out = run_ok(quiet_preamble("64MiB") + """
        import torch.nn.functional as F
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 10)
                self.temporary = 0
            def forward(self, x):
                h = self.a(x).relu()
                if self.temporary:
                    torch.empty(self.temporary, dtype=torch.uint8, device=dev)
                return self.b(h)
        enable()
        m = Net().to(dev)
        o = torch.optim.Adam(m.parameters())
        h = st.offload(m, o)
        x, y = torch.randn(64, 1024, device=dev), torch.randint(0, 10, (64,), device=dev)
        def step(opt):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        step(o)
        o2 = torch.optim.Adam(m.parameters())  # not given to the handle: its state stays
        step(o2)
        m.temporary = 62 << 20
        try:
            step(o2)
            raise AssertionError("no out-of-memory error")
        except torch.cuda.OutOfMemoryError as e:
            assert "(Adam) is one no offload() handle knows" in str(e), str(e)[-600:]
            assert "handle.add_optimizer(new_optimizer, replaces=old_optimizer)" in str(e)
        m.temporary = 0
        h.add_optimizer(o2, replaces=o)
        o.state.clear()
        step(o2)
        print("ok")
    """)
    assert "ok" in out, out


@pytest.mark.parametrize("replacing", [False, True])
def test_add_optimizer_switches_optimizers_at_a_third_as_plain_torch_does(replacing: bool) -> None:
    """Adam for three steps, then AdamW (a new optimizer: its state twice the parameters) for
    six, at a third of the footprint: handle.add_optimizer(new) (with replaces=old: the old
    one's methods put back, the new one in its place) and old.state.clear() give plain
    torch's losses and parameters bit for bit, with bytes swapped; the rules: a removed
    handle, a handle without optimizers, an optimizer it knows and a replaces= it does not
    know are refused, naming the call."""
    out = run_ok(INTERRUPTED_MLP + f"""
        replacing = {replacing}
        import contextlib, weakref
        olds = []
        def run(spilled):
            m, o = make()
            h = st.offload(m, o) if spilled else None
            losses = [step(m, o, *b) for b in batches[:3]]
            if spilled:
                third = st.max_memory_allocated() // 3
                spill.set_budget(third)
            o2 = torch.optim.AdamW(m.parameters(), lr=1e-3)
            if spilled:
                try:
                    h.add_optimizer(o)
                    raise AssertionError("an optimizer added twice")
                except spill.InvalidArgumentError as e:
                    assert "add_optimizer: the Adam is one the handle knows" in str(e), e
                try:
                    h.add_optimizer(o2, replaces=torch.optim.SGD(m.parameters(), lr=0.1))
                    raise AssertionError("replaces= an optimizer the handle does not know")
                except spill.InvalidArgumentError as e:
                    assert "replaces (SGD) is not an optimizer the handle was given" in str(e)
                assert "step" in o.__dict__  # (wrapped on the instance)
                try:
                    h.add_optimizer(None)
                    raise AssertionError("add_optimizer(None) accepted")
                except spill.InvalidArgumentError as e:
                    assert "add_optimizer: optimizer is None" in str(e), e
                h.add_optimizer(o2, replaces=o if replacing else None)
                assert ("step" in o.__dict__) != replacing
                olds.append(weakref.ref(o))
                assert len(h.optimizers) == (1 if replacing else 2) and h.optimizers[-1] is o2
            o.state.clear()
            losses += [step(m, o2, *batches[i % 4]) for i in range(3, 9)]
            with (st.guard(release_on_exit=False) if spilled else contextlib.nullcontext()):
                # (numpy's memory: the baseline's copies take none of the budget)
                params = [torch.from_numpy(p.detach().cpu().numpy().copy())
                          for p in m.parameters()]
            return m, h, losses, params
        _, _, base, base_params = run(False)
        st.reset_peak_memory_stats()
        out_before = spill.stats()["swap.bytes_out"]
        m, h, losses, params = run(True)
        gc.collect()
        assert (olds[0]() is None) == replacing  # (a replaced one is the handle's no more)
        assert losses == base, (losses, base)
        assert all(torch.equal(p, q) for p, q in zip(params, base_params))
        assert spill.stats()["swap.bytes_out"] > out_before
        spill.set_budget(1 << 30)
        h.remove()
        try:
            h.add_optimizer(torch.optim.SGD(m.parameters(), lr=0.1))
            raise AssertionError("add_optimizer on a removed handle")
        except spill.Error as e:
            assert "add_optimizer: the handle was removed" in str(e), e
        h2 = st.offload(m)
        try:
            h2.add_optimizer(torch.optim.SGD(m.parameters(), lr=0.1))
            raise AssertionError("add_optimizer on a handle without optimizers")
        except spill.Error as e:
            assert "offload() was given no optimizer" in str(e), e
        h2.remove()
        print("ok")
    """)
    assert "ok" in out
