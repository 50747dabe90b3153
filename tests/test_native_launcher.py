"""Restore tickets and the native launcher (issue #7).

The Python launcher writes a ticket after a restore that passed every
check (ckpt.restore.ticket); the native launcher (restorer-stub/launcher.c),
which binfmt_misc runs, repeats that restore without Python while the key
matches and the files are the same, and otherwise runs the Python launcher.
Which path ran is seen without strace: the Python launcher registered here
is wrapped by a script that counts its runs in a file.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import stat
import struct
import subprocess
import sys
import tempfile

import pytest

from ckpt import binfmt
from ckpt.restore import ticket
from conftest import wait_lines

PACKAGES = ("ckpt", "msgpack", "blake3", "click", "ptrace", "elftools")
PYTHON = os.path.realpath(sys.executable)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (binfmt_misc)")


# --- fixtures ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(programs):
    """ckpt and its libraries in a world-readable directory, the test
    programs, and the Python launcher as `ckpt binfmt register` writes it,
    wrapped by a script that counts its runs."""
    if os.geteuid() != 0:
        pytest.skip("needs root (binfmt_misc, ptrace of the test programs' copies)")
    d = pathlib.Path(tempfile.mkdtemp(prefix="ckpt-native-", dir="/tmp"))
    d.chmod(0o755)
    try:
        for name in PACKAGES:
            src = pathlib.Path(__import__(name).__file__).parent
            shutil.copytree(src, d / "lib" / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        for prog in ("ticker", "threads8"):
            programs(prog, out=d / prog)
        r = subprocess.run([PYTHON, "-c", "import sys; from ckpt import binfmt; "
                            "binfmt.write_launcher(sys.argv[1])", d / "ckpt-launcher.py"],
                           env=env_for(d), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        (d / "ckpt-launcher").write_text(
            f"#!/bin/sh\necho run >> {d}/python-runs\nexec {d}/ckpt-launcher.py \"$@\"\n")
        (d / "ckpt-launcher").chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cache(tmp_path):
    c = tmp_path / "cache"
    c.mkdir(mode=0o700)
    return c


def env_for(shared, cache=None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
    env["PYTHONPATH"] = str(shared / "lib")
    if cache is not None:
        env["XDG_CACHE_HOME"] = str(cache)
    env.update(extra)
    return env


def run_ckpt(shared, *args, **extra):
    return subprocess.run([PYTHON, "-m", "ckpt", *map(str, args)], capture_output=True,
                          text=True, env=env_for(shared, **extra), timeout=120)


def python_runs(shared) -> int:
    try:
        return len((shared / "python-runs").read_text().splitlines())
    except FileNotFoundError:
        return 0


def exec_image(shared, image, cache, *, input=None, via="native", **extra):
    """Run the image as binfmt_misc does: `LAUNCHER IMAGE`, LAUNCHER the
    native one or (via="python") the Python one; via="kernel": ./image
    (then an entry for ckpt images registered after ours, by another
    session, would run it instead). Returns (result, whether the Python
    launcher ran)."""
    before = python_runs(shared)
    argv = {"kernel": [str(image)],
            "python": [str(shared / "ckpt-launcher"), str(image)],
            "native": [str(shared / "ckpt-launcher-native"), str(image)]}[via]
    r = subprocess.run(argv, capture_output=True, text=True, input=input,
                       env=env_for(shared, cache, **extra), timeout=120, cwd="/")
    return r, python_runs(shared) > before


def only_our_entry(shared) -> bool:
    for name in os.listdir(binfmt.PROC_DIR):
        e = binfmt.read_entry(name) if name not in ("register", "status") else None
        if e and e["state"] == "enabled" and e.get("magic") == binfmt.MAGIC.hex() \
                and e.get("interpreter") != str(shared / "ckpt-launcher-native"):
            return False
    return True


def tickets(cache) -> list[pathlib.Path]:
    d = cache / "ckpt" / "tickets"
    return sorted(d.iterdir()) if d.exists() else []


def dump_ticker(shared, start, image, n=40):
    t = start([str(shared / "ticker"), str(n)], cwd=str(shared))
    wait_lines(t.stdout_path, 3, target=t)
    r = run_ckpt(shared, "dump", t.pid, "-o", image, "--kill")
    assert r.returncode == 0, r.stderr
    t.wait()
    return int(t.stdout().splitlines()[-1].split()[1])


def check_ticks(r, last: int, n=40):
    assert r.returncode == 3, f"status {r.returncode}: {r.stderr}"
    ticks = [int(line.split()[1]) for line in r.stdout.splitlines()]
    assert ticks == list(range(last + 1, n)), r.stdout


# --- slice 1: tickets ---------------------------------------------------------------

def key_of(image_fd, **opts):
    t = ticket.begin(**{"as_caller": False, "restore_creds": False, "mapped": False} | opts)
    t.image(image_fd)
    return t.key


def test_ticket_key_follows_what_it_must(tmp_path, monkeypatch):
    img = tmp_path / "img"
    img.write_bytes(b"x" * 100)
    fd = os.open(img, os.O_RDONLY)
    try:
        monkeypatch.delenv("CKPT_NEW_TIDS", raising=False)
        monkeypatch.setattr(ticket, "POLICY_PATH", str(tmp_path / "policy.toml"))
        base = key_of(fd)
        assert key_of(fd) == base
        assert key_of(fd, mapped=True) != base
        assert key_of(fd, as_caller=True) != base
        monkeypatch.setenv("CKPT_NEW_TIDS", "1")
        assert key_of(fd) != base
        monkeypatch.delenv("CKPT_NEW_TIDS")
        os.utime(img, ns=(1, 2))                       # touched: mtime and ctime
        touched = key_of(fd)
        assert touched != base
        (tmp_path / "policy.toml").write_text("max_image_size = 0\n")
        with_policy = key_of(fd)
        assert with_policy != touched
        os.utime(tmp_path / "policy.toml", ns=(5, 5))
        assert key_of(fd) != with_policy
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0 if soft else 1, hard))
        try:
            assert key_of(fd) != with_policy
        finally:
            resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
        monkeypatch.setenv("CKPT_POLICY", str(tmp_path / "policy.toml"))
        assert ticket.begin(as_caller=False, restore_creds=False, mapped=False) is None
        monkeypatch.delenv("CKPT_POLICY")
        monkeypatch.setenv("CKPT_NO_TICKETS", "1")
        assert ticket.begin(as_caller=False, restore_creds=False, mapped=False) is None
    finally:
        os.close(fd)


def test_cache_dir_must_be_the_callers(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "missing"))
    assert ticket.cache_dir(create=True) is None
    assert not (tmp_path / "missing").exists()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    d = ticket.cache_dir(create=True)
    assert d == f"{home}/.cache/ckpt/tickets"
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    if os.geteuid() == 0:
        os.chown(home, 65534, 65534)
        assert ticket.cache_dir(create=True) is None
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    monkeypatch.setenv("HOME", "")
    assert ticket.cache_dir(create=True) is None


@needs_root
def test_restore_writes_a_ticket(shared, start, cache, tmp_path):
    image = tmp_path / "t.ckpt"
    last = dump_ticker(shared, start, image)
    r, python = exec_image(shared, image, cache, via="python")
    check_ticks(r, last)
    assert python
    [tk] = tickets(cache)
    assert stat.S_IMODE(tk.stat().st_mode) == 0o600
    assert stat.S_IMODE(tk.parent.stat().st_mode) == 0o700
    data = tk.read_bytes()
    assert data[:8] == ticket.MAGIC
    version, size, key_len = struct.unpack_from("<3Q", data, 8)
    assert (version, size) == (ticket.VERSION, len(data))
    assert tk.name == f"{ticket.fnv1a64(data[32:32 + key_len]):016x}.tk"
    st = os.stat(image)
    ident = struct.unpack_from("<5Q", data, 32 + 104)
    assert ident == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    # CKPT_NO_TICKETS: none written (and none used)
    image2 = tmp_path / "t2.ckpt"
    last = dump_ticker(shared, start, image2)
    r, python = exec_image(shared, image2, cache, via="python", CKPT_NO_TICKETS="1")
    check_ticks(r, last)
    assert python
    assert tickets(cache) == [tk]


# --- slice 2: the native launcher ---------------------------------------------------------

@pytest.fixture(scope="module")
def entry(shared):
    """A binfmt entry of this module's own (removed at the end): `ckpt
    binfmt register` installs the native launcher as the interpreter."""
    if binfmt.built_native() is None:
        pytest.fail("the native launcher was not built (ckpt/restore/ckpt-launcher-native)")
    name = f"ckpt-native-{os.getpid()}"
    wrapper = (shared / "ckpt-launcher").read_text()
    r = run_ckpt(shared, "binfmt", "register", "--name", name, "--launcher",
                 shared / "ckpt-launcher")
    assert r.returncode == 0, r.stderr
    try:
        assert binfmt.read_entry(name)["interpreter"] == str(shared / "ckpt-launcher-native")
        (shared / "ckpt-launcher").write_text(wrapper)      # count the fallbacks again
        yield name
    finally:
        run_ckpt(shared, "binfmt", "unregister", "--name", name)
        assert binfmt.read_entry(name) is None


@needs_root
def test_second_run_is_native(shared, entry, start, cache, tmp_path):
    image = tmp_path / "t.ckpt"
    last = dump_ticker(shared, start, image)
    r, python = exec_image(shared, image, cache)          # no ticket: the fallback
    check_ticks(r, last)
    assert python
    [tk] = tickets(cache)
    ino = tk.stat().st_ino
    for _ in range(2):
        r, python = exec_image(shared, image, cache)
        check_ticks(r, last)
        assert not python, r.stderr
    assert [t.stat().st_ino for t in tickets(cache)] == [ino]   # Python wrote nothing
    # Other options: another key, so Python first, then native again.
    for expect_python in (True, False):
        r, python = exec_image(shared, image, cache, CKPT_MAPPED="1")
        check_ticks(r, last)
        assert python == expect_python
    assert len(tickets(cache)) == 2
    r, python = exec_image(shared, image, cache, CKPT_NO_TICKETS="1")
    check_ticks(r, last)
    assert python
    # Through the kernel: binfmt_misc runs the native launcher.
    r, python = exec_image(shared, image, cache, via="kernel")
    check_ticks(r, last)
    if only_our_entry(shared):
        assert not python


@needs_root
def test_stale_ticket_falls_back(shared, entry, start, cache, tmp_path):
    image = tmp_path / "t.ckpt"
    last = dump_ticker(shared, start, image)
    assert exec_image(shared, image, cache)[1]
    os.utime(image)                                       # ctime and mtime move
    r, python = exec_image(shared, image, cache)
    check_ticks(r, last)
    assert python
    assert not exec_image(shared, image, cache)[1]
    # A corrupt ticket (same name): a miss, and Python writes a good one.
    for tk in tickets(cache):
        tk.write_bytes(tk.read_bytes()[:-8])
    r, python = exec_image(shared, image, cache)
    check_ticks(r, last)
    assert python
    assert not exec_image(shared, image, cache)[1]


@needs_root
def test_changed_file_gets_pythons_error(shared, entry, start, cache, tmp_path):
    prog = tmp_path / "ticker"
    shutil.copy(shared / "ticker", prog)
    t = start([str(prog), "40"], cwd=str(shared))
    wait_lines(t.stdout_path, 3, target=t)
    image = tmp_path / "t.ckpt"
    assert run_ckpt(shared, "dump", t.pid, "-o", image, "--kill").returncode == 0
    t.wait()
    assert exec_image(shared, image, cache)[1]
    assert exec_image(shared, image, cache)[0].returncode == 3
    with open(prog, "ab") as f:                      # the program's file changed
        f.write(b"\0" * 16)
    r, python = exec_image(shared, image, cache)
    assert python
    assert r.returncode == 16, r.stderr               # Status.FILE_CHANGED
    assert r.stderr.startswith("ckpt: ") and str(prog) in r.stderr
    assert r.stdout == ""


@needs_root
def test_threads_native(shared, entry, start, cache, tmp_path):
    prog = shared / "threads8"
    ref = start([str(prog), "16", "30", "150"], name="reference")
    ref_status, ref_sum = ref.wait(), ref.stdout().splitlines()[-1]
    t = start([str(prog), "16", "30", "150"], cwd=str(shared))
    wait_lines(t.stdout_path, 8, target=t)
    image = tmp_path / "th.ckpt"
    r = run_ckpt(shared, "dump", t.pid, "-o", image, "--kill")
    assert r.returncode == 0, r.stderr
    t.wait()
    for expect_python in (True, False, False):
        r, python = exec_image(shared, image, cache)
        assert python == expect_python
        assert r.returncode == ref_status, r.stderr
        assert r.stdout.splitlines()[-1] == ref_sum and r.stderr == ""


WARM = """
import json, os, stat, sys, time, decimal, email.parser
sys.stdout.write("R\\n"); sys.stdout.flush()
while not stat.S_ISFIFO(os.fstat(0).st_mode):    # /dev/null until restored
    time.sleep(0.005)
line = sys.stdin.readline().strip()
print(json.dumps({"got": line, "d": str(decimal.Decimal(1) / 4),
                  "exe": os.readlink("/proc/self/exe"), "pid": os.getpid()}))
"""


@needs_root
@pytest.mark.parametrize("mapped", ["0", "1"])
def test_python_warm_image_native(shared, entry, start, cache, tmp_path, mapped):
    py = os.path.realpath("/usr/bin/python3")
    if not os.path.exists(py):
        pytest.skip("no /usr/bin/python3")
    t = start([py, "-I", "-c", WARM], cwd=str(shared))
    wait_lines(t.stdout_path, 1, target=t)
    image = tmp_path / "warm.ckpt"
    assert run_ckpt(shared, "dump", t.pid, "-o", image, "--kill").returncode == 0
    t.wait()
    import json
    for expect_python in (True, False, False):
        r, python = exec_image(shared, image, cache, input="hello\n", CKPT_MAPPED=mapped)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["got"] == "hello" and out["d"] == "0.25"
        assert os.path.realpath(out["exe"]) == py      # the exe link is python's
        assert python == expect_python
