"""The target's address space: which VMAs, which of their pages to save.

A page is saved only if it exists and is not simply the file's: anonymous
pages that are present or swapped (but not the shared zero page), and
copy-on-write copies in private file mappings. Pages still backed by their
file, pages never touched or only read, and shared file mappings (the file
holds their data) are mapped again at restore.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..errors import CkptError, Status
from ..image.model import PageRun, Vma
from . import procfs

PAGE = 4096

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


def _has_runs(m: Mapping) -> bool:
    """Special mappings and shared file mappings never have saved pages."""
    return not (m.kind == "special" or (m.kind == "file" and m.shared))


def page_runs(pid: int, mappings: list[Mapping], *, scan: bool = True,
              skip_zero: bool = True) -> list[tuple[PageRun, ...]]:
    """For each mapping, the runs of pages to save.

    Found with the PAGEMAP_SCAN ioctl on /proc/PID/pagemap (a few calls per
    mapping, whatever its size), or, where the kernel has no such ioctl (or
    `scan` is false), by reading the pagemap in bounded pieces. With
    `skip_zero`, the scan also leaves out pages of anonymous mappings that
    are the shared zero page (read but never written): the image format
    restores an anonymous page that is in no run as zero (docs/image-format.md
    section 5). The pagemap read can't tell the zero page (its PFNs need
    CAP_SYS_ADMIN) and saves those pages as zeros: the same memory."""
    fd = os.open(procfs.path(pid, "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        scanner = _Scanner(fd) if scan else None
        result = []
        for m in mappings:
            runs: tuple[PageRun, ...] = ()
            if _has_runs(m) and scanner is not None:
                try:
                    runs = scanner.runs(m, skip_zero)
                except _NoScan:
                    scanner = None
            if _has_runs(m) and scanner is None:
                runs = _read_runs(fd, m)
            result.append(runs)
        return result
    finally:
        os.close(fd)


# PAGEMAP_SCAN, include/uapi/linux/fs.h (Linux 6.7+).
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGEMAP_SCAN = 0xC0606610          # _IOWR('f', 16, struct pm_scan_arg), 96 bytes
SCAN_REGIONS = 4096                # struct page_region (24 bytes) per call


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _NoScan(Exception):
    """This kernel has no PAGEMAP_SCAN."""


class _Scanner:
    def __init__(self, fd: int):
        self.fd = fd
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.vec = (ctypes.c_uint64 * (3 * SCAN_REGIONS))()
        self.arg = _ScanArg(size=ctypes.sizeof(_ScanArg), vec=ctypes.addressof(self.vec),
                            vec_len=SCAN_REGIONS)

    def runs(self, m: Mapping, skip_zero: bool) -> tuple[PageRun, ...]:
        """Present or swapped pages; of a private file mapping only those
        that are not the file's (copies made on write, or swapped)."""
        arg, file = self.arg, m.kind == "file"
        arg.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
        zero = PAGE_IS_PFNZERO if skip_zero and m.kind == "anon" else 0
        arg.category_inverted = arg.category_mask = zero      # "must not be the zero page"
        arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | (PAGE_IS_FILE if file else 0)
        runs: list[PageRun] = []
        lo, end = m.entry.start, m.entry.end
        run_start = run_end = -1
        while lo < end:
            arg.start, arg.end, arg.walk_end = lo, end, 0
            n = self.libc.ioctl(self.fd, ctypes.c_ulong(PAGEMAP_SCAN), ctypes.byref(arg))
            if n < 0:
                err = ctypes.get_errno()
                if err in (errno.ENOTTY, errno.EINVAL) and not runs and lo == m.entry.start:
                    raise _NoScan
                raise OSError(err, f"PAGEMAP_SCAN: {os.strerror(err)}")
            seen = lo
            for start, stop, cat in struct.iter_unpack(
                    "<3Q", ctypes.string_at(self.arg.vec, n * 24)):
                seen = max(seen, stop)
                if file and cat & PAGE_IS_FILE and not cat & PAGE_IS_SWAPPED:
                    continue            # still the file's page
                if start != run_end:
                    if run_end > 0:
                        runs.append(PageRun(run_start, (run_end - run_start) // PAGE))
                    run_start = start
                run_end = stop
            # Resume after the last region returned, even if walk_end says
            # less: Linux 6.18 returns every region of a walk whose internal
            # 512-entry buffer filled up, but a walk_end short of them (the
            # next call would report them again).
            if max(arg.walk_end, seen) <= lo:
                raise OSError(errno.EIO, "PAGEMAP_SCAN made no progress")
            lo = max(arg.walk_end, seen)
        if run_end > 0:
            runs.append(PageRun(run_start, (run_end - run_start) // PAGE))
        return tuple(runs)


# The pagemap read: one 8-byte entry per page, read PAGEMAP_CHUNK entries at
# a time; its top byte holds present (bit 63), swapped (62), file (61).
# Each top byte is mapped to 1 (save) or 0, and the runs of 1s are found by
# a regular expression: no per-page Python code.
PAGEMAP_CHUNK = 1 << 16
_SAVE_ANON = bytes(int(bool(b & 0xC0)) for b in range(256))
_SAVE_FILE = bytes(int(bool(b & 0x40 or (b & 0x80 and not b & 0x20))) for b in range(256))
_ONES = re.compile(b"\x01+")


def _read_runs(fd: int, m: Mapping) -> tuple[PageRun, ...]:
    table = _SAVE_FILE if m.kind == "file" else _SAVE_ANON
    runs: list[PageRun] = []
    first = m.entry.start // PAGE
    npages = (m.entry.end - m.entry.start) // PAGE
    for base in range(0, npages, PAGEMAP_CHUNK):
        count = min(PAGEMAP_CHUNK, npages - base)
        raw = os.pread(fd, count * 8, (first + base) * 8)
        if len(raw) != count * 8:
            raise OSError(errno.EIO, "short read of /proc/PID/pagemap")
        for mo in _ONES.finditer(raw[7::8].translate(table)):
            addr = m.entry.start + (base + mo.start()) * PAGE
            n = mo.end() - mo.start()
            if runs and runs[-1].addr + runs[-1].count * PAGE == addr:
                addr, n = runs[-1].addr, runs[-1].count + n
                runs.pop()
            runs.append(PageRun(addr, n))
    return tuple(runs)


def to_vma(m: Mapping, runs: tuple[PageRun, ...], file_id: int | None) -> Vma:
    e = m.entry
    prot = e.perms[:3]
    return Vma(start=e.start, end=e.end, prot=prot, shared=m.shared, kind=m.kind,
               name=e.name, file=file_id, offset=e.offset if m.kind == "file" else 0,
               runs=runs, **vma_flags(e.vmflags))


def vma_flags(vmflags: frozenset[str]) -> dict:
    """The Vma fields that come from smaps' VmFlags."""
    return dict(growsdown="gd" in vmflags,
                advice=tuple(v for k, v in ADVICE_FLAGS.items() if k in vmflags))


def pages_present(pid: int, addrs: list[int]) -> list[bool]:
    """Whether each page is present or swapped in pid (its pagemap entry)."""
    fd = os.open(procfs.path(pid, "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return [bool(struct.unpack("<Q", os.pread(fd, 8, a // PAGE * 8))[0] >> 62)
                for a in addrs]
    finally:
        os.close(fd)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


IOV_MAX = 1024
READ_CHUNK = 1 << 20
READ_BUFFERS = 3        # ring size: see read_pages


def unforked(vma: Vma) -> bool:
    """Whether a fork of the process holds no frozen copy of this mapping's
    pages: MADV_DONTFORK (absent in the child), MADV_WIPEONFORK (zero in
    the child), shared anonymous memory (the same pages, which the process
    goes on changing)."""
    return ("dontfork" in vma.advice or "wipeonfork" in vma.advice
            or (vma.shared and vma.kind == "anon"))


def read_pages(pid: int, vmas: list[Vma],
               progress: Callable[[int], None] | None = None, *,
               saved: dict[int, bytes] | None = None,
               forked: bool = False) -> Iterator[memoryview | bytes]:
    """The saved pages' bytes, in image order: memoryviews of up to
    READ_CHUNK bytes, each filled by one process_vm_readv (up to IOV_MAX
    runs at once) into a ring of READ_BUFFERS reused buffers.

    A chunk stays unchanged until READ_BUFFERS more chunks have been asked
    for: write_image asks for chunk n once chunk n - 3 is written (it reads
    and hashes in another thread while it writes).
    Memory process_vm_readv may not read (no read permission: it does not
    force access like /proc/PID/mem does) is read through /proc/PID/mem.
    A VMA whose start is in `saved` is not read: its page data, read
    earlier, is given as it is.

    `forked`: pid is a fork sharing its pages copy-on-write with another
    process. Then everything is read through /proc/PID/mem: process_vm_readv
    pins the pages it reads (FOLL_PIN), and pinning a shared anonymous page,
    even for reading, makes the kernel give the reader its own copy
    (FAULT_FLAG_UNSHARE): ~3x slower, and a second copy of the memory."""
    def pieces():
        for vma in vmas:
            if saved and vma.start in saved:
                yield saved[vma.start]
            else:
                yield from ((run.addr, run.count * PAGE) for run in vma.runs)
    return _read(pid, pieces(), progress, forked)


def read_ranges(pid: int, ranges: Iterable[tuple[int, int]], *,
                forked: bool = False) -> Iterator[memoryview]:
    """The bytes of (address, length) `ranges` of pid's memory, as
    read_pages reads them."""
    return _read(pid, ranges, None, forked)


def _read(pid: int, pieces: Iterable[tuple[int, int] | bytes],
          progress: Callable[[int], None] | None, forked: bool) -> Iterator[memoryview | bytes]:
    """read_pages: (address, length) pieces are read, bytes given as they are."""
    reader = _Reader(pid, vm_readv=not forked)
    batch: list[tuple[int, int]] = []
    size = 0

    def flush():
        nonlocal batch, size
        chunk = reader.read(batch, size)
        if progress:
            progress(size)
        batch, size = [], 0
        return chunk

    try:
        for piece in pieces:
            if not isinstance(piece, tuple):
                if batch:
                    yield flush()
                yield piece
                if progress:
                    progress(len(piece))
                continue
            addr, left = piece
            while left:
                n = min(left, READ_CHUNK - size)
                batch.append((addr, n))
                size += n
                addr += n
                left -= n
                if size == READ_CHUNK or len(batch) == IOV_MAX:
                    yield flush()
        if batch:
            yield flush()
    finally:
        reader.close()


class _Reader:
    def __init__(self, pid: int, vm_readv: bool = True):
        self.pid = pid
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.buffers: list[tuple[mmap.mmap, int]] = []
        self.next = 0
        self.remote = (_Iovec * IOV_MAX)()
        self.mem_fd = -1
        self.vm_readv = vm_readv

    def read(self, batch: list[tuple[int, int]], size: int) -> memoryview:
        if len(self.buffers) < READ_BUFFERS:
            buf = mmap.mmap(-1, READ_CHUNK)     # untouched until used, page-aligned
            self.buffers.append((buf, ctypes.addressof(ctypes.c_char.from_buffer(buf))))
        buf, base = self.buffers[self.next]
        self.next = (self.next + 1) % READ_BUFFERS
        view = memoryview(buf)[:size]
        if self.vm_readv:
            for i, (addr, n) in enumerate(batch):
                self.remote[i].base, self.remote[i].len = addr, n
            local = _Iovec(base, size)
            got = self.libc.process_vm_readv(self.pid, ctypes.byref(local), 1,
                                             self.remote, len(batch), 0)
            if got == size:
                return view
            err = ctypes.get_errno() if got < 0 else 0
            if err == errno.ESRCH:
                raise self._gone(batch[0][0])
            if err in (errno.ENOSYS, errno.EPERM):
                self.vm_readv = False
        off = 0
        try:
            if self.mem_fd < 0:
                self.mem_fd = os.open(procfs.path(self.pid, "mem"),
                                      os.O_RDONLY | os.O_CLOEXEC)
            for addr, n in batch:
                if os.preadv(self.mem_fd, [view[off:off + n]], addr) != n:
                    raise self._gone(addr)
                off += n
        except (FileNotFoundError, ProcessLookupError):
            raise self._gone(batch[0][0]) from None
        return view

    def _gone(self, addr: int) -> CkptError:
        return CkptError(Status.TARGET_GONE,
                         f"process {self.pid} exited during the dump (its memory "
                         f"at {addr:#x} became unreadable); no image written")

    def close(self) -> None:
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1
        # The buffers are left to the garbage collector: a chunk handed out
        # may still be referenced (an mmap with exports can't be closed).


def read_vdso(pid: int, mappings: list[Mapping]) -> bytes:
    for m in mappings:
        if m.name == "[vdso]":
            with open(procfs.path(pid, "mem"), "rb", buffering=0) as f:
                f.seek(m.entry.start)
                return f.read(m.entry.end - m.entry.start)
    return b""
