"""Meta tensors for capture (internal to spill.torch): models and inputs moved to the meta
device without copying data, factories that build on it, and shape rules for the few backward
ops that older torch releases ship without a meta kernel.
"""
from __future__ import annotations

import contextlib
import copy
from collections import UserDict
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from ._costs import tensors_in

META = torch.device("meta")

# Factories that take a `device` argument; used where torch has no `with torch.device(...)`.
_FACTORY_NAMES = (
    "empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "randint", "randperm",
    "arange", "range", "linspace", "logspace", "eye", "tensor", "as_tensor", "scalar_tensor",
    "normal", "tril_indices", "triu_indices",
)


class _MetaFactories(torch.overrides.TorchFunctionMode):
    """Torch-function mode that puts tensors from factories without a device on meta."""

    def __init__(self) -> None:
        super().__init__()
        self._factories = {getattr(torch, n) for n in _FACTORY_NAMES if hasattr(torch, n)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._factories and kwargs.get("device") is None:
            kwargs["device"] = META
        return func(*args, **kwargs)


@contextlib.contextmanager
def building_on_meta() -> Iterator[None]:
    """Tensors created inside (parameters, buffers) live on the meta device: no memory."""
    if hasattr(META, "__enter__"):  # torch >= 2.0: the device is a context manager
        with torch.device("meta"):
            yield
    else:
        with _MetaFactories():
            yield


def is_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def empty_meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with t's shape, strides, dtype and requires_grad; allocates nothing."""
    out = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=META)
    return out.requires_grad_(t.requires_grad) if t.is_floating_point() else out


def module_on_meta(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself when its parameters and buffers are all on meta, else a copy whose
    parameters and buffers are meta tensors (tied parameters stay tied; the caller's model and
    its data are left as they are, and no copy of the data is made)."""
    lazy = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if torch.nn.parameter.is_lazy(t)]
    if lazy:  # (they have no shape yet: a copy, a capture, even asking for it raises)
        from ._recorder import CaptureError  # (_recorder imports this module)
        raise CaptureError(
            f"the model has uninitialised parameters or buffers ({', '.join(map(repr, lazy[:4]))}"
            f"{', ...' if len(lazy) > 4 else ''}): a lazy module (nn.LazyLinear and its kin) "
            f"takes its shapes from its first forward. Run one forward with an example input "
            f"first (or initialise them otherwise), then capture the model")
    tensors = list(model.parameters()) + list(model.buffers())
    if all(is_meta(t) for t in tensors):
        return model
    memo = {}
    for t in tensors:
        if id(t) in memo:
            continue
        m = empty_meta_like(t)
        memo[id(t)] = torch.nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(
            t, torch.nn.Parameter) else m
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as e:
        raise TypeError(f"spill.torch.capture: cannot copy the {type(model).__name__} onto the "
                        f"meta device ({type(e).__name__}: {e}); pass a callable that builds "
                        f"the model instead, or build it under `with torch.device('meta')`") from e
    # A TorchScript submodule's copy ignores the memo: its tensors stayed real (and the
    # optimizer factory was then blamed for them: audit 45a F14).
    left = [n for n, t in list(copied.named_parameters()) + list(copied.named_buffers())
            if not is_meta(t)]
    if left:
        scripted = [n or type(copied).__name__ for n, m in copied.named_modules()
                    if isinstance(m, torch.jit.ScriptModule)]
        why = (f"TorchScript module {scripted[0]!r} (torch.jit.script or trace) keeps its own "
               f"tensors in a copy" if scripted else "the copy kept them")
        raise TypeError(f"spill.torch.capture: cannot copy the {type(model).__name__} onto the "
                        f"meta device: {len(left)} of its tensors ({left[0]!r} first) stay "
                        f"where they are, as the {why}; pass a callable that builds the model "
                        f"instead (scripted parts built inside it)")
    return copied


def resolve_model(model: Any) -> torch.nn.Module:
    """A module on meta from a module (any device) or a callable that builds one."""
    if isinstance(model, torch.nn.Module):
        return module_on_meta(model)
    if callable(model):
        with building_on_meta():
            built = model()
        if not isinstance(built, torch.nn.Module):
            raise TypeError(f"spill.torch.capture: the model builder returned "
                            f"{type(built).__name__}, not a torch.nn.Module")
        return module_on_meta(built)
    raise TypeError(f"spill.torch.capture: model must be a torch.nn.Module or a callable that "
                    f"builds one, got {type(model).__name__}")


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any], where: str = "value",
                made: Optional[Dict[int, Any]] = None) -> Any:
    """`value` with every tensor in its lists, tuples and mappings (the nests tensors_in
    walks) replaced by fn(tensor), each container rebuilt as its own type. A tensor object met
    twice maps to one fn(tensor), also across calls given the same `made` (an input that is a
    target too: one tensor of the step, not two; two views of one storage, ``ids[:, :-1]`` and
    ``ids[:, 1:]``, still make two). A mapping that cannot be rebuilt, or an object that
    holds a tensor in an attribute, raises TypeError naming where it is, from `where`, the name
    of `value` (``example_inputs['input']['ids']``)."""
    made = {} if made is None else made
    if isinstance(value, torch.Tensor):
        if id(value) not in made:  # (the caller's value keeps the tensor, and so its id)
            made[id(value)] = fn(value)
        return made[id(value)]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple
        return type(value)(*(map_tensors(v, fn, f"{where}[{i}]", made)
                             for i, v in enumerate(value)))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn, f"{where}[{i}]", made) for i, v in enumerate(value))
    if isinstance(value, Mapping):
        items = {k: map_tensors(v, fn, f"{where}[{k!r}]", made) for k, v in value.items()}
        try:
            if isinstance(value, (dict, UserDict)):  # (a copy keeps a defaultdict's factory,
                out = copy.copy(value)               # a BatchEncoding's attributes)
                for k, v in items.items():
                    out[k] = v  # (through the type's own __setitem__, which update may skip)
                return out
            return type(value)(items)
        except Exception as e:
            raise TypeError(f"spill.torch.capture: {where} is a {type(value).__name__}, a "
                            f"mapping that cannot be rebuilt with meta copies of its tensors "
                            f"({type(e).__name__}: {e}): pass its items in a dict") from e
    for name, v in getattr(value, "__dict__", {}).items():
        if any(True for _ in tensors_in(v)):
            raise TypeError(f"spill.torch.capture: {where}.{name} is a tensor (or holds "
                            f"tensors) inside a {type(value).__name__}, which capture cannot "
                            f"copy onto the meta device: pass tensors in dicts, lists or tuples")
    return value


def with_batch(value: Any, batch_dim: int, batch: int, new_batch: int,
               made: Optional[Dict[int, Any]] = None) -> Any:
    """Meta copies of the tensors in `value`, those of size `batch` along `batch_dim` resized to
    `new_batch` along it (`made`: as map_tensors')."""
    def resize(t: torch.Tensor) -> torch.Tensor:
        if t.dim() > batch_dim and t.shape[batch_dim] == batch and new_batch != batch:
            shape = list(t.shape)
            shape[batch_dim] = new_batch
            out = torch.empty(shape, dtype=t.dtype, device=META)
            return out.requires_grad_(t.requires_grad) if t.is_floating_point() else out
        return empty_meta_like(t)
    return map_tensors(value, resize, made=made)


def _like(t: Optional[torch.Tensor], wanted: bool) -> Optional[torch.Tensor]:
    return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else None


def fallback_meta(func: Any, args: tuple, kwargs: dict) -> Any:
    """Outputs for an op that raised NotImplementedError on meta tensors, or NotImplemented.
    Older torch (1.13) lacks meta kernels for some backward ops; their outputs take the shape
    of an input. Anything else goes to torch's own decompositions when it has one."""
    name = func.overloadpacket.__name__
    if name == "convolution_backward":
        grad_out, x, w = args[0], args[1], args[2]
        bias_sizes = args[3]
        mask = args[10] if len(args) > 10 else kwargs.get("output_mask", (True, True, True))
        bias = grad_out.new_empty(list(bias_sizes) if bias_sizes else [w.shape[0]]) \
            if mask[2] else None
        return _like(x, mask[0]), _like(w, mask[1]), bias
    schema = func._schema
    returns_one_tensor = len(schema.returns) == 1 and str(schema.returns[0].type) == "Tensor"
    if name.startswith("upsample") and name.endswith("_backward") and returns_one_tensor:
        names = [a.name for a in schema.arguments]
        if "input_size" in names:
            i = names.index("input_size")
            size = args[i] if i < len(args) else kwargs["input_size"]
            return args[0].new_empty(list(size))
    if name.endswith("_backward") and returns_one_tensor:
        names = [a.name for a in schema.arguments]
        if "num_weights" in names:  # an embedding's weight gradient (EmbeddingBag's: audit 45a F18)
            i = names.index("num_weights")
            rows = args[i] if i < len(args) else kwargs["num_weights"]
            return args[0].new_empty([int(rows), args[0].shape[-1]])
        for like in ("self", "input"):
            if like in names:
                i = names.index(like)
                src = args[i] if i < len(args) else kwargs.get(like)
                if isinstance(src, torch.Tensor):
                    return torch.empty_like(src, memory_format=torch.contiguous_format)
    try:
        from torch._decomp import decomposition_table
    except ImportError:  # pragma: no cover - every supported torch has it
        return NotImplemented
    decomposition = decomposition_table.get(func)
    if decomposition is not None:
        return decomposition(*args, **kwargs)
    return NotImplemented
