"""Writing output files as the native library's write_file does (core/output_file.hpp): a
regular file is replaced whole or not at all (a temporary beside it, renamed over it; a symbolic
link is written through, also one whose file is not there yet), keeping its permission bits
and, where allowed, its owner and group; a device, pipe or FIFO is written directly (a FIFO
waits 5 s at most for a reader); a path that names one of this process's own descriptors
(/dev/stdout, /dev/fd/N, /proc/self/fd/N, or another name of the file behind descriptor 1 or 2)
is written through it as a stream."""
from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import sys
import time
from typing import Optional, Union

from ._errors import InvalidArgumentError, WriteFailedError

_OWN_FD = re.compile(r"/dev/(?:fd/(\d{1,9})|(stdin|stdout|stderr))|"
                     r"/proc/(self|thread-self|\d+)/fd/(\d{1,9})")
_STANDARD = {"stdin": 0, "stdout": 1, "stderr": 2}
_temporaries = itertools.count()
# The errors that say the file could not be written for lack of room (also of file
# descriptors) or an I/O error, not that the path was unusable (C's WriteFailed,
# spill.WriteFailedError).
NO_ROOM_OR_IO = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EMFILE,
                           errno.ENFILE})


def _own_descriptor(path: str) -> Optional[int]:
    m = _OWN_FD.fullmatch(path)
    fd: Optional[int] = None
    if m:
        if m.group(1) is not None:
            fd = int(m.group(1))
        elif m.group(2) is not None:
            fd = _STANDARD[m.group(2)]
        elif m.group(3) in ("self", "thread-self") or m.group(3) == str(os.getpid()):
            fd = int(m.group(4))
    if fd is not None:
        try:
            os.fstat(fd)
        except OSError:
            return None
        return fd
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    for d in (1, 2):
        try:
            s = os.fstat(d)
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            return d
    return None


def _link_target(path: str) -> str:
    """Where a write through ``path`` lands: links followed, also to a file not there yet."""
    for _ in range(40):
        try:
            link = os.readlink(path)
        except OSError:
            return path
        path = os.path.join(os.path.dirname(path), link)
    return path


def is_own_stream(path: str) -> bool:
    """Whether ``path`` names one of this process's own descriptors (written through it)."""
    return _own_descriptor(path) is not None


def write_error(e: OSError, message: str) -> Exception:
    """The spill exception for a failed write ``e``: WriteFailedError for no room or an I/O
    error (the file, not the input), else InvalidArgumentError (a path that cannot be used);
    ``message`` names the file."""
    text = f"{message}: {e.strerror or e}"
    if e.errno in NO_ROOM_OR_IO:
        return WriteFailedError(text)
    return InvalidArgumentError(text)


def flush_before(path: Union[str, bytes, "os.PathLike[str]"]) -> None:
    """Flushes sys.stdout and sys.stderr when ``path`` names one of this process's own
    descriptors, so that what Python printed there comes before what is written to it (also by
    the native library, which flushes only C's streams)."""
    if _own_descriptor(os.fsdecode(os.fspath(path))) is None:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_text(path: Union[str, bytes, "os.PathLike[str]"], text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` as described above; raises OSError naming the file
    when it cannot, and then a regular file keeps its previous contents and no temporary is
    left beside it."""
    p = os.fsdecode(os.fspath(path))
    try:
        _write_text(p, text)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), p) from e


def _temporary_beside(target: str) -> str:
    """``<target>.tmp-<pid>-<n>``; a name too long to take that suffix (file names end at 255
    bytes) gets ``.spill.tmp-<pid>-<n>`` in its directory instead (core/output_file.cpp)."""
    suffix = f".tmp-{os.getpid()}-{next(_temporaries)}"
    folder, name = os.path.split(target)
    if len(os.fsencode(name)) + len(suffix) <= 255:
        return target + suffix
    return os.path.join(folder, ".spill" + suffix)


# How long a FIFO's writer waits for a reader (core/output_file.cpp's kFifoWaitMs).
_FIFO_WAIT_S = 5


def _open_fifo(path: str) -> int:
    """A FIFO opened for writing once a reader has it open, waiting _FIFO_WAIT_S at most (one
    just starting still gets the text; a FIFO nobody reads fails instead of blocking for
    ever), and blocking again once open, so the text is written whole."""
    deadline = time.monotonic() + _FIFO_WAIT_S
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            if time.monotonic() >= deadline:
                raise OSError(errno.ENXIO, f"it is a FIFO with no reader (waited {_FIFO_WAIT_S} s)",
                              path) from None
            time.sleep(0.01)
            continue
        try:
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _write_text(p: str, text: str) -> None:
    data = text.encode("utf-8")
    fd = _own_descriptor(p)
    if fd is not None:
        flush_before(p)
        _write_all(fd, data)
        return
    target = _link_target(p)
    try:
        st: Optional[os.stat_result] = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISFIFO(st.st_mode):
            out = _open_fifo(target)
        else:
            out = os.open(target, os.O_WRONLY | os.O_CLOEXEC)  # a stream: no truncation
        try:
            _write_all(out, data)
        finally:
            os.close(out)
        return
    temporary = _temporary_beside(target)
    try:
        # Never wider than the file it replaces, even before its mode is copied.
        mode = 0o666 if st is None else stat.S_IMODE(st.st_mode) & 0o777
        out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as e:
        # A directory that takes no new file (no permission there) while the file itself may
        # still be writable: rewritten in place, unless the file system lacks the room for
        # the new text (the old file's blocks come back at the truncation). Anything else (a
        # full disk, no inode left) keeps the old file whole: before, it was rewritten in
        # place and cut short (review 38c).
        if st is None or e.errno not in (errno.EACCES, errno.EPERM):
            raise
        try:
            fs = os.statvfs(p)
            room = fs.f_bavail * fs.f_frsize + st.st_blocks * 512
        except (OSError, AttributeError):
            room = len(data)
        if room < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), p) from e
        with open(p, "wb") as f:
            f.write(data)
        return
    try:
        try:
            if st is not None:
                try:  # the owner first: a change of owner clears set-id bits
                    os.fchown(out, st.st_uid, st.st_gid)
                except OSError:
                    try:
                        os.fchown(out, -1, st.st_gid)
                    except OSError:
                        pass
                os.fchmod(out, stat.S_IMODE(st.st_mode))
            _write_all(out, data)
        finally:
            os.close(out)
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
