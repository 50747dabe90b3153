"""The image's intermediate representation: what a saved process *is*.

Plain frozen records (record.py: frozen dataclasses, minus their start-up
cost). The dumper builds them, the writer serialises them, the reader
returns them, the restorer consumes them. Nothing here is a raw
kernel flag word that could change meaning between kernels: protections are
"rwx" strings, file flags are names, mappings say what backs them.
"""
from __future__ import annotations

from .record import Default, record

RLIM_INFINITY = 2**64 - 1

# user_regs_struct order (x86_64); the image stores them by name.
GENERAL_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
    "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)

# Names used for Fd.flags (open(2) status flags that survive in fdinfo).
FD_FLAGS = ("append", "nonblock", "sync", "dsync", "direct", "noatime",
            "largefile", "directory", "nofollow", "path", "cloexec")

FILE_KINDS = ("reg", "dir", "chr")
TIMER_NOTIFY = ("signal", "none", "thread")   # SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID
VMA_KINDS = ("anon", "file", "special")
SPECIAL_NAMES = ("[vdso]", "[vvar]", "[vvar_vclock]")
ADVICE = ("dontfork", "dontdump", "wipeonfork", "hugepage", "nohugepage",
          "mergeable")


@record
class Header:
    version_major: int
    version_minor: int
    arch: str                   # "x86_64"
    page_size: int              # 4096
    flags: int = 0


@record
class Creds:
    uids: tuple[int, int, int, int]   # real, effective, saved, filesystem
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int


@record
class Rlimit:
    name: str                   # "nofile", "stack", ... (see schema)
    soft: int                   # RLIM_INFINITY for unlimited
    hard: int


@record
class MMFields:
    """The mm_struct fields prctl(PR_SET_MM_MAP) sets."""
    start_code: int
    end_code: int
    start_data: int
    end_data: int
    start_brk: int
    brk: int
    start_stack: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int


@record
class SigAction:
    signo: int                  # 1..64, never SIGKILL/SIGSTOP
    handler: int                # 0 = SIG_DFL, 1 = SIG_IGN, else an address
    flags: int                  # SA_* (a stable part of the Linux ABI)
    restorer: int
    mask: int                   # 64-bit signal set, bit n-1 = signal n


@record
class Process:
    pid: int
    comm: str
    exe: str
    cmdline: tuple[str, ...]
    cwd: str
    umask: int
    personality: int
    creds: Creds
    rlimits: tuple[Rlimit, ...]
    mm: MMFields
    auxv: tuple[tuple[int, int], ...]     # (type, value), AT_NULL excluded
    sigactions: tuple[SigAction, ...]     # only those that are not default
    shared_pending: tuple[bytes, ...] = ()   # siginfo_t (128 bytes) each
    vdso_hash: bytes = b""      # blake3 of the [vdso] pages: same kernel?
    # (interval_us, value_us) of ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF
    # (value: time left); () = not recorded.
    itimers: tuple[tuple[int, int], ...] = ()
    timers: tuple[PosixTimer, ...] = ()   # timer_create timers, by id
    pdeathsig: int = 0          # PR_SET_PDEATHSIG signal, 0 = none
    dumpable: int = 1           # PR_GET_DUMPABLE: 0, 1 or 2 (suid-safe)
    no_new_privs: bool = False
    child_subreaper: bool = False


@record
class GeneralRegs:
    r15: int; r14: int; r13: int; r12: int; rbp: int; rbx: int
    r11: int; r10: int; r9: int; r8: int; rax: int; rcx: int
    rdx: int; rsi: int; rdi: int; orig_rax: int; rip: int; cs: int
    eflags: int; rsp: int; ss: int; fs_base: int; gs_base: int
    ds: int; es: int; fs: int; gs: int


@record
class Thread:
    tid: int
    comm: str
    regs: GeneralRegs           # already adjusted for syscall restart
    xstate: bytes               # NT_X86_XSTATE (user ABI XSAVE layout)
    sigmask: int
    pending: tuple[bytes, ...]  # thread-private siginfo_t (128 bytes) each
    altstack: tuple[int, int, int]      # ss_sp, ss_flags, ss_size
    tid_address: int            # clear_child_tid
    robust_list: tuple[int, int]        # head, len
    rseq: tuple[int, int, int] | None   # addr, len, signature
    sched_policy: int = 0       # sched_getscheduler (SCHED_*, | SCHED_RESET_ON_FORK)
    sched_priority: int = 0     # sched_param.sched_priority (real-time policies)
    nice: int = 0               # getpriority(PRIO_PROCESS, tid)


@record
class File:
    id: int
    path: str
    kind: str                   # FILE_KINDS
    dev: int
    ino: int
    mode: int
    size: int
    mtime_ns: int
    rdev: int = 0
    build_id: bytes = b""       # GNU build-id of an ELF file, if any


@record
class PageRun:
    """`count` saved pages starting at `addr`; data lies at `data_offset`
    bytes into the page-data section (derived: runs are stored in order)."""
    addr: int
    count: int
    data_offset: int = 0


@record
class Vma:
    start: int
    end: int
    prot: str                   # "rwx" with "-" for absent rights
    shared: bool
    kind: str                   # VMA_KINDS
    name: str = ""              # path, "[heap]", "[stack]", "[vdso]", ...
    file: int | None = None     # File.id for kind == "file"
    offset: int = 0             # file offset in bytes
    growsdown: bool = False
    advice: tuple[str, ...] = ()        # ADVICE names
    runs: tuple[PageRun, ...] = ()

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def pages_saved(self) -> int:
        return sum(r.count for r in self.runs)


@record
class Fd:
    fd: int
    file: int                   # File.id
    access: str                 # "r", "w", "rw"
    flags: tuple[str, ...]      # FD_FLAGS names
    pos: int


@record
class Image:
    header: Header
    process: Process
    threads: tuple[Thread, ...]
    files: tuple[File, ...]
    vmas: tuple[Vma, ...]
    fds: tuple[Fd, ...]
    # Where page data starts in the image stream and how long it is; the
    # reader fills these in, the writer derives them.
    pages_offset: int = 0
    pages_length: int = 0
    extra: dict = Default(dict, compare=False)

    def file(self, file_id: int) -> File:
        for f in self.files:
            if f.id == file_id:
                return f
        raise KeyError(file_id)


@record
class PosixTimer:
    """A timer_create(2) timer of the process."""
    id: int                     # the timer id the program holds
    clock: int                  # clockid_t
    notify: str                 # TIMER_NOTIFY
    signo: int                  # 0 for "none"
    value: int                  # sigev_value (u64)
    tid: int                    # "thread": the thread it signals; else 0
    interval_ns: int
    value_ns: int               # time left until it fires; 0 = disarmed
