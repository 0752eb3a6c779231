"""Checks that `spill train --trace T --json J` agree on the bytes moved (audit 31b #8).

The trace's swap_out and swap_in events, summed by their bytes, must equal the run's figures in
the JSON ("run"), and those must be the steps' figures plus the copies before step 1 ("setup")
and, with --check, after the last ("readback"). A JSON without "setup" or "readback" (from before
they were printed) counts them as zero, so the check then fails by the set-up's bytes.

Usage: trace_bytes_match.py TRACE JSON [--expect-setup] [--expect-readback]
(--expect-*: the run must have moved bytes there, so the test covers the difference).
"""
import json
import sys


def main() -> int:
    trace_path, json_path = sys.argv[1], sys.argv[2]
    flags = set(sys.argv[3:])
    with open(trace_path, encoding="utf-8") as f:
        trace = json.load(f)
    with open(json_path, encoding="utf-8") as f:
        doc = json.load(f)
    traced = {"out": 0, "in": 0}
    for e in trace["traceEvents"]:
        args = e.get("args", {})
        kind = args.get("kind")
        if kind == "swap_out":
            traced["out"] += args["bytes"]
        elif kind == "swap_in":
            traced["in"] += args["bytes"]
    zero = {"bytes_out": 0, "bytes_in": 0}
    setup = doc.get("setup", zero)
    readback = doc.get("readback", zero)
    agree = True
    for way in ("out", "in"):
        key = "bytes_" + way
        steps = sum(s[key] for s in doc["steps"])
        summed = steps + setup[key] + readback[key]
        run = doc.get("run", {}).get(key)
        print(f"{way}: trace {traced[way]}, steps {steps} + set-up {setup[key]} + read-back "
              f"{readback[key]} = {summed}, run {run}")
        if traced[way] != summed or run != summed:
            agree = False
    covered = True
    if "--expect-setup" in flags and setup["bytes_out"] == 0:
        print("the set-up moved nothing: the test does not cover it")
        covered = False
    if "--expect-readback" in flags and readback["bytes_in"] == 0:
        print("the read-back moved nothing: the test does not cover it")
        covered = False
    if not agree:
        print("FAILED: the trace and the trainer's figures disagree")
    elif not covered:
        print("FAILED: the bytes agree, but the run does not cover what the test asks")
    else:
        print("bytes agree")
    return 0 if agree and covered else 1


if __name__ == "__main__":
    sys.exit(main())
