"""`ckpt verify [--key KEY.pub] IMAGE`: would a restore go ahead, and if not,
everything that stands in its way.

It runs the checks `ckpt restore` runs, in the same order, with the same
functions (ckpt.restore), but records each failure and goes on where that
is safe, instead of stopping at the first: the policy, the image's
structure and checksums, its signatures, the validator, this machine, the
credentials, every file it maps or holds open (opened as the caller and
closed again), its working directory, and the restore plan. It stops
short of launching the stub. The exit status is the one `ckpt restore`
would end with (the first failure in restore's order), 0 only if a
restore would go ahead.

With --key, the image must also carry a good signature by that key, as
if the policy required it.
"""
from __future__ import annotations

import dataclasses
import os

from .errors import CkptError, Status, printable
from .image import Image, read_image
from .image.validate import validate_image


@dataclasses.dataclass
class Report:
    name: str
    lines: list = dataclasses.field(default_factory=list)     # (ok: bool|None, text)
    failures: list = dataclasses.field(default_factory=list)  # CkptError, restore order

    def ok(self, text: str) -> None:
        self.lines.append((True, text))

    def skip(self, text: str) -> None:
        self.lines.append((None, text))

    def fail(self, e: CkptError) -> None:
        self.failures.append(e)
        self.lines.append((False, e.message))

    @property
    def status(self) -> Status:
        return self.failures[0].status if self.failures else Status.OK

    def text(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}
        out = [f"{printable(self.name)}:"] + [f"  {mark[ok]}  {printable(t)}"
                                               for ok, t in self.lines]
        if self.failures:
            n = len(self.failures)
            out.append(f"a restore would be refused (status {int(self.status)}); "
                       f"{n} problem{'s' if n > 1 else ''}")
        else:
            out.append("a restore would go ahead")
        return "\n".join(out) + "\n"


def verify(path: str, *, key: bytes | None = None, as_caller: bool = False,
           restore_creds: bool = False, mapped: bool = False) -> Report:
    from . import restore as R
    from .restore.policy import Policy, check_caller, load_policy, policy_path

    rep = Report(path)
    try:
        policy = load_policy()
        rep.ok(f"{policy.describe()}")
    except CkptError as e:
        rep.fail(e)
        policy = Policy(policy_path(), False)          # go on with the defaults
    _step(rep, lambda: check_caller(policy), "this user may restore")
    try:
        image_fd = R.open_image(path)
    except CkptError as e:
        rep.fail(e)
        return rep
    try:
        if mapped:
            _step(rep, lambda: R.check_mappable(image_fd, path),
                  "mapped restore: only you or root can change the image")
        image = _read(rep, R, image_fd, path, policy, key)
        if image is not None:
            _image_checks(rep, R, image, image_fd, policy, as_caller, restore_creds, mapped)
    finally:
        os.close(image_fd)
    return rep


def _step(rep: Report, fn, ok_text) -> bool:
    try:
        fn()
    except CkptError as e:
        rep.fail(e)
        return False
    if ok_text:
        rep.ok(ok_text)
    return True


def _read(rep: Report, R, image_fd: int, name: str, policy, key) -> Image | None:
    from .restore.policy import check_image_size, signature_rule
    from .sign import check_signatures, fingerprint
    size = os.fstat(image_fd).st_size
    _step(rep, lambda: check_image_size(policy, size, name), None)
    quick_unsigned = policy.require_signature and R._unsigned(image_fd)
    if quick_unsigned:
        rep.fail(CkptError(Status.SIGNATURE, f"{name}: the image is not signed, and "
                           + signature_rule(policy)))
    found = []          # signature results, in the order restore meets them

    def authenticate(trailer, blocks):
        try:
            good = check_signatures(trailer, blocks, name=name, trusted=policy.trusted_keys,
                                    required=policy.require_signature and not quick_unsigned,
                                    why=signature_rule(policy))
            if key is not None:
                check_signatures(trailer, blocks, name=name, trusted=[key], required=True,
                                 why=f"--key {fingerprint(key)} asks for its signature")
        except CkptError as e:
            found.append(e)
            return
        trusted = set(policy.trusted_keys) | ({key} if key else set())
        found.append("signed by " + ", ".join(
            fingerprint(k) + (" (trusted)" if k in trusted else "") for k in good)
            if good else None)

    try:
        with os.fdopen(os.dup(image_fd), "rb") as f:
            image = read_image(f, name=name, authenticate=authenticate)
        error = None
    except CkptError as e:
        image, error = None, e
    if image is not None:
        h = image.header
        rep.ok(f"structure and checksums: format {h.version_major}.{h.version_minor}, "
               f"{len(image.vmas)} vmas, {len(image.threads)} thread(s), "
               f"{len(image.files)} files, {image.pages_length} bytes of page data")
    for r in found:
        if isinstance(r, CkptError):
            rep.fail(r)
        elif r:
            rep.ok(r)
        elif not quick_unsigned:
            rep.skip("signature: none (none is required)")
    if error is not None:
        rep.fail(error)
    return image


def _image_checks(rep: Report, R, image: Image, image_fd: int, policy,
                  as_caller: bool, restore_creds: bool, mapped: bool) -> None:
    valid = _step(rep, lambda: validate_image(image, name=rep.name),
                  "validated: every value is one the kernel and the restorer accept")
    _step(rep, lambda: R.check_host(image), "this machine can host it (same kernel, limits)")
    _step(rep, lambda: R.check_creds(image, policy, as_caller=as_caller,
                                     restore_creds=restore_creds),
          "credentials: " + ("restored as you (--as-caller)" if as_caller else
                             "switched to the image's (--restore-creds)" if restore_creds
                             else "the image's are yours"))
    if not valid:
        rep.skip("files, working directory, plan: not checked (the image is invalid)")
        return
    _files_and_plan(rep, R, image, image_fd, mapped)


def _files_and_plan(rep: Report, R, image: Image, image_fd: int, mapped: bool) -> None:
    try:
        files = R.open_files(image)
    except CkptError as e:
        rep.fail(e)
        files = None
    else:
        rep.ok(f"files: {len(files.mapped)} mapped and {len(files.held)} held open, "
               "all readable and as saved")
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.chdir(image.process.cwd)
            rep.ok(f"working directory {image.process.cwd}")
        except OSError as e:
            rep.fail(CkptError(Status.FILE_CHANGED, f"working directory "
                               f"{image.process.cwd}: {e.strerror.lower()}"))
        finally:
            os.fchdir(here)
    finally:
        os.close(here)
    if files is None:
        rep.skip("restore plan: not built (files missing)")
        return
    try:
        _plan_checks(R, image, files, image_fd, mapped)
        rep.ok("restore plan built and checked")
    except CkptError as e:
        rep.fail(e)
    finally:
        files.close()


def _plan_checks(R, image: Image, files, image_fd: int, mapped: bool) -> None:
    """What restore checks between the files and the jump: the plan (signal
    frames, fd layout) and the stub's own preconditions (as launch() checks
    them before it maps anything)."""
    from .restore import stub
    from .restore.plan import encode
    plan = R.build_plan(image, files, image_fd, mapped=mapped)
    try:
        maps = stub._maps()
        vdso_cur, vdso_len = stub.vdso_block(maps)
        if plan.vdso_dst and plan.vdso_len != vdso_len:
            raise CkptError(Status.UNSUPPORTED_STATE,
                            f"the image's vdso block is {plan.vdso_len} bytes, "
                            f"this kernel's {vdso_len}: restore needs the same kernel")
        low = stub._mmap_min_addr()
        if plan.vmas and plan.vmas[0].start < low:
            raise CkptError(Status.UNSUPPORTED_STATE,
                            f"the image maps {plan.vmas[0].start:#x}, below this "
                            f"machine's vm.mmap_min_addr ({low:#x})")
        stub._check_privileges(plan)
        encode(plan, stub_start=0, stub_len=0, cur_rseq=stub.current_rseq(),
               vdso_cur=vdso_cur, vdso_park=0, task_top=stub.TASK_TOP)
    finally:
        fds = {plan.image_fd, plan.exe_fd, *(v.fd for v in plan.vmas),
               *(f.src for f in plan.fds)}
        for fd in fds:
            if fd >= plan.fd_base:
                try:
                    os.close(fd)
                except OSError:
                    pass
