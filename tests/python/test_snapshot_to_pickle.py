"""tools/snapshot_to_pickle.py (installed as spill-snapshot-to-pickle) on hostile arguments
(audit 37b, F6): it replaced its input, wrote its default output into another directory, and
showed tracebacks."""
from __future__ import annotations

import json
import pathlib
import pickle
import subprocess
import sys

import pytest

TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "snapshot_to_pickle.py"
SNAPSHOT = {"segments": [{"address": 4096, "total_size": 2097152, "segment_pool_id": [0, 0],
                          "blocks": [{"address": 4096, "size": 1024, "state": "active_allocated",
                                      "frames": [{"name": "x", "filename": "", "line": 0}]}]}],
            "device_traces": [[{"action": "alloc", "addr": 4096, "size": 1024}]],
            "spill": {"format": "spill-snapshot", "version": 1}}


def run(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True,
                          text=True)


def test_the_output_is_never_the_input(tmp_path):
    snap = tmp_path / "snap.json"
    snap.write_text(json.dumps(SNAPSHOT))
    for out in ("snap.json", "./snap.json", str(snap)):
        r = run("snap.json", out, cwd=tmp_path)
        assert r.returncode == 2, r
        assert "is the snapshot read" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(snap.read_text()) == SNAPSHOT


def test_the_default_output_is_beside_the_input_named_after_its_file(tmp_path):
    (tmp_path / "run.v2").mkdir()
    (tmp_path / "run.v2" / "snap").write_text(json.dumps(SNAPSHOT))
    (tmp_path / "run.pickle").write_text("MY NOTES")
    r = run("run.v2/snap", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run.pickle").read_text() == "MY NOTES"
    data = pickle.loads((tmp_path / "run.v2" / "snap.pickle").read_bytes())
    assert data["segments"][0]["segment_pool_id"] == (0, 0)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "s.json").write_text(json.dumps(SNAPSHOT))
    assert run("d/s.json", cwd=tmp_path).returncode == 0
    assert (tmp_path / "d" / "s.pickle").exists()


@pytest.mark.parametrize("snapshot", [
    {"spill": {"format": "spill-snapshot"}, "segments": 5, "device_traces": []},
    {"spill": "x"},
    [1, 2],
    {"spill": {"format": "spill-snapshot"}, "segments": [{"blocks": 3}], "device_traces": []},
    {"spill": {"format": "spill-snapshot"}, "segments": [], "device_traces": [5]},
])
def test_bad_shapes_are_one_line_errors(tmp_path, snapshot):
    (tmp_path / "bad.json").write_text(json.dumps(snapshot))
    for extra in ([], ["--segments-list"]):
        r = run(*extra, "bad.json", "out.pickle", cwd=tmp_path)
        assert r.returncode == 2, r
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("snapshot_to_pickle: bad.json: ")
    assert not (tmp_path / "out.pickle").exists()


def test_an_output_that_cannot_be_written_is_a_one_line_error(tmp_path):
    (tmp_path / "snap.json").write_text(json.dumps(SNAPSHOT))
    for out in ("nodir/x.pickle", "/dev/full"):
        r = run("snap.json", out, cwd=tmp_path)
        assert r.returncode == 2, r
        assert r.stderr.startswith(f"snapshot_to_pickle: cannot write {out}: ")
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_failed_write_keeps_the_previous_output(tmp_path):
    (tmp_path / "snap.json").write_text(json.dumps(SNAPSHOT))
    (tmp_path / "snap.pickle").write_text("PRECIOUS")
    r = subprocess.run(
        ["sh", "-c", f"ulimit -f 0; exec {sys.executable} {TOOL} snap.json"], cwd=tmp_path,
        capture_output=True, text=True)
    assert r.returncode != 0
    assert (tmp_path / "snap.pickle").read_text() == "PRECIOUS"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.json", "snap.pickle"]


def test_file_names_are_printed_with_their_control_characters_escaped(tmp_path):
    """A file name's ESC sequence and newline are printed as escapes, in the success line and
    in an error: they can neither recolour the terminal nor forge a line (they were printed
    raw)."""
    name = "s\x1b[31m\nFORGED"
    (tmp_path / f"{name}.json").write_text(json.dumps(SNAPSHOT))
    r = run(f"{name}.json", "out\x1b[2J\n.pickle", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote out\\x1b[2J\\n.pickle: 1 segments"), r.stdout
    assert pickle.loads((tmp_path / "out\x1b[2J\n.pickle").read_bytes())["segments"]
    (tmp_path / f"{name}.bad").write_text("{")
    r = run(f"{name}.bad", cwd=tmp_path)
    assert r.returncode == 2 and "\x1b" not in r.stderr, r.stderr
    assert r.stderr.startswith("snapshot_to_pickle: s\\x1b[31m\\nFORGED.bad: "), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
