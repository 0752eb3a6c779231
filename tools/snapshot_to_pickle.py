#!/usr/bin/env python3
"""Turns a spill memory snapshot (JSON, written by spill) into the pickle that PyTorch's
memory_viz (pytorch.org/memory_viz) opens. Standard library only.

Usage: snapshot_to_pickle.py [-h] [--segments-list] SNAPSHOT.json [OUT.pickle]
  OUT.pickle: default: the snapshot's file name with .pickle for its extension, in its directory
  (run/snap.json -> run/snap.pickle); never the snapshot itself. It is replaced whole or not at
  all. Errors are one line on stderr and exit status 2.
  -h, --help: print this and exit
  --segments-list: write the list of segments alone, the layout older PyTorch (1.13) reads
  (`python3 -m torch.cuda._memory_viz stats OUT.pickle` there); newer memory_viz reads the dict
  with segments and device traces that is written by default.
"""
import json
import os
import pickle
import sys


def convert(snapshot):
    marker = snapshot.get("spill") if isinstance(snapshot, dict) else None
    if not isinstance(marker, dict) or marker.get("format") != "spill-snapshot":
        raise ValueError("not a spill snapshot (no spill.format = 'spill-snapshot')")
    segments, traces = snapshot.get("segments"), snapshot.get("device_traces")
    if not isinstance(segments, list) or not all(
            isinstance(seg, dict) and isinstance(seg.get("blocks", []), list)
            and all(isinstance(b, dict) for b in seg.get("blocks", [])) for seg in segments):
        raise ValueError("segments: expected a list of segments with lists of blocks")
    if not isinstance(traces, list) or not all(isinstance(t, list) for t in traces):
        raise ValueError("device_traces: expected a list of lists")
    for seg in segments:
        pool = seg.get("segment_pool_id", (0, 0))
        if not isinstance(pool, (list, tuple)):
            raise ValueError("segment_pool_id: expected a pair")
        seg["segment_pool_id"] = tuple(pool)
    return {"segments": segments, "device_traces": traces}


def default_output(src):
    """The snapshot's file name with .pickle for its extension, in its directory (a dot in a
    directory's name is not an extension)."""
    head, name = os.path.split(src)
    return os.path.join(head, os.path.splitext(name)[0] + ".pickle")


def same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:  # the output is not there yet
        return os.path.abspath(a) == os.path.abspath(b)


def write_atomically(dst, data):
    """Replaces dst whole or not at all: a temporary beside it (beside a link's target), renamed
    over it; a device or pipe is written directly."""
    target = os.path.realpath(dst) if os.path.islink(dst) else dst
    if os.path.exists(target) and not os.path.isfile(target):
        with open(target, "wb") as f:
            f.write(data)
        return
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        if os.path.exists(target):
            os.chmod(tmp, os.stat(target).st_mode & 0o7777)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def shown(name):
    """``name`` safe to print inside one line: a control character (an ESC sequence, a newline)
    as its escape, so that a file name can neither recolour the terminal nor forge a line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(name))


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
    dst = argv[2] if len(argv) == 3 else default_output(src)
    if same_file(src, dst):
        print(f"snapshot_to_pickle: {shown(dst)}: is the snapshot read: writing it would replace it",
              file=sys.stderr)
        return 2
    try:
        with open(src, encoding="utf-8") as f:
            snapshot = json.load(f)
        data = convert(snapshot)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        print(f"snapshot_to_pickle: {shown(src)}: {shown(e)}", file=sys.stderr)
        return 2
    if segments_list:
        # 1.13's memory_viz reads a block's frames (its name, "[on host]") from its "history"
        # entries, not from "frames" as newer ones do.
        try:
            for seg in data["segments"]:
                for b in seg.get("blocks", []):
                    if b.get("frames") and "history" not in b:
                        b["history"] = [{"addr": b["address"], "frames": b["frames"],
                                         "real_size": b.get("requested_size") or b["size"]}]
        except (KeyError, TypeError, AttributeError) as e:
            print(f"snapshot_to_pickle: {shown(src)}: a block: {shown(repr(e))}", file=sys.stderr)
            return 2
    try:
        write_atomically(dst, pickle.dumps(data["segments"] if segments_list else data))
    except OSError as e:
        print(f"snapshot_to_pickle: cannot write {shown(dst)}: {shown(e.strerror or e)}", file=sys.stderr)
        return 2
    print(f"wrote {shown(dst)}: {len(data['segments'])} segments, "
          f"{sum(len(t) for t in data['device_traces'])} trace entries")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
