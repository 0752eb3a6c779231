"""Statistics, memory snapshots, traces, OOM messages and block names (spill_stats_json, ...)."""
from __future__ import annotations

import ctypes
import json
import os
from typing import Any, Dict, Optional, Union

from . import _args, _files
from ._errors import InvalidArgumentError
from ._lib import call, library


def _take_string(fn: str, *args: Any) -> str:
    """Calls a C function that returns a string through `char** out`; frees it. Bytes that are
    not UTF-8 (text a C caller gave spill) become U+FFFD rather than an exception, as in
    error messages."""
    out = ctypes.c_void_p()
    call(fn, *args, ctypes.byref(out))
    try:
        return ctypes.string_at(out.value).decode(errors="replace") if out.value else ""
    finally:
        library().spill_string_free(out)


def stats(device: int = 0) -> Dict[str, Union[int, float, str, bool]]:
    """``device``'s statistics as a flat dict with dotted keys, in the style of
    ``torch.cuda.memory_stats``: ``"allocated_bytes.current"`` / ``".peak"`` /
    ``".allocated"`` / ``".freed"`` (likewise ``requested_bytes``, ``reserved_bytes``,
    ``cached_bytes``, ``host_pinned_bytes``), counters such as ``"num_allocs"`` and
    ``"num_ooms"``, the swapper's ``"swap.bytes_out"``, ``"swap.swap_ins"``, ...,
    ``"budget_bytes"``, ``"device_name"`` and ``"simulated"``. Bytes are bytes, times seconds."""
    return json.loads(_take_string("spill_stats_json", _args.device(device)))


def snapshot(path: Optional[_args.PathLike] = None, device: int = 0) -> Optional[Dict[str, Any]]:
    """A memory snapshot of ``device`` in the layout of PyTorch's memory_viz (segments with
    their blocks, and the recent allocation history). Returns it as a dict, or, given
    ``path``, writes it there as JSON and returns None (``tools/snapshot_to_pickle.py`` turns
    the file into the pickle memory_viz opens). The file is replaced whole or not at all, as
    ``spill``'s own outputs: a failed write keeps the previous one."""
    out = None if path is None else _args.path(path)  # checked before any work
    text = _take_string("spill_snapshot_json", _args.device(device))
    if out is None:
        return json.loads(text)
    if not text.endswith("\n"):  # a line of its own, as spill.trace's file: a log appended
        text += "\n"             # to (/dev/stdout) goes on after it on the next line
    try:
        _files.write_text(out, text)
    except OSError as e:  # as spill.trace says it: the error names the path as given
        raise _files.write_error(e, f"spill.snapshot: cannot write {os.fsdecode(out)!r}") from e
    return None


def set_block_name(ptr: int, name: Optional[str]) -> None:
    """Names the block that starts at ``ptr`` (an address :func:`spill.malloc` returned) for
    the views that list blocks: :func:`snapshot` (a frame with the name and a ``"name"`` field
    on the block), out-of-memory messages (the largest named resident blocks) and
    :func:`trace` (a ``name`` event). The name is copied; None or ``""`` clears it; names
    longer than 255 bytes (UTF-8) are cut there. The name goes with the block: once it is
    freed, no later block at that address shows it. Raises
    :class:`spill.InvalidArgumentError` naming the address when no live block of spill's
    starts at ``ptr`` (an interior pointer, a freed block, memory not spill's)."""
    call("spill_set_block_name", _args.pointer(ptr),
         _args.text(name, "name") if name is not None else None)


def block_name(ptr: int) -> str:
    """The name of the block that starts at ``ptr`` (``""`` when it has none); raises as
    :func:`set_block_name` does for ``ptr``."""
    return _take_string("spill_get_block_name", _args.pointer(ptr))


def trace(path: _args.PathLike) -> None:
    """Writes the events recorded since the previous call (every device: allocations, maps,
    pins, swaps, stalls, OOMs) to ``path`` as Chrome/Perfetto trace JSON, and starts a new
    trace. Its metadata holds the memory when the first event happened (``baseline``), the
    events lost to full rings since the previous call (``dropped_events``) and the budget.
    ``spill report`` turns the file into an HTML report."""
    out = _args.path(path)
    _files.flush_before(out)  # /dev/stdout: what Python printed there first
    call("spill_trace_export", out)


def last_oom_message(device: int = 0) -> str:
    """The message of ``device``'s latest out-of-memory failure (where every byte was), or ""."""
    return _take_string("spill_last_oom_message", _args.device(device))


def reset_peak_stats(device: int = 0) -> None:
    """Starts ``device``'s peaks (allocated, requested, reserved, cached and pinned host bytes)
    again from their current values."""
    call("spill_reset_peak_stats", _args.device(device))
