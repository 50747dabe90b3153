/* Small helpers for the stub: mem*, and the one-line failure report. */
#ifndef CKPT_UTIL_H
#define CKPT_UTIL_H

#include "plan.h"
#include "sys.h"

#define NOADDR (~0ULL)
#define STATUS_AFTER_NO_RETURN 99     /* ckpt.errors.Status.AFTER_NO_RETURN */

/* The step being run, for the failure line (set by set_step). */
extern const char *cur_step;
extern u32 cur_step_no;

void *memcpy(void *d, const void *s, ulong n);
void *memset(void *d, int c, ulong n);
void *memmove(void *d, const void *s, ulong n);
int memcmp(const void *a, const void *b, ulong n);

/*
 * Write "ckpt: restore failed after the point of no return: <step>: <what>
 * [at 0x<addr>] [(errno N)]\n" to fd 2 and exit_group(99). addr NOADDR:
 * no address; err: a raw syscall result (-errno) or 0 for none.
 */
__attribute__((noreturn)) void fail(const char *what, u64 addr, long err);
/* Same with a decimal number after what: "<what> <num>". */
__attribute__((noreturn)) void fail_num(const char *what, u64 num, long err);
/* A synchronous fault (SIGSEGV, SIGBUS, ...) while the stub runs. */
__attribute__((noreturn)) void fail_fault(int sig, u64 addr);

#endif
