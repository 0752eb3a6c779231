"""One model trained with spill in a process of its own (spill's configuration and PyTorch's
allocator are process-wide): the same run without spill first (in this process before
enable() on the CPU bridge; in a child process on CUDA, whose allocator cannot be changed
once used), then with spill at a third of the training footprint in each mode asked for.
Prints one line "RESULT <json>" with, per mode, whether losses and final parameters are equal
(torch.equal) to the run without spill, and spill's statistics before every step.

Usage: torch_bridge_run.py MODEL MODES POLICY [STEPS] [TARGET]
  MODES: comma-separated of offload, guard; POLICY: plan or lru; TARGET: cpu (default), cuda
With SPILL_TEST_BACKWARD_THREAD=1 on the CPU bridge, each backward runs on a thread of its own,
as PyTorch's CUDA backward runs on autograd's device thread (backward_on_another_thread).
  Extra configuration (e.g. ",time_scale:1,link_gbps:2") comes from SPILL_TEST_CONF; the budget
  is the footprint over SPILL_TEST_BUDGET_DIVISOR (default 3).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from typing import Any, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_train_models import FOOTPRINT_OF, train  # noqa: E402

STAT_KEYS = ("swap.bytes_out", "swap.bytes_in", "swap.demand_fetches", "swap.prefetch_hits",
             "swap.prefetches", "swap.stall_s", "swap.host_wait_s", "swap.steps_recorded",
             "swap.steps_planned", "swap.deviations", "swap.steps_resynced",
             "swap.evictions_reactive",
             "swap.evictions_planned", "num_ooms")


def baseline(name: str, steps: int, device: str) -> Tuple[List[float], List[torch.Tensor]]:
    if device == "cpu":
        losses, model, _ = train(name, steps, device=device)
        return losses, [p.detach().clone() for p in model.parameters()]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "baseline.pt")
        subprocess.run([sys.executable, __file__, "--baseline", name, str(steps), path],
                       check=True)
        saved = torch.load(path)
    return saved["losses"], saved["params"]


def backward_on_another_thread() -> None:
    """Runs the autograd engine of every later backward on a new thread while the calling
    thread waits, as CUDA's device thread does: the hooks, saved-tensor unpacks and ops of the
    backward run there; the caller's dispatch and function modes, grad mode and saved-tensor
    default hooks go with it (the engine carries the caller's thread-local state, which has
    held the saved-tensor hooks since torch 1.10, to the device thread: what a backward with
    create_graph saves there is packed by the caller's hooks). Torch 1.13 cannot read the
    hooks' stack: from the call on, this process's pushes and pops of it are mirrored per
    thread."""
    from torch import overrides
    from torch.autograd.variable import Variable
    from torch.utils import _python_dispatch as dispatch
    stacks = [(torch._C._len_torch_dispatch_stack, dispatch._push_mode, dispatch._pop_mode),
              (torch._C._len_torch_function_stack, overrides._push_mode, overrides._pop_mode)]
    engine = Variable._execution_engine
    if type(engine).__name__ == "DeviceThreadEngine":
        return  # (tests/python/rehearse/sitecustomize.py did it for this process already)
    hooks = _mirror_saved_tensor_hooks()

    def modes_of(length: Any, push: Any, pop: Any) -> List[Any]:
        above = [pop() for _ in range(length())]  # top first
        for m in reversed(above):
            push(m)
        return above[::-1]

    class DeviceThreadEngine:
        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

        def run_backward(self, *args: Any, **kwargs: Any) -> Any:
            active = getattr(torch._C, "_are_functorch_transforms_active", None)
            if active is not None and active():
                # functorch's transform levels are thread-local state CUDA's engine carries
                # and Python cannot: inside grad or vmap the backward stays on this thread.
                return engine.run_backward(*args, **kwargs)
            modes = [modes_of(*s) for s in stacks]
            grad = torch.is_grad_enabled()
            saved_hooks = list(hooks.stack())
            box: Dict[str, Any] = {}

            def run() -> None:
                for (_, push, _), ms in zip(stacks, modes):
                    for m in ms:
                        push(m)
                for pack, unpack in saved_hooks:
                    torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)
                try:
                    with torch.set_grad_enabled(grad):
                        box["result"] = engine.run_backward(*args, **kwargs)
                except BaseException as e:  # noqa: B036 (raised again on the caller's thread)
                    box["error"] = e
                finally:
                    for length, _, pop in stacks:
                        while length() > 0:
                            pop()
                    while hooks.stack():
                        torch._C._autograd._pop_saved_tensors_default_hooks()
            thread = threading.Thread(target=run)
            thread.start()
            thread.join()
            if "error" in box:
                raise box["error"]
            return box["result"]

    Variable._execution_engine = DeviceThreadEngine()


class _SavedTensorHooks(threading.local):
    """This thread's saved-tensor default hooks, as pushed since the mirror was installed."""

    def __init__(self) -> None:
        self.hooks: List[Tuple[Any, Any]] = []

    def stack(self) -> List[Tuple[Any, Any]]:
        return self.hooks


def _mirror_saved_tensor_hooks() -> _SavedTensorHooks:
    """Wraps torch's push and pop of the saved-tensor default hooks (what
    torch.autograd.graph.saved_tensors_hooks and spill.torch call, looked up at each call) so
    that each thread's stack can be read."""
    autograd = torch._C._autograd
    mirror = _SavedTensorHooks()
    push = autograd._push_saved_tensors_default_hooks
    pop = autograd._pop_saved_tensors_default_hooks

    def pushed(pack: Any, unpack: Any) -> None:
        push(pack, unpack)
        mirror.hooks.append((pack, unpack))

    def popped() -> None:
        pop()
        if mirror.hooks:
            mirror.hooks.pop()

    autograd._push_saved_tensors_default_hooks = pushed
    autograd._pop_saved_tensors_default_hooks = popped
    return mirror


def main(argv: List[str]) -> int:
    torch.set_num_threads(1)
    if argv[1] == "--baseline":  # the CUDA run without spill, for the parent process
        losses, model, _ = train(argv[2], int(argv[3]), device="cuda")
        torch.save({"losses": losses, "params": [p.detach().cpu() for p in model.parameters()]},
                   argv[4])
        return 0
    name, modes, policy = argv[1], argv[2].split(","), argv[3]
    steps = int(argv[4]) if len(argv) > 4 else 6
    target = argv[5] if len(argv) > 5 else "cpu"
    device = "cpu" if target == "cpu" else "cuda"
    base_losses, base_params = baseline(name, steps, device)
    base_params = [p.cpu() for p in base_params]
    if device == "cpu" and os.environ.get("SPILL_TEST_BACKWARD_THREAD") == "1":
        backward_on_another_thread()

    import spill
    import spill.torch as st
    granularity = os.environ.get("SPILL_TEST_SIM_GRANULARITY", "64KiB")  # see test_torch_bridge
    st.enable(f"policy:{policy},swap_threshold:128KiB,sim_granularity:{granularity}"
              + os.environ.get("SPILL_TEST_CONF", ""),
              target=target)
    # The training footprint: the peak of an unlimited run with spill (of its largest batches,
    # for a model whose batch sizes vary).
    train(FOOTPRINT_OF.get(name, name), 2, device=device)
    footprint = st.max_memory_allocated()
    divisor = int(os.environ.get("SPILL_TEST_BUDGET_DIVISOR", "3"))  # the budget's share
    out: Dict[str, Any] = {"model": name, "policy": policy, "target": target,
                           "footprint": footprint, "budget": footprint // divisor, "runs": {}}
    for mode in modes:
        spill.set_budget(footprint // divisor)
        per_step: List[Dict[str, float]] = []

        def before(i: int) -> None:
            s = spill.stats()
            per_step.append({k: s.get(k, 0) for k in STAT_KEYS})

        def wrap(m: Any, o: Any) -> Any:
            if mode == "offload":
                return st.offload(m, o)
            g = st.guard(optimizer=o)
            g.__enter__()
            return g

        losses, model, handle = train(name, steps, before, device=device, wrap=wrap)
        before(steps)
        # Tensors may be on the host between steps: read them pinned (inside the guard).
        reader = st.guard(release_on_exit=False) if mode == "offload" else handle
        with reader if mode == "offload" else contextlib.nullcontext():
            params_equal = all(torch.equal(p.detach().cpu(), q)
                               for p, q in zip(model.parameters(), base_params))
        spill.set_budget(4 * footprint)  # room for all again: both undo their declarations
        quiet_steps = 0
        if mode == "offload":
            quiet_steps = handle.quiet_steps  # none at a third: every peak passes half
            handle.remove()
        else:
            handle.__exit__(None, None, None)
        out["runs"][mode] = {"losses_equal": losses == base_losses, "losses": losses,
                             "base_losses": base_losses, "params_equal": params_equal,
                             "per_step": per_step, "quiet_steps": quiet_steps}
        del model, handle, reader  # the guard mode's reader is its handle (with the optimizer)
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
