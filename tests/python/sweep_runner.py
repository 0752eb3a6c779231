"""What the by-hand sweeps (torch_sweep.py, torch_vision_sweep.py) share: configurations as
``axis=value,...`` names over an axis table's defaults, one process per configuration (the
sweep's worker script, given the configuration as JSON, prints ``RESULT {json}``), the
outcome of each (ok, noswap, mismatch, oom, crash, error, timeout) and the command line."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List

ROOT = pathlib.Path(__file__).resolve().parents[2]
EQUALITIES = ("losses_equal", "val_equal", "out_equal", "params_equal")


def name(cfg: Dict[str, str], defaults: Dict[str, str]) -> str:
    """The configuration's name: its model and the axes that differ from ``defaults``."""
    return ",".join(f"{k}={v}" for k, v in cfg.items() if defaults.get(k) != v or k == "model")


def parse(text: str, defaults: Dict[str, str]) -> Dict[str, str]:
    """A configuration from its name (axes left out keep ``defaults``)."""
    cfg = dict(defaults)
    for part in filter(None, text.split(",")):
        k, v = part.split("=", 1)
        if k not in defaults:
            raise SystemExit(f"unknown axis {k!r} (axes: {', '.join(defaults)})")
        cfg[k] = v
    return cfg


def run_one(cfg: Dict[str, str], config_name: str, worker: str,
            timeout: int) -> Dict[str, Any]:
    """Runs ``worker`` on one configuration in a process of its own; its result, or the
    outcome of its failure with the end of what it printed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-c", worker, json.dumps(cfg)], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": config_name, "outcome": "timeout", "wall": timeout}
    res: Dict[str, Any] = {"config": config_name, "wall": round(time.time() - t0, 1)}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode < 0:
        res["outcome"] = "crash"
        tail = r.stderr.strip().splitlines()[-4:]
        res["detail"] = f"signal {-r.returncode}: " + " | ".join(tail)
    elif lines and r.returncode == 0:
        res.update(json.loads(lines[-1][len("RESULT "):]))
    elif "OutOfMemoryError" in r.stderr:
        res["outcome"] = "oom"
        tail = r.stderr[r.stderr.rfind("OutOfMemoryError"):]
        res["detail"] = " ".join(tail.split())[:1500]
    else:
        res["outcome"] = "error"
        res["detail"] = " | ".join(r.stderr.strip().splitlines()[-6:])[:1500]
    return res


def describe(res: Dict[str, Any]) -> str:
    """One line on a result: the figures of a run that finished, else what went wrong."""
    if res["outcome"] not in ("ok", "noswap", "mismatch"):
        return res.get("detail", "")
    text = (f"footprint {res['footprint'] / 2**20:.1f} MiB, budget {res['budget'] / 2**20:.1f} "
            f"MiB, out {res['bytes_out'] / 2**20:.1f} MiB, planned {res['planned']}, quiet "
            f"{res['quiet_steps']}, {res['seconds']} s")
    if "base_seconds" in res:
        text += f" (plain {res['base_seconds']} s)"
    if "late" in res:  # the vision sweep's figures from the third step on
        late = res["late"]
        text += (f"; from step 3: demand {late['demand_fetches']}, stall "
                 f"{late['stall_s'] * 1e3:.1f} ms, deviations {late['deviations']}")
    if res["outcome"] == "mismatch":
        text += " " + ",".join(k for k in EQUALITIES if not res.get(k, True))
    return text


def main(description: str, defaults: Dict[str, str], worker: str, matrices: List[str],
         matrix: Callable[[str, argparse.Namespace], List[Dict[str, str]]],
         timeout: int, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda ap: None
         ) -> int:
    """The sweeps' command line: --matrix (the first of ``matrices`` by default; ``matrix``
    makes its configurations), --only, --filter, --list, --jobs, --timeout, --out, --resume,
    and what ``add_arguments`` adds."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--matrix", choices=matrices, default=matrices[0])
    ap.add_argument("--only", action="append", default=[],
                    help="a configuration (axis=value,...); repeatable")
    ap.add_argument("--filter", default="", help="run the matrix entries whose name has this")
    ap.add_argument("--list", action="store_true", help="print the configurations and exit")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=timeout)
    ap.add_argument("--out", help="write the results as JSON lines here (appended)")
    ap.add_argument("--resume", action="store_true",
                    help="skip the configurations --out has results for")
    add_arguments(ap)
    args = ap.parse_args()
    cfgs = [parse(o, defaults) for o in args.only] or [
        c for c in matrix(args.matrix, args) if args.filter in name(c, defaults)]
    if args.resume and args.out and os.path.exists(args.out):
        with open(args.out) as f:
            done = {json.loads(line)["config"] for line in f if line.strip()}
        cfgs = [c for c in cfgs if name(c, defaults) not in done]
    if args.list:
        for c in cfgs:
            print(name(c, defaults))
        print(f"{len(cfgs)} configurations", file=sys.stderr)
        return 0
    counts: Dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for res in pool.map(lambda c: run_one(c, name(c, defaults), worker, args.timeout),
                            cfgs):
            counts[res["outcome"]] = counts.get(res["outcome"], 0) + 1
            print(f"{res['outcome']:8} {res['config']}  {describe(res)}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(res) + "\n")
    print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    return 0
