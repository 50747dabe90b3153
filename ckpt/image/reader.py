"""read_image: the strict, sequential reader of image format v1.

Reads front to back (a pipe will do), trusts nothing, bounds every size, and
turns every defect into one CkptError line. It is on the restore path, so it
imports only the stdlib, msgpack, blake3 and the model.
"""
from __future__ import annotations

import os

import msgpack

from ..errors import CkptError, Status
from . import format as fmt
from .model import Header, Image

CHUNK = 1 << 20                 # page data is hashed/skipped this much at a time

_LIMITS = {"process": 1, "thread": fmt.MAX_THREADS, "file": fmt.MAX_FILES,
           "vma": fmt.MAX_VMAS, "fd": fmt.MAX_FDS}
_RANK = {t: i for i, t in enumerate(fmt.RECORDS)}


class _NotAnImage(Exception):
    pass


class _Unsupported(Exception):
    pass


class _SinkFailed(Exception):
    """Writing to inflate_to failed: the caller's side, not the image's."""


def read_image(src, *, verify_pages: bool = True, name: str | None = None,
               authenticate=None, inflate_to=None) -> Image:
    """Read and validate a whole image from a path or a binary file object.

    Page data is not loaded: the result says where it is (Image.pages_offset,
    PageRun.data_offset). With verify_pages, the page data is streamed through
    its checksum; without, it is skipped (seek if possible). Raises CkptError:
    NOT_AN_IMAGE, UNSUPPORTED_IMAGE, CORRUPT_IMAGE, or USAGE if the path can't
    be opened. `name` is what messages call the image (default: the path).

    Image.extra holds "trailer" (its 48 bytes) and "signatures" (SigBlocks,
    in file order). With `authenticate` (and verify_pages), the records are
    decoded only after the whole stream is read and checksummed and
    authenticate(trailer, signatures) has returned: a restore that requires
    a signature never parses records nobody vouched for. It raises
    CkptError to refuse.

    Compressed page data (FLAG_ZSTD) is decompressed chunk by chunk when
    verify_pages (every frame must hold exactly its data_length), and
    written to `inflate_to` (a binary file object) if given: the page data
    as an uncompressed image would hold it, from its offset 0 (a failed
    write: NO_MEMORY). Without
    verify_pages the chunks are skipped. Image.extra["stored_length"] is
    the page data's length in the stream (= pages_length if uncompressed).
    """
    if isinstance(src, (str, bytes, os.PathLike)):
        name = name or os.fsdecode(src)
        try:
            f = open(src, "rb")
        except OSError as e:
            raise CkptError(Status.USAGE, f"{name}: cannot open: {e.strerror or e}") from None
        with f:
            return _read(f, name, verify_pages, authenticate, inflate_to)
    if name is None:
        name = getattr(src, "name", None)
        name = name if isinstance(name, str) else "<stream>"
    return _read(src, name, verify_pages, authenticate, inflate_to)


def _read(f, name: str, verify_pages: bool, authenticate, inflate_to=None) -> Image:
    try:
        return _parse(_Input(f), verify_pages, authenticate, inflate_to)
    except _NotAnImage:
        raise CkptError(Status.NOT_AN_IMAGE, f"{name}: not a ckpt image") from None
    except _Unsupported as e:
        raise CkptError(Status.UNSUPPORTED_IMAGE, f"{name}: unsupported image: {e}") from None
    except _SinkFailed as e:
        raise CkptError(Status.NO_MEMORY, f"{name}: cannot hold the decompressed page "
                        f"data: {e}") from None
    except fmt.Malformed as e:
        raise CkptError(Status.CORRUPT_IMAGE, f"{name}: corrupt image: {e}") from None
    except OSError as e:
        raise CkptError(Status.CORRUPT_IMAGE,
                        f"{name}: cannot read image: {e.strerror or e}") from None
    except MemoryError:
        raise CkptError(Status.NO_MEMORY, f"{name}: not enough memory to read the "
                        "image's records") from None


def _parse(inp: _Input, verify_pages: bool, authenticate=None, inflate_to=None) -> Image:
    magic = inp.read_upto(len(fmt.MAGIC))
    if magic != fmt.MAGIC:
        raise _NotAnImage()
    # Magic and version keep their offsets in every major version; nothing
    # after them is read until the version is known.
    version = inp.exact(4, "header")
    major, minor = int.from_bytes(version[:2], "little"), int.from_bytes(version[2:], "little")
    if major != fmt.VERSION_MAJOR:
        raise _Unsupported(f"format version {major}.{minor}; this ckpt reads "
                           f"version {fmt.VERSION_MAJOR}.x")
    raw_header = magic + version + inp.exact(fmt.HEADER_SIZE - 12, "header")
    h = fmt.HeaderFields._make(fmt.HEADER.unpack(raw_header))
    if h.records_length > fmt.MAX_RECORDS_LENGTH:
        raise fmt.Malformed(f"records section of {h.records_length} bytes exceeds "
                            f"the limit of {fmt.MAX_RECORDS_LENGTH >> 20} MiB")
    records = inp.exact(h.records_length, "records")
    if fmt.header_checksum(raw_header, records) != h.checksum:
        raise fmt.Malformed("header checksum mismatch")
    if h.machine not in fmt.MACHINES:
        raise _Unsupported(f"architecture e_machine {h.machine}; this ckpt supports "
                           + ", ".join(f"{n} ({m})" for m, n in fmt.MACHINES.items()))
    if h.page_size != fmt.PAGE_SIZE:
        raise _Unsupported(f"page size {h.page_size}; this ckpt supports {fmt.PAGE_SIZE}")

    def newer(e: fmt.UnknownName) -> Exception:
        if h.minor > fmt.VERSION_MINOR:
            return _Unsupported(f"{e}: image format {h.major}.{h.minor} is newer than "
                                f"this ckpt's {fmt.VERSION_MAJOR}.{fmt.VERSION_MINOR}")
        return e

    try:
        if h.flags & ~fmt.KNOWN_FLAGS:
            raise fmt.UnknownName(f"unknown header flags {h.flags & ~fmt.KNOWN_FLAGS:#x}")
        if h.reserved:
            raise fmt.UnknownName(f"reserved header field is {h.reserved:#x}, not 0")
    except fmt.UnknownName as e:
        raise newer(e) from None
    if h.flags & fmt.FLAG_ZSTD and h.minor < 1:
        raise fmt.Malformed(f"header flag {fmt.FLAG_ZSTD:#x} (zstd) needs format 1.1, "
                            f"the image says {h.major}.{h.minor}")

    def decode():
        try:
            decoded = decode_records(records)
        except fmt.UnknownName as e:
            raise newer(e) from None
        if h.pages_length != decoded[-1]:
            raise fmt.Malformed(f"header says {h.pages_length} bytes of page data, "
                                f"the vmas' runs {decoded[-1]}")
        return decoded

    deferred = authenticate is not None and verify_pages
    if not deferred:
        decoded = decode()
    pages_length = h.pages_length
    offset = fmt.pages_offset(h.records_length)
    padding = inp.exact(offset - fmt.HEADER_SIZE - h.records_length, "padding")
    if padding.count(0) != len(padding):
        raise fmt.Malformed("nonzero bytes in the padding before page data")
    hasher = fmt.image_hasher(h.checksum) if verify_pages else None
    zstd = h.flags & fmt.FLAG_ZSTD
    # Authenticating, frames are decompressed only once vouched for: hashed
    # as stored first, read again after authenticate() (a file; a pipe
    # can't be read twice, so there it is one pass).
    late = deferred and zstd and _seekable(inp.f)
    at = inp.f.tell() if late else 0
    if zstd:
        stored = _chunks(inp, pages_length, hasher, verify_pages and not late,
                         None if late else inflate_to)
    elif hasher is not None:
        stored = inp.hash(pages_length, hasher, "page data")
    else:
        stored = inp.skip(pages_length, "page data")
    digest = hasher.digest() if hasher is not None else None
    trailer = inp.exact(fmt.TRAILER_SIZE, "trailer")
    t_magic, t_total, t_digest = fmt.TRAILER.unpack(trailer)
    total = offset + stored + fmt.TRAILER_SIZE
    if t_magic != fmt.TRAILER_MAGIC:
        raise fmt.Malformed("bad trailer magic")
    if t_total != total:
        raise fmt.Malformed(f"trailer says the image is {t_total} bytes, it is {total}")
    if verify_pages and t_digest != digest:
        raise fmt.Malformed("page data checksum mismatch")
    signatures = _read_signatures(inp, total)
    if deferred:
        authenticate(trailer, signatures)
        decoded = decode()
        if late:
            inp.f.seek(at)
            _chunks(inp, pages_length, None, True, inflate_to)
    process, threads, files, vmas, fds, _ = decoded
    return Image(header=Header(h.major, h.minor, fmt.MACHINES[h.machine], h.page_size,
                               h.flags),
                 process=process, threads=threads, files=files, vmas=vmas, fds=fds,
                 pages_offset=offset, pages_length=pages_length,
                 extra={"trailer": trailer, "signatures": signatures,
                        "stored_length": stored})


def _chunks(inp: _Input, pages_length: int, hasher, inflate: bool, inflate_to) -> int:
    """Compressed page data (format 1.1): chunks until their data_length
    adds up to pages_length, each hashed as stored (with a hasher) and/or
    decompressed (inflate; into inflate_to, if given), else skipped.
    Returns the stored length."""
    import zstandard            # only images that need it pay for the import
    dctx = zstandard.ZstdDecompressor(max_window_size=2 * fmt.MAX_CHUNK_DATA)
    left, stored, n = pages_length, 0, 0
    while left:
        head = inp.exact(fmt.CHUNK_HEAD.size, f"page data chunk {n}")
        slen, dlen = fmt.CHUNK_HEAD.unpack(head)
        if not 1 <= dlen <= min(left, fmt.MAX_CHUNK_DATA):
            raise fmt.Malformed(f"page data chunk {n}: data_length {dlen} is not in "
                                f"1..{min(left, fmt.MAX_CHUNK_DATA)}")
        if not 1 <= slen <= fmt.max_chunk_stored(dlen):
            raise fmt.Malformed(f"page data chunk {n}: stored_length {slen} is not in "
                                f"1..{fmt.max_chunk_stored(dlen)}")
        if hasher is None and not inflate:
            inp.skip(slen, f"page data chunk {n}")
        else:
            frame = inp.exact(slen, f"page data chunk {n}")
            if hasher is not None:
                hasher.update(head)
                hasher.update(frame)
            if inflate:
                data = _inflate(dctx, frame, dlen, n)
                if inflate_to is not None:
                    try:
                        inflate_to.write(data)
                    except OSError as e:
                        raise _SinkFailed(e.strerror or e) from None
        stored += fmt.CHUNK_HEAD.size + slen
        left -= dlen
        n += 1
    return stored


def _inflate(dctx, frame: bytes, dlen: int, n: int) -> bytes:
    """The one zstd frame `frame`, which must declare and hold exactly dlen
    bytes (so memory stays bounded whatever it claims) and nothing after."""
    import zstandard
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise fmt.Malformed(f"page data chunk {n}: not a zstd frame ({e})") from None
    if size != dlen:
        raise fmt.Malformed(f"page data chunk {n}: the zstd frame declares "
                            f"{'no' if size < 0 else size} content size, not {dlen}")
    obj = dctx.decompressobj()
    try:
        data = obj.decompress(frame)
    except zstandard.ZstdError as e:
        raise fmt.Malformed(f"page data chunk {n}: {e}") from None
    if not obj.eof or obj.unused_data or len(data) != dlen:
        raise fmt.Malformed(f"page data chunk {n}: the zstd frame is incomplete or has "
                            "bytes after it")
    return data


def _read_signatures(inp: _Input, total: int) -> tuple:
    """The signature blocks after the trailer, up to the end of the stream.
    Blocks of an unknown version or algorithm are kept (they verify nothing);
    a known one must have its exact size."""
    blocks = []
    at = total
    while True:
        head = inp.read_upto(fmt.SIG_HEADER_SIZE)
        if not head:
            return tuple(blocks)
        if len(head) < fmt.SIG_HEADER_SIZE or not head.startswith(fmt.SIG_MAGIC):
            what = "data" if not blocks else f"data after signature block {len(blocks) - 1}"
            raise fmt.Malformed(f"{what} after the trailer (image ends at byte {total}) "
                                "is not a signature block")
        _, version, algorithm, length = fmt.SIG_HEADER.unpack(head)
        n = len(blocks)
        if n == fmt.MAX_SIGNATURES:
            raise fmt.Malformed(f"more than {fmt.MAX_SIGNATURES} signature blocks")
        if length > fmt.MAX_SIG_BODY:
            raise fmt.Malformed(f"signature block {n}: body of {length} bytes exceeds "
                                f"the limit of {fmt.MAX_SIG_BODY}")
        body = inp.exact(length, f"signature block {n}")
        if (version, algorithm) == (fmt.SIG_VERSION, fmt.SIG_ED25519) and \
                length != fmt.ED25519_BODY:
            raise fmt.Malformed(f"signature block {n}: ed25519 body of {length} bytes, "
                                f"expected {fmt.ED25519_BODY}")
        blocks.append(fmt.SigBlock(version, algorithm, body, at))
        at += fmt.SIG_HEADER_SIZE + length


def decode_records(blob: bytes):
    """Decode and check the records section.

    Returns (process, threads, files, vmas, fds, pages_length) with every
    PageRun.data_offset filled in; raises format.Malformed (or UnknownName).
    The writer runs this too, so what it writes is what this accepts.
    """
    unpacker = msgpack.Unpacker(raw=False, use_list=False, strict_map_key=True,
                                unicode_errors=fmt.STR_ERRORS,
                                object_pairs_hook=_map, **fmt.UNPACKER_LIMITS)
    unpacker.feed(blob)
    found = {t: [] for t in fmt.RECORDS}
    rank = 0
    items = iter(unpacker)
    end = 0                             # where the last whole record ended
    for n in range(len(blob) + 1):      # every record takes at least one byte
        try:
            rec = next(items)
        except StopIteration:
            break
        except fmt.Malformed as e:          # from _map
            raise fmt.Malformed(f"record {n}: {e}") from None
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise fmt.Malformed(f"record {n}: bad msgpack ({e})") from None
        end = unpacker.tell()
        if type(rec) is not dict or type(rec.get("type")) is not str:
            raise fmt.Malformed(f"record {n}: not a map with a string 'type'")
        kind = rec["type"]
        schema = fmt.RECORDS.get(kind)
        if schema is None:
            if kind.startswith(fmt.EXTENSION_PREFIX):
                continue
            raise fmt.UnknownName(f"record {n}: unknown record type {kind!r}")
        if _RANK[kind] < rank:
            raise fmt.Malformed(f"record {n}: {kind} record after "
                                f"{list(fmt.RECORDS)[rank]} records")
        rank = _RANK[kind]
        of_kind = found[kind]
        if len(of_kind) == _LIMITS[kind]:
            raise fmt.Malformed(f"more than {_LIMITS[kind]} {kind} record(s)")
        try:
            of_kind.append(schema.load(rec))
        except fmt.Malformed as e:
            raise e.at(kind if _LIMITS[kind] == 1 else f"{kind} {len(of_kind)}") from None
    if end != len(blob):
        raise fmt.Malformed(f"records section ends inside record {n} "
                            f"(at byte {end} of {len(blob)})")
    if not found["process"]:
        raise fmt.Malformed("no process record")
    process = found["process"][0]
    threads, files, vmas, fds = (tuple(found[t]) for t in ("thread", "file", "vma", "fd"))
    pages_length = check_image(process, threads, files, vmas, fds)
    return process, threads, files, vmas, fds, pages_length


def check_image(process, threads, files, vmas, fds) -> int:
    """Rules that span records. Fills in data_offset; returns the page-data length."""
    if not threads:
        raise fmt.Malformed("no thread records")
    if threads[0].tid != process.pid:
        raise fmt.Malformed(f"thread 0 has tid {threads[0].tid}, not the process's "
                            f"pid {process.pid}")
    _unique(threads, "tid", "thread")
    file_ids = _unique(files, "id", "file")
    offset = 0
    prev = None
    for i, vma in enumerate(vmas):
        if prev is not None and vma.start < prev.end:
            raise fmt.Malformed(f"vma {i} overlaps vma {i - 1}" if vma.start >= prev.start
                                else f"vma {i} starts below vma {i - 1} (vmas must be sorted)")
        if vma.file is not None and vma.file not in file_ids:
            raise fmt.Malformed(f"vma {i}: file id {vma.file} is not in the file table")
        for run in vma.runs:
            # Runs are objects decode_records just built; nobody else holds them.
            object.__setattr__(run, "data_offset", offset)
            offset += run.count * fmt.PAGE_SIZE
        prev = vma
    _unique(fds, "fd", "fd")
    for i, fd in enumerate(fds):
        if fd.file not in file_ids:
            raise fmt.Malformed(f"fd {i} (fd {fd.fd}): file id {fd.file} is not in "
                                f"the file table")
    return offset


def _unique(items, attr: str, kind: str) -> dict:
    seen = {}
    for i, item in enumerate(items):
        key = getattr(item, attr)
        if key in seen:
            raise fmt.Malformed(f"{kind} {i}: {attr} {key} repeats {kind} {seen[key]}")
        seen[key] = i
    return seen


def _map(pairs):
    """msgpack map -> dict, refusing duplicate keys (a dict would keep the last)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        raise fmt.Malformed("map with a duplicate key")
    return d


class _Input:
    """Sequential reads from a binary file object, short reads tolerated."""

    def __init__(self, f):
        self.f = f

    def read_upto(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            chunk = self.f.read(n - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def exact(self, n: int, what: str) -> bytes:
        data = self.read_upto(n)
        if len(data) != n:
            raise fmt.Malformed(f"truncated in {what} ({len(data)} of {n} bytes)")
        return data

    def hash(self, n: int, hasher, what: str) -> int:
        buf = memoryview(bytearray(min(CHUNK, n)))
        left = n
        while left:
            got = self.f.readinto(buf[:min(CHUNK, left)])
            if not got:
                raise fmt.Malformed(f"truncated in {what} ({n - left} of {n} bytes)")
            hasher.update(buf[:got])
            left -= got
        return n

    def skip(self, n: int, what: str) -> int:
        if n and _seekable(self.f):
            # Seek to the last byte and read it: a probe for truncation.
            self.f.seek(n - 1, os.SEEK_CUR)
            if not self.f.read(1):
                raise fmt.Malformed(f"truncated in {what}")
            return n
        left = n
        while left:
            got = len(self.f.read(min(CHUNK, left)) or b"")
            if not got:
                raise fmt.Malformed(f"truncated in {what} ({n - left} of {n} bytes)")
            left -= got
        return n


def _seekable(f) -> bool:
    try:
        return f.seekable()
    except (AttributeError, OSError, ValueError):
        return False
