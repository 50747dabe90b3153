"""What `ckpt inspect` shows: a readelf-like text summary and a JSON form.

Images are untrusted: every string from one is escaped before it reaches a
terminal, so a crafted path can't emit control sequences.
"""
from __future__ import annotations

import time

from ..errors import printable
from . import format as fmt
from .model import Image
from .record import fields, is_record

_SIGNALS = ("HUP INT QUIT ILL TRAP ABRT BUS FPE KILL USR1 SEGV USR2 PIPE ALRM "
            "TERM STKFLT CHLD CONT STOP TSTP TTIN TTOU URG XCPU XFSZ VTALRM PROF "
            "WINCH IO PWR SYS").split()


def summarize(image: Image) -> str:
    h, p = image.header, image.process
    files = {f.id: f for f in image.files}
    saved = sum(v.pages_saved for v in image.vmas)
    page = h.page_size
    c = p.creds
    out = [f"ckpt image, format {h.version_major}.{h.version_minor}, {h.arch}, "
           f"page size {page}, flags {h.flags:#x}",
           f"  page data: {saved} pages ({_size(saved * page)}) at offset "
           f"{image.pages_offset}" + _stored(image),
           "  signed by " + (", ".join(_signer(b) for b in image.extra.get("signatures", ()))
                             or "- (not signed)") + "  (not verified: see ckpt verify)",
           "",
           "process",
           f"  pid {p.pid}  comm {printable(p.comm)}",
           f"  exe       {printable(p.exe)}",
           f"  cmdline   {' '.join(map(_arg, p.cmdline))}",
           f"  cwd       {printable(p.cwd)}",
           f"  umask     {p.umask:04o}  personality {p.personality:#x}",
           f"  uid       {' '.join(map(str, c.uids))}  (real effective saved fs)",
           f"  gid       {' '.join(map(str, c.gids))}",
           f"  groups    {' '.join(map(str, c.groups)) or '-'}",
           f"  caps      eff {c.cap_eff:#x}  prm {c.cap_prm:#x}  inh {c.cap_inh:#x}  "
           f"bnd {c.cap_bnd:#x}  amb {c.cap_amb:#x}",
           "  rlimits   " + (", ".join(f"{r.name} {_limit(r.soft)}/{_limit(r.hard)}"
                                        for r in p.rlimits) or "-"),
           f"  brk       {p.mm.start_brk:#x}-{p.mm.brk:#x}  stack {p.mm.start_stack:#x}",
           f"  auxv      {len(p.auxv)} entries"
           + (f"  vdso hash {p.vdso_hash.hex()}" if p.vdso_hash else ""),
           f"  prctl     pdeathsig {p.pdeathsig}  dumpable {p.dumpable}  "
           f"no_new_privs {int(p.no_new_privs)}  child_subreaper {int(p.child_subreaper)}",
           "  itimers   " + (", ".join(f"{n} {v / 1e6:g}s/{i / 1e6:g}s" for n, (i, v)
                                        in zip(("real", "virtual", "prof"), p.itimers) if v)
                             or "-"),
           "  timers    " + (", ".join(
               f"id {t.id} clock {t.clock} {t.notify}"
               + (f" {_signame(t.signo)}" if t.signo else "")
               + (f" to {t.tid}" if t.tid else "")
               + f" in {t.value_ns / 1e9:g}s every {t.interval_ns / 1e9:g}s"
               for t in p.timers) or "-"),
           "",
           f"threads ({len(image.threads)})",
           f"  {'tid':>7}  {'comm':16} {'state':26} {'rip':>18} {'rsp':>18} {'sigmask':>18}"]
    for t in image.threads:
        out.append(f"  {t.tid:>7}  {printable(t.comm):16} {_where(t.regs):26} {t.regs.rip:#18x} "
                   f"{t.regs.rsp:#18x} {t.sigmask:#018x}")

    out += ["", f"memory map ({len(image.vmas)} vmas, {saved} pages saved, "
                f"{_size(saved * page)})",
            f"  {'start-end':25} {'perm':4} {'offset':>8} {'pages':>7}  name"]
    for v in image.vmas:
        name = v.name or (files[v.file].path if v.file in files else "")
        notes = (["growsdown"] if v.growsdown else []) + list(v.advice)
        out.append(f"  {v.start:012x}-{v.end:012x} {v.prot}{'s' if v.shared else 'p'} "
                   f"{v.offset:08x} {v.pages_saved:>7}  {printable(name)}"
                   + (f"  [{', '.join(notes)}]" if notes else ""))
    out.append(f"  {'total':25} {'':4} {'':>8} {saved:>7}  ({_size(sum(v.size for v in image.vmas))} mapped)")

    out += ["", f"files ({len(image.files)})",
            f"  {'id':>5} {'kind':4} {'size':>12} {'mtime (UTC)':29}  path"]
    for f in image.files:
        out.append(f"  {f.id:>5} {f.kind:4} {f.size:>12} {_mtime(f.mtime_ns):29}  "
                   f"{printable(f.path)}" + (f"  build-id {f.build_id.hex()}" if f.build_id else ""))

    out += ["", f"fds ({len(image.fds)})",
            f"  {'fd':>5} {'mode':4} {'pos':>12}  file"]
    for d in image.fds:
        path = printable(files[d.file].path) if d.file in files else f"file {d.file}?"
        out.append(f"  {d.fd:>5} {d.access:4} {d.pos:>12}  {path}"
                   + (f"  [{', '.join(d.flags)}]" if d.flags else ""))

    out += ["", f"signal actions ({len(p.sigactions)} set)"]
    for s in p.sigactions:
        handler = {0: "SIG_DFL", 1: "SIG_IGN"}.get(s.handler, f"{s.handler:#x}")
        out.append(f"  {_signame(s.signo):12} handler {handler}  flags {s.flags:#x}  "
                   f"restorer {s.restorer:#x}  mask {s.mask:#x}")
    return "\n".join(out) + "\n"


# x86_64 numbers of the system calls a thread is usually found blocked in.
_SYSCALLS = {
    0: "read", 1: "write", 7: "poll", 16: "ioctl", 17: "pread64", 19: "readv",
    23: "select", 24: "sched_yield", 34: "pause", 35: "nanosleep", 43: "accept",
    44: "sendto", 45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 61: "wait4",
    65: "semop", 70: "msgrcv", 72: "fcntl", 128: "rt_sigtimedwait",
    130: "rt_sigsuspend", 202: "futex", 208: "io_getevents", 220: "semtimedop",
    230: "clock_nanosleep", 232: "epoll_wait", 247: "waitid", 270: "pselect6",
    271: "ppoll", 281: "epoll_pwait", 288: "accept4", 299: "recvmmsg",
    426: "io_uring_enter", 441: "epoll_pwait2", 449: "futex_waitv",
}


def _where(r) -> str:
    """What the thread was doing when it was stopped: in user code, in a
    system call the restore restarts (the dumper set rax = orig_rax and
    rip back over the syscall instruction), or returning from one."""
    if r.orig_rax == 2**64 - 1:
        return "running"
    name = _SYSCALLS.get(r.orig_rax, f"syscall {r.orig_rax}")
    return f"in {name} (restarts)" if r.rax == r.orig_rax else f"leaving {name}"


def to_json(image: Image) -> dict:
    """The image as plain dicts/lists/ints/strs; bytes become hex strings."""
    out = {f: _plain(getattr(image, f)) for f in fields(image) if f != "extra"}
    out["signatures"] = [dict(version=b.version, algorithm=b.algorithm, offset=b.offset,
                              public_key=b.body[:32].hex() if _known(b) else None)
                         for b in image.extra.get("signatures", ())]
    return out


def _known(block) -> bool:
    from .format import SIG_ED25519, SIG_VERSION
    return (block.version, block.algorithm) == (SIG_VERSION, SIG_ED25519)


def _signer(block) -> str:
    if not _known(block):
        return f"(block version {block.version}, algorithm {block.algorithm}: unknown)"
    from ..sign import fingerprint
    return fingerprint(block.body[:32])


def _plain(x):
    if is_record(x):
        return {f: _plain(getattr(x, f)) for f in fields(x)}
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).hex()
    if isinstance(x, (tuple, list)):
        return [_plain(e) for e in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


def _arg(s: str) -> str:
    """A cmdline argument, quoted when a space or quote would blur it."""
    s = printable(s)
    return s if s and not any(c in s for c in " \t'\"") else "'" + s.replace("'", "'\\''") + "'"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _limit(v: int) -> str:
    return "unlimited" if v == 2**64 - 1 else str(v)


def _mtime(ns: int) -> str:
    sec, frac = divmod(ns, 10**9)
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec)) + f".{frac:09d}"
    except (OverflowError, OSError, ValueError):
        return f"{ns} ns"


def _signame(n: int) -> str:
    if n <= len(_SIGNALS):
        return "SIG" + _SIGNALS[n - 1]
    return f"SIGRTMIN+{n - 34}" if n >= 34 else f"SIG{n}"


def _stored(image: Image) -> str:
    """How compressed page data is stored (format 1.1)."""
    if not image.header.flags & fmt.FLAG_ZSTD or not image.pages_length:
        return ""
    stored = image.extra.get("stored_length", 0)
    return (f", stored zstd-compressed: {_size(stored)} "
            f"({stored / image.pages_length:.0%})")
