"""Restore tickets: what the native launcher needs to repeat a restore.

The first `./app.ckpt` of an image goes through Python and every check
(policy, checksums, validation, credentials, files and their build-ids).
When all passed and the stub region is placed, this module writes a
*ticket* to the caller's own cache, $XDG_CACHE_HOME/ckpt/tickets/ or
~/.cache/ckpt/tickets/ (directories 0700, file 0600, owned by the caller;
when the cache is missing, not the caller's or unwritable: no ticket,
silently). The native launcher (restorer-stub/launcher.c, which binfmt_misc
runs) then repeats the restore without Python if nothing it depends on can
have changed: it recomputes the *key* and compares all of it, opens every
file again as the caller and compares its identity, and on any difference
runs this Python launcher instead (a miss), which decides as before.

key  (the file name is the FNV-1a 64 hash of it; the file repeats it)
     the stub's SOURCE_HASH (the native launcher embeds the same stub),
     /proc/sys/kernel/random/boot_id (same kernel, same vdso), the image's
     (st_dev, st_ino, st_size, st_mtime ns, st_ctime ns) (a non-root owner
     can't forge ctime), the policy file's identity or "absent", the
     options (CKPT_AS_CALLER, CKPT_RESTORE_CREDS, CKPT_MAPPED,
     CKPT_NEW_TIDS), the caller's uids, gids, effective capabilities, all
     16 rlimits (soft, hard), vm.max_map_count, vm.mmap_min_addr, groups.
body the stub region's place and size and the plan's offset in it, the
     vdso's offset in the [vvar]..[vdso] block and its length, the
     RLIMIT_NOFILE soft limit restore needs, the saved cwd, the files to
     open (plan fd number, open flags, seek offset, how to check, identity,
     path) and the encoded plan, which the native launcher patches
     (cur_rseq: none, vdso_cur: its own) and hands to its own copy of the
     stub.

No ticket when restore needs what the native launcher does not do: a
credential switch (--restore-creds with other ids), a policy naming
users, keys or signatures (their files are not in the key), CKPT_POLICY,
an image without a vdso. CKPT_NO_TICKETS=1 turns tickets off (neither
written nor used). Layout: restorer-stub/ticket.h, which must agree.
"""
from __future__ import annotations

import os
import resource
import stat
import struct

MAGIC = b"CKPTTIK1"
VERSION = 1
OPT_AS_CALLER, OPT_RESTORE_CREDS, OPT_MAPPED, OPT_NEW_TIDS = 1, 2, 4, 8
# how the native launcher checks a file (ticket.h TF_*)
TF_IDENTITY = 0     # regular, same dev, ino, size, mtime, ctime
TF_SIZE = 1         # regular, same size (a file mapped shared and writable)
TF_OPENS = 2        # opens (a held fd)
TF_MIN_SIZE = 3     # opens, size >= pos (a held regular file)
MAX_GROUPS = 64
MAX_TICKETS = 256   # pruned to half, oldest first, when a write finds more
U64 = 2**64 - 1
POLICY_PATH = "/etc/ckpt/policy.toml"
CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE = 21, 40


def disabled() -> bool:
    return os.environ.get("CKPT_NO_TICKETS", "") not in ("", "0")


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & U64
    return h


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(64)
    except OSError:
        return b""


def _sysctl(name: str) -> int:
    try:
        return int(_read("/proc/sys/" + name))
    except ValueError:
        return 0


def _ident(st) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _cap_eff() -> int:
    """The caller's effective capabilities (capget: reading
    /proc/self/status costs ~0.1 ms)."""
    import ctypes
    from .stub import _libc
    head = (ctypes.c_uint32 * 2)(0x20080522, 0)         # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()
    if _libc.capget(head, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    return data[0] | data[3] << 32


class Ticket:
    """Started before anything else of the restore (so every identity is the
    one seen before it was used), written once the stub region is placed."""

    def __init__(self, head: bytes, tail: bytes):
        self.head = head            # key up to the image's identity
        self.tail = tail            # the rest of the key
        self.key = b""
        self.image_fd = -1
        self.ok = True

    def image(self, image_fd: int) -> None:
        self.key = self.head + struct.pack("<5Q", *_ident(os.fstat(image_fd))) + self.tail

    def check_policy(self, policy) -> None:
        if (policy.require_signature or policy.trusted_keys
                or tuple(policy.allowed_users) != ("*",)):
            self.ok = False

    def write(self, *, plan, image, files, moved, start, total, plan_off, block,
              vdso_off, nofile_need) -> None:
        if not self.ok or not self.key or not plan.vdso_dst:
            return
        body = _body(plan, image, files, moved, start, total, plan_off, block, vdso_off,
                     nofile_need)
        if body is None:
            return
        key = self.key
        data = MAGIC + struct.pack("<3Q", VERSION, 32 + len(key) + len(body), len(key)) \
            + key + body
        d = cache_dir(create=True)
        if d is None:
            return
        name = f"{fnv1a64(key):016x}.tk"
        tmp = f"{d}/.{name}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, f"{d}/{name}")
        _prune(d)


def begin(*, as_caller: bool, restore_creds: bool, mapped: bool) -> Ticket | None:
    """The caller's side of the key, or None when tickets are off."""
    if disabled() or os.environ.get("CKPT_POLICY"):
        return None
    from ckpt.restore import _stub
    try:
        pst = os.stat(POLICY_PATH)
        policy = (1,) + _ident(pst)
    except FileNotFoundError:
        policy = (0, 0, 0, 0, 0, 0)
    except OSError:
        return None
    boot_id = _read("/proc/sys/kernel/random/boot_id").strip()
    if len(boot_id) != 36:
        return None
    opts = ((OPT_AS_CALLER if as_caller else 0) | (OPT_RESTORE_CREDS if restore_creds else 0)
            | (OPT_MAPPED if mapped else 0)
            | (OPT_NEW_TIDS if os.environ.get("CKPT_NEW_TIDS") == "1" else 0))
    groups = os.getgroups()
    if len(groups) > MAX_GROUPS:
        return None
    limits = []
    for res in range(16):
        soft, hard = resource.getrlimit(res)
        limits += [soft & U64, hard & U64]
    head = struct.pack("<64s40s", _stub.SOURCE_HASH.encode(), boot_id)
    tail = struct.pack("<6QQ6QQ32QQQQ", *policy, opts, *os.getresuid(), *os.getresgid(),
                       _cap_eff(), *limits, _sysctl("vm/max_map_count"),
                       _sysctl("vm/mmap_min_addr"), len(groups))
    tail += struct.pack(f"<{len(groups)}Q", *groups)
    return Ticket(head, tail)


def cache_dir(create: bool = False) -> str | None:
    """$XDG_CACHE_HOME/ckpt/tickets or ~/.cache/ckpt/tickets, if the base
    exists and is the caller's; with create, made (0700) as needed. None
    when unusable (then no ticket)."""
    euid = os.geteuid()
    base = os.environ.get("XDG_CACHE_HOME", "")
    if base.startswith("/"):
        owner = base
    else:
        home = os.environ.get("HOME", "")
        if not home.startswith("/"):
            return None
        owner, base = home, home.rstrip("/") + "/.cache"
    try:
        if os.stat(owner).st_uid != euid:
            return None
        d = base
        for part in ("", "/ckpt", "/tickets"):
            d += part
            try:
                st = os.lstat(d)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(d, 0o700)
                st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != euid:
                return None
        if stat.S_IMODE(st.st_mode) & 0o077:
            return None
    except OSError:
        return None
    return d


def _body(plan, image, files, moved, start, total, plan_off, block, vdso_off,
          nofile_need) -> bytes | None:
    from ckpt.restore import _stub
    back = {high: low for low, high in moved.items()}
    mapped = {fd: fid for fid, fd in files.mapped.items()}
    held = {fd: n for n, fd in files.held.items()}
    saved_fds = {d.fd: d for d in image.fds}
    writable = {v.file for v in image.vmas
                if v.kind == "file" and v.shared and "w" in v.prot}
    entries = []
    for high in sorted(back):
        if high == plan.image_fd:
            continue
        low = back[high]
        if low in mapped:
            f = image.file(mapped[low])
            how = TF_SIZE if f.id in writable and not f.build_id else TF_IDENTITY
            pos = 0
            ident = _ident(os.fstat(low))
        elif low in held:
            d = saved_fds[held[low]]
            f = image.file(d.file)
            path_flag = "path" in d.flags
            how = TF_MIN_SIZE if f.kind == "reg" and not path_flag else TF_OPENS
            pos = d.pos if d.pos and not path_flag else 0
            ident = (0, 0, 0, 0, 0)
        else:
            return None
        path = os.fsencode(f.path) + b"\0"
        path += b"\0" * (-len(path) % 8)
        entries.append(struct.pack("<10Q", high, files.flags[low], pos, how, *ident,
                                   len(path)) + path)
    block = bytearray(block)
    if plan.exe_fd < 0 and _cap_eff() & (1 << CAP_SYS_ADMIN | 1 << CAP_CHECKPOINT_RESTORE):
        # The Python launcher can't set the exe link when the image's exe
        # is its own (python: still mapped); the native launcher can.
        for f in image.files:
            if f.path == image.process.exe and f.id in files.mapped:
                exe = moved.get(files.mapped[f.id], -1)
                abi = _stub.PLAN_ABI["structs"]
                at = abi["plan_header"]["fields"]["mm"][0] + \
                    abi["plan_mm"]["fields"]["exe_fd"][0]
                block[at:at + 4] = struct.pack("<i", exe)
                break
    cwd = os.fsencode(image.process.cwd) + b"\0"
    cwd += b"\0" * (-len(cwd) % 8)
    block += b"\0" * (-len(block) % 8)
    return (struct.pack("<9Q", start, total, plan_off, len(block), plan.vdso_len, vdso_off,
                        nofile_need, len(cwd), len(entries))
            + cwd + b"".join(entries) + bytes(block))


def _prune(d: str) -> None:
    names = os.listdir(d)
    if len(names) <= MAX_TICKETS:
        return
    aged = []
    for n in names:
        try:
            aged.append((os.lstat(f"{d}/{n}").st_mtime_ns, n))
        except OSError:
            pass
    for _, n in sorted(aged)[:len(aged) - MAX_TICKETS // 2]:
        try:
            os.unlink(f"{d}/{n}")
        except OSError:
            pass
