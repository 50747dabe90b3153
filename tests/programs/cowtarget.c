/* A target for the copy-on-write snapshot: memory a fork does not freeze,
 * a program that keeps writing while it is dumped, and a watch for any
 * trace the snapshot's child could leave.
 *
 *   cowtarget SIZE_MIB FLAG [nodf]
 *
 * Maps SIZE_MIB of private anonymous memory (B) filled with a pattern, and
 * 64 pages each of: MADV_DONTFORK (D), MADV_WIPEONFORK (W), and
 * MAP_SHARED|MAP_ANONYMOUS (S), each filled with its own pattern. With
 * "nodf", D is MADV_DONTDUMP instead and B is MADV_HUGEPAGE (no mapping
 * is left out of a fork). Counts
 * SIGCHLD (a handler). Prints "ready", then loops until FLAG exists: bumps a
 * generation number and stores it in the first word of B, D, W and S (one
 * after the other, never stopping in between), and calls
 * waitpid(-1, WNOHANG | __WALL), counting every child it reaps.
 * Then checks: the four generation words are equal (one instant), every
 * other word holds its pattern, no SIGCHLD, nothing reaped; prints
 * "ok" and exits 0, or "bad WHAT" and exits 1.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define SMALL 64

static volatile sig_atomic_t sigchld;

static void on_chld(int sig)
{
	(void)sig;
	sigchld++;
}

static uint64_t pattern(uint64_t tag, uint64_t i)
{
	uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ (tag << 56);
	return x ^ (x >> 31);
}

static uint64_t *area(size_t bytes, int flags, int advice, uint64_t tag)
{
	uint64_t *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
	if (p == MAP_FAILED)
		exit(101);
	if (advice >= 0 && madvise(p, bytes, advice))
		exit(102);
	for (size_t i = 0; i < bytes / 8; i++)
		p[i] = pattern(tag, i);
	return p;
}

static int intact(const uint64_t *p, size_t bytes, uint64_t tag)
{
	for (size_t i = 1; i < bytes / 8; i++)
		if (p[i] != pattern(tag, i))
			return 0;
	return 1;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 100;
	size_t big = (size_t)atol(argv[1]) << 20, small = SMALL * PAGE;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_chld;
	if (sigaction(SIGCHLD, &sa, NULL))
		return 103;
	int priv = MAP_PRIVATE | MAP_ANONYMOUS;
	int nodf = argc > 3 && !strcmp(argv[3], "nodf");
	uint64_t *b = area(big, priv, nodf ? MADV_HUGEPAGE : -1, 1);
	uint64_t *d = area(small, priv, nodf ? MADV_DONTDUMP : MADV_DONTFORK, 2);
	uint64_t *w = area(small, priv, MADV_WIPEONFORK, 3);
	uint64_t *s = area(small, MAP_SHARED | MAP_ANONYMOUS, -1, 4);
	printf("ready\n");
	fflush(stdout);

	uint64_t gen = 0;
	long reaped = 0;
	while (access(argv[2], F_OK)) {
		gen++;
		b[0] = gen;
		d[0] = gen;
		w[0] = gen;
		s[0] = gen;
		if (waitpid(-1, NULL, WNOHANG | __WALL) > 0)
			reaped++;
		usleep(200);
	}
	const char *bad = NULL;
	if (!(b[0] == d[0] && d[0] == w[0] && w[0] == s[0]))
		bad = "generation";
	else if (!intact(b, big, 1) || !intact(d, small, 2) || !intact(w, small, 3) ||
		 !intact(s, small, 4))
		bad = "pattern";
	else if (sigchld)
		bad = "sigchld";
	else if (reaped)
		bad = "reaped";
	if (bad) {
		printf("bad %s (gen %llu %llu %llu %llu, sigchld %d, reaped %ld)\n", bad,
		       (unsigned long long)b[0], (unsigned long long)d[0],
		       (unsigned long long)w[0], (unsigned long long)s[0],
		       (int)sigchld, reaped);
		return 1;
	}
	printf("ok\n");
	return 0;
}
