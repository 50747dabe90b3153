"""Files the process uses: mapped files and its fd table.

Each file is recorded with what identifies it (dev, inode, size, mtime,
build-id) so the restore can tell whether it is still the same file.
"""
from __future__ import annotations

import os
import stat

from ..buildid import build_id
from ..errors import CkptError, Status
from ..image.model import Fd, File
from . import procfs

# open(2) status flags as fdinfo shows them (octal), by image name.
O_FLAGS = {"append": 0o2000, "nonblock": 0o4000, "dsync": 0o10000,
           "direct": 0o40000, "largefile": 0o100000, "directory": 0o200000,
           "nofollow": 0o400000, "noatime": 0o1000000, "cloexec": 0o2000000,
           "sync": 0o4000000, "path": 0o10000000}
ACCESS = {0: "r", 1: "w", 2: "rw"}
# Character devices that are the same everywhere and safe to open again.
PORTABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random",
                    "/dev/urandom")


class FileTable:
    """Assigns ids to files, one record per (dev, inode)."""

    def __init__(self) -> None:
        self.files: list[File] = []
        self._ids: dict[tuple[int, int], int] = {}

    def add(self, path: str, st: os.stat_result, opener: str) -> int:
        key = (st.st_dev, st.st_ino)
        if key in self._ids:
            return self._ids[key]
        kind = ("reg" if stat.S_ISREG(st.st_mode) else
                "dir" if stat.S_ISDIR(st.st_mode) else "chr")
        bid = b""
        if kind == "reg":
            try:
                fd = os.open(opener, os.O_RDONLY)
            except OSError:
                fd = -1     # e.g. a write-only file; identity still checked
            if fd >= 0:
                try:
                    bid = build_id(fd)
                finally:
                    os.close(fd)
        file_id = len(self.files)
        self.files.append(File(id=file_id, path=path, kind=kind, dev=st.st_dev,
                               ino=st.st_ino, mode=st.st_mode, size=st.st_size,
                               mtime_ns=st.st_mtime_ns, rdev=st.st_rdev,
                               build_id=bid))
        self._ids[key] = file_id
        return file_id


def mapped_file(table: FileTable, pid: int, entry: procfs.MapsEntry) -> int:
    """The file behind a file mapping, checked to be the file mapped."""
    try:
        st = os.stat(entry.name)
    except OSError as e:
        raise CkptError(Status.UNSUPPORTED_TARGET,
                        f"mapped file {entry.name} cannot be found: {e.strerror}")
    if (st.st_dev, st.st_ino) != (entry.dev, entry.inode):
        raise CkptError(Status.UNSUPPORTED_TARGET,
                        f"mapped file {entry.name} was replaced since it was mapped")
    return table.add(entry.name, st, entry.name)


def fd_table(table: FileTable, pid: int) -> list[Fd]:
    """The process's open fds. 0-2 are recorded when they are files but
    never required: at restore they are the caller's. Anything else ckpt
    cannot reopen is refused by name."""
    fds = []
    for name in sorted(os.listdir(procfs.path(pid, "fd")), key=int):
        fd = int(name)
        link_path = procfs.path(pid, "fd", name)
        try:
            target = os.readlink(link_path)
            st = os.stat(link_path)
            info = procfs.fdinfo(pid, fd)
        except FileNotFoundError:
            continue                     # closed meanwhile (cannot happen while stopped)
        supported = target.startswith("/") and not target.endswith(" (deleted)") and (
            stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
            or (stat.S_ISCHR(st.st_mode) and target in PORTABLE_DEVICES))
        if not supported:
            if fd <= 2:
                continue
            raise CkptError(Status.UNSUPPORTED_TARGET,
                            f"cannot dump fd {fd}: {_describe(target, st)} is not supported")
        flags = int(info["flags"], 8)
        file_id = table.add(target, st, link_path)
        fds.append(Fd(fd=fd, file=file_id, access=ACCESS.get(flags & 3, "rw"),
                      flags=tuple(k for k, v in O_FLAGS.items() if flags & v == v),
                      pos=int(info.get("pos", 0))))
    return fds


def _describe(target: str, st: os.stat_result) -> str:
    if not target.startswith("/"):
        return f"a {target.split(':', 1)[0]} ({target})"    # a pipe (pipe:[123])
    if target.endswith(" (deleted)"):
        return f"a deleted file ({target})"
    kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else
            "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
    return f"{kind} ({target})"
