"""The restore plan as Python values, and its encoder.

The launcher builds a `Plan` from a validated image; `encode` turns it into
the flat block the restorer stub consumes (restorer-stub/plan.h). Every
field is written at the offset and size the stub's own ELF reports
(`_stub.PLAN_ABI`, extracted at build time from a table compiled out of
plan.h), so plan.h is the only description of the layout.

`encode` also checks what the stub would only find out after the point of
no return (overlaps, fd ranges, table sizes) and raises CkptError with one
line; the plan is built by ckpt itself, so such a failure is a bug
(Status.INTERNAL), except where the image asks for something this stub
can't do (Status.UNSUPPORTED_STATE).
"""
from __future__ import annotations

from ckpt.errors import CkptError, Status
from ckpt.image.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

PAGE = 4096

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4

# plan_vma.flags (plan.h PV_*)
PV_SHARED = 0x1
PV_ANON = 0x2
PV_GROWSDOWN = 0x4

# plan_run.flags (plan.h PR_*)
PR_MAP = 0x1                # map the run from the image (mapped restore)

# plan_vma.advice (plan.h PA_*), and the image's names for them
PA_DONTFORK = 0x1
PA_DONTDUMP = 0x2
PA_WIPEONFORK = 0x4
PA_HUGEPAGE = 0x8
PA_NOHUGEPAGE = 0x10
PA_MERGEABLE = 0x20
ADVICE_BITS = {
    "dontfork": PA_DONTFORK, "dontdump": PA_DONTDUMP,
    "wipeonfork": PA_WIPEONFORK, "hugepage": PA_HUGEPAGE,
    "nohugepage": PA_NOHUGEPAGE, "mergeable": PA_MERGEABLE,
}

PLAN_MAGIC = 0x314E414C5054504B      # "KPTPLAN1"
PLAN_VERSION = 2
PLAN_AUXV_WORDS = 128
RSEQ_SIG = 0x53053053
SS_ONSTACK = 1
SS_DISABLE = 2
SIGKILL = 9
SIGSTOP = 19
MM_FIELDS = ("start_code", "end_code", "start_data", "end_data", "start_brk",
             "brk", "start_stack", "arg_start", "arg_end", "env_start",
             "env_end")
U64_MAX = 2**64 - 1


def prot_bits(rwx: str) -> int:
    """"r-x" -> PROT_READ | PROT_EXEC (the image's notation)."""
    return ((PROT_READ if "r" in rwx else 0) | (PROT_WRITE if "w" in rwx else 0)
            | (PROT_EXEC if "x" in rwx else 0))


@record
class PlanVma:
    start: int
    end: int
    offset: int                 # file offset (bytes); 0 for anonymous
    fd: int                     # launcher fd (>= fd_base), -1 if PV_ANON
    prot: int                   # final PROT_*
    flags: int                  # PV_*
    advice: int                 # PA_*
    # (addr, length, image offset) or (addr, length, image offset, PR_*)
    runs: tuple[tuple[int, ...], ...] = ()


@record
class PlanFd:
    src: int                    # launcher fd, >= fd_base
    dst: int                    # target fd, < fd_base
    cloexec: bool


@record
class PlanThread:
    tid: int
    fs_base: int
    gs_base: int
    tid_address: int
    robust_head: int
    robust_len: int
    rseq_addr: int              # 0: none
    rseq_len: int
    rseq_sig: int
    altstack_sp: int
    altstack_size: int
    altstack_flags: int         # SS_DISABLE: none
    frame_addr: int             # from sigframe.build_sigframe
    frame: bytes
    comm: bytes = b""           # thread name; b"": keep
    sched_policy: int = -1      # -1: keep
    sched_priority: int = 0
    nice: int | None = None     # None: keep


@record
class PlanTimer:
    id: int
    clock: int
    notify: int                 # SIGEV_SIGNAL 0, SIGEV_NONE 1, SIGEV_THREAD_ID 4
    signo: int
    thread: int                 # SIGEV_THREAD_ID: thread index + 1, else 0
    value: int                  # sigev_value
    interval_ns: int
    value_ns: int


@record
class Plan:
    image_fd: int
    fd_base: int
    vmas: tuple[PlanVma, ...]
    fds: tuple[PlanFd, ...]
    threads: tuple[PlanThread, ...]
    sigactions: Mapping[int, tuple[int, int, int, int]]   # signo -> handler, flags, restorer, mask
    rlimits: tuple[tuple[int, int, int], ...]           # (resource, cur, max)
    siginfo: tuple[tuple[int, int, bytes], ...]         # (signo, thread, info128); thread 0 = process
    mm: tuple[int, ...]                                 # 11 ints, MM_FIELDS order
    auxv: tuple[int, ...]                               # flat pairs incl. AT_NULL pair
    exe_fd: int = -1
    personality: int = -1
    umask: int = 0o22
    comm: bytes = b""
    vdso_dst: int = 0
    vdso_len: int = 0
    gadget_syscall_ret: int = 0
    gadget_sigreturn: int = 0
    stop_after_step: int = 0
    stop_status: int = 0
    new_tids: bool = False      # don't ask clone3 for the saved thread ids
    itimers: tuple[tuple[int, int], ...] = ()   # 3 x (interval_us, value_us); (): keep
    timers: tuple[PlanTimer, ...] = ()
    pdeathsig: int = -1         # -1: keep
    dumpable: int = -1          # -1: keep
    no_new_privs: bool = False
    child_subreaper: bool = False


# Each thread but the first gets a block of the stub region: its stub stack
# (the stub's fault handler may run there with a full XSAVE frame).
THREAD_BLOCK = 32 << 10
PT_NEW_TIDS = 0x1


def _bug(msg: str) -> CkptError:
    return CkptError(Status.INTERNAL, f"restore plan: {msg}")


def _overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


class _Layout:
    """Writes plan.h structs into a bytearray using the extracted ABI."""

    def __init__(self, abi: dict):
        self.structs = abi["structs"]
        self.consts = abi["consts"]

    def size(self, st: str) -> int:
        return self.structs[st]["size"]

    def put(self, buf: bytearray, base: int, st: str, name: str, value,
            index: int = 0) -> None:
        off, elem, count = self.structs[st]["fields"][name]
        if not 0 <= index < count:
            raise _bug(f"{st}.{name}[{index}] out of range")
        pos = base + off + index * elem
        if isinstance(value, (bytes, bytearray)):
            if elem != 1 or len(value) > count - index:
                raise _bug(f"{st}.{name}: {len(value)} bytes do not fit")
            buf[pos:pos + len(value)] = value
            return
        value = int(value)
        bits = 8 * elem
        if not -(1 << (bits - 1)) <= value < (1 << bits):
            raise _bug(f"{st}.{name} = {value:#x} does not fit {elem} bytes")
        buf[pos:pos + elem] = (value & ((1 << bits) - 1)).to_bytes(elem, "little")


def _abi() -> dict:
    from ckpt.restore import _stub        # generated by restorer-stub/build.py
    return _stub.PLAN_ABI


def _check(plan: Plan, *, stub_start: int, stub_len: int, vdso_cur: int,
           task_top: int) -> None:
    if not plan.threads:
        raise _bug("no threads")
    if plan.fd_base < 3 or plan.image_fd < plan.fd_base:
        raise _bug(f"image fd {plan.image_fd} below fd_base {plan.fd_base}")
    stub_end = stub_start + stub_len
    vdso_block = ((plan.vdso_dst, plan.vdso_dst + plan.vdso_len) if plan.vdso_dst
                  else (vdso_cur, vdso_cur + plan.vdso_len))
    prev_end = 0
    for i, v in enumerate(plan.vmas):
        where = f"VMA {i} {v.start:#x}-{v.end:#x}"
        if v.start % PAGE or v.end % PAGE or v.start >= v.end:
            raise _bug(f"{where} not page aligned or empty")
        if v.start < prev_end:
            raise _bug(f"{where} not sorted or overlaps the previous one")
        prev_end = v.end
        if v.end > task_top:
            raise _bug(f"{where} above the task size")
        if _overlaps(v.start, v.end, stub_start, stub_end):
            raise _bug(f"{where} overlaps the stub region")
        if vdso_block[1] > vdso_block[0] and _overlaps(v.start, v.end, *vdso_block):
            raise _bug(f"{where} overlaps the vdso block")
        if v.prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC):
            raise _bug(f"{where} prot {v.prot:#x}")
        if v.flags & ~(PV_SHARED | PV_ANON | PV_GROWSDOWN):
            raise _bug(f"{where} flags {v.flags:#x}")
        if v.advice & ~0x3F:
            raise _bug(f"{where} advice {v.advice:#x}")
        if v.flags & PV_ANON:
            if v.fd != -1:
                raise _bug(f"{where} is anonymous but has fd {v.fd}")
        elif v.fd < plan.fd_base or v.offset % PAGE or v.offset < 0:
            raise _bug(f"{where} fd {v.fd} / offset {v.offset:#x} invalid")
        for addr, length, off, *rest in v.runs:
            if length <= 0 or addr < v.start or addr + length > v.end or off < 0:
                raise _bug(f"{where} page run {addr:#x}+{length:#x} outside it")
            flags = rest[0] if rest else 0
            if flags & ~PR_MAP:
                raise _bug(f"{where} page run flags {flags:#x}")
            if flags & PR_MAP and ((addr | length | off) % PAGE
                                   or v.flags & (PV_SHARED | PV_GROWSDOWN)):
                raise _bug(f"{where} page run {addr:#x}+{length:#x} at {off:#x} "
                           "can't be mapped (unaligned, or a shared or stack VMA)")
    dsts = set()
    for f in plan.fds:
        if f.src < plan.fd_base or not 0 <= f.dst < plan.fd_base or f.dst in dsts:
            raise _bug(f"fd {f.src} -> {f.dst} outside the fd ranges "
                       f"(fd_base {plan.fd_base}) or duplicate")
        dsts.add(f.dst)
    for sig in plan.sigactions:
        if not 1 <= sig <= 64 or sig in (SIGKILL, SIGSTOP):
            raise _bug(f"sigaction for signal {sig}")
    if len(plan.mm) != len(MM_FIELDS):
        raise _bug(f"mm has {len(plan.mm)} fields, not {len(MM_FIELDS)}")
    a = plan.auxv
    if len(a) % 2 or len(a) > PLAN_AUXV_WORDS or len(a) < 2 or a[-2:] != (0, 0):
        raise _bug("auxv must be pairs ending with AT_NULL, at most "
                   f"{PLAN_AUXV_WORDS} words")
    for signo, thread, info in plan.siginfo:
        if not 1 <= signo <= 64 or not 0 <= thread <= len(plan.threads) \
                or len(info) != 128:
            raise _bug(f"queued signal {signo} for thread {thread}")
    if len(plan.itimers) not in (0, 3):
        raise _bug(f"{len(plan.itimers)} itimers (0 or 3)")
    for tm in plan.timers:
        if tm.notify not in (0, 1, 4) or not 0 <= tm.thread <= len(plan.threads) \
                or (tm.notify == 4) != (tm.thread > 0) or not 0 <= tm.signo <= 64:
            raise _bug(f"timer {tm.id}: notify {tm.notify} thread {tm.thread}")
    for t in plan.threads:
        fa, fl = t.frame_addr, len(t.frame)
        if fl < 48 or (fa + 8) % 16:
            raise _bug(f"thread {t.tid}: frame at {fa:#x} misaligned or short")
        if not any(v.start <= fa and fa + fl <= v.end and v.prot & PROT_WRITE
                   for v in plan.vmas):
            raise _bug(f"thread {t.tid}: signal frame {fa:#x}+{fl:#x} is not "
                       "inside one writable VMA")


def encode(plan: Plan, *, stub_start: int, stub_len: int,
           cur_rseq: tuple[int, int, int] | None, vdso_cur: int,
           vdso_park: int, task_top: int, thread_area: int = 0) -> bytes:
    """The plan block for the stub.

    cur_rseq: the launcher's own rseq registration (addr, len, sig) or None;
    vdso_cur: the launcher's [vvar] start (its block is plan.vdso_len long);
    vdso_park: vdso_len free bytes inside the stub region;
    thread_area: (len(threads) - 1) * THREAD_BLOCK free bytes inside it.
    """
    from ckpt.restore.sigframe import set_uc_stack

    _check(plan, stub_start=stub_start, stub_len=stub_len, vdso_cur=vdso_cur,
           task_top=task_top)
    L = _Layout(_abi())
    c = L.consts
    if (c["PLAN_MAGIC"], c["PLAN_VERSION"], c["PLAN_AUXV_WORDS"], c["PT_NEW_TIDS"],
            c.get("PR_MAP")) != (PLAN_MAGIC, PLAN_VERSION, PLAN_AUXV_WORDS, PT_NEW_TIDS,
                                 PR_MAP):
        raise _bug("plan.py constants differ from plan.h (rebuild the stub)")

    runs = [r for v in plan.vmas for r in v.runs]
    tables = [("vmas_off", "plan_vma", len(plan.vmas)),
              ("runs_off", "plan_run", len(runs)),
              ("fds_off", "plan_fd", len(plan.fds)),
              ("rlimits_off", "plan_rlimit", len(plan.rlimits)),
              ("threads_off", "plan_thread", len(plan.threads)),
              ("siginfo_off", "plan_siginfo", len(plan.siginfo)),
              ("timers_off", "plan_timer", len(plan.timers))]
    pos = L.size("plan_header")
    offs = {}
    for key, st, n in tables:
        pos = (pos + 7) & ~7
        offs[key] = pos
        pos += n * L.size(st)
    frame_offs = []
    frames = []
    for t in plan.threads:
        pos = (pos + 63) & ~63
        frame_offs.append(pos)
        frame = bytearray(t.frame)
        set_uc_stack(frame, t.altstack_sp, t.altstack_flags, t.altstack_size)
        frames.append(frame)
        pos += len(frame)
    size = (pos + 7) & ~7
    buf = bytearray(size)

    H = "plan_header"
    put = L.put
    rseq = cur_rseq or (0, 0, 0)
    for name, value in (
            ("magic", PLAN_MAGIC), ("version", PLAN_VERSION),
            ("plan_size", size), ("stub_start", stub_start),
            ("stub_len", stub_len), ("cur_rseq_addr", rseq[0]),
            ("cur_rseq_len", rseq[1]), ("cur_rseq_sig", rseq[2]),
            ("vdso_cur", vdso_cur if plan.vdso_len else 0),
            ("vdso_len", plan.vdso_len), ("vdso_park", vdso_park),
            ("vdso_dst", plan.vdso_dst), ("task_top", task_top),
            ("image_fd", plan.image_fd), ("fd_base", plan.fd_base),
            ("nr_vmas", len(plan.vmas)), ("nr_runs", len(runs)),
            ("nr_fds", len(plan.fds)), ("nr_rlimits", len(plan.rlimits)),
            ("nr_threads", len(plan.threads)),
            ("nr_siginfo", len(plan.siginfo)),
            ("personality", plan.personality & U64_MAX),
            ("umask", plan.umask), ("comm", plan.comm[:15]),
            ("gadget_syscall_ret", plan.gadget_syscall_ret),
            ("gadget_sigreturn", plan.gadget_sigreturn),
            ("stop_after_step", plan.stop_after_step),
            ("stop_status", plan.stop_status),
            ("thread_area", thread_area if len(plan.threads) > 1 else 0),
            ("thread_block", THREAD_BLOCK),
            ("thread_flags", PT_NEW_TIDS if plan.new_tids else 0),
            ("nr_itimers", len(plan.itimers)), ("nr_timers", len(plan.timers)),
            ("pdeathsig", plan.pdeathsig), ("dumpable", plan.dumpable),
            ("no_new_privs", int(plan.no_new_privs)),
            ("child_subreaper", int(plan.child_subreaper))):
        put(buf, 0, H, name, value)
    for key, value in offs.items():
        put(buf, 0, H, key, value)

    sa_off, sa_size, _ = L.structs[H]["fields"]["sigactions"]
    for signo, (handler, flags, restorer, mask) in plan.sigactions.items():
        base = sa_off + (signo - 1) * sa_size
        for name, value in (("handler", handler), ("flags", flags),
                            ("restorer", restorer), ("mask", mask)):
            put(buf, base, "plan_sigaction", name, value)

    mm_off = L.structs[H]["fields"]["mm"][0]
    for name, value in zip(MM_FIELDS, plan.mm):
        put(buf, mm_off, "plan_mm", name, value)
    put(buf, mm_off, "plan_mm", "auxv", 0)          # the stub points it
    put(buf, mm_off, "plan_mm", "auxv_size", 8 * len(plan.auxv))
    put(buf, mm_off, "plan_mm", "exe_fd", plan.exe_fd & 0xFFFFFFFF)
    for i, word in enumerate(plan.auxv):
        put(buf, 0, H, "auxv", word & U64_MAX, i)

    sz = L.size("plan_vma")
    first = 0
    for i, v in enumerate(plan.vmas):
        base = offs["vmas_off"] + i * sz
        for name, value in (("start", v.start), ("end", v.end),
                            ("offset", v.offset), ("fd", v.fd),
                            ("prot", v.prot), ("flags", v.flags),
                            ("advice", v.advice), ("first_run", first),
                            ("nr_runs", len(v.runs))):
            put(buf, base, "plan_vma", name, value)
        first += len(v.runs)
    sz = L.size("plan_run")
    for i, (addr, length, off, *rest) in enumerate(runs):
        base = offs["runs_off"] + i * sz
        put(buf, base, "plan_run", "addr", addr)
        put(buf, base, "plan_run", "len", length)
        put(buf, base, "plan_run", "offset", off)
        put(buf, base, "plan_run", "flags", rest[0] if rest else 0)
    sz = L.size("plan_fd")
    for i, f in enumerate(plan.fds):
        base = offs["fds_off"] + i * sz
        put(buf, base, "plan_fd", "src", f.src)
        put(buf, base, "plan_fd", "dst", f.dst)
        put(buf, base, "plan_fd", "cloexec", int(bool(f.cloexec)))
    sz = L.size("plan_rlimit")
    for i, (res, cur, mx) in enumerate(plan.rlimits):
        base = offs["rlimits_off"] + i * sz
        put(buf, base, "plan_rlimit", "resource", res)
        put(buf, base, "plan_rlimit", "cur", cur & U64_MAX)
        put(buf, base, "plan_rlimit", "max", mx & U64_MAX)
    sz = L.size("plan_thread")
    for i, t in enumerate(plan.threads):
        base = offs["threads_off"] + i * sz
        for name, value in (
                ("tid", t.tid), ("fs_base", t.fs_base), ("gs_base", t.gs_base),
                ("tid_address", t.tid_address), ("robust_head", t.robust_head),
                ("robust_len", t.robust_len), ("rseq_addr", t.rseq_addr),
                ("rseq_len", t.rseq_len), ("rseq_sig", t.rseq_sig),
                ("altstack_sp", t.altstack_sp),
                ("altstack_size", t.altstack_size),
                ("altstack_flags", t.altstack_flags),
                ("frame_addr", t.frame_addr), ("frame_off", frame_offs[i]),
                ("frame_len", len(frames[i])), ("comm", t.comm[:15]),
                ("sched_policy", t.sched_policy), ("sched_priority", t.sched_priority),
                ("nice", t.nice or 0), ("set_nice", int(t.nice is not None))):
            put(buf, base, "plan_thread", name, value)
        buf[frame_offs[i]:frame_offs[i] + len(frames[i])] = frames[i]
    it_off, it_size, _ = L.structs[H]["fields"]["itimers"]
    for w, (interval_us, value_us) in enumerate(plan.itimers):
        base = it_off + w * it_size
        for name, value in (("interval_sec", interval_us // 10**6),
                            ("interval_usec", interval_us % 10**6),
                            ("value_sec", value_us // 10**6),
                            ("value_usec", value_us % 10**6)):
            put(buf, base, "plan_itimer", name, value)
    sz = L.size("plan_timer")
    for i, tm in enumerate(plan.timers):
        base = offs["timers_off"] + i * sz
        for name, value in (("id", tm.id), ("clock", tm.clock), ("notify", tm.notify),
                            ("signo", tm.signo), ("thread", tm.thread),
                            ("value", tm.value),
                            ("interval_sec", tm.interval_ns // 10**9),
                            ("interval_nsec", tm.interval_ns % 10**9),
                            ("value_sec", tm.value_ns // 10**9),
                            ("value_nsec", tm.value_ns % 10**9)):
            put(buf, base, "plan_timer", name, value)
    sz = L.size("plan_siginfo")
    for i, (signo, thread, info) in enumerate(plan.siginfo):
        base = offs["siginfo_off"] + i * sz
        put(buf, base, "plan_siginfo", "signo", signo)
        put(buf, base, "plan_siginfo", "thread", thread)
        put(buf, base, "plan_siginfo", "info", bytes(info))
    return bytes(buf)


def plan_struct_sizes() -> dict[str, int]:
    """sizeof of every plan.h struct, as the stub's ELF reports them."""
    return {k: v["size"] for k, v in _abi()["structs"].items()}


__all__ = [
    "PROT_NONE", "PROT_READ", "PROT_WRITE", "PROT_EXEC", "PV_SHARED", "PV_ANON",
    "PV_GROWSDOWN", "PR_MAP", "PA_DONTFORK", "PA_DONTDUMP", "PA_WIPEONFORK",
    "PA_HUGEPAGE", "PA_NOHUGEPAGE", "PA_MERGEABLE", "ADVICE_BITS",
    "PlanVma", "PlanFd", "PlanThread", "PlanTimer", "Plan", "encode", "prot_bits",
    "MM_FIELDS", "RSEQ_SIG", "SS_DISABLE", "THREAD_BLOCK",
]
