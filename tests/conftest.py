"""Harness for the end-to-end tests: real programs, real ptrace, real restore.

- The pytest process is a child subreaper (PR_SET_CHILD_SUBREAPER): PID 1 of
  these machines does not reap orphans, and a restored process or a target's
  grandchild must not be left as a zombie. Zombies are reaped after each
  test, once every process a test started has been waited for.
- `ckpt` runs as `[sys.executable, "-m", "ckpt", ...]`, from this checkout
  (PYTHONPATH=repo root) when it has the built stub, else the installed one
  (CKPT_TEST_INSTALLED=1 forces the installed one).
- Targets start with close_fds=True (shells leak fds), in a new session,
  stdin /dev/null, stdout/stderr to files; each is killed (its process
  group, by id) at teardown.
- Test programs (tests/programs/*.c) are compiled once per session with the
  system gcc into a temp dir.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROGRAMS = pathlib.Path(__file__).resolve().parent / "programs"
PR_SET_CHILD_SUBREAPER = 36
CKPT = [sys.executable, "-m", "ckpt"]


def _ckpt_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CKPT_DEBUG", None)
    in_tree = (ROOT / "ckpt" / "restore" / "_stub.py").exists()
    if in_tree and not os.environ.get("CKPT_TEST_INSTALLED"):
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


CKPT_ENV = _ckpt_env()


def pytest_configure(config) -> None:
    # Restore tickets go to the suite's own cache, not the caller's ~/.cache
    # (tests that check the cache location set their own).
    cache = pathlib.Path(tempfile.mkdtemp(prefix="ckpt-test-cache-"))
    os.environ["XDG_CACHE_HOME"] = CKPT_ENV["XDG_CACHE_HOME"] = str(cache)
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_zombies() -> None:
    """Reap every child that has exited (orphans we inherited as subreaper).
    Only called when no Popen of ours is still waiting for its child."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# --- running ckpt ----------------------------------------------------------------

@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def __iter__(self):
        return iter((self.returncode, self.stdout, self.stderr))

    def __str__(self) -> str:
        return (f"status {self.returncode}\n--- stdout ---\n{self.stdout[-3000:]}"
                f"\n--- stderr ---\n{self.stderr[-3000:]}")


def ckpt(*args: str, timeout: float = 60, cwd: str | os.PathLike | None = None,
         prefix: list[str] | None = None, env: dict | None = None) -> Result:
    """Run `ckpt ARGS...` to completion; stdin is /dev/null."""
    argv = (prefix or []) + CKPT + [str(a) for a in args]
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                           close_fds=True, timeout=timeout, env=env or CKPT_ENV,
                           cwd=cwd or ROOT, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`ckpt {' '.join(map(str, args))}` did not finish in {timeout} s; "
                    f"stdout {e.stdout!r:.1000} stderr {e.stderr!r:.1000}")
    return Result(p.returncode, p.stdout.decode(errors="replace"),
                  p.stderr.decode(errors="replace"))


def dump(pid: int, image: os.PathLike | str, *extra: str) -> Result:
    """`ckpt dump PID -o IMAGE`, which must succeed."""
    r = ckpt("dump", str(pid), "-o", str(image), *extra)
    assert r.returncode == 0, f"dump of {pid} failed: {r}"
    assert os.path.getsize(image) > 0
    return r


def restore(image: os.PathLike | str, timeout: float = 60) -> Result:
    """`ckpt restore IMAGE` as a subprocess: the restored program's exit
    status, stdout and stderr (its fds 0-2 are the restore command's)."""
    return ckpt("restore", str(image), timeout=timeout)


def restore_popen(image: os.PathLike | str, stdout, stderr) -> subprocess.Popen:
    return subprocess.Popen(CKPT + ["restore", str(image)], stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr, close_fds=True,
                            env=CKPT_ENV, cwd=ROOT, start_new_session=True)


def inspect_json(image: os.PathLike | str) -> dict:
    r = ckpt("inspect", "--json", str(image))
    assert r.returncode == 0, f"inspect failed: {r}"
    return json.loads(r.stdout)


def fd_pos(image: os.PathLike | str, fd: int) -> int:
    """The saved offset of fd in IMAGE."""
    for d in inspect_json(image)["fds"]:
        if d["fd"] == fd:
            return d["pos"]
    raise AssertionError(f"fd {fd} not in image {image}")


# --- targets ---------------------------------------------------------------------

class Target:
    """A started target program. stdout/stderr go to files in `dir`."""

    def __init__(self, argv: list[str], dir: pathlib.Path, name: str, cwd=None,
                 env=None):
        self.argv = [str(a) for a in argv]
        self.stdout_path = dir / f"{name}.stdout"
        self.stderr_path = dir / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                close_fds=True, start_new_session=True, cwd=cwd or dir, env=env)
        self.pid = self.popen.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def state(self) -> str:
        """/proc/PID/status State letter ('R', 'S', 't', 'T', 'Z', ...)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split()[1]
        return "?"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> int:
        """SIGKILL the target (and its process group) and wait for it.
        Once it has been reaped its pid may be reused: nothing is sent."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        for send in (lambda: os.killpg(self.pid, signal.SIGKILL),
                     lambda: os.kill(self.pid, signal.SIGKILL)):
            try:
                send()
            except (ProcessLookupError, PermissionError):
                pass
        return self.popen.wait(timeout=30)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.argv[0]} (pid {self.pid}) did not finish in {timeout} s")


@pytest.fixture
def start(tmp_path):
    """start(argv, name=...) -> Target; every target is killed at teardown."""
    started: list[Target] = []

    def _start(argv, name: str | None = None, **kw) -> Target:
        name = name or f"{pathlib.Path(str(argv[0])).name}-{len(started)}"
        t = Target(list(argv), tmp_path, name, **kw)
        started.append(t)
        return t

    yield _start
    for t in started:
        t.kill()
    reap_zombies()


@pytest.fixture(autouse=True)
def _reap_after_test():
    yield
    reap_zombies()


def wait_for(predicate, timeout: float = 30, what: str = "condition", interval=0.01):
    """Poll predicate() until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def read_lines(path: os.PathLike | str) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def wait_lines(path, n: int, timeout: float = 30, target: Target | None = None) -> list[str]:
    """Wait until the file has at least n complete lines."""
    def ready():
        if target is not None and not target.alive():
            pytest.fail(f"{target.argv[0]} exited ({target.popen.returncode}) before "
                        f"writing {n} lines to {path}: {target.stderr()}")
        try:
            data = pathlib.Path(path).read_text(errors="replace")
        except FileNotFoundError:
            return None
        lines = data.split("\n")[:-1]
        return lines if len(lines) >= n else None
    return wait_for(ready, timeout, f"{n} lines in {path}")


# --- test programs ----------------------------------------------------------------

@pytest.fixture(scope="session")
def program_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("programs")


@pytest.fixture(scope="session")
def programs(program_dir):
    """programs("heap") -> path of tests/programs/heap.c compiled (once)."""
    cache: dict[str, pathlib.Path] = {}
    gcc = shutil.which("gcc") or shutil.which("cc")

    def build(name: str, *, out: pathlib.Path | None = None, defines=()) -> pathlib.Path:
        key = name if out is None and not defines else None
        if key in cache:
            return cache[key]
        if gcc is None:
            pytest.skip("no C compiler (gcc) to build the test programs")
        dest = out or program_dir / name
        cmd = [gcc, "-O2", "-Wall", "-Wl,--build-id", "-o", str(dest),
               str(PROGRAMS / f"{name}.c")] + [f"-D{d}" for d in defines]
        r = subprocess.run(cmd, capture_output=True, text=True, close_fds=True)
        assert r.returncode == 0, f"compiling {name}.c failed:\n{r.stderr}"
        if key:
            cache[key] = dest
        return dest

    return build
