"""dump -> kill -9 -> restore, with real programs; each restored program must
finish exactly as an uninterrupted run does, and its exit status must reach
the caller.

Each target tells the test how far it got through a file it writes (its
stdout redirected to a file, or a file it holds open); the test waits for
that, dumps while the program is in the middle of its work, kills it,
restores the image as a subprocess and compares outputs, files and exit
status with a reference run of the same program.
"""
from __future__ import annotations

import os
import pathlib
import random
import re
import signal
import subprocess
import time

import pytest

from conftest import (CKPT, CKPT_ENV, ROOT, ckpt, dump, fd_pos, inspect_json, read_lines,
                      restore, restore_popen, wait_for, wait_lines)

PAGE = 4096
FILL_LINES = 16          # heap.c writes 16 "fill" lines before its rounds


def saved_pages(img: dict) -> int:
    return sum(r["count"] for v in img["vmas"] for r in v["runs"])


def suffix_start(ref: list[str], got: list[str], lo: int, hi: int) -> int:
    """The c in [lo, hi] with got == ref[c:], or fail showing both."""
    for c in range(lo, hi + 1):
        if got == ref[c:]:
            return c
    pytest.fail(f"restored output is not the reference's output from line {lo}..{hi} on:"
                f"\nrestored: {got[:5]} ... {got[-3:]}\nreference: {ref}")


def not_stopped(target) -> None:
    state = target.state()
    assert state not in ("t", "T"), f"target {target.pid} left in state {state}"


def kill_after_dump(target, may_finish_with: int | None = None) -> None:
    """The dump left the target running, not stopped; now it goes. A target
    that runs on during the dump may instead have finished its work, but
    then with the status an uninterrupted run gives (MAY_FINISH_WITH)."""
    if may_finish_with is not None and not target.alive():
        assert target.popen.returncode == may_finish_with, \
            f"the target ended with {target.popen.returncode} after the dump, " \
            f"not {may_finish_with}; stderr {target.stderr()!r}"
        return
    assert target.alive(), "the target must keep running after a dump"
    not_stopped(target)
    target.kill()


# --- 1. a C program with 256 MiB of heap and two open files -----------------------------

def run_heap(heap, dir: pathlib.Path, start, size_mib: int, rounds: int, sleep_ms: int = 0,
             name: str = "heap"):
    dir.mkdir(exist_ok=True)
    return start([heap, dir / "progress", dir / "append", size_mib, rounds, sleep_ms],
                 name=name)


def heap_reference(programs, start, dir: pathlib.Path, size_mib: int, rounds: int):
    """An uninterrupted run: (status, stdout, progress bytes, append bytes)."""
    ref = run_heap(programs("heap"), dir, start, size_mib, rounds, name="reference")
    status = ref.wait(120)
    out = ref.stdout()
    m = re.fullmatch(r"checksum ([0-9a-f]{16}) \S+\n", out)
    assert m, f"reference run printed {out!r}, stderr {ref.stderr()!r}"
    assert status == 20 + int(m.group(1), 16) % 200
    progress = (dir / "progress").read_bytes()
    assert (dir / "append").read_bytes() == progress
    assert len(progress.splitlines()) == FILL_LINES + rounds + 1
    return status, out, progress


def test_heap_256mib_checksum_and_file_offsets(programs, start, tmp_path):
    """256 MiB of heap filled with a pattern and stirred in rounds with a
    running checksum (integer and floating point state in registers); progress
    goes to fd 3 (plain: the offset must be restored) and fd 4 (O_APPEND)."""
    size, rounds = 256, 40
    ref_status, ref_out, ref_progress = heap_reference(programs, start, tmp_path / "ref",
                                                       size, rounds)

    run = tmp_path / "run"
    # The target runs on while its snapshot is dumped: 25 ms between rounds
    # keep it mid-work for a second or more even on a slow, busy machine.
    target = run_heap(programs("heap"), run, start, size, rounds, sleep_ms=25)
    wait_lines(run / "progress", FILL_LINES + 3, target=target)
    image = tmp_path / "heap.ckpt"
    dump(target.pid, image)
    kill_after_dump(target, may_finish_with=ref_status)
    append_at_kill = (run / "append").read_bytes()

    img = inspect_json(image)
    assert saved_pages(img) >= size * 256, "the heap's pages must be in the image"
    pos3, pos4 = fd_pos(image, 3), fd_pos(image, 4)
    fds = {d["fd"]: d for d in img["fds"]}
    assert "append" in fds[4]["flags"] and "append" not in fds[3]["flags"]
    assert 0 < pos3 < len(ref_progress) - 30, "the dump must land mid-work"

    r = restore(image, timeout=120)
    assert r.returncode == ref_status, r
    assert r.stdout == ref_out, r
    assert r.stderr == ""
    # fd 3 resumed at its saved offset: the file is exactly the reference's.
    assert (run / "progress").read_bytes() == ref_progress
    # fd 4 is O_APPEND: the restored program appends after what the original
    # wrote until it was killed.
    assert (run / "append").read_bytes() == append_at_kill + ref_progress[pos4:]


# --- 2. blocked in nanosleep; blocked in pause() ---------------------------------------

def test_nanosleep_loop(programs, start, tmp_path):
    nsleep = programs("nsleep")
    ref = start([nsleep, 12, 0], name="reference")
    assert ref.wait() == 3
    ref_lines = ref.stdout().splitlines()
    assert len(ref_lines) == 13 and ref_lines[-1].startswith("done ")

    target = start([nsleep, 12, 150])
    before = len(wait_lines(target.stdout_path, 3, target=target))
    image = tmp_path / "nsleep.ckpt"
    dump(target.pid, image)
    after = len(read_lines(target.stdout_path))
    kill_after_dump(target)

    regs = inspect_json(image)["threads"][0]["regs"]
    assert regs["rax"] == regs["orig_rax"] == 230, \
        "the dump should find it in clock_nanosleep, set up to restart"

    t0 = time.monotonic()
    r = restore(image)
    assert r.returncode == 3, r
    got = r.stdout.splitlines()
    c = suffix_start(ref_lines, got, before, after)
    assert c < 12, "the dump must land before the last tick"
    # It slept again: at least the remaining ticks' sleeps.
    assert time.monotonic() - t0 >= (12 - c) * 0.15 * 0.9


def test_pause_with_signal_handler(programs, start, tmp_path):
    """Blocked in pause() with a SIGUSR1 handler: the restored process is
    still in pause(), its handler is installed, and its counter kept."""
    target = start([programs("pausesig")])
    wait_lines(target.stdout_path, 1, target=target)
    os.kill(target.pid, signal.SIGUSR1)
    assert wait_lines(target.stdout_path, 2, target=target)[-1] == "count 1"
    wait_for(lambda: target.state() == "S", 10, "the target to sleep in pause()")
    image = tmp_path / "pause.ckpt"
    dump(target.pid, image)
    kill_after_dump(target)
    handlers = {a["signo"] for a in inspect_json(image)["process"]["sigactions"]}
    assert signal.SIGUSR1 in handlers

    out, err = tmp_path / "restored.stdout", tmp_path / "restored.stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        p = restore_popen(image, o, e)
    try:
        exe = str(programs("pausesig"))

        def restored() -> bool:
            # Once the program's own file is mapped the stub has blocked
            # signals; the launcher (python) would die of SIGUSR1.
            if p.poll() is not None:
                pytest.fail(f"restore exited {p.returncode}: {err.read_text()}")
            with open(f"/proc/{p.pid}/maps") as f:
                return exe in f.read()
        wait_for(restored, 30, "the restored process to map the program")
        wait_for(lambda: _state(p.pid) == "S", 10, "the restored process to sleep")
        time.sleep(0.1)
        # It is the program now, under the restore command's pid.
        assert pathlib.Path(f"/proc/{p.pid}/comm").read_text() == "pausesig\n"
        assert pathlib.Path(f"/proc/{p.pid}/cmdline").read_bytes() == exe.encode() + b"\0"
        assert p.poll() is None, "the restored process must stay in pause()"
        assert read_lines(out) == []
        deadline = time.monotonic() + 20
        while p.poll() is None and time.monotonic() < deadline:
            os.kill(p.pid, signal.SIGUSR1)
            time.sleep(0.1)
        status = p.wait(timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    lines = read_lines(out)
    assert status == 4, f"status {status}, stdout {lines}, stderr {err.read_text()}"
    assert lines[-1] == "done 3"
    counts = [int(x.split()[1]) for x in lines[:-1]]
    assert all(n == 2 for n in counts), f"the count must go on from 1: {lines}"


def test_pause_woken_by_itimer(programs, start, tmp_path):
    target = start([programs("pausesig"), "alarm"])
    wait_lines(target.stdout_path, 2, target=target)     # the first alarm came
    image = tmp_path / "alarm.ckpt"
    dump(target.pid, image)
    target.kill()
    r = restore(image, timeout=15)     # < 1 s more uninterrupted; without the itimer, forever
    assert r.returncode == 4, r
    assert r.stdout.splitlines()[-1] == "done 3"


def test_dump_to_a_pipe_restores(programs, start, tmp_path):
    """`ckpt dump PID -o -` streams the image to stdout (here a pipe into
    cat, which writes the file): the streamed image restores."""
    nsleep = programs("nsleep")
    ref = start([nsleep, 6, 0], name="reference")
    assert ref.wait() == 3
    ref_lines = ref.stdout().splitlines()
    target = start([nsleep, 6, 500])   # long enough to be dumped under load
    before = len(wait_lines(target.stdout_path, 2, target=target))
    image = tmp_path / "streamed.ckpt"
    with open(image, "wb") as out:
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=out, close_fds=True)
        d = subprocess.run(CKPT + ["dump", str(target.pid), "-o", "-"], stdout=cat.stdin,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, close_fds=True,
                           env=CKPT_ENV, cwd=ROOT, timeout=60)
        cat.stdin.close()
        assert cat.wait(timeout=30) == 0
    assert d.returncode == 0, d.stderr
    after = len(read_lines(target.stdout_path))
    target.kill()
    r = restore(image)
    assert r.returncode == 3, r
    suffix_start(ref_lines, r.stdout.splitlines(), before, after)


def test_compressed_image_streamed_signed_restored(programs, start, tmp_path):
    """`ckpt dump --compress zstd:1 -o -` streams a format 1.1 image whose
    page data is zstd chunks; it can be inspected, signed and verified,
    restores to the same result as an uninterrupted run, and is refused
    (status 2, one line) by a mapped restore."""
    from ckpt import sign
    size, rounds = 64, 20
    ref_status, ref_out, _ = heap_reference(programs, start, tmp_path / "ref", size, rounds)
    run = tmp_path / "run"
    target = run_heap(programs("heap"), run, start, size, rounds, sleep_ms=200)
    wait_lines(run / "progress", FILL_LINES + 3, target=target)
    image = tmp_path / "heap.ckpt"
    with open(image, "wb") as out:
        d = subprocess.run(CKPT + ["dump", str(target.pid), "-o", "-", "--compress", "zstd:1"],
                           stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                           close_fds=True, env=CKPT_ENV, cwd=ROOT, timeout=120)
    assert d.returncode == 0, d.stderr
    kill_after_dump(target)
    text = ckpt("inspect", image).stdout
    assert "format 1.1" in text and "stored zstd-compressed" in text, text
    r = ckpt("restore", "--mapped", image)
    assert r.returncode == 2 and "compressed image can't be mapped" in r.stderr, r
    assert len(r.stderr.splitlines()) == 1, r
    priv, pub, _ = sign.keygen(str(tmp_path / "key"))
    assert ckpt("sign", "--key", priv, image).returncode == 0
    v = ckpt("verify", "--key", pub, image)
    assert v.returncode == 0 and "a restore would go ahead" in v.stdout, v
    r = restore(image, timeout=120)
    assert r.returncode == ref_status, r
    assert r.stdout == ref_out, r


def test_compress_option_is_checked_before_the_target_is_touched(programs, start, tmp_path):
    target = start([programs("sleeper")])
    r = ckpt("dump", str(target.pid), "-o", tmp_path / "x.ckpt", "--compress", "lz4")
    assert r.returncode == 2 and "unknown compression 'lz4'" in r.stderr, r
    r = ckpt("dump", str(target.pid), "-o", tmp_path / "x.ckpt", "--compress", "zstd:99")
    assert r.returncode == 2 and "outside -7..19" in r.stderr, r
    assert not os.listdir(tmp_path) or "x.ckpt" not in os.listdir(tmp_path)
    not_stopped(target)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split()[1] for line in f if line.startswith("State:"))


# --- 3. a file mapped MAP_SHARED and one mapped MAP_PRIVATE, both written --------------

def test_shared_and_private_file_mappings(programs, start, tmp_path):
    rng = random.Random(3)
    initial_shared = rng.randbytes(8 * PAGE)
    initial_private = rng.randbytes(8 * PAGE)
    mapfile = programs("mapfile")

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    (ref_dir / "shared").write_bytes(initial_shared)
    (ref_dir / "private").write_bytes(initial_private)
    ref = start([mapfile, ref_dir / "shared", ref_dir / "private", 24, 0], name="reference")
    assert ref.wait() == 7, ref.stderr()
    ref_lines = ref.stdout().splitlines()
    ref_shared = (ref_dir / "shared").read_bytes()
    assert ref_shared != initial_shared
    assert (ref_dir / "private").read_bytes() == initial_private

    (tmp_path / "shared").write_bytes(initial_shared)
    (tmp_path / "private").write_bytes(initial_private)
    target = start([mapfile, tmp_path / "shared", tmp_path / "private", 24, 60])
    before = len(wait_lines(target.stdout_path, 6, target=target))
    image = tmp_path / "mapfile.ckpt"
    dump(target.pid, image)
    after = len(read_lines(target.stdout_path))
    # The original goes on writing the shared file (and so changes its
    # mtime) before it dies: a checkpoint is restored after the program ran
    # on; the restored one writes those steps again.
    wait_lines(target.stdout_path, after + 2, target=target)
    target.kill()

    img = inspect_json(image)
    by_name = {v["name"]: v for v in img["vmas"]}
    shared, private = by_name[str(tmp_path / "shared")], by_name[str(tmp_path / "private")]
    assert shared["shared"] and not shared["runs"], "shared file pages live in the file"
    assert not private["shared"] and private["runs"], "private COW pages are saved"

    r = restore(image)
    assert r.returncode == 7, r
    suffix_start(ref_lines, r.stdout.splitlines(), before, after)
    assert r.stdout.splitlines()[-1] == ref_lines[-1]
    assert (tmp_path / "shared").read_bytes() == ref_shared
    assert (tmp_path / "private").read_bytes() == initial_private


# --- 4. Debian's python3 holding state in dicts -----------------------------------------

PY_SCRIPT = r"""
import sys, time
pause = float(sys.argv[1])
state = {"primes": {}, "by_step": {}, "words": {}}
n = 2
for step in range(40):
    found = 0
    while found < 40:
        if all(n % p for p in state["primes"] if p * p <= n):
            state["primes"][n] = step
            found += 1
        n += 1
    state["by_step"][step] = sum(k for k, v in state["primes"].items() if v == step)
    state["words"]["w%d" % step] = {"len": len(state["primes"]), "tail": n}
    print("step", step, len(state["primes"]), state["by_step"][step], flush=True)
    time.sleep(pause)
total = sum(state["by_step"].values()) ^ sum(d["tail"] for d in state["words"].values())
print("result", total, max(state["primes"]), flush=True)
sys.exit(6)
"""


@pytest.mark.parametrize("flags", [["-I", "-S"], ["-I"]], ids=["-I -S", "-I"])
def test_python3_script(start, tmp_path, flags):
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no /usr/bin/python3")
    ref = start([python, *flags, "-c", PY_SCRIPT, "0"], name="reference")
    assert ref.wait() == 6, ref.stderr()
    ref_lines = ref.stdout().splitlines()
    assert len(ref_lines) == 41 and ref_lines[-1].startswith("result ")

    target = start([python, *flags, "-c", PY_SCRIPT, "0.04"])
    before = len(wait_lines(target.stdout_path, 8, target=target))
    image = tmp_path / "python.ckpt"
    dump(target.pid, image)
    after = len(read_lines(target.stdout_path))
    kill_after_dump(target)

    r = restore(image)
    assert r.returncode == 6, r
    c = suffix_start(ref_lines, r.stdout.splitlines(), before, after)
    assert c <= 40
    assert r.stderr == ""


# --- 5. a /bin/sh loop -------------------------------------------------------------------

SH_SCRIPT = r"""
exec 3>"$1"
i=0; acc=0
while [ $i -lt 30 ]; do
    j=0
    while [ $j -lt 12000 ]; do
        j=$((j + 1)); acc=$(( (acc * 31 + j) % 1000003 ))
    done
    i=$((i + 1))
    echo "$i $acc" >&3
done
echo "final $acc"
exit 5
"""


def sh_expected() -> tuple[list[str], str]:
    acc, lines = 0, []
    for i in range(1, 31):
        for j in range(1, 12001):
            acc = (acc * 31 + j) % 1000003
        lines.append(f"{i} {acc}")
    return lines, f"final {acc}"


def test_sh_loop(start, tmp_path):
    """dash running a busy arithmetic loop (no child process at any time),
    writing to fd 3 it opened with exec. The restore runs under a shell,
    which must see the loop's exit status."""
    expected, final = sh_expected()
    out = tmp_path / "loop.txt"
    target = start(["/bin/sh", "-c", SH_SCRIPT, "sh", out])
    wait_lines(out, 4, target=target)
    image = tmp_path / "sh.ckpt"
    dump(target.pid, image)
    target.kill()
    pos = fd_pos(image, 3)
    assert 0 < pos < len("\n".join(expected)) - 20, "the dump must land mid-loop"

    shell = subprocess.run(
        ["/bin/sh", "-c", '"$@"; echo "exit status $?"', "sh", *CKPT, "restore", str(image)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, close_fds=True,
        env=CKPT_ENV, cwd=ROOT, timeout=60)
    assert shell.returncode == 0, shell
    assert shell.stdout.splitlines() == [final, "exit status 5"], shell
    assert read_lines(out) == expected


# --- 6. the same process dumped twice ----------------------------------------------------

def test_dump_twice_both_restore(programs, start, tmp_path):
    size, rounds = 32, 30
    ref_status, ref_out, ref_progress = heap_reference(programs, start, tmp_path / "ref",
                                                       size, rounds)
    run = tmp_path / "run"
    target = run_heap(programs("heap"), run, start, size, rounds, sleep_ms=40)
    wait_lines(run / "progress", FILL_LINES + 3, target=target)
    first, second = tmp_path / "first.ckpt", tmp_path / "second.ckpt"
    dump(target.pid, first)
    wait_lines(run / "progress", FILL_LINES + 12, target=target)
    dump(target.pid, second)
    not_stopped(target)
    target.kill()
    append = (run / "append").read_bytes()
    pos1, pos2 = fd_pos(first, 3), fd_pos(second, 3)
    assert 0 < pos1 < pos2 < len(ref_progress)

    for image in (first, second):
        r = restore(image)
        assert r.returncode == ref_status, f"{image.name}: {r}"
        assert r.stdout == ref_out
        assert (run / "progress").read_bytes() == ref_progress
        append += ref_progress[fd_pos(image, 4):]     # O_APPEND: after all before
        assert (run / "append").read_bytes() == append


# --- 8. ckpt inspect of a real image -----------------------------------------------------

def test_inspect_real_image(programs, start, tmp_path):
    sleeper = programs("sleeper")
    target = start([sleeper])
    wait_lines(target.stdout_path, 1, target=target)
    with open(f"/proc/{target.pid}/maps") as f:
        maps = [line.split() for line in f]
    image = tmp_path / "sleeper.ckpt"
    dump(target.pid, image)

    r = ckpt("inspect", image)
    assert r.returncode == 0, r
    assert "memory map" in r.stdout
    assert str(sleeper) in r.stdout and "[stack]" in r.stdout and "[vdso]" in r.stdout
    for m in maps:
        if m[-1] == "[vsyscall]":
            continue
        lo, hi = m[0].split("-")
        assert re.search(rf"\b{int(lo, 16):012x}-{int(hi, 16):012x} {m[1]}\b", r.stdout), \
            f"{m} missing from the text map:\n{r.stdout}"

    img = inspect_json(image)
    assert img["process"]["pid"] == target.pid
    assert img["process"]["exe"] == str(sleeper)
    assert img["threads"][0]["tid"] == target.pid
    got = [(v["start"], v["end"]) for v in img["vmas"]]
    want = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if m[-1] != "[vsyscall]"]
    assert got == want
    target.kill()
