#!/usr/bin/env python3
"""spill.torch on the CPU bridge, side by side in one run (each case in a process of its own:
spill's configuration and PyTorch's allocator are process-wide):

1. no budget pressure: step time of plain torch, the bridge alone (spill's allocator, no
   hooks), spill with offload() and spill with guard() on the same model and data (offload's
   overhead in percent, guard's cost per aten op);
2. the simulated link in real time (time_scale:1), the budget at a third of the footprint and
   the link slowed so that copying the step's swapped bytes takes about half its compute:
   step time against the unlimited run in the same configuration, and the stall of the planned
   steps beside the first (reactive) step's.

Methodology (the machine is shared and small: other work disturbs single steps):
- the model computes on one thread in every case: torch.set_num_threads(1) and
  OPENBLAS_NUM_THREADS=1 / OMP_NUM_THREADS=1 (Debian's torch calls OpenBLAS, whose own thread
  pool ignores set_num_threads), so on a 2-core machine the simulated device's copy engine and
  mapping work get a core of their own, as a GPU's copy engines do not take the host's cores;
- the cases run interleaved, round after round (load drifts), each round a fresh process per
  case; the first WARMUP steps of each process are left out (the first step of offload is its
  recording step; allocator caches fill);
- each figure is the median over all rounds' remaining steps (the typical step), with the
  fastest step (the least disturbed) and the median CPU time of the process per step beside it;
  overheads are ratios of medians; the load average is reported before and after.

Usage: bench_torch_bridge.py [--model mlp] [--steps 30] [--rounds 3] [--only no_pressure|pressure]
                             [--link-gbps G] [--json out.json]
Run with Debian's /usr/bin/python3 (torch) and SPILL_LIBRARY pointing at build/libspill.so.
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(args: argparse.Namespace) -> Dict[str, Any]:
    """One case, in this process."""
    import torch
    torch.set_num_threads(1)  # and OPENBLAS_NUM_THREADS=1 in the environment (run())
    sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
    from torch_train_models import train
    times: List[float] = []
    cpu: List[float] = []
    ops: List[int] = []
    marks: Dict[str, Any] = {}
    sample = bool(args.budget or args.conf)

    def before(i: int) -> None:
        times.append(time.perf_counter())
        cpu.append(time.process_time())
        if marks.get("guard") is not None:
            ops.append(marks["guard"].ops)
        if "spill" in marks and sample:  # spill's statistics per step, in budget runs only
            marks.setdefault("stats", []).append(dict(marks["spill"].stats()))

    wrap = lambda m, o: None  # noqa: E731
    if args.case != "plain":
        import spill
        import spill.torch as st
        marks["spill"] = spill
        conf = "swap_threshold:128KiB,sim_granularity:64KiB"
        if args.conf:
            conf += "," + args.conf
        st.enable(conf, target="cpu")
        if args.budget:
            spill.set_budget(args.budget)
        if args.case == "offload":
            wrap = lambda m, o: st.offload(m, o)  # noqa: E731
        elif args.case == "guard":
            def wrap(m: Any, o: Any) -> Any:
                g = st.guard(optimizer=o, release_on_exit=False)
                g.__enter__()
                marks["guard"] = g
                return g
    train(args.model, args.steps + 1, before, wrap=wrap)
    times.append(time.perf_counter())
    cpu.append(time.process_time())
    step_s = [b - a for a, b in zip(times, times[1:])]
    cpu_s = [b - a for a, b in zip(cpu, cpu[1:])]
    out: Dict[str, Any] = {"case": args.case, "step_s": step_s, "cpu_s": cpu_s}
    if len(ops) > 1:
        out["ops_per_step"] = statistics.median(b - a for a, b in zip(ops, ops[1:]))
    if "spill" in marks:
        import spill
        marks.setdefault("stats", []).append(dict(spill.stats()))
        s = marks["stats"]
        keys = ("swap.stall_s", "swap.host_wait_s", "swap.bytes_in", "swap.bytes_out",
                "swap.demand_fetches", "swap.steps_planned", "reserved_bytes.peak",
                "allocated_bytes.peak")
        out["per_step"] = [{k: b.get(k, 0) - a.get(k, 0) for k in keys}
                           for a, b in zip(s, s[1:])]
        out["allocated_peak"] = s[-1]["allocated_bytes.peak"]
    return out


WARMUP = 2           # steps of each process left out of the no-pressure figures
PRESSURE_WARMUP = 3  # and of the budget runs (the first records, the second becomes the plan)
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(case: str, args: argparse.Namespace, budget: int = 0, conf: str = "",
        steps: int = 0) -> Dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", case, "--model", args.model,
           "--steps", str(steps or args.steps), "--budget", str(budget), "--conf", conf]
    env = dict(os.environ, **ONE_THREAD)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("CASE ")]
    if r.returncode != 0 or not line:
        raise SystemExit(f"{case} failed:\n{r.stdout}\n{r.stderr}")
    return json.loads(line[-1][5:])


def pooled(runs: List[Dict[str, Any]], key: str, skip: int) -> List[float]:
    """The steps of every run after its first ``skip``."""
    return [x for r in runs for x in r[key][skip:]]


def summary(runs: List[Dict[str, Any]], skip: int) -> Dict[str, float]:
    wall, cpu = pooled(runs, "step_s", skip), pooled(runs, "cpu_s", skip)
    return {"median_ms": statistics.median(wall) * 1e3, "fastest_ms": min(wall) * 1e3,
            "cpu_median_ms": statistics.median(cpu) * 1e3, "steps": len(wall)}


def load() -> float:
    return os.getloadavg()[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pressure-steps", type=int, default=12)
    p.add_argument("--only", choices=("no_pressure", "pressure"))
    p.add_argument("--link-gbps", type=float, default=0.0,
                   help="the link's speed each way in the budget runs (default: from the probe)")
    p.add_argument("--json")
    p.add_argument("--child")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--conf", default="")
    args = p.parse_args()
    if args.child:
        args.case = args.child
        print("CASE " + json.dumps(child(args)))
        return 0

    report: Dict[str, Any] = {"model": args.model, "steps": args.steps, "rounds": args.rounds,
                              "machine": "the 2-core build machine (shared)",
                              "date": time.strftime("%Y-%m-%d"), "load_before": load()}
    print(f"model {args.model}, measured on the 2-core build machine (shared), "
          f"{report['date']}, load average {report['load_before']:.2f} at the start")
    # 1. No pressure: plain torch, the bridge alone (spill's allocator, no hooks), offload and
    # guard, interleaved over rounds.
    cases: Dict[str, List[Dict[str, Any]]] = {c: [] for c in ("plain", "bridge", "offload",
                                                              "guard")}
    if args.only != "pressure":
        for _ in range(args.rounds):
            for case in cases:
                cases[case].append(run(case, args))
        s = {c: summary(rs, WARMUP) for c, rs in cases.items()}
        ops = statistics.median(r["ops_per_step"] for r in cases["guard"])
        plain, off, grd = s["plain"], s["offload"], s["guard"]
        report["no_pressure"] = {
            "cases": s,
            "offload_overhead_pct": 100 * (off["median_ms"] / plain["median_ms"] - 1),
            "offload_cpu_overhead_pct": 100 * (off["cpu_median_ms"] / plain["cpu_median_ms"] - 1),
            "offload_fastest_overhead_pct": 100 * (off["fastest_ms"] / plain["fastest_ms"] - 1),
            "bridge_overhead_pct": 100 * (s["bridge"]["median_ms"] / plain["median_ms"] - 1),
            "guard_ops_per_step": ops,
            "guard_us_per_op": 1e3 * (grd["median_ms"] - plain["median_ms"]) / ops,
            "guard_cpu_us_per_op": 1e3 * (grd["cpu_median_ms"] - plain["cpu_median_ms"]) / ops}
        np_ = report["no_pressure"]
        print(f"no pressure ({args.rounds} rounds x {args.steps - WARMUP} steps; median / "
              f"fastest / median CPU ms per step):")
        for c, v in s.items():
            print(f"  {c:8s} {v['median_ms']:7.1f} / {v['fastest_ms']:7.1f} / "
                  f"{v['cpu_median_ms']:7.1f}")
        print(f"  offload vs plain: {np_['offload_overhead_pct']:+.1f}% (fastest "
              f"{np_['offload_fastest_overhead_pct']:+.1f}%, CPU "
              f"{np_['offload_cpu_overhead_pct']:+.1f}%); bridge alone "
              f"{np_['bridge_overhead_pct']:+.1f}%; guard {ops:.0f} ops/step, "
              f"{np_['guard_us_per_op']:.1f} us per op (CPU {np_['guard_cpu_us_per_op']:.1f})")

    # 2. Pressure with the link in real time: footprint and bytes moved at time_scale 0, then a
    # link that copies those bytes in about half the compute (the unlimited offload step).
    if args.only != "no_pressure":
        steps = args.pressure_steps
        probe0 = run("offload", args, 0, steps=4)
        footprint = probe0["allocated_peak"]
        budget = footprint // 3
        probe = run("offload", args, budget, steps=6)
        moved = statistics.median(s["swap.bytes_in"] + s["swap.bytes_out"]
                                  for s in probe["per_step"][PRESSURE_WARMUP:])
        compute_s = statistics.median(probe0["step_s"][WARMUP:])
        gbps = max(moved / (0.5 * compute_s) / 2 / 1e9, 0.01)  # each way carries about half
        if args.link_gbps:  # the same link for runs compared with each other
            gbps = args.link_gbps
        conf = f"time_scale:1,link_gbps:{gbps:.4g}"
        unlimited: List[Dict[str, Any]] = []
        pressured: List[Dict[str, Any]] = []
        for _ in range(max(1, args.rounds - 1)):
            unlimited.append(run("offload", args, 0, conf, steps))
            pressured.append(run("offload", args, budget, conf, steps))
        u, b = summary(unlimited, PRESSURE_WARMUP), summary(pressured, PRESSURE_WARMUP)
        per_step = [st for r in pressured for st in r["per_step"][PRESSURE_WARMUP:]]
        firsts = [r["per_step"][0] for r in pressured]
        stall = lambda st: (st["swap.stall_s"] + st["swap.host_wait_s"]) * 1e3  # noqa: E731
        report["pressure"] = {
            "footprint_mib": footprint / 2**20, "budget_mib": budget / 2**20,
            "moved_mib_per_step": moved / 2**20, "link_gbps": gbps, "conf": conf,
            "unlimited": u, "budget": b,
            "ratio": b["median_ms"] / u["median_ms"],
            "cpu_ratio": b["cpu_median_ms"] / u["cpu_median_ms"],
            "first_step_stall_ms": statistics.median(stall(st) for st in firsts),
            "first_step_demand_fetches": statistics.median(st["swap.demand_fetches"]
                                                           for st in firsts),
            "planned_step_stall_ms": statistics.median(stall(st) for st in per_step),
            "planned_demand_fetches": statistics.median(st["swap.demand_fetches"]
                                                        for st in per_step),
            "planned_steps": sum(st["swap.steps_planned"] for st in per_step),
            "step_ms": [[t * 1e3 for t in r["step_s"]] for r in pressured]}
        pr = report["pressure"]
        print(f"budget {pr['budget_mib']:.1f} MiB of {pr['footprint_mib']:.1f} MiB, link "
              f"{gbps:.3g} GB/s in real time, {pr['moved_mib_per_step']:.0f} MiB moved per step "
              f"(median of {b['steps']} steps after {PRESSURE_WARMUP}): {b['median_ms']:.1f} vs "
              f"{u['median_ms']:.1f} ms unlimited ({pr['ratio']:.2f}x; fastest "
              f"{b['fastest_ms']:.1f} vs {u['fastest_ms']:.1f}; CPU {b['cpu_median_ms']:.1f} vs "
              f"{u['cpu_median_ms']:.1f} ms, {pr['cpu_ratio']:.2f}x); stall: first step "
              f"{pr['first_step_stall_ms']:.1f} ms ({pr['first_step_demand_fetches']:.0f} "
              f"demand fetches), planned steps {pr['planned_step_stall_ms']:.1f} ms "
              f"({pr['planned_demand_fetches']:.0f})")
    report["load_after"] = load()
    print(f"load average {report['load_after']:.2f} at the end")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
