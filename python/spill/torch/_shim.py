"""The C++ shims compiled against the running torch (integrations/torch): one for CUDA
(malloc/free for CUDAPluggableAllocator that raise torch.cuda.OutOfMemoryError) and one for
the CPU bridge (spill's simulated device as PyTorch's CPU allocator).

A prebuilt shim (the CMake targets, beside libspill) is used when it was compiled for this
torch; otherwise the sources are compiled once through torch.utils.cpp_extension and cached
(under ``SPILL_TORCH_BUILD_DIR`` or torch's extension cache), keyed by torch's version and the
sources' contents.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import threading
from typing import Dict, List, Optional

import torch

from .._errors import LibraryNotFoundError
from .._lib import library, library_path
from ._state import torch_version

_log = logging.getLogger("spill.torch")
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_SOURCES = {"cuda": "torch_cuda_shim.cpp", "cpu": "torch_cpu_bridge.cpp"}
_lock = threading.Lock()
_loaded: Dict[str, ctypes.CDLL] = {}


def _torch_key() -> str:
    """This torch as the shims name it: "1.13.0 abi1" (the version without local suffixes)."""
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return ".".join(str(n) for n in torch_version()) + f" abi{abi}"


def _source_dirs() -> List[pathlib.Path]:
    dirs = []
    if os.environ.get("SPILL_TORCH_SHIM_SOURCES"):
        dirs.append(pathlib.Path(os.environ["SPILL_TORCH_SHIM_SOURCES"]))
    dirs.append(_PACKAGE_DIR / "_csrc")                                  # an installed package
    dirs.append(_PACKAGE_DIR.parents[2] / "integrations" / "torch")      # a source checkout
    return dirs


def _include_dirs() -> List[pathlib.Path]:
    dirs = []
    if os.environ.get("SPILL_INCLUDE_DIR"):
        dirs.append(pathlib.Path(os.environ["SPILL_INCLUDE_DIR"]))
    dirs.append(_PACKAGE_DIR / "_csrc" / "include")
    dirs.append(_PACKAGE_DIR.parents[2] / "integrations" / "c")
    lib_dir = pathlib.Path(library_path()).resolve().parent
    dirs.append(lib_dir.parent / "include")                              # <prefix>/lib + include
    return dirs


def _find(name: str, dirs: List[pathlib.Path], what: str) -> pathlib.Path:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    raise LibraryNotFoundError(
        f"spill.torch: cannot build the {what}: {name} not found in "
        + ", ".join(str(d) for d in dirs)
        + " (set SPILL_TORCH_SHIM_SOURCES / SPILL_INCLUDE_DIR, or use a build of spill that "
        "has the shims: cmake finds Torch)")


def _prebuilt(kind: str) -> Optional[ctypes.CDLL]:
    """The CMake-built shim beside libspill, if it was built for this torch."""
    path = pathlib.Path(library_path()).resolve().parent / f"libspill_torch_{kind}.so"
    if not path.is_file():
        return None
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    lib.spill_torch_shim_built_for.restype = ctypes.c_char_p
    built_for = lib.spill_torch_shim_built_for().decode()
    if built_for != _torch_key():
        _log.info("spill.torch: %s was built for torch %s, this is %s: compiling another",
                  path, built_for, _torch_key())
        return None
    return lib


def _compile(kind: str) -> ctypes.CDLL:
    from torch.utils import cpp_extension
    source = _find(_SOURCES[kind], _source_dirs(), f"{kind} shim")
    header = _find(os.path.join("spill", "spill.h"), _include_dirs(), f"{kind} shim")
    digest = hashlib.sha256()
    for part in (source.read_bytes(), header.read_bytes(), _torch_key().encode()):
        digest.update(part)
    name = f"spill_torch_{kind}_{digest.hexdigest()[:12]}"
    build_root = os.environ.get("SPILL_TORCH_BUILD_DIR")
    build_dir = None
    if build_root:
        build_dir = os.path.join(build_root, name)
        os.makedirs(build_dir, exist_ok=True)
    lib_file = pathlib.Path(library_path()).resolve()
    _log.info("spill.torch: compiling the %s shim for torch %s (once; cached)", kind,
              torch.__version__)
    try:
        path = cpp_extension.load(
            name=name, sources=[str(source)], extra_include_paths=[str(header.parent.parent)],
            # what the shim takes from static archives (a toolchain's static libstdc++)
            # stays inside it, as in libspill (CMakeLists.txt: spill_keep_archives_private)
            extra_ldflags=[str(lib_file), f"-Wl,-rpath,{lib_file.parent}",
                           "-Wl,--exclude-libs,ALL"],
            build_directory=build_dir, is_python_module=False, verbose=False)
    except Exception as e:  # the compiler's output is in the message
        raise LibraryNotFoundError(
            f"spill.torch: compiling the {kind} shim against torch {torch.__version__} "
            f"failed: {e}") from e
    if not isinstance(path, str):  # older cpp_extension returned nothing for non-modules
        path = os.path.join(build_dir or cpp_extension._get_build_directory(name, False),
                            name + ".so")
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def shim(kind: str) -> ctypes.CDLL:
    """The loaded shim for ``kind`` ("cuda" or "cpu"), building it on first use."""
    lib = _loaded.get(kind)
    if lib is not None:
        return lib
    with _lock:
        if kind not in _loaded:
            library()  # libspill first, globally, so the shim resolves spill's symbols there
            lib = _prebuilt(kind) or _compile(kind)
            _declare(kind, lib)
            _loaded[kind] = lib
    return _loaded[kind]


def _declare(kind: str, lib: ctypes.CDLL) -> None:
    lib.spill_torch_shim_built_for.restype = ctypes.c_char_p
    if kind == "cpu":
        lib.spill_torch_cpu_install.argtypes = [ctypes.c_int]
        lib.spill_torch_cpu_install.restype = ctypes.c_int
        lib.spill_torch_cpu_uninstall.argtypes = []
        lib.spill_torch_cpu_uninstall.restype = None
        lib.spill_torch_cpu_installed.restype = ctypes.c_int
        lib.spill_torch_cpu_forked.restype = ctypes.c_int


def address(lib: ctypes.CDLL, symbol: str) -> int:
    """The address of a C function, for PyTorch's allocator hooks."""
    return ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value or 0
