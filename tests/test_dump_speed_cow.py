"""The copy-on-write snapshot (issue #7): the target is stopped only while
its state is read and a child holding a frozen copy of its memory is
forked; it runs on while that copy is written, and the child leaves no
trace in it, whether the dump succeeds or fails."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import CKPT, CKPT_ENV, ROOT, dump, restore, wait_for, wait_lines

from ckpt.checkpoint import dump as dump_mod
from ckpt.image import read_image


def children(pid: int) -> list[int]:
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def untouched(target) -> None:
    """Running, not stopped, not traced, no child (not even a zombie)."""
    assert target.alive(), "the target must keep running"
    with open(f"/proc/{target.pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    assert status["State"].split()[0] not in ("t", "T", "Z"), status["State"]
    assert status["TracerPid"].strip() == "0"
    assert children(target.pid) == [], "the snapshot's child is still there"


@pytest.fixture
def cow(start, programs, tmp_path):
    def run(size_mib: int = 32, *mode: str):
        flag = tmp_path / "flag"
        t = start([programs("cowtarget"), size_mib, flag, *mode])
        assert wait_lines(t.stdout_path, 1, target=t) == ["ready"]
        return t, flag
    return run


def test_snapshot_leaves_no_trace_and_restores_one_instant(cow, tmp_path):
    """A target that writes its generation number into plain, MADV_DONTFORK,
    MADV_WIPEONFORK and shared memory in turn, and watches for SIGCHLD and
    for children to reap: after the dump it has seen neither, and the
    restored copy finds the four numbers equal (all read at one instant)
    and every pattern intact."""
    t, flag = cow()
    image = tmp_path / "cow.ckpt"
    dump(t.pid, image)
    untouched(t)
    dump(t.pid, image)              # twice: no leftovers between dumps either
    untouched(t)
    flag.write_text("")
    assert t.wait(30) == 0, t.stdout()
    assert t.stdout() == "ready\nok\n"
    r = restore(image)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r


def test_target_runs_while_its_pages_are_written(cow, tmp_path):
    """In process (for DumpStats): the target is stopped for a small part of
    the dump; with UNFORKED_LIMIT 0 (its 64 shared pages are then too many)
    it is stopped for the whole dump, as before the snapshot."""
    t, flag = cow(256)
    stats = dump_mod.dump(t.pid, str(tmp_path / "a.ckpt"))
    assert stats.frozen_seconds < stats.seconds / 2, stats
    untouched(t)
    limit = dump_mod.UNFORKED_LIMIT
    dump_mod.UNFORKED_LIMIT = 0
    try:
        frozen = dump_mod.dump(t.pid, str(tmp_path / "b.ckpt"))
    finally:
        dump_mod.UNFORKED_LIMIT = limit
    assert frozen.frozen_seconds == pytest.approx(frozen.seconds, abs=0.05), frozen
    untouched(t)
    t.kill()
    flag.write_text("")
    for name in ("a.ckpt", "b.ckpt"):
        r = restore(tmp_path / name)
        assert (r.returncode, r.stdout) == (0, "ok\n"), r


def test_vmflags_come_from_the_copy(cow, tmp_path, monkeypatch):
    """Without a MADV_DONTFORK mapping, the stopped target's smaps (a walk
    of all its page tables) is not read: the flags come from the child's,
    and are the ones a frozen dump reads from the target; the
    MADV_WIPEONFORK area (found by its pages missing in the child) is read
    while stopped: the restored copy sees one generation everywhere."""
    t, flag = cow(32, "nodf")
    read = []
    smaps = dump_mod.procfs.smaps
    monkeypatch.setattr(dump_mod.procfs, "smaps", lambda pid: read.append(pid) or smaps(pid))
    dump_mod.dump(t.pid, str(tmp_path / "snap.ckpt"))
    assert read and t.pid not in read, read
    monkeypatch.setattr(dump_mod, "UNFORKED_LIMIT", 0)      # no snapshot: frozen dump
    read.clear()
    dump_mod.dump(t.pid, str(tmp_path / "frozen.ckpt"))
    assert read == [t.pid]
    untouched(t)
    t.kill()

    def vmas(name):
        return [(v.start, v.end, v.prot, v.shared, v.kind, v.name, v.growsdown, v.advice)
                for v in read_image(tmp_path / name).vmas]
    assert vmas("snap.ckpt") == vmas("frozen.ckpt")
    advice = {a for v in vmas("snap.ckpt") for a in v[7]}
    assert {"wipeonfork", "dontdump", "hugepage"} <= advice
    flag.write_text("")
    for name in ("snap.ckpt", "frozen.ckpt"):
        r = restore(tmp_path / name)
        assert (r.returncode, r.stdout) == (0, "ok\n"), r


def _dump_into_a_pipe_we_hold(pid: int):
    """`ckpt dump PID -o -` into a pipe nobody reads yet: it stops writing
    once the pipe is full, after the snapshot was taken."""
    r, w = os.pipe()
    p = subprocess.Popen(CKPT + ["dump", str(pid), "-o", "-"], stdin=subprocess.DEVNULL,
                         stdout=w, stderr=subprocess.PIPE, close_fds=True, env=CKPT_ENV,
                         cwd=ROOT)
    os.close(w)
    return p, r


def test_snapshot_killed_during_the_dump(cow):
    """The child is killed while the image is written: status 23, one line
    naming the snapshot, and the target is left as it was (no zombie)."""
    t, flag = cow()
    p, r = _dump_into_a_pipe_we_hold(t.pid)
    kids = wait_for(lambda: children(t.pid), timeout=30, what="the snapshot's child")
    time.sleep(0.2)                 # the pipe is full: the dump waits to write
    os.kill(kids[0], 9)
    with os.fdopen(r, "rb") as reader:
        reader.read()
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 23, stderr
    assert stderr.decode().count("\n") == 1 and "snapshot" in stderr.decode(), stderr
    untouched(t)
    flag.write_text("")
    assert t.wait(30) == 0 and t.stdout() == "ready\nok\n", t.stdout()


def test_output_closed_during_the_dump(cow):
    """The reader goes away while the image is written: the dump fails with
    one line, the child is gone and the target was never disturbed."""
    t, flag = cow()
    p, r = _dump_into_a_pipe_we_hold(t.pid)
    wait_for(lambda: children(t.pid), timeout=30, what="the snapshot's child")
    os.close(r)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 24, stderr
    assert stderr.decode().count("\n") == 1, stderr
    untouched(t)
    flag.write_text("")
    assert t.wait(30) == 0 and t.stdout() == "ready\nok\n", t.stdout()


def test_target_exits_after_the_snapshot(cow, tmp_path):
    """The image is the process as it was stopped: a target that exits
    while its copy is written does not spoil it (before the snapshot, the
    same dump would have kept it stopped). The copy is killed all the same."""
    t, flag = cow()
    p, r = _dump_into_a_pipe_we_hold(t.pid)
    kids = wait_for(lambda: children(t.pid), timeout=30, what="the snapshot's child")
    time.sleep(0.2)                 # the pipe is full: the snapshot is taken
    os.kill(t.pid, 9)               # the target only: the child lives on
    with os.fdopen(r, "rb") as reader:
        data = reader.read()
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    (tmp_path / "late.ckpt").write_bytes(data)
    assert read_image(tmp_path / "late.ckpt").process.pid == t.pid

    def child_dead():
        try:
            with open(f"/proc/{kids[0]}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True
    wait_for(child_dead, timeout=30, what="the snapshot's child to be killed")
    flag.write_text("")
    r = restore(tmp_path / "late.ckpt")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r
