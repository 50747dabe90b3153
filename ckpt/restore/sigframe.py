"""The x86_64 rt_sigframe a restored thread resumes from.

The stub copies the frame onto the thread's own stack and runs
rt_sigreturn with rsp = frame_addr + 8; the kernel then loads every general
register, the signal mask, the alternate signal stack and the XSAVE state
from it, exactly as when a signal handler returns.

Layout (arch/x86/include/asm/sigframe.h, uapi asm/sigcontext.h, ucontext.h):

    rt_sigframe (440 bytes)
      0    pretcode                 8   (the stub may store a gadget here)
      8    ucontext                 304
             8   uc_flags           8
            16   uc_link            8
            24   uc_stack           24  (ss_sp, ss_flags, ss_size)
            48   uc_mcontext        256 (struct sigcontext_64)
           304   uc_sigmask         8
      312  siginfo                  128 (zero: not needed by rt_sigreturn)
    ... gap ...
    fpstate (64-byte aligned): the XSAVE area, then FP_XSTATE_MAGIC2

Placement follows the kernel's get_sigframe() for a signal delivered on
the normal stack: skip the 128-byte red zone below rsp, put the math frame
at round_down(sp - math_size, 64), and the frame at
round_down(fpstate - 440, 16) - 8, so (frame_addr + 8) % 16 == 0 as on a
real handler entry.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping

from ckpt.errors import CkptError, Status

FRAME_SIZE = 440
UC_FLAGS = 8
UC_STACK = 24
UC_MCONTEXT = 48
UC_SIGMASK = 304
SIGINFO = 312

UC_FP_XSTATE = 0x1
UC_SIGCONTEXT_SS = 0x2
UC_STRICT_RESTORE_SS = 0x4

FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
FXSAVE_SIZE = 512
XSAVE_HDR_SIZE = 64
SW_BYTES = 464                    # offset of struct _fpx_sw_bytes
RED_ZONE = 128
SS_DISABLE = 2

# struct sigcontext_64: 18 u64 registers in this order, then cs, gs, fs, ss
# (u16 each), err, trapno, oldmask, cr2, fpstate, reserved1[8].
_SC_REGS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi",
            "rsi", "rbp", "rbx", "rdx", "rax", "rcx", "rsp", "rip", "eflags")
_SC = struct.Struct("<18Q4H5Q64x")
assert _SC.size == 256

# The 27 names of ckpt.image.model.GENERAL_REGS (user_regs_struct order).
GENERAL_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
    "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)


def _corrupt(msg: str) -> CkptError:
    return CkptError(Status.CORRUPT_IMAGE, f"thread FPU state: {msg}")


def default_fxsave() -> bytes:
    """A legacy FXSAVE area in the reset state (FCW 0x37f, MXCSR 0x1f80).

    Its software-reserved bytes carry no FP_XSTATE_MAGIC1, so rt_sigreturn
    restores x87/SSE from it and puts every other XSAVE component (AVX,
    AVX-512, ...) in its initial state.
    """
    fx = bytearray(FXSAVE_SIZE)
    struct.pack_into("<H", fx, 0, 0x037F)      # FCW
    struct.pack_into("<I", fx, 24, 0x1F80)     # MXCSR
    struct.pack_into("<I", fx, 28, 0xFFFF)     # MXCSR_MASK (ignored by FXRSTOR)
    return bytes(fx)


def _check_mxcsr(fx: bytes | bytearray) -> None:
    mxcsr, mask = struct.unpack_from("<II", fx, 24)
    if mask == 0:
        mask = 0xFFBF
    if mxcsr & ~mask:
        raise _corrupt(f"MXCSR {mxcsr:#x} has reserved bits set")


XFEATURE_TILEDATA = 1 << 18      # AMX tile data: a dynamic (opt-in) feature
# Standard-format offset of XTILEDATA (CPUID.(EAX=0DH,ECX=18).EBX) on every
# AMX CPU so far, i.e. the user XSAVE size of a task without AMX permission.
TILEDATA_OFFSET = 2816


def fpstate_image(xstate: bytes) -> tuple[bytes, bool]:
    """The bytes to place at sigcontext.fpstate, and whether it is XSAVE.

    xstate is what PTRACE_GETREGSET NT_X86_XSTATE returned: the user ABI
    (standard, non-compacted) XSAVE layout. Measured on kernel 6.18 (and
    what arch/x86/kernel/fpu/xstate.c does): its software-reserved bytes
    464..511 are NOT a struct _fpx_sw_bytes; word 0 holds XCR0 (the gdb
    convention, xstate_fx_sw_bytes[USER_XSTATE_XCR0_WORD]) and the rest is
    zero. So the frame gets its own _fpx_sw_bytes, as the kernel writes
    them on signal delivery:

        magic1 = FP_XSTATE_MAGIC1, extended_size = xstate_size + 4,
        xfeatures = XCR0, xstate_size = len(xstate)

    followed by FP_XSTATE_MAGIC2 at fpstate + xstate_size. (If the bytes
    already carry FP_XSTATE_MAGIC1, e.g. copied from a real signal frame,
    their xfeatures/xstate_size are used.) With AMX enabled in XCR0 the
    ptrace buffer includes the tile data, but a task that never asked for
    AMX permission (the launcher) accepts only the default size, so the
    frame stops at the tile data; a thread whose tile data is in use is
    refused (restoring it needs ARCH_REQ_XCOMP_PERM first; not done yet).
    rt_sigreturn would silently fall back to x87/SSE only if xstate_size
    exceeded the task's own size: restore on the same kind of machine.

    Empty xstate gives default_fxsave(); without XCR0 (a 512-byte
    PTRACE_GETFPREGS area, or XCR0 == 0) the first 512 bytes are used as a
    legacy FXSAVE area and every other component starts in its initial
    state. Anything XRSTOR would fault on (which would kill the process
    after the point of no return) is refused here.
    """
    if not xstate:
        return default_fxsave(), False
    if len(xstate) < FXSAVE_SIZE:
        raise _corrupt(f"{len(xstate)} bytes, less than an FXSAVE area")
    magic1, _ext, sw_xfeatures, sw_xsize = struct.unpack_from("<IIQI", xstate, SW_BYTES)
    if magic1 == FP_XSTATE_MAGIC1:
        xfeatures, xsize = sw_xfeatures, sw_xsize
    else:
        xfeatures = struct.unpack_from("<Q", xstate, SW_BYTES)[0]   # XCR0
        xsize = len(xstate)
    if (xfeatures & 3) != 3 or len(xstate) < FXSAVE_SIZE + XSAVE_HDR_SIZE:
        fx = bytearray(xstate[:FXSAVE_SIZE])
        fx[SW_BYTES:FXSAVE_SIZE] = bytes(FXSAVE_SIZE - SW_BYTES)
        _check_mxcsr(fx)
        return bytes(fx), False
    xstate_bv, xcomp_bv = struct.unpack_from("<QQ", xstate, FXSAVE_SIZE)
    if xfeatures & XFEATURE_TILEDATA:
        if xstate_bv & XFEATURE_TILEDATA:
            raise CkptError(Status.UNSUPPORTED_STATE,
                            "thread FPU state: the thread uses AMX tile data; "
                            "restoring it is not supported")
        xfeatures &= ~XFEATURE_TILEDATA
        xsize = min(xsize, TILEDATA_OFFSET)
    if not FXSAVE_SIZE + XSAVE_HDR_SIZE <= xsize <= len(xstate):
        raise _corrupt(f"xstate_size {xsize} outside 576..{len(xstate)}")
    if xcomp_bv:
        raise _corrupt("compacted XSAVE format (xcomp_bv != 0)")
    xs = bytearray(xstate[:xsize])
    if any(xs[FXSAVE_SIZE + 16:FXSAVE_SIZE + XSAVE_HDR_SIZE]):
        raise _corrupt("reserved XSAVE header bytes are not zero")
    _check_mxcsr(xs)
    # Components outside xfeatures are not restored by rt_sigreturn (the
    # kernel puts them in their initial state); keep XSTATE_BV within them.
    struct.pack_into("<Q", xs, FXSAVE_SIZE, xstate_bv & xfeatures)
    xs[SW_BYTES:FXSAVE_SIZE] = bytes(FXSAVE_SIZE - SW_BYTES)
    struct.pack_into("<IIQI", xs, SW_BYTES, FP_XSTATE_MAGIC1, xsize + 4,
                     xfeatures, xsize)
    return bytes(xs) + struct.pack("<I", FP_XSTATE_MAGIC2), True


def build_sigframe(regs: Mapping[str, int], xstate: bytes,
                   sigmask: int) -> tuple[int, bytes]:
    """(frame_addr, frame_bytes): the frame and math frame, contiguous,
    to be written at frame_addr on the thread's stack.

    regs: the 27 GeneralRegs names (rip/rsp/... as the thread should
    resume; fs_base/gs_base/ds/es/fs/gs are not part of a sigframe and are
    restored elsewhere). uc_stack says "no alternate stack"; the encoder
    overwrites it with the thread's (set_uc_stack), since rt_sigreturn
    re-applies it.
    """
    missing = [n for n in GENERAL_REGS if n not in regs]
    if missing:
        raise CkptError(Status.INTERNAL,
                        f"sigframe: missing registers {', '.join(missing)}")
    fp, _is_xsave = fpstate_image(xstate)
    rsp = regs["rsp"] & 0xFFFFFFFFFFFFFFFF
    sp = rsp - RED_ZONE
    fpstate_addr = (sp - len(fp)) & ~63
    frame_addr = ((fpstate_addr - FRAME_SIZE) & ~15) - 8
    if frame_addr <= 0:
        raise CkptError(Status.CORRUPT_IMAGE,
                        f"thread stack pointer {rsp:#x} leaves no room for a signal frame")
    buf = bytearray(fpstate_addr + len(fp) - frame_addr)

    # As the kernel sets them on an XSAVE machine; rt_sigreturn itself
    # decides XSAVE vs FXSAVE by the magic words, not by UC_FP_XSTATE.
    flags = UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
    struct.pack_into("<QQ", buf, UC_FLAGS, flags, 0)                  # uc_flags, uc_link
    set_uc_stack(buf, 0, SS_DISABLE, 0)
    mask = sigmask & 0xFFFFFFFFFFFFFFFF
    _SC.pack_into(
        buf, UC_MCONTEXT,
        *(regs[n] & 0xFFFFFFFFFFFFFFFF for n in _SC_REGS),
        regs["cs"] & 0xFFFF, 0, 0, regs["ss"] & 0xFFFF,           # cs, gs, fs, ss
        0, 0, mask, 0,                                            # err, trapno, oldmask, cr2
        fpstate_addr)
    struct.pack_into("<Q", buf, UC_SIGMASK, mask)
    off = fpstate_addr - frame_addr
    buf[off:off + len(fp)] = fp
    return frame_addr, bytes(buf)


def set_uc_stack(frame: bytearray, ss_sp: int, ss_flags: int, ss_size: int) -> None:
    """Store uc_stack (stack_t) in a frame built by build_sigframe.

    rt_sigreturn calls sigaltstack() with it, so it must describe the
    thread's alternate signal stack (or SS_DISABLE)."""
    if ss_flags & SS_DISABLE:
        ss_sp, ss_flags, ss_size = 0, SS_DISABLE, 0
    struct.pack_into("<QiiQ", frame, UC_STACK, ss_sp & 0xFFFFFFFFFFFFFFFF,
                     ss_flags, 0, ss_size & 0xFFFFFFFFFFFFFFFF)
