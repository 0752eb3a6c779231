"""The GPU benchmark scripts run end to end on the CPU bridge (their --bridge mode), so that a
session lent a GPU does not spend its minutes on a script that breaks before it measures."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_torch_gpt2_bench_runs_every_case_on_the_bridge(tmp_path: pathlib.Path) -> None:
    """bench/gpu/bench_torch_gpt2.py --bridge: the four cases with a small GPT, spill's at a
    third of the unlimited footprint; each case's losses equal the unlimited run's, each step
    has its host time and CPU time, and spill's steps their swap counters and the host's time
    in the device's virtual-memory calls."""
    out = tmp_path / "gpt2.json"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "bench_torch_gpt2.py"),
                        "--bridge", "--batch", "4", "--seq", "64", "--steps", "3",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    cases = res["cases"]
    assert sorted(cases) == ["checkpoint", "save_on_cpu", "spill", "unlimited"], cases.keys()
    for name, case in cases.items():
        assert "error" not in case, (name, case.get("error"))
        assert case["losses"] == cases["unlimited"]["losses"], name
        assert len(case["host_s"]) == len(case["cpu_s"]) == len(case["step_s"]) == 3, name
        assert all(0 < h <= t for h, t in zip(case["host_s"], case["step_s"])), name
    assert res["budget"] == res["footprint"] // 3
    steps = cases["spill"]["spill_steps"]
    assert len(steps) == 3
    assert sum(s["swap.bytes_out"] for s in steps) > 0, steps
    assert all(s["vmm.map_calls"] > 0 and s["vmm.host_s"] > 0 for s in steps), steps
    assert "spill step 3:" in r.stdout and "VMM calls" in r.stdout, r.stdout


@pytest.mark.parametrize("script, option", [("gpu/bench_torch_gpt2.py", "--json"),
                                            ("bench_torch_bridge.py", "--json"),
                                            ("train_sweep.py", "--out")])
def test_a_results_path_that_cannot_be_written_is_refused_before_the_run(
        tmp_path: pathlib.Path, script: str, option: str) -> None:
    """A results file in a missing folder, or a folder given as the file, stops the script
    at once with a message naming the option (it wrote its results with a plain open() at the
    end: minutes of measuring, of a GPU session's too, were lost to a traceback), and
    results_file.write keeps the previous results when the write fails."""
    for path, says in ((tmp_path / "nowhere" / "r.json", "there is no folder"),
                       (tmp_path, "is a folder")):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / script), option, str(path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and f"{option}: " in r.stderr and says in r.stderr, r
        assert "Traceback" not in r.stderr, r.stderr
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import results_file
    finally:
        sys.path.pop(0)
    kept = tmp_path / "kept.json"
    kept.write_text("PREVIOUS")
    with pytest.raises(UnicodeEncodeError):
        results_file.write(str(kept), "\ud800")  # (not UTF-8: fails before a byte is written)
    assert kept.read_text() == "PREVIOUS" and sorted(os.listdir(tmp_path)) == ["kept.json"]
    results_file.write(str(kept), "NEW")
    assert kept.read_text() == "NEW"
