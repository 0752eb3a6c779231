"""spill as CuPy's allocator on a real GPU (bench/gpu/run_all.sh runs it; it skips without
CuPy or a GPU)."""
from __future__ import annotations

import gc

import pytest

import spill

cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
MIB = 1 << 20


def _gpu_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver, no device: skip below
        return 0


pytestmark = pytest.mark.skipif(_gpu_count() == 0, reason="no usable GPU for CuPy")


@pytest.fixture
def on_gpu():
    import spill.cupy
    spill.shutdown()
    spill.configure("device:cuda,budget:512MiB")
    spill.cupy.set_allocator()
    yield spill
    cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)
    gc.collect()
    cupy.cuda.Device().synchronize()
    spill.shutdown()


def test_cupy_arrays_live_in_spill(on_gpu):
    assert not spill.is_simulated()
    before = spill.stats()["num_allocs"]
    a = cupy.arange(4 * MIB, dtype=cupy.float32)
    b = a * 2 + 1
    assert int(b[-1]) == 2 * (4 * MIB - 1) + 1
    assert float(b.sum()) == pytest.approx(float(4 * MIB) ** 2, rel=1e-3)  # sum of 2i+1 is N^2
    s = spill.stats()
    assert s["num_allocs"] >= before + 2 and s["allocated_bytes.current"] >= 2 * 16 * MIB
    del a, b
    gc.collect()
    cupy.cuda.Device().synchronize()
    assert spill.stats()["allocated_bytes.current"] < 16 * MIB


def test_cupy_streams(on_gpu):
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        x = cupy.ones(MIB, dtype=cupy.float64)
        y = (x * 3).sum()
    stream.synchronize()
    assert float(y) == 3 * MIB
    del x, y
    gc.collect()
    stream.synchronize()


def test_cupy_out_of_memory(on_gpu):
    with pytest.raises(cupy.cuda.memory.OutOfMemoryError) as e:
        cupy.empty(1024 * MIB, dtype=cupy.uint8)  # twice the budget
    assert isinstance(e.value, spill.OutOfMemoryError)
    assert "out of memory" in str(e.value).lower() or "budget" in str(e.value).lower()


def test_versions_for_the_log(on_gpu):
    print(f"CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
          f"driver {cupy.cuda.runtime.driverGetVersion()}; spill {spill.version}")


def test_the_per_thread_default_stream_is_refused_saying_so(on_gpu):
    with cupy.cuda.Stream.ptds:
        with pytest.raises(spill.InvalidArgumentError, match="per-thread default stream"):
            cupy.ones(MIB)
    assert float(cupy.ones(MIB).sum()) == MIB  # the legacy default stream still works


def test_wrappers_of_one_stream_keep_it_known_while_a_block_uses_it(on_gpu):
    import spill.cupy
    owner = cupy.cuda.Stream(non_blocking=True)
    wrap = getattr(cupy.cuda.Stream, "from_external", None)
    first, second = (wrap(owner) if wrap else cupy.cuda.ExternalStream(owner.ptr)
                     for _ in range(2))
    with first:
        a = cupy.full(MIB, 2.0)
    with second:
        b = cupy.full(MIB, 3.0)
    del a, first, second
    gc.collect()
    c = cupy.ones(MIB)  # (releases what only spill.cupy holds: not the handle b uses)
    assert len(spill.cupy._streams) == 1
    owner.synchronize()
    assert float(b.sum()) == 3.0 * MIB
    del b, c
    gc.collect()
    d = cupy.ones(MIB)
    assert len(spill.cupy._streams) == 0  # forgotten before its owner destroys it
    del d, owner
    gc.collect()
    cupy.cuda.Device().synchronize()


def test_an_array_outliving_a_shutdown_leaves_the_next_sessions_blocks_alone(on_gpu):
    import spill.cupy
    old = cupy.empty(4 * MIB, dtype=cupy.uint8)
    old_ptr = old.data.ptr
    cupy.cuda.Device().synchronize()
    spill.shutdown()  # frees old's memory under it (it must not be used after this)
    spill.configure("device:cuda,budget:512MiB")
    new = cupy.full(4 * MIB, 7, dtype=cupy.uint8)
    in_use = spill.stats()["requested_bytes.current"]
    frees = []
    real_free = spill.free
    spill.free = lambda *a: (frees.append(a[0]), real_free(*a))
    try:
        del old
        gc.collect()
    finally:
        spill.free = real_free
    assert old_ptr not in frees
    assert spill.stats()["requested_bytes.current"] == in_use
    assert int(new.sum()) == 7 * 4 * MIB
    del new


def test_out_of_memory_collects_cyclic_garbage_first(on_gpu):
    gc.disable()
    try:
        for _ in range(3):  # 384 MiB of the 512 MiB budget, reachable only through cycles
            cycle = [cupy.empty(128 * MIB, dtype=cupy.uint8)]
            cycle.append(cycle)
        del cycle
        x = cupy.empty(384 * MIB, dtype=cupy.uint8)
    finally:
        gc.enable()
    del x
