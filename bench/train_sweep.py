#!/usr/bin/env python3
"""Sweep `spill train` on the simulated device around the points its tests cover.

For each model shape it finds the footprint (a run with policy none) and the least budget the
trainer accepts (a bisection over --budget with one step; a budget below it must be refused with
a clear error naming an op), then trains with --check at 1/2 .. 1/6 of the footprint, just below
and above the largest op's working set and at the least budget, under every policy. Each case is
classified:
  ok           exit 0 and "check: bit-identical"
  mismatch     the check failed (losses or state differ)
  over-budget  the run's peak of mapped bytes passed the budget
  clear-error  refused, naming the budget and an op (expected below the least budget only)
  unclear      any other error (an out-of-memory error at a budget the trainer accepted is a bug)
  crash/hang   killed by a signal / ran past --timeout
Then --trace and --predict on a few cases, and hostile options (--hostile): each must exit
non-zero with one clear line naming the input and leave no output file behind.

Runnable by hand (not in CI: the full sweep takes tens of minutes on a 2-core machine):
  bench/train_sweep.py [--spill build/spill] [--quick] [--hostile] [--jobs N] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import tempfile

import results_file  # (bench/results_file.py, beside this script)

MiB = 1 << 20

# (label, --conf, model and its options). The small shapes are the tests' (tests/train); the odd
# ones have sizes that are not powers of two.
SMALL = "device:sim,swap_threshold:256KiB,trace:off"
DEFAULT = "device:sim,trace:off"
MODELS = [
    ("mlp", DEFAULT, ["mlp"]),
    ("cnn", DEFAULT, ["cnn"]),
    ("gpt-mini", DEFAULT, ["gpt-mini"]),
    ("mlp-small", SMALL, ["mlp", "--batch", "16384", "--layers", "12", "--width", "32"]),
    ("cnn-small", SMALL, ["cnn", "--batch", "32", "--layers", "1", "--width", "16"]),
    ("gpt-small", SMALL, ["gpt-mini", "--batch", "32", "--seq", "64", "--width", "64", "--layers", "2"]),
    ("mlp-odd", SMALL, ["mlp", "--batch", "3000", "--layers", "3", "--width", "300"]),
    ("cnn-odd", SMALL, ["cnn", "--batch", "7", "--layers", "2", "--width", "12"]),
    ("gpt-odd", SMALL, ["gpt-mini", "--batch", "5", "--seq", "37", "--width", "192", "--layers", "3"]),
]
QUICK = {"mlp-small", "cnn-small", "gpt-small"}
POLICIES = [("graph", []), ("graph-swap", ["--no-recompute"]), ("plan", ["--policy", "plan"]),
            ("lru", ["--policy", "lru"])]


class Runner:
    def __init__(self, spill: str, timeout: int):
        self.spill = spill
        self.timeout = timeout

    def run(self, conf: str, args: list[str]) -> tuple[int, str, str]:
        cmd = ["timeout", "-k", "5", str(self.timeout), self.spill, "--conf", conf] + args
        p = subprocess.run(cmd, capture_output=True, text=True)
        return p.returncode, p.stdout, p.stderr


def classify(rc: int, out: str, err: str) -> tuple[str, str]:
    last = (err.strip().splitlines() or [""])[-1]
    if rc in (124, 137):
        return "hang", "ran past the timeout"
    if rc < 0 or rc >= 128:
        return "crash", f"exit {rc}: {last}"
    if "FAILED: differs" in out:
        return "mismatch", re.search(r"check: (.*)", out).group(1)
    if "FAILED: over the budget" in out:
        return "over-budget", re.search(r"peak mapped .*", out).group(0)
    if rc == 0 and "check: bit-identical" in out:
        return "ok", ""
    if rc == 0:
        return "unclear", "exit 0 without a check line"
    if rc == 2 and re.search(r"cannot (train|run)\b.* in a budget of .*op \d+ '", last):
        return "clear-error", last
    return "unclear", f"exit {rc}: {last}"


def footprint(r: Runner, conf: str, model: list[str]) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.json")
        rc, out, err = r.run(conf, ["train"] + model + ["--policy", "none", "--steps", "1",
                                                        "--json", path])
        if rc != 0:
            raise RuntimeError(f"{model}: the unlimited run failed: {err.strip()}")
        with open(path) as f:
            return json.load(f)["footprint"]


def accepted(r: Runner, conf: str, model: list[str], budget: int) -> tuple[bool, str]:
    rc, out, err = r.run(conf, ["train"] + model + ["--budget", f"{budget}B", "--steps", "1"])
    if rc == 0:
        return True, ""
    if rc == 2 and "cannot train in a budget" in err:
        return False, err.strip()
    return True, ""  # the plan took it: how the run fared is the sweep's to record


def least_budget(r: Runner, conf: str, model: list[str], fp: int) -> tuple[int, int]:
    """The least budget accepted (to 1 KiB), and the working set the refusal names."""
    ok, msg = accepted(r, conf, model, 2 * MiB)
    if ok:
        return 2 * MiB, 0
    m = re.search(r"its own working set ([0-9.]+) (B|KiB|MiB|GiB)", msg)
    unit = {"B": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30}[m.group(2)]
    ws = int(float(m.group(1)) * unit)
    lo, hi = 2 * MiB, fp  # refused, accepted
    while hi - lo > 1024:
        mid = (lo + hi) // 2
        if accepted(r, conf, model, mid)[0]:
            hi = mid
        else:
            lo = mid
    # The exact byte: accepted budgets are monotone, bisect the last KiB too.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if accepted(r, conf, model, mid)[0]:
            hi = mid
        else:
            lo = mid
    return hi, ws


def sweep_model(r: Runner, label: str, conf: str, model: list[str], quick: bool) -> list[dict]:
    try:
        fp = footprint(r, conf, model)
    except RuntimeError as e:
        return [{"model": label, "budget": "", "bytes": 0, "policy": "none", "steps": 1,
                 "status": "unclear", "expected": "ok", "detail": str(e), "cmd": str(model)}]
    least, ws = least_budget(r, conf, model, fp)
    budgets = [(f"1/{k}", fp // k) for k in ((3, 6) if quick else (2, 3, 4, 5, 6))]
    budgets += [("least-1", least - 1), ("least", least), ("least+1MiB", least + MiB)]
    if ws:
        budgets += [("ws-64KiB", max(ws - 64 * 1024, 2 * MiB)), ("ws+64KiB", ws + 64 * 1024)]
    rows = []
    for bi, (bname, budget) in enumerate(budgets):
        for pi, (pname, pargs) in enumerate(POLICIES):
            steps = 3 + (bi + pi) % 4
            args = ["train"] + model + ["--budget", f"{budget}B", "--steps", str(steps),
                                        "--check"] + pargs
            rc, out, err = r.run(conf, args)
            status, detail = classify(rc, out, err)
            expected = "clear-error" if budget < least else "ok"
            rows.append({"model": label, "budget": bname, "bytes": budget, "policy": pname,
                         "steps": steps, "status": status, "expected": expected,
                         "detail": detail, "cmd": " ".join(["spill", "--conf", conf] + args)})
            if status != expected:  # as they come: the table waits for every model
                print(f"{label} {bname} {pname}: {status}: {detail}", file=sys.stderr, flush=True)
    # Policy none: a byte under the footprint is refused; at the footprint it runs or is
    # refused (the small pool's whole segments may not fit); a granule over the footprint's
    # whole granules, and no budget, run.
    over = (fp + 2 * MiB - 1) // (2 * MiB) * (2 * MiB) + 2 * MiB
    for bname, budget in (("footprint", fp), ("footprint-1", fp - 1),
                          ("footprint+granule", over), ("none", None)):
        args = ["train"] + model + ["--policy", "none", "--steps", "3", "--check"]
        if budget is not None:
            args += ["--budget", f"{budget}B"]
        rc, out, err = r.run(conf, args)
        status, detail = classify(rc, out, err)
        if status == "unclear" and rc == 2 and "policy none cannot run" in err:
            status = "clear-error"
        rows.append({"model": label, "budget": bname, "bytes": budget or 0, "policy": "none",
                     "steps": 3, "status": status,
                     "expected": {"footprint-1": "clear-error",
                                  "footprint": status if status in ("ok", "clear-error") else "ok"
                                  }.get(bname, "ok"),
                     "detail": detail, "cmd": " ".join(["spill", "--conf", conf] + args)})
    print(f"{label}: footprint {fp} B, least budget {least} B ({least / fp:.3f}), "
          f"largest op's working set ~{ws} B", file=sys.stderr, flush=True)
    for row in rows:
        row["footprint"], row["least"] = fp, least
    return rows


def outputs(r: Runner, quick: bool) -> list[dict]:
    """--trace (a JSON trace that parses) and --predict (its JSON) on a few cases."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label, conf, model in MODELS[:3] + MODELS[3:6]:
            if quick and label not in QUICK:
                continue
            for policy in ("graph", "lru"):
                path = os.path.join(d, f"{label}-{policy}.json")
                args = ["train"] + model + ["--steps", "2", "--policy", policy, "--trace", path]
                rc, out, err = r.run(conf, args)
                status, detail = classify(rc, out, err + "")
                if rc == 0:
                    try:
                        with open(path) as f:
                            n = len(json.load(f)["traceEvents"])
                        status, detail = "ok", f"{n} trace events"
                    except Exception as e:  # noqa: BLE001 (any failure to read is the finding)
                        status, detail = "unclear", f"trace does not parse: {e}"
                rows.append({"model": label, "budget": "1/3", "policy": policy, "steps": 2,
                             "status": status, "expected": "ok", "detail": "--trace " + detail,
                             "cmd": " ".join(args)})
            for device, link, frac in (("h200", "pcie5", 3), ("a100-40gb", "pcie4", 5)):
                path = os.path.join(d, f"{label}-{device}.json")
                fp = None
                args = ["train"] + model + ["--predict", "--device", device, "--link", link,
                                            "--json", path]
                rc, out, err = r.run(conf, args)
                status, detail = classify(rc, out, err)
                if rc == 0:
                    try:
                        with open(path) as f:
                            doc = json.load(f)
                        fp = doc["footprint"]
                        status, detail = "ok", f"planned step {doc['planned']['step_s'] * 1e3:.3f} ms"
                    except Exception as e:  # noqa: BLE001
                        status, detail = "unclear", f"prediction does not parse: {e}"
                if fp and frac != 3:
                    args2 = args + ["--budget", f"{fp // frac}B"]
                    rc, out, err = r.run(conf, args2)
                    if rc != 0:
                        status, detail = classify(rc, out, err)
                        if rc == 2 and "cannot train in a budget" in err:
                            status = "clear-error"
                    args = args2
                rows.append({"model": label, "budget": f"1/{frac}", "policy": f"predict {device}",
                             "steps": 0, "status": status, "expected": "ok",
                             "detail": "--predict " + detail, "cmd": " ".join(args)})
    return rows


def hostile(r: Runner) -> list[dict]:
    """Hostile options: each must exit non-zero with one line naming the input, write nothing."""
    d = tempfile.mkdtemp()
    ro = os.path.join(d, "a-file")  # a path under a file cannot be written, even by root
    open(ro, "w").close()
    out_file = os.path.join(d, "out.json")
    cases = [
        (["--batch", "0"], "--batch"), (["--batch", "-3"], "--batch"),
        (["--batch", "99999999999"], "--batch"), (["--batch", "abc"], "--batch"),
        (["--width", "0"], "--width"), (["--width", "1e3"], "--width"),
        (["--layers", "-1"], "--layers"), (["--layers", "5000"], "--layers"),
        (["--seq", "0"], "--seq"), (["--steps", "0"], "--steps"), (["--steps", "-1"], "--steps"),
        (["--steps", "1e9"], "--steps"), (["--steps", ""], "--steps"),
        (["--steps", "100001"], "--steps"),
        (["--budget", "0"], "--budget"), (["--budget", "-1GiB"], "--budget"),
        (["--budget", "lots"], "--budget"), (["--budget", "1.5.3MiB"], "--budget"),
        (["--budget", "18446744073709551616B"], "--budget"),
        (["--budget", "1PiB"], "--budget"), (["--budget", "4TiB"], "budget"),
        (["--budget", "nanMiB"], "--budget"), (["--budget", "1e9"], "--budget"),
        (["--budget", "100B"], "budget"), (["--budget", "3MiBx"], "--budget"),
        (["--policy", "belady"], "belady"), (["--policy", ""], "policy"),
        (["--trace", os.path.join(ro, "t.json")], "--trace"),
        (["--trace", ""], "--trace"), (["--trace", d], "--trace"),
        (["--json", os.path.join(ro, "s.json")], "--json"),
        (["--json", os.path.join(d, "nodir", "s.json")], "--json"),
        (["--predict", "--device", "nosuch"], "nosuch"), (["--predict", "--link", "nosuch"], "nosuch"),
        (["--predict", "--link", os.path.join(d, "missing.json")], "missing.json"),
        (["--predict", "--budget", "0"], "--budget"),
        (["--predict", "--budget", "1B"], "budget"),
        (["--predict", "--timeline", os.path.join(ro, "tl.json")], "--timeline"),
    ]
    rows = []
    model_cases = [(["nosuch"], "nosuch"), ([""], "model"), (["gpt-mini", "--width", "100"], "width"),
                   (["gpt-medium", "--steps", "1"], "budget")]
    all_cases = [(["mlp"] + ([] if "--predict" in c or "--steps" in c else ["--steps", "1"]) + c, w)
                 for c, w in cases] + model_cases
    # A budget and a json output: nothing may be written when the command fails.
    for args, want in all_cases:
        if os.path.exists(out_file):
            os.remove(out_file)
        full = ["train"] + args
        if "--json" not in args and "--predict" not in args and "--trace" not in args:
            full += ["--json", out_file]
        rc, out, err = r.run(DEFAULT, full)
        # CLI11's parse errors add a second line pointing at --help.
        lines = [l for l in err.strip().splitlines() if l and not l.startswith("Run with --help")]
        status = "clear-error"
        detail = lines[-1] if lines else ""
        if rc in (124, 137):
            status = "hang"
        elif rc < 0 or rc >= 128:
            status = "crash"
        elif rc == 0:
            status = "accepted"
        elif len(lines) != 1 or want.lower() not in detail.lower():
            status = "unclear"
        if os.path.exists(out_file) and rc != 0:
            status += "+file-left"
        rows.append({"model": args[0], "budget": "", "policy": "", "steps": 0, "status": status,
                     "expected": "clear-error", "detail": detail,
                     "cmd": "spill --conf " + DEFAULT + " " + " ".join(repr(a) if a == "" else a
                                                                       for a in full)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spill", default=os.path.join(os.path.dirname(__file__), "..", "build", "spill"))
    ap.add_argument("--quick", action="store_true", help="the tests' small shapes, 2 budgets")
    ap.add_argument("--hostile", action="store_true", help="hostile options only")
    ap.add_argument("--models", help="comma-separated labels (default: all)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run")
    ap.add_argument("--out", help="write the table (markdown) here")
    a = ap.parse_args()
    results_file.check(a.out, "--out")
    r = Runner(os.path.abspath(a.spill), a.timeout)
    rows: list[dict] = []
    if a.hostile:
        rows = hostile(r)
    else:
        chosen = [m for m in MODELS if (not a.quick or m[0] in QUICK)
                  and (not a.models or m[0] in a.models.split(","))]
        with cf.ThreadPoolExecutor(a.jobs) as pool:
            for got in pool.map(lambda m: sweep_model(r, m[0], m[1], m[2], a.quick), chosen):
                rows += got
        if not a.models:
            rows += outputs(r, a.quick)
    bad = [x for x in rows if x["status"] != x["expected"]]
    lines = ["| model | budget | policy | steps | result | expected | detail |",
             "|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['model']} | {x['budget']} | {x['policy']} | {x['steps']} | "
                     f"{x['status']} | {x['expected']} | {x['detail'][:160]} |")
    counts: dict[str, int] = {}
    for x in rows:
        counts[x["status"]] = counts.get(x["status"], 0) + 1
    summary = f"{len(rows)} cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    summary += f"; {len(bad)} not as expected"
    text = "\n".join(lines + ["", summary] + ["", "Not as expected:"] +
                     [f"- {x['status']}: `{x['cmd']}`: {x['detail']}" for x in bad]) + "\n"
    if a.out:
        results_file.write(a.out, text)
    print(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
