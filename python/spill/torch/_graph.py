"""A recorded step as spill's graph format, version 2 (docs/graph-format.md), and the batch
scaling found by comparing captures at two batch sizes (internal to spill.torch)."""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from ._recorder import OpRecord, Recorder

GRAPH_FORMAT_VERSION = 2
# The most bytes (UTF-8) of a string in a graph file (core/json_read.hpp): spill plan refuses
# longer names.
MAX_NAME_BYTES = 1024
_NAME_TAIL_BYTES = 100  # of a shortened name: the end says which op or parameter it is

_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i32", torch.uint8: "u8",
    torch.int8: "u8", torch.bool: "u8", torch.complex64: "f32", torch.complex128: "f64",
}
# Kinds a storage takes from the phase of its first write, when nothing else says.
_KIND_BY_PHASE = {"forward": "activation", "backward": "gradient", "optimizer": "workspace"}
_EXISTS_AT_START = ("weight", "buffer", "optimizer_state", "input")


def graph_dtype(d: torch.dtype) -> str:
    """The graph format's name for a torch dtype (float8 and other narrow types count as u8)."""
    return _DTYPES.get(d, "u8" if getattr(d, "itemsize", 1) == 1 else "f32")


def fit_name(text: str) -> str:
    """`text`, or when it is longer than a graph file allows (a module's name from a long
    ModuleDict key), its start and end around a hash of the whole: names are labels, and
    shortened ones stay recognisable and apart."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_NAME_BYTES:
        return text
    mark = f"...{hashlib.sha256(raw).hexdigest()[:12]}..."
    tail = raw[-_NAME_TAIL_BYTES:].decode("utf-8", "ignore")  # (a split character dropped)
    room = MAX_NAME_BYTES - len(mark) - len(tail.encode("utf-8", "surrogatepass"))
    return raw[:room].decode("utf-8", "ignore") + mark + tail


def build_graph(rec: Recorder, name: str, kinds: Dict[int, Tuple[str, str]],
                held: Set[int], carried: Set[int], batch: int) -> Dict[str, Any]:
    """The graph of a recorded step. `kinds` maps storage ids to (kind, name) for storages the
    recorder could not classify alone (gradients of parameters, optimizer state); those in
    `held` are held to the step's end. A parameter's gradient is: PyTorch keeps ``.grad``
    until the next ``zero_grad()``, past its last read in the optimizer pass (before, the
    graph freed it there, and a step whose peak is in that pass was predicted up to 16% low:
    audit 45a F1). Those of them in `carried` are carried over: the next step reads them
    (optimizer state replaced out of place), so no plan evicts them after their last use for
    the rest of the step (review 46r F2)."""
    storages = rec.by_id
    kind_of: List[str] = []
    name_of: List[str] = []
    for s in storages:
        kind, label = kinds.get(s.id, (s.kind, s.name))
        if not kind:
            kind = _KIND_BY_PHASE.get(s.phase, "activation")
        kind_of.append(kind)
        name_of.append(label or f"{kind}{s.id}")
    ops = [op for op in rec.ops if not _initialises_state(op, kind_of)]
    used = set()
    for op in ops:
        used.update(op.reads)
        used.update(op.writes)
    # Storages nothing uses and that do not outlive the step take no memory: drop them.
    keep = [s for s in storages
            if s.id in used or kind_of[s.id] in ("weight", "buffer", "optimizer_state")]
    tensors = []
    for s in keep:
        tensor = {"id": s.id, "name": fit_name(name_of[s.id]), "bytes": int(s.nbytes),
                  "dtype": graph_dtype(s.dtype), "kind": kind_of[s.id]}
        if s.id in held and kind_of[s.id] not in _EXISTS_AT_START:
            tensor["held_to_step_end"] = True
            if s.id in carried:
                tensor["carried_over"] = True
        tensors.append(tensor)
    param_of = _param_names(ops, kind_of, name_of)
    out_ops = []
    for i, op in enumerate(ops):
        if op.phase == "optimizer":
            label = f"{param_of[i]}:{op.type}" if param_of[i] else op.type
        else:
            where = op.module if op.phase == "forward" else _layer_name(rec, op.layer)
            label = f"{where}:{op.type}" if where else op.type
        out_ops.append({"name": fit_name(label), "type": fit_name(op.type), "phase": op.phase,
                        "layer": op.layer,
                        "reads": op.reads, "writes": op.writes, "flops": float(op.flops),
                        "bytes": int(op.bytes)})
    graph = {"format": "spill-graph", "version": GRAPH_FORMAT_VERSION, "name": fit_name(name),
             "tensors": tensors, "ops": out_ops}
    if batch > 0:
        graph["batch"] = int(batch)
    return graph


def _initialises_state(op: OpRecord, kind_of: List[str]) -> bool:
    # The optimizer's first step creates its state (zeros_like); a steady step does not.
    return (op.phase == "optimizer" and not op.reads and bool(op.writes) and
            all(kind_of[w] == "optimizer_state" for w in op.writes))


def _layer_name(rec: Recorder, layer: int) -> str:
    return rec.layer_names[layer] if 0 <= layer < len(rec.layer_names) else ""


def _param_names(ops: List[OpRecord], kind_of: List[str], name_of: List[str]) -> List[str]:
    """For each optimizer op, the parameter it updates: named by the weight or the state it
    touches (state is named "<slot>:<parameter>"), else the previous op's."""
    out: List[str] = []
    last = ""
    for op in ops:
        found = ""
        for t in op.writes + op.reads:
            if kind_of[t] == "weight":
                found = name_of[t]
                break
            if kind_of[t] in ("optimizer_state", "gradient") and ":" in name_of[t]:
                found = name_of[t].split(":", 1)[1]
        if op.phase == "optimizer":
            last = found or last
            out.append(last)
        else:
            out.append("")
    return out


def add_batch_scaling(small: Dict[str, Any], large: Dict[str, Any], batch: int,
                      large_batch: int) -> Optional[str]:
    """Adds `batch_bytes` / `batch_flops` to `small` (captured at `batch`) from `large` (the
    same step at `large_batch`): the part of each size that grows in proportion to the batch.
    Returns None, or why the two steps cannot be matched (then `small` is left unscaled)."""
    if len(small["tensors"]) != len(large["tensors"]) or len(small["ops"]) != len(large["ops"]):
        return (f"the step at batch {large_batch} has {len(large['ops'])} ops and "
                f"{len(large['tensors'])} tensors, at batch {batch} {len(small['ops'])} and "
                f"{len(small['tensors'])}: the model's structure depends on the batch size")
    extra = large_batch - batch
    tensor_parts = []
    for a, b in zip(small["tensors"], large["tensors"]):
        if a["id"] != b["id"] or a["kind"] != b["kind"]:
            return f"tensor {a['name']} and {b['name']} differ between the two batch sizes"
        part = _proportional(a["bytes"], b["bytes"], batch, extra, exact=True)
        if part is None:
            return (f"tensor {a['name']} has {a['bytes']} bytes at batch {batch} and "
                    f"{b['bytes']} at batch {large_batch}: not a fixed part plus a part "
                    f"proportional to the batch")
        tensor_parts.append(part)
    op_parts = []
    for a, b in zip(small["ops"], large["ops"]):
        if a["type"] != b["type"] or a["reads"] != b["reads"] or a["writes"] != b["writes"]:
            return (f"op {a['name']} at batch {batch} is {b['name']} at batch {large_batch}: "
                    f"the model's structure depends on the batch size")
        op_parts.append((_proportional(a["flops"], b["flops"], batch, extra, exact=False),
                         _proportional(a["bytes"], b["bytes"], batch, extra, exact=False)))
    for t, part in zip(small["tensors"], tensor_parts):
        if part:
            t["batch_bytes"] = part
    for op, (flops, traffic) in zip(small["ops"], op_parts):
        if flops:
            op["batch_flops"] = float(flops)
        if traffic:
            op["batch_bytes"] = int(traffic)
    return None


def _proportional(at_batch, at_large, batch: int, extra: int, exact: bool):
    """The part of `at_batch` proportional to the batch, from the growth to `at_large`; None
    when sizes are not affine in the batch (only checked when `exact`)."""
    growth = at_large - at_batch
    if growth <= 0:
        return None if exact and growth < 0 else 0
    if exact:
        if growth % extra:
            return None
        part = growth // extra * batch
        return part if part <= at_batch else None
    return min(at_batch, growth / extra * batch)
