"""Zero-copy page data: the snapshot's child hands its pages to a pipe
(vmsplice, in a loop the dumper puts in it), the dumper moves them from
there to the image (splice) and hashes a duplicate of them (tee) in
another thread.

The dumper never copies page data into its own memory: a pipe buffer made
by vmsplice refers to the child's page itself, and the child's pages never
change (the target's writes after the snapshot go to copies of its own).
splice to a file copies each page once into the file's page cache (what
write(2) does); splice to a pipe (`-o -`) moves the references on, and the
reader's read(2) is the only copy. The hashing thread reads the tee'd
duplicate: one copy, into a small reused buffer.

The child runs VMSPLICE_LOOP, not the program's code: a pipe holds 1 MiB
(/proc/sys/fs/pipe-max-size; root here lacks CAP_SYS_RESOURCE), and one
injected syscall per pipeful costs more ptrace round trips than the copy
it saves. The loop blocks in vmsplice while the pipe is full and traps
(int3) when done. Signals stay blocked in the child and it keeps its bad
stack pointer (the loop uses no stack). Like every injection, its return
to user mode may have the kernel update the main thread's rseq area in
the child's copy (cpu_id; rseq_cs cleared outside a critical section).

Used only for a snapshot (a frozen target would have to get pipe fds of
its own), uncompressed page data, and a regular file or pipe to write to.
Any failure to set it up leaves the copying path (memory.read_pages).
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator

from ..errors import CkptError, Status
from ..image.model import Vma
from . import memory, procfs
from .tracee import Tracee

SYS_MMAP, SYS_PIPE2, SYS_CLOSE_RANGE, SYS_PIDFD_GETFD = 9, 293, 436, 438
CLOSE_RANGE_UNSHARE = 2
PROT_RW, PROT_RX, MAP_PRIVATE_ANON = 3, 5, 0x22
PAGE = memory.PAGE
PIPE = 1 << 20
HASH_READ = 1 << 20

# vmsplice_loop.s, assembled (tests/test_dump_splice.py checks the bytes):
# rbx = struct iovec[r12], r13 = the pipe's write end; int3 with rax 0 once
# every byte is in the pipe, or, after closing the pipe, rax = -errno.
VMSPLICE_LOOP = bytes.fromhex(
    "4d85e4744bb8160100004489ef4889de4c89e24881fa000400007605ba000400004531d2"
    "0f054885c07e2a488b4b084839c872134829c84883c31049ffcc74104885c075e6ebb948"
    "010348294308ebb031c0ccebfb4989c6b8030000004489ef0f054c89f0ccebfd")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
_libc.tee.restype = ctypes.c_ssize_t
_libc.syscall.restype = ctypes.c_long


def usable(fd: int) -> bool:
    """Whether page data can be spliced to `fd`: a regular file or a pipe."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISFIFO(mode)


class SplicedPages:
    """The saved pages of `vmas`, in image order, for write_image's
    copy_into(): from the child by vmsplice, except the VMAs whose data was
    read while the target was stopped (`saved`) and those without read
    permission (vmsplice does not force access: read through
    /proc/PID/mem instead)."""

    def __init__(self, child: Tracee, insn: int, vmas: list[Vma],
                 saved: dict[int, bytes], progress: Callable[[int], None] | None):
        self.child, self.insn, self.saved = child, insn, saved
        self.progress = progress
        self.mem_fd = self.pipe_r = self.child_w = -1
        self.code = self.iovs = 0
        self.failed: list[tuple[int, int]] | None = None
        self.segments = list(_segments(vmas, saved))

    @classmethod
    def open(cls, child: Tracee, insn: int, vmas: list[Vma], saved: dict[int, bytes],
             progress: Callable[[int], None] | None = None) -> SplicedPages | None:
        """Give the child an fd table of its own holding just a pipe, and
        the loop; take the pipe's read end. None if anything refuses (the
        caller copies instead). Only once the child's maps have been read:
        they gain two mappings."""
        self = cls(child, insn, vmas, saved, progress)
        try:
            self._setup()
            return self
        except (OSError, _Refused):
            self.close()
            return None

    def _setup(self) -> None:
        call = self._call
        most = max((len(g) for g in self.segments if isinstance(g, list)), default=0)
        self.iovs = call(SYS_MMAP, 0, _pages(most * 16), PROT_RW, MAP_PRIVATE_ANON, -1, 0)
        self.code = call(SYS_MMAP, 0, PAGE, PROT_RX, MAP_PRIVATE_ANON, -1, 0)
        # CLONE_FILES: the child shares the target's fd table. Unsharing it
        # while closing everything gives it an empty table of its own: the
        # pipe below is never the target's, and the child holds no other file.
        call(SYS_CLOSE_RANGE, 0, 0xFFFFFFFF, CLOSE_RANGE_UNSHARE)
        call(SYS_PIPE2, self.iovs, os.O_CLOEXEC)
        self.mem_fd = os.open(procfs.path(self.child.tid, "mem"), os.O_RDWR | os.O_CLOEXEC)
        # Written through /proc/PID/mem, which may write where the child
        # may not: the loop's page is never writable and executable at once.
        if os.pwrite(self.mem_fd, VMSPLICE_LOOP, self.code) != len(VMSPLICE_LOOP):
            raise _Refused("short write of the loop")
        child_r, self.child_w = struct.unpack("<ii", os.pread(self.mem_fd, 8, self.iovs))
        pidfd = os.pidfd_open(self.child.tid)
        try:
            self.pipe_r = _libc.syscall(SYS_PIDFD_GETFD, pidfd, child_r, 0)
            if self.pipe_r < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd")
        finally:
            os.close(pidfd)
        os.set_inheritable(self.pipe_r, False)
        grow_pipe(self.pipe_r)

    def _call(self, nr: int, *args: int) -> int:
        """One syscall in the child (which never resumes: its registers
        need not be put back). Its death is left for _Snapshot to collect."""
        self.child.start_syscall(self.insn, nr, *args)
        ret = self.child.finish_syscall(reap=False)
        if ret < 0:
            raise _Refused(f"syscall {nr} in the snapshot's child: {os.strerror(-ret)}")
        return ret

    def close(self) -> None:
        for name in ("mem_fd", "pipe_r"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # -- write_image's protocol ----------------------------------------------------
    def copy_into(self, fd: int, update: Callable[[memoryview], None], name: str) -> int:
        """Write the page data at fd's position; update() sees every byte,
        in order, before this returns. Returns the bytes written."""
        hash_r, hash_w = os.pipe2(os.O_CLOEXEC)
        grow_pipe(hash_w)
        hasher = _HashThread(hash_r, update)
        mover = _Mover(self.pipe_r, fd, hash_w, name, self.progress)
        try:
            for seg in self.segments:
                if isinstance(seg, list):
                    self._vmsplice(seg, mover)
                    if self.failed:
                        for chunk in memory.read_ranges(self.child.tid, self.failed, forked=True):
                            mover.write(chunk)
                elif isinstance(seg, Vma):
                    for chunk in memory.read_pages(self.child.tid, [seg], forked=True):
                        mover.write(chunk)
                else:
                    mover.write(seg)
        finally:
            os.close(hash_w)        # the hashing thread sees the end
            hasher.join()
        hasher.raise_error()
        return mover.total

    def _vmsplice(self, iovs: list[tuple[int, int]], mover: _Mover) -> None:
        """The child splices `iovs` into the pipe while they are moved out.
        If its vmsplice fails (it should not: these pages are readable and
        present), self.failed is what is left of `iovs`, and from then on
        all of every group: the pipe is gone, the caller reads them."""
        if self.failed is not None:
            self.failed = iovs
            return
        before = mover.total
        os.pwrite(self.mem_fd, b"".join(struct.pack("<QQ", a, n) for a, n in iovs), self.iovs)
        self.child.start_code(self.code, rbx=self.iovs, r12=len(iovs), r13=self.child_w)
        ended = False
        try:
            mover.move(sum(n for _, n in iovs))
        except _PipeEnded:
            ended = True            # the child failed or died: finish_code says which
        ret = self.child.finish_code(reap=False)    # its death: see _Snapshot._reap
        if ret < 0 or ended:
            self.failed = _skip(iovs, mover.total - before)

def _skip(iovs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """`iovs` without their first n bytes."""
    out = []
    for addr, length in iovs:
        if n >= length:
            n -= length
        else:
            out.append((addr + n, length - n))
            n = 0
    return out


def _pages(n: int) -> int:
    return max(PAGE, -(-n // PAGE) * PAGE)


def _segments(vmas: list[Vma], saved: dict[int, bytes]
              ) -> Iterator[list[tuple[int, int]] | bytes | Vma]:
    """The page data in image order: lists of (addr, length) for the child
    to vmsplice, or bytes the dumper holds (read while the target was
    stopped: `saved`) or reads itself (VMAs without read permission:
    vmsplice does not force access like /proc/PID/mem does)."""
    group: list[tuple[int, int]] = []
    for vma in vmas:
        if vma.start in saved or (vma.runs and not vma.prot.startswith("r")):
            if group:
                yield group
                group = []
            yield saved.get(vma.start, vma)
            continue
        group += [(r.addr, r.count * PAGE) for r in vma.runs]
    if group:
        yield group


class _Refused(Exception):
    """The child would not set up the pipe."""


class _PipeEnded(Exception):
    """The child's pipe reached its end: the child failed or died."""


class _Mover:
    """Moves page data from the child's pipe to the image, a duplicate of
    it to the hashing thread first."""

    def __init__(self, pipe_r: int, out: int, hash_w: int, name: str,
                 progress: Callable[[int], None] | None):
        self.pipe_r, self.out, self.hash_w, self.name = pipe_r, out, hash_w, name
        self.progress = progress
        self.total = 0

    def move(self, n: int) -> None:
        while n:
            t = _libc.tee(self.pipe_r, self.hash_w, n, 0)
            if t == 0:
                raise _PipeEnded
            if t < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"tee of page data: {os.strerror(err)}")
            # tee copies from the head of the pipe without taking: take
            # exactly what it copied before the next tee.
            k = t
            while k:
                k -= self._out(lambda: os.splice(self.pipe_r, self.out, k))
            self._moved(t)
            n -= t

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = self._out(lambda: os.write(self.out, view))
            w = view[:n]
            while w.nbytes:
                w = w[os.write(self.hash_w, w):]
            view = view[n:]
            self._moved(n)

    def _moved(self, n: int) -> None:
        self.total += n
        if self.progress:
            self.progress(n)

    def _out(self, op: Callable[[], int]) -> int:
        try:
            n = op()
        except OSError as e:
            raise CkptError(Status.OUTPUT, f"{self.name}: cannot write image: "
                            f"{e.strerror or e}") from None
        if n <= 0:
            raise CkptError(Status.OUTPUT, f"{self.name}: cannot write image: "
                            "the output took nothing")
        return n


class _HashThread:
    """Reads the tee'd page data until the pipe's end and hashes it."""

    def __init__(self, fd: int, update: Callable[[memoryview], None]):
        self.fd, self.update, self.error = fd, update, None
        self.thread = threading.Thread(target=self._run, name="ckpt-hash", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = bytearray(HASH_READ)
        view = memoryview(buf)
        try:
            while True:
                n = os.readv(self.fd, [buf])
                if n == 0:
                    return
                self.update(view[:n])
        except BaseException as e:      # noqa: BLE001 -- raised again in the caller
            self.error = e
        finally:
            os.close(self.fd)           # a writer still waiting gets EPIPE

    def join(self) -> None:
        self.thread.join()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def grow_pipe(fd: int, want: int = PIPE) -> int:
    """Grow the pipe to `want` bytes, or as far as an unprivileged user
    may (/proc/sys/fs/pipe-max-size), never shrinking it; its size. Not
    allowed (pipe-user-pages-soft): left as it is."""
    size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    if size >= want:
        return size
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, want)
    except OSError:
        pass
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            limit = int(f.read())
        if limit > size:
            return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(want, limit))
    except (OSError, ValueError):
        pass
    return size
