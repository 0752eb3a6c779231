"""spill.torch.capture: one training step of a PyTorch model recorded, without data, as a
graph that `spill plan` turns into "does it fit, and how fast" for any GPU and link.

The step (forward, loss, backward, optimizer step) runs on meta tensors: every tensor has its
shape and dtype but no memory, so a model of any size captures on a laptop. Each aten op is
recorded with the storages it reads and writes, its FLOPs and its bytes; views and in-place
ops share their storage's bytes. The step is captured at the given batch and at twice it, so
the graph records which sizes grow with the batch (`spill plan --batch N / --max-batch`); at
each, one step runs unrecorded first, and the next, a steady step, is recorded.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Set, Tuple, Union

import torch

from .. import _args
from .._errors import InvalidArgumentError
from .._files import is_own_stream, write_error, write_text
from ._costs import tensors_in
from ._graph import MAX_NAME_BYTES, add_batch_scaling, build_graph
from ._meta import empty_meta_like, is_meta, map_tensors, resolve_model, with_batch
from ._recorder import CaptureError, OpRecord, Recorder, refuse_not_strided

OptimizerFactory = Callable[[Any], "torch.optim.Optimizer"]
# PyTorch's message for an op with no kernel for a dispatch key (e.g. a custom op on meta).
_NO_KERNEL = re.compile(r"Could not run '([\w:.]+)' with arguments from the '(\w+)' backend")
# A spill graph names its format near its start (json's sorted keys put only "batch" first).
_GRAPH_FORMAT = re.compile(rb'"format"\s*:\s*"spill-graph"')
# Set while this thread records a step: a capture started inside it (from the model, loss_fn or
# optimizer) would be recorded whole into the outer step by its dispatch mode and module hooks.
_recording = threading.local()


def _output_path(path: Optional[Union[str, "os.PathLike[str]"]],
                 caller: str = "spill.torch.capture") -> Optional[str]:
    """`path` checked before the step is recorded (or exported, by `caller`): a path in a
    directory that exists, and not a file that holds something else than a spill graph (the
    default, graph.json in the working directory, would replace a user's file of that name
    without a word)."""
    if path is None:
        return None
    out = os.fsdecode(_args.path(path, f"{caller}: path"))
    if is_own_stream(out):
        return out  # /dev/stdout and its kin: written through the descriptor, nothing replaced
    directory = os.path.dirname(out) or "."
    if not os.path.isdir(directory):
        raise InvalidArgumentError(f"{caller}: cannot write {out!r}: no directory "
                                   f"{directory!r}")
    if os.path.isdir(out):
        raise InvalidArgumentError(f"{caller}: cannot write {out!r}: a directory")
    if not os.access(out if os.path.exists(out) else directory, os.W_OK):
        raise InvalidArgumentError(f"{caller}: cannot write {out!r}: permission denied")
    if not os.path.isfile(out):
        return out  # nothing there to lose, or a FIFO or device: written as a stream
    try:
        with open(out, "rb") as existing:
            head = existing.read(65536)
    except OSError:
        return out  # unreadable: the write says whether it can replace it
    if head.strip() and not _GRAPH_FORMAT.search(head):
        raise InvalidArgumentError(
            f"{caller}: {out!r} exists and is not a spill graph: {caller.split('.')[-1]} "
            f"replaces only an earlier graph; pass another path= (or remove the file)")
    return out


@dataclass
class CapturedStep:
    """What capture recorded. `graph` is the JSON document (spill graph format, version 2)."""
    graph: Dict[str, Any]
    path: Optional[str]
    parameter_count: int     # elements of the model's parameters, tied ones counted once
    batch: int               # batch size of the capture (0 when no input has a batch dim)
    batch_scaling: Optional[str]  # None when sizes scale with the batch, else why not

    @property
    def op_count(self) -> int:
        return len(self.graph["ops"])

    @property
    def tensor_count(self) -> int:
        return len(self.graph["tensors"])


def _in_training_modes(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` run in a training step's autograd modes whatever the caller's: grad mode
    on and inference mode off (a capture from an evaluation's ``torch.no_grad()`` blamed
    loss_fn for a loss that required no grad), anomaly detection off (its NaN checks read
    values, which meta tensors do not have): audit 45a F20. Anomaly detection is the
    process's (not a thread's) in torch 1.13: it is switched off only when on, and then for
    every thread until the capture returns (review 45r F8)."""
    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        anomaly = (torch.autograd.set_detect_anomaly(False) if torch.is_anomaly_enabled()
                   else contextlib.nullcontext())
        with torch.inference_mode(False), torch.enable_grad(), anomaly:
            return function(*args, **kwargs)
    return run


@_in_training_modes
def capture(model: Union[torch.nn.Module, Callable[[], torch.nn.Module]],
            example_inputs: Any,
            loss_fn: Optional[Callable[..., torch.Tensor]] = None,
            optimizer: Optional[OptimizerFactory] = torch.optim.Adam,
            path: Optional[Union[str, "os.PathLike[str]"]] = "graph.json",
            *,
            targets: Any = None,
            batch_dim: int = 0,
            scale_batch: bool = True,
            name: Optional[str] = None,
            set_to_none: bool = True) -> CapturedStep:
    """Records one training step of `model` and writes it as a spill graph to `path`.

    model: an ``nn.Module`` or a callable that builds one. A callable is called with factory
        functions on the meta device, so even GPT-2 XL takes no memory to build; a module whose
        parameters are on meta (built under ``with torch.device("meta")``) is used as is; any
        other module is copied onto meta (its parameters are not copied, nor changed).
    example_inputs: what the model is called with: a tensor, a tuple of positional arguments, or
        a dict (any mapping: a tokenizer's BatchEncoding) of keyword arguments. Real or meta
        tensors; only shapes and dtypes matter. Tensors nested in lists, tuples and mappings
        are inputs too, and the model gets the same nest (its types kept) of meta copies; a
        tensor in an object's attribute, or a mapping that cannot be rebuilt, raises TypeError
        naming where it is (``example_inputs['batch']['ids']``).
    loss_fn: ``loss_fn(output, *targets)`` gives the scalar loss (``loss_fn(output)`` without
        targets); default: the output itself when it is a scalar, else its sum.
    optimizer: a factory taking the parameters, e.g. ``torch.optim.Adam`` (the default) or
        ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)``; None skips the step.
    path: where the graph JSON goes, replaced whole or not at all (as ``spill``'s own outputs);
        None writes nothing; ``"/dev/stdout"`` and its kin are written through the
        descriptor. Checked before the step is recorded: a missing directory, no permission to
        write, or a file there that is not a spill graph (it would be lost) raises
        :class:`spill.InvalidArgumentError` naming it; a write that fails for lack of room
        raises :class:`spill.WriteFailedError`, the earlier file kept.
    targets: a tensor or tuple of tensors passed to loss_fn after the output.
    batch_dim: the batch dimension of inputs and targets (0). Tensors whose size there equals
        the first input's are the batch.
    scale_batch: also capture at twice the batch, to record which sizes grow with it.
    name: the graph's name (default: the model's class name), at most 1024 bytes of UTF-8.
        Longer tensor and op names (from a long ModuleDict key) are shortened in the graph:
        their start and end around a hash of the whole.
    set_to_none: what the training loop's ``optimizer.zero_grad()`` does: True (torch 2's
        default) sets the gradients to None, so the backward makes them; False (torch 1.13's
        default) zeroes them, so they exist from the step's start (its first ops zero them)
        and the backward adds to them.

    Raises CaptureError naming the op and module when the step cannot run without data
    (values read with .item(), data-dependent shapes, ops without a meta kernel), and for
    sparse tensors (nn.Embedding(sparse=True)), which it does not support.
    """
    if getattr(_recording, "active", False):
        raise CaptureError("spill.torch.capture cannot run inside another capture (it was "
                           "called from the model, loss_fn or optimizer of a capture in "
                           "progress, whose recorder would take in its whole step): run the "
                           "captures one after the other")
    # (an int, never a bool: batch_dim=True was taken for 1)
    batch_dim = _args.integer(batch_dim, "spill.torch.capture: batch_dim", 0, 2**63 - 1)
    if name is not None and len(_args.text(name, "spill.torch.capture: name")) > MAX_NAME_BYTES:
        raise InvalidArgumentError(
            f"spill.torch.capture: name must be at most {MAX_NAME_BYTES} bytes of UTF-8 (the "
            f"graph format's limit, which spill plan checks), got {name[:40]!r}... "
            f"({len(name.encode())} bytes)")
    out_path = _output_path(path)  # before the work, which may take minutes
    if optimizer is not None and (isinstance(optimizer, torch.optim.Optimizer)
                                  or not callable(optimizer)):
        raise CaptureError(f"optimizer must be a factory taking the parameters (e.g. "
                           f"torch.optim.Adam or functools.partial(torch.optim.SGD, lr=0.1)), "
                           f"not {type(optimizer).__name__}: the capture makes its own for the "
                           f"meta copies of the parameters")
    net = resolve_model(model)
    for k, t in enumerate(tensors_in((example_inputs, targets))):  # named as Recorder.declare's
        refuse_not_strided(t, f"input{k}")  # (the meta copies would be dense)
    # Meta copies, in the caller's nests of mappings, lists and tuples (the model gets what it
    # was given); a nest they cannot be made in is refused here, named (before, the tensors
    # of a mapping inside a dict or tuple reached the model as they were, and were not inputs).
    made: Dict[int, Any] = {}  # (a tensor both an input and a target is one tensor)
    example_inputs = map_tensors(example_inputs, empty_meta_like, "example_inputs", made)
    targets = map_tensors(targets, empty_meta_like, "targets", made)
    if isinstance(example_inputs, Mapping) and not isinstance(example_inputs, dict):
        # (a tokenizer's BatchEncoding is a UserDict: keyword arguments too; it was passed as
        # one positional argument: audit 45a F19)
        example_inputs = dict(example_inputs)
    if not isinstance(example_inputs, (tuple, list, dict)):
        example_inputs = (example_inputs,)
    if targets is not None and not isinstance(targets, (tuple, list)):
        targets = (targets,)
    batch = _batch_size((example_inputs, targets), batch_dim)
    if batch == 0 and any(t.dim() > batch_dim for t in tensors_in((example_inputs, targets))):
        raise CaptureError(f"the example inputs have an empty batch (size 0 along batch_dim "
                           f"{batch_dim}): capture at a batch of 1 or more (2 or more to learn "
                           f"how sizes grow with it)")
    graph_name = name or type(net).__name__
    step = _Step(net, loss_fn, optimizer,
                 bool(_args.flag(set_to_none, "spill.torch.capture: set_to_none")))
    graph = step.record(example_inputs, targets, batch_dim, batch, batch, graph_name)
    reason: Optional[str] = "no input has a batch dimension" if batch == 0 else None
    if scale_batch and batch > 0:
        try:
            large = step.record(example_inputs, targets, batch_dim, batch, 2 * batch, graph_name)
        except CaptureError as e:
            # The step ran at its batch: what changed is every input and target whose size
            # along batch_dim is the batch, each doubled, batched or not.
            raise CaptureError(
                f"the step ran at batch {batch} but not at {2 * batch}, where the capture "
                f"runs it again to learn how sizes grow with the batch: it doubles every input "
                f"and target of size {batch} along batch_dim {batch_dim}. If one of them is not "
                f"batched there (a mask or bias whose size happens to equal the batch, targets "
                f"batched along another dimension), pass scale_batch=False (the graph is then "
                f"planned at this batch only) or capture at another batch. At {2 * batch}: {e}",
                op=e.op, module=e.module, phase=e.phase) from e
        reason = add_batch_scaling(graph, large, batch, 2 * batch)
        if reason is not None:
            graph.pop("batch", None)
            if batch == 1:
                reason += (" (PyTorch takes other paths for a batch of one, e.g. views where "
                           "larger batches copy: capture at a batch of 2 or more)")
    elif not scale_batch:
        reason = "captured with scale_batch=False"
        graph.pop("batch", None)
    if out_path is not None:
        # Whole or not at all, as spill's own outputs (a failed write keeps the previous file);
        # a failure is a spill.Error as theirs (a plain OSError before).
        try:
            write_text(out_path, json.dumps(graph, separators=(",", ":")) + "\n")
        except OSError as e:
            raise write_error(e, f"spill.torch.capture: cannot write {out_path!r}") from e
    return CapturedStep(graph, out_path, sum(p.numel() for p in step.params), batch, reason)


def _batch_size(value: Any, batch_dim: int) -> int:
    for t in tensors_in(value):
        if t.dim() > batch_dim:
            return int(t.shape[batch_dim])
    return 0


class _Step:
    """One model, loss and optimizer factory; records a step at a given batch."""

    def __init__(self, net: torch.nn.Module, loss_fn: Optional[Callable[..., torch.Tensor]],
                 optimizer: Optional[OptimizerFactory], set_to_none: bool = True) -> None:
        self.net, self.loss_fn, self.optimizer = net, loss_fn, optimizer
        self.set_to_none = set_to_none
        self.module_names = {id(m): n for n, m in net.named_modules()}
        self.params = list(dict.fromkeys(net.parameters()))  # tied parameters once
        self.param_names = {id(p): n for n, p in net.named_parameters()}

    def record(self, inputs: Any, targets: Any, batch_dim: int, batch: int, at_batch: int,
               name: str) -> Dict[str, Any]:
        made: Dict[int, Any] = {}
        inputs = with_batch(inputs, batch_dim, batch, at_batch, made)
        targets = (with_batch(targets, batch_dim, batch, at_batch, made)
                   if targets is not None else ())
        for p in self.params:
            p.grad = None
        try:
            opt = self.optimizer(self.params) if self.optimizer is not None else None
        except Exception as e:  # e.g. a model with no parameters: torch's own ValueError
            raise CaptureError(f"the optimizer factory failed on the model's "
                               f"{len(self.params)} parameters: {type(e).__name__}: {e} (pass "
                               f"optimizer=None to capture without an optimizer step)",
                               phase="optimizer") from e
        if opt is not None and _step_needs_closure(opt):
            raise CaptureError(f"{type(opt).__name__}: optimizers whose step needs a closure "
                               f"(one that computes the loss again, as LBFGS's line search "
                               f"does) are not supported by capture: capture with another "
                               f"optimizer, or with optimizer=None", phase="optimizer")
        try:
            # A first step, not recorded: the one recorded is a steady step, as training's
            # are. The first creates the optimizer's state (SGD's momentum is a clone of the
            # gradient there, a multiply-add later), a module's lazily made state and
            # TorchScript's profiled graphs; recorded, it was a first step's ops, and the
            # second capture (at twice the batch) differed from it for those reasons, which
            # were then blamed on the batch (audit 45a F7, F14, F17).
            self._run(Recorder(), inputs, targets, opt)
            # (an input that requires grad kept the first step's: review 45r F5; parameters
            # keep theirs where the loop's zero_grad() zeroes them)
            for t in tensors_in((inputs, targets)):
                t.grad = None
            if self.set_to_none:
                for p in self.params:
                    p.grad = None
            rec = Recorder()
            for p in self.params:
                rec.declare(p, "weight", self.param_names[id(p)])
            for n, b in self.net.named_buffers():
                rec.declare(b, "buffer", n)
            # A state that aliases a parameter or buffer (``state["ema"] = p``, a view of p) is
            # the same bytes, which keep the model's kind and name (declare keeps the first):
            # before, the weight became optimizer_state, or an input once the step replaced it.
            model = {s.id for s in rec.by_id}
            state: Dict[Tuple[int, str], int] = {}  # (parameter, slot) -> its storage's id
            for p, slots in (opt.state.items() if opt is not None else ()):
                for slot, value in slots.items():
                    if is_meta(value):  # (not a step count)
                        rec.declare(value, "optimizer_state",
                                    f"{slot}:{self.param_names.get(id(p), '?')}")
                        if rec.storage(value)[0].id not in model:
                            state[(id(p), slot)] = rec.storage(value)[0].id
            for k, t in enumerate(tensors_in((inputs, targets))):
                rec.declare(t, "input", f"input{k}")
            self._run(rec, inputs, targets, opt)
            return build_graph(rec, name, *self._kinds(rec, opt, state, model), at_batch)
        finally:
            for p in self.params:
                p.grad = None

    def _run(self, rec: Recorder, inputs: Any, targets: Sequence[Any], opt: Any) -> None:
        """Forward, loss, backward and optimizer step under the recorder."""
        try:
            with _recording_on_this_thread(), self._module_hooks(rec), \
                    self._backward_nodes(rec), rec:
                if not self.set_to_none:  # the loop's zero_grad(set_to_none=False)
                    rec.phase = "other"
                    for p in self.params:
                        if p.grad is not None:
                            p.grad.zero_()
                rec.phase = "forward"
                out = self.net(**inputs) if isinstance(inputs, dict) else self.net(*inputs)
                rec.enter("loss")
                loss = self._loss(out, targets)
                rec.exit()
                rec.phase = "backward"
                loss.backward()
                if opt is not None:
                    rec.phase = "optimizer"
                    opt.step()
            rec.hold_saved()
        except CaptureError:
            raise
        except Exception as e:  # the model's own code failed on meta tensors
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            missing = _NO_KERNEL.search(first_line)
            if isinstance(e, NotImplementedError) and missing and "Meta" in missing.group(2):
                raise rec.no_meta_kernel(missing.group(1)) from e
            raise CaptureError(
                f"the training step failed in the {rec.phase} pass{_module_note(rec)}: "
                f"{type(e).__name__}: {first_line}. If it runs with real tensors: "
                f"spill.torch.capture runs the step without data (meta tensors), and code that "
                f"needs values (.numpy(), printing tensors, tensors created on the CPU and "
                f"mixed with the model's) cannot run there: move it out of the captured step or "
                f"keep it on the model's device.", module=rec.module(), phase=rec.phase) from e

    @contextlib.contextmanager
    def _backward_nodes(self, rec: Recorder) -> Iterator[None]:
        """What spill's offload() pins in the backward, told to the recorder (hold_saved): the
        saved tensors each node unpacks, until the engine is next between nodes (a gradient
        hook of a module's output, _module_hooks, or of a parameter)."""
        def unpack(saved):
            rec.unpacked(saved[0])
            return saved[0]

        handles = [p.register_hook(lambda _grad: rec.safe_point()) for p in self.params
                   if p.requires_grad]
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: (t,), unpack):
                yield
        finally:
            for h in handles:
                h.remove()

    def _loss(self, out: Any, targets: Sequence[Any]) -> torch.Tensor:
        if self.loss_fn is not None:
            loss = self.loss_fn(out, *targets)
        elif isinstance(out, torch.Tensor):
            loss = out if out.dim() == 0 else out.sum()
        else:
            raise CaptureError(f"the model returned {type(out).__name__}, not a tensor: pass "
                               f"loss_fn to turn it into a scalar loss", phase="forward")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise CaptureError("loss_fn must return a scalar tensor that depends on the "
                               "model's parameters (one that requires grad)", phase="forward")
        return loss

    @contextlib.contextmanager
    def _module_hooks(self, rec: Recorder) -> Iterator[None]:
        names = self.module_names
        # The hooks are the process's: a module another thread runs meanwhile (training) is
        # not this step's (its names and layers were taken: audit 45a F11).
        thread = threading.get_ident()

        def pre(module, _inputs):
            if threading.get_ident() == thread:
                rec.enter(names.get(id(module)) or type(module).__name__.lower())

        def post(module, _inputs, output):
            if threading.get_ident() == thread:
                rec.exit()
                # The gradient of a module's output: the backward is between nodes there.
                for t in tensors_in(output):
                    if torch.is_grad_enabled() and t.requires_grad and t.grad_fn is not None:
                        t.register_hook(between)

        def between(_grad):
            rec.safe_point()

        from torch.nn.modules import module as nn_module
        handles = [nn_module.register_module_forward_pre_hook(pre),
                   nn_module.register_module_forward_hook(post)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _kinds(self, rec: Recorder, opt: Any, state: Dict[Tuple[int, str], int], model: Set[int]
               ) -> Tuple[Dict[int, Tuple[str, str]], Set[int], Set[int]]:
        """Gradients of parameters and optimizer state, found after the step: their (kind,
        name) by storage id, the ids of those held to the step's end (the gradients, and
        a state the step replaced out of place, ``state["m"] = state["m"] * b + g``, whose
        storage before the step, in ``state``, is then an input freed once the op that makes
        the new one has run, unless another slot keeps it; both were persistent, twice the
        state: review 45r F4, 45s G2), and those of them the next step reads (the new state;
        not a gradient, which a zero_grad() that zeroes it only writes, and which spill brings
        back from the host without a copy: review 46s F1). A slot holding one of the
        ``model``'s storages (its parameters' and buffers') is neither."""
        kinds: Dict[int, Tuple[str, str]] = {}
        held: Set[int] = set()
        carried: Set[int] = set()

        for p in self.params:
            if is_meta(p.grad):
                grad = rec.storage(p.grad)[0].id
                kinds.setdefault(grad, ("gradient", "grad:" + self.param_names[id(p)]))
                held.add(grad)
        after = {(id(p), slot): rec.storage(value)[0].id
                 for p, slots in (opt.state.items() if opt is not None else ())
                 for slot, value in slots.items()
                 if is_meta(value) and rec.storage(value)[0].id not in model}
        existed = set(state.values())  # storages of the state when the step began
        for (param, slot), now in after.items():
            label = f"{slot}:{self.param_names.get(param, '?')}"
            if now in existed or (param, slot) not in state:
                # In place, another slot's tensor from before the step (swapped slots,
                # ``state["prev"] = state["m"]``), or a slot the step added: state.
                kinds.setdefault(now, ("optimizer_state", label))
            else:
                kinds.setdefault(now, ("workspace", label))  # made in the step
                held.add(now)
                carried.add(now)  # the next step's state
        still = set(after.values())
        maker: Dict[int, OpRecord] = {}  # a storage's first writer, found once when needed
        for (param, slot), before in state.items():
            if before in still:
                continue  # some slot keeps it
            kinds.setdefault(before, ("input", f"{slot}:{self.param_names.get(param, '?')} "
                                               f"(before the step)"))
            # Its slot keeps it until the new value is made, past its last read.
            if not maker:
                for op in reversed(rec.ops):
                    maker.update((w, op) for w in op.writes)
            op = maker.get(after.get((param, slot), -1))
            if op is not None and before not in op.reads:
                op.reads.append(before)
        return kinds, held, carried


def _step_needs_closure(opt: Any) -> bool:
    try:
        closure = inspect.signature(opt.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read: the step will say
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


@contextlib.contextmanager
def _recording_on_this_thread() -> Iterator[None]:
    _recording.active = True
    try:
        yield
    finally:
        _recording.active = False


def _module_note(rec: Recorder) -> str:
    module = rec.module()
    last = rec.ops[-1].type if rec.ops else None
    note = f", module '{module}'" if module else ""
    return note + (f", after aten.{last}" if last else "")
