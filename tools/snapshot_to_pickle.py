#!/usr/bin/env python3
"""Turns a spill memory snapshot (JSON, written by spill) into the pickle that PyTorch's
memory_viz (pytorch.org/memory_viz) opens. Standard library only.

Usage: snapshot_to_pickle.py [-h] [--segments-list] SNAPSHOT.json [OUT.pickle]
  -h, --help: print this and exit
  --segments-list: write the list of segments alone, the layout older PyTorch (1.13) reads
  (`python3 -m torch.cuda._memory_viz stats OUT.pickle` there); newer memory_viz reads the dict
  with segments and device traces that is written by default.
"""
import json
import pickle
import sys


def convert(snapshot):
    if not isinstance(snapshot, dict) or snapshot.get("spill", {}).get("format") != "spill-snapshot":
        raise ValueError("not a spill snapshot (no spill.format = 'spill-snapshot')")
    for seg in snapshot["segments"]:
        seg["segment_pool_id"] = tuple(seg.get("segment_pool_id", (0, 0)))
    return {"segments": snapshot["segments"], "device_traces": snapshot["device_traces"]}


def main(argv):
    if "-h" in argv[1:] or "--help" in argv[1:]:
        print(__doc__)
        return 0
    segments_list = "--segments-list" in argv
    argv = [a for a in argv if a != "--segments-list"]
    # An option it does not know is a mistake, not a file name (--help was read as one).
    unknown = [a for a in argv[1:] if a.startswith("-") and a != "-"]
    if unknown:
        print(f"snapshot_to_pickle: unknown option {unknown[0]!r}\n{__doc__}", file=sys.stderr)
        return 2
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    src = argv[1]
    dst = argv[2] if len(argv) == 3 else src.rsplit(".", 1)[0] + ".pickle"
    try:
        with open(src, encoding="utf-8") as f:
            snapshot = json.load(f)
        data = convert(snapshot)
    except (OSError, ValueError, KeyError) as e:
        print(f"snapshot_to_pickle: {src}: {e}", file=sys.stderr)
        return 1
    if segments_list:
        # 1.13's memory_viz reads a block's frames (its name, "[on host]") from its "history"
        # entries, not from "frames" as newer ones do.
        for seg in data["segments"]:
            for b in seg["blocks"]:
                if b.get("frames") and "history" not in b:
                    b["history"] = [{"addr": b["address"], "frames": b["frames"],
                                     "real_size": b.get("requested_size") or b["size"]}]
    with open(dst, "wb") as f:
        pickle.dump(data["segments"] if segments_list else data, f)
    print(f"wrote {dst}: {len(data['segments'])} segments, "
          f"{sum(len(t) for t in data['device_traces'])} trace entries")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
