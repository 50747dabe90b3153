"""validate_image: what the kernel and the restorer will accept, checked
before the point of no return.

The reader (reader.py) enforces the format: types, ranges, sizes, order,
checksums. This module enforces meaning on an image that is well-formed:
every value the restorer hands to the kernel after the launcher is gone
(addresses it maps, registers it loads with rt_sigreturn, signals it
queues, ids it sets, fds it installs) must be one the kernel takes, so that
a hostile or damaged image fails here with one line instead of as a bare
SIGSEGV or a stub error after the launcher is unmapped. Values that are
the program's own business (a handler address it will jump to, the
contents of its memory) are not judged.

It depends only on the image; facts about this machine (its vdso, its
mmap_min_addr, its limits) are checked by ckpt.restore.
"""
from __future__ import annotations

import bisect

from ..errors import CkptError, Status
from . import format as fmt
from .model import Image, Vma

PAGE = fmt.PAGE_SIZE
TASK_SIZE = 0x7FFFFFFFF000          # end of the x86_64 user address space (4-level paging)
MIN_ADDR = PAGE                     # page 0 is never mapped; vm.mmap_min_addr is checked at launch
USER_CS, USER_DS = 0x33, 0x2B       # __USER_CS, __USER_DS (64-bit)
# EFLAGS a user thread may hold: CF, 1, PF, AF, ZF, SF, TF, IF, DF, OF, NT,
# RF, AC, VIF, VIP, ID. Not IOPL (privileged), VM (no vm86 in long mode) or
# the reserved bits 3, 5, 15, 22-63.
EFLAGS_ALLOWED = (1 << 0 | 1 << 1 | 1 << 2 | 1 << 4 | 1 << 6 | 1 << 7 | 1 << 8 | 1 << 9
                  | 1 << 10 | 1 << 11 | 1 << 14 | 1 << 16 | 1 << 18 | 1 << 19 | 1 << 20
                  | 1 << 21)
MAX_FD = (1 << 20) - 1              # fds must be below the kernel's default nr_open
NR_OPEN_MAX = 1073741816            # largest RLIMIT_NOFILE the kernel can allow (nr_open max)
UID_INVALID = 2**32 - 1             # (uid_t)-1 means "unchanged" to setresuid
MAX_AUXV = 27                       # pairs: saved_auxv holds 2 * AT_VECTOR_SIZE longs with AT_NULL
ROBUST_LIST_HEAD = 24               # sizeof(struct robust_list_head): set_robust_list wants it exactly
RSEQ_MIN, RSEQ_MAX, RSEQ_ALIGN = 32, 4096, 32
MINSIGSTKSZ = 2048
SCHED_POLICIES = (0, 1, 2, 3, 5, 6)   # OTHER, FIFO, RR, BATCH, IDLE, DEADLINE
SCHED_RESET_ON_FORK = 0x40000000
SS_ONSTACK, SS_DISABLE, SS_AUTODISARM = 1, 2, 1 << 31
# Room a signal frame needs below rsp: red zone, rt_sigframe, alignment,
# the XSAVE area and its end magic (see ckpt.restore.sigframe).
FRAME_FIXED = 128 + 440 + 64 + 16 + 8 + 4


def validate_image(image: Image, *, name: str = "<image>") -> None:
    """Raise CkptError(CORRUPT_IMAGE) with one line naming the first value
    the restorer could not carry out; return None if there is none."""
    try:
        _Validator(image).run()
    except fmt.Malformed as e:
        raise CkptError(Status.CORRUPT_IMAGE, f"{name}: corrupt image: {e}") from None


def problems(image: Image) -> str | None:
    """The first problem as text, or None (for tests and fuzzing)."""
    try:
        _Validator(image).run()
    except fmt.Malformed as e:
        return str(e)
    return None


def _bad(msg: str) -> fmt.Malformed:
    return fmt.Malformed(msg)


def _user_range(lo: int, hi: int) -> bool:
    return MIN_ADDR <= lo <= hi <= TASK_SIZE


class _Validator:
    def __init__(self, image: Image) -> None:
        self.image = image
        self.vmas = image.vmas
        self.starts = [v.start for v in image.vmas]

    def run(self) -> None:
        self.memory()
        self.process()
        for i, t in enumerate(self.image.threads):
            self.thread(i, t)
        self.files_and_fds()

    # -- helpers --------------------------------------------------------------------
    def vma_at(self, addr: int) -> Vma | None:
        """The VMA containing addr (VMAs are sorted and disjoint)."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and self.vmas[i].start <= addr < self.vmas[i].end:
            return self.vmas[i]
        return None

    def inside(self, lo: int, hi: int, want: str) -> bool:
        """[lo, hi) lies in one VMA whose prot has every letter of `want`."""
        v = self.vma_at(lo)
        return v is not None and hi <= v.end and all(c in v.prot for c in want)

    # -- memory ---------------------------------------------------------------------
    def memory(self) -> None:
        files = {f.id: f for f in self.image.files}
        special: dict[str, int] = {}
        for i, v in enumerate(self.vmas):
            where = f"vma {i} ({v.start:#x}-{v.end:#x})"
            if not _user_range(v.start, v.end):
                raise _bad(f"{where} is outside the user address space "
                           f"({MIN_ADDR:#x}-{TASK_SIZE:#x})")
            if v.kind == "file":
                f = files[v.file]
                if f.kind != "reg":
                    raise _bad(f"{where} maps file {f.id}, a {f.kind}, not a regular file")
                if v.offset + v.size > fmt.I64_MAX:
                    raise _bad(f"{where}: file offset {v.offset:#x} + size overflows")
                if v.shared and v.runs:
                    raise _bad(f"{where}: saved pages on a shared file mapping "
                               "(its file holds them)")
            if v.kind == "special":
                if v.name in special:
                    raise _bad(f"{where}: second {v.name} (first is vma {special[v.name]})")
                special[v.name] = i

    # -- process --------------------------------------------------------------------
    def process(self) -> None:
        p = self.image.process
        if not p.cwd.startswith("/") or "\0" in p.cwd:
            raise _bad(f"process: cwd {p.cwd[:80]!r} is not an absolute path without "
                       "NUL bytes")
        c = p.creds
        for what, ids in (("uids", c.uids), ("gids", c.gids), ("groups", c.groups)):
            if UID_INVALID in ids:
                raise _bad(f"process: creds: {what} contain {UID_INVALID} ((uid_t)-1 "
                           "is not an id)")
        for r in p.rlimits:
            if r.name == "nofile" and r.hard > NR_OPEN_MAX:
                raise _bad(f"process: rlimit nofile {r.hard} above the kernel's "
                           f"maximum {NR_OPEN_MAX}")
        mm = p.mm
        for field, value in vars(mm).items():
            if not MIN_ADDR <= value < TASK_SIZE:
                raise _bad(f"process: mm: {field} {value:#x} is outside the user "
                           "address space")
        if mm.start_code >= mm.end_code:
            raise _bad("process: mm: start_code must be below end_code")
        if len(p.auxv) > MAX_AUXV:
            raise _bad(f"process: auxv has {len(p.auxv)} entries; the kernel keeps "
                       f"at most {MAX_AUXV}")
        for s in p.sigactions:
            if s.handler > 1 and s.handler >= TASK_SIZE:
                raise _bad(f"process: sigaction {s.signo}: handler {s.handler:#x} is "
                           "not a user address")
            if s.restorer >= TASK_SIZE:
                raise _bad(f"process: sigaction {s.signo}: restorer {s.restorer:#x} "
                           "is not a user address")
        _siginfos(p.shared_pending, "process: shared_pending")
        tids = {t.tid for t in self.image.threads}
        for n, tm in enumerate(getattr(p, "timers", ())):
            if tm.notify != "none" and not 1 <= tm.signo <= 64:
                raise _bad(f"process: timers[{n}]: signal number {tm.signo}")
            if tm.notify == "thread" and tm.tid not in tids:
                raise _bad(f"process: timers[{n}]: signals tid {tm.tid}, not a thread "
                           "of the image")

    # -- threads --------------------------------------------------------------------
    def thread(self, i: int, t) -> None:
        where = f"thread {i} (tid {t.tid})"
        r = t.regs
        if r.cs != USER_CS:
            raise _bad(f"{where}: cs {r.cs:#x} is not the 64-bit user code segment "
                       f"({USER_CS:#x})")
        if r.ss != USER_DS:
            raise _bad(f"{where}: ss {r.ss:#x} is not the user data segment ({USER_DS:#x})")
        for seg in ("ds", "es", "fs", "gs"):
            v = getattr(r, seg)
            if v > 0xFFFF or (v and v & 3 != 3):
                raise _bad(f"{where}: {seg} {v:#x} is not a user segment selector")
        if r.eflags & ~EFLAGS_ALLOWED:
            raise _bad(f"{where}: eflags {r.eflags:#x} has bits a user thread can't "
                       f"hold ({r.eflags & ~EFLAGS_ALLOWED:#x})")
        for base in ("fs_base", "gs_base"):
            if getattr(r, base) >= TASK_SIZE:
                raise _bad(f"{where}: {base} {getattr(r, base):#x} is not a user address")
        v = self.vma_at(r.rip)
        if v is None or "x" not in v.prot:
            raise _bad(f"{where}: rip {r.rip:#x} is not in executable memory")
        need = FRAME_FIXED + len(t.xstate)
        if not (r.rsp >= need + MIN_ADDR and self.inside(r.rsp - need, r.rsp - 128, "w")):
            raise _bad(f"{where}: rsp {r.rsp:#x} leaves no room for a signal frame "
                       "in writable memory below it")
        _siginfos(t.pending, f"{where}: pending")
        policy = getattr(t, "sched_policy", 0)
        if policy & ~SCHED_RESET_ON_FORK not in SCHED_POLICIES:
            raise _bad(f"{where}: unknown scheduling policy {policy:#x}")
        prio = getattr(t, "sched_priority", 0)
        if not (1 <= prio <= 99 if policy & ~SCHED_RESET_ON_FORK in (1, 2) else prio == 0):
            raise _bad(f"{where}: scheduling priority {prio} for policy {policy:#x}")
        if not -20 <= getattr(t, "nice", 0) <= 19:
            raise _bad(f"{where}: nice {t.nice} outside -20..19")
        sp, flags, size = t.altstack
        if flags & ~(SS_ONSTACK | SS_DISABLE | SS_AUTODISARM):
            raise _bad(f"{where}: altstack flags {flags:#x}")
        if not flags & SS_DISABLE and (size < MINSIGSTKSZ or sp + size > TASK_SIZE):
            raise _bad(f"{where}: altstack {sp:#x}+{size:#x} is too small or not in "
                       "the user address space")
        if t.tid_address >= TASK_SIZE:
            raise _bad(f"{where}: tid_address {t.tid_address:#x} is not a user address")
        head, length = t.robust_list
        if length != ROBUST_LIST_HEAD or head >= TASK_SIZE:
            raise _bad(f"{where}: robust_list ({head:#x}, {length}) is not a user "
                       f"address with length {ROBUST_LIST_HEAD}")
        if t.rseq is not None:
            addr, length, _sig = t.rseq
            if not RSEQ_MIN <= length <= RSEQ_MAX or addr % RSEQ_ALIGN \
                    or not self.inside(addr, addr + length, "rw"):
                raise _bad(f"{where}: rseq area {addr:#x}+{length} is not an aligned "
                           "area of writable memory")

    # -- files and fds ------------------------------------------------------------------
    def files_and_fds(self) -> None:
        for i, f in enumerate(self.image.files):
            if not f.path.startswith("/") or "\0" in f.path:
                raise _bad(f"file {i}: path {f.path[:80]!r} is not an absolute path "
                           "without NUL bytes")
        for i, d in enumerate(self.image.fds):
            if d.fd > MAX_FD:
                raise _bad(f"fd {i}: fd {d.fd} is above {MAX_FD}")


def _siginfos(infos, where: str) -> None:
    for n, info in enumerate(infos):
        signo = int.from_bytes(info[:4], "little", signed=True)
        if not 1 <= signo <= 64:
            raise _bad(f"{where}[{n}]: signal number {signo}")
