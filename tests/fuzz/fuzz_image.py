"""Coverage-guided fuzz target (atheris) for the image reader and validator.

    tests/fuzz/run.sh 3600          # one hour; see README.md beside this file

Every input must end in a value or a CkptError of an image class with a
one-line message; anything else (another exception, a hang, a memory blow-up
past -rss_limit_mb) is a crash that libFuzzer saves as crash-*.

The first byte of an input picks how the rest is used, so that mutations
get past the checksums instead of dying at the first one:

  0  the rest is a whole image stream, as is;
  1  the rest is a records section: it is sealed with a correct header,
     checksums, page data of the length the header claims (up to 1 MiB) and
     trailer, then read with and without page verification and validated;
  2  the rest follows a valid image as its signature section and goes
     through the signature check (cryptography) of the restore path.

Run from the repository root (run.sh does): the seeds come from
tests/test_image.make_image() and a few hand-made variants.
"""
from __future__ import annotations

import io
import os
import sys

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

with atheris.instrument_imports(include=["ckpt"]):
    from ckpt import sign
    from ckpt.errors import CkptError, Status
    from ckpt.image import format as fmt
    from ckpt.image import read_image, summarize, to_json
    from ckpt.image.validate import validate_image

IMAGE_STATUSES = {Status.NOT_AN_IMAGE, Status.UNSUPPORTED_IMAGE, Status.CORRUPT_IMAGE,
                  Status.SIGNATURE}
MAX_FAKE_PAGES = 1 << 20
_BASE = None


def _base() -> bytes:
    global _BASE
    if _BASE is None:
        from test_image import image_bytes
        _BASE = image_bytes()
    return _BASE


def seal(records: bytes, minor: int = 0) -> bytes:
    """A well-checksummed image around `records` (page data of zeros)."""
    try:
        pages_length = fmt_pages_length(records)
    except fmt.Malformed:
        pages_length = 0
    pages = bytes(min(pages_length, MAX_FAKE_PAGES))
    head = fmt.header_bytes(records, pages_length, minor=minor)
    pad = bytes(fmt.pages_offset(len(records)) - len(head) - len(records))
    digest = fmt.image_hasher(head[fmt.CHECKSUM_OFFSET:])
    digest.update(pages)
    total = len(head) + len(records) + len(pad) + pages_length + fmt.TRAILER_SIZE
    return head + records + pad + pages + fmt.TRAILER.pack(fmt.TRAILER_MAGIC, total,
                                                           digest.digest())


def fmt_pages_length(records: bytes) -> int:
    from ckpt.image.reader import decode_records
    return decode_records(records)[-1]


def one_read(data: bytes, **kw):
    try:
        img = read_image(io.BytesIO(data), name="fuzz", **kw)
        validate_image(img, name="fuzz")
        summarize(img)
        to_json(img)
    except CkptError as e:
        if e.status not in IMAGE_STATUSES or "\n" in e.message:
            raise AssertionError(f"unexpected CkptError {e.status!r}: {e.message!r}")


def authenticate(trailer, blocks):
    sign.check_signatures(trailer, blocks, name="fuzz", trusted=(bytes(32),),
                          required=bool(blocks) and blocks[0].algorithm == 1)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        one_read(rest)
    elif mode == 1:
        image = seal(rest, minor=data[0] // 3 % 2)
        one_read(image)
        one_read(image, verify_pages=False)
        one_read(image, authenticate=lambda t, b: None)
    else:
        one_read(_base() + rest, authenticate=authenticate)


def valid_image():
    """tests/test_image.make_image() changed until the validator accepts it,
    so that mutations start from an image that reaches every check."""
    from test_image import make_image
    from ckpt.image.record import replace
    from ckpt.image.validate import problems
    im = make_image()

    def sig(n, info=bytes(128)):
        return n.to_bytes(4, "little") + info[4:]
    im = replace(im, process=replace(im.process, shared_pending=(sig(10),)))
    im = replace(im, threads=tuple(
        replace(t, regs=replace(t.regs, rip=0x555555558100, rsp=0x7FFFFFFFE2C8),
                   rseq=(0x555555564000, 32, 0x53053053) if t.rseq else None,
                   pending=tuple(sig(11, x) for x in t.pending))
        for t in im.threads))
    assert problems(im) is None, problems(im)
    return im


def compressed_image_bytes(image) -> bytes:
    """`image` written with zstd page data (format 1.1), in chunks of a
    page or two so that mutations meet several chunk headers."""
    from test_image import page_data
    from ckpt.image.writer import write_image
    buf, pages = io.BytesIO(), page_data(image)
    write_image(buf, image, (pages[i:i + 6144] for i in range(0, len(pages), 6144)),
                zstd_level=1)
    return buf.getvalue()


def seeds(directory: str) -> None:
    """Write the seed corpus into `directory` (the seeds it lacks)."""
    os.makedirs(directory, exist_ok=True)
    from test_image import image_bytes, pack, record_maps
    valid = valid_image()
    found = [b"\x00" + image_bytes(), b"\x01" + pack(record_maps()),
             b"\x02" + fmt.signature_block(bytes(96)),
             b"\x02" + fmt.signature_block(bytes(40), version=2),
             b"\x00" + image_bytes(valid), b"\x01" + pack(record_maps(valid)),
             b"\x00" + compressed_image_bytes(valid)]
    for i, s in enumerate(found):
        path = os.path.join(directory, f"seed-{i}")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(s)


def replay(paths) -> int:
    """Run every input of the given files/directories once, no fuzzing (for
    coverage.py: see run.sh --coverage). Returns how many ran."""
    n = 0
    for p in paths:
        files = [os.path.join(p, f) for f in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
        for name in files:
            with open(name, "rb") as f:
                TestOneInput(f.read())
            n += 1
    return n


def main() -> None:
    if sys.argv[1:2] == ["--replay"]:
        print(f"replayed {replay(sys.argv[2:])} inputs")
        return
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus:
        seeds(corpus[0])
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
