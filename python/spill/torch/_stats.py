"""PyTorch's memory APIs answered with spill's figures: memory_stats (PyTorch's keys plus
spill's own), memory_summary, reset_peak_memory_stats and memory_snapshot in the layout of
torch.cuda.memory._snapshot(), so that training loops and tools that log them keep working
when spill is the allocator (the pluggable-allocator path otherwise loses them). Before
spill.torch has started spill (enable() or pool()) they answer as torch.cuda's do before CUDA
starts (no statistics, zeros) and start nothing."""
from __future__ import annotations

import collections
import logging
from typing import Any, Dict, List, Optional, Union

import torch

import spill
from spill import InvalidArgumentError
from spill._errors import InvalidArgumentTypeError

from ._state import state, torch_version

_log = logging.getLogger("spill.torch")

# PyTorch's "<kind>.all.<stat>" families and the spill statistic each one reads.
_BYTE_FAMILIES = {
    "allocated_bytes": "allocated_bytes",
    "active_bytes": "allocated_bytes",        # spill has no "freed but still used" state
    "requested_bytes": "requested_bytes",
    "reserved_bytes": "reserved_bytes",
    "inactive_split_bytes": "cached_bytes",   # mapped, free, ready for reuse
}
_STATS = ("current", "peak", "allocated", "freed")


def _device(device: Any, caller: str) -> int:
    """spill's device for ``device`` as torch.cuda's memory functions take it: None or
    "cuda" (the device spill runs), an int, "cuda:N" or a torch.device; on the CPU bridge (and
    before enable()) also "cpu", whose memory the bridge serves. Any other device is an error
    naming it: they all answered with the figures of the device spill runs (device=5,
    device="garbage", device=-3). On CUDA spill serves every device's tensors, so any CUDA
    ordinal torch has is answered for itself; on the bridge only the one it simulates."""
    if device is None:
        return state.device
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise InvalidArgumentTypeError(
            f"spill.torch.{caller}: device must be None, an int, a string such as 'cuda:0' or "
            f"a torch.device, got {device!r}")
    if isinstance(device, int):
        kind, index = "cuda", device
    else:
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise InvalidArgumentError(
                f"spill.torch.{caller}: device {device!r} is not a device") from None
        kind, index = parsed.type, parsed.index
    if kind == "cpu" and state.target != "cuda":
        return state.device
    if kind == "cuda":
        if index is None:
            return state.device
        if state.target == "cuda" and 0 <= index < torch.cuda.device_count():
            return index
        if index == state.device:
            return index
    where = ("a CUDA device of this machine" if state.target == "cuda"
             else f"cuda:{state.device}, the device spill simulates for PyTorch")
    if state.target != "cuda":
        where += " (or 'cpu', whose memory the CPU bridge serves)"
    raise InvalidArgumentError(f"spill.torch.{caller}: device {device!r} is not {where}")


def _spill_stats(device: Any, caller: str) -> Optional[Dict[str, Any]]:
    """spill.stats() of the device ``device`` names, or None before spill.torch has started
    spill (enable() or pool()). Then spill is not asked: its first call that uses a device
    starts that device's runtime, with SPILL_CONF or the defaults, and a later enable() with
    its own settings failed (ALREADY_INITIALIZED) for the rest of the process."""
    index = _device(device, caller)
    return spill.stats(index) if state.started else None


def torch_keys(s: Dict[str, Any]) -> Dict[str, Any]:
    """PyTorch's memory_stats keys computed from spill's statistics ``s`` (spill.stats())."""
    out: Dict[str, Any] = {}
    for family, source in _BYTE_FAMILIES.items():
        for stat in _STATS:
            key = f"{source}.{stat}"
            if key in s:
                out[f"{family}.all.{stat}"] = s[key]
    allocs, frees = s.get("num_allocs", 0), s.get("num_frees", 0)
    out["allocation.all.allocated"] = allocs
    out["allocation.all.freed"] = frees
    out["allocation.all.current"] = allocs - frees
    out["active.all.current"] = allocs - frees
    maps, unmaps = s.get("num_segment_maps", 0), s.get("num_segment_unmaps", 0)
    out["segment.all.allocated"] = maps
    out["segment.all.freed"] = unmaps
    out["segment.all.current"] = maps - unmaps
    out["num_device_alloc"] = maps
    out["num_device_free"] = unmaps
    out["num_alloc_retries"] = s.get("num_eviction_requests", 0)
    out["num_ooms"] = s.get("num_ooms", 0)
    out["num_sync_all_streams"] = 0
    return out


# Per device: the accumulated counts reset_accumulated_memory_stats() started again from.
_accumulated_from: Dict[int, Dict[str, int]] = {}


def _accumulated(key: str) -> bool:
    """Whether a key of torch_keys() counts since the start (PyTorch's accumulated stats)."""
    return key.endswith((".allocated", ".freed")) or key in (
        "num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free")


def _since_reset(keys: Dict[str, Any], index: int) -> Dict[str, Any]:
    """torch_keys() ``keys`` of device ``index`` with the accumulated counts since the last
    reset_accumulated_memory_stats(). Counts below the reset's (spill shut down and started
    again since) drop it."""
    base = _accumulated_from.get(index)
    if base and any(keys.get(k, 0) < v for k, v in base.items()):
        del _accumulated_from[index]
        base = None
    for k, v in (base or {}).items():
        keys[k] -= v
    return keys


def memory_stats(device: Any = None) -> "collections.OrderedDict[str, Any]":
    """spill's statistics with PyTorch's ``torch.cuda.memory_stats`` keys.

    PyTorch's keys (bytes, and counts of allocations and segments):
    ``allocated_bytes.all.{current,peak,allocated,freed}`` and likewise ``reserved_bytes``
    (mapped device memory: what the budget limits), ``active_bytes`` (= allocated),
    ``requested_bytes`` and ``inactive_split_bytes`` (spill's cached bytes);
    ``allocation.all.*``, ``active.all.current``, ``segment.all.*``, ``num_alloc_retries``
    (allocations that had to evict), ``num_ooms``, ``num_device_alloc`` / ``num_device_free``.
    spill's own keys follow unchanged (``swap.bytes_out``, ``swap.bytes_in``,
    ``swapped_out_bytes``, ``swap.on_host_bytes``, ``swap.stall_s``, ``swap.prefetch_hits``,
    ``swap.demand_fetches``, ``swap.steps_planned``, ..., see ``spill.stats``). Pools are not
    split: there is no ``.small_pool`` / ``.large_pool``.
    """
    s = _spill_stats(device, "memory_stats")
    if s is None:
        return collections.OrderedDict()  # as torch.cuda.memory_stats() before CUDA starts
    merged = dict(s)
    merged.update(_since_reset(torch_keys(s), s["device"]))
    return collections.OrderedDict(sorted(merged.items()))


def memory_stats_as_nested_dict(device: Any = None) -> Dict[str, Any]:
    """memory_stats() nested at its dots, as ``torch.cuda.memory_stats_as_nested_dict``
    (``{"allocated_bytes": {"all": {"current": ...}}, "swap": {"bytes_out": ...}, ...}``)."""
    out: Dict[str, Any] = {}
    for key, value in memory_stats(device).items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def record_memory_history(enabled: Any = "all", *args: Any, **kwargs: Any) -> None:
    """What ``torch.cuda.memory._record_memory_history`` does under spill: nothing to switch.
    spill records every allocation, free, segment map and out-of-memory as it runs (the
    configuration's ``trace:on``, the default), and ``_snapshot()`` returns that history as
    ``device_traces``; torch's own recorder belongs to its caching allocator, and the
    pluggable allocator raises ("does not yet support recordHistory") when asked for it. Takes
    torch's arguments (``enabled``, ``context``, ``stacks``, ``max_entries``, ...) and ignores
    them: stack traces are not recorded (blocks carry the tags spill knows)."""
    _log.debug("spill.torch: _record_memory_history(%r) ignored: spill records its history "
               "(trace:on)", enabled)


def memory_allocated(device: Any = None) -> int:
    """Bytes of tensors spill holds now (allocated, resident or swapped out)."""
    s = _spill_stats(device, "memory_allocated")
    return int(s["allocated_bytes.current"]) if s else 0


def max_memory_allocated(device: Any = None) -> int:
    """Peak of memory_allocated since the start or the last reset_peak_memory_stats()."""
    s = _spill_stats(device, "max_memory_allocated")
    return int(s["allocated_bytes.peak"]) if s else 0


def memory_reserved(device: Any = None) -> int:
    """Device bytes spill has mapped now (allocated and cached): what the budget limits."""
    s = _spill_stats(device, "memory_reserved")
    return int(s["reserved_bytes.current"]) if s else 0


def max_memory_reserved(device: Any = None) -> int:
    """Peak of memory_reserved since the start or the last reset_peak_memory_stats()."""
    s = _spill_stats(device, "max_memory_reserved")
    return int(s["reserved_bytes.peak"]) if s else 0


def reset_peak_memory_stats(device: Any = None) -> None:
    """Starts the peaks (allocated, reserved, requested, cached bytes) again from now."""
    index = _device(device, "reset_peak_memory_stats")
    if state.started:
        spill.reset_peak_stats(index)


def reset_accumulated_memory_stats(device: Any = None) -> None:
    """Starts PyTorch's accumulated counts again from zero, as
    ``torch.cuda.reset_accumulated_memory_stats`` does: the ``allocated`` and ``freed`` totals
    of each family, ``num_alloc_retries``, ``num_ooms``, ``num_device_alloc`` and
    ``num_device_free`` of memory_stats() count from now. spill.stats() and spill's own keys
    keep counting from the start of the process."""
    index = _device(device, "reset_accumulated_memory_stats")
    if state.started:
        keys = torch_keys(spill.stats(index))
        _accumulated_from[index] = {k: v for k, v in keys.items() if _accumulated(k)}


def _fmt(n: Union[int, float]) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def memory_summary(device: Any = None, abbreviated: bool = False) -> str:
    """A table of spill's memory statistics, in the spirit of torch.cuda.memory_summary()."""
    _device(device, "memory_summary")  # an error names this function
    s = memory_stats(device)
    rows = [("Allocated memory", "allocated_bytes.all"),
            ("Requested memory", "requested_bytes.all"),
            ("Reserved memory (mapped)", "reserved_bytes.all"),
            ("Cached (free, mapped)", "inactive_split_bytes.all")]
    width = 78
    head = (f" spill memory summary, device {s.get('device', 0)} "
            f"({s.get('device_name', '?')}), budget {_fmt(s.get('budget_bytes', 0))}" if s else
            " spill memory summary: spill has not started (spill.torch.enable() not called)")
    lines = ["=" * width,
             head,
             "-" * width,
             f" {'Metric':<28}{'Cur Usage':>12}{'Peak Usage':>12}{'Tot Alloc':>13}"
             f"{'Tot Freed':>13}",
             "-" * width]
    for label, key in rows:
        lines.append(f" {label:<28}" + "".join(
            f"{_fmt(s.get(f'{key}.{stat}', 0)):>{12 if stat in ('current', 'peak') else 13}}"
            for stat in _STATS))
    lines.append("-" * width)
    swap_rows = [("Swapped out now", _fmt(s.get("swapped_out_bytes", 0))),
                 ("Pinned host memory", _fmt(s.get("host_pinned_bytes.current", 0))),
                 ("Bytes swapped out / in", f"{_fmt(s.get('swap.bytes_out', 0))} / "
                                             f"{_fmt(s.get('swap.bytes_in', 0))}"),
                 ("Prefetch hits / demand fetches", f"{s.get('swap.prefetch_hits', 0)} / "
                                                    f"{s.get('swap.demand_fetches', 0)}"),
                 ("Stall (host wait)", f"{s.get('swap.stall_s', 0.0) * 1e3:.1f} ms"),
                 ("Steps recorded / planned / resynced",
                  f"{s.get('swap.steps_recorded', 0)} / {s.get('swap.steps_planned', 0)} / "
                  f"{s.get('swap.steps_resynced', 0)}")]
    if not abbreviated:
        vmm_calls = sum(v for k, v in s.items() if k.startswith("vmm.") and k.endswith("_calls"))
        swap_rows += [("Allocations / frees",
                       f"{s.get('num_allocs', 0)} / {s.get('num_frees', 0)}"),
                      ("Cache hits", str(s.get("num_cache_hits", 0))),
                      ("Allocations that evicted", str(s.get("num_alloc_retries", 0))),
                      ("Out-of-memory errors", str(s.get("num_ooms", 0))),
                      ("Virtual-memory calls (host time)",
                       f"{vmm_calls} ({s.get('vmm.host_s', 0.0) * 1e3:.1f} ms)")]
    for label, value in swap_rows:
        lines.append(f" {label:<40}{value:>37}")
    lines.append("=" * width)
    return "\n".join(lines) + "\n"


def memory_snapshot(device: Any = None) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
    """spill's memory in the layout of the running torch's ``torch.cuda.memory._snapshot()``:
    ``{"segments": [...], "device_traces": [...]}`` on torch 2, the list of segments on torch
    1.13. Blocks whose bytes are on the host carry an "[on host]" frame, named blocks (offload's,
    :func:`name_tensor`'s) a frame with their name first. It loads in
    torch.cuda._memory_viz; ``spill.snapshot(path)`` writes the same as JSON for
    ``spill report`` and tools/snapshot_to_pickle.py."""
    index = _device(device, "memory_snapshot")
    snap = spill.snapshot(device=index) if state.started else {"segments": []}
    for seg in snap["segments"]:
        seg["segment_pool_id"] = tuple(seg.get("segment_pool_id", (0, 0)))
    if torch_version() < (2, 0):
        # torch 1.13's memory_viz reads a block's frames from its "history" entries (torch 2
        # reads "frames"): one entry for each block that has frames, so that it shows them.
        for seg in snap["segments"]:
            for b in seg["blocks"]:
                if b.get("frames") and "history" not in b:
                    b["history"] = [{"addr": b["address"], "frames": b["frames"],
                                     "real_size": b.get("requested_size") or b["size"]}]
        return snap["segments"]
    return {"segments": snap["segments"], "device_traces": snap.get("device_traces", [])}


def segments_snapshot(mempool_id: Any = None, include_traces: bool = True
                      ) -> List[Dict[str, Any]]:
    """What ``torch.cuda.memory_snapshot()`` returns: the segments (with their blocks). Takes
    torch 2's arguments (``mempool_id``, and ``include_traces`` from 2.10 on, which
    ``MemPool.snapshot()`` passes) and answers with all of spill's segments: spill has one
    pool per device."""
    snap = memory_snapshot()
    return snap if isinstance(snap, list) else snap["segments"]


def torch_snapshot(device: Any = None, augment_with_fx_traces: bool = False
                   ) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
    """What ``torch.cuda.memory._snapshot()`` returns, with its arguments (torch 2.10's
    ``_dump_snapshot`` passes ``augment_with_fx_traces``; spill's frames are its own tags, not
    FX code, so there is nothing to augment)."""
    return memory_snapshot(device)
