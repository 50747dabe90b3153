"""A seized task: ptrace requests the dumper needs, and syscall injection.

ptrace(2) is called through ctypes: python-ptrace (which has no API for
PTRACE_SEIZE/INTERRUPT/GETREGSET(XSTATE)/PEEKSIGINFO/GETSIGMASK anyway)
cost ~20 ms of imports on every dump for a raw call and GETREGS/SETREGS.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal

from ..errors import CkptError, Status
from ..image.model import GENERAL_REGS

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_O_EXITKILL = 1 << 20
PTRACE_GETREGSET = 0x4204
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
PTRACE_EVENT_STOP = 128
PTRACE_PEEKSIGINFO_SHARED = 1
NT_X86_XSTATE = 0x202
XSTATE_MAX = 64 * 1024
WALL = 0x40000000
ERESTART = {512, 513, 514, 516}   # -ERESTARTSYS/NOINTR/NOHAND/RESTARTBLOCK
U64 = 2**64 - 1


class TaskGone(Exception):
    """The task exited or was killed while seized."""


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _PeekArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32),
                ("nr", ctypes.c_int32)]


class _RseqConfig(ctypes.Structure):
    _fields_ = [("rseq_abi_pointer", ctypes.c_uint64),
                ("rseq_abi_size", ctypes.c_uint32),
                ("signature", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class PtraceError(OSError):
    """ptrace(2) failed; .errno says why."""


class UserRegs(ctypes.Structure):
    """struct user_regs_struct (x86_64), the fields the image names."""
    _fields_ = [(name, ctypes.c_ulong) for name in GENERAL_REGS]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)


def _ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    ctypes.set_errno(0)
    ret = _libc.ptrace(request, tid, addr or None, data or None)
    err = ctypes.get_errno() if ret == -1 else 0
    if err:
        raise PtraceError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")
    return ret


def _call(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    try:
        return _ptrace(request, tid, addr, data)
    except PtraceError as e:
        if e.errno == errno.ESRCH:
            raise TaskGone(tid) from None
        raise


class Tracee:
    """One thread of the target, seized and stopped in PTRACE_EVENT_STOP."""

    def __init__(self, tid: int):
        self.tid = tid
        self.attached = False

    # -- attach / stop / detach -------------------------------------------
    def seize(self, *, thread: bool = False) -> bool:
        """Attach. For another thread of an attached process (thread=True)
        a thread that has just exited gives False instead of an error."""
        try:
            _ptrace(PTRACE_SEIZE, self.tid)
        except PtraceError as e:
            if thread and e.errno in (errno.ESRCH, errno.EPERM) and _is_zombie(self.tid):
                return False
            if e.errno == errno.ESRCH:
                raise CkptError(Status.NO_PROCESS, f"no such process: {self.tid}")
            if e.errno == errno.EPERM:
                if _is_zombie(self.tid):        # ptrace says EPERM for these too
                    raise CkptError(Status.NO_PROCESS,
                                    f"process {self.tid} has exited: nothing to dump")
                raise CkptError(Status.PTRACE_DENIED, _denied_message(self.tid))
            raise
        self.attached = True
        return True

    def interrupt(self) -> None:
        """Stop the task without it ever seeing a SIGSTOP.

        Signals that arrive first are passed on (the program handles them as
        it would have) until the interrupt's PTRACE_EVENT_STOP is reported."""
        _call(PTRACE_INTERRUPT, self.tid)
        while True:
            status = self._wait()
            if (status >> 16) == PTRACE_EVENT_STOP:
                return
            sig = os.WSTOPSIG(status)
            _call(PTRACE_CONT, self.tid, 0, sig)

    def _wait(self, *, reap: bool = True) -> int:
        """The next stop's status. A death raises TaskGone; without `reap`
        it is left uncollected (kill() collects it): collecting the death of
        another process's child hands its parent a zombie to reap."""
        if not reap:
            try:
                info = os.waitid(os.P_PID, self.tid,
                                 os.WEXITED | os.WSTOPPED | os.WNOWAIT | WALL)
            except ChildProcessError:
                raise TaskGone(self.tid) from None
            if info is not None and info.si_code in (os.CLD_EXITED, os.CLD_KILLED,
                                                     os.CLD_DUMPED):
                raise TaskGone(self.tid)
        try:
            _, status = os.waitpid(self.tid, WALL)
        except ChildProcessError:
            raise TaskGone(self.tid) from None
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.attached = False
            raise TaskGone(self.tid)
        return status

    def wait_new_child(self) -> bool:
        """A child created with CLONE_PTRACE by a seized task is attached to
        us from birth and stops (PTRACE_EVENT_STOP) before it runs a single
        instruction of its own: wait for that stop. Any other stop: False
        (never resume it; the caller kills it)."""
        self.attached = True
        status = self._wait()
        return os.WIFSTOPPED(status) and (status >> 16) == PTRACE_EVENT_STOP

    def set_exitkill(self, on: bool = True) -> None:
        """Have the kernel SIGKILL this task if the dumper dies (or not).
        Children it creates while it is on are attached with it on."""
        _call(PTRACE_SETOPTIONS, self.tid, 0, PTRACE_O_EXITKILL if on else 0)

    def kill(self, *, collect: bool = True) -> None:
        """SIGKILL a task we trace and wait until it has died. With
        collect, its death is collected too (for a child of another
        process, that leaves the real parent's zombie); without, it is left
        a zombie only its tracer can see (kill() again to collect it)."""
        if not self.attached:
            return
        try:
            os.kill(self.tid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while True:
            try:
                if not collect:
                    info = os.waitid(os.P_PID, self.tid, os.WEXITED | os.WNOWAIT | WALL)
                    if info is not None and info.si_code in (
                            os.CLD_EXITED, os.CLD_KILLED, os.CLD_DUMPED):
                        return
                    os.waitpid(self.tid, WALL | os.WNOHANG)     # a stop: consume it
                    continue
                _, status = os.waitpid(self.tid, WALL)
            except ChildProcessError:
                break
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                break
        self.attached = False

    def detach(self) -> None:
        if self.attached:
            self.attached = False
            try:
                _ptrace(PTRACE_DETACH, self.tid)
            except PtraceError:
                pass    # already gone; nothing is left stopped

    # -- state ---------------------------------------------------------------
    def getregs(self) -> UserRegs:
        regs = UserRegs()
        try:
            _ptrace(PTRACE_GETREGS, self.tid, 0, ctypes.addressof(regs))
            return regs
        except PtraceError as e:
            if e.errno == errno.ESRCH:
                raise TaskGone(self.tid) from None
            raise

    def setregs(self, regs) -> None:
        _ptrace(PTRACE_SETREGS, self.tid, 0, ctypes.addressof(regs))

    def xstate(self) -> bytes:
        buf = ctypes.create_string_buffer(XSTATE_MAX)
        iov = _Iovec(ctypes.addressof(buf), XSTATE_MAX)
        _call(PTRACE_GETREGSET, self.tid, NT_X86_XSTATE, ctypes.addressof(iov))
        return buf.raw[:iov.len]

    def sigmask(self) -> int:
        mask = ctypes.c_uint64()
        _call(PTRACE_GETSIGMASK, self.tid, 8, ctypes.addressof(mask))
        return mask.value

    def setsigmask(self, mask: int) -> None:
        """Set the blocked mask (also clears a pending restore of a mask
        saved by sigsuspend/ppoll: the real mask is what GETSIGMASK gave)."""
        value = ctypes.c_uint64(mask)
        _call(PTRACE_SETSIGMASK, self.tid, 8, ctypes.addressof(value))

    def pending(self, shared: bool) -> list[bytes]:
        """Queued siginfo_t (128 bytes each), private or process-wide."""
        out: list[bytes] = []
        buf = ctypes.create_string_buffer(128 * 32)
        while True:
            args = _PeekArgs(len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, 32)
            n = _call(PTRACE_PEEKSIGINFO, self.tid, ctypes.addressof(args),
                      ctypes.addressof(buf))
            out += [buf.raw[i * 128:(i + 1) * 128] for i in range(n)]
            if n < 32:
                return out

    def rseq(self) -> tuple[int, int, int] | None:
        cfg = _RseqConfig()
        _call(PTRACE_GET_RSEQ_CONFIGURATION, self.tid, ctypes.sizeof(cfg),
              ctypes.addressof(cfg))
        if not cfg.rseq_abi_pointer:
            return None
        return cfg.rseq_abi_pointer, cfg.rseq_abi_size, cfg.signature

    # -- syscall injection ---------------------------------------------------
    def inject(self, syscall_insn: int, nr: int, *args: int) -> int:
        """Run one syscall inside the stopped task and put everything back.

        rip goes to a `syscall` instruction (in the vdso), orig_rax = -1 so
        the kernel does no restart handling of the interrupted syscall, one
        single-step, read rax, restore the saved registers (whose orig_rax
        and rax then restart the interrupted syscall normally on resume)."""
        saved = self.getregs()
        try:
            self.start_syscall(syscall_insn, nr, *args, regs=self.getregs())
            return self.finish_syscall()
        finally:
            if self.attached:
                self.setregs(saved)

    def start_syscall(self, syscall_insn: int, nr: int, *args: int, regs=None) -> None:
        """Set the task off on one syscall (a single-step over `syscall`)
        and return at once: finish_syscall() waits for it. Its registers are
        not put back (inject() does that; the snapshot's child, which never
        resumes, needs no such care)."""
        regs = regs if regs is not None else self.getregs()
        regs.orig_rax = U64
        regs.rax = nr
        regs.rip = syscall_insn
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, name, value & U64)
        self.setregs(regs)
        _call(PTRACE_SINGLESTEP, self.tid)

    def start_code(self, rip: int, **regs: int) -> None:
        """Let the task run from `rip`, with `regs` set, until it traps
        (int3): finish_code() waits for that. For code the dumper put in
        the snapshot's child (splice.VMSPLICE_LOOP)."""
        r = self.getregs()
        r.orig_rax, r.rip = U64, rip
        for name, value in regs.items():
            setattr(r, name, value & U64)
        self.setregs(r)
        _call(PTRACE_CONT, self.tid)

    def finish_code(self, *, reap: bool = True) -> int:
        """Wait for the code start_code() began to trap; rax."""
        return self.finish_syscall(reap=reap, resume=PTRACE_CONT)

    def finish_syscall(self, *, reap: bool = True, resume: int = PTRACE_SINGLESTEP) -> int:
        """Wait for the syscall start_syscall() began; its return value.
        `reap`: as for _wait()."""
        status = self._wait(reap=reap)
        while os.WSTOPSIG(status) != signal.SIGTRAP:
            # A signal arrived during the step: it stays pending
            # (we discard this delivery; the kernel re-queues nothing, so
            # record and re-raise is the caller's job) -- rare; retry.
            _call(resume, self.tid)
            status = self._wait(reap=reap)
        result = self.getregs().rax
        return result - (1 << 64) if result >= (1 << 63) else result


def restarted_regs(regs) -> dict[str, int]:
    """Registers as a dict, with an interrupted syscall set up to run again.

    The restore resumes through rt_sigreturn, which does no restart handling,
    so the dumper applies the kernel's convention itself: rax = the syscall
    number, rip back over the 2-byte `syscall`. -ERESTART_RESTARTBLOCK (a
    relative sleep, poll with timeout) re-runs the original call with its
    original arguments: a relative sleep starts its full duration again."""
    out = {name: int(getattr(regs, name)) for name in GENERAL_REGS}
    rax = out["rax"] - (1 << 64) if out["rax"] >= (1 << 63) else out["rax"]
    if out["orig_rax"] != U64 and -rax in ERESTART:
        out["rax"] = out["orig_rax"]
        out["rip"] -= 2
    return out


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True         # gone altogether
    except (OSError, IndexError):
        return False


def _denied_message(pid: int) -> str:
    msg = f"not allowed to ptrace process {pid}"
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
        if owner != os.geteuid():
            msg += f" (it belongs to uid {owner}; you are uid {os.geteuid()})"
    except OSError:
        pass
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read())
        if scope >= 1:
            msg += (f"; kernel.yama.ptrace_scope={scope} lets you trace only your"
                    " own descendants: dump from a parent of the program, have the"
                    " program call prctl(PR_SET_PTRACER, ...), or dump as root")
    except (OSError, ValueError):
        pass
    return msg
