/*
 * The restorer stub: rebuilds the saved process in place from the plan
 * (plan.h). Runs after the point of no return: the launcher's memory is
 * gone from step 3 on, so every failure is reported with one line on fd 2
 * and exit_group(99) (util.c:fail), never a hang or a bare SIGSEGV.
 *
 * Steps (plan_header.stop_after_step numbers them; tests stop after any):
 *   0 check plan       magic, version, one thread (not a stop point)
 *   1 block signals    all but the synchronous fault signals, which go to
 *                      the stub's own handler (one line + exit 99)
 *   2 unregister rseq  the launcher's (glibc's) rseq area
 *   3 unmap launcher   everything below task_top but the stub and the vdso
 *   4 move vdso        [vvar][vvar_vclock][vdso] in one mremap, via park
 *   5 map memory       mmap every VMA, pread its runs, mprotect, madvise
 *   6 set mm           prctl(PR_SET_MM, PR_SET_MM_MAP)
 *   7 install fds      close [3, fd_base), dup3 the plan's, close the rest
 *   8 process state    sigactions (not yet the fault signals), rlimits,
 *                      personality, umask, comm
 *   9 thread state     fs/gs base, tid address, robust list, altstack,
 *                      rseq, the signal frame onto the target's stack
 *  10 queue signals    fault-signal actions, block all, re-queue siginfo
 *  11 hand over        rt_sigreturn on the frame (munmapping the stub on
 *                      the way when the target has the gadgets)
 */
#include "plan.h"
#include "sys.h"
#include "util.h"

/* entry.S */
__attribute__((noreturn)) void handover_gadget(u64 frame_addr, u64 gadget,
					       u64 stub_start, u64 stub_len);
__attribute__((noreturn)) void handover_sigreturn(u64 sp);
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
	if (P->nr_threads != 1)
		fail_num("this stub restores exactly one thread; threads in plan:",
			 P->nr_threads, 0);
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
		u32 prot = v->prot | (v->nr_runs ? PROT_WRITE : 0);
		u32 flags = MAP_FIXED_NOREPLACE;
		int anon = v->flags & PV_ANON;
		long r;

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
		for (j = 0; j < v->nr_runs; j++)
			fill(&runs[v->first_run + j]);
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

/* 9 */
static void thread_state(void)
{
	const struct plan_thread *t = at(P->threads_off);
	struct kstack ss;
	long r;

	set_step(9, "thread state");
	check(sys2(__NR_arch_prctl, ARCH_SET_FS, (long)t->fs_base),
	      "arch_prctl(ARCH_SET_FS)", t->fs_base);
	check(sys2(__NR_arch_prctl, ARCH_SET_GS, (long)t->gs_base),
	      "arch_prctl(ARCH_SET_GS)", t->gs_base);
	sys1(__NR_set_tid_address, (long)t->tid_address);
	if (t->robust_len)
		check(sys2(__NR_set_robust_list, (long)t->robust_head,
			   (long)t->robust_len), "set_robust_list", t->robust_head);
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
	memcpy((void *)t->frame_addr, at(t->frame_off), t->frame_len);
	/* Checked here, while a fault still gets the stub's own report. */
	use_gadgets = P->gadget_syscall_ret && P->gadget_sigreturn &&
		gadget_ok(P->gadget_syscall_ret, "\x0f\x05\xc3", 3) &&
		gadget_ok(P->gadget_sigreturn,
			  "\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05", 9);
	if (use_gadgets)
		*(u64 *)t->frame_addr = P->gadget_sigreturn;  /* pretcode */
	step_done();
}

/* 10 */
static void queue_signals(void)
{
	const struct plan_siginfo *si = at(P->siginfo_off);
	u64 all = ~0ULL;
	long pid, tid, r;
	u32 i;
	int sig;

	set_step(10, "queue signals");
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
	tid = sys0(__NR_gettid);
	for (i = 0; i < P->nr_siginfo; i++) {
		if (si[i].thread == 0)
			r = sys3(__NR_rt_sigqueueinfo, pid, si[i].signo,
				 (long)si[i].info);
		else if (si[i].thread == 1)
			r = sys4(__NR_rt_tgsigqueueinfo, pid, tid, si[i].signo,
				 (long)si[i].info);
		else
			fail_num("siginfo for a thread not in the plan:",
				 si[i].thread - 1, 0);
		if (is_err(r))
			fail_num("re-queue signal", si[i].signo, r);
	}
	step_done();
}

/* 11 */
__attribute__((noreturn)) static void hand_over(void)
{
	const struct plan_thread *t = at(P->threads_off);

	set_step(11, "hand over");
	step_done();    /* stop_after_step = 11: exit just before the jump */
	if (use_gadgets)
		handover_gadget(t->frame_addr, P->gadget_syscall_ret,
				P->stub_start, P->stub_len);
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
