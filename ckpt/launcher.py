"""binfmt_misc's interpreter for ckpt images: `./app.ckpt` restores in place.

The kernel runs `ckpt-launcher IMAGE [ARGS...]` (flags "": no argv[0]); the
image's program keeps its own argv from memory, so ARGS are ignored. Options
come from the environment, since argv belongs to the program:
CKPT_AS_CALLER=1, CKPT_RESTORE_CREDS=1, CKPT_MAPPED=1. Same rules as `ckpt restore`: all
checks before the point of no return, one line and a status on failure.

Start-up matters here (warm start): `ckpt binfmt register` writes a small
script that runs this with `python -IS` and explicit paths, and nothing on
this path imports click, elftools or the dumper. binfmt_misc runs the
native launcher (restorer-stub/launcher.c) next to that script, which runs
it only when it has no valid restore ticket: a restore that passed here
writes one (ckpt.restore.ticket) so that the next can skip Python.
"""
from __future__ import annotations

import os
import sys

from .errors import CkptError, Status, run_guarded

SCRIPT = """#!{python} -IS
# binfmt_misc interpreter for ckpt images; written by `ckpt binfmt register`.
import sys
sys.path[:0] = {paths!r}
from ckpt.launcher import main
main()
"""


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def main() -> None:
    def body() -> None:
        if len(sys.argv) < 2:
            raise CkptError(Status.USAGE, "ckpt-launcher is run by binfmt_misc for "
                            "ckpt images: ./app.ckpt (or ckpt-launcher IMAGE)")
        from .restore import restore
        restore(sys.argv[1], as_caller=_flag("CKPT_AS_CALLER"),
                restore_creds=_flag("CKPT_RESTORE_CREDS"), mapped=_flag("CKPT_MAPPED"),
                ticket=True)
    run_guarded(body)
