"""The restorer stub, step by step, in real processes.

Each test runs a child Python that builds a Plan by hand and calls
ckpt.restore.stub.launch(): the child *becomes* the plan's process (or
stops after a chosen step via plan.stop_after_step), and the test checks
its exit status, stdout and stderr. The "programs" are a few bytes of
hand-assembled x86_64 code in the plan's own memory (disassembly in the
comments), so no dumper is involved.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import struct
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PY = sys.executable

# The child's common part: addresses of the hand-made process, an image
# file, machine code, and go() which builds the plan and jumps.
PRELUDE = r'''
import os, struct, sys, tempfile
from ckpt.errors import CkptError
from ckpt.restore.plan import *
from ckpt.restore.sigframe import build_sigframe, GENERAL_REGS, default_fxsave
from ckpt.restore.stub import launch, vdso_block, _maps, current_rseq

FD_BASE = 50
CODE, DATA, BUF, STACK, STACK_END = (0x10000000, 0x10200000, 0x10300000,
                                     0x10400000, 0x10410000)
VDSO_DST = 0x20000000
_fds = [FD_BASE + 10]

def high_fd(fd):
    """Move fd to FD_BASE + 10 + k (launcher fds the plan uses are >= fd_base)."""
    n = _fds[0]; _fds[0] += 1
    os.dup2(fd, n)
    os.close(fd)
    return n

class Image:
    """Page data: a temp file (or `path`) the stub preads from."""
    def __init__(self, path=None):
        self.f = open(path, "w+b") if path else tempfile.TemporaryFile()
        self.fd = high_fd(os.dup(self.f.fileno()))
        self.off = 0
    def run(self, addr, data, flags=0):
        data = bytes(data)
        pad = (-len(data)) % 4096
        os.pwrite(self.fd, data + bytes(pad), self.off)
        run = (addr, len(data), self.off) + ((flags,) if flags else ())
        self.off += len(data) + pad
        return run

p32 = lambda v: struct.pack("<I", v)
p64 = lambda v: struct.pack("<Q", v)

def exit_imm(n):
    return (b"\xb8\x3c\0\0\0"                 # mov $60,%eax
            + b"\xbf" + p32(n)                # mov $n,%edi
            + b"\x0f\x05")                    # syscall

EXIT_EDI = b"\xb8\x3c\0\0\0\x0f\x05"         # mov $60,%eax; syscall

def cat(path_addr):
    """open(path), read into BUF, write to fd 1."""
    return (b"\xb8\x02\0\0\0" + b"\xbf" + p32(path_addr)   # mov $2,%eax; mov $path,%edi
            + b"\x31\xf6\x0f\x05"                            # xor %esi,%esi; syscall
            + b"\x89\xc7\x31\xc0"                            # mov %eax,%edi; xor %eax,%eax
            + b"\xbe" + p32(BUF) + b"\xba\0\0\1\0"          # mov $BUF,%esi; mov $65536,%edx
            + b"\x0f\x05\x89\xc2"                            # syscall; mov %eax,%edx
            + b"\xb8\1\0\0\0\xbf\1\0\0\0"                   # mov $1,%eax; mov $1,%edi
            + b"\xbe" + p32(BUF) + b"\x0f\x05")             # mov $BUF,%esi; syscall

def regs(**kw):
    r = dict.fromkeys(GENERAL_REGS, 0)
    r.update(cs=0x33, ss=0x2b, eflags=0x202, rip=CODE, rsp=STACK_END - 0x100)
    r.update(kw)
    return r

MM = (CODE, CODE + 0x1000, DATA, DATA + 0x1000, DATA + 0x1000, DATA + 0x1000,
      STACK_END - 0x1000, STACK_END - 0x800, STACK_END - 0x800,
      STACK_END - 0x800, STACK_END - 0x800)

def go(code=b"", data=None, *, image=None, xstate=b"", sigmask=0, reg=None,
       extra_vmas=(), thread=None, more_threads=(), **plan_kw):
    image = image or Image()
    vmas = [PlanVma(CODE, CODE + 0x1000, 0, -1, PROT_READ | PROT_EXEC, PV_ANON, 0,
                    (image.run(CODE, code),) if code else ())]
    if data is not None:
        vmas.append(PlanVma(DATA, DATA + 0x1000, 0, -1, PROT_READ, PV_ANON, 0,
                            (image.run(DATA, data),)))
    vmas.append(PlanVma(BUF, BUF + 0x10000, 0, -1, PROT_READ | PROT_WRITE, PV_ANON, 0))
    vmas.append(PlanVma(STACK, STACK_END, 0, -1, PROT_READ | PROT_WRITE,
                        PV_ANON | PV_GROWSDOWN, 0))
    vmas = tuple(sorted(vmas + list(extra_vmas), key=lambda v: v.start))
    fa, frame = build_sigframe(reg or regs(), xstate, sigmask)
    tkw = dict(tid=os.getpid(), fs_base=0, gs_base=0, tid_address=0, robust_head=0,
               robust_len=0, rseq_addr=0, rseq_len=0, rseq_sig=0, altstack_sp=0,
               altstack_size=0, altstack_flags=SS_DISABLE)
    tkw.update(thread or {})
    th = PlanThread(frame_addr=fa, frame=frame, **tkw)
    others = []
    for n, r in enumerate(more_threads):          # registers of threads 2, 3, ...
        ofa, oframe = build_sigframe(r, b"", 0)
        okw = dict(tkw, tid=os.getpid() + 1000 + n)
        others.append(PlanThread(frame_addr=ofa, frame=oframe, **okw))
    kw = dict(mm=MM, auxv=(6, 4096, 0, 0), sigactions={}, rlimits=(), siginfo=(),
              fds=(), image_fd=image.fd, fd_base=FD_BASE)
    kw.update(plan_kw)
    plan = Plan(vmas=vmas, threads=(th, *others), **kw)
    avoid = [(v.start, v.end) for v in vmas]
    if plan.vdso_dst:
        avoid.append((plan.vdso_dst, plan.vdso_dst + plan.vdso_len))
    launch(plan, avoid=avoid)

VDSO_LEN = vdso_block(_maps())[1]
'''


def run_child(body: str, *, timeout: float = 10) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([PY, "-c", PRELUDE + body], capture_output=True,
                          close_fds=True, timeout=timeout, env=env, cwd=ROOT)


def _stub_fresh() -> None:
    try:
        from ckpt.restore import _stub
    except ImportError:
        pytest.fail("ckpt/restore/_stub.py is missing: run "
                    "`python restorer-stub/build.py ckpt/restore/_stub.py`")
    spec = importlib.util.spec_from_file_location(
        "ckpt_stub_build", ROOT / "restorer-stub" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    if build.source_hash() != _stub.SOURCE_HASH:
        pytest.fail("ckpt/restore/_stub.py is stale: run "
                    "`python restorer-stub/build.py ckpt/restore/_stub.py`")


@pytest.fixture(scope="module", autouse=True)
def fresh_stub():
    _stub_fresh()


def _line(r: subprocess.CompletedProcess) -> str:
    return r.stderr.decode(errors="replace")


# -- stopping after a step ---------------------------------------------------

def test_stop_after_step1_entry_stack_plan():
    r = run_child("go(exit_imm(0), stop_after_step=1, stop_status=42)")
    assert r.returncode == 42, _line(r)
    assert r.stderr == b""


def test_stop_after_step3_launcher_unmapped():
    # glibc registered rseq in the launcher: step 2 must unregister it, or
    # unmapping its TLS in step 3 kills the process.
    r = run_child("assert current_rseq() is not None\n"
                  "go(exit_imm(0), stop_after_step=3, stop_status=43)")
    assert r.returncode == 43, _line(r)


def test_stop_after_step4_vdso_moved():
    r = run_child("go(exit_imm(0), vdso_dst=VDSO_DST, vdso_len=VDSO_LEN, "
                  "stop_after_step=4, stop_status=44)")
    assert r.returncode == 44, _line(r)


def test_every_step_reaches_its_stop():
    body = ("import sys\n"
            "go(exit_imm(0), vdso_dst=VDSO_DST, vdso_len=VDSO_LEN, "
            "stop_after_step=int(sys.argv[1]), stop_status=100 + int(sys.argv[1]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([PY, "-c", PRELUDE + body, str(n)], env=env,
                              close_fds=True, stderr=subprocess.PIPE)
             for n in range(5, 12)]
    for n, p in zip(range(5, 12), procs):
        _, err = p.communicate(timeout=10)
        assert p.returncode == 100 + n, (n, err)


# -- full hand-over: the plan's code runs ------------------------------------

def test_handover_exit_code():
    r = run_child("go(exit_imm(37))")
    assert r.returncode == 37, _line(r)
    assert r.stderr == b""


def test_handover_memory_arrived():
    # mov 0x10200010,%edi (from the data VMA, filled from the image); exit
    body = ("data = bytes(16) + p32(58) + bytes(4076)\n"
            "go(b'\\x8b\\x3c\\x25' + p32(DATA + 16) + EXIT_EDI, data)")
    r = run_child(body)
    assert r.returncode == 58, _line(r)


def test_handover_registers_and_xstate():
    # exit(xmm0[31:0] + ymm0[159:128] + r12d). The XSAVE area is a real one
    # (PTRACE_GETREGSET NT_X86_XSTATE of a traced child) with xmm0 and the
    # upper half of ymm0 patched: the AVX half only arrives if rt_sigreturn
    # took the frame as XSAVE (not its silent x87/SSE-only fallback).
    body = r'''
import ctypes, signal
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
pid = os.fork()
if pid == 0:
    libc.ptrace(0, 0, None, None)                       # PTRACE_TRACEME
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
os.waitpid(pid, os.WUNTRACED)
buf = ctypes.create_string_buffer(65536)
iov = (ctypes.c_uint64 * 2)(ctypes.addressof(buf), 65536)
assert libc.ptrace(0x4204, pid, 0x202, iov) == 0, ctypes.get_errno()   # GETREGSET
os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
xs = bytearray(buf.raw[:iov[1]])
xcr0 = struct.unpack_from("<Q", xs, 464)[0]             # ptrace: sw_reserved[0] = XCR0
assert xcr0 & 7 == 7, hex(xcr0)                          # x87, SSE, AVX
xs[160:176] = p32(60) + bytes(12)                        # xmm0
xs[576:592] = p32(10) + bytes(12)                        # ymm0 upper half
struct.pack_into("<Q", xs, 512, struct.unpack_from("<Q", xs, 512)[0] | 6)  # SSE, AVX in use
code = (b"\x66\x0f\x7e\xc7"          # movd %xmm0,%edi
        b"\x44\x01\xe7"              # add %r12d,%edi
        b"\xc4\xe3\x7d\x19\xc1\x01"  # vextractf128 $1,%ymm0,%xmm1
        b"\x66\x0f\x7e\xc8"          # movd %xmm1,%eax
        b"\x01\xc7" + EXIT_EDI)       # add %eax,%edi; exit
go(code, xstate=bytes(xs), reg=regs(r12=7))
'''
    r = run_child(body)
    assert r.returncode == 77, (r.stdout, _line(r))


def test_handover_legacy_fxsave():
    # A bare FXSAVE area (no XSAVE magic): x87/SSE come from it.
    body = ("fx = bytearray(default_fxsave()); fx[160:164] = p32(33)\n"
            "go(b'\\x66\\x0f\\x7e\\xc7' + EXIT_EDI, xstate=bytes(fx))")
    r = run_child(body)
    assert r.returncode == 33, _line(r)


def test_handover_fds_installed(tmp_path):
    out = tmp_path / "out"
    msg = b"fd 5 arrived\n"
    # write(5, DATA, len); exit(0)
    body = (f"fd = high_fd(os.open({str(out)!r}, os.O_WRONLY | os.O_CREAT, 0o600))\n"
            f"msg = {msg!r}\n"
            "code = (b'\\xb8\\1\\0\\0\\0\\xbf\\5\\0\\0\\0\\xbe' + p32(DATA)\n"
            "        + b'\\xba' + p32(len(msg)) + b'\\x0f\\x05' + exit_imm(0))\n"
            "go(code, msg, fds=(PlanFd(fd, 5, False),))")
    r = run_child(body)
    assert r.returncode == 0, _line(r)
    assert out.read_bytes() == msg


def _maps_of(stdout: bytes) -> list[tuple[int, int, str, str]]:
    out = []
    for line in stdout.decode().splitlines():
        parts = line.split(None, 5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi, parts[1], parts[5] if len(parts) > 5 else ""))
    return out


_GADGETS = (
    "SYSRET = b'\\x0f\\x05\\xc3'\n"
    "SIGRET = b'\\x48\\xc7\\xc0\\x0f\\x00\\x00\\x00\\x0f\\x05'\n"
    "code = cat(DATA) + exit_imm(0)\n"
    "code = code + bytes(0x100 - len(code)) + SYSRET + bytes(13) + SIGRET\n"
)


@pytest.mark.parametrize("gadgets", [True, False])
def test_handover_only_the_target_is_mapped(gadgets):
    # The restored code prints its own /proc/self/maps: with the gadgets
    # the stub has unmapped itself (nothing but the plan's VMAs, the moved
    # vdso block and [vsyscall]); without them the stub region stays.
    g = ("gadget_syscall_ret=CODE + 0x100, gadget_sigreturn=CODE + 0x110"
         if gadgets else "gadget_syscall_ret=0, gadget_sigreturn=0")
    body = (_GADGETS
            + f"go(code, b'/proc/self/maps\\0', vdso_dst=VDSO_DST, vdso_len=VDSO_LEN, {g})\n")
    r = run_child(body)
    assert r.returncode == 0, _line(r)
    maps = _maps_of(r.stdout)
    names = [m[3] for m in maps]
    expect = {(0x10000000, 0x10001000, "r-xp"), (0x10200000, 0x10201000, "r--p"),
              (0x10300000, 0x10310000, "rw-p"), (0x10400000, 0x10410000, "rw-p")}
    special = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]")
    got = {(lo, hi, perm) for lo, hi, perm, name in maps if name not in special}
    vdso = [m for m in maps if m[3] in special[:3]]
    assert vdso and vdso[0][0] == 0x20000000, maps
    assert [m[3] for m in vdso][-1] == "[vdso]"
    assert "[vsyscall]" in names
    if gadgets:
        assert got == expect, maps
    else:
        extra = got - expect
        assert got >= expect and len(extra) >= 1, maps   # the stub region
        assert all(lo >= 0x100000000000 for lo, _, _ in extra), maps


def test_handover_vdso_works_after_move():
    # Call the moved vdso's clock_gettime(CLOCK_MONOTONIC, BUF): it reads
    # [vvar]/[vvar_vclock], so it only returns 0 if the whole block moved.
    body = r'''
import ctypes
from elftools.elf.elffile import ELFFile
import io
start, length = vdso_block(_maps())
vdso_off = [lo for lo, hi, n in _maps() if n == "[vdso]"][0] - start
raw = ctypes.string_at([lo for lo, hi, n in _maps() if n == "[vdso]"][0], 8192)
sym = ELFFile(io.BytesIO(raw)).get_section_by_name(".dynsym").get_symbol_by_name("__vdso_clock_gettime")[0]
fn = VDSO_DST + vdso_off + sym["st_value"]
code = (b"\xbf\x01\0\0\0" + b"\xbe" + p32(BUF)           # mov $1,%edi; mov $BUF,%esi
        + b"\x48\xb8" + p64(fn) + b"\xff\xd0"             # movabs $fn,%rax; call *%rax
        + b"\x8d\x78\x07" + EXIT_EDI)                      # lea 7(%rax),%edi; exit
go(code, vdso_dst=VDSO_DST, vdso_len=VDSO_LEN)
'''
    r = run_child(body)
    assert r.returncode == 7, _line(r)


def test_handover_process_state():
    # comm, umask, personality, signal actions, the blocked mask from the
    # frame, and queued signals (thread-private SIGUSR1, process-wide
    # signal 34) pending because blocked: the code prints /proc/self/status
    # and /proc/self/personality.
    body = r'''
paths = b"/proc/self/status\0/proc/self/personality\0/proc/self/limits\0"
code = cat(DATA) + cat(DATA + 18) + cat(DATA + 41) + exit_imm(0)
info = lambda sig: struct.pack("<iii", sig, 0, -1) + bytes(116)     # SI_QUEUE
mask = (1 << 9) | (1 << 33)
go(code, paths, sigmask=mask, comm=b"restored-proc", umask=0o027,
   personality=0x0040000,
   sigactions={12: (1, 0, 0, 0), 2: (1, 0, 0, 0)},
   rlimits=((7, 200, 4096),),
   siginfo=((10, 1, info(10)), (34, 0, info(34))))
'''
    r = run_child(body)
    assert r.returncode == 0, _line(r)
    text = r.stdout.decode()
    f = dict(re.findall(r"^(\w+):\s*(.*)$", text, re.M))
    assert f["Name"] == "restored-proc"
    assert f["Umask"] == "0027"
    assert int(f["SigBlk"], 16) == (1 << 9) | (1 << 33)
    assert int(f["SigPnd"], 16) == 1 << 9
    assert int(f["ShdPnd"], 16) == 1 << 33
    assert int(f["SigIgn"], 16) == (1 << 11) | (1 << 1)
    assert int(f["SigCgt"], 16) == 0
    assert re.search(r"^00040000$", text, re.M), text
    assert re.search(r"^Max open files\s+200\s+4096\s+files", text, re.M), text


def test_handover_thread_state():
    # fs_base, rseq, sigaltstack, robust list and clear_child_tid arrive:
    # exit(%fs:0x10 [40] + (rseq cpu_id still -1 ? 100 : 0)
    #      + altstack size >> 12 [8] + (robust head - HEAD) + (tid addr - TIDA))
    body = r"""
TLS = 0x10500000
tls = bytearray(4096)
tls[0x10:0x14] = p32(40)
tls[0x104:0x108] = p32(0xFFFFFFFF)            # rseq.cpu_id: RSEQ_CPU_ID_UNINITIALIZED
code = (b"\x64\x8b\x1c\x25\x10\x00\x00\x00"     # mov %fs:0x10,%ebx
        b"\x8b\x04\x25" + p32(TLS + 0x104) +    # mov rseq.cpu_id,%eax
        b"\xff\xc0\x75\x03\x83\xc3\x64"         # inc %eax; jne 1f; add $100,%ebx; 1:
        b"\xb8\x83\x00\x00\x00\x31\xff\xbe" + p32(BUF + 0x200) + b"\x0f\x05"   # sigaltstack(0, BUF+0x200)
        b"\x8b\x04\x25" + p32(BUF + 0x210) + b"\xc1\xe8\x0c\x01\xc3"          # ebx += ss_size >> 12
        b"\xb8\x12\x01\x00\x00\x31\xff\xbe" + p32(BUF + 0x300)
        + b"\xba" + p32(BUF + 0x308) + b"\x0f\x05"                            # get_robust_list(0, ..)
        b"\x8b\x04\x25" + p32(BUF + 0x300) + b"\x2d" + p32(TLS + 0x200) + b"\x01\xc3"
        b"\xb8\x9d\x00\x00\x00\xbf\x28\x00\x00\x00\xbe" + p32(BUF + 0x310)
        + b"\x0f\x05"                                                          # prctl(PR_GET_TID_ADDRESS)
        b"\x8b\x04\x25" + p32(BUF + 0x310) + b"\x2d" + p32(TLS + 0x300) + b"\x01\xc3"
        b"\x89\xdf" + EXIT_EDI)                                                # exit(ebx)
image = Image()
tvma = PlanVma(TLS, TLS + 0x1000, 0, -1, PROT_READ | PROT_WRITE, PV_ANON, 0,
               (image.run(TLS, tls),))
thread = dict(fs_base=TLS, tid_address=TLS + 0x300, robust_head=TLS + 0x200,
              robust_len=24, rseq_addr=TLS + 0x100, rseq_len=32, rseq_sig=RSEQ_SIG,
              altstack_sp=BUF + 0x8000, altstack_size=0x8000, altstack_flags=0)
go(code, image=image, extra_vmas=(tvma,), thread=thread)
"""
    r = run_child(body)
    assert r.returncode == 48, _line(r)


@pytest.mark.parametrize("gadgets", [True, False])
def test_handover_several_threads(gadgets):
    # Thread 1 pause()s forever; thread 2 (created by the stub with
    # clone3, resumed from its own frame on its own stack) calls
    # exit_group(rdi + rbx) with rdi 40, rbx 3 from that frame. With the
    # gadgets thread 2 leaves through the target's "syscall; ret" and
    # thread 1 unmaps the stub; without them both sigreturn from the stub.
    g = ("gadget_syscall_ret=CODE + 0x100, gadget_sigreturn=CODE + 0x110"
         if gadgets else "gadget_syscall_ret=0, gadget_sigreturn=0")
    body = (_GADGETS.replace("code = cat(DATA) + exit_imm(0)\n",
                             "code = b'\\xb8\\x22\\0\\0\\0\\x0f\\x05\\xeb\\xf7'"
                             " + b'\\x01\\xdf\\xb8\\xe7\\0\\0\\0\\x0f\\x05'\n")
            + "t2 = regs(rip=CODE + 9, rsp=STACK + 0x8000, rdi=40, rbx=3)\n"
            + f"go(code, more_threads=(t2,), {g})\n")
    r = run_child(body)
    assert r.returncode == 43, _line(r)


def test_handover_runs_mapped_from_the_image(tmp_path):
    # PR_MAP runs: pages 1-2 of an anonymous RW VMA, all of a read-only
    # one, and page 1 of a private file mapping (page 0 stays the file's)
    # become private mappings of the image file at the runs' offsets,
    # with the VMA's prot. The code prints /proc/self/maps, then exits
    # with the sum of the first word of every page (a zero page adds 0)
    # after writing 100 into a mapped page (copy-on-write: the image
    # keeps its 11).
    body = f"""
image = Image({str(tmp_path / "image")!r})
M, R, F = 0x10600000, 0x10700000, 0x10800000
page = lambda v: p32(v) + bytes(4092)
ld = lambda op, a: op + b"\\x1c\\x25" + p32(a)
code = (cat(DATA)
        + b"\\xc7\\x04\\x25" + p32(M + 0x1000) + p32(100)   # movl $100,M+0x1000
        + ld(b"\\x8b", M) + ld(b"\\x03", M + 0x1000) + ld(b"\\x03", M + 0x2000)
        + ld(b"\\x03", M + 0x3000) + ld(b"\\x03", R) + ld(b"\\x03", F)
        + ld(b"\\x03", F + 0x1000) + b"\\x89\\xdf" + EXIT_EDI)
lib = open({str(tmp_path / "lib")!r}, "w+b"); lib.write(page(3) + page(4)); lib.flush()
libfd = high_fd(os.dup(lib.fileno()))
vmas = (PlanVma(M, M + 0x4000, 0, -1, PROT_READ | PROT_WRITE, PV_ANON, 0,
                (image.run(M + 0x1000, page(11) + page(22), PR_MAP),)),
        PlanVma(R, R + 0x1000, 0, -1, PROT_READ, PV_ANON, 0,
                (image.run(R, page(9), PR_MAP),)),
        PlanVma(F, F + 0x2000, 0, libfd, PROT_READ, 0, 0,
                (image.run(F + 0x1000, page(5), PR_MAP),)))
print(os.fstat(image.fd).st_ino, os.fstat(libfd).st_ino, flush=True)
go(code, b"/proc/self/maps\\0", image=image, extra_vmas=vmas)
"""
    r = run_child(body)
    assert r.returncode == 11 + 22 - 11 + 100 + 9 + 3 + 5, (r.returncode, _line(r))
    first, rest = r.stdout.split(b"\n", 1)
    ino, lib_ino = map(int, first.split())
    maps = {}
    for line in rest.decode().splitlines():
        parts = line.split(None, 5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        maps[lo, hi] = (parts[1], int(parts[2], 16), int(parts[4]))
    image_bytes = (tmp_path / "image").read_bytes()
    # Where the runs are in the image (each page's first word is unique).
    off = {v: image_bytes.find(struct.pack("<I", v) + bytes(4092)) for v in (11, 9, 5)}
    assert all(o >= 0 and o % 4096 == 0 for o in off.values()), off
    assert maps[0x10600000, 0x10601000] == ("rw-p", 0, 0), maps
    assert maps[0x10601000, 0x10603000] == ("rw-p", off[11], ino), maps
    assert maps[0x10603000, 0x10604000] == ("rw-p", 0, 0), maps
    assert maps[0x10700000, 0x10701000] == ("r--p", off[9], ino), maps
    assert maps[0x10800000, 0x10801000] == ("r--p", 0, lib_ino), maps
    assert maps[0x10801000, 0x10802000] == ("r--p", off[5], ino), maps
    assert image_bytes[off[11]:off[11] + 4] == struct.pack("<I", 11)    # not written through


# -- failures after the point of no return ------------------------------------

FAIL_PREFIX = "ckpt: restore failed after the point of no return: "


def test_failure_truncated_image_one_line():
    # The data VMA's run points past the end of the image file.
    body = ("img = Image()\n"
            "vma = PlanVma(0x10600000, 0x10601000, 0, -1, PROT_READ, PV_ANON, 0,\n"
            "              ((0x10600000, 4096, 1 << 30),))\n"
            "go(exit_imm(0), image=img, extra_vmas=(vma,))")
    r = run_child(body)
    assert r.returncode == 99
    lines = _line(r).splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].endswith("\n"), lines
    assert lines[0] == (FAIL_PREFIX + "map memory: truncated image: no page data "
                        "at 0x10600000\n")


def test_failure_bad_mapping_fd_one_line():
    # A file VMA whose fd is a directory: mmap fails with ENODEV.
    body = ("d = high_fd(os.open('/', os.O_RDONLY))\n"
            "vma = PlanVma(0x10600000, 0x10601000, 0, d, PROT_READ, 0, 0)\n"
            "go(exit_imm(0), extra_vmas=(vma,))")
    r = run_child(body)
    assert r.returncode == 99
    assert _line(r) == FAIL_PREFIX + "map memory: mmap (file) at 0x10600000 (errno 19)\n"


def test_failure_fault_is_reported_not_a_bare_sigsegv():
    # A gadget address inside a readable VMA whose pages lie past the end
    # of its file: reading it (the stub checks the bytes) raises SIGBUS,
    # which the stub's own handler reports.
    body = ("f = tempfile.TemporaryFile(); f.write(b'x'); f.flush()\n"
            "fd = high_fd(os.dup(f.fileno()))\n"
            "vma = PlanVma(0x10600000, 0x10602000, 0, fd, PROT_READ | PROT_EXEC, 0, 0)\n"
            "go(exit_imm(0), extra_vmas=(vma,), gadget_syscall_ret=0x10601000,\n"
            "   gadget_sigreturn=CODE)")
    r = run_child(body)
    assert r.returncode == 99, _line(r)
    assert _line(r) == FAIL_PREFIX + "thread state: fault: signal 7 at 0x10601000\n"


# -- checks before the point of no return -------------------------------------

def test_refused_before_no_return():
    body = r'''
import threading, dataclasses
from ckpt.errors import Status
def status(**kw):
    try:
        go(exit_imm(0), **kw)
    except CkptError as e:
        return e.status, str(e)
ev = threading.Event()
t = threading.Thread(target=ev.wait); t.start()
s1 = status()
ev.set(); t.join()
# join() returns before the kernel has ended the thread: wait for it to go.
import os, time
deadline = time.monotonic() + 10
while len(os.listdir("/proc/self/task")) > 1 and time.monotonic() < deadline:
    time.sleep(0.001)
s2 = status(vdso_dst=VDSO_DST, vdso_len=VDSO_LEN + 4096)
s3 = status(fds=(PlanFd(3, 5, False),))
print(int(s1[0]), int(s2[0]), int(s3[0]))
print(s1[1]); print(s2[1]); print(s3[1])
go(exit_imm(5))
'''
    r = run_child(body)
    out = r.stdout.decode().splitlines()
    assert out[0] == "70 18 70", (out, _line(r))
    assert "threads" in out[1] and "vdso" in out[2] and "fd_base" in out[3]
    assert r.returncode == 5, _line(r)      # and the launcher was still usable


# -- the plan ABI and the blob -------------------------------------------------

def test_plan_abi_matches_encoder_and_blob_has_no_relocations():
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    from ckpt.restore import _stub, plan as P
    from ckpt.restore.sigframe import GENERAL_REGS, build_sigframe

    abi = _stub.PLAN_ABI
    for name in ("PLAN_MAGIC", "PLAN_VERSION", "PLAN_AUXV_WORDS", "PV_SHARED", "PR_MAP",
                 "PV_ANON", "PV_GROWSDOWN", "PA_DONTFORK", "PA_DONTDUMP",
                 "PA_WIPEONFORK", "PA_HUGEPAGE", "PA_NOHUGEPAGE", "PA_MERGEABLE"):
        assert abi["consts"][name] == getattr(P, name), name
    S = abi["structs"]
    assert S["plan_mm"]["size"] == 104
    assert S["plan_sigaction"]["size"] == 32
    # Every struct is fully described: fields tile it without gaps.
    for sname, s in S.items():
        end = 0
        for f, (off, elem, count) in sorted(s["fields"].items(), key=lambda x: x[1]):
            assert off == end, (sname, f, off, end)
            end = off + elem * count
        assert end == s["size"], sname

    fa, frame = build_sigframe(dict.fromkeys(GENERAL_REGS, 0) | {"rsp": 0x10410000},
                               b"", 0)
    th = P.PlanThread(1, 2, 3, 4, 5, 24, 0, 0, 0, 0, 0, P.SS_DISABLE, fa, frame)
    vma = P.PlanVma(0x10400000, 0x10410000, 0, -1, 3, P.PV_ANON, P.PA_DONTDUMP,
                    ((0x10400000, 4096, 8192),))
    plan = P.Plan(60, 50, (vma,), (P.PlanFd(61, 4, True),), (th,), {10: (1, 2, 3, 4)},
                  ((7, 8, 9),), ((10, 1, bytes(range(128))),), tuple(range(11)),
                  (6, 4096, 0, 0), comm=b"abc", stop_after_step=3, stop_status=9)
    blob = P.encode(plan, stub_start=0x200000000000, stub_len=0x20000,
                    cur_rseq=(0x1000, 32, P.RSEQ_SIG), vdso_cur=0x7f0000000000,
                    vdso_park=0x200000018000, task_top=0x7FFFFFFFF000)
    H = S["plan_header"]["fields"]

    def get(base, st, f):
        off, elem, _ = S[st]["fields"][f]
        return int.from_bytes(blob[base + off:base + off + elem], "little")

    assert get(0, "plan_header", "magic") == P.PLAN_MAGIC
    assert get(0, "plan_header", "plan_size") == len(blob)
    assert (get(0, "plan_header", "nr_vmas"), get(0, "plan_header", "nr_runs"),
            get(0, "plan_header", "nr_fds"), get(0, "plan_header", "nr_threads"),
            get(0, "plan_header", "nr_siginfo"), get(0, "plan_header", "nr_rlimits")) \
        == (1, 1, 1, 1, 1, 1)
    assert get(0, "plan_header", "stop_after_step") == 3
    assert get(0, "plan_header", "cur_rseq_len") == 32
    v0 = get(0, "plan_header", "vmas_off")
    assert (get(v0, "plan_vma", "fd") == 0xFFFFFFFF and get(v0, "plan_vma", "prot") == 3
            and get(v0, "plan_vma", "advice") == P.PA_DONTDUMP)
    r0 = get(0, "plan_header", "runs_off")
    assert get(r0, "plan_run", "offset") == 8192
    t0 = get(0, "plan_header", "threads_off")
    assert get(t0, "plan_thread", "robust_len") == 24
    fo, fl = get(t0, "plan_thread", "frame_off"), get(t0, "plan_thread", "frame_len")
    assert blob[fo:fo + fl] == frame and get(t0, "plan_thread", "frame_addr") == fa
    sa = H["sigactions"][0] + 9 * H["sigactions"][1]
    assert struct.unpack_from("<4Q", blob, sa) == (1, 2, 3, 4)
    mm = H["mm"][0]
    assert struct.unpack_from("<11Q", blob, mm) == tuple(range(11))
    assert get(mm, "plan_mm", "auxv_size") == 32
    assert get(mm, "plan_mm", "exe_fd") == 0xFFFFFFFF
    si = get(0, "plan_header", "siginfo_off")
    assert blob[si + S["plan_siginfo"]["fields"]["info"][0]:][:128] == bytes(range(128))
    assert blob[H["comm"][0]:H["comm"][0] + 4] == b"abc\0"

    elf_path = ROOT / "restorer-stub" / "out" / "stub.elf"
    with open(elf_path, "rb") as f:
        elf = ELFFile(f)
        assert not any(isinstance(s, RelocationSection) and s.num_relocations()
                       for s in elf.iter_sections())
        assert not any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments())
    assert len(_stub.BLOB) <= _stub.MEM_SIZE and _stub.RX_SIZE <= _stub.MEM_SIZE
