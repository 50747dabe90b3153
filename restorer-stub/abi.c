/*
 * The plan ABI table: sizeof/offsetof of every plan.h field, and the plan.h
 * constants, in a non-loaded ELF section (.plan_abi) that
 * restorer-stub/build.py extracts into ckpt/restore/_stub.py:PLAN_ABI. The
 * Python encoder writes every field at the offset found here, so plan.h is
 * the single source of truth for the layout.
 *
 * Entry kinds (by name):
 *   "struct"           a = sizeof(struct struct)
 *   "struct.field"     a = offset, b = element size, c = element count
 *                      (1 for scalars; N for arrays)
 *   "#NAME"            a = value of the constant NAME
 * No pointers anywhere (so no relocations).
 */
#include "plan.h"

struct abi_ent {
	char name[48];
	u64 a, b, c;
};

#define S(s)  { #s, sizeof(struct s), 0, 0 }
#define F(s, f) { #s "." #f, __builtin_offsetof(struct s, f), \
		  sizeof(((struct s *)0)->f), 1 }
#define A(s, f) { #s "." #f, __builtin_offsetof(struct s, f), \
		  sizeof(((struct s *)0)->f[0]), \
		  sizeof(((struct s *)0)->f) / sizeof(((struct s *)0)->f[0]) }
#define K(n) { "#" #n, (u64)(n), 0, 0 }

__attribute__((section(".plan_abi"), used, aligned(8)))
const struct abi_ent plan_abi[] = {
	K(PLAN_MAGIC), K(PLAN_VERSION), K(PLAN_AUXV_WORDS),
	K(PV_SHARED), K(PV_ANON), K(PV_GROWSDOWN),
	K(PA_DONTFORK), K(PA_DONTDUMP), K(PA_WIPEONFORK), K(PA_HUGEPAGE),
	K(PA_NOHUGEPAGE), K(PA_MERGEABLE), K(PT_NEW_TIDS), K(PR_MAP),

	S(plan_vma),
	F(plan_vma, start), F(plan_vma, end), F(plan_vma, offset),
	F(plan_vma, fd), F(plan_vma, prot), F(plan_vma, flags),
	F(plan_vma, advice), F(plan_vma, first_run), F(plan_vma, nr_runs),

	S(plan_run),
	F(plan_run, addr), F(plan_run, len), F(plan_run, offset),
	F(plan_run, flags), F(plan_run, pad),

	S(plan_fd),
	F(plan_fd, src), F(plan_fd, dst), F(plan_fd, cloexec), F(plan_fd, pad),

	S(plan_sigaction),
	F(plan_sigaction, handler), F(plan_sigaction, flags),
	F(plan_sigaction, restorer), F(plan_sigaction, mask),

	S(plan_rlimit),
	F(plan_rlimit, resource), F(plan_rlimit, pad), F(plan_rlimit, cur),
	F(plan_rlimit, max),

	S(plan_siginfo),
	F(plan_siginfo, signo), F(plan_siginfo, thread), A(plan_siginfo, info),

	S(plan_mm),
	F(plan_mm, start_code), F(plan_mm, end_code), F(plan_mm, start_data),
	F(plan_mm, end_data), F(plan_mm, start_brk), F(plan_mm, brk),
	F(plan_mm, start_stack), F(plan_mm, arg_start), F(plan_mm, arg_end),
	F(plan_mm, env_start), F(plan_mm, env_end), F(plan_mm, auxv),
	F(plan_mm, auxv_size), F(plan_mm, exe_fd),

	S(plan_thread),
	F(plan_thread, tid), F(plan_thread, fs_base), F(plan_thread, gs_base),
	F(plan_thread, tid_address), F(plan_thread, robust_head),
	F(plan_thread, robust_len), F(plan_thread, rseq_addr),
	F(plan_thread, rseq_len), F(plan_thread, rseq_sig),
	F(plan_thread, altstack_sp), F(plan_thread, altstack_size),
	F(plan_thread, altstack_flags), F(plan_thread, pad),
	F(plan_thread, frame_addr), F(plan_thread, frame_off),
	F(plan_thread, frame_len), A(plan_thread, comm),
	F(plan_thread, sched_policy), F(plan_thread, sched_priority),
	F(plan_thread, nice), F(plan_thread, set_nice),

	S(plan_timer),
	F(plan_timer, id), F(plan_timer, clock), F(plan_timer, notify),
	F(plan_timer, signo), F(plan_timer, thread), F(plan_timer, pad),
	F(plan_timer, value), F(plan_timer, interval_sec),
	F(plan_timer, interval_nsec), F(plan_timer, value_sec),
	F(plan_timer, value_nsec),

	S(plan_itimer),
	F(plan_itimer, interval_sec), F(plan_itimer, interval_usec),
	F(plan_itimer, value_sec), F(plan_itimer, value_usec),

	S(plan_header),
	F(plan_header, magic), F(plan_header, version),
	F(plan_header, plan_size), F(plan_header, stub_start),
	F(plan_header, stub_len), F(plan_header, cur_rseq_addr),
	F(plan_header, cur_rseq_len), F(plan_header, cur_rseq_sig),
	F(plan_header, vdso_cur), F(plan_header, vdso_len),
	F(plan_header, vdso_park), F(plan_header, vdso_dst),
	F(plan_header, task_top), F(plan_header, image_fd),
	F(plan_header, fd_base), F(plan_header, nr_vmas),
	F(plan_header, nr_runs), F(plan_header, nr_fds),
	F(plan_header, nr_rlimits), F(plan_header, nr_threads),
	F(plan_header, nr_siginfo), F(plan_header, vmas_off),
	F(plan_header, runs_off), F(plan_header, fds_off),
	F(plan_header, rlimits_off), F(plan_header, threads_off),
	F(plan_header, siginfo_off), A(plan_header, sigactions),
	F(plan_header, mm), A(plan_header, auxv),
	F(plan_header, personality), F(plan_header, umask),
	F(plan_header, pad), A(plan_header, comm),
	F(plan_header, gadget_syscall_ret), F(plan_header, gadget_sigreturn),
	F(plan_header, thread_area), F(plan_header, thread_block),
	F(plan_header, thread_flags), F(plan_header, pad2),
	A(plan_header, itimers), F(plan_header, nr_itimers),
	F(plan_header, nr_timers), F(plan_header, timers_off),
	F(plan_header, pdeathsig), F(plan_header, dumpable),
	F(plan_header, no_new_privs), F(plan_header, child_subreaper),
	F(plan_header, stop_after_step), F(plan_header, stop_status),
};

_Static_assert(sizeof(struct plan_mm) == 104, "struct prctl_mm_map is 104 bytes");
_Static_assert(sizeof(struct plan_sigaction) == 32, "kernel sigaction is 32 bytes");
_Static_assert(sizeof(struct plan_siginfo) == 136, "siginfo entry");
