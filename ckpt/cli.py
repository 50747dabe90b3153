"""The `ckpt` command line.

Each command imports its stage only when it runs, so `ckpt restore` never
loads the dumper. Every failure prints one `ckpt: ...` line and exits with a
status from ckpt.errors; a traceback is shown only with CKPT_DEBUG=1.
"""
from __future__ import annotations

import json
import sys

import click

from .errors import CkptError, Status, run_guarded, status_table

EPILOG = "\b\nExit statuses:\n" + status_table()


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Checkpoint a running Linux process into an image, and restore it.

    \b
      ckpt dump PID -o app.ckpt     save a running process (it keeps running)
      ckpt restore app.ckpt         become the saved process, here and now
      ckpt inspect app.ckpt         look inside an image
      ckpt verify app.ckpt          would a restore go ahead? (all problems at once)
      ckpt keygen -o KEY; ckpt sign --key KEY app.ckpt     sign images
      ckpt demo                     see it work on a small program
    """


@cli.command(epilog=EPILOG)
@click.argument("pid", type=int)
@click.option("-o", "--output", required=True, metavar="FILE",
              help="Image file to write ('-' for standard output). A file is "
                   "written under a temporary name and renamed when complete; a "
                   "FIFO or device is written into directly.")
@click.option("--kill", is_flag=True, help="Kill the process after a successful dump.")
@click.option("--progress/--no-progress", default=None,
              help="Show progress on stderr (default: when it is a terminal).")
@click.option("--sign", "sign_key", metavar="KEY",
              help="Sign the image with this private key (from `ckpt keygen`).")
@click.option("--compress", metavar="zstd[:LEVEL]",
              help="Store the memory zstd-compressed (LEVEL -7..19, default 3). "
                   "Smaller images; restore decompresses, and can't map them.")
def dump(pid: int, output: str, kill: bool, progress: bool | None,
         sign_key: str | None, compress: str | None) -> None:
    """Save process PID into an image.

    Allowed exactly when you may ptrace PID. The process is stopped (it
    never sees a SIGSTOP) while its state is read and a copy-on-write copy
    of its memory is made, then goes on while that copy is written, unless
    --kill (then it stays stopped until it is killed). The image is written
    to a temporary file and renamed into place, so a failed dump leaves
    nothing that looks like an image. Processes (all their threads) with
    regular files, directories and /dev/null-like devices open are
    supported; anything else (child processes, sockets, seccomp, ...) is
    refused by name.
    """
    from .checkpoint.dump import dump as do_dump
    if output == "-" and sys.stdout.isatty():
        raise CkptError(Status.USAGE, "refusing to write an image to a terminal")
    signer = None
    if sign_key:                # before the target is touched: a bad key changes nothing
        from .sign import load_signer
        signer = load_signer(sign_key)
    level = None
    if compress:                # likewise
        from .image.format import zstd_level
        try:
            level = zstd_level(compress)
            import zstandard  # noqa: F401
        except ValueError as e:
            raise CkptError(Status.USAGE, f"--compress {compress}: {e}") from None
        except ImportError:
            raise CkptError(Status.USAGE, "--compress needs the zstandard package "
                            "(pip install zstandard)") from None
    do_dump(pid, output, kill=kill, progress=progress, sign=signer, zstd_level=level)


@cli.command(epilog=EPILOG)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--as-caller", is_flag=True, envvar="CKPT_AS_CALLER",
              help="Restore with your own credentials even if the image's differ.")
@click.option("--restore-creds", is_flag=True, envvar="CKPT_RESTORE_CREDS",
              help="Switch to the image's uids/gids/groups (the kernel decides "
                   "whether you may).")
@click.option("--mapped", is_flag=True, envvar="CKPT_MAPPED",
              help="Map the saved memory from IMAGE instead of copying it: fast "
                   "whatever its size (see above).")
def restore(image: str, as_caller: bool, restore_creds: bool, mapped: bool) -> None:
    """Become the process saved in IMAGE (same PID as this command).

    Everything is checked first (the image, this kernel, every file it maps
    or holds open, opened as you); only then is the current process
    replaced. Its exit status is the restored program's. Standard fds 0-2
    are yours, as with any exec. The restored process never has more than
    your credentials: an image saved by another user is refused unless you
    choose --as-caller or --restore-creds.

    \b
    --mapped (or CKPT_MAPPED=1 in the environment, which ./app.ckpt reads
    too): the saved memory becomes a private mapping of IMAGE, read on first
    touch, copied on first write. Restore then takes milliseconds whatever
    the image's size, but:
      - IMAGE must be owned by you or root, not group/other-writable (a
        later write to it would show in pages the program has not
        written) and not on a noexec mount; otherwise refused;
      - page data is not hashed before the restore (records still are),
        unless the policy requires a signature;
      - MADV_DONTNEED/MADV_FREE on that memory brings back the image's
        bytes, not zeros (allocators such as jemalloc assume zeros), and
        /proc/PID/maps names IMAGE for it;
      - a later dump of the restored process refers to IMAGE for the
        pages it has not written: keep IMAGE while such a dump lives.
    """
    from .restore import restore as do_restore
    do_restore(image, as_caller=as_caller, restore_creds=restore_creds, mapped=mapped)


@cli.command(epilog=EPILOG)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def inspect(image: str, as_json: bool) -> None:
    """Show what IMAGE holds: process, threads, memory map, files, fds."""
    from .image import read_image, summarize, to_json
    img = read_image(image)
    if as_json:
        click.echo(json.dumps(to_json(img), indent=2))
    else:
        click.echo(summarize(img), nl=False)


@cli.command(epilog=EPILOG)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--key", "key_path", metavar="KEY.pub",
              help="Also require a good signature by this public key.")
@click.option("--as-caller", is_flag=True, envvar="CKPT_AS_CALLER",
              help="Check as `ckpt restore --as-caller` would.")
@click.option("--restore-creds", is_flag=True, envvar="CKPT_RESTORE_CREDS",
              help="Check as `ckpt restore --restore-creds` would.")
@click.option("--mapped", is_flag=True, envvar="CKPT_MAPPED",
              help="Check as `ckpt restore --mapped` would (the image's guard).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
def verify(image: str, key_path: str | None, as_caller: bool, restore_creds: bool,
           mapped: bool, quiet: bool) -> None:
    """Check IMAGE as a restore would, without restoring: the policy,
    structure and checksums, signatures, the values it holds, this machine,
    credentials, and every file it needs (exists, readable by you, the same
    file). Reports every problem at once; exits 0 only if `ckpt restore
    IMAGE` would go ahead, else with the status restore would give."""
    from .verify import verify as do_verify
    key = None
    if key_path:
        from .sign import read_public_key
        key = read_public_key(key_path)
    report = do_verify(image, key=key, as_caller=as_caller, restore_creds=restore_creds,
                       mapped=mapped)
    if not quiet or report.failures:
        click.echo(report.text(), nl=False)
    if report.failures:
        first = report.failures[0]
        more = len(report.failures) - 1
        raise CkptError(first.status, first.message
                        + (f" (and {more} more problem{'s' if more > 1 else ''}: see above)"
                           if more else ""))


@cli.command(epilog=EPILOG)
@click.option("-o", "--output", required=True, metavar="KEY",
              help="Write the private key to KEY (mode 0600) and the public key to KEY.pub.")
@click.option("-C", "--comment", default="", help="Comment for the public key line.")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen(output: str, comment: str, force: bool) -> None:
    """Make an ed25519 key pair for signing images.

    Give KEY.pub to whoever restores (an administrator lists it in
    trusted_keys of /etc/ckpt/policy.toml); keep KEY private.
    """
    from .sign import keygen as do_keygen
    priv, pub, fp = do_keygen(output, comment=comment, force=force)
    click.echo(f"{priv}: private key\n{pub}: public key {fp}")


@cli.command(epilog=EPILOG)
@click.option("--key", "key_path", required=True, metavar="KEY",
              help="Private key (from `ckpt keygen`).")
@click.argument("image", type=click.Path(dir_okay=False))
def sign(key_path: str, image: str) -> None:
    """Sign IMAGE in place (after checking it whole).

    The signature is a block appended after the image's trailer; it signs
    the trailer's BLAKE3 digest of the whole image. Signing again with the
    same key replaces that key's signature; other keys' signatures stay.
    """
    from .sign import sign_file
    fp = sign_file(image, key_path)
    click.echo(f"{image}: signed by {fp}")


@cli.command(epilog=EPILOG)
def demo() -> None:
    """Start a small counter, dump it, kill it, restore it: it carries on."""
    from .demo import run
    run()


@cli.group(epilog=EPILOG)
def binfmt() -> None:
    """Let images be run directly: ./app.ckpt restores in place.

    Entries are machine-wide and need root. The format is registered
    without the C flag: a restored image always runs with the credentials
    of whoever executed it. `disable` (or `unregister`) makes ./app.ckpt
    fail with "Exec format error" and nothing else happens.
    """


_NAME = click.option("--name", default="ckpt", show_default=True,
                     help="binfmt_misc entry name.")


@binfmt.command("register")
@_NAME
@click.option("--launcher", metavar="PATH",
              help="Where to write the interpreter script (default: this "
                   "install's bin/ckpt-launcher).")
def binfmt_register(name: str, launcher: str | None) -> None:
    """Register (or re-register) the format; mounts binfmt_misc if needed."""
    from . import binfmt as b
    for line in b.register(name, launcher):
        click.echo(line)


def _entry_command(verb: str, doc: str) -> None:
    @binfmt.command(verb, help=doc)
    @_NAME
    def command(name: str) -> None:
        from . import binfmt as b
        click.echo(getattr(b, verb)(name))


for _verb, _doc in (
        ("unregister", "Remove the entry."),
        ("enable", "Let images run again."),
        ("disable", "Stop images from running (exec fails with ENOEXEC)."),
        ("status", "Is the format registered and enabled, and which interpreter runs.")):
    _entry_command(_verb, _doc)


@binfmt.command("files")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--launcher", default="/usr/local/bin/ckpt-launcher", show_default=True,
              help="The launcher script `ckpt binfmt register --launcher` writes; "
                   "the files name the native launcher beside it (LAUNCHER-native).")
@click.option("--no-native", is_flag=True, help="Name the script itself (no restore tickets).")
def binfmt_files(directory: str, launcher: str, no_native: bool) -> None:
    """Write the systemd binfmt.d and binfmt-support files into DIRECTORY."""
    import os
    from . import binfmt as b
    interpreter = launcher if no_native else launcher + b.NATIVE_SUFFIX
    os.makedirs(directory, exist_ok=True)
    for fname, text in (("ckpt.conf", b.systemd_conf(interpreter)),
                        ("ckpt.binfmt-support", b.binfmt_support(interpreter))):
        with open(os.path.join(directory, fname), "w") as f:
            f.write(text)
        click.echo(os.path.join(directory, fname))


def main(argv: list[str] | None = None) -> None:
    def body() -> None:
        try:
            cli.main(args=argv, prog_name="ckpt", standalone_mode=False)
        except click.exceptions.Abort:
            raise CkptError(Status.USAGE, "aborted")
        except click.ClickException as e:
            raise CkptError(Status.USAGE, e.format_message())
    run_guarded(body)
