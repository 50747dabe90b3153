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
      ckpt demo                     see it work on a small program
    """


@cli.command(epilog=EPILOG)
@click.argument("pid", type=int)
@click.option("-o", "--output", required=True, metavar="FILE",
              help="Image file to write ('-' for standard output).")
@click.option("--kill", is_flag=True, help="Kill the process after a successful dump.")
@click.option("--progress/--no-progress", default=None,
              help="Show progress on stderr (default: when it is a terminal).")
def dump(pid: int, output: str, kill: bool, progress: bool | None) -> None:
    """Save process PID into an image.

    Allowed exactly when you may ptrace PID. The process is stopped only
    while it is read (it never sees a SIGSTOP) and then goes on, unless
    --kill. The image is written to a temporary file and renamed into place,
    so a failed dump leaves nothing that looks like an image. Single-threaded
    processes with regular files, directories and /dev/null-like devices
    open are supported; anything else is refused by name.
    """
    from .checkpoint.dump import dump as do_dump
    if output == "-" and sys.stdout.isatty():
        raise CkptError(Status.USAGE, "refusing to write an image to a terminal")
    do_dump(pid, output, kill=kill, progress=progress)


@cli.command(epilog=EPILOG)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--as-caller", is_flag=True, envvar="CKPT_AS_CALLER",
              help="Restore with your own credentials even if the image's differ.")
@click.option("--restore-creds", is_flag=True, envvar="CKPT_RESTORE_CREDS",
              help="Switch to the image's uids/gids/groups (the kernel decides "
                   "whether you may).")
def restore(image: str, as_caller: bool, restore_creds: bool) -> None:
    """Become the process saved in IMAGE (same PID as this command).

    Everything is checked first (the image, this kernel, every file it maps
    or holds open, opened as you); only then is the current process
    replaced. Its exit status is the restored program's. Standard fds 0-2
    are yours, as with any exec. The restored process never has more than
    your credentials: an image saved by another user is refused unless you
    choose --as-caller or --restore-creds.
    """
    from .restore import restore as do_restore
    do_restore(image, as_caller=as_caller, restore_creds=restore_creds)


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
@click.option("--launcher", default="/usr/local/bin/ckpt-launcher", show_default=True)
def binfmt_files(directory: str, launcher: str) -> None:
    """Write the systemd binfmt.d and binfmt-support files into DIRECTORY."""
    import os
    from . import binfmt as b
    os.makedirs(directory, exist_ok=True)
    for fname, text in (("ckpt.conf", b.systemd_conf(launcher)),
                        ("ckpt.binfmt-support", b.binfmt_support(launcher))):
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
