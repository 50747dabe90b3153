"""Mapped restore (issue #7): `ckpt restore --mapped` / CKPT_MAPPED=1 maps the
saved memory from the image (MAP_PRIVATE) instead of copying it.

Real programs dumped, killed and restored mapped: the memory arrives, the
heap, the stack and a fork work, the image is in /proc/PID/maps and not
among the fds, writes never reach the image; threads and python3 come
back; past vm.max_map_count the VMAs with the most runs are copied
instead; the guard refuses an image others could change; a required
signature still catches a tampered page. And a copied restore gets the
same memory as huge pages where the original had whole 2 MiB blocks,
without changing the VMA's flags.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import select
import signal
import subprocess
import sys

import pytest

from ckpt import sign
from ckpt.errors import Status
from ckpt.restore.planner import MAP_COUNT_RESERVE
from conftest import CKPT, CKPT_ENV, ROOT, ckpt, dump, read_lines, wait_lines
from test_dump_restore import PY_SCRIPT, suffix_start
from test_threads import _threads8_reference, dumped


def first_word() -> bytes:
    """mapmem's pattern(0, 1): the first word of its memory at the dump."""
    x = 0x9E3779B97F4A7C15
    return (x ^ (x >> 29) ^ 0x5555555555555555).to_bytes(8, "little")


class Talker:
    """A process we talk to one byte at a time through pipes."""

    def __init__(self, argv, env=None):
        self.p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  close_fds=True, start_new_session=True, cwd=ROOT,
                                  env=env or CKPT_ENV)

    def read1(self, timeout: float = 60) -> bytes:
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not ready:
            self.kill()
            pytest.fail(f"no answer from {self.p.args} in {timeout} s")
        b = os.read(self.p.stdout.fileno(), 1)
        if not b:
            err = self.p.stderr.read().decode(errors="replace")
            pytest.fail(f"{self.p.args} exited ({self.p.wait()}) without answering: {err}")
        return b

    def ask(self, cmd: bytes) -> bytes:
        os.write(self.p.stdin.fileno(), cmd)
        return self.read1()

    def finish(self) -> tuple[int, str]:
        self.p.stdin.close()
        try:
            rc = self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.p.args} did not exit at EOF")
        return rc, self.p.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.p.wait(timeout=30)


@pytest.fixture
def talkers():
    started: list[Talker] = []

    def _start(argv, env=None) -> Talker:
        t = Talker(argv, env)
        started.append(t)
        return t

    yield _start
    for t in started:
        t.kill()
        for f in (t.p.stdin, t.p.stdout, t.p.stderr):
            try:
                f.close()
            except OSError:
                pass


def mapmem_image(programs, talkers, image, size_mib: int, *extra: str):
    """Dump mapmem holding size_mib MiB (blocked reading its stdin), kill it."""
    target = talkers([programs("mapmem"), size_mib])
    assert target.read1() == b"R"
    dump(target.p.pid, image, *extra)
    target.kill()
    return image


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def mapped_bytes(pid: int, path) -> int:
    total = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip() == str(path):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                total += hi - lo
    return total


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


LAUNCHER = [sys.executable, "-c", "from ckpt.launcher import main; main()"]


@pytest.mark.parametrize("how", ["copy", "--mapped", "CKPT_MAPPED=1 launcher"])
def test_64mib_restored_mapped(programs, talkers, tmp_path, how):
    image = mapmem_image(programs, talkers, tmp_path / "mapmem.ckpt", 64)
    before = sha(image)
    if how == "copy":
        r = talkers(CKPT + ["restore", image])
    elif how == "--mapped":
        r = talkers(CKPT + ["restore", "--mapped", image])
    else:
        r = talkers(LAUNCHER + [image], env=dict(CKPT_ENV, CKPT_MAPPED="1"))
    mapped = how != "copy"
    assert r.ask(b"v") == b"V"
    # The saved memory is a private mapping of the image (64 MiB of it and
    # the heap); the image's fd itself was closed.
    from_image = mapped_bytes(r.p.pid, image)
    assert (from_image >= 65 << 20) if mapped else from_image == 0, from_image
    assert str(image) not in fd_targets(r.p.pid)
    # brk and the growsdown stack still grow; a fork sees the memory.
    assert r.ask(b"b") == b"B"
    assert r.ask(b"s") == b"S"
    assert r.ask(b"f") == b"F"
    # Writes are private: the image does not change.
    assert r.ask(b"w") == b"W"
    assert r.ask(b"v") == b"V"
    # The documented difference: MADV_DONTNEED brings back the image's
    # bytes in a mapped restore, zeros otherwise.
    assert r.ask(b"d") == (b"I" if mapped else b"Z")
    assert r.ask(b"v") == b"V"
    assert r.finish() == (0, "")
    assert sha(image) == before


def smaps_areas(pid: int) -> list[tuple[int, int, dict, set]]:
    """(start, end, {field: kB}, VmFlags) per VMA of /proc/PID/smaps."""
    areas = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                areas.append((lo, hi, {}, set()))
            elif head == "VmFlags:":
                areas[-1][3].update(line.split()[1:])
            elif line.split()[-1] == "kB":
                areas[-1][2][head.rstrip(":")] = int(line.split()[1])
    return areas


def test_copied_restore_fills_whole_blocks_as_huge_pages(programs, talkers, tmp_path):
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[never]" in thp:
        pytest.skip("transparent huge pages are off on this machine")
    target = talkers([programs("mapmem"), 64])
    assert target.read1() == b"R"
    area = max(smaps_areas(target.p.pid), key=lambda a: a[2].get("Anonymous", 0))
    assert area[2]["AnonHugePages"] == 0 and area[1] - area[0] >= 64 << 20, area
    image = tmp_path / "mapmem.ckpt"
    dump(target.p.pid, image)
    target.kill()
    r = talkers(CKPT + ["restore", image])
    assert r.ask(b"v") == b"V"
    # The 64 MiB area is back at its place, partly as huge pages (MADV_COLLAPSE
    # of the 2 MiB blocks it fills), with its saved flags: no hg, no nh.
    same = [a for a in smaps_areas(r.p.pid) if a[:2] == area[:2]]
    assert len(same) == 1, (area, same)
    fields, flags = same[0][2], same[0][3]
    assert fields["AnonHugePages"] >= 2048, fields
    assert fields["Rss"] == area[2]["Rss"], (fields, area)
    assert flags == area[3], (flags, area[3])
    # Huge pages behave as the small ones did: a DONTNEED'd page reads as
    # zeros, a fork sees the memory, writes stay private.
    assert r.ask(b"d") == b"Z"
    assert r.ask(b"f") == b"F"
    assert r.ask(b"w") == b"W"
    assert r.ask(b"v") == b"V"
    assert r.finish() == (0, "")


def test_threads8_restored_mapped(programs, start, tmp_path):
    prog = programs("threads8")
    ref_status, ref_sum = _threads8_reference(prog, start)
    image = dumped(start, [prog, 16, 30, 150], 8, tmp_path / "threads8.ckpt")
    r = ckpt("restore", "--mapped", image)
    assert r.returncode == ref_status, r
    assert r.stdout.splitlines()[-1] == ref_sum, r
    assert r.stderr == ""


def test_python3_restored_mapped(start, tmp_path):
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no /usr/bin/python3")
    ref = start([python, "-I", "-c", PY_SCRIPT, "0"], name="reference")
    assert ref.wait() == 6, ref.stderr()
    ref_lines = ref.stdout().splitlines()
    target = start([python, "-I", "-c", PY_SCRIPT, "0.04"])
    before = len(wait_lines(target.stdout_path, 8, target=target))
    image = tmp_path / "python.ckpt"
    dump(target.pid, image)
    after = len(read_lines(target.stdout_path))
    target.kill()
    r = ckpt("restore", "--mapped", image)
    assert r.returncode == 6, r
    suffix_start(ref_lines, r.stdout.splitlines(), before, after)
    assert r.stderr == ""


def maps_areas(pid: int) -> list[tuple[int, int, str]]:
    """(start, end, path or "") per line of /proc/PID/maps."""
    areas = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            areas.append((lo, hi, parts[5].strip() if len(parts) == 6 else ""))
    return areas


SPARSE_AREA = 1000 * 4096           # sparse.c: 1000 pages, 500 runs per area


def test_mapped_restore_copies_the_vmas_with_most_runs_past_max_map_count(
        programs, talkers, tmp_path):
    """Each mapped run splits its VMA: where mapping every run would pass
    vm.max_map_count (less MAP_COUNT_RESERVE for the program), the VMAs
    with the most runs are copied instead, just enough of them
    (planner._mapped_vmas). Without that the stub's mmap fails with
    ENOMEM past the point of no return. sparse's areas have 500 runs
    each; the heap and the rest have few."""
    max_maps = int(open("/proc/sys/vm/max_map_count").read())
    if max_maps > 131072:
        pytest.skip(f"vm.max_map_count is {max_maps}: passing it takes too much memory")
    chunks = max_maps // 1000 + 8       # ~8000 mappings more than allowed
    target = talkers([programs("sparse"), chunks])
    assert target.read1() == b"R"
    areas = [(lo, hi) for lo, hi, path in maps_areas(target.p.pid)
             if hi - lo == SPARSE_AREA and not path]
    assert len(areas) == chunks, areas
    image = tmp_path / "sparse.ckpt"
    dump(target.p.pid, image)
    target.kill()

    r = talkers(CKPT + ["restore", "--mapped", image])
    assert r.ask(b"v") == b"V"
    maps = maps_areas(r.p.pid)
    starts = [lo for lo, _, _ in maps]             # /proc/PID/maps is sorted
    in_area = {a: maps[bisect.bisect_left(starts, a[0]):bisect.bisect_left(starts, a[1])]
               for a in areas}
    copied = [a for a in areas if in_area[a] == [(*a, "")]]
    mapped = [a for a in areas if len(in_area[a]) > 1 and
              sum(path == str(image) for _, _, path in in_area[a]) == 500]
    assert len(copied) + len(mapped) == chunks, [in_area[a][:3] for a in areas
                                                 if a not in copied + mapped]
    # Some areas were copied (one anonymous VMA each, nothing from the
    # image), not all: the others and the rest of the saved memory (the
    # 1 MiB heap) are still mapped from the image.
    assert copied and mapped, (len(copied), len(mapped))
    rest = mapped_bytes(r.p.pid, image) - sum(
        hi - lo for a in mapped for lo, hi, path in in_area[a] if path == str(image))
    assert rest >= 1 << 20, rest
    # Just enough copied: the program keeps its reserve of mappings, and
    # mapping one more area (~1000 mappings) would have eaten into it.
    assert len(maps) <= max_maps - MAP_COUNT_RESERVE < len(maps) + 1000, len(maps)
    assert r.finish() == (0, "")


def test_a_vma_of_thousands_of_runs_dumps_and_restores(programs, talkers, tmp_path):
    """Areas of 6000 pages, every other one written: 3000 runs per VMA.
    Linux 6.18's PAGEMAP_SCAN reports a walk_end short of the regions it
    returned once a walk found more than 512 of them; the dumper must resume
    after the last region, not list those runs twice."""
    sparse = programs("sparse", out=tmp_path / "sparse6000", defines=["CHUNK=6000"])
    target = talkers([sparse, 2])
    assert target.read1() == b"R"
    image = tmp_path / "sparse.ckpt"
    dump(target.p.pid, image)
    target.kill()
    vmas = json.loads(ckpt("inspect", "--json", image).stdout)["vmas"]
    areas = [v for v in vmas if v["end"] - v["start"] == 6000 * 4096]
    assert [len(v["runs"]) for v in areas] == [3000, 3000], [len(v["runs"]) for v in areas]
    for how in (["restore"], ["restore", "--mapped"]):
        r = talkers(CKPT + how + [image])
        assert r.ask(b"v") == b"V", how
        assert r.finish() == (0, ""), how


def one_line(r, status: int) -> str:
    assert r.returncode == status, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: "), r
    return lines[0]


def test_guard_refuses_an_image_others_could_change(programs, talkers, tmp_path):
    image = mapmem_image(programs, talkers, tmp_path / "m.ckpt", 1)
    os.chmod(image, 0o664)
    msg = one_line(ckpt("restore", "--mapped", image), Status.USAGE)
    assert "only its owner can write (mode 0664)" in msg and "chmod go-w" in msg, msg
    v = ckpt("verify", "--mapped", image)          # verify says the same
    assert v.returncode == Status.USAGE and "(mode 0664)" in v.stderr, v
    assert ckpt("verify", image).returncode == 0   # a copied restore would go ahead
    os.chmod(image, 0o646)
    r = ckpt("restore", image, env=dict(CKPT_ENV, CKPT_MAPPED="1"))
    assert "(mode 0646)" in one_line(r, Status.USAGE)
    os.chmod(image, 0o644)
    os.chown(image, 65534, 65534)
    msg = one_line(ckpt("restore", "--mapped", image), Status.USAGE)
    assert "owned by you or root" in msg and "uid 65534" in msg, msg
    # Without --mapped the same image restores by copy (it answers 'V').
    r = talkers(CKPT + ["restore", image])
    assert r.ask(b"v") == b"V"


def test_guard_refuses_a_noexec_file_system(programs, talkers, tmp_path):
    """From a noexec mount the kernel refuses PROT_EXEC on the mappings
    (and the program's later mprotect to exec): refused before anything
    happens; a copying restore from there still works. The noexec tmpfs
    is mounted in a mount namespace of the restore's own."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
    image = mapmem_image(programs, talkers, tmp_path / "m.ckpt", 1)
    mnt = tmp_path / "noexec"
    mnt.mkdir()
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c",
              'mount -t tmpfs -o noexec,size=16m ckpt-test "$1" && cp "$2" "$1/" && '
              'shift 2 && exec "$@"', "sh", str(mnt), str(image)]
    r = ckpt("restore", "--mapped", mnt / "m.ckpt", prefix=prefix)
    assert "mounted without noexec" in one_line(r, Status.USAGE)
    r = ckpt("restore", mnt / "m.ckpt", prefix=prefix)    # stdin at EOF: exits 0
    assert (r.returncode, r.stderr) == (0, ""), r


def test_tampered_page_data(programs, talkers, tmp_path):
    """Mapped restore does not hash page data, unless a signature is
    required: then a changed page is caught as before."""
    priv, pub, _ = sign.keygen(str(tmp_path / "key"), comment="test")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'require_signature = true\ntrusted_keys = ["{pub}"]\n')
    signed = dict(CKPT_ENV, CKPT_POLICY=str(policy))
    image = mapmem_image(programs, talkers, tmp_path / "m.ckpt", 4, "--sign", priv)
    r = talkers(CKPT + ["restore", "--mapped", image], env=signed)
    assert r.ask(b"v") == b"V"
    r.kill()

    data = bytearray(image.read_bytes())
    at = data.find(first_word())
    assert at > 0 and at % 4096 == 0, at
    data[at + 800] ^= 1
    image.write_bytes(bytes(data))
    msg = one_line(ckpt("restore", "--mapped", image, env=signed), Status.CORRUPT_IMAGE)
    assert "page data checksum mismatch" in msg, msg
    one_line(ckpt("restore", image), Status.CORRUPT_IMAGE)
    # No policy: mapped restore trusts the page data to the file system.
    r = talkers(CKPT + ["restore", "--mapped", image])
    assert r.ask(b"v") == b"X"
