"""The measurements: each section returns plain dicts of raw samples (ns,
KiB, bytes); main.py turns them into the table and the JSON.

Within a section, the variants (a ceiling and the ckpt figures it bounds)
run interleaved, one of each per round, the order rotated every round: this
VM's timings are bimodal (re-touching freed memory can be 5x slower), so
only variants measured side by side are compared.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time

from .proc import (DEVNULL, BenchError, kill, now, read_exact, ready_target, reap_zombies,
                   spawn, stderr_file, tail, time_to_bytes, time_to_exit, wait)

MiB = 1 << 20
CAT = shutil.which("cat") or "/bin/cat"
TRUE = shutil.which("true") or "/bin/true"
WRITE_CHUNK_KIB = 1024          # the ceiling's write(2) size
HOLD_PERIOD_US = 200            # the target's loop period (its gap resolution)


def interleave(rounds: int, tasks: dict, log, label: str, warmup: int = 0) -> tuple[dict, dict]:
    """Run each task once per round, rotating the order. A task that fails
    is dropped for the remaining rounds (its error is returned)."""
    out = {name: [] for name in tasks}
    errors: dict[str, str] = {}
    names = list(tasks)
    for r in range(warmup + rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name in errors:
                continue
            try:
                res = tasks[name]()
            except BenchError as e:
                errors[name] = str(e)
                log(f"{label}: {name} failed: {e}")
                continue
            if r >= warmup:
                out[name].append(res)
        if r >= warmup:
            log(f"{label}: round {r - warmup + 1}/{rounds}")
        reap_zombies()
    return out, errors


# -- the dump target ----------------------------------------------------------------

class Hold:
    """bench/programs/hold.c: SIZE_MIB of written memory and a loop that
    measures its own longest gap. Ours: killed (by pid) on close."""

    def __init__(self, env, size_mib: int, period_us: int = HOLD_PERIOD_US):
        rin, self.win = os.pipe()
        self.rout, wout = os.pipe()
        self.err, self.err_path = stderr_file(env.shm)
        try:
            self.pid = spawn([os.path.join(env.bin, "hold"), str(size_mib), str(period_us)],
                             stdin=rin, stdout=wout, stderr=self.err)
        finally:
            os.close(rin)
            os.close(wout)
        self.closed = False
        try:
            read_exact(self.rout, 1, 60 + size_mib / 50, f"hold {size_mib} MiB to fill")
        except BenchError:
            self.close()
            raise

    def _ask(self, cmd: bytes, n: int) -> bytes:
        os.write(self.win, cmd)
        return read_exact(self.rout, n, 30, f"hold's answer to {cmd!r}")

    def reset(self) -> None:
        if self._ask(b"r", 1) != b"k":
            raise BenchError("hold: bad answer to reset")

    def gaps(self) -> dict:
        max_gap, stall, nstall, passes = struct.unpack("<4Q", self._ask(b"g", 32))
        return {"max_gap_ns": max_gap, "stall_ns": stall, "stalls": nstall,
                "passes": passes}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        kill(self.pid)
        for fd in (self.win, self.rout, self.err):
            os.close(fd)
        os.unlink(self.err_path)


# -- ceilings -------------------------------------------------------------------------

def _ceiling(env, args: list[str]) -> int:
    r = subprocess.run([os.path.join(env.bin, "ceiling")] + args, capture_output=True,
                       text=True, timeout=600, stdin=DEVNULL)
    if r.returncode:
        raise BenchError(f"ceiling {' '.join(args)} failed ({r.returncode})")
    return int(r.stdout.split()[-1])


def ceiling_write(env, mib: int, how: str = "write") -> dict:
    """The file stays until the next round's write replaces it (as a dump
    replaces its image): both find the same amount of just-freed memory.
    how "splice": the same bytes vmspliced and spliced (zero-copy)."""
    path = os.path.join(env.shm, f"ceiling-{mib}.tmp")
    return {"ns": _ceiling(env, [how, str(mib), str(WRITE_CHUNK_KIB), path]),
            "bytes": mib * MiB}


def ceiling_touch(env, mib: int) -> dict:
    return {"ns": _ceiling(env, ["touch", str(mib)]), "bytes": mib * MiB}


def ceiling_pipe(env, mib: int) -> dict:
    r, w = os.pipe()
    er, ew = os.pipe()
    cat = spawn([CAT], stdin=r)
    try:
        p = spawn([os.path.join(env.bin, "ceiling"), "pipe", str(mib), str(WRITE_CHUNK_KIB)],
                  stdout=w, stderr=ew)
    finally:
        os.close(r)
        os.close(w)
        os.close(ew)
    try:
        _, status, _ = wait(p, 600)
        wait(cat, 60)
        out = os.read(er, 100)
    finally:
        os.close(er)
    if status:
        raise BenchError(f"ceiling pipe failed ({status})")
    return {"ns": int(out.split()[-1]), "bytes": mib * MiB}


def cat_file(path: str) -> dict:
    res = time_to_exit([CAT, path])
    return {"ns": res["ns"], "bytes": os.path.getsize(path)}


# -- ckpt dump ----------------------------------------------------------------------

def dump_file(env, pid: int, path: str, ckpt=None, ckpt_env=None) -> dict:
    res = time_to_exit((ckpt or env.ckpt) + ["dump", str(pid), "-o", path],
                       env=ckpt_env or env.ckpt_env, timeout=900, errdir=env.shm)
    return {"ns": res["ns"], "maxrss_kib": res["maxrss_kib"],
            "bytes": os.path.getsize(path)}


def dump_pipe(env, pid: int) -> dict:
    """`ckpt dump PID -o - | cat >/dev/null`: until both have exited."""
    r, w = os.pipe()
    err, path = stderr_file(env.shm)
    cat = spawn([CAT], stdin=r)
    try:
        t0 = now()
        d = spawn(env.ckpt + ["dump", str(pid), "-o", "-"], stdout=w, stderr=err,
                  env=env.ckpt_env)
    finally:
        os.close(r)
        os.close(w)
        os.close(err)
    try:
        t_d, status, ru = wait(d, 900)
        t_c, _, _ = wait(cat, 60)
    except BenchError:
        kill(cat)
        raise
    if status:
        raise BenchError(f"ckpt dump -o - exited with {status}: {tail(path)}")
    os.unlink(path)
    return {"ns": max(t_d, t_c) - t0, "maxrss_kib": ru.ru_maxrss}


def restore_argv(env, image: str, via: str) -> list[str]:
    """via: binfmt (./img), cli (ckpt restore img), binfmt_mapped
    (CKPT_MAPPED=1 ./img: restore_env) or cli_mapped (ckpt restore --mapped)."""
    if via.startswith("binfmt"):
        return [image]
    return env.ckpt + ["restore"] + (["--mapped"] if via == "cli_mapped" else []) + [image]


def restore_env(env, via: str) -> dict:
    return dict(env.ckpt_env, CKPT_MAPPED="1") if via == "binfmt_mapped" else env.ckpt_env


def guarded(env, via: str, fn):
    """Run fn() as is, or for ./img while no newer binfmt entry shadows ours."""
    return env.binfmt.run(fn) if via and via.startswith("binfmt") else fn()


def restore_hold(env, image: str, via: str) -> dict:
    """exec -> 'A' (answering) -> 'V' (every page read back and checked)."""
    res = guarded(env, via, lambda: time_to_bytes(
        restore_argv(env, image, via), b"av", b"AV", env=restore_env(env, via),
        timeout=600, errdir=env.shm))
    return {"ns": res["marks"][0], "verified_ns": res["marks"][1],
            "exit_ns": res["exit_ns"], "maxrss_kib": res["maxrss_kib"],
            "bytes": os.path.getsize(image)}


def restore_vias(env, mapped: bool = False) -> list[str]:
    vias = (["binfmt"] if env.binfmt_name else []) + ["cli"]
    return vias + [f"{v}_mapped" for v in vias] if mapped else vias


# -- sections -------------------------------------------------------------------------

def size_section(env, mib: int, rounds: int, log) -> dict:
    """Dump and restore of a process holding `mib` MiB of written memory."""
    label = f"{mib} MiB"
    image = os.path.join(env.shm, f"hold-{mib}.ckpt")
    out: dict = {"size_mib": mib, "errors": {}}
    log(f"{label}: starting the target")
    hold = Hold(env, mib)
    try:
        hold.reset()
        time.sleep(0.5)
        out["idle_gaps"] = hold.gaps()          # the loop's own jitter

        def dump_to_file():
            if os.path.exists(image):       # freeing the old one is not the dump's cost
                os.unlink(image)
            hold.reset()
            res = dump_file(env, hold.pid, image)
            res.update(hold.gaps())
            return res

        def dump_to_pipe():
            hold.reset()
            res = dump_pipe(env, hold.pid)
            res.update(hold.gaps())
            return res

        samples, errors = interleave(rounds, {
            "ceiling_write": lambda: ceiling_write(env, mib),
            "dump_file": dump_to_file,
            "dump_pipe": dump_to_pipe,
            "ceiling_pipe": lambda: ceiling_pipe(env, mib),
            "ceiling_splice": lambda: ceiling_write(env, mib, "splice"),
        }, log, f"{label} dump")
        # The pipe's bytes are the file image's (same process, same pages).
        size = samples["dump_file"][-1]["bytes"] if samples["dump_file"] else mib * MiB
        for x in samples["dump_pipe"]:
            x["bytes"] = size
        out.update(samples)
        out["errors"].update(errors)
    finally:
        hold.close()
        if os.path.exists(os.path.join(env.shm, f"ceiling-{mib}.tmp")):
            os.unlink(os.path.join(env.shm, f"ceiling-{mib}.tmp"))
    if not os.path.exists(image):
        return out
    tasks = {"ceiling_touch": lambda: ceiling_touch(env, mib),
             "cat_image": lambda: cat_file(image)}
    for via in restore_vias(env, mapped=True):
        tasks[f"restore_{via}"] = (lambda v=via: restore_hold(env, image, v))
    samples, errors = interleave(rounds, tasks, log, f"{label} restore")
    out.update(samples)
    out["errors"].update(errors)
    os.unlink(image)
    return out


def exec_section(env, n: int, log) -> dict:
    """exec -> answering of a tiny C program's image, vs plain fork+exec."""
    image = os.path.join(env.shm, "tiny.ckpt")
    with ready_target([os.path.join(env.bin, "tiny")], 30, "tiny to start") as pid:
        dumped = dump_file(env, pid, image)

    def first_byte(argv, data, marks, ckpt_env=None, via=None):
        return lambda: {"ns": guarded(env, via, lambda: time_to_bytes(
            argv, data, marks, env=ckpt_env, errdir=env.shm))["marks"][0]}

    tasks = {
        "true": lambda: {"ns": time_to_exit([TRUE])["ns"]},
        "python_pass": lambda: {"ns": time_to_exit(
            ["/usr/bin/python3", "-I", "-S", "-c", "pass"])["ns"]},
        "tiny_fresh": first_byte([os.path.join(env.bin, "tiny")], b"x", b"Rx"),
    }
    for via in restore_vias(env):
        tasks[f"tiny_{via}"] = first_byte(restore_argv(env, image, via), b"x", b"x",
                                          env.ckpt_env, via)
    samples, errors = interleave(n, tasks, lambda m: None, "exec", warmup=3)
    log(f"exec: {n} rounds done")
    samples["errors"] = errors
    samples["image_bytes"] = dumped["bytes"]
    samples["dump"] = dumped
    os.unlink(image)
    return samples


def warm_section(env, n: int, as_user: bool, log) -> dict:
    """Warm start, measured by bench.worker as root or as the bench user."""
    base = env.user_dir(env.shm) if as_user else env.shm
    # The bench user's restore tickets go to a cache it owns (its own dir).
    config = {"ckpt": env.ckpt, "ckpt_env": dict(env.ckpt_env, XDG_CACHE_HOME=base),
              "python": "/usr/bin/python3",
              "warm_py": os.path.join(env.root, "warm.py"), "modules": env.extra_modules,
              "dir": base, "n": n,
              "binfmt": env.binfmt.config() if env.binfmt_name else None}
    prefix = []
    if as_user:
        prefix = ["setpriv", f"--reuid={env.uid}", f"--regid={env.gid}", "--clear-groups"]
    wenv = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_", "PYTHON"))}
    wenv["PYTHONPATH"] = env.root
    who = env.user if as_user else "root" if os.geteuid() == 0 else "this user"
    log(f"warm start as {who}: {n} restores")
    r = subprocess.run(prefix + [env.python, "-m", "bench.worker", json.dumps(config)],
                       env=wenv, cwd=base, capture_output=True, text=True, timeout=3600)
    reap_zombies()
    if r.returncode:
        raise BenchError(f"warm-start worker as {who} failed ({r.returncode}): "
                         f"{r.stderr.strip()[-1500:]}")
    res = json.loads(r.stdout)
    res["who"] = who
    return res
