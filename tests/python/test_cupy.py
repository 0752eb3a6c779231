"""spill.cupy without CuPy (it imports, and says what is missing when used) and against a
small stand-in for the parts of CuPy an allocator touches (CuPy is not a Debian package; the
real thing runs in test_cupy_gpu.py on a GPU machine)."""
from __future__ import annotations

import gc
import importlib
import pickle
import sys
import types
import weakref

import pytest

import spill
from conftest import SIM_CONF

MIB = 1 << 20


def make_fake_cupy() -> types.ModuleType:
    """cupy, cupy.cuda and cupy.cuda.memory with CuPy's allocator-facing signatures."""
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    memory = types.ModuleType("cupy.cuda.memory")

    class OutOfMemoryError(MemoryError):  # CuPy's: built from (size, total, limit)
        def __init__(self, size, total, limit=0):
            self._size, self._total, self._limit = size, total, limit
            super().__init__(f"Out of memory allocating {size:,} bytes")

        def __reduce__(self):
            return (type(self), (self._size, self._total, self._limit))

    class Stream:
        def __init__(self, ptr):
            self.ptr = ptr

    class Device:
        def __init__(self, device=None):
            self.id = cuda.current_device if device is None else device

    class UnownedMemory:
        def __init__(self, ptr, size, owner, device_id=-1):
            if device_id < 0:
                raise RuntimeError("the fake needs an explicit device id")
            self.ptr, self.size, self._owner, self.device_id = ptr, size, owner, device_id

    class MemoryPointer:
        def __init__(self, mem, offset):
            self.mem, self.ptr = mem, mem.ptr + offset

    class MemoryPool:  # CuPy's default pool: counts the times its cache was given back
        def __init__(self):
            self.emptied = 0

        def free_all_blocks(self):
            self.emptied += 1

    memory.OutOfMemoryError = OutOfMemoryError
    cuda.memory = memory
    cuda.Stream, cuda.Device = Stream, Device
    cuda.UnownedMemory, cuda.MemoryPointer = UnownedMemory, MemoryPointer
    cuda.current_device = 0
    cuda.get_device_id = lambda: cuda.current_device
    cuda.current_stream = Stream(0)
    cuda.get_current_stream = lambda: cuda.current_stream
    cuda.allocator = None
    pool = MemoryPool()
    cupy.get_default_memory_pool = lambda: pool

    def set_allocator(fn):
        cuda.allocator = fn

    cuda.set_allocator = set_allocator
    cupy.cuda = cuda
    return cupy


@pytest.fixture
def spill_cupy(monkeypatch, sim):
    """spill.cupy imported over the fake CuPy; re-imported without it afterwards."""
    fake = make_fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy.cuda", fake.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.memory", fake.cuda.memory)
    import spill.cupy
    module = importlib.reload(spill.cupy)
    yield module, fake
    monkeypatch.undo()
    gc.collect()
    importlib.reload(spill.cupy)


def test_imports_without_cupy_and_says_what_is_missing(python_run):
    r = python_run(
        "import sys\n"
        "sys.modules['cupy'] = None  # as if CuPy were not installed\n"
        "import spill.cupy\n"
        "assert 'torch' not in sys.modules\n"
        "for use in (lambda: spill.cupy.allocator(16), spill.cupy.set_allocator):\n"
        "    try:\n"
        "        use()\n"
        "    except ModuleNotFoundError as e:\n"
        "        print(e)\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("spill.cupy needs CuPy") for line in lines)


def test_allocates_on_cupys_current_stream_and_frees_on_it(spill_cupy, monkeypatch):
    module, fake = spill_cupy
    stream = spill.stream_create()
    fake.cuda.current_stream = fake.cuda.Stream(stream)
    frees = []
    real_free = spill.free
    monkeypatch.setattr(spill, "free", lambda *a: (frees.append(a), real_free(*a)))

    before = spill.stats()
    pointer = module.allocator(3 * MIB)
    assert isinstance(pointer, fake.cuda.MemoryPointer)
    assert pointer.ptr == pointer.mem.ptr != 0 and pointer.mem.size == 3 * MIB
    assert pointer.mem.device_id == 0
    after = spill.stats()
    assert after["num_allocs"] == before["num_allocs"] + 1
    assert after["requested_bytes.current"] == 3 * MIB

    fake.cuda.current_stream = fake.cuda.Stream(0)  # CuPy moved on to another stream
    ptr = pointer.ptr
    del pointer
    gc.collect()
    assert frees == [(ptr, 0, stream)]  # freed on the stream it was allocated on
    assert spill.stats()["requested_bytes.current"] == 0
    spill.stream_destroy(stream)


def test_uses_cupys_current_device(spill_cupy):
    module, fake = spill_cupy
    fake.cuda.current_device = 1  # with device:sim every ordinal is its own simulated GPU
    pointer = module.allocator(MIB)
    assert pointer.mem.device_id == 1
    assert spill.stats(device=1)["requested_bytes.current"] == MIB
    assert spill.stats(device=0)["requested_bytes.current"] == 0
    del pointer
    gc.collect()
    assert spill.stats(device=1)["requested_bytes.current"] == 0


def test_empty_arrays_take_no_memory(spill_cupy):
    module, fake = spill_cupy
    before = spill.stats()["num_allocs"]
    pointer = module.allocator(0)
    assert pointer.ptr == 0 and pointer.mem.device_id == 0
    assert spill.stats()["num_allocs"] == before


def test_out_of_memory_is_cupys_and_spills(spill_cupy):
    module, fake = spill_cupy
    with pytest.raises(fake.cuda.memory.OutOfMemoryError) as e:
        module.allocator(64 * MIB)  # the budget is 32 MiB
    err = e.value
    assert isinstance(err, spill.OutOfMemoryError) and isinstance(err, MemoryError)
    assert err.code == spill.Status.OUT_OF_MEMORY
    assert str(err) == spill.last_oom_message()  # spill's account, not CuPy's one-liner
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err) and str(copy) == str(err)


def test_out_of_memory_collects_cyclic_garbage_first(spill_cupy):
    """As CuPy's own pool does before it gives up: arrays held only by reference cycles go
    back with gc.collect(), then the request is retried (before, it raised)."""
    module, fake = spill_cupy
    gc.disable()
    try:
        for _ in range(5):  # 20 MiB of the 32 MiB budget, reachable only through cycles
            cycle = [module.allocator(4 * MIB)]
            cycle.append(cycle)
        del cycle
        assert spill.stats()["requested_bytes.current"] == 20 * MIB
        pointer = module.allocator(20 * MIB)
        assert spill.stats()["requested_bytes.current"] == 20 * MIB
    finally:
        gc.enable()
    del pointer
    gc.collect()
    with pytest.raises(fake.cuda.memory.OutOfMemoryError):  # and still raises when it must
        module.allocator(64 * MIB)


def test_set_allocator_installs_it_and_empties_cupys_pool(spill_cupy):
    module, fake = spill_cupy
    module.set_allocator()
    assert fake.cuda.allocator is module.allocator
    assert fake.get_default_memory_pool().emptied == 1  # its cache goes back to the device


def test_cupys_per_thread_default_stream_is_refused_saying_so(spill_cupy):
    """CuPy's per-thread default stream is one handle (2) for every thread's own stream, which
    spill cannot order reuse on: refused with a message that names it and the way out (before,
    C's "stream 0x2 is cudaStreamPerThread" came from every allocation)."""
    module, fake = spill_cupy
    fake.cuda.current_stream = fake.cuda.Stream(2)
    for use in (lambda: module.allocator(MIB), module.set_allocator):
        with pytest.raises(spill.InvalidArgumentError, match="per-thread default stream") as e:
            use()
        assert "CUPY_CUDA_PER_THREAD_DEFAULT_STREAM" in str(e.value)
    assert fake.cuda.allocator is None and spill.stats()["num_allocs"] == 0


def test_a_free_that_fails_is_logged_not_raised(spill_cupy, monkeypatch, caplog):
    module, fake = spill_cupy
    pointer = module.allocator(MIB)
    ptr = pointer.ptr

    real_free = spill.free

    def failing_free(*args):
        raise spill.InvalidArgumentError("spill_free: made up", spill.Status.INVALID_ARGUMENT)

    monkeypatch.setattr(spill, "free", failing_free)
    del pointer
    gc.collect()
    assert f"could not free {ptr:#x} on device 0: spill_free: made up" in caplog.text
    real_free(ptr)


def test_blocks_outliving_a_shutdown_are_quiet(spill_cupy, caplog):
    module, fake = spill_cupy
    pointer = module.allocator(MIB)
    spill.shutdown()  # frees everything, CuPy's block included
    del pointer
    gc.collect()
    assert "could not free" not in caplog.text
    spill.configure("device:sim,budget:16MiB")


def test_an_array_outliving_a_shutdown_leaves_the_next_sessions_blocks_alone(spill_cupy,
                                                                             monkeypatch,
                                                                             caplog):
    """A CuPy array can die long after spill.shutdown() (a test's traceback, a cached plan);
    by then a block of the next session may sit at its address. Before, its late free freed
    that block under its live array (the stats fell to 0) and the real owner's free was then
    a double free; and a reload of spill.cupy (as this file's fixture does) started its count
    of sessions again (audit 35d)."""
    module, fake = spill_cupy
    frees = []
    real_free = spill.free
    monkeypatch.setattr(spill, "free", lambda *a: (frees.append(a[0]), real_free(*a)))
    old = module.allocator(4 * MIB)
    old_ptr = old.ptr
    spill.shutdown()
    spill.configure(SIM_CONF)
    module = importlib.reload(module)  # (a reload started the module's own count again)
    new = module.allocator(4 * MIB)
    del old
    gc.collect()
    assert old_ptr not in frees  # (whether or not the new block took its address)
    assert spill.stats()["requested_bytes.current"] == 4 * MIB
    del new
    gc.collect()
    assert spill.stats()["requested_bytes.current"] == 0
    assert "could not free" not in caplog.text


def test_frees_in_a_forked_child_are_quiet(spill_cupy, monkeypatch, caplog):
    """A forked child's inherited arrays free nothing (the memory is the parent's): no warning
    for each (before, one per array)."""
    module, fake = spill_cupy
    pointer = module.allocator(MIB)
    ptr = pointer.ptr

    def forked_free(*args):
        raise spill.Error("spill_free: forked child", spill.Status.FORKED_CHILD)

    real_free = spill.free
    monkeypatch.setattr(spill, "free", forked_free)
    del pointer
    gc.collect()
    assert "could not free" not in caplog.text
    real_free(ptr)


def test_streams_stay_alive_until_spill_has_forgotten_them(spill_cupy, monkeypatch):
    module, fake = spill_cupy
    forgotten = []
    real_destroyed = spill.stream_destroyed
    monkeypatch.setattr(spill, "stream_destroyed",
                        lambda s, d=0: (forgotten.append((s, d)), real_destroyed(s, d)))
    handles = [spill.stream_create() for _ in range(2)]
    held_by_user, held_by_block = (fake.cuda.Stream(h) for h in handles)
    alive = [weakref.ref(held_by_user), weakref.ref(held_by_block)]
    pointers = []
    for stream in (held_by_user, held_by_block):
        fake.cuda.current_stream = stream
        pointers.append(module.allocator(MIB))
    fake.cuda.current_stream = fake.cuda.Stream(0)
    del stream
    pointers.pop(0)  # the first stream's block is freed, the user still holds the stream
    del held_by_block  # the second stream is held by its live block alone
    gc.collect()
    pointers.append(module.allocator(MIB))
    assert forgotten == [] and all(a() is not None for a in alive)
    del held_by_user
    pointers.pop(0)
    gc.collect()
    pointers.append(module.allocator(MIB))  # only spill.cupy holds them: spill forgets both
    assert sorted(forgotten) == sorted((h, 0) for h in handles)
    gc.collect()
    assert all(a() is None for a in alive) and len(module._streams) == 0
    del pointers
    gc.collect()
    for h in handles:
        spill.stream_destroy(h)


def test_wrappers_of_one_stream_share_one_kept_object(spill_cupy, monkeypatch):
    """Several CuPy objects may wrap one handle (Stream.from_external, ExternalStream: often a
    new one each step). Blocks hold the one kept for the handle, so spill forgets the handle
    only once no block uses it. Before, the first wrapper alone was kept: dropping it made
    spill forget the handle under a live block allocated through the second, and once that
    block was freed nothing would ever tell spill again."""
    module, fake = spill_cupy
    forgotten = []
    real_destroyed = spill.stream_destroyed
    monkeypatch.setattr(spill, "stream_destroyed",
                        lambda s, d=0: (forgotten.append(s), real_destroyed(s, d)))
    handle = spill.stream_create()
    first, second = fake.cuda.Stream(handle), fake.cuda.Stream(handle)
    fake.cuda.current_stream = first
    a = module.allocator(MIB)
    fake.cuda.current_stream = second
    b = module.allocator(MIB)
    assert a.mem._owner.kept is b.mem._owner.kept is first
    assert b.mem._owner.stream is second  # (its own keeps its stream alive: audit 35d)
    fake.cuda.current_stream = fake.cuda.Stream(0)
    alive = weakref.ref(second)
    del a, first, second
    gc.collect()
    assert alive() is not None
    c = module.allocator(MIB)
    assert forgotten == []  # b still uses the handle
    del b
    gc.collect()
    d = module.allocator(MIB)
    assert forgotten == [handle] and len(module._streams) == 0
    del c, d
    gc.collect()
    spill.stream_destroy(handle)
