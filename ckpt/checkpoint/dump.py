"""`ckpt dump`: freeze the target, read its state, snapshot its memory, let
it go, write the image.

Order: refuse what we can't save before touching the target; seize and
interrupt (no SIGSTOP is ever seen); read registers and /proc; inject the
few syscalls that read state only visible from inside; inject a clone that
gives a frozen copy-on-write copy of its memory (_Snapshot) and let the
target go on; write the image from that copy (zero-copy where it can:
splice.py) to a temp file and rename it;
kill the copy (the target reaps it, stopped again for a moment). Without a
snapshot (--kill, too much memory a fork does not copy, the clone failed)
the target stays stopped until the image is written. Whatever fails, the
target is detached and keeps running, and no file that looks like an image
is left behind.

Every thread is saved (registers, FPU state, masks, pending signals,
altstack, tid address, robust list, rseq, name, scheduling), and the
process-wide state a program relies on (signal actions, itimers,
timer_create timers, pdeathsig, dumpable, no_new_privs, child subreaper).
Not saved, on purpose: the session, process group and controlling
terminal. A restore is an exec: the restored process is the caller's
process and stays in the caller's session and process group, with the
caller's terminal (if any) on fds 0-2, like any program the caller starts.
Refused: child processes, seccomp filters, SCHED_DEADLINE threads, timers
on another task's CPU clock, and the fd and mapping kinds files.py and
memory.py name.
"""
from __future__ import annotations

import ctypes
import os
import select
import stat
import struct
import sys
import time
from dataclasses import dataclass

import blake3

from ..errors import CkptError, Status
from ..image import write_image
from ..image.model import (Creds, GeneralRegs, Header, Image, MMFields,
                           PosixTimer, Process, Rlimit, SigAction, Thread)
from ..image.record import replace
from . import memory, procfs, splice
from .files import FileTable, fd_table, mapped_file
from .tracee import TaskGone, Tracee, restarted_regs

SYS_BRK, SYS_RT_SIGACTION, SYS_SIGALTSTACK, SYS_PRCTL = 12, 13, 131, 157
SYS_GET_ROBUST_LIST = 274
SYS_GETITIMER, SYS_TIMER_GETTIME = 36, 224
PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_GET_CHILD_SUBREAPER = 2, 3, 37
PR_GET_TID_ADDRESS = 40
RED_ZONE = 128


@dataclass(frozen=True)
class DumpStats:
    pid: int
    bytes_written: int
    pages: int
    seconds: float
    frozen_seconds: float


def dump(pid: int, output: str, *, kill: bool = False,
         progress: bool | None = None, sign=None, zstd_level: int | None = None) -> DumpStats:
    t0 = time.monotonic()
    frozen = None
    _refuse_early(pid)
    threads = _Threads(pid)
    # Before the target stops: opening a FIFO waits for its reader.
    out = Output(output)
    snap = spliced = None
    try:
        threads.seize_main()
        threads.seize_all()
        _refuse_early(pid)          # again, now that it cannot change
        image = collect(pid, threads, vmflags=kill)
        if not kill:                # --kill: it never runs past the snapshot anyway
            snap = _Snapshot.take(pid, threads, image)
            if snap is None:        # dump frozen: the flags from the target, still stopped
                image = with_vmflags(image, procfs.smaps(pid))
        if snap is not None:
            threads.release()       # the target runs on; its pages are read from the copy
            frozen = time.monotonic() - t0
            image = snap.image or with_vmflags(image, procfs.smaps(snap.child.tid))
        vmas = list(image.vmas)
        show = _Progress(pid, sum(v.pages_saved for v in vmas) * memory.PAGE, progress)
        if snap is not None and zstd_level is None and splice.usable(out.file.fileno()):
            spliced = splice.SplicedPages.open(snap.child, threads.syscall_insn, vmas,
                                               snap.saved, show.update)
        pages = spliced or memory.read_pages(snap.child.tid if snap else pid, vmas,
                                             show.update, saved=snap.saved if snap else None,
                                             forked=snap is not None)
        written = write_image(out.file, image, pages, sign=sign, zstd_level=zstd_level)
        show.done()
        if snap is not None:
            snap.finish()
        out.commit()
        if kill:        # while still frozen: it never runs past the snapshot
            os.kill(pid, 9)
    except TaskGone:
        if snap is not None and snap.target_alive(0.2):
            raise snap.killed() from None
        raise CkptError(Status.TARGET_GONE,
                        f"process {pid} exited during the dump; no image written")
    except CkptError as e:
        if e.status == Status.TARGET_GONE and snap is not None and snap.target_alive(0.2):
            raise snap.killed() from None
        if e.status == Status.TARGET_GONE:
            raise CkptError(Status.TARGET_GONE, f"process {pid} exited during the "
                            "dump; no image written") from None
        raise
    except OSError as e:
        if not os.path.exists(procfs.path(pid)):
            raise CkptError(Status.TARGET_GONE,
                            f"process {pid} exited during the dump; no image written")
        raise CkptError(Status.OUTPUT, f"cannot write the image: {e.strerror or e}")
    finally:
        if spliced is not None:
            spliced.close()
        if snap is not None:
            snap.discard()
        out.discard()
        if frozen is None:
            frozen = time.monotonic() - t0
        threads.release()
    return DumpStats(pid, written, sum(v.pages_saved for v in image.vmas),
                     time.monotonic() - t0, frozen)


# --- the copy-on-write snapshot -----------------------------------------------------------

SYS_CLONE, SYS_WAIT4 = 56, 61
CLONE_FILES, CLONE_PTRACE = 0x400, 0x2000
WALL = 0x40000000
UNFORKED_LIMIT = 16 << 20       # bytes of unforked pages read while frozen, at most
BAD_STACK = 0x10                # the child's stack pointer: unmapped


class _Snapshot:
    """A frozen copy of the target's memory, so that the target runs on
    while its pages are written.

    While every thread is stopped (after collect() has read registers and
    every other piece of state), a clone() is injected into the main thread:
    a child process sharing nothing but copies of the mappings, copy-on-write
    (the fork costs ~50 ms per GiB of page tables: that is the stop). The
    target's threads are then let go and the page data is taken from the
    child, which never runs the program's code (it runs the dumper's
    vmsplice loop, splice.py, or is read through /proc/PID/mem):

    - CLONE_PTRACE: a task seized by us that clones gets a child attached to
      us from birth, which stops (PTRACE_EVENT_STOP) before its first
      instruction. It inherits the ptrace options of the target's thread,
      which has PTRACE_O_EXITKILL for the length of the injected clone only:
      if the dumper dies, the kernel kills the child instead of detaching
      it (a running copy of the program), even if we never learnt its pid.
      (The target itself would be killed only if the dumper died during
      that one injection, which would leave it wrecked anyway.) Besides,
      every signal is blocked in the child (inherited from the injection's
      mask) and its stack pointer is BAD_STACK: were it ever resumed, its
      first stack access would kill it (a fault on a blocked SIGSEGV is
      fatal).
    - exit_signal 0, not CLONE_PARENT: with CLONE_PARENT the target's
      parent (a shell, a supervisor) would get the child's SIGCHLD and a
      zombie it never made. With exit_signal 0 the target's parent is not
      involved and the target gets no SIGCHLD when the child dies; wait(),
      waitpid(-1, 0) in the target do not see such a child either (only
      __WALL/__WCLONE waits do). When we, its tracer, collect its death,
      the kernel leaves a zombie for its real parent, the target: so the
      target is stopped again (one thread, a few ms), the child killed and
      collected, and wait4(child, __WALL) injected into the target to reap
      it before it runs on. The target never runs while that zombie exists.
    - CLONE_FILES: the child shares the fd table instead of holding its own
      references to every open file, so a pipe or socket the target closes
      during the dump is really closed.
    - Not frozen in the child: MADV_DONTFORK areas (absent), MADV_WIPEONFORK
      areas (zero) and shared anonymous memory (the same pages). Their saved
      pages are read while the target is still stopped, up to
      UNFORKED_LIMIT; beyond that the whole dump runs frozen (no snapshot),
      as it does when the clone fails (RLIMIT_NPROC, pids cgroup, memory)
      and with --kill.
    A failure anywhere kills the child, has the target reap it and leaves
    the target running (dump()'s finally). Once the snapshot is taken, the
    target may even exit: the image is the process as it was stopped, and
    only the child's death (its pages unreadable) fails the dump."""

    def __init__(self, pid: int, pidfd: int, main: Tracee, insn: int, child: Tracee,
                 saved: dict[int, bytearray]):
        self.pid, self.pidfd, self.main, self.insn = pid, pidfd, main, insn
        self.child, self.saved = child, saved
        self.image: Image | None = None     # with VmFlags, if they had to be read
        self.done = False

    @classmethod
    def take(cls, pid: int, threads: _Threads, image: Image) -> _Snapshot | None:
        """Fork the stopped target; None where a snapshot can't be had.
        `image` may lack the VmFlags (collect(vmflags=False)): see _unforked."""
        pidfd = os.pidfd_open(pid)
        main = threads.tracees[pid]
        try:
            main.set_exitkill()     # inherited by the child: it dies with us, from birth
            try:
                ret = main.inject(threads.syscall_insn, SYS_CLONE,
                                  CLONE_PTRACE | CLONE_FILES, BAD_STACK, 0, 0, 0)
            finally:
                if main.attached:
                    main.set_exitkill(False)
        except BaseException:
            os.close(pidfd)
            raise
        if ret <= 0:
            os.close(pidfd)
            return None             # EAGAIN, ENOMEM: dump frozen instead
        snap = cls(pid, pidfd, main, threads.syscall_insn, Tracee(ret), {})
        try:
            ok = snap.child.wait_new_child()
            if ok:
                snap.child.set_exitkill()
                ok = snap._read_unforked(image)
        except TaskGone:
            ok = False
        except BaseException:
            snap.discard()
            raise
        if not ok:
            snap.discard()
            return None
        return snap

    def _read_unforked(self, image: Image) -> bool:
        """Find the mappings the child holds no frozen copy of and read
        their pages now, while the target is still stopped; False if they
        are more than UNFORKED_LIMIT.

        The VmFlags that say which (dc, wf) are in /proc/PID/smaps, whose
        reading walks every page table of the target (~45 ms per GiB, half
        of the stop). So the stopped target's plain maps were read instead,
        and the flags come from the child's smaps once the target runs on
        (fork copies every VMA with its flags, except MADV_DONTFORK ones).
        Here, cheaply: a mapping missing in the child's maps is
        MADV_DONTFORK (then the target's smaps are read after all, and
        self.image has the flags); one whose first saved page is not present
        in the child was wiped (MADV_WIPEONFORK, or a page the pagemap read
        could not tell was the zero page: read it now, no harm); shared
        anonymous memory is the same pages in both."""
        in_child = {(e.start, e.end) for e in procfs.maps(self.child.tid)}
        if all((v.start, v.end) in in_child for v in image.vmas):
            private = [v for v in image.vmas if v.runs and not (v.shared and v.kind == "anon")]
            present = memory.pages_present(self.child.tid, [v.runs[0].addr for v in private])
            wiped = {v.start for v, p in zip(private, present) if not p}
            unforked = [v for v in image.vmas if v.runs and (
                v.start in wiped or (v.shared and v.kind == "anon"))]
        else:
            self.image = with_vmflags(image, procfs.smaps(self.pid))
            unforked = [v for v in self.image.vmas if v.runs and memory.unforked(v)]
        if sum(v.pages_saved for v in unforked) * memory.PAGE > UNFORKED_LIMIT:
            return False
        for v in unforked:
            buf, off = bytearray(v.pages_saved * memory.PAGE), 0
            for chunk in memory.read_pages(self.pid, [v]):
                buf[off:off + len(chunk)] = chunk
                off += len(chunk)
            self.saved[v.start] = buf
        return True

    def killed(self) -> CkptError:
        return CkptError(Status.TARGET_GONE,
                         f"the copy-on-write snapshot of process {self.pid} (process "
                         f"{self.child.tid}) was killed during the dump; no image written")

    def target_alive(self, grace: float = 0) -> bool:
        """Whether the target still runs (after up to `grace` seconds: a
        SIGKILL to its process group reaches the child too, and may end it
        first)."""
        return not select.select([self.pidfd], [], [], grace)[0]

    def finish(self) -> None:
        """Kill the child and have the target reap it. A target that has
        exited since the snapshot does not spoil the image: it holds the
        process as it was when it was stopped, complete (the child, now
        someone else's, is killed all the same)."""
        self.done = True
        if not self.target_alive():
            self.child.kill()
            return
        self._reap()

    def discard(self) -> None:
        """After a failure (or finish): the same, quietly."""
        if not self.done:
            self.done = True
            try:
                self._reap()
            except (TaskGone, CkptError, OSError):
                pass
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def _still_syscall(self) -> bool:
        try:
            with open(procfs.path(self.pid, "mem"), "rb", buffering=0) as mem:
                mem.seek(self.insn)
                return mem.read(2) == b"\x0f\x05"
        except OSError:
            return False

    def _reap(self) -> None:
        main, again = self.main, not self.main.attached
        mask = None
        try:
            # Dying takes the child a while (it unmaps a copy of the whole
            # address space): let it die while the target runs. Its zombie
            # is visible to us alone until we collect it.
            self.child.kill(collect=False)
            if again:               # let go already: stop one thread again
                main = Tracee(self.pid)
                try:
                    main.seize()
                except CkptError:
                    raise TaskGone(self.pid) from None
                main.interrupt()
                mask = main.sigmask()
                main.setsigmask(~0 & (2**64 - 1))
            self.child.kill()       # collected: now a zombie of the target
            if self._still_syscall():
                # If the target exec'd or moved its vdso meanwhile, the zombie
                # stays for it to reap: never jump to an unknown instruction.
                main.inject(self.insn, SYS_WAIT4, self.child.tid, 0, WALL, 0)
        finally:
            self.child.kill()       # whatever failed above: never left behind
            if again:
                if mask is not None and main.attached:
                    main.setsigmask(mask)
                main.detach()


class _Threads:
    """Every thread of the target, seized and stopped (PTRACE_EVENT_STOP).

    /proc/PID/task is scanned again after each round of seizing until no
    new thread shows up: a thread not yet stopped may create others, but
    once every listed thread is stopped none can. While the dump injects
    syscalls every thread blocks all signals (PTRACE_SETSIGMASK), so a
    signal arriving meanwhile stays pending instead of being delivered
    (and lost) during a single-step; the saved masks are put back before
    detaching."""

    def __init__(self, pid: int):
        self.pid = pid
        self.tracees: dict[int, Tracee] = {}
        self.masks: dict[int, int] = {}
        self.syscall_insn = 0           # a `syscall` in the vdso (collect)

    def seize_main(self) -> None:
        t = Tracee(self.pid)
        t.seize()
        self.tracees[self.pid] = t

    def seize_all(self) -> None:
        self._stop(self.tracees[self.pid], main=True)
        while True:
            try:
                tids = {int(x) for x in os.listdir(procfs.path(self.pid, "task"))}
            except FileNotFoundError:
                raise TaskGone(self.pid) from None
            new = sorted(tids - self.tracees.keys())
            if not new:
                break
            for tid in new:
                t = Tracee(tid)
                if not t.seize(thread=True):
                    continue                # exited before we got to it
                self.tracees[tid] = t
                self._stop(t, main=False)
        for tid, t in self.tracees.items():
            self.masks[tid] = t.sigmask()
            t.setsigmask(~0 & (2**64 - 1))

    def _stop(self, t: Tracee, *, main: bool) -> None:
        try:
            t.interrupt()
        except TaskGone:
            if main:
                raise
            del self.tracees[t.tid]         # a thread that exited meanwhile

    def ordered(self) -> list[Tracee]:
        """The main thread first, then the others by id."""
        return [self.tracees[self.pid]] + [self.tracees[t] for t in sorted(self.tracees)
                                           if t != self.pid]

    def release(self) -> None:
        for tid, t in self.tracees.items():
            if tid in self.masks and t.attached:
                try:
                    t.setsigmask(self.masks[tid])
                except (TaskGone, OSError):
                    pass
            t.detach()


def _refuse_early(pid: int) -> None:
    try:
        tasks = os.listdir(procfs.path(pid, "task"))
    except FileNotFoundError:
        raise CkptError(Status.NO_PROCESS, f"no such process: {pid}")
    except PermissionError:
        raise CkptError(Status.PTRACE_DENIED, f"not allowed to read /proc/{pid}")
    try:
        state = procfs.status(pid).get("State", "")
    except FileNotFoundError:
        raise CkptError(Status.NO_PROCESS, f"no such process: {pid}")
    if state.startswith(("Z", "X")) and len(tasks) > 1:
        raise CkptError(Status.UNSUPPORTED_TARGET,
                        f"the main thread of process {pid} has exited (its other "
                        f"{len(tasks) - 1} thread(s) run on): a process without its "
                        "main thread cannot be restored")
    if state.startswith(("Z", "X")):
        # ptrace refuses a zombie with EPERM: say what it is, not "denied".
        raise CkptError(Status.NO_PROCESS, f"process {pid} has exited (a zombie "
                        "its parent has not reaped yet): nothing to dump")
    if procfs.status(pid).get("Seccomp", "0") != "0":
        raise CkptError(Status.UNSUPPORTED_TARGET,
                        f"process {pid} runs under a seccomp filter or strict mode "
                        "(/proc/PID/status Seccomp != 0): saving and restoring seccomp "
                        "filters is not supported")
    kids = procfs.children(pid)
    if kids:
        raise CkptError(Status.UNSUPPORTED_TARGET,
                        f"process {pid} has child processes ({', '.join(map(str, kids))}):"
                        " process trees are not supported")


def collect(pid: int, threads: _Threads, *, vmflags: bool = True) -> Image:
    """Everything but the page data, as image records. Without `vmflags`,
    /proc/PID/maps instead of smaps (no page-table walk): each Vma's
    growsdown and advice are then left empty for with_vmflags()."""
    status = procfs.status(pid)
    mappings = memory.classify(procfs.smaps(pid) if vmflags else procfs.maps(pid))
    vdso = memory.read_vdso(pid, mappings)
    vdso_start = next(m.entry.start for m in mappings if m.name == "[vdso]")
    insn = vdso.find(b"\x0f\x05")
    if insn < 0:
        raise CkptError(Status.UNSUPPORTED_TARGET, "no syscall instruction in the vdso")
    tracees = threads.ordered()
    main = tracees[0]
    inside = _Inside(pid, main, vdso_start + insn)
    threads.syscall_insn = vdso_start + insn

    table = FileTable()
    runs = memory.page_runs(pid, mappings)
    vmas = tuple(memory.to_vma(m, r, mapped_file(table, pid, m.entry)
                               if m.kind == "file" else None)
                 for m, r in zip(mappings, runs))
    fds = tuple(fd_table(table, pid))

    mm = procfs.mm_fields(pid)
    mm["brk"] = inside.syscall(SYS_BRK, 0)
    ids = lambda key: tuple(int(x) for x in status[key].split())  # noqa: E731
    caps = {k: int(status[f"Cap{k.capitalize()}"], 16)
            for k in ("inh", "prm", "eff", "bnd", "amb")}
    process = Process(
        pid=pid, comm=procfs.read_text(pid, "comm").rstrip("\n"),
        exe=os.readlink(procfs.path(pid, "exe")),
        cmdline=tuple(x.decode(errors="replace") for x in
                      procfs.read_bytes(pid, "cmdline").split(b"\0")[:-1]),
        cwd=os.readlink(procfs.path(pid, "cwd")),
        umask=int(status.get("Umask", "022"), 8),
        personality=int(procfs.read_text(pid, "personality"), 16),
        creds=Creds(uids=ids("Uid"), gids=ids("Gid"), groups=ids("Groups"),
                    **{f"cap_{k}": v for k, v in caps.items()}),
        rlimits=tuple(Rlimit(*r) for r in procfs.rlimits(pid)),
        mm=MMFields(**mm), auxv=tuple(procfs.auxv(pid)),
        sigactions=inside.sigactions(int(status["SigCgt"], 16) | int(status["SigIgn"], 16)),
        shared_pending=tuple(main.pending(shared=True)),
        vdso_hash=blake3.blake3(vdso).digest(),
        itimers=inside.itimers(), timers=inside.timers(procfs.timers(pid)),
        pdeathsig=inside.prctl_int(PR_GET_PDEATHSIG),
        dumpable=inside.syscall(SYS_PRCTL, PR_GET_DUMPABLE),
        no_new_privs=status.get("NoNewPrivs", "0") != "0",
        child_subreaper=bool(inside.prctl_int(PR_GET_CHILD_SUBREAPER)),
    )
    records = []
    for t in tracees:
        ins = inside if t is main else _Inside(pid, t, vdso_start + insn)
        records.append(Thread(
            tid=t.tid, comm=procfs.read_text(pid, "task", str(t.tid), "comm").rstrip("\n"),
            regs=GeneralRegs(**restarted_regs(ins.saved_regs)),
            xstate=t.xstate(), sigmask=threads.masks[t.tid],
            pending=tuple(t.pending(shared=False)),
            altstack=ins.altstack(), tid_address=ins.tid_address(),
            robust_list=_robust_list(t.tid), rseq=t.rseq(), **_sched(t.tid),
        ))
    return Image(header=Header(1, 0, "x86_64", memory.PAGE), process=process,
                 threads=tuple(records), files=tuple(table.files), vmas=vmas, fds=fds)


def with_vmflags(image: Image, entries: list[procfs.MapsEntry]) -> Image:
    """`image` with each Vma's growsdown and advice from smaps `entries`
    (of the stopped target, or of its frozen copy) for the same range."""
    flags = {(e.start, e.end): e.vmflags for e in entries}
    try:
        vmas = tuple(replace(v, **memory.vma_flags(flags[v.start, v.end]))
                     for v in image.vmas)
    except KeyError as e:
        raise CkptError(Status.INTERNAL, f"mapping {e.args[0][0]:#x}-{e.args[0][1]:#x} "
                        "changed while the process was stopped") from None
    return replace(image, vmas=vmas)


class _Inside:
    """Syscalls run inside the stopped target, with a scratch buffer below
    its red zone (dead stack by the ABI; its bytes are put back anyway)."""

    def __init__(self, pid: int, tracee: Tracee, insn: int):
        self.pid, self.tracee, self.insn = pid, tracee, insn
        self.saved_regs = tracee.getregs()
        self.scratch = (self.saved_regs.rsp - RED_ZONE - 256) & ~15

    def syscall(self, nr: int, *args: int) -> int:
        return self.tracee.inject(self.insn, nr, *args)

    def _read_result(self, nr: int, size: int, *args: int) -> bytes:
        with open(procfs.path(self.pid, "mem"), "r+b", buffering=0) as mem:
            mem.seek(self.scratch)
            old = mem.read(size)
            try:
                ret = self.syscall(nr, *args)
                if ret < 0:
                    raise CkptError(Status.INTERNAL,
                                    f"injected syscall {nr} failed in {self.pid}: errno {-ret}")
                mem.seek(self.scratch)
                return mem.read(size)
            finally:
                mem.seek(self.scratch)
                mem.write(old)

    def sigactions(self, mask: int) -> tuple[SigAction, ...]:
        out = []
        for sig in range(1, 65):
            if sig in (9, 19) or not mask >> (sig - 1) & 1:
                continue
            raw = self._read_result(SYS_RT_SIGACTION, 32, sig, 0, self.scratch, 8)
            handler, flags, restorer, smask = struct.unpack("<4Q", raw)
            out.append(SigAction(sig, handler, flags, restorer, smask))
        return tuple(out)

    def altstack(self) -> tuple[int, int, int]:
        sp, flags, size = struct.unpack(
            "<QI4xQ", self._read_result(SYS_SIGALTSTACK, 24, 0, self.scratch))
        return sp, flags, size

    def itimers(self) -> tuple[tuple[int, int], ...]:
        out = []
        for which in range(3):
            i_s, i_us, v_s, v_us = struct.unpack(
                "<4q", self._read_result(SYS_GETITIMER, 32, which, self.scratch))
            out.append((i_s * 10**6 + i_us, v_s * 10**6 + v_us))
        return tuple(out)

    def timers(self, listed: list[dict]) -> tuple[PosixTimer, ...]:
        out = []
        for t in sorted(listed, key=lambda t: t["id"]):
            i_s, i_ns, v_s, v_ns = struct.unpack(
                "<4q", self._read_result(SYS_TIMER_GETTIME, 32, t["id"], self.scratch))
            if t["clock"] < 0 and t["clock"] >> 3 != -1:     # CPU clock of pid != 0
                raise CkptError(Status.UNSUPPORTED_TARGET,
                                f"process {self.pid} has timer {t['id']} on the CPU clock "
                                "of a given process or thread: not supported")
            out.append(PosixTimer(
                id=t["id"], clock=t["clock"], notify=t["notify"],
                signo=t["signo"] if t["notify"] != "none" else 0,
                value=t["value"], tid=t["tid"] if t["notify"] == "thread" else 0,
                interval_ns=i_s * 10**9 + i_ns, value_ns=v_s * 10**9 + v_ns))
        return tuple(out)

    def prctl_int(self, option: int) -> int:
        return struct.unpack("<i", self._read_result(SYS_PRCTL, 4, option, self.scratch))[0]

    def tid_address(self) -> int:
        return struct.unpack("<Q", self._read_result(
            SYS_PRCTL, 8, PR_GET_TID_ADDRESS, self.scratch))[0]


SCHED_DEADLINE = 6


def _sched(tid: int) -> dict[str, int]:
    policy = os.sched_getscheduler(tid)
    if policy & 0xFF == SCHED_DEADLINE:
        raise CkptError(Status.UNSUPPORTED_TARGET,
                        f"thread {tid} runs under SCHED_DEADLINE: not supported")
    return dict(sched_policy=policy, sched_priority=os.sched_getparam(tid).sched_priority,
                nice=os.getpriority(os.PRIO_PROCESS, tid))


def _robust_list(tid: int) -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    head, length = ctypes.c_uint64(), ctypes.c_size_t()
    if libc.syscall(SYS_GET_ROBUST_LIST, tid, ctypes.byref(head), ctypes.byref(length)):
        return 0, 0
    return head.value, length.value


class Output:
    """The image file: a temp file renamed into place only when complete
    (created with mode 0755 & ~umask: executable like a linker's output,
    but never writable by group or others, since nothing should write into
    an image and a mapped restore refuses one others could change), or
    written in place: stdout for `-o -`, an existing FIFO or device."""

    def __init__(self, path: str):
        self.path, self.tmp = path, None
        if path == "-":
            sys.stdout.flush()
            self.file = os.fdopen(sys.stdout.fileno(), "wb", buffering=0, closefd=False)
            _grow_pipe(self.file.fileno())
            return
        if _not_a_file(path):
            # A device or a FIFO (-o /dev/null, a named pipe): written like
            # `-o -`; renaming a temp file over it would replace the node.
            try:
                self.file = open(path, "wb", buffering=0)
            except OSError as e:
                raise CkptError(Status.OUTPUT, f"cannot open {path}: {e.strerror}")
            _grow_pipe(self.file.fileno())
            return
        directory, base = os.path.split(os.path.abspath(path))
        self.tmp = os.path.join(directory, f".{base}.{os.getpid()}.tmp")
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o755)
        except OSError as e:
            raise CkptError(Status.OUTPUT, f"cannot create {path}: {e.strerror}")
        self.file = os.fdopen(fd, "wb", buffering=0)

    def commit(self) -> None:
        if self.tmp is None:        # written in place (stdout's fd stays open)
            self.file.close()
            return
        try:
            os.fsync(self.file.fileno())
            self.file.close()
            os.rename(self.tmp, self.path)
        except OSError as e:
            raise CkptError(Status.OUTPUT, f"cannot write {self.path}: {e.strerror}")
        self.tmp = None

    def discard(self) -> None:
        self.file.close()
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def _not_a_file(path: str) -> bool:
    """Whether `path` exists and is neither a regular file nor a
    directory (nor a link to one)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


PIPE_SIZE = 1 << 20


def _grow_pipe(fd: int) -> None:
    """A pipe holds 64 KiB by default: each 4 MiB write would wait for the
    reader 64 times. Make it PIPE_SIZE, or as large as allowed."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            splice.grow_pipe(fd, PIPE_SIZE)
    except OSError:
        pass


class _Progress:
    """'ckpt: dumping PID: 120/1024 MiB' on a terminal, for dumps over 1 s."""

    def __init__(self, pid: int, total: int, enabled: bool | None):
        self.pid, self.total, self.done_bytes = pid, total, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = self.last = time.monotonic()
        self.shown = False

    def update(self, n: int) -> None:
        self.done_bytes += n
        now = time.monotonic()
        if self.enabled and now - self.start > 1 and now - self.last > 0.1:
            self.last, self.shown = now, True
            sys.stderr.write(f"\rckpt: dumping {self.pid}: {self.done_bytes >> 20}"
                             f"/{self.total >> 20} MiB")
            sys.stderr.flush()

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
