"""Warm start, measured in a process of its own (as root or as the bench user).

    python -m bench.worker CONFIG_JSON      (run by bench.sections.warm_section)

Starts the warm target (bench/programs/warm.py under Debian's python: a
heavy stack of imports, then 'R' and an echo loop), dumps it with `ckpt
dump`, kills it, then times from one image, interleaved:
  binfmt  ./warm.ckpt (exec of the image itself), every round (n rounds)
  binfmt_mapped  CKPT_MAPPED=1 ./warm.ckpt (mapped restore), every round
  cli     `ckpt restore warm.ckpt`, every 4th round
  cold    the same python started fresh, every 4th round
(without a binfmt entry: cli and cli_mapped, `ckpt restore --mapped`, every
round)
each from exec to the program answering (first byte). Prints JSON on stdout.
Standard library and bench.proc only (it runs from a world-readable copy).
"""
from __future__ import annotations

import json
import os
import sys

from .proc import (BenchError, BinfmtWatch, become_subreaper, cloexec_inherited_fds,
                   ready_target, reap_zombies, time_to_bytes, time_to_exit)

SIDE_EVERY = 4


def main() -> None:
    cfg = json.loads(sys.argv[1])
    become_subreaper()
    cloexec_inherited_fds()
    d = cfg["dir"]
    image = os.path.join(d, "warm.ckpt")
    target = [cfg["python"], "-I", cfg["warm_py"], *cfg["modules"]]
    out: dict = {"modules": cfg["modules"], "errors": {}, "cold": [], "binfmt": [], "cli": [],
                 "binfmt_mapped": [], "cli_mapped": []}

    with ready_target(target, 120, "the warm target to import its modules") as pid:
        res = time_to_exit(cfg["ckpt"] + ["dump", str(pid), "-o", image],
                           env=cfg["ckpt_env"], timeout=300, errdir=d)
        out["dump"] = {"ns": res["ns"], "maxrss_kib": res["maxrss_kib"]}
        with open(f"/proc/{pid}/status") as f:
            out["target_rss_kib"] = next(int(ln.split()[1]) for ln in f
                                         if ln.startswith("VmRSS:"))
    out["image_bytes"] = os.path.getsize(image)

    runs = {
        "cold": lambda: time_to_bytes(target, b"x", b"Rx", errdir=d),
        "cli": lambda: time_to_bytes(cfg["ckpt"] + ["restore", image], b"x", b"x",
                                     env=cfg["ckpt_env"], errdir=d),
    }
    if cfg["binfmt"]:
        watch = BinfmtWatch(**cfg["binfmt"])
        mapped_env = dict(cfg["ckpt_env"], CKPT_MAPPED="1")
        runs["binfmt"] = lambda: watch.run(lambda: time_to_bytes(
            [image], b"x", b"x", env=cfg["ckpt_env"], errdir=d))
        runs["binfmt_mapped"] = lambda: watch.run(lambda: time_to_bytes(
            [image], b"x", b"x", env=mapped_env, errdir=d))
    else:
        runs["cli_mapped"] = lambda: time_to_bytes(
            cfg["ckpt"] + ["restore", "--mapped", image], b"x", b"x",
            env=cfg["ckpt_env"], errdir=d)
    n = cfg["n"]
    names = list(runs)
    for r in range(-1, n):                  # round -1: warm-up, not counted
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name in out["errors"]:
                continue
            if name in ("cli", "cold") and r >= 0 and r % SIDE_EVERY and cfg["binfmt"]:
                continue
            try:
                res = runs[name]()
            except BenchError as e:
                out["errors"][name] = str(e)
                continue
            if r >= 0:
                out[name].append(res["marks"][0])
        reap_zombies()
    os.unlink(image)
    if cfg["binfmt"]:
        out["binfmt_watch"] = watch.state()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
