/*
 * mem* for the freestanding stub (gcc may emit calls to them even with
 * -ffreestanding) and the one failure line. Compiled with
 * -fno-tree-loop-distribute-patterns so these loops are not turned back
 * into calls to themselves.
 */
#include "util.h"

const char *cur_step;          /* no initialiser: it would need a relocation */
u32 cur_step_no;

void *memcpy(void *d, const void *s, ulong n)
{
	unsigned char *dp = d;
	const unsigned char *sp = s;

	for (; n >= 8; n -= 8, dp += 8, sp += 8)
		*(u64 *)dp = *(const u64 *)sp;   /* x86: unaligned is fine */
	while (n--)
		*dp++ = *sp++;
	return d;
}

void *memmove(void *d, const void *s, ulong n)
{
	unsigned char *dp = d;
	const unsigned char *sp = s;

	if (dp <= sp || dp >= sp + n)
		return memcpy(d, s, n);
	while (n--)
		dp[n] = sp[n];
	return d;
}

void *memset(void *d, int c, ulong n)
{
	unsigned char *dp = d;

	while (n--)
		*dp++ = (unsigned char)c;
	return d;
}

int memcmp(const void *a, const void *b, ulong n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

struct line {
	char buf[240];
	ulong n;
};

static void put_str(struct line *l, const char *s)
{
	while (*s && l->n < sizeof(l->buf) - 1)
		l->buf[l->n++] = *s++;
}

static void put_num(struct line *l, u64 v, unsigned base)
{
	char tmp[24];
	int i = 0;

	do {
		tmp[i++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	if (base == 16)
		put_str(l, "0x");
	while (i && l->n < sizeof(l->buf) - 1)
		l->buf[l->n++] = tmp[--i];
}

__attribute__((noreturn)) static void report(struct line *l, long err)
{
	if (err) {
		put_str(l, " (errno ");
		put_num(l, (u64)-err, 10);
		put_str(l, ")");
	}
	l->buf[l->n++] = '\n';
	sys3(__NR_write, 2, (long)l->buf, (long)l->n);
	for (;;)
		sys1(__NR_exit_group, STATUS_AFTER_NO_RETURN);
}

static void head(struct line *l, const char *what)
{
	l->n = 0;
	put_str(l, "ckpt: restore failed after the point of no return: ");
	put_str(l, cur_step ? cur_step : "start");
	put_str(l, ": ");
	put_str(l, what);
}

void fail(const char *what, u64 addr, long err)
{
	struct line l;

	head(&l, what);
	if (addr != NOADDR) {
		put_str(&l, " at ");
		put_num(&l, addr, 16);
	}
	report(&l, err);
}

void fail_num(const char *what, u64 num, long err)
{
	struct line l;

	head(&l, what);
	put_str(&l, " ");
	put_num(&l, num, 10);
	report(&l, err);
}

void fail_fault(int sig, u64 addr)
{
	struct line l;

	head(&l, "fault: signal ");
	put_num(&l, (u64)sig, 10);
	put_str(&l, " at ");
	put_num(&l, addr, 16);
	report(&l, 0);
}
