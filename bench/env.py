"""The bench's world: a snapshot of ckpt, the programs, a user, a binfmt entry.

Everything the measured processes run lives in a world-readable directory
under /tmp (so a non-root user can run it too) and is fixed for the whole
run: ckpt is taken at the start from git HEAD (default), another revision
(--rev) or the working tree (--worktree: others may be editing it), its restorer stub built
from the same sources, its libraries copied from this python's install;
the C programs are compiled once. Images and scratch files go to a directory on /dev/shm (tmpfs).

Cleanup is unconditional (Env is a context manager): the binfmt entry is
unregistered, directories removed, and the user deleted if this run
created it.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile

from .proc import BenchError, BinfmtWatch, binfmt_entries

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROGRAMS = ("hold", "tiny", "ceiling")
PACKAGES = ("ckpt", "msgpack", "blake3", "click", "ptrace", "elftools")
BINFMT_DIR = "/proc/sys/fs/binfmt_misc"
USER = "ckpt-bench"
# Large installed packages the warm-start target also imports, when the
# system python has them (Debian's /usr/bin/python3 and its dist-packages).
EXTRA_MODULES = ("cryptography.x509", "cryptography.hazmat.primitives.ciphers",
                 "pygments.lexers.python", "yaml", "numpy", "requests")
SYSTEM_PYTHON = "/usr/bin/python3"


class Env:
    def __init__(self, source: str = "HEAD", keep: bool = False, want_user: bool = True,
                 want_binfmt: bool = True, log=print):
        self.source = source            # a git revision, or "worktree"
        self.keep, self.want_user, self.want_binfmt = keep, want_user, want_binfmt
        self.log = log
        self.notes: list[str] = []
        self.root = self.shm = None
        self.binfmt_name: str | None = None
        self.binfmt: BinfmtWatch | None = None
        self.user: str | None = None
        self.uid = self.gid = None
        self.created_user = False
        self.python = os.path.realpath(sys.executable)
        self.extra_modules: list[str] = []

    # -- setup ------------------------------------------------------------
    def __enter__(self) -> "Env":
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _setup(self) -> None:
        self.root = tempfile.mkdtemp(prefix="ckpt-bench-", dir="/tmp")
        os.chmod(self.root, 0o755)
        self.shm = tempfile.mkdtemp(prefix="ckpt-bench-", dir="/dev/shm")
        os.chmod(self.shm, 0o755)
        self.bin = os.path.join(self.root, "bin")
        self.lib = os.path.join(self.root, "lib")
        os.makedirs(self.bin)
        self._copy_packages()
        self._compile()
        shutil.copy(os.path.join(HERE, "programs", "warm.py"), self.root)
        shutil.copytree(HERE, os.path.join(self.root, "bench"),
                        ignore=shutil.ignore_patterns("__pycache__", "out", "*.c"))
        for d in (self.root, self.shm):
            subprocess.run(["chmod", "-R", "a+rX", d], check=True)
        self.ckpt_env = {k: v for k, v in os.environ.items()
                         if not k.startswith(("CKPT_", "PYTHON"))}
        self.ckpt_env["PYTHONPATH"] = self.lib
        # Restore tickets (the native launcher) in a cache of the bench's own.
        self.ckpt_env["XDG_CACHE_HOME"] = self.shm
        self.ckpt = [self.python, "-m", "ckpt"]
        self._check_ckpt()
        self.extra_modules = self._extra_modules()
        if os.geteuid() == 0 and self.want_binfmt:
            self._register()
        elif self.want_binfmt:
            self.notes.append("not root: no binfmt entry, restores run `ckpt restore`")
        if os.geteuid() == 0 and self.want_user:
            self._make_user()

    def _copy_packages(self) -> None:
        """ckpt (from HEAD or the working tree, its stub built here) and the
        libraries it imports, as they are installed for this python."""
        src = os.path.join(self.root, "src")
        os.makedirs(src)
        if self.source != "worktree":
            git = subprocess.run(["git", "-C", REPO, "archive", self.source, "ckpt",
                                  "restorer-stub"], capture_output=True)
            if git.returncode:
                raise BenchError(f"git archive {self.source} failed: "
                                 f"{git.stderr.decode().strip()}")
            subprocess.run(["tar", "-x", "-C", src], input=git.stdout, check=True)
        else:
            for name in ("ckpt", "restorer-stub"):
                shutil.copytree(os.path.join(REPO, name), os.path.join(src, name),
                                ignore=shutil.ignore_patterns("__pycache__", "out", "_stub.py"))
        shutil.copytree(os.path.join(src, "ckpt"), os.path.join(self.lib, "ckpt"),
                        ignore=shutil.ignore_patterns("__pycache__", "_stub.py"))
        r = subprocess.run([sys.executable, os.path.join(src, "restorer-stub", "build.py"),
                            os.path.join(self.lib, "ckpt", "restore", "_stub.py")],
                           capture_output=True, text=True)
        if r.returncode:
            raise BenchError(f"building the restorer stub failed:\n{r.stderr[-2000:]}")
        for name in PACKAGES:
            if name == "ckpt":
                continue
            mod = __import__(name)
            shutil.copytree(os.path.dirname(mod.__file__), os.path.join(self.lib, name),
                            ignore=shutil.ignore_patterns("__pycache__"))
        # Byte-compiled, as an installed package is (pip compiles on install);
        # other users can't write __pycache__ here.
        subprocess.run([self.python, "-m", "compileall", "-q", self.lib], check=True,
                       capture_output=True)

    def _compile(self) -> None:
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise BenchError("no C compiler (gcc) to build bench/programs")
        for name in PROGRAMS:
            r = subprocess.run([gcc, "-O2", "-Wall", "-o", os.path.join(self.bin, name),
                                os.path.join(HERE, "programs", f"{name}.c")],
                               capture_output=True, text=True)
            if r.returncode:
                raise BenchError(f"compiling bench/programs/{name}.c failed:\n{r.stderr}")

    def _check_ckpt(self) -> None:
        r = subprocess.run(self.ckpt + ["--help"], env=self.ckpt_env,
                           capture_output=True, text=True, cwd=self.root)
        if r.returncode:
            raise BenchError(f"the ckpt snapshot does not run: {r.stderr.strip()[-800:]}")

    def _extra_modules(self) -> list[str]:
        found = []
        for name in EXTRA_MODULES:
            r = subprocess.run([SYSTEM_PYTHON, "-I", "-c", f"import {name}"],
                               capture_output=True, cwd=self.root)
            if r.returncode == 0:
                found.append(name)
        return found

    def _register(self) -> None:
        if not os.path.exists(os.path.join(BINFMT_DIR, "register")):
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT_DIR],
                           capture_output=True)
        name = f"ckpt-bench-{os.getpid()}"
        magic = subprocess.run([self.python, "-c", "from ckpt.image.format import MAGIC; "
                                "print(MAGIC.hex())"], env=self.ckpt_env, capture_output=True,
                               text=True, cwd=self.root).stdout.strip()
        baseline = binfmt_entries(magic)    # before ours: all older than ours
        r = subprocess.run(self.ckpt + ["binfmt", "register", "--name", name, "--launcher",
                                        os.path.join(self.root, "ckpt-launcher")],
                           env=self.ckpt_env, capture_output=True, text=True, cwd=self.root)
        if r.returncode:
            self.notes.append(f"binfmt register failed ({r.stderr.strip()}): "
                              "./app.ckpt figures missing")
            return
        self.binfmt_name = name
        self.binfmt = BinfmtWatch(name, magic, baseline)
        if baseline:
            self.notes.append(f"other binfmt entries also run ckpt images: "
                              f"{sorted(n for n, _ in baseline)} (older: ours, '{name}', "
                              "is tried first)")

    def _make_user(self) -> None:
        for path in (self.python, SYSTEM_PYTHON):
            if not _world_reachable(path):
                self.notes.append(f"{path} is not reachable by other users: "
                                  "no non-root measurements")
                return
        try:
            pw = pwd.getpwnam(USER)
        except KeyError:
            r = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                                "/usr/sbin/nologin", USER], capture_output=True, text=True)
            if r.returncode:
                self.notes.append(f"cannot create user {USER} ({r.stderr.strip()}): "
                                  "no non-root measurements")
                return
            self.created_user = True
            pw = pwd.getpwnam(USER)
        self.user, self.uid, self.gid = USER, pw.pw_uid, pw.pw_gid
        for d in (self.root, self.shm):
            home = os.path.join(d, "user")
            os.mkdir(home)
            os.chown(home, self.uid, self.gid)

    def user_dir(self, base: str) -> str:
        return os.path.join(base, "user")

    # -- teardown ---------------------------------------------------------
    def close(self) -> None:
        if self.binfmt_name:
            path = os.path.join(BINFMT_DIR, self.binfmt_name)
            try:
                with open(path, "w") as f:
                    f.write("-1")
            except FileNotFoundError:
                pass
            except OSError as e:
                print(f"bench: cannot unregister binfmt entry {self.binfmt_name}: {e}",
                      file=sys.stderr)
            self.binfmt_name = None
        if not self.keep:
            for d in (self.root, self.shm):
                if d:
                    shutil.rmtree(d, ignore_errors=True)
        if self.created_user:
            subprocess.run(["userdel", USER], capture_output=True)
            self.created_user = False


def _world_reachable(path: str) -> bool:
    path = os.path.abspath(path)
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        sub = "/".join(parts[:i]) or "/"
        try:
            st = os.stat(sub)
        except OSError:
            return False
        need = 0o001 if os.path.isdir(sub) else 0o004
        if not st.st_mode & need:
            return False
    return True
