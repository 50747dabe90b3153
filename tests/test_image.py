"""Image format v1: round trips, and every kind of broken image refused with
one clear CkptError line (never a traceback)."""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import threading

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt.errors import CkptError, Status
from ckpt.image import (CURRENT_HEADER, GENERAL_REGS, MAGIC, RLIM_INFINITY, Creds, Fd,
                        File, GeneralRegs, Image, MMFields, PageRun, Process, Rlimit,
                        SigAction, Thread, Vma, read_image, summarize, to_json,
                        write_image)
from ckpt.image import format as fmt
from ckpt.image.record import replace

PAGE = 4096
PID = 4242
EXE = 0x555555554000
CORRUPT, UNSUPPORTED, NOT_AN_IMAGE = (Status.CORRUPT_IMAGE, Status.UNSUPPORTED_IMAGE,
                                      Status.NOT_AN_IMAGE)


# --- a realistic image ----------------------------------------------------------

def make_image() -> Image:
    regs = dict.fromkeys(GENERAL_REGS, 0)
    regs.update(rip=0x7ffff7e4a1b4, rsp=0x7fffffffe2c8, rax=2**64 - 4, orig_rax=230,
                cs=0x33, ss=0x2b, eflags=0x246, fs_base=0x7ffff7d7f740, rdi=1)
    files = (
        File(1, "/usr/bin/python3.11", "reg", dev=0x801, ino=131, mode=0o100755,
             size=6_831_304, mtime_ns=1_700_000_000_123_456_789, build_id=bytes(range(20))),
        File(2, "/usr/lib/x86_64-linux-gnu/libc.so.6", "reg", dev=0x801, ino=77,
             mode=0o100755, size=1_922_136, mtime_ns=-5, build_id=b"\xab" * 20),
        File(3, "/dev/pts/0", "chr", dev=0x18, ino=3, mode=0o20620, size=0,
             mtime_ns=0, rdev=0x8800),
        File(4, "/tmp/log-\udcff.txt", "reg", dev=0x2a, ino=9, mode=0o100644,
             size=1234, mtime_ns=1_700_000_001_000_000_000),
        File(7, "/root", "dir", dev=0x801, ino=2, mode=0o40700, size=4096, mtime_ns=1),
    )
    exe = EXE
    vmas = (
        Vma(exe, exe + 0x4000, "r--", False, "file", "/usr/bin/python3.11", file=1),
        Vma(exe + 0x4000, exe + 0x6000, "r-x", False, "file", "/usr/bin/python3.11",
            file=1, offset=0x4000),
        Vma(exe + 0x6000, exe + 0x8000, "rw-", False, "file", "/usr/bin/python3.11",
            file=1, offset=0x6000, runs=(PageRun(exe + 0x7000, 1),)),
        Vma(exe + 0x10000, exe + 0x31000, "rw-", False, "anon", "[heap]",
            runs=(PageRun(exe + 0x10000, 2), PageRun(exe + 0x12000, 1),
                  PageRun(exe + 0x20000, 3))),
        Vma(0x7ffff7d80000, 0x7ffff7da8000, "r--", False, "file",
            "/usr/lib/x86_64-linux-gnu/libc.so.6", file=2, advice=("hugepage",)),
        Vma(0x7ffff7fb0000, 0x7ffff7fb4000, "rw-", True, "anon", "/dev/zero (deleted)",
            advice=("dontfork", "dontdump"), runs=(PageRun(0x7ffff7fb0000, 4),)),
        Vma(0x7ffff7fc0000, 0x7ffff7fc4000, "r--", False, "special", "[vvar]"),
        Vma(0x7ffff7fc4000, 0x7ffff7fc6000, "r--", False, "special", "[vvar_vclock]"),
        Vma(0x7ffff7fc6000, 0x7ffff7fc8000, "r-x", False, "special", "[vdso]"),
        Vma(0x7ffffffde000, 0x7ffffffff000, "rw-", False, "anon", "[stack]",
            growsdown=True, runs=(PageRun(0x7fffffffb000, 4),)),
    )
    process = Process(
        pid=PID, comm="python3", exe="/usr/bin/python3.11",
        cmdline=("python3", "-c", "import time; time.sleep(1e9)"), cwd="/root",
        umask=0o022, personality=0,
        creds=Creds(uids=(1000,) * 4, gids=(1000,) * 4, groups=(4, 24, 1000),
                    cap_inh=0, cap_prm=0, cap_eff=0, cap_bnd=(1 << 41) - 1, cap_amb=0),
        rlimits=(Rlimit("nofile", 1024, 524288), Rlimit("stack", 8 << 20, RLIM_INFINITY)),
        mm=MMFields(start_code=exe + 0x4000, end_code=exe + 0x6000,
                    start_data=exe + 0x6000, end_data=exe + 0x8000,
                    start_brk=exe + 0x10000, brk=exe + 0x31000,
                    start_stack=0x7fffffffe4b0, arg_start=0x7fffffffe6d0,
                    arg_end=0x7fffffffe6f8, env_start=0x7fffffffe6f8,
                    env_end=0x7fffffffefe0),
        auxv=((33, 0x7ffff7fc6000), (6, 4096), (25, 0x7fffffffe879)),
        sigactions=(SigAction(2, 0x7ffff7e00000, 0x04000000, 0x7ffff7e01000, 0),
                    SigAction(13, 1, 0, 0, 0), SigAction(34, 0x7ffff7e00100, 4, 0, 1 << 1)),
        shared_pending=(bytes(range(128)),), vdso_hash=b"\x5a" * 32)
    threads = (
        Thread(PID, "python3", GeneralRegs(**regs), xstate=bytes(range(256)) * 43,
               sigmask=0, pending=(), altstack=(0, 2, 0), tid_address=0x7ffff7d7fa10,
               robust_list=(0x7ffff7d7fa20, 24), rseq=(0x7ffff7d80060, 32, 0x53053053)),
        Thread(PID + 1, "worker", GeneralRegs(**dict(regs, rsp=0x7ffff75fee38)),
               xstate=b"\x01" * 832, sigmask=1 << 13, pending=(b"\x02" * 128,),
               altstack=(0x7ffff0000000, 0, 65536), tid_address=0, robust_list=(0, 24),
               rseq=None),
    )
    fds = (Fd(0, 3, "rw", (), 0), Fd(1, 3, "rw", (), 0), Fd(2, 3, "rw", ("append",), 0),
           Fd(3, 4, "w", ("append", "cloexec"), 1234), Fd(5, 7, "r", ("directory",), 0))
    return Image(CURRENT_HEADER, process, threads, files, vmas, fds)


def page_data(image: Image) -> bytes:
    """Each saved page carries its own address, so misplaced data shows."""
    out = bytearray()
    for v in image.vmas:
        for r in v.runs:
            for i in range(r.count):
                addr = (r.addr + i * PAGE).to_bytes(8, "little")
                out += addr * (PAGE // 8)
    return bytes(out)


def chunks(data: bytes, sizes=(1, 4095, 10000, 3, 1 << 20)):
    i, k = 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        yield memoryview(data)[i:i + n]
        i, k = i + n, k + 1


def image_bytes(image=None) -> bytes:
    image = image or make_image()
    buf = io.BytesIO()
    write_image(buf, image, chunks(page_data(image)))
    return buf.getvalue()


def read_bytes(data: bytes, **kw) -> Image:
    return read_image(io.BytesIO(data), **kw)


def expected(image: Image, offset: int, length: int) -> Image:
    """`image` as the reader returns it: data offsets and page extent filled."""
    vmas, pos = [], 0
    for v in image.vmas:
        runs = []
        for r in v.runs:
            runs.append(replace(r, data_offset=pos))
            pos += r.count * PAGE
        vmas.append(replace(v, runs=tuple(runs)))
    return replace(image, vmas=tuple(vmas), pages_offset=offset,
                               pages_length=length)


def fails(data: bytes, status=CORRUPT, match: str = "", **kw) -> str:
    with pytest.raises(CkptError) as e:
        read_image(io.BytesIO(data), **kw)
    assert e.value.status == status, str(e.value)
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg
    return msg


# --- hand-crafting images that bypass the writer's checks --------------------------

def record_maps(image=None) -> list[dict]:
    image = image or make_image()
    groups = {"process": (image.process,), "thread": image.threads, "file": image.files,
              "vma": image.vmas, "fd": image.fds}
    return [schema.dump(x) for kind, schema in fmt.RECORDS.items() for x in groups[kind]]


def pack(records) -> bytes:
    packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")
    return b"".join(packer.pack(r) for r in records)


def seal(records, pages: bytes | None = None, *, pages_length=None, trailer=None, **header):
    """A complete image around `records` (maps, or raw msgpack bytes) with
    correct checksums and lengths unless told otherwise."""
    if pages is None:
        pages = page_data(make_image())
    if not isinstance(records, (bytes, bytearray)):
        records = pack(records)
    length = len(pages) if pages_length is None else pages_length
    head = fmt.header_bytes(bytes(records), length, **header)
    pad = bytes(fmt.pages_offset(len(records)) - len(head) - len(records))
    digest = fmt.image_hasher(head[fmt.CHECKSUM_OFFSET:])
    digest.update(pages)
    total = len(head) + len(records) + len(pad) + len(pages) + fmt.TRAILER_SIZE
    trailer = trailer or fmt.TRAILER.pack(fmt.TRAILER_MAGIC, total, digest.digest())
    return head + records + pad + pages + trailer


def with_field(record_type: str, index: int, /, **changes) -> list[dict]:
    """Valid records, with fields of the index-th record of a type changed."""
    recs = record_maps()
    recs[[i for i, r in enumerate(recs) if r["type"] == record_type][index]].update(changes)
    return recs


def first(recs, kind):
    return next(r for r in recs if r["type"] == kind)


# --- round trips -------------------------------------------------------------------

def test_round_trip_file(tmp_path):
    image = make_image()
    pages = page_data(image)
    path = tmp_path / "app.ckpt"
    with open(path, "wb") as out:
        n = write_image(out, image, chunks(pages))
    data = path.read_bytes()
    assert n == len(data) and data[:8] == MAGIC
    for verify in (True, False):
        got = read_image(path, verify_pages=verify)
        assert got.pages_offset % PAGE == 0 and got.pages_length == len(pages)
        assert got == expected(image, got.pages_offset, len(pages))
    assert got.files[3].path == "/tmp/log-\udcff.txt"     # non-UTF-8 bytes survive
    for v in got.vmas:
        for r in v.runs:
            at = got.pages_offset + r.data_offset
            assert data[at:at + 8] == r.addr.to_bytes(8, "little")
    tail = data[got.pages_offset + got.pages_length:]
    assert len(tail) == fmt.TRAILER_SIZE and tail.startswith(fmt.TRAILER_MAGIC)


@pytest.mark.parametrize("verify", [True, False])
def test_round_trip_pipe(verify):
    image = make_image()
    r, w = os.pipe()
    result = {}

    def writer():
        with open(w, "wb", buffering=0) as out:       # raw: short writes possible
            result["n"] = write_image(out, image, chunks(page_data(image)))

    t = threading.Thread(target=writer)
    t.start()
    with open(r, "rb", buffering=0) as src:
        got = read_image(src, verify_pages=verify)
    t.join()
    assert result["n"] == len(image_bytes(image))
    assert got == expected(image, got.pages_offset, got.pages_length)


def test_empty_image_parts():
    """No pages, no files, no fds: still a valid image."""
    image = make_image()
    vmas = tuple(replace(v, runs=()) for v in image.vmas)
    image = replace(image, vmas=vmas, fds=(), files=image.files[:2])
    buf = io.BytesIO()
    write_image(buf, image, [])
    got = read_bytes(buf.getvalue())
    assert got.pages_length == 0 and got == expected(image, got.pages_offset, 0)


def test_header_layout():
    data = image_bytes()
    h = fmt.HeaderFields._make(fmt.HEADER.unpack(data[:fmt.HEADER_SIZE]))
    assert fmt.HEADER_SIZE == 72 and fmt.TRAILER_SIZE == 48
    assert (h.magic, h.major, h.minor, h.machine, h.page_size, h.flags) == \
        (MAGIC, 1, 0, 62, 4096, 0)
    assert h.pages_length == len(page_data(make_image()))
    assert fmt.pages_offset(h.records_length) == read_bytes(data).pages_offset


# --- the writer refuses to write what the reader would refuse -----------------------

@pytest.mark.parametrize("delta", [-1, +1, -PAGE])
def test_writer_checks_page_total(delta):
    image = make_image()
    pages = page_data(image)
    pages = pages[:delta] if delta < 0 else pages + b"x"
    with pytest.raises(CkptError) as e:
        write_image(io.BytesIO(), image, [pages])
    assert e.value.status == Status.INTERNAL and "page data" in str(e.value)


@pytest.mark.parametrize("change, match", [
    (lambda im: replace(im, vmas=im.vmas[1:2] + im.vmas[0:1] + im.vmas[2:]),
     "vma 1 starts below vma 0"),
    (lambda im: replace(im, threads=()), "no thread"),
    (lambda im: replace(im, fds=im.fds + (Fd(9, 99, "r", (), 0),)), "file id 99"),
    (lambda im: replace(im, header=replace(im.header, page_size=16384)),
     "header"),
    (lambda im: replace(im, process=replace(im.process, pid="x")),
     "process: pid: expected int"),
    (lambda im: replace(im, process=replace(im.process, pid=2**70)),
     "cannot encode process 0"),
])
def test_writer_refuses_invalid_image(change, match):
    image = change(make_image())
    with pytest.raises(CkptError) as e:
        write_image(io.BytesIO(), image, [page_data(make_image())])
    assert e.value.status == Status.INTERNAL and match in str(e.value), str(e.value)


def test_writer_reports_output_errors():
    class Full(io.RawIOBase):
        name = "/mnt/full/app.ckpt"

        def writable(self):
            return True

        def write(self, b):
            raise OSError(28, "No space left on device")

    with pytest.raises(CkptError) as e:
        write_image(Full(), make_image(), [page_data(make_image())])
    assert e.value.status == Status.OUTPUT
    assert str(e.value) == "/mnt/full/app.ckpt: cannot write image: No space left on device"


# --- not an image, other versions ---------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"\x89CKP", b"\x7fELF\x02\x01\x01" + bytes(100),
                                  b"#!/bin/sh\n", MAGIC[:7] + b"X" + bytes(64)])
def test_not_an_image(data, tmp_path):
    path = tmp_path / "prog"
    path.write_bytes(data)
    with pytest.raises(CkptError) as e:
        read_image(path)
    assert e.value.status == NOT_AN_IMAGE
    assert str(e.value) == f"{path}: not a ckpt image"


def test_missing_file(tmp_path):
    with pytest.raises(CkptError) as e:
        read_image(tmp_path / "nope.ckpt")
    assert e.value.status == Status.USAGE and "No such file" in str(e.value)


@pytest.mark.parametrize("header, match", [
    (dict(major=2), "format version 2.0; this ckpt reads version 1.x"),
    (dict(major=0, minor=9), "format version 0.9"),
    (dict(machine=183), "architecture e_machine 183; this ckpt supports x86_64 (62)"),
    (dict(page_size=16384), "page size 16384; this ckpt supports 4096"),
    (dict(minor=2, flags=4), "unknown header flags 0x4: image format 1.2 is newer"),
])
def test_unsupported(header, match):
    fails(seal(record_maps(), **header), UNSUPPORTED, match)


def test_unknown_flag_in_a_known_minor_version_is_corrupt():
    fails(seal(record_maps(), minor=1, flags=4), CORRUPT, "unknown header flags 0x4")


def test_version_2_with_garbage_after_version():
    """A reader of 1.x must not interpret anything after a foreign version."""
    data = bytearray(image_bytes())
    data[8:10] = (2).to_bytes(2, "little")
    data[12:] = os.urandom(len(data) - 12)
    fails(bytes(data), UNSUPPORTED, "format version 2.")


def test_version_2_shorter_than_a_v1_header():
    fails(MAGIC + b"\x02\x00\x00\x00", UNSUPPORTED, "format version 2.0")
    fails(MAGIC + b"\x01\x00", CORRUPT, "truncated in header")


def test_newer_minor_is_read_when_it_adds_nothing_unknown():
    got = read_bytes(seal(record_maps(), minor=7))
    assert (got.header.version_major, got.header.version_minor) == (1, 7)


# --- compressed page data (format 1.1) ---------------------------------------------

def zchunk(data: bytes, *, level=3, content_size=True, dlen=None, slen=None,
           after=b"") -> bytes:
    """One stored chunk: CHUNK_HEAD + a zstd frame of data (+ `after`)."""
    import zstandard
    frame = zstandard.ZstdCompressor(level=level, write_content_size=content_size) \
        .compress(data) + after
    return fmt.CHUNK_HEAD.pack(len(frame) if slen is None else slen,
                               len(data) if dlen is None else dlen) + frame


def zsealed(stored: bytes, pages_length: int | None = None, **header) -> bytes:
    header = dict(minor=1, flags=fmt.FLAG_ZSTD) | header
    return seal(record_maps(), stored, pages_length=pages_length or len(page_data(make_image())),
                **header)


def test_compressed_round_trip():
    image = make_image()
    pages = page_data(image)
    buf = io.BytesIO()
    n = write_image(buf, image, chunks(pages), zstd_level=1)
    data = buf.getvalue()
    assert n == len(data) < len(image_bytes(image))
    h = fmt.HeaderFields._make(fmt.HEADER.unpack(data[:fmt.HEADER_SIZE]))
    assert (h.minor, h.flags, h.pages_length) == (1, fmt.FLAG_ZSTD, len(pages))
    out = io.BytesIO()
    got = read_bytes(data, inflate_to=out)
    assert out.getvalue() == pages
    assert (got.header.version_minor, got.header.flags) == (1, fmt.FLAG_ZSTD)
    assert got == replace(expected(image, got.pages_offset, len(pages)), header=got.header)
    assert got.extra["stored_length"] == len(data) - got.pages_offset - fmt.TRAILER_SIZE
    skipped = read_bytes(data, verify_pages=False)     # chunks skipped, not inflated
    assert skipped == got and skipped.extra["stored_length"] == got.extra["stored_length"]
    assert "stored zstd-compressed" in summarize(got)
    # An uncompressed image is still format 1.0, flags 0, whatever this reader knows.
    assert image_bytes(image)[8:12] == b"\x01\x00\x00\x00"


def test_compressed_chunks_are_split_at_the_limit():
    from ckpt.image.writer import _compressed
    stored = list(_compressed([bytes(fmt.MAX_CHUNK_DATA + PAGE), bytes(PAGE)], 1))
    assert [fmt.CHUNK_HEAD.unpack(c[:8])[1] for c in stored] == \
        [fmt.MAX_CHUNK_DATA, PAGE, PAGE]


def test_compressed_page_data_defects():
    pages = page_data(make_image())
    n = len(pages)
    good = zchunk(pages[:PAGE]) + zchunk(pages[PAGE:])
    assert read_bytes(zsealed(good)).pages_length == n
    import zstandard
    for stored, match in [
        (zchunk(pages, dlen=0), "chunk 0: data_length 0 is not in"),
        (zchunk(pages, dlen=n + PAGE), f"chunk 0: data_length {n + PAGE} is not in 1..{n}"),
        (zchunk(pages[:PAGE]) + zchunk(pages[PAGE:], dlen=n),
         f"chunk 1: data_length {n} is not in"),
        (zchunk(pages, slen=0), "chunk 0: stored_length 0 is not in"),
        (fmt.CHUNK_HEAD.pack(fmt.max_chunk_stored(n) + 1, n) + bytes(8),
         "stored_length"),
        (zchunk(pages, content_size=False), "declares no content size"),
        (zchunk(pages[:PAGE], dlen=n) , f"declares {PAGE} content size, not {n}"),
        (zchunk(pages, after=b"xyz"), "incomplete or has bytes after it"),
        (zchunk(pages)[:-1], "chunk 0: zstd"),       # the trailer's first byte read as its last
        (fmt.CHUNK_HEAD.pack(16, n) + b"not a zstd frame", "not a zstd frame"),
        (fmt.CHUNK_HEAD.pack(len(zchunk(pages)) - 8, n)
         + zstandard.ZstdCompressor(write_content_size=True).compress(pages)[:-2] + b"\0\0",
         "chunk 0"),
    ]:
        fails(zsealed(stored), CORRUPT, match)
    whole = zsealed(good)
    end = len(whole) - fmt.TRAILER_SIZE
    fails(whole[:end - 5], CORRUPT, "truncated in page data chunk 1")
    fails(whole[:end - len(good) + 4], CORRUPT, "truncated in page data chunk 0")
    # A flipped bit in a frame is refused, by zstd or by the checksum.
    data = bytearray(zsealed(good))
    data[len(data) - fmt.TRAILER_SIZE - 20] ^= 0x10
    fails(bytes(data), CORRUPT)
    # A frame that would decompress to 4 MiB more than promised: refused by
    # its header alone, before any memory is spent on it.
    bomb = zchunk(bytes(fmt.MAX_CHUNK_DATA), dlen=n)
    fails(zsealed(bomb), CORRUPT, f"declares {fmt.MAX_CHUNK_DATA} content size")


def test_compressed_frames_are_decompressed_only_once_authenticated():
    """A restore that authenticates hands the zstd decoder nothing nobody
    vouched for: the chunks are hashed first, decompressed after."""
    n = len(page_data(make_image()))
    bad = zsealed(fmt.CHUNK_HEAD.pack(16, n) + b"not a zstd frame")

    def refuse(trailer, blocks):
        raise CkptError(Status.SIGNATURE, "<stream>: not signed")
    fails(bad, Status.SIGNATURE, "not signed", authenticate=refuse)
    fails(bad, CORRUPT, "not a zstd frame", authenticate=lambda t, b: None)
    class Full(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise OSError(28, "No space left on device")
    good = io.BytesIO()
    write_image(good, make_image(), [page_data(make_image())], zstd_level=1)
    fails(good.getvalue(), Status.NO_MEMORY, "cannot hold the decompressed page data: No "
          "space left", inflate_to=Full())
    out = io.BytesIO()
    good = io.BytesIO()
    write_image(good, make_image(), [page_data(make_image())], zstd_level=1)
    read_bytes(good.getvalue(), authenticate=lambda t, b: None, inflate_to=out)
    assert out.getvalue() == page_data(make_image())


# --- truncation, trailing data, bit flips ---------------------------------------------

def boundaries(data: bytes) -> list[int]:
    img = read_bytes(data)
    end = img.pages_offset + img.pages_length
    records_end = fmt.HEADER_SIZE + int.from_bytes(data[24:32], "little")
    return sorted({0, 1, 7, 8, 9, fmt.CHECKSUM_OFFSET, fmt.HEADER_SIZE - 1, fmt.HEADER_SIZE,
                   fmt.HEADER_SIZE + 1, records_end - 1, records_end, records_end + 1,
                   img.pages_offset - 1, img.pages_offset, img.pages_offset + PAGE,
                   end - 1, end, end + 8, len(data) - 1})


def test_truncated_at_every_boundary_and_at_random():
    data = image_bytes()
    rng = random.Random(3)
    cuts = boundaries(data) + [rng.randrange(len(data)) for _ in range(40)]
    for cut in cuts:
        status = NOT_AN_IMAGE if cut < len(MAGIC) else CORRUPT
        for verify in (True, False):
            msg = fails(data[:cut], status, verify_pages=verify)
            if status == CORRUPT:
                assert "truncated" in msg or "checksum" in msg, (cut, msg)


def test_truncated_on_a_seekable_file_without_verification(tmp_path):
    data = image_bytes()
    path = tmp_path / "t.ckpt"
    path.write_bytes(data[:-fmt.TRAILER_SIZE - 100])
    with pytest.raises(CkptError) as e:
        read_image(path, verify_pages=False)
    assert e.value.status == CORRUPT and "truncated in page data" in str(e.value)


@pytest.mark.parametrize("extra", [b"\0", b"garbage", MAGIC])
def test_trailing_data(extra):
    fails(image_bytes() + extra, CORRUPT, "data after the trailer")
    fails(image_bytes() + extra, CORRUPT, "data after the trailer", verify_pages=False)


def test_random_bit_flips_are_all_detected():
    data = image_bytes()
    rng = random.Random(7)
    for _ in range(200):
        bit = rng.randrange(len(data) * 8)
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CkptError) as e:
            read_bytes(bytes(flipped))
        assert e.value.status in (CORRUPT, UNSUPPORTED, NOT_AN_IMAGE), bit


def test_checksums():
    data = image_bytes()
    img = read_bytes(data)
    bad_page = bytearray(data)
    bad_page[img.pages_offset + 5] ^= 0xFF
    fails(bytes(bad_page), CORRUPT, "page data checksum mismatch")
    read_bytes(bytes(bad_page), verify_pages=False)      # skipped on request
    bad_record = bytearray(data)
    bad_record[fmt.HEADER_SIZE + 10] ^= 1
    fails(bytes(bad_record), CORRUPT, "header checksum mismatch")
    bad_pad = bytearray(data)
    bad_pad[img.pages_offset - 1] = 1
    fails(bytes(bad_pad), CORRUPT, "nonzero bytes in the padding")


def test_trailer_checks():
    pages = page_data(make_image())
    fails(seal(record_maps(), trailer=b"CKPT-EN!" + bytes(40)), CORRUPT, "bad trailer magic")
    fails(seal(record_maps(), trailer=fmt.TRAILER.pack(fmt.TRAILER_MAGIC, 5, bytes(32))),
          CORRUPT, "trailer says the image is 5 bytes")
    fails(seal(record_maps(), pages, pages_length=len(pages) - PAGE), CORRUPT,
          "header says")


# --- hand-crafted bad records ---------------------------------------------------------

def _vma_runs(i, runs):
    return with_field("vma", i, runs=runs)


BAD_RECORDS = [
    (with_field("vma", 2, prot="rwz"), "vma 2: prot: unknown value 'rwz'"),
    (with_field("vma", 2, prot="rw"), "vma 2: prot: unknown value 'rw'"),
    (_vma_runs(2, [[EXE + 0x7000, 2**32 - 1]]), "vma 2: run 0 ends beyond the vma"),
    (_vma_runs(2, [[EXE + 0x7000, 0]]), "vma 2: runs[0][1]: 0 out of range"),
    (_vma_runs(2, [[EXE + 0x5000, 1]]), "vma 2: run 0 starts below the vma"),
    (_vma_runs(3, [[EXE + 0x10000, 2], [EXE + 0x11000, 1]]), "run 1 overlaps or precedes"),
    (_vma_runs(3, [[0x555555564001, 1]]), "not page-aligned"),
    (_vma_runs(8, [[0x7ffff7fc6000, 1]]), "vma 8: saved pages on a special vma"),
    (with_field("vma", 3, start=EXE + 0x7000), "vma 3 overlaps vma 2"),
    (with_field("vma", 3, start=EXE + 0x1000, end=EXE + 0x2000, runs=[]),
     "vma 3 starts below vma 2 (vmas must be sorted)"),
    (with_field("vma", 0, end=0x555555554000), "vma 0: empty or inverted range"),
    (with_field("vma", 0, end=0x555555554800), "page-aligned"),
    (with_field("vma", 0, file=None), "vma 0: kind 'file' with file None"),
    (with_field("vma", 0, file=42), "vma 0: file id 42 is not in the file table"),
    (with_field("vma", 3, offset=4096), "kind 'anon' with a file offset"),
    (with_field("vma", 8, name="[vsyscall]"), "special vma named '[vsyscall]'"),
    (with_field("vma", 0, kind="stack"), "vma 0: kind: unknown value 'stack'"),
    (with_field("vma", 0, shared=1), "vma 0: shared: expected bool, got int"),
    (with_field("vma", 0, start=-4096), "vma 0: start: -4096 out of range"),
    (with_field("vma", 0, start=4096.0), "vma 0: start: expected int, got float"),
    (with_field("vma", 5, advice=["dontfork", "dontfork"]), "advice: duplicate items"),
    (with_field("vma", 5, advice=["sequential"]), "unknown value 'sequential'"),
    (with_field("fd", 1, fd=0), "fd 1: fd 0 repeats fd 0"),
    (with_field("fd", 1, file=9), "fd 1 (fd 1): file id 9 is not in the file table"),
    (with_field("fd", 1, access="x"), "fd 1: access: unknown value 'x'"),
    (with_field("fd", 1, fd=2**31), "fd 1: fd: 2147483648 out of range"),
    (with_field("file", 1, id=1), "file 1: id 1 repeats file 0"),
    (with_field("file", 1, path=""), "file 1: path: string of 0 bytes"),
    (with_field("file", 1, path="/" * 4097), "file 1: path: string of 4097 bytes"),
    (with_field("file", 1, build_id=b"\0" * 65), "file 1: build_id: 65 bytes, expected 0..64"),
    (with_field("thread", 0, tid=PID + 1), "thread 0 has tid 4243"),
    (with_field("thread", 1, tid=PID), "thread 1: tid 4242 repeats thread 0"),
    (with_field("thread", 1, xstate=b"\0" * 100), "xstate: 100 bytes, expected 576..65536"),
    (with_field("thread", 1, xstate=b"\0" * 65537), "bad msgpack"),
    (with_field("thread", 1, pending=[b"\0" * 127]), "pending[0]: 127 bytes, expected 128"),
    (with_field("thread", 1, rseq=[1, 2]), "rseq: 2 items, expected 3"),
    (with_field("thread", 1, regs={"rip": 1}), "thread 1: regs: missing field"),
    (with_field("thread", 1, comm="x" * 65), "comm: string of 65 bytes"),
    (with_field("process", 0, umask=0o1000), "process: umask: 512 out of range"),
    (with_field("process", 0, pid=0), "process: pid: 0 out of range"),
    (with_field("process", 0, sigactions=[dict(signo=9, handler=1, flags=0, restorer=0,
                                              mask=0)]), "signo: 9 out of range"),
    (with_field("process", 0, rlimits=[["nofile", 10, 5]]),
     "rlimit nofile: soft limit 10 above hard limit 5"),
    (with_field("process", 0, rlimits=[["nofile", 1, 5], ["nofile", 1, 5]]), "duplicate"),
    (with_field("process", 0, rlimits=[["files", 1, 5]]), "unknown value 'files'"),
    (with_field("process", 0, shared_pending=[b"x"]), "shared_pending[0]: 1 bytes"),
    (with_field("vma", 0, foo=1), "vma 0: unknown field 'foo'"),
    (with_field("vma", 0, **{"type": "vma", "x-": 1}), None),        # extension: skipped
    ([r for r in record_maps() if r["type"] != "thread"], "no thread records"),
    ([r for r in record_maps() if r["type"] != "process"], "no process record"),
    (record_maps()[:1] + record_maps(), "more than 1 process record"),
    (record_maps()[1:2] + record_maps()[:1] + record_maps()[2:],
     "record 1: process record after thread records"),
    (record_maps() + [{"type": "thread"}], "record 23: thread record after fd records"),
    (record_maps() + [{"type": "socket"}], "record 23: unknown record type 'socket'"),
    (record_maps() + [{"type": "x-socket", "fd": 3}], None),
    (record_maps() + [[1, 2]], "record 23: not a map with a string 'type'"),
    (record_maps() + [{"type": 5}], "not a map with a string 'type'"),
    (record_maps() + [{1: 2}], "bad msgpack"),
]


@pytest.mark.parametrize("records, match", BAD_RECORDS)
def test_bad_records(records, match):
    data = seal(records)
    if match is None:
        read_bytes(data)
    else:
        fails(data, CORRUPT, "<stream>: corrupt image: ")
        fails(data, CORRUPT, match)


def test_unknown_names_from_a_newer_minor_version_are_unsupported():
    fails(seal(with_field("vma", 0, foo=1), minor=2), UNSUPPORTED,
          "vma 0: unknown field 'foo': image format 1.2 is newer than this ckpt's 1.1")
    fails(seal(record_maps() + [{"type": "socket"}], minor=3), UNSUPPORTED,
          "unknown record type 'socket'")
    fails(seal(with_field("vma", 0, kind="dax"), minor=2), UNSUPPORTED, "unknown value 'dax'")
    fails(seal(with_field("vma", 0, start=-1), minor=2), CORRUPT)   # not a new name
    fails(seal(with_field("vma", 0, foo=1), minor=1), CORRUPT, "unknown field 'foo'")


def test_raw_msgpack_defects():
    good = pack(record_maps())
    fails(seal(good[:-1]), CORRUPT, "records section ends inside record 22 (at byte")
    fails(seal(good + b"\xc1"), CORRUPT, "bad msgpack")               # never-used byte
    fails(seal(good + b"\xdd\xff\xff\xff\xff"), CORRUPT, "bad msgpack")   # 4G-item array
    fails(seal(good + b"\xc7\x01\x05x"), CORRUPT, "bad msgpack")        # ext type
    dup = msgpack.Packer()
    dup_key = dup.pack_map_pairs([("type", "x-a"), ("type", "x-b")])
    fails(seal(good + dup_key), CORRUPT, "duplicate key")
    nested = b"\x91" * 5000 + b"\xc0"                                  # deep arrays
    fails(seal(good + nested), CORRUPT)


def test_records_section_limit():
    head = fmt.HEADER.pack(MAGIC, 1, 0, 62, 0, PAGE, 0, fmt.MAX_RECORDS_LENGTH + 1, 0,
                           bytes(32))
    fails(head, CORRUPT, "exceeds the limit of 64 MiB")


def test_reserved_field():
    fails(seal(record_maps(), reserved=1), CORRUPT, "reserved header field")
    fails(seal(record_maps(), flags=2), CORRUPT, "unknown header flags 0x2")
    fails(seal(record_maps(), flags=1), CORRUPT, "header flag 0x1 (zstd) needs format 1.1")


# --- property: mutations of a valid image only ever raise CkptError -------------------

_RECORDS = record_maps()
_RAW = pack(_RECORDS)
_PAGES = page_data(make_image())

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=200)
    | st.sampled_from(["rwx", "anon", "file", "special", "[vdso]", "r", "append"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=10)


def read_or_ckpt_error(data: bytes):
    try:
        read_bytes(data)
    except CkptError as e:
        assert e.status in (CORRUPT, UNSUPPORTED, NOT_AN_IMAGE)
        assert "\n" not in str(e)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_field_mutations_only_raise_ckpt_errors(data):
    recs = [dict(r) for r in _RECORDS]
    for _ in range(data.draw(st.integers(1, 3))):
        rec = data.draw(st.sampled_from(recs))
        key = data.draw(st.sampled_from(sorted(rec)) | st.text(max_size=6))
        rec[key] = data.draw(msgpack_values)
    read_or_ckpt_error(seal(recs, _PAGES))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_RAW) - 1), st.sampled_from("flip del ins set".split()),
                          st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_mutations_of_records_only_raise_ckpt_errors(edits):
    raw = bytearray(_RAW)
    for pos, op, byte in edits:
        pos = min(pos, len(raw) - 1)
        if op == "flip":
            raw[pos] ^= 1 << (byte % 8)
        elif op == "del":
            del raw[pos]
        elif op == "ins":
            raw.insert(pos, byte)
        else:
            raw[pos] = byte
    read_or_ckpt_error(seal(bytes(raw), _PAGES))


# --- summary, JSON, import hygiene -----------------------------------------------------

def test_summarize_and_to_json():
    image = read_bytes(image_bytes())
    text = summarize(image)
    for needle in ("format 1.0, x86_64, page size 4096", "pid 4242", "[heap]", "[vdso]",
                   "[stack]  [growsdown]", "/tmp/log-\\xff.txt", "SIGINT", "SIGRTMIN+0",
                   "SIG_IGN", "nofile 1024/524288", "cmdline   python3 -c 'import time; time.sleep(1e9)'", "stack 8388608/unlimited",
                   "     4243  worker", "rw-s", "dontfork, dontdump"):
        assert needle in text, needle
    assert "\udcff" not in text and "\x1b" not in text
    js = to_json(image)
    json.dumps(js)
    assert js["threads"][0]["regs"]["rip"] == 0x7ffff7e4a1b4
    assert js["files"][0]["build_id"] == bytes(range(20)).hex()
    assert js["vmas"][3]["runs"][1]["data_offset"] == 3 * PAGE
    assert js["header"]["arch"] == "x86_64" and js["pages_length"] == image.pages_length


def test_summary_escapes_control_characters():
    image = make_image()
    image = replace(image, process=replace(
        image.process, comm="\x1b]0;pwned\x07", cwd="/tmp/\udc80"))
    text = summarize(image)
    assert "\x1b" not in text and "\\x1b]0;pwned\\x07" in text and "/tmp/\\x80" in text


def test_reader_imports_nothing_slow():
    code = ("import sys, ckpt.image; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('click', 'elftools', 'ptrace') or m.startswith(('ckpt.checkpoint', "
            "'ckpt.restore', 'ckpt.cli'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()), check=True)
    assert out.stdout.strip() == "[]"
