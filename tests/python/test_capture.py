"""spill.torch.capture: a training step recorded on meta tensors as a spill graph.

Checks: parameter counts against PyTorch and spill's zoo; the unlimited-memory peak against the
bytes spill measures when the same model trains through the CPU bridge (spill.torch), and
against the zoo's prediction for the same architecture; the planner's properties on captured
graphs; storage sharing, tensor kinds, batch scaling; clear errors for steps that need data.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import types

import pytest

from spill_cli import spill_cli, spill_plan  # noqa: E402  (also puts python/ on sys.path)

torch = pytest.importorskip("torch")
import spill  # noqa: E402
import spill.torch as st  # noqa: E402
from spill._errors import InvalidArgumentTypeError  # noqa: E402  (spill.InvalidArgumentError too)
from spill.torch._meta import building_on_meta  # noqa: E402
from models import GPT2, lm_loss  # noqa: E402

nn = torch.nn
HERE = pathlib.Path(__file__).resolve().parent


def gpt2_step(size="small", batch=2, seq=128, **kw):
    ids = torch.zeros(batch, seq, dtype=torch.long)
    return st.capture(lambda: GPT2(size), ids, loss_fn=lm_loss, targets=ids, **kw)


def vision_step(name, batch=2, **kw):
    torchvision = pytest.importorskip("torchvision")
    build = getattr(torchvision.models, name)
    return st.capture(build, torch.randn(batch, 3, 224, 224), targets=torch.zeros(
        batch, dtype=torch.long), loss_fn=nn.functional.cross_entropy, **kw)


def reads_before_writes(graph):
    """Ids read by an op before any op wrote them, for kinds that do not exist at step start."""
    kind = {t["id"]: t["kind"] for t in graph["tensors"]}
    written = {i for i, k in kind.items()
               if k in ("weight", "buffer", "optimizer_state", "input")}
    bad = []
    for op in graph["ops"]:
        bad += [t for t in op["reads"] if t not in written]
        written.update(op["writes"])
    return bad


# ----- parameter counts --------------------------------------------------------------------

ZOO_OF = {"gpt2": "gpt2-small", "resnet50": "resnet50", "vgg16": "vgg16"}


@pytest.mark.parametrize("model", ["gpt2", "resnet50", "vgg16"])
def test_parameter_counts_equal_pytorch_and_zoo(model, tmp_path):
    path = tmp_path / "g.json"
    if model == "gpt2":
        step = gpt2_step(path=path, scale_batch=False)
        build = functools.partial(GPT2, "small")
    else:
        step = vision_step(model, path=path, scale_batch=False)
        build = getattr(pytest.importorskip("torchvision").models, model)
    with building_on_meta():  # the same shapes as on the CPU, without 0.5 GB of random init
        pytorch_count = sum(p.numel() for p in build().parameters())  # tied ones once
    weights = sum(t["bytes"] // 4 for t in step.graph["tensors"] if t["kind"] == "weight")
    assert step.parameter_count == pytorch_count == weights
    captured = spill_plan(str(path), "--device", "a100-80gb", "--link", "pcie4")
    zoo = spill_plan(ZOO_OF[model], "--device", "a100-80gb", "--link", "pcie4")
    assert captured["parameters"] == zoo["parameters"] == pytorch_count


# ----- peak memory against the zoo ---------------------------------------------------------

def without_tensors_the_zoo_omits(graph):
    """The graph with zero bytes for what PyTorch keeps and spill's zoo does not model:
    max-pool's int64 argmax indices (the zoo pools the way cuDNN does, without them) and the
    gradient of the log-probabilities that cross_entropy (log_softmax, then NLL) materialises
    between its two backward kernels (the zoo's loss is one fused softmax cross-entropy)."""
    producer = {}
    for op in graph["ops"]:
        for t in op["writes"]:
            producer.setdefault(t, op["type"])
    g = json.loads(json.dumps(graph))
    for t in g["tensors"]:
        kind = producer.get(t["id"])
        if (kind == "max_pool2d_with_indices" and t["dtype"] == "i64") or \
                kind == "nll_loss_backward":
            t["bytes"] = 0
            t.pop("batch_bytes", None)
    return g


@pytest.mark.parametrize("model,batch,extra", [
    ("gpt2", 2, ["--seq", "1024"]), ("resnet50", 32, []), ("vgg16", 32, [])])
def test_unlimited_peak_within_5_percent_of_the_zoo(model, batch, extra, tmp_path):
    # Models too large to train here: the reference is the zoo's prediction for the same
    # architecture (the real-run comparison is test_unlimited_peak_within_5_percent_of_a_real_run).
    step = gpt2_step(batch=batch, seq=1024, path=None) if model == "gpt2" else \
        vision_step(model, batch=batch, path=None)
    args = ["--device", "a100-80gb", "--link", "pcie4"]
    zoo = spill_plan(ZOO_OF[model], "--batch", str(batch), *extra, *args)["unlimited_peak_bytes"]
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(step.graph))
    peak = spill_plan(str(raw), *args)["unlimited_peak_bytes"]
    comparable = tmp_path / "comparable.json"
    comparable.write_text(json.dumps(without_tensors_the_zoo_omits(step.graph)))
    same_model = spill_plan(str(comparable), *args)["unlimited_peak_bytes"]
    assert abs(same_model - zoo) <= 0.05 * zoo, (same_model, zoo)
    assert peak >= same_model  # what the zoo omits only adds


# ----- peak memory against a real run through the CPU bridge -------------------------------

def bridge_run(model, tmp_path):
    """capture_vs_bridge.py for `model`: the captured graph's predicted unlimited peak and the
    bytes spill measured while the same model trained through the CPU bridge."""
    graph = tmp_path / f"{model}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1] / "python"),
                                         env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(HERE / "capture_vs_bridge.py"), model, str(graph)],
                         env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    measured = json.loads(lines[-1][len("RESULT "):])
    predicted = spill_plan(str(graph), "--device", "a100-80gb", "--link", "pcie4")
    return predicted["unlimited_peak_bytes"], measured["requested_peak"]


# frozen_first peaks in the optimizer pass, with a parameter's gradient still kept after its
# last read (PyTorch frees .grad at the next zero_grad): 0.84 of the measured peak before the
# graph held parameters' gradients to the step's end (audit 45a F1).
# out_of_place_state: an optimizer that replaces its state each step (review 45r F4);
# kept_grads: a loop whose zero_grad() zeroes the gradients, captured with set_to_none=False.
@pytest.mark.parametrize("model", ["mlp", "gpt", "frozen_first", "out_of_place_state",
                                   "kept_grads"])
def test_unlimited_peak_within_5_percent_of_a_real_run(model, tmp_path):
    predicted, measured = bridge_run(model, tmp_path)
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_convolution_workspaces_are_what_a_capture_cannot_see(tmp_path):
    # PyTorch's CPU convolutions allocate workspaces (oneDNN's, or im2col columns without it)
    # that no meta kernel shows: measured 9% over the prediction with oneDNN, 26% without, for
    # this CNN (2-core build machine, torch 1.13, 2026-12-02). The capture is a lower bound.
    predicted, measured = bridge_run("cnn", tmp_path)
    assert predicted <= measured, (predicted, measured)


# ----- the planner on captured graphs ------------------------------------------------------

def test_captured_graph_passes_planner_checks(tmp_path):
    path = tmp_path / "gpt2.json"
    step = gpt2_step(batch=4, seq=256, path=path)
    assert reads_before_writes(step.graph) == []
    phases = [op["phase"] for op in step.graph["ops"]]
    # forward, then backward, then optimizer, each one contiguous run
    assert phases == sorted(phases, key=["forward", "backward", "optimizer"].index)
    fwd = [op["layer"] for op in step.graph["ops"] if op["phase"] == "forward"]
    bwd = [op["layer"] for op in step.graph["ops"] if op["phase"] == "backward"]
    assert fwd == sorted(fwd) and fwd[0] == 0 and max(bwd) <= max(fwd)
    assert bwd[0] > bwd[-1]  # backward walks the layers back
    unlimited = spill_plan(str(path), "--device", "v100-16gb", "--link", "nvlink2-p9")
    budget = unlimited["unlimited_peak_bytes"] * 2 // 3
    report = spill_plan(str(path), "--device", "v100-16gb", "--link", "nvlink2-p9",
                        "--budget", f"{budget}B")
    policies = {p["name"]: p for p in report["policies"]}
    assert set(policies) == {"spill", "vdnn", "threshold", "none"}
    assert policies["spill"]["feasible"] and not policies["none"]["feasible"]
    for p in policies.values():
        if p["feasible"]:
            assert p["peak_bytes"] <= budget, p
    # the vDNN baseline finds activations to move from forward to backward
    assert policies["vdnn"]["swapped_out_bytes"] > 0


def test_gradients_leave_after_their_last_read_for_the_rest_of_the_step(tmp_path):
    """A parameter's .grad is held to the step's end (PyTorch keeps it), and a plan may evict it
    after its last read in the optimizer pass for the rest of the step, prefetching it nowhere
    (as spill's swapper may): the 6x512 MLP of docs/pytorch.md at batch 1024 with Adam plans
    at 8 MiB. While held gradients stayed resident, it needed more (10 MiB, before the capture
    held a node's saved tensors: review 45r F9)."""
    path, plan = tmp_path / "mlp.json", tmp_path / "plan.json"
    step = st.capture(_docs_mlp(), torch.randn(1024, 512), nn.functional.cross_entropy,
                      path=path, targets=torch.zeros(1024, dtype=torch.long), set_to_none=False)
    report = spill_plan(str(path), "--device", "h100-pcie", "--link", "pcie5",
                        "--budget", "8MiB", "--plan-out", str(plan))
    planned = {p["name"]: p for p in report["policies"]}["spill"]
    assert planned["feasible"] and planned["peak_bytes"] <= 8 * 2**20, planned
    tensors = {t["id"]: t for t in step.graph["tensors"]}
    last_use = {}
    for i, op in enumerate(step.graph["ops"]):
        for t in op["reads"] + op["writes"]:
            last_use[t] = i
    steps = json.loads(plan.read_text())["steps"]
    gone = {t: s["op"] for s in steps for t in s["evict_after"]
            if tensors[t].get("held_to_step_end") and s["op"] >= last_use[t]}
    assert gone, "no held tensor leaves after its last use"
    for t, after in gone.items():
        assert tensors[t]["kind"] == "gradient" and tensors[t]["name"].startswith("grad:")
        # Nothing brings it back later in the step.
        assert not any(t in s["prefetch"] for s in steps if s["op"] > after), tensors[t]["name"]


def _docs_mlp() -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.ReLU()) for _ in range(6)],
                         nn.Linear(512, 10))


def test_the_least_budget_spill_plan_gives_is_the_least_the_run_trains_in(tmp_path):
    """spill plan --granularity --swap-threshold, on the capture of docs/pytorch.md's MLP, says
    what the same loop needs under offload() on the CPU bridge: no plan at 8 MiB, one at 9; the
    run runs out of memory at 8 MiB (its second step's backward) and trains at 9 (measured
    2026-12-08). Before, the capture's backward ops read only their own arguments where
    offload() pins a node's saved tensors until the engine is between nodes, and the plan said
    8 (and 7 counting no small-pool segment)."""
    path = tmp_path / "mlp.json"
    st.capture(_docs_mlp(), torch.randn(1024, 512), nn.functional.cross_entropy, path=path,
               targets=torch.zeros(1024, dtype=torch.long), set_to_none=False)
    fits = {}
    for mib in (8, 9):
        report = spill_plan(str(path), "--device", "h100-pcie", "--link", "pcie5", "--policy",
                            "spill", "--budget", f"{mib}MiB", "--granularity", "64KiB",
                            "--swap-threshold", "128KiB")
        fits[mib] = report["policies"][0]["feasible"]
    assert fits == {8: False, 9: True}, fits
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1] / "python"),
                                         env.get("PYTHONPATH", "")])
    runs = {}
    for mib in (8, 9):
        run = subprocess.run([sys.executable, str(HERE / "mlp_at_a_budget.py"), f"{mib}MiB"],
                             env=env, capture_output=True, text=True, timeout=600)
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
        assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
        runs[mib] = lines[-1][len("RESULT "):]
    assert runs[8].startswith("oom") and runs[9] == "ok", runs


def test_link_from_the_link_benchmark(tmp_path):
    link = tmp_path / "link.json"
    subprocess.run([spill_cli(), "--conf", "device:sim", "bench", "link", "--sizes", "64KiB,4MiB",
                    "--samples", "2", "--json", str(link)], check=True, capture_output=True)
    path = tmp_path / "r.json"
    vision_step("resnet50", batch=2, path=path)
    report = spill_plan(str(path), "--device", "v100-16gb", "--link", str(link))
    # The benchmark's figures, not a preset; made on the simulated device, so named simulated.
    assert report["link"] == "simulated"
    assert report["policies"][0]["feasible"] and report["unlimited_peak_bytes"] > 0


# ----- what the graph records --------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.bn = nn.BatchNorm1d(128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        h = self.fc1(x)
        h.relu_()                      # in place: same storage
        h = h.view(h.shape[0], 128)    # a view: same storage
        return self.fc2(self.bn(h))


def test_views_and_in_place_ops_share_storage():
    step = st.capture(Tiny, torch.randn(8, 64), optimizer=None, path=None, scale_batch=False)
    ops = step.graph["ops"]
    relu = next(op for op in ops if op["type"] == "relu_")
    assert relu["reads"] == relu["writes"]
    addmm = [op for op in ops if op["type"] == "addmm" and op["phase"] == "forward"]
    fc1_out = addmm[0]["writes"][0]
    assert relu["writes"] == [fc1_out]
    bn = next(op for op in ops if op["type"].startswith("native_batch_norm")
              and op["phase"] == "forward")
    assert fc1_out in bn["reads"]  # through the view, the same tensor
    assert not any(op["type"] in ("view", "t", "detach", "empty") for op in ops)


@pytest.mark.parametrize("factory,slots", [
    (torch.optim.Adam, 2),
    (functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), 1),
    (functools.partial(torch.optim.SGD, lr=0.1), 0),
])
def test_tensor_kinds(factory, slots):
    step = st.capture(Tiny, torch.randn(8, 64), optimizer=factory, path=None)
    by_kind = {}
    for t in step.graph["tensors"]:
        by_kind.setdefault(t["kind"], []).append(t)
    names = lambda kind: sorted(t["name"] for t in by_kind.get(kind, []))  # noqa: E731
    params = sorted(n for n, _ in Tiny().named_parameters())
    assert names("weight") == params
    assert names("gradient")[:0] == [] and {"grad:" + p for p in params} <= set(names("gradient"))
    assert len(by_kind.get("optimizer_state", [])) == slots * len(params)
    assert set(names("buffer")) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert names("input") == ["input0"]
    optimizer_ops = [op for op in step.graph["ops"] if op["phase"] == "optimizer"]
    assert optimizer_ops and all(op["name"].split(":")[0] in params for op in optimizer_ops)


class _Recorded(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_optimizer_pass_is_a_steady_step():
    # The capture runs a first step unrecorded: SGD's momentum buffer is a clone of the first
    # gradient and a multiply-add later; the graph has the later (before: clone, add_ per
    # parameter, 3 ops' traffic instead of 5: audit 45a F7), as a real third step runs them.
    factory = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    step = st.capture(nn.Linear(32, 32), torch.randn(4, 32), optimizer=factory, path=None)
    captured = [op["type"] for op in step.graph["ops"] if op["phase"] == "optimizer"]
    m = nn.Linear(32, 32)
    opt = factory(m.parameters())
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        m(torch.randn(4, 32)).sum().backward()
        with _Recorded() as real:
            opt.step()
    assert captured == [op for op in real.ops if op in ("mul_", "add_")], (captured, real.ops)
    assert captured.count("mul_") == 2 and "clone" not in captured, captured
    states = [t for t in step.graph["tensors"] if t["kind"] == "optimizer_state"]
    assert sorted(t["name"] for t in states) == ["momentum_buffer:bias",
                                                 "momentum_buffer:weight"], states


class _LazyTable(nn.Module):
    """Builds a positional table on its first forward and keeps it (a lazy cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.table = None

    def forward(self, x):
        if self.table is None or self.table.shape[0] < x.shape[1]:
            self.table = torch.sin(torch.arange(x.shape[1] * 64, device=x.device,
                                                dtype=x.dtype).view(x.shape[1], 64))
        return self.fc(x + self.table)


def test_state_a_module_makes_on_its_first_call_is_state_of_the_step():
    # Recorded in the first step it was an activation made and freed in each step, and the
    # capture at twice the batch (which found it made) differed: "the model's structure
    # depends on the batch size" (audit 45a F17). Now the recorded step is a later one: the
    # table is state the step starts with (a buffer), and the batch scaling holds.
    step = st.capture(_LazyTable, torch.randn(4, 128, 64), path=None)
    assert step.batch_scaling is None and step.graph["batch"] == 4, step.batch_scaling
    table = [t for t in step.graph["tensors"] if t["bytes"] == 128 * 64 * 4]
    assert [t["kind"] for t in table] == ["buffer"], table
    assert not any(op["type"] in ("arange", "sin") for op in step.graph["ops"])


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "detect_anomaly"])
def test_a_capture_records_a_training_steps_modes_whatever_the_callers(mode):
    # From an evaluation (torch.no_grad, inference_mode) the step's loss required no grad and
    # the error blamed loss_fn; under anomaly detection the engine's NaN check read a value
    # (audit 45a F20). The step runs with grad mode on and anomaly mode off.
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "detect_anomaly": torch.autograd.detect_anomaly}[mode]
    plain = st.capture(Tiny, torch.randn(8, 64), path=None)
    with context():
        step = st.capture(Tiny, torch.randn(8, 64), path=None)
        assert torch.is_grad_enabled() == (mode == "detect_anomaly")
    assert step.graph == plain.graph


def test_a_broadcast_operand_counts_its_storage_not_its_views_elements():
    # x * w.expand(4096, 32): the op touches x (512 KiB), w (128 B) and its output (512 KiB);
    # counting the expanded view's elements made it 1.5 MiB (audit 45a F13).
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 32))

        def forward(self, x):
            return x * self.w.expand(4096, 32)

    step = st.capture(Scale, torch.randn(4096, 32), path=None, scale_batch=False,
                      optimizer=None)
    forward = [op for op in step.graph["ops"] if op["type"] == "mul" and op["phase"] == "forward"]
    assert [op["bytes"] for op in forward] == [2 * 4096 * 32 * 4 + 32 * 4], forward


def test_modules_another_thread_runs_meanwhile_are_not_the_steps():
    # capture's module hooks are the process's: a training thread's modules, run while the
    # step is recorded, named the step's ops and began its layers (audit 45a F11). Here the
    # loss function has another thread enter a module and stay in it while the loss's ops run.
    inside, release = threading.Event(), threading.Event()

    class Waits(nn.Module):
        def forward(self, x):
            inside.set()
            release.wait(60)
            return x

    def loss_beside_a_thread(out):
        t = threading.Thread(target=lambda: Waits()(torch.randn(2)))
        inside.clear()
        release.clear()
        t.start()
        try:
            inside.wait(60)
            return (out * 2).sum()
        finally:
            release.set()
            t.join()

    plain = st.capture(Tiny, torch.randn(8, 64), loss_fn=lambda out: (out * 2).sum(), path=None)
    step = st.capture(Tiny, torch.randn(8, 64), loss_fn=loss_beside_a_thread, path=None)
    assert step.graph == plain.graph


class _KeepsPrevious(torch.optim.Optimizer):
    """Momentum out of place, and the previous step's momentum kept in a second slot."""

    def __init__(self, params) -> None:
        super().__init__(params, dict(lr=0.1))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "m" in state:
                    state["prev"] = state["m"]
                    state["m"] = state["m"] * 0.9 + p.grad
                else:
                    state["prev"], state["m"] = torch.zeros_like(p), p.grad.clone()
                p.add_(state["m"], alpha=-0.1)


def test_optimizer_state_replaced_out_of_place_is_one_tensor_before_and_one_after():
    # The old momentum stays (in "prev"): state of the step, persistent; the new momentum is
    # made in the step and held to its end; the previous "prev", freed in the step without a
    # read, takes no memory in the graph. Before, the out-of-place state was two persistent
    # tensors (review 45r F4), and then, judged slot by slot, the old momentum was an input
    # freed after its last read although "prev" keeps it (review 45s G2).
    step = st.capture(nn.Linear(256, 256, bias=False), torch.randn(8, 256),
                      optimizer=_KeepsPrevious, path=None, scale_batch=False)
    big = sorted((t["kind"], t["name"], t.get("held_to_step_end", False),
                  t.get("carried_over", False))
                 for t in step.graph["tensors"] if t["bytes"] == 256 * 256 * 4)
    states = [b for b in big if b[0] in ("optimizer_state", "input")]
    assert [b[0] for b in states] == ["optimizer_state"], big
    # The new momentum is the next step's: carried over, so no plan leaves it on the host
    # (review 46r F2).
    assert ("workspace", "m:weight", True, True) in big, big


def test_gradients_are_held_and_never_carried_over():
    """A gradient is held to the step's end either way, and never carried over: one that
    zero_grad(set_to_none=True) frees is dead after its last read, and one that zero_grad()
    zeroes the next step only writes (spill brings it back from the host without a copy), so a
    plan may leave it on the host for the rest of the step. Carried over for a while, such
    gradients made a plan of docs/pytorch.md's MLP ask for 11 MiB where the run needs 9
    (review 46s F1)."""
    for set_to_none in (True, False):
        step = st.capture(Tiny, torch.randn(8, 64), path=None, set_to_none=set_to_none)
        grads = [t for t in step.graph["tensors"] if t["name"].startswith("grad:")]
        assert len(grads) == 6 and all(t.get("held_to_step_end") for t in grads), grads
        assert not any(t.get("carried_over") for t in grads), grads


class _StateAliases(torch.optim.Optimizer):
    """Momentum in place, a second slot that is the momentum, and a slot that holds what
    ``alias(p)`` gives: the parameter itself, or a view of its storage."""

    def __init__(self, params, alias) -> None:
        super().__init__(params, dict(lr=0.1))
        self.alias = alias

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "m" not in state:
                    state["m"] = torch.zeros_like(p)
                    state["same_m"] = state["m"]
                state["m"].mul_(0.9).add_(p.grad)
                state["ema"] = self.alias(p)  # (again each step, as a custom optimizer may)
                p.add_(state["m"], alpha=-0.1)


@pytest.mark.parametrize("alias", [lambda p: p, lambda p: p.detach(), lambda p: p.view(-1),
                                   lambda p: p.detach().view(-1)[:4]],
                         ids=["itself", "detached", "view", "slice"])
def test_optimizer_state_that_aliases_a_parameter_is_the_parameter(alias):
    # The same bytes as the weight: the weight, named as its parameter, counted once. Before,
    # the slot relabelled the weight's storage optimizer_state "ema:<parameter>", and the
    # parameters were missing from the graph's weights.
    step = st.capture(nn.Linear(16, 8), torch.randn(4, 16),
                      optimizer=functools.partial(_StateAliases, alias=alias), path=None)
    at_start = sorted((t["kind"], t["name"], t["bytes"]) for t in step.graph["tensors"]
                      if t["kind"] in ("weight", "optimizer_state", "buffer", "input"))
    assert at_start == [("input", "input0", 4 * 16 * 4),
                        ("optimizer_state", "m:bias", 8 * 4),
                        ("optimizer_state", "m:weight", 8 * 16 * 4),
                        ("weight", "bias", 8 * 4), ("weight", "weight", 8 * 16 * 4)], at_start
    assert step.parameter_count == 8 * 16 + 8 and step.batch_scaling is None


def test_an_input_that_requires_grad_has_its_gradient_of_this_step_only():
    # The unrecorded first step's input gradient was kept, and the recorded backward added to
    # it: a persistent "buffer" and an add_ no real loop has (review 45r F5).
    x = torch.randn(64, 32, requires_grad=True)
    step = st.capture(nn.Linear(32, 16), x, path=None)
    kinds = sorted(t["kind"] for t in step.graph["tensors"])
    assert "buffer" not in kinds, step.graph["tensors"]
    assert "add_" not in [op["type"] for op in step.graph["ops"] if op["phase"] == "backward"]
    assert x.grad is None


def test_a_mapping_of_inputs_is_keyword_arguments_as_a_dict_is():
    # transformers' BatchEncoding is a collections.UserDict, not a dict (audit 45a F19).
    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e = nn.Embedding(50, 8)

        def forward(self, ids, scale):
            return self.e(ids) * scale

    inputs = {"ids": torch.zeros(4, 6, dtype=torch.long), "scale": torch.ones(4, 6, 1)}
    plain = st.capture(Keywords, inputs, path=None)
    step = st.capture(Keywords, collections.UserDict(inputs), path=None)
    assert step.graph == plain.graph and step.batch == 4


class _Encoding(collections.UserDict):
    """As transformers' BatchEncoding: a UserDict whose items are also attributes."""

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


def test_inputs_nested_in_mappings_lists_and_tuples_are_inputs_the_model_gets_on_meta():
    # Before, tensors in a mapping that is not a dict (a BatchEncoding, a mappingproxy) inside
    # the inputs were neither inputs nor moved to meta: the model got the caller's tensors and
    # the step failed on mixed devices; a defaultdict could not be rebuilt (a bare TypeError).
    received = []

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, batch, scale):
            received.append((type(batch["text"]), batch["extra"].default_factory,
                             [t.device.type for t in (batch["text"].ids, batch["text"]["mask"],
                                                      *batch["extra"]["bias"], scale[0])]))
            text = batch["text"]
            return (self.fc(text.ids) * text["mask"] + sum(batch["extra"]["bias"])).sum() \
                * scale[0]

    batch = {"text": _Encoding(ids=torch.randn(4, 8), mask=torch.ones(4, 4)),
             "extra": collections.defaultdict(list, bias=[torch.zeros(4, 4), torch.zeros(1, 4)])}
    scale = (torch.ones(()),)
    step = st.capture(Nested, {"batch": types.MappingProxyType(batch), "scale": scale},
                      optimizer=None, path=None)
    assert step.batch == 4 and step.batch_scaling is None, step.batch_scaling
    inputs = sorted((t["name"], t["bytes"], t.get("batch_bytes", 0))
                    for t in step.graph["tensors"] if t["kind"] == "input")
    assert inputs == [("input0", 128, 128), ("input1", 64, 64), ("input2", 64, 64),
                      ("input3", 16, 0), ("input4", 4, 0)], inputs
    assert received and all(r == (_Encoding, list, ["meta"] * 5) for r in received), received
    assert batch["text"].ids.device.type == "cpu"  # the caller's inputs are left as they were


def test_a_tensor_passed_twice_is_one_input():
    # An input passed twice, or that is also the target (a language model's ids), is one
    # tensor of the step, at both batches; before, each place made its own input and the bytes
    # counted twice.
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, a, b):
            return self.fc(a) + b

    x = torch.randn(4, 8)
    step = st.capture(Pair, (x, x), loss_fn=lambda out, y: (out - y).square().sum(), targets=x,
                      path=None)
    inputs = [(t["bytes"], t.get("batch_bytes", 0))
              for t in step.graph["tensors"] if t["kind"] == "input"]
    assert inputs == [(128, 128)], inputs
    assert step.batch_scaling is None, step.batch_scaling
    step = st.capture(Pair, (x, x.clone()), path=None)  # equal, but two tensors
    assert sum(t["kind"] == "input" for t in step.graph["tensors"]) == 2


def test_inputs_that_cannot_be_copied_onto_meta_are_refused_naming_where_they_are():
    @dataclasses.dataclass
    class Batch:
        ids: torch.Tensor

    class Fixed(collections.abc.Mapping):  # a mapping its own type cannot be built from a dict
        def __init__(self, ids, mask) -> None:
            self._items = {"ids": ids, "mask": mask}

        def __getitem__(self, key):
            return self._items[key]

        def __iter__(self):
            return iter(self._items)

        def __len__(self):
            return len(self._items)

    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=re.escape(
            "example_inputs['batch'][1].ids is a tensor (or holds tensors) inside a Batch")):
        st.capture(lambda: nn.Linear(8, 4), {"batch": [x, Batch(x)]}, path=None)
    with pytest.raises(TypeError, match=re.escape("example_inputs[0]['input'] is a Fixed, a "
                                                  "mapping that cannot be rebuilt")):
        st.capture(lambda: nn.Linear(8, 4), ({"input": Fixed(x, x)},), path=None)
    with pytest.raises(TypeError, match=re.escape("targets['y'].ids")):
        st.capture(lambda: nn.Linear(8, 4), x, loss_fn=lambda out, y: out.sum(),
                   targets={"y": Batch(x)}, path=None)


def test_model_forms_and_the_callers_model_is_untouched():
    x = torch.randn(4, 64)
    real = Tiny()
    before = [p.detach().clone() for p in real.parameters()]
    a = st.capture(real, x, path=None)
    assert all(p.device.type == "cpu" and p.grad is None for p in real.parameters())
    assert all(torch.equal(p, q) for p, q in zip(real.parameters(), before))
    b = st.capture(Tiny, x, path=None)
    if hasattr(torch.device("meta"), "__enter__"):
        with torch.device("meta"):
            on_meta = Tiny()
    else:
        on_meta = Tiny().to("meta")
    c = st.capture(on_meta, x, path=None)
    assert a.graph == b.graph == c.graph
    with pytest.raises(TypeError, match="nn.Module"):
        st.capture(42, x, path=None)


def test_batch_scaling_matches_a_capture_at_that_batch(tmp_path):
    small, large = tmp_path / "b2.json", tmp_path / "b6.json"
    two = gpt2_step(batch=2, seq=64, path=small)
    assert two.batch == 2 and two.batch_scaling is None and two.graph["batch"] == 2
    gpt2_step(batch=6, seq=64, path=large)
    args = ["--device", "a100-40gb", "--link", "pcie4", "--policy", "none"]
    rescaled = spill_plan(str(small), "--batch", "6", *args)
    captured = spill_plan(str(large), *args)
    assert rescaled["batch"] == captured["batch"] == 6
    assert rescaled["unlimited_peak_bytes"] == captured["unlimited_peak_bytes"]
    t1 = rescaled["policies"][0]["unlimited_step_time_s"]
    t2 = captured["policies"][0]["unlimited_step_time_s"]
    assert abs(t1 - t2) <= 1e-6 * t2
    found = spill_plan(str(small), "--device", "v100-16gb", "--link", "nvlink2-p9",
                       "--policy", "spill", "--max-batch", "50")["max_batch"][0]
    assert found["batch"] >= 2 and found["feasible"]


def test_batch_of_one_says_why_it_does_not_scale():
    # PyTorch takes other paths for a batch of one (views where larger batches copy).
    step = gpt2_step(batch=1, seq=32, path=None)
    assert "batch" not in step.graph and "depends on the batch" in step.batch_scaling
    assert "capture at a batch of 2 or more" in step.batch_scaling


# ----- steps that need data ----------------------------------------------------------------

class Nonzero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)[x.nonzero(as_tuple=True)]


class Item(Nonzero):
    def forward(self, x):
        y = self.fc(x)
        return y * 2 if y.max().item() > 0 else y


class OnCpu(Nonzero):
    def forward(self, x):
        return self.fc(x) + torch.ones(4, device="cpu").sum(0, keepdim=True).expand(4, 4)


def test_data_dependent_shape_names_the_op():
    with pytest.raises(st.CaptureError, match=r"aten\.nonzero.*module 'fc'|aten\.nonzero") as e:
        st.capture(Nonzero, torch.randn(2, 4), path=None)
    assert "data-dependent shape" in str(e.value) and "What you can do" in str(e.value)
    assert e.value.op == "aten.nonzero" and e.value.phase == "forward"


def test_a_capture_error_is_a_spill_error():
    """`except spill.Error` catches every failure spill raises (python.md), a capture's too;
    it stays a RuntimeError for code that caught that."""
    with pytest.raises(spill.Error) as e:
        st.capture(Nonzero, torch.randn(2, 4), path=None)
    assert isinstance(e.value, st.CaptureError) and isinstance(e.value, RuntimeError)
    assert e.value.code == spill.Status.OK and e.value.op == "aten.nonzero"


def test_reading_a_value_names_the_op():
    with pytest.raises(st.CaptureError, match=r"aten\._local_scalar_dense|aten\.item") as e:
        st.capture(Item, torch.randn(2, 4), path=None)
    assert ".item()" in str(e.value)


def test_custom_op_without_meta_kernel_names_the_op():
    lib = torch.library.Library("spill_capture_test", "DEF")
    lib.define("scale(Tensor x) -> Tensor")
    lib.impl("scale", lambda x: x * 2, "CPU")

    class Custom(Nonzero):
        def forward(self, x):
            return torch.ops.spill_capture_test.scale(self.fc(x))

    with pytest.raises(st.CaptureError, match=r"spill_capture_test\.scale.*meta kernel") as e:
        st.capture(Custom, torch.randn(2, 4), path=None)
    assert e.value.module == "" or e.value.phase == "forward"
    assert "register_fake" in str(e.value)


class _ReadsSavedValuesInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (y.nonzero().shape[0] > 0)


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(8, 8), nn.Linear(8, 2)
        self.f = _Doubles()

    def forward(self, x):
        return self.c(self.f(self.a(x)))


class _Doubles(nn.Module):
    def forward(self, x):
        return _ReadsSavedValuesInBackward.apply(x * 2)


def test_a_backward_failure_names_the_module_whose_saved_tensors_it_reads():
    # Before, an error in the backward named the last forward layer (the loss) whatever
    # failed (audit 45a F18): here f's backward reads what f saved.
    with pytest.raises(st.CaptureError, match="nonzero in the backward pass, module 'f'") as e:
        st.capture(_Stack, torch.randn(4, 8), loss_fn=lambda out: out.sum(), path=None)
    assert (e.value.module, e.value.phase) == ("f", "backward")


class _Bags(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.EmbeddingBag(100, 16, mode="mean")
        self.o = nn.Linear(16, 2)

    def forward(self, x):
        return self.o(self.e(x))


def test_an_embedding_bag_captures():
    # torch 1.13 has no meta kernel for its weight gradient (_embedding_bag_dense_backward),
    # which the capture then refused, naming the loss as its module (audit 45a F18).
    step = st.capture(_Bags, torch.randint(0, 100, (4, 8)), path=None)
    grads = [t for t in step.graph["tensors"] if t["name"] == "grad:e.weight"]
    assert [t["bytes"] for t in grads] == [100 * 16 * 4], grads
    assert step.batch_scaling is None


def test_a_module_with_a_scripted_part_says_to_pass_a_callable():
    # A ScriptModule's deepcopy keeps its real tensors: the capture then blamed the optimizer
    # factory ("can't optimize a non-leaf Tensor": audit 45a F14).
    class Scripted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(TypeError, match=r"'a\.0\.weight' first.*TorchScript module 'a'"
                                        r".*pass a callable"):
        st.capture(Scripted(), torch.randn(4, 8), path=None)
    assert st.capture(Scripted, torch.randn(4, 8), path=None).op_count > 0


def test_model_that_does_not_run_on_meta_tensors():
    with pytest.raises(st.CaptureError, match="meta tensors") as e:
        st.capture(OnCpu, torch.randn(2, 4), path=None)
    assert e.value.phase == "forward"


class Masked(nn.Module):
    """Takes a (batch, 4, 8) input and a (4, 4) mask: at batch 4 the mask's first size is the
    batch's, and the capture at twice the batch doubled it too."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, mask):
        return self.lin(x).masked_fill(mask[None, :, :1], 0.0)


def test_a_step_that_fails_only_at_twice_the_batch_says_why_and_what_to_pass():
    x, mask = torch.randn(4, 4, 8), torch.zeros(4, 4, dtype=torch.bool)
    with pytest.raises(st.CaptureError, match=r"ran at batch 4 but not at 8.*scale_batch=False"):
        st.capture(Masked, (x, mask), path=None)
    step = st.capture(Masked, (x, mask), path=None, scale_batch=False)
    assert step.batch == 4 and "scale_batch=False" in step.batch_scaling


def test_an_empty_batch_and_an_optimizer_that_cannot_be_made_are_named():
    with pytest.raises(st.CaptureError, match="empty batch"):
        st.capture(Tiny, torch.randn(0, 64), path=None)
    with pytest.raises(st.CaptureError, match="optimizer factory failed .* 0 parameters"):
        st.capture(lambda: nn.ReLU(), torch.randn(2, 4), path=None)  # Adam of nothing
    with pytest.raises(st.CaptureError, match="must be a factory"):
        st.capture(Tiny, torch.randn(2, 64), path=None,
                   optimizer=torch.optim.SGD(Tiny().parameters(), lr=0.1))


def test_a_foreach_optimizer_without_meta_kernels_says_to_pass_foreach_false():
    """torch 1.13 has no meta kernels for the foreach ops: the error said to register one for
    aten's own op, in "module 'loss'". Newer torch captures it."""
    adamw = functools.partial(torch.optim.AdamW, foreach=True)
    try:
        st.capture(Tiny, torch.randn(2, 64), optimizer=adamw, path=None)
    except st.CaptureError as e:
        assert "foreach=False" in str(e) and "module" not in str(e), str(e)
        assert e.phase == "optimizer"
        st.capture(Tiny, torch.randn(2, 64), path=None,
                   optimizer=functools.partial(torch.optim.AdamW, foreach=False))


def test_loss_must_be_a_scalar():
    with pytest.raises(st.CaptureError, match="scalar"):
        st.capture(Tiny, torch.randn(2, 64), loss_fn=lambda out: out * 2, path=None)


def test_public_names_are_documented_and_typed():
    import test_package  # the package's own check, applied to spill.torch
    test_package.test_public_functions_have_docstrings_and_type_hints(st)


# ----- a real run's recorded step --------------------------------------------------------------

@pytest.fixture
def plan_sim():
    """A fresh session of spill on the simulated device that records steps (policy:plan)."""
    spill.shutdown()
    spill.configure("device:sim,sim_capacity:512MiB,budget:32MiB,policy:plan")
    yield
    spill.shutdown()


def record_sim_step(scope, op_name=lambda i: f"layer{i}"):
    """Two steps of `scope` over four swappable 8 MiB blocks, one op each (the first step is
    recorded); returns the blocks, for spill.free."""
    blocks = [spill.malloc(8 << 20) for _ in range(4)]
    for p in blocks:
        spill.set_swappable(p)
    for _ in range(2):
        with spill.step(scope=scope):
            for i, p in enumerate(blocks):
                spill.begin_op(op_name(i), scope=scope)
                spill.unpin(spill.pin_for_host(p), wrote=True)
    return blocks


def test_export_step_writes_a_recorded_step_that_spill_plan_replans(tmp_path, plan_sim):
    with pytest.raises(spill.Error) as e:
        st.export_step(tmp_path / "none.json", scope=3)
    assert e.value.code == spill.Status.NOT_FOUND
    assert "handle.scope" not in str(e.value)
    assert "handle.remove() and a guard's exit free the step" in str(e.value)  # (audit 45a F8)
    # At the default scope, the mistake of a reader who ran offload() and left scope out:
    # the message says where offload's step went (audit 38b #12).
    with pytest.raises(spill.Error) as e:
        st.export_step(tmp_path / "none.json")
    assert e.value.code == spill.Status.NOT_FOUND
    assert "no step of this scope was recorded" in str(e.value), str(e.value)
    assert "scope=handle.scope" in str(e.value), str(e.value)
    assert not (tmp_path / "none.json").exists()
    blocks = record_sim_step(3)
    path = st.export_step(tmp_path / "step.json", scope=3)
    graph = json.loads(pathlib.Path(path).read_text())
    assert graph["format"] == "spill-graph" and len(graph["tensors"]) >= 4
    report = spill_plan(path, "--device", "a10-24gb", "--link", "pcie4", "--budget", "16MiB")
    assert report["unlimited_peak_bytes"] >= 4 * (8 << 20)
    # Blocks, not parameters: the four blocks held from before the step, as bytes.
    assert report["parameters"] is None
    assert report["held_bytes_before_step"] == 4 * (8 << 20)
    assert {p["name"] for p in report["policies"]} == {"spill", "vdnn", "threshold", "none"}
    for p in blocks:
        spill.free(p)


def test_only_spill_torch_imports_torch():
    code = ("import sys, spill; assert 'torch' not in sys.modules, 'spill imported torch'; "
            "import spill.torch; assert 'torch' in sys.modules")
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(st.__file__).parents[2]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_the_output_path_is_checked_before_the_step_and_a_file_not_a_graph_is_kept(
        tmp_path, monkeypatch):
    """capture(path="graph.json" by default) replaced any file of that name in the working
    directory without a word, and found a missing directory only after recording the step.
    Both are refused before the model is built; an earlier graph is replaced."""
    import spill
    built = []

    def model():
        built.append(1)
        return Tiny()

    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "graph.json"
    notes.write_text("my notes, not a graph\n")
    with pytest.raises(spill.InvalidArgumentError, match="'graph.json' exists and is not a "
                       "spill graph.*pass another path="):
        st.capture(model, torch.randn(8, 64), optimizer=None)
    with pytest.raises(spill.InvalidArgumentError, match="no directory 'nowhere'"):
        st.capture(model, torch.randn(8, 64), optimizer=None, path="nowhere/g.json")
    with pytest.raises(spill.InvalidArgumentError, match="a directory"):
        st.capture(model, torch.randn(8, 64), optimizer=None, path=tmp_path)
    assert built == [] and notes.read_text() == "my notes, not a graph\n"
    notes.unlink()
    first = st.capture(model, torch.randn(8, 64), optimizer=None, scale_batch=False)
    assert first.path == "graph.json" and json.loads(notes.read_text())["ops"]
    second = st.capture(model, torch.randn(16, 64), optimizer=None, scale_batch=False)
    assert json.loads(notes.read_text()) == second.graph  # an earlier graph is replaced
    empty = tmp_path / "empty.json"
    empty.write_text("")
    st.capture(model, torch.randn(8, 64), optimizer=None, path=empty, scale_batch=False)
    assert json.loads(empty.read_text())["format"] == "spill-graph"


def test_capture_writes_to_its_own_stdout_and_its_write_errors_are_spill_errors(
        tmp_path, monkeypatch, capfd):
    """path="/dev/stdout" is written through the descriptor, also when it is a file (the
    check took the redirected file for one that would be replaced and refused it); a write
    that fails is a spill.Error as spill's own outputs' (WriteFailedError for no room, a plain
    OSError before), and an unwritable path is refused before the step (review 38c)."""
    import errno
    import spill
    capture_module = sys.modules["spill.torch.capture"]  # (spill.torch.capture: the function)
    capfd.readouterr()
    step = st.capture(Tiny, torch.randn(8, 64), optimizer=None, path="/dev/stdout",
                      scale_batch=False)
    out = capfd.readouterr().out
    assert json.loads(out) == step.graph

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(capture_module, "write_text", full)
    with pytest.raises(spill.WriteFailedError, match="g.json.*No space left") as e:
        st.capture(Tiny, torch.randn(8, 64), optimizer=None, path=tmp_path / "g.json",
                   scale_batch=False)
    assert isinstance(e.value, spill.Error) and isinstance(e.value, OSError)
    monkeypatch.undo()
    if os.geteuid() != 0:  # (root writes anywhere)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(spill.InvalidArgumentError, match="permission denied"):
            st.capture(Tiny, torch.randn(8, 64), optimizer=None, path=locked / "g.json")


# ----- misuse: nested captures, sparse tensors, names, arguments (audit 45a) -----------------

def _global_module_hooks():
    from torch.nn.modules import module as nn_module
    return (dict(nn_module._global_forward_pre_hooks), dict(nn_module._global_forward_hooks))


class CapturesInForward(Tiny):
    def forward(self, x):
        st.capture(Tiny, torch.randn(4, 64), path=None)
        return super().forward(x)


def test_a_capture_inside_a_capture_is_refused_and_leaves_nothing_behind():
    """A capture run from another capture's loss_fn recorded its whole step (model build,
    forward, backward, optimizer) into the outer graph as forward ops of module 'loss', and
    the outer capture's global module hooks named the inner model's ops (audit 45a F3)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    x = torch.randn(8, 64)
    hooks = _global_module_hooks()
    plain = st.capture(Tiny, x, path=None)

    def nested_loss(out):
        st.capture(Tiny, torch.randn(4, 64), path=None)
        return out.sum()

    with pytest.raises(st.CaptureError, match="cannot run inside another capture"):
        st.capture(Tiny, x, loss_fn=nested_loss, path=None)
    with pytest.raises(st.CaptureError, match="cannot run inside another capture"):
        st.capture(CapturesInForward, x, path=None)
    inner = []

    def caught(out):  # refused before it records anything: the outer graph is untouched
        with pytest.raises(st.CaptureError, match="cannot run inside another capture") as e:
            st.capture(Tiny, torch.randn(4, 64), path=None)
        inner.append(e.value)
        return out.sum()

    assert st.capture(Tiny, x, loss_fn=caught, path=None).graph == plain.graph
    assert inner and ".numpy()" not in str(inner[0])
    # Nothing left behind: no module hooks, no dispatch mode; captures and training work.
    assert _global_module_hooks() == hooks and _get_current_dispatch_mode() is None
    assert st.capture(Tiny, x, path=None).graph == plain.graph
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()
    opt.step()
    assert all(p.grad is not None and p.grad.device.type == "cpu" for p in model.parameters())


class SparseEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(100, 32, sparse=True)

    def forward(self, ids):
        return self.e(ids)


@pytest.mark.parametrize("optimizer", [functools.partial(torch.optim.SGD, lr=0.1),
                                       torch.optim.SparseAdam])
def test_sparse_gradients_are_refused_naming_the_op_and_module(optimizer):
    """nn.Embedding(sparse=True) failed in the recorder ("Cannot access storage of
    SparseTensorImpl") with advice about .numpy() and printing tensors (audit 45a F4)."""
    ids = torch.randint(0, 100, (4, 8))
    with pytest.raises(st.CaptureError, match="sparse tensors are not supported") as e:
        st.capture(SparseEmbedding, ids, optimizer=optimizer, path=None)
    message = str(e.value)
    assert "aten.embedding" in message and "module 'e'" in message, message
    assert ".numpy()" not in message and e.value.phase == "backward"
    assert e.value.op == "aten._sparse_coo_tensor_with_dims_and_tensors" and e.value.module == "e"


def test_a_sparse_input_is_refused_naming_it():
    sparse = torch.eye(4).to_sparse()
    with pytest.raises(st.CaptureError, match="input0 is a sparse coo tensor") as e:
        st.capture(lambda: nn.Linear(4, 4), sparse, path=None)
    assert "not supported" in str(e.value)


class LongNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d = nn.ModuleDict({"k" * 1100: nn.Linear(8, 8), "j" * 1100: nn.Linear(8, 8)})

    def forward(self, x):
        return sum(m(x) for m in self.d.values())


def test_long_names_are_refused_or_shortened_so_spill_plan_reads_the_graph(tmp_path):
    """capture wrote names past the graph format's 1024 bytes, which spill plan refuses
    (audit 45a F6): the graph's own name is checked up front, labels are shortened."""
    built = []

    def model():
        built.append(1)
        return LongNames()

    x = torch.randn(4, 8)
    with pytest.raises(spill.InvalidArgumentError, match=r"name.* 1024 bytes.*\(1100 bytes\)"):
        st.capture(model, x, path=tmp_path / "g.json", name="n" * 1100)
    with pytest.raises(InvalidArgumentTypeError, match="name must be a string"):
        st.capture(model, x, path=None, name=42)
    assert built == [] and not (tmp_path / "g.json").exists()
    step = st.capture(model, x, path=tmp_path / "g.json", name="é" * 512)
    names = [t["name"] for t in step.graph["tensors"]] + [op["name"] for op in step.graph["ops"]]
    assert max(len(n.encode()) for n in names) <= 1024
    # Shortened labels keep their start and stay apart (a hash of the whole name).
    weights = [t["name"] for t in step.graph["tensors"] if t["kind"] == "weight"]
    assert len(set(weights)) == 4 and all(n.startswith("d.") for n in weights)
    assert any(n.startswith("d." + "k" * 100) for n in weights)
    report = spill_plan(str(tmp_path / "g.json"), "--device", "a10-24gb", "--link", "pcie4")
    assert report["unlimited_peak_bytes"] > 0


@pytest.mark.filterwarnings("ignore:Lazy modules are a new feature")
def test_capture_argument_misuse_is_named():
    """audit 45a F9: batch_dim=True was taken as 1; LBFGS failed with advice about .numpy();
    an uninitialised lazy module raised torch's own ValueError."""
    x = torch.randn(4, 64)
    with pytest.raises(InvalidArgumentTypeError, match="batch_dim must be an integer"):
        st.capture(Tiny, x, path=None, batch_dim=True)
    with pytest.raises(spill.InvalidArgumentError, match="batch_dim -1"):
        st.capture(Tiny, x, path=None, batch_dim=-1)
    with pytest.raises(InvalidArgumentTypeError, match="set_to_none"):
        st.capture(Tiny, x, path=None, set_to_none="no")
    with pytest.raises(st.CaptureError, match="LBFGS.*needs a closure.*not supported") as e:
        st.capture(Tiny, x, path=None, optimizer=torch.optim.LBFGS)
    assert ".numpy()" not in str(e.value) and e.value.phase == "optimizer"
    lazy = lambda: nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4))  # noqa: E731
    with pytest.raises(st.CaptureError, match=r"uninitiali[sz]ed.*'0\.weight'.*forward") as e:
        st.capture(lazy, x, path=None)
    initialised = lazy()
    initialised(x)
    assert st.capture(initialised, x, path=None).op_count > 0


def test_export_step_checks_its_path_and_device_as_capture_does(tmp_path, python_run, plan_sim):
    """export_step replaced a file that is not a graph (capture refuses), raised a raw
    TypeError for a path of another type, and said 'no step of this scope was recorded' for
    a device spill.torch does not run on (audit 45a F8)."""
    precious = tmp_path / "precious.txt"
    precious.write_text("precious\n")
    with pytest.raises(spill.InvalidArgumentError, match="spill.torch.export_step: "
                       ".*precious.txt' exists and is not a spill graph"):
        st.export_step(precious)
    assert precious.read_text() == "precious\n"
    for bad in (5, None):
        with pytest.raises(InvalidArgumentTypeError, match="export_step: path must be"):
            st.export_step(bad)
    with pytest.raises(spill.InvalidArgumentError, match="no directory"):
        st.export_step(tmp_path / "nowhere" / "g.json")
    with pytest.raises(InvalidArgumentTypeError, match="device must be an integer"):
        st.export_step(tmp_path / "g.json", device=True)
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        with pytest.raises(spill.InvalidArgumentError, match=f"no CUDA device {count}"):
            st.export_step(tmp_path / "g.json", device=count)
    assert not (tmp_path / "g.json").exists()
    if not torch.cuda.is_available():  # every ordinal is a simulated device: name the bridge's
        run = python_run("import spill, spill.torch as st\n"
                         "st.enable('budget:16MiB', target='cpu', device=1)\n"
                         "try:\n"
                         f"    st.export_step({str(tmp_path / 'g.json')!r}, device=3)\n"
                         "except spill.Error as e:\n"
                         "    print('ERROR', e)\n")
        assert "spill.torch runs on device 1, not 3: pass device=1" in run.stdout, \
            run.stdout + run.stderr


def test_export_step_writes_long_op_names_cut_so_spill_plan_reads_them(tmp_path, plan_sim):
    """spill.begin_op kept names of any length, and the graph export_step wrote from them was
    refused by spill plan (names of at most 1024 bytes; audit 45a F6): cut at 255 bytes, as
    block names are, between characters."""
    blocks = record_sim_step(3, lambda i: "é" * 1000 + str(i))
    path = st.export_step(tmp_path / "long.json", scope=3)
    names = [op["name"] for op in json.loads(pathlib.Path(path).read_text())["ops"]]
    assert len(names) == 4 and all(n == "é" * 127 for n in names), names
    report = spill_plan(path, "--device", "a10-24gb", "--link", "pcie4", "--budget", "16MiB")
    assert report["unlimited_peak_bytes"] >= 4 * (8 << 20)
    for p in blocks:
        spill.free(p)
