#!/usr/bin/env python3
"""spill.torch on the CPU bridge, side by side in one run (each case in a process of its own:
spill's configuration and PyTorch's allocator are process-wide):

1. no budget pressure: step time of plain torch, the bridge alone (spill's allocator, no
   hooks), spill with offload() (its default: steps after the first run quiet, without
   swapping activations, since their peak stays under half the budget), offload(quiet=False)
   (every step armed, as under pressure) and spill with guard() on the same model and data
   (offload's overhead in percent, guard's cost per aten op);
2. the simulated link in real time (time_scale:1), the budget at a third of the footprint and
   the link slowed so that copying the step's swapped bytes takes about half its compute:
   step time against the unlimited run in the same configuration, the stall of the planned
   steps beside the first (reactive) step's (swap.stall_s: every wait of the host in the
   swapper), and a floor under any plan's stall: the optimizer step touches every parameter,
   gradient and optimizer state tensor, at most the budget of them is resident when it starts,
   so the rest comes in over the link during it, behind at best its own compute.

Methodology (the machine is shared and small: other work disturbs single steps by +-30%):
- the model computes on one thread in every case: torch.set_num_threads(1) and
  OPENBLAS_NUM_THREADS=1 / OMP_NUM_THREADS=1 (Debian's torch calls OpenBLAS, whose own thread
  pool ignores set_num_threads), so on a 2-core machine the simulated device's copy engine and
  mapping work get a core of their own, as a GPU's copy engines do not take the host's cores;
- the cases compared run at the same time as processes that take turns: each trains its first
  WARMUP steps (not measured: offload's first step is its recording step, caches fill), then
  waits; then, round after round, each case in turn runs a batch of steps while the others
  wait, so that every round measures all cases within a few seconds of each other;
- per round, the ratio of two cases' median steps (paired: the load drifts between rounds,
  little within one); a figure is the median over rounds of those ratios, beside each case's
  median step, fastest step and median CPU time of the process per step over all rounds; the
  load average is reported before and after.

With --pairs N (no budget, instead of the above): one process trains two copies of the model,
one under offload() and one on the bridge without hooks, a step of each in turn (N pairs after
3 warm-up steps each, the order swapped every pair), and prints the median over pairs of the
ratio of their thread CPU times (and wall times) per step, for offload's default (quiet steps)
and offload(quiet=False) in a process each: the hooks' cost over the bare allocator, with the
load's drift cancelled within each pair.

Usage: bench_torch_bridge.py [--model mlp] [--rounds 12] [--batch 4] [--only no_pressure|pressure]
                             [--link-gbps G] [--spill-conf CONF] [--json out.json] [--pairs N]
Run with Debian's /usr/bin/python3 (torch) and SPILL_LIBRARY pointing at build/libspill.so.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

import results_file  # (bench/results_file.py, beside this script)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WARMUP = 3  # steps of each process before the measured rounds (the first records, the second
#             becomes the plan, caches fill)
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STAT_KEYS = ("swap.stall_s", "swap.host_wait_s", "swap.bytes_in", "swap.bytes_out",
             "swap.demand_fetches", "swap.steps_planned", "allocated_bytes.peak", "vmm.host_s")


def child(args: argparse.Namespace) -> None:
    """One case, in this process: WARMUP steps, then ``rounds`` batches of ``batch`` steps, each
    when the parent says "go" on stdin; prints READY, then one BATCH line per batch (its steps'
    wall and CPU seconds), then CASE (spill's statistics per step, guard's ops per step)."""
    import torch
    torch.set_num_threads(1)  # and OPENBLAS_NUM_THREADS=1 in the environment (Case)
    sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
    from torch_train_models import train
    marks: Dict[str, Any] = {}
    stats: List[Dict[str, float]] = []
    ops: List[int] = []
    wall: List[float] = []
    cpu: List[float] = []
    faults: List[int] = []
    optimizer_s: List[float] = []
    optimizer_cpu_s: List[float] = []
    sample = bool(args.budget or args.conf)

    def now() -> None:
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    def report(kind: str) -> None:
        steps = list(range(1, len(wall), 2))  # (start, end) pairs
        out = {"step_s": [wall[i] - wall[i - 1] for i in steps],
               "cpu_s": [cpu[i] - cpu[i - 1] for i in steps],
               "faults": [faults[i] - faults[i - 1] for i in steps]}
        wall.clear()
        cpu.clear()
        faults.clear()
        print(kind + " " + json.dumps(out), flush=True)

    def wait_for_turn() -> None:
        if sys.stdin.readline().strip() != "go":
            raise SystemExit(0)

    def before(i: int) -> None:
        if i > 0:
            now()  # the end of step i - 1
        if "spill" in marks and sample:  # spill's statistics per step, in budget runs only
            stats.append({k: marks["spill"].stats().get(k, 0) for k in STAT_KEYS})
        if marks.get("guard") is not None:
            ops.append(marks["guard"].ops)
        if i >= WARMUP and (i - WARMUP) % args.batch == 0:
            if i == WARMUP:
                wall.clear()
                cpu.clear()
                faults.clear()
                print("READY", flush=True)
            else:
                report("BATCH")
            wait_for_turn()
        now()  # the start of step i

    wrap = lambda m, o: None  # noqa: E731
    if args.case != "plain":
        import spill
        import spill.torch as st
        marks["spill"] = spill
        conf = "swap_threshold:128KiB,sim_granularity:64KiB"
        for extra in (args.spill_conf, args.conf):
            if extra:
                conf += "," + extra
        st.enable(conf, target="cpu")
        if args.budget:
            spill.set_budget(args.budget)
        if args.case in ("offload", "armed"):
            def wrap(m: Any, o: Any) -> Any:
                handle = st.offload(m, o, quiet=0.5 if args.case == "offload" else False)
                marks["optimizer"] = o
                inner = o.step

                def step(*a: Any, **k: Any) -> Any:  # the optimizer step's wall time
                    t0, c0 = time.perf_counter(), time.thread_time()
                    result = inner(*a, **k)
                    optimizer_s.append(time.perf_counter() - t0)
                    optimizer_cpu_s.append(time.thread_time() - c0)
                    return result
                o.step = step
                return handle
        elif args.case == "guard":
            def wrap(m: Any, o: Any) -> Any:
                g = st.guard(optimizer=o, release_on_exit=False)
                g.__enter__()
                marks["guard"] = g
                return g
    train(args.model, WARMUP + args.rounds * args.batch, before, wrap=wrap)
    now()
    report("BATCH")
    out: Dict[str, Any] = {}
    if len(ops) > 1:
        out["ops_per_step"] = statistics.median(b - a for a, b in zip(ops, ops[1:]))
    if optimizer_s:
        out["optimizer_ms"] = statistics.median(optimizer_s[WARMUP:] or optimizer_s) * 1e3
        out["optimizer_cpu_ms"] = (statistics.median(optimizer_cpu_s[WARMUP:] or optimizer_cpu_s)
                                   * 1e3)
        # What the optimizer step touches: parameters, gradients, optimizer state.
        o = marks["optimizer"]
        tensors = {}
        for group in o.param_groups:
            for p in group["params"]:
                for t in [p, p.grad] + list(o.state.get(p, {}).values()):
                    if isinstance(t, torch.Tensor) and t.dim() > 0:
                        tensors[t.data_ptr()] = t.numel() * t.element_size()
        out["optimizer_bytes"] = sum(tensors.values())
    if "spill" in marks:
        stats.append({k: marks["spill"].stats().get(k, 0) for k in STAT_KEYS})
        out["per_step"] = [{k: b[k] - a[k] for k in STAT_KEYS} for a, b in zip(stats, stats[1:])]
        out["allocated_peak"] = stats[-1]["allocated_bytes.peak"]
    print("CASE " + json.dumps(out), flush=True)


def pairs_child(args: argparse.Namespace) -> None:
    """--pairs in this process: offload(quiet=args.quiet) against the bare bridge."""
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
    from torch_train_models import MODELS, _ce
    import spill.torch as st
    st.enable("swap_threshold:128KiB,sim_granularity:64KiB"
              + ("," + args.spill_conf if args.spill_conf else ""), target="cpu")
    make_model, make_optimizer, batch = MODELS[args.model]
    models = []
    for hooked in (True, False):
        torch.manual_seed(0)
        model = make_model()
        optimizer = make_optimizer(model)
        handle = st.offload(model, optimizer, quiet=args.quiet) if hooked else None
        models.append((model, optimizer, handle))

    # The bare model's step is a region of its own for offload's window: else, the hooked
    # model's handle being alive, its whole step would run as the loop's code between that
    # handle's regions, every op pinned by the window's dispatch mode (the bridge's steps were
    # so 8-12% slower than offload's from 2026-12-03, when the window came, to 2026-12-05). The
    # window's saved-tensor hooks stay pushed (one Python call per saved tensor, passed through).
    window = st._window.window()

    class BareRegion:  # (the window keeps its regions weakly)
        pass

    bare_region = BareRegion()

    def step(which: int, i: int) -> tuple:
        model, optimizer, _ = models[which]
        x, y = batch(i)
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        if which == 1:
            window.enter(bare_region)
        try:
            optimizer.zero_grad(set_to_none=True)
            loss = _ce(model(x), y)
            loss.backward()
            optimizer.step()
        finally:
            if which == 1:
                window.leave(bare_region)
        return time.thread_time() - cpu0, time.perf_counter() - wall0

    for i in range(WARMUP):
        step(0, i)
        step(1, i)
    cpu, wall = [], []
    for i in range(args.pairs):
        first = i % 2
        a = step(first, WARMUP + i)
        b = step(1 - first, WARMUP + i)
        hooked, bare = (a, b) if first == 0 else (b, a)
        cpu.append(hooked[0] / bare[0])
        wall.append(hooked[1] / bare[1])
    print("PAIRS " + json.dumps({"cpu": statistics.median(cpu), "wall": statistics.median(wall),
                                 "quiet_steps": models[0][2].quiet_steps}), flush=True)


def in_process(args: argparse.Namespace) -> Dict[str, Any]:
    """--pairs: offload's default and offload(quiet=False) against the bridge, in turn."""
    out: Dict[str, Any] = {}
    for label, quiet in (("quiet", "0.5"), ("armed", "0")):
        cmd = [sys.executable, __file__, "--pairs-child", "--model", args.model, "--pairs",
               str(args.pairs), "--quiet", quiet, "--spill-conf", args.spill_conf]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **ONE_THREAD))
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PAIRS ")]
        if r.returncode != 0 or not lines:
            raise SystemExit(f"--pairs {label} failed (exit {r.returncode}): {r.stderr[-2000:]}")
        out[label] = json.loads(lines[-1][len("PAIRS "):])
        v = out[label]
        print(f"  offload({'quiet=False' if label == 'armed' else 'default'}) vs the bridge, "
              f"{args.pairs} pairs in one process: thread CPU {100 * (v['cpu'] - 1):+.1f}%, wall "
              f"{100 * (v['wall'] - 1):+.1f}% ({v['quiet_steps']} quiet steps)", flush=True)
    return out


class Case:
    """A case's process, driven batch by batch."""

    def __init__(self, name: str, args: argparse.Namespace, budget: int = 0,
                 conf: str = "") -> None:
        self.name = name
        cmd = [sys.executable, __file__, "--child", name.split("@")[0], "--model", args.model,
               "--rounds", str(args.rounds), "--batch", str(args.batch), "--budget",
               str(budget), "--conf", conf, "--spill-conf", args.spill_conf]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=dict(os.environ, **ONE_THREAD))
        self.batches: List[Dict[str, List[float]]] = []
        self.result: Dict[str, Any] = {}

    def _line(self, kind: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(kind + " ") or line.strip() == kind:
                return line[len(kind):].strip()
        raise SystemExit(f"{self.name} ended before {kind} (exit {self.proc.wait()})")

    def ready(self) -> None:
        self._line("READY")

    def run_batch(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.batches.append(json.loads(self._line("BATCH")))

    def finish(self) -> None:
        self.result = json.loads(self._line("CASE"))
        if self.proc.wait() != 0:
            raise SystemExit(f"{self.name} failed (exit {self.proc.returncode})")

    def steps(self, key: str = "step_s") -> List[float]:
        return [x for b in self.batches for x in b[key]]


def interleaved(cases: List[Case], rounds: int) -> None:
    """Every case's batches, in turns (see the module docstring)."""
    for c in cases:
        c.ready()
    for r in range(rounds):
        for c in cases[r % len(cases):] + cases[:r % len(cases)]:  # a different first each round
            c.run_batch()
    for c in cases:
        c.finish()


def summary(case: Case) -> Dict[str, float]:
    wall, cpu = case.steps(), case.steps("cpu_s")
    return {"median_ms": statistics.median(wall) * 1e3, "fastest_ms": min(wall) * 1e3,
            "cpu_median_ms": statistics.median(cpu) * 1e3, "steps": len(wall),
            "faults_median": statistics.median(case.steps("faults"))}


def paired(a: Case, b: Case, key: str = "step_s") -> float:
    """The median over rounds of (a's median step / b's median step) in the same round."""
    return statistics.median(statistics.median(x[key]) / statistics.median(y[key])
                             for x, y in zip(a.batches, b.batches))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--batch", type=int, default=4, help="steps a case runs per turn")
    p.add_argument("--only", choices=("no_pressure", "pressure"))
    p.add_argument("--link-gbps", type=float, default=0.0,
                   help="the link's speed each way in the budget runs (default: from the probe)")
    p.add_argument("--spill-conf", default="",
                   help="more of spill's configuration in every spill case (e.g. peak_guard:off)")
    p.add_argument("--json")
    p.add_argument("--pairs", type=int, default=0,
                   help="in-process pairs of offload and bridge steps instead of the cases")
    p.add_argument("--pairs-child", action="store_true")
    p.add_argument("--quiet", type=float, default=0.5)
    p.add_argument("--child")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--conf", default="")
    args = p.parse_args()
    if args.child:
        args.case = args.child
        child(args)
        return 0
    if args.pairs_child:
        pairs_child(args)
        return 0
    results_file.check(args.json, "--json")

    report: Dict[str, Any] = {"model": args.model, "rounds": args.rounds, "batch": args.batch,
                              "spill_conf": args.spill_conf,
                              "machine": "the 2-core build machine (shared)",
                              "date": time.strftime("%Y-%m-%d"),
                              "load_before": os.getloadavg()[0]}
    print(f"model {args.model}, measured on the 2-core build machine (shared), "
          f"{report['date']}, load average {report['load_before']:.2f} at the start; "
          + (f"{args.pairs} pairs of steps in one process after {WARMUP}" if args.pairs else
             f"{args.rounds} rounds of {args.batch} steps per case after {WARMUP}")
          + (f"; spill conf +{args.spill_conf}" if args.spill_conf else ""))
    if args.pairs:
        report["pairs"] = in_process(args)
        args.only = "none"
    # 1. No pressure: plain torch, the bridge alone (spill's allocator, no hooks), offload and
    # guard, taking turns.
    if args.only not in ("pressure", "none"):
        cases = [Case(c, args) for c in ("plain", "bridge", "offload", "armed", "guard")]
        interleaved(cases, args.rounds)
        plain, bridge, off, armed, grd = cases
        s = {c.name: summary(c) for c in cases}
        ops = grd.result["ops_per_step"]
        t_plain = s["plain"]["median_ms"]
        report["no_pressure"] = {
            "cases": s,
            "offload_vs_plain": paired(off, plain), "offload_vs_plain_cpu": paired(off, plain, "cpu_s"),
            "offload_vs_bridge": paired(off, bridge), "bridge_vs_plain": paired(bridge, plain),
            "armed_vs_plain": paired(armed, plain),
            "armed_vs_plain_cpu": paired(armed, plain, "cpu_s"),
            "guard_vs_plain": paired(grd, plain), "guard_ops_per_step": ops,
            "guard_us_per_op": 1e3 * t_plain * (paired(grd, plain) - 1) / ops,
            "guard_cpu_us_per_op": (1e3 * s["plain"]["cpu_median_ms"]
                                    * (paired(grd, plain, "cpu_s") - 1) / ops)}
        np_ = report["no_pressure"]
        print("no pressure (median / fastest / median CPU ms per step over all rounds; median page "
              "faults per step):")
        for c, v in s.items():
            print(f"  {c:8s} {v['median_ms']:7.1f} / {v['fastest_ms']:7.1f} / "
                  f"{v['cpu_median_ms']:7.1f}  ({v['faults_median']:.0f} page faults)")
        print(f"  paired medians over rounds: offload vs plain "
              f"{100 * (np_['offload_vs_plain'] - 1):+.1f}% (CPU "
              f"{100 * (np_['offload_vs_plain_cpu'] - 1):+.1f}%), offload vs bridge "
              f"{100 * (np_['offload_vs_bridge'] - 1):+.1f}%, bridge vs plain "
              f"{100 * (np_['bridge_vs_plain'] - 1):+.1f}%; offload(quiet=False) vs plain "
              f"{100 * (np_['armed_vs_plain'] - 1):+.1f}% (CPU "
              f"{100 * (np_['armed_vs_plain_cpu'] - 1):+.1f}%); guard "
              f"{100 * (np_['guard_vs_plain'] - 1):+.1f}%, {ops:.0f} ops/step: "
              f"{np_['guard_us_per_op']:.1f} us per op (CPU {np_['guard_cpu_us_per_op']:.1f})")

    # 2. Pressure with the link in real time: the footprint and the bytes moved per step from
    # probes at time_scale 0, then a link that copies those bytes in about half the compute
    # (the unlimited offload step, every step armed), unlimited and budget runs taking turns.
    if args.only not in ("no_pressure", "none"):
        probe_args = argparse.Namespace(**{**vars(args), "rounds": 2, "batch": 2})
        probe0 = Case("armed", probe_args)
        interleaved([probe0], 2)
        footprint = probe0.result["allocated_peak"]
        budget = footprint // 3
        probe = Case("offload", probe_args, budget)
        interleaved([probe], 2)
        moved = statistics.median(s["swap.bytes_in"] + s["swap.bytes_out"]
                                  for s in probe.result["per_step"][WARMUP:])
        compute_s = statistics.median(probe0.steps())
        gbps = max(moved / (0.5 * compute_s) / 2 / 1e9, 0.01)  # each way carries about half
        if args.link_gbps:  # the same link for runs compared with each other
            gbps = args.link_gbps
        conf = f"time_scale:1,link_gbps:{gbps:.4g}"
        # The unlimited run with every step armed, as the budget run's steps are (their peaks
        # pass half the budget) and as in the tables before quiet steps existed.
        unlimited = Case("armed", args, 0, conf)
        pressured = Case("offload@budget", args, budget, conf)
        interleaved([unlimited, pressured], args.rounds)
        u, b = summary(unlimited), summary(pressured)
        per_step = pressured.result["per_step"]
        # swap.stall_s holds every wait of the host in the swapper (swap-ins, cancelled
        # swap-outs, room); swap.host_wait_s is its room part again, in wall time.
        stall = lambda st: st["swap.stall_s"] * 1e3  # noqa: E731
        report["pressure"] = {
            "footprint_mib": footprint / 2**20, "budget_mib": budget / 2**20,
            "moved_mib_per_step": moved / 2**20, "link_gbps": gbps, "conf": conf,
            "unlimited": u, "budget": b,
            "ratio": paired(pressured, unlimited),
            "cpu_ratio": paired(pressured, unlimited, "cpu_s"),
            "first_step_stall_ms": stall(per_step[0]),
            "first_step_demand_fetches": per_step[0]["swap.demand_fetches"],
            "planned_step_stall_ms": statistics.median(stall(st) for st in per_step[WARMUP:]),
            "planned_demand_fetches": statistics.median(st["swap.demand_fetches"]
                                                        for st in per_step[WARMUP:]),
            "planned_steps": sum(st["swap.steps_planned"] for st in per_step[WARMUP:]),
            # the host's time in the simulated device's map and unmap work (mmap, page tables)
            "planned_vmm_host_ms": statistics.median(st["vmm.host_s"] * 1e3
                                                     for st in per_step[WARMUP:])}
        pr = report["pressure"]
        # A floor under any plan's stall: the optimizer step touches every parameter, gradient
        # and optimizer state tensor, and at most the budget of them is resident when it
        # starts, so the rest comes in during it, hidden at best behind its own compute (the
        # unlimited run's optimizer step).
        opt_bytes = unlimited.result.get("optimizer_bytes", 0)
        opt_ms = unlimited.result.get("optimizer_ms", 0.0)
        pr["optimizer_bytes_mib"] = opt_bytes / 2**20
        pr["optimizer_unlimited_ms"] = opt_ms
        pr["optimizer_stall_floor_ms"] = max(0.0, max(0, opt_bytes - budget) / (gbps * 1e9) * 1e3
                                             - opt_ms)
        print(f"budget {pr['budget_mib']:.1f} MiB of {pr['footprint_mib']:.1f} MiB, link "
              f"{gbps:.3g} GB/s in real time, {pr['moved_mib_per_step']:.0f} MiB moved per step: "
              f"{b['median_ms']:.1f} vs {u['median_ms']:.1f} ms unlimited (paired "
              f"{pr['ratio']:.2f}x; fastest {b['fastest_ms']:.1f} vs {u['fastest_ms']:.1f}; CPU "
              f"{b['cpu_median_ms']:.1f} vs {u['cpu_median_ms']:.1f} ms, paired "
              f"{pr['cpu_ratio']:.2f}x); stall: first step {pr['first_step_stall_ms']:.1f} ms "
              f"({pr['first_step_demand_fetches']:.0f} demand fetches), planned steps "
              f"{pr['planned_step_stall_ms']:.1f} ms ({pr['planned_demand_fetches']:.0f}; "
              f"{pr['planned_steps']:.0f} steps planned); page faults per step "
              f"{b['faults_median']:.0f} vs {u['faults_median']:.0f}; the host's time in the "
              f"device's virtual-memory calls {pr['planned_vmm_host_ms']:.1f} ms a planned step")
        pr["optimizer_budget_ms"] = pressured.result.get("optimizer_ms", 0.0)
        pr["optimizer_budget_cpu_ms"] = pressured.result.get("optimizer_cpu_ms", 0.0)
        print(f"the optimizer step under the budget: {pr['optimizer_budget_ms']:.1f} ms "
              f"(its thread's CPU {pr['optimizer_budget_cpu_ms']:.1f} ms), median of the "
              f"measured steps")
        print(f"the optimizer step touches {pr['optimizer_bytes_mib']:.1f} MiB and takes "
              f"{opt_ms:.1f} ms unlimited: at most the budget is resident when it starts, the rest "
              f"comes in during it, so no plan stalls less than "
              f"{pr['optimizer_stall_floor_ms']:.1f} ms per step")
    report["load_after"] = os.getloadavg()[0]
    print(f"load average {report['load_after']:.2f} at the end")
    if args.json:
        results_file.write(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
