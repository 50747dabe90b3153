"""Restore in place: this process becomes the saved one.

validate (read_image) -> check this machine can host it -> credential
policy -> open and check files as the (possibly switched) caller -> build the
plan -> launch the stub (point of no return). Everything before launch() fails with one line and a status; this
module never imports the dumper, click or elftools (restore starts fast).
"""
from __future__ import annotations

import ctypes
import io
import os
import stat
from typing import NoReturn

import blake3

from ..errors import CkptError, Status
from ..image import Image, read_image
from .creds import apply_policy
from .files import open_files
from .planner import build_plan
from .stub import launch


def restore(path: str, *, as_caller: bool = False,
            restore_creds: bool = False) -> NoReturn:
    try:
        image_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CkptError(Status.USAGE, f"cannot open {path}: {e.strerror}")
    if not stat.S_ISREG(os.fstat(image_fd).st_mode):
        raise CkptError(Status.USAGE, f"{path}: restore reads the image from a regular "
                        "file (page data is pread into place); save the stream to a file first")
    # One open file for validation and for the stub's preads: what was
    # checked is what gets restored, even if the path is replaced meanwhile.
    raw = io.FileIO(os.dup(image_fd), "rb")
    raw.name = path                 # errors name the file, not "<stream>"
    with io.BufferedReader(raw) as f:
        image = read_image(f)
    check_host(image)
    apply_policy(image.process.creds, as_caller=as_caller, restore_creds=restore_creds)
    files = open_files(image)
    try:
        os.chdir(image.process.cwd)
    except OSError as e:
        raise CkptError(Status.FILE_CHANGED,
                        f"working directory {image.process.cwd}: {e.strerror.lower()}")
    plan = build_plan(image, files, image_fd)
    launch(plan, avoid=[(v.start, v.end) for v in image.vmas])


def check_host(image: Image) -> None:
    """The saved program may be stopped inside the vdso and holds pointers
    into it: restore only onto the same vdso (the same kernel build)."""
    if image.process.vdso_hash and image.process.vdso_hash != _own_vdso_hash():
        raise CkptError(Status.UNSUPPORTED_STATE,
                        "the image was made on another kernel (its vdso differs "
                        f"from this one's, {os.uname().release})")


def _own_vdso_hash() -> bytes:
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[vdso]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                return blake3.blake3(ctypes.string_at(lo, hi - lo)).digest()
    return b""
