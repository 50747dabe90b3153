"""The administrator's restore policy: /etc/ckpt/policy.toml.

Read by `ckpt restore`, the binfmt launcher (./app.ckpt) and `ckpt verify`
before anything of the image is opened. A missing file means the defaults
below (documented in INSTALL.md); a file that can't be read or parsed, or
that has an unknown key or a value of the wrong type, refuses every restore
with one line: a typo must never make the policy more permissive.

    require_signature = false     # true: only images signed by a trusted key
    trusted_keys = []             # key lines, or paths of KEY.pub files / directories of them
    allow_restore_creds = true    # false: --restore-creds is refused
    max_image_size = 0            # bytes, or "512M", "64G"...; 0 = no limit
    allowed_users = ["*"]         # user names, uids, "@group"; "*" = everyone

CKPT_POLICY names another file (tests, or a user trying a policy out). The
policy guards against running an image by mistake; it can't stop a user
from restoring with code of their own, since restore needs no privilege:
to stop images from running at all, disable the format (INSTALL.md).
"""
from __future__ import annotations

import os
import re

from ..errors import CkptError, Status
from ..image.record import fields, record

DEFAULT_PATH = "/etc/ckpt/policy.toml"
ENV = "CKPT_POLICY"
MAX_POLICY_SIZE = 1 << 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@record
class Policy:
    path: str                   # the file it came from (or would have)
    found: bool                 # False: the file does not exist, defaults apply
    require_signature: bool = False
    trusted_keys: tuple[bytes, ...] = ()
    allow_restore_creds: bool = True
    max_image_size: int = 0     # 0 = no limit
    allowed_users: tuple = ("*",)

    def describe(self) -> str:
        return f"policy {self.path}" if self.found else f"default policy (no {self.path})"


class _Bad(Exception):
    pass


def policy_path() -> str:
    return os.environ.get(ENV) or DEFAULT_PATH


def load_policy(path: str | None = None) -> Policy:
    path = path or policy_path()
    explicit = path != DEFAULT_PATH
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if explicit:
            _refuse(path, f"no such file (named by {ENV})")
        return Policy(path, False)
    except OSError as e:
        _refuse(path, f"cannot read it: {e.strerror.lower()}")
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_POLICY_SIZE + 1)
    except OSError as e:
        _refuse(path, f"cannot read it: {e.strerror.lower()}")
    if len(data) > MAX_POLICY_SIZE:
        _refuse(path, "larger than 1 MiB")
    import tomllib
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        _refuse(path, "not UTF-8 text")
    except tomllib.TOMLDecodeError as e:
        _refuse(path, f"not valid TOML: {e}")
    try:
        return _build(path, table)
    except _Bad as e:
        _refuse(path, str(e))


def _refuse(path: str, why: str):
    raise CkptError(Status.POLICY, f"policy {path}: {why}; refusing all restores "
                    "until it is fixed")


def _build(path: str, table: dict) -> Policy:
    known = set(fields(Policy)) - {"path", "found"}
    for key in table:
        if key not in known:
            raise _Bad(f"unknown key {key!r} (known: {', '.join(sorted(known))})")
    values: dict = {}
    for key in ("require_signature", "allow_restore_creds"):
        if key in table:
            if type(table[key]) is not bool:
                raise _Bad(f"{key} must be true or false")
            values[key] = table[key]
    if "max_image_size" in table:
        values["max_image_size"] = _size(table["max_image_size"])
    if "trusted_keys" in table:
        values["trusted_keys"] = _keys(path, table["trusted_keys"])
    if "allowed_users" in table:
        users = table["allowed_users"]
        if type(users) is not list or not all(
                (type(u) is int and 0 <= u < 2**32 - 1) or (type(u) is str and u) for u in users):
            raise _Bad("allowed_users must be a list of user names, uids, "
                       "\"@group\" or \"*\"")
        values["allowed_users"] = tuple(users)
    policy = Policy(path, True, **values)
    if policy.require_signature and not policy.trusted_keys:
        raise _Bad("require_signature = true but trusted_keys is empty, so no "
                   "image could ever run")
    return policy


def _size(v) -> int:
    if type(v) is int and v >= 0:
        return v
    if type(v) is str:
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", v, re.IGNORECASE)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2).upper()]
    raise _Bad(f"max_image_size must be a number of bytes or a size like \"64G\", "
               f"not {v!r}")


def _keys(path: str, entries) -> tuple[bytes, ...]:
    from ..sign import parse_public_key
    if type(entries) is not list or not all(type(e) is str and e.strip() for e in entries):
        raise _Bad("trusted_keys must be a list of non-empty strings")
    keys = []
    base = os.path.dirname(os.path.abspath(path))
    for entry in entries:
        if entry.split(None, 1)[0] in ("ckpt-ed25519", "ssh-ed25519"):
            try:
                keys.append(parse_public_key(entry))
            except ValueError as e:
                raise _Bad(f"trusted key {entry[:40]!r}: {e}") from None
            continue
        where = os.path.join(base, entry)
        try:
            files = ([os.path.join(where, n) for n in sorted(os.listdir(where))
                      if n.endswith(".pub")] if os.path.isdir(where) else [where])
        except OSError as e:
            raise _Bad(f"trusted key directory {where}: {e.strerror.lower()}") from None
        for name in files:
            try:
                with open(name, encoding="utf-8", errors="replace") as f:
                    keys.append(parse_public_key(f.read(64 << 10)))
            except OSError as e:
                raise _Bad(f"trusted key file {name}: {e.strerror.lower()}") from None
            except ValueError as e:
                raise _Bad(f"trusted key file {name}: {e}") from None
    return tuple(keys)


# --- the checks ---------------------------------------------------------------------

def check_caller(policy: Policy) -> None:
    """Refuse a caller the policy does not let restore."""
    if "*" in policy.allowed_users:
        return
    uid = os.getuid()
    gids = {os.getgid(), *os.getgroups()}
    names = None
    for u in policy.allowed_users:
        if type(u) is int:
            if u == uid:
                return
        elif u.startswith("@"):
            gid = _group_id(u[1:])
            if gid is not None and gid in gids:
                return
        else:
            if names is None:
                names = _user_names(uid)
            if u in names or (u.isdigit() and int(u) == uid):
                return
    raise CkptError(Status.POLICY, f"restore refused by {policy.describe()}: user "
                    f"{_user_label(uid)} is not in allowed_users")


def check_image_size(policy: Policy, size: int, name: str) -> None:
    if policy.max_image_size and size > policy.max_image_size:
        raise CkptError(Status.POLICY, f"{name}: restore refused by {policy.describe()}: "
                        f"the image is {size} bytes, max_image_size is "
                        f"{policy.max_image_size}")


def check_restore_creds(policy: Policy) -> None:
    """Called only when --restore-creds would switch credentials."""
    if not policy.allow_restore_creds:
        raise CkptError(Status.POLICY, f"restore refused by {policy.describe()}: "
                        "--restore-creds is not allowed (allow_restore_creds = false); "
                        "use --as-caller to restore as yourself")


def signature_rule(policy: Policy) -> str:
    return f"{policy.describe()} requires a signature by a trusted key"


def _user_names(uid: int) -> set[str]:
    import pwd
    try:
        return {pwd.getpwuid(uid).pw_name}
    except KeyError:
        return set()


def _user_label(uid: int) -> str:
    names = _user_names(uid)
    return f"{next(iter(names))} (uid {uid})" if names else f"uid {uid}"


def _group_id(name: str) -> int | None:
    import grp
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
