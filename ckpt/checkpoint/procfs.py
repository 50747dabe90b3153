"""Readers for /proc/PID: plain parsing, no policy.

Every function takes the pid and returns plain values; the dumper decides
what they mean for the image.
"""
from __future__ import annotations

import os
import resource
import struct
from dataclasses import dataclass

from ..image.model import RLIM_INFINITY

# Field order of prlimit resources as the image names them.
RLIMITS = {
    "cpu": resource.RLIMIT_CPU, "fsize": resource.RLIMIT_FSIZE,
    "data": resource.RLIMIT_DATA, "stack": resource.RLIMIT_STACK,
    "core": resource.RLIMIT_CORE, "rss": resource.RLIMIT_RSS,
    "nproc": resource.RLIMIT_NPROC, "nofile": resource.RLIMIT_NOFILE,
    "memlock": resource.RLIMIT_MEMLOCK, "as": resource.RLIMIT_AS,
    "locks": 10, "sigpending": resource.RLIMIT_SIGPENDING,
    "msgqueue": resource.RLIMIT_MSGQUEUE, "nice": resource.RLIMIT_NICE,
    "rtprio": resource.RLIMIT_RTPRIO, "rttime": resource.RLIMIT_RTTIME,
}


def path(pid: int, *parts: str) -> str:
    return "/".join((f"/proc/{pid}",) + parts)


def read_text(pid: int, *parts: str) -> str:
    with open(path(pid, *parts)) as f:
        return f.read()


def read_bytes(pid: int, *parts: str) -> bytes:
    with open(path(pid, *parts), "rb") as f:
        return f.read()


def status(pid: int, tid: int | None = None) -> dict[str, str]:
    parts = ("task", str(tid), "status") if tid else ("status",)
    out = {}
    for line in read_text(pid, *parts).splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat split into fields; fields[0] is field 1 (pid).
    comm may hold spaces and parentheses: split after the last ')'."""
    text = read_text(pid, "stat")
    head, _, tail = text.rpartition(")")
    pid_s, _, comm = head.partition(" (")
    return [pid_s, comm] + tail.split()


def mm_fields(pid: int) -> dict[str, int]:
    f = stat_fields(pid)
    n = lambda i: int(f[i - 1])     # noqa: E731 -- field numbers as in proc(5)
    return dict(start_code=n(26), end_code=n(27), start_stack=n(28),
                start_data=n(45), end_data=n(46), start_brk=n(47),
                arg_start=n(48), arg_end=n(49), env_start=n(50), env_end=n(51))


def auxv(pid: int) -> list[tuple[int, int]]:
    raw = read_bytes(pid, "auxv")
    out = []
    for key, value in struct.iter_unpack("<QQ", raw[: len(raw) // 16 * 16]):
        if key == 0:
            break
        out.append((key, value))
    return out


def rlimits(pid: int) -> list[tuple[str, int, int]]:
    out = []
    for name, res in RLIMITS.items():
        soft, hard = resource.prlimit(pid, res)
        out.append((name, soft if soft >= 0 else RLIM_INFINITY,
                    hard if hard >= 0 else RLIM_INFINITY))
    return out


@dataclass(frozen=True)
class MapsEntry:
    start: int
    end: int
    perms: str          # "rwxp"
    offset: int
    dev: int            # st_dev form
    inode: int
    name: str
    vmflags: frozenset[str]


def smaps(pid: int) -> list[MapsEntry]:
    """Mappings with their VmFlags (two-letter codes, proc(5))."""
    entries: list[MapsEntry] = []
    head = None
    for line in read_text(pid, "smaps").splitlines():
        first = line.split(None, 1)[0] if line else ""
        if "-" in first and not first.endswith(":"):
            head = line
        elif first == "VmFlags:" and head is not None:
            entries.append(_maps_line(head, frozenset(line.split()[1:])))
            head = None
    return entries


def maps(pid: int) -> list[MapsEntry]:
    """Mappings without their VmFlags (empty): /proc/PID/maps, which unlike
    smaps does not walk every page table of the process."""
    return [_maps_line(line, frozenset()) for line in read_text(pid, "maps").splitlines()
            if line]


def _maps_line(line: str, vmflags: frozenset[str]) -> MapsEntry:
    parts = line.split(None, 5)
    start, end = (int(x, 16) for x in parts[0].split("-"))
    major, minor = (int(x, 16) for x in parts[3].split(":"))
    name = parts[5] if len(parts) > 5 else ""
    return MapsEntry(start, end, parts[1], int(parts[2], 16),
                     os.makedev(major, minor), int(parts[4]), name, vmflags)


def fdinfo(pid: int, fd: int) -> dict[str, str]:
    out = {}
    for line in read_text(pid, "fdinfo", str(fd)).splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for tid in os.listdir(path(pid, "task")):
        try:
            kids += [int(x) for x in read_text(pid, "task", tid, "children").split()]
        except FileNotFoundError:
            pass
    return kids


def timers(pid: int) -> list[dict]:
    """/proc/PID/timers: [{id, signo, value, notify, tid, clock}].

    notify is "signal" (SIGEV_SIGNAL), "thread" (SIGEV_THREAD_ID; tid is
    the thread) or "none" (SIGEV_NONE); the kernel shows SIGEV_THREAD_ID as
    "signal/tid.N"."""
    out: list[dict] = []
    cur: dict = {}
    for line in read_text(pid, "timers").splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "ID":
            cur = {"id": int(value)}
            out.append(cur)
        elif key == "signal":
            signo, _, sval = value.partition("/")
            cur["signo"], cur["value"] = int(signo), int(sval or "0", 16)
        elif key == "notify":
            mode, _, who = value.partition("/")
            kind, _, num = who.partition(".")
            cur["notify"] = ("thread" if kind == "tid" and mode == "signal" else
                             "none" if mode == "none" else "signal")
            cur["tid"] = int(num) if num.lstrip("-").isdigit() else 0
        elif key == "ClockID":
            cur["clock"] = int(value)
    return out
