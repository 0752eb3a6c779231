"""The package imports without the native library, torch or CuPy, says where it looked, and
documents its public functions."""
from __future__ import annotations

import inspect

import pytest

import spill
import spill.cupy


def test_import_loads_nothing(python_run):
    r = python_run(
        "import sys, spill\n"
        "assert 'torch' not in sys.modules and 'cupy' not in sys.modules, sorted(sys.modules)\n"
        "import spill._lib as l\n"
        "assert l._library is None\n"
        "from spill import *\n"  # (audit 41a #5: `version` in __all__ loaded the library)
        "from spill.cupy import *\n"
        "assert l._library is None\n"
        "print('ok')\n", env={"SPILL_LIBRARY": "/nonexistent/libspill.so"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_missing_library_lists_every_place_tried(python_run, package_copy, tmp_path):
    r = python_run(
        "import spill\n"
        "try:\n"
        "    spill.version\n"
        "except spill.LibraryNotFoundError as e:\n"
        "    assert isinstance(e, spill.Error) and isinstance(e, OSError)\n"
        "    print(e)\n",
        env={"SPILL_LIBRARY": None, "SPILL_BUILD_DIR": str(tmp_path / "nobuild"),
             "LD_LIBRARY_PATH": None},
        package_dir=package_copy)
    assert r.returncode == 0, r.stderr
    assert "SPILL_LIBRARY (not set)" in r.stdout
    assert f"beside the package: {package_copy}/spill/libspill.so (no such file)" in r.stdout
    assert f"SPILL_BUILD_DIR: {tmp_path}/nobuild/libspill.so (no such file)" in r.stdout
    assert f"build tree: {tmp_path}/build/libspill.so (no such file)" in r.stdout
    assert "system loader: libspill.so" in r.stdout
    assert "Set SPILL_LIBRARY" in r.stdout


def test_bad_spill_library_names_the_path(python_run, tmp_path):
    bogus = tmp_path / "libnot-spill.so"
    bogus.write_text("not a shared object")
    r = python_run(
        "import spill\n"
        "try:\n"
        "    spill.version\n"
        "except spill.LibraryNotFoundError as e:\n"
        "    print(e)\n",
        env={"SPILL_LIBRARY": str(bogus)})
    assert r.returncode == 0, r.stderr
    assert f"SPILL_LIBRARY={str(bogus)!r} could not be loaded" in r.stdout


def test_a_library_whose_cuda_runtime_is_missing_says_so(monkeypatch, tmp_path):
    """Found, but libcudart.so.13 is not on the loader's path: the advice is the loader's path,
    not building or installing spill again."""
    from spill import _lib
    found = tmp_path / "libspill.so"
    found.write_text("")

    def no_runtime(path: str) -> None:
        raise OSError("libcudart.so.13: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(_lib, "_open", no_runtime)
    monkeypatch.setattr(_lib, "_candidates", lambda: [("installed tree", found)])
    monkeypatch.delenv("SPILL_LIBRARY", raising=False)
    with pytest.raises(spill.LibraryNotFoundError) as e:
        _lib._load()
    assert f"installed tree: {found} (libcudart.so.13: cannot open" in str(e.value)
    assert "LD_LIBRARY_PATH" in str(e.value)
    assert "build spill" not in str(e.value)
    monkeypatch.setenv("SPILL_LIBRARY", str(found))
    with pytest.raises(spill.LibraryNotFoundError, match="LD_LIBRARY_PATH"):
        _lib._load()


@pytest.mark.parametrize("module", [spill, spill.cupy], ids=["spill", "spill.cupy"])
def test_public_functions_have_docstrings_and_type_hints(module):
    for name in module.__all__:
        obj = getattr(module, name, None)
        if not inspect.isfunction(obj):
            continue
        assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
        sig = inspect.signature(obj)
        untyped = [p for p in sig.parameters if sig.parameters[p].annotation is inspect.Parameter.empty]
        assert not untyped, f"{module.__name__}.{name}: parameters without a type hint: {untyped}"
        assert sig.return_annotation is not inspect.Signature.empty, f"{module.__name__}.{name}: no return type"
