/*
 * The plan: one flat, position-independent block the launcher builds and
 * the stub consumes. Everything the stub needs is here, already validated;
 * the stub discovers nothing and trusts nothing but this block.
 *
 * Layout rules (mirrored by ckpt/restore/plan.py; a test compares them via
 * the PLAN_ABI table the build extracts from the stub ELF):
 *  - little-endian, every field naturally aligned, no implicit padding;
 *  - tables are arrays at byte offsets from the start of the plan;
 *  - addresses are target addresses; fds are fds open in the launcher.
 */
#ifndef CKPT_PLAN_H
#define CKPT_PLAN_H

typedef unsigned long long u64;
typedef long long s64;
typedef unsigned int u32;
typedef int s32;

#define PLAN_MAGIC   0x314e414c5054504bULL   /* "KPTPLAN1" little-endian */
#define PLAN_VERSION 2

/* plan_vma.flags */
#define PV_SHARED     0x1     /* MAP_SHARED, else MAP_PRIVATE */
#define PV_ANON       0x2     /* no file: fd is -1 */
#define PV_GROWSDOWN  0x4     /* MAP_GROWSDOWN (the main stack) */

/* plan_vma.advice bits: madvise() applied after the VMA is filled */
#define PA_DONTFORK   0x1
#define PA_DONTDUMP   0x2
#define PA_WIPEONFORK 0x4
#define PA_HUGEPAGE   0x8
#define PA_NOHUGEPAGE 0x10
#define PA_MERGEABLE  0x20

struct plan_vma {
	u64 start, end;        /* page aligned, end > start */
	u64 offset;            /* byte offset into the file (file mappings) */
	s32 fd;                /* -1 for anonymous */
	u32 prot;              /* final PROT_* */
	u32 flags;             /* PV_* */
	u32 advice;            /* PA_* */
	u32 first_run;         /* index into the runs table */
	u32 nr_runs;
};

/* plan_run.flags */
#define PR_MAP        0x1     /* map, don't copy: see struct plan_run */

/* Fill [addr, addr + len) with len bytes of the image at image offset:
   pread into place, or with PR_MAP mmap(addr, len, vma prot, MAP_PRIVATE |
   MAP_FIXED, image_fd, offset) over the VMA (mapped restore: addr, len and
   offset page aligned; the VMA private, not growsdown). */
struct plan_run {
	u64 addr, len, offset;
	u32 flags;             /* PR_* */
	u32 pad;
};

/* dup3(src, dst, cloexec ? O_CLOEXEC : 0) */
struct plan_fd {
	s32 src, dst;
	u32 cloexec;
	u32 pad;
};

/* The kernel's struct sigaction for rt_sigaction (x86_64). */
struct plan_sigaction {
	u64 handler, flags, restorer, mask;
};

struct plan_rlimit {
	u32 resource;
	u32 pad;
	u64 cur, max;
};

/* One queued signal to re-raise with rt_tgsigqueueinfo (blocked until the
   final sigreturn restores the saved mask). */
struct plan_siginfo {
	u32 signo;
	u32 thread;            /* 0 = process-wide, else thread index + 1 */
	unsigned char info[128];         /* siginfo_t as the kernel gave it */
};

/* struct prctl_mm_map (104 bytes). The encoder fills auxv_size and exe_fd;
   the stub points auxv at plan_header.auxv before PR_SET_MM_MAP. */
struct plan_mm {
	u64 start_code, end_code, start_data, end_data;
	u64 start_brk, brk, start_stack;
	u64 arg_start, arg_end, env_start, env_end;
	u64 auxv;              /* stub: pointer to plan_header.auxv */
	u32 auxv_size;         /* bytes */
	u32 exe_fd;            /* (u32)-1: keep */
};

struct plan_thread {
	u64 tid;
	u64 fs_base, gs_base;
	u64 tid_address;                 /* set_tid_address */
	u64 robust_head, robust_len;     /* set_robust_list (len 0: skip) */
	u64 rseq_addr;                   /* 0: none */
	u32 rseq_len, rseq_sig;
	u64 altstack_sp, altstack_size;  /* sigaltstack */
	u32 altstack_flags;
	u32 pad;
	/* The rt_sigframe (pretcode, ucontext, siginfo, fpstate) the launcher
	   built: copied to frame_addr on the thread's own stack after memory is
	   restored; rt_sigreturn then finds it at rsp - 8 with
	   rsp = frame_addr + 8. */
	u64 frame_addr, frame_off, frame_len;
	char comm[16];                   /* PR_SET_NAME; "" = keep */
	s32 sched_policy;                /* -1: keep; else sched_setscheduler */
	s32 sched_priority;
	s32 nice;
	u32 set_nice;                    /* 1: setpriority(nice) */
};

/* A timer_create timer, created with its saved id
   (PR_TIMER_CREATE_RESTORE_IDS, else in order with dummies filling gaps)
   and armed relative to now. */
struct plan_timer {
	s32 id;
	s32 clock;
	u32 notify;                      /* SIGEV_SIGNAL 0, NONE 1, THREAD_ID 4 */
	u32 signo;
	u32 thread;                      /* THREAD_ID: thread index + 1 */
	u32 pad;
	u64 value;                       /* sigev_value */
	u64 interval_sec, interval_nsec, value_sec, value_nsec;
};

/* setitimer(which, ...): { interval {sec, usec}, value {sec, usec} } */
struct plan_itimer {
	u64 interval_sec, interval_usec, value_sec, value_usec;
};

#define PLAN_AUXV_WORDS 128

/* plan_header.thread_flags */
#define PT_NEW_TIDS   0x1       /* >= 2 * AT_VECTOR_SIZE on x86_64 */

struct plan_header {
	u64 magic;
	u64 version;
	u64 plan_size;                   /* bytes, including tables */

	/* The stub's own region (code, data, stack, this plan). Free in the
	   target's layout; unmapped at the very end when gadgets exist. */
	u64 stub_start, stub_len;

	/* The launcher's rseq registration, to unregister first. */
	u64 cur_rseq_addr;               /* 0: none */
	u32 cur_rseq_len, cur_rseq_sig;

	/* The launcher's [vvar][vvar_vclock][vdso] block, moved in one mremap
	   to park (inside the stub region, free) and then to dst. */
	u64 vdso_cur, vdso_len, vdso_park, vdso_dst;

	/* Everything in [0, task_top) outside the stub region and the vdso
	   block is unmapped (the launcher disappears). */
	u64 task_top;

	u32 image_fd;                    /* page data is pread (or mapped,
	                                    PR_MAP) from here */
	u32 fd_base;                     /* all launcher fds the plan uses are
	                                    >= fd_base; [3, fd_base) is closed
	                                    before fds are installed and
	                                    [fd_base, inf) after */
	u32 nr_vmas, nr_runs, nr_fds, nr_rlimits, nr_threads, nr_siginfo;
	u64 vmas_off, runs_off, fds_off, rlimits_off, threads_off, siginfo_off;

	struct plan_sigaction sigactions[64];   /* index signo - 1; SIGKILL and
	                                           SIGSTOP entries ignored */
	struct plan_mm mm;
	u64 auxv[PLAN_AUXV_WORDS];

	u64 personality;                 /* (u64)-1: keep */
	u32 umask;
	u32 pad;
	char comm[16];

	/* Final hand-over without leaving the stub mapped: jump to a
	   "syscall; ret" (0f 05 c3) in the target with rax = munmap(stub),
	   rsp = frame_addr; ret pops the pretcode slot, which holds the address
	   of a "mov $15,%rax; syscall" (rt_sigreturn). Both addresses are
	   checked by the stub against the bytes actually mapped; 0 or a
	   mismatch means: sigreturn directly, leaving the stub mapped. */
	u64 gadget_syscall_ret, gadget_sigreturn;

	/* Threads other than the first: thread i (1..nr_threads-1) gets the
	   block [thread_area + (i-1) * thread_block, + thread_block) inside
	   the stub region: a struct thread_rt at its start, its stub stack
	   above. PT_NEW_TIDS: don't ask clone3 for the saved ids. */
	u64 thread_area, thread_block;
	u32 thread_flags;
	u32 pad2;

	/* Process timers and prctl state (step 8 / step 10). */
	struct plan_itimer itimers[3];   /* REAL, VIRTUAL, PROF */
	u32 nr_itimers;                  /* 0: keep, 3: set all three */
	u32 nr_timers;
	u64 timers_off;
	s32 pdeathsig;                   /* -1: keep */
	s32 dumpable;                    /* -1: keep */
	u32 no_new_privs;                /* 1: set (it can't be cleared) */
	u32 child_subreaper;

	/* Test hook: when stop_after_step == N != 0 the stub calls
	   exit_group(stop_status) right after step N (numbered as in
	   restore.c: 1 block signals ... 11 hand over). 0: run to the end. */
	u32 stop_after_step, stop_status;
};

#endif
