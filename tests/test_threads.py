"""Threads and the state glibc and the kernel keep per thread: dump -> kill
-> restore; each program must finish as an uninterrupted run does.

The restored process runs under the restore command's pid; its other
threads get their saved ids back when the caller may ask for them (clone3
set_tid: root here) and new ids otherwise. Either way glibc's cached ids
(struct pthread.tid) must name the threads as they are now.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import (CKPT_ENV, ckpt, dump, inspect_json, read_lines, restore,
                      restore_popen, wait_lines)


def restore_env(image, *, new_tids: bool = False, timeout: float = 60):
    """`ckpt restore IMAGE`; new_tids: ask for new thread ids (CKPT_NEW_TIDS)."""
    env = dict(CKPT_ENV, CKPT_NEW_TIDS="1") if new_tids else None
    return ckpt("restore", str(image), timeout=timeout, env=env)


def dumped(start, argv, ready_lines: int, image):
    """Start argv, wait for its first ready_lines lines of output, dump it
    to image and kill it: the image is all that is left of it."""
    target = start(argv)
    wait_lines(target.stdout_path, ready_lines, target=target)
    dump(target.pid, image)
    target.kill()
    return image


def test_main_thread_cached_tid(programs, start, tmp_path):
    """raise, pthread_kill(pthread_self()), pthread_getaffinity_np and the
    thread CPU clock of the main thread, whose id changed to the restore
    command's pid: glibc's cached tid (set_tid_address) was fixed."""
    prog = programs("tidcache")
    ref = start([prog, 3, 0], name="reference")
    assert ref.wait() == 41, ref.stdout()
    image = dumped(start, [prog, 40, 50], 2, tmp_path / "tidcache.ckpt")
    r = restore(image)
    assert r.stdout.splitlines()[-1] == "result 31", r
    assert r.returncode == 41, r


def test_dump_every_thread(programs, start, tmp_path):
    """All 9 threads are in the image (main first), each with its own
    registers, name and tid address; the target is undisturbed by the
    dump and finishes with the reference checksum. The producers run for
    1.2 s, so they are still there when a slow (loaded) dumper gets going."""
    prog = programs("threads8")
    ref = start([prog, 40, 30, 150], name="reference")
    ref_status = ref.wait()
    ref_sum = ref.stdout().splitlines()[-1]
    target = start([prog, 40, 30, 150])
    wait_lines(target.stdout_path, 6, target=target)
    image = tmp_path / "threads8.ckpt"
    dump(target.pid, image)
    assert target.wait() == ref_status
    assert target.stdout().splitlines()[-1] == ref_sum
    img = inspect_json(image)
    threads = img["threads"]
    assert len(threads) == 9
    assert threads[0]["tid"] == target.pid
    assert sorted(t["tid"] for t in threads[1:]) == [t["tid"] for t in threads[1:]]
    assert len({t["tid_address"] for t in threads}) == 9
    assert len({t["regs"]["rsp"] >> 16 for t in threads}) == 9
    assert all(t["comm"] == "threads8" for t in threads)
    text = ckpt("inspect", image).stdout
    assert "threads (9)" in text
    assert "in futex (restarts)" in text          # cond_wait, pthread_join
    assert "in clock_nanosleep (restarts)" in text    # the producers


def _threads8_reference(prog, start):
    ref = start([prog, 16, 30, 150], name="reference")
    status = ref.wait()
    return status, ref.stdout().splitlines()[-1]


@pytest.mark.parametrize("new_tids", [False, True], ids=["saved-tids", "new-tids"])
def test_threads8_restore(programs, start, tmp_path, new_tids):
    """8 pthreads (cond_wait, computing, nanosleep) and main in
    pthread_join: all come back and finish with the reference checksum,
    with their saved ids (root: clone3 set_tid) or with new ones."""
    prog = programs("threads8")
    ref_status, ref_sum = _threads8_reference(prog, start)
    image = dumped(start, [prog, 16, 30, 150], 8, tmp_path / "threads8.ckpt")
    r = restore_env(image, new_tids=new_tids)
    assert r.returncode == ref_status, r
    assert r.stdout.splitlines()[-1] == ref_sum, r
    assert r.stderr == ""


@pytest.mark.parametrize("new_tids", [False, True], ids=["saved-tids", "new-tids"])
def test_robust_mutex_held_at_dump(programs, start, tmp_path, new_tids):
    """The main thread holds robust mutex m1 (another thread waits for
    it), thread C holds m2 and exits holding it after the restore: unlock
    by its owner works and the kernel hands m2 over as EOWNERDEAD, also
    when the owners' ids changed (the owner ids in the mutexes are fixed).
    With new ids the waiter starts waiting after the restore: glibc keeps
    a waiting thread's id in a register and makes it the owner's id when
    it gets the mutex, which no fix-up can reach (robust.c)."""
    prog = programs("robust")
    late = ["late"] if new_tids else []
    ref = start([prog, 5, 10, *late], name="reference")
    assert ref.wait() == 41, ref.stdout()
    image = dumped(start, [prog, 40, 50, *late], 3, tmp_path / "robust.ckpt")
    r = restore_env(image, new_tids=new_tids)
    assert r.stdout.splitlines()[-1] == "result 31", r
    assert r.returncode == 41, r


@pytest.mark.parametrize("new_tids", [False, True], ids=["saved-tids", "new-tids"])
def test_pthread_kill_on_altstacks(programs, start, tmp_path, new_tids):
    """pthread_kill to each of 4 threads, handled on each thread's own
    sigaltstack, goes on after the restore; a thread's private pending
    SIGUSR2 and two queued process-wide SIGRTMIN+2 (blocked all along)
    arrive once unblocked, to the right thread, with their values."""
    prog = programs("sigalt")
    image = dumped(start, [prog, 30, 40], 4, tmp_path / "sigalt.ckpt")
    img = inspect_json(image)
    assert len(img["process"]["shared_pending"]) == 2
    assert len(img["threads"][1]["pending"]) == 1
    r = restore_env(image, new_tids=new_tids)
    assert r.stdout.splitlines()[-1] == "result OK", r
    assert r.returncode == 7, r



def test_same_image_restored_twice_at_once(programs, start, tmp_path):
    """Two restores of one image run side by side: the first to ask gets
    the saved thread ids, the other new ones (EEXIST); both finish right."""
    prog = programs("threads8")
    ref_status, ref_sum = _threads8_reference(prog, start)
    image = dumped(start, [prog, 16, 30, 150], 8, tmp_path / "twice.ckpt")
    procs = []
    for i in range(2):
        out, err = open(tmp_path / f"r{i}.out", "wb"), open(tmp_path / f"r{i}.err", "wb")
        procs.append((restore_popen(image, out, err), out, err))
    try:
        for i, (p, out, err) in enumerate(procs):
            status = p.wait(timeout=60)
            out.close(), err.close()
            text = (tmp_path / f"r{i}.out").read_text()
            assert status == ref_status, (status, text[-500:], (tmp_path / f"r{i}.err").read_text())
            assert text.splitlines()[-1] == ref_sum
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


POOL_SCRIPT = r"""
import sys, time, concurrent.futures as cf
pause = float(sys.argv[1])
def work(i):
    acc = 0
    for k in range(20000):
        acc = (acc * 31 + k * i) % 1000003
    time.sleep(pause)
    return acc
total = 0
with cf.ThreadPoolExecutor(4) as ex:
    futs = [ex.submit(work, i) for i in range(48)]
    for n, f in enumerate(futs):
        total = (total * 7 + f.result()) % (1 << 61)
        print("done", n, flush=True)
print("result", total, flush=True)
sys.exit(9)
"""


def test_python_thread_pool(start, tmp_path):
    """/usr/bin/python3 with a ThreadPoolExecutor of 4 workers (the GIL,
    queue locks, time.sleep) goes on to the same result."""
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no /usr/bin/python3")
    ref = start([python, "-I", "-c", POOL_SCRIPT, "0"], name="reference")
    assert ref.wait() == 9, ref.stderr()
    want = ref.stdout().splitlines()[-1]
    target = start([python, "-I", "-c", POOL_SCRIPT, "0.05"])
    wait_lines(target.stdout_path, 6, target=target)
    image = tmp_path / "pool.ckpt"
    dump(target.pid, image)
    assert len(inspect_json(image)["threads"]) == 5
    target.kill()
    r = restore(image)
    assert r.returncode == 9, r
    assert r.stdout.splitlines()[-1] == want
    assert r.stderr == ""


JAVA = r"""
public class Count {
    public static void main(String[] a) throws Exception {
        int n = Integer.parseInt(a[0]);
        long ms = Long.parseLong(a[1]);
        long acc = 1;
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < n; i++) {
            acc = acc * 6364136223846793005L + i;
            sb.append(i % 10);
            System.out.println("count " + i + " " + Long.toHexString(acc));
            Thread.sleep(ms);
        }
        System.gc();
        System.out.println("done " + Long.toHexString(acc) + " " + sb.length());
        System.exit(5);
    }
}
"""


def test_java_keeps_counting(start, tmp_path):
    """Debian's OpenJDK (~20 threads: GC, JIT compilers, signal
    dispatcher, ...) keeps counting after the restore."""
    java, javac = shutil.which("java"), shutil.which("javac")
    if not (java and javac):
        pytest.skip("no OpenJDK (apt-get install default-jdk-headless)")
    (tmp_path / "Count.java").write_text(JAVA)
    subprocess.run([javac, "Count.java"], cwd=tmp_path, check=True, timeout=120,
                   capture_output=True)
    argv = [java, "-XX:-UsePerfData", "-cp", str(tmp_path), "Count"]
    ref = start(argv + ["30", "0"], name="reference")
    assert ref.wait(60) == 5, ref.stderr()
    ref_lines = ref.stdout().splitlines()
    target = start(argv + ["30", "60"])
    before = len(wait_lines(target.stdout_path, 5, target=target))
    image = tmp_path / "java.ckpt"
    dump(target.pid, image)
    after = len(read_lines(target.stdout_path))
    assert len(inspect_json(image)["threads"]) >= 10
    target.kill()
    r = restore(image)
    assert r.returncode == 5, r
    got = r.stdout.splitlines()
    assert any(got == ref_lines[c:] for c in range(before, after + 1)), (got, ref_lines)


@pytest.mark.parametrize("new_tids", [False, True], ids=["saved-tids", "new-tids"])
def test_timer_create_sigrtmin(programs, start, tmp_path, new_tids):
    """timer_create timers come back with their ids (a gap at id 0 stays
    a gap), their signals, values and periods; one signals the process
    (SIGRTMIN), one a given thread (SIGEV_THREAD_ID)."""
    prog = programs("rtimer")
    ref = start([prog, 5, 3], name="reference")
    assert ref.wait() == 25, ref.stdout()
    image = dumped(start, [prog, 60, 40], 10, tmp_path / "rtimer.ckpt")
    timers = inspect_json(image)["process"]["timers"]
    assert [(t["id"], t["notify"]) for t in timers] == [(1, "signal"), (2, "thread")]
    r = restore_env(image, new_tids=new_tids, timeout=30)
    assert r.stdout.splitlines()[-1] == "result 15", r
    assert r.returncode == 25, r


def test_prctl_state(programs, start, tmp_path):
    """pdeathsig, dumpable, child subreaper, no_new_privs and a thread's
    own name, scheduling policy and nice value survive."""
    prog = programs("pstate")
    image = dumped(start, [prog, 40, 50], 2, tmp_path / "pstate.ckpt")
    r = restore(image)
    assert r.returncode == 12, r
    assert r.stdout.splitlines()[-1] == "state 12 0 1 1 worker-7 3 7", r


def test_seccomp_refused(programs, start, tmp_path):
    target = start([programs("seccomp")])
    wait_lines(target.stdout_path, 1, target=target)
    r = ckpt("dump", target.pid, "-o", tmp_path / "s.ckpt")
    assert r.returncode == 22, r
    assert "seccomp" in r.stderr and r.stderr.count("\n") == 1, r
    assert not (tmp_path / "s.ckpt").exists()
    assert target.alive() and target.state() not in ("t", "T")


def test_restore_in_user_namespace_gets_new_tids(programs, start, tmp_path):
    """In a user namespace (unshare -U -r) the caller may not choose
    thread ids in the machine's pid namespace: clone3 set_tid says EPERM
    and the threads come back under new ids, with glibc's cached ids fixed."""
    unshare = shutil.which("unshare")
    if not unshare:
        pytest.skip("no unshare(1)")
    prog = programs("threads8")
    ref_status, ref_sum = _threads8_reference(prog, start)
    image = dumped(start, [prog, 16, 30, 150], 8, tmp_path / "userns.ckpt")
    r = ckpt("restore", "--as-caller", image, prefix=[unshare, "-U", "-r"])
    assert r.returncode == ref_status, r
    assert r.stdout.splitlines()[-1] == ref_sum, r
