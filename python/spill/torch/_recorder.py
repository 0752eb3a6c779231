"""The dispatch mode that records a training step on meta tensors (internal to spill.torch).

Every aten op that touches a meta tensor becomes an op of the graph; every storage it touches
becomes a tensor of the graph, so views and in-place ops share bytes instead of adding them.
Ops that only make views or allocate (view, transpose, empty) are not ops of the graph: a
storage allocated by one is produced by the first recorded op that uses it.
Storages stay referenced until the recorder is dropped, so no address is reused during a step.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spill import Error

from ._costs import op_flops, tensors_in, view_bytes
from ._meta import fallback_meta, is_meta

# Ops that allocate without writing: their storage is produced by its first recorded user.
_ALLOCATE_ONLY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                  "resize_", "resize_as_", "set_"}
# Ops whose tensor arguments only give a shape, dtype or device.
_LIKE_CONSTRUCTORS = {"zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
                      "randint_like", "new_zeros", "new_ones", "new_full"}
# In-place ops that overwrite `self` without reading it.
_WRITE_ONLY = {"zero_", "fill_", "copy_", "normal_", "uniform_", "random_", "bernoulli_",
               "exponential_", "geometric_", "log_normal_", "cauchy_"}


class CaptureError(Error, RuntimeError):
    """The step could not run without data. `op` is the aten op at fault (or None), `module`
    the module running it, `phase` forward, backward or optimizer. A :class:`spill.Error`
    (``code`` is ``Status.OK``: no C call failed) and a ``RuntimeError``."""

    def __init__(self, message: str, op: Optional[str] = None, module: Optional[str] = None,
                 phase: Optional[str] = None) -> None:
        super().__init__(message)
        self.op, self.module, self.phase = op, module, phase


@dataclass
class StorageRecord:
    id: int
    nbytes: int
    dtype: torch.dtype
    ref: Any                      # the storage, kept alive
    name: str = ""
    kind: str = ""                # set for storages declared before the step
    written: bool = False         # produced by a recorded op, or exists at step start
    pending: bool = False         # allocated by an unrecorded op, not yet produced
    phase: str = ""               # phase of the op that first wrote it
    layer: int = -1               # forward layer that wrote it, or first read it


@dataclass
class OpRecord:
    type: str
    phase: str
    layer: int
    module: str
    reads: List[int] = field(default_factory=list)
    writes: List[int] = field(default_factory=list)
    flops: float = 0.0
    bytes: int = 0


# Why a sparse tensor stops a capture, and what to do instead.
_NOT_STRIDED = ("sparse tensors are not supported by capture (it records a tensor by its "
                "storage, which a sparse tensor does not have: its indices and values have "
                "theirs). What you can do: capture the model with dense tensors instead, e.g. "
                "nn.Embedding(sparse=False) and a dense optimizer such as Adam for SparseAdam "
                "(the step then holds a gradient the size of the whole weight, where a sparse "
                "one holds only the rows the batch uses)")


def refuse_not_strided(t: torch.Tensor, name: str) -> None:
    """Raises CaptureError naming `name` (a weight, buffer or input) when `t` is sparse."""
    if t.layout != torch.strided:
        raise CaptureError(f"{name} is a {_layout_name(t)} tensor: {_NOT_STRIDED}")


def _layout_name(t: torch.Tensor) -> str:
    return str(t.layout).replace("torch.", "").replace("_", " ")


def _storage_of(t: torch.Tensor) -> Any:
    if hasattr(t, "untyped_storage"):  # torch >= 2.0
        return t.untyped_storage()
    return t.storage()._storage  # torch 1.13: TypedStorage over an UntypedStorage


class Recorder(TorchDispatchMode):
    """Records the ops of a step. Set `phase` between forward, backward and optimizer, and call
    enter/exit around modules (capture's module hooks do) to name ops and number layers."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: Dict[int, StorageRecord] = {}   # by the storage's address
        self.by_id: List[StorageRecord] = []
        self.ops: List[OpRecord] = []
        self.phase = "forward"
        self.layer_names: List[str] = []
        self._context: List[str] = []
        self._new_layer = True
        self._backward_layer = -1
        self._unpacked: List[Tuple[int, int]] = []  # (op index, storage id): see hold_saved
        self._safe_points: List[int] = []

    # ----- naming and layers -------------------------------------------------------------
    def enter(self, name: str) -> None:
        self._context.append(name)
        self._new_layer = True

    def exit(self) -> None:
        if self._context:
            self._context.pop()
        self._new_layer = True

    def module(self) -> str:
        return self._context[-1] if self._context else ""

    def _forward_layer(self) -> int:
        if self._new_layer or not self.layer_names:
            self.layer_names.append(self.module())
            self._new_layer = False
        return len(self.layer_names) - 1

    # ----- what a backward node holds ----------------------------------------------------
    def unpacked(self, t: torch.Tensor) -> None:
        """The backward unpacked saved tensor `t`: a node is about to run its ops."""
        if self.phase == "backward" and is_meta(t) and t.layout == torch.strided:
            rec = self.storages.get(_storage_of(t)._cdata)
            if rec is not None:
                self._unpacked.append((len(self.ops), rec.id))

    def safe_point(self) -> None:
        """The backward is between nodes (a gradient hook of a module's output or of a
        parameter ran): what spill's offload pinned for the nodes before is released."""
        if self.phase == "backward":
            self._safe_points.append(len(self.ops))

    def hold_saved(self) -> None:
        """Each saved tensor the backward unpacked is held until the next safe point: spill's
        offload() keeps it pinned that long. It is read by every op of its node (from its
        unpacking to the next node's unpacking: its node reads it at any of its ops, so their
        working sets hold it) and by the last op before the safe point (so it lives, resident,
        until there; in between a plan may count it moved, which offload would not do). Every
        op of the stretch would make a graph quadratic in a recurrent model's length (an LSTM
        of 80 steps: 301,574 reads for 2,831 ops). Before (2026-12-08), an op read only its
        own arguments, and a backward node that read its input at one op and made another
        tensor at the next was planned without the input resident: the 6x512 MLP of
        docs/pytorch.md planned from 8 MiB where the run needed 9 (its addmm backward pinned
        5 MiB and asked for 2 more)."""
        points = sorted(self._safe_points)
        starts = sorted({start for start, _ in self._unpacked})
        end = len(self.ops)

        def after(values: List[int], start: int, default: int) -> int:  # the first above start
            k = bisect.bisect_right(values, start)
            return values[k] if k < len(values) else default

        for start, sid in self._unpacked:
            stop = after(points, start, end)
            node_end = min(after(starts, start, stop), stop)
            for op in self.ops[start:node_end] + self.ops[max(start, stop - 1):stop]:
                if op.phase == "backward" and sid not in op.reads and sid not in op.writes:
                    op.reads.append(sid)

    # ----- storages ----------------------------------------------------------------------
    def storage(self, t: torch.Tensor) -> Tuple[StorageRecord, bool]:
        """The record of t's storage and whether it was first seen now."""
        if t.layout != torch.strided:  # (ops that make one are refused naming the op: _record)
            raise CaptureError(f"a {_layout_name(t)} tensor{self._where()}: {_NOT_STRIDED}",
                               module=self.module(), phase=self.phase)
        s = _storage_of(t)
        key = s._cdata
        rec = self.storages.get(key)
        if rec is not None:
            rec.nbytes = max(rec.nbytes, s.nbytes())
            return rec, False
        rec = StorageRecord(len(self.by_id), s.nbytes(), t.dtype, s)
        self.storages[key] = rec
        self.by_id.append(rec)
        return rec, True

    def declare(self, t: torch.Tensor, kind: str, name: str) -> None:
        """A tensor that exists when the step starts (weight, buffer, input)."""
        refuse_not_strided(t, name)
        rec, _ = self.storage(t)
        if not rec.kind:
            rec.kind, rec.name, rec.written = kind, name, True

    # ----- dispatch ----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_meta = any(is_meta(t) for t in tensors_in((args, kwargs)))
        if on_meta:
            self._refuse_data_dependence(func, args)
        out = self._run(func, args, kwargs, on_meta)
        if func is torch.ops.aten.detach.default and not isinstance(out, torch.Tensor):
            # A number saved for the backward (`x * 0.5`'s wrapped number): with saved tensor
            # hooks on (capture's: hold_saved) autograd detaches it, and the op gives the
            # number back here, where a tensor is expected (torch 1.13).
            return torch.tensor(out, dtype=args[0].dtype)
        if on_meta or any(is_meta(t) for t in tensors_in(out)):
            self._record(func, args, kwargs, out)
        return out

    def _where(self, args: Any = ()) -> str:
        module = self._module_of(args)
        return f" in the {self.phase} pass" + (f", module '{module}'" if module else "")

    def _module_of(self, args: Any = ()) -> str:
        """The module an op with arguments ``args`` belongs to: the one running it; in the
        backward, the forward layer whose saved tensors it reads (as a recorded op's layer),
        else the last one; the optimizer's ops belong to no module. (Before, a backward's
        failure always named the last forward layer, often the loss: audit 45a F18.)"""
        if self.module() or self.phase == "optimizer":
            return self.module()
        if self.phase == "backward":
            layers = []
            for t in tensors_in(args):
                if is_meta(t) and t.layout == torch.strided:  # (a sparse one has no storage)
                    rec = self.storages.get(_storage_of(t)._cdata)
                    if rec is not None and rec.layer >= 0 and rec.phase in ("forward", ""):
                        layers.append(rec.layer)
            if layers and max(layers) < len(self.layer_names):
                return self.layer_names[max(layers)]
        return self.layer_names[-1] if self.layer_names else ""

    def _refuse_data_dependence(self, func, args) -> None:
        name = str(func.overloadpacket.__name__)
        tags = getattr(func, "tags", ())
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()))
        if torch.Tag.dynamic_output_shape in tags or bool_index:
            raise CaptureError(
                f"aten.{name}{self._where(args)}: its output shape depends on the values in a "
                f"tensor (data-dependent shape), which a capture without data cannot know. "
                f"What you can do: give the shape another way (e.g. a fixed-size mask with "
                f"torch.where instead of boolean indexing or nonzero()), or run that part "
                f"outside the captured model.", op=f"aten.{name}", module=self._module_of(args),
                phase=self.phase)
        if torch.Tag.data_dependent_output in tags:
            raise CaptureError(
                f"aten.{name}{self._where(args)}: reads the value of a tensor (.item(), a Python "
                f"`if` on a tensor, .tolist()), which a capture without data does not have. "
                f"What you can do: keep such values as tensors, or compute them outside the "
                f"captured step.", op=f"aten.{name}", module=self._module_of(args),
                phase=self.phase)

    # Ops seen without a meta kernel: they go to the fallback directly (building PyTorch's
    # NotImplementedError message costs milliseconds).
    _without_meta_kernel: set = set()

    def _run(self, func, args, kwargs, on_meta: bool):
        if on_meta and func in self._without_meta_kernel:
            out = fallback_meta(func, args, kwargs)
            if out is not NotImplemented:
                return out
        try:
            return func(*args, **kwargs)
        except NotImplementedError as e:
            if not on_meta:
                raise
            out = fallback_meta(func, args, kwargs)
            if out is not NotImplemented:
                self._without_meta_kernel.add(func)
                return out
            raise self.no_meta_kernel(func._schema.name, (args, kwargs)) from e

    def no_meta_kernel(self, schema_name: str, args: Any = ()) -> CaptureError:
        """The error for an op (``ns::name``) that has no meta kernel."""
        qualified = schema_name.replace("::", ".")
        short = schema_name.split("::")[-1].split(".")[0]
        if schema_name.startswith("aten::_foreach") and self.phase == "optimizer":
            # PyTorch's own multi-tensor kernels (foreach=True optimizers) lack meta kernels
            # in older torch: the per-parameter path computes the same step.
            return CaptureError(
                f"{qualified} in the optimizer pass: this torch ({torch.__version__}) has no "
                f"meta kernel for its multi-tensor (foreach) ops, so that optimizer cannot run "
                f"without data. Capture with foreach=False (e.g. functools.partial("
                f"torch.optim.AdamW, foreach=False)): the same step, op by op.",
                op=qualified, module="", phase=self.phase)
        return CaptureError(
            f"{qualified}{self._where(args)}: no meta kernel, so it cannot run without data. "
            f"What you can do: register one that only computes output shapes, e.g. "
            f"@torch.library.register_fake(\"{schema_name}\") (torch >= 2.4) or "
            f"torch.library.Library(\"{schema_name.split('::')[0]}\", \"IMPL\").impl("
            f"\"{short}\", fn, \"Meta\") (also \"AutogradMeta\" for an op without autograd "
            f"support), returning empty tensors of the right shapes.",
            op=qualified, module=self._module_of(args), phase=self.phase)

    def _record(self, func, args, kwargs, out) -> None:
        name = str(func.overloadpacket.__name__)
        for t in tensors_in((args, kwargs, out)):
            if is_meta(t) and t.layout != torch.strided:
                raise self._not_strided(name, t, args, kwargs)
        reads: List[StorageRecord] = []
        writes: List[StorageRecord] = []
        traffic = 0
        seen_inputs = set()
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            mutable = arg.alias_info is not None and arg.alias_info.is_write
            for t in tensors_in(value):
                if not is_meta(t):
                    continue
                rec, new = self.storage(t)
                seen_inputs.add(rec.id)
                if new:  # existed before the step without being declared: module state
                    rec.written, rec.kind = True, "buffer"
                if name in _ALLOCATE_ONLY:
                    continue
                traffic += view_bytes(t)
                if mutable:
                    writes.append(rec)
                    if arg.name != "out" and name not in _WRITE_ONLY:
                        reads.append(rec)
                elif name not in _LIKE_CONSTRUCTORS:
                    reads.append(rec)
        for t in tensors_in(out):
            if not is_meta(t):
                continue
            rec, new = self.storage(t)
            if rec.id in seen_inputs:
                continue  # a view of an input, or the input an in-place op returns
            if name in _ALLOCATE_ONLY:
                rec.pending = True
                continue
            traffic += view_bytes(t)
            writes.append(rec)
        if not writes or name in _ALLOCATE_ONLY:
            return  # a view or a shape query: no bytes move
        # A storage read before anything wrote it was allocated by an unrecorded op.
        for rec in reads:
            if not rec.written:
                writes.append(rec)
        op = OpRecord(name, self.phase, -1, self.module(), flops=op_flops(name, args, kwargs, out),
                      bytes=traffic)
        op.reads = _unique_ids(reads)
        op.writes = _unique_ids(writes)
        op.layer = self._layer_of(reads)
        for rec in writes:
            if not rec.written:
                rec.written, rec.pending, rec.phase = True, False, self.phase
                if self.phase == "forward":
                    rec.layer = op.layer
        if self.phase == "forward":
            for rec in reads:
                if rec.layer < 0:
                    rec.layer = op.layer
        self.ops.append(op)

    def _not_strided(self, name: str, sparse: torch.Tensor, args, kwargs) -> CaptureError:
        """The error for op `name` touching a sparse (or other non-strided) tensor, naming the
        module and, in backward, the forward op whose gradient it computes."""
        module, of = self.module(), ""
        if self.phase == "backward":  # the layer of what it reads, as for a recorded op
            dense = [self.storages.get(_storage_of(t)._cdata) for t in tensors_in((args, kwargs))
                     if is_meta(t) and t.layout == torch.strided]
            layer = self._layer_of([r for r in dense if r is not None])
            module = self.layer_names[layer] if 0 <= layer < len(self.layer_names) else ""
            forward = [op.type for op in self.ops if op.phase == "forward" and op.layer == layer]
            of = f" (the backward of aten.{forward[-1]})" if forward else ""
        where = f" in the {self.phase} pass" + (f", module '{module}'" if module else "")
        return CaptureError(f"aten.{name}{where}{of} makes or reads a {_layout_name(sparse)} "
                            f"tensor: {_NOT_STRIDED}", op=f"aten.{name}", module=module,
                            phase=self.phase)

    def _layer_of(self, reads: List[StorageRecord]) -> int:
        if self.phase == "forward":
            return self._forward_layer()
        if self.phase == "backward":
            # The backward of forward layer L reads what L saved: its inputs, weights, outputs.
            layers = [r.layer for r in reads if r.layer >= 0 and r.phase in ("forward", "")]
            if layers:
                self._backward_layer = max(layers)
            elif self._backward_layer < 0:
                self._backward_layer = len(self.layer_names) - 1
            return self._backward_layer
        return -1


def _unique_ids(recs: List[StorageRecord]) -> List[int]:
    out: List[int] = []
    for r in recs:
        if r.id not in out:
            out.append(r.id)
    return out
