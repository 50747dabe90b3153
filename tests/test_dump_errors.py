"""What `ckpt dump` and `ckpt restore` refuse: one `ckpt: ...` line on
stderr, a documented exit status, no image (nor a temp file) left behind,
and a target that keeps running, not stopped."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

from conftest import CKPT, ROOT, ckpt, dump, restore, wait_for, wait_lines

NO_PROCESS, PTRACE_DENIED, UNSUPPORTED_TARGET, OUTPUT = 20, 21, 22, 24
NOT_AN_IMAGE, CORRUPT_IMAGE, FILE_CHANGED = 10, 12, 16


def one_line(r) -> str:
    """The single `ckpt: ...` line of a failure (and nothing on stdout)."""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: "), f"want one line: {r}"
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    return lines[0]


def running_unstopped(target) -> None:
    assert target.alive(), "the target must keep running"
    state = target.state()
    assert state not in ("t", "T", "Z"), f"target {target.pid} is in state {state}"
    with open(f"/proc/{target.pid}/status") as f:
        tracer = next(line.split()[1] for line in f if line.startswith("TracerPid:"))
    assert tracer == "0", f"target still traced by {tracer}"


def sleeping(start, programs, *mode: str):
    t = start([programs("sleeper"), *mode])
    wait_lines(t.stdout_path, 1, target=t)
    return t


# --- dump ------------------------------------------------------------------------------

def test_dump_no_such_process(tmp_path):
    p = subprocess.Popen(["/bin/true"], close_fds=True)
    p.wait()                        # a pid that just stopped existing
    out = tmp_path / "gone.ckpt"
    r = ckpt("dump", str(p.pid), "-o", out, cwd=tmp_path)
    assert r.returncode == NO_PROCESS, r
    assert str(p.pid) in one_line(r)
    assert os.listdir(tmp_path) == []


def _nobody_can_run_ckpt(workdir: str) -> str | None:
    """Why user nobody can't run this ckpt (None if it can)."""
    if os.geteuid() != 0:
        return "needs root to switch to user nobody"
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return "no setpriv"
    probe = subprocess.run(
        [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", *CKPT[:1], "-c",
         "import ckpt.cli, ckpt.checkpoint.dump; print('ok')"],
        capture_output=True, text=True, close_fds=True, cwd=workdir,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    if probe.stdout.strip() != "ok":
        return (f"user nobody cannot run {CKPT[0]} with ckpt importable from {ROOT} "
                f"(a directory on the way is not readable?): {probe.stderr.strip()[-300:]}")
    return None


def test_dump_not_allowed_to_ptrace(start, programs):
    """ckpt run as user nobody against a root-owned target."""
    workdir = tempfile.mkdtemp(prefix="ckpt-nobody-")
    try:
        os.chmod(workdir, 0o1777)
        why = _nobody_can_run_ckpt(workdir)
        if why:
            pytest.skip(why)
        target = sleeping(start, programs)
        assert os.stat(f"/proc/{target.pid}").st_uid == 0
        out = os.path.join(workdir, "denied.ckpt")
        r = ckpt("dump", str(target.pid), "-o", out, cwd=workdir,
                 prefix=["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"],
                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == PTRACE_DENIED, r
        line = one_line(r)
        assert str(target.pid) in line and "ptrace" in line
        assert os.listdir(workdir) == []
        running_unstopped(target)
    finally:
        shutil.rmtree(workdir)


def test_dump_refuses_a_pipe_at_fd3(start, programs, tmp_path):
    target = sleeping(start, programs, "pipe")
    assert os.readlink(f"/proc/{target.pid}/fd/3").startswith("pipe:")
    outdir = tmp_path / "out"
    outdir.mkdir()
    r = ckpt("dump", str(target.pid), "-o", outdir / "pipe.ckpt")
    assert r.returncode == UNSUPPORTED_TARGET, r
    line = one_line(r)
    assert "fd 3" in line and "pipe" in line
    assert os.listdir(outdir) == [], "no image and no temp file may be left"
    running_unstopped(target)


def test_dump_refuses_a_process_tree(start, programs, tmp_path):
    target = sleeping(start, programs, "child")
    r = ckpt("dump", str(target.pid), "-o", tmp_path / "tree.ckpt")
    assert r.returncode == UNSUPPORTED_TARGET, r
    assert "child process" in one_line(r)
    assert not (tmp_path / "tree.ckpt").exists()
    running_unstopped(target)


def test_dump_into_a_missing_directory(start, programs, tmp_path):
    target = sleeping(start, programs)
    r = ckpt("dump", str(target.pid), "-o", tmp_path / "no" / "such" / "dir" / "x.ckpt")
    assert r.returncode == OUTPUT, r
    one_line(r)
    assert not (tmp_path / "no").exists()
    running_unstopped(target)


def test_dump_success_leaves_target_running_and_only_the_image(start, programs, tmp_path):
    """The counterpart of the failures: a good dump leaves exactly one file,
    executable, honouring the umask but never writable by group or others
    (so a mapped restore's guard accepts it under a umask of 002), and the
    target running, untraced."""
    target = sleeping(start, programs)
    outdir = tmp_path / "out"
    outdir.mkdir()
    old = os.umask(0o002)
    try:
        dump(target.pid, outdir / "ok.ckpt")
        os.umask(0o077)
        dump(target.pid, outdir / "private.ckpt")
    finally:
        os.umask(old)
    assert sorted(os.listdir(outdir)) == ["ok.ckpt", "private.ckpt"]
    assert os.stat(outdir / "ok.ckpt").st_mode & 0o777 == 0o755
    assert os.stat(outdir / "private.ckpt").st_mode & 0o777 == 0o700
    running_unstopped(target)


# --- restore refusals (before the point of no return) -------------------------------------

def test_restore_not_an_image(tmp_path, programs):
    for name, data in (("text", b"hello, world\n" * 100),
                       ("empty", b""),
                       ("elf", pathlib.Path(programs("sleeper")).read_bytes())):
        path = tmp_path / name
        path.write_bytes(data)
        r = restore(path)
        assert r.returncode == NOT_AN_IMAGE, f"{name}: {r}"
        assert str(path) in one_line(r)


@pytest.fixture
def sleeper_image(start, programs, tmp_path) -> pathlib.Path:
    target = sleeping(start, programs)
    image = tmp_path / "sleeper.ckpt"
    dump(target.pid, image)
    target.kill()
    return image


def test_restore_truncated_image(sleeper_image, tmp_path):
    data = sleeper_image.read_bytes()
    assert len(data) > 3 * 4096
    for cut in (64, 200, len(data) // 2, len(data) - 4096, len(data) - 1):
        path = tmp_path / f"cut-{cut}.ckpt"
        path.write_bytes(data[:cut])
        r = restore(path)
        assert r.returncode == CORRUPT_IMAGE, f"truncated to {cut} bytes: {r}"
        assert str(path) in one_line(r)


def test_restore_after_the_executable_changed(start, programs, tmp_path):
    """The program's own binary was rewritten after the dump: refused (16)
    by the launcher, before it gave itself up: the restore command exits
    normally with one line, it is not killed by a signal nor the stub's 99."""
    exe = tmp_path / "bin" / "sleeper"
    exe.parent.mkdir()
    shutil.copy(programs("sleeper"), exe)
    target = start([exe])
    wait_lines(target.stdout_path, 1, target=target)
    image = tmp_path / "sleeper.ckpt"
    dump(target.pid, image)
    target.kill()

    # The same program built again with other contents: another build-id.
    programs("sleeper", out=tmp_path / "bin" / "other", defines=["CKPT_TEST_VARIANT=1"])
    os.replace(tmp_path / "bin" / "other", exe)
    r = restore(image)
    assert r.returncode == FILE_CHANGED, r
    line = one_line(r)
    assert str(exe) in line

    # and a file it maps that is gone altogether
    exe.unlink()
    r = restore(image)
    assert r.returncode == FILE_CHANGED, r
    assert str(exe) in one_line(r)


def test_dump_a_zombie(tmp_path):
    """A process that has exited but is not reaped yet: ptrace says EPERM,
    ckpt must say it has exited (20), not that ptrace is denied."""
    p = subprocess.Popen(["/bin/true"], close_fds=True)
    try:
        def zombie():
            with open(f"/proc/{p.pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] == "Z"
        wait_for(zombie, 10, "the child to exit")
        r = ckpt("dump", str(p.pid), "-o", tmp_path / "z.ckpt", cwd=tmp_path)
        assert r.returncode == NO_PROCESS, r
        assert str(p.pid) in one_line(r)
        assert os.listdir(tmp_path) == []
    finally:
        p.wait()


def test_target_killed_during_the_dump(start, tmp_path):
    """The target dies while its pages are being written: status 23, one
    line, and neither the image nor its temp file is left."""
    big = start(["/usr/bin/python3", "-I", "-S", "-c",
                 "import sys, time\nb = b'x' * (768 << 20)\nprint('ready', flush=True)\n"
                 "time.sleep(600)"])
    wait_lines(big.stdout_path, 1, target=big)
    out = tmp_path / "out"
    out.mkdir()
    image = out / "big.ckpt"
    with open(tmp_path / "dump.err", "wb") as err:
        dumper = subprocess.Popen(CKPT + ["dump", str(big.pid), "-o", str(image)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=err, close_fds=True, cwd=ROOT,
                                  env=__import__("conftest").CKPT_ENV)
        # Pages are being written once the temp file exists and grows.
        wait_for(lambda: any(p.stat().st_size > (1 << 20) for p in out.iterdir()),
                 timeout=60, what="the dump to start writing pages")
        big.kill()
        status = dumper.wait(timeout=60)
    stderr = (tmp_path / "dump.err").read_text()
    assert status == 23, stderr
    assert len(stderr.splitlines()) == 1 and "exited during the dump" in stderr
    assert list(out.iterdir()) == [], "a partial image or temp file was left"
