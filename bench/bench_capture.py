#!/usr/bin/env python3
"""Capture time and memory of spill.torch.capture (not a unit test: numbers for
docs/BENCHMARKS.md, with the issue's targets checked at the end).

Each model is captured in a fresh interpreter (so its peak RSS is its own) with batch scaling,
i.e. two recorded steps (batch B and 2B). Reports wall time of capture() (building the model on
meta included), ops and tensors of the graph, and the interpreter's peak RSS; the RSS of an
interpreter that only imports torch is the baseline.

Usage: /usr/bin/python3 bench/bench_capture.py [--models gpt2-small,gpt2-medium,gpt2-xl,resnet152]
Target (issue 14): GPT-2 XL in under 60 s and 2 GiB of RAM on the 2-core build machine.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, tempfile, time
sys.path[:0] = [{python!r}, {tests!r}]
import torch
if {model!r} == "baseline":
    print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
    sys.exit(0)
import spill.torch as st
batch, seq = {batch}, {seq}
with tempfile.TemporaryDirectory() as d:
    start = time.perf_counter()
    if {model!r}.startswith("gpt2"):
        from models import GPT2, lm_loss
        ids = torch.zeros(batch, seq, dtype=torch.long)
        step = st.capture(lambda: GPT2({model!r}[5:]), ids, loss_fn=lm_loss, targets=ids,
                          path=d + "/g.json")
    else:
        import torchvision
        step = st.capture(getattr(torchvision.models, {model!r}), torch.randn(batch, 3, 224, 224),
                          loss_fn=torch.nn.functional.cross_entropy,
                          targets=torch.zeros(batch, dtype=torch.long), path=d + "/g.json")
    seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  * 1024, "ops": step.op_count, "tensors": step.tensor_count,
                  "parameters": step.parameter_count, "scaled": step.batch_scaling is None}}))
"""

CASES = {  # model: (batch, seq)
    "gpt2-small": (8, 1024), "gpt2-medium": (8, 1024), "gpt2-xl": (8, 1024),
    "resnet152": (32, 0),
}


def run(model: str, batch: int = 0, seq: int = 0) -> dict:
    code = CHILD.format(python=str(ROOT / "python"), tests=str(ROOT / "tests" / "python"),
                        model=model, batch=batch, seq=seq)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES))
    args = parser.parse_args()
    import torch  # only for the version line
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}")
    base = run("baseline")["rss"]
    print(f"baseline (import torch): peak RSS {base / 2**20:.0f} MiB\n")
    print("| model | batch | seq | parameters | ops | tensors | capture time | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for model in args.models.split(","):
        batch, seq = CASES[model]
        r = run(model, batch, seq)
        print(f"| {model} | {batch} | {seq or '-'} | {r['parameters'] / 1e6:.1f} M | {r['ops']} "
              f"| {r['tensors']} | {r['seconds']:.1f} s | {r['rss'] / 2**20:.0f} MiB |")
        assert r["scaled"], f"{model}: no batch scaling"
        if model == "gpt2-xl" and (r["seconds"] >= 60 or r["rss"] >= 2 * 2**30):
            ok = False
    print("\ntarget (GPT-2 XL under 60 s and 2 GiB):", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
