"""`python -m bench.profile`: where the time goes in `ckpt dump` and in restore.

    python -m bench.profile [--size MIB] [--rev REV | --worktree] [--perf] [--strace]

Uses the same snapshot of ckpt as `python -m bench` and prints:
  1. import times of the restore path (what ./app.ckpt's launcher imports)
     and of the dump command (python -X importtime, top entries);
  2. a timeline of one `ckpt dump` of a process holding MIB of written
     memory (default 1024): each stage of ckpt.checkpoint.dump, seize to
     detach (the target is stopped all that time), from the spawn;
  3. cProfile of the same dump (top functions by own time);
  4. a timeline of restoring that image, a tiny one and the warm-start
     python (bench/programs/warm.py), from the exec to the
     program answering: interpreter start-up, imports, each stage of
     ckpt.restore, the jump into the stub, the answer;
  5. with --perf, `perf record` of the dump (kernel and user symbols);
     with --strace, the restorer's slowest syscalls (strace -f -T).
The stage hooks wrap whatever functions the current ckpt has; names that
are gone are skipped, so this keeps working as ckpt changes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from . import sections
from .env import Env
from .proc import (BenchError, become_subreaper, cloexec_inherited_fds, ready_target,
                   reap_zombies, time_to_bytes)

# Run as `python -IS -c DUMP_HARNESS LIB PID OUT MARKS`.
DUMP_HARNESS = r'''
import sys, time
T = [("python running", time.monotonic_ns())]
lib, pid, out, marks = sys.argv[1:5]
sys.path[:0] = [lib]
import functools, json, os
import ckpt.checkpoint.dump as D
T.append(("imports done", time.monotonic_ns()))
ACC = {}

def wrap(owner, name, label, acc=False):
    fn = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if not callable(fn) or isinstance(fn, type):
        return
    calls = [0]
    @functools.wraps(fn)
    def w(*a, **k):
        # The first 20 calls of a stage are marks on the timeline; after
        # that (hot helpers) only a count and a total.
        calls[0] += 1
        mark = not acc and calls[0] <= 20
        t = time.monotonic_ns()
        if mark:
            T.append((label + " >", t))
        try:
            return fn(*a, **k)
        finally:
            e = time.monotonic_ns()
            if mark:
                T.append((label + " <", e))
            else:
                n, s = ACC.get(label, (0, 0))
                ACC[label] = (n + 1, s + e - t)
    setattr(owner, name, w)

for name, obj in list(vars(D).items()):
    if callable(obj) and not isinstance(obj, type) and name not in ("dump",) \
            and getattr(obj, "__module__", "").startswith("ckpt"):
        wrap(D, name, name)
for modname in ("memory", "procfs"):
    mod = getattr(D, modname, None)
    for name, obj in list(vars(mod or object()).items()):
        if callable(obj) and not isinstance(obj, type) and getattr(obj, "__module__", "") \
                == mod.__name__ and name not in ("read_pages", "path"):
            wrap(mod, name, f"{modname}.{name}")
for cls in ("Tracee", "Output"):
    c = getattr(D, cls, None)
    for name in ("seize", "interrupt", "detach", "commit", "xstate", "getregs"):
        if c is not None and name in c.__dict__:
            wrap(c, name, f"{cls}.{name}")
wrap(os, "pread", "os.pread (page data)", acc=True)
if isinstance(getattr(D.memory, "_Reader", None), type):
    wrap(D.memory._Reader, "read", "page reads (batched, in the page thread)", acc=True)
try:
    from ckpt.image import writer as W
    wrap(W._Sink, "write", "image write()", acc=True)
    from ckpt.image import format as F
    real_hasher = F.image_hasher
    class Hasher:
        def __init__(self, h): self.h = h
        def update(self, b):
            t = time.monotonic_ns(); self.h.update(b)
            n, s = ACC.get("checksum (blake3)", (0, 0))
            ACC["checksum (blake3)"] = (n + 1, s + time.monotonic_ns() - t)
        def digest(self): return self.h.digest()
    W.fmt.image_hasher = lambda *a: Hasher(real_hasher(*a))
except Exception:
    pass
D.dump(int(pid), out)
T.append(("dump returned", time.monotonic_ns()))
import resource
with open(marks, "w") as f:
    json.dump({"marks": T, "acc": ACC,
               "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)
'''

# Run as `python -IS -c RESTORE_HARNESS LIB IMAGE MARKS` (like the launcher,
# which is `python -IS` too); it becomes the restored program.
RESTORE_HARNESS = r'''
import sys, time
T = [("python running", time.monotonic_ns())]
lib, image, marks = sys.argv[1:4]
sys.path[:0] = [lib]
import ckpt.launcher
import ckpt.restore as R
T.append(("imports done", time.monotonic_ns()))
import ctypes, functools, json
import ckpt.restore.stub as S

def flush():
    with open(marks, "w") as f:
        json.dump({"marks": T}, f)

def wrap(mod, name, label):
    fn = getattr(mod, name, None)
    if not callable(fn) or isinstance(fn, type):
        return
    @functools.wraps(fn)
    def w(*a, **k):
        T.append((label + " >", time.monotonic_ns()))
        try:
            return fn(*a, **k)
        finally:
            T.append((label + " <", time.monotonic_ns()))
    setattr(mod, name, w)

for name, obj in list(vars(R).items()):
    if name != "restore" and callable(obj) and not isinstance(obj, type) \
            and getattr(obj, "__module__", "").startswith("ckpt"):
        wrap(R, name, name)
for name in ("encode", "_place", "_maps", "_check_fds", "_check_privileges"):
    wrap(S, name, "launch: " + name)

class C:
    def __getattr__(self, n):
        return getattr(ctypes, n)
    def CFUNCTYPE(self, *types):
        proto = ctypes.CFUNCTYPE(*types)
        def make(addr):
            f = proto(addr)
            def call(*a):
                T.append(("jump into the stub", time.monotonic_ns()))
                flush()
                return f(*a)
            return call
        return make
S.ctypes = C()
sys.argv = ["ckpt-launcher", image]
try:
    ckpt.launcher.main()
finally:
    flush()
'''


def log(msg: str) -> None:
    print(f"profile: {msg}", file=sys.stderr, flush=True)


def importtime(env, code: str, top: int = 12):
    r = subprocess.run([env.python, "-X", "importtime", "-IS", "-c",
                        f"import sys; sys.path[:0] = [{env.lib!r}]; {code}"],
                       capture_output=True, text=True, cwd=env.root)
    rows = []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self" not in line:
            own, cum, name = line[len("import time:"):].split("|")
            rows.append((int(cum), int(own), name.rstrip()[1:]))
    total = sum(c for c, _, n in rows if not n.startswith(" "))
    return total, sorted(rows, reverse=True)[:top]


def print_importtime(title: str, total: int, rows) -> None:
    print(f"\n-- {title}: {total / 1000:.1f} ms of imports (cumulative / own ms) --")
    for cum, own, name in rows:
        print(f"  {cum / 1000:7.1f} {own / 1000:7.1f}  {name}")


def print_timeline(title: str, t0: int, marks: list, extra: list = (),
                   min_ms: float = 0.5) -> None:
    """Stages (label > ... label <) by start time, with their length; stages
    shorter than min_ms are left out except seize/interrupt/detach; points
    (other marks) with the time since the previous point."""
    print(f"\n-- {title} --")
    print("   start ms  length ms")
    opened: dict[str, list[int]] = {}
    rows = []
    for name, t in sorted(marks, key=lambda m: m[1]):
        if name.endswith(" >"):
            opened.setdefault(name[:-2], []).append(t)
        elif name.endswith(" <"):
            label = name[:-2]
            start = opened[label].pop() if opened.get(label) else t
            keep = (t - start) / 1e6 >= min_ms or label in (
                "Tracee.seize", "Tracee.interrupt", "Tracee.detach")
            if keep:
                rows.append((start, 0, t - start, label))
        else:
            rows.append((t, 1, None, name))
    rows += [(t, 1, None, name) for t, name in extra]
    prev = t0
    for start, _, length, label in sorted(rows):
        if length is None:
            print(f"  {(start - t0) / 1e6:9.1f}  {(start - prev) / 1e6:9.1f}  "
                  f"* {label} (since the previous *)")
            prev = start
        else:
            print(f"  {(start - t0) / 1e6:9.1f}  {length / 1e6:9.1f}  {label}")


def profile_dump(env, pid: int, image: str) -> None:
    marks = os.path.join(env.shm, "dump-marks.json")
    t0 = time_ns()
    r = subprocess.run([env.python, "-IS", "-c", DUMP_HARNESS, env.lib, str(pid), image, marks],
                       capture_output=True, text=True, cwd=env.shm)
    t1 = time_ns()
    if r.returncode:
        raise BenchError(f"dump harness failed: {r.stderr[-1500:]}")
    with open(marks) as f:
        data = json.load(f)
    print_timeline(f"ckpt dump timeline ({os.path.getsize(image) / 2**20:.0f} MiB image, "
                   f"{(t1 - t0) / 1e6:.0f} ms from spawn to exit, peak RSS "
                   f"{data['maxrss_kib'] / 1024:.0f} MiB)", t0,
                   [("spawned", t0)] + data["marks"], [(t1, "process exited")])
    seize = next((t for n, t in data["marks"] if n == "Tracee.seize >"), None)
    detach = next((t for n, t in data["marks"] if n == "Tracee.detach <"), None)
    if seize and detach:
        print(f"  => target stopped from seize to detach: {(detach - seize) / 1e6:.1f} ms "
              f"of {(t1 - t0) / 1e6:.1f} ms")
    print("  in total (calls; hot helpers only after their first 20 calls):")
    for label, (n, ns) in sorted(data["acc"].items(), key=lambda kv: -kv[1][1]):
        print(f"    {ns / 1e6:8.1f}  {label} ({n} calls)")


def profile_dump_cprofile(env, pid: int, image: str, top: int = 15) -> None:
    prof = os.path.join(env.shm, "dump.prof")
    os.unlink(image)
    r = subprocess.run([env.python, "-m", "cProfile", "-o", prof, "-m", "ckpt", "dump",
                        str(pid), "-o", image], env=env.ckpt_env, capture_output=True,
                       text=True, cwd=env.shm)
    if r.returncode:
        raise BenchError(f"cProfile dump failed: {r.stderr[-1500:]}")
    import io
    import pstats
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    print(f"\n-- cProfile of ckpt dump, top {top} by own time --")
    print("\n".join("  " + ln.replace(env.lib + "/", "") for ln in lines[start - 1:]))


def profile_perf(env, pid: int, image: str, top: int = 25) -> None:
    perf = shutil.which("perf")
    if not perf:
        print("\n(perf not installed)")
        return
    data = os.path.join(env.shm, "perf.data")
    os.unlink(image)
    r = subprocess.run([perf, "record", "-q", "-o", data, "--", env.python, "-m", "ckpt",
                        "dump", str(pid), "-o", image], env=env.ckpt_env,
                       capture_output=True, text=True, cwd=env.shm)
    if r.returncode:
        print(f"\n(perf record failed: {r.stderr.strip()[-300:]})")
        return
    r = subprocess.run([perf, "report", "-i", data, "--no-children", "--sort", "dso,sym",
                        "--stdio"], capture_output=True, text=True)
    rows = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    print(f"\n-- perf record of ckpt dump, top {top} symbols --")
    print("\n".join("  " + ln.strip() for ln in rows[:top]))


def profile_restore(env, image: str, data: bytes, marks_bytes: bytes, title: str) -> None:
    marks = os.path.join(env.shm, "restore-marks.json")
    if os.path.exists(marks):
        os.unlink(marks)
    t0 = time_ns()
    res = time_to_bytes([env.python, "-IS", "-c", RESTORE_HARNESS, env.lib, image, marks],
                        data, marks_bytes, errdir=env.shm, timeout=600)
    with open(marks) as f:
        got = json.load(f)["marks"]
    extra = [(t0 + res["marks"][0], "program answered (stub + program since the jump)")]
    if len(res["marks"]) > 1:
        extra.append((t0 + res["marks"][1], "program read back all its memory"))
    print_timeline(f"{title}: exec -> answering {res['marks'][0] / 1e6:.1f} ms "
                   "(under the stage hooks)", t0, [("spawned", t0)] + got, extra)


def profile_strace(env, image: str, data: bytes, marks: bytes, top: int = 12) -> None:
    strace = shutil.which("strace")
    if not strace:
        print("\n(strace not installed)")
        return
    out = os.path.join(env.shm, "restore.strace")
    time_to_bytes([strace, "-f", "-T", "-o", out, *env.ckpt, "restore", image], data, marks,
                  env=env.ckpt_env, errdir=env.shm, timeout=600)
    calls = []
    with open(out) as f:
        for line in f:
            if line.rstrip().endswith(">") and "<" in line:
                try:
                    dur = float(line.rstrip()[line.rindex("<") + 1:-1])
                except ValueError:
                    continue
                calls.append((dur, line.split(None, 1)[1].strip()[:150]))
    calls.sort(reverse=True)
    print(f"\n-- slowest syscalls of `ckpt restore` (launcher and stub, strace -f -T; "
          f"{len(calls)} calls, {sum(d for d, _ in calls) * 1e3:.0f} ms in syscalls) --")
    for dur, text in calls[:top]:
        print(f"  {dur * 1e3:8.1f} ms  {text}")


def time_ns() -> int:
    return __import__("time").monotonic_ns()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile",
                                description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024, help="MiB of the dumped process")
    p.add_argument("--rev", default="HEAD")
    p.add_argument("--worktree", action="store_true")
    p.add_argument("--perf", action="store_true", help="also perf record the dump")
    p.add_argument("--strace", action="store_true", help="also strace the restore")
    args = p.parse_args(argv)
    become_subreaper()
    cloexec_inherited_fds()
    source = "worktree" if args.worktree else args.rev
    with Env(source=source, want_user=False, want_binfmt=False, log=log) as env:
        os.chdir(env.shm)
        print(f"ckpt profile ({source}), python {env.python}")
        print_importtime("restore path (ckpt.launcher + ckpt.restore)",
                         *importtime(env, "import ckpt.launcher, ckpt.restore"))
        print_importtime("dump command (ckpt.cli + ckpt.checkpoint.dump)",
                         *importtime(env, "import ckpt.cli, ckpt.checkpoint.dump"))
        image = os.path.join(env.shm, "hold.ckpt")
        log(f"starting a {args.size} MiB target")
        hold = sections.Hold(env, args.size)
        try:
            profile_dump(env, hold.pid, image)
            profile_dump_cprofile(env, hold.pid, image)
            if args.perf:
                profile_perf(env, hold.pid, image)
        finally:
            hold.close()
        profile_restore(env, image, b"av", b"AV", f"restore of the {args.size} MiB image")
        if args.strace:
            profile_strace(env, image, b"av", b"AV")
        os.unlink(image)

        tiny = os.path.join(env.shm, "tiny.ckpt")
        with ready_target([os.path.join(env.bin, "tiny")], 30, "tiny") as pid:
            sections.dump_file(env, pid, tiny)
        for _ in range(2):              # the first run warms caches
            profile_restore(env, tiny, b"x", b"x", "restore of the tiny C program")
        os.unlink(tiny)

        warm = os.path.join(env.shm, "warm.ckpt")
        with ready_target(["/usr/bin/python3", "-I", os.path.join(env.root, "warm.py"),
                           *env.extra_modules], 120, "the warm python") as pid:
            sections.dump_file(env, pid, warm)
        for _ in range(2):
            profile_restore(env, warm, b"x", b"x",
                            f"restore of the warm python ({os.path.getsize(warm) >> 20} MiB)")
        os.unlink(warm)
        reap_zombies()
    return 0


if __name__ == "__main__":
    sys.exit(main())
