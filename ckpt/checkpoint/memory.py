"""The target's address space: which VMAs, which of their pages to save.

A page is saved only if it exists and is not simply the file's: anonymous
pages that are present or swapped, and copy-on-write copies in private file
mappings. Pages still backed by their file, pages never touched, and shared
file mappings (the file holds their data) are mapped again at restore.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import CkptError, Status
from ..image.model import PageRun, Vma
from . import procfs

PAGE = 4096
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61           # file page or shared-anon page
READ_CHUNK = 8 << 20

ADVICE_FLAGS = {"dc": "dontfork", "dd": "dontdump", "wf": "wipeonfork",
                "hg": "hugepage", "nh": "nohugepage", "mg": "mergeable"}
SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]")


@dataclass(frozen=True)
class Mapping:
    """A VMA as the dumper sees it, before pages are chosen."""
    entry: procfs.MapsEntry
    kind: str           # "anon", "file", "special"
    shared: bool

    @property
    def name(self) -> str:
        return self.entry.name


def classify(entries: list[procfs.MapsEntry]) -> list[Mapping]:
    """Sort each mapping into what the image can say about it, or refuse."""
    out = []
    for e in entries:
        shared = e.perms[3] == "s"
        name = e.name
        if name == "[vsyscall]":
            continue                # fixed, above the user address range
        if name in SPECIAL:
            out.append(Mapping(e, "special", False))
        elif name.startswith("/memfd:"):
            raise _unsupported(e, f"a memfd mapping ({name})")
        elif name.startswith("/dev/zero (deleted)"):
            out.append(Mapping(e, "anon", True))     # MAP_SHARED|MAP_ANONYMOUS
        elif name.endswith(" (deleted)"):
            raise _unsupported(e, f"a mapping of a deleted file ({name})")
        elif name.startswith("/SYSV"):
            raise _unsupported(e, "a System V shared memory segment")
        elif name.startswith("[anon_shmem:"):
            out.append(Mapping(e, "anon", True))
        elif e.inode == 0 and (not name or name.startswith("[")):
            if name and name not in ("[heap]", "[stack]") and not name.startswith("[anon:"):
                raise _unsupported(e, f"a special mapping {name}")
            out.append(Mapping(e, "anon", shared))
        elif name.startswith("/"):
            out.append(Mapping(e, "file", shared))
        else:
            raise _unsupported(e, f"a mapping of {name!r}")
    return out


def _unsupported(e: procfs.MapsEntry, what: str) -> CkptError:
    return CkptError(Status.UNSUPPORTED_TARGET,
                     f"cannot dump {e.start:x}-{e.end:x}: {what} is not supported")


def _saves(m: Mapping, entry: int) -> bool:
    if m.kind == "special" or (m.kind == "file" and m.shared):
        return False
    if m.kind == "file":                 # private file: only COW copies
        return bool(entry & PM_SWAP) or (bool(entry & PM_PRESENT) and not entry & PM_FILE)
    return bool(entry & (PM_PRESENT | PM_SWAP))


def page_runs(pid: int, mappings: list[Mapping]) -> list[tuple[PageRun, ...]]:
    """For each mapping, the runs of pages to save (from /proc/PID/pagemap)."""
    fd = os.open(procfs.path(pid, "pagemap"), os.O_RDONLY)
    try:
        result = []
        for m in mappings:
            if m.kind == "special" or (m.kind == "file" and m.shared):
                result.append(())
                continue
            npages = (m.entry.end - m.entry.start) // PAGE
            raw = os.pread(fd, npages * 8, m.entry.start // PAGE * 8)
            entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
            runs, start = [], None
            for i, ent in enumerate(entries):
                if _saves(m, ent):
                    if start is None:
                        start = i
                elif start is not None:
                    runs.append(PageRun(m.entry.start + start * PAGE, i - start))
                    start = None
            if start is not None:
                runs.append(PageRun(m.entry.start + start * PAGE, len(entries) - start))
            result.append(tuple(runs))
        return result
    finally:
        os.close(fd)


def to_vma(m: Mapping, runs: tuple[PageRun, ...], file_id: int | None) -> Vma:
    e = m.entry
    prot = e.perms[:3]
    return Vma(start=e.start, end=e.end, prot=prot, shared=m.shared, kind=m.kind,
               name=e.name, file=file_id, offset=e.offset if m.kind == "file" else 0,
               growsdown="gd" in e.vmflags,
               advice=tuple(v for k, v in ADVICE_FLAGS.items() if k in e.vmflags),
               runs=runs)


def read_pages(pid: int, vmas: list[Vma],
               progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """The saved pages' bytes, in image order, in large reads."""
    fd = os.open(procfs.path(pid, "mem"), os.O_RDONLY)
    try:
        for vma in vmas:
            for run in vma.runs:
                addr, left = run.addr, run.count * PAGE
                while left:
                    n = min(left, READ_CHUNK)
                    data = os.pread(fd, n, addr)
                    if len(data) != n:
                        raise CkptError(Status.TARGET_GONE,
                                        f"process {pid} exited during the dump (its memory "
                                        f"at {addr:#x} became unreadable); no image written")
                    yield data
                    if progress:
                        progress(n)
                    addr += n
                    left -= n
    finally:
        os.close(fd)


def read_vdso(pid: int, mappings: list[Mapping]) -> bytes:
    for m in mappings:
        if m.name == "[vdso]":
            with open(procfs.path(pid, "mem"), "rb", buffering=0) as f:
                f.seek(m.entry.start)
                return f.read(m.entry.end - m.entry.start)
    return b""
