"""Block names for spill.torch: :func:`name_tensor` (public) and the names offload() gives
the blocks it tracks, so that out-of-memory messages and ``memory_snapshot()`` say which
tensor a block is (spill_set_block_name).

A name belongs to a block, i.e. to a tensor's storage: naming a view names its whole storage
(every tensor on it shows the same name). offload() names each tensor once (BlockNames keeps a
weak reference per tensor it named, and the storage's address then): the parameters and
buffers by their qualified names (``layers.3.fc1.weight (param)``, ``bn.running_mean
(buffer)``) at offload() and when the model changes, their gradients (``grad of ...``) as they
are made and before each optimizer step (a gradient made anew is a new tensor, named again),
and the optimizer's state (``exp_avg of ...``, by its key in ``optimizer.state``) when the
optimizer makes it. Activations are not named: the pack hook runs for every saved tensor and
stays free of the extra call. spill drops a block's name when it is freed, so a name never
outlives its tensor's memory."""
from __future__ import annotations

import weakref
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

import spill
from spill import _args
from spill._lib import library

from ._pins import components, storage

_Tensor = torch.Tensor
_STRIDED = torch.strided
_MAX_NAME = 255  # SPILL_MAX_BLOCK_NAME: longer names are cut there by spill


def _blocks(t: Any) -> Tuple[int, ...]:
    """The addresses of the storages that hold ``t``'s data (a sparse tensor's indices and
    values); 0s left out (an empty tensor has no block)."""
    if not isinstance(t, _Tensor) or t.is_meta:
        return ()
    if t.layout == _STRIDED:
        ptr = storage(t).data_ptr()
        return (ptr,) if ptr else ()
    return tuple(p for p in (storage(c).data_ptr() for c in components(t)) if p)


def name_tensor(tensor: torch.Tensor, name: Optional[str]) -> None:
    """Names the block of spill's that holds ``tensor`` (its storage: a view names the whole
    storage it lies in) for ``memory_snapshot()``, out-of-memory messages and spill's trace;
    None or ``""`` clears the name. A sparse tensor's indices and values get the name. The
    name goes with the memory: once the storage is freed, no later tensor there shows it.
    Names longer than 255 bytes (UTF-8) are cut there.

    Raises :class:`spill.InvalidArgumentError` naming the address when the storage is not a
    block of spill's (a tensor made before ``spill.torch.enable()``, by another allocator, on
    another device, or by ``torch.from_blob`` inside a block), ``TypeError`` when ``tensor``
    is not a tensor, and :class:`spill.InvalidArgumentError` naming ``name`` when it is not a
    string or None (also a ``TypeError``), or holds a NUL or a lone surrogate."""
    if not isinstance(tensor, _Tensor):
        raise TypeError(f"spill.torch.name_tensor: expected a tensor, got {type(tensor).__name__}")
    if name is not None:
        # Checked before the blocks, so that the errors of the loop below are the address's:
        # a bad name was reported as a storage that is not spill's.
        _args.text(name, "name")
    blocks = _blocks(tensor)
    if not blocks:
        raise spill.InvalidArgumentError(
            "spill.torch.name_tensor: the tensor has no memory to name (empty, or on the meta "
            "device)", spill.Status.INVALID_ARGUMENT)
    for ptr in blocks:
        try:
            spill.set_block_name(ptr, name)
        except spill.InvalidArgumentError as e:
            raise spill.InvalidArgumentError(
                f"spill.torch.name_tensor: the tensor's storage at {ptr:#x} is not a block of "
                f"spill's ({e})", e.code) from None


class BlockNames:
    """The names offload() gives (see the module docstring): each tensor named once, by a weak
    reference to it and its storage's address (``.data = ...`` gives a tensor another
    storage: named again). Naming never fails a training step: memory spill does not hold is
    left unnamed."""

    def __init__(self) -> None:
        self._set = library().spill_set_block_name
        # id(tensor) -> (weak reference, storage address, name) of what was named; an entry
        # goes when its tensor does.
        self._named: Dict[int, Tuple[Any, int, str]] = {}
        # id(parameter) -> (weak reference, qualified name), for gradients and state.
        self._params: Dict[int, Tuple[Any, str]] = {}
        self._modules: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = \
            weakref.WeakKeyDictionary()

    def name(self, t: Any, name: str, same_storage: bool = False) -> None:
        """Names ``t``'s block unless it was named so already; with ``same_storage``, a tensor
        named so already counts as named without looking at its storage again (reading it goes
        through every active function mode: a gradient looked at before each optimizer step
        is one that ``.data = ...`` hardly ever replaces)."""
        key = id(t)
        seen = self._named.get(key)
        if same_storage and seen is not None and seen[0]() is t and seen[2] == name:
            return
        blocks = _blocks(t)
        if not blocks:
            return
        if seen is not None and seen[0]() is t and seen[1] == blocks[0] and seen[2] == name:
            return
        text = name.encode()[:_MAX_NAME + 4]  # (spill cuts it between characters)
        for ptr in blocks:
            self._set(ptr, text)  # a failure: memory not spill's, left unnamed
        named = self._named

        def gone(ref: Any, key: int = key) -> None:
            if named.get(key, (None,))[0] is ref:
                del named[key]

        self._named[key] = (weakref.ref(t, gone), blocks[0], name)

    def param(self, p: Any) -> Optional[str]:
        """The qualified name of parameter ``p`` of the model, if it has one."""
        entry = self._params.get(id(p))
        return entry[1] if entry is not None and entry[0]() is p else None

    def model(self, model: torch.nn.Module,
              only: Optional[Iterable[torch.nn.Module]] = None) -> None:
        """Names the parameters and buffers (and gradients) of ``model``'s modules, or of
        ``only`` those (modules that changed): by qualified name, the first one a tied
        parameter has."""
        modules = self._modules
        if only is None or any(m not in modules for m in only):
            modules.clear()
            for prefix, m in model.named_modules():
                modules[m] = prefix
            # (parameters replaced since: their entries go)
            self._params = {k: v for k, v in self._params.items() if v[0]() is not None}
        for m in (modules.keys() if only is None else only):
            prefix = modules.get(m)
            if prefix is None:
                continue
            dot = prefix + "." if prefix else ""
            for attr, p in m._parameters.items():
                if p is None:
                    continue
                qualified = self.param(p)
                if qualified is None:
                    qualified = dot + attr
                    self._params[id(p)] = (weakref.ref(p), qualified)
                self.name(p, qualified + " (param)")
                if p.grad is not None:
                    self.name(p.grad, "grad of " + qualified)
            for attr, b in m._buffers.items():
                if b is not None:
                    self.name(b, dot + attr + " (buffer)")

    def gradients(self) -> None:
        """Names the gradients of the model's parameters that are new since the last call."""
        for ref, qualified in list(self._params.values()):
            p = ref()
            grad = p.grad if p is not None else None
            if grad is not None:
                self.name(grad, "grad of " + qualified, same_storage=True)

    def gradient(self, p: Any) -> None:
        """Names ``p``'s gradient (made just now)."""
        qualified = self.param(p)
        if qualified is not None and p.grad is not None:
            self.name(p.grad, "grad of " + qualified)
