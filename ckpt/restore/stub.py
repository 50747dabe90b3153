"""Place the restorer stub and jump to it: the point of no return.

launch(plan, avoid=...) checks what it can while the launcher is still an
ordinary process (raising CkptError with one line), then maps one region

    [stub image: code RX | data, bss, stack RW][plan RW][vdso park]

at an address free in the launcher's layout and outside `avoid` (the
target's VMAs and vdso block), with a free page on either side, and calls
the stub's entry with the plan's address. The stub unmaps the launcher, so
the call never returns; from then on failures are the stub's one line on
fd 2 and exit status 99.

This module is on the restore path: it imports only the standard modules
below (ctypes, mmap, os, sys) and the generated _stub (no
elftools, click or ptrace).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys

TYPE_CHECKING = False           # no typing on the restore path (~4 ms)
if TYPE_CHECKING:
    from typing import NoReturn

from ckpt.errors import CkptError, Status
from ckpt.image.record import replace
from ckpt.restore import _stub
from ckpt.restore.plan import PAGE, THREAD_BLOCK, Plan, RSEQ_SIG, encode

TASK_TOP = 0x7FFFFFFFF000
# Where to try first: far from the usual program (0x55..), mmap (0x7f..)
# and stack areas, so a growing heap or stack of the target never meets
# the stub (which stays mapped when the target has no hand-over gadgets).
HINT = 0x200000000000
MARGIN = 1 << 20            # preferred distance to anything else
GUARD = PAGE                # required distance to anything else
RSEQ_LEN = 32               # glibc registers 32 bytes (__rseq_size says 20)
MAP_FIXED_NOREPLACE = 0x100000
SYS_arch_prctl = 158
ARCH_GET_FS = 0x1003
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_CHECKPOINT_RESTORE = 40
RLIM_INFINITY = 2**64 - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.syscall.restype = ctypes.c_long
_libc.prlimit.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                          ctypes.c_void_p)


def _page_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def _maps() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16),
                        parts[5].strip() if len(parts) > 5 else ""))
    return out


def vdso_block(maps: list[tuple[int, int, str]]) -> tuple[int, int]:
    """(start, length) of the launcher's contiguous [vvar]..[vdso] block,
    (0, 0) if it has no vdso."""
    names = {"[vvar]", "[vvar_vclock]", "[vdso]"}
    special = [(lo, hi, n) for lo, hi, n in maps if n in names]
    if not special:
        return 0, 0
    for (_, hi, _), (lo, _, _) in zip(special, special[1:]):
        if hi != lo:
            raise CkptError(Status.UNSUPPORTED_STATE,
                            "the launcher's [vvar]/[vdso] mappings are not "
                            "contiguous; this kernel's layout is not supported")
    if special[-1][2] != "[vdso]":
        raise CkptError(Status.UNSUPPORTED_STATE,
                        "unexpected vdso layout in /proc/self/maps")
    return special[0][0], special[-1][1] - special[0][0]


def current_rseq() -> tuple[int, int, int] | None:
    """The launcher's own rseq registration (glibc's), or None."""
    try:
        offset = ctypes.c_ssize_t.in_dll(_libc, "__rseq_offset").value
        size = ctypes.c_uint.in_dll(_libc, "__rseq_size").value
    except ValueError:
        return None             # glibc < 2.35 never registers rseq
    if size == 0:
        return None             # disabled (glibc.pthread.rseq=0) or failed
    fs = ctypes.c_ulong()
    if _libc.syscall(SYS_arch_prctl, ARCH_GET_FS, ctypes.byref(fs)) != 0:
        raise CkptError(Status.INTERNAL, "arch_prctl(ARCH_GET_FS) failed: "
                        + os.strerror(ctypes.get_errno()))
    return (fs.value + offset) & 0xFFFFFFFFFFFFFFFF, RSEQ_LEN, RSEQ_SIG


def _cap_eff() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _mmap_min_addr() -> int:
    try:
        with open("/proc/sys/vm/mmap_min_addr") as f:
            return max(int(f.read()), PAGE)
    except OSError:
        return 0x10000


def find_region(size: int, busy: list[tuple[int, int]], *, low: int,
                top: int = TASK_TOP) -> int:
    """A page-aligned start for `size` bytes with at least GUARD (MARGIN
    if possible) free on both sides of it, closest to HINT."""
    for margin in (MARGIN, GUARD):
        spans = sorted((max(lo - margin, 0), hi + margin) for lo, hi in busy)
        gaps = []
        cur = low
        for lo, hi in spans:
            if lo > cur:
                gaps.append((cur, lo))
            cur = max(cur, hi)
        if cur < top:
            gaps.append((cur, top))
        best = None
        for lo, hi in gaps:
            lo = _page_up(lo)
            if hi - lo < size:
                continue
            start = min(max(HINT, lo), hi - size) // PAGE * PAGE
            if start < lo:
                continue
            if best is None or abs(start - HINT) < abs(best - HINT):
                best = start
        if best is not None:
            return best
    raise CkptError(Status.NO_MEMORY,
                    f"no free address range of {size} bytes for the restorer "
                    "outside the image's memory")


def _check_fds(plan: Plan) -> None:
    fds = {plan.image_fd, *(v.fd for v in plan.vmas if v.fd >= 0),
           *(f.src for f in plan.fds)}
    if plan.exe_fd >= 0:
        fds.add(plan.exe_fd)
    for fd in sorted(fds):
        try:
            os.fstat(fd)
        except OSError as e:
            raise CkptError(Status.INTERNAL,
                            f"restore plan: fd {fd} is not open: {e.strerror}")


def _check_privileges(plan: Plan) -> None:
    caps = _cap_eff()
    if plan.exe_fd >= 0 and not caps & ((1 << CAP_SYS_ADMIN) | (1 << CAP_CHECKPOINT_RESTORE)):
        raise CkptError(Status.UNSUPPORTED_STATE,
                        "setting the restored process's exe link needs "
                        "CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN")
    if caps & (1 << CAP_SYS_RESOURCE):
        return
    old = (ctypes.c_uint64 * 2)()
    for res, _cur, mx in plan.rlimits:
        if _libc.prlimit(0, res, None, old) != 0:
            raise CkptError(Status.UNSUPPORTED_STATE,
                            f"resource limit {res}: {os.strerror(ctypes.get_errno())}")
        if mx & RLIM_INFINITY > old[1]:
            raise CkptError(Status.UNSUPPORTED_STATE,
                            f"the image's hard limit for resource {res} "
                            f"({mx}) is above the caller's ({old[1]}); "
                            "raising it needs CAP_SYS_RESOURCE")


def launch(plan: Plan, *, avoid: list[tuple[int, int]], on_placed=None) -> NoReturn:
    """Restore `plan` in this process. Never returns: raises CkptError
    before the point of no return, or becomes the restored program.
    on_placed(start, total, plan_offset, block, vdso_offset), if given, is
    called once the region is ready, just before the jump (restore
    tickets: ckpt.restore.ticket); whatever it raises is ignored."""
    ntask = len(os.listdir("/proc/self/task"))
    if ntask != 1:
        raise CkptError(Status.INTERNAL,
                        f"the launcher has {ntask} threads; restore needs it "
                        "single-threaded")
    maps = _maps()
    vdso_cur, vdso_len = vdso_block(maps)
    if plan.vdso_dst:
        if plan.vdso_len != vdso_len:
            raise CkptError(Status.UNSUPPORTED_STATE,
                            f"the image's vdso block is {plan.vdso_len} bytes, "
                            f"this kernel's {vdso_len}: restore needs the same kernel")
        if plan.vdso_dst % PAGE:
            raise CkptError(Status.INTERNAL, "restore plan: vdso_dst not page aligned")
    elif plan.vdso_len not in (0, vdso_len):
        raise CkptError(Status.INTERNAL, "restore plan: vdso_len without vdso_dst")
    if not plan.vdso_dst:
        # The launcher's vdso stays where it is: it must be out of the way.
        plan = _replace_vdso_len(plan, vdso_len)
    low = _mmap_min_addr()
    if plan.vmas and plan.vmas[0].start < low:
        raise CkptError(Status.UNSUPPORTED_STATE,
                        f"the image maps {plan.vmas[0].start:#x}, below this "
                        f"machine's vm.mmap_min_addr ({low:#x})")
    _check_fds(plan)
    _check_privileges(plan)
    cur_rseq = current_rseq()

    # Size first (the plan's size does not depend on where it goes).
    plan_len = _page_up(len(encode(plan, stub_start=0, stub_len=0,
                                   cur_rseq=cur_rseq, vdso_cur=vdso_cur,
                                   vdso_park=0, task_top=TASK_TOP)))
    code_len = _page_up(_stub.MEM_SIZE)
    park_len = _page_up(vdso_len) if plan.vdso_dst else 0
    threads_len = (len(plan.threads) - 1) * THREAD_BLOCK
    total = code_len + plan_len + park_len + threads_len

    busy = [(lo, hi) for lo, hi, _ in maps]
    busy += [(lo, hi) for lo, hi in avoid]
    busy += [(v.start, v.end) for v in plan.vmas]
    if plan.vdso_dst:
        busy.append((plan.vdso_dst, plan.vdso_dst + plan.vdso_len))
    start = _place(total, busy, low)
    plan_addr = start + code_len
    park = plan_addr + plan_len if park_len else 0
    thread_area = plan_addr + plan_len + park_len

    try:
        block = encode(plan, stub_start=start, stub_len=total,
                       cur_rseq=cur_rseq, vdso_cur=vdso_cur, vdso_park=park,
                       task_top=TASK_TOP, thread_area=thread_area)
        ctypes.memmove(start, _stub.BLOB, len(_stub.BLOB))
        ctypes.memmove(plan_addr, block, len(block))
        if _libc.mprotect(start, _stub.RX_SIZE, mmap.PROT_READ | mmap.PROT_EXEC):
            raise CkptError(Status.INTERNAL, "mprotect of the restorer failed: "
                            + os.strerror(ctypes.get_errno()))
    except BaseException:
        _libc.munmap(start, total)
        raise

    if on_placed is not None:
        try:
            vdso = [lo for lo, _, name in maps if name == "[vdso]"]
            on_placed(start, total, plan_addr - start, block,
                      vdso[0] - vdso_cur if vdso and vdso_len else 0)
        except Exception:
            if os.environ.get("CKPT_DEBUG"):
                import traceback
                traceback.print_exc()

    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    entry = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(start + _stub.ENTRY)
    entry(plan_addr)                          # the point of no return
    raise CkptError(Status.INTERNAL, "the restorer returned")   # unreachable


def _replace_vdso_len(plan: Plan, vdso_len: int) -> Plan:
    return replace(plan, vdso_len=vdso_len)


def _place(total: int, busy: list[tuple[int, int]], low: int) -> int:
    """Find and map (RW, MAP_FIXED_NOREPLACE) the stub region."""
    for _ in range(8):
        start = find_region(total, busy, low=low)
        addr = _libc.mmap(start, total, mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                          -1, 0)
        err = ctypes.get_errno()
        if addr == start:
            return start
        if addr not in (None, ctypes.c_void_p(-1).value):
            _libc.munmap(addr, total)      # kernel without MAP_FIXED_NOREPLACE
            raise CkptError(Status.UNSUPPORTED_STATE,
                            "this kernel ignores MAP_FIXED_NOREPLACE (needs Linux 4.17+)")
        if err != 17:                          # EEXIST: something appeared; retry
            raise CkptError(Status.NO_MEMORY,
                            f"cannot map {total} bytes for the restorer: {os.strerror(err)}")
        busy = busy + [(lo, hi) for lo, hi, _ in _maps()]
    raise CkptError(Status.NO_MEMORY, "cannot find a stable free range for the restorer")


__all__ = ["launch", "find_region", "vdso_block", "current_rseq", "TASK_TOP"]