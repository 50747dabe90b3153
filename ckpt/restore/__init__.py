"""Restore in place: this process becomes the saved one.

admin policy (before the image is opened) -> read the image (checksums;
signatures checked before any record is decoded) -> validate it -> check
this machine can host it -> credential policy -> open and check files as
the (possibly switched) caller -> build the plan -> launch the stub (point
of no return). Everything before launch() fails with one line and a
status; this module never imports the dumper, click, elftools or (for an
unsigned image no policy asks to be signed) cryptography: restore starts
fast. `ckpt verify` runs the same steps (ckpt.verify) without the last two.

Mapped restore (`mapped=True`: `ckpt restore --mapped`, CKPT_MAPPED=1): the
stub maps page data from the image file (MAP_PRIVATE) instead of copying
it, so restore time does not grow with the image. Only for an image file
nobody but its owner (you or root) can change (check_mappable), and the
page data is not hashed first unless the policy requires a signature: like
an mmap'd executable, it is trusted to the filesystem from then on.

Compressed images (format 1.1, `ckpt dump --compress zstd`): the page data
is decompressed while it is hashed into a memfd, from which the stub
preads it as from an uncompressed image; such an image can't be mapped.
"""
from __future__ import annotations

import ctypes
import os
import resource
import stat

TYPE_CHECKING = False           # importing typing costs restore's start-up ~4 ms
if TYPE_CHECKING:
    from typing import NoReturn

import blake3

from ..errors import CkptError, Status
from ..image import Image, read_image
from ..image.record import replace
from ..image import format as fmt
from ..image.validate import validate_image
from .creds import apply_policy, differences
from .files import open_files
from .policy import (Policy, check_caller, check_image_size, check_restore_creds,
                     load_policy, signature_rule)
from .planner import build_plan
from .stub import launch


def restore(path: str, *, as_caller: bool = False, restore_creds: bool = False,
            mapped: bool = False, ticket: bool = False) -> NoReturn:
    """ticket: write a restore ticket for the native launcher (the binfmt
    launcher asks for one; see ckpt.restore.ticket)."""
    tk = None
    if ticket:
        from . import ticket as tickets
        tk = tickets.begin(as_caller=as_caller, restore_creds=restore_creds, mapped=mapped)
    policy = load_policy()
    check_caller(policy)
    image_fd = open_image(path)
    if tk is not None:
        tk.image(image_fd)
        tk.check_policy(policy)
    if mapped:
        check_mappable(image_fd, path)
    pages_fd = _pages_memfd() if compressed(image_fd) else None
    if pages_fd is not None and tk is not None:
        tk.ok = False                   # the native launcher does not decompress
    # A signature covers the page data: when one is required, check it all.
    image = load_image(image_fd, path, policy,
                       verify_pages=not mapped or policy.require_signature,
                       inflate_to=pages_fd)
    check_host(image)
    if tk is not None and restore_creds and not as_caller and differences(image.process.creds):
        tk.ok = False                   # a credential switch: Python's job
    check_creds(image, policy, as_caller=as_caller, restore_creds=restore_creds)
    files = open_files(image)
    try:
        os.chdir(image.process.cwd)
    except OSError as e:
        raise CkptError(Status.FILE_CHANGED,
                        f"working directory {image.process.cwd}: {e.strerror.lower()}")
    moved: dict[int, int] = {}
    plan = build_plan(image, files, image_fd if pages_fd is None else pages_fd,
                      mapped=mapped, moved=moved)
    on_placed = None
    if tk is not None and tk.ok:
        def on_placed(start, total, plan_off, block, vdso_off):
            tk.write(plan=plan, image=image, files=files, moved=moved, start=start,
                     total=total, plan_off=plan_off, block=block, vdso_off=vdso_off,
                     nofile_need=nofile_need(image))
    launch(plan, avoid=[(v.start, v.end) for v in image.vmas], on_placed=on_placed)


def open_image(path: str) -> int:
    try:
        image_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CkptError(Status.USAGE, f"cannot open {path}: {e.strerror}")
    if not stat.S_ISREG(os.fstat(image_fd).st_mode):
        os.close(image_fd)
        raise CkptError(Status.USAGE, f"{path}: restore reads the image from a regular "
                        "file (page data is pread into place); save the stream to a file first")
    return image_fd


def compressed(image_fd: int) -> bool:
    """Whether the image's header says its page data is compressed (read
    before anything else of it; the reader checks the header again)."""
    head = os.pread(image_fd, fmt.HEADER_SIZE, 0)
    return (len(head) == fmt.HEADER_SIZE and head[:8] == fmt.MAGIC
            and fmt.HeaderFields._make(fmt.HEADER.unpack(head)).flags & fmt.FLAG_ZSTD != 0)


def _pages_memfd() -> int:
    try:
        return os.memfd_create("ckpt-pages", os.MFD_CLOEXEC)
    except OSError as e:
        raise CkptError(Status.NO_MEMORY, f"cannot create a memfd for the decompressed "
                        f"page data: {e.strerror}") from None


def check_mappable(image_fd: int, name: str) -> None:
    """Mapped restore makes the restored memory a private mapping of the
    image: a later write to the file shows in every page the process has
    not written itself. So map only a file no one else can change: owned
    by the caller (euid) or root, with no group or other write bit (an ACL
    granting write to anyone else shows as the group write bit). ckpt
    itself writes images by rename, never in place. And not from a noexec
    file system: the kernel would refuse PROT_EXEC on those mappings, then
    and whenever the program mprotect()s them later (a JIT)."""
    if compressed(image_fd):
        raise CkptError(Status.USAGE, f"{name}: a compressed image can't be mapped (its "
                        "page data must be decompressed); restore without --mapped, or "
                        "dump without --compress")
    st = os.fstat(image_fd)
    if st.st_uid not in (os.geteuid(), 0):
        raise CkptError(Status.USAGE, f"{name}: mapped restore needs an image owned by "
                        f"you or root (this one is uid {st.st_uid}'s, who could change it "
                        "under the restored process); copy it, or restore without --mapped")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CkptError(Status.USAGE, f"{name}: mapped restore needs an image only its "
                        f"owner can write (mode {stat.S_IMODE(st.st_mode):04o}); "
                        "chmod go-w it, or restore without --mapped")
    if os.fstatvfs(image_fd).f_flag & os.ST_NOEXEC:
        raise CkptError(Status.USAGE, f"{name}: mapped restore needs an image on a file "
                        "system mounted without noexec (the program could not make that "
                        "memory executable); move it, or restore without --mapped")


def load_image(image_fd: int, name: str, policy: Policy, *,
               signed_by: list | None = None, verify_pages: bool = True,
               inflate_to: int | None = None) -> Image:
    """Read, authenticate and validate the image open at image_fd.

    One open file for validation and for the stub's preads: what was
    checked is what gets restored, even if the path is replaced meanwhile.
    `signed_by`, if given, receives the keys whose signatures verified.
    verify_pages=False skips hashing the page data (mapped restore; the
    records are still checked, the trailer's length and magic too); then
    no signature is checked either, so a policy requiring one must not
    ask for it. `inflate_to`: an fd (a memfd) that receives a compressed
    image's page data, decompressed; the image returned then says its
    page data starts at offset 0 (of that fd).
    """
    if not verify_pages and policy.require_signature:
        raise CkptError(Status.INTERNAL, "a signature is required: page data must be "
                        "verified")
    check_image_size(policy, os.fstat(image_fd).st_size, name)
    if policy.require_signature and _unsigned(image_fd):
        raise CkptError(Status.SIGNATURE, f"{name}: the image is not signed, and "
                        + signature_rule(policy))

    def authenticate(trailer: bytes, blocks) -> None:
        if not blocks and not policy.require_signature:
            return                      # nothing to check: don't load cryptography
        from ..sign import check_signatures
        good = check_signatures(trailer, blocks, name=name, trusted=policy.trusted_keys,
                                required=policy.require_signature,
                                why=signature_rule(policy))
        if signed_by is not None:
            signed_by.extend(good)

    sink = None if inflate_to is None else os.fdopen(os.dup(inflate_to), "wb", buffering=0)
    try:
        with os.fdopen(os.dup(image_fd), "rb") as f:
            image = read_image(f, name=name, authenticate=authenticate,
                               verify_pages=verify_pages, inflate_to=sink)
    finally:
        if sink is not None:
            sink.close()
    if sink is not None:
        image = replace(image, pages_offset=0)
    validate_image(image, name=name)
    return image


def _unsigned(image_fd: int) -> bool:
    """True if the file ends right after the trailer (no signature block);
    read from the header alone, so a policy that requires signatures turns
    an unsigned image away before hashing it. False when unsure."""
    head = os.pread(image_fd, fmt.HEADER_SIZE, 0)
    if len(head) < fmt.HEADER_SIZE or head[:8] != fmt.MAGIC or \
            int.from_bytes(head[8:10], "little") != fmt.VERSION_MAJOR:
        return False
    h = fmt.HeaderFields._make(fmt.HEADER.unpack(head))
    if h.flags & fmt.FLAG_ZSTD:
        return False                    # the stored length is known only at the end
    return os.fstat(image_fd).st_size == (fmt.pages_offset(h.records_length)
                                          + h.pages_length + fmt.TRAILER_SIZE)


def check_creds(image: Image, policy: Policy, *, as_caller: bool,
                restore_creds: bool) -> None:
    if restore_creds and not as_caller and differences(image.process.creds):
        check_restore_creds(policy)
    apply_policy(image.process.creds, as_caller=as_caller, restore_creds=restore_creds)


def check_host(image: Image) -> None:
    """The saved program may be stopped inside the vdso and holds pointers
    into it: restore only onto the same vdso (the same kernel build). And
    this machine's limits must let the restorer map and install everything."""
    if image.process.vdso_hash and image.process.vdso_hash != _own_vdso_hash():
        raise CkptError(Status.UNSUPPORTED_STATE,
                        "the image was made on another kernel (its vdso differs "
                        f"from this one's, {os.uname().release})")
    max_maps = _sysctl("vm/max_map_count")
    if max_maps and len(image.vmas) + 16 > max_maps:
        raise CkptError(Status.UNSUPPORTED_STATE,
                        f"the image has {len(image.vmas)} memory mappings; this machine "
                        f"allows {max_maps} per process (sysctl vm.max_map_count)")
    # The launcher holds every file at fds above the image's highest one
    # until the stub installs them: make sure the open-file limit allows it.
    need = nofile_need(image)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if 0 <= soft < need:
        if 0 <= hard < need:
            raise CkptError(Status.UNSUPPORTED_STATE,
                            f"the image needs fd numbers up to {need}, above your "
                            f"open-file limit ({hard}; ulimit -n)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def nofile_need(image: Image) -> int:
    return max([2] + [d.fd for d in image.fds]) + len(image.fds) + len(image.files) + 64


def _sysctl(name: str) -> int:
    try:
        with open(f"/proc/sys/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _own_vdso_hash() -> bytes:
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[vdso]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                return blake3.blake3(ctypes.string_at(lo, hi - lo)).digest()
    return b""
