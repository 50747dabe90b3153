"""Zero-copy dumps (ckpt.checkpoint.splice): the snapshot's child vmsplices
its pages into a pipe the dumper splices to the image. Each test compares
with the copying path (memory.read_pages) on a real process, or looks at
what the child and the target hold while it happens."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ckpt.checkpoint import dump as dump_mod
from ckpt.checkpoint import splice
from ckpt.image import read_image
from conftest import CKPT
from test_dump_speed import NNONE, zeropages  # noqa: F401 -- a fixture
from test_mapped_restore import talkers  # noqa: F401 -- a fixture

PAGE = 4096
LOOP_SOURCE = splice.__file__.rsplit("/", 1)[0] + "/vmsplice_loop.s"


def test_loop_bytes_are_its_assembled_source(tmp_path):
    """VMSPLICE_LOOP is vmsplice_loop.s as `as` assembles it."""
    for tool in ("as", "objcopy"):
        assert shutil.which(tool), f"{tool} (binutils) is needed to check VMSPLICE_LOOP"
    obj, raw = tmp_path / "loop.o", tmp_path / "loop.bin"
    subprocess.run(["as", "-o", obj, LOOP_SOURCE], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, raw], check=True)
    assert raw.read_bytes() == splice.VMSPLICE_LOOP


def page_map(path) -> dict[int, bytes]:
    """{page address: saved bytes}, leaving out what may differ between two
    dumps of a process blocked in a syscall: its stack (the dumper's
    scratch space) and the page of each rseq area (cpu ids)."""
    img = read_image(path)
    data = path.read_bytes()
    skip = {t.rseq[0] & ~(PAGE - 1) for t in img.threads if t.rseq}
    out = {}
    for v in img.vmas:
        if v.name == "[stack]":
            continue
        for r in v.runs:
            for i in range(r.count):
                addr = r.addr + i * PAGE
                if addr not in skip:
                    at = img.pages_offset + r.data_offset + i * PAGE
                    out[addr] = data[at:at + PAGE]
    return out


@pytest.fixture
def spy(monkeypatch):
    """What SplicedPages.open gave on each dump (None: it copied)."""
    opened = []
    real = splice.SplicedPages.open

    def open_(*a, **k):
        opened.append(real(*a, **k))
        return opened[-1]
    monkeypatch.setattr(splice.SplicedPages, "open", open_)
    return opened


def both_ways(pid: int, tmp_path, monkeypatch, spy):
    """Dump pid spliced and copied; the two page maps."""
    spliced, copied = tmp_path / "spliced.ckpt", tmp_path / "copied.ckpt"
    dump_mod.dump(pid, str(spliced))
    assert len(spy) == 1 and spy[0] is not None, "the dump did not splice"
    with monkeypatch.context() as m:
        m.setattr(splice, "usable", lambda fd: False)
        dump_mod.dump(pid, str(copied))
    assert len(spy) == 1
    return page_map(spliced), page_map(copied)


@pytest.fixture
def sparse(programs, talkers, tmp_path):  # noqa: F811
    """sparse.c with 2 areas of 6000 pages: 6000 runs (more than the
    loop's 1024 iovecs per vmsplice) and 1 MiB of heap; blocked in read."""
    t = talkers([programs("sparse", out=tmp_path / "sparse6000", defines=["CHUNK=6000"]), 2])
    assert t.read1() == b"R"
    return t.p


def test_spliced_pages_are_the_copied_pages(sparse, tmp_path, monkeypatch, spy):
    t = sparse
    got, want = both_ways(t.pid, tmp_path, monkeypatch, spy)
    assert got == want
    assert len(got) >= 6000 + 256


def test_unreadable_and_file_pages_are_read_in_order(zeropages, tmp_path,  # noqa: F811
                                                     monkeypatch, spy):
    """zeropages: a PROT_NONE area (read through /proc/PID/mem between two
    spliced groups) and private copies of file pages."""
    t, at, _ = zeropages
    got, want = both_ways(t.pid, tmp_path, monkeypatch, spy)
    assert got == want
    assert all(at["N"] + i * PAGE in got for i in range(NNONE))


def test_a_failed_vmsplice_falls_back_to_reading(sparse, tmp_path, monkeypatch, spy):
    """The child's pipe is closed under it before its first vmsplice: the
    loop reports EBADF, and that group and every later one are read and
    copied instead. The image is the same."""
    t = sparse
    real = splice.SplicedPages._vmsplice
    failed = []

    def vmsplice(self, iovs, mover):
        if not failed:
            self._call(3, self.child_w)             # close(2) in the child
        real(self, iovs, mover)
        failed.append(self.failed)
    monkeypatch.setattr(splice.SplicedPages, "_vmsplice", vmsplice)
    got, want = both_ways(t.pid, tmp_path, monkeypatch, spy)
    assert failed and all(f for f in failed), "the loop should have failed"
    assert got == want


def test_the_target_never_holds_the_pipe(sparse, tmp_path, monkeypatch, spy):
    """While pages are spliced the child has a table of its own with the
    pipe alone, and the target's fds are what they were."""
    t = sparse
    before = sorted(os.listdir(f"/proc/{t.pid}/fd"))
    seen = []
    real = splice.SplicedPages.copy_into

    def copy_into(self, *a):
        seen.append((sorted(os.listdir(f"/proc/{self.child.tid}/fd")),
                     sorted(os.listdir(f"/proc/{t.pid}/fd"))))
        return real(self, *a)
    monkeypatch.setattr(splice.SplicedPages, "copy_into", copy_into)
    dump_mod.dump(t.pid, str(tmp_path / "x.ckpt"))
    assert seen == [(["0", "1"], before)]
    assert sorted(os.listdir(f"/proc/{t.pid}/fd")) == before


def test_spliced_image_restores(sparse, talkers, tmp_path, spy):  # noqa: F811
    """And the spliced image of 6000 runs restores: every page checked."""
    image = tmp_path / "s.ckpt"
    dump_mod.dump(sparse.pid, str(image))
    assert spy[0] is not None
    r = talkers(CKPT + ["restore", image])
    assert r.ask(b"v") == b"V"
    assert r.finish() == (0, "")
