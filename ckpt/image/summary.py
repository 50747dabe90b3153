"""What `ckpt inspect` shows: a readelf-like text summary and a JSON form.

Images are untrusted: every string from one is escaped before it reaches a
terminal, so a crafted path can't emit control sequences.
"""
from __future__ import annotations

import dataclasses
import time

from .model import Image

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
           f"{image.pages_offset}",
           "",
           "process",
           f"  pid {p.pid}  comm {_text(p.comm)}",
           f"  exe       {_text(p.exe)}",
           f"  cmdline   {' '.join(map(_arg, p.cmdline))}",
           f"  cwd       {_text(p.cwd)}",
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
           "",
           f"threads ({len(image.threads)})",
           f"  {'tid':>7}  {'comm':16} {'rip':>18} {'rsp':>18} {'sigmask':>18}"]
    for t in image.threads:
        out.append(f"  {t.tid:>7}  {_text(t.comm):16} {t.regs.rip:#18x} {t.regs.rsp:#18x} "
                   f"{t.sigmask:#018x}")

    out += ["", f"memory map ({len(image.vmas)} vmas, {saved} pages saved, "
                f"{_size(saved * page)})",
            f"  {'start-end':25} {'perm':4} {'offset':>8} {'pages':>7}  name"]
    for v in image.vmas:
        name = v.name or (files[v.file].path if v.file in files else "")
        notes = (["growsdown"] if v.growsdown else []) + list(v.advice)
        out.append(f"  {v.start:012x}-{v.end:012x} {v.prot}{'s' if v.shared else 'p'} "
                   f"{v.offset:08x} {v.pages_saved:>7}  {_text(name)}"
                   + (f"  [{', '.join(notes)}]" if notes else ""))
    out.append(f"  {'total':25} {'':4} {'':>8} {saved:>7}  ({_size(sum(v.size for v in image.vmas))} mapped)")

    out += ["", f"files ({len(image.files)})",
            f"  {'id':>5} {'kind':4} {'size':>12} {'mtime (UTC)':29}  path"]
    for f in image.files:
        out.append(f"  {f.id:>5} {f.kind:4} {f.size:>12} {_mtime(f.mtime_ns):29}  "
                   f"{_text(f.path)}" + (f"  build-id {f.build_id.hex()}" if f.build_id else ""))

    out += ["", f"fds ({len(image.fds)})",
            f"  {'fd':>5} {'mode':4} {'pos':>12}  file"]
    for d in image.fds:
        path = _text(files[d.file].path) if d.file in files else f"file {d.file}?"
        out.append(f"  {d.fd:>5} {d.access:4} {d.pos:>12}  {path}"
                   + (f"  [{', '.join(d.flags)}]" if d.flags else ""))

    out += ["", f"signal actions ({len(p.sigactions)} set)"]
    for s in p.sigactions:
        handler = {0: "SIG_DFL", 1: "SIG_IGN"}.get(s.handler, f"{s.handler:#x}")
        out.append(f"  {_signame(s.signo):12} handler {handler}  flags {s.flags:#x}  "
                   f"restorer {s.restorer:#x}  mask {s.mask:#x}")
    return "\n".join(out) + "\n"


def to_json(image: Image) -> dict:
    """The image as plain dicts/lists/ints/strs; bytes become hex strings."""
    return {f.name: _plain(getattr(image, f.name))
            for f in dataclasses.fields(image) if f.name != "extra"}


def _plain(x):
    if dataclasses.is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).hex()
    if isinstance(x, (tuple, list)):
        return [_plain(e) for e in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


def _text(s: str) -> str:
    """s with non-printable characters escaped; bytes that were not UTF-8
    (decoded as surrogates) shown as \\xNN."""
    if s.isprintable():
        return s
    out = []
    for ch in s:
        o = ord(ch)
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        else:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000
                       else f"\\U{o:08x}")
    return "".join(out)


def _arg(s: str) -> str:
    """A cmdline argument, quoted when a space or quote would blur it."""
    s = _text(s)
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
