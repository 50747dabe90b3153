"""Turn a validated image and the files opened for it into the stub's plan.

Everything the stub needs is computed here, before the point of no return:
fd numbers, page-data offsets, signal frames, clamped rlimits, and the two
gadgets that let the stub unmap itself on the way out. With `mapped`, the
runs of the VMAs that can take it are marked PR_MAP: the stub maps them
from the image instead of copying them (mapped restore, see _mapped_vmas).
"""
from __future__ import annotations

import os
import resource

from ..errors import CkptError, Status
from ..image.model import GENERAL_REGS, RLIM_INFINITY, Image, Vma
from .files import OpenFiles
from .plan import (ADVICE_BITS, MM_FIELDS, PR_MAP, PV_ANON, PV_GROWSDOWN, PV_SHARED,
                   Plan, PlanFd, PlanThread, PlanTimer, PlanVma, prot_bits)
from .sigframe import build_sigframe

RLIMIT_NUMBERS = {
    "cpu": 0, "fsize": 1, "data": 2, "stack": 3, "core": 4, "rss": 5,
    "nproc": 6, "nofile": 7, "memlock": 8, "as": 9, "locks": 10,
    "sigpending": 11, "msgqueue": 12, "nice": 13, "rtprio": 14, "rttime": 15,
}
SYSCALL_RET = b"\x0f\x05\xc3"                            # syscall; ret
RESTORE_RT = b"\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05"     # mov $15,%rax; syscall
GADGET_SCAN_LIMIT = 16 << 20
CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE = 21, 40
MAP_COUNT_RESERVE = 64          # mappings left for the program itself


def build_plan(image: Image, files: OpenFiles, image_fd: int, *,
               mapped: bool = False, moved: dict[int, int] | None = None) -> Plan:
    """CKPT_NEW_TIDS=1 in the environment: give the threads new ids even
    where the saved ones could be had (tests use it for the fix-ups).
    mapped: map page data from image_fd (the caller checked the file can
    be trusted not to change, restore.check_mappable).
    moved: if given, receives {launcher fd: the plan's number for it}."""
    proc = image.process
    fd_base = max([2] + [fd.fd for fd in image.fds]) + 1
    if moved is None:
        moved = {}

    def high(fd: int) -> int:
        """The same open file at a number >= fd_base (dup kept until exec)."""
        if fd not in moved:
            moved[fd] = os.dup2(fd, _free_fd(fd_base, moved), inheritable=False)
        return moved[fd]

    to_map = _mapped_vmas(image) if mapped else set()
    vmas = tuple(_plan_vma(v, high(files.mapped[v.file]) if v.kind == "file" else -1,
                           image.pages_offset, n in to_map)
                 for n, v in enumerate(image.vmas) if v.kind != "special")
    fds = tuple(PlanFd(high(files.held[fd.fd]), fd.fd, "cloexec" in fd.flags)
                for fd in image.fds if fd.fd in files.held)
    dst, length = vdso_block(image.vmas)
    syscall_ret, restore_rt = find_gadgets(image, files)
    return Plan(
        image_fd=high(image_fd), fd_base=fd_base, vmas=vmas, fds=fds,
        threads=tuple(_plan_thread(t) for t in image.threads),
        sigactions={s: (0, 0, 0, 0) for s in range(1, 65) if s not in (9, 19)} | {
            a.signo: (a.handler, a.flags, a.restorer, a.mask) for a in proc.sigactions},
        rlimits=tuple(_rlimit(r.name, r.soft, r.hard) for r in proc.rlimits),
        siginfo=tuple((_signo(i), 0, i) for i in proc.shared_pending) + tuple(
            (_signo(i), n + 1, i) for n, t in enumerate(image.threads) for i in t.pending),
        mm=tuple(getattr(proc.mm, f) for f in MM_FIELDS),
        auxv=tuple(x for pair in proc.auxv for x in pair) + (0, 0),
        exe_fd=_exe_fd(image, files, high),
        personality=proc.personality, umask=proc.umask,
        comm=proc.comm.encode()[:15], vdso_dst=dst, vdso_len=length,
        gadget_syscall_ret=syscall_ret, gadget_sigreturn=restore_rt,
        new_tids=os.environ.get("CKPT_NEW_TIDS") == "1",
        itimers=proc.itimers, timers=_timers(image),
        pdeathsig=proc.pdeathsig, dumpable=min(proc.dumpable, 1) if proc.dumpable != 2 else 0,
        no_new_privs=proc.no_new_privs, child_subreaper=proc.child_subreaper,
    )


NOTIFY = {"signal": 0, "none": 1, "thread": 4}


def _timers(image: Image) -> tuple[PlanTimer, ...]:
    index = {t.tid: n + 1 for n, t in enumerate(image.threads)}
    out = []
    for tm in image.process.timers:
        thread = 0
        if tm.notify == "thread":
            if tm.tid not in index:
                raise CkptError(Status.CORRUPT_IMAGE,
                                f"timer {tm.id} signals thread {tm.tid}, which is not "
                                "in the image")
            thread = index[tm.tid]
        out.append(PlanTimer(tm.id, tm.clock, NOTIFY[tm.notify], tm.signo, thread,
                             tm.value, tm.interval_ns, tm.value_ns))
    return tuple(out)


def _free_fd(base: int, moved: dict[int, int]) -> int:
    fd = max([base - 1] + list(moved.values())) + 1
    while True:
        try:
            os.fstat(fd)
            fd += 1
        except OSError:
            return fd


def _mapped_vmas(image: Image) -> set[int]:
    """Indices (in image.vmas) of the VMAs whose runs are mapped from the image.

    Not a shared VMA (its pages must stay shared with later children), not
    the growsdown stack (a file mapping at its bottom could not grow, and
    /proc/PID/maps would no longer call it [stack]; it is small anyway),
    not a MADV_WIPEONFORK one (anonymous only). (An image on a noexec file
    system is refused before: restore.check_mappable.) Each mapped run
    splits its VMA: when that would pass vm.max_map_count, the VMAs with
    the most runs are copied instead."""
    cand = sorted((len(v.runs), n) for n, v in enumerate(image.vmas)
                  if v.runs and v.kind != "special" and not v.shared and not v.growsdown
                  and "wipeonfork" not in v.advice)
    budget = _max_map_count() - len(image.vmas) - MAP_COUNT_RESERVE
    extra = sum(2 * runs for runs, _ in cand)
    while cand and extra > budget:
        extra -= 2 * cand.pop()[0]
    return {n for _, n in cand}


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


def _plan_vma(v: Vma, fd: int, pages_offset: int, mapped: bool = False) -> PlanVma:
    flags = (PV_SHARED if v.shared else 0) | (PV_ANON if v.kind == "anon" else 0) | (
        PV_GROWSDOWN if v.growsdown else 0)
    advice = 0
    for name in v.advice:
        advice |= ADVICE_BITS.get(name, 0)
    return PlanVma(v.start, v.end, v.offset if v.kind == "file" else 0, fd,
                   prot_bits(v.prot), flags, advice,
                   tuple((r.addr, r.count * 4096, pages_offset + r.data_offset,
                          PR_MAP if mapped else 0) for r in v.runs))


def _plan_thread(t) -> PlanThread:
    regs = {name: getattr(t.regs, name) for name in GENERAL_REGS}
    frame_addr, frame = build_sigframe(regs, t.xstate, t.sigmask)
    rseq = t.rseq or (0, 0, 0)
    return PlanThread(
        tid=t.tid, fs_base=t.regs.fs_base, gs_base=t.regs.gs_base,
        tid_address=t.tid_address, robust_head=t.robust_list[0],
        robust_len=t.robust_list[1], rseq_addr=rseq[0], rseq_len=rseq[1],
        rseq_sig=rseq[2], altstack_sp=t.altstack[0], altstack_size=t.altstack[2],
        altstack_flags=t.altstack[1], frame_addr=frame_addr, frame=frame,
        comm=t.comm.encode(errors="surrogateescape")[:15],
        sched_policy=t.sched_policy, sched_priority=t.sched_priority, nice=t.nice)


def _rlimit(name: str, soft: int, hard: int) -> tuple[int, int, int]:
    """The saved limits, clamped to the caller's hard limit: restoring never
    raises a hard limit (that needs privilege the caller may not have)."""
    res = RLIMIT_NUMBERS[name]
    cur_hard = resource.getrlimit(res)[1]
    cur_hard = RLIM_INFINITY if cur_hard < 0 else cur_hard
    hard = min(hard, cur_hard)
    return res, min(soft, hard), hard


def _signo(info: bytes) -> int:
    return int.from_bytes(info[:4], "little")


def vdso_block(vmas: tuple[Vma, ...]) -> tuple[int, int]:
    """Start and length of the target's [vvar][vvar_vclock][vdso] block."""
    special = sorted((v for v in vmas if v.kind == "special"), key=lambda v: v.start)
    if not special:
        return 0, 0
    for a, b in zip(special, special[1:]):
        if a.end != b.start:
            raise CkptError(Status.UNSUPPORTED_STATE,
                            "the image's vdso and vvar are not contiguous")
    return special[0].start, special[-1].end - special[0].start


def find_gadgets(image: Image, files: OpenFiles) -> tuple[int, int]:
    """Addresses of `syscall; ret` and `__restore_rt` in the target's own
    executable file mappings (read from the files, not from saved pages; the
    stub checks the bytes again once they are mapped). libc first: it has
    both (glibc's __restore_rt), so a big executable such as python's is
    not read and searched in vain (~10 ms)."""
    found = {SYSCALL_RET: 0, RESTORE_RT: 0}
    libc = {f.id for f in image.files if "/libc.so" in f.path}
    for v in sorted(image.vmas, key=lambda v: v.file not in libc):
        if v.kind != "file" or "x" not in v.prot or v.runs:
            continue
        data = os.pread(files.mapped[v.file], min(v.size, GADGET_SCAN_LIMIT), v.offset)
        for pattern in found:
            if not found[pattern]:
                at = data.find(pattern)
                if at >= 0:
                    found[pattern] = v.start + at
        if all(found.values()):
            break
    if not all(found.values()):
        return 0, 0
    return found[SYSCALL_RET], found[RESTORE_RT]


def _exe_fd(image: Image, files: OpenFiles, high) -> int:
    """/proc/PID/exe can be set only with CAP_CHECKPOINT_RESTORE (or
    CAP_SYS_ADMIN); without it the link keeps naming the launcher. When the
    target's exe is the launcher's own (a Python program) it is already
    right, and the kernel would refuse anyway (EBUSY: old exe still mapped)."""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return -1
    if not (eff >> CAP_CHECKPOINT_RESTORE & 1 or eff >> CAP_SYS_ADMIN & 1):
        return -1
    for f in image.files:
        if f.path == image.process.exe and f.id in files.mapped:
            own, st = os.stat("/proc/self/exe"), os.fstat(files.mapped[f.id])
            if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino):
                return -1
            return high(files.mapped[f.id])
    return -1
