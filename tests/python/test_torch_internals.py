"""Canaries for the torch internals spill.torch relies on (issue 13). spill.torch was written
against torch 1.13's internals (Debian's, the CPU bridge) and read against torch 2's source;
each test here asserts that one internal exists and behaves as spill assumes, branching on
the running torch's version where spill does, so that a torch that changed one fails here,
in seconds, with a message naming it, before the slow tests fail somewhere less clear
(bench/gpu/run_all.sh runs this file first in its torch step). Nothing here allocates
through spill: no enable(), no budget.
"""
from __future__ import annotations

import collections
import inspect
import threading
import warnings
from typing import Any, List

import pytest

torch = pytest.importorskip("torch", reason="spill.torch needs PyTorch (Debian: python3-torch)")

from spill.torch import (_offload, _optimizer, _recompute, _steps, _transforms,  # noqa: E402
                         _window)
from spill.torch._pins import storage  # noqa: E402
from spill.torch._state import torch_version  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

TORCH2 = torch_version() >= (2, 0)


def _internal(name: str, what: str) -> str:
    return f"torch {torch.__version__}: {name} {what} (spill.torch relies on it; see the test)"


# ---------------------------------------------------------------- version and storage

def test_the_version_parses_and_storage_is_reached() -> None:
    """torch_version() reads torch.__version__; spill reads a tensor's bytes through its
    untyped storage (``untyped_storage`` on torch 2, ``_storage`` on 1.13)."""
    major, minor, _ = torch_version()
    assert (major, minor) >= (1, 13), _internal("__version__", f"parsed as {major}.{minor}")
    t = torch.ones(64)
    s = storage(t)
    assert s.data_ptr() == t.data_ptr() and s.nbytes() == 256, \
        _internal("Tensor.untyped_storage/_storage", "gives another data_ptr or nbytes")
    if TORCH2:
        assert hasattr(torch.Tensor, "untyped_storage"), _internal("Tensor.untyped_storage",
                                                                    "is missing")


# ---------------------------------------------------------------- saved-tensor hooks

def test_saved_tensor_default_hooks_push_and_pop() -> None:
    """offload's and the window's saved-tensor hooks go on and off the stack through
    torch._C._autograd._push/_pop_saved_tensors_default_hooks (what saved_tensors_hooks'
    __enter__/__exit__ call), not the context manager: they outlive a Python block."""
    push = getattr(torch._C._autograd, "_push_saved_tensors_default_hooks", None)
    pop = getattr(torch._C._autograd, "_pop_saved_tensors_default_hooks", None)
    assert callable(push) and callable(pop), _internal(
        "torch._C._autograd._push/_pop_saved_tensors_default_hooks", "are missing")
    packed: List[Any] = []
    unpacked: List[Any] = []

    def pack(t: Any) -> Any:
        packed.append(t)
        return ("mine", t)

    def unpack(saved: Any) -> Any:
        unpacked.append(saved)
        return saved[1]
    x = torch.randn(4, requires_grad=True)
    push(pack, unpack)
    try:
        y = (x * x).sum()
    finally:
        pop()
    y.backward()
    assert packed and unpacked and all(u[0] == "mine" for u in unpacked), _internal(
        "the default saved-tensor hooks", "were not called as pack on save, unpack in backward")
    assert torch.equal(x.grad, 2 * x.detach())
    z = (x * x).sum()  # popped: no more calls
    n = len(packed)
    z.backward()
    assert len(packed) == n, _internal("_pop_saved_tensors_default_hooks", "left the hooks on")


def test_transforms_reach_spill_through_disable_saved_tensors_hooks_or_flat_vmap() -> None:
    """A transform is told to spill (_transforms.in_transform) by one of two things: grad
    calls torch.autograd.graph.disable_saved_tensors_hooks, looked up on the module at each
    call (spill replaces it); every vmap runs its module's ``_flat_vmap``, looked up at each
    call (spill wraps it: torch 2's vmap no longer calls disable_saved_tensors_hooks)."""
    graph = torch.autograd.graph
    assert hasattr(graph, "disable_saved_tensors_hooks"), _internal(
        "torch.autograd.graph.disable_saved_tensors_hooks", "is missing")
    try:
        from torch.func import grad, vmap
    except ImportError:
        from functorch import grad, vmap
    original = graph.disable_saved_tensors_hooks
    module = _transforms._vmap_module()
    assert module is not None, _internal("torch._functorch.vmap._flat_vmap", "is missing")
    flat_vmap = module._flat_vmap
    _transforms.install()
    inside: List[bool] = []

    def f(x: Any) -> Any:
        inside.append(_transforms.in_transform())
        return (x * x).sum()
    try:
        g = grad(f)(torch.ones(3))
        assert inside == [True], _internal("grad", "no longer calls torch.autograd.graph."
                                           "disable_saved_tensors_hooks (looked up at call time)")
        assert torch.equal(g, torch.full((3,), 2.0))
        del inside[:]
        vmap(f)(torch.ones(2, 3))
        assert inside and all(inside), _internal(
            "vmap", "no longer runs torch._functorch.vmap._flat_vmap (looked up at call time)")
    finally:
        graph.disable_saved_tensors_hooks = original
        module._flat_vmap = flat_vmap
    assert not _transforms.in_transform()


# ---------------------------------------------------------------- mode stacks

class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: List[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(func)
        return func(*args, **(kwargs or {}))  # (off the stack while it runs: no recursion)


class _CountCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Any] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_go_in_at_the_bottom_of_the_stack_and_come_out_anywhere() -> None:
    """The window's dispatch mode is put at the bottom of torch's dispatch-mode stack, under a
    mode of the caller's, and taken out from under it (_window._insert_bottom/_remove over
    torch._C._len_torch_dispatch_stack and torch.utils._python_dispatch._push_mode/_pop_mode);
    an op reaches the caller's mode first, then spill's; a mode is off the stack while its
    __torch_dispatch__ runs."""
    length, push, pop = _window._dispatch_stack()
    mine, theirs = _CountOps(), _CountOps()
    base = length()
    with theirs:
        assert length() == base + 1, _internal("torch._C._len_torch_dispatch_stack",
                                               "does not count a mode entered")
        _window._insert_bottom(mine, length, push, pop)
        try:
            assert length() == base + 2, _internal("_python_dispatch._push_mode", "did not push")
            torch.ones(2) + 1
        finally:
            assert _window._remove(mine, length, push, pop), _internal(
                "_python_dispatch._pop_mode", "never returned the mode pushed")
        assert length() == base + 1
        torch.ones(2) * 2
    assert length() == base, _internal("TorchDispatchMode.__exit__", "left a mode on the stack")
    assert mine.ops and all(op in theirs.ops for op in mine.ops), _internal(
        "the dispatch-mode stack", "did not send the caller's mode's ops on to the one below")
    assert len(theirs.ops) > len(mine.ops)


def test_a_mode_entered_and_taken_off_from_under_another_leaves_no_dispatch_flags() -> None:
    """A mode spill enters with ``__enter__`` (a busy module's, guard's) and takes off from
    under a mode entered after it (_window._leave: its own ``__exit__``, on top again for it)
    leaves the other mode where it was, and on torch 2 leaves no "in a dispatch mode" flag set
    once both are off (``__enter__`` sets it, only ``__exit__`` restores it; a pop alone left
    it set for the process, and torch.compile skips frames while it is: audit 37a F4)."""
    length, push, pop = _window._dispatch_stack()
    base = length()
    mine, theirs = _CountOps(), _CountOps()
    mine.__enter__()
    theirs.__enter__()
    assert _window._leave(mine, length, push, pop), _internal("_python_dispatch._pop_mode",
                                                               "never returned the mode")
    assert length() == base + 1
    from torch.utils import _python_dispatch as pd
    assert pd._get_current_dispatch_mode() is theirs
    theirs.__exit__(None, None, None)
    assert length() == base
    flag = getattr(pd, "is_in_torch_dispatch_mode", None)
    if flag is not None:  # (torch 2)
        assert not flag(), _internal("TorchDispatchMode.__exit__",
                                     "left is_in_torch_dispatch_mode() set")
    assert not _window._leave(mine, length, push, pop)


def test_function_modes_go_in_at_the_bottom_and_see_backward_grad_and_data() -> None:
    """The window's function mode, put at the bottom of the function-mode stack
    (torch._C._len_torch_function_stack, torch.overrides._push_mode/_pop_mode), sees
    Tensor.backward, torch.autograd.grad and the ``.data`` setter (a dict lookup of
    torch.Tensor.data.__set__), which it handles (_window._HostUses)."""
    length, push, pop = _window._function_stack()
    mine = _CountCalls()
    base = length()
    _window._insert_bottom(mine, length, push, pop)
    try:
        assert length() == base + 1, _internal("torch.overrides._push_mode", "did not push")
        w = torch.randn(3, requires_grad=True)
        (w * 2).sum().backward()
        torch.autograd.grad((w * w).sum(), [w])
        p = torch.nn.Parameter(torch.zeros(3))
        p.data = torch.ones(3)
    finally:
        assert _window._remove(mine, length, push, pop), _internal(
            "torch.overrides._pop_mode", "never returned the mode pushed")
    assert length() == base
    special = {torch.Tensor.backward: "backward", torch.autograd.grad: "grad",
               torch.Tensor.data.__set__: "data"}
    seen = {special[f] for f in mine.calls if _hashable(f) and f in special}
    assert seen == {"backward", "grad", "data"}, _internal(
        "TorchFunctionMode", f"saw only {sorted(seen)} of backward, grad and the .data setter")
    assert torch.equal(p.detach(), torch.ones(3))


def _hashable(f: Any) -> bool:
    try:
        hash(f)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------- module hooks

def test_module_hook_dicts_keep_the_order_spill_gives_them() -> None:
    """A module's hooks live in OrderedDicts keyed by the handle's id (_forward_pre_hooks,
    _forward_hooks, _backward_hooks, and torch 2's _backward_pre_hooks); offload moves its
    pre-hook first (move_to_end(id, last=False)) and its forward hook last, and registers the
    pre-hook with_kwargs where the running torch takes it (_offload._KWARGS_OK)."""
    m = torch.nn.Linear(3, 3)
    names = ["_forward_pre_hooks", "_forward_hooks", "_backward_hooks"]
    if TORCH2:
        names.append("_backward_pre_hooks")
    for name in names:
        assert isinstance(m.__dict__.get(name), collections.OrderedDict), _internal(
            f"Module.{name}", "is not an OrderedDict in the module's __dict__")
    order: List[str] = []
    m.register_forward_pre_hook(lambda mod, args: order.append("theirs pre"))
    if _offload._KWARGS_OK:
        def mine_pre(mod: Any, args: Any, kwargs: Any) -> None:
            assert isinstance(kwargs, dict), _internal("with_kwargs pre-hooks", "get no kwargs")
            order.append("mine pre")
        handle = m.register_forward_pre_hook(mine_pre, with_kwargs=True)
    else:
        handle = m.register_forward_pre_hook(lambda mod, args: order.append("mine pre"))
    assert handle.id in m._forward_pre_hooks, _internal("RemovableHandle.id",
                                                        "is not the hook's key")
    m._forward_pre_hooks.move_to_end(handle.id, last=False)
    post = m.register_forward_hook(lambda mod, args, out: order.append("mine post"))
    m.register_forward_hook(lambda mod, args, out: order.append("theirs post"))
    m._forward_hooks.move_to_end(post.id)
    m(torch.ones(1, 3))
    assert order == ["mine pre", "theirs pre", "theirs post", "mine post"], _internal(
        "Module._call_impl", f"ran the hooks in the order {order}")
    assert _offload._KWARGS_OK == TORCH2, _internal("register_forward_pre_hook(with_kwargs=)",
                                                    "is not where spill expects it")


def test_a_forward_that_raises_skips_plain_forward_hooks() -> None:
    """offload's forward hook is a plain one: a forward that raises never calls it (the next
    hook finds the call gone from the stack and unwinds its pins). torch 2's always_call
    hooks do run then."""
    m = torch.nn.Linear(3, 3)
    called: List[str] = []
    m.register_forward_hook(lambda mod, args, out: called.append("plain"))
    if "always_call" in inspect.signature(m.register_forward_hook).parameters:
        m.register_forward_hook(lambda mod, args, out: called.append("always"), always_call=True)
    with pytest.raises(RuntimeError):
        m(torch.ones(1, 4))  # wrong width
    assert "plain" not in called, _internal("Module._call_impl",
                                            "called a plain forward hook after forward raised")


def test_hooks_find_the_module_call_on_the_python_stack() -> None:
    """A hook finds its module call's frame (_recompute.call_frame: the nearest frame running
    Module._call_impl's code), which is running while the forward runs and gone after."""
    m = torch.nn.Linear(3, 3)
    calls: List[Any] = []
    m.register_forward_pre_hook(lambda mod, args: calls.append(_recompute.ModuleCall()))
    m.register_forward_hook(lambda mod, args, out: calls.append(calls[0].running()))
    m(torch.ones(1, 3))
    assert calls[0].frame is not None, _internal(
        "Module._call_impl", "is not on the stack of a hook (its __code__ is looked for)")
    assert calls[1] is True and not calls[0].running()


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recomputation_runs_under_a_backward_frame(reentrant: bool) -> None:
    """A forward recomputed by torch.utils.checkpoint is told from a step's forward by a frame
    of torch.autograd.backward or grad below it, or another thread (_recompute.in_backward)."""
    from torch.utils.checkpoint import checkpoint
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    seen: List[bool] = []

    class Window:  # the training thread's window (_window.Window), as in_backward reads it
        thread_object = threading.current_thread()

        def here(self) -> bool:
            return threading.current_thread() is self.thread_object

    window = Window()
    m.register_forward_pre_hook(
        lambda mod, args: seen.append(_recompute.in_backward(_recompute.call_frame(), window)))
    x = torch.ones(2, 3, requires_grad=True)
    checkpoint(m, x, use_reentrant=reentrant).sum().backward()
    assert seen == [False, True], _internal(
        "torch.utils.checkpoint", f"(use_reentrant={reentrant}) recomputed with {seen}")


def test_a_module_backward_hook_replaced_in_its_dict_is_the_one_called() -> None:
    """offload wraps the caller's module backward hooks (and torch 2's backward pre-hooks) by
    replacing their values in the dicts before the forward (_pin_backward_hooks)."""
    m = torch.nn.Linear(3, 3)
    called: List[str] = []
    full = m.register_full_backward_hook(lambda mod, gi, go: called.append("original"))
    m._backward_hooks[full.id] = lambda mod, gi, go: called.append("replacement")
    if TORCH2:
        pre = m.register_full_backward_pre_hook(lambda mod, go: called.append("original pre"))
        m._backward_pre_hooks[pre.id] = lambda mod, go: called.append("replacement pre")
    m(torch.ones(1, 3, requires_grad=True)).sum().backward()
    expected = ["replacement pre", "replacement"] if TORCH2 else ["replacement"]
    assert called == expected, _internal("Module._backward_hooks/_backward_pre_hooks",
                                         f"called {called}")


# ---------------------------------------------------------------- tensor hooks

def test_a_parameters_gradient_hooks_follow_their_dict() -> None:
    """A parameter's gradient hooks live in p._backward_hooks keyed by the handle's id;
    autograd calls that dict's values in insertion order (offload puts its own first by
    deleting and inserting the others again) and calls a value replaced in place (the
    caller's hooks wrapped to run pinned)."""
    p = torch.nn.Parameter(torch.ones(3))
    called: List[str] = []
    a = p.register_hook(lambda g: called.append("a"))
    b = p.register_hook(lambda g: called.append("b"))
    hooks = p._backward_hooks
    assert isinstance(hooks, dict) and set(hooks) == {a.id, b.id}, _internal(
        "Tensor._backward_hooks", "is not a dict keyed by the handles' ids")
    hook_a = hooks.pop(a.id)
    hooks[a.id] = hook_a  # b first now
    hooks[b.id] = lambda g: called.append("b replaced")
    (p * 2).sum().backward()
    assert called == ["b replaced", "a"], _internal("Tensor._backward_hooks",
                                                    f"were called as {called}")


def test_post_accumulate_grad_hooks_follow_their_dict() -> None:
    """torch 2.1's post-accumulate-grad hooks live in p._post_accumulate_grad_hooks keyed by
    the handle's id; offload replaces the caller's in place to run pinned (_refresh)."""
    if not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        pytest.skip(f"torch {torch.__version__} has no post-accumulate-grad hooks (2.1+)")
    p = torch.nn.Parameter(torch.ones(3))
    called: List[Any] = []
    handle = p.register_post_accumulate_grad_hook(lambda t: called.append("original"))
    hooks = p._post_accumulate_grad_hooks
    assert isinstance(hooks, dict) and handle.id in hooks, _internal(
        "Tensor._post_accumulate_grad_hooks", "is not a dict keyed by the handle's id")
    hooks[handle.id] = lambda t: called.append(t.grad.clone())
    (p * 2).sum().backward()
    assert len(called) == 1 and torch.equal(called[0], torch.full((3,), 2.0)), _internal(
        "Tensor._post_accumulate_grad_hooks", "did not call the value replaced in place "
        "after accumulating")


def test_a_nodes_metadata_lives_with_the_node_and_a_leafs_node_is_shared() -> None:
    """_partials.py knows a node by a serial number in ``node.metadata`` and hooks it once
    for its life: the metadata dict lives with the C++ node, so a new Python object for it
    (made once the old one is gone) shows the same dict; and a leaf's AccumulateGrad node is
    one node for every graph that reaches the leaf while one of them lives."""
    w = torch.ones(4, requires_grad=True)
    y = (w * 2).sum()
    node = y.grad_fn.next_functions[0][0].next_functions[0][0]
    assert hasattr(node, "metadata"), _internal("Node.metadata", "is missing")
    node.metadata["spill_test"] = 1
    del node
    again = y.grad_fn.next_functions[0][0].next_functions[0][0]
    assert again.metadata.get("spill_test") == 1, _internal(
        "Node.metadata", "does not live with the C++ node")
    other = (w * 3).sum().grad_fn.next_functions[0][0].next_functions[0][0]
    assert other.metadata.get("spill_test") == 1, _internal(
        "AccumulateGrad", "is not one node for every graph that reaches the leaf")


def test_a_custom_functions_backward_goes_through_backward_cfunction_apply() -> None:
    """_backward_code.py wraps torch.autograd.function.BackwardCFunction.apply, which the
    autograd engine looks up on a custom Function's backward node at each call, to pin the
    tensors a backward reads from ``ctx`` attributes."""
    from torch.autograd.function import BackwardCFunction
    original = BackwardCFunction.apply
    calls: List[Any] = []

    def apply(self: Any, *args: Any) -> Any:
        calls.append(getattr(self, "w", None))
        return original(self, *args)

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, w: Any) -> Any:
            ctx.w = w
            return x * w

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            return g * ctx.w, None
    w = torch.full((3,), 3.0)
    BackwardCFunction.apply = apply
    try:
        x = torch.ones(3, requires_grad=True)
        Scale.apply(x, w).sum().backward()
    finally:
        BackwardCFunction.apply = original
    assert len(calls) == 1 and calls[0] is w, _internal(
        "BackwardCFunction.apply", "is not what the engine calls for a custom Function's "
        "backward, or the ctx's attributes are not on the node it gets")
    assert torch.equal(x.grad, torch.full((3,), 3.0))


# ---------------------------------------------------------------- functional_call

def test_functional_call_shows_spill_the_tensors_it_gives() -> None:
    """While functional_call runs a module with tensors of the caller's, offload's pre-hook
    finds them (_offload._functional_call_tensors: torch 1.13's class change,
    ``_attr_to_path``; torch 2's writes into ``_parameters``) and the module's layout is left
    alone (_swapped_in); the module's own parameters are back after the call."""
    if TORCH2:
        from torch.func import functional_call
    else:
        from torch.nn.utils.stateless import functional_call
    m = torch.nn.Sequential(torch.nn.Linear(3, 3))
    own = m[0].weight
    given = own.detach() * 2
    seen: List[Any] = []
    m[0].register_forward_pre_hook(
        lambda mod, args: seen.append((_offload._functional_call_tensors(mod),
                                       _offload._swapped_in(mod))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (1.13's stateless warns of nothing; 2.x's may)
        functional_call(m, {"0.weight": given}, (torch.ones(1, 3),))
    tensors, swapped = seen[0]
    assert any(t is given for t in tensors), _internal(
        "functional_call", "runs the module with the given tensor where spill does not look")
    assert swapped == TORCH2, _internal("functional_call", "swaps _parameters "
                                        + ("no longer" if TORCH2 else "now"))
    assert m[0].weight is own and not _offload._functional_call_tensors(m[0]), _internal(
        "functional_call", "left the given tensor in the module")


# ---------------------------------------------------------------- optimizers

def test_optimizer_step_wrapped_on_the_instance_still_steps_and_counts() -> None:
    """offload wraps optimizer.step and zero_grad as bound methods on the instance
    (_steps.wrap_method): an LR scheduler made after still sees the step (no warning that
    scheduler.step() came first), torch 2's step hooks still run (the class-level wrapper
    is below ours), zero_grad's set_to_none default is read from its signature, and
    param_groups have the ``foreach`` key spill reads to know the step's implementation."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=0.1)
    assert "foreach" in opt.param_groups[0], _internal("Adam param_groups", "have no foreach")
    ours: List[str] = []
    saved: dict = {}

    def wrapper(original: Any) -> Any:
        def step(*args: Any, **kwargs: Any) -> Any:
            ours.append("step")
            return original(*args, **kwargs)
        return step
    _steps.wrap_method(opt, "step", wrapper, saved)
    hooks: List[str] = []
    if TORCH2:
        opt.register_step_pre_hook(lambda o, a, k: hooks.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: hooks.append("post"))
    with warnings.catch_warnings():
        # the scheduler's "lr_scheduler.step() before optimizer.step()" or "overridden"
        warnings.filterwarnings("error", category=UserWarning, module="torch.optim.lr_scheduler")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert ours == ["step"] and not torch.equal(w.detach(), torch.ones(3))
    assert hooks == (["pre", "post"] if TORCH2 else []), _internal(
        "Optimizer step hooks", f"ran as {hooks} under a step wrapped on the instance")
    for method in (opt.zero_grad, torch.nn.Linear(2, 2).zero_grad):
        default = inspect.signature(method).parameters.get("set_to_none")
        assert default is not None and isinstance(default.default, bool), _internal(
            "zero_grad", "has no set_to_none with a bool default")
        assert default.default == TORCH2, _internal("zero_grad", "changed set_to_none's default")



@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"])
def test_a_per_parameter_optimizer_steps_the_param_groups_it_finds_at_the_step(
        name: str) -> None:
    """_optimizer.chunked_groups: for spill's run of the step, a foreach group is replaced in
    ``optimizer.param_groups`` by copies over chunks of its parameters. torch.optim's
    per-parameter optimizers must read ``self.param_groups`` at each step and give each
    parameter what the whole group gives (foreach=True), and torch 2 keeps its step hooks
    where _optimizer looks for them (with hooks the groups stay whole)."""
    def run(chunked: bool) -> List[torch.Tensor]:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(4)]
        kwargs = {"momentum": 0.9} if name in ("SGD", "RMSprop") else {}
        opt = getattr(torch.optim, name)(ps, lr=0.1, foreach=True, **kwargs)
        for step in range(3):
            for p in ps:
                p.grad = torch.full_like(p, 0.1 * (step + 1)) + p.detach() * 0.01
            groups = opt.param_groups
            if chunked:
                opt.param_groups = [dict(groups[0], params=ps[i:i + 2]) for i in (0, 2)]
            opt.step()
            opt.param_groups = groups
        return [p.detach().clone() for p in ps]
    whole, chunks = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunks)), _internal(
        f"torch.optim.{name}", "does not step the param_groups it finds at the step alike")
    if TORCH2:
        module = _optimizer.torch_optimizer
        for hooks in _optimizer.GLOBAL_HOOKS:
            assert isinstance(getattr(module, hooks, None), dict), _internal(
                f"torch.optim.optimizer.{hooks}", "is missing")
        opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
        for hooks in _optimizer._HOOKS:
            assert isinstance(getattr(opt, hooks, None), dict), _internal(
                f"Optimizer.{hooks}", "is missing")


# ---------------------------------------------------------------- CUDA allocator API

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA torch and a GPU")
def test_the_pluggable_allocator_api_is_there() -> None:
    """enable(target="cuda") uses torch._C._cuda_customAllocator and
    torch.cuda.memory.change_current_allocator; pool() uses torch.cuda.MemPool and
    use_mem_pool (2.5+); memory_snapshot() answers in the layout of the running torch's
    torch.cuda.memory._snapshot(); out of memory is torch.cuda.OutOfMemoryError."""
    assert callable(getattr(torch._C, "_cuda_customAllocator", None)), _internal(
        "torch._C._cuda_customAllocator", "is missing")
    assert callable(getattr(torch.cuda.memory, "change_current_allocator", None)), _internal(
        "torch.cuda.memory.change_current_allocator", "is missing")
    assert issubclass(torch.cuda.OutOfMemoryError, RuntimeError)
    if torch_version() >= (2, 5):
        assert hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool"), \
            _internal("torch.cuda.MemPool/use_mem_pool", "are missing")
    snap = torch.cuda.memory._snapshot()
    assert isinstance(snap, dict) and "segments" in snap, _internal(
        "torch.cuda.memory._snapshot()", f"is a {type(snap).__name__} without 'segments'")
    assert callable(getattr(torch.cuda.memory, "_CUDAAllocator", None)), _internal(
        "torch.cuda.memory._CUDAAllocator", "is missing (enable() wraps the allocator in it)")
    if torch_version() >= (2, 5):
        first = list(inspect.signature(torch.cuda.MemPool).parameters)[:1]
        assert first == ["allocator"], _internal(
            "torch.cuda.MemPool", f"takes {first} first (pool() passes the allocator there)")
    # The object _cuda_customAllocator returns carries the hooks enable() wires (init,
    # empty_cache, memory fraction, record_stream). Made over libc's malloc and free, never
    # called: it is not installed.
    from spill.torch._enable import _CUDA_HOOKS
    import ctypes
    libc = ctypes.CDLL(None)
    native = torch._C._cuda_customAllocator(
        ctypes.cast(libc.malloc, ctypes.c_void_p).value,
        ctypes.cast(libc.free, ctypes.c_void_p).value)
    missing = [setter for setter, _ in _CUDA_HOOKS if not callable(getattr(native, setter, None))]
    assert not missing, _internal(
        f"torch._C._cuda_customAllocator's {type(native).__name__}", f"has no {missing}")


def test_cpp_extension_load_takes_what_the_shims_build_passes() -> None:
    """Without a CMake-built shim for this torch (a GPU machine with pip's torch), spill.torch
    compiles its shims with torch.utils.cpp_extension.load, passing these keywords, and reads
    the library's path from what it returns (torch 2) or from its build directory (1.13)."""
    from torch.utils import cpp_extension
    params = inspect.signature(cpp_extension.load).parameters
    for name in ("name", "sources", "extra_include_paths", "extra_ldflags", "build_directory",
                 "is_python_module", "verbose"):
        assert name in params, _internal("torch.utils.cpp_extension.load", f"takes no {name!r}")
    if not TORCH2:  # 1.13's load returns nothing for a library that is not a module
        assert callable(getattr(cpp_extension, "_get_build_directory", None)), _internal(
            "torch.utils.cpp_extension._get_build_directory", "is missing")


def test_spills_replacements_take_the_arguments_of_the_functions_they_replace() -> None:
    """enable() puts spill's functions in place of torch.cuda's memory functions (memory_stats,
    memory_snapshot, _snapshot, ...), which torch's own code also calls: torch 2.10's
    MemPool.snapshot() passes include_traces to memory_snapshot, its _dump_snapshot()
    augment_with_fx_traces to _snapshot. Every parameter of the running torch's function is
    one of the replacement's, at the same position (checked on the signatures; nothing is
    replaced here). On CUDA, torch 2.9+'s torch.accelerator memory functions are replaced too;
    their parameters are positional-only (device_index, /): only the position counts."""
    from spill.torch._enable import _patched_functions
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    places = [("torch.cuda", (torch.cuda.memory, torch.cuda))]
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        places.append(("torch.accelerator", (getattr(accelerator, "memory", accelerator),
                                             accelerator)))
    for place, modules in places:
        for name, replacement in _patched_functions().items():
            original = next((getattr(m, name) for m in modules if hasattr(m, name)), None)
            if original is None:
                continue  # not in this torch: nothing to replace
            theirs = [p for p in inspect.signature(original).parameters.values()
                      if p.kind in kinds]
            params = inspect.signature(replacement).parameters.values()
            ours = [p.name for p in params if p.kind in kinds]
            if {p.kind for p in params} >= {inspect.Parameter.VAR_POSITIONAL,
                                             inspect.Parameter.VAR_KEYWORD}:
                ours += [p.name for p in theirs[len(ours):]]  # takes (and ignores) the rest
            for i, p in enumerate(theirs):
                if p.kind == inspect.Parameter.POSITIONAL_ONLY:
                    assert i < len(ours), _internal(
                        f"{place}.{name}", f"takes an argument at position {i}, spill's "
                        "replacement does not")
                    continue
                assert p.name in ours, _internal(
                    f"{place}.{name}", f"takes {p.name!r}, which spill's replacement does not")
                if p.kind != inspect.Parameter.KEYWORD_ONLY:
                    assert ours.index(p.name) == i, _internal(
                        f"{place}.{name}", f"has {p.name!r} at position {i}, spill's does not")


def test_a_mode_taken_off_from_under_one_entered_twice_hands_its_flags_to_the_nearest_entry(
        ) -> None:
    """torch 2's bookkeeping, by hand (torch 1.13 keeps no flags on its modes): a mode taken
    off from under another mode entered twice above it hands the flags it saved to that mode's
    first entry (the one right above it), whose exit restores them last. Handed to the last
    entry, they were restored while the first was still on, and the first's exit then set the
    "in a dispatch mode" flag for good (review 39c)."""
    from collections import deque
    from spill.torch._window import _SAVED_FLAGS, _remove

    class Mode:
        pass
    mode, upper = Mode(), Mode()
    for name in _SAVED_FLAGS:
        setattr(mode, name, deque([False]))        # entered with the flags clear
        setattr(upper, name, deque([True, True]))  # entered twice, above it
    stack = [mode, upper, upper]
    assert _remove(mode, lambda: len(stack), stack.append, stack.pop, exit=True)
    assert stack == [upper, upper]
    for name in _SAVED_FLAGS:
        assert getattr(upper, name) == deque([False, True]), name
        assert not getattr(mode, name), name
