"""Open, as the caller, every file the image needs, and check each one.

Mapped files must be the very file that was mapped: an ELF file with a
build-id must have the same build-id and size (so a library copied to
another machine with the same contents passes); any other file the same
size and mtime (a file mapped shared and writable only the same size:
the program's own writes change its mtime). Files held open (fds) need
only exist and open with the same flags: a log that grew is fine; one that shrank below the saved offset is
refused, since resuming past its end would leave a hole. Every problem is
collected and reported at once.
"""
from __future__ import annotations

import os
import stat

from ..buildid import build_id
from ..errors import CkptError, Status
from ..image.model import Fd, File, Image

O_FLAGS = {"append": os.O_APPEND, "nonblock": os.O_NONBLOCK, "dsync": os.O_DSYNC,
           "direct": getattr(os, "O_DIRECT", 0o40000), "directory": os.O_DIRECTORY,
           "nofollow": os.O_NOFOLLOW, "noatime": getattr(os, "O_NOATIME", 0o1000000),
           "sync": os.O_SYNC, "path": getattr(os, "O_PATH", 0o10000000)}
ACCESS = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}


class OpenFiles:
    """fds (in the launcher) of the files the image maps and holds open."""

    def __init__(self) -> None:
        self.mapped: dict[int, int] = {}      # File.id -> fd
        self.held: dict[int, int] = {}        # target fd number -> fd
        self.problems: list[str] = []
        self.flags: dict[int, int] = {}       # fd -> the open flags used (tickets)

    def close(self) -> None:
        for fd in list(self.mapped.values()) + list(self.held.values()):
            os.close(fd)
        self.mapped.clear()
        self.held.clear()


def open_files(image: Image) -> OpenFiles:
    files = OpenFiles()
    try:
        writable = {v.file for v in image.vmas if v.kind == "file" and v.shared and "w" in v.prot}
        for file_id in sorted({v.file for v in image.vmas if v.kind == "file"}):
            _open_mapped(files, image.file(file_id), file_id in writable)
        for fd in image.fds:
            if fd.fd > 2:               # 0-2 are the caller's, as with any exec
                _open_held(files, image.file(fd.file), fd)
        if files.problems:
            n = len(files.problems)
            raise CkptError(Status.FILE_CHANGED,
                            f"{n} file{'s' if n > 1 else ''} the image needs "
                            f"{'are' if n > 1 else 'is'} not as saved: "
                            + "; ".join(files.problems))
    except BaseException:
        files.close()
        raise
    return files


def _open(files: OpenFiles, f: File, flags: int) -> int | None:
    try:
        fd = os.open(f.path, flags | os.O_CLOEXEC)
    except OSError as e:
        files.problems.append(f"{f.path}: {e.strerror.lower()}")
        return None
    files.flags[fd] = flags
    return fd


def _open_mapped(files: OpenFiles, f: File, writable: bool) -> None:
    fd = _open(files, f, os.O_RDWR if writable else os.O_RDONLY)
    if fd is None:
        return
    st = os.fstat(fd)
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "no longer a regular file"
    elif st.st_size != f.size:
        why = f"size {st.st_size}, was {f.size}"
    elif f.build_id:
        if build_id(fd) != f.build_id:
            why = "ELF build-id differs"
    elif st.st_mtime_ns != f.mtime_ns and not writable:
        # A file the program maps shared and writable is its own live data:
        # it changes whenever the program (or the original, running on after
        # the dump) writes it, so only its size is checked.
        why = "modified since the dump"
    if why:
        os.close(fd)
        files.problems.append(f"{f.path}: {why}")
    else:
        files.mapped[f.id] = fd


def _open_held(files: OpenFiles, f: File, fd: Fd) -> None:
    flags = ACCESS[fd.access]
    for name in fd.flags:
        flags |= O_FLAGS.get(name, 0)
    if f.kind == "dir":
        flags |= os.O_DIRECTORY
    new = _open(files, f, flags)
    if new is None:
        return
    if f.kind == "reg" and "path" not in fd.flags:
        size = os.fstat(new).st_size
        if size < fd.pos:
            os.close(new)
            files.problems.append(f"{f.path}: shrank to {size} bytes, below the "
                                  f"saved offset {fd.pos} of fd {fd.fd}")
            return
    if fd.pos and "path" not in fd.flags:
        try:
            os.lseek(new, fd.pos, os.SEEK_SET)
        except OSError as e:
            os.close(new)
            files.problems.append(f"{f.path}: cannot seek fd {fd.fd}: {e.strerror}")
            return
    files.held[fd.fd] = new
