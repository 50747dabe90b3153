"""Image format v1: constants, header and trailer layout, limits, record schema.

The one place that says what the bytes are. The writer encodes with the
schema below and the reader decodes with the same schema, so the two cannot
drift. docs/image-format.md is the prose form of this module; keep them in
step.
"""
from __future__ import annotations

import struct
from collections import namedtuple

import blake3

from .model import (ADVICE, FD_FLAGS, FILE_KINDS, GENERAL_REGS, SPECIAL_NAMES,
                    TIMER_NOTIFY, VMA_KINDS, Creds, Fd, File, GeneralRegs, Header,
                    MMFields, PageRun, PosixTimer, Process, Rlimit, SigAction,
                    Thread, Vma)
from .record import fields

# --- header and trailer -------------------------------------------------------

MAGIC = b"\x89CKPT\r\n\x1a"          # offset 0; binfmt_misc matches it
VERSION_MAJOR = 1
VERSION_MINOR = 1                     # the newest this ckpt reads and writes
MACHINE = 62                          # ELF e_machine of x86_64
MACHINES = {MACHINE: "x86_64"}        # e_machine -> Header.arch
PAGE_SIZE = 4096
FLAG_ZSTD = 0x1                       # 1.1: page data stored as zstd chunks
KNOWN_FLAGS = FLAG_ZSTD

# What the dumper builds; write_image sets the minor version and flags it
# actually uses (1.0 without compression, 1.1 with).
CURRENT_HEADER = Header(VERSION_MAJOR, 0, "x86_64", PAGE_SIZE, 0)

# magic, major, minor, machine, reserved, page_size, flags, records_length,
# pages_length, checksum. All little-endian; the checksum is last, so it is
# simply the hash of everything before it plus the records.
HEADER = struct.Struct("<8sHHHHIIQQ32s")
HEADER_SIZE = HEADER.size                     # 72
CHECKSUM_OFFSET = HEADER_SIZE - 32            # 40
HeaderFields = namedtuple("HeaderFields", "magic major minor machine reserved "
                          "page_size flags records_length pages_length checksum")

TRAILER_MAGIC = b"CKPT-END"
TRAILER = struct.Struct("<8sQ32s")            # magic, total_length, image checksum
TRAILER_SIZE = TRAILER.size                   # 48

# Signature blocks (section 7a of docs/image-format.md): zero or more follow
# the trailer. Each signs the trailer, whose image checksum is a digest of
# every byte before it, so adding or removing one never changes the image.
SIG_MAGIC = b"CKPT-SIG"
SIG_HEADER = struct.Struct("<8sHHI")          # magic, block version, algorithm, body length
SIG_HEADER_SIZE = SIG_HEADER.size             # 16
SIG_VERSION = 1                               # block layout this reader knows
SIG_ED25519 = 1                               # algorithm: body = public key (32) || signature (64)
ED25519_BODY = 96
MAX_SIG_BODY = 4096
MAX_SIGNATURES = 16
SIG_CONTEXT = b"ckpt image signature\0"       # domain separation for the signed message
SigBlock = namedtuple("SigBlock", "version algorithm body offset")


def signed_message(trailer: bytes, version: int = SIG_VERSION,
                   algorithm: int = SIG_ED25519) -> bytes:
    """What a signature block of (version, algorithm) signs: a context
    string, the block's version and algorithm, and the 48-byte trailer."""
    return SIG_CONTEXT + struct.pack("<HH", version, algorithm) + bytes(trailer)


def signature_block(body: bytes, version: int = SIG_VERSION,
                    algorithm: int = SIG_ED25519) -> bytes:
    return SIG_HEADER.pack(SIG_MAGIC, version, algorithm, len(body)) + bytes(body)


def header_bytes(records: bytes, pages_length: int, *, major=VERSION_MAJOR,
                 minor=0, machine=MACHINE, page_size=PAGE_SIZE, flags=0,
                 reserved=0) -> bytes:
    """The 72-byte header for `records`, checksum filled in."""
    head = HEADER.pack(MAGIC, major, minor, machine, reserved, page_size, flags,
                       len(records), pages_length, bytes(32))[:CHECKSUM_OFFSET]
    return head + header_checksum(head, records)


def header_checksum(head: bytes, records: bytes) -> bytes:
    """BLAKE3-256 of header bytes 0..39 followed by the records section."""
    h = blake3.blake3(head[:CHECKSUM_OFFSET])
    h.update(records)
    return h.digest()


def pages_offset(records_length: int, page_size: int = PAGE_SIZE) -> int:
    """Page data starts at the first page boundary after the records."""
    end = HEADER_SIZE + records_length
    return -(-end // page_size) * page_size


def image_hasher(header_sum: bytes):
    """The trailer checksum: BLAKE3-256 of the header checksum, then page data.
    Chaining through the header checksum makes it a digest of the whole image
    (what a signature would sign). Single-threaded on purpose: blake3's
    thread pool outlives the hash, and the restore launcher must stay a
    single-threaded process until it hands over to the stub."""
    return blake3.blake3(header_sum)


# --- compressed page data (1.1, FLAG_ZSTD) --------------------------------------
# Page data as a sequence of chunks, each CHUNK_HEAD (stored_length,
# data_length) then one zstd frame (RFC 8878) of stored_length bytes that
# decompresses to exactly data_length bytes. Independent, bounded chunks: a
# reader needs at most MAX_CHUNK_DATA of memory whatever the frame claims,
# and finds the trailer without decompressing.

CHUNK_HEAD = struct.Struct("<II")             # stored_length, data_length
MAX_CHUNK_DATA = 4 << 20                      # data_length: 1 .. 4 MiB


def max_chunk_stored(data_length: int) -> int:
    """The largest frame a chunk of data_length bytes may be stored as:
    ZSTD_compressBound(data_length), which every encoder stays within."""
    return data_length + (data_length >> 8) + (
        ((128 << 10) - data_length) >> 11 if data_length < (128 << 10) else 0)


def zstd_level(spec: str) -> int:
    """ "zstd" or "zstd:N" (N from -7 to 19) -> the level; ValueError else."""
    name, _, level = spec.partition(":")
    if name != "zstd":
        raise ValueError(f"unknown compression {name!r} (only zstd)")
    n = int(level) if level else 3
    if not -7 <= n <= 19:
        raise ValueError(f"zstd level {n} is outside -7..19")
    return n


# --- limits (a hostile image must not make the reader allocate without bound) --

MAX_RECORDS_LENGTH = 64 << 20
MAX_THREADS = 65536
MAX_FDS = 65536
MAX_FILES = 1 << 20
MAX_VMAS = 1_000_000
MAX_ARRAY = 1 << 20           # largest msgpack array: runs of a VMA, cmdline
MAX_GROUPS = 65536            # NGROUPS_MAX
MAX_AUXV = 256                # auxv pairs
MAX_MAP = 256                 # fields per map, extensions included
MAX_PATH = 4096               # bytes, like PATH_MAX
MAX_COMM = 64                 # bytes; the kernel keeps 15
MAX_ARG = 128 << 10           # bytes per cmdline argument (MAX_ARG_STRLEN)
MAX_XSTATE = 64 << 10
MIN_XSTATE = 576              # legacy FXSAVE area + XSAVE header
SIGINFO_SIZE = 128
MAX_PENDING = 65536           # queued siginfos per thread or process
MAX_TIMERS = 65536            # timer_create timers
MAX_ID = 64                   # build-id, vdso hash: bytes
PID_MAX = 1 << 22             # PID_MAX_LIMIT on 64-bit
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I64_MAX = 2**63 - 1

# Largest single msgpack item of each kind; arrays and maps are preallocated
# by msgpack from their header, so these bound what one header can claim.
UNPACKER_LIMITS = dict(max_buffer_size=MAX_RECORDS_LENGTH, max_str_len=MAX_ARG,
                       max_bin_len=MAX_XSTATE, max_array_len=MAX_ARRAY,
                       max_map_len=MAX_MAP, max_ext_len=0)
# Strings are the system's bytes; non-UTF-8 paths round-trip as surrogates.
STR_ERRORS = "surrogateescape"

RLIMIT_NAMES = ("cpu", "fsize", "data", "stack", "core", "rss", "nproc",
                "nofile", "memlock", "as", "locks", "sigpending", "msgqueue",
                "nice", "rtprio", "rttime")        # RLIMIT_* order
PROTS = tuple(r + w + x for r in "r-" for w in "w-" for x in "x-")
ACCESS = ("r", "w", "rw")
EXTENSION_PREFIX = "x-"       # unknown names with it are skipped, others refused


# --- schema -------------------------------------------------------------------
# Each type has load(msgpack value) -> model value, raising Malformed, and
# dump(model value) -> msgpack value. Loads run once per field of every
# record, so they are closures with a fast path; where a bad value sits is
# worked out only once something is wrong.

class Malformed(ValueError):
    """A value the schema refuses: a corrupt image (reader) or a bug (writer).
    `path` says where: ("vma 2", "runs", "[0]", "[1]")."""

    def __init__(self, detail: str, path: tuple = ()):
        super().__init__(detail)
        self.detail, self.path = detail, path

    def at(self, where: str) -> Malformed:
        return type(self)(self.detail, (where,) + self.path)

    def __str__(self) -> str:
        out = ""
        for p in self.path:
            out += p if p.startswith("[") or not out else ": " + p
        return f"{out}: {self.detail}" if out else self.detail


class UnknownName(Malformed):
    """An unknown record type, field name, enum value or header flag: corrupt,
    unless the image is of a newer minor version than this reader."""


_KINDS = {bool: "bool", int: "int", str: "str", bytes: "bin", tuple: "array",
          list: "array", dict: "map", type(None): "nil", float: "float"}


def _wrong_type(v, expected: str) -> Malformed:
    return Malformed(f"expected {expected}, got {_KINDS.get(type(v), type(v).__name__)}")


def _locate(pairs):
    """Re-run a failed array load item by item to say which item failed."""
    for i, (one, v) in enumerate(pairs):
        try:
            one(v)
        except Malformed as e:
            raise e.at(f"[{i}]") from None


def _identity(x):
    return x


class Int:
    def __init__(self, lo, hi, exclude=()):
        def load(v):
            if type(v) is int and lo <= v <= hi and v not in exclude:
                return v
            raise _wrong_type(v, "int") if type(v) is not int else Malformed(f"{v} out of range")
        self.load, self.dump = load, _identity


U32, U64 = Int(0, U32_MAX), Int(0, U64_MAX)
I64 = Int(-I64_MAX - 1, I64_MAX)


class Bool:
    def __init__(self):
        def load(v):
            if type(v) is bool:
                return v
            raise _wrong_type(v, "bool")
        self.load, self.dump = load, _identity


class Str:
    """A string of lo..hi bytes (as stored: UTF-8 or the system's raw bytes)."""
    def __init__(self, hi, lo=0):
        def load(v):
            if type(v) is not str:
                raise _wrong_type(v, "str")
            n = len(v) if v.isascii() else len(v.encode("utf-8", STR_ERRORS))
            if lo <= n <= hi:
                return v
            raise Malformed(f"string of {n} bytes, allowed {lo}..{hi}")
        self.load, self.dump = load, _identity


class Enum:
    def __init__(self, names):
        names = frozenset(names)

        def load(v):
            if type(v) is str and v in names:
                return v
            raise _wrong_type(v, "str") if type(v) is not str else \
                UnknownName(f"unknown value {v!r}")
        self.load, self.dump = load, _identity


class Bin:
    def __init__(self, lo, hi):
        def load(v):
            if type(v) is bytes and lo <= len(v) <= hi:
                return v
            if type(v) is not bytes:
                raise _wrong_type(v, "bin")
            raise Malformed(f"{len(v)} bytes, expected {lo if lo == hi else f'{lo}..{hi}'}")
        self.load, self.dump = load, bytes


class Opt:
    def __init__(self, inner):
        self.load = lambda v: None if v is None else inner.load(v)
        self.dump = lambda x: None if x is None else inner.dump(x)


class Tup:
    """A fixed-length array; with `cls`, of that record's leading fields."""
    def __init__(self, *items, cls=None):
        loads, n = [t.load for t in items], len(items)
        names = list(fields(cls))[:n] if cls else None
        build = (lambda vals: cls(*vals)) if cls else tuple

        def load(v):
            if type(v) is not tuple:
                raise _wrong_type(v, "array")
            if len(v) != n:
                raise Malformed(f"{len(v)} items, expected {n}")
            try:
                return build([one(e) for one, e in zip(loads, v)])
            except Malformed:
                _locate(zip(loads, v))
                raise

        def dump(x):
            vals = [getattr(x, a) for a in names] if names else x
            if len(vals) != n:
                raise ValueError(f"{len(vals)} items, expected {n}")
            return [t.dump(e) for t, e in zip(items, vals)]
        self.load, self.dump = load, dump


class Arr:
    """A variable-length array of at most `hi` items; `key` makes items unique."""
    def __init__(self, item, hi, key=None):
        one = item.load

        def load(v):
            if type(v) is not tuple:
                raise _wrong_type(v, "array")
            if len(v) > hi:
                raise Malformed(f"{len(v)} items, at most {hi} allowed")
            try:
                out = tuple(map(one, v))
            except Malformed:
                _locate((one, e) for e in v)
                raise
            if key and len(set(map(key, out))) != len(out):
                raise Malformed("duplicate items")
            return out

        self.load = load
        self.dump = (lambda x: list(x)) if item.dump is _identity else \
            (lambda x: [item.dump(e) for e in x])


class Runs:
    """A VMA's page runs, [[addr, count], ...]: the one array that can hold
    a million items, so it has its own tight loop (the generic Arr of Tup
    costs ~3 us per run); on any defect the generic loader says where."""
    def __init__(self, hi):
        slow = Arr(Tup(U64, Int(1, U64_MAX // PAGE_SIZE), cls=PageRun), hi)
        max_count = U64_MAX // PAGE_SIZE

        def load(v):
            if type(v) is tuple and len(v) <= hi:
                out = []
                add = out.append
                for e in v:
                    if type(e) is tuple and len(e) == 2:
                        a, c = e
                        if type(a) is int and type(c) is int and 0 <= a <= U64_MAX \
                                and 1 <= c <= max_count:
                            add(PageRun(a, c))
                            continue
                    break
                else:
                    return tuple(out)
            return slow.load(v)         # raises Malformed with the item's place
        self.load, self.dump = load, slow.dump


class Struct:
    """A map of named fields, built into record `cls`. Every field is
    required; unknown names starting with "x-" are skipped; `check(obj)`
    returns a complaint about the whole value, or None. A record's schema has
    a `tag`, the value of its "type" key."""
    def __init__(self, cls, fields, check=None, tag=None):
        self.cls, self.fields, self.tag = cls, fields, tag
        loads = [(name, t.load) for name, t in fields.items()]
        dumps = [(name, None if t.dump is _identity else t.dump)
                 for name, t in fields.items()]
        size = len(fields) + (tag is not None)

        def load(v):
            if type(v) is not dict:
                raise _wrong_type(v, "map")
            if len(v) != size:          # extensions, unknown or missing names
                self._check_names(v)
            values = {}
            name = None
            try:
                for name, one in loads:
                    values[name] = one(v[name])
            except KeyError:
                raise Malformed(f"missing field {name!r}") from None
            except Malformed as e:
                raise e.at(name) from None
            obj = cls(**values)
            complaint = check(obj) if check else None
            if complaint:
                raise Malformed(complaint)
            return obj

        def dump(x):
            out = {"type": tag} if tag else {}
            for name, d in dumps:
                out[name] = getattr(x, name) if d is None else d(getattr(x, name))
            return out
        self.load, self.dump = load, dump

    def _check_names(self, v):
        for k in v:
            if k in self.fields or (k == "type" and self.tag):
                continue
            if type(k) is not str:
                raise Malformed(f"field name {k!r} is not a string")
            if not k.startswith(EXTENSION_PREFIX):
                raise UnknownName(f"unknown field {k!r}")


def _named(cls, t):
    return dict.fromkeys(fields(cls), t)


# --- per-record rules (cross-record rules live in reader.check_image) ----------

def _check_process(p: Process):
    for r in p.rlimits:
        if r.soft > r.hard:
            return f"rlimit {r.name}: soft limit {r.soft} above hard limit {r.hard}"
    return None


def _check_mm(mm: MMFields):
    for lo, hi in (("start_code", "end_code"), ("start_data", "end_data"),
                   ("start_brk", "brk"), ("arg_start", "arg_end"),
                   ("env_start", "env_end")):
        if getattr(mm, lo) > getattr(mm, hi):
            return f"{lo} above {hi}"
    return None


def _check_vma(v: Vma):
    page = PAGE_SIZE
    if v.start % page or v.end % page or v.offset % page:
        return "start, end and offset must be page-aligned"
    if v.start >= v.end:
        return f"empty or inverted range {v.start:#x}-{v.end:#x}"
    if (v.kind == "file") != (v.file is not None):
        return f"kind {v.kind!r} with file {v.file}"
    if v.kind != "file" and v.offset:
        return f"kind {v.kind!r} with a file offset"
    if v.kind == "special":
        if v.name not in SPECIAL_NAMES:
            return f"special vma named {v.name!r}"
        if v.runs:
            return "saved pages on a special vma"
    prev_end = v.start
    for i, r in enumerate(v.runs):
        if r.addr % page:
            return f"run {i}: address {r.addr:#x} not page-aligned"
        if r.addr < prev_end:
            return (f"run {i} overlaps or precedes run {i - 1}" if i
                    else f"run {i} starts below the vma")
        prev_end = r.addr + r.count * page
        if prev_end > v.end:
            return f"run {i} ends beyond the vma"
    return None


# --- records -------------------------------------------------------------------

PATH = Str(MAX_PATH)
SIGINFO = Bin(SIGINFO_SIZE, SIGINFO_SIZE)
SIGINFOS = Arr(SIGINFO, MAX_PENDING)
ID_HASH = Bin(0, MAX_ID)

CREDS = Struct(Creds, dict(
    uids=Tup(U32, U32, U32, U32), gids=Tup(U32, U32, U32, U32),
    groups=Arr(U32, MAX_GROUPS),
    cap_inh=U64, cap_prm=U64, cap_eff=U64, cap_bnd=U64, cap_amb=U64))

RLIMIT = Tup(Enum(RLIMIT_NAMES), U64, U64, cls=Rlimit)

SIGACTION = Struct(SigAction, dict(
    signo=Int(1, 64, exclude=(9, 19)),      # SIGKILL, SIGSTOP have no action
    handler=U64, flags=U64, restorer=U64, mask=U64))

TIMER = Struct(PosixTimer, dict(
    id=Int(0, 2**31 - 1), clock=Int(-2**31, 2**31 - 1), notify=Enum(TIMER_NOTIFY),
    signo=Int(0, 64), value=U64, tid=Int(0, PID_MAX), interval_ns=U64, value_ns=U64))

PROCESS = Struct(Process, dict(
    pid=Int(1, PID_MAX), comm=Str(MAX_COMM), exe=PATH,
    cmdline=Arr(Str(MAX_ARG), MAX_ARRAY), cwd=PATH, umask=Int(0, 0o777),
    personality=U32, creds=CREDS,
    rlimits=Arr(RLIMIT, len(RLIMIT_NAMES), key=lambda r: r.name),
    mm=Struct(MMFields, _named(MMFields, U64), check=_check_mm),
    auxv=Arr(Tup(Int(1, U64_MAX), U64), MAX_AUXV),
    sigactions=Arr(SIGACTION, 64, key=lambda s: s.signo),
    shared_pending=SIGINFOS, vdso_hash=ID_HASH,
    itimers=Arr(Tup(U64, U64), 3), timers=Arr(TIMER, MAX_TIMERS, key=lambda t: t.id),
    pdeathsig=Int(0, 64), dumpable=Int(0, 2), no_new_privs=Bool(),
    child_subreaper=Bool()),
    check=_check_process, tag="process")

THREAD = Struct(Thread, dict(
    tid=Int(1, PID_MAX), comm=Str(MAX_COMM),
    regs=Struct(GeneralRegs, {n: U64 for n in GENERAL_REGS}),
    xstate=Bin(MIN_XSTATE, MAX_XSTATE), sigmask=U64, pending=SIGINFOS,
    altstack=Tup(U64, U32, U64),            # ss_sp, ss_flags, ss_size
    tid_address=U64, robust_list=Tup(U64, U64),
    rseq=Opt(Tup(U64, U32, U32)),
    sched_policy=Int(0, 2**31 - 1), sched_priority=Int(0, 99), nice=Int(-20, 19)),
    tag="thread")

FILE = Struct(File, dict(
    id=U32, path=Str(MAX_PATH, lo=1), kind=Enum(FILE_KINDS), dev=U64, ino=U64,
    mode=U32, size=Int(0, I64_MAX), mtime_ns=I64, rdev=U64, build_id=ID_HASH),
    tag="file")

VMA = Struct(Vma, dict(
    start=U64, end=U64, prot=Enum(PROTS), shared=Bool(), kind=Enum(VMA_KINDS),
    name=PATH, file=Opt(U32), offset=U64, growsdown=Bool(),
    advice=Arr(Enum(ADVICE), len(ADVICE), key=str),
    runs=Runs(MAX_ARRAY)),
    check=_check_vma, tag="vma")

FD = Struct(Fd, dict(
    fd=Int(0, 2**31 - 1), file=U32, access=Enum(ACCESS),
    flags=Arr(Enum(FD_FLAGS), len(FD_FLAGS), key=str), pos=Int(0, I64_MAX)),
    tag="fd")

# Record types in the order they must appear: each type's records follow all
# records of the types before it (extension records may appear anywhere).
RECORDS = {"process": PROCESS, "thread": THREAD, "file": FILE, "vma": VMA,
           "fd": FD}
