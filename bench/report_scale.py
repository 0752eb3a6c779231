#!/usr/bin/env python3
"""How `spill report` scales with the size of a trace (issue: session 31, #11).

Writes synthetic spill traces of N events (training steps: blocks mapped and allocated, pinned,
some swapped out to pinned host memory and back with stalls, then freed and unmapped; a complete
trace, so the reader checks every free and swap) in the layout profiling/chrome_trace.cpp writes,
then runs `spill report` on each under /usr/bin/time -v and prints wall time, peak RSS and the
HTML page's size as a Markdown table.

  bench/report_scale.py generate N OUT.json            # one trace
  bench/report_scale.py measure --spill build/spill 100000 1000000 [--keep DIR]

Not a CTest (it measures; tests never time anything). Numbers go to docs/BENCHMARKS.md with the
machine and the date.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

KINDS_ALLOCATOR = {"alloc", "free", "map", "unmap", "host_alloc", "host_free", "oom"}
SPANS = {"swap_out", "swap_in", "prefetch", "stall"}
TID_D2H, TID_H2D, TID_ALLOCATOR = 1, 2, 3
STREAM_TIDS = {0x100: 100, 0x200: 101}


def micros(ns: int) -> str:
    return f"{ns // 1000}.{ns % 1000:03d}"


class Writer:
    """Writes events and the memory counter track the way chrome_trace_text does."""

    def __init__(self, out, limit: int):
        self.out = out
        self.limit = limit
        self.count = 0
        self.allocated = self.mapped = self.on_host = self.pinned = 0
        self.host_blocks: dict[int, int] = {}
        self.buf: list[str] = []

    def full(self) -> bool:
        return self.count >= self.limit

    def event(self, t: int, kind: str, addr: int, nbytes: int, stream: int = 0x100,
              dur: int = 0, tag: int = 0) -> None:
        if self.full():
            return
        self.count += 1
        if kind in KINDS_ALLOCATOR:
            tid = TID_ALLOCATOR
        elif kind == "swap_out":
            tid = TID_D2H
        elif kind in ("swap_in", "prefetch"):
            tid = TID_H2D
        else:
            tid = STREAM_TIDS[stream]
        name = f"{kind} layer{tag}.act" if tag else kind
        ph = (f',"ph":"X","dur":{micros(dur)}' if kind in SPANS or dur > 0
              else ',"ph":"i","s":"t"')
        self.buf.append(
            f',\n{{"name":"{name}","cat":"{kind}","pid":1,"tid":{tid},"ts":{micros(t)}{ph},'
            f'"args":{{"kind":"{kind}","addr":"{addr:#x}","bytes":{nbytes},'
            f'"stream":"{stream:#x}","device":0,"tag":{tag},"thread":1,"time_ns":{t},'
            f'"duration_ns":{dur}}}}}')
        before = (self.allocated, self.mapped, self.on_host, self.pinned)
        if kind == "alloc":
            self.allocated += nbytes
        elif kind == "free":
            self.allocated -= nbytes
            self.on_host -= self.host_blocks.pop(addr, 0)
        elif kind == "map":
            self.mapped += nbytes
            self.on_host -= self.host_blocks.pop(addr, 0)  # mapped back
        elif kind == "unmap":
            self.mapped -= nbytes
        elif kind == "swap_out" and addr not in self.host_blocks:
            self.host_blocks[addr] = nbytes
            self.on_host += nbytes
        elif kind == "swap_in":
            self.on_host -= self.host_blocks.pop(addr, 0)
        elif kind == "host_alloc":
            self.pinned += nbytes
        elif kind == "host_free":
            self.pinned -= nbytes
        if (self.allocated, self.mapped, self.on_host, self.pinned) != before:
            self.buf.append(
                f',\n{{"ph":"C","pid":1,"name":"memory (bytes)","ts":{micros(t + dur)},'
                f'"args":{{"allocated":{self.allocated},"mapped":{self.mapped},'
                f'"on_host":{self.on_host},"host_pinned":{self.pinned}}}}}')
        if len(self.buf) > 4096:
            self.out.write("".join(self.buf))
            self.buf.clear()

    def flush(self) -> None:
        self.out.write("".join(self.buf))
        self.buf.clear()


def generate(n: int, path: str, layers: int = 48) -> None:
    """A complete trace (baseline zero, nothing dropped) of exactly n spill events."""
    with open(path, "w") as out:
        out.write('{"traceEvents":[\n{"ph":"M","pid":1,"name":"process_name",'
                  '"args":{"name":"spill"}}')
        for tid, name in ((TID_ALLOCATOR, "allocator"),
                          (TID_H2D, "H2D copy engine (swap-in, prefetch)"),
                          (TID_D2H, "D2H copy engine (swap-out)"),
                          (100, "stream 0x100"), (101, "stream 0x200")):
            out.write(f',\n{{"ph":"M","pid":1,"tid":{tid},"name":"thread_name",'
                      f'"args":{{"name":"{name}"}}}}')
        w = Writer(out, n)
        t = 1_000_000
        step = 0
        while not w.full():
            step += 1
            sizes = [((step * 7 + l * 13) % 48 + 16) << 20 for l in range(layers)]
            base = 0x7F0000000000
            for l in range(layers):  # forward: map, allocate, use
                addr = base + (l << 30)
                w.event(t, "map", addr, sizes[l])
                w.event(t + 50, "alloc", addr, sizes[l], tag=l + 1)
                w.event(t + 100, "pin", addr, sizes[l], stream=0x200)
                t += 20_000
                w.event(t, "unpin", addr, sizes[l], stream=0x200)
                if 2 <= l < layers - 2 and l % 2 == 0:  # evicted to the host
                    host = 0x500000000000 + addr
                    w.event(t, "host_alloc", host, sizes[l])
                    dur = sizes[l] // 12
                    w.event(t + 10, "swap_out", addr, sizes[l], stream=0x200, dur=dur)
                    w.event(t + 10 + dur, "unmap", addr, sizes[l])
                    t += 1_000
            for l in reversed(range(layers)):  # backward: bring back, use, free
                addr = base + (l << 30)
                if 2 <= l < layers - 2 and l % 2 == 0:
                    w.event(t, "map", addr, sizes[l])
                    if l % 3 == 0:
                        w.event(t + 10, "stall", addr, sizes[l], stream=0x100, dur=40_000)
                    dur = sizes[l] // 12
                    w.event(t + 20, "swap_in", addr, sizes[l], stream=0x200, dur=dur)
                    t += dur + 30
                    w.event(t, "host_free", 0x500000000000 + addr, sizes[l])
                t += 30_000
                w.event(t, "free", addr, sizes[l])
                w.event(t + 10, "unmap", addr, sizes[l])
        w.flush()
        meta = {"format": "spill-trace", "version": 1,
                "clock": "simulated (SimDevice, link model pcie4)",
                "tags": {str(l + 1): f"layer{l + 1}.act" for l in range(layers)},
                "metadata": {"command": "bench/report_scale.py", "events": n,
                             "baseline": {"allocated": 0, "mapped": 0, "on_host": 0,
                                          "host_pinned": 0},
                             "dropped_events": 0, "budget_bytes": 4 << 30}}
        out.write('\n],"displayTimeUnit":"ns","otherData":' + json.dumps(meta) + "}\n")


def measure(spill: str, n: int, workdir: str) -> dict:
    trace = os.path.join(workdir, f"trace_{n}.json")
    html = os.path.join(workdir, f"report_{n}.html")
    if not os.path.exists(trace):
        generate(n, trace)
    proc = subprocess.run(["/usr/bin/time", "-v", spill, "report", trace, "-o", html],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"spill report failed on {n} events:\n{proc.stdout}{proc.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    hours = int(wall.group(1) or 0)
    seconds = hours * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"events": n, "trace_mib": os.path.getsize(trace) / 2**20, "seconds": seconds,
            "rss_mib": rss_kb / 1024, "html_mib": os.path.getsize(html) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write one trace of N events")
    g.add_argument("events", type=int)
    g.add_argument("output")
    m = sub.add_parser("measure", help="time `spill report` on traces of N events")
    m.add_argument("--spill", default="build/spill")
    m.add_argument("--keep", help="folder for the traces and pages (reused when present)")
    m.add_argument("events", type=int, nargs="+")
    args = ap.parse_args()
    if args.cmd == "generate":
        generate(args.events, args.output)
        return
    workdir = args.keep or tempfile.mkdtemp(prefix="spill_report_scale_")
    os.makedirs(workdir, exist_ok=True)
    print("| events | trace | wall time | peak RSS | HTML page |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.events:
        r = measure(args.spill, n, workdir)
        print(f"| {r['events']:,} | {r['trace_mib']:.0f} MiB | {r['seconds']:.2f} s | "
              f"{r['rss_mib']:.0f} MiB | {r['html_mib']:.2f} MiB |", flush=True)


if __name__ == "__main__":
    main()
