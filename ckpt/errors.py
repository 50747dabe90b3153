"""One error type and one table of exit statuses for every ckpt command.

Each failure a user can meet prints exactly one line (`ckpt: ...`) and exits
with one of these statuses. The table is documented in README.md and
`ckpt --help`; keep them in step.
"""
from __future__ import annotations

import enum
import os
import sys

TYPE_CHECKING = False           # importing typing costs restore's start-up ~4 ms
if TYPE_CHECKING:
    from typing import NoReturn


class Status(enum.IntEnum):
    OK = 0
    USAGE = 2                 # bad command line (click's own status)
    NOT_AN_IMAGE = 10         # no ckpt magic at offset 0
    UNSUPPORTED_IMAGE = 11    # other format version, arch or page size
    CORRUPT_IMAGE = 12        # truncated, bad checksum, malformed records
    SIGNATURE = 13            # signature missing or bad (policy)
    POLICY = 14               # refused by the administrator's policy
    CREDENTIALS = 15          # recorded credentials differ from the caller's
    FILE_CHANGED = 16         # a file the image needs is missing/changed/unreadable
    NO_MEMORY = 17            # no room for the restorer or not enough memory
    UNSUPPORTED_STATE = 18    # restore: this machine can't host it (other kernel, ...)
    NO_PROCESS = 20           # dump: no such process
    PTRACE_DENIED = 21        # dump: the caller may not ptrace the target
    UNSUPPORTED_TARGET = 22   # dump: state ckpt does not save (a socket, a thread, ...)
    TARGET_GONE = 23          # dump: target exited or was killed during the dump
    OUTPUT = 24               # dump: can't write the image
    BINFMT = 25               # binfmt: can't change the registration
    INTERNAL = 70             # a bug in ckpt (EX_SOFTWARE)
    AFTER_NO_RETURN = 99      # restorer stub failed after the launcher was gone


DESCRIPTIONS = {
    Status.OK: "success (restore: the restored program's own exit status)",
    Status.USAGE: "bad command line",
    Status.NOT_AN_IMAGE: "the file is not a ckpt image",
    Status.UNSUPPORTED_IMAGE: "image of another format version, architecture or page size",
    Status.CORRUPT_IMAGE: "image is truncated, corrupt or malformed",
    Status.SIGNATURE: "image signature bad, or missing/untrusted when the policy requires one",
    Status.POLICY: "refused by the administrator's policy (or the policy file is malformed)",
    Status.CREDENTIALS: "image credentials differ from the caller's",
    Status.FILE_CHANGED: "a file the image needs is missing, changed or unreadable",
    Status.NO_MEMORY: "not enough memory or address space to restore",
    Status.UNSUPPORTED_STATE: "this machine cannot host the image (e.g. another kernel)",
    Status.NO_PROCESS: "dump: no such process",
    Status.PTRACE_DENIED: "dump: not allowed to ptrace the process",
    Status.UNSUPPORTED_TARGET: "dump: the process has state ckpt cannot save",
    Status.TARGET_GONE: "dump: the process exited during the dump",
    Status.OUTPUT: "dump: cannot write the image",
    Status.BINFMT: "binfmt: cannot change the binfmt_misc registration",
    Status.INTERNAL: "internal error (a bug in ckpt: please report it)",
    Status.AFTER_NO_RETURN: "restore failed after the point of no return (the stub's message says which step)",
}


class CkptError(Exception):
    """A failure with a one-line message and an exit status."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = Status(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


def printable(text: str) -> str:
    """text with every non-printable character (newlines, escape sequences
    from a hostile image's paths, undecodable bytes) shown as \\xNN, so a
    message stays one line and can't drive the terminal."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= o <= 0xDCFF:             # a byte that was not UTF-8
            out.append(f"\\x{o - 0xDC00:02x}")
        else:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000
                       else f"\\U{o:08x}")
    return "".join(out)


def fail(status: int, message: str) -> NoReturn:
    """The one way ckpt ends with an error: one line on stderr, a status."""
    sys.stderr.write(f"ckpt: {printable(message)}\n")
    sys.stderr.flush()
    sys.exit(int(status))


def run_guarded(body) -> NoReturn:
    """Run body(); turn every failure into one line and a status. A
    traceback is shown only with CKPT_DEBUG=1."""
    try:
        body()
    except CkptError as e:
        fail(e.status, e.message)
    except KeyboardInterrupt:
        fail(130, "interrupted")
    except BrokenPipeError:
        fail(Status.OUTPUT, "output closed early")
    except SystemExit:
        raise
    except Exception as e:      # a bug: one line, never a traceback
        if os.environ.get("CKPT_DEBUG"):
            raise
        fail(Status.INTERNAL, f"internal error: {type(e).__name__}: {e}")
    sys.exit(0)


def status_table() -> str:
    return "\n".join(f"  {int(s):3d}  {DESCRIPTIONS[s]}" for s in Status)
