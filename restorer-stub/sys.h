/*
 * Raw x86_64 Linux system calls for the freestanding restorer stub (no
 * libc). Same shape as tools/include/nolibc/arch-x86_64.h: the kernel
 * takes arguments in rdi, rsi, rdx, r10, r8, r9, returns in rax and
 * clobbers rcx and r11. Results in [-4095, -1] are -errno.
 */
#ifndef CKPT_SYS_H
#define CKPT_SYS_H

typedef unsigned long ulong;

#define __NR_read                 0
#define __NR_write                1
#define __NR_close                3
#define __NR_mmap                 9
#define __NR_mprotect            10
#define __NR_munmap              11
#define __NR_rt_sigaction        13
#define __NR_rt_sigprocmask      14
#define __NR_rt_sigreturn        15
#define __NR_pread64             17
#define __NR_mremap              25
#define __NR_madvise             28
#define __NR_getpid              39
#define __NR_exit_group         231
#define __NR_umask               95
#define __NR_personality        135
#define __NR_sigaltstack        131
#define __NR_prctl              157
#define __NR_arch_prctl         158
#define __NR_gettid             186
#define __NR_set_tid_address    218
#define __NR_set_robust_list    273
#define __NR_dup3               292
#define __NR_prlimit64          302
#define __NR_rt_sigqueueinfo    129
#define __NR_rt_tgsigqueueinfo  297
#define __NR_rseq               334
#define __NR_close_range        436
#define __NR_futex              202
#define __NR_setpriority        141
#define __NR_sched_setscheduler 144
#define __NR_clone3             435
#define __NR_setitimer           38
#define __NR_timer_create       222
#define __NR_timer_settime      223
#define __NR_timer_delete       226
#define __NR_clock_gettime      228

#define PROT_READ       0x1
#define PROT_WRITE      0x2
#define PROT_EXEC       0x4
#define MAP_SHARED      0x01
#define MAP_PRIVATE     0x02
#define MAP_FIXED       0x10
#define MAP_ANONYMOUS   0x20
#define MAP_GROWSDOWN   0x100
#define MAP_FIXED_NOREPLACE 0x100000
#define MREMAP_MAYMOVE  1
#define MREMAP_FIXED    2

#define MADV_MERGEABLE  12
#define MADV_HUGEPAGE   14
#define MADV_NOHUGEPAGE 15
#define MADV_DONTFORK   10
#define MADV_DONTDUMP   16
#define MADV_WIPEONFORK 18
#define MADV_POPULATE_WRITE 23
#define MADV_COLLAPSE   25

#define SIG_BLOCK       0
#define SIG_SETMASK     2
#define SA_SIGINFO      0x4
#define SA_RESTORER     0x04000000
#define SS_DISABLE      2

#define PR_SET_PDEATHSIG 1
#define PR_SET_DUMPABLE  4
#define PR_SET_NAME     15
#define PR_SET_CHILD_SUBREAPER 36
#define PR_SET_NO_NEW_PRIVS 38
#define PR_TIMER_CREATE_RESTORE_IDS 77
#define SIGEV_THREAD_ID 4
#define PR_SET_MM       35
#define PR_SET_MM_MAP   14
#define ARCH_SET_GS     0x1001
#define ARCH_SET_FS     0x1002
#define RSEQ_FLAG_UNREGISTER 1
#define O_CLOEXEC       02000000

#define EPERM   1
#define EEXIST 17
#define EINVAL 22
#define ENOSPC 28

#define FUTEX_WAIT      0
#define FUTEX_WAKE      1
#define FUTEX_WAKE_OP   5
#define FUTEX_PRIVATE   128
#define FUTEX_TID_MASK  0x3fffffffU

#define CLONE_VM        0x00000100
#define CLONE_FS        0x00000200
#define CLONE_FILES     0x00000400
#define CLONE_SIGHAND   0x00000800
#define CLONE_THREAD    0x00010000
#define CLONE_SYSVSEM   0x00040000

static inline long sys0(long n)
{
	long r;
	__asm__ volatile ("syscall" : "=a"(r) : "0"(n) : "rcx", "r11", "memory");
	return r;
}

static inline long sys1(long n, long a)
{
	long r;
	__asm__ volatile ("syscall" : "=a"(r) : "0"(n), "D"(a)
			  : "rcx", "r11", "memory");
	return r;
}

static inline long sys2(long n, long a, long b)
{
	long r;
	__asm__ volatile ("syscall" : "=a"(r) : "0"(n), "D"(a), "S"(b)
			  : "rcx", "r11", "memory");
	return r;
}

static inline long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile ("syscall" : "=a"(r) : "0"(n), "D"(a), "S"(b), "d"(c)
			  : "rcx", "r11", "memory");
	return r;
}

static inline long sys4(long n, long a, long b, long c, long d)
{
	long r;
	register long r10 __asm__("r10") = d;
	__asm__ volatile ("syscall" : "=a"(r) : "0"(n), "D"(a), "S"(b), "d"(c),
			  "r"(r10) : "rcx", "r11", "memory");
	return r;
}

static inline long sys5(long n, long a, long b, long c, long d, long e)
{
	long r;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	__asm__ volatile ("syscall" : "=a"(r) : "0"(n), "D"(a), "S"(b), "d"(c),
			  "r"(r10), "r"(r8) : "rcx", "r11", "memory");
	return r;
}

static inline long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long r;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	__asm__ volatile ("syscall" : "=a"(r) : "0"(n), "D"(a), "S"(b), "d"(c),
			  "r"(r10), "r"(r8), "r"(r9) : "rcx", "r11", "memory");
	return r;
}

/* A raw result is an error iff it lies in [-4095, -1]. */
static inline int is_err(long r)
{
	return (unsigned long)r >= (unsigned long)-4095;
}

#endif
