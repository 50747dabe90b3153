"""The dump pipeline (issue #7): pages found with PAGEMAP_SCAN, zero pages
left out, memory read in batches into reused buffers, page data hashed in a
second thread, pipes enlarged. Each test checks the new path against what
the plain one gives, on real processes."""
from __future__ import annotations

import fcntl
import io
import os
import signal
import stat
import subprocess
import threading

import pytest

from conftest import CKPT, CKPT_ENV, ROOT, dump, inspect_json, restore, wait_lines

from ckpt.checkpoint import dump as dump_mod
from ckpt.checkpoint import memory, procfs
from ckpt.errors import CkptError, Status
from ckpt.image import read_image, write_image

PAGE = 4096
NPAGES, NNONE, NFILE = 1024, 64, 16


def file_bytes(n: int) -> bytes:
    return bytes((o * 7 + 3) & 0xFF for o in range(n))


@pytest.fixture
def zeropages(start, programs, tmp_path):
    """The zeropages target, ready: (target, {region: address}, flag path)."""
    data = tmp_path / "data"
    data.write_bytes(file_bytes(NFILE * PAGE))
    flag = tmp_path / "go"
    t = start([programs("zeropages"), data, flag])
    line = wait_lines(t.stdout_path, 1, target=t)[0].split()
    assert line[0] == "ready", line
    return t, dict(zip("AZHNF", (int(x, 16) for x in line[1:]))), flag


def saved(pid: int, **kw) -> set[int]:
    """Addresses of the pages page_runs saves (adjacent regions of the
    target may share a VMA: look at pages, not at VMAs)."""
    mappings = memory.classify(procfs.smaps(pid))
    return {r.addr + i * PAGE for runs in memory.page_runs(pid, mappings, **kw)
            for r in runs for i in range(r.count)}


def span(addr: int, n: int) -> set[int]:
    return {addr + i * PAGE for i in range(n)}


def stopped(pid: int):
    """SIGSTOP the target for the duration (its memory holds still)."""
    class _Stopped:
        def __enter__(self):
            os.kill(pid, signal.SIGSTOP)
            with open(f"/proc/{pid}/stat") as f:     # wait until it is stopped
                while f.read().rpartition(")")[2].split()[0] != "T":
                    f.seek(0)

        def __exit__(self, *exc):
            os.kill(pid, signal.SIGCONT)
    return _Stopped()


def test_scan_finds_what_the_pagemap_read_finds(zeropages):
    """PAGEMAP_SCAN without zero-page skipping gives exactly the runs of the
    pagemap read, mapping by mapping; with skipping, only the zero pages of
    anonymous mappings go."""
    t, at, _ = zeropages
    with stopped(t.pid):
        scanned = saved(t.pid, skip_zero=False)
        read = saved(t.pid, scan=False)
        skipping = saved(t.pid)
    assert scanned == read
    assert span(at["A"], NPAGES) <= read
    assert span(at["Z"], NPAGES) <= read, "read pages are present"
    assert span(at["N"], NNONE) <= read
    assert read & span(at["F"], NFILE) == {at["F"], at["F"] + 2 * PAGE}, "only the copies"
    assert read & span(at["H"], NPAGES) == {at["H"] + i * PAGE for i in range(NPAGES)
                                            if i % 3 != 2}

    assert not skipping & span(at["Z"], NPAGES), "the zero page is never saved"
    assert skipping & span(at["H"], NPAGES) == {at["H"] + i * PAGE
                                                for i in range(0, NPAGES, 3)}
    assert read - skipping == span(at["Z"], NPAGES) | {at["H"] + i * PAGE for i in
                                                       range(1, NPAGES, 3)}


def test_read_pages_gives_the_memory_in_image_order(zeropages):
    """The batched process_vm_readv read (with /proc/PID/mem for what it
    may not read: the PROT_NONE mapping) returns the bytes a plain pread of
    /proc/PID/mem gives, run by run; chunks are copied out at once because
    their buffers are reused."""
    t, at, _ = zeropages
    with stopped(t.pid):
        mappings = memory.classify(procfs.smaps(t.pid))
        runs = memory.page_runs(t.pid, mappings)
        vmas = [memory.to_vma(m, r, 0 if m.kind == "file" else None)
                for m, r in zip(mappings, runs)]
        got = b"".join(bytes(c) for c in memory.read_pages(t.pid, vmas))
        want = bytearray()
        with open(f"/proc/{t.pid}/mem", "rb", buffering=0) as mem:
            for v in vmas:
                for r in v.runs:
                    mem.seek(r.addr)
                    want += mem.read(r.count * PAGE)
    assert len(got) == len(want) == sum(v.pages_saved for v in vmas) * PAGE
    assert got == bytes(want)


def test_zero_pages_are_left_out_and_restored_as_zero(zeropages, tmp_path):
    """Dump, kill, restore: every kind of page comes back (the program
    checks them all and writes to the zero pages), and the image holds none
    of the zero pages."""
    t, at, flag = zeropages
    image = tmp_path / "z.ckpt"
    dump(t.pid, image)
    t.kill()
    img = inspect_json(image)
    pages = {r["addr"] + i * PAGE for v in img["vmas"] for r in v["runs"]
             for i in range(r["count"])}
    assert not pages & span(at["Z"], NPAGES)
    assert pages & span(at["H"], NPAGES) == {at["H"] + i * PAGE for i in range(0, NPAGES, 3)}
    assert span(at["A"], NPAGES) | span(at["N"], NNONE) <= pages
    flag.write_text("")
    r = restore(image)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r


def test_dump_to_a_pipe_gives_the_same_pages_as_to_a_file(zeropages, tmp_path):
    """`-o -` into a pipe (enlarged to 1 MiB) writes the same mappings and
    page data as a dump to a file (the stack aside: the target runs between
    the two dumps)."""
    t, at, _ = zeropages
    to_file = tmp_path / "f.ckpt"
    dump(t.pid, to_file)
    to_pipe = tmp_path / "p.ckpt"
    with open(to_pipe, "wb") as out:
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=out, close_fds=True)
        r = subprocess.run(CKPT + ["dump", str(t.pid), "-o", "-"], stdout=cat.stdin,
                           stderr=subprocess.PIPE, close_fds=True, env=CKPT_ENV, cwd=ROOT)
        cat.stdin.close()
        assert cat.wait() == 0 and r.returncode == 0, r.stderr

    def regions(path):
        """{page address: bytes} of the five regions."""
        img = read_image(path)
        data = path.read_bytes()
        wanted = set().union(*(span(at[k], n) for k, n in
                               (("A", NPAGES), ("Z", NPAGES), ("H", NPAGES), ("N", NNONE),
                                ("F", NFILE))))
        out = {}
        for v in img.vmas:
            for r in v.runs:
                for i in range(r.count):
                    if r.addr + i * PAGE in wanted:
                        at_ = img.pages_offset + r.data_offset + i * PAGE
                        out[r.addr + i * PAGE] = data[at_:at_ + PAGE]
        return out
    got = regions(to_pipe)
    assert got == regions(to_file)
    assert len(got) == NPAGES + (NPAGES + 2) // 3 + NNONE + 2


def test_dump_to_a_named_pipe_writes_into_it(zeropages, tmp_path):
    """`-o FIFO` (or a device: -o /dev/null) writes into it like `-o -`;
    renaming a temp file over it would have replaced the node. The FIFO is
    opened before the target is stopped: the dump waits for a reader."""
    t, at, _ = zeropages
    fifo, got = tmp_path / "fifo", tmp_path / "got.ckpt"
    os.mkfifo(fifo)
    def read():
        with open(fifo, "rb") as f:
            got.write_bytes(f.read())
    reader = threading.Thread(target=read, daemon=True)     # left blocked if replaced
    reader.start()
    r = subprocess.run(CKPT + ["dump", str(t.pid), "-o", str(fifo)], capture_output=True,
                       close_fds=True, env=CKPT_ENV, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced"
    reader.join(30)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    img = read_image(got)
    assert any(r.addr == at["A"] for v in img.vmas for r in v.runs)
    assert t.alive()


def test_grow_pipe(tmp_path):
    r, w = os.pipe()
    try:
        dump_mod._grow_pipe(w)
        with open("/proc/sys/fs/pipe-max-size") as f:
            limit = int(f.read())
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == min(dump_mod.PIPE_SIZE, limit)
    finally:
        os.close(r)
        os.close(w)
    with open(tmp_path / "plain", "wb") as f:
        dump_mod._grow_pipe(f.fileno())          # not a pipe: nothing happens


# --- write_image's second thread ------------------------------------------------------

def _image_and_pages():
    from test_image import make_image, page_data
    image = make_image()
    return image, page_data(image)


def _threads() -> set[str]:
    return {th.name for th in threading.enumerate()}


def test_writer_with_a_ring_of_three_buffers():
    """A producer that refills three buffers in turn (as read_pages does)
    gives the same image as one passing fresh bytes: the writer is done with
    each chunk before the producer reuses its buffer."""
    image, data = _image_and_pages()
    ref = io.BytesIO()
    write_image(ref, image, [data])

    def ring(size=4096 * 3 + 100):
        bufs = [bytearray(size) for _ in range(3)]
        for k, i in enumerate(range(0, len(data), size)):
            b = bufs[k % 3]
            b[:] = b"\xee" * size        # a writer still using it would notice
            n = min(size, len(data) - i)
            b[:n] = data[i:i + n]
            yield memoryview(b)[:n]
    got = io.BytesIO()
    write_image(got, image, ring())
    assert got.getvalue() == ref.getvalue()
    assert "ckpt-pages" not in _threads()


def test_writer_passes_on_the_producers_error_and_stops_its_thread():
    image, data = _image_and_pages()

    def failing():
        yield data[:PAGE]
        raise CkptError(Status.TARGET_GONE, "process 1 exited during the dump")
    with pytest.raises(CkptError) as e:
        write_image(io.BytesIO(), image, failing())
    assert e.value.status == Status.TARGET_GONE
    assert "ckpt-pages" not in _threads()


def test_writer_stops_its_thread_when_the_output_fails():
    image, data = _image_and_pages()
    closed = []

    def producer():
        try:
            for i in range(0, len(data), PAGE):
                yield data[i:i + PAGE]
        finally:
            closed.append(True)

    class Broken(io.RawIOBase):
        n = 0

        def writable(self):
            return True

        def write(self, b):
            self.n += 1
            if self.n > 2:
                raise OSError(28, "No space left on device")
            return len(b)
    with pytest.raises(CkptError) as e:
        write_image(Broken(), image, producer())
    assert e.value.status == Status.OUTPUT
    assert "ckpt-pages" not in _threads()
    assert closed == [True], "the producer was closed (its files released)"

