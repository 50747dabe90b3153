"""Spawning and timing processes: the measuring primitives.

Standard library only (the worker runs this as another user, from a copy).
Every child is started with posix_spawn (vfork-like: the bench's own size
does not slow the spawn), its fds 0-2 set explicitly, everything else
close-on-exec. Times are CLOCK_MONOTONIC nanoseconds taken in this process
just before the spawn and just after the event (first byte read from the
child's stdout, or wait4 returning). Every child is waited for here; the
bench is a child subreaper, so orphans are ours to reap (reap_zombies).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import time

PR_SET_CHILD_SUBREAPER = 36
DEVNULL = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


class BenchError(Exception):
    """A measurement could not be taken (a child failed, timed out, ...)."""


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def cloexec_inherited_fds() -> None:
    """Mark every fd above 2 close-on-exec: some shells leak fds into us,
    and the dumper refuses a target holding, say, an inherited pipe."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass            # the directory's own fd, already closed


def reap_zombies() -> None:
    """Reap every child that has already exited (orphans adopted as subreaper).
    Called only between measurements, when no wait of ours is pending."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def now() -> int:
    return time.monotonic_ns()


def spawn(argv: list[str], *, stdin: int = DEVNULL, stdout: int = DEVNULL,
          stderr: int = DEVNULL, env: dict | None = None) -> int:
    """Start argv[0] (a path) with the given fds as 0, 1, 2."""
    actions = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
               (os.POSIX_SPAWN_DUP2, stderr, 2)]
    return os.posix_spawn(argv[0], argv, os.environ if env is None else env,
                          file_actions=actions)


def kill(pid: int) -> None:
    """SIGKILL a child of ours (by pid) and reap it."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def wait(pid: int, timeout: float):
    """wait4(pid): (end ns, exit status or -signal, rusage). A pidfd says
    when it exits (no polling delay); killed if it outlives the timeout."""
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            kill(pid)
            raise BenchError(f"pid {pid} did not exit within {timeout:.0f} s")
        t = now()
        _, status, ru = os.wait4(pid, 0)
        return t, _code(status), ru
    finally:
        os.close(pidfd)


def _code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def read_exact(fd: int, n: int, timeout: float, what: str) -> bytes:
    """n bytes from fd, or BenchError on EOF/timeout."""
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BenchError(f"timed out waiting for {what}")
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise BenchError(f"EOF while waiting for {what} (got {out!r})")
        out += chunk
    return out


@contextlib.contextmanager
def ready_target(argv: list[str], timeout: float, what: str):
    """Start argv with its stdin and stdout on pipes, wait for its first
    byte ("ready"), yield its pid; kill it and close the pipes after."""
    rin, win = os.pipe()
    rout, wout = os.pipe()
    pid = spawn(argv, stdin=rin, stdout=wout)
    os.close(rin)
    os.close(wout)
    try:
        read_exact(rout, 1, timeout, what)
        yield pid
    finally:
        kill(pid)
        os.close(win)
        os.close(rout)


def stderr_file(directory: str) -> tuple[int, str]:
    """A fresh file for a child's stderr (kept for diagnostics)."""
    path = os.path.join(directory, f"stderr-{os.getpid()}-{time.monotonic_ns()}.txt")
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644), path


def tail(path: str, n: int = 600) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:].strip()
    except OSError:
        return ""


def time_to_exit(argv: list[str], *, env=None, timeout: float = 60,
                 stdout: int = DEVNULL, errdir: str | None = None) -> dict:
    """Spawn argv, wait for it: {"ns", "status", "maxrss_kib"}."""
    err, path = stderr_file(errdir) if errdir else (DEVNULL, None)
    try:
        t0 = now()
        pid = spawn(argv, stdout=stdout, stderr=err, env=env)
        t1, status, ru = wait(pid, timeout)
    finally:
        if path:
            os.close(err)
    res = {"ns": t1 - t0, "status": status, "maxrss_kib": ru.ru_maxrss}
    if status != 0:
        raise BenchError(f"{' '.join(argv)} exited with {status}: "
                         f"{tail(path) if path else ''}")
    if path:
        os.unlink(path)
    return res


def time_to_bytes(argv: list[str], stdin_data: bytes, marks: bytes, *, env=None,
                  timeout: float = 120, errdir: str | None = None,
                  expect_status: int | None = 0) -> dict:
    """Spawn argv with stdin_data waiting on its stdin (then EOF); time when
    each byte of `marks` arrives on its stdout, in order, and its exit.

    Returns {"marks": [ns...], "exit_ns", "status", "maxrss_kib"}; the first
    mark is "exec -> answering". Any other output, a wrong byte or a wrong
    status is a BenchError (with the child's stderr)."""
    rin, win = os.pipe()
    rout, wout = os.pipe()
    err, path = stderr_file(errdir) if errdir else (DEVNULL, None)
    pid = None
    try:
        if stdin_data:
            os.write(win, stdin_data)       # fits in the pipe: a few bytes
        os.close(win)
        win = -1
        t0 = now()
        pid = spawn(argv, stdin=rin, stdout=wout, stderr=err, env=env)
        os.close(rin)
        os.close(wout)
        rin = wout = -1
        times = []
        for i, want in enumerate(marks):
            got = read_exact(rout, 1, timeout, f"byte {chr(want)!r} from {argv[0]}")
            t = now()
            if got[0] != want:
                raise BenchError(f"{argv[0]}: expected {chr(want)!r}, got {got!r}")
            times.append(t - t0)
        rest = b""
        while True:                         # until EOF (the child exits)
            if not select.select([rout], [], [], timeout)[0]:
                raise BenchError(f"{argv[0]} did not close its stdout")
            chunk = os.read(rout, 4096)
            if not chunk:
                break
            rest += chunk
        t_exit, status, ru = wait(pid, timeout)
        pid = None
        if rest or (expect_status is not None and status != expect_status):
            raise BenchError(f"{' '.join(argv)}: status {status}, extra output "
                             f"{rest[:200]!r}")
        return {"marks": times, "exit_ns": t_exit - t0, "status": status,
                "maxrss_kib": ru.ru_maxrss}
    except BenchError as e:
        if pid is not None:
            kill(pid)
            pid = None
        msg = tail(path) if path else ""
        raise BenchError(f"{e}; its stderr: {msg}" if msg else str(e)) from None
    finally:
        if pid is not None:
            kill(pid)
        for fd in (rin, win, wout, rout):
            if fd >= 0:
                os.close(fd)
        if path:
            os.close(err)
            try:
                os.unlink(path)
            except OSError:
                pass


# -- binfmt_misc ---------------------------------------------------------------------
# Entries are machine-wide and the kernel tries the newest first. Other
# sessions (a test run) may register their own entry for ckpt images while
# we measure: then ./img runs their launcher. Such a sample is not ours:
# wait until the newer entry is gone, and measure again if one appeared
# meanwhile. We never re-register over them (that would hijack their execs).

BINFMT_DIR = "/proc/sys/fs/binfmt_misc"


def binfmt_entries(magic_hex: str, exclude: str | None = None) -> set[tuple[str, int]]:
    """(name, inode) of the enabled entries for ckpt images; a re-registered
    entry of the same name has a new inode."""
    out = set()
    try:
        names = os.listdir(BINFMT_DIR)
    except OSError:
        return out
    for name in names:
        if name in ("register", "status", exclude):
            continue
        path = os.path.join(BINFMT_DIR, name)
        try:
            with open(path) as f:
                text = f.read()
            ino = os.stat(path).st_ino
        except OSError:
            continue
        if text.startswith("enabled") and f"magic {magic_hex}" in text:
            out.add((name, ino))
    return out


class BinfmtWatch:
    def __init__(self, ours: str, magic_hex: str, baseline):
        self.ours, self.magic_hex = ours, magic_hex
        self.baseline = {tuple(x) for x in baseline}
        self.waited = 0.0
        self.redone = 0

    def newer(self) -> set:
        return binfmt_entries(self.magic_hex, self.ours) - self.baseline

    def run(self, fn, timeout: float = 300):
        """fn() while no newer entry shadows ours (before and after it)."""
        for _ in range(20):
            t0 = time.monotonic()
            while self.newer():
                if time.monotonic() - t0 > timeout:
                    raise BenchError(f"binfmt entries {sorted(self.newer())} shadowed ours "
                                     f"for {timeout:.0f} s")
                time.sleep(0.05)
            self.waited += time.monotonic() - t0
            res = fn()
            if not self.newer():
                return res
            self.redone += 1
        raise BenchError("newer binfmt entries kept shadowing ours")

    def state(self) -> dict:
        return {"waited_s": round(self.waited, 2), "redone": self.redone}

    def config(self) -> dict:
        return {"ours": self.ours, "magic_hex": self.magic_hex,
                "baseline": sorted(self.baseline)}
