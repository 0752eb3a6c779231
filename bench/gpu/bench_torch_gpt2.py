#!/usr/bin/env python3
"""GPT-2 medium on a GPU, AdamW, one process per case (PyTorch's CUDA allocator is fixed once
used): plain PyTorch with all the memory it wants (the footprint), spill.torch at a third of
that footprint (enable + offload), torch.autograd.graph.save_on_cpu(pin_memory=True), and
activation checkpointing per block. Prints a table and writes JSON; bench/gpu/run_all.sh runs
it when a GPU and a CUDA torch exist. Numbers from it are labelled with the GPU and the date.

Beside each step's time (to the device's end of the step), the host's: the wall time until the
optimizer step returned (the host has issued the step's work by then) and the process's CPU
time over it (the training thread and autograd's device thread): a host time close to the step
time says the GPU waited for the host, unless the host waited for the device inside the step
(save_on_cpu's copies to the host do; spill's pins on CUDA do not). spill's steps also give
their swap counters and the host's time in the device's virtual-memory calls (``vmm.host_s``:
cuMemCreate, cuMemMap, ...).

--bridge runs the same cases on the CPU bridge (spill.torch.enable(target="cpu") in every case,
the small GPT of the bridge tests): a check that the script runs end to end, for CI, not a
benchmark.

Usage: bench_torch_gpt2.py [--batch 8] [--seq 1024] [--steps 6] [--json out.json] [--bridge]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import results_file  # noqa: E402  (bench/results_file.py)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = ("unlimited", "spill", "save_on_cpu", "checkpoint")


def child(case: str, batch: int, seq: int, steps: int, budget: int,
          bridge: bool = False) -> Dict[str, Any]:
    import torch
    if case == "spill" or bridge:
        import spill.torch as st
        if bridge:  # every case on spill's CPU allocator (the unlimited one measures the footprint)
            st.enable("swap_threshold:128KiB,sim_granularity:64KiB"
                      + (f",budget:{budget}B" if case == "spill" and budget else ""), target="cpu")
        else:
            st.enable(f"budget:{budget}B" if budget else None)
    sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
    from torch_train_models import GPT
    dev = "cpu" if bridge else "cuda"
    sync = (lambda: None) if bridge else torch.cuda.synchronize
    memory = st if bridge else torch.cuda
    torch.manual_seed(0)
    shape = dict(vocab=1024, d=256, layers=3, heads=4) if bridge else \
        dict(vocab=50257, d=1024, layers=24, heads=16)
    model = GPT(n_ctx=seq, **shape).to(dev)
    # torch's default implementation (the foreach kernels on CUDA) in every case: offload()
    # runs what plain torch runs (since 2026-12-04; it ran the per-parameter loop before).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    handle = st.offload(model, opt) if case == "spill" else None
    if case == "checkpoint":
        from torch.utils.checkpoint import checkpoint
        for block in model.h:
            block.forward = (lambda f: lambda x: checkpoint(f, x, use_reentrant=False))(
                block.forward)
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (batch, seq + 1), device=dev, generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    times: List[float] = []
    host: List[float] = []  # wall time until the optimizer step returned
    cpu: List[float] = []  # the process's CPU time over that
    losses: List[float] = []
    # spill's case: each step's swap figures (the difference of its counters over the step,
    # read after the step's time is taken), to see where a step's time over the unlimited
    # run went: demand fetches and reactive evictions are the plan not holding.
    per_step: List[Dict[str, float]] = []
    before = _swap_counters(st) if case == "spill" else {}
    for _ in range(steps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        if case == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu(pin_memory=not bridge):
                logits = model(x)
        else:
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        host.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(loss.item())
        sync()
        times.append(time.perf_counter() - t0)
        if case == "spill":
            now = _swap_counters(st)
            per_step.append({k: now[k] - before.get(k, 0) for k in now})
            before = now
    out: Dict[str, Any] = {"case": case, "step_s": times, "host_s": host, "cpu_s": cpu,
                           "losses": losses,
                           "peak_allocated": memory.max_memory_allocated(),
                           "peak_reserved": memory.max_memory_reserved()}
    if case == "spill":
        out["spill"] = {k: v for k, v in st.memory_stats().items()
                        if k.startswith("swap.") or k in ("budget_bytes", "num_ooms")}
        out["spill_steps"] = per_step
        del handle
    return out


# Cumulative swap counters of spill.torch.memory_stats() kept per step.
STEP_COUNTERS = ("swap.bytes_in", "swap.bytes_out", "swap.demand_fetches",
                 "swap.evictions_planned", "swap.evictions_reactive", "swap.prefetches",
                 "swap.prefetch_hits", "swap.prefetch_late", "swap.prefetches_skipped",
                 "swap.stall_s", "swap.steps_planned", "swap.deviations")


def _swap_counters(st: Any) -> Dict[str, float]:
    stats = st.memory_stats()
    # ... and every kind of the device's virtual-memory calls with their host time (vmm.*)
    return {k: v for k, v in stats.items() if k in STEP_COUNTERS or k.startswith("vmm.")}


def _step_line(s: Dict[str, float]) -> str:
    g = lambda k: s.get(k, 0)  # noqa: E731
    vmm_calls = sum(v for k, v in s.items() if k.startswith("vmm.") and k.endswith("_calls"))
    return (f"in {g('swap.bytes_in') / 2**30:.2f} GiB, out {g('swap.bytes_out') / 2**30:.2f} GiB, "
            f"demand {g('swap.demand_fetches'):.0f}, prefetch hits {g('swap.prefetch_hits'):.0f} "
            f"(late {g('swap.prefetch_late'):.0f}, skipped {g('swap.prefetches_skipped'):.0f}), "
            f"evictions planned {g('swap.evictions_planned'):.0f} / reactive "
            f"{g('swap.evictions_reactive'):.0f}, stall {g('swap.stall_s') * 1e3:.0f} ms, "
            f"planned {g('swap.steps_planned'):.0f}, deviations {g('swap.deviations'):.0f}, "
            f"VMM calls {vmm_calls:.0f} (host {g('vmm.host_s') * 1e3:.0f} ms)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json")
    p.add_argument("--child")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--bridge", action="store_true",
                   help="the cases on the CPU bridge with the bridge tests' small GPT: a check "
                   "of the script, not a benchmark")
    a = p.parse_args()
    if a.child:
        print("CASE " + json.dumps(child(a.child, a.batch, a.seq, a.steps, a.budget, a.bridge)))
        return 0
    results_file.check(a.json, "--json")
    import torch
    if not a.bridge and not torch.cuda.is_available():
        print("skip: no GPU")
        return 0
    gpu = "the CPU bridge (a check, not a benchmark)" if a.bridge else torch.cuda.get_device_name()
    results: Dict[str, Any] = {"gpu": gpu, "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "batch": a.batch,
                               "seq": a.seq, "cases": {}}
    budget = 0
    model = "a small GPT (3 blocks, width 256)" if a.bridge else "GPT-2 medium"
    print(f"{model}, batch {a.batch} x {a.seq}, AdamW, {results['gpu']}, torch "
          f"{results['torch']}, {results['date']}", flush=True)
    print(f"{'case':<14}{'step ms':>10}{'vs unlimited':>14}{'host ms':>9}{'CPU ms':>8}"
          f"{'peak GiB':>10}  losses equal", flush=True)
    base: Dict[str, Any] = {}
    failures = 0  # cases that failed or whose losses differ from the unlimited run's
    for case in CASES:
        # Each case's row is printed, and the JSON written, as soon as it is done: a run cut
        # short by its time limit keeps the cases it finished.
        if case == "spill" and budget == 0:
            results["cases"][case] = {"error": "not run: no unlimited run to size the budget"}
            print(f"{case:<14} not run: no unlimited run to size its budget", flush=True)
            continue
        cmd = [sys.executable, __file__, "--child", case, "--batch", str(a.batch), "--seq",
               str(a.seq), "--steps", str(a.steps), "--budget", str(budget)] + \
            (["--bridge"] if a.bridge else [])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("CASE ")]
        if r.returncode != 0 or not lines:
            err = (r.stderr or r.stdout)[-2000:]
            results["cases"][case] = {"error": err}
            failures += 1
            print(f"{case:<14} failed: {err.splitlines()[-1] if err.strip() else ''}", flush=True)
        else:
            res = json.loads(lines[-1][5:])
            results["cases"][case] = res
            if case == "unlimited":
                base = res
                results["footprint"] = res["peak_reserved"]
                budget = res["peak_reserved"] // 3
                results["budget"] = budget
            t = statistics.median(res["step_s"][1:])
            tb = statistics.median(base["step_s"][1:]) if "step_s" in base else float("nan")
            same = res["losses"] == base.get("losses")
            failures += not same
            h, c = (statistics.median(res[k][1:]) for k in ("host_s", "cpu_s"))
            print(f"{case:<14}{t * 1e3:>10.1f}{t / tb:>13.2f}x{h * 1e3:>9.1f}{c * 1e3:>8.1f}"
                  f"{res['peak_reserved'] / 2**30:>10.2f}  {same}", flush=True)
            for i, s in enumerate(res.get("spill_steps", [])):
                print(f"  spill step {i + 1}: {res['step_s'][i] * 1e3:.0f} ms (host "
                      f"{res['host_s'][i] * 1e3:.0f} ms, CPU {res['cpu_s'][i] * 1e3:.0f} ms); "
                      f"{_step_line(s)}", flush=True)
        if a.json:
            results_file.write(a.json, json.dumps(results, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
