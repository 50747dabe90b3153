/*
 * The restorer stub: rebuilds the saved process in place from the plan
 * (plan.h). Runs after the point of no return: the launcher's memory is
 * gone from step 3 on, so every failure is reported with one line on fd 2
 * and exit_group(99) (util.c:fail), never a hang or a bare SIGSEGV.
 *
 * Steps (plan_header.stop_after_step numbers them; tests stop after any):
 *   0 check plan       magic, version, thread table (not a stop point)
 *   1 block signals    all but the synchronous fault signals, which go to
 *                      the stub's own handler (one line + exit 99)
 *   2 unregister rseq  the launcher's (glibc's) rseq area
 *   3 unmap launcher   everything below task_top but the stub and the vdso
 *   4 move vdso        [vvar][vvar_vclock][vdso] in one mremap, via park
 *   5 map memory       mmap every VMA, pread its runs (or map them from
 *                      the image: PR_MAP), mprotect, madvise
 *   6 set mm           prctl(PR_SET_MM, PR_SET_MM_MAP)
 *   7 install fds      close [3, fd_base), dup3 the plan's, close the rest
 *   8 process state    sigactions (not yet the fault signals), rlimits,
 *                      personality, umask, comm, pdeathsig, dumpable,
 *                      no_new_privs, child subreaper
 *   9 thread state     fs/gs base, tid address (+ glibc's cached tid),
 *                      robust list (+ owner ids in held mutexes),
 *                      altstack, rseq, the signal frame onto the target's
 *                      stack; then the other threads, each with clone3
 *                      (the saved id when allowed) on a stack in the stub
 *                      region, doing the same for itself; all wait until
 *                      every one is ready
 *  10 signals, timers fault-signal actions, block all, re-queue siginfo,
 *                      itimers, timer_create timers (same ids)
 *  11 hand over        release the threads; each does rt_sigreturn on its
 *                      frame (with the gadgets, the others leave through
 *                      the target's "syscall; ret" counting themselves
 *                      out, and the first munmaps the stub on its way)
 */
#include "plan.h"
#include "sys.h"
#include "util.h"

/* entry.S */
__attribute__((noreturn)) void handover_gadget(u64 frame_addr, u64 gadget,
					       u64 stub_start, u64 stub_len);
__attribute__((noreturn)) void handover_sigreturn(u64 sp);
__attribute__((noreturn)) void handover_thread_gadget(u64 frame_addr, u64 gadget,
						      u64 counter, u32 op);
long stub_clone3(void *args, ulong size, void (*fn)(u64), u64 arg);
void stub_sigreturn(void);

struct ksigaction {
	u64 handler, flags, restorer, mask;
};

struct kstack {                  /* stack_t */
	u64 sp;
	s32 flags;
	u32 pad;
	u64 size;
};

/* Synchronous faults: caught by the stub until step 10 installs the
   target's own actions for them. */
#define SIGILL  4
#define SIGBUS  7
#define SIGFPE  8
#define SIGKILL 9
#define SIGSEGV 11
#define SIGSTOP 19
#define SIGSYS  31
#define BIT(s) (1ULL << ((s) - 1))
#define FAULT_MASK (BIT(SIGILL) | BIT(SIGBUS) | BIT(SIGFPE) | BIT(SIGSEGV) | \
		    BIT(SIGSYS))

static const struct plan_header *P;

static const void *at(u64 off)
{
	return (const char *)P + off;
}

static void set_step(u32 n, const char *name)
{
	cur_step_no = n;
	cur_step = name;
}

static void step_done(void)
{
	if (P->stop_after_step && P->stop_after_step == cur_step_no)
		for (;;)
			sys1(__NR_exit_group, P->stop_status);
}

static void check(long r, const char *what, u64 addr)
{
	if (is_err(r))
		fail(what, addr, r);
}

static void on_fault(int sig, void *info, void *uc)
{
	(void)uc;
	fail_fault(sig, *(const u64 *)((const char *)info + 16)); /* si_addr */
}

/* 0 */
static void check_plan(void)
{
	set_step(0, "check plan");
	if (P->magic != PLAN_MAGIC)
		fail("bad plan magic", NOADDR, 0);
	if (P->version != PLAN_VERSION)
		fail_num("unsupported plan version", P->version, 0);
	if (P->nr_threads < 1 || (P->nr_threads > 1 && (!P->thread_area ||
	    P->thread_block < 8192 || P->thread_block % 4096)))
		fail_num("bad thread table; threads in plan:", P->nr_threads, 0);
}

/* 1 */
static void block_signals(void)
{
	u64 mask = ~FAULT_MASK;
	struct ksigaction sa;
	int sig;

	set_step(1, "block signals");
	check(sys4(__NR_rt_sigprocmask, SIG_SETMASK, (long)&mask, 0, 8),
	      "rt_sigprocmask", NOADDR);
	sa.handler = (u64)on_fault;
	sa.flags = SA_SIGINFO | SA_RESTORER;
	sa.restorer = (u64)stub_sigreturn;
	sa.mask = ~0ULL;
	for (sig = 1; sig <= 64; sig++)
		if (FAULT_MASK & BIT(sig))
			check(sys4(__NR_rt_sigaction, sig, (long)&sa, 0, 8),
			      "rt_sigaction (fault handler)", NOADDR);
	step_done();
}

/* 2 */
static void unregister_rseq(void)
{
	long r;

	set_step(2, "unregister rseq");
	if (P->cur_rseq_addr) {
		r = sys4(__NR_rseq, (long)P->cur_rseq_addr, P->cur_rseq_len,
			 RSEQ_FLAG_UNREGISTER, P->cur_rseq_sig);
		/* glibc registers 32 bytes although __rseq_size says 20. */
		if (r == -EINVAL && P->cur_rseq_len != 20)
			r = sys4(__NR_rseq, (long)P->cur_rseq_addr, 20,
				 RSEQ_FLAG_UNREGISTER, P->cur_rseq_sig);
		check(r, "rseq unregister", P->cur_rseq_addr);
	}
	step_done();
}

static void unmap(u64 from, u64 to)
{
	if (to > from)
		check(sys2(__NR_munmap, (long)from, (long)(to - from)),
		      "munmap", from);
}

/* 3 */
static void unmap_launcher(void)
{
	u64 a0 = P->stub_start, a1 = P->stub_start + P->stub_len;
	u64 b0 = P->vdso_cur, b1 = P->vdso_cur + P->vdso_len;
	u64 t;

	set_step(3, "unmap launcher");
	if (!P->vdso_len) {
		b0 = b1 = a1;
	} else if (b0 < a0) {
		t = a0; a0 = b0; b0 = t;
		t = a1; a1 = b1; b1 = t;
	}
	unmap(0, a0);
	unmap(a1, b0);
	unmap(b1, P->task_top);
	step_done();
}

/* 4 */
static void move_vdso(void)
{
	long r;

	set_step(4, "move vdso");
	if (P->vdso_dst && P->vdso_dst != P->vdso_cur) {
		/* Two moves, so a destination overlapping the current block is
		   fine; one mremap for the whole block (moving part of it breaks
		   the vdso). */
		r = sys5(__NR_mremap, (long)P->vdso_cur, (long)P->vdso_len,
			 (long)P->vdso_len, MREMAP_MAYMOVE | MREMAP_FIXED,
			 (long)P->vdso_park);
		check(r, "mremap to park", P->vdso_park);
		r = sys5(__NR_mremap, (long)P->vdso_park, (long)P->vdso_len,
			 (long)P->vdso_len, MREMAP_MAYMOVE | MREMAP_FIXED,
			 (long)P->vdso_dst);
		check(r, "mremap", P->vdso_dst);
	}
	step_done();
}

static void fill(const struct plan_run *run)
{
	u64 addr = run->addr, len = run->len, off = run->offset;
	long r;

	while (len) {
		r = sys4(__NR_pread64, (long)P->image_fd, (long)addr,
			 (long)(len > 0x40000000 ? 0x40000000 : len), (long)off);
		check(r, "pread page data", addr);
		if (r == 0)
			fail("truncated image: no page data", addr, 0);
		addr += r;
		off += r;
		len -= r;
	}
}

/*
 * Copying is bound by page faults on fresh memory, not by the copy: in a VM
 * each first touch of a 4 KiB page may also fault in the host. Two cheaper
 * ways to get the same pages, both pure optimisations (any error: pread
 * alone, as before):
 *  - MADV_POPULATE_WRITE allocates a run's pages in one call, without a
 *    fault per page during the pread (about 15-20% faster here);
 *  - in a private anonymous VMA, every 2 MiB block a run covers entirely
 *    (so the original had all 512 pages too: no extra memory) becomes one
 *    huge page with MADV_COLLAPSE, which unlike MADV_HUGEPAGE leaves the
 *    VMA's flags as saved. It needs one page in place first. Collapse may
 *    have to compact memory; when a call is slower than faulting the pages
 *    in would have been, the stub stops using it for this restore.
 */
#define HUGE       (2ULL << 20)
#define COLLAPSE_CHUNK  8               /* blocks per madvise call */
#define COLLAPSE_NS_PER_BLOCK 1000000   /* ~ 512 faults of 4 KiB here */
#define POPULATE_MIN    (64ULL << 10)

static int collapse_off;

static u64 now_ns(void)
{
	struct { s64 sec, nsec; } ts;

	if (sys2(__NR_clock_gettime, 1 /* CLOCK_MONOTONIC */, (long)&ts) < 0)
		return 0;
	return (u64)ts.sec * 1000000000ULL + (u64)ts.nsec;
}

static void read_page(const struct plan_run *run, u64 addr)
{
	long r = sys4(__NR_pread64, (long)P->image_fd, (long)addr, 4096,
		      (long)(run->offset + (addr - run->addr)));

	check(r, "pread page data", addr);
}

static void collapse_blocks(const struct plan_run *run)
{
	u64 lo = (run->addr + HUGE - 1) & ~(HUGE - 1);
	u64 hi = (run->addr + run->len) & ~(HUGE - 1);
	u64 a, b, n, t;
	long r;

	for (a = lo; a < hi && !collapse_off; a += n * HUGE) {
		n = (hi - a) / HUGE;
		if (n > COLLAPSE_CHUNK)
			n = COLLAPSE_CHUNK;
		for (b = 0; b < n; b++)
			read_page(run, a + b * HUGE);
		t = now_ns();
		r = sys3(__NR_madvise, (long)a, (long)(n * HUGE), MADV_COLLAPSE);
		if (r < 0 || now_ns() - t > n * COLLAPSE_NS_PER_BLOCK)
			collapse_off = 1;
	}
}

static void copy_run(const struct plan_vma *v, const struct plan_run *run)
{
	if ((v->flags & (PV_ANON | PV_SHARED | PV_GROWSDOWN)) == PV_ANON &&
	    !(v->advice & PA_NOHUGEPAGE) && !collapse_off)
		collapse_blocks(run);
	if (run->len >= POPULATE_MIN)   /* a small run: a syscall for nothing */
		sys3(__NR_madvise, (long)run->addr, (long)run->len,
		     MADV_POPULATE_WRITE);
	fill(run);
}

/* Mapped restore: the run's pages become a private mapping of the image
   (the VMA is already mapped: MAP_FIXED replaces that part of it). */
static void map_run(const struct plan_run *run, u32 prot)
{
	long r;

	r = sys6(__NR_mmap, (long)run->addr, (long)run->len, prot,
		 MAP_PRIVATE | MAP_FIXED, (long)P->image_fd, (long)run->offset);
	check(r, "mmap (page data from the image)", run->addr);
	if ((u64)r != run->addr)
		fail("mmap placed page data elsewhere", run->addr, 0);
}

static void advise(const struct plan_vma *v)
{
	static const struct { u32 bit, advice, hint; } tab[] = {
		{ PA_DONTFORK, MADV_DONTFORK, 0 },
		{ PA_DONTDUMP, MADV_DONTDUMP, 0 },
		{ PA_WIPEONFORK, MADV_WIPEONFORK, 0 },
		/* Pure hints: EINVAL means this kernel lacks THP/KSM; the
		   program runs the same without them. */
		{ PA_HUGEPAGE, MADV_HUGEPAGE, 1 },
		{ PA_NOHUGEPAGE, MADV_NOHUGEPAGE, 1 },
		{ PA_MERGEABLE, MADV_MERGEABLE, 1 },
	};
	unsigned i;
	long r;

	for (i = 0; i < sizeof(tab) / sizeof(tab[0]); i++) {
		if (!(v->advice & tab[i].bit))
			continue;
		r = sys3(__NR_madvise, (long)v->start, (long)(v->end - v->start),
			 tab[i].advice);
		if (r == -EINVAL && tab[i].hint)
			continue;
		check(r, "madvise", v->start);
	}
}

/* 5 */
static void map_memory(void)
{
	const struct plan_vma *vmas = at(P->vmas_off);
	const struct plan_run *runs = at(P->runs_off);
	u32 i, j;

	set_step(5, "map memory");
	for (i = 0; i < P->nr_vmas; i++) {
		const struct plan_vma *v = &vmas[i];
		const struct plan_run *vr = &runs[v->first_run];
		u32 prot = v->prot, flags = MAP_FIXED_NOREPLACE;
		int anon = v->flags & PV_ANON;
		long r;

		/* Writable while runs are copied in; mapped runs get the
		   final prot at once. */
		for (j = 0; j < v->nr_runs; j++)
			if (!(vr[j].flags & PR_MAP))
				prot |= PROT_WRITE;

		flags |= (v->flags & PV_SHARED) ? MAP_SHARED : MAP_PRIVATE;
		if (anon)
			flags |= MAP_ANONYMOUS;
		if (v->flags & PV_GROWSDOWN)
			flags |= MAP_GROWSDOWN;
		r = sys6(__NR_mmap, (long)v->start, (long)(v->end - v->start),
			 prot, flags, anon ? -1 : v->fd,
			 anon ? 0 : (long)v->offset);
		check(r, anon ? "mmap (anonymous)" : "mmap (file)", v->start);
		if ((u64)r != v->start)
			fail("mmap placed the mapping elsewhere", v->start, 0);
		for (j = 0; j < v->nr_runs; j++) {
			if (vr[j].flags & PR_MAP)
				map_run(&vr[j], v->prot);
			else
				copy_run(v, &vr[j]);
		}
		if (prot != v->prot)
			check(sys3(__NR_mprotect, (long)v->start,
				   (long)(v->end - v->start), v->prot),
			      "mprotect", v->start);
		advise(v);
	}
	step_done();
}

/* 6 */
static void set_mm(void)
{
	struct plan_mm mm = P->mm;

	set_step(6, "set mm");
	mm.auxv = (u64)P->auxv;
	check(sys5(__NR_prctl, PR_SET_MM, PR_SET_MM_MAP, (long)&mm,
		   sizeof(mm), 0), "prctl(PR_SET_MM_MAP)", NOADDR);
	step_done();
}

/* 7 */
static void install_fds(void)
{
	const struct plan_fd *fds = at(P->fds_off);
	u32 i;
	long r;

	set_step(7, "install fds");
	if (P->fd_base > 3)
		check(sys3(__NR_close_range, 3, P->fd_base - 1, 0),
		      "close_range below fd_base", NOADDR);
	for (i = 0; i < P->nr_fds; i++) {
		r = sys3(__NR_dup3, fds[i].src, fds[i].dst,
			 fds[i].cloexec ? O_CLOEXEC : 0);
		if (is_err(r))
			fail_num("dup3 to fd", (u64)fds[i].dst, r);
	}
	check(sys3(__NR_close_range, P->fd_base, ~0U, 0),
	      "close_range from fd_base", NOADDR);
	step_done();
}

/* 8 */
static void process_state(void)
{
	const struct plan_rlimit *rl = at(P->rlimits_off);
	u32 i;
	int sig;
	long r;

	set_step(8, "process state");
	for (sig = 1; sig <= 64; sig++) {
		if (sig == SIGKILL || sig == SIGSTOP || (FAULT_MASK & BIT(sig)))
			continue;
		r = sys4(__NR_rt_sigaction, sig, (long)&P->sigactions[sig - 1],
			 0, 8);
		if (is_err(r))
			fail_num("rt_sigaction for signal", (u64)sig, r);
	}
	for (i = 0; i < P->nr_rlimits; i++) {
		u64 lim[2] = { rl[i].cur, rl[i].max };

		r = sys4(__NR_prlimit64, 0, rl[i].resource, (long)lim, 0);
		if (is_err(r))
			fail_num("prlimit64 resource", rl[i].resource, r);
	}
	if (P->personality != ~0ULL)
		check(sys1(__NR_personality, (long)P->personality),
		      "personality", NOADDR);
	sys1(__NR_umask, P->umask);
	if (P->comm[0])
		check(sys2(__NR_prctl, PR_SET_NAME, (long)P->comm),
		      "prctl(PR_SET_NAME)", NOADDR);
	if (P->pdeathsig >= 0)
		check(sys2(__NR_prctl, PR_SET_PDEATHSIG, P->pdeathsig),
		      "prctl(PR_SET_PDEATHSIG)", NOADDR);
	if (P->dumpable >= 0)
		check(sys2(__NR_prctl, PR_SET_DUMPABLE, P->dumpable),
		      "prctl(PR_SET_DUMPABLE)", NOADDR);
	if (P->no_new_privs)
		check(sys5(__NR_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
		      "prctl(PR_SET_NO_NEW_PRIVS)", NOADDR);
	check(sys2(__NR_prctl, PR_SET_CHILD_SUBREAPER, P->child_subreaper),
	      "prctl(PR_SET_CHILD_SUBREAPER)", NOADDR);
	step_done();
}

static int gadget_ok(u64 addr, const char *bytes, ulong n)
{
	const struct plan_vma *vmas = at(P->vmas_off);
	u32 i;

	if (!addr)
		return 0;
	for (i = 0; i < P->nr_vmas; i++) {
		const struct plan_vma *v = &vmas[i];

		if (addr >= v->start && addr + n <= v->end)
			return (v->prot & (PROT_READ | PROT_EXEC)) ==
				(PROT_READ | PROT_EXEC) &&
			       memcmp((const void *)addr, bytes, n) == 0;
	}
	return 0;
}

static int use_gadgets;

/* Is [addr, addr + n) inside one of the plan's VMAs with these rights? */
static int mapped_with(u64 addr, u64 n, u32 prot)
{
	const struct plan_vma *vmas = at(P->vmas_off);
	u32 i;

	for (i = 0; i < P->nr_vmas; i++)
		if (addr >= vmas[i].start && addr + n <= vmas[i].end)
			return (vmas[i].prot & prot) == prot;
	return 0;
}

/* glibc caches each thread's id in its TCB (struct pthread.tid) and
   registers set_tid_address(&pd->tid): when the thread came back under
   another id, the u32 there still holding the saved id gets the new one
   (pthread_kill, pthread_getaffinity_np, ... of this thread use it). */
static void fix_cached_tid(const struct plan_thread *t, long new_tid)
{
	u32 *p = (u32 *)t->tid_address;

	if (!t->tid_address || (u64)new_tid == t->tid || t->tid_address % 4 ||
	    !mapped_with(t->tid_address, 4, PROT_READ | PROT_WRITE))
		return;
	if (*p == (u32)t->tid)
		*p = (u32)new_tid;
}

struct thread_rt {               /* at the start of each thread block */
	u32 tid;                     /* the id clone3 gave it */
};

struct clone_args {
	u64 flags, pidfd, child_tid, parent_tid, exit_signal;
	u64 stack, stack_size, tls, set_tid, set_tid_size, cgroup;
};

struct robust_list_head {
	u64 next;
	s64 futex_offset;
	u64 list_op_pending;
};

/* Shared by the threads while they are in the stub (futex words). */
static volatile u32 ready_count, go_flag, left_count;
static u32 new_tids_refused;     /* set_tid gave EPERM once: stop asking */

static const struct plan_thread *thread_at(u32 i)
{
	return (const struct plan_thread *)at(P->threads_off) + i;
}

static struct thread_rt *thread_rt(u32 i)
{
	return (struct thread_rt *)(P->thread_area + (u64)(i - 1) * P->thread_block);
}

static void futex_wait(volatile u32 *w, u32 val)
{
	sys4(__NR_futex, (long)w, FUTEX_WAIT | FUTEX_PRIVATE, val, 0);
}

static void futex_wake(volatile u32 *w)
{
	sys3(__NR_futex, (long)w, FUTEX_WAKE | FUTEX_PRIVATE, 0x7fffffff);
}

/* A robust (or PI) mutex owned by a thread that came back under another
   id holds the old id in its futex word: give it the new one, keeping the
   FUTEX_WAITERS/OWNER_DIED bits. glibc's own owner field (__owner, 8
   bytes after the futex word in its x86_64 layout, futex_offset -24)
   holds the id too. */
static void fix_owner(u64 lock, s64 futex_offset, u32 old, u32 new)
{
	volatile u32 *w = (volatile u32 *)lock;
	u32 v;

	if (lock % 4 || !mapped_with(lock, 4, PROT_READ | PROT_WRITE))
		return;
	v = *w;
	if ((v & FUTEX_TID_MASK) == old)
		*w = (v & ~FUTEX_TID_MASK) | new;
	if (futex_offset == -24 && mapped_with(lock + 8, 4, PROT_READ | PROT_WRITE) &&
	    *(volatile u32 *)(lock + 8) == old)
		*(volatile u32 *)(lock + 8) = new;
}

static void fix_robust_list(const struct plan_thread *t, u32 new)
{
	const struct robust_list_head *h = (const void *)t->robust_head;
	u64 e;
	u32 n;

	if (!t->robust_len || (u32)t->tid == new || t->robust_head % 8 ||
	    !mapped_with(t->robust_head, sizeof(*h), PROT_READ | PROT_WRITE))
		return;
	/* Entries are pointers with bit 0 = PI; the list ends at the head. */
	for (e = h->next & ~1ULL, n = 0; e != t->robust_head && n < 1 << 16; n++) {
		if (e % 8 || !mapped_with(e, 8, PROT_READ))
			break;
		fix_owner(e + h->futex_offset, h->futex_offset, (u32)t->tid, new);
		e = *(const u64 *)e & ~1ULL;
	}
	e = h->list_op_pending & ~1ULL;
	if (e)
		fix_owner(e + h->futex_offset, h->futex_offset, (u32)t->tid, new);
}

/* Everything a thread sets for itself, in that thread. */
static void setup_thread(const struct plan_thread *t, u32 new_tid)
{
	struct kstack ss;
	long r;

	check(sys2(__NR_arch_prctl, ARCH_SET_FS, (long)t->fs_base),
	      "arch_prctl(ARCH_SET_FS)", t->fs_base);
	check(sys2(__NR_arch_prctl, ARCH_SET_GS, (long)t->gs_base),
	      "arch_prctl(ARCH_SET_GS)", t->gs_base);
	sys1(__NR_set_tid_address, (long)t->tid_address);
	fix_cached_tid(t, new_tid);
	if (t->robust_len)
		check(sys2(__NR_set_robust_list, (long)t->robust_head,
			   (long)t->robust_len), "set_robust_list", t->robust_head);
	fix_robust_list(t, new_tid);
	if (t->altstack_flags & SS_DISABLE) {
		ss.sp = 0;
		ss.flags = SS_DISABLE;
		ss.size = 0;
	} else {
		ss.sp = t->altstack_sp;
		ss.flags = (s32)t->altstack_flags;
		ss.size = t->altstack_size;
	}
	ss.pad = 0;
	check(sys2(__NR_sigaltstack, (long)&ss, 0), "sigaltstack", ss.sp);
	if (t->rseq_addr) {
		r = sys4(__NR_rseq, (long)t->rseq_addr, t->rseq_len, 0,
			 t->rseq_sig);
		check(r, "rseq register", t->rseq_addr);
	}
	if (t->comm[0])
		check(sys2(__NR_prctl, PR_SET_NAME, (long)t->comm),
		      "prctl(PR_SET_NAME) of a thread", NOADDR);
	/* Where permitted: raising a priority needs CAP_SYS_NICE or room in
	   RLIMIT_NICE / RLIMIT_RTPRIO (restored in step 8); a refusal
	   leaves the caller's setting, it is not worth a failed restore. */
	if (t->sched_policy >= 0) {
		s32 prio = t->sched_priority;

		sys3(__NR_sched_setscheduler, 0, t->sched_policy, (long)&prio);
	}
	if (t->set_nice)
		sys3(__NR_setpriority, 0 /* PRIO_PROCESS */, 0, t->nice);
	memcpy((void *)t->frame_addr, at(t->frame_off), t->frame_len);
	if (use_gadgets)
		*(u64 *)t->frame_addr = P->gadget_sigreturn;  /* pretcode */
}

/* Re-queue the thread-private signals of thread index + 1 `thread`, in
   that thread: the kernel lets only the target itself queue a siginfo
   that says tkill/tgkill sent it (si_code SI_TKILL). Everything is
   blocked first; the final rt_sigreturn restores the thread's mask. */
static void queue_own_signals(u32 thread)
{
	const struct plan_siginfo *si = at(P->siginfo_off);
	u64 all = ~0ULL;
	long pid = sys0(__NR_getpid), tid = sys0(__NR_gettid), r;
	u32 i;

	check(sys4(__NR_rt_sigprocmask, SIG_SETMASK, (long)&all, 0, 8),
	      "rt_sigprocmask", NOADDR);
	for (i = 0; i < P->nr_siginfo; i++) {
		if (si[i].thread != thread)
			continue;
		r = sys4(__NR_rt_tgsigqueueinfo, pid, tid, si[i].signo,
			 (long)si[i].info);
		if (is_err(r))
			fail_num("re-queue thread signal", si[i].signo, r);
	}
}

#define FUTEX_OP_ADD1_ALWAYS ((1U << 28) | (5U << 24) | (1U << 12))  /* add 1; wake if old >= 0 */

/* A thread other than the first, from clone3 to its hand-over. */
__attribute__((noreturn, used)) static void thread_main(u64 i)
{
	const struct plan_thread *t = thread_at((u32)i);
	u32 g;

	setup_thread(t, (u32)sys0(__NR_gettid));
	queue_own_signals((u32)i + 1);
	__atomic_fetch_add(&ready_count, 1, __ATOMIC_SEQ_CST);
	futex_wake(&ready_count);
	while (!(g = go_flag))
		futex_wait(&go_flag, 0);
	if (use_gadgets)
		handover_thread_gadget(t->frame_addr, P->gadget_syscall_ret,
				       (u64)&left_count, FUTEX_OP_ADD1_ALWAYS);
	handover_sigreturn(t->frame_addr + 8);
}

static long clone_thread(u32 i)
{
	struct clone_args a;
	u64 tid = thread_at(i)->tid;
	long r;

	memset(&a, 0, sizeof(a));
	a.flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND |
		  CLONE_THREAD | CLONE_SYSVSEM;
	a.stack = P->thread_area + (u64)(i - 1) * P->thread_block;
	a.stack_size = P->thread_block;
	if (!(P->thread_flags & PT_NEW_TIDS) && !new_tids_refused) {
		a.set_tid = (u64)&tid;
		a.set_tid_size = 1;
		r = stub_clone3(&a, sizeof(a), thread_main, i);
		if (!is_err(r))
			return r;
		if (r == -EPERM)
			new_tids_refused = 1;
		else if (r != -EEXIST && r != -EINVAL && r != -ENOSPC)
			return r;
		a.set_tid = 0;
		a.set_tid_size = 0;
	}
	return stub_clone3(&a, sizeof(a), thread_main, i);
}

/* 9 */
static void thread_state(void)
{
	const struct plan_thread *t = thread_at(0);
	u32 i, n;
	long r;

	set_step(9, "thread state");
	/* Checked here, while a fault still gets the stub's own report. */
	use_gadgets = P->gadget_syscall_ret && P->gadget_sigreturn &&
		gadget_ok(P->gadget_syscall_ret, "\x0f\x05\xc3", 3) &&
		gadget_ok(P->gadget_sigreturn,
			  "\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05", 9);
	setup_thread(t, (u32)sys0(__NR_gettid));
	for (i = 1; i < P->nr_threads; i++) {
		r = clone_thread(i);
		if (is_err(r))
			fail_num("clone3 for thread", thread_at(i)->tid, r);
		thread_rt(i)->tid = (u32)r;
	}
	/* All threads are ready before anything else happens. */
	while ((n = ready_count) != P->nr_threads - 1)
		futex_wait(&ready_count, n);
	step_done();
}

struct ksigevent {               /* struct sigevent, 64 bytes */
	u64 value;
	s32 signo, notify, tid;
	u32 pad[11];
};

static long new_tid_of(u32 thread)      /* thread index + 1 */
{
	return thread == 1 ? sys0(__NR_gettid) : (long)thread_rt(thread - 1)->tid;
}

static void set_timers(void)
{
	const struct plan_timer *tm = at(P->timers_off);
	struct ksigevent ev;
	u64 its[4];
	s32 id;
	u32 i, w;
	int exact = 0;
	long r;

	if (P->nr_itimers == 3)
		for (w = 0; w < 3; w++)
			check(sys3(__NR_setitimer, w, (long)&P->itimers[w], 0),
			      "setitimer", NOADDR);
	if (!P->nr_timers)
		return;
	/* Linux 6.15+: timer_create takes the id from *timer_id. */
	exact = !is_err(sys5(__NR_prctl, PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0));
	for (i = 0; i < P->nr_timers; i++, tm++) {
		memset(&ev, 0, sizeof(ev));
		ev.value = tm->value;
		ev.signo = (s32)tm->signo;
		ev.notify = (s32)tm->notify;
		if (tm->notify == SIGEV_THREAD_ID) {
			if (!tm->thread || tm->thread > P->nr_threads)
				fail_num("timer for a thread not in the plan:",
					 (u64)tm->id, 0);
			ev.tid = (s32)new_tid_of(tm->thread);
		}
		for (;;) {
			id = exact ? tm->id : 0;
			r = sys3(__NR_timer_create, tm->clock, (long)&ev, (long)&id);
			if (is_err(r))
				fail_num("timer_create for timer", (u64)tm->id, r);
			if (exact || id == tm->id)
				break;
			/* Ids come in order: fill the gap, then let it go. */
			if (id > tm->id)
				fail_num("timer ids already past timer", (u64)tm->id, 0);
			sys1(__NR_timer_delete, id);
		}
		if (tm->value_sec || tm->value_nsec) {
			its[0] = tm->interval_sec;
			its[1] = tm->interval_nsec;
			its[2] = tm->value_sec;
			its[3] = tm->value_nsec;
			check(sys4(__NR_timer_settime, id, 0, (long)its, 0),
			      "timer_settime", NOADDR);
		}
	}
	if (exact)
		sys5(__NR_prctl, PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0);
}

/* 10 */
static void queue_signals(void)
{
	const struct plan_siginfo *si = at(P->siginfo_off);
	u64 all = ~0ULL;
	long pid, r;
	u32 i;
	int sig;

	set_step(10, "signals and timers");
	check(sys4(__NR_rt_sigprocmask, SIG_SETMASK, (long)&all, 0, 8),
	      "rt_sigprocmask", NOADDR);
	for (sig = 1; sig <= 64; sig++) {
		if (!(FAULT_MASK & BIT(sig)))
			continue;
		r = sys4(__NR_rt_sigaction, sig, (long)&P->sigactions[sig - 1],
			 0, 8);
		if (is_err(r))
			fail_num("rt_sigaction for signal", (u64)sig, r);
	}
	pid = sys0(__NR_getpid);
	for (i = 0; i < P->nr_siginfo; i++) {
		if (si[i].thread > P->nr_threads)
			fail_num("siginfo for a thread not in the plan:",
				 si[i].thread - 1, 0);
		if (si[i].thread != 0)
			continue;       /* thread-private: queued by each thread */
		r = sys3(__NR_rt_sigqueueinfo, pid, si[i].signo,
			 (long)si[i].info);
		if (is_err(r))
			fail_num("re-queue signal", si[i].signo, r);
	}
	queue_own_signals(1);
	set_timers();
	step_done();
}

/* 11 */
__attribute__((noreturn)) static void hand_over(void)
{
	const struct plan_thread *t = thread_at(0);
	u32 n;

	set_step(11, "hand over");
	step_done();    /* stop_after_step = 11: exit just before the jump */
	__atomic_store_n(&go_flag, 1, __ATOMIC_SEQ_CST);
	futex_wake(&go_flag);
	if (use_gadgets) {
		/* Every other thread is in the target's code before the
		   stub goes (see handover_thread_gadget). */
		while ((n = left_count) != P->nr_threads - 1)
			futex_wait(&left_count, n);
		handover_gadget(t->frame_addr, P->gadget_syscall_ret,
				P->stub_start, P->stub_len);
	}
	handover_sigreturn(t->frame_addr + 8);
}

__attribute__((noreturn, used)) void stub_main(const struct plan_header *plan)
{
	P = plan;
	check_plan();
	block_signals();
	unregister_rseq();
	unmap_launcher();
	move_vdso();
	map_memory();
	set_mm();
	install_fds();
	process_state();
	thread_state();
	queue_signals();
	hand_over();
}
