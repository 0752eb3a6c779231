"""Finds and loads libspill.so once, on first use (importing spill loads nothing).

Search order: ``SPILL_LIBRARY`` (a path to the library; nothing else is tried when it is set),
the library directory of an installed tree (recorded in ``_install.py`` by ``cmake --install``),
the package's own folder, the build tree of a source checkout (``$SPILL_BUILD_DIR``, else
``build/`` beside ``python/``), then the system loader (``LD_LIBRARY_PATH``, ldconfig).
"""
from __future__ import annotations

import ctypes
import os
import pathlib
import threading
from typing import Any, List, Optional, Tuple

from ._capi import declare, raise_status
from ._errors import LibraryNotFoundError
from ._version import __version__

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_library_path: Optional[str] = None


def _installed_library_dir() -> Optional[pathlib.Path]:
    try:
        from . import _install  # written by `cmake --install`, absent in a source checkout
    except ImportError:
        return None
    return (_PACKAGE_DIR / _install.LIBRARY_DIR).resolve()


def _candidates() -> List[Tuple[str, pathlib.Path]]:
    """(where, path) pairs to try, in order, after SPILL_LIBRARY."""
    places = []
    installed = _installed_library_dir()
    if installed is not None:
        places.append(("installed tree", installed))
    places.append(("beside the package", _PACKAGE_DIR))
    build_dir = os.environ.get("SPILL_BUILD_DIR")
    if build_dir:
        places.append(("SPILL_BUILD_DIR", pathlib.Path(build_dir)))
    places.append(("build tree", _PACKAGE_DIR.parent.parent / "build"))
    found = []
    for where, folder in places:
        exact = folder / "libspill.so"
        versioned = sorted(folder.glob("libspill.so.*")) if folder.is_dir() else []
        found.append((where, exact if exact.exists() or not versioned else versioned[0]))
    return found


def _open(path: str) -> ctypes.CDLL:
    # RTLD_GLOBAL so that a framework shim loaded later resolves spill's symbols against this copy.
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def _runtime_hint(errors: str) -> str:
    """A library that was found but whose CUDA runtime was not: building or installing spill
    again would not help, the loader's path would."""
    if "libcudart" not in errors:
        return ""
    return ("\nlibspill.so was found, but the CUDA runtime it needs (libcudart.so.13) was not: "
            "add the folder that holds it (a CUDA toolkit's lib64, or the lib folder of the "
            "nvidia-cuda-runtime wheel) to LD_LIBRARY_PATH or the system loader's configuration.")


def _load() -> Tuple[ctypes.CDLL, str]:
    explicit = os.environ.get("SPILL_LIBRARY")
    if explicit:
        try:
            return _open(explicit), explicit
        except OSError as e:
            raise LibraryNotFoundError(
                f"spill: SPILL_LIBRARY={explicit!r} could not be loaded: {e}"
                + _runtime_hint(str(e))) from None
    tried = ["SPILL_LIBRARY (not set)"]
    for where, path in _candidates():
        if not path.exists():
            tried.append(f"{where}: {path} (no such file)")
            continue
        try:
            return _open(str(path)), str(path)
        except OSError as e:
            tried.append(f"{where}: {path} ({e})")
    try:
        return _open("libspill.so"), "libspill.so"
    except OSError as e:
        tried.append(f"system loader: libspill.so ({e})")
    hint = _runtime_hint("\n".join(tried))
    raise LibraryNotFoundError(
        "spill: libspill.so not found; tried:\n  " + "\n  ".join(tried) +
        (hint or "\nSet SPILL_LIBRARY to the library's path, build spill (scripts/build.sh) or "
                 "install it (cmake --install)."))


def library() -> ctypes.CDLL:
    """The loaded libspill, with its C API prototypes declared (loaded on the first call)."""
    global _library, _library_path
    if _library is None:
        with _lock:
            if _library is None:
                lib, path = _load()
                declare(lib, path)
                found = lib.spill_version().decode()
                if found != __version__:
                    raise LibraryNotFoundError(
                        f"spill: {path} is libspill {found}, but this Python package is "
                        f"{__version__}; point SPILL_LIBRARY at a matching library")
                _library_path = path
                _library = lib
    return _library


def library_path() -> str:
    """The path libspill was loaded from (loading it if needed)."""
    library()
    assert _library_path is not None
    return _library_path


def call(name: str, *args: Any) -> None:
    """Calls C API function `name` and raises the matching spill exception when it fails."""
    lib = library()
    status = getattr(lib, name)(*args)
    if status != 0:
        raise_status(lib, status)
