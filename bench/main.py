"""`python -m bench`: measure ckpt against this machine's own ceilings.

Prints a table (stdout) and writes every raw sample as JSON. Progress goes
to stderr. Run from the repo root as root for the full set (binfmt entry,
non-root user); see bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time

from . import report, sections
from .env import REPO, SYSTEM_PYTHON, Env
from .proc import BenchError, become_subreaper, cloexec_inherited_fds, reap_zombies


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="256 MiB only, 3 rounds, 20 restores: a minute, for a first look")
    p.add_argument("--large", action="store_true", help="also 4 GiB (needs ~16 GiB free)")
    p.add_argument("--sizes", help="comma-separated MiB sizes (default 256,1024)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per size (default 5)")
    p.add_argument("-n", type=int, dest="n",
                   help="exec-latency rounds and warm-start restores (default 100)")
    p.add_argument("--only", help="comma-separated sections: size,exec,warm")
    p.add_argument("--no-user", action="store_true", help="skip the non-root user runs")
    p.add_argument("--json", metavar="PATH", help="where to write the JSON "
                   "(default bench/out/bench-DATE.json)")
    p.add_argument("--rev", default="HEAD",
                   help="measure ckpt as committed in this git revision (default HEAD)")
    p.add_argument("--worktree", action="store_true",
                   help="measure ckpt as in the working tree instead")
    p.add_argument("--keep", action="store_true", help="keep the scratch directories")
    a = p.parse_args(argv)
    sizes = [256] if a.quick else [256, 1024]
    if a.sizes:
        sizes = [int(x) for x in a.sizes.split(",") if x]
    if a.large and 4096 not in sizes:
        sizes.append(4096)
    a.size_list = sizes
    a.rounds = a.rounds or (3 if a.quick else 5)
    a.n = a.n or (20 if a.quick else 100)
    a.sections = set((a.only or "size,exec,warm").split(","))
    return a


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    become_subreaper()
    cloexec_inherited_fds()
    started = time.monotonic()
    result: dict = {"machine": machine_info(), "config": {
        "sizes_mib": args.size_list, "rounds": args.rounds, "n": args.n,
        "quick": args.quick, "sections": sorted(args.sections),
        "write_chunk_kib": sections.WRITE_CHUNK_KIB,
        "hold_period_us": sections.HOLD_PERIOD_US}, "notes": []}
    if result["machine"]["busy"]:
        log("other processes are using the CPU: "
            + ", ".join(f"{b['comm']} ({b['pid']}, {b['cpu']:.0%})"
                        for b in result["machine"]["busy"]))
    source = "worktree" if args.worktree else args.rev
    result["config"]["ckpt_source"] = source
    result["machine"]["ckpt_commit"] = _git("rev-parse", "--short", args.rev)
    log(f"setting up (ckpt from {REPO}, "
        f"{'working tree' if args.worktree else 'git ' + args.rev})")
    try:
        with Env(source=source, keep=args.keep, want_user=not args.no_user, log=log) as env:
            result["config"].update({"ckpt_python": env.python, "binfmt": env.binfmt_name,
                                     "user": env.user, "warm_modules": env.extra_modules,
                                     "scratch": [env.root, env.shm]})
            os.chdir(env.shm)           # the targets' cwd: restores chdir there
            run_sections(env, args, result)
            result["notes"] += env.notes
            if env.binfmt:
                result["config"]["binfmt_watch"] = env.binfmt.state()
    finally:
        reap_zombies()
    result["machine"]["loadavg_end"] = _read("/proc/loadavg").split()[:3]
    result["seconds"] = round(time.monotonic() - started, 1)
    path = args.json or os.path.join(
        REPO, "bench", "out",
        f"bench-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        result["summary"], result["targets"] = report.summarize(result)
        print(report.table(result))
    finally:                    # the raw samples are kept whatever happens
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {path} ({result['seconds']:.0f} s)")
    return 0


def run_sections(env: Env, args, result: dict) -> None:
    if "size" in args.sections:
        result["sizes"] = []
        for mib in args.size_list:
            try:
                result["sizes"].append(sections.size_section(env, mib, args.rounds, log))
            except BenchError as e:
                result["notes"].append(f"{mib} MiB: {e}")
                log(f"{mib} MiB failed: {e}")
    if "exec" in args.sections:
        try:
            result["exec"] = sections.exec_section(env, args.n, log)
        except BenchError as e:
            result["notes"].append(f"exec latency: {e}")
            log(f"exec latency failed: {e}")
    if "warm" in args.sections:
        result["warm"] = {}
        users = [False] + ([True] if env.user else [])
        for as_user in users:
            key = "user" if as_user else "root" if os.geteuid() == 0 else "self"
            try:
                result["warm"][key] = sections.warm_section(env, args.n, as_user, log)
            except BenchError as e:
                result["notes"].append(f"warm start ({key}): {e}")
                log(f"warm start ({key}) failed: {e}")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _git(*args: str) -> str:
    r = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def machine_info() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines()
                if ln.startswith("MemTotal:")), 0)
    py = subprocess.run([SYSTEM_PYTHON, "-V"], capture_output=True, text=True)
    return {
        "kernel": platform.release(), "machine": platform.machine(), "cpu": cpu,
        "cpus": os.cpu_count(), "mem_gib": round(mem / (1 << 20), 1),
        "system_python": py.stdout.strip(), "bench_python": sys.version.split()[0],
        "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled").strip(),
        "clocksource": _read("/sys/devices/system/clocksource/clocksource0/"
                             "current_clocksource").strip(),
        "ckpt_commit": _git("rev-parse", "--short", "HEAD"),
        "ckpt_dirty": bool(_git("status", "--porcelain", "ckpt", "restorer-stub")),
        "loadavg_start": _read("/proc/loadavg").split()[:3],
        "busy": busy_processes(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def busy_processes(interval: float = 0.5, threshold: float = 0.2) -> list[dict]:
    """Processes (not ours) using more than `threshold` of a CPU right now:
    they share the machine with the measurements."""
    def sample() -> dict:
        out = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                raw = _read(f"/proc/{name}/stat")
                comm = raw[raw.index("(") + 1:raw.rindex(")")]
                fields = raw[raw.rindex(")") + 2:].split()
                out[int(name)] = (comm, int(fields[11]) + int(fields[12]))
            except (ValueError, IndexError):
                continue
        return out
    hz = os.sysconf("SC_CLK_TCK")
    a = sample()
    time.sleep(interval)
    b = sample()
    busy = []
    for pid, (comm, ticks) in b.items():
        if pid in a and pid != os.getpid():
            share = (ticks - a[pid][1]) / hz / interval
            if share > threshold:
                busy.append({"pid": pid, "comm": comm, "cpu": round(share, 2)})
    return busy
