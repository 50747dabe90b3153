"""write_image: serialise an Image and its page data as one front-to-back stream.

No seek, no tell: the output may be a pipe. Header and records are small and
go out in one write; page chunks are passed straight through: fetched and
hashed in a second thread while the calling thread writes the previous ones.
That thread exists only during write_image, which only the dumper calls (the
restore launcher must stay single-threaded).
"""
from __future__ import annotations

import queue
import threading

import msgpack

from ..errors import CkptError, Status
from . import format as fmt
from .model import Image
from .reader import decode_records


def write_image(out, image: Image, pages, *, sign=None, zstd_level: int | None = None) -> int:
    """Write `image` to binary file object `out`; return the bytes written.

    `pages` is an iterable of bytes-like chunks (any chunking) whose
    concatenation is the saved pages, VMA by VMA in image order and run by run
    within each VMA. They are fetched and hashed in another thread, up to
    three chunks ahead of the write: a producer may reuse a ring of three
    buffers (chunk n is asked for once chunk n - 3 is written). data_offset, pages_offset, pages_length and extra are
    derived or ignored. A bad image or a wrong amount of page data is a bug in
    the caller: CkptError(INTERNAL). Write errors: CkptError(OUTPUT). After
    any error the stream has no trailer, so no reader will accept it.

    `sign`, if given, is called with the 48 trailer bytes and returns a
    signature block (ckpt.sign.Signer), written right after the trailer.

    `zstd_level`, if given, stores the page data compressed (format 1.1,
    FLAG_ZSTD): each chunk of `pages` becomes one zstd frame of that level,
    compressed in the fetching thread before it is hashed.

    Uncompressed, `pages` may instead move its data itself: an object with
    copy_into(fd, update, name) that writes the page data at the position
    of `out`'s fd, has update() see every byte in order before it returns,
    returns the bytes written and reports write errors as CkptError(OUTPUT)
    (ckpt.checkpoint.splice: zero-copy from the dumped process).
    """
    if image.header != fmt.CURRENT_HEADER:
        raise CkptError(Status.INTERNAL, f"cannot write an image with header "
                        f"{image.header}; this writer writes {fmt.CURRENT_HEADER}")
    records = encode_records(image)
    try:
        pages_length = decode_records(records)[-1]
    except fmt.Malformed as e:
        raise CkptError(Status.INTERNAL, f"refusing to write an invalid image: {e}") from None
    compressed = zstd_level is not None
    head = fmt.header_bytes(records, pages_length, minor=1 if compressed else 0,
                            flags=fmt.FLAG_ZSTD if compressed else 0)
    offset = fmt.pages_offset(len(records))
    padding = bytes(offset - len(head) - len(records))

    name = getattr(out, "name", None)
    sink = _Sink(out, name if isinstance(name, str) else "<stream>")
    sink.write(head + records + padding)
    hasher = fmt.image_hasher(head[fmt.CHECKSUM_OFFSET:])
    if hasattr(pages, "copy_into") and not compressed:
        out.flush()                 # the records before the page data, at the fd
        stored = total = pages.copy_into(out.fileno(), hasher.update, sink.name)
        sink.total += stored
    else:
        stored, total = _copy(sink, pages, pages_length, hasher, zstd_level)
    digest = hasher.digest()
    if total != pages_length:
        raise CkptError(Status.INTERNAL, f"page data is {total} bytes; "
                        f"the vmas' runs need {pages_length}")
    trailer = fmt.TRAILER.pack(fmt.TRAILER_MAGIC, offset + stored + fmt.TRAILER_SIZE,
                               digest)
    sink.write(trailer)
    if sign is not None:
        sink.write(sign(trailer))
    return sink.total


def _copy(sink: _Sink, pages, pages_length: int, hasher, zstd_level: int | None):
    """Write `pages` (compressed, with a level); (stored, page data) bytes."""
    counted = _Counted(pages, pages_length)
    fetcher = _Fetcher(counted if zstd_level is None else _compressed(counted, zstd_level),
                       hasher)
    stored = 0
    try:
        for view in fetcher:
            stored += view.nbytes
            sink.write(view)
    finally:
        fetcher.stop()
    return stored, counted.total


def encode_records(image: Image) -> bytes:
    """The records section: one msgpack map per record, in format order."""
    packer = msgpack.Packer(use_bin_type=True, unicode_errors=fmt.STR_ERRORS)
    groups = {"process": (image.process,), "thread": image.threads,
              "file": image.files, "vma": image.vmas, "fd": image.fds}
    parts = []
    for kind, schema in fmt.RECORDS.items():
        for i, value in enumerate(groups[kind]):
            try:
                parts.append(packer.pack(schema.dump(value)))
            except (AttributeError, TypeError, ValueError, OverflowError) as e:
                raise CkptError(Status.INTERNAL, f"cannot encode {kind} {i}: {e}") from None
    return b"".join(parts)


class _Counted:
    """`pages`, counted: refuses (INTERNAL) a byte past the promised length
    before it is compressed or written."""

    def __init__(self, pages, limit: int):
        self.pages, self.limit, self.total = pages, limit, 0

    def __iter__(self):
        try:
            for chunk in self.pages:
                n = memoryview(chunk).nbytes
                self.total += n
                if self.total > self.limit:
                    raise CkptError(Status.INTERNAL, f"page data is more than {self.limit} "
                                    "bytes, what the vmas' runs need")
                yield chunk
        finally:
            close = getattr(self.pages, "close", None)
            if close is not None:
                close()


def _compressed(pages, level: int):
    """Each chunk of `pages` as one stored chunk (format.CHUNK_HEAD + a zstd
    frame), split at format.MAX_CHUNK_DATA. The frame records its content
    size; a reader checks it against data_length."""
    import zstandard
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
    for chunk in pages:
        view = memoryview(chunk).cast("B")
        for at in range(0, view.nbytes, fmt.MAX_CHUNK_DATA):
            part = view[at:at + fmt.MAX_CHUNK_DATA]
            frame = cctx.compress(part)
            yield fmt.CHUNK_HEAD.pack(len(frame), part.nbytes) + frame


class _Sink:
    """Whole writes to `out`, even if it is unbuffered and writes short."""

    def __init__(self, out, name: str):
        self.out, self.name, self.total = out, name, 0

    def write(self, data) -> None:
        view = memoryview(data)
        try:
            while view.nbytes:
                n = self.out.write(view)
                if n is None:            # a non-blocking file that is full
                    raise BlockingIOError(11, "output would block")
                view = view[n:]
                self.total += n
        except OSError as e:
            raise CkptError(Status.OUTPUT, f"{self.name}: cannot write image: "
                            f"{e.strerror or e}") from None



class _Fetcher:
    """Iterates over `pages` and hashes each chunk in a second thread, up to
    DEPTH chunks ahead of the caller, who writes them: reading the target's
    memory and hashing it overlap with writing the image (ctypes calls,
    blake3 and write(2) all release the GIL).

    A chunk is handed over once hashed; the caller is done with it when it
    asks for the next one. The thread asks `pages` for chunk n only once
    chunk n - DEPTH has been handed back, so a producer may reuse a ring
    of DEPTH buffers."""

    DEPTH = 3
    _END = object()

    def __init__(self, pages, hasher):
        self.pages, self.hasher = iter(pages), hasher
        self.slots = threading.Semaphore(self.DEPTH)
        self.ready: queue.SimpleQueue = queue.SimpleQueue()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="ckpt-pages", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                self.slots.acquire()
                if self.stopped:
                    return
                chunk = next(self.pages, self._END)
                if chunk is self._END:
                    self.ready.put(self._END)
                    return
                view = memoryview(chunk).cast("B")
                self.hasher.update(view)
                self.ready.put(view)
        except BaseException as e:      # noqa: BLE001 -- raised again in the caller
            self.ready.put(e)
        finally:
            close = getattr(self.pages, "close", None)
            if close is not None:
                close()                 # a generator's cleanup, in this thread

    def __iter__(self):
        while True:
            item = self.ready.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            self.slots.release()

    def stop(self) -> None:
        """Let the thread go (after the end, an error, or a break) and wait for it."""
        self.stopped = True
        self.slots.release()
        self.thread.join()
