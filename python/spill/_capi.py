"""ctypes prototypes of the C API (integrations/c/spill/spill.h), declared once on load."""
from __future__ import annotations

import ctypes

from ._errors import LibraryNotFoundError


def declare(lib: ctypes.CDLL, path: str) -> None:
    """Sets argtypes/restype of every function the package calls; fails if one is missing."""
    try:
        lib.spill_version.restype = ctypes.c_char_p
        lib.spill_version.argtypes = []
    except AttributeError as e:
        raise LibraryNotFoundError(
            f"spill: {path} is not a libspill with the C API this package needs ({e})") from None
