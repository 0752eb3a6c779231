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
