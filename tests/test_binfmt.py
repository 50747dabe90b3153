"""Executable images: binfmt_misc, the launcher, credentials (issue #5).

Real binfmt_misc entries (named per test session, always removed), real
users created here, real exec. ckpt runs from a copy of the install in a
world-readable directory, so users other than root can run the launcher.
"""
from __future__ import annotations

import errno
import os
import pathlib
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

from ckpt import binfmt
from ckpt.image.format import MAGIC
from conftest import ROOT, wait_lines

USERS = ("ckpt-t1", "ckpt-t2")
PACKAGES = ("ckpt", "msgpack", "blake3", "click", "ptrace", "elftools")
PYTHON = os.path.realpath(sys.executable)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (binfmt_misc, users)")


# --- fixtures ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def shared(programs):
    """A world-readable directory: ckpt and its libraries, the test programs."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="ckpt-shared-", dir="/tmp"))
    d.chmod(0o755)
    lib = d / "lib"
    for name in PACKAGES:
        src = pathlib.Path(__import__(name).__file__).parent
        shutil.copytree(src, lib / name, ignore=shutil.ignore_patterns("__pycache__"))
    for prog in ("ticker", "execer"):
        programs(prog, out=d / prog)
    for user in USERS:
        if subprocess.run(["id", user], capture_output=True).returncode:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", user], check=True)
        home = d / user
        home.mkdir()
        shutil.chown(home, user, user)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def entry(shared):
    """A binfmt_misc entry of this test's own, removed at the end."""
    name = f"ckpt-test-{os.getpid()}"
    r = run_ckpt(shared, "binfmt", "register", "--name", name,
                 "--launcher", str(shared / "ckpt-launcher"))
    assert r.returncode == 0, r.stderr
    try:
        yield name
    finally:
        run_ckpt(shared, "binfmt", "unregister", "--name", name)
        assert not os.path.exists(f"{binfmt.PROC_DIR}/{name}")


def as_user(user: str | None) -> list[str]:
    if user is None:
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]


def run(argv, *, user=None, env=None, timeout=60, cwd=None):
    return subprocess.run(as_user(user) + [str(a) for a in argv], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, close_fds=True,
                          timeout=timeout, env=env, cwd=cwd or "/")


def ckpt_env(shared: pathlib.Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
    env["PYTHONPATH"] = str(shared / "lib")
    env.update(extra)
    return env


def run_ckpt(shared, *args, user=None, **extra):
    return run([PYTHON, "-m", "ckpt", *args], user=user, env=ckpt_env(shared, **extra))


def dumped_ticker(shared, start, image: pathlib.Path, user=None) -> list[str]:
    """Start the ticker (as user), let it tick, dump it with --kill; return
    the lines it printed before it was frozen."""
    t = start(as_user(user) + [str(shared / "ticker"), "60"], cwd=str(shared))
    wait_lines(t.stdout_path, 3, target=t)
    r = run_ckpt(shared, "dump", str(t.pid), "-o", str(image), "--kill", user=user)
    assert r.returncode == 0, r.stderr
    t.wait()
    return t.stdout().splitlines()


def ticks(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        words = line.split()
        out.append(dict(zip(words[::2], (int(w) for w in words[1::2]))))
    return out


def check_continues(before: list[str], result, pid: int, uid: int) -> None:
    assert result.returncode == 3, f"status {result.returncode}: {result.stderr}"
    after = ticks(result.stdout)
    assert after, result.stderr
    assert after[0]["tick"] == ticks("\n".join(before))[-1]["tick"] + 1
    assert [t["tick"] for t in after] == list(range(after[0]["tick"], 60))
    assert {t["pid"] for t in after} == {pid}
    assert {(t["uid"], t["euid"]) for t in after} == {(uid, uid)}


# --- the exec path --------------------------------------------------------------------

def test_exec_image_restores_in_place(shared, entry, start):
    image = shared / "root-ticker.ckpt"
    before = dumped_ticker(shared, start, image)
    assert os.stat(image).st_mode & 0o111, "image is not executable"
    p = subprocess.Popen([str(image), "extra", "args"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, close_fds=True)
    out, err = p.communicate(timeout=60)
    check_continues(before, subprocess.CompletedProcess(p.args, p.returncode, out, err),
                    pid=p.pid, uid=0)


def test_execve_from_c(shared, entry, start):
    image = shared / "root-ticker-c.ckpt"
    before = dumped_ticker(shared, start, image)
    p = subprocess.Popen([str(shared / "execer"), str(image)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, close_fds=True)
    out, err = p.communicate(timeout=60)
    check_continues(before, subprocess.CompletedProcess(p.args, p.returncode, out, err),
                    pid=p.pid, uid=0)


def other_entries() -> list[str]:
    """Enabled entries (not ours) that would also run ckpt images."""
    names = []
    for name in os.listdir(binfmt.PROC_DIR):
        e = binfmt.read_entry(name) if name not in ("register", "status") else None
        if e and e["state"] == "enabled" and e.get("magic") == MAGIC.hex():
            names.append(name)
    return names


def test_disable_enable_unregister(shared, start):
    name = f"ckpt-test-{os.getpid()}-toggle"
    if other_entries():
        pytest.skip(f"binfmt entries {other_entries()} already run ckpt images here")
    image = shared / "toggle.ckpt"
    dumped_ticker(shared, start, image)
    assert run_ckpt(shared, "binfmt", "register", "--name", name, "--launcher",
                    str(shared / "ckpt-launcher")).returncode == 0
    try:
        assert run_ckpt(shared, "binfmt", "register", "--name", name, "--launcher",
                        str(shared / "ckpt-launcher")).returncode == 0   # twice: fine
        r = run_ckpt(shared, "binfmt", "status", "--name", name)
        assert "registered and enabled" in r.stdout and "ckpt-launcher" in r.stdout
        assert run_ckpt(shared, "binfmt", "disable", "--name", name).returncode == 0
        with pytest.raises(OSError) as e:
            subprocess.run([str(image)], capture_output=True, timeout=30)
        assert e.value.errno == errno.ENOEXEC
        assert "disabled" in run_ckpt(shared, "binfmt", "status", "--name", name).stdout
        assert run_ckpt(shared, "binfmt", "enable", "--name", name).returncode == 0
        r = run([image])
        assert r.returncode == 3, r.stderr
    finally:
        assert run_ckpt(shared, "binfmt", "unregister", "--name", name).returncode == 0
    assert not os.path.exists(f"{binfmt.PROC_DIR}/{name}")
    r = run_ckpt(shared, "binfmt", "unregister", "--name", name)
    assert r.returncode == 0 and "not registered" in r.stdout
    with pytest.raises(OSError) as e:
        subprocess.run([str(image)], capture_output=True, timeout=30)
    assert e.value.errno == errno.ENOEXEC


# --- credentials -------------------------------------------------------------------

def test_user_dumps_and_runs_own_image(shared, entry, start):
    user = USERS[0]
    image = shared / user / "app.ckpt"
    before = dumped_ticker(shared, start, image, user=user)
    uid = pwd.getpwnam(user).pw_uid
    p = subprocess.Popen(as_user(user) + [str(image)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, close_fds=True, cwd="/")
    out, err = p.communicate(timeout=60)
    check_continues(before, subprocess.CompletedProcess(p.args, p.returncode, out, err),
                    pid=p.pid, uid=uid)


def test_user_cannot_dump_roots_process(shared, start):
    t = start([str(shared / "ticker"), "1000"], cwd=str(shared))
    wait_lines(t.stdout_path, 1, target=t)
    r = run_ckpt(shared, "dump", str(t.pid), "-o", f"/tmp/never-{t.pid}.ckpt",
                 user=USERS[0])
    assert r.returncode == 21, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "ptrace" in r.stderr
    assert t.alive() and t.state() not in ("t", "T")
    assert not os.path.exists(f"/tmp/never-{t.pid}.ckpt")


def test_other_users_image_needs_a_choice(shared, entry, start):
    owner = USERS[0]
    image = shared / owner / "creds.ckpt"
    dumped_ticker(shared, start, image, user=owner)
    uid = pwd.getpwnam(owner).pw_uid

    refused = run([image], env=ckpt_env(shared))
    assert refused.returncode == 15, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "--as-caller" in refused.stderr and f"uids {uid}" in refused.stderr

    mine = run([image], env=ckpt_env(shared, CKPT_AS_CALLER="1"))
    assert mine.returncode == 3, mine.stderr
    assert {(t["uid"], t["gid"]) for t in ticks(mine.stdout)} == {(0, 0)}

    theirs = run([image], env=ckpt_env(shared, CKPT_RESTORE_CREDS="1"))
    assert theirs.returncode == 3, theirs.stderr
    assert {(t["uid"], t["euid"]) for t in ticks(theirs.stdout)} == {(uid, uid)}

    other = run([image], user=USERS[1], env=ckpt_env(shared, CKPT_RESTORE_CREDS="1"))
    assert other.returncode == 15, other.stderr
    assert "kernel refused" in other.stderr and other.stdout == ""


# --- the admin files ------------------------------------------------------------------

def test_admin_files_match_the_registration():
    conf = (ROOT / "binfmt" / "ckpt.conf").read_text()
    assert conf == binfmt.systemd_conf()
    # systemd-binfmt: one registration string per non-comment line.
    lines = [ln for ln in conf.splitlines() if ln and not ln.startswith(("#", ";"))]
    assert len(lines) == 1
    # :name:type:offset:magic:mask:interpreter:flags
    empty, name, kind, offset, magic, mask, interpreter, flags = lines[0].split(":")
    assert (empty, name, kind, offset, mask) == ("", "ckpt", "M", "", "")
    assert bytes.fromhex(magic.replace("\\x", "")) == MAGIC
    assert os.path.isabs(interpreter) and "C" not in flags

    support = (ROOT / "binfmt" / "ckpt.binfmt-support").read_text()
    assert support == binfmt.binfmt_support()
    kv = dict(line.split(" ", 1) for line in support.splitlines())
    assert {"package", "interpreter", "magic", "offset"} <= kv.keys()
    assert kv["credentials"] == "no"
    assert bytes.fromhex(kv["magic"].replace("\\x", "")) == MAGIC
