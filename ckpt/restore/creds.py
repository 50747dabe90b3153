"""Credentials: restore never gains anything.

The restored process runs with the caller's credentials. If the image's
recorded ones differ, restore is refused unless the caller says which to
use: its own (`as_caller`), or the recorded ones (`restore_creds`), which
the kernel grants only to a caller that already holds the privilege.
"""
from __future__ import annotations

import os

from ..errors import CkptError, Status
from ..image.model import Creds

HINT = ("restore as yourself with --as-caller (CKPT_AS_CALLER=1), or with the "
        "image's ids with --restore-creds (CKPT_RESTORE_CREDS=1; needs the privilege)")


def caller_creds() -> tuple:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return (tuple(int(x) for x in status["Uid"].split()),
            tuple(int(x) for x in status["Gid"].split()),
            tuple(sorted(set(os.getgroups()))), int(status["CapEff"], 16))


def differences(saved: Creds) -> list[str]:
    uids, gids, groups, cap_eff = caller_creds()
    out = []
    if tuple(saved.uids) != uids:
        out.append(f"uids {_ids(saved.uids)} (yours {_ids(uids)})")
    if tuple(saved.gids) != gids:
        out.append(f"gids {_ids(saved.gids)} (yours {_ids(gids)})")
    if tuple(sorted(set(saved.groups))) != groups:
        out.append(f"groups {_ids(sorted(set(saved.groups))) or '-'} (yours {_ids(groups) or '-'})")
    if saved.cap_eff != cap_eff:
        out.append(f"capabilities {saved.cap_eff:#x} (yours {cap_eff:#x})")
    return out


def apply_policy(saved: Creds, *, as_caller: bool, restore_creds: bool) -> None:
    if as_caller and restore_creds:
        raise CkptError(Status.USAGE, "--as-caller and --restore-creds exclude each other")
    diff = differences(saved)
    if not diff or as_caller:
        return
    if not restore_creds:
        raise CkptError(Status.CREDENTIALS,
                        "the image's credentials differ from yours: "
                        + "; ".join(diff) + "; " + HINT)
    try:
        # Groups, then gids, then uids: after setresuid a non-root caller
        # could no longer change the others.
        os.setgroups(list(saved.groups))
        os.setresgid(*saved.gids[:3])
        os.setresuid(*saved.uids[:3])
    except PermissionError:
        raise CkptError(Status.CREDENTIALS,
                        "the kernel refused to switch to the image's credentials ("
                        + "; ".join(diff) + "): --restore-creds needs the privilege "
                        "to set them (e.g. root); use --as-caller to restore as yourself")


def _ids(ids) -> str:
    return ",".join(str(i) for i in ids)
