"""Installing spill as PyTorch's allocator: enable() (the whole process, before CUDA starts),
pool() (a torch.cuda.MemPool for a region of code, torch 2.5+), disable(), and the patch that
makes torch.cuda's memory functions answer with spill's figures."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional

import torch

import spill
import spill._runtime
from spill import Error, InvalidArgumentError, Status, _args
from spill._errors import InvalidArgumentTypeError
from spill._capi import raise_status
from spill._lib import library

from . import _stats
from ._check import check_from_environment, environment_mode
from ._pins import storage
from ._shim import address, shim
from ._state import state, torch_version

_log = logging.getLogger("spill.torch")

# PyTorch's optional allocator hooks and the C API symbols that serve them.
# (PyTorch's emptyCache calls the reset function: torch.cuda.empty_cache() reaches
# spill_empty_cache through it.)
_CUDA_HOOKS = (("set_init_fn", "spill_torch_init"), ("set_reset_fn", "spill_torch_reset"),
               ("set_memory_fraction_fn", "spill_torch_set_memory_fraction"),
               ("set_record_stream_fn", "spill_torch_record_stream"))


class AllocatorInUseError(Error, RuntimeError):
    """An allocator is in use and cannot be swapped: PyTorch's CUDA allocator has already
    served memory, so it cannot be replaced by spill's (use spill.torch.pool() for a region of
    code instead); or spill serves PyTorch's tensors, so spill.shutdown() would free their
    memory under them."""


def _check_conf(conf: Any, caller: str) -> None:
    # Checked here, not only by spill.configure: the CPU bridge splits the string first (an
    # int raised AttributeError: 'int' object has no attribute 'split').
    if conf is not None and not isinstance(conf, str):
        raise InvalidArgumentTypeError(
            f"{caller}: conf must be spill's configuration string (e.g. 'budget:8GiB') or None "
            f"(SPILL_CONF), got {conf!r}")


def _configure(text: Optional[str], caller: str) -> None:
    """spill.configure(text), saying on ALREADY_INITIALIZED what started spill and how to
    recover: any spill call that uses a device (spill.stats(), spill.budget(), ...) starts its
    runtime with SPILL_CONF or the defaults, and the C message alone did not say so."""
    try:
        spill.configure(text)
    except Error as e:
        if e.code != Status.ALREADY_INITIALIZED:
            raise
        if state.started:
            why = (f"{caller}: spill already runs with the configuration an earlier "
                   "spill.torch.enable() or pool() of this process gave it. Pass the same "
                   "configuration (or none), or call spill.torch.disable(), drop the tensors "
                   "spill allocated, then spill.shutdown() first")
        else:
            why = (f"{caller}: spill already runs, with other settings: an earlier spill call "
                   "of this process started it with them (spill.configure(), or any call "
                   "that uses a device, such as spill.stats(), spill.budget(), spill.malloc() "
                   "or spill.step(), which starts it with SPILL_CONF or the defaults). Call "
                   "spill.torch.enable() before any other spill call, or spill.shutdown() "
                   "first (it frees everything spill holds)")
        raise Error(f"{why}. {e}", e.code) from None


def _refuse_shutdown() -> None:
    """spill.shutdown() frees every block spill holds, those under PyTorch's tensors too: a
    later read of such a tensor crashed the process, and new CPU tensors raised while
    is_enabled() still said "cpu". Refused while any can exist."""
    if not state.started or state.forked_child:
        return  # a forked child: spill_shutdown refuses it itself (FORKED_CHILD)
    if state.target == "cpu":
        raise AllocatorInUseError(
            "spill.shutdown: spill is PyTorch's CPU allocator (spill.torch.enable(target="
            "'cpu')): every CPU tensor made since lives in spill's memory, which shutting down "
            "would free under it. Call spill.torch.disable() first, then drop the tensors "
            "spill allocated (del, gc.collect())")
    if state.target == "cuda":
        raise AllocatorInUseError(
            "spill.shutdown: spill is PyTorch's CUDA allocator, which PyTorch cannot change "
            "back (spill.torch.disable() leaves it in place): shutting down would free the "
            "memory of CUDA tensors. spill runs until the process ends")
    try:
        held = spill.stats(state.device)["allocated_bytes.current"]
    except Error:
        return  # shut down already, say: spill_shutdown answers for itself
    if held:
        raise AllocatorInUseError(
            f"spill.shutdown: {held} bytes spill allocated are still held on device "
            f"{state.device}, and spill served PyTorch's tensors (spill.torch.enable() before "
            "disable(), or pool()): those live in spill's memory, which shutting down would "
            "free under them. Drop them first (del, gc.collect()), or leave spill running")


def _after_shutdown() -> None:
    state.started = False


spill._runtime._shutdown_checks.append(_refuse_shutdown)
spill._runtime._after_shutdown.append(_after_shutdown)


def _cpu_conf(conf: Optional[str]) -> str:
    """The configuration for the CPU bridge: `conf` (else SPILL_CONF) on the simulated device."""
    text = conf if conf is not None else os.environ.get("SPILL_CONF", "")
    items = [item for item in text.split(",") if item.strip()]
    if not any(item.split(":", 1)[0].strip() == "device" for item in items):
        items.append("device:sim")
    return ",".join(items)


def enable(conf: Optional[str] = None, target: str = "cuda", *, device: int = 0,
           patch_torch: bool = True) -> None:
    """Makes spill PyTorch's allocator, in one line, before the first tensor of ``target``.

    conf: spill's configuration string, e.g. ``"budget:20GiB,host_cap:64GiB"`` (None: the
      ``SPILL_CONF`` environment variable, else the defaults).
    target: ``"cuda"`` installs spill as the CUDA allocator (``CUDAPluggableAllocator`` +
      ``change_current_allocator``, with PyTorch's init, empty_cache, memory-fraction and
      record_stream hooks where the running torch has them); it must run before CUDA has
      allocated, else :class:`AllocatorInUseError` points to :func:`pool`. ``"cpu"`` is the CPU
      bridge: spill on its simulated device becomes PyTorch's CPU allocator, so every CPU
      tensor created afterwards lives in simulated device memory that is readable while
      resident and faults while swapped out (tensors created before keep their allocator).
    device: spill's device ordinal (the CUDA device, or the simulated one).
    patch_torch: also make ``torch.cuda.memory_stats``, ``memory_stats_as_nested_dict``,
      ``memory_allocated``, ``max_memory_allocated``, ``memory_reserved``,
      ``max_memory_reserved``, ``memory_snapshot``, ``memory._snapshot``, ``memory_summary``
      and the peak resets answer with spill's figures, and
      ``memory._record_memory_history`` take its arguments and do nothing (spill records its
      history itself) (undone by :func:`disable`).

    Calling it again with the same target is harmless (a different ``conf`` raises, as
    :func:`spill.configure` does). Out of memory then raises ``torch.cuda.OutOfMemoryError``
    with spill's message (where every byte is).
    """
    if state.forked_child:
        raise Error("spill.torch.enable: this is a child forked after spill started in its "
                    "parent; it cannot use the parent's runtime", Status.FORKED_CHILD)
    if target not in ("cuda", "cpu"):
        raise InvalidArgumentError(f"spill.torch.enable: target must be 'cuda' or 'cpu', "
                                   f"got {target!r}")
    _check_conf(conf, "spill.torch.enable")
    _args.device(device)
    _args.flag(patch_torch, "patch_torch")
    check = environment_mode()
    if state.target is not None:
        if state.target != target:
            raise Error(f"spill.torch.enable: spill is already PyTorch's {state.target} "
                        f"allocator; call spill.torch.disable() first")
        if conf is not None:
            _configure(conf if target == "cuda" else _cpu_conf(conf),  # the same: fine
                       "spill.torch.enable")
        if patch_torch:
            _patch_torch()  # again after disable(); a no-op when patched
        return
    if target == "cpu":
        _enable_cpu(conf, device)
    else:
        _enable_cuda(conf, device)
    if patch_torch:
        _patch_torch()
    check_from_environment(check)


def _enable_cpu(conf: Optional[str], device: int) -> None:
    text = _cpu_conf(conf)
    _configure(text, "spill.torch.enable")
    if not spill.is_simulated(device):
        raise InvalidArgumentError(
            f"spill.torch.enable(target='cpu'): device {device} is a GPU under {text!r}; the "
            "CPU bridge needs the simulated device (device:sim), whose memory CPU code reads")
    lib = shim("cpu")
    status = lib.spill_torch_cpu_install(device)
    if status != 0:
        raise_status(library(), status)
    state.target, state.device, state.started = "cpu", device, True
    _patch_storage_clone()


def _patch_storage_clone() -> None:
    """On the CPU bridge, a CPU storage's ``clone()`` (and with it ``copy.deepcopy`` of a
    tensor, which copies its storage: torch 1.13's ``optimizer.load_state_dict`` deep-copies
    the state it loads) allocates through the installed CPU allocator, spill's. torch 1.13's
    storage constructor takes PyTorch's default CPU allocator instead, so those copies landed
    outside spill's memory, where no budget counts them; on a GPU the same copies are in
    spill's memory. disable() puts the original back."""
    base = torch.storage._StorageBase
    key = (base, "clone")
    if key in state.patched or not hasattr(base, "clone"):
        return
    original = base.clone

    def clone(self: Any) -> Any:
        if type(self) is not torch.UntypedStorage or self.device.type != "cpu" \
                or state.target != "cpu":
            return original(self)
        view = torch.empty(0, dtype=torch.uint8).set_(self)  # the bytes, as one op's input
        return storage(view.clone())

    clone.__doc__ = original.__doc__
    state.patched[key] = original
    base.clone = clone  # type: ignore[method-assign]


def _cuda_allocator(lib_shim: Any, for_pool: bool = False) -> Any:
    """A native CUDAPluggableAllocator over spill, with the hooks the running torch accepts.
    As the current allocator its malloc raises out of memory (PyTorch uses what it returns
    unchecked); behind a MemPool (``for_pool``) it returns NULL, which PyTorch's caching
    allocator takes as out of memory: it frees the pool's cached segments, retries, and raises
    torch.cuda.OutOfMemoryError itself (spill.last_oom_message() has spill's account)."""
    malloc = "spill_torch_shim_pool_malloc" if for_pool else "spill_torch_shim_malloc"
    native = torch._C._cuda_customAllocator(address(lib_shim, malloc),
                                           address(lib_shim, "spill_torch_shim_free"))
    lib = library()
    wired = []
    for setter, symbol in _CUDA_HOOKS:
        fn = getattr(native, setter, None)
        if callable(fn):
            fn(address(lib, symbol))
            wired.append(setter)
    if "set_record_stream_fn" not in wired:
        _patch_record_stream()
    _log.info("spill.torch: allocator hooks wired: %s", ", ".join(wired) or "none")
    return native


def _check_cuda() -> None:
    if not torch.cuda.is_available():
        raise Error("spill.torch.enable: this torch has no usable CUDA device; for a CPU-only "
                    "torch use spill.torch.enable(conf, target='cpu') (the CPU bridge)")
    if not hasattr(torch._C, "_cuda_customAllocator"):
        raise Error(f"spill.torch: torch {torch.__version__} has no pluggable CUDA allocator "
                    "(CUDAPluggableAllocator needs torch >= 2.0)")


def _enable_cuda(conf: Optional[str], device: int) -> None:
    _check_cuda()
    if torch.cuda.is_initialized():
        raise AllocatorInUseError(
            "spill.torch.enable: CUDA is already initialised in this process, and PyTorch "
            "cannot swap an allocator that has served memory. Call spill.torch.enable() before "
            "the first CUDA tensor (e.g. first thing in the script), or use spill for a region "
            "of code: with torch.cuda.use_mem_pool(spill.torch.pool()): ...")
    _configure(conf, "spill.torch.enable")
    spill.is_simulated(device)  # creates the runtime now: configuration errors surface here
    native = _cuda_allocator(shim("cuda"))
    allocator = torch.cuda.memory._CUDAAllocator(native)
    try:
        torch.cuda.memory.change_current_allocator(allocator)
    except RuntimeError as e:
        raise AllocatorInUseError(
            f"spill.torch.enable: PyTorch refused to change its allocator ({e}); use "
            "spill.torch.pool() with torch.cuda.use_mem_pool for a region of code") from e
    state.target, state.device, state.allocator = "cuda", device, allocator
    state.started = True


def pool(conf: Optional[str] = None, *, device: int = 0) -> Any:
    """A ``torch.cuda.MemPool`` whose memory comes from spill, for a region of code once CUDA
    is running: ``with torch.cuda.use_mem_pool(spill.torch.pool()): ...``. Needs torch >= 2.5
    (MemPool with a custom allocator); raises :class:`spill.Error` saying so on older torch.

    PyTorch's caching allocator manages the pool: it takes segments from spill and caches them
    (spill sees those segments, not the tensors in them). Out of memory is PyTorch's
    ``torch.cuda.OutOfMemoryError``, raised after it has given the pool's cached segments back
    to spill and tried again; ``spill.last_oom_message()`` has spill's account. Only the
    calling thread's allocations go to the pool (PyTorch's rule; on CUDA the backward runs in
    autograd's device threads, outside the pool)."""
    if not hasattr(torch.cuda, "MemPool") or torch_version() < (2, 5):
        raise Error(f"spill.torch.pool: torch {torch.__version__} has no MemPool with a custom "
                    "allocator (torch >= 2.5); call spill.torch.enable() before CUDA starts "
                    "instead")
    _check_cuda()
    if state.forked_child:
        raise Error("spill.torch.pool: this is a child forked after spill started",
                    Status.FORKED_CHILD)
    _check_conf(conf, "spill.torch.pool")
    _args.device(device)
    _configure(conf, "spill.torch.pool")
    spill.is_simulated(device)
    native = _cuda_allocator(shim("cuda"), for_pool=True)
    if state.target is None:
        state.device = device
    state.started = True
    return torch.cuda.MemPool(native)


def disable() -> None:
    """Undoes :func:`enable` as far as PyTorch allows: the torch.cuda patches are removed and
    the CPU bridge puts PyTorch's default CPU allocator back (tensors spill allocated keep
    freeing into spill). PyTorch cannot swap its CUDA allocator back: after ``target="cuda"``
    spill stays the allocator. spill.shutdown() is refused until spill is no longer the
    allocator and the tensors it allocated are gone (it would free their memory under them)."""
    _unpatch_torch()
    if state.target == "cpu" and not state.forked_child:
        shim("cpu").spill_torch_cpu_uninstall()
        state.target = None
    elif state.target == "cuda":
        _log.warning("spill.torch.disable: PyTorch cannot change its CUDA allocator back; "
                     "spill stays the allocator")


def is_enabled() -> Optional[str]:
    """The target spill is installed for ("cuda" or "cpu"), or None."""
    return state.target


# ------------------------------------------------------------------ torch.cuda patches

def _patched_functions() -> Dict[str, Callable[..., Any]]:
    return {
        "memory_stats": _stats.memory_stats,
        "memory_stats_as_nested_dict": _stats.memory_stats_as_nested_dict,
        "memory_allocated": _stats.memory_allocated,
        "max_memory_allocated": _stats.max_memory_allocated,
        "memory_reserved": _stats.memory_reserved,
        "max_memory_reserved": _stats.max_memory_reserved,
        "memory_cached": _stats.memory_reserved,
        "max_memory_cached": _stats.max_memory_reserved,
        "reset_peak_memory_stats": _stats.reset_peak_memory_stats,
        "reset_accumulated_memory_stats": _stats.reset_accumulated_memory_stats,
        "reset_max_memory_allocated": _stats.reset_peak_memory_stats,
        "reset_max_memory_cached": _stats.reset_peak_memory_stats,
        "memory_summary": _stats.memory_summary,
        "memory_snapshot": _stats.segments_snapshot,
        "_snapshot": _stats.torch_snapshot,
        "_record_memory_history": _stats.record_memory_history,
    }


def _patch_torch() -> None:
    modules = [torch.cuda, torch.cuda.memory]
    if state.target == "cuda":
        # torch 2.9+'s device-generic memory functions (memory_stats, memory_allocated,
        # reset_peak_memory_stats, ...) ask the current allocator, which for a pluggable one
        # raises "CUDAPluggableAllocator does not yet support getDeviceStats" (audit 43t F1)
        accelerator = getattr(torch, "accelerator", None)
        modules += [m for m in (accelerator, getattr(accelerator, "memory", None))
                    if m is not None]
    for name, fn in _patched_functions().items():
        for module in modules:
            if hasattr(module, name) and (module, name) not in state.patched:
                state.patched[(module, name)] = getattr(module, name)
                setattr(module, name, fn)


def _patch_record_stream() -> None:
    """Where the torch has no record_stream hook for pluggable allocators, Tensor.record_stream
    also tells spill (uses recorded from C++ alone then stay unknown to spill)."""
    key = (torch.Tensor, "record_stream")
    if key in state.patched:
        return
    original = torch.Tensor.record_stream

    def record_stream(self: torch.Tensor, stream: Any) -> None:
        original(self, stream)
        if self.is_cuda and self.data_ptr():
            spill.record_stream(self.data_ptr(), stream)

    state.patched[key] = original
    torch.Tensor.record_stream = record_stream  # type: ignore[method-assign]


def _unpatch_torch() -> None:
    for (module, name), original in list(state.patched.items()):
        if module is torch.Tensor and state.target == "cuda":
            continue  # spill stays the CUDA allocator: it must keep hearing of record_stream
        setattr(module, name, original)
        del state.patched[(module, name)]
