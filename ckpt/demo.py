"""`ckpt demo`: a counter is dumped, killed, and restored; it carries on.

Runs the real commands (`ckpt dump`, `ckpt restore`) as subprocesses, the
way a user would, and checks the counter's output continues without a gap.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from .errors import CkptError, Status

COUNTER = """
import sys, time
total = 0
for n in range(16):
    total += n * n
    print(f"tick {n:2d}   sum of squares so far {total}", flush=True)
    time.sleep(0.2)
sys.exit(7)
"""
CKPT = [sys.executable, "-m", "ckpt"]


def say(text: str) -> None:
    print(f"ckpt demo: {text}", flush=True)


def run() -> None:
    with tempfile.TemporaryDirectory(prefix="ckpt-demo-") as tmp:
        image = os.path.join(tmp, "counter.ckpt")
        counter = subprocess.Popen([sys.executable, "-I", "-S", "-c", COUNTER],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   close_fds=True, text=True)
        say(f"started a counter (pid {counter.pid}); it prints a tick every 0.2 s "
            "and exits with status 7 after tick 15")
        last = -1
        for _ in range(5):
            line = counter.stdout.readline()
            print("    original | " + line, end="", flush=True)
            last = int(line.split()[1])
        t0 = time.monotonic()
        dumped = subprocess.run(CKPT + ["dump", str(counter.pid), "-o", image, "--kill"],
                                stdin=subprocess.DEVNULL)
        if dumped.returncode:
            counter.kill()
            raise CkptError(Status(dumped.returncode), "the dump failed (see above)")
        took = (time.monotonic() - t0) * 1000
        for line in counter.stdout:       # whatever it printed before the dump
            print("    original | " + line, end="")
            last = int(line.split()[1])
        counter.wait()
        say(f"dumped it to {os.path.basename(image)} "
            f"({os.path.getsize(image) / 1024:.0f} KiB) in {took:.0f} ms and killed it (--kill)")
        entry = _register(tmp)
        if entry:
            say(f"restoring: ./counter.ckpt (binfmt_misc entry '{entry}', "
                "registered for this demo) becomes the counter")
            argv = [image]
        else:
            say("restoring: `ckpt restore counter.ckpt` becomes the counter "
                "(run the demo as root to see ./counter.ckpt run directly)")
            argv = CKPT + ["restore", image]
        try:
            restored = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, close_fds=True, text=True)
            first, status = _follow(restored)
        finally:
            if entry:
                from .binfmt import unregister
                unregister(entry)
        say(f"the restored counter (pid {restored.pid}) exited with status {status}")
        if status != 7 or first != last + 1:
            raise CkptError(Status.INTERNAL,
                            f"demo failed: expected tick {last + 1} then status 7, "
                            f"got tick {first} and status {status}")
        say(f"it went on at tick {first}, right after the last tick before the dump. "
            "Try it yourself: ckpt dump PID -o app.ckpt; ckpt restore app.ckpt")


def _follow(restored: subprocess.Popen) -> tuple[int | None, int]:
    first = None
    for line in restored.stdout:
        print(f"    restored | {line}", end="", flush=True)
        if first is None and line.startswith("tick"):
            first = int(line.split()[1])
    return first, restored.wait()


def _register(tmp: str) -> str | None:
    """As root, a temporary binfmt_misc entry of the demo's own."""
    if os.geteuid() != 0:
        return None
    from . import binfmt
    name = f"ckpt-demo-{os.getpid()}"
    binfmt.register(name, os.path.join(tmp, "ckpt-launcher"))
    return name
