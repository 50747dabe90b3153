"""From raw samples to figures: min and median, ratios to the ceilings
measured in the same run, the issue #7 targets, and the printed table.

Conventions: GB/s is 10^9 bytes per second. A ckpt rate uses the image's
bytes (what was written or read); a ceiling's rate uses the target's
memory size. "best" ratios compare min with min, "median" ratios median
with median. Speedups (x faster) are ceiling time / ckpt time.
"""
from __future__ import annotations

import statistics

MiB = 1 << 20


def _ns(samples, key="ns"):
    return [s[key] for s in samples if key in s]


def _stat(values):
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values),
            "max": max(values), "n": len(values)}


def _rate(samples):
    """GB/s at the min time and at the median time."""
    if not samples:
        return None
    ns = sorted(s["ns"] for s in samples)
    b = samples[0]["bytes"]
    return {"best": b / ns[0], "median": b / statistics.median(ns)}


def _ratio(a, b):
    """a/b for best and median (either may be None)."""
    if not a or not b:
        return None
    return {"best": a["best"] / b["best"], "median": a["median"] / b["median"]}


def _speedup(ceiling, ours):
    """How many times faster than the ceiling (ceiling time / our time)."""
    if not ceiling or not ours:
        return None
    return {"best": ceiling["min"] / ours["min"], "median": ceiling["median"] / ours["median"]}


WARM = ("cold", "binfmt", "cli", "binfmt_mapped", "cli_mapped")
RESTORES = ("restore_binfmt", "restore_cli", "restore_binfmt_mapped", "restore_cli_mapped")


def summarize(result: dict) -> tuple[dict, list[dict]]:
    summary: dict = {"sizes": []}
    targets: list[dict] = []
    for s in result.get("sizes", []):
        mib = s["size_mib"]
        row: dict = {"size_mib": mib}
        for k in ("ceiling_write", "ceiling_pipe", "ceiling_splice", "dump_file",
                  "dump_pipe", "ceiling_touch", "cat_image") + RESTORES:
            samples = s.get(k) or []
            row[k] = {"ns": _stat(_ns(samples)), "gbps": _rate(samples)}
        for k in ("ceiling_splice", "dump_file", "dump_pipe"):
            row[k]["vs_ceiling_write"] = _ratio(row[k]["gbps"], row["ceiling_write"]["gbps"])
        for k in ("dump_file", "dump_pipe"):
            samples = s.get(k) or []
            row[k]["max_gap_ns"] = _stat(_ns(samples, "max_gap_ns"))
            row[k]["stall_ns"] = _stat(_ns(samples, "stall_ns"))
            row[k]["stopped_share"] = _stat([x["max_gap_ns"] / x["ns"] for x in samples
                                             if "max_gap_ns" in x])
            row[k]["maxrss_kib"] = max((x["maxrss_kib"] for x in samples), default=None)
        for k in RESTORES:
            samples = s.get(k) or []
            row[k]["verified_ns"] = _stat(_ns(samples, "verified_ns"))
            row[k]["vs_touch"] = _speedup(row["ceiling_touch"]["ns"], row[k]["ns"])
            row[k]["vs_cat"] = _speedup(row["cat_image"]["ns"], row[k]["ns"])
        row["idle_max_gap_ns"] = (s.get("idle_gaps") or {}).get("max_gap_ns")
        summary["sizes"].append(row)

        d = row["dump_file"]
        if d["vs_ceiling_write"]:
            targets.append(_target(f"dump {mib} MiB to tmpfs vs tmpfs-write ceiling",
                                   d["vs_ceiling_write"]["median"], ">=", 1.1, "x",
                                   best=d["vs_ceiling_write"]["best"]))
        if d["stopped_share"] and mib >= 1024:
            targets.append(_target(f"target stopped, share of the {mib} MiB dump",
                                   d["stopped_share"]["median"] * 100, "<=", 5, "%",
                                   best=d["stopped_share"]["min"] * 100))
        rss = [row[k]["maxrss_kib"] for k in ("dump_file", "dump_pipe")
               if row[k].get("maxrss_kib")]
        if rss:
            targets.append(_target(f"dumper peak RSS, {mib} MiB", max(rss) / 1024, "<=",
                                   64, " MiB"))
        # Only a mapped restore can meet these: read them from its row.
        r = (row["restore_binfmt_mapped"] if row["restore_binfmt_mapped"]["ns"]
             else row["restore_cli_mapped"])
        if r["ns"] and mib >= 1024:
            targets.append(_target(f"mapped restore {mib} MiB until answering vs touching",
                                   r["vs_touch"]["median"], ">=", 1.2, "x",
                                   best=r["vs_touch"]["best"]))
            targets.append(_target(f"mapped restore {mib} MiB to running",
                                   r["ns"]["median"] / 1e6, "<=", 50, " ms",
                                   best=r["ns"]["min"] / 1e6))

    ex = result.get("exec")
    if ex:
        e = {k: _stat(_ns(v)) for k, v in ex.items() if isinstance(v, list)}
        summary["exec"] = e
        tiny = e.get("tiny_binfmt") or e.get("tiny_cli")
        via = "./app.ckpt" if e.get("tiny_binfmt") else "ckpt restore"
        if tiny:
            targets.append(_target(f"tiny image {via} exec -> answering", tiny["median"] / 1e6,
                                   "<=", 6, " ms", best=tiny["min"] / 1e6))
            if e.get("true"):
                targets.append(_target(f"tiny image {via} vs fork+exec /bin/true",
                                       tiny["median"] / e["true"]["median"], "<=", 7.5, "x",
                                       best=tiny["min"] / e["true"]["min"]))

    summary["warm"] = {}
    for who, w in (result.get("warm") or {}).items():
        ws = {k: _stat(w.get(k) or []) for k in WARM}
        ws["image_bytes"] = w.get("image_bytes")
        ws["dump_ns"] = (w.get("dump") or {}).get("ns")
        ws["dump_maxrss_kib"] = (w.get("dump") or {}).get("maxrss_kib")
        for k in WARM[1:]:
            ws[f"{k}_speedup"] = _speedup(ws["cold"], ws[k])
        summary["warm"][who] = ws
        for kind, (a, b) in (("", ("binfmt", "cli")),
                             (", mapped", ("binfmt_mapped", "cli_mapped"))):
            sp = ws[f"{a}_speedup"] or ws[f"{b}_speedup"]
            if sp:
                targets.append(_target(f"warm-start python ({w.get('who', who)}{kind}) "
                                       "vs cold", sp["median"], ">=", 10, "x",
                                       best=sp["best"]))
    return summary, targets


def _target(name, value, op, goal, unit, best=None) -> dict:
    met = value >= goal if op == ">=" else value <= goal
    return {"name": name, "median": value, "best": best, "op": op, "goal": goal,
            "unit": unit, "met": met}


# -- printing --------------------------------------------------------------------------

def _ms(ns):
    return "-" if ns is None else f"{ns / 1e6:.1f}" if ns >= 1e7 else f"{ns / 1e6:.2f}"


def _x(r, fmt="{:.2f}x"):
    return "-" if not r else f"{fmt.format(r['best'])} / {fmt.format(r['median'])}"


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def table(result: dict) -> str:
    m = result["machine"]
    src = result["config"].get("ckpt_source", "HEAD")
    out = [f"ckpt bench -- {m['date']}  ckpt {m['ckpt_commit']}"
           + ((" + working tree changes" if m["ckpt_dirty"] else "") if src == "worktree"
              else f" (git {src})"),
           f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['mem_gib']} GiB, kernel {m['kernel']}, "
           f"{m['system_python']}, THP {m['thp']}, load {' '.join(m['loadavg_start'])}"]
    if m.get("busy"):
        out.append("busy during the run: " + ", ".join(
            f"{b['comm']} (pid {b['pid']}, {b['cpu']:.0%} CPU)" for b in m["busy"]))
    c = result["config"]
    out.append(f"rounds {c['rounds']} per size, n {c['n']}; times are min / median; "
               "GB/s = 1e9 B/s; ratios best / median")
    s = result["summary"]
    for row in s.get("sizes", []):
        mib = row["size_mib"]
        out.append(f"\n== {mib} MiB of written memory ==")
        rows = [["", "min ms", "median ms", "GB/s", "vs ceiling", "stopped ms",
                 "stopped %", "peak RSS"]]
        for key, label in (("ceiling_write", "ceiling: write(2) to tmpfs"),
                           ("ceiling_splice", "ceiling: vmsplice+splice to tmpfs"),
                           ("dump_file", "ckpt dump -o /dev/shm/x"),
                           ("dump_pipe", "ckpt dump -o - | cat"),
                           ("ceiling_pipe", "ceiling: write(2) to | cat")):
            d = row[key]
            if not d["ns"]:
                continue
            gap = d.get("max_gap_ns")
            share = d.get("stopped_share")
            rows.append([label, _ms(d["ns"]["min"]), _ms(d["ns"]["median"]),
                         _x(d["gbps"], "{:.2f}"), _x(d.get("vs_ceiling_write")),
                         f"{_ms(gap['min'])} / {_ms(gap['median'])}" if gap else "",
                         f"{share['min']:.0%} / {share['median']:.0%}" if share else "",
                         f"{d['maxrss_kib'] / 1024:.0f} MiB" if d.get("maxrss_kib") else ""])
        if len(rows) > 1:
            out.append(_grid(rows))
            if row.get("idle_max_gap_ns") is not None:
                out.append(f"(target's longest gap when not dumped: "
                           f"{_ms(row['idle_max_gap_ns'])} ms over 0.5 s)")
        rows = [["", "min ms", "median ms", "GB/s", "x touch", "x cat", "all read back ms"]]
        for key, label in (("ceiling_touch", "ceiling: touch fresh pages"),
                           ("cat_image", "ceiling: cat image >/dev/null"),
                           ("restore_binfmt", "./img (binfmt) -> answering"),
                           ("restore_cli", "ckpt restore img -> answering"),
                           ("restore_binfmt_mapped", "./img mapped -> answering"),
                           ("restore_cli_mapped", "ckpt restore --mapped")):
            d = row[key]
            if not d["ns"]:
                continue
            v = d.get("verified_ns")
            rows.append([label, _ms(d["ns"]["min"]), _ms(d["ns"]["median"]),
                         _x(d["gbps"], "{:.2f}"), _x(d.get("vs_touch")), _x(d.get("vs_cat")),
                         f"{_ms(v['min'])} / {_ms(v['median'])}" if v else ""])
        if len(rows) > 1:
            out.append(_grid(rows))
    ex = s.get("exec")
    if ex:
        out.append(f"\n== exec -> running (n {c['n']}) ==")
        rows = [["", "min ms", "median ms", "x /bin/true (median)"]]
        base = ex.get("true")
        for key, label in (("true", "fork+exec /bin/true (to exit)"),
                           ("python_pass", "python3 -I -S -c pass (to exit)"),
                           ("tiny_fresh", "tiny C program (to first byte)"),
                           ("tiny_binfmt", "./tiny.ckpt -> answering"),
                           ("tiny_cli", "ckpt restore tiny.ckpt -> answering")):
            d = ex.get(key)
            if d:
                rows.append([label, _ms(d["min"]), _ms(d["median"]),
                             f"{d['median'] / base['median']:.1f}x" if base else ""])
        out.append(_grid(rows))
    for who, w in s.get("warm", {}).items():
        raw = result["warm"][who]
        out.append(f"\n== warm start: python with {len(raw.get('modules', []))} large "
                   f"packages + stdlib stack, as {raw.get('who', who)} ==")
        rows = [["", "min ms", "median ms", "n", "x faster than cold (best / median)"]]
        for key, label in (("cold", "cold start -> answering"),
                           ("binfmt", "./warm.ckpt -> answering"),
                           ("cli", "ckpt restore warm.ckpt -> answering"),
                           ("binfmt_mapped", "CKPT_MAPPED=1 ./warm.ckpt"),
                           ("cli_mapped", "ckpt restore --mapped warm.ckpt")):
            d = w.get(key)
            if d:
                rows.append([label, _ms(d["min"]), _ms(d["median"]), str(d["n"]),
                             _x(w.get(f"{key}_speedup"), "{:.1f}x") if key != "cold" else ""])
        out.append(_grid(rows))
        if w.get("image_bytes"):
            out.append(f"(image {w['image_bytes'] / MiB:.1f} MiB, dumped in "
                       f"{_ms(w['dump_ns'])} ms, dumper peak RSS "
                       f"{w['dump_maxrss_kib'] / 1024:.0f} MiB)")
    if result.get("targets"):
        out.append("\n== issue #7 targets (median; best in brackets) ==")
        rows = [["", "measured", "goal", ""]]
        for t in result["targets"]:
            best = f" [{t['best']:.2f}]" if t.get("best") is not None else ""
            rows.append([t["name"], f"{t['median']:.2f}{t['unit']}{best}",
                         f"{t['op']} {t['goal']}{t['unit']}", "met" if t["met"] else "NOT MET"])
        out.append(_grid(rows))
    for n in result.get("notes", []):
        out.append(f"note: {n}")
    for row in result.get("sizes", []):
        for k, e in (row.get("errors") or {}).items():
            out.append(f"error ({row['size_mib']} MiB {k}): {e[:300]}")
    for k, e in ((result.get("exec") or {}).get("errors") or {}).items():
        out.append(f"error (exec {k}): {e[:300]}")
    for who, w in (result.get("warm") or {}).items():
        for k, e in (w.get("errors") or {}).items():
            out.append(f"error (warm {who} {k}): {e[:300]}")
    return "\n".join(out)
